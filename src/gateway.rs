//! Everything a request needs that outlives it, built once at start and shared by the proxy,
//! the admin API and the background workers.

use std::sync::Arc;

use crate::auth::KeyCache;
use crate::clock::SharedClock;
use crate::config::Config;
use crate::ledger::Ledger;
use crate::ledger::RedisLedger;
use crate::live_catalog::LiveCatalog;
use crate::ratelimit::RateLimits;

pub struct Gateway {
    pub config: Config,
    pub catalog: LiveCatalog,
    pub ledger: Arc<dyn Ledger>,
    pub clock: SharedClock,
    pub keys: KeyCache,
    pub rate_limits: RateLimits,
    /// The Redis backend, when that is the store (for its server-settings check).
    pub redis: Option<Arc<RedisLedger>>,
    /// The admin bearer token, from the environment variable the config names.
    pub admin_token: Option<String>,
    /// The low-balance alert outbox, when `[alerts] enabled` (Redis only).
    pub alerts: Option<Arc<crate::alerts::AlertOutbox>>,
}

impl Gateway {
    pub fn new(
        config: Config,
        catalog: LiveCatalog,
        ledger: Arc<dyn Ledger>,
        clock: SharedClock,
    ) -> Self {
        let admin_token = std::env::var(&config.admin.token_env)
            .ok()
            .filter(|t| !t.is_empty());
        let keys = KeyCache::new(config.billing.key_cache_ttl_ms);
        Self {
            config,
            catalog,
            ledger,
            clock,
            keys,
            rate_limits: RateLimits::new(),
            redis: None,
            admin_token,
            alerts: None,
        }
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }
}
