//! Opening a user's channel: its place among the connection's and the
//! login's channels, the refusals (code, reason, and the disconnect that
//! goes first where the client shows nothing else), and the job-mode
//! runner a channel waits for.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use russh::server;
use russh::{ChannelId, ChannelOpenFailure, Disconnect};

use crate::ssh::upstream::{RunnerConnection, RunnerLink};

/// Open channels of one connection, and of its login over all its
/// connections (shared counter, set once the login is known).
#[derive(Default)]
pub struct ChannelCount {
    conn: std::sync::atomic::AtomicUsize,
    pub(crate) login: OnceLock<Arc<std::sync::atomic::AtomicUsize>>,
}

impl ChannelCount {
    /// Takes a place, or says which bound is full.
    pub fn take(&self, per_conn: usize, per_login: usize) -> Result<(), &'static str> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.conn.fetch_add(1, Relaxed) >= per_conn {
            self.conn.fetch_sub(1, Relaxed);
            return Err("connection");
        }
        if let Some(login) = self.login.get() {
            if login.fetch_add(1, Relaxed) >= per_login {
                login.fetch_sub(1, Relaxed);
                self.conn.fetch_sub(1, Relaxed);
                return Err("login");
            }
        }
        Ok(())
    }

    /// Gives a place back; returns the connection's channels still open.
    pub fn release(&self) -> usize {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(login) = self.login.get() {
            login.fetch_sub(1, Relaxed);
        }
        self.conn.fetch_sub(1, Relaxed).saturating_sub(1)
    }
}

/// The originator port OpenSSH puts on a `-W` (stdio) forward, the channel
/// `ssh -J` opens; nothing else on such a connection will follow.
pub const STDIO_FORWARD_PORT: u32 = 65535;

/// The user's refusal for a channel the runner would not open: its own
/// reason code, or connect-failed.
pub fn runner_refusal(what: &str, e: russh::Error) -> (ChannelOpenFailure, String) {
    match e {
        russh::Error::ChannelOpenFailure(code) => {
            let text = format!("the runner refused to open {what}: {code:?}");
            (code, text)
        }
        e => (
            ChannelOpenFailure::ConnectFailed,
            format!("the runner could not open {what}: {e}"),
        ),
    }
}

/// How long a refusal waits behind a disconnect that carries its reason.
/// Channel-open replies overtake other queued messages in russh's session
/// loop; sent at once, one could end the client before the disconnect
/// message that OpenSSH prints. The disconnect ends the channel anyway.
pub const DISCONNECT_FIRST: std::time::Duration = std::time::Duration::from_secs(2);

/// The job's runner connection for a channel, once it is up; or the
/// refusal for a channel whose runner never came up (the connection is
/// being closed with the same reason, which goes first).
pub async fn runner_for_channel(
    link: RunnerLink,
) -> Result<Arc<RunnerConnection>, (ChannelOpenFailure, String)> {
    match link.get().await {
        Ok(runner) => Ok(runner),
        Err(e) => {
            tokio::time::sleep(DISCONNECT_FIRST).await;
            Err((ChannelOpenFailure::ConnectFailed, e.to_string()))
        }
    }
}

/// Ends the user's connection with `reason`, the line OpenSSH prints.
pub async fn say_goodbye(handle: &server::Handle, reason: String) {
    let _ = handle
        .disconnect(Disconnect::ByApplication, reason, "en".into())
        .await;
}

/// Refuses a channel with `code` and `reason`; with `disconnect`, the
/// reason goes out as the connection's disconnect message first (an
/// `ssh -J` stdio forward, whose connection carries nothing else, and
/// whose client prints nothing useful for a refused channel).
pub async fn refuse(
    reply: server::ChannelOpenHandle,
    code: ChannelOpenFailure,
    reason: String,
    disconnect: Option<server::Handle>,
) {
    if let Some(handle) = disconnect {
        say_goodbye(&handle, format!("ci-gateway: {reason}")).await;
        tokio::time::sleep(DISCONNECT_FIRST).await;
    }
    reply
        .reject_with(code, format!("ci-gateway: {reason}"))
        .await;
}

/// A connection's open job-mode session channels, where notices are shown.
pub type NoticeChannels = Arc<std::sync::Mutex<HashSet<ChannelId>>>;

/// Shows `line` on each of `channels` as stderr: visible on a terminal, and
/// outside the data stream of scp, sftp and other protocols.
pub async fn show_notice(handle: &server::Handle, channels: &NoticeChannels, line: &str) {
    let open: Vec<ChannelId> = channels
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .copied()
        .collect();
    for channel in open {
        let text = format!("\r\nci-gateway: {line}\r\n");
        let _ = handle.extended_data(channel, 1, text.into_bytes()).await;
    }
}

/// A channel's place in [`NoticeChannels`], for as long as its task runs.
pub struct Listed(NoticeChannels, ChannelId);

impl Listed {
    pub fn new(set: NoticeChannels, id: ChannelId) -> Listed {
        set.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
        Listed(set, id)
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.1);
    }
}
