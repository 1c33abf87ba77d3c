//! Shutdown: waiting for SIGTERM/SIGINT, and running each drain step within its time bound (the spill, to its end).

use std::future::Future;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::warn;

/// SIGTERM and SIGINT (Ctrl-C), listened for from creation on: a signal that comes between two `recv`s is
/// kept for the next, not missed.
pub struct Signals {
    #[cfg(unix)]
    streams: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    pub fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let streams = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
                (Ok(term), Ok(int)) => Some((term, int)),
                // Signal handlers could not be installed: Ctrl-C only, as on other systems.
                _ => None,
            };
            Self { streams }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Completes on the next SIGTERM or SIGINT.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some((term, int)) = &mut self.streams {
            tokio::select! {
                Some(()) = term.recv() => {}
                Some(()) = int.recv() => {}
                // Both streams ended (the runtime is shutting down): no signal can come, and none came.
                else => std::future::pending::<()>().await,
            }
            return;
        }
        if tokio::signal::ctrl_c().await.is_err() {
            // No handler could be installed: the signals keep their default action, which ends the process.
            std::future::pending::<()>().await;
        }
    }
}

impl Default for Signals {
    fn default() -> Self {
        Self::new()
    }
}

/// Completes on the first SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    Signals::new().recv().await;
}

/// Runs one shutdown step for at most `bound`; logs a warning naming the step when the bound is hit.
/// Returns whether the step completed.
pub async fn bounded<F: Future>(step: &'static str, bound: Duration, work: F) -> bool {
    if tokio::time::timeout(bound, work).await.is_ok() {
        true
    } else {
        warn!(step, bound_ms = bound.as_millis() as u64, "shutdown step did not finish within its bound");
        false
    }
}

/// As [`bounded`], and ended early by `hurry` (a second shutdown signal: the operator will not wait for this
/// step). Returns whether the step completed.
pub async fn bounded_unless_hurried<F: Future>(
    step: &'static str,
    bound: Duration,
    hurry: &CancellationToken,
    work: F,
) -> bool {
    tokio::select! {
        // Biased: once hurried, a later step is not begun at all.
        biased;
        () = hurry.cancelled() => {
            warn!(step, "shutdown hurried by a second signal: not waiting for this step");
            false
        }
        done = bounded(step, bound, work) => done,
    }
}

/// Runs a step that must not be cut, however long it takes: cut, it would lose what it has not yet written
/// (acknowledged events on their way to the spill file). A warning naming it is logged every `every` while
/// it runs, so that a slow disk is seen; only an exit (a third signal) or a kill ends it early.
pub async fn to_the_end<F: Future>(step: &'static str, every: Duration, work: F) -> F::Output {
    let started = Instant::now();
    tokio::pin!(work);
    loop {
        match tokio::time::timeout(every, &mut work).await {
            Ok(output) => return output,
            Err(_) => warn!(
                step,
                waited_ms = started.elapsed().as_millis() as u64,
                "shutdown step still running; waited for to its end, since what it has not written would be lost \
                 (a third signal exits at once)"
            ),
        }
    }
}
