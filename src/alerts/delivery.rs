//! The alert delivery worker: decides when an alert in the outbox (`cg:alerts`) is POSTed to
//! the operator's receiver, and when it leaves the stream. Started by `crate::server` when
//! `[alerts] enabled`; the shape is the Stripe reporter's (`crate::stripe::outbox`), smaller.
//!
//! Every instance runs one worker in the consumer group `alerts` (`XGROUP CREATE … 0
//! MKSTREAM`): `XREADGROUP >` hands each new entry to one of them, its own pending entries are
//! read back at start, and `XAUTOCLAIM` takes over entries pending longer than `claim_idle` (a
//! dead instance's). Before each attempt the worker proves it still owns the entry: touched less
//! than `claim_idle / 2` ago, it refreshes its claim (`XCLAIM … 0 … JUSTID`); otherwise it
//! re-claims only if the entry is still idle, and forgets it when that fails. The config
//! requires `claim_idle ≥ 2 · (backoff_max + request_timeout)`, so a live worker always
//! refreshes in time.
//!
//! One entry: the claim `cg:{a:<id>}:alert:<period>:<p>` decides. Holding this entry's token
//! (or gone: it outlived its period) → POST; holding another token or `delivered:<token>` → a
//! repeat, acknowledged without a POST (`duplicate`). A 2xx answer → in one `MULTI`: the claim
//! becomes `delivered:<token>` (`XX KEEPTTL`), `XACK`, `XDEL` (`delivered`). Anything else (a
//! non-2xx, refused connection, timeout) → the worker pauses with exponential backoff and full
//! jitter (`backoff_min` … `backoff_max`) and tries the same entry again; it stays pending,
//! nothing is lost (`retried`). Entries are sent one at a time, in stream order.
//!
//! On a Redis Cluster each account's alerts go to its lane's stream (`cg:{<lane>}:alerts`, in
//! the account's slot, so the claim and the entry stay one `MULTI`; see
//! [`lane`](crate::ledger::lane)): the worker walks the lanes in use and treats each stream as
//! the one above, polling without `BLOCK` (one connection serves every lane).
//!
//! A receiver sees an alert at least once: a crash between its 2xx and the `XACK` sends it
//! again after the take-over, with the same `id`, which is the receiver's de-duplication key.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, USER_AGENT};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rand::Rng;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::RedisError;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{metrics, Alert, AlertsConfig};
use crate::clock::SharedClock;
use crate::ledger::lane::Lane;
use crate::ledger::{schema, StoreConn, StoreNodes};

/// The header carrying the signature: `t=<unix seconds>,v1=<hex HMAC-SHA256>`.
pub const SIGNATURE_HEADER: &str = "Creditgate-Signature";
/// Longest pause after a store error.
const MAX_STORE_PAUSE: Duration = Duration::from_secs(5);

/// Knobs of the worker (from `[alerts]`; tests shorten them).
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    pub consumer: String,
    pub claim_idle: Duration,
    pub claim_every: Duration,
    pub batch: usize,
    pub block: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub request_timeout: Duration,
    pub command_timeout: Duration,
    pub gauges_every: Duration,
}

impl DeliverySettings {
    pub fn from_config(config: &AlertsConfig) -> Self {
        let claim_idle = Duration::from_millis(config.claim_idle_ms);
        Self {
            consumer: crate::stripe::outbox::default_consumer_name(),
            claim_idle,
            claim_every: (claim_idle / 6).max(Duration::from_millis(100)),
            batch: 64,
            block: Duration::from_secs(1),
            backoff_min: Duration::from_millis(config.backoff_min_ms),
            backoff_max: Duration::from_millis(config.backoff_max_ms),
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            command_timeout: Duration::from_secs(2),
            gauges_every: Duration::from_secs(2),
        }
    }
}

/// The background worker that POSTs alerts.
pub struct AlertDelivery {
    nodes: StoreNodes,
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    url: http::Uri,
    secret: String,
    clock: SharedClock,
    settings: DeliverySettings,
}

impl std::fmt::Debug for AlertDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertDelivery")
            .field("url", &self.url)
            .field("consumer", &self.settings.consumer)
            .finish_non_exhaustive()
    }
}

