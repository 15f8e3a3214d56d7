//! Who would pay for a priced request (CONTRACT §4), as one pure decision: the ordered ways the
//! account could pay ([`PaymentPlan::legs`]: credits first when the plan prices the operation and
//! the subscription may spend them, then pay-per-use when enabled and the model has a rate),
//! whether a leg covers the price given its current standing, and what the request is refused
//! with when no leg covers it. `reserve::reserve` walks the legs with atomic reservations;
//! `quote_api` walks the same legs with plain reads. Neither writes here, so the two cannot drift.

use crate::entitlement;
use crate::error::GatewayError;
use crate::ledger::{Account, CreditBucket};
use crate::money::MicroUsd;
use crate::period;
use crate::rules::{Catalog, Quote};

/// Who pays (or would pay) for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payer {
    Credits,
    PayPerUse,
    /// Nothing could pay: the plan does not price it with usable credits and pay-per-use is off
    /// or has no rate for the model.
    None,
}

impl Payer {
    pub fn as_str(self) -> &'static str {
        match self {
            Payer::Credits => "credits",
            Payer::PayPerUse => "pay_per_use",
            Payer::None => "none",
        }
    }
}

/// Paying with the current credit bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditLeg {
    pub bucket: CreditBucket,
    /// Credits per unit.
    pub unit: u64,
    /// Credits for the whole request.
    pub total: u64,
}

/// Paying with this month's pay-per-use spend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendLeg {
    /// The calendar month (UTC) the spend counts against.
    pub month: String,
    pub rate: MicroUsd,
    pub total: MicroUsd,
    pub limit: MicroUsd,
}

/// One way of paying, in the order they are tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leg {
    Credits(CreditLeg),
    Spend(SpendLeg),
}

impl Leg {
    pub fn payer(&self) -> Payer {
        match self {
            Leg::Credits(_) => Payer::Credits,
            Leg::Spend(_) => Payer::PayPerUse,
        }
    }

    /// Whether the leg covers the price given its standing now: the bucket's balance for
    /// credits, the month's spend so far (micro-dollars) for pay-per-use. The same predicate the
    /// ledger's reservations apply atomically (balance never negative, spend never past the
    /// limit).
    pub fn covers(&self, standing: u64) -> bool {
        match self {
            Leg::Credits(c) => standing >= c.total,
            Leg::Spend(s) => standing
                .checked_add(s.total.0)
                .is_some_and(|after| after <= s.limit.0),
        }
    }
}

/// The ways an account could pay for one quoted request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentPlan {
    /// Tried in order; the first that covers the price pays.
    pub legs: Vec<Leg>,
    /// The plan prices the request in credits but the subscription's status (named here) may
    /// not spend them.
    pub credits_inactive: Option<&'static str>,
}

impl PaymentPlan {
    /// Decides the legs from the catalog, the account and the clock; reads no balance.
    pub fn for_request(catalog: &Catalog, account: &Account, quote: &Quote, now_ms: i64) -> Self {
        let mut legs = Vec::with_capacity(2);
        let mut credits_inactive = None;
        if let (Some(unit), Some(total), Some(bucket)) = (
            quote.credits_per_unit,
            quote.credits_total(),
            entitlement::credit_bucket(catalog, account, now_ms),
        ) {
            if account.status.may_spend_credits() {
                legs.push(Leg::Credits(CreditLeg {
                    bucket,
                    unit,
                    total,
                }));
            } else {
                credits_inactive = Some(account.status.as_str());
            }
        }
        if account.pay_per_use {
            if let (Some(rate), Some(total)) = (quote.rate_per_unit, quote.usd_total()) {
                legs.push(Leg::Spend(SpendLeg {
                    month: period::month_key(now_ms),
                    rate,
                    total,
                    limit: MicroUsd::from_cents(account.spending_limit_cents),
                }));
            }
        }
        PaymentPlan {
            legs,
            credits_inactive,
        }
    }

    /// Who the request answers to when no leg covers it: the last leg tried (its 402), or
    /// [`Payer::None`] when there is no leg at all.
    pub fn payer_when_refused(&self) -> Payer {
        self.legs.last().map_or(Payer::None, Leg::payer)
    }

