//! Shutdown: waiting for SIGTERM/SIGINT, and running each drain step within its time bound.

use std::future::Future;
use std::time::Duration;

use tracing::warn;

/// Completes on the first SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                // Signal handlers could not be installed: fall back to Ctrl-C only.
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
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
