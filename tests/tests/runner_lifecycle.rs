//! The runner's side end to end: `ci-gateway runner register/wait/deregister`
//! run as real processes against the gateway, a real sshd runner and real
//! ssh clients; and the hold window with durations of seconds.

mod common;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::AsyncBufReadExt;

/// `ci-gateway runner <sub>` for `world`'s job, with the token in the
/// environment (as the action passes it) and nothing inherited from a CI
/// environment this test might itself run in.
fn agent(world: &World, sub: &str, extra: &[&str]) -> tokio::process::Command {
    let mut cmd = agent_command();
    cmd.args(["runner", sub])
        .args(["--gateway", &format!("http://{}", world.gateway.api)])
        .args(["--job-id", &world.job])
        .arg("--state-dir")
        .arg(world.dir.path().join("state"))
        .args(extra)
        .env("CI_GATEWAY_TOKEN", TOKEN);
    cmd
}

fn register_args(world: &World) -> Vec<String> {
    let r = &world.runner;
    vec![
        "--actor".into(),
        "octocat".into(),
        "--user".into(),
        r.user.clone(),
        "--host".into(),
        r.addr.ip().to_string(),
        "--port".into(),
        r.addr.port().to_string(),
        "--host-key".into(),
        r.dir.join("ssh_host_ed25519_key.pub").display().to_string(),
        "--authorized-keys".into(),
        r.authorized_keys.display().to_string(),
    ]
}

async fn register(world: &World, extra: &[&str]) -> Run {
    let mut args = register_args(world);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = finish(agent(world, "register", &args)).await;
    assert_eq!(run.code, 0, "register failed: {run:?}");
    world.adopt_agent_state();
    run
}

/// A process whose stdout and stderr are collected while it runs.
struct Running {
    child: tokio::process::Child,
    output: Arc<Mutex<String>>,
}

impl Running {
    fn start(mut cmd: tokio::process::Command) -> Running {
        let mut child = cmd.spawn().expect("starts");
        let output = Arc::new(Mutex::new(String::new()));
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let output = output.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut out = output.lock().expect("lock");
                    out.push_str(&line);
                    out.push('\n');
                }
            });
        }
        Running { child, output }
    }

    fn output(&self) -> String {
        self.output.lock().expect("lock").clone()
    }

    async fn wait_for_text(&self, text: &str) {
        let output = self.output.clone();
        eventually(&format!("{text:?} in the output"), || {
            output.lock().expect("lock").contains(text)
        })
        .await;
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    async fn exit(mut self) -> (i32, String) {
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("exits within 60s")
            .expect("wait");
        // Let the readers drain the pipes.
        tokio::time::sleep(Duration::from_millis(100)).await;
        (status.code().unwrap_or(-1), self.output())
    }
}

