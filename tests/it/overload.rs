//! A paused store behind a tiny queue, body memory budget or source share: 503 + Retry-After, and every 202 is
//! stored.

use std::time::Duration;

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

    let pause = pause_store(&db).await;

    let set = deliver_at_once(&gateway.url("stripe"), stripe_events(40));
    // Give every request time to reach the queue (or be refused), then resume the store.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, saturated_by) = readiness(&format!("http://{}/readyz", gateway.admin)).await;
    pause.rollback().await.expect("unlock");

    let (acknowledged, refused) = sort_answers(set, "queue_full", "7").await;
    assert_eq!(saturated_by, ["queue_slots"], "/readyz names the full queue as the cause");
    assert!(refused > 0, "a 4-slot queue behind a locked table must refuse some of 40 requests");
    assert!(!acknowledged.is_empty(), "the queued requests complete once the lock is released");
    assert_all_stored(&db, &acknowledged).await;
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

    let pause = pause_store(&db).await;
    let id = unique("evt");
    let body = stripe_event(&id);
    let headers = stripe_headers(body.as_bytes());
    let answer = post(&client, &gateway.url("stripe"), &headers, body.as_bytes()).await;
    assert_eq!((answer.status, answer.kind()), (503, "store_timeout"), "{answer:?}");
    assert!(answer.headers.contains_key("retry-after"));
    pause.rollback().await.expect("unlock");

    // The event was still written once the lock went away; the sender's retry is told it is a duplicate.
    assert!(eventually(Duration::from_secs(5), || async { db.body_of("stripe", &id).await.is_some() }).await);
    let retry = post(&client, &gateway.url("stripe"), &headers, body.as_bytes()).await;
    assert_eq!((retry.status, retry.json["status"].as_str()), (202, Some("duplicate")));
    gateway.stop().await;
}

