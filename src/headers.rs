//! Header hygiene. Towards the upstream: the client's API key is never forwarded, client-sent
//! headers that impersonate the gateway's (`X-Account-Id`, `X-Plan`, `X-Billing-*`,
//! `X-Creditgate-*`, `X-Request-Id`) are removed, and the gateway's own are set, including what
//! was priced (`X-Creditgate-Operation/Model/Quantity`) so the backend generates exactly that;
//! `Expect` is dropped (the gateway answers `100 Continue` itself after admission).
//! Towards the client: billing headers are the gateway's alone.

use pingora::http::{RequestHeader, ResponseHeader};
use pingora::Result;

use crate::admit::Forward;
use crate::money::MicroUsd;
use crate::reserve::{Payment, Reservation};
use crate::settle::Settlement;

pub const IMAGES_GENERATED: &str = "x-images-generated";

/// The billing headers of a response: set by the gateway alone (an upstream's are removed), and
/// kept with an `Idempotency-Key`'s record to be replayed.
pub const BILLING_HEADERS: [&str; 4] = [
    "X-Credits-Charged",
    "X-Credits-Remaining",
    "X-Charge-Usd",
    "X-Spend-Remaining-Cents",
];

/// What the client is told a request cost, once its settlement is decided: credits charged and
/// left, or the pay-per-use charge and the cents left under the monthly limit. The one formula
/// for delivered responses and for failures (a failure's settlement refunds everything).
pub fn billing_headers(reservation: &Reservation, s: Settlement) -> [(&'static str, String); 2] {
    match reservation.payment {
        Payment::Credits { remaining, .. } => [
            (BILLING_HEADERS[0], s.kept.to_string()),
            (
                BILLING_HEADERS[1],
                remaining.saturating_add(s.refunded).to_string(),
            ),
        ],
        Payment::Spend { spent, limit, .. } => {
            let spent_after = spent.0.saturating_sub(s.refunded);
            [
                (BILLING_HEADERS[2], MicroUsd(s.kept).to_string()),
                (
                    BILLING_HEADERS[3],
                    MicroUsd(limit.0.saturating_sub(spent_after))
                        .cents_floor()
                        .to_string(),
                ),
            ]
        }
    }
}

/// `name` as the `http` crate stores it (lower case).
fn is_gateway_owned(name: &str) -> bool {
    matches!(
        name,
        "authorization" | "x-api-key" | "x-account-id" | "x-plan" | "x-request-id"
    ) || name.starts_with("x-billing-")
        || name.starts_with("x-creditgate-")
}

pub fn prepare_upstream_request(
    upstream: &mut RequestHeader,
    forward: &Forward,
    request_id: &str,
) -> Result<()> {
    // Usually just the API key's header; a name is a reference-counted handle, cheap to clone.
    let doomed: Vec<http::HeaderName> = upstream
        .headers
        .keys()
        .filter(|k| is_gateway_owned(k.as_str()))
        .cloned()
        .collect();
    for name in &doomed {
        upstream.remove_header(name);
    }
    // The gateway answered `Expect: 100-continue` itself once the request was admitted.
    upstream.remove_header("expect");
    let already_canonical = upstream
        .uri
        .path_and_query()
        .is_some_and(|pq| pq.as_str() == forward.upstream_path);
    if !already_canonical {
        let uri = forward.upstream_path.parse::<http::Uri>().map_err(|e| {
            pingora::Error::because(pingora::ErrorType::InternalError, "canonical uri", e)
        })?;
        upstream.set_uri(uri);
    }
    upstream.insert_header("X-Account-Id", forward.principal.account.id.as_str())?;
    upstream.insert_header("X-Plan", forward.principal.account.plan.as_str())?;
    upstream.insert_header("X-Request-Id", request_id)?;
    upstream.insert_header(
        "X-Creditgate-Catalog-Version",
        forward.catalog.version.to_string(),
    )?;
    if let Some(r) = &forward.reservation {
        upstream.insert_header("X-Creditgate-Charge-Id", r.id.as_str())?;
        upstream.insert_header("X-Creditgate-Operation", r.meta.operation.as_str())?;
        upstream.insert_header("X-Creditgate-Model", r.meta.model.as_str())?;
        upstream.insert_header("X-Creditgate-Quantity", r.meta.quantity.to_string())?;
        // The model header the backend may read says what was priced, nothing else.
        if upstream.headers.contains_key("x-model") {
            upstream.insert_header("X-Model", r.meta.model.as_str())?;
        }
    }
    Ok(())
}

/// Billing headers (and the request id) on a response are the gateway's alone.
pub fn strip_billing_headers(response: &mut ResponseHeader) {
    for name in BILLING_HEADERS.iter().chain(&["X-Request-Id"]) {
        response.remove_header(*name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_headers_are_recognised_whatever_case_the_client_used() {
        for h in [
            "Authorization",
            "X-API-KEY",
            "x-account-id",
            "X-Plan",
            "X-Billing-Anything",
            "x-creditgate-charge-id",
            "X-Request-Id",
        ] {
            // As a client may write it, then as the header map holds it.
            let name = http::HeaderName::from_bytes(h.as_bytes()).expect("header name");
            assert!(is_gateway_owned(name.as_str()), "{h}");
        }
        for h in ["content-type", "x-model", "x-num-images", "idempotency-key"] {
            assert!(!is_gateway_owned(h), "{h}");
        }
    }
}
