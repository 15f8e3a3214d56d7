//! Limits on a request head that the proxy listener enforces before anything else: the size of
//! the header block, unambiguous body framing, and no protocol upgrade. Decides whether a head
//! that Pingora parsed may go on to admission; `admit::admit` calls [`check_request_head`] as
//! its first step, so a refused head is never routed, authenticated, charged or proxied.
//!
//! Pingora 0.9.1 itself refuses (with its own plain 400, never proxied) a header block over
//! ~1 MiB, more than 256 header lines, and `Content-Length` values that differ; it accepts and
//! collapses identical repeated values, and drops `Content-Length` when `Transfer-Encoding` is
//! present. The arrival deadline of a header is enforced on the connection (`connection`).
//!
//! - **Size.** The header block — request line and every header line, with their line ends, as
//!   received — over `server.max_header_bytes` is `431 request_header_too_large`.
//! - **Framing.** `Content-Length` sent twice, as a comma list, or together with
//!   `Transfer-Encoding` is `400 invalid_request`: a backend or cache reading the other copy
//!   could frame another body than the gateway read (request smuggling).
//! - **Upgrade.** Any request carrying `Upgrade` is `400 invalid_request`, refused rather than
//!   stripped: Pingora decides from the *client's* header that a request is an upgrade and
//!   would tunnel raw bytes after a backend's `101`, which nothing can price or settle; removing
//!   the header only from the upstream copy would leave the downstream session in upgrade mode.
//!   Nothing on the proxy listener (generation routes, billing endpoints, the Stripe webhook)
//!   speaks WebSocket or h2c.

use pingora::http::RequestHeader;

use crate::config::ServerConfig;
use crate::error::GatewayError;
use crate::incoming::IncomingRequest;

/// Default of `server.max_header_bytes`.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;
/// Default of `server.header_timeout_ms`.
pub const DEFAULT_HEADER_TIMEOUT_MS: u64 = 10_000;
/// Largest `server.max_header_bytes` accepted: Pingora refuses header blocks past ~1 MiB itself.
pub const MAX_HEADER_BYTES_LIMIT: usize = 1024 * 1024 - 1;

/// The head limits, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub max_header_bytes: usize,
}

impl HttpLimits {
    pub fn of(server: &ServerConfig) -> Self {
        Self {
            max_header_bytes: server.max_header_bytes,
        }
    }
}

/// [`check_request_head`] of an incoming request under the `[server]` limits.
pub fn check_incoming(
    req: &dyn IncomingRequest,
    server: &ServerConfig,
) -> Result<(), GatewayError> {
    let raw = req.raw_head();
    check_request_head(req.header(), raw.as_deref(), &HttpLimits::of(server))
}

/// Refuses a head that breaks a limit (see the module doc). `raw_head` is the header block as
/// received when the transport keeps it (Pingora's HTTP/1 session does); without it the size
/// is counted from the parsed header (request line and `name: value` lines).
pub fn check_request_head(
    header: &RequestHeader,
    raw_head: Option<&[u8]>,
    limits: &HttpLimits,
) -> Result<(), GatewayError> {
    let size = raw_head.map_or_else(|| parsed_head_len(header), <[u8]>::len);
    if size > limits.max_header_bytes {
        return Err(GatewayError::RequestHeaderTooLarge(limits.max_header_bytes));
    }
    let lengths = header.headers.get_all(http::header::CONTENT_LENGTH);
    let count = lengths.iter().count();
    if count > 1 || lengths.iter().any(|v| v.as_bytes().contains(&b',')) {
        return Err(GatewayError::InvalidRequest(
            "Content-Length must be sent once, as a single number.".into(),
        ));
    }
    if header.headers.contains_key(http::header::TRANSFER_ENCODING)
        && (count > 0 || raw_head.is_some_and(names_content_length))
    {
        return Err(GatewayError::InvalidRequest(
            "Send either Content-Length or Transfer-Encoding, not both.".into(),
        ));
    }
    if header.headers.contains_key(http::header::UPGRADE) {
        return Err(GatewayError::InvalidRequest(
            "Protocol upgrades (Upgrade) are not supported here.".into(),
        ));
    }
    Ok(())
}

