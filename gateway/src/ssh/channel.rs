//! One task per job-mode channel: a user's channel (server side) relayed to
//! the matching channel on the runner (client side).
//!
//! The task owns everything about the channel in both directions: data,
//! EOF, the close handshake, exit status and signal, and the channel
//! requests with their replies. Requests are forwarded with the user's own
//! `want_reply`, so the runner's replies come back in the order the user
//! expects them and are relayed as they come; the requests the gateway
//! answers itself (X11 and agent forwarding are refused, unknown types too)
//! wait their turn behind the runner's replies still due. Nothing is
//! matched by timeout: a runner that never answers delays only this
//! channel's later replies, never another channel's.
//!
//! Flow control is end to end: each direction writes with the receiving
//! side's window (`data_bytes` waits for it) and only then gives the bytes
//! back to the sender (`release_window`, our russh patch), so at most one
//! window per direction is held here. While a write to the runner waits,
//! the user's later messages are read ahead ([`Inbox`]), so a close is
//! never stuck behind a runner that stopped reading.
//!
//! The close: when the user closes first (PuTTY and dropbear close as soon
//! as both sides sent EOF), the runner is asked to close too and its exit
//! status, if it still comes within [`USER_CLOSED_GRACE`], is relayed before
//! the gateway's own close (russh patch `application_closes_channels`).

use std::collections::VecDeque;
use std::time::Duration;

use crate::ssh::inbox::Inbox;

