//! Usage history in Redis: the commands that add (or remove) an entry of the account's
//! `cg:{a:<id>}:usage` zset inside the transaction that moves the money, and the page reader.
//! Called by the reservation, compensation, refund, grant and reset steps of this backend
//! ([`super`], [`super::repair`], [`super::settlement`], [`super::guarded`]).
//!
//! Writing an entry costs three commands in an existing `MULTI`: `ZREMRANGEBYSCORE` (entries
//! older than the retention before the new entry's time, so the writers' clock decides), `ZADD`, `PEXPIRE` (an account that stops moving money is forgotten
//! with its last entry). A page is one round trip: the entries at the cursor's exact time that
//! sort after it (`ZRANGEBYSCORE t t`, normally a handful), and `limit + 1` older ones
//! (`ZREVRANGEBYSCORE`).

use redis::Cmd;

use super::link::Link;
use super::{command, reply, schema};
use crate::ledger::usage::{UsageEntry, UsagePage, UsageQuery};
use crate::ledger::StoreResult;

/// An entry write that is part of a guarded second step ([`super::repair::Fix`]), made only
/// when the step is applied (never by the undo of a surplus application).
pub(super) enum UsageWrite {
    /// The refund's entry: its member is deterministic, so applying twice adds it once.
    Add {
        account_id: String,
        entry: UsageEntry,
    },
    /// The compensation of a refused reservation removes the charge's entry.
    Remove { account_id: String, member: String },
}

impl UsageWrite {
    pub(super) fn cmds(&self, keep_ms: i64) -> Vec<Cmd> {
        match self {
            Self::Add { account_id, entry } => add_cmds(account_id, entry, keep_ms).to_vec(),
            Self::Remove { account_id, member } => {
                vec![command("ZREM", &schema::usage(account_id), member)]
            }
        }
    }
}

/// `ZREMRANGEBYSCORE` past the retention, `ZADD` the entry, `PEXPIRE` the history.
pub(super) fn add_cmds(account_id: &str, entry: &UsageEntry, keep_ms: i64) -> [Cmd; 3] {
    let key = schema::usage(account_id);
    let mut trim = redis::cmd("ZREMRANGEBYSCORE");
    trim.arg(&key)
        .arg("-inf")
        .arg(format!("({}", entry.time_ms.saturating_sub(keep_ms)));
    let mut add = redis::cmd("ZADD");
    add.arg(&key).arg(entry.time_ms).arg(entry.member());
    [trim, add, command("PEXPIRE", &key, keep_ms.max(1))]
}

impl Link {
    /// One page of the account's history (see the module doc).
    pub(super) async fn usage_page(
        &self,
        account_id: &str,
        query: &UsageQuery,
    ) -> StoreResult<UsagePage> {
        let key = schema::usage(account_id);
        let lower = query.from_ms.map_or("-inf".to_string(), |f| f.to_string());
        let mut upper = query.to_ms.map_or("+inf".to_string(), |t| format!("({t}"));
        let mut cmds = Vec::new();
        if let Some(c) = &query.cursor {
            if query.to_ms.is_none_or(|t| c.time_ms < t) {
                upper = format!("({}", c.time_ms);
            }
            cmds.push(command("ZRANGEBYSCORE", &key, (c.time_ms, c.time_ms)));
        }
        let mut older = redis::cmd("ZREVRANGEBYSCORE");
        older
            .arg(&key)
            .arg(&upper)
            .arg(&lower)
            .arg("LIMIT")
            .arg(0)
            .arg(query.limit.saturating_add(1));
        cmds.push(older);
        let n = cmds.len();
        let mut replies = self.pipe_atomic(cmds).await?;
        let mut candidates = Vec::new();
        for i in 0..n {
            let members: Vec<String> = reply(&mut replies, i, &key)?;
            candidates.extend(
                members
                    .iter()
                    .filter_map(|m| UsageEntry::parse_member(m))
                    .filter(|e| query.admits(e)),
            );
        }
        Ok(UsagePage::cut(candidates, query.limit))
    }

    /// `cmds` as one `MULTI/EXEC` on its own (not coalesced), answering every reply.
    async fn pipe_atomic(&self, cmds: Vec<Cmd>) -> StoreResult<Vec<redis::Value>> {
        let mut p = redis::pipe();
        p.atomic();
        for c in cmds {
            p.add_command(c);
        }
        self.pipe(&p).await
    }
}
