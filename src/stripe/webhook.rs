//! `POST /webhooks/stripe`: decides which Stripe events change an account, how, and that each
//! event changes it once.
//!
//! 1. `Stripe-Signature` must verify against the secret in the environment variable
//!    `stripe.webhook_secret_env` within 5 minutes of the gateway clock ([`signature`]); else
//!    400 `invalid_request`, nothing read further.
//! 2. The account is the one whose `stripeCustomerId` is the object's `customer`
//!    ([`Ledger::account_by_stripe_customer`]). Events for unknown customers, of other types, or
//!    that change nothing answer 200 and apply nothing.
//! 3. The event id is claimed in the store ([`Ledger::begin_stripe_event`], 60 s lease): a
//!    re-send of an applied event answers 200 without applying; one that arrives while the first
//!    is being applied answers 409 (Stripe retries). A failure (store down: 503) lets the lease
//!    lapse so Stripe's retry applies it; success marks it applied for 30 days.
//!
//! Events:
//! - `customer.subscription.created|updated|deleted`: plan = the catalog plan of the first
//!   subscription item whose price id the catalog maps (`stripe_price_ids`; none → plan
//!   unchanged); status = Stripe's, mapped by the table below (`deleted` → `canceled`); period
//!   end = `current_period_end` of the plan's item (where the pinned 2026-09-30 API puts it),
//!   else of any item, else of the subscription itself (older API versions), as the account's
//!   period anchor. Credits (`carry_credits`: an upgrade mid-period adds the allowance
//!   difference, a period re-anchored by a few seconds or days keeps its balance) and those
//!   fields are written in one guarded step ([`Ledger::change_account_if`]; retried on a
//!   concurrent change), then the key cache cleared. Events are ordered per subscription by the
//!   event's `created`: one older than the last applied for its subscription is recorded
//!   (marked applied) and ignored, 200 with result `stale`, counted and logged; an equal
//!   `created` still applies.
//! - `invoice.paid` for a subscription period (`billing_reason` absent, `subscription_cycle`,
//!   `subscription_create` or `subscription`): the credit bucket of the period containing now is
//!   reset to the plan's allowance. Plan changes (`subscription_update`), manual and threshold
//!   invoices are not a new period and change nothing.
//!
//! Stripe's 8 subscription statuses in the contract's 5 (only `active` and `trialing` may spend
//! credits, so each mapped status gates requests exactly as its target does):
//!
//! | Stripe | account |
//! | --- | --- |
//! | `active`, `trialing`, `past_due`, `canceled`, `incomplete` | the same |
//! | `incomplete_expired` | `canceled` |
//! | `unpaid` | `past_due` |
//! | `paused` | `incomplete` |
//!
//! - `incomplete_expired`: the first invoice went unpaid for 23 hours and Stripe ended the
//!   subscription for good; nothing will be billed again.
//! - `unpaid`: payment retries are exhausted, but the subscription and its open invoices live
//!   on: money is owed and paying it reactivates, as with `past_due`.
//! - `paused`: a trial ended without a payment method; no invoice is owed and no payment
//!   failed, so not `past_due`. It waits, like `incomplete`, for the customer to finish
//!   setting up payment, and resumes when they do.
//!
//! Any other status, or none, is refused with 400 before the customer is looked up or the
//! event claimed: nothing changes, and Stripe's retries apply the event once the gateway knows
//! the status, rather than a guess now. (A deleted subscription is `canceled` whatever its
//! status says.)
//!
//! [`plan_change`]: crate::plan_change
//! [`Ledger::account_by_stripe_customer`]: crate::ledger::Ledger::account_by_stripe_customer
//! [`Ledger::begin_stripe_event`]: crate::ledger::Ledger::begin_stripe_event
//! [`Ledger::change_account_if`]: crate::ledger::Ledger::change_account_if

use serde_json::{json, Value};

use super::metrics;
use super::signature::{self, SignatureError};
use crate::entitlement;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::ledger::{
    Account, AccountChange, CreditChange, GuardedChange, StripeEventClaim, SubscriptionEvent,
    SubscriptionStatus,
};
use crate::plan_change;
use crate::respond::JsonReply;
use crate::rules::{Catalog, CreditGrant};

