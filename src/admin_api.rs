//! The admin API (CONTRACT §8) on its own listener, guarded by the admin bearer token (compared
//! in constant time): accounts, plan changes, keys, credit grants, the catalog, and the
//! `/healthz` + `/readyz` probes, the backend's job callback (`POST /admin/jobs/{id}`, see
//! `jobs`), and `GET /openapi.json` (the `openapi` document; like the
//! probes it needs no token). Every bad input is a 400 naming the field; nothing changes then.
//!
//! Account writes change only the fields a request names: a PATCH without `plan` is one
//! field-level write; one with `plan` is a guarded change (top-up and plan in one step, retried
//! when a concurrent writer got there first). Key creation claims its slot in the store, so
//! concurrent creations never pass the plan's slots (409 `key_slot_exceeded`).

use std::sync::Arc;

use async_trait::async_trait;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::{json, Map, Value};
use subtle::ConstantTimeEq;

use crate::apikey::{random_id, ApiKey};
use crate::entitlement;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::incoming::MAX_API_BODY_BYTES;
use crate::ledger::{
    Account, AccountChange, GuardedChange, KeyRecord, KeySlotClaim, SubscriptionStatus,
};
use crate::money::MicroUsd;
use crate::money::MAX_SPENDING_LIMIT_CENTS;
use crate::period;
use crate::plan_change::{self, MAX_ATTEMPTS};
use crate::respond::JsonReply;
use crate::rules::{self, CreditGrant};

pub struct AdminApp {
    pub gw: Arc<Gateway>,
}

type AdminResult = Result<JsonReply, GatewayError>;

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let request_id = random_id("adm_", 16);
        let method = session.req_header().method.as_str().to_string();
        let path = session.req_header().uri.path().to_string();
        let authorized = self.authorized(session);
        let reply = match (method.as_str(), path.as_str()) {
            ("GET", "/healthz") => Ok(JsonReply::ok(200, &json!({"status": "ok"}))),
            ("GET", "/readyz") => Ok(self.readyz().await),
            ("GET", "/openapi.json") => Ok(crate::openapi::reply()),
            _ if !authorized => Err(GatewayError::AdminUnauthorized),
            _ => match read_body(session).await {
                Ok(body) => self.route(&method, &path, &body).await,
                Err(e) => Err(e),
            },
        };
        let reply = reply.unwrap_or_else(|e| JsonReply::error(&e));
        tracing::info!(request_id = %request_id, method = %method, path = %path, status = reply.status, "admin");
        reply.into_http(&request_id)
    }
}

async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, GatewayError> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_API_BODY_BYTES {
                    return Err(GatewayError::InvalidRequest(
                        "The body must be at most 4 KiB.".into(),
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(_) => {
                return Err(GatewayError::InvalidRequest(
                    "The body could not be read.".into(),
                ))
            }
        }
    }
}

fn bad(field: &str, message: &str) -> GatewayError {
    GatewayError::InvalidRequest(format!("`{field}` {message}"))
}

fn json_object(body: &[u8], allow_empty: bool) -> Result<Map<String, Value>, GatewayError> {
    if allow_empty && body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(GatewayError::InvalidRequest(
            "The body must be a JSON object.".into(),
        )),
    }
}

fn only_fields(m: &Map<String, Value>, allowed: &[&str]) -> Result<(), GatewayError> {
    match m.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(bad(k, "is not a known field")),
        None => Ok(()),
    }
}

fn opt_str<'a>(m: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, GatewayError> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(bad(field, "must be a string")),
    }
}

fn opt_bool(m: &Map<String, Value>, field: &str) -> Result<Option<bool>, GatewayError> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(bad(field, "must be true or false")),
    }
}

fn opt_uint(m: &Map<String, Value>, field: &str, max: u64) -> Result<Option<u64>, GatewayError> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.is_u64() => match n.as_u64() {
            Some(v) if v <= max => Ok(Some(v)),
            _ => Err(bad(field, &format!("must be at most {max}"))),
        },
        Some(_) => Err(bad(field, "must be a non-negative integer")),
    }
}

fn valid_account_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@'))
}

fn parse_time(m: &Map<String, Value>, field: &str) -> Result<Option<i64>, GatewayError> {
    match opt_str(m, field)? {
        None => Ok(None),
        Some(s) => period::parse_timestamp_ms(s).map(Some).ok_or_else(|| {
            bad(
                field,
                "must be an RFC 3339 timestamp such as 2026-05-01T00:00:00Z",
            )
        }),
    }
}

