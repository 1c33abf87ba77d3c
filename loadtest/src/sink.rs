//! `sink`: a minimal hyper server that answers 202 at once, after a fixed delay, or after a one-off stall:
//! the baseline for benchmarks and the calibration target of the generator's own tests. With a secret it
//! also checks every signature and counts repeated event ids.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hookgate::signature::Verifier;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

#[derive(Debug, Clone, Default)]
pub struct SinkConfig {
    /// Answer every request after this long.
    pub delay: Duration,
    /// Freeze once, for this long...
    pub stall: Duration,
    /// ...starting this long after the first request.
    pub stall_after: Duration,
    /// Check signatures with this verifier (answers 401 to a bad one).
    pub verifier: Option<Verifier>,
}

#[derive(Debug, Default, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct SinkStats {
    pub requests: u64,
    pub valid_signatures: u64,
    pub invalid_signatures: u64,
    pub unique_ids: u64,
    pub repeated_ids: u64,
}

#[derive(Default)]
struct State {
    requests: AtomicU64,
    valid: AtomicU64,
    invalid: AtomicU64,
    repeated: AtomicU64,
    ids: Mutex<HashSet<String>>,
    first_request: Mutex<Option<Instant>>,
}

/// Serves until the process ends. `GET /stats` returns the counters as JSON.
pub async fn serve(listener: TcpListener, config: SinkConfig) -> anyhow::Result<()> {
    let state = Arc::new(State::default());
    let config = Arc::new(config);
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors: back off and keep serving.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (state, config, builder) = (state.clone(), config.clone(), builder.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let (state, config) = (state.clone(), config.clone());
                async move { Ok::<_, std::convert::Infallible>(handle(&state, &config, request).await) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

async fn handle(state: &State, config: &SinkConfig, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if request.uri().path() == "/stats" {
        let stats = SinkStats {
            requests: state.requests.load(Ordering::Relaxed),
            valid_signatures: state.valid.load(Ordering::Relaxed),
            invalid_signatures: state.invalid.load(Ordering::Relaxed),
            unique_ids: state.ids.lock().map_or(0, |ids| ids.len() as u64),
            repeated_ids: state.repeated.load(Ordering::Relaxed),
        };
        return respond(StatusCode::OK, serde_json::to_vec(&stats).unwrap_or_default());
    }
    let arrived = Instant::now();
    state.requests.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = request.into_parts();
    let Ok(body) = body.collect().await.map(http_body_util::Collected::to_bytes) else {
        return respond(StatusCode::BAD_REQUEST, b"{}".to_vec());
    };
    if let Some(verifier) = &config.verifier {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        if verifier.verify(&parts.headers, &body, now).is_err() {
            state.invalid.fetch_add(1, Ordering::Relaxed);
            return respond(StatusCode::UNAUTHORIZED, br#"{"error":"bad_signature"}"#.to_vec());
        }
        state.valid.fetch_add(1, Ordering::Relaxed);
        if let Ok(event) = hookgate::event::parse(verifier.scheme(), &parts.headers, &body) {
            if let Ok(mut ids) = state.ids.lock() {
                if !ids.insert(event.id.into_owned()) {
                    state.repeated.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    if !config.stall.is_zero() {
        let first = match state.first_request.lock() {
            Ok(mut first) => *first.get_or_insert(arrived),
            Err(_) => arrived,
        };
        let stall_start = first + config.stall_after;
        let stall_end = stall_start + config.stall;
        let now = Instant::now();
        if now >= stall_start && now < stall_end {
            precise_sleep_until(stall_end).await;
        }
    }
    if !config.delay.is_zero() {
        precise_sleep_until(arrived + config.delay).await;
    }
    respond(StatusCode::ACCEPTED, br#"{"status":"accepted"}"#.to_vec())
}

/// tokio's timer rounds every sleep up to the next millisecond; a calibration target must be exact, so
/// sleep to within a millisecond, then yield until the instant.
async fn precise_sleep_until(deadline: Instant) {
    let coarse = deadline.checked_sub(Duration::from_millis(1)).unwrap_or(deadline);
    tokio::time::sleep_until(coarse.into()).await;
    while Instant::now() < deadline {
        tokio::task::yield_now().await;
    }
}

fn respond(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}
