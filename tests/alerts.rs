//! Low-balance alerts end to end: the real binary (two instances where it matters) in front of
//! the demo backend, a real redis-server, and a local HTTP receiver in this file that records
//! every POST and can be down (its port really refuses connections). Shows: crossing 20 % with
//! 50 concurrent requests fires exactly one alert, 0 % later exactly one more, a refund that
//! lifts the balance back over a threshold does not fire it twice, pay-per-use spend fires at
//! 80 % and 100 % of the limit, a new period fires again, every signature verifies; and a
//! receiver down for over a minute (with the instance that recorded the alerts killed
//! meanwhile) loses none and gets each once afterwards.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use creditgate::demo_backend::{Behaviour, DemoBackend};
use serde_json::{json, Value};
use support::gateway::{free_port, race_relights, GatewayOptions, GatewayProcess};
use support::http;
use support::RedisServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;

const SECRET: &str = "whsec_alerts_test_0123456789";

/// One POST as the receiver got it.
#[derive(Debug, Clone)]
struct Received {
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("alert body is JSON")
    }
}

/// A local webhook receiver on a fixed port that can be taken down and brought back.
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Received>>>,
    task: Option<JoinHandle<()>>,
}

impl Receiver {
    async fn start() -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut r = Self {
            addr,
            got: Arc::default(),
            task: None,
        };
        r.up();
        r
    }

    fn url(&self) -> String {
        format!("http://{}/hooks/low-balance", self.addr)
    }

    fn up(&mut self) {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("reuseaddr");
        socket.bind(self.addr).expect("bind the receiver's port");
        let listener = socket.listen(64).expect("listen");
        let got = self.got.clone();
        self.task = Some(tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let got = got.clone();
                tokio::spawn(async move {
                    if let Some(r) = read_request(stream).await {
                        got.lock().unwrap().push(r);
                    }
                });
            }
        }));
    }

    /// Closes the listener: connections to the port are refused until [`Receiver::up`].
    async fn down(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
        assert!(
            TcpStream::connect(self.addr).await.is_err(),
            "the receiver's port must refuse connections while down"
        );
    }

    fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }

    fn alerts_of(&self, account: &str) -> Vec<Value> {
        self.received()
            .iter()
            .map(Received::json)
            .filter(|v| v["account"] == account)
            .collect()
    }
}

/// Reads one request (header + Content-Length body), answers 200 and closes.
async fn read_request(mut stream: TcpStream) -> Option<Received> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let headers: HashMap<String, String> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[head_end..head_end + len].to_vec();
    let _ = stream
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        .await;
    Some(Received { headers, body })
}

fn alerts_toml(receiver: &Receiver) -> String {
    format!(
        "[alerts]\nenabled = true\nurl = \"{}\"\nsecret_env = \"CREDITGATE_ALERTS_SECRET\"\nrequest_timeout_ms = 1000\nbackoff_min_ms = 200\nbackoff_max_ms = 2000\nclaim_idle_ms = 10000\n",
        receiver.url()
    )
}

async fn start_gateway(
    redis: &RedisServer,
    backend: SocketAddr,
    receiver: &Receiver,
) -> GatewayProcess {
    let mut opts = GatewayOptions::new(&redis.url(), backend);
    opts.extra_toml = alerts_toml(receiver);
    opts.env = vec![("CREDITGATE_ALERTS_SECRET".into(), SECRET.into())];
    GatewayProcess::start_with(opts).await
}

/// Waits until `done` holds (or fails the test after `limit`).
async fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `creditgate_alerts_total{result="<result>"}` (or the backlog gauge) of one instance.
async fn metric(gw: &GatewayProcess, series: &str) -> u64 {
    let text = http::get(gw.metrics, "/metrics", &[]).await.text();
    text.lines()
        .find_map(|l| l.strip_prefix(series).map(|v| v.trim().parse::<f64>()))
        .and_then(Result::ok)
        .map(|v| v as u64)
        .unwrap_or(0)
}

