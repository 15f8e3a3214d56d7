//! What a plan change does to credits: an upgrade mid-period adds the allowance difference to the
//! current period at once; a downgrade takes nothing back (keys beyond the new plan's slots stop
//! working by themselves). Called by the admin API and the Stripe webhooks, which write the
//! top-up and the new plan in one guarded step ([`Ledger::change_account_if`]): decided on the
//! account as read, applied only if it is still that account, else read again and decided again
//! (at most [`MAX_ATTEMPTS`] times, with [`retry_pause`] between), so two concurrent upgrades
//! never both add a difference.
//!
//! [`Ledger::change_account_if`]: crate::ledger::Ledger::change_account_if

use std::time::Duration;

use crate::entitlement;
use crate::ledger::{Account, CreditChange, StoreError};
use crate::rules::{Catalog, CreditGrant};

/// Attempts of one guarded account change before the caller gives up (503).
pub const MAX_ATTEMPTS: u32 = 50;

/// The pause before attempt `attempt + 1` of a guarded change that met a concurrent writer:
/// short and jittered, so writers that collided do not collide again in lockstep.
pub async fn retry_pause(attempt: u32) {
    let ceiling = 1u64 << attempt.min(5);
    let ms = rand::random_range(0..=ceiling);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// The error of a guarded change that kept meeting concurrent writers.
pub fn too_contended(account_id: &str) -> StoreError {
    StoreError::Unavailable(format!(
        "account {account_id} kept changing during {MAX_ATTEMPTS} attempts"
    ))
}

/// The credit write an upgrade from `old` to `new` needs now: the allowance difference into the
/// current bucket when both plans grant per period and the bucket stays the same. The bucket is
/// created at the OLD allowance first if never touched, so the result is old allowance − spent
/// + difference = new allowance − spent.
pub fn upgrade_difference(
    catalog: &Catalog,
    old: &Account,
    new: &Account,
    now_ms: i64,
) -> Option<CreditChange> {
    if old.plan == new.plan {
        return None;
    }
    let (old_plan, new_plan) = (catalog.plan(&old.plan)?, catalog.plan(&new.plan)?);
    if old_plan.grant != CreditGrant::Period || new_plan.grant != CreditGrant::Period {
        return None;
    }
    let difference = new_plan.credits.saturating_sub(old_plan.credits);
    if difference == 0 {
        return None;
    }
    let old_bucket = entitlement::credit_bucket(catalog, old, now_ms)?;
    let new_bucket = entitlement::credit_bucket(catalog, new, now_ms)?;
    (old_bucket.id == new_bucket.id).then_some(CreditChange::Grant {
        bucket: old_bucket,
        amount: difference,
    })
}
