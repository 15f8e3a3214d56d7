//! The Redis the ledger (and the Stripe outbox and alert workers) talk to: one node through a
//! reconnecting [`ConnectionManager`], or a Redis Cluster through redis-rs's cluster client,
//! behind one [`StoreConn`] that every caller uses the same way.
//!
//! The cluster client is built with `retries(0)`: it never re-sends anything by itself, since a
//! `MULTI/EXEC` whose answer was lost may have run, and sending it again would charge twice.
//! It still refreshes its slot map when a node answers `MOVED`; the errors that prove a command
//! did not run (`MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`, …) are retried by the ledger itself
//! ([`retry`](super::retry)). Its connection tasks run on a small runtime of their own, so they
//! outlive whichever runtime first used the ledger (a startup check, a test's runtime).

use std::sync::OnceLock;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

use crate::config::StoreConfig;
use crate::ledger::lane::{Lane, LANES};

/// Where the store is: one node's URL, or a cluster's seed nodes.
#[derive(Debug, Clone)]
pub struct StoreNodes {
    urls: Vec<String>,
    cluster: bool,
}

impl StoreNodes {
    /// `store.url` (a comma-separated seed list when `store.cluster`) and `store.cluster`.
    pub fn from_config(store: &StoreConfig) -> Self {
        Self::new(&store.url, store.cluster)
    }

    pub fn new(url: &str, cluster: bool) -> Self {
        let urls = match cluster {
            true => url
                .split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(String::from)
                .collect(),
            false => vec![url.trim().to_string()],
        };
        Self { urls, cluster }
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The URLs: one, or the seed nodes.
    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Checks the URLs without connecting.
    pub fn validate(&self) -> Result<(), RedisError> {
        if self.cluster {
            ClusterClient::new(self.urls.clone()).map(|_| ())
        } else {
            redis::Client::open(self.urls.first().map_or("", String::as_str)).map(|_| ())
        }
    }

    /// A connection. One node: made lazily, reconnecting by itself. A cluster: connects to a
    /// seed now and learns the slot map.
    pub async fn connect(&self, timeout: Duration) -> Result<StoreConn, RedisError> {
        if !self.cluster {
            let client = redis::Client::open(self.urls.first().map_or("", String::as_str))?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                // Every call is timed by its caller; a second timer per call costs a wake-up of
                // the runtime's driver.
                .set_response_timeout(None)
                .set_min_delay(Duration::from_millis(50))
                .set_max_delay(Duration::from_millis(500))
                .set_number_of_retries(6);
            return Ok(StoreConn::Single(ConnectionManager::new_lazy_with_config(
                client, config,
            )?));
        }
        let client = ClusterClient::builder(self.urls.clone())
            .retries(0)
            .connection_timeout(timeout)
            .response_timeout(timeout.max(Duration::from_secs(1)))
            .build()?;
        let connecting =
            cluster_runtime().spawn(async move { client.get_async_connection().await });
        match connecting.await {
            Ok(conn) => conn.map(StoreConn::Cluster),
            Err(e) => Err(RedisError::from(std::io::Error::other(e.to_string()))),
        }
    }
}

impl StoreNodes {
    /// [`StoreNodes::connect`] for a background worker: tried again every `pause` until it
    /// succeeds (each failure logged, naming `worker`); `None` once `shutdown` turns true or its
    /// sender is gone.
    pub async fn connect_until_stopped(
        &self,
        timeout: Duration,
        pause: Duration,
        shutdown: &mut tokio::sync::watch::Receiver<bool>,
        worker: &str,
    ) -> Option<StoreConn> {
        loop {
            match self.connect(timeout).await {
                Ok(conn) => return Some(conn),
                Err(e) => {
                    tracing::warn!(error = %e, worker, "cannot reach the store yet");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        changed = shutdown.changed() => {
                            if changed.is_err() || *shutdown.borrow() {
                                return None;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The runtime that hosts the cluster client's connection tasks (one thread, for the process).
fn cluster_runtime() -> &'static tokio::runtime::Handle {
    static RUNTIME: OnceLock<tokio::runtime::Handle> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("creditgate-redis-cluster".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start the Redis Cluster runtime");
                        return;
                    }
                };
                let _ = tx.send(runtime.handle().clone());
                runtime.block_on(std::future::pending::<()>());
            })
            .ok();
        match rx.recv() {
            Ok(handle) => handle,
            // No thread: fall back to the caller's runtime (its tasks then end with it).
            Err(_) => tokio::runtime::Handle::current(),
        }
    })
}

/// A connection to one node or to a cluster; cheap to clone (both multiplex).
#[derive(Clone)]
pub enum StoreConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl StoreConn {
    pub fn is_cluster(&self) -> bool {
        matches!(self, StoreConn::Cluster(_))
    }

    /// `WAIT replicas timeout_ms` on the connection the last writes of `key`'s slot went to:
    /// how many replicas acknowledged them. Sent as one pipeline `EXISTS key; WAIT …`, routed by
    /// the key: should the cluster client fall back to another node (the slot's master not
    /// connected yet after a failover), `EXISTS` answers `MOVED` there and the whole call is an
    /// error, never a `WAIT` of a node that saw none of the writes (which answers at once).
    pub async fn wait_replicas(
        &mut self,
        key: &[u8],
        replicas: u8,
        timeout_ms: u64,
    ) -> Result<i64, RedisError> {
        let mut p = redis::pipe();
        p.cmd("EXISTS").arg(key).ignore();
        p.cmd("WAIT").arg(replicas).arg(timeout_ms);
        let (acked,): (i64,) = p.query_async(self).await?;
        Ok(acked)
    }

    /// The lanes whose work lists the walkers (sweeper, Stripe outbox) read: the single node's,
    /// or on a cluster those of the slots of every account created (`cg:lanes`).
    pub async fn lanes(&mut self) -> Result<Vec<Lane>, RedisError> {
        if !self.is_cluster() {
            return Ok(vec![Lane::SINGLE]);
        }
        let slots: Vec<u16> = redis::cmd("SMEMBERS").arg(LANES).query_async(self).await?;
        Ok(slots.into_iter().map(Lane::of_slot).collect())
    }

    /// What is wrong with the cluster, if anything: `cluster_state` other than `ok` on the node
    /// asked. Always `None` on a single node.
    pub async fn cluster_problem(&mut self) -> Result<Option<String>, RedisError> {
        let StoreConn::Cluster(conn) = self else {
            return Ok(None);
        };
        let info: String = redis::cmd("CLUSTER").arg("INFO").query_async(conn).await?;
        let state = info
            .lines()
            .find_map(|l| l.trim().strip_prefix("cluster_state:"))
            .unwrap_or("unknown")
            .to_string();
        Ok((state != "ok").then(|| format!("cluster_state:{state}")))
    }
}

impl ConnectionLike for StoreConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            StoreConn::Single(c) => c.req_packed_command(cmd),
            StoreConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            StoreConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            StoreConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            StoreConn::Single(c) => c.get_db(),
            StoreConn::Cluster(c) => c.get_db(),
        }
    }
}
