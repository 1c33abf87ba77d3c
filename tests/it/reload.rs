//! Secret rotation without a restart: the new secret accepted beside the old once it is in the file (on
//! SIGHUP, or on the reload interval), the old one refused once it is gone, and a file emptied mid-write
//! leaving the secrets in use in place.

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use hookgate::signature::Scheme;

use crate::process::{config_file, GatewayProcess};
use crate::support::*;

const OLD: &str = "whsec_rotation_old_secret";
const NEW: &str = "whsec_rotation_new_secret";

/// Posts Stripe events signed with a secret of the test's choosing, counting the 202s (each one stored).
struct Sender {
    url: String,
    accepted: AtomicI64,
}

impl Sender {
    fn new(url: String) -> Self {
        Self { url, accepted: AtomicI64::new(0) }
    }

    /// Posts one event signed with `secret`; returns the status.
    async fn post_signed_with(&self, secret: &str) -> u16 {
        let body = stripe_event(&unique("evt_rotation"));
        let headers = sign(Scheme::Stripe, secret, body.as_bytes(), "", now());
        let status = post(&client(), &self.url, &headers, body.as_bytes()).await.status;
        if status == 202 {
            self.accepted.fetch_add(1, Ordering::Relaxed);
        }
        status
    }

    /// Posts (for 10 s at most) until an event signed with `secret` gets `status`.
    async fn until_answered(&self, secret: &str, status: u16) -> bool {
        eventually(Duration::from_secs(10), || async { self.post_signed_with(secret).await == status }).await
    }

    fn accepted(&self) -> i64 {
        self.accepted.load(Ordering::Relaxed)
    }
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
    let sender = Sender::new(gateway.url("stripe"));
    let reloads = |result: &'static str| {
        let metrics_url = gateway.metrics_url();
        async move {
            let series = format!("hookgate_source_secret_reloads_total{{source=\"stripe\",result=\"{result}\"}}");
            scrape_metric(&metrics_url, &series).await.map_or(-1, |v| v as i64)
        }
    };
    assert_eq!(reloads("replaced").await, 0, "the series exists from the start");
    assert_eq!(sender.post_signed_with(OLD).await, 202);
    assert_eq!(sender.post_signed_with(NEW).await, 401, "the new secret is not known yet");

    // The rotation's first step: the new secret beside the old one. Both are accepted after SIGHUP.
    write_secrets(&secret_file, &[NEW, OLD]);
    gateway.signal("HUP");
    assert!(sender.until_answered(NEW, 202).await, "the new secret is accepted after SIGHUP");
    assert_eq!(sender.post_signed_with(OLD).await, 202, "the old one still is, during the rotation");
    assert!(eventually(Duration::from_secs(10), || async { reloads("replaced").await == 1 }).await);

    // A file caught empty (a write in progress): refused as a reload, and the secrets in use stay.
    write_secrets(&secret_file, &[]);
    gateway.signal("HUP");
    assert!(eventually(Duration::from_secs(10), || async { reloads("failed").await == 1 }).await);
    assert_eq!(sender.post_signed_with(NEW).await, 202);
    assert_eq!(sender.post_signed_with(OLD).await, 202);

    // The rotation's end: the old secret removed, and refused from then on.
    write_secrets(&secret_file, &[NEW]);
    gateway.signal("HUP");
    assert!(sender.until_answered(OLD, 401).await, "the old secret is refused once it is gone");
    assert_eq!(sender.post_signed_with(NEW).await, 202);
    assert!(eventually(Duration::from_secs(10), || async { reloads("replaced").await == 2 }).await);
    // Every 202 is stored, once; the refused requests are not.
    assert_eq!(db.count().await, sender.accepted());
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
    let sender = Sender::new(gateway.url("stripe"));
    assert!(sender.until_answered(OLD, 202).await);
    assert_eq!(sender.post_signed_with(NEW).await, 401);
    write_secrets(&secret_file, &[NEW]);
    assert!(sender.until_answered(NEW, 202).await, "picked up within a few intervals");
    assert_eq!(sender.post_signed_with(OLD).await, 401);
    assert_eq!(db.count().await, sender.accepted());
    gateway.stop().await;
    let _ = std::fs::remove_file(secret_file);
}

