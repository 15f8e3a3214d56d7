//! How the gateway's Stripe API calls travel: async-stripe builds each request (method, path,
//! form body) and deserializes the answer; this [`StripeClient`] sends it over HTTP/1.1 with
//! rustls (ring, Mozilla roots), or plain `http://` for a local fake, and reports errors with
//! what the retry policy needs: the status, Stripe's error code and message, `Retry-After` and
//! `Stripe-Should-Retry` (async-stripe's own client drops the headers).
//!
//! One attempt per call: retries, backoff and dead-lettering are the caller's decisions.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use stripe_client_core::{CustomizedStripeRequest, StripeClient, StripeClientErr, StripeMethod};

/// Longest `Retry-After` honoured; a larger one is clamped to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);
/// Answers larger than this are not read (a meter event answer is a few hundred bytes).
const MAX_ANSWER_BYTES: usize = 256 * 1024;

/// Why a Stripe call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StripeCallError {
    /// Stripe (or something in front of it) answered with a non-2xx status.
    #[error("Stripe answered {status}: {message}")]
    Api {
        status: u16,
        /// `error.type`, e.g. `invalid_request_error`.
        kind: Option<String>,
        /// `error.code`, when Stripe gives one.
        code: Option<String>,
        message: String,
        retry_after: Option<Duration>,
        /// The `Stripe-Should-Retry` header, when present.
        should_retry: Option<bool>,
    },
    /// No answer: connection refused or reset, DNS, TLS.
    #[error("could not reach Stripe: {0}")]
    Network(String),
    #[error("Stripe did not answer within {0:?}")]
    Timeout(Duration),
    /// A 2xx answer whose body async-stripe could not read: Stripe accepted the request.
    #[error("Stripe accepted the request but its answer was unreadable: {0}")]
    Decode(String),
    /// The client cannot be built (bad `api_base` or secret key).
    #[error("Stripe client configuration: {0}")]
    Config(String),
}

impl StripeClientErr for StripeCallError {
    fn deserialize_err(msg: impl std::fmt::Display) -> Self {
        Self::Decode(msg.to_string())
    }
}

/// The HTTP client of the Stripe API. Cheap to clone.
#[derive(Clone)]
pub struct StripeHttp {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// `scheme://host[:port]/…/`, always ending in `/`; requests go to `<base>v1<path>`.
    api_base: Arc<str>,
    authorization: HeaderValue,
    timeout: Duration,
}

impl std::fmt::Debug for StripeHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeHttp")
            .field("api_base", &self.api_base)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl StripeHttp {
    /// A client for `api_base` (e.g. `https://api.stripe.com/`) with the secret key; each
    /// attempt (connect, send, read) must finish within `timeout`.
    pub fn new(
        api_base: &str,
        secret_key: &str,
        timeout: Duration,
    ) -> Result<Self, StripeCallError> {
        let base = api_base.trim();
        let uri: http::Uri = base
            .parse()
            .map_err(|e| StripeCallError::Config(format!("stripe.api_base {base:?}: {e}")))?;
        match uri.scheme_str() {
            Some("https") | Some("http") => {}
            _ => {
                return Err(StripeCallError::Config(format!(
                "stripe.api_base {base:?} must start with https:// (or http:// for a local fake)"
            )))
            }
        }
        if uri.host().is_none() {
            return Err(StripeCallError::Config(format!(
                "stripe.api_base {base:?} has no host"
            )));
        }
        let mut api_base = base.to_string();
        if !api_base.ends_with('/') {
            api_base.push('/');
        }
        let mut authorization =
            HeaderValue::try_from(format!("Bearer {secret_key}")).map_err(|_| {
                StripeCallError::Config("the Stripe secret key is not a valid header value".into())
            })?;
        authorization.set_sensitive(true);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| StripeCallError::Config(format!("TLS setup: {e}")))?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            client,
            api_base: api_base.into(),
            authorization,
            timeout,
        })
    }

    /// The same client with another per-attempt timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn attempt(&self, req: CustomizedStripeRequest) -> Result<Bytes, StripeCallError> {
        let (req, _overrides) = req.into_pieces();
        let mut uri = format!("{}v1{}", self.api_base, req.path);
        if let Some(query) = &req.query {
            uri.push('?');
            uri.push_str(query);
        }
        let method = match req.method {
            StripeMethod::Get => http::Method::GET,
            StripeMethod::Post => http::Method::POST,
            StripeMethod::Delete => http::Method::DELETE,
        };
        let mut builder = http::Request::builder()
            .method(method)
            .uri(&uri)
            .header(AUTHORIZATION, self.authorization.clone())
            .header(
                USER_AGENT,
                concat!("creditgate/", env!("CARGO_PKG_VERSION")),
            )
            .header("Stripe-Version", stripe_client_core::VERSION.as_str());
        if req.body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/x-www-form-urlencoded");
        }
        let body = Full::new(Bytes::from(req.body.unwrap_or_default()));
        let request = builder
            .body(body)
            .map_err(|e| StripeCallError::Config(format!("request to {uri}: {e}")))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| StripeCallError::Network(network_detail(&e)))?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = read_limited(response.into_body()).await?;
        if status.is_success() {
            return Ok(bytes);
        }
        Err(api_error(status.as_u16(), &headers, &bytes))
    }
}

