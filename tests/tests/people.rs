//! The people's side (issue 15): `ssh <login>@gateway` lists the jobs that
//! login may enter, a pty shell shows a banner that exec, scp and sftp never
//! see, and the registration hands out `known_hosts` lines that let a first
//! connection be checked instead of trusted.

mod common;

use common::*;
use serde_json::Value;

/// The job ids a `jobs --json` listing shows.
fn listed_ids(r: &Run) -> Vec<String> {
    let doc: Value = serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("jobs --json is JSON: {e}: {r:?}"));
    doc["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|j| j["job_id"].as_str().expect("job_id").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_lists_exactly_the_jobs_it_may_enter() {
    let w = World::new("127.0.0.180", "9876543601").await;
    // mallory's own job, and hubot's job that lists octocat.
    let (status, body) = w
        .gateway
        .register("9876543602", registration(&w.runner, "mallory"))
        .await;
    assert_eq!(status, 201, "{body}");
    w.runner.install_from(&body);
    let mut shared = registration(&w.runner, "hubot");
    shared["allowed_users"] = serde_json::json!(["octocat"]);
    let (status, body) = w.gateway.register("9876543603", shared).await;
    assert_eq!(status, 201, "{body}");
    w.runner.install_from(&body);

    let list = |key: &std::path::Path, login: &str, args: &[&str]| {
        let (gw, key, login) = (&w.gateway, key.to_path_buf(), login.to_string());
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ssh(gw, &key, &login, &args, None).await
        }
    };
    let r = list(&w.octocat.path, "octocat", &["jobs", "--json"]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(listed_ids(&r), ["9876543601", "9876543603"], "{r:?}");
    let doc: Value = serde_json::from_str(r.stdout.trim()).expect("json");
    let first = &doc["jobs"][0];
    assert_eq!(first["actor"], "octocat");
    assert_eq!(first["repository"], "acme/widgets");
    assert_eq!(
        first["url"],
        "https://github.com/acme/widgets/actions/runs/42/job/9876543601"
    );
    assert_eq!(first["hold"]["state"], "running");
    let port = w.gateway.ssh.port();
    assert_eq!(
        first["ssh_command"],
        format!("ssh -p {port} 9876543601@127.0.0.1")
    );
    assert_eq!(
        first["jump_command"],
        format!(
            "ssh -J octocat@127.0.0.1:{port} {}@job-9876543601",
            w.runner.user
        )
    );
    // Where the runner is stays the gateway's business.
    assert!(first.get("host").is_none(), "{first}");
    assert!(!r.stdout.contains(&w.runner.addr.ip().to_string()), "{r:?}");

    let r = list(&w.mallory.path, "mallory", &["jobs", "--json"]).await;
    assert_eq!(listed_ids(&r), ["9876543602"], "{r:?}");
    // An admin may enter every job.
    let r = list(&w.admin.path, "the-admin", &["jobs", "--json"]).await;
    assert_eq!(
        listed_ids(&r),
        ["9876543601", "9876543602", "9876543603"],
        "{r:?}"
    );
    // Someone with keys on GitHub but allowed nowhere gets an empty list.
    w.github.set("stranger", &[&w.hubot.public]);
    let r = list(&w.hubot.path, "stranger", &["jobs", "--json"]).await;
    assert_eq!((r.code, listed_ids(&r).len()), (0, 0), "{r:?}");
    let r = list(&w.hubot.path, "stranger", &["jobs"]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("no job that stranger may enter"), "{r:?}");

    // The text form, with who is connected: octocat holds a session open.
    let mut args = client_opts(&w.octocat.path);
    args.extend([
        "-p".into(),
        port.to_string(),
        "9876543601@127.0.0.1".into(),
        "echo in; sleep 30".into(),
    ]);
    let mut session = tokio::process::Command::new("ssh")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("ssh");
    let mut out = tokio::io::BufReader::new(session.stdout.take().expect("stdout"));
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line)
        .await
        .expect("read");
    assert_eq!(line, "in\n");
    let r = list(&w.octocat.path, "octocat", &["jobs"]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("2 job(s) octocat may enter"), "{r:?}");
    assert!(
        r.stdout
            .contains("job 9876543601  acme/widgets run 42  actor octocat  running"),
        "{r:?}"
    );
    assert!(r.stdout.contains("connected: octocat (job)"), "{r:?}");
    assert!(
        r.stdout
            .contains(&format!("shell: ssh -p {port} 9876543603@127.0.0.1")),
        "{r:?}"
    );
    assert!(!r.stdout.contains("9876543602"), "{r:?}");
    let _ = session.kill().await;

    // A shell (what a bare `ssh octocat@gateway` asks for) lists the same.
    let r = list(&w.octocat.path, "octocat", &["-tt"]).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("job 9876543601"), "{r:?}");
    assert!(
        r.stdout.contains("\r\n"),
        "a pty's lines end in CR LF: {r:?}"
    );
    // Anything else is refused with what does work, exit 2.
    let r = list(&w.octocat.path, "octocat", &["cat", "/etc/passwd"]).await;
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stdout.is_empty(), "{r:?}");
    assert!(r.stderr.contains("lists your jobs"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pty_shell_gets_the_banner_and_exec_scp_sftp_never_do() {
    let w = World::new("127.0.0.181", "9876543611").await;
    let job = w.job.as_str();
    // A shell with a pty: the banner on stderr, before the shell.
    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        job,
        &["-tt"],
        Some(b"echo shell-ran; exit 3\n".to_vec()),
    )
    .await;
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stdout.contains("shell-ran"), "{r:?}");
    let banner = if r.stderr.contains("ci-gateway: job") {
        &r.stderr
    } else {
        // Some ssh builds put a pty session's stderr on the terminal.
        &r.stdout
    };
    assert!(
        banner.contains("ci-gateway: job 9876543611 of acme/widgets"),
        "{r:?}"
    );
    assert!(
        banner.contains("https://github.com/acme/widgets/actions/runs/42/job/9876543611"),
        "{r:?}"
    );
    assert!(banner.contains("running; after its steps"), "{r:?}");

    // exec, with and without a pty: the runner's bytes alone.
    let r = ssh(&w.gateway, &w.octocat.path, job, &["printf 'a\\nb'"], None).await;
    assert_eq!(
        (r.code, r.raw_stdout.as_slice()),
        (0, &b"a\nb"[..]),
        "{r:?}"
    );
    assert!(!r.stderr.contains("ci-gateway"), "{r:?}");
    let r = ssh(&w.gateway, &w.octocat.path, job, &["-tt", "echo x"], None).await;
    assert_eq!(r.code, 0, "{r:?}");
    assert!(
        !r.stdout.contains("ci-gateway") && !r.stderr.contains("ci-gateway"),
        "{r:?}"
    );

    // scp (legacy protocol: an exec stream) and sftp, byte for byte.
    let dir = w.dir.path();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let remote = dir.join("remote");
    std::fs::create_dir_all(&remote).expect("mkdir");
    set_mode(&remote, 0o777);
    std::fs::write(remote.join("f.bin"), &data).expect("write");
    set_mode(&remote.join("f.bin"), 0o644);
    let port = w.gateway.ssh.port().to_string();
    let back = dir.join("back.bin");
    let mut args = client_opts(&w.octocat.path);
    args.extend([
        "-O".into(),
        "-P".into(),
        port.clone(),
        format!("{job}@127.0.0.1:{}", remote.join("f.bin").display()),
        back.display().to_string(),
    ]);
    let r = run("scp", &args, None).await;
    assert_eq!(r.code, 0, "scp -O: {r:?}");
    assert_eq!(std::fs::read(&back).expect("back"), data);
    let got = dir.join("sftp.bin");
    let batch = dir.join("batch");
    std::fs::write(
        &batch,
        format!("get {} {}\n", remote.join("f.bin").display(), got.display()),
    )
    .expect("batch");
    let mut args = client_opts(&w.octocat.path);
    args.extend([
        "-P".into(),
        port,
        "-b".into(),
        batch.display().to_string(),
        format!("{job}@127.0.0.1"),
    ]);
    let r = run("sftp", &args, None).await;
    assert_eq!(r.code, 0, "sftp: {r:?}");
    assert!(!r.stderr.contains("ci-gateway"), "{r:?}");
    assert_eq!(std::fs::read(&got).expect("sftp.bin"), data);
}

