//! The webhook listener: a connection-limited accept loop serving HTTP/1.1 and HTTP/2 with hyper (over
//! TLS when `server.tls` is set, else in plain text with h2c), drained on shutdown.
//!
//! A semaphore permit is taken before `accept()` (as mini-redis does), so past `max_connections` new clients
//! wait in the kernel backlog instead of consuming memory here. Handlers only enqueue: this module never
//! touches sqlx or Redis.

pub mod admin;
pub mod error;
pub mod tls;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::config::ServerConfig;
pub use webhook::WebhookState;

/// Serves webhooks on `listener` (HTTPS when `tls` is given) until `stop` is cancelled, then lets in-flight
/// requests finish for at most `grace`. Returns when every connection is closed or the grace has passed.
pub async fn serve_webhooks(
    listener: TcpListener,
    tls: Option<tls::TlsTermination>,
    state: Arc<WebhookState>,
    config: &ServerConfig,
    stop: CancellationToken,
    grace: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout())
        .keep_alive(true)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(config.http2_max_concurrent_streams)
        .max_header_list_size(64 * 1024)
        .max_pending_accept_reset_streams(Some(64))
        .max_local_error_reset_streams(Some(256))
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(config.max_connections));
    // A client that connects and never finishes its handshake is held to the same bound as one that never
    // finishes its headers.
    let handshake_timeout = config.header_read_timeout();
    let scheme = if tls.is_some() { "https" } else { "http" };
    info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), scheme, "webhook listener ready");

    loop {
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
            () = stop.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors or a connection reset before accept: back off, keep serving.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let acceptor = tls.as_ref().map(|tls| tls.acceptor().clone());
        tokio::spawn(async move {
            crate::metrics::record_connections(1.0);
            match acceptor {
                None => serve_connection(&builder, stream, state, watcher, peer).await,
                Some(acceptor) => match handshake(&acceptor, stream, handshake_timeout).await {
                    Handshake::Done(stream) => serve_connection(&builder, stream, state, watcher, peer).await,
                    Handshake::Silent => debug!(%peer, "connection closed without sending anything"),
                    Handshake::Failed(e) => {
                        crate::metrics::record_tls_handshake_failure();
                        debug!(%peer, error = %e, "TLS handshake failed");
                    }
                    Handshake::TimedOut => {
                        crate::metrics::record_tls_handshake_failure();
                        debug!(%peer, "TLS handshake timed out");
                    }
                },
            }
            crate::metrics::record_connections(-1.0);
            drop(permit);
        });
    }
    drop(listener);
    info!(open_connections = graceful.count(), "webhook listener closed; finishing in-flight requests");
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        warn!(grace_ms = grace.as_millis() as u64, "in-flight requests did not finish within the grace period");
    }
}

/// How a TLS connection's handshake ended.
enum Handshake {
    /// Boxed: a TLS stream is ~1.2 KiB, one allocation per connection.
    Done(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
    /// The client went, or was closed at the bound, without sending a byte: a load balancer's TCP health
    /// check (connect, close) or one that holds its connection open. Not a failed handshake: counting those
    /// would bury the real ones (a client that does not trust the certificate, plain HTTP on the port).
    Silent,
    Failed(std::io::Error),
    /// It started but did not finish within the bound.
    TimedOut,
}

/// The server side of a TLS handshake, within `bound` from the connection's start.
async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    bound: std::time::Duration,
) -> Handshake {
    let deadline = tokio::time::Instant::now() + bound;
    // A reset before any byte is no handshake either.
    if !matches!(tokio::time::timeout_at(deadline, stream.peek(&mut [0_u8; 1])).await, Ok(Ok(1..))) {
        return Handshake::Silent;
    }
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => Handshake::Done(Box::new(stream)),
        Ok(Err(e)) => Handshake::Failed(e),
        Err(_) => Handshake::TimedOut,
    }
}

/// Serves one connection's requests (plain TCP or TLS) until it closes or the graceful shutdown ends it.
async fn serve_connection<S>(
    builder: &auto::Builder<TokioExecutor>,
    stream: S,
    state: Arc<WebhookState>,
    watcher: Watcher,
    peer: std::net::SocketAddr,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // The peer on every debug line of the connection's requests (a refusal, say), HTTP/2 streams included
    // (hyper runs those as tasks of their own); a disabled span costs nothing when debug is off.
    let span = tracing::debug_span!("connection", %peer);
    let service = service_fn(move |request| {
        let state = state.clone();
        let handled = webhook::handle(state, request, peer).instrument(span.clone());
        async move { Ok::<_, std::convert::Infallible>(handled.await) }
    });
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    if let Err(e) = watcher.watch(connection.into_owned()).await {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}
