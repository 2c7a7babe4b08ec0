//! The reverse tunnel (DESIGN §10) end to end: the runner's sshd and the
//! agent run in a network namespace this test creates, the sshd on that
//! namespace's own loopback, so the gateway cannot connect to it at all; the
//! agent reaches the gateway over a veth pair. Users use the same commands
//! as for a runner the gateway dials.
//!
//! The tests need root (network namespaces); CI and `scripts/test` run as
//! root.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt};

const PYTHON: &str = "/usr/bin/python3";

fn ip(args: &[&str]) -> bool {
    std::process::Command::new("ip")
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A network namespace joined to this one by a veth pair on 10.231.<n>.0/30:
/// this side is .1, the namespace's side .2. Removed (with what runs in it)
/// on drop.
struct Netns {
    name: String,
    veth: String,
    host_ip: String,
}

impl Netns {
    fn create(n: u8) -> Netns {
        let name = format!("cigw-tun{n}");
        let veth = format!("cigw-t{n}");
        let peer = format!("cigw-t{n}p");
        let host_ip = format!("10.231.{n}.1");
        let ns_ip = format!("10.231.{n}.2");
        // Left over from a run that was killed.
        ip(&["netns", "del", &name]);
        ip(&["link", "del", &veth]);
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), name.clone()],
            vec![
                "link".into(),
                "add".into(),
                veth.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                peer.clone(),
            ],
            vec![
                "link".into(),
                "set".into(),
                peer.clone(),
                "netns".into(),
                name.clone(),
            ],
            vec![
                "addr".into(),
                "add".into(),
                format!("{host_ip}/30"),
                "dev".into(),
                veth.clone(),
            ],
            vec!["link".into(), "set".into(), veth.clone(), "up".into()],
            vec![
                "-n".into(),
                name.clone(),
                "addr".into(),
                "add".into(),
                format!("{ns_ip}/30"),
                "dev".into(),
                peer.clone(),
            ],
            vec![
                "-n".into(),
                name.clone(),
                "link".into(),
                "set".into(),
                peer,
                "up".into(),
            ],
            vec![
                "-n".into(),
                name.clone(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
        ];
        for step in steps {
            let args: Vec<&str> = step.iter().map(String::as_str).collect();
            assert!(
                ip(&args),
                "ip {args:?} failed: these tests need root and iproute2"
            );
        }
        Netns {
            name,
            veth,
            host_ip,
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // The agent's background processes live in the namespace.
        if let Ok(out) = std::process::Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = std::process::Command::new("kill")
                    .args(["-9", pid])
                    .status();
            }
        }
        ip(&["netns", "del", &self.name]);
        ip(&["link", "del", &self.veth]);
    }
}

/// A world whose runner is inside `ns`; the gateway listens on the veth.
async fn world_in(ns: &Netns, job: &str, extra: &[(&str, &str)]) -> World {
    World::assemble(job, extra, &ns.host_ip, |dir| {
        RunnerSshd::start_in_netns(dir, &ns.name)
    })
    .await
}

/// `ci-gateway runner <sub>` run inside the namespace, as the workflow's
/// step would run it on the runner.
fn agent(world: &World, ns: &Netns, sub: &str, extra: &[String]) -> tokio::process::Command {
    let mut cmd = agent_command_in(Some(&ns.name));
    cmd.args(["runner", sub])
        .args(["--gateway", &format!("http://{}", world.gateway.api)])
        .args(["--job-id", &world.job])
        .arg("--state-dir")
        .arg(world.dir.path().join("state"))
        .args(extra)
        .env("CI_GATEWAY_TOKEN", TOKEN);
    cmd
}

/// `runner register --tunnel` for the world's runner, with `extra` options.
async fn register(world: &World, ns: &Netns, extra: &[String]) -> Run {
    register_with(world, ns, extra, &[]).await
}

/// [`register`] with `env` set for the agent too.
async fn register_with(world: &World, ns: &Netns, extra: &[String], env: &[(&str, String)]) -> Run {
    let r = &world.runner;
    let mut args = vec![
        "--tunnel".to_string(),
        "--actor".into(),
        "octocat".into(),
        "--user".into(),
        r.user.clone(),
        "--port".into(),
        "22".into(),
        "--host-key".into(),
        r.dir.join("ssh_host_ed25519_key.pub").display().to_string(),
        "--authorized-keys".into(),
        r.authorized_keys.display().to_string(),
    ];
    args.extend_from_slice(extra);
    let mut cmd = agent(world, ns, "register", &args);
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let run = finish(cmd).await;
    assert_eq!(run.code, 0, "register --tunnel failed: {run:?}");
    world.adopt_agent_state();
    run
}

