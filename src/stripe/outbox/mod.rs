//! The Stripe outbox worker: decides when a pay-per-use charge that the ledger wrote to
//! `cg:outbox` (in the charge's own `MULTI/EXEC`) is reported to Stripe as a billing meter
//! event, with what value, and what happens when Stripe or Redis says no. Nothing leaves the
//! stream except by an acknowledgement that records why. This file is the worker (reading,
//! claiming, sending, acknowledging); what it decides from what it reads is in `decision.rs`,
//! pure and unit-tested.
//!
//! # Lanes
//!
//! On a single Redis node the outbox is the one stream `cg:outbox`. On a Redis Cluster each
//! charge goes to the outbox of its account's lane (`cg:{<lane>}:outbox`, in the charge's slot;
//! see [`lane`](crate::ledger::lane)); the worker walks the lanes in use (`cg:lanes`) and treats
//! each lane's stream, group and dead-letter stream exactly as the one stream below. Reads are
//! then polls without `BLOCK` (one connection serves every lane), every `block` interval.
//!
//! # Many instances, one stream
//!
//! Every gateway instance runs one [`StripeReporter`]. They share the consumer group `stripe`
//! (`XGROUP CREATE … 0 MKSTREAM`, `BUSYGROUP` ignored): `XREADGROUP >` gives each new entry to
//! one of them, and `XAUTOCLAIM` hands entries that stayed pending longer than `claim_idle`
//! (30 s; a crashed or stopped instance's) to a live one. Before each send a worker proves it
//! still owns the entry: if it claimed or refreshed it less than `claim_idle` − margin ago
//! nobody else can have claimed it, so it refreshes the claim (`XCLAIM … 0 … JUSTID`);
//! otherwise it re-claims it only if it is still idle (`XCLAIM … claim_idle …`), and forgets it
//! when that fails. A send is bounded by `request_timeout` (well under `claim_idle`), so no two
//! workers send one entry at the same time. The identifier (the reservation id) makes every
//! other repeat harmless: Stripe answers "already exists", which counts as delivered.
//!
//! # One entry
//!
//! The reservation record decides (`cg:{a:<account>}:rsv:<rid>`):
//! - `state = void` → acknowledged without a report (`skipped_void`);
//! - settled → value × (amount − refunded) / amount is reported; 0 → acknowledged
//!   (`skipped_refunded`). A settled record whose refund is still being applied (`refund_due`
//!   without `refunded`) waits up to the lease, then reports net of `refund_due`;
//! - not settled → checked again later, however old: the request's settlement or, after the
//!   hold's lease, the sweeper settles it (by the orphan policy), so it is reported net of that;
//! - record gone (it outlived its TTL) → the charge stands and the full value is sent.
//!
//! Stripe answers: 2xx or the duplicate-identifier 400 → `XACK` + `XDEL`; 429, 5xx, 401/403
//! (credentials: nothing is wrong with the charge), timeouts and network errors → the worker
//! pauses all sends with exponential backoff and full jitter, at least `Retry-After`, and the
//! entry stays pending; any other 4xx → the entry moves to `cg:outbox:dead` with the error
//! (`XADD` + `XACK` + `XDEL` in one `MULTI`). A failed acknowledgement is retried without
//! sending again. Redis errors pause the worker with backoff; entries stay in the stream.
//! Up to `concurrency` (8) events are sent at once; after a failure one entry probes Stripe
//! before the others follow.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::RedisError;
use stripe_billing::billing_meter_event::CreateBillingMeterEvent;
use tokio::sync::watch;
use tokio::time::Instant;

mod decision;

use self::decision::{
    classify, decide, parse_entry, seq, text, Decision, OutboxEntry, Seq, Verdict,
};
use super::metrics::{self, Finish, ReporterStats};
use super::transport::{StripeCallError, StripeHttp};
use crate::clock::SharedClock;
use crate::config::StripeConfig;
use crate::ledger::lane::Lane;
use crate::ledger::{schema, StoreConn, StoreNodes};

/// Longest pause after a store error (the store is retried sooner than Stripe).
const MAX_STORE_PAUSE: Duration = Duration::from_secs(5);

