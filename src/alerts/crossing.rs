//! Whether one reservation crossed a low-balance threshold, decided from the reservation's own
//! answer (the balance or spend after it, and its amount) without reading anything. Pure; called
//! by [`super::notice`] on the request path after every successful reservation.
//!
//! - credits left, threshold `p` % of the allowance `A`: crossed when the balance before was
//!   above `p·A/100` and the balance after is at or below it (`p = 0`: the balance reached 0);
//! - spend, threshold `p` % of the limit `L`: crossed when the spend before was below `p·L/100`
//!   and the spend after is at or above it (`p = 100`: the limit is reached).
//!
//! Balances only fall by reservations, so in one period exactly one reservation crosses each
//! threshold unless a refund lifts the balance back over it; the outbox's claim keeps that
//! repeat from sending a second alert.

use crate::reserve::{Payment, Reservation};
use crate::rules::thresholds::{Percents, ThresholdKind};

/// One threshold one reservation crossed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    pub kind: ThresholdKind,
    pub threshold: u8,
    /// Credits left after the reservation, or the month's spend (µ$) after it.
    pub value: u64,
    /// The allowance (credits) or the spending limit (µ$) the percentage is of.
    pub base: u64,
}

/// `value·100 <= base·p`: at or below `p` % of `base` (exact integer arithmetic).
fn at_or_below(value: u64, base: u64, p: u8) -> bool {
    u128::from(value) * 100 <= u128::from(base) * u128::from(p)
}

/// `value·100 >= base·p`: at or above `p` % of `base`.
fn at_or_above(value: u64, base: u64, p: u8) -> bool {
    u128::from(value) * 100 >= u128::from(base) * u128::from(p)
}

/// The credit-left thresholds crossed going from `before` to `after` credits.
pub fn credits_left(set: Percents, allowance: u64, before: u64, after: u64) -> Vec<u8> {
    set.iter()
        .filter(|&p| !at_or_below(before, allowance, p) && at_or_below(after, allowance, p))
        .collect()
}

/// The spend thresholds crossed going from `before` to `after` µ$ of spend.
pub fn spend(set: Percents, limit: u64, before: u64, after: u64) -> Vec<u8> {
    set.iter()
        .filter(|&p| !at_or_above(before, limit, p) && at_or_above(after, limit, p))
        .collect()
}

/// Every threshold `reservation` crossed, given the thresholds that apply to its payer and the
/// credit allowance of its bucket.
pub fn crossings(
    reservation: &Reservation,
    credits_set: Percents,
    spend_set: Percents,
    allowance: u64,
) -> Vec<Crossing> {
    match reservation.payment {
        Payment::Credits { charged, remaining } => credits_left(
            credits_set,
            allowance,
            remaining.saturating_add(charged),
            remaining,
        )
        .into_iter()
        .map(|threshold| Crossing {
            kind: ThresholdKind::CreditsLeft,
            threshold,
            value: remaining,
            base: allowance,
        })
        .collect(),
        Payment::Spend {
            charged,
            spent,
            limit,
        } => spend(
            spend_set,
            limit.0,
            spent.0.saturating_sub(charged.0),
            spent.0,
        )
        .into_iter()
        .map(|threshold| Crossing {
            kind: ThresholdKind::Spend,
            threshold,
            value: spent.0,
            base: limit.0,
        })
        .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(kind: ThresholdKind, v: &[i64]) -> Percents {
        Percents::parse(kind, v).expect("valid")
    }

    #[test]
    fn credits_cross_once_going_down() {
        let s = set(ThresholdKind::CreditsLeft, &[20, 0]);
        // allowance 100: 20 % is 20 credits left.
        assert_eq!(credits_left(s, 100, 22, 21), Vec::<u8>::new());
        assert_eq!(credits_left(s, 100, 21, 20), vec![20]);
        assert_eq!(credits_left(s, 100, 20, 19), Vec::<u8>::new());
        assert_eq!(credits_left(s, 100, 1, 0), vec![0]);
        // One big reservation crosses both.
        assert_eq!(credits_left(s, 100, 50, 0), vec![0, 20]);
        // Already below before (a grant lifted nothing): no crossing.
        assert_eq!(credits_left(s, 100, 0, 0), Vec::<u8>::new());
        // Every sequence of single-credit steps from the allowance to 0 crosses each once.
        let total: usize = (1..=100u64)
            .map(|b| credits_left(s, 100, b, b - 1).len())
            .sum();
        assert_eq!(total, 2);
    }

    #[test]
    fn percentages_are_exact() {
        let s = set(ThresholdKind::CreditsLeft, &[20]);
        // allowance 7: 20 % is 1.4 credits: 1 left is at or below, 2 is not.
        assert_eq!(credits_left(s, 7, 2, 1), vec![20]);
        let sp = set(ThresholdKind::Spend, &[80, 100]);
        // limit 1000 µ$: 80 % is 800.
        assert_eq!(spend(sp, 1000, 799, 800), vec![80]);
        assert_eq!(spend(sp, 1000, 800, 999), Vec::<u8>::new());
        assert_eq!(spend(sp, 1000, 999, 1000), vec![100]);
        assert_eq!(spend(sp, 1000, 0, 1000), vec![80, 100]);
        // A zero limit is never crossed.
        assert_eq!(spend(sp, 0, 0, 0), Vec::<u8>::new());
    }
}
