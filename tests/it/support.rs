//! Test support: a private database per test, an in-process gateway on port 0, a signing HTTP client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hookgate::config::Config;
use hookgate::signature::{Scheme, Verifier};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const STRIPE_SECRET: &str = "whsec_it_stripe_secret";
pub const STANDARD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub const GITHUB_SECRET: &str = "it github secret";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{prefix}_{:x}_{}_{}", nanos, std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

pub fn admin_database_url() -> String {
    std::env::var("HOOKGATE_TEST_DATABASE_URL").expect(
        "HOOKGATE_TEST_DATABASE_URL is not set: run the tests with deploy/test.sh, which starts Postgres and Redis",
    )
}

/// Replaces the database name at the end of a postgres URL.
pub fn with_database(url: &str, name: &str) -> String {
    let base = url.rsplit_once('/').map_or(url, |(b, _)| b);
    format!("{base}/{name}")
}

/// A fresh database of its own, so a test can lock or count without seeing any other test.
pub struct TestDb {
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn create() -> Self {
        Self::create_on(&admin_database_url()).await
    }

    pub async fn create_on(admin_url: &str) -> Self {
        let name = unique("hg_it");
        let admin = PgPoolOptions::new().max_connections(1).connect(admin_url).await.expect("connect to test Postgres");
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.expect("create test database");
        admin.close().await;
        let url = with_database(admin_url, &name);
        let pool = PgPoolOptions::new().max_connections(4).connect(&url).await.expect("connect to test database");
        Self { url, pool }
    }

    pub async fn count(&self) -> i64 {
        sqlx::query("SELECT count(*) FROM events").fetch_one(&self.pool).await.expect("count").get(0)
    }

    pub async fn stored_ids(&self) -> std::collections::HashSet<String> {
        sqlx::query("SELECT event_id FROM events")
            .fetch_all(&self.pool)
            .await
            .expect("ids")
            .into_iter()
            .map(|r| r.get(0))
            .collect()
    }

    pub async fn body_of(&self, source: &str, id: &str) -> Option<Vec<u8>> {
        sqlx::query("SELECT body FROM events WHERE source = $1 AND event_id = $2")
            .bind(source)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .expect("body")
            .map(|r| r.get(0))
    }
}

/// A path for a file or folder of the test's own, under cargo's scratch folder for integration tests
/// (`target/tmp`), so that the runs leave nothing in the system's temporary folder. Only for what the tests
/// and the gateways they start (both as the invoking user) read and write: a server that runs as another
/// user (Postgres, PgBouncer) gets a folder under `std::env::temp_dir()`. They stay after the run, for a
/// post-mortem; `deploy/test.sh` removes them before the next (every prefix starts `hookgate-it`).
pub fn scratch(prefix: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(unique(prefix))
}

/// The TOML of three sources whose secrets are read from files, written once per test process (the secrets
/// never change; a test that rotates one writes a file of its own).
pub fn sources_toml() -> String {
    static SOURCES: OnceLock<String> = OnceLock::new();
    SOURCES
        .get_or_init(|| {
            let dir = scratch("hookgate-it-secrets");
            std::fs::create_dir_all(&dir).expect("secret dir");
            let write = |name: &str, secret: &str| -> PathBuf {
                let path = dir.join(name);
                std::fs::write(&path, format!("{secret}\n")).expect("secret file");
                path
            };
            format!(
                "[sources.stripe]\nscheme = 'stripe'\nsecret_file = '{}'\n\
                 [sources.standard]\nscheme = 'standard'\nsecret_file = '{}'\n\
                 [sources.github]\nscheme = 'github'\nsecret_file = '{}'\n",
                write("stripe", STRIPE_SECRET).display(),
                write("standard", STANDARD_SECRET).display(),
                write("github", GITHUB_SECRET).display(),
            )
        })
        .clone()
}

pub fn redis_url() -> String {
    std::env::var("HOOKGATE_REDIS_URL")
        .expect("HOOKGATE_REDIS_URL is not set: run the tests with deploy/test.sh, which starts Postgres and Redis")
}

