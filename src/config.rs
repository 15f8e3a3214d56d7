//! The gateway's settings (`config/creditgate.toml`): read once at start, validated once, every
//! problem reported together with its key. Secrets are not here: the file names the environment
//! variables that hold them. The reloadable catalog lives in the rules directory, not here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

/// Where the config is read from when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "config/creditgate.toml";
/// Overrides [`DEFAULT_CONFIG_PATH`].
pub const CONFIG_ENV: &str = "CREDITGATE_CONFIG";
/// Largest JSON body the gateway inspects (Pingora's retry buffer re-sends it unchanged).
pub const MAX_INSPECTED_BODY_LIMIT: usize = 64 * 1024;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub store: StoreConfig,
    pub rules: RulesConfig,
    pub billing: BillingConfig,
    pub stripe: StripeConfig,
    pub admin: AdminConfig,
    pub logging: LoggingConfig,
    pub alerts: crate::alerts::AlertsConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    pub admin_listen: String,
    pub metrics_listen: String,
    pub threads: usize,
    /// JSON request bodies up to this size are read to find the model and count; larger ones → 413.
    pub max_json_body_bytes: usize,
    /// Seconds in-flight requests get to finish on SIGTERM; the process exits as soon as they
    /// have, at the latest when this ends.
    pub shutdown_grace_s: u64,
    /// Largest request header block (request line and header lines) → 431 beyond.
    pub max_header_bytes: usize,
    /// A request header must arrive whole within this, or the connection is closed.
    pub header_timeout_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:8081".into(),
            metrics_listen: "127.0.0.1:9090".into(),
            threads: 2,
            max_json_body_bytes: MAX_INSPECTED_BODY_LIMIT,
            shutdown_grace_s: 5,
            max_header_bytes: crate::http_limits::DEFAULT_MAX_HEADER_BYTES,
            header_timeout_ms: crate::http_limits::DEFAULT_HEADER_TIMEOUT_MS,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub address: String,
    pub tls: bool,
    pub sni: String,
    pub connect_timeout_ms: u64,
    pub read_timeout_ms: u64,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            address: "127.0.0.1:9000".into(),
            tls: false,
            sni: String::new(),
            connect_timeout_ms: 2000,
            read_timeout_ms: 120_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    Redis,
    Memory,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    pub url: String,
    pub cluster: bool,
    pub command_timeout_ms: u64,
    pub fail_mode: String,
    /// Replicas that must acknowledge each money transaction (`WAIT`) before it counts; 0: none.
    pub wait_replicas: u8,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Redis,
            url: "redis://127.0.0.1:6379".into(),
            cluster: false,
            command_timeout_ms: 200,
            fail_mode: "closed".into(),
            wait_replicas: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    pub dir: PathBuf,
    pub watch: bool,
}

impl Default for RulesConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("lua-free-rules"),
            watch: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillingConfig {
    pub default_spending_limit_cents: u64,
    /// How long API key lookups are cached per instance; bounds how late a revocation bites.
    pub key_cache_ttl_ms: u64,
    /// How long a pay-per-use reservation record is kept: the Stripe reporter reads it (settled,
    /// refunded) until the charge is reported, also through a long Stripe outage. Credit
    /// reservation records live only as long as settlement can need them
    /// ([`Config::credit_record_ttl_ms`]).
    pub reservation_ttl_s: u64,
    /// What the sweeper does with a hold whose lease ended unsettled (its gateway died or lost
    /// the store mid-request): `refund` (default; the client got no result) or `keep`.
    pub orphan_policy: crate::ledger::OrphanPolicy,
    /// A hold's lease is the longest request (connect + read timeout) plus this grace, so a
    /// request still waiting for its upstream is never swept ([`Config::lease_ms`]).
    pub lease_grace_ms: u64,
    /// How often each instance's sweeper looks for holds whose lease ended.
    pub sweep_interval_ms: u64,
    /// How long an async job (`settle = "job"`) may take to reach its final state: its hold's
    /// lease; a job not final by then is settled by the sweeper under `orphan_policy`.
    pub job_ttl_s: u64,
    /// How long usage history (`GET /api/usage`, `creditgate usage`) is kept, in days (1..=3660).
    pub usage_retention_days: u64,
}

