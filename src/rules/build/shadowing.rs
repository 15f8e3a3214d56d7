//! Decides whether a route can ever match: a route is refused when an earlier one (same method,
//! a pattern covering every path it would match) takes all its requests first. Called by
//! `build_catalog` after each route is built.

use crate::rules::files::{Entry, RawRoute};
use crate::rules::problem::{FileCtx, RuleProblem};
use crate::rules::routes::{Route, Segment};

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
