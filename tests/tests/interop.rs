//! Clients nobody here tuned against: PuTTY's plink and dropbear's dbclient,
//! and OpenSSH features that exercise channel requests and refusals (X11,
//! `-N -L` to a port nothing listens on). Loopback only; counts bounded.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;

/// `key` as a PuTTY private key file.
fn ppk(w: &World, key: &KeyPair) -> PathBuf {
    let out = w.dir.path().join("key.ppk");
    let status = std::process::Command::new("puttygen")
        .arg(&key.path)
        .args(["-O", "private", "-o"])
        .arg(&out)
        .status()
        .expect("puttygen (putty-tools) runs");
    assert!(status.success(), "puttygen converted the key");
    out
}

/// `key` as a dropbear private key file.
fn dropbear_key(w: &World, key: &KeyPair) -> PathBuf {
    let out = w.dir.path().join("key.dropbear");
    let status = std::process::Command::new("dropbearconvert")
        .args(["openssh", "dropbear"])
        .arg(&key.path)
        .arg(&out)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("dropbearconvert (dropbear-bin) runs");
    assert!(status.success(), "dropbearconvert converted the key");
    out
}

/// The gateway's host key fingerprint, as plink's `-hostkey` takes it.
fn gateway_fingerprint(w: &World) -> String {
    ci_gateway::keys::fingerprint(w.gateway.gw.host_keys[0].public_key())
}

fn plink_args(w: &World, ppk: &std::path::Path, extra: &[&str], command: &str) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "-batch".into(),
        "-ssh".into(),
        "-P".into(),
        w.gateway.ssh.port().to_string(),
        "-i".into(),
        ppk.display().to_string(),
        "-hostkey".into(),
        gateway_fingerprint(w),
        "-l".into(),
        w.job.clone(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["127.0.0.1".into(), command.into()]);
    args
}

/// plink and dbclient close the channel as soon as both sides sent EOF,
/// before the runner's exit status arrives; the gateway ended the channel
/// there, and 2 to 6 of 40 runs got status 0. The status is relayed now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plink_and_dbclient_get_every_exit_status() {
    let w = World::new("127.0.0.131", "9876543131").await;
    let ppk = ppk(&w, &w.octocat);
    let db = dropbear_key(&w, &w.octocat);
    let mut lost = Vec::new();
    for n in 0..40u32 {
        let status = 1 + n % 100;
        let command = format!("echo run{n}; exit {status}");
        let r = run("plink", &plink_args(&w, &ppk, &[], &command), None).await;
        assert!(r.stdout.contains(&format!("run{n}")), "{r:?}");
        if r.code != status as i32 {
            lost.push(("plink", n, r.code));
        }
        let args = [
            "-y".to_string(),
            "-y".into(),
            "-i".into(),
            db.display().to_string(),
            "-p".into(),
            w.gateway.ssh.port().to_string(),
            format!("{}@127.0.0.1", w.job),
            command.clone(),
        ];
        let r = run("dbclient", &args, None).await;
        assert!(r.stdout.contains(&format!("run{n}")), "{r:?}");
        if r.code != status as i32 {
            lost.push(("dbclient", n, r.code));
        }
    }
    assert!(lost.is_empty(), "exit statuses lost: {lost:?}");
}

/// Runs a client with an X display set, so that it asks for X11.
async fn with_display(program: &str, args: &[String]) -> Run {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env("DISPLAY", "127.0.0.1:99")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    finish(cmd).await
}

