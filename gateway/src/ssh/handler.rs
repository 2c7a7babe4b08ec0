//! The russh `Handler` for one user connection, kept thin: the connection's
//! state, and each callback handing off at once. Authentication is in
//! `auth`, what lasts as long as the connection (audit records, the runner
//! login, kick and notice watchers) in `session`; job-mode channels are
//! relayed in `channel` (one task per channel) and jump-mode forwards in
//! `jump`. Every refusal the user can act on is one line, sent as the SSH
//! disconnect reason (OpenSSH prints it) or as the reason of a refused
//! channel.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use russh::server::{self, Auth, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelOpenFailure};
use tracing::{debug, info};

use crate::ids::{GithubLogin, JobId};
use crate::metrics::Refusal;
use crate::registry::{Live, Registration, SessionGuard};
use crate::ssh::open::{
    refuse, runner_for_channel, runner_refusal, ChannelCount, Listed, NoticeChannels,
    STDIO_FORWARD_PORT,
};
use crate::ssh::upstream::RunnerLink;
use crate::Gateway;

pub type SharedHandle = Arc<OnceLock<server::Handle>>;

/// A job-mode channel's runner side, and the tunnel it runs through if any.
pub(super) struct Upstream {
    channel: Channel<russh::client::Msg>,
    tunnel: Option<(tokio::sync::watch::Receiver<bool>, String)>,
}

impl Upstream {
    fn of(
        runner: &crate::ssh::upstream::RunnerConnection,
        channel: Channel<russh::client::Msg>,
    ) -> Upstream {
        Upstream {
            channel,
            tunnel: runner
                .tunnel_down
                .clone()
                .map(|down| (down, crate::ssh::tunnel::dropped_line(runner.job))),
        }
    }
}

/// A user's identity once their key matched.
#[derive(Debug, Clone)]
pub(super) struct Identity {
    pub(super) login: GithubLogin,
}

/// Per-connection state. `Resolved` is what the username asked for, looked up
/// once; the key checks run against it.
pub(super) enum State {
    Fresh,
    Refused,
    Job {
        job: Arc<Registration>,
        live: Arc<Live>,
        identity: Option<Identity>,
    },
    Jump {
        login: GithubLogin,
        identity: Option<Identity>,
    },
    /// A runner's agent that will hold `job`'s tunnel once its job token
    /// matched (`proven`); `down` tells the users of the tunnel it ended.
    Tunnel {
        job: Arc<Registration>,
        live: Arc<Live>,
        proven: bool,
        down: tokio::sync::watch::Sender<bool>,
    },
    /// Another replica relaying to `job`'s tunnel, which this one holds;
    /// `proven` once it showed the replicas' shared host key.
    Relay {
        job: JobId,
        proven: bool,
    },
}

pub struct Connection {
    pub(super) gw: Arc<Gateway>,
    pub(super) peer: SocketAddr,
    pub(super) id: u64,
    pub(super) handle: SharedHandle,
    pub(super) state: State,
    /// Job mode: the runner connection, as it comes up in its own task.
    pub(super) runner: Option<RunnerLink>,
    pub(super) guards: HashMap<JobId, SessionGuard>,
    /// The user's open session channels (job mode), where notices are shown.
    pub(super) session_channels: NoticeChannels,
    pub(super) open_channels: Arc<ChannelCount>,
    /// This connection's place among its login's connections.
    pub(super) login_slot: Option<crate::limits::Slot<String>>,
    pub authenticated: Arc<std::sync::atomic::AtomicBool>,
    /// Dropped with the connection: the tasks it spawned end with it.
    pub(super) alive: tokio::sync::watch::Sender<()>,
    /// What the audit trail's `session_end` reports.
    pub(super) usage: Arc<crate::ssh::channel::Usage>,
    /// When the session started (job mode: authenticated; jump mode: first
    /// forward), and who it was.
    pub(super) session: Option<(std::time::Instant, String)>,
    /// The username as sent, for the audit trail.
    pub(super) user: String,
    /// What the audit trail, `admin sessions` and the recording call this
    /// connection once it is a session.
    pub(super) session_id: String,
    /// Its place in the replica's session directory (from session start).
    pub(super) listed: Option<crate::registry::directory::Listed>,
    /// The authentication banner the next refusal carries (why the key was
    /// refused), and how many refusals were explained so far.
    pub(super) refusal_banner: Option<String>,
    pub(super) refusals_explained: u8,
}

