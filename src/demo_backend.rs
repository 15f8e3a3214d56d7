//! A small HTTP/1.1 backend standing in for the generation service: the README's demo runs it
//! behind the gateway, and the integration tests use it as the real upstream that records what
//! it receives (method, path, headers, body) and answers as told (status, `X-Images-Generated`,
//! delay). A `POST /api/v1/videos` starts a job (its id in the JSON body `id` and/or
//! `X-Job-Id`, as told); `GET /api/v1/jobs/{id}` answers that job's status — the one
//! [`DemoBackend::set_job_status`] gave it, else [`Behaviour::job_status`] — or 404 for a job it
//! never started. Not part of the request path.

use std::collections::HashMap;
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
    /// Where a started job's id is given.
    pub job_id: JobIdIn,
    /// What a poll of a job reports unless [`DemoBackend::set_job_status`] said otherwise.
    pub job_status: String,
}

/// Where the answer to `POST /api/v1/videos` carries the job id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobIdIn {
    Body,
    Header,
    Both,
    /// Neither: a 2xx without a job id.
    Neither,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            status: 200,
            images_generated: None,
            delay: Duration::ZERO,
            job_id: JobIdIn::Body,
            job_status: "succeeded".to_string(),
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
    /// Job id → status set by the test or demo.
    jobs: Arc<Mutex<HashMap<String, Option<String>>>>,
}

const KEEP_BODY: usize = 1024 * 1024;

/// Status, JSON body and extra header lines of one answer.
type Answer = (u16, String, Vec<String>);

impl DemoBackend {
    /// Binds `addr` (port 0 for any) and serves on the current tokio runtime.
    pub async fn start(addr: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let backend = Self {
            addr: listener.local_addr()?,
            recorded: Arc::default(),
            behaviour: Arc::default(),
            jobs: Arc::default(),
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

    /// What polls of job `id` report from now on (`pending`, `succeeded`, `failed`, ...).
    pub fn set_job_status(&self, id: &str, status: &str) {
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.insert(id.to_string(), Some(status.to_string()));
        }
    }

    /// The ids of the jobs started so far, oldest first.
    pub fn job_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .jobs
            .lock()
            .map(|j| j.keys().cloned().collect())
            .unwrap_or_default();
        ids.sort_by_key(|id| id.trim_start_matches("job_").parse::<u64>().unwrap_or(0));
        ids
    }

    /// The answer to a request for `target`: status, JSON body, extra headers.
    fn answer(&self, behaviour: &Behaviour, target: &str, job: &str, model: &str) -> Answer {
        let path = target.split('?').next().unwrap_or("");
        let ok = (200..300).contains(&behaviour.status);
        if !ok {
            let body = format!(r#"{{"error":"backend answered {}"}}"#, behaviour.status);
            return (behaviour.status, body, Vec::new());
        }
        if let Some(id) = path.strip_prefix("/api/v1/jobs/") {
            let status = self
                .jobs
                .lock()
                .ok()
                .and_then(|j| j.get(id).cloned())
                .map(|s| s.unwrap_or_else(|| behaviour.job_status.clone()));
            return match status {
                Some(status) => (
                    200,
                    format!(r#"{{"id":"{id}","status":"{status}"}}"#),
                    Vec::new(),
                ),
                None => (404, r#"{"error":"no such job"}"#.to_string(), Vec::new()),
            };
        }
        if path == "/api/v1/videos" {
            if let Ok(mut jobs) = self.jobs.lock() {
                jobs.insert(job.to_string(), None);
            }
            let (in_body, in_header) = match behaviour.job_id {
                JobIdIn::Body => (true, false),
                JobIdIn::Header => (false, true),
                JobIdIn::Both => (true, true),
                JobIdIn::Neither => (false, false),
            };
            let body = match in_body {
                true => format!(r#"{{"id":"{job}","status":"pending","model":"{model}"}}"#),
                false => format!(r#"{{"status":"pending","model":"{model}"}}"#),
            };
            let headers = match in_header {
                true => vec![format!("X-Job-Id: {job}")],
                false => Vec::new(),
            };
            return (behaviour.status, body, headers);
        }
        let body = format!(r#"{{"id":"{job}","status":"succeeded","model":"{model}"}}"#);
        (behaviour.status, body, Vec::new())
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
            let (status, payload, extra) = self.answer(&behaviour, &target, &job, &model);
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
            let mut response = format!(
                "HTTP/1.1 {} Demo\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
                status,
                payload.len()
            );
            for h in extra {
                response.push_str(&h);
                response.push_str("\r\n");
            }
            if let Some(k) = behaviour.images_generated {
                response.push_str(&format!("X-Images-Generated: {k}\r\n"));
            }
            response.push_str("\r\n");
            response.push_str(&payload);
            reader.get_mut().write_all(response.as_bytes()).await?;
        }
    }
}