impl AdminApp {
    fn authorized(&self, session: &ServerSession) -> bool {
        let Some(expected) = self.gw.admin_token.as_deref() else {
            return false;
        };
        let presented = session
            .req_header()
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        presented.as_bytes().ct_eq(expected.as_bytes()).into()
    }

    async fn readyz(&self) -> JsonReply {
        if let Some(redis) = &self.gw.redis {
            match redis.server_settings().await {
                Ok((appendonly, policy)) => {
                    if appendonly != "yes" || policy != "noeviction" {
                        return JsonReply::ok(
                            503,
                            &json!({"status": "not_ready", "reason": format!(
                                "Redis must run with appendonly yes and maxmemory-policy noeviction (has appendonly {appendonly}, maxmemory-policy {policy})"
                            )}),
                        );
                    }
                }
                Err(e) => {
                    return JsonReply::ok(
                        503,
                        &json!({"status": "not_ready", "reason": e.to_string()}),
                    )
                }
            }
            // On a Redis Cluster: every slot served (`cluster_state:ok`), or not ready.
            let problem = match redis.cluster_problem().await {
                Ok(problem) => problem,
                Err(e) => Some(e.to_string()),
            };
            if let Some(problem) = problem {
                return JsonReply::ok(
                    503,
                    &json!({"status": "not_ready", "reason": format!("Redis Cluster not ok: {problem}")}),
                );
            }
        }
        match self.gw.ledger.ping().await {
            Ok(()) => JsonReply::ok(
                200,
                &json!({"status": "ready", "catalogVersion": self.gw.catalog.snapshot().version}),
            ),
            Err(e) => JsonReply::ok(
                503,
                &json!({"status": "not_ready", "reason": e.to_string()}),
            ),
        }
    }

    async fn route(&self, method: &str, path: &str, body: &[u8]) -> AdminResult {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (method, segments.as_slice()) {
            ("POST", ["admin", "accounts"]) => self.create_account(body).await,
            ("GET", ["admin", "accounts", id]) => self.show_account(id).await,
            ("PATCH", ["admin", "accounts", id]) => self.patch_account(id, body).await,
            ("POST", ["admin", "accounts", id, "keys"]) => self.create_key(id, body).await,
            ("POST", ["admin", "accounts", id, "credits"]) => self.grant(id, body).await,
            ("DELETE", ["admin", "keys", key_id]) => self.revoke(key_id).await,
            ("GET", ["admin", "catalog"]) => Ok(self.catalog()),
            ("POST", ["admin", "catalog", "reload"]) => Ok(self.reload()),
            ("POST", ["admin", "jobs", id]) => crate::jobs::callback(&self.gw, id, body).await,
            _ => Err(GatewayError::NotFound),
        }
    }

    async fn load(&self, id: &str) -> Result<Account, GatewayError> {
        self.gw
            .ledger
            .get_account(id)
            .await?
            .ok_or(GatewayError::NoSuch("account"))
    }

    async fn create_account(&self, body: &[u8]) -> AdminResult {
        let m = json_object(body, false)?;
        only_fields(
            &m,
            &[
                "id",
                "plan",
                "payPerUse",
                "stripeCustomerId",
                "currentPeriodEnd",
                "spendingLimitCents",
                "status",
            ],
        )?;
        let id = opt_str(&m, "id")?.ok_or_else(|| bad("id", "is required"))?;
        if !valid_account_id(id) {
            return Err(bad(
                "id",
                "must be 1-64 characters of A-Z a-z 0-9 _ - . : @",
            ));
        }
        let catalog = self.gw.catalog.snapshot();
        let plan = opt_str(&m, "plan")?.ok_or_else(|| bad("plan", "is required"))?;
        if !entitlement::is_known_plan(&catalog, plan) {
            return Err(bad(
                "plan",
                "is not a plan of the catalog (or \"pay_per_use\")",
            ));
        }
        let status = match opt_str(&m, "status")? {
            None => SubscriptionStatus::Active,
            Some(s) => SubscriptionStatus::parse(s).ok_or_else(|| {
                bad(
                    "status",
                    "must be active, trialing, past_due, canceled or incomplete",
                )
            })?,
        };
        let now = self.gw.now_ms();
        let anchor = match parse_time(&m, "currentPeriodEnd")? {
            Some(t) => t,
            None => period::add_months(now, 1).unwrap_or(now),
        };
        let account = Account {
            id: id.to_string(),
            plan: plan.to_string(),
            status,
            period_anchor_ms: anchor,
            pay_per_use: opt_bool(&m, "payPerUse")?.unwrap_or(false),
            spending_limit_cents: opt_uint(&m, "spendingLimitCents", MAX_SPENDING_LIMIT_CENTS)?
                .unwrap_or(self.gw.config.billing.default_spending_limit_cents),
            stripe_customer_id: opt_str(&m, "stripeCustomerId")?.map(str::to_string),
            created_ms: now,
        };
        let signup = match catalog.plan(plan).map(|p| p.grant) {
            Some(CreditGrant::Once) => entitlement::credit_bucket(&catalog, &account, now),
            _ => None,
        };
        if !self
            .gw
            .ledger
            .create_account(&account, signup.as_ref())
            .await?
        {
            return Err(GatewayError::AlreadyExists("An account with this id"));
        }
        let mut reply = self.account_view(&account).await?;
        reply.status = 201;
        Ok(reply)
    }

