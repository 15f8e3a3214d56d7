//! Per-key request rate limits (governor's GCRA), one keyed limiter per distinct
//! `requests_per_minute` of the catalog's plans, so a reload that changes a plan's rate takes
//! effect at once. The limit is PER GATEWAY INSTANCE: with N instances behind a load balancer a
//! key may get up to N times its plan's rate. Keyed state grows with distinct keys; the
//! background janitor calls [`RateLimits::retain_recent`] to keep it bounded. Called by `admit`
//! after authentication.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::GatewayError;

type Limiter = DefaultKeyedRateLimiter<String>;

#[derive(Default)]
pub struct RateLimits {
    by_rate: RwLock<HashMap<u32, Arc<Limiter>>>,
}

impl RateLimits {
    pub fn new() -> Self {
        Self::default()
    }

    fn limiter(&self, per_minute: NonZeroU32) -> Arc<Limiter> {
        if let Ok(map) = self.by_rate.read() {
            if let Some(l) = map.get(&per_minute.get()) {
                return l.clone();
            }
        }
        let fresh = Arc::new(RateLimiter::keyed(Quota::per_minute(per_minute)));
        match self.by_rate.write() {
            Ok(mut map) => map.entry(per_minute.get()).or_insert(fresh).clone(),
            Err(_) => fresh,
        }
    }

    /// Admits one request of `key_id` under `per_minute` (0 = unlimited) or answers 429 with
    /// the seconds to wait.
    pub fn check(&self, key_id: &str, per_minute: u32) -> Result<(), GatewayError> {
        let Some(rate) = NonZeroU32::new(per_minute) else {
            return Ok(());
        };
        let limiter = self.limiter(rate);
        match limiter.check_key(&key_id.to_string()) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Err(GatewayError::RateLimited(wait.as_secs() + 1))
            }
        }
    }

    /// Forgets keys whose state is back at rest (the janitor's job).
    pub fn retain_recent(&self) {
        if let Ok(map) = self.by_rate.read() {
            for l in map.values() {
                l.retain_recent();
                l.shrink_to_fit();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_past_the_rate_is_refused_with_retry_after() {
        let limits = RateLimits::new();
        for _ in 0..3 {
            assert!(limits.check("k1", 3).is_ok());
        }
        match limits.check("k1", 3) {
            Err(GatewayError::RateLimited(s)) => assert!((1..=21).contains(&s), "{s}"),
            other => panic!("expected 429, got {other:?}"),
        }
        // Other keys and unlimited plans are unaffected.
        assert!(limits.check("k2", 3).is_ok());
        assert!(limits.check("k1", 0).is_ok());
    }
}
