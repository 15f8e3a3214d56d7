//! The ledger conformance suite: one set of tests, run against both backends — the
//! [`MemoryLedger`] and a [`RedisLedger`] on its own real `redis-server` per test — so both keep
//! the same promises: concurrency never overspends, a missing balance is seeded once, a new
//! period starts at its allowance, refunds apply exactly once, spend stops at the limit, key
//! slots follow creation order and are claimed exactly under concurrency, account changes write
//! only their fields and guarded ones apply only on what they read (and in subscription event
//! order). The Redis backend runs twice: on one `redis-server`, and on a local Redis Cluster of
//! 3 masters + 3 replicas (its own per test), where every account's transactions go to its
//! slot's master and the global keys are written as ordered single-key steps. Redis-only tests
//! below cover outages, durability and the outbox.

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use creditgate::clock::{Clock, FakeClock};
use creditgate::ledger::{
    Account, AccountChange, ChargeMeta, CreditBucket, CreditChange, CreditReservation,
    CreditReserveOutcome, GuardedChange, JobHold, JobPayment, KeyRecord, KeySlotClaim, Ledger,
    MemoryLedger, OrphanPolicy, RedisLedger, SettleOutcome, SpendReservation, SpendReserveOutcome,
    StoreError, StripeReport, SubscriptionEvent, SubscriptionStatus, PAY_PER_USE_PLAN,
};
use creditgate::period;
use support::{RedisCluster, RedisServer};

const COMMAND_TIMEOUT: Duration = Duration::from_millis(200);
const DAY_MS: i64 = 24 * 3600 * 1000;

/// One backend under test. Keeps its redis-server alive as long as the test runs.
struct Backend {
    ledger: Arc<dyn Ledger>,
    server: Option<RedisServer>,
    cluster: Option<RedisCluster>,
}

impl Backend {
    fn memory() -> Self {
        Self {
            ledger: Arc::new(MemoryLedger::new()),
            server: None,
            cluster: None,
        }
    }

    fn redis() -> Self {
        let server = RedisServer::start();
        let ledger = RedisLedger::new(&server.url(), COMMAND_TIMEOUT).expect("valid url");
        Self {
            ledger: Arc::new(ledger),
            server: Some(server),
            cluster: None,
        }
    }

    fn cluster() -> Self {
        let cluster = RedisCluster::start();
        let ledger =
            RedisLedger::new_cluster(&cluster.seed_url(), COMMAND_TIMEOUT).expect("valid seeds");
        Self {
            ledger: Arc::new(ledger),
            server: None,
            cluster: Some(cluster),
        }
    }

    /// A second gateway instance on the same store: for Redis, its own ledger and connection.
    fn another_instance(&self) -> Arc<dyn Ledger> {
        if let Some(cluster) = &self.cluster {
            return Arc::new(
                RedisLedger::new_cluster(&cluster.seed_url(), COMMAND_TIMEOUT)
                    .expect("valid seeds"),
            );
        }
        match &self.server {
            Some(server) => {
                Arc::new(RedisLedger::new(&server.url(), COMMAND_TIMEOUT).expect("valid url"))
            }
            None => self.ledger.clone(),
        }
    }
}

/// Generates `on_memory::<test>`, `on_redis::<test>` and `on_cluster::<test>` for every
/// conformance test below.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod on_memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::memory()).await;
                }
            )*
        }
        mod on_redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::redis()).await;
                }
            )*
        }
        mod on_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::cluster()).await;
                }
            )*
        }
    };
}

conformance!(
    concurrent_reservations_never_overspend,
    concurrent_reservations_across_two_instances,
    missing_balance_is_seeded_once,
    new_period_starts_at_allowance_without_rollover,
    refund_applies_exactly_once,
    concurrent_refunds_apply_exactly_once,
    partial_refund_is_exact_and_clamped,
    settle_unknown_reservation,
    settle_without_refund_keeps_the_charge,
    spend_stops_exactly_at_the_limit,
    spend_refund_and_refused_spend,
    grants_and_resets,
    key_slots_follow_creation_order_after_revocation,
    create_account_twice,
    concurrent_creates_make_one_account,
    free_signup_bucket_is_granted_once,
    change_account_writes_only_named_fields,
    concurrent_key_claims_fill_exactly_the_free_slots,
    two_hundred_concurrent_claims_fill_exactly_the_free_slots,
    guarded_change_refuses_a_stale_read,
    concurrent_upgrades_add_the_difference_once,
    subscription_events_apply_in_created_order,
    concurrent_field_writers_lose_nothing,
    odd_account_ids_stay_separate,
    idempotency_keys_are_claimed_once_per_account,
    spending_limit_changes_only_the_limit,
    sweep_settles_orphans_by_policy_once,
    sweep_leaves_settled_and_live_holds_alone,
    concurrent_sweeps_refund_an_orphan_once,
    a_job_hold_is_found_by_its_account_and_swept_only_after_the_job_ttl,
    recording_a_job_does_not_revive_a_settled_hold,
);

// ---------------------------------------------------------------------------------------------
// Builders

fn account(id: &str, plan: &str) -> Account {
    Account {
        id: id.to_string(),
        plan: plan.to_string(),
        status: SubscriptionStatus::Active,
        period_anchor_ms: ms("2031-05-01T00:00:00Z"),
        pay_per_use: plan == PAY_PER_USE_PLAN,
        spending_limit_cents: 5000,
        stripe_customer_id: None,
        created_ms: ms("2031-04-01T00:00:00Z"),
    }
}

fn bucket(id: &str, allowance: u64) -> CreditBucket {
    CreditBucket {
        id: id.to_string(),
        allowance,
        expires_at_ms: None,
    }
}

fn meta(quantity: u64, unit_amount: u64) -> ChargeMeta {
    ChargeMeta {
        operation: "product-enhancement".to_string(),
        model: "nano-banana-pro".to_string(),
        quantity,
        unit_amount,
        catalog_version: 1,
        created_ms: ms("2031-04-15T00:00:00Z"),
    }
}

fn credits(account_id: &str, rid: &str, bucket: &CreditBucket, amount: u64) -> CreditReservation {
    CreditReservation {
        account_id: account_id.to_string(),
        reservation_id: rid.to_string(),
        bucket: bucket.clone(),
        amount,
        meta: meta(1, amount),
        record_ttl_ms: DAY_MS,
        lease_until_ms: i64::MAX,
    }
}

fn spend(account_id: &str, rid: &str, limit: u64, amount: u64) -> SpendReservation {
    SpendReservation {
        account_id: account_id.to_string(),
        reservation_id: rid.to_string(),
        month: "203104".to_string(),
        limit_micro: limit,
        amount_micro: amount,
        meta: meta(1, amount),
        report: Some(StripeReport {
            customer_id: "cus_test".to_string(),
            value: amount,
        }),
        record_ttl_ms: DAY_MS,
        lease_until_ms: i64::MAX,
    }
}

fn key(id: &str, account_id: &str) -> KeyRecord {
    KeyRecord {
        id: id.to_string(),
        account_id: account_id.to_string(),
        prefix: format!("at_live_{id}"),
        name: Some(format!("key {id}")),
        created_ms: ms("2031-04-01T00:00:00Z"),
        revoked: false,
    }
}

fn ms(text: &str) -> i64 {
    period::parse_timestamp_ms(text).expect("valid timestamp")
}

async fn reserved(ledger: &dyn Ledger, r: &CreditReservation) -> u64 {
    match ledger.reserve_credits(r).await.expect("store answers") {
        CreditReserveOutcome::Reserved { remaining } => remaining,
        other => panic!("expected a reservation, got {other:?}"),
    }
}

