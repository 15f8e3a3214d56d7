//! How ledger values are stored: the account hash's fields (all, or those a change names), key records as JSON, and the
//! fields of a pay-per-use reservation record (names from [`schema`](crate::ledger::schema)).

use std::collections::HashMap;

use super::corrupt;
use crate::ledger::schema::{self, account_field as af, rsv_field as rf};
use crate::ledger::{
    Account, AccountChange, ChargeMeta, KeyRecord, StoreResult, SubscriptionStatus,
};

pub(super) fn account_fields(a: &Account) -> Vec<(&'static str, String)> {
    vec![
        (af::ID, a.id.clone()),
        (af::PLAN, a.plan.clone()),
        (af::STATUS, a.status.as_str().to_string()),
        (af::PERIOD_ANCHOR_MS, a.period_anchor_ms.to_string()),
        (
            af::PAY_PER_USE,
            if a.pay_per_use { "1" } else { "0" }.to_string(),
        ),
        (af::SPENDING_LIMIT_CENTS, a.spending_limit_cents.to_string()),
        (
            af::STRIPE_CUSTOMER_ID,
            a.stripe_customer_id.clone().unwrap_or_default(),
        ),
        (af::CREATED_MS, a.created_ms.to_string()),
    ]
}

/// The hash fields a change writes (only those it names), encoded as [`account_fields`] does.
pub(super) fn change_fields(c: &AccountChange) -> Vec<(&'static str, String)> {
    let mut fields = Vec::new();
    if let Some(plan) = &c.plan {
        fields.push((af::PLAN, plan.clone()));
    }
    if let Some(status) = c.status {
        fields.push((af::STATUS, status.as_str().to_string()));
    }
    if let Some(anchor) = c.period_anchor_ms {
        fields.push((af::PERIOD_ANCHOR_MS, anchor.to_string()));
    }
    if let Some(ppu) = c.pay_per_use {
        fields.push((af::PAY_PER_USE, if ppu { "1" } else { "0" }.to_string()));
    }
    if let Some(limit) = c.spending_limit_cents {
        fields.push((af::SPENDING_LIMIT_CENTS, limit.to_string()));
    }
    if let Some(customer) = &c.stripe_customer_id {
        fields.push((af::STRIPE_CUSTOMER_ID, customer.clone()));
    }
    fields
}

pub(super) fn parse_account(key: &str, mut h: HashMap<String, String>) -> StoreResult<Account> {
    let mut take = |name: &str| {
        h.remove(name)
            .ok_or_else(|| corrupt(key, format!("missing field {name}")))
    };
    let id = take(af::ID)?;
    let plan = take(af::PLAN)?;
    let status_text = take(af::STATUS)?;
    let status = SubscriptionStatus::parse(&status_text)
        .ok_or_else(|| corrupt(key, format!("status {status_text:?}")))?;
    let period_anchor_ms = take(af::PERIOD_ANCHOR_MS)?
        .parse()
        .map_err(|e| corrupt(key, format!("{}: {e}", af::PERIOD_ANCHOR_MS)))?;
    let pay_per_use = take(af::PAY_PER_USE)? == "1";
    let spending_limit_cents = take(af::SPENDING_LIMIT_CENTS)?
        .parse()
        .map_err(|e| corrupt(key, format!("{}: {e}", af::SPENDING_LIMIT_CENTS)))?;
    let stripe = take(af::STRIPE_CUSTOMER_ID)?;
    let created_ms = take(af::CREATED_MS)?
        .parse()
        .map_err(|e| corrupt(key, format!("{}: {e}", af::CREATED_MS)))?;
    Ok(Account {
        id,
        plan,
        status,
        period_anchor_ms,
        pay_per_use,
        spending_limit_cents,
        stripe_customer_id: (!stripe.is_empty()).then_some(stripe),
        created_ms,
    })
}

pub(super) fn parse_key(key: &str, json: &str) -> StoreResult<KeyRecord> {
    serde_json::from_str(json).map_err(|e| corrupt(key, e))
}

pub(super) fn to_json(key: &KeyRecord) -> StoreResult<String> {
    serde_json::to_string(key).map_err(|e| corrupt(&schema::key_id(&key.id), e))
}

/// The fields of a pay-per-use reservation record: what settlement reads plus what was priced
/// and reported (kept for an operator tracing a Stripe charge back to its request).
pub(super) fn spend_record_fields(
    account_id: &str,
    bucket: &str,
    amount: u64,
    meta: &ChargeMeta,
) -> Vec<(&'static str, String)> {
    vec![
        (rf::KIND, schema::KIND_SPEND.to_string()),
        (rf::ACCOUNT, account_id.to_string()),
        (rf::BUCKET, bucket.to_string()),
        (rf::AMOUNT, amount.to_string()),
        (rf::OPERATION, meta.operation.clone()),
        (rf::MODEL, meta.model.clone()),
        (rf::QUANTITY, meta.quantity.to_string()),
        (rf::UNIT_AMOUNT, meta.unit_amount.to_string()),
        (rf::CATALOG_VERSION, meta.catalog_version.to_string()),
        (rf::CREATED_MS, meta.created_ms.to_string()),
    ]
}
