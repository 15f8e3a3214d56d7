//! Operating the gateway (CONTRACT §10): catalog hot reload by admin call, SIGHUP and file
//! change; broken catalogs refused with the old prices still charged; metrics that move with
//! charges and carry no account ids; per-key rate limits; readiness following Redis; SIGTERM
//! under load losing no settlement.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use creditgate::demo_backend::{Behaviour, DemoBackend};
use serde_json::json;
use support::gateway::{shipped_rules, spawn_relights, GatewayOptions, GatewayProcess};
use support::http;
use support::RedisServer;

const RELIGHT_LINE: &str = "[[operation]]\nid = \"relight\"\nname = \"Relight\"\nunit = \"image\"\ncredits = { \"nano-banana-pro\" = 3,";

fn copy_rules(to: &Path) -> PathBuf {
    let dir = to.join("rules");
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(shipped_rules()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

/// Rewrites relight's nano-banana-pro credit cost (writing by rename, as editors do).
fn set_relight_cost(rules: &Path, cost: &str) {
    let path = rules.join("operations.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let start = text.find("id = \"relight\"").expect("relight entry");
    let key = "\"nano-banana-pro\" = ";
    let at = start + text[start..].find(key).unwrap() + key.len();
    let end = at + text[at..].find(',').unwrap();
    let new = format!("{}{}{}", &text[..at], cost, &text[end..]);
    let tmp = rules.join(".operations.toml.swp");
    std::fs::write(&tmp, new).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
}

async fn charge_of(gw: &GatewayProcess, key: &str) -> String {
    let r = gw
        .generate(
            key,
            "/api/v1/images/relight",
            json!({"model": "nano-banana-pro"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.header("X-Credits-Charged").unwrap().to_string()
}

async fn wait_for_charge(gw: &GatewayProcess, key: &str, expected: &str, within: Duration) {
    let start = Instant::now();
    loop {
        if charge_of(gw, key).await == expected {
            return;
        }
        assert!(
            start.elapsed() < within,
            "price {expected} not live after {within:?}\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_changes_apply_by_admin_sighup_and_file_and_bad_ones_are_refused() {
    assert!(RELIGHT_LINE.contains("relight"));
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let rules = copy_rules(tmp.path());
    let mut opts = GatewayOptions::new(&redis.url(), backend.addr);
    opts.rules_dir = Some(rules.clone());
    let gw = GatewayProcess::start_with(opts).await;
    gw.create_account("b", "business", false).await;
    let key = gw.create_key("b").await;
    assert_eq!(charge_of(&gw, &key).await, "3");

    // 1. File change (watch is on by default): live within 2 s.
    set_relight_cost(&rules, "5");
    wait_for_charge(&gw, &key, "5", Duration::from_secs(2)).await;
    let v = gw.admin("GET", "/admin/catalog", None).await.json();
    assert_eq!(v["version"], 2);

    // 2. A broken change is refused whole; the old price keeps being charged.
    set_relight_cost(&rules, "-1");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(charge_of(&gw, &key).await, "5");
    let r = gw.admin("POST", "/admin/catalog/reload", None).await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("operations.toml"), "{}", r.text());
    assert_eq!(charge_of(&gw, &key).await, "5");

    // 3. The admin call.
    set_relight_cost(&rules, "4");
    let r = gw.admin("POST", "/admin/catalog/reload", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(charge_of(&gw, &key).await, "4");

    // 4. SIGHUP on a gateway that does not watch files.
    let tmp2 = tempfile::tempdir().unwrap();
    let rules2 = copy_rules(tmp2.path());
    let unwatched = start_unwatched(&redis, &backend, &rules2).await;
    assert_eq!(charge_of(&unwatched, &key).await, "3");
    set_relight_cost(&rules2, "7");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        charge_of(&unwatched, &key).await,
        "3",
        "watch = false must not reload"
    );
    unwatched.signal("HUP");
    wait_for_charge(&unwatched, &key, "7", Duration::from_secs(2)).await;

    // Reloads are counted.
    let m = http::get(gw.metrics, "/metrics", &[]).await.text();
    assert!(
        m.contains("creditgate_catalog_reloads_total{result=\"error\",trigger=\"admin\"} 1"),
        "{m}"
    );
    assert!(m.contains("creditgate_catalog_version 3"), "{m}");
}

async fn start_unwatched(
    redis: &RedisServer,
    backend: &DemoBackend,
    rules: &Path,
) -> GatewayProcess {
    let mut opts = GatewayOptions::new(&redis.url(), backend.addr);
    opts.rules_dir = Some(rules.to_path_buf());
    opts.watch_rules = false;
    GatewayProcess::start_with(opts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_charges_and_refunds_and_name_no_account() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let gw = GatewayProcess::start(&redis.url(), backend.addr).await;
    gw.create_account("acct-secret-name", "pro", false).await;
    let key = gw.create_key("acct-secret-name").await;
    for _ in 0..2 {
        charge_of(&gw, &key).await;
    }
    backend.set_behaviour(Behaviour {
        status: 500,
        ..Behaviour::default()
    });
    gw.generate(
        &key,
        "/api/v1/images/relight",
        json!({"model": "nano-banana-pro"}),
    )
    .await;
    gw.generate(&key, "/api/v1/images/relight", json!({"model": "unknown"}))
        .await;
    let r = http::get(gw.proxy, "/api/credits/balance", &[]).await;
    assert_eq!(r.status, 401);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = http::get(gw.metrics, "/metrics", &[]).await.text();
    assert!(
        m.contains("creditgate_requests_total{outcome=\"invalid_api_key\",route=\"GET /api/credits/balance\"} 1"),
        "refusals are counted under their route: {m}"
    );
    assert!(
        m.contains("creditgate_credits_charged_total{model=\"nano-banana-pro\",operation=\"relight\",plan=\"pro\"} 6"),
        "{m}"
    );
    assert!(
        m.contains("creditgate_credits_refunded_total{model=\"nano-banana-pro\",operation=\"relight\",plan=\"pro\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("creditgate_rejections_total{reason=\"unknown_model\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("creditgate_store_latency_seconds_bucket{op=\"reserve\",le=\"0.0005\"}"),
        "{m}"
    );
    assert!(m.contains("creditgate_upstream_latency_seconds"), "{m}");
    assert!(
        !m.contains("acct-secret-name"),
        "an account id leaked into metrics"
    );
    assert!(!m.contains(&key[..12]), "a key leaked into metrics");
    // Logs name the account but never the key.
    let log = gw.log();
    assert!(log.contains("acct-secret-name"));
    assert!(!log.contains(&key), "the full key was logged");
    // A kept charge is traced back to what was priced by its charge id, on the request's line.
    let kept = log
        .lines()
        .find(|l| l.contains("charge=3cr"))
        .unwrap_or_else(|| panic!("no request line with the kept charge:\n{log}"));
    assert!(kept.contains("priced=relight nano-banana-pro x1"), "{kept}");
    assert!(kept.contains("charge_id=ch_"), "{kept}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_plan_rate_is_429_with_retry_after() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let rules = copy_rules(tmp.path());
    let plans = std::fs::read_to_string(rules.join("plans.toml")).unwrap();
    let plans = plans.replacen("requests_per_minute = 1200", "requests_per_minute = 3", 1);
    std::fs::write(rules.join("plans.toml"), plans).unwrap();
    let mut opts = GatewayOptions::new(&redis.url(), backend.addr);
    opts.rules_dir = Some(rules);
    let gw = GatewayProcess::start_with(opts).await;
    gw.create_account("p", "pro", false).await;
    let key = gw.create_key("p").await;
    let other = gw.create_key("p").await;
    for _ in 0..3 {
        assert_eq!(charge_of(&gw, &key).await, "3");
    }
    let r = gw
        .generate(
            &key,
            "/api/v1/images/relight",
            json!({"model": "nano-banana-pro"}),
        )
        .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.error_code(), "rate_limited");
    let retry: u64 = r.header("Retry-After").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(backend.request_count(), 3);
    // The limit is per key.
    assert_eq!(charge_of(&gw, &other).await, "3");
    assert_eq!(gw.balance(&other).await, 300 - 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_redis() {
    let mut redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let gw = GatewayProcess::start(&redis.url(), backend.addr).await;
    assert_eq!(gw.admin("GET", "/readyz", None).await.status, 200);
    assert_eq!(http::get(gw.admin, "/healthz", &[]).await.status, 200);
    redis.stop();
    let r = gw.admin("GET", "/readyz", None).await;
    assert_eq!(r.status, 503);
    assert_eq!(http::get(gw.admin, "/healthz", &[]).await.status, 200);
    redis.start_again();
    let deadline = Instant::now() + Duration::from_secs(10);
    while gw.admin("GET", "/readyz", None).await.status != 200 {
        assert!(Instant::now() < deadline, "readyz did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_no_settlement() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let mut gw = GatewayProcess::start(&redis.url(), backend.addr).await;
    gw.create_account("b", "business", false).await;
    let key = gw.create_key("b").await;
    // Every other answer fails, so half the requests must be refunded during shutdown.
    backend.set_behaviour(Behaviour {
        status: 503,
        delay: Duration::from_millis(400),
        ..Behaviour::default()
    });
    let tasks = spawn_relights(&[&gw], &key, "nano-banana-pro", 20);
    tokio::time::sleep(Duration::from_millis(150)).await;
    gw.signal("TERM");
    let mut answered = 0;
    for t in tasks {
        if let Ok(r) = t.await {
            if r.status == 503 {
                answered += 1;
            }
        }
    }
    assert!(
        gw.wait_exit(Duration::from_secs(15)),
        "gateway did not exit"
    );
    assert!(answered > 0, "no in-flight request finished");
    // Every reservation that reached the backend was refunded: the balance is whole again.
    let after = GatewayProcess::start(&redis.url(), backend.addr).await;
    assert_eq!(after.balance(&key).await, 700, "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_store_serves_without_redis() {
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let mut opts = GatewayOptions::new("redis://127.0.0.1:1", backend.addr);
    opts.memory_store = true;
    let gw = GatewayProcess::start_with(opts).await;
    assert!(
        gw.log().contains("memory"),
        "no warning about the memory store"
    );
    assert_eq!(gw.admin("GET", "/readyz", None).await.status, 200);
    gw.create_account("s", "starter", false).await;
    let key = gw.create_key("s").await;
    assert_eq!(charge_of(&gw, &key).await, "3");
    assert_eq!(gw.balance(&key).await, 97);
}
