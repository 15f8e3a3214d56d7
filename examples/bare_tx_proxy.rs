//! The load benchmark's second baseline: the bare Pingora passthrough of `bare_proxy.rs` plus
//! exactly one Redis transaction per request, so `scripts/load.sh` can say what creditgate costs
//! on top of "Pingora + the one round trip that exact billing needs" — the part of a billed
//! request that no gateway code can remove.
//!
//! ```text
//! cargo run --release --example bare_tx_proxy -- <listen addr> <upstream addr> <redis url> [threads]
//! cargo run --release --example bare_tx_proxy -- 127.0.0.1:8181 127.0.0.1:9000 redis+unix:///tmp/r.sock 2
//! ```
//!
//! Per request, in `request_filter`, one `MULTI/EXEC` of the same shape as creditgate's credit
//! reservation:
//!
//! ```text
//! MULTI
//!   SET     bare:{a:load}:bal:period <ALLOWANCE> NX PXAT <exp>
//!   DECRBY  bare:{a:load}:bal:period <AMOUNT>
//!   HSET    bare:{a:load}:rsv:ch_<24 hex> kind credits bucket period amount <AMOUNT> bucket_expires_ms <exp>
//!   PEXPIRE bare:{a:load}:rsv:ch_<24 hex> <RECORD_TTL_MS>
//! EXEC
//! ```
//!
//! - one balance key for one "account", seeded once by `SET NX` at an allowance (2^62) that no
//!   benchmark can spend (2^62 / 8 credits ≈ 5.8·10^17 requests), so it never needs a refill
//!   and never takes the refusal path; `<exp>` is 31 days after start, like a period's end;
//! - a distinct reservation hash per request (a random per-process prefix and a counter, as long
//!   as creditgate's `ch_` + 24 ids), with creditgate's default credit-record TTL (1 h), so the
//!   keyspace grows the same way;
//! - on one multiplexed redis-rs `ConnectionManager` (the same crate and features as the
//!   gateway, configured like the gateway's ledger), created lazily on the first request, inside
//!   Pingora's runtime;
//! - each transaction timed by Pingora's `fast_timeout` (the gateway's default store timeout,
//!   200 ms), and failing closed: a Redis error, a timeout or a reply that is not a non-negative
//!   balance is answered `503` and nothing goes upstream.
//!
//! Deliberately not done: creditgate's transaction sharing (it sends the reservations that
//! concurrent requests start together as one `MULTI/EXEC`); here every request sends its own,
//! which is the plain design the gateway's is measured against. Nothing else either — no auth,
//! no rules, no settlement, no metrics, no logging, the system allocator like `bare_proxy` —
//! and this file uses none of the gateway's code, so the baseline does not move when the
//! gateway does. `upstream_peer` is `bare_proxy`'s, with the same timeouts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use pingora::prelude::HttpPeer;
use pingora::proxy::{ProxyHttp, Session};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::time::fast_timeout::fast_timeout;
use pingora::Result;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

/// The balance key of the one "account" (its own prefix: it shares Redis with creditgate).
const BALANCE: &str = "bare:{a:load}:bal:period";
/// The bucket id written into each reservation record.
const BUCKET: &str = "period";
/// The seeded balance: far more than any run can spend.
const ALLOWANCE: i64 = 1 << 62;
/// Credits taken per request (any positive amount; the command shape is what matters).
const AMOUNT: i64 = 8;
/// creditgate's default credit-reservation record TTL (`Config::credit_record_ttl_ms`: 1 h).
const RECORD_TTL_MS: i64 = 3_600_000;
/// The balance's expiry: 31 days after start, like the end of a billing period.
const PERIOD_MS: i64 = 31 * 24 * 3_600_000;
/// creditgate's default `store.command_timeout_ms`.
const COMMAND_TIMEOUT: Duration = Duration::from_millis(200);

struct BareTxProxy {
    upstream: String,
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    /// Random per process, so reservation keys of successive runs on one Redis do not collide.
    id_prefix: u32,
    next_id: AtomicU64,
    expires_at_ms: i64,
}

/// Why a request was refused (answered 503).
enum TxError {
    Redis(redis::RedisError),
    Timeout,
    Overdrawn(i64),
}

