//! `runner register --tunnel`: the agent's end of the reverse tunnel
//! (DESIGN §10), for runners the gateway cannot dial (NAT, Kubernetes pods,
//! hosted runners).
//!
//! A background process (`runner tunnel`, started by `register`) keeps one
//! SSH connection to the gateway's SSH port:
//! - it pins the gateway's host keys from the registration response (which
//!   came over the API's HTTPS or a pinned CA) and logs in as
//!   `tunnel+<job-id>` with the job token, so both ends are proven;
//! - the gateway opens `forwarded-tcpip` channels naming a port; the agent
//!   maps 22 to the runner's sshd on loopback and the ports both sides allow
//!   (3389 by default) to loopback too, and refuses everything else, so a
//!   compromised gateway cannot use the runner as a pivot into its network;
//! - every other kind of channel the gateway might open is refused;
//! - when the connection drops it reconnects with exponential backoff and
//!   jitter, until the job ends at the gateway or its state file is gone.
//!
//! The far end is one function ([`Routes::dial`]): an SSH server inside the
//! agent, for runners without sshd, would take the sshd's place there.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use russh::client::{self, Msg};
use russh::keys::{PublicKey, PublicKeyOrCertificate};
use russh::{Channel, ChannelOpenFailure};
use tokio::sync::watch;

use super::*;
use crate::api::TunnelInfo;

/// Channels the agent holds open at once; more are refused (the gateway
/// bounds its users' channels, this bounds the gateway).
const MAX_CHANNELS: usize = 256;
/// A local dial that takes longer has nothing listening worth waiting for.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Each step of a connection attempt (TCP, handshake, login).
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
const KEEPALIVE: Duration = Duration::from_secs(15);
/// In `auto`, how long the SSH port gets before the WebSocket is tried.
const AUTO_SSH_PATIENCE: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A connection that lasted this long resets the backoff.
const STABLE: Duration = Duration::from_secs(60);

/// What the tunnel process needs, kept in the state file by `register`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct TunnelState {
    pub(super) info: TunnelInfo,
    /// Where the agent connects (the gateway's published SSH address, or
    /// `--tunnel-ssh`).
    pub(super) ssh_address: String,
    /// Where on this machine the far end connects (`--tunnel-host`).
    #[serde(default = "loopback")]
    pub(super) local_host: std::net::IpAddr,
    /// The runner's sshd, on `local_host`.
    pub(super) sshd_port: u16,
    /// The other ports the agent opens (on loopback): those both the
    /// gateway and `--tunnel-port` allow.
    pub(super) ports: Vec<u16>,
    /// How the SSH stream reaches the gateway.
    #[serde(default)]
    pub(super) transport: Transport,
}

/// How the tunnel's SSH stream reaches the gateway.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// The SSH port first; the WebSocket when it cannot be reached (and
    /// from then on, while the WebSocket works).
    #[default]
    Auto,
    /// The gateway's SSH port only.
    Ssh,
    /// A WebSocket on the API's port (`/v1/jobs/{id}/tunnel`), through
    /// `HTTPS_PROXY` if set: for networks where only HTTPS leaves.
    Websocket,
}

/// A connected byte stream to the gateway's SSH server.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}
type Stream = Box<dyn Io>;

/// A TCP connection to the gateway's SSH port.
async fn over_ssh_port(state: &TunnelState, patience: Duration) -> Result<Stream, String> {
    match tokio::time::timeout(patience, tokio::net::TcpStream::connect(&state.ssh_address)).await {
        Err(_) => Err(format!("{}: connect timed out", state.ssh_address)),
        Ok(Err(e)) => Err(format!("{}: {e}", state.ssh_address)),
        Ok(Ok(tcp)) => {
            let _ = tcp.set_nodelay(true);
            Ok(Box::new(tcp))
        }
    }
}

/// The SSH stream in a WebSocket on the API's port.
async fn over_websocket(api: &Api, job: &str) -> Result<Stream, String> {
    use tokio_tungstenite::tungstenite::Message;
    let ws = api
        .websocket(&format!("/v1/jobs/{job}/tunnel"))
        .await
        .map_err(|e| format!("WebSocket to {}: {e}", api.base()))?;
    let (stream, pump) = crate::wsbridge::pipe(ws, Message::Binary, |m| match m {
        Message::Binary(bytes) => crate::wsbridge::Frame::Data(bytes),
        Message::Close(_) => crate::wsbridge::Frame::Close,
        _ => crate::wsbridge::Frame::Other,
    });
    tokio::spawn(pump);
    Ok(Box::new(stream))
}

