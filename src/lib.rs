//! creditgate: a Pingora gateway that makes billing real for an image and video generation API.
//!
//! The request path, top to bottom (one module per step):
//!
//! ```text
//! client ─► connection                           the proxy's connection loop: the header must
//!                                                 arrive whole within header_timeout_ms
//!        ─► proxy::request_filter
//!             └─ admit::admit
//!                  ├─ http_limits                 header > max_header_bytes 431; ambiguous
//!                  │                              Content-Length, Upgrade → 400
//!                  ├─ rules::canonicalize        one canonical path, ambiguous ones are 400
//!                  ├─ stripe::webhook             POST /webhooks/stripe: signature, applied once
//!                  ├─ billing_api                 /api/credits/balance, /api/subscription, …
//!                  │                              answered here, never proxied
//!                  ├─ rules::Catalog::match_route unknown routes are 404, never proxied
//!                  ├─ auth::authenticate          key hash → Principal (cached ≤ 1 s), slots
//!                  ├─ ratelimit                   per key, per plan (governor, per instance)
//!                  ├─ rules::quote                operation × model × quantity → credits / µ$
//!                  ├─ idempotency::check          Idempotency-Key: replay, 409 or 422
//!                  └─ reserve::reserve            credits first, else pay-per-use under the
//!                                                 monthly limit: ONE store round trip, which
//!                                                 also leases the hold to this request
//!          ─► proxy::upstream_peer                no I/O, no billing (it runs again on retries)
//!          ─► headers::prepare_upstream_request   key stripped, spoofed gateway headers removed
//!          ─► backend
//!          ◄─ proxy::upstream_response_filter     settle::UpstreamOutcome::from_response
//!          ◄─ proxy::response_filter              headers::billing_headers
//!          ◄─ proxy::logging → settle::finish     2xx keeps, anything else refunds, once;
//!                                                 idempotency::conclude; logging::RequestLine
//! ```
//!
//! Beside it: `sweeper` (settles holds whose lease ended unsettled — a killed gateway, a hung
//! store — by `billing.orphan_policy`, and finishes refunds claimed but not applied),
//! `admin_api` (accounts, keys, grants, catalog, `/openapi.json`), `live_catalog` + `reloader`
//! (hot reload), `ledger` (Redis without Lua, or memory), `stripe` (meter-event outbox,
//! webhooks), `metrics`, `server` (start-up), `cli`, `failpoint` (fault-test hooks).

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
pub mod usage_api;
pub mod usage_export;
