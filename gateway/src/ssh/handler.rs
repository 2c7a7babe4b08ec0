//! The russh `Handler` for one user connection: decisions come from
//! `access`, `registry` and `github`; bytes move in `channel` (job mode, one task per channel) or a
//! TCP splice (jump mode). Every refusal the user can act on is one line,
//! sent as the SSH disconnect reason (OpenSSH prints it) or as the reason of
//! a refused channel.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use russh::keys::PublicKey;
use russh::server::{self, Auth, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelOpenFailure, Disconnect, MethodKind, MethodSet};
use tracing::{debug, info, warn};

use crate::access;
use crate::ids::{GithubLogin, JobId, Target};
use crate::metrics::Refusal;
use crate::registry::{unix_now, Live, Lookup, Registration, SessionGuard, SessionInfo};
use crate::ssh::upstream::{self, RunnerConnection};
use crate::Gateway;

pub type SharedHandle = Arc<OnceLock<server::Handle>>;

/// Open channels of one connection, and of its login over all its
/// connections (shared counter, set once the login is known).
#[derive(Default)]
pub struct ChannelCount {
    conn: std::sync::atomic::AtomicUsize,
    login: OnceLock<Arc<std::sync::atomic::AtomicUsize>>,
}

impl ChannelCount {
    /// Takes a place, or says which bound is full.
    fn take(&self, per_conn: usize, per_login: usize) -> Result<(), &'static str> {
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
    fn release(&self) -> usize {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(login) = self.login.get() {
            login.fetch_sub(1, Relaxed);
        }
        self.conn.fetch_sub(1, Relaxed).saturating_sub(1)
    }
}

/// A user's identity once their key matched.
#[derive(Debug, Clone)]
struct Identity {
    login: GithubLogin,
}

