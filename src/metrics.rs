//! Every metric name as a constant, described once, with explicit histogram buckets and small record helpers.
//!
//! Labels only ever carry configured source names and fixed words, never request input, so a hostile
//! client cannot blow up cardinality or smuggle text into a scrape.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const BUILD_INFO: &str = "hookgate_build_info";
pub const HTTP_REQUEST_DURATION: &str = "http_server_request_duration_seconds";
pub const SIGNATURE_FAILURES: &str = "hookgate_signature_failures_total";
pub const ADDRESS_REFUSALS: &str = "hookgate_address_refusals_total";
pub const INVALID_EVENTS: &str = "hookgate_invalid_events_total";
pub const EVENTS: &str = "hookgate_events_total";
pub const QUEUE_DEPTH: &str = "hookgate_queue_depth";
pub const QUEUE_CAPACITY: &str = "hookgate_queue_capacity";
pub const BODY_MEMORY: &str = "hookgate_body_memory_bytes";
pub const BODY_MEMORY_LIMIT: &str = "hookgate_body_memory_limit_bytes";
pub const QUEUE_REJECTIONS: &str = "hookgate_queue_rejections_total";
pub const SOURCE_QUEUED: &str = "hookgate_source_queued_events";
pub const SOURCE_SHARE_REJECTIONS: &str = "hookgate_source_share_rejections_total";
pub const BATCH_SIZE: &str = "hookgate_batch_size";
pub const STORE_COMMIT_DURATION: &str = "hookgate_store_commit_duration_seconds";
pub const STORE_ERRORS: &str = "hookgate_store_errors_total";
pub const HELD_EVENTS: &str = "hookgate_held_events";
pub const CONNECTIONS_OPEN: &str = "hookgate_http_connections_open";
pub const NOTIFY_PUBLISHED: &str = "hookgate_notify_published_total";
pub const NOTIFY_FAILURES: &str = "hookgate_notify_failures_total";
pub const NOTIFY_PENDING: &str = "hookgate_notify_pending";
pub const NOTIFY_PUBLISH_DURATION: &str = "hookgate_notify_publish_duration_seconds";
pub const NOTIFY_CATCHUP_BATCHES: &str = "hookgate_notify_catchup_batches_total";
pub const NOTIFY_DEFERRED: &str = "hookgate_notify_deferred_total";
pub const NOTIFY_REDIS_DURABLE: &str = "hookgate_notify_redis_durable";
pub const SECRET_RELOADS: &str = "hookgate_source_secret_reloads_total";
pub const ADDRESS_RELOADS: &str = "hookgate_source_address_reloads_total";
pub const CONFIG_RESTART_PENDING: &str = "hookgate_config_restart_pending";
pub const TLS_NOT_AFTER: &str = "hookgate_tls_certificate_not_after_timestamp_seconds";
pub const TLS_RELOADS: &str = "hookgate_tls_certificate_reloads_total";
pub const TLS_HANDSHAKE_FAILURES: &str = "hookgate_tls_handshake_failures_total";
pub const PROXY_HEADER_FAILURES: &str = "hookgate_proxy_header_failures_total";
pub const RETENTION_DELETED: &str = "hookgate_retention_deleted_events_total";
pub const RETENTION_RUNS: &str = "hookgate_retention_runs_total";
pub const RETENTION_LAST_COMPLETED: &str = "hookgate_retention_last_completed_timestamp_seconds";
pub const SPILLED: &str = "hookgate_spilled_events_total";
pub const SPILL_IMPORTED: &str = "hookgate_spill_imported_events_total";
pub const SPILL_PENDING: &str = "hookgate_spill_pending_events";

/// Latency buckets (seconds): fine around the few-millisecond group commit, up to the request timeout.
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
/// The process's own CPU, memory, file descriptors and threads (`process_*`, the names every Prometheus client
/// library exports), read from `/proc` at each scrape: RSS, and open descriptors against `server.max_connections`
/// and the limit, without a node exporter's view of the whole host.
static PROCESS: OnceLock<metrics_process::Collector> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls return the same handle) and describes every metric.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), BATCH_BUCKETS))
                .map_or_else(|_| PrometheusBuilder::new().build_recorder(), PrometheusBuilder::build_recorder);
            let handle = recorder.handle();
            // Another recorder may already be installed (an embedding application): then we only render ours.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            PROCESS.get_or_init(metrics_process::Collector::default).describe();
            gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

