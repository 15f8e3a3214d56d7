//! Settlement, called from `logging` once the exchange is over: an upstream 2xx keeps the charge
//! (less the images an `X-Images-Generated` header says were not made); anything else — 4xx, 5xx,
//! connect failure, timeout, no upstream answer — refunds it. A reservation settles exactly once
//! (the ledger guards it); a kept charge's mark is written off the response's critical path.
//! [`finish`] is the whole step as the proxy calls it: decide, write (timed, retried, logged),
//! count; an upstream success is settled by [`finish_before_reply`] before the client gets its
//! answer. A hold whose settlement never lands (the gateway died) is settled by the sweeper.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pingora::http::ResponseHeader;

use crate::headers::IMAGES_GENERATED;
use crate::ledger::{Ledger, SettleOutcome, StoreError};
use crate::metrics;
use crate::money::MICROS_PER_USD;
use crate::reserve::{Payment, Reservation};

/// How the upstream exchange ended, as far as billing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamOutcome {
    /// The upstream answered 2xx; `images_generated` from its header, if any.
    Succeeded { images_generated: Option<u64> },
    /// The upstream answered non-2xx, or never answered.
    Failed,
}

impl UpstreamOutcome {
    /// The success test: a 2xx status, with the upstream's `X-Images-Generated` count if any.
    pub fn from_response(response: &ResponseHeader) -> Self {
        if !response.status.is_success() {
            return Self::Failed;
        }
        let images_generated = response
            .headers
            .get(IMAGES_GENERATED)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        Self::Succeeded { images_generated }
    }

    /// A request with no upstream answer (never sent, connect failure, timeout) failed.
    pub fn or_failed(outcome: Option<Self>) -> Self {
        outcome.unwrap_or(Self::Failed)
    }
}

/// What settlement decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settlement {
    /// Units given back (credits, or micro-dollars).
    pub refunded: u64,
    /// Units kept.
    pub kept: u64,
}

/// The refund an outcome calls for, without touching the store.
pub fn decide(reservation: &Reservation, outcome: UpstreamOutcome) -> Settlement {
    let total = match reservation.payment {
        Payment::Credits { charged, .. } => charged,
        Payment::Spend { charged, .. } => charged.0,
    };
    let refunded = match outcome {
        UpstreamOutcome::Failed => total,
        UpstreamOutcome::Succeeded {
            images_generated: Some(k),
        } if k < reservation.meta.quantity => reservation.refund_for(reservation.meta.quantity - k),
        UpstreamOutcome::Succeeded { .. } => 0,
    };
    Settlement {
        refunded,
        kept: total - refunded.min(total),
    }
}

/// Attempts of a settlement the request awaits (backoff from 20 ms: ~0.3 s in all).
pub const INLINE_ATTEMPTS: u32 = 5;
/// Attempts of a settlement written in the background (a kept charge, or one whose first
/// attempt failed): backoff doubling to at most 2 s, ~30 s in all, so a store outage shorter
/// than that does not leave a hold the sweeper would take for an orphan after its lease
/// (and, by the refund policy, give back a result the client received).
pub const BACKGROUND_ATTEMPTS: u32 = 20;
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// The settler token of a request's own settlement, in the foreground and in the background.
const REQUEST_SETTLER: &str = "request";

