//! The gateway's SSH client to a runner (job mode): pinned host keys (the ones
//! the runner registered, no trust on first use), authentication with a
//! short-lived certificate from the gateway's CA whose only principal names
//! the job, or with the key made for that one job (Windows, dropbear;
//! DESIGN §2, §9), the address rules before the connect, and a timeout on
//! every step.

use std::sync::Arc;
use std::time::Duration;

use russh::client;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use tokio::sync::watch;

use crate::registry::{Lookup, Registration, RunnerLogin};
use crate::ssh::tunnel::{TunnelError, TunnelLink};
use crate::Gateway;

/// Why the runner could not be reached; each is one line for the user.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the runner at {0} is unreachable: {1}")]
    Unreachable(String, String),
    #[error("the runner at {0} presented a host key that does not match the keys it registered; refusing to connect")]
    HostKeyMismatch(String),
    #[error("the runner at {0} refused the gateway's login as {1:?}: {2}")]
    AuthRefused(String, String, &'static str),
    #[error("the runner's address is refused: {0}")]
    Forbidden(crate::address::Refused),
    #[error("the gateway holds its limit of {0} connections to runners; try again in a minute")]
    Busy(usize),
    #[error("the runner at {0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("the gateway lets {1} logins at a time through to the runner at {0} (so its sshd does not drop them) and this one waited {2:?} in line; try again")]
    Throttled(String, usize, Duration),
    #[error("the runner at {0} closed the connection before the SSH handshake, twice ({1}); its sshd may be refusing new connections (MaxStartups)")]
    DroppedTwice(String, String),
    #[error("the connection to the runner was given up")]
    Gone,
    #[error("could not sign a login certificate: {0}")]
    Certificate(String),
    #[error("{0}")]
    Tunnel(crate::ssh::tunnel::TunnelError),
}

/// What the gateway keeps one line of runner logins per: a dialed address,
/// or a job's tunnel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RunnerKey {
    Addr(std::net::SocketAddr),
    Tunnel(crate::ids::JobId),
}

/// How the gateway reaches a runner's sshd.
enum Via {
    Dial(std::net::SocketAddr),
    Tunnel(Arc<TunnelLink>),
}

/// The russh client handler: checks the host key, reports the end.
pub struct Runner {
    pinned: Vec<PublicKey>,
    mismatch: Arc<std::sync::atomic::AtomicBool>,
    closed: watch::Sender<bool>,
}

impl client::Handler for Runner {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        // Host certificates are not part of the registration contract.
        let ok = crate::keys::is_pinned(&self.pinned, key);
        if !ok {
            self.mismatch
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(ok)
    }

    async fn disconnected(
        &mut self,
        _reason: client::DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        self.closed.send_replace(true);
        Ok(())
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.closed.send_replace(true);
    }
}

/// An authenticated connection to a runner.
pub struct RunnerConnection {
    pub handle: client::Handle<Runner>,
    /// Becomes `true` when the runner's side of the connection ends.
    pub closed: watch::Receiver<bool>,
    /// Through a tunnel: becomes `true` when the tunnel drops.
    pub tunnel_down: Option<watch::Receiver<bool>>,
    pub job: crate::ids::JobId,
    /// This connection's place among the gateway's upstream sockets.
    _socket: tokio::sync::OwnedSemaphorePermit,
}

/// How a job-mode connection's runner comes up: the login to the runner
/// runs in its own task after the user's authentication, and each channel's
/// task waits here for its outcome (no callback of the user's connection
/// waits on the network).
pub type Outcome = Option<Result<Arc<RunnerConnection>, Arc<UpstreamError>>>;

/// The waiting side of [`Outcome`]; cheap to clone into channel tasks.
#[derive(Clone)]
pub struct RunnerLink(pub watch::Receiver<Outcome>);

impl RunnerLink {
    /// The runner connection once it is up, or why it will not be.
    pub async fn get(mut self) -> Result<Arc<RunnerConnection>, Arc<UpstreamError>> {
        match self.0.wait_for(Option::is_some).await {
            Ok(outcome) => outcome
                .clone()
                .unwrap_or_else(|| Err(Arc::new(UpstreamError::Gone))),
            Err(_) => Err(Arc::new(UpstreamError::Gone)),
        }
    }
}

