//! A local fake of the Stripe API for the outbox and gateway tests, on plain HTTP/1.1 at
//! 127.0.0.1: it takes `POST /v1/billing/meter_events`, records every attempt and every
//! accepted event, and answers like Stripe — the meter event object on success, `400 "An event
//! already exists with identifier …"` for a known identifier, and on demand 500s, 429s with
//! `Retry-After`, a slow answer, or a chosen error for one identifier.
//!
//! Every meter event is first held to Stripe's own published request schema,
//! `tests/fixtures/stripe/meter_events_request_schema.json` (read at start, see
//! [`MeterEventSchema`]): a form-encoded body; `event_name` and `payload` present; no parameter
//! the schema does not name; strings no longer than their `maxLength`; `timestamp` an integer;
//! `payload` a deepObject of strings holding the two keys its description names
//! (`stripe_customer_id`, `value`); `timestamp` within the past 35 calendar days or at most 5
//! minutes ahead of the fake's clock (the window the schema's description gives). A request
//! that breaks a rule answers 400 with Stripe's error envelope (`type`
//! `invalid_request_error`, `param`, `message`, and `code` where Stripe's published error-code
//! enum has one: `parameter_missing`, `parameter_unknown`, `parameter_invalid_integer`), is
//! recorded as an attempt with its [`Refusal`], and is never accepted. A fake dropped with
//! refusals nobody took ([`FakeStripe::take_refusals`]) fails the test: the gateway must never
//! send what Stripe would refuse.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use creditgate::clock::{SharedClock, SystemClock};
use percent_encoding::percent_decode_str;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The operation the fake serves, as the schema file names it.
pub const METER_EVENTS_PATH: &str = "/v1/billing/meter_events";
const FORM: &str = "application/x-www-form-urlencoded";

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

/// Why the schema refuses a request: what goes into Stripe's error envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Stripe's `error.code`, when its published enum has one for the rule.
    pub code: Option<&'static str>,
    /// Stripe's `error.param`: the parameter at fault, in form notation (`payload[value]`).
    pub param: String,
    pub message: String,
}

impl Refusal {
    fn new(code: Option<&'static str>, param: impl Into<String>, message: String) -> Self {
        Self {
            code,
            param: param.into(),
            message,
        }
    }

    /// Stripe's error envelope for it.
    pub fn body(&self) -> String {
        let mut error = serde_json::json!({
            "type": "invalid_request_error",
            "param": self.param,
            "message": self.message,
        });
        if let (Some(code), Some(map)) = (self.code, error.as_object_mut()) {
            map.insert("code".into(), Value::from(code));
        }
        serde_json::json!({ "error": error }).to_string()
    }
}

/// One request the fake answered.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub at: Instant,
    pub identifier: Option<String>,
    pub status: u16,
    /// Set when the schema refused the request.
    pub refusal: Option<Refusal>,
    /// The raw body, for reporting exactly what was sent.
    pub body: String,
}

/// One property of the request schema, as far as form encoding tells them apart.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Property {
    String {
        max_length: Option<usize>,
    },
    Integer,
    /// `type: object` whose `additionalProperties` are strings, sent as `name[key]=value`.
    StringMap,
    /// `type: array` of strings, sent as `name[]=v` or `name[0]=v`.
    StringArray {
        max_length: Option<usize>,
    },
}

/// The request schema of `POST /v1/billing/meter_events`, read from Stripe's published file.
#[derive(Debug, Clone)]
pub struct MeterEventSchema {
    properties: Vec<(String, Property)>,
    required: Vec<String>,
    /// `additionalProperties` of the body: `false` refuses unknown parameters.
    closed: bool,
    /// The payload keys the payload's description names as defaults (customer, value).
    payload_keys: Vec<String>,
    /// The timestamp window the timestamp's description gives.
    max_past_s: i64,
    max_future_s: i64,
}

fn schema_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/stripe/meter_events_request_schema.json")
}