/// Applies the settlement. Store errors are retried up to `attempts` times in all with
/// backoff; the caller logs what still failed (the sweeper then settles the hold by the orphan
/// policy after its lease: never twice).
pub async fn settle(
    ledger: &dyn Ledger,
    reservation: &Reservation,
    settlement: Settlement,
    attempts: u32,
) -> Result<SettleOutcome, StoreError> {
    // A kept charge is marked settled too: the sweeper would otherwise take its hold for an
    // orphan once the lease ends, and the Stripe reporter waits for the mark.
    let mut delay = Duration::from_millis(20);
    let mut attempt = 0;
    loop {
        // One settler for every attempt: a retry after a lost answer finishes its own refund.
        match ledger
            .settle_as(
                &reservation.account_id,
                &reservation.id,
                settlement.refunded,
                REQUEST_SETTLER,
            )
            .await
        {
            Ok(outcome) => return Ok(outcome),
            Err(e) if attempt + 1 >= attempts => return Err(e),
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Settles a finished request's reservation and counts what it kept and gave back. A settlement
/// with nothing to give back only writes the "settled" mark (which takes the hold off the
/// sweeper's list and lets the Stripe reporter report it), so it runs in the background and does
/// not hold the client's keep-alive connection; lost in a crash, the sweeper settles the hold by
/// the orphan policy after its lease. Store failures are logged and counted.
pub async fn finish(
    ledger: &Arc<dyn Ledger>,
    reservation: &Reservation,
    outcome: UpstreamOutcome,
    request_id: &str,
) -> Settlement {
    let s = decide(reservation, outcome);
    if s.refunded == 0 {
        write_in_background(ledger, reservation, s, request_id);
    } else {
        write_logged(ledger.as_ref(), reservation, s, request_id, INLINE_ATTEMPTS).await;
    }
    record(reservation, s);
    s
}

/// Settles an upstream success before its response goes to the client (called from the
/// response filter): once the client can have its result, the hold is no orphan, so a crash
/// right after the answer cannot make the sweeper refund a delivered result. One attempt, so
/// a store outage does not hold the response past one command timeout; a failed attempt goes
/// on in the background with [`settle`]'s retries (same settler, so exactly once).
pub async fn finish_before_reply(
    ledger: &Arc<dyn Ledger>,
    reservation: &Reservation,
    outcome: UpstreamOutcome,
    request_id: &str,
) -> Settlement {
    let s = decide(reservation, outcome);
    let started = Instant::now();
    let first = settle(ledger.as_ref(), reservation, s, 1).await;
    metrics::observe(
        &metrics::STORE_LATENCY,
        &["settle"],
        started.elapsed().as_secs_f64(),
    );
    if first.is_err() {
        write_in_background(ledger, reservation, s, request_id);
    }
    record(reservation, s);
    s
}

/// [`write_logged`] with the background's retries, on its own task.
fn write_in_background(
    ledger: &Arc<dyn Ledger>,
    reservation: &Reservation,
    s: Settlement,
    request_id: &str,
) {
    let ledger = ledger.clone();
    let held = reservation.clone();
    let request_id = request_id.to_string();
    tokio::spawn(async move {
        write_logged(ledger.as_ref(), &held, s, &request_id, BACKGROUND_ATTEMPTS).await
    });
}

/// [`settle`], timed; a failure is logged and counted.
async fn write_logged(
    ledger: &dyn Ledger,
    reservation: &Reservation,
    s: Settlement,
    request_id: &str,
    attempts: u32,
) {
    let started = Instant::now();
    let settled = settle(ledger, reservation, s, attempts).await;
    metrics::observe(
        &metrics::STORE_LATENCY,
        &["settle"],
        started.elapsed().as_secs_f64(),
    );
    if let Err(err) = settled {
        metrics::inc(&metrics::SETTLEMENT_FAILURES, &["store"], 1);
        tracing::error!(
            request_id = %request_id,
            reservation = %reservation.id,
            error = %err,
            "settlement failed; the sweeper settles the hold by the orphan policy after its lease"
        );
    }
}

/// Counts what a settled reservation kept and gave back.
pub(crate) fn record(reservation: &Reservation, s: Settlement) {
    let meta = &reservation.meta;
    match reservation.payment {
        Payment::Credits { .. } => {
            let labels = [
                reservation.plan.as_str(),
                meta.operation.as_str(),
                meta.model.as_str(),
            ];
            metrics::inc(&metrics::CREDITS_CHARGED, &labels, s.kept);
            if s.refunded > 0 {
                metrics::inc(&metrics::CREDITS_REFUNDED, &labels, s.refunded);
            }
        }
        Payment::Spend { .. } => {
            let usd = |micro: u64| micro as f64 / MICROS_PER_USD as f64;
            metrics::add(&metrics::PPU_SPEND_USD, &[meta.model.as_str()], usd(s.kept));
            if s.refunded > 0 {
                metrics::add(
                    &metrics::PPU_REFUNDED_USD,
                    &[meta.model.as_str()],
                    usd(s.refunded),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::ChargeMeta;
    use crate::money::MicroUsd;

    fn credits(quantity: u64, unit: u64) -> Reservation {
        Reservation {
            id: "ch_1".into(),
            account_id: "a".into(),
            plan: "pro".into(),
            payment: Payment::Credits {
                charged: quantity * unit,
                remaining: 10,
            },
            meta: ChargeMeta {
                quantity,
                unit_amount: unit,
                ..ChargeMeta::default()
            },
        }
    }

    #[test]
    fn success_keeps_everything() {
        let s = decide(
            &credits(4, 3),
            UpstreamOutcome::Succeeded {
                images_generated: None,
            },
        );
        assert_eq!(
            s,
            Settlement {
                refunded: 0,
                kept: 12
            }
        );
    }

    #[test]
    fn failure_refunds_everything() {
        let s = decide(&credits(4, 3), UpstreamOutcome::Failed);
        assert_eq!(
            s,
            Settlement {
                refunded: 12,
                kept: 0
            }
        );
    }

    #[test]
    fn partial_generation_refunds_the_missing_images() {
        let s = decide(
            &credits(4, 3),
            UpstreamOutcome::Succeeded {
                images_generated: Some(1),
            },
        );
        assert_eq!(
            s,
            Settlement {
                refunded: 9,
                kept: 3
            }
        );
        let s = decide(
            &credits(4, 3),
            UpstreamOutcome::Succeeded {
                images_generated: Some(9),
            },
        );
        assert_eq!(
            s,
            Settlement {
                refunded: 0,
                kept: 12
            }
        );
        let s = decide(
            &credits(4, 3),
            UpstreamOutcome::Succeeded {
                images_generated: Some(0),
            },
        );
        assert_eq!(
            s,
            Settlement {
                refunded: 12,
                kept: 0
            }
        );
    }

    #[test]
    fn spend_refunds_in_micro_dollars() {
        let r = Reservation {
            payment: Payment::Spend {
                charged: MicroUsd(648_000),
                spent: MicroUsd(648_000),
                limit: MicroUsd(50_000_000),
            },
            meta: ChargeMeta {
                quantity: 2,
                unit_amount: 324_000,
                ..ChargeMeta::default()
            },
            ..credits(2, 1)
        };
        let s = decide(
            &r,
            UpstreamOutcome::Succeeded {
                images_generated: Some(1),
            },
        );
        assert_eq!(
            s,
            Settlement {
                refunded: 324_000,
                kept: 324_000
            }
        );
    }
}
