//! The operator's configuration: serde types, layering and validation.
//!
//! Layers, later wins: the embedded defaults ([`DEFAULTS`]), the TOML file given
//! with `--config`, then `CI_GATEWAY__<SECTION>__<KEY>` environment variables.
//! [`Config::validate`] checks the whole thing before any port is bound; the
//! binary turns a [`ConfigError`] into exit code 64 (`EX_USAGE`).
//!
//! This module does no I/O besides reading the config file and the environment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::ids::GithubLogin;
use crate::secret::Secret;

/// The embedded loopback-only development defaults: `ci-gateway serve` with no
/// file runs on these.
pub const DEFAULTS: &str = include_str!("defaults.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config: {0}")]
    Load(#[from] config::ConfigError),
    #[error("config: `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub ssh: SshConfig,
    pub api: ApiConfig,
    pub github: GithubConfig,
    pub registration: RegistrationConfig,
    pub access: AccessConfig,
    pub hold: HoldConfig,
    pub upstream: UpstreamConfig,
    pub storage: StorageConfig,
    pub audit: AuditConfig,
    pub metrics: MetricsConfig,
    pub agent: AgentConfig,
    pub recording: RecordingConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SshConfig {
    pub listen: SocketAddr,
    /// The ed25519 host key. Empty: `<data_dir>/ssh_host_ed25519_key`.
    /// The ECDSA P-256 and RSA 3072 host keys are `ssh_host_ecdsa_key` and
    /// `ssh_host_rsa_key` in `<data_dir>`. Each is generated on first start.
    pub host_key: PathBuf,
    /// Where users reach the SSH port, `host` or `host:port`, used in the
    /// commands the API hands out.
    pub public_host: String,
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    /// Authenticated connections one GitHub login may hold at once.
    pub max_connections_per_login: usize,
    /// Channels one GitHub login may hold open over all its connections.
    pub max_channels_per_login: usize,
    #[serde(with = "humantime_serde")]
    pub auth_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub auth_rejection_time: Duration,
    pub max_auth_attempts: usize,
    /// Take `ssh-rsa` (SHA-1) user signatures, as OpenSSH does only when told.
    pub allow_sha1_rsa: bool,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// On SIGTERM: how long open connections may go on (job-mode sessions
    /// are told) before the gateway disconnects them and exits; 0 ends them
    /// at once.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    pub max_channels_per_connection: usize,
    /// Bytes of a user's data all channels of one connection may hold at
    /// once (their windows together: sent to the gateway and not yet
    /// written on, or allowed to be sent).
    pub max_window_per_connection: usize,
    /// Failed logins a source address may have per `failed_auth_window`
    /// before its connections are refused until the budget refills.
    pub max_failed_auths_per_source: u32,
    /// The same per username (a login or job id attacked from many sources).
    pub max_failed_auths_per_user: u32,
    #[serde(with = "humantime_serde")]
    pub failed_auth_window: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub max_body_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Requests per minute each job token may make; a shared token (the
    /// registration token, a repository's OIDC tokens) gets this per source.
    pub requests_per_minute_per_token: u32,
    /// Requests per minute one source (an IPv6 /64 is one) may make over
    /// every token it presents; sized for a fleet behind one NAT address.
    pub requests_per_minute_per_source: u32,
    /// Requests with a missing or wrong token a source may make per minute.
    pub max_bad_tokens_per_source: u32,
    /// API connections open at once from one source (an IPv6 /64 is one).
    pub max_connections_per_source: usize,
    /// `name:secret` pairs for `ci-gateway admin`: accepted on `/v1/admin`
    /// only, and nothing else accepts them. The name goes in the audit trail.
    pub admin_tokens: Vec<Secret<String>>,
}

/// One operator's admin token, parsed from `name:secret`; the whole
/// `name:secret` is what `ci-gateway admin` presents.
#[derive(Debug, Clone)]
pub struct AdminToken {
    pub name: String,
    pub secret: Secret<String>,
}

/// The shortest admin secret taken (a generated one is 43 characters).
pub const MIN_ADMIN_SECRET: usize = 24;

impl AdminToken {
    /// `name:secret`, where the name is what the audit trail says and the
    /// secret has at least [`MIN_ADMIN_SECRET`] characters.
    pub fn parse(raw: &str) -> Result<AdminToken, String> {
        let Some((name, secret)) = raw.split_once(':') else {
            return Err(
                "each entry is \"name:secret\" (the name is what the audit trail shows)".into(),
            );
        };
        let name_ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
        if !name_ok {
            return Err(format!(
                "name {:?}: 1 to 64 of A-Z a-z 0-9 . _ - @",
                name.chars().take(64).collect::<String>()
            ));
        }
        if secret.len() < MIN_ADMIN_SECRET {
            return Err(format!(
                "{name}: the secret needs at least {MIN_ADMIN_SECRET} characters"
            ));
        }
        if secret.starts_with(crate::secret::JOB_TOKEN_PREFIX) {
            return Err(format!("{name}: the secret looks like a job token"));
        }
        Ok(AdminToken {
            name: name.to_string(),
            // The bearer is the whole entry: one string to hand an operator.
            secret: Secret::new(raw.to_string()),
        })
    }
}

/// `[recording]`: asciicast v2 files of job-mode pty sessions.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordingConfig {
    pub enabled: bool,
    /// Empty: `<data_dir>/recordings`.
    pub dir: PathBuf,
    /// Also record what the user types (it holds typed passwords).
    pub record_input: bool,
    /// Refuse a session whose recording cannot be written.
    pub required: bool,
    /// Recordings older than this are deleted; 0 keeps them.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// `false`: jump mode (end to end, so unrecordable) is refused.
    pub allow_jump: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GithubConfig {
    /// `false`: the gateway never calls GitHub; only `static_keys` log in.
    pub enabled: bool,
    pub api_url: String,
    pub token: Secret<String>,
    #[serde(with = "humantime_serde")]
    pub key_cache_ttl: Duration,
    /// How long keys fetched earlier keep serving while GitHub is unreachable.
    #[serde(with = "humantime_serde")]
    pub stale_for: Duration,
    #[serde(with = "humantime_serde")]
    pub fetch_timeout: Duration,
    /// Uncached key lookups per minute one source may cause for logins it
    /// names (jump mode).
    pub lookups_per_source_per_minute: u32,
    #[serde(default)]
    pub static_keys: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistrationConfig {
    pub tokens: Vec<Secret<String>>,
    /// A registration not refreshed within this long is expired.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Whether a registration's `allowed_users` are honoured.
    pub allow_extra_users: bool,
    pub max_jobs: usize,
    /// GitHub Actions OIDC tokens as bearer: on when `oidc_audience` is set.
    pub oidc_issuer: String,
    pub oidc_audience: String,
    /// `owner/repo` glob patterns (`*` matches within a segment) whose jobs
    /// may register with an OIDC token.
    pub allowed_repositories: Vec<String>,
    /// A token naming an unknown key refetches the issuer's keys at most
    /// this often.
    #[serde(with = "humantime_serde")]
    pub oidc_jwks_refetch: Duration,
    /// Where a registration body may place a runner other than its own
    /// source address (DESIGN §4). The dev default is loopback only.
    pub runner_networks: Vec<crate::address::Cidr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessConfig {
    pub admins: Vec<String>,
    pub jump_ports: Vec<u16>,
    /// `""` (off), `write`, `maintain` or `admin`: who holds at least this
    /// on a job's repository may enter it (job mode; read through GitHub).
    pub repository_permission: String,
    /// `org/team-slug` entries whose members may enter every job.
    pub teams: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldConfig {
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_grace: Duration,
    /// Job-mode users get a warning line this long before the hold deadline.
    #[serde(deserialize_with = "durations")]
    pub warn_before: Vec<Duration>,
}

fn durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    let raw = Vec::<String>::deserialize(d)?;
    raw.iter()
        .map(|s| humantime::parse_duration(s).map_err(serde::de::Error::custom))
        .collect()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Lifetime of the certificate the gateway presents to a runner.
    #[serde(with = "humantime_serde")]
    pub cert_validity: Duration,
    /// Sockets to runners open at once (job-mode SSH connections and jump
    /// forwards); 0: half of the descriptors left after a headroom.
    pub max_sockets: usize,
    /// Job-mode logins to one runner in progress at once (TCP connect, SSH
    /// handshake, authentication); the rest wait in line for up to
    /// `connect_timeout`. Below OpenSSH's default `MaxStartups 10`, whose
    /// random drops would otherwise reset a burst's connections.
    pub max_handshakes_per_runner: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Keys, the audit trail, the generated token, and the redb store.
    pub data_dir: PathBuf,
    /// Where the registry lives: `redb` (embedded, one gateway) or
    /// `postgres` (shared by replicas; docs/operations.md).
    pub backend: Backend,
    /// `postgres://user:password@host:port/db`; only with `backend =
    /// "postgres"`. A secret: it may hold the password.
    pub postgres_url: Secret<String>,
    /// PEM certificates trusted for the database's TLS certificate, besides
    /// the system's roots (`sslmode=require` in the URL).
    pub postgres_ca: PathBuf,
    /// How often a replica writes its heartbeat and its session counts.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// A replica whose heartbeat is older than this is dead: its sessions
    /// stop counting and another replica takes over its holds.
    #[serde(with = "humantime_serde")]
    pub replica_timeout: Duration,
    /// `host:port` where the other replicas reach this one's SSH port, to
    /// relay users to a tunnel it holds. Empty: the SSH listener's address
    /// (set it when that is `0.0.0.0` or not reachable between replicas).
    pub replica_address: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Redb,
    Postgres,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Empty: `<data_dir>/audit.jsonl`.
    pub path: PathBuf,
}

/// The agent binaries `GET /v1/agent/{os}-{arch}` serves.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Binaries for other platforms than the gateway's own, each named
    /// `ci-gateway-<os>-<arch>` (`.exe` for Windows) with its
    /// `<name>.sha256` next to it. Empty: only the gateway's own.
    pub dir: PathBuf,
    /// Downloads one source address may start per minute.
    pub downloads_per_source_per_minute: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where `/metrics` is served (Prometheus text); empty: off.
    pub listen: String,
}

impl MetricsConfig {
    /// The address to serve metrics on, if they are on.
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>, AddrError> {
        let listen = self.listen.trim();
        if listen.is_empty() {
            return Ok(None);
        }
        listen
            .parse()
            .map(Some)
            .map_err(|source| AddrError::NotSocketAddr {
                text: listen.into(),
                source,
            })
    }
}

/// Why an address setting was refused; each names the text it was given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("{text:?} is not host:port: {source}")]
    NotSocketAddr {
        text: String,
        source: std::net::AddrParseError,
    },
    #[error("an IPv6 address needs its closing ']'")]
    Unclosed,
    #[error("{0:?} is not an IPv6 address")]
    NotIpv6(String),
    #[error("expected ':' after ']'")]
    AfterBracket,
    #[error("{0:?}: expected host or host:port (letters, digits, '.', '-')")]
    BadHost(String),
    #[error("{0:?}: the port must be 1..=65535")]
    BadPort(String),
}

impl Config {
    /// Loads defaults, then `file` (if any), then the environment, and validates.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(file, std::env::vars())
    }

    /// As [`Config::load`], with the environment given (tests pass their own).
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        use config::{Environment, File, FileFormat};
        let mut builder =
            config::Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(invalid(
                    "--config",
                    format!("{} is not a readable file", path.display()),
                ));
            }
            builder = builder.add_source(File::from(path).format(FileFormat::Toml).required(true));
        }
        let env: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("CI_GATEWAY__"))
            .collect();
        builder = builder.add_source(
            Environment::with_prefix("CI_GATEWAY")
                .prefix_separator("__")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("registration.tokens")
                .with_list_parse_key("api.admin_tokens")
                .with_list_parse_key("access.admins")
                .with_list_parse_key("access.teams")
                .with_list_parse_key("registration.allowed_repositories")
                .with_list_parse_key("registration.runner_networks")
                .with_list_parse_key("access.jump_ports")
                .with_list_parse_key("hold.warn_before")
                .try_parsing(true)
                .source(Some(env)),
        );
        let config: Config = builder.build()?.try_deserialize()?;
        config.validate()?;
        Ok(config)
    }

    /// Checks everything that can be checked without the network.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.registration.oidc_audience.is_empty() {
            let issuer = &self.registration.oidc_issuer;
            if let Err(e) = crate::oidc::check_issuer_url(issuer) {
                return Err(invalid("registration.oidc_issuer", e.to_string()));
            }
            if self.registration.allowed_repositories.is_empty() {
                return Err(invalid(
                    "registration.allowed_repositories",
                    "OIDC registration needs at least one pattern (e.g. \"acme/*\")",
                ));
            }
            for p in &self.registration.allowed_repositories {
                if let Err(e) = crate::oidc::check_pattern(p) {
                    return Err(invalid("registration.allowed_repositories", e.to_string()));
                }
            }
        }
        let url = &self.github.api_url;
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(invalid(
                "github.api_url",
                "must be an http:// or https:// URL",
            ));
        }
        if url.parse::<http_uri::Uri>().is_err() {
            return Err(invalid("github.api_url", format!("{url:?} is not a URL")));
        }
        for (login, keys) in &self.github.static_keys {
            GithubLogin::parse(login)
                .map_err(|e| invalid("github.static_keys", format!("{login:?}: {e}")))?;
            for key in keys {
                crate::keys::parse_public_key(key)
                    .map_err(|e| invalid("github.static_keys", format!("{login}: {e}")))?;
            }
        }
        for admin in &self.access.admins {
            GithubLogin::parse(admin)
                .map_err(|e| invalid("access.admins", format!("{admin:?}: {e}")))?;
        }
        if !self.access.repository_permission.is_empty() {
            crate::access::Permission::parse(&self.access.repository_permission)
                .map_err(|e| invalid("access.repository_permission", e))?;
        }
        for team in &self.access.teams {
            crate::access::Team::parse(team).map_err(|e| invalid("access.teams", e))?;
        }
        let roles = !self.access.repository_permission.is_empty() || !self.access.teams.is_empty();
        if roles && !self.github.enabled {
            return Err(invalid(
                "access",
                "repository_permission and teams are read from GitHub, and github.enabled is false",
            ));
        }
        if self.access.jump_ports.is_empty() || self.access.jump_ports.contains(&0) {
            return Err(invalid(
                "access.jump_ports",
                "needs at least one port, all in 1..=65535",
            ));
        }
        for token in &self.registration.tokens {
            if token.expose().len() < 16 {
                return Err(invalid(
                    "registration.tokens",
                    "every token needs at least 16 characters",
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        for raw in &self.api.admin_tokens {
            let token =
                AdminToken::parse(raw.expose()).map_err(|e| invalid("api.admin_tokens", e))?;
            if !names.insert(token.name.clone()) {
                return Err(invalid(
                    "api.admin_tokens",
                    format!(
                        "{}: named twice (the audit trail could not tell them apart)",
                        token.name
                    ),
                ));
            }
            let reused = self.registration.tokens.iter().any(|t| {
                crate::secret::constant_time_eq(
                    t.expose().as_bytes(),
                    token.secret.expose().as_bytes(),
                )
            });
            if reused {
                return Err(invalid(
                    "api.admin_tokens",
                    format!(
                        "{}: the secret is also a registration token; they must differ",
                        token.name
                    ),
                ));
            }
        }
        let positive: [(&'static str, Duration); 10] = [
            ("ssh.auth_timeout", self.ssh.auth_timeout),
            ("ssh.idle_timeout", self.ssh.idle_timeout),
            ("ssh.keepalive_interval", self.ssh.keepalive_interval),
            ("ssh.failed_auth_window", self.ssh.failed_auth_window),
            ("github.key_cache_ttl", self.github.key_cache_ttl),
            ("github.fetch_timeout", self.github.fetch_timeout),
            ("registration.ttl", self.registration.ttl),
            ("hold.max", self.hold.max),
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.cert_validity", self.upstream.cert_validity),
        ];
        for (key, value) in positive {
            if value.is_zero() {
                return Err(invalid(key, "must be longer than 0s"));
            }
        }
        if self.api.request_timeout.is_zero() {
            return Err(invalid("api.request_timeout", "must be longer than 0s"));
        }
        let counts: [(&'static str, usize); 8] = [
            (
                "upstream.max_handshakes_per_runner",
                self.upstream.max_handshakes_per_runner,
            ),
            ("ssh.max_connections", self.ssh.max_connections),
            (
                "ssh.max_connections_per_source",
                self.ssh.max_connections_per_source,
            ),
            ("ssh.max_auth_attempts", self.ssh.max_auth_attempts),
            (
                "ssh.max_channels_per_connection",
                self.ssh.max_channels_per_connection,
            ),
            (
                "ssh.max_window_per_connection",
                self.ssh.max_window_per_connection,
            ),
            ("api.max_body_bytes", self.api.max_body_bytes),
            ("registration.max_jobs", self.registration.max_jobs),
        ];
        for (key, value) in counts {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        let budgets: [(&'static str, u32); 5] = [
            (
                "ssh.max_failed_auths_per_source",
                self.ssh.max_failed_auths_per_source,
            ),
            (
                "ssh.max_failed_auths_per_user",
                self.ssh.max_failed_auths_per_user,
            ),
            (
                "api.requests_per_minute_per_token",
                self.api.requests_per_minute_per_token,
            ),
            (
                "api.requests_per_minute_per_source",
                self.api.requests_per_minute_per_source,
            ),
            (
                "api.max_bad_tokens_per_source",
                self.api.max_bad_tokens_per_source,
            ),
        ];
        for (key, value) in budgets {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        let cert = !self.api.tls_cert.as_os_str().is_empty();
        let key = !self.api.tls_key.as_os_str().is_empty();
        if cert != key {
            return Err(invalid(
                "api.tls_cert",
                "api.tls_cert and api.tls_key must be set together",
            ));
        }
        if let Err(e) = self.metrics.listen_addr() {
            return Err(invalid("metrics.listen", e.to_string()));
        }
        if self.storage.data_dir.as_os_str().is_empty() {
            return Err(invalid("storage.data_dir", "must not be empty"));
        }
        self.check_storage()?;
        if let Err(e) = PublicAddress::parse(&self.ssh.public_host) {
            return Err(invalid("ssh.public_host", e.to_string()));
        }
        if self.hold.warn_before.len() > 8 {
            return Err(invalid("hold.warn_before", "at most 8 warnings"));
        }
        Ok(())
    }

    fn check_storage(&self) -> Result<(), ConfigError> {
        let st = &self.storage;
        let url = st.postgres_url.expose();
        match st.backend {
            Backend::Redb if !url.is_empty() => Err(invalid(
                "storage.postgres_url",
                "is set but storage.backend is \"redb\"; set backend = \"postgres\" to use it",
            )),
            Backend::Redb => Ok(()),
            Backend::Postgres => {
                if url.is_empty() {
                    return Err(invalid(
                        "storage.postgres_url",
                        "must be set with backend = \"postgres\" (postgres://user:password@host:port/db)",
                    ));
                }
                if let Err(e) = crate::pg::parse_url(url) {
                    return Err(invalid("storage.postgres_url", e));
                }
                if self.registration.tokens.is_empty() && self.registration.oidc_audience.is_empty()
                {
                    return Err(invalid(
                        "registration.tokens",
                        "must be set with backend = \"postgres\": every replica must accept the same \
                         registration tokens (a generated one would differ per replica)",
                    ));
                }
                if st.heartbeat.is_zero() || st.replica_timeout < st.heartbeat * 2 {
                    return Err(invalid(
                        "storage.replica_timeout",
                        "must be at least twice storage.heartbeat (and the heartbeat above zero)",
                    ));
                }
                Ok(())
            }
        }
    }

    /// Where users reach the SSH port (validated, so parsing cannot fail).
    pub fn public_address(&self) -> PublicAddress {
        PublicAddress::parse(&self.ssh.public_host).unwrap_or(PublicAddress {
            host: self.ssh.listen.ip().to_string(),
            port: self.ssh.listen.port(),
        })
    }

    /// The admin tokens (validated, so none fails to parse).
    pub fn admin_tokens(&self) -> Vec<AdminToken> {
        self.api
            .admin_tokens
            .iter()
            .filter_map(|t| AdminToken::parse(t.expose()).ok())
            .collect()
    }

    pub fn recording_dir(&self) -> PathBuf {
        if self.recording.dir.as_os_str().is_empty() {
            self.storage.data_dir.join("recordings")
        } else {
            self.recording.dir.clone()
        }
    }

    pub fn audit_path(&self) -> PathBuf {
        if self.audit.path.as_os_str().is_empty() {
            self.storage.data_dir.join("audit.jsonl")
        } else {
            self.audit.path.clone()
        }
    }

    /// Where the host key of `kind` lives: `ssh.host_key` names the
    /// ed25519 one if set; the rest are in `storage.data_dir`.
    pub fn host_key_path(&self, kind: crate::keys::HostKeyKind) -> PathBuf {
        match kind {
            crate::keys::HostKeyKind::Ed25519 if !self.ssh.host_key.as_os_str().is_empty() => {
                self.ssh.host_key.clone()
            }
            kind => self.storage.data_dir.join(kind.file_name()),
        }
    }

    /// The access policy, from `[access]` and `[registration]` (validated
    /// in `validate`, so parsing cannot fail here).
    pub fn policy(&self) -> crate::access::Policy {
        crate::access::Policy {
            admins: self.admins(),
            allow_extra_users: self.registration.allow_extra_users,
            jump_ports: self.access.jump_ports.clone(),
            repository_permission: crate::access::Permission::parse(
                &self.access.repository_permission,
            )
            .ok(),
            teams: self
                .access
                .teams
                .iter()
                .filter_map(|t| crate::access::Team::parse(t).ok())
                .collect(),
        }
    }

    pub fn admins(&self) -> Vec<GithubLogin> {
        // Validated in `validate`, so parsing cannot fail here.
        self.access
            .admins
            .iter()
            .filter_map(|a| GithubLogin::parse(a).ok())
            .collect()
    }
}

/// `ssh.public_host` split into the name users type and the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicAddress {
    pub host: String,
    pub port: u16,
}

impl PublicAddress {
    /// `host`, `host:port` or `[v6]:port`; the port defaults to 22.
    pub fn parse(raw: &str) -> Result<PublicAddress, AddrError> {
        let (host, port) = match raw.strip_prefix('[') {
            Some(rest) => {
                let (host, after) = rest.split_once(']').ok_or(AddrError::Unclosed)?;
                host.parse::<std::net::Ipv6Addr>()
                    .map_err(|_| AddrError::NotIpv6(host.into()))?;
                match after {
                    "" => (host, None),
                    p => (
                        host,
                        Some(p.strip_prefix(':').ok_or(AddrError::AfterBracket)?),
                    ),
                }
            }
            None => match raw.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (raw, None),
            },
        };
        let ok_name = |h: &str| {
            !h.is_empty()
                && h.len() <= 253
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'))
        };
        if !raw.starts_with('[') && !ok_name(host) {
            return Err(AddrError::BadHost(raw.into()));
        }
        let port = match port {
            None => 22,
            Some(p) => match p.parse::<u16>() {
                Ok(p) if p > 0 => p,
                _ => return Err(AddrError::BadPort(raw.into())),
            },
        };
        Ok(PublicAddress {
            host: host.to_string(),
            port,
        })
    }

    /// For `-J`/`ProxyJump`: `host` or `host:port` (`[v6]:port`).
    pub fn jump_spec(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 22 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// `ssh` arguments before the destination: `-p N ` when not 22.
    /// How `~/.ssh/known_hosts` names this address: `host`, or
    /// `[host]:port` off port 22.
    pub fn known_hosts_name(&self) -> String {
        if self.port == 22 {
            self.host.clone()
        } else {
            format!("[{}]:{}", self.host, self.port)
        }
    }

    pub fn port_flag(&self) -> String {
        if self.port == 22 {
            String::new()
        } else {
            format!("-p {} ", self.port)
        }
    }
}

/// A tiny URL check without pulling in a URL crate: scheme, authority, path.
mod http_uri {
    pub use axum::http::Uri;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_checked_and_need_github() {
        let err = load("[access]\nrepository_permission = \"read\"\n", &[]).unwrap_err();
        assert!(
            err.to_string().contains("access.repository_permission"),
            "{err}"
        );
        let err = load("[access]\nteams = [\"acme\"]\n", &[]).unwrap_err();
        assert!(err.to_string().contains("org/team-slug"), "{err}");
        let err = load(
            "[github]\nenabled = false\n[access]\nteams = [\"acme/oncall\"]\n",
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("github.enabled is false"), "{err}");
        let ok = load(
            "[access]\nrepository_permission = \"maintain\"\nteams = [\"Acme/OnCall\"]\n",
            &[],
        )
        .expect("valid");
        let policy = ok.policy();
        assert_eq!(
            policy.repository_permission,
            Some(crate::access::Permission::Maintain)
        );
        assert_eq!(policy.teams[0].to_string(), "acme/oncall");
    }

    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!("cigw-config-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("gateway.toml");
        std::fs::write(&path, toml).expect("write config");
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>();
        let result = Config::load_with_env(Some(&path), env);
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    #[test]
    fn embedded_defaults_are_valid_and_loopback_only() {
        let config = Config::load_with_env(None, Vec::new()).expect("defaults load");
        assert!(config.ssh.listen.ip().is_loopback());
        assert!(config.api.listen.ip().is_loopback());
        assert_eq!(config.access.jump_ports, vec![22, 3389]);
        assert_eq!(config.hold.max, Duration::from_secs(7200));
    }

    #[test]
    fn file_then_environment_override_defaults() {
        let config = load(
            "[github]\napi_url = \"http://127.0.0.1:9\"\nkey_cache_ttl = \"90s\"\n",
            &[("CI_GATEWAY__HOLD__MAX", "15m")],
        )
        .expect("valid");
        assert_eq!(config.github.api_url, "http://127.0.0.1:9");
        assert_eq!(config.github.key_cache_ttl, Duration::from_secs(90));
        assert_eq!(config.hold.max, Duration::from_secs(900));
    }

    #[test]
    fn unknown_key_is_named_in_the_error() {
        let err = load("[ssh]\nlisten_addr = \"127.0.0.1:1\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("listen_addr"), "{err}");
    }

    #[test]
    fn bad_duration_is_rejected() {
        let err = load("[hold]\nmax = \"forever\"\n", &[]).unwrap_err();
        assert!(
            err.to_string().contains("forever") || err.to_string().contains("max"),
            "{err}"
        );
    }

    #[test]
    fn half_configured_tls_names_the_key() {
        let err = load("[api]\ntls_cert = \"/x.pem\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("api.tls_cert"), "{err}");
    }

    #[test]
    fn public_host_takes_a_name_and_an_optional_port() {
        let ok = [
            ("gw.example.com", "gw.example.com", 22),
            ("gw.example.com:2222", "gw.example.com", 2222),
            ("127.0.0.1:2222", "127.0.0.1", 2222),
            ("[2001:db8::1]:22", "2001:db8::1", 22),
            ("[::1]", "::1", 22),
        ];
        for (raw, host, port) in ok {
            let a = PublicAddress::parse(raw).expect(raw);
            assert_eq!((a.host.as_str(), a.port), (host, port), "{raw}");
        }
        for bad in [
            "",
            "gw.example.com:0",
            "gw:x",
            "a b",
            "[::1",
            "[nope]:22",
            "gw -p 22",
        ] {
            assert!(PublicAddress::parse(bad).is_err(), "{bad:?}");
        }
        let err = load("[ssh]\npublic_host = \"gw -p 22\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("ssh.public_host"), "{err}");
    }

    #[test]
    fn invalid_admin_login_is_rejected() {
        let err = load("[access]\nadmins = [\"not a login\"]\n", &[]).unwrap_err();
        assert!(err.to_string().contains("access.admins"), "{err}");
    }

    #[test]
    fn static_keys_must_parse() {
        let err = load(
            "[github.static_keys]\noctocat = [\"ssh-ed25519 garbage\"]\n",
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("github.static_keys"), "{err}");
    }

    #[test]
    fn admin_tokens_are_named_long_and_apart_from_registration_tokens() {
        let secret = "0123456789abcdef01234567";
        for (entry, says) in [
            (secret.to_string(), "name:secret"),
            (format!("bad name:{secret}"), "name"),
            ("ops:short".to_string(), "at least 24"),
            (format!("ops:cgj_{secret}"), "job token"),
        ] {
            let toml = format!("[api]\nadmin_tokens = [{entry:?}]\n");
            let err = load(&toml, &[]).unwrap_err().to_string();
            assert!(
                err.contains("api.admin_tokens") && err.contains(says),
                "{entry}: {err}"
            );
        }
        let twice = format!("[api]\nadmin_tokens = [\"a:{secret}\", \"a:{secret}x\"]\n");
        assert!(load(&twice, &[]).unwrap_err().to_string().contains("twice"));
        let shared = format!(
            "[api]\nadmin_tokens = [\"a:{secret}\"]\n[registration]\ntokens = [\"a:{secret}\"]\n"
        );
        assert!(load(&shared, &[])
            .unwrap_err()
            .to_string()
            .contains("registration token"));
        let config = load(
            "",
            &[(
                "CI_GATEWAY__API__ADMIN_TOKENS",
                &format!("ops:{secret},b:{secret}"),
            )],
        )
        .expect("valid");
        let tokens = config.admin_tokens();
        assert_eq!(tokens.len(), 2);
        assert_eq!(tokens[0].name, "ops");
        assert_eq!(tokens[0].secret.expose(), &format!("ops:{secret}"));
    }

    #[test]
    fn short_tokens_are_rejected() {
        let err = load("[registration]\ntokens = [\"short\"]\n", &[]).unwrap_err();
        assert!(err.to_string().contains("registration.tokens"), "{err}");
    }

    #[test]
    fn the_shipped_example_config_is_valid() {
        let example = include_str!("../../config/gateway.example.toml");
        let config = load(example, &[]).expect("config/gateway.example.toml validates");
        assert_eq!(config.access.admins, vec!["octocat".to_string()]);
    }

    #[test]
    fn list_from_environment() {
        let config = load("", &[("CI_GATEWAY__ACCESS__JUMP_PORTS", "22,2222")]).expect("valid");
        assert_eq!(config.access.jump_ports, vec![22, 2222]);
    }
}
