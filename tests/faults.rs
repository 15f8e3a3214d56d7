//! Money under real faults (issue 11, item 1 "Must show"): the real binary, a real redis-server
//! and the recording backend, with real signals — `kill -9` of the gateway with billed requests
//! in flight, `kill -9` between a settlement's claim and its refund (the `settle_after_claim`
//! failpoint), `kill -9` while answers are going out, `SIGSTOP`/`SIGCONT` of Redis under load,
//! Redis stopped while answered requests settle, and `SIGTERM` with the sweeper present.
//! Every test checks conservation: balance + kept charges == granted (pay-per-use: month spend
//! == kept µ$), and that each hold is settled exactly once (leases and the sweeper).
//!
//! Small timeouts keep each test to seconds: a hold's lease is connect (1 s) + read (3 s) +
//! grace (1 s) = 5 s; the sweeper runs every 200 ms and takes a 10 s lease slot 1 s after it
//! ends, so an orphan is settled at most ~17 s after its reservation. Deadlines are generous
//! (this runs on a loaded 2-core box) and every wait polls a condition.

#[path = "support/fake_stripe.rs"]
mod fake_stripe;
mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use creditgate::demo_backend::{Behaviour, DemoBackend};
use creditgate::ledger::schema;
use fake_stripe::FakeStripe;
use serde_json::json;
use support::gateway::{GatewayOptions, GatewayProcess};
use support::http::{self, exchange, Outcome};
use support::RedisServer;

/// Credits granted by the business plan.
const BUSINESS_CREDITS: u64 = 700;
/// A nano-banana-pro relight on credits.
const RELIGHT_CREDITS: u64 = 3;
/// A nano-banana-2 relight with n = 2 on pay-per-use, µ$.
const PPU_RELIGHT_MICROS: u64 = 144_000;
/// How long any settling is waited for (lease + slot + margin is ~17 s; the box is loaded).
const SETTLE_DEADLINE: Duration = Duration::from_secs(90);

// ---- processes ---------------------------------------------------------------------------

/// The orphan policy under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    Refund,
    Keep,
}

impl Policy {
    fn as_str(self) -> &'static str {
        match self {
            Policy::Refund => "refund",
            Policy::Keep => "keep",
        }
    }
}

/// Gateway options with short timeouts, a fast sweeper and the given orphan policy; `extra`
/// is appended (e.g. a `[stripe]` table).
fn options(
    redis: &RedisServer,
    backend: &DemoBackend,
    policy: Policy,
    extra: &str,
) -> GatewayOptions {
    let mut o = GatewayOptions::new(&redis.url(), backend.addr);
    o.read_timeout_ms = 3000;
    o.extra_toml = format!(
        "[billing]\norphan_policy = \"{}\"\nlease_grace_ms = 1000\nsweep_interval_ms = 200\n\n{extra}",
        policy.as_str()
    );
    o
}

/// Options with Stripe enabled against the fake.
fn stripe_options(
    redis: &RedisServer,
    backend: &DemoBackend,
    policy: Policy,
    stripe: &FakeStripe,
) -> GatewayOptions {
    let table = format!(
        "[stripe]\nenabled = true\napi_base = \"{}\"\nmeter_event_name = \"creditgate_usage\"\n",
        stripe.api_base()
    );
    let mut o = options(redis, backend, policy, &table);
    o.env = vec![
        ("STRIPE_SECRET_KEY".into(), "sk_test_123".into()),
        ("STRIPE_WEBHOOK_SECRET".into(), "whsec_test_secret".into()),
    ];
    o
}

/// A relight request (`Connection: close`) with the key and JSON body.
fn relight(addr: SocketAddr, key: &str, body: &serde_json::Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "POST /api/v1/images/relight HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Authorization: Bearer {key}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn spawn_relights(
    addr: SocketAddr,
    key: &str,
    body: &serde_json::Value,
    n: usize,
) -> Vec<tokio::task::JoinHandle<Outcome>> {
    (0..n)
        .map(|_| {
            let req = relight(addr, key, body);
            tokio::spawn(async move { exchange(addr, req).await })
        })
        .collect()
}

/// What a batch of exchanges ended with: statuses, cut-short count, and what the 2xx answers
/// say was kept (credits, µ$).
#[derive(Debug, Default)]
struct Tally {
    statuses: BTreeMap<u16, usize>,
    /// Error answers by status and `error.code`.
    errors: BTreeMap<(u16, String), usize>,
    cut_short: usize,
    /// Why the first cut-short exchange ended.
    first_cut: Option<String>,
    kept_credits: u64,
    kept_micros: u64,
}

