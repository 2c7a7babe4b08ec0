//! The gateway's side of a runner's reverse tunnel (DESIGN §10).
//!
//! The agent of a `--tunnel` registration logs in to the gateway's SSH port
//! as `tunnel+<job-id>` with the job's token (it pinned the gateway's host
//! keys from the registration response); its connection becomes the job's
//! [`TunnelLink`]. The gateway reaches the runner only through it: it opens
//! `forwarded-tcpip` channels that name a port and nothing else (22 means
//! the runner's sshd), and the agent maps them to its own loopback and
//! refuses every port it was not told to open. Job mode runs its SSH client
//! to the runner's sshd over such a channel ([`stream`]), with the same
//! pinned host keys and per-job certificate as a dialed runner; jump mode
//! splices the user's channel with one.

use std::time::Duration;

use russh::server::{self, Msg};
use russh::{Channel, ChannelOpenFailure};
use tokio::sync::watch;

use crate::ssh::splice;
use crate::Gateway;

/// How much an in-memory pipe between a tunnel channel and the SSH client
/// running over it holds (its flow control is the channel's window).
const PIPE: usize = 256 * 1024;

/// The agent's connection that holds a job's tunnel.
pub struct TunnelLink {
    /// The gateway's id of the connection.
    pub conn: u64,
    /// When it authenticated (Unix seconds).
    pub since: u64,
    path: Path,
    down: watch::Receiver<bool>,
}

/// Where the tunnel's channels open: on the agent's connection to this
/// replica, or through another replica that holds it (`ssh::relay`).
enum Path {
    Local(server::Handle),
    Relay(crate::ssh::relay::Relay),
}

impl std::fmt::Debug for TunnelLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelLink")
            .field("conn", &self.conn)
            .field("since", &self.since)
            .finish_non_exhaustive()
    }
}

/// Why a tunnel channel did not open; each is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("the runner's tunnel is down (its agent reconnects by itself); try again in a minute")]
    Down,
    #[error("the runner's agent refuses port {0}: it opens only the sshd and the ports the gateway allows")]
    Refused(u16),
    #[error("nothing answers on port {0} on the runner's side")]
    NotListening(u16),
    #[error("the runner's agent did not open port {0} within {1:?}")]
    Timeout(u16, Duration),
    #[error("the runner's agent could not open port {0}: {1}")]
    Failed(u16, String),
}

impl TunnelLink {
    /// `down` becomes `true` when the connection ends.
    pub fn new(conn: u64, handle: server::Handle, down: watch::Receiver<bool>) -> TunnelLink {
        TunnelLink {
            conn,
            since: crate::registry::unix_now(),
            path: Path::Local(handle),
            down,
        }
    }

    /// The job's tunnel as another replica holds it, reached through
    /// `relay` (its end is the relay connection's end).
    pub(crate) fn relayed(relay: crate::ssh::relay::Relay) -> TunnelLink {
        TunnelLink {
            conn: 0,
            since: crate::registry::unix_now(),
            down: relay.watch_closed(),
            path: Path::Relay(relay),
        }
    }

    /// Whether this is the agent's own connection to this replica.
    pub fn is_local(&self) -> bool {
        matches!(self.path, Path::Local(_))
    }

    pub fn watch_down(&self) -> watch::Receiver<bool> {
        self.down.clone()
    }

    /// Opens a byte stream to `port` on the runner's side (22: its sshd).
    pub async fn open(
        &self,
        gw: &Gateway,
        port: u16,
        timeout: Duration,
    ) -> Result<tokio::io::DuplexStream, TunnelError> {
        match &self.path {
            Path::Local(_) => Ok(stream(gw, self.open_channel(port, timeout).await?)),
            Path::Relay(relay) => relay.open(gw, port, timeout).await,
        }
    }

    /// Opens a `forwarded-tcpip` channel to `port` on the agent's
    /// connection (a local tunnel only).
    pub async fn open_channel(
        &self,
        port: u16,
        timeout: Duration,
    ) -> Result<Channel<Msg>, TunnelError> {
        let Path::Local(handle) = &self.path else {
            return Err(TunnelError::Down);
        };
        if *self.down.borrow() {
            return Err(TunnelError::Down);
        }
        let opened =
            handle.channel_open_forwarded_tcpip("localhost", u32::from(port), "ci-gateway", 0);
        opened_within(port, timeout, opened, &self.down).await
    }

    /// Closes the agent's connection with `reason` (it was replaced, or the
    /// job ended).
    pub async fn disconnect(&self, reason: &str) {
        if let Path::Local(handle) = &self.path {
            crate::ssh::open::say_goodbye(handle, format!("ci-gateway: {reason}")).await;
        }
    }
}

/// A channel to `port` opened within `timeout`, or why not (`down`: the
/// connection carrying it ended meanwhile).
pub(crate) async fn opened_within<T>(
    port: u16,
    timeout: Duration,
    opened: impl std::future::Future<Output = Result<T, russh::Error>>,
    down: &watch::Receiver<bool>,
) -> Result<T, TunnelError> {
    match tokio::time::timeout(timeout, opened).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(russh::Error::ChannelOpenFailure(code))) => Err(match code {
            ChannelOpenFailure::AdministrativelyProhibited => TunnelError::Refused(port),
            ChannelOpenFailure::ConnectFailed => TunnelError::NotListening(port),
            other => TunnelError::Failed(port, format!("{other:?}")),
        }),
        Ok(Err(_)) if *down.borrow() => Err(TunnelError::Down),
        Ok(Err(e)) => Err(TunnelError::Failed(port, e.to_string())),
        Err(_) => Err(TunnelError::Timeout(port, timeout)),
    }
}

