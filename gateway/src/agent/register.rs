//! `runner register`: the job id, the runner's host keys and login, the
//! registration, the installed lines, the refresher, and the commands
//! people copy.

use super::*;

/// The job id: given, or found through GitHub's REST API (GHES has no
/// `job.check_run_id`; DESIGN §9).
pub(super) async fn job_id(common: &Common) -> Result<String, Failure> {
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
    let github = Api::new(&api_url, Secret::new(token), common.ca_cert.as_deref())?;
    for page in 1..=10 {
        let path = format!(
            "/repos/{repo}/actions/runs/{run_id}/attempts/{attempt}/jobs?per_page=100&page={page}"
        );
        let listing: RunJobs = github
            .get_json(&path)
            .await
            .map_err(|e| Failure(format!("looking up the job id on GitHub: {e}")))?;
        if let Some(job) = listing.jobs.iter().find(|j| {
            j.runner_name.as_deref() == Some(runner.as_str()) && j.status == "in_progress"
        }) {
            return Ok(job.id.to_string());
        }
        if listing.jobs.len() < 100 {
            break;
        }
    }
    Err(Failure(format!(
        "no in-progress job of run {run_id} (attempt {attempt}) runs on runner {runner:?}; pass --job-id"
    )))
}

/// A page of GitHub's `…/attempts/{n}/jobs`, as far as the lookup reads it.
#[derive(Deserialize)]
struct RunJobs {
    #[serde(default)]
    jobs: Vec<RunJob>,
}

#[derive(Deserialize)]
struct RunJob {
    id: u64,
    #[serde(default)]
    runner_name: Option<String>,
    #[serde(default)]
    status: String,
}

pub(super) fn current_user() -> Option<String> {
    env("USER").or_else(|| env("USERNAME")).or_else(|| {
        let out = std::process::Command::new("id").arg("-un").output().ok()?;
        let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!name.is_empty()).then_some(name)
    })
}

