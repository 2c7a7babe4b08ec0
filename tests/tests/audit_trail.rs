//! The gateway as a real process. The audit trail: what it records for a
//! registration, logins and sessions; that a session's start is on disk
//! before the session runs (SIGKILL mid-session loses nothing); and that no
//! secret reaches the audit trail or the logs. And SIGTERM: users are told,
//! get the grace, then a disconnect message, and the process exits cleanly.
//! And the agent download: the running binary, byte for byte.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::Value;

const GATEWAY: &str = env!("CARGO_BIN_EXE_ci-gateway-under-test");

fn free_port(ip: &str) -> u16 {
    let l = std::net::TcpListener::bind(format!("{ip}:0")).expect("probe");
    l.local_addr().expect("addr").port()
}

/// A free loopback address for the gateway process to listen on.
fn free_addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .expect("addr")
}

/// `ci-gateway serve` as a process on free loopback ports, its log files in
/// `dir`, its state in `dir/data`.
struct Process {
    child: std::process::Child,
    ssh: SocketAddr,
    api: SocketAddr,
    data: std::path::PathBuf,
    /// Standard output (the log records) and standard error.
    log: std::path::PathBuf,
    err: std::path::PathBuf,
}

impl Process {
    async fn start(dir: &std::path::Path, github: &FakeGithub, env: &[(&str, &str)]) -> Process {
        let data = dir.join("data");
        let (ssh, api) = (free_addr(), free_addr());
        let (log, err) = (dir.join("gateway.log"), dir.join("gateway.err"));
        let child = std::process::Command::new(GATEWAY)
            .arg("serve")
            .env("CI_GATEWAY__SSH__LISTEN", ssh.to_string())
            .env("CI_GATEWAY__API__LISTEN", api.to_string())
            .env("CI_GATEWAY__GITHUB__API_URL", &github.url)
            .env("CI_GATEWAY__REGISTRATION__TOKENS", TOKEN)
            .env("CI_GATEWAY__STORAGE__DATA_DIR", &data)
            .env("CI_GATEWAY__SSH__AUTH_REJECTION_TIME", "10ms")
            // As chatty as it gets: nothing secret may show even at debug.
            .env("RUST_LOG", "debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(std::fs::File::create(&err).expect("log"))
            .spawn()
            .expect("the gateway starts");
        for addr in [api, ssh] {
            assert!(
                listening(addr).await,
                "the gateway did not listen on {addr}"
            );
        }
        Process {
            child,
            ssh,
            api,
            data,
            log,
            err,
        }
    }

    /// Registers `job` on `runner` for `actor`, installs its
    /// authorized_keys there; returns the job token.
    async fn register(&self, job: &str, runner: &RunnerSshd, actor: &str) -> String {
        let (status, body) = http_raw(
            self.api,
            "PUT",
            &format!("/v1/jobs/{job}"),
            Some(TOKEN),
            Some(registration(runner, actor).to_string().into_bytes()),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        let body: Value = serde_json::from_str(&body).expect("json");
        let lines: Vec<String> = body["authorized_keys"]
            .as_array()
            .expect("lines")
            .iter()
            .map(|l| l.as_str().expect("line").to_string())
            .collect();
        runner.install(&lines);
        body["job_token"].as_str().expect("a job token").to_string()
    }

    /// Starts `echo started; <rest>` on `job` as the owner of `key`, and
    /// returns once `started` arrived: the session runs.
    async fn start_session(
        &self,
        key: &std::path::Path,
        job: &str,
        rest: &str,
    ) -> tokio::process::Child {
        let mut session = tokio::process::Command::new("ssh")
            .args(self.ssh_args(key, job, &format!("echo started; {rest}")))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("ssh");
        let mut first = [0u8; 8];
        let out = session.stdout.as_mut().expect("stdout");
        tokio::time::timeout(
            Duration::from_secs(30),
            tokio::io::AsyncReadExt::read_exact(out, &mut first),
        )
        .await
        .expect("the session starts")
        .expect("read");
        assert_eq!(&first, b"started\n");
        session
    }

    /// `ssh` arguments for `command` on `job` as the owner of `key`.
    fn ssh_args(&self, key: &std::path::Path, job: &str, command: &str) -> Vec<String> {
        let mut args = client_opts(key);
        args.extend([
            "-p".to_string(),
            self.ssh.port().to_string(),
            format!("{job}@127.0.0.1"),
            command.to_string(),
        ]);
        args
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn audit_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_start_survives_sigkill_and_no_secret_is_ever_written() {
    require_tools();
    let dir = tempdir();
    let octocat = keygen(dir.path(), "octocat", "ed25519");
    let mallory = keygen(dir.path(), "mallory", "ed25519");
    let github = FakeGithub::start().await;
    github.set("octocat", &[&octocat.public]);
    github.set("mallory", &[&mallory.public]);
    let runner = RunnerSshd::start(dir.path(), "127.0.0.61");
    let mut gateway = Process::start(
        dir.path(),
        &github,
        &[(
            "CI_GATEWAY__GITHUB__TOKEN",
            "ghp_the_operators_github_token",
        )],
    )
    .await;
    let (data, log_path) = (gateway.data.clone(), gateway.log.clone());
    let job = "9876543261";
    let job_token = gateway.register(job, &runner, "octocat").await;
    let ssh_args = |key: &std::path::Path, command: &str| gateway.ssh_args(key, job, command);
    // A stranger fails; octocat runs a command with an exit status.
    let denied = run("ssh", &ssh_args(&mallory.path, "true"), None).await;
    assert_ne!(denied.code, 0);
    let done = run(
        "ssh",
        &ssh_args(&octocat.path, "head -c 1000 /dev/zero; exit 3"),
        None,
    )
    .await;
    assert_eq!(done.code, 3, "{done:?}");
    // Then a long session, and the gateway dies mid-session.
    let _long = gateway.start_session(&octocat.path, job, "sleep 60").await;
    gateway.child.kill().expect("SIGKILL");
    let _ = gateway.child.wait();

    let events = audit_lines(&data.join("audit.jsonl"));
    let of = |name: &str| -> Vec<&Value> { events.iter().filter(|e| e["event"] == name).collect() };
    let reg = of("job_registered");
    assert_eq!(reg.len(), 1, "{events:#?}");
    assert_eq!(reg[0]["job"], job);
    assert_eq!(reg[0]["actor"], "octocat");
    let auths = of("auth");
    let failed: Vec<_> = auths.iter().filter(|a| a["result"] != "success").collect();
    assert!(
        !failed.is_empty(),
        "the stranger's attempt is recorded: {auths:#?}"
    );
    assert!(failed.iter().all(|a| a["source"]
        .as_str()
        .is_some_and(|s| s.starts_with("127.0.0.1:"))));
    let ok: Vec<_> = auths.iter().filter(|a| a["result"] == "success").collect();
    assert_eq!(ok.len(), 2, "{auths:#?}");
    let fingerprint = String::from_utf8(
        std::process::Command::new("ssh-keygen")
            .args(["-l", "-E", "sha256", "-f"])
            .arg(format!("{}.pub", octocat.path.display()))
            .output()
            .expect("ssh-keygen -l")
            .stdout,
    )
    .expect("utf8");
    let fingerprint = fingerprint.split_whitespace().nth(1).expect("fingerprint");
    assert!(
        ok.iter()
            .all(|a| a["login"] == "octocat" && a["key_fingerprint"] == fingerprint),
        "{ok:#?}"
    );
    let starts = of("session_start");
    assert_eq!(
        starts.len(),
        2,
        "both sessions, the killed one too: {events:#?}"
    );
    assert!(starts
        .iter()
        .all(|s| s["login"] == "octocat" && s["job"] == job && s["mode"] == "job"));
    let ends = of("session_end");
    assert_eq!(ends.len(), 1, "only the finished session ended: {ends:#?}");
    assert_eq!(ends[0]["exit_status"], 3);
    assert!(
        ends[0]["bytes_to_user"].as_u64().expect("bytes") >= 1000,
        "{ends:#?}"
    );

    // No secret anywhere: tokens, private keys, the certificates it issued.
    let mut written = std::fs::read_to_string(data.join("audit.jsonl")).expect("audit");
    written.push_str(&std::fs::read_to_string(&log_path).unwrap_or_default());
    written.push_str(&std::fs::read_to_string(&gateway.err).unwrap_or_default());
    assert!(written.contains("session_start"), "the logs were captured");
    for secret in [TOKEN, "ghp_the_operators_github_token", job_token.as_str()] {
        assert!(!written.contains(secret), "{secret} was written");
    }
    let hash = ci_gateway::secret::TokenHash::of(&job_token).to_hex();
    assert!(!written.contains(&hash), "the job token's hash was written");
    for key_file in ["ca_ed25519_key", "ssh_host_ed25519_key"] {
        let pem = std::fs::read_to_string(data.join(key_file)).expect("key file");
        for line in pem
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() > 20)
        {
            assert!(!written.contains(line), "{key_file} material was written");
        }
    }
    assert!(
        !written.contains("-cert-v01@openssh.com AAAA"),
        "a certificate was written"
    );
    assert!(!written.contains("PRIVATE KEY"));
}

/// A `direct-tcpip` host or a username holding a newline used to forge a
/// whole log line. Each record is now one line, its controls escaped; the
/// audit trail stays one JSON object a line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_forge_a_log_line() {
    require_tools();
    let dir = tempdir();
    let mallory = keygen(dir.path(), "mallory", "ed25519");
    let github = FakeGithub::start().await;
    github.set("mallory", &[&mallory.public]);
    let mut gateway = Process::start(dir.path(), &github, &[]).await;
    let (ssh_addr, err_path) = (gateway.ssh, gateway.err.clone());
    // A jump destination with a newline, from an authenticated login.
    let mut args = client_opts(&mallory.path);
    args.extend([
        "-p".to_string(),
        ssh_addr.port().to_string(),
        "-W".to_string(),
        "nope\nFORGED-HOST authenticated login=the-admin:22".to_string(),
        "mallory@127.0.0.1".to_string(),
    ]);
    let r = run("ssh", &args, None).await;
    assert_ne!(r.code, 0, "{r:?}");
    // A username with a newline.
    let mut args = client_opts(&mallory.path);
    args.extend([
        "-p".to_string(),
        ssh_addr.port().to_string(),
        "-l".to_string(),
        "9876543262\nFORGED-USER authenticated".to_string(),
        "127.0.0.1".to_string(),
        "true".to_string(),
    ]);
    let _ = run("ssh", &args, None).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = gateway.child.kill();
    let _ = gateway.child.wait();
    let log = std::fs::read_to_string(&err_path).expect("log");
    assert!(
        log.contains("FORGED-HOST"),
        "the jump destination was logged: {log}"
    );
    for line in log.lines() {
        assert!(
            !line.trim_start().starts_with("FORGED"),
            "a forged log line: {line:?}"
        );
    }
    assert!(log.contains("nope\\nFORGED-HOST"), "escaped in place");
    // The audit trail: still one JSON object per line.
    let events = audit_lines(&gateway.data.join("audit.jsonl"));
    assert!(!events.is_empty());
}

/// SIGTERM used to end the process at once: open sessions were cut with no
/// word, and their `session_end` never reached the audit trail. Now a
/// job-mode user is told on stderr, gets `ssh.shutdown_grace`, and then the
/// reason as the disconnect message; a connection that never logged in is
/// closed at once; the process exits 0 once everything has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_tells_users_gives_them_the_grace_and_exits_cleanly() {
    require_tools();
    let dir = tempdir();
    let octocat = keygen(dir.path(), "octocat", "ed25519");
    let github = FakeGithub::start().await;
    github.set("octocat", &[&octocat.public]);
    let runner = RunnerSshd::start(dir.path(), "127.0.0.160");
    let mut gateway = Process::start(
        dir.path(),
        &github,
        &[("CI_GATEWAY__SSH__SHUTDOWN_GRACE", "10s")],
    )
    .await;
    // A job nobody is on, whose runner long-polls it: nothing but the stop
    // can end that wait early. Registered first: the runner's
    // authorized_keys then holds the other job's lines.
    let idle_job = "9876543288";
    let idle_token = gateway.register(idle_job, &runner, "octocat").await;
    let job = "9876543287";
    gateway.register(job, &runner, "octocat").await;
    let api = gateway.api;
    let poll = tokio::spawn(async move {
        http_raw(
            api,
            "GET",
            &format!("/v1/jobs/{idle_job}?wait=25"),
            Some(&idle_token),
            None,
        )
        .await
    });
    // A session that would run for a minute.
    let mut session = gateway
        .start_session(&octocat.path, job, "sleep 60; echo never")
        .await;
    // And a connection that never logs in: it is not given the grace.
    let mut idle = tokio::net::TcpStream::connect(gateway.ssh)
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut idle, b"SSH-2.0-idle\r\n")
        .await
        .expect("version");

