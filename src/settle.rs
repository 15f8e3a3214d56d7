//! Settlement, called from `logging` once the exchange is over: an upstream 2xx keeps the charge
//! (less the images an `X-Images-Generated` header says were not made); anything else — 4xx, 5xx,
//! connect failure, timeout, no upstream answer — refunds it. A reservation settles exactly once
//! (the ledger guards it); a full 2xx on credits needs no store call at all.

use std::time::Duration;

use crate::ledger::{Ledger, SettleOutcome, StoreError};
use crate::reserve::{Payment, Reservation};

/// How the upstream exchange ended, as far as billing cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamOutcome {
    /// The upstream answered 2xx; `images_generated` from its header, if any.
    Succeeded { images_generated: Option<u64> },
    /// The upstream answered non-2xx, or never answered.
    Failed,
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

/// Applies the settlement. Store errors are retried a few times with backoff; the caller logs
/// what still failed (the reservation then stands as a charge: the gateway never refunds twice).
pub async fn settle(
    ledger: &dyn Ledger,
    reservation: &Reservation,
    settlement: Settlement,
) -> Result<SettleOutcome, StoreError> {
    // A fully kept credit charge needs no bookkeeping: the reservation record expires by itself.
    // Pay-per-use charges are marked settled so the Stripe worker reports them at once.
    if settlement.refunded == 0 && matches!(reservation.payment, Payment::Credits { .. }) {
        return Ok(SettleOutcome::Settled);
    }
    let mut delay = Duration::from_millis(20);
    let mut attempt = 0;
    loop {
        match ledger
            .settle(
                &reservation.account_id,
                &reservation.id,
                settlement.refunded,
            )
            .await
        {
            Ok(outcome) => return Ok(outcome),
            Err(e) if attempt >= 4 => return Err(e),
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(delay).await;
                delay *= 2;
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