pub fn client_config(keepalive: Duration) -> client::Config {
    client::Config {
        // Large windows keep a long fat pipe full; flow control still holds
        // end to end because the channel task only reads what it can forward.
        // With consumption-driven grants a peer has at most one window in
        // flight per channel; the queue holds that many full packets and
        // more, so the session loop does not wait on it for a well-behaved peer.
        window_size: 2 * 1024 * 1024,
        maximum_packet_size: 32768,
        channel_buffer_size: 1024,
        inactivity_timeout: None,
        keepalive_interval: Some(keepalive),
        keepalive_max: 3,
        nodelay: true,
        preferred: russh::Preferred {
            kex: std::borrow::Cow::Borrowed(crate::ssh::KEX),
            cipher: std::borrow::Cow::Borrowed(crate::ssh::UPSTREAM_CIPHERS),
            ..russh::Preferred::DEFAULT
        },
        ..Default::default()
    }
}

/// How one attempt at the runner's SSH handshake failed.
enum Handshake {
    /// Closed or reset before the handshake was through, as sshd does to
    /// connections past its `MaxStartups`: worth one more try.
    Dropped(String),
    Timeout,
    Mismatch,
    Failed(String),
    Tunnel(TunnelError),
}

impl Handshake {
    fn into_error(self, shown: &str, timeout: Duration) -> UpstreamError {
        match self {
            Handshake::Dropped(e) | Handshake::Failed(e) => {
                UpstreamError::Unreachable(shown.to_string(), e)
            }
            Handshake::Timeout => UpstreamError::Timeout(shown.to_string(), timeout),
            Handshake::Mismatch => UpstreamError::HostKeyMismatch(shown.to_string()),
            Handshake::Tunnel(e) => UpstreamError::Tunnel(e),
        }
    }
}

/// Whether `e` is the peer going away mid-handshake (not a refusal of ours).
fn dropped(e: &russh::Error) -> bool {
    use std::io::ErrorKind::*;
    match e {
        russh::Error::Disconnect => true,
        russh::Error::IO(e) => matches!(
            e.kind(),
            ConnectionReset | ConnectionAborted | UnexpectedEof | BrokenPipe
        ),
        _ => false,
    }
}

type Connected = (client::Handle<Runner>, watch::Receiver<bool>);

/// One way to the runner's sshd (a TCP connect, or a tunnel channel), then
/// the SSH handshake over it (to the host key check).
async fn attempt(
    gw: &Gateway,
    via: &Via,
    pinned: &[PublicKey],
    timeout: Duration,
) -> Result<Connected, Handshake> {
    match via {
        Via::Dial(addr) => {
            let tcp =
                match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
                    Err(_) => return Err(Handshake::Timeout),
                    Ok(Err(e)) => return Err(Handshake::Failed(e.to_string())),
                    Ok(Ok(tcp)) => tcp,
                };
            let _ = tcp.set_nodelay(true);
            handshake(gw, tcp, pinned, timeout).await
        }
        Via::Tunnel(link) => {
            let stream = link
                .open(gw, 22, timeout)
                .await
                .map_err(Handshake::Tunnel)?;
            handshake(gw, stream, pinned, timeout).await
        }
    }
}

/// The SSH handshake with the runner's sshd over `stream`.
async fn handshake<S>(
    gw: &Gateway,
    stream: S,
    pinned: &[PublicKey],
    timeout: Duration,
) -> Result<Connected, Handshake>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mismatch = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (closed_tx, closed) = watch::channel(false);
    let handler = Runner {
        pinned: pinned.to_vec(),
        mismatch: mismatch.clone(),
        closed: closed_tx,
    };
    let connecting = client::connect_stream(gw.upstream_config.clone(), stream, handler);
    match tokio::time::timeout(timeout, connecting).await {
        Err(_) => Err(Handshake::Timeout),
        Ok(Err(_)) if mismatch.load(std::sync::atomic::Ordering::Relaxed) => {
            Err(Handshake::Mismatch)
        }
        Ok(Err(e)) if dropped(&e) => Err(Handshake::Dropped(e.to_string())),
        Ok(Err(e)) => Err(Handshake::Failed(e.to_string())),
        Ok(Ok(handle)) => Ok((handle, closed)),
    }
}