#[tokio::test]
async fn bodies_past_the_memory_budget_answer_503_and_every_202_is_stored_once_the_store_resumes() {
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    // The queue's 8,192 slots are not the limit here: the body memory budget is.
    config.queue.body_memory_mb = 1;
    config.server.request_timeout_ms = 20_000;
    let gateway = Gateway::start(config).await;
    assert_eq!(post_stripe(&client(), &gateway, &unique("warm")).await.status, 202);

    let pause = pause_store(&db).await;

    // 60 KB bodies (each read into a buffer of exactly its length): 17 fit in the 1 MiB budget.
    let padding = "x".repeat(60_000);
    let set = deliver_at_once(
        &gateway.url("stripe"),
        (0..40).map(|_| unique("evt_big")).map(|id| {
            let body = format!(r#"{{"id":"{id}","object":"event","type":"invoice.paid","pad":"{padding}"}}"#);
            (id, body)
        }),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ready = format!("http://{}/readyz", gateway.admin);
    let held_while_paused = readiness(&ready).await;
    pause.rollback().await.expect("unlock");

    let (acknowledged, refused) = sort_answers(set, "body_memory_full", "1").await;
    assert!(refused > 0 && !acknowledged.is_empty(), "{} acknowledged, {refused} refused", acknowledged.len());
    let (held, saturated_by) = held_while_paused;
    assert!(held > 0 && held <= 1024 * 1024, "bodies held while the store was paused: {held}");
    assert_eq!(
        saturated_by,
        ["body_memory"],
        "a budget over its high-water mark reports the gateway not ready ({held} bytes held)"
    );
    assert_all_stored(&db, &acknowledged).await;
    // Written and published, every body is given back.
    let released = eventually(Duration::from_secs(10), || async { readiness(&ready).await == (0, vec![]) });
    assert!(released.await, "body memory is not given back once the events are stored");
    let metrics = get_text(&client(), &format!("http://{}/metrics", gateway.admin)).await.1;
    let series = r#"hookgate_queue_rejections_total{reason="body_memory_full"}"#;
    // The recorder is shared by the test binary's gateways; only this test fills a body budget.
    let counted = metric_value(&metrics, series);
    assert!((counted - f64::from(refused)).abs() < 0.5, "{counted} rejections counted, {refused} seen");
    gateway.stop().await;
}

#[tokio::test]
async fn a_source_past_its_max_queued_answers_503_and_the_other_sources_are_still_taken() {
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    config.server.request_timeout_ms = 20_000;
    config.queue.retry_after_s = 3;
    // Two Stripe-signed sources of this test's own names: the test binary's gateways share one metrics recorder.
    let (flood, steady) = (unique("flood"), unique("steady"));
    add_listed_source(&mut config, &flood, &[]);
    add_listed_source(&mut config, &steady, &[]);
    config.sources.get_mut(&flood).expect("flood source").max_queued = 5;
    let gateway = Gateway::start(config).await;
    assert_eq!(post_stripe_with(&client(), &gateway.url(&flood), &unique("warm")).await.status, 202);

    let pause = pause_store(&db).await;
    let flooded = deliver_at_once(&gateway.url(&flood), stripe_events(30));
    let steadied = deliver_at_once(&gateway.url(&steady), stripe_events(10));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let metrics_url = format!("http://{}/metrics", gateway.admin);
    let while_paused = get_text(&client(), &metrics_url).await.1;
    pause.rollback().await.expect("unlock");

    let (flood_acknowledged, flood_refused) = sort_answers(flooded, "source_share_full", "3").await;
    let (steady_acknowledged, steady_refused) = sort_answers(steadied, "source_share_full", "3").await;
    assert_eq!((flood_acknowledged.len(), flood_refused), (5, 25), "the flooding source holds 5 events at most");
    assert_eq!((steady_acknowledged.len(), steady_refused), (10, 0), "the other source is not refused");
    let series = |name: &str, source: &str| {
        Some(metric_value(&while_paused, &format!("{name}{{source=\"{source}\"}}"))).filter(|v| !v.is_nan())
    };
    let held = |source: &str| series("hookgate_source_queued_events", source);
    let refused = |source: &str| series("hookgate_source_share_rejections_total", source);
    assert_eq!((held(&flood), held(&steady)), (Some(5.0), Some(10.0)), "events held while the store was paused");
    assert_eq!((refused(&flood), refused(&steady)), (Some(25.0), Some(0.0)));
    assert_all_stored(&db, &flood_acknowledged).await;
    assert_all_stored(&db, &steady_acknowledged).await;

    // Written, the events give their slots back: the source holds none, and 5 at once are taken again.
    let flood_queued = format!("hookgate_source_queued_events{{source=\"{flood}\"}}");
    let emptied =
        eventually(Duration::from_secs(5), || async { scrape_metric(&metrics_url, &flood_queued).await == Some(0.0) });
    assert!(emptied.await, "the source's slots are not given back once its events are written");
    let (again, refused_again) = sort_answers(deliver_at_once(&gateway.url(&flood), stripe_events(5)), "-", "3").await;
    assert_eq!((again.len(), refused_again), (5, 0));
    gateway.stop().await;
}

/// The body memory a gateway holds, and the limits it reports as saturating it, from its /readyz.
async fn readiness(ready_url: &str) -> (u64, Vec<String>) {
    let (_, text) = get_text(&client(), ready_url).await;
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let saturated_by: Vec<String> = json["saturated_by"].as_array().map_or_else(
        || vec!["<missing>".to_owned()],
        |causes| causes.iter().filter_map(|c| c.as_str().map(str::to_owned)).collect(),
    );
    // "queue" stays the summary that existing checks read.
    assert_eq!(json["queue"] == "saturated", !saturated_by.is_empty(), "{json}");
    (json["body_memory_bytes"].as_u64().unwrap_or(u64::MAX), saturated_by)
}

/// `n` Stripe events of fresh ids, as (id, body).
pub fn stripe_events(n: usize) -> impl Iterator<Item = (String, String)> {
    (0..n).map(|_| unique("evt")).map(|id| {
        let body = stripe_event(&id);
        (id, body)
    })
}

/// Posts every (id, body) at once to `url`, a route of a Stripe-signed source, each signed as it is sent;
/// the answers are for `sort_answers`.
pub fn deliver_at_once(
    url: &str,
    events: impl Iterator<Item = (String, String)>,
) -> tokio::task::JoinSet<(String, Answer)> {
    let mut set = tokio::task::JoinSet::new();
    for (id, body) in events {
        let url = url.to_owned();
        set.spawn(async move {
            let answer = post(&client(), &url, &stripe_headers(body.as_bytes()), body.as_bytes()).await;
            (id, answer)
        });
    }
    set
}

/// Pauses the store: an exclusive lock on the events table, held until the returned transaction ends.
pub async fn pause_store(db: &TestDb) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = db.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE").execute(&mut *tx).await.expect("lock");
    tx
}

/// Waits for every delivery; returns the ids answered 202 and the count of 503s, each of which must be of
/// `kind` with `Retry-After: retry_after`. Any other answer fails the test.
pub async fn sort_answers(
    mut set: tokio::task::JoinSet<(String, Answer)>,
    kind: &str,
    retry_after: &str,
) -> (Vec<String>, u32) {
    let (mut acknowledged, mut refused) = (Vec::new(), 0);
    while let Some(result) = set.join_next().await {
        let (id, answer) = result.expect("task");
        match answer.status {
            202 => acknowledged.push(id),
            503 => {
                refused += 1;
                let header = answer.headers.get("retry-after").and_then(|v| v.to_str().ok());
                assert_eq!(header, Some(retry_after), "{answer:?}");
                assert_eq!(answer.kind(), kind, "{answer:?}");
            }
            other => panic!("unexpected status {other}: {answer:?}"),
        }
    }
    (acknowledged, refused)
}

pub async fn assert_all_stored(db: &TestDb, acknowledged: &[String]) {
    let stored = db.stored_ids().await;
    for id in acknowledged {
        assert!(stored.contains(id), "acknowledged {id} is not stored");
    }
}
