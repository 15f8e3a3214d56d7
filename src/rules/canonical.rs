//! Decides what a request-target means before any route is matched: exactly one canonical form
//! of the path, or a refusal when the target could mean different paths to the gateway and to
//! the upstream (encoded `/` or `\`, `.`/`..` segments, `//`, NUL and other control characters,
//! `;` path parameters, double encoding, invalid escapes, non-ASCII, absolute-form targets).
//! Refusals answer 400 `invalid_request` and are never proxied.
//!
//! The canonical path keeps reserved characters as they were sent (raw or escaped, escapes in
//! upper-case hex) and decodes escaped unreserved characters (`%41` → `A`, `%7E` → `~`), as RFC
//! 3986 §6.2.2 normalisation does. Route matching compares the fully decoded segments,
//! case-sensitively.

use std::borrow::Cow;
use std::fmt;

/// A request-target after canonicalisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalPath {
    /// The canonical path, starting with `/` (what the upstream is sent).
    pub path: String,
    /// The decoded path segments (`/api/v1/jobs/j%201` → `["api", "v1", "jobs", "j 1"]`).
    pub segments: Vec<String>,
    /// The query without the `?`, as sent (validated, not rewritten); `None` when empty.
    pub query: Option<String>,
}

/// Why a request-target is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request target must be a path starting with `/`")]
    NotOriginForm,
    #[error("the path contains an encoded `/` or `\\`")]
    EncodedSlash,
    #[error("the path contains a backslash")]
    Backslash,
    #[error("the request target contains a NUL or control character")]
    ControlCharacter,
    #[error("the path contains a `.` or `..` segment")]
    DotSegment,
    #[error("the path contains an empty segment (`//` or a trailing `/`)")]
    EmptySegment,
    #[error("the path contains `;`")]
    Semicolon,
    #[error("the path contains an encoded `%` (double encoding)")]
    EncodedPercent,
    #[error("the request target contains an invalid percent-encoding")]
    InvalidPercentEncoding,
    #[error("the request target contains a non-ASCII byte")]
    NonAscii,
    #[error("the path contains the character `{0}`, which must be percent-encoded")]
    InvalidCharacter(char),
    #[error("the path contains percent-encoded bytes that are not UTF-8")]
    InvalidUtf8,
    #[error("the request target contains a fragment (`#`)")]
    Fragment,
}

impl PathError {
    /// The contract's error code (CONTRACT §7): always `invalid_request` (400).
    pub fn code(&self) -> &'static str {
        "invalid_request"
    }
}

/// Unreserved characters (RFC 3986 §2.3): escaped forms are decoded in the canonical path.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Characters allowed raw in a path segment (pchar minus `;`, which is refused).
fn is_raw_path_char(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@'
        )
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The byte of the escape starting at `bytes[i]` (which is `%`).
fn escape_at(bytes: &[u8], i: usize) -> Result<u8, PathError> {
    let hi = bytes.get(i + 1).copied().and_then(hex_value);
    let lo = bytes.get(i + 2).copied().and_then(hex_value);
    match (hi, lo) {
        (Some(h), Some(l)) => Ok(h * 16 + l),
        _ => Err(PathError::InvalidPercentEncoding),
    }
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// Canonicalises a request-target (`/path?query`). See the module documentation.
pub fn canonicalize(raw: &str) -> Result<CanonicalPath, PathError> {
    let bytes = raw.as_bytes();
    if !raw.is_ascii() {
        return Err(PathError::NonAscii);
    }
    if bytes.iter().any(|b| b.is_ascii_control()) {
        return Err(PathError::ControlCharacter);
    }
    if bytes.contains(&b'#') {
        return Err(PathError::Fragment);
    }
    let (raw_path, raw_query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (raw, None),
    };
    if !raw_path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }

    let mut path = String::with_capacity(raw_path.len());
    let mut segments = Vec::new();
    let p = raw_path.as_bytes();
    if p.len() > 1 {
        // Each segment between slashes; the leading `/` is skipped.
        for raw_segment in raw_path[1..].split('/') {
            let (canonical, decoded) = canonical_segment(raw_segment.as_bytes())?;
            if decoded.is_empty() {
                return Err(PathError::EmptySegment);
            }
            if decoded == "." || decoded == ".." {
                return Err(PathError::DotSegment);
            }
            path.push('/');
            path.push_str(&canonical);
            segments.push(decoded);
        }
    } else {
        path.push('/');
    }

    let query = match raw_query {
        Some(q) => {
            check_query(q)?;
            if q.is_empty() {
                None
            } else {
                Some(q.to_string())
            }
        }
        None => None,
    };
    Ok(CanonicalPath {
        path,
        segments,
        query,
    })
}

