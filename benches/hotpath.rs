//! The CPU cost of each step a billed request takes inside the gateway, through the library's
//! public API, without Pingora and without Redis (the Redis round trip is `benches/ledger.rs`;
//! the whole request against a bare Pingora proxy is `scripts/load.sh`):
//!
//! - `rules/…`: canonicalise the target, match the route, quote a typical image request.
//! - `auth/…`: find the presented key and hash it (SHA-256); `authenticate` on a key-cache hit
//!   (what every request pays while its key is cached).
//! - `reserve/…`: `reserve::reserve` + `settle::settle` on the memory ledger, credits and
//!   pay-per-use (the ledger's own cost without a network).
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

use creditgate::apikey::{random_id, ApiKey};
use creditgate::auth::{self, KeyCache};
use creditgate::entitlement;
use creditgate::ledger::{Account, KeyRecord, Ledger, MemoryLedger, SubscriptionStatus};
use creditgate::metrics;
use creditgate::reserve::{self, ReserveSettings};
use creditgate::rules::{self, canonicalize, Catalog, Quote, RequestInputs};
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

/// Quotes `body` for the image route, as `admit` does.
fn quote_for(catalog: &Catalog, body: &[u8]) -> Quote {
    let json = rules::parse_json_body(body).expect("json");
    let path = canonicalize(TARGET).expect("path");
    let m = catalog.match_route("POST", &path).expect("route");
    let lookup = |_: &str| -> Option<&'static str> { None };
    let inputs = RequestInputs {
        json_body: Some(&json),
        header: &lookup,
        query: &path,
    };
    rules::quote(catalog, &m, &inputs)
        .expect("priced")
        .expect("billed")
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

fn bench_reserve(c: &mut Criterion, rt: &tokio::runtime::Runtime, catalog: &Catalog) {
    let now = now_ms();
    let ledger = MemoryLedger::new();
    let credits = account("credits", "business", false, now);
    let ppu = account("ppu", "pay_per_use", true, now);
    rt.block_on(async {
        ledger
            .create_account(&credits, None)
            .await
            .expect("account");
        ledger.create_account(&ppu, None).await.expect("account");
        let bucket = entitlement::credit_bucket(catalog, &credits, now).expect("bucket");
        ledger
            .grant_credits(&credits.id, &bucket, 1 << 50)
            .await
            .expect("grant");
    });
    let credit_quote = quote_for(catalog, BODY);
    let ppu_quote = quote_for(catalog, PPU_BODY);
    // Short-lived records keep the memory ledger's maps small however long the run.
    let settings = ReserveSettings {
        credit_record_ttl_ms: 50,
        spend_record_ttl_ms: 50,
        report_to_stripe: false,
    };
    let ok = UpstreamOutcome::Succeeded {
        images_generated: None,
    };

    let mut g = c.benchmark_group("reserve");
    for (name, acct, quote) in [
        (
            "memory: reserve + settle (credits, 2xx)",
            &credits,
            &credit_quote,
        ),
        (
            "memory: reserve + settle (pay-per-use, 2xx)",
            &ppu,
            &ppu_quote,
        ),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(async {
                    let r = reserve::reserve(&ledger, catalog, acct, quote, now, &settings)
                        .await
                        .expect("reserved");
                    let s = settle::decide(&r, ok);
                    settle::settle(&ledger, &r, s).await.expect("settled")
                })
            })
        });
    }
    g.finish();

    let reservation = rt
        .block_on(reserve::reserve(
            &ledger,
            catalog,
            &credits,
            &credit_quote,
            now,
            &settings,
        ))
        .expect("reserved");
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
    bench_reserve(c, &rt, &catalog);
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
