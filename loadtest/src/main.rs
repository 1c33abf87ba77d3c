//! The `hookgate-load` command line: attack, report, plot, sink, verify, find-max, sync-probe.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use hookgate::signature::{Scheme, Verifier};
use hookgate_load::attack::{self, AttackConfig, ProxyHeader, ProxyVersion};
use hookgate_load::payload::{IdOrder, PayloadFactory};
use hookgate_load::report::{self, Summary};
use hookgate_load::tls::ClientTls;
use hookgate_load::{findmax, plot, sink, syncprobe, verify};

#[derive(Parser, Debug)]
#[command(name = "hookgate-load", version, about = "Open-loop load generator for signed webhooks, with a loss audit.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Send signed webhooks on a schedule and report what the target sustained.
    Attack(AttackArgs),
    /// Summarise one or many results files (merged).
    Report {
        files: Vec<PathBuf>,
        /// text, json, or hist[0,1ms,5ms,...]
        #[arg(long = "type", default_value = "text")]
        kind: String,
    },
    /// Render results files as a self-contained HTML page: latency over time and its distribution.
    Plot {
        files: Vec<PathBuf>,
        #[arg(long, short, default_value = "plot.html")]
        output: PathBuf,
        #[arg(long, default_value = "hookgate-load")]
        title: String,
    },
    /// A minimal server answering 202: the baseline and the calibration target.
    Sink {
        #[arg(long, default_value = "127.0.0.1:8099")]
        listen: SocketAddr,
        /// Answer every request after this long (e.g. 10ms).
        #[arg(long, value_parser = humantime::parse_duration)]
        delay: Option<Duration>,
        /// Freeze once for this long (e.g. 500ms)...
        #[arg(long, value_parser = humantime::parse_duration)]
        stall: Option<Duration>,
        /// ...this long after the first request.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
        stall_after: Duration,
        /// Check each signature with this secret (401 when it fails); see GET /stats.
        #[arg(long, env = "HOOKGATE_LOAD_SECRET")]
        secret: Option<String>,
        #[arg(long, value_enum, default_value = "stripe")]
        scheme: SchemeArg,
    },
    /// Check that every event answered 2xx is in Postgres exactly once with its exact body, and on its stream.
    Verify {
        files: Vec<PathBuf>,
        #[arg(long, env = "HOOKGATE_DATABASE_URL")]
        database_url: String,
        /// Also check the Redis streams.
        #[arg(long, env = "HOOKGATE_REDIS_URL")]
        redis_url: Option<String>,
        #[arg(long, default_value = "hookgate:events:{source}")]
        stream_key: String,
        /// Write the counts as JSON here too.
        #[arg(long)]
        report_json: Option<PathBuf>,
    },
    /// Find the highest rate whose corrected P99 stays under an SLO with no errors.
    FindMax {
        #[command(flatten)]
        attack: AttackArgs,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10ms")]
        slo_p99: Duration,
        #[arg(long, default_value_t = 1000.0)]
        start_rate: f64,
        #[arg(long, default_value_t = 200_000.0)]
        max_rate: f64,
        /// Length of each step.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        step: Duration,
        #[arg(long, default_value_t = 0.05)]
        precision: f64,
        /// Run a failed step again at the same rate up to this many times; the rate fails only if all do.
        #[arg(long, default_value_t = 0)]
        retries: u32,
        /// A shell command run between steps (after a 2 s pause); the next step waits until it succeeds,
        /// e.g. until work an overloaded step left in the target has drained.
        #[arg(long)]
        settle: Option<String>,
    },
    /// Measure the disk under a directory: an 8 KiB write + fdatasync every interval (a WAL flush's shape).
    SyncProbe {
        /// A directory on the disk to measure, e.g. the Postgres data directory's parent.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "20ms")]
        interval: Duration,
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        duration: Duration,
        /// Write the figures as JSON here too.
        #[arg(long)]
        report_json: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum SchemeArg {
    Stripe,
    Standard,
    Github,
}

impl From<SchemeArg> for Scheme {
    fn from(s: SchemeArg) -> Self {
        match s {
            SchemeArg::Stripe => Scheme::Stripe,
            SchemeArg::Standard => Scheme::Standard,
            SchemeArg::Github => Scheme::Github,
        }
    }
}

#[derive(Args, Debug, Clone)]
struct AttackArgs {
    /// Target URL (repeatable: requests are spread across targets).
    #[arg(long = "target", required = true)]
    targets: Vec<http::Uri>,
    /// Requests per second (open loop); 0 for closed loop with --concurrency.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Closed loop: requests in flight at once (with --rate 0).
    #[arg(long, default_value_t = 0)]
    concurrency: usize,
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Stop after this many requests.
    #[arg(long)]
    requests: Option<u64>,
    /// Connections (HTTP/1.1: also the most requests in flight; HTTP/2: 64 streams each).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// HTTP/2: h2c (prior knowledge) to http:// targets, h2 by ALPN to https:// ones.
    #[arg(long)]
    http2: bool,
    /// PEM file of the CA(s) to trust for https:// targets (default: the system's CA store).
    #[arg(long)]
    cacert: Option<PathBuf>,
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    timeout: Duration,
    #[arg(long, value_enum, default_value = "stripe")]
    scheme: SchemeArg,
    /// The endpoint secret to sign with.
    #[arg(long, env = "HOOKGATE_LOAD_SECRET")]
    secret: String,
    /// Body size in bytes of the built-in payload.
    #[arg(long, default_value_t = 1024)]
    payload_size: usize,
    /// JSON body with {{id}}, {{created}} and {{type}} placeholders, instead of the built-in payload.
    #[arg(long)]
    payload_template: Option<PathBuf>,
    /// Event types to cycle through, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "payment_intent.succeeded,charge.succeeded,invoice.paid")]
    event_types: Vec<String>,
    /// Send at the target rate for this long first, without recording (steady-state measurement).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    warmup: Duration,
    /// Open loop: the scheduler sleeps at least this long between wake-ups and releases every request
    /// due by then together. Fewer wake-ups cost the generator less CPU; each request may leave up to
    /// this much after its due time, which its corrected latency includes (0: wake for every request).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pace_quantum: Duration,
    /// Share of requests that resend an earlier event (same id and body).
    #[arg(long, default_value_t = 0.0)]
    duplicate_ratio: f64,
    /// Share of requests signed with a wrong secret (expected to be refused with 401).
    #[arg(long, default_value_t = 0.0)]
    bad_signature_ratio: f64,
    /// Stream every result to this file (CSV) for report, plot and verify.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Write the final summary as JSON here too.
    #[arg(long)]
    report_json: Option<PathBuf>,
    /// Order of the event ids: "sequential" (the run's prefix then a counter, like Stripe's and Standard
    /// Webhooks' time-ordered ids), "random" (like version-4 UUIDs: each insert lands at a random place in
    /// the receiver's primary key) or "time-uuid" (version-1 UUIDs at each event's due time, like GitHub's
    /// delivery GUIDs: their leading digits wrap every ~7.2 minutes).
    #[arg(long, value_enum, default_value = "sequential")]
    ids: IdOrder,
    /// Prefix of the event ids (default: from the clock), so runs never collide.
    #[arg(long)]
    run_id: Option<String>,
    #[arg(long)]
    no_progress: bool,
    /// Start each connection with a PROXY protocol header, as a layer-4 balancer in front of a gateway
    /// with server.proxy_protocol does (v1: text, as nginx; v2: binary, as AWS NLB).
    #[arg(long, value_enum)]
    proxy_protocol: Option<ProxyVersion>,
    /// The client address the PROXY header names (default: the connection's own), e.g. one of a source's
    /// allowed_ips; the port stays the connection's.
    #[arg(long, requires = "proxy_protocol")]
    proxy_client: Option<std::net::IpAddr>,
}

impl AttackArgs {
    fn validate(&self) -> anyhow::Result<()> {
        for (name, ratio) in
            [("--duplicate-ratio", self.duplicate_ratio), ("--bad-signature-ratio", self.bad_signature_ratio)]
        {
            if !(0.0..=1.0).contains(&ratio) {
                bail!("{name} must be between 0 and 1");
            }
        }
        if self.duplicate_ratio + self.bad_signature_ratio > 1.0 {
            bail!("--duplicate-ratio plus --bad-signature-ratio exceed 1");
        }
        if self.rate < 0.0 || !self.rate.is_finite() {
            bail!("--rate must be 0 or positive");
        }
        if self.rate == 0.0 && self.concurrency == 0 {
            bail!("--rate 0 (closed loop) needs --concurrency");
        }
        if self.connections == 0 {
            bail!("--connections must be at least 1");
        }
        for t in &self.targets {
            if !matches!(t.scheme_str(), Some("http" | "https")) || t.host().is_none() {
                bail!("--target {t}: only http:// or https://host[:port]/path targets are supported");
            }
            // A PROXY header names addresses of one family (a target named by host is checked on connect).
            let target_ip = t.host().and_then(|h| h.trim_matches(['[', ']']).parse::<std::net::IpAddr>().ok());
            if let (Some(client), Some(target)) = (self.proxy_client, target_ip) {
                if client.is_ipv4() != target.is_ipv4() {
                    bail!("--proxy-client {client} and --target {t} are of different IP families");
                }
            }
        }
        Ok(())
    }

    fn config(&self) -> anyhow::Result<AttackConfig> {
        let https = self.targets.iter().any(|t| t.scheme_str() == Some("https"));
        let tls = if https { Some(ClientTls::new(self.cacert.as_deref(), self.http2)?) } else { None };
        Ok(AttackConfig {
            targets: self.targets.clone(),
            rate: self.rate,
            concurrency: self.concurrency,
            duration: self.duration,
            requests: self.requests,
            connections: self.connections,
            http2: self.http2,
            tls,
            timeout: self.timeout,
            warmup: self.warmup,
            pace_quantum: self.pace_quantum,
            duplicate_ratio: self.duplicate_ratio,
            bad_signature_ratio: self.bad_signature_ratio,
            output: self.output.clone(),
            progress: !self.no_progress,
            scheme: format!("{}", Scheme::from(self.scheme)),
            proxy_header: self.proxy_protocol.map(|version| ProxyHeader { version, client_ip: self.proxy_client }),
        })
    }

    fn factory(&self, suffix: &str) -> anyhow::Result<PayloadFactory> {
        let template = match &self.payload_template {
            Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?),
            None => None,
        };
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?;
        let run_id = self.run_id.clone().unwrap_or_else(|| format!("{:x}", now.as_millis())) + suffix;
        PayloadFactory::new(
            self.scheme.into(),
            &self.secret,
            run_id,
            self.event_types.clone(),
            self.payload_size,
            template,
            now.as_secs() as i64,
        )
        .map(|factory| factory.with_id_order(self.ids, self.rate))
        .context("invalid --secret for this scheme")
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hookgate-load: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(real_main(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hookgate-load: error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

async fn real_main(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    let mut stdout = std::io::stdout().lock();
    match cli.command {
        Command::Attack(args) => {
            args.validate()?;
            if args.duration.is_none() && args.requests.is_none() {
                bail!("give --duration and/or --requests");
            }
            let outcome = attack::run(args.config()?, args.factory("")?).await?;
            outcome.summary.write_text(&mut stdout)?;
            if let Some(path) = &args.report_json {
                std::fs::write(path, serde_json::to_vec_pretty(&outcome.summary)?)?;
            }
        }
        Command::Report { files, kind } => {
            if files.is_empty() {
                bail!("give one or more results files");
            }
            let (recorder, planned, rate) = report::merge_files(&files)?;
            match kind.as_str() {
                "text" => Summary::new(&recorder, planned, rate).write_text(&mut stdout)?,
                "json" => serde_json::to_writer_pretty(&mut stdout, &Summary::new(&recorder, planned, rate))?,
                spec if spec.starts_with("hist[") => {
                    report::write_hist(&recorder, &report::parse_hist(spec)?, &mut stdout)?;
                }
                other => bail!("unknown report type {other}: text, json or hist[...]"),
            }
            writeln!(stdout)?;
        }
        Command::Plot { files, output, title } => {
            if files.is_empty() {
                bail!("give one or more results files");
            }
            std::fs::write(&output, plot::render(&files, &title)?)
                .with_context(|| format!("writing {}", output.display()))?;
            eprintln!("wrote {}", output.display());
        }
        Command::Sink { listen, delay, stall, stall_after, secret, scheme } => {
            let verifier = match secret {
                Some(s) => Some(Verifier::new(scheme.into(), &[s], 300).context("invalid --secret")?),
                None => None,
            };
            let config = sink::SinkConfig {
                delay: delay.unwrap_or_default(),
                stall: stall.unwrap_or_default(),
                stall_after,
                verifier,
            };
            let listener = sink::bind(listen).await.with_context(|| format!("binding {listen}"))?;
            eprintln!("sink listening on http://{}", listener.local_addr()?);
            tokio::select! {
                r = sink::serve(listener, config) => r?,
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Command::Verify { files, database_url, redis_url, stream_key, report_json } => {
            let report = verify::run(&verify::VerifyConfig { files, database_url, redis_url, stream_key }).await?;
            serde_json::to_writer_pretty(&mut stdout, &report)?;
            writeln!(stdout)?;
            if let Some(path) = report_json {
                std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
            }
            if !report.ok() {
                eprintln!(
                    "verify: FAILED: {} lost, {} body mismatches, {} bad signatures stored, {} missing from streams",
                    report.lost, report.body_mismatch, report.bad_signatures_stored, report.missing_from_stream
                );
                return Ok(std::process::ExitCode::FAILURE);
            }
            eprintln!("verify: ok: {} acknowledged events, all stored once with their exact body", report.acknowledged);
        }
        Command::FindMax { attack, slo_p99, start_rate, max_rate, step, precision, retries, settle } => {
            attack.validate()?;
            let mut base = attack.config()?;
            base.progress = false;
            if base.warmup.is_zero() {
                // Each step starts from idle connections: without a warm-up, its first few hundred ms
                // (cold connections and caches) would decide the step's P99.
                base.warmup = Duration::from_secs(1);
            }
            let config = findmax::FindMaxConfig {
                attack: base,
                slo_p99,
                start_rate,
                max_rate,
                step,
                precision,
                pause: Duration::from_secs(2),
                retries,
                settle,
            };
            let result = findmax::run(&config, |i| attack.factory(&format!("s{i}"))).await?;
            writeln!(
                stdout,
                "max sustainable rate: {:.0}/s (corrected P99 <= {}, no errors)",
                result.max_sustainable_rate,
                report::fmt_us(result.slo_p99_us)
            )?;
            if let Some(path) = &attack.report_json {
                std::fs::write(path, serde_json::to_vec_pretty(&result)?)?;
            }
        }
        Command::SyncProbe { dir, interval, duration, report_json } => {
            let config = syncprobe::SyncProbeConfig { dir, interval, duration };
            let report = tokio::task::spawn_blocking(move || syncprobe::run(&config)).await??;
            writeln!(
                stdout,
                "write + fdatasync of {} bytes in {}: {} samples ({} ticks skipped behind a slow sync); \
                 P50 {}, P99 {}, P99.9 {}, max {}; {} over 10 ms",
                syncprobe::BLOCK,
                report.dir.display(),
                report.samples,
                report.skipped,
                report::fmt_us(report.p50_us),
                report::fmt_us(report.p99_us),
                report::fmt_us(report.p999_us),
                report::fmt_us(report.max_us),
                report.over_10ms
            )?;
            if let Some(path) = &report_json {
                std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
