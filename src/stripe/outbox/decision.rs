//! The Stripe reporter's pure decisions, with no I/O: what an outbox entry's reservation record
//! says to do with it (wait, skip, send how much, dead-letter), the net value of a partly
//! refunded charge, and what a failed send means (retry, duplicate, dead). The worker in
//! [`super`] does the reading, sending and acknowledging.

use std::collections::HashMap;
use std::time::Duration;

use redis::Value;

use super::super::metrics::Finish;
use super::super::transport::StripeCallError;
use crate::ledger::schema::{self, outbox_field as of, rsv_field as rf};

/// One outbox entry, as the ledger wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OutboxEntry {
    pub(super) rid: String,
    pub(super) account: String,
    pub(super) customer: String,
    /// The meter value of the whole charge.
    pub(super) value: u64,
    /// The charge in micro-dollars (the reservation's amount).
    pub(super) amount: u64,
    /// Charge time, UTC ms.
    pub(super) ts_ms: i64,
}

/// A stream id, ordered like the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Seq(pub u64, pub u64);

pub(super) fn seq(id: &str) -> Seq {
    let (ms, n) = id.split_once('-').unwrap_or((id, "0"));
    Seq(ms.parse().unwrap_or(0), n.parse().unwrap_or(0))
}

/// What the reservation record says about an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Decision {
    Skip(Finish),
    Wait,
    Send(u64),
    Dead(String),
}

/// Decides an entry from its reservation record (`rec` empty when the record is gone).
pub(super) fn decide(
    entry: &OutboxEntry,
    rec: &HashMap<String, String>,
    now_ms: i64,
    lease_ms: i64,
) -> Decision {
    if rec.get(rf::STATE).map(String::as_str) == Some(schema::STATE_VOID) {
        return Decision::Skip(Finish::SkippedVoid);
    }
    let young = now_ms.saturating_sub(entry.ts_ms) < lease_ms;
    let number = |field: &str| -> Result<Option<u64>, String> {
        rec.get(field)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| format!("reservation field {field} is not a number: {v:?}"))
            })
            .transpose()
    };
    let amount = match number(rf::AMOUNT) {
        Ok(a) => a.unwrap_or(entry.amount),
        Err(e) => return Decision::Dead(e),
    };
    if !rec.contains_key(rf::SETTLED) {
        // Unsettled: the request's own settlement, or the sweeper after the hold's lease,
        // settles it. Only a record that is gone (it outlived its TTL) leaves the charge standing.
        return if young || !rec.is_empty() {
            Decision::Wait
        } else {
            Decision::Send(entry.value)
        };
    }
    let refunded = match (number(rf::REFUNDED), number(rf::REFUND_DUE)) {
        (Err(e), _) | (_, Err(e)) => return Decision::Dead(e),
        (Ok(Some(refunded)), _) => refunded,
        (Ok(None), Ok(None | Some(0))) => 0,
        // The refund is being applied (or its writer died): wait for it, then trust the due.
        (Ok(None), Ok(Some(due))) => {
            if young {
                return Decision::Wait;
            }
            due
        }
    };
    match net_value(entry.value, amount, refunded) {
        0 => Decision::Skip(Finish::SkippedRefunded),
        v => Decision::Send(v),
    }
}

/// `value × (amount − refunded) / amount`, exact in integers (rounded down).
pub(super) fn net_value(value: u64, amount: u64, refunded: u64) -> u64 {
    if amount == 0 {
        return if refunded > 0 { 0 } else { value };
    }
    let kept = amount - refunded.min(amount);
    let v = u128::from(value) * u128::from(kept) / u128::from(amount);
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// What to do after a failed send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Stripe has it (duplicate identifier).
    Duplicate,
    /// Stripe took it but the answer was unreadable.
    Accepted,
    Retry {
        reason: &'static str,
        after: Option<Duration>,
    },
    Dead(String),
}

