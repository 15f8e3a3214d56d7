//! Redis Cluster (issue 12): a real local cluster of 3 masters + 3 replicas
//! (`support::cluster`) under the real `creditgate` binary, with real faults — slots that hold
//! busy accounts moved with their keys while requests run, a master killed (SIGKILL) under load
//! and replaced by its replica, a master and its replica frozen (SIGSTOP) so the cluster is
//! not ok. Every test checks conservation: each account's balance + kept charges == granted,
//! never below zero, and the upstream saw no request that was not billed.
//!
//! The first test checks the harness itself (the layout, `redis-cli -c`, a slot move, a
//! failover), so a failure further down is the gateway's, not the harness's.

#[path = "support/fake_stripe.rs"]
mod fake_stripe;
mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use creditgate::demo_backend::{Behaviour, DemoBackend};
use creditgate::ledger::schema;
use fake_stripe::FakeStripe;
use serde_json::{json, Value};
use support::cluster::{key_slot, RedisCluster, MASTERS};
use support::gateway::{GatewayOptions, GatewayProcess};
use support::http::{self, exchange, Outcome};

// ---- the harness itself ------------------------------------------------------------------

#[test]
fn harness_starts_a_whole_cluster_moves_a_slot_and_fails_over() {
    let mut cluster = RedisCluster::start();

    // 3 masters serving every slot, each with one replica.
    let masters = cluster.masters();
    assert_eq!(masters.len(), MASTERS, "{masters:?}");
    let covered: usize = masters
        .iter()
        .flat_map(|m| m.slots.iter())
        .map(|&(a, b)| usize::from(b - a) + 1)
        .sum();
    assert_eq!(covered, 16384);
    for m in &masters {
        assert_eq!(cluster.replicas_of(m.port).len(), 1, "{m:?}");
    }
    for p in cluster.ports() {
        assert!(cluster.state_ok(p), "{:?}", cluster.cluster_info(p));
    }
    assert_eq!(cluster.seed_url().split(',').count(), MASTERS);

    // The slot function agrees with the server's.
    for key in [
        "cg:{a:acct-1}:acct",
        "plain",
        "{}x",
        "a{b}c{d}",
        "cg:{a:zz}:bal:p",
    ] {
        let server: u16 = cluster.cmd(
            masters[0].port,
            redis::cmd("CLUSTER").arg("KEYSLOT").arg(key),
        );
        assert_eq!(key_slot(key), server, "{key}");
    }
    assert_eq!(key_slot("cg:{a:x}:acct"), key_slot("cg:{a:x}:bal:b"));

    // SET/GET through redis-cli -c from a node that does not serve the key.
    let key = "cg:{a:harness}:acct";
    let owner = cluster.master_of_key(key);
    let other = masters.iter().find(|m| m.port != owner).unwrap().port;
    assert_eq!(cluster.cli(other, &["SET", key, "v1"]), "OK");
    assert_eq!(cluster.cli(other, &["GET", key]), "v1");
    let on_owner: Option<String> = cluster.cmd(owner, redis::cmd("GET").arg(key));
    assert_eq!(on_owner.as_deref(), Some("v1"));

    // Move the key's slot to another master: the key moves with it.
    let slot = key_slot(key);
    cluster.reshard(owner, other, &[slot]);
    assert_eq!(cluster.master_of_slot(slot), other);
    let on_new: Option<String> = cluster.cmd(other, redis::cmd("GET").arg(key));
    assert_eq!(on_new.as_deref(), Some("v1"));
    let on_old: redis::RedisResult<Option<String>> =
        cluster.try_cmd(owner, redis::cmd("GET").arg(key));
    let moved = on_old.expect_err("the old owner answers MOVED");
    assert!(
        moved.to_string().to_ascii_uppercase().contains("MOVED"),
        "old owner answered {moved}"
    );
    assert_eq!(cluster.cli(owner, &["GET", key]), "v1");

    // SIGKILL the master now serving it: its replica takes over with the key.
    let replica = cluster.replicas_of(other)[0];
    // The write has reached the replica before the kill (WAIT 1).
    let acked: i64 = cluster.cmd(other, redis::cmd("WAIT").arg(1).arg(2000));
    assert_eq!(acked, 1);
    cluster.sigkill(other);
    let promoted = cluster.wait_failover(other);
    assert_eq!(promoted, replica);
    assert_eq!(cluster.master_of_slot(slot), promoted);
    let survivor = cluster.ports().into_iter().find(|&p| p != other).unwrap();
    assert_eq!(cluster.cli(survivor, &["GET", key]), "v1");
    assert_eq!(cluster.masters().len(), MASTERS);

    // SIGSTOP of a master and its replica: the others say the cluster is not ok; SIGCONT
    // brings it back.
    let victim = cluster
        .masters()
        .into_iter()
        .find(|m| m.port != promoted && !cluster.replicas_of(m.port).is_empty())
        .expect("a master with a replica")
        .port;
    let its_replica = cluster.replicas_of(victim)[0];
    cluster.sigstop(victim);
    cluster.sigstop(its_replica);
    let watcher = promoted;
    cluster.wait_for("cluster_state:fail on the others", || {
        cluster
            .cluster_info(watcher)
            .is_some_and(|i| i.contains("cluster_state:fail"))
    });
    cluster.sigcont(victim);
    cluster.sigcont(its_replica);
    cluster.wait_for("cluster_state:ok again", || {
        [watcher, victim, its_replica]
            .iter()
            .all(|&p| cluster.state_ok(p))
    });
}

