//! Decides which requests are proxied and how each is priced: the route rules of `routes.toml`
//! (method, path pattern, how the operation is chosen, and the ordered sources of the model and
//! the quantity), their validation, and matching a canonical path against them in file order.

use std::collections::HashSet;
use std::sync::Arc;

use super::canonical::CanonicalPath;
use super::catalog::{Catalog, Known, Lookup, Operation, LEDGER_MAX};
use super::files::{quote_key, Entry, RawRoute};
use super::problem::{FileCtx, RuleProblem};

/// Methods a route may name.
const METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// One segment of a route's path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    /// Matches exactly this decoded segment.
    Literal(String),
    /// `{name}`: matches any one non-empty segment.
    Capture(String),
    /// `{operation}`: matches one of these operation ids.
    Operation(Vec<Arc<str>>),
}

/// Where a value of the request is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SourceKind {
    /// A field of the JSON body; more than one name walks nested objects.
    Body(Vec<String>),
    /// A request header (matched case-insensitively by the lookup).
    Header(String),
    /// A query parameter.
    Query(String),
    /// The segment at this index of the path (a `{placeholder}`).
    Path(usize),
}

/// A source as written (`header:X-Model`) and what it means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub(crate) text: String,
    pub(crate) description: String,
    pub(crate) kind: SourceKind,
}

impl Source {
    /// As written in `routes.toml` (`body:model`).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// For people: "JSON body field `model`", "header `X-Model`".
    pub fn description(&self) -> &str {
        &self.description
    }
}

/// How a billed route chooses its operation.
#[derive(Debug, Clone)]
pub(crate) enum OperationRule {
    /// Not billed: no operation.
    Unbilled,
    /// Always this operation.
    Fixed(Arc<str>),
    /// From the `{operation}` path segment.
    FromPath,
    /// The first present source's value, looked up in `map`.
    FromSources {
        sources: Vec<Source>,
        map: Vec<(String, Arc<str>)>,
    },
}

/// One validated route rule.
#[derive(Debug, Clone)]
pub struct Route {
    pub(crate) label: String,
    pub(crate) method: String,
    pub(crate) pattern: String,
    pub(crate) segments: Vec<Segment>,
    pub(crate) operation: OperationRule,
    pub(crate) model: Vec<Source>,
    pub(crate) quantity: Vec<Source>,
    pub(crate) quantity_default: u64,
    pub(crate) quantity_max: u64,
    pub(crate) needs_json_body: bool,
}

impl Route {
    /// For logs and metrics: the `label` field, or `METHOD /path/{pattern}`.
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn method(&self) -> &str {
        &self.method
    }

    /// The path pattern as written (`/api/v1/images/{operation}`).
    pub fn path_pattern(&self) -> &str {
        &self.pattern
    }

    pub fn is_billed(&self) -> bool {
        !matches!(self.operation, OperationRule::Unbilled)
    }

    /// Whether a source reads the JSON body (the gateway must read and parse it first).
    pub fn needs_json_body(&self) -> bool {
        self.needs_json_body
    }

    pub fn quantity_default(&self) -> u64 {
        self.quantity_default
    }

    pub fn quantity_max(&self) -> u64 {
        self.quantity_max
    }

    /// Sources of the model, in precedence order.
    pub fn model_sources(&self) -> &[Source] {
        &self.model
    }

    /// Sources of the quantity, in precedence order.
    pub fn quantity_sources(&self) -> &[Source] {
        &self.quantity
    }

    /// Sources that choose the operation (`operation_from`), in precedence order.
    pub fn operation_sources(&self) -> &[Source] {
        match &self.operation {
            OperationRule::FromSources { sources, .. } => sources,
            _ => &[],
        }
    }

    /// Every operation id the route can price, without duplicates, in rule order.
    pub fn operation_ids(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        let all: Box<dyn Iterator<Item = &Arc<str>> + '_> = match &self.operation {
            OperationRule::Unbilled => Box::new(std::iter::empty()),
            OperationRule::Fixed(id) => Box::new(std::iter::once(id)),
            OperationRule::FromPath => Box::new(self.segments.iter().flat_map(|s| match s {
                Segment::Operation(ids) => ids.as_slice(),
                _ => &[],
            })),
            OperationRule::FromSources { map, .. } => Box::new(map.iter().map(|(_, id)| id)),
        };
        for id in all {
            if !out.contains(&&**id) {
                out.push(id);
            }
        }
        out
    }

    /// `(value, operation id)` pairs of `operation_map`.
    pub fn operation_map(&self) -> &[(String, Arc<str>)] {
        match &self.operation {
            OperationRule::FromSources { map, .. } => map,
            _ => &[],
        }
    }
}

