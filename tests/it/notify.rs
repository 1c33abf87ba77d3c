//! Redis fan-out: each stored event reaches its stream at least once (in the normal path exactly once),
//! through Redis outages, crashes, and replicas sharing a backlog.

use std::time::Duration;

use hookgate::store::PageLimit;

use crate::support::*;

#[tokio::test]
async fn an_accepted_event_is_on_its_stream_once_and_a_duplicate_adds_nothing() {
    let db = TestDb::create().await;
    let config = test_config(&db.url);
    let key = config.notify.stream_for("stripe");
    let gateway = Gateway::start(config).await;
    let client = client();
    let id = unique("evt");
    let body = stripe_event(&id);
    let headers = stripe_headers(body.as_bytes());
    assert_eq!(post(&client, &gateway.url("stripe"), &headers, body.as_bytes()).await.status, 202);
    let redis = redis_url();
    assert!(eventually(Duration::from_secs(5), || async { read_stream(&redis, &key).await.len() == 1 }).await);

    let entry = &read_stream(&redis, &key).await[0];
    let field = |name: &str| String::from_utf8_lossy(&entry[name]).into_owned();
    assert_eq!(field("id"), id);
    assert_eq!(field("source"), "stripe");
    assert_eq!(field("type"), "payment_intent.succeeded");
    assert_eq!(field("livemode"), "false");
    assert!(field("created").parse::<i64>().is_ok_and(|c| c > 1_700_000_000));
    assert!(field("received_at").parse::<i64>().is_ok_and(|ms| ms > 1_700_000_000_000));
    assert_eq!(entry["body"], body.as_bytes(), "the body on the stream is the exact bytes received");

    let again = post(&client, &gateway.url("stripe"), &headers, body.as_bytes()).await;
    assert_eq!(again.json["status"], "duplicate");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(read_stream(&redis, &key).await.len(), 1, "a duplicate delivery is not notified again");
    assert!(outbox_empties(&db).await, "a published event leaves the outbox");
    gateway.stop().await;
}

