//! Reserves the price of a priced request (CONTRACT §4) with whoever pays for it: the legs of
//! [`crate::payer::PaymentPlan`] in order (credits first when the plan prices the operation and
//! the period's balance covers it, else pay-per-use spend under the monthly limit when the
//! account has it enabled and the model has a rate), else its 402. One store round trip on
//! success. `quote_api` asks the same plan without reserving.

use crate::apikey::random_id;
use crate::error::GatewayError;
use crate::ledger::{
    Account, ChargeMeta, CreditReservation, CreditReserveOutcome, Ledger, SpendReservation,
    SpendReserveOutcome, StripeReport,
};
use crate::money::MicroUsd;
use crate::payer::{CreditLeg, Leg, PaymentPlan, SpendLeg};
use crate::rules::{Catalog, Quote};

/// How a reservation was paid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payment {
    Credits {
        /// Credits reserved (unit × quantity).
        charged: u64,
        /// Left in the bucket after the reservation.
        remaining: u64,
    },
    Spend {
        charged: MicroUsd,
        /// The month's spend after the reservation.
        spent: MicroUsd,
        limit: MicroUsd,
    },
}

/// A reservation held for one request until it is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// Also the Stripe meter event identifier.
    pub id: String,
    pub account_id: String,
    pub plan: String,
    pub payment: Payment,
    pub meta: ChargeMeta,
}

impl Reservation {
    /// What giving back `units_not_delivered` units is worth, in the payment's own unit.
    pub fn refund_for(&self, units_not_delivered: u64) -> u64 {
        let units = units_not_delivered.min(self.meta.quantity);
        let total = match self.payment {
            Payment::Credits { charged, .. } => charged,
            Payment::Spend { charged, .. } => charged.0,
        };
        self.meta.unit_amount.saturating_mul(units).min(total)
    }
}

/// Options of one reservation that come from settings, not from the request.
pub struct ReserveSettings {
    pub credit_record_ttl_ms: i64,
    pub spend_record_ttl_ms: i64,
    pub report_to_stripe: bool,
    /// How long the hold is leased to this request ([`crate::config::Config::lease_ms`]).
    pub lease_ms: i64,
}

/// Reserves the price with the first leg of [`PaymentPlan::for_request`] that covers it (the
/// ledger applies [`crate::payer::Leg::covers`] atomically); refused with
/// [`PaymentPlan::refusal`] when none does.
pub async fn reserve(
    ledger: &dyn Ledger,
    catalog: &Catalog,
    account: &Account,
    quote: &Quote,
    now_ms: i64,
    settings: &ReserveSettings,
) -> Result<Reservation, GatewayError> {
    let plan = PaymentPlan::for_request(catalog, account, quote, now_ms);
    for leg in &plan.legs {
        // One id per attempt: a refused attempt leaves a void record (and its undo counter)
        // under its id, which the next leg must not share, or the next leg's undo is counted
        // as a repeat and reverted (the spend of a refused request would stay counted).
        let id = random_id("ch_", 24);
        let meta = ChargeMeta {
            operation: quote.operation.to_string(),
            model: quote.model.to_string(),
            quantity: quote.quantity,
            unit_amount: 0,
            catalog_version: catalog.version,
            created_ms: now_ms,
        };
        let reserved = match leg {
            Leg::Credits(c) => {
                reserve_credits(ledger, account, &id, c, meta, now_ms, settings).await?
            }
            Leg::Spend(s) => reserve_spend(ledger, account, &id, s, meta, now_ms, settings).await?,
        };
        if let Some(payment) = reserved {
            return Ok(payment);
        }
    }
    Err(plan.refusal())
}

/// The credit leg: `None` when the balance does not cover it.
async fn reserve_credits(
    ledger: &dyn Ledger,
    account: &Account,
    id: &str,
    leg: &CreditLeg,
    mut meta: ChargeMeta,
    now_ms: i64,
    settings: &ReserveSettings,
) -> Result<Option<Reservation>, GatewayError> {
    meta.unit_amount = leg.unit;
    let r = CreditReservation {
        account_id: account.id.clone(),
        reservation_id: id.to_string(),
        bucket: leg.bucket.clone(),
        amount: leg.total,
        meta: meta.clone(),
        record_ttl_ms: settings.credit_record_ttl_ms,
        lease_until_ms: now_ms.saturating_add(settings.lease_ms),
    };
    Ok(match ledger.reserve_credits(&r).await? {
        CreditReserveOutcome::Reserved { remaining } => Some(Reservation {
            id: id.to_string(),
            account_id: account.id.clone(),
            plan: account.plan.clone(),
            payment: Payment::Credits {
                charged: leg.total,
                remaining,
            },
            meta,
        }),
        _ => None,
    })
}

/// The pay-per-use leg: `None` when it would pass the month's spending limit.
async fn reserve_spend(
    ledger: &dyn Ledger,
    account: &Account,
    id: &str,
    leg: &SpendLeg,
    mut meta: ChargeMeta,
    now_ms: i64,
    settings: &ReserveSettings,
) -> Result<Option<Reservation>, GatewayError> {
    meta.unit_amount = leg.rate.0;
    let report = match (&account.stripe_customer_id, settings.report_to_stripe) {
        (Some(customer), true) => Some(StripeReport {
            customer_id: customer.clone(),
            value: leg.total.0,
        }),
        _ => None,
    };
    let r = SpendReservation {
        account_id: account.id.clone(),
        reservation_id: id.to_string(),
        month: leg.month.clone(),
        limit_micro: leg.limit.0,
        amount_micro: leg.total.0,
        meta: meta.clone(),
        report,
        record_ttl_ms: settings.spend_record_ttl_ms,
        lease_until_ms: now_ms.saturating_add(settings.lease_ms),
    };
    Ok(match ledger.reserve_spend(&r).await? {
        SpendReserveOutcome::Reserved { spent_micro } => Some(Reservation {
            id: id.to_string(),
            account_id: account.id.clone(),
            plan: account.plan.clone(),
            payment: Payment::Spend {
                charged: leg.total,
                spent: MicroUsd(spent_micro),
                limit: leg.limit,
            },
            meta,
        }),
        SpendReserveOutcome::LimitReached { .. } => None,
    })
}
