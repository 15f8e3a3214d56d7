//! Admission, the heart of `request_filter`: canonical path → the Stripe webhook or a billing
//! endpoint (both answered here) or a route rule → authenticate → rate limit → read the JSON body
//! if the rule needs it → quote → `Idempotency-Key` → reserve. Plain async functions over the
//! request ([`IncomingRequest`]) and the shared [`Gateway`], so it is tested without a Pingora
//! session (`tests/admit.rs`). Anything that is not admitted is never proxied.

use std::sync::Arc;

use pingora::http::RequestHeader;

use crate::auth::{self, Principal};
use crate::billing_api::{self, BillingEndpoint};
use crate::entitlement;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::idempotency::{self, Check};
use crate::incoming::MAX_API_BODY_BYTES;
use crate::incoming::{header_str, is_json, IncomingRequest};
use crate::metrics;
use crate::quote_api;
use crate::reserve::{self, Reservation, ReserveSettings};
use crate::respond::JsonReply;
use crate::rules::{self, canonicalize, Catalog, RequestInputs};

/// Where Stripe delivers webhook events (on the proxy listener, authenticated by signature).
pub const STRIPE_WEBHOOK_PATH: &str = "/webhooks/stripe";
/// Largest Stripe event body accepted.
const MAX_WEBHOOK_BODY_BYTES: usize = 512 * 1024;

/// What to do with an admitted request.
pub enum Admission {
    /// The gateway answers it itself.
    Reply(JsonReply),
    /// Proxy it upstream.
    Forward(Box<Forward>),
}

/// An admitted request on its way upstream.
pub struct Forward {
    pub principal: Arc<Principal>,
    /// Canonical path and query: exactly what was priced is what is sent.
    pub upstream_path: String,
    /// The catalog that quoted the request; it also settles it.
    pub catalog: Arc<Catalog>,
    pub reservation: Option<Reservation>,
    /// The claimed `Idempotency-Key`, to finish or release once the outcome is known.
    pub idempotency: Option<idempotency::Ticket>,
    /// When the route's charge is settled (`settle` of its rule).
    pub settle_at: rules::SettleAt,
    /// A poll of the caller's own job (`settle = "job_status"`): the hold its answer may settle.
    pub job_poll: Option<crate::ledger::JobHold>,
}

/// Decides what to do with a request: the Stripe webhook, a billing endpoint, or a priced route.
/// `route_label` is set to the matched route's label as soon as it is known, so refusals are
/// logged and counted under their route too.
pub async fn admit(
    gw: &Gateway,
    req: &mut dyn IncomingRequest,
    route_label: &mut String,
) -> Result<Admission, GatewayError> {
    crate::http_limits::check_incoming(req, &gw.config.server)?;
    let header = req.header();
    let raw_target = header
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let path = canonicalize(raw_target).map_err(|e| GatewayError::AmbiguousPath(e.to_string()))?;
    let method = header.method.as_str().to_string();

    if path.path == STRIPE_WEBHOOK_PATH {
        if method != "POST" {
            return Err(GatewayError::NotFound);
        }
        "POST /webhooks/stripe".clone_into(route_label);
        return stripe_webhook(gw, req).await;
    }
    if path.path == crate::usage_api::PATH {
        if method != "GET" {
            return Err(GatewayError::NotFound);
        }
        crate::usage_api::LABEL.clone_into(route_label);
        let reply = crate::usage_api::answer(gw, req, path.query.as_deref()).await?;
        return Ok(Admission::Reply(reply));
    }
    let catalog = gw.catalog.snapshot();
    if path.path == quote_api::QUOTE_PATH {
        if method != "POST" {
            return Err(GatewayError::NotFound);
        }
        quote_api::QUOTE_LABEL.clone_into(route_label);
        return quote_endpoint(gw, req, &catalog).await;
    }
    if BillingEndpoint::owns_path(&path.path) {
        let endpoint = BillingEndpoint::find(&method, &path.path).ok_or(GatewayError::NotFound)?;
        endpoint.label().clone_into(route_label);
        return billing_endpoint(gw, req, &catalog, endpoint).await;
    }
    let route = catalog
        .match_route(&method, &path)
        .ok_or(GatewayError::NotFound)?;
    route.label().clone_into(route_label);
    priced_route(gw, req, &catalog, &route, &method, &path).await
}

