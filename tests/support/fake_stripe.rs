//! A local fake of the Stripe API for the outbox tests, on plain HTTP/1.1 at 127.0.0.1: it
//! takes form-encoded `POST /v1/billing/meter_events`, records every attempt and every accepted
//! event, and answers like Stripe — the meter event object on success, `400 "An event already
//! exists with identifier …"` for a known identifier, and on demand 500s, 429s with
//! `Retry-After`, a slow answer, or a chosen error for one identifier.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use percent_encoding::percent_decode_str;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How the fake answers meter events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Up,
    /// Every request fails with this 5xx status.
    Failing(u16),
    /// Every request gets 429 with `Retry-After: <s>`.
    RateLimited {
        retry_after_s: u64,
    },
    /// The next request gets 429 with `Retry-After: <s>`, then the fake is up.
    RateLimitedOnce {
        retry_after_s: u64,
    },
}

/// One accepted meter event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterEvent {
    pub identifier: String,
    pub event_name: String,
    pub customer: String,
    pub value: String,
    pub timestamp: String,
    pub authorization: Option<String>,
    /// Every decoded form field, in order.
    pub form: Vec<(String, String)>,
}

/// One request the fake answered.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub at: Instant,
    pub identifier: Option<String>,
    pub status: u16,
}

#[derive(Debug)]
struct State {
    mode: Mode,
    delay: Duration,
    accepted: Vec<MeterEvent>,
    attempts: Vec<Attempt>,
    /// Identifiers Stripe already has.
    known: HashSet<String>,
    /// identifier → (status, message) to answer instead.
    rejections: HashMap<String, (u16, String)>,
}

