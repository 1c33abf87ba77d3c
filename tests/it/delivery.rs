//! Accepted, duplicate, concurrent and h2c deliveries: every event stored once, with its exact bytes.

use hookgate::config::AckMode;
use hookgate::signature::Scheme;

use crate::support::*;

#[tokio::test]
async fn accepted_then_duplicate_and_exact_body_stored() {
    let db = TestDb::create().await;
    let gateway = Gateway::start(test_config(&db.url)).await;
    let client = client();
    let id = unique("evt");
    // Whitespace and key order that a re-serialiser would change: the stored bytes must be these.
    let body = format!(
        "{{ \"object\": \"event\",\n  \"id\": \"{id}\", \"type\": \"charge.succeeded\", \"note\": \"Zoë 😀\" }}"
    );
    let headers = stripe_headers(body.as_bytes());

    let first = post(&client, &gateway.url("stripe"), &headers, body.as_bytes()).await;
    assert_eq!(first.status, 202, "{first:?}");
    assert_eq!(first.json["status"], "accepted");
    assert_eq!(first.json["id"], id.as_str());
    assert_eq!(db.body_of("stripe", &id).await.as_deref(), Some(body.as_bytes()));

    let again = post(&client, &gateway.url("stripe"), &headers, body.as_bytes()).await;
    assert_eq!(again.status, 202, "{again:?}");
    assert_eq!(again.json["status"], "duplicate");
    assert_eq!(db.count().await, 1);
    gateway.stop().await;
}

/// A Stripe event destination of thin events (API v2) signs with the same scheme; its events are stored and
/// published like snapshot ones, the RFC 3339 `created` in seconds and the `context` as the account.
#[tokio::test]
async fn a_stripe_thin_event_is_stored_and_published_with_its_time_and_account() {
    use sqlx::Row;
    let db = TestDb::create().await;
    let config = test_config(&db.url);
    let key = config.notify.stream_for("stripe");
    let gateway = Gateway::start(config).await;
    let id = unique("evt_thin");
    let body = format!(
        r#"{{"id":"{id}","object":"v2.core.event","type":"v2.core.account.updated","livemode":false,"created":"2026-11-28T09:15:30.123Z","context":"acct_1Thin","related_object":{{"id":"acct_1Thin","type":"v2.core.account","url":"/v2/core/accounts/acct_1Thin"}},"reason":null}}"#
    );
    let answer = post(&client(), &gateway.url("stripe"), &stripe_headers(body.as_bytes()), body.as_bytes()).await;
    assert_eq!(answer.status, 202, "{answer:?}");
    assert_eq!(answer.json["status"], "accepted");
    let row =
        sqlx::query("SELECT event_type, created, livemode, api_version, account, body FROM events WHERE event_id = $1")
            .bind(&id)
            .fetch_one(&db.pool)
            .await
            .expect("the thin event is stored");
    assert_eq!(row.get::<String, _>(0), "v2.core.account.updated");
    assert_eq!(row.get::<Option<i64>, _>(1), Some(1_795_857_330), "2026-11-28T09:15:30Z");
    assert_eq!(row.get::<Option<bool>, _>(2), Some(false));
    assert_eq!(row.get::<Option<String>, _>(3), None);
    assert_eq!(row.get::<Option<String>, _>(4).as_deref(), Some("acct_1Thin"));
    assert_eq!(row.get::<Vec<u8>, _>(5), body.as_bytes());
    let redis = redis_url();
    assert!(
        eventually(std::time::Duration::from_secs(5), || async { read_stream(&redis, &key).await.len() == 1 }).await
    );
    let entry = read_stream(&redis, &key).await.remove(0);
    assert_eq!(entry["id"], id.as_bytes());
    assert_eq!(entry["created"], b"1795857330");
    // Any other `object` is still not an event.
    let charge = format!(r#"{{"id":"{id}_ch","object":"charge","type":"x"}}"#);
    let refused = post(&client(), &gateway.url("stripe"), &stripe_headers(charge.as_bytes()), charge.as_bytes()).await;
    assert_eq!(refused.status, 400, "{refused:?}");
    assert!(refused.json["message"].as_str().is_some_and(|d| d.contains("v2.core.event")), "{refused:?}");
    gateway.stop().await;
}

#[tokio::test]
async fn fifty_concurrent_deliveries_of_one_event_store_one_row() {
    let db = TestDb::create().await;
    let gateway = Gateway::start(test_config(&db.url)).await;
    let id = unique("evt");
    let body = stripe_event(&id);
    let headers = stripe_headers(body.as_bytes());
    let url = gateway.url("stripe");
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (url, headers, body) = (url.clone(), headers.clone(), body.clone());
        // A client of its own: a connection of its own.
        tasks.push(tokio::spawn(async move { post(&client(), &url, &headers, body.as_bytes()).await }));
    }
    let mut accepted = 0;
    for task in tasks {
        let answer = task.await.expect("task");
        assert_eq!(answer.status, 202, "{answer:?}");
        if answer.json["status"] == "accepted" {
            accepted += 1;
        } else {
            assert_eq!(answer.json["status"], "duplicate");
        }
    }
    assert_eq!(accepted, 1, "exactly one delivery is the one that stored the event");
    assert_eq!(db.count().await, 1);
    gateway.stop().await;
}

