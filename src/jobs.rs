//! Async jobs, billed at their final state (routes with `settle = "job"` / `"job_status"`).
//! Decides: what a job-creating answer's job id is (`X-Job-Id`, else the JSON body's `id`); that
//! an accepted job keeps its hold (`X-Credits-Held` / `X-Charge-Usd-Held` instead of Charged)
//! recorded against the job with its lease extended to `billing.job_ttl_s`; what a job-status
//! answer's final state is (`status`: `succeeded` keeps, `failed` / `canceled` refund less the
//! images an `X-Images-Generated` says were made); and that a poll of a job that is not the
//! caller's is a 404, never proxied. A 2xx job-creating answer without a usable job id is
//! settled at once like any request (a 2xx keeps): nothing could ever report its final state.
//! Settlement goes through the ledger's exactly-once claim, so concurrent polls and duplicate
//! callbacks settle a job once. Called by `proxy` (capture and record, poll settlement), `admit`
//! (poll ownership) and the admin API (`POST /admin/jobs/{id}`, the backend's callback).

use std::sync::Arc;
use std::time::Duration;

use pingora::http::ResponseHeader;
use serde_json::{json, Value};

use crate::apikey::random_id;
use crate::auth::Principal;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::ledger::{JobHold, JobPayment, Ledger, SettleOutcome, StoreResult};
use crate::metrics;
use crate::money::MicroUsd;
use crate::reserve::{Payment, Reservation};
use crate::respond::JsonReply;
use crate::rules::{CanonicalPath, RouteMatch, SettleAt};
use crate::settle::{self, Settlement, UpstreamOutcome};

/// The response header a backend may name its job in.
pub const JOB_ID_HEADER: &str = "X-Job-Id";
/// What an accepted job's response says is held (instead of `X-Credits-Charged` /
/// `X-Charge-Usd`); the gateway's alone (an upstream's are removed).
pub const HELD_HEADERS: [&str; 2] = ["X-Credits-Held", "X-Charge-Usd-Held"];
/// The most of a job-creating or job-status answer's body read for its `id` / `status`.
const MAX_JOB_BODY_BYTES: usize = 64 * 1024;
const MAX_JOB_ID_LEN: usize = 128;

/// A job id the gateway accepts from a backend (and in a path): 1–128 of `A-Z a-z 0-9 _ - . :`.
pub fn valid_job_id(id: &str) -> bool {
    (1..=MAX_JOB_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

/// The final states of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalState {
    Succeeded,
    Failed,
    Canceled,
}

impl FinalState {
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "canceled" => Self::Canceled,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
        }
    }
}

/// The (bounded) body of an answer the gateway reads a job id or status from.
#[derive(Debug, Default)]
pub struct BodyCapture {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl BodyCapture {
    pub fn push(&mut self, chunk: &[u8]) {
        if self.bytes.len() + chunk.len() > MAX_JOB_BODY_BYTES {
            self.overflowed = true;
            return;
        }
        self.bytes.extend_from_slice(chunk);
    }

