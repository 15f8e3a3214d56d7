//! Usage history, on both ledger backends (the [`MemoryLedger`] and a [`RedisLedger`] on its
//! own `redis-server`): every money movement is one entry, written with the money — so the
//! entries of a bucket sum to exactly what it moved (allowance − balance, month spend), a
//! refused reservation leaves none, a refund is one entry however many appliers race, pages
//! never repeat or skip an entry (also among entries of the same millisecond), `from`/`to`
//! bound them and the retention trims them. Redis only: a refund applied twice and undone to
//! once leaves one entry.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use creditgate::ledger::{
    ChargeMeta, CreditBucket, CreditReservation, CreditReserveOutcome, Ledger, MemoryLedger,
    OrphanPolicy, RedisLedger, SettleOutcome, SpendReservation, SpendReserveOutcome, UsageEntry,
    UsageKind, UsageQuery, UsageUnit,
};
use support::RedisServer;

const COMMAND_TIMEOUT: Duration = Duration::from_millis(500);
const DAY_MS: i64 = 24 * 3600 * 1000;
/// 2031-04-15T00:00:00Z: entries are timed by the callers' clock.
const T0: i64 = 1_933_977_600_000;

struct Backend {
    ledger: Arc<dyn Ledger>,
    server: Option<RedisServer>,
}

impl Backend {
    fn memory(days: u64) -> Self {
        Self {
            ledger: Arc::new(MemoryLedger::new().with_usage_retention_days(days)),
            server: None,
        }
    }

    fn redis(days: u64) -> Self {
        let server = RedisServer::start();
        let ledger = RedisLedger::new(&server.url(), COMMAND_TIMEOUT)
            .expect("valid url")
            .with_usage_retention_days(days);
        Self {
            ledger: Arc::new(ledger),
            server: Some(server),
        }
    }

    fn another_instance(&self) -> Arc<dyn Ledger> {
        match &self.server {
            Some(server) => {
                Arc::new(RedisLedger::new(&server.url(), COMMAND_TIMEOUT).expect("valid url"))
            }
            None => self.ledger.clone(),
        }
    }
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod on_memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::memory(90)).await;
                }
            )*
        }
        mod on_redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::redis(90)).await;
                }
            )*
        }
    };
}

both_backends!(
    mixed_credit_charges_and_refunds_sum_to_the_money_moved,
    mixed_spend_charges_and_refunds_sum_to_the_month_spend,
    refused_reservations_leave_no_entry,
    concurrent_settlements_write_one_refund_entry,
    grants_and_resets_are_entries,
    pages_split_one_millisecond_without_repeats,
    from_and_to_bound_the_entries,
    sweeper_refunds_are_entries,
);

fn bucket(id: &str, allowance: u64) -> CreditBucket {
    CreditBucket {
        id: id.to_string(),
        allowance,
        expires_at_ms: None,
    }
}

fn meta(quantity: u64, unit: u64, at_ms: i64) -> ChargeMeta {
    ChargeMeta {
        operation: "image.generate".to_string(),
        model: "nano-banana-pro".to_string(),
        quantity,
        unit_amount: unit,
        catalog_version: 3,
        created_ms: at_ms,
    }
}

fn credits(
    account: &str,
    rid: &str,
    bkt: &CreditBucket,
    q: u64,
    unit: u64,
    at: i64,
) -> CreditReservation {
    CreditReservation {
        account_id: account.to_string(),
        reservation_id: rid.to_string(),
        bucket: bkt.clone(),
        amount: q * unit,
        meta: meta(q, unit, at),
        record_ttl_ms: DAY_MS,
        lease_until_ms: i64::MAX,
    }
}

fn spend(account: &str, rid: &str, limit: u64, q: u64, unit: u64, at: i64) -> SpendReservation {
    SpendReservation {
        account_id: account.to_string(),
        reservation_id: rid.to_string(),
        month: "203104".to_string(),
        limit_micro: limit,
        amount_micro: q * unit,
        meta: meta(q, unit, at),
        report: None,
        record_ttl_ms: DAY_MS,
        lease_until_ms: i64::MAX,
    }
}

