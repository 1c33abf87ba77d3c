//! Measurements: HdrHistograms of corrected and uncorrected latency and of send lateness, plus counts.
//! Workers record into a few shards of `Recorder`s, merged at the end, so memory stays flat however
//! long the run (histograms have fixed size; nothing keeps samples).

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

use crate::results::Row;

/// Histogram range: 1 µs to 1 hour, 3 significant digits (0.1% error).
const MAX_MICROS: u64 = 3_600_000_000;

/// A latency histogram in microseconds over that range (also the sync probe's).
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("constant histogram bounds are valid")
}

#[derive(Debug, Clone)]
pub struct Recorder {
    pub corrected: Histogram<u64>,
    pub uncorrected: Histogram<u64>,
    pub lateness: Histogram<u64>,
    pub statuses: BTreeMap<u16, u64>,
    pub errors: BTreeMap<String, u64>,
    pub requests: u64,
    pub successes: u64,
    pub timed_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub first_due_ns: u64,
    pub last_sent_ns: u64,
    pub last_done_ns: u64,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            corrected: histogram(),
            uncorrected: histogram(),
            lateness: histogram(),
            statuses: BTreeMap::new(),
            errors: BTreeMap::new(),
            requests: 0,
            successes: 0,
            timed_out: 0,
            bytes_in: 0,
            bytes_out: 0,
            first_due_ns: u64::MAX,
            last_sent_ns: 0,
            last_done_ns: 0,
        }
    }
}

fn micros(ns: u64) -> u64 {
    (ns / 1000).clamp(1, MAX_MICROS)
}

impl Recorder {
    pub fn record(&mut self, row: &Row) {
        self.requests += 1;
        // Saturating at the histogram's top: an hour-long latency is still counted.
        let _ = self.corrected.record(micros(row.corrected_ns()));
        let _ = self.uncorrected.record(micros(row.uncorrected_ns()));
        let _ = self.lateness.record(micros(row.lateness_ns()));
        *self.statuses.entry(row.status).or_default() += 1;
        if !row.error.is_empty() {
            *self.errors.entry(row.error.clone()).or_default() += 1;
        }
        if row.success() {
            self.successes += 1;
        }
        if row.timed_out() {
            self.timed_out += 1;
        }
        self.bytes_in += row.bytes_in;
        self.bytes_out += row.bytes_out;
        self.first_due_ns = self.first_due_ns.min(row.due_ns);
        self.last_sent_ns = self.last_sent_ns.max(row.sent_ns);
        self.last_done_ns = self.last_done_ns.max(row.done_ns);
    }

    /// Records a row whose times are offsets from another start: shift them onto this one's clock first.
    pub fn record_shifted(&mut self, row: &Row, shift_ns: u64) {
        let mut row = row.clone();
        row.due_ns += shift_ns;
        row.sent_ns += shift_ns;
        row.done_ns += shift_ns;
        self.record(&row);
    }

    pub fn merge(&mut self, other: &Recorder) {
        // Same bounds on both sides: adding cannot fail.
        let _ = self.corrected.add(&other.corrected);
        let _ = self.uncorrected.add(&other.uncorrected);
        let _ = self.lateness.add(&other.lateness);
        for (k, v) in &other.statuses {
            *self.statuses.entry(*k).or_default() += v;
        }
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        self.requests += other.requests;
        self.successes += other.successes;
        self.timed_out += other.timed_out;
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.first_due_ns = self.first_due_ns.min(other.first_due_ns);
        self.last_sent_ns = self.last_sent_ns.max(other.last_sent_ns);
        self.last_done_ns = self.last_done_ns.max(other.last_done_ns);
    }

    /// Requests that got an HTTP answer (any status).
    pub fn completed(&self) -> u64 {
        self.requests - self.statuses.get(&0).copied().unwrap_or(0)
    }
}