impl Default for BillingConfig {
    fn default() -> Self {
        Self {
            default_spending_limit_cents: 5000,
            key_cache_ttl_ms: 500,
            reservation_ttl_s: 7 * 24 * 3600,
            orphan_policy: crate::ledger::OrphanPolicy::Refund,
            lease_grace_ms: 60_000,
            sweep_interval_ms: 5_000,
            job_ttl_s: 3600,
            usage_retention_days: crate::ledger::usage::DEFAULT_RETENTION_DAYS,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StripeConfig {
    pub enabled: bool,
    pub api_base: String,
    pub meter_event_name: String,
    pub secret_key_env: String,
    pub webhook_secret_env: String,
}

impl Default for StripeConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            api_base: "https://api.stripe.com/".into(),
            meter_event_name: "creditgate_usage".into(),
            secret_key_env: "STRIPE_SECRET_KEY".into(),
            webhook_secret_env: "STRIPE_WEBHOOK_SECRET".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub token_env: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            token_env: "CREDITGATE_ADMIN_TOKEN".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    pub format: LogFormat,
}

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub file: String,
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}: {}", self.file, self.field, self.message)
    }
}

/// The config path to use: the flag, else `$CREDITGATE_CONFIG`, else the default.
pub fn resolve_path(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    match std::env::var_os(CONFIG_ENV) {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from(DEFAULT_CONFIG_PATH),
    }
}

impl UpstreamConfig {
    /// The backend as Pingora dials it, with the configured connect and read timeouts.
    pub fn peer(&self) -> pingora::prelude::HttpPeer {
        let mut peer =
            pingora::prelude::HttpPeer::new(self.address.as_str(), self.tls, self.sni.clone());
        peer.options.connection_timeout =
            Some(std::time::Duration::from_millis(self.connect_timeout_ms));
        peer.options.read_timeout = Some(std::time::Duration::from_millis(self.read_timeout_ms));
        peer
    }
}

impl Config {
    /// How long a credit reservation record is kept: nothing reads it after its request is
    /// settled, so it lives for the hold's lease ([`Config::lease_ms`]) plus ten minutes for the
    /// sweeper and retried refunds, at least an hour, at most `billing.reservation_ttl_s`. (At 7 days it
    /// held ~200 bytes of Redis per billed request for a week.)
    pub fn credit_record_ttl_ms(&self) -> i64 {
        // The lease covers the longest request (connect + read timeout + grace); the sweeper
        // needs the record for a while after it ends.
        let lease = u64::try_from(self.lease_ms()).unwrap_or(u64::MAX);
        let needed = lease.saturating_add(10 * 60 * 1000).max(3600 * 1000);
        let cap = self.billing.reservation_ttl_s.saturating_mul(1000);
        i64::try_from(needed.min(cap)).unwrap_or(i64::MAX)
    }

    /// How long a hold is leased to the request that made it: connect + read timeout +
    /// `billing.lease_grace_ms`. Unsettled after that, the sweeper settles it.
    pub fn lease_ms(&self) -> i64 {
        let ms = self
            .upstream
            .connect_timeout_ms
            .saturating_add(self.upstream.read_timeout_ms)
            .saturating_add(self.billing.lease_grace_ms);
        i64::try_from(ms).unwrap_or(i64::MAX)
    }

    /// How long an async job's record (and its reservation's) is kept: `billing.job_ttl_s` plus
    /// the ten minutes the sweeper and retried refunds may need after the job's lease ends.
    pub fn job_keep_ms(&self) -> i64 {
        let ms = self
            .billing
            .job_ttl_s
            .saturating_mul(1000)
            .saturating_add(10 * 60 * 1000);
        i64::try_from(ms).unwrap_or(i64::MAX)
    }

    /// How long a pay-per-use reservation record is kept (`billing.reservation_ttl_s`).
    pub fn spend_record_ttl_ms(&self) -> i64 {
        i64::try_from(self.billing.reservation_ttl_s.saturating_mul(1000)).unwrap_or(i64::MAX)
    }