/// `x11-req` was never answered: OpenSSH claimed X11 forwarding was
/// accepted, and `plink -X` failed every login with "Server refused to start
/// a shell/command" (its next reply was taken as the answer to X11). X11 is
/// refused now, in its turn, and the command runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x11_is_refused_in_order_and_the_session_runs() {
    let w = World::new("127.0.0.132", "9876543132").await;
    let ppk = ppk(&w, &w.octocat);
    let plink = plink_args(&w, &ppk, &["-X", "-t"], "echo x11-ok; exit 3");
    let r = with_display("plink", &plink).await;
    assert!(r.stdout.contains("x11-ok"), "{r:?}");
    assert_eq!(r.code, 3, "{r:?}");
    let mut args = vec!["-o".to_string(), "LogLevel=INFO".into()];
    args.extend(client_opts(&w.octocat.path));
    args.extend([
        "-X".to_string(),
        "-p".into(),
        w.gateway.ssh.port().to_string(),
        format!("{}@127.0.0.1", w.job),
        "echo x11-ok".into(),
    ]);
    let r = with_display("ssh", &args).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("x11-ok"), "{r:?}");
    assert!(
        r.stderr.contains("X11 forwarding request failed"),
        "OpenSSH is told X11 was refused: {r:?}"
    );
}

/// A free loopback port on `ip` (bound, then let go).
fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind(format!("{ip}:0"))
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Connects to a local forward and reads what comes first (an SSH banner
/// when the forward reaches a runner's sshd; nothing when it is refused).
async fn first_bytes(port: u16) -> String {
    use tokio::io::AsyncReadExt;
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return String::new();
    };
    let mut buf = [0u8; 64];
    match tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf)).await {
        Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).to_string(),
        _ => String::new(),
    }
}

/// Waits until the local forward on `port` answers with an SSH banner (the
/// client is up and its forward reaches a runner's sshd); returns it.
async fn forward_up(port: u16) -> String {
    let mut banner = String::new();
    for _ in 0..100 {
        banner = first_bytes(port).await;
        if banner.starts_with("SSH-") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    banner
}

/// `ssh -N -L` with one forward to a port nothing listens on: one refused
/// connect disconnected everything. Now the refusal ends that channel only
/// and the other forward on the same connection works, in both modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_forward_leaves_the_connection_up() {
    let w = World::new("127.0.0.133", "9876543133").await;
    let runner_port = w.runner.addr.port();
    for (user, dead, live) in [
        // Job mode: destinations as the runner sees them.
        (
            w.job.clone(),
            format!("127.0.0.133:{}", free_port("127.0.0.133")),
            format!("127.0.0.133:{runner_port}"),
        ),
        // Jump mode: 3389 is allowed and nothing listens there; 22 is the
        // runner's sshd.
        (
            "octocat".to_string(),
            format!("job-{}:3389", w.job),
            format!("job-{}:22", w.job),
        ),
    ] {
        let (p_dead, p_live) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
        // The first LogLevel wins: INFO shows the refusal's code and text.
        let mut args = vec!["-o".to_string(), "LogLevel=INFO".into()];
        args.extend(client_opts(&w.octocat.path));
        args.extend([
            "-N".to_string(),
            "-o".into(),
            "ExitOnForwardFailure=yes".into(),
            "-L".into(),
            format!("127.0.0.1:{p_dead}:{dead}"),
            "-L".into(),
            format!("127.0.0.1:{p_live}:{live}"),
            "-p".into(),
            w.gateway.ssh.port().to_string(),
            format!("{user}@127.0.0.1"),
        ]);
        let mut child = tokio::process::Command::new("ssh")
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("ssh");
        // Up once the live forward answers with the runner's banner.
        let banner = forward_up(p_live).await;
        assert!(
            banner.starts_with("SSH-"),
            "{user}: the forward works: {banner:?}"
        );
        // The refused one gives nothing, three times over.
        for _ in 0..3 {
            assert_eq!(first_bytes(p_dead).await, "", "{user}");
        }
        // The connection is still up and the good forward still works.
        assert!(
            child.try_wait().expect("wait").is_none(),
            "{user}: ssh exited"
        );
        assert!(first_bytes(p_live).await.starts_with("SSH-"), "{user}");
        let _ = child.kill().await;
        let out = child.wait_with_output().await.expect("output");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("open failed: connect failed: ci-gateway:"),
            "{user}: the refusal is reported with its code and reason: {stderr}"
        );
    }
}

