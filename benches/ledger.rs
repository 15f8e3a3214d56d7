//! Ledger micro-benchmarks: what one request's billing costs in the store. The Redis cases run
//! against a real `redis-server` on a unix socket that the benchmark starts itself (the same
//! helper as the integration tests); the memory ledger is the in-process baseline.
//!
//! - `reserve+settle` — a 2xx request: one `MULTI/EXEC` to reserve, one to settle.
//! - `reserve+refund` — a failed upstream: reserve, claim, give back (three round trips).
//! - `reserve x32 concurrent` — 32 reservations started together, as 32 requests in flight on
//!   one thread start them: they share `MULTI/EXEC`s (criterion reports reservations/s).
//!
//! Each iteration `block_on`s a current-thread runtime, so the numbers include that overhead
//! (well under a microsecond).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use creditgate::ledger::{
    ChargeMeta, CreditBucket, CreditReservation, Ledger, MemoryLedger, RedisLedger,
};

#[allow(dead_code)]
#[path = "../tests/support/redis_server.rs"]
mod redis_server;

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn reservation(record_ttl_ms: i64) -> CreditReservation {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    CreditReservation {
        account_id: "bench".to_string(),
        reservation_id: format!("r{n}"),
        bucket: CreditBucket {
            id: "p-bench".to_string(),
            allowance: 1_000_000_000_000,
            expires_at_ms: None,
        },
        amount: 3,
        meta: ChargeMeta {
            operation: "product-enhancement".to_string(),
            model: "nano-banana-pro".to_string(),
            quantity: 1,
            unit_amount: 3,
            catalog_version: 1,
            created_ms: 0,
        },
        record_ttl_ms,
        lease_until_ms: i64::MAX,
    }
}

async fn reserve_then_settle(ledger: &dyn Ledger, refund: u64, record_ttl_ms: i64) {
    let r = reservation(record_ttl_ms);
    ledger.reserve_credits(&r).await.expect("reserve");
    ledger
        .settle(&r.account_id, &r.reservation_id, refund)
        .await
        .expect("settle");
}

fn bench_ledgers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    let mut group = c.benchmark_group("ledger");
    group.measurement_time(Duration::from_secs(5));

    let memory = MemoryLedger::new();
    group.bench_function("memory reserve+settle", |b| {
        b.iter(|| rt.block_on(reserve_then_settle(&memory, 0, 1_000)))
    });
    group.bench_function("memory reserve+refund", |b| {
        b.iter(|| rt.block_on(reserve_then_settle(&memory, 3, 1_000)))
    });

    let server = redis_server::RedisServer::start();
    let redis = RedisLedger::new(&server.url(), Duration::from_secs(1)).expect("url");
    rt.block_on(redis.ping()).expect("redis answers");
    // Short-lived records keep the server's memory flat however many iterations run.
    group.bench_function("redis reserve+settle", |b| {
        b.iter(|| rt.block_on(reserve_then_settle(&redis, 0, 5_000)))
    });
    group.bench_function("redis reserve+refund", |b| {
        b.iter(|| rt.block_on(reserve_then_settle(&redis, 3, 5_000)))
    });
    group.bench_function("redis reserve only", |b| {
        b.iter(|| {
            rt.block_on(async {
                redis
                    .reserve_credits(&reservation(5_000))
                    .await
                    .expect("reserve")
            })
        })
    });
    let shared = Arc::new(redis);
    group.throughput(Throughput::Elements(32));
    group.bench_function("redis reserve x32 concurrent", |b| {
        b.iter(|| {
            rt.block_on(async {
                let tasks: Vec<_> = (0..32)
                    .map(|_| {
                        let ledger = shared.clone();
                        tokio::spawn(async move {
                            ledger
                                .reserve_credits(&reservation(5_000))
                                .await
                                .expect("reserve")
                        })
                    })
                    .collect();
                for task in tasks {
                    task.await.expect("task");
                }
            })
        })
    });
    group.finish();
    drop(server);
}

criterion_group!(benches, bench_ledgers);
criterion_main!(benches);
