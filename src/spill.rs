//! The spill file: acknowledged events (enqueue mode) that the shutdown's drain could not store are written to
//! a file in `shutdown.spill_dir` instead of being dropped, and stored from there at the next start.
//!
//! In enqueue mode the 202 goes out before the write, so the sender will not send those events again: a
//! shutdown while Postgres is down or refusing them (a failover during a rolling deploy) would otherwise lose
//! every one still queued or set aside. A file is written as `spill-<unix ms>-<pid>.jsonl.partial`, one event a
//! line, synced after each write, and renamed to `.jsonl` once the workers are done: only finished files are
//! imported. The import queues their events like requests' and waits for their batches; what is stored leaves
//! the file, and what Postgres still refuses (or a line that does not parse) stays in it for the next try.
//!
//! A running gateway holds a lock on `hookgate.lock` in the directory: a second process given the same
//! directory is refused at start (two importers would race on each file's rewrite), and a `.partial` file found
//! by the process that takes the lock was left by one that is gone (killed while spilling), so it is finished
//! and imported like any other.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt as _;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::pipeline::{Pipeline, SourceQueue, SubmitError};
use crate::store::NewEvent;

const FINISHED: &str = ".jsonl";
const PARTIAL: &str = ".jsonl.partial";
const REWRITE: &str = ".jsonl.rewrite";
const LOCK: &str = "hookgate.lock";
/// How often the directory is looked at again while the gateway runs: files an operator copies in (from a
/// replica that is gone) and events Postgres refused at the last try.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(60);

/// One line of a spill file: an event with the columns the store takes, and its body in base64 (the exact bytes
/// the sender signed, whatever they hold).
#[derive(Debug, Serialize, Deserialize)]
struct SpilledEvent {
    source: String,
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    created: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    livemode: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    account: Option<String>,
    body: String,
}

impl SpilledEvent {
    fn of(event: &NewEvent) -> Self {
        Self {
            source: event.source.to_string(),
            id: event.id.clone(),
            event_type: event.event_type.clone(),
            created: event.created,
            livemode: event.livemode,
            api_version: event.api_version.clone(),
            account: event.account.clone(),
            body: base64::engine::general_purpose::STANDARD.encode(&event.body),
        }
    }

    /// The event, its body decoded into `body` (taken from the body memory budget by the caller).
    fn into_event(self, body: Bytes) -> NewEvent {
        NewEvent {
            source: Arc::from(self.source),
            id: self.id,
            event_type: self.event_type,
            created: self.created,
            livemode: self.livemode,
            api_version: self.api_version,
            account: self.account,
            body,
        }
    }
}

/// Why a spill directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot write a file there")]
    Io(#[from] io::Error),
    #[error("another hookgate process uses it ({holder}): give each replica a spill_dir of its own")]
    InUse { holder: String },
}

/// This process's spill file, opened at the first event spilled, and its lock on the directory.
#[derive(Debug)]
pub struct Spill {
    dir: PathBuf,
    file: Mutex<Option<OpenFile>>,
    /// Locked for the process's life (the lock goes with the last handle, even on a crash).
    _lock: File,
}

#[derive(Debug)]
struct OpenFile {
    partial: PathBuf,
    writer: BufWriter<File>,
    events: usize,
}

