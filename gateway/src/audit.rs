//! The audit trail (DESIGN §7): append-only JSON lines at `audit.path`
//! (default `<data_dir>/audit.jsonl`), one object per event, each with `ts`
//! (RFC 3339, UTC) and `event`.
//!
//! One writer thread owns the file. Events reach it through a bounded queue;
//! when the disk is slower than the events, senders wait (backpressure): an
//! event is never dropped. [`Audit::record_durable`] returns only after the
//! line is on disk (fdatasync), and a session does not start before its
//! `session_start` is: a crash right after cannot lose it.
//!
//! What goes in: logins, job ids, source addresses, key fingerprints, byte
//! counts, reasons. What never does: tokens, keys, certificates (nothing
//! here takes one; the fields are built from ids and fingerprints only).

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tokio::sync::oneshot;

/// Events queued before senders wait for the writer.
const QUEUE: usize = 16 * 1024;

/// Why an event is not on disk.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// Writing or syncing the file failed (shared by every event of the
    /// batch, hence the `Arc`).
    #[error("the audit trail could not be written: {0}")]
    Write(#[source] std::sync::Arc<std::io::Error>),
    #[error("the audit writer is gone")]
    WriterGone,
}

type Ack = oneshot::Sender<Result<(), AuditError>>;

struct Entry {
    line: Vec<u8>,
    ack: Option<Ack>,
}

pub struct Audit {
    tx: mpsc::SyncSender<Entry>,
    /// Set while the queue is full, so a stall is logged once, not per event.
    stalled: AtomicBool,
    /// Events sent and not yet taken by the writer (a metric).
    queued: Arc<std::sync::atomic::AtomicUsize>,
    /// The writer's last failure, cleared by its next good write; and
    /// whether the writer thread still runs.
    health: Arc<WriterHealth>,
    capacity: usize,
}

#[derive(Default)]
struct WriterHealth {
    failed: std::sync::Mutex<Option<String>>,
    gone: AtomicBool,
}

/// How the audit writer is doing, for `/healthz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditState {
    Writing {
        queued: usize,
    },
    /// The queue is over half full: the disk is slow.
    Slow {
        queued: usize,
        of: usize,
    },
    Failing(String),
}

impl Audit {
    /// Opens (creating, 0600) the log at `path` for appending and starts the
    /// writer thread.
    pub fn open(path: &Path) -> std::io::Result<Audit> {
        Self::open_with_queue(path, QUEUE)
    }

    fn open_with_queue(path: &Path, queue: usize) -> std::io::Result<Audit> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut options = std::fs::OpenOptions::new();
        options.append(true).create(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let file = options.open(path)?;
        let (tx, rx) = mpsc::sync_channel::<Entry>(queue);
        let queued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let taken = queued.clone();
        let health = Arc::new(WriterHealth::default());
        let told = health.clone();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                writer(file, rx, &taken, &told);
                told.gone.store(true, Ordering::Relaxed);
            })?;
        Ok(Audit {
            tx,
            stalled: AtomicBool::new(false),
            queued,
            health,
            capacity: queue,
        })
    }

    fn line(event: &str, fields: Value) -> Vec<u8> {
        let mut object = Map::new();
        object.insert(
            "ts".into(),
            json!(humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()),
        );
        object.insert("event".into(), json!(event));
        if let Value::Object(fields) = fields {
            object.extend(fields);
        }
        let mut line = serde_json::to_vec(&Value::Object(object)).unwrap_or_default();
        line.push(b'\n');
        line
    }

    /// Appends an event (written promptly, synced with the next durable one).
    /// When the queue is full (the disk is stalled) the caller waits; on a
    /// multi-threaded runtime's worker it waits through `block_in_place`, so
    /// the worker's other tasks move to another thread instead of stalling
    /// with it. On an SSH connection thread (`ssh::shards`, single-threaded)
    /// the thread's other connections wait with it: they would all be
    /// waiting for the same disk to record their own events.
    pub fn record(&self, event: &str, fields: Value) {
        let entry = Entry {
            line: Self::line(event, fields),
            ack: None,
        };
        self.queued.fetch_add(1, Ordering::Relaxed);
        let sent = match self.tx.try_send(entry) {
            Ok(()) => {
                if self.stalled.swap(false, Ordering::Relaxed) {
                    tracing::info!("audit queue drained");
                }
                Ok(())
            }
            Err(mpsc::TrySendError::Full(entry)) => {
                if !self.stalled.swap(true, Ordering::Relaxed) {
                    tracing::warn!(event, "audit queue full: events wait for the disk");
                }
                let multi_thread = tokio::runtime::Handle::try_current().is_ok_and(|h| {
                    h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
                });
                if multi_thread {
                    tokio::task::block_in_place(|| self.tx.send(entry)).map_err(|_| ())
                } else {
                    self.tx.send(entry).map_err(|_| ())
                }
            }
            Err(mpsc::TrySendError::Disconnected(_)) => Err(()),
        };
        if sent.is_err() {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            tracing::error!(event, "audit writer is gone; event not recorded");
        }
    }

    /// Appends an event and returns once it is on disk.
    pub async fn record_durable(&self, event: &str, fields: Value) -> Result<(), AuditError> {
        let (ack, done) = oneshot::channel();
        let entry = Entry {
            line: Self::line(event, fields),
            ack: Some(ack),
        };
        let tx = self.tx.clone();
        self.queued.fetch_add(1, Ordering::Relaxed);
        // A full queue blocks the sender; keep that off the async workers.
        let sent = tokio::task::spawn_blocking(move || tx.send(entry)).await;
        if !matches!(sent, Ok(Ok(()))) {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(AuditError::WriterGone);
        }
        done.await.map_err(|_| AuditError::WriterGone)?
    }

    /// Events waiting for the writer.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    pub fn state(&self) -> AuditState {
        if self.health.gone.load(Ordering::Relaxed) {
            return AuditState::Failing("the audit writer stopped".into());
        }
        let failed = self.health.failed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = failed.as_ref() {
            return AuditState::Failing(e.clone());
        }
        let queued = self.queued();
        if queued > self.capacity / 2 {
            return AuditState::Slow {
                queued,
                of: self.capacity,
            };
        }
        AuditState::Writing { queued }
    }
}

