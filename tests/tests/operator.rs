//! The operator's side (issue 16), part 1: Prometheus metrics scraped from
//! `/metrics` while real ssh clients use each mode.

mod common;

use common::*;

const JOB_TO_USER: &str = "ci_gateway_bytes_total{mode=\"job\",direction=\"to_user\"}";

/// The series (name and labels) in a scrape, without values or comments.
fn series(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(s, _)| s.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_live_sessions_in_both_modes_and_stay_bounded() {
    let w = World::with_config(
        "127.0.0.186",
        "9876543633",
        &[
            ("CI_GATEWAY__API__REQUESTS_PER_MINUTE_PER_TOKEN", "100000"),
            ("CI_GATEWAY__API__REQUESTS_PER_MINUTE_PER_SOURCE", "100000"),
        ],
    )
    .await;
    let text = metrics(&w.gateway).await;
    assert_eq!(
        metric(&text, "ci_gateway_jobs{state=\"running\"}"),
        1,
        "{text}"
    );
    assert_eq!(
        metric(&text, "ci_gateway_sessions{mode=\"job\"}"),
        0,
        "{text}"
    );
    let ok_before = metric(
        &text,
        "ci_gateway_authentications_total{result=\"success\"}",
    );

    // A live job-mode session: counted while it is open.
    let mut args = client_opts(&w.octocat.path);
    args.extend([
        "-p".into(),
        w.gateway.ssh.port().to_string(),
        format!("{}@127.0.0.1", w.job),
        "head -c 5000 /dev/zero; sleep 30".into(),
    ]);
    let mut live = tokio::process::Command::new("ssh")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("ssh");
    let gw = &w.gateway;
    let mut text = String::new();
    for _ in 0..200 {
        text = metrics(gw).await;
        // Counted from authentication; the runner's login comes after.
        if metric(&text, "ci_gateway_sessions{mode=\"job\"}") == 1
            && metric(&text, "ci_gateway_upstream_connect_seconds_count") >= 1
            && metric(&text, JOB_TO_USER) >= 5000
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric(&text, "ci_gateway_sessions{mode=\"job\"}"),
        1,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "ci_gateway_authentications_total{result=\"success\"}"
        ),
        ok_before + 1,
        "{text}"
    );
    assert!(
        metric(&text, "ci_gateway_upstream_connect_seconds_count") >= 1,
        "{text}"
    );
    // Counted as they move: the session is still open.
    assert!(metric(&text, JOB_TO_USER) >= 5000, "{text}");
    let _ = live.kill().await;

    // A jump-mode session, and a refused key.
    let r = ssh_jump(
        gw,
        &w.octocat.path,
        "octocat",
        &w.runner.user,
        &format!("job-{}", w.job),
        22,
        &["head -c 7000 /dev/zero"],
    )
    .await;
    assert_eq!(r.code, 0, "{r:?}");
    let r = ssh(gw, &w.mallory.path, &w.job, &["true"], None).await;
    assert_eq!(r.code, 255, "{r:?}");
    let mut text = String::new();
    for _ in 0..200 {
        text = metrics(gw).await;
        if metric(&text, "ci_gateway_sessions{mode=\"job\"}") == 0
            && metric(
                &text,
                "ci_gateway_bytes_total{mode=\"job\",direction=\"to_user\"}",
            ) >= 5000
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The jump leg carries the whole SSH stream, encrypted: more than 7000.
    assert!(
        metric(
            &text,
            "ci_gateway_bytes_total{mode=\"jump\",direction=\"to_user\"}"
        ) > 7000,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "ci_gateway_bytes_total{mode=\"jump\",direction=\"to_runner\"}"
        ) > 0,
        "{text}"
    );
    assert!(
        metric(
            &text,
            "ci_gateway_authentications_total{result=\"key_not_accepted\"}"
        ) >= 1,
        "{text}"
    );

    // A thousand more jobs: the same series, other values.
    let before = series(&text);
    let body = registration(&w.runner, "octocat");
    for chunk in 0..20u64 {
        let calls = (0..50u64).map(|i| {
            let job = format!("{}", 9_876_600_000 + chunk * 50 + i);
            let (gw, body) = (gw, body.clone());
            async move {
                let (status, answer) = gw.register(&job, body).await;
                assert_eq!(status, 201, "{answer}");
            }
        });
        futures::future::join_all(calls).await;
    }
    let text = metrics(gw).await;
    assert_eq!(
        metric(&text, "ci_gateway_jobs{state=\"running\"}"),
        1001,
        "{text}"
    );
    assert_eq!(series(&text), before, "new series appeared:\n{text}");
    assert!(!text.contains("9876600"), "a job id is in a label:\n{text}");
    assert!(!text.contains("octocat"), "a login is in a label:\n{text}");
}

