//! creditgate: a Pingora gateway that makes billing real for an image and video generation API.
//!
//! The request path, top to bottom (one module per step):
//!
//! ```text
//! client ─► proxy::request_filter
//!             └─ admit::admit
//!                  ├─ http_limits                 header > max_header_bytes 431; ambiguous
//!                  │                              Content-Length, Upgrade → 400
//!                  ├─ rules::canonicalize        one canonical path, ambiguous ones are 400
//!                  ├─ billing_api                 /api/credits/balance, /api/subscription, …
//!                  │                              answered here, never proxied
//!                  ├─ rules::Catalog::match_route unknown routes are 404, never proxied
//!                  ├─ auth::authenticate          key hash → Principal (cached ≤ 1 s), slots
//!                  ├─ rules::quote                operation × model × quantity → credits / µ$
//!                  └─ reserve::reserve            credits first, else pay-per-use under the
//!                                                 monthly limit: ONE store round trip
//!          ─► proxy::upstream_peer                no I/O, no billing (it runs again on retries)
//!          ─► headers::prepare_upstream_request   key stripped, spoofed gateway headers removed
//!          ─► backend
//!          ◄─ proxy::response_filter              a 2xx settled (kept) before it goes out;
//!                                                 X-Credits-* / X-Charge-* headers
//!          ◄─ proxy::logging → settle::finish     anything else refunds, once
//! ```
//!
//! Beside it: `admin_api` (accounts, keys, grants, catalog), `live_catalog` (hot reload),
//! `ledger` (Redis without Lua, or memory), `metrics`, `server` (start-up), `cli`, `connection`
//! (the proxy's connection loop: header arrival deadline, graceful stop).

pub mod admin_api;
pub mod admit;
pub mod apikey;
pub mod auth;
pub mod billing_api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod connection;
pub mod demo_backend;
pub mod entitlement;
pub mod error;
pub mod failpoint;
pub mod gateway;
pub mod headers;
pub mod http_limits;
pub mod idempotency;
pub mod incoming;
pub mod ledger;
pub mod live_catalog;
pub mod logging;
pub mod metrics;
pub mod money;
pub mod openapi;
pub mod period;
pub mod plan_change;
pub mod proxy;
pub mod ratelimit;
pub mod reloader;
pub mod reserve;
pub mod respond;
pub mod rules;
pub mod server;
pub mod settle;
pub mod stripe;
pub mod sweeper;