/// The gateway's host keys as a known_hosts file for its SSH port, one
/// key type only: the client must verify a signature by exactly that key.
fn known_hosts_with(w: &World, algorithm_prefix: &str) -> PathBuf {
    let key = w
        .gateway
        .gw
        .host_keys
        .iter()
        .map(|k| ci_gateway::keys::openssh_line(k.public_key()))
        .find(|line| line.starts_with(algorithm_prefix))
        .unwrap_or_else(|| panic!("the gateway has a {algorithm_prefix} host key"));
    let path = w.dir.path().join(format!("known_hosts-{algorithm_prefix}"));
    std::fs::write(
        &path,
        format!("[127.0.0.1]:{} {key}\n", w.gateway.ssh.port()),
    )
    .expect("write known_hosts");
    path
}

/// Hardened and FIPS-mode clients: each ECDH kex, and each host key type
/// checked against a known_hosts that holds only that key. A runner whose
/// sshd takes only ECDH kex (with an ECDSA host key) is reached too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kex_and_host_key_type_gets_in() {
    let w = World::new("127.0.0.148", "9876543148").await;
    let data = w.dir.path().join("data");
    for file in [
        "ssh_host_ed25519_key",
        "ssh_host_ecdsa_key",
        "ssh_host_rsa_key",
    ] {
        let meta = std::fs::metadata(data.join(file)).expect("generated on first start");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{file}");
    }
    let job = w.job.clone();
    for kex in [
        "ecdh-sha2-nistp256",
        "ecdh-sha2-nistp384",
        "ecdh-sha2-nistp521",
        "curve25519-sha256",
        "diffie-hellman-group14-sha256",
    ] {
        let option = format!("-oKexAlgorithms={kex}");
        let r = ssh(
            &w.gateway,
            &w.octocat.path,
            &job,
            &[&option, "echo", "in"],
            None,
        )
        .await;
        assert_eq!((r.code, r.stdout.as_str()), (0, "in\n"), "{kex}: {r:?}");
    }
    for (algorithm, prefix, works) in [
        // The check is real: a known_hosts with only the ed25519 key does
        // not vouch for the RSA one.
        ("rsa-sha2-512", "ssh-ed25519", false),
        ("ssh-ed25519", "ssh-ed25519", true),
        ("ecdsa-sha2-nistp256", "ecdsa-sha2-nistp256", true),
        ("rsa-sha2-512", "ssh-rsa", true),
        ("rsa-sha2-256", "ssh-rsa", true),
    ] {
        let known = known_hosts_with(&w, prefix);
        // client_opts trusts any host key; OpenSSH takes the first value
        // of an option, so these replace its two.
        let mut args: Vec<String> = client_opts(&w.octocat.path)
            .into_iter()
            .map(|a| match a.as_str() {
                "StrictHostKeyChecking=no" => "StrictHostKeyChecking=yes".to_string(),
                "UserKnownHostsFile=/dev/null" => format!("UserKnownHostsFile={}", known.display()),
                _ => a,
            })
            .collect();
        args.extend([
            format!("-oHostKeyAlgorithms={algorithm}"),
            "-p".into(),
            w.gateway.ssh.port().to_string(),
            format!("{job}@127.0.0.1"),
            "echo".into(),
            "in".into(),
        ]);
        let r = run("ssh", &args, None).await;
        if works {
            assert_eq!(
                (r.code, r.stdout.as_str()),
                (0, "in\n"),
                "{algorithm}: {r:?}"
            );
        } else {
            assert_eq!(r.code, 255, "{algorithm} with another key pinned: {r:?}");
            assert!(r.stderr.contains("Host key verification failed"), "{r:?}");
        }
    }
    // A FIPS-mode profile end to end.
    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        &job,
        &[
            "-oKexAlgorithms=ecdh-sha2-nistp384",
            "-oHostKeyAlgorithms=ecdsa-sha2-nistp256",
            "-oCiphers=aes256-gcm@openssh.com",
            "echo",
            "in",
        ],
        None,
    )
    .await;
    assert_eq!((r.code, r.stdout.as_str()), (0, "in\n"), "{r:?}");

    // The runner leg: an sshd that takes nothing but ECDH.
    let strict = RunnerSshd::start_with(
        w.dir.path(),
        "127.0.0.149",
        "ecdsa",
        "KexAlgorithms ecdh-sha2-nistp256,ecdh-sha2-nistp384\nHostKeyAlgorithms ecdsa-sha2-nistp256\n",
    );
    let (status, body) = w
        .gateway
        .register("9876543149", registration(&strict, "octocat"))
        .await;
    assert_eq!(status, 201, "{body}");
    strict.install_from(&body);
    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        "9876543149",
        &["echo", "in"],
        None,
    )
    .await;
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "in\n"),
        "{r:?}\n{}",
        strict.log()
    );
}