/// Every entry, page by page of `limit`, checking order and that no id repeats.
async fn all_pages(ledger: &dyn Ledger, account: &str, mut query: UsageQuery) -> Vec<UsageEntry> {
    let mut all: Vec<UsageEntry> = Vec::new();
    let mut seen = HashSet::new();
    let mut pages = 0;
    loop {
        let page = ledger.usage(account, &query).await.expect("usage page");
        assert!(page.entries.len() <= query.limit);
        for e in &page.entries {
            assert!(seen.insert(e.id.clone()), "entry {} on two pages", e.id);
            if let Some(prev) = all.last() {
                assert!(
                    (prev.time_ms, &prev.id) > (e.time_ms, &e.id),
                    "not newest first: {} then {}",
                    prev.id,
                    e.id
                );
            }
            all.push(e.clone());
        }
        pages += 1;
        assert!(pages < 100_000, "paging does not end");
        match page.next {
            Some(next) => query.cursor = Some(next),
            None => return all,
        }
    }
}

fn query(limit: usize) -> UsageQuery {
    UsageQuery {
        limit,
        ..UsageQuery::default()
    }
}

/// Net credits the entries took from a bucket: charges − refunds − grants.
fn net_taken(entries: &[UsageEntry]) -> i128 {
    entries.iter().map(|e| -e.signed_amount()).sum()
}

