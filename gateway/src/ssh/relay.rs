//! Tunnels another replica holds (PostgreSQL replicas; DESIGN §8 and §10).
//!
//! A runner's agent keeps its tunnel to one replica. A user who reaches
//! another replica is relayed there: the replica opens an SSH connection to
//! the holder's address (from the `replicas` table) and logs in as
//! `relay+<job-id>` with the gateway's ed25519 host key, which every replica
//! shares and nobody else has. It accepts the peer only if the peer presents
//! that same host key. On that connection it opens `direct-tcpip` channels
//! to the runner's ports, and the holder opens each on its own tunnel, only
//! for port 22 or a port jump mode allows. Bytes stay SSH-encrypted end to
//! end where the user's session is (jump mode) or runner-bound (job mode):
//! the relay hop is one more encrypted link inside the gateways' network.

use std::sync::Arc;
use std::time::Duration;

use russh::client;
use russh::keys::{PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use tokio::sync::watch;

use crate::ids::JobId;
use crate::registry::Live;
use crate::ssh::tunnel::{TunnelError, TunnelLink};
use crate::Gateway;

/// The username a replica logs in with to reach `job`'s tunnel on another.
pub fn relay_user(job: JobId) -> String {
    format!("{}{job}", crate::ids::RELAY_USER_PREFIX)
}

/// An SSH connection to the replica that holds a job's tunnel.
pub struct Relay {
    handle: client::Handle<Peer>,
    closed: watch::Receiver<bool>,
    _socket: tokio::sync::OwnedSemaphorePermit,
}

impl Relay {
    pub fn watch_closed(&self) -> watch::Receiver<bool> {
        self.closed.clone()
    }

    /// Opens `port` on the runner's side, through the holder's tunnel.
    pub async fn open(
        &self,
        gw: &Gateway,
        port: u16,
        timeout: Duration,
    ) -> Result<tokio::io::DuplexStream, TunnelError> {
        let opened =
            self.handle
                .channel_open_direct_tcpip("localhost", u32::from(port), "ci-gateway", 0);
        let channel =
            crate::ssh::tunnel::opened_within(port, timeout, opened, &self.closed).await?;
        Ok(crate::ssh::tunnel::stream(gw, channel))
    }
}

/// The relay's client handler: the peer must present our own host key.
pub struct Peer {
    own: PublicKey,
    closed: watch::Sender<bool>,
}

impl client::Handler for Peer {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(crate::keys::is_pinned(std::slice::from_ref(&self.own), key))
    }

    async fn disconnected(
        &mut self,
        _reason: client::DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        self.closed.send_replace(true);
        Ok(())
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.closed.send_replace(true);
    }
}

/// The job's tunnel: this replica's, or, with replicas, a relay to the one
/// that holds it. `None`: no live replica holds it.
pub async fn tunnel_of(gw: &Gateway, job: JobId, live: &Live) -> Option<Arc<TunnelLink>> {
    if let Some(link) = live.tunnel() {
        return Some(link);
    }
    let shared = gw.registry.shared()?;
    let addr = match shared.tunnel_holder(job).await {
        Ok(Some(addr)) => addr,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(job = %job, "finding the replica that holds the tunnel: {e}");
            return None;
        }
    };
    match connect(gw, job, &addr).await {
        Ok(relay) => Some(Arc::new(TunnelLink::relayed(relay))),
        Err(e) => {
            tracing::warn!(job = %job, replica = %addr, "relaying to the replica that holds the tunnel: {e}");
            None
        }
    }
}

async fn connect(gw: &Gateway, job: JobId, addr: &str) -> Result<Relay, String> {
    let socket = gw
        .upstream_sockets
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            format!(
                "all {} upstream sockets are in use",
                gw.upstream_socket_limit
            )
        })?;
    let key = gw
        .host_keys
        .iter()
        .find(|k| k.algorithm() == russh::keys::Algorithm::Ed25519)
        .ok_or("no ed25519 host key")?
        .clone();
    let timeout = gw.config.upstream.connect_timeout;
    let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let (closed_tx, closed) = watch::channel(false);
    let peer = Peer {
        own: key.public_key().clone(),
        closed: closed_tx,
    };
    let login = async {
        let mut handle = client::connect_stream(gw.upstream_config.clone(), tcp, peer)
            .await
            .map_err(|e| e.to_string())?;
        let auth = handle
            .authenticate_publickey(
                relay_user(job),
                PrivateKeyWithHashAlg::new(Arc::new(key), None),
            )
            .await
            .map_err(|e| e.to_string())?;
        if !auth.success() {
            return Err("the replica refused this replica's key".to_string());
        }
        Ok(handle)
    };
    let handle = tokio::time::timeout(timeout, login)
        .await
        .map_err(|_| "timed out".to_string())??;
    Ok(Relay {
        handle,
        closed,
        _socket: socket,
    })
}
