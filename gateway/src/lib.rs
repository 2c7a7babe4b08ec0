//! ci-gateway: an SSH bastion for debugging CI jobs.
//!
//! # Layout
//!
//! - [`cli`] — arguments, logging, config, signals; calls [`run`] (the binary
//!   is `main.rs`, one line).
//! - [`config`] — serde types, layering (defaults, file, env) and validation.
//! - [`ids`] — `JobId`, `GithubLogin`, and the SSH username grammar.
//! - [`registry`] — registered jobs, persisted in redb; each job's live state.
//! - [`github`] — people's SSH keys from GitHub (octocrab), cached.
//! - [`access`] — who may reach which job: one pure function.
//! - [`address`] — where a runner may be, and what the gateway may dial.
//! - [`keys`] — host key, CA and certificates the gateway owns.
//! - [`limits`] — failed-login and API rate limits (governor).
//! - [`logline`] — the log writer: one record, one line, controls escaped.
//! - [`metrics`] — Prometheus metrics (`[metrics] listen`).
//! - [`oidc`] — GitHub Actions OIDC tokens as registration credentials.
//! - [`api`] — the runner HTTP API; calls the registry, never SSH.
//! - [`audit`] — the append-only JSON-lines audit trail.
//! - [`ssh`] — accept loop, per-connection handler, runner client, the job-mode channel task, the jump splice.
//! - [`hold`] — hold window after a job finishes, registration expiry.
//! - [`agent`] — `ci-gateway runner …`, the runner's side of the API.
//!
//! [`run`] takes already-bound listeners and a shutdown future, so tests bind
//! port 0 and pass the listeners in; it binds nothing itself.

#![forbid(unsafe_code)]

pub mod access;
pub mod address;
pub mod agent;
pub mod api;
pub mod audit;
pub mod cli;
pub mod config;
pub mod github;
pub mod hold;
pub mod ids;
pub mod keys;
pub mod limits;
pub mod logline;
pub mod metrics;
pub mod oidc;
pub mod registry;
pub mod secret;
pub mod ssh;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::PrivateKey;
use tokio::net::TcpListener;

use crate::config::Config;
use crate::secret::Secret;

/// Everything a connection or request needs, built once at start.
pub struct Gateway {
    pub config: Config,
    pub registry: registry::Registry,
    pub keys: github::KeySource,
    pub policy: access::Policy,
    pub ca: keys::Ca,
    /// The SSH host keys, ed25519 first (see `keys::HostKeyKind`).
    pub host_keys: Vec<PrivateKey>,
    /// The addresses the gateway listens on (config and bound sockets):
    /// never dialled as a runner.
    own_sockets: std::sync::RwLock<Vec<std::net::SocketAddr>>,
    pub tokens: Vec<Secret<String>>,
    pub audit: audit::Audit,
    pub auth_limits: limits::AuthLimits,
    /// Set when `registration.oidc_audience` is.
    pub oidc: Option<oidc::Verifier>,
    pub api_limits: limits::ApiLimits,
    /// GitHub key lookups per source for logins it names.
    pub github_lookups: limits::LookupBudget,
    pub upstream_config: Arc<russh::client::Config>,
    pub metrics: Arc<metrics::Metrics>,
    /// Sockets to runners (job-mode SSH connections, jump forwards): one
    /// permit each, for as long as the socket is open.
    pub upstream_sockets: Arc<tokio::sync::Semaphore>,
    pub upstream_socket_limit: usize,
    /// Job-mode logins in progress per runner address.
    pub runner_handshakes: Arc<limits::Gates<std::net::SocketAddr>>,
    /// User connections at once: `ssh.max_connections`, or less when the
    /// descriptor limit demands it.
    pub max_user_connections: usize,
    /// Authenticated connections per GitHub login.
    pub logins: Arc<limits::Counted<String>>,
    /// Open channels per GitHub login (counters shared by its connections).
    login_channels: std::sync::Mutex<
        std::collections::HashMap<String, std::sync::Weak<std::sync::atomic::AtomicUsize>>,
    >,
    /// Where a generated registration token was written, if one was.
    pub generated_token_file: Option<PathBuf>,
    /// Set when `run` stops; background tasks (holds) end with it.
    stopping: tokio::sync::watch::Sender<bool>,
}