    async fn account_view(&self, account: &Account) -> AdminResult {
        let catalog = self.gw.catalog.snapshot();
        let now = self.gw.now_ms();
        let balance = crate::billing_api::credits_remaining(&self.gw, account).await?;
        let spend = self
            .gw
            .ledger
            .month_spend(&account.id, &period::month_key(now))
            .await?;
        let slots = entitlement::key_slots(&catalog, account);
        let keys = self.gw.ledger.active_keys(&account.id).await?;
        let keys: Vec<Value> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                json!({
                    "id": k.id,
                    "prefix": k.prefix,
                    "name": k.name,
                    "createdAt": period::format_timestamp_ms(k.created_ms),
                    "usable": (i as u64) < slots,
                })
            })
            .collect();
        Ok(JsonReply::ok(
            200,
            &json!({
                "id": account.id,
                "plan": account.plan,
                "status": account.status.as_str(),
                "payPerUse": account.pay_per_use,
                "stripeCustomerId": account.stripe_customer_id,
                "currentPeriodEnd": entitlement::current_period_end(&catalog, account, now)
                    .map(period::format_timestamp_ms),
                "balance": balance,
                "monthSpendUsd": MicroUsd(spend).to_string(),
                "monthSpendMicroUsd": spend,
                "spendingLimitCents": account.spending_limit_cents,
                "keySlots": slots,
                "keys": keys,
            }),
        ))
    }

    async fn show_account(&self, id: &str) -> AdminResult {
        let account = self.load(id).await?;
        self.account_view(&account).await
    }

    async fn patch_account(&self, id: &str, body: &[u8]) -> AdminResult {
        let m = json_object(body, false)?;
        only_fields(
            &m,
            &[
                "plan",
                "status",
                "payPerUse",
                "currentPeriodEnd",
                "spendingLimitCents",
                "stripeCustomerId",
            ],
        )?;
        let catalog = self.gw.catalog.snapshot();
        let plan = opt_str(&m, "plan")?;
        if let Some(p) = plan {
            if !entitlement::is_known_plan(&catalog, p) {
                return Err(bad(
                    "plan",
                    "is not a plan of the catalog (or \"pay_per_use\")",
                ));
            }
        }
        let status = match opt_str(&m, "status")? {
            None => None,
            Some(s) => Some(SubscriptionStatus::parse(s).ok_or_else(|| {
                bad(
                    "status",
                    "must be active, trialing, past_due, canceled or incomplete",
                )
            })?),
        };
        let pay_per_use = opt_bool(&m, "payPerUse")?;
        let period_end = parse_time(&m, "currentPeriodEnd")?;
        let limit = opt_uint(&m, "spendingLimitCents", MAX_SPENDING_LIMIT_CENTS)?;
        let customer = opt_str(&m, "stripeCustomerId")?;

        let mut change = AccountChange {
            plan: None,
            status,
            period_anchor_ms: period_end,
            pay_per_use,
            spending_limit_cents: limit,
            stripe_customer_id: customer.map(str::to_string),
        };
        let Some(plan) = plan else {
            // Nothing here depends on what was stored: write just these fields.
            let account = self
                .gw
                .ledger
                .change_account(id, &change)
                .await?
                .ok_or(GatewayError::NoSuch("account"))?;
            self.gw.keys.clear();
            return self.account_view(&account).await;
        };
        change.plan = Some(plan.to_string());
        // A plan change depends on the plan it replaces (the top-up, a first period anchor):
        // decided on the account as read, written only if it is still that account.
        for attempt in 0..MAX_ATTEMPTS {
            let old = self.load(id).await?;
            let now = self.gw.now_ms();
            let had_periods = catalog
                .plan(&old.plan)
                .is_some_and(|p| p.grant == CreditGrant::Period);
            let mut change = change.clone();
            if period_end.is_none() && !had_periods && plan != old.plan {
                change.period_anchor_ms = Some(period::add_months(now, 1).unwrap_or(now));
            }
            let new = change.applied_to(&old);
            let credits: Vec<_> = plan_change::upgrade_difference(&catalog, &old, &new, now)
                .into_iter()
                .collect();
            match self
                .gw
                .ledger
                .change_account_if(&old, &change, &credits, None)
                .await?
            {
                GuardedChange::Applied(account) => {
                    self.gw.keys.clear();
                    return self.account_view(&account).await;
                }
                GuardedChange::Conflict | GuardedChange::Stale { .. } => {
                    plan_change::retry_pause(attempt).await;
                }
            }
        }
        Err(plan_change::too_contended(id).into())
    }

    async fn create_key(&self, id: &str, body: &[u8]) -> AdminResult {
        let m = json_object(body, true)?;
        only_fields(&m, &["name"])?;
        let name = opt_str(&m, "name")?;
        if name.is_some_and(|n| n.len() > 100) {
            return Err(bad("name", "must be at most 100 characters"));
        }
        let account = self.load(id).await?;
        let catalog = self.gw.catalog.snapshot();
        let slots = entitlement::key_slots(&catalog, &account);
        let key = ApiKey::generate();
        let record = KeyRecord {
            id: random_id("key_", 16),
            account_id: account.id.clone(),
            prefix: key.display_prefix().to_string(),
            name: name.map(str::to_string),
            created_ms: self.gw.now_ms(),
            revoked: false,
        };
        // The slot is claimed in the store, atomically: concurrent creations never pass `slots`.
        match self
            .gw
            .ledger
            .insert_key(&key.hash_hex(), &record, slots)
            .await?
        {
            KeySlotClaim::Claimed => {}
            KeySlotClaim::Full => {
                return Ok(JsonReply::error(&GatewayError::KeySlotExceeded).with_status(409));
            }
        }
        Ok(JsonReply::ok(
            201,
            &json!({"id": record.id, "key": key.expose(), "prefix": record.prefix}),
        ))
    }

    async fn revoke(&self, key_id: &str) -> AdminResult {
        match self.gw.ledger.revoke_key(key_id).await? {
            Some(k) => {
                self.gw.keys.clear();
                Ok(JsonReply::ok(200, &json!({"id": k.id, "revoked": true})))
            }
            None => Err(GatewayError::NoSuch("key")),
        }
    }

    async fn grant(&self, id: &str, body: &[u8]) -> AdminResult {
        let m = json_object(body, false)?;
        only_fields(&m, &["amount", "reason"])?;
        let amount =
            opt_uint(&m, "amount", 1_000_000_000)?.ok_or_else(|| bad("amount", "is required"))?;
        if amount == 0 {
            return Err(bad("amount", "must be a positive integer"));
        }
        let reason = opt_str(&m, "reason")?.unwrap_or("");
        let account = self.load(id).await?;
        let catalog = self.gw.catalog.snapshot();
        let bucket =
            entitlement::credit_bucket(&catalog, &account, self.gw.now_ms()).ok_or_else(|| {
                bad(
                    "amount",
                    "cannot be granted: the account's plan has no credits",
                )
            })?;
        let balance = self.gw.ledger.grant_credits(id, &bucket, amount).await?;
        tracing::info!(account = %id, amount, reason = %reason, "credits granted");
        Ok(JsonReply::ok(
            200,
            &json!({"balance": balance, "granted": amount}),
        ))
    }

    fn catalog(&self) -> JsonReply {
        let catalog = self.gw.catalog.snapshot();
        JsonReply::ok(
            200,
            &json!({
                "version": catalog.version,
                "fingerprint": catalog.fingerprint,
                "catalog": rules::render_json(&catalog),
            }),
        )
    }

    fn reload(&self) -> JsonReply {
        match crate::reloader::reload(&self.gw, "admin") {
            Ok(version) => JsonReply::ok(200, &json!({"version": version, "reloaded": true})),
            Err(problems) => {
                let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
                JsonReply::ok(
                    400,
                    &json!({"error": {
                        "code": "invalid_request",
                        "message": "The rules directory has errors; the old catalog keeps serving.",
                        "problems": list,
                    }}),
                )
            }
        }
    }
}