impl StripeClient for StripeHttp {
    type Err = StripeCallError;

    fn execute(
        &self,
        req: CustomizedStripeRequest,
    ) -> impl std::future::Future<Output = Result<Bytes, Self::Err>> + Send {
        let timeout = self.timeout;
        async move {
            match tokio::time::timeout(timeout, self.attempt(req)).await {
                Ok(answer) => answer,
                Err(_) => Err(StripeCallError::Timeout(timeout)),
            }
        }
    }
}

/// The error chain of a hyper client error, e.g. "client error (Connect): connection refused".
fn network_detail(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

async fn read_limited(body: hyper::body::Incoming) -> Result<Bytes, StripeCallError> {
    let limited = http_body_util::Limited::new(body, MAX_ANSWER_BYTES);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(StripeCallError::Network(format!("reading the answer: {e}"))),
    }
}

fn api_error(status: u16, headers: &http::HeaderMap, body: &[u8]) -> StripeCallError {
    let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let error = parsed.as_ref().and_then(|v| v.get("error"));
    let text = |name: &str| {
        error
            .and_then(|e| e.get(name))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let message = text("message").unwrap_or_else(|| {
        let raw = String::from_utf8_lossy(body);
        let raw = raw.trim();
        if raw.is_empty() {
            format!("HTTP {status} without a body")
        } else {
            raw.chars().take(300).collect()
        }
    });
    StripeCallError::Api {
        status,
        kind: text("type"),
        code: text("code"),
        message,
        retry_after: headers
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after),
        should_retry: headers
            .get("Stripe-Should-Retry")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<bool>().ok()),
    }
}

/// `Retry-After` in seconds (HTTP dates are not used by Stripe and are ignored), clamped.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let seconds: f64 = value.trim().parse().ok()?;
    if !seconds.is_finite() || seconds < 0.0 {
        return None;
    }
    Some(Duration::from_secs_f64(
        seconds.min(MAX_RETRY_AFTER.as_secs_f64()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_read_in_seconds_and_clamped() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(" 0.5 "), Some(Duration::from_millis(500)));
        assert_eq!(parse_retry_after("99999"), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("-1"), None);
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("NaN"), None);
    }

    #[test]
    fn stripe_errors_are_read() {
        let mut headers = http::HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("2"));
        headers.insert("Stripe-Should-Retry", HeaderValue::from_static("false"));
        let body = br#"{"error":{"type":"invalid_request_error","code":"resource_missing","message":"No such meter"}}"#;
        assert_eq!(
            api_error(400, &headers, body),
            StripeCallError::Api {
                status: 400,
                kind: Some("invalid_request_error".into()),
                code: Some("resource_missing".into()),
                message: "No such meter".into(),
                retry_after: Some(Duration::from_secs(2)),
                should_retry: Some(false),
            }
        );
        let plain = api_error(502, &http::HeaderMap::new(), b"Bad Gateway");
        assert!(
            matches!(plain, StripeCallError::Api { status: 502, ref message, .. } if message == "Bad Gateway")
        );
    }

    #[test]
    fn api_base_must_be_http_or_https() {
        let t = Duration::from_secs(1);
        assert!(StripeHttp::new("https://api.stripe.com/", "sk_test_x", t).is_ok());
        assert!(StripeHttp::new("http://127.0.0.1:9/", "sk_test_x", t).is_ok());
        assert!(StripeHttp::new("ftp://example.com/", "sk_test_x", t).is_err());
        assert!(StripeHttp::new("not a url", "sk_test_x", t).is_err());
        assert!(StripeHttp::new("https://api.stripe.com/", "bad\nkey", t).is_err());
    }
}