pub struct FakeStripe {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl Drop for FakeStripe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeStripe {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake Stripe");
        let addr = listener.local_addr().expect("fake Stripe address");
        let state = Arc::new(Mutex::new(State {
            mode: Mode::Up,
            delay: Duration::ZERO,
            accepted: Vec::new(),
            attempts: Vec::new(),
            known: HashSet::new(),
            rejections: HashMap::new(),
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve(stream, shared.clone()));
            }
        });
        Self { addr, state, task }
    }

    /// `http://127.0.0.1:<port>/`, for `stripe.api_base`.
    pub fn api_base(&self) -> String {
        format!("http://{}/", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_mode(&self, mode: Mode) {
        self.lock().mode = mode;
    }

    /// Every answer waits this long first.
    pub fn set_delay(&self, delay: Duration) {
        self.lock().delay = delay;
    }

    /// Stripe already has an event with this identifier.
    pub fn preload(&self, identifier: &str) {
        self.lock().known.insert(identifier.to_string());
    }

    /// Answer `status` with `message` (an `invalid_request_error`) for this identifier.
    pub fn reject(&self, identifier: &str, status: u16, message: &str) {
        self.lock()
            .rejections
            .insert(identifier.to_string(), (status, message.to_string()));
    }

    pub fn accepted(&self) -> Vec<MeterEvent> {
        self.lock().accepted.clone()
    }

    pub fn attempts(&self) -> Vec<Attempt> {
        self.lock().attempts.clone()
    }

    pub fn attempts_for(&self, identifier: &str) -> usize {
        self.lock()
            .attempts
            .iter()
            .filter(|a| a.identifier.as_deref() == Some(identifier))
            .count()
    }
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

async fn serve(mut stream: TcpStream, state: Arc<Mutex<State>>) {
    let mut buffer = Vec::new();
    loop {
        let Some(request) = read_request(&mut stream, &mut buffer).await else {
            return;
        };
        let close = request
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let delay = state.lock().map(|s| s.delay).unwrap_or_default();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let (status, headers, body) = answer(&request, &state);
        let mut out = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nRequest-Id: req_fake\r\n",
            reason(status),
            body.len()
        );
        for (name, value) in headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(body.as_bytes());
        if stream.write_all(&bytes).await.is_err() || close {
            return;
        }
    }
}

/// Reads one request (headers and a `Content-Length` body); `None` at end of stream.
async fn read_request(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<Request> {
    let header_end = loop {
        if let Some(i) = find(buffer, b"\r\n\r\n") {
            break i;
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..header_end]).to_string();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let path = first.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let body_start = header_end + 4;
    while buffer.len() < body_start + length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    let body = buffer[body_start..body_start + length].to_vec();
    buffer.drain(..body_start + length);
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn decode(text: &str) -> String {
    percent_decode_str(&text.replace('+', " "))
        .decode_utf8_lossy()
        .to_string()
}

fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn error_body(kind: &str, message: &str) -> String {
    serde_json::json!({"error": {"type": kind, "message": message}}).to_string()
}

type Answer = (u16, Vec<(&'static str, String)>, String);

fn answer(request: &Request, state: &Arc<Mutex<State>>) -> Answer {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    let form = parse_form(&request.body);
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let identifier = field("identifier");
    let (status, headers, body) = answer_locked(&mut s, request, &form, identifier.clone(), field);
    s.attempts.push(Attempt {
        at: Instant::now(),
        identifier,
        status,
    });
    (status, headers, body)
}

fn answer_locked(
    s: &mut State,
    request: &Request,
    form: &[(String, String)],
    identifier: Option<String>,
    field: impl Fn(&str) -> Option<String>,
) -> Answer {
    if request.method != "POST" || request.path != "/v1/billing/meter_events" {
        return (
            404,
            vec![],
            error_body("invalid_request_error", "Unrecognized request URL."),
        );
    }
    if !request
        .header("authorization")
        .is_some_and(|a| a.starts_with("Bearer sk_"))
    {
        return (
            401,
            vec![],
            error_body("invalid_request_error", "Invalid API Key provided."),
        );
    }
    match s.mode {
        Mode::Up => {}
        Mode::Failing(status) => {
            return (
                status,
                vec![("Stripe-Should-Retry", "true".into())],
                error_body("api_error", "An unknown error occurred."),
            )
        }
        Mode::RateLimited { retry_after_s } | Mode::RateLimitedOnce { retry_after_s } => {
            if matches!(s.mode, Mode::RateLimitedOnce { .. }) {
                s.mode = Mode::Up;
            }
            return (
                429,
                vec![("Retry-After", retry_after_s.to_string())],
                error_body(
                    "invalid_request_error",
                    "Too many requests hit the API too quickly.",
                ),
            );
        }
    }
    let (Some(event_name), Some(customer), Some(value), Some(identifier)) = (
        field("event_name"),
        field("payload[stripe_customer_id]"),
        field("payload[value]"),
        identifier,
    ) else {
        return (
            400,
            vec![],
            error_body("invalid_request_error", "Missing required param."),
        );
    };
    if let Some((status, message)) = s.rejections.get(&identifier) {
        return (
            *status,
            vec![("Stripe-Should-Retry", "false".into())],
            error_body("invalid_request_error", message),
        );
    }
    if !s.known.insert(identifier.clone()) {
        return (
            400,
            vec![("Stripe-Should-Retry", "false".into())],
            error_body(
                "invalid_request_error",
                &format!("An event already exists with identifier {identifier}."),
            ),
        );
    }
    let timestamp = field("timestamp").unwrap_or_default();
    s.accepted.push(MeterEvent {
        identifier: identifier.clone(),
        event_name: event_name.clone(),
        customer: customer.clone(),
        value: value.clone(),
        timestamp: timestamp.clone(),
        authorization: request.header("authorization").map(str::to_string),
        form: form.to_vec(),
    });
    let ts: i64 = timestamp.parse().unwrap_or(0);
    let body = serde_json::json!({
        "object": "billing.meter_event",
        "created": ts,
        "event_name": event_name,
        "identifier": identifier,
        "livemode": false,
        "payload": {"stripe_customer_id": customer, "value": value},
        "timestamp": ts,
    });
    (200, vec![], body.to_string())
}