/// `ssh <job>@gateway <command>` as a running process.
fn ssh_session(world: &World, key: &std::path::Path, extra: &[&str]) -> Running {
    let mut cmd = tokio::process::Command::new("ssh");
    cmd.args(client_opts(key))
        .args(["-p", &world.gateway.ssh.port().to_string()]);
    let split = extra
        .iter()
        .position(|a| !a.starts_with('-'))
        .unwrap_or(extra.len());
    cmd.args(&extra[..split])
        .arg(format!("{}@127.0.0.1", world.job))
        .args(&extra[split..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    Running::start(cmd)
}

async fn sessions(world: &World) -> u64 {
    let (status, body) = world.gateway.job(&world.job).await;
    assert_eq!(status, 200, "{body}");
    body["active_sessions"].as_u64().expect("count")
}

async fn wait_for_sessions(world: &World, n: u64) {
    for _ in 0..400 {
        if sessions(world).await == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never {n} sessions");
}

/// Waits until the API says the job is gone (410); returns its reason.
async fn gone(world: &World) -> String {
    for _ in 0..200 {
        let (status, body) = world.gateway.job(&world.job).await;
        if status == 410 {
            return body["error"].as_str().expect("reason").to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {} never ended", world.job);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_installs_keys_prints_working_commands_and_deregister_undoes_it() {
    let world = World::unregistered("127.0.0.51", "9876543251", &[]).await;
    // The runner user's own lines, a comment, and no newline at the end.
    let own = "# keys of the runner's owner\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl owner@laptop";
    std::fs::write(&world.runner.authorized_keys, own).expect("write");

    let first = register(&world, &[]).await;
    let after_first = std::fs::read_to_string(&world.runner.authorized_keys).expect("read");
    assert!(
        after_first.starts_with(&format!("{own}\n")),
        "{after_first}"
    );
    assert!(
        after_first.contains("cert-authority,principals="),
        "{after_first}"
    );
    assert!(after_first.contains(
        &world
            .octocat
            .public
            .split(' ')
            .nth(1)
            .expect("b64")
            .to_string()
    ));
    // Registering again does not duplicate a line.
    register(&world, &[]).await;
    assert_eq!(
        std::fs::read_to_string(&world.runner.authorized_keys).expect("read"),
        after_first
    );

    // The printed commands are the ones that work.
    let port = world.gateway.ssh.port();
    let ssh_line = format!("ssh -p {port} {}@127.0.0.1", world.job);
    assert!(first.stdout.contains(&ssh_line), "{}", first.stdout);
    let jump_line = format!(
        "ssh -J octocat@127.0.0.1:{port} {}@job-{}",
        world.runner.user, world.job
    );
    assert!(first.stdout.contains(&jump_line), "{}", first.stdout);
    assert!(first.stdout.contains("Host job-*"), "{}", first.stdout);
    assert!(!first.stdout.contains(TOKEN) && !first.stderr.contains(TOKEN));

    let shell = ssh(
        &world.gateway,
        &world.octocat.path,
        &world.job,
        &["echo", "on-the-runner"],
        None,
    )
    .await;
    assert_eq!(shell.code, 0, "{shell:?}");
    assert_eq!(shell.stdout.trim(), "on-the-runner");
    let jump = ssh_jump(
        &world.gateway,
        &world.octocat.path,
        "octocat",
        &world.runner.user,
        &world.job,
        22,
        &["echo", "end-to-end"],
    )
    .await;
    assert_eq!(jump.code, 0, "{jump:?}");
    assert_eq!(jump.stdout.trim(), "end-to-end");

    // Deregistering kicks whoever is still on, and removes only our lines.
    let session = ssh_session(&world, &world.octocat.path, &["echo started; sleep 60"]);
    session.wait_for_text("started").await;
    let dereg = finish(agent(&world, "deregister", &[])).await;
    assert_eq!(dereg.code, 0, "{dereg:?}");
    assert!(dereg.stdout.contains("deregistered"), "{}", dereg.stdout);
    let (code, out) = tokio::time::timeout(Duration::from_secs(30), async { session.exit().await })
        .await
        .expect("the session is closed");
    assert_ne!(code, 0);
    assert!(out.contains("the runner deregistered it"), "{out}");
    assert_eq!(
        std::fs::read_to_string(&world.runner.authorized_keys).expect("read"),
        format!("{own}\n")
    );
    let late = ssh(
        &world.gateway,
        &world.octocat.path,
        &world.job,
        &["true"],
        None,
    )
    .await;
    assert_ne!(late.code, 0);
    assert!(late.stderr.contains("ended"), "{late:?}");

    // Twice is fine, and so is a job that never registered.
    let again = finish(agent(&world, "deregister", &[])).await;
    assert_eq!(again.code, 0, "{again:?}");
    assert!(
        again.stdout.contains("not (or no longer) registered"),
        "{}",
        again.stdout
    );
    let mut never = agent(&world, "deregister", &[]);
    never.args(["--job-id", "1234567890"]);
    let never = finish(never).await;
    assert_eq!(never.code, 0, "{never:?}");
    assert_eq!(
        std::fs::read_to_string(&world.runner.authorized_keys).expect("read"),
        format!("{own}\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_returns_at_once_when_nobody_is_connected() {
    let world = World::unregistered("127.0.0.52", "9876543252", &[]).await;
    register(&world, &["--no-refresh"]).await;
    let wait = finish(agent(&world, "wait", &[])).await;
    assert_eq!(wait.code, 0, "{wait:?}");
    assert!(
        wait.stdout
            .contains("nobody is connected; the runner is released"),
        "{}",
        wait.stdout
    );
    // The hold is over: the job is gone for the API and for users.
    let reason = gone(&world).await;
    assert!(reason.contains("nobody connected"), "{reason}");
    let late = ssh(
        &world.gateway,
        &world.octocat.path,
        &world.job,
        &["true"],
        None,
    )
    .await;
    assert_ne!(late.code, 0);
    assert!(
        late.stderr.contains("finished with nobody connected"),
        "{late:?}"
    );
    // A late refresh cannot bring the job back.
    let (status, _) = world
        .gateway
        .register(&world.job, registration(&world.runner, "octocat"))
        .await;
    assert_eq!(status, 410);
    // wait again: nothing to hold, still exit 0.
    let again = finish(agent(&world, "wait", &[])).await;
    assert_eq!(again.code, 0, "{again:?}");
    let dereg = finish(agent(&world, "deregister", &[])).await;
    assert_eq!(dereg.code, 0, "{dereg:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_only_session_holds_the_runner_until_it_closes() {
    let world = World::unregistered("127.0.0.53", "9876543253", &[]).await;
    register(&world, &["--no-refresh"]).await;
    // `ssh -N -L`: no shell, no command, only a forward (RDP's shape).
    let local = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
    let local_port = local.local_addr().expect("addr").port();
    drop(local);
    let forward = format!(
        "-L127.0.0.1:{local_port}:127.0.0.1:{}",
        world.runner.addr.port()
    );
    let mut tunnel = ssh_session(&world, &world.octocat.path, &["-N", &forward]);
    wait_for_sessions(&world, 1).await;

    let mut wait = Running::start(agent(&world, "wait", &[]));
    wait.wait_for_text("1 connected: octocat (job mode").await;
    wait.wait_for_text("the hold ends when the last one leaves")
        .await;
    // Still holding a moment later: the forward is liveness.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        wait.running(),
        "wait returned while a forward was open: {}",
        wait.output()
    );
    let (status, body) = world.gateway.job(&world.job).await;
    assert_eq!(status, 200);
    assert_eq!(body["hold"]["state"], "holding", "{body}");
    assert_eq!(body["sessions"][0]["login"], "octocat", "{body}");
    assert!(body["hold"]["deadline"].as_u64().is_some(), "{body}");

    // The last session closes: the hold ends and wait returns 0.
    assert!(tunnel.running());
    let _ = tunnel.child.start_kill();
    let (code, out) = wait.exit().await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("last session closed; the runner is released")
            || out.contains("its last session closed; the runner was released"),
        "{out}"
    );
    let reason = gone(&world).await;
    assert!(reason.contains("last session closed"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hold_deadline_warns_job_mode_users_then_closes_their_sessions() {
    let world = World::unregistered(
        "127.0.0.54",
        "9876543254",
        &[
            ("CI_GATEWAY__HOLD__MAX", "5s"),
            ("CI_GATEWAY__HOLD__WARN_BEFORE", "3s"),
        ],
    )
    .await;
    register(&world, &["--no-refresh"]).await;
    let session = ssh_session(&world, &world.octocat.path, &["echo started; sleep 60"]);
    session.wait_for_text("started").await;
    let wait = Running::start(agent(&world, "wait", &[]));
    // The warning reaches the user's terminal (stderr of the session) ...
    session
        .wait_for_text("ci-gateway: this runner is released in")
        .await;
    // ... then the deadline closes the session with the reason.
    let (code, out) = session.exit().await;
    assert_ne!(code, 0);
    assert!(
        out.contains("the hold of 5s after the job finished is over"),
        "{out}"
    );
    let (code, wait_out) = wait.exit().await;
    assert_eq!(code, 0, "{wait_out}");
    assert!(wait_out.contains("is over"), "{wait_out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connect_grace_holds_for_a_first_session() {
    let world = World::with_config(
        "127.0.0.55",
        "9876543255",
        &[("CI_GATEWAY__HOLD__CONNECT_GRACE", "2s")],
    )
    .await;
    let (status, body) = world.gateway.call("POST", &world.job, "/finished").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["hold"]["state"], "holding", "{body}");
    // Someone connects within the grace: the runner stays past it.
    let mut session = ssh_session(&world, &world.octocat.path, &["echo started; sleep 60"]);
    session.wait_for_text("started").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, body) = world.gateway.job(&world.job).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["hold"]["state"], "holding");
    let _ = session.child.start_kill();
    let _ = session.exit().await;
    let reason = gone(&world).await;
    assert!(reason.contains("last session closed"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refresher_keeps_a_job_alive_and_a_dead_runner_expires() {
    let world = World::unregistered(
        "127.0.0.56",
        "9876543256",
        &[("CI_GATEWAY__REGISTRATION__TTL", "3s")],
    )
    .await;
    let out = register(&world, &[]).await;
    assert!(
        out.stdout.contains("keeping the registration fresh"),
        "{}",
        out.stdout
    );
    let (_, first) = world.gateway.job(&world.job).await;
    let registered = first["refreshed_at"].as_u64().expect("refreshed_at");
    // Well past the TTL, the background refresher has kept it registered.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (status, now) = world.gateway.job(&world.job).await;
    assert_eq!(status, 200, "expired despite the refresher: {now}");
    assert!(now["refreshed_at"].as_u64().expect("refreshed_at") > registered);

    // The runner dies (its refresher with it): the job expires and its
    // sessions are closed with the reason.
    let session = ssh_session(&world, &world.octocat.path, &["echo started; sleep 60"]);
    session.wait_for_text("started").await;
    let state = world
        .dir
        .path()
        .join("state")
        .join("ci-gateway-state")
        .join(format!("ci-gateway-job-{}.json", world.job));
    std::fs::remove_file(&state).expect("state file exists while registered");
    let (code, out) = session.exit().await;
    assert_ne!(code, 0);
    assert!(
        out.contains("its runner stopped refreshing the registration"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_job_id_the_agent_finds_it_through_githubs_api() {
    let world = World::unregistered("127.0.0.57", "9876543257", &[]).await;
    *world.github.run_jobs.lock().expect("lock") = serde_json::json!({
        "total_count": 3,
        "jobs": [
            {"id": 9876543000u64, "runner_name": "runner-7", "status": "completed"},
            {"id": 9876543111u64, "runner_name": "runner-8", "status": "in_progress"},
            {"id": 9876543257u64, "runner_name": "runner-7", "status": "in_progress"}
        ]
    });
    let mut args = register_args(&world);
    args.push("--no-refresh".into());
    let mut cmd = agent_command();
    cmd.args([
        "runner",
        "register",
        "--gateway",
        &format!("http://{}", world.gateway.api),
    ])
    .args(&args)
    .arg("--state-dir")
    .arg(world.dir.path().join("state"))
    .env("CI_GATEWAY_TOKEN", TOKEN)
    .env("GITHUB_API_URL", &world.github.url)
    .env("GITHUB_REPOSITORY", "acme/widgets")
    .env("GITHUB_RUN_ID", "42")
    .env("GITHUB_RUN_ATTEMPT", "2")
    .env("RUNNER_NAME", "runner-7")
    .env("GITHUB_TOKEN", "ghs_test_token_for_the_lookup")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let run = finish(cmd).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("job 9876543257 is registered"),
        "{}",
        run.stdout
    );
    world.adopt_agent_state();
    assert_eq!(world.gateway.job(&world.job).await.0, 200);
    assert_eq!(
        world.github.run_jobs_auth.lock().expect("lock").as_slice(),
        ["Bearer ghs_test_token_for_the_lookup"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_errors_are_one_clear_line() {
    let world = World::unregistered("127.0.0.58", "9876543258", &[]).await;
    let mut args = register_args(&world);
    args.push("--no-refresh".into());
    let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
    // (what is changed, what stderr must say)
    let cases: [(&[&str], Option<&str>, &str); 4] = [
        (&[], Some("not-the-token-0123456789"), "bearer token"),
        // Nothing listens on port 9 of 127.0.0.58.
        (
            &["--gateway", "http://127.0.0.58:9"],
            None,
            "cannot reach the gateway",
        ),
        (
            &["--host-key", "/nonexistent/ssh_host_ed25519_key.pub"],
            None,
            "/nonexistent/ssh_host_ed25519_key.pub",
        ),
        (&["--job-id", "12abc"], None, "--job-id"),
    ];
    for (overrides, token, says) in cases {
        let mut cmd = agent(&world, "register", &args_ref);
        cmd.args(overrides);
        if let Some(token) = token {
            cmd.env("CI_GATEWAY_TOKEN", token);
        }
        let run = finish(cmd).await;
        assert_eq!(run.code, 1, "{overrides:?}: {run:?}");
        assert!(run.stderr.contains(says), "{overrides:?}: {}", run.stderr);
        assert_eq!(
            run.stderr.trim().lines().count(),
            1,
            "one line: {}",
            run.stderr
        );
        assert!(
            !run.stderr.contains("not-the-token"),
            "the token is never printed"
        );
    }
    // Nothing was registered or written by any of them.
    assert_eq!(world.gateway.job(&world.job).await.0, 404);
    assert_eq!(
        std::fs::read_to_string(&world.runner.authorized_keys).expect("read"),
        ""
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_resumes_after_a_gateway_restart() {
    let grace = [("CI_GATEWAY__HOLD__CONNECT_GRACE", "3s")];
    let world = World::with_config("127.0.0.60", "9876543260", &grace).await;
    let (status, body) = world.gateway.call("POST", &world.job, "/finished").await;
    assert_eq!(status, 200, "{body}");
    let world = world.restart(&grace).await;
    let (status, body) = world.gateway.job(&world.job).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["hold"]["state"], "holding", "{body}");
    // The restarted gateway's hold task ends it when the grace is over.
    let reason = gone(&world).await;
    assert!(
        reason.contains("finished with nobody connected"),
        "{reason}"
    );
}

/// A gateway that answers 429 used to make `wait` exit 1, which ends the
/// job's hold at once. Now the agent waits as `Retry-After` says and asks
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_rides_out_a_busy_gateway() {
    let world = World::unregistered(
        "127.0.0.56",
        "9876543256",
        &[("CI_GATEWAY__API__REQUESTS_PER_MINUTE_PER_TOKEN", "12")],
    )
    .await;
    register(&world, &["--no-refresh"]).await;
    // Spend the job's request budget (12 per minute: one back every 5 s).
    let mut refused = false;
    for _ in 0..20 {
        if world.gateway.job(&world.job).await.0 == 429 {
            refused = true;
            break;
        }
    }
    assert!(refused, "the budget was spent");
    let wait = finish(agent(&world, "wait", &[])).await;
    assert_eq!(wait.code, 0, "{wait:?}");
    assert!(wait.stderr.contains("asking again in"), "{wait:?}");
    assert!(
        wait.stdout.contains("the runner is released"),
        "{}",
        wait.stdout
    );
}

/// A symlinked authorized_keys used to be followed: the lines went into the
/// link's target, and the link was replaced by a copy. Now register refuses
/// it with the reason, writes nothing, and leaves no job behind to hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_refuses_a_symlinked_authorized_keys() {
    let world = World::unregistered("127.0.0.57", "9876543257", &[]).await;
    let victim = world.dir.path().join("victim");
    std::fs::write(&victim, "precious\n").expect("write");
    std::fs::remove_file(&world.runner.authorized_keys).expect("rm");
    std::os::unix::fs::symlink(&victim, &world.runner.authorized_keys).expect("symlink");
    let mut args = register_args(&world);
    args.push("--no-refresh".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = finish(agent(&world, "register", &args)).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("symlink"), "{run:?}");
    assert_eq!(run.stderr.trim().lines().count(), 1, "one line: {run:?}");
    assert_eq!(
        std::fs::read_to_string(&victim).expect("read"),
        "precious\n"
    );
    assert!(std::fs::symlink_metadata(&world.runner.authorized_keys)
        .expect("meta")
        .file_type()
        .is_symlink());
    assert_eq!(
        world.gateway.job(&world.job).await.0,
        404,
        "nothing registered"
    );
}

/// `runner breakpoint` running, once it says the job is paused.
async fn pause(world: &World, bin_dir: &str) -> Running {
    let mut cmd = agent(world, "breakpoint", &["--bin-dir", bin_dir]);
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let paused = Running::start(cmd);
    paused.wait_for_text("is paused at this step").await;
    paused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breakpoint_holds_the_step_and_goes_on_when_told() {
    let grace = [("CI_GATEWAY__HOLD__CONNECT_GRACE", "60s")];
    let world = World::unregistered("127.0.0.185", "9876543632", &grace).await;
    register(&world, &[]).await;
    let bin = world.dir.path().join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    let bin_arg = bin.display().to_string();
    let paused = pause(&world, &bin_arg).await;
    let (status, body) = world.gateway.job(&world.job).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["paused"], true, "{body}");
    assert_eq!(body["pause"]["connect_grace_seconds"], 60, "{body}");
    assert!(body["pause"]["ssh_command"].is_string(), "{body}");
    let r = ssh(
        &world.gateway,
        &world.octocat.path,
        "octocat",
        &["jobs"],
        None,
    )
    .await;
    assert!(r.stdout.contains("paused at a breakpoint"), "{r:?}");

    // Someone is in (a session that stays), and a connected person runs
    // ci-gateway-continue: the step goes on at once, the session stays.
    let mut stay = ssh_session(&world, &world.octocat.path, &["sleep", "30"]);
    wait_for_sessions(&world, 1).await;
    let continue_path = bin.join("ci-gateway-continue").display().to_string();
    let r = ssh(
        &world.gateway,
        &world.octocat.path,
        &world.job,
        &[&continue_path],
        None,
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("goes on with its next step"), "{r:?}");
    let (code, out) = paused.exit().await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ci-gateway-continue was run; job 9876543632 goes on"),
        "{out}"
    );
    assert!(stay.running(), "the breakpoint closes no session");
    let (_, body) = world.gateway.job(&world.job).await;
    assert_eq!(body["paused"], false, "{body}");
    drop(stay);
    wait_for_sessions(&world, 0).await;

    // Again: someone comes and goes; the last one leaving lets it go on.
    let paused = pause(&world, &bin_arg).await;
    let r = ssh(
        &world.gateway,
        &world.octocat.path,
        &world.job,
        &["sleep", "3"],
        None,
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    let (code, out) = paused.exit().await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("the last session closed; job 9876543632 goes on"),
        "{out}"
    );

    // A finished job cannot pause: its hold runs instead.
    let (status, _) = world.gateway.call("POST", &world.job, "/finished").await;
    assert_eq!(status, 200);
    let (status, body) = world.gateway.call("POST", &world.job, "/pause").await;
    assert_eq!(status, 409, "{body}");
}