#[tokio::test]
async fn a_broken_address_file_does_not_hold_back_a_rotation_nor_a_broken_secret_file_an_address_change() {
    let db = TestDb::create().await;
    let (secret_file, address_file) = (
        std::env::temp_dir().join(unique("hookgate-it-both-secrets")),
        std::env::temp_dir().join(unique("hookgate-it-both-ips")),
    );
    write_secrets(&secret_file, &[OLD]);
    std::fs::write(&address_file, "127.0.0.1\n").expect("address file");
    let mut config = test_config(&db.url);
    // A source of this test's own: the metrics recorder is shared by every test in this process.
    let name = unique("both");
    let mut source = config.sources["stripe"].clone();
    (source.secret_env, source.secret_file, source.allowed_ips_file) =
        (None, Some(secret_file.clone()), Some(address_file.clone()));
    config.sources.insert(name.clone(), source);
    config.reload.interval_s = 1;
    let gateway = Gateway::start(config).await;
    let sender = Sender::new(gateway.url(&name));
    let metrics_url = format!("http://{}/metrics", gateway.admin);
    let count = |kind: &'static str, result: &'static str| {
        let (metrics_url, name) = (metrics_url.clone(), name.clone());
        async move {
            let series = format!("hookgate_source_{kind}_reloads_total{{source=\"{name}\",result=\"{result}\"}}");
            scrape_metric(&metrics_url, &series).await
        }
    };
    assert_eq!(
        count("address", "failed").await,
        Some(0.0),
        "exported from the start for a source with an address file"
    );
    assert_eq!(sender.post_signed_with(OLD).await, 202);

    // The address list's refresh job leaves an empty file just as the secret rotation starts: the new
    // secret is taken, and the list in use (127.0.0.1) stays.
    std::fs::write(&address_file, "").expect("emptied");
    write_secrets(&secret_file, &[NEW, OLD]);
    assert!(sender.until_answered(NEW, 202).await, "the new secret is accepted despite the broken address file");
    assert!(eventually(Duration::from_secs(5), || async { count("address", "failed").await >= Some(1.0) }).await);
    assert_eq!(count("secret", "replaced").await, Some(1.0));
    assert_eq!(count("secret", "failed").await, Some(0.0));

    // The other way round: a secret file caught empty does not hold back the new address list, which no
    // longer holds 127.0.0.1.
    write_secrets(&secret_file, &[]);
    std::fs::write(&address_file, "192.0.2.0/24\n").expect("address file");
    assert!(sender.until_answered(NEW, 403).await, "the new list is applied despite the broken secret file");
    assert!(eventually(Duration::from_secs(5), || async { count("secret", "failed").await >= Some(1.0) }).await);
    assert_eq!(count("address", "replaced").await, Some(1.0));

    assert_eq!(db.count().await, sender.accepted(), "every 202 is stored");
    gateway.stop().await;
    let _ = std::fs::remove_file(secret_file);
    let _ = std::fs::remove_file(address_file);
}