/// A TCP relay on `ip` to `target` that holds every chunk for `delay` each
/// way: a runner far away, whose handshakes take a while and so overlap.
async fn far_away(ip: &str, target: std::net::SocketAddr, delay: Duration) -> std::net::SocketAddr {
    relay(ip, target, delay, 0).await
}

/// [`far_away`] that also closes its first `drop_first` connections at
/// once, as an sshd past its MaxStartups does.
async fn relay(
    ip: &str,
    target: std::net::SocketAddr,
    delay: Duration,
    drop_first: usize,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .expect("bind the relay");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut dropped = 0;
        while let Ok((user, _)) = listener.accept().await {
            if dropped < drop_first {
                dropped += 1;
                drop(user);
                continue;
            }
            tokio::spawn(async move {
                let Ok(runner) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let (a_r, a_w) = user.into_split();
                let (b_r, b_w) = runner.into_split();
                tokio::join!(slow_copy(a_r, b_w, delay), slow_copy(b_r, a_w, delay));
            });
        }
    });
    addr
}

async fn slow_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        tokio::time::sleep(delay).await;
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// OpenSSH's sshd drops new connections at random once 10 are
/// unauthenticated (`MaxStartups 10:30:100`, the default). A burst of job
/// logins to a runner 100 ms away waits in line at the gateway instead (8
/// handshakes per runner at once; one retry of a connection dropped before
/// the handshake), so none is lost. The runner here drops every connection
/// past 8 (`MaxStartups 8:100:8`), the gateway's own limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_logins_gets_through_a_default_maxstartups_runner() {
    const BURST: usize = 60;
    let w = World::unregistered(
        "127.0.0.150",
        "9876543150",
        &[
            ("CI_GATEWAY__SSH__MAX_CONNECTIONS_PER_LOGIN", "100"),
            // 60 handshakes of about 1 s each, 8 at a time.
            ("CI_GATEWAY__UPSTREAM__CONNECT_TIMEOUT", "30s"),
        ],
    )
    .await;
    let runner = RunnerSshd::start_with(
        w.dir.path(),
        "127.0.0.151",
        "ed25519",
        "MaxStartups 8:100:8\n",
    );
    let distant = far_away("127.0.0.152", runner.addr, Duration::from_millis(100)).await;
    let mut far = registration(&runner, "octocat");
    far["host"] = distant.ip().to_string().into();
    far["port"] = distant.port().into();
    let (status, body) = w.gateway.register("9876543151", far).await;
    assert_eq!(status, 201, "{body}");
    runner.install_from(&body);
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..BURST {
        let args = {
            let mut a = client_opts(&w.octocat.path);
            a.extend([
                "-p".to_string(),
                w.gateway.ssh.port().to_string(),
                "9876543151@127.0.0.1".to_string(),
                "true".to_string(),
            ]);
            a
        };
        burst.spawn(async move { run("ssh", &args, None).await });
    }
    let mut failed = Vec::new();
    while let Some(r) = burst.join_next().await {
        let r = r.expect("join");
        if r.code != 0 {
            failed.push(r.stderr);
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {BURST} logins failed: {failed:#?}",
        failed.len()
    );
    assert!(
        !runner.log().contains("past MaxStartups"),
        "the runner's sshd dropped connections:\n{}",
        runner.log()
    );

    // One connection dropped before the handshake is retried; two are
    // reported for what they are.
    for (job, ip, drops) in [
        ("9876543153", "127.0.0.153", 1),
        ("9876543154", "127.0.0.154", 2),
    ] {
        let dropper = relay(ip, runner.addr, Duration::ZERO, drops).await;
        let mut dropping = registration(&runner, "octocat");
        dropping["host"] = dropper.ip().to_string().into();
        dropping["port"] = dropper.port().into();
        let (status, body) = w.gateway.register(job, dropping).await;
        assert_eq!(status, 201, "{body}");
        runner.install_from(&body);
        let r = ssh(&w.gateway, &w.octocat.path, job, &["echo", "in"], None).await;
        if drops == 1 {
            assert_eq!((r.code, r.stdout.as_str()), (0, "in\n"), "{r:?}");
        } else {
            assert_eq!(r.code, 255, "{r:?}");
            assert!(
                r.stderr
                    .contains("closed the connection before the SSH handshake, twice")
                    && r.stderr.contains("MaxStartups")
                    && r.stderr.lines().count() == 1,
                "{r:?}"
            );
        }
    }
}

/// A forward whose dial hangs (a runner that drops SYNs) holds up nothing
/// else on the user's connection: the dial runs in the channel's own task,
/// not in the connection's callback. Before, the second forward waited for
/// the first dial's timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_dial_holds_up_no_other_channel() {
    let w = World::with_config(
        "127.0.0.157",
        "9876543157",
        &[("CI_GATEWAY__UPSTREAM__CONNECT_TIMEOUT", "60s")],
    )
    .await;
    // A listener whose accept queue is full: further SYNs go unanswered.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.156:0".parse().expect("addr"))
        .expect("bind");
    let black_hole = socket.listen(0).expect("listen");
    let hole = black_hole.local_addr().expect("addr");
    let mut fillers = Vec::new();
    for _ in 0..4 {
        fillers.push(tokio::spawn(tokio::net::TcpStream::connect(hole)));
    }
    let mut stalled = registration(&w.runner, "octocat");
    stalled["host"] = hole.ip().to_string().into();
    stalled["port"] = hole.port().into();
    let (status, body) = w.gateway.register("9876543156", stalled).await;
    assert_eq!(status, 201, "{body}");

    let (p_stalled, p_live) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
    let mut args = client_opts(&w.octocat.path);
    args.extend([
        "-N".to_string(),
        "-L".into(),
        format!("127.0.0.1:{p_stalled}:job-9876543156:22"),
        "-L".into(),
        format!("127.0.0.1:{p_live}:job-{}:22", w.job),
        "-p".into(),
        w.gateway.ssh.port().to_string(),
        "octocat@127.0.0.1".into(),
    ]);
    let mut child = tokio::process::Command::new("ssh")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("ssh");
    let banner = forward_up(p_live).await;
    assert!(banner.starts_with("SSH-"), "the forward works: {banner:?}");

    // Start the dial that hangs, and wait until the gateway is in it.
    let mut hanging = tokio::net::TcpStream::connect(("127.0.0.1", p_stalled))
        .await
        .expect("the local forward accepts");
    let audit = w.dir.path().join("data").join("audit.jsonl");
    let destination = format!("\"destination\":\"{hole}\"");
    eventually("the gateway dials the black hole", || {
        std::fs::read_to_string(&audit).is_ok_and(|a| a.contains(&destination))
    })
    .await;
    // The other forward on the same connection answers meanwhile...
    assert!(
        first_bytes(p_live).await.starts_with("SSH-"),
        "a second channel waited for the hanging dial"
    );
    // ...while the hanging one is still waiting (neither data nor EOF).
    let mut buf = [0u8; 16];
    let still = tokio::time::timeout(
        Duration::from_millis(300),
        tokio::io::AsyncReadExt::read(&mut hanging, &mut buf),
    )
    .await;
    assert!(still.is_err(), "the stalled forward ended early: {still:?}");
    assert!(child.try_wait().expect("wait").is_none(), "ssh exited");
    drop(fillers);
}

