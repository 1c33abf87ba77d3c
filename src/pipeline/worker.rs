//! A batching worker: collect up to `batch_max` jobs (what arrives within the linger, or with group commit
//! until no other batch is being written), dedupe, write in one round trip, then resolve every ack.
//! Transient database errors are retried with capped backoff.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Mutex, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn, Instrument};

use super::{Job, Outcome, StoreFailed};
use crate::config::WorkersConfig;
use crate::error_chain;
use crate::notify::NotifyQueue;
use crate::store::{Inserted, NewEvent, OutboxBatch, Store, StoredEvent};

/// How the shutdown sequence steers the workers.
#[derive(Debug, Clone)]
pub struct WorkerControl {
    /// Finish what is queued, then exit.
    pub drain: CancellationToken,
    /// Stop retrying a failing batch (the drain's time is up): its waiters are told it failed.
    pub abort: CancellationToken,
}

const INITIAL_BACKOFF: Duration = Duration::from_millis(20);

/// Group commit, shared by the workers. When enabled, the worker collecting a batch writes it as soon as
/// no other batch is being written, and lingers (up to `batch_linger_ms`) only while one is: a lone event
/// waits for nothing, and under load each batch gathers what arrived during the write before it.
#[derive(Debug)]
pub(super) struct GroupCommit {
    enabled: bool,
    /// Batches being written right now.
    writing: AtomicUsize,
    finished: Notify,
}

impl GroupCommit {
    pub(super) fn new(enabled: bool) -> Self {
        Self { enabled, writing: AtomicUsize::new(0), finished: Notify::new() }
    }

    fn start(&self) {
        self.writing.fetch_add(1, Ordering::AcqRel);
    }

    fn finish(&self) {
        self.writing.fetch_sub(1, Ordering::AcqRel);
        self.finished.notify_waiters();
    }

    fn idle(&self) -> bool {
        self.enabled && self.writing.load(Ordering::Acquire) == 0
    }
}

pub(super) async fn run(
    index: usize,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    store: Store,
    config: WorkersConfig,
    control: WorkerControl,
    notify: Option<NotifyQueue>,
    group_commit: Arc<GroupCommit>,
) {
    let linger = Duration::from_millis(config.batch_linger_ms);
    let mut batch: Vec<Job> = Vec::with_capacity(config.batch_max);
    loop {
        {
            let mut rx = rx.lock().await;
            let received = tokio::select! {
                // Biased: while jobs are queued they are taken, even once draining has begun.
                biased;
                n = rx.recv_many(&mut batch, config.batch_max) => n,
                () = control.drain.cancelled() => {
                    while batch.len() < config.batch_max {
                        match rx.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    batch.len()
                }
            };
            if received == 0 {
                return;
            }
            if !linger.is_zero() && batch.len() < config.batch_max && !control.drain.is_cancelled() {
                let deadline = tokio::time::Instant::now() + linger;
                while batch.len() < config.batch_max {
                    // Registered before the count is read, so a batch finishing in between still wakes us
                    // (only with group commit: a fixed linger has no use for the wake-up).
                    let finished = group_commit.finished.notified();
                    tokio::pin!(finished);
                    if group_commit.enabled {
                        finished.as_mut().enable();
                    }
                    if group_commit.idle() {
                        break;
                    }
                    let room = config.batch_max - batch.len();
                    tokio::select! {
                        received = tokio::time::timeout_at(deadline, rx.recv_many(&mut batch, room)) => {
                            if !matches!(received, Ok(n) if n > 0) {
                                break;
                            }
                        }
                        () = &mut finished, if group_commit.enabled => {}
                    }
                }
            }
            crate::metrics::record_queue_depth(rx.len());
            // Counted before the lock is released: the next collector must not find the database idle
            // in between and write a second batch beside this one.
            group_commit.start();
        }
        let span = tracing::debug_span!("batch", worker = index, batch_size = batch.len());
        write_batch(&store, &mut batch, &config, &control, notify.as_ref()).instrument(span).await;
        group_commit.finish();
        batch.clear();
    }
}

/// Writes one batch, retrying while the database is unavailable, and resolves every job's ack.
async fn write_batch(
    store: &Store,
    batch: &mut [Job],
    config: &WorkersConfig,
    control: &WorkerControl,
    notify: Option<&NotifyQueue>,
) {
    // Dedupe: the first job of each (source, id) is written; later ones in the batch are duplicates.
    let mut seen: HashSet<(&str, &str)> = HashSet::with_capacity(batch.len());
    let mut unique: Vec<&NewEvent> = Vec::with_capacity(batch.len());
    let mut unique_positions: Vec<usize> = Vec::with_capacity(batch.len());
    for (i, job) in batch.iter().enumerate() {
        if seen.insert((&*job.event.source, job.event.id.as_str())) {
            unique.push(&job.event);
            unique_positions.push(i);
        }
    }
    let mut backoff = INITIAL_BACKOFF;
    let max_backoff = Duration::from_millis(config.retry_backoff_max_ms);
    let result = loop {
        let started = Instant::now();
        match store.insert_batch(&unique).await {
            Ok(inserted) => {
                crate::metrics::record_batch(unique.len(), started.elapsed());
                break Ok(inserted);
            }
            Err(e) if e.is_transient() && !control.abort.is_cancelled() => {
                crate::metrics::record_store_error("transient");
                warn!(error = %error_chain(&e), retry_in_ms = backoff.as_millis() as u64, "batch write failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = control.abort.cancelled() => {}
                }
                backoff = (backoff * 2).min(max_backoff);
            }
            Err(e) => {
                crate::metrics::record_store_error(if e.is_transient() { "aborted" } else { "rejected" });
                error!(error = %error_chain(&e), batch_size = unique.len(), "batch write failed; answering 503");
                break Err(e);
            }
        }
    };
    // For each batch position: where it was inserted (None: a duplicate). None when the batch failed.
    let mut outbox_id = None;
    let inserted_at: Option<Vec<Option<Inserted>>> = result.ok().map(|written| {
        outbox_id = written.outbox_id;
        let mut at = vec![None; batch.len()];
        for (position, inserted) in unique_positions.iter().zip(written.rows) {
            at[*position] = inserted;
        }
        at
    });
    let mut counts: HashMap<(Arc<str>, Outcome), u64> = HashMap::new();
    for (i, job) in batch.iter_mut().enumerate() {
        let ack = match &inserted_at {
            None => Err(StoreFailed),
            Some(flags) => {
                let outcome = if flags[i].is_some() { Outcome::Inserted } else { Outcome::Duplicate };
                *counts.entry((job.event.source.clone(), outcome)).or_default() += 1;
                Ok(outcome)
            }
        };
        if let Some(tx) = job.ack.take() {
            // The requester may have given up (deadline passed): the event is stored all the same.
            let _ = tx.send(ack);
        }
    }
    for ((source, outcome), n) in counts {
        crate::metrics::record_events(&source, outcome.as_str(), n);
    }
    // Acks are out; now hand the new rows to the notifier. Redis is never on the ack path: when the
    // notifier is behind, the rows stay unpublished in the outbox and the catch-up publishes them.
    // (No outbox row means nothing was new.)
    if let (Some(notify), Some(flags), Some(id)) = (notify, inserted_at, outbox_id) {
        let events: Vec<StoredEvent> = batch
            .iter()
            .zip(flags)
            .filter_map(|(job, at)| at.map(|at| StoredEvent::from_new(&job.event, at)))
            .collect();
        notify.offer(OutboxBatch { id, events });
    }
    debug!("batch resolved");
}
