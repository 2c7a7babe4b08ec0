//! The store case (issue 14): registrations per second, logins per second
//! and the login path's latency (p50/p95), on redb, on PostgreSQL with one
//! replica, and on PostgreSQL with two (requests alternate between them).
//! PostgreSQL is Debian's, started here with `initdb` (as the `postgres`
//! user when run as root) on 127.0.0.206, with `fsync=off` like the tests:
//! the figures are the gateway's cost, not a disk's.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    current_user, free_port, percentile, wait_listening, Proc, Report, Rig, RUNNER_IP, TOKEN,
};

const STORE_GATEWAY_IPS: [&str; 2] = ["127.0.0.207", "127.0.0.208"];
const PG_IP: &str = "127.0.0.206";

fn pg_bin(name: &str) -> anyhow::Result<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is missing: apt-get install postgresql")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    versions.sort();
    versions
        .last()
        .map(|v| v.join("bin").join(name))
        .filter(|p| p.exists())
        .with_context(|| format!("PostgreSQL's {name} is missing"))
}

fn as_postgres(program: &Path) -> Command {
    if current_user() == "root" {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A throwaway cluster; returns its server and URL.
fn start_postgres(dir: &Path) -> anyhow::Result<(Proc, String)> {
    let dir = dir.join("pg");
    std::fs::create_dir_all(&dir)?;
    if current_user() == "root" {
        let ok = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir)
            .status()?
            .success();
        anyhow::ensure!(ok, "chown {} to postgres", dir.display());
    }
    let data = dir.join("data");
    let out = as_postgres(&pg_bin("initdb")?)
        .args(["-A", "trust", "-U", "cigw", "--no-sync", "-E", "UTF8", "-D"])
        .arg(&data)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port(PG_IP)?;
    let child = as_postgres(&pg_bin("postgres")?)
        .arg("-D")
        .arg(&data)
        .args([
            "-c",
            &format!("listen_addresses={PG_IP}"),
            "-p",
            &port.to_string(),
        ])
        .args(["-c", &format!("unix_socket_directories={}", dir.display())])
        .args([
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "max_connections=100",
        ])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("server.log"))?)
        .spawn()?;
    let proc = Proc(child);
    for _ in 0..100 {
        let ready = as_postgres(&pg_bin("pg_isready")?)
            .args(["-h", PG_IP, "-p", &port.to_string(), "-U", "cigw"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ready {
            return Ok((
                proc,
                format!("postgres://cigw@{PG_IP}:{port}/postgres?sslmode=disable"),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!(
        "PostgreSQL did not start (see {})",
        dir.join("server.log").display()
    )
}

/// One replica of a setup: its process and addresses.
struct Replica {
    _proc: Proc,
    ssh: SocketAddr,
    api: SocketAddr,
}

fn start_replica(
    gateway: &Path,
    dir: &Path,
    ip: &str,
    storage: &str,
    me_pub: &str,
) -> anyhow::Result<Replica> {
    std::fs::create_dir_all(dir)?;
    let (ssh_port, api_port) = (free_port(ip)?, free_port(ip)?);
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            r#"[ssh]
listen = "{ip}:{ssh_port}"
public_host = "{ip}:{ssh_port}"
max_failed_auths_per_source = 1000000
max_failed_auths_per_user = 1000000
max_connections_per_login = 30000
[api]
listen = "{ip}:{api_port}"
requests_per_minute_per_token = 1000000
requests_per_minute_per_source = 1000000
max_connections_per_source = 10000
[github]
api_url = "http://127.0.0.1:9"
[github.static_keys]
me = ["{me_pub}"]
[registration]
tokens = ["{TOKEN}"]
ttl = "12h"
max_jobs = 100000
[storage]
data_dir = "{data}"
{storage}
"#,
            data = dir.display()
        ),
    )?;
    let child = Command::new(gateway)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("gateway.log"))?)
        .spawn()?;
    let proc = Proc(child);
    let ssh: SocketAddr = format!("{ip}:{ssh_port}").parse()?;
    let api: SocketAddr = format!("{ip}:{api_port}").parse()?;
    let log = dir.join("gateway.log");
    let started = wait_listening(api).and_then(|()| wait_listening(ssh));
    if let Err(e) = started {
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("{e}; {} says:\n{}", log.display(), tail.join("\n"));
    }
    Ok(Replica {
        _proc: proc,
        ssh,
        api,
    })
}

/// `PUT /v1/jobs/{job}`; returns the status, the body and the seconds taken.
async fn put(api: SocketAddr, job: u64, body: &str) -> anyhow::Result<(u16, Value, f64)> {
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(api).await?;
    let req = format!(
        "PUT /v1/jobs/{job} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let took = start.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let json = text
        .split("\r\n\r\n")
        .nth(1)
        .and_then(|b| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    Ok((status, json, took))
}

/// One setup's figures.
struct Figures {
    registrations_per_s: f64,
    register_ms: (f64, f64),
    login_ms: (f64, f64),
    logins_per_s: f64,
}

async fn measure(
    rig: &Rig,
    replicas: &[Replica],
    base: u64,
    quick: bool,
) -> anyhow::Result<Figures> {
    let host_key = std::fs::read_to_string(rig.dir.join("runner_host_key.pub"))?;
    let body = json!({
        "actor": "me",
        "host": RUNNER_IP,
        "port": rig.runner.1.port(),
        "user": rig.user,
        "host_keys": [host_key.trim()],
        "os": "linux",
    })
    .to_string();
    let jobs: u64 = if quick { 200 } else { 1000 };
    let next = Arc::new(AtomicU64::new(0));
    let apis: Vec<SocketAddr> = replicas.iter().map(|r| r.api).collect();
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (next, apis, body) = (next.clone(), apis.clone(), body.clone());
        workers.push(tokio::spawn(async move {
            let mut took = Vec::new();
            let mut first = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= jobs {
                    return anyhow::Ok((took, first));
                }
                let api = apis[(i as usize) % apis.len()];
                let (status, json, t) = put(api, base + i, &body).await?;
                anyhow::ensure!(status == 201, "registration {}: {status} {json}", base + i);
                took.push(t * 1000.0);
                if i == 0 {
                    first = Some(json);
                }
            }
        }));
    }
    let mut took = Vec::new();
    let mut first = None;
    for w in workers {
        let (t, f) = w.await??;
        took.extend(t);
        first = first.or(f);
    }
    let registrations_per_s = jobs as f64 / start.elapsed().as_secs_f64();
    // The runner trusts the first job's certificates.
    let lines: Vec<String> = first
        .as_ref()
        .and_then(|j| j["authorized_keys"].as_array())
        .context("authorized_keys in the registration answer")?
        .iter()
        .filter_map(|l| l.as_str().map(str::to_string))
        .collect();
    let ak = rig.dir.join("runner_authorized_keys");
    let mut text = std::fs::read_to_string(&ak)?;
    for l in lines {
        text.push_str(&l);
        text.push('\n');
    }
    std::fs::write(&ak, text)?;
    let o = rig.ssh_opts();
    let login = |r: &Replica| format!("ssh {o} -p {} {base}@{} true", r.ssh.port(), r.ssh.ip());
    let samples = if quick { 20 } else { 60 };
    let mut ms = Vec::new();
    for i in 0..=samples {
        let s = crate::run_shell_fast(&login(&replicas[i % replicas.len()]))?;
        if i > 0 {
            ms.push(s * 1000.0);
        }
    }
    // Logins per second, four at a time.
    let total = if quick { 40 } else { 120 };
    let start = Instant::now();
    let cmds: Vec<String> = (0..total)
        .map(|i| login(&replicas[i % replicas.len()]))
        .collect();
    let mut handles = Vec::new();
    for chunk in cmds.chunks(total / 4) {
        let chunk = chunk.to_vec();
        handles.push(std::thread::spawn(move || -> anyhow::Result<()> {
            for c in chunk {
                crate::run_shell_fast(&c)?;
            }
            Ok(())
        }));
    }
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("a login thread panicked"))??;
    }
    let logins_per_s = total as f64 / start.elapsed().as_secs_f64();
    Ok(Figures {
        registrations_per_s,
        register_ms: (percentile(&took, 0.5), percentile(&took, 0.95)),
        login_ms: (percentile(&ms, 0.5), percentile(&ms, 0.95)),
        logins_per_s,
    })
}

