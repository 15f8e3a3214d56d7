//! Stripe through the real gateway process (CONTRACT §9): pay-per-use charges reach a local fake
//! Stripe as meter events exactly once — also across a Stripe outage with every gateway
//! restarted — and signed webhooks change accounts once, through `POST /webhooks/stripe`.

#[path = "support/fake_stripe.rs"]
mod fake_stripe;
#[path = "support/stripe_fixtures.rs"]
mod stripe_fixtures;
mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use creditgate::clock::{Clock, SystemClock};
use creditgate::demo_backend::{Behaviour, DemoBackend};
use creditgate::stripe::signature::sign_header;
use fake_stripe::{FakeStripe, Mode};
use serde_json::json;
use support::gateway::{GatewayOptions, GatewayProcess};
use support::http;
use support::RedisServer;

const WEBHOOK_SECRET: &str = "whsec_test_secret";

fn options(redis: &RedisServer, backend: &DemoBackend, stripe: &FakeStripe) -> GatewayOptions {
    let mut o = GatewayOptions::new(&redis.url(), backend.addr);
    o.extra_toml = format!(
        "[stripe]\nenabled = true\napi_base = \"{}\"\nmeter_event_name = \"creditgate_usage\"\n",
        stripe.api_base()
    );
    o.env = vec![
        ("STRIPE_SECRET_KEY".into(), "sk_test_123".into()),
        ("STRIPE_WEBHOOK_SECRET".into(), WEBHOOK_SECRET.into()),
    ];
    o
}

async fn ppu_customer(gw: &GatewayProcess, id: &str) -> String {
    gw.create_account_with(json!({
        "id": id, "plan": "pay_per_use", "payPerUse": true, "stripeCustomerId": format!("cus_{id}")
    }))
    .await;
    gw.create_key(id).await
}

