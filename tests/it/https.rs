//! HTTPS on the webhook port: signed events over TLS with HTTP/1.1 and HTTP/2 (ALPN), clients that do not
//! speak TLS or do not trust the certificate refused (and counted, unlike health checks that send nothing),
//! and a renewed certificate served without a restart while a broken one is kept out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::process::{config_file, hookgate, GatewayProcess};
use crate::proxy_protocol::v1_header;
use crate::support::*;
use crate::tls::TestCertificates;

/// A TLS client that trusts only `ca_file` and offers `alpn`.
fn tls_connector(ca_file: &str, alpn: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).expect("CA file") {
        roots.add(cert.expect("CA certificate")).expect("CA added");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Connects over TLS to `addr` as `localhost`; returns the stream or the handshake's error, in words.
async fn connect(
    addr: SocketAddr,
    ca_file: &str,
    alpn: &[u8],
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").expect("server name");
    tls_connector(ca_file, alpn).connect(name, tcp).await.map_err(|e| e.to_string())
}

/// A signed Stripe event as a request for an HTTPS connection; returns it with its id.
fn stripe_request(prefix: &str) -> (String, http::Request<Full<bytes::Bytes>>) {
    let id = unique(prefix);
    let body = stripe_event(&id);
    let mut request = http::Request::post("https://localhost/webhooks/stripe");
    for (name, value) in stripe_headers(body.as_bytes()) {
        request = request.header(name, value);
    }
    let request = request.header("content-type", "application/json").body(Full::new(body.into())).expect("request");
    (id, request)
}

/// An HTTP/1.1 connection over TLS, trusting `ca_file`, kept open for several requests.
async fn http1_over_tls(addr: SocketAddr, ca_file: &str) -> Result<Http1Sender, String> {
    Ok(http1_on(connect(addr, ca_file, b"http/1.1").await?).await)
}

fn tls_config(certificates: &TestCertificates) -> hookgate::config::TlsConfig {
    hookgate::config::TlsConfig {
        cert_file: certificates.dir.join("server.crt"),
        key_file: certificates.dir.join("server.key"),
    }
}

#[tokio::test]
async fn signed_events_over_https_are_stored_with_http1_and_h2_and_plain_or_untrusting_clients_are_refused() {
    let certificates = TestCertificates::generate();
    let stranger = TestCertificates::generate();
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    config.server.tls = Some(tls_config(&certificates));
    config.server.header_read_timeout_ms = 500;
    let gateway = Gateway::start(config).await;
    let ca = certificates.file("ca.crt");

    let mut http1 = http1_over_tls(gateway.addr, &ca).await.expect("HTTP/1.1 over TLS");
    let (id, answer) = post_signed_on(&mut http1, "stripe", &[]).await;
    assert_eq!(answer.status, 202);
    assert!(db.body_of("stripe", &id).await.is_some(), "the event sent over HTTP/1.1 and TLS is stored");

    let stream = connect(gateway.addr, &ca, b"h2").await.expect("h2 over TLS");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN settles on h2");
    let (mut h2, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.expect("h2");
    tokio::spawn(connection);
    let (id, request) = stripe_request("evt_https2");
    let response = h2.send_request(request).await.expect("h2 response");
    assert_eq!(response.status(), 202);
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert!(db.body_of("stripe", &id).await.is_some(), "the event sent over h2 and TLS is stored");

    // A client that does not trust the certificate stops at the handshake, and sends nothing.
    let refused = connect(gateway.addr, &stranger.file("ca.crt"), b"http/1.1").await.map(|_| ());
    let reason = refused.expect_err("an untrusting client cannot connect");
    assert!(reason.contains("UnknownIssuer"), "{reason}");

    // Plain HTTP on the HTTPS port: no answer, the connection closed, the handshake failure counted.
    let body = stripe_event(&unique("evt_plain"));
    let plain = client()
        .request(
            stripe_headers(body.as_bytes())
                .into_iter()
                .fold(http::Request::post(format!("http://{}/webhooks/stripe", gateway.addr)), |r, (k, v)| {
                    r.header(k, v)
                })
                .body(Full::new(bytes::Bytes::from(body)))
                .expect("request"),
        )
        .await;
    assert!(plain.is_err(), "plain HTTP gets no answer from the HTTPS port: {plain:?}");
    let metrics_url = format!("http://{}/metrics", gateway.admin);
    let failures = scrape_metric(&metrics_url, "hookgate_tls_handshake_failures_total").await.unwrap_or(0.0);
    assert!(failures >= 1.0, "the refused handshakes are counted ({failures})");
    // A client that connects and never starts its handshake is closed at the header-read bound.
    let mut silent = TcpStream::connect(gateway.addr).await.expect("connect");
    let mut buffer = [0_u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buffer)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "a silent client is closed within the bound: {read:?}");
    assert_eq!(db.count().await, 2, "only the two events sent over TLS are stored");
    gateway.stop().await;
}

#[tokio::test]
async fn a_renewed_certificate_is_served_after_sighup_without_dropping_connections_and_a_broken_pair_is_kept_out() {
    let old = TestCertificates::generate_expiring(2031);
    let renewed = TestCertificates::generate_expiring(2032);
    let live = TestCertificates::generate_expiring(2031);
    for file in ["server.crt", "server.key"] {
        std::fs::copy(old.dir.join(file), live.dir.join(file)).expect("old pair in place");
    }
    let db = TestDb::create().await;
    let (port, admin_port) = (free_port(), free_port());
    let config = config_file(&db.url, port, admin_port);
    let (cert_file, key_file) = (live.file("server.crt"), live.file("server.key"));
    let env = [
        ("HOOKGATE__SERVER__TLS__CERT_FILE", cert_file.as_str()),
        ("HOOKGATE__SERVER__TLS__KEY_FILE", key_file.as_str()),
        // Only SIGHUP makes it look again within this test.
        ("HOOKGATE__RELOAD__INTERVAL_S", "3600"),
    ];
    let gateway = GatewayProcess::start_with(&config, port, admin_port, &env, None).await;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    // A health check that holds its connection open without a byte, until the handshake bound closes it.
    let mut silent = TcpStream::connect(addr).await.expect("silent client");
    let metrics_url = gateway.metrics_url();
    let not_after = "hookgate_tls_certificate_not_after_timestamp_seconds";
    assert_eq!(
        scrape_metric(&metrics_url, not_after).await,
        Some(old.not_after_unix as f64),
        "the expiry of the certificate in use"
    );

    // A load balancer's TCP health check connects and goes without a byte, or is closed at the bound
    // without one: no failed handshake. A client that sends something other than TLS is one.
    for _ in 0..3 {
        drop(TcpStream::connect(addr).await.expect("health check"));
    }
    let mut not_tls = TcpStream::connect(addr).await.expect("connect");
    not_tls.write_all(b"\0\0\0\0\0").await.expect("write");
    // (after, perhaps, a TLS alert)
    let closed = tokio::time::timeout(Duration::from_secs(5), not_tls.read_to_end(&mut Vec::new())).await;
    assert!(closed.is_ok(), "a client that does not speak TLS is closed");
    let closed = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut Vec::new())).await;
    assert!(closed.is_ok(), "a silent client is closed at the bound");
    let all_closed = || async { scrape_metric(&metrics_url, "hookgate_http_connections_open").await == Some(0.0) };
    assert!(eventually(Duration::from_secs(5), all_closed).await, "every probe's connection is done");
    let failures = scrape_metric(&metrics_url, "hookgate_tls_handshake_failures_total").await;
    assert_eq!(failures, Some(1.0), "only the client that sent something counts as a failed handshake");

    let mut kept_open = http1_over_tls(addr, &old.file("ca.crt")).await.expect("a client of the old certificate");
    assert_eq!(post_signed_on(&mut kept_open, "stripe", &[]).await.1.status, 202);
    let scraped = &metrics_url;
    let reloads = |result: &'static str| async move {
        let series = format!("hookgate_tls_certificate_reloads_total{{result=\"{result}\"}}");
        scrape_metric(scraped, &series).await.unwrap_or(0.0)
    };

    // Half a renewal: the new key beside the old certificate. It does not load, and the old pair stays.
    std::fs::copy(renewed.dir.join("server.key"), live.dir.join("server.key")).expect("new key");
    gateway.signal("HUP");
    assert!(eventually(Duration::from_secs(10), || async { reloads("failed").await >= 1.0 }).await, "failure counted");
    let mut fresh = http1_over_tls(addr, &old.file("ca.crt")).await.expect("the old certificate is still served");
    assert_eq!(post_signed_on(&mut fresh, "stripe", &[]).await.1.status, 202);

    // The whole renewal: now served to new connections, while the connection opened before goes on.
    std::fs::copy(renewed.dir.join("server.crt"), live.dir.join("server.crt")).expect("new certificate");
    gateway.signal("HUP");
    assert!(eventually(Duration::from_secs(10), || async { reloads("replaced").await >= 1.0 }).await, "reloaded");
    assert_eq!(
        scrape_metric(&metrics_url, not_after).await,
        Some(renewed.not_after_unix as f64),
        "the renewed expiry is exported"
    );
    let mut renewed_client = http1_over_tls(addr, &renewed.file("ca.crt")).await.expect("the renewed certificate");
    let (id, answer) = post_signed_on(&mut renewed_client, "stripe", &[]).await;
    assert_eq!(answer.status, 202);
    assert!(db.body_of("stripe", &id).await.is_some());
    let stale = http1_over_tls(addr, &old.file("ca.crt")).await.map(|_| ());
    assert!(stale.expect_err("the old certificate is no longer served").contains("UnknownIssuer"));
    let (id, answer) = post_signed_on(&mut kept_open, "stripe", &[]).await;
    assert_eq!(answer.status, 202, "a connection opened before the renewal is served on");
    assert!(db.body_of("stripe", &id).await.is_some());
    assert_eq!(db.count().await, 4);
    drop(gateway);
}

