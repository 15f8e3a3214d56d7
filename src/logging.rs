//! Structured logs with `tracing`: one line per request from the proxy's `logging` phase, text or
//! JSON (`[logging] format`), filtered by `RUST_LOG` (default `info`). Keys never appear in full.
//! Colours only on a terminal: a log file or journald gets plain `key=value` text.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

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
