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
pub mod client;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::secret::Secret;
use client::{Api, ApiError};

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register this job with the gateway and make the runner reachable.
    Register(Box<RegisterArgs>),
    /// Tell the gateway the job finished; return when the hold is over.
    Wait(WaitArgs),
    /// End the job at the gateway and remove the installed keys.
    Deregister(DeregisterArgs),
    /// (internal) Keep a registration fresh; started by `register`.
    #[command(hide = true)]
    Refresh(Common),
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

/// What `register` leaves for `wait`, `deregister` and the refresher. Holds
/// the job token, so it is written owner-only.
#[derive(Serialize, Deserialize)]
struct StateFile {
    gateway: String,
    job_id: String,
    authorized_keys: PathBuf,
    registration: Value,
    refresh_seconds: u64,
    finished: bool,
    /// The job's own token from the creating `PUT`.
    #[serde(default)]
    job_token: Option<String>,
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
            Command::Deregister(a) => deregister(a).await,
            Command::Refresh(c) => refresh(c).await,
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
        .map_err(Failure),
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
    Api::with_credential(&common.gateway, credential, common.ca_cert.as_deref()).map_err(Failure)
}

/// Where the private state directory goes: `--state-dir`, `RUNNER_TEMP`, or
/// the system's temporary directory (possibly shared with other users).
fn state_base(common: &Common) -> PathBuf {
    common
        .state_dir
        .clone()
        .or_else(|| env("RUNNER_TEMP").map(PathBuf::from))
        .unwrap_or_else(std::env::temp_dir)
}

/// The job's state file, inside `<base>/ci-gateway-state`: a directory of
/// this user's alone (0700), made if missing and checked like sshd's
/// StrictModes (a real directory, not a symlink, owned by us, closed to
/// others), because the file holds the job token.
fn state_path(common: &Common, job: &str) -> Result<PathBuf, Failure> {
    let dir = state_base(common).join("ci-gateway-state");
    private_dir(&dir)?;
    Ok(dir.join(format!("ci-gateway-job-{job}.json")))
}

fn private_dir(dir: &Path) -> Result<(), Failure> {
    let shown = dir.display();
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| Failure(format!("{}: {e}", parent.display())))?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Failure(format!("{shown}: {e}"))),
        }
        let meta = std::fs::symlink_metadata(dir).map_err(|e| Failure(format!("{shown}: {e}")))?;
        if !meta.file_type().is_dir() {
            return Err(Failure(format!(
                "{shown} is not a directory (a symlink?); refusing to keep the job token there"
            )));
        }
        // /proc/self belongs to the effective user (Linux); elsewhere the
        // mode check below still holds.
        if let Ok(me) = std::fs::metadata("/proc/self").map(|m| m.uid()) {
            if meta.uid() != me {
                return Err(Failure(format!(
                    "{shown} belongs to another user; refusing to keep the job token there"
                )));
            }
        }
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(Failure(format!(
                "{shown} is open to other users (mode {:o}); it must be 0700",
                meta.permissions().mode() & 0o777
            )));
        }
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir).map_err(|e| Failure(format!("{shown}: {e}")))?;
    Ok(())
}

