//! Abuse resistance: a peer that misbehaves on purpose, with bounded effort,
//! never buys unbounded memory. Counts and times are bounded; loopback only.

mod common;

use common::*;
use serde_json::{json, Value};

/// The Debian interpreter, which has python3-paramiko (scripts/test installs
/// it); a pyenv `python3` first on PATH would not.
const PYTHON: &str = "/usr/bin/python3";

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A "runner" that accepts connections and never reads from them. Its
/// receive buffers are small, so what the gateway writes to it gets stuck
/// soon rather than after the kernel's megabytes of autotuning.
async fn deaf_runner(ip: &str) -> std::net::SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    socket
        .bind(format!("{ip}:0").parse().expect("addr"))
        .expect("bind");
    let listener = socket.listen(16).expect("listen");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    addr
}

/// Registers `w`'s job (mallory's) at a deaf runner on `ip`.
async fn deaf_job(w: &World, ip: &str) {
    let deaf = deaf_runner(ip).await;
    let (status, body) = w
        .gateway
        .register(
            &w.job,
            json!({"actor": "mallory", "host": deaf.ip().to_string(), "port": deaf.port(),
                   "user": "runner", "host_keys": [w.runner.host_key_pub]}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
}

/// Runs `tests/scripts/<script>` (paramiko) as mallory on `job` with
/// `extra` arguments; returns the JSON line it prints.
async fn paramiko(w: &World, script: &str, job: &str, extra: &[String]) -> Value {
    let mut args = vec![
        format!("{}/scripts/{script}", env!("CARGO_MANIFEST_DIR")),
        "127.0.0.1".into(),
        w.gateway.ssh.port().to_string(),
        "mallory".into(),
        w.mallory.path.display().to_string(),
        job.to_string(),
    ];
    args.extend_from_slice(extra);
    let r = run(PYTHON, &args, None).await;
    assert_eq!(
        r.code, 0,
        "{script} ran (python3-paramiko installed?): {r:?}"
    );
    serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {r:?}"))
}

async fn flood(w: &World, job: &str, packet: usize, limit: usize) -> Value {
    let extra = [packet.to_string(), limit.to_string()];
    paramiko(w, "window_flood.py", job, &extra).await
}

/// A user on their own job opened a jump channel to a runner that never
/// reads and sent CHANNEL_DATA past the window: the gateway buffered it all
/// (RSS 10 -> 611 MiB in 4 s in the report). Data beyond the window, or a
/// packet beyond the advertised maximum, now ends the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_past_the_window_ends_the_connection() {
    let w = World::unregistered("127.0.0.111", "9876543111", &[]).await;
    deaf_job(&w, "127.0.0.112").await;
    let before = rss_kib();
    // Packets the size the gateway allows, far past its window.
    const LIMIT: usize = 96 << 20;
    let r = flood(&w, &w.job, 32 * 1024, LIMIT).await;
    let window = r["window"].as_u64().expect("window") as usize;
    let sent = r["sent"].as_u64().expect("sent") as usize;
    assert_eq!(r["closed"], true, "the gateway ended the connection: {r}");
    assert!(
        sent < LIMIT / 2,
        "it ended soon after the window ({window} bytes) was spent, not after {sent}"
    );
    let grown = rss_kib().saturating_sub(before);
    eprintln!("window flood: window {window}, sent {sent}, gateway RSS grew {grown} KiB");
    assert!(grown < 48 * 1024, "RSS grew {grown} KiB");
    // One packet larger than the advertised maximum: closed at once.
    let r = flood(&w, &w.job, 250_000, 50_000_000).await;
    assert_eq!(r["closed"], true, "{r}");
    assert!(r["sent"].as_u64().expect("sent") <= 250_000 * 40, "{r}");
    // Everyone else is served as usual.
    let (status, _) = w.gateway.job(&w.job).await;
    assert_eq!(status, 200);
}

/// Starts `ssh <job>@gateway <command>` in the background.
fn background_ssh(w: &World, command: &str) -> tokio::process::Child {
    let mut args = client_opts(&w.octocat.path);
    args.extend([
        "-p".to_string(),
        w.gateway.ssh.port().to_string(),
        format!("{}@127.0.0.1", w.job),
        command.to_string(),
    ]);
    tokio::process::Command::new("ssh")
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("ssh")
}

/// Two job-mode sessions of octocat, open until dropped.
async fn hold_two_sessions(
    w: &World,
) -> (
    std::sync::Arc<ci_gateway::registry::Live>,
    Vec<tokio::process::Child>,
) {
    let live = w.live();
    let held = vec![background_ssh(w, "sleep 30"), background_ssh(w, "sleep 30")];
    eventually("two sessions are open", || live.active_sessions() == 2).await;
    (live, held)
}

/// One login could hold 200 connections per source, each with channels and
/// sockets, until `accept` failed for everyone. A login's connections are
/// now capped, with a one-line reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_login_cannot_hold_more_than_its_connections() {
    let w = World::with_config(
        "127.0.0.113",
        "9876543113",
        &[("CI_GATEWAY__SSH__MAX_CONNECTIONS_PER_LOGIN", "2")],
    )
    .await;
    let (live, mut held) = hold_two_sessions(&w).await;
    let r = ssh(&w.gateway, &w.octocat.path, &w.job, &["echo third"], None).await;
    assert_eq!(r.code, 255, "{r:?}");
    assert!(
        r.stderr.contains("octocat already has 2 connections open"),
        "{r:?}"
    );
    // Someone else is not affected, and a closed one gives its place back.
    let r = ssh(&w.gateway, &w.admin.path, &w.job, &["echo admin"], None).await;
    assert_eq!(r.stdout.trim(), "admin", "{r:?}");
    let _ = held[0].kill().await;
    held.remove(0);
    eventually("one session closed", || live.active_sessions() == 1).await;
    let r = ssh(&w.gateway, &w.octocat.path, &w.job, &["echo again"], None).await;
    assert_eq!(r.stdout.trim(), "again", "{r:?}");
}

