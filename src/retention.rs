//! Retention: deletes the stored events received more than `retention.keep_days` ago, oldest first, a
//! batch per statement with a pause between, never one still waiting for its stream, one replica's delete
//! at a time.
//!
//! A gateway with retention on runs this every `retention.interval_s`; `hookgate prune` runs it once.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::RetentionConfig;
use crate::metrics;
use crate::store::{PruneCutoff, Store, StoreError};

/// The first run comes this long after start (or after one interval, if shorter): long enough for the
/// start-up catch-up to have the database first, short enough that gateways restarted more often than
/// once an interval (frequent deploys) still prune.
const FIRST_RUN_DELAY: Duration = Duration::from_secs(60);

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every event before the cutoff is deleted.
    Completed,
    /// Another session holds the pruning lock (another replica is pruning); this one stopped.
    Skipped,
    /// The gateway is shutting down (or `hookgate prune` was interrupted); the next run goes on.
    Interrupted,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Skipped => "skipped",
            Outcome::Interrupted => "interrupted",
        }
    }
}

/// What a run did: how it ended, where it stopped, and the events it deleted by source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReport {
    pub outcome: Outcome,
    pub cutoff: PruneCutoff,
    pub deleted: BTreeMap<String, u64>,
}

impl RunReport {
    pub fn total(&self) -> u64 {
        self.deleted.values().sum()
    }
}

#[derive(Debug, Clone)]
pub struct Retention {
    store: Store,
    config: RetentionConfig,
}

impl Retention {
    pub fn new(store: Store, config: RetentionConfig) -> Self {
        Self { store, config }
    }

    /// One run: for each source with stored events, delete its events received before the cutoff,
    /// `batch_rows` a statement, pausing `batch_pause_ms` after each full one, until none is left, another
    /// replica takes the lock, or `stop`.
    pub async fn run_once(&self, stop: &CancellationToken) -> Result<RunReport, StoreError> {
        let cutoff = self.store.prune_cutoff(self.config.keep_days).await?;
        let mut report = RunReport { outcome: Outcome::Completed, cutoff, deleted: BTreeMap::new() };
        let pause = Duration::from_millis(self.config.batch_pause_ms);
        'sources: for source in self.store.stored_sources().await? {
            let mut from_us = None;
            loop {
                if stop.is_cancelled() {
                    report.outcome = Outcome::Interrupted;
                    break 'sources;
                }
                let batch = self.store.prune_batch(&source, from_us, cutoff.before_us, self.config.batch_rows).await?;
                let Some(batch) = batch else {
                    report.outcome = Outcome::Skipped;
                    break 'sources;
                };
                if batch.deleted > 0 {
                    *report.deleted.entry(source.clone()).or_default() += batch.deleted;
                    metrics::record_retention_deleted(&source, batch.deleted);
                }
                if batch.deleted < u64::from(self.config.batch_rows) {
                    break;
                }
                from_us = batch.newest_us;
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = stop.cancelled() => {}
                }
            }
        }
        Ok(report)
    }

    /// What a run would delete now, by source (nothing is deleted).
    pub async fn count(&self) -> Result<(PruneCutoff, BTreeMap<String, i64>), StoreError> {
        let cutoff = self.store.prune_cutoff(self.config.keep_days).await?;
        let mut counts = BTreeMap::new();
        for source in self.store.stored_sources().await? {
            let n = self.store.count_prunable(&source, cutoff.before_us).await?;
            counts.insert(source, n);
        }
        Ok((cutoff, counts))
    }

    /// Runs a minute after start (or after one interval, if shorter), then an interval after each run
    /// ends, until `stop`. A failed run is logged and counted; the next one tries again.
    pub async fn watch(self, stop: CancellationToken) {
        let interval = Duration::from_secs(self.config.interval_s);
        let mut next = Instant::now() + interval.min(FIRST_RUN_DELAY);
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = stop.cancelled() => return,
            }
            self.run_and_log(&stop).await;
            next = Instant::now() + interval;
        }
    }

    async fn run_and_log(&self, stop: &CancellationToken) {
        let started = Instant::now();
        let report = match self.run_once(stop).await {
            Ok(report) => report,
            Err(e) => {
                metrics::record_retention_run("failed");
                warn!(error = %crate::error_chain(&e), "retention: pruning failed; the next run tries again");
                return;
            }
        };
        metrics::record_retention_run(report.outcome.label());
        if report.outcome == Outcome::Completed {
            metrics::record_retention_completed(crate::unix_now());
        }
        if let Some(queued_us) = report.cutoff.held_back_by_us {
            warn!(
                oldest_unpublished = %crate::format_unix_us(queued_us),
                "retention: events received since the outbox's oldest batch are kept until they are on their \
                 stream (is Redis down?)"
            );
        }
        let (total, elapsed_ms) = (report.total(), started.elapsed().as_millis());
        let by_source = format!("{:?}", report.deleted);
        let before = crate::format_unix_us(report.cutoff.before_us);
        match report.outcome {
            Outcome::Skipped => debug!(total, "retention: another replica holds the pruning lock; skipped"),
            Outcome::Interrupted => info!(total, %by_source, %before, "retention: run interrupted by shutdown"),
            Outcome::Completed if total > 0 => {
                info!(total, %by_source, %before, elapsed_ms, "retention: deleted events received before the cutoff");
            }
            Outcome::Completed => debug!(%before, "retention: nothing to delete"),
        }
    }
}
