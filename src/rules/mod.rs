//! The catalog and the route rules: what is sold (plans, models, operations and their prices),
//! which requests are proxied, and what each costs. Everything here is pure; the only I/O is
//! [`load_dir`] reading the four files of the rules directory (`lua-free-rules/`, CONTRACT §3):
//!
//! - `plans.toml`: `[[plan]]` entries and the `[pay_per_use]` settings;
//! - `models.toml`: `[[model]]` entries (rates as exact decimals) and `credit_columns`;
//! - `operations.toml`: `[[operation]]` entries with their credit costs and pay-per-use rates;
//! - `routes.toml`: `[[route]]` rules (method, path pattern, sources of operation/model/quantity).
//!
//! A request goes [`canonicalize`] → [`Catalog::match_route`] → [`quote`]. Loading is strict
//! and reports every problem at once ([`RuleProblem`]); [`render_table`] and [`render_json`]
//! show the catalog.

mod build;
mod canonical;
mod catalog;
mod decimal;
mod display;
mod files;
mod problem;
mod quote;
mod routes;
pub mod thresholds;

use std::path::Path;

use sha2::{Digest, Sha256};

pub use self::canonical::{canonicalize, CanonicalPath, PathError};
pub use self::catalog::{
    Catalog, CreditGrant, Model, Operation, PayPerUse, Plan, Price, Unit, PAY_PER_USE,
};
pub use self::display::{
    credits_table, plans_table, rates_table, render_json, render_table, UNAVAILABLE,
};
pub use self::problem::RuleProblem;
pub use self::quote::{parse_json_body, quote, BodyError, Quote, QuoteError, RequestInputs};
pub use self::routes::{Route, RouteMatch, SettleAt, Source};

/// The files of a rules directory, in load order.
pub const RULE_FILES: [&str; 4] = [
    "plans.toml",
    "models.toml",
    "operations.toml",
    "routes.toml",
];

/// The texts of the four rules files.
#[derive(Debug, Clone, Copy)]
pub struct RuleSources<'a> {
    pub plans: &'a str,
    pub models: &'a str,
    pub operations: &'a str,
    pub routes: &'a str,
}

/// Reads and validates the rules directory. On failure, every problem found, each naming its
/// file and field. The catalog's `version` is 0: the live holder assigns versions.
pub fn load_dir(dir: &Path) -> Result<Catalog, Vec<RuleProblem>> {
    let mut problems = Vec::new();
    let mut texts: [Option<String>; 4] = Default::default();
    for (slot, name) in texts.iter_mut().zip(RULE_FILES) {
        let path = dir.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(s) => *slot = Some(s),
                Err(_) => problems.push(RuleProblem::new(
                    name,
                    problem::WHOLE_FILE,
                    "is not UTF-8 text",
                )),
            },
            Err(e) => problems.push(RuleProblem::new(
                name,
                problem::WHOLE_FILE,
                format!("cannot read {}: {e}", path.display()),
            )),
        }
    }
    let [plans, models, operations, routes] = &texts;
    load_texts(
        build::SourceTexts {
            plans: plans.as_deref(),
            models: models.as_deref(),
            operations: operations.as_deref(),
            routes: routes.as_deref(),
        },
        problems,
    )
}

/// Validates the four files' texts (as [`load_dir`] does, without reading files).
pub fn load_sources(sources: &RuleSources<'_>) -> Result<Catalog, Vec<RuleProblem>> {
    load_texts(
        build::SourceTexts {
            plans: Some(sources.plans),
            models: Some(sources.models),
            operations: Some(sources.operations),
            routes: Some(sources.routes),
        },
        Vec::new(),
    )
}

fn load_texts(
    texts: build::SourceTexts<'_>,
    mut problems: Vec<RuleProblem>,
) -> Result<Catalog, Vec<RuleProblem>> {
    let fingerprint = fingerprint(&[texts.plans, texts.models, texts.operations, texts.routes]);
    match build::build_catalog(&texts, fingerprint, &mut problems) {
        Some(c) if problems.is_empty() => Ok(c),
        _ => {
            if problems.is_empty() {
                problems.push(RuleProblem::new(
                    "(rules)",
                    problem::WHOLE_FILE,
                    "the catalog is incomplete",
                ));
            }
            Err(problems)
        }
    }
}

/// First 16 hex digits of SHA-256 over the files' names, lengths and contents.
fn fingerprint(texts: &[Option<&str>]) -> String {
    let mut h = Sha256::new();
    for (name, text) in RULE_FILES.iter().zip(texts) {
        let text = text.unwrap_or("");
        h.update(name.as_bytes());
        h.update([0]);
        h.update((text.len() as u64).to_le_bytes());
        h.update(text.as_bytes());
    }
    let mut s = hex::encode(h.finalize());
    s.truncate(16);
    s
}
