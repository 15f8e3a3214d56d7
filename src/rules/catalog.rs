//! Decides what the rules mean: turns the raw files into a validated [`Catalog`] of plans,
//! pay-per-use settings, models, operations and routes, and refuses the whole catalog with every
//! problem listed (negative, missing or unparseable amounts, duplicate ids, references to unknown
//! models or operations, amounts that could overflow the ledger, reserved ids, ...). Also the
//! catalog's read-only accessors used by the gateway.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;

use super::decimal::money_literal;
use super::files::{
    file_problem, open, quote_key, read_entries, read_value, top, Entry, EntryList, RawGrant,
    RawModel, RawOperation, RawPayPerUse, RawPlan, RawRoute, RawUnit,
};
use super::problem::{FileCtx, RuleProblem};
use super::routes::{self, Route};
use crate::money::MicroUsd;

/// The plan id of accounts without a plan (pay-per-use only); reserved, no plan may use it.
pub const PAY_PER_USE: &str = "pay_per_use";

/// The largest amount the ledger can hold (Redis integers are signed 64-bit).
pub(crate) const LEDGER_MAX: u64 = i64::MAX as u64;

/// How a plan's credits are granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CreditGrant {
    /// Granted once, when the account is created (`credits_grant = "once"`; the free plan).
    Once,
    /// Reset to the allowance at the start of every billing period, no rollover.
    Period,
}

/// A credit-based plan.
#[derive(Debug, Clone)]
pub struct Plan {
    pub id: Arc<str>,
    pub name: String,
    /// The allowance: per period, or once (see `grant`).
    pub credits: u64,
    pub grant: CreditGrant,
    pub api_keys: u32,
    /// Price per billing period; zero for a free plan.
    pub price: MicroUsd,
    /// Per-key request rate limit; zero means no API access.
    pub requests_per_minute: u32,
    pub stripe_price_ids: Vec<String>,
}

/// Settings of accounts that have no plan (the `pay_per_use` plan id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayPerUse {
    pub api_keys: u32,
    pub requests_per_minute: u32,
}

/// A model clients may ask for.
#[derive(Debug, Clone)]
pub struct Model {
    pub id: Arc<str>,
    pub name: String,
    /// Pay-per-use rate per generated unit; `None` when the model is not on pay-per-use.
    pub rate: Option<MicroUsd>,
    /// Heading of this model's column in the credit-cost table.
    pub credit_column: Option<String>,
    /// Whether the model can run video operations.
    pub video: bool,
}

/// What one unit of quantity is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    Image,
    Video,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Image => "image",
            Unit::Video => "video",
        }
    }
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one unit of an operation costs on one model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Price {
    /// Credits per unit; `None` when not available with credits.
    pub credits: Option<u64>,
    /// Pay-per-use rate per unit; `None` when not available on pay-per-use.
    pub rate: Option<MicroUsd>,
}

impl Price {
    /// Whether the model can run the operation at all.
    pub fn is_available(&self) -> bool {
        self.credits.is_some() || self.rate.is_some()
    }
}

/// An operation and its price on every model of the catalog.
#[derive(Debug, Clone)]
pub struct Operation {
    pub id: Arc<str>,
    pub name: String,
    pub unit: Unit,
    /// Indexed like `Catalog::models`.
    pub(crate) prices: Vec<Price>,
}

/// The validated, immutable catalog: one version of the rules directory.
#[derive(Debug, Clone)]
pub struct Catalog {
    /// Assigned by the live holder; the loader sets 0.
    pub version: u64,
    /// Short SHA-256 (hex) of the four files' contents.
    pub fingerprint: String,
    pub(crate) plans: Vec<Plan>,
    pub(crate) plan_index: HashMap<Arc<str>, usize>,
    pub(crate) pay_per_use: PayPerUse,
    pub(crate) models: Vec<Model>,
    pub(crate) model_index: HashMap<Arc<str>, usize>,
    pub(crate) operations: Vec<Operation>,
    pub(crate) operation_index: HashMap<Arc<str>, usize>,
    pub(crate) routes: Vec<Route>,
    /// Model indexes of the credit-cost table's columns, in order.
    pub(crate) credit_columns: Vec<usize>,
    /// Stripe price id → plan index.
    pub(crate) stripe_prices: HashMap<String, usize>,
}