impl Spill {
    /// Creates the directory if needed, checks that a file can be written in it (so that a bad path stops the
    /// start rather than the shutdown that needs it) and takes its lock. Files a killed process left `.partial`
    /// are then finished, ready for the import.
    pub fn open(dir: &Path) -> Result<Self, OpenError> {
        let lock = match check(dir)? {
            Lock::Taken(lock) => lock,
            Lock::Held(holder) => return Err(OpenError::InUse { holder }),
        };
        // What the refusal of a second process names.
        lock.set_len(0)?;
        (&lock).write_all(format!("pid {}\n", std::process::id()).as_bytes())?;
        finish_left_behind(dir)?;
        Ok(Self { dir: dir.to_path_buf(), file: Mutex::new(None), _lock: lock })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends `events` to the file and syncs it; returns the name it will have once finished.
    pub fn write(&self, events: &[&NewEvent]) -> io::Result<PathBuf> {
        let mut file = self.file.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if file.is_none() {
            let millis =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_millis());
            let partial = self.dir.join(format!("spill-{millis}-{}{PARTIAL}", std::process::id()));
            let opened = OpenOptions::new().write(true).create_new(true).open(&partial)?;
            *file = Some(OpenFile { partial, writer: BufWriter::new(opened), events: 0 });
        }
        let Some(open) = file.as_mut() else { return Err(io::Error::other("the spill file is not open")) };
        // Serialised first, then written in one call: an event that cannot be serialised writes nothing, so no
        // half line is left for the next write to run into (only a disk refusing the write can leave one).
        let mut lines = Vec::with_capacity(events.iter().map(|event| event.body.len() * 4 / 3 + 256).sum());
        for event in events {
            serde_json::to_writer(&mut lines, &SpilledEvent::of(event))?;
            lines.push(b'\n');
        }
        open.writer.write_all(&lines)?;
        open.writer.flush()?;
        open.writer.get_ref().sync_data()?;
        open.events += events.len();
        Ok(finished_name(&open.partial))
    }

    /// Finishes the file, if one was started: renamed to `.jsonl` (only then is it imported) and the directory
    /// synced, so that the rename survives a crash. Returns its name and how many events it holds.
    pub fn finish(&self) -> io::Result<Option<(PathBuf, usize)>> {
        let open = self.file.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let Some(mut open) = open else { return Ok(None) };
        open.writer.flush()?;
        open.writer.get_ref().sync_all()?;
        let finished = finished_name(&open.partial);
        fs::rename(&open.partial, &finished)?;
        File::open(&self.dir)?.sync_all()?;
        Ok(Some((finished, open.events)))
    }
}

/// Whether a directory's lock was free (now held by the caller) or who holds it.
#[derive(Debug)]
pub enum Lock {
    Taken(File),
    Held(String),
}

/// Creates the directory if needed, checks that a file can be written in it, and tries its lock. `check-config`
/// uses it beside a running gateway: it drops a lock it took at once.
pub fn check(dir: &Path) -> io::Result<Lock> {
    fs::create_dir_all(dir)?;
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    File::create(&probe)?;
    fs::remove_file(&probe)?;
    let lock = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.join(LOCK))?;
    match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(Lock::Taken(lock)),
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let holder = fs::read_to_string(dir.join(LOCK)).unwrap_or_default();
            let holder = holder.trim();
            Ok(Lock::Held(if holder.is_empty() { "its pid unknown".to_owned() } else { holder.to_owned() }))
        }
        Err(e) => Err(e.into()),
    }
}

/// With the lock held, any `.partial` file is a dead process's: killed (or its rename failed) while spilling.
/// Finished, its whole lines are imported; a line cut by the kill does not parse and stays in the file, counted
/// in `hookgate_spill_pending_events`. A rewrite's temporary file is a crash's leftover: the file it was to
/// replace is still whole.
fn finish_left_behind(dir: &Path) -> io::Result<()> {
    let mut renamed = false;
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        if !name.starts_with("spill-") {
            continue;
        }
        if name.ends_with(PARTIAL) {
            let finished = finished_name(&path);
            if finished.exists() {
                error!(file = %path.display(), "a spill file left unfinished has a finished namesake; left as it is");
                continue;
            }
            fs::rename(&path, &finished)?;
            renamed = true;
            warn!(file = %finished.display(), "spill file left unfinished by a process that stopped while spilling; finished, to be imported");
        } else if name.ends_with(REWRITE) {
            fs::remove_file(&path)?;
        }
    }
    if renamed {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn finished_name(partial: &Path) -> PathBuf {
    let name = partial.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    partial.with_file_name(format!("{}{FINISHED}", name.strip_suffix(PARTIAL).unwrap_or(name)))
}

/// Runs file work (spill writes, syncs, renames) on a blocking thread and waits for it: a slow disk must not
/// stall the runtime's threads, which serve requests, the shutdown's time bounds and the signals. A panic in
/// the work comes back as an error.
pub async fn off_runtime<T: Send + 'static>(work: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(work).await.map_err(io::Error::other)?
}

