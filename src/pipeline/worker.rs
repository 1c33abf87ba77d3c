//! A batching worker: collect up to `batch_max` jobs (what arrives within the linger, or with group commit
//! until no other batch is being written), dedupe, write in one round trip, then resolve every ack.
//! Transient database errors are retried with capped backoff; a batch refused for one row is split around it,
//! and an acknowledged event refused alone is set aside in the `Hold`, which retries it without a worker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex as SyncMutex;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Mutex, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn, Instrument};

use super::{Job, Outcome, StoreFailed};
use crate::config::WorkersConfig;
use crate::error_chain;
use crate::notify::NotifyQueue;
use crate::spill::Spill;
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

/// What a batch is written with, shared by the workers and the hold.
#[derive(Clone)]
pub(super) struct Writer {
    pub(super) store: Store,
    pub(super) config: WorkersConfig,
    pub(super) control: WorkerControl,
    pub(super) notify: Option<NotifyQueue>,
    pub(super) hold: Arc<Hold>,
    /// Where acknowledged events go that the shutdown's drain had no time to write (`shutdown.spill_dir`).
    pub(super) spill: Option<Arc<Spill>>,
}

/// Who writes a batch, which decides what `write_runs` sets aside instead of retrying in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WrittenBy {
    /// A worker: it sets aside an acknowledged event Postgres refuses alone, while the hold has room.
    Worker,
    /// The hold's round: every refused run holding acknowledged events goes back to the hold.
    Hold,
}

/// Acknowledged events (enqueue mode) that Postgres refused one by one for what they hold (a `CHECK` or
/// trigger of the operator's, a value it takes no more), set aside by the workers so that none keeps its
/// worker: `run_hold` retries them together, with capped backoff, while the workers go on with the queue.
///
/// It takes at most `limit` events (the queue's capacity). Past it, and for a run refused whole (a dropped
/// table, a revoked privilege: nothing passes, and nothing should be taken meanwhile), the worker keeps the
/// run and retries it itself; once every worker does, the queue fills and new requests get 503.
#[derive(Debug)]
pub(super) struct Hold {
    jobs: SyncMutex<Vec<Job>>,
    /// Jobs in the hold, including those its round is writing now.
    held: AtomicUsize,
    limit: usize,
    /// A job set aside, or a worker gone.
    changed: Notify,
    /// Workers still running: until none is, more may be set aside.
    workers: AtomicUsize,
}

impl Hold {
    pub(super) fn new(limit: usize, workers: usize) -> Self {
        Self {
            jobs: SyncMutex::new(Vec::new()),
            held: AtomicUsize::new(0),
            limit,
            changed: Notify::new(),
            workers: AtomicUsize::new(workers),
        }
    }

    fn has_room(&self) -> bool {
        self.held.load(Ordering::Acquire) < self.limit
    }

    /// A worker's jobs, set aside.
    fn put(&self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let n = jobs.len();
        self.lock().extend(jobs);
        crate::metrics::record_held_events(self.held.fetch_add(n, Ordering::AcqRel) + n);
        self.changed.notify_one();
    }

    /// Every job set aside, for a round; they count as held until the round `settle`s them.
    fn take(&self) -> Vec<Job> {
        std::mem::take(&mut *self.lock())
    }

    /// A round of `n` jobs is over: `refused` are set aside again, the others are written (or given up at
    /// the end of the drain).
    fn settle(&self, n: usize, refused: Vec<Job>) {
        let written = n - refused.len();
        self.lock().extend(refused);
        crate::metrics::record_held_events(self.held.fetch_sub(written, Ordering::AcqRel) - written);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Job>> {
        // Nothing panics while it is held (a move of jobs in or out).
        self.jobs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn is_empty(&self) -> bool {
        self.held.load(Ordering::Acquire) == 0
    }

    fn worker_exited(&self) {
        self.workers.fetch_sub(1, Ordering::AcqRel);
        self.changed.notify_one();
    }
}

/// Tells the hold that a worker is gone, however its task ends.
struct Running<'a>(&'a Hold);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.worker_exited();
    }
}

