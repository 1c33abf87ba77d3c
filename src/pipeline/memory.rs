//! A byte budget for the request bodies the gateway holds, from the first byte read until the last copy
//! is dropped (after its batch is written and its notification published).
//!
//! The queue's capacity counts events, not bytes: 8,192 Stripe events are ~10 MB, but 8,192 bodies at a
//! 1 MiB `max_body_bytes` would be 8 GiB, and the notifier's queue holds bodies too. The budget bounds
//! them all; a request that would exceed it gets 503 + Retry-After before more of it is read.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;

/// The budget, shared by every handler; cheap to clone.
#[derive(Debug, Clone)]
pub struct BodyMemory {
    inner: Arc<Budget>,
}

#[derive(Debug)]
struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl BodyMemory {
    pub fn new(limit: usize) -> Self {
        Self { inner: Arc::new(Budget { used: AtomicUsize::new(0), limit }) }
    }

    /// Bytes of bodies held now.
    pub fn used(&self) -> usize {
        self.inner.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.inner.limit
    }

    /// An empty reservation, to grow as a body arrives.
    pub fn reservation(&self) -> Reservation {
        Reservation { budget: self.inner.clone(), bytes: 0 }
    }
}

/// Bytes taken from the budget; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: usize,
}

/// The budget has no room for the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the gateway holds its limit of request bodies in memory")]
pub struct OverBudget;

impl Reservation {
    /// Grows the reservation to `bytes` (never shrinks it); fails, taking nothing, past the limit.
    pub fn grow_to(&mut self, bytes: usize) -> Result<(), OverBudget> {
        let Some(more) = bytes.checked_sub(self.bytes).filter(|more| *more > 0) else {
            return Ok(());
        };
        let budget = &self.budget;
        budget
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(more).filter(|total| *total <= budget.limit)
            })
            .map_err(|_| OverBudget)?;
        self.bytes = bytes;
        Ok(())
    }

    /// A body that gives its bytes back to the budget when its last clone is dropped, wherever that is.
    pub fn into_body(self, body: Vec<u8>) -> Bytes {
        Bytes::from_owner(HeldBody { body, _reservation: self })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// The owner behind a budgeted `Bytes`.
struct HeldBody {
    body: Vec<u8>,
    _reservation: Reservation,
}

impl AsRef<[u8]> for HeldBody {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_holds_its_bytes_until_its_last_clone_is_dropped() {
        let memory = BodyMemory::new(100);
        let mut reservation = memory.reservation();
        reservation.grow_to(60).unwrap();
        let body = reservation.into_body(vec![7; 60]);
        let clone = body.slice(10..20);
        assert_eq!(memory.used(), 60);
        drop(body);
        assert_eq!(memory.used(), 60, "a slice still holds the body");
        assert_eq!(&clone[..], &[7; 10]);
        drop(clone);
        assert_eq!(memory.used(), 0);
    }

    #[test]
    fn the_limit_is_never_exceeded_and_a_refusal_takes_nothing() {
        let memory = BodyMemory::new(100);
        let mut first = memory.reservation();
        first.grow_to(70).unwrap();
        let mut second = memory.reservation();
        assert_eq!(second.grow_to(31), Err(OverBudget));
        assert_eq!(memory.used(), 70);
        second.grow_to(30).unwrap();
        assert_eq!(memory.used(), 100);
        // Growing to less than is held is a no-op, never a release.
        first.grow_to(10).unwrap();
        assert_eq!(memory.used(), 100);
        drop(first);
        assert_eq!(memory.used(), 30);
        drop(second);
        assert_eq!(memory.used(), 0);
    }

    #[test]
    fn concurrent_reservations_never_take_more_than_the_limit() {
        let memory = BodyMemory::new(1000);
        let taken = AtomicUsize::new(0);
        let held: std::sync::Mutex<Vec<Reservation>> = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..100 {
                        let mut reservation = memory.reservation();
                        if reservation.grow_to(7).is_ok() {
                            taken.fetch_add(7, Ordering::Relaxed);
                            held.lock().unwrap().push(reservation);
                        }
                    }
                });
            }
        });
        assert_eq!(taken.load(Ordering::Relaxed), 994, "142 reservations of 7 bytes fit in 1,000");
        assert_eq!(memory.used(), 994);
        drop(held);
        assert_eq!(memory.used(), 0);
    }
}