/// Knobs of the worker; the defaults suit production, tests shorten them.
#[derive(Debug, Clone)]
pub struct ReporterSettings {
    /// This worker's consumer name in the group; unique per process.
    pub consumer: String,
    /// How long after the charge an unsettled reservation is waited for.
    pub lease: Duration,
    /// Entries pending longer than this are taken over from other consumers.
    pub claim_idle: Duration,
    /// How often pending entries of other consumers are looked for.
    pub claim_every: Duration,
    /// Entries read or claimed per command.
    pub batch: usize,
    /// Entries held in memory at most (the rest waits in the stream).
    pub max_held: usize,
    /// Meter events sent at once.
    pub concurrency: usize,
    /// Longest wait for new entries (`XREADGROUP BLOCK`), and the idle poll interval.
    pub block: Duration,
    /// How often an unsettled entry's reservation is read again.
    pub recheck: Duration,
    /// First and largest pause after a retryable failure.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// One Stripe attempt (connect, send, read); kept well under `claim_idle`.
    pub request_timeout: Duration,
    /// One Redis command.
    pub command_timeout: Duration,
    /// How often the backlog gauges are refreshed.
    pub gauges_every: Duration,
}

impl Default for ReporterSettings {
    fn default() -> Self {
        Self {
            consumer: default_consumer_name(),
            lease: Duration::from_secs(10 * 60),
            claim_idle: Duration::from_secs(30),
            claim_every: Duration::from_secs(5),
            batch: 64,
            max_held: 512,
            concurrency: 8,
            block: Duration::from_secs(1),
            recheck: Duration::from_secs(2),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(2),
            gauges_every: Duration::from_secs(5),
        }
    }
}

/// `<host>-<pid>-<random>`: unique per process, readable in `XINFO CONSUMERS`.
pub fn default_consumer_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".to_string());
    let salt: u32 = rand::rng().random();
    format!("{host}-{}-{salt:08x}", std::process::id())
}

/// Why a reporter cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum ReporterError {
    #[error("store url not usable: {0}")]
    Store(String),
    #[error(transparent)]
    Stripe(#[from] StripeCallError),
}

/// The background worker that reports pay-per-use charges to Stripe.
pub struct StripeReporter {
    nodes: StoreNodes,
    http: StripeHttp,
    meter_event_name: String,
    clock: SharedClock,
    settings: ReporterSettings,
    stats: Arc<ReporterStats>,
}

impl std::fmt::Debug for StripeReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeReporter")
            .field("consumer", &self.settings.consumer)
            .field("meter_event_name", &self.meter_event_name)
            .field("http", &self.http)
            .finish_non_exhaustive()
    }
}

impl StripeReporter {
    /// A worker for the outbox at `redis_url`, reporting to `config.api_base` as
    /// `config.meter_event_name` with `secret_key`. Connects when it runs.
    pub fn new(
        redis_url: &str,
        config: &StripeConfig,
        secret_key: &str,
        clock: SharedClock,
    ) -> Result<Self, ReporterError> {
        Self::for_store(StoreNodes::new(redis_url, false), config, secret_key, clock)
    }

    /// [`StripeReporter::new`] for a store given by its nodes (one, or a cluster's seeds).
    pub fn for_store(
        nodes: StoreNodes,
        config: &StripeConfig,
        secret_key: &str,
        clock: SharedClock,
    ) -> Result<Self, ReporterError> {
        let settings = ReporterSettings::default();
        nodes
            .validate()
            .map_err(|e| ReporterError::Store(e.to_string()))?;
        let http = StripeHttp::new(&config.api_base, secret_key, settings.request_timeout)?;
        metrics::register();
        Ok(Self {
            nodes,
            http,
            meter_event_name: config.meter_event_name.clone(),
            clock,
            settings,
            stats: Arc::new(ReporterStats::default()),
        })
    }

    /// Replaces the settings (the request timeout is capped at a third of `claim_idle`).
    pub fn with_settings(mut self, mut settings: ReporterSettings) -> Self {
        settings.request_timeout = settings.request_timeout.min(settings.claim_idle / 3);
        settings.batch = settings.batch.max(1);
        settings.max_held = settings.max_held.max(settings.batch);
        settings.concurrency = settings.concurrency.max(1);
        self.http = self.http.with_timeout(settings.request_timeout);
        self.settings = settings;
        self
    }

