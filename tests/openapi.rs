//! The OpenAPI document (`openapi/creditgate.json`) held to the real binary: every documented
//! (path, method, status) is provoked through running gateways (a real redis-server, the demo
//! backend) and the answer's body and documented headers are validated against the document's
//! schemas (`jsonschema`); a closing check fails when the document lists an answer no probe
//! provoked, so it cannot grow an untested one. The admin listener serves the shipped file.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use creditgate::demo_backend::{Behaviour, DemoBackend};
use serde_json::{json, Value};
use support::gateway::{free_port, shipped_rules, GatewayOptions, GatewayProcess, ADMIN_TOKEN};
use support::http::{self, Response};
use support::RedisServer;

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn shipped_document_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("openapi/creditgate.json")
}

/// The document with its `$ref`s resolved on demand.
struct Document {
    root: Value,
}

impl Document {
    fn load() -> Self {
        let text = std::fs::read_to_string(shipped_document_path()).expect("read the document");
        Self {
            root: serde_json::from_str(&text).expect("the document is JSON"),
        }
    }

    /// `v` with every local `$ref` replaced by what it points at (the document has no cycles).
    fn resolve(&self, v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    let pointer = r.strip_prefix('#').expect("local $ref");
                    let target = self
                        .root
                        .pointer(pointer)
                        .unwrap_or_else(|| panic!("dangling $ref {r}"));
                    return self.resolve(target);
                }
                Value::Object(
                    m.iter()
                        .map(|(k, v)| (k.clone(), self.resolve(v)))
                        .collect(),
                )
            }
            Value::Array(a) => Value::Array(a.iter().map(|v| self.resolve(v)).collect()),
            other => other.clone(),
        }
    }

    /// Every (path, method, status) the document lists; status is a number or `default`.
    fn answers(&self) -> BTreeSet<(String, String, String)> {
        let mut all = BTreeSet::new();
        for (path, item) in self.root["paths"].as_object().expect("paths") {
            for method in METHODS {
                if let Some(responses) = item[method]["responses"].as_object() {
                    for status in responses.keys() {
                        all.insert((path.clone(), method.to_string(), status.clone()));
                    }
                }
            }
        }
        all
    }

    /// The documented response (resolved) for this status: its own entry, else `default`.
    fn response(&self, path: &str, method: &str, status: u16) -> Option<(String, Value)> {
        let responses = &self.root["paths"][path][method]["responses"];
        let key = status.to_string();
        for k in [key.as_str(), "default"] {
            if let Some(r) = responses.get(k) {
                return Some((k.to_string(), self.resolve(r)));
            }
        }
        None
    }
}

/// Checks answers against the document and remembers which documented ones were seen.
struct Checker {
    doc: Document,
    covered: BTreeSet<(String, String, String)>,
}