/// One segment's canonical text and its decoded value.
fn canonical_segment(raw: &[u8]) -> Result<(String, String), PathError> {
    let mut canonical = Vec::with_capacity(raw.len());
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        match b {
            b'%' => {
                let v = escape_at(raw, i)?;
                match v {
                    b'/' | b'\\' => return Err(PathError::EncodedSlash),
                    b'%' => return Err(PathError::EncodedPercent),
                    b';' => return Err(PathError::Semicolon),
                    v if v.is_ascii_control() => return Err(PathError::ControlCharacter),
                    v if is_unreserved(v) => canonical.push(v),
                    v => canonical.extend_from_slice(&[
                        b'%',
                        HEX_UPPER[usize::from(v >> 4)],
                        HEX_UPPER[usize::from(v & 0xF)],
                    ]),
                }
                decoded.push(v);
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            b';' => return Err(PathError::Semicolon),
            b if is_raw_path_char(b) => {
                canonical.push(b);
                decoded.push(b);
                i += 1;
            }
            b => return Err(PathError::InvalidCharacter(char::from(b))),
        }
    }
    // `canonical` is ASCII by construction.
    let canonical = String::from_utf8(canonical).map_err(|_| PathError::InvalidUtf8)?;
    let decoded = String::from_utf8(decoded).map_err(|_| PathError::InvalidUtf8)?;
    Ok((canonical, decoded))
}

/// The query is kept as sent, but it must be well formed: valid escapes and no encoded NUL.
fn check_query(q: &str) -> Result<(), PathError> {
    let bytes = q.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if escape_at(bytes, i)? == 0 {
                return Err(PathError::ControlCharacter);
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    Ok(())
}

/// Decodes one `application/x-www-form-urlencoded` component (`+` is a space). Borrows when
/// nothing needs decoding. The query was validated by [`canonicalize`], so escapes are valid.
fn decode_component(raw: &str) -> Cow<'_, [u8]> {
    if !raw.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(raw.as_bytes());
    }
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => match escape_at(bytes, i) {
                Ok(v) => {
                    out.push(v);
                    i += 3;
                }
                Err(_) => {
                    out.push(b'%');
                    i += 1;
                }
            },
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Cow::Owned(out)
}

impl CanonicalPath {
    /// The first value of query parameter `name`, percent-decoded (`+` is a space; bytes that
    /// are not UTF-8 are replaced).
    pub fn query_param(&self, name: &str) -> Option<String> {
        self.query_values(name)
            .next()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    /// Every value of query parameter `name`, in order, percent-decoded to bytes. A parameter
    /// without `=` has the empty value.
    pub fn query_values<'a, 'n>(
        &'a self,
        name: &'n str,
    ) -> impl Iterator<Item = Cow<'a, [u8]>> + use<'a, 'n> {
        self.query
            .as_deref()
            .unwrap_or("")
            .split('&')
            .filter(|pair| !pair.is_empty())
            .filter_map(move |pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                if decode_component(k).as_ref() == name.as_bytes() {
                    Some(decode_component(v))
                } else {
                    None
                }
            })
    }

    /// The target to send upstream: the canonical path and the query.
    pub fn request_target(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{}", self.path, q),
            None => self.path.clone(),
        }
    }
}

