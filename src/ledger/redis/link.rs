//! The ledger's one multiplexed Redis connection and its calls: every round trip timed on
//! Pingora's timer wheel, and shared transactions ([`Link::transact`]) that send the
//! transactions concurrent requests start together as one `MULTI/EXEC`.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{Cmd, FromRedisValue, Pipeline, RedisError, Value};
use tokio::sync::{oneshot, Semaphore};

use super::unavailable;
use crate::ledger::{StoreError, StoreResult};

/// One connection plus the per-call timeout; cheap to clone into background repairs.
#[derive(Clone)]
pub(super) struct Link {
    pub(super) conn: ConnectionManager,
    pub(super) timeout: Duration,
    pub(super) repairs: Arc<Semaphore>,
    /// Transactions waiting for this connection's next coalesced `MULTI/EXEC`.
    pub(super) waiting: Arc<Mutex<Vec<Waiting>>>,
    /// How long usage history is kept (ms): `billing.usage_retention_days`.
    pub(super) usage_keep_ms: i64,
}

/// One caller's transaction in a coalesced `MULTI/EXEC`: its commands and where its replies go.
pub(super) struct Waiting {
    cmds: Vec<Cmd>,
    reply: oneshot::Sender<StoreResult<Vec<Value>>>,
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
    pub(super) async fn cmd<T: FromRedisValue>(&self, cmd: &Cmd) -> StoreResult<T> {
        let mut conn = self.conn.clone();
        self.timed(cmd.query_async(&mut conn)).await
    }

    /// One pipeline (a `MULTI/EXEC` when `atomic()`), one round trip.
    pub(super) async fn pipe<T: FromRedisValue>(&self, p: &Pipeline) -> StoreResult<T> {
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
        match pingora::time::fast_timeout::fast_timeout(self.timeout, answer).await {
            Ok(Ok(Ok(values))) => Ok(values),
            Ok(Ok(Err(e))) => Err(e),
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
        match self.pipe::<Vec<Value>>(&p).await {
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
