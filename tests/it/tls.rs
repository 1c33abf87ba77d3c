//! Postgres and Redis over TLS (a private CA made per test) and Redis over a Unix socket: events are
//! stored and published through them, and a certificate the gateway cannot trust is refused by name.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::admin::private_postgres_with;
use crate::process::{config_file_with_streams, GatewayProcess};
use crate::support::*;

/// A CA of the test's own and a server certificate it signed for `localhost` and `127.0.0.1`, as PEM
/// files `ca.crt`, `server.crt` and `server.key` in a fresh directory.
pub struct TestCertificates {
    pub dir: PathBuf,
    /// The server certificate's `notAfter`, in unix seconds.
    pub not_after_unix: i64,
}

impl TestCertificates {
    pub fn generate() -> Self {
        Self::generate_expiring(4096)
    }

    /// As `generate`, with a server certificate that expires on the first of January of `year`.
    pub fn generate_expiring(year: i32) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let dir = std::env::temp_dir().join(unique("hookgate-it-tls"));
        std::fs::create_dir_all(&dir).expect("certificate dir");
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A name of its own: a client trusting another test CA then finds no issuer, rather than a bad signature.
        ca_params.distinguished_name.push(DnType::CommonName, unique("hookgate test CA"));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
        let server_key = KeyPair::generate().expect("server key");
        let mut server_params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).expect("server params");
        server_params.distinguished_name.push(DnType::CommonName, "localhost");
        server_params.not_after = rcgen::date_time_ymd(year, 1, 1);
        let not_after_unix = server_params.not_after.unix_timestamp();
        let server = server_params.signed_by(&server_key, &ca, &ca_key).expect("server certificate");
        std::fs::write(dir.join("ca.crt"), ca.pem()).expect("ca.crt");
        std::fs::write(dir.join("server.crt"), server.pem()).expect("server.crt");
        std::fs::write(dir.join("server.key"), server_key.serialize_pem()).expect("server.key");
        Self { dir, not_after_unix }
    }

    pub fn file(&self, name: &str) -> String {
        self.dir.join(name).to_str().expect("utf-8 path").to_owned()
    }
}

impl Drop for TestCertificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn db_name(db: &TestDb) -> &str {
    db.url.rsplit('/').next().expect("a database name")
}

/// Posts one signed Stripe event and returns its id, after checking the 202.
async fn post_one(url: &str) -> String {
    let id = unique("evt_tls");
    let body = stripe_event(&id);
    let answer = post(&client(), url, &stripe_headers(body.as_bytes()), body.as_bytes()).await;
    assert_eq!(answer.status, 202, "{:?}", answer.json);
    id
}