#[tokio::test]
async fn sighup_applies_a_new_log_level_at_once_and_names_the_keys_that_wait_for_a_restart() {
    let db = TestDb::create().await;
    let (port, admin_port) = (free_port(), free_port());
    let config = config_file(&db.url, port, admin_port);
    let log = std::env::temp_dir().join(format!("{}.log", unique("hookgate-it-loglevel")));
    let env = [("HOOKGATE__LOG__FORMAT", "json"), ("HOOKGATE__RELOAD__INTERVAL_S", "3600")];
    let gateway = GatewayProcess::start_with(&config, port, admin_port, &env, Some(&log)).await;
    let unsigned =
        || async { post(&client(), &gateway.url("stripe"), &[], stripe_event("evt_x").as_bytes()).await.status };
    let logged = |part: &'static str| {
        let log = log.clone();
        move || {
            let log = log.clone();
            async move { !crate::process::json_log_lines_with(&log, part).1.is_empty() }
        }
    };
    let pending = || async { scrape_metric(&gateway.metrics_url(), "hookgate_config_restart_pending").await };
    assert_eq!(unsigned().await, 401);
    assert!(!logged("refused")().await, "no debug lines at the level the gateway started with");
    assert_eq!(pending().await, Some(0.0));
    let original = std::fs::read_to_string(&config).expect("config");
    assert!(original.contains("level = 'warn'"), "{original}");

    // Debug logs for a while, and a key that only a restart applies.
    let edited = original
        .replace("level = 'warn'", "level = 'debug'")
        .replace("[server]\n", "[server]\nmax_connections = 100\n");
    std::fs::write(&config, &edited).expect("edited config");
    gateway.signal("HUP");
    assert!(eventually(Duration::from_secs(10), logged("log level changed")).await, "the new level is applied");
    assert_eq!(unsigned().await, 401);
    assert!(eventually(Duration::from_secs(5), logged("refused")).await, "the refusal is logged at debug now");
    let (text, warnings) = crate::process::json_log_lines_with(&log, "take effect only on restart");
    assert_eq!(warnings.len(), 1, "{text}");
    assert_eq!(warnings[0]["keys"], "server.max_connections", "the level is not among them: {text}");
    assert_eq!(pending().await, Some(1.0));

    // A file that does not load changes nothing: the debug level stays.
    std::fs::write(&config, edited.replace("level = 'debug'", "level = ''")).expect("broken config");
    gateway.signal("HUP");
    assert!(eventually(Duration::from_secs(10), logged("configuration file not reloaded")).await);
    // Back to the file the gateway started with: nothing waits for a restart any more.
    std::fs::write(&config, &original).expect("original config");
    gateway.signal("HUP");
    assert!(eventually(Duration::from_secs(10), || async { pending().await == Some(0.0) }).await);
    let (text, changes) = crate::process::json_log_lines_with(&log, "log level changed");
    assert_eq!(changes.len(), 2, "debug, then warn again: {text}");
    assert_eq!((&changes[1]["level"], &changes[1]["before"]), (&"warn".into(), &"debug".into()), "{text}");
    drop(gateway);
    let _ = std::fs::remove_file(log);
}