/// A request matched to a route rule. Borrows the catalog it was matched in.
#[derive(Debug, Clone, Copy)]
pub struct RouteMatch<'c> {
    pub(crate) route: &'c Route,
    /// The operation, when the route fixes it or the path names it.
    pub(crate) operation: Option<&'c str>,
}

impl<'c> RouteMatch<'c> {
    pub fn route(&self) -> &'c Route {
        self.route
    }

    /// See [`Route::label`].
    pub fn label(&self) -> &'c str {
        &self.route.label
    }

    pub fn is_billed(&self) -> bool {
        self.route.is_billed()
    }

    pub fn needs_json_body(&self) -> bool {
        self.route.needs_json_body
    }

    /// The operation id when it is known without the body (fixed, or from the path).
    pub fn operation(&self) -> Option<&'c str> {
        self.operation
    }

    /// The decoded path segment captured by `{name}`, from the path that was matched.
    pub fn capture<'p>(&self, path: &'p CanonicalPath, name: &str) -> Option<&'p str> {
        let i = self.route.segments.iter().position(|s| match s {
            Segment::Capture(n) => n == name,
            Segment::Operation(_) => name == "operation",
            Segment::Literal(_) => false,
        })?;
        path.segments.get(i).map(String::as_str)
    }
}

impl Catalog {
    /// The first route (in file order) whose method and path pattern match. Case-sensitive.
    pub fn match_route(&self, method: &str, path: &CanonicalPath) -> Option<RouteMatch<'_>> {
        'routes: for route in &self.routes {
            if route.method != method || route.segments.len() != path.segments.len() {
                continue;
            }
            let mut operation = None;
            for (seg, actual) in route.segments.iter().zip(&path.segments) {
                match seg {
                    Segment::Literal(l) => {
                        if l != actual {
                            continue 'routes;
                        }
                    }
                    Segment::Capture(_) => {
                        if actual.is_empty() {
                            continue 'routes;
                        }
                    }
                    Segment::Operation(ids) => match ids.iter().find(|id| ***id == **actual) {
                        Some(id) => operation = Some(&**id),
                        None => continue 'routes,
                    },
                }
            }
            if let OperationRule::Fixed(id) = &route.operation {
                operation = Some(&**id);
            }
            return Some(RouteMatch { route, operation });
        }
        None
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`.
fn is_placeholder_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Characters allowed in a literal path segment (unreserved and sub-delims except `;`, `:`, `@`).
fn is_literal_char(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b'='
                | b':'
                | b'@'
        )
}

/// HTTP token characters (header names).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

/// Parses a path pattern. `{operation}` yields an empty `Segment::Operation` to fill in.
pub(crate) fn parse_pattern(path: &str) -> Result<Vec<Segment>, String> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(format!("{path:?} must start with `/`"));
    };
    let mut segments = Vec::new();
    if rest.is_empty() {
        return Ok(segments);
    }
    let mut names = HashSet::new();
    for seg in rest.split('/') {
        if seg.is_empty() {
            return Err(format!(
                "{path:?} has an empty segment (`//` or a trailing `/`)"
            ));
        }
        if let Some(inner) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            if !is_placeholder_name(inner) {
                return Err(format!(
                    "{path:?}: placeholder {seg:?} must be `{{name}}` with a name of letters, digits and `_`"
                ));
            }
            if !names.insert(inner) {
                return Err(format!("{path:?}: placeholder {seg:?} is used twice"));
            }
            segments.push(if inner == "operation" {
                Segment::Operation(Vec::new())
            } else {
                Segment::Capture(inner.to_string())
            });
        } else {
            if seg == "." || seg == ".." {
                return Err(format!("{path:?} has a `.` or `..` segment"));
            }
            if let Some(c) = seg.bytes().find(|b| !is_literal_char(*b)) {
                return Err(format!(
                    "{path:?}: segment {seg:?} contains {:?}; literal segments are plain (a placeholder is a whole segment `{{name}}`)",
                    char::from(c)
                ));
            }
            segments.push(Segment::Literal(seg.to_string()));
        }
    }
    Ok(segments)
}

