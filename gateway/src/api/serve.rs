//! Serving the API router over plain HTTP or HTTPS (rustls), with one accept
//! loop for both: a connection limit, a TLS handshake deadline and a header
//! read deadline (slow clients do not hold slots), and the peer address handed
//! to the routes (`host` defaults to it).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

const MAX_API_CONNECTIONS: usize = 1024;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Loads a PEM certificate chain and private key into a rustls acceptor.
pub fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("api.tls_cert {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("api.tls_key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The accept loop's bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Headers must arrive within this; a connection lives at most 20 times it.
    pub request_timeout: Duration,
    /// Connections open at once from one source: a few sources holding
    /// silent sockets cannot take the slots everyone else needs.
    pub per_source: usize,
}

pub async fn run(
    router: Router,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    tasks: crate::tasks::Tasks,
) {
    let shutdown = tasks.stopping();
    let request_timeout = limits.request_timeout;
    let limit = Arc::new(Semaphore::new(MAX_API_CONNECTIONS));
    let per_source = Arc::new(crate::limits::Counted::<std::net::IpAddr>::default());
    let mut backoff = Duration::from_millis(10);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => return,
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => return,
            a = listener.accept() => match a {
                Ok(a) => {
                    backoff = Duration::from_millis(10);
                    a
                }
                Err(e) => {
                    tracing::warn!("api accept failed: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        let Some(source_slot) =
            per_source.take(crate::limits::source_key(peer.ip()), limits.per_source)
        else {
            tracing::debug!(%peer, "api: too many connections from this source");
            drop(tcp);
            continue;
        };
        let router = router.clone();
        let tls = tls.clone();
        let stopping = tasks.stopping();
        tasks.spawn("api connection", async move {
            let _permit = permit;
            let _source_slot = source_slot;
            let service = router.map_request(move |mut r: axum::http::Request<_>| {
                r.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                r
            });
            let service = TowerToHyperService::new(service);
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(request_timeout)
                .max_buf_size(64 * 1024);
            let served = match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let conn = http
                                .serve_connection(TokioIo::new(stream), service)
                                .with_upgrades();
                            tokio::time::timeout(request_timeout * 20, until_done(conn, stopping))
                                .await
                        }
                        _ => return,
                    }
                }
                None => {
                    // Upgrades: the tunnel's WebSocket leaves the HTTP
                    // connection (and its lifetime bound) once accepted.
                    let conn = http
                        .serve_connection(TokioIo::new(tcp), service)
                        .with_upgrades();
                    tokio::time::timeout(request_timeout * 20, until_done(conn, stopping)).await
                }
            };
            if let Ok(Err(e)) = served {
                tracing::debug!(%peer, "api connection: {e}");
            }
        });
    }
}

/// Serves `conn` to its end; once the gateway stops, it finishes the request
/// in flight and closes (HTTP/1.1 graceful shutdown: no new request is read
/// from a kept-alive connection).
async fn until_done<I, S>(
    conn: hyper::server::conn::http1::UpgradeableConnection<I, S>,
    stopping: impl std::future::Future<Output = ()>,
) -> hyper::Result<()>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(conn);
    tokio::select! {
        served = conn.as_mut() => return served,
        _ = stopping => {}
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}
