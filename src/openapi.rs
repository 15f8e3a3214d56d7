//! The OpenAPI 3.1 document of the gateway's HTTP surface (`openapi/creditgate.json`: billing
//! endpoints, generation routes' billing headers and errors, admin API, probes), compiled in so
//! the admin listener serves exactly the file shipped. Called by `admin_api` for
//! `GET /openapi.json`; `tests/openapi.rs` holds the document to what the binary answers.

use bytes::Bytes;

use crate::respond::JsonReply;

/// The document, byte for byte as shipped.
pub const DOCUMENT: &str = include_str!("../openapi/creditgate.json");

/// `200` with the document. No admin token: it holds no secret (it is the file in the
/// repository), the admin listener binds to loopback by default, and tools fetch it as is.
pub fn reply() -> JsonReply {
    JsonReply {
        status: 200,
        body: Bytes::from_static(DOCUMENT.as_bytes()),
        headers: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_is_openapi_3_1_json() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).expect("valid JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        assert!(doc["paths"]["/openapi.json"]["get"].is_object());
    }
}