/// Reads the process's own figures into their gauges (before a scrape renders them).
pub fn collect_process() {
    if let Some(collector) = PROCESS.get() {
        collector.collect();
    }
}

fn describe() {
    describe_gauge!(BUILD_INFO, "1, labelled with the running hookgate's version.");
    describe_histogram!(HTTP_REQUEST_DURATION, Unit::Seconds, "Duration of HTTP requests on the webhook port.");
    describe_counter!(SIGNATURE_FAILURES, "Requests refused because their signature did not verify, by reason.");
    describe_counter!(
        ADDRESS_REFUSALS,
        "Requests refused because their client address is not in the source's allowed_ips, by whether their \
         signature verified (valid: the sender's addresses have likely changed)."
    );
    describe_counter!(
        INVALID_EVENTS,
        "Correctly signed requests refused with 400 because the body is not an event hookgate can store, by \
         reason: the sender's format may have changed, and its events are being refused."
    );
    describe_counter!(EVENTS, "Events written to Postgres, by source and outcome (inserted or duplicate).");
    describe_gauge!(QUEUE_DEPTH, "Events accepted and waiting for a worker.");
    describe_gauge!(QUEUE_CAPACITY, "Capacity of the event queue.");
    describe_gauge!(
        BODY_MEMORY,
        Unit::Bytes,
        "Request bodies held in memory (being read, queued, being written, waiting for the notifier)."
    );
    describe_gauge!(BODY_MEMORY_LIMIT, Unit::Bytes, "Most request body bytes held at once (queue.body_memory_mb).");
    describe_counter!(QUEUE_REJECTIONS, "Requests answered 503 before queueing, by reason.");
    describe_gauge!(SOURCE_QUEUED, "A source's events queued or being written, against its max_queued.");
    describe_counter!(
        SOURCE_SHARE_REJECTIONS,
        "Verified events answered 503 because their source held its max_queued events (its sender retries)."
    );
    describe_histogram!(BATCH_SIZE, "Events per batch written by a worker.");
    describe_histogram!(STORE_COMMIT_DURATION, Unit::Seconds, "Duration of one batch insert and commit.");
    describe_counter!(
        STORE_ERRORS,
        "Failed batch writes, by kind (transient ones and held ones, holding acknowledged events, are retried)."
    );
    describe_gauge!(
        HELD_EVENTS,
        "Acknowledged events (enqueue mode) Postgres refused one by one, set aside and retried apart from the workers."
    );
    describe_gauge!(CONNECTIONS_OPEN, "Open connections on the webhook port.");
    describe_counter!(
        NOTIFY_PUBLISHED,
        "Stream entries published to Redis, by source and path (normal, catchup, replay)."
    );
    describe_counter!(NOTIFY_FAILURES, "Failed publish round trips to Redis (the events stay in the outbox).");
    describe_gauge!(NOTIFY_PENDING, "Stored events not yet published to Redis (whole database).");
    describe_histogram!(NOTIFY_PUBLISH_DURATION, Unit::Seconds, "Duration of one pipelined publish round trip.");
    describe_counter!(NOTIFY_CATCHUP_BATCHES, "Batches published by the outbox catch-up.");
    describe_counter!(NOTIFY_DEFERRED, "Batches left to the catch-up because the notifier was busy.");
    describe_gauge!(
        NOTIFY_REDIS_DURABLE,
        "1 when Redis keeps what it acknowledges (appendfsync always, no allkeys-* eviction); 0 when it may not."
    );
    describe_counter!(
        SECRET_RELOADS,
        "Reloads that found a source's secrets changed, or could not read them, by source and result (replaced, \
         failed)."
    );
    describe_counter!(
        ADDRESS_RELOADS,
        "Reloads that found a source's address file changed, or could not load it, by source and result \
         (replaced, failed)."
    );
    describe_gauge!(
        CONFIG_RESTART_PENDING,
        "1 when the configuration file, read again on SIGHUP, changes keys that take effect only on restart, or a \
         source's settings that do not load."
    );
    describe_gauge!(
        TLS_NOT_AFTER,
        Unit::Seconds,
        "Expiry (notAfter, unix seconds) of the webhook port's TLS certificate in use."
    );
    describe_counter!(TLS_RELOADS, "Looks at changed certificate files, by result (replaced, failed).");
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "Connections to the webhook port that sent something but did not complete a TLS handshake."
    );
    describe_counter!(
        PROXY_HEADER_FAILURES,
        "Connections to the webhook port closed without a valid PROXY protocol header, by reason (invalid, \
         timed_out, untrusted_peer: not from server.proxy_protocol_from); only with server.proxy_protocol."
    );
    describe_counter!(RETENTION_DELETED, "Stored events deleted by retention (older than retention.keep_days).");
    describe_counter!(
        RETENTION_RUNS,
        "Retention runs, by result (completed, skipped: another replica prunes, interrupted, failed)."
    );
    describe_gauge!(
        RETENTION_LAST_COMPLETED,
        Unit::Seconds,
        "When this gateway's last retention run completed (unix seconds)."
    );
    describe_counter!(
        SPILLED,
        "Acknowledged events (enqueue mode) the shutdown's drain could not store, by result: spilled to a file \
         in shutdown.spill_dir, or lost (no spill_dir, or the file could not be written)."
    );
    describe_counter!(SPILL_IMPORTED, "Events from spill files stored in Postgres (new, or already there).");
    describe_gauge!(
        SPILL_PENDING,
        "Events left in spill files at the last look at shutdown.spill_dir: refused again by Postgres, or lines \
         that do not parse (a file that cannot be read counts as one). Tried again every minute."
    );
}