/// Sockets to runners are capped (by default at half of what RLIMIT_NOFILE
/// leaves after a headroom), so users' channels cannot exhaust the
/// descriptors the gateway needs to accept anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sockets_are_capped_and_given_back() {
    let w = World::with_config(
        "127.0.0.114",
        "9876543114",
        &[("CI_GATEWAY__UPSTREAM__MAX_SOCKETS", "1")],
    )
    .await;
    assert_eq!(w.gateway.gw.upstream_socket_limit, 1);
    let live = w.live();
    let mut first = background_ssh(&w, "echo started; sleep 30");
    eventually("the first session holds the socket", || {
        w.gateway.gw.upstream_sockets.available_permits() == 0
    })
    .await;
    let r = ssh(&w.gateway, &w.octocat.path, &w.job, &["echo second"], None).await;
    assert_eq!(r.code, 255, "{r:?}");
    assert!(
        r.stderr.contains("limit of 1 connections to runners"),
        "{r:?}"
    );
    // Jump mode counts against the same budget.
    let r = w.jump(&["true"]).await;
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains("limit of 1 connections to runners"),
        "{r:?}"
    );
    let _ = first.kill().await;
    eventually("the socket is given back", || {
        live.active_sessions() == 0 && w.gateway.gw.upstream_sockets.available_permits() == 1
    })
    .await;
    let r = ssh(&w.gateway, &w.octocat.path, &w.job, &["echo later"], None).await;
    assert_eq!(r.stdout.trim(), "later", "{r:?}");
    // The default comes from the descriptor limit.
    let limit = ci_gateway::limits::open_files_limit().expect("Linux");
    let w2 = World::new("127.0.0.115", "9876543115").await;
    assert_eq!(
        w2.gateway.gw.upstream_socket_limit,
        ci_gateway::limits::descriptor_share(limit)
    );
}