    pub fn settings(&self) -> &ReporterSettings {
        &self.settings
    }

    /// This worker's counts, shared: keep the handle to read them while it runs.
    pub fn stats(&self) -> Arc<ReporterStats> {
        self.stats.clone()
    }

    /// Runs until `shutdown` turns true (or its sender is dropped). Entries in flight stay
    /// pending in the stream and are taken over by the next worker.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) {
        let pause = self.settings.backoff_max.min(Duration::from_secs(5));
        let Some(conn) = self
            .nodes
            .connect_until_stopped(
                self.settings.command_timeout,
                pause,
                &mut shutdown,
                "Stripe reporter",
            )
            .await
        else {
            return;
        };
        tracing::info!(consumer = %self.settings.consumer, "Stripe reporter started");
        let mut worker = Worker {
            r: self,
            conn,
            held: BTreeMap::new(),
            paused_until: None,
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
                step = worker.step() => step,
                changed = shutdown.changed() => {
                    if stop_requested(changed, &shutdown) {
                        break;
                    }
                    continue;
                }
            };
            let wake = match step {
                Ok(()) => {
                    worker.store_failures = 0;
                    worker.next_wake()
                }
                Err(e) => {
                    if e.code() == Some("NOGROUP") {
                        worker.groups.clear();
                    }
                    worker.store_failures = worker.store_failures.saturating_add(1);
                    let pause = self.backoff(worker.store_failures).min(MAX_STORE_PAUSE);
                    tracing::warn!(error = %e, pause_ms = pause.as_millis() as u64,
                        "Stripe reporter: store error; entries stay in the outbox");
                    Instant::now() + pause
                }
            };
            if wake > Instant::now() {
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => {}
                    changed = shutdown.changed() => {
                        if stop_requested(changed, &shutdown) {
                            break;
                        }
                    }
                }
            }
        }
        tracing::info!(consumer = %self.settings.consumer, held = worker.held.len(),
            "Stripe reporter stopped");
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
}

/// One `POST /v1/billing/meter_events`: the reservation id is the identifier, the value an
/// integer string, the timestamp the charge's second.
async fn send_meter_event(
    http: &StripeHttp,
    meter_event_name: &str,
    entry: &OutboxEntry,
    value: u64,
) -> Result<(), StripeCallError> {
    let payload = HashMap::from([
        ("stripe_customer_id".to_string(), entry.customer.clone()),
        ("value".to_string(), value.to_string()),
    ]);
    CreateBillingMeterEvent::new(meter_event_name, payload)
        .identifier(entry.rid.as_str())
        .timestamp(entry.ts_ms.div_euclid(1000))
        .send(http)
        .await
        .map(|_| ())
}

/// A shutdown signal: the value turned true, or its sender is gone.
fn stop_requested(
    changed: Result<(), watch::error::RecvError>,
    shutdown: &watch::Receiver<bool>,
) -> bool {
    changed.is_err() || *shutdown.borrow()
}

#[async_trait]
impl pingora::services::background::BackgroundService for StripeReporter {
    async fn start(&self, shutdown: pingora::server::ShutdownWatch) {
        self.run(shutdown).await;
    }
}

/// A held entry: its place in its stream, and the stream's lane.
type Key = (Seq, Lane);

/// An entry this worker owns (in its pending list) and has not finished.
struct Held {
    /// The lane whose stream holds it.
    lane: Lane,
    id: String,
    /// The parsed entry, or why it cannot be parsed (it is dead-lettered).
    entry: Result<OutboxEntry, String>,
    /// Its raw fields, copied to the dead-letter stream if it ends there.
    fields: Vec<(String, String)>,
    /// When this worker last claimed it (taken before the claiming command was sent).
    touched: Instant,
    /// Not looked at again before this.
    not_before: Instant,
    /// A decided outcome whose acknowledgement failed: retry only that.
    finishing: Option<Ending>,
}