/// Exports every labelled series of the gateway as a whole at zero from the start: `rate()` and alerts over a
/// series that does not exist yet see nothing, so a first failure would otherwise go unnoticed. Each source's
/// own come from [`init_source_series`].
pub fn init_series() {
    for reason in ["queue_full", "source_share_full", "body_memory_full", "shutting_down"] {
        counter!(QUEUE_REJECTIONS, "reason" => reason).increment(0);
    }
    for kind in ["transient", "rejected", "held", "aborted"] {
        counter!(STORE_ERRORS, "kind" => kind).increment(0);
    }
    counter!(NOTIFY_FAILURES).increment(0);
    counter!(NOTIFY_CATCHUP_BATCHES).increment(0);
    counter!(NOTIFY_DEFERRED).increment(0);
    gauge!(NOTIFY_PENDING).set(0.0);
    gauge!(CONFIG_RESTART_PENDING).set(0.0);
    gauge!(QUEUE_DEPTH).set(0.0);
    gauge!(BODY_MEMORY).set(0.0);
    gauge!(HELD_EVENTS).set(0.0);
    for result in ["spilled", "lost"] {
        counter!(SPILLED, "result" => result).increment(0);
    }
    counter!(SPILL_IMPORTED).increment(0);
    gauge!(SPILL_PENDING).set(0.0);
}