#[tokio::test]
async fn a_redis_outage_during_load_loses_no_notification_and_causes_no_5xx() {
    let db = TestDb::create().await;
    let mut redis = RedisServer::start();
    let mut config = test_config(&db.url);
    config.notify.redis_url = redis.url();
    config.notify.catchup_interval_ms = 200;
    config.notify.command_timeout_ms = 500;
    config.notify.catchup_grace_ms = 1000;
    let key = config.notify.stream_for("stripe");
    let gateway = Gateway::start(config).await;
    let url = gateway.url("stripe");

    // 3,000 events from 16 senders, while Redis goes away and comes back.
    let mut senders = tokio::task::JoinSet::new();
    for sender in 0..16 {
        let url = url.clone();
        senders.spawn(async move {
            let client = client();
            let mut acknowledged = Vec::new();
            for i in 0..188 {
                let id = format!("evt_outage_{sender}_{i}_{}", unique("x"));
                let body = stripe_event(&id);
                let answer = post(&client, &url, &stripe_headers(body.as_bytes()), body.as_bytes()).await;
                assert_eq!(answer.status, 202, "Redis is not on the ack path: {answer:?}");
                acknowledged.push(id);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            acknowledged
        });
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    redis.stop();
    let (status, ready) = get_text(&client(), &format!("http://{}/readyz", gateway.admin)).await;
    assert_eq!(status, 200, "Redis down does not make the gateway unready: {ready}");
    // The pending gauge is process-wide, and the other tests' gateways in this process set it at their own
    // scans: watch it through the outage rather than read it once.
    let mut pending_seen = 0.0_f64;
    let down = std::time::Instant::now();
    while down.elapsed() < Duration::from_millis(1500) {
        let metrics = get_text(&client(), &format!("http://{}/metrics", gateway.admin)).await.1;
        pending_seen = pending_seen.max(metric_value(&metrics, "hookgate_notify_pending"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    redis.restart();
    let back = std::time::Instant::now();

    let mut acknowledged = Vec::new();
    while let Some(result) = senders.join_next().await {
        acknowledged.extend(result.expect("sender"));
    }
    assert_eq!(acknowledged.len(), 16 * 188);
    assert!(pending_seen > 0.0, "notifications were pending while Redis was down");
    let redis_url = redis.url();
    let all_there = eventually(Duration::from_secs(20), || async {
        let ids = stream_ids(&redis_url, &key).await;
        acknowledged.iter().all(|id| ids.contains_key(id))
    })
    .await;
    let caught_up = back.elapsed();
    let ids = stream_ids(&redis_url, &key).await;
    let missing = acknowledged.iter().filter(|id| !ids.contains_key(*id)).count();
    assert!(all_there, "{missing} acknowledged events never reached the stream");
    println!(
        "RELIABILITY | Redis killed for 1.5 s under load | {n} | {n} | 0 | every notification on the stream {caught_up:.1?} after Redis restarted; no 5xx | -",
        n = acknowledged.len()
    );
    assert!(outbox_empties(&db).await, "every published event leaves the outbox");
    assert!(
        eventually(Duration::from_secs(5), || async {
            let text = get_text(&client(), &format!("http://{}/metrics", gateway.admin)).await.1;
            metric_value(&text, "hookgate_notify_pending") == 0.0
        })
        .await,
        "pending returns to 0 once the backlog is published, not at the next 30 s safety scan"
    );
    gateway.stop().await;
}

/// README, Deploy: with `maxmemory-policy noeviction` (Redis's default) a full Redis refuses the `XADD`s; the
/// events are acknowledged all the same, wait in the outbox, and reach the stream once Redis has room.
#[tokio::test]
async fn a_full_redis_refuses_the_publish_and_the_events_wait_in_the_outbox_until_it_has_room() {
    let db = TestDb::create().await;
    let redis_server = RedisServer::start_with(&["--maxmemory-policy", "noeviction"]);
    let mut config = test_config(&db.url);
    config.notify.redis_url = redis_server.url();
    config.notify.catchup_interval_ms = 100;
    config.notify.catchup_grace_ms = 500;
    let key = config.notify.stream_for("stripe");
    let gateway = Gateway::start(config).await;
    let client = client();
    assert_eq!(post_stripe(&client, &gateway, &unique("warm")).await.status, 202);

    // Past a `maxmemory` of one byte, every command that adds data is refused with OOM; reads still answer.
    set_redis_maxmemory(&redis_server, 1).await;
    let mut acknowledged = Vec::new();
    for _ in 0..20 {
        let id = unique("evt_oom");
        assert_eq!(post_stripe(&client, &gateway, &id).await.status, 202, "Redis is not on the ack path");
        acknowledged.push(id);
    }
    // Longer than the grace: the catch-up has tried these rows too, and Redis refused them again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let redis = redis_server.url();
    let on_stream = stream_ids(&redis, &key).await;
    assert!(acknowledged.iter().all(|id| !on_stream.contains_key(id)), "a full Redis added entries");
    assert!(outbox_rows(&db).await > 0, "the refused batches wait in the outbox");

    set_redis_maxmemory(&redis_server, 0).await;
    let room = std::time::Instant::now();
    let published = eventually(Duration::from_secs(10), || async {
        let on_stream = stream_ids(&redis, &key).await;
        acknowledged.iter().all(|id| on_stream.contains_key(id))
    });
    assert!(published.await, "the events did not reach the stream once Redis had room");
    let caught_up = room.elapsed();
    let on_stream = stream_ids(&redis, &key).await;
    for id in &acknowledged {
        assert_eq!(on_stream.get(id), Some(&1), "{id} is not on the stream exactly once");
    }
    assert!(outbox_empties(&db).await, "every published batch leaves the outbox");
    println!(
        "RELIABILITY | Redis full (`maxmemory` reached, `noeviction`) for 1.5 s | {n} | {n} | 0 | every `XADD` refused meanwhile, the events kept in the outbox; all on the stream once, {caught_up:.1?} after Redis had room | -",
        n = acknowledged.len()
    );
    gateway.stop().await;
}

/// `CONFIG SET maxmemory` on `server` (0: no limit).
async fn set_redis_maxmemory(server: &RedisServer, bytes: u64) {
    use deadpool_redis::redis;
    let mut redis = redis::Client::open(server.url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let () =
        redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(bytes).query_async(&mut redis).await.expect("maxmemory");
}

#[tokio::test]
async fn events_stored_but_never_published_are_published_after_the_next_start() {
    let db = TestDb::create().await;
    // A first run creates the schema; then rows are written as a crash between commit and publish leaves them.
    let config = test_config(&db.url);
    Gateway::start(config.clone()).await.stop().await;
    // Ten batches of five, each with its outbox row.
    let ids: Vec<String> = (0..50).map(|_| unique("evt_crash")).collect();
    queue_unpublished(&db, &ids.chunks(5).collect::<Vec<_>>()).await;
    start_and_expect_backlog_published(config, &db, &ids, "backlog").await.stop().await;
}

#[tokio::test]
async fn a_redis_stall_shorter_than_the_command_timeout_is_waited_out_and_each_event_published_once() {
    let db = TestDb::create().await;
    let redis_server = RedisServer::start();
    let mut config = test_config(&db.url);
    config.notify.redis_url = redis_server.url();
    config.notify.command_timeout_ms = 5_000;
    // Longer than the stall, so the catch-up leaves the stalled round trip's rows alone unless it failed (then
    // it republishes them 2 s after their commit, though Redis has added them once its pause ended).
    config.notify.catchup_interval_ms = 100;
    config.notify.catchup_grace_ms = 2_000;
    let key = config.notify.stream_for("stripe");
    let gateway = Gateway::start(config).await;
    let client = client();
    assert_eq!(post_stripe(&client, &gateway, &unique("warm")).await.status, 202);

    // Writes held for 1 s, twice the 500 ms after which the Redis client gives up by default.
    pause_redis_writes(&redis_server, 1000).await;
    let mut acknowledged = Vec::new();
    for _ in 0..5 {
        let id = unique("evt_stall");
        assert_eq!(post_stripe(&client, &gateway, &id).await.status, 202);
        acknowledged.push(id);
    }
    let redis = redis_server.url();
    let published = eventually(Duration::from_secs(10), || async {
        let on_stream = stream_ids(&redis, &key).await;
        acknowledged.iter().all(|id| on_stream.contains_key(id))
    });
    assert!(published.await, "the events did not reach the stream after the stall");
    // Long enough for a catch-up to have republished anything counted as failed.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let on_stream = stream_ids(&redis, &key).await;
    for id in &acknowledged {
        assert_eq!(on_stream.get(id), Some(&1), "{id} is not on the stream exactly once");
    }
    gateway.stop().await;
}

/// Holds every write command of `server` for `ms` milliseconds (reads and `PING` still answer).
async fn pause_redis_writes(server: &RedisServer, ms: u64) {
    use deadpool_redis::redis;
    let mut redis = redis::Client::open(server.url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    let () = redis::cmd("CLIENT").arg("PAUSE").arg(ms).arg("WRITE").query_async(&mut redis).await.expect("pause");
}

#[tokio::test]
async fn a_graceful_stop_publishes_the_batches_its_publisher_left_to_the_catch_up() {
    let db = TestDb::create().await;
    let redis_server = RedisServer::start();
    let mut config = test_config(&db.url);
    config.notify.redis_url = redis_server.url();
    // Each event its own batch, a publisher queue of one batch, and a grace this test never reaches: a batch
    // left to the catch-up reaches its stream before the stop ends only if the stop publishes it.
    config.workers.batch_max = 1;
    config.notify.queue_batches = 1;
    config.notify.publish_linger_ms = 0;
    config.notify.catchup_grace_ms = 600_000;
    let key = config.notify.stream_for("stripe");
    let gateway = Gateway::start(config).await;
    let client = client();
    assert_eq!(post_stripe(&client, &gateway, &unique("warm")).await.status, 202);
    let metrics_url = format!("http://{}/metrics", gateway.admin);
    let deferred_before = scrape_metric(&metrics_url, "hookgate_notify_deferred_total").await.unwrap_or(0.0);

    // Redis holds every write for 2 s: the publisher's round trip waits, its queue fills, the rest is deferred.
    pause_redis_writes(&redis_server, 2000).await;
    let mut acknowledged = Vec::new();
    for _ in 0..20 {
        let id = unique("evt_deferred");
        assert_eq!(post_stripe(&client, &gateway, &id).await.status, 202);
        acknowledged.push(id);
    }
    let deferred = scrape_metric(&metrics_url, "hookgate_notify_deferred_total").await.unwrap_or(0.0) - deferred_before;
    assert!(deferred >= 10.0, "only {deferred} of 20 batches were left to the catch-up");
    gateway.stop().await;

    let on_stream = stream_ids(&redis_server.url(), &key).await;
    for id in &acknowledged {
        assert_eq!(on_stream.get(id), Some(&1), "{id} is not on the stream once after the stop");
    }
    assert_eq!(outbox_rows(&db).await, 0, "the stop left batches in the outbox");
}

#[tokio::test]
async fn a_graceful_stop_after_a_redis_outage_publishes_what_failed_during_it() {
    let db = TestDb::create().await;
    let mut redis_server = RedisServer::start();
    let mut config = test_config(&db.url);
    config.notify.redis_url = redis_server.url();
    config.notify.command_timeout_ms = 1_000;
    // Redis is probed every 100 ms, and nothing is old enough for the catch-up before the stop.
    config.notify.catchup_interval_ms = 100;
    config.notify.catchup_grace_ms = 600_000;
    let key = config.notify.stream_for("stripe");
    let gateway = Gateway::start(config).await;
    let client = client();
    assert_eq!(post_stripe(&client, &gateway, &unique("warm")).await.status, 202);
    let metrics_url = format!("http://{}/metrics", gateway.admin);
    let failures_before = scrape_metric(&metrics_url, "hookgate_notify_failures_total").await.unwrap_or(0.0);

    redis_server.stop();
    let mut acknowledged = Vec::new();
    for _ in 0..5 {
        let id = unique("evt_outage");
        assert_eq!(post_stripe(&client, &gateway, &id).await.status, 202, "Redis is not on the ack path");
        acknowledged.push(id);
    }
    // Redis comes back only once a publish has failed: on a busy machine the publisher can otherwise reach
    // these batches after the restart, publish them normally, and the outage tests nothing (seen in CI).
    let failed = eventually(Duration::from_secs(10), || async {
        scrape_metric(&metrics_url, "hookgate_notify_failures_total").await.unwrap_or(0.0) > failures_before
    })
    .await;
    assert!(failed, "no publish failed while Redis was down");
    redis_server.restart();
    // Time for the catch-up's probe to find Redis back (its append-only file kept the stream).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(outbox_rows(&db).await > 0, "the failed batches wait in the outbox before the stop");
    gateway.stop().await;

    let on_stream = stream_ids(&redis_server.url(), &key).await;
    for id in &acknowledged {
        assert_eq!(on_stream.get(id), Some(&1), "{id} is not on the stream once after the stop");
    }
    assert_eq!(outbox_rows(&db).await, 0, "the stop left failed batches in the outbox");
}

/// The start-up check reads how Redis persists: the test's Redis (`appendfsync always`, as the gateway
/// requires) is durable, `everysec`, no append-only file or an `allkeys-*` eviction policy under a memory
/// limit is named as weaker (`noeviction` under the same limit is not), and a Redis that does not answer is
/// unknown. A Redis that refuses `CONFIG` is named weaker from its `INFO` alone (the append-only file off, an
/// `allkeys-*` policy under a limit), and is unknown otherwise.
#[tokio::test]
async fn the_start_up_check_tells_a_durable_redis_from_one_that_can_lose_entries() {
    use hookgate::notify::RedisPersistence::{Durable, Unknown, Weaker};
    let config = test_config(&admin_database_url());
    let store = hookgate::store::Store::new(&config.store, true).expect("store");
    let persistence = |redis_url: String| {
        let mut notify = config.notify.clone();
        notify.redis_url = redis_url;
        let notifier = hookgate::notify::Notifier::new(&notify, store.clone()).expect("notifier");
        async move { notifier.redis_persistence().await }
    };
    let durable = RedisServer::start();
    assert_eq!(persistence(durable.url()).await, Durable);
    let everysec = RedisServer::start_with(&["--appendfsync", "everysec"]);
    assert_eq!(persistence(everysec.url()).await, Weaker("appendonly yes, appendfsync everysec".into()));
    let no_aof = RedisServer::start_with(&["--appendonly", "no"]);
    assert_eq!(persistence(no_aof.url()).await, Weaker("appendonly no, appendfsync always".into()));
    let evicting = RedisServer::start_with(&["--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru"]);
    assert_eq!(
        persistence(evicting.url()).await,
        Weaker("appendonly yes, appendfsync always, maxmemory 104857600, maxmemory-policy allkeys-lru".into())
    );
    let refusing = RedisServer::start_with(&["--maxmemory", "100mb", "--maxmemory-policy", "noeviction"]);
    assert_eq!(persistence(refusing.url()).await, Durable);
    // CONFIG disabled, as managed Redis services do: INFO still tells what is weaker, and only what it tells.
    let no_config = ["--rename-command", "CONFIG", ""];
    let managed = RedisServer::start_with(&no_config);
    assert_eq!(persistence(managed.url()).await, Unknown, "the fsync policy is only in CONFIG");
    let managed_no_aof = RedisServer::start_with(&[&no_config[..], &["--appendonly", "no"]].concat());
    assert_eq!(persistence(managed_no_aof.url()).await, Weaker("appendonly no, appendfsync unknown".into()));
    let managed_evicting = RedisServer::start_with(
        &[&no_config[..], &["--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru"]].concat(),
    );
    assert_eq!(
        persistence(managed_evicting.url()).await,
        Weaker("appendonly yes, appendfsync unknown, maxmemory 104857600, maxmemory-policy allkeys-lru".into())
    );
    let mut gone = RedisServer::start();
    gone.stop();
    assert_eq!(persistence(gone.url()).await, Unknown);
}

/// A Redis that is down when the gateway starts is asked how it persists once it answers: the catch-up
/// repeats the check until then, rather than leaving it unknown for the life of the process.
#[tokio::test]
async fn the_persistence_check_waits_for_a_redis_that_is_down_at_start() {
    use hookgate::notify::RedisPersistence::Weaker;
    let db = TestDb::create().await;
    let mut redis = RedisServer::start_with(&["--appendfsync", "everysec"]);
    redis.stop();
    let mut config = test_config(&db.url);
    config.notify.redis_url = redis.url();
    config.notify.catchup_interval_ms = 100;
    config.notify.command_timeout_ms = 500;
    let store = hookgate::store::Store::new(&config.store, true).expect("store");
    store.migrate().await.expect("migrate");
    let notifier = hookgate::notify::Notifier::new(&config.notify, store).expect("notifier");
    let stop = tokio_util::sync::CancellationToken::new();
    let catchup = tokio::spawn(notifier.clone().run_catchup(stop.clone()));

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(notifier.last_persistence(), None, "Redis is down: nothing is known yet");
    redis.restart();
    let everysec = Some(Weaker("appendonly yes, appendfsync everysec".into()));
    assert!(
        eventually(Duration::from_secs(5), || async { notifier.last_persistence() == everysec }).await,
        "the check ran once Redis answered: {:?}",
        notifier.last_persistence()
    );
    stop.cancel();
    catchup.await.expect("catch-up task");
}

/// The pending count is the catch-up's backlog: rows that have waited past the grace. Rows younger than it
/// are the normal path's, between commit and delete: at 20,000/s, with deletes grouped every 100 ms, ~2,000
/// rows, above the alert's threshold of 1,000 on a healthy gateway.
#[tokio::test]
async fn the_pending_count_leaves_out_rows_younger_than_the_grace() {
    let db = TestDb::create().await;
    let config = test_config(&db.url);
    Gateway::start(config.clone()).await.stop().await;
    // Batches of i events: 1 + 2 + 3 queued a minute ago, 4 + 5 + 6 + 7 just now.
    sqlx::query(
        "INSERT INTO events_outbox (sources, event_ids, queued_at) \
           SELECT array_fill('stripe'::text, ARRAY[i]), \
                  ARRAY(SELECT 'evt_pending_' || i || '_' || j FROM generate_series(1, i) AS j), \
                  now() - CASE WHEN i <= 3 THEN interval '1 minute' ELSE interval '0' END \
           FROM generate_series(1, 7) AS i",
    )
    .execute(&db.pool)
    .await
    .expect("outbox rows");
    let store = hookgate::store::Store::new(&config.store, true).expect("store");
    assert_eq!(store.count_unpublished(Duration::from_secs(5)).await.expect("count"), 6, "events, not rows");
    assert_eq!(store.count_unpublished(Duration::ZERO).await.expect("count"), 28);
}

#[tokio::test]
async fn two_gateways_share_one_backlog_and_publish_each_event_once() {
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    config.notify.catchup_batch = 50;
    config.notify.catchup_interval_ms = 100;
    let key = config.notify.stream_for("stripe");
    Gateway::start(config.clone()).await.stop().await;
    // 3,000 events in outbox rows of 1 to 7 events (a row starts at every 7th and every 13th event), so
    // that pages of 50 events end inside rows as well as at their ends.
    let ids: Vec<String> = (0..3000).map(|i| format!("evt_backlog_{i}")).collect();
    let starts: Vec<usize> = (0..ids.len()).filter(|n| n % 7 == 0 || n % 13 == 0).chain([ids.len()]).collect();
    let batches: Vec<&[String]> = starts.windows(2).map(|w| &ids[w[0]..w[1]]).collect();
    queue_unpublished(&db, &batches).await;
    let (a, b) = tokio::join!(Gateway::start(config.clone()), Gateway::start(config));
    let redis = redis_url();
    assert!(eventually(Duration::from_secs(30), || async { outbox_rows(&db).await == 0 }).await);
    let published = stream_ids(&redis, &key).await;
    assert_eq!(published.len(), 3000, "every backlog event is published");
    let twice = published.values().filter(|n| **n > 1).count();
    assert_eq!(twice, 0, "no backlog event is published twice");
    tokio::join!(a.stop(), b.stop());
}

#[tokio::test]
async fn replay_dry_run_counts_and_replay_republishes() {
    let db = TestDb::create().await;
    let config = test_config(&db.url);
    let key = config.notify.stream_for("stripe");
    let gateway = Gateway::start(config.clone()).await;
    let client = client();
    for _ in 0..5 {
        assert_eq!(post_stripe(&client, &gateway, &unique("evt_replay")).await.status, 202);
    }
    let redis = redis_url();
    assert!(eventually(Duration::from_secs(5), || async { read_stream(&redis, &key).await.len() == 5 }).await);
    gateway.stop().await;

    let config_path = std::env::temp_dir().join(format!("{}.toml", unique("hookgate-it-replay")));
    std::fs::write(&config_path, toml::to_string(&config).expect("toml")).expect("config file");
    let run = |dry: bool| {
        let mut command = crate::process::hookgate();
        command.arg("--config").arg(&config_path).args(["replay", "--source", "stripe", "--type", "payment_*"]);
        if dry {
            command.arg("--dry-run");
        }
        command.output().expect("run replay")
    };
    let dry = run(true);
    assert!(dry.status.success(), "{}", String::from_utf8_lossy(&dry.stderr));
    assert!(
        String::from_utf8_lossy(&dry.stdout).contains("5 events would be republished"),
        "{}",
        String::from_utf8_lossy(&dry.stdout)
    );
    assert_eq!(read_stream(&redis, &key).await.len(), 5, "a dry run publishes nothing");
    let real = run(false);
    assert!(real.status.success(), "{}", String::from_utf8_lossy(&real.stderr));
    assert_eq!(read_stream(&redis, &key).await.len(), 10, "replay republishes every matching event");
    let ids = stream_ids(&redis, &key).await;
    assert!(ids.values().all(|n| *n == 2));
    let _ = std::fs::remove_file(config_path);
}

/// A command that fails inside the round trip (here every `XADD`, on a key that is not a stream) fails the
/// publish, although Redis runs the round trip's commands in `MULTI`/`EXEC` and only reports their errors
/// in `EXEC`'s reply: the event stays in the outbox and reaches its stream once the key is fixed.
#[tokio::test]
async fn an_xadd_error_inside_the_round_trip_keeps_the_event_in_the_outbox() {
    use deadpool_redis::redis;
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    config.notify.catchup_interval_ms = 100;
    config.notify.catchup_grace_ms = 100;
    let key = config.notify.stream_for("stripe");
    let redis = redis_url();
    let redis_client = redis::Client::open(redis.as_str()).expect("redis url");
    let mut conn = redis_client.get_multiplexed_async_connection().await.expect("connect to redis");
    redis::cmd("SET").arg(&key).arg("not a stream").query_async::<()>(&mut conn).await.expect("SET");

    let gateway = Gateway::start(config).await;
    let id = unique("evt_wrongtype");
    assert_eq!(post_stripe(&client(), &gateway, &id).await.status, 202);
    // Several failed publishes (the publisher's and the catch-up's) go by: the row must still be there.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(outbox_rows(&db).await, 1, "a failed XADD leaves the event unpublished");
    let (recorded, body): (Option<i64>, i64) = sqlx::query_as(
        "SELECT o.body_bytes, octet_length(e.body)::int8 FROM events_outbox o JOIN events e ON e.event_id = o.event_ids[1]",
    )
    .fetch_one(&db.pool)
    .await
    .expect("the outbox row");
    assert_eq!(recorded, Some(body), "the gateway queues a batch with the bytes of its bodies");

    redis::cmd("DEL").arg(&key).query_async::<()>(&mut conn).await.expect("DEL");
    assert!(eventually(Duration::from_secs(5), || async { stream_ids(&redis, &key).await.get(&id) == Some(&1) }).await);
    assert!(outbox_empties(&db).await);
    gateway.stop().await;
}

/// A claim takes the oldest outbox rows until they hold the page's events (the row that reaches it
/// included), locks them against other replicas' claims, and keeps a row whose events are gone, so that
/// the catch-up deletes it instead of meeting it on every scan.
#[tokio::test]
async fn a_claim_takes_whole_rows_up_to_the_page_and_keeps_rows_whose_events_are_gone() {
    let db = TestDb::create().await;
    let config = test_config(&db.url);
    Gateway::start(config.clone()).await.stop().await;
    // Four rows of four stored events, then a row whose events were never stored.
    let stored = numbered("evt_claim", 1..=16);
    queue_unpublished(&db, &stored.chunks(4).collect::<Vec<_>>()).await;
    sqlx::query(
        "INSERT INTO events_outbox (sources, event_ids, queued_at) \
           VALUES ('{stripe,stripe}', '{evt_gone_1,evt_gone_2}', now() - interval '1 minute')",
    )
    .execute(&db.pool)
    .await
    .expect("orphan row");
    let ids: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM events_outbox ORDER BY id").fetch_all(&db.pool).await.expect("ids");
    let store = hookgate::store::Store::new(&config.store, true).expect("store");
    let grace = Duration::from_secs(5);

    let ten_events = PageLimit { events: 10, body_bytes: i64::MAX };

    // 10 events: rows 1-3 (0, 4 and 8 events before them), 12 events in all, in their order.
    let first = store.claim_unpublished(grace, 0, ten_events).await.expect("claim");
    assert_eq!(ids_of(&first.events), numbered("evt_claim", 1..=12));
    assert_eq!(first.last_id(), Some(ids[2]));
    assert!(first.full, "the page stopped at its limit: more rows may wait");
    // Another replica, meanwhile, skips the locked rows: row 4, then the orphan (no events, kept).
    let other = store.claim_unpublished(grace, 0, ten_events).await.expect("claim");
    assert_eq!(ids_of(&other.events), numbered("evt_claim", 13..=16));
    assert_eq!(other.last_id(), Some(ids[4]), "the row whose events are gone is claimed too");
    assert!(!other.full, "the page ran out of rows: the backlog is drained");
    other.mark_published().await.expect("mark");
    first.mark_published().await.expect("mark");
    assert_eq!(outbox_rows(&db).await, 0);
}

/// The ids of `events`, in order.
fn ids_of(events: &[hookgate::store::StoredEvent]) -> Vec<String> {
    events.iter().map(|e| e.id.clone()).collect()
}

/// `{prefix}_{i}` for each i of `range`: the ids the tests here store.
fn numbered(prefix: &str, range: std::ops::RangeInclusive<i32>) -> Vec<String> {
    range.map(|i| format!("{prefix}_{i}")).collect()
}

/// Stores `n` events `{prefix}_{i}` (i from 1) whose bodies are `pad_bytes` of padding in a JSON object,
/// queued unpublished in outbox rows of `per_row` with their bytes of bodies, as the gateway queues them;
/// returns the length of each body, in order.
async fn store_padded_backlog(db: &TestDb, prefix: &str, n: i32, per_row: i32, pad_bytes: i32) -> Vec<i64> {
    sqlx::query(
        "WITH e AS (INSERT INTO events (source, event_id, event_type, body) \
             SELECT 'stripe', $1 || '_' || i, 'charge.succeeded', \
                    convert_to('{\"id\":\"' || $1 || '_' || i || '\",\"pad\":\"' || repeat('x', $3) || '\"}', 'UTF8') \
             FROM generate_series(1, $2) AS i ORDER BY i RETURNING seq, source, event_id, octet_length(body) AS n) \
         INSERT INTO events_outbox (sources, event_ids, body_bytes, queued_at) \
             SELECT array_agg(source ORDER BY seq), array_agg(event_id ORDER BY seq), sum(n), now() - interval '1 minute' \
             FROM e GROUP BY (substring(event_id FROM '[0-9]+$')::int - 1) / $4 ORDER BY min(seq)",
    )
    .bind(prefix)
    .bind(n)
    .bind(pad_bytes)
    .bind(per_row)
    .execute(&db.pool)
    .await
    .expect("store padded backlog");
    sqlx::query_scalar("SELECT octet_length(body)::int8 FROM events WHERE event_id LIKE $1 || '\\_%' ORDER BY seq")
        .bind(prefix)
        .fetch_all(&db.pool)
        .await
        .expect("body lengths")
}

/// Drops a claim, as a failed publish does, and waits until its transaction has rolled back (the pool sends
/// the rollback in the background), so that the next claim does not skip its rows as another replica's.
async fn release(db: &TestDb, claimed: hookgate::store::Claimed) {
    drop(claimed);
    let open = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() \
             AND state LIKE 'idle in transaction%'",
        )
        .fetch_one(&db.pool)
        .await
        .expect("open transactions")
    };
    assert!(eventually(Duration::from_secs(5), || async { open().await == 0 }).await, "the claim rolled back");
}

/// A claim also stops at its bytes of bodies, counted whole rows at a time (the row that reaches the limit
/// included, and always at least one row), so a backlog of large bodies is read a bounded page at a time.
#[tokio::test]
async fn a_claim_stops_at_its_bytes_of_bodies() {
    let db = TestDb::create().await;
    let config = test_config(&db.url);
    Gateway::start(config.clone()).await.stop().await;
    // Four rows of three events, bodies of ~2 KiB (stored uncompressed or not, octet_length is the raw size).
    let lengths = store_padded_backlog(&db, "evt_bytes", 12, 3, 2000).await;
    assert_eq!(lengths.len(), 12);
    let body = lengths[0];
    assert!(lengths.iter().all(|l| (body - 2..=body + 2).contains(l)), "bodies of one size: {lengths:?}");
    let store = hookgate::store::Store::new(&config.store, true).expect("store");
    let grace = Duration::from_secs(5);

    // The bytes of four bodies: row 1 (0 bytes before it) and row 2 (three bodies before it), not row 3.
    let four_bodies = PageLimit { events: 500, body_bytes: 4 * body };
    let page = store.claim_unpublished(grace, 0, four_bodies).await.expect("claim");
    assert_eq!(ids_of(&page.events), numbered("evt_bytes", 1..=6));
    assert!(page.full, "a page cut by its bytes is full: the catch-up must claim the next");
    release(&db, page).await;
    // Rows queued without their bytes (before migration 0006) are weighed from their events' bodies.
    sqlx::query("UPDATE events_outbox SET body_bytes = NULL").execute(&db.pool).await.expect("forget the bytes");
    let page = store.claim_unpublished(grace, 0, four_bodies).await.expect("claim");
    assert_eq!(ids_of(&page.events), numbered("evt_bytes", 1..=6), "the same page from the bodies' lengths");
    release(&db, page).await;
    // Less than one body: still one whole row, or a backlog of large bodies would never move.
    let page = store.claim_unpublished(grace, 0, PageLimit { events: 500, body_bytes: 1 }).await.expect("claim");
    assert_eq!(ids_of(&page.events), numbered("evt_bytes", 1..=3));
    assert!(page.full);
    let first_row = page.last_id().expect("a row");
    page.mark_published().await.expect("mark");
    // The events limit still applies beside the bytes: 4 events are reached in row 3 (2 rows).
    let page =
        store.claim_unpublished(grace, first_row, PageLimit { events: 4, body_bytes: i64::MAX }).await.expect("claim");
    assert_eq!(ids_of(&page.events), numbered("evt_bytes", 4..=9));
    release(&db, page).await;
    // Both limits above what is left: the page takes the rest and says the backlog is drained.
    let page =
        store.claim_unpublished(grace, 0, PageLimit { events: 500, body_bytes: 100 * body }).await.expect("claim");
    assert_eq!(ids_of(&page.events), numbered("evt_bytes", 4..=12));
    assert!(!page.full);
}

/// The catch-up goes on past a page its bytes cut short (fewer events than `catchup_batch`): one catch-up
/// publishes the whole backlog of large, compressible bodies (TOASTed and compressed in Postgres, whose
/// stored size is not what a page holds in memory), each page within `catchup_page_mb` but for one row.
#[tokio::test]
async fn the_catch_up_pages_a_backlog_of_large_bodies_by_bytes_and_publishes_all_of_it() {
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    config.notify.catchup_page_mb = 1;
    let key = config.notify.stream_for("stripe");
    Gateway::start(config.clone()).await.stop().await;
    // 24 bodies of ~200 KiB (4.7 MiB) in rows of two: pages of three rows, about eight pages.
    let lengths = store_padded_backlog(&db, "evt_large", 24, 2, 200 * 1024).await;
    let stored: i64 = sqlx::query_scalar("SELECT sum(pg_column_size(body))::int8 FROM events")
        .fetch_one(&db.pool)
        .await
        .expect("size");
    assert!(stored * 10 < lengths.iter().sum::<i64>(), "the bodies are stored compressed: {stored} bytes");
    let store = hookgate::store::Store::new(&config.store, true).expect("store");
    let notifier = hookgate::notify::Notifier::new(&config.notify, store).expect("notifier");
    assert_eq!(notifier.catch_up().await.expect("catch-up"), 24, "one catch-up publishes the whole backlog");
    assert_eq!(outbox_rows(&db).await, 0);
    let published = stream_ids(&redis_url(), &key).await;
    assert_eq!(published.len(), 24);
    assert!(published.values().all(|n| *n == 1), "each event once");
}

/// A replay page ends at its bytes of bodies too (at least one event), and the pages walk every event once.
#[tokio::test]
async fn replay_pages_stop_at_their_bytes_of_bodies() {
    use hookgate::store::{ReplayFilter, ReplayPosition};
    let db = TestDb::create().await;
    let config = test_config(&db.url);
    Gateway::start(config.clone()).await.stop().await;
    let lengths = store_padded_backlog(&db, "evt_replay_bytes", 10, 1, 3000).await;
    let body = lengths[0];
    let store = hookgate::store::Store::new(&config.store, true).expect("store");
    let filter = ReplayFilter { source: "stripe".into(), ..ReplayFilter::default() };

    let (events, _) = store
        .replay_page(&filter, ReplayPosition::default(), PageLimit { events: 100, body_bytes: 3 * body })
        .await
        .expect("page");
    assert_eq!(ids_of(&events), numbered("evt_replay_bytes", 1..=3));
    let (events, _) = store
        .replay_page(&filter, ReplayPosition::default(), PageLimit { events: 100, body_bytes: 1 })
        .await
        .expect("page");
    assert_eq!(events.len(), 1, "at least one event, however large");

    let (mut after, mut walked) = (ReplayPosition::default(), Vec::new());
    loop {
        let (events, next) =
            store.replay_page(&filter, after, PageLimit { events: 100, body_bytes: 2 * body + 1 }).await.expect("page");
        if events.is_empty() {
            break;
        }
        assert!(events.len() <= 3, "pages of at most three bodies: {}", events.len());
        walked.extend(ids_of(&events));
        after = next;
    }
    assert_eq!(walked, numbered("evt_replay_bytes", 1..=10), "every event once, in order");
}
