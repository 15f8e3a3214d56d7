//! A small HTTP/1.1 backend standing in for the generation service: the README's demo runs it
//! behind the gateway, and the integration tests use it as the real upstream that records what
//! it receives (method, path, headers, body) and answers as told (status, `X-Images-Generated`,
//! delay). Not part of the request path.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// How the backend answers.
#[derive(Debug, Clone)]
pub struct Behaviour {
    pub status: u16,
    pub images_generated: Option<u64>,
    pub delay: Duration,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            status: 200,
            images_generated: None,
            delay: Duration::ZERO,
        }
    }
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    /// The body, up to 1 MiB kept.
    pub body: Vec<u8>,
    pub body_len: u64,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A running backend.
#[derive(Clone)]
pub struct DemoBackend {
    pub addr: std::net::SocketAddr,
    recorded: Arc<Mutex<Vec<Recorded>>>,
    behaviour: Arc<Mutex<Behaviour>>,
}

const KEEP_BODY: usize = 1024 * 1024;

impl DemoBackend {
    /// Binds `addr` (port 0 for any) and serves on the current tokio runtime.
    pub async fn start(addr: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let backend = Self {
            addr: listener.local_addr()?,
            recorded: Arc::default(),
            behaviour: Arc::default(),
        };
        let serving = backend.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let conn = serving.clone();
                tokio::spawn(async move {
                    let _ = conn.serve_connection(stream).await;
                });
            }
        });
        Ok(backend)
    }

    pub fn set_behaviour(&self, b: Behaviour) {
        if let Ok(mut cur) = self.behaviour.lock() {
            *cur = b;
        }
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.recorded.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn request_count(&self) -> usize {
        self.recorded.lock().map(|r| r.len()).unwrap_or(0)
    }

    pub fn clear(&self) {
        if let Ok(mut r) = self.recorded.lock() {
            r.clear();
        }
    }

    async fn serve_connection(&self, stream: TcpStream) -> std::io::Result<()> {
        let mut reader = BufReader::new(stream);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            let mut parts = line.split_whitespace();
            let method = parts.next().unwrap_or("").to_string();
            let target = parts.next().unwrap_or("").to_string();
            let mut headers = Vec::new();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).await? == 0 {
                    return Ok(());
                }
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                if let Some((n, v)) = h.split_once(':') {
                    headers.push((n.trim().to_string(), v.trim().to_string()));
                }
            }
            let find = |name: &str| {
                headers
                    .iter()
                    .find(|(n, _): &&(String, String)| n.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.clone())
            };
            let mut body = Vec::new();
            let mut body_len: u64 = 0;
            if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
                loop {
                    let mut size_line = String::new();
                    reader.read_line(&mut size_line).await?;
                    let size = usize::from_str_radix(
                        size_line.trim().split(';').next().unwrap_or("0"),
                        16,
                    )
                    .unwrap_or(0);
                    if size == 0 {
                        let mut end = String::new();
                        reader.read_line(&mut end).await?;
                        break;
                    }
                    let mut chunk = vec![0u8; size];
                    reader.read_exact(&mut chunk).await?;
                    body_len += size as u64;
                    if body.len() < KEEP_BODY {
                        body.extend_from_slice(&chunk);
                    }
                    let mut crlf = [0u8; 2];
                    reader.read_exact(&mut crlf).await?;
                }
            } else if let Some(len) = find("content-length").and_then(|v| v.parse::<u64>().ok()) {
                let mut remaining = len;
                let mut buf = vec![0u8; 64 * 1024];
                while remaining > 0 {
                    let want = remaining.min(buf.len() as u64) as usize;
                    let n = reader.read(&mut buf[..want]).await?;
                    if n == 0 {
                        return Ok(());
                    }
                    if body.len() < KEEP_BODY {
                        body.extend_from_slice(&buf[..n]);
                    }
                    remaining -= n as u64;
                }
                body_len = len;
            }
            let behaviour = self.behaviour.lock().map(|b| b.clone()).unwrap_or_default();
            let job = format!("job_{}", self.request_count() + 1);
            let model = find("x-creditgate-model").unwrap_or_default();
            if let Ok(mut r) = self.recorded.lock() {
                r.push(Recorded {
                    method,
                    target,
                    headers,
                    body,
                    body_len,
                });
            }
            if !behaviour.delay.is_zero() {
                tokio::time::sleep(behaviour.delay).await;
            }
            let payload = if (200..300).contains(&behaviour.status) {
                format!(r#"{{"id":"{job}","status":"succeeded","model":"{model}"}}"#)
            } else {
                format!(r#"{{"error":"backend answered {}"}}"#, behaviour.status)
            };
            let mut response = format!(
                "HTTP/1.1 {} Demo\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
                behaviour.status,
                payload.len()
            );
            if let Some(k) = behaviour.images_generated {
                response.push_str(&format!("X-Images-Generated: {k}\r\n"));
            }
            response.push_str("\r\n");
            response.push_str(&payload);
            reader.get_mut().write_all(response.as_bytes()).await?;
        }
    }
}
