//! Jump mode's channels: a `direct-tcpip` to `<job-id>:<port>` is decided
//! by [`access::jump`], recorded and counted on its job in the callback,
//! then dialed and spliced with the user's channel in the channel's task.

use std::net::SocketAddr;

use russh::server::{self, Msg};
use russh::{Channel, ChannelOpenFailure};
use tracing::{debug, info};

use crate::access;
use crate::ids::JobId;
use crate::metrics::Refusal;
use crate::registry::{unix_now, Lookup, SessionInfo};
use crate::ssh::handler::{Connection, State};
use crate::ssh::open::refuse;

impl Connection {
    /// Jump mode: a `direct-tcpip` to `<job-id>:<port>` goes to that job's
    /// runner and to nothing else ([`access::jump`] decides). Records the
    /// session and counts it on the job (a connecting forward keeps the
    /// runner held, as in job mode); the dial is the channel task's.
    pub(super) async fn jump_target(
        &mut self,
        host: &str,
        port: u32,
    ) -> Result<Dial, (ChannelOpenFailure, String)> {
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
        let registry = &self.gw.registry;
        if let Ok(id) = crate::ids::JobId::parse(host) {
            registry.lookup_fresh(id).await;
        }
        let target = match access::jump(host, port, &login, &self.gw.policy, |id| {
            registry.lookup(id)
        }) {
            Ok(target) => target,
            // A person a role admits gets job mode, where the gateway checks
            // the role at login (DESIGN §3); the runner's sshd cannot.
            Err(access::JumpRefused::NotAllowed { who, job }) => {
                let repository = match registry.lookup(job) {
                    Lookup::Active(reg, _) => reg.repository.clone(),
                    _ => None,
                };
                let roles = self
                    .gw
                    .keys
                    .roles(&self.gw.policy, repository.as_deref())
                    .await;
                let refused = if roles.people.contains(&who) {
                    access::JumpRefused::RoleOnly { who, job }
                } else {
                    access::JumpRefused::NotAllowed { who, job }
                };
                return Err(policy(refused.to_string()));
            }
            Err(e) => return Err(policy(e.to_string())),
        };
        let job_id = target.job.job_id;
        if !self.gw.config.recording.allow_jump {
            return Err(policy(format!(
                "this gateway records every session and jump mode is end to end, so it is off \
                 (recording.allow_jump = false): use ssh {job_id}@<gateway>"
            )));
        }
        let far = if target.job.tunnel {
            // Never dialed: the agent opens the port on the runner's side
            // (22 is its sshd there), if it allows it.
            let link = crate::ssh::relay::tunnel_of(&self.gw, job_id, &target.live)
                .await
                .ok_or_else(|| {
                    (
                        ChannelOpenFailure::ConnectFailed,
                        format!("job {job_id}: {}", crate::ssh::tunnel::TunnelError::Down),
                    )
                })?;
            let port = u16::try_from(port).unwrap_or(22);
            Far::Tunnel { link, port }
        } else {
            self.far_by_dial(job_id, &target)?
        };
        if !self.guards.contains_key(&job_id) {
            self.audit_session_start(login.as_str(), job_id, "jump")
                .await
                .map_err(|e| policy(format!("cannot record the session ({e}); refusing it")))?;
        }
        let shown = far.to_string();
        self.audit_forward(job_id, "jump", &shown);
        if let std::collections::hash_map::Entry::Vacant(slot) = self.guards.entry(job_id) {
            slot.insert(target.live.enter(SessionInfo {
                id: self.session_id.clone(),
                login: login.to_string(),
                mode: "jump",
                since: unix_now(),
            }));
            self.watch_kicks(&target.live);
        }
        info!(conn = self.id, %login, job = %job_id, to = %shown, "jump forward");
        Ok(Dial { job_id, far })
    }

