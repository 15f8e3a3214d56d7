//! Decides which requests are proxied and how each is priced: the validated route rules of
//! `routes.toml` (method, path pattern, how the operation is chosen, and the ordered sources of
//! the model and the quantity), their read-only accessors, and matching a canonical path against
//! them in file order. `build::routes` makes them from the raw file.

use std::sync::Arc;

use super::canonical::CanonicalPath;

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

/// When a route's charge is settled (`settle` in `routes.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SettleAt {
    /// When the request ends: a 2xx keeps, anything else refunds (the default).
    #[default]
    Request,
    /// A billed route whose 2xx answer is a job: the hold waits for the job's final state.
    Job,
    /// An unbilled `GET` with an `{id}` capture that reports a job's state: an answer saying
    /// `succeeded`, `failed` or `canceled` settles that job's hold.
    JobStatus,
}

impl SettleAt {
    /// As written in `routes.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Job => "job",
            Self::JobStatus => "job_status",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "request" => Self::Request,
            "job" => Self::Job,
            "job_status" => Self::JobStatus,
            _ => return None,
        })
    }
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
    pub(crate) settle: SettleAt,
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

    /// When the route's charge is settled.
    pub fn settle_at(&self) -> SettleAt {
        self.settle
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

    /// See [`Route::settle_at`].
    pub fn settle_at(&self) -> super::routes::SettleAt {
        self.route.settle
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

/// The first of `routes` (in file order) whose method and path pattern match. Case-sensitive.
/// `Catalog::match_route` calls it on the catalog's routes.
pub(crate) fn match_route<'c>(
    routes: &'c [Route],
    method: &str,
    path: &CanonicalPath,
) -> Option<RouteMatch<'c>> {
    'routes: for route in routes {
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