impl Catalog {
    /// Plans in file order.
    pub fn plans(&self) -> &[Plan] {
        &self.plans
    }

    pub fn plan(&self, id: &str) -> Option<&Plan> {
        self.plan_index.get(id).and_then(|&i| self.plans.get(i))
    }

    /// The plan a Stripe price id maps to.
    pub fn plan_for_stripe_price(&self, price_id: &str) -> Option<&Plan> {
        self.stripe_prices
            .get(price_id)
            .and_then(|&i| self.plans.get(i))
    }

    /// Settings of accounts without a plan.
    pub fn pay_per_use(&self) -> &PayPerUse {
        &self.pay_per_use
    }

    /// API key slots of a plan id, `pay_per_use` included; `None` for an unknown id.
    pub fn api_keys_for(&self, plan_id: &str) -> Option<u32> {
        if plan_id == PAY_PER_USE {
            return Some(self.pay_per_use.api_keys);
        }
        self.plan(plan_id).map(|p| p.api_keys)
    }

    /// Per-key requests per minute of a plan id, `pay_per_use` included.
    pub fn requests_per_minute_for(&self, plan_id: &str) -> Option<u32> {
        if plan_id == PAY_PER_USE {
            return Some(self.pay_per_use.requests_per_minute);
        }
        self.plan(plan_id).map(|p| p.requests_per_minute)
    }

    /// Models in file order (the rate table's order).
    pub fn models(&self) -> &[Model] {
        &self.models
    }

    pub fn model(&self, id: &str) -> Option<&Model> {
        self.model_index.get(id).and_then(|&i| self.models.get(i))
    }

    /// Operations in file order (the credit-cost table's rows).
    pub fn operations(&self) -> &[Operation] {
        &self.operations
    }

    pub fn operation(&self, id: &str) -> Option<&Operation> {
        self.operation_index
            .get(id)
            .and_then(|&i| self.operations.get(i))
    }

    /// Route rules in match order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The models that are columns of the credit-cost table, in column order.
    pub fn credit_columns(&self) -> impl Iterator<Item = &Model> + '_ {
        self.credit_columns
            .iter()
            .filter_map(|&i| self.models.get(i))
    }

    /// What one unit of `operation` costs on `model`; `None` when either id is unknown.
    pub fn price(&self, operation: &str, model: &str) -> Option<Price> {
        let op = self.operation(operation)?;
        let m = *self.model_index.get(model)?;
        op.prices.get(m).copied()
    }
}

/// The four files' texts; `None` for a file that could not be read (already reported).
pub(crate) struct SourceTexts<'s> {
    pub plans: Option<&'s str>,
    pub models: Option<&'s str>,
    pub operations: Option<&'s str>,
    pub routes: Option<&'s str>,
}

/// Ids defined by one file, for checking references from other files.
pub(crate) struct Known<'a> {
    index: HashMap<&'a str, usize>,
    unreadable: HashSet<&'a str>,
    /// False when the file itself could not be read: references are then not checked.
    complete: bool,
}

pub(crate) enum Lookup {
    Found(usize),
    Unknown,
    /// Defined by an entry that could not be read, or the defining file is unreadable.
    Unchecked,
}

impl<'a> Known<'a> {
    fn new(complete: bool, unreadable: &'a [String]) -> Self {
        Self {
            index: HashMap::new(),
            unreadable: unreadable.iter().map(String::as_str).collect(),
            complete,
        }
    }

    pub fn lookup(&self, id: &str) -> Lookup {
        match self.index.get(id) {
            Some(&i) => Lookup::Found(i),
            None if !self.complete || self.unreadable.contains(id) => Lookup::Unchecked,
            None => Lookup::Unknown,
        }
    }
}

/// Lower-case slug: `[a-z0-9]` then `[a-z0-9._-]`, at most 64 characters.
pub(crate) fn is_slug(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-')
        })
}

fn check_name<T>(ctx: &FileCtx<'_>, e: &Entry<T>, name: &str, problems: &mut Vec<RuleProblem>) {
    if name.trim().is_empty() {
        problems.push(e.problem(ctx, "name", "must not be empty"));
    } else if name.chars().any(char::is_control) {
        problems.push(e.problem(ctx, "name", "must not contain control characters"));
    }
}

