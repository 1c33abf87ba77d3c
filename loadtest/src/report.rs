//! The summary of a run and its renderings: vegeta's text layout (extended), JSON, and latency buckets.
//! The same code reports at the end of `attack` and for `report` over one or many results files.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::recorder::Recorder;

/// Latency percentiles in microseconds (integers, so JSON round-trips exactly).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latencies {
    pub min_us: u64,
    pub mean_us: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Latencies {
    fn of(h: &hdrhistogram::Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self { min_us: 0, mean_us: 0, p50_us: 0, p90_us: 0, p95_us: 0, p99_us: 0, p999_us: 0, max_us: 0 };
        }
        Self {
            min_us: h.min(),
            mean_us: h.mean().round() as u64,
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p95_us: h.value_at_quantile(0.95),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Requests the schedule planned.
    pub planned: u64,
    /// Requests sent (a response, an error or a timeout followed).
    pub requests: u64,
    /// Requests that got an HTTP response.
    pub completed: u64,
    pub timed_out: u64,
    /// Planned but never sent: the run ended while the generator was behind.
    pub dropped: u64,
    /// Requested rate per second (0: closed loop).
    pub requested_rate: f64,
    /// Requests sent per second of the attack.
    pub achieved_rate: f64,
    /// Successful responses per second of the whole run.
    pub throughput: f64,
    pub duration_s: f64,
    pub attack_s: f64,
    pub wait_s: f64,
    /// From the time each request was due (coordinated-omission corrected).
    pub latency_corrected: Latencies,
    /// From the time each request was actually sent.
    pub latency_uncorrected: Latencies,
    /// How late the generator sent each request.
    pub send_lateness: Latencies,
    pub bytes_in_total: u64,
    pub bytes_out_total: u64,
    pub success_ratio: f64,
    pub status_codes: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    /// Plain-language findings: fell behind, rate not met, errors.
    pub verdicts: Vec<String>,
}

impl Summary {
    pub fn new(rec: &Recorder, planned: u64, requested_rate: f64) -> Self {
        let first = if rec.first_due_ns == u64::MAX { 0 } else { rec.first_due_ns };
        let attack_s = rec.last_sent_ns.saturating_sub(first) as f64 / 1e9;
        let duration_s = rec.last_done_ns.saturating_sub(first) as f64 / 1e9;
        let wait_s = rec.last_done_ns.saturating_sub(rec.last_sent_ns) as f64 / 1e9;
        // Rate over n requests spans n-1 intervals.
        let achieved_rate = if attack_s > 0.0 { (rec.requests.saturating_sub(1)) as f64 / attack_s } else { 0.0 };
        let throughput = if duration_s > 0.0 { rec.successes as f64 / duration_s } else { 0.0 };
        let mut summary = Self {
            planned,
            requests: rec.requests,
            completed: rec.completed(),
            timed_out: rec.timed_out,
            dropped: planned.saturating_sub(rec.requests),
            requested_rate,
            achieved_rate,
            throughput,
            duration_s,
            attack_s,
            wait_s,
            latency_corrected: Latencies::of(&rec.corrected),
            latency_uncorrected: Latencies::of(&rec.uncorrected),
            send_lateness: Latencies::of(&rec.lateness),
            bytes_in_total: rec.bytes_in,
            bytes_out_total: rec.bytes_out,
            success_ratio: if rec.requests > 0 { rec.successes as f64 / rec.requests as f64 } else { 0.0 },
            status_codes: rec.statuses.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            errors: rec.errors.clone(),
            verdicts: Vec::new(),
        };
        summary.verdicts = summary.findings();
        summary
    }

    /// Did the run keep its schedule within `tolerance` (e.g. 0.01)?
    pub fn rate_met(&self, tolerance: f64) -> bool {
        self.requested_rate == 0.0
            || (self.dropped == 0
                && (self.achieved_rate - self.requested_rate).abs() <= self.requested_rate * tolerance)
    }

    fn findings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.requested_rate > 0.0 {
            if self.rate_met(0.01) {
                out.push(format!(
                    "rate met: requested {:.1}/s, achieved {:.1}/s",
                    self.requested_rate, self.achieved_rate
                ));
            } else {
                out.push(format!(
                    "RATE NOT MET: requested {:.1}/s, achieved {:.1}/s, {} planned requests never sent",
                    self.requested_rate, self.achieved_rate, self.dropped
                ));
            }
            if self.send_lateness.p99_us > 1000 {
                out.push(format!(
                    "GENERATOR FELL BEHIND: P99 send lateness {} (requests waited for a free connection or CPU; \
                     raise --connections, or the target is slower than the schedule)",
                    fmt_us(self.send_lateness.p99_us)
                ));
            }
            if self.latency_corrected.p99_us > 2 * self.latency_uncorrected.p99_us + 1000 {
                out.push(format!(
                    "TARGET FELL BEHIND: corrected P99 {} vs uncorrected {}: requests queued behind slow responses",
                    fmt_us(self.latency_corrected.p99_us),
                    fmt_us(self.latency_uncorrected.p99_us)
                ));
            }
        }
        if self.timed_out > 0 {
            out.push(format!("{} requests timed out", self.timed_out));
        }
        if self.success_ratio < 1.0 && self.requests > 0 {
            out.push(format!("{} requests did not get the expected answer", self.requests - self.successful()));
        }
        out
    }

    pub fn successful(&self) -> u64 {
        (self.success_ratio * self.requests as f64).round() as u64
    }

    pub fn write_text(&self, out: &mut impl Write) -> std::io::Result<()> {
        let lat = |l: &Latencies| {
            [l.min_us, l.mean_us, l.p50_us, l.p90_us, l.p95_us, l.p99_us, l.p999_us, l.max_us]
                .iter()
                .map(|v| fmt_us(*v))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            out,
            "Requests      [total, rate, throughput]                 {}, {:.2}, {:.2}",
            self.requests, self.achieved_rate, self.throughput
        )?;
        writeln!(
            out,
            "Schedule      [planned, requested rate, dropped]        {}, {:.2}, {}",
            self.planned, self.requested_rate, self.dropped
        )?;
        writeln!(
            out,
            "Duration      [total, attack, wait]                     {}, {}, {}",
            fmt_secs(self.duration_s),
            fmt_secs(self.attack_s),
            fmt_secs(self.wait_s)
        )?;
        writeln!(out, "Latencies     [min, mean, 50, 90, 95, 99, 99.9, max]")?;
        writeln!(out, "  corrected   (from due time)                         {}", lat(&self.latency_corrected))?;
        writeln!(out, "  uncorrected (from send time)                        {}", lat(&self.latency_uncorrected))?;
        writeln!(
            out,
            "Send lateness [50, 99, max]                             {}, {}, {}",
            fmt_us(self.send_lateness.p50_us),
            fmt_us(self.send_lateness.p99_us),
            fmt_us(self.send_lateness.max_us)
        )?;
        let mean = |total: u64| if self.requests > 0 { total as f64 / self.requests as f64 } else { 0.0 };
        writeln!(
            out,
            "Bytes In      [total, mean]                             {}, {:.2}",
            self.bytes_in_total,
            mean(self.bytes_in_total)
        )?;
        writeln!(
            out,
            "Bytes Out     [total, mean]                             {}, {:.2}",
            self.bytes_out_total,
            mean(self.bytes_out_total)
        )?;
        writeln!(
            out,
            "Completed     [responses, timed out]                    {}, {}",
            self.completed, self.timed_out
        )?;
        writeln!(out, "Success       [ratio]                                   {:.2}%", self.success_ratio * 100.0)?;
        let codes: Vec<String> = self.status_codes.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        writeln!(out, "Status Codes  [code:count]                              {}", codes.join("  "))?;
        writeln!(out, "Error Set:")?;
        for (error, count) in &self.errors {
            writeln!(out, "{error} ({count})")?;
        }
        for verdict in &self.verdicts {
            writeln!(out, "=> {verdict}")?;
        }
        Ok(())
    }
}

