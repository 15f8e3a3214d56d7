//! The CPU cost of each step a billed request takes inside the gateway, through the library's
//! public API, without Pingora and without Redis (the Redis round trip is `benches/ledger.rs`;
//! the whole request against a bare Pingora proxy is `scripts/load.sh`):
//!
//! - `rules/…`: canonicalise the target, match the route, quote a typical image request.
//! - `auth/…`: find the presented key and hash it (SHA-256); `authenticate` on a key-cache hit
//!   (what every request pays while its key is cached).
//! - `admit/…`: `admit::admit` (everything `request_filter` does, the memory ledger's
//!   reservation included) + `settle::finish` for a 2xx, credits and pay-per-use.
//! - `settle/decide`, `metrics/inc REQUESTS`, `ids/random_id` (one per request and reservation).
//!
//! Async steps are driven by a current-thread tokio runtime's `block_on` (well under a
//! microsecond of overhead per iteration).

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::{criterion_group, criterion_main, Criterion};
use pingora::http::RequestHeader;

use bytes::Bytes;
use creditgate::admit::{admit, Admission};
use creditgate::apikey::{random_id, ApiKey};
use creditgate::auth::{self, KeyCache};
use creditgate::clock::{FakeClock, SharedClock};
use creditgate::config::Config;
use creditgate::entitlement;
use creditgate::gateway::Gateway;
use creditgate::incoming::BufferedRequest;
use creditgate::ledger::{Account, KeyRecord, Ledger, MemoryLedger, SubscriptionStatus};
use creditgate::live_catalog::LiveCatalog;
use creditgate::metrics;
use creditgate::rules::{self, canonicalize, Catalog, RequestInputs};
use creditgate::settle::{self, UpstreamOutcome};

const TARGET: &str = "/api/v1/images/relight";
const BODY: &[u8] = br#"{"model":"nano-banana-pro","n":1,"prompt":"a product photo on a marble table, soft window light"}"#;
const PPU_BODY: &[u8] = br#"{"model":"midjourney-v7","n":1,"prompt":"a product photo on a marble table, soft window light"}"#;
const DAY_MS: i64 = 24 * 3600 * 1000;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn catalog() -> Catalog {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("lua-free-rules");
    match rules::load_dir(&dir) {
        Ok(c) => c,
        Err(problems) => panic!("shipped rules do not load: {problems:?}"),
    }
}

fn request(key: &ApiKey) -> RequestHeader {
    let mut req = RequestHeader::build("POST", TARGET.as_bytes(), None).expect("request");
    for (name, value) in [
        ("host", "api.example.com".to_string()),
        ("content-type", "application/json".to_string()),
        ("authorization", format!("Bearer {}", key.expose())),
        ("user-agent", "bench/1.0".to_string()),
    ] {
        req.insert_header(name, value).expect("header");
    }
    req
}

fn account(id: &str, plan: &str, pay_per_use: bool, now: i64) -> Account {
    Account {
        id: id.to_string(),
        plan: plan.to_string(),
        status: SubscriptionStatus::Active,
        period_anchor_ms: now + 20 * DAY_MS,
        pay_per_use,
        spending_limit_cents: 100_000_000,
        stripe_customer_id: None,
        created_ms: now,
    }
}

fn bench_rules(c: &mut Criterion, catalog: &Catalog) {
    let body = rules::parse_json_body(BODY).expect("json");
    let lookup = |_: &str| -> Option<&'static str> { None };
    let path = canonicalize(TARGET).expect("path");

    let mut g = c.benchmark_group("rules");
    g.bench_function("canonicalize", |b| {
        b.iter(|| canonicalize(black_box(TARGET)))
    });
    g.bench_function("match_route", |b| {
        b.iter(|| {
            catalog
                .match_route(black_box("POST"), black_box(&path))
                .is_some()
        })
    });
    g.bench_function("canonicalize + match_route + quote", |b| {
        b.iter(|| {
            let path = canonicalize(black_box(TARGET)).ok()?;
            let m = catalog.match_route(black_box("POST"), &path)?;
            let inputs = RequestInputs {
                json_body: Some(&body),
                header: &lookup,
                query: &path,
            };
            rules::quote(catalog, &m, &inputs).ok().flatten()
        })
    });
    g.bench_function("parse_json_body", |b| {
        b.iter(|| rules::parse_json_body(black_box(BODY)).ok())
    });
    g.finish();
}

fn bench_auth(c: &mut Criterion, rt: &tokio::runtime::Runtime, catalog: &Catalog) {
    let now = now_ms();
    let key = ApiKey::generate();
    let req = request(&key);
    let ledger = MemoryLedger::new();
    rt.block_on(async {
        let acct = account("bench", "business", false, now);
        ledger.create_account(&acct, None).await.expect("account");
        let record = KeyRecord {
            id: "key_bench".to_string(),
            account_id: acct.id.clone(),
            prefix: key.display_prefix().to_string(),
            name: None,
            created_ms: now,
            revoked: false,
        };
        ledger
            .insert_key(&key.hash_hex(), &record, 1)
            .await
            .expect("key");
    });
    // Long enough that the benchmark never sees a miss.
    let cache = KeyCache::new(3_600_000);

    let mut g = c.benchmark_group("auth");
    g.bench_function("presented_key + hash_hex", |b| {
        b.iter(|| auth::presented_key(black_box(&req)).map(|k| k.hash_hex()))
    });
    g.bench_function("hash_hex", |b| b.iter(|| black_box(&key).hash_hex()));
    rt.block_on(auth::authenticate(&req, &cache, &ledger, catalog, now))
        .expect("authenticates");
    g.bench_function("authenticate (key cache hit)", |b| {
        b.iter(|| {
            rt.block_on(auth::authenticate(
                black_box(&req),
                &cache,
                &ledger,
                catalog,
                now,
            ))
            .is_ok()
        })
    });
    g.finish();
}

