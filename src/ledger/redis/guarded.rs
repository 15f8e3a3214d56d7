//! Account changes that depend on what their caller read — a plan change's top-up, a
//! subscription event's order — or on a balance (a re-anchored period's), made atomic with
//! `WATCH`/`MULTI`/`EXEC` on a connection of their own, opened for the one change and closed
//! after it. Never on the shared multiplexed [`Link`](super::link::Link): `WATCH` belongs to
//! a connection, so any other caller's `MULTI/EXEC` on it would end (or trip) the watch.
//! Called by [`Ledger::change_account_if`](crate::ledger::Ledger::change_account_if); the
//! retry after a [`GuardedChange::Conflict`] is the caller's (it decides again on what it reads).

use std::collections::HashMap;
use std::future::Future;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ErrorKind, RedisError, ServerErrorKind};

use super::link::{enough_replicas, wait_ms};
use super::records::{change_fields, parse_account};
use super::retry::did_not_run;
use super::usage::add_cmds;
use super::{int, now_ms, seed_bucket_cmd, unavailable, RedisLedger};
use crate::ledger::schema;
use crate::ledger::{
    Account, AccountChange, CreditBucket, CreditChange, GuardedChange, StoreError, StoreResult,
    SubscriptionEvent, UsageEntry, UsageKind,
};

impl RedisLedger {
    /// One attempt: watch the account (and the subscription's event order), check it is still
    /// `expected`, then write everything in one `MULTI/EXEC` that fails if either key changed.
    pub(super) async fn guarded_change(
        &self,
        expected: &Account,
        change: &AccountChange,
        credits: &[CreditChange],
        event: Option<&SubscriptionEvent>,
    ) -> StoreResult<GuardedChange> {
        let acct = schema::account(&expected.id);
        let subs = schema::subscription_events(&expected.id);
        // The balances a carry reads are watched too: a reservation in between is a conflict.
        let carried: Vec<String> = credits
            .iter()
            .filter_map(|c| match c {
                CreditChange::Carry { from, .. } => Some(schema::balance(&expected.id, &from.id)),
                _ => None,
            })
            .collect();
        // The customer index first, a step of its own (another slot on a cluster; lookups check
        // it against the account, so pointing at the account before the change is harmless).
        if let Some(customer) = &change.stripe_customer_id {
            let () = self
                .link()
                .await?
                .cmd(
                    redis::cmd("SET")
                        .arg(schema::stripe_customer(customer))
                        .arg(&expected.id),
                )
                .await?;
        }
        let mut watch = redis::cmd("WATCH");
        watch.arg(&acct).arg(&subs).arg(&carried);
        let Some(mut conn) = self.watching(&watch).await? else {
            return Ok(GuardedChange::Conflict);
        };
        let mut read = redis::pipe();
        read.cmd("HGETALL").arg(&acct);
        read.cmd("HGET")
            .arg(&subs)
            .arg(event.map_or("", |e| e.subscription_id.as_str()));
        let (stored, last): (HashMap<String, String>, Option<i64>) =
            self.within(read.query_async(&mut conn)).await?;
        if stored.is_empty() || parse_account(&acct, stored)? != *expected {
            return Ok(GuardedChange::Conflict);
        }
        if let (Some(event), Some(last)) = (event, last) {
            if last > event.created_s {
                return Ok(GuardedChange::Stale {
                    last_created_s: last,
                });
            }
        }
        let mut left: Vec<Option<i64>> = Vec::new();
        for bal in &carried {
            left.push(self.query(&mut conn, redis::cmd("GET").arg(bal)).await?);
        }
        let mut left = left.into_iter();
        let keep_ms = self.usage_keep_ms;
        let mut p = redis::pipe();
        p.atomic();
        let fields = change_fields(change);
        if !fields.is_empty() {
            p.cmd("HSET").arg(&acct).arg(&fields).ignore();
        }
        if let Some(event) = event {
            p.cmd("HSET")
                .arg(&subs)
                .arg(&event.subscription_id)
                .arg(event.created_s)
                .ignore();
        }
        for credit in credits {
            match credit {
                CreditChange::Grant { bucket, amount } => {
                    let bal = schema::balance(&expected.id, &bucket.id);
                    p.add_command(seed_bucket_cmd(&bal, bucket)).ignore();
                    p.cmd("INCRBY").arg(&bal).arg(int(*amount)).ignore();
                    record(
                        &mut p,
                        &expected.id,
                        UsageKind::Grant,
                        bucket,
                        *amount,
                        keep_ms,
                    );
                }
                CreditChange::Reset { bucket, balance } => {
                    set_balance(&mut p, &expected.id, bucket, int(*balance));
                    record(
                        &mut p,
                        &expected.id,
                        UsageKind::Reset,
                        bucket,
                        *balance,
                        keep_ms,
                    );
                }
                CreditChange::Carry { from, to, add } => {
                    let had = match left.next().flatten() {
                        Some(value) => value.max(0),
                        None => int(from.allowance),
                    };
                    let balance = had.saturating_add(int(*add));
                    set_balance(&mut p, &expected.id, to, balance);
                    let balance = u64::try_from(balance).unwrap_or(0);
                    record(&mut p, &expected.id, UsageKind::Reset, to, balance, keep_ms);
                }
            }
        }
        p.cmd("HGETALL").arg(&acct);
        // `EXEC` answers nil when a watched key changed: nothing was written. A cluster refusal
        // (the slot moving, its master failing over) also ran nothing: the caller reads again.
        let written = pingora::time::fast_timeout::fast_timeout(
            self.command_timeout,
            p.query_async::<Option<(HashMap<String, String>,)>>(&mut conn),
        )
        .await;
        let written = match written {
            Ok(Ok(written)) => written,
            Ok(Err(e)) if did_not_run(&e) => None,
            Ok(Err(e)) => return Err(unavailable(e)),
            Err(_) => return Err(StoreError::Timeout),
        };
        if written.is_some() {
            // With `store.wait_replicas`, the change is acknowledged like every money write.
            self.replicated_on(&mut conn).await?;
        }
        match written {
            Some((after,)) => Ok(GuardedChange::Applied(parse_account(&acct, after)?)),
            None => Ok(GuardedChange::Conflict),
        }
    }

