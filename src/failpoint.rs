//! Test hooks for fault tests: a named point where the process kills itself with SIGKILL, as a
//! crash would, when `CREDITGATE_FAILPOINT` names it. Read once; unset (production) it costs one
//! comparison. Used by the integration tests to stop the gateway between two store steps.

use std::sync::LazyLock;

/// Between a settlement's claim and its refund (the sweeper must finish the refund).
pub const SETTLE_AFTER_CLAIM: &str = "settle_after_claim";

static ARMED: LazyLock<Option<String>> = LazyLock::new(|| {
    std::env::var("CREDITGATE_FAILPOINT")
        .ok()
        .filter(|v| !v.is_empty())
});

/// Dies here (SIGKILL to itself) when the failpoint `name` is armed.
pub fn hit(name: &str) {
    if ARMED.as_deref() != Some(name) {
        return;
    }
    tracing::error!(failpoint = name, "failpoint hit: killing the process");
    let _ = std::process::Command::new("kill")
        .args(["-9", &std::process::id().to_string()])
        .status();
    std::process::abort();
}