// ---- the gateway on the cluster ------------------------------------------------------------

/// A starter account's credits and a nano-banana-pro relight's price.
const STARTER_CREDITS: u64 = 100;
const RELIGHT_CREDITS: u64 = 3;
/// A business account's credits and a seedream-4.5 relight's price (1 credit: a lost charge
/// is one credit).
const BUSINESS_CREDITS: u64 = 700;
/// Pay-per-use: a nano-banana-2 relight with n = 2 (µ$) under a 100-cent monthly limit.
const PPU_RELIGHT_MICROS: u64 = 144_000;
const PPU_LIMIT_CENTS: u64 = 100;
/// How long settling (lease 5 s + sweeper slot) and Stripe delivery are waited for.
const SETTLE_DEADLINE: Duration = Duration::from_secs(90);

/// Gateway options on the cluster's seed list (`cluster = true`), with the fault tests' short
/// timeouts and fast sweeper (a hold's lease is connect 1 s + read 3 s + grace 1 s); `store`
/// is appended to `[store]` (e.g. `wait_replicas = 1`), `extra` to the file.
fn options(
    cluster: &RedisCluster,
    backend: &DemoBackend,
    store: &str,
    extra: &str,
) -> GatewayOptions {
    let mut o = GatewayOptions::new(&cluster.seed_url(), backend.addr);
    o.cluster = true;
    o.store_toml = store.to_string();
    o.read_timeout_ms = 3000;
    o.extra_toml = format!("[billing]\nlease_grace_ms = 1000\nsweep_interval_ms = 200\n\n{extra}");
    o
}

/// Options with Stripe enabled against the fake.
fn stripe_options(
    cluster: &RedisCluster,
    backend: &DemoBackend,
    stripe: &FakeStripe,
) -> GatewayOptions {
    let table = format!(
        "[stripe]\nenabled = true\napi_base = \"{}\"\nmeter_event_name = \"creditgate_usage\"\n",
        stripe.api_base()
    );
    let mut o = options(cluster, backend, "", &table);
    o.env = vec![
        ("STRIPE_SECRET_KEY".into(), "sk_test_123".into()),
        ("STRIPE_WEBHOOK_SECRET".into(), "whsec_test_secret".into()),
    ];
    o
}

/// A test account and the master its keys (`cg:{a:<id>}:…`) live on at start.
#[derive(Debug, Clone)]
struct Account {
    id: String,
    slot: u16,
    master: u16,
}

/// `per_master` account ids (`<prefix>0`, `<prefix>1`, …) on each master, in distinct slots,
/// ordered master by master.
fn accounts_on_masters(cluster: &RedisCluster, prefix: &str, per_master: usize) -> Vec<Account> {
    let masters = cluster.masters();
    let mut out: Vec<Account> = Vec::new();
    for m in &masters {
        let mut found = 0;
        for i in 0.. {
            let id = format!("{prefix}{i}");
            let slot = key_slot(&schema::account(&id));
            if m.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
                && out.iter().all(|a| a.slot != slot)
            {
                out.push(Account {
                    id,
                    slot,
                    master: m.port,
                });
                found += 1;
                if found == per_master {
                    break;
                }
            }
        }
    }
    // Every key of an account is on its account key's slot.
    for a in &out {
        assert_eq!(key_slot(&schema::holds(&a.id)), a.slot);
        assert_eq!(key_slot(&schema::balance(&a.id, "x")), a.slot);
    }
    out
}

/// How a test account pays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Billing {
    /// Starter plan, nano-banana-pro relights (3 credits on 100).
    Credits,
    /// Pay-per-use, nano-banana-2 relights with n = 2 (144 000 µ$ under a 100-cent limit).
    PayPerUse,
}

impl Billing {
    fn body(self) -> Value {
        match self {
            Billing::Credits => json!({"model": "nano-banana-pro"}),
            Billing::PayPerUse => json!({"model": "nano-banana-2", "n": 2}),
        }
    }