/// Bucket counts of corrected latency, as vegeta's `hist[0,1ms,5ms]` report.
pub fn write_hist(rec: &Recorder, bounds: &[Duration], out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "{:<26}{:<10}{:<10}Histogram", "Bucket", "#", "%")?;
    let total = rec.corrected.len().max(1);
    for (i, lower) in bounds.iter().enumerate() {
        let lo = lower.as_micros() as u64;
        let hi = bounds.get(i + 1).map(|d| d.as_micros() as u64);
        let count: u64 = rec
            .corrected
            .iter_recorded()
            .filter(|v| {
                let x = v.value_iterated_to();
                x >= lo && hi.is_none_or(|h| x < h)
            })
            .map(|v| v.count_at_value())
            .sum();
        let label = match hi {
            Some(h) => format!("[{}, {}]", fmt_us(lo), fmt_us(h)),
            None => format!("[{}, +Inf]", fmt_us(lo)),
        };
        let pct = count as f64 * 100.0 / total as f64;
        writeln!(out, "{label:<26}{count:<10}{pct:<10.2}{}", "#".repeat((pct / 2.0).round() as usize))?;
    }
    Ok(())
}

/// Parses vegeta's `hist[0,1ms,5ms]` bucket list.
pub fn parse_hist(spec: &str) -> anyhow::Result<Vec<Duration>> {
    let inner = spec
        .strip_prefix("hist[")
        .and_then(|s| s.strip_suffix(']'))
        .ok_or_else(|| anyhow::anyhow!("expected hist[0,1ms,5ms,...], got {spec}"))?;
    inner
        .split(',')
        .map(|s| {
            let s = s.trim();
            if s == "0" {
                Ok(Duration::ZERO)
            } else {
                humantime::parse_duration(s).map_err(|e| anyhow::anyhow!("bucket {s}: {e}"))
            }
        })
        .collect()
}

