//! Runs the real `creditgate` binary for the integration tests: free loopback ports, a config
//! file in a temp dir pointing at the test's redis-server and recording backend, and helpers to
//! create accounts and keys through the admin API.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::http;

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub struct GatewayProcess {
    child: Option<Child>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

/// Options for one gateway process.
pub struct GatewayOptions {
    pub redis_url: String,
    pub upstream: SocketAddr,
    /// Extra TOML appended to the generated config (e.g. a `[stripe]` table).
    pub extra_toml: String,
    /// Extra `key = value` lines for the `[server]` table.
    pub server_toml: String,
    /// A rules directory; the shipped one when `None`.
    pub rules_dir: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    pub read_timeout_ms: u64,
    pub watch_rules: bool,
    /// `store.backend = "memory"` instead of the Redis at `redis_url`.
    pub memory_store: bool,
    /// `store.cluster = true`: `redis_url` is a comma-separated seed list of a Redis Cluster.
    pub cluster: bool,
    /// Extra `key = value` lines for the `[store]` table (e.g. `wait_replicas = 1`).
    pub store_toml: String,
}

impl GatewayOptions {
    pub fn new(redis_url: &str, upstream: SocketAddr) -> Self {
        Self {
            redis_url: redis_url.to_string(),
            upstream,
            extra_toml: String::new(),
            server_toml: String::new(),
            rules_dir: None,
            env: Vec::new(),
            read_timeout_ms: 5000,
            watch_rules: true,
            memory_store: false,
            cluster: false,
            store_toml: String::new(),
        }
    }
}

/// The `[store]` lines beyond backend, url and timeout (`cluster`, then `store_toml`).
fn store_lines(opts: &GatewayOptions) -> String {
    let mut lines = String::new();
    if opts.cluster {
        lines.push_str("cluster = true\n");
    }
    lines.push_str(&opts.store_toml);
    if !lines.ends_with('\n') {
        lines.push('\n');
    }
    lines
}

pub fn shipped_rules() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("lua-free-rules")
}

impl GatewayProcess {
    pub async fn start(redis_url: &str, upstream: SocketAddr) -> Self {
        Self::start_with(GatewayOptions::new(redis_url, upstream)).await
    }

    pub async fn start_with(opts: GatewayOptions) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let rules = opts.rules_dir.clone().unwrap_or_else(shipped_rules);
        let config = format!(
            r#"[server]
listen = "{proxy}"
admin_listen = "{admin}"
metrics_listen = "{metrics}"
threads = 2
shutdown_grace_s = 2
{server_extra}

[upstream]
address = "{up}"
connect_timeout_ms = 1000
read_timeout_ms = {read_timeout}

[store]
backend = "{backend}"
url = "{redis}"
command_timeout_ms = 200
{store_extra}
[rules]
dir = "{rules}"
watch = {watch}

{extra}
"#,
            up = opts.upstream,
            read_timeout = opts.read_timeout_ms,
            redis = opts.redis_url,
            backend = if opts.memory_store { "memory" } else { "redis" },
            rules = rules.display(),
            watch = opts.watch_rules,
            extra = opts.extra_toml,
            server_extra = opts.server_toml,
            store_extra = store_lines(&opts),
        );
        let config_path = dir.path().join("creditgate.toml");
        std::fs::write(&config_path, config).expect("write config");
        let log_path = dir.path().join("gateway.log");
        let mut g = Self {
            child: None,
            proxy,
            admin,
            metrics,
            dir,
            config_path,
            log_path,
        };
        g.spawn(&opts.env);
        g.wait_ready().await;
        g
    }

    fn spawn(&mut self, env: &[(String, String)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("log file");
        let err = log.try_clone().expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_creditgate"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .env("CREDITGATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err));
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn creditgate"));
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if tokio::net::TcpStream::connect(self.admin).await.is_ok()
                && tokio::net::TcpStream::connect(self.proxy).await.is_ok()
            {
                let r = http::get(self.admin, "/healthz", &[]).await;
                if r.status == 200 {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!("gateway did not start; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} failed");
    }

    /// Waits for the process to exit; returns whether it did within `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(_)) = c.try_wait() {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    // ---- admin helpers -------------------------------------------------------------------

    pub async fn admin(&self, method: &str, path: &str, body: Option<Value>) -> http::Response {
        let auth = format!("Bearer {ADMIN_TOKEN}");
        let text = body.map(|b| b.to_string());
        http::request(
            self.admin,
            method,
            path,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            text.as_deref().map(str::as_bytes),
        )
        .await
    }

    /// Creates an account (asserting 201) with the given JSON fields merged over the id.
    pub async fn create_account(&self, id: &str, plan: &str, pay_per_use: bool) -> Value {
        self.create_account_with(json!({"id": id, "plan": plan, "payPerUse": pay_per_use}))
            .await
    }

    pub async fn create_account_with(&self, body: Value) -> Value {
        let r = self.admin("POST", "/admin/accounts", Some(body)).await;
        assert_eq!(r.status, 201, "create account: {}", r.text());
        r.json()
    }

    /// Creates a key for the account (asserting 201) and returns the full key.
    pub async fn create_key(&self, account: &str) -> String {
        let r = self
            .admin(
                "POST",
                &format!("/admin/accounts/{account}/keys"),
                Some(json!({})),
            )
            .await;
        assert_eq!(r.status, 201, "create key: {}", r.text());
        r.json()["key"].as_str().expect("key").to_string()
    }

    /// POSTs a JSON generation request with the key.
    pub async fn generate(&self, key: &str, path: &str, body: Value) -> http::Response {
        let auth = format!("Bearer {key}");
        http::post_json(self.proxy, path, &[("Authorization", &auth)], &body).await
    }

    pub async fn balance(&self, key: &str) -> u64 {
        let auth = format!("Bearer {key}");
        let r = http::get(
            self.proxy,
            "/api/credits/balance",
            &[("Authorization", &auth)],
        )
        .await;
        assert_eq!(r.status, 200, "balance: {}", r.text());
        r.json()["balance"].as_u64().expect("balance")
    }
}

/// Starts `n` relight requests for `model` at once, spread round-robin over `gateways`; the
/// handles resolve to the responses.
pub fn spawn_relights(
    gateways: &[&GatewayProcess],
    key: &str,
    model: &str,
    n: usize,
) -> Vec<tokio::task::JoinHandle<http::Response>> {
    (0..n)
        .map(|i| {
            let addr = gateways[i % gateways.len()].proxy;
            let auth = format!("Bearer {key}");
            let body = json!({ "model": model });
            tokio::spawn(async move {
                http::post_json(
                    addr,
                    "/api/v1/images/relight",
                    &[("Authorization", &auth)],
                    &body,
                )
                .await
            })
        })
        .collect()
}

/// Runs `n` relights at once and counts (200s, refusals with `refusal_code`); anything else
/// fails the test.
pub async fn race_relights(
    gateways: &[&GatewayProcess],
    key: &str,
    model: &str,
    n: usize,
    refusal_code: &str,
) -> (usize, usize) {
    let (mut ok, mut refused) = (0, 0);
    for t in spawn_relights(gateways, key, model, n) {
        let r = t.await.expect("request task");
        match r.status {
            200 => ok += 1,
            402 if r.error_code() == refusal_code => refused += 1,
            other => panic!("unexpected {other}: {}", r.text()),
        }
    }
    (ok, refused)
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
