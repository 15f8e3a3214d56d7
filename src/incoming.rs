//! The part of an incoming request that admission reads: its header and, on demand, its body
//! (bounded). The proxy implements it over a Pingora session; tests over plain values
//! ([`BufferedRequest`]). Also what the proxy does with a body it will not forward.

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::http::RequestHeader;

use crate::error::GatewayError;

/// Largest JSON body accepted by the billing and admin APIs.
pub const MAX_API_BODY_BYTES: usize = 4 * 1024;

#[async_trait]
pub trait IncomingRequest: Send {
    fn header(&self) -> &RequestHeader;
    /// The header block as received, when the transport keeps it.
    fn raw_head(&self) -> Option<Bytes> {
        None
    }
    /// The whole body, or `PayloadTooLarge(limit)` once it passes `limit` bytes.
    async fn read_body(&mut self, limit: usize) -> Result<Bytes, GatewayError>;
}

/// A request held in memory (tests, benches).
pub struct BufferedRequest {
    pub header: RequestHeader,
    pub body: Bytes,
}

#[async_trait]
impl IncomingRequest for BufferedRequest {
    fn header(&self) -> &RequestHeader {
        &self.header
    }

    async fn read_body(&mut self, limit: usize) -> Result<Bytes, GatewayError> {
        if self.body.len() > limit {
            return Err(GatewayError::PayloadTooLarge(limit));
        }
        Ok(self.body.clone())
    }
}

/// Reads a Pingora session's body into memory. Pingora's retry buffer (≤ 64 KiB) keeps what was
/// read and sends it upstream unchanged, so inspecting the body does not consume it. A client
/// that sent `Expect: 100-continue` waits for `100 Continue` before sending its body: it is
/// answered here, just before the body is first read (so a request refused on its header alone
/// is refused before anything is uploaded), and `continue_sent` records it.
pub struct SessionRequest<'a> {
    pub session: &'a mut pingora::proxy::Session,
    pub continue_sent: bool,
}

impl SessionRequest<'_> {
    /// Sends `100 Continue` once, if the client asked for it.
    pub async fn send_continue_if_expected(&mut self) -> Result<(), GatewayError> {
        if self.continue_sent || !expects_continue(self.session.req_header()) {
            return Ok(());
        }
        self.session
            .as_mut()
            .write_continue_response()
            .await
            .map_err(|e| GatewayError::InvalidRequest(format!("Could not answer Expect: {e}.")))?;
        self.continue_sent = true;
        Ok(())
    }
}

#[async_trait]
impl IncomingRequest for SessionRequest<'_> {
    fn header(&self) -> &RequestHeader {
        self.session.req_header()
    }

    fn raw_head(&self) -> Option<Bytes> {
        let h1 = self.session.as_downstream().as_http1()?;
        Some(h1.get_headers_raw_bytes())
    }

    async fn read_body(&mut self, limit: usize) -> Result<Bytes, GatewayError> {
        self.send_continue_if_expected().await?;
        self.session.as_mut().enable_retry_buffering();
        let mut body = BytesMut::new();
        loop {
            let chunk = self.session.read_request_body().await.map_err(|e| {
                GatewayError::InvalidRequest(format!("Could not read the request body: {e}."))
            })?;
            match chunk {
                None => break,
                Some(c) => {
                    if body.len() + c.len() > limit {
                        return Err(GatewayError::PayloadTooLarge(limit));
                    }
                    body.extend_from_slice(&c);
                }
            }
        }
        Ok(body.freeze())
    }
}

/// The first value of a header as text; `None` when absent or not visible ASCII.
pub fn header_str<'h>(header: &'h RequestHeader, name: &str) -> Option<&'h str> {
    header.headers.get(name).and_then(|v| v.to_str().ok())
}

/// Whether an HTTP/1.1 client waits for `100 Continue` before sending its body.
pub fn expects_continue(header: &RequestHeader) -> bool {
    header.version == http::Version::HTTP_11
        && header
            .headers
            .get("expect")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Whether the request declares a JSON body.
pub fn is_json(header: &RequestHeader) -> bool {
    header_str(header, "content-type").is_some_and(|ct| {
        let mime = ct.split(';').next().unwrap_or("").trim();
        mime.eq_ignore_ascii_case("application/json")
            || (mime.len() > 5 && mime[mime.len() - 5..].eq_ignore_ascii_case("+json"))
    })
}

/// Largest unread request body read and dropped so a refused client keeps its connection.
const DRAIN_LIMIT: usize = 64 * 1024;

/// Reads and drops a small declared-length body (bounded in size and time); `false` when the
/// body is too large, chunked, slow or broken — then the connection is not reused.
pub async fn drain_small_body(session: &mut pingora::proxy::Session) -> bool {
    let declared =
        header_str(session.req_header(), "content-length").and_then(|v| v.parse::<usize>().ok());
    if declared.is_none_or(|len| len > DRAIN_LIMIT) {
        return false;
    }
    let drain = async {
        let mut read = 0usize;
        while let Ok(Some(chunk)) = session.read_request_body().await {
            read += chunk.len();
            if read > DRAIN_LIMIT {
                return false;
            }
        }
        session.as_mut().is_body_done()
    };
    tokio::time::timeout(std::time::Duration::from_millis(500), drain)
        .await
        .unwrap_or(false)
}
