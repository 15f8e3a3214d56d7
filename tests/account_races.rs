//! Concurrent writers of one account through the real `creditgate` binary on a real
//! redis-server (issue 11): key creations claim exactly the plan's free slots, admin PATCH,
//! Stripe webhooks and the spending-limit endpoint writing at once lose none of each other's
//! fields, and a subscription event older than the last one applied is ignored and counted.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use creditgate::clock::{Clock, SystemClock};
use creditgate::demo_backend::DemoBackend;
use creditgate::period;
use creditgate::stripe::signature::sign_header;
use serde_json::{json, Value};
use support::gateway::{GatewayOptions, GatewayProcess, ADMIN_TOKEN};
use support::http;
use support::RedisServer;

const WEBHOOK_SECRET: &str = "whsec_races";
const DAY_MS: i64 = 24 * 3600 * 1000;

struct Env {
    _redis: RedisServer,
    _backend: DemoBackend,
    gw: GatewayProcess,
}

async fn env() -> Env {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.expect("backend");
    let mut o = GatewayOptions::new(&redis.url(), backend.addr);
    o.env = vec![("STRIPE_WEBHOOK_SECRET".into(), WEBHOOK_SECRET.into())];
    let gw = GatewayProcess::start_with(o).await;
    Env {
        _redis: redis,
        _backend: backend,
        gw,
    }
}

async fn admin(addr: SocketAddr, method: &str, path: &str, body: Value) -> http::Response {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let text = body.to_string();
    http::request(
        addr,
        method,
        path,
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(text.as_bytes()),
    )
    .await
}

async fn webhook(proxy: SocketAddr, event: &Value) -> http::Response {
    let body = event.to_string();
    let now_s = SystemClock.now_ms() / 1000;
    let signature = sign_header(WEBHOOK_SECRET, now_s, body.as_bytes()).expect("sign");
    http::request(
        proxy,
        "POST",
        "/webhooks/stripe",
        &[
            ("Content-Type", "application/json"),
            ("Stripe-Signature", &signature),
        ],
        Some(body.as_bytes()),
    )
    .await
}

/// A `customer.subscription.updated` that names only a status (no plan item, no period end).
fn status_event(id: &str, customer: &str, status: &str, created_s: i64) -> Value {
    json!({
        "id": id, "object": "event", "type": "customer.subscription.updated",
        "created": created_s,
        "data": {"object": {"id": "sub_race", "object": "subscription", "customer": customer,
                 "status": status, "items": {"object": "list", "data": []}}}
    })
}

