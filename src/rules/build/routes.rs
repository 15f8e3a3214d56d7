//! Decides what one `[[route]]` of `routes.toml` means: its method, path pattern, how it chooses
//! its operation (fixed, from the path, or from sources through a map), the sources of the model
//! and the quantity, and that its amounts fit the ledger at the largest quantity; every problem
//! reported. Called by `build_catalog`, route by route in file order.

use std::sync::Arc;

use super::known::{Known, Lookup};
use super::syntax::{parse_pattern, parse_source};
use super::LEDGER_MAX;
use crate::rules::catalog::Operation;
use crate::rules::files::{quote_key, Entry, RawRoute};
use crate::rules::problem::{FileCtx, RuleProblem};
use crate::rules::routes::{OperationRule, Route, Segment, SettleAt, Source, SourceKind};

/// Methods a route may name.
const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// Parses a list of sources, reporting each bad one at `field[k]`.
fn parse_sources(
    ctx: &FileCtx<'_>,
    e: &Entry<RawRoute>,
    key: &str,
    list: &[String],
    segments: &[Segment],
    problems: &mut Vec<RuleProblem>,
) -> Option<Vec<Source>> {
    let mut out = Vec::with_capacity(list.len());
    let mut ok = true;
    for (k, text) in list.iter().enumerate() {
        let field = format!("{key}[{k}]");
        match parse_source(text, segments) {
            Ok(s) => {
                if out.iter().any(|o: &Source| o.kind == s.kind) {
                    problems.push(e.problem_at(
                        ctx,
                        &field,
                        key,
                        format!("{text:?} is listed twice"),
                    ));
                    ok = false;
                } else {
                    out.push(s);
                }
            }
            Err(msg) => {
                problems.push(e.problem_at(ctx, &field, key, msg));
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

/// What routes may refer to: the operations of `operations.toml`.
pub(crate) struct OperationRefs<'r, 'k> {
    pub known: &'r Known<'k>,
    pub operations: &'r [Operation],
}

impl OperationRefs<'_, '_> {
    /// Resolves an operation id written at `field` (on the line of `key`).
    fn resolve(
        &self,
        ctx: &FileCtx<'_>,
        e: &Entry<RawRoute>,
        (field, key): (&str, &str),
        id: &str,
        problems: &mut Vec<RuleProblem>,
    ) -> Option<Arc<str>> {
        match self.known.lookup(id) {
            Lookup::Found(i) => self.operations.get(i).map(|o| o.id.clone()),
            Lookup::Unknown => {
                problems.push(e.problem_at(
                    ctx,
                    field,
                    key,
                    format!("unknown operation {id:?} (not in operations.toml)"),
                ));
                None
            }
            Lookup::Unchecked => None,
        }
    }
}

/// The route's `settle`: `job` only on a billed route, `job_status` only on an unbilled `GET`
/// whose path captures `{id}` (the job id).
fn settle_at(
    ctx: &FileCtx<'_>,
    e: &Entry<RawRoute>,
    billed: bool,
    segments: &[Segment],
    problems: &mut Vec<RuleProblem>,
) -> SettleAt {
    let Some(text) = e.raw.settle.as_deref() else {
        return SettleAt::Request;
    };
    let Some(at) = SettleAt::parse(text) else {
        problems.push(e.problem(
            ctx,
            "settle",
            format!("{text:?} is not one of \"request\", \"job\", \"job_status\""),
        ));
        return SettleAt::Request;
    };
    let captures_id = segments
        .iter()
        .any(|s| matches!(s, Segment::Capture(n) if n == "id"));
    match at {
        SettleAt::Job if !billed => {
            problems.push(e.problem(ctx, "settle", "\"job\" needs a billed route"));
        }
        SettleAt::JobStatus if billed || e.raw.method != "GET" || !captures_id => {
            problems.push(e.problem(
                ctx,
                "settle",
                "\"job_status\" needs an unbilled GET route whose path captures `{id}`",
            ));
        }
        _ => {}
    }
    at
}

/// Validates one `[[route]]`; `None` when it has problems (all recorded).
pub(crate) fn build_route(
    ctx: &FileCtx<'_>,
    e: &Entry<RawRoute>,
    refs: &OperationRefs<'_, '_>,
    problems: &mut Vec<RuleProblem>,
) -> Option<Route> {
    let raw = &e.raw;
    let start = problems.len();

    if !METHODS.contains(&raw.method.as_str()) {
        problems.push(e.problem(
            ctx,
            "method",
            format!(
                "{:?} is not a method; expected one of {}",
                raw.method,
                METHODS.join(", ")
            ),
        ));
    }
    let mut segments = match parse_pattern(&raw.path) {
        Ok(s) => s,
        Err(msg) => {
            problems.push(e.problem(ctx, "path", msg));
            Vec::new()
        }
    };
    let has_op_placeholder = segments.iter().any(|s| matches!(s, Segment::Operation(_)));
    let billed = raw.billed.unwrap_or(true);
    let label = match &raw.label {
        Some(l) if l.trim().is_empty() || l.chars().any(char::is_control) => {
            problems.push(e.problem(ctx, "label", "must be a non-empty label"));
            String::new()
        }
        Some(l) => l.clone(),
        None => format!("{} {}", raw.method, raw.path),
    };

    let settle = settle_at(ctx, e, billed, &segments, problems);

    let billing_fields: [(&str, bool); 8] = [
        ("operation", raw.operation.is_some()),
        ("operations", raw.operations.is_some()),
        ("operation_from", raw.operation_from.is_some()),
        ("operation_map", raw.operation_map.is_some()),
        ("model", raw.model.is_some()),
        ("quantity", raw.quantity.is_some()),
        ("quantity_default", raw.quantity_default.is_some()),
        ("quantity_max", raw.quantity_max.is_some()),
    ];
    if !billed {
        for (key, present) in billing_fields {
            if present {
                problems.push(e.problem(
                    ctx,
                    key,
                    "not allowed on an unbilled route (billed = false)",
                ));
            }
        }
        if has_op_placeholder {
            problems.push(e.problem(
                ctx,
                "path",
                "`{operation}` needs a billed route with `operations`",
            ));
        }
        if problems.len() > start {
            return None;
        }
        return Some(Route {
            label,
            method: raw.method.clone(),
            pattern: raw.path.clone(),
            segments,
            operation: OperationRule::Unbilled,
            model: Vec::new(),
            quantity: Vec::new(),
            quantity_default: 1,
            quantity_max: 1,
            needs_json_body: false,
            settle,
        });
    }

    // How the operation is chosen: exactly one way.
    let ways = [
        raw.operation.is_some(),
        raw.operations.is_some(),
        raw.operation_from.is_some() || raw.operation_map.is_some(),
    ];
    let way_count = ways.iter().filter(|w| **w).count();
    if way_count == 0 {
        problems.push(e.problem(
            ctx,
            "operation",
            "a billed route needs `operation`, `operations` (with `{operation}` in the path) or `operation_from` with `operation_map`",
        ));
    } else if way_count > 1 {
        problems.push(e.problem(
            ctx,
            "operation",
            "give only one of `operation`, `operations` and `operation_from`/`operation_map`",
        ));
    }
    if has_op_placeholder && raw.operations.is_none() {
        problems.push(e.problem(
            ctx,
            "operations",
            "missing: the path has `{operation}`; list the operation ids it may name",
        ));
    }
    let mut operation = OperationRule::FromPath;
    if let Some(id) = &raw.operation {
        if let Some(id) = refs.resolve(ctx, e, ("operation", "operation"), id, problems) {
            operation = OperationRule::Fixed(id);
        }
    }
    if let Some(list) = &raw.operations {
        if !has_op_placeholder {
            problems.push(e.problem(
                ctx,
                "operations",
                "the path has no `{operation}` placeholder",
            ));
        }
        if list.is_empty() {
            problems.push(e.problem(ctx, "operations", "must list at least one operation"));
        }
        let mut ids: Vec<Arc<str>> = Vec::new();
        for (k, id) in list.iter().enumerate() {
            let field = format!("operations[{k}]");
            if let Some(id) = refs.resolve(ctx, e, (&field, "operations"), id, problems) {
                if ids.contains(&id) {
                    problems.push(e.problem_at(
                        ctx,
                        &field,
                        "operations",
                        format!("{id:?} is listed twice"),
                    ));
                } else {
                    ids.push(id);
                }
            }
        }
        for s in &mut segments {
            if let Segment::Operation(v) = s {
                *v = ids.clone();
            }
        }
        operation = OperationRule::FromPath;
    }
    match (&raw.operation_from, &raw.operation_map) {
        (Some(from), Some(map)) => {
            if from.is_empty() {
                problems.push(e.problem(ctx, "operation_from", "must list at least one source"));
            }
            if map.0.is_empty() {
                problems.push(e.problem(ctx, "operation_map", "must map at least one value"));
            }
            let sources = parse_sources(ctx, e, "operation_from", from, &segments, problems);
            let mut pairs = Vec::new();
            for (value, id) in &map.0 {
                let field = format!("operation_map.{}", quote_key(value));
                if value.is_empty() {
                    problems.push(e.problem_at(
                        ctx,
                        &field,
                        "operation_map",
                        "the value must not be empty",
                    ));
                    continue;
                }
                if let Some(id) = refs.resolve(ctx, e, (&field, "operation_map"), id, problems) {
                    pairs.push((value.clone(), id));
                }
            }
            if let Some(sources) = sources {
                operation = OperationRule::FromSources {
                    sources,
                    map: pairs,
                };
            }
        }
        (Some(_), None) => problems.push(e.problem(
            ctx,
            "operation_map",
            "missing: `operation_from` needs an `operation_map`",
        )),
        (None, Some(_)) => problems.push(e.problem(
            ctx,
            "operation_from",
            "missing: `operation_map` needs `operation_from` sources",
        )),
        (None, None) => {}
    }

    let model = match &raw.model {
        Some(list) if list.is_empty() => {
            problems.push(e.problem(ctx, "model", "must list at least one source"));
            Vec::new()
        }
        Some(list) => parse_sources(ctx, e, "model", list, &segments, problems).unwrap_or_default(),
        None => {
            problems.push(e.problem(
                ctx,
                "model",
                "missing: a billed route needs the sources of the model (e.g. [\"body:model\", \"header:X-Model\"])",
            ));
            Vec::new()
        }
    };
    let quantity = match &raw.quantity {
        Some(list) => {
            parse_sources(ctx, e, "quantity", list, &segments, problems).unwrap_or_default()
        }
        None => Vec::new(),
    };
    let quantity_max = raw.quantity_max.unwrap_or(1);
    let quantity_default = raw.quantity_default.unwrap_or(1);
    if quantity_max == 0 {
        problems.push(e.problem(ctx, "quantity_max", "must be at least 1"));
    }
    if quantity_default == 0 || quantity_default > quantity_max {
        problems.push(e.problem(
            ctx,
            "quantity_default",
            format!("{quantity_default} is not in 1..={quantity_max} (quantity_max)"),
        ));
    }

    let route = Route {
        label,
        method: raw.method.clone(),
        pattern: raw.path.clone(),
        segments,
        operation,
        needs_json_body: false,
        model,
        quantity,
        quantity_default,
        quantity_max,
        settle,
    };

    // Amounts must fit the ledger at the largest quantity.
    if quantity_max > 0 {
        for id in route.operation_ids() {
            let Some(op) = refs.operations.iter().find(|o| *o.id == *id) else {
                continue;
            };
            let max_credits = op
                .prices
                .iter()
                .filter_map(|p| p.credits)
                .max()
                .unwrap_or(0);
            let max_rate = op
                .prices
                .iter()
                .filter_map(|p| p.rate.map(|r| r.0))
                .max()
                .unwrap_or(0);
            for (what, unit) in [("credits", max_credits), ("micro-USD", max_rate)] {
                if unit
                    .checked_mul(quantity_max)
                    .is_none_or(|t| t > LEDGER_MAX)
                {
                    problems.push(e.problem(
                        ctx,
                        "quantity_max",
                        format!(
                            "{quantity_max} × {unit} {what} (operation {id:?}) overflows the ledger's 64-bit amounts"
                        ),
                    ));
                }
            }
        }
    }

    if problems.len() > start {
        return None;
    }
    let needs_json_body = route
        .model
        .iter()
        .chain(&route.quantity)
        .chain(route.operation_sources())
        .any(|s| matches!(s.kind, SourceKind::Body(_)));
    Some(Route {
        needs_json_body,
        ..route
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{has, problems};
    use crate::rules::catalog::tests::{MODELS, OPS, PLANS};

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
    fn settle_problems() {
        let routes = "[[route]]\nmethod = \"GET\"\npath = \"/a/{id}\"\nbilled = false\nsettle = \"job\"\n\n[[route]]\nmethod = \"POST\"\npath = \"/b/{id}\"\nbilled = false\nsettle = \"job_status\"\n\n[[route]]\nmethod = \"GET\"\npath = \"/c/{job}\"\nbilled = false\nsettle = \"job_status\"\n\n[[route]]\nmethod = \"POST\"\npath = \"/d\"\noperation = \"gen\"\nmodel = [\"body:model\"]\nsettle = \"later\"\n\n[[route]]\nmethod = \"POST\"\npath = \"/e/{id}\"\noperation = \"gen\"\nmodel = [\"body:model\"]\nsettle = \"job_status\"\n";
        let list = problems(PLANS, MODELS, OPS, routes);
        for needle in [
            "routes.toml: route[0].settle: \"job\" needs a billed route",
            "routes.toml: route[1].settle: \"job_status\" needs an unbilled GET route",
            "routes.toml: route[2].settle: \"job_status\" needs an unbilled GET route",
            "routes.toml: route[3].settle: \"later\" is not one of",
            "routes.toml: route[4].settle: \"job_status\" needs an unbilled GET route",
        ] {
            assert!(has(&list, needle), "{needle}\n{list:#?}");
        }
    }
}
