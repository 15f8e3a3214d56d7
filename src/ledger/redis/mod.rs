//! The production [`Ledger`]: Redis without Lua. Decides how each ledger step maps onto Redis
//! commands so that it is atomic, exactly-once and never overspends, using only single commands,
//! `MULTI/EXEC` transactions and apply-then-compensate (no `EVAL`, no `FUNCTION`); `WATCH` only
//! for guarded account changes, on a connection of their own ([`guarded`]).
//! The key layout is in [`schema`](super::schema).
//!
//! Files: this one maps each [`Ledger`] step onto commands; [`link`] is the connection and its
//! shared transactions; [`store`] one node or a cluster behind one connection type; [`retry`]
//! which errors may be retried; [`guarded`] the account changes that depend on what they read;
//! [`settlement`] the claim and its exactly-once refund; [`repair`] second steps brought to
//! exactly one application (now or in the background); [`sweep`] the lease sweeper's walk;
//! [`records`] encodes and decodes the stored hashes and JSON.
//!
//! # Connection
//!
//! [`RedisLedger::new`] only parses the URL (`redis://`, `rediss://` when the redis crate is
//! built with TLS, `redis+unix://`). The connection is made on first use, inside the runtime of
//! that first caller, by a `ConnectionManager` that reconnects by itself after the server
//! restarts (the first call after an outage may still fail; the next one reconnects). Every
//! round trip runs under `command_timeout` ([`StoreError::Timeout`]) on Pingora's shared timer
//! wheel (Tokio's timer woke the runtime's driver on every call); any Redis error is
//! [`StoreError::Unavailable`]. Both fail the request closed. A server that hangs without
//! closing the connection yields timeouts until it answers again.
//!
//! The manager's reconnect task runs on the runtime of the call that noticed the broken
//! connection, so a ledger may be shared by several runtimes: if the runtime that first
//! connected shuts down, the next call fails once and the one after reconnects. (One connection
//! per thread was tried and not kept; the README's performance section says why.)
//!
//! # Steps (round trips on the success path)
//!
//! - `reserve_credits` (1): `MULTI { SET bal <allowance> NX [PXAT exp]; DECRBY bal n;
//!   HSET rsv …; PEXPIRE rsv ttl; ZADD holds <lease end> rid; SADD cg:lease:<slot> account;
//!   ZADD cg:lease:due <slot> <slot> }` — the hold and its lease in the same step. A negative result is compensated (second trip, refusal
//!   path only): `MULTI { INCRBY bal n; HINCRBY rsv undone 1; HSET rsv state void; PEXPIRE rsv }`.
//!   A missing balance is seeded only by `SET NX`, never by `INCRBY`, so concurrent first
//!   reservations seed it once. Readers may see the counter dip below zero for the instant
//!   between a refused `DECRBY` and its compensation; `credit_balance` reports 0 then, and no
//!   reservation ever succeeds against it.
//! - `reserve_spend` (1): `MULTI { INCRBY spend n; PEXPIRE spend 40d; HSET rsv …; PEXPIRE rsv;
//!   XADD cg:outbox * …; the lease as above }`, the Stripe report in the same transaction as
//!   the charge. Over the
//!   limit: `MULTI { DECRBY spend n; HINCRBY rsv undone 1; HSET rsv state void; XDEL entry }`.
//!   Under concurrency a transiently over-counted spend can refuse a request that would have
//!   fit when amounts differ; it never lets one pass the limit.
//! - `settle` (1 without refund, 2 with; see [`settlement`]): `MULTI { HSETNX rsv settled <ts>;
//!   HSETNX rsv refund_due r; HSETNX rsv settler <token>; HMGET rsv …; [ZREM holds rid] }`
//!   claims the reservation exactly once (a record without `kind` is unknown: the claim stays
//!   as a stub, so a reservation transaction that lands late merges into it and is refunded).
//!   The claimer — or a retry by the same settler, or the sweeper once the claim is stale —
//!   gives the clamped refund back: `MULTI { INCRBY bal r | DECRBY spend r; HINCRBY rsv
//!   refund_applied ±1; HSET rsv refunded r; ZREM holds rid }`, converging to one application.
//! - usage history ([`usage`]): the reservations, their compensations, refunds, grants and resets
//!   each carry their entry's `ZREMRANGEBYSCORE; ZADD; PEXPIRE cg:{a:<id>}:usage` (or `ZREM`)
//!   in their own transaction; no step gains a round trip (`reset_credits` becomes a `MULTI`).
//! - accounts: `HSETNX` of every field in one `MULTI` (all or nothing; the signup bucket's
//!   `SET NX` in the same transaction, deleted again when the account already existed).
//!   `change_account` (2): `HEXISTS`, then `MULTI { HSET <only the changed fields>; HGETALL }`.
//!   `change_account_if` (4, own connection): `WATCH acct subs; HGETALL acct; HGET subs <sub>`,
//!   compare, then `MULTI { HSET fields; HSET subs <sub> <created>; credit writes; HGETALL }`;
//!   a nil `EXEC` is a conflict (the caller reads again and retries).
//! - keys (3): `MULTI { SET cg:key:<hash>; SET cg:keyid:<id> }` (the record, unusable until in
//!   the zset), the claim `MULTI { INCR keyseq; ZADD keys +inf <id>; ZCARD keys; ZREVRANGEBYSCORE
//!   keys (+inf -inf WITHSCORES LIMIT 0 1 }`, then within the slots `ZADD keys XX <seq> <id>` (its
//!   place in creation order, above keys scored by the old global sequence); over the slots the
//!   claim is compensated with `MULTI { ZREM keys <id>; DEL record, keyid }` (either retried in
//!   the background when it fails). At most `slots` claimed keys are ever in the zset; a refusal
//!   happens only while every slot is taken or another refused key is still being removed (so a
//!   creation racing a revoke may be refused). A key waiting at `+inf` ranks after every placed
//!   one, so it never takes a claimed key's slot.
//!
//! # Shared transactions
//!
//! The three hot steps (the two reservations and the settlement claim) go through
//! `Link::transact`: the transactions that requests start while the flushing task waits for
//! its turn are sent as one `MULTI/EXEC`, one write and one reply for all of them. Each one's
//! commands stay atomic and in order, and an error reply reaches only the caller whose command
//! it was (see [`link`]); an idle gateway pays one task hop (the flushing task yields once so the
//! ready requests can join). What it saves is measured in the README's performance section.
//!
//! # Crash and timeout windows
//!
//! A second trip that fails (timeout, connection lost, gateway killed) leaves a step half
//! done. Each second trip moves a counter field of the reservation hash with its money in one
//! transaction (`undone`, `refund_applied`), so whoever finishes it — a background retry (~30 s),
//! a retried settlement, the sweeper — brings it to exactly one application ([`repair`]). The
//! sweeper ([`sweep`]) settles holds whose lease ended unsettled (a killed gateway, a lost
//! answer) by the orphan policy and finishes refunds claimed but not applied. What stays open:
//! - the gateway process dies between a refused `DECRBY` and its compensation: under the refund
//!   policy the sweeper gives the amount back after the lease; under `keep` the bucket stays
//!   short by that amount until its period ends (no reservation succeeds against the shortfall;
//!   readers see 0 at worst).
//! - the gateway process dies between a refused key's claim and its removal: that key stays at
//!   `+inf`, listed by the admin API after the claimed ones (unusable while the slots before it
//!   are taken, and counted, so it holds a slot until revoked by its id); nobody holds its
//!   secret. A crash before the claim leaves only an unreachable record; one between a claim
//!   and its placing leaves a usable key at `+inf` (last in slot order).
//!
//! A reservation whose outcome is unknown (its trip timed out or the connection dropped) is
//! refunded in full in the background once the store answers again (the gateway answered 503
//! and sent nothing upstream), at the latest by the sweeper after its lease, so a store outage
//! never charges for unserved requests.
//!
//! # Redis Cluster
//!
//! `store.cluster = true` with `store.url` a comma-separated seed list uses redis-rs's cluster
//! client ([`store`]), built with `retries(0)`: it never re-sends a `MULTI` whose answer was lost.
//! - Every key of one money transaction shares the account's hash tag `{a:<id>}`; the work lists
//!   written with it (lease lists, the Stripe outbox) are in the account's *lane*, a tag chosen to
//!   hash to the same slot ([`lane`](super::lane)). The walkers (sweeper, Stripe outbox, alerts)
//!   read the lanes in use from `cg:lanes` (added to before an account is created, and by each
//!   process once per lane before its first reservation there) and walk each.
//! - Shared transactions ([`link`]) group their callers by slot: one `MULTI/EXEC` per slot, sent
//!   concurrently.
//! - Steps that touch global keys (key records `cg:key:*`/`cg:keyid:*`, the customer index
//!   `cg:customer:*`, the job index `cg:job:*`) write them as ordered single-key steps, each
//!   order chosen so that a crash between two steps leaves nothing usable that should not be
//!   (a key record is usable only once claimed in the account's zset; a refused key loses its
//!   record first; a revoke marks the record first; indexes are written before what they point
//!   at and checked against it on read). `active_keys` reads the records with one `GET` each.
//! - Retries: only after an error that proves nothing ran (`MOVED`, `ASK`, `TRYAGAIN`,
//!   `CLUSTERDOWN`, a transaction discarded for one of them; [`retry`]), up to 6 attempts with
//!   5–80 ms pauses. A `MOVED` inside a transaction makes the client relearn the slot map. A
//!   timeout or a lost connection after the send is ambiguous: the request fails closed (503,
//!   nothing upstream) and the reservation is voided in the background against a claim stub that
//!   a late landing merges into, or by the sweeper after its lease. No per-request marker: a
//!   transaction is never sent twice unless the first provably did not run.
//! - Guarded changes (`WATCH`) open their own connection to the master of the account's slot,
//!   found by following `MOVED` from a seed; a cluster refusal there is a conflict (the caller
//!   reads again).
//! - Failover: while a master is down its slots answer errors (503, nothing served) until a
//!   replica is promoted (`cluster-node-timeout` plus the election); then the client's slot map
//!   follows and requests succeed again. Replication is asynchronous: a charge acknowledged by a
//!   master that dies before its replica received it is lost (the customer was served and is not
//!   charged; a refund likewise may be lost). `store.wait_replicas = N` sends `WAIT N <command
//!   timeout>` after each money transaction (on the slot's master) and fails the request closed
//!   when fewer than N replicas acknowledged: the charge then stands on the master and is voided
//!   in the background like any unknown outcome. Its cost is one more round trip per shared
//!   transaction (measured in the README). The `WAIT` travels in one pipeline with an `EXISTS`
//!   of the written key, so it runs on the node that took the writes (the cluster client may
//!   route a keyless command elsewhere right after a failover). A shard whose promoted master
//!   has no replica yet answers 503 for every money write (settlements included) until a
//!   replica is back: fail closed, by the operator's choice of `wait_replicas`.

