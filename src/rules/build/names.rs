//! Decides which ids and display names are acceptable: ids are lower-case slugs, names are
//! non-empty without control characters. Used by the plan, model and operation steps of `build`.

use crate::rules::files::Entry;
use crate::rules::problem::{FileCtx, RuleProblem};

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

pub(super) fn check_name<T>(
    ctx: &FileCtx<'_>,
    e: &Entry<T>,
    name: &str,
    problems: &mut Vec<RuleProblem>,
) {
    if name.trim().is_empty() {
        problems.push(e.problem(ctx, "name", "must not be empty"));
    } else if name.chars().any(char::is_control) {
        problems.push(e.problem(ctx, "name", "must not contain control characters"));
    }
}

pub(super) fn check_id<T>(
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

#[cfg(test)]
mod tests {
    use super::*;

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
