//! Who pays for a priced request (CONTRACT §4): credits first when the plan prices the operation
//! and the period's balance covers it, else pay-per-use spend under the monthly limit when the
//! account has it enabled and the model has a rate, else a 402. One store round trip on success.

use crate::apikey::random_id;
use crate::entitlement;
use crate::error::GatewayError;
use crate::ledger::{
    Account, ChargeMeta, CreditReservation, CreditReserveOutcome, Ledger, SpendReservation,
    SpendReserveOutcome, StripeReport,
};
use crate::money::MicroUsd;
use crate::period;
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

pub async fn reserve(
    ledger: &dyn Ledger,
    catalog: &Catalog,
    account: &Account,
    quote: &Quote,
    now_ms: i64,
    settings: &ReserveSettings,
) -> Result<Reservation, GatewayError> {
    let id = random_id("ch_", 24);
    let mut meta = ChargeMeta {
        operation: quote.operation.to_string(),
        model: quote.model.to_string(),
        quantity: quote.quantity,
        unit_amount: 0,
        catalog_version: catalog.version,
        created_ms: now_ms,
    };
    let mut inactive = false;

    if let (Some(unit), Some(total), Some(bucket)) = (
        quote.credits_per_unit,
        quote.credits_total(),
        entitlement::credit_bucket(catalog, account, now_ms),
    ) {
        if account.status.may_spend_credits() {
            meta.unit_amount = unit;
            let r = CreditReservation {
                account_id: account.id.clone(),
                reservation_id: id.clone(),
                bucket,
                amount: total,
                meta: meta.clone(),
                record_ttl_ms: settings.credit_record_ttl_ms,
                lease_until_ms: now_ms.saturating_add(settings.lease_ms),
            };
            if let CreditReserveOutcome::Reserved { remaining } = ledger.reserve_credits(&r).await?
            {
                return Ok(Reservation {
                    id,
                    account_id: account.id.clone(),
                    plan: account.plan.clone(),
                    payment: Payment::Credits {
                        charged: total,
                        remaining,
                    },
                    meta,
                });
            }
        } else {
            inactive = true;
        }
    }

    if account.pay_per_use {
        if let (Some(rate), Some(total)) = (quote.rate_per_unit, quote.usd_total()) {
            meta.unit_amount = rate.0;
            let limit = MicroUsd::from_cents(account.spending_limit_cents);
            let report = match (&account.stripe_customer_id, settings.report_to_stripe) {
                (Some(customer), true) => Some(StripeReport {
                    customer_id: customer.clone(),
                    value: total.0,
                }),
                _ => None,
            };
            let r = SpendReservation {
                account_id: account.id.clone(),
                reservation_id: id.clone(),
                month: period::month_key(now_ms),
                limit_micro: limit.0,
                amount_micro: total.0,
                meta: meta.clone(),
                report,
                record_ttl_ms: settings.spend_record_ttl_ms,
                lease_until_ms: now_ms.saturating_add(settings.lease_ms),
            };
            return match ledger.reserve_spend(&r).await? {
                SpendReserveOutcome::Reserved { spent_micro } => Ok(Reservation {
                    id,
                    account_id: account.id.clone(),
                    plan: account.plan.clone(),
                    payment: Payment::Spend {
                        charged: total,
                        spent: MicroUsd(spent_micro),
                        limit,
                    },
                    meta,
                }),
                SpendReserveOutcome::LimitReached { .. } => Err(GatewayError::SpendingLimitReached),
            };
        }
    }

    if inactive {
        return Err(GatewayError::SubscriptionInactive(account.status.as_str()));
    }
    Err(GatewayError::InsufficientCredits)
}
