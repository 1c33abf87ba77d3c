//! A batching worker: collect up to `batch_max` jobs (what arrives within the linger, or with group commit
//! until no other batch is being written), dedupe, write in one round trip, then resolve every ack.
//! Transient database errors are retried with capped backoff; a batch refused for one row is split around it.

use std::collections::HashMap;
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
use crate::store::{Inserted, NewEvent, OutboxBatch, Store, StoreError, StoredEvent, Written};

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

/// Writes one batch and resolves every job's ack. See `write_runs` for what is retried and what is split.
async fn write_batch(
    store: &Store,
    batch: &mut [Job],
    config: &WorkersConfig,
    control: &WorkerControl,
    notify: Option<&NotifyQueue>,
) {
    // Dedupe: the first job of each (source, id) is written; later ones in the batch are duplicates of it.
    let mut first_of: HashMap<(&str, &str), usize> = HashMap::with_capacity(batch.len());
    let mut unique: Vec<&NewEvent> = Vec::with_capacity(batch.len());
    // Per unique event: whether a job of it was acknowledged before being written (enqueue mode).
    let mut acknowledged: Vec<bool> = Vec::with_capacity(batch.len());
    // Per unique event: the job that writes it.
    let mut first_job: Vec<usize> = Vec::with_capacity(batch.len());
    // Per job: the unique event it writes or duplicates, and whether it is that event's first job.
    let mut writes: Vec<(usize, bool)> = Vec::with_capacity(batch.len());
    for (position, job) in batch.iter().enumerate() {
        let next = unique.len();
        let index = *first_of.entry((&*job.event.source, job.event.id.as_str())).or_insert(next);
        if index == next {
            unique.push(&job.event);
            acknowledged.push(false);
            first_job.push(position);
        }
        acknowledged[index] |= job.ack.is_none();
        writes.push((index, index == next));
    }
    let runs = write_runs(store, &unique, &acknowledged, config, control).await;
    // Per unique event: where it was inserted (None: already stored), or Err when its run failed.
    let mut inserted_at: Vec<Result<Option<Inserted>, ()>> = vec![Err(()); unique.len()];
    for run in &runs {
        if let Ok(written) = &run.written {
            for (k, row) in written.rows.iter().enumerate() {
                inserted_at[run.start + k] = Ok(*row);
            }
        }
    }
    let mut counts: HashMap<(Arc<str>, Outcome), u64> = HashMap::new();
    for (job, (index, first)) in batch.iter_mut().zip(writes) {
        let ack = match inserted_at[index] {
            Err(()) => Err(StoreFailed),
            Ok(at) => {
                let outcome = if first && at.is_some() { Outcome::Inserted } else { Outcome::Duplicate };
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
    debug!("batch resolved");
    // Acks are out; now hand the new rows to the notifier, one outbox row per statement. Redis is never on
    // the ack path: when the notifier is behind, the rows stay unpublished in the outbox and the catch-up
    // publishes them. (No outbox row means nothing in the statement was new.)
    let Some(notify) = notify else { return };
    for run in runs {
        let Ok(Written { rows, outbox_id: Some(id) }) = run.written else { continue };
        let events = rows
            .into_iter()
            .enumerate()
            .filter_map(|(k, at)| at.map(|at| StoredEvent::from_new(&batch[first_job[run.start + k]].event, at)))
            .collect();
        notify.offer(OutboxBatch { id, events });
    }
}

/// A run of a deduplicated batch written in one statement, and what came of it.
struct Run {
    start: usize,
    written: Result<Written, StoreError>,
}

/// Writes `unique` in as few statements as Postgres takes:
/// - what may pass later (a lost connection, a failover, a timeout: `StoreError::is_transient`) is retried
///   with capped backoff;
/// - a statement refused for one of its rows (a data or constraint error: `StoreError::blames_a_row`) is
///   written again as two halves, down to the one event refused, so that it does not fail its neighbours;
/// - a run holding an event already acknowledged (enqueue mode) is never given up while the process runs:
///   whatever Postgres answers (a dropped table, a revoked privilege, a refused row), it is logged and tried
///   again, after the rest of the batch, until it is written or the shutdown's drain runs out of time. The
///   worker stays on it; once every worker does, the queue fills and new requests get 503, which the senders
///   retry; giving it up would lose events the senders will not send again.
async fn write_runs(
    store: &Store,
    unique: &[&NewEvent],
    acknowledged: &[bool],
    config: &WorkersConfig,
    control: &WorkerControl,
) -> Vec<Run> {
    if unique.is_empty() {
        return Vec::new();
    }
    let mut runs = Vec::with_capacity(1);
    // Runs still to write, the next on top.
    let mut pending = vec![(0, unique.len())];
    // Refused runs holding acknowledged events, to try again once the others are written.
    let mut held = Vec::new();
    let mut backoff = INITIAL_BACKOFF;
    let max_backoff = Duration::from_millis(config.retry_backoff_max_ms);
    loop {
        while let Some((start, end)) = pending.pop() {
            let events = &unique[start..end];
            let written = write_with_retry(store, events, config, control).await;
            let Err(e) = &written else {
                runs.push(Run { start, written });
                continue;
            };
            let aborted = control.abort.is_cancelled();
            if e.is_transient() || aborted {
                // Retried until the drain ran out of time.
                crate::metrics::record_store_error("aborted");
            } else if e.blames_a_row() && events.len() > 1 {
                crate::metrics::record_store_error("rejected");
                warn!(error = %error_chain(e), batch_size = events.len(), "batch refused for one of its rows; writing its halves apart");
                let middle = start + events.len() / 2;
                pending.push((middle, end));
                pending.push((start, middle));
                continue;
            } else if acknowledged[start..end].contains(&true) {
                crate::metrics::record_store_error("held");
                error!(error = %error_chain(e), batch_size = events.len(), first_event = %events[0].id, retry_in_ms = backoff.as_millis() as u64, "batch refused, and it holds events already acknowledged (enqueue mode); retrying until it is written");
                held.push((start, end));
                continue;
            } else {
                crate::metrics::record_store_error("rejected");
            }
            error!(error = %error_chain(e), batch_size = events.len(), first_event = %events[0].id, "batch write failed; giving it up");
            runs.push(Run { start, written });
        }
        if held.is_empty() {
            return runs;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = control.abort.cancelled() => {}
        }
        backoff = (backoff * 2).min(max_backoff);
        // In their order: the first on top.
        pending.extend(held.drain(..).rev());
    }
}

/// Writes one statement's events, retrying what may pass later (`StoreError::is_transient`) until the
/// shutdown's drain runs out of time; any other error is returned at once, for `write_runs` to decide.
async fn write_with_retry(
    store: &Store,
    events: &[&NewEvent],
    config: &WorkersConfig,
    control: &WorkerControl,
) -> Result<Written, StoreError> {
    let mut backoff = INITIAL_BACKOFF;
    let max_backoff = Duration::from_millis(config.retry_backoff_max_ms);
    loop {
        let started = Instant::now();
        match store.insert_batch(events).await {
            Ok(written) => {
                crate::metrics::record_batch(events.len(), started.elapsed());
                return Ok(written);
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
            Err(e) => return Err(e),
        }
    }
}
