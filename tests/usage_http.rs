//! `GET /api/usage` and `creditgate usage` on the real binary in front of the demo backend and a
//! real `redis-server`: 1,000 mixed requests (kept, upstream failures refunded, partial
//! `X-Images-Generated` refunds) page back exactly the money moved — charges − refunds − grants
//! == allowance − balance for credits, charges − refunds == the month's spend for pay-per-use —
//! with no entry on two pages; bad parameters are 400 `invalid_request`; the CLI exports a month
//! as CSV and JSON that agree with the API.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use creditgate::clock::Clock;
use creditgate::demo_backend::{Behaviour, DemoBackend};
use serde_json::{json, Value};
use support::gateway::GatewayProcess;
use support::http;
use support::RedisServer;

/// Every entry of the key's account through `GET /api/usage` pages of `limit`, checking that no
/// entry repeats and the order is newest first.
async fn all_entries(gw: &GatewayProcess, key: &str, limit: usize, extra: &str) -> Vec<Value> {
    let auth = format!("Bearer {key}");
    let mut cursor: Option<String> = None;
    let mut all: Vec<Value> = Vec::new();
    let mut seen = HashSet::new();
    loop {
        let mut path = format!("/api/usage?limit={limit}{extra}");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let r = http::get(gw.proxy, &path, &[("Authorization", &auth)]).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let page = r.json();
        let entries = page["entries"].as_array().expect("entries").clone();
        assert!(entries.len() <= limit);
        for e in entries {
            let id = e["id"].as_str().expect("id").to_string();
            assert!(seen.insert(id.clone()), "{id} on two pages");
            if let Some(prev) = all.last() {
                let before = (prev["timeMs"].as_i64(), prev["id"].as_str());
                assert!(before > (e["timeMs"].as_i64(), e["id"].as_str()), "order");
            }
            all.push(e);
        }
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return all,
        }
    }
}

fn amount(e: &Value, field: &str) -> i128 {
    i128::from(e[field].as_u64().unwrap_or(0))
}

/// charges − refunds − grants of `field` (`credits` or `usdMicros`).
fn net_taken(entries: &[Value], field: &str) -> i128 {
    entries
        .iter()
        .map(|e| match e["type"].as_str() {
            Some("charge") => amount(e, field),
            Some("refund") | Some("grant") => -amount(e, field),
            _ => 0,
        })
        .sum()
}

fn count(entries: &[Value], kind: &str) -> usize {
    entries.iter().filter(|e| e["type"] == kind).count()
}

/// One of four upstream behaviours per batch, and what the request asks for.
fn batch_behaviour(batch: usize) -> (Behaviour, u64) {
    match batch % 4 {
        0 => (Behaviour::default(), 2),
        1 => (
            Behaviour {
                status: 500,
                ..Behaviour::default()
            },
            2,
        ),
        2 => (
            Behaviour {
                images_generated: Some(1),
                ..Behaviour::default()
            },
            3,
        ),
        _ => (
            Behaviour {
                status: 503,
                ..Behaviour::default()
            },
            1,
        ),
    }
}

/// Sends 1,000 relights in 50 concurrent batches of 20, round-robin over the account's `keys`
/// (each stays within its plan's rate limit); answers how many refunds to expect.
async fn thousand_mixed(gw: &GatewayProcess, backend: &DemoBackend, keys: &[String]) -> usize {
    let mut refunds = 0;
    for batch in 0..50 {
        let (behaviour, n) = batch_behaviour(batch);
        let refunded = behaviour.status >= 400 || behaviour.images_generated.is_some();
        backend.set_behaviour(behaviour);
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let addr = gw.proxy;
                let auth = format!("Bearer {}", keys[i % keys.len()]);
                tokio::spawn(async move {
                    http::post_json(
                        addr,
                        "/api/v1/images/relight",
                        &[("Authorization", &auth)],
                        &json!({"model": "nano-banana-2", "n": n}),
                    )
                    .await
                })
            })
            .collect();
        for t in tasks {
            let r = t.await.expect("task");
            assert!(
                [200, 500, 503].contains(&r.status),
                "{}: {}",
                r.status,
                r.text()
            );
        }
        if refunded {
            refunds += 20;
        }
    }
    refunds
}

