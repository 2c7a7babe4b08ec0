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
use crate::registry::{unix_now, SessionInfo};
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
        let target = access::jump(host, port, &login, &self.gw.policy, |id| {
            registry.lookup(id)
        })
        .map_err(|e| policy(e.to_string()))?;
        let job_id = target.job.job_id;
        // The address rules again at the dial (DESIGN §4): whatever is
        // stored, the gateway never connects to itself or to metadata.
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
        if !self.guards.contains_key(&job_id) {
            self.audit_session_start(login.as_str(), job_id, "jump")
                .await
                .map_err(|e| policy(format!("cannot record the session ({e}); refusing it")))?;
        }
        self.audit_forward(job_id, "jump", &addr.to_string());
        if let std::collections::hash_map::Entry::Vacant(slot) = self.guards.entry(job_id) {
            slot.insert(target.live.enter(SessionInfo {
                login: login.to_string(),
                mode: "jump",
                since: unix_now(),
            }));
            self.watch_kicks(&target.live);
        }
        info!(conn = self.id, %login, job = %job_id, %addr, "jump forward");
        Ok(Dial {
            job_id,
            addr,
            socket,
        })
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
        let usage = self.usage.clone();
        let conn = self.id;
        let timeout = self.gw.config.upstream.connect_timeout;
        self.gw.tasks.spawn("jump forward", async move {
            let Dial {
                job_id,
                addr,
                socket,
            } = dial;
            let refused =
                match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
                    Ok(Ok(tcp)) => {
                        let _ = tcp.set_nodelay(true);
                        reply.accept().await;
                        let moved = crate::ssh::splice::run(channel, tcp, handle, &usage).await;
                        drop(socket);
                        open.release();
                        debug!(conn, ?moved, "jump forward closed");
                        return;
                    }
                    Ok(Err(e)) => format!("job {job_id}: the runner at {addr} is unreachable: {e}"),
                    Err(_) => format!(
                        "job {job_id}: the runner at {addr} did not answer within {timeout:?}"
                    ),
                };
            drop(socket);
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
    addr: SocketAddr,
    /// Its place among the gateway's upstream sockets.
    socket: tokio::sync::OwnedSemaphorePermit,
}