impl Gateway {
    /// Loads or creates the keys and the store under `storage.data_dir`.
    pub fn new(config: Config) -> anyhow::Result<Gateway> {
        let dir = config.storage.data_dir.clone();
        std::fs::create_dir_all(&dir)
            .map_err(|e| anyhow::anyhow!("storage.data_dir {}: {e}", dir.display()))?;
        let host_keys = keys::HostKeyKind::ALL
            .into_iter()
            .map(|kind| keys::load_or_generate_kind(&config.host_key_path(kind), kind))
            .collect::<Result<Vec<_>, _>>()?;
        let ca = keys::Ca::new(keys::load_or_generate(&dir.join("ca_ed25519_key"))?);
        if dir.join("client_ed25519_key").exists() {
            tracing::warn!(
                "{}: the shared Windows login key is no longer used (every job now gets its own key); delete it",
                dir.join("client_ed25519_key").display()
            );
        }
        let registry =
            registry::Registry::open(&dir.join("registry.redb"), config.registration.max_jobs)?;
        let metrics = Arc::new(metrics::Metrics::new());
        let keys = github::KeySource::new(&config.github, metrics.clone())?;
        let policy = access::Policy {
            admins: config.admins(),
            allow_extra_users: config.registration.allow_extra_users,
            jump_ports: config.access.jump_ports.clone(),
        };
        let (tokens, generated_token_file) = if config.registration.tokens.is_empty() {
            let path = dir.join("registration_token");
            let token = match std::fs::read_to_string(&path) {
                Ok(t) if t.trim().len() >= 16 => t.trim().to_string(),
                _ => {
                    let bytes: [u8; 24] = rand::random();
                    let token = base64::Engine::encode(
                        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                        bytes,
                    );
                    keys::write_private(&path, token.as_bytes())?;
                    token
                }
            };
            (vec![Secret::new(token)], Some(path))
        } else {
            (config.registration.tokens.clone(), None)
        };
        let upstream_config = Arc::new(ssh::upstream::client_config(config.ssh.keepalive_interval));
        let auth_limits = limits::AuthLimits::with_window(
            limits::quota(
                config.ssh.max_failed_auths_per_source,
                config.ssh.failed_auth_window,
            ),
            limits::quota(
                config.ssh.max_failed_auths_per_user,
                config.ssh.failed_auth_window,
            ),
            config.ssh.failed_auth_window,
        );
        let minute = Duration::from_secs(60);
        let api_limits = limits::ApiLimits::new(
            limits::quota(config.api.requests_per_minute_per_token, minute),
            limits::quota(config.api.requests_per_minute_per_source, minute),
            limits::quota(config.api.max_bad_tokens_per_source, minute),
        );
        let reg = &config.registration;
        let oidc = if reg.oidc_audience.is_empty() {
            None
        } else {
            Some(
                oidc::Verifier::new(
                    &reg.oidc_issuer,
                    &reg.oidc_audience,
                    &reg.allowed_repositories,
                    reg.oidc_jwks_refetch,
                )
                .map_err(|e| anyhow::anyhow!("registration.oidc_issuer: {e}"))?,
            )
        };
        let audit_path = config.audit_path();
        let audit = audit::Audit::open(&audit_path)
            .map_err(|e| anyhow::anyhow!("audit.path {}: {e}", audit_path.display()))?;
        let own_sockets = vec![config.ssh.listen, config.api.listen];
        let github_lookups = limits::LookupBudget::new(limits::quota(
            config.github.lookups_per_source_per_minute,
            Duration::from_secs(60),
        ));
        // Descriptors (issue 11): user connections and upstream sockets each
        // get at most half of what RLIMIT_NOFILE leaves after a headroom, so
        // neither can make `accept` fail for everyone.
        let share = limits::open_files_limit().map(limits::descriptor_share);
        let runner_handshakes = Arc::new(limits::Gates::new(
            config.upstream.max_handshakes_per_runner,
        ));
        let upstream_socket_limit = match config.upstream.max_sockets {
            0 => share.unwrap_or(16_384),
            n => n,
        };
        let max_user_connections = config.ssh.max_connections.min(share.unwrap_or(usize::MAX));
        tracing::info!(
            open_files = ?limits::open_files_limit(),
            max_user_connections,
            upstream_socket_limit,
            "descriptor budget"
        );
        Ok(Gateway {
            config,
            registry,
            keys,
            policy,
            ca,
            host_keys,
            own_sockets: std::sync::RwLock::new(own_sockets),
            upstream_sockets: Arc::new(tokio::sync::Semaphore::new(upstream_socket_limit)),
            runner_handshakes,
            upstream_socket_limit,
            max_user_connections,
            logins: Arc::new(limits::Counted::default()),
            login_channels: Default::default(),
            tokens,
            audit,
            auth_limits,
            api_limits,
            github_lookups,
            oidc,
            upstream_config,
            metrics,
            generated_token_file,
            stopping: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Ends a job: removes it, closes its sessions with `reason`, and records
    /// it. `kind` says why (deregistered, released, expired, hold_over).
    /// Returns whether the job was registered.
    pub async fn end_job(
        &self,
        job: ids::JobId,
        kind: &str,
        reason: String,
    ) -> Result<bool, registry::StoreError> {
        let sessions = match self.registry.lookup(job) {
            registry::Lookup::Active(_, live) => live.active_sessions(),
            _ => 0,
        };
        let existed = self.registry.remove(job, reason.clone()).await?;
        if existed {
            self.audit.record(
                "job_ended",
                serde_json::json!({
                    "job": job.to_string(),
                    "kind": kind,
                    "reason": reason,
                    "sessions_closed": sessions,
                }),
            );
        }
        Ok(existed)
    }

    /// Checks that `addr` may be dialled as a runner (DESIGN §4); every TCP
    /// connect to a runner goes through here. Returns the canonical address.
    pub fn dialable(
        &self,
        addr: std::net::SocketAddr,
    ) -> Result<std::net::SocketAddr, address::Refused> {
        let own = self.own_sockets.read().unwrap_or_else(|e| e.into_inner());
        address::dialable(addr, &own)
    }

    /// Remembers a socket the gateway listens on (so it is never dialled).
    pub fn listening_on(&self, addr: std::net::SocketAddr) {
        let mut own = self.own_sockets.write().unwrap_or_else(|e| e.into_inner());
        if !own.contains(&addr) {
            own.push(addr);
        }
    }

    /// The open-channel counter of `login`, shared by its connections; gone
    /// with the last of them.
    pub fn login_channels(&self, login: &str) -> Arc<std::sync::atomic::AtomicUsize> {
        let mut map = self
            .login_channels
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let key = login.to_lowercase();
        if let Some(counter) = map.get(&key).and_then(std::sync::Weak::upgrade) {
            return counter;
        }
        if map.len() >= 1024 {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        map.insert(key, Arc::downgrade(&counter));
        counter
    }

    /// Resolves once `run` has been told to stop.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.stopping.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }
}

/// The warning for an API without TLS, unless it listens on loopback only.
pub fn plain_http_warning(addr: std::net::SocketAddr) -> Option<String> {
    (!addr.ip().is_loopback()).then(|| {
        format!(
            "THE RUNNER API SERVES PLAIN HTTP ON {addr}, A NON-LOOPBACK ADDRESS: registration tokens \
             cross the network in clear. Set api.tls_cert and api.tls_key."
        )
    })
}

/// The sockets [`run`] serves, bound by the caller.
pub struct Listeners {
    pub ssh: TcpListener,
    pub api: TcpListener,
    /// `/metrics`, when `[metrics] listen` is set.
    pub metrics: Option<TcpListener>,
}

/// Serves SSH, the API and metrics until `shutdown` resolves.
pub async fn run(
    gw: Arc<Gateway>,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let Listeners {
        ssh: ssh_listener,
        api: api_listener,
        metrics: metrics_listener,
    } = listeners;
    let tls = if gw.config.api.tls_cert.as_os_str().is_empty() {
        if let Some(warning) = plain_http_warning(api_listener.local_addr()?) {
            tracing::warn!("{warning}");
        }
        None
    } else {
        Some(api::serve::tls_acceptor(
            &gw.config.api.tls_cert,
            &gw.config.api.tls_key,
        )?)
    };
    gw.listening_on(ssh_listener.local_addr()?);
    gw.listening_on(api_listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let ssh = tokio::spawn(ssh::server::run(gw.clone(), ssh_listener, stopped()));
    let api = tokio::spawn(api::serve::run(
        api::router(gw.clone()),
        api_listener,
        tls,
        api::serve::Limits {
            request_timeout: gw.config.api.request_timeout,
            per_source: gw.config.api.max_connections_per_source,
        },
        stopped(),
    ));
    let metrics = metrics_listener.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            gw.listening_on(addr);
        }
        tokio::spawn(api::serve::run(
            metrics::router(gw.metrics.clone()),
            listener,
            None,
            api::serve::Limits {
                request_timeout: gw.config.api.request_timeout,
                per_source: gw.config.api.max_connections_per_source,
            },
            stopped(),
        ))
    });
    // Holds that were running when the gateway stopped resume.
    for job in gw.registry.finished_jobs() {
        hold::start(gw.clone(), job);
    }
    let tick =
        (gw.config.registration.ttl / 8).clamp(Duration::from_millis(200), Duration::from_secs(5));
    let sweeper = tokio::spawn(hold::sweep(gw.clone(), tick));
    let limits_gw = gw.clone();
    let limit_sweeper = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(10));
        loop {
            every.tick().await;
            limits_gw.auth_limits.sweep();
            limits_gw.api_limits.sweep();
            limits_gw.github_lookups.sweep();
        }
    });
    shutdown.await;
    gw.stopping.send_replace(true);
    let _ = stop_tx.send(true);
    let _ = ssh.await;
    let _ = api.await;
    if let Some(metrics) = metrics {
        let _ = metrics.await;
    }
    sweeper.abort();
    limit_sweeper.abort();
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn plain_http_is_flagged_off_loopback_only() {
        for quiet in ["127.0.0.1:8022", "[::1]:8022", "127.9.9.9:1"] {
            assert_eq!(
                super::plain_http_warning(quiet.parse().expect("addr")),
                None
            );
        }
        for loud in ["0.0.0.0:8022", "10.0.0.5:8022", "[::]:8022"] {
            let w = super::plain_http_warning(loud.parse().expect("addr")).expect(loud);
            assert!(
                w.contains("PLAIN HTTP") && w.contains("api.tls_cert"),
                "{w}"
            );
        }
    }
}
