//! JSON replies written by the gateway itself (billing endpoints, admin API, errors), independent
//! of how they are sent: the proxy writes them to a Pingora session, the admin app returns them.
//! Every reply carries `Content-Type: application/json` and `Cache-Control: no-store`.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use serde_json::json;

use crate::error::GatewayError;

/// A complete JSON reply.
#[derive(Debug, Clone)]
pub struct JsonReply {
    pub status: u16,
    pub body: Bytes,
    pub headers: Vec<(&'static str, String)>,
}

impl JsonReply {
    pub fn ok(status: u16, body: &serde_json::Value) -> Self {
        Self {
            status,
            body: Bytes::from(body.to_string()),
            headers: Vec::new(),
        }
    }

    /// `{"error": {"code", "message"}}` with the status and headers the error calls for.
    pub fn error(e: &GatewayError) -> Self {
        let body = json!({"error": {"code": e.code(), "message": e.public_message()}});
        let mut reply = Self::ok(e.status(), &body);
        if let Some(s) = e.retry_after() {
            reply.headers.push(("Retry-After", s.to_string()));
        }
        reply
    }

    /// The same reply with another status.
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// The Pingora response header for this reply.
    pub fn response_header(&self, request_id: &str) -> pingora::Result<ResponseHeader> {
        let mut h = ResponseHeader::build(self.status, Some(6 + self.headers.len()))?;
        h.insert_header("Content-Type", "application/json")?;
        h.insert_header("Cache-Control", "no-store")?;
        h.insert_header("Content-Length", self.body.len().to_string())?;
        h.insert_header("X-Request-Id", request_id)?;
        for (name, value) in &self.headers {
            h.insert_header(*name, value.as_str())?;
        }
        Ok(h)
    }

    /// As an `http::Response` (for Pingora's `ServeHttp` apps).
    pub fn into_http(self, request_id: &str) -> http::Response<Vec<u8>> {
        let mut builder = http::Response::builder()
            .status(self.status)
            .header("Content-Type", "application/json")
            .header("Cache-Control", "no-store")
            .header("Content-Length", self.body.len().to_string())
            .header("X-Request-Id", request_id);
        for (name, value) in &self.headers {
            builder = builder.header(*name, value.as_str());
        }
        match builder.body(self.body.to_vec()) {
            Ok(r) => r,
            Err(_) => {
                let mut r = http::Response::new(b"{}".to_vec());
                *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                r
            }
        }
    }
}
