//! The Stripe outbox end to end: charges written by the real [`RedisLedger`] (on a real
//! `redis-server`) are delivered by [`StripeReporter`]s to a local fake Stripe — each exactly
//! once, with its own identifier and an integer value net of refunds — through outages, rate
//! limits, worker restarts, duplicate answers and refusals, and never by two workers at once.

#[path = "support/fake_stripe.rs"]
mod fake_stripe;
mod support;

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use creditgate::clock::{Clock, FakeClock, SharedClock};
use creditgate::config::StripeConfig;
use creditgate::ledger::{
    ChargeMeta, Ledger, OrphanPolicy, RedisLedger, SettleOutcome, SpendReservation,
    SpendReserveOutcome, StripeReport,
};
use creditgate::period;
use creditgate::stripe::{ReporterSettings, ReporterStats, StripeReporter};
use fake_stripe::{FakeStripe, Mode};
use support::RedisServer;
use tokio::sync::watch;
use tokio::task::JoinHandle;

const SECRET_KEY: &str = "sk_test_creditgate";
const METER: &str = "creditgate_usage";
const CUSTOMER: &str = "cus_Test123";
const ACCOUNT: &str = "acme";
/// 2026-05-14T10:00:00Z
const T0_MS: i64 = 1_778_752_800_000;
const WAIT: Duration = Duration::from_secs(20);

struct Setup {
    server: RedisServer,
    ledger: Arc<RedisLedger>,
    fake: FakeStripe,
    clock: Arc<FakeClock>,
}

async fn setup() -> Setup {
    let server = RedisServer::start();
    let ledger = Arc::new(
        RedisLedger::new(&server.url(), Duration::from_millis(500)).expect("valid redis url"),
    );
    let clock = Arc::new(FakeClock::at(T0_MS));
    // The fake judges meter-event timestamps by the clock that stamps the charges.
    let fake = FakeStripe::start_with_clock(clock.clone()).await;
    Setup {
        server,
        ledger,
        fake,
        clock,
    }
}

fn test_settings(consumer: &str) -> ReporterSettings {
    ReporterSettings {
        consumer: consumer.to_string(),
        lease: Duration::from_secs(600),
        claim_idle: Duration::from_secs(2),
        claim_every: Duration::from_millis(200),
        batch: 8,
        max_held: 64,
        concurrency: 4,
        block: Duration::from_millis(100),
        recheck: Duration::from_millis(100),
        backoff_min: Duration::from_millis(50),
        backoff_max: Duration::from_millis(300),
        request_timeout: Duration::from_millis(600),
        command_timeout: Duration::from_millis(500),
        gauges_every: Duration::from_millis(200),
    }
}

/// A running worker: stop it to wait for its end.
struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    stats: Arc<ReporterStats>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the reporter stops within 10 s")
            .expect("the reporter task does not panic");
    }
}

fn start_worker(s: &Setup, consumer: &str) -> Running {
    start_worker_with(s, test_settings(consumer))
}

fn start_worker_with(s: &Setup, settings: ReporterSettings) -> Running {
    let config = StripeConfig {
        enabled: true,
        api_base: s.fake.api_base(),
        meter_event_name: METER.into(),
        ..StripeConfig::default()
    };
    let clock: SharedClock = s.clock.clone();
    let reporter = StripeReporter::new(&s.server.url(), &config, SECRET_KEY, clock)
        .expect("reporter builds")
        .with_settings(settings);
    let stats = reporter.stats();
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(async move { reporter.run(shutdown).await });
    Running { stop, task, stats }
}

/// Reserves `amount_micro` of pay-per-use spend reported to Stripe; `limit_micro` caps the
/// month. Answers whether it was reserved.
async fn reserve(s: &Setup, rid: &str, amount_micro: u64, limit_micro: u64) -> bool {
    let now = s.clock.now_ms();
    let r = SpendReservation {
        account_id: ACCOUNT.into(),
        reservation_id: rid.into(),
        month: period::month_key(now),
        limit_micro,
        amount_micro,
        meta: ChargeMeta {
            operation: "product-enhancement".into(),
            model: "nano-banana-pro".into(),
            quantity: 1,
            unit_amount: amount_micro,
            catalog_version: 1,
            created_ms: now,
        },
        report: Some(StripeReport {
            customer_id: CUSTOMER.into(),
            value: amount_micro,
        }),
        record_ttl_ms: 7 * 24 * 3600 * 1000,
        lease_until_ms: now + 24 * 3600 * 1000,
    };
    match s.ledger.reserve_spend(&r).await.expect("store answers") {
        SpendReserveOutcome::Reserved { .. } => true,
        SpendReserveOutcome::LimitReached { .. } => false,
    }
}

