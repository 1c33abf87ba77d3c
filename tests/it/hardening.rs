//! Faults and hostile input: the gateway keeps serving, refuses what it must, and loses nothing it
//! acknowledged. Each fault test prints a `RELIABILITY |` line (sent, acknowledged, lost, recovery) that
//! deploy/faults.sh gathers into the README's table.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::overload::{assert_all_stored, deliver_at_once, pause_store, sort_answers, stripe_events};
use crate::process::{config_file_with_streams, start_logging_json, GatewayProcess};
use crate::support::*;

/// The outcome of a load: what was sent, what got a 2xx (ids), the other statuses, the slowest answer.
#[derive(Default, Debug)]
struct Load {
    sent: u64,
    acknowledged: Vec<String>,
    statuses: std::collections::BTreeMap<u16, u64>,
    slowest: Duration,
    /// (sent, answered, status) of every request, as times since the load began, for recovery times.
    timeline: Vec<(Duration, Duration, u16)>,
}

/// `senders` loops posting fresh Stripe events to `url` every `pause`, until `stop`. A refused connection
/// (the gateway is down) counts as status 0 and is retried after the pause.
/// `began` is the test's clock: the timeline's instants are measured from it, so they compare with the
/// test's own marks.
async fn run_load(url: String, senders: usize, pause: Duration, stop: Arc<AtomicBool>, began: Instant) -> Load {
    let mut set = tokio::task::JoinSet::new();
    for s in 0..senders {
        let (url, stop) = (url.clone(), stop.clone());
        set.spawn(async move {
            let mut load = Load::default();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("evt_fault_{s}_{i}_{}", unique("x"));
                i += 1;
                let body = stripe_event(&id);
                let client = client();
                let mut request = http::Request::post(&url);
                for (k, v) in stripe_headers(body.as_bytes()) {
                    request = request.header(k, v);
                }
                let request = request.body(http_body_util::Full::new(bytes::Bytes::from(body))).expect("request");
                let t0 = Instant::now();
                let sent_at = began.elapsed();
                let status = match tokio::time::timeout(Duration::from_secs(30), client.request(request)).await {
                    Ok(Ok(response)) => {
                        let status = response.status().as_u16();
                        if status == 503 {
                            assert!(response.headers().contains_key("retry-after"), "503 without Retry-After");
                        }
                        status
                    }
                    Ok(Err(_)) => 0,
                    Err(elapsed) => panic!("a request hung for 30 s: {elapsed}"),
                };
                load.sent += 1;
                load.slowest = load.slowest.max(t0.elapsed());
                *load.statuses.entry(status).or_default() += 1;
                load.timeline.push((sent_at, began.elapsed(), status));
                if (200..300).contains(&status) {
                    load.acknowledged.push(id);
                }
                tokio::time::sleep(pause).await;
            }
            load
        });
    }
    let mut total = Load::default();
    while let Some(result) = set.join_next().await {
        let load = result.expect("sender");
        total.sent += load.sent;
        total.acknowledged.extend(load.acknowledged);
        for (k, v) in load.statuses {
            *total.statuses.entry(k).or_default() += v;
        }
        total.slowest = total.slowest.max(load.slowest);
        total.timeline.extend(load.timeline);
    }
    total.timeline.sort();
    total
}

fn report(fault: &str, load: &Load, lost: usize, recovery: &str) {
    println!(
        "RELIABILITY | {fault} | {} | {} | {lost} | {recovery} | {:?}",
        load.sent,
        load.acknowledged.len(),
        load.statuses
    );
}

/// Acknowledged ids missing from Postgres.
async fn lost_from(db: &TestDb, acknowledged: &[String]) -> usize {
    let stored = db.stored_ids().await;
    acknowledged.iter().filter(|id| !stored.contains(*id)).count()
}

