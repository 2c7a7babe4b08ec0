//! The SSH accept loop: connection limits (total, taken *before* accept so the
//! limit is real backpressure, and per source address), the unauthenticated
//! connection deadline, and russh's server configuration.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use russh::keys::PrivateKey;
use russh::server::{self, Config};
use russh::{Disconnect, MethodKind, MethodSet, SshId};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::config::SshConfig;
use crate::ssh::handler::Connection;
use crate::Gateway;

pub fn russh_config(ssh: &SshConfig, host_keys: Vec<PrivateKey>) -> Config {
    Config {
        server_id: SshId::Standard(
            concat!("SSH-2.0-ci-gateway_", env!("CARGO_PKG_VERSION")).into(),
        ),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: ssh.auth_rejection_time,
        // OpenSSH probes with "none" first; answering it at once costs nothing.
        auth_rejection_time_initial: Some(std::time::Duration::ZERO),
        keys: host_keys,
        max_auth_attempts: ssh.max_auth_attempts,
        inactivity_timeout: Some(ssh.idle_timeout),
        keepalive_interval: Some(ssh.keepalive_interval),
        keepalive_max: 3,
        // With consumption-driven grants a peer has at most one window in
        // flight per channel; the queue holds that many full packets and
        // more, so the session loop does not wait on it for a well-behaved peer.
        window_size: 2 * 1024 * 1024,
        maximum_packet_size: 32768,
        // Channels share one budget per connection: a channel opened when
        // less than two windows are left gets half of what is left.
        connection_window: ssh.max_window_per_connection as u64,
        // Job-mode channels relay requests, replies and the close
        // handshake themselves (`ssh::channel`), in order.
        application_answers_requests: true,
        application_closes_channels: true,
        channel_buffer_size: 1024,
        nodelay: true,
        preferred: crate::ssh::preferred(ssh.allow_sha1_rsa),
        ..Default::default()
    }
}

/// How long a connection being shut down gets for its disconnect message to
/// go out and for the client to close, before it is cut off.
pub const DISCONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves SSH on `listener` until the gateway stops; then stops accepting
/// and returns. Each open connection ends in its own task, after the grace
/// (`serve_connection`).
pub async fn run(gw: Arc<Gateway>, listener: TcpListener) {
    let limit = Arc::new(Semaphore::new(gw.max_user_connections));
    let peak = AtomicUsize::new(0);
    let shutdown = gw.tasks.stopping();
    // One connection thread per core (`ssh::shards`); each ends after its
    // last connection once this returns.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shards = super::shards::Shards::start(threads, &gw.tasks);
    // The trimmer never returns: it runs exactly as long as the accept loop.
    tokio::select! {
        _ = accept_loop(&gw, listener, &limit, &peak, &shards, shutdown) => {}
        _ = give_back_memory(&limit, gw.max_user_connections, &peak) => {}
    }
}

/// Accepts until `shutdown`; `peak` records the most connections open at once.
async fn accept_loop(
    gw: &Arc<Gateway>,
    listener: TcpListener,
    limit: &Arc<Semaphore>,
    peak: &AtomicUsize,
    shards: &super::shards::Shards,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let config = Arc::new(russh_config(&gw.config.ssh, gw.host_keys.clone()));
    // Per source address, an IPv6 /64 counting as one (as the failure limits do).
    let per_source = Arc::new(crate::limits::Counted::<IpAddr>::default());
    let mut backoff = std::time::Duration::from_millis(10);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => return,
            permit = limit.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff = std::time::Duration::from_millis(10);
                    a
                }
                Err(e) => {
                    // EMFILE and friends: back off (doubling, up to 1 s)
                    // instead of spinning, and keep serving (mini-redis).
                    warn!("accept failed: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
                    continue;
                }
            },
        };
        // A source that spent its failed-login budget is refused before any
        // key exchange work.
        if let Some(wait) = gw.auth_limits.source_blocked(peer.ip()) {
            gw.metrics.refused(crate::metrics::Refusal::SshSource);
            debug!(%peer, "refused: too many failed logins ({}s left)", wait.as_secs());
            continue;
        }
        let Some(slot) = per_source.take(
            crate::limits::source_key(peer.ip()),
            gw.config.ssh.max_connections_per_source,
        ) else {
            debug!(%peer, "too many connections from this source");
            continue;
        };
        let open = gw.max_user_connections - limit.available_permits();
        peak.fetch_max(open, Ordering::Relaxed);
        let id = next_id();
        let gw = gw.clone();
        let config = config.clone();
        let _ = stream.set_nodelay(true);
        // The socket moves to the connection's thread, so that its reads
        // and writes wake that thread's own driver.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                warn!(%peer, "cannot hand the connection to its thread: {e}");
                continue;
            }
        };
        let tasks = gw.tasks.clone();
        shards.spawn(&tasks, "ssh connection", async move {
            match tokio::net::TcpStream::from_std(stream) {
                Ok(stream) => serve_connection(gw, config, stream, peer, id).await,
                Err(e) => warn!(%peer, "cannot take the connection on its thread: {e}"),
            }
            drop(slot);
            drop(permit);
        });
    }
}