use russh::server;
use russh::{client, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::sync::Mutex;

/// How long the runner may take to send its exit status and close once the
/// user has closed the channel.
pub const USER_CLOSED_GRACE: Duration = Duration::from_secs(10);

/// Byte counters and the exit status of one channel, for the audit trail.
#[derive(Debug, Default, Clone, Copy)]
pub struct Bytes {
    pub to_runner: u64,
    pub to_user: u64,
    pub exit_status: Option<u32>,
}

/// What a connection's channels moved, and the last exit status, for the
/// audit trail's `session_end`. Each channel adds its own before it closes
/// toward the user: a client that disconnects the moment it sees the close
/// ends the connection, and its record, right then.
#[derive(Default)]
pub struct Usage {
    to_runner: std::sync::atomic::AtomicU64,
    to_user: std::sync::atomic::AtomicU64,
    exit_status: std::sync::Mutex<Option<u32>>,
    /// The mode's byte counters in the metrics, once the mode is known;
    /// counted as the bytes move, so a scrape sees a live session's.
    pub flow: std::sync::OnceLock<crate::metrics::Flow>,
    /// The files this connection's recordings went to, in order.
    recordings: std::sync::Mutex<Vec<String>>,
}

impl Usage {
    /// Bytes to the runner as they move (the metrics; one atomic add);
    /// [`Usage::add`] totals a channel.
    pub fn count_to_runner(&self, n: u64) {
        if let Some(flow) = self.flow.get() {
            flow.to_runner.inc_by(n);
        }
    }

    /// Bytes to the user as they move, as [`Usage::count_to_runner`].
    pub fn count_to_user(&self, n: u64) {
        if let Some(flow) = self.flow.get() {
            flow.to_user.inc_by(n);
        }
    }

    pub fn add(&self, bytes: &Bytes) {
        use std::sync::atomic::Ordering::Relaxed;
        self.to_runner.fetch_add(bytes.to_runner, Relaxed);
        self.to_user.fetch_add(bytes.to_user, Relaxed);
        if let Some(status) = bytes.exit_status {
            *self.exit_status.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
        }
    }

    /// Claims the file of this connection's next recording.
    fn next_recording(&self, plan: &crate::recording::Plan) -> std::path::PathBuf {
        let mut all = self.recordings.lock().unwrap_or_else(|e| e.into_inner());
        let path = plan.path(all.len());
        all.push(path.display().to_string());
        path
    }

    /// The recordings made (for `session_end`).
    pub fn recordings(&self) -> Vec<String> {
        self.recordings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn total(&self) -> Bytes {
        use std::sync::atomic::Ordering::Relaxed;
        Bytes {
            to_runner: self.to_runner.load(Relaxed),
            to_user: self.to_user.load(Relaxed),
            exit_status: *self.exit_status.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }
}

/// Who answers a request the user wanted a reply to, in request order.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Due {
    /// The runner (the request was forwarded).
    Runner,
    /// The gateway, with this verdict.
    Gateway(bool),
}

/// The replies due to the user, and the user side to send them on.
struct Replies {
    due: Mutex<VecDeque<Due>>,
    handle: server::Handle,
    id: russh::ChannelId,
}

/// Replies are bounded: a user may have this many unanswered requests on
/// one channel; beyond it the channel is closed (OpenSSH sends a handful).
const MAX_DUE: usize = 64;

impl Replies {
    /// Notes a reply due; false when too many are.
    async fn expect(&self, who: Due) -> bool {
        let mut due = self.due.lock().await;
        if due.len() >= MAX_DUE {
            return false;
        }
        due.push_back(who);
        self.flush(&mut due).await;
        true
    }

    /// The runner answered its oldest request.
    async fn runner_answered(&self, ok: bool) -> Result<(), ()> {
        let mut due = self.due.lock().await;
        // Replies the gateway gave are sent as soon as they are at the front,
        // so the front is the runner's, or the runner answered nothing asked.
        if due.pop_front() != Some(Due::Runner) {
            return Err(());
        }
        self.handle.channel_reply(self.id, ok).await?;
        self.flush(&mut due).await;
        Ok(())
    }

    /// Sends the gateway's own replies now at the front.
    async fn flush(&self, due: &mut VecDeque<Due>) {
        while let Some(Due::Gateway(ok)) = due.front().copied() {
            due.pop_front();
            let _ = self.handle.channel_reply(self.id, ok).await;
        }
    }
}

/// The two ends of one channel.
pub struct Ends {
    pub user_rx: ChannelReadHalf,
    pub user_tx: ChannelWriteHalf<server::Msg>,
    pub user_handle: server::Handle,
    pub runner_rx: ChannelReadHalf,
    pub runner_tx: ChannelWriteHalf<client::Msg>,
    /// Through a tunnel: its end, and the line a user whose channel it cut
    /// reads on stderr (before the close: a client may exit at the close,
    /// before the connection's disconnect message arrives).
    pub tunnel: Option<(tokio::sync::watch::Receiver<bool>, String)>,
    /// Shown on the user's stderr before a shell with a pty (never on
    /// exec, scp, sftp: their streams stay the runner's bytes alone).
    pub banner: Option<crate::ssh::listing::Banner>,
    /// Recorded from its pty request on, when recording is on.
    pub record: Option<crate::recording::Plan>,
}

/// Relays the channel until both sides are closed (or the runner's grace
/// after the user's close is over); adds what it moved to `usage`, then
/// closes both.
pub async fn run(ends: Ends, usage: &Usage) -> Bytes {
    let Ends {
        user_rx,
        user_tx,
        user_handle,
        runner_rx,
        runner_tx,
        tunnel,
        banner,
        record,
    } = ends;
    let recorder = std::sync::OnceLock::new();
    let recording = Recording {
        plan: record,
        recorder: &recorder,
    };
    let replies = Replies {
        due: Mutex::new(VecDeque::new()),
        handle: user_handle.clone(),
        id: user_tx.id(),
    };
    let up = user_to_runner(
        user_rx,
        (&user_tx, &user_handle),
        &runner_tx,
        &replies,
        banner,
        (usage, &recording),
    );
    // Counted as it goes: a user gone while the runner still sends leaves
    // `down` unfinished, and what it sent still counts.
    let sent = std::sync::atomic::AtomicU64::new(0);
    let down = runner_to_user(
        runner_rx,
        &user_tx,
        &runner_tx,
        &user_handle,
        &replies,
        (&sent, usage, &recorder),
    );
    let mut bytes = Bytes::default();
    {
        let mut up = std::pin::pin!(up);
        let mut down = std::pin::pin!(down);
        tokio::select! {
            // The user closed (or is gone): what the runner still sends
            // (its exit status above all) is relayed for a while.
            (n, user_closed) = &mut up => {
                bytes.to_runner = n;
                // A user whose connection is gone gets nothing more.
                if user_closed {
                    let rest = tokio::time::timeout(USER_CLOSED_GRACE, &mut down).await;
                    if let Ok((status, _)) = rest {
                        bytes.exit_status = status;
                    }
                }
            }
            // The runner closed: nothing more will come from it.
            (status, cut) = &mut down => {
                bytes.exit_status = status;
                // Cut off (no close from the runner) through a tunnel: say
                // why if the tunnel is what dropped. A channel the runner
                // closed is not held up.
                if let (true, Some((mut gone, line))) = (cut, tunnel) {
                    if crate::ssh::tunnel::dropped(&mut gone).await {
                        let line = bytes::Bytes::from(format!("\r\n{line}\r\n"));
                        let _ = user_tx.extended_data_bytes(1, line).await;
                    }
                }
            }
        }
    }
    bytes.to_user = sent.into_inner();
    usage.add(&bytes);
    let _ = runner_tx.close().await;
    let _ = user_handle.close(user_tx.id()).await;
    bytes
}

/// A channel's recording: the plan until its pty request, then the
/// recorder both directions write to.
struct Recording<'a> {
    plan: Option<crate::recording::Plan>,
    recorder: &'a std::sync::OnceLock<crate::recording::Recorder>,
}

impl Recording<'_> {
    /// Starts recording at the pty request, before the runner sees it.
    /// `Err` is the line to end the session with (a required recording
    /// that cannot be written).
    async fn start(&self, usage: &Usage, msg: &ChannelMsg) -> Result<(), String> {
        let (
            Some(plan),
            ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                ..
            },
        ) = (&self.plan, msg)
        else {
            return Ok(());
        };
        if self.recorder.get().is_some() {
            return Ok(());
        }
        let path = usage.next_recording(plan);
        match crate::recording::Recorder::start(plan, path, term, *col_width, *row_height).await {
            Ok(recorder) => {
                let _ = self.recorder.set(recorder);
                Ok(())
            }
            Err(e) if plan.required => {
                tracing::warn!(session = %plan.session, "{e}; the session is refused");
                Err(format!(
                    "ci-gateway: this gateway records every session and cannot record this one \
                     ({e}); refusing it (recording.required)"
                ))
            }
            Err(e) => {
                tracing::warn!(session = %plan.session, "{e}; the session goes on unrecorded");
                Ok(())
            }
        }
    }

    /// Whether the channel may go on after `wrote` (a required recording
    /// that failed ends it).
    fn fine(&self, wrote: bool) -> bool {
        wrote || self.recorder.get().is_none_or(|r| !r.required)
    }
}

