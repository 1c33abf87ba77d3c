//! A source's `allowed_ips`, and the client's address read from `X-Forwarded-For` only behind trusted proxies.

use std::time::Duration;

use hookgate::config::Config;

use crate::support::*;

/// Adds a Stripe source named `name` (the tests' Stripe secret) that accepts only `allowed`.
fn add_listed_source(config: &mut Config, name: &str, allowed: &[&str]) {
    let mut source = config.sources["stripe"].clone();
    source.allowed_ips = allowed.iter().map(|a| a.parse().expect("range")).collect();
    config.sources.insert(name.to_owned(), source);
}

fn with_forwarded_for(mut headers: Vec<(String, String)>, value: &str) -> Vec<(String, String)> {
    headers.push(("X-Forwarded-For".to_owned(), value.to_owned()));
    headers
}

#[tokio::test]
async fn a_source_refuses_unlisted_addresses_with_403_stores_nothing_and_counts_whether_they_were_signed() {
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    // Source names of this test's own: the metrics recorder is shared by every test in this process.
    let (listed_elsewhere, listed_here) = (unique("elsewhere"), unique("here"));
    add_listed_source(&mut config, &listed_elsewhere, &["192.0.2.0/24", "2001:db8::/32"]);
    add_listed_source(&mut config, &listed_here, &["127.0.0.0/8"]);
    let stream_of = |source: &str| config.notify.stream_key.replace("{source}", source);
    let (stream_elsewhere, stream_here) = (stream_of(&listed_elsewhere), stream_of(&listed_here));
    let gateway = Gateway::start(config).await;
    let client = client();
    let metrics_url = format!("http://{}/metrics", gateway.admin);
    let refusals = |signature: &str| {
        format!(r#"hookgate_address_refusals_total{{source="{listed_elsewhere}",signature="{signature}"}}"#)
    };
    // Exported at zero before the first refusal, so an alert on it sees the first one.
    assert_eq!(scrape_metric(&metrics_url, &refusals("valid")).await, Some(0.0));

    let refused_id = unique("evt");
    let answer = post_stripe_with(&client, &gateway.url(&listed_elsewhere), &refused_id).await;
    assert_eq!((answer.status, answer.kind()), (403, "forbidden_address"), "{answer:?}");
    let message = answer.json["message"].as_str().unwrap_or_default();
    assert!(message.contains("127.0.0.1"), "the refusal names the address it judged: {message}");
    let body = stripe_event(&unique("evt"));
    let badly_signed = sign(hookgate::signature::Scheme::Stripe, "whsec_not_it", body.as_bytes(), "", now());
    let answer = post(&client, &gateway.url(&listed_elsewhere), &badly_signed, body.as_bytes()).await;
    assert_eq!((answer.status, answer.kind()), (403, "forbidden_address"), "{answer:?}");
    // Without trusted proxies the header is the client's own word: it changes nothing.
    let body = stripe_event(&unique("evt"));
    let forged = with_forwarded_for(stripe_headers(body.as_bytes()), "192.0.2.7");
    let answer = post(&client, &gateway.url(&listed_elsewhere), &forged, body.as_bytes()).await;
    assert_eq!(answer.status, 403, "{answer:?}");

    assert_eq!(scrape_metric(&metrics_url, &refusals("valid")).await, Some(2.0));
    assert_eq!(scrape_metric(&metrics_url, &refusals("invalid")).await, Some(1.0));
    // A refused address is not a signature failure: the alerts on those stay quiet.
    let signature_failures =
        format!(r#"hookgate_signature_failures_total{{source="{listed_elsewhere}",reason="bad_signature"}}"#);
    assert_eq!(scrape_metric(&metrics_url, &signature_failures).await, Some(0.0));

    // The listed address is served as any source is.
    let accepted_id = unique("evt");
    let answer = post_stripe_with(&client, &gateway.url(&listed_here), &accepted_id).await;
    assert_eq!((answer.status, answer.json["status"].as_str()), (202, Some("accepted")), "{answer:?}");

    assert_eq!(db.stored_ids().await, [accepted_id.clone()].into(), "only the listed address's event is stored");
    let published = eventually(Duration::from_secs(10), || async {
        stream_ids(&redis_url(), &stream_here).await.get(&accepted_id) == Some(&1)
    })
    .await;
    assert!(published, "the accepted event reaches its stream");
    assert!(stream_ids(&redis_url(), &stream_elsewhere).await.is_empty(), "nothing refused is published");
    gateway.stop().await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_right_most_untrusted_forwarded_address_is_judged() {
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    // The test client connects from 127.0.0.1: here it plays the load balancer.
    config.server.trusted_proxies = vec!["127.0.0.1".parse().expect("range")];
    let source = unique("behind");
    add_listed_source(&mut config, &source, &["192.0.2.0/24"]);
    let gateway = Gateway::start(config).await;
    let client = client();
    let url = gateway.url(&source);

    let post_forwarded = |forwarded: &'static str| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let id = unique("evt");
            let body = stripe_event(&id);
            let headers = with_forwarded_for(stripe_headers(body.as_bytes()), forwarded);
            (id, post(&client, &url, &headers, body.as_bytes()).await)
        }
    };
    let (accepted, answer) = post_forwarded("192.0.2.7").await;
    assert_eq!((answer.status, answer.json["status"].as_str()), (202, Some("accepted")), "{answer:?}");
    // Another proxy tier of ours appended its peer: still the client's address that counts.
    let (accepted_through_two, answer) = post_forwarded("192.0.2.8, 127.0.0.1").await;
    assert_eq!(answer.status, 202, "{answer:?}");
    // A client that writes a listed address itself: the balancer appends the address it really came from.
    let (_, answer) = post_forwarded("192.0.2.7, 198.51.100.1").await;
    assert_eq!((answer.status, answer.kind()), (403, "forbidden_address"), "{answer:?}");
    assert!(answer.json["message"].as_str().unwrap_or_default().contains("198.51.100.1"), "{answer:?}");
    // No header from the proxy (its own health check, say): the proxy's address is the client's.
    let body = stripe_event(&unique("evt"));
    let answer = post(&client, &url, &stripe_headers(body.as_bytes()), body.as_bytes()).await;
    assert_eq!(answer.status, 403, "{answer:?}");

    assert_eq!(db.stored_ids().await, [accepted, accepted_through_two].into());
    gateway.stop().await;
}