/// The stream for one attempt, by `transport`; `Auto` learns which works.
async fn connect(
    state: &TunnelState,
    api: &Api,
    job: &str,
    learned: &mut Option<Transport>,
) -> Result<Stream, String> {
    match learned.unwrap_or(state.transport) {
        Transport::Ssh => over_ssh_port(state, STEP_TIMEOUT).await,
        Transport::Websocket => over_websocket(api, job).await,
        Transport::Auto => {
            match over_ssh_port(state, AUTO_SSH_PATIENCE).await {
                Ok(stream) => Ok(stream),
                Err(ssh) => {
                    eprintln!("the SSH port is out of reach ({ssh}); trying the WebSocket on the API port");
                    let stream = over_websocket(api, job)
                        .await
                        .map_err(|ws| format!("{ssh}; and {ws}"))?;
                    *learned = Some(Transport::Websocket);
                    Ok(stream)
                }
            }
        }
    }
}

fn loopback() -> std::net::IpAddr {
    std::net::Ipv4Addr::LOCALHOST.into()
}

/// Where the gateway's channels may go on the runner's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Routes {
    host: std::net::IpAddr,
    sshd_port: u16,
    ports: Vec<u16>,
}

impl Routes {
    pub(super) fn of(state: &TunnelState) -> Routes {
        Routes {
            host: state.local_host,
            sshd_port: state.sshd_port,
            ports: state.ports.clone(),
        }
    }

    /// The local address for a channel to `port`, or `None`: refused. Pure.
    pub(super) fn local(&self, port: u32) -> Option<SocketAddr> {
        let port = u16::try_from(port).ok()?;
        let local = if port == 22 {
            self.sshd_port
        } else if self.ports.contains(&port) {
            port
        } else {
            return None;
        };
        Some(SocketAddr::new(self.host, local))
    }

    /// Connects to `addr` on this machine (the far end of a channel).
    async fn dial(addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
        let tcp = tokio::time::timeout(DIAL_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))??;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }
}

/// The ports the agent opens besides the sshd: those the gateway allows
/// (`offered`) that `wanted` names too. Pure.
pub(super) fn agreed_ports(offered: &[u16], wanted: &[u16]) -> Vec<u16> {
    let mut ports: Vec<u16> = wanted
        .iter()
        .copied()
        .filter(|p| *p != 22 && offered.contains(p))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The russh client handler of the tunnel connection.
struct Agent {
    pinned: Vec<PublicKey>,
    mismatch: Arc<AtomicBool>,
    routes: Routes,
    channels: Arc<tokio::sync::Semaphore>,
    /// The gateway's disconnect message, if it sent one.
    goodbye: Arc<Mutex<Option<String>>>,
    closed: watch::Sender<bool>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.closed.send_replace(true);
    }
}

async fn refuse(reply: client::ChannelOpenHandle, what: &str) {
    eprintln!("refused a {what} channel from the gateway: the tunnel carries only forwarded-tcpip");
    reply
        .reject_with(
            ChannelOpenFailure::AdministrativelyProhibited,
            format!("ci-gateway agent: no {what} channels through a tunnel"),
        )
        .await;
}

