//! What an account is entitled to under the live catalog: its credit bucket for "now" (the
//! current billing period's balance, or the free plan's one-off signup grant), its API key
//! slots, and whether credits may be spent. Pure: catalog + account + clock in, answers out.

use crate::ledger::{Account, CreditBucket};
use crate::period;
use crate::rules::{Catalog, CreditGrant};

/// Id of the free plan's one-off bucket.
pub const SIGNUP_BUCKET: &str = "signup";
/// A period's balance is kept this long after the period ends (for late refunds and audits).
pub const PERIOD_GRACE_MS: i64 = 7 * 24 * 3600 * 1000;

/// The bucket credits are spent from at `now_ms`; `None` when the plan grants no credits
/// (pay-per-use only, or a plan the catalog no longer knows).
pub fn credit_bucket(catalog: &Catalog, account: &Account, now_ms: i64) -> Option<CreditBucket> {
    let plan = catalog.plan(&account.plan)?;
    match plan.grant {
        CreditGrant::Once => Some(CreditBucket {
            id: SIGNUP_BUCKET.to_string(),
            allowance: plan.credits,
            expires_at_ms: None,
        }),
        CreditGrant::Period => {
            let p = period::current_period(account.period_anchor_ms, now_ms)?;
            Some(CreditBucket {
                id: p.id(),
                allowance: plan.credits,
                expires_at_ms: Some(p.end_ms.saturating_add(PERIOD_GRACE_MS)),
            })
        }
    }
}

/// The end of the current billing period (UTC ms), if the account has periods.
pub fn current_period_end(catalog: &Catalog, account: &Account, now_ms: i64) -> Option<i64> {
    match catalog.plan(&account.plan).map(|p| p.grant) {
        Some(CreditGrant::Once) => None,
        _ => period::current_period(account.period_anchor_ms, now_ms).map(|p| p.end_ms),
    }
}

/// How many API keys the account may use (0 for a plan the catalog no longer knows).
pub fn key_slots(catalog: &Catalog, account: &Account) -> u64 {
    catalog.api_keys_for(&account.plan).map_or(0, u64::from)
}

/// Requests per minute allowed per key (0: no limit applies).
pub fn requests_per_minute(catalog: &Catalog, account: &Account) -> u32 {
    catalog.requests_per_minute_for(&account.plan).unwrap_or(0)
}

/// Whether `plan` names something the catalog knows (a plan id or `pay_per_use`).
pub fn is_known_plan(catalog: &Catalog, plan: &str) -> bool {
    catalog.api_keys_for(plan).is_some()
}