/// 105 failed logins with made-up names used to cost 105 GitHub API calls.
/// Lookups a source causes for logins it names are now budgeted per source
/// (uncached ones only); another source is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_logins_cannot_spend_the_github_budget() {
    let w = World::with_config(
        "127.0.0.116",
        "9876543116",
        &[
            ("CI_GATEWAY__GITHUB__LOOKUPS_PER_SOURCE_PER_MINUTE", "5"),
            ("CI_GATEWAY__SSH__MAX_FAILED_AUTHS_PER_SOURCE", "1000"),
            ("CI_GATEWAY__SSH__MAX_FAILED_AUTHS_PER_USER", "1000"),
        ],
    )
    .await;
    let jump_as = |source: &str, login: &str| {
        let mut args = client_opts(&w.mallory.path);
        args.extend([
            "-o".to_string(),
            format!("BindAddress={source}"),
            "-p".to_string(),
            w.gateway.ssh.port().to_string(),
            "-W".to_string(),
            format!("job-{}:22", w.job),
            format!("{login}@127.0.0.1"),
        ]);
        args
    };
    let before = w.github.hits.load(std::sync::atomic::Ordering::SeqCst);
    for n in 0..40 {
        let r = run(
            "ssh",
            &jump_as("127.0.0.117", &format!("made-up-{n}")),
            None,
        )
        .await;
        assert_ne!(r.code, 0, "{r:?}");
    }
    let spent = w.github.hits.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(spent <= 5, "40 made-up logins cost {spent} GitHub calls");
    // Another source still gets its lookups (mallory's own keys, uncached).
    let r = run("ssh", &jump_as("127.0.0.118", "mallory"), None).await;
    assert!(r.stderr.contains("mallory is not allowed on job"), "{r:?}");
    let hits = w.github.hits.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(hits - before, spent + 1);
    // The calls spent and the refusals are metrics an operator can alert on.
    let text = metrics(&w.gateway).await;
    let calls: u64 = ["ok", "not_found", "error", "timeout"]
        .iter()
        .map(|o| {
            metric(
                &text,
                &format!("ci_gateway_github_api_calls_total{{outcome=\"{o}\"}}"),
            )
        })
        .sum();
    assert_eq!(calls, hits as u64, "{text}");
    assert!(
        metric(
            &text,
            "ci_gateway_rate_limit_refusals_total{kind=\"github_lookups\"}"
        ) >= 35,
        "{text}"
    );
}

