//! The attack: an open-loop schedule on absolute deadlines (request i is due at start + i/rate), workers
//! that each own a connection, and a collector thread that streams every result to disk and shows progress.
//!
//! The schedule runs on its own OS thread: `thread::sleep` wakes within tens of microseconds, where tokio's
//! timer rounds to the millisecond, which would add up to 1 ms to every corrected latency. Latency is
//! measured from the due time (corrected for coordinated omission) and from the actual send.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use http::Uri;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::payload::{Kind, PayloadFactory};
use crate::recorder::Recorder;
use crate::report::{fmt_us, Summary};
use crate::results::{self, Meta, Row};
use crate::tls::ClientTls;

#[derive(Debug, Clone)]
pub struct AttackConfig {
    pub targets: Vec<Uri>,
    /// Requests per second; 0 means closed loop with `concurrency` workers.
    pub rate: f64,
    pub concurrency: usize,
    pub duration: Option<Duration>,
    pub requests: Option<u64>,
    pub connections: usize,
    pub http2: bool,
    /// The TLS client for `https://` targets (None: every target is `http://`).
    pub tls: Option<ClientTls>,
    pub timeout: Duration,
    /// Sent at the target rate before the measured run, and not recorded: connections, caches and the
    /// target's pools reach their steady state first (as wrk2's calibration period). Open loop only.
    pub warmup: Duration,
    /// The scheduler's shortest sleep: requests due within it are released together.
    pub pace_quantum: Duration,
    pub duplicate_ratio: f64,
    pub bad_signature_ratio: f64,
    pub output: Option<PathBuf>,
    pub progress: bool,
    pub scheme: String,
    /// Open each connection with a PROXY protocol header, as a layer-4 balancer in front of the target would.
    pub proxy_header: Option<ProxyHeader>,
}

/// Which PROXY protocol header a connection starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyVersion {
    /// HAProxy's text header (`PROXY TCP4 ...`), as nginx's `proxy_protocol on` sends it.
    V1,
    /// The binary header, as AWS NLB and HAProxy's `send-proxy-v2` send it.
    V2,
}

/// The PROXY protocol header each connection starts with (`--proxy-protocol`, `--proxy-client`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    pub version: ProxyVersion,
    /// The client address the header names; `None`: the connection's own (as a balancer would pass it).
    pub client_ip: Option<IpAddr>,
}

impl ProxyHeader {
    /// The header for a connection from `local` to `peer`. The two addresses of a header are of one family.
    pub fn encode(&self, local: SocketAddr, peer: SocketAddr) -> std::io::Result<Vec<u8>> {
        let client = SocketAddr::new(self.client_ip.unwrap_or(local.ip()), local.port());
        if client.is_ipv4() != peer.is_ipv4() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a PROXY header names one IP family: client {} and target {peer} differ", client.ip()),
            ));
        }
        match self.version {
            ProxyVersion::V1 => Ok(ppp::v1::Addresses::from((client, peer)).to_string().into_bytes()),
            ProxyVersion::V2 => ppp::v2::Builder::with_addresses(
                ppp::v2::Version::Two | ppp::v2::Command::Proxy,
                ppp::v2::Protocol::Stream,
                (client, peer),
            )
            .build(),
        }
    }
}

/// How often the collector drains the result channel.
const COLLECT_EVERY: Duration = Duration::from_millis(20);

/// Recorder shards shared by the workers (more than the runtime's threads, so locks are rarely contended).
const RECORDER_SHARDS: usize = 8;

/// One scheduled request.
#[derive(Debug, Clone, Copy)]
struct Ticket {
    index: u64,
    due: Instant,
    /// False during the warm-up: sent, not recorded.
    measured: bool,
}

/// What an attack produced.
#[derive(Debug)]
pub struct Outcome {
    pub summary: Summary,
    pub recorder: Recorder,
    pub meta: Meta,
}

/// splitmix64: a deterministic, well-mixed hash of the request index, for the duplicate and bad-signature
/// draws. Deterministic draws make a run reproducible and let the audit recompute them.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn draw(index: u64, salt: u64) -> f64 {
    (mix(index ^ salt) >> 11) as f64 / (1u64 << 53) as f64
}

