//! `ci-gateway runner …`: the runner's side (DESIGN §1, §4, §9).
//!
//! - `register` reads the runner's SSH host keys, registers the job, installs
//!   the returned `authorized_keys` lines (in a marked block, see
//!   [`authorized_keys`]), starts a background refresher that keeps the
//!   registration alive, and prints the commands users copy from the CI log.
//! - `wait` tells the gateway the job finished and returns when the hold is
//!   over (at once if nobody is connected), showing who is connected.
//! - `deregister` ends the job at the gateway (its sessions are closed) and
//!   removes the installed lines. Safe to run twice or without `register`.
//!
//! Every option also comes from an environment variable (`CI_GATEWAY_*`),
//! with defaults from the GitHub Actions environment.
//!
//! Credentials: `register` creates the job with the registration token (or
//! the job's OIDC token) and gets back the job's own token, which it keeps
//! in the state file (mode 0600, written through a fresh temporary file, so
//! a planted symlink is never followed). Every later call (the refresher,
//! `wait`, `deregister`) presents that job token: the registration token
//! may only create jobs. Neither token is ever printed, and the registration
//! token is never written to disk or handed to the refresher.

pub mod authorized_keys;
mod breakpoint;
pub mod client;
mod deregister;
mod register;
mod state;
mod tunnel;
mod wait;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::api::{JobStatus, RegisterRequest, RegisterResponse};
use crate::registry::{Os, RunnerLogin};
use crate::secret::Secret;
use clap::{Args, Subcommand};
use client::{Api, ApiError};
use deregister::*;
use register::*;
use serde::{Deserialize, Serialize};
use state::*;
use tunnel::*;
use wait::*;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register this job with the gateway and make the runner reachable.
    Register(Box<RegisterArgs>),
    /// Tell the gateway the job finished; return when the hold is over.
    Wait(WaitArgs),
    /// Pause the job at this step (usually under `if: failure()`): hold
    /// while someone is connected, then let the job go on. A connected
    /// person resumes it at once with `ci-gateway-continue`.
    Breakpoint(BreakpointArgs),
    /// End the job at the gateway and remove the installed keys.
    Deregister(DeregisterArgs),
    /// (internal) Keep a registration fresh; started by `register`.
    #[command(hide = true)]
    Refresh(Common),
    /// (internal) Hold the job's reverse tunnel; started by `register --tunnel`.
    #[command(hide = true)]
    Tunnel(Common),
}

