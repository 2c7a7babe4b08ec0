//! The russh `Handler` for one user connection: decisions come from
//! `access`, `registry` and `github`; bytes move in `channel` (job mode, one task per channel) or a
//! TCP splice (jump mode). Every refusal the user can act on is one line,
//! sent as the SSH disconnect reason (OpenSSH prints it) or as the reason of
//! a refused channel.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use russh::keys::PublicKey;
use russh::server::{self, Auth, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelOpenFailure, Disconnect, MethodKind, MethodSet};
use tracing::{debug, info, warn};

use crate::access;
use crate::ids::{GithubLogin, JobId, Target};
use crate::metrics::Refusal;
use crate::registry::{unix_now, Live, Lookup, Registration, SessionGuard, SessionInfo};
use crate::ssh::open::{
    refuse, runner_for_channel, runner_refusal, say_goodbye, show_notice, ChannelCount, Listed,
    NoticeChannels, STDIO_FORWARD_PORT,
};
use crate::ssh::upstream::{self, RunnerLink};
use crate::Gateway;

pub type SharedHandle = Arc<OnceLock<server::Handle>>;

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
}

impl Drop for Connection {
    fn drop(&mut self) {
        let Some((started, login)) = self.session.take() else {
            return;
        };
        let usage = self.usage.total();
        let (mode, jobs): (&str, Vec<String>) = match &self.state {
            State::Job { job, .. } => ("job", vec![job.job_id.to_string()]),
            _ => ("jump", self.guards.keys().map(|j| j.to_string()).collect()),
        };
        self.gw.audit.record(
            "session_end",
            serde_json::json!({
                "conn": self.id,
                "login": login,
                "mode": mode,
                "jobs": jobs,
                "source": self.peer.to_string(),
                "bytes_to_runner": usage.to_runner,
                "bytes_to_user": usage.to_user,
                "duration_seconds": started.elapsed().as_secs_f64(),
                "exit_status": usage.exit_status,
            }),
        );
    }
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
        }
    }

    /// Sends the disconnect with `reason` once the session loop is free.
    fn disconnect_later(&self, reason: String) {
        if let Some(handle) = self.handle.get().cloned() {
            self.gw.tasks.spawn("ssh disconnect", async move {
                say_goodbye(&handle, reason).await;
            });
        }
    }

    /// Parses the username and looks the job up, once per connection.
    fn resolve(&mut self, user: &str) {
        if !matches!(self.state, State::Fresh) {
            return;
        }
        self.user = crate::audit::shown(user);
        if let Err(blocked) = self.gw.auth_limits.check(self.peer.ip(), user) {
            self.gw.metrics.refused(blocked.kind());
            info!(conn = self.id, peer = %self.peer, "refused: {blocked}");
            self.disconnect_later(format!("ci-gateway: {blocked}"));
            self.state = State::Refused;
            return;
        }
        let refuse = |this: &mut Self, reason: String| {
            // Guessing job ids or sending garbage spends the failure budget.
            let _ = this.gw.auth_limits.failed(this.peer.ip(), user);
            info!(conn = this.id, peer = %this.peer, "refused: {reason}");
            this.gw.audit.record(
                "refused",
                serde_json::json!({
                    "conn": this.id,
                    "source": this.peer.to_string(),
                    "user": this.user,
                    "reason": reason,
                }),
            );
            this.disconnect_later(format!("ci-gateway: {reason}"));
            this.state = State::Refused;
        };
        match Target::parse_user(user) {
            Err(e) => refuse(
                self,
                format!("bad username: {e}; use <job-id>@gateway or <github-login>@gateway"),
            ),
            Ok(Target::Jump(login)) => {
                self.state = State::Jump {
                    login,
                    identity: None,
                }
            }
            Ok(Target::Job(job)) => match self.gw.registry.lookup(job) {
                Lookup::Active(job, live) => {
                    self.state = State::Job {
                        job,
                        live,
                        identity: None,
                    }
                }
                Lookup::Ended(reason) => refuse(self, reason),
                Lookup::Unknown => refuse(
                    self,
                    format!("job {job} is not registered with this gateway (unknown job id, or the job has not started yet)"),
                ),
            },
        }
    }

    /// Whose key is `key`, among the people this connection may be.
    async fn identify(&self, key: &PublicKey) -> Option<GithubLogin> {
        let candidates = match &self.state {
            State::Job { job, .. } => access::allowed_people(job, &self.gw.policy),
            // The login is the peer's choice: a lookup GitHub must answer
            // (not cached) spends the source's lookup budget, so made-up
            // names cannot spend the gateway's GitHub rate limit.
            State::Jump { login, .. } => {
                if !self.gw.keys.is_fresh(login).await {
                    if let Some(wait) = self.gw.github_lookups.spend(self.peer.ip()) {
                        self.gw.metrics.refused(Refusal::GithubLookups);
                        warn!(conn = self.id, peer = %self.peer, "GitHub key lookup refused: this source is over its budget for {}s", wait.as_secs());
                        return None;
                    }
                }
                vec![login.clone()]
            }
            State::Fresh | State::Refused => return None,
        };
        for login in candidates {
            match self.gw.keys.keys(&login).await {
                Ok(keys) if keys.iter().any(|k| crate::keys::same_key(k, key)) => {
                    return Some(login)
                }
                Ok(_) => {}
                Err(e) => warn!(conn = self.id, "{e}"),
            }
        }
        None
    }

    /// Writes `session_start` durably; the session proceeds only after that.
    pub(super) async fn audit_session_start(
        &mut self,
        login: &str,
        job: JobId,
        mode: &str,
    ) -> Result<(), crate::audit::AuditError> {
        self.gw
            .audit
            .record_durable(
                "session_start",
                serde_json::json!({
                    "conn": self.id,
                    "login": login,
                    "job": job.to_string(),
                    "mode": mode,
                    "source": self.peer.to_string(),
                }),
            )
            .await?;
        if self.session.is_none() {
            self.session = Some((std::time::Instant::now(), login.to_string()));
        }
        Ok(())
    }

    pub(super) fn audit_forward(&self, job: JobId, mode: &str, destination: &str) {
        let login = self.session.as_ref().map(|(_, l)| l.as_str());
        self.gw.audit.record(
            "forward",
            serde_json::json!({
                "conn": self.id,
                "login": login,
                "job": job.to_string(),
                "mode": mode,
                "destination": destination,
            }),
        );
    }

    /// Counts a failed login; once the source or username is out of budget
    /// the connection is closed with the reason.
    fn spend_failure(&mut self, user: &str) {
        if let Err(blocked) = self.gw.auth_limits.failed(self.peer.ip(), user) {
            self.gw.metrics.refused(blocked.kind());
            info!(conn = self.id, peer = %self.peer, "closing: {blocked}");
            self.gw.audit.record(
                "rate_limited",
                serde_json::json!({
                    "conn": self.id,
                    "source": self.peer.to_string(),
                    "user": self.user,
                    "reason": blocked.to_string(),
                }),
            );
            self.disconnect_later(format!("ci-gateway: {blocked}"));
            self.state = State::Refused;
        }
    }

    /// Records an authentication attempt (the key's fingerprint, never the key).
    fn audit_auth(&self, result: &str, key: &PublicKey, login: Option<&GithubLogin>) {
        self.gw.audit.record(
            "auth",
            serde_json::json!({
                "conn": self.id,
                "result": result,
                "source": self.peer.to_string(),
                "user": self.user,
                "login": login.map(|l| l.as_str()),
                "key_type": key.algorithm().as_str(),
                "key_fingerprint": crate::keys::fingerprint(key).to_string(),
            }),
        );
    }

    fn reject() -> Auth {
        Auth::Reject {
            proceed_with_methods: Some(MethodSet::from(&[MethodKind::PublicKey][..])),
            partial_success: false,
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

    /// Logs in to `job`'s runner in a task of its own; channels wait for it
    /// in theirs. A runner that cannot be reached, or that goes away later,
    /// ends the user's connection with the reason.
    fn connect_runner(&mut self, job: Arc<Registration>, login: String) {
        let (outcome, link) = tokio::sync::watch::channel(None);
        self.runner = Some(RunnerLink(link));
        let Some(handle) = self.handle.get().cloned() else {
            return;
        };
        let gw = self.gw.clone();
        let mut alive = self.alive.subscribe();
        let conn = self.id;
        self.gw.tasks.spawn("runner login", async move {
            let job_id = job.job_id;
            let connected = tokio::select! {
                connected = upstream::connect(&gw, &job, &login) => connected,
                // The user left first: nothing to connect for.
                _ = alive.changed() => return,
            };
            let reason = match connected {
                Ok(runner) => {
                    info!(conn, job = %job_id, %login, "connected to runner");
                    let mut closed = runner.closed.clone();
                    outcome.send_replace(Some(Ok(Arc::new(runner))));
                    tokio::select! {
                        closed = closed.wait_for(|c| *c) => match closed {
                            Ok(_) => format!("ci-gateway: the runner of job {job_id} closed the connection"),
                            Err(_) => return,
                        },
                        _ = alive.changed() => return,
                    }
                }
                Err(e) => {
                    warn!(conn, job = %job_id, %login, "{e}");
                    // The disconnect first: its reason is the line OpenSSH
                    // prints, and a channel refusal sent before it could
                    // end the client without it.
                    let reason = format!("ci-gateway: job {job_id}: {e}");
                    say_goodbye(&handle, reason).await;
                    outcome.send_replace(Some(Err(Arc::new(e))));
                    return;
                }
            };
            say_goodbye(&handle, reason).await;
        });
    }

    /// Closes this connection with `reason` when the job is kicked.
    pub(super) fn watch_kicks(&self, live: &Live) {
        let Some(handle) = self.handle.get().cloned() else {
            return;
        };
        let mut kick = live.watch_kick();
        let mut alive = self.alive.subscribe();
        let conn = self.id;
        self.gw.tasks.spawn("kick watch", async move {
            loop {
                let reason = kick.borrow_and_update().clone();
                if let Some(reason) = reason {
                    info!(conn, "closing: {reason}");
                    say_goodbye(&handle, format!("ci-gateway: {reason}")).await;
                    return;
                }
                tokio::select! {
                    changed = kick.changed() => if changed.is_err() { return },
                    _ = alive.changed() => return,
                }
            }
        });
    }

    /// Shows the job's notices (hold warnings) on this connection's session
    /// channels, as stderr lines: visible on a terminal, and outside the data
    /// stream of scp, sftp and other protocols.
    fn watch_notices(&self, live: &Live) {
        let Some(handle) = self.handle.get().cloned() else {
            return;
        };
        let mut notices = live.watch_notices();
        let mut alive = self.alive.subscribe();
        let channels = self.session_channels.clone();
        self.gw.tasks.spawn("notice watch", async move {
            loop {
                tokio::select! {
                    changed = notices.changed() => if changed.is_err() { return },
                    _ = alive.changed() => return,
                }
                let Some(line) = notices.borrow_and_update().clone() else {
                    continue;
                };
                show_notice(&handle, &channels, &line).await;
            }
        });
    }
}

impl server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        self.resolve(user);
        Ok(Self::reject())
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        self.resolve(user);
        if crate::ssh::is_sha1_rsa(offer.algorithm) && !self.gw.config.ssh.allow_sha1_rsa {
            debug!(
                conn = self.id,
                "ssh-rsa (SHA-1) offer refused; rsa-sha2-256/512 are taken"
            );
            return Ok(Self::reject());
        }
        Ok(match self.identify(offer.public_key).await {
            Some(_) => Auth::Accept,
            None => {
                if !matches!(self.state, State::Refused) {
                    self.audit_auth("key_not_accepted", offer.public_key, None);
                    self.spend_failure(user);
                }
                Self::reject()
            }
        })
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        self.resolve(user);
        if crate::ssh::is_sha1_rsa(key.algorithm) && !self.gw.config.ssh.allow_sha1_rsa {
            info!(conn = self.id, peer = %self.peer, "ssh-rsa (SHA-1) signature refused");
            return Ok(Self::reject());
        }
        let Some(login) = self.identify(key.public_key).await else {
            info!(conn = self.id, peer = %self.peer, user, key = %crate::keys::fingerprint(key.public_key), "authentication failed");
            self.audit_auth("failure", key.public_key, None);
            self.spend_failure(user);
            return Ok(Self::reject());
        };
        let who = Identity {
            login: login.clone(),
        };
        match &mut self.state {
            State::Job { identity, .. } | State::Jump { identity, .. } => *identity = Some(who),
            State::Fresh | State::Refused => return Ok(Self::reject()),
        }
        info!(conn = self.id, peer = %self.peer, %login, user, key = %crate::keys::fingerprint(key.public_key), "authenticated");
        self.audit_auth("success", key.public_key, Some(&login));
        Ok(Auth::Accept)
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        self.authenticated
            .store(true, std::sync::atomic::Ordering::Relaxed);
        // One login's connections are bounded (each may hold channels and
        // upstream sockets), so one person cannot take the gateway's share.
        let who = match &self.state {
            State::Job { identity, .. } | State::Jump { identity, .. } => {
                identity.as_ref().map(|i| i.login.to_string())
            }
            State::Fresh | State::Refused => None,
        };
        if let Some(login) = who {
            let max = self.gw.config.ssh.max_connections_per_login;
            match self.gw.logins.take(login.to_lowercase(), max) {
                Some(slot) => {
                    self.login_slot = Some(slot);
                    let _ = self.open_channels.login.set(self.gw.login_channels(&login));
                }
                None => {
                    self.gw.metrics.refused(Refusal::LoginConnections);
                    info!(conn = self.id, %login, "refused: {max} connections of this login are open");
                    session.disconnect(
                        Disconnect::ByApplication,
                        &format!(
                            "ci-gateway: {login} already has {max} connections open through the gateway; close some and try again"
                        ),
                        "en",
                    )?;
                    self.state = State::Refused;
                    return Ok(());
                }
            }
        }
        let State::Job {
            job,
            live,
            identity,
        } = &self.state
        else {
            return Ok(());
        };
        let (job, live) = (job.clone(), live.clone());
        let login = identity
            .as_ref()
            .map(|i| i.login.to_string())
            .unwrap_or_default();
        // On disk before anything reaches the runner.
        if let Err(e) = self.audit_session_start(&login, job.job_id, "job").await {
            session.disconnect(
                Disconnect::ByApplication,
                &format!("ci-gateway: cannot record the session ({e}); refusing it"),
                "en",
            )?;
            return Ok(());
        }
        // Counted from now on: an open connection keeps the runner held even
        // while it is still connecting or only forwarding ports.
        self.guards.insert(
            job.job_id,
            live.enter(SessionInfo {
                login: login.clone(),
                mode: "job",
                since: unix_now(),
            }),
        );
        self.watch_kicks(&live);
        self.watch_notices(&live);
        self.connect_runner(job, login);
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(link) = self.runner.clone() else {
            // Jump mode serves forwards only.
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
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
        self.relay(channel, reply, notices, async move {
            let runner = runner_for_channel(link).await?;
            match tokio::time::timeout(timeout, runner.handle.channel_open_session()).await {
                Ok(Ok(up)) => Ok(up),
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
                        Ok(Ok(up)) => Ok(up),
                        Ok(Err(e)) => Err(runner_refusal(&shown, e)),
                        Err(_) => Err((
                            ChannelOpenFailure::ConnectFailed,
                            format!("the runner did not open {shown} within {timeout:?}"),
                        )),
                    }
                };
                self.relay(channel, reply, None, open);
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
    /// Opens the runner's side of a job-mode channel (`open`), then accepts
    /// the user's and relays the two in one task ([`crate::ssh::channel`]);
    /// or refuses the user's with the runner's reason. A session channel is
    /// listed in `notices` (hold warnings are shown there) while it is open.
    fn relay<F>(
        &self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        notices: Option<NoticeChannels>,
        open: F,
    ) where
        F: std::future::Future<
                Output = Result<Channel<russh::client::Msg>, (ChannelOpenFailure, String)>,
            > + Send
            + 'static,
    {
        let Some(handle) = self.handle.get().cloned() else {
            return;
        };
        let open_channels = self.open_channels.clone();
        let usage = self.usage.clone();
        let conn = self.id;
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
            let (runner_rx, runner_tx) = up.split();
            let bytes = crate::ssh::channel::run(
                crate::ssh::channel::Ends {
                    user_rx,
                    user_tx,
                    user_handle: handle,
                    runner_rx,
                    runner_tx,
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