/// Why one POST did not count as delivered.
#[derive(Debug, thiserror::Error)]
enum SendError {
    #[error("receiver answered {0}")]
    Status(u16),
    #[error("could not reach the receiver: {0}")]
    Network(String),
    #[error("the receiver did not answer in time")]
    Timeout,
    #[error("cannot sign or build the request: {0}")]
    Build(String),
}

impl AlertDelivery {
    /// A worker for the outbox at `redis_url`, POSTing to `config.url`, signing with `secret`.
    pub fn new(
        redis_url: &str,
        config: &AlertsConfig,
        secret: &str,
        clock: SharedClock,
    ) -> Result<Self, String> {
        Self::for_store(StoreNodes::new(redis_url, false), config, secret, clock)
    }

    /// [`AlertDelivery::new`] for a store given by its nodes (one, or a cluster's seeds).
    pub fn for_store(
        nodes: StoreNodes,
        config: &AlertsConfig,
        secret: &str,
        clock: SharedClock,
    ) -> Result<Self, String> {
        if secret.is_empty() {
            return Err("the alert signing secret is empty".into());
        }
        nodes.validate().map_err(|e| e.to_string())?;
        let url: http::Uri = config
            .url
            .parse()
            .map_err(|e| format!("alerts.url {:?}: {e}", config.url))?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| format!("TLS setup: {e}"))?
            .https_or_http()
            .enable_http1()
            .build();
        let http = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        metrics::register();
        Ok(Self {
            nodes,
            http,
            url,
            secret: secret.to_string(),
            clock,
            settings: DeliverySettings::from_config(config),
        })
    }

    /// Runs until `shutdown` turns true. Entries in flight stay pending for the next worker.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        let s = &self.settings;
        let Some(conn) = self
            .nodes
            .connect_until_stopped(
                s.command_timeout,
                MAX_STORE_PAUSE,
                &mut shutdown,
                "alert delivery",
            )
            .await
        else {
            return;
        };
        tracing::info!(consumer = %s.consumer, url = %self.url, "alert delivery started");
        let mut w = Worker {
            d: self,
            conn,
            held: VecDeque::new(),
            failures: 0,
            store_failures: 0,
            lanes: Vec::new(),
            groups: std::collections::HashSet::new(),
            next_claim: Instant::now(),
            next_gauges: Instant::now(),
        };
        loop {
            if *shutdown.borrow() {
                break;
            }
            let step = tokio::select! {
                step = w.step() => step,
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                    continue;
                }
            };
            let pause = match step {
                Ok(pause) => {
                    w.store_failures = 0;
                    pause
                }
                Err(e) => {
                    if e.code() == Some("NOGROUP") {
                        w.groups.clear();
                    }
                    w.store_failures = w.store_failures.saturating_add(1);
                    let pause = self.backoff(w.store_failures).min(MAX_STORE_PAUSE);
                    tracing::warn!(error = %e, "alert delivery: store error; alerts stay in the outbox");
                    Some(pause)
                }
            };
            if let Some(pause) = pause {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    changed = shutdown.changed() => {
                        if changed.is_err() || *shutdown.borrow() {
                            break;
                        }
                    }
                }
            }
        }
        tracing::info!(consumer = %s.consumer, "alert delivery stopped");
    }

    /// Exponential backoff with full jitter: uniformly in [d/2, d], d = min · 2^(n−1) ≤ max.
    fn backoff(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(20);
        let d = self
            .settings
            .backoff_min
            .saturating_mul(1u32 << exp)
            .min(self.settings.backoff_max);
        let half = d / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(rand::rng().random_range(0..=jitter_ms))
    }

    /// One signed POST of `alert`; `Ok` on a 2xx answer.
    async fn send(&self, alert: &Alert) -> Result<(), SendError> {
        let body =
            serde_json::to_vec(&alert.body()).map_err(|e| SendError::Build(e.to_string()))?;
        let t = self.clock.now_ms().div_euclid(1000);
        let signature = crate::stripe::signature::sign_header(&self.secret, t, &body)
            .map_err(|e| SendError::Build(e.to_string()))?;
        let request = http::Request::builder()
            .method(http::Method::POST)
            .uri(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(
                USER_AGENT,
                concat!("creditgate/", env!("CARGO_PKG_VERSION")),
            )
            .header(SIGNATURE_HEADER, signature)
            .header("Creditgate-Alert-Id", alert.id.as_str())
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| SendError::Build(e.to_string()))?;
        let timeout = self.settings.request_timeout;
        let deadline = Instant::now() + timeout;
        let response = tokio::time::timeout_at(deadline, self.http.request(request))
            .await
            .map_err(|_| SendError::Timeout)?
            .map_err(|e| SendError::Network(e.to_string()))?;
        let status = response.status();
        // Read the (small) answer so the connection can be reused; its content does not matter.
        let _ = tokio::time::timeout_at(deadline, response.into_body().collect()).await;
        if status.is_success() {
            Ok(())
        } else {
            Err(SendError::Status(status.as_u16()))
        }
    }
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for AlertDelivery {
    async fn start(&self, shutdown: pingora::server::ShutdownWatch) {
        self.run(shutdown).await;
    }
}