#[derive(Debug, Clone, Args)]
pub struct Common {
    /// The gateway's runner API, e.g. https://ci-gateway.example.com:8443
    #[arg(long, env = "CI_GATEWAY_URL")]
    pub gateway: String,
    /// A registration token of the gateway.
    #[arg(long, env = "CI_GATEWAY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Instead of a token: prove the job with a GitHub Actions OIDC token for
    /// this audience (the job needs `permissions: id-token: write`).
    #[arg(long, env = "CI_GATEWAY_OIDC_AUDIENCE")]
    pub oidc_audience: Option<String>,
    /// GitHub's numeric job id (`${{ job.check_run_id }}`). Without it, on
    /// GitHub Actions, it is looked up through the REST API (needs
    /// GITHUB_TOKEN with `actions: read`).
    #[arg(long, env = "CI_GATEWAY_JOB_ID")]
    pub job_id: Option<String>,
    /// Extra PEM trust roots for the gateway's HTTPS certificate.
    #[arg(long, env = "CI_GATEWAY_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Where the agent keeps its state between steps (default: $RUNNER_TEMP
    /// or the system's temporary directory).
    #[arg(long, env = "CI_GATEWAY_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RegisterArgs {
    #[command(flatten)]
    pub common: Common,
    /// Who the job belongs to (default: GITHUB_TRIGGERING_ACTOR, then GITHUB_ACTOR).
    #[arg(long, env = "CI_GATEWAY_ACTOR")]
    pub actor: Option<String>,
    /// The runner account users get (default: the current user).
    #[arg(long, env = "CI_GATEWAY_USER")]
    pub user: Option<String>,
    /// The address the gateway dials (default: where the request comes from).
    #[arg(long, env = "CI_GATEWAY_HOST")]
    pub host: Option<String>,
    /// The runner's sshd port.
    #[arg(long, env = "CI_GATEWAY_PORT", default_value_t = 22)]
    pub port: u16,
    /// The authorized_keys file sshd reads for the user (default: the user's
    /// ~/.ssh/authorized_keys; on Windows
    /// %PROGRAMDATA%\ssh\administrators_authorized_keys).
    #[arg(long, env = "CI_GATEWAY_AUTHORIZED_KEYS")]
    pub authorized_keys: Option<PathBuf>,
    /// Also append the gateway's and the runner's `known_hosts` lines to
    /// this file (a one-machine trial, where the user is on the runner; on
    /// a real runner users copy the printed lines from the job's log).
    #[arg(long, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
    /// More GitHub logins allowed on this job, comma-separated.
    #[arg(long, env = "CI_GATEWAY_ALLOWED_USERS", value_delimiter = ',')]
    pub allowed_users: Vec<String>,
    /// Host public key files (default: ssh_host_*_key.pub in /etc/ssh, or
    /// %PROGRAMDATA%\ssh on Windows). Repeat or separate with commas.
    #[arg(long = "host-key", env = "CI_GATEWAY_HOST_KEYS", value_delimiter = ',')]
    pub host_keys: Vec<PathBuf>,
    /// linux, windows or macos (default: this machine's).
    #[arg(long, env = "CI_GATEWAY_OS")]
    pub os: Option<String>,
    /// How the gateway logs in here in job mode: `certificate` (OpenSSH) or
    /// `key` (a key made for this job: Windows, dropbear). Default: `key` on
    /// Windows, `certificate` elsewhere.
    #[arg(long, env = "CI_GATEWAY_RUNNER_LOGIN")]
    pub runner_login: Option<String>,
    /// The gateway cannot dial this runner (NAT, a Kubernetes pod, a hosted
    /// runner): keep a reverse tunnel to the gateway instead, through which
    /// it reaches the sshd on 127.0.0.1:<port>. Registers no address.
    #[arg(long, env = "CI_GATEWAY_TUNNEL")]
    pub tunnel: bool,
    /// With --tunnel: the ports besides the sshd that the tunnel opens on
    /// this machine's loopback, if the gateway allows them too.
    #[arg(
        long = "tunnel-port",
        env = "CI_GATEWAY_TUNNEL_PORTS",
        value_delimiter = ',',
        default_value = "3389"
    )]
    pub tunnel_ports: Vec<u16>,
    /// With --tunnel: the address on this machine the tunnel's far end
    /// connects to, for the sshd and the ports (a loopback address, or the
    /// one address the sshd listens on).
    #[arg(long, env = "CI_GATEWAY_TUNNEL_HOST", default_value = "127.0.0.1")]
    pub tunnel_host: std::net::IpAddr,
    /// With --tunnel: how the tunnel reaches the gateway: `ssh` (its SSH
    /// port), `websocket` (the API's port, through HTTPS_PROXY if set), or
    /// `auto` (the SSH port, else the WebSocket).
    #[arg(long, env = "CI_GATEWAY_TUNNEL_TRANSPORT", value_enum, default_value_t = Transport::Auto)]
    pub tunnel_transport: Transport,
    /// With --tunnel: the gateway's SSH address (host:port), when the one it
    /// publishes is not the one this runner reaches.
    #[arg(long, env = "CI_GATEWAY_TUNNEL_SSH")]
    pub tunnel_ssh: Option<String>,
    /// Do not start the background refresher (the registration then expires
    /// after the gateway's registration.ttl unless refreshed otherwise).
    #[arg(long)]
    pub no_refresh: bool,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    #[command(flatten)]
    pub common: Common,
    /// Release the runner if the gateway stays unreachable this long.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub unreachable_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct BreakpointArgs {
    #[command(flatten)]
    pub common: Common,
    /// Go on if the gateway stays unreachable this long.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub unreachable_timeout: Duration,
    /// Where `ci-gateway-continue` is installed (default: the directory of
    /// this binary, which the action puts on the PATH).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DeregisterArgs {
    #[command(flatten)]
    pub common: Common,
    /// The runner account, to find its authorized_keys when `register`
    /// left no state (default: the current user).
    #[arg(long, env = "CI_GATEWAY_USER")]
    pub user: Option<String>,
    /// The authorized_keys file to clean (default: as `register`).
    #[arg(long, env = "CI_GATEWAY_AUTHORIZED_KEYS")]
    pub authorized_keys: Option<PathBuf>,
}

/// A failure that ends the command: its message goes to the CI log.
#[derive(Debug)]
struct Failure(String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure(e.to_string())
    }
}

