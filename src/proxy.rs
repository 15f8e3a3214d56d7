//! Pingora glue: maps the proxy phases onto the steps of `lib.rs`'s request path. No billing
//! decision is made here — `admit` decides who pays, `conclude` (with `settle` and `jobs`) what
//! an answer keeps and when, `headers` what the client and the upstream see, `respond` writes —
//! this file only moves data between them and the session.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorType, Result};

use crate::admit::{admit, Admission, Forward};
use crate::apikey::random_id;
use crate::conclude;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::headers;
use crate::idempotency::{self, Capture};
use crate::incoming::{drain_small_body, expects_continue, SessionRequest};
use crate::jobs::{self, Watch};
use crate::logging::RequestLine;
use crate::metrics;
use crate::respond::JsonReply;
use crate::settle::{Settlement, UpstreamOutcome};

pub struct CreditGateProxy {
    pub gw: Arc<Gateway>,
}

/// Per-request state carried between the phases.
pub struct RequestCtx {
    pub request_id: String,
    started: Instant,
    route: String,
    forward: Option<Box<Forward>>,
    upstream_status: Option<u16>,
    /// How the upstream answered, once its response header arrived.
    outcome: Option<UpstreamOutcome>,
    /// The status the client was sent.
    status: u16,
    error_code: Option<&'static str>,
    /// The response as the client got it, kept when an `Idempotency-Key` will replay it.
    replay: Option<Capture>,
    /// What a job-creating or job-status exchange's answer says (`jobs`).
    job: Option<Watch>,
    /// The settlement written before the response went out (an upstream success).
    settled: Option<Settlement>,
}

impl RequestCtx {
    fn outcome(&self) -> UpstreamOutcome {
        UpstreamOutcome::or_failed(self.outcome)
    }
}

impl CreditGateProxy {
    pub fn new(gw: Arc<Gateway>) -> Self {
        Self { gw }
    }

    async fn write_reply(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        reply: &JsonReply,
    ) -> Result<()> {
        ctx.status = reply.status;
        crate::connection::close_if_stopping(session);
        let header = reply.response_header(&ctx.request_id)?;
        if expects_continue(session.req_header()) && !session.as_mut().is_body_done() {
            // Refused before `100 Continue`: the client sends no body; the connection ends here.
            session.set_keepalive(None);
        } else if !session.as_mut().is_body_done() && !drain_small_body(session).await {
            // The client's body was not read; do not try to reuse the connection.
            session.set_keepalive(None);
        }
        session
            .write_response_header(Box::new(header), false)
            .await?;
        session
            .write_response_body(Some(reply.body.clone()), true)
            .await
    }
}