/// Parses one source (`body:model`, `header:X-Model`, `query:model`, `path:id`).
pub(crate) fn parse_source(text: &str, segments: &[Segment]) -> Result<Source, String> {
    let expected =
        "expected `body:<field>`, `header:<Name>`, `query:<name>` or `path:<placeholder>`";
    let Some((kind, name)) = text.split_once(':') else {
        return Err(format!("{text:?} is not a source; {expected}"));
    };
    let (kind, description) = match kind {
        "body" => {
            let parts: Vec<String> = name.split('.').map(str::to_string).collect();
            if parts
                .iter()
                .any(|p| p.is_empty() || p.chars().any(char::is_control))
            {
                return Err(format!(
                    "{text:?}: the body field must be a name, or names joined by `.` for nested fields"
                ));
            }
            (SourceKind::Body(parts), format!("JSON body field `{name}`"))
        }
        "header" => {
            if name.is_empty() || !name.bytes().all(is_tchar) {
                return Err(format!("{text:?}: {name:?} is not a header name"));
            }
            (
                SourceKind::Header(name.to_string()),
                format!("header `{name}`"),
            )
        }
        "query" => {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !matches!(b, b'&' | b'=' | b'#' | b'%' | b'+'))
            {
                return Err(format!(
                    "{text:?}: {name:?} is not a plain query parameter name"
                ));
            }
            (
                SourceKind::Query(name.to_string()),
                format!("query parameter `{name}`"),
            )
        }
        "path" => {
            let index = segments
                .iter()
                .position(|s| matches!(s, Segment::Capture(n) if n == name));
            match index {
                Some(i) => (SourceKind::Path(i), format!("path segment `{{{name}}}`")),
                None => {
                    return Err(format!(
                        "{text:?}: the path has no `{{{name}}}` placeholder"
                    ))
                }
            }
        }
        _ => return Err(format!("{text:?} has an unknown kind {kind:?}; {expected}")),
    };
    Ok(Source {
        text: text.to_string(),
        description,
        kind,
    })
}

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

/// Whether every request that `later` matches is matched by `earlier` first.
fn covers(earlier: &Route, later: &Route) -> bool {
    if earlier.method != later.method || earlier.segments.len() != later.segments.len() {
        return false;
    }
    earlier
        .segments
        .iter()
        .zip(&later.segments)
        .all(|(a, b)| match (a, b) {
            (Segment::Capture(_), _) => true,
            (Segment::Literal(x), Segment::Literal(y)) => x == y,
            (Segment::Literal(x), Segment::Operation(ids)) => ids.iter().all(|id| **id == **x),
            (Segment::Operation(ids), Segment::Literal(y)) => ids.iter().any(|id| **id == **y),
            (Segment::Operation(a), Segment::Operation(b)) => b.iter().all(|id| a.contains(id)),
            (_, Segment::Capture(_)) => false,
        })
}

/// Reports a route that can never match because an earlier one takes all its requests.
pub(crate) fn check_shadowing(
    ctx: &FileCtx<'_>,
    e: &Entry<RawRoute>,
    route: &Route,
    earlier: &[Route],
    problems: &mut Vec<RuleProblem>,
) {
    if let Some((i, first)) = earlier.iter().enumerate().find(|(_, r)| covers(r, route)) {
        problems.push(e.problem(
            ctx,
            "path",
            format!(
                "never matched: route[{i}] ({} {}) comes first and matches every request this route would",
                first.method, first.pattern
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert_eq!(
            parse_pattern("/api/v1/jobs/{id}"),
            Ok(vec![
                Segment::Literal("api".into()),
                Segment::Literal("v1".into()),
                Segment::Literal("jobs".into()),
                Segment::Capture("id".into()),
            ])
        );
        assert_eq!(parse_pattern("/"), Ok(vec![]));
        for bad in [
            "api/v1",
            "/api//v1",
            "/api/v1/",
            "/api/{}",
            "/api/{a-b}",
            "/api/x{id}",
            "/api/{id}/{id}",
            "/api/../x",
            "/api/a%2Fb",
            "/api/a;b",
            "/api/a b",
            "/api\\x",
        ] {
            assert!(parse_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sources() {
        let segs = parse_pattern("/a/{id}").unwrap_or_default();
        let s = parse_source("body:model", &segs).map(|s| s.kind);
        assert_eq!(s, Ok(SourceKind::Body(vec!["model".into()])));
        let s = parse_source("body:options.model", &segs).map(|s| s.kind);
        assert_eq!(
            s,
            Ok(SourceKind::Body(vec!["options".into(), "model".into()]))
        );
        let s = parse_source("header:X-Model", &segs).map(|s| s.kind);
        assert_eq!(s, Ok(SourceKind::Header("X-Model".into())));
        let s = parse_source("query:model", &segs).map(|s| s.kind);
        assert_eq!(s, Ok(SourceKind::Query("model".into())));
        let s = parse_source("path:id", &segs).map(|s| s.kind);
        assert_eq!(s, Ok(SourceKind::Path(1)));
        for bad in [
            "model",
            "cookie:x",
            "body:",
            "body:a..b",
            "header:",
            "header:X Model",
            "query:",
            "query:a&b",
            "path:nope",
        ] {
            assert!(parse_source(bad, &segs).is_err(), "{bad}");
        }
    }
}
