//! The `hookgate` binary: parse the command line, load the configuration, start telemetry, run until a signal.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use hookgate::config::{Config, LogConfig, LogFormat};
use hookgate::{signature::Scheme, Listeners};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// mimalloc: malloc and free were a tenth of the gateway's CPU profile under load with glibc's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "hookgate", version, about = "Receives signed payment webhooks and stores each exactly once.")]
struct Cli {
    /// Configuration file, layered over the built-in defaults (then HOOKGATE__* environment variables).
    #[arg(long, short, global = true, env = "HOOKGATE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Apply the database migrations and exit.
    Migrate,
    /// Print the headers that sign FILE for SOURCE at the current time, one `Name: value` per line.
    Sign {
        #[arg(long)]
        source: String,
        /// The request body to sign.
        #[arg(long)]
        body: PathBuf,
        /// Message id (Standard Webhooks `webhook-id`, GitHub `X-GitHub-Delivery`); random when absent.
        #[arg(long)]
        id: Option<String>,
        /// GitHub event name for `X-GitHub-Event`.
        #[arg(long, default_value = "ping")]
        event: String,
    },
    /// Print the resolved configuration (secrets redacted); exit non-zero when it is invalid.
    CheckConfig,
    /// Exit 0 when the local gateway's /healthz answers 200 (for container health checks; no curl needed).
    Healthcheck {
        /// Ask /readyz instead of /healthz.
        #[arg(long)]
        ready: bool,
    },
    /// Republish stored events to their Redis stream, in order of receipt (for consumers that lost data).
    Replay {
        #[arg(long)]
        source: String,
        /// Received at or after this time (RFC 3339, e.g. 2026-11-26T10:00:00Z, or unix seconds).
        #[arg(long, value_parser = parse_time)]
        since: Option<i64>,
        /// Received before this time (RFC 3339 or unix seconds).
        #[arg(long, value_parser = parse_time)]
        until: Option<i64>,
        /// Only event types matching this pattern (`*` matches anything, e.g. `invoice.*`).
        #[arg(long = "type")]
        event_type: Option<String>,
        /// Count what would be republished, publish nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Delete stored events received more than retention.keep_days ago, as `serve` does every
    /// retention.interval_s when retention is on (Ctrl-C stops between two batches).
    Prune {
        /// Keep this many days instead of retention.keep_days (at least 7).
        #[arg(long)]
        keep_days: Option<u32>,
        /// Count what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// A time given as unix seconds or RFC 3339.
fn parse_time(text: &str) -> Result<i64, String> {
    if let Ok(secs) = text.parse::<i64>() {
        return Ok(secs);
    }
    let time = humantime::parse_rfc3339_weak(text).map_err(|e| format!("{e} (expected RFC 3339 or unix seconds)"))?;
    hookgate::unix_seconds(time).ok_or_else(|| format!("{text} is before 1970"))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hookgate: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    let config = Config::load(cli.config.as_deref()).context("invalid configuration")?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => check_config(&config),
        Command::Sign { source, body, id, event } => sign(&config, &source, &body, id, &event),
        Command::Migrate => runtime()?.block_on(async {
            init_tracing(&config.log);
            let store = hookgate::store::Store::new(&config.store, config.notify.enabled)?;
            store.migrate().await.context("applying migrations")?;
            info!("migrations applied");
            Ok(())
        }),
        Command::Serve => runtime()?.block_on(serve(config)),
        Command::Healthcheck { ready } => runtime()?.block_on(healthcheck(&config, ready)),
        Command::Replay { source, since, until, event_type, dry_run } => {
            let filter = hookgate::store::ReplayFilter { source, since, until, event_type };
            runtime()?.block_on(replay(&config, &filter, dry_run))
        }
        Command::Prune { keep_days, dry_run } => runtime()?.block_on(prune(&config, keep_days, dry_run)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")
}

async fn serve(config: Config) -> anyhow::Result<()> {
    init_tracing(&config.log);
    raise_open_file_limit(&config);
    let listeners = Listeners::bind(&config)
        .await
        .with_context(|| format!("binding {} and {}", config.server.listen, config.admin.listen))?;
    let (shutdown, hurry) = (CancellationToken::new(), CancellationToken::new());
    let (begin, hasten) = (shutdown.clone(), hurry.clone());
    let mut signals = hookgate::shutdown::Signals::new();
    tokio::spawn(async move {
        signals.recv().await;
        info!("shutdown signal received; draining (send it again to stop waiting, a third time to exit at once)");
        begin.cancel();
        signals.recv().await;
        // Not an exit yet: in enqueue mode the queue holds acknowledged events, which the drain's end still
        // writes or spills (file writes, as long as the disk takes); an exit now would lose them.
        warn!(
            "second shutdown signal: no more waiting; what is still queued is written or spilled, then hookgate exits"
        );
        hasten.cancel();
        signals.recv().await;
        warn!("third shutdown signal: exiting at once");
        std::process::exit(130);
    });
    hookgate::run(config, listeners, shutdown, hurry).await?;
    Ok(())
}

/// Raises the soft limit on open files to the hard one, as the Go runtime does and as systemd expects of
/// servers (its soft default stays 1024 for programs that use `select()`): each connection is a descriptor,
/// and past the limit `accept()` fails. Warns when even the hard limit is short of what the configuration
/// can open at once.
fn raise_open_file_limit(config: &Config) {
    let max_connections = config.server.max_connections as u64;
    // The pools' connections, the listeners, the runtime's epoll and wake-up descriptors, logs: a margin.
    let needed = max_connections + u64::from(config.store.pool_max) + config.notify.pool_max as u64 + 64;
    let before = rlimit::Resource::NOFILE.get().map(|(soft, _)| soft).ok();
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            if before.is_some_and(|soft| soft < limit) {
                info!(before, limit, "open file limit raised to its hard limit");
            }
            if limit < needed {
                warn!(
                    limit,
                    needed,
                    max_connections,
                    "the open file limit is below what server.max_connections and the pools can open: past it, new \
                     connections are not accepted; raise it (LimitNOFILE= in the systemd unit, the container's \
                     nofile ulimit) or lower server.max_connections"
                );
            }
        }
        Err(e) => warn!(error = %e, "cannot read or raise the open file limit"),
    }
}

async fn replay(config: &Config, filter: &hookgate::store::ReplayFilter, dry_run: bool) -> anyhow::Result<()> {
    if !config.sources.contains_key(&filter.source) {
        bail!("unknown source `{}`", filter.source);
    }
    let store = hookgate::store::Store::new(&config.store, config.notify.enabled)?;
    let total = store.replay_count(filter).await.context("counting events to replay")?;
    let stream = config.notify.stream_for(&filter.source);
    if dry_run {
        println!("{total} events would be republished to {stream}");
        return Ok(());
    }
    let notifier = hookgate::notify::Notifier::new(&config.notify, store)?;
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} events ({per_sec})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let published = notifier.replay(filter, |n| bar.set_position(n)).await.context("replaying")?;
    bar.finish();
    println!("{published} events republished to {stream}");
    Ok(())
}

async fn prune(config: &Config, keep_days: Option<u32>, dry_run: bool) -> anyhow::Result<()> {
    use hookgate::format_unix_us;
    use hookgate::retention::{Outcome, Retention};
    let mut retention = config.retention.clone();
    retention.keep_days = keep_days.unwrap_or(retention.keep_days);
    if retention.keep_days == 0 {
        bail!("retention is off (retention.keep_days = 0): set it, or pass --keep-days");
    }
    if let Some(reason) = hookgate::config::RetentionConfig::keep_days_problem(retention.keep_days) {
        bail!("--keep-days: {reason}");
    }
    let store = hookgate::store::Store::new(&config.store, config.notify.enabled)?;
    let retention = Retention::new(store, retention);
    let mut out = std::io::stdout().lock();
    if dry_run {
        let (cutoff, counts) = retention.count().await.context("counting events to prune")?;
        let total: i64 = counts.values().sum();
        writeln!(out, "{total} events received before {} would be deleted", format_unix_us(cutoff.before_us))?;
        for (source, n) in counts.iter().filter(|(_, n)| **n > 0) {
            writeln!(out, "  {source}: {n}")?;
        }
        return Ok(());
    }
    let stop = CancellationToken::new();
    let trigger = stop.clone();
    tokio::spawn(async move {
        hookgate::shutdown::signal().await;
        trigger.cancel();
    });
    let report = retention.run_once(&stop).await.context("pruning")?;
    let before = format_unix_us(report.cutoff.before_us);
    if let Some(queued_us) = report.cutoff.held_back_by_us {
        writeln!(
            out,
            "# the outbox holds a batch queued at {}: newer events wait for their stream",
            format_unix_us(queued_us)
        )?;
    }
    let total = report.total();
    match report.outcome {
        Outcome::Completed => writeln!(out, "{total} events received before {before} deleted")?,
        Outcome::Interrupted => writeln!(out, "interrupted: {total} events received before {before} deleted")?,
        Outcome::Skipped => {
            bail!("another replica is pruning (it holds the pruning lock); {total} events deleted before it took over")
        }
    }
    for (source, n) in &report.deleted {
        writeln!(out, "  {source}: {n}")?;
    }
    Ok(())
}

async fn healthcheck(config: &Config, ready: bool) -> anyhow::Result<()> {
    use http_body_util::Empty;
    let mut addr = config.admin.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let path = if ready { "readyz" } else { "healthz" };
    let url: hyper::Uri = format!("http://{addr}/{path}").parse()?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    let response = tokio::time::timeout(std::time::Duration::from_secs(3), client.get(url.clone()))
        .await
        .with_context(|| format!("{url} did not answer within 3 s"))?
        .with_context(|| format!("GET {url}"))?;
    if !response.status().is_success() {
        bail!("{url} answered {}", response.status());
    }
    Ok(())
}

fn check_config(config: &Config) -> anyhow::Result<()> {
    let sources = config.sources().context("invalid source")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", config.redacted_toml())?;
    for source in &sources {
        writeln!(out, "# source {}: {:?}", source.name, source.verifier)?;
    }
    if let Some(tls) = &config.server.tls {
        let loaded = hookgate::http::tls::load(tls).context("invalid server.tls")?;
        let expires = hookgate::format_unix_us(loaded.not_after_unix.saturating_mul(1_000_000));
        writeln!(out, "# tls: {} with its key; the certificate expires {expires}", tls.cert_file.display())?;
    }
    if let Some(dir) = &config.shutdown.spill_dir {
        let lock = hookgate::spill::check(dir)
            .with_context(|| format!("shutdown.spill_dir {}: cannot write a file there", dir.display()))?;
        writeln!(out, "# spill_dir: {} can be written", dir.display())?;
        // Not an error here: check-config is run beside the gateway that holds it.
        if let hookgate::spill::Lock::Held(holder) = lock {
            writeln!(out, "# spill_dir: in use by a running hookgate ({holder}); another replica needs its own")?;
        }
    }
    if sources.is_empty() {
        writeln!(out, "# warning: no sources configured; `serve` refuses to start without one")?;
    }
    Ok(())
}

fn sign(
    config: &Config,
    source_name: &str,
    body_path: &PathBuf,
    id: Option<String>,
    event: &str,
) -> anyhow::Result<()> {
    let sources = config.sources()?;
    let Some(source) = sources.iter().find(|s| s.name == source_name) else {
        let names: Vec<&str> = sources.iter().map(|s| s.name.as_str()).collect();
        bail!("unknown source `{source_name}` (configured: {})", names.join(", "));
    };
    let body = std::fs::read(body_path).with_context(|| format!("reading {}", body_path.display()))?;
    let now = hookgate::unix_now();
    let id = id.unwrap_or_else(|| {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        format!("msg_{nanos:x}{:x}", std::process::id())
    });
    let mut out = std::io::stdout().lock();
    for (name, value) in source.verifier.sign(&body, now, &id) {
        writeln!(out, "{name}: {value}")?;
    }
    if source.verifier.scheme() == Scheme::Github {
        writeln!(out, "{}: {id}", hookgate::event::GITHUB_DELIVERY)?;
        writeln!(out, "{}: {event}", hookgate::event::GITHUB_EVENT)?;
    }
    Ok(())
}

/// Replaces the log filter of the running subscriber.
type SetFilter = Box<dyn Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send + Sync>;

fn init_tracing(log: &LogConfig) {
    use tracing_subscriber::EnvFilter;
    // RUST_LOG, when set and valid, wins over log.level, at start and on a reload.
    let from_env = EnvFilter::try_from_default_env().ok();
    let env_wins = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(&log.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // The filter behind a reload handle, so a SIGHUP can change the level (hookgate::reload).
    let (result, set_filter): (_, SetFilter) = match log.format {
        LogFormat::Json => {
            let builder = builder.json().flatten_event(true).with_current_span(true).with_filter_reloading();
            let handle = builder.reload_handle();
            (builder.try_init(), Box::new(move |filter| handle.reload(filter).map_err(|e| e.to_string())))
        }
        LogFormat::Pretty => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            (builder.try_init(), Box::new(move |filter| handle.reload(filter).map_err(|e| e.to_string())))
        }
    };
    if let Err(e) = result {
        eprintln!("hookgate: logging was already initialised: {e}");
        return;
    }
    hookgate::reload::install_log_level_setter(Box::new(move |level| {
        if env_wins {
            return Err("RUST_LOG is set, and wins over log.level".to_owned());
        }
        set_filter(EnvFilter::try_new(level).map_err(|e| format!("`{level}` is not a log filter: {e}"))?)
    }));
}
