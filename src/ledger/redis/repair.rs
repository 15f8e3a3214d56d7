//! Second steps that must happen exactly once — the compensation of a refused reservation, the
//! refund of a settled one, the void of one whose outcome is unknown — applied now, or retried in
//! the background when the store did not answer (as is the idempotent removal of a refused key).
//!
//! Exactly once without Lua: each step is a [`Fix`] whose money change moves a counter field of
//! the reservation record (`undone`, `refund_applied`) in the same `MULTI/EXEC`, and the
//! transaction answers the counter's new value. The counter is therefore always the net number
//! of times the money moved; the step stands exactly once when it is 1. Whoever applies a fix
//! ([`Link::converge`]) reads the value its own transaction answered and corrects from there:
//! below 1 → apply, above 1 (an attempt whose answer was lost landed too, or two appliers raced)
//! → undo one, until it reads 1. Any number of appliers — the request's own retries, the
//! background repair, the sweeper on another instance — may run at once: each correction is
//! atomic with the money, so they can only overshoot each other transiently (a surplus refund
//! of one unit for the few milliseconds until the next correction), never settle on a wrong
//! amount.

use std::future::Future;
use std::time::Duration;

use redis::Pipeline;

use super::link::Link;
use super::settlement::{Settler, Unlist};
use super::usage::UsageWrite;
use super::{int, schema};
use crate::ledger::{SettleOutcome, StoreResult};

/// Background repairs (retried compensations and refunds) allowed at once; beyond that they
/// are logged and dropped rather than piling up without bound during a long outage. A repair
/// is a sleeping task of a few hundred bytes; a burst of timeouts under load (2,000 requests
/// arriving at once on a busy 2-CPU box produced 529) must never reach this.
pub(super) const MAX_PENDING_REPAIRS: usize = 65_536;
/// Attempts of one background repair, with backoff from 50 ms doubling to at most 2 s (~30 s).
const REPAIR_ATTEMPTS: u32 = 20;
/// The settler of a timed-out reservation's void (one per reservation, retried).
const VOID_SETTLER: &str = "void";
/// Corrections one applier makes before it leaves the rest to a retry (racing appliers
/// converge in a step or two; this only bounds a pathological store).
const MAX_CONVERGE_STEPS: u32 = 16;

impl Link {
    /// Runs `job` in the background unless too many repairs are pending already.
    pub(super) fn spawn_repair<F, Fut>(&self, what: &'static str, job: F)
    where
        F: FnOnce(Link) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Ok(permit) = self.repairs.clone().try_acquire_owned() else {
            tracing::error!(what, "too many pending ledger repairs; dropping one");
            return;
        };
        let link = self.clone();
        tokio::spawn(async move {
            job(link).await;
            drop(permit);
        });
    }

    /// Brings a guarded fix to exactly one application now (see the module doc); when the store
    /// fails, keeps at it in the background.
    pub(super) async fn fix_or_repair(&self, fix: Fix) -> StoreResult<()> {
        self.converge_or_repair(fix, 0).await
    }

    /// [`Link::converge`] from a known counter value; a failure goes on in the background.
    pub(super) async fn converge_or_repair(&self, fix: Fix, known: i64) -> StoreResult<()> {
        match self.converge(&fix, known).await {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, rsv = %fix.rsv, "ledger fix failed; retrying in background");
                self.spawn_repair("fix", move |link| async move { link.retry_fix(fix).await });
                Err(e)
            }
        }
    }

    /// Moves the fix's counter, with its money, from `count` to exactly 1.
    pub(super) async fn converge(&self, fix: &Fix, mut count: i64) -> StoreResult<()> {
        let mut steps = 0;
        while count != 1 {
            if steps >= MAX_CONVERGE_STEPS {
                return Err(crate::ledger::StoreError::Unavailable(format!(
                    "{} of {} did not settle at 1 (now {count})",
                    fix.marker, fix.rsv
                )));
            }
            steps += 1;
            let direction = if count < 1 { 1 } else { -1 };
            if direction < 0 {
                tracing::warn!(rsv = %fix.rsv, marker = fix.marker, count,
                    "ledger fix applied more than once (an attempt landed late); undoing one");
            }
            let (after,): (i64,) = self
                .tx(&fix.pipeline(direction, self.usage_keep_ms))
                .await?;
            count = after;
        }
        Ok(())
    }

    async fn retry_fix(self, fix: Fix) {
        for attempt in 0..REPAIR_ATTEMPTS {
            tokio::time::sleep(backoff(attempt)).await;
            // An attempt whose answer was lost may have landed: the counter says so.
            let count: StoreResult<Option<i64>> = self
                .cmd(redis::cmd("HGET").arg(&fix.rsv).arg(fix.marker))
                .await;
            if let Ok(count) = count {
                if self.converge(&fix, count.unwrap_or(0)).await.is_ok() {
                    return;
                }
            }
        }
        tracing::error!(rsv = %fix.rsv, marker = fix.marker,
            "ledger fix abandoned after retries; the sweeper finishes it after the hold's lease");
    }

    /// Retries an idempotent transaction (applying it twice changes nothing) in the background.
    pub(super) fn retry_idempotent(&self, what: &'static str, p: Pipeline) {
        self.retry_in_order(what, vec![p]);
    }

    /// Runs idempotent steps in order; from the first that fails, the rest (it included) go on
    /// in the background, still in order.
    pub(super) async fn run_in_order(&self, what: &'static str, steps: Vec<Pipeline>) {
        let mut steps = steps.into_iter();
        while let Some(step) = steps.next() {
            if let Err(e) = self.pipe::<()>(&step).await {
                tracing::warn!(error = %e, what, "ledger step failed; retrying in background");
                self.retry_in_order(what, std::iter::once(step).chain(steps).collect());
                return;
            }
        }
    }

    /// Retries idempotent steps in the background, in order, each until it succeeds (at most
    /// `REPAIR_ATTEMPTS` times, with backoff); a step that never does stops the rest.
    fn retry_in_order(&self, what: &'static str, steps: Vec<Pipeline>) {
        self.spawn_repair(what, move |link| async move {
            'steps: for step in steps {
                for attempt in 0..REPAIR_ATTEMPTS {
                    tokio::time::sleep(backoff(attempt)).await;
                    if link.pipe::<()>(&step).await.is_ok() {
                        continue 'steps;
                    }
                }
                tracing::error!(what, "idempotent ledger repair abandoned after retries");
                return;
            }
        });
    }

    /// Gives back a reservation whose outcome is unknown, in the background.
    pub(super) fn void_unknown(&self, account_id: &str, reservation_id: &str, amount: u64) {
        let account_id = account_id.to_string();
        let reservation_id = reservation_id.to_string();
        self.spawn_repair("void", move |link| async move {
            for attempt in 0..REPAIR_ATTEMPTS {
                tokio::time::sleep(backoff(attempt)).await;
                // `Unknown`: the reservation's transaction has not landed (yet). The claim's stub
                // waits for it, so a late landing is refunded by the next attempt or the sweeper.
                let settled = link
                    .settle(
                        &account_id,
                        &reservation_id,
                        amount,
                        Unlist::AfterRefund,
                        Settler::Request(VOID_SETTLER),
                    )
                    .await;
                if matches!(
                    settled,
                    Ok((SettleOutcome::Settled | SettleOutcome::AlreadySettled, _))
                ) {
                    return;
                }
            }
            tracing::warn!(rsv = %reservation_id,
                "unknown reservation outcome not voided yet; the sweeper gives it back after its lease");
        });
    }
}