impl std::fmt::Display for TxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TxError::Redis(e) => write!(f, "redis: {e}"),
            TxError::Timeout => write!(f, "timed out after {COMMAND_TIMEOUT:?}"),
            TxError::Overdrawn(left) => write!(f, "balance below zero ({left})"),
        }
    }
}

impl BareTxProxy {
    /// The one multiplexed connection, made by the first request on the runtime it runs on.
    async fn conn(&self) -> std::result::Result<ConnectionManager, redis::RedisError> {
        self.conn
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(COMMAND_TIMEOUT))
                    .set_response_timeout(None)
                    .set_min_delay(Duration::from_millis(50))
                    .set_max_delay(Duration::from_millis(500))
                    .set_number_of_retries(6);
                ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            })
            .await
            .cloned()
    }

    /// The transaction; answers the balance left.
    async fn reserve(&self) -> std::result::Result<i64, TxError> {
        let mut conn = self.conn().await.map_err(TxError::Redis)?;
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let rsv = format!("bare:{{a:load}}:rsv:ch_{:08x}{n:016x}", self.id_prefix);
        let mut p = redis::pipe();
        p.atomic();
        p.cmd("SET")
            .arg(BALANCE)
            .arg(ALLOWANCE)
            .arg("NX")
            .arg("PXAT")
            .arg(self.expires_at_ms)
            .ignore();
        p.cmd("DECRBY").arg(BALANCE).arg(AMOUNT);
        p.cmd("HSET")
            .arg(&rsv)
            .arg("kind")
            .arg("credits")
            .arg("bucket")
            .arg(BUCKET)
            .arg("amount")
            .arg(AMOUNT)
            .arg("bucket_expires_ms")
            .arg(self.expires_at_ms)
            .ignore();
        p.cmd("PEXPIRE").arg(&rsv).arg(RECORD_TTL_MS).ignore();
        let (left,): (i64,) = match fast_timeout(COMMAND_TIMEOUT, p.query_async(&mut conn)).await {
            Ok(answer) => answer.map_err(TxError::Redis)?,
            Err(_) => return Err(TxError::Timeout),
        };
        if left < 0 {
            return Err(TxError::Overdrawn(left));
        }
        Ok(left)
    }
}

#[async_trait]
impl ProxyHttp for BareTxProxy {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        match self.reserve().await {
            Ok(_) => Ok(false),
            Err(e) => {
                eprintln!("bare_tx_proxy: 503: {e}");
                session.respond_error(503).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(self.upstream.as_str(), false, String::new());
        peer.options.connection_timeout = Some(Duration::from_millis(2_000));
        peer.options.read_timeout = Some(Duration::from_millis(120_000));
        Ok(Box::new(peer))
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: bare_tx_proxy <listen addr> <upstream addr> <redis url> [threads (default 2)]"
    );
    std::process::exit(2);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream), Some(redis_url)) = (args.next(), args.next(), args.next())
    else {
        usage()
    };
    let threads = match args.next() {
        None => 2,
        Some(t) => t.parse::<usize>().unwrap_or_else(|_| usage()),
    };
    let client = redis::Client::open(redis_url.as_str()).unwrap_or_else(|e| {
        eprintln!("bare_tx_proxy: redis url {redis_url:?}: {e}");
        std::process::exit(2);
    });
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));

    let run_dir = std::env::temp_dir();
    let pid = std::process::id();
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        pid_file: run_dir
            .join(format!("bare-tx-proxy-{pid}.pid"))
            .display()
            .to_string(),
        upgrade_sock: run_dir
            .join(format!("bare-tx-proxy-{pid}-upgrade.sock"))
            .display()
            .to_string(),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let app = BareTxProxy {
        upstream,
        client,
        conn: OnceCell::new(),
        id_prefix: rand::random(),
        next_id: AtomicU64::new(0),
        expires_at_ms: now_ms.saturating_add(PERIOD_MS),
    };
    let mut proxy = pingora::proxy::http_proxy_service(&server.configuration, app);
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    eprintln!(
        "bare tx proxy listening on {listen} with {threads} threads, one MULTI/EXEC per request"
    );
    server.run_forever();
}