/// Which event a ticket sends, and how: fresh, a resend of an earlier fresh event, or badly signed.
fn plan(index: u64, duplicate_ratio: f64, bad_ratio: f64) -> (u64, Kind) {
    let kind_of = |i: u64| {
        let d = draw(i, 1);
        if d < bad_ratio {
            Kind::BadSignature
        } else if d < bad_ratio + duplicate_ratio {
            Kind::Duplicate
        } else {
            Kind::Fresh
        }
    };
    match kind_of(index) {
        Kind::Duplicate if index > 0 => {
            // Resend one of the last 1000 events, if that one was a fresh one.
            let back = 1 + mix(index ^ 2) % index.min(1000);
            let earlier = index - back;
            if kind_of(earlier) == Kind::Fresh {
                (earlier, Kind::Duplicate)
            } else {
                (index, Kind::Fresh)
            }
        }
        Kind::Duplicate => (index, Kind::Fresh),
        kind => (index, kind),
    }
}

fn unix_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

fn unix_s() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Runs the attack to completion.
pub async fn run(config: AttackConfig, factory: PayloadFactory) -> anyhow::Result<Outcome> {
    anyhow::ensure!(!config.targets.is_empty(), "at least one --target is needed");
    for target in &config.targets {
        match target.scheme_str() {
            Some("http") => {}
            Some("https") => anyhow::ensure!(config.tls.is_some(), "{target}: an https target needs a TLS client"),
            _ => anyhow::bail!("{target}: the target must be an http:// or https:// URL"),
        }
    }
    anyhow::ensure!(config.duration.is_some() || config.requests.is_some(), "give --duration and/or --requests");
    anyhow::ensure!(config.rate > 0.0 || config.concurrency > 0, "closed loop (--rate 0) needs --concurrency");
    let closed_loop = config.rate <= 0.0;
    let planned = match (config.requests, config.duration) {
        (Some(n), Some(d)) if !closed_loop => n.min((d.as_secs_f64() * config.rate).round() as u64),
        (Some(n), _) => n,
        (None, Some(d)) if !closed_loop => (d.as_secs_f64() * config.rate).round() as u64,
        (None, _) => u64::MAX,
    };
    let workers = if closed_loop {
        config.concurrency
    } else if config.http2 {
        config.connections * 64
    } else {
        config.connections
    }
    .max(1);

    // Connections first, so the schedule does not start with a connect storm.
    let mut conns = connect_all(&config, workers).await.into_iter();
    // The schedule starts 20 ms from now; measurement starts after the warm-up.
    let warmup = if closed_loop { Duration::ZERO } else { config.warmup };
    let warmup_requests = (warmup.as_secs_f64() * config.rate.max(0.0)).ceil() as u64;
    let schedule_start = Instant::now() + Duration::from_millis(20);
    let start = schedule_start + warmup;
    let start_unix_ns = unix_ns() + 20_000_000 + warmup.as_nanos();
    let meta = Meta {
        start_unix_ns,
        rate: config.rate.max(0.0),
        targets: config.targets.iter().map(ToString::to_string).collect(),
        scheme: config.scheme.clone(),
        connections: config.connections,
        planned: if planned == u64::MAX { 0 } else { planned },
    };
    let end_of_schedule = config.duration.map(|d| start + d);
    // Past this, a ticket still waiting for a worker is dropped rather than sent.
    let hard_stop = end_of_schedule.map(|e| e + config.timeout);

    let (row_tx, row_rx) = crossbeam_channel::bounded::<Row>(1 << 14);
    // Workers record into a few shared shards rather than one recorder each: a recorder is three
    // HdrHistograms of ~190 KB (3 significant digits up to an hour), so one per worker would cost
    // 70 MB at 128 connections. A shard's lock is held for a few hundred nanoseconds per request.
    let shards: Arc<Vec<std::sync::Mutex<Recorder>>> =
        Arc::new((0..RECORDER_SHARDS).map(|_| std::sync::Mutex::new(Recorder::default())).collect());
    let rows_lost = Arc::new(AtomicU64::new(0));
    let collector = spawn_collector(row_rx, config.output.as_ref(), &meta, config.progress, start)?;

    let (ticket_tx, ticket_rx) = async_channel::bounded::<Ticket>(workers * 2);
    let closed_counter = Arc::new(AtomicU64::new(0));
    let scheduler = if closed_loop {
        drop(ticket_tx);
        None
    } else {
        let rate = config.rate;
        let quantum = config.pace_quantum;
        Some(std::thread::Builder::new().name("schedule".into()).spawn(move || {
            for index in 0..planned.saturating_add(warmup_requests) {
                let due = schedule_start + Duration::from_secs_f64(index as f64 / rate);
                if end_of_schedule.is_some_and(|e| due >= e) {
                    break;
                }
                let now = Instant::now();
                if due > now {
                    // Never shorter than the quantum: what falls due meanwhile is released on waking,
                    // late by less than the quantum, and measured from its due time all the same.
                    std::thread::sleep((due - now).max(quantum));
                }
                let ticket = Ticket { index, due, measured: index >= warmup_requests };
                if hard_stop.is_some_and(|h| Instant::now() > h) || ticket_tx.send_blocking(ticket).is_err() {
                    break;
                }
            }
        })?)
    };

    let factory = Arc::new(factory);
    let mut handles = Vec::with_capacity(workers);
    for w in 0..workers {
        let Some(conn) = conns.next() else { break };
        let ctx = WorkerContext {
            target_index: (w % config.connections.max(1)) % config.targets.len(),
            config: config.clone(),
            factory: factory.clone(),
            row_tx: row_tx.clone(),
            rows_lost: rows_lost.clone(),
            start,
        };
        let tickets = ticket_rx.clone();
        let counter = closed_counter.clone();
        let shards_for_worker = shards.clone();
        handles.push(tokio::spawn(async move {
            let mut worker = Worker { ctx, conn, shard: shards_for_worker.clone(), shard_index: w % RECORDER_SHARDS };
            if closed_loop {
                loop {
                    let index = counter.fetch_add(1, Ordering::Relaxed);
                    let now = Instant::now();
                    if index >= planned || end_of_schedule.is_some_and(|e| now >= e) {
                        break;
                    }
                    worker.fire(Ticket { index, due: now, measured: true }).await;
                }
            } else {
                while let Ok(ticket) = tickets.recv().await {
                    if hard_stop.is_some_and(|h| Instant::now() > h) {
                        continue; // counted as dropped: planned, never sent
                    }
                    worker.fire(ticket).await;
                }
            }
        }));
    }
    drop(ticket_rx);
    drop(row_tx);
    for handle in handles {
        handle.await.context("worker panicked")?;
    }
    let mut recorder = Recorder::default();
    for shard in shards.iter() {
        recorder.merge(&shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    }
    if let Some(s) = scheduler {
        let _ = s.join();
    }
    collector.join().map_err(|_| anyhow::anyhow!("collector thread panicked"))??;
    let lost = rows_lost.load(Ordering::Relaxed);
    if lost > 0 {
        eprintln!("warning: {lost} results could not be written to the output (writer too slow); the summary has them");
    }
    let planned = if planned == u64::MAX { recorder.requests } else { planned };
    let summary = Summary::new(&recorder, planned, config.rate.max(0.0));
    Ok(Outcome { summary, recorder, meta })
}

type SharedH2 = Arc<tokio::sync::Mutex<Option<http2::SendRequest<Full<Bytes>>>>>;

/// A worker's way to its target. HTTP/1.1: a connection of its own, one request at a time, reopened after
/// an error. HTTP/2: one of `--connections` connections, shared by many workers' streams.
enum Conn {
    H1(Uri, Option<http1::SendRequest<Full<Bytes>>>),
    H2(Uri, SharedH2),
}

/// One connection per worker for HTTP/1.1, opened before the schedule starts so that it does not begin
/// with a connect storm; for HTTP/2, `--connections` shared connections, handed out round robin. A target
/// that cannot be reached yet is retried on first use.
async fn connect_all(config: &AttackConfig, workers: usize) -> Vec<Conn> {
    let targets = &config.targets;
    if config.http2 {
        let mut shared = Vec::new();
        for c in 0..config.connections.max(1) {
            let target = targets[c % targets.len()].clone();
            let sender = open_h2(&target, config).await.ok();
            shared.push((target, Arc::new(tokio::sync::Mutex::new(sender))));
        }
        (0..workers).map(|w| Conn::H2(shared[w % shared.len()].0.clone(), shared[w % shared.len()].1.clone())).collect()
    } else {
        let mut conns = Vec::with_capacity(workers);
        for w in 0..workers {
            let target = targets[w % targets.len()].clone();
            let sender = open_h1(&target, config).await.ok();
            conns.push(Conn::H1(target, sender));
        }
        conns
    }
}

/// A TCP connection to `target`, after its PROXY header when `proxy_header` is given.
async fn open_tcp(target: &Uri, proxy_header: Option<&ProxyHeader>) -> std::io::Result<TcpStream> {
    let host = target.host().unwrap_or("127.0.0.1");
    let https = target.scheme_str() == Some("https");
    let port = target.port_u16().unwrap_or(if https { 443 } else { 80 });
    let mut stream = TcpStream::connect((host, port)).await?;
    stream.set_nodelay(true)?;
    if let Some(proxy_header) = proxy_header {
        let header = proxy_header.encode(stream.local_addr()?, stream.peer_addr()?)?;
        stream.write_all(&header).await?;
    }
    Ok(stream)
}

/// The TLS client to use for `target`: Some for an `https://` one.
fn tls_for<'a>(target: &Uri, tls: Option<&'a ClientTls>) -> Option<&'a ClientTls> {
    tls.filter(|_| target.scheme_str() == Some("https"))
}

