//! Every failure class gets its status code and JSON kind, and nothing is stored.

use std::io::{Read as _, Write as _};

use crate::process::{json_log_lines_with, start_logging_json};
use crate::support::*;

/// (what, headers, body, expected status, expected kind)
type Case<'a> = (&'a str, Vec<(String, String)>, Vec<u8>, u16, &'a str);

#[tokio::test]
async fn each_failure_class_has_its_status_and_kind_and_stores_nothing() {
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    config.sources.get_mut("stripe").expect("stripe").max_body_bytes = 4096;
    let gateway = Gateway::start(config).await;
    let client = client();
    let url = gateway.url("stripe");
    let body = stripe_event(&unique("evt"));
    let valid = stripe_headers(body.as_bytes());
    let sig = |v: &str| vec![("Stripe-Signature".to_owned(), v.to_owned())];
    // Well outside the 300 s tolerance both ways (the exact boundary is covered by the vector tests with a
    // fixed clock; here a slow machine must not carry a request back inside the window).
    let ts = now();

    let cases: Vec<Case> = vec![
        ("no header", vec![], body.clone().into_bytes(), 401, "missing_header"),
        ("malformed", sig("i'm not a header"), body.clone().into_bytes(), 401, "malformed_header"),
        ("no v1", sig(&format!("t={ts},v0=abcd")), body.clone().into_bytes(), 401, "no_signatures"),
        ("bad sig", sig(&format!("t={ts},v1={}", "0".repeat(64))), body.clone().into_bytes(), 401, "bad_signature"),
        ("tampered body", valid.clone(), body.replace("2000", "9999").into_bytes(), 401, "bad_signature"),
        (
            "replayed after tolerance",
            sign(hookgate::signature::Scheme::Stripe, STRIPE_SECRET, body.as_bytes(), "", ts - 400),
            body.clone().into_bytes(),
            401,
            "timestamp_outside_tolerance",
        ),
        (
            "from the future",
            sign(hookgate::signature::Scheme::Stripe, STRIPE_SECRET, body.as_bytes(), "", ts + 400),
            body.clone().into_bytes(),
            401,
            "timestamp_outside_tolerance",
        ),
    ];
    for (name, headers, payload, status, kind) in cases {
        let answer = post(&client, &url, &headers, &payload).await;
        assert_eq!((answer.status, answer.kind()), (status, kind), "{name}: {answer:?}");
        let text = answer.json.to_string();
        assert!(!text.contains(STRIPE_SECRET) && !text.contains("it_stripe"), "{name}: secret in body {text}");
    }

    // Signed correctly, but not an event.
    for (name, payload) in [
        ("not json", "hello".to_owned()),
        ("no id", r#"{"object":"event","type":"x"}"#.to_owned()),
        ("not an event", format!(r#"{{"id":"{}","object":"charge","type":"x"}}"#, unique("ch"))),
        ("duplicate id key", r#"{"id":"a","id":"b","object":"event","type":"x"}"#.to_owned()),
    ] {
        let answer = post(&client, &url, &stripe_headers(payload.as_bytes()), payload.as_bytes()).await;
        assert_eq!((answer.status, answer.kind()), (400, "invalid_event"), "{name}: {answer:?}");
    }

    let answer = post(&client, &gateway.url("paypal"), &valid, body.as_bytes()).await;
    assert_eq!((answer.status, answer.kind()), (404, "unknown_source"));
    let answer = post(&client, &format!("http://{}/other", gateway.addr), &valid, body.as_bytes()).await;
    assert_eq!(answer.status, 404);
    let answer = post(&client, &format!("http://{}/webhooks/..%2Fstripe", gateway.addr), &valid, body.as_bytes()).await;
    assert_eq!(answer.status, 404);
    let answer = send(&client, "GET", &url, &[], Vec::new()).await;
    assert_eq!((answer.status, answer.kind()), (405, "method_not_allowed"));
    assert_eq!(answer.headers["allow"], "POST");

    let big = vec![b'x'; 5000];
    let answer = post(&client, &url, &stripe_headers(&big), &big).await;
    assert_eq!((answer.status, answer.kind()), (413, "payload_too_large"));

    assert_eq!(db.count().await, 0, "refused requests store nothing");
    gateway.stop().await;
}

/// A chunked body (no Content-Length) past the limit is refused while it streams, and one that declares a
/// huge Content-Length is refused before a byte of it is read.
#[tokio::test]
async fn oversized_bodies_are_refused_without_reading_them() {
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    config.sources.get_mut("stripe").expect("stripe").max_body_bytes = 1024;
    let gateway = Gateway::start(config).await;
    let addr = gateway.addr;
    let status = tokio::task::spawn_blocking(move || {
        let mut results = Vec::new();
        // Declared length far past the limit, and no body sent at all: the answer must still come.
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
        write!(s, "POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\n").expect("write");
        results.push(read_status(&mut s));
        // Chunked, 2 KiB in chunks of 256 bytes.
        let mut s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
        write!(s, "POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").expect("write");
        for _ in 0..8 {
            let _ = write!(s, "100\r\n{}\r\n", "y".repeat(256));
        }
        results.push(read_status(&mut s));
        results
    })
    .await
    .expect("blocking");
    assert_eq!(status, vec![413, 413]);
    assert_eq!(db.count().await, 0);
    gateway.stop().await;
}

fn read_status(stream: &mut std::net::TcpStream) -> u16 {
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf).expect("read status line");
    let line = String::from_utf8_lossy(&buf[..n]);
    line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// A correctly signed body that is not an event: only the sender holds the secret, so this is its real
/// traffic in a form the gateway does not take. It is counted by reason, and warned about once a minute.
#[tokio::test]
async fn signed_requests_that_are_not_events_are_counted_by_reason_and_warned_about_once() {
    let db = TestDb::create().await;
    let (gateway, log) = start_logging_json(&db.url, "invalid", &[]).await;
    let client = client();
    let url = gateway.url("stripe");
    let long_value = "o".repeat(300);
    for payload in [
        // First, so that its reason is the one warned about: serde quotes the whole value.
        format!(r#"{{"id":"{}","object":"event","type":"x","livemode":"{long_value}"}}"#, unique("evt")),
        format!(r#"{{"id":"{}","object":"charge","type":"x"}}"#, unique("evt")),
        "hello".to_owned(),
        r#"{"object":"event","type":"x"}"#.to_owned(),
    ] {
        let answer = post(&client, &url, &stripe_headers(payload.as_bytes()), payload.as_bytes()).await;
        assert_eq!((answer.status, answer.kind()), (400, "invalid_event"), "{answer:?}");
    }
    // Unsigned, it is a signature failure, not the sender's traffic.
    assert_eq!(post(&client, &url, &[], b"hello").await.status, 401);
    assert_eq!(post_stripe_with(&client, &url, &unique("evt")).await.status, 202);
    let series = |reason: &str| format!(r#"hookgate_invalid_events_total{{source="stripe",reason="{reason}"}}"#);
    for (reason, count) in [("not_an_event", 1.0), ("not_json", 2.0), ("missing_field", 1.0), ("too_deep", 0.0)] {
        assert_eq!(scrape_metric(&gateway.metrics_url(), &series(reason)).await, Some(count), "{reason}");
    }
    drop(gateway);

    let (text, warnings) = json_log_lines_with(&log, "not an event hookgate takes");
    assert_eq!(warnings.len(), 1, "four refusals within a minute, one warning: {text}");
    assert_eq!((&warnings[0]["level"], &warnings[0]["kind"]), (&"WARN".into(), &"not_json".into()), "{text}");
    // The reason names the field's problem and quotes the value, cut short.
    let reason = warnings[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("ooooo") && reason.ends_with('…') && reason.len() < 210, "{reason}");
    let _ = std::fs::remove_file(log);
}