/// Reads the balance in a loop until told to stop; returns every sample.
fn sample_balance(
    ledger: Arc<dyn Ledger>,
    account_id: &str,
    bucket: &CreditBucket,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<u64>> {
    let account_id = account_id.to_string();
    let bucket = bucket.clone();
    tokio::spawn(async move {
        let mut samples = Vec::new();
        loop {
            samples.push(
                ledger
                    .credit_balance(&account_id, &bucket)
                    .await
                    .expect("balance"),
            );
            if stop.load(Ordering::SeqCst) {
                return samples;
            }
            tokio::task::yield_now().await;
        }
    })
}

/// 200 reservations of 3 credits against 100, spread over `ledgers` in turn.
async fn race_for_credits(ledgers: &[Arc<dyn Ledger>], account_id: &str) {
    let bkt = bucket("p-race", 100);
    ledgers[0]
        .reset_credits(account_id, &bkt, 100)
        .await
        .expect("reset");
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = sample_balance(ledgers[0].clone(), account_id, &bkt, stop.clone());
    let mut tasks = Vec::new();
    for i in 0..200 {
        let ledger = ledgers[i % ledgers.len()].clone();
        let r = credits(account_id, &format!("race-{i}"), &bkt, 3);
        tasks.push(tokio::spawn(
            async move { ledger.reserve_credits(&r).await },
        ));
    }
    let mut remaining = BTreeSet::new();
    let mut refused = 0;
    for task in tasks {
        match task.await.expect("task").expect("store answers") {
            CreditReserveOutcome::Reserved { remaining: left } => {
                assert!(remaining.insert(left), "two reservations saw {left} left");
            }
            CreditReserveOutcome::Insufficient { available } => {
                assert!(available < 3, "refused with {available} available");
                refused += 1;
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    let samples = sampler.await.expect("sampler");
    assert_eq!(
        remaining.len(),
        33,
        "exactly floor(100/3) reservations succeed"
    );
    assert_eq!(refused, 167);
    // Each success saw a distinct balance: 97, 94, …, 1 — none went below zero.
    let expected: BTreeSet<u64> = (1..=33).map(|k| 100 - 3 * k).collect();
    assert_eq!(remaining, expected);
    assert!(!samples.is_empty());
    assert!(
        samples.iter().all(|&s| s <= 100),
        "a sample above the start"
    );
    for ledger in ledgers {
        assert_eq!(
            ledger
                .credit_balance(account_id, &bkt)
                .await
                .expect("balance"),
            1
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The suite

async fn concurrent_reservations_never_overspend(b: Backend) {
    race_for_credits(std::slice::from_ref(&b.ledger), "acct-race").await;
}

async fn concurrent_reservations_across_two_instances(b: Backend) {
    let second = b.another_instance();
    race_for_credits(&[b.ledger.clone(), second], "acct-race2").await;
}

async fn missing_balance_is_seeded_once(b: Backend) {
    let bkt = bucket("p-fresh", 500);
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let ledger = b.ledger.clone();
            let r = credits("acct-seed", &format!("seed-{i}"), &bkt, 2);
            tokio::spawn(async move { ledger.reserve_credits(&r).await })
        })
        .collect();
    for task in tasks {
        let outcome = task.await.expect("task").expect("store answers");
        assert!(
            matches!(outcome, CreditReserveOutcome::Reserved { .. }),
            "{outcome:?}"
        );
    }
    let left = b
        .ledger
        .credit_balance("acct-seed", &bkt)
        .await
        .expect("balance");
    assert_eq!(left, 500 - 50 * 2);
}

async fn new_period_starts_at_allowance_without_rollover(b: Backend) {
    let clock = FakeClock::at(ms("2031-04-20T12:00:00Z"));
    let anchor = ms("2031-05-01T00:00:00Z");
    let grace = 7 * DAY_MS;
    let bucket_at = |now: i64| {
        let p = period::current_period(anchor, now).expect("period");
        (
            p,
            CreditBucket {
                id: p.id(),
                allowance: 100,
                expires_at_ms: Some(p.end_ms + grace),
            },
        )
    };
    let (p1, b1) = bucket_at(clock.now_ms());
    assert_eq!(
        reserved(&*b.ledger, &credits("acct-roll", "roll-1", &b1, 30)).await,
        70
    );

    clock.set(ms("2031-05-02T00:00:00Z"));
    let (p2, b2) = bucket_at(clock.now_ms());
    assert_eq!(p2.start_ms, p1.end_ms);
    assert_ne!(b1.id, b2.id);
    assert_eq!(
        b.ledger
            .credit_balance("acct-roll", &b2)
            .await
            .expect("balance"),
        100
    );

    // Many first reservations of the new period: the bucket starts at 100 once (not 170, not
    // 100 per request).
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let ledger = b.ledger.clone();
            let r = credits("acct-roll", &format!("roll-2-{i}"), &b2, 5);
            tokio::spawn(async move { ledger.reserve_credits(&r).await })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        if let CreditReserveOutcome::Reserved { .. } = task.await.expect("task").expect("store") {
            ok += 1;
        }
    }
    assert_eq!(ok, 20);
    assert_eq!(
        b.ledger
            .credit_balance("acct-roll", &b2)
            .await
            .expect("balance"),
        0
    );
    // The old period is untouched by the new one.
    assert_eq!(
        b.ledger
            .credit_balance("acct-roll", &b1)
            .await
            .expect("balance"),
        70
    );
}

async fn refund_applies_exactly_once(b: Backend) {
    let bkt = bucket("p-refund", 100);
    assert_eq!(
        reserved(&*b.ledger, &credits("acct-ref", "ref-1", &bkt, 10)).await,
        90
    );
    let mut settled = 0;
    for _ in 0..10 {
        match b
            .ledger
            .settle("acct-ref", "ref-1", 10)
            .await
            .expect("settle")
        {
            SettleOutcome::Settled => settled += 1,
            SettleOutcome::AlreadySettled => {}
            SettleOutcome::Unknown => panic!("reservation unknown"),
        }
    }
    assert_eq!(settled, 1);
    assert_eq!(
        b.ledger
            .credit_balance("acct-ref", &bkt)
            .await
            .expect("balance"),
        100
    );
}

async fn concurrent_refunds_apply_exactly_once(b: Backend) {
    let bkt = bucket("p-refund", 100);
    let second = b.another_instance();
    for round in 0..3 {
        let rid = format!("cref-{round}");
        assert_eq!(
            reserved(&*b.ledger, &credits("acct-cref", &rid, &bkt, 10)).await,
            90
        );
        let tasks: Vec<_> = (0..10)
            .map(|i| {
                let ledger = if i % 2 == 0 {
                    b.ledger.clone()
                } else {
                    second.clone()
                };
                let rid = rid.clone();
                tokio::spawn(async move { ledger.settle("acct-cref", &rid, 10).await })
            })
            .collect();
        let mut settled = 0;
        for task in tasks {
            match task.await.expect("task").expect("settle") {
                SettleOutcome::Settled => settled += 1,
                SettleOutcome::AlreadySettled => {}
                SettleOutcome::Unknown => panic!("reservation unknown"),
            }
        }
        assert_eq!(settled, 1);
        assert_eq!(
            b.ledger
                .credit_balance("acct-cref", &bkt)
                .await
                .expect("balance"),
            100
        );
    }
}

async fn partial_refund_is_exact_and_clamped(b: Backend) {
    let bkt = bucket("p-partial", 100);
    // 3 images at 3 credits, 2 generated: 3 come back.
    let mut r = credits("acct-part", "part-1", &bkt, 9);
    r.meta = meta(3, 3);
    assert_eq!(reserved(&*b.ledger, &r).await, 91);
    assert_eq!(
        b.ledger
            .settle("acct-part", "part-1", 3)
            .await
            .expect("settle"),
        SettleOutcome::Settled
    );
    assert_eq!(
        b.ledger
            .credit_balance("acct-part", &bkt)
            .await
            .expect("balance"),
        94
    );
    // A refund above the reserved amount gives back only what was reserved.
    assert_eq!(
        reserved(&*b.ledger, &credits("acct-part", "part-2", &bkt, 6)).await,
        88
    );
    assert_eq!(
        b.ledger
            .settle("acct-part", "part-2", 1000)
            .await
            .expect("settle"),
        SettleOutcome::Settled
    );
    assert_eq!(
        b.ledger
            .credit_balance("acct-part", &bkt)
            .await
            .expect("balance"),
        94
    );
}

async fn settle_unknown_reservation(b: Backend) {
    let bkt = bucket("p-unknown", 100);
    for _ in 0..2 {
        assert_eq!(
            b.ledger
                .settle("acct-unk", "never-made", 5)
                .await
                .expect("settle"),
            SettleOutcome::Unknown
        );
    }
    // A reservation of another account is not this account's.
    assert_eq!(
        reserved(&*b.ledger, &credits("acct-unk-2", "theirs", &bkt, 5)).await,
        95
    );
    assert_eq!(
        b.ledger
            .settle("acct-unk", "theirs", 5)
            .await
            .expect("settle"),
        SettleOutcome::Unknown
    );
    // A refused reservation is not a reservation.
    let refused = credits("acct-unk-2", "too-big", &bkt, 1000);
    assert_eq!(
        b.ledger.reserve_credits(&refused).await.expect("reserve"),
        CreditReserveOutcome::Insufficient { available: 95 }
    );
    assert_eq!(
        b.ledger
            .settle("acct-unk-2", "too-big", 1000)
            .await
            .expect("settle"),
        SettleOutcome::Unknown
    );
    assert_eq!(
        b.ledger
            .credit_balance("acct-unk-2", &bkt)
            .await
            .expect("balance"),
        95
    );
    assert_eq!(
        b.ledger
            .credit_balance("acct-unk", &bkt)
            .await
            .expect("balance"),
        100
    );
}

async fn settle_without_refund_keeps_the_charge(b: Backend) {
    let bkt = bucket("p-keep", 10);
    assert_eq!(
        reserved(&*b.ledger, &credits("acct-keep", "keep-1", &bkt, 3)).await,
        7
    );
    assert_eq!(
        b.ledger
            .settle("acct-keep", "keep-1", 0)
            .await
            .expect("settle"),
        SettleOutcome::Settled
    );
    // A later refund attempt (e.g. a retried logging phase) changes nothing.
    assert_eq!(
        b.ledger
            .settle("acct-keep", "keep-1", 3)
            .await
            .expect("settle"),
        SettleOutcome::AlreadySettled
    );
    assert_eq!(
        b.ledger
            .credit_balance("acct-keep", &bkt)
            .await
            .expect("balance"),
        7
    );
}

async fn spend_stops_exactly_at_the_limit(b: Backend) {
    let limit = 500_000;
    let second = b.another_instance();
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let ledger = if i % 2 == 0 {
                b.ledger.clone()
            } else {
                second.clone()
            };
            let r = spend("acct-ppu", &format!("ppu-{i}"), limit, 72_000);
            tokio::spawn(async move { ledger.reserve_spend(&r).await })
        })
        .collect();
    let mut spent_seen = BTreeSet::new();
    for task in tasks {
        match task.await.expect("task").expect("store answers") {
            SpendReserveOutcome::Reserved { spent_micro } => {
                assert!(spent_micro <= limit);
                assert!(spent_seen.insert(spent_micro));
            }
            SpendReserveOutcome::LimitReached { spent_micro } => {
                assert!(spent_micro + 72_000 > limit, "refused at {spent_micro}");
            }
        }
    }
    let expected: BTreeSet<u64> = (1..=6).map(|k| 72_000 * k).collect();
    assert_eq!(
        spent_seen, expected,
        "exactly floor(500000/72000) = 6 charges"
    );
    // Readers may catch a refused INCRBY before its DECRBY (apply-then-compensate); once the
    // reservations have answered, the spend is exactly the accepted charges.
    assert_eq!(
        b.ledger
            .month_spend("acct-ppu", "203104")
            .await
            .expect("spend"),
        432_000
    );
    assert_eq!(
        b.ledger
            .month_spend("acct-ppu", "203105")
            .await
            .expect("spend"),
        0
    );
}

async fn spend_refund_and_refused_spend(b: Backend) {
    let limit = 200_000;
    let r1 = spend("acct-sref", "s-1", limit, 150_000);
    assert_eq!(
        b.ledger.reserve_spend(&r1).await.expect("reserve"),
        SpendReserveOutcome::Reserved {
            spent_micro: 150_000
        }
    );
    let r2 = spend("acct-sref", "s-2", limit, 72_000);
    assert_eq!(
        b.ledger.reserve_spend(&r2).await.expect("reserve"),
        SpendReserveOutcome::LimitReached {
            spent_micro: 150_000
        }
    );
    assert_eq!(
        b.ledger
            .settle("acct-sref", "s-2", 72_000)
            .await
            .expect("settle"),
        SettleOutcome::Unknown
    );
    // The upstream failed: the spend comes back once.
    for expected in [SettleOutcome::Settled, SettleOutcome::AlreadySettled] {
        assert_eq!(
            b.ledger
                .settle("acct-sref", "s-1", 150_000)
                .await
                .expect("settle"),
            expected
        );
    }
    assert_eq!(
        b.ledger
            .month_spend("acct-sref", "203104")
            .await
            .expect("spend"),
        0
    );
    let r3 = spend("acct-sref", "s-3", limit, 72_000);
    assert_eq!(
        b.ledger.reserve_spend(&r3).await.expect("reserve"),
        SpendReserveOutcome::Reserved {
            spent_micro: 72_000
        }
    );
}

async fn grants_and_resets(b: Backend) {
    let bkt = bucket("p-grant", 100);
    assert_eq!(
        b.ledger
            .grant_credits("acct-gr", &bkt, 50)
            .await
            .expect("grant"),
        150
    );
    assert_eq!(
        reserved(&*b.ledger, &credits("acct-gr", "gr-1", &bkt, 10)).await,
        140
    );
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let ledger = b.ledger.clone();
            let bkt = bkt.clone();
            tokio::spawn(async move { ledger.grant_credits("acct-gr", &bkt, 1).await })
        })
        .collect();
    for task in tasks {
        task.await.expect("task").expect("grant");
    }
    assert_eq!(
        b.ledger
            .credit_balance("acct-gr", &bkt)
            .await
            .expect("balance"),
        160
    );
    b.ledger
        .reset_credits("acct-gr", &bkt, 300)
        .await
        .expect("reset");
    assert_eq!(
        b.ledger
            .credit_balance("acct-gr", &bkt)
            .await
            .expect("balance"),
        300
    );
    // A grant into an untouched bucket with an expiry starts from the allowance.
    let later = CreditBucket {
        id: "p-grant-2".to_string(),
        allowance: 700,
        expires_at_ms: Some(ms("2031-07-01T00:00:00Z")),
    };
    assert_eq!(
        b.ledger
            .grant_credits("acct-gr", &later, 5)
            .await
            .expect("grant"),
        705
    );
    assert_eq!(
        b.ledger
            .credit_balance("acct-gr", &later)
            .await
            .expect("balance"),
        705
    );
}

