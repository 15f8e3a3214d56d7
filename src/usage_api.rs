//! `GET /api/usage` (CONTRACT §6, README "Usage history"): the authenticated account's own
//! ledger entries, newest first, in pages. Decides the query parameters (`from`, `to`, `cursor`,
//! `limit`), what a bad one answers (400 `invalid_request`), and the JSON of an entry, which
//! `creditgate usage` (`cli`) prints too. Called by `admit` for the path [`PATH`]; never proxied.

use percent_encoding::percent_decode_str;
use serde_json::{json, Value};

use crate::auth;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::incoming::IncomingRequest;
use crate::ledger::usage::{DEFAULT_PAGE, MAX_PAGE};
use crate::ledger::{UsageCursor, UsageEntry, UsagePage, UsageQuery, UsageUnit};
use crate::money::MicroUsd;
use crate::period;
use crate::respond::JsonReply;

/// The endpoint's path (`GET` only).
pub const PATH: &str = "/api/usage";
pub const LABEL: &str = "GET /api/usage";

/// Authenticates by API key and answers one page of the key's account.
pub async fn answer(
    gw: &Gateway,
    req: &mut dyn IncomingRequest,
    query: Option<&str>,
) -> Result<JsonReply, GatewayError> {
    let catalog = gw.catalog.snapshot();
    let principal = auth::authenticate(
        req.header(),
        &gw.keys,
        gw.ledger.as_ref(),
        &catalog,
        gw.now_ms(),
    )
    .await?;
    let query = parse_query(query.unwrap_or_default())?;
    let page = gw.ledger.usage(&principal.account.id, &query).await?;
    Ok(JsonReply::ok(200, &render_page(&page)))
}

/// `from`, `to`: RFC 3339 or UTC milliseconds (`from` inclusive, `to` exclusive); `cursor`: the
/// `nextCursor` of the page before; `limit`: 1..=1000 (default 100). Anything else — an unknown
/// or repeated parameter, a bad value, `from` after `to` — is a 400 naming the problem.
pub fn parse_query(raw: &str) -> Result<UsageQuery, GatewayError> {
    let bad = |m: String| GatewayError::InvalidRequest(m);
    let mut query = UsageQuery::default();
    let mut seen: Vec<String> = Vec::new();
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| bad(format!("Parameter `{name}` is not valid UTF-8.")))?;
        let name = percent_decode_str(name).decode_utf8_lossy().into_owned();
        if seen.contains(&name) {
            return Err(bad(format!("Parameter `{name}` is given twice.")));
        }
        match name.as_str() {
            "from" => query.from_ms = Some(parse_time("from", &value)?),
            "to" => query.to_ms = Some(parse_time("to", &value)?),
            "cursor" => {
                query.cursor = Some(UsageCursor::decode(&value).ok_or_else(|| {
                    bad("Parameter `cursor` is not a cursor this API returned.".to_string())
                })?)
            }
            "limit" => {
                query.limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|l| (1..=MAX_PAGE).contains(l))
                    .ok_or_else(|| {
                        bad(format!(
                            "Parameter `limit` must be an integer from 1 to {MAX_PAGE} (default {DEFAULT_PAGE})."
                        ))
                    })?
            }
            other => {
                return Err(bad(format!(
                    "Unknown parameter `{other}`: use from, to, cursor, limit."
                )))
            }
        }
        seen.push(name);
    }
    if let (Some(from), Some(to)) = (query.from_ms, query.to_ms) {
        if from > to {
            return Err(bad("Parameter `from` must not be after `to`.".to_string()));
        }
    }
    Ok(query)
}

/// RFC 3339 (`2026-11-01T00:00:00Z`) or UTC milliseconds since the epoch (`1793491200000`).
fn parse_time(name: &str, value: &str) -> Result<i64, GatewayError> {
    let parsed = match !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        true => value
            .parse::<i64>()
            .ok()
            .filter(|ms| *ms <= 253_402_300_799_999),
        false => period::parse_timestamp_ms(value),
    };
    parsed.ok_or_else(|| {
        GatewayError::InvalidRequest(format!(
            "Parameter `{name}` must be an RFC 3339 timestamp or UTC milliseconds."
        ))
    })
}

/// `{"entries": [...], "nextCursor": "…" | null}`.
pub fn render_page(page: &UsagePage) -> Value {
    json!({
        "entries": page.entries.iter().map(render_entry).collect::<Vec<_>>(),
        "nextCursor": page.next.as_ref().map(UsageCursor::encode),
    })
}

/// One entry: `credits` for credit entries, `usdMicros` and the decimal `usd` for pay-per-use.
pub fn render_entry(e: &UsageEntry) -> Value {
    let mut v = json!({
        "id": e.id,
        "type": e.kind.as_str(),
        "time": period::format_timestamp_ms(e.time_ms),
        "timeMs": e.time_ms,
        "requestId": non_empty(&e.request_id),
        "operation": non_empty(&e.operation),
        "model": non_empty(&e.model),
        "quantity": e.quantity,
        "bucket": e.bucket,
        "catalogVersion": e.catalog_version,
    });
    if let Some(obj) = v.as_object_mut() {
        match e.unit {
            UsageUnit::Credits => {
                obj.insert("credits".into(), json!(e.amount));
            }
            UsageUnit::Usd => {
                obj.insert("usdMicros".into(), json!(e.amount));
                obj.insert("usd".into(), json!(MicroUsd(e.amount).to_string()));
            }
        }
    }
    v
}

fn non_empty(text: &str) -> Value {
    match text.is_empty() {
        true => Value::Null,
        false => Value::String(text.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_checked() {
        let q = parse_query("from=2026-11-01T00%3A00%3A00Z&to=1793491200000&limit=5").ok();
        assert_eq!(q.as_ref().map(|q| q.limit), Some(5));
        assert_eq!(q.as_ref().and_then(|q| q.to_ms), Some(1_793_491_200_000));
        assert!(q.and_then(|q| q.from_ms).is_some());
        assert_eq!(parse_query("").ok().map(|q| q.limit), Some(100));
        for bad in [
            "limit=0",
            "limit=1001",
            "limit=x",
            "from=yesterday",
            "to=",
            "cursor=zz",
            "limit=1&limit=2",
            "page=2",
            "from=2000&to=1000",
        ] {
            assert!(parse_query(bad).is_err(), "{bad}");
        }
    }
}
