//! Writes a crossed threshold to the alert outbox, once per account, threshold and period,
//! crash-safe and off the request's critical path. Called by [`super::notice`] (which spawns it
//! after the reservation answered); read by [`super::delivery`].
//!
//! One `MULTI/EXEC` holds both writes: `SET cg:{a:<id>}:alert:<period>:<p> <token> NX` (the
//! claim; it lives as long as the period can still be spent in) and `XADD <lane>alerts * …
//! token <token>`. Either both happen or neither, so a crash can neither lose a claimed alert
//! nor leave an entry without its claim. `XADD` runs whatever `SET NX` answered: a second
//! crossing in the same period (a refund lifted the balance back over the threshold, another
//! instance saw it too) leaves an entry whose token is not the claim's, and the delivery worker
//! drops it. A retried transaction whose first answer was lost repeats the same token; the
//! worker marks the claim delivered after the first send, so the repeat is dropped too.

use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use tokio::sync::{OnceCell, Semaphore};

use super::{metrics, Alert};
use crate::ledger::lane::Lane;
use crate::ledger::{schema, StoreConn, StoreNodes};

/// Alert writes waiting at once at most; more are dropped (counted `record_failed`).
const MAX_PENDING: usize = 1024;
/// Attempts of one write when the store fails.
const ATTEMPTS: u32 = 5;

/// The writer of the alert outbox. Cheap to share.
pub struct AlertOutbox {
    nodes: StoreNodes,
    /// Made on first use (inside the runtime; the writer is built before it runs).
    conn: OnceCell<StoreConn>,
    timeout: Duration,
    pending: Arc<Semaphore>,
}

impl std::fmt::Debug for AlertOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertOutbox")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl AlertOutbox {
    /// A writer to the Redis at `url`; connects on first use.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, String> {
        Self::for_store(StoreNodes::new(url, false), timeout)
    }

    /// [`AlertOutbox::new`] for a store given by its nodes (one, or a cluster's seeds).
    pub fn for_store(nodes: StoreNodes, timeout: Duration) -> Result<Self, String> {
        nodes.validate().map_err(|e| e.to_string())?;
        metrics::register();
        Ok(Self {
            nodes,
            conn: OnceCell::new(),
            timeout,
            pending: Arc::new(Semaphore::new(MAX_PENDING)),
        })
    }

    /// Writes `alerts` in the background (the caller does not wait).
    pub fn submit(self: &Arc<Self>, alerts: Vec<Alert>) {
        let Ok(permit) = self.pending.clone().try_acquire_owned() else {
            for _ in &alerts {
                metrics::count("record_failed");
            }
            tracing::warn!("alert outbox: too many writes pending; alerts dropped");
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            for alert in alerts {
                me.record_with_retries(&alert).await;
            }
            drop(permit);
        });
    }

    async fn record_with_retries(&self, alert: &Alert) {
        let mut pause = Duration::from_millis(100);
        for attempt in 1..=ATTEMPTS {
            match self.record(alert).await {
                Ok(claimed) => {
                    if claimed {
                        metrics::count("recorded");
                    }
                    return;
                }
                Err(e) if attempt == ATTEMPTS => {
                    metrics::count("record_failed");
                    tracing::error!(account = %alert.account, threshold = alert.threshold,
                        error = %e, "alert outbox: could not record the alert");
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "alert outbox: write failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = pause.saturating_mul(2);
                }
            }
        }
    }

    /// The claim and the entry in one transaction; answers whether this call won the claim.
    pub async fn record(&self, alert: &Alert) -> Result<bool, String> {
        let claim = schema::alert_claim(&alert.account, &alert.period, alert.threshold);
        let mut p = redis::pipe();
        p.atomic();
        let set = p.cmd("SET").arg(&claim).arg(&alert.id).arg("NX");
        if let Some(until) = alert.claim_until_ms {
            set.arg("PXAT").arg(until);
        }
        // The account's lane: the claim's slot on a cluster, `cg:alerts` on a single node.
        p.cmd("XADD")
            .arg(Lane::of_account(self.nodes.is_cluster(), &alert.account).alerts())
            .arg("*")
            .arg(alert.fields());
        let mut conn = self
            .conn
            .get_or_try_init(|| async {
                tokio::time::timeout(self.timeout * 5, self.nodes.connect(self.timeout))
                    .await
                    .map_err(|_| "store connection timed out".to_string())?
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())?
            .clone();
        let replies: Vec<Value> = tokio::time::timeout(self.timeout, p.query_async(&mut conn))
            .await
            .map_err(|_| "store command timed out".to_string())?
            .map_err(|e| e.to_string())?;
        Ok(matches!(replies.first(), Some(Value::Okay))
            || matches!(replies.first(), Some(Value::SimpleString(s)) if s == "OK"))
    }
}