fn max_length(v: &Value) -> Option<usize> {
    v.get("maxLength")
        .and_then(Value::as_u64)
        .and_then(|n| usize::try_from(n).ok())
}

/// The words inside "(default is `…`)" in a description, in order.
fn defaults_named(description: &str) -> Vec<String> {
    description
        .split("(default is `")
        .skip(1)
        .filter_map(|rest| rest.split_once('`').map(|(name, _)| name.to_string()))
        .collect()
}

impl MeterEventSchema {
    /// Reads the vendored schema file; panics (failing the test) when it is not the shape
    /// this fake understands, rather than validating against less than the file says.
    pub fn load() -> Self {
        let path = schema_file();
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let doc: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        let content = &doc[METER_EVENTS_PATH]["post"]["requestBody"]["content"][FORM];
        let schema = &content["schema"];
        let encoding = &content["encoding"];
        assert_eq!(schema["type"], "object", "the body schema is an object");
        let props = schema["properties"]
            .as_object()
            .expect("the body schema has properties");
        let mut properties = Vec::new();
        for (name, p) in props {
            let deep = encoding[name]["style"] == "deepObject";
            let kind = match p["type"].as_str() {
                Some("string") => Property::String {
                    max_length: max_length(p),
                },
                Some("integer") => Property::Integer,
                Some("object") if deep && p["additionalProperties"]["type"] == "string" => {
                    Property::StringMap
                }
                Some("array") if deep && p["items"]["type"] == "string" => Property::StringArray {
                    max_length: max_length(&p["items"]),
                },
                other => panic!("schema property {name} of type {other:?} is not understood"),
            };
            properties.push((name.clone(), kind));
        }
        let required = schema["required"]
            .as_array()
            .expect("the body schema lists required params")
            .iter()
            .map(|v| v.as_str().expect("required names are strings").to_string())
            .collect();
        let payload_keys = defaults_named(
            props["payload"]["description"]
                .as_str()
                .expect("payload has a description"),
        );
        assert_eq!(
            payload_keys,
            ["stripe_customer_id", "value"],
            "the payload's description names its customer and value keys"
        );
        let timestamp = props["timestamp"]["description"]
            .as_str()
            .expect("timestamp has a description");
        assert!(
            timestamp.contains("within the past 35 calendar days")
                && timestamp.contains("up to 5 minutes in the future"),
            "the timestamp window this fake enforces is the one the schema states: {timestamp}"
        );
        Self {
            properties,
            required,
            closed: schema["additionalProperties"] == false,
            payload_keys,
            max_past_s: 35 * 24 * 3600,
            max_future_s: 5 * 60,
        }
    }