    // The poll is in (it waits for 25 s unless something changes).
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!poll.is_finished(), "the long poll waits");
    let pid = gateway.child.id().to_string();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(term.success());
    // The long poll is answered at the stop, not 25 s later.
    let (status, answer) = tokio::time::timeout(Duration::from_secs(30), poll)
        .await
        .expect("the poll ends")
        .expect("poll task");
    assert_eq!(status, 200, "the long poll got its answer: {answer}");
    // No new connection is taken while the grace runs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let late = run("ssh", &gateway.ssh_args(&octocat.path, job, "true"), None).await;
    assert_ne!(late.code, 0, "a new login during the grace: {late:?}");
    // The idle connection is closed without waiting for the grace; the
    // session is not (it is still running).
    let mut buf = vec![0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match tokio::io::AsyncReadExt::read(&mut idle, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the unauthenticated connection was closed");
    assert!(
        session.try_wait().expect("try_wait").is_none(),
        "the session still runs in its grace"
    );

    let ended = tokio::time::timeout(Duration::from_secs(30), session.wait_with_output())
        .await
        .expect("the session ends after the grace")
        .expect("ssh");
    let stderr = String::from_utf8_lossy(&ended.stderr);
    let stdout = String::from_utf8_lossy(&ended.stdout);
    assert!(
        stderr.contains("ci-gateway: the gateway is shutting down: this connection closes in 10s"),
        "the user was told: {stderr}"
    );
    assert!(
        stderr.contains("the gateway is shutting down (restart or upgrade); reconnect in a minute"),
        "the disconnect says why: {stderr}"
    );
    assert!(!stdout.contains("never"), "{stdout}");
    assert_ne!(ended.status.code(), Some(0));

    let mut exited = None;
    for _ in 0..300 {
        if let Some(status) = gateway.child.try_wait().expect("try_wait") {
            exited = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exited = exited.expect("the gateway exits after the grace");
    assert_eq!(exited.code(), Some(0), "a clean exit");
    // The session's end was recorded before the process went.
    let events = audit_lines(&gateway.data.join("audit.jsonl"));
    let ends: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "session_end" && e["login"] == "octocat")
        .collect();
    assert_eq!(ends.len(), 1, "{events:#?}");
    let log = std::fs::read_to_string(&gateway.log).unwrap_or_default()
        + &std::fs::read_to_string(&gateway.err).unwrap_or_default();
    assert!(
        !log.contains("tasks still running after the grace"),
        "every task ended in time: {log}"
    );
}

/// A raw `GET` to `addr`, with no credential; returns the status, the
/// header block and the body's bytes.
async fn get_bytes(addr: SocketAddr, path: &str) -> (u16, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), stream.read_to_end(&mut out))
        .await
        .expect("the answer ends")
        .expect("read");
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    let head = String::from_utf8_lossy(&out[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head, out[split + 4..].to_vec())
}

/// A hosted runner has no ci-gateway binary: the gateway serves its own,
/// byte for byte the file that runs, with its SHA-256, to anyone, within a
/// per-source budget; an unknown platform gets the list there is, and a
/// name that could point elsewhere is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_its_own_binary_as_the_agent() {
    require_tools();
    let dir = tempdir();
    let github = FakeGithub::start().await;
    let gateway = Process::start(
        dir.path(),
        &github,
        &[("CI_GATEWAY__AGENT__DOWNLOADS_PER_SOURCE_PER_MINUTE", "4")],
    )
    .await;
    let own = format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH);
    let (status, head, body) = get_bytes(gateway.api, &format!("/v1/agent/{own}")).await;
    assert_eq!(status, 200, "{head}");
    let file = std::fs::read(GATEWAY).expect("the gateway's binary");
    assert_eq!(body.len(), file.len(), "{head}");
    assert!(body == file, "the download is the gateway's own binary");
    let digest = String::from_utf8(
        std::process::Command::new("sha256sum")
            .arg(GATEWAY)
            .output()
            .expect("sha256sum")
            .stdout,
    )
    .expect("utf8");
    let digest = digest
        .split_whitespace()
        .next()
        .expect("digest")
        .to_string();
    assert!(
        head.to_lowercase()
            .contains(&format!("x-checksum-sha256: {digest}")),
        "{head}"
    );
    let (status, _, line) = get_bytes(gateway.api, &format!("/v1/agent/{own}.sha256")).await;
    assert_eq!(status, 200);
    assert_eq!(
        String::from_utf8_lossy(&line),
        format!("{digest}  ci-gateway-{own}\n")
    );
    let (status, _, text) = get_bytes(gateway.api, "/v1/agent/plan9-mips").await;
    let text = String::from_utf8_lossy(&text);
    assert_eq!(status, 404, "{text}");
    assert!(
        text.contains(&own),
        "the answer lists what there is: {text}"
    );
    let (status, _, text) = get_bytes(gateway.api, "/v1/agent/..%2F..%2Fetc%2Fpasswd").await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&text));
    // The fifth download from this address within the minute is refused.
    let (status, head, _) = get_bytes(gateway.api, &format!("/v1/agent/{own}.sha256")).await;
    assert_eq!(status, 429, "{head}");
    assert!(head.to_lowercase().contains("retry-after"), "{head}");
}

