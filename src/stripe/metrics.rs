//! The Stripe metrics: what the outbox worker did with each charge (delivered, duplicate,
//! dead-lettered, skipped), how often it had to retry and why, how long the outbox and the
//! dead-letter stream are, and what the webhooks applied. Registered once in the default
//! Prometheus registry under `creditgate_stripe_*`; labels are bounded words, never an
//! account, customer or charge id.
//!
//! Each [`StripeReporter`](super::StripeReporter) also keeps its own [`ReporterStats`], so a
//! process running several workers (tests) can tell them apart.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

use prometheus::{register_int_counter_vec, register_int_gauge, IntCounterVec, IntGauge};

static RESULTS: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    register_int_counter_vec!(
        "creditgate_stripe_meter_events_total",
        "Outbox entries finished by the Stripe worker, by result: delivered, duplicate (Stripe \
         already had the identifier), dead_lettered, skipped_void, skipped_refunded.",
        &["result"]
    )
    .ok()
});

static RETRIES: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    register_int_counter_vec!(
        "creditgate_stripe_retries_total",
        "Meter event sends that will be retried, by reason: rate_limited, server_error, \
         network, timeout, auth.",
        &["reason"]
    )
    .ok()
});

static BACKLOG: LazyLock<Option<IntGauge>> = LazyLock::new(|| {
    register_int_gauge!(
        "creditgate_stripe_outbox_backlog",
        "Entries in the Stripe outbox stream (not yet reported)."
    )
    .ok()
});

static DEAD_BACKLOG: LazyLock<Option<IntGauge>> = LazyLock::new(|| {
    register_int_gauge!(
        "creditgate_stripe_dead_letter_backlog",
        "Entries in the Stripe dead-letter stream (refused by Stripe, kept for an operator)."
    )
    .ok()
});

static WEBHOOKS: LazyLock<Option<IntCounterVec>> = LazyLock::new(|| {
    register_int_counter_vec!(
        "creditgate_stripe_webhook_events_total",
        "Stripe webhook deliveries by event type (or `other`) and result.",
        &["type", "result"]
    )
    .ok()
});

/// How an outbox entry was finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Delivered,
    Duplicate,
    DeadLettered,
    SkippedVoid,
    SkippedRefunded,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Duplicate => "duplicate",
            Self::DeadLettered => "dead_lettered",
            Self::SkippedVoid => "skipped_void",
            Self::SkippedRefunded => "skipped_refunded",
        }
    }
}

/// One worker's counts (also added to the process-wide metrics).
#[derive(Debug, Default)]
pub struct ReporterStats {
    delivered: AtomicU64,
    duplicate: AtomicU64,
    dead_lettered: AtomicU64,
    skipped: AtomicU64,
    retries: AtomicU64,
}

/// A copy of [`ReporterStats`] at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub delivered: u64,
    pub duplicate: u64,
    pub dead_lettered: u64,
    /// Void or fully refunded charges acknowledged without a report.
    pub skipped: u64,
    pub retries: u64,
}

impl ReporterStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            delivered: self.delivered.load(Ordering::Relaxed),
            duplicate: self.duplicate.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn finished(&self, how: Finish) {
        let counter = match how {
            Finish::Delivered => &self.delivered,
            Finish::Duplicate => &self.duplicate,
            Finish::DeadLettered => &self.dead_lettered,
            Finish::SkippedVoid | Finish::SkippedRefunded => &self.skipped,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        inc(&RESULTS, how.as_str());
    }

    pub(crate) fn retried(&self, reason: &'static str) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        inc(&RETRIES, reason);
    }
}

fn inc(counter: &LazyLock<Option<IntCounterVec>>, label: &str) {
    if let Some(c) = counter.as_ref() {
        if let Ok(m) = c.get_metric_with_label_values(&[label]) {
            m.inc();
        }
    }
}

pub(crate) fn set_backlog(outbox: u64, dead: u64) {
    if let Some(g) = BACKLOG.as_ref() {
        g.set(i64::try_from(outbox).unwrap_or(i64::MAX));
    }
    if let Some(g) = DEAD_BACKLOG.as_ref() {
        g.set(i64::try_from(dead).unwrap_or(i64::MAX));
    }
}

/// Counts one webhook delivery; `event_type` must be a bounded word (`other` for the rest).
pub(crate) fn webhook(event_type: &'static str, result: &'static str) {
    if let Some(c) = WEBHOOKS.as_ref() {
        if let Ok(m) = c.get_metric_with_label_values(&[event_type, result]) {
            m.inc();
        }
    }
}

/// Makes the metrics appear on `/metrics` before the first event (at zero).
pub fn register() {
    for how in [
        Finish::Delivered,
        Finish::Duplicate,
        Finish::DeadLettered,
        Finish::SkippedVoid,
        Finish::SkippedRefunded,
    ] {
        if let Some(c) = RESULTS.as_ref() {
            let _ = c.get_metric_with_label_values(&[how.as_str()]);
        }
    }
    LazyLock::force(&RETRIES);
    LazyLock::force(&BACKLOG);
    LazyLock::force(&DEAD_BACKLOG);
    LazyLock::force(&WEBHOOKS);
}