mod guarded;
mod jobs;
mod link;
mod records;
mod repair;
mod retry;
mod settlement;
mod store;
mod sweep;
mod usage;

pub use self::store::{StoreConn, StoreNodes};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, Value};
use tokio::sync::{OnceCell, Semaphore};

use self::link::Link;
use self::records::{
    account_fields, change_fields, parse_account, parse_key, spend_record_fields, to_json,
};
use self::repair::{Adjust, Fix, MAX_PENDING_REPAIRS};
use self::settlement::{Settler, Unlist};
use self::usage::{add_cmds, UsageWrite};
use super::lane::Lane;
use super::schema::{self, account_field as af, outbox_field as of, rsv_field as rf};
use super::JobHold;
use super::{
    Account, AccountChange, CreditBucket, CreditChange, CreditReservation, CreditReserveOutcome,
    GuardedChange, IdempotencyClaim, KeyRecord, KeySlotClaim, Ledger, OrphanPolicy, SettleOutcome,
    SpendReservation, SpendReserveOutcome, StoreError, StoreResult, StripeEventClaim,
    SubscriptionEvent, SweepReport, UsageEntry, UsageKind, UsagePage, UsageQuery, UsageUnit,
};
use crate::apikey::random_id;
use crate::clock::{Clock, SystemClock};