async fn open_h1(target: &Uri, config: &AttackConfig) -> anyhow::Result<http1::SendRequest<Full<Bytes>>> {
    let tcp = open_tcp(target, config.proxy_header.as_ref()).await?;
    match tls_for(target, config.tls.as_ref()) {
        Some(tls) => h1_over(tls.connect(target.host().unwrap_or("127.0.0.1"), tcp).await?).await,
        None => h1_over(tcp).await,
    }
}

async fn open_h2(target: &Uri, config: &AttackConfig) -> anyhow::Result<http2::SendRequest<Full<Bytes>>> {
    let tcp = open_tcp(target, config.proxy_header.as_ref()).await?;
    match tls_for(target, config.tls.as_ref()) {
        Some(tls) => h2_over(tls.connect(target.host().unwrap_or("127.0.0.1"), tcp).await?).await,
        None => h2_over(tcp).await,
    }
}

/// An HTTP/1.1 connection over `io` (plain TCP or TLS), its driver spawned.
async fn h1_over<I>(io: I) -> anyhow::Result<http1::SendRequest<Full<Bytes>>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// An HTTP/2 connection over `io` (plain TCP or TLS), its driver spawned.
async fn h2_over<I>(io: I) -> anyhow::Result<http2::SendRequest<Full<Bytes>>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