#[tokio::test]
async fn kill_9_during_durable_load_loses_no_acknowledged_event() {
    let db = TestDb::create().await;
    let stream = format!("{}:{{source}}", unique("hg-it-kill"));
    let (port, admin) = (free_port(), free_port());
    let config = config_file_with_streams(&db.url, port, admin, &stream);
    let env = [("HOOKGATE__NOTIFY__CATCHUP_GRACE_MS", "1000")];
    let mut gateway = GatewayProcess::start_with(&config, port, admin, &env, None).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load =
        tokio::spawn(run_load(gateway.url("stripe"), 16, Duration::from_millis(2), stop.clone(), Instant::now()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gateway.kill_9();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let load = load.await.expect("load");
    assert!(load.acknowledged.len() > 200, "{load:?}");

    let restarted = Instant::now();
    let gateway = GatewayProcess::start_with(&config, port, admin, &env, None).await;
    let ready_after = restarted.elapsed();
    let lost = lost_from(&db, &load.acknowledged).await;
    assert_eq!(lost, 0, "acknowledged events lost to kill -9");
    // The outbox publishes what the killed process had stored but not yet published.
    let key = stream.replace("{source}", "stripe");
    let redis = redis_url();
    let notified = eventually(Duration::from_secs(20), || async {
        let ids = stream_ids(&redis, &key).await;
        load.acknowledged.iter().all(|id| ids.contains_key(id))
    })
    .await;
    assert!(notified, "some acknowledged events never reached the stream after the restart");
    report(
        "kill -9 of the gateway under durable load, then restart",
        &load,
        lost,
        &format!("ready {ready_after:.1?} after restart"),
    );
    drop(gateway);
}

#[tokio::test]
async fn postgres_down_for_10_seconds_gets_503s_then_ingest_resumes() {
    let dir = std::env::temp_dir().join(unique("hookgate-it-pg-outage"));
    let pg_port = free_port();
    // On a blocking thread: the test's runtime keeps running the load (and timing its answers) while
    // pg_ctl works.
    let services = |action: &'static str| {
        let dir = dir.clone();
        async move {
            tokio::task::spawn_blocking(move || crate::admin::private_postgres(action, &dir, pg_port))
                .await
                .expect("services.sh");
        }
    };
    services("start-postgres").await;
    let db = TestDb::create_on(&format!("postgres://postgres@127.0.0.1:{pg_port}/postgres")).await;
    let (port, admin) = (free_port(), free_port());
    let config = config_file_with_streams(&db.url, port, admin, &format!("{}:{{source}}", unique("hg-it-pg")));
    let env = [("HOOKGATE__SERVER__REQUEST_TIMEOUT_MS", "3000"), ("HOOKGATE__STORE__CONNECT_TIMEOUT_MS", "1000")];
    let gateway = GatewayProcess::start_with(&config, port, admin, &env, None).await;
    let stop = Arc::new(AtomicBool::new(false));
    let began = Instant::now();
    let load = tokio::spawn(run_load(gateway.url("stripe"), 8, Duration::from_millis(20), stop.clone(), began));
    tokio::time::sleep(Duration::from_secs(1)).await;
    services("stop-postgres").await;
    let down_at = began.elapsed();
    let ready = format!("http://127.0.0.1:{admin}/readyz");
    let client = client();
    assert!(
        eventually(Duration::from_secs(5), || async { get_text(&client, &ready).await.0 == 503 }).await,
        "/readyz reflects the outage"
    );
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(began.elapsed().saturating_sub(down_at))).await;
    // Postgres may serve from any moment after its start begins: the outage is over from there.
    let restart_at = began.elapsed();
    services("start-postgres").await;
    let up_at = began.elapsed();
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    let load = load.await.expect("load");

    // Requests sent once Postgres was gone, and answered before its restart began.
    let during = |status: u16| {
        load.timeline.iter().filter(|(sent, done, s)| *sent > down_at && *done < restart_at && *s == status).count()
    };
    let (refused_during, accepted_during) = (during(503), during(202));
    assert!(refused_during > 0, "503s while Postgres is down: {:?}", load.statuses);
    assert_eq!(accepted_during, 0, "no 2xx that the gateway cannot keep while Postgres is down");
    assert!(
        load.slowest < Duration::from_millis(4500),
        "an answer took {:?}, past the 3 s request timeout",
        load.slowest
    );
    assert!(load.statuses.keys().all(|s| [202, 503].contains(s)), "{:?}", load.statuses);
    // Recovery: until a request sent after Postgres restarted is acknowledged.
    let first_202_after = load
        .timeline
        .iter()
        .filter(|(sent, _, s)| *sent > up_at && *s == 202)
        .map(|(_, done, _)| done.saturating_sub(up_at))
        .min();
    let recovery = first_202_after.expect("ingest resumes after Postgres is back");
    assert!(recovery < Duration::from_secs(5), "ingest resumed only {recovery:?} after Postgres came back");
    assert!(eventually(Duration::from_secs(5), || async { get_text(&client, &ready).await.0 == 200 }).await);
    let lost = lost_from(&db, &load.acknowledged).await;
    assert_eq!(lost, 0);
    report(
        "Postgres stopped for 10 s under load",
        &load,
        lost,
        &format!("{refused_during} requests answered 503 during the outage, none 2xx; new requests acknowledged {recovery:.1?} after Postgres restarted"),
    );
    drop(gateway);
    db.pool.close().await;
    services("stop-postgres").await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// As a failover can leave it: the gateway's connections cut, and the server its new ones reach read-only (a
/// standby, or a primary fenced with `default_transaction_read_only`), until it takes writes again.
#[tokio::test]
async fn a_read_only_database_is_retried_on_new_connections_and_the_waiting_events_are_stored_once_it_takes_writes() {
    let db = TestDb::create().await;
    let name = db.url.rsplit('/').next().expect("database name").to_owned();
    let admin = sqlx::PgPool::connect(&admin_database_url()).await.expect("admin connection");
    let mut config = test_config(&db.url);
    config.server.request_timeout_ms = 30_000;
    let gateway = Gateway::start(config).await;
    let client = client();
    assert_eq!(post_stripe(&client, &gateway, &unique("evt_writable")).await.status, 202);

    sqlx::query(&format!("ALTER DATABASE {name} SET default_transaction_read_only = on"))
        .execute(&admin)
        .await
        .expect("make the database read-only for new sessions");
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND application_name = 'hookgate'",
    )
    .bind(&name)
    .execute(&admin)
    .await
    .expect("cut the gateway's connections");
    let mut waiting = tokio::task::JoinSet::new();
    let ids: Vec<String> = (0..5).map(|_| unique("evt_read_only")).collect();
    for id in ids.clone() {
        let (client, url) = (client.clone(), gateway.url("stripe"));
        waiting.spawn(async move { post_stripe_with(&client, &url, &id).await });
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(10), waiting.join_next()).await.is_err(),
        "a write refused as read-only is retried, not answered"
    );
    assert_eq!(db.count().await, 1);
    // Not ready while it refuses writes, so that a load balancer sends elsewhere and an operator sees why.
    let ready = format!("http://{}/readyz", gateway.admin);
    let (status, body) = readiness_until(&client, &ready, "read_only").await;
    assert_eq!(status, 503, "{body}");

    // Writable again: the retries reach it on new connections (a read-only session stays read-only).
    sqlx::query(&format!("ALTER DATABASE {name} RESET default_transaction_read_only"))
        .execute(&admin)
        .await
        .expect("make the database writable");
    let writable = Instant::now();
    while let Some(answer) = waiting.join_next().await {
        let answer = answer.expect("delivery");
        assert_eq!(answer.status, 202, "{answer:?}");
    }
    let recovery = writable.elapsed();
    let stored = db.stored_ids().await;
    assert!(ids.iter().all(|id| stored.contains(id)), "every event acknowledged after the failover is stored");
    let (status, body) = readiness_until(&client, &ready, "ok").await;
    assert_eq!(status, 200, "ready again once the database takes writes: {body}");
    println!(
        "RELIABILITY | failover: the gateway's connections cut, new ones read-only for 3 s, 5 events waiting | 6 | 6 \
         | 0 | none answered while read-only, `/readyz` 503 `read_only`; all 5 acknowledged {recovery:.1?} after it \
         took writes again | -"
    );
    gateway.stop().await;
    admin.close().await;
}

