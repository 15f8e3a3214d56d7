//! The command line (CONTRACT §1): `serve`, `check` (like `nginx -t`: every problem with file and
//! field, exit 1), `catalog` (the effective plans, rates and credit costs) and `usage` (one
//! account's usage history of a month, from the configured store, as CSV or JSON).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{self, Config};
use crate::rules;

#[derive(Debug, Parser)]
#[command(
    name = "creditgate",
    version,
    about = "A Pingora gateway that makes billing real"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway (proxy, admin and metrics listeners, background workers).
    Serve {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate the config and the rules directory; exit 1 listing every problem.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the effective plans, pay-per-use rates and credit costs.
    Catalog {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Export one account's usage history of a UTC month (oldest first) from the store.
    Usage {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        account: String,
        /// `YYYY-MM`, UTC.
        #[arg(long)]
        month: String,
        #[arg(long, value_enum, default_value_t = ExportFormat::Csv)]
        format: ExportFormat,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    Csv,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// What `check` found: problems as printable lines.
pub fn check(config_path: &std::path::Path) -> Result<String, Vec<String>> {
    let mut problems: Vec<String> = Vec::new();
    let config = match Config::load(config_path) {
        Ok(c) => Some(c),
        Err(ps) => {
            problems.extend(ps.iter().map(ToString::to_string));
            None
        }
    };
    let rules_dir = config
        .as_ref()
        .map(Config::rules_dir)
        .unwrap_or_else(|| Config::default().rules_dir());
    match rules::load_dir(&rules_dir) {
        Ok(catalog) if problems.is_empty() => Ok(format!(
            "configuration {} ok\nrules {} ok: {} plans, {} models, {} operations, {} routes (fingerprint {})",
            config_path.display(),
            rules_dir.display(),
            catalog.plans().len(),
            catalog.models().len(),
            catalog.operations().len(),
            catalog.routes().len(),
            catalog.fingerprint
        )),
        Ok(_) => Err(problems),
        Err(ps) => {
            problems.extend(ps.iter().map(|p| format!("{}/{p}", rules_dir.display())));
            Err(problems)
        }
    }
}

/// Loads config (for the rules dir) and renders the catalog.
pub fn catalog(config_path: &std::path::Path, format: Format) -> Result<String, Vec<String>> {
    let config = Config::load(config_path)
        .map_err(|ps| ps.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    let dir = config.rules_dir();
    let catalog = rules::load_dir(&dir).map_err(|ps| {
        ps.iter()
            .map(|p| format!("{}/{p}", dir.display()))
            .collect::<Vec<_>>()
    })?;
    Ok(match format {
        Format::Table => rules::render_table(&catalog),
        Format::Json => {
            serde_json::to_string_pretty(&rules::render_json(&catalog)).unwrap_or_default()
        }
    })
}

/// The config path for a subcommand's `--config`.
pub fn config_path(flag: &Option<PathBuf>) -> PathBuf {
    config::resolve_path(flag.as_deref())
}

/// `creditgate usage`: reads every entry of `month` from the store the config names.
pub fn usage(
    config_path: &std::path::Path,
    account: &str,
    month: &str,
    format: ExportFormat,
) -> Result<String, Vec<String>> {
    let config = Config::load(config_path)
        .map_err(|ps| ps.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    let (from_ms, to_ms) = month_range(month).ok_or_else(|| {
        vec![format!(
            "--month `{month}` must be a UTC month as YYYY-MM (e.g. 2026-11)"
        )]
    })?;
    let ledger = match config.store.backend {
        config::StoreBackend::Redis => {
            let mut store = config.store.clone();
            store.command_timeout_ms = store.command_timeout_ms.max(1000);
            crate::ledger::RedisLedger::from_config(&store).map_err(|e| vec![e.to_string()])?
        }
        config::StoreBackend::Memory => {
            return Err(vec![
                "store.backend = \"memory\" keeps usage history inside the serving process only; nothing to export".to_string(),
            ])
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| vec![format!("runtime: {e}")])?;
    let mut entries = runtime
        .block_on(crate::usage_export::read_all(
            &ledger, account, from_ms, to_ms,
        ))
        .map_err(|e| vec![e.to_string()])?;
    entries.reverse();
    Ok(match format {
        ExportFormat::Csv => crate::usage_export::csv(&entries),
        ExportFormat::Json => crate::usage_export::json(account, month, &entries),
    })
}

/// `[first ms of the month, first ms of the next)` of `YYYY-MM`.
fn month_range(month: &str) -> Option<(i64, i64)> {
    let ok = month.len() == 7
        && month.as_bytes().get(4) == Some(&b'-')
        && month
            .bytes()
            .enumerate()
            .all(|(i, b)| i == 4 || b.is_ascii_digit());
    if !ok {
        return None;
    }
    let from = crate::period::parse_timestamp_ms(&format!("{month}-01T00:00:00Z"))?;
    let to = crate::period::add_months(from, 1)?;
    Some((from, to))
}