/// The user's home directory and ids from /etc/passwd (Unix).
pub(super) fn passwd_entry(user: &str) -> Option<(PathBuf, authorized_keys::Owner)> {
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

pub(super) fn program_data() -> PathBuf {
    PathBuf::from(env("PROGRAMDATA").unwrap_or_else(|| r"C:\ProgramData".into()))
}

/// Where sshd looks for `user`'s keys (DESIGN §9), and who should own it.
pub(super) fn default_authorized_keys(
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

pub(super) fn host_key_files(given: &[PathBuf], windows: bool) -> Result<Vec<PathBuf>, Failure> {
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

pub(super) async fn register(args: RegisterArgs) -> Result<ExitCode, Failure> {
    let job = job_id(&args.common).await?;
    let os = match args.os.as_deref() {
        Some("linux") => Os::Linux,
        Some("windows") => Os::Windows,
        Some("macos") => Os::Macos,
        Some(other) => {
            return Err(Failure(format!(
                "--os {other:?}: expected linux, windows or macos"
            )))
        }
        None if cfg!(windows) => Os::Windows,
        None if cfg!(target_os = "macos") => Os::Macos,
        None => Os::Linux,
    };
    let windows = os == Os::Windows;
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
    let runner_login = match args.runner_login.as_deref() {
        None => None,
        Some("certificate") => Some(RunnerLogin::Certificate),
        Some("key") => Some(RunnerLogin::Key),
        Some(other) => {
            return Err(Failure(format!(
                "--runner-login {other:?}: expected certificate or key"
            )))
        }
    };
    if args.tunnel && args.host.is_some() {
        return Err(Failure(
            "--tunnel and --host exclude each other: a tunnel registration has no address (the \
             gateway reaches this runner only through the tunnel)"
                .into(),
        ));
    }
    let body = RegisterRequest {
        actor,
        host: args.host.clone(),
        port: Some(args.port),
        user,
        host_keys,
        repository: env("GITHUB_REPOSITORY"),
        run_id: env("GITHUB_RUN_ID").and_then(|r| r.parse::<u64>().ok()),
        os: Some(os),
        allowed_users: args
            .allowed_users
            .iter()
            .map(|u| u.trim())
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect(),
        runner_login,
        tunnel: args.tunnel,
    };
    // Before the gateway hears of the job: a place sshd would refuse or a
    // link we must not write through fails here, with nothing registered.
    authorized_keys::check_place(&keys_path, owner)?;
    let state_path = state_path(&args.common, &job)?;
    // Registering again within the same job (a retried step) refreshes with
    // the job token it already holds.
    let earlier = read_state(&state_path).filter(|s| s.job_token.is_some());
    let api = job_api(&args.common, earlier.as_ref())?;
    let answer = api
        .register(&job, &body)
        .await
        .map_err(|e| Failure(format!("registering job {job}: {e}")))?;
    let job_token = match (answer.job_token.clone(), earlier) {
        (Some(t), _) => t,
        (None, Some(earlier)) => earlier.job_token.unwrap_or_default(),
        (None, None) => {
            return Err(Failure(format!(
                "registering job {job}: the gateway sent no job token (the job was registered \
                 before, and this runner does not hold its token)"
            )))
        }
    };
    let lines = &answer.authorized_keys;
    if lines.is_empty() {
        return Err(Failure("the gateway sent no authorized_keys lines".into()));
    }
    authorized_keys::edit_file(&keys_path, owner, |text| {
        authorized_keys::install(text, &job, lines)
    })
    .map_err(Failure::from)?;
    let refresh_seconds = answer.refresh_seconds.max(1);
    let tunnel = match (args.tunnel, &answer.tunnel) {
        (false, _) => None,
        (true, None) => {
            return Err(Failure(format!(
                "registering job {job}: the gateway answered without tunnel details: it is older \
                 than this agent and cannot reach runners through a tunnel"
            )))
        }
        (true, Some(info)) => Some(TunnelState {
            ssh_address: args
                .tunnel_ssh
                .clone()
                .unwrap_or_else(|| info.ssh_address.clone()),
            local_host: args.tunnel_host,
            transport: args.tunnel_transport,
            sshd_port: args.port,
            ports: agreed_ports(&info.ports, &args.tunnel_ports),
            info: info.clone(),
        }),
    };
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
            tunnel: tunnel.clone(),
        },
    )?;
    if !args.no_refresh {
        start_background(&args.common, &job, &state_path, "refresh")?;
    }
    if let Some(tunnel) = &tunnel {
        start_background(&args.common, &job, &state_path, "tunnel")?;
        // As the job now: the registration token may only create jobs.
        let as_job = job_api(&args.common, read_state(&state_path).as_ref())?;
        await_tunnel(&as_job, &job, tunnel, &state_path).await?;
    }
    if let Some(path) = &args.known_hosts {
        append_known_hosts(path, &answer.known_hosts)?;
    }
    print_commands(&job, &answer, &keys_path, lines.len());
    Ok(ExitCode::SUCCESS)
}

/// Appends `lines` to the known_hosts file at `path` (made if missing,
/// with its directory), skipping lines it already has.
fn append_known_hosts(path: &Path, lines: &[String]) -> Result<(), Failure> {
    use std::io::Write;
    let failed = |e: std::io::Error| Failure(format!("--known-hosts {}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(failed)?;
    }
    let had = std::fs::read_to_string(path).unwrap_or_default();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(failed)?;
    for line in lines {
        if !had.lines().any(|l| l == line) {
            writeln!(file, "{line}").map_err(failed)?;
        }
    }
    Ok(())
}

pub(super) fn print_commands(job: &str, answer: &RegisterResponse, keys_path: &Path, lines: usize) {
    let hold = answer.hold_max_seconds;
    println!(
        "ci-gateway: job {job} is registered; {lines} key line(s) installed in {}",
        keys_path.display()
    );
    println!();
    println!("  A shell on this runner:");
    println!("      {}", answer.ssh_command);
    println!();
    println!("  End to end with your own SSH client (ProxyJump; use your GitHub login):");
    println!("      {}", answer.jump_command);
    println!("  or, with this in ~/.ssh/config, `ssh job-{job}`:");
    for line in answer.ssh_config.lines() {
        println!("      {line}");
    }
    if !answer.known_hosts.is_empty() {
        println!();
        println!(
            "  Host keys, to check the first connection instead of trusting it \
             (add to ~/.ssh/known_hosts):"
        );
        for line in &answer.known_hosts {
            println!("      {line}");
        }
    }
    if let Some(rdp) = &answer.rdp_command {
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

/// Returns once the gateway sees the tunnel up, so the step fails with the
/// reason (from the tunnel's log) rather than leaving a job nobody reaches.
async fn await_tunnel(
    api: &Api,
    job: &str,
    tunnel: &TunnelState,
    state_path: &Path,
) -> Result<(), Failure> {
    const PATIENCE: Duration = Duration::from_secs(30);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut last_error = None;
    loop {
        match api.get(job, None).await {
            Ok(status) if status.tunnel.as_ref().is_some_and(|t| t.up) => {
                println!(
                    "ci-gateway: the tunnel to the gateway ({}) is up",
                    tunnel.ssh_address
                );
                return Ok(());
            }
            Ok(_) => {}
            Err(e) => last_error = Some(e.to_string()),
        }
        if tokio::time::Instant::now() >= deadline {
            let log = background_log(state_path, "tunnel");
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let last: Vec<&str> = tail.lines().rev().take(3).collect();
            let asking = last_error
                .map(|e| format!("; asking the gateway: {e}"))
                .unwrap_or_default();
            return Err(Failure(format!(
                "job {job} is registered, but its tunnel to {} did not come up within {PATIENCE:?} \
                 (the agent keeps trying; log {}): {}{asking}",
                tunnel.ssh_address,
                log.display(),
                last.into_iter().rev().collect::<Vec<_>>().join(" / ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The log of the background process `kind`.
fn background_log(state_path: &Path, kind: &str) -> PathBuf {
    match kind {
        "refresh" => state_path.with_extension("log"),
        kind => state_path.with_extension(format!("{kind}.log")),
    }
}

/// Starts `ci-gateway runner <kind>` (`refresh`, `tunnel`) in the
/// background, detached from this step. It presents the job token from the
/// state file; no credential travels on its command line or in its
/// environment.
pub(super) fn start_background(
    common: &Common,
    job: &str,
    state_path: &Path,
    kind: &str,
) -> Result<(), Failure> {
    let exe = std::env::current_exe()?;
    let log = background_log(state_path, kind);
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
    cmd.args(["runner", kind, "--job-id", job])
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
        .map_err(|e| Failure(format!("starting the {kind} process: {e}")))?;
    let what = match kind {
        "refresh" => "keeping the registration fresh",
        _ => "holding the tunnel to the gateway",
    };
    println!(
        "ci-gateway: {what} in the background (pid {}, log {})",
        child.id(),
        log.display()
    );
    Ok(())
}

/// The refresher: re-registers every `refresh_seconds` until the state file
/// is gone (deregistered) or marked finished (`wait` ran), or the gateway
/// says the job ended.
pub(super) async fn refresh(common: Common) -> Result<ExitCode, Failure> {
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
