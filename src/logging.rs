//! Structured logs with `tracing`: one line per request from the proxy's `logging` phase, text or
//! JSON (`[logging] format`), filtered by `RUST_LOG` (default `info`). Keys never appear in full.
//! Colours only on a terminal: a log file or journald gets plain `key=value` text.
//! [`RequestLine`] is that one line.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;
use crate::money::MicroUsd;
use crate::reserve::{Payment, Reservation};
use crate::settle::Settlement;

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    let result = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    if result.is_err() {
        eprintln!("creditgate: logging was already initialised");
    }
}

/// The one log line of a request (`logging` phase). A credit reservation record keeps only what
/// settlement needs, so this line is where a charge id is traced back to what was priced.
pub struct RequestLine<'a> {
    pub request_id: &'a str,
    pub account: &'a str,
    pub route: &'a str,
    pub status: u16,
    pub upstream_status: u16,
    pub outcome: &'a str,
    /// The reservation and what its settlement decided, for a billed request.
    pub charge: Option<(&'a Reservation, Settlement)>,
    pub error: Option<&'a pingora::Error>,
    pub latency_us: u64,
}

impl RequestLine<'_> {
    pub fn emit(&self) {
        if !tracing::enabled!(tracing::Level::INFO) {
            return;
        }
        let (charge, charge_id, priced) = match self.charge {
            Some((r, s)) => (
                match r.payment {
                    Payment::Credits { .. } => format!("{}cr", s.kept),
                    Payment::Spend { .. } => format!("${}", MicroUsd(s.kept)),
                },
                r.id.as_str(),
                format!("{} {} x{}", r.meta.operation, r.meta.model, r.meta.quantity),
            ),
            None => ("-".to_string(), "-", "-".to_string()),
        };
        tracing::info!(
            request_id = %self.request_id,
            account = %self.account,
            route = %self.route,
            status = self.status,
            upstream_status = self.upstream_status,
            outcome = self.outcome,
            charge = %charge,
            charge_id = %charge_id,
            priced = %priced,
            error = self.error.map(|e| e.to_string()).unwrap_or_default(),
            latency_us = self.latency_us,
            "request"
        );
    }
}