    /// What the request is refused with when no leg covers it.
    pub fn refusal(&self) -> GatewayError {
        match self.legs.last() {
            Some(Leg::Spend(_)) => GatewayError::SpendingLimitReached,
            _ => match self.credits_inactive {
                Some(status) => GatewayError::SubscriptionInactive(status),
                None => GatewayError::InsufficientCredits,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::ledger::SubscriptionStatus;
    use crate::rules::Unit;

    const NOW_MS: i64 = 1_780_000_000_000;

    fn catalog() -> Catalog {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("lua-free-rules");
        crate::rules::load_dir(&dir).expect("shipped rules load")
    }

    fn account(plan: &str, pay_per_use: bool, status: SubscriptionStatus) -> Account {
        Account {
            id: "a".to_string(),
            plan: plan.to_string(),
            status,
            period_anchor_ms: NOW_MS + 86_400_000,
            pay_per_use,
            spending_limit_cents: 10,
            stripe_customer_id: None,
            created_ms: NOW_MS,
        }
    }

    fn quote(credits: Option<u64>, rate: Option<u64>, quantity: u64) -> Quote {
        Quote {
            operation: "relight".into(),
            model: "m".into(),
            quantity,
            unit: Unit::Image,
            credits_per_unit: credits,
            rate_per_unit: rate.map(MicroUsd),
            catalog_version: 1,
        }
    }

    fn payers(plan: &PaymentPlan) -> Vec<Payer> {
        plan.legs.iter().map(Leg::payer).collect()
    }

    #[test]
    fn credits_are_asked_before_pay_per_use() {
        let c = catalog();
        let active = SubscriptionStatus::Active;
        let q = quote(Some(3), Some(121_000), 2);
        let both = PaymentPlan::for_request(&c, &account("pro", true, active), &q, NOW_MS);
        assert_eq!(payers(&both), [Payer::Credits, Payer::PayPerUse]);
        assert_eq!(both.payer_when_refused(), Payer::PayPerUse);
        assert_eq!(both.refusal().code(), "spending_limit_reached");
        let credits = PaymentPlan::for_request(&c, &account("pro", false, active), &q, NOW_MS);
        assert_eq!(payers(&credits), [Payer::Credits]);
        assert_eq!(credits.payer_when_refused(), Payer::Credits);
        assert_eq!(credits.refusal().code(), "insufficient_credits");
        let ppu = PaymentPlan::for_request(&c, &account("pay_per_use", true, active), &q, NOW_MS);
        assert_eq!(payers(&ppu), [Payer::PayPerUse]);
        match &ppu.legs[0] {
            Leg::Spend(s) => {
                assert_eq!(s.total, MicroUsd(242_000));
                assert_eq!(s.limit, MicroUsd::from_cents(10));
                assert_eq!(s.month, period::month_key(NOW_MS));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nothing_pays_without_a_price_or_with_an_inactive_subscription() {
        let c = catalog();
        let no_credit_price = quote(None, Some(324_000), 1);
        let starter = account("starter", false, SubscriptionStatus::Active);
        let plan = PaymentPlan::for_request(&c, &starter, &no_credit_price, NOW_MS);
        assert!(plan.legs.is_empty());
        assert_eq!(plan.payer_when_refused(), Payer::None);
        assert_eq!(plan.refusal().code(), "insufficient_credits");
        let lapsed = account("starter", false, SubscriptionStatus::PastDue);
        let plan = PaymentPlan::for_request(&c, &lapsed, &quote(Some(1), None, 1), NOW_MS);
        assert!(plan.legs.is_empty());
        assert_eq!(plan.payer_when_refused(), Payer::None);
        assert_eq!(plan.refusal().code(), "subscription_inactive");
        // An inactive subscription with pay-per-use on is refused by the spending limit.
        let lapsed_ppu = account("starter", true, SubscriptionStatus::PastDue);
        let plan = PaymentPlan::for_request(&c, &lapsed_ppu, &quote(Some(1), Some(1), 1), NOW_MS);
        assert_eq!(payers(&plan), [Payer::PayPerUse]);
        assert_eq!(plan.refusal().code(), "spending_limit_reached");
        // Video has no rate: pay-per-use is no leg for it.
        let ppu_only = account("pay_per_use", true, SubscriptionStatus::Active);
        let plan = PaymentPlan::for_request(&c, &ppu_only, &quote(Some(10), None, 1), NOW_MS);
        assert!(plan.legs.is_empty());
    }

    #[test]
    fn covers_is_the_ledgers_predicate_at_the_boundary() {
        let c = catalog();
        let q = quote(Some(3), Some(54_000), 2);
        let plan = PaymentPlan::for_request(
            &c,
            &account("starter", true, SubscriptionStatus::Active),
            &q,
            NOW_MS,
        );
        let (credits, spend) = (&plan.legs[0], &plan.legs[1]);
        assert!(credits.covers(6));
        assert!(!credits.covers(5));
        // Limit 10 cents = 100_000 µ$; the request is 108_000 µ$.
        assert!(!spend.covers(0));
        let q = quote(None, Some(50_000), 2);
        let plan = PaymentPlan::for_request(
            &c,
            &account("pay_per_use", true, SubscriptionStatus::Active),
            &q,
            NOW_MS,
        );
        assert!(plan.legs[0].covers(0), "exactly the limit is within it");
        assert!(!plan.legs[0].covers(1));
        assert!(!plan.legs[0].covers(u64::MAX));
    }
}