async fn account_view(gw: &GatewayProcess, id: &str) -> Value {
    let r = gw
        .admin("GET", &format!("/admin/accounts/{id}"), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_key_creations_on_four_slots_make_exactly_four() {
    let e = env().await;
    e.gw.create_account("slots", "starter", false).await;
    let addr = e.gw.admin;
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            tokio::spawn(async move {
                admin(
                    addr,
                    "POST",
                    "/admin/accounts/slots/keys",
                    json!({"name": format!("k{i}")}),
                )
                .await
            })
        })
        .collect();
    let mut created = Vec::new();
    let mut refused = 0;
    for task in tasks {
        let r = task.await.expect("task");
        match r.status {
            201 => created.push(r.json()),
            409 => {
                assert_eq!(r.error_code(), "key_slot_exceeded");
                refused += 1;
            }
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    assert_eq!(created.len(), 4, "created {created:?}");
    assert_eq!(refused, 16);
    let view = account_view(&e.gw, "slots").await;
    let keys = view["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 4, "{view}");
    assert!(keys.iter().all(|k| k["usable"] == true), "{view}");
    // Every created key works.
    for k in &created {
        let key = k["key"].as_str().expect("key");
        assert_eq!(e.gw.balance(key).await, 100);
    }
    // After a revoke exactly one more fits.
    let revoked = created[0]["id"].as_str().expect("id");
    let r =
        e.gw.admin("DELETE", &format!("/admin/keys/{revoked}"), None)
            .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = admin(addr, "POST", "/admin/accounts/slots/keys", json!({})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = admin(addr, "POST", "/admin/accounts/slots/keys", json!({})).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(
        account_view(&e.gw, "slots").await["keys"]
            .as_array()
            .map(Vec::len),
        Some(4)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_patch_webhook_and_limit_writes_lose_nothing() {
    let e = env().await;
    e.gw.create_account_with(json!({
        "id": "race", "plan": "starter", "stripeCustomerId": "cus_race"
    }))
    .await;
    let key = Arc::new(e.gw.create_key("race").await);
    const ROUNDS: usize = 10;
    let (admin_addr, proxy) = (e.gw.admin, e.gw.proxy);
    let now = SystemClock.now_ms();
    // Five writers at once, each owning one field and writing distinct values in order
    // (10 each, 50 writes): a lost update would leave some field short of its last value.
    let plans = ["pro", "business", "starter"];
    let statuses = ["past_due", "trialing", "active"];
    let anchor = move |i: usize| now + 10 * DAY_MS + (i as i64 + 1) * 60_000;
    let mut writers = Vec::new();
    writers.push(tokio::spawn(async move {
        for i in 0..ROUNDS {
            let body = json!({"plan": plans[i % 3]});
            let r = admin(admin_addr, "PATCH", "/admin/accounts/race", body).await;
            assert_eq!(r.status, 200, "plan: {}", r.text());
        }
    }));
    writers.push(tokio::spawn(async move {
        for i in 0..ROUNDS {
            let end = period::format_timestamp_ms(anchor(i));
            let body = json!({"currentPeriodEnd": end});
            let r = admin(admin_addr, "PATCH", "/admin/accounts/race", body).await;
            assert_eq!(r.status, 200, "period: {}", r.text());
        }
    }));
    writers.push(tokio::spawn(async move {
        for i in 0..ROUNDS {
            let body = json!({"payPerUse": i.is_multiple_of(2)});
            let r = admin(admin_addr, "PATCH", "/admin/accounts/race", body).await;
            assert_eq!(r.status, 200, "payPerUse: {}", r.text());
        }
    }));
    writers.push(tokio::spawn(async move {
        let created = SystemClock.now_ms() / 1000;
        for i in 0..ROUNDS {
            let event = status_event(
                &format!("evt_race_{i}"),
                "cus_race",
                statuses[i % 3],
                created + i as i64,
            );
            let r = webhook(proxy, &event).await;
            assert_eq!(r.status, 200, "webhook: {}", r.text());
            assert_eq!(r.json()["result"], "applied", "{}", r.text());
        }
    }));
    writers.push(tokio::spawn({
        let key = key.clone();
        async move {
            let auth = format!("Bearer {key}");
            for i in 0..ROUNDS {
                let body = json!({"limitCents": 1000 + i});
                let r = http::post_json(
                    proxy,
                    "/api/spending-limit",
                    &[("Authorization", &auth)],
                    &body,
                )
                .await;
                assert_eq!(r.status, 200, "limit: {}", r.text());
            }
        }
    }));
    for w in writers {
        w.await.expect("writer");
    }
    let last = ROUNDS - 1;
    let view = account_view(&e.gw, "race").await;
    assert_eq!(view["plan"], plans[last % 3], "{view}");
    assert_eq!(view["status"], statuses[last % 3], "{view}");
    assert_eq!(view["payPerUse"], last.is_multiple_of(2), "{view}");
    assert_eq!(view["spendingLimitCents"], 1000 + last, "{view}");
    assert_eq!(
        view["currentPeriodEnd"],
        period::format_timestamp_ms(anchor(last)),
        "{view}"
    );
    assert_eq!(view["stripeCustomerId"], "cus_race", "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_subscription_event_is_ignored_and_counted() {
    let e = env().await;
    e.gw.create_account_with(json!({
        "id": "order", "plan": "starter", "stripeCustomerId": "cus_order"
    }))
    .await;
    let now_s = SystemClock.now_ms() / 1000;
    let newer = status_event("evt_newer", "cus_order", "past_due", now_s);
    let r = webhook(e.gw.proxy, &newer).await;
    assert_eq!(r.json()["result"], "applied", "{}", r.text());
    // Sent earlier by Stripe, delivered later: recorded, answered 200, not applied.
    let older = status_event("evt_older", "cus_order", "active", now_s - 60);
    let r = webhook(e.gw.proxy, &older).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["result"], "stale", "{}", r.text());
    assert_eq!(account_view(&e.gw, "order").await["status"], "past_due");
    // Recorded: its re-send is a duplicate, not evaluated again.
    let r = webhook(e.gw.proxy, &older).await;
    assert_eq!(r.json()["result"], "duplicate", "{}", r.text());
    // The same event id twice applies once.
    let r = webhook(e.gw.proxy, &newer).await;
    assert_eq!(r.json()["result"], "duplicate", "{}", r.text());
    // An equal `created` still applies.
    let same = status_event("evt_same_time", "cus_order", "trialing", now_s);
    let r = webhook(e.gw.proxy, &same).await;
    assert_eq!(r.json()["result"], "applied", "{}", r.text());
    assert_eq!(account_view(&e.gw, "order").await["status"], "trialing");
    let metrics = http::get(e.gw.metrics, "/metrics", &[]).await.text();
    let stale = metrics
        .lines()
        .find(|l| {
            l.starts_with("creditgate_stripe_webhook_events_total{")
                && l.contains("result=\"stale\"")
                && l.contains("customer.subscription.updated")
        })
        .unwrap_or_else(|| panic!("no stale counter in\n{metrics}"));
    assert!(stale.ends_with(" 1"), "{stale}");
    assert!(
        e.gw.log().contains("older than the last one applied"),
        "the stale event is logged"
    );
}