/// A settled charge: reserved, then settled with `refund`.
async fn charge(s: &Setup, rid: &str, amount_micro: u64, refund: u64) {
    assert!(
        reserve(s, rid, amount_micro, u64::MAX / 2).await,
        "{rid} reserved"
    );
    let settled = s
        .ledger
        .settle(ACCOUNT, rid, refund)
        .await
        .expect("settles");
    assert_eq!(settled, SettleOutcome::Settled);
}

async fn redis_conn(s: &Setup) -> redis::aio::MultiplexedConnection {
    redis::Client::open(s.server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis connection")
}

async fn xlen(s: &Setup, key: &str) -> u64 {
    let mut conn = redis_conn(s).await;
    redis::cmd("XLEN")
        .arg(key)
        .query_async(&mut conn)
        .await
        .expect("XLEN")
}

/// Polls `cond` every 20 ms until it holds, or fails the test after `WAIT`.
async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every accepted identifier exactly once, and exactly the expected ones.
fn assert_delivered_once(fake: &FakeStripe, expected: &[String]) {
    let accepted = fake.accepted();
    let mut seen = HashSet::new();
    for event in &accepted {
        assert!(
            seen.insert(event.identifier.clone()),
            "{} delivered twice",
            event.identifier
        );
    }
    let want: HashSet<String> = expected.iter().cloned().collect();
    assert_eq!(seen, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_charge_is_delivered_once_with_its_identifier_and_integer_value() {
    let s = setup().await;
    // 54_000 µ$ = $0.054 (Ideogram V3 Turbo); one charge of 3 images with one refunded.
    let mut expected = BTreeMap::new();
    for i in 0..5u64 {
        let rid = format!("rsv-{i}");
        charge(&s, &rid, 54_000 * (i + 1), 0).await;
        expected.insert(rid, 54_000 * (i + 1));
    }
    charge(&s, "rsv-partial", 3 * 121_000, 121_000).await;
    expected.insert("rsv-partial".into(), 2 * 121_000);
    assert_eq!(xlen(&s, "cg:outbox").await, 6);

    let worker = start_worker(&s, "w1");
    eventually("six meter events", || async {
        s.fake.accepted().len() >= 6
    })
    .await;
    eventually("the outbox drained", || async {
        xlen(&s, "cg:outbox").await == 0
    })
    .await;
    let stats = worker.stats.snapshot();
    worker.stop().await;

    let ids: Vec<String> = expected.keys().cloned().collect();
    assert_delivered_once(&s.fake, &ids);
    for event in s.fake.accepted() {
        assert_eq!(event.event_name, METER);
        assert_eq!(event.customer, CUSTOMER);
        let value: u64 = event.value.parse().expect("an integer value");
        assert_eq!(value, expected[&event.identifier], "{}", event.identifier);
        assert_eq!(event.timestamp, (T0_MS / 1000).to_string());
        assert_eq!(
            event.authorization.as_deref(),
            Some(format!("Bearer {SECRET_KEY}").as_str())
        );
        assert_eq!(s.fake.attempts_for(&event.identifier), 1);
    }
    assert_eq!(stats.delivered, 6);
    assert_eq!(stats.retries, 0);
    assert_eq!(xlen(&s, "cg:outbox:dead").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stripe_outage_delays_delivery_but_loses_nothing() {
    let s = setup().await;
    s.fake.set_mode(Mode::Failing(500));
    let worker = start_worker(&s, "w1");
    let mut rids = Vec::new();
    for i in 0..10 {
        let rid = format!("out-{i}");
        charge(&s, &rid, 72_000, 0).await;
        rids.push(rid);
    }
    eventually("several failed attempts", || async {
        s.fake.attempts().len() >= 3
    })
    .await;
    assert!(s.fake.accepted().is_empty());
    assert_eq!(
        xlen(&s, "cg:outbox").await,
        10,
        "nothing leaves the outbox while Stripe is down"
    );

    s.fake.set_mode(Mode::Up);
    eventually("all ten delivered", || async {
        s.fake.accepted().len() >= 10
    })
    .await;
    eventually("the outbox drained", || async {
        xlen(&s, "cg:outbox").await == 0
    })
    .await;
    let stats = worker.stats.snapshot();
    worker.stop().await;
    assert_delivered_once(&s.fake, &rids);
    assert!(stats.retries >= 1, "{stats:?}");
    assert_eq!(stats.delivered, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_restarted_during_an_outage_delivers_everything_once() {
    let s = setup().await;
    s.fake.set_mode(Mode::Failing(503));
    let first = start_worker(&s, "before-restart");
    let mut rids = Vec::new();
    for i in 0..10 {
        let rid = format!("restart-{i}");
        charge(&s, &rid, 95_000, 0).await;
        rids.push(rid);
    }
    eventually("the first worker tried", || async {
        !s.fake.attempts().is_empty()
    })
    .await;
    // Let it read every entry into its pending list, then stop it mid-outage.
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.stop().await;
    assert!(s.fake.accepted().is_empty());
    assert_eq!(xlen(&s, "cg:outbox").await, 10);
    // All ten are pending with the stopped consumer: only a take-over can deliver them.
    let mut conn = redis_conn(&s).await;
    let pending: redis::streams::StreamPendingCountReply = redis::cmd("XPENDING")
        .arg("cg:outbox")
        .arg("stripe")
        .arg("-")
        .arg("+")
        .arg(100)
        .query_async(&mut conn)
        .await
        .expect("XPENDING");
    assert_eq!(pending.ids.len(), 10);
    assert!(pending.ids.iter().all(|p| p.consumer == "before-restart"));

    // A new process: another consumer name, which must take the entries over.
    let second = start_worker(&s, "after-restart");
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.fake.set_mode(Mode::Up);
    eventually("all ten delivered", || async {
        s.fake.accepted().len() >= 10
    })
    .await;
    eventually("the outbox drained", || async {
        xlen(&s, "cg:outbox").await == 0
    })
    .await;
    let stats = second.stats.snapshot();
    second.stop().await;
    assert_delivered_once(&s.fake, &rids);
    assert_eq!(stats.delivered, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_identifier_answer_is_acknowledged_not_retried() {
    let s = setup().await;
    s.fake.preload("dup-1");
    charge(&s, "dup-1", 54_000, 0).await;
    charge(&s, "fresh-1", 54_000, 0).await;
    let worker = start_worker(&s, "w1");
    eventually("the outbox drained", || async {
        xlen(&s, "cg:outbox").await == 0
    })
    .await;
    // Give a retry loop every chance to show itself.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = worker.stats.snapshot();
    worker.stop().await;
    assert_eq!(s.fake.attempts_for("dup-1"), 1);
    assert_eq!(s.fake.attempts_for("fresh-1"), 1);
    assert_delivered_once(&s.fake, &["fresh-1".to_string()]);
    assert_eq!(stats.duplicate, 1);
    assert_eq!(stats.delivered, 1);
    assert_eq!(stats.retries, 0);
    assert_eq!(xlen(&s, "cg:outbox:dead").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunded_and_void_charges_are_not_reported() {
    let s = setup().await;
    // Fully refunded (the upstream failed).
    charge(&s, "refunded", 108_000, 108_000).await;
    // Over the spending limit: refused, compensated, its outbox entry removed.
    assert!(reserve(&s, "small", 10_000, 50_000).await);
    assert!(!reserve(&s, "over-limit", 100_000, 50_000).await);
    s.ledger.settle(ACCOUNT, "small", 0).await.expect("settles");
    // A void record whose entry is still in the stream (the worker read it before the
    // compensation removed it).
    assert!(reserve(&s, "voided", 20_000, u64::MAX / 2).await);
    let mut conn = redis_conn(&s).await;
    let () = redis::cmd("HSET")
        .arg("cg:{a:acme}:rsv:voided")
        .arg("state")
        .arg("void")
        .query_async(&mut conn)
        .await
        .expect("HSET");

    let worker = start_worker(&s, "w1");
    eventually("the outbox drained", || async {
        xlen(&s, "cg:outbox").await == 0
    })
    .await;
    let stats = worker.stats.snapshot();
    worker.stop().await;
    assert_delivered_once(&s.fake, &["small".to_string()]);
    assert_eq!(s.fake.attempts().len(), 1, "nothing else was even sent");
    assert_eq!(stats.skipped, 2, "{stats:?}");
    assert_eq!(stats.delivered, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsettled_charge_waits_for_its_settlement_or_the_sweeper() {
    let s = setup().await;
    assert!(reserve(&s, "in-flight", 61_000, u64::MAX / 2).await);
    let worker = start_worker(&s, "w1");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(s.fake.attempts().is_empty(), "not sent before settlement");
    s.ledger
        .settle(ACCOUNT, "in-flight", 0)
        .await
        .expect("settles");
    eventually("delivered after settlement", || async {
        s.fake.accepted().len() == 1
    })
    .await;

    // A charge whose gateway died before settling: not sent on age alone; the sweeper settles
    // it after its lease by the orphan policy, then it is reported net of that.
    assert!(reserve(&s, "orphan", 61_000, u64::MAX / 2).await);
    tokio::time::sleep(Duration::from_millis(400)).await;
    s.clock.advance_ms(601_000);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(s.fake.attempts_for("orphan"), 0, "unsettled: not sent");
    let after_lease = s.clock.now_ms() + 2 * 24 * 3600 * 1000;
    let swept = s
        .ledger
        .sweep(after_lease, OrphanPolicy::Keep, 100)
        .await
        .expect("sweeps");
    assert_eq!(swept.orphans, 1, "{swept:?}");
    eventually("the kept orphan delivered", || async {
        s.fake.accepted().len() == 2
    })
    .await;
    // Under the refund policy an orphan is given back and never reported.
    assert!(reserve(&s, "refunded-orphan", 61_000, u64::MAX / 2).await);
    let swept = s
        .ledger
        .sweep(after_lease, OrphanPolicy::Refund, 100)
        .await
        .expect("sweeps");
    assert_eq!(swept.orphans, 1, "{swept:?}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    worker.stop().await;
    assert_eq!(s.fake.attempts_for("refunded-orphan"), 0);
    let orphan = s
        .fake
        .accepted()
        .into_iter()
        .find(|e| e.identifier == "orphan")
        .expect("orphan delivered");
    assert_eq!(orphan.value, "61000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_never_both_deliver_an_entry() {
    let s = setup().await;
    s.fake.set_delay(Duration::from_millis(15));
    let a = start_worker(&s, "worker-a");
    let b = start_worker(&s, "worker-b");
    let mut rids = Vec::new();
    for i in 0..40 {
        let rid = format!("pair-{i}");
        charge(&s, &rid, 54_000, 0).await;
        rids.push(rid);
    }
    eventually("all forty delivered", || async {
        s.fake.accepted().len() >= 40
    })
    .await;
    eventually("the outbox drained", || async {
        xlen(&s, "cg:outbox").await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (sa, sb) = (a.stats.snapshot(), b.stats.snapshot());
    a.stop().await;
    b.stop().await;
    assert_delivered_once(&s.fake, &rids);
    for rid in &rids {
        assert_eq!(s.fake.attempts_for(rid), 1, "{rid} was sent more than once");
    }
    assert_eq!(sa.delivered + sb.delivered, 40, "{sa:?} {sb:?}");
    assert_eq!(sa.duplicate + sb.duplicate, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_stripe_take_overs_between_workers_never_send_twice() {
    let s = setup().await;
    // Each answer takes 400 ms and each worker sends two at a time, so entries wait in a
    // worker's pending list past `claim_idle` (2 s) and the other worker claims them: the
    // ownership check must keep the first from sending those.
    s.fake.set_delay(Duration::from_millis(400));
    let mut rids = Vec::new();
    for i in 0..24 {
        let rid = format!("slow-{i}");
        charge(&s, &rid, 54_000, 0).await;
        rids.push(rid);
    }
    let narrow = |name: &str| ReporterSettings {
        concurrency: 2,
        batch: 32,
        ..test_settings(name)
    };
    // The first worker reads all 24 at once; the second starts when they are its.
    let a = start_worker_with(&s, narrow("slow-a"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = start_worker_with(&s, narrow("slow-b"));
    eventually("all delivered", || async { s.fake.accepted().len() >= 24 }).await;
    eventually("the outbox drained", || async {
        xlen(&s, "cg:outbox").await == 0
    })
    .await;
    let (sa, sb) = (a.stats.snapshot(), b.stats.snapshot());
    a.stop().await;
    b.stop().await;
    assert_delivered_once(&s.fake, &rids);
    for rid in &rids {
        assert_eq!(s.fake.attempts_for(rid), 1, "{rid} was sent more than once");
    }
    assert_eq!(sa.delivered + sb.delivered, 24, "{sa:?} {sb:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_is_retried_after_its_retry_after() {
    let s = setup().await;
    s.fake.set_mode(Mode::RateLimitedOnce { retry_after_s: 1 });
    charge(&s, "limited", 54_000, 0).await;
    let worker = start_worker(&s, "w1");
    eventually("delivered", || async { s.fake.accepted().len() == 1 }).await;
    let stats = worker.stats.snapshot();
    worker.stop().await;
    let attempts = s.fake.attempts();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[0].status, 429);
    assert_eq!(attempts[1].status, 200);
    let gap = attempts[1].at.duration_since(attempts[0].at);
    assert!(gap >= Duration::from_millis(950), "retried after {gap:?}");
    assert_eq!(stats.retries, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_event_is_dead_lettered_and_counted() {
    let s = setup().await;
    s.fake
        .reject("refused", 400, "No active meter was found for event_name");
    charge(&s, "refused", 54_000, 0).await;
    charge(&s, "fine", 54_000, 0).await;
    let worker = start_worker(&s, "w1");
    eventually("the outbox drained", || async {
        xlen(&s, "cg:outbox").await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = worker.stats.snapshot();
    worker.stop().await;
    assert_eq!(s.fake.attempts_for("refused"), 1);
    assert_delivered_once(&s.fake, &["fine".to_string()]);
    assert_eq!(stats.dead_lettered, 1);
    let mut conn = redis_conn(&s).await;
    let dead: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg("cg:outbox:dead")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("XRANGE");
    assert_eq!(dead.ids.len(), 1);
    let entry = &dead.ids[0];
    assert_eq!(entry.get::<String>("rid").as_deref(), Some("refused"));
    let error: String = entry.get("error").expect("an error field");
    assert!(error.contains("No active meter"), "{error}");
    assert!(error.contains("400"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_survive_a_redis_restart() {
    let mut s = setup().await;
    s.fake.set_mode(Mode::Failing(502));
    let worker = start_worker(&s, "w1");
    for i in 0..3 {
        charge(&s, &format!("durable-{i}"), 54_000, 0).await;
    }
    eventually("an attempt", || async { !s.fake.attempts().is_empty() }).await;
    s.server.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.server.start_again();
    s.fake.set_mode(Mode::Up);
    eventually("all three delivered", || async {
        s.fake.accepted().len() >= 3
    })
    .await;
    eventually("the outbox drained", || async {
        xlen(&s, "cg:outbox").await == 0
    })
    .await;
    worker.stop().await;
    let rids: Vec<String> = (0..3).map(|i| format!("durable-{i}")).collect();
    assert_delivered_once(&s.fake, &rids);
}

// ---------------------------------------------------------------------------------------------
// Redis Cluster

/// An account id whose keys live on the master at `port`.
fn account_on(cluster: &support::RedisCluster, port: u16, prefix: &str) -> String {
    (0..10_000)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| cluster.master_of_key(&format!("cg:{{a:{id}}}:acct")) == port)
        .unwrap_or_else(|| panic!("no account id lands on master {port}"))
}

/// One reported pay-per-use charge of `account` through `ledger`.
async fn cluster_charge(ledger: &RedisLedger, clock: &FakeClock, account: &str, rid: &str) {
    let now = clock.now_ms();
    let r = SpendReservation {
        account_id: account.into(),
        reservation_id: rid.into(),
        month: period::month_key(now),
        limit_micro: u64::MAX / 2,
        amount_micro: 54_000,
        meta: ChargeMeta {
            operation: "product-enhancement".into(),
            model: "nano-banana-pro".into(),
            quantity: 1,
            unit_amount: 54_000,
            catalog_version: 1,
            created_ms: now,
        },
        report: Some(StripeReport {
            customer_id: CUSTOMER.into(),
            value: 54_000,
        }),
        record_ttl_ms: 7 * 24 * 3600 * 1000,
        lease_until_ms: now + 24 * 3600 * 1000,
    };
    assert!(matches!(
        ledger.reserve_spend(&r).await.expect("store answers"),
        SpendReserveOutcome::Reserved { .. }
    ));
    assert_eq!(
        ledger.settle(account, rid, 0).await.expect("settles"),
        SettleOutcome::Settled
    );
}

/// On a Redis Cluster each account's charges go to its lane's outbox, in its slot. Two workers
/// walk every lane and deliver each charge exactly once — also the charges of an account whose
/// slot (with its outbox, pending entries and consumer group) moved to another master while
/// they were being delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_every_lane_is_delivered_once_also_across_a_reshard() {
    let cluster = Arc::new(support::RedisCluster::start());
    let seeds = cluster.seed_url();
    let ledger = RedisLedger::new_cluster(&seeds, Duration::from_millis(500)).expect("seeds");
    let clock = Arc::new(FakeClock::at(T0_MS));
    let fake = FakeStripe::start_with_clock(clock.clone()).await;
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);
    let accounts: Vec<String> = masters
        .iter()
        .map(|m| account_on(&cluster, m.port, "ppu"))
        .collect();
    let mut rids = Vec::new();
    for (a, account) in accounts.iter().enumerate() {
        for i in 0..10 {
            let rid = format!("c{a}-{i}");
            cluster_charge(&ledger, &clock, account, &rid).await;
            rids.push(rid);
        }
    }
    assert_eq!(ledger.outbox_len().await.expect("outbox"), 30);

    let config = StripeConfig {
        enabled: true,
        api_base: fake.api_base(),
        meter_event_name: METER.into(),
        ..StripeConfig::default()
    };
    fake.set_delay(Duration::from_millis(30));
    let mut workers = Vec::new();
    for consumer in ["w1", "w2"] {
        let clock: SharedClock = clock.clone();
        let reporter = StripeReporter::for_store(
            creditgate::ledger::StoreNodes::new(&seeds, true),
            &config,
            SECRET_KEY,
            clock,
        )
        .expect("reporter builds")
        .with_settings(test_settings(consumer));
        let stats = reporter.stats();
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(async move { reporter.run(shutdown).await });
        workers.push(Running { stop, task, stats });
    }
    // Move the first account's slot to the next master while its charges are delivered, and
    // charge it more meanwhile.
    let moving = accounts[0].clone();
    let slot = support::cluster::key_slot(&format!("cg:{{a:{moving}}}:acct"));
    let (from, to) = (masters[0].port, masters[1].port);
    let mover = {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || cluster.reshard(from, to, &[slot]))
    };
    for i in 10..20 {
        let rid = format!("c0-{i}");
        cluster_charge(&ledger, &clock, &moving, &rid).await;
        rids.push(rid);
    }
    mover.await.expect("reshard");
    assert_eq!(
        cluster.master_of_key(&format!("cg:{{a:{moving}}}:acct")),
        to
    );

    let want = rids.len();
    eventually("every charge delivered", || async {
        fake.accepted().len() >= want
    })
    .await;
    eventually("every lane drained", || async {
        ledger.outbox_len().await.ok() == Some(0)
    })
    .await;
    for w in workers {
        w.stop().await;
    }
    assert_delivered_once(&fake, &rids);
}