async fn key_slots_follow_creation_order_after_revocation(b: Backend) {
    for (i, id) in ["k1", "k2", "k3"].iter().enumerate() {
        b.ledger
            .insert_key(&format!("hash-{id}"), &key(id, "acct-keys"), 10)
            .await
            .expect("insert");
        assert_eq!(
            b.ledger.key_slot("acct-keys", id).await.expect("slot"),
            Some(i as u64)
        );
    }
    b.ledger
        .insert_key("hash-other", &key("k-other", "acct-other"), 10)
        .await
        .expect("insert");
    assert_eq!(
        b.ledger
            .key_slot("acct-other", "k-other")
            .await
            .expect("slot"),
        Some(0)
    );

    let before = b
        .ledger
        .revoke_key("k2")
        .await
        .expect("revoke")
        .expect("known key");
    assert!(!before.revoked, "revoke returns the key as it was");
    assert_eq!(
        b.ledger.key_slot("acct-keys", "k2").await.expect("slot"),
        None
    );
    assert_eq!(
        b.ledger.key_slot("acct-keys", "k1").await.expect("slot"),
        Some(0)
    );
    assert_eq!(
        b.ledger.key_slot("acct-keys", "k3").await.expect("slot"),
        Some(1)
    );
    let active: Vec<String> = b
        .ledger
        .active_keys("acct-keys")
        .await
        .expect("keys")
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(active, ["k1", "k3"]);

    let k4 = key("k4", "acct-keys");
    assert_eq!(
        b.ledger
            .insert_key("hash-k4", &k4, 10)
            .await
            .expect("insert"),
        KeySlotClaim::Claimed
    );
    assert_eq!(
        b.ledger.key_slot("acct-keys", "k4").await.expect("slot"),
        Some(2)
    );

    let stored = b
        .ledger
        .key_by_hash("hash-k2")
        .await
        .expect("get")
        .expect("kept");
    assert!(stored.revoked);
    assert_eq!(
        b.ledger.key_by_hash("hash-k4").await.expect("get"),
        Some(k4)
    );
    assert_eq!(b.ledger.key_by_hash("hash-none").await.expect("get"), None);
    assert_eq!(b.ledger.revoke_key("nope").await.expect("revoke"), None);
    let again = b
        .ledger
        .revoke_key("k2")
        .await
        .expect("revoke")
        .expect("known");
    assert!(again.revoked);
    assert!(b
        .ledger
        .active_keys("acct-none")
        .await
        .expect("keys")
        .is_empty());
    assert_eq!(
        b.ledger.key_slot("acct-none", "k1").await.expect("slot"),
        None
    );
}

async fn create_account_twice(b: Backend) {
    let first = account("acct-twice", "starter");
    assert!(b.ledger.create_account(&first, None).await.expect("create"));
    let mut second = account("acct-twice", "business");
    second.stripe_customer_id = Some("cus_other".to_string());
    assert!(!b
        .ledger
        .create_account(&second, None)
        .await
        .expect("create"));
    assert_eq!(
        b.ledger.get_account("acct-twice").await.expect("get"),
        Some(first)
    );
    assert_eq!(
        b.ledger.get_account("acct-missing").await.expect("get"),
        None
    );
}

async fn concurrent_creates_make_one_account(b: Backend) {
    let signup = bucket("signup", 10);
    let tasks: Vec<_> = (0..10)
        .map(|i| {
            let ledger = b.ledger.clone();
            let mut a = account("acct-race-create", "free");
            a.created_ms += i;
            let signup = signup.clone();
            tokio::spawn(async move { ledger.create_account(&a, Some(&signup)).await })
        })
        .collect();
    let mut created = 0;
    for task in tasks {
        if task.await.expect("task").expect("create") {
            created += 1;
        }
    }
    assert_eq!(created, 1);
    let stored = b
        .ledger
        .get_account("acct-race-create")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(stored.plan, "free");
    assert_eq!(
        b.ledger
            .credit_balance("acct-race-create", &signup)
            .await
            .expect("balance"),
        10
    );
}

async fn free_signup_bucket_is_granted_once(b: Backend) {
    let signup = bucket("signup", 10);
    let free = account("acct-free", "free");
    assert!(b
        .ledger
        .create_account(&free, Some(&signup))
        .await
        .expect("create"));
    assert_eq!(
        reserved(&*b.ledger, &credits("acct-free", "f-1", &signup, 4)).await,
        6
    );
    assert!(!b
        .ledger
        .create_account(&free, Some(&signup))
        .await
        .expect("create"));
    assert_eq!(
        b.ledger
            .credit_balance("acct-free", &signup)
            .await
            .expect("balance"),
        6
    );

    // An existing account without a signup bucket does not get one from a failed create.
    let ppu = account("acct-ppu-only", PAY_PER_USE_PLAN);
    assert!(b.ledger.create_account(&ppu, None).await.expect("create"));
    let generous = bucket("signup", 99);
    assert!(!b
        .ledger
        .create_account(&account("acct-ppu-only", "free"), Some(&generous))
        .await
        .expect("create"));
    // Untouched: the balance read falls back to the allowance given now.
    assert_eq!(
        b.ledger
            .credit_balance("acct-ppu-only", &bucket("signup", 7))
            .await
            .expect("balance"),
        7
    );
}

async fn change_account_writes_only_named_fields(b: Backend) {
    let a = account("acct-upd", "starter");
    assert!(b.ledger.create_account(&a, None).await.expect("create"));
    let change = AccountChange {
        plan: Some("pro".to_string()),
        status: Some(SubscriptionStatus::PastDue),
        period_anchor_ms: Some(ms("2031-06-15T00:00:00Z")),
        pay_per_use: Some(true),
        spending_limit_cents: Some(123),
        stripe_customer_id: Some("cus_123".to_string()),
    };
    let after = b
        .ledger
        .change_account("acct-upd", &change)
        .await
        .expect("change")
        .expect("exists");
    assert_eq!(after, change.applied_to(&a));
    assert_eq!(after.plan, "pro");
    assert_eq!(after.created_ms, a.created_ms);
    assert_eq!(
        b.ledger.get_account("acct-upd").await.expect("get"),
        Some(after.clone())
    );
    assert_eq!(
        b.ledger
            .account_by_stripe_customer("cus_123")
            .await
            .expect("lookup"),
        Some(after.clone())
    );
    // An empty change writes nothing and answers the account.
    assert_eq!(
        b.ledger
            .change_account("acct-upd", &AccountChange::default())
            .await
            .expect("change"),
        Some(after)
    );
    // No such account: nothing is written (no partial account appears).
    assert_eq!(
        b.ledger
            .change_account("acct-nobody", &change)
            .await
            .expect("change"),
        None
    );
    assert_eq!(
        b.ledger.get_account("acct-nobody").await.expect("get"),
        None
    );
}