/// The size of the head as `METHOD target HTTP/x.y\r\n` + `name: value\r\n`… + `\r\n`.
fn parsed_head_len(header: &RequestHeader) -> usize {
    let target = header.raw_path().len();
    let line = header.method.as_str().len() + 1 + target + 1 + "HTTP/1.1".len() + 2;
    let fields: usize = header
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + 2 + value.len() + 2)
        .sum();
    line + fields + 2
}

/// Whether a raw header block has a `Content-Length` line (Pingora removes it from the parsed
/// header when `Transfer-Encoding` is present, so only the raw bytes still show it).
fn names_content_length(raw: &[u8]) -> bool {
    raw.split(|&b| b == b'\n').skip(1).any(|line| {
        let name = line.split(|&b| b == b':').next().unwrap_or(&[]);
        name.trim_ascii().eq_ignore_ascii_case(b"content-length")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(lines: &[(&str, &str)]) -> RequestHeader {
        let mut h = RequestHeader::build("POST", b"/api/v1/images/relight", None).unwrap();
        for (n, v) in lines {
            h.append_header(n.to_string(), *v).unwrap();
        }
        h
    }

    const LIMITS: HttpLimits = HttpLimits {
        max_header_bytes: 1024,
    };

    fn code(r: Result<(), GatewayError>) -> &'static str {
        r.err().map_or("ok", |e| e.code())
    }

    #[test]
    fn the_header_block_is_counted_whole_and_refused_past_the_limit() {
        let ok = head(&[("host", "a"), ("x-pad", &"a".repeat(900))]);
        assert_eq!(code(check_request_head(&ok, None, &LIMITS)), "ok");
        let one_line = head(&[("x-pad", &"a".repeat(1024))]);
        let e = check_request_head(&one_line, None, &LIMITS).unwrap_err();
        assert_eq!((e.status(), e.code()), (431, "request_header_too_large"));
        let pad = "a".repeat(60);
        let many: Vec<(&str, &str)> = (0..20).map(|_| ("x-pad", pad.as_str())).collect();
        assert_eq!(
            code(check_request_head(&head(&many), None, &LIMITS)),
            "request_header_too_large",
            "20 lines of 70 bytes"
        );
        // The raw block, when known, is what counts (request line included).
        let raw = vec![b'a'; 1025];
        assert_eq!(
            code(check_request_head(&head(&[]), Some(&raw), &LIMITS)),
            "request_header_too_large"
        );
        assert_eq!(
            code(check_request_head(&head(&[]), Some(&raw[..1024]), &LIMITS)),
            "ok"
        );
    }

    #[test]
    fn content_length_must_be_single_and_alone() {
        for lines in [
            vec![("content-length", "5"), ("content-length", "5")],
            vec![("content-length", "5, 5")],
            vec![("content-length", "5"), ("transfer-encoding", "chunked")],
        ] {
            let e = check_request_head(&head(&lines), None, &LIMITS).unwrap_err();
            assert_eq!(
                (e.status(), e.code()),
                (400, "invalid_request"),
                "{lines:?}"
            );
        }
        assert_eq!(
            code(check_request_head(
                &head(&[("content-length", "5")]),
                None,
                &LIMITS
            )),
            "ok"
        );
        // Pingora drops Content-Length beside Transfer-Encoding; the raw head still shows it.
        let te = head(&[("transfer-encoding", "chunked")]);
        assert_eq!(code(check_request_head(&te, None, &LIMITS)), "ok");
        let raw = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-length : 5\r\n\r\n";
        assert_eq!(
            code(check_request_head(&te, Some(raw), &LIMITS)),
            "invalid_request"
        );
        let raw = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nX-Content-Length: 5\r\n\r\n";
        assert_eq!(code(check_request_head(&te, Some(raw), &LIMITS)), "ok");
    }

    #[test]
    fn upgrade_is_refused() {
        let h = head(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        assert_eq!(
            code(check_request_head(&h, None, &LIMITS)),
            "invalid_request"
        );
    }
}
