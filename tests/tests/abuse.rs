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

/// A "runner" that accepts connections and never reads from them.
async fn deaf_runner(ip: &str) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    addr
}

async fn flood(w: &World, job: &str, packet: usize, limit: usize) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/window_flood.py");
    let args = [
        script.to_string(),
        "127.0.0.1".into(),
        w.gateway.ssh.port().to_string(),
        "mallory".into(),
        w.mallory.path.display().to_string(),
        job.to_string(),
        packet.to_string(),
        limit.to_string(),
    ];
    let r = run(PYTHON, &args, None).await;
    assert_eq!(
        r.code, 0,
        "the flood script ran (python3-paramiko installed?): {r:?}"
    );
    serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {r:?}"))
}

/// A user on their own job opened a jump channel to a runner that never
/// reads and sent CHANNEL_DATA past the window: the gateway buffered it all
/// (RSS 10 -> 611 MiB in 4 s in the report). Data beyond the window, or a
/// packet beyond the advertised maximum, now ends the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_past_the_window_ends_the_connection() {
    let w = World::unregistered("127.0.0.111", "9876543111", &[]).await;
    let deaf = deaf_runner("127.0.0.112").await;
    let (status, body) = w
        .gateway
        .register(
            &w.job,
            json!({"actor": "mallory", "host": deaf.ip().to_string(), "port": deaf.port(),
                   "user": "runner", "host_keys": [w.runner.host_key_pub]}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
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