/// Reads the user's side until the user closes it; returns bytes relayed
/// and whether the user closed the channel (rather than being gone).
async fn user_to_runner(
    mut rx: ChannelReadHalf,
    (user, handle): (&ChannelWriteHalf<server::Msg>, &server::Handle),
    tx: &ChannelWriteHalf<client::Msg>,
    replies: &Replies,
    mut banner: Option<crate::ssh::listing::Banner>,
    (usage, recording): (&Usage, &Recording<'_>),
) -> (u64, bool) {
    let (mut closed, mut eof_sent, mut pty) = (false, false, false);
    let mut n = 0u64;
    let mut inbox = Inbox::default();
    while let Some(msg) = inbox.next(&mut rx).await {
        if let Err(line) = recording.start(usage, &msg).await {
            let shown = bytes::Bytes::from(format!("{line}\r\n"));
            let _ = user.extended_data_bytes(1, shown).await;
            crate::ssh::open::say_goodbye(handle, line).await;
            break;
        }
        if let Some(recorder) = recording.recorder.get() {
            let wrote = match &msg {
                ChannelMsg::Data { data } => recorder.input(data).await,
                ChannelMsg::WindowChange {
                    col_width,
                    row_height,
                    ..
                } => recorder.resize(*col_width, *row_height).await,
                _ => true,
            };
            if !recording.fine(wrote) {
                break;
            }
        }
        // Until the banner is shown (or never will be), only requests are
        // looked at; data passes with no extra step.
        if banner.is_some() {
            match &msg {
                ChannelMsg::RequestPty { .. } => pty = true,
                // A terminal in raw mode: lines end in CR LF.
                ChannelMsg::RequestShell { .. } => {
                    if let Some(banner) = banner.take().filter(|_| pty) {
                        let text = banner.text().replace('\n', "\r\n");
                        let _ = user.extended_data_bytes(1, text.into_bytes()).await;
                    }
                }
                // exec or a subsystem: this channel never shows it.
                ChannelMsg::Exec { .. } | ChannelMsg::RequestSubsystem { .. } => banner = None,
                _ => {}
            }
        }
        let sent: Result<(), russh::Error> = match msg {
            // Handed on, then given back to the user as window: the user can
            // never have more in flight here than one window.
            ChannelMsg::Data { data } => {
                let len = data.len();
                n += len as u64;
                usage.count_to_runner(len as u64);
                let write = std::pin::pin!(tx.data_bytes(data));
                match inbox.meanwhile(&mut rx, write).await {
                    Some(Ok(())) => user.release_window(len as u32).await,
                    Some(Err(e)) => Err(e),
                    None => continue,
                }
            }
            ChannelMsg::ExtendedData { data, ext } => {
                let len = data.len();
                n += len as u64;
                usage.count_to_runner(len as u64);
                match inbox
                    .meanwhile(&mut rx, std::pin::pin!(tx.extended_data_bytes(ext, data)))
                    .await
                {
                    Some(Ok(())) => user.release_window(len as u32).await,
                    Some(Err(e)) => Err(e),
                    None => continue,
                }
            }
            ChannelMsg::Eof => {
                eof_sent = true;
                tx.eof().await
            }
            // The runner is told the user sends nothing more (once), and
            // may still send its exit status.
            ChannelMsg::Close => {
                closed = true;
                if !eof_sent {
                    let _ = tx.eof().await;
                }
                break;
            }
            msg => match forward(msg, tx).await {
                Forwarded::Sent { want_reply } => {
                    if want_reply && !replies.expect(Due::Runner).await {
                        break;
                    }
                    Ok(())
                }
                Forwarded::Refused { want_reply } => {
                    if want_reply && !replies.expect(Due::Gateway(false)).await {
                        break;
                    }
                    Ok(())
                }
                Forwarded::Failed(e) => Err(e),
                Forwarded::Ignored => Ok(()),
            },
        };
        if sent.is_err() {
            break;
        }
    }
    (n, closed)
}

/// Whether `msg` is a channel request that wants a reply.
pub fn wants_reply(msg: &ChannelMsg) -> bool {
    match msg {
        ChannelMsg::RequestPty { want_reply, .. }
        | ChannelMsg::RequestX11 { want_reply, .. }
        | ChannelMsg::SetEnv { want_reply, .. }
        | ChannelMsg::RequestShell { want_reply }
        | ChannelMsg::Exec { want_reply, .. }
        | ChannelMsg::RequestSubsystem { want_reply, .. }
        | ChannelMsg::AgentForward { want_reply }
        | ChannelMsg::UnknownRequest { want_reply, .. } => *want_reply,
        _ => false,
    }
}

enum Forwarded {
    Sent {
        want_reply: bool,
    },
    /// Not forwarded; the gateway says no.
    Refused {
        want_reply: bool,
    },
    Failed(russh::Error),
    Ignored,
}

/// Forwards one channel request to the runner, or refuses it.
async fn forward(msg: ChannelMsg, tx: &ChannelWriteHalf<client::Msg>) -> Forwarded {
    let (want_reply, sent) = match msg {
        ChannelMsg::RequestPty {
            want_reply,
            term,
            col_width,
            row_height,
            pix_width,
            pix_height,
            terminal_modes,
        } => (
            want_reply,
            tx.request_pty(
                want_reply,
                &term,
                col_width,
                row_height,
                pix_width,
                pix_height,
                &terminal_modes,
            )
            .await,
        ),
        ChannelMsg::SetEnv {
            want_reply,
            variable_name,
            variable_value,
        } => (
            want_reply,
            tx.set_env(want_reply, variable_name, variable_value).await,
        ),
        ChannelMsg::RequestShell { want_reply } => (want_reply, tx.request_shell(want_reply).await),
        ChannelMsg::Exec {
            want_reply,
            command,
        } => (want_reply, tx.exec(want_reply, command).await),
        ChannelMsg::RequestSubsystem { want_reply, name } => {
            (want_reply, tx.request_subsystem(want_reply, name).await)
        }
        ChannelMsg::WindowChange {
            col_width,
            row_height,
            pix_width,
            pix_height,
        } => {
            let sent = tx
                .window_change(col_width, row_height, pix_width, pix_height)
                .await;
            return match sent {
                Ok(()) => Forwarded::Ignored,
                Err(e) => Forwarded::Failed(e),
            };
        }
        ChannelMsg::Signal { signal } => {
            return match tx.signal(signal).await {
                Ok(()) => Forwarded::Ignored,
                Err(e) => Forwarded::Failed(e),
            };
        }
        // X11 and agent forwarding would hand the runner (where the job's
        // code runs) a way into the user's display or keys: refused
        // (docs/decisions.md). Unknown requests are refused as OpenSSH does.
        msg @ (ChannelMsg::RequestX11 { .. }
        | ChannelMsg::AgentForward { .. }
        | ChannelMsg::UnknownRequest { .. }) => {
            return Forwarded::Refused {
                want_reply: wants_reply(&msg),
            };
        }
        _ => return Forwarded::Ignored,
    };
    match sent {
        Ok(()) => Forwarded::Sent { want_reply },
        Err(e) => Forwarded::Failed(e),
    }
}

/// Reads the runner's side until it closes; returns bytes relayed, the
/// exit status, and whether the channel was cut off rather than closed.
async fn runner_to_user(
    mut rx: ChannelReadHalf,
    tx: &ChannelWriteHalf<server::Msg>,
    runner: &ChannelWriteHalf<client::Msg>,
    handle: &server::Handle,
    replies: &Replies,
    (n, usage, recorder): (
        &std::sync::atomic::AtomicU64,
        &Usage,
        &std::sync::OnceLock<crate::recording::Recorder>,
    ),
) -> (Option<u32>, bool) {
    use std::sync::atomic::Ordering::Relaxed;
    let id = tx.id();
    let mut status = None;
    // Whether the channel ended without the runner closing it (its
    // connection is gone).
    let mut cut = true;
    while let Some(msg) = rx.wait().await {
        if let Some(recorder) = recorder.get() {
            let wrote = match &msg {
                ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. } => {
                    recorder.output(data).await
                }
                ChannelMsg::ExitStatus { exit_status } => recorder.exit(*exit_status).await,
                _ => true,
            };
            if !wrote && recorder.required {
                tracing::warn!("the session's recording failed; closing its channel");
                cut = false;
                break;
            }
        }
        let sent = match msg {
            ChannelMsg::Data { data } => {
                let len = data.len();
                n.fetch_add(len as u64, Relaxed);
                usage.count_to_user(len as u64);
                match tx.data_bytes(data).await {
                    Ok(()) => runner.release_window(len as u32).await.map_err(|_| ()),
                    Err(_) => Err(()),
                }
            }
            ChannelMsg::ExtendedData { data, ext } => {
                let len = data.len();
                n.fetch_add(len as u64, Relaxed);
                usage.count_to_user(len as u64);
                match tx.extended_data_bytes(ext, data).await {
                    Ok(()) => runner.release_window(len as u32).await.map_err(|_| ()),
                    Err(_) => Err(()),
                }
            }
            ChannelMsg::Eof => handle.eof(id).await,
            ChannelMsg::ExitStatus { exit_status } => {
                status = Some(exit_status);
                handle.exit_status_request(id, exit_status).await
            }
            ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                lang_tag,
            } => {
                handle
                    .exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag)
                    .await
            }
            ChannelMsg::Success => replies.runner_answered(true).await,
            ChannelMsg::Failure => replies.runner_answered(false).await,
            ChannelMsg::Close => {
                cut = false;
                break;
            }
            _ => Ok(()),
        };
        if sent.is_err() {
            cut = false;
            break;
        }
    }
    (status, cut)
}
