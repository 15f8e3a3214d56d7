//! The ledger's one multiplexed Redis connection (a node's or a cluster's) and its calls: every
//! round trip timed on Pingora's timer wheel and retried only after an error that proves it did
//! not run ([`retry`](super::retry)); shared transactions ([`Link::transact`]) that send the
//! transactions concurrent requests start together as one `MULTI/EXEC` per cluster slot; and,
//! with `store.wait_replicas = N`, a `WAIT N` after each money transaction.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::{Cmd, FromRedisValue, Pipeline, RedisError, Value};
use tokio::sync::{oneshot, Semaphore};

use super::retry::{self, did_not_run};
use super::store::StoreConn;
use super::unavailable;
use crate::ledger::lane::{key_slot, Lane};
use crate::ledger::{StoreError, StoreResult};

/// One connection plus the per-call timeout; cheap to clone into background repairs.
#[derive(Clone)]
pub(super) struct Link {
    pub(super) conn: StoreConn,
    pub(super) timeout: Duration,
    /// `store.wait_replicas`: replicas that must acknowledge each money transaction (0: none).
    pub(super) wait_replicas: u8,
    pub(super) repairs: Arc<Semaphore>,
    /// Transactions waiting for this connection's next coalesced `MULTI/EXEC`.
    pub(super) waiting: Arc<Mutex<Vec<Waiting>>>,
    /// The lanes (cluster slots) this process has put on `cg:lanes`.
    pub(super) lanes_known: Arc<Mutex<std::collections::HashSet<u16>>>,
    /// How long usage history is kept (ms): `billing.usage_retention_days`.
    pub(super) usage_keep_ms: i64,
}

/// One caller's transaction in a coalesced `MULTI/EXEC`: its commands and where its replies go.
pub(super) struct Waiting {
    cmds: Vec<Cmd>,
    reply: oneshot::Sender<StoreResult<Vec<Value>>>,
}

impl Link {
    /// Whether the store is a Redis Cluster (its work lists are per lane).
    pub(super) fn cluster(&self) -> bool {
        self.conn.is_cluster()
    }

    /// The lane of an account's work lists.
    pub(super) fn lane(&self, account_id: &str) -> Lane {
        Lane::of_account(self.cluster(), account_id)
    }

    /// The lanes in use (see [`StoreConn::lanes`]).
    pub(super) async fn lanes(&self) -> StoreResult<Vec<Lane>> {
        self.attempt(None, |mut conn| async move { conn.lanes().await })
            .await
    }

    /// Puts an account's lane on the walkers' list (`SADD cg:lanes <slot>`), on a cluster,
    /// before anything of the account is written. Each process does it once per lane (at most
    /// 16384 times in its life): account creation always, the reservations when this process
    /// has not registered the lane yet (an account made by another instance or version).
    pub(super) async fn register_lane(&self, account_id: &str) -> StoreResult<()> {
        let Some(slot) = self.lane(account_id).slot() else {
            return Ok(());
        };
        let _: i64 = self
            .cmd(redis::cmd("SADD").arg(crate::ledger::lane::LANES).arg(slot))
            .await?;
        if let Ok(mut known) = self.lanes_known.lock() {
            known.insert(slot);
        }
        Ok(())
    }

    /// [`Link::register_lane`] unless this process did already.
    pub(super) async fn ensure_lane(&self, account_id: &str) -> StoreResult<()> {
        let Some(slot) = self.lane(account_id).slot() else {
            return Ok(());
        };
        let known = self
            .lanes_known
            .lock()
            .map(|known| known.contains(&slot))
            .unwrap_or(false);
        match known {
            true => Ok(()),
            false => self.register_lane(account_id).await,
        }
    }

    /// How long a caller waits for a call with its retries at most.
    pub(super) fn patience(&self) -> Duration {
        self.timeout * retry::ATTEMPTS + Duration::from_millis(200)
    }