async fn odd_account_ids_stay_separate(b: Backend) {
    let bkt = bucket("p-odd", 10);
    for id in ["x}y", "x%7Dy", "{a:x}", "a}b{c"] {
        assert!(b
            .ledger
            .create_account(&account(id, "pro"), None)
            .await
            .expect("create"));
        assert_eq!(reserved(&*b.ledger, &credits(id, "odd", &bkt, 1)).await, 9);
    }
    for id in ["x}y", "x%7Dy", "{a:x}", "a}b{c"] {
        let stored = b
            .ledger
            .get_account(id)
            .await
            .expect("get")
            .expect("exists");
        assert_eq!(stored.id, id);
        assert_eq!(b.ledger.credit_balance(id, &bkt).await.expect("balance"), 9);
    }
}

// ---------------------------------------------------------------------------------------------
// Leases and the sweeper

/// A credit reservation whose lease ends at `lease_until_ms`.
fn leased(
    account_id: &str,
    rid: &str,
    bkt: &CreditBucket,
    amount: u64,
    lease_until_ms: i64,
) -> CreditReservation {
    CreditReservation {
        lease_until_ms,
        ..credits(account_id, rid, bkt, amount)
    }
}

const LEASE_END: i64 = 1_900_000_000_000;

async fn sweep_settles_orphans_by_policy_once(b: Backend) {
    let bkt = bucket("p-orphans", 100);
    // Two holds nobody settles (their gateway died), one per policy's account.
    assert_eq!(
        reserved(
            &*b.ledger,
            &leased("acct-orph-r", "o-1", &bkt, 30, LEASE_END)
        )
        .await,
        70
    );
    assert_eq!(
        reserved(
            &*b.ledger,
            &leased("acct-orph-k", "o-2", &bkt, 30, LEASE_END)
        )
        .await,
        70
    );
    let spend_hold = SpendReservation {
        lease_until_ms: LEASE_END,
        ..spend("acct-orph-r", "o-3", 1_000_000, 72_000)
    };
    assert!(matches!(
        b.ledger.reserve_spend(&spend_hold).await.expect("reserve"),
        SpendReserveOutcome::Reserved { .. }
    ));
    // Before the lease ends nothing is touched.
    let early = b
        .ledger
        .sweep(LEASE_END - 5_000, OrphanPolicy::Refund, 100)
        .await
        .expect("sweep");
    assert_eq!(early.orphans, 0, "{early:?}");
    assert_eq!(
        b.ledger
            .credit_balance("acct-orph-r", &bkt)
            .await
            .expect("balance"),
        70
    );

    let after = LEASE_END + 60_000;
    let refunded = b
        .ledger
        .sweep(after, OrphanPolicy::Refund, 100)
        .await
        .expect("sweep");
    assert_eq!(refunded.orphans, 3, "{refunded:?}");
    assert_eq!(
        b.ledger
            .credit_balance("acct-orph-r", &bkt)
            .await
            .expect("balance"),
        100
    );
    assert_eq!(
        b.ledger
            .month_spend("acct-orph-r", "203104")
            .await
            .expect("spend"),
        0
    );
    assert_eq!(
        b.ledger
            .credit_balance("acct-orph-k", &bkt)
            .await
            .expect("balance"),
        100,
        "refund policy gives both back"
    );
    // Swept once: a second sweep, or a late settlement, changes nothing.
    let again = b
        .ledger
        .sweep(after, OrphanPolicy::Refund, 100)
        .await
        .expect("sweep");
    assert_eq!(again.orphans, 0, "{again:?}");
    assert_eq!(
        b.ledger
            .settle("acct-orph-r", "o-1", 0)
            .await
            .expect("settle"),
        SettleOutcome::AlreadySettled
    );
    assert_eq!(
        b.ledger
            .credit_balance("acct-orph-r", &bkt)
            .await
            .expect("balance"),
        100
    );

    // Under the keep policy an orphan stands as a charge.
    assert_eq!(
        reserved(
            &*b.ledger,
            &leased("acct-orph-k", "o-4", &bkt, 30, LEASE_END)
        )
        .await,
        70
    );
    let kept = b
        .ledger
        .sweep(after, OrphanPolicy::Keep, 100)
        .await
        .expect("sweep");
    assert_eq!(kept.orphans, 1, "{kept:?}");
    assert_eq!(
        b.ledger
            .credit_balance("acct-orph-k", &bkt)
            .await
            .expect("balance"),
        70
    );
    assert_eq!(
        b.ledger
            .sweep(after, OrphanPolicy::Refund, 100)
            .await
            .expect("sweep")
            .orphans,
        0
    );
    assert_eq!(
        b.ledger
            .credit_balance("acct-orph-k", &bkt)
            .await
            .expect("balance"),
        70
    );
}

async fn sweep_leaves_settled_and_live_holds_alone(b: Backend) {
    let bkt = bucket("p-live", 100);
    // Kept (2xx), refunded (upstream failed), and one still in flight with a later lease.
    assert_eq!(
        reserved(&*b.ledger, &leased("acct-live", "l-1", &bkt, 10, LEASE_END)).await,
        90
    );
    assert_eq!(
        reserved(&*b.ledger, &leased("acct-live", "l-2", &bkt, 10, LEASE_END)).await,
        80
    );
    assert_eq!(
        reserved(
            &*b.ledger,
            &leased("acct-live", "l-3", &bkt, 10, LEASE_END + 3_600_000)
        )
        .await,
        70
    );
    assert_eq!(
        b.ledger
            .settle("acct-live", "l-1", 0)
            .await
            .expect("settle"),
        SettleOutcome::Settled
    );
    assert_eq!(
        b.ledger
            .settle("acct-live", "l-2", 10)
            .await
            .expect("settle"),
        SettleOutcome::Settled
    );
    let report = b
        .ledger
        .sweep(LEASE_END + 60_000, OrphanPolicy::Refund, 100)
        .await
        .expect("sweep");
    assert_eq!(report.orphans, 0, "{report:?}");
    assert_eq!(
        b.ledger
            .credit_balance("acct-live", &bkt)
            .await
            .expect("balance"),
        80
    );
    // The in-flight one becomes an orphan only once its own lease is over.
    let later = b
        .ledger
        .sweep(LEASE_END + 3_700_000, OrphanPolicy::Refund, 100)
        .await
        .expect("sweep");
    assert_eq!(later.orphans, 1, "{later:?}");
    assert_eq!(
        b.ledger
            .credit_balance("acct-live", &bkt)
            .await
            .expect("balance"),
        90
    );
}

async fn concurrent_sweeps_refund_an_orphan_once(b: Backend) {
    let bkt = bucket("p-csweep", 1000);
    for i in 0..20 {
        reserved(
            &*b.ledger,
            &leased("acct-csweep", &format!("c-{i}"), &bkt, 7, LEASE_END),
        )
        .await;
    }
    assert_eq!(
        b.ledger
            .credit_balance("acct-csweep", &bkt)
            .await
            .expect("balance"),
        860
    );
    let second = b.another_instance();
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let ledger = if i % 2 == 0 {
                b.ledger.clone()
            } else {
                second.clone()
            };
            tokio::spawn(async move {
                ledger
                    .sweep(LEASE_END + 60_000, OrphanPolicy::Refund, 100)
                    .await
            })
        })
        .collect();
    let mut orphans = 0;
    for t in tasks {
        orphans += t.await.expect("task").expect("sweep").orphans;
    }
    assert_eq!(orphans, 20, "each orphan claimed by exactly one sweep");
    assert_eq!(
        b.ledger
            .credit_balance("acct-csweep", &bkt)
            .await
            .expect("balance"),
        1000
    );
}

// ---------------------------------------------------------------------------------------------
// Redis only

fn redis_ledger(server: &RedisServer) -> Arc<RedisLedger> {
    Arc::new(RedisLedger::new(&server.url(), COMMAND_TIMEOUT).expect("valid url"))
}