/// A few sources holding silent sockets used to take the API's connection
/// slots, so other runners' probes timed out. Each source now has its own
/// cap; a connection over it is closed at once, and everyone else is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_api_sockets_of_one_source_do_not_starve_others() {
    use tokio::io::AsyncReadExt;
    let w = World::with_config(
        "127.0.0.119",
        "9876543119",
        &[("CI_GATEWAY__API__MAX_CONNECTIONS_PER_SOURCE", "3")],
    )
    .await;
    let connect_from = |ip: &'static str| {
        let api = w.gateway.api;
        async move {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket
                .bind(format!("{ip}:0").parse().expect("addr"))
                .expect("bind");
            socket.connect(api).await.expect("connect")
        }
    };
    let mut silent = Vec::new();
    for _ in 0..3 {
        silent.push(connect_from("127.0.0.120").await);
    }
    // The fourth from the same source is closed at once (no request needed).
    let mut fourth = connect_from("127.0.0.120").await;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), fourth.read(&mut buf))
        .await
        .expect("closed long before the header timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // Another source is served while the silent sockets stay open.
    let (status, body) = w.gateway.http("GET", "/healthz", None, None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""status":"ok""#), "{body}");
    drop(silent);
}

/// Channels are bounded per login over all its connections too, so many
/// connections with a few channels each cannot add up past the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_login_cannot_hold_more_than_its_channels() {
    let w = World::with_config(
        "127.0.0.121",
        "9876543121",
        &[("CI_GATEWAY__SSH__MAX_CHANNELS_PER_LOGIN", "2")],
    )
    .await;
    let (live, mut held) = hold_two_sessions(&w).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let r = ssh(&w.gateway, &w.octocat.path, &w.job, &["echo third"], None).await;
    assert_ne!(r.code, 0, "{r:?}");
    assert!(!r.stdout.contains("third"), "{r:?}");
    // Another login is not affected; a closed channel gives its place back.
    let r = ssh(&w.gateway, &w.admin.path, &w.job, &["echo admin"], None).await;
    assert_eq!(r.stdout.trim(), "admin", "{r:?}");
    let _ = held[0].kill().await;
    held.remove(0);
    eventually("one session closed", || live.active_sessions() == 1).await;
    let mut ok = false;
    for _ in 0..20 {
        let r = ssh(&w.gateway, &w.octocat.path, &w.job, &["echo again"], None).await;
        if r.stdout.trim() == "again" {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(ok, "the place came back");
}

/// A `PUT` listing 64 people used to fetch all their keys from GitHub every
/// time. A listed user's uncached lookup now spends the caller's budget; the
/// actor and the admins are always looked up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_listing_many_people_cannot_spend_the_github_budget() {
    let w = World::unregistered(
        "127.0.0.122",
        "9876543122",
        &[("CI_GATEWAY__GITHUB__LOOKUPS_PER_SOURCE_PER_MINUTE", "5")],
    )
    .await;
    let mut body = registration(&w.runner, "octocat");
    body["allowed_users"] = json!((0..40).map(|n| format!("listed-{n}")).collect::<Vec<_>>());
    let before = w.github.hits.load(std::sync::atomic::Ordering::SeqCst);
    let (status, answer) = w.gateway.register(&w.job, body.clone()).await;
    assert_eq!(status, 201, "{answer}");
    for _ in 0..3 {
        let (status, _) = w.gateway.register(&w.job, body.clone()).await;
        assert_eq!(status, 200);
    }
    let spent = w.github.hits.load(std::sync::atomic::Ordering::SeqCst) - before;
    // octocat and the admin, plus at most the budget of 5 listed people.
    assert!(
        spent <= 7,
        "4 PUTs listing 40 people cost {spent} GitHub calls"
    );
    let lines = answer["authorized_keys"].as_array().expect("lines");
    assert!(
        lines
            .iter()
            .any(|l| l.as_str().is_some_and(|l| l.ends_with(" octocat"))),
        "the actor's key is always there: {answer}"
    );
}

/// All runners shared the registration token's request budget, so one
/// runner's 620 requests made every other runner's registration wait (429).
/// A shared token's budget is kept per source now, and every source has a
/// budget over all the tokens it presents, so many job tokens buy no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_runner_cannot_spend_everyones_api_budget() {
    let w = World::with_config(
        "127.0.0.141",
        "9876543141",
        &[
            ("CI_GATEWAY__API__REQUESTS_PER_MINUTE_PER_TOKEN", "10"),
            ("CI_GATEWAY__API__REQUESTS_PER_MINUTE_PER_SOURCE", "30"),
        ],
    )
    .await;
    let from =
        |ip: &str, method: &'static str, path: String, token: String, body: Option<String>| {
            let api = w.gateway.api;
            let ip = ip.parse().expect("ip");
            async move {
                http_from(
                    Some(ip),
                    api,
                    method,
                    &path,
                    Some(&token),
                    body.map(String::into_bytes),
                )
                .await
                .0
            }
        };
    // One runner floods with the registration token until it is refused.
    let mut flooded = Vec::new();
    for _ in 0..15 {
        flooded.push(
            from(
                "127.0.0.142",
                "GET",
                "/v1/jobs/1".into(),
                TOKEN.into(),
                None,
            )
            .await,
        );
    }
    assert!(flooded.contains(&429), "never limited: {flooded:?}");
    // Another runner still registers with the same token.
    let body = registration(&w.runner, "octocat").to_string();
    let mut jobs = Vec::new();
    for n in 0..4 {
        let job = format!("71414141{n:02}");
        let path = format!("/v1/jobs/{job}");
        let (status, text) = http_from(
            Some("127.0.0.143".parse().expect("ip")),
            w.gateway.api,
            "PUT",
            &path,
            Some(TOKEN),
            Some(body.clone().into_bytes()),
        )
        .await;
        assert_eq!(status, 201, "{text}");
        let reply: Value = serde_json::from_str(&text).expect("json");
        jobs.push((
            path,
            reply["job_token"].as_str().expect("token").to_string(),
        ));
    }
    // One source with many job tokens: each job's budget is fresh, but the
    // source's own (30) runs out.
    let mut statuses = Vec::new();
    for (path, token) in &jobs[..3] {
        for _ in 0..10 {
            statuses.push(from("127.0.0.144", "GET", path.clone(), token.clone(), None).await);
        }
    }
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    let (path, token) = &jobs[3];
    let (status, text) = http_from(
        Some("127.0.0.144".parse().expect("ip")),
        w.gateway.api,
        "GET",
        path,
        Some(token),
        None,
    )
    .await;
    assert_eq!(status, 429, "{text}");
    assert!(
        text.contains("your address is over its request rate"),
        "{text}"
    );
    // The same job from its own runner is served.
    assert_eq!(
        from("127.0.0.145", "GET", path.clone(), token.clone(), None).await,
        200
    );
}

