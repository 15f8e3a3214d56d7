//! Usage history: one entry per money movement of an account (a charge, a refund, a grant, a
//! period reset), written by both ledger backends in the same atomic step as the money it
//! describes, and read back newest first in pages ([`super::Ledger::usage`]). Decides what an
//! entry holds, how it is stored (one sorted-set member) and how pages are cut (the cursor).
//! Read by `usage_api` (`GET /api/usage`) and `cli` (`creditgate usage`).
//!
//! # Stored form
//!
//! An entry is a member `<id> <json>` of the account's zset, scored by its time (UTC ms). The id
//! is unique per account and decided by what the entry describes: `c:<charge id>` for a charge,
//! `r:<charge id>` for its refund (a charge is refunded at most once), `g:`/`s:` plus a random id
//! for grants and resets. A refund's member is fully determined by its reservation (time = the
//! settlement claim's `settled`, amount = the clamped refund, the rest copied from the charge),
//! so a refund applied twice before being undone to once (`repair::converge`) adds the same
//! member twice: one entry. The separator ` ` sorts below every id character, so members sort
//! exactly as their ids do and a page boundary is `(time, id)`.

use serde::{Deserialize, Serialize};

use crate::apikey::random_id;

/// Default `billing.usage_retention_days`.
pub const DEFAULT_RETENTION_DAYS: u64 = 90;
/// Largest page of [`UsageQuery::limit`].
pub const MAX_PAGE: usize = 1000;
/// Default page size.
pub const DEFAULT_PAGE: usize = 100;

/// What moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageKind {
    /// Credits or spend taken for a request (`amount` taken).
    Charge,
    /// Part or all of a charge given back (`amount` given back).
    Refund,
    /// Credits added (`amount` added).
    Grant,
    /// A bucket set to exactly `amount` (a new period paid for, a carried balance).
    Reset,
}

impl UsageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Charge => "charge",
            Self::Refund => "refund",
            Self::Grant => "grant",
            Self::Reset => "reset",
        }
    }
}

/// What `amount` counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageUnit {
    Credits,
    /// Micro-dollars of pay-per-use spend.
    Usd,
}

/// One ledger entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageEntry {
    /// Unique per account (see the module doc); not stored in the JSON.
    #[serde(skip)]
    pub id: String,
    #[serde(rename = "t")]
    pub time_ms: i64,
    #[serde(rename = "k")]
    pub kind: UsageKind,
    /// The charge id (`X-Request-Id` of the billed request); empty for grants and resets.
    #[serde(rename = "r", default)]
    pub request_id: String,
    #[serde(rename = "o", default)]
    pub operation: String,
    #[serde(rename = "m", default)]
    pub model: String,
    /// Units charged, or given back by a refund.
    #[serde(rename = "q", default)]
    pub quantity: u64,
    #[serde(rename = "u")]
    pub unit: UsageUnit,
    /// Credits, or micro-dollars (see [`UsageKind`] for the sign).
    #[serde(rename = "a")]
    pub amount: u64,
    /// Credit bucket (period id, `signup`) or `YYYYMM` month of spend.
    #[serde(rename = "b", default)]
    pub bucket: String,
    #[serde(rename = "v", default)]
    pub catalog_version: u64,
}

impl UsageEntry {
    /// The charge entry of a reservation.
    pub fn charge(
        request_id: &str,
        meta: &super::ChargeMeta,
        unit: UsageUnit,
        amount: u64,
        bucket: &str,
    ) -> Self {
        Self {
            id: format!("c:{request_id}"),
            time_ms: meta.created_ms,
            kind: UsageKind::Charge,
            request_id: request_id.to_string(),
            operation: meta.operation.clone(),
            model: meta.model.clone(),
            quantity: meta.quantity,
            unit,
            amount,
            bucket: bucket.to_string(),
            catalog_version: meta.catalog_version,
        }
    }

    /// The refund of `amount` (at most the charge's) of this charge, at `time_ms` (never before
    /// the charge): whole units given back when the amount is a whole number of them.
    pub fn refund_of(&self, amount: u64, time_ms: i64) -> Self {
        let quantity = match self.amount {
            0 => 0,
            charged => {
                u64::try_from(u128::from(self.quantity) * u128::from(amount) / u128::from(charged))
                    .unwrap_or(0)
            }
        };
        Self {
            id: format!("r:{}", self.request_id),
            time_ms: time_ms.max(self.time_ms),
            kind: UsageKind::Refund,
            quantity,
            amount,
            ..self.clone()
        }
    }

    /// A grant (`Grant`) or a reset (`Reset`) of a credit bucket, with a fresh id.
    pub fn credit_change(kind: UsageKind, bucket: &str, amount: u64, time_ms: i64) -> Self {
        let prefix = match kind {
            UsageKind::Reset => "s:",
            _ => "g:",
        };
        Self {
            id: random_id(prefix, 16),
            time_ms,
            kind,
            request_id: String::new(),
            operation: String::new(),
            model: String::new(),
            quantity: 0,
            unit: UsageUnit::Credits,
            amount,
            bucket: bucket.to_string(),
            catalog_version: 0,
        }
    }

