//! Decides the two small languages inside `routes.toml`: path patterns (`/api/v1/jobs/{id}`,
//! literal segments, `{name}` captures, `{operation}`) and value sources (`body:model`,
//! `header:X-Model`, `query:model`, `path:id`). Called by `build::routes`.

use std::collections::HashSet;

use crate::rules::routes::{Segment, Source, SourceKind};

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