    /// Runs `call` on the connection, each attempt under the command timeout (Pingora's shared
    /// 10 ms timer wheel: nothing is registered unless the call is still pending, and never a
    /// wake-up of the runtime's driver per call, as Tokio's timer does), again after an error
    /// that proves it did not run.
    /// `key` is the call's first key: after a `MOVED` the cluster client is made to learn the
    /// slot's new node from it ([`Link::relearn`]).
    async fn attempt<T, F, Fut>(&self, key: Option<&[u8]>, mut call: F) -> StoreResult<T>
    where
        F: FnMut(StoreConn) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let mut tries = 0;
        loop {
            tries += 1;
            match pingora::time::fast_timeout::fast_timeout(self.timeout, call(self.conn.clone()))
                .await
            {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) if tries < retry::ATTEMPTS && did_not_run(&e) => {
                    tracing::debug!(error = %e, attempt = tries, "store refused before running; retrying");
                    if self.cluster() && retry::moved(&e) {
                        self.relearn(key).await;
                    }
                    tokio::time::sleep(retry::pause(tries)).await;
                }
                Ok(Err(e)) => return Err(unavailable(e)),
                Err(_) => return Err(StoreError::Timeout),
            }
        }
    }

    /// Makes the cluster client rebuild its slot map: a `MOVED` answered to a queued command of
    /// a transaction does not, one answered to a single command does. `EXISTS key` (read-only,
    /// its answer unused) is that single command.
    async fn relearn(&self, key: Option<&[u8]>) {
        let Some(key) = key else {
            return;
        };
        let mut conn = self.conn.clone();
        let probe = redis::cmd("EXISTS").arg(key).to_owned();
        let _ = pingora::time::fast_timeout::fast_timeout(
            self.timeout,
            probe.query_async::<redis::Value>(&mut conn),
        )
        .await;
    }

    /// One command, one round trip.
    pub(super) async fn cmd<T: FromRedisValue>(&self, cmd: &Cmd) -> StoreResult<T> {
        let key = first_key(cmd);
        self.attempt(
            key,
            |mut conn| async move { cmd.query_async(&mut conn).await },
        )
        .await
    }

    /// One pipeline (a `MULTI/EXEC` when `atomic()`), one round trip. On a cluster every key of
    /// it must be in one slot.
    pub(super) async fn pipe<T: FromRedisValue>(&self, p: &Pipeline) -> StoreResult<T> {
        let key = p.cmd_iter().find_map(first_key);
        self.attempt(
            key,
            |mut conn| async move { p.query_async(&mut conn).await },
        )
        .await
    }

    /// `GET` of each key, concurrently (the connection pipelines them; on a cluster each goes to
    /// its slot's node).
    pub(super) async fn get_each(&self, keys: &[String]) -> StoreResult<Vec<Option<String>>> {
        let mut calls = tokio::task::JoinSet::new();
        for (i, key) in keys.iter().enumerate() {
            let link = self.clone();
            let key = key.clone();
            calls.spawn(async move {
                let value: StoreResult<Option<String>> =
                    link.cmd(redis::cmd("GET").arg(&key)).await;
                (i, value)
            });
        }
        let mut values = vec![None; keys.len()];
        while let Some(done) = calls.join_next().await {
            let (i, value) =
                done.map_err(|e| StoreError::Unavailable(format!("key lookup failed: {e}")))?;
            if let Some(slot) = values.get_mut(i) {
                *slot = value?;
            }
        }
        Ok(values)
    }

    /// A money transaction (`p` is `atomic()`): [`Link::pipe`], then acknowledged by
    /// `store.wait_replicas` replicas when set.
    pub(super) async fn tx<T: FromRedisValue>(&self, p: &Pipeline) -> StoreResult<T> {
        let answer = self.pipe(p).await?;
        self.replicated(p.cmd_iter().find_map(first_key)).await?;
        Ok(answer)
    }

    /// With `store.wait_replicas = N`: `WAIT N` on the node the writes of `key`'s slot went to
    /// ([`StoreConn::wait_replicas`]), an error when fewer replicas acknowledged this
    /// connection's writes within the command timeout (the write stands on the master; the
    /// caller treats its outcome as unknown and fails closed).
    async fn replicated(&self, key: Option<&[u8]>) -> StoreResult<()> {
        let n = self.wait_replicas;
        if n == 0 {
            return Ok(());
        }
        let Some(key) = key else {
            return Err(StoreError::Unavailable(
                "a write without a key cannot be acknowledged by replicas".into(),
            ));
        };
        let mut conn = self.conn.clone();
        let acked = match pingora::time::fast_timeout::fast_timeout(
            self.timeout + Duration::from_millis(50),
            conn.wait_replicas(key, n, wait_ms(self.timeout)),
        )
        .await
        {
            Ok(Ok(acked)) => acked,
            Ok(Err(e)) => return Err(unavailable(e)),
            Err(_) => return Err(StoreError::Timeout),
        };
        enough_replicas(acked, n)
    }

    /// Runs `cmds` as one transaction and answers their replies, in order. Transactions that
    /// other requests (on any worker thread) start before the flushing task gets its turn join
    /// the same `MULTI/EXEC`: one round trip, one `MULTI`/`EXEC` pair and one wake-up of
    /// Redis for all of them. Each caller's commands stay atomic (a bigger transaction is still
    /// one); a command's error reaches only its own caller (errors are kept per reply, as
    /// `MULTI/EXEC` itself does). With nothing else ready the flush runs at once, so an idle
    /// gateway pays one task hop. On a cluster one `MULTI/EXEC` per slot is sent (concurrently),
    /// since one transaction's keys must share a slot; every caller's commands are of one account.
    pub(super) async fn transact(&self, cmds: Vec<Cmd>) -> StoreResult<Vec<Value>> {
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
        match pingora::time::fast_timeout::fast_timeout(self.patience(), answer).await {
            Ok(Ok(Ok(values))) => Ok(values),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(StoreError::Unavailable("transaction dropped".into())),
            Err(_) => Err(StoreError::Timeout),
        }
    }

    /// Sends every waiting transaction as one `MULTI/EXEC` per slot and hands each its replies.
    async fn flush(&self) {
        let batch = match self.waiting.lock() {
            Ok(mut waiting) => std::mem::take(&mut *waiting),
            Err(_) => return,
        };
        if !self.cluster() {
            return self.flush_slot(batch).await;
        }
        let mut slots: Vec<(u16, Vec<Waiting>)> = Vec::new();
        for w in batch {
            let slot = w.cmds.iter().find_map(first_key_slot).unwrap_or_default();
            match slots.iter_mut().find(|(s, _)| *s == slot) {
                Some((_, group)) => group.push(w),
                None => slots.push((slot, vec![w])),
            }
        }
        // Each slot's transaction on its own task, so the slots' nodes answer concurrently.
        for (_, group) in slots {
            let link = self.clone();
            tokio::spawn(async move { link.flush_slot(group).await });
        }
    }

    /// One `MULTI/EXEC` of the transactions of one slot.
    async fn flush_slot(&self, batch: Vec<Waiting>) {
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
        // Every caller gets the same kind of error: a timed-out flush is a timeout for each.
        let failed = |e: StoreError, shares: Vec<(usize, oneshot::Sender<_>)>| {
            for (_, reply) in shares {
                let _ = reply.send(Err(match &e {
                    StoreError::Timeout => StoreError::Timeout,
                    StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
                    StoreError::Corrupt { key, detail } => StoreError::Corrupt {
                        key: key.clone(),
                        detail: detail.clone(),
                    },
                }));
            }
        };
        let answer = match self.pipe::<Vec<Value>>(&p).await {
            Ok(values) => self
                .replicated(p.cmd_iter().find_map(first_key))
                .await
                .map(|()| values),
            Err(e) => Err(e),
        };
        match answer {
            Ok(values) if values.len() == expected => {
                let mut values = values.into_iter();
                for (n, reply) in shares {
                    let mine: Vec<Value> = values.by_ref().take(n).collect();
                    let answer = match mine.iter().find_map(|v| match v {
                        Value::ServerError(e) => Some(e.to_string()),
                        _ => None,
                    }) {
                        Some(error) => Err(StoreError::Unavailable(error)),
                        None => Ok(mine),
                    };
                    let _ = reply.send(answer);
                }
            }
            Ok(values) => failed(
                StoreError::Unavailable(format!(
                    "EXEC answered {} replies for {expected} commands",
                    values.len()
                )),
                shares,
            ),
            Err(e) => failed(e, shares),
        }
    }
}

/// The `WAIT` timeout for a command timeout: as long, in ms.
pub(super) fn wait_ms(timeout: Duration) -> u64 {
    u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)
}

/// `WAIT`'s answer against `store.wait_replicas = n`: an error when fewer acknowledged.
pub(super) fn enough_replicas(acked: i64, n: u8) -> StoreResult<()> {
    match acked >= i64::from(n) {
        true => Ok(()),
        false => Err(StoreError::Unavailable(format!(
            "only {acked} of {n} replicas acknowledged the write (store.wait_replicas)"
        ))),
    }
}

/// A command's key (its first argument after the name), when it has one.
fn first_key(cmd: &Cmd) -> Option<&[u8]> {
    match cmd.args_iter().nth(1)? {
        redis::Arg::Simple(key) => Some(key),
        _ => None,
    }
}

/// The cluster slot of a command's key, when it has one.
pub(super) fn first_key_slot(cmd: &Cmd) -> Option<u16> {
    first_key(cmd).map(key_slot)
}
