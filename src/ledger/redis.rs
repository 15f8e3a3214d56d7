//! The production [`Ledger`]: Redis without Lua. Decides how each ledger step maps onto Redis
//! commands so that it is atomic, exactly-once and never overspends, using only single commands,
//! `MULTI/EXEC` transactions and apply-then-compensate (no `EVAL`, no `FUNCTION`, no `WATCH`).
//! The key layout is in [`schema`](super::schema).
//!
//! # Connection
//!
//! [`RedisLedger::new`] only parses the URL (`redis://`, `rediss://` when the redis crate is
//! built with TLS, `redis+unix://`). The connection is made on first use, inside the runtime of
//! that first caller, by a [`ConnectionManager`] that reconnects by itself after the server
//! restarts (the first call after an outage may still fail; the next one reconnects). Every
//! round trip runs under `command_timeout` ([`StoreError::Timeout`]) on Pingora's shared timer
//! wheel (Tokio's timer woke the runtime's driver on every call); any Redis error is
//! [`StoreError::Unavailable`]. Both fail the request closed. A server that hangs without
//! closing the connection yields timeouts until it answers again.
//!
//! The manager's reconnect task runs on the runtime of the call that noticed the broken
//! connection, so a ledger may be shared by several runtimes: if the runtime that first
//! connected shuts down, the next call fails once and the one after reconnects. (One connection
//! per thread was tried: with shared transactions below it measured no faster, and every
//! thread's connection then failed its own first call after an outage.)
//!
//! # Steps (round trips on the success path)
//!
//! - `reserve_credits` (1): `MULTI { SET bal <allowance> NX [PXAT exp]; DECRBY bal n;
//!   HSET rsv …; PEXPIRE rsv ttl }`. A negative result is compensated (second trip, refusal
//!   path only): `MULTI { INCRBY bal n; HINCRBY rsv undone 1; HSET rsv state void; PEXPIRE rsv }`.
//!   A missing balance is seeded only by `SET NX`, never by `INCRBY`, so concurrent first
//!   reservations seed it once. Readers may see the counter dip below zero for the instant
//!   between a refused `DECRBY` and its compensation; `credit_balance` reports 0 then, and no
//!   reservation ever succeeds against it.
//! - `reserve_spend` (1): `MULTI { INCRBY spend n; PEXPIRE spend 40d; HSET rsv …; PEXPIRE rsv;
//!   XADD cg:outbox * … }`, the Stripe report in the same transaction as the charge. Over the
//!   limit: `MULTI { DECRBY spend n; HINCRBY rsv undone 1; HSET rsv state void; XDEL entry }`.
//!   Under concurrency a transiently over-counted spend can refuse a request that would have
//!   fit when amounts differ; it never lets one pass the limit.
//! - `settle` (1 without refund, 2 with): `MULTI { HSETNX rsv settled <ts>; HSETNX rsv
//!   refund_due r; HMGET rsv … }` claims the reservation exactly once (a record without `kind`
//!   is unknown: the stub `HSETNX` made is deleted). The claimer then gives the clamped refund
//!   back: `MULTI { INCRBY bal r | DECRBY spend r; HINCRBY rsv refund_applied 1; HSET rsv
//!   refunded r }`.
//! - accounts: `HSETNX` of every field in one `MULTI` (all or nothing; the signup bucket's
//!   `SET NX` in the same transaction, deleted again when the account already existed).
//! - keys: `INCR cg:keyseq`, then `MULTI { SET cg:key:<hash>; SET cg:keyid:<id>; ZADD keys }`.
//!
//! # Shared transactions
//!
//! The three hot steps (the two reservations and the settlement claim) go through
//! `Link::transact`: the transactions that requests start while the flushing task waits for
//! its turn are sent as one `MULTI/EXEC`, one write and one reply for all of them. Each one's
//! commands stay atomic and in order, and an error reply reaches only the caller whose command
//! it was. Under load in `scripts/load.sh` this averaged ~5.7 reservations per transaction and
//! cut ~5 µs of proxy CPU and ~5 µs of Redis CPU per billed request; an idle gateway pays one
//! task hop (the flushing task yields once so the ready requests can join).
//!
//! # Crash and timeout windows
//!
//! A second trip that fails (timeout, connection lost, gateway killed) leaves a step half
//! done. Each second trip is guarded by a counter field in the reservation hash, written in the
//! same transaction as the money change (`undone`, `refund_applied`), so it can be retried
//! exactly once: a failed compensation or refund is retried in the background for about 30 s
//! (check the marker, apply if absent). What stays open:
//! - the gateway process dies between claim and refund: the reservation is settled without
//!   its refund (`refund_due` set, `refunded` absent) — the customer loses at most that refund;
//!   a sweeper can find such records;
//! - the gateway process dies between a refused `DECRBY` and its compensation: the bucket stays
//!   short by that amount until its period ends (no reservation succeeds against the shortfall;
//!   readers see 0 at worst).
//!
//! A reservation whose outcome is unknown (its trip timed out or the connection dropped) is
//! refunded in full in the background once the store answers again (the gateway answered 503
//! and sent nothing upstream), so a store outage never charges for unserved requests.
//!
//! # Redis Cluster
//!
//! All money steps touch one account's slot. Three steps also touch global keys and so need a
//! single node (or a future split into ordered single-slot steps): `insert_key`/`revoke_key`/
//! `active_keys` (`cg:key:*`, `cg:keyid:*`) and the `XADD cg:outbox` of `reserve_spend`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, Value};
use tokio::sync::{oneshot, OnceCell, Semaphore};