/// The state, if `path` is a regular file (no symlink) of at most 1 MiB.
fn read_state(path: &Path) -> Option<StateFile> {
    use std::io::Read;
    const MAX: u64 = 1 << 20;
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.file_type().is_file() || meta.len() > MAX {
        return None;
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX)
        .read_to_end(&mut bytes)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Writes the state owner-only: a fresh temporary file (created new, so a
/// symlink planted at its name is not followed), then renamed into place.
fn write_state(path: &Path, state: &StateFile) -> Result<(), Failure> {
    let bytes = serde_json::to_vec_pretty(state)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let written = options.open(&tmp).and_then(|mut f| {
        use std::io::Write;
        f.write_all(&bytes)?;
        f.sync_all()
    });
    written.map_err(|e| Failure(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| Failure(format!("{}: {e}", path.display())))?;
    Ok(())
}

/// The job id: given, or found through GitHub's REST API (GHES has no
/// `job.check_run_id`; DESIGN §9).
async fn job_id(common: &Common) -> Result<String, Failure> {
    if let Some(id) = &common.job_id {
        let id = id.trim().trim_start_matches("job-");
        return match crate::ids::JobId::parse(id) {
            Ok(j) => Ok(j.to_string()),
            Err(e) => Err(Failure(format!("--job-id {id:?}: {e}"))),
        };
    }
    let need = |name: &str| {
        env(name).ok_or_else(|| {
            Failure(format!(
                "no job id: pass --job-id (or CI_GATEWAY_JOB_ID, in a workflow ${{{{ job.check_run_id }}}}); \
                 looking it up through GitHub's API needs {name}"
            ))
        })
    };
    let api_url = env("GITHUB_API_URL").unwrap_or_else(|| "https://api.github.com".into());
    let repo = need("GITHUB_REPOSITORY")?;
    let run_id = need("GITHUB_RUN_ID")?;
    let attempt = env("GITHUB_RUN_ATTEMPT").unwrap_or_else(|| "1".into());
    let runner = need("RUNNER_NAME")?;
    let token = need("GITHUB_TOKEN")?;
    let github =
        Api::new(&api_url, Secret::new(token), common.ca_cert.as_deref()).map_err(Failure)?;
    for page in 1..=10 {
        let path = format!(
            "/repos/{repo}/actions/runs/{run_id}/attempts/{attempt}/jobs?per_page=100&page={page}"
        );
        let listing = github
            .get_json(&path)
            .await
            .map_err(|e| Failure(format!("looking up the job id on GitHub: {e}")))?;
        let jobs = listing["jobs"].as_array().cloned().unwrap_or_default();
        if let Some(job) = jobs.iter().find(|j| {
            j["runner_name"].as_str() == Some(runner.as_str())
                && j["status"].as_str() == Some("in_progress")
        }) {
            if let Some(id) = job["id"].as_u64() {
                return Ok(id.to_string());
            }
        }
        if jobs.len() < 100 {
            break;
        }
    }
    Err(Failure(format!(
        "no in-progress job of run {run_id} (attempt {attempt}) runs on runner {runner:?}; pass --job-id"
    )))
}

fn current_user() -> Option<String> {
    env("USER").or_else(|| env("USERNAME")).or_else(|| {
        let out = std::process::Command::new("id").arg("-un").output().ok()?;
        let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!name.is_empty()).then_some(name)
    })
}

/// The user's home directory and ids from /etc/passwd (Unix).
fn passwd_entry(user: &str) -> Option<(PathBuf, authorized_keys::Owner)> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() >= 7 && f[0] == user).then(|| {
            (
                PathBuf::from(f[5]),
                authorized_keys::Owner {
                    uid: f[2].parse().unwrap_or(0),
                    gid: f[3].parse().unwrap_or(0),
                },
            )
        })
    })
}

fn program_data() -> PathBuf {
    PathBuf::from(env("PROGRAMDATA").unwrap_or_else(|| r"C:\ProgramData".into()))
}

/// Where sshd looks for `user`'s keys (DESIGN §9), and who should own it.
fn default_authorized_keys(
    user: &str,
    windows: bool,
) -> Result<(PathBuf, Option<authorized_keys::Owner>), Failure> {
    if windows {
        // Runner accounts are administrators: sshd's default config reads
        // this file for them, not the user's own.
        return Ok((
            program_data()
                .join("ssh")
                .join("administrators_authorized_keys"),
            None,
        ));
    }
    if let Some((home, owner)) = passwd_entry(user) {
        return Ok((home.join(".ssh").join("authorized_keys"), Some(owner)));
    }
    if current_user().as_deref() == Some(user) {
        if let Some(home) = env("HOME") {
            return Ok((
                PathBuf::from(home).join(".ssh").join("authorized_keys"),
                None,
            ));
        }
    }
    Err(Failure(format!(
        "cannot find the home of user {user:?}; pass --authorized-keys"
    )))
}

