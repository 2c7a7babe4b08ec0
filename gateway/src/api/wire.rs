//! What the API reads and writes: the registration body and answer, the
//! `GET` query and the job's status, the deregistration's answer; and why a
//! body is refused. The agent (`crate::agent`) sends and reads these same
//! types, so the two ends cannot drift apart.

use super::*;

/// The body of `PUT /v1/jobs/{job_id}`. Fields left out are not sent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// Required with a static token; with an OIDC token it comes from the
    /// token (and must agree if given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    pub user: String,
    pub host_keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<Os>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_users: Vec<String>,
    /// How the gateway logs in to the runner in job mode; default `key` for
    /// Windows, `certificate` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_login: Option<RunnerLogin>,
    /// The runner cannot be dialed: its agent holds a reverse tunnel to the
    /// gateway (DESIGN §10). Such a registration names no `host`; `port` is
    /// the runner's sshd as the agent reaches it locally.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tunnel: bool,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub job_id: String,
    /// Only in the answer that created the job (`201`): every later call on
    /// the job needs it. Shown once; the gateway keeps only its hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_token: Option<String>,
    pub authorized_keys: Vec<String>,
    /// Job mode: `ssh <job>@gateway`.
    pub ssh_command: String,
    /// Jump mode for the job's actor (others put their own login).
    pub jump_command: String,
    /// An `~/.ssh/config` block that makes `ssh job-<id>` work.
    pub ssh_config: String,
    /// `~/.ssh/known_hosts` lines, so a first connection is checked rather
    /// than trusted: the gateway's host keys under its public address, and
    /// the runner's under `job-<id>` (the name both `ssh -J … job-<id>` and
    /// the `Host job-*` block make OpenSSH look up).
    #[serde(default)]
    pub known_hosts: Vec<String>,
    /// The RDP forward, for Windows runners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdp_command: Option<String>,
    /// Re-register at least this often, or the registration expires.
    pub refresh_seconds: u64,
    pub hold_max_seconds: u64,
    /// For a tunnel registration: where and how the agent holds the tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelInfo>,
}

/// What an agent needs to hold its job's tunnel. The host keys come over
/// the API's HTTPS (or a pinned CA), so the SSH connection that follows is
/// authenticated both ways: the agent pins these, the gateway checks the
/// job token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelInfo {
    /// The SSH username: `tunnel+<job-id>`.
    pub user: String,
    /// The gateway's SSH address as the operator published it (`host:port`).
    pub ssh_address: String,
    /// The gateway's SSH host public keys, OpenSSH format.
    pub host_keys: Vec<String>,
    /// The ports the gateway may ask the agent to open on the runner's side,
    /// besides the sshd (which it asks for as port 22).
    pub ports: Vec<u16>,
}

/// Why a registration body is refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Invalid {
    /// `400`: a field is malformed or not allowed; names the field.
    Bad(String),
    /// `409`: a refresh tried to change a field fixed at creation.
    Changed(Changed),
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Invalid::Bad(m) => f.write_str(m),
            Invalid::Changed(c) => c.fmt(f),
        }
    }
}

/// A refresh that would change what the job is (DESIGN §4): the first
/// field that differs, and what it was and would become when that is short
/// enough to show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Changed {
    #[error(
        "{field}: fixed when the job was registered ({was}); a refresh cannot change it to {now}"
    )]
    Value {
        field: &'static str,
        was: String,
        now: String,
    },
    #[error("host_keys: fixed when the job was registered; a refresh cannot change them")]
    HostKeys,
}

impl Changed {
    pub fn field(&self) -> &'static str {
        match self {
            Changed::Value { field, .. } => field,
            Changed::HostKeys => "host_keys",
        }
    }
}

/// An OIDC caller's body that contradicts its token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimMismatch {
    #[error("the token is for job {token}, not job {job}")]
    OtherJob { token: u64, job: JobId },
    #[error("{field}: the token says {token_says}")]
    Field {
        field: &'static str,
        token_says: String,
    },
}

impl From<String> for Invalid {
    fn from(s: String) -> Invalid {
        Invalid::Bad(s)
    }
}

impl From<&str> for Invalid {
    fn from(s: &str) -> Invalid {
        Invalid::Bad(s.to_string())
    }
}

/// `GET /v1/jobs/{id}?wait=N`: with `wait`, answers when the job's sessions
/// or hold change, or after N seconds (at most [`MAX_WAIT_SECONDS`]): the
/// runner's `wait` long-polls instead of hammering the API.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetQuery {
    #[serde(default)]
    pub(super) wait: Option<u64>,
}

pub const MAX_WAIT_SECONDS: u64 = 25;

/// What `GET` shows of a job to its own runner: the registration without
/// the token hash or the store's version.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobView {
    pub job_id: JobId,
    pub actor: GithubLogin,
    pub host: IpAddr,
    pub port: u16,
    pub user: String,
    pub host_keys: Vec<String>,
    pub repository: Option<String>,
    pub run_id: Option<u64>,
    pub os: Os,
    pub runner_login: RunnerLogin,
    pub allowed_users: Vec<GithubLogin>,
    pub registered_at: u64,
    pub refreshed_at: u64,
    pub finished_at: Option<u64>,
}

impl JobView {
    pub fn of(r: &Registration) -> JobView {
        JobView {
            job_id: r.job_id,
            actor: r.actor.clone(),
            host: r.host,
            port: r.port,
            user: r.user.clone(),
            host_keys: r.host_keys.clone(),
            repository: r.repository.clone(),
            run_id: r.run_id,
            os: r.os,
            runner_login: r.runner_login,
            allowed_users: r.allowed_users.clone(),
            registered_at: r.registered_at,
            refreshed_at: r.refreshed_at,
            finished_at: r.finished_at,
        }
    }
}

/// `GET /v1/jobs/{id}` and `POST /v1/jobs/{id}/finished`: the job, who is
/// connected, and where its hold stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobStatus {
    #[serde(flatten)]
    pub job: JobView,
    pub active_sessions: usize,
    pub sessions: Vec<SessionView>,
    pub hold: HoldView,
    /// Whether the job waits at a breakpoint (`runner breakpoint`).
    #[serde(default)]
    pub paused: bool,
    /// The breakpoint's terms, while paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<PauseView>,
    /// A tunnel registration's tunnel, as this gateway sees it; absent for
    /// a runner the gateway dials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelView>,
}

/// A breakpoint: since when, until when at most (`hold.max`), how long it
/// waits for a first person (`hold.connect_grace`), and how to get in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseView {
    pub since: u64,
    pub deadline: u64,
    pub connect_grace_seconds: u64,
    pub ssh_command: String,
    pub jump_command: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelView {
    pub up: bool,
    /// When the tunnel that is up connected (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// How many times the agent connected the tunnel.
    pub connects: u64,
}

/// One open user connection. No source address: the runner side (and a
/// public CI log) has no business knowing where users are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionView {
    pub login: String,
    /// `job` (the gateway bridges it) or `jump` (end to end to the runner).
    pub mode: String,
    /// Unix seconds.
    pub since: u64,
}

impl From<&crate::registry::SessionInfo> for SessionView {
    fn from(s: &crate::registry::SessionInfo) -> SessionView {
        SessionView {
            login: s.login.clone(),
            mode: s.mode.to_string(),
            since: s.since,
        }
    }
}

/// Where a job's hold stands. A running job shows `max_seconds`; a finished
/// one its finish, deadline and the time left (unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldView {
    pub state: crate::hold::HoldState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_seconds: Option<u64>,
}

/// `DELETE /v1/jobs/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Deregistered {
    pub job_id: String,
    pub deregistered: bool,
}
