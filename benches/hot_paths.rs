//! Criterion benches of the request hot path's pure parts: signature verification, event parsing, the
//! client's address behind trusted proxies, and (once per connection) a PROXY protocol header.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use hookgate::address::{AddressRange, TrustedProxies, FORWARDED_FOR};
use hookgate::event;
use hookgate::http::proxy_protocol;
use hookgate::signature::{Scheme, Verifier};
use http::{HeaderMap, HeaderValue};

/// A Stripe event padded to about `size` bytes, with the padding inside `data` as a real event would be.
fn stripe_body(size: usize) -> Vec<u8> {
    let head = r#"{"id":"evt_1NG8Du2eZvKYlo2CUI79vXWy","object":"event","api_version":"2026-07-29.dahlia","created":1700000000,"livemode":false,"type":"payment_intent.succeeded","data":{"object":{"id":"pi_3","object":"payment_intent","description":""#;
    let tail = r#""}}}"#;
    let pad = size.saturating_sub(head.len() + tail.len());
    format!("{head}{}{tail}", "x".repeat(pad)).into_bytes()
}

fn benches(c: &mut Criterion) {
    let verifier = Verifier::new(Scheme::Stripe, &["whsec_bench_secret"], 300).expect("verifier");
    let rotated = Verifier::new(Scheme::Stripe, &["whsec_new_secret", "whsec_bench_secret"], 300).expect("verifier");
    let mut group = c.benchmark_group("stripe");
    for size in [1024usize, 64 * 1024] {
        let body = stripe_body(size);
        let mut headers = HeaderMap::new();
        for (k, v) in verifier.sign(&body, 1_700_000_000, "") {
            headers.insert(k, HeaderValue::from_str(&v).expect("header"));
        }
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::new("verify", size), &body, |b, body| {
            b.iter(|| verifier.verify(&headers, body, 1_700_000_010).expect("valid"));
        });
        group.bench_with_input(BenchmarkId::new("verify_rotated_second_secret", size), &body, |b, body| {
            b.iter(|| rotated.verify(&headers, body, 1_700_000_010).expect("valid"));
        });
        group.bench_with_input(BenchmarkId::new("parse", size), &body, |b, body| {
            b.iter(|| event::parse(Scheme::Stripe, &headers, body).expect("event"));
        });
    }
    group.finish();

    // The cost of `server.trusted_proxies` per request: none configured (the header is not read), and a
    // client behind two proxy tiers (three X-Forwarded-For entries to walk).
    let ranges = |list: &[&str]| list.iter().map(|r| r.parse::<AddressRange>().expect("range")).collect::<Vec<_>>();
    let none = TrustedProxies::default();
    let two_tiers = TrustedProxies::new(ranges(&["10.0.0.0/8", "172.16.0.0/12"]));
    let mut headers = HeaderMap::new();
    headers.insert(FORWARDED_FOR, HeaderValue::from_static("192.0.2.1, 203.0.113.7, 172.16.4.4"));
    let peer = "10.0.0.2".parse().expect("peer");
    let mut group = c.benchmark_group("address");
    group.bench_function("client/no_trusted_proxies", |b| b.iter(|| none.client(peer, &headers)));
    group.bench_function("client/behind_two_proxy_tiers", |b| b.iter(|| two_tiers.client(peer, &headers)));
    // With `server.proxy_protocol`, once per connection: the header as AWS NLB (v2, with its endpoint TLV)
    // and nginx (v1) send it, followed by the start of a request.
    let v1 = b"PROXY TCP4 203.0.113.7 10.0.0.5 51234 443\r\nPOST /webhooks/stripe HTTP/1.1\r\n".to_vec();
    let client: std::net::SocketAddr = "203.0.113.7:51234".parse().expect("client");
    let server: std::net::SocketAddr = "10.0.0.5:443".parse().expect("server");
    let mut v2 = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (client, server),
    )
    .write_tlv(0xEA, b"\x01vpce-0123456789abcdef")
    .and_then(ppp::v2::Builder::build)
    .expect("v2 header");
    v2.extend_from_slice(b"\x16\x03\x01\x02\x00");
    group.bench_function("proxy_header/v1", |b| b.iter(|| proxy_protocol::parse(&v1)));
    group.bench_function("proxy_header/v2", |b| b.iter(|| proxy_protocol::parse(&v2)));
    group.finish();
}

criterion_group!(hot_paths, benches);
criterion_main!(hot_paths);