/// The tests' `notify.command_timeout_ms`, above the default 2 s. Tests count stream entries exactly, and a
/// Redis answer later than the timeout is published again by design (the gateway cannot tell whether the
/// entries were added: at least once). The shared test Redis fsyncs every write on the disk ~50 concurrent
/// tests' databases use, and a CI run once saw a catch-up page of 53 events twice; stopping Redis for 2.6 s
/// during that test reproduces it. Tests of the timeout itself set their own.
pub const TEST_COMMAND_TIMEOUT_MS: u64 = 15_000;

/// The test configuration: defaults, three sources, the given database, the test Redis with streams of
/// this gateway's own (`hg-it:<unique>:{source}`), a long Redis command timeout, quiet logs. Tests adjust
/// fields.
pub fn test_config(database_url: &str) -> Config {
    let mut config = Config::from_toml(&sources_toml()).expect("test config");
    database_url.clone_into(&mut config.store.url);
    config.notify.redis_url = redis_url();
    config.notify.command_timeout_ms = TEST_COMMAND_TIMEOUT_MS;
    config.notify.stream_key = format!("{}:{{source}}", unique("hg-it"));
    config.log.level = "warn".into();
    config
}

/// A redis-server of the test's own, which it can stop (by the pid it started) and start again. It runs as
/// the gateway requires (README, Deploy): append-only with `appendfsync always`. With the default
/// `everysec`, Redis acknowledges writes it has not yet written while a background fsync is slow, and a
/// SIGKILL loses them: with the disk busy, 3 of 20 kills lost 350–1,049 acknowledged INCRs (0 of 20 with
/// `always`), and the outage test once found a published batch of 16 missing from the stream.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<std::process::Child>,
    /// Settings of the test's own, given after the defaults (Redis applies the last one given).
    extra_args: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra_args: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(unique("hookgate-it-redis"));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let extra_args = extra_args.iter().map(|a| (*a).to_owned()).collect();
        let mut server = Self { port: free_port(), dir, child: None, extra_args };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn restart(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", "always"])
            .args(&self.extra_args)
            .arg("--dir")
            .arg(&self.dir)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server (installed by deploy/services.sh)");
        self.child = Some(child);
        let addr = format!("127.0.0.1:{}", self.port);
        for _ in 0..100 {
            if std::net::TcpStream::connect(&addr).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server did not start on {addr}");
    }

    /// Kills the server (SIGKILL, by pid) and waits for it to be gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One stream entry's fields.
pub type Entry = std::collections::HashMap<String, Vec<u8>>;

/// Every entry of a stream, oldest first.
pub async fn read_stream(redis_url: &str, key: &str) -> Vec<Entry> {
    use deadpool_redis::redis;
    let client = redis::Client::open(redis_url).expect("redis url");
    // A stream of thousands of 1 KiB entries in one reply can take longer than the client's default 500 ms on a
    // busy CI host.
    let patient = redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
    let mut conn = client.get_multiplexed_async_connection_with_config(&patient).await.expect("connect to redis");
    let reply: redis::streams::StreamRangeReply =
        redis::cmd("XRANGE").arg(key).arg("-").arg("+").query_async(&mut conn).await.expect("XRANGE");
    reply
        .ids
        .into_iter()
        .map(|entry| {
            entry
                .map
                .into_iter()
                .filter_map(|(k, v)| match v {
                    redis::Value::BulkString(bytes) => Some((k, bytes)),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

/// The event ids on a stream, with how often each appears.
pub async fn stream_ids(redis_url: &str, key: &str) -> std::collections::HashMap<String, usize> {
    let mut ids = std::collections::HashMap::new();
    for entry in read_stream(redis_url, key).await {
        let id = String::from_utf8_lossy(entry.get("id").map_or(&[][..], |v| &v[..])).into_owned();
        *ids.entry(id).or_insert(0) += 1;
    }
    ids
}

/// A gateway running in this process.
pub struct Gateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), hookgate::RunError>>,
}

impl Gateway {
    pub async fn start(config: Config) -> Self {
        let (webhooks, admin) = (bind_given_port().await, bind_given_port().await);
        let addr = webhooks.local_addr().expect("addr");
        let admin_addr = admin.local_addr().expect("admin addr");
        let shutdown = CancellationToken::new();
        // Stopped by `shutdown` alone: the hurried stop of a second signal is the binary's (`process` tests it).
        let listeners = hookgate::Listeners { webhooks, admin };
        let task = tokio::spawn(hookgate::run(config, listeners, shutdown.clone(), CancellationToken::new()));
        Self { addr, admin: admin_addr, shutdown, task }
    }

    pub fn url(&self, source: &str) -> String {
        format!("http://{}/webhooks/{source}", self.addr)
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(30), self.task).await;
        result.expect("gateway stops within 30 s").expect("gateway task").expect("gateway run");
    }
}

/// Adds a Stripe source named `name` (the tests' Stripe secret) that accepts only `allowed`.
pub fn add_listed_source(config: &mut Config, name: &str, allowed: &[&str]) {
    let mut source = config.sources["stripe"].clone();
    source.allowed_ips = allowed.iter().map(|a| a.parse().expect("range")).collect();
    config.sources.insert(name.to_owned(), source);
}

/// An HTTP/1.1 connection of the test's own (over plain TCP, TLS, or after a PROXY header).
pub type Http1Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Opens an HTTP/1.1 connection on `stream` (after whatever it has already sent).
pub async fn http1_on<S>(stream: S) -> Http1Sender
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(connection);
    sender
}

/// Posts a signed Stripe event to `source` on `sender`; returns its id, the status and the JSON answer.
pub async fn post_signed_on(sender: &mut Http1Sender, source: &str, headers: &[(&str, &str)]) -> (String, Answer) {
    let id = unique("evt");
    let body = stripe_event(&id);
    let mut request = http::Request::post(format!("/webhooks/{source}")).header("host", "hookgate.example");
    for (name, value) in stripe_headers(body.as_bytes()) {
        request = request.header(name, value);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(body.into())).expect("request");
    let (parts, body) = sender.send_request(request).await.expect("response").into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or_default();
    (id, Answer { status: parts.status.as_u16(), headers: parts.headers, json, version: parts.version })
}

pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// A Stripe event body with the given id (about 300 bytes).
pub fn stripe_event(id: &str) -> String {
    format!(
        r#"{{"id":"{id}","object":"event","api_version":"2026-07-29.dahlia","created":{},"livemode":false,"type":"payment_intent.succeeded","data":{{"object":{{"id":"pi_1","object":"payment_intent","amount":2000,"currency":"usd"}}}}}}"#,
        now()
    )
}

pub fn stripe_headers(body: &[u8]) -> Vec<(String, String)> {
    sign(Scheme::Stripe, STRIPE_SECRET, body, "", now())
}

pub fn sign(scheme: Scheme, secret: &str, body: &[u8], id: &str, timestamp: i64) -> Vec<(String, String)> {
    let verifier = Verifier::new(scheme, &[secret], 300).expect("verifier");
    verifier.sign(body, timestamp, id).into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2c_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

/// The parts of a response the tests look at.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub json: serde_json::Value,
    pub version: http::Version,
}

impl Answer {
    pub fn kind(&self) -> &str {
        self.json["error"].as_str().unwrap_or("")
    }
}

pub async fn send(client: &HttpClient, method: &str, url: &str, headers: &[(String, String)], body: Vec<u8>) -> Answer {
    let mut request = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        request = request.header(k.as_str(), v.as_str());
    }
    let request = request.body(Full::new(Bytes::from(body))).expect("request");
    let response = client.request(request).await.expect("response");
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Answer { status: parts.status.as_u16(), headers: parts.headers, json, version: parts.version }
}

pub async fn post(client: &HttpClient, url: &str, headers: &[(String, String)], body: &[u8]) -> Answer {
    send(client, "POST", url, headers, body.to_vec()).await
}

/// Posts a freshly signed Stripe event with `id` to an in-process gateway.
pub async fn post_stripe(client: &HttpClient, gateway: &Gateway, id: &str) -> Answer {
    post_stripe_with(client, &gateway.url("stripe"), id).await
}

/// Posts a freshly signed Stripe event with `id` to `url`.
pub async fn post_stripe_with(client: &HttpClient, url: &str, id: &str) -> Answer {
    let body = stripe_event(id);
    post(client, url, &stripe_headers(body.as_bytes()), body.as_bytes()).await
}

pub async fn get_text(client: &HttpClient, url: &str) -> (u16, String) {
    let request = http::Request::get(url).body(Full::new(Bytes::new())).expect("request");
    let response = client.request(request).await.expect("response");
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// The value of a series in Prometheus text: its name, with its labels as rendered when it has any
/// (`name{label="value"}`). NaN when the series is absent.
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// One series scraped from an admin port's `/metrics` (`metrics_url`); None when it is absent.
pub async fn scrape_metric(metrics_url: &str, name: &str) -> Option<f64> {
    let (_, text) = get_text(&client(), metrics_url).await;
    Some(metric_value(&text, name)).filter(|v| !v.is_nan())
}

/// Polls `check` every 100 ms until it holds or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A listener on a port from `free_port`: a port the kernel picks at bind time could be one that `free_port`
/// gave another test, free only for now (a gateway between a kill and its restart).
async fn bind_given_port() -> TcpListener {
    // Fails only when another test's `free_port` holds the port for the instant it checks it: take another.
    for _ in 0..100 {
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", free_port())).await {
            return listener;
        }
    }
    panic!("no port from free_port could be bound in 100 tries");
}

/// A port nobody listens on right now, and never handed out before in this run. The kernel picks ports at
/// random from a few thousand, so without the second rule two tests running side by side can be given the
/// same one: a gateway killed and restarted on its port, or a private Postgres stopped for an outage, leaves
/// its port free for seconds, and another test may bind it meanwhile.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Rows in the outbox: batches stored but not yet all on their streams.
pub async fn outbox_rows(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events_outbox").fetch_one(&db.pool).await.expect("count outbox rows")
}

/// Waits (up to 5 s) for the outbox to be empty: every stored event marked published.
pub async fn outbox_empties(db: &TestDb) -> bool {
    eventually(Duration::from_secs(5), || async { outbox_rows(db).await == 0 }).await
}

/// Starts a gateway on `config` (whose database is `db`'s) and asserts that its start-up catch-up publishes
/// each of `ids`, queued in the outbox beforehand, to the `stripe` stream exactly once and empties the
/// outbox. `what` names the backlog in the failure message.
pub async fn start_and_expect_backlog_published(config: Config, db: &TestDb, ids: &[String], what: &str) -> Gateway {
    let key = config.notify.stream_for("stripe");
    let gateway = Gateway::start(config).await;
    assert_published_once(db, &key, ids, what).await;
    gateway
}

/// Asserts that the stream `key` of the test Redis comes to hold each of `ids` exactly once (within 10 s) and
/// that the outbox of `db` empties. `what` names the events in the failure message.
pub async fn assert_published_once(db: &TestDb, key: &str, ids: &[String], what: &str) {
    let redis = redis_url();
    assert!(
        eventually(Duration::from_secs(10), || async { stream_ids(&redis, key).await.len() == ids.len() }).await,
        "the {what} reach their stream"
    );
    let stream = stream_ids(&redis, key).await;
    assert!(ids.iter().all(|id| stream.get(id) == Some(&1)), "each event of the {what} once");
    assert!(outbox_empties(db).await, "the {what} leave the outbox");
}

/// Stores `stripe` events and leaves them unpublished, as a crash between commit and publish does: one
/// outbox row per batch (its ids in order), queued a minute ago, past any test's grace. One statement.
pub async fn queue_unpublished(db: &TestDb, batches: &[&[String]]) {
    let ids: Vec<&String> = batches.iter().flat_map(|b| b.iter()).collect();
    let batch_of: Vec<i32> = batches
        .iter()
        .enumerate()
        .flat_map(|(i, b)| std::iter::repeat_n(i32::try_from(i).expect("batch count"), b.len()))
        .collect();
    let bodies: Vec<Vec<u8>> = ids.iter().map(|id| stripe_event(id).into_bytes()).collect();
    sqlx::query(
        "WITH input AS (SELECT * FROM unnest($1::text[], $2::int4[], $3::bytea[]) WITH ORDINALITY AS b(id, batch, body, n)), \
         e AS (INSERT INTO events (source, event_id, event_type, body) \
               SELECT 'stripe', id, 'charge.succeeded', body FROM input ORDER BY n RETURNING seq, source, event_id) \
         INSERT INTO events_outbox (sources, event_ids, queued_at) \
           SELECT array_agg(e.source ORDER BY e.seq), array_agg(e.event_id ORDER BY e.seq), now() - interval '1 minute' \
           FROM e JOIN input ON input.id = e.event_id GROUP BY input.batch ORDER BY input.batch",
    )
    .bind(&ids)
    .bind(&batch_of)
    .bind(&bodies)
    .execute(&db.pool)
    .await
    .expect("queue unpublished events");
}