async fn tally(tasks: Vec<tokio::task::JoinHandle<Outcome>>) -> Tally {
    let mut t = Tally::default();
    for task in tasks {
        match task.await.expect("request task") {
            Outcome::Answered(r) => {
                *t.statuses.entry(r.status).or_default() += 1;
                if r.status >= 400 {
                    let code = serde_json::from_slice::<serde_json::Value>(&r.body)
                        .ok()
                        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
                        .unwrap_or_else(|| "<no error code>".into());
                    *t.errors.entry((r.status, code)).or_default() += 1;
                }
                if (200..300).contains(&r.status) {
                    t.kept_credits += r
                        .header("X-Credits-Charged")
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                    t.kept_micros += r.header("X-Charge-Usd").map(usd_to_micros).unwrap_or(0);
                }
            }
            Outcome::CutShort(why) => {
                t.cut_short += 1;
                t.first_cut.get_or_insert(why);
            }
        }
    }
    t
}

/// "0.144" → 144000.
fn usd_to_micros(text: &str) -> u64 {
    let (whole, frac) = text.trim().split_once('.').unwrap_or((text.trim(), ""));
    let whole: u64 = whole.parse().unwrap_or_else(|_| panic!("bad USD {text:?}"));
    let mut frac = frac.to_string();
    assert!(frac.len() <= 6, "more than µ$ precision: {text:?}");
    while frac.len() < 6 {
        frac.push('0');
    }
    whole * 1_000_000
        + frac
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("bad USD {text:?}"))
}

// ---- the store, read directly ------------------------------------------------------------

async fn store(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis")
}

/// Holds still on the account's unsettled list.
async fn unsettled(conn: &mut redis::aio::MultiplexedConnection, account: &str) -> u64 {
    redis::cmd("ZCARD")
        .arg(schema::holds(account))
        .query_async(conn)
        .await
        .expect("ZCARD")
}

/// Entries in a stream.
async fn stream_len(conn: &mut redis::aio::MultiplexedConnection, stream: &str) -> u64 {
    redis::cmd("XLEN")
        .arg(stream)
        .query_async(conn)
        .await
        .expect("XLEN")
}

/// Every reservation record of the account, by id.
async fn records(
    conn: &mut redis::aio::MultiplexedConnection,
    account: &str,
) -> HashMap<String, HashMap<String, String>> {
    let prefix = schema::reservation(account, "");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(conn)
        .await
        .expect("KEYS");
    let mut out = HashMap::new();
    for k in keys {
        let h: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&k)
            .query_async(conn)
            .await
            .expect("HGETALL");
        out.insert(k[prefix.len()..].to_string(), h);
    }
    out
}

/// The account's month spend (µ$) as the admin API shows it.
async fn month_spend(gw: &GatewayProcess, account: &str) -> u64 {
    let r = gw
        .admin("GET", &format!("/admin/accounts/{account}"), None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["monthSpendMicroUsd"]
        .as_u64()
        .expect("monthSpendMicroUsd")
}

/// A counter's value on `/metrics` (0 when not exported yet).
async fn metric(gw: &GatewayProcess, series: &str) -> u64 {
    let text = http::get(gw.metrics, "/metrics", &[]).await.text();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse::<f64>().expect("metric value") as u64)
        .unwrap_or(0)
}

fn orphans_series(policy: Policy) -> String {
    format!("creditgate_orphans_total{{policy=\"{}\"}}", policy.as_str())
}

const SWEEPS_OK: &str = "creditgate_sweeps_total{result=\"ok\"}";

