//! Decides what the rules mean: turns the raw files of `files` into a validated [`Catalog`],
//! file by file in load order (plans, models, operations, routes, each checked against the ids
//! the earlier files define), and refuses the whole catalog with every problem listed. Called by
//! `rules::load_dir` / `load_sources`; nothing else builds a catalog.

mod known;
mod models;
mod names;
mod operations;
mod plans;
mod routes;
mod shadowing;
mod syntax;

use std::collections::HashMap;

use self::known::Known;
use super::catalog::{Catalog, Model, Operation};
use super::files::{
    file_problem, open, read_entries, read_value, top, EntryList, RawModel, RawOperation, RawRoute,
};
use super::problem::{FileCtx, RuleProblem};
use super::routes::Route;

/// The largest amount the ledger can hold (Redis integers are signed 64-bit).
pub(crate) const LEDGER_MAX: u64 = i64::MAX as u64;

/// The four files' texts; `None` for a file that could not be read (already reported).
pub(crate) struct SourceTexts<'s> {
    pub plans: Option<&'s str>,
    pub models: Option<&'s str>,
    pub operations: Option<&'s str>,
    pub routes: Option<&'s str>,
}

/// Validates everything; `Some` only when no problem was found.
pub(crate) fn build_catalog(
    texts: &SourceTexts<'_>,
    fingerprint: String,
    problems: &mut Vec<RuleProblem>,
) -> Option<Catalog> {
    let start = problems.len();

    // plans.toml
    let (plans, plan_index, pay_per_use, stripe_prices) = match texts.plans {
        Some(src) => plans::build_plans(
            &FileCtx {
                name: "plans.toml",
                src,
            },
            problems,
        ),
        None => (Vec::new(), HashMap::new(), None, HashMap::new()),
    };

    // models.toml
    let models_ctx = texts.models.map(|src| FileCtx {
        name: "models.toml",
        src,
    });
    let (models_list, credit_columns_raw) = match &models_ctx {
        Some(ctx) => match open(ctx, &["credit_columns", "model"], problems) {
            Some(doc) => {
                let list: EntryList<RawModel> =
                    read_entries(ctx, "model", top(&doc, "model"), problems);
                let cols: Result<Option<Vec<String>>, ()> =
                    read_value(ctx, "credit_columns", top(&doc, "credit_columns"), problems);
                if top(&doc, "model").is_none() {
                    problems.push(file_problem(ctx, "no [[model]] entries"));
                }
                (Some(list), cols.ok().flatten())
            }
            None => (None, None),
        },
        None => (None, None),
    };
    let models_complete = models_list.is_some();
    let models_list = models_list.unwrap_or_default();
    let mut model_refs = Known::new(models_complete, &models_list.unreadable_ids);
    let mut models: Vec<Model> = Vec::new();
    if let Some(ctx) = &models_ctx {
        for e in &models_list.entries {
            match models::build_model(ctx, e, &model_refs, problems) {
                Some(m) => {
                    model_refs.index.insert(&e.raw.id, models.len());
                    models.push(m);
                }
                // Known but invalid: references to it are not reported again.
                None => {
                    model_refs.unreadable.insert(&e.raw.id);
                }
            }
        }
    }
    let credit_columns = match &models_ctx {
        Some(ctx) if models_complete => models::build_credit_columns(
            ctx,
            &models_list,
            credit_columns_raw,
            &model_refs,
            &models,
            problems,
        ),
        _ => Vec::new(),
    };

    // operations.toml
    let ops_ctx = texts.operations.map(|src| FileCtx {
        name: "operations.toml",
        src,
    });
    let ops_list: Option<EntryList<RawOperation>> = ops_ctx.as_ref().and_then(|ctx| {
        let doc = open(ctx, &["operation"], problems)?;
        if top(&doc, "operation").is_none() {
            problems.push(file_problem(ctx, "no [[operation]] entries"));
        }
        Some(read_entries(
            ctx,
            "operation",
            top(&doc, "operation"),
            problems,
        ))
    });
    let ops_complete = ops_list.is_some();
    let ops_list = ops_list.unwrap_or_default();
    let mut op_refs = Known::new(ops_complete, &ops_list.unreadable_ids);
    let mut operations: Vec<Operation> = Vec::new();
    if let Some(ctx) = &ops_ctx {
        for e in &ops_list.entries {
            match operations::build_operation(ctx, e, &op_refs, &model_refs, &models, problems) {
                Some(op) => {
                    op_refs.index.insert(&e.raw.id, operations.len());
                    operations.push(op);
                }
                None => {
                    op_refs.unreadable.insert(&e.raw.id);
                }
            }
        }
    }

    // routes.toml
    let mut routes_out: Vec<Route> = Vec::new();
    if let Some(src) = texts.routes {
        let ctx = FileCtx {
            name: "routes.toml",
            src,
        };
        if let Some(doc) = open(&ctx, &["route"], problems) {
            if top(&doc, "route").is_none() {
                problems.push(file_problem(&ctx, "no [[route]] entries"));
            }
            let list: EntryList<RawRoute> =
                read_entries(&ctx, "route", top(&doc, "route"), problems);
            let refs = routes::OperationRefs {
                known: &op_refs,
                operations: &operations,
            };
            for e in &list.entries {
                if let Some(route) = routes::build_route(&ctx, e, &refs, problems) {
                    shadowing::check_shadowing(&ctx, e, &route, &routes_out, problems);
                    routes_out.push(route);
                }
            }
        }
    }

    if problems.len() > start {
        return None;
    }
    let pay_per_use = pay_per_use?;
    let model_index = models
        .iter()
        .enumerate()
        .map(|(i, m)| (m.id.clone(), i))
        .collect();
    let operation_index = operations
        .iter()
        .enumerate()
        .map(|(i, o)| (o.id.clone(), i))
        .collect();
    Some(Catalog {
        version: 0,
        fingerprint,
        plans,
        plan_index,
        pay_per_use,
        models,
        model_index,
        operations,
        operation_index,
        routes: routes_out,
        credit_columns,
        stripe_prices,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use crate::rules::catalog::tests::load;

    pub(crate) fn problems(plans: &str, models: &str, ops: &str, routes: &str) -> Vec<String> {
        match load(plans, models, ops, routes) {
            Ok(_) => Vec::new(),
            Err(p) => p.iter().map(ToString::to_string).collect(),
        }
    }

    pub(crate) fn has(list: &[String], needle: &str) -> bool {
        list.iter().any(|p| p.contains(needle))
    }

    #[test]
    fn files_must_have_their_tables() {
        let list = problems("", "", "", "");
        for needle in [
            "plans.toml: pay_per_use: missing",
            "models.toml: (file): no [[model]] entries",
            "operations.toml: (file): no [[operation]] entries",
            "routes.toml: (file): no [[route]] entries",
        ] {
            assert!(has(&list, needle), "{needle}\n{list:#?}");
        }
    }
}
