//! The usage export of `creditgate usage` (`cli`): every entry of a time range, read page by
//! page from the ledger, and printed as CSV (one row per entry, fixed columns) or JSON (the
//! entries as `GET /api/usage` renders them). Decides the export's columns and shape.

use serde_json::json;

use crate::ledger::usage::MAX_PAGE;
use crate::ledger::{Ledger, StoreResult, UsageEntry, UsageQuery, UsageUnit};
use crate::money::MicroUsd;
use crate::usage_api::render_entry;

/// The CSV header.
pub const CSV_HEADER: &str =
    "id,type,time,request_id,operation,model,quantity,credits,usd_micros,usd,bucket,catalog_version";

/// Every entry of `[from_ms, to_ms)`, newest first.
pub async fn read_all(
    ledger: &dyn Ledger,
    account_id: &str,
    from_ms: i64,
    to_ms: i64,
) -> StoreResult<Vec<UsageEntry>> {
    let mut query = UsageQuery {
        from_ms: Some(from_ms),
        to_ms: Some(to_ms),
        cursor: None,
        limit: MAX_PAGE,
    };
    let mut all = Vec::new();
    loop {
        let page = ledger.usage(account_id, &query).await?;
        all.extend(page.entries);
        match page.next {
            Some(next) => query.cursor = Some(next),
            None => return Ok(all),
        }
    }
}

/// Header plus one line per entry, in the given order.
pub fn csv(entries: &[UsageEntry]) -> String {
    let mut out = String::with_capacity(64 + entries.len() * 128);
    out.push_str(CSV_HEADER);
    out.push('\n');
    for e in entries {
        let (credits, micros, usd) = match e.unit {
            UsageUnit::Credits => (e.amount.to_string(), String::new(), String::new()),
            UsageUnit::Usd => (
                String::new(),
                e.amount.to_string(),
                MicroUsd(e.amount).to_string(),
            ),
        };
        let cells = [
            e.id.clone(),
            e.kind.as_str().to_string(),
            crate::period::format_timestamp_ms(e.time_ms),
            e.request_id.clone(),
            e.operation.clone(),
            e.model.clone(),
            e.quantity.to_string(),
            credits,
            micros,
            usd,
            e.bucket.clone(),
            e.catalog_version.to_string(),
        ];
        let line: Vec<String> = cells.iter().map(|c| cell(c)).collect();
        out.push_str(&line.join(","));
        out.push('\n');
    }
    out
}

/// `{"account", "month", "entries": [...]}` with a trailing newline.
pub fn json(account_id: &str, month: &str, entries: &[UsageEntry]) -> String {
    let doc = json!({
        "account": account_id,
        "month": month,
        "entries": entries.iter().map(render_entry).collect::<Vec<_>>(),
    });
    let mut text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    text.push('\n');
    text
}

/// RFC 4180 quoting when a cell needs it.
fn cell(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}
