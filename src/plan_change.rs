//! What a plan change does to credits: an upgrade mid-period adds the allowance difference to the
//! current period at once; a downgrade takes nothing back (keys beyond the new plan's slots stop
//! working by themselves). Called by the admin API and the Stripe webhooks.

use crate::entitlement;
use crate::ledger::{Account, Ledger, StoreError};
use crate::rules::{Catalog, CreditGrant};

pub async fn apply_upgrade_difference(
    ledger: &dyn Ledger,
    catalog: &Catalog,
    old: &Account,
    new: &Account,
    now_ms: i64,
) -> Result<(), StoreError> {
    if old.plan == new.plan {
        return Ok(());
    }
    let (Some(old_plan), Some(new_plan)) = (catalog.plan(&old.plan), catalog.plan(&new.plan))
    else {
        return Ok(());
    };
    if old_plan.grant != CreditGrant::Period || new_plan.grant != CreditGrant::Period {
        return Ok(());
    }
    let difference = new_plan.credits.saturating_sub(old_plan.credits);
    if difference == 0 {
        return Ok(());
    }
    let (Some(old_bucket), Some(new_bucket)) = (
        entitlement::credit_bucket(catalog, old, now_ms),
        entitlement::credit_bucket(catalog, new, now_ms),
    ) else {
        return Ok(());
    };
    if old_bucket.id == new_bucket.id {
        // Same period: top it up (created at the OLD allowance first if never touched, so the
        // result is old allowance − spent + difference = new allowance − spent).
        ledger
            .grant_credits(&new.id, &old_bucket, difference)
            .await?;
    }
    Ok(())
}
