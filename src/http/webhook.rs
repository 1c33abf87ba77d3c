//! `POST /webhooks/{source}`: check the client's address, read the bounded body, verify, parse, enqueue, and
//! (durable mode) await the commit.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::{debug, warn, Instrument};

use super::error::ApiError;
use crate::address::{self, AddressRange, TrustedProxies};
use crate::config::{AckMode, ServerConfig, Source};
use crate::event;
use crate::pipeline::{BodyMemory, Outcome, Pipeline, SourceQueue, StoreFailed, SubmitError};
use crate::store::NewEvent;
use crate::WarnThrottle;

pub const WEBHOOK_PREFIX: &str = "/webhooks/";
/// Most memory reserved for a body before its bytes arrive.
const PREALLOCATE_MAX: usize = 64 * 1024;
/// At most one warning of each kind per source in this time: correctly signed requests refused, for their
/// address or as invalid events, come at the sender's retry rate.
const WARNING_INTERVAL: Duration = Duration::from_secs(60);
/// The longest refusal reason a warning quotes (it can hold a value from the body).
const WARNING_REASON_MAX: usize = 200;

/// A configured source as the request path sees it: its label (shared by every event's `source`), its
/// verifier and limits, which a reload swaps (`crate::reload`) under running requests, and its events held in
/// the queue, which a reload keeps.
#[derive(Debug)]
pub struct SourceRoute {
    pub label: Arc<str>,
    pub source: ArcSwap<Source>,
    /// Its events queued or being written, against `max_queued`.
    pub queued: Arc<SourceQueue>,
    /// Correctly signed requests from an address outside `allowed_ips`.
    address_warning: WarnThrottle,
    /// Correctly signed requests whose body is not an event.
    invalid_event_warning: WarnThrottle,
    /// Events refused because the source holds `max_queued`.
    queue_share_warning: WarnThrottle,
}

impl SourceRoute {
    pub fn new(source: Source) -> Self {
        Self {
            label: Arc::from(source.name.as_str()),
            source: ArcSwap::from_pointee(source),
            queued: Arc::default(),
            address_warning: WarnThrottle::new(WARNING_INTERVAL),
            invalid_event_warning: WarnThrottle::new(WARNING_INTERVAL),
            queue_share_warning: WarnThrottle::new(WARNING_INTERVAL),
        }
    }
}

/// The configured sources by name: swapped whole when a SIGHUP adds or removes one (`crate::reload`).
pub type Routes = ArcSwap<HashMap<String, Arc<SourceRoute>>>;

/// Builds the route table of `sources`.
pub fn routes(sources: Vec<Source>) -> HashMap<String, Arc<SourceRoute>> {
    sources.into_iter().map(|source| (source.name.clone(), Arc::new(SourceRoute::new(source)))).collect()
}

/// What every webhook request needs, shared by all connections.
#[derive(Debug)]
pub struct WebhookState {
    pub sources: Arc<Routes>,
    pub pipeline: Pipeline,
    pub ack_mode: AckMode,
    pub request_timeout: Duration,
    pub retry_after_s: u32,
    pub proxies: Arc<ProxyLists>,
}

/// Who may name the client instead of the TCP peer: swapped whole when a SIGHUP changes them
/// (`crate::reload`), read once per request (`X-Forwarded-For`) or per connection (the PROXY header).
#[derive(Debug)]
pub struct ProxyLists {
    /// `server.trusted_proxies`.
    pub trusted_proxies: ArcSwap<TrustedProxies>,
    /// `server.proxy_protocol_from`; empty: any peer.
    pub proxy_protocol_from: ArcSwap<Vec<AddressRange>>,
}

impl ProxyLists {
    pub fn new(server: &ServerConfig) -> Self {
        Self {
            trusted_proxies: ArcSwap::from_pointee(TrustedProxies::new(server.trusted_proxies.clone())),
            proxy_protocol_from: ArcSwap::from_pointee(server.proxy_protocol_from.clone()),
        }
    }
}

/// The 202 body.
#[derive(serde::Serialize)]
struct Acknowledged<'a> {
    id: &'a str,
    status: &'static str,
}

