//! A real Prometheus scraping a gateway with the shipped configuration; two replicas sharing one database
//! and one Redis; the shipped Grafana dashboard only naming metrics the gateway exports.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::process::{config_file, config_file_with_streams, GatewayProcess};
use crate::support::*;

/// Asks Prometheus for an instant query's single value.
async fn prometheus_value(client: &HttpClient, base: &str, query: &str) -> Option<f64> {
    use http_body_util::BodyExt;
    let url = format!("{base}/api/v1/query?query={}", urlencode(query));
    // Prometheus may not listen yet: a refused connection is "no value yet", not a failure.
    let request = http::Request::get(url).body(http_body_util::Full::new(bytes::Bytes::new())).ok()?;
    let response = client.request(request).await.ok()?;
    if response.status() != 200 {
        return None;
    }
    let body = response.into_body().collect().await.ok()?.to_bytes();
    let json: serde_json::Value = serde_json::from_slice(&body).ok()?;
    let result = json["data"]["result"].as_array()?;
    let value = result.first()?["value"][1].as_str()?;
    value.parse().ok()
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Prometheus with the shipped prometheus.yml and alerts.yml, its file-discovered target pointed at `target`.
/// Only the scrape interval is shortened (15 s -> 1 s) so that the test does not wait for minutes.
struct Prometheus {
    child: std::process::Child,
    base: String,
    dir: std::path::PathBuf,
}

impl Prometheus {
    fn start(target: &str) -> Self {
        let dir = std::env::temp_dir().join(unique("hookgate-it-prometheus"));
        std::fs::create_dir_all(dir.join("targets")).expect("dir");
        let shipped = repo_root().join("deploy/prometheus");
        let config = std::fs::read_to_string(shipped.join("prometheus.yml")).expect("shipped prometheus.yml");
        assert!(config.contains("scrape_interval: 15s"));
        std::fs::write(dir.join("prometheus.yml"), config.replace("scrape_interval: 15s", "scrape_interval: 1s"))
            .expect("write");
        std::fs::copy(shipped.join("alerts.yml"), dir.join("alerts.yml")).expect("alerts");
        std::fs::write(dir.join("targets/hookgate.json"), format!(r#"[{{"targets": ["{target}"]}}]"#))
            .expect("targets");
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus (installed by deploy/services.sh)");
        Self { child, base: format!("http://127.0.0.1:{port}"), dir }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_gateway_with_the_shipped_config() {
    let db = TestDb::create().await;
    let (port, admin_port) = (free_port(), free_port());
    let config = config_file(&db.url, port, admin_port);
    let gateway = GatewayProcess::start(&config, port, admin_port).await;
    let prometheus = Prometheus::start(&format!("127.0.0.1:{admin_port}"));
    let client = client();

    // 5 new events, 2 of them delivered again, 1 bad signature.
    let ids: Vec<String> = (0..5).map(|_| unique("evt_prom")).collect();
    for id in ids.iter().chain(ids.iter().take(2)) {
        let body = stripe_event(id);
        let answer = post(&client, &gateway.url("stripe"), &stripe_headers(body.as_bytes()), body.as_bytes()).await;
        assert_eq!(answer.status, 202);
    }
    assert_eq!(post(&client, &gateway.url("stripe"), &[], b"{}").await.status, 401);

    let base = prometheus.base.clone();
    let expectations = [
        (r#"up{job="hookgate"}"#, 1.0),
        (r#"hookgate_build_info{job="hookgate",version="0.1.0"}"#, 1.0),
        // The gateway process's own figures: more than 4 MiB resident, more than its listeners' descriptors.
        (r#"count(process_resident_memory_bytes{job="hookgate"} > 4194304)"#, 1.0),
        (r#"count(process_open_fds{job="hookgate"} > 4)"#, 1.0),
        // In fractions of a second (whole seconds would read 0 here): started and served 8 requests, this
        // gateway has used some CPU, and less than a second of it.
        (r#"count(process_cpu_seconds_total{job="hookgate"} > 0 < 1)"#, 1.0),
        (r#"sum(hookgate_events_total{job="hookgate",source="stripe",outcome="inserted"})"#, 5.0),
        (r#"sum(hookgate_events_total{job="hookgate",source="stripe",outcome="duplicate"})"#, 2.0),
        (
            r#"sum(http_server_request_duration_seconds_count{job="hookgate",route="/webhooks/{source}",status="202"})"#,
            7.0,
        ),
        (r#"sum(http_server_request_duration_seconds_bucket{job="hookgate",status="202",le="+Inf"})"#, 7.0),
        (r#"sum(hookgate_signature_failures_total{job="hookgate",reason="missing_header"})"#, 1.0),
        // The test Redis runs appendonly yes with appendfsync always.
        (r#"hookgate_notify_redis_durable{job="hookgate"}"#, 1.0),
    ];
    for (query, expected) in expectations {
        let ok = eventually(Duration::from_secs(30), || {
            let (client, base) = (client.clone(), base.clone());
            async move { prometheus_value(&client, &base, query).await == Some(expected) }
        })
        .await;
        let got = prometheus_value(&client, &base, query).await;
        assert!(ok, "{query}: expected {expected}, Prometheus says {got:?}");
    }
    // The histogram is a real histogram (buckets), not a summary.
    let buckets = prometheus_value(
        &client,
        &base,
        r#"count(http_server_request_duration_seconds_bucket{job="hookgate",status="202"})"#,
    )
    .await;
    assert!(buckets.is_some_and(|n| n >= 10.0), "{buckets:?}");
    // The shipped alert rules loaded.
    let (_, rules) = get_text(&client, &format!("{base}/api/v1/rules")).await;
    assert!(
        rules.contains("HookgateHigh5xxRatio")
            && rules.contains("HookgateP99AboveSLO")
            && rules.contains("HookgateRedisCanLoseNotifications"),
        "{rules}"
    );
    drop(gateway);
    let _ = std::fs::remove_file(config);
}

#[tokio::test]
async fn two_replicas_share_one_database_and_redis_and_store_each_event_once() {
    let db = TestDb::create().await;
    let stream = format!("{}:{{source}}", unique("hg-it-replicas"));
    let (p1, a1, p2, a2) = (free_port(), free_port(), free_port(), free_port());
    let (c1, c2) =
        (config_file_with_streams(&db.url, p1, a1, &stream), config_file_with_streams(&db.url, p2, a2, &stream));
    let first = GatewayProcess::start(&c1, p1, a1).await;
    let second = GatewayProcess::start(&c2, p2, a2).await;

    // Every event delivered to both replicas, at the same time.
    let ids: Vec<String> = (0..200).map(|_| unique("evt_both")).collect();
    let mut set = tokio::task::JoinSet::new();
    for id in ids.clone() {
        let (u1, u2) = (first.url("stripe"), second.url("stripe"));
        set.spawn(async move {
            let body = stripe_event(&id);
            let headers = stripe_headers(body.as_bytes());
            let client = client();
            let (a, b) = tokio::join!(
                post(&client, &u1, &headers, body.as_bytes()),
                post(&client, &u2, &headers, body.as_bytes())
            );
            (a, b)
        });
    }
    let mut accepted = 0;
    while let Some(result) = set.join_next().await {
        let (a, b) = result.expect("task");
        assert_eq!((a.status, b.status), (202, 202));
        accepted += [&a, &b].iter().filter(|x| x.json["status"] == "accepted").count();
    }
    assert_eq!(accepted, ids.len(), "exactly one replica stored each event");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events").fetch_one(&db.pool).await.expect("count");
    assert_eq!(stored, 200);

    let key = stream.replace("{source}", "stripe");
    let redis = redis_url();
    assert!(eventually(Duration::from_secs(10), || async { stream_ids(&redis, &key).await.len() == 200 }).await);
    let on_stream = stream_ids(&redis, &key).await;
    assert!(ids.iter().all(|id| on_stream.get(id) == Some(&1)), "one stream entry per event in the normal path");

    // Both replicas' metrics scrape, and together they count each event once as inserted.
    let client = client();
    let mut inserted = 0.0;
    for replica in [&first, &second] {
        let (status, text) = get_text(&client, &replica.metrics_url()).await;
        assert_eq!(status, 200);
        inserted += text
            .lines()
            .find(|l| l.starts_with(r#"hookgate_events_total{source="stripe",outcome="inserted"}"#))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    }
    assert!((inserted - 200.0).abs() < f64::EPSILON, "inserted across replicas: {inserted}");
    drop((first, second));
    let _ = (std::fs::remove_file(c1), std::fs::remove_file(c2));
}

#[tokio::test]
async fn the_grafana_dashboard_shows_exported_metrics_only_and_every_alerted_one_and_the_readme_documents_all() {
    let path = repo_root().join("deploy/grafana/hookgate.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard")).expect("dashboard is JSON");
    for field in ["uid", "title", "schemaVersion", "panels"] {
        assert!(!dashboard[field].is_null(), "dashboard lacks `{field}`");
    }
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = HashSet::new();
    let mut used = HashSet::new();
    let metric = regex_lite_metric_names();
    for panel in panels {
        assert!(ids.insert(panel["id"].as_i64().expect("panel id")), "duplicate panel id");
        assert!(panel["type"].is_string() && panel["title"].is_string());
        for key in ["h", "w", "x", "y"] {
            assert!(panel["gridPos"][key].is_number(), "panel {} gridPos.{key}", panel["title"]);
        }
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty());
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            used.extend(metric(expr));
        }
    }
    // Every metric named must be exported by a gateway that has seen traffic.
    // Retention on, so its series are exported (at zero; its first run would come a minute later), and
    // an address list on one source, so that the address refusals are exported too.
    let db = TestDb::create().await;
    let mut config = test_config(&db.url);
    config.retention.keep_days = 30;
    config.sources.get_mut("github").expect("github").allowed_ips = vec!["127.0.0.1".parse().expect("address")];
    let gateway = Gateway::start(config).await;
    let client = client();
    assert_eq!(post_stripe(&client, &gateway, &unique("evt")).await.status, 202);
    let _ = post(&client, &gateway.url("stripe"), &[], b"{}").await;
    // The connection-level series are exported by a gateway serving HTTPS behind a PROXY protocol balancer.
    let certificates = crate::tls::TestCertificates::generate();
    let mut config = test_config(&db.url);
    config.server.tls = Some(hookgate::config::TlsConfig {
        cert_file: certificates.dir.join("server.crt"),
        key_file: certificates.dir.join("server.key"),
    });
    config.server.proxy_protocol = true;
    let balanced = Gateway::start(config).await;
    let mut families = HashSet::new();
    for admin in [gateway.admin, balanced.admin] {
        let (_, text) = get_text(&client, &format!("http://{admin}/metrics")).await;
        families.extend(
            text.lines()
                .filter(|l| l.starts_with("# TYPE "))
                .filter_map(|l| l.split_whitespace().nth(2))
                .map(str::to_owned),
        );
    }
    let exported: HashSet<String> = families
        .iter()
        .flat_map(|name| [name.clone(), format!("{name}_bucket"), format!("{name}_sum"), format!("{name}_count")])
        .collect();
    let missing: Vec<&String> = used.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(used.len() >= 8, "{used:?}");
    assert!(missing.is_empty(), "the dashboard names metrics the gateway does not export: {missing:?}");
    // Every series a shipped alert fires on has a panel, so that whoever it pages sees its history. Only the
    // rules' expressions count (annotations name metrics in prose), and only the gateway's own series (not `up`).
    let family = |name: &str| {
        ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix).filter(|f| families.contains(*f)))
            .unwrap_or(name)
            .to_owned()
    };
    let on_dashboard: HashSet<String> = used.iter().map(|name| family(name)).collect();
    let alerts = std::fs::read_to_string(repo_root().join("deploy/prometheus/alerts.yml")).expect("alerts.yml");
    let alerted: HashSet<String> = alerts
        .lines()
        .filter(|line| !line.trim_start().starts_with("summary:") && !line.trim_start().starts_with("description:"))
        .flat_map(&metric)
        .map(|name| family(&name))
        .filter(|name| families.contains(name))
        .collect();
    let mut without_panel: Vec<&String> = alerted.difference(&on_dashboard).collect();
    without_panel.sort();
    assert!(alerted.len() >= 10, "{alerted:?}");
    assert!(without_panel.is_empty(), "alerts fire on series the dashboard does not show: {without_panel:?}");
    // And the README's metrics table documents every one, so that an operator finds what a series means.
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let table: Vec<&str> = readme.lines().filter(|l| l.starts_with("| `")).collect();
    let mut undocumented: Vec<&String> =
        families.iter().filter(|name| !table.iter().any(|row| row.contains(&format!("`{name}`")))).collect();
    undocumented.sort();
    assert!(families.len() >= 30, "{families:?}");
    assert!(undocumented.is_empty(), "exported but not in the README's metrics table: {undocumented:?}");
    gateway.stop().await;
    balanced.stop().await;
}

/// Extracts metric names (identifiers directly followed by `{` or `[`) from a PromQL expression.
fn regex_lite_metric_names() -> impl Fn(&str) -> Vec<String> {
    |expr: &str| {
        let bytes = expr.as_bytes();
        let mut names = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i].is_ascii_alphabetic() || bytes[i] == b'_' {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b':') {
                    i += 1;
                }
                let word = &expr[start..i];
                let next = bytes.get(i).copied();
                if matches!(next, Some(b'{' | b'['))
                    && (word.starts_with("hookgate_") || word.starts_with("http_server_"))
                {
                    names.push(word.to_owned());
                }
            } else {
                i += 1;
            }
        }
        names
    }
}