/// How long one delivery holds an event while applying it.
pub const EVENT_LEASE_MS: i64 = 60_000;
/// How long an applied event id is remembered (Stripe re-sends for up to 3 days).
pub const EVENT_KEEP_MS: i64 = 30 * 24 * 3600 * 1000;

/// The event types applied; everything else is acknowledged and ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    SubscriptionCreated,
    SubscriptionUpdated,
    SubscriptionDeleted,
    InvoicePaid,
}

impl Kind {
    fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "customer.subscription.created" => Self::SubscriptionCreated,
            "customer.subscription.updated" => Self::SubscriptionUpdated,
            "customer.subscription.deleted" => Self::SubscriptionDeleted,
            "invoice.paid" => Self::InvoicePaid,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::SubscriptionCreated => "customer.subscription.created",
            Self::SubscriptionUpdated => "customer.subscription.updated",
            Self::SubscriptionDeleted => "customer.subscription.deleted",
            Self::InvoicePaid => "invoice.paid",
        }
    }
}

/// What became of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Applied,
    Unchanged,
    Ignored(&'static str),
    Duplicate,
    /// A subscription event older than the last one applied for its subscription.
    Stale,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Unchanged => "unchanged",
            Self::Ignored(_) => "ignored",
            Self::Duplicate => "duplicate",
            Self::Stale => "stale",
        }
    }
}

