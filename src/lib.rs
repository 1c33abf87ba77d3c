//! hookgate: a gateway that receives signed payment webhooks, stores each exactly once in Postgres, and
//! acknowledges only what is durable.
//!
//! # Crate map
//!
//! - [`address`]: address ranges, and the client's address behind trusted proxies (`X-Forwarded-For`). Pure.
//! - [`config`]: typed configuration (embedded defaults, file, `HOOKGATE__` environment), validated once.
//! - [`signature`]: Stripe / Standard Webhooks / GitHub signature verification. Pure: no I/O, no clock.
//! - [`event`]: the few event fields hookgate stores, parsed from the body without a JSON tree. Pure.
//! - [`http`]: the webhook listener (hyper, HTTP/1.1 + HTTP/2, optional TLS with certificate reload,
//!   bounded), its handler, the admin listener.
//! - [`pipeline`]: the bounded queue, the batching workers, and the acks that complete durable requests.
//! - [`store`]: Postgres: pool, migrations, the one-round-trip batch insert, the outbox queries.
//! - [`notify`]: Redis streams: pipelined `XADD` per batch, the outbox catch-up, replay.
//! - [`metrics`]: every metric name, described once.
//! - [`reload`]: secrets and the TLS certificate read again on an interval and on SIGHUP.
//! - [`retention`]: old events deleted in small batches, never one still waiting for its stream.
//! - [`shutdown`]: signals and time-bounded drain steps.
//! - [`spill`]: acknowledged events the drain could not store, kept in a file and stored at the next start.
//!
//! [`run`] wires them together on listeners the caller has bound (port 0 in tests).

pub mod address;
pub mod config;
pub mod event;
pub mod http;
pub mod metrics;
pub mod notify;
pub mod pipeline;
pub mod reload;
pub mod retention;
pub mod shutdown;
pub mod signature;
pub mod spill;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{Config, ConfigError};
use crate::http::admin::{serve_admin, AdminState};
use crate::http::webhook::{self, ProxyLists, Routes};
use crate::http::{serve_webhooks, WebhookState};
use crate::notify::Notifier;
use crate::pipeline::Pipeline;
use crate::store::{Store, StoreError};

/// `error: cause: cause` in one line, so logs keep the chain that `Display` alone would drop.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

/// SHA-256 over `parts`, each prefixed with its length: tells whether files or secrets read again changed,
/// without keeping a copy of them.
pub fn digest_of<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> [u8; 32] {
    use sha2::{Digest as _, Sha256};
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// Seconds since the Unix epoch by the system clock (0 if it is set before 1970).
pub fn unix_now() -> i64 {
    unix_seconds(std::time::SystemTime::now()).unwrap_or(0)
}

/// A time in whole seconds since the Unix epoch; None before 1970 (or past `i64`).
pub fn unix_seconds(time: std::time::SystemTime) -> Option<i64> {
    let since = time.duration_since(std::time::UNIX_EPOCH).ok()?;
    i64::try_from(since.as_secs()).ok()
}

/// Unix microseconds as an RFC 3339 time to the second (1970 for a time before it), for logs and the CLI.
pub fn format_unix_us(unix_us: i64) -> String {
    let since_epoch = std::time::Duration::from_micros(u64::try_from(unix_us).unwrap_or(0));
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + since_epoch).to_string()
}

/// A warning given at most once per interval however often its cause recurs (Redis down for every batch, a
/// sender retrying every event): lock-free, on the monotonic clock.
#[derive(Debug)]
pub struct WarnThrottle {
    interval_ms: u64,
    /// When it was last given, in ms since the process's first throttle call plus one (0: never).
    last_ms: std::sync::atomic::AtomicU64,
}

impl WarnThrottle {
    pub fn new(interval: Duration) -> Self {
        let interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        Self { interval_ms, last_ms: std::sync::atomic::AtomicU64::new(0) }
    }