impl client::Handler for Agent {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let ok = crate::keys::is_pinned(&self.pinned, key);
        if !ok {
            self.mismatch.store(true, Relaxed);
        }
        Ok(ok)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        _connected_address: &str,
        connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let Some(addr) = self.routes.local(connected_port) else {
            eprintln!(
                "refused the gateway's channel to port {connected_port}: this tunnel opens only the sshd (22) and {:?}",
                self.routes.ports
            );
            reply
                .reject_with(
                    ChannelOpenFailure::AdministrativelyProhibited,
                    format!(
                        "ci-gateway agent: port {connected_port} is not open through this tunnel"
                    ),
                )
                .await;
            return Ok(());
        };
        let Ok(slot) = self.channels.clone().try_acquire_owned() else {
            reply
                .reject_with(
                    ChannelOpenFailure::ResourceShortage,
                    format!("ci-gateway agent: {MAX_CHANNELS} channels are open"),
                )
                .await;
            return Ok(());
        };
        // The dial and the bytes in a task of their own: this callback
        // returns at once, so keepalives and other channels go on.
        tokio::spawn(async move {
            match Routes::dial(addr).await {
                Ok(tcp) => {
                    reply.accept().await;
                    let usage = crate::ssh::channel::Usage::default();
                    crate::ssh::splice::run(channel, tcp.into_split(), None, &usage).await;
                }
                Err(e) => {
                    eprintln!("the gateway's channel to {addr}: {e}");
                    reply
                        .reject_with(
                            ChannelOpenFailure::ConnectFailed,
                            format!("ci-gateway agent: {addr}: {e}"),
                        )
                        .await;
                }
            }
            drop(slot);
        });
        Ok(())
    }

    async fn server_channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse(reply, "session").await;
        Ok(())
    }

    async fn server_channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        _host: &str,
        _port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse(reply, "direct-tcpip").await;
        Ok(())
    }

    async fn server_channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse(reply, "x11").await;
        Ok(())
    }

    async fn server_channel_open_agent_forward(
        &mut self,
        _channel: Channel<Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse(reply, "agent").await;
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse(reply, "streamlocal").await;
        Ok(())
    }

    async fn server_channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        _socket_path: &str,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        refuse(reply, "streamlocal").await;
        Ok(())
    }

    async fn disconnected(
        &mut self,
        reason: client::DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        if let client::DisconnectReason::ReceivedDisconnect(info) = &reason {
            *self.goodbye.lock().unwrap_or_else(|e| e.into_inner()) = Some(info.message.clone());
        }
        self.closed.send_replace(true);
        match reason {
            client::DisconnectReason::ReceivedDisconnect(_) => Ok(()),
            client::DisconnectReason::Error(e) => Err(e),
        }
    }
}

/// How one tunnel connection ended.
#[derive(Debug)]
enum Ended {
    /// It never came up: the gateway refused the job token, or its host key
    /// did not match; `goodbye` is the gateway's reason if it sent one.
    Refused(String),
    /// It was up, then dropped (`goodbye`: the gateway's reason, if any).
    Dropped(Option<String>),
    /// The network or the handshake failed.
    Failed(String),
    /// The state file is gone: deregistered.
    Deregistered,
}

/// Connects, logs in and serves the tunnel until it ends. `up` is told
/// once the tunnel is up.
async fn hold_once(
    state: &TunnelState,
    token: &Secret<String>,
    path: &Path,
    stream: Stream,
    up: &mut dyn FnMut(),
) -> Ended {
    let pinned: Vec<PublicKey> = state
        .info
        .host_keys
        .iter()
        .filter_map(|k| crate::keys::parse_public_key(k).ok())
        .collect();
    if pinned.is_empty() {
        return Ended::Refused("the registration response named no gateway host key".into());
    }
    let mismatch = Arc::new(AtomicBool::new(false));
    let goodbye = Arc::new(Mutex::new(None));
    let (closed_tx, mut closed) = watch::channel(false);
    let agent = Agent {
        pinned,
        mismatch: mismatch.clone(),
        routes: Routes::of(state),
        channels: Arc::new(tokio::sync::Semaphore::new(MAX_CHANNELS)),
        goodbye: goodbye.clone(),
        closed: closed_tx,
    };
    let said = |g: &Arc<Mutex<Option<String>>>| g.lock().unwrap_or_else(|e| e.into_inner()).take();
    let config = Arc::new(crate::ssh::upstream::client_config(KEEPALIVE));
    let handshake = client::connect_stream(config, stream, agent);
    let mut handle = match tokio::time::timeout(STEP_TIMEOUT, handshake).await {
        Err(_) => return Ended::Failed("the SSH handshake timed out".into()),
        Ok(Err(_)) if mismatch.load(Relaxed) => {
            return Ended::Refused(format!(
                "the gateway at {} presented a host key that is not the one the registration \
                 named; refusing to connect",
                state.ssh_address
            ))
        }
        Ok(Err(e)) => {
            return match said(&goodbye) {
                Some(reason) => Ended::Refused(reason),
                None => Ended::Failed(format!("SSH handshake: {e}")),
            }
        }
        Ok(Ok(handle)) => handle,
    };
    let login = handle.authenticate_password(state.info.user.clone(), token.expose().clone());
    match tokio::time::timeout(STEP_TIMEOUT, login).await {
        Err(_) => return Ended::Failed("the login timed out".into()),
        Ok(Err(e)) => {
            return match said(&goodbye) {
                Some(reason) => Ended::Refused(reason),
                None => Ended::Failed(format!("login: {e}")),
            }
        }
        Ok(Ok(result)) if !result.success() => {
            return Ended::Refused("the gateway refused the job token".into())
        }
        Ok(Ok(_)) => {}
    }
    up();
    let mut check = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = closed.wait_for(|c| *c) => return Ended::Dropped(said(&goodbye)),
            _ = check.tick() => {
                if read_state(path).is_none() {
                    let _ = handle
                        .disconnect(russh::Disconnect::ByApplication, "deregistered", "en")
                        .await;
                    return Ended::Deregistered;
                }
            }
        }
    }
}