async fn wait_for_accepted(stripe: &FakeStripe, n: usize, within: Duration) {
    let start = Instant::now();
    while stripe.accepted().len() < n {
        assert!(
            start.elapsed() < within,
            "only {} of {n} meter events delivered",
            stripe.accepted().len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pay_per_use_charge_becomes_one_meter_event() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let stripe = FakeStripe::start().await;
    let gw = GatewayProcess::start_with(options(&redis, &backend, &stripe)).await;
    let key = ppu_customer(&gw, "acme").await;
    for _ in 0..3 {
        let r = gw
            .generate(
                &key,
                "/api/v1/images/relight",
                json!({"model": "nano-banana-2", "n": 2}),
            )
            .await;
        assert_eq!(r.header("X-Charge-Usd"), Some("0.144"), "{}", r.text());
    }
    // A failed generation is refunded and never billed.
    backend.set_behaviour(Behaviour {
        status: 500,
        ..Behaviour::default()
    });
    gw.generate(
        &key,
        "/api/v1/images/relight",
        json!({"model": "midjourney-v7"}),
    )
    .await;
    // A partial one is billed net.
    backend.set_behaviour(Behaviour {
        images_generated: Some(1),
        ..Behaviour::default()
    });
    let r = gw
        .generate(
            &key,
            "/api/v1/images/relight",
            json!({"model": "midjourney-v7", "n": 3}),
        )
        .await;
    assert_eq!(r.header("X-Charge-Usd"), Some("0.324"));
    wait_for_accepted(&stripe, 4, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = stripe.accepted();
    assert_eq!(events.len(), 4, "{events:?}");
    let ids: HashSet<&str> = events.iter().map(|e| e.identifier.as_str()).collect();
    assert_eq!(ids.len(), 4, "identifiers must be distinct");
    let charged: HashSet<String> = backend
        .requests()
        .iter()
        .filter_map(|r| r.header("X-Creditgate-Charge-Id").map(str::to_string))
        .collect();
    for e in &events {
        assert!(
            charged.contains(&e.identifier),
            "{} is no charge id",
            e.identifier
        );
        assert_eq!(e.customer, "cus_acme");
        assert_eq!(e.event_name, "creditgate_usage");
        assert!(
            e.value.parse::<u64>().is_ok(),
            "value {} is not an integer",
            e.value
        );
    }
    let mut values: Vec<u64> = events.iter().map(|e| e.value.parse().unwrap()).collect();
    values.sort_unstable();
    assert_eq!(values, vec![144_000, 144_000, 144_000, 324_000]);
    let m = http::get(gw.metrics, "/metrics", &[]).await.text();
    assert!(m.contains("creditgate_stripe_outbox_backlog 0"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stripe_outage_with_every_gateway_restarted_loses_nothing() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let stripe = FakeStripe::start().await;
    stripe.set_mode(Mode::Failing(503));
    let gw = GatewayProcess::start_with(options(&redis, &backend, &stripe)).await;
    let key = ppu_customer(&gw, "acme").await;
    for _ in 0..10 {
        let r = gw
            .generate(
                &key,
                "/api/v1/images/relight",
                json!({"model": "seedream-4.5"}),
            )
            .await;
        assert_eq!(r.status, 200);
    }
    let start = Instant::now();
    while stripe.attempts().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the worker never tried"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stripe.accepted().is_empty());
    drop(gw); // killed, not drained
    let again = GatewayProcess::start_with(options(&redis, &backend, &stripe)).await;
    stripe.set_mode(Mode::Up);
    wait_for_accepted(&stripe, 10, Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = stripe.accepted();
    assert_eq!(events.len(), 10);
    let ids: HashSet<&str> = events.iter().map(|e| e.identifier.as_str()).collect();
    assert_eq!(ids.len(), 10, "an event was delivered twice");
    assert!(events.iter().all(|e| e.value == "61000"));
    drop(again);
}

fn signed(body: &str, at_s: i64) -> String {
    sign_header(WEBHOOK_SECRET, at_s, body.as_bytes()).expect("sign")
}

async fn webhook(gw: &GatewayProcess, body: &str, signature: &str) -> http::Response {
    http::request(
        gw.proxy,
        "POST",
        "/webhooks/stripe",
        &[
            ("Content-Type", "application/json"),
            ("Stripe-Signature", signature),
        ],
        Some(body.as_bytes()),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_webhooks_apply_once_and_bad_ones_are_refused() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let stripe = FakeStripe::start().await;
    let gw = GatewayProcess::start_with(options(&redis, &backend, &stripe)).await;
    gw.create_account_with(json!({"id": "acme", "plan": "pro", "stripeCustomerId": "cus_acme"}))
        .await;
    let key = gw.create_key("acme").await;
    let now_s = SystemClock.now_ms() / 1000;
    for _ in 0..3 {
        gw.generate(
            &key,
            "/api/v1/images/relight",
            json!({"model": "seedream-4.5"}),
        )
        .await;
    }
    assert_eq!(gw.balance(&key).await, 297);

    let invoice = stripe_fixtures::event(
        "evt_invoice_1",
        "invoice.paid",
        now_s,
        stripe_fixtures::paid_invoice(
            "in_1",
            "cus_acme",
            "sub_1",
            Some("subscription_cycle"),
            now_s,
        ),
    )
    .to_string();
    // Bad, stale and missing signatures change nothing.
    let r = webhook(&gw, &invoice, &format!("t={now_s},v1={}", "0".repeat(64))).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = webhook(&gw, &invoice, &signed(&invoice, now_s - 600)).await;
    assert_eq!(r.status, 400);
    let r = http::request(
        gw.proxy,
        "POST",
        "/webhooks/stripe",
        &[],
        Some(invoice.as_bytes()),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(gw.balance(&key).await, 297);

    // invoice.paid resets the period to the allowance, once.
    let r = webhook(&gw, &invoice, &signed(&invoice, now_s)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(gw.balance(&key).await, 300);
    gw.generate(
        &key,
        "/api/v1/images/relight",
        json!({"model": "seedream-4.5"}),
    )
    .await;
    let r = webhook(&gw, &invoice, &signed(&invoice, now_s)).await;
    assert_eq!(r.status, 200);
    assert_eq!(gw.balance(&key).await, 299, "a re-sent event applied twice");

    // A deleted subscription stops credit spending.
    let deleted = stripe_fixtures::event(
        "evt_sub_deleted",
        "customer.subscription.deleted",
        now_s,
        stripe_fixtures::subscription(
            "sub_1",
            "cus_acme",
            "canceled",
            &[("si_1", "price_unmapped")],
            now_s + 86_400,
        ),
    )
    .to_string();
    let r = webhook(&gw, &deleted, &signed(&deleted, now_s)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = gw
        .generate(
            &key,
            "/api/v1/images/relight",
            json!({"model": "seedream-4.5"}),
        )
        .await;
    assert_eq!(r.status, 402, "{}", r.text());
    assert_eq!(r.error_code(), "subscription_inactive");
    let sub = http::get(
        gw.proxy,
        "/api/subscription",
        &[("Authorization", &format!("Bearer {key}"))],
    )
    .await;
    assert_eq!(sub.json()["status"], "canceled");
}

/// `GET /api/subscription`'s status for the key.
async fn status_of(gw: &GatewayProcess, key: &str) -> String {
    let r = http::get(
        gw.proxy,
        "/api/subscription",
        &[("Authorization", &format!("Bearer {key}"))],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["status"].as_str().unwrap_or("<none>").to_string()
}

/// A signed `customer.subscription.updated` from Stripe's fixtures, and its answer.
async fn subscription_updated(
    gw: &GatewayProcess,
    event_id: &str,
    status: &str,
    period_end_s: i64,
) -> http::Response {
    let now_s = SystemClock.now_ms() / 1000;
    let body = stripe_fixtures::event(
        event_id,
        "customer.subscription.updated",
        now_s,
        stripe_fixtures::subscription(
            "sub_1",
            "cus_acme",
            status,
            &[("si_1", "price_unmapped")],
            period_end_s,
        ),
    )
    .to_string();
    webhook(gw, &body, &signed(&body, now_s)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stripe_subscription_status_maps_onto_the_contracts_five() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let stripe = FakeStripe::start().await;
    let gw = GatewayProcess::start_with(options(&redis, &backend, &stripe)).await;
    gw.create_account_with(json!({"id": "acme", "plan": "pro", "stripeCustomerId": "cus_acme"}))
        .await;
    let key = gw.create_key("acme").await;
    let end_s = SystemClock.now_ms() / 1000 + 20 * 86_400;
    // Stripe's 8 (as its schema publishes them) → the contract's 5.
    let table = [
        ("active", "active"),
        ("trialing", "trialing"),
        ("past_due", "past_due"),
        ("canceled", "canceled"),
        ("incomplete", "incomplete"),
        ("incomplete_expired", "canceled"),
        ("unpaid", "past_due"),
        ("paused", "incomplete"),
    ];
    let mut published = stripe_fixtures::subscription_statuses();
    published.sort();
    let mut mapped: Vec<String> = table.iter().map(|(s, _)| s.to_string()).collect();
    mapped.sort();
    assert_eq!(mapped, published);
    for (i, (stripe_status, want)) in table.iter().enumerate() {
        let from = if *want == "active" {
            "trialing"
        } else {
            "active"
        };
        let r = subscription_updated(&gw, &format!("evt_from_{i}"), from, end_s).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let r = subscription_updated(&gw, &format!("evt_status_{i}"), stripe_status, end_s).await;
        assert_eq!(r.status, 200, "{stripe_status}: {}", r.text());
        assert_eq!(r.json()["result"], "applied", "{stripe_status}");
        assert_eq!(status_of(&gw, &key).await, *want, "{stripe_status}");
        // Only the two spending statuses may spend credits.
        let g = gw
            .generate(
                &key,
                "/api/v1/images/relight",
                json!({"model": "seedream-4.5"}),
            )
            .await;
        if matches!(*want, "active" | "trialing") {
            assert_eq!(g.status, 200, "{stripe_status}: {}", g.text());
        } else {
            assert_eq!(g.status, 402, "{stripe_status}: {}", g.text());
            assert_eq!(g.error_code(), "subscription_inactive", "{stripe_status}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_subscription_status_is_refused_and_changes_nothing() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let stripe = FakeStripe::start().await;
    let gw = GatewayProcess::start_with(options(&redis, &backend, &stripe)).await;
    gw.create_account_with(json!({"id": "acme", "plan": "pro", "stripeCustomerId": "cus_acme"}))
        .await;
    let key = gw.create_key("acme").await;
    let before = gw.admin("GET", "/admin/accounts/acme", None).await.json();
    let end_s = SystemClock.now_ms() / 1000 + 20 * 86_400;
    let r = subscription_updated(&gw, "evt_future", "suspended", end_s).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.error_code(), "invalid_request");
    assert_eq!(
        gw.admin("GET", "/admin/accounts/acme", None).await.json(),
        before,
        "nothing changed"
    );
    assert_eq!(status_of(&gw, &key).await, "active");
    // Nothing was claimed either: Stripe's retry of the event, with a known status, applies.
    let r = subscription_updated(&gw, "evt_future", "past_due", end_s).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["result"], "applied");
    assert_eq!(status_of(&gw, &key).await, "past_due");
}