#[test]
fn check_config_names_a_key_that_does_not_fit_its_certificate() {
    let first = TestCertificates::generate_expiring(2031);
    let second = TestCertificates::generate_expiring(2031);
    let check = |key_file: &str| {
        hookgate()
            .arg("check-config")
            .env("HOOKGATE__SERVER__TLS__CERT_FILE", first.file("server.crt"))
            .env("HOOKGATE__SERVER__TLS__KEY_FILE", key_file)
            .output()
            .expect("check-config runs")
    };
    let good = check(&first.file("server.crt").replace("server.crt", "server.key"));
    let stdout = String::from_utf8_lossy(&good.stdout);
    assert!(good.status.success(), "{}", String::from_utf8_lossy(&good.stderr));
    assert!(stdout.contains("the certificate expires 2031-01-01T00:00:00Z"), "{stdout}");

    let bad = check(&second.file("server.key"));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(stderr.contains("does not fit the certificate"), "{stderr}");
    let missing = check("/nonexistent/server.key");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read key file /nonexistent/server.key"));
}

#[tokio::test]
async fn behind_a_tls_passthrough_balancer_the_proxy_header_comes_before_the_handshake_and_names_the_client() {
    let certificates = TestCertificates::generate();
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    config.server.tls = Some(tls_config(&certificates));
    config.server.proxy_protocol = true;
    let source = unique("passthrough");
    add_listed_source(&mut config, &source, &["192.0.2.0/24"]);
    let gateway = Gateway::start(config).await;
    let ca = certificates.file("ca.crt");

    let mut stored = std::collections::HashSet::new();
    for (client, want) in [("192.0.2.7:5000", 202), ("198.51.100.1:5000", 403)] {
        let mut tcp = TcpStream::connect(gateway.addr).await.expect("connect");
        tcp.write_all(&v1_header(client)).await.expect("PROXY header");
        let name = ServerName::try_from("localhost").expect("server name");
        let tls = tls_connector(&ca, b"http/1.1").connect(name, tcp).await.expect("the handshake after the header");
        let (id, answer) = post_signed_on(&mut http1_on(tls).await, &source, &[]).await;
        assert_eq!(answer.status, want, "{client}: {answer:?}");
        if want == 202 {
            stored.insert(id);
        }
    }
    assert_eq!(db.stored_ids().await, stored, "only the listed client's event is stored");
    gateway.stop().await;
}