    fn refusal(self) -> &'static str {
        match self {
            Billing::Credits => "insufficient_credits",
            Billing::PayPerUse => "spending_limit_reached",
        }
    }

    /// One request's price (credits or µ$).
    fn cost(self) -> u64 {
        match self {
            Billing::Credits => RELIGHT_CREDITS,
            Billing::PayPerUse => PPU_RELIGHT_MICROS,
        }
    }

    /// What an account may spend (credits or µ$).
    fn budget(self) -> u64 {
        match self {
            Billing::Credits => STARTER_CREDITS,
            Billing::PayPerUse => PPU_LIMIT_CENTS * 10_000,
        }
    }

    /// What a 2xx answer says was kept.
    fn charged(self, r: &http::Response) -> u64 {
        match self {
            Billing::Credits => r
                .header("X-Credits-Charged")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            Billing::PayPerUse => r.header("X-Charge-Usd").map(usd_to_micros).unwrap_or(0),
        }
    }

    /// Creates the account and one key.
    async fn create(self, gw: &GatewayProcess, id: &str) -> String {
        match self {
            Billing::Credits => {
                gw.create_account(id, "starter", false).await;
            }
            Billing::PayPerUse => {
                gw.create_account_with(json!({
                    "id": id, "plan": "pay_per_use", "payPerUse": true,
                    "spendingLimitCents": PPU_LIMIT_CENTS, "stripeCustomerId": format!("cus_{id}")
                }))
                .await;
            }
        }
        gw.create_key(id).await
    }

    /// What the store says the account spent (credits or µ$), retrying while it is unavailable.
    async fn spent(self, gw: &GatewayProcess, id: &str, key: &str) -> u64 {
        match self {
            Billing::Credits => STARTER_CREDITS - balance(gw, key).await,
            Billing::PayPerUse => {
                let path = format!("/admin/accounts/{id}");
                let r = retry_503(|| gw.admin("GET", &path, None)).await;
                r.json()["monthSpendMicroUsd"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("monthSpendMicroUsd: {}", r.text()))
            }
        }
    }
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

