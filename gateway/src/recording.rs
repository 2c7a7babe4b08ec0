//! Session recordings (`[recording]`): every job-mode session channel with
//! a pty is written as an asciicast v2 file, `<session-id>.cast` (a later
//! pty channel of the same connection `<session-id>-<n>.cast`), under
//! `recording.dir`.
//!
//! - The file is created 0600 in a 0700 directory and its header is on disk
//!   before the pty request goes on to the runner, so the runner sees no
//!   byte of an unrecorded session. A file that cannot be made refuses the
//!   session when `recording.required` (the default).
//! - Events: `o` (the runner's output, stdout and stderr as a terminal shows
//!   them), `r` (a resize, `COLSxROWS`), `m` (a marker: the exit status) and,
//!   only with `record_input = true`, `i` (what the user typed, passwords
//!   too).
//! - The relay only timestamps and queues an event (a cheap `Bytes` clone);
//!   a writer task of its own turns bytes into UTF-8 text (a character cut
//!   between two chunks is joined, invalid bytes become U+FFFD) and JSON,
//!   and writes through a buffer flushed whenever the queue is empty. The
//!   queue is bounded: a disk slower than the session slows the session
//!   (through the SSH windows), it never grows memory. A recording that
//!   fails midway ends its channel when it is required.
//! - Jump mode is end to end encrypted and cannot be recorded;
//!   `recording.allow_jump = false` turns it off.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc;

/// Events queued per recording before the relay waits for the writer.
const QUEUE: usize = 256;
/// Bytes of lines gathered before one write.
const BATCH: usize = 256 * 1024;
/// The suffix of every recording.
pub const SUFFIX: &str = ".cast";

/// What a session channel needs to record itself once it asks for a pty.
#[derive(Clone)]
pub struct Plan {
    pub dir: PathBuf,
    pub session: String,
    pub job: String,
    pub login: String,
    pub input: bool,
    pub required: bool,
    pub tasks: crate::tasks::Tasks,
}

impl Plan {
    /// The file of the connection's `n`th recording (from 0):
    /// `<session-id>.cast`, then `<session-id>-2.cast`, …
    pub fn path(&self, n: usize) -> PathBuf {
        let name = match n {
            0 => self.session.clone(),
            n => format!("{}-{}", self.session, n + 1),
        };
        self.dir.join(format!("{name}{SUFFIX}"))
    }
}

#[derive(Debug)]
enum Event {
    Data(f64, char, Bytes),
    Resize(f64, u32, u32),
    Exit(f64, u32),
}

/// One channel's recording, as the relay sees it.
pub struct Recorder {
    tx: mpsc::Sender<Event>,
    started: Instant,
    input: bool,
    pub required: bool,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write the session's recording {path}: {source}")]
pub struct RecordError {
    path: String,
    source: std::io::Error,
}

impl Recorder {
    /// Creates the file and writes the header (on disk when this returns),
    /// then starts its writer.
    pub async fn start(
        plan: &Plan,
        path: PathBuf,
        term: &str,
        width: u32,
        height: u32,
    ) -> Result<Recorder, RecordError> {
        let failed = |source| RecordError {
            path: path.display().to_string(),
            source,
        };
        let header = json!({
            "version": 2,
            "width": width.clamp(1, 10_000),
            "height": height.clamp(1, 10_000),
            "timestamp": crate::registry::unix_now(),
            "title": format!("ci-gateway: job {} by {}", plan.job, plan.login),
            "env": { "TERM": term.chars().take(64).collect::<String>(), "SHELL": "" },
            "ci_gateway": {
                "session": plan.session,
                "job": plan.job,
                "login": plan.login,
                "input_recorded": plan.input,
            },
        });
        let file = {
            let (dir, path) = (plan.dir.clone(), path.clone());
            tokio::task::spawn_blocking(move || create(&dir, &path, &header))
                .await
                .map_err(|e| failed(std::io::Error::other(e.to_string())))?
                .map_err(failed)?
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        let shown = path.display().to_string();
        plan.tasks
            .spawn("recording writer", write_events(file, rx, shown));
        Ok(Recorder {
            tx,
            started: Instant::now(),
            input: plan.input,
            required: plan.required,
        })
    }

    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Queues an event; false if the recording failed (its writer is gone).
    async fn send(&self, event: Event) -> bool {
        self.tx.send(event).await.is_ok()
    }

    /// The runner's output.
    pub async fn output(&self, data: &Bytes) -> bool {
        self.send(Event::Data(self.now(), 'o', data.clone())).await
    }

    /// What the user typed: recorded only with `record_input`.
    pub async fn input(&self, data: &Bytes) -> bool {
        if !self.input {
            return true;
        }
        self.send(Event::Data(self.now(), 'i', data.clone())).await
    }

    pub async fn resize(&self, width: u32, height: u32) -> bool {
        self.send(Event::Resize(self.now(), width, height)).await
    }

    pub async fn exit(&self, status: u32) -> bool {
        self.send(Event::Exit(self.now(), status)).await
    }
}

/// Makes the directory (0700) and the file (0600, never an existing one,
/// never through a link), and writes the header line to disk.
fn create(dir: &Path, path: &Path, header: &Value) -> std::io::Result<std::fs::File> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)?;
    let mut options = std::fs::OpenOptions::new();
    // O_EXCL: never an existing file, nor through a planted link.
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    let mut line = serde_json::to_vec(header)?;
    line.push(b'\n');
    file.write_all(&line)?;
    file.sync_data()?;
    Ok(file)
}

