//! Authentication: `Authorization: Bearer <key>` or `X-API-Key: <key>` → [`Principal`]. Keys are
//! looked up by SHA-256 through a short-lived in-process cache (`billing.key_cache_ttl_ms`, at
//! most 1 s), so a revocation or plan change made on any instance bites everywhere within that
//! TTL without a pub/sub channel; the instance that made the change drops its cache at once.
//! Key slots are checked on every request against the live catalog. Called by `admit`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pingora::http::RequestHeader;

use crate::apikey::ApiKey;
use crate::entitlement;
use crate::error::GatewayError;
use crate::ledger::{Account, Ledger};
use crate::rules::Catalog;

/// Who is calling: the account and the key, as of at most one cache TTL ago.
#[derive(Debug, Clone)]
pub struct Principal {
    pub account: Account,
    pub key_id: String,
    pub key_prefix: String,
    /// 0-based position among the account's active keys in creation order.
    pub slot: u64,
}

#[derive(Debug, Clone)]
enum Cached {
    Valid(Arc<Principal>),
    Invalid,
}

/// Cache of key hash → principal.
pub struct KeyCache {
    ttl_ms: i64,
    max_entries: usize,
    entries: Mutex<HashMap<String, (i64, Cached)>>,
}

impl KeyCache {
    pub fn new(ttl_ms: u64) -> Self {
        Self {
            ttl_ms: i64::try_from(ttl_ms).unwrap_or(1000),
            max_entries: 100_000,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, hash: &str, now_ms: i64) -> Option<Cached> {
        let map = self.entries.lock().ok()?;
        match map.get(hash) {
            Some((expires, c)) if *expires > now_ms => Some(c.clone()),
            _ => None,
        }
    }

    fn put(&self, hash: String, now_ms: i64, value: Cached) {
        if let Ok(mut map) = self.entries.lock() {
            if map.len() >= self.max_entries {
                map.retain(|_, (expires, _)| *expires > now_ms);
                if map.len() >= self.max_entries {
                    map.clear();
                }
            }
            map.insert(hash, (now_ms + self.ttl_ms, value));
        }
    }

    /// Forget everything (after an admin change on this instance).
    pub fn clear(&self) {
        if let Ok(mut map) = self.entries.lock() {
            map.clear();
        }
    }
}

/// The presented key: `Authorization: Bearer`, else `X-API-Key`. Both present and different is
/// refused rather than guessed.
pub fn presented_key(req: &RequestHeader) -> Result<ApiKey, GatewayError> {
    let header = |name: &str| -> Result<Option<&str>, GatewayError> {
        let mut values = req.headers.get_all(name).iter();
        let first = values.next();
        if values.next().is_some() {
            return Err(GatewayError::InvalidApiKey);
        }
        match first {
            None => Ok(None),
            Some(v) => v
                .to_str()
                .map(Some)
                .map_err(|_| GatewayError::InvalidApiKey),
        }
    };
    let bearer = match header("authorization")? {
        None => None,
        Some(v) => {
            let (scheme, rest) = v.split_once(' ').ok_or(GatewayError::InvalidApiKey)?;
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(GatewayError::InvalidApiKey);
            }
            Some(rest.trim())
        }
    };
    let x_api_key = header("x-api-key")?.map(str::trim);
    let text = match (bearer, x_api_key) {
        (Some(a), Some(b)) if a != b => return Err(GatewayError::InvalidApiKey),
        (Some(a), _) => a,
        (None, Some(b)) => b,
        (None, None) => return Err(GatewayError::InvalidApiKey),
    };
    ApiKey::parse(text).ok_or(GatewayError::InvalidApiKey)
}

/// Resolves the request's key to a principal and checks its slot under the live catalog.
pub async fn authenticate(
    req: &RequestHeader,
    cache: &KeyCache,
    ledger: &dyn Ledger,
    catalog: &Catalog,
    now_ms: i64,
) -> Result<Arc<Principal>, GatewayError> {
    let key = presented_key(req)?;
    let hash = key.hash_hex();
    let principal = match cache.get(&hash, now_ms) {
        Some(Cached::Valid(p)) => p,
        Some(Cached::Invalid) => return Err(GatewayError::InvalidApiKey),
        None => match lookup(ledger, &hash).await? {
            Some(p) => {
                let p = Arc::new(p);
                cache.put(hash, now_ms, Cached::Valid(p.clone()));
                p
            }
            None => {
                cache.put(hash, now_ms, Cached::Invalid);
                return Err(GatewayError::InvalidApiKey);
            }
        },
    };
    let slots = entitlement::key_slots(catalog, &principal.account);
    if slots == 0 {
        return Err(GatewayError::PlanHasNoApiAccess);
    }
    if principal.slot >= slots {
        return Err(GatewayError::KeySlotExceeded);
    }
    Ok(principal)
}

async fn lookup(ledger: &dyn Ledger, hash: &str) -> Result<Option<Principal>, GatewayError> {
    let Some(key) = ledger.key_by_hash(hash).await? else {
        return Ok(None);
    };
    if key.revoked {
        return Ok(None);
    }
    let Some(account) = ledger.get_account(&key.account_id).await? else {
        return Ok(None);
    };
    let Some(slot) = ledger.key_slot(&key.account_id, &key.id).await? else {
        return Ok(None);
    };
    Ok(Some(Principal {
        account,
        key_id: key.id,
        key_prefix: key.prefix,
        slot,
    }))
}