#[tokio::test]
async fn sighup_applies_changed_added_and_removed_sources_and_a_setting_that_does_not_load_changes_none_of_a_source() {
    let db = TestDb::create().await;
    let (port, admin_port) = (free_port(), free_port());
    let config = config_file(&db.url, port, admin_port);
    let log = std::env::temp_dir().join(format!("{}.log", unique("hookgate-it-sources")));
    let env = [("HOOKGATE__LOG__FORMAT", "json"), ("HOOKGATE__RELOAD__INTERVAL_S", "3600")];
    let gateway = GatewayProcess::start_with(&config, port, admin_port, &env, Some(&log)).await;
    let accepted = std::cell::RefCell::new(std::collections::HashSet::new());
    let post_one = || {
        let id = unique("evt_settings");
        accepted.borrow_mut().insert(id.clone());
        let url = gateway.url("stripe");
        async move { post_stripe_with(&client(), &url, &id).await.status }
    };
    let pending = || async { scrape_metric(&gateway.metrics_url(), "hookgate_config_restart_pending").await };
    assert_eq!(post_one().await, 202);
    let original = std::fs::read_to_string(&config).expect("config");

    // The source takes only its sender's addresses now (the test posts from 127.0.0.1), and a server key
    // changes beside it, which waits for a restart.
    let listed = original
        .replace("[sources.stripe]\n", "[sources.stripe]\nallowed_ips = ['192.0.2.0/24']\ntolerance_s = 60\n")
        .replace("[server]\n", "[server]\nmax_connections = 100\n");
    std::fs::write(&config, &listed).expect("edited config");
    gateway.signal("HUP");
    // Posted until one is refused: any accepted before the signal is handled is stored, and counted so.
    let refused = || async {
        let id = unique("evt_refused");
        let status = post_stripe_with(&client(), &gateway.url("stripe"), &id).await.status;
        if status == 202 {
            accepted.borrow_mut().insert(id);
        }
        status == 403
    };
    assert!(eventually(Duration::from_secs(10), refused).await, "the new allowed_ips applies without a restart");
    let refusals = r#"hookgate_address_refusals_total{source="stripe",signature="valid"}"#;
    assert!(scrape_metric(&gateway.metrics_url(), refusals).await >= Some(1.0), "counted as for a list from start");
    let (text, warnings) = crate::process::json_log_lines_with(&log, "take effect only on restart");
    assert_eq!(warnings.len(), 1, "{text}");
    assert_eq!(warnings[0]["keys"], "server.max_connections", "the source's settings are not among them: {text}");
    assert_eq!(pending().await, Some(1.0));

    // The list removed, but the secret now read from a file that is not there: none of it applies.
    let broken = listed.replace("allowed_ips = ['192.0.2.0/24']\n", "").replace("/stripe'\n", "/not-there-yet'\n");
    assert_ne!(broken, listed.replace("allowed_ips = ['192.0.2.0/24']\n", ""), "the secret file's path is edited");
    std::fs::write(&config, &broken).expect("broken source config");
    gateway.signal("HUP");
    let logged = || async { !crate::process::json_log_lines_with(&log, "source settings not applied").1.is_empty() };
    assert!(eventually(Duration::from_secs(10), logged).await, "the failure is logged");
    assert!(refused().await, "the list in use stays: the change is applied whole or not at all");

    // The file the gateway started with: the source is open again and nothing waits.
    std::fs::write(&config, &original).expect("original config");
    gateway.signal("HUP");
    assert!(eventually(Duration::from_secs(10), || async { pending().await == Some(0.0) }).await);
    assert_eq!(post_one().await, 202, "the list is gone again");

    // A new sender (signing as Stripe does, with the stripe source's secret file) and one taken out.
    let start = original.find("[sources.stripe]\n").expect("stripe section");
    let end = original[start..].find("[sources.standard]").expect("next section") + start;
    let partner = original[start..end].replace("[sources.stripe]", "[sources.partner]");
    let github_start = original.find("[sources.github]\n").expect("github section");
    let github_end = original[github_start..].find("\n[").map_or(original.len(), |n| github_start + n + 1);
    let replaced = format!("{}{}{partner}", &original[..github_start], &original[github_end..]);
    std::fs::write(&config, &replaced).expect("sources added and removed");
    gateway.signal("HUP");
    let added = || async {
        let id = unique("evt_partner");
        let answer = post_stripe_with(&client(), &gateway.url("partner"), &id).await;
        (answer.status == 202).then_some(id)
    };
    let mut first = None;
    for _ in 0..100 {
        first = added().await;
        if first.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let partner_id = first.expect("the added source is received without a restart");
    assert!(db.body_of("partner", &partner_id).await.is_some(), "stored under the new source's name");
    accepted.borrow_mut().insert(partner_id);
    let series = r#"hookgate_signature_failures_total{source="partner",reason="bad_signature"}"#;
    assert_eq!(scrape_metric(&gateway.metrics_url(), series).await, Some(0.0), "its series are exported at once");
    let github = post(&client(), &gateway.url("github"), &[], b"{}").await;
    assert_eq!((github.status, github.kind()), (404, "unknown_source"), "{github:?}");
    assert_eq!(post_one().await, 202, "the other sources are untouched");
    assert_eq!(pending().await, Some(0.0), "nothing of it waits for a restart");

    // A file that lost every source is not applied: the senders are not all turned away.
    let server = original.find("[server]\n").expect("server section");
    assert!(!original[server..].contains("[sources."), "the sources come first");
    std::fs::write(&config, &original[server..]).expect("no sources");
    gateway.signal("HUP");
    let logged = || async { !crate::process::json_log_lines_with(&log, "configures no source").1.is_empty() };
    assert!(eventually(Duration::from_secs(10), logged).await, "the refusal is logged");
    assert_eq!(post_one().await, 202, "the sources in use stay");
    drop(gateway);
    assert_eq!(db.stored_ids().await, accepted.into_inner(), "every accepted event, and no refused one, is stored");
    let _ = std::fs::remove_file(log);
}

#[tokio::test]
async fn with_watch_config_an_edit_applies_on_the_interval_and_a_restart_key_is_warned_about_once() {
    let db = TestDb::create().await;
    let (port, admin_port) = (free_port(), free_port());
    let config = config_file(&db.url, port, admin_port);
    let original = std::fs::read_to_string(&config).expect("config");
    let watched = original
        .replace("[log]\n", "[reload]\ninterval_s = 1\nwatch_config = true\n[log]\n")
        .replace("level = 'warn'", "level = 'info'");
    std::fs::write(&config, &watched).expect("watching config");
    let log = std::env::temp_dir().join(format!("{}.log", unique("hookgate-it-watch")));
    let gateway =
        GatewayProcess::start_with(&config, port, admin_port, &[("HOOKGATE__LOG__FORMAT", "json")], Some(&log)).await;
    let status = || async { post_stripe_with(&client(), &gateway.url("stripe"), &unique("evt_watch")).await.status };
    assert_eq!(status().await, 202);

    // Replaced whole, as the kubelet swaps a ConfigMap: no signal.
    let listed = watched
        .replace("[sources.stripe]\n", "[sources.stripe]\nallowed_ips = ['192.0.2.0/24']\n")
        .replace("[server]\n", "[server]\nmax_connections = 100\n");
    let next = config.with_extension("next");
    std::fs::write(&next, &listed).expect("next config");
    std::fs::rename(&next, &config).expect("swapped in");
    assert!(eventually(Duration::from_secs(10), || async { status().await == 403 }).await, "applied on the interval");
    let pending = || async { scrape_metric(&gateway.metrics_url(), "hookgate_config_restart_pending").await };
    assert_eq!(pending().await, Some(1.0));
    // Three more intervals with the file unchanged: it is not read again, so the warning is not repeated.
    tokio::time::sleep(Duration::from_millis(3_200)).await;
    let (text, warnings) = crate::process::json_log_lines_with(&log, "take effect only on restart");
    assert_eq!(warnings.len(), 1, "{text}");
    assert_eq!(warnings[0]["keys"], "server.max_connections", "{text}");
    let (text, reads) = crate::process::json_log_lines_with(&log, "changed: reading it again");
    assert_eq!(reads.len(), 1, "read once per change: {text}");

    std::fs::write(&next, &watched).expect("next config");
    std::fs::rename(&next, &config).expect("swapped back");
    assert!(eventually(Duration::from_secs(10), || async { status().await == 202 }).await, "the list is gone again");
    assert!(eventually(Duration::from_secs(5), || async { pending().await == Some(0.0) }).await);
    drop(gateway);
    let _ = std::fs::remove_file(log);
}

#[tokio::test]
async fn sighup_applies_new_balancers_and_trusted_proxies_without_a_restart() {
    use crate::proxy_protocol::{closed_without_answer, through_balancer, v1_header};
    let db = TestDb::create().await;
    let (port, admin_port) = (free_port(), free_port());
    let config = config_file(&db.url, port, admin_port);
    let original = std::fs::read_to_string(&config).expect("config");
    // The balancer is about to move to 127.0.0.1; the sender's proxy tier at 192.0.2.0/24 is not trusted yet.
    let before = original
        .replace("[server]\n", "[server]\nproxy_protocol = true\nproxy_protocol_from = ['127.0.0.2']\n")
        .replace("[sources.stripe]\n", "[sources.stripe]\nallowed_ips = ['198.51.100.0/24']\n");
    std::fs::write(&config, &before).expect("config");
    let gateway = GatewayProcess::start(&config, port, admin_port).await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let header = v1_header("192.0.2.7:40000");
    assert!(closed_without_answer(addr, &header).await, "127.0.0.1 is not a listed balancer yet");

    let after = before.replace(
        "proxy_protocol_from = ['127.0.0.2']",
        "proxy_protocol_from = ['127.0.0.1']\ntrusted_proxies = ['192.0.2.0/24']",
    );
    std::fs::write(&config, &after).expect("edited config");
    gateway.signal("HUP");
    // Answered at all (an unsigned request after the header: 401) once 127.0.0.1 is a listed balancer.
    let mut unsigned = header.clone();
    unsigned.extend_from_slice(
        b"POST /webhooks/stripe HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    );
    let answered = || async { !closed_without_answer(addr, &unsigned).await };
    assert!(eventually(Duration::from_secs(10), answered).await, "the new balancer applies without a restart");
    // The balancer names the proxy tier, whose X-Forwarded-For names the sender: both lists are needed.
    let mut sender = through_balancer(addr, &header).await;
    let (id, answer) = post_signed_on(&mut sender, "stripe", &[("x-forwarded-for", "198.51.100.9")]).await;
    assert_eq!(answer.status, 202, "the new trusted proxies apply too: {answer:?}");
    let pending = scrape_metric(&gateway.metrics_url(), "hookgate_config_restart_pending").await;
    assert_eq!(pending, Some(0.0), "nothing waits for a restart");
    drop(gateway);
    assert_eq!(db.stored_ids().await, [id].into());
}

#[tokio::test]
async fn sighup_applies_a_new_max_queued_and_the_events_held_under_the_old_one_still_count() {
    use crate::overload::{assert_all_stored, deliver_at_once, pause_store, sort_answers, stripe_events};
    let db = TestDb::create().await;
    let (port, admin_port) = (free_port(), free_port());
    let config = config_file(&db.url, port, admin_port);
    let original = std::fs::read_to_string(&config).expect("config");
    let with_share =
        |n: usize| original.replace("[sources.stripe]\n", &format!("[sources.stripe]\nmax_queued = {n}\n"));
    std::fs::write(&config, with_share(3)).expect("config with a share");
    let log = std::env::temp_dir().join(format!("{}.log", unique("hookgate-it-share")));
    let env = [
        ("HOOKGATE__LOG__FORMAT", "json"),
        ("HOOKGATE__LOG__LEVEL", "info"),
        ("HOOKGATE__RELOAD__INTERVAL_S", "3600"),
        ("HOOKGATE__QUEUE__RETRY_AFTER_S", "3"),
        ("HOOKGATE__SERVER__REQUEST_TIMEOUT_MS", "30000"),
    ];
    let gateway = GatewayProcess::start_with(&config, port, admin_port, &env, Some(&log)).await;
    assert_eq!(post_stripe_with(&client(), &gateway.url("stripe"), &unique("warm")).await.status, 202);
    let metric = |name: &'static str| {
        let url = gateway.metrics_url();
        async move { scrape_metric(&url, &format!("{name}{{source=\"stripe\"}}")).await }
    };

    // The store paused: three of six are held, the other three refused.
    let pause = pause_store(&db).await;
    let first = deliver_at_once(&gateway.url("stripe"), stripe_events(6));
    let held = |n: f64| {
        eventually(
            Duration::from_secs(10),
            move || async move { metric("hookgate_source_queued_events").await == Some(n) },
        )
    };
    let refused = |n: f64| {
        eventually(Duration::from_secs(10), move || async move {
            metric("hookgate_source_share_rejections_total").await == Some(n)
        })
    };
    assert!(held(3.0).await && refused(3.0).await, "max_queued = 3 holds three of six");

    // The share raised to five while those three are held: two more are taken, not five.
    std::fs::write(&config, with_share(5)).expect("config with a larger share");
    gateway.signal("HUP");
    let applied = || async {
        let (_, lines) = crate::process::json_log_lines_with(&log, "source settings applied");
        lines
            .iter()
            .any(|line| line["source"] == "stripe" && line["keys"].as_str().is_some_and(|k| k.contains("max_queued")))
    };
    assert!(eventually(Duration::from_secs(10), applied).await, "the new max_queued is applied on SIGHUP");
    let second = deliver_at_once(&gateway.url("stripe"), stripe_events(6));
    assert!(held(5.0).await, "the new share applies, and the events held under the old one count against it");
    assert!(refused(7.0).await, "four of the second six refused");
    pause.rollback().await.expect("unlock");

    let (first_acknowledged, first_refused) = sort_answers(first, "source_share_full", "3").await;
    let (second_acknowledged, second_refused) = sort_answers(second, "source_share_full", "3").await;
    assert_eq!((first_acknowledged.len(), first_refused), (3, 3));
    assert_eq!((second_acknowledged.len(), second_refused), (2, 4));
    assert_all_stored(&db, &first_acknowledged).await;
    assert_all_stored(&db, &second_acknowledged).await;
    assert!(held(0.0).await, "written, the events give their slots back");
    drop(gateway);
    let _ = std::fs::remove_file(log);
}
