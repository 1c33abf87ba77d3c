//! The webhook listener: a connection-limited accept loop serving HTTP/1.1 and HTTP/2 with hyper (over
//! TLS when `server.tls` is set, else in plain text with h2c; after a PROXY protocol header when
//! `server.proxy_protocol` is on), drained on shutdown.
//!
//! A semaphore permit is taken before `accept()` (as mini-redis does), so past `max_connections` new clients
//! wait in the kernel backlog instead of consuming memory here. Handlers only enqueue: this module never
//! touches sqlx or Redis.

pub mod admin;
pub mod error;
pub mod proxy_protocol;
pub mod tls;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::address::any_contains;
use crate::config::ServerConfig;
use crate::WarnThrottle;
pub use webhook::WebhookState;

/// Serves webhooks on `listener` (HTTPS when `tls` is given) until `stop` is cancelled, then lets in-flight
/// requests finish for at most `grace`, or until `hurry`. Returns when every connection is closed or the
/// wait is over.
pub async fn serve_webhooks(
    listener: TcpListener,
    tls: Option<tls::TlsTermination>,
    state: Arc<WebhookState>,
    config: &ServerConfig,
    stop: CancellationToken,
    grace: Duration,
    hurry: &CancellationToken,
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
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(config.max_connections));
    let scheme = if tls.is_some() { "https" } else { "http" };
    let settings = Arc::new(ConnectionSettings {
        builder,
        state,
        tls: tls.map(|tls| tls.acceptor().clone()),
        // A client that connects and never finishes its PROXY header or its TLS handshake is held to the same
        // bound as one that never finishes its headers.
        handshake_timeout: config.header_read_timeout(),
        proxy_protocol: config.proxy_protocol,
        proxy_header_warning: WarnThrottle::new(Duration::from_secs(60)),
        untrusted_balancer_warning: WarnThrottle::new(Duration::from_secs(60)),
    });
    if config.proxy_protocol {
        crate::metrics::init_proxy_header_series();
    }
    info!(
        addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        scheme,
        proxy_protocol = config.proxy_protocol,
        "webhook listener ready"
    );

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
        let settings = settings.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            crate::metrics::record_connections(1.0);
            settings.serve_accepted(stream, peer, watcher).await;
            crate::metrics::record_connections(-1.0);
            drop(permit);
        });
    }
    drop(listener);
    info!(open_connections = graceful.count(), "webhook listener closed; finishing in-flight requests");
    // Requests left when the wait ends go unanswered as the process exits, so their senders send them again.
    crate::shutdown::bounded_unless_hurried("finish in-flight requests", grace, hurry, graceful.shutdown()).await;
}

/// What every connection of the webhook listener is served with.
struct ConnectionSettings {
    builder: auto::Builder<TokioExecutor>,
    state: Arc<WebhookState>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handshake_timeout: Duration,
    proxy_protocol: bool,
    /// Connections without a valid PROXY header: warned about once a minute, since a balancer that does not
    /// send one has every connection refused.
    proxy_header_warning: WarnThrottle,
    /// Connections from outside `proxy_protocol_from`: apart, so that one kind cannot hide the other.
    untrusted_balancer_warning: WarnThrottle,
}

impl ConnectionSettings {
    /// Reads the PROXY header (when on), completes the TLS handshake (when on), then serves the requests.
    async fn serve_accepted(&self, mut stream: TcpStream, mut peer: SocketAddr, watcher: Watcher) {
        // One bound from the connection's start for all that comes before its first request.
        let deadline = tokio::time::Instant::now() + self.handshake_timeout;
        if self.proxy_protocol {
            // Judged before a byte is read: a header from around the balancer could name any client, and
            // `allowed_ips` would believe it. The list is loaded per connection, since a SIGHUP can change it.
            let balancers = self.state.proxies.proxy_protocol_from.load();
            if !balancers.is_empty() && !any_contains(&balancers, peer.ip().to_canonical()) {
                crate::metrics::record_proxy_header_failure("untrusted_peer");
                if self.untrusted_balancer_warning.due() {
                    warn!(
                        %peer,
                        "connection closed: it does not come from a balancer listed in server.proxy_protocol_from \
                         (only those may name a client; is a new balancer address missing from the list?)"
                    );
                } else {
                    debug!(%peer, "connection closed: not from a balancer in server.proxy_protocol_from");
                }
                return;
            }
            match proxy_protocol::read_header(&mut stream, deadline).await {
                proxy_protocol::Outcome::Read(Some(client)) => {
                    debug!(balancer = %peer, %client, "PROXY protocol header read");
                    peer = client;
                }
                // The balancer's own connection (a v2 LOCAL health check): it stays the peer.
                proxy_protocol::Outcome::Read(None) => debug!(%peer, "PROXY protocol header names no client"),
                proxy_protocol::Outcome::Silent => {
                    debug!(%peer, "connection closed without sending anything");
                    return;
                }
                proxy_protocol::Outcome::Invalid(reason) => {
                    crate::metrics::record_proxy_header_failure("invalid");
                    if self.proxy_header_warning.due() {
                        warn!(
                            %peer,
                            %reason,
                            "connection closed: it did not start with a PROXY protocol header (server.proxy_protocol \
                             is on; every connection must come through a balancer that sends one)"
                        );
                    } else {
                        debug!(%peer, %reason, "connection closed: no valid PROXY protocol header");
                    }
                    return;
                }
                proxy_protocol::Outcome::TimedOut => {
                    crate::metrics::record_proxy_header_failure("timed_out");
                    debug!(%peer, "PROXY protocol header not complete in time");
                    return;
                }
            }
        }
        match &self.tls {
            None => self.serve_connection(stream, peer, watcher).await,
            Some(acceptor) => match handshake(acceptor, stream, deadline).await {
                Handshake::Done(stream) => self.serve_connection(stream, peer, watcher).await,
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
    }

    /// Serves one connection's requests (plain TCP or TLS) until it closes or the graceful shutdown ends it.
    async fn serve_connection<S>(&self, stream: S, peer: SocketAddr, watcher: Watcher)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // The peer on every debug line of the connection's requests (a refusal, say), HTTP/2 streams included
        // (hyper runs those as tasks of their own); a disabled span costs nothing when debug is off.
        let span = tracing::debug_span!("connection", %peer);
        let state = self.state.clone();
        let service = service_fn(move |request| {
            let state = state.clone();
            let handled = webhook::handle(state, request, peer).instrument(span.clone());
            async move { Ok::<_, std::convert::Infallible>(handled.await) }
        });
        let connection = self.builder.serve_connection(TokioIo::new(stream), service);
        if let Err(e) = watcher.watch(connection.into_owned()).await {
            debug!(%peer, error = %e, "connection ended with an error");
        }
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

/// The server side of a TLS handshake, by `deadline`.
async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    deadline: tokio::time::Instant,
) -> Handshake {
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