/// A gateway on the shipped rules (with a rate limit no benchmark reaches) and the memory
/// ledger, with one business account that has credits to spare and one pay-per-use account.
fn gateway(rt: &tokio::runtime::Runtime, now: i64) -> (Gateway, ApiKey, ApiKey, tempfile::TempDir) {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("lua-free-rules");
    let rules = tempfile::tempdir().expect("temp dir");
    for name in [
        "plans.toml",
        "models.toml",
        "operations.toml",
        "routes.toml",
    ] {
        let text = std::fs::read_to_string(shipped.join(name)).expect("shipped rules");
        let text = text.replace(
            "requests_per_minute = 3000",
            "requests_per_minute = 1000000000",
        );
        std::fs::write(rules.path().join(name), text).expect("write rules");
    }
    let config = Config::parse(
        "bench.toml",
        &format!(
            "[upstream]\naddress = \"127.0.0.1:9\"\n[store]\nbackend = \"memory\"\n[rules]\ndir = {:?}\n",
            rules.path().display().to_string()
        ),
    )
    .expect("config");
    let catalog = LiveCatalog::load(rules.path()).expect("rules");
    let ledger: Arc<dyn Ledger> = Arc::new(MemoryLedger::new());
    let clock: SharedClock = Arc::new(FakeClock::at(now));
    let gw = Gateway::new(config, catalog, ledger, clock);
    let mut keys = Vec::new();
    rt.block_on(async {
        for (id, plan, ppu) in [("credits", "business", false), ("ppu", "pay_per_use", true)] {
            let acct = account(id, plan, ppu, now);
            gw.ledger
                .create_account(&acct, None)
                .await
                .expect("account");
            let key = ApiKey::generate();
            let record = KeyRecord {
                id: format!("key_{id}"),
                account_id: acct.id.clone(),
                prefix: key.display_prefix().to_string(),
                name: None,
                created_ms: now,
                revoked: false,
            };
            gw.ledger
                .insert_key(&key.hash_hex(), &record, 1)
                .await
                .expect("key");
            if let Some(bucket) = entitlement::credit_bucket(&gw.catalog.snapshot(), &acct, now) {
                gw.ledger
                    .grant_credits(&acct.id, &bucket, 1 << 50)
                    .await
                    .expect("grant");
            }
            keys.push(key);
        }
    });
    let ppu = keys.pop().expect("ppu key");
    let credits = keys.pop().expect("credits key");
    (gw, credits, ppu, rules)
}

/// `admit` as `request_filter` runs it (canonicalise, route, authenticate from the key cache,
/// rate limit, read and parse the JSON body, quote, reserve on the memory ledger), then
/// `settle::finish` as `logging` runs it for a 2xx.
fn bench_admit(c: &mut Criterion, rt: &tokio::runtime::Runtime) {
    let now = now_ms();
    let (gw, credits_key, ppu_key, _rules) = gateway(rt, now);
    let ok = UpstreamOutcome::Succeeded {
        images_generated: None,
    };
    let admit_once = |key: &ApiKey, body: &'static [u8]| {
        let mut req = BufferedRequest {
            header: request(key),
            body: Bytes::from_static(body),
        };
        let mut route = String::new();
        rt.block_on(admit(&gw, &mut req, &mut route))
    };

    let mut g = c.benchmark_group("admit");
    for (name, key, body) in [
        ("memory: admit + finish (credits, 2xx)", &credits_key, BODY),
        (
            "memory: admit + finish (pay-per-use, 2xx)",
            &ppu_key,
            PPU_BODY,
        ),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let Ok(Admission::Forward(forward)) = admit_once(key, body) else {
                    panic!("not admitted");
                };
                let reservation = forward.reservation.as_ref().expect("billed");
                rt.block_on(settle::finish(&gw.ledger, reservation, ok, "req_bench"))
            })
        });
    }
    g.finish();

    let Ok(Admission::Forward(forward)) = admit_once(&credits_key, BODY) else {
        panic!("not admitted");
    };
    let reservation = forward.reservation.expect("billed");
    c.bench_function("settle/decide", |b| {
        b.iter(|| {
            settle::decide(
                black_box(&reservation),
                black_box(UpstreamOutcome::Succeeded {
                    images_generated: Some(0),
                }),
            )
        })
    });
}

fn bench_small(c: &mut Criterion) {
    c.bench_function("metrics/inc REQUESTS", |b| {
        b.iter(|| {
            metrics::inc(
                &metrics::REQUESTS,
                black_box(&["POST /api/v1/images/{operation}", "ok"]),
                1,
            )
        })
    });
    c.bench_function("ids/random_id (req_, 20)", |b| {
        b.iter(|| random_id(black_box("req_"), 20))
    });
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let catalog = Arc::new(catalog());
    bench_rules(c, &catalog);
    bench_auth(c, &rt, &catalog);
    bench_admit(c, &rt);
    bench_small(c);
}

criterion_group! {
    name = hotpath;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(hotpath);