#[tokio::test]
async fn standard_and_github_sources_are_stored() {
    let db = TestDb::create().await;
    let gateway = Gateway::start(test_config(&db.url)).await;
    let client = client();

    let msg_id = unique("msg");
    let body = br#"{"type":"invoice.paid","timestamp":"2026-11-26T12:00:00Z","data":{"amount":5}}"#;
    let headers = sign(Scheme::Standard, STANDARD_SECRET, body, &msg_id, now());
    let answer = post(&client, &gateway.url("standard"), &headers, body).await;
    assert_eq!((answer.status, answer.json["status"].as_str()), (202, Some("accepted")), "{answer:?}");
    assert_eq!(db.body_of("standard", &msg_id).await.as_deref(), Some(&body[..]));

    let delivery = unique("gh");
    let body = br#"{"zen":"Keep it logically awesome.","hook_id":1}"#;
    let mut headers = sign(Scheme::Github, GITHUB_SECRET, body, "", now());
    headers.push(("X-GitHub-Delivery".into(), delivery.clone()));
    headers.push(("X-GitHub-Event".into(), "ping".into()));
    let answer = post(&client, &gateway.url("github"), &headers, body).await;
    assert_eq!(answer.status, 202, "{answer:?}");
    let event_type: String = sqlx::query_scalar("SELECT event_type FROM events WHERE event_id = $1")
        .bind(&delivery)
        .fetch_one(&db.pool)
        .await
        .expect("row");
    assert_eq!(event_type, "ping");
    gateway.stop().await;
}

#[tokio::test]
async fn h2c_on_the_webhook_port() {
    let db = TestDb::create().await;
    let gateway = Gateway::start(test_config(&db.url)).await;
    let client = h2c_client();
    let ids: Vec<String> = (0..20).map(|_| unique("evt_h2")).collect();
    // Many streams at once over one HTTP/2 connection.
    let mut set = tokio::task::JoinSet::new();
    for id in ids {
        let (client, url) = (client.clone(), gateway.url("stripe"));
        set.spawn(async move {
            let body = stripe_event(&id);
            post(&client, &url, &stripe_headers(body.as_bytes()), body.as_bytes()).await
        });
    }
    while let Some(answer) = set.join_next().await {
        let answer = answer.expect("task");
        assert_eq!(answer.version, http::Version::HTTP_2);
        assert_eq!(answer.status, 202, "{answer:?}");
    }
    assert_eq!(db.count().await, 20);
    gateway.stop().await;
}

#[tokio::test]
async fn enqueue_mode_answers_queued_and_still_stores() {
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    config.queue.ack_mode = AckMode::Enqueue;
    let gateway = Gateway::start(config).await;
    let client = client();
    let id = unique("evt");
    let answer = post_stripe(&client, &gateway, &id).await;
    assert_eq!((answer.status, answer.json["status"].as_str()), (202, Some("queued")), "{answer:?}");
    // Shutdown drains the queue, so the event is stored once the gateway has stopped.
    gateway.stop().await;
    assert!(db.body_of("stripe", &id).await.is_some());
}

/// Group commit (`linger_until_idle`): a batch is written as soon as no other batch is being written, so
/// with a 30 s linger a lone event, and then 100 events sent at once (collected while the batch before
/// them is written, and written when it finishes), are all acknowledged long before any linger ends.
#[tokio::test]
async fn with_linger_until_idle_no_batch_waits_out_the_linger() {
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    config.workers.batch_linger_ms = 30_000;
    config.workers.linger_until_idle = Some(true);
    config.server.request_timeout_ms = 60_000;
    let gateway = Gateway::start(config).await;
    let url = gateway.url("stripe");
    let well_before_the_linger = std::time::Duration::from_secs(10);

    let lone = tokio::time::timeout(well_before_the_linger, post_stripe_with(&client(), &url, &unique("evt"))).await;
    assert_eq!(lone.expect("the lone event is written at once").status, 202);

    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let url = url.clone();
        senders.spawn(async move { post_stripe_with(&client(), &url, &unique("evt")).await.status });
    }
    let statuses = tokio::time::timeout(well_before_the_linger, senders.join_all()).await;
    let statuses = statuses.expect("every batch is written when the one before it finishes");
    assert!(statuses.iter().all(|s| *s == 202), "{statuses:?}");
    assert_eq!(db.count().await, 101);
    gateway.stop().await;
}