    /// The body as a JSON object's field, `None` when too large, not JSON, or absent.
    fn field(&self, name: &str) -> Option<String> {
        if self.overflowed {
            return None;
        }
        let value: Value = serde_json::from_slice(&self.bytes).ok()?;
        value.get(name)?.as_str().map(str::to_string)
    }
}

/// What the proxy watches of a job-creating or job-status exchange.
#[derive(Debug)]
pub enum Watch {
    /// A `settle = "job"` request: its answer should name a job.
    Creating {
        body: BodyCapture,
        header_id: Option<String>,
        /// Recorded already (from `X-Job-Id`, before the answer went out).
        recorded: bool,
    },
    /// A poll of the caller's own job: its answer may report the final state.
    Polling {
        job: Box<JobHold>,
        body: BodyCapture,
    },
}

impl Watch {
    pub fn push(&mut self, chunk: &[u8]) {
        match self {
            Self::Creating { body, .. } | Self::Polling { body, .. } => body.push(chunk),
        }
    }
}

/// The job id of a job-creating answer: `X-Job-Id`, else the JSON body's `id`; only a valid one.
pub fn job_id_of(header_id: Option<&str>, body: &BodyCapture) -> Option<String> {
    let id = header_id
        .map(|h| h.trim().to_string())
        .or_else(|| body.field("id"))?;
    valid_job_id(&id).then_some(id)
}

/// `X-Job-Id` of an upstream response, if any.
pub fn header_job_id(response: &ResponseHeader) -> Option<String> {
    response
        .headers
        .get(JOB_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_string())
}

/// The headers of an accepted job's answer: what is held, and what is left after the hold.
pub fn held_headers(reservation: &Reservation) -> [(&'static str, String); 2] {
    match reservation.payment {
        Payment::Credits { charged, remaining } => [
            (HELD_HEADERS[0], charged.to_string()),
            ("X-Credits-Remaining", remaining.to_string()),
        ],
        Payment::Spend {
            charged,
            spent,
            limit,
        } => [
            (HELD_HEADERS[1], charged.to_string()),
            (
                "X-Spend-Remaining-Cents",
                MicroUsd(limit.0.saturating_sub(spent.0))
                    .cents_floor()
                    .to_string(),
            ),
        ],
    }
}

/// The ledger's record of a job: the reservation it settles.
pub fn hold_of(reservation: &Reservation, job_id: &str) -> JobHold {
    let (payment, charged) = match reservation.payment {
        Payment::Credits { charged, .. } => (JobPayment::Credits, charged),
        Payment::Spend { charged, .. } => (JobPayment::Spend, charged.0),
    };
    JobHold {
        job_id: job_id.to_string(),
        account_id: reservation.account_id.clone(),
        reservation_id: reservation.id.clone(),
        plan: reservation.plan.clone(),
        payment,
        charged,
        meta: reservation.meta.clone(),
    }
}

/// The reservation a job's hold settles (balances after it are not known here, nor needed).
fn reservation_of(job: &JobHold) -> Reservation {
    let payment = match job.payment {
        JobPayment::Credits => Payment::Credits {
            charged: job.charged,
            remaining: 0,
        },
        JobPayment::Spend => Payment::Spend {
            charged: MicroUsd(job.charged),
            spent: MicroUsd(job.charged),
            limit: MicroUsd(job.charged),
        },
    };
    Reservation {
        id: job.reservation_id.clone(),
        account_id: job.account_id.clone(),
        plan: job.plan.clone(),
        payment,
        meta: job.meta.clone(),
    }
}

/// What a job's final state keeps and gives back: `succeeded` keeps (less images not made),
/// `failed` / `canceled` give everything back except the images `images_generated` says were
/// made.
pub fn decide(job: &JobHold, state: FinalState, images_generated: Option<u64>) -> Settlement {
    let outcome = match (state, images_generated) {
        (FinalState::Succeeded, images) => UpstreamOutcome::Succeeded {
            images_generated: images,
        },
        (_, Some(k)) => UpstreamOutcome::Succeeded {
            images_generated: Some(k),
        },
        (_, None) => UpstreamOutcome::Failed,
    };
    settle::decide(&reservation_of(job), outcome)
}

/// Records an accepted job: its hold waits for the job (lease `billing.job_ttl_s`). A failure
/// (retried a few times) leaves the hold on its request lease: the sweeper then settles it by
/// the orphan policy.
pub async fn record(gw: &Gateway, reservation: &Reservation, job_id: &str, request_id: &str) {
    let job = hold_of(reservation, job_id);
    let ttl_ms =
        i64::try_from(gw.config.billing.job_ttl_s.saturating_mul(1000)).unwrap_or(i64::MAX);
    let lease_until = gw.now_ms().saturating_add(ttl_ms);
    let keep_ms = gw.config.job_keep_ms().max(match reservation.payment {
        Payment::Credits { .. } => gw.config.credit_record_ttl_ms(),
        Payment::Spend { .. } => gw.config.spend_record_ttl_ms(),
    });
    let mut delay = Duration::from_millis(20);
    for attempt in 0..5 {
        match gw.ledger.record_job(&job, lease_until, keep_ms).await {
            Ok(()) => {
                metrics::inc(&metrics::JOBS, &["accepted"], 1);
                return;
            }
            Err(e) if attempt == 4 => {
                metrics::inc(&metrics::JOBS, &["record_failed"], 1);
                tracing::error!(request_id = %request_id, job = %job_id, reservation = %reservation.id,
                    error = %e, "job not recorded; its hold is settled by the sweeper after its lease");
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
}

/// A job-creating exchange is over: an accepted job (2xx with a job id) is recorded unless it
/// was already; anything else settles as a request would (a 2xx without a job id keeps, with a
/// warning; a failure refunds). What the log line shows as the charge.
pub async fn conclude_creation(
    gw: &Gateway,
    reservation: &Reservation,
    outcome: UpstreamOutcome,
    watch: Option<&Watch>,
    request_id: &str,
) -> Settlement {
    if let (
        UpstreamOutcome::Succeeded { .. },
        Some(Watch::Creating {
            body,
            header_id,
            recorded,
        }),
    ) = (outcome, watch)
    {
        match job_id_of(header_id.as_deref(), body) {
            Some(_) if *recorded => return settle::decide(reservation, outcome),
            Some(id) => {
                record(gw, reservation, &id, request_id).await;
                return settle::decide(reservation, outcome);
            }
            None => {
                metrics::inc(&metrics::JOBS, &["no_job_id"], 1);
                tracing::warn!(request_id = %request_id, reservation = %reservation.id,
                    "a job route answered 2xx without a job id; settled as a request (kept)");
            }
        }
    }
    settle::finish(&gw.ledger, reservation, outcome, request_id).await
}

/// What became of settling a job at its final state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobSettled {
    /// `Settled` for the one call that settled it; `AlreadySettled` for every other.
    pub outcome: SettleOutcome,
    pub settlement: Settlement,
}

/// Settles a job's hold at its final state, exactly once across polls, callbacks and the
/// sweeper (the ledger's claim). Store errors are retried a few times, then returned.
pub async fn settle_final(
    ledger: &Arc<dyn Ledger>,
    job: &JobHold,
    state: FinalState,
    images_generated: Option<u64>,
) -> StoreResult<JobSettled> {
    let settlement = decide(job, state, images_generated);
    // One settler token for this settlement's retries (a lost answer finishes its own refund);
    // any other poll or callback is another settler and only sees the claim.
    let token = random_id("job_", 12);
    let mut delay = Duration::from_millis(20);
    let mut attempt = 0;
    let outcome = loop {
        match ledger
            .settle_as(
                &job.account_id,
                &job.reservation_id,
                settlement.refunded,
                &token,
            )
            .await
        {
            Ok(o) => break o,
            Err(e) if attempt >= 4 => return Err(e),
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    };
    if outcome == SettleOutcome::Settled {
        metrics::inc(&metrics::JOBS, &[state.as_str()], 1);
        settle::record(&reservation_of(job), settlement);
        tracing::info!(job = %job.job_id, account = %job.account_id, reservation = %job.reservation_id,
            state = state.as_str(), kept = settlement.kept, refunded = settlement.refunded, "job settled");
    }
    Ok(JobSettled {
        outcome,
        settlement,
    })
}

/// A poll's answer is in: a 2xx saying a final state settles the job (once).
pub async fn conclude_poll(
    gw: &Gateway,
    outcome: UpstreamOutcome,
    watch: Option<&Watch>,
    request_id: &str,
) {
    let (UpstreamOutcome::Succeeded { images_generated }, Some(Watch::Polling { job, body })) =
        (outcome, watch)
    else {
        return;
    };
    let Some(state) = body.field("status").as_deref().and_then(FinalState::parse) else {
        return;
    };
    if let Err(e) = settle_final(&gw.ledger, job, state, images_generated).await {
        metrics::inc(&metrics::SETTLEMENT_FAILURES, &["store"], 1);
        tracing::error!(request_id = %request_id, job = %job.job_id, error = %e,
            "job settlement failed; the next poll, callback or the sweeper settles it");
    }
}

/// Admission of a `settle = "job_status"` route: the caller's own job, or 404 (never proxied).
/// `None` for any other route.
pub async fn admit_poll(
    gw: &Gateway,
    route: &RouteMatch<'_>,
    path: &CanonicalPath,
    principal: &Principal,
) -> Result<Option<JobHold>, GatewayError> {
    if route.settle_at() != SettleAt::JobStatus {
        return Ok(None);
    }
    let id = route
        .capture(path, "id")
        .filter(|id| valid_job_id(id))
        .ok_or(GatewayError::NotFound)?;
    gw.ledger
        .account_job(&principal.account.id, id)
        .await?
        .map(Some)
        .ok_or(GatewayError::NotFound)
}

/// `POST /admin/jobs/{id}` `{"status": "succeeded" | "failed" | "canceled", "imagesGenerated"?}`:
/// the backend reports a job's final state. 400 for a bad body, 404 for an unknown job; a job
/// settled before answers 200 with `"applied": false` and changes nothing.
pub async fn callback(gw: &Gateway, job_id: &str, body: &[u8]) -> Result<JsonReply, GatewayError> {
    let bad = |m: &str| GatewayError::InvalidRequest(m.to_string());
    let m = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => m,
        _ => return Err(bad("The body must be a JSON object.")),
    };
    if let Some(k) = m
        .keys()
        .find(|k| !matches!(k.as_str(), "status" | "imagesGenerated"))
    {
        return Err(bad(&format!("`{k}` is not a known field")));
    }
    let state = m
        .get("status")
        .and_then(Value::as_str)
        .and_then(FinalState::parse)
        .ok_or_else(|| bad("`status` must be \"succeeded\", \"failed\" or \"canceled\""))?;
    let images = match m.get("imagesGenerated") {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| bad("`imagesGenerated` must be a non-negative integer"))?,
        ),
    };
    if !valid_job_id(job_id) {
        return Err(GatewayError::NoSuch("job"));
    }
    let job = gw
        .ledger
        .find_job(job_id)
        .await?
        .ok_or(GatewayError::NoSuch("job"))?;
    let settled = settle_final(&gw.ledger, &job, state, images).await?;
    let applied = settled.outcome == SettleOutcome::Settled;
    let mut reply = json!({"id": job.job_id, "status": state.as_str(), "applied": applied});
    if applied {
        let unit = match job.payment {
            JobPayment::Credits => "credits",
            JobPayment::Spend => "micro_usd",
        };
        reply["kept"] = settled.settlement.kept.into();
        reply["refunded"] = settled.settlement.refunded.into();
        reply["unit"] = unit.into();
    }
    Ok(JsonReply::ok(200, &reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn video_job(charged: u64, quantity: u64) -> JobHold {
        JobHold {
            job_id: "job_1".into(),
            account_id: "a".into(),
            reservation_id: "ch_1".into(),
            plan: "starter".into(),
            payment: JobPayment::Credits,
            charged,
            meta: crate::ledger::ChargeMeta {
                quantity,
                unit_amount: charged / quantity,
                ..Default::default()
            },
        }
    }

    fn body(text: &str) -> BodyCapture {
        let mut b = BodyCapture::default();
        b.push(text.as_bytes());
        b
    }

    #[test]
    fn final_states_keep_or_refund() {
        let job = video_job(12, 4);
        let s = |state, images| decide(&job, state, images);
        assert_eq!(s(FinalState::Succeeded, None).kept, 12);
        assert_eq!(s(FinalState::Succeeded, Some(1)).kept, 3);
        assert_eq!(s(FinalState::Failed, None).refunded, 12);
        assert_eq!(s(FinalState::Canceled, None).refunded, 12);
        assert_eq!(
            s(FinalState::Failed, Some(2)).kept,
            6,
            "images made are kept"
        );
        assert_eq!(s(FinalState::Failed, Some(0)).refunded, 12);
        for state in ["succeeded", "failed", "canceled"] {
            assert_eq!(
                FinalState::parse(state).map(FinalState::as_str),
                Some(state)
            );
        }
        for other in ["pending", "running", "cancelled", "Succeeded", ""] {
            assert_eq!(FinalState::parse(other), None, "{other}");
        }
    }

    #[test]
    fn job_ids_come_from_the_header_then_the_body() {
        assert_eq!(
            job_id_of(Some(" h_1 "), &body(r#"{"id":"b_1"}"#)).as_deref(),
            Some("h_1")
        );
        assert_eq!(
            job_id_of(None, &body(r#"{"id":"b_1"}"#)).as_deref(),
            Some("b_1")
        );
        for bad in [
            r#"{"id":7}"#,
            r#"{"id":""}"#,
            r#"{"id":"a/b"}"#,
            r#"{"id":"a b"}"#,
            r#"{"status":"pending"}"#,
            "not json",
        ] {
            assert_eq!(job_id_of(None, &body(bad)), None, "{bad}");
        }
        let long = format!(r#"{{"id":"{}"}}"#, "x".repeat(129));
        assert_eq!(job_id_of(None, &body(&long)), None);
        // A body past the bound is not read.
        let mut big = BodyCapture::default();
        big.push(br#"{"id":"b_1","pad":""#);
        big.push(&vec![b'x'; MAX_JOB_BODY_BYTES]);
        big.push(br#""}"#);
        assert_eq!(job_id_of(None, &big), None);
    }

    #[test]
    fn a_hold_round_trips_through_its_job_record() {
        let r = Reservation {
            id: "ch_9".into(),
            account_id: "acme".into(),
            plan: "pro".into(),
            payment: Payment::Spend {
                charged: MicroUsd(648_000),
                spent: MicroUsd(1_000_000),
                limit: MicroUsd(50_000_000),
            },
            meta: crate::ledger::ChargeMeta {
                quantity: 2,
                unit_amount: 324_000,
                ..Default::default()
            },
        };
        let job = hold_of(&r, "job_3");
        assert_eq!(job.payment, JobPayment::Spend);
        assert_eq!(job.charged, 648_000);
        assert_eq!(
            decide(&job, FinalState::Succeeded, Some(1)).refunded,
            324_000
        );
        assert_eq!(
            held_headers(&r),
            [
                ("X-Charge-Usd-Held", "0.648".to_string()),
                ("X-Spend-Remaining-Cents", "4900".to_string())
            ]
        );
    }
}
