//! Async jobs billed at their final state (issue 13 item 1), on the real binary in front of the
//! demo backend with a real redis-server: `POST /api/v1/videos` holds its credits against the job
//! (`X-Credits-Held`), and the job's final state settles the hold exactly once — seen on a
//! proxied `GET /api/v1/jobs/{id}` or reported by the backend's `POST /admin/jobs/{id}`; a job
//! never final within `billing.job_ttl_s` is settled by the sweeper under the orphan policy.
//! Every test checks conservation: balance + kept == granted.

mod support;

use std::time::{Duration, Instant};

use creditgate::demo_backend::{Behaviour, DemoBackend, JobIdIn};
use serde_json::{json, Value};
use support::gateway::{GatewayOptions, GatewayProcess};
use support::http;
use support::RedisServer;

/// The starter plan's allowance.
const GRANTED: u64 = 100;
/// The account of the single-account tests.
const ACCOUNT: &str = "acme";
/// A 10 s video on seedream-4.5.
const VIDEO: u64 = 20;

struct Env {
    gw: GatewayProcess,
    backend: DemoBackend,
    _redis: RedisServer,
}

async fn env_with(extra_toml: &str) -> Env {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    backend.set_behaviour(Behaviour {
        job_status: "pending".into(),
        ..Behaviour::default()
    });
    let mut opts = GatewayOptions::new(&redis.url(), backend.addr);
    opts.extra_toml = extra_toml.to_string();
    let gw = GatewayProcess::start_with(opts).await;
    Env {
        gw,
        backend,
        _redis: redis,
    }
}

async fn env() -> Env {
    env_with("").await
}

/// A starter account with a key.
async fn customer(gw: &GatewayProcess, id: &str) -> String {
    gw.create_account(id, "starter", false).await;
    gw.create_key(id).await
}

async fn video(gw: &GatewayProcess, key: &str) -> http::Response {
    gw.generate(
        key,
        "/api/v1/videos",
        json!({"model": "seedream-4.5", "duration": 10}),
    )
    .await
}