/// The signature verifies against the exact body, with a current timestamp.
fn assert_signed(r: &Received) {
    let header = r.headers.get("creditgate-signature").map(String::as_str);
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let t = creditgate::stripe::signature::verify(SECRET, header, &r.body, now_s)
        .unwrap_or_else(|e| panic!("signature of {:?}: {e}", r.headers));
    assert!((now_s - t).abs() < 300);
    assert!(
        creditgate::stripe::signature::verify("another-secret", header, &r.body, now_s).is_err(),
        "a signature must not verify with another secret"
    );
    assert_eq!(
        r.headers.get("creditgate-alert-id").map(String::as_str),
        r.json()["id"].as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_alert_per_account_threshold_and_period() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let receiver = Receiver::start().await;
    let a = start_gateway(&redis, backend.addr, &receiver).await;
    let b = start_gateway(&redis, backend.addr, &receiver).await;
    let both = [&a, &b];

    // Starter: 100 credits, alerts at 20 % and 0 % left; relight on seedream-4.5 costs 1.
    a.create_account("acme", "starter", false).await;
    let key = a.create_key("acme").await;
    assert_eq!(
        race_relights(&both, &key, "seedream-4.5", 40, "").await,
        (40, 0)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        receiver.alerts_of("acme").is_empty(),
        "60 left: no alert yet"
    );

    // 50 at once over two instances: 60 → 10 crosses 20 % (20 left) exactly once.
    assert_eq!(
        race_relights(&both, &key, "seedream-4.5", 50, "").await,
        (50, 0)
    );
    wait_for(Duration::from_secs(10), "the 20 % alert", || {
        !receiver.alerts_of("acme").is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let alerts = receiver.alerts_of("acme");
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    let first = &alerts[0];
    assert_eq!(first["kind"], "credits_left");
    assert_eq!(first["threshold"], 20);
    assert_eq!(
        first["remaining"], 20,
        "the reservation that crossed left 20"
    );
    assert_eq!(first["limit"], 100);
    let period = first["period"].as_str().expect("period").to_string();
    assert!(first["at"].as_str().is_some_and(|t| t.ends_with('Z')));

    // Drain to 0 with 15 at once: 10 succeed, 5 are refused; 0 % fires exactly once.
    assert_eq!(
        race_relights(&both, &key, "seedream-4.5", 15, "insufficient_credits").await,
        (10, 5)
    );
    wait_for(Duration::from_secs(10), "the 0 % alert", || {
        receiver.alerts_of("acme").len() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let alerts = receiver.alerts_of("acme");
    assert_eq!(alerts.len(), 2, "{alerts:#?}");
    assert_eq!(alerts[1]["threshold"], 0);
    assert_eq!(alerts[1]["remaining"], 0);
    assert_eq!(alerts[1]["period"], period.as_str());

    // A refund that lifts the balance back over 20 % and a second crossing: still one alert.
    a.create_account("refunded", "starter", false).await;
    let rkey = a.create_key("refunded").await;
    assert_eq!(
        race_relights(&both, &rkey, "seedream-4.5", 79, "").await,
        (79, 0)
    );
    // 21 left. The next one reaches 20 (crossing) but the backend fails it: refunded to 21.
    backend.set_behaviour(Behaviour {
        status: 500,
        ..Behaviour::default()
    });
    let r = a
        .generate(
            &rkey,
            "/api/v1/images/relight",
            json!({"model": "seedream-4.5"}),
        )
        .await;
    assert_eq!(r.status, 500, "{}", r.text());
    backend.set_behaviour(Behaviour::default());
    assert_eq!(a.balance(&rkey).await, 21);
    // Crosses 20 % a second time.
    assert_eq!(
        race_relights(&both, &rkey, "seedream-4.5", 1, "").await,
        (1, 0)
    );
    wait_for(
        Duration::from_secs(10),
        "the refunded account's alert",
        || !receiver.alerts_of("refunded").is_empty(),
    )
    .await;
    wait_for(Duration::from_secs(10), "the repeat to be dropped", || {
        metric_sum(&both, "creditgate_alerts_total{result=\"duplicate\"}") >= 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.alerts_of("refunded").len(), 1);

    // Pay-per-use: limit 61 ¢, seedream-4.5 at 6.1 ¢: the 8th request reaches 80 % exactly,
    // the 10th 100 %; two more are refused.
    a.create_account_with(json!({
        "id": "ppu", "plan": "pay_per_use", "payPerUse": true, "spendingLimitCents": 61
    }))
    .await;
    let pkey = a.create_key("ppu").await;
    assert_eq!(
        race_relights(&both, &pkey, "seedream-4.5", 12, "spending_limit_reached").await,
        (10, 2)
    );
    wait_for(Duration::from_secs(10), "the spend alerts", || {
        receiver.alerts_of("ppu").len() >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut spend = receiver.alerts_of("ppu");
    spend.sort_by_key(|v| v["threshold"].as_u64());
    assert_eq!(spend.len(), 2, "{spend:#?}");
    assert_eq!(spend[0]["kind"], "spend");
    assert_eq!(spend[0]["threshold"], 80);
    assert_eq!(spend[0]["spent"], 488_000);
    assert_eq!(spend[0]["limit"], 610_000);
    assert_eq!(spend[1]["threshold"], 100);
    assert_eq!(spend[1]["spent"], 610_000);
    let month = spend[0]["period"].as_str().expect("month");
    assert_eq!(month.len(), 6, "{month}");

    // A new period (the period end moved: a fresh bucket of 100) fires 20 % again.
    let r = a
        .admin(
            "PATCH",
            "/admin/accounts/acme",
            Some(json!({"currentPeriodEnd": "2099-01-15T00:00:00Z"})),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    tokio::time::sleep(Duration::from_millis(1200)).await; // key cache
    assert_eq!(
        a.balance(&key).await,
        100,
        "a new period starts at the allowance"
    );
    assert_eq!(
        race_relights(&both, &key, "seedream-4.5", 80, "").await,
        (80, 0)
    );
    wait_for(Duration::from_secs(10), "the new period's alert", || {
        receiver.alerts_of("acme").len() >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let alerts = receiver.alerts_of("acme");
    assert_eq!(alerts.len(), 3, "{alerts:#?}");
    assert_eq!(alerts[2]["threshold"], 20);
    assert_ne!(alerts[2]["period"], period.as_str());

    // Every POST is signed; every alert is distinct; the metrics agree.
    let all = receiver.received();
    assert_eq!(all.len(), 6);
    for r in &all {
        assert_signed(r);
    }
    let ids: HashSet<String> = all.iter().map(|r| r.json()["id"].to_string()).collect();
    assert_eq!(ids.len(), all.len());
    assert_eq!(
        metric_sum(&both, "creditgate_alerts_total{result=\"delivered\"}"),
        6
    );
    assert_eq!(
        metric_sum(&both, "creditgate_alerts_total{result=\"recorded\"}"),
        6
    );
}

/// The sum of a series over instances, read synchronously from a test closure.
fn metric_sum(gws: &[&GatewayProcess], series: &str) -> u64 {
    let series = series.to_string();
    let addrs: Vec<SocketAddr> = gws.iter().map(|g| g.metrics).collect();
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let mut total = 0;
                for addr in &addrs {
                    let text = http::get(*addr, "/metrics", &[]).await.text();
                    total += text
                        .lines()
                        .find_map(|l| {
                            l.strip_prefix(series.as_str())
                                .map(|v| v.trim().parse::<f64>())
                        })
                        .and_then(Result::ok)
                        .map(|v| v as u64)
                        .unwrap_or(0);
                }
                total
            })
        })
        .join()
        .expect("metrics thread")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receiver_down_for_a_minute_loses_none() {
    let redis = RedisServer::start();
    let backend = DemoBackend::start("127.0.0.1:0").await.unwrap();
    let mut receiver = Receiver::start().await;
    let first = start_gateway(&redis, backend.addr, &receiver).await;
    receiver.down().await;
    let down_since = Instant::now();

    // Five accounts each cross 20 % and 0 %: ten alerts while nobody listens.
    for i in 0..5 {
        let id = format!("down{i}");
        first.create_account(&id, "starter", false).await;
        let key = first.create_key(&id).await;
        assert_eq!(
            race_relights(&[&first], &key, "seedream-4.5", 100, "").await,
            (100, 0)
        );
    }
    wait_for(Duration::from_secs(10), "ten recorded alerts", || {
        metric_sum(&[&first], "creditgate_alerts_total{result=\"recorded\"}") == 10
    })
    .await;
    wait_for(
        Duration::from_secs(10),
        "retries against the closed port",
        || metric_sum(&[&first], "creditgate_alerts_total{result=\"retried\"}") >= 2,
    )
    .await;
    wait_for(Duration::from_secs(10), "the backlog gauge", || {
        metric_sum(&[&first], "creditgate_alerts_backlog") == 10
    })
    .await;

    // The instance that recorded them dies (SIGKILL); another takes its entries over.
    drop(first);
    let second = start_gateway(&redis, backend.addr, &receiver).await;

    // Down for at least a minute, refusing every connection.
    while down_since.elapsed() < Duration::from_secs(61) {
        assert!(TcpStream::connect(receiver.addr).await.is_err());
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(receiver.received().is_empty());
    assert!(metric(&second, "creditgate_alerts_total{result=\"retried\"}").await >= 1);
    receiver.up();

    wait_for(
        Duration::from_secs(30),
        "every alert after the outage",
        || receiver.received().len() >= 10,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all = receiver.received();
    assert_eq!(all.len(), 10, "each alert exactly once");
    let mut seen = HashSet::new();
    for r in &all {
        assert_signed(r);
        let v = r.json();
        assert!(seen.insert((
            v["account"].as_str().unwrap().to_string(),
            v["threshold"].as_u64().unwrap()
        )));
    }
    for i in 0..5 {
        for t in [0, 20] {
            assert!(seen.contains(&(format!("down{i}"), t)), "down{i} at {t} %");
        }
    }
    wait_for(Duration::from_secs(10), "an empty backlog", || {
        metric_sum(&[&second], "creditgate_alerts_backlog") == 0
    })
    .await;
    assert_eq!(
        metric(&second, "creditgate_alerts_total{result=\"delivered\"}").await,
        10
    );
}

fn cli() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_creditgate"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c.env_remove("CREDITGATE_CONFIG");
    c.env_remove("CREDITGATE_ALERTS_SECRET");
    c
}

#[test]
fn thresholds_and_alert_settings_are_checked() {
    // The shipped thresholds, as `creditgate catalog --format json` shows them.
    let out = cli()
        .args(["catalog", "--format", "json"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let starter = v["plans"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "starter")
        .expect("starter")
        .clone();
    assert_eq!(starter["alertCreditsLeftPercent"], json!([0, 20]));
    assert_eq!(starter["alertSpendPercent"], json!([80, 100]));
    assert_eq!(v["payPerUse"]["alertSpendPercent"], json!([80, 100]));

    // Bad thresholds: every one reported, with file and field.
    let tmp = tempfile::tempdir().unwrap();
    let rules = tmp.path().join("rules");
    std::fs::create_dir_all(&rules).unwrap();
    for entry in std::fs::read_dir(support::gateway::shipped_rules()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), rules.join(entry.file_name())).unwrap();
    }
    let plans = std::fs::read_to_string(rules.join("plans.toml")).unwrap();
    let plans = plans.replacen(
        "alert_credits_left_percent = [20, 0]",
        "alert_credits_left_percent = [20, 20, 100]",
        1,
    );
    let plans = match plans.rfind("alert_spend_percent = [80, 100]") {
        Some(i) => format!(
            "{}alert_spend_percent = [0, 101]{}",
            &plans[..i],
            &plans[i + "alert_spend_percent = [80, 100]".len()..]
        ),
        None => panic!("no [pay_per_use] thresholds in the shipped plans"),
    };
    std::fs::write(rules.join("plans.toml"), plans).unwrap();
    let config = tmp.path().join("creditgate.toml");
    std::fs::write(
        &config,
        format!(
            "[upstream]\naddress = \"127.0.0.1:9000\"\n[rules]\ndir = \"{}\"\n",
            rules.display()
        ),
    )
    .unwrap();
    let out = cli()
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "plan[0].alert_credits_left_percent[1]: 20 is listed twice",
        "plan[0].alert_credits_left_percent[2]: 100",
        "pay_per_use.alert_spend_percent[0]: 0",
        "pay_per_use.alert_spend_percent[1]: 101",
    ] {
        assert!(err.contains(needle), "{needle} missing: {err}");
    }

    // Bad [alerts] settings: every one reported with its key.
    std::fs::write(
        &config,
        "[upstream]\naddress = \"127.0.0.1:9000\"\n[alerts]\nenabled = true\nurl = \"ftp://x\"\nsecret_env = \"no such\"\nbackoff_min_ms = 5000\nbackoff_max_ms = 1000\nclaim_idle_ms = 1000\n",
    )
    .unwrap();
    let out = cli()
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for field in [
        "alerts.url",
        "alerts.secret_env",
        "alerts.backoff_min_ms",
        "alerts.claim_idle_ms",
    ] {
        assert!(err.contains(field), "{field} missing: {err}");
    }

    // Enabled without the secret: the gateway refuses to start (nothing would be signed).
    std::fs::write(
        &config,
        "[upstream]\naddress = \"127.0.0.1:9000\"\n[alerts]\nenabled = true\nurl = \"http://127.0.0.1:9/\"\n",
    )
    .unwrap();
    let out = cli()
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CREDITGATE_ALERTS_SECRET"), "{err}");
}