impl Connection {
    pub fn new(gw: Arc<Gateway>, peer: SocketAddr, id: u64, handle: SharedHandle) -> Connection {
        Connection {
            gw,
            peer,
            id,
            handle,
            state: State::Fresh,
            runner: None,
            guards: HashMap::new(),
            session_channels: Default::default(),
            open_channels: Default::default(),
            login_slot: None,
            authenticated: Default::default(),
            alive: tokio::sync::watch::Sender::new(()),
            usage: Default::default(),
            session: None,
            user: String::new(),
            session_id: crate::registry::directory::new_session_id(),
            listed: None,
            refusal_banner: None,
            refusals_explained: 0,
        }
    }

    fn take_channel_slot(&self) -> bool {
        let ssh = &self.gw.config.ssh;
        match self
            .open_channels
            .take(ssh.max_channels_per_connection, ssh.max_channels_per_login)
        {
            Ok(()) => true,
            Err(which) => {
                self.gw.metrics.refused(Refusal::Channels);
                info!(
                    conn = self.id,
                    "channel refused: this {which} holds its maximum of channels"
                );
                false
            }
        }
    }
}

impl server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        self.resolve(user).await;
        Ok(self.rejection())
    }

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        Ok(self.password(user, password).await)
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.offered(user, offer).await)
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.verified(user, key).await)
    }

    async fn auth_rejection_banner(&mut self) -> Result<Option<String>, Self::Error> {
        Ok(self.refusal_banner.take())
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        self.admit(session).await
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(link) = self.runner.clone() else {
            // Jump mode: a session channel lists the login's jobs.
            let (State::Jump { login, .. }, Some(handle)) = (&self.state, self.handle.get()) else {
                reply
                    .reject(ChannelOpenFailure::AdministrativelyProhibited)
                    .await;
                return Ok(());
            };
            if !self.take_channel_slot() {
                reply.reject(ChannelOpenFailure::ResourceShortage).await;
                return Ok(());
            }
            let (gw, login, handle) = (self.gw.clone(), login.clone(), handle.clone());
            let open_channels = self.open_channels.clone();
            self.gw.tasks.spawn("job listing", async move {
                reply.accept().await;
                crate::ssh::listing::serve(gw, login, channel, handle).await;
                open_channels.release();
            });
            return Ok(());
        };
        if !self.take_channel_slot() {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        // Opened on the runner by the channel's own task: this callback
        // returns at once, so other channels and keepalives go on.
        let timeout = self.gw.config.upstream.connect_timeout;
        let notices = Some(self.session_channels.clone());
        let banner = match (&self.state, &self.session) {
            (State::Job { job, live, .. }, Some((_, login))) => Some(crate::ssh::listing::Banner {
                gw: self.gw.clone(),
                job: job.clone(),
                live: live.clone(),
                login: login.clone(),
            }),
            _ => None,
        };
        let record = self.recording_plan();
        self.relay(channel, reply, (notices, banner, record), async move {
            let runner = runner_for_channel(link).await?;
            match tokio::time::timeout(timeout, runner.handle.channel_open_session()).await {
                Ok(Ok(up)) => Ok(Upstream::of(&runner, up)),
                Ok(Err(e)) => Err(runner_refusal("a session", e)),
                Err(_) => Err((
                    ChannelOpenFailure::ConnectFailed,
                    format!("the runner did not open a session within {timeout:?}"),
                )),
            }
        });
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if !self.take_channel_slot() {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        if let State::Relay { job, proven } = self.state {
            if proven {
                self.serve_relay(channel, job, port_to_connect, reply);
            } else {
                self.open_channels.release();
                reply
                    .reject(ChannelOpenFailure::AdministrativelyProhibited)
                    .await;
            }
            return Ok(());
        }
        let stdio = originator_port == STDIO_FORWARD_PORT;
        match self.runner.clone() {
            // Job mode: the runner's sshd dials, on the runner's side.
            Some(link) => {
                let shown = format!("{}:{port_to_connect}", crate::audit::shown(host_to_connect));
                if let State::Job { job, .. } = &self.state {
                    self.audit_forward(job.job_id, "job", &shown);
                }
                let timeout = self.gw.config.upstream.connect_timeout;
                let (host, origin) = (host_to_connect.to_string(), originator_address.to_string());
                let open = async move {
                    let runner = runner_for_channel(link).await?;
                    let opened = runner.handle.channel_open_direct_tcpip(
                        host,
                        port_to_connect,
                        origin,
                        originator_port,
                    );
                    match tokio::time::timeout(timeout, opened).await {
                        Ok(Ok(up)) => Ok(Upstream::of(&runner, up)),
                        Ok(Err(e)) => Err(runner_refusal(&shown, e)),
                        Err(_) => Err((
                            ChannelOpenFailure::ConnectFailed,
                            format!("the runner did not open {shown} within {timeout:?}"),
                        )),
                    }
                };
                self.relay(channel, reply, (None, None, None), open);
            }
            // Jump mode: the decision here, the dial in the channel's task.
            None => match self.jump_target(host_to_connect, port_to_connect).await {
                Ok(target) => self.dial_and_splice(channel, target, reply, stdio),
                Err((code, reason)) => self.refuse_channel(reply, code, reason, stdio),
            },
        }
        Ok(())
    }
}

impl Connection {
    /// How a job-mode session channel is recorded if it asks for a pty
    /// (`None` with recording off).
    fn recording_plan(&self) -> Option<crate::recording::Plan> {
        let config = &self.gw.config.recording;
        let (State::Job { job, .. }, Some((_, login))) = (&self.state, &self.session) else {
            return None;
        };
        config.enabled.then(|| crate::recording::Plan {
            dir: self.gw.config.recording_dir(),
            session: self.session_id.clone(),
            job: job.job_id.to_string(),
            login: login.clone(),
            input: config.record_input,
            required: config.required,
            tasks: self.gw.tasks.clone(),
        })
    }

    /// Opens the runner's side of a job-mode channel (`open`), then accepts
    /// the user's and relays the two in one task ([`crate::ssh::channel`]);
    /// or refuses the user's with the runner's reason. A session channel is
    /// listed in `notices` (hold warnings are shown there) while it is open.
    fn relay<F>(
        &self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        (notices, banner, record): (
            Option<NoticeChannels>,
            Option<crate::ssh::listing::Banner>,
            Option<crate::recording::Plan>,
        ),
        open: F,
    ) where
        F: std::future::Future<Output = Result<Upstream, (ChannelOpenFailure, String)>>
            + Send
            + 'static,
    {
        let Some(handle) = self.handle.get().cloned() else {
            return;
        };
        let open_channels = self.open_channels.clone();
        let usage = self.usage.clone();
        let conn = self.id;
        // Boxed: the open is done with before the relay starts, and a
        // captured future keeps its place in the task for the task's life.
        let open = Box::pin(open);
        self.gw.tasks.spawn("job channel", async move {
            let up = match open.await {
                Ok(up) => up,
                Err((code, reason)) => {
                    open_channels.release();
                    info!(conn, "channel refused: {reason}");
                    reply
                        .reject_with(code, format!("ci-gateway: {reason}"))
                        .await;
                    return;
                }
            };
            reply.accept().await;
            let _listed = notices.map(|set| Listed::new(set, channel.id()));
            let (user_rx, user_tx) = channel.split();
            let (runner_rx, runner_tx) = up.channel.split();
            let bytes = crate::ssh::channel::run(
                crate::ssh::channel::Ends {
                    user_rx,
                    user_tx,
                    user_handle: handle,
                    runner_rx,
                    runner_tx,
                    tunnel: up.tunnel,
                    banner,
                    record,
                },
                &usage,
            )
            .await;
            open_channels.release();
            debug!(conn, to_runner = bytes.to_runner, to_user = bytes.to_user, exit_status = ?bytes.exit_status, "channel closed");
        });
    }

    /// Refuses a channel the user asked for with `code` and the reason as
    /// its text; the connection carries on. An `ssh -J` connection
    /// (`stdio`: OpenSSH's `-W`, whose only channel this is) also gets the
    /// reason as its disconnect message, the line OpenSSH shows plainly.
    fn refuse_channel(
        &self,
        reply: server::ChannelOpenHandle,
        code: ChannelOpenFailure,
        reason: String,
        stdio: bool,
    ) {
        let still_open = self.open_channels.release();
        info!(conn = self.id, "channel refused: {reason}");
        let disconnect = self
            .handle
            .get()
            .cloned()
            .filter(|_| stdio && still_open == 0);
        self.gw
            .tasks
            .spawn("channel refusal", refuse(reply, code, reason, disconnect));
    }
}
