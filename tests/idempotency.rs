//! `Idempotency-Key` through HTTP (CONTRACT §4.7): charged once and replayed, 409 while the
//! first is in flight, 422 for another request under the same key, a failed first attempt
//! retried afresh, keys scoped per account.

mod support;

use std::time::Duration;

use creditgate::demo_backend::{Behaviour, DemoBackend};
use serde_json::json;
use support::gateway::GatewayProcess;
use support::http;
use support::RedisServer;

async fn send(gw: &GatewayProcess, key: &str, idem: &str, model: &str) -> http::Response {
    let auth = format!("Bearer {key}");
    http::post_json(
        gw.proxy,
        "/api/v1/images/relight",
        &[("Authorization", &auth), ("Idempotency-Key", idem)],
        &json!({"model": model, "n": 2}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_is_charged_once_and_replayed() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let gw = GatewayProcess::start(&redis.url(), backend.addr).await;
    gw.create_account("p", "pro", false).await;
    let key = gw.create_key("p").await;

    let first = send(&gw, &key, "order-1", "nano-banana-pro").await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.header("X-Credits-Charged"), Some("6"));
    let again = send(&gw, &key, "order-1", "nano-banana-pro").await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body, first.body, "the first response is replayed");
    assert_eq!(again.header("X-Credits-Charged"), Some("6"));
    assert_eq!(again.header("Idempotent-Replayed"), Some("true"));
    assert_eq!(backend.request_count(), 1);
    assert_eq!(gw.balance(&key).await, 294, "charged once");

    // Another request under the same key.
    let r = send(&gw, &key, "order-1", "seedream-4.5").await;
    assert_eq!(r.status, 422);
    assert_eq!(r.error_code(), "idempotency_mismatch");

    // Keys are per account.
    gw.create_account("q", "pro", false).await;
    let other = gw.create_key("q").await;
    let r = send(&gw, &other, "order-1", "nano-banana-pro").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Idempotent-Replayed"), None);
    assert_eq!(backend.request_count(), 2);

    // A malformed key is refused.
    let r = send(&gw, &key, &"k".repeat(256), "nano-banana-pro").await;
    assert_eq!(r.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_in_flight_is_409_and_a_failed_first_runs_again() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let gw = GatewayProcess::start(&redis.url(), backend.addr).await;
    gw.create_account("p", "pro", false).await;
    let key = gw.create_key("p").await;

    backend.set_behaviour(Behaviour {
        delay: Duration::from_millis(800),
        ..Behaviour::default()
    });
    let (addr, k) = (gw.proxy, key.clone());
    let first = tokio::spawn(async move {
        http::post_json(
            addr,
            "/api/v1/images/relight",
            &[
                ("Authorization", &format!("Bearer {k}")),
                ("Idempotency-Key", "slow"),
            ],
            &json!({"model": "nano-banana-pro", "n": 2}),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = send(&gw, &key, "slow", "nano-banana-pro").await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert_eq!(r.error_code(), "idempotency_in_progress");
    assert_eq!(first.await.unwrap().status, 200);
    assert_eq!(gw.balance(&key).await, 294);

    // A failed first attempt is refunded and the key released: the retry runs and is charged.
    backend.set_behaviour(Behaviour {
        status: 500,
        ..Behaviour::default()
    });
    let r = send(&gw, &key, "flaky", "nano-banana-pro").await;
    assert_eq!(r.status, 500);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(gw.balance(&key).await, 294);
    backend.set_behaviour(Behaviour::default());
    let r = send(&gw, &key, "flaky", "nano-banana-pro").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("Idempotent-Replayed"), None);
    assert_eq!(gw.balance(&key).await, 288);
    assert_eq!(backend.request_count(), 3);
}