/// The API key's principal (from the key cache), as every endpoint but the webhook needs it.
async fn authenticate(
    gw: &Gateway,
    header: &RequestHeader,
    catalog: &Catalog,
    now_ms: i64,
) -> Result<Arc<Principal>, GatewayError> {
    auth::authenticate(header, &gw.keys, gw.ledger.as_ref(), catalog, now_ms).await
}

/// `POST /webhooks/stripe`: authenticated by its signature, answered here.
async fn stripe_webhook(
    gw: &Gateway,
    req: &mut dyn IncomingRequest,
) -> Result<Admission, GatewayError> {
    let signature = header_str(req.header(), "stripe-signature").map(str::to_string);
    let body = req.read_body(MAX_WEBHOOK_BODY_BYTES).await?;
    let reply = crate::stripe::webhook::handle(gw, signature.as_deref(), &body).await?;
    Ok(Admission::Reply(reply))
}

/// A billing endpoint: authenticated by API key, answered here, never proxied.
async fn billing_endpoint(
    gw: &Gateway,
    req: &mut dyn IncomingRequest,
    catalog: &Arc<Catalog>,
    endpoint: BillingEndpoint,
) -> Result<Admission, GatewayError> {
    let principal = authenticate(gw, req.header(), catalog, gw.now_ms()).await?;
    let body = if endpoint == BillingEndpoint::SetSpendingLimit {
        let body = req
            .read_body(MAX_API_BODY_BYTES)
            .await
            .map_err(|e| match e {
                GatewayError::PayloadTooLarge(_) => {
                    GatewayError::InvalidRequest("The body must be at most 4 KiB.".to_string())
                }
                other => other,
            })?;
        Some(body)
    } else {
        None
    };
    let reply = billing_api::answer(gw, &principal, endpoint, body).await?;
    Ok(Admission::Reply(reply))
}

/// `POST /api/quote`: authenticated by API key, priced like a generation request, answered here;
/// nothing is reserved.
async fn quote_endpoint(
    gw: &Gateway,
    req: &mut dyn IncomingRequest,
    catalog: &Arc<Catalog>,
) -> Result<Admission, GatewayError> {
    let principal = authenticate(gw, req.header(), catalog, gw.now_ms()).await?;
    let body = req.read_body(gw.config.server.max_json_body_bytes).await?;
    let reply = quote_api::answer(gw, &principal, req.header(), catalog, &body).await?;
    Ok(Admission::Reply(reply))
}