    /// A dialed runner's address (the address rules again at the dial,
    /// DESIGN §4: whatever is stored, the gateway never connects to itself
    /// or to metadata) and its place among the upstream sockets.
    fn far_by_dial(
        &self,
        job_id: JobId,
        target: &access::JumpTarget,
    ) -> Result<Far, (ChannelOpenFailure, String)> {
        let policy = |reason: String| (ChannelOpenFailure::AdministrativelyProhibited, reason);
        let addr = self
            .gw
            .dialable(SocketAddr::new(target.job.host, target.port))
            .map_err(|e| {
                policy(format!(
                    "job {job_id}: the runner's address is refused: {e}"
                ))
            })?;
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
        Ok(Far::Tcp { addr, socket })
    }

    /// Dials a jump forward's runner in the channel's own task, then
    /// splices the two; or refuses the channel with the reason.
    pub(super) fn dial_and_splice(
        &self,
        channel: Channel<Msg>,
        dial: Dial,
        reply: server::ChannelOpenHandle,
        stdio: bool,
    ) {
        let Some(handle) = self.handle.get().cloned() else {
            return;
        };
        let open = self.open_channels.clone();
        let _ = self.usage.flow.set(self.gw.metrics.flow("jump"));
        let usage = self.usage.clone();
        let conn = self.id;
        let timeout = self.gw.config.upstream.connect_timeout;
        let gw = self.gw.clone();
        self.gw.tasks.spawn("jump forward", async move {
            let Dial { job_id, far } = dial;
            let refused = match far {
                Far::Tunnel { link, port } => match link.open(&gw, port, timeout).await {
                    Ok(pipe) => {
                        reply.accept().await;
                        let (r, w) = tokio::io::split(pipe);
                        let far = (crate::ssh::splice::Reads(r), w);
                        let moved =
                            crate::ssh::splice::run(channel, far, Some(handle.clone()), &usage)
                                .await;
                        let still_open = open.release();
                        debug!(conn, ?moved, "jump forward through a tunnel closed");
                        // An `ssh -J` whose tunnel dropped hears why.
                        if stdio
                            && still_open == 0
                            && crate::ssh::tunnel::dropped(&mut link.watch_down()).await
                        {
                            let reason = crate::ssh::tunnel::dropped_line(job_id);
                            crate::ssh::open::say_goodbye(&handle, reason).await;
                        }
                        return;
                    }
                    Err(e) => format!("job {job_id}: {e}"),
                },
                Far::Tcp { addr, socket } => {
                    let dialed =
                        tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr));
                    match dialed.await {
                        Ok(Ok(tcp)) => {
                            let _ = tcp.set_nodelay(true);
                            reply.accept().await;
                            let far = tcp.into_split();
                            let moved =
                                crate::ssh::splice::run(channel, far, Some(handle), &usage).await;
                            drop(socket);
                            open.release();
                            debug!(conn, ?moved, "jump forward closed");
                            return;
                        }
                        Ok(Err(e)) => {
                            format!("job {job_id}: the runner at {addr} is unreachable: {e}")
                        }
                        Err(_) => format!(
                            "job {job_id}: the runner at {addr} did not answer within {timeout:?}"
                        ),
                    }
                }
            };
            let still_open = open.release();
            info!(conn, "channel refused: {refused}");
            let disconnect = (stdio && still_open == 0).then_some(handle);
            refuse(
                reply,
                ChannelOpenFailure::ConnectFailed,
                refused,
                disconnect,
            )
            .await;
        });
    }
}

/// A jump forward the policy allowed, about to be dialed.
pub(super) struct Dial {
    job_id: JobId,
    far: Far,
}

/// Where a jump forward goes.
enum Far {
    /// A runner the gateway dials, with the forward's place among the
    /// gateway's upstream sockets.
    Tcp {
        addr: SocketAddr,
        socket: tokio::sync::OwnedSemaphorePermit,
    },
    /// A port on the runner's side of its tunnel.
    Tunnel {
        link: std::sync::Arc<crate::ssh::tunnel::TunnelLink>,
        port: u16,
    },
}

impl std::fmt::Display for Far {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Far::Tcp { addr, .. } => addr.fmt(f),
            Far::Tunnel { port, .. } => write!(f, "tunnel:{port}"),
        }
    }
}