/// An entry this worker owns (in its pending list) and has not finished.
struct Held {
    /// The lane whose stream holds it.
    lane: Lane,
    id: String,
    fields: HashMap<String, String>,
    touched: Instant,
}

struct Worker<'a> {
    d: &'a AlertDelivery,
    conn: StoreConn,
    held: VecDeque<Held>,
    failures: u32,
    store_failures: u32,
    /// The lanes walked (read again every step).
    lanes: Vec<Lane>,
    /// Lanes whose consumer group exists and whose own pending entries were read back.
    groups: std::collections::HashSet<Lane>,
    next_claim: Instant,
    next_gauges: Instant,
}

impl Worker<'_> {
    /// One step; answers how long to pause before the next (after a failed POST).
    async fn step(&mut self) -> Result<Option<Duration>, RedisError> {
        let s = &self.d.settings;
        self.lanes = self.conn.lanes().await?;
        for lane in self.lanes.clone() {
            if !self.groups.contains(&lane) {
                self.create_group(lane).await?;
                // Our own entries from before a restart with the same name (none otherwise).
                self.read(lane, ">", false).await?;
                self.read(lane, "0", false).await?;
                self.groups.insert(lane);
            }
        }
        let now = Instant::now();
        if now >= self.next_gauges {
            let mut len = 0u64;
            for lane in self.lanes.clone() {
                let n: u64 = redis::cmd("XLEN")
                    .arg(lane.alerts())
                    .query_async(&mut self.conn)
                    .await?;
                len = len.saturating_add(n);
            }
            metrics::set_backlog(len);
            self.next_gauges = now + s.gauges_every;
        }
        if now >= self.next_claim {
            for lane in self.lanes.clone() {
                self.claim_stale(lane).await?;
            }
            self.next_claim = now + s.claim_every;
        }
        if self.held.is_empty() {
            if !self.conn.is_cluster() {
                self.read(Lane::SINGLE, ">", true).await?;
                return Ok(None);
            }
            // One connection serves every lane: poll them, never block on one.
            for lane in self.lanes.clone() {
                self.read(lane, ">", false).await?;
            }
            return Ok(self.held.is_empty().then_some(s.block));
        }
        self.attempt_front().await
    }

    async fn attempt_front(&mut self) -> Result<Option<Duration>, RedisError> {
        let s = &self.d.settings;
        let Some(front) = self.held.front() else {
            return Ok(None);
        };
        let id = front.id.clone();
        let lane = front.lane;
        let fresh = front.touched.elapsed() < s.claim_idle / 2;
        let min_idle = if fresh {
            0
        } else {
            u64::try_from(s.claim_idle.as_millis()).unwrap_or(u64::MAX)
        };
        let owned: Vec<String> = redis::cmd("XCLAIM")
            .arg(lane.alerts())
            .arg(schema::ALERTS_GROUP)
            .arg(&s.consumer)
            .arg(min_idle)
            .arg(&id)
            .arg("JUSTID")
            .query_async(&mut self.conn)
            .await?;
        if owned.is_empty() {
            // Finished or taken over by another worker.
            self.held.pop_front();
            return Ok(None);
        }
        let fields = match self.held.front_mut() {
            Some(h) => {
                h.touched = Instant::now();
                h.fields.clone()
            }
            None => return Ok(None),
        };
        let Some(alert) = Alert::from_fields(&fields) else {
            tracing::error!(entry = %id, "alert outbox entry unreadable; dropped");
            self.finish(lane, &id, None).await?;
            metrics::count("duplicate");
            return Ok(None);
        };
        let claim = schema::alert_claim(&alert.account, &alert.period, alert.threshold);
        let holder: Option<String> = redis::cmd("GET")
            .arg(&claim)
            .query_async(&mut self.conn)
            .await?;
        if holder.as_deref().is_some_and(|h| h != alert.id) {
            self.finish(lane, &id, None).await?;
            metrics::count("duplicate");
            return Ok(None);
        }
        match self.d.send(&alert).await {
            Ok(()) => {
                self.failures = 0;
                self.finish(lane, &id, Some((&claim, &alert.id))).await?;
                metrics::count("delivered");
                tracing::info!(account = %alert.account, threshold = alert.threshold,
                    kind = alert.kind.as_str(), "low-balance alert delivered");
                Ok(None)
            }
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                metrics::count("retried");
                let pause = self.d.backoff(self.failures);
                tracing::warn!(error = %e, pause_ms = pause.as_millis() as u64,
                    "alert delivery failed; will retry");
                Ok(Some(pause))
            }
        }
    }

    /// Acknowledges and removes the entry; after a delivery also marks the claim delivered.
    async fn finish(
        &mut self,
        lane: Lane,
        id: &str,
        delivered: Option<(&str, &str)>,
    ) -> Result<(), RedisError> {
        let mut p = redis::pipe();
        p.atomic();
        if let Some((claim, token)) = delivered {
            p.cmd("SET")
                .arg(claim)
                .arg(format!("delivered:{token}"))
                .arg("XX")
                .arg("KEEPTTL")
                .ignore();
        }
        p.cmd("XACK")
            .arg(lane.alerts())
            .arg(schema::ALERTS_GROUP)
            .arg(id)
            .ignore();
        p.cmd("XDEL").arg(lane.alerts()).arg(id).ignore();
        let () = p.query_async(&mut self.conn).await?;
        self.held.pop_front();
        Ok(())
    }

    async fn create_group(&mut self, lane: Lane) -> Result<(), RedisError> {
        let created: Result<(), RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(lane.alerts())
            .arg(schema::ALERTS_GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn)
            .await;
        match created {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `XREADGROUP` from `start` (`>` new entries, `0` our own pending ones).
    async fn read(&mut self, lane: Lane, start: &str, block: bool) -> Result<(), RedisError> {
        let s = &self.d.settings;
        let mut c = redis::cmd("XREADGROUP");
        c.arg("GROUP")
            .arg(schema::ALERTS_GROUP)
            .arg(&s.consumer)
            .arg("COUNT")
            .arg(s.batch);
        if block {
            c.arg("BLOCK")
                .arg(u64::try_from(s.block.as_millis()).unwrap_or(1000));
        }
        c.arg("STREAMS").arg(lane.alerts()).arg(start);
        let reply: Option<StreamReadReply> = c.query_async(&mut self.conn).await?;
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                self.hold(lane, entry);
            }
        }
        Ok(())
    }

    /// `XAUTOCLAIM` of entries pending longer than `claim_idle` (a dead instance's).
    async fn claim_stale(&mut self, lane: Lane) -> Result<(), RedisError> {
        let s = &self.d.settings;
        let idle_ms = u64::try_from(s.claim_idle.as_millis()).unwrap_or(u64::MAX);
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(lane.alerts())
            .arg(schema::ALERTS_GROUP)
            .arg(&s.consumer)
            .arg(idle_ms)
            .arg("0-0")
            .arg("COUNT")
            .arg(s.batch)
            .query_async(&mut self.conn)
            .await?;
        for entry in reply.claimed {
            self.hold(lane, entry);
        }
        Ok(())
    }

    fn hold(&mut self, lane: Lane, entry: StreamId) {
        if let Some(h) = self
            .held
            .iter_mut()
            .find(|h| h.id == entry.id && h.lane == lane)
        {
            h.touched = Instant::now();
            return;
        }
        let fields = entry
            .map
            .iter()
            .filter_map(|(k, v)| {
                redis::from_redis_value::<String>(v.clone())
                    .ok()
                    .map(|v| (k.clone(), v))
            })
            .collect();
        self.held.push_back(Held {
            lane,
            id: entry.id,
            fields,
            touched: Instant::now(),
        });
    }
}