/// Handles one delivery of `POST /webhooks/stripe` (the raw body, as signed).
pub async fn handle(
    gw: &Gateway,
    signature_header: Option<&str>,
    body: &[u8],
) -> Result<JsonReply, GatewayError> {
    let secret = std::env::var(&gw.config.stripe.webhook_secret_env).unwrap_or_default();
    let now_ms = gw.now_ms();
    if let Err(e) = signature::verify(&secret, signature_header, body, now_ms.div_euclid(1000)) {
        if e == SignatureError::NoSecret {
            tracing::error!(
                env = %gw.config.stripe.webhook_secret_env,
                "Stripe webhook refused: no signing secret in the environment"
            );
        }
        metrics::webhook("other", "bad_signature");
        return Err(GatewayError::InvalidRequest(format!(
            "Invalid Stripe-Signature: {e}."
        )));
    }
    let event: Value = serde_json::from_slice(body).map_err(|_| {
        GatewayError::InvalidRequest("The webhook body is not a JSON Stripe event.".into())
    })?;
    let (Some(id), Some(type_text)) = (
        event
            .get("id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty()),
        event.get("type").and_then(Value::as_str),
    ) else {
        return Err(GatewayError::InvalidRequest(
            "The webhook event has no id or type.".into(),
        ));
    };
    let Some(kind) = Kind::parse(type_text) else {
        metrics::webhook("other", "ignored");
        return Ok(reply(
            id,
            type_text,
            Outcome::Ignored("event type not used"),
        ));
    };
    let object = event
        .get("data")
        .and_then(|d| d.get("object"))
        .filter(|o| o.is_object())
        .ok_or_else(|| {
            GatewayError::InvalidRequest("The webhook event has no data.object.".into())
        })?;
    // A subscription's status is checked before anything is claimed or read.
    let status = match kind {
        Kind::InvoicePaid => None,
        _ => match subscription_status(object, kind == Kind::SubscriptionDeleted) {
            Ok(status) => Some(status),
            Err(e) => {
                metrics::webhook(kind.as_str(), "refused");
                return Err(e);
            }
        },
    };
    let created_s = event.get("created").and_then(Value::as_i64);
    let outcome = match apply(gw, id, kind, object, status, created_s).await {
        Ok(outcome) => outcome,
        Err(e) => {
            metrics::webhook(kind.as_str(), "failed");
            return Err(e);
        }
    };
    metrics::webhook(kind.as_str(), outcome.as_str());
    tracing::info!(event = %id, r#type = kind.as_str(), result = outcome.as_str(), "Stripe webhook");
    Ok(reply(id, type_text, outcome))
}

fn reply(id: &str, type_text: &str, outcome: Outcome) -> JsonReply {
    let mut body = json!({
        "received": true,
        "id": id,
        "type": type_text,
        "result": outcome.as_str(),
    });
    if let (Outcome::Ignored(reason), Some(map)) = (outcome, body.as_object_mut()) {
        map.insert("reason".into(), Value::from(reason));
    }
    JsonReply::ok(200, &body)
}

/// Finds the account, claims the event, applies it, marks it applied.
async fn apply(
    gw: &Gateway,
    event_id: &str,
    kind: Kind,
    object: &Value,
    status: Option<SubscriptionStatus>,
    created_s: Option<i64>,
) -> Result<Outcome, GatewayError> {
    let Some(customer) = customer_id(object) else {
        return Ok(Outcome::Ignored("no customer on the object"));
    };
    if gw
        .ledger
        .account_by_stripe_customer(customer)
        .await?
        .is_none()
    {
        tracing::warn!(event = %event_id, customer = %customer,
            "Stripe webhook for a customer no account names; ignored");
        return Ok(Outcome::Ignored("no account has this Stripe customer"));
    }
    match gw
        .ledger
        .begin_stripe_event(event_id, EVENT_LEASE_MS)
        .await?
    {
        StripeEventClaim::Claimed => {}
        StripeEventClaim::Applied => return Ok(Outcome::Duplicate),
        StripeEventClaim::InProgress => return Err(GatewayError::IdempotencyInProgress),
    }
    // Read again under the claim: another event may have changed the account meanwhile.
    let Some(account) = gw.ledger.account_by_stripe_customer(customer).await? else {
        return Ok(Outcome::Ignored("no account has this Stripe customer"));
    };
    let catalog = gw.catalog.snapshot();
    let now_ms = gw.now_ms();
    let outcome = match kind {
        Kind::InvoicePaid => invoice_paid(gw, &catalog, &account, object, now_ms).await?,
        Kind::SubscriptionCreated | Kind::SubscriptionUpdated | Kind::SubscriptionDeleted => {
            let change = subscription_change(&catalog, object, status);
            let order = match (object.get("id").and_then(Value::as_str), created_s) {
                (Some(sub), Some(created_s)) if !sub.is_empty() => Some(SubscriptionEvent {
                    subscription_id: sub.to_string(),
                    created_s,
                }),
                _ => None,
            };
            let outcome =
                apply_subscription(gw, &catalog, customer, account, &change, order.as_ref())
                    .await?;
            if outcome == Outcome::Stale {
                tracing::warn!(event = %event_id, customer = %customer,
                    "Stripe subscription event older than the last one applied; ignored");
            }
            outcome
        }
    };
    if let Err(e) = gw.ledger.finish_stripe_event(event_id, EVENT_KEEP_MS).await {
        // Applied, but not marked: a re-send after the lease would apply it again. Answer
        // 200 anyway so Stripe does not re-send on purpose.
        tracing::warn!(event = %event_id, error = %e, "Stripe event applied but not marked");
    }
    Ok(outcome)
}

/// Two current periods whose ends are at most this far apart are the same period, re-anchored.
pub const SAME_PERIOD_SHIFT_MS: i64 = 7 * 24 * 3600 * 1000;

/// What a plan or period change does to the current period's credits.
///
/// Stripe's period end usually differs a little from the anchor the account had (set by the
/// admin API, or on the 31st of a month), and the period's bucket is named by its end: taken
/// as is, the first subscription event would open a fresh bucket at the full allowance. When
/// the current period before and after the change end within [`SAME_PERIOD_SHIFT_MS`] of each
/// other it is the same period: what was left moves to the re-anchored bucket (plus the
/// allowance difference of an upgrade). Otherwise the new period starts at its allowance by
/// itself, and an upgrade within one bucket adds the difference ([`plan_change`]). A genuinely
/// new paid period resets the credits through `invoice.paid`.
fn carry_credits(
    catalog: &Catalog,
    old: &Account,
    new: &Account,
    now_ms: i64,
) -> Option<CreditChange> {
    if let (Some(old_plan), Some(new_plan)) = (catalog.plan(&old.plan), catalog.plan(&new.plan)) {
        let periodic =
            old_plan.grant == CreditGrant::Period && new_plan.grant == CreditGrant::Period;
        let buckets = (
            entitlement::credit_bucket(catalog, old, now_ms),
            entitlement::credit_bucket(catalog, new, now_ms),
            entitlement::current_period_end(catalog, old, now_ms),
            entitlement::current_period_end(catalog, new, now_ms),
        );
        if let (true, (Some(old_bucket), Some(new_bucket), Some(old_end), Some(new_end))) =
            (periodic, buckets)
        {
            let shift = old_end.saturating_sub(new_end).unsigned_abs();
            if old_bucket.id != new_bucket.id && shift <= SAME_PERIOD_SHIFT_MS.unsigned_abs() {
                let top_up = new_plan.credits.saturating_sub(old_plan.credits);
                return Some(CreditChange::Carry {
                    from: old_bucket,
                    to: new_bucket,
                    add: top_up,
                });
            }
        }
    }
    plan_change::upgrade_difference(catalog, old, new, now_ms)
}

/// Writes a subscription event's change with its credits in one guarded step: decided on the
/// account as read, applied only if it is still that account and no later event of the
/// subscription was applied (then `Stale`); read again and decided again on a conflict.
async fn apply_subscription(
    gw: &Gateway,
    catalog: &Catalog,
    customer: &str,
    mut account: Account,
    change: &SubscriptionChange,
    order: Option<&SubscriptionEvent>,
) -> Result<Outcome, GatewayError> {
    let change = change.account_change();
    for attempt in 0..plan_change::MAX_ATTEMPTS {
        let new = change.applied_to(&account);
        if new == account && order.is_none() {
            return Ok(Outcome::Unchanged);
        }
        let now_ms = gw.now_ms();
        let credits: Vec<CreditChange> = carry_credits(catalog, &account, &new, now_ms)
            .into_iter()
            .collect();
        match gw
            .ledger
            .change_account_if(&account, &change, &credits, order)
            .await?
        {
            GuardedChange::Applied(_) if new == account => return Ok(Outcome::Unchanged),
            GuardedChange::Applied(_) => {
                gw.keys.clear();
                return Ok(Outcome::Applied);
            }
            GuardedChange::Stale { .. } => return Ok(Outcome::Stale),
            GuardedChange::Conflict => plan_change::retry_pause(attempt).await,
        }
        match gw.ledger.account_by_stripe_customer(customer).await? {
            Some(fresh) => account = fresh,
            None => return Ok(Outcome::Ignored("no account has this Stripe customer")),
        }
    }
    Err(plan_change::too_contended(&account.id).into())
}

/// `customer` as an id, or the id of an expanded customer object.
fn customer_id(object: &Value) -> Option<&str> {
    match object.get("customer")? {
        Value::String(s) if !s.is_empty() => Some(s),
        Value::Object(o) => o
            .get("id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty()),
        _ => None,
    }
}

/// What a subscription object says the account should be.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SubscriptionChange {
    plan: Option<String>,
    status: Option<SubscriptionStatus>,
    period_end_ms: Option<i64>,
}

impl SubscriptionChange {
    /// The account fields this event writes (only those it names).
    fn account_change(&self) -> AccountChange {
        AccountChange {
            plan: self.plan.clone(),
            status: self.status,
            period_anchor_ms: self.period_end_ms,
            ..AccountChange::default()
        }
    }
}

fn subscription_change(
    catalog: &Catalog,
    sub: &Value,
    status: Option<SubscriptionStatus>,
) -> SubscriptionChange {
    let items: Vec<&Value> = sub
        .get("items")
        .and_then(|i| i.get("data"))
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let price_of = |item: &Value| -> Option<String> {
        item.get("price")
            .and_then(|p| p.get("id").or(Some(p)))
            .and_then(Value::as_str)
            .or_else(|| {
                item.get("plan")
                    .and_then(|p| p.get("id"))
                    .and_then(Value::as_str)
            })
            .map(str::to_string)
    };
    let plan_item = items.iter().find_map(|item| {
        let price = price_of(item)?;
        let plan = catalog.plan_for_stripe_price(&price)?;
        Some((plan.id.to_string(), *item))
    });
    let seconds = |v: Option<&Value>| v.and_then(Value::as_i64).filter(|s| *s > 0);
    let period_end_s = plan_item
        .as_ref()
        .and_then(|(_, item)| seconds(item.get("current_period_end")))
        .or_else(|| {
            items
                .iter()
                .find_map(|item| seconds(item.get("current_period_end")))
        })
        .or_else(|| seconds(sub.get("current_period_end")));
    SubscriptionChange {
        plan: plan_item.map(|(plan, _)| plan),
        status,
        period_end_ms: period_end_s.and_then(|s| s.checked_mul(1000)),
    }
}

/// Stripe's subscription statuses in the gateway's five (the table in the module doc).
fn stripe_status(text: &str) -> Option<SubscriptionStatus> {
    Some(match text {
        "active" => SubscriptionStatus::Active,
        "trialing" => SubscriptionStatus::Trialing,
        "past_due" | "unpaid" => SubscriptionStatus::PastDue,
        "canceled" | "incomplete_expired" => SubscriptionStatus::Canceled,
        "incomplete" | "paused" => SubscriptionStatus::Incomplete,
        _ => return None,
    })
}

/// The account status a subscription event sets: `canceled` for a deleted subscription, else
/// Stripe's status mapped; an unknown or missing one is a bad request.
fn subscription_status(sub: &Value, deleted: bool) -> Result<SubscriptionStatus, GatewayError> {
    if deleted {
        return Ok(SubscriptionStatus::Canceled);
    }
    match sub.get("status").and_then(Value::as_str) {
        Some(text) => stripe_status(text).ok_or_else(|| {
            GatewayError::InvalidRequest(format!(
                "The subscription status {text:?} is not one the gateway knows; nothing was applied."
            ))
        }),
        None => Err(GatewayError::InvalidRequest(
            "The subscription has no status; nothing was applied.".into(),
        )),
    }
}

async fn invoice_paid(
    gw: &Gateway,
    catalog: &Catalog,
    account: &Account,
    invoice: &Value,
    now_ms: i64,
) -> Result<Outcome, GatewayError> {
    let reason = invoice.get("billing_reason").and_then(Value::as_str);
    if !matches!(
        reason,
        None | Some("subscription_cycle" | "subscription_create" | "subscription")
    ) {
        return Ok(Outcome::Ignored("invoice is not for a new period"));
    }
    let Some(plan) = catalog.plan(&account.plan) else {
        return Ok(Outcome::Ignored("account plan has no credits"));
    };
    if plan.grant != CreditGrant::Period {
        return Ok(Outcome::Ignored("account plan has no credit periods"));
    }
    let Some(bucket) = entitlement::credit_bucket(catalog, account, now_ms) else {
        return Ok(Outcome::Ignored("account has no current period"));
    };
    gw.ledger
        .reset_credits(&account.id, &bucket, plan.credits)
        .await?;
    gw.keys.clear();
    Ok(Outcome::Applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn customer_ids_are_read_plain_or_expanded() {
        assert_eq!(customer_id(&json!({"customer": "cus_1"})), Some("cus_1"));
        assert_eq!(
            customer_id(&json!({"customer": {"id": "cus_2", "object": "customer"}})),
            Some("cus_2")
        );
        assert_eq!(customer_id(&json!({"customer": ""})), None);
        assert_eq!(customer_id(&json!({})), None);
    }

    #[test]
    fn stripe_statuses_map_onto_five() {
        assert_eq!(stripe_status("active"), Some(SubscriptionStatus::Active));
        assert_eq!(
            stripe_status("trialing"),
            Some(SubscriptionStatus::Trialing)
        );
        assert_eq!(
            stripe_status("incomplete_expired"),
            Some(SubscriptionStatus::Canceled)
        );
        assert_eq!(stripe_status("unpaid"), Some(SubscriptionStatus::PastDue));
        assert_eq!(
            stripe_status("paused"),
            Some(SubscriptionStatus::Incomplete)
        );
        assert_eq!(stripe_status("weird"), None);
        assert_eq!(stripe_status("Active"), None);
    }

    #[test]
    fn unknown_or_missing_statuses_are_refused_but_deleted_means_canceled() {
        let weird = json!({"status": "frozen"});
        assert_eq!(
            subscription_status(&weird, false).map_err(|e| e.status()),
            Err(400)
        );
        assert_eq!(
            subscription_status(&json!({}), false).map_err(|e| e.status()),
            Err(400)
        );
        assert_eq!(
            subscription_status(&weird, true).map_err(|e| e.status()),
            Ok(SubscriptionStatus::Canceled)
        );
    }
}