/// Sessions that must have closed since the last peak before the allocator is
/// asked to give memory back: a few hundred sessions are megabytes, fewer are
/// not worth walking the heap for.
const TRIM_AFTER_CLOSED: usize = 256;

/// Returns freed memory to the system after a large drop in connections
/// (a CI fleet's sessions ending together, a load test): glibc keeps it
/// otherwise, and the gateway would sit at its peak size for good. Checks the
/// connection count every 2 s; trims on a blocking thread.
async fn give_back_memory(limit: &Semaphore, max: usize, peak: &AtomicUsize) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let open = max - limit.available_permits();
        let was = peak.load(Ordering::Relaxed);
        if was < open + TRIM_AFTER_CLOSED {
            continue;
        }
        peak.store(open, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let released = tokio::task::spawn_blocking(alloc_trim::release_free_memory)
            .await
            .unwrap_or(false);
        debug!(
            peak = was,
            open,
            released,
            took_ms = started.elapsed().as_millis() as u64,
            "gave freed memory back to the system"
        );
    }
}

/// A connection id, unique over the SSH port and the API's WebSocket
/// tunnels (a job's tunnel is told apart by it).
fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Serves an SSH connection carried in a WebSocket on the API listener (a
/// runner's tunnel where only HTTPS leaves its network): the same server,
/// authentication and limits as the SSH port, with the API peer's address.
pub async fn serve_websocket(gw: Arc<Gateway>, stream: tokio::io::DuplexStream, peer: SocketAddr) {
    if let Some(wait) = gw.auth_limits.source_blocked(peer.ip()) {
        debug!(%peer, "websocket tunnel refused: too many failed logins ({}s left)", wait.as_secs());
        return;
    }
    let config = Arc::new(russh_config(&gw.config.ssh, gw.host_keys.clone()));
    serve_connection(gw, config, stream, peer, next_id()).await;
}

async fn serve_connection<S>(
    gw: Arc<Gateway>,
    config: Arc<Config>,
    stream: S,
    peer: SocketAddr,
    id: u64,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let shared = Arc::new(OnceLock::new());
    let handler = Connection::new(gw.clone(), peer, id, shared.clone());
    let authenticated = handler.authenticated.clone();
    let notices = handler.session_channels.clone();
    let auth_timeout = gw.config.ssh.auth_timeout;
    // The version exchange is bounded too: a silent peer does not hold a slot.
    let session =
        match tokio::time::timeout(auth_timeout, server::run_stream(config, stream, handler)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                debug!(conn = id, %peer, "handshake failed: {e}");
                return;
            }
            Err(_) => {
                debug!(conn = id, %peer, "no SSH version line in time");
                return;
            }
        };
    let handle = session.handle();
    let _ = shared.set(handle.clone());
    let deadline = async {
        tokio::time::sleep(auth_timeout).await;
        if authenticated.load(std::sync::atomic::Ordering::Relaxed) {
            return std::future::pending::<()>().await;
        }
        info!(conn = id, %peer, "not authenticated within {auth_timeout:?}; closing");
        // Say why if the key exchange got that far; a peer stuck mid-packet
        // (or mid key exchange) cannot be told, and is cut off regardless.
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            handle.disconnect(
                Disconnect::ByApplication,
                "ci-gateway: authentication took too long".into(),
                "en".into(),
            ),
        )
        .await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    let mut session = session;
    let stopping = gw.tasks.stopping();
    tokio::select! {
        result = &mut session => {
            if let Err(e) = result {
                debug!(conn = id, %peer, "connection ended: {e}");
            }
            return;
        }
        // The session loop runs in its own task; cut it off for real.
        _ = deadline => {
            session.abort();
            let _ = session.await;
            return;
        }
        _ = stopping => {}
    }
    // The gateway is stopping. A user gets the grace to finish up, told on
    // their session channels (where hold warnings go), then the reason.
    let grace = gw.config.ssh.shutdown_grace;
    if authenticated.load(std::sync::atomic::Ordering::Relaxed) && !grace.is_zero() {
        let line = format!(
            "the gateway is shutting down: this connection closes in {}",
            humantime::format_duration(grace)
        );
        // The notice is inside the grace: a client that reads nothing (its
        // session's queue full) cannot hold the shutdown up with it.
        let notified = async {
            crate::ssh::open::show_notice(&handle, &notices, &line).await;
            (&mut session).await
        };
        if tokio::time::timeout(grace, notified).await.is_ok() {
            return;
        }
    }
    info!(conn = id, %peer, "closing: the gateway is shutting down");
    let _ = tokio::time::timeout(
        DISCONNECT_WAIT,
        crate::ssh::open::say_goodbye(
            &handle,
            "ci-gateway: the gateway is shutting down (restart or upgrade); reconnect in a minute"
                .into(),
        ),
    )
    .await;
    if tokio::time::timeout(DISCONNECT_WAIT, &mut session)
        .await
        .is_err()
    {
        session.abort();
        let _ = session.await;
    }
}
