//! The gateway through HTTP only: a real redis-server, the recording demo backend as upstream,
//! and the real `creditgate` binary in between (CONTRACT §3–§8).

mod support;

use std::time::{Duration, Instant};

use creditgate::demo_backend::{Behaviour, DemoBackend};
use serde_json::json;
use support::gateway::{race_relights, GatewayProcess};
use support::http;
use support::RedisServer;

struct Env {
    redis: RedisServer,
    backend: DemoBackend,
    gw: GatewayProcess,
}

async fn env() -> Env {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.expect("backend");
    let gw = GatewayProcess::start(&redis.url(), backend.addr).await;
    Env { redis, backend, gw }
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

const IMAGE_OPS: [&str; 3] = ["product-enhancement", "fashion-editorial", "relight"];
const CREDIT_MODELS: [(&str, u64); 4] = [
    ("nano-banana-pro", 3),
    ("nano-banana-2", 2),
    ("seedream-4.5", 1),
    ("seedream-5-lite", 2),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cell_of_the_credit_table_is_charged_as_listed() {
    let e = env().await;
    e.gw.create_account("biz", "business", false).await;
    let key = e.gw.create_key("biz").await;
    let mut expected_balance = 700u64;
    assert_eq!(e.gw.balance(&key).await, expected_balance);
    for op in IMAGE_OPS {
        for (model, cost) in CREDIT_MODELS {
            let r =
                e.gw.generate(
                    &key,
                    &format!("/api/v1/images/{op}"),
                    json!({"model": model}),
                )
                .await;
            assert_eq!(r.status, 200, "{op} on {model}: {}", r.text());
            expected_balance -= cost;
            assert_eq!(
                r.header("X-Credits-Charged"),
                Some(cost.to_string().as_str()),
                "{op} {model}"
            );
            assert_eq!(
                r.header("X-Credits-Remaining"),
                Some(expected_balance.to_string().as_str())
            );
            assert!(r.header("X-Request-Id").is_some());
            assert_eq!(e.gw.balance(&key).await, expected_balance);
        }
    }
    for (duration, cost) in [(5u64, 10u64), (10, 20)] {
        for (model, _) in CREDIT_MODELS {
            let r =
                e.gw.generate(
                    &key,
                    "/api/v1/videos",
                    json!({"model": model, "duration": duration}),
                )
                .await;
            assert_eq!(r.status, 200, "video {duration}s on {model}: {}", r.text());
            expected_balance -= cost;
            // A video is a job (`settle = "job"`): held until its final state (tests/jobs.rs).
            assert_eq!(r.header("X-Credits-Held"), Some(cost.to_string().as_str()));
            assert_eq!(e.gw.balance(&key).await, expected_balance);
        }
    }
    // n images cost n times the cell.
    let r =
        e.gw.generate(
            &key,
            "/api/v1/images/relight",
            json!({"model": "nano-banana-pro", "n": 4}),
        )
        .await;
    assert_eq!(r.header("X-Credits-Charged"), Some("12"));
    expected_balance -= 12;
    assert_eq!(e.gw.balance(&key).await, expected_balance);
    // The backend saw exactly what was priced.
    let last = e.backend.requests().pop().expect("a request");
    assert_eq!(last.target, "/api/v1/images/relight");
    assert_eq!(last.header("X-Creditgate-Model"), Some("nano-banana-pro"));
    assert_eq!(last.header("X-Creditgate-Quantity"), Some("4"));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&last.body).unwrap(),
        json!({"model": "nano-banana-pro", "n": 4}),
        "the JSON body is forwarded unchanged"
    );
    drop(e.redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_credits_is_402_and_never_proxied() {
    let e = env().await;
    e.gw.create_account("s", "starter", false).await;
    let key = e.gw.create_key("s").await;
    // 100 credits: five 20-credit videos use them up.
    for _ in 0..5 {
        let r =
            e.gw.generate(
                &key,
                "/api/v1/videos",
                json!({"model": "seedream-4.5", "duration": 10}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let before = e.backend.request_count();
    let r =
        e.gw.generate(
            &key,
            "/api/v1/images/relight",
            json!({"model": "seedream-4.5"}),
        )
        .await;
    assert_eq!(r.status, 402);
    assert_eq!(r.error_code(), "insufficient_credits");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("pay-per-use"));
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    assert_eq!(
        e.backend.request_count(),
        before,
        "a refused request reached the backend"
    );
    assert_eq!(e.gw.balance(&key).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_upstream_answers_are_refunded() {
    let e = env().await;
    e.gw.create_account("p", "pro", false).await;
    let key = e.gw.create_key("p").await;
    for status in [400u16, 404, 429, 500, 503] {
        e.backend.set_behaviour(Behaviour {
            status,
            ..Behaviour::default()
        });
        let r =
            e.gw.generate(
                &key,
                "/api/v1/images/relight",
                json!({"model": "nano-banana-pro", "n": 2}),
            )
            .await;
        assert_eq!(r.status, status);
        assert_eq!(r.header("X-Credits-Charged"), Some("0"), "status {status}");
        assert_eq!(r.header("X-Credits-Remaining"), Some("300"));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(e.gw.balance(&key).await, 300, "refund after {status}");
    }
    // Partial generation: 4 asked, 1 made → 3 refunded.
    e.backend.set_behaviour(Behaviour {
        status: 200,
        images_generated: Some(1),
        ..Behaviour::default()
    });
    let r =
        e.gw.generate(
            &key,
            "/api/v1/images/relight",
            json!({"model": "nano-banana-pro", "n": 4}),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("X-Credits-Charged"), Some("3"));
    assert_eq!(r.header("X-Credits-Remaining"), Some("297"));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(e.gw.balance(&key).await, 297);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_failure_and_timeout_are_refunded() {
    let redis = RedisServer::start();
    // Nothing listens on this port.
    let dead: std::net::SocketAddr = format!("127.0.0.1:{}", support::gateway::free_port())
        .parse()
        .unwrap();
    let gw = GatewayProcess::start(&redis.url(), dead).await;
    gw.create_account("p", "pro", false).await;
    let key = gw.create_key("p").await;
    let r = gw
        .generate(
            &key,
            "/api/v1/images/relight",
            json!({"model": "nano-banana-pro"}),
        )
        .await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.error_code(), "upstream_failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(gw.balance(&key).await, 300);

    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    backend.set_behaviour(Behaviour {
        delay: Duration::from_secs(3),
        ..Behaviour::default()
    });
    let mut opts = support::gateway::GatewayOptions::new(&redis.url(), backend.addr);
    opts.read_timeout_ms = 300;
    let slow = GatewayProcess::start_with(opts).await;
    let r = slow
        .generate(
            &key,
            "/api/v1/images/relight",
            json!({"model": "nano-banana-pro"}),
        )
        .await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.error_code(), "upstream_timeout");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(slow.balance(&key).await, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_concurrent_requests_on_100_credits_make_exactly_33() {
    let e = env().await;
    e.gw.create_account("s", "starter", false).await;
    let key = e.gw.create_key("s").await;
    let (ok, refused) = race_relights(
        &[&e.gw],
        &key,
        "nano-banana-pro",
        60,
        "insufficient_credits",
    )
    .await;
    assert_eq!((ok, refused), (33, 27));
    assert_eq!(e.gw.balance(&key).await, 1);
    assert_eq!(e.backend.request_count(), 33);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_sharing_redis_never_overspend() {
    let e = env().await;
    let second = GatewayProcess::start(&e.redis.url(), e.backend.addr).await;
    e.gw.create_account("s", "starter", false).await;
    let key = e.gw.create_key("s").await;
    let (ok, refused) = race_relights(
        &[&e.gw, &second],
        &key,
        "nano-banana-pro",
        60,
        "insufficient_credits",
    )
    .await;
    assert_eq!((ok, refused), (33, 27));
    assert_eq!(second.balance(&key).await, 1);
    assert_eq!(e.backend.request_count(), 33);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_slots_follow_the_plan() {
    let e = env().await;
    e.gw.create_account("s", "starter", false).await;
    let mut keys = Vec::new();
    for _ in 0..4 {
        keys.push(e.gw.create_key("s").await);
    }
    let r =
        e.gw.admin("POST", "/admin/accounts/s/keys", Some(json!({})))
            .await;
    assert_eq!(r.status, 409);
    assert_eq!(r.error_code(), "key_slot_exceeded");

    // Upgrade to pro: 10 slots; make 6 more, then downgrade back to starter.
    let r =
        e.gw.admin("PATCH", "/admin/accounts/s", Some(json!({"plan": "pro"})))
            .await;
    assert_eq!(r.status, 200, "{}", r.text());
    for _ in 0..6 {
        keys.push(e.gw.create_key("s").await);
    }
    let r =
        e.gw.admin(
            "PATCH",
            "/admin/accounts/s",
            Some(json!({"plan": "starter"})),
        )
        .await;
    assert_eq!(r.status, 200);
    tokio::time::sleep(Duration::from_millis(600)).await;
    for (i, key) in keys.iter().enumerate() {
        let r = http::get(
            e.gw.proxy,
            "/api/credits/balance",
            &[("Authorization", &bearer(key))],
        )
        .await;
        if i < 4 {
            assert_eq!(r.status, 200, "key {i}");
        } else {
            assert_eq!(r.status, 403, "key {i}");
            assert_eq!(r.error_code(), "key_slot_exceeded");
        }
    }
    // Revoking one of the first four frees a slot for the fifth.
    let view = e.gw.admin("GET", "/admin/accounts/s", None).await.json();
    let first_id = view["keys"][0]["id"].as_str().unwrap().to_string();
    let r =
        e.gw.admin("DELETE", &format!("/admin/keys/{first_id}"), None)
            .await;
    assert_eq!(r.status, 200);
    let r = http::get(
        e.gw.proxy,
        "/api/credits/balance",
        &[("Authorization", &bearer(&keys[4]))],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());

    // Free plan: no API access.
    let r =
        e.gw.admin("PATCH", "/admin/accounts/s", Some(json!({"plan": "free"})))
            .await;
    assert_eq!(r.status, 200);
    let r = http::get(
        e.gw.proxy,
        "/api/credits/balance",
        &[("Authorization", &bearer(&keys[1]))],
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.error_code(), "plan_has_no_api_access");
    e.gw.create_account("f", "free", false).await;
    let r =
        e.gw.admin("POST", "/admin/accounts/f/keys", Some(json!({})))
            .await;
    assert_eq!(r.status, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_bites_on_every_instance_within_a_second() {
    let e = env().await;
    let second = GatewayProcess::start(&e.redis.url(), e.backend.addr).await;
    e.gw.create_account("p", "pro", false).await;
    let key = e.gw.create_key("p").await;
    // Warm the second instance's cache.
    assert_eq!(second.balance(&key).await, 300);
    let view = e.gw.admin("GET", "/admin/accounts/p", None).await.json();
    let id = view["keys"][0]["id"].as_str().unwrap().to_string();
    let r =
        e.gw.admin("DELETE", &format!("/admin/keys/{id}"), None)
            .await;
    assert_eq!(r.status, 200);
    let revoked_at = Instant::now();
    loop {
        let r = http::get(
            second.proxy,
            "/api/credits/balance",
            &[("Authorization", &bearer(&key))],
        )
        .await;
        if r.status == 401 {
            assert_eq!(r.error_code(), "invalid_api_key");
            break;
        }
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "still accepted after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = http::get(
        e.gw.proxy,
        "/api/credits/balance",
        &[("Authorization", &bearer(&key))],
    )
    .await;
    assert_eq!(r.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_credential_is_401() {
    let e = env().await;
    e.gw.create_account("p", "pro", false).await;
    let key = e.gw.create_key("p").await;
    let unknown = format!("at_live_{}", "A".repeat(40));
    let cases: Vec<Vec<(&str, String)>> = vec![
        vec![],
        vec![("Authorization", "Bearer".to_string())],
        vec![("Authorization", "Bearer not-a-key".to_string())],
        vec![("Authorization", format!("Basic {key}"))],
        vec![("Authorization", format!("Bearer {unknown}"))],
        vec![("X-API-Key", unknown.clone())],
        vec![("Authorization", format!("Bearer {}", &key[..key.len() - 1]))],
        vec![
            ("Authorization", format!("Bearer {key}")),
            ("X-API-Key", unknown.clone()),
        ],
    ];
    for headers in cases {
        let h: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let r = http::get(e.gw.proxy, "/api/credits/balance", &h).await;
        assert_eq!(r.status, 401, "{headers:?}");
        assert_eq!(r.error_code(), "invalid_api_key");
        let mut h2 = h.clone();
        h2.push(("Content-Type", "application/json"));
        let r = http::request(
            e.gw.proxy,
            "POST",
            "/api/v1/images/relight",
            &h2,
            Some(br#"{"model":"nano-banana-pro"}"#),
        )
        .await;
        assert_eq!(r.status, 401, "{headers:?}");
    }
    assert_eq!(e.backend.request_count(), 0);
    // X-API-Key works as well as Bearer.
    let r = http::get(e.gw.proxy, "/api/credits/balance", &[("X-API-Key", &key)]).await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_variants_are_refused_or_billed_like_the_canonical_path() {
    let e = env().await;
    e.gw.create_account("p", "pro", false).await;
    let key = e.gw.create_key("p").await;
    let auth = bearer(&key);
    let body = br#"{"model":"nano-banana-pro"}"#;
    let refused = [
        "//api/v1/images/relight",
        "/api//v1/images/relight",
        "/api/v1/images%2Frelight",
        "/api/v1/images%2frelight",
        "/api/v1/images/%2e%2e/images/relight",
        "/api/v1/images/../images/relight",
        "/api/v1/./images/relight",
        "/api/v1/images/relight%00",
        "/api/v1/images/relight;x=1",
        "/API/v1/images/relight",
        "/api/v1/images/RELIGHT",
        "/api/v1/images/relight/",
        "/api/v1/images/relight%5C",
        "/api/v1/images/unknown-op",
        "/api/v2/images/relight",
        "/internal/admin",
    ];
    for target in refused {
        let r = http::request(
            e.gw.proxy,
            "POST",
            target,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            Some(body),
        )
        .await;
        assert!(
            r.status == 400 || r.status == 404,
            "{target}: {} {}",
            r.status,
            r.text()
        );
        assert_eq!(e.backend.request_count(), 0, "{target} reached the backend");
    }
    // A raw NUL byte in the request line.
    let mut raw =
        b"POST /api/v1/images/relight\0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".to_vec();
    raw.extend_from_slice(format!("Authorization: {auth}\r\nContent-Length: 0\r\n\r\n").as_bytes());
    let r = http::raw(e.gw.proxy, &raw).await;
    assert!(r.status >= 400, "NUL: {}", r.status);
    assert_eq!(e.backend.request_count(), 0);
    assert_eq!(e.gw.balance(&key).await, 300);

    // Encoded unreserved characters decode to the canonical path and are billed like it.
    let r = http::request(
        e.gw.proxy,
        "POST",
        "/api/v1/images/rel%69ght?model=nano-banana-pro",
        &[("Authorization", &auth)],
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("X-Credits-Charged"), Some("3"));
    let seen = e.backend.requests().pop().unwrap();
    assert_eq!(seen.target, "/api/v1/images/relight?model=nano-banana-pro");
    assert_eq!(e.gw.balance(&key).await, 297);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_gateway_headers_never_reach_the_backend() {
    let e = env().await;
    e.gw.create_account("p", "pro", false).await;
    let key = e.gw.create_key("p").await;
    let auth = bearer(&key);
    let r = http::request(
        e.gw.proxy,
        "POST",
        "/api/v1/images/relight",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
            ("X-Account-Id", "someone-else"),
            ("X-Plan", "business"),
            ("X-Billing-Paid", "yes"),
            ("X-Creditgate-Model", "seedream-4.5"),
            ("X-Creditgate-Quantity", "1"),
            ("X-Request-Id", "spoofed"),
            ("X-Model", "nano-banana-pro"),
        ],
        Some(br#"{"model":"nano-banana-pro","n":2}"#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = e.backend.requests().pop().unwrap();
    assert_eq!(seen.header("X-Account-Id"), Some("p"));
    assert_eq!(seen.header("X-Plan"), Some("pro"));
    assert_eq!(seen.header("X-Billing-Paid"), None);
    assert_eq!(seen.header("X-Creditgate-Model"), Some("nano-banana-pro"));
    assert_eq!(seen.header("X-Creditgate-Quantity"), Some("2"));
    assert_ne!(seen.header("X-Request-Id"), Some("spoofed"));
    assert_eq!(seen.header("X-Request-Id"), r.header("X-Request-Id"));
    assert_eq!(seen.header("Authorization"), None);
    assert!(
        seen.headers.iter().all(|(_, v)| !v.contains(&key)),
        "the key was forwarded"
    );

    // A model in the header that disagrees with the body is refused, not guessed.
    let r = http::request(
        e.gw.proxy,
        "POST",
        "/api/v1/images/relight",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
            ("X-Model", "seedream-4.5"),
        ],
        Some(br#"{"model":"nano-banana-pro"}"#),
    )
    .await;
    assert_eq!(r.status, 400);
    // Repeated pricing headers and duplicate JSON keys are refused too.
    let r = http::request(
        e.gw.proxy,
        "POST",
        "/api/v1/images/relight",
        &[
            ("Authorization", &auth),
            ("X-Model", "seedream-4.5"),
            ("X-Model", "nano-banana-pro"),
        ],
        None,
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    let r = http::request(
        e.gw.proxy,
        "POST",
        "/api/v1/images/relight",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(br#"{"model":"seedream-4.5","model":"nano-banana-pro"}"#),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(e.backend.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_generation_requests_are_400_and_free() {
    let e = env().await;
    e.gw.create_account("p", "pro", false).await;
    let key = e.gw.create_key("p").await;
    let cases = [
        (json!({"model": "no-such-model"}), "unknown_model"),
        (json!({}), "invalid_request"),
        (
            json!({"model": "nano-banana-pro", "n": 0}),
            "invalid_request",
        ),
        (
            json!({"model": "nano-banana-pro", "n": 5}),
            "invalid_request",
        ),
        (
            json!({"model": "nano-banana-pro", "n": 1.5}),
            "invalid_request",
        ),
        (
            json!({"model": "nano-banana-pro", "n": "2"}),
            "invalid_request",
        ),
    ];
    for (body, code) in cases {
        let r =
            e.gw.generate(&key, "/api/v1/images/relight", body.clone())
                .await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(r.error_code(), code, "{body}");
    }
    let r =
        e.gw.generate(
            &key,
            "/api/v1/videos",
            json!({"model": "seedream-4.5", "duration": 7}),
        )
        .await;
    assert_eq!(r.status, 400);
    let r =
        e.gw.generate(
            &key,
            "/api/v1/videos",
            json!({"model": "midjourney-v7", "duration": 5}),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.error_code(), "operation_not_available");
    // A model sold only pay-per-use, on an account without it: 402, not 400.
    let r =
        e.gw.generate(
            &key,
            "/api/v1/images/relight",
            json!({"model": "midjourney-v7"}),
        )
        .await;
    assert_eq!(r.status, 402, "{}", r.text());
    assert_eq!(r.error_code(), "insufficient_credits");
    // Invalid JSON and an oversized JSON body.
    let auth = bearer(&key);
    let r = http::request(
        e.gw.proxy,
        "POST",
        "/api/v1/images/relight",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(b"{not json"),
    )
    .await;
    assert_eq!(r.status, 400);
    let big = format!(
        r#"{{"model":"nano-banana-pro","pad":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    let r = http::request(
        e.gw.proxy,
        "POST",
        "/api/v1/images/relight",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        Some(big.as_bytes()),
    )
    .await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.error_code(), "payload_too_large");
    assert_eq!(e.backend.request_count(), 0);
    assert_eq!(e.gw.balance(&key).await, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_endpoints_have_the_seed_shapes() {
    let e = env().await;
    e.gw.create_account_with(json!({
        "id": "p", "plan": "pro", "payPerUse": false,
        "currentPeriodEnd": "2099-05-01T00:00:00Z"
    }))
    .await;
    let key = e.gw.create_key("p").await;
    let auth = bearer(&key);
    let h = [("Authorization", auth.as_str())];

    let r = http::get(e.gw.proxy, "/api/credits/balance", &h).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"balance": 300}));
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    assert_eq!(r.header("Cache-Control"), Some("no-store"));
    assert!(r.header("X-Request-Id").is_some());
    let r = http::get(e.gw.proxy, "/api/subscription", &h).await;
    assert_eq!(r.status, 200);
    let sub = r.json();
    assert_eq!(sub["plan"], "pro");
    assert_eq!(sub["status"], "active");
    assert_eq!(sub["creditsRemaining"], 300);
    let end = sub["currentPeriodEnd"].as_str().unwrap();
    assert!(end.ends_with("-01T00:00:00.000Z"), "{end}");
    assert_eq!(sub.as_object().unwrap().len(), 4);

    let r = http::get(e.gw.proxy, "/api/spending-limit", &h).await;
    assert_eq!(r.json(), json!({"limitCents": 5000}));
    let r = http::post_json(
        e.gw.proxy,
        "/api/spending-limit",
        &h,
        &json!({"limitCents": 1234}),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"limitCents": 1234, "updated": true}));
    assert_eq!(r.header("Content-Type"), Some("application/json"));

    let bad: Vec<Vec<u8>> = vec![
        br#"{}"#.to_vec(),
        br#"{"limitCents":"5000"}"#.to_vec(),
        br#"{"limitCents":50.5}"#.to_vec(),
        br#"{"limitCents":-1}"#.to_vec(),
        br#"{"limitCents":100000001}"#.to_vec(),
        br#"{"limitCents":null}"#.to_vec(),
        b"not json".to_vec(),
        b"".to_vec(),
        format!(r#"{{"limitCents":5,"pad":"{}"}}"#, "x".repeat(5000)).into_bytes(),
    ];
    for body in bad {
        let r = http::request(
            e.gw.proxy,
            "POST",
            "/api/spending-limit",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            Some(&body),
        )
        .await;
        assert_eq!(
            r.status,
            400,
            "{}",
            String::from_utf8_lossy(&body[..body.len().min(60)])
        );
        assert_eq!(r.error_code(), "invalid_request");
    }
    let r = http::get(e.gw.proxy, "/api/spending-limit", &h).await;
    assert_eq!(
        r.json(),
        json!({"limitCents": 1234}),
        "a bad input changed the limit"
    );
    assert_eq!(e.backend.request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_closed_and_recovers() {
    let mut e = env().await;
    e.gw.create_account("p", "pro", false).await;
    let key = e.gw.create_key("p").await;
    assert_eq!(e.gw.balance(&key).await, 300);
    e.redis.stop();
    tokio::time::sleep(Duration::from_millis(700)).await; // past the key cache TTL
    for _ in 0..5 {
        let started = Instant::now();
        let r =
            e.gw.generate(
                &key,
                "/api/v1/images/relight",
                json!({"model": "nano-banana-pro"}),
            )
            .await;
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.error_code(), "store_unavailable");
        assert!(r.header("Retry-After").is_some());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
    }
    assert_eq!(e.backend.request_count(), 0);
    let r = e.gw.admin("GET", "/readyz", None).await;
    assert_eq!(r.status, 503);
    e.redis.start_again();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r =
            e.gw.generate(
                &key,
                "/api/v1/images/relight",
                json!({"model": "nano-banana-pro"}),
            )
            .await;
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "no recovery: {}", r.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(e.gw.balance(&key).await, 297);
    assert_eq!(e.gw.admin("GET", "/readyz", None).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_authenticated_and_free_and_unknown_routes_404() {
    let e = env().await;
    e.gw.create_account("p", "pro", false).await;
    let key = e.gw.create_key("p").await;
    let auth = bearer(&key);
    // The account's own job (a video it started; the demo backend reports it succeeded).
    let r =
        e.gw.generate(
            &key,
            "/api/v1/videos",
            json!({"model": "seedream-4.5", "duration": 10}),
        )
        .await;
    assert_eq!(r.json()["id"], "job_1", "{}", r.text());
    // Named in the body, the job is recorded just after its answer went out.
    let deadline = Instant::now() + Duration::from_secs(3);
    let r = loop {
        let r = http::get(
            e.gw.proxy,
            "/api/v1/jobs/job_1",
            &[("Authorization", &auth)],
        )
        .await;
        if r.status != 404 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("X-Credits-Charged"), None);
    assert_eq!(e.backend.request_count(), 2);
    let r = http::get(e.gw.proxy, "/api/v1/jobs/job_1", &[]).await;
    assert_eq!(r.status, 401);
    let r = http::get(e.gw.proxy, "/api/v1/nothing", &[("Authorization", &auth)]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.error_code(), "not_found");
    assert_eq!(e.backend.request_count(), 2);
    assert_eq!(
        e.gw.balance(&key).await,
        280,
        "the video, kept by its job's success"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_validates_and_upgrades_add_the_difference() {
    let e = env().await;
    let r = http::get(e.gw.admin, "/admin/accounts/x", &[]).await;
    assert_eq!(r.status, 401);
    let r = http::get(
        e.gw.admin,
        "/admin/accounts/x",
        &[("Authorization", "Bearer wrong")],
    )
    .await;
    assert_eq!(r.status, 401);
    for (body, field) in [
        (json!({"plan": "pro"}), "id"),
        (json!({"id": "a b", "plan": "pro"}), "id"),
        (json!({"id": "a", "plan": "gold"}), "plan"),
        (
            json!({"id": "a", "plan": "pro", "payPerUse": "yes"}),
            "payPerUse",
        ),
        (
            json!({"id": "a", "plan": "pro", "currentPeriodEnd": "tomorrow"}),
            "currentPeriodEnd",
        ),
        (
            json!({"id": "a", "plan": "pro", "spendingLimitCents": -5}),
            "spendingLimitCents",
        ),
        (json!({"id": "a", "plan": "pro", "colour": "red"}), "colour"),
    ] {
        let r =
            e.gw.admin("POST", "/admin/accounts", Some(body.clone()))
                .await;
        assert_eq!(r.status, 400, "{body}");
        assert_eq!(r.error_code(), "invalid_request");
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains(field),
            "{body}: {}",
            r.text()
        );
    }
    assert_eq!(
        e.gw.admin("GET", "/admin/accounts/a", None).await.status,
        404
    );
    e.gw.create_account("a", "starter", false).await;
    let r =
        e.gw.admin(
            "POST",
            "/admin/accounts",
            Some(json!({"id": "a", "plan": "pro"})),
        )
        .await;
    assert_eq!(r.status, 409);
    let key = e.gw.create_key("a").await;
    for _ in 0..10 {
        e.gw.generate(
            &key,
            "/api/v1/images/relight",
            json!({"model": "seedream-4.5"}),
        )
        .await;
    }
    assert_eq!(e.gw.balance(&key).await, 90);
    let r =
        e.gw.admin("PATCH", "/admin/accounts/a", Some(json!({"plan": "pro"})))
            .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["balance"], 290, "upgrade adds 300 - 100");
    for (body, code) in [
        (json!({"amount": 0}), 400),
        (json!({"amount": -3}), 400),
        (json!({"amount": "5"}), 400),
        (json!({}), 400),
        (json!({"amount": 10, "reason": "goodwill"}), 200),
    ] {
        let r =
            e.gw.admin("POST", "/admin/accounts/a/credits", Some(body.clone()))
                .await;
        assert_eq!(r.status, code, "{body}");
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(e.gw.balance(&key).await, 300);
    let r =
        e.gw.admin(
            "PATCH",
            "/admin/accounts/a",
            Some(json!({"status": "paused"})),
        )
        .await;
    assert_eq!(r.status, 400);
    let cat = e.gw.admin("GET", "/admin/catalog", None).await;
    assert_eq!(cat.status, 200);
    assert_eq!(cat.json()["version"], 1);
}

/// Sends a request head with `Expect: 100-continue` and waits (≤ 2 s) for the first answer
/// before sending any body, as curl does. Returns that first answer's head and, when it was
/// `100 Continue`, the final response after the body was sent.
async fn expect_continue(
    addr: std::net::SocketAddr,
    head: &str,
    body: &[u8],
) -> (String, Option<http::Response>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("head");
    let mut buf = Vec::new();
    let first = tokio::time::timeout(Duration::from_secs(2), async {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return end + 4;
            }
            let n = stream.read(&mut chunk).await.expect("read");
            assert!(
                n > 0,
                "closed before answering: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("the gateway answered the head without waiting for the body");
    let first_head = String::from_utf8_lossy(&buf[..first]).into_owned();
    if !first_head.starts_with("HTTP/1.1 100") {
        return (first_head, None);
    }
    stream.write_all(body).await.expect("body");
    let mut rest = buf[first..].to_vec();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .expect("final response within 10 s")
        .expect("read");
    (first_head, Some(http::parse(&rest)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_once_the_request_is_admitted() {
    let e = env().await;
    e.gw.create_account("up", "pro", false).await;
    let key = e.gw.create_key("up").await;
    let proxy = e.gw.proxy;

    // A binary upload priced from X-Model: 100 Continue after the reservation, then the body
    // streams to the backend, which is not asked to answer `Expect` itself.
    let body = vec![7u8; 300_000];
    let head = format!(
        "POST /api/v1/images/relight HTTP/1.1\r\nHost: {proxy}\r\nConnection: close\r\n\
         Authorization: Bearer {key}\r\nContent-Type: application/octet-stream\r\n\
         X-Model: nano-banana-pro\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (first, last) = expect_continue(proxy, &head, &body).await;
    assert!(first.starts_with("HTTP/1.1 100"), "{first}");
    let last = last.expect("final response");
    assert_eq!(last.status, 200, "{}", last.text());
    assert_eq!(last.header("X-Credits-Charged"), Some("3"));
    let seen = e.backend.requests();
    let upload = seen.last().expect("the backend saw the upload");
    assert_eq!(upload.body_len, body.len() as u64);
    assert_eq!(upload.header("Expect"), None, "Expect was forwarded");

    // A JSON-priced request: 100 Continue before the gateway reads the body it prices from.
    let json = br#"{"model":"nano-banana-pro","n":2}"#;
    let head = format!(
        "POST /api/v1/images/relight HTTP/1.1\r\nHost: {proxy}\r\nConnection: close\r\n\
         Authorization: Bearer {key}\r\nContent-Type: application/json\r\n\
         Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        json.len()
    );
    let (first, last) = expect_continue(proxy, &head, json).await;
    assert!(first.starts_with("HTTP/1.1 100"), "{first}");
    let last = last.expect("final response");
    assert_eq!(last.status, 200, "{}", last.text());
    assert_eq!(last.header("X-Credits-Charged"), Some("6"));
    assert_eq!(e.gw.balance(&key).await, 300 - 3 - 6);

    // Refused on its head: the final answer comes first and nothing is uploaded or proxied.
    let before = e.backend.request_count();
    let head = format!(
        "POST /api/v1/images/relight HTTP/1.1\r\nHost: {proxy}\r\n\
         Authorization: Bearer at_live_NotAKeyThatWasEverIssued0000000000000\r\n\
         Content-Type: application/octet-stream\r\nX-Model: nano-banana-pro\r\n\
         Expect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (first, last) = expect_continue(proxy, &head, &body).await;
    assert!(first.starts_with("HTTP/1.1 401"), "{first}");
    assert!(last.is_none());
    assert_eq!(e.backend.request_count(), before);
}

/// A credit reservation record lives as long as settlement can need it (an hour with the default
/// timeouts); a pay-per-use one for `billing.reservation_ttl_s` (7 days), for the Stripe trail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservation_records_expire_after_what_reads_them() {
    let e = env().await;
    e.gw.create_account("cr", "pro", false).await;
    e.gw.create_account_with(json!({
        "id": "pp", "plan": "pay_per_use", "payPerUse": true, "spendingLimitCents": 10000
    }))
    .await;
    let credit_key = e.gw.create_key("cr").await;
    let ppu_key = e.gw.create_key("pp").await;
    let body = json!({"model": "nano-banana-pro"});
    for key in [&credit_key, &ppu_key] {
        let r =
            e.gw.generate(key, "/api/v1/images/relight", body.clone())
                .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let ids: Vec<String> = e
        .backend
        .requests()
        .iter()
        .filter_map(|r| r.header("X-Creditgate-Charge-Id").map(str::to_string))
        .collect();
    assert_eq!(ids.len(), 2);
    let mut conn = redis::Client::open(e.redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let mut ttl_ms = Vec::new();
    for (account, id) in [("cr", &ids[0]), ("pp", &ids[1])] {
        let key = format!("cg:{{a:{account}}}:rsv:{id}");
        let pttl: i64 = redis::cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("pttl");
        ttl_ms.push(pttl);
    }
    let hour = 3600 * 1000;
    assert!(
        ttl_ms[0] > hour - 60_000 && ttl_ms[0] <= hour,
        "credit record TTL {} ms",
        ttl_ms[0]
    );
    let week = 7 * 24 * hour;
    assert!(
        ttl_ms[1] > week - 60_000 && ttl_ms[1] <= week,
        "pay-per-use record TTL {} ms",
        ttl_ms[1]
    );
}