/// Calls `f` until it answers something other than 503 (30 s at most); answers that (200
/// asserted).
async fn retry_503<F, Fut>(mut f: F) -> http::Response
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = http::Response>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = f().await;
        if r.status != 503 || Instant::now() > deadline {
            assert_eq!(r.status, 200, "{}", r.text());
            return r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The key's credit balance, retrying while the store is unavailable.
async fn balance(gw: &GatewayProcess, key: &str) -> u64 {
    let auth = format!("Bearer {key}");
    let headers = [("Authorization", auth.as_str())];
    let r = retry_503(|| http::get(gw.proxy, "/api/credits/balance", &headers)).await;
    r.json()["balance"].as_u64().expect("balance")
}

/// A relight request (`Connection: close`) with the key and JSON body.
fn relight(addr: SocketAddr, key: &str, body: &Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "POST /api/v1/images/relight HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Authorization: Bearer {key}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One request of a test: for which account, when it was sent, what came back.
#[derive(Debug)]
struct Shot {
    account: usize,
    sent: Instant,
    answered: Instant,
    outcome: Outcome,
}

async fn shoot(addr: SocketAddr, key: String, body: Value, account: usize) -> Shot {
    let sent = Instant::now();
    let outcome = exchange(addr, relight(addr, &key, &body)).await;
    Shot {
        account,
        sent,
        answered: Instant::now(),
        outcome,
    }
}

/// What the answers of one account came to.
#[derive(Debug, Default, Clone)]
struct Tally {
    ok: u64,
    /// What the 2xx answers say was kept.
    kept: u64,
    /// 2xx answers without the expected charge (served unbilled).
    ok_without_charge: u64,
    refused: u64,
    unavailable: u64,
    /// Anything else: status + error code, or why the connection was cut.
    unexpected: Vec<String>,
    /// X-Request-Id of every 2xx.
    ok_ids: BTreeSet<String>,
}

fn tally(billing: Billing, shots: &[Shot], accounts: usize) -> Vec<Tally> {
    let mut t = vec![Tally::default(); accounts];
    for s in shots {
        let a = &mut t[s.account];
        match &s.outcome {
            Outcome::Answered(r) if (200..300).contains(&r.status) => {
                a.ok += 1;
                let charged = billing.charged(r);
                a.kept += charged;
                if charged != billing.cost() {
                    a.ok_without_charge += 1;
                }
                a.ok_ids
                    .insert(r.header("X-Request-Id").unwrap_or("<none>").to_string());
            }
            Outcome::Answered(r) if r.status == 402 && r.error_code() == billing.refusal() => {
                a.refused += 1
            }
            Outcome::Answered(r) if r.status == 503 => a.unavailable += 1,
            Outcome::Answered(r) => a.unexpected.push(format!("{} {}", r.status, r.text())),
            Outcome::CutShort(why) => a.unexpected.push(format!("cut short: {why}")),
        }
    }
    t
}

/// Upstream requests per account (by `X-Account-Id`) and their request ids; every one must
/// carry a charge id (it was reserved before it was forwarded).
fn upstream_by_account(backend: &DemoBackend, accounts: &[Account]) -> Vec<BTreeSet<String>> {
    let mut out = vec![BTreeSet::new(); accounts.len()];
    for r in backend.requests() {
        let account = r.header("X-Account-Id").unwrap_or("<none>");
        assert!(
            r.header("X-Creditgate-Charge-Id").is_some(),
            "forwarded without a charge id: {} {:?}",
            r.target,
            r.headers
        );
        let i = accounts
            .iter()
            .position(|a| a.id == account)
            .unwrap_or_else(|| panic!("upstream request of unknown account {account}"));
        out[i].insert(r.header("X-Request-Id").unwrap_or("<none>").to_string());
    }
    out
}

/// Waits until no account has an unsettled hold (read from the master serving it).
async fn wait_settled(cluster: &RedisCluster, accounts: &[Account]) {
    let deadline = Instant::now() + SETTLE_DEADLINE;
    loop {
        let open: Vec<(String, u64)> = accounts
            .iter()
            .map(|a| {
                let key = schema::holds(&a.id);
                let n: u64 = cluster.cmd_on_key(&key, redis::cmd("ZCARD").arg(&key));
                (a.id.clone(), n)
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        if open.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "holds still unsettled after {SETTLE_DEADLINE:?}: {open:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sends requests for one account one at a time until it is refused (402 with the billing's
/// refusal), retrying 503s; answers the shots.
async fn drain(gw: &GatewayProcess, billing: Billing, key: &str, account: usize) -> Vec<Shot> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut shots = Vec::new();
    loop {
        let shot = shoot(gw.proxy, key.to_string(), billing.body(), account).await;
        let done = matches!(&shot.outcome,
            Outcome::Answered(r) if r.status == 402 && r.error_code() == billing.refusal());
        let other = matches!(&shot.outcome,
            Outcome::Answered(r) if !(200..300).contains(&r.status) && r.status != 503 && !done)
            || matches!(&shot.outcome, Outcome::CutShort(_));
        shots.push(shot);
        if done || other {
            return shots;
        }
        assert!(
            Instant::now() < deadline,
            "account {account} not drained within 60 s"
        );
        if shots.len() > 1000 {
            panic!("account {account}: 1000 requests and still not refused");
        }
    }
}

// ---- a. two gateways, accounts on every master ---------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_a_cluster_are_exact() {
    let cluster = RedisCluster::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let gw1 = GatewayProcess::start_with(options(&cluster, &backend, "", "")).await;
    let gw2 = GatewayProcess::start_with(options(&cluster, &backend, "", "")).await;
    let accounts = accounts_on_masters(&cluster, "exact-", 1);
    let masters: BTreeSet<u16> = accounts.iter().map(|a| a.master).collect();
    assert_eq!(masters.len(), MASTERS, "{accounts:?}");
    let mut keys = Vec::new();
    for a in &accounts {
        keys.push(Billing::Credits.create(&gw1, &a.id).await);
    }
    const PER_ACCOUNT: usize = 200;
    let gateways = [&gw1, &gw2];
    let mut tasks = Vec::new();
    for i in 0..PER_ACCOUNT {
        for (k, key) in keys.iter().enumerate() {
            let addr = gateways[(i + k) % 2].proxy;
            tasks.push(tokio::spawn(shoot(
                addr,
                key.clone(),
                Billing::Credits.body(),
                k,
            )));
        }
    }
    let mut shots = Vec::new();
    for t in tasks {
        shots.push(t.await.expect("request task"));
    }
    let tallies = tally(Billing::Credits, &shots, accounts.len());
    let upstream = upstream_by_account(&backend, &accounts);
    let expected_ok = STARTER_CREDITS / RELIGHT_CREDITS;
    for (i, a) in accounts.iter().enumerate() {
        let t = &tallies[i];
        eprintln!(
            "{} (slot {}, master {}): {} ok, {} refused, {} unavailable",
            a.id, a.slot, a.master, t.ok, t.refused, t.unavailable
        );
        assert!(t.unexpected.is_empty(), "{}: {:?}", a.id, t.unexpected);
        assert_eq!(
            t.unavailable, 0,
            "{}: 503 on a healthy cluster: {t:?}",
            a.id
        );
        assert_eq!(t.ok, expected_ok, "{}: {t:?}", a.id);
        assert_eq!(
            t.refused,
            PER_ACCOUNT as u64 - expected_ok,
            "{}: {t:?}",
            a.id
        );
        assert_eq!(t.ok_without_charge, 0, "{}: {t:?}", a.id);
        for gw in gateways {
            assert_eq!(
                balance(gw, &keys[i]).await,
                STARTER_CREDITS % RELIGHT_CREDITS,
                "{}",
                a.id
            );
        }
        assert_eq!(
            upstream[i], t.ok_ids,
            "{}: upstream saw exactly the successes",
            a.id
        );
    }
    assert_eq!(
        backend.request_count() as u64,
        expected_ok * accounts.len() as u64
    );
    wait_settled(&cluster, &accounts).await;
}

// ---- b. reshard under load ------------------------------------------------------------------

/// `at_least` requests (and more, until every slot move is done) over `accounts` and both
/// gateways in bursts of 50, while another thread moves each account's slot to the next
/// master; then every account is drained one request at a time. Every account ends exact:
/// ⌊B/c⌋ successes, B mod c left, the upstream saw exactly the successes.
async fn reshard_under_load(
    cluster: RedisCluster,
    backend: &DemoBackend,
    gateways: [&GatewayProcess; 2],
    billing: Billing,
    accounts: &[Account],
    at_least: usize,
) -> (RedisCluster, Vec<Tally>) {
    let mut keys = Vec::new();
    for a in accounts {
        keys.push(billing.create(gateways[0], &a.id).await);
    }
    let masters: Vec<u16> = cluster.masters().iter().map(|m| m.port).collect();
    // Requests take a while upstream, so holds are open while their keys move.
    backend.set_behaviour(Behaviour {
        delay: Duration::from_millis(50),
        ..Behaviour::default()
    });
    // While the load runs, round after round every account's slot moves (with its keys) to
    // the next master: at least one whole round, and on until the load is sent.
    let moved = Arc::new(AtomicBool::new(false));
    let load_sent = Arc::new(AtomicBool::new(false));
    let resharder = {
        let moved = moved.clone();
        let load_sent = load_sent.clone();
        let mut owners: Vec<(u16, u16)> = accounts.iter().map(|a| (a.slot, a.master)).collect();
        tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(100));
            let started = Instant::now();
            let mut rounds = 0;
            while rounds == 0 || !load_sent.load(Ordering::SeqCst) {
                for (slot, owner) in owners.iter_mut() {
                    let at = masters.iter().position(|m| m == owner).unwrap();
                    let to = masters[(at + 1) % masters.len()];
                    cluster.reshard(*owner, to, &[*slot]);
                    *owner = to;
                }
                rounds += 1;
                moved.store(true, Ordering::SeqCst);
            }
            eprintln!(
                "reshard: {rounds} rounds of {} slot moves in {:?}",
                owners.len(),
                started.elapsed()
            );
            (cluster, owners, rounds)
        })
    };
    let mut tasks = Vec::new();
    let mut sent = 0;
    while sent < at_least || !moved.load(Ordering::SeqCst) {
        for _ in 0..50 {
            let k = sent % accounts.len();
            let addr = gateways[(sent / accounts.len()) % 2].proxy;
            tasks.push(tokio::spawn(shoot(
                addr,
                keys[k].clone(),
                billing.body(),
                k,
            )));
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    load_sent.store(true, Ordering::SeqCst);
    let (cluster, owners, rounds) = resharder.await.expect("resharder");
    assert!(rounds >= 1);
    let mut shots = Vec::new();
    for t in tasks {
        shots.push(t.await.expect("request task"));
    }
    let during = tally(billing, &shots, accounts.len());
    eprintln!("{sent} requests during the reshard:");
    for (a, t) in accounts.iter().zip(&during) {
        eprintln!(
            "  {}: {} ok, {} refused, {} unavailable, {} unexpected",
            a.id,
            t.ok,
            t.refused,
            t.unavailable,
            t.unexpected.len()
        );
    }
    for (i, key) in keys.iter().enumerate() {
        shots.extend(drain(gateways[i % 2], billing, key, i).await);
    }
    let tallies = tally(billing, &shots, accounts.len());
    wait_settled(&cluster, accounts).await;
    let upstream = upstream_by_account(backend, accounts);
    let expected_ok = billing.budget() / billing.cost();
    for (i, a) in accounts.iter().enumerate() {
        let t = &tallies[i];
        let (slot, owner) = owners[i];
        assert_eq!(
            cluster.master_of_slot(slot),
            owner,
            "{}: its slot moved",
            a.id
        );
        assert!(t.unexpected.is_empty(), "{}: {:?}", a.id, t.unexpected);
        assert_eq!(t.ok_without_charge, 0, "{}: {t:?}", a.id);
        assert_eq!(t.ok, expected_ok, "{}: ⌊B/c⌋ successes: {t:?}", a.id);
        assert_eq!(t.kept, expected_ok * billing.cost(), "{}: {t:?}", a.id);
        for gw in gateways {
            assert_eq!(
                billing.spent(gw, &a.id, &keys[i]).await,
                expected_ok * billing.cost(),
                "{}: spent exactly the successes",
                a.id
            );
        }
        assert_eq!(
            upstream[i], t.ok_ids,
            "{}: upstream saw exactly the successes",
            a.id
        );
    }
    assert_eq!(
        backend.request_count() as u64,
        expected_ok * accounts.len() as u64
    );
    (cluster, tallies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reshard_under_load_keeps_every_account_exact() {
    let cluster = RedisCluster::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let gw1 = GatewayProcess::start_with(options(&cluster, &backend, "", "")).await;
    let gw2 = GatewayProcess::start_with(options(&cluster, &backend, "", "")).await;
    let accounts = accounts_on_masters(&cluster, "busy-", 2);
    let (_cluster, _) = reshard_under_load(
        cluster,
        &backend,
        [&gw1, &gw2],
        Billing::Credits,
        &accounts,
        500,
    )
    .await;
    for gw in [&gw1, &gw2] {
        assert!(!gw.log().contains("panicked"), "{}", gw.log());
    }
}

/// The same on pay-per-use with Stripe on (the fake): month spend exact, and each kept
/// charge reaches Stripe exactly once (the outbox walks every shard, also the moved slots).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reshard_under_load_reports_each_pay_per_use_charge_once() {
    let cluster = RedisCluster::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let stripe = FakeStripe::start().await;
    let gw1 = GatewayProcess::start_with(stripe_options(&cluster, &backend, &stripe)).await;
    let gw2 = GatewayProcess::start_with(stripe_options(&cluster, &backend, &stripe)).await;
    let accounts = accounts_on_masters(&cluster, "ppu-", 2);
    let (_cluster, tallies) = reshard_under_load(
        cluster,
        &backend,
        [&gw1, &gw2],
        Billing::PayPerUse,
        &accounts,
        300,
    )
    .await;
    let kept: u64 = tallies.iter().map(|t| t.kept).sum();
    let charges: BTreeSet<String> = backend
        .requests()
        .iter()
        .filter_map(|r| r.header("X-Creditgate-Charge-Id").map(str::to_string))
        .collect();
    let deadline = Instant::now() + SETTLE_DEADLINE;
    while stripe.accepted().len() < charges.len() {
        assert!(
            Instant::now() < deadline,
            "{} of {} charges reached Stripe within {SETTLE_DEADLINE:?}\ngateway log:\n{}",
            stripe.accepted().len(),
            charges.len(),
            gw1.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A late duplicate would show up within a few reporter rounds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let events = stripe.accepted();
    let ids: Vec<String> = events.iter().map(|e| e.identifier.clone()).collect();
    let unique: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(ids.len(), unique.len(), "a charge reported twice: {ids:?}");
    assert_eq!(unique, charges, "every kept charge reported, nothing else");
    let value: u64 = events.iter().map(|e| e.value.parse::<u64>().unwrap()).sum();
    assert_eq!(value, kept, "reported value == kept µ$");
}

// ---- c. a master killed under load ----------------------------------------------------------

/// SIGKILL of a master serving busy accounts while 2 gateways bill them; its replica is
/// promoted. During the gap requests answer 503 (never a 2xx without a charge); afterwards
/// they succeed again. Once every hold is settled, the charges each account's 2xx answers
/// promised are compared with what the store kept: `lost` (answered 2xx, gone with the
/// master) is reported, and must be 0 with `wait_replicas = 1`; `extra` (kept without a 2xx,
/// an overcharge) must be 0 either way; the upstream saw no more requests than were kept.
async fn master_sigkill(wait_replicas: Option<u32>) {
    let mut cluster = RedisCluster::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let store = wait_replicas
        .map(|n| format!("wait_replicas = {n}\n"))
        .unwrap_or_default();
    let gw1 = GatewayProcess::start_with(options(&cluster, &backend, &store, "")).await;
    let gw2 = GatewayProcess::start_with(options(&cluster, &backend, &store, "")).await;
    // Two accounts on the victim (the first master), one on each of the others.
    let all = accounts_on_masters(&cluster, "kill-", 2);
    let victim = all[0].master;
    let accounts: Vec<Account> = {
        let mut seen_other = BTreeSet::new();
        all.into_iter()
            .filter(|a| a.master == victim || seen_other.insert(a.master))
            .collect()
    };
    assert_eq!(accounts.len(), 4, "{accounts:?}");
    let body = json!({"model": "seedream-4.5"});
    let cost = 1;
    let mut keys = Vec::new();
    for a in &accounts {
        gw1.create_account(&a.id, "business", false).await;
        keys.push(gw1.create_key(&a.id).await);
    }
    backend.set_behaviour(Behaviour {
        delay: Duration::from_millis(20),
        ..Behaviour::default()
    });
    // Workers: three per victim account, one per other account, over both gateways.
    let stop = Arc::new(AtomicBool::new(false));
    // Per account: when the last request that succeeded was sent.
    let last_ok: Arc<Vec<Mutex<Option<Instant>>>> =
        Arc::new(accounts.iter().map(|_| Mutex::new(None)).collect());
    let mut workers = Vec::new();
    let mut w = 0;
    for (k, a) in accounts.iter().enumerate() {
        let n = if a.master == victim { 3 } else { 1 };
        for _ in 0..n {
            let addr = [gw1.proxy, gw2.proxy][w % 2];
            w += 1;
            let key = keys[k].clone();
            let body = body.clone();
            let stop = stop.clone();
            let last_ok = last_ok.clone();
            workers.push(tokio::spawn(async move {
                let mut shots = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let shot = shoot(addr, key.clone(), body.clone(), k).await;
                    if matches!(&shot.outcome, Outcome::Answered(r) if r.status == 200) {
                        *last_ok[k].lock().unwrap() = Some(shot.sent);
                    }
                    shots.push(shot);
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
                shots
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed_at = Instant::now();
    cluster.sigkill(victim);
    let (cluster, promoted) = tokio::task::spawn_blocking(move || {
        let promoted = cluster.wait_failover(victim);
        (cluster, promoted)
    })
    .await
    .expect("failover wait");
    let failed_over = Instant::now();
    eprintln!(
        "master {victim} killed; replica {promoted} promoted after {:?}",
        failed_over - killed_at
    );
    // With wait_replicas = 1 the promoted master has no replica, so its shard can acknowledge
    // nothing: its accounts are refused (503) until the killed node, restarted, has rejoined
    // as its replica (what a supervisor restarting it does).
    let mut rejoin = None;
    let cluster = if wait_replicas.is_some() {
        let info: String = cluster.cmd(promoted, redis::cmd("INFO").arg("replication"));
        assert!(
            info.contains("connected_slaves:0"),
            "the promoted master has a replica: {info}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rejoin_started = Instant::now();
        let mut cluster = cluster;
        let cluster = tokio::task::spawn_blocking(move || {
            cluster.restart(victim);
            cluster
        })
        .await
        .expect("restart");
        eprintln!(
            "{victim} restarted and rejoined as a replica of {promoted} after {:?}",
            rejoin_started.elapsed()
        );
        rejoin = Some(rejoin_started);
        assert_eq!(cluster.replicas_of(promoted), vec![victim]);
        cluster
    } else {
        cluster
    };
    // Load goes on until every account has succeeded again with a request sent after the
    // failover, then a second longer.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let again = last_ok
            .iter()
            .all(|t| t.lock().unwrap().is_some_and(|sent| sent > failed_over));
        if again {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("not every account succeeded within 30 s of the failover");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let mut shots = Vec::new();
    for wk in workers {
        shots.extend(wk.await.expect("worker"));
    }
    let mut tallies = vec![Tally::default(); accounts.len()];
    // Tally with cost 1 (seedream-4.5 on credits): a 2xx must say 1 credit.
    for s in &shots {
        let t = &mut tallies[s.account];
        match &s.outcome {
            Outcome::Answered(r) if (200..300).contains(&r.status) => {
                t.ok += 1;
                let charged: u64 = r
                    .header("X-Credits-Charged")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                t.kept += charged;
                if charged != cost {
                    t.ok_without_charge += 1;
                }
            }
            Outcome::Answered(r) if r.status == 503 => t.unavailable += 1,
            Outcome::Answered(r) => t.unexpected.push(format!("{} {}", r.status, r.text())),
            Outcome::CutShort(why) => t.unexpected.push(format!("cut short: {why}")),
        }
    }
    // After the failover, every account's requests succeed again.
    for (k, a) in accounts.iter().enumerate() {
        let again = shots.iter().any(|s| {
            s.account == k
                && s.sent > failed_over
                && matches!(&s.outcome, Outcome::Answered(r) if r.status == 200)
        });
        assert!(
            again,
            "{}: no success after the failover: {:?}",
            a.id, tallies[k]
        );
    }
    // With wait_replicas: 2xx answers of the killed master's accounts to requests sent after
    // the failover and answered before the restart, while the promoted master had no replica
    // to acknowledge anything (asserted empty at the end, after the report).
    let mut acked_alone = Vec::new();
    if let Some(rejoin_started) = rejoin {
        for s in &shots {
            let victim_account = accounts[s.account].master == victim;
            if victim_account && s.sent > failed_over && s.answered < rejoin_started {
                if let Outcome::Answered(r) = &s.outcome {
                    if r.status == 200 {
                        acked_alone.push(format!(
                            "{}: sent {:?} after the failover, answered {:?} before the \
                             restart, {:?}",
                            accounts[s.account].id,
                            s.sent - failed_over,
                            rejoin_started - s.answered,
                            r.header("X-Request-Id")
                        ));
                    }
                }
            }
        }
    }
    for (a, t) in accounts.iter().zip(&tallies) {
        eprintln!(
            "{}: {} ok, {} unavailable, {} unexpected",
            a.id,
            t.ok,
            t.unavailable,
            t.unexpected.len()
        );
    }
    wait_settled(&cluster, &accounts).await;
    let upstream = upstream_by_account(&backend, &accounts);
    let (mut lost_total, mut kept_total, mut upstream_total) = (0, 0, 0);
    for (k, a) in accounts.iter().enumerate() {
        let t = &tallies[k];
        assert!(t.unexpected.is_empty(), "{}: {:?}", a.id, t.unexpected);
        assert_eq!(
            t.ok_without_charge, 0,
            "{}: a 2xx without its charge: {t:?}",
            a.id
        );
        let left = balance(&gw2, &keys[k]).await;
        assert!(left <= BUSINESS_CREDITS);
        let kept_in_store = BUSINESS_CREDITS - left;
        let lost = t.kept.saturating_sub(kept_in_store);
        let extra = kept_in_store.saturating_sub(t.kept);
        eprintln!(
            "{} (master {}{}): {} ok ({} credits answered), {} unavailable, store kept {}, \
             lost {lost}, extra {extra}, upstream {}",
            a.id,
            a.master,
            if a.master == victim { ", killed" } else { "" },
            t.ok,
            t.kept,
            t.unavailable,
            kept_in_store,
            upstream[k].len()
        );
        assert_eq!(extra, 0, "{}: charged without a 2xx", a.id);
        if a.master != victim {
            assert_eq!(lost, 0, "{}: lost on a master that was not killed", a.id);
        }
        lost_total += lost;
        kept_total += kept_in_store;
        upstream_total += upstream[k].len() as u64;
    }
    eprintln!(
        "SIGKILL of a master under load (wait_replicas = {wait_replicas:?}): {lost_total} \
         charges lost, {kept_total} kept, {upstream_total} upstream calls"
    );
    if wait_replicas.is_some() {
        assert!(
            acked_alone.is_empty(),
            "{} 2xx while the killed master's shard had no replica to acknowledge them:\n{}",
            acked_alone.len(),
            acked_alone.join("\n")
        );
        assert_eq!(lost_total, 0, "a charge on a replica is never lost");
        assert!(
            upstream_total <= kept_total / cost,
            "unbilled upstream calls: {upstream_total} > {kept_total}"
        );
    } else if upstream_total > kept_total / cost {
        eprintln!(
            "without wait_replicas: {} upstream calls lost their charge with the master",
            upstream_total - kept_total / cost
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_sigkill_under_load() {
    master_sigkill(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_sigkill_under_load_with_wait_replicas_loses_nothing() {
    master_sigkill(Some(1)).await;
}

// ---- d. /readyz ------------------------------------------------------------------------------

/// Polls `/readyz` until it answers `status` (20 s at most).
async fn wait_readyz(gw: &GatewayProcess, status: u16) -> http::Response {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = http::get(gw.admin, "/readyz", &[]).await;
        if r.status == status {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz still {} (want {status}): {}",
            r.status,
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_reports_cluster_state() {
    let mut cluster = RedisCluster::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let gw = GatewayProcess::start_with(options(&cluster, &backend, "", "")).await;
    let r = wait_readyz(&gw, 200).await;
    assert_eq!(r.json()["status"], "ready", "{}", r.text());
    let accounts = accounts_on_masters(&cluster, "ready-", 1);
    let mut keys = Vec::new();
    for a in &accounts {
        keys.push(Billing::Credits.create(&gw, &a.id).await);
    }
    // A master and its replica frozen: the others flag them failed, the cluster is not ok.
    let victim = accounts[0].master;
    let replica = cluster.replicas_of(victim)[0];
    let watcher = accounts[1].master;
    cluster.sigstop(victim);
    cluster.sigstop(replica);
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.wait_for("cluster_state:fail", || {
            cluster
                .cluster_info(watcher)
                .is_some_and(|i| i.contains("cluster_state:fail"))
        });
        cluster
    })
    .await
    .expect("wait");
    let r = wait_readyz(&gw, 503).await;
    assert_eq!(r.json()["status"], "not_ready", "{}", r.text());
    eprintln!("/readyz with the cluster failing: {}", r.text());
    // Nothing is served meanwhile, also for an account whose master is alive.
    let r = gw
        .generate(&keys[1], "/api/v1/images/relight", Billing::Credits.body())
        .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(backend.request_count(), 0);
    let mut cluster = cluster;
    cluster.sigcont(victim);
    cluster.sigcont(replica);
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.wait_for("cluster_state:ok everywhere", || {
            cluster.ports().iter().all(|&p| cluster.state_ok(p))
        });
        cluster
    })
    .await
    .expect("wait");
    let r = wait_readyz(&gw, 200).await;
    assert_eq!(r.json()["status"], "ready", "{}", r.text());
    // And requests are served again.
    let r = retry_503(|| gw.generate(&keys[1], "/api/v1/images/relight", Billing::Credits.body()))
        .await;
    assert_eq!(r.header("X-Credits-Charged"), Some("3"));

    // A master and its replica killed for good: the surviving nodes answer at once, and say
    // cluster_state:fail; /readyz says so (not only that a node timed out).
    let mut cluster = cluster;
    let victim = accounts[2].master;
    let replica = cluster.replicas_of(victim)[0];
    cluster.sigkill(victim);
    cluster.sigkill(replica);
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.wait_for("cluster_state:fail on the survivors", || {
            cluster
                .ports()
                .iter()
                .filter(|&&p| p != victim && p != replica)
                .all(|&p| {
                    cluster
                        .cluster_info(p)
                        .is_some_and(|i| i.contains("cluster_state:fail"))
                })
        });
        cluster
    })
    .await
    .expect("wait");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let r = http::get(gw.admin, "/readyz", &[]).await;
        assert_ne!(r.status, 200, "ready with two nodes dead: {}", r.text());
        if r.text().contains("cluster_state") {
            assert_eq!(r.status, 503, "{}", r.text());
            break;
        }
        seen.push(r.text());
        assert!(
            Instant::now() < deadline,
            "/readyz never named cluster_state within 20 s: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(cluster);
}