/// Polls `/readyz` (for up to 5 s) until its `database` check says `expected`; returns the last answer.
async fn readiness_until(client: &HttpClient, url: &str, expected: &str) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = get_text(client, url).await;
        if body.contains(&format!(r#""database":"{expected}""#)) || Instant::now() > deadline {
            return (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A `statement_timeout` on the database (managed databases often set one per role) shorter than a stall: the
/// batch is canceled (57014) and tried again, not given up; in enqueue mode, giving up would drop events
/// already acknowledged.
#[tokio::test]
async fn a_batch_canceled_by_statement_timeout_during_a_stall_is_retried_and_no_queued_event_is_lost() {
    let db = TestDb::create().await;
    let name = db.url.rsplit('/').next().expect("database name").to_owned();
    let admin = sqlx::PgPool::connect(&admin_database_url()).await.expect("admin connection");
    sqlx::query(&format!("ALTER DATABASE {name} SET statement_timeout = '300ms'"))
        .execute(&admin)
        .await
        .expect("a statement timeout for the gateway's sessions");
    let mut config = test_config(&db.url);
    config.queue.ack_mode = hookgate::config::AckMode::Enqueue;
    let gateway = Gateway::start(config).await;
    let client = client();
    // Served once migrated: the table to lock is there.
    assert_eq!(post_stripe(&client, &gateway, &unique("evt_first")).await.status, 202);

    // The stall: the events table locked for 2 s, so every insert waits out the statement timeout.
    let mut stall = db.pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE").execute(&mut *stall).await.expect("lock");
    let ids: Vec<String> = (0..5).map(|_| unique("evt_canceled")).collect();
    for id in &ids {
        let answer = post_stripe(&client, &gateway, id).await;
        assert_eq!((answer.status, answer.json["status"].as_str()), (202, Some("queued")), "{answer:?}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stall.rollback().await.expect("unlock");

    let all_stored = eventually(Duration::from_secs(10), || async {
        let in_db = db.stored_ids().await;
        ids.iter().all(|id| in_db.contains(id))
    });
    assert!(all_stored.await, "an event acknowledged as queued is lost when its batch is canceled");
    gateway.stop().await;
    admin.close().await;
}

#[tokio::test]
async fn a_burst_far_above_capacity_gets_503s_with_bounded_memory_and_recovers() {
    let db = TestDb::create().await;
    let (port, admin) = (free_port(), free_port());
    let config = config_file_with_streams(&db.url, port, admin, &format!("{}:{{source}}", unique("hg-it-burst")));
    let env =
        [("HOOKGATE__QUEUE__CAPACITY", "64"), ("HOOKGATE__WORKERS__COUNT", "1"), ("HOOKGATE__STORE__POOL_MAX", "3")];
    let gateway = GatewayProcess::start_with(&config, port, admin, &env, None).await;
    let rss_before = gateway.peak_rss_mib();
    // Ten waves of 400 simultaneous deliveries, each on a connection of its own.
    let mut load = Load::default();
    for _ in 0..10 {
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..400 {
            let url = gateway.url("stripe");
            set.spawn(async move {
                let id = unique("evt_burst");
                let body = stripe_event(&id);
                let answer = post(&client(), &url, &stripe_headers(body.as_bytes()), body.as_bytes()).await;
                (id, answer)
            });
        }
        while let Some(result) = set.join_next().await {
            let (id, answer) = result.expect("task");
            load.sent += 1;
            *load.statuses.entry(answer.status).or_default() += 1;
            match answer.status {
                202 => load.acknowledged.push(id),
                503 => assert_eq!(answer.kind(), "queue_full"),
                other => panic!("unexpected {other}"),
            }
        }
    }
    let rss_after = gateway.peak_rss_mib();
    assert!(
        load.statuses.get(&503).copied().unwrap_or(0) > 0,
        "a 64-slot queue refuses part of 400 at once: {:?}",
        load.statuses
    );
    assert!(rss_after < 200, "peak RSS {rss_after} MiB");
    // Recovery: once the burst is over, a delivery is accepted and the gateway is ready.
    let recovered = Instant::now();
    let answer = post_stripe_with(&client(), &gateway.url("stripe"), &unique("evt_after")).await;
    assert_eq!(answer.status, 202);
    let (status, _) = get_text(&client(), &format!("http://127.0.0.1:{admin}/readyz")).await;
    assert_eq!(status, 200);
    let lost = lost_from(&db, &load.acknowledged).await;
    assert_eq!(lost, 0);
    report(
        "burst of 10 x 400 simultaneous requests into a 64-slot queue",
        &load,
        lost,
        &format!(
            "next request accepted in {:.1?}; peak RSS {rss_after} MiB (idle {rss_before} MiB)",
            recovered.elapsed()
        ),
    );
    drop(gateway);
}

#[tokio::test]
async fn slowloris_connections_do_not_starve_normal_traffic() {
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    config.server.header_read_timeout_ms = 1000;
    let header_timeout = Duration::from_millis(config.server.header_read_timeout_ms);
    let gateway = Gateway::start(config).await;
    let addr = gateway.addr;
    // 300 connections sending their headers one byte every 200 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let closed_by_server = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut attackers = Vec::new();
    for _ in 0..300 {
        let (stop, closed) = (stop.clone(), closed_by_server.clone());
        attackers.push(tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else { return };
            let head = b"POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
            for byte in head.iter().cycle() {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                if stream.write_all(&[*byte]).await.is_err() {
                    closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Normal traffic beside it: 300 deliveries, one after another, each timed.
    let client = client();
    let mut latencies = Vec::new();
    for _ in 0..300 {
        let t0 = Instant::now();
        let answer = post_stripe(&client, &gateway, &unique("evt_normal")).await;
        latencies.push(t0.elapsed());
        assert_eq!(answer.status, 202);
    }
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, Ordering::Relaxed);
    for attacker in attackers {
        let _ = attacker.await;
    }
    let closed = closed_by_server.load(Ordering::Relaxed);
    println!("RELIABILITY | slowloris: 300 connections, 1 byte / 200 ms, beside 300 normal requests | 300 | 300 | 0 | normal P99 {p99:.1?}; {closed} of 300 slow connections cut by the 1 s header timeout | -");
    // Starved, a request would wait for slow connections to be cut (the header timeout, 1 s) or longer; the
    // bound sits well below that rather than at a latency figure (250 ms once failed at 261 ms in CI, with
    // ~50 other tests sharing this host's two cores).
    assert!(p99 < header_timeout * 3 / 4, "normal traffic P99 {p99:?} under slowloris");
    assert!(closed >= 290, "only {closed} slowloris connections were closed by the header read timeout");
    gateway.stop().await;
}

/// Sends raw bytes on a fresh connection and returns the status of the answer (0 when the connection
/// was closed without one).
fn raw_status(addr: std::net::SocketAddr, request: &[u8]) -> u16 {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let _ = stream.write_all(request);
    let mut buf = [0u8; 128];
    let n = stream.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[tokio::test]
async fn hostile_requests_get_their_4xx_quickly_and_store_nothing() {
    let db = TestDb::create().await;
    let gateway = Gateway::start(test_config(&db.url)).await;
    let addr = gateway.addr;
    let body = stripe_event(&unique("evt"));
    let sig = stripe_headers(body.as_bytes())[0].1.clone();
    let started = Instant::now();
    let statuses = tokio::task::spawn_blocking(move || {
        let huge_header = format!(
            "POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\nStripe-Signature: {}\r\nContent-Length: 2\r\n\r\n{{}}",
            "v".repeat(100 * 1024)
        );
        let many_headers = format!(
            "POST /webhooks/stripe HTTP/1.1\r\nHost: x\r\n{}Content-Length: 2\r\n\r\n{{}}",
            (0..5000).fold(String::new(), |mut all, i| {
                let _ = write!(all, "X-H{i}: v\r\n");
                all
            })
        );
        let long_path =
            format!("POST /webhooks/{} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}", "a".repeat(10 * 1024));
        let with_sig = |path: &str| {
            format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nStripe-Signature: {sig}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        vec![
            ("100 KiB signature header", raw_status(addr, huge_header.as_bytes())),
            ("5000 headers", raw_status(addr, many_headers.as_bytes())),
            ("10 KiB source", raw_status(addr, long_path.as_bytes())),
            ("source with ..", raw_status(addr, with_sig("/webhooks/../webhooks/stripe").as_bytes())),
            ("source with %2F", raw_status(addr, with_sig("/webhooks/..%2Fstripe").as_bytes())),
            ("source with %0A", raw_status(addr, with_sig("/webhooks/stripe%0Ainjected").as_bytes())),
        ]
    })
    .await
    .expect("raw requests");
    for (what, status) in &statuses {
        assert!((400..500).contains(status), "{what}: {status}");
    }
    let header_refusals: Vec<u16> = statuses.iter().take(2).map(|(_, s)| *s).collect();
    assert_eq!(header_refusals, [431, 431], "oversized heads: 431 Request Header Fields Too Large");
    assert!(statuses.iter().skip(2).all(|(_, s)| *s == 404), "{statuses:?}");

    // Signed correctly but hostile bodies: invalid UTF-8, deep nesting, a control character in the id.
    let client = client();
    let mut invalid_utf8 = br#"{"id":"evt_bad","object":"event","type":"x","note":""#.to_vec();
    invalid_utf8.extend_from_slice(&[0xff, 0xfe, 0xc3]);
    invalid_utf8.extend_from_slice(br#""}"#);
    let deep =
        format!(r#"{{"id":"evt_deep","object":"event","type":"x","d":{}{}}}"#, "[".repeat(5000), "]".repeat(5000));
    let control = r#"{"id":"evt_\n{\"forged\":1}","object":"event","type":"x"}"#.to_owned();
    for (what, payload) in
        [("invalid UTF-8", invalid_utf8), ("deep nesting", deep.into_bytes()), ("newline in id", control.into_bytes())]
    {
        let answer = post(&client, &gateway.url("stripe"), &stripe_headers(&payload), &payload).await;
        assert_eq!((answer.status, answer.kind()), (400, "invalid_event"), "{what}: {answer:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(5), "hostile requests took {:?}", started.elapsed());
    assert_eq!(db.count().await, 0, "nothing hostile is stored");
    gateway.stop().await;
}

#[tokio::test]
async fn http2_stream_limits_and_rapid_reset_do_not_exhaust_the_server() {
    use hyper::client::conn::http2;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    config.server.http2_max_concurrent_streams = 32;
    let gateway = Gateway::start(config).await;

    // 500 requests at once on one connection: the server admits 32 streams at a time; all complete. One
    // request first, so the client has the server's SETTINGS (its stream limit) before the burst.
    let client = h2c_client();
    assert_eq!(post_stripe(&client, &gateway, &unique("evt_h2_first")).await.status, 202);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..500 {
        let (client, url) = (client.clone(), gateway.url("stripe"));
        set.spawn(async move {
            let body = stripe_event(&unique("evt_h2"));
            post(&client, &url, &stripe_headers(body.as_bytes()), body.as_bytes()).await.status
        });
    }
    while let Some(status) = set.join_next().await {
        assert_eq!(status.expect("task"), 202);
    }

    // Rapid reset: open a stream and cancel it at once, 5,000 times on one connection, while a normal
    // client keeps sending; the normal client must stay fast.
    let io = TokioIo::new(tokio::net::TcpStream::connect(gateway.addr).await.expect("connect"));
    let (mut sender, connection) = http2::handshake(TokioExecutor::new(), io).await.expect("h2 handshake");
    let flood_connection = tokio::spawn(connection);
    let url = gateway.url("stripe");
    let flood = tokio::spawn(async move {
        let mut resets = 0;
        for _ in 0..5_000 {
            if sender.ready().await.is_err() {
                return (resets, true); // the server closed the connection (GOAWAY)
            }
            let request = http::Request::post(&url)
                .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
                .expect("request");
            // Poll once so HEADERS go out, then drop the response future: the client sends RST_STREAM.
            let _ = tokio::time::timeout(Duration::ZERO, sender.send_request(request)).await;
            resets += 1;
        }
        (resets, sender.ready().await.is_err())
    });
    let mut slowest = Duration::ZERO;
    while !flood.is_finished() {
        let t0 = Instant::now();
        let answer = post_stripe(&client, &gateway, &unique("evt_during_flood")).await;
        assert_eq!(answer.status, 202);
        slowest = slowest.max(t0.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (resets, closed) = flood.await.expect("flood");
    assert!(slowest < Duration::from_secs(1), "a normal request took {slowest:?} during the flood");
    println!("RELIABILITY | HTTP/2 rapid reset: {resets} streams opened and cancelled on one connection, normal h2c traffic beside it | {resets} | 0 | 0 | slowest normal request during the flood {slowest:.1?}; flood connection closed by the server: {closed} | -");
    flood_connection.abort();
    gateway.stop().await;
}

#[tokio::test]
async fn logs_cannot_be_forged_and_never_contain_a_secret() {
    let db = TestDb::create().await;
    let (gateway, log) = start_logging_json(&db.url, "logs", &[("RUST_LOG", "debug")]).await;
    let client = client();
    // Attempts to smuggle line breaks into the log: path, header, event id; plus ordinary traffic.
    let url = gateway.url("stripe");
    let _ = post(&client, &format!("{url}%0A%7B%22forged%22%3A1%7D"), &[], b"{}").await;
    let _ = post(&client, &url, &[("Stripe-Signature".into(), "t=1\t,v1=\"}\t{\"forged\":1".into())], b"{}").await;
    let forged = r#"{"id":"evt_\n{\"forged\":1}","object":"event","type":"x\r\ny"}"#;
    let _ = post(&client, &url, &stripe_headers(forged.as_bytes()), forged.as_bytes()).await;
    assert_eq!(post_stripe_with(&client, &url, &unique("evt_log")).await.status, 202);
    let (_, metrics) = get_text(&client, &gateway.metrics_url()).await;
    drop(gateway); // SIGTERM: the shutdown is logged too
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.lines().count() >= 3, "too few log lines: {text}");
    let mut refusals = 0;
    for line in text.lines() {
        let parsed: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("forged or broken log line ({e}): {line}"));
        assert!(parsed.get("forged").is_none(), "{line}");
        if parsed["message"] == "refused" {
            refusals += 1;
            let peer = parsed["span"]["peer"].as_str().unwrap_or_default();
            assert!(peer.starts_with("127.0.0.1:"), "a refusal names the connection's peer: {line}");
            // And the client's address (behind trusted proxies, the one X-Forwarded-For names).
            assert_eq!(parsed["client"], "127.0.0.1", "a refusal names the client's address: {line}");
        }
    }
    assert_eq!(refusals, 3, "the three forged requests are refused and logged: {text}");
    for secret in [STRIPE_SECRET, STANDARD_SECRET, GITHUB_SECRET] {
        assert!(!text.contains(secret), "a secret reached the logs");
        assert!(!metrics.contains(secret), "a secret reached the metrics");
    }
    let _ = std::fs::remove_file(log);
}

/// An event Postgres refuses for what it holds (an operator's `CHECK`, a trigger of theirs that raises an
/// exception, a row-level security policy; in general a data, constraint or PL/pgSQL error, or a code of the
/// operator's own) fails only itself: the batch it shares is written again around it, its neighbours are
/// acknowledged and stored, and it alone gets the 503 that its sender retries.
/// The tests of refusals take turns: the metrics recorder is one per test process, so every gateway they
/// start shares `hookgate_held_events` and `hookgate_store_errors_total`, which they read.
static REFUSALS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn an_event_a_check_refuses_fails_only_itself_and_not_the_batch_it_shares() {
    refused_alone_in_durable_mode(Poison::Check).await;
}

#[tokio::test]
async fn an_event_a_trigger_refuses_fails_only_itself_and_not_the_batch_it_shares() {
    refused_alone_in_durable_mode(Poison::Trigger).await;
}

#[tokio::test]
async fn an_event_a_trigger_refuses_with_a_code_of_its_own_fails_only_itself() {
    refused_alone_in_durable_mode(Poison::TriggerWithItsOwnCode).await;
}

#[tokio::test]
async fn an_event_a_row_level_security_policy_refuses_fails_only_itself() {
    refused_alone_in_durable_mode(Poison::RowLevelSecurity).await;
}

/// How the operator's database refuses the events whose ids start with `evt_poison`.
#[derive(Debug, Clone, Copy)]
enum Poison {
    /// A `CHECK` constraint (SQLSTATE 23514).
    Check,
    /// A trigger that raises an exception (SQLSTATE P0001, PL/pgSQL's default).
    Trigger,
    /// A trigger that raises an exception with a SQLSTATE of the operator's own, in no class of Postgres's.
    TriggerWithItsOwnCode,
    /// A row-level security policy's `WITH CHECK` (SQLSTATE 42501, a revoked privilege's code too), on a
    /// gateway whose role is not the tables' owner nor a superuser (both pass every policy).
    RowLevelSecurity,
}

/// The role the gateway writes as under `Poison::RowLevelSecurity`: created once in the test cluster, and
/// given the tables the migrations create through default privileges.
const WRITER_ROLE: &str = "hookgate_it_writer";

impl Poison {
    /// Points the gateway at `db` as the operator would for this refusal: for row-level security, it writes
    /// as a role of its own (`SET ROLE` at connection, so no password is needed) and migrates as the owner.
    async fn configure(self, db: &TestDb, config: &mut hookgate::config::Config) {
        if !matches!(self, Poison::RowLevelSecurity) {
            return;
        }
        let create_role = format!(
            "DO $$ BEGIN CREATE ROLE {WRITER_ROLE}; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        );
        let grant = format!(
            "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {WRITER_ROLE}"
        );
        for statement in [create_role.as_str(), grant.as_str()] {
            sqlx::query(statement).execute(&db.pool).await.expect("the writer's role");
        }
        config.store.migrate_url = Some(db.url.clone());
        let separator = if db.url.contains('?') { '&' } else { '?' };
        config.store.url = format!("{}{separator}options=-c%20role%3D{WRITER_ROLE}", db.url);
    }

    /// Whether the refusal's message names the event, so that the batch is split around it at once.
    fn names_its_event(self) -> bool {
        !matches!(self, Poison::RowLevelSecurity)
    }

    async fn refuse(self, db: &TestDb) {
        // A trigger function that raises with `raise` for the poisoned events, and the trigger calling it.
        let trigger_raising = |raise: &str| {
            vec![
                format!(
                    "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                     IF NEW.event_id LIKE 'evt_poison%' THEN {raise}; END IF; RETURN NEW; END $$"
                ),
                "CREATE TRIGGER refuse_poison BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION refuse_poison()"
                    .to_owned(),
            ]
        };
        let statements = match self {
            Poison::Check => vec![
                "ALTER TABLE events ADD CONSTRAINT refuse_poison CHECK (event_id NOT LIKE 'evt_poison%') NOT VALID"
                    .to_owned(),
            ],
            Poison::RowLevelSecurity => [
                "ALTER TABLE events ENABLE ROW LEVEL SECURITY",
                "CREATE POLICY refuse_poison ON events FOR INSERT WITH CHECK (event_id NOT LIKE 'evt_poison%')",
                "CREATE POLICY read_all ON events FOR SELECT USING (true)",
            ]
            .map(str::to_owned)
            .to_vec(),
            Poison::Trigger => trigger_raising("RAISE EXCEPTION 'event % refused', NEW.event_id"),
            Poison::TriggerWithItsOwnCode => {
                trigger_raising("RAISE EXCEPTION 'event % refused', NEW.event_id USING ERRCODE = 'HG001'")
            }
        };
        for statement in &statements {
            sqlx::query(statement).execute(&db.pool).await.expect("a refusal of the operator's own");
        }
    }

    fn how(self) -> &'static str {
        match self {
            Poison::Check => "refused by a `CHECK` constraint",
            Poison::Trigger => "refused by a trigger's `RAISE EXCEPTION` (SQLSTATE P0001)",
            Poison::TriggerWithItsOwnCode => "refused by a trigger's `RAISE EXCEPTION` with a code of its own (HG001)",
            Poison::RowLevelSecurity => "refused by a row-level security policy (SQLSTATE 42501)",
        }
    }
}

async fn refused_alone_in_durable_mode(refusal: Poison) {
    let _turn = REFUSALS.lock().await;
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    // One worker: the events queued behind the stalled write below are then written as one batch.
    config.workers.count = 1;
    refusal.configure(&db, &mut config).await;
    let gateway = Gateway::start(config).await;
    let client = client();
    let metrics_url = format!("http://{}/metrics", gateway.admin);
    let rejected = || scrape_metric(&metrics_url, r#"hookgate_store_errors_total{kind="rejected"}"#);
    let rejected_before = rejected().await.unwrap_or(0.0);
    assert_eq!(post_stripe(&client, &gateway, &unique("evt_first")).await.status, 202);
    refusal.refuse(&db).await;

    let stall = pause_store(&db).await;
    let blocker = deliver_at_once(&gateway.url("stripe"), stripe_events(1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let poison = unique("evt_poison");
    let good: Vec<(String, String)> = stripe_events(9).collect();
    let batch = good.iter().cloned().chain([(poison.clone(), stripe_event(&poison))]);
    let answers = deliver_at_once(&gateway.url("stripe"), batch);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stall.rollback().await.expect("unlock");

    let (blocker_acknowledged, _) = sort_answers(blocker, "store_unavailable", "1").await;
    assert_eq!(blocker_acknowledged.len(), 1);
    let mut acknowledged = Vec::new();
    let mut refused = Vec::new();
    let mut answers = answers;
    while let Some(result) = answers.join_next().await {
        let (id, answer) = result.expect("task");
        match answer.status {
            202 => acknowledged.push(id),
            503 => {
                assert_eq!(answer.kind(), "store_unavailable", "{answer:?}");
                refused.push(id);
            }
            _ => panic!("{answer:?}"),
        }
    }
    assert_eq!(refused, std::slice::from_ref(&poison), "only the refused event is answered 503");
    assert_eq!(acknowledged.len(), 9);
    assert_all_stored(&db, &acknowledged).await;
    assert!(!db.stored_ids().await.contains(&poison));
    // A refusal that names the event (the `CHECK`'s failing row, the trigger's message) has the batch split
    // around it at once: Postgres refuses two statements, the batch and the event alone. Otherwise (a
    // policy's message names only the table) the batch is halved down to it: the batch and 3 or 4 parts.
    let refused_statements = rejected().await.map(|n| n - rejected_before);
    if refusal.names_its_event() {
        assert_eq!(refused_statements, Some(2.0), "split around the named event");
    } else {
        let halved = refused_statements.is_some_and(|n| (4.0..=5.0).contains(&n));
        assert!(halved, "halved down to the event: {refused_statements:?}");
    }
    println!(
        "RELIABILITY | durable: one event of a 10-event batch {} | 11 | 10 | 0 | its 9 neighbours acknowledged \
         and stored, it alone answered 503 | -",
        refusal.how()
    );
    gateway.stop().await;
}

/// Adds a `CHECK` of the operator's own that refuses every event whose id starts with `evt_poison`.
async fn refuse_poison(db: &TestDb) {
    Poison::Check.refuse(db).await;
}

/// Drops `refuse_poison`'s constraint.
async fn take_poison(db: &TestDb) {
    sqlx::query("ALTER TABLE events DROP CONSTRAINT refuse_poison").execute(&db.pool).await.expect("drop");
}

/// Whether every one of `ids` is stored within `limit`.
async fn stored_within(db: &TestDb, ids: &[String], limit: Duration) -> bool {
    eventually(limit, || async {
        let in_db = db.stored_ids().await;
        ids.iter().all(|id| in_db.contains(id))
    })
    .await
}

/// In enqueue mode the 202 goes out before the write, so a batch Postgres refuses is never given up: with the
/// table gone (a botched migration), and with a row a constraint refuses, the events wait in the queue and
/// are stored once the operator puts things right, and the refused row's neighbours are stored meanwhile.
#[tokio::test]
async fn in_enqueue_mode_a_refused_batch_is_held_until_postgres_takes_it_and_no_acknowledged_event_is_lost() {
    let _turn = REFUSALS.lock().await;
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    config.queue.ack_mode = hookgate::config::AckMode::Enqueue;
    config.workers.retry_backoff_max_ms = 200;
    let gateway = Gateway::start(config).await;
    let client = client();
    let first = unique("evt_first");
    assert_eq!(post_stripe(&client, &gateway, &first).await.status, 202);
    assert!(stored_within(&db, &[first], Duration::from_secs(10)).await, "migrated and writing");

    // The table gone: every batch refused (42P01), none given up.
    sqlx::query("ALTER TABLE events RENAME TO events_elsewhere").execute(&db.pool).await.expect("rename");
    let waiting: Vec<String> = (0..5).map(|_| unique("evt_held")).collect();
    for id in &waiting {
        let answer = post_stripe(&client, &gateway, id).await;
        assert_eq!((answer.status, answer.json["status"].as_str()), (202, Some("queued")), "{answer:?}");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, metrics) = get_text(&client, &format!("http://{}/metrics", gateway.admin)).await;
    let held = metrics
        .lines()
        .find_map(|line| line.strip_prefix(r#"hookgate_store_errors_total{kind="held"} "#))
        .and_then(|n| n.parse::<f64>().ok());
    assert!(held.is_some_and(|n| n >= 1.0), "the held batch is counted: {held:?}");
    sqlx::query("ALTER TABLE events_elsewhere RENAME TO events").execute(&db.pool).await.expect("rename back");
    let back = Instant::now();
    assert!(
        stored_within(&db, &waiting, Duration::from_secs(10)).await,
        "events acknowledged while the table was gone are lost"
    );
    let table_recovery = back.elapsed();

    // One row refused: its neighbours are stored meanwhile; it is stored once the constraint goes.
    refuse_poison(&db).await;
    let poison = unique("evt_poison");
    let mut neighbours = Vec::new();
    for i in 0..9 {
        let id = if i == 4 { poison.clone() } else { unique("evt_neighbour") };
        let answer = post_stripe(&client, &gateway, &id).await;
        assert_eq!(answer.status, 202, "{answer:?}");
        if id != poison {
            neighbours.push(id);
        }
    }
    assert!(
        stored_within(&db, &neighbours, Duration::from_secs(10)).await,
        "the refused event's neighbours wait for it"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!db.stored_ids().await.contains(&poison), "the constraint refuses it");
    take_poison(&db).await;
    let dropped = Instant::now();
    assert!(
        stored_within(&db, &[poison], Duration::from_secs(10)).await,
        "the refused event, acknowledged, is given up"
    );
    println!(
        "RELIABILITY | enqueue: the events table renamed away for 1.5 s, then one event refused by a `CHECK` \
         constraint | 15 | 15 | 0 | the 5 acknowledged while the table was gone stored {table_recovery:.1?} after \
         it came back; the refused event's 8 neighbours stored meanwhile, it {:.1?} after the constraint went | -",
        dropped.elapsed()
    );
    gateway.stop().await;
}

/// In enqueue mode an event Postgres refuses alone is set aside in the hold and does not keep its worker:
/// with a single worker, the events after it are stored while it waits. The hold takes as many as the queue
/// holds; past that the worker keeps the next refused event itself (the events behind it wait), and once
/// the operator puts things right every one of them is stored.
#[tokio::test]
async fn in_enqueue_mode_a_refused_event_is_set_aside_and_does_not_keep_its_worker() {
    let _turn = REFUSALS.lock().await;
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    config.queue.ack_mode = hookgate::config::AckMode::Enqueue;
    config.queue.capacity = 2;
    config.workers.count = 1;
    config.workers.retry_backoff_max_ms = 200;
    let gateway = Gateway::start(config).await;
    let client = client();
    let metrics_url = format!("http://{}/metrics", gateway.admin);
    let held_events = |n: f64| {
        let metrics_url = &metrics_url;
        eventually(Duration::from_secs(10), move || async move {
            scrape_metric(metrics_url, "hookgate_held_events").await == Some(n)
        })
    };
    let first = unique("evt_first");
    assert_eq!(post_stripe(&client, &gateway, &first).await.status, 202);
    assert!(stored_within(&db, &[first], Duration::from_secs(10)).await, "migrated and writing");
    refuse_poison(&db).await;

    let mut posted = Vec::new();
    let mut post = |id: String| {
        posted.push(id.clone());
        let (client, gateway) = (&client, &gateway);
        async move {
            let answer = post_stripe(client, gateway, &id).await;
            assert_eq!(answer.status, 202, "{answer:?}");
            id
        }
    };
    // Two refused events fill the hold (the queue's capacity); the one worker goes on with the queue.
    post(unique("evt_poison")).await;
    post(unique("evt_poison")).await;
    assert!(held_events(2.0).await, "both refused events are set aside");
    let after = post(unique("evt_after")).await;
    let posted_after = Instant::now();
    assert!(stored_within(&db, &[after], Duration::from_secs(10)).await, "the worker writes on while the hold retries");
    let after_stored = posted_after.elapsed();

    // The hold is full: the worker keeps the third refused event, and the event behind it waits.
    post(unique("evt_poison")).await;
    // Posted once the worker has taken it alone (not in a batch with it, which would write its neighbour).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let behind = post(unique("evt_behind")).await;
    assert!(!stored_within(&db, &[behind], Duration::from_secs(1)).await, "the worker keeps the third one");
    assert_eq!(scrape_metric(&metrics_url, "hookgate_held_events").await, Some(2.0));
    assert!(!db.stored_ids().await.iter().any(|id| id.starts_with("evt_poison")), "the constraint refuses them");

    take_poison(&db).await;
    let dropped = Instant::now();
    assert!(stored_within(&db, &posted, Duration::from_secs(10)).await, "an acknowledged event is lost");
    let recovery = dropped.elapsed();
    assert!(held_events(0.0).await, "the hold is empty once they are written");
    assert_eq!(db.count().await, 1 + posted.len() as i64, "each stored once");
    println!(
        "RELIABILITY | enqueue, one worker: three events refused by a `CHECK` constraint, the set-aside hold \
         capped at 2 (the queue's capacity) | 6 | 6 | 0 | the event after the first two stored {after_stored:.1?} \
         after its 202; the third kept the worker and the event behind it waited; all 5 stored {recovery:.1?} \
         after the constraint went | -"
    );
    gateway.stop().await;
}

/// An event set aside is retried through the shutdown's drain, and given up when its time is up: the gateway
/// still stops, and logs it lost, rather than wait for an operator who may not come.
#[tokio::test]
async fn at_shutdown_an_event_still_refused_is_given_up_when_the_drain_runs_out() {
    let _turn = REFUSALS.lock().await;
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    config.queue.ack_mode = hookgate::config::AckMode::Enqueue;
    config.workers.retry_backoff_max_ms = 100;
    config.shutdown.drain_grace_ms = 300;
    let gateway = Gateway::start(config).await;
    let client = client();
    let metrics_url = format!("http://{}/metrics", gateway.admin);
    let first = unique("evt_first");
    assert_eq!(post_stripe(&client, &gateway, &first).await.status, 202);
    assert!(stored_within(&db, &[first], Duration::from_secs(10)).await, "migrated and writing");
    refuse_poison(&db).await;
    assert_eq!(post_stripe(&client, &gateway, &unique("evt_poison")).await.status, 202);
    let set_aside = eventually(Duration::from_secs(10), || async {
        scrape_metric(&metrics_url, "hookgate_held_events").await == Some(1.0)
    });
    assert!(set_aside.await, "the refused event is set aside");
    // Within `Gateway::stop`'s 30 s: the drain's 300 ms, then the abort.
    gateway.stop().await;
    assert_eq!(db.count().await, 1, "the constraint refused it to the end");
}

/// In enqueue mode, with `shutdown.spill_dir`, what the shutdown's drain could not store is not lost: an event
/// set aside (a `CHECK` refuses it) and events a worker holds (the table renamed away) go to the spill file.
/// The next start stores from it what Postgres takes and keeps the rest in the file; once the operator puts
/// things right, a later start stores that too: each event once, with its exact body, on its stream. The file
/// is then left as a process killed while spilling leaves it (not renamed, its last line cut short): the next
/// start finishes it, and keeps the cut line. A damaged file beside it (a line that is not UTF-8) and one that
/// cannot be read are kept as they are, counted, and hold back nothing.
#[tokio::test]
async fn at_shutdown_in_enqueue_mode_what_the_drain_could_not_store_is_spilled_and_stored_at_the_next_start() {
    let _turn = REFUSALS.lock().await;
    let db = TestDb::create().await;
    let spill_dir = scratch("spill");
    let mut config = test_config(&db.url);
    config.queue.ack_mode = hookgate::config::AckMode::Enqueue;
    config.workers.retry_backoff_max_ms = 100;
    config.shutdown.drain_grace_ms = 300;
    config.shutdown.spill_dir = Some(spill_dir.clone());
    let spill_files = || {
        let mut names: Vec<String> = std::fs::read_dir(&spill_dir)
            .expect("spill dir")
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| name.starts_with("spill-"))
            .collect();
        names.sort();
        names
    };
    let gateway = Gateway::start(config.clone()).await;
    let client = client();
    let metrics_url = format!("http://{}/metrics", gateway.admin);
    let first = unique("evt_first");
    assert_eq!(post_stripe(&client, &gateway, &first).await.status, 202);
    assert!(stored_within(&db, std::slice::from_ref(&first), Duration::from_secs(10)).await, "migrated and writing");

    refuse_poison(&db).await;
    let poison = unique("evt_poison");
    // Its body kept, to compare with the one stored at the end (the event's `created` is the time of posting).
    let poison_body = stripe_event(&poison);
    let (url, headers) = (gateway.url("stripe"), stripe_headers(poison_body.as_bytes()));
    assert_eq!(post(&client, &url, &headers, poison_body.as_bytes()).await.status, 202);
    let set_aside = eventually(Duration::from_secs(10), || async {
        scrape_metric(&metrics_url, "hookgate_held_events").await == Some(1.0)
    });
    assert!(set_aside.await, "the refused event is set aside");
    sqlx::query("ALTER TABLE events RENAME TO events_elsewhere").execute(&db.pool).await.expect("rename");
    let held: Vec<String> = (0..3).map(|_| unique("evt_held")).collect();
    for id in &held {
        let answer = post_stripe(&client, &gateway, id).await;
        assert_eq!((answer.status, answer.json["status"].as_str()), (202, Some("queued")), "{answer:?}");
    }
    let stopping = Instant::now();
    gateway.stop().await;
    let stopped_in = stopping.elapsed();
    let files = spill_files();
    assert_eq!(files.len(), 1, "one finished spill file, no partial one: {files:?}");
    let finished = files[0].strip_prefix("spill-").and_then(|name| name.strip_suffix(".jsonl"));
    assert!(finished.is_some(), "finished: spill-<ms>-<pid>.jsonl, not .partial: {files:?}");
    let spilled = std::fs::read_to_string(spill_dir.join(&files[0])).expect("spill file");
    assert_eq!(spilled.lines().count(), 4, "the set-aside event and the three held: {spilled}");
    // As a process killed while spilling leaves it: still `.partial`, its last write cut short.
    let cut = &spilled[..40];
    std::fs::write(spill_dir.join(format!("{}.partial", files[0])), format!("{spilled}{cut}")).expect("partial");
    std::fs::remove_file(spill_dir.join(&files[0])).expect("unfinish");
    // A damaged file beside it, first in name order: a line that is not UTF-8 is kept, and holds back nothing.
    let damaged = "spill-0-0.jsonl".to_owned();
    std::fs::write(spill_dir.join(&damaged), b"\xff\xfe not an event\n").expect("damaged file");
    // And one that cannot be read at all (a directory by a spill file's name): counted as one, left alone.
    let unreadable = "spill-1-1.jsonl".to_owned();
    std::fs::create_dir(spill_dir.join(&unreadable)).expect("unreadable file");

    // The table is back, the constraint still refuses one: the three are stored, the refused one and the cut
    // line stay.
    sqlx::query("ALTER TABLE events_elsewhere RENAME TO events").execute(&db.pool).await.expect("rename back");
    let gateway = Gateway::start(config.clone()).await;
    let metrics_url = format!("http://{}/metrics", gateway.admin);
    assert!(
        stored_within(&db, &held, Duration::from_secs(10)).await,
        "the spilled events are stored at the next start"
    );
    let kept = eventually(Duration::from_secs(10), || async {
        scrape_metric(&metrics_url, "hookgate_spill_pending_events").await == Some(4.0)
    });
    assert!(kept.await, "the refused event, the cut line, the damaged line and the unreadable file are counted");
    assert_eq!(
        spill_files(),
        [damaged.clone(), unreadable.clone(), files[0].clone()],
        "the files stay while something in each is left; the one left partial is finished"
    );
    let left = std::fs::read_to_string(spill_dir.join(&files[0])).expect("spill file");
    let left: Vec<&str> = left.lines().collect();
    assert!(
        left.len() == 2 && left.contains(&cut) && left.iter().any(|line| line.contains(&poison)),
        "only the refused event and the cut line are left: {left:?}"
    );
    assert!(!db.stored_ids().await.contains(&poison), "the constraint refuses it");
    gateway.stop().await;

    take_poison(&db).await;
    let gateway = Gateway::start(config.clone()).await;
    let metrics_url = format!("http://{}/metrics", gateway.admin);
    let restarted = Instant::now();
    assert!(
        stored_within(&db, std::slice::from_ref(&poison), Duration::from_secs(10)).await,
        "stored once Postgres takes it"
    );
    let stored_in = restarted.elapsed();
    let only_broken = eventually(Duration::from_secs(10), || async {
        std::fs::read_to_string(spill_dir.join(&files[0])).is_ok_and(|left| left == format!("{cut}\n"))
    });
    assert!(only_broken.await, "the stored event leaves the file, the cut line stays");
    assert_eq!(spill_files(), [damaged.clone(), unreadable.clone(), files[0].clone()]);
    assert_eq!(scrape_metric(&metrics_url, "hookgate_spill_pending_events").await, Some(3.0));
    assert_eq!(std::fs::read(spill_dir.join(&damaged)).expect("damaged file"), b"\xff\xfe not an event\n");
    // The recorder is this test process's, shared by the two starts: 3 imported at the first, 1 at this one.
    assert_eq!(scrape_metric(&metrics_url, "hookgate_spill_imported_events_total").await, Some(4.0));
    assert_eq!(db.body_of("stripe", &poison).await.as_deref(), Some(poison_body.as_bytes()), "its exact body");
    assert_eq!(db.count().await, 5, "each stored once");
    let all: Vec<String> = [first].into_iter().chain(held.iter().cloned()).chain([poison]).collect();
    assert_published_once(&db, &config.notify.stream_for("stripe"), &all, "spilled events").await;
    gateway.stop().await;
    println!(
        "RELIABILITY | enqueue, `shutdown.spill_dir` set: SIGTERM with one event refused by a `CHECK` and three \
         held while the events table was renamed away | 5 | 5 | 0 | the four written to the spill file when the \
         drain's 300 ms ran out (stopped in {stopped_in:.1?}); the next start stored the three, kept the refused \
         one in the file; the start after the constraint went stored it in {stored_in:.1?}, each event once and \
         on its stream; the file left `.partial` with a cut last line (as a kill while spilling leaves it) \
         finished by the next start, the cut line kept; a damaged and an unreadable spill file beside it kept as \
         they were | -"
    );
}