/// `ssh -J octocat@gateway runner@job-<id>` on `port`, running `command`.
async fn jump(w: &World, port: u16, command: &[&str]) -> Run {
    let dest = format!("job-{}", w.job);
    ssh_jump(
        &w.gateway,
        &w.octocat.path,
        "octocat",
        &w.runner.user,
        &dest,
        port,
        command,
    )
    .await
}

async fn deregister(world: &World, ns: &Netns) {
    let run = finish(agent(world, ns, "deregister", &[])).await;
    assert_eq!(run.code, 0, "deregister failed: {run:?}");
}

/// The job's `tunnel` as `GET /v1/jobs/{id}` shows it.
async fn tunnel_status(world: &World) -> Value {
    let (status, body) = world.gateway.job(&world.job).await;
    assert_eq!(status, 200, "{body}");
    body["tunnel"].clone()
}

/// Waits until the job's tunnel is up after at least `connects` connections.
async fn tunnel_up(world: &World, connects: u64) {
    for _ in 0..200 {
        let t = tunnel_status(world).await;
        if t["up"] == true && t["connects"].as_u64().unwrap_or(0) >= connects {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "the tunnel is not up after {connects} connection(s): {}",
        tunnel_status(world).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runner_the_gateway_cannot_dial_serves_both_modes_scp_and_forwards_through_its_tunnel() {
    let ns = Netns::create(1);
    let jump_ports = [("CI_GATEWAY__ACCESS__JUMP_PORTS", "22,3389,5900")];
    let w = world_in(&ns, "9876543301", &jump_ports).await;
    let registered = register(&w, &ns, &[]).await;
    assert!(
        registered.stdout.contains("the tunnel to the gateway"),
        "register waits for the tunnel and says so: {registered:?}"
    );
    let (_, job) = w.gateway.job(&w.job).await;
    // Nothing to dial: the registration carries no address.
    assert_eq!(job["host"], "0.0.0.0", "{job}");
    assert_eq!(job["tunnel"]["up"], true, "{job}");
    // Job mode: a command, its output and its exit status.
    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        &w.job,
        &["echo through-$((6*7)); exit 3"],
        None,
    )
    .await;
    assert_eq!(r.stdout.trim(), "through-42", "{r:?}");
    assert_eq!(r.code, 3, "the exit status comes back: {r:?}");

    // scp both ways, a MiB of random bytes.
    let payload: Vec<u8> = (0..1 << 20).map(|_| rand_byte()).collect();
    let local = w.dir.path().join("payload.bin");
    std::fs::write(&local, &payload).expect("write");
    let remote = format!("/tmp/cigw-tunnel-{}.bin", w.job);
    let key = &w.octocat.path;
    let up = scp(
        &w.gateway,
        key,
        &local.display().to_string(),
        &format!("{}:{remote}", w.job),
    )
    .await;
    assert_eq!(up.code, 0, "scp upload: {up:?}");
    assert_eq!(std::fs::read(&remote).expect("uploaded"), payload);
    let back = w.dir.path().join("back.bin");
    let down = scp(
        &w.gateway,
        key,
        &format!("{}:{remote}", w.job),
        &back.display().to_string(),
    )
    .await;
    assert_eq!(down.code, 0, "scp download: {down:?}");
    assert_eq!(std::fs::read(&back).expect("downloaded"), payload);
    let _ = std::fs::remove_file(&remote);

    // A -L forward, opened by the runner's sshd inside the namespace: to
    // that namespace's own sshd, whose banner comes back.
    let port = free_port();
    let mut forward = forward_only(&w, port);
    let mut banner = String::new();
    for _ in 0..100 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            let mut buf = [0u8; 64];
            if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await
            {
                banner = String::from_utf8_lossy(&buf[..n]).to_string();
                if !banner.is_empty() {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        banner.starts_with("SSH-2.0-OpenSSH"),
        "the forward reaches the runner's side: {banner:?}"
    );
    let _ = forward.kill().await;

    // Jump mode: end to end with the runner's sshd through the tunnel.
    let r = jump(&w, 22, &["echo", "jumped"]).await;
    assert_eq!(r.stdout.trim(), "jumped", "{r:?}");

    // A port the gateway allows but the agent was not told to open: the
    // agent refuses it (a gateway cannot make the runner a pivot), and the
    // user reads why.
    let r = jump(&w, 5900, &["true"]).await;
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains("refuses port 5900"),
        "the refusal names the port: {r:?}"
    );
    let tunnel_log = tunnel_log(&w);
    assert!(
        tunnel_log.contains("refused the gateway's channel to port 5900"),
        "the agent logs what it refused: {tunnel_log}"
    );
    // An allowed port where nothing listens on the runner's side.
    let r = jump(&w, 3389, &["true"]).await;
    assert!(r.stderr.contains("nothing answers on port 3389"), "{r:?}");

    let audit = std::fs::read_to_string(w.dir.path().join("data/audit.jsonl")).expect("audit");
    assert!(audit.contains("\"tunnel_up\""), "{audit}");

    // Deregistering ends the tunnel process too (it watches the state file).
    deregister(&w, &ns).await;
    tunnel_process_ends(&w, "the deregistration").await;
}

/// `ssh -N -L 127.0.0.1:<port>:127.0.0.1:22 <job>@gateway`: no shell, only
/// a forward (to the runner's side's own sshd), running until killed.
fn forward_only(w: &World, port: u16) -> tokio::process::Child {
    let mut args = client_opts(&w.octocat.path);
    args.extend([
        "-p".into(),
        w.gateway.ssh.port().to_string(),
        "-N".into(),
        "-L".into(),
        format!("127.0.0.1:{port}:127.0.0.1:22"),
        format!("{}@{}", w.job, w.gateway.ssh.ip()),
    ]);
    tokio::process::Command::new("ssh")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("ssh -N -L")
}

/// What the agent's `runner tunnel` process logged.
fn tunnel_log(w: &World) -> String {
    let dir = w.dir.path().join("state/ci-gateway-state");
    std::fs::read_to_string(dir.join(format!("ci-gateway-job-{}.tunnel.log", w.job)))
        .unwrap_or_default()
}

/// Waits until `w`'s `runner tunnel` process is gone; panics naming `after`.
async fn tunnel_process_ends(w: &World, after: &str) {
    for _ in 0..150 {
        let tunnel_running = std::process::Command::new("pgrep")
            .args(["-f", &format!("runner tunnel --job-id {}", w.job)])
            .status()
            .is_ok_and(|s| s.success());
        if !tunnel_running {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the tunnel process outlived {after}");
}

fn rand_byte() -> u8 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
    let mut x = STATE.load(Ordering::Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    STATE.store(x, Ordering::Relaxed);
    (x >> 24) as u8
}

/// A TCP relay between the agent and the gateway's SSH port whose
/// connections the test can cut, as a NAT or a flaky network does, and
/// whose target it can change (to an impostor).
struct Relay {
    addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<u64>,
    to: std::sync::Arc<std::sync::Mutex<std::net::SocketAddr>>,
}

impl Relay {
    async fn start(ip: &str, to: std::net::SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
            .await
            .expect("bind relay");
        let addr = listener.local_addr().expect("addr");
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let to = std::sync::Arc::new(std::sync::Mutex::new(to));
        let target = to.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut cuts = cuts.clone();
                cuts.mark_unchanged();
                let to = *target.lock().expect("lock");
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Relay { addr, cut, to }
    }

    /// Drops every connection through the relay (new ones still pass).
    fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// New connections go to `to` from now on.
    fn redirect(&self, to: std::net::SocketAddr) {
        *self.to.lock().expect("lock") = to;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tunnel_drop_ends_its_sessions_with_the_reason_and_the_agent_reconnects() {
    let ns = Netns::create(2);
    let w = world_in(&ns, "9876543302", &[]).await;
    let relay = Relay::start(&ns.host_ip, w.gateway.ssh).await;
    register(&w, &ns, &["--tunnel-ssh".into(), relay.addr.to_string()]).await;
    tunnel_up(&w, 1).await;

    // A session is running when the tunnel drops.
    let mut args = client_opts(&w.octocat.path);
    args.extend([
        "-p".into(),
        w.gateway.ssh.port().to_string(),
        format!("{}@{}", w.job, w.gateway.ssh.ip()),
        "echo started; sleep 60".into(),
    ]);
    let mut session = tokio::process::Command::new("ssh")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("ssh");
    let mut out = tokio::io::BufReader::new(session.stdout.take().expect("stdout")).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), out.next_line())
        .await
        .expect("the session starts")
        .expect("read");
    assert_eq!(first.as_deref(), Some("started"));
    relay.cut();
    let ended = tokio::time::timeout(Duration::from_secs(30), session.wait_with_output())
        .await
        .expect("the session ends when its tunnel drops, not after its sleep")
        .expect("wait");
    // (The runner's sshd logs at DEBUG1 with -e: its session child's lines
    // reach the client's stderr; they are not ours.)
    let stderr: String = String::from_utf8_lossy(&ended.stderr)
        .lines()
        .filter(|l| !l.starts_with("debug"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        stderr.contains(&format!("the tunnel to job {}'s runner dropped", w.job)),
        "the user reads why: {stderr}"
    );

    // The agent comes back by itself, and so do the users.
    tunnel_up(&w, 2).await;
    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        &w.job,
        &["echo", "again"],
        None,
    )
    .await;
    assert_eq!(r.stdout.trim(), "again", "{r:?}");
    let audit = std::fs::read_to_string(w.dir.path().join("data/audit.jsonl")).expect("audit");
    assert!(audit.contains("\"tunnel_down\""), "{audit}");
    deregister(&w, &ns).await;
}

/// Runs `tunnel_login.py` against the gateway: the methods it offers `user`
/// and whether `password` logs in.
async fn password_login(gw: &Gateway, user: &str, password: &str) -> Value {
    password_login_probing(gw, user, password, None).await
}

/// [`password_login`]; logged in, it also asks for a session, a
/// direct-tcpip channel to `probe` and a remote forward.
async fn password_login_probing(
    gw: &Gateway,
    user: &str,
    password: &str,
    probe: Option<std::net::SocketAddr>,
) -> Value {
    let mut args = vec![
        format!("{}/scripts/tunnel_login.py", env!("CARGO_MANIFEST_DIR")),
        gw.ssh.ip().to_string(),
        gw.ssh.port().to_string(),
        user.to_string(),
        password.to_string(),
    ];
    if let Some(p) = probe {
        args.extend([p.ip().to_string(), p.port().to_string()]);
    }
    let r = run(PYTHON, &args, None).await;
    assert_eq!(r.code, 0, "tunnel_login.py ran (python3-paramiko?): {r:?}");
    serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {r:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tunnel_login_takes_only_its_own_jobs_token_and_people_are_never_asked_for_a_password() {
    let w = World::new("127.0.0.161", "9876543303").await;
    // Two tunnel registrations (no address), each with its own token.
    let body = |runner: &RunnerSshd| {
        serde_json::json!({
            "actor": "octocat",
            "tunnel": true,
            "port": 22,
            "user": runner.user,
            "host_keys": [runner.host_key_pub],
        })
    };
    for job in ["9876543304", "9876543305"] {
        let (status, answer) = w.gateway.register(job, body(&w.runner)).await;
        assert_eq!(status, 201, "{answer}");
        assert_eq!(answer["tunnel"]["user"], format!("tunnel+{job}"));
        assert!(
            answer["tunnel"]["host_keys"]
                .as_array()
                .is_some_and(|k| !k.is_empty()),
            "the agent learns the host keys to pin: {answer}"
        );
    }
    let a = w.gateway.token_for("9876543304");
    let b = w.gateway.token_for("9876543305");

    // Another job's token opens nothing.
    let r = password_login(&w.gateway, "tunnel+9876543304", &b).await;
    assert_eq!(r["offered"], serde_json::json!(["password"]), "{r}");
    assert_eq!(r["accepted"], false, "job 05's token on job 04: {r}");
    // Nor does the registration token.
    let r = password_login(&w.gateway, "tunnel+9876543304", TOKEN).await;
    assert_eq!(r["accepted"], false, "{r}");
    // Its own does, and gives nothing but the tunnel: a runner (or whoever
    // holds its token) cannot use the gateway as a proxy, not even to a
    // runner that is one hop away.
    let probe = Some(w.runner.addr);
    let r = password_login_probing(&w.gateway, "tunnel+9876543304", &a, probe).await;
    assert_eq!(r["accepted"], true, "{r}");
    for probe in ["session", "direct_tcpip", "remote_forward"] {
        let got = r["probes"][probe].as_str().unwrap_or_default();
        assert!(got.starts_with("refused"), "{probe}: {r}");
    }

    // A job the gateway dials has no tunnel login, even with its token.
    let dialed = w.gateway.token_for(&w.job);
    let r = password_login(&w.gateway, &format!("tunnel+{}", w.job), &dialed).await;
    assert_eq!(r["accepted"], false, "{r}");
    // People's usernames offer keys only, and take no password (not even a
    // job token).
    for user in [w.job.as_str(), "octocat"] {
        let r = password_login(&w.gateway, user, &dialed).await;
        assert_eq!(
            r["offered"],
            serde_json::json!(["publickey"]),
            "{user}: {r}"
        );
        assert_eq!(r["accepted"], false, "{user}: {r}");
    }
    // A person's key is no way into a tunnel username.
    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        "tunnel+9876543304",
        &["true"],
        None,
    )
    .await;
    assert_ne!(r.code, 0, "{r:?}");

    // A tunnel registration names no address, and a refresh cannot turn a
    // dialed job into a tunnel one.
    let mut with_host = body(&w.runner);
    with_host["host"] = "127.0.0.161".into();
    let (status, answer) = w.gateway.register("9876543306", with_host).await;
    assert_eq!(status, 400, "{answer}");
    let mut flipped = registration(&w.runner, "octocat");
    flipped["tunnel"] = true.into();
    flipped.as_object_mut().expect("object").remove("host");
    let (status, answer) = w.gateway.register(&w.job, flipped).await;
    assert_eq!(status, 409, "{answer}");

    // The WebSocket endpoint: the job's token, a tunnel job, an upgrade.
    let path = "/v1/jobs/9876543304/tunnel";
    let (status, _) = w.gateway.http("GET", path, None, None).await;
    assert_eq!(status, 401);
    let (status, _) = w.gateway.http("GET", path, Some(&b), None).await;
    assert_eq!(status, 403, "another job's token");
    let (status, body) = w.gateway.http("GET", path, Some(&a), None).await;
    assert_eq!(status, 426, "not a WebSocket request: {body}");
    let dialed_path = format!("/v1/jobs/{}/tunnel", w.job);
    let (status, body) = w
        .gateway
        .http("GET", &dialed_path, Some(&dialed), None)
        .await;
    assert_eq!(status, 409, "a dialed job has no tunnel: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forward_only_session_through_the_tunnel_holds_the_runner_until_it_leaves() {
    let ns = Netns::create(3);
    let w = world_in(&ns, "9876543308", &[]).await;
    register(&w, &ns, &[]).await;
    // `ssh -N -L`: no shell, only a forward, as an RDP user has.
    let mut forward = forward_only(&w, free_port());
    let live = w.live();
    eventually("the forward-only session is counted", || {
        live.active_sessions() == 1
    })
    .await;
    // The job's steps are over: `runner wait` holds while someone is on.
    let mut wait = agent(&w, &ns, "wait", &[]).spawn().expect("runner wait");
    for _ in 0..200 {
        let (_, job) = w.gateway.job(&w.job).await;
        if job["hold"]["state"] == "holding" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, job) = w.gateway.job(&w.job).await;
    assert_eq!(job["hold"]["state"], "holding", "{job}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        wait.try_wait().expect("try_wait").is_none(),
        "wait returned while the forward was open"
    );
    let _ = forward.kill().await;
    let done = tokio::time::timeout(Duration::from_secs(40), wait.wait_with_output())
        .await
        .expect("wait returns once the last session left")
        .expect("wait");
    assert_eq!(
        done.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(
        String::from_utf8_lossy(&done.stdout).contains("released"),
        "{}",
        String::from_utf8_lossy(&done.stdout)
    );
    deregister(&w, &ns).await;
}

/// An HTTP proxy that takes `CONNECT host:port` only, as a corporate proxy
/// in front of a network where only HTTPS leaves; records what it was asked.
struct ConnectProxy {
    addr: std::net::SocketAddr,
    asked: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl ConnectProxy {
    async fn start(ip: &str) -> ConnectProxy {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("addr");
        let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = asked.clone();
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                        match client.read(&mut byte).await {
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let head = String::from_utf8_lossy(&head).to_string();
                    let target = match head.split_whitespace().collect::<Vec<_>>()[..] {
                        ["CONNECT", target, ..] => target.to_string(),
                        _ => {
                            let _ = client.write_all(b"HTTP/1.1 405 CONNECT only\r\n\r\n").await;
                            return;
                        }
                    };
                    log.lock().expect("lock").push(target.clone());
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await else {
                        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                        return;
                    };
                    if client
                        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                        .await
                        .is_ok()
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
            }
        });
        ConnectProxy { addr, asked }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn where_only_https_leaves_the_tunnel_rides_a_websocket_through_the_proxy() {
    let ns = Netns::create(4);
    let w = world_in(&ns, "9876543309", &[]).await;
    let proxy = ConnectProxy::start(&ns.host_ip).await;
    // The gateway's SSH port is out of the runner's reach (a closed port
    // stands in for a firewall); its API is reachable through the proxy.
    let closed = format!("{}:1", ns.host_ip);
    let via_proxy = [("HTTP_PROXY", format!("http://{}", proxy.addr))];
    register_with(&w, &ns, &["--tunnel-ssh".into(), closed], &via_proxy).await;
    tunnel_up(&w, 1).await;
    let log = tunnel_log(&w);
    assert!(log.contains("in a WebSocket"), "{log}");
    let asked = proxy.asked.lock().expect("lock").clone();
    assert!(
        asked.iter().all(|t| *t == w.gateway.api.to_string()),
        "the proxy carried the API and nothing else: {asked:?}"
    );
    assert!(
        asked.len() >= 2,
        "the registration and the tunnel: {asked:?}"
    );

    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        &w.job,
        &["echo", "over-https"],
        None,
    )
    .await;
    assert_eq!(r.stdout.trim(), "over-https", "{r:?}");
    let r = jump(&w, 22, &["echo", "jumped-over-https"]).await;
    assert_eq!(r.stdout.trim(), "jumped-over-https", "{r:?}");
    let mut cmd = agent(&w, &ns, "deregister", &[]);
    cmd.envs(via_proxy.iter().map(|(k, v)| (k, v)));
    assert_eq!(finish(cmd).await.code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_the_gateway_ends_closes_its_tunnel_and_the_agent_stops() {
    let ns = Netns::create(5);
    let w = world_in(&ns, "9876543310", &[]).await;
    register(&w, &ns, &[]).await;
    tunnel_up(&w, 1).await;
    // Ended at the gateway (as a hold that ran out or an expiry does), with
    // the agent's state file still in place.
    let (status, body) = w.gateway.call("DELETE", &w.job, "").await;
    assert_eq!(status, 200, "{body}");
    tunnel_process_ends(&w, "its job").await;
    let log = tunnel_log(&w);
    assert!(
        log.contains("tunnel dropped: ci-gateway: job"),
        "the gateway said why it closed the tunnel: {log}"
    );
    assert!(log.contains("ended at the gateway: stopping"), "{log}");
}

/// A compromised gateway: it holds the gateway's host key (so the agent's
/// pin passes) and takes any password; each logged-in agent's connection
/// handle goes to the test, which opens channels on it as it likes.
struct Impostor(tokio::sync::mpsc::Sender<russh::server::Handle>);

impl russh::server::Handler for Impostor {
    type Error = russh::Error;

    async fn auth_none(&mut self, _user: &str) -> Result<russh::server::Auth, Self::Error> {
        Ok(russh::server::Auth::Reject {
            proceed_with_methods: Some(russh::MethodSet::from(&[russh::MethodKind::Password][..])),
            partial_success: false,
        })
    }

    async fn auth_password(
        &mut self,
        _user: &str,
        _password: &str,
    ) -> Result<russh::server::Auth, Self::Error> {
        Ok(russh::server::Auth::Accept)
    }

    async fn auth_succeeded(
        &mut self,
        session: &mut russh::server::Session,
    ) -> Result<(), Self::Error> {
        let _ = self.0.try_send(session.handle());
        Ok(())
    }
}

async fn impostor(
    ip: &str,
    keys: Vec<russh::keys::PrivateKey>,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::Receiver<russh::server::Handle>,
) {
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .expect("bind impostor");
    let addr = listener.local_addr().expect("addr");
    let config = std::sync::Arc::new(russh::server::Config {
        keys,
        methods: russh::MethodSet::from(&[russh::MethodKind::Password][..]),
        ..Default::default()
    });
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (config, tx) = (config.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(session) = russh::server::run_stream(config, tcp, Impostor(tx)).await {
                    let _ = session.await;
                }
            });
        }
    });
    (addr, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_compromised_gateway_gets_nothing_from_the_agent_but_its_sshd() {
    let ns = Netns::create(6);
    let w = world_in(&ns, "9876543311", &[]).await;
    let relay = Relay::start(&ns.host_ip, w.gateway.ssh).await;
    register(&w, &ns, &["--tunnel-ssh".into(), relay.addr.to_string()]).await;
    tunnel_up(&w, 1).await;
    // The gateway is taken over: its host key serves the attacker's server,
    // which the agent reaches at its next connect.
    let (fake, mut agents) = impostor(&ns.host_ip, w.gateway.gw.host_keys.clone()).await;
    relay.redirect(fake);
    relay.cut();
    let agent = tokio::time::timeout(Duration::from_secs(30), agents.recv())
        .await
        .expect("the agent reconnects to the impostor")
        .expect("a handle");
    let refused = |what: &str, opened: Result<russh::Channel<russh::server::Msg>, russh::Error>| {
        assert!(
            matches!(opened, Err(russh::Error::ChannelOpenFailure(_))),
            "{what}: the agent must refuse it, got {:?}",
            opened.map(|c| c.id())
        );
    };
    refused("a session", agent.channel_open_session().await);
    refused(
        "direct-tcpip into the runner's network",
        agent
            .channel_open_direct_tcpip(ns.host_ip.as_str(), 22, "10.0.0.1", 1)
            .await,
    );
    refused("x11", agent.channel_open_x11("10.0.0.1", 1).await);
    refused("agent forwarding", agent.channel_open_agent().await);
    refused(
        "a port nobody allowed",
        agent
            .channel_open_forwarded_tcpip("localhost", 5900, "10.0.0.1", 1)
            .await,
    );
    // What the tunnel is for still opens: port 22 is the runner's sshd,
    // whatever address the gateway names.
    let mut sshd = agent
        .channel_open_forwarded_tcpip("169.254.169.254", 22, "10.0.0.1", 1)
        .await
        .expect("22 is the sshd");
    let banner = loop {
        match tokio::time::timeout(Duration::from_secs(10), sshd.wait()).await {
            Ok(Some(russh::ChannelMsg::Data { data })) => {
                break String::from_utf8_lossy(&data).to_string()
            }
            Ok(Some(_)) => continue,
            other => panic!("no banner from the sshd: {other:?}"),
        }
    };
    assert!(banner.starts_with("SSH-2.0-OpenSSH"), "{banner:?}");
    let log = tunnel_log(&w);
    assert!(log.contains("refused a session channel"), "{log}");
    deregister(&w, &ns).await;
}

/// Replicas: the agent's tunnel lands on A; a user whose connection reaches
/// B is relayed to A over SSH (B logs in with the replicas' shared host key)
/// in both modes. A key that is not the replicas' cannot relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_on_another_replica_is_relayed_to_the_replica_holding_the_tunnel() {
    let ns = Netns::create(7);
    let pg = Postgres::start("127.0.0.179").await;
    let env = pg.replica_env();
    let config: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let w = world_in(&ns, "9876543421", &config).await;
    register(&w, &ns, &[]).await;
    tunnel_up(&w, 1).await;
    let b = w.replica(&pg, "data-b", &[]).await;

    let r = ssh(&b, &w.octocat.path, &w.job, &["echo relayed; exit 5"], None).await;
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (5, "relayed\n"),
        "job mode through B: {r:?}"
    );
    // The relay connection lives as long as the session through it.
    let r = ssh(&b, &w.octocat.path, &w.job, &["sleep 3; echo later"], None).await;
    assert_eq!((r.code, r.stdout.as_str()), (0, "later\n"), "{r:?}");
    let r = ssh_jump(
        &b,
        &w.octocat.path,
        "octocat",
        &w.runner.user,
        &format!("job-{}", w.job),
        22,
        &["echo jumped"],
    )
    .await;
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "jumped\n"),
        "jump mode through B: {r:?}"
    );

    // Someone else's key as a relay: refused at authentication.
    let mut args = client_opts(&w.mallory.path);
    args.extend([
        "-p".to_string(),
        w.gateway.ssh.port().to_string(),
        "-N".to_string(),
        "-W".to_string(),
        "localhost:22".to_string(),
        format!("relay+{}@{}", w.job, w.gateway.ssh.ip()),
    ]);
    let r = run("ssh", &args, Some(Vec::new())).await;
    assert_ne!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("Permission denied"), "{r:?}");
    deregister(&w, &ns).await;
    b.stop().await;
}