fn host_key_files(given: &[PathBuf], windows: bool) -> Result<Vec<PathBuf>, Failure> {
    if !given.is_empty() {
        return Ok(given.to_vec());
    }
    let dir = if windows {
        program_data().join("ssh")
    } else {
        PathBuf::from("/etc/ssh")
    };
    let mut found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| Failure(format!("reading host keys in {}: {e}", dir.display())))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("ssh_host_") && n.ends_with("_key.pub"))
        })
        .collect();
    found.sort();
    if found.is_empty() {
        return Err(Failure(format!(
            "no SSH host keys (ssh_host_*_key.pub) in {}: is the OpenSSH server installed? Or pass --host-key",
            dir.display()
        )));
    }
    Ok(found)
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

async fn register(args: RegisterArgs) -> Result<ExitCode, Failure> {
    let job = job_id(&args.common).await?;
    let os = match args.os.as_deref() {
        Some(o @ ("linux" | "windows" | "macos")) => o.to_string(),
        Some(other) => {
            return Err(Failure(format!(
                "--os {other:?}: expected linux, windows or macos"
            )))
        }
        None if cfg!(windows) => "windows".into(),
        None if cfg!(target_os = "macos") => "macos".into(),
        None => "linux".into(),
    };
    let windows = os == "windows";
    // With OIDC the gateway takes the actor from the token; send one only
    // when it was given explicitly (it must then agree).
    let oidc = args.common.token.is_none() && args.common.oidc_audience.is_some();
    let actor = match args.actor.clone() {
        Some(a) => Some(a),
        None if oidc => None,
        None => Some(
            env("GITHUB_TRIGGERING_ACTOR")
                .or_else(|| env("GITHUB_ACTOR"))
                .ok_or_else(|| {
                    Failure(
                        "no actor: pass --actor (on GitHub Actions it defaults to the triggering actor)"
                            .into(),
                    )
                })?,
        ),
    };
    let user = args
        .user
        .clone()
        .or_else(current_user)
        .ok_or_else(|| Failure("no runner user: pass --user".into()))?;
    let (keys_path, owner) = match &args.authorized_keys {
        Some(p) => (p.clone(), passwd_entry(&user).map(|(_, o)| o)),
        None => default_authorized_keys(&user, windows)?,
    };
    let mut host_keys = Vec::new();
    for path in host_key_files(&args.host_keys, windows)? {
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Failure(format!("host key {}: {e}", path.display())))?;
        if let Some(line) = text.lines().map(str::trim).find(|l| !l.is_empty()) {
            host_keys.push(line.to_string());
        }
    }
    let mut body = json!({
        "user": user,
        "port": args.port,
        "host_keys": host_keys,
        "os": os,
        "allowed_users": args.allowed_users.iter().map(|u| u.trim()).filter(|u| !u.is_empty()).collect::<Vec<_>>(),
    });
    match args.runner_login.as_deref() {
        None => {}
        Some(login @ ("certificate" | "key")) => body["runner_login"] = json!(login),
        Some(other) => {
            return Err(Failure(format!(
                "--runner-login {other:?}: expected certificate or key"
            )))
        }
    }
    if let Some(actor) = &actor {
        body["actor"] = json!(actor);
    }
    if let Some(host) = &args.host {
        body["host"] = json!(host);
    }
    if let Some(repo) = env("GITHUB_REPOSITORY") {
        body["repository"] = json!(repo);
    }
    if let Some(run) = env("GITHUB_RUN_ID").and_then(|r| r.parse::<u64>().ok()) {
        body["run_id"] = json!(run);
    }
    // Before the gateway hears of the job: a place sshd would refuse or a
    // link we must not write through fails here, with nothing registered.
    authorized_keys::check_place(&keys_path, owner).map_err(Failure)?;
    let state_path = state_path(&args.common, &job)?;
    // Registering again within the same job (a retried step) refreshes with
    // the job token it already holds.
    let earlier = read_state(&state_path).filter(|s| s.job_token.is_some());
    let api = job_api(&args.common, earlier.as_ref())?;
    let answer = api
        .register(&job, &body)
        .await
        .map_err(|e| Failure(format!("registering job {job}: {e}")))?;
    let job_token = match (answer["job_token"].as_str(), earlier) {
        (Some(t), _) => t.to_string(),
        (None, Some(earlier)) => earlier.job_token.unwrap_or_default(),
        (None, None) => {
            return Err(Failure(format!(
                "registering job {job}: the gateway sent no job token (the job was registered \
                 before, and this runner does not hold its token)"
            )))
        }
    };
    let lines: Vec<String> = answer["authorized_keys"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if lines.is_empty() {
        return Err(Failure("the gateway sent no authorized_keys lines".into()));
    }
    authorized_keys::edit_file(&keys_path, owner, |text| {
        authorized_keys::install(text, &job, &lines)
    })
    .map_err(Failure)?;
    let refresh_seconds = answer["refresh_seconds"].as_u64().unwrap_or(60).max(1);
    write_state(
        &state_path,
        &StateFile {
            gateway: api.base().to_string(),
            job_id: job.clone(),
            authorized_keys: keys_path.clone(),
            registration: body,
            refresh_seconds,
            finished: false,
            job_token: Some(job_token),
        },
    )?;
    if !args.no_refresh {
        start_refresher(&args.common, &job, &state_path)?;
    }
    print_commands(&job, &answer, &keys_path, lines.len());
    Ok(ExitCode::SUCCESS)
}