use super::schema::{self, account_field as af, outbox_field as of, rsv_field as rf};
use super::{
    Account, CreditBucket, CreditReservation, CreditReserveOutcome, IdempotencyClaim, KeyRecord,
    Ledger, SettleOutcome, SpendReservation, SpendReserveOutcome, StoreError, StoreResult,
    StripeEventClaim, SubscriptionStatus,
};
use crate::clock::{Clock, SystemClock};

/// Background repairs (retried compensations and refunds) allowed at once; beyond that they
/// are logged and dropped rather than piling up without bound during a long outage. A repair
/// is a sleeping task of a few hundred bytes; a burst of timeouts under load (2,000 requests
/// arriving at once on a busy 2-CPU box produced 529) must never reach this.
const MAX_PENDING_REPAIRS: usize = 65_536;
/// Attempts of one background repair, with backoff from 50 ms doubling to at most 2 s (~30 s).
const REPAIR_ATTEMPTS: u32 = 20;

/// The Redis ledger.
pub struct RedisLedger {
    client: redis::Client,
    command_timeout: Duration,
    link: OnceCell<Link>,
    repairs: Arc<Semaphore>,
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
        let client = redis::Client::open(url)
            .map_err(|e| StoreError::Unavailable(format!("store url not usable: {e}")))?;
        Ok(Self {
            client,
            command_timeout,
            link: OnceCell::new(),
            repairs: Arc::new(Semaphore::new(MAX_PENDING_REPAIRS)),
        })
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

    /// Entries in the Stripe outbox stream (delivered entries are removed by the worker).
    pub async fn outbox_len(&self) -> StoreResult<u64> {
        let link = self.link().await?;
        link.cmd(redis::cmd("XLEN").arg(schema::OUTBOX)).await
    }

    /// The ledger's one multiplexed connection, made on first use.
    async fn link(&self) -> StoreResult<Link> {
        let link = self
            .link
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.command_timeout))
                    // Every call is timed by `Link::timed`; a second timer per call costs a
                    // wake-up of the runtime's driver.
                    .set_response_timeout(None)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(500))
                    .set_number_of_retries(6);
                let conn = ConnectionManager::new_lazy_with_config(self.client.clone(), config)
                    .map_err(unavailable)?;
                Ok::<_, StoreError>(Link {
                    conn,
                    timeout: self.command_timeout,
                    repairs: self.repairs.clone(),
                    waiting: Arc::default(),
                })
            })
            .await?;
        Ok(link.clone())
    }
}

fn unavailable(e: RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(key: &str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        key: key.to_string(),
        detail: detail.to_string(),
    }
}

/// Redis integers are signed; amounts beyond `i64::MAX` saturate (and so never fit a balance).
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
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

/// One connection plus the per-call timeout; cheap to clone into background repairs.
#[derive(Clone)]
struct Link {
    conn: ConnectionManager,
    timeout: Duration,
    repairs: Arc<Semaphore>,
    /// Transactions waiting for this connection's next coalesced `MULTI/EXEC`.
    waiting: Arc<Mutex<Vec<Waiting>>>,
}

/// One caller's transaction in a coalesced `MULTI/EXEC`: its commands and where its replies go.
struct Waiting {
    cmds: Vec<Cmd>,
    reply: oneshot::Sender<Result<Vec<Value>, String>>,
}