/// Routes one request from `peer` and records its metric. Never fails: every refusal is a response.
pub async fn handle(state: Arc<WebhookState>, request: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let method = request.method().clone();
    let client = state.proxies.trusted_proxies.load().client(peer.ip(), request.headers());
    // The source is looked up while the path is still borrowed from the request: no allocation. The route is
    // held by its own `Arc` (one count up and down), so a table swapped meanwhile does not wait for this request.
    let route = request.uri().path().strip_prefix(WEBHOOK_PREFIX).map(|name| state.sources.load().get(name).cloned());
    let (route, result) = match route {
        Some(Some(source)) => (crate::metrics::WEBHOOK_ROUTE, receive(&state, &source, request, client, started).await),
        Some(None) => (crate::metrics::WEBHOOK_ROUTE, Err(ApiError::UnknownSource)),
        None => ("other", Err(ApiError::NotFound)),
    };
    let response = result.unwrap_or_else(|e| {
        debug!(status = e.status().as_u16(), kind = e.kind(), %client, "refused");
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
    route: &SourceRoute,
    request: Request<Incoming>,
    client: IpAddr,
    started: Instant,
) -> Result<Response<Full<Bytes>>, ApiError> {
    if request.method() != Method::POST {
        return Err(ApiError::MethodNotAllowed);
    }
    let deadline = started + state.request_timeout;
    let (parts, body) = request.into_parts();
    let memory = state.pipeline.body_memory();
    // The secrets in use when the request arrived (a reload may swap them while the body is read; this
    // request keeps its copy).
    let source = route.source.load_full();
    let body = read_body(parts.headers.get(header::CONTENT_LENGTH), body, source.max_body_bytes, memory, deadline);
    if !source.allowed_ips.is_empty() && !address::any_contains(&source.allowed_ips, client) {
        let body = body.await;
        let now = crate::unix_now();
        let signature = match body {
            Ok(body) if source.verifier.verify(&parts.headers, &body, now).is_ok() => "valid",
            Ok(_) => "invalid",
            Err(_) => "unread",
        };
        refuse_address(route, client, signature);
        return Err(ApiError::ForbiddenAddress(client));
    }
    let body = body.await?;

    let source_label = &route.label;
    let now = crate::unix_now();
    if let Err(e) = source.verifier.verify(&parts.headers, &body, now) {
        crate::metrics::record_signature_failure(source_label, e.kind());
        return Err(e.into());
    }
    let parsed = event::parse(source.verifier.scheme(), &parts.headers, &body)
        .inspect_err(|e| refuse_invalid_event(route, e))?;
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
        // Taken only for a verified event: an unsigned client that sends slow bodies must not be able to hold a
        // source's share and have its sender's real events refused.
        let slot = route.queued.take(source.max_queued).map_err(|_| refuse_over_share(route, source.max_queued))?;
        let ack = state.pipeline.submit(new_event, slot, durable).map_err(|e| match e {
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

/// Counts a request from an address outside the source's `allowed_ips`. Its body was read and verified
/// first: a correctly signed one means the sender's addresses have changed and the list is out of date.
/// The sender is being refused and retries (Stripe for up to 3 days, and may then disable the endpoint), so
/// that is worth a warning, unlike the noise of the rest of the internet.
fn refuse_address(route: &SourceRoute, client: IpAddr, signature: &'static str) {
    crate::metrics::record_address_refusal(&route.label, signature);
    if signature == "valid" && route.address_warning.due() {
        warn!(
            source = %route.label,
            %client,
            "refused a correctly signed request from an address not in allowed_ips: the sender's addresses may \
             have changed (check its published list); its events are refused and retried until the list is updated"
        );
    }
}

/// Counts a correctly signed request whose body is not an event hookgate can store (400). Only the sender
/// holds the secret, so this is the sender's real traffic in a form hookgate does not take (a new event
/// format, say): its events are being refused and retried until the sender gives up. Warned about once a
/// minute per source with the reason, cut short: it can quote a value from the body.
fn refuse_invalid_event(route: &SourceRoute, error: &event::EventError) {
    crate::metrics::record_invalid_event(&route.label, error.kind());
    if route.invalid_event_warning.due() {
        let mut reason = error.to_string();
        if reason.len() > WARNING_REASON_MAX {
            // On a character boundary (`floor_char_boundary` is newer than the MSRV).
            let end = (0..=WARNING_REASON_MAX).rev().find(|&i| reason.is_char_boundary(i)).unwrap_or(0);
            reason.truncate(end);
            reason.push('…');
        }
        warn!(
            source = %route.label,
            kind = error.kind(),
            reason,
            "refused a correctly signed request whose body is not an event hookgate takes: the sender's format may \
             have changed; its events are refused and retried until this is fixed"
        );
    }
}

/// Counts an event refused because its source holds `max_queued` events: the store is behind and this
/// source sends the most, or it floods. It retries on the 503; the other sources are still taken. Warned about
/// once a minute per source.
fn refuse_over_share(route: &SourceRoute, max_queued: usize) -> ApiError {
    crate::metrics::record_queue_rejection("source_share_full");
    crate::metrics::record_source_share_rejection(&route.label);
    if route.queue_share_warning.due() {
        warn!(
            source = %route.label,
            max_queued,
            "refused an event: the source holds its max_queued events, waiting to be written; its events are \
             answered 503 and retried until they are written, the other sources' events are still taken"
        );
    }
    ApiError::SourceShareFull
}

/// Reads the body up to `limit` bytes by `deadline`, within the `memory` budget. A declared or streamed length
/// past the limit, or past what the budget has left, is refused as soon as it is known, without reading the rest.
async fn read_body<B>(
    content_length: Option<&http::HeaderValue>,
    body: B,
    limit: usize,
    memory: &BodyMemory,
    deadline: Instant,
) -> Result<Bytes, ApiError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let declared = content_length.and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    // Capacity for the declared length, up to a bound: a client that declares a large body and then sends
    // nothing must not reserve memory it has not sent.
    let expected = declared.map_or(0, |n| n as usize).min(PREALLOCATE_MAX);
    match tokio::time::timeout_at(deadline, collect_owned(Limited::new(body, limit), expected, memory)).await {
        Err(_elapsed) => Err(ApiError::BodyTimeout),
        Ok(Ok(body)) => Ok(body),
        Ok(Err(ReadError::OverBudget)) => {
            crate::metrics::record_queue_rejection("body_memory_full");
            Err(ApiError::BodyMemoryFull)
        }
        Ok(Err(ReadError::Body(e))) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::PayloadTooLarge { limit })
        }
        Ok(Err(ReadError::Body(e))) => Err(ApiError::BodyRead(e)),
    }
}

/// Why `collect_owned` stopped: the body itself failed (too long, cut off), or the budget is spent.
enum ReadError<E> {
    Body(E),
    OverBudget,
}

/// Copies the body's chunks into one buffer of its own, reserving its capacity from `memory` as it grows.
///
/// hyper hands out each chunk as a slice of the connection's read buffer, and a slice keeps that whole
/// buffer alive. The body outlives the request (the worker's batch, then the notifier's queue), so in
/// enqueue mode at 32,000/s the retained slices held the gateway's RSS at 121-346 MiB (six 30 s runs);
/// with a copy of 1 KiB per request, 75-110 MiB. A copy also leaves the read buffer free for reuse.
async fn collect_owned<B>(body: B, expected: usize, memory: &BodyMemory) -> Result<Bytes, ReadError<B::Error>>
where
    B: hyper::body::Body<Data = Bytes>,
{
    let mut reservation = memory.reservation();
    reservation.grow_to(expected).map_err(|_| ReadError::OverBudget)?;
    let mut body = std::pin::pin!(body);
    let mut owned = Vec::with_capacity(expected);
    while let Some(frame) = body.frame().await {
        if let Ok(chunk) = frame.map_err(ReadError::Body)?.into_data() {
            let needed = owned.len() + chunk.len();
            if needed > owned.capacity() {
                // Reserved before it is allocated; doubling keeps a body of many chunks to a few copies.
                let capacity = needed.max(owned.capacity() * 2);
                reservation.grow_to(capacity).map_err(|_| ReadError::OverBudget)?;
                owned.reserve_exact(capacity - owned.len());
            }
            owned.extend_from_slice(&chunk);
        }
    }
    Ok(reservation.into_body(owned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn refusals_of_signed_requests_are_warned_about_at_most_once_a_minute_per_source_and_kind() {
        let verifier = crate::signature::Verifier::new(crate::signature::Scheme::Stripe, &["whsec_x"], 300);
        let source = Source {
            name: "s".into(),
            verifier: verifier.expect("verifier"),
            max_body_bytes: 1,
            max_queued: 0,
            allowed_ips: Vec::new(),
            secrets_digest: [0; 32],
        };
        let route = SourceRoute::new(source);
        assert!(route.address_warning.due_at(1_000_000));
        assert!(!route.address_warning.due_at(1_000_000));
        assert!(!route.address_warning.due_at(1_059_000));
        assert!(route.address_warning.due_at(1_060_000));
        assert!(!route.address_warning.due_at(1_061_000));
        // Each kind of warning has its own interval.
        assert!(route.invalid_event_warning.due_at(1_061_000));
    }

    /// Serves one connection whose handler runs `read_body` (limit 4 KiB, a 1 MiB budget) and hands its
    /// result back.
    async fn read_over_http(request: &[u8]) -> Result<Bytes, &'static str> {
        read_within(request, &BodyMemory::new(1024 * 1024)).await
    }

    async fn read_within(request: &[u8], memory: &BodyMemory) -> Result<Bytes, &'static str> {
        let memory = memory.clone();
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = std::sync::Mutex::new(Some(tx));
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let tx = tx.lock().ok().and_then(|mut tx| tx.take());
            let memory = memory.clone();
            async move {
                let (parts, body) = request.into_parts();
                let deadline = Instant::now() + Duration::from_secs(5);
                let read = read_body(parts.headers.get(header::CONTENT_LENGTH), body, 4096, &memory, deadline).await;
                if let Some(tx) = tx {
                    let _ = tx.send(read.map_err(|e| e.kind()));
                }
                Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::new())))
            }
        });
        let connection = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(server), service);
        let served = tokio::spawn(connection);
        client.write_all(request).await.unwrap();
        let read = rx.await.unwrap();
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest).await;
        let _ = served.await;
        read
    }

    #[tokio::test]
    async fn a_body_owns_exactly_its_bytes_and_keeps_no_connection_buffer_alive() {
        let mut request = b"POST /webhooks/stripe HTTP/1.1\r\nhost: t\r\ncontent-length: 1024\r\n\r\n".to_vec();
        request.extend(std::iter::repeat_n(b'x', 1024));
        let memory = BodyMemory::new(1024 * 1024);
        let body = read_within(&request, &memory).await.unwrap();
        assert_eq!(body.len(), 1024);
        // A slice of hyper's read buffer would keep the whole buffer (8,127 bytes here) alive and be counted
        // nowhere: the body must be a buffer of its own, of exactly its length, held against the budget.
        assert_eq!(memory.used(), 1024, "the body is not a budgeted buffer of its own length");
        drop(body);
        assert_eq!(memory.used(), 0);
    }

    #[tokio::test]
    async fn a_chunked_body_is_joined_in_order_and_its_limit_holds() {
        let request = b"POST /webhooks/stripe HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n\
            5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\n\r\n";
        assert_eq!(read_over_http(request).await.unwrap(), Bytes::from_static(b"hello world"));

        let mut too_long = b"POST /webhooks/stripe HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..5 {
            too_long.extend_from_slice(b"400\r\n");
            too_long.extend(std::iter::repeat_n(b'x', 1024));
            too_long.extend_from_slice(b"\r\n");
        }
        too_long.extend_from_slice(b"0\r\n\r\n");
        assert_eq!(read_over_http(&too_long).await, Err(ApiError::PayloadTooLarge { limit: 4096 }.kind()));
    }

    #[tokio::test]
    async fn bodies_are_held_against_the_budget_until_dropped_and_refused_past_it() {
        let memory = BodyMemory::new(2048);
        let request = |len: usize| {
            let mut request =
                format!("POST /webhooks/stripe HTTP/1.1\r\nhost: t\r\ncontent-length: {len}\r\n\r\n").into_bytes();
            request.extend(std::iter::repeat_n(b'x', len));
            request
        };
        let first = read_within(&request(1500), &memory).await.unwrap();
        assert_eq!(memory.used(), 1500, "a body read is held against the budget");
        let refused = read_within(&request(1000), &memory).await;
        assert_eq!(refused, Err("body_memory_full"));
        assert_eq!(memory.used(), 1500, "a refused body gives back what it took");
        // A chunked body is refused as soon as it would cross the budget.
        let chunked = b"POST /webhooks/stripe HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n\
            3e8\r\n";
        let mut chunked = chunked.to_vec();
        chunked.extend(std::iter::repeat_n(b'x', 1000));
        chunked.extend_from_slice(b"\r\n0\r\n\r\n");
        assert_eq!(read_within(&chunked, &memory).await, Err("body_memory_full"));
        drop(first);
        assert_eq!(memory.used(), 0);
        let second = read_within(&request(1000), &memory).await.unwrap();
        assert_eq!((second.len(), memory.used()), (1000, 1000), "room again once the first body is gone");
    }
}
