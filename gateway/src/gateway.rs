//! The gateway's shared state: config, keys, store, caches, limits and
//! metrics, built once at start ([`Gateway::new`]) and shared by every
//! connection and request.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::PrivateKey;

use crate::config::Config;
use crate::secret::Secret;
use crate::{access, address, audit, github, ids, keys, limits, metrics, oidc, registry, ssh};

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
    /// `api.admin_tokens`: `/v1/admin` only.
    pub admin_tokens: Vec<crate::config::AdminToken>,
    pub audit: audit::Audit,
    pub auth_limits: limits::AuthLimits,
    /// Set when `registration.oidc_audience` is.
    pub oidc: Option<oidc::Verifier>,
    pub api_limits: limits::ApiLimits,
    /// GitHub key lookups per source for logins it names.
    pub github_lookups: limits::LookupBudget,
    /// `GET /v1/agent/…` downloads per source.
    pub agent_downloads: limits::LookupBudget,
    /// The agent binaries served to runners.
    pub agents: Arc<crate::api::downloads::Agents>,
    pub upstream_config: Arc<russh::client::Config>,
    pub metrics: Arc<metrics::Metrics>,
    /// Sockets to runners (job-mode SSH connections, jump forwards): one
    /// permit each, for as long as the socket is open.
    pub upstream_sockets: Arc<tokio::sync::Semaphore>,
    pub upstream_socket_limit: usize,
    /// Job-mode logins in progress per runner address.
    pub runner_handshakes: Arc<limits::Gates<ssh::upstream::RunnerKey>>,
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
    /// Every task the gateway runs, and the one signal that stops them.
    pub tasks: crate::tasks::Tasks,
    /// Jobs whose hold this replica runs (at most one task each).
    pub holds: std::sync::Mutex<std::collections::HashSet<ids::JobId>>,
}

impl Gateway {
    /// Loads or creates the keys under `storage.data_dir`, and opens the
    /// store (redb there, or the PostgreSQL registry).
    pub async fn new(config: Config) -> anyhow::Result<Gateway> {
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
        let max_jobs = config.registration.max_jobs;
        let registry = match config.storage.backend {
            crate::config::Backend::Redb => {
                registry::Registry::open(&dir.join("registry.redb"), max_jobs)?
            }
            crate::config::Backend::Postgres => {
                let secret = ca
                    .seal_secret()
                    .ok_or_else(|| anyhow::anyhow!("the CA key is not ed25519"))?;
                let name = format!("pid {} on {}", std::process::id(), config.ssh.listen);
                let registry =
                    registry::Registry::open_postgres(&config.storage, name, &secret, max_jobs)
                        .await?;
                let mut ours: Vec<(String, String)> = host_keys
                    .iter()
                    .map(|k| {
                        (
                            format!("host {}", k.algorithm().as_str()),
                            keys::openssh_line(k.public_key()),
                        )
                    })
                    .collect();
                ours.push(("ca".into(), keys::openssh_line(ca.public_key())));
                if let Some(shared) = registry.shared() {
                    shared.agree_keys(&ours).await?;
                }
                registry
            }
        };
        let metrics = Arc::new(metrics::Metrics::new());
        let keys = github::KeySource::new(&config.github, metrics.clone())?;
        let policy = config.policy();
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
        let agent_downloads = limits::LookupBudget::new(limits::quota(
            config.agent.downloads_per_source_per_minute,
            Duration::from_secs(60),
        ));
        let agents = Arc::new(crate::api::downloads::Agents::new(&config.agent.dir));
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
        let admin_tokens = config.admin_tokens();
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
            admin_tokens,
            audit,
            auth_limits,
            api_limits,
            github_lookups,
            agent_downloads,
            agents,
            oidc,
            upstream_config,
            metrics: metrics.clone(),
            generated_token_file,
            tasks: crate::tasks::Tasks::new(metrics.task_panics.clone()),
            holds: Default::default(),
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
}
