//! The admin listener (its own port): `/metrics` for Prometheus, `/healthz` (alive), `/readyz` (can take traffic).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::error::json_response;
use super::webhook::Routes;
use crate::pipeline::Pipeline;
use crate::store::Store;

/// Readiness must answer quickly even when Postgres hangs.
const READY_PING_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct AdminState {
    pub prometheus: PrometheusHandle,
    pub store: Store,
    pub pipeline: Pipeline,
    /// The sources, for their events held in the queue.
    pub sources: Arc<Routes>,
    /// Cancelled when shutdown begins: from then on the gateway is not ready.
    pub shutting_down: CancellationToken,
}

/// Serves the admin endpoints until `stop` is cancelled.
pub async fn serve_admin(listener: TcpListener, state: AdminState, stop: CancellationToken) {
    let state = Arc::new(state);
    info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin listener ready");
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, std::convert::Infallible>(route(&state, &request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stop.cancelled() => connection.as_mut().graceful_shutdown(),
            }
        });
    }
}

async fn route(state: &AdminState, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let builder = Response::builder().status(StatusCode::METHOD_NOT_ALLOWED).header(header::ALLOW, "GET");
        return json_response(builder, &serde_json::json!({ "error": "method_not_allowed" }));
    }
    match request.uri().path() {
        "/metrics" => {
            crate::metrics::record_queue_depth(state.pipeline.depth());
            crate::metrics::record_body_memory(state.pipeline.body_memory().used());
            for route in state.sources.load().values() {
                crate::metrics::record_source_queued(&route.label, route.queued.held());
            }
            crate::metrics::collect_process();
            let text = state.prometheus.render();
            Response::builder()
                .header(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")
                .body(Full::new(Bytes::from(text)))
                .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
        }
        "/healthz" => json_response(Response::builder(), &serde_json::json!({ "status": "alive" })),
        "/readyz" => readiness(state).await,
        _ => json_response(
            Response::builder().status(StatusCode::NOT_FOUND),
            &serde_json::json!({ "error": "not_found" }),
        ),
    }
}

async fn readiness(state: &AdminState) -> Response<Full<Bytes>> {
    let database = match tokio::time::timeout(READY_PING_TIMEOUT, state.store.takes_writes()).await {
        Ok(Ok(true)) => "ok",
        Ok(Ok(false)) => "read_only",
        Ok(Err(_)) => "unreachable",
        Err(_) => "timeout",
    };
    let saturation = state.pipeline.saturation();
    let saturated = saturation.any();
    let queue = if saturated { "saturated" } else { "ok" };
    let shutting_down = state.shutting_down.is_cancelled();
    let ready = database == "ok" && !saturated && !shutting_down;
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = serde_json::json!({
        "ready": ready,
        "database": database,
        "queue": queue,
        "saturated_by": saturation.causes(),
        "queue_depth": state.pipeline.depth(),
        "body_memory_bytes": state.pipeline.body_memory().used(),
        "shutting_down": shutting_down,
    });
    json_response(Response::builder().status(status), &body)
}
