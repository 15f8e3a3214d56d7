//! What the ledger keeps about an async job (a `settle = "job"` route's accepted request): the
//! reservation its final state settles, enough to compute a partial refund, stored per account
//! (`GET /api/v1/jobs/{id}` only finds the caller's own jobs) and indexed by job id (the backend
//! callback names only the job). Written by `jobs::record`, read by `jobs` and the admin callback.

use serde::{Deserialize, Serialize};

use super::ChargeMeta;

/// How the job's hold was paid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobPayment {
    Credits,
    Spend,
}

/// One job's hold, as recorded when the backend accepted it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobHold {
    pub job_id: String,
    pub account_id: String,
    pub reservation_id: String,
    pub plan: String,
    pub payment: JobPayment,
    /// Units held (credits, or micro-dollars).
    pub charged: u64,
    pub meta: ChargeMeta,
}
