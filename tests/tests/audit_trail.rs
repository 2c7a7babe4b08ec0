//! The audit trail with the gateway as a real process: what it records for a
//! registration, logins and sessions; that a session's start is on disk
//! before the session runs (SIGKILL mid-session loses nothing); and that no
//! secret reaches the audit trail or the logs.

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
    let data = dir.path().join("data");
    let (ssh_addr, api_addr) = (free_addr(), free_addr());
    let log_path = dir.path().join("gateway.log");
    let mut gateway = std::process::Command::new(GATEWAY)
        .arg("serve")
        .env("CI_GATEWAY__SSH__LISTEN", ssh_addr.to_string())
        .env("CI_GATEWAY__API__LISTEN", api_addr.to_string())
        .env("CI_GATEWAY__GITHUB__API_URL", &github.url)
        .env(
            "CI_GATEWAY__GITHUB__TOKEN",
            "ghp_the_operators_github_token",
        )
        .env("CI_GATEWAY__REGISTRATION__TOKENS", TOKEN)
        .env("CI_GATEWAY__STORAGE__DATA_DIR", &data)
        .env("CI_GATEWAY__SSH__AUTH_REJECTION_TIME", "10ms")
        // As chatty as it gets: nothing secret may show even at debug.
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log_path).expect("log"))
        .stderr(std::fs::File::create(dir.path().join("gateway.err")).expect("log"))
        .spawn()
        .expect("the gateway starts");
    let mut up = false;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(api_addr).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "the gateway did not listen");

    let job = "9876543261";
    let (status, body) = http_raw(
        api_addr,
        "PUT",
        &format!("/v1/jobs/{job}"),
        Some(TOKEN),
        Some(registration(&runner, "octocat").to_string().into_bytes()),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let body: Value = serde_json::from_str(&body).expect("json");
    let job_token = body["job_token"].as_str().expect("a job token").to_string();
    let lines: Vec<String> = body["authorized_keys"]
        .as_array()
        .expect("lines")
        .iter()
        .map(|l| l.as_str().expect("line").to_string())
        .collect();
    runner.install(&lines);

    let ssh_args = |key: &std::path::Path, command: &str| {
        let mut args = client_opts(key);
        args.extend([
            "-p".to_string(),
            ssh_addr.port().to_string(),
            format!("{job}@127.0.0.1"),
            command.to_string(),
        ]);
        args
    };
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
    let mut long = tokio::process::Command::new("ssh")
        .args(ssh_args(&octocat.path, "echo started; sleep 60"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("ssh");
    let mut out = long.stdout.take().expect("stdout");
    let mut first = [0u8; 8];
    tokio::time::timeout(
        Duration::from_secs(30),
        tokio::io::AsyncReadExt::read_exact(&mut out, &mut first),
    )
    .await
    .expect("the session starts")
    .expect("read");
    assert_eq!(&first, b"started\n");
    gateway.kill().expect("SIGKILL");
    let _ = gateway.wait();

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
    written.push_str(&std::fs::read_to_string(dir.path().join("gateway.err")).unwrap_or_default());
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
    let data = dir.path().join("data");
    let (ssh_addr, api_addr) = (free_addr(), free_addr());
    let err_path = dir.path().join("gateway.err");
    let mut gateway = std::process::Command::new(GATEWAY)
        .arg("serve")
        .env("CI_GATEWAY__SSH__LISTEN", ssh_addr.to_string())
        .env("CI_GATEWAY__API__LISTEN", api_addr.to_string())
        .env("CI_GATEWAY__GITHUB__API_URL", &github.url)
        .env("CI_GATEWAY__REGISTRATION__TOKENS", TOKEN)
        .env("CI_GATEWAY__STORAGE__DATA_DIR", &data)
        .env("CI_GATEWAY__SSH__AUTH_REJECTION_TIME", "10ms")
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).expect("log"))
        .spawn()
        .expect("the gateway starts");
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(ssh_addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
    let _ = gateway.kill();
    let _ = gateway.wait();
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
    let events = audit_lines(&data.join("audit.jsonl"));
    assert!(!events.is_empty());
}
