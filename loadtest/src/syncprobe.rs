//! `hookgate-load sync-probe`: how long the disk under a directory takes to make a small write durable.
//!
//! Every `interval`, one 8 KiB block is written in place into a preallocated file and `fdatasync`ed: the
//! shape of a Postgres WAL flush (a partial page rewritten into a recycled segment, then synced). A durable
//! webhook waits for one such flush, so the probe's tail run next to the gateway says how much of the
//! gateway's tail is the disk's own.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

/// The bytes written per sample: one Postgres page.
pub const BLOCK: usize = 8192;
/// The probe file cycles over this many blocks (1 MiB), written once up front so that no sample extends it.
const BLOCKS: u64 = 128;

#[derive(Debug, Clone)]
pub struct SyncProbeConfig {
    /// A directory on the disk to measure (the probe file is created there and removed afterwards).
    pub dir: PathBuf,
    pub interval: Duration,
    pub duration: Duration,
}

/// Latency of one write + `fdatasync`, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct SyncProbeReport {
    pub dir: PathBuf,
    pub samples: u64,
    /// Ticks skipped because the previous sync was still running when they fell due.
    pub skipped: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// Samples that took longer than 10 ms.
    pub over_10ms: u64,
}

/// Removes the probe file however the run ends.
struct ProbeFile {
    path: PathBuf,
    file: File,
}

impl ProbeFile {
    fn create(dir: &Path) -> anyhow::Result<Self> {
        anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
        let path = dir.join(format!(".hookgate-sync-probe-{}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("cannot create the probe file {}", path.display()))?;
        let probe = Self { path, file };
        let zeros = vec![0u8; BLOCK];
        for block in 0..BLOCKS {
            probe.file.write_all_at(&zeros, block * BLOCK as u64)?;
        }
        probe.file.sync_all()?;
        Ok(probe)
    }
}

impl Drop for ProbeFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Runs the probe (blocking: call it off the async runtime).
pub fn run(config: &SyncProbeConfig) -> anyhow::Result<SyncProbeReport> {
    anyhow::ensure!(!config.interval.is_zero(), "--interval must be more than 0");
    let probe = ProbeFile::create(&config.dir)?;
    // The recorder's fixed bounds (1 µs to an hour): an auto-resizing histogram starts at 2,048 and
    // `saturating_record` would clamp every slower sync to ~2 ms instead of growing it.
    let mut latencies = crate::recorder::histogram();
    let mut block = vec![0u8; BLOCK];
    let (mut samples, mut skipped, mut over_10ms) = (0u64, 0u64, 0u64);
    let start = Instant::now();
    let end = start + config.duration;
    let mut due = start;
    while due < end {
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        // Different bytes each time, so no layer can skip the write as unchanged.
        block[..8].copy_from_slice(&samples.to_le_bytes());
        let began = Instant::now();
        probe.file.write_all_at(&block, (samples % BLOCKS) * BLOCK as u64)?;
        probe.file.sync_data().context("fdatasync")?;
        let took = began.elapsed();
        let took_us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        latencies.saturating_record(took_us);
        samples += 1;
        over_10ms += u64::from(took > Duration::from_millis(10));
        // Fixed-rate ticks: a slow sync skips the ticks it overran instead of bursting to catch up.
        due += config.interval;
        let after = Instant::now();
        while due < after && due < end {
            skipped += 1;
            due += config.interval;
        }
    }
    Ok(SyncProbeReport {
        dir: config.dir.clone(),
        samples,
        skipped,
        p50_us: latencies.value_at_quantile(0.5),
        p99_us: latencies.value_at_quantile(0.99),
        p999_us: latencies.value_at_quantile(0.999),
        max_us: latencies.max(),
        over_10ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hookgate-sync-probe-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn samples_on_the_interval_and_removes_its_file() {
        let dir = scratch_dir("run");
        let config = SyncProbeConfig {
            dir: dir.clone(),
            interval: Duration::from_millis(5),
            duration: Duration::from_millis(200),
        };
        let report = run(&config).expect("probe");
        // 40 ticks in 200 ms: each is either sampled or skipped behind a slow sync, never both.
        assert_eq!(report.samples + report.skipped, 40);
        assert!(report.samples > 0);
        assert!(report.p50_us > 0 && report.p50_us <= report.p99_us && report.p99_us <= report.p999_us);
        assert!(report.p999_us <= report.max_us);
        assert!(report.over_10ms <= report.samples);
        assert_eq!(std::fs::read_dir(&dir).expect("read dir").count(), 0, "the probe file is removed");
        std::fs::remove_dir(&dir).expect("cleanup");
    }

    #[test]
    fn a_slow_sync_is_recorded_at_its_length_not_clamped() {
        let mut latencies = crate::recorder::histogram();
        latencies.saturating_record(180);
        latencies.saturating_record(250_000);
        assert!(latencies.max() >= 249_000, "max {}", latencies.max());
        assert!(latencies.value_at_quantile(0.5) < 200);
    }

    #[test]
    fn a_missing_directory_is_a_clear_error() {
        let config = SyncProbeConfig {
            dir: PathBuf::from("/nonexistent/hookgate"),
            interval: Duration::from_millis(5),
            duration: Duration::from_millis(10),
        };
        let err = run(&config).expect_err("no such directory");
        assert!(err.to_string().contains("is not a directory"), "{err}");
    }

    #[test]
    fn a_zero_interval_is_refused() {
        let config = SyncProbeConfig {
            dir: std::env::temp_dir(),
            interval: Duration::ZERO,
            duration: Duration::from_millis(10),
        };
        assert!(run(&config).is_err());
    }
}