/// The finished spill files in `dir`, oldest name first.
fn finished_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|name| name.starts_with("spill-") && name.ends_with(FINISHED))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// What one import of the directory did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    /// Events stored (new, or already there).
    pub stored: usize,
    /// Events left in their files: refused again, not written before a shutdown, or lines that do not parse (a
    /// file that cannot be read counts as one).
    pub kept: usize,
}

/// Imports every finished file in `dir` through `pipeline`, `chunk` events at a time, each chunk's batches
/// waited for before the next is read. A file is removed once all of it is stored, and otherwise rewritten
/// (through a temporary file and a rename) with the lines still to store.
///
/// The files are read, rewritten and removed off the runtime's threads (tokio's file I/O, `off_runtime` for
/// the rewrite and its syncs): the import runs beside live requests, and a slow disk must not stall them.
pub async fn import(dir: &Path, pipeline: &Pipeline, chunk: usize) -> io::Result<Imported> {
    let mut total = Imported::default();
    let listed = dir.to_path_buf();
    let files = off_runtime(move || finished_files(&listed)).await?;
    for file in files {
        // A file that cannot be read (or rewritten) is left as it is, and does not hold back the others.
        match import_file(&file, pipeline, chunk.max(1)).await {
            Ok(imported) => {
                total.stored += imported.stored;
                total.kept += imported.kept;
            }
            Err(e) => {
                error!(file = %file.display(), error = %e, "cannot import the spill file; left as it is");
                // Its events are not known: counted as one, so that the alert on the gauge still fires.
                total.kept += 1;
            }
        }
    }
    crate::metrics::record_spill_pending(total.kept);
    Ok(total)
}

async fn import_file(path: &Path, pipeline: &Pipeline, chunk: usize) -> io::Result<Imported> {
    // Lines as bytes: one that is not UTF-8 (a damaged file) is kept like any line that does not parse. Read
    // 256 KiB at a time: each read of tokio's file is a hop to a blocking thread.
    let file = tokio::fs::File::open(path).await?;
    let mut lines = tokio::io::BufReader::with_capacity(256 * 1024, file).split(b'\n');
    let mut kept: Vec<Vec<u8>> = Vec::new();
    let mut stored = 0;
    // The queue slots of the import's events, apart from any source's share (their source may be gone).
    let slots = Arc::new(SourceQueue::default());
    let mut number = 0;
    loop {
        let mut waiting = Vec::with_capacity(chunk);
        while waiting.len() < chunk {
            let Some(line) = lines.next_segment().await? else { break };
            number += 1;
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let spilled = match serde_json::from_slice::<SpilledEvent>(&line) {
                Ok(spilled) => spilled,
                Err(e) => {
                    error!(file = %path.display(), line = number, error = %e, "spill file line is not an event; kept in the file");
                    kept.push(line);
                    continue;
                }
            };
            let body = match base64::engine::general_purpose::STANDARD.decode(&spilled.body) {
                Ok(body) => body,
                Err(e) => {
                    error!(file = %path.display(), line = number, error = %e, "spilled event's body is not base64; kept in the file");
                    kept.push(line);
                    continue;
                }
            };
            if body.len() > pipeline.body_memory().limit() {
                error!(file = %path.display(), line = number, bytes = body.len(), "spilled event's body is larger than queue.body_memory_mb; kept in the file");
                kept.push(line);
                continue;
            }
            let Some(body) = reserve(pipeline, body).await else {
                kept.push(line);
                continue;
            };
            let slot = slots.take(0).map_err(io::Error::other)?;
            match pipeline.submit_waiting(spilled.into_event(body), slot).await {
                Ok(ack) => waiting.push((line, ack)),
                Err(SubmitError::Closed | SubmitError::Full) => kept.push(line),
            }
        }
        if waiting.is_empty() {
            break;
        }
        for (line, ack) in waiting {
            match ack.await {
                Ok(Ok(_)) => stored += 1,
                // Refused again, or not written before a shutdown: left for the next try.
                Ok(Err(_)) | Err(_) => kept.push(line),
            }
        }
    }
    crate::metrics::record_spill_imported(stored);
    let kept_lines = kept.len();
    if kept.is_empty() {
        tokio::fs::remove_file(path).await?;
        info!(file = %path.display(), events = stored, "spill file stored and removed");
    } else {
        let rewritten = path.to_path_buf();
        off_runtime(move || rewrite(&rewritten, &kept)).await?;
        warn!(file = %path.display(), stored, kept = kept_lines, "spill file partly stored; the rest stays in it and is tried again");
    }
    Ok(Imported { stored, kept: kept_lines })
}

