//! A source's `allowed_ips`, and the client's address read from `X-Forwarded-For` only behind trusted proxies.

use std::collections::HashSet;
use std::time::Duration;

use crate::process::{json_log_lines_with, start_logging_json};
use crate::support::*;

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

#[tokio::test]
async fn signed_requests_from_an_unlisted_address_are_warned_about_once_and_counted() {
    let db = TestDb::create().await;
    // The list from the environment, as a Kubernetes Deployment could set it.
    let env = [("HOOKGATE__SOURCES__STRIPE__ALLOWED_IPS", r#"["192.0.2.0/24"]"#)];
    let (gateway, log) = start_logging_json(&db.url, "addresses", &env).await;
    let client = client();
    for _ in 0..3 {
        let answer = post_stripe_with(&client, &gateway.url("stripe"), &unique("evt")).await;
        assert_eq!((answer.status, answer.kind()), (403, "forbidden_address"), "{answer:?}");
    }
    let body = stripe_event(&unique("evt"));
    let unsigned = post(&client, &gateway.url("stripe"), &[], body.as_bytes()).await;
    assert_eq!(unsigned.status, 403, "{unsigned:?}");
    // Other sources have no list.
    assert_eq!(post_stripe_with(&client, &gateway.url("standard"), "x").await.status, 401);
    let series =
        |signature: &str| format!(r#"hookgate_address_refusals_total{{source="stripe",signature="{signature}"}}"#);
    assert_eq!(scrape_metric(&gateway.metrics_url(), &series("valid")).await, Some(3.0));
    assert_eq!(scrape_metric(&gateway.metrics_url(), &series("invalid")).await, Some(1.0));
    assert_eq!(scrape_metric(&gateway.metrics_url(), &series("unread")).await, Some(0.0));
    drop(gateway);

    let (text, warnings) = json_log_lines_with(&log, "not in allowed_ips");
    // Three signed refusals within a minute: one warning, naming the source and the address.
    assert_eq!(warnings.len(), 1, "{text}");
    assert_eq!((&warnings[0]["level"], &warnings[0]["source"]), (&"WARN".into(), &"stripe".into()), "{text}");
    assert_eq!(warnings[0]["client"], "127.0.0.1", "{text}");
    assert_eq!(db.count().await, 0);
    let _ = std::fs::remove_file(log);
}

/// Replaces `path` at once (a rename), as a job that refreshes the list should.
fn write_addresses(path: &std::path::Path, text: &str) {
    let staged = path.with_extension("new");
    std::fs::write(&staged, text).expect("address file");
    std::fs::rename(&staged, path).expect("rename");
}

/// Posts signed events to `url` every 100 ms until one is answered `want` (for up to 10 s); keeps the ids
/// answered 202 in `accepted`.
async fn post_until(client: &HttpClient, url: &str, want: u16, accepted: &mut HashSet<String>) -> bool {
    for _ in 0..100 {
        let id = unique("evt");
        let status = post_stripe_with(client, url, &id).await.status;
        if status == 202 {
            accepted.insert(id);
        }
        if status == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn an_address_file_is_read_again_on_the_reload_interval_and_a_broken_one_keeps_the_list_in_use() {
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    let source = unique("filed");
    add_listed_source(&mut config, &source, &[]);
    let file = std::env::temp_dir().join(unique("hookgate-it-addresses"));
    write_addresses(&file, "# the sender's list\n192.0.2.0/24\n");
    config.sources.get_mut(&source).expect("source").allowed_ips_file = Some(file.clone());
    config.reload.interval_s = 1;
    let gateway = Gateway::start(config).await;
    let (client, url) = (client(), gateway.url(&source));
    let metrics_url = format!("http://{}/metrics", gateway.admin);
    let reloads =
        |result: &str| format!(r#"hookgate_source_address_reloads_total{{source="{source}",result="{result}"}}"#);
    let mut accepted = HashSet::new();
    assert_eq!(post_stripe_with(&client, &url, &unique("evt")).await.status, 403);

    // The sender's new address added: accepted within a few intervals, with no restart or signal.
    write_addresses(&file, "192.0.2.0/24\n127.0.0.1 # added\n");
    assert!(post_until(&client, &url, 202, &mut accepted).await, "the new address is accepted after a reload");
    let counted = eventually(Duration::from_secs(5), || async {
        scrape_metric(&metrics_url, &reloads("replaced")).await == Some(1.0)
    });
    assert!(counted.await, "the changed list is counted as a reload");

    // A file caught empty, or with a line that is not an address: not reloaded, the list in use stays.
    let mut failed = 0.0;
    for broken in ["", "# nothing yet\n", "127.0.0.1\nstripe.com\n"] {
        write_addresses(&file, broken);
        let counted = eventually(Duration::from_secs(10), || async {
            scrape_metric(&metrics_url, &reloads("failed")).await.is_some_and(|n| n > failed)
        })
        .await;
        assert!(counted, "{broken:?} is counted as a failed reload");
        failed = scrape_metric(&metrics_url, &reloads("failed")).await.unwrap_or(failed);
        let id = unique("evt");
        assert_eq!(post_stripe_with(&client, &url, &id).await.status, 202, "after {broken:?} the list in use stays");
        accepted.insert(id);
    }

    // The address removed again: refused within a few intervals.
    write_addresses(&file, "192.0.2.0/24\n");
    assert!(post_until(&client, &url, 403, &mut accepted).await, "a removed address is refused after a reload");
    assert_eq!(db.stored_ids().await, accepted, "every 202 stored, nothing refused");
    gateway.stop().await;
    let _ = std::fs::remove_file(file);
}
