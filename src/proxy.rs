//! Pingora glue: maps the proxy phases onto the steps of `lib.rs`'s request path. No billing
//! decision is made here — `admit` decides, `settle` settles, `respond` writes — this file only
//! moves data between them and the session.

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
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::headers;
use crate::idempotency;
use crate::incoming::{expects_continue, SessionRequest};
use crate::metrics;
use crate::money::{MicroUsd, MICROS_PER_USD};
use crate::reserve::{Payment, Reservation};
use crate::respond::JsonReply;
use crate::settle::{self, Settlement, UpstreamOutcome};

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
    images_generated: Option<u64>,
    /// The status the client was sent.
    status: u16,
    error_code: Option<&'static str>,
    /// The response as the client got it, kept when an `Idempotency-Key` will replay it.
    replay: Option<ReplayCapture>,
}

/// Status, billing headers and (bounded) body of a response to keep for idempotent replay.
#[derive(Default)]
struct ReplayCapture {
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    overflow: bool,
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

    /// Keeps a delivered response for replay, or releases the key of one that failed.
    async fn finish_idempotency(&self, ctx: &mut RequestCtx) {
        let Some(forward) = ctx.forward.as_ref() else {
            return;
        };
        let Some(ticket) = forward.idempotency.as_ref() else {
            return;
        };
        let ledger = self.gw.ledger.as_ref();
        let account = forward.principal.account.id.as_str();
        let result = match (self.outcome(ctx), ctx.replay.take()) {
            (UpstreamOutcome::Succeeded { .. }, Some(capture)) => {
                let body = (!capture.overflow).then_some(capture.body.as_slice());
                idempotency::finish(ledger, account, ticket, ctx.status, capture.headers, body)
                    .await
            }
            _ => idempotency::release(ledger, account, ticket).await,
        };
        if let Err(e) = result {
            tracing::warn!(request_id = %ctx.request_id, error = %e, "idempotency record not written");
        }
    }