fn check_id<T>(
    ctx: &FileCtx<'_>,
    e: &Entry<T>,
    id: &str,
    what: &str,
    problems: &mut Vec<RuleProblem>,
) -> bool {
    if is_slug(id) {
        true
    } else {
        problems.push(e.problem(
            ctx,
            "id",
            format!(
                "{what} id {id:?} must be a lower-case slug (a-z, 0-9, `.`, `_`, `-`; at most 64 characters)"
            ),
        ));
        false
    }
}

/// Validates everything; `Some` only when no problem was found.
pub(crate) fn build(
    texts: &SourceTexts<'_>,
    fingerprint: String,
    problems: &mut Vec<RuleProblem>,
) -> Option<Catalog> {
    let start = problems.len();

    // plans.toml
    let (plans, plan_index, pay_per_use, stripe_prices) = match texts.plans {
        Some(src) => build_plans(
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
            match build_model(ctx, e, &model_refs, problems) {
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
        Some(ctx) if models_complete => build_credit_columns(
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
            match build_operation(ctx, e, &op_refs, &model_refs, &models, problems) {
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
                    routes::check_shadowing(&ctx, e, &route, &routes_out, problems);
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

type PlansOut = (
    Vec<Plan>,
    HashMap<Arc<str>, usize>,
    Option<PayPerUse>,
    HashMap<String, usize>,
);

fn build_plans(ctx: &FileCtx<'_>, problems: &mut Vec<RuleProblem>) -> PlansOut {
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
            });
        }
    }
    (plans, index, pay_per_use, stripe)
}

fn build_model(
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

fn build_credit_columns(
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

fn build_operation(
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

impl<T> Entry<T> {
    /// A problem at a nested `field` whose line is that of the entry's key `key`.
    pub(crate) fn problem_at(
        &self,
        ctx: &FileCtx<'_>,
        field: &str,
        key: &str,
        message: impl std::fmt::Display,
    ) -> RuleProblem {
        ctx.problem(self.field(field), message, Some(self.span_of(key)))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::rules::{load_sources, RuleSources};

    pub(crate) const PLANS: &str = "[[plan]]\nid = \"basic\"\nname = \"Basic\"\ncredits = 10\napi_keys = 1\nprice_usd = \"15.50\"\nrequests_per_minute = 10\nstripe_price_ids = [\"price_basic\"]\n\n[pay_per_use]\napi_keys = 2\nrequests_per_minute = 7\n";
    pub(crate) const MODELS: &str = "[[model]]\nid = \"m1\"\nname = \"M1\"\nrate_usd = 0.5\ncredit_column = \"M one\"\nvideo = true\n\n[[model]]\nid = \"m2\"\nname = \"M2\"\ncredit_column = \"M two\"\n\n[[model]]\nid = \"m3\"\nname = \"M3\"\n";
    pub(crate) const OPS: &str = "[[operation]]\nid = \"gen\"\nname = \"Gen\"\nunit = \"image\"\ncredits = { m2 = 4 }\nuse_model_rates = true\n\n[[operation]]\nid = \"clip\"\nname = \"Clip\"\nunit = \"video\"\ncredits_on_video_models = 9\nrates_usd = { m2 = 1.25 }\n";
    pub(crate) const ROUTES: &str = "[[route]]\nmethod = \"POST\"\npath = \"/gen\"\noperation = \"gen\"\nmodel = [\"body:model\"]\n";

    pub(crate) fn load(
        plans: &str,
        models: &str,
        ops: &str,
        routes: &str,
    ) -> Result<Catalog, Vec<RuleProblem>> {
        load_sources(&RuleSources {
            plans,
            models,
            operations: ops,
            routes,
        })
    }

    fn problems(plans: &str, models: &str, ops: &str, routes: &str) -> Vec<String> {
        match load(plans, models, ops, routes) {
            Ok(_) => Vec::new(),
            Err(p) => p.iter().map(ToString::to_string).collect(),
        }
    }

    fn has(list: &[String], needle: &str) -> bool {
        list.iter().any(|p| p.contains(needle))
    }

    #[test]
    fn a_small_catalog_resolves_prices() {
        let c = match load(PLANS, MODELS, OPS, ROUTES) {
            Ok(c) => c,
            Err(p) => panic!("{p:#?}"),
        };
        assert_eq!(c.plan("basic").map(|p| p.price), Some(MicroUsd(15_500_000)));
        assert_eq!(c.plan("basic").map(|p| p.grant), Some(CreditGrant::Period));
        assert_eq!(
            c.plan_for_stripe_price("price_basic").map(|p| &*p.id),
            Some("basic")
        );
        assert_eq!(c.api_keys_for(PAY_PER_USE), Some(2));
        assert_eq!(c.requests_per_minute_for(PAY_PER_USE), Some(7));
        assert_eq!(c.requests_per_minute_for("basic"), Some(10));
        assert_eq!(c.api_keys_for("nope"), None);
        let p = |op: &str, m: &str| c.price(op, m);
        assert_eq!(
            p("gen", "m1"),
            Some(Price {
                credits: None,
                rate: Some(MicroUsd(500_000))
            })
        );
        assert_eq!(
            p("gen", "m2"),
            Some(Price {
                credits: Some(4),
                rate: None
            })
        );
        assert_eq!(p("gen", "m3"), Some(Price::default()));
        assert_eq!(
            p("clip", "m1"),
            Some(Price {
                credits: Some(9),
                rate: None
            })
        );
        assert_eq!(
            p("clip", "m2"),
            Some(Price {
                credits: None,
                rate: Some(MicroUsd(1_250_000))
            })
        );
        assert_eq!(p("clip", "nope"), None);
        assert_eq!(p("nope", "m1"), None);
        let cols: Vec<&str> = c.credit_columns().map(|m| &*m.id).collect();
        assert_eq!(cols, vec!["m1", "m2"]);
    }

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

    #[test]
    fn route_problems() {
        let routes = "[[route]]\nmethod = \"GET\"\npath = \"/jobs/{id}\"\nbilled = false\n\n[[route]]\nmethod = \"GET\"\npath = \"/jobs/special\"\nbilled = false\n\n[[route]]\nmethod = \"POST\"\npath = \"/x/{operation}\"\noperation = \"gen\"\nmodel = [\"body:model\", \"body:model\"]\n\n[[route]]\nmethod = \"POST\"\npath = \"/y\"\nmodel = [\"path:nope\"]\nquantity_default = 5\nquantity_max = 4\n\n[[route]]\nmethod = \"POST\"\npath = \"/z\"\noperation_from = [\"header:X-Kind\"]\nmodel = [\"body:model\"]\n\n[[route]]\nmethod = \"post\"\npath = \"/w//v\"\noperation = \"gen\"\noperations = [\"gen\"]\n\n[[route]]\nmethod = \"DELETE\"\npath = \"/u\"\nbilled = false\nmodel = [\"body:model\"]\n";
        let list = problems(PLANS, MODELS, OPS, routes);
        for needle in [
            "routes.toml: route[6].model: not allowed on an unbilled route",
            "routes.toml: route[1].path: never matched: route[0] (GET /jobs/{id}) comes first",
            "routes.toml: route[2].operations: missing: the path has `{operation}`",
            "routes.toml: route[2].model[1]: \"body:model\" is listed twice",
            "routes.toml: route[3].operation: a billed route needs",
            "routes.toml: route[3].model[0]: \"path:nope\": the path has no `{nope}` placeholder",
            "routes.toml: route[3].quantity_default: 5 is not in 1..=4",
            "routes.toml: route[4].operation_map: missing",
            "routes.toml: route[5].method: \"post\" is not a method",
            "routes.toml: route[5].path: \"/w//v\" has an empty segment",
            "routes.toml: route[5].operation: give only one of",
            "routes.toml: route[5].model: missing",
        ] {
            assert!(has(&list, needle), "{needle}\n{list:#?}");
        }
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

    #[test]
    fn slugs() {
        for ok in ["free", "seedream-4.5", "pay_per_use", "gpt-image-2", "4k"] {
            assert!(is_slug(ok), "{ok}");
        }
        for bad in ["", "Free", "-x", ".x", "a b", "a/b", "é", &"a".repeat(65)] {
            assert!(!is_slug(bad), "{bad}");
        }
    }
}
