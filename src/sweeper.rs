//! The sweeper: a background service on every instance that settles holds whose lease ended
//! with no settlement — their gateway was killed mid-request, or lost the store between the
//! reservation and its outcome — by `billing.orphan_policy` (`refund`, the default: the client
//! got no result the gateway saw; or `keep`), and finishes refunds that were claimed but not
//! applied (a crash between claim and refund). Every `billing.sweep_interval_ms` it asks the
//! ledger to sweep ([`Ledger::sweep`](crate::ledger::Ledger::sweep)); instances sweep
//! concurrently and safely, since every hold is settled through the same exactly-once claim as
//! the request's own settlement. Each orphan is logged by the ledger and counted here
//! (`creditgate_orphans_total{policy}`).
//!
//! A hold's lease is `upstream.connect_timeout_ms + upstream.read_timeout_ms +
//! billing.lease_grace_ms` from its reservation. Holds are listed by the 10 s lease slot their
//! lease ends in, and a slot is swept 1 s after it ends, so an orphan is settled at most
//! lease + 10 s + 1 s + one interval after it was made; a refund claimed by a settler that
//! died is finished once the claim is 30 s old (and the lease is over).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::gateway::Gateway;
use crate::ledger::SweepReport;
use crate::metrics;

/// Holds settled per ledger call; a sweep repeats calls while they come back full.
const BATCH: usize = 500;

pub struct Sweeper {
    pub gw: Arc<Gateway>,
}

impl Sweeper {
    /// One sweep: everything due now, in batches.
    pub async fn sweep_once(&self) -> Result<SweepReport, crate::ledger::StoreError> {
        let policy = self.gw.config.billing.orphan_policy;
        let mut total = SweepReport::default();
        loop {
            let report = self
                .gw
                .ledger
                .sweep(self.gw.now_ms(), policy, BATCH)
                .await?;
            metrics::inc(&metrics::ORPHANS, &[policy.as_str()], report.orphans);
            metrics::inc(
                &metrics::SWEEPS,
                &["finished_refund"],
                report.refunds_finished,
            );
            total.checked += report.checked;
            total.orphans += report.orphans;
            total.refunds_finished += report.refunds_finished;
            if report.checked < BATCH as u64 {
                return Ok(total);
            }
        }
    }
}

#[async_trait]
impl BackgroundService for Sweeper {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let every = Duration::from_millis(self.gw.config.billing.sweep_interval_ms);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(every) => {}
            }
            match self.sweep_once().await {
                Ok(report) => {
                    metrics::inc(&metrics::SWEEPS, &["ok"], 1);
                    if report.orphans > 0 || report.refunds_finished > 0 {
                        tracing::info!(
                            orphans = report.orphans,
                            refunds_finished = report.refunds_finished,
                            checked = report.checked,
                            "sweep"
                        );
                    }
                }
                Err(e) => {
                    metrics::inc(&metrics::SWEEPS, &["error"], 1);
                    tracing::warn!(error = %e, "sweep failed; retried next interval");
                }
            }
        }
    }
}
