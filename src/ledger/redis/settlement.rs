//! Settling one hold in Redis: the claim (`HSETNX settled`, exactly one caller wins), then the
//! refund it calls for, brought to exactly one application ([`Link::converge`]). Also what any
//! later caller does with a hold someone else claimed: finish a refund the claimer did not
//! (it died between claim and refund, or lost the answer), which is how the sweeper, a retried
//! settlement and the void of a timed-out reservation all repair the same hold safely.

use super::link::Link;
use super::repair::{Adjust, Fix};
use super::usage::UsageWrite;
use super::{command, corrupt, int, now_ms, reply, schema};
use crate::failpoint;
use crate::ledger::schema::rsv_field as rf;
use crate::ledger::{SettleOutcome, StoreResult, UsageEntry};

/// When a settled hold leaves its account's unsettled list (`cg:{a:<id>}:holds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unlist {
    /// In the claim's own transaction: a settlement that gives nothing back is then complete.
    OnClaim,
    /// With the refund's application (or by the caller, once nothing is owed).
    AfterRefund,
}

/// Who settles: the claim records it, so a retry by the same settler (its first answer was
/// lost) finishes its own refund, while anyone else only finishes a claim gone stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settler<'a> {
    /// The request's own settlement (or the void of its timed-out reservation), with retries:
    /// one token per settlement.
    Request(&'a str),
    /// The sweeper at `now_ms`: finishes another settler's refund only when its claim is older
    /// than [`STALE_CLAIM_MS`] (that settler died or gave up).
    Sweeper { now_ms: i64 },
}

/// A claim whose refund is still not applied after this long is finished by the sweeper.
pub(super) const STALE_CLAIM_MS: i64 = 30_000;
const SWEEPER_TOKEN: &str = "sweeper";

impl Link {
    /// Claims the hold with `refund` (clamped to its amount) and gives back what the claim
    /// calls for — or, when the same settler claimed it before, or another settler's claim went
    /// stale, what that claim still owes. Answers the outcome and whether this call finished a
    /// refund claimed by someone else.
    pub(super) async fn settle(
        &self,
        account_id: &str,
        reservation_id: &str,
        refund: u64,
        unlist: Unlist,
        settler: Settler<'_>,
    ) -> StoreResult<(SettleOutcome, bool)> {
        let token = match settler {
            Settler::Request(token) => token,
            Settler::Sweeper { .. } => SWEEPER_TOKEN,
        };
        if refund == 0 && unlist == Unlist::OnClaim && token != SWEEPER_TOKEN {
            if let Some(outcome) = self.settle_kept(account_id, reservation_id, token).await? {
                return Ok((outcome, false));
            }
        }
        let rsv = schema::reservation(account_id, reservation_id);
        let holds = schema::holds(account_id);
        let mut cmds = vec![
            command("HSETNX", &rsv, (rf::SETTLED, now_ms())),
            command("HSETNX", &rsv, (rf::REFUND_DUE, int(refund))),
            command("HSETNX", &rsv, (rf::SETTLER, token)),
            command(
                "HMGET",
                &rsv,
                &[
                    rf::KIND,
                    rf::BUCKET,
                    rf::BUCKET_EXPIRES_MS,
                    rf::AMOUNT,
                    rf::STATE,
                    rf::REFUND_DUE,
                    rf::REFUND_APPLIED,
                    rf::SETTLER,
                    rf::SETTLED,
                    rf::USAGE,
                ],
            ),
        ];
        if unlist == Unlist::OnClaim {
            cmds.push(command("ZREM", &holds, reservation_id));
        }
        let mut replies = self.transact(cmds).await?;
        let claimed = reply::<i64>(&mut replies, 0, &rsv)? == 1;
        let fields: Vec<Option<String>> = reply(&mut replies, 3, &rsv)?;
        let field = |i: usize| fields.get(i).cloned().flatten();
        let number = |i: usize, name: &str| -> StoreResult<Option<i64>> {
            field(i)
                .map(|v| {
                    v.parse::<i64>()
                        .map_err(|e| corrupt(&rsv, format!("{name}: {e}")))
                })
                .transpose()
        };
        let Some(kind) = field(0) else {
            if claimed {
                self.keep_stub(&rsv).await;
            }
            return Ok((SettleOutcome::Unknown, false));
        };
        if field(4).as_deref() == Some(schema::STATE_VOID) {
            return Ok((SettleOutcome::Unknown, false));
        }
        let outcome = match claimed {
            true => SettleOutcome::Settled,
            false => SettleOutcome::AlreadySettled,
        };
        let amount = number(3, rf::AMOUNT)?.unwrap_or(0).max(0);
        let due = number(5, rf::REFUND_DUE)?.unwrap_or(0).max(0);
        let applied = number(6, rf::REFUND_APPLIED)?.unwrap_or(0);
        let owed = u64::try_from(due.min(amount)).unwrap_or(0);
        if owed == 0 || applied == 1 {
            return Ok((outcome, false));
        }
        let mine = claimed || field(7).as_deref() == Some(token);
        let stale = match settler {
            Settler::Sweeper { now_ms } => {
                number(8, rf::SETTLED)?.is_some_and(|at| at < now_ms - STALE_CLAIM_MS)
            }
            Settler::Request(_) => false,
        };
        if !mine && !stale {
            // Another settler holds this claim and may be applying it right now.
            return Ok((outcome, false));
        }
        if claimed {
            // Test hook: the process dies here, between the claim and its refund.
            failpoint::hit(failpoint::SETTLE_AFTER_CLAIM);
        }
        let bucket = field(1).ok_or_else(|| corrupt(&rsv, "missing bucket"))?;
        let adjust = match kind.as_str() {
            schema::KIND_CREDITS => Adjust::Credits {
                bal: schema::balance(account_id, &bucket),
                amount: owed,
                expires_at_ms: field(2).and_then(|t| t.parse().ok()),
            },
            schema::KIND_SPEND => Adjust::Spend {
                spend: schema::spend(account_id, &bucket),
                amount: owed,
            },
            other => return Err(corrupt(&rsv, format!("unknown kind {other}"))),
        };
        // Deterministic: every applier of this refund writes the same member (module doc of
        // `ledger::usage`). A record from before usage history has no charge entry to copy.
        let settled_ms = number(8, rf::SETTLED)?.unwrap_or(0);
        let usage = field(9)
            .and_then(|m| UsageEntry::parse_member(&m))
            .map(|charge| UsageWrite::Add {
                account_id: account_id.to_string(),
                entry: charge.refund_of(owed, settled_ms),
            });
        let fix = Fix {
            rsv,
            marker: rf::REFUND_APPLIED,
            adjust,
            fields: vec![(rf::REFUNDED, owed.to_string())],
            rsv_ttl_ms: None,
            xdel: None,
            unlist: Some((holds, reservation_id.to_string())),
            usage,
        };
        self.converge_or_repair(fix, applied).await?;
        Ok((outcome, !mine))
    }

