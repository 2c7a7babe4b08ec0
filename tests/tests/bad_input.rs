//! The bad-input suite: garbage, truncated and silent peers on the SSH and
//! API ports, absurd usernames, floods of keys and of failed logins,
//! requests for things the gateway does not serve. After each, the gateway
//! is up, the registration is intact, and a legitimate user still gets in.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SHORT: [(&str, &str); 2] = [
    ("CI_GATEWAY__SSH__AUTH_TIMEOUT", "2s"),
    ("CI_GATEWAY__API__REQUEST_TIMEOUT", "2s"),
];

/// The gateway still works for octocat, and the job is still registered.
async fn still_serving(w: &World) {
    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        &w.job,
        &["echo", "still-here"],
        None,
    )
    .await;
    assert_eq!(r.stdout.trim(), "still-here", "{r:?}");
    let (status, body) = w.gateway.job(&w.job).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["actor"], "octocat");
}

/// Reads until the peer closes; panics if it stays open `limit`.
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> Vec<u8> {
    let mut seen = Vec::new();
    let result = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        result.is_ok(),
        "the gateway kept a bad connection open for {limit:?}"
    );
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_truncated_and_silent_peers_are_closed() {
    let w = World::with_config("127.0.0.71", "9876543271", &SHORT).await;
    // Garbage instead of a version line.
    let mut s = tokio::net::TcpStream::connect(w.gateway.ssh)
        .await
        .expect("connect");
    let garbage: Vec<u8> = (0..65_536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let _ = s.write_all(&garbage).await;
    closed_within(&mut s, Duration::from_secs(30)).await;
    // A version line, then half a packet, then silence.
    let mut s = tokio::net::TcpStream::connect(w.gateway.ssh)
        .await
        .expect("connect");
    s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n\x00\x00\x10\x00\x07\x14")
        .await
        .expect("write");
    let seen = closed_within(&mut s, Duration::from_secs(30)).await;
    assert!(seen.starts_with(b"SSH-2.0-ci-gateway"), "{seen:?}");
    // A packet length of 4 GiB.
    let mut s = tokio::net::TcpStream::connect(w.gateway.ssh)
        .await
        .expect("connect");
    s.write_all(b"SSH-2.0-x\r\n\xff\xff\xff\xff\x00\x00\x00\x00")
        .await
        .expect("write");
    closed_within(&mut s, Duration::from_secs(30)).await;
    // Connects and says nothing at all (slowloris): closed by auth_timeout.
    let mut s = tokio::net::TcpStream::connect(w.gateway.ssh)
        .await
        .expect("connect");
    closed_within(&mut s, Duration::from_secs(30)).await;
    // The API: half a request line and headers, never finished.
    let mut s = tokio::net::TcpStream::connect(w.gateway.api)
        .await
        .expect("connect");
    s.write_all(b"PUT /v1/jobs/1 HTTP/1.1\r\nHost: x\r\nAuthori")
        .await
        .expect("write");
    closed_within(&mut s, Duration::from_secs(30)).await;
    // A body shorter than its Content-Length, never completed.
    let mut s = tokio::net::TcpStream::connect(w.gateway.api)
        .await
        .expect("connect");
    s.write_all(
        format!(
            "PUT /v1/jobs/{} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{{\"actor\"",
            w.job
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let seen = closed_within(&mut s, Duration::from_secs(60)).await;
    assert!(
        seen.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    still_serving(&w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_usernames_get_a_reason_and_change_nothing() {
    let w = World::with_config("127.0.0.72", "9876543272", &SHORT).await;
    let long = "9".repeat(10 * 1024);
    let long_login = format!("a{}", "b".repeat(10 * 1024));
    for user in [
        long.as_str(),
        long_login.as_str(),
        "job-",
        ".-.",
        "root@evil",
        "12 34",
    ] {
        // octocat's key: only the username can keep this login out, and the
        // user hears why.
        let r = ssh(&w.gateway, &w.octocat.path, user, &["true"], None).await;
        assert_ne!(r.code, 0, "{user:.20}: {r:?}");
        assert!(
            r.stderr.contains("ci-gateway: bad username"),
            "{user:.20}: {}",
            r.stderr
        );
    }
    // Not UTF-8: straight from the bytes of the command line.
    use std::os::unix::ffi::OsStrExt;
    let mut args: Vec<std::ffi::OsString> = client_opts(&w.octocat.path)
        .into_iter()
        .map(Into::into)
        .collect();
    args.extend(["-p".into(), w.gateway.ssh.port().to_string().into()]);
    let mut dest = b"\xff\xfe\x80job".to_vec();
    dest.extend_from_slice(b"@127.0.0.1");
    args.push(std::ffi::OsStr::from_bytes(&dest).to_os_string());
    args.push("true".into());
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("ssh").args(&args).output(),
    )
    .await
    .expect("ssh finishes")
    .expect("ssh runs");
    assert!(!out.status.success());
    still_serving(&w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_keys_offered_end_in_a_disconnect() {
    let w = World::with_config("127.0.0.73", "9876543273", &SHORT).await;
    let keys = w.dir.path().join("many");
    std::fs::create_dir_all(&keys).expect("mkdir");
    let mut args = client_opts(&w.mallory.path);
    for i in 0..100 {
        let k = keygen(&keys, &format!("k{i}"), "ed25519");
        args.extend(["-i".to_string(), k.path.display().to_string()]);
    }
    args.extend([
        "-p".to_string(),
        w.gateway.ssh.port().to_string(),
        format!("{}@127.0.0.1", w.job),
        "true".to_string(),
    ]);
    let r = run("ssh", &args, None).await;
    assert_ne!(r.code, 0, "{r:?}");
    // The gateway stopped listening to offers long before the 100th.
    let audit =
        std::fs::read_to_string(w.dir.path().join("data").join("audit.jsonl")).expect("audit");
    let offers = audit
        .lines()
        .filter(|l| l.contains("\"key_not_accepted\"") && l.contains("127.0.0.1"))
        .count();
    assert!(offers <= 31, "{offers} offers were considered");
    still_serving(&w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_failed_logins_is_cut_off_without_slowing_anyone_else() {
    let w = World::with_config(
        "127.0.0.74",
        "9876543274",
        &[
            ("CI_GATEWAY__SSH__MAX_FAILED_AUTHS_PER_SOURCE", "20"),
            ("CI_GATEWAY__SSH__FAILED_AUTH_WINDOW", "10m"),
        ],
    )
    .await;
    // mallory from 127.0.0.75, with a key nobody allowed, again and again.
    let mut blocked_at = None;
    for attempt in 0..60 {
        let mut args = client_opts(&w.mallory.path);
        args.extend([
            "-o".to_string(),
            "BindAddress=127.0.0.75".to_string(),
            "-p".to_string(),
            w.gateway.ssh.port().to_string(),
            format!("{}@127.0.0.1", w.job),
            "true".to_string(),
        ]);
        let r = run("ssh", &args, None).await;
        assert_ne!(r.code, 0);
        if r.stderr.contains("too many failed logins")
            || r.stderr.contains("closed by remote host")
            || r.stderr.contains("Connection reset")
        {
            blocked_at = Some(attempt);
            break;
        }
    }
    let blocked_at = blocked_at.expect("the flooder was cut off within 60 attempts");
    assert!(blocked_at <= 21, "cut off after {blocked_at} attempts");
    // Thousands more connections from the flooder: each is dropped at once,
    // before any SSH work (no version line comes back).
    let mut dropped = 0;
    for _ in 0..2000 {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.75:0".parse().expect("addr"))
            .expect("bind");
        let Ok(mut s) = socket.connect(w.gateway.ssh).await else {
            dropped += 1;
            continue;
        };
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => dropped += 1,
            Ok(Ok(_)) => panic!("a blocked source got an SSH greeting"),
            Err(_) => panic!("a blocked source's connection was left open"),
        }
    }
    assert_eq!(dropped, 2000);
    // Everyone else is served as usual, octocat from 127.0.0.1 ...
    still_serving(&w).await;
    // ... and a different source with a wrong key still gets the ordinary
    // answer, not the flooder's.
    let r = ssh(&w.gateway, &w.mallory.path, &w.job, &["true"], None).await;
    assert!(r.stderr.contains("Permission denied"), "{r:?}");
    let audit =
        std::fs::read_to_string(w.dir.path().join("data").join("audit.jsonl")).expect("audit");
    assert!(
        audit.contains("\"rate_limited\""),
        "the cut-off is recorded"
    );
    let flooder_auths = audit
        .lines()
        .filter(|l| l.contains("\"event\":\"auth\"") && l.contains("127.0.0.75"))
        .count();
    assert!(
        flooder_auths <= 21,
        "{flooder_auths} of the flooder's attempts were considered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unserved_requests_are_refused_and_nothing_else_breaks() {
    let w = World::with_config("127.0.0.76", "9876543276", &SHORT).await;
    // X11 and agent forwarding: refused, the command still runs.
    for flag in ["-X", "-A"] {
        let r = ssh(
            &w.gateway,
            &w.octocat.path,
            &w.job,
            &[flag, "-oForwardX11Trusted=no", "echo", "ran"],
            None,
        )
        .await;
        assert_eq!(r.stdout.trim(), "ran", "{flag}: {r:?}");
    }
    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        &w.job,
        &["-X", "echo", "$DISPLAY$SSH_AUTH_SOCK"],
        None,
    )
    .await;
    assert_eq!(
        r.stdout.trim(),
        "",
        "no X11 display or agent socket reached the runner: {r:?}"
    );
    // Remote forwarding (tcpip-forward): refused, in both modes.
    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        &w.job,
        &[
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            "127.0.0.1:0:127.0.0.1:22",
            "echo",
            "forwarded",
        ],
        None,
    )
    .await;
    assert_ne!(r.code, 0, "{r:?}");
    assert!(!r.stdout.contains("forwarded"));
    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        "octocat",
        &[
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            "127.0.0.1:0:127.0.0.1:22",
        ],
        None,
    )
    .await;
    assert_ne!(r.code, 0, "{r:?}");
    // A session channel in jump mode (a shell on the gateway): refused.
    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        "octocat",
        &["echo", "on-the-gateway"],
        None,
    )
    .await;
    assert_ne!(r.code, 0, "{r:?}");
    assert!(!r.stdout.contains("on-the-gateway"));
    // Huge and odd job ids in the API.
    for path in [
        "/v1/jobs/99999999999999999999999999999999",
        "/v1/jobs/0",
        "/v1/jobs/-1",
        "/v1/jobs/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/v1/jobs/1%00",
    ] {
        let (status, body) = w.gateway.http("GET", path, Some(TOKEN), None).await;
        assert!((400..500).contains(&status), "{path}: {status} {body}");
        assert!(body.contains("\"error\""), "{path}: {body}");
    }
    still_serving(&w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_api_tokens_are_rate_limited_per_source() {
    let w = World::with_config(
        "127.0.0.77",
        "9876543277",
        &[("CI_GATEWAY__API__MAX_BAD_TOKENS_PER_SOURCE", "5")],
    )
    .await;
    let path = format!("/v1/jobs/{}", w.job);
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let (status, _) = w
            .gateway
            .http("GET", &path, Some("wrong-token-wrong-token"), None)
            .await;
        statuses.push(status);
    }
    assert_eq!(&statuses[..5], [401; 5]);
    assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");
    // The blocked source is 127.0.0.1; even the right token waits there,
    // and says for how long.
    let (status, body) = w.gateway.http("GET", &path, Some(TOKEN), None).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("retry in"), "{body}");
}

/// Failed logins for one job from six other addresses used to lock its
/// owner out (the per-username block applied to every source). Now the
/// failing sources are refused and the owner, from a clean address, is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_from_other_addresses_never_lock_the_owner_out() {
    let w = World::with_config(
        "127.0.0.84",
        "9876543284",
        &[
            ("CI_GATEWAY__SSH__MAX_FAILED_AUTHS_PER_USER", "3"),
            ("CI_GATEWAY__SSH__FAILED_AUTH_WINDOW", "10m"),
        ],
    )
    .await;
    let from = |source: &str, key: &std::path::Path, command: &str| {
        let mut args = client_opts(key);
        args.extend([
            "-o".to_string(),
            format!("BindAddress={source}"),
            "-p".to_string(),
            w.gateway.ssh.port().to_string(),
            format!("{}@127.0.0.1", w.job),
            command.to_string(),
        ]);
        args
    };
    for n in 0..6 {
        let source = format!("127.0.0.{}", 90 + n);
        let r = run("ssh", &from(&source, &w.mallory.path, "true"), None).await;
        assert_ne!(r.code, 0, "{r:?}");
    }
    // An attacking address is now refused for this job, with the reason.
    let r = run("ssh", &from("127.0.0.90", &w.mallory.path, "true"), None).await;
    assert!(
        r.stderr.contains("too many failed logins for this user"),
        "{r:?}"
    );
    // The owner, from an address that never failed, gets in every time.
    for attempt in 0..9 {
        let r = run("ssh", &from("127.0.0.99", &w.octocat.path, "echo in"), None).await;
        assert_eq!(r.stdout.trim(), "in", "attempt {attempt}: {r:?}");
    }
}

/// `ssh-rsa` (SHA-1) user signatures were accepted and advertised; OpenSSH
/// refuses them by default since 8.8, and so does the gateway now, unless
/// `ssh.allow_sha1_rsa` says otherwise. RSA keys still work (rsa-sha2-*).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sha1_rsa_signatures_are_refused_unless_allowed() {
    let w = World::new("127.0.0.85", "9876543285").await;
    let r = ssh(&w.gateway, &w.admin.path, &w.job, &["echo sha2"], None).await;
    assert_eq!(
        r.stdout.trim(),
        "sha2",
        "an RSA key signs with SHA-2: {r:?}"
    );
    let sha1 = ["-oPubkeyAcceptedAlgorithms=ssh-rsa", "echo sha1"];
    let r = ssh(&w.gateway, &w.admin.path, &w.job, &sha1, None).await;
    assert_eq!(r.code, 255, "{r:?}");
    assert!(!r.stdout.contains("sha1"), "{r:?}");
    assert!(r.stderr.contains("Permission denied"), "{r:?}");
    let w = w
        .restart(&[
            ("CI_GATEWAY__SSH__ALLOW_SHA1_RSA", "true"),
            ("CI_GATEWAY__ACCESS__ADMINS", "the-admin"),
        ])
        .await;
    let r = ssh(&w.gateway, &w.admin.path, &w.job, &sha1, None).await;
    assert_eq!(r.stdout.trim(), "sha1", "allowed when configured: {r:?}");
}

/// Before authentication a stranger could make the gateway wait for (and
/// buffer) packets of up to 256 KiB. The cap is now 32 KiB until the client
/// is authenticated: a larger length ends the connection at once, without
/// waiting for the bytes it announces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_packet_before_authentication_ends_the_connection() {
    let w = World::with_config(
        "127.0.0.86",
        "9876543286",
        &[("CI_GATEWAY__SSH__AUTH_TIMEOUT", "120s")],
    )
    .await;
    for announced in [200_000u32, 40_000] {
        let mut s = tokio::net::TcpStream::connect(w.gateway.ssh)
            .await
            .expect("connect");
        s.write_all(b"SSH-2.0-flooder\r\n").await.expect("version");
        // A clear-text packet (before key exchange) announcing `announced`
        // bytes, of which only a few follow.
        let mut packet = announced.to_be_bytes().to_vec();
        packet.extend_from_slice(&[4, 20, 0, 0, 0]);
        s.write_all(&packet).await.expect("header");
        // Closed long before the 120 s authentication deadline.
        let seen = closed_within(&mut s, Duration::from_secs(20)).await;
        assert!(seen.starts_with(b"SSH-2.0-ci-gateway"), "{seen:?}");
    }
    still_serving(&w).await;
}
