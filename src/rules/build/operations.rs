//! Decides what `operations.toml` means: each operation (id, name, unit) and its price on every
//! model of the catalog (credits per model or on every video model, pay-per-use rates of its own
//! or the models'), every problem reported, unknown models included. Called by `build_catalog`.

use std::sync::Arc;

use super::known::{Known, Lookup};
use super::names::{check_id, check_name};
use super::LEDGER_MAX;
use crate::rules::catalog::{Model, Operation, Price, Unit};
use crate::rules::decimal::money_literal;
use crate::rules::files::{quote_key, Entry, RawOperation, RawUnit};
use crate::rules::problem::{FileCtx, RuleProblem};

pub(super) fn build_operation(
    ctx: &FileCtx<'_>,
    e: &Entry<RawOperation>,
    seen: &Known<'_>,
    model_refs: &Known<'_>,
    models: &[Model],
    problems: &mut Vec<RuleProblem>,
) -> Option<Operation> {
    let raw = &e.raw;
    let mut ok = check_id(ctx, e, &raw.id, "operation", problems);
    if matches!(seen.lookup(&raw.id), Lookup::Found(_)) || seen.unreadable.contains(raw.id.as_str())
    {
        problems.push(e.problem(ctx, "id", format!("duplicate operation id {:?}", raw.id)));
        ok = false;
    }
    check_name(ctx, e, &raw.name, problems);
    let mut prices = vec![Price::default(); models.len()];

    if let Some(c) = raw.credits_on_video_models {
        if c == 0 || c > LEDGER_MAX {
            problems.push(e.problem(
                ctx,
                "credits_on_video_models",
                format!("{c} is not a credit cost (1 or more, at most {LEDGER_MAX})"),
            ));
            ok = false;
        } else {
            for (p, m) in prices.iter_mut().zip(models) {
                if m.video {
                    p.credits = Some(c);
                }
            }
        }
    }
    if raw.use_model_rates {
        for (p, m) in prices.iter_mut().zip(models) {
            p.rate = m.rate;
        }
    }
    for (model, credits) in &raw.credits.0 {
        let field = format!("credits.{}", quote_key(model));
        if *credits == 0 || *credits > LEDGER_MAX {
            problems.push(e.problem_at(
                ctx,
                &field,
                "credits",
                format!("{credits} is not a credit cost (1 or more, at most {LEDGER_MAX})"),
            ));
            ok = false;
            continue;
        }
        match model_refs.lookup(model) {
            Lookup::Found(i) => {
                if let Some(p) = prices.get_mut(i) {
                    p.credits = Some(*credits);
                }
            }
            Lookup::Unknown => {
                problems.push(e.problem_at(
                    ctx,
                    &field,
                    "credits",
                    format!("unknown model {model:?} (not in models.toml)"),
                ));
                ok = false;
            }
            Lookup::Unchecked => ok = false,
        }
    }
    for (model, lit) in &raw.rates_usd.0 {
        let field = format!("rates_usd.{}", quote_key(model));
        let rate = match money_literal(lit, ctx.src) {
            Ok(r) if r.0 == 0 => {
                problems.push(e.problem_at(ctx, &field, "rates_usd", "0 is not a rate"));
                ok = false;
                continue;
            }
            Ok(r) if r.0 > LEDGER_MAX => {
                problems.push(e.problem_at(ctx, &field, "rates_usd", format!("{r} is too large")));
                ok = false;
                continue;
            }
            Ok(r) => r,
            Err(msg) => {
                problems.push(e.problem_at(ctx, &field, "rates_usd", msg));
                ok = false;
                continue;
            }
        };
        match model_refs.lookup(model) {
            Lookup::Found(i) => {
                if let Some(p) = prices.get_mut(i) {
                    p.rate = Some(rate);
                }
            }
            Lookup::Unknown => {
                problems.push(e.problem_at(
                    ctx,
                    &field,
                    "rates_usd",
                    format!("unknown model {model:?} (not in models.toml)"),
                ));
                ok = false;
            }
            Lookup::Unchecked => ok = false,
        }
    }
    if ok && model_refs.complete && !prices.iter().any(Price::is_available) {
        problems.push(ctx.problem(
            e.field.clone(),
            format!(
                "operation {:?} is available on no model: give `credits`, `credits_on_video_models` (with a model marked video = true), `use_model_rates` or `rates_usd`",
                raw.id
            ),
            Some(&e.span),
        ));
        ok = false;
    }
    ok.then(|| Operation {
        id: Arc::from(raw.id.as_str()),
        name: raw.name.clone(),
        unit: match raw.unit {
            RawUnit::Image => Unit::Image,
            RawUnit::Video => Unit::Video,
        },
        prices,
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{has, problems};
    use crate::rules::catalog::tests::{MODELS, PLANS, ROUTES};

    #[test]
    fn operation_problems() {
        let ops = "[[operation]]\nid = \"gen\"\nname = \"Gen\"\nunit = \"image\"\n\n[[operation]]\nid = \"gen\"\nname = \"Gen 2\"\nunit = \"image\"\ncredits = { m2 = 0, \"m9.5\" = 1 }\nrates_usd = { m1 = -1 }\n";
        let list = problems(PLANS, MODELS, ops, ROUTES);
        for needle in [
            "operations.toml: operation[0]: operation \"gen\" is available on no model",
            "operations.toml: operation[1].id: duplicate operation id \"gen\"",
            "operations.toml: operation[1].credits.m2: 0 is not a credit cost",
            "operations.toml: operation[1].credits.\"m9.5\": unknown model \"m9.5\"",
            "operations.toml: operation[1].rates_usd.m1: -1 is negative",
        ] {
            assert!(has(&list, needle), "{needle}\n{list:#?}");
        }
    }
}