/// Waits (at most 3 s) until the job is recorded in the store (`cg:{a:<account>}:job:<id>`):
/// a job named only in the answer's body is recorded just after that answer was sent.
async fn recorded(e: &Env, account: &str, id: &str) {
    let client = redis::Client::open(e._redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("cg:{{a:{account}}}:job:{id}");
    let start = Instant::now();
    loop {
        let n: i64 = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        if n == 1 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{key} never written"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Starts a video job and checks what its answer says is held; the job id, once recorded.
async fn start_job(e: &Env, account: &str, key: &str) -> String {
    let r = video(&e.gw, key).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("X-Credits-Held"), Some("20"), "{:?}", r.headers);
    assert_eq!(r.header("X-Credits-Charged"), None, "held, not charged");
    let id = r.json()["id"].as_str().expect("a job id").to_string();
    assert!(id.starts_with("job_"), "{id}");
    recorded(e, account, &id).await;
    id
}

async fn poll(gw: &GatewayProcess, key: &str, id: &str) -> http::Response {
    let auth = format!("Bearer {key}");
    http::get(
        gw.proxy,
        &format!("/api/v1/jobs/{id}"),
        &[("Authorization", &auth)],
    )
    .await
}

async fn callback(gw: &GatewayProcess, id: &str, body: Value) -> http::Response {
    gw.admin("POST", &format!("/admin/jobs/{id}"), Some(body))
        .await
}

/// Waits (at most 3 s) for the balance to be `expected` — a poll settles in the gateway's
/// `logging` phase, just after its answer — then checks it stays there.
async fn settles_at(gw: &GatewayProcess, key: &str, expected: u64) {
    let start = Instant::now();
    while gw.balance(key).await != expected && start.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(gw.balance(key).await, expected);
}

/// The value of the sample `name{labels}` (labels in any order, as `key="value"` pairs).
async fn metric(gw: &GatewayProcess, sample: &str) -> u64 {
    let (name, labels) = sample.split_once('{').unwrap_or((sample, "}"));
    let labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
    let text = http::get(gw.metrics, "/metrics", &[]).await.text();
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|p| l.contains(p)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_seen_by_a_poll_is_refunded_once() {
    let e = env().await;
    let key = customer(&e.gw, ACCOUNT).await;
    let id = start_job(&e, ACCOUNT, &key).await;
    assert_eq!(e.gw.balance(&key).await, GRANTED - VIDEO, "held");
    // Pending: proxied, nothing settled.
    let r = poll(&e.gw, &key, &id).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "pending");
    settles_at(&e.gw, &key, GRANTED - VIDEO).await;
    e.backend.set_job_status(&id, "failed");
    let r = poll(&e.gw, &key, &id).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "failed");
    settles_at(&e.gw, &key, GRANTED).await;
    // Seen again (and reported by the backend too): still refunded once.
    for _ in 0..3 {
        assert_eq!(poll(&e.gw, &key, &id).await.status, 200);
    }
    let r = callback(&e.gw, &id, json!({"status": "failed"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["applied"], false);
    settles_at(&e.gw, &key, GRANTED).await;
    // Conservation: nothing kept.
    assert_eq!(e.gw.balance(&key).await, GRANTED);
    assert_eq!(
        metric(&e.gw, "creditgate_jobs_total{event=\"failed\"}").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_reported_by_the_callback_is_refunded_once_and_a_duplicate_is_a_no_op() {
    let e = env().await;
    let key = customer(&e.gw, ACCOUNT).await;
    let id = start_job(&e, ACCOUNT, &key).await;
    let r = callback(&e.gw, &id, json!({"status": "failed"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["applied"], true);
    assert_eq!(body["refunded"], VIDEO);
    assert_eq!(body["kept"], 0);
    assert_eq!(body["unit"], "credits");
    assert_eq!(
        e.gw.balance(&key).await,
        GRANTED,
        "refunded before the answer"
    );
    for status in ["failed", "succeeded", "canceled"] {
        let r = callback(&e.gw, &id, json!({"status": status})).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["applied"], false, "duplicate {status}");
    }
    // A poll that now says succeeded changes nothing either.
    e.backend.set_job_status(&id, "succeeded");
    assert_eq!(poll(&e.gw, &key, &id).await.status, 200);
    settles_at(&e.gw, &key, GRANTED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_succeeded_job_keeps_its_charge() {
    let e = env().await;
    let key = customer(&e.gw, ACCOUNT).await;
    let polled = start_job(&e, ACCOUNT, &key).await;
    e.backend.set_job_status(&polled, "succeeded");
    let r = poll(&e.gw, &key, &polled).await;
    assert_eq!(r.json()["status"], "succeeded");
    settles_at(&e.gw, &key, GRANTED - VIDEO).await;
    // A late failure report does not refund a job that succeeded.
    let r = callback(&e.gw, &polled, json!({"status": "failed"})).await;
    assert_eq!(r.json()["applied"], false);
    // By callback too.
    let called = start_job(&e, ACCOUNT, &key).await;
    let r = callback(&e.gw, &called, json!({"status": "succeeded"})).await;
    assert_eq!(r.json()["applied"], true, "{}", r.text());
    assert_eq!(r.json()["kept"], VIDEO);
    settles_at(&e.gw, &key, GRANTED - 2 * VIDEO).await;
    // Conservation: balance + kept == granted.
    assert_eq!(e.gw.balance(&key).await + 2 * VIDEO, GRANTED);
    assert_eq!(
        metric(&e.gw, "creditgate_jobs_total{event=\"succeeded\"}").await,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canceled_job_is_refunded_and_images_made_are_kept() {
    let e = env().await;
    let key = customer(&e.gw, ACCOUNT).await;
    let id = start_job(&e, ACCOUNT, &key).await;
    e.backend.set_job_status(&id, "canceled");
    assert_eq!(poll(&e.gw, &key, &id).await.json()["status"], "canceled");
    settles_at(&e.gw, &key, GRANTED).await;
    // A failed job that made its one video (imagesGenerated = 1) keeps it.
    let id = start_job(&e, ACCOUNT, &key).await;
    let r = callback(
        &e.gw,
        &id,
        json!({"status": "failed", "imagesGenerated": 1}),
    )
    .await;
    assert_eq!(r.json()["kept"], VIDEO, "{}", r.text());
    settles_at(&e.gw, &key, GRANTED - VIDEO).await;
    assert_eq!(e.gw.balance(&key).await + VIDEO, GRANTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_polls_of_a_finished_job_settle_it_once() {
    let e = env().await;
    let key = customer(&e.gw, ACCOUNT).await;
    let id = start_job(&e, ACCOUNT, &key).await;
    e.backend.set_job_status(&id, "failed");
    let mut polls = Vec::new();
    for _ in 0..100 {
        let proxy = e.gw.proxy;
        let auth = format!("Bearer {key}");
        let target = format!("/api/v1/jobs/{id}");
        polls.push(tokio::spawn(async move {
            http::get(proxy, &target, &[("Authorization", &auth)]).await
        }));
    }
    for p in polls {
        let r = p.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    settles_at(&e.gw, &key, GRANTED).await;
    assert_eq!(
        metric(&e.gw, "creditgate_jobs_total{event=\"failed\"}").await,
        1,
        "settled by exactly one poll"
    );
    assert_eq!(
        metric(
            &e.gw,
            "creditgate_credits_refunded_total{plan=\"starter\",operation=\"video-10s\",model=\"seedream-4.5\"}"
        )
        .await,
        VIDEO
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_accounts_or_an_unknown_job_is_404_and_never_proxied() {
    let e = env().await;
    let owner = customer(&e.gw, "owner").await;
    let other = customer(&e.gw, "other").await;
    let id = start_job(&e, "owner", &owner).await;
    e.backend.set_job_status(&id, "failed");
    let before = e.backend.request_count();
    for (key, job) in [
        (&other, id.as_str()),
        (&owner, "job_999"),
        (&owner, "bad%20id"),
    ] {
        let r = poll(&e.gw, key, job).await;
        assert_eq!(r.status, 404, "{job}: {}", r.text());
        assert_eq!(r.error_code(), "not_found");
    }
    assert_eq!(e.backend.request_count(), before, "0 upstream requests");
    // The owner's hold is untouched by the other account's poll.
    settles_at(&e.gw, &owner, GRANTED - VIDEO).await;
    assert_eq!(e.gw.balance(&other).await, GRANTED);
    // The callback: unknown job 404, bad bodies 400, no admin token 401.
    let r = callback(&e.gw, "job_999", json!({"status": "failed"})).await;
    assert_eq!(r.status, 404, "{}", r.text());
    for bad in [
        json!({"status": "done"}),
        json!({"status": "pending"}),
        json!({}),
        json!({"status": "failed", "extra": 1}),
        json!({"status": "failed", "imagesGenerated": -1}),
        json!(["failed"]),
    ] {
        let r = callback(&e.gw, &id, bad.clone()).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
    let r = http::request(
        e.gw.admin,
        "POST",
        &format!("/admin/jobs/{id}"),
        &[("Content-Type", "application/json")],
        Some(br#"{"status":"failed"}"#),
    )
    .await;
    assert_eq!(r.status, 401);
    settles_at(&e.gw, &owner, GRANTED - VIDEO).await;
    // Conservation, after the owner's job settles.
    assert_eq!(poll(&e.gw, &owner, &id).await.status, 200);
    settles_at(&e.gw, &owner, GRANTED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_id_in_the_header_is_recorded_before_the_answer_and_none_settles_as_a_request() {
    let e = env().await;
    let key = customer(&e.gw, "headers").await;
    e.backend.set_behaviour(Behaviour {
        job_id: JobIdIn::Header,
        job_status: "pending".into(),
        ..Behaviour::default()
    });
    let r = video(&e.gw, &key).await;
    assert_eq!(r.header("X-Credits-Held"), Some("20"));
    let id = r.header("X-Job-Id").expect("X-Job-Id").to_string();
    // Recorded before the answer went out: the callback finds it at once.
    let r = callback(&e.gw, &id, json!({"status": "failed"})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["applied"], true);
    assert_eq!(e.gw.balance(&key).await, GRANTED);
    // A 2xx without a job id: nothing could ever report its final state; settled as a request
    // (a 2xx keeps).
    e.backend.set_behaviour(Behaviour {
        job_id: JobIdIn::Neither,
        ..Behaviour::default()
    });
    let r = video(&e.gw, &key).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("X-Credits-Held"), Some("20"));
    settles_at(&e.gw, &key, GRANTED - VIDEO).await;
    assert_eq!(
        metric(&e.gw, "creditgate_jobs_total{event=\"no_job_id\"}").await,
        1
    );
    // A failed creation refunds at once, like any request.
    e.backend.set_behaviour(Behaviour {
        status: 500,
        ..Behaviour::default()
    });
    let r = video(&e.gw, &key).await;
    assert_eq!(r.status, 500);
    assert_eq!(r.header("X-Credits-Charged"), Some("0"));
    assert_eq!(r.header("X-Credits-Held"), None);
    settles_at(&e.gw, &key, GRANTED - VIDEO).await;
    assert_eq!(e.gw.balance(&key).await + VIDEO, GRANTED);
}

/// A gateway whose jobs expire after 1 s, swept every 100 ms, under `policy`.
async fn expiring(policy: &str, job_ttl_s: u64) -> Env {
    env_with(&format!(
        "[billing]\norphan_policy = \"{policy}\"\njob_ttl_s = {job_ttl_s}\nlease_grace_ms = 1000\nsweep_interval_ms = 100\n"
    ))
    .await
}

/// Waits (at most `within`) for the balance to be `expected`.
async fn reaches(gw: &GatewayProcess, key: &str, expected: u64, within: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if gw.balance(key).await == expected {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_never_final_within_its_ttl_follows_the_orphan_policy() {
    // Three gateways at once: refund and keep with a 1 s job TTL, and a 1 h TTL whose request
    // lease (connect 1 s + read 5 s + grace 1 s) ends long before the job's.
    let (refund, keep, long) = tokio::join!(
        expiring("refund", 1),
        expiring("keep", 1),
        expiring("refund", 3600)
    );
    let k_refund = customer(&refund.gw, "r").await;
    let k_keep = customer(&keep.gw, "k").await;
    let k_long = customer(&long.gw, "l").await;
    let started = Instant::now();
    let j_refund = start_job(&refund, "r", &k_refund).await;
    let j_keep = start_job(&keep, "k", &k_keep).await;
    let j_long = start_job(&long, "l", &k_long).await;
    // Slots are 10 s wide and swept 1 s after they end.
    let within = Duration::from_secs(25);
    assert!(
        reaches(&refund.gw, &k_refund, GRANTED, within).await,
        "refunded by the sweeper"
    );
    assert_eq!(
        metric(&refund.gw, "creditgate_orphans_total{policy=\"refund\"}").await,
        1
    );
    let start = Instant::now();
    while metric(&keep.gw, "creditgate_orphans_total{policy=\"keep\"}").await == 0
        && start.elapsed() < within
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        metric(&keep.gw, "creditgate_orphans_total{policy=\"keep\"}").await,
        1,
        "kept by the sweeper"
    );
    assert_eq!(keep.gw.balance(&k_keep).await + VIDEO, GRANTED);
    // The job reaching its final state later changes nothing.
    for (e, key, id) in [(&refund, &k_refund, &j_refund), (&keep, &k_keep, &j_keep)] {
        e.backend.set_job_status(id, "failed");
        let r = callback(&e.gw, id, json!({"status": "failed"})).await;
        assert_eq!(r.json()["applied"], false, "{}", r.text());
        assert_eq!(poll(&e.gw, key, id).await.status, 200);
    }
    settles_at(&refund.gw, &k_refund, GRANTED).await;
    settles_at(&keep.gw, &k_keep, GRANTED - VIDEO).await;
    // The 1 h job outlived its request's lease unswept: the request lease (7 s) ended in a slot
    // swept at most 11 s later.
    let swept = Duration::from_secs(19);
    if let Some(left) = swept.checked_sub(started.elapsed()) {
        tokio::time::sleep(left).await;
    }
    assert_eq!(
        metric(&long.gw, "creditgate_orphans_total{policy=\"refund\"}").await,
        0
    );
    assert_eq!(
        long.gw.balance(&k_long).await,
        GRANTED - VIDEO,
        "still held"
    );
    let r = callback(&long.gw, &j_long, json!({"status": "failed"})).await;
    assert_eq!(r.json()["applied"], true, "{}", r.text());
    assert_eq!(long.gw.balance(&k_long).await, GRANTED);
}
