//! Decides what `models.toml` means: each model (id, name, optional pay-per-use rate, credit-table
//! heading, video capability) and the order of the credit-cost table's columns
//! (`credit_columns`), every problem reported. Called by `build_catalog`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::known::{Known, Lookup};
use super::names::{check_id, check_name};
use super::LEDGER_MAX;
use crate::rules::catalog::Model;
use crate::rules::decimal::money_literal;
use crate::rules::files::{Entry, EntryList, RawModel};
use crate::rules::problem::{FileCtx, RuleProblem};

pub(super) fn build_model(
    ctx: &FileCtx<'_>,
    e: &Entry<RawModel>,
    seen: &Known<'_>,
    problems: &mut Vec<RuleProblem>,
) -> Option<Model> {
    let raw = &e.raw;
    let mut ok = check_id(ctx, e, &raw.id, "model", problems);
    if matches!(seen.lookup(&raw.id), Lookup::Found(_)) || seen.unreadable.contains(raw.id.as_str())
    {
        problems.push(e.problem(ctx, "id", format!("duplicate model id {:?}", raw.id)));
        ok = false;
    }
    check_name(ctx, e, &raw.name, problems);
    let rate = match &raw.rate_usd {
        None => None,
        Some(lit) => match money_literal(lit, ctx.src) {
            Ok(r) if r.0 == 0 => {
                problems.push(e.problem(
                    ctx,
                    "rate_usd",
                    "0 is not a rate; leave rate_usd out to keep the model off pay-per-use",
                ));
                ok = false;
                None
            }
            Ok(r) if r.0 > LEDGER_MAX => {
                problems.push(e.problem(ctx, "rate_usd", format!("{r} is too large")));
                ok = false;
                None
            }
            Ok(r) => Some(r),
            Err(msg) => {
                problems.push(e.problem(ctx, "rate_usd", msg));
                ok = false;
                None
            }
        },
    };
    if let Some(col) = &raw.credit_column {
        if col.trim().is_empty() || col.chars().any(char::is_control) {
            problems.push(e.problem(ctx, "credit_column", "must be a non-empty heading"));
        }
    }
    ok.then(|| Model {
        id: Arc::from(raw.id.as_str()),
        name: raw.name.clone(),
        rate,
        credit_column: raw.credit_column.clone(),
        video: raw.video,
    })
}

pub(super) fn build_credit_columns(
    ctx: &FileCtx<'_>,
    list: &EntryList<RawModel>,
    order: Option<Vec<String>>,
    refs: &Known<'_>,
    models: &[Model],
    problems: &mut Vec<RuleProblem>,
) -> Vec<usize> {
    // Headings must be unique.
    let mut headings: HashMap<&str, &str> = HashMap::new();
    for e in &list.entries {
        if let Some(col) = &e.raw.credit_column {
            if let Some(other) = headings.insert(col.as_str(), e.raw.id.as_str()) {
                problems.push(e.problem(
                    ctx,
                    "credit_column",
                    format!("heading {col:?} is already used by model {other:?}"),
                ));
            }
        }
    }
    let with_column: Vec<usize> = models
        .iter()
        .enumerate()
        .filter(|(_, m)| m.credit_column.is_some())
        .map(|(i, _)| i)
        .collect();
    let Some(order) = order else {
        return with_column;
    };
    let mut columns = Vec::new();
    let mut listed: HashSet<&str> = HashSet::new();
    for (k, id) in order.iter().enumerate() {
        let field = format!("credit_columns[{k}]");
        if !listed.insert(id.as_str()) {
            problems.push(ctx.problem(field, format!("model {id:?} is listed twice"), None));
            continue;
        }
        match refs.lookup(id) {
            Lookup::Found(i) => {
                if models.get(i).is_some_and(|m| m.credit_column.is_none()) {
                    problems.push(ctx.problem(
                        field,
                        format!("model {id:?} has no credit_column heading"),
                        None,
                    ));
                } else {
                    columns.push(i);
                }
            }
            Lookup::Unknown => {
                problems.push(ctx.problem(field, format!("unknown model {id:?}"), None))
            }
            Lookup::Unchecked => {}
        }
    }
    for i in with_column {
        if !columns.contains(&i) {
            if let Some(e) = models
                .get(i)
                .and_then(|m| list.entries.iter().find(|e| *e.raw.id == *m.id))
            {
                problems.push(e.problem(
                    ctx,
                    "credit_column",
                    format!(
                        "model {:?} has a credit_column but is not listed in credit_columns",
                        e.raw.id
                    ),
                ));
            }
        }
    }
    columns
}

#[cfg(test)]
mod tests {
    use super::super::tests::{has, problems};
    use crate::rules::catalog::tests::{OPS, PLANS, ROUTES};

    #[test]
    fn model_and_column_problems() {
        let models = "credit_columns = [\"m1\", \"m3\", \"zz\", \"m1\"]\n\n[[model]]\nid = \"m1\"\nname = \"M1\"\nrate_usd = 0\ncredit_column = \"X\"\n\n[[model]]\nid = \"m2\"\nname = \"M2\"\ncredit_column = \"X\"\nrate_usd = true\n\n[[model]]\nid = \"m3\"\nname = \"M3\"\n";
        let list = problems(PLANS, models, OPS, ROUTES);
        for needle in [
            "models.toml: model[0].rate_usd: 0 is not a rate",
            "models.toml: model[1].credit_column: heading \"X\" is already used by model \"m1\"",
            "models.toml: model[1].rate_usd: expected a decimal amount of USD",
            "models.toml: credit_columns[1]: model \"m3\" has no credit_column heading",
            "models.toml: credit_columns[2]: unknown model \"zz\"",
            "models.toml: credit_columns[3]: model \"m1\" is listed twice",
        ] {
            assert!(has(&list, needle), "{needle}\n{list:#?}");
        }
        let models = "credit_columns = [\"m1\"]\n\n[[model]]\nid = \"m1\"\nname = \"M1\"\ncredit_column = \"A\"\nrate_usd = 1\n\n[[model]]\nid = \"m2\"\nname = \"M2\"\ncredit_column = \"B\"\n";
        let list = problems(PLANS, models, OPS, ROUTES);
        assert!(
            has(
                &list,
                "model[1].credit_column: model \"m2\" has a credit_column but is not listed"
            ),
            "{list:#?}"
        );
    }
}
