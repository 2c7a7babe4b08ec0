//! Jump mode end to end: `ssh -J <login>@gateway runneruser@<job-id>`, the
//! user's own SSH session running end to end with the runner's sshd.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_jump_reaches_the_runners_own_sshd() {
    let w = World::new("127.0.0.31", "9876543231").await;
    // Port 22 means the runner's registered SSH port.
    for dest in [w.job.clone(), format!("job-{}", w.job)] {
        let r = ssh_jump(
            &w.gateway,
            &w.octocat.path,
            "octocat",
            &w.runner.user,
            &dest,
            22,
            &["echo end-to-end; exit 4"],
        )
        .await;
        assert_eq!(
            (r.code, r.stdout.as_str()),
            (4, "end-to-end\n"),
            "{dest}: {r:?}"
        );
    }
    // The runner saw the user's own key, not the gateway's certificate.
    assert!(
        w.runner.log().contains("Accepted publickey"),
        "{}",
        w.runner.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jump_mode_dials_nothing_but_the_jobs_runner_on_allowed_ports() {
    let w = World::new("127.0.0.32", "9876543232").await;
    let port = w.gateway.ssh.port();
    let api_port = w.gateway.api.port();
    let cases: Vec<(String, String)> = vec![
        (format!("127.0.0.1:{port}"), "is not a job".into()),
        (format!("127.0.0.1:{api_port}"), "is not a job".into()),
        ("169.254.169.254:80".into(), "is not a job".into()),
        ("localhost:22".into(), "is not a job".into()),
        (
            format!("{}:{}", w.runner.addr.ip(), w.runner.addr.port()),
            "is not a job".into(),
        ),
        (format!("{}:2222", w.job), "port 2222 is not open".into()),
        (format!("{}:8022", w.job), "port 8022 is not open".into()),
        (
            "4444444444:22".into(),
            "job 4444444444 is not registered".into(),
        ),
        // Every address class, however spelled, is "not a job".
        ("[::1]:22".into(), "is not a job".into()),
        ("0.0.0.0:22".into(), "is not a job".into()),
        ("10.0.0.1:22".into(), "is not a job".into()),
        ("169.254.0.1:22".into(), "is not a job".into()),
        ("[fe80::1]:22".into(), "is not a job".into()),
        ("[::ffff:127.0.0.1]:22".into(), "is not a job".into()),
        ("0x7f000001:22".into(), "is not a job".into()),
        // 127.0.0.1 as one decimal number is read as a job id, never an IP.
        (
            "2130706433:22".into(),
            "job 2130706433 is not registered".into(),
        ),
    ];
    for (dest, expected) in cases {
        let mut args = client_opts(&w.octocat.path);
        args.extend([
            "-p".into(),
            port.to_string(),
            "-W".into(),
            dest.clone(),
            "octocat@127.0.0.1".into(),
        ]);
        let r = run("ssh", &args, None).await;
        assert_eq!(r.code, 255, "{dest} was forwarded: {r:?}");
        assert!(
            r.stderr.contains(&expected),
            "{dest}: expected {expected:?} in {r:?}"
        );
    }
    // After all that, the job's own runner is still one jump away.
    let r = ssh_jump(
        &w.gateway,
        &w.octocat.path,
        "octocat",
        &w.runner.user,
        &w.job,
        22,
        &["echo", "still-reachable"],
    )
    .await;
    assert_eq!(r.stdout.trim(), "still-reachable", "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jump_mode_needs_the_logins_own_key_and_a_place_on_the_job() {
    let w = World::new("127.0.0.33", "9876543233").await;
    // mallory's key presented as octocat: refused at authentication.
    let r = ssh_jump(
        &w.gateway,
        &w.mallory.path,
        "octocat",
        &w.runner.user,
        &w.job,
        22,
        &["true"],
    )
    .await;
    assert_eq!(r.code, 255);
    assert!(r.stderr.contains("Permission denied"), "{r:?}");
    // mallory as mallory: authenticated, but not allowed on the job.
    let r = ssh_jump(
        &w.gateway,
        &w.mallory.path,
        "mallory",
        &w.runner.user,
        &w.job,
        22,
        &["true"],
    )
    .await;
    assert_eq!(r.code, 255);
    assert!(r.stderr.contains("mallory is not allowed on job"), "{r:?}");
    // The admin may (RSA key), once the runner trusts their key: it does,
    // because registration returned the allowed people's keys.
    let r = ssh_jump(
        &w.gateway,
        &w.admin.path,
        "the-admin",
        &w.runner.user,
        &w.job,
        22,
        &["echo admin"],
    )
    .await;
    assert_eq!(r.stdout.trim(), "admin", "{r:?}");
    // Jump logins get no shell on the gateway itself.
    let r = ssh(&w.gateway, &w.octocat.path, "octocat", &["true"], None).await;
    assert_ne!(r.code, 0, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_jump_session_is_counted_and_kicked_on_deregistration() {
    let w = World::new("127.0.0.34", "9876543234").await;
    let gw = &w.gateway;
    let args = jump_args(
        gw,
        &w.octocat.path,
        "octocat",
        &w.runner.user,
        &w.job,
        22,
        &["sleep 60"],
    );
    let session = tokio::spawn(async move { run("ssh", &args, None).await });
    let live = w.live();
    eventually("the jump session is counted", || {
        live.active_sessions() == 1
    })
    .await;
    let (_, body) = gw.job(&w.job).await;
    assert_eq!(body["active_sessions"], 1, "{body}");
    let (status, _) = gw.call("DELETE", &w.job, "").await;
    assert_eq!(status, 200);
    let r = session.await.expect("join");
    assert_eq!(r.code, 255, "{r:?}");
    eventually("the count drops", || live.active_sessions() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_data_both_ways_at_once_through_the_jump_arrives_intact() {
    let w = World::new("127.0.0.35", "9876543235").await;
    // 24 MiB of varied bytes echoed by the runner: both directions at once.
    let data: Vec<u8> = (0..24u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let args = jump_args(
        &w.gateway,
        &w.octocat.path,
        "octocat",
        &w.runner.user,
        &w.job,
        22,
        &["cat"],
    );
    let r = run("ssh", &args, Some(data.clone())).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.raw_stdout.len(), data.len());
    assert!(r.raw_stdout == data, "the echoed bytes differ");
}
