//! The admin port: metrics after traffic, and readiness that follows Postgres going away and coming back.

use std::process::Command;
use std::time::Duration;

use crate::support::*;

#[tokio::test]
async fn metrics_show_the_named_series_after_traffic() {
    let db = TestDb::create().await;
    let gateway = Gateway::start(test_config(&db.url)).await;
    let client = client();
    let id = unique("evt");
    assert_eq!(post_stripe(&client, &gateway, &id).await.status, 202);
    assert_eq!(post_stripe(&client, &gateway, &id).await.status, 202);
    let bad = post(&client, &gateway.url("stripe"), &[], b"{}").await;
    assert_eq!(bad.status, 401);

    let (status, text) = get_text(&client, &format!("http://{}/metrics", gateway.admin)).await;
    assert_eq!(status, 200);
    // The 202s are counted; which bucket they fall in is a timing, which this test does not assert.
    for needle in [
        r#"http_server_request_duration_seconds_bucket{method="POST",route="/webhooks/{source}",status="202",le="0.005"}"#,
        r#"http_server_request_duration_seconds_count{method="POST",route="/webhooks/{source}",status="202"}"#,
        r#"hookgate_signature_failures_total{source="stripe",reason="missing_header"}"#,
        r#"hookgate_events_total{source="stripe",outcome="inserted"}"#,
        r#"hookgate_events_total{source="stripe",outcome="duplicate"}"#,
        "hookgate_batch_size_bucket",
        "hookgate_store_commit_duration_seconds_bucket",
        "hookgate_queue_depth",
    ] {
        let line = text.lines().find(|l| l.starts_with(needle)).unwrap_or_else(|| panic!("no {needle} in\n{text}"));
        if needle.contains("_total") || needle.contains("_count") {
            let value: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
            assert!(value > 0.0, "{line}");
        }
    }
    let count_line = text.lines().find(|l| l.starts_with("hookgate_batch_size_count")).expect("batch count");
    assert!(!count_line.ends_with(" 0"), "{count_line}");
    let (status, _) = get_text(&client, &format!("http://{}/healthz", gateway.admin)).await;
    assert_eq!(status, 200);
    gateway.stop().await;
}

/// Runs deploy/services.sh for a private Postgres in `dir` on `port`.
pub fn private_postgres(action: &str, dir: &std::path::Path, port: u16) {
    private_postgres_with(action, dir, port, &[]);
}

/// As `private_postgres`, with further settings for services.sh in its environment.
pub fn private_postgres_with(action: &str, dir: &std::path::Path, port: u16, env: &[(&str, &str)]) {
    let status = Command::new("bash")
        .arg(repo_root().join("deploy/services.sh"))
        .arg(action)
        .env("HOOKGATE_STATE_DIR", dir)
        .env("HOOKGATE_PG_PORT", port.to_string())
        .envs(env.iter().copied())
        .status()
        .expect("run deploy/services.sh");
    assert!(status.success(), "services.sh {action} failed");
}

#[tokio::test]
async fn readyz_follows_postgres_down_and_back() {
    let dir = std::env::temp_dir().join(unique("hookgate-it-pg"));
    let port = free_port();
    private_postgres("start-postgres", &dir, port);
    let db = TestDb::create_on(&format!("postgres://postgres@127.0.0.1:{port}/postgres")).await;
    let gateway = Gateway::start(test_config(&db.url)).await;
    let client = client();
    let ready = format!("http://{}/readyz", gateway.admin);
    assert!(eventually(Duration::from_secs(5), || async { get_text(&client, &ready).await.0 == 200 }).await);
    db.pool.close().await;

    private_postgres("stop-postgres", &dir, port);
    assert!(
        eventually(Duration::from_secs(10), || async { get_text(&client, &ready).await.0 == 503 }).await,
        "/readyz must turn not-ready while Postgres is down"
    );
    let (_, body) = get_text(&client, &ready).await;
    assert!(body.contains("\"database\":\"unreachable\"") || body.contains("\"database\":\"timeout\""), "{body}");
    // A webhook meanwhile is refused with 503, never acknowledged.
    let answer = tokio::time::timeout(Duration::from_secs(15), post_stripe(&client, &gateway, &unique("evt")))
        .await
        .expect("answer within the request timeout");
    assert_eq!(answer.status, 503, "{answer:?}");

    private_postgres("start-postgres", &dir, port);
    assert!(
        eventually(Duration::from_secs(15), || async { get_text(&client, &ready).await.0 == 200 }).await,
        "/readyz must be ready again once Postgres is back"
    );
    let answer = post_stripe(&client, &gateway, &unique("evt")).await;
    assert_eq!(answer.status, 202, "{answer:?}");
    gateway.stop().await;
    private_postgres("stop-postgres", &dir, port);
    let _ = std::fs::remove_dir_all(&dir);
}
