//! The alert metrics: `creditgate_alerts_total{result}` (what became of each alert: `recorded`
//! into the outbox, `delivered`, `duplicate` dropped at delivery, `retried` after a failed POST,
//! `record_failed` when the outbox could not be written) and the gauge
//! `creditgate_alerts_backlog` (entries in the outbox stream, refreshed by the delivery worker).
//! Labels are bounded words, never an account.

use std::sync::LazyLock;

use prometheus::{register_int_counter_vec, register_int_gauge, IntCounterVec, IntGauge};

static RESULTS: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    register_int_counter_vec!(
        "creditgate_alerts_total",
        "Low-balance alerts by result: recorded (claimed and written to the outbox), \
         delivered (receiver answered 2xx), duplicate (a repeat dropped at delivery), retried \
         (a POST failed and will be repeated), record_failed (the outbox could not be written).",
        &["result"]
    )
    .ok()
});

static BACKLOG: LazyLock<Option<IntGauge>> = LazyLock::new(|| {
    register_int_gauge!(
        "creditgate_alerts_backlog",
        "Entries in the low-balance alert outbox stream (not yet delivered)."
    )
    .ok()
});

/// Registers the metrics so they show (at zero) before the first alert.
pub fn register() {
    LazyLock::force(&RESULTS);
    LazyLock::force(&BACKLOG);
    for result in [
        "recorded",
        "delivered",
        "duplicate",
        "retried",
        "record_failed",
    ] {
        if let Some(c) = RESULTS.as_ref() {
            c.with_label_values(&[result]).inc_by(0);
        }
    }
}

pub fn count(result: &str) {
    if let Some(c) = RESULTS.as_ref() {
        c.with_label_values(&[result]).inc();
    }
}

pub fn set_backlog(len: u64) {
    if let Some(g) = BACKLOG.as_ref() {
        g.set(i64::try_from(len).unwrap_or(i64::MAX));
    }
}
