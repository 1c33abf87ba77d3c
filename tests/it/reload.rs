//! Secret rotation without a restart: the new secret accepted beside the old once it is in the file (on
//! SIGHUP, or on the reload interval), the old one refused once it is gone, and a file emptied mid-write
//! leaving the secrets in use in place.

use std::path::Path;
use std::time::Duration;

use hookgate::signature::Scheme;

use crate::process::{config_file, GatewayProcess};
use crate::support::*;

const OLD: &str = "whsec_rotation_old_secret";
const NEW: &str = "whsec_rotation_new_secret";

/// Posts one Stripe event signed with `secret`; returns the status.
async fn post_signed_with(url: &str, secret: &str) -> u16 {
    let body = stripe_event(&unique("evt_rotation"));
    post(&client(), url, &sign(Scheme::Stripe, secret, body.as_bytes(), "", now()), body.as_bytes()).await.status
}

/// Waits (10 s at most) until an event signed with `secret` gets `status`.
async fn until_answered(url: &str, secret: &str, status: u16) -> bool {
    eventually(Duration::from_secs(10), || async { post_signed_with(url, secret).await == status }).await
}

fn write_secrets(path: &Path, secrets: &[&str]) {
    std::fs::write(path, secrets.join("\n") + "\n").expect("secret file");
}

#[tokio::test]
async fn a_rotation_is_picked_up_on_sighup_and_an_emptied_file_keeps_the_secrets_in_use() {
    let db = TestDb::create().await;
    let secret_file = std::env::temp_dir().join(unique("hookgate-it-rotation"));
    write_secrets(&secret_file, &[OLD]);
    let (port, admin_port) = (free_port(), free_port());
    let config = config_file(&db.url, port, admin_port);
    let secret_path = secret_file.to_str().expect("utf-8 path");
    let env = [("HOOKGATE__SOURCES__STRIPE__SECRET_FILE", secret_path), ("HOOKGATE__RELOAD__INTERVAL_S", "3600")];
    let gateway = GatewayProcess::start_with(&config, port, admin_port, &env, None).await;
    let url = gateway.url("stripe");
    let hangup = || {
        let status = std::process::Command::new("kill").args(["-HUP", &gateway.child.id().to_string()]).status();
        assert!(status.expect("kill").success());
    };
    let reloads = |result: &'static str| {
        let metrics_url = gateway.metrics_url();
        async move {
            let (_, text) = get_text(&client(), &metrics_url).await;
            let series = format!("hookgate_source_secret_reloads_total{{source=\"stripe\",result=\"{result}\"}} ");
            text.lines().find_map(|l| l.strip_prefix(&series)).and_then(|v| v.parse::<i64>().ok()).unwrap_or(-1)
        }
    };
    assert_eq!(reloads("replaced").await, 0, "the series exists from the start");
    assert_eq!(post_signed_with(&url, OLD).await, 202);
    assert_eq!(post_signed_with(&url, NEW).await, 401, "the new secret is not known yet");

    // The rotation's first step: the new secret beside the old one. Both are accepted after SIGHUP.
    write_secrets(&secret_file, &[NEW, OLD]);
    hangup();
    assert!(until_answered(&url, NEW, 202).await, "the new secret is accepted after SIGHUP");
    assert_eq!(post_signed_with(&url, OLD).await, 202, "the old one still is, during the rotation");
    assert_eq!(reloads("replaced").await, 1);

    // A file caught empty (a write in progress): refused as a reload, and the secrets in use stay.
    write_secrets(&secret_file, &[]);
    hangup();
    assert!(eventually(Duration::from_secs(10), || async { reloads("failed").await == 1 }).await);
    assert_eq!(post_signed_with(&url, NEW).await, 202);
    assert_eq!(post_signed_with(&url, OLD).await, 202);

    // The rotation's end: the old secret removed, and refused from then on.
    write_secrets(&secret_file, &[NEW]);
    hangup();
    assert!(until_answered(&url, OLD, 401).await, "the old secret is refused once it is gone");
    assert_eq!(post_signed_with(&url, NEW).await, 202);
    assert_eq!(reloads("replaced").await, 2);
    // 1 (old) + 1 (first new) + 1 (old, during) + 2 (emptied file) + 1 (after the end); each 202 is stored.
    assert_eq!(db.count().await, 6);
    drop(gateway);
    let _ = std::fs::remove_file(secret_file);
}

#[tokio::test]
async fn a_new_secret_is_picked_up_on_the_reload_interval_without_a_signal() {
    let db = TestDb::create().await;
    let secret_file = std::env::temp_dir().join(unique("hookgate-it-rotation-interval"));
    write_secrets(&secret_file, &[OLD]);
    let mut config = test_config(&db.url);
    if let Some(stripe) = config.sources.get_mut("stripe") {
        stripe.secret_file = Some(secret_file.clone());
    }
    config.reload.interval_s = 1;
    let gateway = Gateway::start(config).await;
    let url = gateway.url("stripe");
    assert!(until_answered(&url, OLD, 202).await);
    assert_eq!(post_signed_with(&url, NEW).await, 401);
    write_secrets(&secret_file, &[NEW]);
    assert!(until_answered(&url, NEW, 202).await, "picked up within a few intervals");
    assert_eq!(post_signed_with(&url, OLD).await, 401);
    gateway.stop().await;
    let _ = std::fs::remove_file(secret_file);
}
