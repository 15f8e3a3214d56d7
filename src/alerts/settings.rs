//! The `[alerts]` section of `config/creditgate.toml`: where low-balance alerts are POSTed, which
//! environment variable holds the signing secret, and the delivery worker's timing. Read by
//! `crate::config` (validated with every other section), used by `crate::server` to start the
//! outbox writer and the delivery worker.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Off by default: no alert is written or sent.
    pub enabled: bool,
    /// The operator's receiver (`http://` or `https://`).
    pub url: String,
    /// The environment variable holding the HMAC-SHA256 signing secret.
    pub secret_env: String,
    /// One POST (connect, send, read).
    pub request_timeout_ms: u64,
    /// First and largest pause after a failed POST (exponential, full jitter).
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    /// Alerts pending this long at another instance (it died) are taken over.
    pub claim_idle_ms: u64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            url: String::new(),
            secret_env: "CREDITGATE_ALERTS_SECRET".into(),
            request_timeout_ms: 10_000,
            backoff_min_ms: 1_000,
            backoff_max_ms: 60_000,
            claim_idle_ms: 180_000,
        }
    }
}

impl AlertsConfig {
    /// What makes no sense, as (field, message) pairs.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let mut push = |field: &str, message: &str| {
            p.push((format!("alerts.{field}"), message.to_string()));
        };
        if self.enabled && !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            push("url", "must be an http(s) URL when alerts are enabled");
        }
        if self.secret_env.is_empty()
            || !self
                .secret_env
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            push(
                "secret_env",
                "must name an environment variable (letters, digits, _)",
            );
        }
        if !(100..=60_000).contains(&self.request_timeout_ms) {
            push("request_timeout_ms", "must be between 100 and 60000");
        }
        if self.backoff_min_ms < 10 || self.backoff_min_ms > self.backoff_max_ms {
            push(
                "backoff_min_ms",
                "must be at least 10 and at most backoff_max_ms",
            );
        }
        // The worker refreshes its claim before every attempt: attempts must come well within
        // the take-over time, or a live worker's entry would be taken over.
        let attempt_gap = self.backoff_max_ms.saturating_add(self.request_timeout_ms);
        if attempt_gap.saturating_mul(2) > self.claim_idle_ms {
            push(
                "claim_idle_ms",
                "must be at least twice backoff_max_ms + request_timeout_ms",
            );
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_nonsense_is_named() {
        assert!(AlertsConfig::default().problems().is_empty());
        let bad = AlertsConfig {
            enabled: true,
            url: "ops.example.com".into(),
            secret_env: "A-B".into(),
            request_timeout_ms: 10,
            backoff_min_ms: 2_000,
            backoff_max_ms: 1_000,
            claim_idle_ms: 1_000,
        };
        let fields: Vec<String> = bad.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "alerts.url",
                "alerts.secret_env",
                "alerts.request_timeout_ms",
                "alerts.backoff_min_ms",
                "alerts.claim_idle_ms"
            ]
        );
        // A disabled section may leave the url empty.
        let off = AlertsConfig {
            url: String::new(),
            ..AlertsConfig::default()
        };
        assert!(off.problems().is_empty());
    }
}
