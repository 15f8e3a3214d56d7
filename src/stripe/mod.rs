//! Stripe, both ways (CONTRACT §9).
//!
//! Out: pay-per-use charges are reported as billing meter events. The ledger writes each
//! report to the Redis stream `cg:outbox` in the charge's own transaction; the
//! [`StripeReporter`] (one per gateway instance, one consumer group for all) delivers them with
//! the reservation id as the meter event `identifier`, net of refunds, with retries, backoff,
//! take-over of a dead instance's entries and a dead-letter stream ([`outbox`]). Requests are
//! built by async-stripe and sent by [`StripeHttp`] ([`transport`]).
//!
//! In: `POST /webhooks/stripe` ([`webhook::handle`]) verifies `Stripe-Signature`
//! ([`signature`]) and applies subscription changes and paid invoices once per event id.
//!
//! Metrics: `creditgate_stripe_*` ([`metrics`]).

pub mod metrics;
pub mod outbox;
pub mod signature;
pub mod transport;
pub mod webhook;

pub use self::metrics::{ReporterStats, StatsSnapshot};
pub use self::outbox::{ReporterError, ReporterSettings, StripeReporter};
pub use self::transport::{StripeCallError, StripeHttp};
