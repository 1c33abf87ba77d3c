//! `server.proxy_protocol`: the client named by the PROXY header a layer-4 balancer sends first is what a
//! source's `allowed_ips` judges, for every request of the connection; a connection without one is closed,
//! counted and warned about, while a balancer's silent health checks are not; with
//! `server.proxy_protocol_from`, so is one from outside the listed balancers, whatever header it sends.

use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::Full;
use ppp::v2;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::process::{json_log_lines_with, start_logging_json};
use crate::support::*;

pub fn v1_header(client: &str) -> Vec<u8> {
    let client: SocketAddr = client.parse().expect("client address");
    let family = if client.is_ipv4() { "TCP4" } else { "TCP6" };
    let server = if client.is_ipv4() { "10.0.0.5" } else { "2001:db8::1" };
    format!("PROXY {family} {} {server} {} 443\r\n", client.ip(), client.port()).into_bytes()
}

pub fn v2_header(command: v2::Command, client: &str) -> Vec<u8> {
    let client: SocketAddr = client.parse().expect("client address");
    let server: SocketAddr = if client.is_ipv4() { "10.0.0.5:443" } else { "[2001:db8::1]:443" }.parse().expect("a");
    v2::Builder::with_addresses(v2::Version::Two | command, v2::Protocol::Stream, (client, server))
        // AWS NLB's VPC endpoint id, as it sends it: a TLV to skip.
        .write_tlv(0xEA, b"\x01vpce-0123456789abcdef")
        .expect("tlv")
        .build()
        .expect("v2 header")
}

/// Connects to `addr`, sends `header`, and opens an HTTP/1.1 connection after it.
pub async fn through_balancer(addr: SocketAddr, header: &[u8]) -> Http1Sender {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(header).await.expect("PROXY header");
    http1_on(stream).await
}

#[tokio::test]
async fn the_client_a_proxy_header_names_is_judged_for_every_request_of_its_connection() {
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    config.server.proxy_protocol = true;
    // A layer-7 proxy of ours behind the balancer (its X-Forwarded-For is believed), not the balancer itself.
    config.server.trusted_proxies = vec!["10.0.0.0/8".parse().expect("range")];
    let source = unique("pp");
    add_listed_source(&mut config, &source, &["192.0.2.0/24", "2001:db8::/32"]);
    let gateway = Gateway::start(config).await;
    let mut accepted = std::collections::HashSet::new();

    // v1, two requests on one connection: the header comes once and names the client of both.
    let mut sender = through_balancer(gateway.addr, &v1_header("192.0.2.7:51234")).await;
    for _ in 0..2 {
        let (id, answer) = post_signed_on(&mut sender, &source, &[]).await;
        assert_eq!((answer.status, answer.json["status"].as_str()), (202, Some("accepted")), "{answer:?}");
        accepted.insert(id);
    }
    // v2 over IPv6, past a TLV.
    let mut sender = through_balancer(gateway.addr, &v2_header(v2::Command::Proxy, "[2001:db8::7]:4000")).await;
    let (id, answer) = post_signed_on(&mut sender, &source, &[]).await;
    assert_eq!(answer.status, 202, "{answer:?}");
    accepted.insert(id);
    // A client outside the list, named by the header (the TCP peer, 127.0.0.1, is the balancer).
    let mut sender = through_balancer(gateway.addr, &v2_header(v2::Command::Proxy, "198.51.100.1:4000")).await;
    let (_, answer) = post_signed_on(&mut sender, &source, &[]).await;
    assert_eq!((answer.status, answer.kind()), (403, "forbidden_address"), "{answer:?}");
    assert!(answer.json["message"].as_str().unwrap_or_default().contains("198.51.100.1"), "{answer:?}");
    // The balancer's own connection (v2 LOCAL): the TCP peer stays the client.
    let mut sender = through_balancer(gateway.addr, &v2_header(v2::Command::Local, "192.0.2.7:1")).await;
    let (_, answer) = post_signed_on(&mut sender, &source, &[]).await;
    assert_eq!(answer.status, 403, "{answer:?}");
    assert!(answer.json["message"].as_str().unwrap_or_default().contains("127.0.0.1"), "{answer:?}");
    // A header that arrives in two writes is waited for.
    let header = v1_header("192.0.2.8:6000");
    let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
    stream.write_all(&header[..20]).await.expect("first part");
    tokio::time::sleep(Duration::from_millis(30)).await;
    stream.write_all(&header[20..]).await.expect("second part");
    let (id, answer) = post_signed_on(&mut http1_on(stream).await, &source, &[]).await;
    assert_eq!(answer.status, 202, "{answer:?}");
    accepted.insert(id);
    // The header names a trusted proxy: its X-Forwarded-For then names the client.
    let mut sender = through_balancer(gateway.addr, &v1_header("10.1.2.3:7000")).await;
    let (id, answer) = post_signed_on(&mut sender, &source, &[("x-forwarded-for", "192.0.2.9")]).await;
    assert_eq!(answer.status, 202, "{answer:?}");
    accepted.insert(id);
    let (_, answer) = post_signed_on(&mut sender, &source, &[("x-forwarded-for", "198.51.100.2")]).await;
    assert_eq!(answer.status, 403, "{answer:?}");

    // Without a header, the connection is closed before any request is read.
    let mut direct = http1_on(TcpStream::connect(gateway.addr).await.expect("connect")).await;
    let request = http::Request::post(format!("/webhooks/{source}")).body(Full::default()).expect("request");
    let answer = direct.send_request(request).await;
    assert!(answer.is_err(), "no answer without a PROXY header: {answer:?}");

    assert_eq!(db.stored_ids().await, accepted, "every event from a listed client, and only those, is stored");
    gateway.stop().await;
}

