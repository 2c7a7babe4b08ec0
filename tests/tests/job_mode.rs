//! Job mode end to end: `ssh <job-id>@gateway` with the real OpenSSH client,
//! through the gateway, to a real OpenSSH sshd as the runner.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_keeps_stdout_and_stderr_apart_and_returns_the_exit_status() {
    let w = World::new("127.0.0.11", "9876543211").await;
    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        &w.job,
        &["echo out; echo err >&2; exit 7"],
        None,
    )
    .await;
    assert_eq!(r.code, 7, "{r:?}");
    assert_eq!(r.stdout, "out\n");
    assert!(r.stderr.contains("err"), "{r:?}");
    assert!(!r.stdout.contains("err"));
    // job- prefix works too, and stdin reaches the command.
    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        &format!("job-{}", w.job),
        &["cat"],
        Some(b"piped\n".to_vec()),
    )
    .await;
    assert_eq!((r.code, r.stdout.as_str()), (0, "piped\n"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_sees_the_registered_user_and_a_certificate_login() {
    let w = World::new("127.0.0.12", "9876543212").await;
    let r = ssh(&w.gateway, &w.octocat.path, &w.job, &["id -un"], None).await;
    assert_eq!(r.stdout.trim(), w.runner.user, "{r:?}");
    let log = w.runner.log();
    assert!(
        log.contains("ci-gateway:octocat:job-9876543212"),
        "runner sshd should log the certificate's key id naming the person and job:\n{log}"
    );
}

/// The gateway's own connection to the runner prefers AES-GCM (it is the
/// client there; `UPSTREAM_CIPHERS`), whatever the user's leg negotiated:
/// with chacha20-poly1305 on that leg, Poly1305 was a quarter of job mode's
/// CPU (docs/performance.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runner_leg_prefers_aes_gcm_whatever_the_user_leg_uses() {
    let w = World::new("127.0.0.82", "9876543282").await;
    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        &w.job,
        &["-oCiphers=chacha20-poly1305@openssh.com", "true"],
        None,
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    let log = w.runner.log();
    assert!(
        log.contains("kex: client->server cipher: aes128-gcm@openssh.com"),
        "the runner's sshd should have negotiated aes128-gcm with the gateway:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pty_is_allocated_with_dash_t_and_not_without() {
    let w = World::new("127.0.0.13", "9876543213").await;
    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        &w.job,
        &["-tt", "tty; echo TERM=$TERM"],
        None,
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("/dev/pts/"), "{r:?}");
    // Without -t there is no tty.
    let r = ssh(&w.gateway, &w.octocat.path, &w.job, &["tty"], None).await;
    assert!(r.stdout.contains("not a tty"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scp_sftp_and_rsync_move_files_both_ways_intact() {
    let w = World::new("127.0.0.14", "9876543214").await;
    let dir = w.dir.path();
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let src = dir.join("src.bin");
    std::fs::write(&src, &data).expect("write");
    let remote = dir.join("remote");
    std::fs::create_dir_all(&remote).expect("mkdir");
    set_mode(&remote, 0o777);
    let port = w.gateway.ssh.port().to_string();
    let target = |name: &str| format!("{}@127.0.0.1:{}", w.job, remote.join(name).display());

    // scp (sftp protocol, the default), up and down.
    let mut args = client_opts(&w.octocat.path);
    args.extend([
        "-P".into(),
        port.clone(),
        src.display().to_string(),
        target("a.bin"),
    ]);
    let r = run("scp", &args, None).await;
    assert_eq!(r.code, 0, "scp up: {r:?}");
    assert_eq!(std::fs::read(remote.join("a.bin")).expect("a.bin"), data);

    // Legacy scp protocol.
    let back = dir.join("back.bin");
    let mut args = client_opts(&w.octocat.path);
    args.extend([
        "-O".into(),
        "-P".into(),
        port.clone(),
        target("a.bin"),
        back.display().to_string(),
    ]);
    let r = run("scp", &args, None).await;
    assert_eq!(r.code, 0, "scp -O down: {r:?}");
    assert_eq!(std::fs::read(&back).expect("back"), data);

    // sftp batch.
    let batch = dir.join("batch");
    std::fs::write(
        &batch,
        format!(
            "put {} {}\nls {}\n",
            src.display(),
            remote.join("s.bin").display(),
            remote.display()
        ),
    )
    .expect("batch");
    let mut args = client_opts(&w.octocat.path);
    args.extend([
        "-P".into(),
        port.clone(),
        "-b".into(),
        batch.display().to_string(),
        format!("{}@127.0.0.1", w.job),
    ]);
    let r = run("sftp", &args, None).await;
    assert_eq!(r.code, 0, "sftp: {r:?}");
    assert_eq!(std::fs::read(remote.join("s.bin")).expect("s.bin"), data);

    // rsync -e ssh.
    let e = format!("ssh {} -p {port}", client_opts(&w.octocat.path).join(" "));
    let r = run(
        "rsync",
        &[
            "-a".into(),
            "-e".into(),
            e,
            src.display().to_string(),
            target("r.bin"),
        ],
        None,
    )
    .await;
    assert_eq!(r.code, 0, "rsync: {r:?}");
    assert_eq!(std::fs::read(remote.join("r.bin")).expect("r.bin"), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_stream_arrives_intact_in_both_directions() {
    let w = World::new("127.0.0.15", "9876543215").await;
    let size = 64 * 1024 * 1024;
    let data: Vec<u8> = (0..size as u32).map(|i| (i ^ (i >> 7)) as u8).collect();
    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        &w.job,
        &["sha256sum"],
        Some(data.clone()),
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    let expected = {
        let out = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().expect("stdin").write_all(&data)?;
                c.wait_with_output()
            })
            .expect("sha256sum");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(r.stdout, expected, "upload digest");
    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        &w.job,
        &[&format!("head -c {size} /dev/zero")],
        None,
    )
    .await;
    assert_eq!(r.code, 0);
    assert_eq!(r.stdout.len(), size);
}

/// Keys are exchanged again mid-stream on both legs: the user's client
/// rekeys the gateway (`RekeyLimit`), the runner's sshd rekeys the gateway's
/// client; the bytes arrive intact both ways. The gateway's russh drops a
/// key exchange's transcript once it served (vendor/russh/PATCH.md): a
/// rekey must still work after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_exchanged_again_mid_stream_on_both_legs() {
    let w = World::assemble("9876543194", &[], "127.0.0.1", |dir| {
        RunnerSshd::start_with(dir, "127.0.0.194", "ed25519", "RekeyLimit 1M\n")
    })
    .await;
    w.register_job().await;
    let size = 8 * 1024 * 1024;
    let data: Vec<u8> = (0..size as u32).map(|i| (i * 7 + (i >> 9)) as u8).collect();
    let digest = |bytes: &[u8]| {
        use std::io::Write;
        let mut c = std::process::Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sha256sum");
        c.stdin
            .take()
            .expect("stdin")
            .write_all(bytes)
            .expect("write");
        let out = c.wait_with_output().expect("sha256sum");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        &w.job,
        &[
            "-v",
            "-oRekeyLimit=1M",
            "tee /tmp/cigw-rekey-194 | sha256sum",
        ],
        Some(data.clone()),
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.stdout, digest(&data), "upload digest");
    let user_kex = r.stderr.matches("SSH2_MSG_KEXINIT sent").count();
    assert!(user_kex >= 4, "the user's leg rekeyed {user_kex} times");
    let down = ssh(
        &w.gateway,
        &w.octocat.path,
        &w.job,
        &[
            "-oRekeyLimit=1M",
            "cat /tmp/cigw-rekey-194; rm -f /tmp/cigw-rekey-194",
        ],
        None,
    )
    .await;
    assert_eq!(down.code, 0, "{down:?}");
    assert!(
        down.raw_stdout == data,
        "download differs ({} bytes)",
        down.raw_stdout.len()
    );
    let log = w.runner.log();
    let runner_rekeys = log
        .lines()
        .filter(|l| l.contains("SSH2_MSG_KEXINIT sent") && !l.contains("preauth"))
        .count();
    assert!(
        runner_rekeys >= 4,
        "the runner leg rekeyed {runner_rekeys} times:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_forward_is_dialled_on_the_runner_side() {
    let w = World::new("127.0.0.16", "9876543216").await;
    // A TCP service "on the runner" (the RDP case): echoes with a prefix.
    let service = tokio::net::TcpListener::bind("127.0.0.16:0")
        .await
        .expect("bind");
    let service_port = service.local_addr().expect("addr").port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = service.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let _ = s.write_all(b"runner says: ").await;
                let _ = s.write_all(&buf[..n]).await;
            });
        }
    });
    let local_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
        l.local_addr().expect("addr").port()
    };
    let mut args = client_opts(&w.octocat.path);
    args.extend([
        "-p".into(),
        w.gateway.ssh.port().to_string(),
        "-N".into(),
        "-o".into(),
        "ExitOnForwardFailure=yes".into(),
        "-L".into(),
        format!("127.0.0.1:{local_port}:127.0.0.16:{service_port}"),
        format!("{}@127.0.0.1", w.job),
    ]);
    let mut child = tokio::process::Command::new("ssh")
        .args(&args)
        .kill_on_drop(true)
        .spawn()
        .expect("ssh -L");
    let reply = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", local_port)).await {
                s.write_all(b"hello").await.expect("write");
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out).await;
                if !out.is_empty() {
                    return String::from_utf8_lossy(&out).to_string();
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    };
    let reply = tokio::time::timeout(std::time::Duration::from_secs(30), reply)
        .await
        .expect("forward answers");
    assert_eq!(reply, "runner says: hello");
    // A forward-only session counts as an active session.
    let (_, job) = w.gateway.job(&w.job).await;
    assert_eq!(job["active_sessions"], 1, "{job}");
    let _ = child.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_job_gets_a_one_line_error() {
    let w = World::new("127.0.0.17", "9876543217").await;
    let r = ssh(&w.gateway, &w.octocat.path, "1111111111", &["true"], None).await;
    assert_eq!(r.code, 255);
    assert!(
        r.stderr.contains("job 1111111111 is not registered"),
        "{r:?}"
    );
    let r = ssh(&w.gateway, &w.octocat.path, "job-", &["true"], None).await;
    assert!(r.stderr.contains("bad username"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_actor_listed_users_and_admins_get_into_a_job() {
    let w = World::new("127.0.0.18", "9876543218").await;
    // A stranger with a perfectly good GitHub key is refused.
    let r = ssh(&w.gateway, &w.mallory.path, &w.job, &["true"], None).await;
    assert_eq!(r.code, 255, "{r:?}");
    assert!(r.stderr.contains("Permission denied"), "{r:?}");
    // The admin (RSA key) gets in.
    let r = ssh(&w.gateway, &w.admin.path, &w.job, &["echo admin-in"], None).await;
    assert_eq!(r.stdout.trim(), "admin-in", "{r:?}");
    // hubot (ECDSA key) only once the registration lists them.
    let r = ssh(&w.gateway, &w.hubot.path, &w.job, &["true"], None).await;
    assert_eq!(r.code, 255, "{r:?}");
    let mut body = registration(&w.runner, "octocat");
    body["allowed_users"] = serde_json::json!(["hubot"]);
    let (status, _) = w.gateway.register(&w.job, body).await;
    assert_eq!(status, 200);
    let r = ssh(&w.gateway, &w.hubot.path, &w.job, &["echo hubot-in"], None).await;
    assert_eq!(r.stdout.trim(), "hubot-in", "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_allowed_on_job_a_never_reaches_job_b() {
    let w = World::new("127.0.0.19", "9876543219").await;
    let other = RunnerSshd::start(w.dir.path(), "127.0.0.20");
    let (status, body) = w
        .gateway
        .register("5555555555", registration(&other, "hubot"))
        .await;
    assert_eq!(status, 201, "{body}");
    other.install_from(&body);
    let r = ssh(&w.gateway, &w.octocat.path, "5555555555", &["true"], None).await;
    assert_eq!(r.code, 255, "octocat reached hubot's job: {r:?}");
    let r = ssh(&w.gateway, &w.hubot.path, "5555555555", &["echo ok"], None).await;
    assert_eq!(r.stdout.trim(), "ok", "{r:?}");
    let r = ssh_jump(
        &w.gateway,
        &w.octocat.path,
        "octocat",
        &other.user,
        "5555555555",
        22,
        &["true"],
    )
    .await;
    assert_eq!(r.code, 255);
    assert!(
        r.stderr
            .contains("octocat is not allowed on job 5555555555"),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_with_another_host_key_is_refused() {
    let w = World::new("127.0.0.21", "9876543221").await;
    let mut body = registration(&w.runner, "octocat");
    let impostor = keygen(w.dir.path(), "impostor", "ed25519");
    body["host_keys"] = serde_json::json!([impostor.public]);
    // A refresh cannot swap the host key (409); a job registered with
    // another key than the runner's is refused at connect.
    let (status, _) = w.gateway.register(&w.job, body.clone()).await;
    assert_eq!(status, 409);
    let (status, _) = w.gateway.register("7776543221", body).await;
    assert_eq!(status, 201);
    let r = ssh(&w.gateway, &w.octocat.path, "7776543221", &["true"], None).await;
    assert_eq!(r.code, 255);
    assert!(
        r.stderr.contains("does not match the keys it registered"),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_runner_is_reported_not_hung_on() {
    let w = World::new("127.0.0.22", "9876543222").await;
    let mut body = registration(&w.runner, "octocat");
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.23:0").expect("probe");
        l.local_addr().expect("addr").port()
    };
    body["host"] = serde_json::json!("127.0.0.23");
    body["port"] = serde_json::json!(closed_port);
    let (status, _) = w.gateway.register("7776543222", body).await;
    assert_eq!(status, 201);
    let r = ssh(&w.gateway, &w.octocat.path, "7776543222", &["true"], None).await;
    assert_eq!(r.code, 255);
    assert!(r.stderr.contains("unreachable"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregistering_closes_open_sessions_with_a_message_and_refuses_new_ones() {
    let w = World::new("127.0.0.24", "9876543224").await;
    let gw = &w.gateway;
    let key = w.octocat.path.clone();
    let job = w.job.clone();
    let port = gw.ssh.port();
    let session = tokio::spawn(async move {
        let mut args = client_opts(&key);
        args.extend([
            "-p".into(),
            port.to_string(),
            format!("{job}@127.0.0.1"),
            "sleep 60".into(),
        ]);
        run("ssh", &args, None).await
    });
    let live = w.live();
    eventually("the session is counted", || live.active_sessions() == 1).await;
    let (_, body) = gw.job(&w.job).await;
    assert_eq!(body["active_sessions"], 1);
    let (status, _) = gw.call("DELETE", &w.job, "").await;
    assert_eq!(status, 200);
    let r = session.await.expect("join");
    assert_eq!(r.code, 255, "{r:?}");
    assert!(r.stderr.contains("ended"), "{r:?}");
    let r = ssh(gw, &w.octocat.path, &w.job, &["true"], None).await;
    assert!(r.stderr.contains("ended"), "{r:?}");
    let (status, _) = gw.job(&w.job).await;
    assert_eq!(status, 410);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_is_bulk_both_ways_at_once_does_not_stall() {
    // `cat` echoes while the client is still sending: both directions of one
    // channel are full at the same time (the case that deadlocks when window
    // is granted on receipt and the session loop blocks on a full queue).
    let w = World::new("127.0.0.25", "9876543225").await;
    let size = 48 * 1024 * 1024;
    let data: Vec<u8> = (0..size as u32)
        .map(|i| (i.wrapping_mul(31) >> 3) as u8)
        .collect();
    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        &w.job,
        &["cat"],
        Some(data.clone()),
    )
    .await;
    assert_eq!(r.code, 0, "stderr: {}", r.stderr);
    assert_eq!(r.raw_stdout.len(), size, "echoed byte count");
    assert!(r.raw_stdout == data, "echoed bytes differ");
}

/// Drives `ssh -tt` from a real pseudo-terminal (Python's `pty`), resizes that
/// terminal and signals SIGWINCH, as a terminal emulator does.
const RESIZE_DRIVER: &str = r#"
import os, pty, sys, time, fcntl, termios, struct, signal, select
args = sys.argv[1:]
pid, fd = pty.fork()
if pid == 0:
    os.execvp("ssh", ["ssh"] + args)
fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
out = b""
def read_until(needle, t):
    global out
    end = time.time() + t
    while time.time() < end and needle not in out:
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            try:
                out += os.read(fd, 1024)
            except OSError:
                return
read_until(b"READY", 20)
fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))
os.kill(pid, signal.SIGWINCH)
read_until(b"50 132", 20)
sys.stdout.write(out.decode(errors="replace"))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pty_takes_the_clients_size_and_follows_window_resizes() {
    let w = World::new("127.0.0.26", "9876543226").await;
    let python = run("sh", &["-c".into(), "command -v python3".into()], None).await;
    assert_eq!(
        python.code, 0,
        "python3 is missing: install the Debian package python3"
    );
    let mut args = vec!["-c".to_string(), RESIZE_DRIVER.to_string()];
    args.extend(client_opts(&w.octocat.path));
    args.extend([
        "-p".into(),
        w.gateway.ssh.port().to_string(),
        "-tt".into(),
        format!("{}@127.0.0.1", w.job),
        // The trap is set before READY: a SIGWINCH that arrives before it
        // would be ignored (its default action) and the test would hang.
        "trap 'stty size; exit 0' WINCH; stty size; echo READY; while :; do sleep 0.1; done".into(),
    ]);
    let r = run("python3", &args, None).await;
    let lines: Vec<&str> = r.stdout.lines().map(str::trim).collect();
    assert!(
        lines.contains(&"24 80"),
        "initial size not forwarded: {r:?}"
    );
    assert!(lines.contains(&"50 132"), "resize not forwarded: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cipher_openssh_offers_by_default_is_served() {
    let w = World::new("127.0.0.27", "9876543227").await;
    for cipher in [
        "chacha20-poly1305@openssh.com",
        "aes128-gcm@openssh.com",
        "aes256-gcm@openssh.com",
        "aes128-ctr",
        "aes192-ctr",
        "aes256-ctr",
    ] {
        let flag = format!("-c{cipher}");
        let r = ssh(
            &w.gateway,
            &w.octocat.path,
            &w.job,
            &[&flag, "echo", cipher],
            None,
        )
        .await;
        assert_eq!(r.stdout.trim(), cipher, "{r:?}");
    }
}