fn print_commands(job: &str, answer: &Value, keys_path: &Path, lines: usize) {
    let s = |k: &str| answer[k].as_str().unwrap_or_default().to_string();
    let hold = answer["hold_max_seconds"].as_u64().unwrap_or(0);
    println!(
        "ci-gateway: job {job} is registered; {lines} key line(s) installed in {}",
        keys_path.display()
    );
    println!();
    println!("  A shell on this runner:");
    println!("      {}", s("ssh_command"));
    println!();
    println!("  End to end with your own SSH client (ProxyJump; use your GitHub login):");
    println!("      {}", s("jump_command"));
    println!("  or, with this in ~/.ssh/config, `ssh job-{job}`:");
    for line in s("ssh_config").lines() {
        println!("      {line}");
    }
    if let Some(rdp) = answer["rdp_command"].as_str() {
        println!();
        println!(
            "  Remote desktop (Windows): run this, then point your RDP client at localhost:3389"
        );
        println!("      {rdp}");
    }
    println!();
    println!(
        "  Your keys are the SSH keys on your GitHub account. After the job's steps, the runner \
         stays while someone is connected, for at most {}.",
        span(hold)
    );
}

/// Starts `ci-gateway runner refresh` in the background, detached from this
/// step. It presents the job token from the state file; no credential
/// travels on its command line or in its environment.
fn start_refresher(common: &Common, job: &str, state_path: &Path) -> Result<(), Failure> {
    let exe = std::env::current_exe()?;
    let log = state_path.with_extension("log");
    let _ = std::fs::remove_file(&log);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let log_file = options
        .open(&log)
        .map_err(|e| Failure(format!("{}: {e}", log.display())))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["runner", "refresh", "--job-id", job])
        .env("CI_GATEWAY_URL", &common.gateway)
        .env_remove("CI_GATEWAY_JOB_ID")
        .env_remove("CI_GATEWAY_TOKEN")
        .env_remove("CI_GATEWAY_OIDC_AUDIENCE")
        .stdin(std::process::Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    if let Some(ca) = &common.ca_cert {
        cmd.arg("--ca-cert").arg(ca);
    }
    cmd.arg("--state-dir").arg(state_base(common));
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // Its own process group: a Ctrl-C or the step's end does not reach it.
        cmd.process_group(0);
    }
    #[cfg(windows)]
    {
        use std::os::windows::process::CommandExt;
        const DETACHED_PROCESS: u32 = 0x0000_0008;
        const CREATE_NEW_PROCESS_GROUP: u32 = 0x0000_0200;
        cmd.creation_flags(DETACHED_PROCESS | CREATE_NEW_PROCESS_GROUP);
    }
    let child = cmd
        .spawn()
        .map_err(|e| Failure(format!("starting the refresher: {e}")))?;
    println!(
        "ci-gateway: keeping the registration fresh in the background (pid {}, log {})",
        child.id(),
        log.display()
    );
    Ok(())
}