/// `serve` prints the host keys' fingerprints, the ones `ssh-keyscan`
/// sees; a second gateway on the same data directory says another one
/// uses it and exits non-zero, leaving the first serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_prints_the_fingerprints_users_check_and_refuses_a_shared_data_dir() {
    require_tools();
    let dir = tempdir();
    let github = FakeGithub::start().await;
    let gateway = Process::start(dir.path(), &github, &[]).await;
    let printed: std::collections::BTreeSet<String> = std::fs::read_to_string(&gateway.err)
        .expect("stderr")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("host key: "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    assert!(!printed.is_empty(), "serve printed no host key");
    let scan = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ssh-keyscan -p {} -t ed25519,ecdsa,rsa 127.0.0.1 2>/dev/null | ssh-keygen -lf -",
            gateway.ssh.port()
        ))
        .output()
        .expect("ssh-keyscan");
    let scanned: std::collections::BTreeSet<String> = String::from_utf8_lossy(&scan.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
        .collect();
    assert_eq!(printed, scanned, "printed vs ssh-keyscan");

    let second = std::process::Command::new(GATEWAY)
        .arg("serve")
        .env("CI_GATEWAY__SSH__LISTEN", free_addr().to_string())
        .env("CI_GATEWAY__API__LISTEN", free_addr().to_string())
        .env("CI_GATEWAY__GITHUB__API_URL", &github.url)
        .env("CI_GATEWAY__REGISTRATION__TOKENS", TOKEN)
        .env("CI_GATEWAY__STORAGE__DATA_DIR", &gateway.data)
        .stdin(Stdio::null())
        .output()
        .expect("a second gateway runs");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{err}");
    assert!(err.contains("another gateway is using"), "{err}");
    assert!(listening(gateway.ssh).await, "the first still serves");
}