async fn mixed_credit_charges_and_refunds_sum_to_the_money_moved(b: Backend) {
    let bkt = bucket("p-mixed", 5_000);
    let second = b.another_instance();
    let tasks: Vec<_> = (0..300u64)
        .map(|i| {
            let ledger = if i % 2 == 0 {
                b.ledger.clone()
            } else {
                second.clone()
            };
            let bkt = bkt.clone();
            tokio::spawn(async move {
                let rid = format!("mix-{i}");
                let q = 1 + i % 4;
                let r = credits("acct-mix", &rid, &bkt, q, 5 + i % 3, T0 + (i as i64) / 3);
                let outcome = ledger.reserve_credits(&r).await.expect("reserve");
                if let CreditReserveOutcome::Reserved { .. } = outcome {
                    // Full refund, partial (some images generated), or kept.
                    let refund = match i % 5 {
                        0 => r.amount,
                        1 | 2 => r.amount / q * (q / 2),
                        _ => 0,
                    };
                    let settled = ledger
                        .settle("acct-mix", &rid, refund)
                        .await
                        .expect("settle");
                    assert_eq!(settled, SettleOutcome::Settled);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let balance = b
        .ledger
        .credit_balance("acct-mix", &bkt)
        .await
        .expect("balance");
    let entries = all_pages(&*b.ledger, "acct-mix", query(7)).await;
    assert!(entries.iter().any(|e| e.kind == UsageKind::Refund));
    assert!(entries
        .iter()
        .all(|e| e.unit == UsageUnit::Credits && e.bucket == "p-mixed"));
    assert_eq!(net_taken(&entries), i128::from(5_000 - balance));
    // A refund never precedes its charge and names the charge's request.
    for r in entries.iter().filter(|e| e.kind == UsageKind::Refund) {
        let charge = entries
            .iter()
            .find(|e| e.kind == UsageKind::Charge && e.request_id == r.request_id)
            .expect("the refunded charge is listed");
        assert!(r.amount <= charge.amount && r.time_ms >= charge.time_ms);
        assert_eq!((&r.model, r.catalog_version), (&charge.model, 3));
    }
    // One page of everything says the same.
    let one = b
        .ledger
        .usage("acct-mix", &query(1000))
        .await
        .expect("page");
    assert_eq!(one.entries, entries);
    assert_eq!(one.next, None);
}

async fn mixed_spend_charges_and_refunds_sum_to_the_month_spend(b: Backend) {
    let limit = 2_000_000; // $2
    let tasks: Vec<_> = (0..200u64)
        .map(|i| {
            let ledger = b.ledger.clone();
            tokio::spawn(async move {
                let rid = format!("ppu-{i}");
                let q = 1 + i % 3;
                let r = spend("acct-ppu", &rid, limit, q, 13_500, T0 + i as i64);
                if let SpendReserveOutcome::Reserved { .. } =
                    ledger.reserve_spend(&r).await.expect("reserve")
                {
                    let refund = if i % 4 == 0 { 13_500 } else { 0 };
                    ledger
                        .settle("acct-ppu", &rid, refund)
                        .await
                        .expect("settle");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let spent = b
        .ledger
        .month_spend("acct-ppu", "203104")
        .await
        .expect("spend");
    assert!(spent > 0 && spent <= limit);
    let entries = all_pages(&*b.ledger, "acct-ppu", query(11)).await;
    assert!(entries
        .iter()
        .all(|e| e.unit == UsageUnit::Usd && e.bucket == "203104"));
    assert_eq!(net_taken(&entries), i128::from(spent));
}

async fn refused_reservations_leave_no_entry(b: Backend) {
    let bkt = bucket("p-small", 10);
    let ok = credits("acct-refused", "fits", &bkt, 1, 8, T0);
    assert!(matches!(
        b.ledger.reserve_credits(&ok).await.expect("reserve"),
        CreditReserveOutcome::Reserved { remaining: 2 }
    ));
    let no = credits("acct-refused", "too-much", &bkt, 1, 8, T0 + 1);
    assert!(matches!(
        b.ledger.reserve_credits(&no).await.expect("reserve"),
        CreditReserveOutcome::Insufficient { available: 2 }
    ));
    let over = spend("acct-refused", "over", 100, 1, 500, T0 + 2);
    assert!(matches!(
        b.ledger.reserve_spend(&over).await.expect("reserve"),
        SpendReserveOutcome::LimitReached { .. }
    ));
    let entries = all_pages(&*b.ledger, "acct-refused", query(100)).await;
    let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["c:fits"]);
    assert_eq!(
        (
            entries[0].amount,
            entries[0].quantity,
            entries[0].operation.as_str()
        ),
        (8, 1, "image.generate")
    );
}

async fn concurrent_settlements_write_one_refund_entry(b: Backend) {
    let bkt = bucket("p-race", 100);
    let second = b.another_instance();
    let r = credits("acct-race", "race-1", &bkt, 4, 5, T0);
    b.ledger.reserve_credits(&r).await.expect("reserve");
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let ledger = if i % 2 == 0 {
                b.ledger.clone()
            } else {
                second.clone()
            };
            tokio::spawn(async move { ledger.settle("acct-race", "race-1", 15).await })
        })
        .collect();
    for t in tasks {
        t.await.expect("task").expect("settle");
    }
    let entries = all_pages(&*b.ledger, "acct-race", query(100)).await;
    let kinds: Vec<(UsageKind, u64, u64)> = entries
        .iter()
        .map(|e| (e.kind, e.amount, e.quantity))
        .collect();
    assert_eq!(
        kinds,
        [(UsageKind::Refund, 15, 3), (UsageKind::Charge, 20, 4)]
    );
    assert_eq!(
        b.ledger
            .credit_balance("acct-race", &bkt)
            .await
            .expect("balance"),
        95
    );
}

async fn grants_and_resets_are_entries(b: Backend) {
    let bkt = bucket("p-grant", 100);
    b.ledger
        .grant_credits("acct-grant", &bkt, 50)
        .await
        .expect("grant");
    b.ledger
        .reset_credits("acct-grant", &bkt, 30)
        .await
        .expect("reset");
    let entries = all_pages(&*b.ledger, "acct-grant", query(100)).await;
    let mut kinds: Vec<(UsageKind, u64)> = entries.iter().map(|e| (e.kind, e.amount)).collect();
    kinds.sort_by_key(|(k, _)| k.as_str());
    assert_eq!(kinds, [(UsageKind::Grant, 50), (UsageKind::Reset, 30)]);
    assert!(entries
        .iter()
        .all(|e| e.bucket == "p-grant" && e.request_id.is_empty()));
}

async fn pages_split_one_millisecond_without_repeats(b: Backend) {
    let bkt = bucket("p-same", 10_000);
    // 45 charges in the same millisecond, 5 in the next: every page size cuts inside it.
    for i in 0..50 {
        let at = if i < 45 { T0 } else { T0 + 1 };
        let r = credits("acct-same", &format!("same-{i:02}"), &bkt, 1, 1, at);
        b.ledger.reserve_credits(&r).await.expect("reserve");
    }
    for limit in [1, 2, 7, 44, 45, 46, 1000] {
        let entries = all_pages(&*b.ledger, "acct-same", query(limit)).await;
        assert_eq!(entries.len(), 50, "limit {limit}");
    }
}

async fn from_and_to_bound_the_entries(b: Backend) {
    let bkt = bucket("p-window", 10_000);
    for i in 0..20i64 {
        let r = credits(
            "acct-window",
            &format!("w-{i:02}"),
            &bkt,
            1,
            1,
            T0 + i * 1000,
        );
        b.ledger.reserve_credits(&r).await.expect("reserve");
    }
    let window = UsageQuery {
        from_ms: Some(T0 + 5_000),
        to_ms: Some(T0 + 15_000),
        cursor: None,
        limit: 3,
    };
    let entries = all_pages(&*b.ledger, "acct-window", window).await;
    let ids: Vec<String> = entries.iter().map(|e| e.request_id.clone()).collect();
    let expected: Vec<String> = (5..15).rev().map(|i| format!("w-{i:02}")).collect();
    assert_eq!(ids, expected);
    // Another account sees none of them.
    assert!(all_pages(&*b.ledger, "acct-other", query(10))
        .await
        .is_empty());
}

async fn sweeper_refunds_are_entries(b: Backend) {
    let bkt = bucket("p-orphan", 100);
    let mut r = credits("acct-orphan", "orph-1", &bkt, 2, 10, T0);
    r.lease_until_ms = T0 + 1_000;
    b.ledger.reserve_credits(&r).await.expect("reserve");
    let report = b
        .ledger
        .sweep(T0 + 60_000, OrphanPolicy::Refund, 100)
        .await
        .expect("sweep");
    assert_eq!(report.orphans, 1);
    let entries = all_pages(&*b.ledger, "acct-orphan", query(10)).await;
    let kinds: Vec<(UsageKind, u64)> = entries.iter().map(|e| (e.kind, e.amount)).collect();
    assert_eq!(kinds, [(UsageKind::Refund, 20), (UsageKind::Charge, 20)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_trims_old_entries_on_both_backends() {
    for b in [Backend::memory(1), Backend::redis(1)] {
        let bkt = bucket("p-old", 100);
        for (rid, at) in [("old", T0), ("new", T0 + 2 * DAY_MS)] {
            let r = credits("acct-old", rid, &bkt, 1, 1, at);
            b.ledger.reserve_credits(&r).await.expect("reserve");
        }
        let entries = all_pages(&*b.ledger, "acct-old", query(10)).await;
        let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["c:new"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_refund_applied_twice_and_undone_leaves_one_entry() {
    let server = RedisServer::start();
    let ledger = RedisLedger::new(&server.url(), COMMAND_TIMEOUT).expect("valid url");
    let bkt = bucket("p-twice", 100);
    let mut r = credits("acct-twice", "t-1", &bkt, 5, 5, T0);
    r.lease_until_ms = T0 + 1_000;
    ledger.reserve_credits(&r).await.expect("reserve");
    let client = redis::Client::open(server.url()).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let rsv = "cg:{a:acct-twice}:rsv:t-1";
    let charge: String = redis::cmd("HGET")
        .arg(rsv)
        .arg("usage")
        .query_async(&mut conn)
        .await
        .expect("charge member");
    let refund = UsageEntry::parse_member(&charge)
        .expect("charge entry")
        .refund_of(25, 1);
    // Two appliers of a claimed refund both landed (one's answer was lost): money twice, and
    // each added the refund's (same) member.
    let () = redis::pipe()
        .atomic()
        .cmd("HSET")
        .arg(rsv)
        .arg(&[("settled", "1"), ("refund_due", "25"), ("settler", "gone")])
        .ignore()
        .cmd("HINCRBY")
        .arg(rsv)
        .arg("refund_applied")
        .arg(2)
        .ignore()
        .cmd("INCRBY")
        .arg("cg:{a:acct-twice}:bal:p-twice")
        .arg(50)
        .ignore()
        .cmd("ZADD")
        .arg("cg:{a:acct-twice}:usage")
        .arg(refund.time_ms)
        .arg(refund.member())
        .ignore()
        .cmd("ZADD")
        .arg("cg:{a:acct-twice}:usage")
        .arg(refund.time_ms)
        .arg(refund.member())
        .ignore()
        .query_async(&mut conn)
        .await
        .expect("pipe");
    ledger
        .sweep(T0 + 60_000, OrphanPolicy::Refund, 100)
        .await
        .expect("sweep");
    assert_eq!(
        ledger
            .credit_balance("acct-twice", &bkt)
            .await
            .expect("balance"),
        100
    );
    let entries = all_pages(&ledger, "acct-twice", query(10)).await;
    let kinds: Vec<(UsageKind, u64)> = entries.iter().map(|e| (e.kind, e.amount)).collect();
    assert_eq!(kinds, [(UsageKind::Refund, 25), (UsageKind::Charge, 25)]);
}