/// [`client_opts`] with host keys checked against `known_hosts` only.
fn checked_opts(key: &std::path::Path, known_hosts: &std::path::Path) -> Vec<String> {
    client_opts(key)
        .into_iter()
        .map(|o| match o.as_str() {
            "StrictHostKeyChecking=no" => "StrictHostKeyChecking=yes".to_string(),
            "UserKnownHostsFile=/dev/null" => {
                format!("UserKnownHostsFile={}", known_hosts.display())
            }
            _ => o,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_printed_known_hosts_lines_check_both_modes_first_connections() {
    let w = World::unregistered("127.0.0.182", "9876543621", &[]).await;
    let (status, body) = w
        .gateway
        .register(&w.job, registration(&w.runner, "octocat"))
        .await;
    assert_eq!(status, 201, "{body}");
    w.runner.install_from(&body);
    let lines: Vec<String> = body["known_hosts"]
        .as_array()
        .expect("known_hosts in the answer")
        .iter()
        .map(|l| l.as_str().expect("line").to_string())
        .collect();
    let port = w.gateway.ssh.port();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("[127.0.0.1]:{port} ssh-ed25519 "))),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("job-{} ", w.job))),
        "{lines:?}"
    );
    let good = w.dir.path().join("known_hosts");
    std::fs::write(&good, lines.join("\n") + "\n").expect("write");

    let job_mode = |kh: &std::path::Path| {
        let mut args = checked_opts(&w.octocat.path, kh);
        args.extend([
            "-p".into(),
            port.to_string(),
            format!("{}@127.0.0.1", w.job),
            "echo checked".into(),
        ]);
        args
    };
    let jump_mode = |kh: &std::path::Path| {
        let inner = checked_opts(&w.octocat.path, kh).join(" ");
        let mut args = checked_opts(&w.octocat.path, kh);
        args.extend([
            "-o".into(),
            format!("ProxyCommand=ssh {inner} -p {port} -W %h:%p octocat@127.0.0.1"),
            format!("{}@job-{}", w.runner.user, w.job),
            "echo checked".into(),
        ]);
        args
    };
    let r = run("ssh", &job_mode(&good), None).await;
    assert_eq!((r.code, r.stdout.as_str()), (0, "checked\n"), "{r:?}");
    let r = run("ssh", &jump_mode(&good), None).await;
    assert_eq!((r.code, r.stdout.as_str()), (0, "checked\n"), "{r:?}");

    // The check is real: the gateway's key swapped fails job mode, the
    // runner's swapped (the gateway's still right) fails jump mode.
    let other = keygen(w.dir.path(), "other", "ed25519");
    let swapped = |which: &str| {
        let path = w.dir.path().join(format!("known_hosts_{which}"));
        let text: String = lines
            .iter()
            .map(|l| {
                let name = l.split_whitespace().next().expect("name");
                let runner = name.starts_with("job-");
                if runner == (which == "runner") {
                    format!("{name} {}\n", other.public)
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(&path, text).expect("write");
        path
    };
    for args in [job_mode(&swapped("gateway")), jump_mode(&swapped("runner"))] {
        let r = run("ssh", &args, None).await;
        assert_eq!(r.code, 255, "{r:?}");
        assert!(r.stderr.contains("Host key verification failed"), "{r:?}");
    }
}
