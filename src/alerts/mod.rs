//! Low-balance alerts: one signed webhook per account, threshold and period to the operator's
//! URL (`[alerts]` in the config) when a reservation takes an account's credits to or below a
//! plan's `alert_credits_left_percent`, or its pay-per-use spend to or above a plan's
//! `alert_spend_percent` of the monthly limit (`plans.toml`).
//!
//! - [`notice`] — called by `admit` after every successful reservation: decides from the
//!   reservation's own answer ([`crossing`]) whether a threshold was crossed, no extra read;
//!   when one was, hands it to the [`AlertOutbox`] without waiting;
//! - [`outbox`] — the claim `SET cg:{a:<id>}:alert:<period>:<p> NX` and the `XADD cg:alerts`
//!   in one `MULTI/EXEC` (crash-safe; repeats are dropped at delivery by the claim's token);
//! - [`delivery`] — the background worker (consumer group `alerts`, take-over of a dead
//!   instance's entries, backoff with full jitter) that POSTs each alert, signed like Stripe's
//!   webhooks (`Creditgate-Signature: t=<unix s>,v1=<hex HMAC-SHA256 of "<t>.<body>">`);
//! - [`metrics`] — `creditgate_alerts_total{result}`, `creditgate_alerts_backlog`.

pub mod crossing;
pub mod delivery;
pub mod metrics;
pub mod outbox;
mod settings;

use std::collections::HashMap;

pub use self::delivery::{AlertDelivery, DeliverySettings, SIGNATURE_HEADER};
pub use self::outbox::AlertOutbox;
pub use self::settings::AlertsConfig;

use crate::apikey::random_id;
use crate::entitlement;
use crate::gateway::Gateway;
use crate::ledger::{schema::SPEND_TTL_MS, Account};
use crate::period;
use crate::reserve::{Payment, Reservation};
use crate::rules::thresholds::{Percents, ThresholdKind};
use crate::rules::Catalog;

/// One alert, as written to the outbox and POSTed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    /// The claim's token: unique per crossing, the receiver's de-duplication key.
    pub id: String,
    pub account: String,
    pub kind: ThresholdKind,
    pub threshold: u8,
    /// The credit period id (`p<end ms>`, `signup`) or the spend month (`YYYYMM`).
    pub period: String,
    /// Credits left, or the month's spend in µ$.
    pub value: u64,
    /// The allowance in credits, or the spending limit in µ$.
    pub limit: u64,
    pub at_ms: i64,
    /// When the claim may be forgotten (the period can no longer be spent in); not sent.
    pub claim_until_ms: Option<i64>,
}

impl ThresholdKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CreditsLeft => "credits_left",
            Self::Spend => "spend",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "credits_left" => Some(Self::CreditsLeft),
            "spend" => Some(Self::Spend),
            _ => None,
        }
    }
}

impl Alert {
    /// The stream entry's fields.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("id", self.id.clone()),
            ("account", self.account.clone()),
            ("kind", self.kind.as_str().to_string()),
            ("threshold", self.threshold.to_string()),
            ("period", self.period.clone()),
            ("value", self.value.to_string()),
            ("limit", self.limit.to_string()),
            ("at", self.at_ms.to_string()),
        ]
    }

    /// An alert from a stream entry's fields; `None` when one is missing or unreadable.
    pub fn from_fields(fields: &HashMap<String, String>) -> Option<Alert> {
        let get = |k: &str| fields.get(k).cloned();
        Some(Alert {
            id: get("id")?,
            account: get("account")?,
            kind: ThresholdKind::parse(fields.get("kind")?)?,
            threshold: fields.get("threshold")?.parse().ok()?,
            period: get("period")?,
            value: fields.get("value")?.parse().ok()?,
            limit: fields.get("limit")?.parse().ok()?,
            at_ms: fields.get("at")?.parse().ok()?,
            claim_until_ms: None,
        })
    }

    /// The JSON body POSTed to the receiver.
    pub fn body(&self) -> serde_json::Value {
        let at = period::format_timestamp_ms(self.at_ms);
        let value_key = match self.kind {
            ThresholdKind::CreditsLeft => "remaining",
            ThresholdKind::Spend => "spent",
        };
        let mut body = serde_json::json!({
            "id": self.id,
            "account": self.account,
            "threshold": self.threshold,
            "kind": self.kind.as_str(),
            "period": self.period,
            "limit": self.limit,
            "at": at,
        });
        body[value_key] = serde_json::json!(self.value);
        body
    }
}

/// The thresholds that apply to `account`: its plan's, and for spend the `[pay_per_use]` ones
/// when it has no plan.
fn thresholds(catalog: &Catalog, account: &Account) -> (Percents, Percents) {
    match catalog.plan(&account.plan) {
        Some(plan) => (plan.alert_credits_left, plan.alert_spend),
        None => (Percents::EMPTY, catalog.pay_per_use().alert_spend),
    }
}

/// After a successful reservation made at `now_ms`: hands every threshold it crossed to the
/// outbox (in the background). No store round trip here; nothing when alerts are off.
pub fn notice(
    gw: &Gateway,
    catalog: &Catalog,
    account: &Account,
    reservation: &Reservation,
    now_ms: i64,
) {
    let Some(outbox) = gw.alerts.as_ref() else {
        return;
    };
    let (credits_set, spend_set) = thresholds(catalog, account);
    let (allowance, period, claim_until_ms) = match reservation.payment {
        Payment::Credits { .. } => {
            if credits_set.is_empty() {
                return;
            }
            match entitlement::credit_bucket(catalog, account, now_ms) {
                Some(b) => (b.allowance, b.id, b.expires_at_ms),
                None => return,
            }
        }
        Payment::Spend { .. } => {
            if spend_set.is_empty() {
                return;
            }
            (
                0,
                period::month_key(now_ms),
                Some(now_ms.saturating_add(SPEND_TTL_MS)),
            )
        }
    };
    let alerts: Vec<Alert> = crossing::crossings(reservation, credits_set, spend_set, allowance)
        .into_iter()
        .map(|c| Alert {
            id: random_id("al_", 20),
            account: account.id.clone(),
            kind: c.kind,
            threshold: c.threshold,
            period: period.clone(),
            value: c.value,
            limit: c.base,
            at_ms: now_ms,
            claim_until_ms,
        })
        .collect();
    if !alerts.is_empty() {
        outbox.submit(alerts);
    }
}
