//! Decides what `plans.toml` means: the credit plans (ids, allowances, prices, API key slots,
//! rate limits, Stripe price ids mapped to at most one plan) and the required `[pay_per_use]`
//! settings, every problem reported. Called by `build_catalog`.

use std::collections::HashMap;
use std::sync::Arc;

use super::names::{check_id, check_name};
use super::LEDGER_MAX;
use crate::rules::catalog::{CreditGrant, PayPerUse, Plan, PAY_PER_USE};
use crate::rules::decimal::money_literal;
use crate::rules::files::{
    open, read_entries, read_value, top, EntryList, RawGrant, RawPayPerUse, RawPlan,
};
use crate::rules::problem::{FileCtx, RuleProblem};
use crate::rules::thresholds::{Percents, ThresholdKind};

pub(super) type PlansOut = (
    Vec<Plan>,
    HashMap<Arc<str>, usize>,
    Option<PayPerUse>,
    HashMap<String, usize>,
);

pub(super) fn build_plans(ctx: &FileCtx<'_>, problems: &mut Vec<RuleProblem>) -> PlansOut {
    let mut plans = Vec::new();
    let mut index: HashMap<Arc<str>, usize> = HashMap::new();
    let mut stripe: HashMap<String, usize> = HashMap::new();
    let Some(doc) = open(ctx, &["plan", "pay_per_use"], problems) else {
        return (plans, index, None, stripe);
    };
    let list: EntryList<RawPlan> = read_entries(ctx, "plan", top(&doc, "plan"), problems);
    let mut seen_prices: HashMap<&str, &str> = HashMap::new();
    let ppu: Result<Option<RawPayPerUse>, ()> =
        read_value(ctx, "pay_per_use", top(&doc, "pay_per_use"), problems);
    let pay_per_use = match ppu {
        Ok(Some(raw)) => Some(PayPerUse {
            api_keys: raw.api_keys,
            requests_per_minute: raw.requests_per_minute,
            alert_spend: match Percents::parse(ThresholdKind::Spend, &raw.alert_spend_percent) {
                Ok(set) => set,
                Err(list) => {
                    let span = top(&doc, "pay_per_use").map(|v| v.span());
                    for (i, msg) in list {
                        problems.push(ctx.problem(
                            format!("pay_per_use.alert_spend_percent[{i}]"),
                            msg,
                            span.as_ref(),
                        ));
                    }
                    Percents::EMPTY
                }
            },
        }),
        Ok(None) => {
            problems.push(ctx.problem(
                "pay_per_use",
                "missing (required): add a [pay_per_use] table",
                None,
            ));
            None
        }
        Err(()) => None,
    };
    if let Some(p) = &pay_per_use {
        if p.api_keys > 0 && p.requests_per_minute == 0 {
            let span = top(&doc, "pay_per_use").map(|v| v.span());
            problems.push(ctx.problem(
                "pay_per_use.requests_per_minute",
                "must be greater than 0 when api_keys is greater than 0",
                span.as_ref(),
            ));
        }
    }

    for e in &list.entries {
        let raw = &e.raw;
        let mut ok = check_id(ctx, e, &raw.id, "plan", problems);
        if raw.id == PAY_PER_USE {
            problems.push(e.problem(
                ctx,
                "id",
                "\"pay_per_use\" is reserved for accounts without a plan ([pay_per_use])",
            ));
            ok = false;
        }
        if index.contains_key(raw.id.as_str()) || (ok && list.unreadable_ids.contains(&raw.id)) {
            problems.push(e.problem(ctx, "id", format!("duplicate plan id {:?}", raw.id)));
            ok = false;
        }
        check_name(ctx, e, &raw.name, problems);
        if raw.credits > LEDGER_MAX {
            problems.push(e.problem(ctx, "credits", format!("{} is too large", raw.credits)));
        }
        let price = match money_literal(&raw.price_usd, ctx.src) {
            Ok(p) => Some(p),
            Err(msg) => {
                problems.push(e.problem(ctx, "price_usd", msg));
                None
            }
        };
        if raw.api_keys > 0 && raw.requests_per_minute == 0 {
            problems.push(e.problem(
                ctx,
                "requests_per_minute",
                "must be greater than 0 when api_keys is greater than 0",
            ));
        }
        for (k, price_id) in raw.stripe_price_ids.iter().enumerate() {
            let field = format!("stripe_price_ids[{k}]");
            let earlier_owner = seen_prices.insert(price_id.as_str(), raw.id.as_str());
            if price_id.is_empty() || !price_id.bytes().all(|b| b.is_ascii_graphic()) {
                problems.push(e.problem_at(
                    ctx,
                    &field,
                    "stripe_price_ids",
                    format!("{price_id:?} is not a Stripe price id (no spaces, not empty)"),
                ));
            } else if let Some(other_id) = earlier_owner {
                problems.push(e.problem_at(
                    ctx,
                    &field,
                    "stripe_price_ids",
                    format!("Stripe price {price_id:?} already maps to plan {other_id:?}"),
                ));
            } else if ok {
                stripe.insert(price_id.clone(), plans.len());
            }
        }
        let mut thresholds = |key: &str, kind: ThresholdKind, values: &[i64]| {
            Percents::parse(kind, values).unwrap_or_else(|list| {
                for (i, msg) in list {
                    problems.push(e.problem_at(ctx, &format!("{key}[{i}]"), key, msg));
                }
                Percents::EMPTY
            })
        };
        let alert_credits_left = thresholds(
            "alert_credits_left_percent",
            ThresholdKind::CreditsLeft,
            &raw.alert_credits_left_percent,
        );
        let alert_spend = thresholds(
            "alert_spend_percent",
            ThresholdKind::Spend,
            &raw.alert_spend_percent,
        );
        if let (true, Some(price)) = (ok, price) {
            let id: Arc<str> = Arc::from(raw.id.as_str());
            index.insert(id.clone(), plans.len());
            plans.push(Plan {
                id,
                name: raw.name.clone(),
                credits: raw.credits,
                grant: match raw.credits_grant {
                    RawGrant::Once => CreditGrant::Once,
                    RawGrant::Period => CreditGrant::Period,
                },
                api_keys: raw.api_keys,
                price,
                requests_per_minute: raw.requests_per_minute,
                stripe_price_ids: raw.stripe_price_ids.clone(),
                alert_credits_left,
                alert_spend,
            });
        }
    }
    (plans, index, pay_per_use, stripe)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{has, problems};
    use crate::rules::catalog::tests::{MODELS, OPS, ROUTES};

    #[test]
    fn plan_problems() {
        let plans = "[[plan]]\nid = \"Basic Plan\"\nname = \"\"\ncredits = 10\napi_keys = 1\nprice_usd = 0.0000001\nrequests_per_minute = 0\nstripe_price_ids = [\"price_x\", \"price_x\", \"\"]\n\n[[plan]]\nid = \"b\"\nname = \"B\"\ncredits = -1\napi_keys = 1\nprice_usd = 1\nrequests_per_minute = 1\n";
        let list = problems(plans, MODELS, OPS, ROUTES);
        for needle in [
            "plans.toml: plan[0].id: plan id \"Basic Plan\" must be a lower-case slug",
            "plans.toml: plan[0].name: must not be empty",
            "plans.toml: plan[0].price_usd: 0.0000001 has more than 6 decimal places",
            "plans.toml: plan[0].requests_per_minute: must be greater than 0",
            "plans.toml: plan[0].stripe_price_ids[1]: Stripe price \"price_x\" already maps",
            "plans.toml: plan[0].stripe_price_ids[2]: \"\" is not a Stripe price id",
            "plans.toml: plan[1].credits:",
            "plans.toml: pay_per_use: missing (required)",
        ] {
            assert!(has(&list, needle), "{needle}\n{list:#?}");
        }
    }

    #[test]
    fn alert_threshold_problems() {
        let plans = "[[plan]]\nid = \"b\"\nname = \"B\"\ncredits = 10\napi_keys = 1\nprice_usd = 1\nrequests_per_minute = 1\nalert_credits_left_percent = [20, 20, 100]\nalert_spend_percent = [0]\n\n[pay_per_use]\napi_keys = 1\nrequests_per_minute = 1\nalert_spend_percent = [80, 101]\n";
        let list = problems(plans, MODELS, OPS, ROUTES);
        for needle in [
            "plans.toml: plan[0].alert_credits_left_percent[1]: 20 is listed twice",
            "plans.toml: plan[0].alert_credits_left_percent[2]: 100: percent of the allowance left",
            "plans.toml: plan[0].alert_spend_percent[0]: 0: percent of the spending limit spent",
            "plans.toml: pay_per_use.alert_spend_percent[1]: 101:",
        ] {
            assert!(has(&list, needle), "{needle}\n{list:#?}");
        }
    }
}