/// One source's series at zero, at start-up or when a reload adds it: its refusals, events, events held in
/// the queue, notifications and secret reloads; its address refusals when it has an `allowed_ips` list
/// (`listed`) and its address file reloads when it has an `allowed_ips_file` (`with_file`); its retention
/// deletes when retention is on.
pub fn init_source_series(source: &str, listed: bool, with_file: bool, retention: bool) {
    let source = source.to_owned();
    for reason in
        ["missing_header", "malformed_header", "no_signatures", "bad_signature", "timestamp_outside_tolerance"]
    {
        counter!(SIGNATURE_FAILURES, "source" => source.clone(), "reason" => reason).increment(0);
    }
    for reason in crate::event::EventError::KINDS {
        counter!(INVALID_EVENTS, "source" => source.clone(), "reason" => reason).increment(0);
    }
    for outcome in ["inserted", "duplicate"] {
        counter!(EVENTS, "source" => source.clone(), "outcome" => outcome).increment(0);
    }
    for path in ["normal", "catchup", "replay"] {
        counter!(NOTIFY_PUBLISHED, "source" => source.clone(), "path" => path).increment(0);
    }
    for result in ["replaced", "failed"] {
        counter!(SECRET_RELOADS, "source" => source.clone(), "result" => result).increment(0);
    }
    counter!(SOURCE_SHARE_REJECTIONS, "source" => source.clone()).increment(0);
    gauge!(SOURCE_QUEUED, "source" => source.clone()).set(0.0);
    if listed {
        for signature in ["valid", "invalid", "unread"] {
            counter!(ADDRESS_REFUSALS, "source" => source.clone(), "signature" => signature).increment(0);
        }
    }
    if with_file {
        for result in ["replaced", "failed"] {
            counter!(ADDRESS_RELOADS, "source" => source.clone(), "result" => result).increment(0);
        }
    }
    if retention {
        counter!(RETENTION_DELETED, "source" => source).increment(0);
    }
}

/// The TLS series, at zero from the start (only when the webhook port serves HTTPS).
pub fn init_tls_series() {
    for result in ["replaced", "failed"] {
        counter!(TLS_RELOADS, "result" => result).increment(0);
    }
    counter!(TLS_HANDSHAKE_FAILURES).increment(0);
}

/// The PROXY protocol series, at zero from the start (only when the webhook port expects the header).
pub fn init_proxy_header_series() {
    for reason in ["invalid", "timed_out", "untrusted_peer"] {
        counter!(PROXY_HEADER_FAILURES, "reason" => reason).increment(0);
    }
}

/// The retention runs' series, at zero from the start (only when retention is on).
pub fn init_retention_series() {
    for result in ["completed", "skipped", "interrupted", "failed"] {
        counter!(RETENTION_RUNS, "result" => result).increment(0);
    }
}

/// The hot path's own series (POST to the webhook route, answered 202), registered once: looking a
/// labelled series up allocates and hashes its labels, which costs more than the recording.
static ACCEPTED_REQUESTS: OnceLock<metrics::Histogram> = OnceLock::new();

pub fn record_request(method: &'static str, route: &'static str, status: u16, elapsed: Duration) {
    if method == "POST" && status == 202 && route == WEBHOOK_ROUTE {
        ACCEPTED_REQUESTS
            .get_or_init(
                || histogram!(HTTP_REQUEST_DURATION, "method" => "POST", "route" => WEBHOOK_ROUTE, "status" => "202"),
            )
            .record(elapsed.as_secs_f64());
    } else {
        histogram!(HTTP_REQUEST_DURATION, "method" => method, "route" => route, "status" => status.to_string())
            .record(elapsed.as_secs_f64());
    }
}

/// The route label of webhook requests.
pub const WEBHOOK_ROUTE: &str = "/webhooks/{source}";

pub fn record_signature_failure(source: &str, reason: &'static str) {
    counter!(SIGNATURE_FAILURES, "source" => source.to_owned(), "reason" => reason).increment(1);
}

pub fn record_invalid_event(source: &str, reason: &'static str) {
    counter!(INVALID_EVENTS, "source" => source.to_owned(), "reason" => reason).increment(1);
}

/// `signature`: `valid`, `invalid`, or `unread` (the body could not be read).
pub fn record_address_refusal(source: &str, signature: &'static str) {
    counter!(ADDRESS_REFUSALS, "source" => source.to_owned(), "signature" => signature).increment(1);
}

pub fn record_events(source: &str, outcome: &'static str, count: u64) {
    counter!(EVENTS, "source" => source.to_owned(), "outcome" => outcome).increment(count);
}

pub fn record_queue_depth(depth: usize) {
    gauge!(QUEUE_DEPTH).set(depth as f64);
}

pub fn record_body_memory(used: usize) {
    gauge!(BODY_MEMORY).set(used as f64);
}

pub fn record_body_memory_limit(limit: usize) {
    gauge!(BODY_MEMORY_LIMIT).set(limit as f64);
}

