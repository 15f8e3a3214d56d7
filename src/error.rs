//! Every way a request can be refused, and the one place that picks its HTTP status and error
//! code (CONTRACT §7). Domain errors (store, quote) are gathered here.

use crate::ledger::StoreError;
use crate::rules::QuoteError;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("The request path is ambiguous ({0}); send the canonical path.")]
    AmbiguousPath(String),
    #[error("{0}")]
    Quote(#[from] QuoteError),
    #[error("The API key is missing, malformed, unknown or revoked.")]
    InvalidApiKey,
    #[error(
        "Not enough credits for this request: upgrade the plan or enable pay-per-use billing."
    )]
    InsufficientCredits,
    #[error("This request would pass the account's monthly pay-per-use spending limit.")]
    SpendingLimitReached,
    #[error("The subscription is {0}; credits cannot be spent until it is active again.")]
    SubscriptionInactive(&'static str),
    #[error("The account's plan has no API access: upgrade to a paid plan or enable pay-per-use.")]
    PlanHasNoApiAccess,
    #[error("This API key is beyond the plan's key slots: upgrade the plan or revoke newer keys.")]
    KeySlotExceeded,
    #[error("No such endpoint.")]
    NotFound,
    #[error("No such {0}.")]
    NoSuch(&'static str),
    #[error("{0} already exists.")]
    AlreadyExists(&'static str),
    #[error("A request with this Idempotency-Key is still in progress.")]
    IdempotencyInProgress,
    #[error("This Idempotency-Key was used for a different request.")]
    IdempotencyMismatch,
    #[error("The request body is larger than {0} bytes.")]
    PayloadTooLarge(usize),
    #[error("The request header block (request line and headers) is larger than {0} bytes.")]
    RequestHeaderTooLarge(usize),
    #[error("Too many requests for this API key; retry after {0} s.")]
    RateLimited(u64),
    #[error("The admin token is missing or wrong.")]
    AdminUnauthorized,
    #[error("The generation backend failed; nothing was charged.")]
    UpstreamFailed,
    #[error("The generation backend timed out; nothing was charged.")]
    UpstreamTimeout,
    #[error("The billing store is unavailable; nothing was charged, retry shortly.")]
    StoreUnavailable(#[from] StoreError),
    #[error("Internal error.")]
    Internal(String),
}

/// Seconds a client should wait after a 503 from the store.
pub const STORE_RETRY_AFTER_S: u64 = 1;

impl GatewayError {
    /// What a failed proxy exchange means to the client: a timeout, a body over the inspected
    /// limit (`max_json_body_bytes`), a client that could not be read, or a failed upstream.
    pub fn from_proxy_failure(e: &pingora::Error, max_json_body_bytes: usize) -> Self {
        use pingora::ErrorType;
        match e.etype() {
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
                Self::UpstreamTimeout
            }
            ErrorType::HTTPStatus(413) => Self::PayloadTooLarge(max_json_body_bytes),
            _ => match e.esource() {
                pingora::ErrorSource::Downstream => {
                    Self::InvalidRequest("The request could not be read.".to_string())
                }
                _ => Self::UpstreamFailed,
            },
        }
    }
}

impl GatewayError {
    pub fn status(&self) -> u16 {
        match self {
            Self::InvalidRequest(_) | Self::AmbiguousPath(_) | Self::Quote(_) => 400,
            Self::InvalidApiKey | Self::AdminUnauthorized => 401,
            Self::InsufficientCredits
            | Self::SpendingLimitReached
            | Self::SubscriptionInactive(_) => 402,
            Self::PlanHasNoApiAccess | Self::KeySlotExceeded => 403,
            Self::NotFound | Self::NoSuch(_) => 404,
            Self::AlreadyExists(_) | Self::IdempotencyInProgress => 409,
            Self::PayloadTooLarge(_) => 413,
            Self::IdempotencyMismatch => 422,
            Self::RateLimited(_) => 429,
            Self::RequestHeaderTooLarge(_) => 431,
            Self::Internal(_) => 500,
            Self::UpstreamFailed => 502,
            Self::StoreUnavailable(_) => 503,
            Self::UpstreamTimeout => 504,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest(_) | Self::AmbiguousPath(_) => "invalid_request",
            Self::Quote(q) => q.code(),
            Self::InvalidApiKey => "invalid_api_key",
            Self::InsufficientCredits => "insufficient_credits",
            Self::SpendingLimitReached => "spending_limit_reached",
            Self::SubscriptionInactive(_) => "subscription_inactive",
            Self::PlanHasNoApiAccess => "plan_has_no_api_access",
            Self::KeySlotExceeded => "key_slot_exceeded",
            Self::NotFound | Self::NoSuch(_) => "not_found",
            Self::AlreadyExists(_) => "already_exists",
            Self::IdempotencyInProgress => "idempotency_in_progress",
            Self::IdempotencyMismatch => "idempotency_mismatch",
            Self::PayloadTooLarge(_) => "payload_too_large",
            Self::RequestHeaderTooLarge(_) => "request_header_too_large",
            Self::RateLimited(_) => "rate_limited",
            Self::AdminUnauthorized => "unauthorized",
            Self::UpstreamFailed => "upstream_failed",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::StoreUnavailable(_) => "store_unavailable",
            Self::Internal(_) => "internal_error",
        }
    }

    /// `Retry-After` seconds, for the statuses that carry one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::RateLimited(s) => Some((*s).max(1)),
            Self::StoreUnavailable(_) => Some(STORE_RETRY_AFTER_S),
            _ => None,
        }
    }

    /// The human sentence for the error body. Store details stay in the logs.
    pub fn public_message(&self) -> String {
        match self {
            Self::StoreUnavailable(_) => {
                "The billing store is unavailable; nothing was charged, retry shortly.".into()
            }
            Self::Internal(_) => "Internal error.".into(),
            other => other.to_string(),
        }
    }
}