/// A send decided for an owned entry.
struct Outgoing {
    key: Key,
    entry: OutboxEntry,
    value: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ending {
    Ack(Finish),
    DeadLetter(String),
}

/// The loop's state; lives as long as one `run`.
struct Worker<'a> {
    r: &'a StripeReporter,
    conn: StoreConn,
    held: BTreeMap<Key, Held>,
    /// No Stripe sends before this (after a retryable failure).
    paused_until: Option<Instant>,
    /// Consecutive retryable Stripe failures.
    failures: u32,
    /// Consecutive store errors.
    store_failures: u32,
    /// The lanes walked (read again every step).
    lanes: Vec<Lane>,
    /// Lanes whose consumer group is known to exist.
    groups: std::collections::HashSet<Lane>,
    next_claim: Instant,
    next_gauges: Instant,
}

impl Worker<'_> {
    fn settings(&self) -> &ReporterSettings {
        &self.r.settings
    }

    async fn step(&mut self) -> Result<(), RedisError> {
        self.lanes = self.conn.lanes().await?;
        for lane in self.lanes.clone() {
            if !self.groups.contains(&lane) {
                self.create_group(lane).await?;
                self.groups.insert(lane);
            }
        }
        let now = Instant::now();
        if now >= self.next_gauges {
            self.next_gauges = now + self.settings().gauges_every;
            self.refresh_gauges().await?;
        }
        if self.held.len() < self.settings().max_held && now >= self.next_claim {
            self.next_claim = now + self.settings().claim_every;
            self.claim_stale().await?;
        }
        if self.held.len() < self.settings().max_held {
            let block = self.held.is_empty().then_some(self.settings().block);
            self.read_new(block).await?;
        }
        self.work().await
    }

    /// When to run the next step: the earliest due entry, at most one poll interval away.
    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let mut wake = now + self.settings().block;
        for h in self.held.values() {
            let due = match (&h.finishing, self.paused_until) {
                (None, Some(p)) => h.not_before.max(p),
                _ => h.not_before,
            };
            wake = wake.min(due);
        }
        if self.held.is_empty() && !self.conn.is_cluster() {
            // The blocking read already waited.
            return now;
        }
        wake
    }

    async fn create_group(&mut self, lane: Lane) -> Result<(), RedisError> {
        let created: Result<(), RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(lane.outbox())
            .arg(schema::OUTBOX_GROUP)
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

    async fn refresh_gauges(&mut self) -> Result<(), RedisError> {
        let (mut outbox, mut dead) = (0u64, 0u64);
        for lane in self.lanes.clone() {
            let mut p = redis::pipe();
            p.cmd("XLEN").arg(lane.outbox());
            p.cmd("XLEN").arg(lane.outbox_dead());
            let (n, d): (u64, u64) = p.query_async(&mut self.conn).await?;
            outbox = outbox.saturating_add(n);
            dead = dead.saturating_add(d);
        }
        metrics::set_backlog(outbox, dead);
        Ok(())
    }

    fn hold(&mut self, lane: Lane, entry: StreamId, touched: Instant) {
        let key = (seq(&entry.id), lane);
        if let Some(h) = self.held.get_mut(&key) {
            // Our own entry claimed back after a long wait: only the claim is new.
            h.touched = touched;
            return;
        }
        let fields: Vec<(String, String)> = entry
            .map
            .iter()
            .filter_map(|(k, v)| text(v).map(|v| (k.clone(), v)))
            .collect();
        let parsed = parse_entry(&entry.map);
        self.held.insert(
            key,
            Held {
                lane,
                id: entry.id,
                entry: parsed,
                fields,
                touched,
                not_before: touched,
                finishing: None,
            },
        );
    }

    /// `XAUTOCLAIM` of entries pending longer than `claim_idle`, whoever holds them, lane by lane.
    async fn claim_stale(&mut self) -> Result<(), RedisError> {
        for lane in self.lanes.clone() {
            self.claim_stale_in(lane).await?;
        }
        Ok(())
    }

    async fn claim_stale_in(&mut self, lane: Lane) -> Result<(), RedisError> {
        let idle_ms = u64::try_from(self.settings().claim_idle.as_millis()).unwrap_or(u64::MAX);
        let mut cursor = "0-0".to_string();
        // A few pages at most per step; the cursor wraps to 0-0 when the list is done.
        for _ in 0..4 {
            let room = self.settings().max_held.saturating_sub(self.held.len());
            if room == 0 {
                break;
            }
            let before = Instant::now();
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(lane.outbox())
                .arg(schema::OUTBOX_GROUP)
                .arg(&self.settings().consumer)
                .arg(idle_ms)
                .arg(&cursor)
                .arg("COUNT")
                .arg(room.min(self.settings().batch))
                .query_async(&mut self.conn)
                .await?;
            for gone in &reply.deleted_ids {
                // Deleted from the stream (a voided charge): Redis drops it from the group.
                self.held.remove(&(seq(gone), lane));
            }
            for entry in reply.claimed {
                tracing::info!(entry = %entry.id, "Stripe reporter took over a stale outbox entry");
                self.hold(lane, entry, before);
            }
            cursor = reply.next_stream_id;
            if cursor == "0-0" {
                break;
            }
        }
        Ok(())
    }

    async fn read_new(&mut self, block: Option<Duration>) -> Result<(), RedisError> {
        if !self.conn.is_cluster() {
            return self.read_new_in(Lane::SINGLE, block).await;
        }
        // One connection serves every lane: poll them, never block on one.
        for lane in self.lanes.clone() {
            if self.held.len() >= self.settings().max_held {
                break;
            }
            self.read_new_in(lane, None).await?;
        }
        Ok(())
    }

    async fn read_new_in(&mut self, lane: Lane, block: Option<Duration>) -> Result<(), RedisError> {
        let room = self.settings().max_held.saturating_sub(self.held.len());
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(schema::OUTBOX_GROUP)
            .arg(&self.settings().consumer)
            .arg("COUNT")
            .arg(room.min(self.settings().batch).max(1));
        if let Some(block) = block {
            cmd.arg("BLOCK")
                .arg(u64::try_from(block.as_millis()).unwrap_or(1000).max(1));
        }
        cmd.arg("STREAMS").arg(lane.outbox()).arg(">");
        let before = Instant::now();
        let reply: Option<StreamReadReply> = cmd.query_async(&mut self.conn).await?;
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            for entry in key.ids {
                self.hold(lane, entry, before);
            }
        }
        Ok(())
    }

    /// Looks at every due entry in stream order, sending up to `concurrency` at once.
    async fn work(&mut self) -> Result<(), RedisError> {
        let now = Instant::now();
        let due: Vec<Key> = self
            .held
            .iter()
            .filter(|(_, h)| h.not_before <= now)
            .map(|(k, _)| *k)
            .collect();
        let mut batch: Vec<Outgoing> = Vec::new();
        for key in due {
            if let Some(send) = self.prepare(key).await? {
                batch.push(send);
                // After a failure, one entry probes Stripe before the rest follow.
                let width = if self.failures > 0 {
                    1
                } else {
                    self.settings().concurrency
                };
                if batch.len() >= width {
                    self.send_batch(std::mem::take(&mut batch)).await?;
                }
            }
        }
        if !batch.is_empty() {
            self.send_batch(batch).await?;
        }
        Ok(())
    }

    /// Decides one entry; answers the send it needs, if any (already owned by this worker).
    async fn prepare(&mut self, key: Key) -> Result<Option<Outgoing>, RedisError> {
        let Some(h) = self.held.get(&key) else {
            return Ok(None);
        };
        if let Some(ending) = h.finishing.clone() {
            self.finish(key, ending).await?;
            return Ok(None);
        }
        let entry = match &h.entry {
            Ok(entry) => entry.clone(),
            Err(reason) => {
                let reason = reason.clone();
                self.finish(key, Ending::DeadLetter(reason)).await?;
                return Ok(None);
            }
        };
        let rec: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(schema::reservation(&entry.account, &entry.rid))
            .query_async(&mut self.conn)
            .await?;
        let lease_ms = i64::try_from(self.settings().lease.as_millis()).unwrap_or(i64::MAX);
        let value = match decide(&entry, &rec, self.r.clock.now_ms(), lease_ms) {
            Decision::Skip(how) => {
                self.finish(key, Ending::Ack(how)).await?;
                return Ok(None);
            }
            Decision::Dead(reason) => {
                tracing::error!(rid = %entry.rid, reason = %reason, "unreadable outbox entry; dead-lettered");
                self.finish(key, Ending::DeadLetter(reason)).await?;
                return Ok(None);
            }
            Decision::Wait => {
                let recheck = self.settings().recheck;
                if let Some(h) = self.held.get_mut(&key) {
                    h.not_before = Instant::now() + recheck;
                }
                return Ok(None);
            }
            Decision::Send(value) => value,
        };
        let now = Instant::now();
        if let Some(paused) = self.paused_until.filter(|p| *p > now) {
            if let Some(h) = self.held.get_mut(&key) {
                h.not_before = paused;
            }
            return Ok(None);
        }
        if !self.own(key).await? {
            tracing::debug!(rid = %entry.rid, "outbox entry taken over by another worker");
            self.held.remove(&key);
            return Ok(None);
        }
        Ok(Some(Outgoing { key, entry, value }))
    }

    /// Sends a batch at once, then acknowledges or schedules each entry in stream order.
    async fn send_batch(&mut self, batch: Vec<Outgoing>) -> Result<(), RedisError> {
        let now = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for send in batch {
            // Owned when prepared; a send may only start if it also ends within the claim.
            if !self.still_owned(send.key, now) {
                if let Some(h) = self.held.get_mut(&send.key) {
                    h.not_before = now;
                }
                continue;
            }
            let http = self.r.http.clone();
            let meter = self.r.meter_event_name.clone();
            tasks.spawn(async move {
                let result = send_meter_event(&http, &meter, &send.entry, send.value).await;
                (send, result)
            });
        }
        let mut results = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(done) => results.push(done),
                // The entry stays held and is looked at again.
                Err(e) => tracing::error!(error = %e, "a Stripe send task failed"),
            }
        }
        results.sort_by_key(|(send, _)| send.key);
        let mut retry: Option<(&'static str, Duration, StripeCallError)> = None;
        let mut endings: Vec<(Key, Ending)> = Vec::new();
        let mut retried: Vec<Key> = Vec::new();
        for (send, result) in results {
            let rid = &send.entry.rid;
            let ending = match result.map_err(|e| (classify(&e), e)) {
                Ok(()) => Ending::Ack(Finish::Delivered),
                Err((Verdict::Accepted, e)) => {
                    tracing::warn!(rid = %rid, error = %e, "Stripe accepted a meter event with an unreadable answer");
                    Ending::Ack(Finish::Delivered)
                }
                Err((Verdict::Duplicate, _)) => Ending::Ack(Finish::Duplicate),
                Err((Verdict::Dead(reason), _)) => {
                    tracing::error!(rid = %rid, reason = %reason, "Stripe refused a meter event; dead-lettered");
                    Ending::DeadLetter(reason)
                }
                Err((Verdict::Retry { reason, after }, e)) => {
                    self.r.stats.retried(reason);
                    let after = after.unwrap_or_default();
                    let longest = retry.as_ref().map_or(Duration::ZERO, |(_, a, _)| *a);
                    if retry.is_none() || after > longest {
                        retry = Some((reason, after, e));
                    }
                    retried.push(send.key);
                    continue;
                }
            };
            endings.push((send.key, ending));
        }
        if !endings.is_empty() {
            self.failures = 0;
        }
        if let Some((reason, after, e)) = retry {
            self.failures = self.failures.saturating_add(1);
            let pause = self.r.backoff(self.failures).max(after);
            let until = Instant::now() + pause;
            self.paused_until = Some(until);
            for key in retried {
                if let Some(h) = self.held.get_mut(&key) {
                    h.not_before = until;
                }
            }
            let pause_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX);
            if reason == "auth" {
                tracing::error!(error = %e, pause_ms,
                    "Stripe rejected the credentials; meter events wait in the outbox");
            } else {
                tracing::warn!(error = %e, reason, pause_ms,
                    "Stripe meter event failed; retrying later");
            }
        }
        // Record every outcome before acknowledging, so a store error re-sends nothing.
        for (key, ending) in &endings {
            if let Some(h) = self.held.get_mut(key) {
                h.finishing = Some(ending.clone());
            }
        }
        for (key, ending) in endings {
            self.finish(key, ending).await?;
        }
        Ok(())
    }

    /// Whether a send starting now ends before anyone else may claim the entry.
    fn still_owned(&self, key: Key, now: Instant) -> bool {
        let margin = self.claim_margin();
        self.held.get(&key).is_some_and(|h| {
            now.saturating_duration_since(h.touched) + self.settings().request_timeout + margin
                < self.settings().claim_idle
        })
    }

    fn claim_margin(&self) -> Duration {
        Duration::from_millis(500).min(self.settings().claim_idle / 10)
    }

    /// Makes sure no other worker can send `key` during the next `request_timeout`.
    async fn own(&mut self, key: Key) -> Result<bool, RedisError> {
        let margin = self.claim_margin();
        let claim_idle = self.settings().claim_idle;
        let need = self.settings().request_timeout + margin;
        let Some(h) = self.held.get(&key) else {
            return Ok(false);
        };
        let elapsed = h.touched.elapsed();
        if elapsed + need < claim_idle {
            return Ok(true);
        }
        // Within claim_idle − margin nobody can have claimed it: refresh unconditionally.
        // Past that, take it back only if it is still idle (nobody else touched it).
        let min_idle = if elapsed + margin < claim_idle {
            Duration::ZERO
        } else {
            claim_idle
        };
        let id = h.id.clone();
        let outbox = h.lane.outbox();
        let before = Instant::now();
        let claimed: Vec<String> = redis::cmd("XCLAIM")
            .arg(outbox)
            .arg(schema::OUTBOX_GROUP)
            .arg(&self.settings().consumer)
            .arg(u64::try_from(min_idle.as_millis()).unwrap_or(u64::MAX))
            .arg(&id)
            .arg("JUSTID")
            .query_async(&mut self.conn)
            .await?;
        let owned = claimed.contains(&id);
        if owned {
            if let Some(h) = self.held.get_mut(&key) {
                h.touched = before;
            }
        }
        Ok(owned)
    }

    /// Acknowledges (and for dead letters first copies) an entry, in one transaction.
    async fn finish(&mut self, key: Key, ending: Ending) -> Result<(), RedisError> {
        let Some(h) = self.held.get(&key) else {
            return Ok(());
        };
        let mut p = redis::pipe();
        p.atomic();
        if let Ending::DeadLetter(reason) = &ending {
            let mut fields = h.fields.clone();
            fields.push(("error".into(), reason.clone()));
            fields.push(("original_id".into(), h.id.clone()));
            fields.push(("consumer".into(), self.settings().consumer.clone()));
            fields.push(("failed_ms".into(), self.r.clock.now_ms().to_string()));
            p.cmd("XADD")
                .arg(h.lane.outbox_dead())
                .arg("*")
                .arg(&fields)
                .ignore();
        }
        p.cmd("XACK")
            .arg(h.lane.outbox())
            .arg(schema::OUTBOX_GROUP)
            .arg(&h.id)
            .ignore();
        p.cmd("XDEL").arg(h.lane.outbox()).arg(&h.id).ignore();
        let done: Result<(), RedisError> = p.query_async(&mut self.conn).await;
        match done {
            Ok(()) => {
                let how = match ending {
                    Ending::Ack(how) => how,
                    Ending::DeadLetter(_) => Finish::DeadLettered,
                };
                if let Some(h) = self.held.remove(&key) {
                    tracing::debug!(entry = %h.id, result = how.as_str(), "outbox entry finished");
                }
                self.r.stats.finished(how);
                Ok(())
            }
            Err(e) => {
                if let Some(h) = self.held.get_mut(&key) {
                    h.finishing = Some(ending);
                    h.not_before = Instant::now() + self.r.settings.recheck;
                }
                Err(e)
            }
        }
    }
}