fn writer(
    mut file: std::fs::File,
    rx: mpsc::Receiver<Entry>,
    queued: &AtomicUsize,
    health: &WriterHealth,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        let mut buf = Vec::with_capacity(batch.iter().map(|e| e.line.len()).sum());
        for e in &batch {
            buf.extend_from_slice(&e.line);
        }
        queued.fetch_sub(batch.len(), Ordering::Relaxed);
        let durable = batch.iter().any(|e| e.ack.is_some());
        let mut result = file.write_all(&buf);
        if result.is_ok() && durable {
            result = file.sync_data();
        }
        let result = result.map_err(|e| AuditError::Write(std::sync::Arc::new(e)));
        if let Err(e) = &result {
            tracing::error!("audit log write failed: {e}");
        }
        *health.failed.lock().unwrap_or_else(|e| e.into_inner()) = result
            .as_ref()
            .err()
            .map(|e| format!("the last write failed: {e}"));
        for e in batch {
            if let Some(ack) = e.ack {
                let _ = ack.send(result.clone());
            }
        }
    }
    let _ = file.sync_data();
}

/// A username as the client sent it, safe to log: at most 128 characters.
pub fn shown(user: &str) -> String {
    let mut s = String::with_capacity(user.len().min(160));
    for (i, c) in user.chars().enumerate() {
        if i == 128 {
            s.push('…');
            break;
        }
        // A peer's newline or escape never reaches a log, an audit reader's
        // terminal or a user's screen as itself.
        if c.is_control() {
            s.extend(c.escape_default());
        } else {
            s.push(c);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn events_are_json_lines_in_order_and_durable_ones_are_synced() {
        let dir = std::env::temp_dir().join(format!("cigw-audit-{}", rand::random::<u64>()));
        let path = dir.join("audit.jsonl");
        let audit = Audit::open(&path).expect("open");
        for i in 0..100 {
            audit.record("auth", json!({"n": i, "user": "a\"b\nc"}));
        }
        audit
            .record_durable("session_start", json!({"job": "42"}))
            .await
            .expect("durable");
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        assert_eq!(lines.len(), 101);
        assert_eq!(lines[7]["n"], 7);
        assert_eq!(lines[7]["user"], "a\"b\nc");
        assert_eq!(lines[100]["event"], "session_start");
        assert!(lines[100]["ts"].as_str().expect("ts").ends_with('Z'));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        drop(audit);
        // Reopening appends.
        let audit = Audit::open(&path).expect("reopen");
        audit
            .record_durable("again", json!({}))
            .await
            .expect("durable");
        assert_eq!(
            std::fs::read_to_string(&path)
                .expect("read")
                .lines()
                .count(),
            102
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn long_usernames_are_cut() {
        assert_eq!(shown("octocat"), "octocat");
        let long = "x".repeat(10_000);
        assert_eq!(shown(&long).chars().count(), 129);
    }

    /// The file is a FIFO nobody reads yet: the writer thread blocks, the
    /// queue (4 events) fills, and `record` must wait. On a runtime with one
    /// worker, other tasks still run meanwhile; once the reader drains the
    /// pipe every event arrives, in order.
    #[cfg(unix)]
    #[test]
    fn a_stalled_disk_does_not_stall_the_runtime() {
        use std::io::Read;
        let dir = std::env::temp_dir().join(format!("cigw-audit-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("audit.fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .expect("mkfifo (coreutils) runs");
        assert!(made.success(), "mkfifo failed");
        let (go, wait_go) = mpsc::channel::<()>();
        let reader = {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut f = std::fs::File::open(&path).expect("open fifo");
                wait_go.recv().expect("go");
                let mut text = String::new();
                f.read_to_string(&mut text).expect("read");
                text
            })
        };
        let audit = std::sync::Arc::new(Audit::open_with_queue(&path, 4).expect("open"));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let n = 500;
        rt.block_on(async {
            // 1 KiB events: the pipe (64 KiB) and then the queue fill.
            let writer = {
                let audit = audit.clone();
                tokio::spawn(async move {
                    for i in 0..n {
                        audit.record("auth", json!({"n": i, "pad": "x".repeat(1024)}));
                    }
                })
            };
            while !audit.stalled.load(Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            // The only worker is inside `record`; is anything else running?
            let (ran, did_run) = mpsc::channel();
            tokio::spawn(async move {
                let _ = ran.send(());
            });
            let other_task = did_run.recv_timeout(std::time::Duration::from_secs(30));
            go.send(()).expect("go");
            assert!(
                other_task.is_ok(),
                "a task could not run while the audit queue was full"
            );
            writer.await.expect("writer");
        });
        drop(audit);
        let text = reader.join().expect("reader");
        let numbers: Vec<i64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).expect("JSON")["n"]
                    .as_i64()
                    .expect("n")
            })
            .collect();
        assert_eq!(numbers, (0..n).collect::<Vec<_>>());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