/// Takes the body's bytes from the body memory budget, waiting while live requests hold it; None once the
/// gateway shuts down.
async fn reserve(pipeline: &Pipeline, body: Vec<u8>) -> Option<Bytes> {
    loop {
        let mut reservation = pipeline.body_memory().reservation();
        if reservation.grow_to(body.len()).is_ok() {
            return Some(reservation.into_body(body));
        }
        if pipeline.is_closed() {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Replaces the file's content with `lines`, atomically: a crash leaves the old file or the new, whole.
fn rewrite(path: &Path, lines: &[Vec<u8>]) -> io::Result<()> {
    let temporary = path.with_extension(REWRITE.trim_start_matches('.'));
    {
        let mut writer = BufWriter::new(File::create(&temporary)?);
        for line in lines {
            writer.write_all(line)?;
            writer.write_all(b"\n")?;
        }
        writer.flush()?;
        writer.get_ref().sync_all()?;
    }
    fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Imports the directory at start, then every `SCAN_INTERVAL` until `stop`.
pub async fn watch(dir: PathBuf, pipeline: Pipeline, chunk: usize, stop: CancellationToken) {
    loop {
        match import(&dir, &pipeline, chunk).await {
            Ok(Imported { stored: 0, kept: 0 }) => {}
            Ok(Imported { stored, kept }) => info!(stored, kept, dir = %dir.display(), "spilled events imported"),
            Err(e) => error!(dir = %dir.display(), error = %e, "cannot import the spill files"),
        }
        tokio::select! {
            () = tokio::time::sleep(SCAN_INTERVAL) => {}
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, body: &[u8]) -> NewEvent {
        NewEvent {
            source: Arc::from("stripe"),
            id: id.to_owned(),
            event_type: "charge.succeeded".to_owned(),
            created: Some(1_700_000_000),
            livemode: Some(false),
            api_version: None,
            account: Some("acct_1".to_owned()),
            body: Bytes::copy_from_slice(body),
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hookgate-spill-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_spilled_event_reads_back_with_its_exact_body_and_columns() {
        let body = b"{\"id\": \"evt_1\",\n \"x\": \"\xff\"}";
        let line = serde_json::to_string(&SpilledEvent::of(&event("evt_1", body))).unwrap();
        assert!(!line.contains('\n'), "one event a line: {line}");
        let spilled: SpilledEvent = serde_json::from_str(&line).unwrap();
        let decoded = base64::engine::general_purpose::STANDARD.decode(&spilled.body).unwrap();
        let back = spilled.into_event(Bytes::from(decoded));
        assert_eq!(&back.body[..], body);
        assert_eq!(
            (&*back.source, back.id.as_str(), back.event_type.as_str()),
            ("stripe", "evt_1", "charge.succeeded")
        );
        assert_eq!(
            (back.created, back.livemode, back.api_version, back.account.as_deref()),
            (Some(1_700_000_000), Some(false), None, Some("acct_1"))
        );
    }

    #[test]
    fn a_file_is_found_for_import_only_once_finished() {
        let dir = scratch("finish");
        let spill = Spill::open(&dir).unwrap();
        assert_eq!(spill.finish().unwrap(), None, "nothing spilled, no file");
        let first = event("evt_1", b"{}");
        let second = event("evt_2", b"{}");
        let name = spill.write(&[&first]).unwrap();
        assert_eq!(spill.write(&[&second]).unwrap(), name, "one file per process");
        assert!(finished_files(&dir).unwrap().is_empty(), "a file still being written is not imported");
        let (finished, events) = spill.finish().unwrap().unwrap();
        assert_eq!((finished.clone(), events), (name, 2));
        assert_eq!(finished_files(&dir).unwrap(), vec![finished.clone()]);
        assert_eq!(fs::read_to_string(&finished).unwrap().lines().count(), 2);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_that_cannot_be_written_is_refused_at_open() {
        let dir = scratch("file");
        fs::create_dir_all(dir.parent().unwrap()).unwrap();
        fs::write(&dir, b"a file, not a directory").unwrap();
        assert!(Spill::open(&dir).is_err());
        assert!(Spill::open(&dir.join("below")).is_err());
        fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn a_second_opener_is_refused_while_the_first_holds_the_directory() {
        let dir = scratch("lock");
        let first = Spill::open(&dir).unwrap();
        let pid = format!("pid {}", std::process::id());
        // Another open file description, as another process's would be: the lock refuses it.
        let refused = Spill::open(&dir).unwrap_err();
        assert!(matches!(&refused, OpenError::InUse { holder } if *holder == pid), "{refused}");
        assert!(matches!(check(&dir).unwrap(), Lock::Held(holder) if holder == pid));
        drop(first);
        assert!(matches!(check(&dir).unwrap(), Lock::Taken(_)), "the lock goes with its holder");
        drop(Spill::open(&dir).unwrap());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_left_unfinished_by_a_dead_process_is_finished_by_the_next_open() {
        let dir = scratch("left");
        fs::create_dir_all(&dir).unwrap();
        let line = serde_json::to_string(&SpilledEvent::of(&event("evt_1", b"{}"))).unwrap();
        // Killed while spilling: a whole line, then one cut short.
        let left = format!("{line}\n{}", &line[..20]);
        fs::write(dir.join("spill-5-5.jsonl.partial"), &left).unwrap();
        // Crashed while rewriting spill-4-4.jsonl, which is still whole.
        fs::write(dir.join("spill-4-4.jsonl"), format!("{line}\n")).unwrap();
        fs::write(dir.join("spill-4-4.jsonl.rewrite"), "cut").unwrap();
        let spill = Spill::open(&dir).unwrap();
        let finished = vec![dir.join("spill-4-4.jsonl"), dir.join("spill-5-5.jsonl")];
        assert_eq!(finished_files(&dir).unwrap(), finished);
        assert_eq!(fs::read_to_string(&finished[1]).unwrap(), left, "its bytes as they were");
        assert!(!dir.join("spill-4-4.jsonl.rewrite").exists(), "the rewrite's leftover is removed");
        // This process's own file is its own to finish.
        spill.write(&[&event("evt_2", b"{}")]).unwrap();
        assert_eq!(finished_files(&dir).unwrap(), finished);
        drop(spill);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_rewrite_keeps_only_the_lines_given() {
        let dir = scratch("rewrite");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("spill-1-1.jsonl");
        fs::write(&path, "a\nb\nc\n").unwrap();
        rewrite(&path, &[b"b".to_vec()]).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "b\n");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "no temporary file left");
        fs::remove_dir_all(&dir).unwrap();
    }
}
