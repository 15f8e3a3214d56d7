//! Prometheus metrics: registered once in the default registry, recorded on the request path
//! (atomic increments, no allocation beyond label lookup), exposed as text on the metrics
//! listener. No label carries an account id or a key: labels are routes, outcomes, plans,
//! operations, models and reasons — all bounded by the catalog.

use std::sync::LazyLock;

use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{
    register_counter_vec, register_histogram_vec, register_int_counter_vec, register_int_gauge,
    CounterVec, Encoder, HistogramVec, IntCounterVec, IntGauge, TextEncoder,
};

/// Latency buckets from 50 µs to 10 s (sub-millisecond resolution for the store).
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

macro_rules! metric {
    ($name:ident: $ty:ty = $make:expr) => {
        pub static $name: LazyLock<Option<$ty>> = LazyLock::new(|| $make.ok());
    };
}

metric!(REQUESTS: IntCounterVec = register_int_counter_vec!(
    "creditgate_requests_total",
    "Requests by route and outcome (ok, upstream_error, or the error code).",
    &["route", "outcome"]
));
metric!(CREDITS_CHARGED: IntCounterVec = register_int_counter_vec!(
    "creditgate_credits_charged_total",
    "Credits kept after settlement.",
    &["plan", "operation", "model"]
));
metric!(CREDITS_REFUNDED: IntCounterVec = register_int_counter_vec!(
    "creditgate_credits_refunded_total",
    "Credits given back after a failed or partial generation.",
    &["plan", "operation", "model"]
));
metric!(PPU_SPEND_USD: CounterVec = register_counter_vec!(
    "creditgate_ppu_spend_usd_total",
    "Pay-per-use spend kept after settlement, in USD (display only; the ledger counts integer micro-dollars).",
    &["model"]
));
metric!(PPU_REFUNDED_USD: CounterVec = register_counter_vec!(
    "creditgate_ppu_refunded_usd_total",
    "Pay-per-use spend given back, in USD.",
    &["model"]
));
metric!(REJECTIONS: IntCounterVec = register_int_counter_vec!(
    "creditgate_rejections_total",
    "Requests refused by the gateway, by reason (error code).",
    &["reason"]
));
metric!(STORE_LATENCY: HistogramVec = register_histogram_vec!(
    "creditgate_store_latency_seconds",
    "Latency of billing store operations.",
    &["op"],
    LATENCY_BUCKETS.to_vec()
));
metric!(UPSTREAM_LATENCY: HistogramVec = register_histogram_vec!(
    "creditgate_upstream_latency_seconds",
    "Time from admission to the end of the upstream exchange.",
    &["route"],
    LATENCY_BUCKETS.to_vec()
));
metric!(CATALOG_VERSION: IntGauge = register_int_gauge!(
    "creditgate_catalog_version",
    "Version of the live rate catalog (1 at start, +1 per accepted change)."
));
metric!(CATALOG_RELOADS: IntCounterVec = register_int_counter_vec!(
    "creditgate_catalog_reloads_total",
    "Catalog reload attempts by trigger and result.",
    &["trigger", "result"]
));
metric!(ORPHANS: IntCounterVec = register_int_counter_vec!(
    "creditgate_orphans_total",
    "Holds whose lease ended unsettled, settled by the sweeper, by orphan policy (refund, keep).",
    &["policy"]
));
metric!(SWEEPS: IntCounterVec = register_int_counter_vec!(
    "creditgate_sweeps_total",
    "Sweeper runs by result (ok, error), and refunds it finished (result finished_refund).",
    &["result"]
));
metric!(JOBS: IntCounterVec = register_int_counter_vec!(
    "creditgate_jobs_total",
    "Async jobs: accepted (hold kept for the job), settled at a final state (succeeded, failed, canceled), answered 2xx without a job id (no_job_id, settled as a request), not recorded (record_failed).",
    &["event"]
));
metric!(SETTLEMENT_FAILURES: IntCounterVec = register_int_counter_vec!(
    "creditgate_settlement_failures_total",
    "Settlements that could not be written to the store (the charge stands).",
    &["kind"]
));

pub fn inc(counter: &LazyLock<Option<IntCounterVec>>, labels: &[&str], by: u64) {
    if let Some(c) = counter.as_ref() {
        if let Ok(m) = c.get_metric_with_label_values(labels) {
            m.inc_by(by);
        }
    }
}

pub fn add(counter: &LazyLock<Option<CounterVec>>, labels: &[&str], by: f64) {
    if let Some(c) = counter.as_ref() {
        if let Ok(m) = c.get_metric_with_label_values(labels) {
            m.inc_by(by);
        }
    }
}

pub fn observe(h: &LazyLock<Option<HistogramVec>>, labels: &[&str], seconds: f64) {
    if let Some(h) = h.as_ref() {
        if let Ok(m) = h.get_metric_with_label_values(labels) {
            m.observe(seconds);
        }
    }
}

/// Counts a finished request under its route and outcome, and a refusal (a request that got no
/// upstream answer) under its error code.
pub fn count_request(route: &str, outcome: &str, refused_with: Option<&str>) {
    inc(&REQUESTS, &[route, outcome], 1);
    if let Some(code) = refused_with {
        inc(&REJECTIONS, &[code], 1);
    }
}

pub fn set_catalog_version(version: u64) {
    if let Some(g) = CATALOG_VERSION.as_ref() {
        g.set(i64::try_from(version).unwrap_or(i64::MAX));
    }
}

/// Prometheus text of everything registered.
pub fn render() -> (String, Vec<u8>) {
    let encoder = TextEncoder::new();
    let mut buffer = Vec::new();
    if encoder.encode(&prometheus::gather(), &mut buffer).is_err() {
        buffer.clear();
    }
    (encoder.format_type().to_string(), buffer)
}

/// Serves `GET /metrics`.
pub struct MetricsApp;

#[async_trait]
impl ServeHttp for MetricsApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let (status, content_type, body) = if path == "/metrics" {
            let (ct, body) = render();
            (200, ct, body)
        } else {
            (404, "text/plain".to_string(), b"not found\n".to_vec())
        };
        http::Response::builder()
            .status(status)
            .header("Content-Type", content_type)
            .header("Content-Length", body.len().to_string())
            .body(body)
            .unwrap_or_default()
    }
}
