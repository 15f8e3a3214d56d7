//! Bounds on client-controlled numbers, shared by the config, billing and admin APIs.

/// The largest monthly spending limit an account may set (CONTRACT §6).
pub const MAX_SPENDING_LIMIT_CENTS: u64 = 100_000_000;
/// Largest JSON body accepted by the billing and admin APIs.
pub const MAX_API_BODY_BYTES: usize = 4 * 1024;
