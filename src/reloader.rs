//! Keeps the live catalog current: re-reads the rules directory on SIGHUP and, when
//! `rules.watch` is on, when any rules file changes. Changes are found by polling the files'
//! modification time and size every 500 ms — it sees editors that write by rename as well as
//! in-place writes, costs four `stat`s, and needs no platform watcher. A bad catalog is refused
//! whole (logged, counted); the old one keeps serving. Also runs the rate limiter's janitor.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::gateway::Gateway;
use crate::metrics;
use crate::rules::{RuleProblem, RULE_FILES};

const POLL: Duration = Duration::from_millis(500);
const JANITOR_EVERY: u32 = 120; // polls, i.e. once a minute

pub struct Reloader {
    pub gw: Arc<Gateway>,
}

/// Modification time and length of each rules file (`None` where missing).
fn files_signature(dir: &Path) -> Vec<Option<(SystemTime, u64)>> {
    RULE_FILES
        .iter()
        .map(|name| {
            std::fs::metadata(dir.join(name))
                .ok()
                .and_then(|m| m.modified().ok().map(|t| (t, m.len())))
        })
        .collect()
}

/// Reloads now and records the outcome (log, metrics, live version); every trigger — file,
/// SIGHUP, admin call — goes through here.
pub fn reload(gw: &Gateway, trigger: &str) -> Result<u64, Vec<RuleProblem>> {
    let result = gw.catalog.reload();
    match &result {
        Ok(version) => {
            metrics::set_catalog_version(*version);
            metrics::inc(&metrics::CATALOG_RELOADS, &[trigger, "ok"], 1);
            tracing::info!(trigger, version, "catalog loaded");
        }
        Err(problems) => {
            metrics::inc(&metrics::CATALOG_RELOADS, &[trigger, "error"], 1);
            for p in problems {
                tracing::warn!(trigger, problem = %p, "catalog reload refused; the old catalog keeps serving");
            }
        }
    }
    result
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let dir = self.gw.catalog.dir().to_path_buf();
        let mut seen = files_signature(&dir);
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP");
                None
            }
        };
        if let Some(redis) = &self.gw.redis {
            match redis.server_settings().await {
                Ok((aof, policy)) if aof != "yes" || policy != "noeviction" => tracing::warn!(
                    appendonly = %aof,
                    maxmemory_policy = %policy,
                    "Redis is not fit for money: set appendonly yes and maxmemory-policy noeviction; /readyz reports not ready"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read Redis settings at start"),
            }
        }
        let mut polls: u32 = 0;
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                Some(()) = async {
                    match hangup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let _ = reload(&self.gw, "sighup");
                    seen = files_signature(&dir);
                }
                _ = tokio::time::sleep(POLL) => {
                    polls = polls.wrapping_add(1);
                    if polls.is_multiple_of(JANITOR_EVERY) {
                        self.gw.rate_limits.retain_recent();
                    }
                    if self.gw.config.rules.watch {
                        let now = files_signature(&dir);
                        if now != seen {
                            seen = now;
                            let _ = reload(&self.gw, "file");
                        }
                    }
                }
            }
        }
    }
}
