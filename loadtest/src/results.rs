//! The results file: one CSV row per request, streamed as requests complete, read back by `report`,
//! `plot` and `verify`. Its first lines are `#` comments, one of them the run's metadata as JSON.

use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

use crate::payload::Kind;

pub const MAGIC: &str = "# hookgate-load results v1";
pub const COLUMNS: &str = "due_ns,sent_ns,done_ns,status,bytes_out,bytes_in,kind,target,event_id,body_hash,error";

/// What a run was asked to do; written at the top of its results file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    /// Wall-clock time of the schedule's origin, in ns since the unix epoch; row times are offsets from it.
    pub start_unix_ns: u128,
    /// Requested rate per second; 0 for a closed-loop run.
    pub rate: f64,
    pub targets: Vec<String>,
    pub scheme: String,
    pub connections: usize,
    /// Requests the schedule planned (rate x duration, or --requests).
    pub planned: u64,
}

/// One request's fate. Times are nanoseconds from the run's start.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub due_ns: u64,
    pub sent_ns: u64,
    pub done_ns: u64,
    /// HTTP status, or 0 when no response came (timeout, connection error).
    pub status: u16,
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub kind: Kind,
    pub target: u16,
    pub event_id: String,
    pub body_hash: String,
    /// A short error class (`timeout`, `connect`, `io`) or empty.
    pub error: String,
}

impl Row {
    /// Latency from the time the request was due: what a sender that kept its schedule would see.
    pub fn corrected_ns(&self) -> u64 {
        self.done_ns.saturating_sub(self.due_ns)
    }
    /// Latency from the moment the request was actually sent.
    pub fn uncorrected_ns(&self) -> u64 {
        self.done_ns.saturating_sub(self.sent_ns)
    }
    pub fn lateness_ns(&self) -> u64 {
        self.sent_ns.saturating_sub(self.due_ns)
    }
    pub fn timed_out(&self) -> bool {
        self.error == "timeout"
    }
    /// Did the receiver answer as it should? 2xx for real events, a 401 for a deliberately bad signature.
    pub fn success(&self) -> bool {
        match self.kind {
            Kind::BadSignature => self.status == 401,
            Kind::Fresh | Kind::Duplicate => (200..300).contains(&self.status),
        }
    }

    pub fn write_csv(&self, out: &mut impl Write) -> std::io::Result<()> {
        writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{}",
            self.due_ns,
            self.sent_ns,
            self.done_ns,
            self.status,
            self.bytes_out,
            self.bytes_in,
            self.kind.as_str(),
            self.target,
            self.event_id,
            self.body_hash,
            self.error
        )
    }

    pub fn parse_csv(line: &str) -> anyhow::Result<Self> {
        let f: Vec<&str> = line.splitn(11, ',').collect();
        if f.len() != 11 {
            bail!("expected 11 columns, found {}", f.len());
        }
        Ok(Self {
            due_ns: f[0].parse()?,
            sent_ns: f[1].parse()?,
            done_ns: f[2].parse()?,
            status: f[3].parse()?,
            bytes_out: f[4].parse()?,
            bytes_in: f[5].parse()?,
            kind: Kind::parse(f[6]).with_context(|| format!("unknown kind {}", f[6]))?,
            target: f[7].parse()?,
            event_id: f[8].to_owned(),
            body_hash: f[9].to_owned(),
            error: f[10].to_owned(),
        })
    }
}

pub fn write_header(out: &mut impl Write, meta: &Meta) -> std::io::Result<()> {
    writeln!(out, "{MAGIC}")?;
    writeln!(out, "# meta {}", serde_json::to_string(meta).map_err(std::io::Error::other)?)?;
    writeln!(out, "{COLUMNS}")
}

/// Reads a results file: its metadata, and every row passed to `each` (the file is never held in memory).
pub fn read(path: &Path, mut each: impl FnMut(&Meta, Row)) -> anyhow::Result<Meta> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut meta: Option<Meta> = None;
    for (n, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if n == 0 && line != MAGIC {
            bail!("{} is not a hookgate-load results file", path.display());
        }
        if let Some(json) = line.strip_prefix("# meta ") {
            meta = Some(serde_json::from_str(json).with_context(|| format!("{}: bad metadata", path.display()))?);
            continue;
        }
        if line.starts_with('#') || line == COLUMNS || line.is_empty() {
            continue;
        }
        let Some(meta) = &meta else { bail!("{}: rows before the metadata line", path.display()) };
        let row = Row::parse_csv(&line).with_context(|| format!("{}:{}", path.display(), n + 1))?;
        each(meta, row);
    }
    meta.with_context(|| format!("{}: no metadata line", path.display()))
}

/// The source name of a gateway target URL (`…/webhooks/{source}`), for the loss audit.
pub fn source_of(target: &str) -> Option<&str> {
    let path = target.split("://").nth(1).unwrap_or(target);
    let path = path.split_once('/').map_or("", |(_, p)| p);
    path.strip_prefix("webhooks/").map(|s| s.split(['/', '?']).next().unwrap_or(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip() {
        let row = Row {
            due_ns: 1,
            sent_ns: 2,
            done_ns: 30,
            status: 202,
            bytes_out: 1024,
            bytes_in: 40,
            kind: Kind::Duplicate,
            target: 1,
            event_id: "evt_a_1".into(),
            body_hash: "00ff".into(),
            error: String::new(),
        };
        let mut buf = Vec::new();
        row.write_csv(&mut buf).unwrap();
        assert_eq!(Row::parse_csv(String::from_utf8(buf).unwrap().trim_end()).unwrap(), row);
        assert_eq!((row.corrected_ns(), row.uncorrected_ns(), row.lateness_ns()), (29, 28, 1));
    }

    #[test]
    fn source_from_target() {
        assert_eq!(source_of("http://127.0.0.1:8080/webhooks/stripe"), Some("stripe"));
        assert_eq!(source_of("http://h/webhooks/gh?x=1"), Some("gh"));
        assert_eq!(source_of("http://h/other"), None);
    }
}
