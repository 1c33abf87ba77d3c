//! Retention against real Postgres: what a run deletes and keeps, the outbox holding the cutoff back, the
//! lock between replicas, gateways pruning on their interval (one, and two sharing a database), and
//! `hookgate prune`.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use hookgate::config::RetentionConfig;
use hookgate::retention::{Outcome, Retention};
use hookgate::store::{Store, PRUNE_LOCK_KEY};
use tokio_util::sync::CancellationToken;

use crate::process::{config_file, config_file_with_streams, hookgate, GatewayProcess};
use crate::support::*;

fn retention_config(batch_rows: u32) -> RetentionConfig {
    RetentionConfig { keep_days: 7, interval_s: 1, batch_rows, batch_pause_ms: 0 }
}

/// A migrated test database and a `Retention` keeping 7 days over it.
async fn retention_on(batch_rows: u32) -> (TestDb, Retention) {
    let db = TestDb::create().await;
    let store = Store::new(&test_config(&db.url).store, true).expect("store");
    store.migrate().await.expect("migrate");
    (db, Retention::new(store, retention_config(batch_rows)))
}

/// Stores `ids` for `source`, all received `age` ago in one statement (so they share one receive time).
async fn store_aged(db: &TestDb, source: &str, ids: &[&str], age: &str) {
    sqlx::query(
        "INSERT INTO events (source, event_id, event_type, body, received_at) \
         SELECT $1, id, 'charge.succeeded', '{}', now() - $3::interval FROM unnest($2::text[]) AS id",
    )
    .bind(source)
    .bind(ids)
    .bind(age)
    .execute(&db.pool)
    .await
    .expect("store aged events");
}

async fn stored_keys(db: &TestDb) -> HashSet<(String, String)> {
    sqlx::query_as("SELECT source, event_id FROM events").fetch_all(&db.pool).await.expect("keys").into_iter().collect()
}

fn keys(source: &str, ids: &[&str]) -> HashSet<(String, String)> {
    ids.iter().map(|id| (source.to_owned(), (*id).to_owned())).collect()
}

#[tokio::test]
async fn a_run_deletes_every_sources_events_past_the_retention_in_batches_and_keeps_the_rest() {
    let (db, retention) = retention_on(3).await;
    // Seven events sharing one receive time: batches of 3 split them, and the next batch must find the rest.
    let tied = ["t1", "t2", "t3", "t4", "t5", "t6", "t7"];
    store_aged(&db, "stripe", &tied, "10 days").await;
    store_aged(&db, "stripe", &["e1", "e2"], "7 days 1 hour").await;
    store_aged(&db, "stripe", &["k1", "k2"], "6 days 23 hours").await;
    store_aged(&db, "stripe", &["n1"], "1 second").await;
    store_aged(&db, "github", &["g1", "g2", "g3"], "30 days").await;
    store_aged(&db, "standard", &["s1"], "1 hour").await;
    // A source no longer configured is pruned too.
    store_aged(&db, "legacy", &["l1", "l2"], "400 days").await;

    let (cutoff, counts) = retention.count().await.expect("count");
    assert_eq!(cutoff.held_back_by_us, None);
    let expected: BTreeMap<String, i64> =
        [("github", 3), ("legacy", 2), ("standard", 0), ("stripe", 9)].map(|(s, n)| (s.to_owned(), n)).into();
    assert_eq!(counts, expected, "the dry run counts what the run deletes");
    assert_eq!(db.count().await, 18, "counting deletes nothing");

    let report = retention.run_once(&CancellationToken::new()).await.expect("run");
    assert_eq!(report.outcome, Outcome::Completed);
    let deleted: BTreeMap<String, u64> =
        [("github", 3), ("legacy", 2), ("stripe", 9)].map(|(s, n)| (s.to_owned(), n)).into();
    assert_eq!(report.deleted, deleted);
    let kept: HashSet<_> = keys("stripe", &["k1", "k2", "n1"]).union(&keys("standard", &["s1"])).cloned().collect();
    assert_eq!(stored_keys(&db).await, kept, "only events younger than 7 days are left");

    let again = retention.run_once(&CancellationToken::new()).await.expect("second run");
    assert_eq!((again.outcome, again.total()), (Outcome::Completed, 0), "a second run finds nothing");
}

