//! The load generator: many SSH sessions from one process, on russh's client
//! (1,000 `ssh` processes would measure the clients, not the servers).

use std::net::SocketAddr;
use std::sync::Arc;

use russh::client;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};

pub struct Accept;

impl client::Handler for Accept {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }
}

/// What an idle session holds open.
#[derive(Clone)]
pub enum Kind {
    /// Job mode: an authenticated connection with a session channel.
    Session,
    /// A `direct-tcpip` channel (jump mode through the gateway, or `-W`
    /// through an OpenSSH jump host).
    Forward { host: String, port: u32 },
}

pub struct Idle {
    pub handle: client::Handle<Accept>,
    pub channel: russh::Channel<client::Msg>,
}

pub async fn open(
    config: Arc<client::Config>,
    addr: SocketAddr,
    user: &str,
    key: Arc<PrivateKey>,
    kind: &Kind,
) -> anyhow::Result<Idle> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let mut handle = client::connect_stream(config, tcp, Accept).await?;
    let auth = handle
        .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key, None))
        .await?;
    anyhow::ensure!(auth.success(), "authentication refused");
    let channel = match kind {
        Kind::Session => handle.channel_open_session().await?,
        Kind::Forward { host, port } => {
            handle
                .channel_open_direct_tcpip(host.clone(), *port, "127.0.0.1", 40000)
                .await?
        }
    };
    Ok(Idle { handle, channel })
}

pub fn config() -> Arc<client::Config> {
    Arc::new(client::Config {
        inactivity_timeout: None,
        keepalive_interval: None,
        nodelay: true,
        ..Default::default()
    })
}

/// Opens `n` sessions, at most `parallel` handshakes at a time; returns the
/// sessions and the number that failed.
pub async fn open_many(
    n: usize,
    parallel: usize,
    addr: SocketAddr,
    user: &str,
    key: Arc<PrivateKey>,
    kind: Kind,
) -> (Vec<Idle>, usize) {
    let config = config();
    let gate = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (config, key, kind, gate) = (config.clone(), key.clone(), kind.clone(), gate.clone());
        let user = user.to_string();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await;
            tokio::time::timeout(
                std::time::Duration::from_secs(120),
                open(config, addr, &user, key, &kind),
            )
            .await
            .map_err(|_| anyhow::anyhow!("timed out"))?
        });
    }
    let mut open = Vec::with_capacity(n);
    let mut failed = 0;
    let mut first_error = None;
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(Ok(idle)) => open.push(idle),
            Ok(Err(e)) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    if let Some(e) = first_error {
        eprintln!("  {failed} of {n} sessions failed; first: {e}");
    }
    (open, failed)
}

pub async fn close_all(sessions: Vec<Idle>) {
    let mut tasks = tokio::task::JoinSet::new();
    for s in sessions {
        tasks.spawn(async move {
            let _ = s.channel.close().await;
            let _ = s
                .handle
                .disconnect(russh::Disconnect::ByApplication, "", "en")
                .await;
        });
    }
    while tasks.join_next().await.is_some() {}
}
