//! `find-max`: the headline number. Runs short open-loop steps, doubling the rate until P99 passes the SLO,
//! errors appear or the schedule cannot be kept, then bisects between the last good and first bad rate.
//! When the start rate itself fails, it halves the rate until a step passes (and bisects up from there),
//! giving up only below `precision` of the start rate: a search that starts too high still finds a rate.
//!
//! On a shared or noisy host one short step can fail on a passing disturbance (a checkpoint, a neighbour's
//! I/O) and cap the whole search. With `retries`, a failed step is run again at the same rate, and the
//! rate counts as failed only when every attempt fails, as RFC 2544's repeated trials do. Every attempt
//! is reported.
//!
//! A failed step can also leave work behind in the target (an overloaded gateway's outbox backlog, drained
//! by its catch-up), which would then load the next step. `settle` is a shell command run before every
//! step after the first, once the pause is over; find-max waits for it (e.g. until the backlog is empty).

use std::time::Duration;

use serde::Serialize;

use crate::attack::{self, AttackConfig};
use crate::payload::PayloadFactory;
use crate::report::{fmt_us, Summary};

#[derive(Debug, Clone)]
pub struct FindMaxConfig {
    pub attack: AttackConfig,
    pub slo_p99: Duration,
    pub start_rate: f64,
    pub max_rate: f64,
    pub step: Duration,
    /// Stop bisecting when the bracket is narrower than this fraction of the good rate.
    pub precision: f64,
    /// Pause between steps, so a backlog from a failed step does not spill into the next.
    pub pause: Duration,
    /// How many times a failed step is run again at the same rate before the rate counts as failed.
    pub retries: u32,
    /// A shell command run between steps, after the pause; the next step waits for it to succeed.
    pub settle: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub rate: f64,
    /// 0 for the first attempt at this rate, 1 for its first retry, ...
    pub attempt: u32,
    pub ok: bool,
    pub why: String,
    pub achieved_rate: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub success_ratio: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FindMaxResult {
    /// Highest rate that met the SLO with no errors; 0 when no step passed, down to the search's floor.
    pub max_sustainable_rate: f64,
    pub slo_p99_us: u64,
    pub steps: Vec<Step>,
    /// The full summary of the best step.
    pub best: Option<Summary>,
}

/// Runs the search. `factory_for(step)` builds a payload factory with a run id of its own for each step.
pub async fn run(
    config: &FindMaxConfig,
    factory_for: impl Fn(usize) -> anyhow::Result<PayloadFactory>,
) -> anyhow::Result<FindMaxResult> {
    let slo_us = config.slo_p99.as_micros() as u64;
    let mut steps = Vec::new();
    let mut best: Option<Summary> = None;
    let (mut good, mut bad) = (0.0f64, f64::INFINITY);
    let mut rate = config.start_rate;
    loop {
        let mut ok = false;
        for attempt in 0..=config.retries {
            if attempt > 0 {
                between_steps(config).await?;
            }
            let mut attack = config.attack.clone();
            attack.rate = rate;
            attack.duration = Some(config.step);
            attack.requests = None;
            let summary = attack::run(attack, factory_for(steps.len())?).await?.summary;
            let why = judge(&summary, slo_us);
            ok = why.is_empty();
            eprintln!(
                "find-max: {rate:>9.0}/s  achieved {:>9.1}/s  p99 {:>10}  success {:>7.3}%  {}{}",
                summary.achieved_rate,
                fmt_us(summary.latency_corrected.p99_us),
                summary.success_ratio * 100.0,
                if ok { "ok".to_owned() } else { format!("FAIL: {why}") },
                if attempt > 0 { format!(" (retry {attempt})") } else { String::new() }
            );
            steps.push(Step {
                rate,
                attempt,
                ok,
                why,
                achieved_rate: summary.achieved_rate,
                p50_us: summary.latency_corrected.p50_us,
                p99_us: summary.latency_corrected.p99_us,
                p999_us: summary.latency_corrected.p999_us,
                success_ratio: summary.success_ratio,
            });
            if ok {
                good = rate;
                best = Some(summary);
                break;
            }
        }
        if !ok {
            bad = rate;
        }
        let next = if bad.is_infinite() { (rate * 2.0).min(config.max_rate) } else { f64::midpoint(good, bad) };
        // Below the start rate (nothing has passed yet, or the bracket lies under it), the precision is a
        // fraction of the start rate: a start rate that fails halves down to that floor, then gives up.
        let converged = !bad.is_infinite() && (bad - good) <= good.max(config.start_rate) * config.precision;
        if converged || (ok && rate >= config.max_rate) {
            break;
        }
        rate = next.round();
        between_steps(config).await?;
    }
    Ok(FindMaxResult { max_sustainable_rate: good, slo_p99_us: slo_us, steps, best })
}

/// The pause, then the settle command (if any). A settle command that fails ends the search: the next
/// step would be measured against a target in an unknown state.
async fn between_steps(config: &FindMaxConfig) -> anyhow::Result<()> {
    tokio::time::sleep(config.pause).await;
    let Some(command) = &config.settle else { return Ok(()) };
    let started = std::time::Instant::now();
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .kill_on_drop(true)
        .status()
        .await
        .map_err(|e| anyhow::anyhow!("cannot run the settle command {command:?}: {e}"))?;
    anyhow::ensure!(status.success(), "the settle command {command:?} failed ({status})");
    if started.elapsed() >= Duration::from_millis(500) {
        eprintln!("find-max: settled in {:.1}s", started.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Why a step failed, or empty when it passed: every answer as expected, the schedule kept, P99 under the SLO.
fn judge(summary: &Summary, slo_us: u64) -> String {
    let mut why = Vec::new();
    if summary.success_ratio < 1.0 {
        why.push(format!("{} unexpected answers", summary.requests - summary.successful()));
    }
    if !summary.rate_met(0.01) {
        why.push(format!("rate not met ({:.1}/s)", summary.achieved_rate));
    }
    if summary.latency_corrected.p99_us > slo_us {
        why.push(format!("p99 {} > SLO", fmt_us(summary.latency_corrected.p99_us)));
    }
    why.join(", ")
}