pub(super) fn classify(e: &StripeCallError) -> Verdict {
    match e {
        StripeCallError::Decode(_) => Verdict::Accepted,
        StripeCallError::Network(_) => Verdict::Retry {
            reason: "network",
            after: None,
        },
        StripeCallError::Timeout(_) => Verdict::Retry {
            reason: "timeout",
            after: None,
        },
        StripeCallError::Config(detail) => Verdict::Dead(format!("request not sendable: {detail}")),
        StripeCallError::Api {
            status,
            kind: _,
            code,
            message,
            retry_after,
            should_retry,
        } => {
            let after = *retry_after;
            if *status == 400 && is_duplicate(code.as_deref(), message) {
                return Verdict::Duplicate;
            }
            let reason = match *status {
                429 => "rate_limited",
                401 | 403 => "auth",
                500..=599 => "server_error",
                408 | 409 => "transient",
                400..=499 if *should_retry == Some(true) => "transient",
                400..=499 => {
                    let code = code.as_deref().unwrap_or("-");
                    return Verdict::Dead(format!("Stripe answered {status} ({code}): {message}"));
                }
                _ => "server_error",
            };
            Verdict::Retry { reason, after }
        }
    }
}

/// Stripe's answer to a meter event whose identifier it already has: 400, "An event already
/// exists with identifier <id>." (and a `duplicate…` code where one is given).
fn is_duplicate(code: Option<&str>, message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    code.is_some_and(|c| c.contains("duplicate"))
        || (message.contains("already exists") && message.contains("identifier"))
}

pub(super) fn text(v: &Value) -> Option<String> {
    redis::from_redis_value_ref::<String>(v).ok()
}