/// A runner whose sshd answers a request late: its refusal of the pty comes
/// after 3 s, and the exec behind it is answered after that. Each reply
/// reaches the request it answers (the old reply FIFO with its 30 s wait
/// could hand a late reply to the next request): the client reports the
/// pty refused, and the command runs with its output and exit status.
/// (OpenSSH's `-tt` makes a refused pty fatal, so the client is plink.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reply_answers_its_own_request() {
    let w = World::unregistered("127.0.0.158", "9876543158", &[]).await;
    let host_key = keygen(w.dir.path(), "slow_host_key", "ed25519");
    let allowed = w.dir.path().join("slow_authorized_keys");
    std::fs::write(&allowed, "").expect("write");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slow_runner.py");
    let mut runner = tokio::process::Command::new("/usr/bin/python3")
        .arg(&script)
        .arg("127.0.0.159")
        .arg(&host_key.path)
        .arg(&allowed)
        .arg("3")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 with paramiko (python3-paramiko)");
    let mut port = String::new();
    tokio::io::AsyncBufReadExt::read_line(
        &mut tokio::io::BufReader::new(runner.stdout.take().expect("stdout")),
        &mut port,
    )
    .await
    .expect("the runner's port");
    let port: u16 = port.trim().parse().expect("a port");
    let (status, answer) = w
        .gateway
        .register(
            &w.job,
            serde_json::json!({
                "actor": "octocat", "host": "127.0.0.159", "port": port,
                "user": "runner", "host_keys": [host_key.public], "os": "linux",
                "runner_login": "key",
            }),
        )
        .await;
    assert_eq!(status, 201, "{answer}");
    let lines: Vec<&str> = answer["authorized_keys"]
        .as_array()
        .expect("lines")
        .iter()
        .filter_map(|l| l.as_str())
        .collect();
    std::fs::write(&allowed, lines.join("\n")).expect("install");
    // plink asks for a pty (`-t`), goes on without one when refused, and
    // says "refused to start a shell/command" if its exec is refused.
    let ppk = ppk(&w, &w.octocat);
    let r = run(
        "plink",
        &plink_args(&w, &ppk, &["-t"], "echo late-ok; exit 4"),
        None,
    )
    .await;
    assert!(r.stdout.contains("late-ok"), "{r:?}");
    assert_eq!(r.code, 4, "{r:?}");
    assert!(r.stderr.contains("refused to allocate pty"), "{r:?}");
    assert!(!r.stderr.contains("refused to start"), "{r:?}");
}

/// paramiko (Fabric, Ansible's paramiko connection) asks for the userauth
/// service again before each key it tries. russh ignored the repeat, so a
/// second key never got an answer: the client hung until the gateway's
/// authentication deadline (vendor/russh/PATCH.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paramiko_gets_in_with_its_second_key() {
    let w = World::new("127.0.0.163", "9876543163").await;
    let args = vec![
        format!("{}/scripts/two_keys.py", env!("CARGO_MANIFEST_DIR")),
        w.gateway.ssh.ip().to_string(),
        w.gateway.ssh.port().to_string(),
        w.job.clone(),
        w.mallory.path.display().to_string(),
        w.octocat.path.display().to_string(),
    ];
    let r = run("/usr/bin/python3", &args, None).await;
    assert_eq!(r.stdout.trim(), "second-key-in", "{r:?}");
}