/// The Redis ledger.
pub struct RedisLedger {
    nodes: StoreNodes,
    command_timeout: Duration,
    /// `store.wait_replicas`.
    wait_replicas: u8,
    link: OnceCell<Link>,
    repairs: Arc<Semaphore>,
    usage_keep_ms: i64,
}

impl std::fmt::Debug for RedisLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLedger")
            .field("command_timeout", &self.command_timeout)
            .field("connected", &self.link.initialized())
            .finish()
    }
}

impl RedisLedger {
    /// Parses the URL; connects on first use. Errors only on a malformed or unsupported URL
    /// (e.g. `rediss://` without TLS support built in).
    pub fn new(url: &str, command_timeout: Duration) -> Result<Self, StoreError> {
        Self::on(StoreNodes::new(url, false), command_timeout)
    }

    /// A Redis Cluster ledger: `seeds` is a comma-separated list of node URLs
    /// (`redis://h1:7000,redis://h2:7001`); the slot map is learnt from them on first use.
    pub fn new_cluster(seeds: &str, command_timeout: Duration) -> Result<Self, StoreError> {
        Self::on(StoreNodes::new(seeds, true), command_timeout)
    }

    /// The ledger `[store]` describes (`url`, `cluster`, `command_timeout_ms`, `wait_replicas`).
    pub fn from_config(store: &crate::config::StoreConfig) -> Result<Self, StoreError> {
        Ok(Self::on(
            StoreNodes::from_config(store),
            Duration::from_millis(store.command_timeout_ms),
        )?
        .with_wait_replicas(store.wait_replicas))
    }

    /// Each money transaction acknowledged by `n` replicas (`WAIT`) before it counts.
    pub fn with_wait_replicas(mut self, n: u8) -> Self {
        self.wait_replicas = n;
        self
    }

    fn on(nodes: StoreNodes, command_timeout: Duration) -> Result<Self, StoreError> {
        nodes
            .validate()
            .map_err(|e| StoreError::Unavailable(format!("store url not usable: {e}")))?;
        Ok(Self {
            nodes,
            command_timeout,
            wait_replicas: 0,
            link: OnceCell::new(),
            repairs: Arc::new(Semaphore::new(MAX_PENDING_REPAIRS)),
            usage_keep_ms: retention_ms(super::usage::DEFAULT_RETENTION_DAYS),
        })
    }

    /// Keeps usage history for `days` (`billing.usage_retention_days`) instead of the default.
    pub fn with_usage_retention_days(mut self, days: u64) -> Self {
        self.usage_keep_ms = retention_ms(days);
        self
    }

    /// `appendonly` and `maxmemory-policy` as the server reports them (`CONFIG GET`), for the
    /// readiness warning. Servers that disable `CONFIG` answer with an error: treat that as
    /// "unknown", not as the store being down.
    pub async fn server_settings(&self) -> StoreResult<(String, String)> {
        let link = self.link().await?;
        let mut p = redis::pipe();
        p.cmd("CONFIG").arg("GET").arg("appendonly");
        p.cmd("CONFIG").arg("GET").arg("maxmemory-policy");
        let (aof, policy): (HashMap<String, String>, HashMap<String, String>) =
            link.pipe(&p).await?;
        Ok((
            aof.get("appendonly").cloned().unwrap_or_default(),
            policy.get("maxmemory-policy").cloned().unwrap_or_default(),
        ))
    }

    /// Entries in the Stripe outbox streams, over every lane (delivered entries are removed by
    /// the worker).
    pub async fn outbox_len(&self) -> StoreResult<u64> {
        let link = self.link().await?;
        let mut total = 0u64;
        for lane in link.lanes().await? {
            let n: u64 = link.cmd(redis::cmd("XLEN").arg(lane.outbox())).await?;
            total = total.saturating_add(n);
        }
        Ok(total)
    }

    /// What is wrong with the Redis Cluster (`cluster_state` not `ok`), if anything; always
    /// `None` on a single node. For `/readyz`.
    pub async fn cluster_problem(&self) -> StoreResult<Option<String>> {
        let link = self.link().await?;
        let mut conn = link.conn.clone();
        match pingora::time::fast_timeout::fast_timeout(
            self.command_timeout,
            conn.cluster_problem(),
        )
        .await
        {
            Ok(answer) => answer.map_err(unavailable),
            Err(_) => Err(StoreError::Timeout),
        }
    }