pub(super) fn parse_entry(map: &HashMap<String, Value>) -> Result<OutboxEntry, String> {
    let field = |name: &str| -> Result<String, String> {
        map.get(name)
            .and_then(text)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("outbox entry without {name}"))
    };
    let number = |name: &str| -> Result<u64, String> {
        let v = field(name)?;
        v.parse()
            .map_err(|_| format!("outbox field {name} is not an integer: {v:?}"))
    };
    let ts = field(of::TS)?;
    Ok(OutboxEntry {
        rid: field(of::RESERVATION)?,
        account: field(of::ACCOUNT)?,
        customer: field(of::CUSTOMER)?,
        value: number(of::VALUE)?,
        amount: number(of::AMOUNT)?,
        ts_ms: ts
            .parse()
            .map_err(|_| format!("outbox field {} is not a timestamp: {ts:?}", of::TS))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(value: u64, amount: u64, ts_ms: i64) -> OutboxEntry {
        OutboxEntry {
            rid: "r1".into(),
            account: "acme".into(),
            customer: "cus_1".into(),
            value,
            amount,
            ts_ms,
        }
    }

    fn rec(fields: &[(&str, &str)]) -> HashMap<String, String> {
        let mut m: HashMap<String, String> = fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        m.entry(rf::AMOUNT.into()).or_insert_with(|| "300".into());
        m
    }

    const LEASE: i64 = 600_000;

    #[test]
    fn settled_charges_are_reported_net_of_refunds() {
        let e = entry(300, 300, 1_000);
        let now = 2_000;
        assert_eq!(
            decide(&e, &rec(&[(rf::SETTLED, "1")]), now, LEASE),
            Decision::Send(300)
        );
        assert_eq!(
            decide(
                &e,
                &rec(&[
                    (rf::SETTLED, "1"),
                    (rf::REFUND_DUE, "100"),
                    (rf::REFUNDED, "100")
                ]),
                now,
                LEASE
            ),
            Decision::Send(200)
        );
        assert_eq!(
            decide(
                &e,
                &rec(&[(rf::SETTLED, "1"), (rf::REFUNDED, "300")]),
                now,
                LEASE
            ),
            Decision::Skip(Finish::SkippedRefunded)
        );
        assert_eq!(
            decide(&e, &rec(&[(rf::STATE, "void")]), now, LEASE),
            Decision::Skip(Finish::SkippedVoid)
        );
    }

    #[test]
    fn unsettled_charges_wait_for_their_settlement() {
        let e = entry(300, 300, 1_000);
        assert_eq!(
            decide(&e, &rec(&[]), 1_000 + LEASE - 1, LEASE),
            Decision::Wait
        );
        // Past the lease too: the sweeper settles the hold (refund or keep), then it is sent.
        assert_eq!(
            decide(&e, &rec(&[]), 1_000 + 100 * LEASE, LEASE),
            Decision::Wait
        );
        // A refund being applied waits too, then counts.
        let applying = rec(&[(rf::SETTLED, "1"), (rf::REFUND_DUE, "100")]);
        assert_eq!(decide(&e, &applying, 2_000, LEASE), Decision::Wait);
        assert_eq!(
            decide(&e, &applying, 1_000 + LEASE, LEASE),
            Decision::Send(200)
        );
        // A record that expired: the charge stands.
        assert_eq!(
            decide(&e, &HashMap::new(), 1_000 + LEASE, LEASE),
            Decision::Send(300)
        );
    }

    #[test]
    fn corrupt_records_are_dead_lettered() {
        let e = entry(300, 300, 1_000);
        assert!(matches!(
            decide(
                &e,
                &rec(&[(rf::SETTLED, "1"), (rf::REFUNDED, "x")]),
                2_000,
                LEASE
            ),
            Decision::Dead(_)
        ));
    }

    #[test]
    fn net_value_scales_exactly() {
        assert_eq!(net_value(216_000, 216_000, 72_000), 144_000);
        assert_eq!(net_value(10, 3, 1), 6);
        assert_eq!(net_value(u64::MAX, u64::MAX, 1), u64::MAX - 1);
        assert_eq!(net_value(5, 0, 0), 5);
        assert_eq!(net_value(5, 3, 9), 0);
    }

    fn api(status: u16, code: Option<&str>, message: &str, after: Option<u64>) -> StripeCallError {
        StripeCallError::Api {
            status,
            kind: Some("invalid_request_error".into()),
            code: code.map(str::to_string),
            message: message.into(),
            retry_after: after.map(Duration::from_secs),
            should_retry: None,
        }
    }

    #[test]
    fn stripe_answers_are_classified() {
        assert_eq!(
            classify(&api(
                400,
                None,
                "An event already exists with identifier r1.",
                None
            )),
            Verdict::Duplicate
        );
        assert_eq!(
            classify(&api(400, Some("duplicate_meter_event"), "dup", None)),
            Verdict::Duplicate
        );
        assert_eq!(
            classify(&api(429, None, "slow down", Some(3))),
            Verdict::Retry {
                reason: "rate_limited",
                after: Some(Duration::from_secs(3))
            }
        );
        assert!(matches!(
            classify(&api(503, None, "x", None)),
            Verdict::Retry {
                reason: "server_error",
                ..
            }
        ));
        assert!(matches!(
            classify(&api(401, None, "x", None)),
            Verdict::Retry { reason: "auth", .. }
        ));
        assert!(matches!(
            classify(&api(400, Some("resource_missing"), "No such meter", None)),
            Verdict::Dead(_)
        ));
        assert!(matches!(
            classify(&StripeCallError::Network("refused".into())),
            Verdict::Retry {
                reason: "network",
                ..
            }
        ));
        assert!(matches!(
            classify(&StripeCallError::Timeout(Duration::from_secs(1))),
            Verdict::Retry {
                reason: "timeout",
                ..
            }
        ));
        assert_eq!(
            classify(&StripeCallError::Decode("x".into())),
            Verdict::Accepted
        );
    }

    #[test]
    fn entries_parse_or_explain() {
        let map: HashMap<String, Value> = [
            (of::RESERVATION, "r1"),
            (of::ACCOUNT, "acme"),
            (of::CUSTOMER, "cus_1"),
            (of::VALUE, "216000"),
            (of::AMOUNT, "216000"),
            (of::TS, "1777000000123"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), Value::BulkString(v.as_bytes().to_vec())))
        .collect();
        let parsed = parse_entry(&map).unwrap();
        assert_eq!(parsed.value, 216_000);
        assert_eq!(parsed.ts_ms, 1_777_000_000_123);
        let mut broken = map.clone();
        broken.remove(of::CUSTOMER);
        assert!(parse_entry(&broken).unwrap_err().contains("customer"));
    }

    #[test]
    fn stream_ids_order_numerically() {
        assert!(seq("9-0") < seq("10-0"));
        assert!(seq("10-2") < seq("10-10"));
    }
}