fn backoff(attempt: u32) -> Duration {
    let ms = 50u64.saturating_mul(1u64 << attempt.min(10)).min(2_000);
    Duration::from_millis(ms)
}

/// A money change that must happen exactly once.
pub(super) enum Adjust {
    /// Give credits back to a bucket (re-applying its expiry, so a bucket that expired in the
    /// meantime is not resurrected at the refund alone).
    Credits {
        bal: String,
        amount: u64,
        expires_at_ms: Option<i64>,
    },
    /// Take spend back.
    Spend { spend: String, amount: u64 },
}

/// A guarded second step: the money change plus `HINCRBY rsv <marker> ±1` in one transaction.
pub(super) struct Fix {
    pub(super) rsv: String,
    pub(super) marker: &'static str,
    pub(super) adjust: Adjust,
    pub(super) fields: Vec<(&'static str, String)>,
    pub(super) rsv_ttl_ms: Option<i64>,
    /// The outbox entry to delete with the step: `(the lane's outbox stream, entry id)`.
    pub(super) xdel: Option<(String, String)>,
    /// The hold to take off the account's unsettled list once the step stands:
    /// `(cg:{a:<account>}:holds, reservation id)`.
    pub(super) unlist: Option<(String, String)>,
    /// The usage entry the step adds (a refund) or removes (a compensated charge).
    pub(super) usage: Option<UsageWrite>,
}

impl Fix {
    /// `direction` 1 applies the step, -1 undoes a surplus application. Answers one value: the
    /// marker count after it.
    fn pipeline(&self, direction: i64, usage_keep_ms: i64) -> Pipeline {
        let mut p = redis::pipe();
        p.atomic();
        let signed = |amount: u64| int(amount).saturating_mul(direction);
        match &self.adjust {
            Adjust::Credits {
                bal,
                amount,
                expires_at_ms,
            } => {
                p.cmd("INCRBY").arg(bal).arg(signed(*amount)).ignore();
                if let Some(exp) = expires_at_ms {
                    p.cmd("PEXPIREAT").arg(bal).arg(*exp).ignore();
                }
            }
            Adjust::Spend { spend, amount } => {
                p.cmd("DECRBY").arg(spend).arg(signed(*amount)).ignore();
                p.cmd("PEXPIRE")
                    .arg(spend)
                    .arg(schema::SPEND_TTL_MS)
                    .ignore();
            }
        }
        p.cmd("HINCRBY")
            .arg(&self.rsv)
            .arg(self.marker)
            .arg(direction);
        if direction < 0 {
            return p;
        }
        if let Some((holds, rid)) = &self.unlist {
            p.cmd("ZREM").arg(holds).arg(rid).ignore();
        }
        if !self.fields.is_empty() {
            p.cmd("HSET").arg(&self.rsv).arg(&self.fields).ignore();
        }
        if let Some(ttl) = self.rsv_ttl_ms {
            p.cmd("PEXPIRE").arg(&self.rsv).arg(ttl).ignore();
        }
        if let Some((outbox, id)) = &self.xdel {
            p.cmd("XDEL").arg(outbox).arg(id).ignore();
        }
        // Only with an application: an undo leaves the counter at 1 or more (the step still
        // stands once), and the refund's member is the same on every application.
        if let Some(usage) = &self.usage {
            for c in usage.cmds(usage_keep_ms) {
                p.add_command(c).ignore();
            }
        }
        p
    }
}
