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
//!                  ├─ quote_api                   POST /api/quote: priced like the request it
//!                  │                              names, payer from payer::PaymentPlan (the
//!                  │                              one reserve walks), nothing written
//!                  ├─ rules::Catalog::match_route unknown routes are 404, never proxied
//!                  ├─ auth::authenticate          key hash → Principal (cached ≤ 1 s), slots
//!                  ├─ ratelimit                   per key, per plan (governor, per instance)
//!                  ├─ jobs::admit_poll            a job poll: the caller's own job, else 404
//!                  ├─ rules::quote                operation × model × quantity → credits / µ$
//!                  ├─ idempotency::check          Idempotency-Key: replay, 409 or 422
//!                  ├─ reserve::reserve            credits first, else pay-per-use under the
//!                  │                              monthly limit: ONE store round trip, which
//!                  │                              also leases the hold to this request
//!                  └─ alerts::notice              a threshold crossed → one signed alert
//!                                                 (claimed + queued off the critical path)
//!          ─► proxy::upstream_peer                no I/O, no billing (it runs again on retries)
//!          ─► headers::prepare_upstream_request   key stripped, spoofed gateway headers removed
//!          ─► backend
//!          ◄─ proxy::upstream_response_filter     settle::UpstreamOutcome::from_response
//!          ◄─ proxy::response_filter              a 2xx settled (kept) before it goes out, then
//!                                                 headers::billing_headers (a job route's 2xx:
//!                                                 jobs::held_headers; X-Job-Id recorded here)
//!          ◄─ proxy::response_body_filter         jobs::Watch reads a job's id / status
//!          ◄─ proxy::logging → settle::finish     2xx keeps, anything else refunds, once;
//!                                                 a job route's 2xx: jobs::conclude_creation
//!                                                 (held for the job); a poll of one's own job:
//!                                                 jobs::conclude_poll (its final state settles);
//!                                                 idempotency::conclude; logging::RequestLine
//! ```
//!
//! Beside it: `sweeper` (settles holds whose lease ended unsettled — a killed gateway, a hung
//! store, a job never final — by `billing.orphan_policy`, and finishes refunds claimed but not
//! applied), `admin_api` (accounts, keys, grants, catalog, the job callback, `/openapi.json`),
//! `live_catalog` + `reloader` (hot reload), `ledger` (Redis without Lua, or memory), `stripe`
//! (meter-event outbox, webhooks), `alerts` (low-balance alert delivery), `metrics`, `server`
//! (start-up), `cli`, `failpoint` (fault-test hooks).

pub mod admin_api;
pub mod admit;
pub mod alerts;
pub mod apikey;
pub mod auth;
pub mod billing_api;
pub mod cli;
pub mod clock;
pub mod conclude;
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
pub mod jobs;
pub mod ledger;
pub mod live_catalog;
pub mod logging;
pub mod metrics;
pub mod money;
pub mod openapi;
pub mod payer;
pub mod period;
pub mod plan_change;
pub mod proxy;
pub mod quote_api;
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
