//! `verify`: the loss audit. Every event a results file shows answered 2xx must be in Postgres exactly
//! once with the exact body, and on its Redis stream; every deliberately mis-signed one must be absent.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use anyhow::Context as _;
use deadpool_redis::redis;
use serde::Serialize;
use sqlx::Row as _;

use crate::payload::{body_hash, Kind};
use crate::results;

/// How long one read of a stream page may take.
const REDIS_ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct VerifyConfig {
    pub files: Vec<PathBuf>,
    pub database_url: String,
    pub redis_url: Option<String>,
    /// Stream key of a source; `{source}` is replaced.
    pub stream_key: String,
}

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct VerifyReport {
    /// Distinct events answered 2xx.
    pub acknowledged: u64,
    pub stored: u64,
    /// Acknowledged but not in Postgres: the one number that must be zero.
    pub lost: u64,
    /// Stored with other bytes than were sent.
    pub body_mismatch: u64,
    /// Refused signatures that were stored anyway.
    pub bad_signatures_stored: u64,
    pub redis_checked: bool,
    pub on_stream: u64,
    pub missing_from_stream: u64,
    /// Stream entries beyond the first for the same event (allowed: delivery is at-least-once).
    pub extra_stream_entries: u64,
    pub examples: Vec<String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.lost == 0 && self.body_mismatch == 0 && self.bad_signatures_stored == 0 && self.missing_from_stream == 0
    }
}

pub async fn run(config: &VerifyConfig) -> anyhow::Result<VerifyReport> {
    // (source, event id) -> body hash of every acknowledged event; ids that must not be stored.
    let mut acknowledged: HashMap<(String, String), String> = HashMap::new();
    let mut refused: HashMap<String, Vec<String>> = HashMap::new();
    for path in &config.files {
        let mut bad_rows = 0u64;
        results::read(path, |meta, row| {
            let Some(source) = meta.targets.get(usize::from(row.target)).and_then(|t| results::source_of(t)) else {
                bad_rows += 1;
                return;
            };
            if row.kind == Kind::BadSignature {
                refused.entry(source.to_owned()).or_default().push(row.event_id);
            } else if (200..300).contains(&row.status) {
                acknowledged.insert((source.to_owned(), row.event_id), row.body_hash);
            }
        })?;
        anyhow::ensure!(
            bad_rows == 0,
            "{}: {bad_rows} rows name a target that is not /webhooks/<source>",
            path.display()
        );
    }
    let mut report = VerifyReport { acknowledged: acknowledged.len() as u64, ..VerifyReport::default() };
    hookgate::use_ring_for_tls();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&config.database_url)
        .await
        .context("connecting to Postgres")?;

    let mut by_source: HashMap<&str, Vec<&str>> = HashMap::new();
    for (source, id) in acknowledged.keys() {
        by_source.entry(source).or_default().push(id);
    }
    for (source, ids) in &by_source {
        for chunk in ids.chunks(5000) {
            let rows = sqlx::query("SELECT event_id, body FROM events WHERE source = $1 AND event_id = ANY($2)")
                .bind(source)
                .bind(chunk)
                .fetch_all(&pool)
                .await
                .context("querying events")?;
            let mut seen = HashSet::new();
            for row in rows {
                let id: String = row.try_get(0)?;
                let body: Vec<u8> = row.try_get(1)?;
                report.stored += 1;
                let expected = acknowledged.get(&((*source).to_owned(), id.clone()));
                if expected.is_some_and(|h| !h.is_empty() && *h != body_hash(&body)) {
                    report.body_mismatch += 1;
                    push_example(&mut report.examples, format!("body differs: {source}/{id}"));
                }
                seen.insert(id);
            }
            for id in chunk.iter().filter(|id| !seen.contains(**id)) {
                report.lost += 1;
                push_example(&mut report.examples, format!("lost: {source}/{id}"));
            }
        }
    }
    for (source, ids) in &refused {
        for chunk in ids.chunks(5000) {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE source = $1 AND event_id = ANY($2)")
                .bind(source)
                .bind(chunk)
                .fetch_one(&pool)
                .await?;
            report.bad_signatures_stored += n as u64;
        }
    }
    pool.close().await;

    if let Some(url) = &config.redis_url {
        report.redis_checked = true;
        let client = redis::Client::open(url.as_str()).context("invalid Redis URL")?;
        // A page of 10,000 entries with their bodies is ~12 MB: more than the Redis client's default 500 ms
        // answer on a busy host.
        let patient = redis::AsyncConnectionConfig::new().set_response_timeout(Some(REDIS_ANSWER_TIMEOUT));
        let mut conn =
            client.get_multiplexed_async_connection_with_config(&patient).await.context("connecting to Redis")?;
        for (source, ids) in &by_source {
            let key = config.stream_key.replace("{source}", source);
            let counts = stream_id_counts(&mut conn, &key).await?;
            for id in ids {
                match counts.get(*id) {
                    Some(n) => {
                        report.on_stream += 1;
                        report.extra_stream_entries += n - 1;
                    }
                    None => {
                        report.missing_from_stream += 1;
                        push_example(&mut report.examples, format!("not on stream {key}: {id}"));
                    }
                }
            }
        }
    }
    Ok(report)
}

/// How many entries of the stream carry each event id (read in pages of 10,000).
async fn stream_id_counts(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> anyhow::Result<HashMap<String, u64>> {
    let mut counts = HashMap::new();
    let mut start = "-".to_owned();
    loop {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(key)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(10_000)
            .query_async(conn)
            .await
            .with_context(|| format!("XRANGE {key}"))?;
        let Some(last) = reply.ids.last() else { break };
        start = format!("({}", last.id);
        for entry in &reply.ids {
            if let Some(redis::Value::BulkString(id)) = entry.map.get("id") {
                *counts.entry(String::from_utf8_lossy(&id[..]).into_owned()).or_insert(0) += 1;
            }
        }
        if reply.ids.len() < 10_000 {
            break;
        }
    }
    Ok(counts)
}

fn push_example(examples: &mut Vec<String>, text: String) {
    if examples.len() < 10 {
        examples.push(text);
    }
}