    /// Reads and validates the file; every problem found is returned together.
    pub fn load(path: &Path) -> Result<Config, Vec<ConfigProblem>> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            vec![ConfigProblem {
                file: file.clone(),
                field: "-".into(),
                message: format!("cannot read: {e}"),
            }]
        })?;
        Self::parse(&file, &text)
    }

    /// Parses TOML text; each section is read on its own so that problems in several sections
    /// are all reported.
    pub fn parse(file: &str, text: &str) -> Result<Config, Vec<ConfigProblem>> {
        let problem = |field: &str, message: String| ConfigProblem {
            file: file.to_string(),
            field: field.to_string(),
            message,
        };
        let table: toml::Table = toml::from_str(text)
            .map_err(|e| vec![problem("-", format!("not valid TOML: {}", e.message()))])?;
        let mut problems = Vec::new();
        let mut config = Config::default();
        let mut upstream_address_given = false;
        for (section, value) in table {
            match section.as_str() {
                "server" => read_section(&section, value, &mut config.server, &mut problems),
                "upstream" => {
                    upstream_address_given =
                        value.as_table().is_some_and(|t| t.contains_key("address"));
                    read_section(&section, value, &mut config.upstream, &mut problems)
                }
                "store" => read_section(&section, value, &mut config.store, &mut problems),
                "rules" => read_section(&section, value, &mut config.rules, &mut problems),
                "billing" => read_section(&section, value, &mut config.billing, &mut problems),
                "stripe" => read_section(&section, value, &mut config.stripe, &mut problems),
                "admin" => read_section(&section, value, &mut config.admin, &mut problems),
                "logging" => read_section(&section, value, &mut config.logging, &mut problems),
                "alerts" => read_section(&section, value, &mut config.alerts, &mut problems),
                other => problems.push((other.to_string(), "unknown section".to_string())),
            }
        }
        if !upstream_address_given {
            problems.push(("upstream.address".into(), "is required".into()));
        }
        problems.extend(config.validate());
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems
                .into_iter()
                .map(|(field, message)| problem(&field, message))
                .collect())
        }
    }

    /// Checks values that parse but make no sense; returns (field, message) pairs.
    fn validate(&self) -> Vec<(String, String)> {
        let mut p: Vec<(String, String)> = Vec::new();
        let mut need_addr = |field: &str, value: &str| {
            if value.parse::<SocketAddr>().is_err() {
                p.push((
                    field.into(),
                    format!("`{value}` is not an ip:port socket address"),
                ));
            }
        };
        need_addr("server.listen", &self.server.listen);
        need_addr("server.admin_listen", &self.server.admin_listen);
        need_addr("server.metrics_listen", &self.server.metrics_listen);
        if self.upstream.address.trim().is_empty() || !self.upstream.address.contains(':') {
            p.push((
                "upstream.address".into(),
                format!("`{}` is not a host:port address", self.upstream.address),
            ));
        }
        if self.server.threads == 0 || self.server.threads > 256 {
            p.push(("server.threads".into(), "must be between 1 and 256".into()));
        }
        if self.server.max_json_body_bytes == 0
            || self.server.max_json_body_bytes > MAX_INSPECTED_BODY_LIMIT
        {
            p.push((
                "server.max_json_body_bytes".into(),
                format!("must be between 1 and {MAX_INSPECTED_BODY_LIMIT}"),
            ));
        }
        if self.server.max_header_bytes < 1024
            || self.server.max_header_bytes > crate::http_limits::MAX_HEADER_BYTES_LIMIT
        {
            p.push((
                "server.max_header_bytes".into(),
                format!(
                    "must be between 1024 and {} (Pingora refuses larger header blocks itself)",
                    crate::http_limits::MAX_HEADER_BYTES_LIMIT
                ),
            ));
        }
        if self.server.header_timeout_ms < 100 || self.server.header_timeout_ms > 120_000 {
            p.push((
                "server.header_timeout_ms".into(),
                "must be between 100 and 120000".into(),
            ));
        }
        if self.server.shutdown_grace_s == 0 || self.server.shutdown_grace_s > 3600 {
            p.push((
                "server.shutdown_grace_s".into(),
                "must be between 1 and 3600".into(),
            ));
        }
        if self.upstream.tls {
            p.push((
                "upstream.tls".into(),
                "this build proxies plain HTTP only; terminate upstream TLS in a sidecar".into(),
            ));
        }
        if self.upstream.connect_timeout_ms == 0 {
            p.push((
                "upstream.connect_timeout_ms".into(),
                "must be positive".into(),
            ));
        }
        if self.upstream.read_timeout_ms == 0 {
            p.push(("upstream.read_timeout_ms".into(), "must be positive".into()));
        }
        if self.store.backend == StoreBackend::Redis {
            let urls: Vec<&str> = match self.store.cluster {
                true => self.store.url.split(',').map(str::trim).collect(),
                false => vec![self.store.url.as_str()],
            };
            for url in urls {
                if self.store.cluster && !url.starts_with("redis://") {
                    p.push((
                        "store.url".into(),
                        format!("`{url}`: with store.cluster = true, store.url is a comma-separated list of redis://host:port seed nodes"),
                    ));
                    continue;
                }
                if !(url.starts_with("redis://")
                    || url.starts_with("rediss://")
                    || url.starts_with("redis+unix://")
                    || url.starts_with("unix://"))
                {
                    p.push((
                        "store.url".into(),
                        format!("`{url}` must start with redis:// or redis+unix://"),
                    ));
                }
                if url.starts_with("rediss://") {
                    p.push((
                        "store.url".into(),
                        "rediss:// (TLS to Redis) is not built in; use a local TLS tunnel (stunnel, a sidecar) and redis://".into(),
                    ));
                }
            }
        }
        if self.store.cluster && self.store.backend == StoreBackend::Memory {
            p.push((
                "store.cluster".into(),
                "needs store.backend = \"redis\"".into(),
            ));
        }
        if self.store.wait_replicas > 16 {
            p.push((
                "store.wait_replicas".into(),
                "must be between 0 and 16".into(),
            ));
        }
        if self.store.command_timeout_ms == 0 || self.store.command_timeout_ms > 60_000 {
            p.push((
                "store.command_timeout_ms".into(),
                "must be between 1 and 60000".into(),
            ));
        }
        if self.store.fail_mode != "closed" {
            p.push((
                "store.fail_mode".into(),
                format!(
                    "`{}` is not allowed: only \"closed\" (a store outage answers 503, never serves unbilled)",
                    self.store.fail_mode
                ),
            ));
        }
        if self.billing.default_spending_limit_cents > crate::money::MAX_SPENDING_LIMIT_CENTS {
            p.push((
                "billing.default_spending_limit_cents".into(),
                format!("must be at most {}", crate::money::MAX_SPENDING_LIMIT_CENTS),
            ));
        }
        if self.billing.key_cache_ttl_ms > 1000 {
            p.push((
                "billing.key_cache_ttl_ms".into(),
                "must be at most 1000 (revocations must bite within 1 s)".into(),
            ));
        }
        if self.billing.reservation_ttl_s < 3600 {
            p.push((
                "billing.reservation_ttl_s".into(),
                "must be at least 3600".into(),
            ));
        }
        // The sweeper must find a hold's record after its lease (plus a few sweeps).
        let sweep_after = self.lease_ms().saturating_add(10 * 60 * 1000);
        if self.credit_record_ttl_ms() < sweep_after {
            p.push((
                "billing.reservation_ttl_s".into(),
                "must exceed the hold lease (upstream connect + read timeout + billing.lease_grace_ms) by 10 minutes".into(),
            ));
        }
        if !(1_000..=3_600_000).contains(&self.billing.lease_grace_ms) {
            p.push((
                "billing.lease_grace_ms".into(),
                "must be between 1000 and 3600000".into(),
            ));
        }
        if !(1..=30 * 24 * 3600).contains(&self.billing.job_ttl_s) {
            p.push((
                "billing.job_ttl_s".into(),
                "must be between 1 and 2592000 (30 days)".into(),
            ));
        }
        if !(100..=600_000).contains(&self.billing.sweep_interval_ms) {
            p.push((
                "billing.sweep_interval_ms".into(),
                "must be between 100 and 600000".into(),
            ));
        }
        if !(1..=3660).contains(&self.billing.usage_retention_days) {
            p.push((
                "billing.usage_retention_days".into(),
                "must be between 1 and 3660".into(),
            ));
        }
        if self.stripe.enabled
            && !(self.stripe.api_base.starts_with("http://")
                || self.stripe.api_base.starts_with("https://"))
        {
            p.push(("stripe.api_base".into(), "must be an http(s) URL".into()));
        }
        for (field, value) in [
            ("stripe.secret_key_env", &self.stripe.secret_key_env),
            ("stripe.webhook_secret_env", &self.stripe.webhook_secret_env),
            ("admin.token_env", &self.admin.token_env),
        ] {
            if value.is_empty()
                || !value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                p.push((
                    field.into(),
                    "must name an environment variable (letters, digits, _)".into(),
                ));
            }
        }
        p.extend(self.alerts.problems());
        p
    }

    /// The rules directory: relative paths are resolved against the working directory.
    pub fn rules_dir(&self) -> PathBuf {
        if self.rules.dir.is_absolute() {
            self.rules.dir.clone()
        } else {
            std::env::current_dir()
                .map(|d| d.join(&self.rules.dir))
                .unwrap_or_else(|_| self.rules.dir.clone())
        }
    }
}