impl Link {
    async fn timed<T>(&self, f: impl Future<Output = Result<T, RedisError>>) -> StoreResult<T> {
        // Pingora's shared 10 ms timer wheel: nothing is registered unless the call is still
        // pending, and never a wake-up of the runtime's driver per call (as Tokio's timer does).
        match pingora::time::fast_timeout::fast_timeout(self.timeout, f).await {
            Ok(result) => result.map_err(unavailable),
            Err(_) => Err(StoreError::Timeout),
        }
    }

    /// One command, one round trip.
    async fn cmd<T: FromRedisValue>(&self, cmd: &Cmd) -> StoreResult<T> {
        let mut conn = self.conn.clone();
        self.timed(cmd.query_async(&mut conn)).await
    }

    /// One pipeline (a `MULTI/EXEC` when `atomic()`), one round trip.
    async fn pipe<T: FromRedisValue>(&self, p: &Pipeline) -> StoreResult<T> {
        let mut conn = self.conn.clone();
        self.timed(p.query_async(&mut conn)).await
    }

    /// Runs `cmds` as one transaction and answers their replies, in order. Transactions that
    /// other requests (on any worker thread) start before the flushing task gets its turn join
    /// the same `MULTI/EXEC`: one round trip, one `MULTI`/`EXEC` pair and one wake-up of
    /// Redis for all of them. Each caller's commands stay atomic (a bigger transaction is still
    /// one); a command's error reaches only its own caller (errors are kept per reply, as
    /// `MULTI/EXEC` itself does). With nothing else ready the flush runs at once, so an idle
    /// gateway pays one task hop. Single Redis node only (keys of several accounts share the
    /// transaction), as the ledger is (`cluster = true` is refused).
    async fn transact(&self, cmds: Vec<Cmd>) -> StoreResult<Vec<Value>> {
        let (reply, answer) = oneshot::channel();
        let first = {
            let mut waiting = self
                .waiting
                .lock()
                .map_err(|_| StoreError::Unavailable("transaction queue poisoned".into()))?;
            waiting.push(Waiting { cmds, reply });
            waiting.len() == 1
        };
        if first {
            let link = self.clone();
            tokio::spawn(async move {
                // Let the requests that are ready to run queue theirs first.
                tokio::task::yield_now().await;
                link.flush().await;
            });
        }
        match pingora::time::fast_timeout::fast_timeout(self.timeout, answer).await {
            Ok(Ok(Ok(values))) => Ok(values),
            Ok(Ok(Err(message))) => Err(StoreError::Unavailable(message)),
            Ok(Err(_)) => Err(StoreError::Unavailable("transaction dropped".into())),
            Err(_) => Err(StoreError::Timeout),
        }
    }

    /// Sends every waiting transaction as one `MULTI/EXEC` and hands each its replies.
    async fn flush(&self) {
        let batch = match self.waiting.lock() {
            Ok(mut waiting) => std::mem::take(&mut *waiting),
            Err(_) => return,
        };
        let mut p = redis::pipe();
        p.atomic().ignore_errors();
        let mut shares = Vec::with_capacity(batch.len());
        for w in batch {
            shares.push((w.cmds.len(), w.reply));
            for c in w.cmds {
                p.add_command(c);
            }
        }
        let expected = p.len();
        let failed = |message: String, shares: Vec<(usize, oneshot::Sender<_>)>| {
            for (_, reply) in shares {
                let _ = reply.send(Err(message.clone()));
            }
        };
        match self.pipe::<Vec<Value>>(&p).await {
            Ok(values) if values.len() == expected => {
                let mut values = values.into_iter();
                for (n, reply) in shares {
                    let mine: Vec<Value> = values.by_ref().take(n).collect();
                    let answer = match mine.iter().find_map(|v| match v {
                        Value::ServerError(e) => Some(e.to_string()),
                        _ => None,
                    }) {
                        Some(error) => Err(error),
                        None => Ok(mine),
                    };
                    let _ = reply.send(answer);
                }
            }
            Ok(values) => failed(
                format!(
                    "EXEC answered {} replies for {expected} commands",
                    values.len()
                ),
                shares,
            ),
            Err(e) => failed(e.to_string(), shares),
        }
    }