/// The refresher: re-registers every `refresh_seconds` until the state file
/// is gone (deregistered) or marked finished (`wait` ran), or the gateway
/// says the job ended.
async fn refresh(common: Common) -> Result<ExitCode, Failure> {
    let job = job_id(&common).await?;
    let path = state_path(&common, &job)?;
    let Some(state) = read_state(&path).filter(|s| s.job_token.is_some()) else {
        eprintln!("no state file with a job token: stopping");
        return Ok(ExitCode::FAILURE);
    };
    let api = job_api(&common, Some(&state))?;
    let mut next = tokio::time::Instant::now();
    loop {
        let Some(state) = read_state(&path) else {
            eprintln!("state file gone: stopping");
            return Ok(ExitCode::SUCCESS);
        };
        if state.finished {
            eprintln!("job finished: stopping");
            return Ok(ExitCode::SUCCESS);
        }
        if tokio::time::Instant::now() >= next {
            let period = Duration::from_secs(state.refresh_seconds);
            match api.register(&job, &state.registration).await {
                Ok(_) => next = tokio::time::Instant::now() + period,
                Err(e) => {
                    eprintln!("refreshing job {job}: {e}");
                    match e.status().map(|s| s.as_u16()) {
                        Some(404 | 410) => return Ok(ExitCode::SUCCESS),
                        Some(401 | 403) => return Ok(ExitCode::FAILURE),
                        _ => {
                            next = tokio::time::Instant::now() + period.min(Duration::from_secs(5))
                        }
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One line about who is connected and how long the hold may last.
fn summary(job: &Value) -> String {
    let who: Vec<String> = job["sessions"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    format!(
                        "{} ({} mode, since {})",
                        s["login"].as_str().unwrap_or("?"),
                        s["mode"].as_str().unwrap_or("?"),
                        clock(s["since"].as_u64().unwrap_or(0))
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let hold = &job["hold"];
    let deadline = match hold["deadline"].as_u64() {
        Some(d) => format!(
            "; the hold ends when the last one leaves, or at {} (in {})",
            clock(d),
            span(d.saturating_sub(unix_now()))
        ),
        None => String::new(),
    };
    if who.is_empty() {
        format!("nobody connected{deadline}")
    } else {
        format!("{} connected: {}{deadline}", who.len(), who.join(", "))
    }
}

async fn wait(args: WaitArgs) -> Result<ExitCode, Failure> {
    let job = job_id(&args.common).await?;
    let path = state_path(&args.common, &job)?;
    let mut state = read_state(&path);
    if let Some(state) = state.as_mut() {
        state.finished = true;
        write_state(&path, state)?;
    }
    let api = job_api(&args.common, state.as_ref())?;
    let mut unreachable_since: Option<tokio::time::Instant> = None;
    let mut last = String::new();
    let mut first = true;
    let mut had_sessions = false;
    loop {
        let answer = if first {
            api.finish(&job).await
        } else {
            api.get(
                &job,
                Some(Duration::from_secs(crate::api::MAX_WAIT_SECONDS)),
            )
            .await
        };
        let job_state = match answer {
            Ok(v) => {
                unreachable_since = None;
                if first {
                    first = false;
                    println!(
                        "ci-gateway: job {job} finished; the runner stays only while someone is connected"
                    );
                }
                v
            }
            Err(e) => match e.status().map(|s| s.as_u16()) {
                Some(410) => {
                    println!("ci-gateway: {}; done", message(&e));
                    return Ok(ExitCode::SUCCESS);
                }
                Some(404) => {
                    println!(
                        "ci-gateway: job {job} is not registered at the gateway; nothing to hold"
                    );
                    return Ok(ExitCode::SUCCESS);
                }
                Some(_) if !e.is_busy() => return Err(Failure(format!("job {job}: {e}"))),
                // Unreachable, or busy (429, 5xx) beyond the client's own
                // retries: keep the hold and ask again, up to the timeout.
                _ => {
                    let since = *unreachable_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= args.unreachable_timeout {
                        println!(
                            "ci-gateway: the gateway has been unreachable for {}; releasing the runner ({e})",
                            humantime::format_duration(args.unreachable_timeout)
                        );
                        return Ok(ExitCode::SUCCESS);
                    }
                    eprintln!("ci-gateway: {e}; retrying");
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    continue;
                }
            },
        };
        match job_state["hold"]["state"].as_str() {
            Some("released") if had_sessions => {
                println!("ci-gateway: the last session closed; the runner is released");
                return Ok(ExitCode::SUCCESS);
            }
            Some("released") => {
                println!("ci-gateway: nobody is connected; the runner is released");
                return Ok(ExitCode::SUCCESS);
            }
            Some("expired") => {
                println!("ci-gateway: the hold's time is up; the runner is released");
                return Ok(ExitCode::SUCCESS);
            }
            _ => {}
        }
        had_sessions |= job_state["active_sessions"].as_u64().unwrap_or(0) > 0;
        let now = summary(&job_state);
        // Who is connected changes rarely; say it when it does.
        let who = now
            .split("; the hold")
            .next()
            .unwrap_or_default()
            .to_string();
        if who != last {
            println!("ci-gateway: {now}");
            last = who;
        }
    }
}

fn message(e: &ApiError) -> String {
    match e {
        ApiError::Status { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

async fn deregister(args: DeregisterArgs) -> Result<ExitCode, Failure> {
    let job = job_id(&args.common).await?;
    let path = state_path(&args.common, &job)?;
    let state = read_state(&path);
    // First stop the refresher, so that nothing re-adds what we remove.
    let _ = std::fs::remove_file(&path);
    let api = job_api(&args.common, state.as_ref())?;
    let told = match api.deregister(&job).await {
        Ok(v) if v["deregistered"].as_bool() == Some(true) => {
            println!("ci-gateway: job {job} deregistered; its sessions were closed");
            true
        }
        Ok(_) => {
            println!("ci-gateway: job {job} was not (or no longer) registered");
            true
        }
        Err(e) if matches!(e.status().map(|s| s.as_u16()), Some(404 | 410)) => {
            println!("ci-gateway: job {job} was not (or no longer) registered");
            true
        }
        Err(e) => {
            eprintln!("ci-gateway runner: telling the gateway that job {job} ended: {e}");
            false
        }
    };
    let keys_path = match (&args.authorized_keys, &state) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(s)) => Some(s.authorized_keys.clone()),
        (None, None) => {
            let user = args.user.clone().or_else(current_user).unwrap_or_default();
            default_authorized_keys(&user, cfg!(windows))
                .ok()
                .map(|(p, _)| p)
        }
    };
    if let Some(keys_path) = keys_path.filter(|p| p.exists()) {
        match authorized_keys::edit_file(&keys_path, None, |t| Ok(authorized_keys::remove(t, &job)))
        {
            Ok(true) => println!(
                "ci-gateway: removed job {job}'s lines from {}",
                keys_path.display()
            ),
            Ok(false) => {}
            Err(e) => return Err(Failure(e)),
        }
    }
    let _ = std::fs::remove_file(path.with_extension("log"));
    Ok(if told {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
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
            registration: json!({}),
            refresh_seconds: 5,
            finished: false,
            job_token: Some("cgj_x".into()),
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
