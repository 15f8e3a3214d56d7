//! Pay-per-use through HTTP (CONTRACT §4): accounts without a plan and plans with overage are
//! charged at the seed's rates in integer micro-dollars, never past the monthly spending limit —
//! on one instance or two — and failures are refunded.

mod support;

use std::time::Duration;

use creditgate::demo_backend::{Behaviour, DemoBackend};
use serde_json::json;
use support::gateway::{race_relights, GatewayProcess};
use support::http;
use support::RedisServer;

async fn ppu_account(gw: &GatewayProcess, id: &str, limit_cents: u64) -> String {
    gw.create_account_with(json!({
        "id": id, "plan": "pay_per_use", "payPerUse": true, "spendingLimitCents": limit_cents
    }))
    .await;
    gw.create_key(id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pay_per_use_is_charged_at_the_seed_rates() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let gw = GatewayProcess::start(&redis.url(), backend.addr).await;
    let key = ppu_account(&gw, "ppu", 5000).await;
    let r = gw
        .generate(
            &key,
            "/api/v1/images/relight",
            json!({"model": "midjourney-v7", "n": 2}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("X-Charge-Usd"), Some("0.648"));
    assert_eq!(r.header("X-Spend-Remaining-Cents"), Some("4935"));
    assert_eq!(r.header("X-Credits-Charged"), None);
    for (model, usd) in [
        ("ideogram-v3-turbo", "0.054"),
        ("seedream-4.5", "0.061"),
        ("nano-banana-2", "0.072"),
        ("gpt-image-2", "0.095"),
        ("flux-2-pro", "0.108"),
        ("nano-banana-pro", "0.121"),
        ("ideogram-v3-quality", "0.162"),
    ] {
        let r = gw
            .generate(
                &key,
                "/api/v1/images/product-enhancement",
                json!({"model": model}),
            )
            .await;
        assert_eq!(r.status, 200, "{model}: {}", r.text());
        assert_eq!(r.header("X-Charge-Usd"), Some(usd), "{model}");
    }
    // 3 × 0.072 = 0.216 exactly.
    let r = gw
        .generate(
            &key,
            "/api/v1/images/relight",
            json!({"model": "z-image-turbo", "n": 3}),
        )
        .await;
    assert_eq!(r.header("X-Charge-Usd"), Some("0.216"));
    // Video has no pay-per-use rate: not available.
    let r = gw
        .generate(
            &key,
            "/api/v1/videos",
            json!({"model": "seedream-4.5", "duration": 5}),
        )
        .await;
    assert_eq!(r.status, 402, "video has no pay-per-use rate");
    assert_eq!(r.error_code(), "insufficient_credits");
    // No credits on a pay-per-use-only account.
    assert_eq!(gw.balance(&key).await, 0);
    let sub = http::get(
        gw.proxy,
        "/api/subscription",
        &[("Authorization", &format!("Bearer {key}"))],
    )
    .await;
    assert_eq!(sub.json()["plan"], "pay_per_use");
    let view = gw.admin("GET", "/admin/accounts/ppu", None).await.json();
    // 0.648 + 0.054 + 0.061 + 0.072 + 0.095 + 0.108 + 0.121 + 0.162 + 0.216
    assert_eq!(view["monthSpendMicroUsd"], 1_537_000, "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_first_then_overage() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let gw = GatewayProcess::start(&redis.url(), backend.addr).await;
    gw.create_account("s", "starter", true).await;
    let key = gw.create_key("s").await;
    // 100 credits: five 20-credit videos (held against their jobs: tests/jobs.rs).
    for _ in 0..5 {
        let r = gw
            .generate(
                &key,
                "/api/v1/videos",
                json!({"model": "nano-banana-2", "duration": 10}),
            )
            .await;
        assert_eq!(r.header("X-Credits-Held"), Some("20"));
    }
    // Out of credits: the image goes to pay-per-use at the model's rate.
    let r = gw
        .generate(
            &key,
            "/api/v1/images/relight",
            json!({"model": "nano-banana-2", "n": 2}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("X-Charge-Usd"), Some("0.144"));
    // A model without credit pricing goes to pay-per-use even with credits left.
    gw.admin(
        "POST",
        "/admin/accounts/s/credits",
        Some(json!({"amount": 50})),
    )
    .await;
    let r = gw
        .generate(
            &key,
            "/api/v1/images/relight",
            json!({"model": "midjourney-v7"}),
        )
        .await;
    assert_eq!(r.header("X-Charge-Usd"), Some("0.324"));
    // Failure refunds the spend.
    backend.set_behaviour(Behaviour {
        status: 502,
        ..Behaviour::default()
    });
    let r = gw
        .generate(
            &key,
            "/api/v1/images/relight",
            json!({"model": "midjourney-v7"}),
        )
        .await;
    assert_eq!(r.status, 502);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let view = gw.admin("GET", "/admin/accounts/s", None).await.json();
    assert_eq!(view["monthSpendMicroUsd"], 144_000 + 324_000, "{view}");
    // A canceled subscription cannot spend credits but keeps pay-per-use.
    backend.set_behaviour(Behaviour::default());
    gw.admin(
        "PATCH",
        "/admin/accounts/s",
        Some(json!({"status": "canceled"})),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = gw
        .generate(
            &key,
            "/api/v1/images/relight",
            json!({"model": "seedream-4.5"}),
        )
        .await;
    assert_eq!(r.header("X-Charge-Usd"), Some("0.061"), "{}", r.text());
    gw.admin(
        "PATCH",
        "/admin/accounts/s",
        Some(json!({"payPerUse": false})),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let r = gw
        .generate(
            &key,
            "/api/v1/images/relight",
            json!({"model": "seedream-4.5"}),
        )
        .await;
    assert_eq!(r.status, 402);
    assert_eq!(r.error_code(), "subscription_inactive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_7_2_cent_requests_under_50_cents_make_exactly_6() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let gw = GatewayProcess::start(&redis.url(), backend.addr).await;
    let second = GatewayProcess::start(&redis.url(), backend.addr).await;
    let key = ppu_account(&gw, "one", 50).await;
    assert_eq!(
        race_relights(&[&gw], &key, "nano-banana-2", 16, "spending_limit_reached").await,
        (6, 10)
    );
    assert_eq!(backend.request_count(), 6);
    let key2 = ppu_account(&gw, "two", 50).await;
    assert_eq!(
        race_relights(
            &[&gw, &second],
            &key2,
            "nano-banana-2",
            16,
            "spending_limit_reached"
        )
        .await,
        (6, 10)
    );
    assert_eq!(backend.request_count(), 12);
    let view = gw.admin("GET", "/admin/accounts/two", None).await.json();
    assert_eq!(view["monthSpendMicroUsd"], 432_000);
    let r = http::get(
        second.proxy,
        "/api/spending-limit",
        &[("Authorization", &format!("Bearer {key2}"))],
    )
    .await;
    assert_eq!(r.json(), json!({"limitCents": 50}));
}

/// A request refused twice — its credits do not cover it, then the spending limit — leaves the
/// month's spend exactly as it was, however often it is refused (each attempt is undone once,
/// under its own reservation id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_by_credits_and_then_the_limit_leaves_the_spend_alone() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let gw = GatewayProcess::start(&redis.url(), backend.addr).await;
    gw.create_account_with(json!({
        "id": "over", "plan": "starter", "payPerUse": true, "spendingLimitCents": 10
    }))
    .await;
    let key = gw.create_key("over").await;
    let pro4 = json!({"model": "nano-banana-pro", "n": 4});
    for _ in 0..8 {
        let r = gw
            .generate(&key, "/api/v1/images/relight", pro4.clone())
            .await;
        assert_eq!(r.header("X-Credits-Charged"), Some("12"), "{}", r.text());
    }
    let spend = || async {
        let r = gw.admin("GET", "/admin/accounts/over", None).await;
        r.json()["monthSpendMicroUsd"].as_u64().expect("spend")
    };
    let turbo = json!({"model": "ideogram-v3-turbo"});
    let r = gw
        .generate(&key, "/api/v1/images/relight", turbo.clone())
        .await;
    assert_eq!(r.header("X-Charge-Usd"), Some("0.054"), "{}", r.text());
    // 4 credits left; nano-banana-pro × 2 is 6 credits or 0.242 over the 0.10 limit.
    for _ in 0..5 {
        let r = gw
            .generate(
                &key,
                "/api/v1/images/relight",
                json!({"model": "nano-banana-pro", "n": 2}),
            )
            .await;
        assert_eq!(r.status, 402, "{}", r.text());
        assert_eq!(r.error_code(), "spending_limit_reached");
        assert_eq!(spend().await, 54_000);
    }
    assert_eq!(gw.balance(&key).await, 4);
    // 0.054 + 0.054 = 0.108 > 0.10: refused too, and the spend still 0.054.
    let r = gw.generate(&key, "/api/v1/images/relight", turbo).await;
    assert_eq!(r.error_code(), "spending_limit_reached");
    assert_eq!(spend().await, 54_000);
}