/// The wait before the next attempt: `base` with up to a third of jitter,
/// so agents that lost the gateway together do not return together.
fn jittered(base: Duration) -> Duration {
    let third = (base.as_millis() as u64 / 3).max(1);
    base + Duration::from_millis(rand::random::<u64>() % third)
}

/// `runner tunnel` (started by `register --tunnel`): holds the job's tunnel
/// until the job ends at the gateway or is deregistered.
pub(super) async fn tunnel(common: Common) -> Result<ExitCode, Failure> {
    let job = job_id(&common).await?;
    let path = state_path(&common, &job)?;
    let Some(state) = read_state(&path).filter(|s| s.job_token.is_some()) else {
        eprintln!("no state file with a job token: stopping");
        return Ok(ExitCode::FAILURE);
    };
    let Some(tunnel) = state.tunnel.clone() else {
        eprintln!("job {job} was not registered with --tunnel: stopping");
        return Ok(ExitCode::FAILURE);
    };
    let token = Secret::new(state.job_token.clone().unwrap_or_default());
    let api = job_api(&common, Some(&state))?;
    let mut backoff = BACKOFF_MIN;
    let mut learned = None;
    loop {
        let started = tokio::time::Instant::now();
        let ended = match connect(&tunnel, &api, &job, &mut learned).await {
            Ok(stream) => {
                let shown = match learned.unwrap_or(tunnel.transport) {
                    Transport::Websocket => format!("in a WebSocket to {}", api.base()),
                    Transport::Ssh | Transport::Auto => format!("to {}", tunnel.ssh_address),
                };
                let mut said_up = || eprintln!("tunnel up, {shown}");
                hold_once(&tunnel, &token, &path, stream, &mut said_up).await
            }
            Err(e) => Ended::Failed(e),
        };
        match &ended {
            Ended::Deregistered => {
                eprintln!("deregistered: stopping");
                return Ok(ExitCode::SUCCESS);
            }
            Ended::Dropped(reason) => eprintln!(
                "tunnel dropped: {}",
                reason.as_deref().unwrap_or("the connection ended")
            ),
            Ended::Refused(reason) => eprintln!("tunnel refused: {reason}"),
            Ended::Failed(reason) => eprintln!("tunnel failed: {reason}"),
        }
        if read_state(&path).is_none() {
            eprintln!("state file gone: stopping");
            return Ok(ExitCode::SUCCESS);
        }
        // A job that ended at the gateway is not coming back.
        match api.get(&job, None).await {
            Err(e) if matches!(e.status().map(|s| s.as_u16()), Some(404 | 410)) => {
                eprintln!("job {job} ended at the gateway: stopping");
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) if matches!(e.status().map(|s| s.as_u16()), Some(401 | 403)) => {
                eprintln!("the gateway refuses this job's token ({e}): stopping");
                return Ok(ExitCode::FAILURE);
            }
            _ => {}
        }
        if started.elapsed() >= STABLE {
            backoff = BACKOFF_MIN;
        }
        // What `auto` learned holds while it works; a failure asks again.
        if matches!(ended, Ended::Failed(_)) {
            learned = None;
        }
        let pause = jittered(backoff);
        eprintln!("reconnecting in {:.1}s", pause.as_secs_f64());
        tokio::time::sleep(pause).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_sshd_and_agreed_ports_are_routed_to_loopback() {
        let routes = Routes {
            host: loopback(),
            sshd_port: 2022,
            ports: agreed_ports(&[3389, 5900], &[3389, 8080, 22]),
        };
        assert_eq!(routes.ports, vec![3389]);
        assert_eq!(
            routes.local(22),
            Some("127.0.0.1:2022".parse().expect("addr"))
        );
        assert_eq!(
            routes.local(3389),
            Some("127.0.0.1:3389".parse().expect("addr"))
        );
        // What the gateway allows but this agent did not ask for, what
        // neither allows, and the sshd's real port asked for directly.
        for refused in [5900, 8080, 2022, 0, 65536, u32::MAX] {
            assert_eq!(routes.local(refused), None, "{refused}");
        }
    }

    #[test]
    fn backoff_jitter_stays_within_a_third() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(3));
            assert!(
                d >= Duration::from_secs(3) && d < Duration::from_secs(4),
                "{d:?}"
            );
        }
    }
}
