//! `POST /webhooks/{source}`: read the bounded body, verify, parse, enqueue, and (durable mode) await the commit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::{debug, Instrument};

use super::error::ApiError;
use crate::config::{AckMode, Source};
use crate::event;
use crate::pipeline::{Outcome, Pipeline, StoreFailed, SubmitError};
use crate::store::NewEvent;

pub const WEBHOOK_PREFIX: &str = "/webhooks/";

/// What every webhook request needs, shared by all connections.
#[derive(Debug)]
pub struct WebhookState {
    pub sources: HashMap<String, (Arc<str>, Source)>,
    pub pipeline: Pipeline,
    pub ack_mode: AckMode,
    pub request_timeout: Duration,
    pub retry_after_s: u32,
}

/// The 202 body.
#[derive(serde::Serialize)]
struct Acknowledged<'a> {
    id: &'a str,
    status: &'static str,
}

/// Routes one request and records its metric. Never fails: every refusal is a response.
pub async fn handle(state: Arc<WebhookState>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let method = request.method().clone();
    // The source is looked up while the path is still borrowed from the request: no allocation.
    let route = request.uri().path().strip_prefix(WEBHOOK_PREFIX).map(|name| state.sources.get(name));
    let (route, result) = match route {
        Some(Some(source)) => (crate::metrics::WEBHOOK_ROUTE, receive(&state, source, request, started).await),
        Some(None) => (crate::metrics::WEBHOOK_ROUTE, Err(ApiError::UnknownSource)),
        None => ("other", Err(ApiError::NotFound)),
    };
    let response = result.unwrap_or_else(|e| {
        debug!(status = e.status().as_u16(), kind = e.kind(), "refused");
        e.into_response(state.retry_after_s)
    });
    crate::metrics::record_request(method_label(&method), route, response.status().as_u16(), started.elapsed());
    response
}

/// A bounded set of method labels, so a client cannot invent metric series.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::POST => "POST",
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::HEAD => "HEAD",
        _ => "other",
    }
}

async fn receive(
    state: &WebhookState,
    (source_label, source): &(Arc<str>, Source),
    request: Request<Incoming>,
    started: Instant,
) -> Result<Response<Full<Bytes>>, ApiError> {
    if request.method() != Method::POST {
        return Err(ApiError::MethodNotAllowed);
    }
    let deadline = started + state.request_timeout;
    let (parts, body) = request.into_parts();
    let body = read_body(parts.headers.get(header::CONTENT_LENGTH), body, source.max_body_bytes, deadline).await?;

    let now = unix_now();
    if let Err(e) = source.verifier.verify(&parts.headers, &body, now) {
        crate::metrics::record_signature_failure(source_label, e.kind());
        return Err(e.into());
    }
    let parsed = event::parse(source.verifier.scheme(), &parts.headers, &body)?;
    let span = tracing::info_span!("webhook", source = %source_label, event_id = %parsed.id);
    let event_id = parsed.id.to_string();
    let new_event = NewEvent {
        source: source_label.clone(),
        id: event_id.clone(),
        event_type: parsed.event_type.into_owned(),
        created: parsed.created,
        livemode: parsed.livemode,
        api_version: parsed.api_version.map(std::borrow::Cow::into_owned),
        account: parsed.account.map(std::borrow::Cow::into_owned),
        body: body.clone(),
    };
    let durable = state.ack_mode == AckMode::Durable;
    async move {
        let ack = state.pipeline.submit(new_event, durable).map_err(|e| match e {
            SubmitError::Full => {
                crate::metrics::record_queue_rejection("queue_full");
                ApiError::QueueFull
            }
            SubmitError::Closed => {
                crate::metrics::record_queue_rejection("shutting_down");
                ApiError::ShuttingDown
            }
        })?;
        let status = match ack {
            None => "queued",
            Some(receiver) => match tokio::time::timeout_at(deadline, receiver).await {
                Ok(Ok(Ok(Outcome::Inserted))) => "accepted",
                Ok(Ok(Ok(Outcome::Duplicate))) => "duplicate",
                Ok(Ok(Err(StoreFailed)) | Err(_)) => return Err(ApiError::StoreUnavailable),
                Err(_elapsed) => return Err(ApiError::StoreTimeout),
            },
        };
        debug!(status, "acknowledged");
        let body = serde_json::to_vec(&Acknowledged { id: &event_id, status }).unwrap_or_default();
        let response = Response::builder()
            .status(StatusCode::ACCEPTED)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())));
        Ok(response)
    }
    .instrument(span)
    .await
}

/// Reads the body up to `limit` bytes by `deadline`. A declared or streamed length past the limit is refused
/// as soon as it is known, without reading the rest.
async fn read_body(
    content_length: Option<&http::HeaderValue>,
    body: Incoming,
    limit: usize,
    deadline: Instant,
) -> Result<Bytes, ApiError> {
    let declared = content_length.and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    match tokio::time::timeout_at(deadline, Limited::new(body, limit).collect()).await {
        Err(_elapsed) => Err(ApiError::BodyTimeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::PayloadTooLarge { limit }),
        Ok(Err(e)) => Err(ApiError::BodyRead(e)),
    }
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}