const ADMIN: &str = "ops-alice:0123456789abcdef0123456789abcdef";

/// `ci-gateway admin …` as a process, with the admin token in its
/// environment (or `token` instead).
async fn admin(w: &World, token: &str, args: &[&str]) -> Run {
    let mut cmd = agent_command();
    cmd.arg("admin")
        .arg("--gateway")
        .arg(format!("http://{}", w.gateway.api))
        .args(args)
        .env("CI_GATEWAY_ADMIN_TOKEN", token);
    finish(cmd).await
}

/// A job-mode session that stays open, its stderr kept for the reason.
fn open_session(w: &World) -> tokio::process::Child {
    let mut args = client_opts(&w.octocat.path);
    args.extend([
        "-p".into(),
        w.gateway.ssh.port().to_string(),
        format!("{}@127.0.0.1", w.job),
        "echo ready; sleep 60".into(),
    ]);
    tokio::process::Command::new("ssh")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("ssh")
}

async fn sessions(w: &World) -> Vec<serde_json::Value> {
    let r = admin(w, ADMIN, &["sessions", "--json"]).await;
    assert_eq!(r.code, 0, "{r:?}");
    serde_json::from_str(&r.stdout).expect("json")
}

async fn ended(child: tokio::process::Child) -> Run {
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("the session ends")
        .expect("ssh ran");
    Run::from(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_cli_lists_kicks_and_ends_with_its_own_token_only() {
    let w = World::with_config(
        "127.0.0.187",
        "9876543635",
        &[("CI_GATEWAY__API__ADMIN_TOKENS", ADMIN)],
    )
    .await;
    let live = w.live();

    // A session, listed with the id the audit trail gives it.
    let first = open_session(&w);
    eventually("the session is open", || live.active_sessions() == 1).await;
    let listed = sessions(&w).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let id = listed[0]["id"].as_str().expect("id").to_string();
    assert_eq!(listed[0]["login"], "octocat");
    assert_eq!(listed[0]["mode"], "job");
    assert_eq!(listed[0]["jobs"], serde_json::json!([w.job]));
    assert_eq!(listed[0]["here"], true);
    let table = admin(&w, ADMIN, &["sessions", "--job", &w.job]).await;
    assert_eq!(table.code, 0, "{table:?}");
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert!(lines[0].starts_with("SESSION "), "{}", table.stdout);
    assert!(
        lines[1].starts_with(&id) && lines[1].contains("octocat"),
        "{}",
        table.stdout
    );
    let jobs = admin(&w, ADMIN, &["jobs"]).await;
    assert_eq!(jobs.code, 0, "{jobs:?}");
    assert!(
        jobs.stdout
            .lines()
            .any(|l| l.starts_with(&w.job) && l.contains("running")),
        "{}",
        jobs.stdout
    );

    // Kicked: the user sees the operator's reason.
    let kick = admin(&w, ADMIN, &["kick", &id, "--reason", "maintenance window"]).await;
    assert_eq!(kick.code, 0, "{kick:?}");
    assert!(kick.stdout.contains("closed"), "{kick:?}");
    let r = ended(first).await;
    assert_eq!(r.code, 255, "{r:?}");
    assert!(
        r.stderr
            .contains("an operator ended this session: maintenance window"),
        "{r:?}"
    );
    eventually("the session is gone", || live.active_sessions() == 0).await;
    let again = admin(&w, ADMIN, &["kick", &id]).await;
    assert_ne!(again.code, 0, "{again:?}");
    assert!(again.stderr.contains("no open session"), "{again:?}");

    // Other tokens open nothing here, and the admin token nothing else.
    let r = admin(&w, TOKEN, &["jobs"]).await;
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stderr
            .contains("a registration token is not an admin token"),
        "{r:?}"
    );
    let job_token = w.gateway.token_for(&w.job);
    let r = admin(&w, &job_token, &["sessions"]).await;
    assert_ne!(r.code, 0, "{r:?}");
    let (status, _) = w
        .gateway
        .http("GET", &format!("/v1/jobs/{}", w.job), Some(ADMIN), None)
        .await;
    assert_eq!(status, 401, "an admin token opened a runner route");
    let (status, _) = w
        .gateway
        .http("PUT", "/v1/jobs/9876543636", Some(ADMIN), Some("{}"))
        .await;
    assert_eq!(status, 401, "an admin token registered a job");

    // Ending a job needs a reason, closes its sessions with it, and the
    // runner's API sees the job gone.
    let (status, body) = w
        .gateway
        .http(
            "POST",
            &format!("/v1/admin/jobs/{}/end", w.job),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("reason: required"), "{body}");
    let second = open_session(&w);
    eventually("the second session is open", || live.active_sessions() == 1).await;
    let end = admin(
        &w,
        ADMIN,
        &["end", &w.job, "--reason", "runner compromised"],
    )
    .await;
    assert_eq!(end.code, 0, "{end:?}");
    assert!(end.stdout.contains("1 session(s) closed"), "{end:?}");
    let r = ended(second).await;
    assert_eq!(r.code, 255, "{r:?}");
    assert!(
        r.stderr
            .contains("was ended by an operator: runner compromised"),
        "{r:?}"
    );
    let (status, _) = w.gateway.job(&w.job).await;
    assert_eq!(status, 410);
    let jobs = admin(&w, ADMIN, &["jobs", "--json"]).await;
    assert_eq!(jobs.stdout.trim(), "[]", "{jobs:?}");

    // Every action is audited with the token's name, never its secret.
    let audit = std::fs::read_to_string(w.dir.path().join("data/audit.jsonl")).expect("audit");
    assert!(
        !audit.contains("0123456789abcdef"),
        "a secret is in the audit"
    );
    let events: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    let admin_events: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["event"] == "admin").collect();
    assert_eq!(admin_events.len(), 2, "{admin_events:?}");
    assert_eq!(admin_events[0]["action"], "kick");
    assert_eq!(admin_events[0]["token"], "ops-alice");
    assert_eq!(admin_events[0]["session"], id.as_str());
    assert_eq!(admin_events[1]["action"], "end");
    assert_eq!(admin_events[1]["reason"], "runner compromised");
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "session_start" && e["session"] == id.as_str()),
        "session_start names the session"
    );
}