    /// The common case on the request path, a hold kept whole: a winning claim of nothing
    /// owes nothing, so its transaction reads only what decides the outcome (the record's
    /// kind and state) rather than everything a refund needs. `None` when the claim was
    /// someone else's (or this settler's earlier one): [`Link::settle`] then reads it all.
    async fn settle_kept(
        &self,
        account_id: &str,
        reservation_id: &str,
        token: &str,
    ) -> StoreResult<Option<SettleOutcome>> {
        let rsv = schema::reservation(account_id, reservation_id);
        let cmds = vec![
            command("HSETNX", &rsv, (rf::SETTLED, now_ms())),
            command("HSETNX", &rsv, (rf::REFUND_DUE, 0)),
            command("HSETNX", &rsv, (rf::SETTLER, token)),
            command("HMGET", &rsv, &[rf::KIND, rf::STATE]),
            command("ZREM", &schema::holds(account_id), reservation_id),
        ];
        let mut replies = self.transact(cmds).await?;
        if reply::<i64>(&mut replies, 0, &rsv)? != 1 {
            return Ok(None);
        }
        let fields: Vec<Option<String>> = reply(&mut replies, 3, &rsv)?;
        let (kind, state) = match fields.as_slice() {
            [kind, state] => (kind, state),
            _ => return Err(corrupt(&rsv, "HMGET answered the wrong number of fields")),
        };
        if kind.is_none() {
            self.keep_stub(&rsv).await;
            return Ok(Some(SettleOutcome::Unknown));
        }
        Ok(Some(match state.as_deref() == Some(schema::STATE_VOID) {
            true => SettleOutcome::Unknown,
            false => SettleOutcome::Settled,
        }))
    }

    /// A winning claim found no such reservation (yet): it stays as a stub for a while. A
    /// reservation transaction that lands late — its answer was lost to a timeout — merges into
    /// it, and is then owed this claim's refund instead of standing as a charge.
    async fn keep_stub(&self, rsv: &str) {
        let _: StoreResult<i64> = self
            .cmd(
                redis::cmd("PEXPIRE")
                    .arg(rsv)
                    .arg(schema::CLAIM_STUB_TTL_MS),
            )
            .await;
    }
}