fn read_section<T: DeserializeOwned>(
    name: &str,
    value: toml::Value,
    into: &mut T,
    problems: &mut Vec<(String, String)>,
) {
    match value.try_into::<T>() {
        Ok(v) => *into = v,
        Err(e) => problems.push((name.to_string(), e.message().to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_records_live_as_long_as_the_longest_request_needs() {
        let base = "[upstream]\naddress = \"127.0.0.1:9000\"\n";
        let c = Config::parse("t.toml", base).expect("valid");
        assert_eq!(c.credit_record_ttl_ms(), 3600 * 1000, "at least an hour");
        assert_eq!(c.spend_record_ttl_ms(), 7 * 24 * 3600 * 1000);
        let slow = format!("{base}read_timeout_ms = 7200000\n");
        let c = Config::parse("t.toml", &slow).expect("valid");
        assert_eq!(
            c.credit_record_ttl_ms(),
            2000 + 7_200_000 + 60_000 + 600_000,
            "lease (connect + read + grace) + 10 min"
        );
        let capped =
            format!("{base}read_timeout_ms = 600000\n[billing]\nreservation_ttl_s = 3600\n");
        let c = Config::parse("t.toml", &capped).expect("valid");
        assert_eq!(
            c.credit_record_ttl_ms(),
            3600 * 1000,
            "never past reservation_ttl_s"
        );
        // A record that would expire before the sweeper can settle its hold is refused.
        let short = format!("{slow}[billing]\nreservation_ttl_s = 3600\n");
        let problems = Config::parse("t.toml", &short).expect_err("refused");
        assert!(
            problems
                .iter()
                .any(|p| p.to_string().contains("billing.reservation_ttl_s")),
            "{problems:?}"
        );
    }

    #[test]
    fn a_minimal_file_takes_the_defaults() {
        let c =
            Config::parse("t.toml", "[upstream]\naddress = \"127.0.0.1:9000\"\n").expect("valid");
        assert_eq!(c.server.listen, "127.0.0.1:8080");
        assert_eq!(c.store.command_timeout_ms, 200);
        assert_eq!(c.billing.default_spending_limit_cents, 5000);
        assert_eq!(c.rules.dir, PathBuf::from("lua-free-rules"));
    }

    #[test]
    fn usage_retention_is_validated() {
        let base = "[upstream]\naddress = \"127.0.0.1:9000\"\n";
        let c = Config::parse("t.toml", base).expect("valid");
        assert_eq!(c.billing.usage_retention_days, 90);
        let c = Config::parse(
            "t.toml",
            &format!("{base}[billing]\nusage_retention_days = 400\n"),
        )
        .expect("valid");
        assert_eq!(c.billing.usage_retention_days, 400);
        for bad in ["0", "3661"] {
            let text = format!("{base}[billing]\nusage_retention_days = {bad}\n");
            let problems = Config::parse("t.toml", &text).expect_err("refused");
            assert!(
                problems
                    .iter()
                    .any(|p| p.to_string().contains("billing.usage_retention_days")),
                "{bad}: {problems:?}"
            );
        }
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text =
            "[server]\nlisten = \"nope\"\nbogus = 1\n[store]\nfail_mode = \"open\"\n[weird]\n";
        let problems = Config::parse("t.toml", text).expect_err("invalid");
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert!(fields.contains(&"server"), "{problems:?}");
        assert!(fields.contains(&"store.fail_mode"), "{problems:?}");
        assert!(fields.contains(&"weird"), "{problems:?}");
        assert!(fields.contains(&"upstream.address"), "{problems:?}");
        assert!(
            problems.iter().any(|p| p.message.contains("bogus")),
            "{problems:?}"
        );
    }

    #[test]
    fn http_limits_have_defaults_and_bounds() {
        let base = "[upstream]\naddress = \"127.0.0.1:9000\"\n";
        let c = Config::parse("t.toml", base).expect("valid");
        assert_eq!(c.server.max_header_bytes, 32 * 1024);
        assert_eq!(c.server.header_timeout_ms, 10_000);
        let bad = format!(
            "{base}[server]\nmax_header_bytes = 2000000\nheader_timeout_ms = 0\nshutdown_grace_s = 0\n"
        );
        let problems = Config::parse("t.toml", &bad).expect_err("invalid");
        for field in [
            "server.max_header_bytes",
            "server.header_timeout_ms",
            "server.shutdown_grace_s",
        ] {
            assert!(
                problems.iter().any(|p| p.field == field),
                "{field}: {problems:?}"
            );
        }
    }

    #[test]
    fn bad_values_are_named() {
        let text = "[upstream]\naddress = \"x:1\"\n[server]\nlisten = \"nope\"\n";
        let problems = Config::parse("t.toml", text).expect_err("invalid");
        assert!(
            problems.iter().any(|p| p.field == "server.listen"),
            "{problems:?}"
        );
    }
}