/// Waits until the account's history holds `refunds` refunds (settlement runs after the
/// response is sent).
async fn settled(gw: &GatewayProcess, key: &str, refunds: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let entries = all_entries(gw, key, 1000, "").await;
        if count(&entries, "refund") >= refunds || Instant::now() > deadline {
            return entries;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_mixed_credit_requests_page_back_the_money_moved() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.expect("backend");
    let gw = GatewayProcess::start(&redis.url(), backend.addr).await;
    gw.create_account("hist", "business", false).await;
    let key = gw.create_key("hist").await;
    let grant = gw
        .admin(
            "POST",
            "/admin/accounts/hist/credits",
            Some(json!({"amount": 10_000})),
        )
        .await;
    assert_eq!(grant.status, 200, "{}", grant.text());
    let refunds = thousand_mixed(&gw, &backend, std::slice::from_ref(&key)).await;
    let entries = settled(&gw, &key, refunds).await;
    assert_eq!(count(&entries, "charge"), 1000);
    assert_eq!(count(&entries, "refund"), refunds);
    assert_eq!(count(&entries, "grant"), 1);
    let balance = gw.balance(&key).await;
    assert_eq!(net_taken(&entries, "credits"), 700 - i128::from(balance));
    // Partial generation: 3 asked (6 credits), 1 made: 2 images (4 credits) came back.
    let partial = entries
        .iter()
        .find(|e| e["type"] == "refund" && e["credits"] == 4)
        .expect("a partial refund");
    assert_eq!(
        (partial["quantity"].as_u64(), partial["model"].as_str()),
        (Some(2), Some("nano-banana-2"))
    );
    assert_eq!(partial["operation"], "relight");
    // Small pages say exactly the same.
    let paged = all_entries(&gw, &key, 37, "").await;
    assert_eq!(paged, entries);
    // The CLI's export of this month holds the same entries, oldest first.
    let now = creditgate::period::format_timestamp_ms(creditgate::clock::SystemClock.now_ms());
    let month = &now[..7];
    let csv = cli_usage(&gw, "hist", month, "csv");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], creditgate::usage_export::CSV_HEADER);
    assert_eq!(lines.len(), entries.len() + 1);
    let csv_ids: Vec<&str> = lines[1..]
        .iter()
        .map(|l| l.split(',').next().unwrap_or_default())
        .collect();
    let api_ids: Vec<&str> = entries
        .iter()
        .rev()
        .map(|e| e["id"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(csv_ids, api_ids);
    let csv_credits: i128 = lines[1..]
        .iter()
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            let credits: i128 = cells[7].parse().unwrap_or(0);
            match cells[1] {
                "charge" => credits,
                "refund" | "grant" => -credits,
                _ => 0,
            }
        })
        .sum();
    assert_eq!(csv_credits, 700 - i128::from(balance));
    let doc: Value = serde_json::from_str(&cli_usage(&gw, "hist", month, "json")).expect("json");
    assert_eq!(doc["account"], "hist");
    let mut json_entries = doc["entries"].as_array().expect("entries").clone();
    json_entries.reverse();
    assert_eq!(json_entries, entries);
    // Another month is empty; a bad month is refused.
    assert_eq!(cli_usage(&gw, "hist", "2001-01", "csv").lines().count(), 1);
    let out = cli(&gw, &["--account", "hist", "--month", "2026-13"]);
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pay_per_use_history_sums_to_the_month_spend() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.expect("backend");
    let gw = GatewayProcess::start(&redis.url(), backend.addr).await;
    gw.create_account_with(json!({
        "id": "ppu-hist", "plan": "pay_per_use", "payPerUse": true, "spendingLimitCents": 1_000_000
    }))
    .await;
    let mut keys = Vec::new();
    for _ in 0..4 {
        keys.push(gw.create_key("ppu-hist").await);
    }
    let key = keys[0].clone();
    let refunds = thousand_mixed(&gw, &backend, &keys).await;
    let entries = settled(&gw, &key, refunds).await;
    assert_eq!(count(&entries, "charge"), 1000);
    assert_eq!(count(&entries, "refund"), refunds);
    let view = gw
        .admin("GET", "/admin/accounts/ppu-hist", None)
        .await
        .json();
    let spent = i128::from(view["monthSpendMicroUsd"].as_u64().expect("spend"));
    assert!(spent > 0);
    assert_eq!(net_taken(&entries, "usdMicros"), spent);
    let charge = entries
        .iter()
        .find(|e| e["type"] == "charge")
        .expect("charge");
    assert_eq!(charge["usd"], "0.144", "{charge}");
    assert_eq!(charge["credits"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_parameters_are_checked_and_accounts_kept_apart() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.expect("backend");
    let gw = GatewayProcess::start(&redis.url(), backend.addr).await;
    gw.create_account("mine", "pro", false).await;
    gw.create_account("theirs", "pro", false).await;
    let mine = gw.create_key("mine").await;
    let theirs = gw.create_key("theirs").await;
    for _ in 0..3 {
        let r = gw
            .generate(
                &mine,
                "/api/v1/images/relight",
                json!({"model": "nano-banana-2"}),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    let auth = format!("Bearer {mine}");
    for bad in [
        "limit=0",
        "limit=1001",
        "limit=ten",
        "from=yesterday",
        "cursor=nope",
        "limit=1&limit=2",
        "colour=blue",
        "from=2026-12-01T00:00:00Z&to=2026-11-01T00:00:00Z",
    ] {
        let r = http::get(
            gw.proxy,
            &format!("/api/usage?{bad}"),
            &[("Authorization", &auth)],
        )
        .await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
        assert_eq!(r.error_code(), "invalid_request", "{bad}");
    }
    let r = http::get(gw.proxy, "/api/usage", &[]).await;
    assert_eq!(r.status, 401);
    let r = http::request(
        gw.proxy,
        "POST",
        "/api/usage",
        &[("Authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(all_entries(&gw, &mine, 2, "").await.len(), 3);
    assert!(all_entries(&gw, &theirs, 2, "").await.is_empty());
    // A window in RFC 3339 and in milliseconds.
    assert!(all_entries(&gw, &mine, 10, "&to=2001-01-01T00:00:00Z")
        .await
        .is_empty());
    assert_eq!(
        all_entries(&gw, &mine, 10, "&from=978307200000")
            .await
            .len(),
        3
    );
    assert_eq!(backend.request_count(), 3, "the usage API is never proxied");
}

fn cli(gw: &GatewayProcess, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_creditgate"))
        .arg("usage")
        .arg("--config")
        .arg(&gw.config_path)
        .args(args)
        .output()
        .expect("run creditgate usage")
}

fn cli_usage(gw: &GatewayProcess, account: &str, month: &str, format: &str) -> String {
    let out = cli(
        gw,
        &["--account", account, "--month", month, "--format", format],
    );
    assert!(
        out.status.success(),
        "creditgate usage: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}