/// Per-connection state. `Resolved` is what the username asked for, looked up
/// once; the key checks run against it.
enum State {
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

/// The originator port OpenSSH puts on a `-W` (stdio) forward, the channel
/// `ssh -J` opens; nothing else on such a connection will follow.
const STDIO_FORWARD_PORT: u32 = 65535;

/// The user's refusal for a channel the runner would not open: its own
/// reason code, or connect-failed.
fn runner_refusal(what: &str, e: russh::Error) -> (ChannelOpenFailure, String) {
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

/// A connection's open job-mode session channels, where notices are shown.
type NoticeChannels = Arc<std::sync::Mutex<HashSet<ChannelId>>>;

/// A channel's place in [`NoticeChannels`], for as long as its task runs.
struct Listed(NoticeChannels, ChannelId);

impl Listed {
    fn new(set: NoticeChannels, id: ChannelId) -> Listed {
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

pub struct Connection {
    gw: Arc<Gateway>,
    peer: SocketAddr,
    id: u64,
    handle: SharedHandle,
    state: State,
    runner: Option<Arc<RunnerConnection>>,
    guards: HashMap<JobId, SessionGuard>,
    /// The user's open session channels (job mode), where notices are shown.
    session_channels: NoticeChannels,
    open_channels: Arc<ChannelCount>,
    /// This connection's place among its login's connections.
    login_slot: Option<crate::limits::Slot<String>>,
    pub authenticated: Arc<std::sync::atomic::AtomicBool>,
    /// Dropped with the connection: the tasks it spawned end with it.
    alive: tokio::sync::watch::Sender<()>,
    /// What the audit trail's `session_end` reports.
    usage: Arc<crate::ssh::channel::Usage>,
    /// When the session started (job mode: authenticated; jump mode: first
    /// forward), and who it was.
    session: Option<(std::time::Instant, String)>,
    /// The username as sent, for the audit trail.
    user: String,
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
            tokio::spawn(async move {
                let _ = handle
                    .disconnect(Disconnect::ByApplication, reason, "en".into())
                    .await;
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
    async fn audit_session_start(
        &mut self,
        login: &str,
        job: JobId,
        mode: &str,
    ) -> Result<(), String> {
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

    fn audit_forward(&self, job: JobId, mode: &str, destination: &str) {
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

    /// Closes this connection with `reason` when the job is kicked.
    fn watch_kicks(&self, live: &Live) {
        let Some(handle) = self.handle.get().cloned() else {
            return;
        };
        let mut kick = live.watch_kick();
        let mut alive = self.alive.subscribe();
        let conn = self.id;
        tokio::spawn(async move {
            loop {
                let reason = kick.borrow_and_update().clone();
                if let Some(reason) = reason {
                    info!(conn, "closing: {reason}");
                    let _ = handle
                        .disconnect(
                            Disconnect::ByApplication,
                            format!("ci-gateway: {reason}"),
                            "en".into(),
                        )
                        .await;
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
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = notices.changed() => if changed.is_err() { return },
                    _ = alive.changed() => return,
                }
                let Some(line) = notices.borrow_and_update().clone() else {
                    continue;
                };
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
        match upstream::connect(&self.gw, &job, &login).await {
            Ok(runner) => {
                let runner = Arc::new(runner);
                // The runner going away ends the user's connection with a reason.
                if let Some(handle) = self.handle.get().cloned() {
                    let mut closed = runner.closed.clone();
                    let job_id = job.job_id;
                    tokio::spawn(async move {
                        if closed.wait_for(|c| *c).await.is_ok() {
                            let _ = handle
                                .disconnect(
                                    Disconnect::ByApplication,
                                    format!("ci-gateway: the runner of job {job_id} closed the connection"),
                                    "en".into(),
                                )
                                .await;
                        }
                    });
                }
                self.runner = Some(runner);
                info!(conn = self.id, job = %job.job_id, %login, "connected to runner");
            }
            Err(e) => {
                warn!(conn = self.id, job = %job.job_id, %login, "{e}");
                session.disconnect(
                    Disconnect::ByApplication,
                    &format!("ci-gateway: job {}: {e}", job.job_id),
                    "en",
                )?;
            }
        }
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(runner) = self.runner.clone() else {
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
        match self.runner.clone() {
            // Job mode: the runner's sshd dials, on the runner's side.
            Some(runner) => {
                let shown = format!("{}:{port_to_connect}", crate::audit::shown(host_to_connect));
                if let State::Job { job, .. } = &self.state {
                    self.audit_forward(job.job_id, "job", &shown);
                }
                let timeout = self.gw.config.upstream.connect_timeout;
                let (host, origin) = (host_to_connect.to_string(), originator_address.to_string());
                let open = async move {
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
            None => match self.dial_jump(host_to_connect, port_to_connect).await {
                Ok((tcp, socket)) => self.splice(channel, tcp, socket, reply),
                Err((code, reason)) => {
                    let stdio = originator_port == STDIO_FORWARD_PORT;
                    self.refuse_channel(reply, code, reason, stdio)
                }
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
        tokio::spawn(async move {
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
        let handle = self.handle.get().cloned();
        tokio::spawn(async move {
            if let (true, 0, Some(handle)) = (stdio, still_open, handle) {
                let _ = handle
                    .disconnect(
                        Disconnect::ByApplication,
                        format!("ci-gateway: {reason}"),
                        "en".into(),
                    )
                    .await;
                // A refusal sent now could overtake the disconnect and make
                // the client exit without printing the reason; the
                // disconnect ends the channel anyway.
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            reply
                .reject_with(code, format!("ci-gateway: {reason}"))
                .await;
        });
    }

    /// Jump mode: a `direct-tcpip` to `<job-id>:<port>` is connected by TCP to
    /// that job's runner, and to nothing else.
    async fn dial_jump(
        &mut self,
        host: &str,
        port: u32,
    ) -> Result<
        (tokio::net::TcpStream, tokio::sync::OwnedSemaphorePermit),
        (ChannelOpenFailure, String),
    > {
        // Refusals by policy are administratively prohibited, a full socket
        // table a resource shortage, a runner that does not answer a failed
        // connect.
        let policy = |reason: String| (ChannelOpenFailure::AdministrativelyProhibited, reason);
        let State::Jump {
            identity: Some(who),
            ..
        } = &self.state
        else {
            return Err(policy("not authenticated".into()));
        };
        let login = who.login.clone();
        let job_id = JobId::parse(host).map_err(|_| {
            policy(format!(
                "{}:{port} is not a job: the gateway only connects to job ids (ssh -J {login}@gateway runneruser@<job-id>)",
                crate::audit::shown(host)
            ))
        })?;
        let port = u16::try_from(port)
            .ok()
            .filter(|p| self.gw.config.access.jump_ports.contains(p))
            .ok_or_else(|| {
                policy(format!(
                    "port {port} is not open through the gateway (allowed: {:?})",
                    self.gw.config.access.jump_ports
                ))
            })?;
        let (job, live) = match self.gw.registry.lookup(job_id) {
            Lookup::Active(job, live) => (job, live),
            Lookup::Ended(reason) => return Err(policy(reason)),
            Lookup::Unknown => {
                return Err(policy(format!(
                    "job {job_id} is not registered with this gateway"
                )))
            }
        };
        if !access::may_enter(&job, &login, &self.gw.policy) {
            return Err(policy(format!("{login} is not allowed on job {job_id}")));
        }
        // Port 22 means the runner's registered SSH port.
        let target_port = if port == 22 { job.port } else { port };
        // The address rules again at the dial (DESIGN §4): whatever is
        // stored, the gateway never connects to itself or to metadata.
        let addr = self
            .gw
            .dialable(SocketAddr::new(job.host, target_port))
            .map_err(|e| {
                policy(format!(
                    "job {job_id}: the runner's address is refused: {e}"
                ))
            })?;
        if !self.guards.contains_key(&job_id) {
            self.audit_session_start(login.as_str(), job_id, "jump")
                .await
                .map_err(|e| policy(format!("cannot record the session ({e}); refusing it")))?;
        }
        self.audit_forward(job_id, "jump", &addr.to_string());
        let socket = self
            .gw
            .upstream_sockets
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                self.gw.metrics.refused(Refusal::UpstreamSockets);
                (ChannelOpenFailure::ResourceShortage, format!(
                    "the gateway holds its limit of {} connections to runners; try again in a minute",
                    self.gw.upstream_socket_limit
                ))
            })?;
        let timeout = self.gw.config.upstream.connect_timeout;
        let tcp = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                return Err((
                    ChannelOpenFailure::ConnectFailed,
                    format!("job {job_id}: the runner at {addr} is unreachable: {e}"),
                ))
            }
            Err(_) => {
                return Err((
                    ChannelOpenFailure::ConnectFailed,
                    format!("job {job_id}: the runner at {addr} did not answer within {timeout:?}"),
                ))
            }
        };
        let _ = tcp.set_nodelay(true);
        if let std::collections::hash_map::Entry::Vacant(slot) = self.guards.entry(job_id) {
            slot.insert(live.enter(SessionInfo {
                login: login.to_string(),
                mode: "jump",
                since: unix_now(),
            }));
            self.watch_kicks(&live);
        }
        info!(conn = self.id, %login, job = %job_id, %addr, "jump forward opened");
        Ok((tcp, socket))
    }

    /// Splices an accepted jump channel with its TCP connection to the runner.
    fn splice(
        &self,
        channel: Channel<Msg>,
        tcp: tokio::net::TcpStream,
        socket: tokio::sync::OwnedSemaphorePermit,
        reply: server::ChannelOpenHandle,
    ) {
        let Some(handle) = self.handle.get().cloned() else {
            return;
        };
        let open = self.open_channels.clone();
        let usage = self.usage.clone();
        let conn = self.id;
        tokio::spawn(async move {
            reply.accept().await;
            let moved = crate::ssh::splice::run(channel, tcp, handle, &usage).await;
            drop(socket);
            open.release();
            debug!(conn, ?moved, "jump forward closed");
        });
    }
}
