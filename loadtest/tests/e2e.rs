//! hookgate-load against real gateways: a run spread over two replicas sharing Postgres and Redis, then
//! the loss audit, which must pass, and must fail once an acknowledged row is deleted; and GitHub-signed
//! runs with UUID event ids, audited the same way; and a run over HTTPS, HTTP/1.1 and h2.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hookgate::config::Config;
use hookgate::signature::Scheme;
use hookgate_load::attack::{self, AttackConfig, ProxyHeader, ProxyVersion};
use hookgate_load::payload::{IdOrder, PayloadFactory};
use hookgate_load::tls::ClientTls;
use hookgate_load::verify::{self, VerifyConfig, VerifyReport};
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

async fn start_gateway(config: Config, source: &str) -> (String, CancellationToken, tokio::task::JoinHandle<()>) {
    let webhooks = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let scheme = if config.server.tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{}/webhooks/{source}", webhooks.local_addr().unwrap());
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        hookgate::run(config, hookgate::Listeners { webhooks, admin }, token, CancellationToken::new())
            .await
            .expect("gateway run");
    });
    (url, stop, task)
}

/// A fresh database and stream for one test, and a gateway configuration serving `source` (its scheme
/// has the same name) on them. Returns the configuration, the database's URL and the secret's file.
async fn fresh_setup(source: &str) -> (Config, String, PathBuf) {
    let admin_url = env("HOOKGATE_TEST_DATABASE_URL");
    let name = unique("hg_e2e");
    let admin = PgPoolOptions::new().max_connections(1).connect(&admin_url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.unwrap();
    let db_url = format!("{}/{name}", admin_url.rsplit_once('/').unwrap().0);
    let secret_file = std::env::temp_dir().join(unique("e2e-secret"));
    std::fs::write(&secret_file, SECRET).unwrap();
    let mut config = Config::from_toml(&format!(
        "[sources.{source}]\nscheme = '{source}'\nsecret_file = '{}'\n",
        secret_file.display()
    ))
    .unwrap();
    config.store.url.clone_from(&db_url);
    config.notify.redis_url = env("HOOKGATE_REDIS_URL");
    config.notify.stream_key = format!("{}:{{source}}", unique("hg-e2e"));
    config.log.level = "warn".into();
    (config, db_url, secret_file)
}

/// 1 KiB `charge.succeeded` events signed with the test secret, ids prefixed with a unique `prefix`.
fn stripe_factory(prefix: &str) -> PayloadFactory {
    PayloadFactory::new(
        Scheme::Stripe,
        SECRET,
        unique(prefix),
        vec!["charge.succeeded".into()],
        1024,
        None,
        1_700_000_000,
    )
    .unwrap()
}

/// An open-loop run of `seconds` at `rate`, 5% duplicates and 2% bad signatures, results to `output`.
fn attack_config(targets: &[&str], rate: f64, seconds: u64, scheme: &str, output: &Path) -> AttackConfig {
    AttackConfig {
        targets: targets.iter().map(|t| t.parse().unwrap()).collect(),
        rate,
        concurrency: 0,
        duration: Some(Duration::from_secs(seconds)),
        requests: None,
        connections: 16,
        http2: false,
        tls: None,
        timeout: Duration::from_secs(10),
        warmup: Duration::ZERO,
        pace_quantum: Duration::ZERO,
        duplicate_ratio: 0.05,
        bad_signature_ratio: 0.02,
        output: Some(output.to_path_buf()),
        progress: false,
        scheme: scheme.into(),
        proxy_header: None,
    }
}

/// The loss audit of `output`, repeated until it passes or 5 s have gone by: notifications follow the
/// commit asynchronously, so the streams may still be catching up.
async fn audit_until_ok(output: &Path, config: &Config) -> (VerifyConfig, VerifyReport) {
    let audit = VerifyConfig {
        files: vec![output.to_path_buf()],
        database_url: config.store.url.clone(),
        redis_url: Some(config.notify.redis_url.clone()),
        stream_key: config.notify.stream_key.clone(),
    };
    let mut report = verify::run(&audit).await.unwrap();
    for _ in 0..50 {
        if report.ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        report = verify::run(&audit).await.unwrap();
    }
    (audit, report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_over_two_replicas_verifies_and_a_deleted_row_is_reported_lost() {
    let (config, db_url, secret_file) = fresh_setup("stripe").await;
    let (first, stop_first, task_first) = start_gateway(config.clone(), "stripe").await;
    // The second replica starts once the first has migrated the schema.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (second, stop_second, task_second) = start_gateway(config.clone(), "stripe").await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let output = std::env::temp_dir().join(unique("e2e.csv"));
    let factory = stripe_factory("e2e");
    let summary =
        attack::run(attack_config(&[&first, &second], 500.0, 3, "stripe", &output), factory).await.unwrap().summary;
    assert_eq!(summary.successful(), summary.requests, "{:?}", summary.status_codes);

    let (audit, report) = audit_until_ok(&output, &config).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_runs_with_time_based_and_random_uuids_are_stored_once_and_audited() {
    let (config, db_url, secret_file) = fresh_setup("github").await;
    let (target, stop, task) = start_gateway(config.clone(), "github").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pool = PgPoolOptions::new().max_connections(1).connect(&db_url).await.unwrap();
    for (order, version) in [(IdOrder::TimeUuid, '1'), (IdOrder::Random, '4')] {
        let output = std::env::temp_dir().join(unique("e2e-github.csv"));
        let factory =
            PayloadFactory::new(Scheme::Github, SECRET, unique("gh"), vec!["push".into()], 1024, None, 1_700_000_000)
                .unwrap()
                .with_id_order(order, 300.0);
        let first_id = factory.event_id(0);
        let summary =
            attack::run(attack_config(&[&target], 300.0, 2, "github", &output), factory).await.unwrap().summary;
        assert_eq!(summary.successful(), summary.requests, "{order:?}: {:?}", summary.status_codes);

        let (_, report) = audit_until_ok(&output, &config).await;
        assert!(report.ok(), "{order:?}: {report:?}");
        assert!(report.acknowledged > 400, "{order:?}: {report:?}");
        assert_eq!((report.stored, report.on_stream), (report.acknowledged, report.acknowledged), "{order:?}");
        // Stored under the delivery GUID as sent: a UUID of the version the order makes.
        let stored: Option<String> = sqlx::query_scalar("SELECT event_id FROM events WHERE event_id = $1")
            .bind(&first_id)
            .fetch_optional(&pool)
            .await
            .unwrap();
        let stored = stored.unwrap_or_else(|| panic!("{order:?}: the run's first event {first_id} is not stored"));
        assert_eq!(stored.chars().nth(14), Some(version), "{order:?}: {stored}");
        let _ = std::fs::remove_file(output);
    }
    stop.cancel();
    let _ = task.await;
    let _ = std::fs::remove_file(secret_file);
}

/// A CA and a server certificate it signed for `127.0.0.1`, as `ca.crt`, `server.crt`, `server.key` in `dir`.
fn write_certificates(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    std::fs::create_dir_all(dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, unique("hookgate-load e2e CA"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server =
        CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap().signed_by(&server_key, &ca, &ca_key).unwrap();
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.crt"), server.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_runs_over_http1_and_h2_are_acknowledged_and_audited() {
    let (mut config, _db_url, secret_file) = fresh_setup("stripe").await;
    let dir = std::env::temp_dir().join(unique("e2e-tls"));
    write_certificates(&dir);
    config.server.tls =
        Some(hookgate::config::TlsConfig { cert_file: dir.join("server.crt"), key_file: dir.join("server.key") });
    let (url, stop, task) = start_gateway(config.clone(), "stripe").await;
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut outputs = Vec::new();
    for http2 in [false, true] {
        let output = std::env::temp_dir().join(unique("e2e-tls.csv"));
        let factory = stripe_factory("e2e-tls");
        let mut attack = attack_config(&[&url], 300.0, 2, "stripe", &output);
        attack.http2 = http2;
        attack.tls = Some(ClientTls::new(Some(&dir.join("ca.crt")), http2).unwrap());
        let summary = attack::run(attack, factory).await.unwrap().summary;
        assert_eq!(summary.successful(), summary.requests, "http2 {http2}: {:?}", summary.status_codes);
        assert!(summary.requests >= 500, "http2 {http2}: {}", summary.requests);
        outputs.push(output);
    }
    for output in &outputs {
        let (_, report) = audit_until_ok(output, &config).await;
        assert!(report.ok(), "{report:?}");
        assert_eq!((report.stored, report.on_stream), (report.acknowledged, report.acknowledged), "{report:?}");
    }

    // Without the CA the client refuses the gateway's certificate: every request fails to connect.
    let output = std::env::temp_dir().join(unique("e2e-untrusted.csv"));
    let factory = stripe_factory("e2e-untrusted");
    let other = std::env::temp_dir().join(unique("e2e-tls-other"));
    write_certificates(&other);
    let mut attack = attack_config(&[&url], 50.0, 1, "stripe", &output);
    attack.tls = Some(ClientTls::new(Some(&other.join("ca.crt")), false).unwrap());
    let summary = attack::run(attack, factory).await.unwrap().summary;
    assert_eq!(summary.successful(), 0, "{:?}", summary.status_codes);

    stop.cancel();
    let _ = task.await;
    for path in outputs.iter().chain([&output]) {
        let _ = std::fs::remove_file(path);
    }
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(other);
    let _ = std::fs::remove_file(secret_file);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_through_a_proxy_protocol_balancer_are_judged_by_the_client_the_header_names() {
    let (mut config, _db_url, secret_file) = fresh_setup("stripe").await;
    config.server.proxy_protocol = true;
    config.sources.get_mut("stripe").expect("source").allowed_ips = vec!["192.0.2.0/24".parse().expect("range")];
    let (target, stop, task) = start_gateway(config.clone(), "stripe").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let run = |version: ProxyVersion, client_ip: Option<&str>, output: &Path| {
        let mut attack = attack_config(&[&target], 300.0, 2, "stripe", output);
        (attack.duplicate_ratio, attack.bad_signature_ratio) = (0.0, 0.0);
        attack.proxy_header =
            Some(ProxyHeader { version, client_ip: client_ip.map(|ip| ip.parse().expect("client address")) });
        attack
    };

    // A listed sender behind the balancer, v2 as AWS NLB sends it: every event acknowledged and audited.
    let output = std::env::temp_dir().join(unique("e2e-proxy.csv"));
    let summary = attack::run(run(ProxyVersion::V2, Some("192.0.2.10"), &output), stripe_factory("e2e-proxy"))
        .await
        .expect("attack")
        .summary;
    assert_eq!(summary.status_codes.get("202"), Some(&summary.requests), "{summary:?}");
    let (_, report) = audit_until_ok(&output, &config).await;
    assert!(report.ok() && report.acknowledged == summary.requests, "{report:?}");

    // The same run naming the generator's own address (v1): not listed, every request refused with 403.
    let refused = std::env::temp_dir().join(unique("e2e-proxy-refused.csv"));
    let summary =
        attack::run(run(ProxyVersion::V1, None, &refused), stripe_factory("e2e-proxy")).await.expect("attack").summary;
    assert_eq!(summary.status_codes.get("403"), Some(&summary.requests), "{summary:?}");

    // Without the header the gateway closes every connection before reading a request.
    let mut direct = attack_config(&[&target], 100.0, 1, "stripe", &refused);
    direct.timeout = Duration::from_secs(2);
    let summary = attack::run(direct, stripe_factory("e2e-direct")).await.expect("attack").summary;
    assert_eq!(summary.completed, 0, "{summary:?}");

    stop.cancel();
    let _ = task.await;
    for file in [output, refused, secret_file] {
        let _ = std::fs::remove_file(file);
    }
}