#[async_trait]
impl ProxyHttp for CreditGateProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            request_id: random_id("req_", 20),
            started: Instant::now(),
            route: String::from("-"),
            forward: None,
            upstream_status: None,
            outcome: None,
            status: 0,
            error_code: None,
            replay: None,
            job: None,
            settled: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let mut incoming = SessionRequest {
            session,
            continue_sent: false,
        };
        let admitted = admit(&self.gw, &mut incoming, &mut ctx.route).await;
        match admitted {
            Ok(Admission::Forward(forward)) => {
                ctx.forward = Some(forward);
                // Admitted and paid for: now the client may send its body (if admission did not
                // read it already). The upstream is not asked again (`Expect` is not forwarded);
                // a failure here refunds in `logging` like any request that was not served.
                if let Err(e) = incoming.send_continue_if_expected().await {
                    return Error::e_explain(ErrorType::WriteError, e.to_string());
                }
                Ok(false)
            }
            Ok(Admission::Reply(reply)) => {
                self.write_reply(session, ctx, &reply).await?;
                Ok(true)
            }
            Err(e) => {
                ctx.error_code = Some(e.code());
                if let GatewayError::StoreUnavailable(inner) = &e {
                    tracing::warn!(request_id = %ctx.request_id, error = %inner, "store unavailable");
                }
                self.write_reply(session, ctx, &JsonReply::error(&e))
                    .await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.gw.config.upstream.peer()))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        _ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // A billed request is never sent twice.
        e.set_retry(false);
        e
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let Some(forward) = ctx.forward.as_ref() else {
            return Error::e_explain(ErrorType::InternalError, "request not admitted");
        };
        headers::prepare_upstream_request(upstream, forward, &ctx.request_id)
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.upstream_status = Some(upstream_response.status.as_u16());
        ctx.outcome = Some(UpstreamOutcome::from_response(upstream_response));
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        crate::connection::close_if_stopping(session);
        ctx.status = response.status.as_u16();
        headers::strip_billing_headers(response);
        for name in jobs::HELD_HEADERS {
            response.remove_header(name);
        }
        response.insert_header("X-Request-Id", ctx.request_id.as_str())?;
        let Some(forward) = ctx.forward.as_ref() else {
            return Ok(());
        };
        let answer =
            conclude::on_answer(&self.gw, forward, ctx.outcome(), response, &ctx.request_id).await;
        for (name, value) in answer.headers {
            response.insert_header(name, value)?;
        }
        ctx.settled = answer.settled;
        ctx.job = answer.job;
        if forward.idempotency.is_some() {
            ctx.replay = Some(Capture::of(response));
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        if let (Some(capture), Some(chunk)) = (ctx.replay.as_mut(), body.as_ref()) {
            capture.push_body(chunk);
        }
        if let (Some(watch), Some(chunk)) = (ctx.job.as_mut(), body.as_ref()) {
            watch.push(chunk);
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let gateway_error =
            GatewayError::from_proxy_failure(e, self.gw.config.server.max_json_body_bytes);
        ctx.error_code = Some(gateway_error.code());
        let mut code = 0;
        if session.response_written().is_none() {
            code = gateway_error.status();
            let reply = conclude::failure_reply(ctx.forward.as_deref(), &gateway_error);
            if self.write_reply(session, ctx, &reply).await.is_err() {
                code = 0;
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, _session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let outcome = ctx.outcome();
        let mut settled: Option<Settlement> = None;
        if let Some(forward) = ctx.forward.as_ref() {
            metrics::observe(
                &metrics::UPSTREAM_LATENCY,
                &[ctx.route.as_str()],
                ctx.started.elapsed().as_secs_f64(),
            );
            settled = conclude::on_end(
                &self.gw,
                forward,
                outcome,
                ctx.settled,
                ctx.job.as_ref(),
                &ctx.request_id,
            )
            .await;
            if let Some(ticket) = forward.idempotency.as_ref() {
                let delivered = ctx
                    .replay
                    .take()
                    .filter(|_| matches!(outcome, UpstreamOutcome::Succeeded { .. }));
                idempotency::conclude(
                    self.gw.ledger.as_ref(),
                    &forward.principal.account.id,
                    ticket,
                    delivered,
                    &ctx.request_id,
                )
                .await;
            }
        }
        let label = ctx.error_code.unwrap_or(if ctx.status < 400 {
            "ok"
        } else {
            "upstream_error"
        });
        let refused = ctx.forward.is_none() || ctx.upstream_status.is_none();
        metrics::count_request(&ctx.route, label, ctx.error_code.filter(|_| refused));
        let forward = ctx.forward.as_deref();
        RequestLine {
            request_id: &ctx.request_id,
            account: forward.map_or("-", |f| f.principal.account.id.as_str()),
            route: &ctx.route,
            status: ctx.status,
            upstream_status: ctx.upstream_status.unwrap_or(0),
            outcome: label,
            charge: forward.and_then(|f| f.reservation.as_ref()).zip(settled),
            error: e,
            latency_us: ctx.started.elapsed().as_micros() as u64,
        }
        .emit();
    }
}
