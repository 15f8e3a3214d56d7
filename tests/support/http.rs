//! A raw HTTP/1.1 client for the integration tests: it sends request targets byte for byte (so
//! `//`, `%2F`, `..` and NUL reach the gateway as written, which ordinary clients normalise away)
//! and reads the whole response (`Connection: close`).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// `error.code` of a JSON error body.
    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("<none>")
            .to_string()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends raw bytes and reads the response until the server closes.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> Response {
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(request).await?;
        let mut buf = Vec::new();
        stream.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(30), attempt)
        .await
        .expect("response within 30 s")
        .expect("response read");
    parse(&buf)
}

/// A request with `Connection: close`; `Content-Length` is added when there is a body.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    } else if method == "POST" || method == "PUT" || method == "PATCH" {
        req.push_str("Content-Length: 0\r\n");
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    if let Some(b) = body {
        bytes.extend_from_slice(b);
    }
    raw(addr, &bytes).await
}

pub async fn get(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Response {
    request(addr, "GET", target, headers, None).await
}

pub async fn post_json(
    addr: SocketAddr,
    target: &str,
    headers: &[(&str, &str)],
    body: &serde_json::Value,
) -> Response {
    let mut all: Vec<(&str, &str)> = headers.to_vec();
    all.push(("Content-Type", "application/json"));
    let text = body.to_string();
    request(addr, "POST", target, &all, Some(text.as_bytes())).await
}

pub fn parse(buf: &[u8]) -> Response {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(buf)));
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let rest = &buf[split + 4..];
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_text.trim().split(';').next().unwrap_or("0"), 16)
            .unwrap_or(0);
        data = &data[eol + 2..];
        if size == 0 || data.len() < size {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
}

/// What a raw exchange ended with: a parsed response, or the connection closing without one.
#[derive(Debug)]
pub enum Outcome {
    Answered(Response),
    CutShort(String),
}

/// Sends `request` and reads until the server closes; never panics on a broken connection.
/// A whole response followed by a reset (a killed process) still counts as answered.
pub async fn exchange(addr: SocketAddr, request: Vec<u8>) -> Outcome {
    let mut buf = Vec::new();
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(&request).await?;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut chunk).await? {
                0 => return Ok::<_, std::io::Error>(()),
                n => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let ended = tokio::time::timeout(Duration::from_secs(60), attempt).await;
    match ended {
        Err(_) => Outcome::CutShort("no answer within 60 s".into()),
        Ok(Err(e)) if buf.is_empty() => Outcome::CutShort(e.to_string()),
        Ok(_) => {
            if !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                return Outcome::CutShort(format!("{} bytes, no whole head", buf.len()));
            }
            let r = parse(&buf);
            match r
                .header("content-length")
                .and_then(|v| v.parse::<usize>().ok())
            {
                Some(n) if n != r.body.len() => {
                    Outcome::CutShort(format!("body {} of {n} bytes", r.body.len()))
                }
                _ => Outcome::Answered(r),
            }
        }
    }
}