/// A route rule: authenticate → rate limit → read the JSON body if the rule prices from it →
/// quote → claim the `Idempotency-Key` → reserve. Only an admitted request is forwarded.
async fn priced_route(
    gw: &Gateway,
    req: &mut dyn IncomingRequest,
    catalog: &Arc<Catalog>,
    route: &rules::RouteMatch<'_>,
    method: &str,
    path: &rules::CanonicalPath,
) -> Result<Admission, GatewayError> {
    let now_ms = gw.now_ms();
    let principal = authenticate(gw, req.header(), catalog, now_ms).await?;

    gw.rate_limits.check(
        &principal.key_id,
        entitlement::requests_per_minute(catalog, &principal.account),
    )?;
    // A poll of a job that is not the caller's is a 404, never proxied.
    let job_poll = crate::jobs::admit_poll(gw, route, path, &principal).await?;

    let json_body = if route.needs_json_body() && is_json(req.header()) {
        let bytes = req.read_body(gw.config.server.max_json_body_bytes).await?;
        // Strict: duplicate keys are refused, so no reader can see another `model` than we priced.
        let value = rules::parse_json_body(&bytes).map_err(|e| {
            GatewayError::InvalidRequest(format!("The request body is not valid JSON: {}.", e.0))
        })?;
        Some(value)
    } else {
        None
    };

    refuse_repeated_pricing_headers(req.header(), route.route())?;
    let quote = {
        // Scoped: the header lookup closure is not `Sync` and must not live across an await.
        let header = req.header();
        let lookup = |name: &str| header_str(header, name);
        let inputs = RequestInputs {
            json_body: json_body.as_ref(),
            header: &lookup,
            query: path,
        };
        rules::quote(catalog, route, &inputs)?
    };
    let mut ticket = None;
    if let (Some(q), Some(key)) = (&quote, idempotency::presented(req.header())?) {
        let fingerprint = idempotency::fingerprint(method, &path.path, q);
        let up = &gw.config.upstream;
        let lease_ms =
            i64::try_from(up.connect_timeout_ms + up.read_timeout_ms + 60_000).unwrap_or(i64::MAX);
        match idempotency::check(
            gw.ledger.as_ref(),
            &principal.account.id,
            &key,
            fingerprint,
            lease_ms,
        )
        .await?
        {
            Check::Run(t) => ticket = Some(t),
            Check::Replay(reply) => return Ok(Admission::Reply(reply)),
        }
    }
    let reservation = match quote {
        None => None,
        Some(q) => match reserve_timed(gw, catalog, &principal, &q, now_ms).await {
            Ok(r) => Some(r),
            Err(e) => {
                if let Some(t) = &ticket {
                    // Nothing was charged: the same request may be retried afresh.
                    let _ =
                        idempotency::release(gw.ledger.as_ref(), &principal.account.id, t).await;
                }
                return Err(e);
            }
        },
    };
    let upstream_path = match &path.query {
        Some(q) => format!("{}?{}", path.path, q),
        None => path.path.clone(),
    };
    Ok(Admission::Forward(Box::new(Forward {
        principal,
        upstream_path,
        catalog: catalog.clone(),
        reservation,
        idempotency: ticket,
        settle_at: route.settle_at(),
        job_poll,
    })))
}

/// [`reserve::reserve`] with the settings from the config, timed into the store histogram.
async fn reserve_timed(
    gw: &Gateway,
    catalog: &Catalog,
    principal: &Principal,
    quote: &rules::Quote,
    now_ms: i64,
) -> Result<Reservation, GatewayError> {
    let settings = ReserveSettings {
        credit_record_ttl_ms: gw.config.credit_record_ttl_ms(),
        spend_record_ttl_ms: gw.config.spend_record_ttl_ms(),
        report_to_stripe: gw.config.stripe.enabled,
        lease_ms: gw.config.lease_ms(),
    };
    let started = std::time::Instant::now();
    let reserved = reserve::reserve(
        gw.ledger.as_ref(),
        catalog,
        &principal.account,
        quote,
        now_ms,
        &settings,
    )
    .await;
    metrics::observe(
        &metrics::STORE_LATENCY,
        &["reserve"],
        started.elapsed().as_secs_f64(),
    );
    if let Ok(r) = &reserved {
        crate::alerts::notice(gw, catalog, &principal.account, r, now_ms);
    }
    reserved
}

/// A header the route prices from must appear at most once: a backend reading the last copy
/// must not see another model or count than the gateway priced.
pub(crate) fn refuse_repeated_pricing_headers(
    header: &pingora::http::RequestHeader,
    route: &rules::Route,
) -> Result<(), GatewayError> {
    let sources = route
        .model_sources()
        .iter()
        .chain(route.quantity_sources())
        .chain(route.operation_sources());
    for source in sources {
        if let Some(name) = source.as_str().strip_prefix("header:") {
            if header.headers.get_all(name).iter().count() > 1 {
                return Err(GatewayError::InvalidRequest(format!(
                    "The header {name} may be sent only once."
                )));
            }
        }
    }
    Ok(())
}