/// Each channel's data was bounded by its window, but a connection's
/// channels together were not: 12 channels to a runner that never reads,
/// each filled exactly to its window, made the gateway hold 24 MiB for one
/// connection (and 32 channels, 64 MiB). The windows of one connection now
/// come out of one budget: a channel opened when it is short gets half of
/// what is left, and one opened when it is spent is refused as a resource
/// shortage while the connection carries on. A channel closed while the
/// runner was not reading used to stay stuck in its write for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connections_channels_share_one_window_budget() {
    const BUDGET: u64 = 6 << 20;
    let w = World::unregistered(
        "127.0.0.126",
        "9876543126",
        &[(
            "CI_GATEWAY__SSH__MAX_WINDOW_PER_CONNECTION",
            &BUDGET.to_string(),
        )],
    )
    .await;
    deaf_job(&w, "127.0.0.127").await;
    let out = paramiko(&w, "channel_fill.py", &w.job, &["12".into()]).await;
    let windows: Vec<u64> = out["windows"]
        .as_array()
        .expect("windows")
        .iter()
        .map(|v| v.as_u64().expect("n"))
        .collect();
    let held: u64 = windows.iter().sum();
    eprintln!(
        "windows granted: {windows:?}, {held} bytes in all; refused: {}",
        out["refused"]
    );
    assert!(
        held <= BUDGET,
        "{held} bytes granted over the budget: {windows:?}"
    );
    assert_eq!(windows[0], 2 << 20, "the first channels get a full window");
    assert_eq!(out["refused"]["code"], 4, "a resource shortage: {out}");
    assert_eq!(out["active"], true, "the connection lives on: {out}");
    // Closed channels give their share back, even those whose data the
    // runner never read (that data is dropped after a short drain).
    assert_eq!(out["after_close"], 2 << 20, "{out}");
}

/// Requests take no window, so while a write to a runner that stopped
/// reading waited, a user could send any number of them and the gateway kept
/// them all (read ahead so that a close is seen). What is kept is counted
/// now: past the bound the channel is closed, the connection lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sent_while_a_write_waits_are_bounded() {
    let w = World::unregistered("127.0.0.146", "9876543146", &[]).await;
    deaf_job(&w, "127.0.0.147").await;
    let out = paramiko(&w, "request_flood.py", &w.job, &["3000".into()]).await;
    assert_eq!(
        out["closed"], true,
        "the gateway gave the channel up: {out}"
    );
    assert_eq!(out["active"], true, "the connection lives on: {out}");
}