    fn property(&self, name: &str) -> Option<&Property> {
        self.properties
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p)
    }

    /// Checks one request (its `Content-Type` and raw body) at `now_s`.
    pub fn validate(
        &self,
        content_type: Option<&str>,
        body: &[u8],
        now_s: i64,
    ) -> Result<(), Refusal> {
        let media = content_type
            .and_then(|c| c.split(';').next())
            .map(str::trim)
            .unwrap_or("");
        if !media.eq_ignore_ascii_case(FORM) {
            return Err(Refusal::new(
                None,
                "",
                format!("The request body must be {FORM}, not {media:?}."),
            ));
        }
        let form = parse_form(body);
        let mut seen: HashSet<&str> = HashSet::new();
        let mut payload: Vec<&str> = Vec::new();
        for (key, value) in &form {
            let (name, path) = split_key(key);
            let Some(property) = self.property(name) else {
                if self.closed {
                    return Err(Refusal::new(
                        Some("parameter_unknown"),
                        name,
                        format!("Received unknown parameter: {name}"),
                    ));
                }
                continue;
            };
            seen.insert(name);
            match property {
                Property::String { max_length } => {
                    if !path.is_empty() {
                        return Err(not_a_string(key, name));
                    }
                    too_long(name, value, *max_length)?;
                }
                Property::Integer => {
                    if !path.is_empty() || !is_integer(value) {
                        return Err(Refusal::new(
                            Some("parameter_invalid_integer"),
                            name,
                            format!("Invalid integer: {value}"),
                        ));
                    }
                }
                Property::StringMap => match path.as_slice() {
                    [k] if !k.is_empty() => payload.push(k),
                    [] => {
                        return Err(Refusal::new(
                            None,
                            name,
                            format!("Invalid object: {name} must be sent as {name}[key]=value"),
                        ))
                    }
                    _ => return Err(not_a_string(key, &format!("{name}[{}]", path[0]))),
                },
                Property::StringArray { max_length } => match path.as_slice() {
                    [i] if i.is_empty() || i.bytes().all(|b| b.is_ascii_digit()) => {
                        too_long(name, value, *max_length)?;
                    }
                    _ => return Err(Refusal::new(None, name, format!("Invalid array: {key}"))),
                },
            }
        }
        if let Some(missing) = self.required.iter().find(|r| !seen.contains(r.as_str())) {
            return Err(Refusal::new(
                Some("parameter_missing"),
                missing.as_str(),
                format!("Missing required param: {missing}."),
            ));
        }
        if let Some(missing) = self
            .payload_keys
            .iter()
            .find(|k| !payload.contains(&k.as_str()))
        {
            return Err(Refusal::new(
                Some("parameter_missing"),
                format!("payload[{missing}]"),
                format!("The payload must contain {missing}."),
            ));
        }
        if let Some((_, ts)) = form.iter().find(|(k, _)| k == "timestamp") {
            let ts: i64 = ts.parse().unwrap_or(i64::MIN);
            if ts < now_s - self.max_past_s || ts > now_s + self.max_future_s {
                return Err(Refusal::new(
                    None,
                    "timestamp",
                    format!(
                        "Timestamp {ts} must be within the past 35 calendar days or up to 5 \
                         minutes in the future (now is {now_s})."
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// `payload[a][b]` → (`payload`, [`a`, `b`]); a key without a well-formed bracket suffix is a
/// name by itself.
fn split_key(key: &str) -> (&str, Vec<&str>) {
    let Some(open) = key.find('[') else {
        return (key, Vec::new());
    };
    let (name, mut rest) = key.split_at(open);
    let mut path = Vec::new();
    while let Some(inner) = rest.strip_prefix('[') {
        let Some(close) = inner.find(']') else {
            return (key, Vec::new());
        };
        path.push(&inner[..close]);
        rest = &inner[close + 1..];
    }
    if rest.is_empty() {
        (name, path)
    } else {
        (key, Vec::new())
    }
}

fn is_integer(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) && text.parse::<i64>().is_ok()
}

fn not_a_string(key: &str, param: &str) -> Refusal {
    Refusal::new(
        None,
        param,
        format!("Invalid string: {param} must be a string, not an object ({key})"),
    )
}

fn too_long(param: &str, value: &str, max: Option<usize>) -> Result<(), Refusal> {
    match max {
        Some(max) if value.chars().count() > max => Err(Refusal::new(
            None,
            param,
            format!("Invalid string: {value}; must be at most {max} characters"),
        )),
        _ => Ok(()),
    }
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
    /// How many refusals a test took with `take_refusals`.
    refusals_taken: usize,
    generated: u64,
}

pub struct FakeStripe {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl Drop for FakeStripe {
    fn drop(&mut self) {
        self.task.abort();
        if std::thread::panicking() {
            return;
        }
        let s = self.lock();
        let refused: Vec<&Attempt> = s
            .attempts
            .iter()
            .filter(|a| a.refusal.is_some())
            .skip(s.refusals_taken)
            .collect();
        assert!(
            refused.is_empty(),
            "the fake Stripe refused requests as Stripe's schema would: {refused:#?}"
        );
    }
}

impl FakeStripe {
    /// A fake whose timestamp window follows the system clock.
    pub async fn start() -> Self {
        Self::start_with_clock(Arc::new(SystemClock)).await
    }

    /// A fake whose timestamp window follows `clock` (the test's fake clock, so that meter
    /// events stamped by it are judged by the same time).
    pub async fn start_with_clock(clock: SharedClock) -> Self {
        let schema = Arc::new(MeterEventSchema::load());
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
            refusals_taken: 0,
            generated: 0,
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve(stream, shared.clone(), schema.clone(), clock.clone()));
            }
        });
        Self { addr, state, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
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

    /// The schema refusals since the last call, which the test thereby expects.
    pub fn take_refusals(&self) -> Vec<Refusal> {
        let mut s = self.lock();
        let new: Vec<Refusal> = s
            .attempts
            .iter()
            .filter_map(|a| a.refusal.clone())
            .skip(s.refusals_taken)
            .collect();
        s.refusals_taken += new.len();
        new
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

async fn serve(
    mut stream: TcpStream,
    state: Arc<Mutex<State>>,
    schema: Arc<MeterEventSchema>,
    clock: SharedClock,
) {
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
        let now_s = clock.now_ms().div_euclid(1000);
        let (status, headers, body) = answer(&request, &state, &schema, now_s);
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

fn answer(
    request: &Request,
    state: &Arc<Mutex<State>>,
    schema: &MeterEventSchema,
    now_s: i64,
) -> Answer {
    let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
    let form = parse_form(&request.body);
    let identifier = form
        .iter()
        .find(|(k, _)| k == "identifier")
        .map(|(_, v)| v.clone());
    let mut refusal = None;
    let (status, headers, body) =
        answer_locked(&mut s, request, &form, schema, now_s, &mut refusal);
    s.attempts.push(Attempt {
        at: Instant::now(),
        identifier,
        status,
        refusal,
        body: String::from_utf8_lossy(&request.body).into_owned(),
    });
    (status, headers, body)
}

fn answer_locked(
    s: &mut State,
    request: &Request,
    form: &[(String, String)],
    schema: &MeterEventSchema,
    now_s: i64,
    refusal: &mut Option<Refusal>,
) -> Answer {
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    if request.method != "POST" || request.path != METER_EVENTS_PATH {
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
    if let Err(refused) = schema.validate(request.header("content-type"), &request.body, now_s) {
        let body = refused.body();
        *refusal = Some(refused);
        return (400, vec![("Stripe-Should-Retry", "false".into())], body);
    }
    // The schema guarantees these two; the identifier is optional (Stripe makes one).
    let event_name = field("event_name").unwrap_or_default();
    let customer = field("payload[stripe_customer_id]").unwrap_or_default();
    let value = field("payload[value]").unwrap_or_default();
    let identifier = field("identifier").unwrap_or_else(|| {
        s.generated += 1;
        format!("fake_generated_{}", s.generated)
    });
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
    let timestamp = field("timestamp").unwrap_or_else(|| now_s.to_string());
    s.accepted.push(MeterEvent {
        identifier: identifier.clone(),
        event_name: event_name.clone(),
        customer: customer.clone(),
        value: value.clone(),
        timestamp: timestamp.clone(),
        authorization: request.header("authorization").map(str::to_string),
        form: form.to_vec(),
    });
    let ts: i64 = timestamp.parse().unwrap_or(now_s);
    let payload: serde_json::Map<String, Value> = form
        .iter()
        .filter_map(|(k, v)| match split_key(k) {
            ("payload", path) if path.len() == 1 => {
                Some((path[0].to_string(), Value::from(v.as_str())))
            }
            _ => None,
        })
        .collect();
    let body = serde_json::json!({
        "object": "billing.meter_event",
        "created": now_s,
        "event_name": event_name,
        "identifier": identifier,
        "livemode": false,
        "payload": payload,
        "timestamp": ts,
    });
    (200, vec![], body.to_string())
}