/// Reads results files into one recorder, aligning their clocks; returns it with the summed planned
/// counts and rates (files from generators that ran side by side add up).
pub fn merge_files(files: &[std::path::PathBuf]) -> anyhow::Result<(Recorder, u64, f64)> {
    let mut recorder = Recorder::default();
    let (mut planned, mut rate) = (0, 0.0);
    let mut origin: Option<u128> = None;
    for file in files {
        let meta = crate::results::read(file, |meta, row| {
            let o = *origin.get_or_insert(meta.start_unix_ns);
            recorder.record_shifted(&row, meta.start_unix_ns.saturating_sub(o) as u64);
        })?;
        planned += meta.planned;
        rate += meta.rate;
    }
    Ok((recorder, planned, rate))
}

pub fn fmt_us(us: u64) -> String {
    if us >= 1_000_000 {
        format!("{:.3}s", us as f64 / 1e6)
    } else if us >= 1000 {
        format!("{:.3}ms", us as f64 / 1e3)
    } else {
        format!("{us}µs")
    }
}

fn fmt_secs(s: f64) -> String {
    format!("{s:.3}s")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::Kind;
    use crate::results::Row;

    fn row(due: u64, sent: u64, done: u64, status: u16) -> Row {
        Row {
            due_ns: due,
            sent_ns: sent,
            done_ns: done,
            status,
            bytes_out: 100,
            bytes_in: 10,
            kind: Kind::Fresh,
            target: 0,
            event_id: "e".into(),
            body_hash: String::new(),
            error: String::new(),
        }
    }

    #[test]
    fn summary_json_round_trips_and_counts() {
        let mut rec = Recorder::default();
        for i in 0..100u64 {
            rec.record(&row(i * 10_000_000, i * 10_000_000 + 1000, i * 10_000_000 + 5_000_000, 202));
        }
        rec.record(&row(1_000_000_000, 1_000_000_000, 1_000_000_000 + 200_000_000, 503));
        let s = Summary::new(&rec, 101, 100.0);
        assert_eq!((s.requests, s.completed, s.dropped), (101, 101, 0));
        assert_eq!(s.status_codes["202"], 100);
        assert!((s.success_ratio - 100.0 / 101.0).abs() < 1e-9);
        assert!((4990..=5010).contains(&s.latency_corrected.p50_us), "{:?}", s.latency_corrected);
        let json = serde_json::to_string(&s).unwrap();
        let back: Summary = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        let mut text = Vec::new();
        s.write_text(&mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("202:100  503:1"), "{text}");
    }

    #[test]
    fn hist_buckets() {
        let mut rec = Recorder::default();
        rec.record(&row(0, 0, 500_000, 200));
        rec.record(&row(0, 0, 3_000_000, 200));
        rec.record(&row(0, 0, 30_000_000, 200));
        let bounds = parse_hist("hist[0,1ms,5ms]").unwrap();
        let mut out = Vec::new();
        write_hist(&rec, &bounds, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let counts: Vec<&str> = text.lines().skip(1).map(|l| l.split_whitespace().nth(2).unwrap()).collect();
        assert_eq!(counts, ["1", "1", "1"], "{text}");
        assert!(parse_hist("nope").is_err());
    }
}