pub(super) async fn run(
    index: usize,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    writer: Writer,
    group_commit: Arc<GroupCommit>,
) {
    let _running = Running(&writer.hold);
    let config = &writer.config;
    let control = &writer.control;
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
        let refused = writer.write_batch(&mut batch, WrittenBy::Worker).instrument(span).await;
        writer.hold.put(refused);
        group_commit.finish();
        batch.clear();
    }
}

/// The hold's task: retries what the workers set aside, all of it each round (in batches of `batch_max`),
/// after a backoff that doubles while anything stays refused. It ends once the workers have and the hold is
/// empty; at the end of the shutdown's drain, what Postgres still refuses is given up, as a worker would.
pub(super) async fn run_hold(writer: Writer) {
    let hold = &writer.hold;
    let control = &writer.control;
    let max_backoff = Duration::from_millis(writer.config.retry_backoff_max_ms);
    let mut backoff = INITIAL_BACKOFF;
    loop {
        if hold.is_empty() {
            backoff = INITIAL_BACKOFF;
            if control.drain.is_cancelled() && hold.workers.load(Ordering::Acquire) == 0 {
                return;
            }
            // `notify_one` keeps a wake-up for a waiter yet to come: nothing set aside in between is missed.
            hold.changed.notified().await;
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = control.abort.cancelled() => {}
        }
        let mut jobs = hold.take();
        let round = jobs.len();
        let mut refused = Vec::new();
        while !jobs.is_empty() {
            let rest = jobs.split_off(jobs.len().min(writer.config.batch_max));
            let mut batch = std::mem::replace(&mut jobs, rest);
            let span = tracing::debug_span!("hold", batch_size = batch.len());
            refused.extend(writer.write_batch(&mut batch, WrittenBy::Hold).instrument(span).await);
        }
        hold.settle(round, refused);
        backoff = (backoff * 2).min(max_backoff);
    }
}

/// What became of one deduplicated event of a batch.
#[derive(Debug, Clone, Copy)]
enum Fate {
    /// Written: where it was inserted, or None when it was already stored.
    Written(Option<Inserted>),
    /// Given up: its waiters are told it failed.
    Failed,
    /// Refused, acknowledged, and moved to the hold with its jobs.
    SetAside,
}

