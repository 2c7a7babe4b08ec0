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