    /// The ledger's one multiplexed connection, made on first use.
    async fn link(&self) -> StoreResult<Link> {
        let link = self
            .link
            .get_or_try_init(|| async {
                let conn = match pingora::time::fast_timeout::fast_timeout(
                    self.command_timeout * 5,
                    self.nodes.connect(self.command_timeout),
                )
                .await
                {
                    Ok(conn) => conn.map_err(unavailable)?,
                    Err(_) => return Err(StoreError::Timeout),
                };
                Ok::<_, StoreError>(Link {
                    conn,
                    timeout: self.command_timeout,
                    wait_replicas: self.wait_replicas,
                    repairs: self.repairs.clone(),
                    waiting: Arc::default(),
                    lanes_known: Arc::default(),
                    usage_keep_ms: self.usage_keep_ms,
                })
            })
            .await?;
        Ok(link.clone())
    }
}

pub(super) fn unavailable(e: RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

pub(super) fn corrupt(key: &str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: key.to_string(),
        detail: detail.to_string(),
    }
}

/// Redis integers are signed; amounts beyond `i64::MAX` saturate (and so never fit a balance).
pub(super) fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `days` in ms, saturating.
fn retention_ms(days: u64) -> i64 {
    int(days.saturating_mul(24 * 3600 * 1000))
}