pub fn record_queue_capacity(capacity: usize) {
    gauge!(QUEUE_CAPACITY).set(capacity as f64);
}

pub fn record_queue_rejection(reason: &'static str) {
    counter!(QUEUE_REJECTIONS, "reason" => reason).increment(1);
}

pub fn record_source_share_rejection(source: &str) {
    counter!(SOURCE_SHARE_REJECTIONS, "source" => source.to_owned()).increment(1);
}

pub fn record_source_queued(source: &str, held: usize) {
    gauge!(SOURCE_QUEUED, "source" => source.to_owned()).set(held as f64);
}

pub fn record_batch(size: usize, commit: Duration) {
    histogram!(BATCH_SIZE).record(size as f64);
    histogram!(STORE_COMMIT_DURATION).record(commit.as_secs_f64());
}

pub fn record_held_events(held: usize) {
    gauge!(HELD_EVENTS).set(held as f64);
}

pub fn record_store_error(kind: &'static str) {
    counter!(STORE_ERRORS, "kind" => kind).increment(1);
}

pub fn record_connections(delta: f64) {
    gauge!(CONNECTIONS_OPEN).increment(delta);
}

pub fn record_notify_published(source: &str, path: &'static str, count: u64) {
    counter!(NOTIFY_PUBLISHED, "source" => source.to_owned(), "path" => path).increment(count);
}

pub fn record_notify_failure() {
    counter!(NOTIFY_FAILURES).increment(1);
}

pub fn record_notify_pending(pending: i64) {
    gauge!(NOTIFY_PENDING).set(pending as f64);
}

pub fn record_notify_publish(elapsed: Duration) {
    histogram!(NOTIFY_PUBLISH_DURATION).record(elapsed.as_secs_f64());
}

pub fn record_notify_catchup_batch() {
    counter!(NOTIFY_CATCHUP_BATCHES).increment(1);
}

pub fn record_notify_deferred() {
    counter!(NOTIFY_DEFERRED).increment(1);
}

pub fn record_notify_redis_durable(durable: bool) {
    gauge!(NOTIFY_REDIS_DURABLE).set(if durable { 1.0 } else { 0.0 });
}

pub fn record_spilled(events: usize, spilled: bool) {
    counter!(SPILLED, "result" => if spilled { "spilled" } else { "lost" }).increment(events as u64);
}

pub fn record_spill_imported(events: usize) {
    counter!(SPILL_IMPORTED).increment(events as u64);
}

pub fn record_spill_pending(events: usize) {
    gauge!(SPILL_PENDING).set(events as f64);
}

pub fn record_secret_reload(source: &str, result: &'static str) {
    counter!(SECRET_RELOADS, "source" => source.to_owned(), "result" => result).increment(1);
}

pub fn record_config_restart_pending(pending: bool) {
    gauge!(CONFIG_RESTART_PENDING).set(if pending { 1.0 } else { 0.0 });
}

pub fn record_address_reload(source: &str, result: &'static str) {
    counter!(ADDRESS_RELOADS, "source" => source.to_owned(), "result" => result).increment(1);
}

pub fn record_tls_not_after(unix_seconds: i64) {
    gauge!(TLS_NOT_AFTER).set(unix_seconds as f64);
}

pub fn record_tls_reload(result: &'static str) {
    counter!(TLS_RELOADS, "result" => result).increment(1);
}

pub fn record_proxy_header_failure(reason: &'static str) {
    counter!(PROXY_HEADER_FAILURES, "reason" => reason).increment(1);
}

pub fn record_tls_handshake_failure() {
    counter!(TLS_HANDSHAKE_FAILURES).increment(1);
}

pub fn record_retention_deleted(source: &str, count: u64) {
    counter!(RETENTION_DELETED, "source" => source.to_owned()).increment(count);
}

pub fn record_retention_run(result: &'static str) {
    counter!(RETENTION_RUNS, "result" => result).increment(1);
}

pub fn record_retention_completed(unix_seconds: i64) {
    gauge!(RETENTION_LAST_COMPLETED).set(unix_seconds as f64);
}
