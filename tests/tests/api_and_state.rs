//! The runner API's refusals, persistence across restarts, and the GitHub key
//! cache, against a running gateway.

mod common;

use std::sync::atomic::Ordering;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_api_requests_get_a_json_4xx_and_change_nothing() {
    let w = World::new("127.0.0.41", "9876543241").await;
    let gw = &w.gateway;
    let (_, before) = gw.job(&w.job).await;
    let good = registration(&w.runner, "octocat").to_string();
    let path = format!("/v1/jobs/{}", w.job);
    let huge = format!("{{\"actor\":\"{}\"}}", "a".repeat(100_000));
    let nested = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let hostile = registration(&w.runner, "mallory");
    type Case<'a> = (&'a str, String, Option<&'a str>, Option<String>, u16);
    let cases: Vec<Case> = vec![
        ("PUT", path.clone(), None, Some(good.clone()), 401),
        (
            "PUT",
            path.clone(),
            Some("wrong-token-wrong-token-wrong"),
            Some(hostile.to_string()),
            401,
        ),
        ("DELETE", path.clone(), None, None, 401),
        ("GET", path.clone(), Some("Bearer"), None, 401),
        (
            "PUT",
            path.clone(),
            Some(TOKEN),
            Some("{not json".into()),
            400,
        ),
        ("PUT", path.clone(), Some(TOKEN), Some(nested), 400),
        ("PUT", path.clone(), Some(TOKEN), Some(huge), 413),
        (
            "PUT",
            path.clone(),
            Some(TOKEN),
            Some(r#"{"actor":"x"}"#.into()),
            422,
        ),
        (
            "PUT",
            path.clone(),
            Some(TOKEN),
            Some(hostile.to_string().replace("\"linux\"", "\"plan9\"")),
            422,
        ),
        (
            "PUT",
            "/v1/jobs/..%2F..%2Fetc".into(),
            Some(TOKEN),
            Some(good.clone()),
            400,
        ),
        (
            "PUT",
            format!("/v1/jobs/{}", "9".repeat(300)),
            Some(TOKEN),
            Some(good.clone()),
            400,
        ),
        (
            "PUT",
            "/v1/jobs/0".into(),
            Some(TOKEN),
            Some(good.clone()),
            400,
        ),
        ("DELETE", "/v1/jobs/job-x".into(), Some(TOKEN), None, 400),
        ("GET", "/v1/nothing".into(), Some(TOKEN), None, 404),
    ];
    for (method, path, token, body, expected) in cases {
        let (status, text) = gw.http(method, &path, token, body.as_deref()).await;
        assert!(
            status == expected || (expected == 422 && status == 400),
            "{method} {path}: expected {expected}, got {status}: {text}"
        );
        let json: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{method} {path}: not JSON: {text}"));
        assert!(json["error"].is_string(), "{method} {path}: {json}");
    }
    let (status, after) = gw.job(&w.job).await;
    assert_eq!(status, 200);
    assert_eq!(before, after, "a refused request changed the job");
    // And the legitimate user still gets in.
    let r = ssh(gw, &w.octocat.path, &w.job, &["echo still-in"], None).await;
    assert_eq!(r.stdout.trim(), "still-in", "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_host_key_and_ca_survive_a_restart() {
    let w = World::new("127.0.0.42", "9876543242").await;
    let host_keys: Vec<_> = w
        .gateway
        .gw
        .host_keys
        .iter()
        .map(|k| k.public_key().clone())
        .collect();
    assert_eq!(host_keys.len(), 3, "ed25519, ECDSA and RSA");
    let ca = w.gateway.gw.ca.public_key().clone();
    let w = w.restart(&[]).await;
    let gateway = &w.gateway;
    let after: Vec<_> = gateway
        .gw
        .host_keys
        .iter()
        .map(|k| k.public_key().clone())
        .collect();
    assert_eq!(after, host_keys, "a host key changed");
    assert_eq!(gateway.gw.ca.public_key(), &ca, "CA changed");
    let (status, body) = gateway.job(&w.job).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["actor"], "octocat");
    // The runner's installed CA line still admits the gateway.
    let r = ssh(
        gateway,
        &w.octocat.path,
        &w.job,
        &["echo after-restart"],
        None,
    )
    .await;
    assert_eq!(r.stdout.trim(), "after-restart", "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_keys_are_cached_fetched_once_under_load_and_served_stale_when_github_is_down() {
    let w = World::with_config(
        "127.0.0.43",
        "9876543243",
        &[
            ("CI_GATEWAY__GITHUB__KEY_CACHE_TTL", "1s"),
            ("CI_GATEWAY__GITHUB__STALE_FOR", "1h"),
        ],
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    // Many logins at once after expiry: GitHub is asked once for octocat.
    w.github.delay_ms.store(300, Ordering::SeqCst);
    let before = w.github.hits.load(Ordering::SeqCst);
    let logins = (0..6).map(|_| ssh(&w.gateway, &w.octocat.path, &w.job, &["true"], None));
    for r in futures::future::join_all(logins).await {
        assert_eq!(r.code, 0, "{r:?}");
    }
    let fetched = w.github.hits.load(Ordering::SeqCst) - before;
    assert_eq!(fetched, 1, "octocat's keys were fetched {fetched} times");
    // GitHub down: the cached keys still serve.
    w.github.delay_ms.store(0, Ordering::SeqCst);
    w.github.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        &w.job,
        &["echo stale-ok"],
        None,
    )
    .await;
    assert_eq!(r.stdout.trim(), "stale-ok", "{r:?}");
    // Someone never fetched before gets nothing while GitHub is down.
    let r = ssh(&w.gateway, &w.hubot.path, &w.job, &["true"], None).await;
    assert_eq!(r.code, 255, "{r:?}");
}
