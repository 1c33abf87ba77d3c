//! The bounded queue between the HTTP handlers and the batching workers, and the acks that flow back.
//!
//! A handler `submit`s a job without waiting (a full queue is refused at once: 503, never an unbounded
//! buffer). In durable mode the job carries a oneshot sender that a worker resolves after the batch holding
//! the event has committed. Each job holds a slot of its source's share of the queue (`SourceQueue`) until its
//! batch is written, so one source's flood cannot take every slot from the others.

pub mod memory;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{QueueConfig, WorkersConfig};
use crate::notify::NotifyQueue;
use crate::spill::Spill;
use crate::store::{NewEvent, Store};

pub use memory::BodyMemory;
pub use worker::WorkerControl;

/// What became of an event once its batch committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The event was new and is now stored.
    Inserted,
    /// An event with the same source and id was already stored (or earlier in the same batch).
    Duplicate,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Inserted => "inserted",
            Outcome::Duplicate => "duplicate",
        }
    }
}

/// The batch holding the event could not be written; the sender should retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the event could not be stored")]
pub struct StoreFailed;

pub type Ack = Result<Outcome, StoreFailed>;

/// One event on its way to Postgres, and whom to tell when it is there.
#[derive(Debug)]
pub struct Job {
    pub event: NewEvent,
    pub ack: Option<oneshot::Sender<Ack>>,
    /// Given back to the source's share when the job is dropped, after its batch is written.
    _slot: QueueSlot,
}

/// How many of one source's events are in the queue or being written now, against the source's
/// `max_queued`: a slot is taken before a job is queued and given back when its batch is written.
#[derive(Debug, Default)]
pub struct SourceQueue {
    held: AtomicUsize,
}

/// The source holds `max_queued` events already.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the source holds its share of the queue")]
pub struct SourceQueueFull;

impl SourceQueue {
    /// Events of the source held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Takes a slot, or refuses when `limit` (non-zero) are held; 0: no limit of the source's own (the
    /// queue's capacity still bounds it), the slot only counted.
    pub fn take(self: &Arc<Self>, limit: usize) -> Result<QueueSlot, SourceQueueFull> {
        if limit == 0 {
            self.held.fetch_add(1, Ordering::AcqRel);
        } else {
            self.held
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| (held < limit).then_some(held + 1))
                .map_err(|_| SourceQueueFull)?;
        }
        Ok(QueueSlot { queue: self.clone() })
    }
}

/// One event's place in its source's share; given back when dropped.
#[derive(Debug)]
pub struct QueueSlot {
    queue: Arc<SourceQueue>,
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.queue.held.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full")]
    Full,
    #[error("the gateway is shutting down")]
    Closed,
}

/// The sending half, shared by every handler.
#[derive(Debug, Clone)]
pub struct Pipeline {
    tx: mpsc::Sender<Job>,
    capacity: usize,
    high_water: usize,
    /// The same ratio of the body memory budget.
    memory_high_water: usize,
    closed: Arc<AtomicBool>,
    body_memory: BodyMemory,
}

impl Pipeline {
    /// Creates the queue and starts `config.count` workers on `tracker`, with group commit or a fixed linger,
    /// and the hold that retries the acknowledged events Postgres refuses (`worker::Hold`). Acknowledged events
    /// still unwritten when the shutdown's drain runs out go to `spill`, when there is one.
    pub fn start(
        queue: &QueueConfig,
        config: &WorkersConfig,
        group_commit: bool,
        store: &Store,
        notify: Option<&NotifyQueue>,
        spill: Option<Arc<Spill>>,
        tracker: &TaskTracker,
    ) -> (Self, WorkerControl) {
        let capacity = queue.capacity;
        let (tx, rx) = mpsc::channel(capacity);
        let control = WorkerControl { drain: CancellationToken::new(), abort: CancellationToken::new() };
        let rx = Arc::new(Mutex::new(rx));
        let group_commit = Arc::new(worker::GroupCommit::new(group_commit));
        let writer = worker::Writer {
            store: store.clone(),
            config: config.clone(),
            control: control.clone(),
            notify: notify.cloned(),
            spill,
            // As many refused events as the queue holds: past that the workers keep them (see `Hold`).
            hold: Arc::new(worker::Hold::new(capacity, config.count)),
        };
        for index in 0..config.count {
            tracker.spawn(worker::run(index, rx.clone(), writer.clone(), group_commit.clone()));
        }
        tracker.spawn(worker::run_hold(writer));
        crate::metrics::record_queue_capacity(capacity);
        let high_water = ((capacity as f64 * queue.high_water_ratio).ceil() as usize).clamp(1, capacity);
        let body_memory = BodyMemory::new(queue.body_memory_bytes());
        let memory_high_water = (body_memory.limit() as f64 * queue.high_water_ratio).ceil() as usize;
        crate::metrics::record_body_memory_limit(body_memory.limit());
        let closed = Arc::new(AtomicBool::new(false));
        (Self { tx, capacity, high_water, memory_high_water, closed, body_memory }, control)
    }