/// What a user whose session went through a tunnel that dropped reads.
pub fn dropped_line(job: crate::ids::JobId) -> String {
    format!(
        "ci-gateway: the tunnel to job {job}'s runner dropped; its agent reconnects by itself: \
         connect again in a minute"
    )
}

/// Whether the tunnel behind `down` dropped, within a moment: its end is
/// seen just after the streams through it end.
pub async fn dropped(down: &mut watch::Receiver<bool>) -> bool {
    let seen = tokio::time::timeout(Duration::from_secs(1), down.wait_for(|d| *d)).await;
    matches!(seen, Ok(Ok(_)))
}

/// A tunnel channel as a byte stream for an SSH client or a splice: a task
/// splices the channel with one end of an in-memory pipe. Flow control stays
/// end to end: the channel's window is given back only once the bytes were
/// taken from the pipe, so a slow reader holds back the agent's sshd, not
/// the tunnel connection's other channels.
pub fn stream<S>(gw: &Gateway, channel: Channel<S>) -> tokio::io::DuplexStream
where
    S: From<(russh::ChannelId, russh::ChannelMsg)> + Send + Sync + 'static,
{
    let (near, far) = tokio::io::duplex(PIPE);
    gw.tasks.spawn("tunnel pipe", async move {
        let (r, w) = tokio::io::split(far);
        let usage = crate::ssh::channel::Usage::default();
        splice::run(channel, (splice::Reads(r), w), None, &usage).await;
    });
    near
}

impl crate::ssh::handler::Connection {
    /// An agent proved its job: its connection becomes the job's tunnel
    /// (replacing one the gateway has not yet seen die), and ends when the
    /// job does.
    pub(super) fn attach_tunnel(&mut self) {
        use crate::ssh::handler::State;
        let State::Tunnel {
            job, live, down, ..
        } = &self.state
        else {
            return;
        };
        let Some(handle) = self.handle.get().cloned() else {
            return;
        };
        let (job_id, live) = (job.job_id, live.clone());
        let link = std::sync::Arc::new(TunnelLink::new(self.id, handle, down.subscribe()));
        let replaced = live.attach_tunnel(link);
        tracing::info!(conn = self.id, peer = %self.peer, job = %job_id, replaced = ?replaced.as_ref().map(|l| l.conn), "tunnel up");
        self.gw.audit.record(
            "tunnel_up",
            serde_json::json!({
                "conn": self.id,
                "job": job_id.to_string(),
                "source": self.peer.to_string(),
                "replaced_conn": replaced.as_ref().map(|l| l.conn),
            }),
        );
        if let Some(old) = replaced {
            self.gw.tasks.spawn("tunnel replaced", async move {
                old.disconnect("a newer tunnel connection of this job replaced this one")
                    .await;
            });
        }
        self.watch_kicks(&live);
    }

    /// The connection ends: the tunnel's users are told, and the job has no
    /// tunnel until the agent reconnects.
    pub(super) fn detach_tunnel(&self) {
        use crate::ssh::handler::State;
        let State::Tunnel {
            job,
            live,
            down,
            proven: true,
        } = &self.state
        else {
            return;
        };
        down.send_replace(true);
        if live.detach_tunnel(self.id) {
            tracing::info!(conn = self.id, job = %job.job_id, "tunnel down");
            self.gw.audit.record(
                "tunnel_down",
                serde_json::json!({
                    "conn": self.id,
                    "job": job.job_id.to_string(),
                }),
            );
        }
    }
}

impl crate::ssh::handler::Connection {
    /// Another replica's channel to `port` of `job`'s runner: opened on the
    /// tunnel this replica holds, for the sshd (22) or a port jump mode
    /// allows, and spliced. The user's session is counted and audited on the
    /// replica they reached.
    pub(super) fn serve_relay(
        &self,
        channel: Channel<Msg>,
        job: crate::ids::JobId,
        port: u32,
        reply: server::ChannelOpenHandle,
    ) {
        let gw = self.gw.clone();
        let open = self.open_channels.clone();
        let usage = self.usage.clone();
        let conn = self.id;
        self.gw.tasks.spawn("tunnel relay", async move {
            let allowed = u16::try_from(port)
                .ok()
                .filter(|p| *p == 22 || gw.policy.jump_ports.contains(p));
            let link = match gw.registry.lookup(job) {
                crate::registry::Lookup::Active(_, live) => live.tunnel().filter(|l| l.is_local()),
                _ => None,
            };
            let refused = match (allowed, link) {
                (None, _) => Some((
                    ChannelOpenFailure::AdministrativelyProhibited,
                    format!("port {port} is not open through the gateway"),
                )),
                (_, None) => Some((
                    ChannelOpenFailure::ConnectFailed,
                    format!("job {job}: {}", TunnelError::Down),
                )),
                (Some(port), Some(link)) => {
                    let timeout = gw.config.upstream.connect_timeout;
                    match link.open(&gw, port, timeout).await {
                        Ok(pipe) => {
                            reply.accept().await;
                            let (r, w) = tokio::io::split(pipe);
                            splice::run(channel, (splice::Reads(r), w), None, &usage).await;
                            open.release();
                            return;
                        }
                        Err(e) => {
                            Some((ChannelOpenFailure::ConnectFailed, format!("job {job}: {e}")))
                        }
                    }
                }
            };
            open.release();
            if let Some((code, reason)) = refused {
                tracing::info!(conn, "relay channel refused: {reason}");
                reply
                    .reject_with(code, format!("ci-gateway: {reason}"))
                    .await;
            }
        });
    }
}