#[tokio::test]
async fn the_outboxs_oldest_batch_holds_the_cutoff_back_until_it_is_published() {
    let (db, retention) = retention_on(100).await;
    store_aged(&db, "stripe", &["published_before"], "20 days").await;
    store_aged(&db, "stripe", &["unpublished"], "15 days").await;
    store_aged(&db, "stripe", &["published_after"], "10 days").await;
    // Redis has been down since: the batch of `unpublished` is still queued, as the insert queued it.
    sqlx::query(
        "INSERT INTO events_outbox (sources, event_ids, queued_at) \
         SELECT ARRAY[source], ARRAY[event_id], received_at FROM events WHERE event_id = 'unpublished'",
    )
    .execute(&db.pool)
    .await
    .expect("queue");

    let report = retention.run_once(&CancellationToken::new()).await.expect("run");
    assert_eq!((report.outcome, report.total()), (Outcome::Completed, 1));
    assert!(report.cutoff.held_back_by_us.is_some(), "the report says the outbox held it back");
    assert_eq!(
        stored_keys(&db).await,
        keys("stripe", &["unpublished", "published_after"]),
        "nothing received since the queued batch is deleted, though it is past the retention"
    );

    sqlx::query("DELETE FROM events_outbox").execute(&db.pool).await.expect("publish");
    let report = retention.run_once(&CancellationToken::new()).await.expect("run after publishing");
    assert_eq!((report.total(), report.cutoff.held_back_by_us), (2, None));
    assert_eq!(db.count().await, 0);
}

#[tokio::test]
async fn a_run_steps_aside_while_another_replica_holds_the_pruning_lock_and_stops_when_told() {
    let (db, retention) = retention_on(100).await;
    store_aged(&db, "stripe", &["a", "b"], "8 days").await;

    let mut other_replica = db.pool.acquire().await.expect("connection");
    sqlx::query("SELECT pg_advisory_lock($1)").bind(PRUNE_LOCK_KEY).execute(&mut *other_replica).await.expect("lock");
    let report = retention.run_once(&CancellationToken::new()).await.expect("run");
    assert_eq!((report.outcome, report.total()), (Outcome::Skipped, 0));
    assert_eq!(db.count().await, 2, "nothing is deleted under another replica's lock");
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(PRUNE_LOCK_KEY)
        .execute(&mut *other_replica)
        .await
        .expect("unlock");

    let stopped = CancellationToken::new();
    stopped.cancel();
    let report = retention.run_once(&stopped).await.expect("stopped run");
    assert_eq!((report.outcome, report.total()), (Outcome::Interrupted, 0));
    assert_eq!(db.count().await, 2, "a stopped run deletes nothing more");

    let report = retention.run_once(&CancellationToken::new()).await.expect("run after unlock");
    assert_eq!((report.outcome, report.total()), (Outcome::Completed, 2));
}

/// A gateway with retention on prunes by itself (its first run comes after one interval, here 1 s) while
/// it serves: the old events go, what it has just acknowledged stays.
#[tokio::test]
async fn a_gateway_with_retention_on_prunes_on_its_interval_while_serving() {
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    config.retention = retention_config(2);
    let gateway = Gateway::start(config).await;
    let client = client();
    assert_eq!(post_stripe(&client, &gateway, "evt_fresh").await.status, 202);
    store_aged(&db, "stripe", &["old1", "old2", "old3"], "9 days").await;
    assert!(
        eventually(Duration::from_secs(10), || async { db.count().await == 1 }).await,
        "the old events are deleted within a few intervals"
    );
    assert_eq!(stored_keys(&db).await, keys("stripe", &["evt_fresh"]));
    let metrics = get_text(&client, &format!("http://{}/metrics", gateway.admin)).await.1;
    assert!(metric_value(&metrics, "hookgate_retention_runs_total{result=\"completed\"}") >= 1.0, "{metrics}");
    gateway.stop().await;
}