/// The writer: events to JSON lines, gathered while the queue has more
/// (up to [`BATCH`]) and written with one call, so a busy session costs one
/// write per batch and an idle one is on disk at once.
async fn write_events(file: std::fs::File, mut rx: mpsc::Receiver<Event>, shown: String) {
    let mut file = tokio::fs::File::from_std(file);
    let mut text = Text::default();
    let mut typed = Text::default();
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = rx.recv().await {
        batch.clear();
        let mut next = Some(first);
        while let Some(event) = next.take() {
            event_line(&mut batch, event, &mut text, &mut typed);
            if batch.len() < BATCH {
                next = rx.try_recv().ok();
            }
        }
        let written = async {
            file.write_all(&batch).await?;
            file.flush().await
        };
        if let Err(e) = written.await {
            tracing::warn!("recording {shown}: {e}; the recording stops");
            return;
        }
    }
}

/// Appends one event's line. Data is escaped straight from the bytes (no
/// JSON value is built): the cost of a recording is mostly this.
fn event_line(line: &mut Vec<u8>, event: Event, text: &mut Text, typed: &mut Text) {
    use std::io::Write as _;
    let _ = match event {
        Event::Data(t, kind, data) => {
            let stream = if kind == 'o' { text } else { typed };
            let start = line.len();
            let _ = write!(line, "[{t:.6},\"{kind}\",\"");
            let before = line.len();
            stream.push_escaped(&data, line);
            if line.len() == before {
                // Only part of a character so far: nothing to write yet.
                line.truncate(start);
                return;
            }
            line.extend_from_slice(b"\"]\n");
            Ok(())
        }
        Event::Resize(t, w, h) => writeln!(line, "[{t:.6},\"r\",\"{w}x{h}\"]"),
        Event::Exit(t, status) => writeln!(line, "[{t:.6},\"m\",\"exit status {status}\"]"),
    };
}

/// Appends `s` escaped for the inside of a JSON string.
fn escape_into(s: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = s.as_bytes();
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escaped: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[run..i]);
        if escaped.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(escaped);
        }
        run = i + 1;
    }
    out.extend_from_slice(&bytes[run..]);
}

/// A byte stream as UTF-8 text: a character split between chunks waits for
/// its end; invalid bytes are U+FFFD.
#[derive(Default)]
struct Text {
    pending: Vec<u8>,
}