/// Writes `bytes` on a new connection and waits for the gateway to close it; true when it did so without
/// answering a byte.
pub async fn closed_without_answer(addr: SocketAddr, bytes: &[u8]) -> bool {
    closed_without_answer_from(std::net::Ipv4Addr::LOCALHOST, addr, bytes).await
}

/// As [`closed_without_answer`], from a client bound to `client` (any address of the loopback range).
async fn closed_without_answer_from(client: std::net::Ipv4Addr, addr: SocketAddr, bytes: &[u8]) -> bool {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::from((client, 0))).expect("bind the client's address");
    let mut stream = socket.connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    matches!(read, Ok(Ok(0) | Err(_)))
}

#[tokio::test]
async fn connections_without_a_proxy_header_or_from_outside_the_balancers_are_closed_counted_and_warned_about() {
    let db = TestDb::create().await;
    let env = [
        ("HOOKGATE__SERVER__PROXY_PROTOCOL", "true"),
        ("HOOKGATE__SERVER__HEADER_READ_TIMEOUT_MS", "500"),
        // The balancer is 127.0.0.1; the rest of the loopback range reaches the port around it.
        ("HOOKGATE__SERVER__PROXY_PROTOCOL_FROM", r#"["127.0.0.1"]"#),
    ];
    let (gateway, log) = start_logging_json(&db.url, "proxy", &env).await;
    let addr: SocketAddr = format!("127.0.0.1:{}", gateway.port).parse().expect("addr");
    let metrics_url = gateway.metrics_url();
    let failures = |reason: &str| format!(r#"hookgate_proxy_header_failures_total{{reason="{reason}"}}"#);
    assert_eq!(scrape_metric(&metrics_url, &failures("invalid")).await, Some(0.0), "exported before the first");
    assert_eq!(scrape_metric(&metrics_url, &failures("untrusted_peer")).await, Some(0.0), "exported before the first");

    // A sender (or a balancer not set to send the header) reaching the port directly: closed, unanswered.
    let body = stripe_event(&unique("evt"));
    let mut plain = b"POST /webhooks/stripe HTTP/1.1\r\nhost: hookgate\r\n".to_vec();
    for (name, value) in stripe_headers(body.as_bytes()) {
        plain.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    plain.extend_from_slice(format!("content-length: {}\r\n\r\n{body}", body.len()).as_bytes());
    for _ in 0..3 {
        assert!(closed_without_answer(addr, &plain).await, "plain HTTP is closed without an answer");
    }
    assert!(closed_without_answer(addr, &[0x16, 0x03, 0x01, 0x00, 0x05]).await, "so is a TLS handshake");
    // Health checks that connect and go, or hold the connection without a byte until the bound: not failures.
    for _ in 0..2 {
        drop(TcpStream::connect(addr).await.expect("health check"));
    }
    assert!(closed_without_answer(addr, b"").await, "a silent connection is closed at the bound");
    // A header started and never finished: closed at the bound.
    assert!(closed_without_answer(addr, b"PROXY TCP4 192.0.2.7").await, "a half header is closed at the bound");

    // A well-formed header naming a listed client, from around the balancer: closed before it is read.
    let mut spoofed = v1_header("192.0.2.7:51234");
    spoofed.extend_from_slice(&plain);
    for _ in 0..2 {
        let around = std::net::Ipv4Addr::new(127, 0, 0, 2);
        assert!(closed_without_answer_from(around, addr, &spoofed).await, "a header from outside is not believed");
    }

    let all_closed = || async { scrape_metric(&metrics_url, "hookgate_http_connections_open").await == Some(0.0) };
    assert!(eventually(Duration::from_secs(5), all_closed).await, "every connection is done");
    assert_eq!(scrape_metric(&metrics_url, &failures("invalid")).await, Some(4.0));
    assert_eq!(scrape_metric(&metrics_url, &failures("timed_out")).await, Some(1.0));
    assert_eq!(scrape_metric(&metrics_url, &failures("untrusted_peer")).await, Some(2.0));

    // The port still serves clients that come through the balancer.
    let mut sender = through_balancer(addr, &v1_header("192.0.2.7:51234")).await;
    let (id, answer) = post_signed_on(&mut sender, "stripe", &[]).await;
    assert_eq!(answer.status, 202, "{answer:?}");
    drop(sender);
    drop(gateway);

    let (text, warnings) = json_log_lines_with(&log, "PROXY protocol header");
    let warnings: Vec<_> = warnings.into_iter().filter(|line| line["level"] == "WARN").collect();
    assert_eq!(warnings.len(), 1, "four refusals within a minute: one warning\n{text}");
    let reason = warnings[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("plain HTTP and no PROXY protocol header"), "{text}");
    assert!(warnings[0]["peer"].as_str().unwrap_or_default().starts_with("127.0.0.1:"), "{text}");
    let (text, warnings) = json_log_lines_with(&log, "server.proxy_protocol_from");
    let warnings: Vec<_> = warnings.into_iter().filter(|line| line["level"] == "WARN").collect();
    assert_eq!(warnings.len(), 1, "two connections from outside the balancers: one warning\n{text}");
    assert!(warnings[0]["peer"].as_str().unwrap_or_default().starts_with("127.0.0.2:"), "{text}");
    assert_eq!(db.stored_ids().await, [id].into(), "only the event that came through the balancer is stored");
    let _ = std::fs::remove_file(log);
}
