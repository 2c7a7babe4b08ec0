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
    let body = w.register_job().await;
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

/// `client_opts` at `LogLevel=INFO`, the client's default, where OpenSSH
/// shows authentication banners (ERROR hides them).
fn talkative(key: &std::path::Path) -> Vec<String> {
    client_opts(key)
        .into_iter()
        .map(|o| {
            if o == "LogLevel=ERROR" {
                "LogLevel=INFO".into()
            } else {
                o
            }
        })
        .collect()
}

/// Where `needle` is in `haystack` (a failure says what was missing).
fn at(haystack: &str, needle: &str) -> usize {
    haystack
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} is not in:\n{haystack}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_say_why_before_permission_denied() {
    let w = World::new("127.0.0.183", "9876543630").await;
    let port = w.gateway.ssh.port().to_string();
    let login = |keys: &[&std::path::Path], user: &str| {
        let mut args = talkative(keys[0]);
        for more in &keys[1..] {
            args.extend(["-i".into(), more.display().to_string()]);
        }
        args.extend([
            "-p".into(),
            port.clone(),
            format!("{user}@127.0.0.1"),
            "true".into(),
        ]);
        args
    };

    // Job mode, a key of nobody allowed: the banner says so and where keys
    // come from, before OpenSSH's own refusal, and names nobody allowed.
    let r = run("ssh", &login(&[&w.mallory.path], &w.job), None).await;
    assert_eq!(r.code, 255, "{r:?}");
    let fp = fingerprint(&w.mallory.public);
    let banner = at(
        &r.stderr,
        &format!(
            "ci-gateway: key {fp} (ssh-ed25519) belongs to nobody allowed on job {}.",
            w.job
        ),
    );
    assert!(at(&r.stderr, "https://github.com/settings/keys") > banner);
    assert!(at(&r.stderr, "Permission denied") > banner, "{r:?}");
    for name in ["octocat", "the-admin"] {
        assert!(!r.stderr.contains(name), "names {name}: {r:?}");
    }
    // Each refused key is named once, the reason given once.
    let r = run(
        "ssh",
        &login(&[&w.mallory.path, &w.hubot.path], &w.job),
        None,
    )
    .await;
    assert_eq!(r.code, 255, "{r:?}");
    let hubot = fingerprint(&w.hubot.public);
    assert!(
        at(
            &r.stderr,
            &format!(
                "key {hubot} (ecdsa-sha2-nistp256) belongs to nobody allowed on job {} either",
                w.job
            )
        ) > at(&r.stderr, &fp),
        "{r:?}"
    );
    assert_eq!(r.stderr.matches("settings/keys").count(), 1, "{r:?}");
    // The right key after a wrong one gets in; the wrong one was named.
    let r = run(
        "ssh",
        &login(&[&w.mallory.path, &w.octocat.path], &w.job),
        None,
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");

    // Jump mode: the key is not on that account; no such account (a
    // misspelt job id is read as a login); a bad user name.
    let r = run("ssh", &login(&[&w.octocat.path], "mallory"), None).await;
    assert_eq!(r.code, 255, "{r:?}");
    let fp = fingerprint(&w.octocat.public);
    assert!(
        at(&r.stderr, &format!("key {fp} (ssh-ed25519) is not one of the SSH keys on GitHub account mallory (https://github.com/mallory.keys)"))
            < at(&r.stderr, "Permission denied"),
        "{r:?}"
    );
    let r = run("ssh", &login(&[&w.octocat.path], "98765436l0"), None).await;
    assert_eq!(r.code, 255, "{r:?}");
    assert!(
        at(&r.stderr, "GitHub has no account 98765436l0: a job id (digits, or job-<digits>) or your GitHub login was expected")
            < at(&r.stderr, "Permission denied"),
        "{r:?}"
    );
    let r = run("ssh", &login(&[&w.octocat.path], "job-98765436x0"), None).await;
    assert_eq!(r.code, 255, "{r:?}");
    at(
        &r.stderr,
        "bad username \"job-98765436x0\": a job id (digits, or job-<digits>) or a GitHub login was expected",
    );

    // ProxyJump to a small bare id: OpenSSH asks for 0.0.4.210, and the
    // refusal names the spelling that works.
    let config = w.dir.path().join("jump_config");
    std::fs::write(
        &config,
        format!(
            "Host *\n  IdentityFile {}\n  IdentitiesOnly yes\n  IdentityAgent none\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  BatchMode yes\n  ConnectTimeout 20\n",
            w.octocat.path.display()
        ),
    )
    .expect("config");
    let jump = |dest: &str| {
        vec![
            "-F".to_string(),
            config.display().to_string(),
            "-J".into(),
            format!("octocat@127.0.0.1:{port}"),
            format!("runner@{dest}"),
            "true".into(),
        ]
    };
    let r = run("ssh", &jump("1234"), None).await;
    assert_eq!(r.code, 255, "{r:?}");
    at(
        &r.stderr,
        "0.0.4.210:22 is not a job: the gateway only connects to job ids (ssh -J octocat@gateway runneruser@job-<id>); OpenSSH reads the bare number 1234 as the address 0.0.4.210: write job-1234",
    );
}

/// `SHA256:...` of a public key line, as ssh-keygen prints it.
fn fingerprint(public: &str) -> String {
    let key = russh::keys::PublicKey::from_openssh(public).expect("key");
    key.fingerprint(russh::keys::HashAlg::Sha256).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_roles_and_teams_admit_job_mode_and_are_checked_again() {
    let w = World::with_config(
        "127.0.0.184",
        "9876543631",
        &[
            ("CI_GATEWAY__ACCESS__REPOSITORY_PERMISSION", "write"),
            ("CI_GATEWAY__ACCESS__TEAMS", "acme/oncall"),
            (
                "CI_GATEWAY__GITHUB__TOKEN",
                "ghp_roles_test_token_0123456789",
            ),
            ("CI_GATEWAY__GITHUB__KEY_CACHE_TTL", "1s"),
        ],
    )
    .await;
    let set_collaborators = |people: &[(&str, &str)]| {
        w.github.collaborators.lock().expect("lock").insert(
            "acme/widgets".into(),
            people
                .iter()
                .map(|(l, p)| (l.to_string(), p.to_string()))
                .collect(),
        );
    };
    // mallory may write to acme/widgets; hubot may only read it.
    set_collaborators(&[("mallory", "push"), ("hubot", "pull")]);
    w.github
        .teams
        .lock()
        .expect("lock")
        .insert("acme/oncall".into(), vec![]);
    let enter = |key: &std::path::Path| {
        let (gw, key, job) = (&w.gateway, key.to_path_buf(), w.job.clone());
        async move { ssh(gw, &key, &job, &["echo", "in"], None).await }
    };
    // The actor's own key matches first: GitHub's roles are not asked.
    let r = enter(&w.octocat.path).await;
    assert_eq!((r.code, r.stdout.as_str()), (0, "in\n"), "{r:?}");
    assert!(w.github.role_auth.lock().expect("lock").is_empty());
    let r = enter(&w.mallory.path).await;
    assert_eq!((r.code, r.stdout.as_str()), (0, "in\n"), "{r:?}");
    let r = enter(&w.hubot.path).await;
    assert_eq!(r.code, 255, "read is not write: {r:?}");
    // Write on acme/widgets opens no job of another repository.
    let mut other = registration(&w.runner, "hubot");
    other["repository"] = serde_json::json!("acme/other");
    let (status, body) = w.gateway.register("9876543634", other).await;
    assert_eq!(status, 201, "{body}");
    w.runner.install_from(&body);
    let r = ssh(&w.gateway, &w.mallory.path, "9876543634", &["true"], None).await;
    assert_eq!(r.code, 255, "another repository: {r:?}");
    let seen = w.github.role_auth.lock().expect("lock").clone();
    assert!(
        !seen.is_empty()
            && seen
                .iter()
                .all(|a| a.contains("ghp_roles_test_token_0123456789")),
        "role lookups carry the gateway's token: {seen:?}"
    );

    // A team member gets in once the (1 s) cache has expired.
    w.github
        .teams
        .lock()
        .expect("lock")
        .insert("acme/oncall".into(), vec!["hubot".into()]);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let r = enter(&w.hubot.path).await;
    assert_eq!((r.code, r.stdout.as_str()), (0, "in\n"), "{r:?}");

    // Jump mode cannot check a role end to end: one line says which mode
    // works; the listing shows the job with job mode only.
    let r = ssh_jump(
        &w.gateway,
        &w.mallory.path,
        "mallory",
        &current_user(),
        &format!("job-{}", w.job),
        22,
        &["true"],
    )
    .await;
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains(&format!(
            "mallory may enter job {0} through a GitHub role, which jump mode cannot check end to end: use ssh {0}@",
            w.job
        )),
        "{r:?}"
    );
    let r = ssh(
        &w.gateway,
        &w.mallory.path,
        "mallory",
        &["jobs", "--json"],
        None,
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(listed_ids(&r), [w.job.as_str()], "{r:?}");
    let doc: Value = serde_json::from_str(r.stdout.trim()).expect("json");
    assert_eq!(doc["jobs"][0]["job_id"], w.job.as_str(), "{doc}");
    assert!(doc["jobs"][0].get("jump_command").is_none(), "{doc}");
    assert!(doc["jobs"][0]["ssh_command"].is_string(), "{doc}");

    // GitHub down: what was read is served stale; nothing new is admitted.
    w.github
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let r = enter(&w.mallory.path).await;
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, "in\n"),
        "stale while down: {r:?}"
    );

    // Back up, mallory's write access gone: refused at the next login.
    w.github
        .down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    set_collaborators(&[("hubot", "pull")]);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let r = enter(&w.mallory.path).await;
    assert_eq!(r.code, 255, "revoked: {r:?}");
}
