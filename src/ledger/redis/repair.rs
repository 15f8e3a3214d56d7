//! Second steps that must happen exactly once — the compensation of a refused reservation, the
//! refund of a settled one, the void of one whose outcome is unknown — applied now, or retried in
//! the background when the store did not answer (as is the idempotent removal of a refused key). Each is guarded by a counter field written in
//! the same transaction as the money it moves, so a retry after a lost answer is detected.

use std::future::Future;
use std::time::Duration;

use redis::Pipeline;

use super::link::Link;
use super::{int, schema};
use crate::ledger::StoreResult;

/// Background repairs (retried compensations and refunds) allowed at once; beyond that they
/// are logged and dropped rather than piling up without bound during a long outage. A repair
/// is a sleeping task of a few hundred bytes; a burst of timeouts under load (2,000 requests
/// arriving at once on a busy 2-CPU box produced 529) must never reach this.
pub(super) const MAX_PENDING_REPAIRS: usize = 65_536;
/// Attempts of one background repair, with backoff from 50 ms doubling to at most 2 s (~30 s).
const REPAIR_ATTEMPTS: u32 = 20;

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

    /// Applies a guarded fix now; when that fails, keeps retrying it in the background.
    pub(super) async fn fix_or_repair(&self, fix: Fix) -> StoreResult<()> {
        match self.apply_fix(&fix).await {
            Ok(()) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, rsv = %fix.rsv, "ledger fix failed; retrying in background");
                self.spawn_repair("fix", move |link| async move { link.retry_fix(fix).await });
                Err(e)
            }
        }
    }

    async fn apply_fix(&self, fix: &Fix) -> StoreResult<()> {
        let (count,): (i64,) = self.pipe(&fix.pipeline()).await?;
        if count > 1 {
            tracing::error!(rsv = %fix.rsv, marker = fix.marker, count,
                "ledger fix applied more than once (an earlier attempt landed late)");
        }
        Ok(())
    }

    async fn retry_fix(self, fix: Fix) {
        for attempt in 0..REPAIR_ATTEMPTS {
            tokio::time::sleep(backoff(attempt)).await;
            // An attempt whose answer was lost may have landed: the marker says so.
            let marker: StoreResult<Option<i64>> = self
                .cmd(redis::cmd("HGET").arg(&fix.rsv).arg(fix.marker))
                .await;
            match marker {
                Ok(Some(_)) => return,
                Ok(None) => {
                    if self.apply_fix(&fix).await.is_ok() {
                        return;
                    }
                }
                Err(_) => {}
            }
        }
        tracing::error!(rsv = %fix.rsv, marker = fix.marker, "ledger fix abandoned after retries");
    }

    /// Retries an idempotent transaction (applying it twice changes nothing) in the background.
    pub(super) fn retry_idempotent(&self, what: &'static str, p: Pipeline) {
        self.spawn_repair(what, move |link| async move {
            for attempt in 0..REPAIR_ATTEMPTS {
                tokio::time::sleep(backoff(attempt)).await;
                if link.pipe::<()>(&p).await.is_ok() {
                    return;
                }
            }
            tracing::error!(what, "idempotent ledger repair abandoned after retries");
        });
    }

    /// Gives back a reservation whose outcome is unknown, in the background.
    pub(super) fn void_unknown(&self, account_id: &str, reservation_id: &str, amount: u64) {
        let account_id = account_id.to_string();
        let reservation_id = reservation_id.to_string();
        self.spawn_repair("void", move |link| async move {
            for attempt in 0..REPAIR_ATTEMPTS {
                tokio::time::sleep(backoff(attempt)).await;
                if link
                    .settle(&account_id, &reservation_id, amount)
                    .await
                    .is_ok()
                {
                    return;
                }
            }
            tracing::error!(rsv = %reservation_id, "unknown reservation outcome not voided");
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

/// A guarded second step: the money change plus `HINCRBY rsv <marker> 1` in one transaction.
pub(super) struct Fix {
    pub(super) rsv: String,
    pub(super) marker: &'static str,
    pub(super) adjust: Adjust,
    pub(super) fields: Vec<(&'static str, String)>,
    pub(super) rsv_ttl_ms: Option<i64>,
    pub(super) xdel: Option<String>,
}

impl Fix {
    /// Answers one value: the marker count after this application.
    fn pipeline(&self) -> Pipeline {
        let mut p = redis::pipe();
        p.atomic();
        match &self.adjust {
            Adjust::Credits {
                bal,
                amount,
                expires_at_ms,
            } => {
                p.cmd("INCRBY").arg(bal).arg(int(*amount)).ignore();
                if let Some(exp) = expires_at_ms {
                    p.cmd("PEXPIREAT").arg(bal).arg(*exp).ignore();
                }
            }
            Adjust::Spend { spend, amount } => {
                p.cmd("DECRBY").arg(spend).arg(int(*amount)).ignore();
                p.cmd("PEXPIRE")
                    .arg(spend)
                    .arg(schema::SPEND_TTL_MS)
                    .ignore();
            }
        }
        p.cmd("HINCRBY").arg(&self.rsv).arg(self.marker).arg(1);
        if !self.fields.is_empty() {
            p.cmd("HSET").arg(&self.rsv).arg(&self.fields).ignore();
        }
        if let Some(ttl) = self.rsv_ttl_ms {
            p.cmd("PEXPIRE").arg(&self.rsv).arg(ttl).ignore();
        }
        if let Some(id) = &self.xdel {
            p.cmd("XDEL").arg(schema::OUTBOX).arg(id).ignore();
        }
        p
    }
}