    /// Runs `job` in the background unless too many repairs are pending already.
    fn spawn_repair<F, Fut>(&self, what: &'static str, job: F)
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
    async fn fix_or_repair(&self, fix: Fix) -> StoreResult<()> {
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

    /// Gives back a reservation whose outcome is unknown, in the background.
    fn void_unknown(&self, account_id: &str, reservation_id: &str, amount: u64) {
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

    async fn settle(
        &self,
        account_id: &str,
        reservation_id: &str,
        refund: u64,
    ) -> StoreResult<SettleOutcome> {
        let rsv = schema::reservation(account_id, reservation_id);
        let cmds = vec![
            command("HSETNX", &rsv, (rf::SETTLED, now_ms())),
            command("HSETNX", &rsv, (rf::REFUND_DUE, int(refund))),
            command(
                "HMGET",
                &rsv,
                &[
                    rf::KIND,
                    rf::BUCKET,
                    rf::BUCKET_EXPIRES_MS,
                    rf::AMOUNT,
                    rf::STATE,
                ],
            ),
        ];
        let mut replies = self.transact(cmds).await?;
        let claimed: i64 = reply(&mut replies, 0, &rsv)?;
        let fields: Vec<Option<String>> = reply(&mut replies, 2, &rsv)?;
        let field = |i: usize| fields.get(i).cloned().flatten();
        let Some(kind) = field(0) else {
            if claimed == 1 {
                // Our HSETNX made a stub of a reservation that does not exist: remove it.
                let _: i64 = self.cmd(redis::cmd("DEL").arg(&rsv)).await?;
            }
            return Ok(SettleOutcome::Unknown);
        };
        if field(4).as_deref() == Some(schema::STATE_VOID) {
            return Ok(SettleOutcome::Unknown);
        }
        if claimed != 1 {
            return Ok(SettleOutcome::AlreadySettled);
        }
        if refund == 0 {
            return Ok(SettleOutcome::Settled);
        }
        let parse = |i: usize, name: &str| -> StoreResult<String> {
            field(i).ok_or_else(|| corrupt(&rsv, format!("missing {name}")))
        };
        let bucket = parse(1, rf::BUCKET)?;
        let amount: u64 = parse(3, rf::AMOUNT)?
            .parse()
            .map_err(|e| corrupt(&rsv, format!("amount: {e}")))?;
        let refund = refund.min(amount);
        if refund == 0 {
            return Ok(SettleOutcome::Settled);
        }
        let adjust = match kind.as_str() {
            schema::KIND_CREDITS => Adjust::Credits {
                bal: schema::balance(account_id, &bucket),
                amount: refund,
                expires_at_ms: field(2).and_then(|t| t.parse().ok()),
            },
            schema::KIND_SPEND => Adjust::Spend {
                spend: schema::spend(account_id, &bucket),
                amount: refund,
            },
            other => return Err(corrupt(&rsv, format!("unknown kind {other}"))),
        };
        let fix = Fix {
            rsv,
            marker: rf::REFUND_APPLIED,
            adjust,
            fields: vec![(rf::REFUNDED, refund.to_string())],
            rsv_ttl_ms: None,
            xdel: None,
        };
        self.fix_or_repair(fix).await?;
        Ok(SettleOutcome::Settled)
    }
}

fn backoff(attempt: u32) -> Duration {
    let ms = 50u64.saturating_mul(1u64 << attempt.min(10)).min(2_000);
    Duration::from_millis(ms)
}

/// A money change that must happen exactly once.
enum Adjust {
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
struct Fix {
    rsv: String,
    marker: &'static str,
    adjust: Adjust,
    fields: Vec<(&'static str, String)>,
    rsv_ttl_ms: Option<i64>,
    xdel: Option<String>,
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

fn account_fields(a: &Account) -> Vec<(&'static str, String)> {
    vec![
        (af::ID, a.id.clone()),
        (af::PLAN, a.plan.clone()),
        (af::STATUS, a.status.as_str().to_string()),
        (af::PERIOD_ANCHOR_MS, a.period_anchor_ms.to_string()),
        (
            af::PAY_PER_USE,
            if a.pay_per_use { "1" } else { "0" }.to_string(),
        ),
        (af::SPENDING_LIMIT_CENTS, a.spending_limit_cents.to_string()),
        (
            af::STRIPE_CUSTOMER_ID,
            a.stripe_customer_id.clone().unwrap_or_default(),
        ),
        (af::CREATED_MS, a.created_ms.to_string()),
    ]
}

fn parse_account(key: &str, mut h: HashMap<String, String>) -> StoreResult<Account> {
    let mut take = |name: &str| {
        h.remove(name)
            .ok_or_else(|| corrupt(key, format!("missing field {name}")))
    };
    let id = take(af::ID)?;
    let plan = take(af::PLAN)?;
    let status_text = take(af::STATUS)?;
    let status = SubscriptionStatus::parse(&status_text)
        .ok_or_else(|| corrupt(key, format!("status {status_text:?}")))?;
    let period_anchor_ms = take(af::PERIOD_ANCHOR_MS)?
        .parse()
        .map_err(|e| corrupt(key, format!("{}: {e}", af::PERIOD_ANCHOR_MS)))?;
    let pay_per_use = take(af::PAY_PER_USE)? == "1";
    let spending_limit_cents = take(af::SPENDING_LIMIT_CENTS)?
        .parse()
        .map_err(|e| corrupt(key, format!("{}: {e}", af::SPENDING_LIMIT_CENTS)))?;
    let stripe = take(af::STRIPE_CUSTOMER_ID)?;
    let created_ms = take(af::CREATED_MS)?
        .parse()
        .map_err(|e| corrupt(key, format!("{}: {e}", af::CREATED_MS)))?;
    Ok(Account {
        id,
        plan,
        status,
        period_anchor_ms,
        pay_per_use,
        spending_limit_cents,
        stripe_customer_id: (!stripe.is_empty()).then_some(stripe),
        created_ms,
    })
}

fn parse_key(key: &str, json: &str) -> StoreResult<KeyRecord> {
    serde_json::from_str(json).map_err(|e| corrupt(key, e))
}

fn to_json(key: &KeyRecord) -> StoreResult<String> {
    serde_json::to_string(key).map_err(|e| corrupt(&schema::key_id(&key.id), e))
}

/// The fields of a pay-per-use reservation record: what settlement reads plus what was priced
/// and reported (kept for an operator tracing a Stripe charge back to its request).
fn spend_record_fields(
    account_id: &str,
    bucket: &str,
    amount: u64,
    meta: &super::ChargeMeta,
) -> Vec<(&'static str, String)> {
    vec![
        (rf::KIND, schema::KIND_SPEND.to_string()),
        (rf::ACCOUNT, account_id.to_string()),
        (rf::BUCKET, bucket.to_string()),
        (rf::AMOUNT, amount.to_string()),
        (rf::OPERATION, meta.operation.clone()),
        (rf::MODEL, meta.model.clone()),
        (rf::QUANTITY, meta.quantity.to_string()),
        (rf::UNIT_AMOUNT, meta.unit_amount.to_string()),
        (rf::CATALOG_VERSION, meta.catalog_version.to_string()),
        (rf::CREATED_MS, meta.created_ms.to_string()),
    ]
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
        let mut p = redis::pipe();
        p.atomic();
        for (i, (field, value)) in account_fields(account).into_iter().enumerate() {
            p.cmd("HSETNX").arg(&key).arg(field).arg(value);
            if i > 0 {
                p.ignore();
            }
        }
        // The customer index, in the same step when no other account holds it (a stale or
        // foreign entry is overwritten below once the account is known to be new).
        if let Some(customer) = &account.stripe_customer_id {
            p.cmd("SET")
                .arg(schema::stripe_customer(customer))
                .arg(&account.id)
                .arg("NX")
                .ignore();
        }
        let Some(bucket) = signup else {
            let (created,): (i64,) = link.pipe(&p).await?;
            if created == 1 {
                index_customer(&link, account).await;
            }
            return Ok(created == 1);
        };
        let bal = schema::balance(&account.id, &bucket.id);
        seed_bucket(&mut p, &bal, bucket);
        let (created, seeded): (i64, Option<String>) = link.pipe(&p).await?;
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

    /// Overwrites every field; on a missing account this creates it (callers read first).
    async fn update_account(&self, account: &Account) -> StoreResult<()> {
        let link = self.link().await?;
        let key = schema::account(&account.id);
        let mut p = redis::pipe();
        p.atomic();
        p.cmd("HSET")
            .arg(&key)
            .arg(account_fields(account))
            .ignore();
        // A previous customer's index entry is left behind: lookups check it against the account.
        if let Some(customer) = &account.stripe_customer_id {
            p.cmd("SET")
                .arg(schema::stripe_customer(customer))
                .arg(&account.id)
                .ignore();
        }
        let () = link.pipe(&p).await?;
        Ok(())
    }

    async fn set_spending_limit(&self, account_id: &str, cents: u64) -> StoreResult<()> {
        let link = self.link().await?;
        let _: i64 = link
            .cmd(
                redis::cmd("HSET")
                    .arg(schema::account(account_id))
                    .arg(af::SPENDING_LIMIT_CENTS)
                    .arg(cents.to_string()),
            )
            .await?;
        Ok(())
    }

    async fn insert_key(&self, key_hash: &str, key: &KeyRecord) -> StoreResult<()> {
        let link = self.link().await?;
        let seq: i64 = link.cmd(redis::cmd("INCR").arg(schema::KEY_SEQ)).await?;
        let mut p = redis::pipe();
        p.atomic();
        p.cmd("SET")
            .arg(schema::key_record(key_hash))
            .arg(to_json(key)?)
            .ignore();
        p.cmd("SET")
            .arg(schema::key_id(&key.id))
            .arg(key_hash)
            .ignore();
        if !key.revoked {
            p.cmd("ZADD")
                .arg(schema::account_keys(&key.account_id))
                .arg(seq)
                .arg(&key.id)
                .ignore();
        }
        let () = link.pipe(&p).await?;
        Ok(())
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
        let id_keys: Vec<String> = ids.iter().map(|id| schema::key_id(id)).collect();
        let hashes: Vec<Option<String>> = link.cmd(redis::cmd("MGET").arg(&id_keys)).await?;
        let record_keys: Vec<String> = hashes
            .into_iter()
            .flatten()
            .map(|h| schema::key_record(&h))
            .collect();
        if record_keys.is_empty() {
            return Ok(Vec::new());
        }
        let records: Vec<Option<String>> = link.cmd(redis::cmd("MGET").arg(&record_keys)).await?;
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
        let mut p = redis::pipe();
        p.atomic();
        p.cmd("SET").arg(&key).arg(to_json(&revoked)?).ignore();
        p.cmd("ZREM")
            .arg(schema::account_keys(&before.account_id))
            .arg(key_id)
            .ignore();
        let () = link.pipe(&p).await?;
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
        let (balance,): (i64,) = link.pipe(&p).await?;
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
        let _: Option<String> = link.cmd(&cmd).await?;
        Ok(())
    }

    async fn reserve_credits(&self, r: &CreditReservation) -> StoreResult<CreditReserveOutcome> {
        let link = self.link().await?;
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
        let cmds = vec![
            seed_bucket_cmd(&bal, &r.bucket),
            command("DECRBY", &bal, amount),
            command("HSET", &rsv, &fields),
            command("PEXPIRE", &rsv, r.record_ttl_ms.max(1)),
        ];
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
        let spend = schema::spend(&r.account_id, &r.month);
        let rsv = schema::reservation(&r.account_id, &r.reservation_id);
        let amount = int(r.amount_micro);
        let mut fields = spend_record_fields(&r.account_id, &r.month, r.amount_micro, &r.meta);
        if let Some(report) = &r.report {
            fields.push((rf::CUSTOMER, report.customer_id.clone()));
            fields.push((rf::REPORT_VALUE, report.value.to_string()));
        }
        let mut cmds = vec![
            command("INCRBY", &spend, amount),
            command("PEXPIRE", &spend, schema::SPEND_TTL_MS),
            command("HSET", &rsv, &fields),
            command("PEXPIRE", &rsv, r.record_ttl_ms.max(1)),
        ];
        if let Some(report) = &r.report {
            let mut xadd = redis::cmd("XADD");
            xadd.arg(schema::OUTBOX).arg("*").arg(&[
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
        let reported = r.report.is_some();
        let answer = link.transact(cmds).await.and_then(|mut replies| {
            let spent = reply::<i64>(&mut replies, 0, &spend)?;
            let entry = match reported {
                true => Some(reply::<String>(&mut replies, 4, schema::OUTBOX)?),
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
            xdel: entry,
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
        self.link()
            .await?
            .settle(account_id, reservation_id, refund)
            .await
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
}

/// Points the customer index at a newly created account: a second, idempotent trip that
/// overwrites an entry the transaction's `SET NX` left to a stale or other account. A failure
/// is logged (the `SET NX` usually wrote it already; the next `update_account` writes it again).
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
