//! The Redis side of async jobs: recording an accepted job's hold and finding it again.
//! `record_job` is `SET cg:job:<id> <account> PX keep` (the callback's index, a step of its own
//! since it is in another slot on a cluster; a lookup checks the job record it leads to), then
//! one `MULTI { SET cg:{a}:job:<id> <json> PX keep; ZADD holds XX <lease> <rsv>;
//! SADD <lane>lease:<slot> <account>; ZADD <lane>lease:due <slot> <slot>; PEXPIRE rsv keep }`:
//! the hold moves to the lease slot the job's TTL ends
//! in, atomically with the record that lets the job settle it. `ZADD XX` only re-scores a hold
//! still listed, so a hold settled meanwhile is not revived; the sweeper reads each hold's score
//! (not the slot it was first listed in), so the hold's old slot passes it by. Exactly-once
//! settlement stays with the ordinary settlement claim ([`super::settlement`]).

use super::link::Link;
use super::{command, corrupt, lease_cmds, schema};
use crate::ledger::{JobHold, StoreResult};

impl Link {
    pub(super) async fn record_job(
        &self,
        job: &JobHold,
        lease_until_ms: i64,
        keep_ms: i64,
    ) -> StoreResult<()> {
        let key = schema::job(&job.account_id, &job.job_id);
        let json = serde_json::to_string(job).map_err(|e| corrupt(&key, e))?;
        let keep = keep_ms.max(1);
        self.ensure_lane(&job.account_id).await?;
        let () = self
            .cmd(
                redis::cmd("SET")
                    .arg(schema::job_index(&job.job_id))
                    .arg(&job.account_id)
                    .arg("PX")
                    .arg(keep),
            )
            .await?;
        let mut p = redis::pipe();
        p.atomic();
        p.cmd("SET")
            .arg(&key)
            .arg(json)
            .arg("PX")
            .arg(keep)
            .ignore();
        // Re-scores only a hold still listed (unsettled).
        p.cmd("ZADD")
            .arg(schema::holds(&job.account_id))
            .arg("XX")
            .arg(lease_until_ms)
            .arg(&job.reservation_id)
            .ignore();
        let [_, work, due] = lease_cmds(
            self.lane(&job.account_id),
            &job.account_id,
            &job.reservation_id,
            lease_until_ms,
        );
        p.add_command(work).ignore();
        p.add_command(due).ignore();
        p.add_command(command(
            "PEXPIRE",
            &schema::reservation(&job.account_id, &job.reservation_id),
            keep,
        ))
        .ignore();
        let () = self.tx(&p).await?;
        Ok(())
    }

    pub(super) async fn account_job(
        &self,
        account_id: &str,
        job_id: &str,
    ) -> StoreResult<Option<JobHold>> {
        let key = schema::job(account_id, job_id);
        let json: Option<String> = self.cmd(redis::cmd("GET").arg(&key)).await?;
        let Some(json) = json else {
            return Ok(None);
        };
        let job: JobHold = serde_json::from_str(&json).map_err(|e| corrupt(&key, e))?;
        Ok(Some(job))
    }

    pub(super) async fn find_job(&self, job_id: &str) -> StoreResult<Option<JobHold>> {
        let account: Option<String> = self
            .cmd(redis::cmd("GET").arg(schema::job_index(job_id)))
            .await?;
        match account {
            Some(account) => self.account_job(&account, job_id).await,
            None => Ok(None),
        }
    }
}