impl Checker {
    /// `r` must have status `expected`, be documented for (`path`, `method`), and match the
    /// document's body schema and headers.
    #[track_caller]
    fn check(&mut self, path: &str, method: &str, expected: u16, r: &Response) {
        let text: String = r.text().chars().take(400).collect();
        let what = format!("{} {path} → {}: {text}", method.to_uppercase(), r.status);
        assert_eq!(r.status, expected, "unexpected status for {what}");
        let (key, response) = self
            .doc
            .response(path, method, r.status)
            .unwrap_or_else(|| panic!("undocumented answer {what}"));
        if let Some(headers) = response["headers"].as_object() {
            for (name, header) in headers {
                match r.header(name) {
                    None => assert!(
                        header["required"] != json!(true),
                        "required header {name} missing: {what}"
                    ),
                    Some(value) => {
                        if let Err(e) =
                            jsonschema::validate(&header["schema"], &Value::String(value.into()))
                        {
                            panic!("header {name}: {value:?} does not match ({e}): {what}");
                        }
                    }
                }
            }
        }
        let schema = &response["content"]["application/json"]["schema"];
        assert!(schema.is_object(), "no JSON schema documented for {what}");
        let content_type = r.header("content-type").unwrap_or("");
        assert!(
            content_type.starts_with("application/json"),
            "Content-Type {content_type:?}: {what}"
        );
        let body: Value = serde_json::from_slice(&r.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {what}"));
        if let Err(e) = jsonschema::validate(schema, &body) {
            panic!(
                "body does not match the documented schema ({e} at {}): {what}",
                e.instance_path()
            );
        }
        self.covered
            .insert((path.to_string(), method.to_string(), key));
    }
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

async fn get(addr: std::net::SocketAddr, target: &str, key: Option<&str>) -> Response {
    let auth = key.map(bearer);
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    http::get(addr, target, &headers).await
}

async fn send(
    addr: std::net::SocketAddr,
    method: &str,
    target: &str,
    key: Option<&str>,
    extra: &[(&str, &str)],
    body: Option<&Value>,
) -> Response {
    let auth = key.map(bearer);
    let mut headers: Vec<(&str, &str)> =
        auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    headers.push(("Content-Type", "application/json"));
    headers.extend_from_slice(extra);
    let text = body.map(Value::to_string);
    http::request(
        addr,
        method,
        target,
        &headers,
        text.as_deref().map(str::as_bytes),
    )
    .await
}

/// Polls the caller's job until it is known (a job named in its accepting answer's body is
/// recorded just after that answer was sent); the first answer that is not a 404, within 3 s.
async fn poll_recorded(proxy: std::net::SocketAddr, target: &str, key: &str) -> Response {
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let r = get(proxy, target, Some(key)).await;
        if r.status != 404 || std::time::Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The shipped rules plus a `tiny` plan of one request per minute (to provoke 429).
fn rules_copy(dir: &Path) -> PathBuf {
    let rules = dir.join("rules");
    std::fs::create_dir_all(&rules).expect("rules dir");
    for entry in std::fs::read_dir(shipped_rules()).expect("shipped rules") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), rules.join(entry.file_name())).expect("copy rule file");
    }
    let plans = rules.join("plans.toml");
    let mut text = std::fs::read_to_string(&plans).expect("plans");
    text.push_str(
        "\n[[plan]]\nid = \"tiny\"\nname = \"Tiny\"\ncredits = 100\ncredits_grant = \"period\"\n\
         api_keys = 3\nprice_usd = 1\nrequests_per_minute = 1\nstripe_price_ids = []\n",
    );
    std::fs::write(&plans, text).expect("write plans");
    rules
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_answer_is_what_the_binary_answers() {
    let doc = Document::load();
    let documented = doc.answers();
    let mut c = Checker {
        doc,
        covered: BTreeSet::new(),
    };
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.expect("backend");
    let scratch = tempfile::tempdir().expect("temp dir");
    let rules = rules_copy(scratch.path());
    let mut opts = GatewayOptions::new(&redis.url(), backend.addr);
    opts.rules_dir = Some(rules.clone());
    opts.watch_rules = false;
    opts.read_timeout_ms = 1500;
    let gw = GatewayProcess::start_with(opts).await;
    // A second gateway on the same store whose backend is gone: 502.
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut opts = GatewayOptions::new(&redis.url(), dead);
    opts.rules_dir = Some(rules.clone());
    opts.watch_rules = false;
    let gone = GatewayProcess::start_with(opts).await;
    let (proxy, admin) = (gw.proxy, gw.admin);
    let token = Some(ADMIN_TOKEN);

    // ---- probes and the document itself ---------------------------------------------------
    let r = get(admin, "/openapi.json", None).await;
    c.check("/openapi.json", "get", 200, &r);
    let shipped = std::fs::read(shipped_document_path()).expect("read the document");
    assert!(
        r.body == shipped,
        "GET /openapi.json differs from openapi/creditgate.json"
    );
    c.check("/healthz", "get", 200, &get(admin, "/healthz", None).await);
    c.check("/readyz", "get", 200, &get(admin, "/readyz", None).await);

    // ---- accounts and keys ------------------------------------------------------------------
    let accounts = "/admin/accounts";
    let create =
        |body: Value| async move { send(admin, "POST", accounts, token, &[], Some(&body)).await };
    c.check(
        accounts,
        "post",
        201,
        &create(json!({"id": "biz", "plan": "business", "payPerUse": false})).await,
    );
    c.check(
        accounts,
        "post",
        409,
        &create(json!({"id": "biz", "plan": "business"})).await,
    );
    c.check(
        accounts,
        "post",
        400,
        &create(json!({"id": "no spaces", "plan": "pro"})).await,
    );
    c.check(
        accounts,
        "post",
        400,
        &create(json!({"id": "x", "plan": "platinum"})).await,
    );
    let no_token = send(
        admin,
        "POST",
        accounts,
        None,
        &[],
        Some(&json!({"id": "y", "plan": "pro"})),
    )
    .await;
    c.check(accounts, "post", 401, &no_token);
    let wrong = send(
        admin,
        "POST",
        accounts,
        Some("wrong-token"),
        &[],
        Some(&json!({"id": "y", "plan": "pro"})),
    )
    .await;
    c.check(accounts, "post", 401, &wrong);
    for (id, plan, ppu, status) in [
        ("ppu", "pay_per_use", true, "active"),
        ("broke", "pay_per_use", false, "active"),
        ("lapsed", "starter", false, "past_due"),
        ("downgraded", "starter", false, "active"),
        ("crowded", "pro", false, "active"),
        ("tiny", "tiny", false, "active"),
        ("dark", "business", false, "active"),
        ("signup", "free", false, "active"),
    ] {
        let body = json!({"id": id, "plan": plan, "payPerUse": ppu, "status": status, "stripeCustomerId": "cus_1"});
        c.check(accounts, "post", 201, &create(body).await);
    }

    let keys = "/admin/accounts/{id}/keys";
    let new_key = |account: &'static str| async move {
        send(
            admin,
            "POST",
            &format!("/admin/accounts/{account}/keys"),
            token,
            &[],
            Some(&json!({"name": "k"})),
        )
        .await
    };
    let key_of = |c: &mut Checker, r: Response| {
        c.check(keys, "post", 201, &r);
        r.json()["key"].as_str().expect("key").to_string()
    };
    let k_biz = key_of(&mut c, new_key("biz").await);
    let k_ppu = key_of(&mut c, new_key("ppu").await);
    let k_broke = key_of(&mut c, new_key("broke").await);
    let k_lapsed = key_of(&mut c, new_key("lapsed").await);
    let k_down = key_of(&mut c, new_key("downgraded").await);
    let mut crowded = Vec::new();
    for _ in 0..5 {
        crowded.push(key_of(&mut c, new_key("crowded").await));
    }
    let k_crowded = crowded[4].clone();
    let tiny: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(key_of(&mut c, new_key("tiny").await));
        }
        v
    };
    let k_dark = key_of(&mut c, new_key("dark").await);
    // An empty body is allowed.
    let r = send(admin, "POST", "/admin/accounts/biz/keys", token, &[], None).await;
    let spare_key_id = r.json()["id"].as_str().expect("key id").to_string();
    c.check(keys, "post", 201, &r);
    c.check(keys, "post", 409, &new_key("signup").await);
    c.check(keys, "post", 404, &new_key("nobody").await);
    let r = send(
        admin,
        "POST",
        "/admin/accounts/biz/keys",
        token,
        &[],
        Some(&json!({"name": 5})),
    )
    .await;
    c.check(keys, "post", 400, &r);
    let r = send(
        admin,
        "POST",
        "/admin/accounts/biz/keys",
        None,
        &[],
        Some(&json!({})),
    )
    .await;
    c.check(keys, "post", 401, &r);

    let account = "/admin/accounts/{id}";
    c.check(
        account,
        "get",
        200,
        &get(admin, "/admin/accounts/biz", token).await,
    );
    c.check(
        account,
        "get",
        200,
        &get(admin, "/admin/accounts/signup", token).await,
    );
    c.check(
        account,
        "get",
        404,
        &get(admin, "/admin/accounts/nobody", token).await,
    );
    c.check(
        account,
        "get",
        401,
        &get(admin, "/admin/accounts/biz", None).await,
    );
    let patch = |id: &'static str, body: Value, t: Option<&'static str>| async move {
        send(
            admin,
            "PATCH",
            &format!("/admin/accounts/{id}"),
            t,
            &[],
            Some(&body),
        )
        .await
    };
    c.check(
        account,
        "patch",
        200,
        &patch("downgraded", json!({"plan": "free"}), token).await,
    );
    c.check(
        account,
        "patch",
        200,
        &patch("crowded", json!({"plan": "starter"}), token).await,
    );
    c.check(
        account,
        "patch",
        400,
        &patch("biz", json!({"plan": "platinum"}), token).await,
    );
    c.check(
        account,
        "patch",
        400,
        &patch("biz", json!({"currentPeriodEnd": "soon"}), token).await,
    );
    c.check(
        account,
        "patch",
        404,
        &patch("nobody", json!({"payPerUse": true}), token).await,
    );
    c.check(
        account,
        "patch",
        401,
        &patch("biz", json!({"payPerUse": true}), None).await,
    );

    let credits = "/admin/accounts/{id}/credits";
    let grant = |id: &'static str, body: Value, t: Option<&'static str>| async move {
        send(
            admin,
            "POST",
            &format!("/admin/accounts/{id}/credits"),
            t,
            &[],
            Some(&body),
        )
        .await
    };
    c.check(
        credits,
        "post",
        200,
        &grant("biz", json!({"amount": 50, "reason": "openapi"}), token).await,
    );
    c.check(
        credits,
        "post",
        400,
        &grant("biz", json!({"amount": 0}), token).await,
    );
    c.check(
        credits,
        "post",
        400,
        &grant("ppu", json!({"amount": 5}), token).await,
    );
    c.check(
        credits,
        "post",
        404,
        &grant("nobody", json!({"amount": 5}), token).await,
    );
    c.check(
        credits,
        "post",
        401,
        &grant("biz", json!({"amount": 5}), None).await,
    );

    let revoke = "/admin/keys/{keyId}";
    let r = send(
        admin,
        "DELETE",
        &format!("/admin/keys/{spare_key_id}"),
        token,
        &[],
        None,
    )
    .await;
    c.check(revoke, "delete", 200, &r);
    c.check(
        revoke,
        "delete",
        404,
        &send(admin, "DELETE", "/admin/keys/key_nope", token, &[], None).await,
    );
    c.check(
        revoke,
        "delete",
        401,
        &send(admin, "DELETE", "/admin/keys/key_nope", None, &[], None).await,
    );

    c.check(
        "/admin/catalog",
        "get",
        200,
        &get(admin, "/admin/catalog", token).await,
    );
    c.check(
        "/admin/catalog",
        "get",
        401,
        &get(admin, "/admin/catalog", None).await,
    );
    let reload = "/admin/catalog/reload";
    c.check(
        reload,
        "post",
        200,
        &send(admin, "POST", reload, token, &[], None).await,
    );
    c.check(
        reload,
        "post",
        401,
        &send(admin, "POST", reload, None, &[], None).await,
    );
    let models = rules.join("models.toml");
    let good = std::fs::read_to_string(&models).expect("models");
    std::fs::write(&models, "[[model]]\nid = 5\n").expect("break models");
    let r = send(admin, "POST", reload, token, &[], None).await;
    std::fs::write(&models, good).expect("restore models");
    c.check(reload, "post", 400, &r);
    c.check(
        reload,
        "post",
        200,
        &send(admin, "POST", reload, token, &[], None).await,
    );

    // ---- billing endpoints ------------------------------------------------------------------
    for path in [
        "/api/credits/balance",
        "/api/subscription",
        "/api/spending-limit",
    ] {
        c.check(path, "get", 200, &get(proxy, path, Some(&k_biz)).await);
        c.check(path, "get", 401, &get(proxy, path, None).await);
        c.check(
            path,
            "get",
            401,
            &get(proxy, path, Some("at_live_nope")).await,
        );
        c.check(path, "get", 403, &get(proxy, path, Some(&k_down)).await);
        c.check(path, "get", 403, &get(proxy, path, Some(&k_crowded)).await);
    }
    let by_header = http::get(proxy, "/api/subscription", &[("X-API-Key", &k_ppu)]).await;
    c.check("/api/subscription", "get", 200, &by_header);
    let limit = "/api/spending-limit";
    let set = |key: Option<String>, body: Value| async move {
        send(proxy, "POST", limit, key.as_deref(), &[], Some(&body)).await
    };
    c.check(
        limit,
        "post",
        200,
        &set(Some(k_biz.clone()), json!({"limitCents": 2500})).await,
    );
    c.check(
        limit,
        "post",
        400,
        &set(Some(k_biz.clone()), json!({"limitCents": -1})).await,
    );
    c.check(
        limit,
        "post",
        400,
        &set(Some(k_biz.clone()), json!({"limitCents": "5000"})).await,
    );
    c.check(
        limit,
        "post",
        401,
        &set(None, json!({"limitCents": 1})).await,
    );
    c.check(
        limit,
        "post",
        403,
        &set(Some(k_down.clone()), json!({"limitCents": 1})).await,
    );

    // ---- quotes ---------------------------------------------------------------------------------
    let quote = "/api/quote";
    let ask = |key: Option<String>, body: Value| async move {
        send(proxy, "POST", quote, key.as_deref(), &[], Some(&body)).await
    };
    let relight_q =
        |model: &str, n: u64| json!({"path": "/api/v1/images/relight", "model": model, "n": n});
    let r = ask(Some(k_biz.clone()), relight_q("nano-banana-pro", 2)).await;
    c.check(quote, "post", 200, &r);
    assert_eq!(r.json()["credits"], 6, "{}", r.text());
    let r = ask(Some(k_ppu.clone()), relight_q("midjourney-v7", 1)).await;
    c.check(quote, "post", 200, &r);
    assert_eq!(r.json()["usd"], "0.324", "{}", r.text());
    let r = ask(Some(k_broke.clone()), relight_q("nano-banana-pro", 1)).await;
    c.check(quote, "post", 200, &r);
    assert_eq!(r.json()["wouldSucceed"], false, "{}", r.text());
    c.check(
        quote,
        "post",
        400,
        &ask(Some(k_biz.clone()), relight_q("no-such-model", 1)).await,
    );
    c.check(
        quote,
        "post",
        400,
        &ask(Some(k_biz.clone()), json!({"model": "nano-banana-pro"})).await,
    );
    c.check(
        quote,
        "post",
        401,
        &ask(None, relight_q("nano-banana-pro", 1)).await,
    );
    c.check(
        quote,
        "post",
        403,
        &ask(Some(k_down.clone()), relight_q("nano-banana-pro", 1)).await,
    );
    c.check(
        quote,
        "post",
        404,
        &ask(
            Some(k_biz.clone()),
            json!({"path": "/api/v1/images/upscale"}),
        )
        .await,
    );
    let pad = "x".repeat(70 * 1024);
    let mut big = relight_q("nano-banana-pro", 1);
    big["pad"] = json!(pad);
    c.check(quote, "post", 413, &ask(Some(k_biz.clone()), big).await);

    // ---- generation routes --------------------------------------------------------------------
    let images = "/api/v1/images/{operation}";
    let videos = "/api/v1/videos";
    let jobs = "/api/v1/jobs/{id}";
    let relight = "/api/v1/images/relight";
    let image = |key: &str, body: Value| {
        let key = key.to_string();
        async move { send(proxy, "POST", relight, Some(&key), &[], Some(&body)).await }
    };
    let video = |key: &str, body: Value| {
        let key = key.to_string();
        async move { send(proxy, "POST", videos, Some(&key), &[], Some(&body)).await }
    };
    let pro = json!({"model": "nano-banana-pro"});
    let clip = json!({"model": "nano-banana-pro", "duration": 5});

    let r = image(&k_biz, json!({"model": "nano-banana-pro", "n": 2})).await;
    c.check(images, "post", 200, &r);
    assert_eq!(r.header("X-Credits-Charged"), Some("6"), "{:?}", r.headers);
    let r = image(&k_ppu, json!({"model": "midjourney-v7", "n": 1})).await;
    c.check(images, "post", 200, &r);
    assert_eq!(r.header("X-Charge-Usd"), Some("0.324"), "{:?}", r.headers);
    let r = video(&k_biz, clip.clone()).await;
    c.check(videos, "post", 200, &r);
    assert_eq!(r.header("X-Credits-Held"), Some("10"), "{:?}", r.headers);
    let job_path = format!("/api/v1/jobs/{}", r.json()["id"].as_str().expect("job id"));
    let job_path = job_path.as_str();
    let r = poll_recorded(proxy, job_path, &k_biz).await;
    c.check(jobs, "get", 200, &r);
    // Another account's job: 404, never proxied.
    let before = backend.request_count();
    c.check(jobs, "get", 404, &get(proxy, job_path, Some(&k_ppu)).await);
    c.check(
        jobs,
        "get",
        404,
        &get(proxy, "/api/v1/jobs/job_none", Some(&k_biz)).await,
    );
    assert_eq!(backend.request_count(), before);

    // The backend's job callback on the admin listener.
    let report = "/admin/jobs/{id}";
    let r = video(&k_biz, clip.clone()).await;
    let reported = format!("/admin/jobs/{}", r.json()["id"].as_str().expect("job id"));
    let failed = json!({"status": "failed"});
    // Known once its accepting answer was sent (404 until then).
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let r = loop {
        let r = send(admin, "POST", &reported, token, &[], Some(&failed)).await;
        if r.status != 404 || std::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    c.check(report, "post", 200, &r);
    assert_eq!(r.json()["applied"], true);
    let r = send(admin, "POST", &reported, token, &[], Some(&failed)).await;
    c.check(report, "post", 200, &r);
    assert_eq!(r.json()["applied"], false, "a duplicate is a no-op");
    c.check(
        report,
        "post",
        400,
        &send(
            admin,
            "POST",
            &reported,
            token,
            &[],
            Some(&json!({"status": "done"})),
        )
        .await,
    );
    c.check(
        report,
        "post",
        404,
        &send(
            admin,
            "POST",
            "/admin/jobs/job_none",
            token,
            &[],
            Some(&failed),
        )
        .await,
    );
    c.check(
        report,
        "post",
        401,
        &send(admin, "POST", &reported, None, &[], Some(&failed)).await,
    );

    c.check(
        images,
        "post",
        400,
        &image(&k_biz, json!({"model": "nano-banana-pro", "n": 9})).await,
    );
    c.check(
        images,
        "post",
        400,
        &image(&k_biz, json!({"model": "no-such-model"})).await,
    );
    c.check(images, "post", 400, &image(&k_biz, json!({})).await);
    c.check(
        videos,
        "post",
        400,
        &video(&k_biz, json!({"model": "midjourney-v7", "duration": 5})).await,
    );
    c.check(
        videos,
        "post",
        400,
        &video(&k_biz, json!({"model": "nano-banana-pro", "duration": 7})).await,
    );
    c.check(
        jobs,
        "get",
        400,
        &get(proxy, "/api/v1/jobs/a%2Fb", Some(&k_biz)).await,
    );
    c.check(
        jobs,
        "get",
        400,
        &get(proxy, "/api/v1/jobs/..", Some(&k_biz)).await,
    );

    c.check(
        images,
        "post",
        401,
        &send(proxy, "POST", relight, None, &[], Some(&pro)).await,
    );
    c.check(
        videos,
        "post",
        401,
        &send(proxy, "POST", videos, None, &[], Some(&clip)).await,
    );
    c.check(jobs, "get", 401, &get(proxy, job_path, None).await);

    c.check(images, "post", 402, &image(&k_broke, pro.clone()).await);
    c.check(images, "post", 402, &image(&k_lapsed, pro.clone()).await);
    c.check(videos, "post", 402, &video(&k_broke, clip.clone()).await);
    c.check(
        limit,
        "post",
        200,
        &set(Some(k_ppu.clone()), json!({"limitCents": 0})).await,
    );
    let r = image(&k_ppu, json!({"model": "midjourney-v7"})).await;
    c.check(images, "post", 402, &r);
    assert_eq!(r.error_code(), "spending_limit_reached");

    c.check(images, "post", 403, &image(&k_down, pro.clone()).await);
    c.check(videos, "post", 403, &video(&k_crowded, clip.clone()).await);
    c.check(jobs, "get", 403, &get(proxy, job_path, Some(&k_down)).await);

    let r = send(
        proxy,
        "POST",
        "/api/v1/images/upscale",
        Some(&k_biz),
        &[],
        Some(&pro),
    )
    .await;
    c.check(images, "post", 404, &r);

    let pad = "x".repeat(70 * 1024);
    let big = json!({"model": "nano-banana-pro", "duration": 5, "pad": pad});
    c.check(images, "post", 413, &image(&k_biz, big.clone()).await);
    c.check(videos, "post", 413, &video(&k_biz, big).await);

    // Rate limit: the tiny plan allows one request per key and minute. The poll is of the
    // video job the account's second key started.
    let mut tiny_job = String::new();
    for (i, (path, method, body)) in [
        (images, "POST", Some(pro.clone())),
        (videos, "POST", Some(clip.clone())),
        (jobs, "GET", None),
    ]
    .into_iter()
    .enumerate()
    {
        let target = match i {
            0 => relight.to_string(),
            1 => videos.to_string(),
            _ => tiny_job.clone(),
        };
        let first = match i {
            2 => poll_recorded(proxy, &target, &tiny[i]).await,
            _ => send(proxy, method, &target, Some(&tiny[i]), &[], body.as_ref()).await,
        };
        assert!(first.status < 300, "first tiny request: {}", first.text());
        if i == 1 {
            tiny_job = format!("/api/v1/jobs/{}", first.json()["id"].as_str().expect("id"));
        }
        let r = send(proxy, method, &target, Some(&tiny[i]), &[], body.as_ref()).await;
        c.check(path, &method.to_lowercase(), 429, &r);
    }

    // Idempotency: in flight → 409, replay → 200, another request → 422.
    backend.set_behaviour(Behaviour {
        delay: Duration::from_millis(700),
        ..Behaviour::default()
    });
    for (path, target, same, other, idem) in [
        (
            images,
            relight,
            pro.clone(),
            json!({"model": "nano-banana-2"}),
            "idem-image-1",
        ),
        (
            videos,
            videos,
            clip.clone(),
            json!({"model": "nano-banana-pro", "duration": 10}),
            "idem-video-1",
        ),
    ] {
        let headers = [("Idempotency-Key", idem)];
        let key = k_biz.clone();
        let body = same.clone();
        let first = tokio::spawn(async move {
            send(
                proxy,
                "POST",
                target,
                Some(&key),
                &[("Idempotency-Key", idem)],
                Some(&body),
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(250)).await;
        let r = send(proxy, "POST", target, Some(&k_biz), &headers, Some(&same)).await;
        c.check(path, "post", 409, &r);
        c.check(path, "post", 200, &first.await.expect("first request"));
        let r = send(proxy, "POST", target, Some(&k_biz), &headers, Some(&same)).await;
        c.check(path, "post", 200, &r);
        assert_eq!(
            r.header("Idempotent-Replayed"),
            Some("true"),
            "{:?}",
            r.headers
        );
        let r = send(proxy, "POST", target, Some(&k_biz), &headers, Some(&other)).await;
        c.check(path, "post", 422, &r);
        let r = send(
            proxy,
            "POST",
            target,
            Some(&k_biz),
            &[("Idempotency-Key", "")],
            Some(&same),
        )
        .await;
        c.check(path, "post", 400, &r);
    }

    // The backend too slow (read timeout 1.5 s): 504, refunded.
    backend.set_behaviour(Behaviour {
        delay: Duration::from_millis(2500),
        ..Behaviour::default()
    });
    let r = image(&k_biz, pro.clone()).await;
    c.check(images, "post", 504, &r);
    assert_eq!(r.header("X-Credits-Charged"), Some("0"));
    c.check(videos, "post", 504, &video(&k_biz, clip.clone()).await);
    c.check(jobs, "get", 504, &get(proxy, job_path, Some(&k_biz)).await);

    // The backend's own refusal passes through (`default`), refunded.
    backend.set_behaviour(Behaviour {
        status: 418,
        ..Behaviour::default()
    });
    let r = image(&k_biz, pro.clone()).await;
    c.check(images, "post", 418, &r);
    assert_eq!(r.header("X-Credits-Charged"), Some("0"));
    c.check(videos, "post", 418, &video(&k_biz, clip.clone()).await);
    c.check(jobs, "get", 418, &get(proxy, job_path, Some(&k_biz)).await);
    backend.set_behaviour(Behaviour::default());

    // No backend at all: 502, refunded.
    let r = send(gone.proxy, "POST", relight, Some(&k_biz), &[], Some(&pro)).await;
    c.check(images, "post", 502, &r);
    assert_eq!(r.header("X-Credits-Charged"), Some("0"));
    c.check(
        videos,
        "post",
        502,
        &send(gone.proxy, "POST", videos, Some(&k_biz), &[], Some(&clip)).await,
    );
    c.check(
        jobs,
        "get",
        502,
        &get(gone.proxy, job_path, Some(&k_biz)).await,
    );

    // ---- usage history (after the generation probes, so entries of every kind exist) -------
    let usage = "/api/usage";
    let page = get(proxy, "/api/usage?limit=3", Some(&k_biz)).await;
    c.check(usage, "get", 200, &page);
    let next = page.json()["nextCursor"].as_str().map(str::to_string);
    let next = next.expect("k_biz has more than 3 entries");
    c.check(
        usage,
        "get",
        200,
        &get(
            proxy,
            &format!("/api/usage?cursor={next}&limit=1000"),
            Some(&k_biz),
        )
        .await,
    );
    c.check(
        usage,
        "get",
        200,
        &get(
            proxy,
            "/api/usage?from=2026-01-01T00:00:00Z&to=4102444800000",
            Some(&k_ppu),
        )
        .await,
    );
    for bad in [
        "limit=0",
        "limit=1001",
        "from=soon",
        "cursor=zz",
        "to=1&to=2",
        "page=1",
    ] {
        let r = get(proxy, &format!("/api/usage?{bad}"), Some(&k_biz)).await;
        c.check(usage, "get", 400, &r);
    }
    c.check(usage, "get", 401, &get(proxy, usage, None).await);
    c.check(
        usage,
        "get",
        401,
        &get(proxy, usage, Some("at_live_nope")).await,
    );
    c.check(usage, "get", 403, &get(proxy, usage, Some(&k_down)).await);
    c.check(
        usage,
        "get",
        403,
        &get(proxy, usage, Some(&k_crowded)).await,
    );

    // ---- the store frozen: 503 everywhere it is needed ------------------------------------
    // `k_dark` was never used, so no instance has it cached: authentication needs the store.
    redis.pause();
    c.check("/readyz", "get", 503, &get(admin, "/readyz", None).await);
    for path in [
        "/api/credits/balance",
        "/api/subscription",
        "/api/spending-limit",
    ] {
        c.check(path, "get", 503, &get(proxy, path, Some(&k_dark)).await);
    }
    c.check(usage, "get", 503, &get(proxy, usage, Some(&k_dark)).await);
    c.check(
        limit,
        "post",
        503,
        &set(Some(k_dark.clone()), json!({"limitCents": 1})).await,
    );
    c.check(images, "post", 503, &image(&k_dark, pro.clone()).await);
    c.check(
        quote,
        "post",
        503,
        &ask(Some(k_dark.clone()), relight_q("nano-banana-pro", 1)).await,
    );
    c.check(videos, "post", 503, &video(&k_dark, clip.clone()).await);
    c.check(jobs, "get", 503, &get(proxy, job_path, Some(&k_dark)).await);
    c.check(
        report,
        "post",
        503,
        &send(admin, "POST", &reported, token, &[], Some(&failed)).await,
    );
    c.check(
        accounts,
        "post",
        503,
        &create(json!({"id": "later", "plan": "pro"})).await,
    );
    c.check(
        account,
        "get",
        503,
        &get(admin, "/admin/accounts/biz", token).await,
    );
    c.check(
        account,
        "patch",
        503,
        &patch("biz", json!({"payPerUse": true}), token).await,
    );
    c.check(keys, "post", 503, &new_key("biz").await);
    c.check(
        credits,
        "post",
        503,
        &grant("biz", json!({"amount": 5}), token).await,
    );
    c.check(
        revoke,
        "delete",
        503,
        &send(admin, "DELETE", "/admin/keys/key_nope", token, &[], None).await,
    );
    redis.resume();

    let missing: Vec<_> = documented.difference(&c.covered).collect();
    assert!(
        missing.is_empty(),
        "documented answers no probe provoked (add a probe or drop them from the document): {missing:?}"
    );
    drop(gone);
}

#[test]
fn every_schema_in_the_document_is_valid_json_schema() {
    let doc = Document::load();
    let schemas = doc.root["components"]["schemas"]
        .as_object()
        .expect("schemas");
    for (name, schema) in schemas {
        let resolved = doc.resolve(schema);
        if let Err(e) = jsonschema::meta::validate(&resolved) {
            panic!("components.schemas.{name} is not a valid JSON Schema: {e}");
        }
    }
    // Every operation says which listener serves it and how it is authenticated.
    for (path, item) in doc.root["paths"].as_object().expect("paths") {
        assert!(item["servers"].is_array(), "{path} names no server");
        for method in METHODS {
            if item[method].is_object() {
                assert!(
                    item[method]["security"].is_array(),
                    "{method} {path}: no security"
                );
                assert!(item[method]["tags"].is_array(), "{method} {path}: no tags");
            }
        }
    }
}