/// Waits until the gateway has run `n` more successful sweeps than now.
async fn wait_sweeps(gw: &GatewayProcess, n: u64) {
    let start = metric(gw, SWEEPS_OK).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(gw, SWEEPS_OK).await < start + n {
        assert!(Instant::now() < deadline, "no {n} sweeps within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `f` until it answers true or `within` passes; answers how long it took.
async fn wait_until<F, Fut>(what: &str, within: Duration, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `n` requests reached the backend.
async fn wait_backend(backend: &DemoBackend, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while backend.request_count() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} reached the backend",
            backend.request_count()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Checks that every reservation is settled exactly once: settled, off the unsettled list,
/// each refund applied exactly once, exactly `orphans` of them settled by the sweeper with
/// the policy (with a refund iff the policy refunds), and none of `forwarded` among them.
fn assert_settled_once(
    records: &HashMap<String, HashMap<String, String>>,
    policy: Policy,
    orphans: &HashSet<String>,
) {
    let mut seen = 0;
    for (id, r) in records {
        assert!(r.contains_key("settled"), "{id} not settled: {r:?}");
        let applied = r.get("refund_applied").map(String::as_str);
        let due: u64 = r
            .get("refund_due")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        match (due, applied) {
            (0, None) | (1.., Some("1")) => {}
            _ => panic!("{id}: refund_due {due}, refund_applied {applied:?}: {r:?}"),
        }
        if orphans.contains(id) {
            seen += 1;
            assert_eq!(
                r.get("orphan").map(String::as_str),
                Some(policy.as_str()),
                "{id}: {r:?}"
            );
            assert_eq!(
                r.get("settler").map(String::as_str),
                Some("sweeper"),
                "{id}"
            );
            let amount: u64 = r["amount"].parse().expect("amount");
            // The refund policy claims "everything" (clamped to the amount when applied).
            let refunded: u64 = r.get("refunded").and_then(|v| v.parse().ok()).unwrap_or(0);
            match policy {
                Policy::Refund => assert_eq!(refunded, amount, "{id}: {r:?}"),
                Policy::Keep => assert_eq!((due, refunded), (0, 0), "{id}: {r:?}"),
            }
        } else {
            assert!(!r.contains_key("orphan"), "{id} is no orphan: {r:?}");
        }
    }
    assert_eq!(seen, orphans.len(), "orphan records found");
}

/// The charge ids the backend received (the reservation ids).
fn charge_ids(backend: &DemoBackend) -> HashSet<String> {
    backend
        .requests()
        .iter()
        .filter_map(|r| r.header("X-Creditgate-Charge-Id").map(str::to_string))
        .collect()
}

// ---- 1. kill -9 with 50 in flight ---------------------------------------------------------

const IN_FLIGHT: usize = 50;
const FAST: usize = 3;

/// kill -9 with `IN_FLIGHT` credit requests held (and `FAST` completed before), restart on the
/// same Redis, wait for lease + sweep.
async fn kill9_credits(policy: Policy) {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let opts = || options(&redis, &backend, policy, "");
    let gw = GatewayProcess::start_with(opts()).await;
    gw.create_account("b", "business", false).await;
    let key = gw.create_key("b").await;
    let mut conn = store(&redis).await;
    let body = json!({"model": "nano-banana-pro"});

    let fast = tally(spawn_relights(gw.proxy, &key, &body, FAST)).await;
    assert_eq!(fast.statuses.get(&200), Some(&FAST), "{fast:?}");
    // The kept charges' "settled" marks are written off the response path: wait for them.
    wait_until("fast holds settled", Duration::from_secs(10), || {
        let mut c = conn.clone();
        async move { unsettled(&mut c, "b").await == 0 }
    })
    .await;
    let fast_ids = charge_ids(&backend);

    backend.set_behaviour(Behaviour {
        delay: Duration::from_secs(20),
        ..Behaviour::default()
    });
    let reserved_at = Instant::now();
    let tasks = spawn_relights(gw.proxy, &key, &body, IN_FLIGHT);
    wait_backend(&backend, FAST + IN_FLIGHT).await;
    assert_eq!(unsettled(&mut conn, "b").await, IN_FLIGHT as u64);
    let mut gw = gw;
    gw.signal("KILL");
    assert!(
        gw.wait_exit(Duration::from_secs(10)),
        "kill -9 did not end it"
    );
    let killed = tally(tasks).await;
    println!("kill -9 ({policy:?}): in-flight clients got {killed:?}");
    // No 2xx was forwarded for the in-flight requests.
    assert_eq!(killed.kept_credits, 0, "{killed:?}");
    let orphans: HashSet<String> = charge_ids(&backend)
        .difference(&fast_ids)
        .cloned()
        .collect();
    assert_eq!(orphans.len(), IN_FLIGHT);

    let kept_before = fast.kept_credits;
    let held = IN_FLIGHT as u64 * RELIGHT_CREDITS;
    let restarted = GatewayProcess::start_with(opts()).await;
    let at_restart = restarted.balance(&key).await;
    assert!(
        at_restart == BUSINESS_CREDITS - kept_before - held
            || at_restart == BUSINESS_CREDITS - kept_before,
        "balance at restart {at_restart}"
    );
    let took =
        wait_until("every orphan swept", SETTLE_DEADLINE, || {
            let mut c = conn.clone();
            let gw = &restarted;
            async move {
                unsettled(&mut c, "b").await == 0 && metric(gw, &orphans_series(policy)).await > 0
            }
        })
        .await;
    let since_reservation = reserved_at.elapsed();
    let expected = match policy {
        Policy::Refund => BUSINESS_CREDITS - kept_before,
        Policy::Keep => BUSINESS_CREDITS - kept_before - held,
    };
    let check = |balance: u64, counted: u64, recs: &HashMap<_, _>| {
        assert_eq!(
            balance,
            expected,
            "balance ({policy:?})\n{}",
            restarted.log()
        );
        assert_eq!(counted, IN_FLIGHT as u64, "orphans counted");
        assert_eq!(recs.len(), FAST + IN_FLIGHT, "records");
        assert_settled_once(recs, policy, &orphans);
    };
    let recs = records(&mut conn, "b").await;
    check(
        restarted.balance(&key).await,
        metric(&restarted, &orphans_series(policy)).await,
        &recs,
    );
    // Conservation: balance + kept == granted.
    let kept = kept_before + if policy == Policy::Keep { held } else { 0 };
    assert_eq!(restarted.balance(&key).await + kept, BUSINESS_CREDITS);
    // More sweeps change nothing.
    wait_sweeps(&restarted, 3).await;
    let again = records(&mut conn, "b").await;
    check(
        restarted.balance(&key).await,
        metric(&restarted, &orphans_series(policy)).await,
        &again,
    );
    assert_eq!(again, recs, "a later sweep changed a record");
    println!(
        "kill -9 credits ({policy:?}): {IN_FLIGHT} orphans settled {took:?} after the restart, \
         {since_reservation:?} after their reservation; balance {expected}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_with_50_in_flight_refund_policy_gives_every_hold_back_once() {
    kill9_credits(Policy::Refund).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_with_50_in_flight_keep_policy_keeps_every_hold_once() {
    kill9_credits(Policy::Keep).await;
}

/// The same on pay-per-use spend, with Stripe enabled against the fake: the orphans are
/// reported never (refund) or once each (keep).
async fn kill9_pay_per_use(policy: Policy) {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let stripe = FakeStripe::start().await;
    let opts = || stripe_options(&redis, &backend, policy, &stripe);
    let gw = GatewayProcess::start_with(opts()).await;
    gw.create_account_with(json!({
        "id": "p", "plan": "pay_per_use", "payPerUse": true,
        "spendingLimitCents": 5000, "stripeCustomerId": "cus_p"
    }))
    .await;
    let key = gw.create_key("p").await;
    let mut conn = store(&redis).await;
    let body = json!({"model": "nano-banana-2", "n": 2});

    let fast = tally(spawn_relights(gw.proxy, &key, &body, FAST)).await;
    assert_eq!(fast.statuses.get(&200), Some(&FAST), "{fast:?}");
    assert_eq!(fast.kept_micros, FAST as u64 * PPU_RELIGHT_MICROS);
    wait_until("fast holds settled", Duration::from_secs(10), || {
        let mut c = conn.clone();
        async move { unsettled(&mut c, "p").await == 0 }
    })
    .await;
    let fast_ids = charge_ids(&backend);

    backend.set_behaviour(Behaviour {
        delay: Duration::from_secs(20),
        ..Behaviour::default()
    });
    let reserved_at = Instant::now();
    let tasks = spawn_relights(gw.proxy, &key, &body, IN_FLIGHT);
    wait_backend(&backend, FAST + IN_FLIGHT).await;
    assert_eq!(unsettled(&mut conn, "p").await, IN_FLIGHT as u64);
    let mut gw = gw;
    gw.signal("KILL");
    assert!(
        gw.wait_exit(Duration::from_secs(10)),
        "kill -9 did not end it"
    );
    let killed = tally(tasks).await;
    assert_eq!(killed.kept_micros, 0, "{killed:?}");
    let orphans: HashSet<String> = charge_ids(&backend)
        .difference(&fast_ids)
        .cloned()
        .collect();
    assert_eq!(orphans.len(), IN_FLIGHT);

    let held = IN_FLIGHT as u64 * PPU_RELIGHT_MICROS;
    // The orphans' charges wait in the outbox (the reporter waits for their settlement).
    assert!(stream_len(&mut conn, schema::OUTBOX).await >= IN_FLIGHT as u64);
    let restarted = GatewayProcess::start_with(opts()).await;
    let took =
        wait_until("every orphan swept", SETTLE_DEADLINE, || {
            let mut c = conn.clone();
            let gw = &restarted;
            async move {
                unsettled(&mut c, "p").await == 0 && metric(gw, &orphans_series(policy)).await > 0
            }
        })
        .await;
    let since_reservation = reserved_at.elapsed();
    let kept = fast.kept_micros + if policy == Policy::Keep { held } else { 0 };
    let recs = records(&mut conn, "p").await;
    assert_eq!(recs.len(), FAST + IN_FLIGHT);
    assert_settled_once(&recs, policy, &orphans);
    assert_eq!(
        metric(&restarted, &orphans_series(policy)).await,
        IN_FLIGHT as u64
    );
    // Conservation: month spend == kept µ$.
    assert_eq!(
        month_spend(&restarted, "p").await,
        kept,
        "{}",
        restarted.log()
    );

    // The outbox: the kept charges are reported once each, the refunded orphans never.
    let reported: HashSet<String> = match policy {
        Policy::Refund => fast_ids.clone(),
        Policy::Keep => fast_ids.union(&orphans).cloned().collect(),
    };
    wait_until("meter events delivered", SETTLE_DEADLINE, || {
        let done = stripe.accepted().len() >= reported.len();
        async move { done }
    })
    .await;
    // Every outbox entry dealt with (reported or skipped as refunded), none dead-lettered.
    wait_until("outbox drained", SETTLE_DEADLINE, || {
        let mut c = conn.clone();
        async move { stream_len(&mut c, schema::OUTBOX).await == 0 }
    })
    .await;
    assert_eq!(stream_len(&mut conn, schema::OUTBOX_DEAD).await, 0);
    // More sweeps (and reporter rounds) change nothing.
    wait_sweeps(&restarted, 3).await;
    let events = stripe.accepted();
    let ids: Vec<&str> = events.iter().map(|e| e.identifier.as_str()).collect();
    let unique: HashSet<String> = ids.iter().map(|s| s.to_string()).collect();
    assert_eq!(ids.len(), unique.len(), "a charge reported twice: {ids:?}");
    assert_eq!(unique, reported, "reported charges ({policy:?})");
    let value: u64 = events.iter().map(|e| e.value.parse::<u64>().unwrap()).sum();
    assert_eq!(value, kept, "reported value");
    assert_eq!(month_spend(&restarted, "p").await, kept);
    assert_eq!(
        records(&mut conn, "p").await,
        recs,
        "a later sweep changed a record"
    );
    println!(
        "kill -9 pay-per-use ({policy:?}): {IN_FLIGHT} orphans settled {took:?} after the \
         restart, {since_reservation:?} after their reservation; month spend {kept} µ$, \
         {} meter events",
        events.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_pay_per_use_refund_policy_gives_spend_back_and_never_reports_orphans() {
    kill9_pay_per_use(Policy::Refund).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_pay_per_use_keep_policy_keeps_spend_and_reports_each_orphan_once() {
    kill9_pay_per_use(Policy::Keep).await;
}

/// kill -9 while answers are going out (no upstream delay: requests finish all the time): a
/// 2xx the client got is never refunded by the sweeper, and an orphan is never a request whose
/// 2xx the client got. (Before the success was settled ahead of its answer, the "settled" mark
/// was written after it, and the sweeper refunded up to 8 of 23 delivered results.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_right_after_answers_never_refunds_a_delivered_result() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let opts = || options(&redis, &backend, Policy::Refund, "");
    let mut gw = GatewayProcess::start_with(opts()).await;
    gw.create_account("b", "business", false).await;
    let key = gw.create_key("b").await;
    let mut conn = store(&redis).await;
    let body = json!({"model": "nano-banana-pro"});
    let (answered, mut answers) = tokio::sync::mpsc::unbounded_channel();
    const SENT: u64 = 60;
    let tasks: Vec<_> = (0..SENT)
        .map(|i| {
            let req = relight(gw.proxy, &key, &body);
            let addr = gw.proxy;
            let answered = answered.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(i)).await;
                let o = exchange(addr, req).await;
                if matches!(&o, Outcome::Answered(r) if r.status == 200) {
                    let _ = answered.send(());
                }
                o
            })
        })
        .collect();
    // Killed mid-stream: some answered, some on their way out, some held.
    for _ in 0..20 {
        answers.recv().await.expect("an answer");
    }
    gw.signal("KILL");
    assert!(
        gw.wait_exit(Duration::from_secs(10)),
        "kill -9 did not end it"
    );
    let mut delivered = HashSet::new();
    for t in tasks {
        match t.await.expect("request task") {
            Outcome::Answered(r) if r.status == 200 => {
                delivered.insert(r.header("X-Request-Id").expect("X-Request-Id").to_string());
            }
            Outcome::Answered(r) => panic!("unexpected {}: {}", r.status, r.text()),
            Outcome::CutShort(_) => {}
        }
    }
    let charge_of: HashMap<String, String> = backend
        .requests()
        .iter()
        .filter_map(|r| {
            Some((
                r.header("X-Request-Id")?.to_string(),
                r.header("X-Creditgate-Charge-Id")?.to_string(),
            ))
        })
        .collect();
    let delivered_charges: HashSet<String> = delivered
        .iter()
        .map(|rid| {
            charge_of
                .get(rid)
                .expect("a delivered request reached the backend")
                .clone()
        })
        .collect();

    let restarted = GatewayProcess::start_with(opts()).await;
    wait_until("every hold settled", SETTLE_DEADLINE, || {
        let mut c = conn.clone();
        async move { unsettled(&mut c, "b").await == 0 }
    })
    .await;
    wait_sweeps(&restarted, 3).await;
    let recs = records(&mut conn, "b").await;
    let orphans: HashSet<String> = recs
        .iter()
        .filter(|(_, r)| r.contains_key("orphan"))
        .map(|(id, _)| id.clone())
        .collect();
    assert_settled_once(&recs, Policy::Refund, &orphans);
    let mut kept = 0;
    let mut kept_undelivered = 0;
    let mut refunded_delivered = Vec::new();
    for (id, r) in &recs {
        let amount: u64 = r["amount"].parse().expect("amount");
        let refunded: u64 = r.get("refunded").and_then(|v| v.parse().ok()).unwrap_or(0);
        kept += amount - refunded;
        if delivered_charges.contains(id) {
            if orphans.contains(id) || refunded > 0 {
                refunded_delivered.push(r.clone());
            }
        } else if amount > refunded {
            // Settled as a success just as the gateway died: its answer was on its way out.
            kept_undelivered += 1;
        }
    }
    assert!(
        refunded_delivered.is_empty(),
        "{} of {} delivered results refunded (taken for orphans): {refunded_delivered:?}",
        refunded_delivered.len(),
        delivered.len()
    );
    let balance = restarted.balance(&key).await;
    assert_eq!(balance + kept, BUSINESS_CREDITS, "balance + kept");
    assert_eq!(
        metric(&restarted, &orphans_series(Policy::Refund)).await,
        orphans.len() as u64
    );
    println!(
        "kill -9 amid answers: {} delivered (kept), {kept_undelivered} kept but cut short in \
         transit, {} orphans refunded, {} holds; balance {balance}",
        delivered.len(),
        orphans.len(),
        recs.len()
    );
}

// ---- 2. kill -9 between claim and refund -------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_between_claim_and_refund_refunds_exactly_once() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let mut armed = options(&redis, &backend, Policy::Refund, "");
    armed.env = vec![("CREDITGATE_FAILPOINT".into(), "settle_after_claim".into())];
    let mut gw = GatewayProcess::start_with(armed).await;
    gw.create_account("b", "business", false).await;
    let key = gw.create_key("b").await;
    let mut conn = store(&redis).await;
    // A success keeps its charge: no refund, the failpoint stays quiet.
    let ok = tally(spawn_relights(
        gw.proxy,
        &key,
        &json!({"model": "nano-banana-pro"}),
        1,
    ))
    .await;
    assert_eq!(ok.kept_credits, RELIGHT_CREDITS, "{ok:?}");
    // A failed upstream calls for a refund: the gateway dies right after the claim.
    backend.set_behaviour(Behaviour {
        status: 500,
        ..Behaviour::default()
    });
    let failed = tally(spawn_relights(
        gw.proxy,
        &key,
        &json!({"model": "nano-banana-pro"}),
        1,
    ))
    .await;
    let died_at = Instant::now();
    assert!(
        gw.wait_exit(Duration::from_secs(10)),
        "the failpoint did not kill the gateway"
    );
    assert!(gw.log().contains("failpoint hit"), "{}", gw.log());
    assert_eq!(failed.kept_credits, 0, "{failed:?}");
    let recs = records(&mut conn, "b").await;
    let claimed: Vec<_> = recs
        .iter()
        .filter(|(_, r)| {
            r.contains_key("refund_due") && r.get("refund_due").map(String::as_str) != Some("0")
        })
        .collect();
    assert_eq!(claimed.len(), 1, "{recs:?}");
    assert!(
        !claimed[0].1.contains_key("refund_applied"),
        "refunded before the kill: {:?}",
        claimed[0]
    );

    // Restart without the failpoint: the sweeper finishes the refund once.
    let restarted = GatewayProcess::start_with(options(&redis, &backend, Policy::Refund, "")).await;
    let at_restart = restarted.balance(&key).await;
    assert_eq!(at_restart, BUSINESS_CREDITS - 2 * RELIGHT_CREDITS);
    let took = wait_until("the claimed refund applied", SETTLE_DEADLINE, || {
        let gw = &restarted;
        let key = &key;
        async move { gw.balance(key).await == BUSINESS_CREDITS - RELIGHT_CREDITS }
    })
    .await;
    wait_until("off the unsettled list", Duration::from_secs(10), || {
        let mut c = conn.clone();
        async move { unsettled(&mut c, "b").await == 0 }
    })
    .await;
    wait_sweeps(&restarted, 3).await;
    // Exactly once: the balance whole, not more, and it stays so.
    assert_eq!(
        restarted.balance(&key).await,
        BUSINESS_CREDITS - RELIGHT_CREDITS,
        "{}",
        restarted.log()
    );
    let recs = records(&mut conn, "b").await;
    assert_settled_once(&recs, Policy::Refund, &HashSet::new());
    assert_eq!(
        metric(
            &restarted,
            "creditgate_sweeps_total{result=\"finished_refund\"}"
        )
        .await,
        1
    );
    assert_eq!(metric(&restarted, &orphans_series(Policy::Refund)).await, 0);
    println!(
        "kill -9 between claim and refund: refund finished {took:?} after the restart, {:?} \
         after the crash",
        died_at.elapsed()
    );
}

// ---- 3. Redis frozen under load ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_sigstop_under_50_requests_leaves_an_exact_balance() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let gw = GatewayProcess::start_with(options(&redis, &backend, Policy::Refund, "")).await;
    gw.create_account("b", "business", false).await;
    let key = gw.create_key("b").await;
    let body = json!({"model": "nano-banana-pro"});
    let warm = tally(spawn_relights(gw.proxy, &key, &body, 1)).await;
    assert_eq!(warm.kept_credits, RELIGHT_CREDITS);
    // A slow upstream, so some requests are in flight when the store freezes.
    backend.set_behaviour(Behaviour {
        delay: Duration::from_millis(300),
        ..Behaviour::default()
    });
    // 50 requests, one every 20 ms from 300 ms before the freeze: some are reserving,
    // some waiting on the upstream and some settling when Redis stops; most arrive while it
    // is stopped.
    let tasks: Vec<_> = (0..50u64)
        .map(|i| {
            let req = relight(gw.proxy, &key, &body);
            let addr = gw.proxy;
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20 * i)).await;
                exchange(addr, req).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.pause();
    let paused = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.resume();
    let resumed = Instant::now();
    println!("redis paused for {:?}", resumed - paused);
    let t = tally(tasks).await;
    println!("SIGSTOP Redis under 50: {t:?}");
    for (status, code) in t.errors.keys() {
        assert!(
            *status == 503 && code == "store_unavailable",
            "unexpected {status} {code}: {t:?}"
        );
    }
    assert_eq!(t.cut_short, 0, "{t:?}");
    assert!(
        t.statuses.get(&503).copied().unwrap_or(0) > 0,
        "nothing timed out: {t:?}"
    );
    let kept = warm.kept_credits + t.kept_credits;
    let conn = store(&redis).await;
    // Exact within the bound: ~30 s of background retries, at the latest the sweeper after
    // the lease; never above the grant (no double refund).
    let highest = std::cell::Cell::new(0);
    let took = wait_until("the balance exact", SETTLE_DEADLINE, || {
        let gw = &gw;
        let key = &key;
        let highest = &highest;
        async move {
            let b = gw.balance(key).await;
            highest.set(highest.get().max(b));
            b + kept == BUSINESS_CREDITS
        }
    })
    .await;
    let highest = highest.get();
    let exact_after = resumed.elapsed();
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let b = gw.balance(&key).await;
        assert_eq!(b + kept, BUSINESS_CREDITS, "the balance moved after exact");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        highest + kept <= BUSINESS_CREDITS,
        "balance {highest} + kept {kept} above the grant: refunded twice"
    );
    wait_until("every hold settled", SETTLE_DEADLINE, || {
        let mut c = conn.clone();
        async move { unsettled(&mut c, "b").await == 0 }
    })
    .await;
    assert_eq!(gw.balance(&key).await + kept, BUSINESS_CREDITS);
    println!(
        "SIGSTOP Redis 2 s under 50: exact {exact_after:?} after SIGCONT (polled {took:?}), \
         {} × 200, {} × 503, orphans {}",
        t.statuses.get(&200).copied().unwrap_or(0),
        t.statuses.get(&503).copied().unwrap_or(0),
        metric(&gw, &orphans_series(Policy::Refund)).await
    );
}

/// Redis down (stopped, not frozen: commands fail at once) while 10 answered requests settle,
/// for longer than a settlement's retries, then back with its data: the sweeper must not
/// refund the results the clients got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_while_answers_settle_never_refunds_a_delivered_result() {
    let mut redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let gw = GatewayProcess::start_with(options(&redis, &backend, Policy::Refund, "")).await;
    gw.create_account("b", "business", false).await;
    let key = gw.create_key("b").await;
    let body = json!({"model": "nano-banana-pro"});
    backend.set_behaviour(Behaviour {
        delay: Duration::from_millis(500),
        ..Behaviour::default()
    });
    const N: usize = 10;
    let tasks = spawn_relights(gw.proxy, &key, &body, N);
    wait_backend(&backend, N).await;
    redis.stop();
    let t = tally(tasks).await;
    println!("answers while Redis is down: {t:?}");
    // Longer than a settlement's own retries.
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.start_again();
    let mut conn = store(&redis).await;
    wait_until("every hold settled", SETTLE_DEADLINE, || {
        let mut c = conn.clone();
        async move { unsettled(&mut c, "b").await == 0 }
    })
    .await;
    wait_sweeps(&gw, 3).await;
    let orphans = metric(&gw, &orphans_series(Policy::Refund)).await;
    let balance = gw.balance(&key).await;
    println!(
        "Redis down while {N} answers settle: {} × 200 delivered, {orphans} refunded as orphans, \
         balance {balance}",
        t.statuses.get(&200).copied().unwrap_or(0)
    );
    assert_settled_once(
        &records(&mut conn, "b").await,
        Policy::Refund,
        &HashSet::new(),
    );
    assert_eq!(
        balance + t.kept_credits,
        BUSINESS_CREDITS,
        "orphans {orphans}"
    );
}

// ---- 4. SIGTERM with the sweeper present -------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_40_in_flight_stays_exact_after_the_sweeper() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let opts = || options(&redis, &backend, Policy::Refund, "");
    let mut gw = GatewayProcess::start_with(opts()).await;
    gw.create_account("b", "business", false).await;
    let key = gw.create_key("b").await;
    let body = json!({"model": "nano-banana-pro"});
    let warm = tally(spawn_relights(gw.proxy, &key, &body, 1)).await;
    assert_eq!(warm.kept_credits, RELIGHT_CREDITS);
    backend.set_behaviour(Behaviour {
        delay: Duration::from_secs(1),
        ..Behaviour::default()
    });
    backend.clear();
    const N: usize = 40;
    let tasks = spawn_relights(gw.proxy, &key, &body, N);
    wait_backend(&backend, N).await;
    gw.signal("TERM");
    let t = tally(tasks).await;
    assert!(
        gw.wait_exit(Duration::from_secs(10)),
        "no exit after SIGTERM"
    );
    assert_eq!(t.statuses.get(&200), Some(&N), "{t:?}\n{}", gw.log());
    let kept = warm.kept_credits + t.kept_credits;
    assert_eq!(kept, (N as u64 + 1) * RELIGHT_CREDITS);
    let mut conn = store(&redis).await;
    let restarted = GatewayProcess::start_with(opts()).await;
    // Past every lease: whatever is left unsettled the sweeper settles; none of it may be
    // a charge the client got its 200 for.
    wait_until("every hold settled", SETTLE_DEADLINE, || {
        let mut c = conn.clone();
        async move { unsettled(&mut c, "b").await == 0 }
    })
    .await;
    wait_sweeps(&restarted, 3).await;
    let orphans = metric(&restarted, &orphans_series(Policy::Refund)).await;
    assert_eq!(
        restarted.balance(&key).await + kept,
        BUSINESS_CREDITS,
        "orphans {orphans}\n{}",
        gw.log()
    );
    assert_eq!(orphans, 0, "a forwarded 200 was taken for an orphan");
    assert_settled_once(
        &records(&mut conn, "b").await,
        Policy::Refund,
        &HashSet::new(),
    );
    println!("SIGTERM with {N} in flight: {t:?}; exact after the sweeper, 0 orphans");
}