    fn outcome(&self, ctx: &RequestCtx) -> UpstreamOutcome {
        match ctx.upstream_status {
            Some(s) if (200..300).contains(&s) => UpstreamOutcome::Succeeded {
                images_generated: ctx.images_generated,
            },
            _ => UpstreamOutcome::Failed,
        }
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
            images_generated: None,
            status: 0,
            error_code: None,
            replay: None,
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
        let up = &self.gw.config.upstream;
        let mut peer = HttpPeer::new(up.address.as_str(), up.tls, up.sni.clone());
        peer.options.connection_timeout =
            Some(std::time::Duration::from_millis(up.connect_timeout_ms));
        peer.options.read_timeout = Some(std::time::Duration::from_millis(up.read_timeout_ms));
        Ok(Box::new(peer))
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
        ctx.images_generated = upstream_response
            .headers
            .get(headers::IMAGES_GENERATED)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
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
        response.insert_header("X-Request-Id", ctx.request_id.as_str())?;
        let outcome = self.outcome(ctx);
        let Some(reservation) = ctx.forward.as_ref().and_then(|f| f.reservation.as_ref()) else {
            return Ok(());
        };
        let s = settle::decide(reservation, outcome);
        match reservation.payment {
            Payment::Credits { remaining, .. } => {
                response.insert_header("X-Credits-Charged", s.kept.to_string())?;
                response.insert_header(
                    "X-Credits-Remaining",
                    remaining.saturating_add(s.refunded).to_string(),
                )?;
            }
            Payment::Spend { spent, limit, .. } => {
                let spent_after = spent.0.saturating_sub(s.refunded);
                response.insert_header("X-Charge-Usd", MicroUsd(s.kept).to_string())?;
                response.insert_header(
                    "X-Spend-Remaining-Cents",
                    MicroUsd(limit.0.saturating_sub(spent_after))
                        .cents_floor()
                        .to_string(),
                )?;
            }
        }
        if ctx
            .forward
            .as_ref()
            .is_some_and(|f| f.idempotency.is_some())
        {
            let headers = response
                .headers
                .iter()
                .filter(|(name, _)| idempotency::is_replayed_header(name.as_str()))
                .filter_map(|(n, v)| Some((n.to_string(), v.to_str().ok()?.to_string())))
                .collect();
            ctx.replay = Some(ReplayCapture {
                headers,
                ..ReplayCapture::default()
            });
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
            if capture.body.len() + chunk.len() <= idempotency::MAX_REPLAY_BODY {
                capture.body.extend_from_slice(chunk);
            } else {
                capture.overflow = true;
            }
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let gateway_error = match e.etype() {
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                GatewayError::UpstreamTimeout
            }
            ErrorType::HTTPStatus(code) if *code == 413 => {
                GatewayError::PayloadTooLarge(self.gw.config.server.max_json_body_bytes)
            }
            _ => match e.esource() {
                pingora::ErrorSource::Downstream => {
                    GatewayError::InvalidRequest("The request could not be read.".to_string())
                }
                _ => GatewayError::UpstreamFailed,
            },
        };
        ctx.error_code = Some(gateway_error.code());
        let mut code = 0;
        if session.response_written().is_none() {
            code = gateway_error.status();
            let mut reply = JsonReply::error(&gateway_error);
            if let Some(reservation) = ctx.forward.as_ref().and_then(|f| f.reservation.as_ref()) {
                // Nothing was delivered: say so on the error as on any billed response.
                if let Payment::Credits { remaining, charged } = reservation.payment {
                    reply = reply
                        .with_header("X-Credits-Charged", "0")
                        .with_header("X-Credits-Remaining", (remaining + charged).to_string());
                }
            }
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
        let mut settled = None;
        if ctx.forward.is_some() {
            metrics::observe(
                &metrics::UPSTREAM_LATENCY,
                &[ctx.route.as_str()],
                ctx.started.elapsed().as_secs_f64(),
            );
        }
        if let Some(reservation) = ctx.forward.as_ref().and_then(|f| f.reservation.as_ref()) {
            let s = settle::decide(reservation, self.outcome(ctx));
            if s.refunded == 0 && matches!(reservation.payment, Payment::Spend { .. }) {
                // Nothing to give back: only the "settled" mark for the Stripe reporter remains,
                // and it must not hold the client's keep-alive connection. Lost in a crash, the
                // mark is replaced by the reporter's lease. (A kept credit charge needs no call.)
                let ledger = self.gw.ledger.clone();
                let held = reservation.clone();
                let request_id = ctx.request_id.clone();
                tokio::spawn(async move {
                    apply_settlement(ledger.as_ref(), &held, s, &request_id).await;
                });
            } else {
                apply_settlement(self.gw.ledger.as_ref(), reservation, s, &ctx.request_id).await;
            }
            record_charge(reservation, s);
            settled = Some(s);
        }
        self.finish_idempotency(ctx).await;
        let outcome = ctx.error_code.unwrap_or(if ctx.status < 400 {
            "ok"
        } else {
            "upstream_error"
        });
        metrics::inc(&metrics::REQUESTS, &[ctx.route.as_str(), outcome], 1);
        if ctx.forward.is_none() || ctx.upstream_status.is_none() {
            if let Some(code) = ctx.error_code {
                metrics::inc(&metrics::REJECTIONS, &[code], 1);
            }
        }
        if !tracing::enabled!(tracing::Level::INFO) {
            return;
        }
        let account = ctx
            .forward
            .as_ref()
            .map_or("-", |f| f.principal.account.id.as_str());
        // What was charged, and for what: a credit reservation record keeps only what
        // settlement needs, so this line is where a charge id is traced back to its request.
        let reservation = ctx.forward.as_ref().and_then(|f| f.reservation.as_ref());
        let (charge, charge_id, priced) = match (reservation, settled) {
            (Some(r), Some(s)) => (
                match r.payment {
                    Payment::Credits { .. } => format!("{}cr", s.kept),
                    Payment::Spend { .. } => format!("${}", MicroUsd(s.kept)),
                },
                r.id.as_str(),
                format!("{} {} x{}", r.meta.operation, r.meta.model, r.meta.quantity),
            ),
            _ => ("-".to_string(), "-", "-".to_string()),
        };
        tracing::info!(
            request_id = %ctx.request_id,
            account = %account,
            route = %ctx.route,
            status = ctx.status,
            upstream_status = ctx.upstream_status.unwrap_or(0),
            outcome = outcome,
            charge = %charge,
            charge_id = %charge_id,
            priced = %priced,
            error = e.map(|e| e.to_string()).unwrap_or_default(),
            latency_us = ctx.started.elapsed().as_micros() as u64,
            "request"
        );
    }
}

/// Largest unread request body read and dropped so a refused client keeps its connection.
const DRAIN_LIMIT: usize = 64 * 1024;

/// Reads and drops a small declared-length body (bounded in size and time); `false` when the
/// body is too large, chunked, slow or broken — then the connection is not reused.
async fn drain_small_body(session: &mut Session) -> bool {
    let declared = session
        .req_header()
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_none_or(|len| len > DRAIN_LIMIT) {
        return false;
    }
    let drain = async {
        let mut read = 0usize;
        while let Ok(Some(chunk)) = session.read_request_body().await {
            read += chunk.len();
            if read > DRAIN_LIMIT {
                return false;
            }
        }
        session.as_mut().is_body_done()
    };
    tokio::time::timeout(std::time::Duration::from_millis(500), drain)
        .await
        .unwrap_or(false)
}

/// Writes a settlement (timed; failures logged and counted: the reservation then stands).
async fn apply_settlement(
    ledger: &dyn crate::ledger::Ledger,
    reservation: &Reservation,
    s: Settlement,
    request_id: &str,
) {
    let started = Instant::now();
    let settled = settle::settle(ledger, reservation, s).await;
    metrics::observe(
        &metrics::STORE_LATENCY,
        &["settle"],
        started.elapsed().as_secs_f64(),
    );
    if let Err(err) = settled {
        metrics::inc(&metrics::SETTLEMENT_FAILURES, &["store"], 1);
        tracing::error!(
            request_id = %request_id,
            reservation = %reservation.id,
            error = %err,
            "settlement failed; the reservation stands as a charge"
        );
    }
}

/// Counts what a settled reservation kept and gave back.
fn record_charge(reservation: &Reservation, s: Settlement) {
    let meta = &reservation.meta;
    match reservation.payment {
        Payment::Credits { .. } => {
            let labels = [
                reservation.plan.as_str(),
                meta.operation.as_str(),
                meta.model.as_str(),
            ];
            metrics::inc(&metrics::CREDITS_CHARGED, &labels, s.kept);
            if s.refunded > 0 {
                metrics::inc(&metrics::CREDITS_REFUNDED, &labels, s.refunded);
            }
        }
        Payment::Spend { .. } => {
            let usd = |micro: u64| micro as f64 / MICROS_PER_USD as f64;
            metrics::add(&metrics::PPU_SPEND_USD, &[meta.model.as_str()], usd(s.kept));
            if s.refunded > 0 {
                metrics::add(
                    &metrics::PPU_REFUNDED_USD,
                    &[meta.model.as_str()],
                    usd(s.refunded),
                );
            }
        }
    }
}
