//! What a forwarded request's answer means for its bill, in the two phases the proxy calls:
//! [`on_answer`] when the upstream's response header is about to go to the client (a job
//! route's accepted job is held — its id recorded when the header names it; any other success
//! is settled, kept, before the client can have the result, so a crash after the answer never
//! leaves a hold the sweeper takes for an orphan; a failure only says so), and [`on_end`] in
//! `logging` (a failure refunds, a held job is recorded from the body, a poll of one's own job
//! settles it at its final state), and [`failure_reply`] for an exchange that failed before
//! any answer. The decisions are `settle`'s and `jobs`'; this module only says which applies when.

use pingora::http::ResponseHeader;

use crate::admit::Forward;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::headers;
use crate::jobs::{self, Watch};
use crate::respond::JsonReply;
use crate::rules::SettleAt;
use crate::settle::{self, Settlement, UpstreamOutcome};

/// The billing side of an answer's header.
#[derive(Default)]
pub struct OnAnswer {
    /// Billing headers for the client.
    pub headers: Vec<(&'static str, String)>,
    /// The settlement already written (an upstream success on a request route).
    pub settled: Option<Settlement>,
    /// What to read from the answer's body (a job's id or status).
    pub job: Option<Watch>,
}

pub async fn on_answer(
    gw: &Gateway,
    forward: &Forward,
    outcome: UpstreamOutcome,
    response: &ResponseHeader,
    request_id: &str,
) -> OnAnswer {
    let mut answer = OnAnswer::default();
    if let Some(reservation) = forward.reservation.as_ref() {
        let success = matches!(outcome, UpstreamOutcome::Succeeded { .. });
        if forward.settle_at == SettleAt::Job && success {
            // Held for the job; a job id in the header is recorded before the client (or the
            // backend's callback) can name it.
            let header_id = jobs::header_job_id(response);
            let mut recorded = false;
            if let Some(id) = header_id.as_deref().filter(|id| jobs::valid_job_id(id)) {
                jobs::record(gw, reservation, id, request_id).await;
                recorded = true;
            }
            answer.job = Some(Watch::Creating {
                body: jobs::BodyCapture::default(),
                header_id,
                recorded,
            });
            answer.headers.extend(jobs::held_headers(reservation));
        } else {
            let settlement = if success {
                let s =
                    settle::finish_before_reply(&gw.ledger, reservation, outcome, request_id).await;
                answer.settled = Some(s);
                s
            } else {
                settle::decide(reservation, outcome)
            };
            answer
                .headers
                .extend(headers::billing_headers(reservation, settlement));
        }
    }
    if let Some(job) = forward.job_poll.as_ref() {
        answer.job = Some(Watch::Polling {
            job: Box::new(job.clone()),
            body: jobs::BodyCapture::default(),
        });
    }
    answer
}

/// The rest of the bill once the exchange is over; the reservation's settlement, if billed.
pub async fn on_end(
    gw: &Gateway,
    forward: &Forward,
    outcome: UpstreamOutcome,
    settled: Option<Settlement>,
    job: Option<&Watch>,
    request_id: &str,
) -> Option<Settlement> {
    let mut settlement = None;
    if let Some(reservation) = forward.reservation.as_ref() {
        settlement = Some(match (forward.settle_at, settled) {
            (SettleAt::Job, _) => {
                jobs::conclude_creation(gw, reservation, outcome, job, request_id).await
            }
            // Written before the response went out.
            (_, Some(s)) => s,
            (_, None) => settle::finish(&gw.ledger, reservation, outcome, request_id).await,
        });
    }
    if forward.job_poll.is_some() {
        jobs::conclude_poll(gw, outcome, job, request_id).await;
    }
    settlement
}

/// The error a client gets when its request's upstream exchange failed before any answer was
/// sent: nothing was delivered, and a billed request says so in its billing headers.
pub fn failure_reply(forward: Option<&Forward>, error: &GatewayError) -> JsonReply {
    let mut reply = JsonReply::error(error);
    if let Some(reservation) = forward.and_then(|f| f.reservation.as_ref()) {
        let nothing_kept = settle::decide(reservation, UpstreamOutcome::Failed);
        for (name, value) in headers::billing_headers(reservation, nothing_kept) {
            reply = reply.with_header(name, value);
        }
    }
    reply
}
