//! The one place where a refusal becomes an HTTP status and a small JSON body.

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;

use crate::event::EventError;
use crate::signature::SignatureError;

/// Every way a webhook request can be refused. Messages never carry secrets or request text.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no such route")]
    NotFound,
    #[error("unknown source")]
    UnknownSource,
    #[error("this source does not accept requests from {0}")]
    ForbiddenAddress(std::net::IpAddr),
    #[error("method not allowed: use POST")]
    MethodNotAllowed,
    #[error("the body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the body was not received within the request timeout")]
    BodyTimeout,
    #[error("the body could not be read")]
    BodyRead(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error(transparent)]
    Event(#[from] EventError),
    #[error("the queue is full; retry later")]
    QueueFull,
    #[error("this source's share of the queue is full; retry later")]
    SourceShareFull,
    #[error("the gateway holds its limit of request bodies in memory; retry later")]
    BodyMemoryFull,
    #[error("the gateway is shutting down; retry later")]
    ShuttingDown,
    #[error("the event could not be stored in time; retry later")]
    StoreTimeout,
    #[error("the event could not be stored; retry later")]
    StoreUnavailable,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound | ApiError::UnknownSource => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::ForbiddenAddress(_) => StatusCode::FORBIDDEN,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::BodyRead(_) | ApiError::Event(_) => StatusCode::BAD_REQUEST,
            ApiError::Signature(_) => StatusCode::UNAUTHORIZED,
            ApiError::QueueFull
            | ApiError::SourceShareFull
            | ApiError::BodyMemoryFull
            | ApiError::ShuttingDown
            | ApiError::StoreTimeout
            | ApiError::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Stable machine-readable kind for the `error` field of the body.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::NotFound => "not_found",
            ApiError::UnknownSource => "unknown_source",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::ForbiddenAddress(_) => "forbidden_address",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::BodyTimeout => "body_timeout",
            ApiError::BodyRead(_) => "body_unreadable",
            ApiError::Signature(e) => e.kind(),
            ApiError::Event(_) => "invalid_event",
            ApiError::QueueFull => "queue_full",
            ApiError::SourceShareFull => "source_share_full",
            ApiError::BodyMemoryFull => "body_memory_full",
            ApiError::ShuttingDown => "shutting_down",
            ApiError::StoreTimeout => "store_timeout",
            ApiError::StoreUnavailable => "store_unavailable",
        }
    }

    pub fn into_response(self, retry_after_s: u32) -> Response<Full<Bytes>> {
        let status = self.status();
        let body = serde_json::json!({ "error": self.kind(), "message": self.to_string() });
        let mut builder = Response::builder().status(status).header(header::CONTENT_TYPE, "application/json");
        if status == StatusCode::SERVICE_UNAVAILABLE {
            builder = builder.header(header::RETRY_AFTER, retry_after_s);
        }
        if status == StatusCode::METHOD_NOT_ALLOWED {
            builder = builder.header(header::ALLOW, "POST");
        }
        if matches!(self, ApiError::PayloadTooLarge { .. } | ApiError::BodyTimeout) {
            // The rest of the body was not read: the connection cannot be reused.
            builder = builder.header(header::CONNECTION, "close");
        }
        json_response(builder, &body)
    }
}

/// Builds a JSON response; the builder's parts are all static and valid, so building cannot fail.
pub fn json_response(builder: http::response::Builder, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    builder.body(Full::new(Bytes::from(bytes))).unwrap_or_else(|_| {
        let mut fallback = Response::new(Full::new(Bytes::new()));
        *fallback.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        fallback
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_retry_after() {
        let r = ApiError::QueueFull.into_response(3);
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
        let r = ApiError::Signature(SignatureError::BadSignature).into_response(1);
        assert_eq!(r.status(), 401);
        assert!(r.headers().get(header::RETRY_AFTER).is_none());
        assert_eq!(ApiError::MethodNotAllowed.into_response(1).headers()[header::ALLOW], "POST");
        assert_eq!(ApiError::PayloadTooLarge { limit: 1 }.status(), 413);
        assert_eq!(ApiError::Event(EventError::Missing("id")).status(), 400);
    }
}
