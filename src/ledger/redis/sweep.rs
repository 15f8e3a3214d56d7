//! The Redis side of the sweeper ([`crate::sweeper`]): walks, lane by lane
//! ([`lane`](crate::ledger::lane): one on a single node, one per cluster slot in use), the lease
//! slots that ended (`<lane>lease:due` → `<lane>lease:<slot>` → each account's
//! `cg:{a:<id>}:holds` past its lease) and
//! settles each hold found there through the ordinary settlement claim, so it is exactly-once
//! against the request's own settlement and against every other instance's sweeper:
//! - nobody settled it (its gateway died, or the store hung mid-request) → claimed with the
//!   orphan policy's refund (`refund`: all of it; `keep`: nothing), marked `orphan=<policy>`;
//! - claimed but its refund not applied exactly once (a crash between claim and refund) → the
//!   refund is brought to exactly one application;
//! - settled, voided or gone → only taken off the list.
//!
//! A slot is swept once its end is [`LEASE_MARGIN_MS`] in the past and deleted (with its index
//! entry, in one `MULTI`) only when every hold in it was dealt with; otherwise the next sweep
//! tries again. A reservation only ever adds itself to the slot its lease ends in, which is at
//! least the lease (connect + read timeout + grace) ahead of its own clock, so instance clocks
//! must agree to within the lease for no hold to be added to a slot already swept.

use super::link::Link;
use super::settlement::{Settler, Unlist};
use super::{command, schema};
use crate::ledger::lane::Lane;
use crate::ledger::schema::rsv_field as rf;
use crate::ledger::{OrphanPolicy, SettleOutcome, StoreResult, SweepReport};

/// How long after a slot's end it is swept (timer and clock jitter between instances).
pub(super) const LEASE_MARGIN_MS: i64 = 1_000;
/// Slots taken per sweep.
const SLOTS_PER_SWEEP: isize = 64;

impl Link {
    pub(super) async fn sweep(
        &self,
        now_ms: i64,
        policy: OrphanPolicy,
        limit: usize,
    ) -> StoreResult<SweepReport> {
        let mut report = SweepReport::default();
        for lane in self.lanes().await? {
            if self
                .sweep_lane(lane, now_ms, policy, limit, &mut report)
                .await?
            {
                break;
            }
        }
        Ok(report)
    }

    /// One lane's due lease slots; `true` once `limit` holds were checked.
    async fn sweep_lane(
        &self,
        lane: Lane,
        now_ms: i64,
        policy: OrphanPolicy,
        limit: usize,
        report: &mut SweepReport,
    ) -> StoreResult<bool> {
        let horizon = now_ms - LEASE_MARGIN_MS;
        // Slot s ends at (s + 1) × width: due when that is past the horizon.
        let last_due = schema::lease_slot_of(horizon) - 1;
        let slots: Vec<i64> = self
            .cmd(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(lane.lease_due())
                    .arg("-inf")
                    .arg(last_due)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(SLOTS_PER_SWEEP),
            )
            .await?;
        for slot in slots {
            let key = lane.lease_slot(slot);
            let accounts: Vec<String> = self.cmd(redis::cmd("SMEMBERS").arg(&key)).await?;
            let mut complete = true;
            for account in &accounts {
                let left = limit.saturating_sub(usize::try_from(report.checked).unwrap_or(0));
                if left == 0 {
                    return Ok(true);
                }
                if !self
                    .sweep_account(account, horizon, policy, left, report)
                    .await?
                {
                    complete = false;
                }
            }
            if complete {
                let mut p = redis::pipe();
                p.atomic();
                p.cmd("DEL").arg(&key).ignore();
                p.cmd("ZREM").arg(lane.lease_due()).arg(slot).ignore();
                let () = self.pipe(&p).await?;
            }
        }
        Ok(false)
    }

    /// Settles the account's holds whose lease ended before `horizon`; `false` when some were
    /// left for the next sweep (more than `limit`, or a claimed refund not stale yet), so the
    /// slot that lists the account is kept for that sweep.
    async fn sweep_account(
        &self,
        account_id: &str,
        horizon: i64,
        policy: OrphanPolicy,
        limit: usize,
        report: &mut SweepReport,
    ) -> StoreResult<bool> {
        let holds = schema::holds(account_id);
        let take = limit.min(1000);
        let due: Vec<String> = self
            .cmd(
                redis::cmd("ZRANGEBYSCORE")
                    .arg(&holds)
                    .arg("-inf")
                    .arg(horizon)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(take),
            )
            .await?;
        let mut left_listed = false;
        for rid in &due {
            report.checked += 1;
            let (outcome, finished) = self
                .settle(
                    account_id,
                    rid,
                    policy.refund(),
                    Unlist::AfterRefund,
                    Settler::Sweeper { now_ms: horizon },
                )
                .await?;
            if outcome == SettleOutcome::Settled {
                report.orphans += 1;
                let rsv = schema::reservation(account_id, rid);
                let _: StoreResult<i64> = self
                    .cmd(&command("HSET", &rsv, (rf::ORPHAN, policy.as_str())))
                    .await;
                tracing::warn!(account = %account_id, reservation = %rid, policy = policy.as_str(),
                    "hold settled by the sweeper: its lease ended with no settlement");
            }
            if finished {
                report.refunds_finished += 1;
                tracing::warn!(account = %account_id, reservation = %rid,
                    "sweeper finished a refund that was claimed but not applied");
            }
            if outcome == SettleOutcome::AlreadySettled
                && !finished
                && self.refund_pending(account_id, rid).await?
            {
                // Another settler's claim, not stale yet: left listed for a later sweep.
                left_listed = true;
                continue;
            }
            // Nothing more is owed now (a refund that could not be applied returned an error
            // above and stays listed).
            let _: i64 = self.cmd(&command("ZREM", &holds, rid.as_str())).await?;
        }
        Ok(!left_listed && due.len() < take)
    }

    /// Whether a claimed refund of the hold is still not applied exactly once.
    async fn refund_pending(&self, account_id: &str, rid: &str) -> StoreResult<bool> {
        let rsv = schema::reservation(account_id, rid);
        let (due, applied): (Option<i64>, Option<i64>) = self
            .cmd(
                redis::cmd("HMGET")
                    .arg(&rsv)
                    .arg(rf::REFUND_DUE)
                    .arg(rf::REFUND_APPLIED),
            )
            .await?;
        Ok(due.unwrap_or(0) > 0 && applied.unwrap_or(0) != 1)
    }
}