    /// A connection of its own to the node that holds the watched keys, with `watch` sent on it:
    /// the one node, or on a cluster the master of the account's slot (found by following
    /// `MOVED` from a seed). `None` when the cluster refused for now (a slot moving, a failover).
    async fn watching(&self, watch: &redis::Cmd) -> StoreResult<Option<MultiplexedConnection>> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.command_timeout))
            .set_response_timeout(None);
        let mut candidates: Vec<String> = self.nodes.urls().to_vec();
        let mut last = StoreError::Unavailable("no store node to connect to".into());
        let mut hops = 0;
        while !candidates.is_empty() {
            let url = candidates.remove(0);
            let client = redis::Client::open(url.as_str()).map_err(unavailable)?;
            let mut conn = match self
                .within(client.get_multiplexed_async_connection_with_config(&config))
                .await
            {
                Ok(conn) => conn,
                Err(e) => {
                    // A seed that is down: the next one may answer.
                    last = e;
                    continue;
                }
            };
            let sent = pingora::time::fast_timeout::fast_timeout(
                self.command_timeout,
                watch.query_async::<()>(&mut conn),
            )
            .await;
            match sent {
                Ok(Ok(())) => return Ok(Some(conn)),
                Ok(Err(e)) if hops < 3 && e.kind() == ErrorKind::Server(ServerErrorKind::Moved) => {
                    hops += 1;
                    if let Some((addr, _slot)) = e.redirect_node() {
                        candidates.insert(0, format!("redis://{addr}"));
                    }
                }
                Ok(Err(e)) if did_not_run(&e) => return Ok(None),
                Ok(Err(e)) => return Err(unavailable(e)),
                Err(_) => return Err(StoreError::Timeout),
            }
        }
        Err(last)
    }

    /// `WAIT store.wait_replicas` on a guarded change's own connection.
    async fn replicated_on(&self, conn: &mut MultiplexedConnection) -> StoreResult<()> {
        let n = self.wait_replicas;
        if n == 0 {
            return Ok(());
        }
        let acked: i64 = self
            .query(
                conn,
                redis::cmd("WAIT").arg(n).arg(wait_ms(self.command_timeout)),
            )
            .await?;
        enough_replicas(acked, n)
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        conn: &mut MultiplexedConnection,
        cmd: &redis::Cmd,
    ) -> StoreResult<T> {
        self.within(cmd.query_async(conn)).await
    }

    /// One step of a guarded change, under the ledger's command timeout.
    async fn within<T>(&self, f: impl Future<Output = Result<T, RedisError>>) -> StoreResult<T> {
        match pingora::time::fast_timeout::fast_timeout(self.command_timeout, f).await {
            Ok(result) => result.map_err(unavailable),
            Err(_) => Err(StoreError::Timeout),
        }
    }
}

/// The usage entry of a credit write, into the same transaction.
fn record(
    p: &mut redis::Pipeline,
    account_id: &str,
    kind: UsageKind,
    bucket: &CreditBucket,
    amount: u64,
    keep_ms: i64,
) {
    let entry = UsageEntry::credit_change(kind, &bucket.id, amount, now_ms());
    for c in add_cmds(account_id, &entry, keep_ms) {
        p.add_command(c).ignore();
    }
}

/// `SET bal <balance> [PXAT exp]` into the transaction.
fn set_balance(p: &mut redis::Pipeline, account_id: &str, bucket: &CreditBucket, balance: i64) {
    let cmd = p
        .cmd("SET")
        .arg(schema::balance(account_id, &bucket.id))
        .arg(balance);
    if let Some(exp) = bucket.expires_at_ms {
        cmd.arg("PXAT").arg(exp);
    }
    cmd.ignore();
}
