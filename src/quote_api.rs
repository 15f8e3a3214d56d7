//! `POST /api/quote` (issue 13): what a generation request would cost and who would pay for it,
//! without reserving or writing anything. The body is the generation request's JSON body plus
//! `path` (the target, with its query) and optionally `method` (default `POST`); the quote
//! request's own headers are the generation request's headers. The route rule prices it with
//! the same code as a real request (`rules::quote`), and the payer comes from the same
//! [`PaymentPlan`] `reserve::reserve` walks, read with plain balance / month-spend reads.
//! Called by `admit` after authentication; never proxied.

use serde_json::{json, Map, Value};

use crate::auth::Principal;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::incoming::header_str;
use crate::ledger::Ledger;
use crate::payer::{Leg, Payer, PaymentPlan};
use crate::respond::JsonReply;
use crate::rules::{self, canonicalize, Catalog, Quote, RequestInputs};

/// Where quotes are asked (on the proxy listener).
pub const QUOTE_PATH: &str = "/api/quote";
/// The route label of quotes in logs and metrics.
pub const QUOTE_LABEL: &str = "POST /api/quote";
/// Body fields that belong to the quote, not to the generation body.
const PATH_FIELD: &str = "path";
const METHOD_FIELD: &str = "method";

/// The generation request a quote describes, taken apart from the quote's body.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub method: String,
    /// The request target: path and optional query, as the generation request would send it.
    pub target: String,
    /// The generation request's JSON body (the quote body without `path` and `method`).
    pub body: Value,
}

/// Splits a quote body into the target and the generation body. Anything that is not a JSON
/// object with a string `path` starting with `/` (and, if present, a string `method`) is 400.
pub fn parse_target(bytes: &[u8]) -> Result<Target, GatewayError> {
    let bad = |m: &str| GatewayError::InvalidRequest(m.to_string());
    // Strict like a generation body: duplicate keys are refused.
    let value = rules::parse_json_body(bytes).map_err(|e| {
        GatewayError::InvalidRequest(format!("The quote body is not valid JSON: {}.", e.0))
    })?;
    let Value::Object(mut body) = value else {
        return Err(bad("The quote body must be a JSON object."));
    };
    let target = match body.remove(PATH_FIELD) {
        Some(Value::String(p)) if p.starts_with('/') => p,
        Some(_) => return Err(bad("Field `path` must be a string starting with `/`.")),
        None => {
            return Err(bad(
                "Field `path` is required: the generation request's path.",
            ))
        }
    };
    let method = match body.remove(METHOD_FIELD) {
        None => "POST".to_string(),
        Some(Value::String(m)) if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) => m,
        Some(_) => return Err(bad("Field `method` must be an upper-case HTTP method.")),
    };
    Ok(Target {
        method,
        target,
        body: Value::Object(body),
    })
}

/// Answers one quote: prices the target like a real request, then asks the payment plan.
pub async fn answer(
    gw: &Gateway,
    principal: &Principal,
    request: &pingora::http::RequestHeader,
    catalog: &Catalog,
    body: &[u8],
) -> Result<JsonReply, GatewayError> {
    if request.uri.query().is_some() {
        return Err(GatewayError::InvalidRequest(
            "The quote takes no query; put the generation request's query in `path`.".to_string(),
        ));
    }
    let target = parse_target(body)?;
    let path =
        canonicalize(&target.target).map_err(|e| GatewayError::AmbiguousPath(e.to_string()))?;
    let route = catalog
        .match_route(&target.method, &path)
        .ok_or(GatewayError::NotFound)?;
    crate::admit::refuse_repeated_pricing_headers(request, route.route())?;
    let json_body = route.needs_json_body().then_some(&target.body);
    let quote = {
        let lookup = |name: &str| header_str(request, name);
        let inputs = RequestInputs {
            json_body,
            header: &lookup,
            query: &path,
        };
        rules::quote(catalog, &route, &inputs)?
    };
    // A route that prices nothing has nothing to quote.
    let quote = quote.ok_or(GatewayError::NotFound)?;
    let now_ms = gw.now_ms();
    let plan = PaymentPlan::for_request(catalog, &principal.account, &quote, now_ms);
    let verdict = ask(gw.ledger.as_ref(), &principal.account.id, &plan).await?;
    Ok(JsonReply::ok(200, &render(&quote, &plan, &verdict)))
}

/// Who would pay, read now: the first leg that covers the price, else the refusal's payer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub payer: Payer,
    /// The error code the request would be refused with; `None` when it would be admitted.
    pub refusal: Option<&'static str>,
}

/// Walks the plan's legs in `reserve`'s order with plain reads (nothing is written).
pub async fn ask(
    ledger: &dyn Ledger,
    account_id: &str,
    plan: &PaymentPlan,
) -> Result<Verdict, GatewayError> {
    for leg in &plan.legs {
        let standing = match leg {
            Leg::Credits(c) => ledger.credit_balance(account_id, &c.bucket).await?,
            Leg::Spend(s) => ledger.month_spend(account_id, &s.month).await?,
        };
        if leg.covers(standing) {
            return Ok(Verdict {
                payer: leg.payer(),
                refusal: None,
            });
        }
    }
    Ok(Verdict {
        payer: plan.payer_when_refused(),
        refusal: Some(plan.refusal().code()),
    })
}

/// The quote's JSON: the price in the payer's unit (`credits` or `usd`; neither for `none`).
fn render(quote: &Quote, plan: &PaymentPlan, verdict: &Verdict) -> Value {
    let mut out = Map::new();
    out.insert("operation".into(), json!(&*quote.operation));
    out.insert("model".into(), json!(&*quote.model));
    out.insert("quantity".into(), json!(quote.quantity));
    out.insert("payer".into(), json!(verdict.payer.as_str()));
    for leg in &plan.legs {
        match leg {
            Leg::Credits(c) if verdict.payer == Payer::Credits => {
                out.insert("credits".into(), json!(c.total));
            }
            Leg::Spend(s) if verdict.payer == Payer::PayPerUse => {
                out.insert("usd".into(), json!(s.total.to_string()));
            }
            _ => {}
        }
    }
    out.insert("wouldSucceed".into(), json!(verdict.refusal.is_none()));
    if let Some(code) = verdict.refusal {
        out.insert("refusal".into(), json!(code));
    }
    out.insert("catalogVersion".into(), json!(quote.catalog_version));
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_is_split_from_the_generation_body() {
        let t = parse_target(br#"{"path": "/api/v1/images/relight?model=x", "n": 2}"#).unwrap();
        assert_eq!(t.method, "POST");
        assert_eq!(t.target, "/api/v1/images/relight?model=x");
        assert_eq!(t.body, json!({"n": 2}));
        let t = parse_target(br#"{"path": "/a", "method": "PUT"}"#).unwrap();
        assert_eq!(t.method, "PUT");
        assert_eq!(t.body, json!({}));
    }

    #[test]
    fn a_bad_quote_body_is_refused() {
        for bad in [
            &b""[..],
            b"[]",
            br#"{"n": 2}"#,
            br#"{"path": 5}"#,
            br#"{"path": "api/v1/videos"}"#,
            br#"{"path": "/a", "method": "get"}"#,
            br#"{"path": "/a", "method": 1}"#,
            br#"{"path": "/a", "path": "/b"}"#,
        ] {
            let e = parse_target(bad).unwrap_err();
            assert_eq!(e.status(), 400, "{}", String::from_utf8_lossy(bad));
        }
    }
}