async fn raw_connection(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

/// Asserts the call fails with a store error, well within twice the command timeout.
async fn fails_fast<T: std::fmt::Debug>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Duration {
    let started = Instant::now();
    let result = tokio::time::timeout(COMMAND_TIMEOUT * 10, call)
        .await
        .unwrap_or_else(|_| panic!("{what}: hung for 10x the command timeout"));
    let took = started.elapsed();
    assert!(
        matches!(
            result,
            Err(StoreError::Unavailable(_) | StoreError::Timeout)
        ),
        "{what}: {result:?}"
    );
    assert!(
        took < COMMAND_TIMEOUT * 2,
        "{what}: took {took:?}, command timeout {COMMAND_TIMEOUT:?}"
    );
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_fast_and_recovers() {
    let mut server = RedisServer::start();
    let ledger = redis_ledger(&server);
    let bkt = bucket("p-outage", 100);
    assert_eq!(
        reserved(&*ledger, &credits("acct-out", "o-1", &bkt, 10)).await,
        90
    );

    server.stop();
    let mut slowest = Duration::ZERO;
    for round in 0..5 {
        let r = credits("acct-out", &format!("o-down-{round}"), &bkt, 10);
        slowest = slowest.max(fails_fast("reserve", ledger.reserve_credits(&r)).await);
        slowest = slowest.max(fails_fast("balance", ledger.credit_balance("acct-out", &bkt)).await);
        slowest = slowest.max(fails_fast("ping", ledger.ping()).await);
        slowest = slowest.max(fails_fast("settle", ledger.settle("acct-out", "o-1", 0)).await);
    }
    eprintln!("outage: slowest failing call {slowest:?} (timeout {COMMAND_TIMEOUT:?})");

    server.start_again();
    let restarted = Instant::now();
    loop {
        if ledger.ping().await.is_ok() {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(10),
            "no reconnect within 10 s of the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "outage: reconnected {:?} after restart",
        restarted.elapsed()
    );
    // The AOF kept the charge; the reservations refused during the outage charged nothing.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let balance = ledger
            .credit_balance("acct-out", &bkt)
            .await
            .expect("balance");
        if balance == 90 || Instant::now() > deadline {
            assert_eq!(balance, 90);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        reserved(&*ledger, &credits("acct-out", "o-2", &bkt, 10)).await,
        80
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_first_use_during_outage_connects_later() {
    let mut server = RedisServer::start();
    server.stop();
    let ledger = redis_ledger(&server);
    fails_fast("ping", ledger.ping()).await;
    fails_fast("ping", ledger.ping()).await;
    server.start_again();
    let restarted = Instant::now();
    while ledger.ping().await.is_err() {
        assert!(
            restarted.elapsed() < Duration::from_secs(10),
            "never connected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_bad_urls_are_refused_up_front() {
    assert!(RedisLedger::new("http://127.0.0.1:6379", COMMAND_TIMEOUT).is_err());
    assert!(RedisLedger::new("not a url", COMMAND_TIMEOUT).is_err());
    assert!(RedisLedger::new("redis://127.0.0.1:6379/0", COMMAND_TIMEOUT).is_ok());
    // Without TLS support compiled in, rediss:// is refused with a clear message.
    if let Err(e) = RedisLedger::new("rediss://127.0.0.1:6379", COMMAND_TIMEOUT) {
        assert!(e.to_string().contains("TLS"), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outbox_is_written_with_the_charge() {
    let server = RedisServer::start();
    let ledger = redis_ledger(&server);
    let limit = 250_000;
    for i in 0..5 {
        let _ = ledger
            .reserve_spend(&spend("acct-ob", &format!("ob-{i}"), limit, 72_000))
            .await
            .expect("reserve");
    }
    // Three fit under the limit; the refused two left no report behind.
    assert_eq!(ledger.outbox_len().await.expect("xlen"), 3);
    let mut no_report = spend("acct-ob", "ob-none", 1_000_000, 1_000);
    no_report.report = None;
    ledger.reserve_spend(&no_report).await.expect("reserve");
    assert_eq!(ledger.outbox_len().await.expect("xlen"), 3);

    let mut conn = raw_connection(&server).await;
    let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg("cg:outbox")
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("xrange");
    let rids: Vec<String> = entries
        .ids
        .iter()
        .map(|e| e.get::<String>("rid").expect("rid"))
        .collect();
    assert_eq!(rids, ["ob-0", "ob-1", "ob-2"]);
    assert_eq!(
        entries.ids[0].get::<String>("customer").as_deref(),
        Some("cus_test")
    );
    // The refused reservations are marked void for a worker that already read them.
    let state: Option<String> = redis::cmd("HGET")
        .arg("cg:{a:acct-ob}:rsv:ob-3")
        .arg("state")
        .query_async(&mut conn)
        .await
        .expect("hget");
    assert_eq!(state.as_deref(), Some("void"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_settings_and_no_lua() {
    let server = RedisServer::start();
    let ledger = redis_ledger(&server);
    assert_eq!(
        ledger.server_settings().await.expect("config get"),
        ("yes".to_string(), "noeviction".to_string())
    );
    // Exercise every step, then ask the server which commands it ran.
    let bkt = bucket("p-nolua", 5);
    ledger
        .create_account(&account("acct-nolua", "free"), Some(&bucket("signup", 10)))
        .await
        .expect("create");
    ledger
        .insert_key("h", &key("k", "acct-nolua"), 1)
        .await
        .expect("key");
    ledger.active_keys("acct-nolua").await.expect("keys");
    ledger.revoke_key("k").await.expect("revoke");
    reserved(&*ledger, &credits("acct-nolua", "n-1", &bkt, 3)).await;
    ledger
        .reserve_credits(&credits("acct-nolua", "n-2", &bkt, 3))
        .await
        .expect("reserve");
    ledger.settle("acct-nolua", "n-1", 1).await.expect("settle");
    ledger
        .grant_credits("acct-nolua", &bkt, 1)
        .await
        .expect("grant");
    ledger
        .reserve_spend(&spend("acct-nolua", "n-3", 100, 1_000))
        .await
        .expect("spend");
    let mut conn = raw_connection(&server).await;
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .expect("info");
    for forbidden in [
        "cmdstat_eval",
        "cmdstat_evalsha",
        "cmdstat_fcall",
        "cmdstat_function",
        "cmdstat_script",
    ] {
        assert!(!stats.contains(forbidden), "{forbidden} in\n{stats}");
    }
    assert!(stats.contains("cmdstat_exec"), "{stats}");
    // Every per-account key carries the account's hash tag.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*acct-nolua*")
        .query_async(&mut conn)
        .await
        .expect("keys");
    assert!(!keys.is_empty());
    for k in keys {
        assert!(k.starts_with("cg:{a:acct-nolua}:"), "{k}");
    }
}

/// `calls` of one command in `INFO commandstats`.
fn command_calls(stats: &str, name: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

async fn command_stats(conn: &mut redis::aio::MultiplexedConnection) -> String {
    redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("info")
}

/// Reservations started together on one thread share `MULTI/EXEC`s, and each still gets exactly
/// its own answer.
#[tokio::test(flavor = "current_thread")]
async fn redis_concurrent_reservations_share_transactions() {
    let server = RedisServer::start();
    let ledger = redis_ledger(&server);
    ledger.ping().await.expect("ping");
    let mut conn = raw_connection(&server).await;
    let before = command_stats(&mut conn).await;
    let bkt = bucket("p-batch", 100);
    let rs: Vec<CreditReservation> = (0..40)
        .map(|i| credits(&format!("acct-batch-{}", i % 4), &format!("b-{i}"), &bkt, 7))
        .collect();
    let tasks: Vec<_> = rs
        .into_iter()
        .map(|r| {
            let ledger = ledger.clone();
            tokio::spawn(async move { ledger.reserve_credits(&r).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.expect("task"));
    }
    let after = command_stats(&mut conn).await;
    // Per account (ten reservations of 7 against 100): 93, 86, …, 30, each seen once.
    for a in 0..4 {
        let mut left: Vec<u64> = outcomes
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 4 == a)
            .map(|(_, o)| match o.as_ref().expect("store answers") {
                CreditReserveOutcome::Reserved { remaining } => *remaining,
                other => panic!("expected a reservation, got {other:?}"),
            })
            .collect();
        left.sort_unstable();
        let expected: Vec<u64> = (1..=10).rev().map(|k| 100 - 7 * k).collect();
        assert_eq!(left, expected, "account {a}");
    }
    let execs = command_calls(&after, "exec") - command_calls(&before, "exec");
    assert!(
        (1..40).contains(&execs),
        "40 reservations took {execs} transactions"
    );
    assert_eq!(
        command_calls(&after, "decrby") - command_calls(&before, "decrby"),
        40
    );
}

/// In a shared transaction, a command that fails fails only its own caller.
#[tokio::test(flavor = "current_thread")]
async fn redis_an_error_in_a_shared_transaction_stays_with_its_caller() {
    let server = RedisServer::start();
    let ledger = redis_ledger(&server);
    let bkt = bucket("p-mixed", 100);
    // A balance key of the wrong type: DECRBY on it answers WRONGTYPE inside the EXEC.
    let mut conn = raw_connection(&server).await;
    let broken = "cg:{a:acct-broken}:bal:p-mixed";
    let _: i64 = redis::cmd("HSET")
        .arg(broken)
        .arg("x")
        .arg("1")
        .query_async(&mut conn)
        .await
        .expect("hset");
    let good = credits("acct-fine", "m-1", &bkt, 5);
    let bad = credits("acct-broken", "m-2", &bkt, 5);
    let good_too = credits("acct-fine", "m-3", &bkt, 5);
    let (a, b, c) = tokio::join!(
        ledger.reserve_credits(&good),
        ledger.reserve_credits(&bad),
        ledger.reserve_credits(&good_too)
    );
    let left = |o: Result<CreditReserveOutcome, StoreError>| match o.expect("store answers") {
        CreditReserveOutcome::Reserved { remaining } => remaining,
        other => panic!("expected a reservation, got {other:?}"),
    };
    let mut seen = [left(a), left(c)];
    seen.sort_unstable();
    assert_eq!(seen, [90, 95]);
    assert!(
        b.is_err(),
        "the reservation on a broken key must fail: {b:?}"
    );
    assert_eq!(
        ledger
            .credit_balance("acct-fine", &bkt)
            .await
            .expect("balance"),
        90
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_reservation_is_one_round_trip() {
    let server = RedisServer::start();
    let ledger = redis_ledger(&server);
    let bkt = bucket("p-trip", 100);
    // Warm the connection, then count the transactions and commands one reservation costs.
    ledger.ping().await.expect("ping");
    let mut conn = raw_connection(&server).await;
    let before = command_stats(&mut conn).await;
    reserved(&*ledger, &credits("acct-trip", "t-1", &bkt, 3)).await;
    let after = command_stats(&mut conn).await;
    let calls = |name: &str| command_calls(&after, name) - command_calls(&before, name);
    assert_eq!(calls("multi"), 1);
    assert_eq!(calls("exec"), 1);
    assert_eq!(calls("decrby"), 1);
    assert_eq!(calls("incrby"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sweeper_finishes_a_refund_claimed_but_not_applied() {
    let server = RedisServer::start();
    let ledger = redis_ledger(&server);
    let bkt = bucket("p-claimed", 100);
    assert_eq!(
        reserved(
            &*ledger,
            &leased("acct-claimed", "x-1", &bkt, 40, LEASE_END)
        )
        .await,
        60
    );
    // What a gateway killed between its claim and its refund leaves behind.
    let mut conn = raw_connection(&server).await;
    let rsv = "cg:{a:acct-claimed}:rsv:x-1";
    let () = redis::cmd("HSET")
        .arg(rsv)
        .arg(&[
            ("settled", "1"),
            ("refund_due", "40"),
            ("settler", "dead-gateway"),
        ])
        .query_async(&mut conn)
        .await
        .expect("hset");
    // Another settler does not touch a claim it does not own …
    assert_eq!(
        ledger
            .settle("acct-claimed", "x-1", 40)
            .await
            .expect("settle"),
        SettleOutcome::AlreadySettled
    );
    assert_eq!(
        ledger
            .credit_balance("acct-claimed", &bkt)
            .await
            .expect("balance"),
        60
    );
    // … the sweeper finishes it once the claim is stale, exactly once however often it runs.
    for _ in 0..3 {
        let report = ledger
            .sweep(LEASE_END + 60_000, OrphanPolicy::Refund, 100)
            .await
            .expect("sweep");
        assert_eq!(report.orphans, 0, "{report:?}");
    }
    assert_eq!(
        ledger
            .credit_balance("acct-claimed", &bkt)
            .await
            .expect("balance"),
        100
    );
    let applied: i64 = redis::cmd("HGET")
        .arg(rsv)
        .arg("refund_applied")
        .query_async(&mut conn)
        .await
        .expect("hget");
    assert_eq!(applied, 1);
    let listed: i64 = redis::cmd("ZCARD")
        .arg("cg:{a:acct-claimed}:holds")
        .query_async(&mut conn)
        .await
        .expect("zcard");
    assert_eq!(listed, 0, "settled holds leave the list");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_refund_applied_twice_is_undone_to_once() {
    let server = RedisServer::start();
    let ledger = redis_ledger(&server);
    let bkt = bucket("p-twice", 100);
    assert_eq!(
        reserved(&*ledger, &leased("acct-twice", "t-1", &bkt, 25, LEASE_END)).await,
        75
    );
    // Two appliers both landed (one's answer was lost): the balance got the refund twice.
    let mut conn = raw_connection(&server).await;
    let () = redis::pipe()
        .atomic()
        .cmd("HSET")
        .arg("cg:{a:acct-twice}:rsv:t-1")
        .arg(&[("settled", "1"), ("refund_due", "25"), ("settler", "gone")])
        .ignore()
        .cmd("HINCRBY")
        .arg("cg:{a:acct-twice}:rsv:t-1")
        .arg("refund_applied")
        .arg(2)
        .ignore()
        .cmd("INCRBY")
        .arg("cg:{a:acct-twice}:bal:p-twice")
        .arg(50)
        .ignore()
        .query_async(&mut conn)
        .await
        .expect("pipe");
    assert_eq!(
        ledger
            .credit_balance("acct-twice", &bkt)
            .await
            .expect("balance"),
        125
    );
    ledger
        .sweep(LEASE_END + 60_000, OrphanPolicy::Refund, 100)
        .await
        .expect("sweep");
    assert_eq!(
        ledger
            .credit_balance("acct-twice", &bkt)
            .await
            .expect("balance"),
        100
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_reservation_with_unknown_outcome_is_given_back() {
    let server = RedisServer::start();
    let ledger = redis_ledger(&server);
    let bkt = bucket("p-unsure", 100);
    assert_eq!(
        ledger
            .credit_balance("acct-unsure", &bkt)
            .await
            .expect("balance"),
        100
    );

    // The server freezes with the reservation in its input buffer: the caller times out (and
    // answers 503), then the server wakes up and applies the reservation after all.
    server.pause();
    let r = credits("acct-unsure", "u-1", &bkt, 10);
    let outcome = ledger.reserve_credits(&r).await;
    assert!(matches!(outcome, Err(StoreError::Timeout)), "{outcome:?}");
    server.resume();

    // The ledger gives it back by itself, exactly once.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let balance = ledger
            .credit_balance("acct-unsure", &bkt)
            .await
            .expect("balance");
        if balance == 100 {
            break;
        }
        assert!(Instant::now() < deadline, "still {balance} after 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        ledger
            .settle("acct-unsure", "u-1", 10)
            .await
            .expect("settle"),
        SettleOutcome::AlreadySettled
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        ledger
            .credit_balance("acct-unsure", &bkt)
            .await
            .expect("balance"),
        100
    );
    let mut conn = raw_connection(&server).await;
    let refunded: Option<u64> = redis::cmd("HGET")
        .arg("cg:{a:acct-unsure}:rsv:u-1")
        .arg("refunded")
        .query_async(&mut conn)
        .await
        .expect("hget");
    assert_eq!(refunded, Some(10));
}

async fn idempotency_keys_are_claimed_once_per_account(b: Backend) {
    use creditgate::ledger::IdempotencyClaim;
    let other = b.another_instance();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let ledger = if i % 2 == 0 {
            b.ledger.clone()
        } else {
            other.clone()
        };
        tasks.push(tokio::spawn(async move {
            ledger
                .claim_idempotency_key("acct-idem", "k1", &format!("pending-{i}"), 60_000)
                .await
                .expect("claim")
        }));
    }
    let mut claimed = 0;
    let mut seen = Vec::new();
    for t in tasks {
        match t.await.expect("task") {
            IdempotencyClaim::Claimed => claimed += 1,
            IdempotencyClaim::Existing(record) => seen.push(record),
        }
    }
    assert_eq!(claimed, 1, "exactly one claim wins");
    assert_eq!(seen.len(), 19);
    assert!(
        seen.iter().all(|r| r == &seen[0]),
        "all see the winner's record"
    );
    // Per account.
    assert_eq!(
        b.ledger
            .claim_idempotency_key("acct-idem-2", "k1", "x", 60_000)
            .await
            .expect("claim"),
        IdempotencyClaim::Claimed
    );
    // Finished records replace the pending one; released keys can be claimed again.
    b.ledger
        .store_idempotency_record("acct-idem", "k1", "done", 60_000)
        .await
        .expect("store");
    assert_eq!(
        b.ledger
            .claim_idempotency_key("acct-idem", "k1", "again", 60_000)
            .await
            .expect("claim"),
        IdempotencyClaim::Existing("done".into())
    );
    b.ledger
        .release_idempotency_key("acct-idem", "k1")
        .await
        .expect("release");
    assert_eq!(
        b.ledger
            .claim_idempotency_key("acct-idem", "k1", "again", 60_000)
            .await
            .expect("claim"),
        IdempotencyClaim::Claimed
    );
}

async fn spending_limit_changes_only_the_limit(b: Backend) {
    let a = account("acct-limit", "starter");
    assert!(b.ledger.create_account(&a, None).await.expect("create"));
    // Another writer changes the plan; the limit change must not undo it.
    let mut upgraded = a.clone();
    upgraded.plan = "business".to_string();
    let plan = AccountChange {
        plan: Some("business".to_string()),
        ..AccountChange::default()
    };
    b.ledger
        .change_account("acct-limit", &plan)
        .await
        .expect("update");
    let limit = AccountChange {
        spending_limit_cents: Some(777),
        ..AccountChange::default()
    };
    b.ledger
        .change_account("acct-limit", &limit)
        .await
        .expect("limit");
    let stored = b.ledger.get_account("acct-limit").await.expect("get");
    upgraded.spending_limit_cents = 777;
    assert_eq!(stored, Some(upgraded));
}

// ---------------------------------------------------------------------------------------------
// Key slots and field-level account changes

/// `n` concurrent inserts of distinct keys for `account` on `slots` slots; the ids claimed.
async fn claim_concurrently(b: &Backend, account: &str, n: usize, slots: u64) -> Vec<String> {
    let second = b.another_instance();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            // Half the inserts come from a second gateway instance (its own connection).
            let ledger = if i % 2 == 0 {
                b.ledger.clone()
            } else {
                second.clone()
            };
            let record = key(&format!("{account}-k{i}"), account);
            tokio::spawn(async move {
                let hash = format!("hash-{}", record.id);
                let claim = ledger.insert_key(&hash, &record, slots).await;
                (record.id, claim)
            })
        })
        .collect();
    let mut claimed = Vec::new();
    for task in tasks {
        let (id, claim) = task.await.expect("task");
        if claim.expect("store answers") == KeySlotClaim::Claimed {
            claimed.push(id);
        }
    }
    claimed
}

/// Every refused key left nothing behind: no record under its hash, not revocable by id.
async fn refused_left_nothing(b: &Backend, account: &str, n: usize, claimed: &[String]) {
    for i in 0..n {
        let id = format!("{account}-k{i}");
        if claimed.contains(&id) {
            continue;
        }
        assert_eq!(
            b.ledger
                .key_by_hash(&format!("hash-{id}"))
                .await
                .expect("get"),
            None,
            "{id} was refused but its record is stored"
        );
        assert_eq!(b.ledger.key_slot(account, &id).await.expect("slot"), None);
    }
}

async fn concurrent_key_claims_fill_exactly_the_free_slots(b: Backend) {
    let claimed = claim_concurrently(&b, "acct-slots", 20, 4).await;
    assert_eq!(claimed.len(), 4, "claimed {claimed:?}");
    let active: BTreeSet<String> = b
        .ledger
        .active_keys("acct-slots")
        .await
        .expect("keys")
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(active, claimed.iter().cloned().collect::<BTreeSet<_>>());
    refused_left_nothing(&b, "acct-slots", 20, &claimed).await;
    // Full now; after a revoke exactly one more fits, in the last slot.
    let extra = key("acct-slots-extra", "acct-slots");
    assert_eq!(
        b.ledger
            .insert_key("hash-extra", &extra, 4)
            .await
            .expect("insert"),
        KeySlotClaim::Full
    );
    assert_eq!(b.ledger.key_by_hash("hash-extra").await.expect("get"), None);
    b.ledger
        .revoke_key(&claimed[0])
        .await
        .expect("revoke")
        .expect("known");
    assert_eq!(
        b.ledger
            .insert_key("hash-extra", &extra, 4)
            .await
            .expect("insert"),
        KeySlotClaim::Claimed
    );
    assert_eq!(
        b.ledger
            .key_slot("acct-slots", &extra.id)
            .await
            .expect("slot"),
        Some(3)
    );
    let again = key("acct-slots-again", "acct-slots");
    assert_eq!(
        b.ledger
            .insert_key("hash-again", &again, 4)
            .await
            .expect("insert"),
        KeySlotClaim::Full
    );
    // A plan without keys refuses at once.
    assert_eq!(
        b.ledger
            .insert_key("hash-none", &key("k-none", "acct-noslots"), 0)
            .await
            .expect("insert"),
        KeySlotClaim::Full
    );
}

async fn two_hundred_concurrent_claims_fill_exactly_the_free_slots(b: Backend) {
    // Three keys exist already; 200 concurrent claims on 40 slots fill the other 37.
    for i in 0..3 {
        let k = key(&format!("acct-many-old{i}"), "acct-many");
        assert_eq!(
            b.ledger
                .insert_key(&format!("hash-old{i}"), &k, 40)
                .await
                .expect("insert"),
            KeySlotClaim::Claimed
        );
    }
    let claimed = claim_concurrently(&b, "acct-many", 200, 40).await;
    assert_eq!(claimed.len(), 37);
    let active = b.ledger.active_keys("acct-many").await.expect("keys");
    assert_eq!(active.len(), 40);
    // The old keys keep the first slots (slot order is creation order).
    for i in 0..3u64 {
        assert_eq!(
            b.ledger
                .key_slot("acct-many", &format!("acct-many-old{i}"))
                .await
                .expect("slot"),
            Some(i)
        );
    }
    refused_left_nothing(&b, "acct-many", 200, &claimed).await;
}

async fn guarded_change_refuses_a_stale_read(b: Backend) {
    let a = account("acct-guard", "starter");
    assert!(b.ledger.create_account(&a, None).await.expect("create"));
    let bkt = bucket("p-guard", 100);
    // Someone else writes a field after our read: our guarded change is refused, unwritten.
    let limit = AccountChange {
        spending_limit_cents: Some(1),
        ..AccountChange::default()
    };
    let now = b
        .ledger
        .change_account("acct-guard", &limit)
        .await
        .expect("change")
        .expect("exists");
    let upgrade = AccountChange {
        plan: Some("pro".to_string()),
        ..AccountChange::default()
    };
    let grant = [CreditChange::Grant {
        bucket: bkt.clone(),
        amount: 50,
    }];
    assert_eq!(
        b.ledger
            .change_account_if(&a, &upgrade, &grant, None)
            .await
            .expect("guarded"),
        GuardedChange::Conflict
    );
    assert_eq!(
        b.ledger.get_account("acct-guard").await.expect("get"),
        Some(now.clone())
    );
    assert_eq!(
        b.ledger
            .credit_balance("acct-guard", &bkt)
            .await
            .expect("balance"),
        100
    );
    // On the fresh read it applies, the grant and the plan together.
    let applied = b
        .ledger
        .change_account_if(&now, &upgrade, &grant, None)
        .await
        .expect("guarded");
    assert_eq!(applied, GuardedChange::Applied(upgrade.applied_to(&now)));
    assert_eq!(
        b.ledger
            .credit_balance("acct-guard", &bkt)
            .await
            .expect("balance"),
        150
    );
    // A reset in a guarded change sets the bucket exactly.
    let after = upgrade.applied_to(&now);
    let reset = [CreditChange::Reset {
        bucket: bkt.clone(),
        balance: 7,
    }];
    assert!(matches!(
        b.ledger
            .change_account_if(&after, &AccountChange::default(), &reset, None)
            .await
            .expect("guarded"),
        GuardedChange::Applied(_)
    ));
    assert_eq!(
        b.ledger
            .credit_balance("acct-guard", &bkt)
            .await
            .expect("balance"),
        7
    );
    // A carry moves what a bucket holds (its allowance when untouched) plus a top-up.
    let current = b
        .ledger
        .get_account("acct-guard")
        .await
        .expect("get")
        .expect("exists");
    let (fresh, moved) = (bucket("p-fresh", 40), bucket("p-moved", 999));
    let carry = [
        CreditChange::Carry {
            from: bkt.clone(),
            to: moved.clone(),
            add: 3,
        },
        CreditChange::Carry {
            from: fresh.clone(),
            to: bucket("p-moved-2", 999),
            add: 0,
        },
    ];
    assert!(matches!(
        b.ledger
            .change_account_if(&current, &AccountChange::default(), &carry, None)
            .await
            .expect("guarded"),
        GuardedChange::Applied(_)
    ));
    assert_eq!(
        b.ledger
            .credit_balance("acct-guard", &moved)
            .await
            .expect("balance"),
        10
    );
    assert_eq!(
        b.ledger
            .credit_balance("acct-guard", &bucket("p-moved-2", 999))
            .await
            .expect("balance"),
        40
    );
    // No such account: a conflict, nothing written.
    assert_eq!(
        b.ledger
            .change_account_if(&account("acct-ghost", "pro"), &upgrade, &grant, None)
            .await
            .expect("guarded"),
        GuardedChange::Conflict
    );
    assert_eq!(b.ledger.get_account("acct-ghost").await.expect("get"), None);
}

async fn concurrent_upgrades_add_the_difference_once(b: Backend) {
    let a = account("acct-upgrade", "starter");
    assert!(b.ledger.create_account(&a, None).await.expect("create"));
    let bkt = bucket("p-upgrade", 100);
    // 20 writers each try "starter → pro adds 50" by read, decide, guarded write, retry.
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let ledger = b.ledger.clone();
            let bkt = bkt.clone();
            tokio::spawn(async move {
                for attempt in 0..200u32 {
                    let read = ledger
                        .get_account("acct-upgrade")
                        .await
                        .expect("get")
                        .expect("exists");
                    let credits: Vec<CreditChange> = match read.plan.as_str() {
                        "starter" => vec![CreditChange::Grant {
                            bucket: bkt.clone(),
                            amount: 50,
                        }],
                        _ => Vec::new(),
                    };
                    let change = AccountChange {
                        plan: Some("pro".to_string()),
                        ..AccountChange::default()
                    };
                    match ledger
                        .change_account_if(&read, &change, &credits, None)
                        .await
                        .expect("guarded")
                    {
                        GuardedChange::Applied(_) => return !credits.is_empty(),
                        GuardedChange::Conflict => {
                            tokio::time::sleep(Duration::from_millis(u64::from(attempt % 3))).await
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
                panic!("no attempt applied");
            })
        })
        .collect();
    let mut granted = 0;
    for task in tasks {
        if task.await.expect("task") {
            granted += 1;
        }
    }
    assert_eq!(granted, 1);
    assert_eq!(
        b.ledger
            .credit_balance("acct-upgrade", &bkt)
            .await
            .expect("balance"),
        150
    );
}

async fn subscription_events_apply_in_created_order(b: Backend) {
    let a = account("acct-order", "starter");
    assert!(b.ledger.create_account(&a, None).await.expect("create"));
    let status = |s| AccountChange {
        status: Some(s),
        ..AccountChange::default()
    };
    let event = |sub: &str, created_s| SubscriptionEvent {
        subscription_id: sub.to_string(),
        created_s,
    };
    let newer = b
        .ledger
        .change_account_if(
            &a,
            &status(SubscriptionStatus::PastDue),
            &[],
            Some(&event("sub_1", 200)),
        )
        .await
        .expect("guarded");
    let GuardedChange::Applied(now) = newer else {
        panic!("expected applied, got {newer:?}");
    };
    // Older than the last applied: refused, nothing written.
    assert_eq!(
        b.ledger
            .change_account_if(
                &now,
                &status(SubscriptionStatus::Active),
                &[CreditChange::Grant {
                    bucket: bucket("p-order", 10),
                    amount: 5,
                }],
                Some(&event("sub_1", 199)),
            )
            .await
            .expect("guarded"),
        GuardedChange::Stale {
            last_created_s: 200
        }
    );
    assert_eq!(
        b.ledger.get_account("acct-order").await.expect("get"),
        Some(now.clone())
    );
    assert_eq!(
        b.ledger
            .credit_balance("acct-order", &bucket("p-order", 10))
            .await
            .expect("balance"),
        10
    );
    // Another subscription has its own order; an equal `created` still applies.
    assert!(matches!(
        b.ledger
            .change_account_if(
                &now,
                &status(SubscriptionStatus::Trialing),
                &[],
                Some(&event("sub_2", 100)),
            )
            .await
            .expect("guarded"),
        GuardedChange::Applied(_)
    ));
    let now = b
        .ledger
        .get_account("acct-order")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(now.status, SubscriptionStatus::Trialing);
    assert!(matches!(
        b.ledger
            .change_account_if(
                &now,
                &status(SubscriptionStatus::Canceled),
                &[],
                Some(&event("sub_1", 200)),
            )
            .await
            .expect("guarded"),
        GuardedChange::Applied(_)
    ));
    let stored = b.ledger.get_account("acct-order").await.expect("get");
    assert_eq!(stored.map(|a| a.status), Some(SubscriptionStatus::Canceled));
}

async fn concurrent_field_writers_lose_nothing(b: Backend) {
    let a = account("acct-fields", "starter");
    assert!(b.ledger.create_account(&a, None).await.expect("create"));
    const ROUNDS: u64 = 25;
    // Four writers, each owning one field and writing distinct values in sequence, two with
    // plain field writes and two with guarded (read-dependent) ones: every field must end at
    // its writer's last value.
    let limits = {
        let ledger = b.ledger.clone();
        tokio::spawn(async move {
            for i in 1..=ROUNDS {
                let change = AccountChange {
                    spending_limit_cents: Some(1000 + i),
                    ..AccountChange::default()
                };
                ledger
                    .change_account("acct-fields", &change)
                    .await
                    .expect("change");
            }
        })
    };
    let anchors = {
        let ledger = b.another_instance();
        tokio::spawn(async move {
            for i in 1..=ROUNDS {
                let change = AccountChange {
                    period_anchor_ms: Some(ms("2031-05-01T00:00:00Z") + i as i64),
                    ..AccountChange::default()
                };
                ledger
                    .change_account("acct-fields", &change)
                    .await
                    .expect("change");
            }
        })
    };
    let guarded = |ledger: Arc<dyn Ledger>, make: fn(u64) -> AccountChange| {
        tokio::spawn(async move {
            for i in 1..=ROUNDS {
                let change = make(i);
                let mut done = false;
                for _ in 0..500 {
                    let read = ledger
                        .get_account("acct-fields")
                        .await
                        .expect("get")
                        .expect("exists");
                    match ledger
                        .change_account_if(&read, &change, &[], None)
                        .await
                        .expect("guarded")
                    {
                        GuardedChange::Applied(_) => {
                            done = true;
                            break;
                        }
                        _ => tokio::time::sleep(Duration::from_millis(1)).await,
                    }
                }
                assert!(done, "guarded write {i} never applied");
            }
        })
    };
    let plans = guarded(b.ledger.clone(), |i| AccountChange {
        plan: Some(format!("plan-{i}")),
        ..AccountChange::default()
    });
    let customers = guarded(b.another_instance(), |i| AccountChange {
        stripe_customer_id: Some(format!("cus_{i}")),
        ..AccountChange::default()
    });
    for task in [limits, anchors, plans, customers] {
        task.await.expect("writer");
    }
    let stored = b
        .ledger
        .get_account("acct-fields")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(stored.spending_limit_cents, 1000 + ROUNDS);
    assert_eq!(
        stored.period_anchor_ms,
        ms("2031-05-01T00:00:00Z") + ROUNDS as i64
    );
    assert_eq!(stored.plan, format!("plan-{ROUNDS}"));
    assert_eq!(
        stored.stripe_customer_id.as_deref(),
        Some(format!("cus_{ROUNDS}").as_str())
    );
    // Untouched fields are as created.
    assert_eq!(stored.status, a.status);
    assert_eq!(stored.created_ms, a.created_ms);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_key_slots_survive_lost_removals_and_old_scores() {
    let server = RedisServer::start();
    let ledger = redis_ledger(&server);
    let mut conn = raw_connection(&server).await;
    // A refused key whose removal was lost (the gateway died between claim and removal) waits
    // at +inf: a later claim is placed before it and keeps its slot.
    let _: i64 = redis::cmd("ZADD")
        .arg("cg:{a:acct-lost}:keys")
        .arg("+inf")
        .arg("k-lost")
        .query_async(&mut conn)
        .await
        .expect("zadd");
    assert_eq!(
        ledger
            .insert_key("hash-k1", &key("k1", "acct-lost"), 2)
            .await
            .expect("insert"),
        KeySlotClaim::Claimed
    );
    assert_eq!(
        ledger.key_slot("acct-lost", "k1").await.expect("slot"),
        Some(0)
    );
    assert_eq!(
        ledger
            .insert_key("hash-k2", &key("k2", "acct-lost"), 2)
            .await
            .expect("insert"),
        KeySlotClaim::Full
    );
    assert_eq!(
        ledger.key_slot("acct-lost", "k1").await.expect("slot"),
        Some(0)
    );
    assert_eq!(ledger.key_by_hash("hash-k2").await.expect("get"), None);

    // Keys scored by the old global sequence keep their place before new ones.
    let old = key("k-old", "acct-old");
    let json = serde_json::to_string(&old).expect("json");
    let () = redis::pipe()
        .cmd("SET")
        .arg("cg:key:hash-old")
        .arg(json)
        .ignore()
        .cmd("SET")
        .arg("cg:keyid:k-old")
        .arg("hash-old")
        .ignore()
        .cmd("ZADD")
        .arg("cg:{a:acct-old}:keys")
        .arg(57)
        .arg("k-old")
        .ignore()
        .query_async(&mut conn)
        .await
        .expect("legacy key");
    for id in ["k-new1", "k-new2"] {
        assert_eq!(
            ledger
                .insert_key(&format!("hash-{id}"), &key(id, "acct-old"), 10)
                .await
                .expect("insert"),
            KeySlotClaim::Claimed
        );
    }
    let order: Vec<String> = ledger
        .active_keys("acct-old")
        .await
        .expect("keys")
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(order, ["k-old", "k-new1", "k-new2"]);
}

// ---------------------------------------------------------------------------------------------
// Async jobs

fn job(account_id: &str, job_id: &str, rid: &str, amount: u64) -> JobHold {
    JobHold {
        job_id: job_id.to_string(),
        account_id: account_id.to_string(),
        reservation_id: rid.to_string(),
        plan: "starter".to_string(),
        payment: JobPayment::Credits,
        charged: amount,
        meta: meta(1, amount),
    }
}

const JOB_LEASE_END: i64 = LEASE_END + 3_600_000;

async fn a_job_hold_is_found_by_its_account_and_swept_only_after_the_job_ttl(b: Backend) {
    let bkt = bucket("p-jobs", 100);
    assert_eq!(
        reserved(&*b.ledger, &leased("acct-job", "j-1", &bkt, 20, LEASE_END)).await,
        80
    );
    let held = job("acct-job", "job_7", "j-1", 20);
    b.ledger
        .record_job(&held, JOB_LEASE_END, 2 * 3_600_000)
        .await
        .expect("record");
    assert_eq!(
        b.ledger
            .account_job("acct-job", "job_7")
            .await
            .expect("read"),
        Some(held.clone())
    );
    assert_eq!(
        b.ledger
            .account_job("acct-other", "job_7")
            .await
            .expect("read"),
        None,
        "another account's job is not found"
    );
    assert_eq!(b.ledger.find_job("job_7").await.expect("read"), Some(held));
    assert_eq!(b.ledger.find_job("job_8").await.expect("read"), None);
    // The request's lease is over, the job's is not: the sweeper leaves the hold to the job.
    let early = b
        .ledger
        .sweep(LEASE_END + 60_000, OrphanPolicy::Refund, 100)
        .await
        .expect("sweep");
    assert_eq!(early.orphans, 0, "{early:?}");
    assert_eq!(
        b.ledger
            .credit_balance("acct-job", &bkt)
            .await
            .expect("balance"),
        80
    );
    // Never final within the job's TTL: an orphan like any other.
    let late = b
        .ledger
        .sweep(JOB_LEASE_END + 60_000, OrphanPolicy::Refund, 100)
        .await
        .expect("sweep");
    assert_eq!(late.orphans, 1, "{late:?}");
    assert_eq!(
        b.ledger
            .credit_balance("acct-job", &bkt)
            .await
            .expect("balance"),
        100
    );
    // The job's final state seen afterwards settles nothing more.
    assert_eq!(
        b.ledger
            .settle_as("acct-job", "j-1", 20, "job_late")
            .await
            .expect("settle"),
        SettleOutcome::AlreadySettled
    );
    assert_eq!(
        b.ledger
            .credit_balance("acct-job", &bkt)
            .await
            .expect("balance"),
        100
    );
}

async fn recording_a_job_does_not_revive_a_settled_hold(b: Backend) {
    let bkt = bucket("p-jobs-settled", 100);
    assert_eq!(
        reserved(&*b.ledger, &leased("acct-js", "js-1", &bkt, 20, LEASE_END)).await,
        80
    );
    assert_eq!(
        b.ledger
            .settle("acct-js", "js-1", 20)
            .await
            .expect("settle"),
        SettleOutcome::Settled
    );
    b.ledger
        .record_job(
            &job("acct-js", "job_9", "js-1", 20),
            JOB_LEASE_END,
            3_600_000,
        )
        .await
        .expect("record");
    let report = b
        .ledger
        .sweep(JOB_LEASE_END + 60_000, OrphanPolicy::Refund, 100)
        .await
        .expect("sweep");
    assert_eq!(report.orphans, 0, "{report:?}");
    assert_eq!(
        b.ledger
            .credit_balance("acct-js", &bkt)
            .await
            .expect("balance"),
        100,
        "refunded once"
    );
}

// ---------------------------------------------------------------------------------------------
// Redis Cluster only

/// An account id whose keys (`cg:{a:<id>}:…`) live on the master at `port`.
fn account_on(cluster: &RedisCluster, port: u16, prefix: &str) -> String {
    (0..10_000)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| cluster.master_of_key(&format!("cg:{{a:{id}}}:acct")) == port)
        .unwrap_or_else(|| panic!("no account id lands on master {port}"))
}

/// 200 × 3 credits on 100, from two ledger instances, on one account on each of the 3 masters
/// at once: exactly 33 succeed on each, every balance ends at 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_accounts_on_every_master_are_exact_across_two_instances() {
    let b = Backend::cluster();
    let cluster = b.cluster.as_ref().expect("a cluster");
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "{masters:?}");
    let ledgers = vec![b.ledger.clone(), b.another_instance()];
    let accounts: Vec<String> = masters
        .iter()
        .map(|m| account_on(cluster, m.port, "spread"))
        .collect();
    let mut races = Vec::new();
    for account in &accounts {
        let ledgers = ledgers.clone();
        let account = account.clone();
        races.push(tokio::spawn(async move {
            race_for_credits(&ledgers, &account).await
        }));
    }
    for race in races {
        race.await.expect("race on one master");
    }
}

/// Holds of accounts on every master, orphaned (never settled), are found by one sweep that
/// walks every lane, and refunded once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_sweep_walks_the_lanes_of_every_master() {
    let b = Backend::cluster();
    let cluster = b.cluster.as_ref().expect("a cluster");
    let bkt = bucket("p-sweep", 100);
    let mut accounts = Vec::new();
    for m in cluster.masters() {
        let id = account_on(cluster, m.port, "orphan");
        let mut r = credits(&id, "lost-1", &bkt, 10);
        r.lease_until_ms = 1_000;
        assert_eq!(reserved(b.ledger.as_ref(), &r).await, 90);
        accounts.push(id);
    }
    let report = b
        .another_instance()
        .sweep(100_000, OrphanPolicy::Refund, 100)
        .await
        .expect("sweep");
    assert_eq!(report.orphans, 3, "{report:?}");
    for id in &accounts {
        assert_eq!(
            b.ledger.credit_balance(id, &bkt).await.expect("balance"),
            100,
            "{id} refunded once"
        );
    }
    let again = b
        .ledger
        .sweep(200_000, OrphanPolicy::Refund, 100)
        .await
        .expect("sweep");
    assert_eq!(again.orphans, 0, "{again:?}");
}
