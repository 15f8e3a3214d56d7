//! The billing endpoints the gateway answers itself (CONTRACT §6), with the seed's exact JSON
//! shapes: balance, subscription, and the pay-per-use spending limit. Called by `admit` after
//! authentication; never proxied.

use bytes::Bytes;
use serde_json::{json, Value};

use crate::auth::Principal;
use crate::entitlement;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::ledger::{Account, AccountChange};
use crate::money::MAX_SPENDING_LIMIT_CENTS;
use crate::period;
use crate::respond::JsonReply;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BillingEndpoint {
    Balance,
    Subscription,
    GetSpendingLimit,
    SetSpendingLimit,
}

impl BillingEndpoint {
    /// Matches a canonical path; `None` for everything else (including wrong methods).
    pub fn find(method: &str, path: &str) -> Option<Self> {
        match (method, path) {
            ("GET", "/api/credits/balance") => Some(Self::Balance),
            ("GET", "/api/subscription") => Some(Self::Subscription),
            ("GET", "/api/spending-limit") => Some(Self::GetSpendingLimit),
            ("POST", "/api/spending-limit") => Some(Self::SetSpendingLimit),
            _ => None,
        }
    }

    /// Whether `path` belongs to the billing API at all (so it is never proxied).
    pub fn owns_path(path: &str) -> bool {
        matches!(
            path,
            "/api/credits/balance" | "/api/subscription" | "/api/spending-limit"
        )
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Balance => "GET /api/credits/balance",
            Self::Subscription => "GET /api/subscription",
            Self::GetSpendingLimit => "GET /api/spending-limit",
            Self::SetSpendingLimit => "POST /api/spending-limit",
        }
    }
}

/// Credits left in the account's current bucket (0 when the plan grants none).
pub async fn credits_remaining(gw: &Gateway, account: &Account) -> Result<u64, GatewayError> {
    let catalog = gw.catalog.snapshot();
    match entitlement::credit_bucket(&catalog, account, gw.now_ms()) {
        Some(bucket) => Ok(gw.ledger.credit_balance(&account.id, &bucket).await?),
        None => Ok(0),
    }
}

pub async fn answer(
    gw: &Gateway,
    principal: &Principal,
    endpoint: BillingEndpoint,
    body: Option<Bytes>,
) -> Result<JsonReply, GatewayError> {
    // The principal may be up to one cache TTL old; billing answers read the account fresh.
    let account = gw
        .ledger
        .get_account(&principal.account.id)
        .await?
        .ok_or(GatewayError::InvalidApiKey)?;
    match endpoint {
        BillingEndpoint::Balance => {
            let balance = credits_remaining(gw, &account).await?;
            Ok(JsonReply::ok(200, &json!({ "balance": balance })))
        }
        BillingEndpoint::Subscription => {
            let catalog = gw.catalog.snapshot();
            let remaining = credits_remaining(gw, &account).await?;
            let period_end = entitlement::current_period_end(&catalog, &account, gw.now_ms())
                .map(period::format_timestamp_ms);
            Ok(JsonReply::ok(
                200,
                &json!({
                    "plan": account.plan,
                    "status": account.status.as_str(),
                    "creditsRemaining": remaining,
                    "currentPeriodEnd": period_end,
                }),
            ))
        }
        BillingEndpoint::GetSpendingLimit => Ok(JsonReply::ok(
            200,
            &json!({ "limitCents": account.spending_limit_cents }),
        )),
        BillingEndpoint::SetSpendingLimit => {
            let limit = parse_limit_cents(body.as_deref().unwrap_or_default())?;
            // Only this field: a concurrent plan change or webhook is not undone.
            let change = AccountChange {
                spending_limit_cents: Some(limit),
                ..AccountChange::default()
            };
            gw.ledger
                .change_account(&account.id, &change)
                .await?
                .ok_or(GatewayError::InvalidApiKey)?;
            gw.keys.clear();
            Ok(JsonReply::ok(
                200,
                &json!({ "limitCents": limit, "updated": true }),
            ))
        }
    }
}

/// `{"limitCents": <integer 0..=100000000>}`; anything else is a 400 naming the problem.
pub fn parse_limit_cents(body: &[u8]) -> Result<u64, GatewayError> {
    let bad = |m: &str| GatewayError::InvalidRequest(m.to_string());
    let value: Value =
        serde_json::from_slice(body).map_err(|_| bad("The body must be a JSON object."))?;
    let field = value
        .as_object()
        .ok_or_else(|| bad("The body must be a JSON object."))?
        .get("limitCents")
        .ok_or_else(|| bad("Field `limitCents` is required."))?;
    let limit = match field {
        Value::Number(n) if n.is_u64() => n.as_u64(),
        _ => None,
    }
    .ok_or_else(|| bad("Field `limitCents` must be a non-negative JSON integer."))?;
    if limit > MAX_SPENDING_LIMIT_CENTS {
        return Err(bad("Field `limitCents` must be at most 100000000."));
    }
    Ok(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_cents_accepts_only_integers_in_range() {
        assert_eq!(
            parse_limit_cents(br#"{"limitCents": 5000}"#).ok(),
            Some(5000)
        );
        assert_eq!(parse_limit_cents(br#"{"limitCents": 0}"#).ok(), Some(0));
        assert_eq!(
            parse_limit_cents(br#"{"limitCents": 100000000}"#).ok(),
            Some(100_000_000)
        );
        for bad in [
            &br#"{"limitCents": 100000001}"#[..],
            br#"{"limitCents": -1}"#,
            br#"{"limitCents": 50.5}"#,
            br#"{"limitCents": 5000.0}"#,
            br#"{"limitCents": "5000"}"#,
            br#"{"limitCents": null}"#,
            br#"{}"#,
            br#"[5000]"#,
            br#"{"limitCents": 5000"#,
            b"",
        ] {
            assert!(
                parse_limit_cents(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
