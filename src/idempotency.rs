//! `Idempotency-Key` (CONTRACT §4.7): the same key (per account, 24 h) for the same priced
//! request — method, canonical path, operation, model, quantity — is charged once and the first
//! response is replayed; a retry while the first is in flight gets 409; the same key on another
//! request gets 422. Only a delivered (2xx) outcome is kept: when the first attempt was refused
//! or failed (and so refunded), the key is released and a retry runs afresh. Called by `admit`
//! before reserving and by the proxy's `logging` once the outcome is known.

use pingora::http::ResponseHeader;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::GatewayError;
use crate::headers::BILLING_HEADERS;
use crate::ledger::{IdempotencyClaim, Ledger};
use crate::respond::JsonReply;
use crate::rules::Quote;

/// How long a finished key is remembered.
pub const KEEP_MS: i64 = 24 * 3600 * 1000;
/// The largest response body kept for replay; larger ones replay without a body.
pub const MAX_REPLAY_BODY: usize = 64 * 1024;
/// Response headers replayed with the body: the billing headers, and an accepted job's held
/// amount and id.
const REPLAYED_HEADERS: [&str; 7] = [
    BILLING_HEADERS[0],
    BILLING_HEADERS[1],
    BILLING_HEADERS[2],
    BILLING_HEADERS[3],
    crate::jobs::HELD_HEADERS[0],
    crate::jobs::HELD_HEADERS[1],
    crate::jobs::JOB_ID_HEADER,
];

/// A claimed key: this request runs, and must finish or release it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub key_hash: String,
    pub fingerprint: String,
}

/// What admission does with a presented key.
pub enum Check {
    Run(Ticket),
    Replay(JsonReply),
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    fingerprint: String,
    done: bool,
    #[serde(default)]
    status: u16,
    #[serde(default)]
    headers: Vec<(String, String)>,
    #[serde(default)]
    body: Option<String>,
}

/// The key as sent: 1–255 visible ASCII characters, at most once.
pub fn presented(header: &pingora::http::RequestHeader) -> Result<Option<String>, GatewayError> {
    let mut values = header.headers.get_all("idempotency-key").iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    let bad = || {
        GatewayError::InvalidRequest(
            "Idempotency-Key must be sent once, as 1 to 255 visible ASCII characters.".into(),
        )
    };
    if values.next().is_some() {
        return Err(bad());
    }
    let text = first.to_str().map_err(|_| bad())?;
    if text.is_empty() || text.len() > 255 || !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad());
    }
    Ok(Some(text.to_string()))
}

/// What "the same request" means: method, canonical path, operation, model, quantity.
pub fn fingerprint(method: &str, path: &str, quote: &Quote) -> String {
    let mut h = Sha256::new();
    for part in [
        method,
        path,
        &quote.operation,
        &quote.model,
        &quote.quantity.to_string(),
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex::encode(h.finalize())
}

/// Claims the key, or decides from what the first request left.
pub async fn check(
    ledger: &dyn Ledger,
    account_id: &str,
    key: &str,
    fingerprint: String,
    lease_ms: i64,
) -> Result<Check, GatewayError> {
    let key_hash = hex::encode(Sha256::digest(key.as_bytes()));
    let pending = Record {
        fingerprint: fingerprint.clone(),
        done: false,
        status: 0,
        headers: Vec::new(),
        body: None,
    };
    let text =
        serde_json::to_string(&pending).map_err(|e| GatewayError::Internal(e.to_string()))?;
    match ledger
        .claim_idempotency_key(account_id, &key_hash, &text, lease_ms)
        .await?
    {
        IdempotencyClaim::Claimed => Ok(Check::Run(Ticket {
            key_hash,
            fingerprint,
        })),
        IdempotencyClaim::Existing(stored) => {
            let record: Record = serde_json::from_str(&stored)
                .map_err(|e| GatewayError::Internal(format!("idempotency record: {e}")))?;
            if record.fingerprint != fingerprint {
                Err(GatewayError::IdempotencyMismatch)
            } else if !record.done {
                Err(GatewayError::IdempotencyInProgress)
            } else {
                Ok(Check::Replay(replay(record)))
            }
        }
    }
}

fn replay(record: Record) -> JsonReply {
    let mut reply = JsonReply {
        status: record.status,
        body: bytes::Bytes::from(record.body.unwrap_or_default()),
        headers: Vec::new(),
    };
    for (name, value) in record.headers {
        if let Some(known) = REPLAYED_HEADERS
            .iter()
            .find(|h| h.eq_ignore_ascii_case(&name))
        {
            reply.headers.push((known, value));
        }
    }
    reply.with_header("Idempotent-Replayed", "true")
}

/// Keeps a delivered outcome for replay.
pub async fn finish(
    ledger: &dyn Ledger,
    account_id: &str,
    ticket: &Ticket,
    status: u16,
    headers: Vec<(String, String)>,
    body: Option<&[u8]>,
) -> Result<(), GatewayError> {
    let record = Record {
        fingerprint: ticket.fingerprint.clone(),
        done: true,
        status,
        headers,
        body: body.map(|b| String::from_utf8_lossy(b).into_owned()),
    };
    let text = serde_json::to_string(&record).map_err(|e| GatewayError::Internal(e.to_string()))?;
    ledger
        .store_idempotency_record(account_id, &ticket.key_hash, &text, KEEP_MS)
        .await?;
    Ok(())
}

/// Lets the same request run again (it was refused or failed, and nothing stands charged).
pub async fn release(
    ledger: &dyn Ledger,
    account_id: &str,
    ticket: &Ticket,
) -> Result<(), GatewayError> {
    ledger
        .release_idempotency_key(account_id, &ticket.key_hash)
        .await?;
    Ok(())
}

/// A response as the client got it, kept while its `Idempotency-Key` may replay it: the status,
/// the billing headers and the body up to [`MAX_REPLAY_BODY`].
#[derive(Debug, Default)]
pub struct Capture {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    overflow: bool,
}

impl Capture {
    /// Starts from the response header the client is sent.
    pub fn of(response: &ResponseHeader) -> Self {
        let headers = response
            .headers
            .iter()
            .filter(|(name, _)| {
                REPLAYED_HEADERS
                    .iter()
                    .any(|h| h.eq_ignore_ascii_case(name.as_str()))
            })
            .filter_map(|(n, v)| Some((n.to_string(), v.to_str().ok()?.to_string())))
            .collect();
        Self {
            status: response.status.as_u16(),
            headers,
            ..Self::default()
        }
    }

    /// Adds a body chunk; past [`MAX_REPLAY_BODY`] the replay goes without a body.
    pub fn push_body(&mut self, chunk: &[u8]) {
        if self.body.len() + chunk.len() <= MAX_REPLAY_BODY {
            self.body.extend_from_slice(chunk);
        } else {
            self.overflow = true;
        }
    }
}

/// Once the outcome is known: keeps a delivered response for replay, or releases the key of a
/// request that failed (and so was refunded). A store failure is logged: the key then lapses
/// with its lease.
pub async fn conclude(
    ledger: &dyn Ledger,
    account_id: &str,
    ticket: &Ticket,
    delivered: Option<Capture>,
    request_id: &str,
) {
    let result = match delivered {
        Some(capture) => {
            let body = (!capture.overflow).then_some(capture.body.as_slice());
            finish(
                ledger,
                account_id,
                ticket,
                capture.status,
                capture.headers,
                body,
            )
            .await
        }
        None => release(ledger, account_id, ticket).await,
    };
    if let Err(e) = result {
        tracing::warn!(request_id = %request_id, error = %e, "idempotency record not written");
    }
}
