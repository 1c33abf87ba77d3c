//! hookgate-load against real gateways: a run spread over two replicas sharing Postgres and Redis, then
//! the loss audit, which must pass, and must fail once an acknowledged row is deleted.

use std::time::Duration;

use hookgate::config::Config;
use hookgate::signature::Scheme;
use hookgate_load::attack::{self, AttackConfig};
use hookgate_load::payload::PayloadFactory;
use hookgate_load::verify::{self, VerifyConfig};
use sqlx::postgres::PgPoolOptions;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "whsec_e2e_secret";

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run the tests with deploy/test.sh"))
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{prefix}_{nanos:x}_{}", std::process::id())
}

async fn start_gateway(config: Config) -> (String, CancellationToken, tokio::task::JoinHandle<()>) {
    let webhooks = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/webhooks/stripe", webhooks.local_addr().unwrap());
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        hookgate::run(config, hookgate::Listeners { webhooks, admin }, token).await.expect("gateway run");
    });
    (url, stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_over_two_replicas_verifies_and_a_deleted_row_is_reported_lost() {
    let admin_url = env("HOOKGATE_TEST_DATABASE_URL");
    let redis_url = env("HOOKGATE_REDIS_URL");
    let name = unique("hg_e2e");
    let admin = PgPoolOptions::new().max_connections(1).connect(&admin_url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.unwrap();
    let db_url = format!("{}/{name}", admin_url.rsplit_once('/').unwrap().0);

    let secret_file = std::env::temp_dir().join(unique("e2e-secret"));
    std::fs::write(&secret_file, SECRET).unwrap();
    let stream = unique("hg-e2e");
    let mut config =
        Config::from_toml(&format!("[sources.stripe]\nscheme = 'stripe'\nsecret_file = '{}'\n", secret_file.display()))
            .unwrap();
    config.store.url.clone_from(&db_url);
    config.notify.redis_url.clone_from(&redis_url);
    config.notify.stream_key = format!("{stream}:{{source}}");
    config.log.level = "warn".into();
    let (first, stop_first, task_first) = start_gateway(config.clone()).await;
    // The second replica starts once the first has migrated the schema.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (second, stop_second, task_second) = start_gateway(config).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let output = std::env::temp_dir().join(unique("e2e.csv"));
    let factory = PayloadFactory::new(
        Scheme::Stripe,
        SECRET,
        unique("e2e"),
        vec!["charge.succeeded".into()],
        1024,
        None,
        1_700_000_000,
    )
    .unwrap();
    let summary = attack::run(
        AttackConfig {
            targets: vec![first.parse().unwrap(), second.parse().unwrap()],
            rate: 500.0,
            concurrency: 0,
            duration: Some(Duration::from_secs(3)),
            requests: None,
            connections: 16,
            http2: false,
            timeout: Duration::from_secs(10),
            warmup: Duration::ZERO,
            pace_quantum: Duration::ZERO,
            duplicate_ratio: 0.05,
            bad_signature_ratio: 0.02,
            output: Some(output.clone()),
            progress: false,
            scheme: "stripe".into(),
        },
        factory,
    )
    .await
    .unwrap()
    .summary;
    assert_eq!(summary.successful(), summary.requests, "{:?}", summary.status_codes);

    let audit = VerifyConfig {
        files: vec![output.clone()],
        database_url: db_url.clone(),
        redis_url: Some(redis_url),
        stream_key: format!("{stream}:{{source}}"),
    };
    // Notifications follow the commit asynchronously: wait for the streams to catch up.
    let mut report = verify::run(&audit).await.unwrap();
    for _ in 0..50 {
        if report.ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        report = verify::run(&audit).await.unwrap();
    }
    assert!(report.ok(), "{report:?}");
    assert!(report.acknowledged > 1000, "{report:?}");
    assert_eq!(report.stored, report.acknowledged);
    assert_eq!(report.on_stream, report.acknowledged);
    assert_eq!(report.extra_stream_entries, 0, "in the normal path each event is published once");

    // Lose one acknowledged event behind the gateway's back: the audit must say so.
    let pool = PgPoolOptions::new().max_connections(1).connect(&db_url).await.unwrap();
    sqlx::query("DELETE FROM events WHERE seq = (SELECT min(seq) FROM events)").execute(&pool).await.unwrap();
    let report = verify::run(&audit).await.unwrap();
    assert_eq!(report.lost, 1, "{report:?}");
    assert!(!report.ok());

    stop_first.cancel();
    stop_second.cancel();
    let _ = tokio::join!(task_first, task_second);
    let _ = std::fs::remove_file(output);
    let _ = std::fs::remove_file(secret_file);
}