/// Connects and logs in to `job`'s runner on behalf of `login`.
pub async fn connect(
    gw: &Gateway,
    job: &Registration,
    login: &str,
) -> Result<RunnerConnection, UpstreamError> {
    // A tunnel registration is never dialed: its runner is reached only
    // through the tunnel its agent holds (DESIGN §10).
    let (via, key, shown) = if job.tunnel {
        let live = match gw.registry.lookup(job.job_id) {
            Lookup::Active(_, live) => Some(live),
            _ => None,
        }
        .ok_or(UpstreamError::Tunnel(TunnelError::Down))?;
        let link = crate::ssh::relay::tunnel_of(gw, job.job_id, &live)
            .await
            .ok_or(UpstreamError::Tunnel(TunnelError::Down))?;
        let shown = format!("127.0.0.1:{} (through its tunnel)", job.port);
        (Via::Tunnel(link), RunnerKey::Tunnel(job.job_id), shown)
    } else {
        let addr = gw
            .dialable(std::net::SocketAddr::new(job.host, job.port))
            .map_err(UpstreamError::Forbidden)?;
        (Via::Dial(addr), RunnerKey::Addr(addr), addr.to_string())
    };
    let tunnel_down = match &via {
        Via::Tunnel(link) => Some(link.watch_down()),
        Via::Dial(_) => None,
    };
    let timeout = gw.config.upstream.connect_timeout;
    // A burst of logins to one runner waits in line here rather than being
    // dropped by the runner's sshd (MaxStartups): the line is part of
    // connecting, so it gets the connect timeout as its patience.
    let _in_line = gw
        .runner_handshakes
        .enter(key, timeout)
        .await
        .ok_or_else(|| {
            gw.metrics
                .refused(crate::metrics::Refusal::RunnerHandshakes);
            UpstreamError::Throttled(shown.clone(), gw.runner_handshakes.per_key(), timeout)
        })?;
    let socket = gw
        .upstream_sockets
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            gw.metrics.refused(crate::metrics::Refusal::UpstreamSockets);
            UpstreamError::Busy(gw.upstream_socket_limit)
        })?;
    let pinned: Vec<PublicKey> = job
        .host_keys
        .iter()
        .filter_map(|k| crate::keys::parse_public_key(k).ok())
        .collect();
    let (mut handle, closed) = match attempt(gw, &via, &pinned, timeout).await {
        Err(Handshake::Dropped(first)) => {
            // An sshd past its MaxStartups closes new connections at random;
            // one more try, after a short random pause, gets most through.
            let pause = Duration::from_millis(50 + rand::random::<u64>() % 200);
            tokio::time::sleep(pause).await;
            match attempt(gw, &via, &pinned, timeout).await {
                Err(Handshake::Dropped(second)) => {
                    return Err(UpstreamError::DroppedTwice(
                        shown,
                        format!("{first}; then {second}"),
                    ))
                }
                other => other.map_err(|e| e.into_error(&shown, timeout))?,
            }
        }
        other => other.map_err(|e| e.into_error(&shown, timeout))?,
    };

    let auth = async {
        match job.runner_login {
            RunnerLogin::Key => {
                let Some(key) = gw.registry.runner_key(job.job_id) else {
                    return Err(russh::Error::NotAuthenticated);
                };
                let key = PrivateKeyWithHashAlg::new(key, None);
                handle.authenticate_publickey(job.user.clone(), key).await
            }
            RunnerLogin::Certificate => {
                let ephemeral =
                    PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)
                        .map_err(|e| russh::Error::from(russh::keys::Error::from(e)))?;
                let key_id = format!("ci-gateway:{login}:job-{}", job.job_id);
                let cert = gw
                    .ca
                    .issue(
                        ephemeral.public_key(),
                        &job.principal(),
                        &key_id,
                        gw.config.upstream.cert_validity,
                    )
                    .map_err(|_| russh::Error::Inconsistent)?;
                handle
                    .authenticate_openssh_cert(job.user.clone(), Arc::new(ephemeral), cert)
                    .await
            }
        }
    };
    match tokio::time::timeout(timeout, auth).await {
        Err(_) => Err(UpstreamError::Timeout(shown, timeout)),
        Ok(Err(e)) => Err(UpstreamError::Unreachable(shown, e.to_string())),
        Ok(Ok(result)) if result.success() => Ok(RunnerConnection {
            handle,
            closed,
            tunnel_down,
            job: job.job_id,
            _socket: socket,
        }),
        Ok(Ok(_)) => Err(UpstreamError::AuthRefused(
            shown,
            job.user.clone(),
            match job.runner_login {
                RunnerLogin::Certificate => {
                    "it does not trust this job's certificate; install the \
                     cert-authority,principals=\"ci-gateway-job-<id>\" line the registration returned \
                     (ci-gateway runner register does), or register with --runner-login key if \
                     its sshd takes no certificates (dropbear, Windows)"
                }
                RunnerLogin::Key => {
                    "it does not trust this job's key; install the key line the registration \
                     returned (ci-gateway runner register does)"
                }
            },
        )),
    }
}