/// Two gateway processes on one database, both pruning every second in batches of 50: each old event is
/// deleted once (the replicas' counts add up to exactly the events), none fails, the young stay.
#[tokio::test]
async fn two_replicas_prune_one_database_together_and_delete_each_event_once() {
    let (db, _) = retention_on(100).await;
    let old: Vec<String> = (0..2_000).map(|i| format!("evt_old_{i}")).collect();
    store_aged(&db, "stripe", &old.iter().map(String::as_str).collect::<Vec<_>>(), "8 days").await;
    store_aged(&db, "stripe", &["evt_young"], "6 days").await;
    let env = [
        ("HOOKGATE__RETENTION__KEEP_DAYS", "7"),
        ("HOOKGATE__RETENTION__INTERVAL_S", "1"),
        ("HOOKGATE__RETENTION__BATCH_ROWS", "50"),
        ("HOOKGATE__RETENTION__BATCH_PAUSE_MS", "0"),
    ];
    let stream = format!("{}:{{source}}", unique("hg-it-prune"));
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let (port, admin_port) = (free_port(), free_port());
        let config = config_file_with_streams(&db.url, port, admin_port, &stream);
        replicas.push((GatewayProcess::start_with(&config, port, admin_port, &env, None).await, config));
    }
    assert!(
        eventually(Duration::from_secs(20), || async { db.count().await == 1 }).await,
        "the replicas delete the old events"
    );
    assert_eq!(stored_keys(&db).await, keys("stripe", &["evt_young"]));
    // Summed over the replicas (a replica counts a batch just after its commit, so the sum may lag the rows).
    let sum = |series: &'static str| {
        let urls: Vec<String> = replicas.iter().map(|(replica, _)| replica.metrics_url()).collect();
        async move {
            let mut total = 0.0;
            for url in urls {
                total += scrape_metric(&url, series).await.unwrap_or(f64::NAN);
            }
            total
        }
    };
    let deleted = "hookgate_retention_deleted_events_total{source=\"stripe\"}";
    assert!(
        eventually(Duration::from_secs(5), || async { (sum(deleted).await - 2_000.0).abs() < f64::EPSILON }).await,
        "each event counted as deleted once: {}",
        sum(deleted).await
    );
    assert!(sum("hookgate_retention_runs_total{result=\"failed\"}").await.abs() < f64::EPSILON, "no run failed");
    for (replica, config) in replicas {
        drop(replica);
        let _ = std::fs::remove_file(config);
    }
}

#[tokio::test]
async fn hookgate_prune_counts_then_deletes_and_refuses_a_short_retention() {
    let (db, _) = retention_on(100).await;
    store_aged(&db, "stripe", &["old1", "old2"], "31 days").await;
    store_aged(&db, "stripe", &["recent"], "29 days").await;
    let config = config_file(&db.url, free_port(), free_port());
    let prune = |args: &[&str]| {
        let mut command = hookgate();
        command.args(["--config", config.to_str().expect("path"), "prune"]).args(args);
        command.output().expect("run hookgate prune")
    };

    let out = prune(&[]);
    assert!(!out.status.success(), "retention is off in the file and no --keep-days is given");
    assert!(String::from_utf8_lossy(&out.stderr).contains("retention.keep_days"), "{out:?}");
    let out = prune(&["--keep-days", "3"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 7"), "{out:?}");

    let out = prune(&["--keep-days", "30", "--dry-run"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.starts_with("2 events received before "), "{out:?}");
    assert_eq!(db.count().await, 3, "a dry run deletes nothing");

    let out = prune(&["--keep-days", "30"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("2 events received before") && stdout.contains("stripe: 2"),
        "{out:?}"
    );
    assert_eq!(stored_keys(&db).await, keys("stripe", &["recent"]));
    let _ = std::fs::remove_file(config);
}