struct WorkerContext {
    target_index: usize,
    config: AttackConfig,
    factory: Arc<PayloadFactory>,
    row_tx: crossbeam_channel::Sender<Row>,
    rows_lost: Arc<AtomicU64>,
    start: Instant,
}

struct Worker {
    ctx: WorkerContext,
    conn: Conn,
    shard: Arc<Vec<std::sync::Mutex<Recorder>>>,
    shard_index: usize,
}

impl Worker {
    async fn fire(&mut self, ticket: Ticket) {
        let (index, kind) = plan(ticket.index, self.ctx.config.duplicate_ratio, self.ctx.config.bad_signature_ratio);
        let prepared = self.ctx.factory.prepare(index, kind, unix_s());
        // HTTP/1.1 sends the origin form (`/webhooks/x`); HTTP/2 needs the full URI for its pseudo-headers.
        let (target, uri) = match &self.conn {
            Conn::H1(t, _) => (t.clone(), t.path_and_query().map_or_else(|| "/".to_owned(), ToString::to_string)),
            Conn::H2(t, _) => (t.clone(), t.to_string()),
        };
        let mut request = http::Request::post(uri)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("user-agent", "hookgate-load");
        if let Some(authority) = target.authority() {
            request = request.header(http::header::HOST, authority.as_str());
        }
        for (k, v) in &prepared.headers {
            request = request.header(*k, v.as_str());
        }
        let bytes_out = prepared.body.len() as u64;
        let Ok(request) = request.body(Full::new(prepared.body)) else { return };
        let sent = Instant::now();
        let result = tokio::time::timeout(self.ctx.config.timeout, self.send(request)).await;
        let done = Instant::now();
        let (status, bytes_in, error) = match result {
            Ok(Ok((status, n))) => (status, n, String::new()),
            Ok(Err(e)) => (0, 0, e),
            Err(_) => {
                // The connection may be mid-response: never reuse it.
                self.reset();
                (0, 0, "timeout".to_owned())
            }
        };
        if !ticket.measured {
            return;
        }
        let ns = |t: Instant| t.saturating_duration_since(self.ctx.start).as_nanos() as u64;
        let row = Row {
            due_ns: ns(ticket.due),
            sent_ns: ns(sent),
            done_ns: ns(done),
            status,
            bytes_out,
            bytes_in,
            kind,
            target: self.ctx.target_index as u16,
            event_id: prepared.event_id,
            body_hash: prepared.body_hash,
            error,
        };
        self.shard[self.shard_index].lock().unwrap_or_else(std::sync::PoisonError::into_inner).record(&row);
        if self.ctx.row_tx.try_send(row).is_err() {
            self.ctx.rows_lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn reset(&mut self) {
        match &mut self.conn {
            Conn::H1(_, sender) => *sender = None,
            Conn::H2(_, shared) => {
                if let Ok(mut guard) = shared.try_lock() {
                    *guard = None;
                }
            }
        }
    }

    /// Sends one request; returns the status and response size, or a short error class.
    async fn send(&mut self, request: http::Request<Full<Bytes>>) -> Result<(u16, u64), String> {
        match &mut self.conn {
            Conn::H1(target, slot) => {
                if slot.as_ref().is_none_or(http1::SendRequest::is_closed) {
                    *slot = Some(open_h1(target, &self.ctx.config).await.map_err(|_| "connect".to_owned())?);
                }
                let Some(sender) = slot.as_mut() else { return Err("connect".into()) };
                let result = match sender.ready().await {
                    Ok(()) => match sender.send_request(request).await {
                        Ok(response) => read_response(response).await,
                        Err(_) => Err("io".into()),
                    },
                    Err(_) => Err("io".into()),
                };
                if result.is_err() {
                    *slot = None;
                }
                result
            }
            Conn::H2(target, shared) => {
                let mut sender = {
                    let mut guard = shared.lock().await;
                    if guard.as_ref().is_none_or(http2::SendRequest::is_closed) {
                        *guard = Some(open_h2(target, &self.ctx.config).await.map_err(|_| "connect".to_owned())?);
                    }
                    guard.clone().ok_or_else(|| "connect".to_owned())?
                };
                if sender.ready().await.is_err() {
                    return Err("io".into());
                }
                match sender.send_request(request).await {
                    Ok(response) => read_response(response).await,
                    Err(_) => Err("io".into()),
                }
            }
        }
    }
}

async fn read_response(response: http::Response<hyper::body::Incoming>) -> Result<(u16, u64), String> {
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.map_err(|_| "io".to_owned())?;
    Ok((status, body.to_bytes().len() as u64))
}

/// The one consumer of results: writes them to the output file and prints a progress line each second.
fn spawn_collector(
    rows: crossbeam_channel::Receiver<Row>,
    output: Option<&PathBuf>,
    meta: &Meta,
    progress: bool,
    start: Instant,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
    let mut file = match output {
        Some(path) => {
            let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
            let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
            results::write_header(&mut w, meta)?;
            Some(w)
        }
        None => None,
    };
    Ok(std::thread::Builder::new().name("collector".into()).spawn(move || {
        let mut live = Recorder::default();
        let mut next_tick = Instant::now() + Duration::from_secs(1);
        loop {
            // Drained on a timer, not woken per row: a blocking receive costs a futex wake-up per request
            // (the collector took 9% of a core at 14,000/s that way, and ~0% now). The channel holds
            // 16,384 rows, over half a second at 25,000/s.
            std::thread::sleep(COLLECT_EVERY);
            let disconnected = loop {
                match rows.try_recv() {
                    Ok(row) => {
                        if let Some(w) = file.as_mut() {
                            row.write_csv(w)?;
                        }
                        // The live recorder only feeds the progress line.
                        if progress {
                            live.record(&row);
                        }
                    }
                    Err(crossbeam_channel::TryRecvError::Empty) => break false,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => break true,
                }
            };
            if disconnected {
                break;
            }
            if progress && Instant::now() >= next_tick {
                next_tick += Duration::from_secs(1);
                let elapsed = start.elapsed().as_secs_f64();
                let errors = live.requests - live.successes;
                eprint!(
                    "\r{elapsed:6.1}s  sent {:>9}  rate {:>9.1}/s  p99 {:>10}  errors {:>6}",
                    live.requests,
                    live.requests as f64 / elapsed.max(1e-9),
                    fmt_us(live.corrected.value_at_quantile(0.99)),
                    errors
                );
            }
        }
        if progress {
            eprintln!();
        }
        if let Some(mut w) = file {
            w.flush()?;
        }
        Ok(())
    })?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_header_names_the_chosen_client_as_the_gateway_reads_it_and_refuses_mixed_families() {
        let (local, peer): (SocketAddr, SocketAddr) =
            ("127.0.0.1:40000".parse().expect("local"), "127.0.0.1:8080".parse().expect("peer"));
        for version in [ProxyVersion::V1, ProxyVersion::V2] {
            let own = ProxyHeader { version, client_ip: None }.encode(local, peer).expect("header");
            let chosen = ProxyHeader { version, client_ip: Some("192.0.2.10".parse().expect("ip")) };
            let header = chosen.encode(local, peer).expect("header");
            let read = |bytes: &[u8]| match hookgate::http::proxy_protocol::parse(bytes) {
                hookgate::http::proxy_protocol::Parsed::Header { len, client } => (len, client),
                other => panic!("{version:?}: {other:?}"),
            };
            assert_eq!(read(&own), (own.len(), Some(local)), "{version:?}");
            assert_eq!(read(&header), (header.len(), Some("192.0.2.10:40000".parse().expect("addr"))), "{version:?}");
            let v6 = ProxyHeader { version, client_ip: Some("2001:db8::1".parse().expect("ip")) };
            let error = v6.encode(local, peer).expect_err("one family per header");
            assert!(error.to_string().contains("differ"), "{error}");
        }
    }

    #[test]
    fn plan_respects_ratios_and_duplicates_point_back_to_fresh_events() {
        let n = 100_000u64;
        let (mut dup, mut bad) = (0, 0);
        for i in 0..n {
            let (index, kind) = plan(i, 0.1, 0.05);
            match kind {
                Kind::Duplicate => {
                    dup += 1;
                    assert!(index < i);
                    assert_eq!(plan(index, 0.1, 0.05).1, Kind::Fresh);
                }
                Kind::BadSignature => {
                    bad += 1;
                    assert_eq!(index, i);
                }
                Kind::Fresh => assert_eq!(index, i),
            }
        }
        // About 10% x 85% (the earlier pick must be fresh) and 5%.
        assert!((7_500..10_000).contains(&dup), "{dup}");
        assert!((4_500..5_500).contains(&bad), "{bad}");
        assert!((0..1000).all(|i| plan(i, 0.0, 0.0) == (i, Kind::Fresh)));
    }
}