impl fmt::Display for CanonicalPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)?;
        if let Some(q) = &self.query {
            write!(f, "?{q}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> CanonicalPath {
        match canonicalize(raw) {
            Ok(p) => p,
            Err(e) => panic!("{raw}: {e}"),
        }
    }

    #[test]
    fn plain_paths_pass_through() {
        let p = ok("/api/v1/images/relight?model=seedream-4.5&n=2");
        assert_eq!(p.path, "/api/v1/images/relight");
        assert_eq!(p.segments, vec!["api", "v1", "images", "relight"]);
        assert_eq!(p.query.as_deref(), Some("model=seedream-4.5&n=2"));
        assert_eq!(
            p.request_target(),
            "/api/v1/images/relight?model=seedream-4.5&n=2"
        );
        let root = ok("/");
        assert_eq!(root.path, "/");
        assert!(root.segments.is_empty());
        assert_eq!(ok("/x?").query, None);
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_others_normalised() {
        let p = ok("/api/v1/images/%72elight");
        assert_eq!(p.path, "/api/v1/images/relight");
        assert_eq!(p.segments[3], "relight");
        let p = ok("/api/v1/jobs/a%20b%3f%7e");
        assert_eq!(p.path, "/api/v1/jobs/a%20b%3F~");
        assert_eq!(p.segments[3], "a b?~");
        let p = ok("/x/%C3%A9");
        assert_eq!(p.segments[1], "é");
        assert_eq!(p.path, "/x/%C3%A9");
    }

    #[test]
    fn ambiguous_targets_are_refused() {
        let cases: &[(&str, PathError)] = &[
            ("/api/v1/images%2Frelight", PathError::EncodedSlash),
            ("/api/v1/images%2frelight", PathError::EncodedSlash),
            ("/api/v1/images%5Crelight", PathError::EncodedSlash),
            ("/api/v1/images%5crelight", PathError::EncodedSlash),
            ("/api\\v1", PathError::Backslash),
            ("/api/v1/%00", PathError::ControlCharacter),
            ("/api/v1/\0", PathError::ControlCharacter),
            ("/api/v1/a\tb", PathError::ControlCharacter),
            ("/api/v1/%0a", PathError::ControlCharacter),
            ("/api/v1/%7f", PathError::ControlCharacter),
            ("/api/v1/../admin", PathError::DotSegment),
            ("/api/v1/./images", PathError::DotSegment),
            ("/api/v1/%2e%2e/admin", PathError::DotSegment),
            ("/api/v1/%2E%2E/admin", PathError::DotSegment),
            ("/api/v1/.%2e/admin", PathError::DotSegment),
            ("/api/v1/%2e/admin", PathError::DotSegment),
            ("/api/v1/..", PathError::DotSegment),
            ("/api//v1", PathError::EmptySegment),
            ("//api/v1", PathError::EmptySegment),
            ("/api/v1/", PathError::EmptySegment),
            ("/api/v1/images;x=1", PathError::Semicolon),
            ("/api/v1/images%3bx", PathError::Semicolon),
            ("/api/v1/%252F", PathError::EncodedPercent),
            ("/api/v1/%zz", PathError::InvalidPercentEncoding),
            ("/api/v1/%4", PathError::InvalidPercentEncoding),
            ("/api/v1/%", PathError::InvalidPercentEncoding),
            ("/api/v1/%FF", PathError::InvalidUtf8),
            ("/api/v1/é", PathError::NonAscii),
            ("api/v1/images", PathError::NotOriginForm),
            ("http://example.com/api/v1/videos", PathError::NotOriginForm),
            ("*", PathError::NotOriginForm),
            ("", PathError::NotOriginForm),
            ("/api/v1/a b", PathError::InvalidCharacter(' ')),
            ("/api/v1/{x}", PathError::InvalidCharacter('{')),
            ("/api/v1/videos#x", PathError::Fragment),
            (
                "/api/v1/videos?model=%zz",
                PathError::InvalidPercentEncoding,
            ),
            ("/api/v1/videos?model=%00", PathError::ControlCharacter),
        ];
        for (raw, want) in cases {
            assert_eq!(canonicalize(raw).as_ref(), Err(want), "{raw}");
        }
    }

    #[test]
    fn query_params_are_decoded() {
        let p = ok("/x?model=nano%2Dbanana-2&n=2&flag&model=b+c&e=");
        assert_eq!(p.query_param("model").as_deref(), Some("nano-banana-2"));
        assert_eq!(p.query_param("n").as_deref(), Some("2"));
        assert_eq!(p.query_param("flag").as_deref(), Some(""));
        assert_eq!(p.query_param("e").as_deref(), Some(""));
        assert_eq!(p.query_param("missing"), None);
        let all: Vec<Vec<u8>> = p.query_values("model").map(|v| v.into_owned()).collect();
        assert_eq!(all, vec![b"nano-banana-2".to_vec(), b"b c".to_vec()]);
        assert!(matches!(p.query_values("n").next(), Some(Cow::Borrowed(_))));
    }

    #[test]
    fn code_is_invalid_request() {
        assert_eq!(PathError::DotSegment.code(), "invalid_request");
    }
}
