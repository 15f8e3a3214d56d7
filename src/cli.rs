//! The command line (CONTRACT §1): `serve`, `check` (like `nginx -t`: every problem with file and
//! field, exit 1) and `catalog` (the effective plans, rates and credit costs).

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