    /// Queues an event, holding its source's `slot` until it is written, without waiting. With `want_ack`,
    /// returns the receiver of its outcome.
    pub fn submit(
        &self,
        event: NewEvent,
        slot: QueueSlot,
        want_ack: bool,
    ) -> Result<Option<oneshot::Receiver<Ack>>, SubmitError> {
        if self.is_closed() {
            return Err(SubmitError::Closed);
        }
        let (ack, receiver) = if want_ack {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        match self.tx.try_send(Job { event, ack, _slot: slot }) {
            Ok(()) => Ok(receiver),
            Err(mpsc::error::TrySendError::Full(_)) => Err(SubmitError::Full),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SubmitError::Closed),
        }
    }

    /// Queues an event that is no request's (a spilled one, stored again), waiting for room in the queue where
    /// a request would be refused, and returns the receiver of its outcome.
    pub async fn submit_waiting(
        &self,
        event: NewEvent,
        slot: QueueSlot,
    ) -> Result<oneshot::Receiver<Ack>, SubmitError> {
        if self.is_closed() {
            return Err(SubmitError::Closed);
        }
        let (ack, receiver) = oneshot::channel();
        self.tx.send(Job { event, ack: Some(ack), _slot: slot }).await.map_err(|_| SubmitError::Closed)?;
        Ok(receiver)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Refuses every later submit; the workers keep draining what is queued.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    /// The budget every body is read into.
    pub fn body_memory(&self) -> &BodyMemory {
        &self.body_memory
    }

    pub fn depth(&self) -> usize {
        self.capacity - self.tx.capacity()
    }

    /// Above the high-water mark (of the queue's slots or of the body memory budget) the gateway reports
    /// itself not ready, so a load balancer sends elsewhere.
    pub fn saturation(&self) -> Saturation {
        Saturation {
            slots: self.depth() >= self.high_water,
            body_memory: self.body_memory.used() >= self.memory_high_water,
        }
    }
}

/// Which of the queue's two limits is past its high-water mark: the operator's next step differs (more
/// slots or a faster store for the first; larger `body_memory_mb` or smaller bodies for the second).
#[derive(Debug, Clone, Copy)]
pub struct Saturation {
    pub slots: bool,
    pub body_memory: bool,
}

impl Saturation {
    pub fn any(self) -> bool {
        self.slots || self.body_memory
    }

    /// The limits past their mark, by the names `/readyz` gives them.
    pub fn causes(self) -> Vec<&'static str> {
        [(self.slots, "queue_slots"), (self.body_memory, "body_memory")]
            .into_iter()
            .filter_map(|(past, name)| past.then_some(name))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_holds_at_most_its_limit_and_a_slot_comes_back_when_dropped() {
        let queue = Arc::new(SourceQueue::default());
        let first = queue.take(2).unwrap();
        let second = queue.take(2).unwrap();
        assert_eq!(queue.take(2).unwrap_err(), SourceQueueFull);
        assert_eq!(queue.held(), 2, "a refusal takes nothing");
        drop(first);
        let third = queue.take(2).unwrap();
        assert_eq!(queue.held(), 2);
        // No limit of its own: every slot is counted, none refused.
        let unlimited: Vec<QueueSlot> = (0..5).map(|_| queue.take(0).unwrap()).collect();
        assert_eq!(queue.held(), 7);
        drop((second, third, unlimited));
        assert_eq!(queue.held(), 0);
    }

    #[test]
    fn concurrent_takers_never_hold_more_than_the_limit() {
        let queue = Arc::new(SourceQueue::default());
        let held: std::sync::Mutex<Vec<QueueSlot>> = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..100 {
                        if let Ok(slot) = queue.take(50) {
                            held.lock().unwrap().push(slot);
                        }
                    }
                });
            }
        });
        assert_eq!(held.lock().unwrap().len(), 50);
        assert_eq!(queue.held(), 50);
        drop(held);
        assert_eq!(queue.held(), 0);
    }
}