async fn health(addr: std::net::SocketAddr) -> (u16, serde_json::Value) {
    let (status, body) = http_raw(addr, "GET", "/healthz", None, None).await;
    let body = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
    (status, body)
}

/// `/healthz` says each part's state with a reason: GitHub down is
/// degraded (200), an audit trail that cannot be written is failing (503);
/// the API's copy keeps the cause to the operator's listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_reports_each_part_with_its_reason() {
    let w = World::new("127.0.0.192", "9876543640").await;
    let gw = &w.gateway;
    let (status, body) = health(gw.api).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "ok", "{body}");
    for part in ["store", "audit", "github"] {
        assert_eq!(body["checks"][part]["status"], "ok", "{body}");
    }
    assert!(
        body["checks"]["github"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("4990 of 5000") || r.contains("answered")),
        "{body}"
    );

    // GitHub goes down: degraded, still 200 (cached keys are served).
    w.github
        .down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    // A login whose keys are not cached yet makes the gateway ask.
    let r = ssh(gw, &w.hubot.path, "hubot", &["true"], None).await;
    assert_ne!(r.code, 0, "{r:?}");
    let (status, body) = health(gw.api).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["checks"]["github"]["status"], "degraded", "{body}");
    assert!(body["checks"]["github"].get("cause").is_none(), "{body}");
    let (_, detailed) = health(gw.metrics).await;
    assert!(
        detailed["checks"]["github"]["cause"]
            .as_str()
            .is_some_and(|c| c.contains("503")),
        "{detailed}"
    );
    w.github
        .down
        .store(false, std::sync::atomic::Ordering::SeqCst);

    // An audit trail on a full disk: failing, 503, and the cause.
    let full = World::with_config(
        "127.0.0.193",
        "9876543641",
        &[("CI_GATEWAY__AUDIT__PATH", "/dev/full")],
    )
    .await;
    let (status, body) = health(full.gateway.metrics).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "failing", "{body}");
    assert_eq!(body["checks"]["audit"]["status"], "failing", "{body}");
    assert!(
        body["checks"]["audit"]["cause"]
            .as_str()
            .is_some_and(|c| c.contains("No space left")),
        "{body}"
    );
    assert_eq!(body["checks"]["store"]["status"], "ok", "{body}");
}
