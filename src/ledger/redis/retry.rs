//! Which Redis errors prove that a command or transaction did not run, so sending it again
//! cannot apply it twice: a cluster redirect or a refusal before anything executed (`MOVED`,
//! `ASK`, `TRYAGAIN`, `CLUSTERDOWN`, `MASTERDOWN`, `READONLY`, `LOADING`, a transaction
//! discarded at `EXEC` because one of those refused a queued command, no connection to the
//! slot's node). The ledger retries those itself, a few times within the call's patience; the
//! cluster client's own retries are off ([`store`](super::store)).
//!
//! Anything else is answered as it is. In particular a timeout or a connection lost after the
//! send is ambiguous (the transaction may have run): the ledger fails the request closed (503,
//! nothing sent upstream) and reconciles: the reservation is voided in the background against a
//! claim stub that a late transaction merges into ([`repair`](super::repair)), and the sweeper
//! settles it after its lease at the latest. No per-request marker is needed for that: a
//! transaction is only ever sent again after an error that proves it did not run.

use std::time::Duration;

use redis::{ErrorKind, RedisError, ServerErrorKind};

/// Attempts of one call at most (the first and its retries).
pub(super) const ATTEMPTS: u32 = 6;

/// Whether `e` proves that nothing of the call ran.
pub(super) fn did_not_run(e: &RedisError) -> bool {
    match e.kind() {
        ErrorKind::Server(kind) => matches!(
            kind,
            ServerErrorKind::Moved
                | ServerErrorKind::Ask
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ReadOnly
                | ServerErrorKind::BusyLoading
                | ServerErrorKind::ExecAbort
        ),
        ErrorKind::ClusterConnectionNotFound => true,
        _ => false,
    }
}

/// Whether `e` says a slot is served by another node now: a `MOVED`, or one inside a
/// transaction that was discarded for it. The cluster client learns of a `MOVED` answered to a
/// single command by itself, but not of one answered to a queued command of a `MULTI`.
pub(super) fn moved(e: &RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::Moved)
        || e.clone().into_server_errors().is_some_and(|errors| {
            errors
                .iter()
                .any(|(_, error)| error.kind() == Some(ServerErrorKind::Moved))
        })
}

/// The pause before attempt `attempt` (1-based retries): 5, 10, 20, 40, 80 ms.
pub(super) fn pause(attempt: u32) -> Duration {
    Duration::from_millis(5u64 << attempt.saturating_sub(1).min(4))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error a server's reply `resp` (one RESP error line) becomes.
    fn server_error(resp: &str) -> RedisError {
        let value = redis::parse_redis_value(resp.as_bytes()).expect("a RESP value");
        value.extract_error().expect_err("an error reply")
    }

    #[test]
    fn refusals_before_running_are_retried() {
        for resp in [
            "-MOVED 3999 127.0.0.1:6381\r\n",
            "-ASK 3999 127.0.0.1:6381\r\n",
            "-TRYAGAIN Multiple keys request during rehashing of slot\r\n",
            "-CLUSTERDOWN The cluster is down\r\n",
            "-READONLY You can't write against a read only replica.\r\n",
            "-LOADING Redis is loading the dataset in memory\r\n",
            "-EXECABORT Transaction discarded because of previous errors.\r\n",
        ] {
            assert!(did_not_run(&server_error(resp)), "{resp}");
        }
    }

    #[test]
    fn a_moved_slot_is_recognised() {
        assert!(moved(&server_error("-MOVED 3999 127.0.0.1:6381\r\n")));
        assert!(!moved(&server_error("-ASK 3999 127.0.0.1:6381\r\n")));
        assert!(!moved(&server_error("-TRYAGAIN later\r\n")));
    }

    #[test]
    fn ambiguous_and_final_errors_are_not() {
        let io = RedisError::from(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "x"));
        assert!(!did_not_run(&io));
        assert!(!did_not_run(&server_error(
            "-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
        )));
        assert!(!did_not_run(&server_error(
            "-CROSSSLOT Keys in request don't hash to the same slot\r\n"
        )));
    }

    #[test]
    fn pauses_grow_and_stop_growing() {
        assert_eq!(pause(1), Duration::from_millis(5));
        assert_eq!(pause(5), Duration::from_millis(80));
        assert_eq!(pause(9), Duration::from_millis(80));
    }
}