pub fn run(command: Command) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ci-gateway runner: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command {
            Command::Register(a) => register(*a).await,
            Command::Wait(a) => wait(a).await,
            Command::Breakpoint(a) => breakpoint::breakpoint(a).await,
            Command::Deregister(a) => deregister(a).await,
            Command::Refresh(c) => refresh(c).await,
            Command::Tunnel(c) => tunnel(c).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(Failure(message)) => {
            eprintln!("ci-gateway runner: {message}");
            ExitCode::FAILURE
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// The API as the job: its job token from the state file when there is
/// one, else the command's own credential (an OIDC token of this job works;
/// a registration token is refused for anything but creating).
fn job_api(common: &Common, state: Option<&StateFile>) -> Result<Api, Failure> {
    match state.and_then(|s| s.job_token.clone()) {
        Some(token) => Api::with_credential(
            &common.gateway,
            client::Credential::Token(Secret::new(token)),
            common.ca_cert.as_deref(),
        )
        .map_err(Failure::from),
        None => api(common),
    }
}

fn api(common: &Common) -> Result<Api, Failure> {
    let credential = match (&common.token, &common.oidc_audience) {
        (Some(token), _) => client::Credential::Token(Secret::new(token.clone())),
        (None, Some(audience)) => {
            let (Some(url), Some(request_token)) = (
                env("ACTIONS_ID_TOKEN_REQUEST_URL"),
                env("ACTIONS_ID_TOKEN_REQUEST_TOKEN"),
            ) else {
                return Err(Failure(
                    "--oidc-audience needs ACTIONS_ID_TOKEN_REQUEST_URL and _TOKEN: give the job `permissions: id-token: write`".into(),
                ));
            };
            client::Credential::ActionsOidc {
                url,
                request_token: Secret::new(request_token),
                audience: audience.clone(),
            }
        }
        (None, None) => {
            return Err(Failure(
                "no credential: set CI_GATEWAY_TOKEN (--token) or CI_GATEWAY_OIDC_AUDIENCE (--oidc-audience)".into(),
            ))
        }
    };
    Api::with_credential(&common.gateway, credential, common.ca_cert.as_deref())
        .map_err(Failure::from)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn clock(unix: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(unix);
    let text = humantime::format_rfc3339_seconds(t).to_string();
    // 2026-11-29T21:04:05Z -> 21:04:05 UTC
    match text.split_once('T') {
        Some((_, time)) => format!("{} UTC", time.trim_end_matches('Z')),
        None => text,
    }
}

fn span(seconds: u64) -> String {
    humantime::format_duration(Duration::from_secs(seconds)).to_string()
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cigw-agent-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        dir
    }

    #[test]
    fn the_state_directory_is_made_private_and_a_planted_one_is_refused() {
        let base = scratch();
        let made = base.join("made");
        private_dir(&made).expect("created");
        let mode = std::fs::metadata(&made).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        private_dir(&made).expect("twice is fine");
        // A symlink planted where the directory goes (towards a directory
        // the attacker reads) is not followed.
        let target = base.join("attackers");
        std::fs::create_dir_all(&target).expect("mkdir");
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let link = base.join("linked");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let err = private_dir(&link).expect_err("a symlink").0;
        assert!(err.contains("not a directory"), "{err}");
        // A directory others may enter is refused.
        let open = base.join("open");
        std::fs::create_dir_all(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = private_dir(&open).expect_err("world-writable").0;
        assert!(err.contains("0700"), "{err}");
        let _ = std::fs::remove_dir_all(base);
    }

    #[test]
    fn state_reads_refuse_links_and_huge_files_and_writes_are_owner_only() {
        let base = scratch();
        let path = base.join("ci-gateway-job-1.json");
        let state = StateFile {
            gateway: "http://g".into(),
            job_id: "1".into(),
            authorized_keys: base.join("ak"),
            registration: RegisterRequest::default(),
            refresh_seconds: 5,
            finished: false,
            job_token: Some("cgj_x".into()),
            tunnel: None,
        };
        write_state(&path, &state).expect("write");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o077, 0, "it holds the job token");
        assert_eq!(
            read_state(&path).expect("read").job_token.as_deref(),
            Some("cgj_x")
        );
        // A temporary file planted as a symlink to a victim is replaced,
        // not written through.
        let victim = base.join("victim");
        std::fs::write(&victim, "precious").expect("write");
        std::os::unix::fs::symlink(&victim, path.with_extension("json.tmp")).expect("symlink");
        write_state(&path, &state).expect("write again");
        assert_eq!(std::fs::read_to_string(&victim).expect("read"), "precious");
        // A state file that is a link (to /dev/zero, say) is not read.
        let linked = base.join("ci-gateway-job-2.json");
        std::os::unix::fs::symlink("/dev/zero", &linked).expect("symlink");
        assert!(read_state(&linked).is_none());
        let huge = base.join("ci-gateway-job-3.json");
        std::fs::write(&huge, vec![b' '; (1 << 20) + 1]).expect("write");
        assert!(read_state(&huge).is_none());
        let _ = std::fs::remove_dir_all(base);
    }
}