    /// `<id> <json>`, the stored member.
    pub fn member(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_default();
        format!("{} {json}", self.id)
    }

    /// Parses a stored member; `None` when it is not one.
    pub fn parse_member(member: &str) -> Option<Self> {
        let (id, json) = member.split_once(' ')?;
        let mut entry: Self = serde_json::from_str(json).ok()?;
        entry.id = id.to_string();
        Some(entry)
    }

    /// Credits moved into the account's balance by this entry's direction: a charge takes
    /// (`-amount`), a refund or grant gives (`+amount`); a reset is not a movement (`0`).
    pub fn signed_amount(&self) -> i128 {
        let a = i128::from(self.amount);
        match self.kind {
            UsageKind::Charge => -a,
            UsageKind::Refund | UsageKind::Grant => a,
            UsageKind::Reset => 0,
        }
    }
}

/// Where a page ends: the last entry returned. The next page holds the entries strictly after
/// it in newest-first order, `(time, id)` descending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageCursor {
    pub time_ms: i64,
    pub id: String,
}

impl UsageCursor {
    /// Opaque text: `<time>.<id>`, hex-encoded so it is URL-safe whatever the id holds.
    pub fn encode(&self) -> String {
        let text = format!("{}.{}", self.time_ms, self.id);
        text.bytes().map(|b| format!("{b:02x}")).collect()
    }

    pub fn decode(text: &str) -> Option<Self> {
        if !text.len().is_multiple_of(2) || text.len() > 1024 {
            return None;
        }
        let bytes = (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        let text = String::from_utf8(bytes).ok()?;
        let (time, id) = text.split_once('.')?;
        if id.is_empty() || id.contains(' ') {
            return None;
        }
        Some(Self {
            time_ms: time.parse().ok()?,
            id: id.to_string(),
        })
    }

    /// Whether `entry` comes after this cursor (is on a later page).
    pub fn precedes(&self, entry: &UsageEntry) -> bool {
        (entry.time_ms, entry.id.as_str()) < (self.time_ms, self.id.as_str())
    }
}

/// One page request: entries with `from_ms <= time < to_ms`, after `cursor`, at most `limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub cursor: Option<UsageCursor>,
    pub limit: usize,
}

impl Default for UsageQuery {
    fn default() -> Self {
        Self {
            from_ms: None,
            to_ms: None,
            cursor: None,
            limit: DEFAULT_PAGE,
        }
    }
}

impl UsageQuery {
    /// Whether `entry` belongs to this page's range (time window and cursor).
    pub fn admits(&self, entry: &UsageEntry) -> bool {
        self.from_ms.is_none_or(|f| entry.time_ms >= f)
            && self.to_ms.is_none_or(|t| entry.time_ms < t)
            && self.cursor.as_ref().is_none_or(|c| c.precedes(entry))
    }
}

/// One page, newest first; `next` is set when more entries may follow.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UsagePage {
    pub entries: Vec<UsageEntry>,
    pub next: Option<UsageCursor>,
}

impl UsagePage {
    /// The page of `limit` from candidates (any order, possibly more than `limit`): sorted newest
    /// first, cut at `limit`, with a cursor when something was cut.
    pub fn cut(mut candidates: Vec<UsageEntry>, limit: usize) -> Self {
        candidates.sort_by(|a, b| (b.time_ms, &b.id).cmp(&(a.time_ms, &a.id)));
        candidates.dedup_by(|a, b| a.id == b.id);
        let more = candidates.len() > limit;
        candidates.truncate(limit);
        let next = match more {
            true => candidates.last().map(|e| UsageCursor {
                time_ms: e.time_ms,
                id: e.id.clone(),
            }),
            false => None,
        };
        Self {
            entries: candidates,
            next,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_round_trip_and_refunds_are_deterministic() {
        let meta = super::super::ChargeMeta {
            operation: "image.generate".into(),
            model: "flux".into(),
            quantity: 4,
            unit_amount: 10,
            catalog_version: 7,
            created_ms: 1_000,
        };
        let charge = UsageEntry::charge("req_1", &meta, UsageUnit::Credits, 40, "p1");
        let parsed = UsageEntry::parse_member(&charge.member());
        assert_eq!(parsed.as_ref(), Some(&charge));
        let refund = charge.refund_of(30, 2_000);
        assert_eq!(refund.quantity, 3);
        assert_eq!(refund.id, "r:req_1");
        assert_eq!(refund.member(), charge.refund_of(30, 2_000).member());
    }

    #[test]
    fn cursors_are_opaque_and_checked() {
        let c = UsageCursor {
            time_ms: 123,
            id: "c:req.x".into(),
        };
        assert_eq!(UsageCursor::decode(&c.encode()), Some(c));
        for bad in ["", "zz", "313", "3132", "2e63"] {
            assert_eq!(UsageCursor::decode(bad), None, "{bad}");
        }
    }
}
