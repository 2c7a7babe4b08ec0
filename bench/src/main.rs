//! ci-gateway against an OpenSSH `sshd` used as a jump host, side by side in
//! one run, on loopback addresses only (issue 5; docs/performance.md).
//!
//! Starts a runner `sshd` (127.0.0.201), an OpenSSH jump `sshd` (127.0.0.202),
//! the release-built gateway (127.0.0.203) and a plain TCP sink (127.0.0.204,
//! the far end of forwards and idle jump sessions); runs every case in
//! alternation (A B A B …) after a warm-up; prints a table and writes JSON
//! with medians, min/max and gateway/OpenSSH ratios.

#![forbid(unsafe_code)]

mod load;
mod procs;
mod store;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RUNNER_IP: &str = "127.0.0.201";
const JUMP_IP: &str = "127.0.0.202";
const GATEWAY_IP: &str = "127.0.0.203";
const SINK_IP: &str = "127.0.0.204";
/// A second gateway, recording every pty session (the recording case).
const RECORDING_IP: &str = "127.0.0.205";
const JOB: &str = "9000000001";
const SINK_JOB: &str = "9000000002";
/// The runner of `JOB` again, reached through its agent's reverse tunnel.
const TUNNEL_JOB: &str = "9000000003";
/// The runner of `JOB` again, registered with the recording gateway.
const RECORDED_JOB: &str = "9000000004";
/// A runner `sshd` left at OpenSSH's default `MaxStartups` (10:30:100), as
/// runners are, for the login burst case; registered as `BURST_JOB`.
const BURST_RUNNER_IP: &str = "127.0.0.209";
const BURST_JOB: &str = "9000000005";
/// Logins started at once in the burst case.
const BURST: usize = 100;
/// The bench's own sshds accept as many handshakes at once as it makes.
const STARTUPS: &str = "4000:100:8000";
const TOKEN: &str = "bench-registration-token-0123456789";
const GIB: u64 = 1 << 30;

struct Opts {
    gateway: PathBuf,
    out: PathBuf,
    quick: bool,
    /// Internal: run only the TCP sink (its own process, so that the load
    /// generator's descriptors and the sink's are counted apart).
    sink: bool,
    /// Run only these cases (memory, jump, job, forward, setup, concurrency,
    /// tunnel, store, recording, keystroke, burst).
    only: Option<Vec<String>>,
}

const HELP: &str = "ci-gateway-bench: ci-gateway against an OpenSSH jump host, side by side

usage: bench/run [--quick] [--only CASES] [--out PATH]
  --quick         smaller sizes and counts (about 3 minutes; full: about 15)
  --only CASES    comma-separated: memory,jump,job,forward,setup,concurrency,tunnel,store,recording,keystroke,burst
  --out PATH      where the JSON results go (default: bench/results.json for a
                  full run, target/bench-results.json for --quick or --only)
  --gateway PATH  the release ci-gateway binary (bench/run passes it)
Figures are ratios against OpenSSH in the same run; see docs/performance.md.";

impl Opts {
    fn runs(&self, case: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|c| c == case))
    }

    fn parse() -> anyhow::Result<Opts> {
        let mut gateway = None;
        let mut out = None;
        let mut quick = false;
        let mut sink = false;
        let mut only = None;
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--sink" => sink = true,
                "--only" => {
                    only = Some(
                        args.next()
                            .context(
                                "--only memory,jump,job,forward,setup,concurrency,tunnel,store,recording,keystroke,burst",
                            )?
                            .split(',')
                            .map(str::to_string)
                            .collect(),
                    )
                }
                "--gateway" => gateway = args.next().map(PathBuf::from),
                "--out" => out = Some(args.next().map(PathBuf::from).context("--out PATH")?),
                "--quick" => quick = true,
                "--help" | "-h" => {
                    println!("{HELP}");
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?} (see --help)"),
            }
        }
        // Only a full run replaces the committed figures; a quick or partial
        // run writes next to the build unless told otherwise.
        let out = out.unwrap_or_else(|| {
            if quick || only.is_some() {
                PathBuf::from("target/bench-results.json")
            } else {
                PathBuf::from("bench/results.json")
            }
        });
        if sink {
            return Ok(Opts {
                gateway: PathBuf::new(),
                out,
                quick,
                sink,
                only,
            });
        }
        Ok(Opts {
            gateway: gateway.context("--gateway PATH (the release ci-gateway binary)")?,
            out,
            quick,
            sink,
            only,
        })
    }
}

/// Sizes and counts of one run.
struct Plan {
    bytes: u64,
    rounds: usize,
    setup_samples: usize,
    idle_counts: Vec<usize>,
    concurrent: usize,
    hold: Duration,
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

fn free_port(ip: &str) -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind((ip, 0))?.local_addr()?.port())
}

fn wait_listening(addr: SocketAddr) -> anyhow::Result<()> {
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nothing listens on {addr}")
}

fn keygen(path: &Path) -> anyhow::Result<String> {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f"])
        .arg(path)
        .status()
        .context("ssh-keygen (install openssh-client)")?
        .success();
    anyhow::ensure!(ok, "ssh-keygen failed");
    Ok(std::fs::read_to_string(path.with_extension("pub"))?
        .trim()
        .to_string())
}

fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn sshd(
    dir: &Path,
    name: &str,
    ip: &str,
    authorized_keys: &Path,
    max_startups: Option<&str>,
) -> anyhow::Result<(Proc, SocketAddr)> {
    let sshd = ["/usr/sbin/sshd", "/usr/local/sbin/sshd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("sshd is missing: install openssh-server")?;
    let host_key = dir.join(format!("{name}_host_key"));
    keygen(&host_key)?;
    let port = free_port(ip)?;
    let config = dir.join(format!("{name}_sshd_config"));
    std::fs::write(
        &config,
        format!(
            "ListenAddress {ip}:{port}\nHostKey {hk}\nAuthorizedKeysFile {ak}\nPidFile {pid}\n\
             StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\nAllowTcpForwarding yes\nLogLevel ERROR\n\
             {startups}MaxSessions 10\nUseDNS no\n",
            startups = max_startups
                .map(|m| format!("MaxStartups {m}\n"))
                .unwrap_or_default(),
            hk = host_key.display(),
            ak = authorized_keys.display(),
            pid = dir.join(format!("{name}.pid")).display(),
        ),
    )?;
    let child = Command::new(sshd)
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log")))?)
        .spawn()?;
    let addr: SocketAddr = format!("{ip}:{port}").parse()?;
    let proc = Proc(child);
    wait_listening(addr)?;
    Ok((proc, addr))
}

/// Everything running for one benchmark.
struct Rig {
    dir: PathBuf,
    key: PathBuf,
    user: String,
    runner: (Proc, SocketAddr),
    jump: (Proc, SocketAddr),
    gateway: Proc,
    gw_ssh: SocketAddr,
    sink: SocketAddr,
    _sink: Proc,
    /// The agent process holding `TUNNEL_JOB`'s tunnel.
    tunnel_agent: u32,
    /// The recording gateway (the recording case only) and its SSH address.
    recorder: Option<(Proc, SocketAddr)>,
    /// The default-`MaxStartups` runner (the burst case only).
    burst_runner: Option<(Proc, SocketAddr)>,
}

impl Rig {
    async fn start(opts: &Opts) -> anyhow::Result<Rig> {
        let dir = std::env::temp_dir().join(format!("cigw-bench-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir)?;
        let user = current_user();
        let key = dir.join("me");
        let me_pub = keygen(&key)?;
        // The runner trusts what the agent installs; the jump host trusts me.
        let runner_ak = dir.join("runner_authorized_keys");
        std::fs::write(&runner_ak, "")?;
        let jump_ak = dir.join("jump_authorized_keys");
        std::fs::write(&jump_ak, format!("{me_pub}\n"))?;
        let runner = sshd(&dir, "runner", RUNNER_IP, &runner_ak, Some(STARTUPS))?;
        let jump = sshd(&dir, "jump", JUMP_IP, &jump_ak, Some(STARTUPS))?;
        let (sink_proc, sink) = spawn_sink()?;

        let ssh_port = free_port(GATEWAY_IP)?;
        let api_port = free_port(GATEWAY_IP)?;
        let config = dir.join("gateway.toml");
        std::fs::write(
            &config,
            format!(
                r#"[ssh]
listen = "{GATEWAY_IP}:{ssh_port}"
public_host = "{GATEWAY_IP}:{ssh_port}"
max_connections = 30000
max_connections_per_source = 30000
# One login holds every session here: the per-login caps (32 connections,
# 256 channels by default) are a policy for people, not a capacity limit.
max_connections_per_login = 30000
max_channels_per_login = 60000
max_failed_auths_per_source = 1000000
max_failed_auths_per_user = 1000000
auth_timeout = "120s"
[api]
listen = "{GATEWAY_IP}:{api_port}"
[github]
api_url = "http://127.0.0.1:9"
[github.static_keys]
me = ["{me_pub}"]
[registration]
tokens = ["{TOKEN}"]
ttl = "12h"
[hold]
max = "12h"
[upstream]
connect_timeout = "120s"
[storage]
data_dir = "{data}"
"#,
                data = dir.join("gateway-data").display()
            ),
        )?;
        let gateway = serve(opts, &config, &dir.join("gateway.log"))?;
        let gw_ssh: SocketAddr = format!("{GATEWAY_IP}:{ssh_port}").parse()?;
        wait_listening(gw_ssh)?;
        wait_listening(format!("{GATEWAY_IP}:{api_port}").parse()?)?;
        // Register both jobs the way a runner does: with the agent.
        let host_pub = dir.join("runner_host_key.pub");
        for (job, host, port, ak) in [
            (JOB, RUNNER_IP, runner.1.port(), runner_ak.clone()),
            (
                SINK_JOB,
                SINK_IP,
                sink.port(),
                dir.join("sink_authorized_keys"),
            ),
        ] {
            let api = format!("http://{GATEWAY_IP}:{api_port}");
            register(opts, &api, job, (&user, host, port), (&host_pub, &ak), &dir)?;
        }
        // The same runner once more, through a reverse tunnel its agent
        // holds (the agent dials the sshd's own address on this machine).
        let out = Command::new(&opts.gateway)
            .args(["runner", "register", "--no-refresh", "--actor", "me"])
            .args(["--gateway", &format!("http://{GATEWAY_IP}:{api_port}")])
            .args(["--job-id", TUNNEL_JOB, "--user", &user, "--tunnel"])
            .args(["--tunnel-host", RUNNER_IP])
            .args(["--port", &runner.1.port().to_string()])
            .arg("--host-key")
            .arg(&host_pub)
            .arg("--authorized-keys")
            .arg(&runner_ak)
            .arg("--state-dir")
            .arg(&dir)
            .env("CI_GATEWAY_TOKEN", TOKEN)
            .output()?;
        let printed = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            out.status.success(),
            "registering job {TUNNEL_JOB} with --tunnel: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tunnel_agent = printed
            .lines()
            .find(|l| l.contains("holding the tunnel"))
            .and_then(|l| l.split("(pid ").nth(1)?.split(',').next()?.parse().ok())
            .context("the tunnel agent's pid in register's output")?;
        // The recording case: the same config on another address, with
        // every pty session recorded, and the runner registered again (the
        // agent adds this gateway's CA to the runner's keys).
        let recorder = if opts.runs("recording") {
            let (ssh2, api2) = (free_port(RECORDING_IP)?, free_port(RECORDING_IP)?);
            let text = std::fs::read_to_string(&config)?
                .replace(
                    &format!("{GATEWAY_IP}:{ssh_port}"),
                    &format!("{RECORDING_IP}:{ssh2}"),
                )
                .replace(
                    &format!("{GATEWAY_IP}:{api_port}"),
                    &format!("{RECORDING_IP}:{api2}"),
                )
                .replace("gateway-data", "recording-data");
            let config2 = dir.join("recording.toml");
            std::fs::write(
                &config2,
                format!(
                    "{text}[recording]\nenabled = true\ndir = \"{}\"\n",
                    dir.join("recordings").display()
                ),
            )?;
            let proc = serve(opts, &config2, &dir.join("recording.log"))?;
            let addr: SocketAddr = format!("{RECORDING_IP}:{ssh2}").parse()?;
            wait_listening(addr)?;
            wait_listening(format!("{RECORDING_IP}:{api2}").parse()?)?;
            let api = format!("http://{RECORDING_IP}:{api2}");
            let who = (user.as_str(), RUNNER_IP, runner.1.port());
            register(opts, &api, RECORDED_JOB, who, (&host_pub, &runner_ak), &dir)?;
            Some((proc, addr))
        } else {
            None
        };
        let burst_runner = if opts.runs("burst") {
            let r = sshd(&dir, "burst_runner", BURST_RUNNER_IP, &runner_ak, None)?;
            let api = format!("http://{GATEWAY_IP}:{api_port}");
            let host_pub = dir.join("burst_runner_host_key.pub");
            let at = (user.as_str(), BURST_RUNNER_IP, r.1.port());
            register(opts, &api, BURST_JOB, at, (&host_pub, &runner_ak), &dir)?;
            Some(r)
        } else {
            None
        };
        Ok(Rig {
            dir,
            key,
            user,
            runner,
            jump,
            gateway,
            gw_ssh,
            sink,
            _sink: sink_proc,
            tunnel_agent,
            recorder,
            burst_runner,
        })
    }

    fn ssh_opts(&self) -> String {
        format!(
            "-F /dev/null -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
             -o BatchMode=yes -o IdentitiesOnly=yes -o IdentityAgent=none -o LogLevel=ERROR \
             -o Compression=no -i {}",
            self.key.display()
        )
    }

    /// `ssh` options and destination for each way of reaching the runner.
    fn route(&self, route: Route, extra: &str) -> String {
        let o = self.ssh_opts();
        let (runner, gw, jump) = (self.runner.1, self.gw_ssh, self.jump.1);
        let user = &self.user;
        match route {
            Route::GatewayJob => format!("ssh {o} {extra} -p {} {JOB}@{}", gw.port(), gw.ip()),
            Route::RecordedJob => {
                let at = self.recorder.as_ref().map(|r| r.1).unwrap_or(gw);
                format!("ssh {o} {extra} -p {} {RECORDED_JOB}@{}", at.port(), at.ip())
            }
            Route::GatewayJump => format!(
                "ssh {o} {extra} -o ProxyCommand='ssh {o} {extra} -p {} -W %h:%p me@{}' -p 22 {user}@job-{JOB}",
                gw.port(),
                gw.ip()
            ),
            Route::TunnelJob => {
                format!("ssh {o} {extra} -p {} {TUNNEL_JOB}@{}", gw.port(), gw.ip())
            }
            Route::TunnelJump => format!(
                "ssh {o} {extra} -o ProxyCommand='ssh {o} {extra} -p {} -W %h:%p me@{}' -p 22 {user}@job-{TUNNEL_JOB}",
                gw.port(),
                gw.ip()
            ),
            Route::OpensshJump => format!(
                "ssh {o} {extra} -o ProxyCommand='ssh {o} {extra} -p {} -W %h:%p {user}@{}' -p {} {user}@{}",
                jump.port(),
                jump.ip(),
                runner.port(),
                runner.ip()
            ),
        }
    }

    /// CPU seconds so far of the relay under test for `route`.
    fn relay_cpu(&self, route: Route) -> f64 {
        match route {
            Route::GatewayJob | Route::GatewayJump => procs::cpu_seconds(self.gateway.pid(), false),
            Route::RecordedJob => self
                .recorder
                .as_ref()
                .map(|r| procs::cpu_seconds(r.0.pid(), false))
                .unwrap_or(0.0),
            // Both ends of the tunnel relay: the gateway and the agent.
            Route::TunnelJob | Route::TunnelJump => {
                procs::cpu_seconds(self.gateway.pid(), false)
                    + procs::cpu_seconds(self.tunnel_agent, false)
            }
            // The listener reaps its per-connection processes: their CPU
            // lands in its cutime/cstime.
            Route::OpensshJump => procs::cpu_seconds(self.jump.0.pid(), true),
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if std::env::var_os("CIGW_BENCH_KEEP").is_some() {
            eprintln!("kept {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Route {
    GatewayJob,
    /// Job mode through the gateway that records pty sessions.
    RecordedJob,
    GatewayJump,
    TunnelJob,
    TunnelJump,
    OpensshJump,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::GatewayJob => "gateway job mode",
            Route::RecordedJob => "gateway job mode, recorded",
            Route::GatewayJump => "gateway jump (-J)",
            Route::TunnelJob => "gateway job mode, tunnel",
            Route::TunnelJump => "gateway jump (-J), tunnel",
            Route::OpensshJump => "OpenSSH jump (-J)",
        }
    }
}

/// `ci-gateway serve --config config`, its log in `log`.
fn serve(opts: &Opts, config: &Path, log: &Path) -> anyhow::Result<Proc> {
    let child = Command::new(&opts.gateway)
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .with_context(|| format!("starting {}", opts.gateway.display()))?;
    Ok(Proc(child))
}

/// Registers `job` with the gateway at `api` the way a runner does: with
/// the agent.
fn register(
    opts: &Opts,
    api: &str,
    job: &str,
    (user, host, port): (&str, &str, u16),
    (host_pub, ak): (&Path, &Path),
    dir: &Path,
) -> anyhow::Result<()> {
    let out = Command::new(&opts.gateway)
        .args(["runner", "register", "--no-refresh", "--actor", "me"])
        .args(["--gateway", api])
        .args(["--job-id", job, "--user", user, "--host", host])
        .args(["--port", &port.to_string()])
        .arg("--host-key")
        .arg(host_pub)
        .arg("--authorized-keys")
        .arg(ak)
        .arg("--state-dir")
        .arg(dir)
        .env("CI_GATEWAY_TOKEN", TOKEN)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "registering job {job}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Starts this binary as the sink; it prints its port.
fn spawn_sink() -> anyhow::Result<(Proc, SocketAddr)> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--sink")
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    let stdout = child.stdout.take().context("sink stdout")?;
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
    let addr: SocketAddr = line.trim().parse().context("sink address")?;
    Ok((Proc(child), addr))
}

/// The TCP far end: a connection's first byte says what to do. `U`: read
/// until EOF or the announced size, then answer one byte. `D` + 8-byte size:
/// send that many bytes and close. Anything else: hold the connection open
/// (idle jump sessions).
async fn start_sink() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind((SINK_IP, 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut op = [0u8; 9];
                if s.read_exact(&mut op).await.is_err() {
                    return;
                }
                let n = u64::from_be_bytes(op[1..9].try_into().unwrap_or_default());
                let mut buf = vec![0u8; 256 * 1024];
                match op[0] {
                    b'U' => {
                        let mut got = 0u64;
                        while got < n {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => got += k as u64,
                            }
                        }
                        let _ = s.write_all(b"k").await;
                    }
                    b'D' => {
                        let mut left = n;
                        while left > 0 {
                            let k = left.min(buf.len() as u64) as usize;
                            if s.write_all(&buf[..k]).await.is_err() {
                                return;
                            }
                            left -= k as u64;
                        }
                        let _ = s.shutdown().await;
                    }
                    _ => {
                        // Idle: wait for the other side to close.
                        let _ = s.read(&mut buf).await;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// One timed run: wall seconds, the relay's CPU seconds, the client side's
/// (the shell and its `ssh` processes) and the whole machine's.
#[derive(Clone, Copy, Debug)]
struct Sample {
    wall: f64,
    cpu: f64,
    client: f64,
    machine: f64,
}

fn run_shell(rig: &Rig, route: Route, script: &str) -> anyhow::Result<Sample> {
    let cpu0 = rig.relay_cpu(route);
    let (client0, machine0) = (
        procs::reaped_children_seconds(),
        procs::machine_busy_seconds(),
    );
    let start = Instant::now();
    let out = Command::new("sh").arg("-c").arg(script).output()?;
    let wall = start.elapsed().as_secs_f64();
    let client = procs::reaped_children_seconds() - client0;
    let machine = procs::machine_busy_seconds() - machine0;
    anyhow::ensure!(
        out.status.success(),
        "{} failed: {}",
        route.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    // Let the relay's per-connection processes exit and be reaped.
    std::thread::sleep(Duration::from_millis(300));
    Ok(Sample {
        wall,
        cpu: rig.relay_cpu(route) - cpu0,
        client,
        machine,
    })
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    let m = s.len() / 2;
    if s.len().is_multiple_of(2) {
        (s[m - 1] + s[m]) / 2.0
    } else {
        s[m]
    }
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    let i = ((s.len() as f64 - 1.0) * p).round() as usize;
    s[i]
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(*x), hi.max(*x))
        })
}

/// The report, built as the cases run.
#[derive(Default)]
struct Report {
    rows: Vec<Value>,
}

impl Report {
    /// A comparison: `higher_is_better` says which way the ratio reads.
    fn compare(
        &mut self,
        case: &str,
        metric: &str,
        unit: &str,
        gw: &[f64],
        ssh: &[f64],
        higher_is_better: bool,
    ) {
        let (gm, sm) = (median(gw), median(ssh));
        let ratio = gm / sm;
        let (gmin, gmax) = min_max(gw);
        let (smin, smax) = min_max(ssh);
        println!(
            "{case:<46} {metric:<16} {gm:>10.2} {sm:>10.2} {unit:<8} ratio {ratio:>5.2} {}",
            if higher_is_better {
                "(higher is better)"
            } else {
                "(lower is better)"
            }
        );
        self.rows.push(json!({
            "case": case, "metric": metric, "unit": unit,
            "gateway": {"median": gm, "min": gmin, "max": gmax, "samples": gw},
            "openssh": {"median": sm, "min": smin, "max": smax, "samples": ssh},
            "ratio_gateway_over_openssh": ratio,
            "higher_is_better": higher_is_better,
        }));
    }

    fn single(&mut self, case: &str, metric: &str, unit: &str, value: f64) {
        println!("{case:<46} {metric:<16} {value:>10.2} {:>10} {unit}", "");
        self.rows
            .push(json!({"case": case, "metric": metric, "unit": unit, "gateway": value}));
    }
}

/// One side-by-side case: route `a` against route `b`, with `extra` ssh
/// options.
struct Comparison {
    case: String,
    a: Route,
    b: Route,
    extra: String,
}

/// Throughput through `a` vs `b` for `script` (given the route's ssh
/// command), alternating, after a warm-up of each.
fn throughput(
    rig: &Rig,
    plan: &Plan,
    report: &mut Report,
    c: &Comparison,
    script: &dyn Fn(&str) -> String,
) -> anyhow::Result<()> {
    let (case, a, b, extra) = (c.case.as_str(), c.a, c.b, c.extra.as_str());
    let mb = plan.bytes as f64 / 1e6;
    let gib = plan.bytes as f64 / GIB as f64;
    let cmd = |r: Route| script(&rig.route(r, extra));
    run_shell(rig, a, &cmd(a))?;
    run_shell(rig, b, &cmd(b))?;
    let (mut wa, mut wb, mut ca, mut cb) = (vec![], vec![], vec![], vec![]);
    let (mut ua, mut ub, mut xa, mut xb) = (vec![], vec![], vec![], vec![]);
    for _ in 0..plan.rounds {
        let s = run_shell(rig, a, &cmd(a))?;
        wa.push(mb / s.wall);
        ca.push(s.cpu / gib);
        ua.push(s.client / gib);
        xa.push(s.machine / gib);
        let s = run_shell(rig, b, &cmd(b))?;
        wb.push(mb / s.wall);
        cb.push(s.cpu / gib);
        ub.push(s.client / gib);
        xb.push(s.machine / gib);
    }
    report.compare(case, "throughput", "MB/s", &wa, &wb, true);
    report.compare(case, "relay CPU", "s/GiB", &ca, &cb, false);
    // What the rest of the route costs: the client's `ssh` processes (which
    // differ by route only through what the relay does to them: window
    // updates, packet sizes), and every process on the machine, runner
    // included (busy seconds over all cores; docs/performance.md).
    report.compare(case, "client CPU", "s/GiB", &ua, &ub, false);
    report.compare(case, "machine CPU", "s/GiB", &xa, &xb, false);
    Ok(())
}

/// Pushes or pulls `bytes` through a local forward on `port`.
async fn through_forward(port: u16, upload: bool, bytes: u64) -> anyhow::Result<()> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut op = [0u8; 9];
    op[0] = if upload { b'U' } else { b'D' };
    op[1..].copy_from_slice(&bytes.to_be_bytes());
    s.write_all(&op).await?;
    let mut buf = vec![0u8; 256 * 1024];
    if upload {
        let mut left = bytes;
        while left > 0 {
            let k = left.min(buf.len() as u64) as usize;
            s.write_all(&buf[..k]).await?;
            left -= k as u64;
        }
        let mut ack = [0u8; 1];
        s.read_exact(&mut ack).await?;
    } else {
        let mut got = 0u64;
        while got < bytes {
            match s.read(&mut buf).await? {
                0 => bail!("the forward closed after {got} bytes"),
                k => got += k as u64,
            }
        }
    }
    Ok(())
}

async fn forwards(rig: &Rig, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let mut tunnels = Vec::new();
    let mut ports = Vec::new();
    for route in [Route::GatewayJob, Route::OpensshJump] {
        let port = free_port("127.0.0.1")?;
        let spec = format!("-N -L 127.0.0.1:{port}:{}:{}", SINK_IP, rig.sink.port());
        let cmd = rig.route(route, &spec);
        tunnels.push(Proc(
            Command::new("sh")
                .arg("-c")
                .arg(format!("exec {cmd}"))
                .spawn()?,
        ));
        ports.push(port);
    }
    for p in &ports {
        wait_listening(format!("127.0.0.1:{p}").parse()?)?;
    }
    let routes = [Route::GatewayJob, Route::OpensshJump];
    let mb = plan.bytes as f64 / 1e6;
    let gib = plan.bytes as f64 / GIB as f64;
    for upload in [true, false] {
        let mut wall: [Vec<f64>; 2] = [vec![], vec![]];
        let mut cpu: [Vec<f64>; 2] = [vec![], vec![]];
        for round in 0..=plan.rounds {
            for (i, route) in routes.iter().enumerate() {
                let c0 = rig.relay_cpu(*route);
                let t = Instant::now();
                through_forward(ports[i], upload, plan.bytes).await?;
                let w = t.elapsed().as_secs_f64();
                tokio::time::sleep(Duration::from_millis(200)).await;
                if round > 0 {
                    wall[i].push(mb / w);
                    cpu[i].push((rig.relay_cpu(*route) - c0) / gib);
                }
            }
        }
        let case = format!(
            "forward -L {} (job mode vs OpenSSH -J)",
            if upload { "upload" } else { "download" }
        );
        report.compare(&case, "throughput", "MB/s", &wall[0], &wall[1], true);
        // OpenSSH's per-connection process exits only with the tunnel, so
        // its CPU is read at the end; the gateway's is exact per run.
        report.single(&case, "gateway CPU", "s/GiB", median(&cpu[0]));
    }
    let ssh_cpu0 = rig.relay_cpu(Route::OpensshJump);
    drop(tunnels);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total = 2.0 * (plan.rounds + 1) as f64 * gib;
    report.single(
        "forward -L (both directions, all runs)",
        "OpenSSH CPU",
        "s/GiB",
        (rig.relay_cpu(Route::OpensshJump) - ssh_cpu0) / total,
    );
    Ok(())
}

fn setup_latency(rig: &Rig, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    for (label, kex) in [
        ("curve25519-sha256", "-o KexAlgorithms=curve25519-sha256"),
        ("each side's default kex", ""),
    ] {
        let routes = [Route::GatewayJob, Route::GatewayJump, Route::OpensshJump];
        let mut t: [Vec<f64>; 3] = [vec![], vec![], vec![]];
        for i in 0..=plan.setup_samples {
            for (k, r) in routes.iter().enumerate() {
                let cmd = format!("{} true", rig.route(*r, kex));
                let s = run_shell_fast(&cmd)?;
                if i > 0 {
                    t[k].push(s * 1000.0);
                }
            }
        }
        for (k, name) in [
            (0, "ssh <job>@gateway true"),
            (1, "ssh -J gateway runner true"),
        ] {
            let case = format!("setup: {name} vs ssh -J openssh ({label})");
            let (g, o) = (&t[k], &t[2]);
            for (metric, q) in [("p50", 0.5), ("p95", 0.95)] {
                report.compare(
                    &case,
                    metric,
                    "ms",
                    &[percentile(g, q)],
                    &[percentile(o, q)],
                    false,
                );
            }
        }
    }
    Ok(())
}

fn run_shell_fast(cmd: &str) -> anyhow::Result<f64> {
    let start = Instant::now();
    let out = Command::new("sh").arg("-c").arg(cmd).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(start.elapsed().as_secs_f64())
}

async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

async fn memory(rig: &Rig, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let key = Arc::new(russh::keys::load_secret_key(&rig.key, None)?);
    let gw = rig.gateway.pid();
    settle().await;
    let idle = procs::rss_kib(gw);
    report.single("memory: gateway, no sessions", "RSS", "KiB", idle as f64);
    let jump_kind = load::Kind::Forward {
        host: format!("job-{SINK_JOB}"),
        port: 22,
    };
    for n in &plan.idle_counts {
        for (mode, user, kind) in [
            ("jump", "me", jump_kind.clone()),
            ("job", JOB, load::Kind::Session),
        ] {
            let before = procs::rss_kib(gw);
            let (open, failed) = load::open_many(*n, 64, rig.gw_ssh, user, key.clone(), kind).await;
            settle().await;
            let after = procs::rss_kib(gw);
            let per = (after.saturating_sub(before)) as f64 / (*n as f64);
            report.single(
                &format!("memory: gateway, {n} idle {mode}-mode sessions ({failed} failed)"),
                "KiB/session",
                "KiB",
                per,
            );
            load::close_all(open).await;
            settle().await;
        }
    }
    // OpenSSH at 100 idle -W sessions, by PSS over its process tree.
    let n = 100;
    let master = rig.jump.0.pid();
    let before = procs::pss_tree_kib(master);
    let kind = load::Kind::Forward {
        host: SINK_IP.to_string(),
        port: rig.sink.port() as u32,
    };
    let (open, failed) = load::open_many(n, 16, rig.jump.1, &rig.user, key.clone(), kind).await;
    settle().await;
    let after = procs::pss_tree_kib(master);
    let processes = procs::tree(master).len();
    report.single(
        &format!(
            "memory: OpenSSH jump, {n} idle -W sessions ({failed} failed, {processes} processes)"
        ),
        "KiB/session",
        "KiB",
        (after.saturating_sub(before)) as f64 / n as f64,
    );
    load::close_all(open).await;
    settle().await;
    Ok(())
}

async fn concurrency(rig: &Rig, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let key = Arc::new(russh::keys::load_secret_key(&rig.key, None)?);
    let gw = rig.gateway.pid();
    // Each jump session holds two descriptors in the gateway (the user's
    // connection and the runner's). The gateway takes at most half of what
    // its limit leaves after a headroom of 256 for each (`limits::
    // descriptor_share`), and holds the rest in its listen queue: stay under
    // that, or the sessions past it wait there until they time out.
    let limit = fd_limit();
    let n = plan.concurrent.min(limit.saturating_sub(300) / 2);
    if n < plan.concurrent {
        println!(
            "  (open files are limited to {limit} here: {n} sessions instead of {})",
            plan.concurrent
        );
    }
    settle().await;
    let idle = procs::rss_kib(gw);
    let kind = load::Kind::Forward {
        host: format!("job-{SINK_JOB}"),
        port: 22,
    };
    // A first round opens and closes the same number of sessions: what the
    // allocator keeps from it is reused by the measured round, so growth
    // after the measured round would be a leak, not allocator retention.
    let (warm, _) = load::open_many(n, 128, rig.gw_ssh, "me", key.clone(), kind.clone()).await;
    load::close_all(warm).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after_first = procs::rss_kib(gw);
    let start = Instant::now();
    let (open, failed) = load::open_many(n, 128, rig.gw_ssh, "me", key, kind).await;
    let opened_in = start.elapsed().as_secs_f64();
    let peak = Arc::new(AtomicU64::new(procs::rss_kib(gw)));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(procs::rss_kib(gw), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    tokio::time::sleep(plan.hold).await;
    // Still open after the hold: every channel answers a window probe by
    // not being closed.
    let still_open = open.iter().filter(|s| !s.handle.is_closed()).count();
    sampler.abort();
    let peak = peak.load(Ordering::Relaxed);
    load::close_all(open).await;
    // The gateway gives freed memory back within a few seconds of a large
    // drop in connections (it checks every 2 s; ssh/server.rs).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = procs::rss_kib(gw);
    let fds_after = procs::open_fds(gw);
    let case = format!(
        "concurrency: {n} jump sessions held {}s",
        plan.hold.as_secs()
    );
    report.single(&case, "failed to open", "sessions", failed as f64);
    report.single(
        &case,
        "dropped in hold",
        "sessions",
        (n - failed - still_open) as f64,
    );
    report.single(&case, "open time", "s", opened_in);
    report.single(&case, "RSS idle", "KiB", idle as f64);
    report.single(&case, "RSS after a first round", "KiB", after_first as f64);
    report.single(&case, "RSS peak", "KiB", peak as f64);
    report.single(&case, "RSS after close", "KiB", after as f64);
    report.single(&case, "fds after close", "fds", fds_after as f64);
    Ok(())
}

/// The reverse tunnel against the same runner dialed directly: throughput
/// both ways in both modes, and setup time (the "openssh" column is the
/// direct route here).
fn tunnel(rig: &Rig, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let n = plan.bytes;
    let up = move |ssh: &str| format!("head -c {n} /dev/zero | {ssh} 'cat > /dev/null'");
    let down = move |ssh: &str| format!("{ssh} 'head -c {n} /dev/zero' > /dev/null");
    for (mode, a, b) in [
        ("job mode", Route::TunnelJob, Route::GatewayJob),
        ("jump", Route::TunnelJump, Route::GatewayJump),
    ] {
        for (dir, script) in [
            ("upload", &up as &dyn Fn(&str) -> String),
            ("download", &down),
        ] {
            let c = Comparison {
                case: format!("tunnel {mode} {dir} vs direct (aes128-gcm)"),
                a,
                b,
                extra: "-c aes128-gcm@openssh.com".into(),
            };
            throughput(rig, plan, report, &c, script)?;
        }
        let mut t: [Vec<f64>; 2] = [vec![], vec![]];
        for i in 0..=plan.setup_samples {
            for (k, r) in [a, b].iter().enumerate() {
                let s = run_shell_fast(&format!("{} true", rig.route(*r, "")))?;
                if i > 0 {
                    t[k].push(s * 1000.0);
                }
            }
        }
        let case = format!("setup: tunnel {mode} vs direct");
        for (metric, q) in [("p50", 0.5), ("p95", 0.95)] {
            report.compare(
                &case,
                metric,
                "ms",
                &[percentile(&t[0], q)],
                &[percentile(&t[1], q)],
                false,
            );
        }
    }
    Ok(())
}

/// What recording costs a pty session: terminal output (base64 text, as a
/// build log is) through job mode with `ssh -tt`, on the recording gateway
/// and on the plain one, alternating; the recordings are deleted between
/// rounds (outside the timing) so the disk does not fill.
fn recording(rig: &Rig, plan: &Plan, report: &mut Report) -> anyhow::Result<()> {
    let n = plan.bytes / 4;
    let mb = n as f64 / 1e6;
    let gib = n as f64 / GIB as f64;
    let dir = rig.dir.join("recordings");
    let cmd = |r: Route| {
        format!(
            "{} -tt 'base64 /dev/zero | head -c {n}' > /dev/null",
            rig.route(r, "-c aes128-gcm@openssh.com")
        )
    };
    let clear = || {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    };
    let (a, b) = (Route::RecordedJob, Route::GatewayJob);
    run_shell(rig, a, &cmd(a))?;
    let recorded: u64 = std::fs::read_dir(&dir)
        .context("the recording gateway wrote no recording")?
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    anyhow::ensure!(
        recorded > n,
        "the recording ({recorded} bytes) is short of the output"
    );
    clear();
    run_shell(rig, b, &cmd(b))?;
    let (mut wa, mut wb, mut ca, mut cb) = (vec![], vec![], vec![], vec![]);
    for _ in 0..plan.rounds {
        let s = run_shell(rig, a, &cmd(a))?;
        clear();
        wa.push(mb / s.wall);
        ca.push(s.cpu / gib);
        let s = run_shell(rig, b, &cmd(b))?;
        wb.push(mb / s.wall);
        cb.push(s.cpu / gib);
    }
    let case = "pty output recorded vs not (job mode, -tt)";
    report.compare(case, "throughput", "MB/s", &wa, &wb, true);
    report.compare(case, "relay CPU", "s/GiB", &ca, &cb, false);
    Ok(())
}

/// Round trips timed per keystroke (after `KEYSTROKE_WARMUP` untimed ones).
const KEYSTROKES: usize = 1000;
const KEYSTROKE_WARMUP: usize = 50;

/// Keystroke latency: one byte written to `ssh -tt` and its echo read back,
/// one at a time, through each route and a direct connection to the runner
/// (the floor). The runner side is `stty raw -echo; cat` in a pty, so each
/// byte goes through the runner's terminal as a typed key does and the echo
/// is cat's; the bench's end is a pipe (no local terminal in the timing).
/// All four sessions stay open and take turns key by key, so a noisy moment
/// lands on each of them alike.
fn keystrokes(rig: &Rig, report: &mut Report) -> anyhow::Result<()> {
    use std::io::Read as _;
    struct Typist {
        child: Child,
        w: std::process::ChildStdin,
        r: std::process::ChildStdout,
        rtt: Vec<f64>,
    }
    let open = |ssh: String| -> anyhow::Result<Typist> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("exec {ssh} 'stty raw -echo; echo ready; exec cat'"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let w = child.stdin.take().context("stdin")?;
        let mut r = child.stdout.take().context("stdout")?;
        // The shell's line comes once the pty is raw; keys typed before it
        // would be echoed by the line discipline instead.
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            r.read_exact(&mut byte)
                .with_context(|| format!("{ssh}: the session closed before it was ready"))?;
        }
        Ok(Typist {
            child,
            w,
            r,
            rtt: Vec::with_capacity(KEYSTROKES),
        })
    };
    let extra = "-tt -c aes128-gcm@openssh.com";
    let direct = format!(
        "ssh {} {extra} -p {} {}@{}",
        rig.ssh_opts(),
        rig.runner.1.port(),
        rig.user,
        rig.runner.1.ip()
    );
    let mut typists = [
        open(direct)?,
        open(rig.route(Route::OpensshJump, extra))?,
        open(rig.route(Route::GatewayJob, extra))?,
        open(rig.route(Route::GatewayJump, extra))?,
    ];
    // A route that stops echoing must not hang the bench: past the
    // deadline the sessions are killed and the read below fails.
    let pids: Vec<String> = typists.iter().map(|t| t.child.id().to_string()).collect();
    let (done, deadline) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if deadline.recv_timeout(Duration::from_secs(120)).is_err() {
            let _ = Command::new("kill").args(&pids).status();
        }
    });
    let mut byte = [0u8; 1];
    for i in 0..KEYSTROKE_WARMUP + KEYSTROKES {
        let key = b'a' + (i % 26) as u8;
        for t in typists.iter_mut() {
            let start = Instant::now();
            t.w.write_all(&[key])?;
            t.r.read_exact(&mut byte)?;
            let took = start.elapsed();
            anyhow::ensure!(byte[0] == key, "echo {:?} for key {:?}", byte[0], key);
            if i >= KEYSTROKE_WARMUP {
                t.rtt.push(took.as_secs_f64() * 1e6);
            }
        }
    }
    let _ = done.send(());
    let _ = watchdog.join();
    for t in typists.iter_mut() {
        let _ = t.child.kill();
        let _ = t.child.wait();
    }
    let openssh = &typists[1].rtt;
    for (t, route) in typists[2..]
        .iter()
        .zip([Route::GatewayJob, Route::GatewayJump])
    {
        let case = format!("keystroke {} vs OpenSSH -J", route.name());
        for (metric, p) in [("round trip p50", 0.5), ("round trip p99", 0.99)] {
            report.compare(
                &case,
                metric,
                "us",
                &[percentile(&t.rtt, p)],
                &[percentile(openssh, p)],
                false,
            );
        }
    }
    let case = "keystroke direct to the runner";
    report.single(
        case,
        "round trip p50",
        "us",
        percentile(&typists[0].rtt, 0.5),
    );
    report.single(
        case,
        "round trip p99",
        "us",
        percentile(&typists[0].rtt, 0.99),
    );
    Ok(())
}

/// Login bursts: `BURST` logins started at once against a runner at
/// OpenSSH's default `MaxStartups` (10:30:100: past 10 handshakes in progress
/// it drops new connections at random, all of them past 100), through job
/// mode and through OpenSSH's ProxyJump. Reports how many succeeded and the
/// p50/p95 of those that did, each login timed from the burst's start.
fn burst(rig: &Rig, report: &mut Report) -> anyhow::Result<()> {
    let runner = rig.burst_runner.as_ref().context("the burst runner")?.1;
    let o = rig.ssh_opts();
    let gw = format!(
        "ssh {o} -p {} {BURST_JOB}@{} true",
        rig.gw_ssh.port(),
        rig.gw_ssh.ip()
    );
    let openssh = format!(
        "ssh {o} -o ProxyCommand='ssh {o} -p {} -W %h:%p {u}@{}' -p {} {u}@{} true",
        rig.jump.1.port(),
        rig.jump.1.ip(),
        runner.port(),
        runner.ip(),
        u = rig.user
    );
    // The times of the logins that succeeded.
    let run = |cmd: &str| -> Vec<f64> {
        let start = Instant::now();
        let times: Vec<Option<f64>> = std::thread::scope(|s| {
            let all: Vec<_> = (0..BURST)
                .map(|_| {
                    s.spawn(|| {
                        let ok = Command::new("sh")
                            .arg("-c")
                            .arg(cmd)
                            .stdin(Stdio::null())
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .status()
                            .is_ok_and(|st| st.success());
                        ok.then(|| start.elapsed().as_secs_f64() * 1000.0)
                    })
                })
                .collect();
            all.into_iter().map(|h| h.join().ok().flatten()).collect()
        });
        times.into_iter().flatten().collect()
    };
    // Two rounds each, alternating; the second of each is reported (the
    // first warms the caches and the gateway's copy of the job). The pause
    // lets the runner's sshd reap the previous burst.
    run(&gw);
    run(&openssh);
    let pause = || std::thread::sleep(Duration::from_secs(2));
    pause();
    let g = run(&gw);
    pause();
    let s = run(&openssh);
    let case = format!("burst: {BURST} x ssh <job>@gateway true vs ssh -J openssh");
    report.compare(
        &case,
        "logins succeeded",
        "",
        &[g.len() as f64],
        &[s.len() as f64],
        true,
    );
    for (metric, q) in [("p50", 0.5), ("p95", 0.95)] {
        let (a, b) = (percentile(&g, q), percentile(&s, q));
        report.compare(&case, metric, "ms", &[a], &[b], false);
    }
    Ok(())
}

/// One AEAD pass of `cipher` as `openssl speed` measures it here (32 KiB
/// blocks), in s/GiB: the floor of what the jump relay must spend per byte
/// (it seals or opens the outer layer once), and the relay's CPU in each
/// direction as a multiple of it (issue 17's stretch target: within 3×).
/// Skipped, saying so, when `openssl` is missing or does not know it.
fn aead_floor(report: &mut Report, cipher: &str) {
    let evp = match cipher {
        "chacha20-poly1305@openssh.com" => "chacha20-poly1305",
        "aes128-gcm@openssh.com" => "aes-128-gcm",
        _ => return,
    };
    let out = Command::new("openssl")
        .args(["speed", "-seconds", "2", "-bytes", "32768", "-evp", evp])
        .stderr(Stdio::null())
        .output();
    // The last line is the name and the rate in thousands of bytes a second.
    let rate = out.ok().and_then(|o| {
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        let last = text.lines().last()?.to_string();
        let k: f64 = last
            .split_whitespace()
            .last()?
            .strip_suffix('k')?
            .parse()
            .ok()?;
        Some(k * 1000.0)
    });
    let case = format!("jump {cipher}");
    let Some(rate) = rate.filter(|r| *r > 0.0) else {
        println!("{case:<46} (no openssl speed for {evp}: AEAD floor not measured)");
        return;
    };
    let floor = (1u64 << 30) as f64 / rate;
    report.single(&case, "AEAD pass (openssl)", "s/GiB", floor);
    for dir in ["upload", "download"] {
        let relay = report.rows.iter().find_map(|r| {
            (r["case"] == format!("jump {dir} {cipher}") && r["metric"] == "relay CPU")
                .then(|| r["gateway"]["median"].as_f64())
                .flatten()
        });
        if let Some(relay) = relay {
            report.single(&case, &format!("relay {dir} / pass"), "x", relay / floor);
        }
    }
}

/// The soft limit on open files this process (and its children) run with.
fn fd_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(1024)
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let ssh = Command::new("ssh")
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default();
    json!({"cpu": cpu, "cores": cores, "openssh": ssh})
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let opts = Opts::parse()?;
    if opts.sink {
        let addr = start_sink().await?;
        println!("{addr}");
        std::io::stdout().flush()?;
        return std::future::pending().await;
    }
    let plan = if opts.quick {
        Plan {
            bytes: 256 << 20,
            rounds: 3,
            setup_samples: 10,
            idle_counts: vec![100],
            concurrent: 2000,
            hold: Duration::from_secs(10),
        }
    } else {
        Plan {
            bytes: GIB,
            rounds: 5,
            setup_samples: 30,
            idle_counts: vec![100, 1000],
            concurrent: 10_000,
            hold: Duration::from_secs(60),
        }
    };
    let rig = Rig::start(&opts).await?;
    let mut report = Report::default();
    let m = machine();
    println!(
        "machine: {} ({} cores), {}",
        m["cpu"], m["cores"], m["openssh"]
    );
    println!(
        "{:<46} {:<16} {:>10} {:>10}",
        "case", "metric", "gateway", "openssh"
    );
    std::io::stdout().flush()?;

    if opts.runs("memory") {
        memory(&rig, &plan, &mut report).await?;
    }
    let n = plan.bytes;
    let up = move |ssh: &str| format!("head -c {n} /dev/zero | {ssh} 'cat > /dev/null'");
    let down = move |ssh: &str| format!("{ssh} 'head -c {n} /dev/zero' > /dev/null");
    let ciphers: &[&str] = if opts.runs("jump") {
        &["chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com"]
    } else {
        &[]
    };
    for cipher in ciphers {
        let extra = format!("-c {cipher}");
        for (dir, script) in [
            ("upload", &up as &dyn Fn(&str) -> String),
            ("download", &down),
        ] {
            let c = Comparison {
                case: format!("jump {dir} {cipher}"),
                a: Route::GatewayJump,
                b: Route::OpensshJump,
                extra: extra.clone(),
            };
            throughput(&rig, &plan, &mut report, &c, script)?;
        }
        aead_floor(&mut report, cipher);
    }
    type Script<'a> = &'a dyn Fn(&str) -> String;
    let job_dirs: &[(&str, Script)] = if opts.runs("job") {
        &[("upload", &up), ("download", &down)]
    } else {
        &[]
    };
    for (dir, script) in job_dirs {
        let c = Comparison {
            case: format!("job mode {dir} vs OpenSSH -J (aes128-gcm)"),
            a: Route::GatewayJob,
            b: Route::OpensshJump,
            extra: "-c aes128-gcm@openssh.com".into(),
        };
        throughput(&rig, &plan, &mut report, &c, script)?;
    }
    if opts.runs("forward") {
        forwards(&rig, &plan, &mut report).await?;
    }
    if opts.runs("setup") {
        setup_latency(&rig, &plan, &mut report)?;
    }
    if opts.runs("concurrency") {
        concurrency(&rig, &plan, &mut report).await?;
    }
    if opts.runs("tunnel") {
        tunnel(&rig, &plan, &mut report)?;
    }
    if opts.runs("recording") {
        recording(&rig, &plan, &mut report)?;
    }
    if opts.runs("keystroke") {
        keystrokes(&rig, &mut report)?;
    }
    if opts.runs("burst") {
        burst(&rig, &mut report)?;
    }
    if opts.runs("store") {
        store::store(&rig, &opts.gateway, opts.quick, &mut report).await?;
    }

    let doc = json!({
        "machine": m,
        "plan": {"bytes": plan.bytes, "rounds": plan.rounds, "quick": opts.quick},
        "results": report.rows,
    });
    std::fs::write(&opts.out, serde_json::to_vec_pretty(&doc)?)?;
    println!("written: {}", opts.out.display());
    Ok(())
}