fn non_negative(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn now_ms() -> i64 {
    SystemClock.now_ms()
}

/// `SET bal <allowance> NX [PXAT exp]`: creates a bucket at its allowance, exactly once.
fn seed_bucket_cmd(bal: &str, bucket: &CreditBucket) -> Cmd {
    let mut c = redis::cmd("SET");
    c.arg(bal).arg(int(bucket.allowance)).arg("NX");
    if let Some(exp) = bucket.expires_at_ms {
        c.arg("PXAT").arg(exp);
    }
    c
}

fn seed_bucket(p: &mut Pipeline, bal: &str, bucket: &CreditBucket) {
    p.add_command(seed_bucket_cmd(bal, bucket));
}

impl RedisLedger {
    async fn settle_by(
        &self,
        account_id: &str,
        reservation_id: &str,
        refund: u64,
        unlist: Unlist,
        settler: &str,
    ) -> StoreResult<SettleOutcome> {
        let (outcome, _) = self
            .link()
            .await?
            .settle(
                account_id,
                reservation_id,
                refund,
                unlist,
                Settler::Request(settler),
            )
            .await?;
        Ok(outcome)
    }
}

/// A hold's lease, written in its reserving transaction: the reservation on the account's
/// unsettled list (scored by the lease's end), and the account on the sweeper's work list of
/// the 10 s slot the lease ends in.
fn lease_cmds(lane: Lane, account_id: &str, reservation_id: &str, until_ms: i64) -> [Cmd; 3] {
    let slot = schema::lease_slot_of(until_ms);
    let mut holds = redis::cmd("ZADD");
    holds
        .arg(schema::holds(account_id))
        .arg(until_ms)
        .arg(reservation_id);
    let mut work = redis::cmd("SADD");
    work.arg(lane.lease_slot(slot)).arg(account_id);
    let mut due = redis::cmd("ZADD");
    due.arg(lane.lease_due()).arg(slot).arg(slot);
    [holds, work, due]
}

/// Reply `i` of a transaction's replies, as `T` (a missing or unexpected reply names `key`).
fn reply<T: FromRedisValue>(replies: &mut [Value], i: usize, key: &str) -> StoreResult<T> {
    let value = replies
        .get_mut(i)
        .map(|v| std::mem::replace(v, Value::Nil))
        .ok_or_else(|| corrupt(key, format!("no reply {i}")))?;
    redis::from_redis_value(value).map_err(|e| corrupt(key, e))
}

/// `name key args…` as one command.
fn command(name: &str, key: &str, args: impl redis::ToRedisArgs) -> Cmd {
    let mut c = redis::cmd(name);
    c.arg(key).arg(args);
    c
}

#[async_trait]
impl Ledger for RedisLedger {
    async fn ping(&self) -> StoreResult<()> {
        let link = self.link().await?;
        let _: String = link.cmd(&redis::cmd("PING")).await?;
        Ok(())
    }

    async fn create_account(
        &self,
        account: &Account,
        signup: Option<&CreditBucket>,
    ) -> StoreResult<bool> {
        let link = self.link().await?;
        let key = schema::account(&account.id);
        // Before anything of the account exists (each its own single-key step, since on a
        // cluster they are in other slots): its lane on the walkers' list, and the customer
        // index when no other account holds it (lookups check it against the account, so an
        // entry left by a failed creation misleads nobody; a stale or foreign one is
        // overwritten below once the account is known to be new).
        link.register_lane(&account.id).await?;
        if let Some(customer) = &account.stripe_customer_id {
            let _: Option<String> = link
                .cmd(
                    redis::cmd("SET")
                        .arg(schema::stripe_customer(customer))
                        .arg(&account.id)
                        .arg("NX"),
                )
                .await?;
        }
        let mut p = redis::pipe();
        p.atomic();
        for (i, (field, value)) in account_fields(account).into_iter().enumerate() {
            p.cmd("HSETNX").arg(&key).arg(field).arg(value);
            if i > 0 {
                p.ignore();
            }
        }
        let Some(bucket) = signup else {
            let (created,): (i64,) = link.tx(&p).await?;
            if created == 1 {
                index_customer(&link, account).await;
            }
            return Ok(created == 1);
        };
        let bal = schema::balance(&account.id, &bucket.id);
        seed_bucket(&mut p, &bal, bucket);
        let (created, seeded): (i64, Option<String>) = link.tx(&p).await?;
        if created == 1 {
            index_customer(&link, account).await;
            return Ok(true);
        }
        if seeded.is_some() {
            // The account existed and had no such bucket: leave it as it was.
            let _: i64 = link.cmd(redis::cmd("DEL").arg(&bal)).await?;
        }
        Ok(false)
    }

    async fn get_account(&self, id: &str) -> StoreResult<Option<Account>> {
        let link = self.link().await?;
        let key = schema::account(id);
        let h: HashMap<String, String> = link.cmd(redis::cmd("HGETALL").arg(&key)).await?;
        if h.is_empty() {
            return Ok(None);
        }
        parse_account(&key, h).map(Some)
    }

    async fn change_account(
        &self,
        account_id: &str,
        change: &AccountChange,
    ) -> StoreResult<Option<Account>> {
        let link = self.link().await?;
        let key = schema::account(account_id);
        // Accounts are never deleted: one that exists now still exists at the write (which
        // would otherwise create a partial hash).
        let exists: bool = link
            .cmd(redis::cmd("HEXISTS").arg(&key).arg(af::ID))
            .await?;
        if !exists {
            return Ok(None);
        }
        // The customer index first, a step of its own (another slot on a cluster): lookups check
        // it against the account, so it may point at the account before the change lands. A
        // previous customer's entry is left behind for the same reason.
        if let Some(customer) = &change.stripe_customer_id {
            let () = link
                .cmd(
                    redis::cmd("SET")
                        .arg(schema::stripe_customer(customer))
                        .arg(account_id),
                )
                .await?;
        }
        let mut p = redis::pipe();
        p.atomic();
        let fields = change_fields(change);
        if !fields.is_empty() {
            p.cmd("HSET").arg(&key).arg(&fields).ignore();
        }
        p.cmd("HGETALL").arg(&key);
        let (after,): (HashMap<String, String>,) = link.tx(&p).await?;
        parse_account(&key, after).map(Some)
    }

    async fn change_account_if(
        &self,
        expected: &Account,
        change: &AccountChange,
        credits: &[CreditChange],
        event: Option<&SubscriptionEvent>,
    ) -> StoreResult<GuardedChange> {
        self.guarded_change(expected, change, credits, event).await
    }

    async fn insert_key(
        &self,
        key_hash: &str,
        key: &KeyRecord,
        slots: u64,
    ) -> StoreResult<KeySlotClaim> {
        if !key.revoked && slots == 0 {
            return Ok(KeySlotClaim::Full);
        }
        let link = self.link().await?;
        let record = schema::key_record(key_hash);
        let id_key = schema::key_id(&key.id);
        // 1. The id → hash index, then the record (single-key steps: on a cluster they are in
        // other slots than each other and the account): unusable until its id is in the
        // account's zset (authentication takes the slot from there), so a crash before the
        // claim leaves no key behind.
        let () = link
            .cmd(redis::cmd("SET").arg(&id_key).arg(key_hash))
            .await?;
        let () = link
            .cmd(redis::cmd("SET").arg(&record).arg(to_json(key)?))
            .await?;
        if key.revoked {
            return Ok(KeySlotClaim::Claimed);
        }
        // 2. The claim, apply-then-compensate: added at score +inf (after every scored key, so a
        // refused one never takes the rank of a claimed one, even when its removal is lost),
        // with the next number of the account's sequence in the same transaction (so numbers
        // follow the order of the claims). Claimed keys are never removed by a refusal, so at
        // most `slots` of them are in the zset at any time, and a refusal only happens while
        // every slot is taken (or a refused one is still being removed).
        let keys = schema::account_keys(&key.account_id);
        let mut p = redis::pipe();
        p.atomic();
        p.cmd("INCR").arg(schema::key_sequence(&key.account_id));
        p.cmd("ZADD").arg(&keys).arg("+inf").arg(&key.id).ignore();
        p.cmd("ZCARD").arg(&keys);
        p.cmd("ZREVRANGEBYSCORE")
            .arg(&keys)
            .arg("(+inf")
            .arg("-inf")
            .arg("WITHSCORES")
            .arg("LIMIT")
            .arg(0)
            .arg(1);
        let (seq, count, top): (i64, u64, Vec<(String, f64)>) = link.pipe(&p).await?;
        if count <= slots {
            // 3. Its place in creation order: the sequence number, above any key scored by the
            // old global sequence. `XX`: a revoke meanwhile is not undone.
            let above = top.first().map_or(0, |(_, score)| *score as i64 + 1);
            let mut place = redis::pipe();
            place
                .cmd("ZADD")
                .arg(&keys)
                .arg("XX")
                .arg(seq.max(above))
                .arg(&key.id)
                .ignore();
            if let Err(e) = link.pipe::<()>(&place).await {
                tracing::warn!(error = %e, key = %key.id, "claimed key not placed; retrying in background");
                link.retry_idempotent("claimed key", place);
            }
            return Ok(KeySlotClaim::Claimed);
        }
        // The refusal, in order: the record first (the key is unusable from then on), then its
        // claim and its index; each step idempotent, the rest retried in the background.
        let mut steps = [redis::pipe(), redis::pipe(), redis::pipe()];
        steps[0].cmd("DEL").arg(&record).ignore();
        steps[1].cmd("ZREM").arg(&keys).arg(&key.id).ignore();
        steps[2].cmd("DEL").arg(&id_key).ignore();
        link.run_in_order("refused key", steps.into()).await;
        Ok(KeySlotClaim::Full)
    }

    async fn key_by_hash(&self, key_hash: &str) -> StoreResult<Option<KeyRecord>> {
        let link = self.link().await?;
        let key = schema::key_record(key_hash);
        let json: Option<String> = link.cmd(redis::cmd("GET").arg(&key)).await?;
        json.map(|j| parse_key(&key, &j)).transpose()
    }

    async fn key_slot(&self, account_id: &str, key_id: &str) -> StoreResult<Option<u64>> {
        let link = self.link().await?;
        link.cmd(
            redis::cmd("ZRANK")
                .arg(schema::account_keys(account_id))
                .arg(key_id),
        )
        .await
    }

    async fn active_keys(&self, account_id: &str) -> StoreResult<Vec<KeyRecord>> {
        let link = self.link().await?;
        let ids: Vec<String> = link
            .cmd(
                redis::cmd("ZRANGE")
                    .arg(schema::account_keys(account_id))
                    .arg(0)
                    .arg(-1),
            )
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        // One `GET` each (on a cluster the keys are in many slots; the connection pipelines them).
        let id_keys: Vec<String> = ids.iter().map(|id| schema::key_id(id)).collect();
        let hashes = link.get_each(&id_keys).await?;
        let record_keys: Vec<String> = hashes
            .into_iter()
            .flatten()
            .map(|h| schema::key_record(&h))
            .collect();
        if record_keys.is_empty() {
            return Ok(Vec::new());
        }
        let records = link.get_each(&record_keys).await?;
        record_keys
            .iter()
            .zip(records)
            .filter_map(|(key, json)| json.map(|j| parse_key(key, &j)))
            .collect()
    }

    async fn revoke_key(&self, key_id: &str) -> StoreResult<Option<KeyRecord>> {
        let link = self.link().await?;
        let hash: Option<String> = link
            .cmd(redis::cmd("GET").arg(schema::key_id(key_id)))
            .await?;
        let Some(hash) = hash else {
            return Ok(None);
        };
        let key = schema::key_record(&hash);
        let json: Option<String> = link.cmd(redis::cmd("GET").arg(&key)).await?;
        let Some(json) = json else {
            return Ok(None);
        };
        let before = parse_key(&key, &json)?;
        let revoked = KeyRecord {
            revoked: true,
            ..before.clone()
        };
        // The record first (unusable from then on), then its slot (another slot on a cluster).
        let () = link
            .cmd(redis::cmd("SET").arg(&key).arg(to_json(&revoked)?))
            .await?;
        let _: i64 = link
            .cmd(
                redis::cmd("ZREM")
                    .arg(schema::account_keys(&before.account_id))
                    .arg(key_id),
            )
            .await?;
        Ok(Some(before))
    }

    async fn credit_balance(&self, account_id: &str, bucket: &CreditBucket) -> StoreResult<u64> {
        let link = self.link().await?;
        let bal = schema::balance(account_id, &bucket.id);
        let value: Option<i64> = link.cmd(redis::cmd("GET").arg(&bal)).await?;
        Ok(value.map_or(bucket.allowance, non_negative))
    }

    async fn grant_credits(
        &self,
        account_id: &str,
        bucket: &CreditBucket,
        amount: u64,
    ) -> StoreResult<u64> {
        let link = self.link().await?;
        let bal = schema::balance(account_id, &bucket.id);
        let mut p = redis::pipe();
        p.atomic();
        seed_bucket(&mut p, &bal, bucket);
        p.ignore();
        p.cmd("INCRBY").arg(&bal).arg(int(amount));
        let entry = UsageEntry::credit_change(UsageKind::Grant, &bucket.id, amount, now_ms());
        for c in add_cmds(account_id, &entry, link.usage_keep_ms) {
            p.add_command(c).ignore();
        }
        let (balance,): (i64,) = link.tx(&p).await?;
        Ok(non_negative(balance))
    }

    async fn reset_credits(
        &self,
        account_id: &str,
        bucket: &CreditBucket,
        balance: u64,
    ) -> StoreResult<()> {
        let link = self.link().await?;
        let mut cmd = redis::cmd("SET");
        cmd.arg(schema::balance(account_id, &bucket.id))
            .arg(int(balance));
        if let Some(exp) = bucket.expires_at_ms {
            cmd.arg("PXAT").arg(exp);
        }
        let mut p = redis::pipe();
        p.atomic();
        p.add_command(cmd).ignore();
        let entry = UsageEntry::credit_change(UsageKind::Reset, &bucket.id, balance, now_ms());
        for c in add_cmds(account_id, &entry, link.usage_keep_ms) {
            p.add_command(c).ignore();
        }
        let () = link.tx(&p).await?;
        Ok(())
    }

    async fn reserve_credits(&self, r: &CreditReservation) -> StoreResult<CreditReserveOutcome> {
        let link = self.link().await?;
        link.ensure_lane(&r.account_id).await?;
        let bal = schema::balance(&r.account_id, &r.bucket.id);
        let rsv = schema::reservation(&r.account_id, &r.reservation_id);
        let amount = int(r.amount);
        // Only what settlement reads: this record is written on every billed request, and most
        // are never read again (a kept credit charge needs no settlement call). What was priced
        // is in the request's log line under its charge id.
        let mut fields = vec![
            (rf::KIND, schema::KIND_CREDITS.to_string()),
            (rf::BUCKET, r.bucket.id.clone()),
            (rf::AMOUNT, r.amount.to_string()),
        ];
        if let Some(exp) = r.bucket.expires_at_ms {
            fields.push((rf::BUCKET_EXPIRES_MS, exp.to_string()));
        }
        let entry = UsageEntry::charge(
            &r.reservation_id,
            &r.meta,
            UsageUnit::Credits,
            r.amount,
            &r.bucket.id,
        );
        let member = entry.member();
        fields.push((rf::USAGE, member.clone()));
        let mut cmds = vec![
            seed_bucket_cmd(&bal, &r.bucket),
            command("DECRBY", &bal, amount),
            command("HSET", &rsv, &fields),
            command("PEXPIRE", &rsv, r.record_ttl_ms.max(1)),
        ];
        cmds.extend(lease_cmds(
            link.lane(&r.account_id),
            &r.account_id,
            &r.reservation_id,
            r.lease_until_ms,
        ));
        cmds.extend(add_cmds(&r.account_id, &entry, link.usage_keep_ms));
        let answer = link.transact(cmds).await;
        let left = match answer.and_then(|mut replies| reply::<i64>(&mut replies, 1, &bal)) {
            Ok(left) => left,
            Err(e) => {
                link.void_unknown(&r.account_id, &r.reservation_id, r.amount);
                return Err(e);
            }
        };
        if left >= 0 {
            return Ok(CreditReserveOutcome::Reserved {
                remaining: non_negative(left),
            });
        }
        let fix = Fix {
            rsv,
            marker: rf::UNDONE,
            adjust: Adjust::Credits {
                bal,
                amount: r.amount,
                expires_at_ms: r.bucket.expires_at_ms,
            },
            fields: vec![(rf::STATE, schema::STATE_VOID.to_string())],
            rsv_ttl_ms: Some(schema::VOID_RECORD_TTL_MS),
            xdel: None,
            unlist: Some((schema::holds(&r.account_id), r.reservation_id.clone())),
            usage: Some(UsageWrite::Remove {
                account_id: r.account_id.clone(),
                member,
            }),
        };
        // Refused either way; a failed compensation is retried in the background.
        let _ = link.fix_or_repair(fix).await;
        Ok(CreditReserveOutcome::Insufficient {
            available: non_negative(left.saturating_add(amount)),
        })
    }

    async fn month_spend(&self, account_id: &str, month: &str) -> StoreResult<u64> {
        let link = self.link().await?;
        let value: Option<i64> = link
            .cmd(redis::cmd("GET").arg(schema::spend(account_id, month)))
            .await?;
        Ok(value.map_or(0, non_negative))
    }

    async fn reserve_spend(&self, r: &SpendReservation) -> StoreResult<SpendReserveOutcome> {
        let link = self.link().await?;
        link.ensure_lane(&r.account_id).await?;
        let spend = schema::spend(&r.account_id, &r.month);
        let rsv = schema::reservation(&r.account_id, &r.reservation_id);
        let amount = int(r.amount_micro);
        let mut fields = spend_record_fields(&r.account_id, &r.month, r.amount_micro, &r.meta);
        if let Some(report) = &r.report {
            fields.push((rf::CUSTOMER, report.customer_id.clone()));
            fields.push((rf::REPORT_VALUE, report.value.to_string()));
        }
        let charge = UsageEntry::charge(
            &r.reservation_id,
            &r.meta,
            UsageUnit::Usd,
            r.amount_micro,
            &r.month,
        );
        let member = charge.member();
        fields.push((rf::USAGE, member.clone()));
        let mut cmds = vec![
            command("INCRBY", &spend, amount),
            command("PEXPIRE", &spend, schema::SPEND_TTL_MS),
            command("HSET", &rsv, &fields),
            command("PEXPIRE", &rsv, r.record_ttl_ms.max(1)),
        ];
        if let Some(report) = &r.report {
            let mut xadd = redis::cmd("XADD");
            xadd.arg(link.lane(&r.account_id).outbox()).arg("*").arg(&[
                (of::RESERVATION, r.reservation_id.clone()),
                (of::ACCOUNT, r.account_id.clone()),
                (of::CUSTOMER, report.customer_id.clone()),
                (of::VALUE, report.value.to_string()),
                (of::AMOUNT, r.amount_micro.to_string()),
                (of::MONTH, r.month.clone()),
                (of::MODEL, r.meta.model.clone()),
                (of::TS, r.meta.created_ms.to_string()),
            ]);
            cmds.push(xadd);
        }
        cmds.extend(lease_cmds(
            link.lane(&r.account_id),
            &r.account_id,
            &r.reservation_id,
            r.lease_until_ms,
        ));
        cmds.extend(add_cmds(&r.account_id, &charge, link.usage_keep_ms));
        let reported = r.report.is_some();
        let answer = link.transact(cmds).await.and_then(|mut replies| {
            let spent = reply::<i64>(&mut replies, 0, &spend)?;
            let entry = match reported {
                true => Some(reply::<String>(&mut replies, 4, "outbox")?),
                false => None,
            };
            Ok((spent, entry))
        });
        let (spent, entry) = match answer {
            Ok(answer) => answer,
            Err(e) => {
                link.void_unknown(&r.account_id, &r.reservation_id, r.amount_micro);
                return Err(e);
            }
        };
        if spent <= int(r.limit_micro) {
            return Ok(SpendReserveOutcome::Reserved {
                spent_micro: non_negative(spent),
            });
        }
        let fix = Fix {
            rsv,
            marker: rf::UNDONE,
            adjust: Adjust::Spend {
                spend,
                amount: r.amount_micro,
            },
            fields: vec![(rf::STATE, schema::STATE_VOID.to_string())],
            rsv_ttl_ms: Some(schema::VOID_RECORD_TTL_MS),
            xdel: entry.map(|id| (link.lane(&r.account_id).outbox(), id)),
            unlist: Some((schema::holds(&r.account_id), r.reservation_id.clone())),
            usage: Some(UsageWrite::Remove {
                account_id: r.account_id.clone(),
                member,
            }),
        };
        let _ = link.fix_or_repair(fix).await;
        Ok(SpendReserveOutcome::LimitReached {
            spent_micro: non_negative(spent.saturating_sub(amount)),
        })
    }

    async fn settle(
        &self,
        account_id: &str,
        reservation_id: &str,
        refund: u64,
    ) -> StoreResult<SettleOutcome> {
        // A settler of its own: it never finishes another settler's claim.
        self.settle_as(account_id, reservation_id, refund, &random_id("st_", 12))
            .await
    }

    async fn settle_as(
        &self,
        account_id: &str,
        reservation_id: &str,
        refund: u64,
        settler: &str,
    ) -> StoreResult<SettleOutcome> {
        // A settlement that gives nothing back is all there is to it: the hold leaves the
        // unsettled list in the claim's own transaction.
        let unlist = match refund {
            0 => Unlist::OnClaim,
            _ => Unlist::AfterRefund,
        };
        self.settle_by(account_id, reservation_id, refund, unlist, settler)
            .await
    }

    async fn sweep(
        &self,
        now_ms: i64,
        policy: OrphanPolicy,
        limit: usize,
    ) -> StoreResult<SweepReport> {
        self.link().await?.sweep(now_ms, policy, limit).await
    }

    async fn account_by_stripe_customer(&self, customer_id: &str) -> StoreResult<Option<Account>> {
        let link = self.link().await?;
        let id: Option<String> = link
            .cmd(redis::cmd("GET").arg(schema::stripe_customer(customer_id)))
            .await?;
        let Some(id) = id else {
            return Ok(None);
        };
        let account = self.get_account(&id).await?;
        Ok(account.filter(|a| a.stripe_customer_id.as_deref() == Some(customer_id)))
    }

    async fn begin_stripe_event(
        &self,
        event_id: &str,
        lease_ms: i64,
    ) -> StoreResult<StripeEventClaim> {
        let link = self.link().await?;
        let key = schema::stripe_event(event_id);
        // `SET NX` + `GET` in one transaction (not `SET NX GET`, which needs Redis 7).
        let mut p = redis::pipe();
        p.atomic();
        p.cmd("SET")
            .arg(&key)
            .arg(schema::EVENT_PENDING)
            .arg("NX")
            .arg("PX")
            .arg(lease_ms.max(1));
        p.cmd("GET").arg(&key);
        let (claimed, state): (Option<String>, Option<String>) = link.pipe(&p).await?;
        Ok(match (claimed, state.as_deref()) {
            (Some(_), _) => StripeEventClaim::Claimed,
            (None, Some(schema::EVENT_DONE)) => StripeEventClaim::Applied,
            (None, _) => StripeEventClaim::InProgress,
        })
    }

    async fn finish_stripe_event(&self, event_id: &str, keep_ms: i64) -> StoreResult<()> {
        let link = self.link().await?;
        let () = link
            .cmd(
                redis::cmd("SET")
                    .arg(schema::stripe_event(event_id))
                    .arg(schema::EVENT_DONE)
                    .arg("PX")
                    .arg(keep_ms.max(1)),
            )
            .await?;
        Ok(())
    }

    async fn claim_idempotency_key(
        &self,
        account_id: &str,
        key_hash: &str,
        record: &str,
        lease_ms: i64,
    ) -> StoreResult<IdempotencyClaim> {
        let link = self.link().await?;
        let key = schema::idempotency(account_id, key_hash);
        let mut p = redis::pipe();
        p.atomic();
        p.cmd("SET")
            .arg(&key)
            .arg(record)
            .arg("NX")
            .arg("PX")
            .arg(lease_ms.max(1));
        p.cmd("GET").arg(&key);
        let (claimed, stored): (Option<String>, Option<String>) = link.pipe(&p).await?;
        Ok(match (claimed, stored) {
            (Some(_), _) => IdempotencyClaim::Claimed,
            (None, Some(existing)) => IdempotencyClaim::Existing(existing),
            // Expired between the two commands of one transaction cannot happen; be safe.
            (None, None) => IdempotencyClaim::Claimed,
        })
    }

    async fn store_idempotency_record(
        &self,
        account_id: &str,
        key_hash: &str,
        record: &str,
        keep_ms: i64,
    ) -> StoreResult<()> {
        let link = self.link().await?;
        let () = link
            .cmd(
                redis::cmd("SET")
                    .arg(schema::idempotency(account_id, key_hash))
                    .arg(record)
                    .arg("PX")
                    .arg(keep_ms.max(1)),
            )
            .await?;
        Ok(())
    }

    async fn release_idempotency_key(&self, account_id: &str, key_hash: &str) -> StoreResult<()> {
        let link = self.link().await?;
        let _: i64 = link
            .cmd(redis::cmd("DEL").arg(schema::idempotency(account_id, key_hash)))
            .await?;
        Ok(())
    }

    async fn record_job(
        &self,
        job: &JobHold,
        lease_until_ms: i64,
        keep_ms: i64,
    ) -> StoreResult<()> {
        self.link()
            .await?
            .record_job(job, lease_until_ms, keep_ms)
            .await
    }

    async fn account_job(&self, account_id: &str, job_id: &str) -> StoreResult<Option<JobHold>> {
        self.link().await?.account_job(account_id, job_id).await
    }

    async fn find_job(&self, job_id: &str) -> StoreResult<Option<JobHold>> {
        self.link().await?.find_job(job_id).await
    }

    async fn usage(&self, account_id: &str, query: &UsageQuery) -> StoreResult<UsagePage> {
        self.link().await?.usage_page(account_id, query).await
    }
}

/// Points the customer index at a newly created account: a second, idempotent trip that
/// overwrites an entry the transaction's `SET NX` left to a stale or other account. A failure
/// is logged (the `SET NX` usually wrote it already; the next change naming it writes it again).
async fn index_customer(link: &Link, account: &Account) {
    let Some(customer) = &account.stripe_customer_id else {
        return;
    };
    let written: StoreResult<()> = link
        .cmd(
            redis::cmd("SET")
                .arg(schema::stripe_customer(customer))
                .arg(&account.id),
        )
        .await;
    if let Err(e) = written {
        tracing::warn!(account = %account.id, error = %e, "Stripe customer index not written");
    }
}