    /// Whether to give the warning now (and note that it was given).
    pub fn due(&self) -> bool {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let elapsed = START.get_or_init(std::time::Instant::now).elapsed();
        self.due_at(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX).saturating_add(1))
    }

    /// As [`WarnThrottle::due`] at `now_ms` (> 0), for tests.
    pub fn due_at(&self, now_ms: u64) -> bool {
        use std::sync::atomic::Ordering;
        let last = self.last_ms.load(Ordering::Relaxed);
        (last == 0 || now_ms >= last.saturating_add(self.interval_ms))
            && self.last_ms.compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

/// TLS to Postgres and Redis goes through rustls with the ring provider. Made the process default before
/// either connects, so that another provider compiled in by a dependency can never leave rustls unable
/// to choose (it then panics at the first TLS connection). Idempotent.
pub fn use_ring_for_tls() {
    // Err only when a default is already installed (by an earlier call, or by a program embedding this).
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The two listening sockets, bound before [`run`] so that callers choose the ports.
#[derive(Debug)]
pub struct Listeners {
    pub webhooks: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &Config) -> std::io::Result<Self> {
        Ok(Self {
            webhooks: TcpListener::bind(config.server.listen).await?,
            admin: TcpListener::bind(config.admin.listen).await?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("no sources are configured: add a [sources.<name>] table")]
    NoSources,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Notify(#[from] notify::NotifyError),
    #[error("server.tls: {0}")]
    Tls(#[from] http::tls::TlsError),
    #[error("shutdown.spill_dir {}", .0.display())]
    SpillDir(std::path::PathBuf, #[source] spill::OpenError),
}

/// Runs the gateway until `shutdown` is cancelled, then drains in order: stop accepting, finish in-flight
/// requests, drain the queue, let the workers flush, flush notifications, close the pool. Each step is
/// bounded by the config, but the spill of what the drain could not write, which would otherwise be lost.
/// `hurry` (a second signal) ends the waiting: in-flight requests are cut (unanswered, so their senders
/// retry), what is still queued gets the drain's end at once (written, or spilled with `shutdown.spill_dir`),
/// and the last steps are not waited for (the outbox keeps what was not published).
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
    hurry: CancellationToken,
) -> Result<(), RunError> {
    let sources = config.sources()?;
    if sources.is_empty() {
        return Err(RunError::NoSources);
    }
    // Loaded before anything connects, so a bad certificate stops start-up at once with its file named.
    let tls = config.server.tls.as_ref().map(http::tls::TlsTermination::new).transpose()?;
    let spill = match &config.shutdown.spill_dir {
        Some(dir) => Some(Arc::new(spill::Spill::open(dir).map_err(|e| RunError::SpillDir(dir.clone(), e))?)),
        None => None,
    };
    let store = Store::new(&config.store, config.notify.enabled)?;
    if config.store.migrate_on_start {
        store.migrate().await?;
    }
    store.warm_up(config.workers.count + 1).await;
    let prometheus = metrics::install();
    metrics::init_series();
    if config.retention.enabled() {
        metrics::init_retention_series();
    }
    for source in &sources {
        let with_file = config.sources.get(&source.name).is_some_and(|s| s.allowed_ips_file.is_some());
        let listed = !source.allowed_ips.is_empty();
        metrics::init_source_series(&source.name, listed, with_file, config.retention.enabled());
    }

    // The notifier's tasks start before the workers, so the catch-up publishes what a crash left behind.
    let notifier_tasks = TaskTracker::new();
    let notifier_stop = CancellationToken::new();
    let notify_tx = if config.notify.enabled {
        let notifier = Notifier::new(&config.notify, store.clone())?;
        let (tx, rx) = notifier.queue(config.notify.queue_batches);
        notifier_tasks.spawn(notifier.clone().run_publisher(rx));
        notifier_tasks.spawn(notifier.run_catchup(notifier_stop.clone()));
        Some(tx)
    } else {
        None
    };
    notifier_tasks.close();

    let workers = TaskTracker::new();
    let (pipeline, control) = Pipeline::start(
        &config.queue,
        &config.workers,
        config.linger_until_idle(),
        &store,
        notify_tx.as_ref(),
        spill.clone(),
        &workers,
    );
    // Only the workers hold senders now: the publisher ends once they have all exited.
    drop(notify_tx);
    let routes = Arc::new(Routes::from_pointee(webhook::routes(sources)));
    let state = Arc::new(WebhookState {
        sources: routes.clone(),
        pipeline: pipeline.clone(),
        ack_mode: config.queue.ack_mode,
        request_timeout: config.server.request_timeout(),
        retry_after_s: config.queue.retry_after_s,
        proxies: Arc::new(ProxyLists::new(&config.server)),
    });

    let admin_stop = CancellationToken::new();
    if let Some(spill) = &spill {
        // Stops with the listener: the shutdown's own spill file is finished only after it.
        let chunk = config.workers.batch_max;
        tokio::spawn(spill::watch(spill.dir().to_path_buf(), pipeline.clone(), chunk, shutdown.clone()));
    }
    if let Some(tls) = &tls {
        metrics::init_tls_series();
        metrics::record_tls_not_after(tls.not_after_unix());
    }
    let reloader = reload::Reloader::new(routes.clone(), state.proxies.clone(), tls.clone(), config.clone());
    tokio::spawn(reloader.watch(Duration::from_secs(config.reload.interval_s), admin_stop.clone()));
    if config.retention.enabled() {
        // Stops with the listener: no new deletes start while the queue drains.
        tokio::spawn(retention::Retention::new(store.clone(), config.retention.clone()).watch(shutdown.clone()));
    }
    let admin_state = AdminState {
        prometheus: prometheus.clone(),
        store: store.clone(),
        pipeline: pipeline.clone(),
        sources: routes,
        shutting_down: shutdown.clone(),
    };
    let admin = tokio::spawn(serve_admin(listeners.admin, admin_state, admin_stop.clone()));
    let upkeep_stop = admin_stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tick.tick() => prometheus.run_upkeep(),
                () = upkeep_stop.cancelled() => return,
            }
        }
    });
    info!(ack_mode = ?config.queue.ack_mode, workers = config.workers.count, "hookgate running");

    let requests_grace = Duration::from_millis(config.shutdown.requests_grace_ms);
    serve_webhooks(listeners.webhooks, tls, state, &config.server, shutdown, requests_grace, &hurry).await;

    info!(queued = pipeline.depth(), "draining the queue");
    pipeline.close();
    control.drain.cancel();
    workers.close();
    let drain_grace = Duration::from_millis(config.shutdown.drain_grace_ms);
    if !shutdown::bounded_unless_hurried("drain queue", drain_grace, &hurry, workers.wait()).await {
        control.abort.cancel();
        if spill.is_some() {
            // Aborted, the workers no longer wait on Postgres: what they hold goes to the spill file, which is
            // disk work alone, and it is waited for to its end. A bound here would exit with the events not
            // yet written still in memory, lost although acknowledged.
            shutdown::to_the_end("spill unwritten events", Duration::from_secs(2), workers.wait()).await;
        } else {
            // The last try of each batch may wait on a database that does not answer.
            shutdown::bounded("abort workers", Duration::from_secs(2), workers.wait()).await;
        }
    }
    if let Some(spill) = &spill {
        // Off the runtime's threads, as the writes: the file and its directory are synced.
        let finishing = Arc::clone(spill);
        match spill::off_runtime(move || finishing.finish()).await {
            Ok(Some((file, events))) => {
                warn!(events, file = %file.display(), "acknowledged events spilled; they are stored from the file at the next start");
            }
            Ok(None) => {}
            Err(e) => {
                error!(dir = %spill.dir().display(), error = %e, "cannot finish the spill file: the next start with this spill_dir finishes and imports it");
            }
        }
    }
    notifier_stop.cancel();
    shutdown::bounded_unless_hurried("flush notifications", Duration::from_secs(5), &hurry, notifier_tasks.wait())
        .await;
    shutdown::bounded_unless_hurried("close database pool", Duration::from_secs(5), &hurry, store.close()).await;
    admin_stop.cancel();
    let _ = admin.await;
    info!("hookgate stopped");
    Ok(())
}