#[tokio::test]
async fn postgres_over_verified_tls_stores_events_and_an_unknown_ca_is_refused() {
    let certificates = TestCertificates::generate();
    let dir = std::env::temp_dir().join(unique("hookgate-it-pg-tls"));
    let port = free_port();
    let tls_dir = certificates.dir.to_str().expect("utf-8 path");
    private_postgres_with("start-postgres", &dir, port, &[("HOOKGATE_PG_TLS_DIR", tls_dir)]);
    let db = TestDb::create_on(&format!("postgres://postgres@127.0.0.1:{port}/postgres")).await;
    let database = with_database(&format!("postgres://postgres@localhost:{port}/postgres"), db_name(&db));
    // verify-full: the server's certificate must chain to the given CA and name the host connected to.
    let tls_url = format!("{database}?sslmode=verify-full&sslrootcert={}", certificates.file("ca.crt"));

    let gateway = Gateway::start(test_config(&tls_url)).await;
    let id = post_one(&gateway.url("stripe")).await;
    assert!(db.body_of("stripe", &id).await.is_some(), "the acknowledged event is stored");
    let (encrypted, sessions): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.application_name = 'hookgate' AND a.datname = current_database()",
    )
    .fetch_one(&db.pool)
    .await
    .expect("pg_stat_ssl");
    assert!(sessions > 0, "the gateway holds connections");
    assert_eq!(encrypted, sessions, "every gateway connection is encrypted");
    gateway.stop().await;

    // The same server, but its CA not given: the system's CA store does not know it.
    let mut config = test_config(&format!("{database}?sslmode=verify-full"));
    config.store.connect_timeout_ms = 5000;
    let store = hookgate::store::Store::new(&config.store, true).expect("store");
    let error = store.migrate().await.expect_err("an untrusted certificate must not connect");
    let error = hookgate::error_chain(&error);
    assert!(error.contains("certificate") && error.contains("UnknownIssuer"), "{error}");
    store.close().await;

    db.pool.close().await;
    private_postgres_with("stop-postgres", &dir, port, &[]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn redis_over_tls_publishes_once_its_ca_is_trusted_and_names_the_certificate_until_then() {
    let certificates = TestCertificates::generate();
    let tls_port = free_port().to_string();
    // Plain TCP on `redis.port` (for the test's own reads) and TLS on `tls_port` (for the gateway).
    let (cert, key, ca) =
        (certificates.file("server.crt"), certificates.file("server.key"), certificates.file("ca.crt"));
    let redis = RedisServer::start_with(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
    ]);
    let db = TestDb::create().await;
    let (port, admin) = (free_port(), free_port());
    let stream = unique("hg-it-tls");
    let config = config_file_with_streams(&db.url, port, admin, &format!("{stream}:{{source}}"));
    let stripe_stream = format!("{stream}:stripe");
    let redis_over_tls = format!("rediss://localhost:{tls_port}");
    let untrusted =
        [("HOOKGATE__NOTIFY__REDIS_URL", redis_over_tls.as_str()), ("HOOKGATE__NOTIFY__CATCHUP_INTERVAL_MS", "200")];
    let trusted: Vec<(&str, &str)> = untrusted.iter().copied().chain([("SSL_CERT_FILE", ca.as_str())]).collect();

    // Untrusted: the event is stored and acknowledged (Redis is not on the ack path), stays in the outbox,
    // and the log says which certificate check failed.
    let log = std::env::temp_dir().join(format!("{}.log", unique("hookgate-it-tls")));
    let gateway = GatewayProcess::start_with(&config, port, admin, &untrusted, Some(&log)).await;
    let first = post_one(&gateway.url("stripe")).await;
    let warned = eventually(Duration::from_secs(10), || async {
        std::fs::read_to_string(&log).unwrap_or_default().contains("UnknownIssuer")
    })
    .await;
    assert!(warned, "the log names the refused certificate:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    assert!(stream_ids(&redis.url(), &stripe_stream).await.is_empty(), "nothing published over untrusted TLS");
    assert_eq!(outbox_rows(&db).await, 1, "the unpublished event waits in the outbox");
    drop(gateway);

    // Trusted through SSL_CERT_FILE: the waiting event and a new one reach the stream, once each.
    let gateway = GatewayProcess::start_with(&config, port, admin, &trusted, Some(&log)).await;
    let second = post_one(&gateway.url("stripe")).await;
    let published = eventually(Duration::from_secs(10), || async {
        let ids = stream_ids(&redis.url(), &stripe_stream).await;
        ids.get(&first) == Some(&1) && ids.get(&second) == Some(&1)
    })
    .await;
    assert!(published, "{:?}", stream_ids(&redis.url(), &stripe_stream).await);
    assert!(outbox_empties(&db).await, "published events leave the outbox");
    drop(gateway);
    let _ = std::fs::remove_file(&log);
}

#[tokio::test]
async fn redis_over_a_unix_socket_publishes_each_event() {
    let socket_dir = std::env::temp_dir().join(unique("hookgate-it-sock"));
    std::fs::create_dir_all(&socket_dir).expect("socket dir");
    let socket = socket_dir.join("redis.sock");
    let socket_path = socket.to_str().expect("utf-8 path");
    let redis = RedisServer::start_with(&["--unixsocket", socket_path, "--unixsocketperm", "700"]);
    assert!(eventually(Duration::from_secs(5), || async { Path::new(socket_path).exists() }).await, "no socket");
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    config.notify.redis_url = format!("unix://{socket_path}");
    let key = config.notify.stream_for("stripe");
    let gateway = Gateway::start(config).await;
    let id = post_one(&gateway.url("stripe")).await;
    let published =
        eventually(Duration::from_secs(5), || async { stream_ids(&redis.url(), &key).await.get(&id) == Some(&1) })
            .await;
    assert!(published, "the event reached its stream over the socket");
    assert!(outbox_empties(&db).await);
    gateway.stop().await;
    drop(redis);
    let _ = std::fs::remove_dir_all(&socket_dir);
}