impl Text {
    /// Appends what `data` completes, escaped for JSON.
    fn push_escaped(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let joined;
        let mut rest: &[u8] = if self.pending.is_empty() {
            data
        } else {
            let mut all = std::mem::take(&mut self.pending);
            all.extend_from_slice(data);
            joined = all;
            &joined
        };
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    escape_into(s, out);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (good, bad) = rest.split_at(e.valid_up_to());
                    escape_into(std::str::from_utf8(good).unwrap_or_default(), out);
                    match e.error_len() {
                        Some(n) => {
                            escape_into("\u{FFFD}", out);
                            rest = &bad[n..];
                        }
                        // Cut short: the rest of the character comes next.
                        None => {
                            rest = bad;
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
    }
}

/// Deletes recordings older than `max_age` in `dir`; returns how many.
pub fn prune(dir: &Path, max_age: Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().ends_with(SUFFIX) {
            continue;
        }
        let old = entry
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .and_then(|m| m.modified().ok())
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age > max_age);
        if old && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Prunes `recording.dir` now and every ten minutes (when `max_age` is set).
pub async fn retention(gw: std::sync::Arc<crate::Gateway>) {
    let max_age = gw.config.recording.max_age;
    if !gw.config.recording.enabled || max_age.is_zero() {
        return;
    }
    let dir = gw.config.recording_dir();
    let mut tick = tokio::time::interval(Duration::from_secs(600));
    loop {
        tick.tick().await;
        let dir = dir.clone();
        let removed = tokio::task::spawn_blocking(move || prune(&dir, max_age))
            .await
            .unwrap_or(0);
        if removed > 0 {
            tracing::info!(removed, "recordings older than recording.max_age deleted");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text of one output event's line, as a JSON reader sees it.
    fn push(t: &mut Text, data: &[u8]) -> Option<String> {
        let mut line = Vec::new();
        let event = Event::Data(1.5, 'o', Bytes::copy_from_slice(data));
        event_line(&mut line, event, t, &mut Text::default());
        if line.is_empty() {
            return None;
        }
        assert!(line.ends_with(b"]\n"), "{line:?}");
        let v: Value = serde_json::from_slice(&line).expect("a JSON line");
        assert_eq!((v[0].as_f64(), v[1].as_str()), (Some(1.5), Some("o")));
        v[2].as_str().map(str::to_string)
    }

    #[test]
    fn characters_split_between_chunks_are_joined_and_bad_bytes_replaced() {
        let mut t = Text::default();
        let euro = "€".as_bytes();
        assert_eq!(push(&mut t, &[b'a', euro[0]]).as_deref(), Some("a"));
        assert_eq!(push(&mut t, &euro[1..2]), None);
        assert_eq!(push(&mut t, &[euro[2], b'b']).as_deref(), Some("€b"));
        assert_eq!(push(&mut t, &[0xff, b'c']).as_deref(), Some("\u{FFFD}c"));
        assert!(t.pending.is_empty());
        let every: Vec<u8> = (0u8..0x80).collect();
        let text = push(&mut t, &every).expect("text");
        assert_eq!(text.as_bytes(), &every[..], "every ASCII byte round-trips");
    }

    #[test]
    fn old_recordings_are_pruned_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("cigw-rec-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("dir");
        let old = dir.join("a.cast");
        std::fs::write(&old, "{}\n").expect("write");
        std::fs::write(dir.join("keep.txt"), "x").expect("write");
        let past = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&old)
            .and_then(|f| f.set_modified(past))
            .expect("mtime");
        std::fs::write(dir.join("b.cast"), "{}\n").expect("write");
        assert_eq!(prune(&dir, Duration::from_secs(60)), 1);
        assert!(!old.exists());
        assert!(dir.join("b.cast").exists() && dir.join("keep.txt").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// More than one batch of output, queued faster than it is written:
    /// every line lands, in order, and the text is what was sent.
    #[tokio::test]
    async fn output_past_one_batch_is_written_whole_and_in_order() {
        let path = std::env::temp_dir().join(format!("cigw-rec-{}.cast", rand::random::<u64>()));
        let file = std::fs::File::create(&path).expect("file");
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer = tokio::spawn(write_events(file, rx, "test".into()));
        let mut sent = String::new();
        for i in 0..3000u32 {
            let chunk = format!("{i:04} \"line\"\r\n{}", "x".repeat(200));
            sent.push_str(&chunk);
            let event = Event::Data(f64::from(i), 'o', Bytes::from(chunk));
            tx.send(event).await.expect("writer alive");
        }
        tx.send(Event::Exit(3000.0, 0)).await.expect("writer alive");
        drop(tx);
        writer.await.expect("writer");
        let written = std::fs::read_to_string(&path).expect("read");
        assert!(written.len() > 2 * BATCH, "{} bytes", written.len());
        let lines: Vec<Value> = written
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        assert_eq!(lines.len(), 3001);
        let got: String = lines[..3000]
            .iter()
            .enumerate()
            .map(|(i, v)| {
                assert_eq!(v[0].as_f64(), Some(i as f64));
                v[2].as_str().expect("text").to_string()
            })
            .collect();
        assert_eq!(got, sent);
        assert_eq!(lines[3000][2], "exit status 0");
        let _ = std::fs::remove_file(&path);
    }
}