pub async fn store(
    rig: &Rig,
    gateway: &Path,
    quick: bool,
    report: &mut Report,
) -> anyhow::Result<()> {
    let me_pub = std::fs::read_to_string(rig.key.with_extension("pub"))?;
    let me_pub = me_pub.trim();
    let (_pg, url) = start_postgres(&rig.dir)?;
    let setups: [(&str, usize); 3] = [
        ("redb", 1),
        ("postgres, 1 replica", 1),
        ("postgres, 2 replicas", 2),
    ];
    let mut all = Vec::new();
    for (k, (name, count)) in setups.iter().enumerate() {
        let storage = if k == 0 {
            String::new()
        } else {
            // Each PostgreSQL setup gets its own jobs (ids differ) on one database.
            format!("backend = \"postgres\"\npostgres_url = \"{url}\"")
        };
        let mut replicas = Vec::new();
        for (n, ip) in STORE_GATEWAY_IPS.iter().enumerate().take(*count) {
            let dir = rig.dir.join(format!("store-{k}-{n}"));
            if k > 0 && (k, n) != (1, 0) {
                // Replicas on one database present the same keys: the first
                // PostgreSQL replica's (it recorded them in gateway_keys).
                std::fs::create_dir_all(&dir)?;
                for entry in std::fs::read_dir(rig.dir.join("store-1-0"))? {
                    let path = entry?.path();
                    if path
                        .file_name()
                        .and_then(|f| f.to_str())
                        .is_some_and(|f| f.ends_with("_key"))
                    {
                        std::fs::copy(&path, dir.join(path.file_name().context("name")?))?;
                    }
                }
            }
            replicas.push(start_replica(gateway, &dir, ip, &storage, me_pub)?);
        }
        let base = 9_100_000_000 + (k as u64) * 1_000_000;
        let f = measure(rig, &replicas, base, quick).await?;
        let case = format!("store: {name}");
        report.single(&case, "registrations/s", "1/s", f.registrations_per_s);
        report.single(&case, "register p50", "ms", f.register_ms.0);
        report.single(&case, "register p95", "ms", f.register_ms.1);
        report.single(&case, "login p50", "ms", f.login_ms.0);
        report.single(&case, "login p95", "ms", f.login_ms.1);
        report.single(&case, "logins/s (4 at once)", "1/s", f.logins_per_s);
        all.push(f);
        drop(replicas);
    }
    let redb = &all[0];
    for (k, f) in all.iter().enumerate().skip(1) {
        let case = format!("store: {} / redb", setups[k].0);
        report.single(
            &case,
            "registrations/s",
            "ratio",
            f.registrations_per_s / redb.registrations_per_s,
        );
        report.single(&case, "login p50", "ratio", f.login_ms.0 / redb.login_ms.0);
        report.single(&case, "login p95", "ratio", f.login_ms.1 / redb.login_ms.1);
        // The store's added latency on the login path: the same login,
        // PostgreSQL minus redb (negative is noise in redb's favour).
        report.single(
            &case,
            "login added p50",
            "ms",
            f.login_ms.0 - redb.login_ms.0,
        );
        report.single(
            &case,
            "login added p95",
            "ms",
            f.login_ms.1 - redb.login_ms.1,
        );
        report.single(
            &case,
            "logins/s",
            "ratio",
            f.logins_per_s / redb.logins_per_s,
        );
    }
    Ok(())
}