impl Writer {
    /// Writes one batch, resolves every job's ack and hands the new rows to the notifier. Returns the jobs
    /// of the events set aside (see `write_runs`), unresolved, for the hold.
    async fn write_batch(&self, batch: &mut Vec<Job>, by: WrittenBy) -> Vec<Job> {
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
        let (runs, set_aside) = self.write_runs(&unique, &acknowledged, by).await;
        let mut fates = vec![Fate::Failed; unique.len()];
        for run in &runs {
            if let Ok(written) = &run.written {
                for (k, row) in written.rows.iter().enumerate() {
                    fates[run.start + k] = Fate::Written(*row);
                }
            }
        }
        for &(start, end) in &set_aside {
            fates[start..end].fill(Fate::SetAside);
        }
        let mut counts: HashMap<(Arc<str>, Outcome), u64> = HashMap::new();
        for (job, &(index, first)) in batch.iter_mut().zip(&writes) {
            let ack = match fates[index] {
                Fate::SetAside => continue,
                Fate::Failed => Err(StoreFailed),
                Fate::Written(at) => {
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
        // Acks are out; now hand the new rows to the notifier, one outbox row per statement. Redis is never
        // on the ack path: when the notifier is behind, the rows stay unpublished in the outbox and the
        // catch-up publishes them. (No outbox row means nothing in the statement was new.)
        if let Some(notify) = &self.notify {
            for run in runs {
                let Ok(Written { rows, outbox_id: Some(id) }) = run.written else { continue };
                let events = rows
                    .into_iter()
                    .enumerate()
                    .filter_map(|(k, at)| {
                        at.map(|at| StoredEvent::from_new(&batch[first_job[run.start + k]].event, at))
                    })
                    .collect();
                notify.offer(OutboxBatch { id, events });
            }
        }
        if set_aside.is_empty() {
            return Vec::new();
        }
        let mut writes = writes.iter();
        batch
            .drain(..)
            .filter(|_| writes.next().is_some_and(|&(index, _)| matches!(fates[index], Fate::SetAside)))
            .collect()
    }

    /// Writes `unique` in as few statements as Postgres takes, and returns the runs written or given up,
    /// and those set aside for the hold:
    /// - what may pass later (a lost connection, a failover, a timeout: `StoreError::is_transient`) is
    ///   retried with capped backoff;
    /// - a statement refused for one of its rows (a data, constraint or PL/pgSQL error, a code of the
    ///   operator's own, a row-level security policy: `StoreError::blames_a_row`) is written again in parts,
    ///   down to the one event refused, so that it does not fail its neighbours: before, the event and after
    ///   it when the refusal names it (`StoreError::named_event`), in halves otherwise;
    /// - a run holding an event already acknowledged (enqueue mode) is never given up while the process
    ///   runs: whatever Postgres answers (a dropped table, a revoked privilege, a refused row), it is logged
    ///   and tried again until it is written or the shutdown's drain runs out of time. A worker sets a
    ///   single refused event aside in the hold while the hold has room, and goes on; it retries anything
    ///   else itself, after the rest of the batch, and once every worker does, the queue fills and new
    ///   requests get 503, which the senders retry; giving it up would lose events the senders will not send
    ///   again. In the hold's round, every such run is set aside again, for the next round.
    async fn write_runs(
        &self,
        unique: &[&NewEvent],
        acknowledged: &[bool],
        by: WrittenBy,
    ) -> (Vec<Run>, Vec<(usize, usize)>) {
        let mut runs = Vec::with_capacity(1);
        let mut set_aside = Vec::new();
        if unique.is_empty() {
            return (runs, set_aside);
        }
        // Runs still to write, the next on top.
        let mut pending = vec![(0, unique.len())];
        // Refused runs holding acknowledged events, to try again once the others are written.
        let mut held = Vec::new();
        let mut backoff = INITIAL_BACKOFF;
        let max_backoff = Duration::from_millis(self.config.retry_backoff_max_ms);
        loop {
            while let Some((start, end)) = pending.pop() {
                let events = &unique[start..end];
                let written =
                    write_with_retry(&self.store, events, &self.config, &self.control, self.spill.is_some()).await;
                let Err(e) = &written else {
                    runs.push(Run { start, written });
                    continue;
                };
                let aborted = self.control.abort.is_cancelled();
                if e.is_transient() || aborted {
                    // Retried until the drain ran out of time.
                    crate::metrics::record_store_error("aborted");
                    if acknowledged[start..end].contains(&true) {
                        self.spill_acknowledged(events, &acknowledged[start..end], e).await;
                        runs.push(Run { start, written });
                        continue;
                    }
                } else if e.blames_a_row() && events.len() > 1 {
                    crate::metrics::record_store_error("rejected");
                    warn!(error = %error_chain(e), batch_size = events.len(), "batch refused for one of its rows; writing its parts apart");
                    // Around the event the refusal names (a `CHECK`'s failing row), or else in halves. Pushed
                    // last part first: the first is written next.
                    if let Some(named) = e.named_event(events.iter().map(|event| event.id.as_str())) {
                        let named = start + named;
                        pending.extend(
                            [(named + 1, end), (named, named + 1), (start, named)].into_iter().filter(|(a, b)| a < b),
                        );
                    } else {
                        let middle = start + events.len() / 2;
                        pending.push((middle, end));
                        pending.push((start, middle));
                    }
                    continue;
                } else if acknowledged[start..end].contains(&true) {
                    crate::metrics::record_store_error("held");
                    let aside = match by {
                        WrittenBy::Hold => true,
                        WrittenBy::Worker => e.blames_a_row() && self.hold.has_room(),
                    };
                    if aside {
                        error!(error = %error_chain(e), event = %events[0].id, "event refused, and already acknowledged (enqueue mode); set aside, retrying until it is written");
                        set_aside.push((start, end));
                    } else {
                        error!(error = %error_chain(e), batch_size = events.len(), first_event = %events[0].id, retry_in_ms = backoff.as_millis() as u64, "batch refused, and it holds events already acknowledged (enqueue mode); retrying until it is written");
                        held.push((start, end));
                    }
                    continue;
                } else {
                    crate::metrics::record_store_error("rejected");
                }
                error!(error = %error_chain(e), batch_size = events.len(), first_event = %events[0].id, "batch write failed; giving it up");
                runs.push(Run { start, written });
            }
            if held.is_empty() {
                return (runs, set_aside);
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = self.control.abort.cancelled() => {}
            }
            backoff = (backoff * 2).min(max_backoff);
            // In their order: the first on top.
            pending.extend(held.drain(..).rev());
        }
    }

    /// The drain ran out of time before these acknowledged events (those of `events` marked in `acknowledged`)
    /// were written, and their senders will not send them again: they go to the spill file, stored from it at
    /// the next start. Without one (no `shutdown.spill_dir`, or a write that failed) they are lost, and each is
    /// named in the log, for the operator to fetch from the sender (Stripe's events API, its dashboard).
    async fn spill_acknowledged(&self, events: &[&NewEvent], acknowledged: &[bool], cause: &StoreError) {
        let events: Vec<&NewEvent> = events
            .iter()
            .zip(acknowledged)
            .filter(|(_, &acknowledged)| acknowledged)
            .map(|(event, _)| *event)
            .collect();
        let spilled = match &self.spill {
            Some(spill) => {
                let dir = spill.dir().display().to_string();
                let spill = Arc::clone(spill);
                let owned: Vec<NewEvent> = events.iter().map(|event| (*event).clone()).collect();
                // Each write syncs the file: off the runtime's threads, which the shutdown's bounds need.
                crate::spill::off_runtime(move || spill.write(&owned.iter().collect::<Vec<_>>()))
                    .await
                    .map_err(|e| format!("cannot write to {dir}: {e}"))
            }
            None => Err("no shutdown.spill_dir".to_owned()),
        };
        crate::metrics::record_spilled(events.len(), spilled.is_ok());
        match spilled {
            Ok(file) => warn!(
                events = events.len(),
                file = %file.display(),
                error = %error_chain(cause),
                "acknowledged events not stored when the drain ran out; written to the spill file, to be stored \
                 from it at the next start"
            ),
            Err(why) => {
                let ids: Vec<String> = events.iter().map(|event| format!("{}/{}", event.source, event.id)).collect();
                error!(
                    events = events.len(),
                    ids = %ids.join(" "),
                    spill = %why,
                    error = %error_chain(cause),
                    "acknowledged events LOST: not stored when the drain ran out, and not spilled"
                );
            }
        }
    }
}

/// A run of a deduplicated batch written in one statement, and what came of it.
struct Run {
    start: usize,
    written: Result<Written, StoreError>,
}

/// Writes one statement's events, retrying what may pass later (`StoreError::is_transient`) until the
/// shutdown's drain runs out of time; any other error is returned at once, for `write_runs` to decide. With a
/// spill file (`spill`), a statement the drain's end finds in flight is left (it may still commit: the
/// spilled copy is then a duplicate), and none starts after it: what is unwritten goes to the file at once,
/// rather than wait on a database that may not answer. Without one, each batch still gets its one try.
async fn write_with_retry(
    store: &Store,
    events: &[&NewEvent],
    config: &WorkersConfig,
    control: &WorkerControl,
    spill: bool,
) -> Result<Written, StoreError> {
    let mut backoff = INITIAL_BACKOFF;
    let max_backoff = Duration::from_millis(config.retry_backoff_max_ms);
    loop {
        let started = Instant::now();
        let attempt = if spill {
            tokio::select! {
                biased;
                () = control.abort.cancelled() => Err(StoreError::Aborted),
                written = store.insert_batch(events) => written,
            }
        } else {
            store.insert_batch(events).await
        };
        match attempt {
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
