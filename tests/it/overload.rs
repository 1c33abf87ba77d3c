//! A paused store and a tiny queue: the gateway refuses with 503 + Retry-After, and every 202 is stored.

use std::time::Duration;

use sqlx::Connection as _;

use crate::support::*;

#[tokio::test]
async fn full_queue_answers_503_and_every_202_is_stored_once_the_store_resumes() {
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    config.queue.capacity = 4;
    config.workers.count = 1;
    config.workers.batch_max = 2;
    config.store.pool_max = 3;
    config.server.request_timeout_ms = 20_000;
    config.queue.retry_after_s = 7;
    let gateway = Gateway::start(config).await;
    // One delivery first, so the table exists and the worker's connection is warm.
    assert_eq!(post_stripe(&client(), &gateway, &unique("warm")).await.status, 202);

    // Pause the store: hold an exclusive lock on the table in an open transaction.
    let mut locker = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    let mut tx = locker.begin().await.expect("begin");
    sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE").execute(&mut *tx).await.expect("lock");

    let mut set = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let url = gateway.url("stripe");
        set.spawn(async move {
            let id = unique("evt");
            let body = stripe_event(&id);
            (id.clone(), post(&client(), &url, &stripe_headers(body.as_bytes()), body.as_bytes()).await)
        });
    }
    // Give every request time to reach the queue (or be refused), then resume the store.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    tx.rollback().await.expect("unlock");

    let (mut acknowledged, mut refused) = (Vec::new(), 0);
    while let Some(result) = set.join_next().await {
        let (id, answer) = result.expect("task");
        match answer.status {
            202 => acknowledged.push(id),
            503 => {
                refused += 1;
                assert_eq!(answer.headers["retry-after"], "7");
                assert_eq!(answer.kind(), "queue_full", "{answer:?}");
            }
            other => panic!("unexpected status {other}: {answer:?}"),
        }
    }
    assert!(refused > 0, "a 4-slot queue behind a locked table must refuse some of 40 requests");
    assert!(!acknowledged.is_empty(), "the queued requests complete once the lock is released");
    let stored = db.stored_ids().await;
    for id in &acknowledged {
        assert!(stored.contains(id), "acknowledged {id} is not stored");
    }
    gateway.stop().await;
}

#[tokio::test]
async fn a_store_slower_than_the_request_deadline_answers_503_and_the_retry_is_a_duplicate() {
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    config.server.request_timeout_ms = 500;
    let gateway = Gateway::start(config).await;
    let client = client();
    assert_eq!(post_stripe(&client, &gateway, &unique("warm")).await.status, 202);

    let mut locker = sqlx::PgConnection::connect(&db.url).await.expect("connect");
    let mut tx = locker.begin().await.expect("begin");
    sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE").execute(&mut *tx).await.expect("lock");
    let id = unique("evt");
    let body = stripe_event(&id);
    let headers = stripe_headers(body.as_bytes());
    let answer = post(&client, &gateway.url("stripe"), &headers, body.as_bytes()).await;
    assert_eq!((answer.status, answer.kind()), (503, "store_timeout"), "{answer:?}");
    assert!(answer.headers.contains_key("retry-after"));
    tx.rollback().await.expect("unlock");

    // The event was still written once the lock went away; the sender's retry is told it is a duplicate.
    assert!(eventually(Duration::from_secs(5), || async { db.body_of("stripe", &id).await.is_some() }).await);
    let retry = post(&client, &gateway.url("stripe"), &headers, body.as_bytes()).await;
    assert_eq!((retry.status, retry.json["status"].as_str()), (202, Some("duplicate")));
    gateway.stop().await;
}
