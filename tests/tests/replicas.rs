//! Several replicas on one PostgreSQL (DESIGN §8, docs/operations.md): a
//! real server started by the test, replicas on their own loopback
//! addresses (in-process, or as processes where one must be SIGKILLed), and
//! a real `sshd` as the runner.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use ci_gateway::ids::JobId;
use ci_gateway::registry::{Lookup, Registry, StoreError};
use common::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

const GATEWAY: &str = env!("CARGO_BIN_EXE_ci-gateway-under-test");

fn env_of(pg: &Postgres) -> Vec<(&'static str, String)> {
    pg.replica_env()
}

/// A job-mode session running `echo started; cat` (an echo of stdin); returns
/// once `started` arrived.
async fn echo_session(gw: &Gateway, key: &std::path::Path, job: &str) -> tokio::process::Child {
    let mut args = client_opts(key);
    args.extend([
        "-p".to_string(),
        gw.ssh.port().to_string(),
        format!("{job}@{}", gw.ssh.ip()),
        // After the echo, a sleep: a kick must end the session, not an EOF.
        "echo started; cat; sleep 60".to_string(),
    ]);
    spawn_started(args).await
}

async fn spawn_started(args: Vec<String>) -> tokio::process::Child {
    let mut child = tokio::process::Command::new("ssh")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("ssh");
    let out = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(out).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the session starts")
        .expect("read");
    assert_eq!(first.as_deref(), Some("started"));
    // Keep reading what follows into a pipe the test can check later.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = tx.send(line);
        }
    });
    ECHOES
        .lock()
        .expect("lock")
        .push((child.id().unwrap_or(0), rx));
    child
}

type Echoes = Vec<(u32, tokio::sync::mpsc::UnboundedReceiver<String>)>;
static ECHOES: std::sync::Mutex<Echoes> = std::sync::Mutex::new(Vec::new());

/// Writes `line` into the session and waits for its echo.
async fn echoes(child: &mut tokio::process::Child, line: &str) {
    let stdin = child.stdin.as_mut().expect("stdin");
    stdin
        .write_all(format!("{line}\n").as_bytes())
        .await
        .expect("write");
    stdin.flush().await.expect("flush");
    let id = child.id().unwrap_or(0);
    let mut rx = {
        let mut all = ECHOES.lock().expect("lock");
        let at = all
            .iter()
            .position(|(p, _)| *p == id)
            .expect("the session's output");
        all.remove(at).1
    };
    let back = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("the echo comes back");
    assert_eq!(back.as_deref(), Some(line));
    ECHOES.lock().expect("lock").push((id, rx));
}

/// Waits for the session to end; returns its stderr.
async fn ended(mut child: tokio::process::Child) -> String {
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the session ends")
        .expect("wait");
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut e, &mut err).await;
    }
    assert!(!status.success(), "a kicked session fails: {status} {err}");
    err
}

async fn sessions_seen(gw: &Gateway, job: &str, token: &str) -> (u16, Value) {
    let (status, body) = gw
        .http("GET", &format!("/v1/jobs/{job}"), Some(token), None)
        .await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

async fn until_sessions(gw: &Gateway, job: &str, token: &str, n: u64) {
    for _ in 0..200 {
        let (status, body) = sessions_seen(gw, job, token).await;
        if status == 200 && body["active_sessions"].as_u64() == Some(n) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = sessions_seen(gw, job, token).await;
    panic!(
        "{} never counted {n} sessions of job {job}: {status} {body}",
        gw.api
    );
}

/// Register on A, then through B: job mode, jump mode, the session counted
/// on A, a database outage the session rides out, and a `DELETE` on A that
/// closes B's session (B missed the notification while the database was
/// down, and catches up when it is back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_registered_on_one_replica_is_served_counted_and_ended_through_another() {
    let mut pg = Postgres::start("127.0.0.171").await;
    let env = env_of(&pg);
    let config: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let w = World::with_config("127.0.0.170", "9876543401", &config).await;
    let token = w.gateway.token_for(&w.job);
    let b = w.replica(&pg, "data-b", &[]).await;

    let r = ssh(
        &b,
        &w.octocat.path,
        &w.job,
        &["echo through-b; exit 3"],
        None,
    )
    .await;
    assert_eq!((r.code, r.stdout.as_str()), (3, "through-b\n"), "{r:?}");
    let r = ssh_jump(
        &b,
        &w.octocat.path,
        "octocat",
        &w.runner.user,
        &format!("job-{}", w.job),
        22,
        &["echo jumped"],
    )
    .await;
    assert_eq!((r.code, r.stdout.as_str()), (0, "jumped\n"), "{r:?}");
    // Nobody else gets in through B either.
    let r = ssh(&b, &w.mallory.path, &w.job, &["true"], None).await;
    assert_ne!(r.code, 0, "{r:?}");

    let mut session = echo_session(&b, &w.octocat.path, &w.job).await;
    until_sessions(&w.gateway, &w.job, &token, 1).await;
    let (_, body) = sessions_seen(&w.gateway, &w.job, &token).await;
    assert_eq!(body["sessions"][0]["login"], "octocat", "{body}");

    // The database goes away: the session keeps running.
    pg.halt();
    echoes(&mut session, "still-here").await;
    pg.resume().await;
    echoes(&mut session, "and-after").await;

    // DELETE on A (its connection to the database is new) ends B's session.
    let mut deleted = false;
    for _ in 0..100 {
        let (status, _) = w.gateway.call("DELETE", &w.job, "").await;
        if status == 200 || status == 204 {
            deleted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(deleted, "DELETE on A succeeds once the database is back");
    let err = ended(session).await;
    assert!(err.contains(&format!("job {}", w.job)), "{err}");
    let (status, _) = sessions_seen(&b, &w.job, &token).await;
    assert_eq!(status, 410, "B knows the job ended");
    b.stop().await;
}

/// Registrations (and a runner key, sealed) survive every replica
/// stopping; a new replica serves them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_survive_every_replica_restarting() {
    let pg = Postgres::start("127.0.0.173").await;
    let env = env_of(&pg);
    let config: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let w = World::with_config("127.0.0.172", "9876543402", &config).await;
    let b = w.replica(&pg, "data-b", &[]).await;
    let token = w.gateway.token_for(&w.job);
    let World {
        dir,
        github,
        runner,
        gateway,
        octocat,
        job,
        ..
    } = w;
    gateway.stop().await;
    b.stop().await;
    let data = dir.path().join("data-c");
    share_keys(&dir.path().join("data"), &data);
    let c = Gateway::start(&data, &github.url, &config).await;
    let r = ssh(&c, &octocat.path, &job, &["echo back"], None).await;
    assert_eq!((r.code, r.stdout.as_str()), (0, "back\n"), "{r:?}");
    let (status, _) = sessions_seen(&c, &job, &token).await;
    assert_eq!(status, 200, "the job token works on the new replica");
    drop(runner);
    c.stop().await;
}

/// The race of the trust-model issue, on PostgreSQL with two replicas:
/// refreshes, finishes and ends of the same jobs, split between them, never
/// bring an ended job back, on either replica or in the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_transitions_on_two_replicas_never_bring_an_ended_job_back() {
    let pg = Postgres::start("127.0.0.174").await;
    let storage = |_: ()| {
        let env: Vec<(String, String)> = pg
            .replica_env()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .chain([(
                "CI_GATEWAY__REGISTRATION__TOKENS".to_string(),
                TOKEN.to_string(),
            )])
            .collect();
        ci_gateway::config::Config::load_with_env(None, env)
            .expect("config")
            .storage
    };
    let open = |secret: [u8; 32]| {
        let st = storage(());
        async move {
            let reg = Registry::open_postgres(&st, "test".into(), &secret, 1000)
                .await
                .expect("open");
            let reg = Arc::new(reg);
            tokio::spawn(reg.replication().expect("postgres"));
            reg
        }
    };
    let secret = [7u8; 32];
    let (one, two) = (open(secret).await, open(secret).await);
    const JOBS: u64 = 30;
    let id = |j: u64| JobId::from_u64(9_876_543_500 + j).expect("id");
    for j in 1..=JOBS {
        let reg = ci_gateway::registry::Registration {
            job_id: id(j),
            actor: ci_gateway::ids::GithubLogin::parse("octocat").expect("login"),
            host: "127.0.0.5".parse().expect("ip"),
            port: 22,
            user: "runner".into(),
            host_keys: vec![],
            repository: None,
            run_id: None,
            os: ci_gateway::registry::Os::Linux,
            allowed_users: vec![],
            registered_at: 1,
            refreshed_at: ci_gateway::registry::unix_now(),
            finished_at: None,
            paused_at: None,
            runner_login: ci_gateway::registry::RunnerLogin::Certificate,
            token_hash: ci_gateway::secret::new_job_token().1.to_hex(),
            version: 0,
            tunnel: false,
        };
        one.create(reg, None).await.expect("create");
    }
    let mut tasks = Vec::new();
    for j in 1..=JOBS {
        for kind in 0..4u64 {
            let reg = if kind % 2 == 0 {
                one.clone()
            } else {
                two.clone()
            };
            tasks.push(tokio::spawn(async move {
                for round in 0..10 {
                    let job = id(j);
                    match (kind + round) % 4 {
                        0 | 1 => {
                            let r = reg
                                .update(job, |c| {
                                    let mut n = c.clone();
                                    n.refreshed_at = ci_gateway::registry::unix_now();
                                    Ok(n)
                                })
                                .await;
                            assert!(
                                r.is_ok()
                                    || matches!(
                                        r,
                                        Err(StoreError::Ended(_) | StoreError::Unknown(_))
                                    ),
                                "{r:?}"
                            );
                        }
                        2 => {
                            let _ = reg.mark_finished(job).await;
                        }
                        _ => {
                            reg.remove(job, format!("job {j} ended"))
                                .await
                                .expect("end");
                            assert!(
                                matches!(reg.lookup(job), Lookup::Ended(_)),
                                "job {j} came back right after it ended"
                            );
                        }
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("no task panicked");
    }
    for j in 1..=JOBS {
        for reg in [&one, &two] {
            assert!(
                matches!(reg.lookup_fresh(id(j)).await, Lookup::Ended(_)),
                "job {j} is ended on both replicas"
            );
        }
    }
    let third = open(secret).await;
    assert!(third.is_empty(), "no ended job is back in the database");
    assert_eq!(third.tombstones(), JOBS as usize);
}

/// `ci-gateway serve` as a process, a replica on `pg`.
struct Process {
    child: std::process::Child,
    ssh: SocketAddr,
    api: SocketAddr,
    err: std::path::PathBuf,
}

fn free_addr(ip: &str) -> SocketAddr {
    let l = std::net::TcpListener::bind(format!("{ip}:0")).expect("probe");
    l.local_addr().expect("addr")
}

impl Process {
    fn spawn(
        dir: &std::path::Path,
        name: &str,
        github: &FakeGithub,
        env: &[(&str, String)],
    ) -> Process {
        let (ssh, api) = (free_addr("127.0.0.1"), free_addr("127.0.0.1"));
        let err = dir.join(format!("{name}.err"));
        let child = std::process::Command::new(GATEWAY)
            .arg("serve")
            .env("CI_GATEWAY__SSH__LISTEN", ssh.to_string())
            .env("CI_GATEWAY__SSH__PUBLIC_HOST", ssh.to_string())
            .env("CI_GATEWAY__API__LISTEN", api.to_string())
            .env("CI_GATEWAY__GITHUB__API_URL", &github.url)
            .env("CI_GATEWAY__REGISTRATION__TOKENS", TOKEN)
            .env("CI_GATEWAY__STORAGE__DATA_DIR", dir.join(name))
            .env("CI_GATEWAY__SSH__AUTH_REJECTION_TIME", "10ms")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).expect("log"))
            .spawn()
            .expect("the gateway starts");
        Process {
            child,
            ssh,
            api,
            err,
        }
    }

    async fn start(
        dir: &std::path::Path,
        name: &str,
        github: &FakeGithub,
        env: &[(&str, String)],
    ) -> Process {
        let p = Self::spawn(dir, name, github, env);
        for addr in [p.api, p.ssh] {
            assert!(
                listening(addr).await,
                "{name} did not listen on {addr}: {}",
                p.stderr()
            );
        }
        p
    }

    /// Waits for the process to exit on its own; returns its code and stderr.
    async fn exit(mut self) -> (Option<i32>, String) {
        let code = tokio::task::spawn_blocking(move || {
            let s = self.child.wait().expect("wait");
            (s.code(), self)
        })
        .await
        .expect("join");
        (code.0, code.1.stderr())
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    fn session_args(&self, key: &std::path::Path, job: &str) -> Vec<String> {
        let mut args = client_opts(key);
        args.extend([
            "-p".to_string(),
            self.ssh.port().to_string(),
            format!("{job}@127.0.0.1"),
            // After the echo, a sleep: a kick must end the session, not an EOF.
            "echo started; cat; sleep 60".to_string(),
        ]);
        args
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let (status, text) = http_raw(
            self.api,
            method,
            path,
            Some(token),
            body.map(|b| b.to_string().into_bytes()),
        )
        .await;
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn status(&self, job: &str, token: &str) -> (u16, Value) {
        self.call("GET", &format!("/v1/jobs/{job}"), token, None)
            .await
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Replica A runs two jobs' holds and is SIGKILLed. Its sessions stop
/// counting on B after the heartbeat timeout; B takes the holds over: one
/// job is released as soon as its last session (on B) closes, well before
/// the deadline; the other, whose session stays, ends at its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_stops_counting_and_its_holds_are_taken_over() {
    require_tools();
    let pg = Postgres::start("127.0.0.176").await;
    let dir = tempdir();
    let github = FakeGithub::start().await;
    let octocat = keygen(dir.path(), "octocat", "ed25519");
    github.set("octocat", &[&octocat.public]);
    let runner = RunnerSshd::start(dir.path(), "127.0.0.175");
    let mut env = pg.replica_env();
    env.extend([
        ("CI_GATEWAY__HOLD__MAX", "25s".to_string()),
        ("CI_GATEWAY__REGISTRATION__TTL", "8s".to_string()),
    ]);
    let a = Process::start(dir.path(), "a", &github, &env).await;
    share_keys(&dir.path().join("a"), &dir.path().join("b"));
    let b = Process::start(dir.path(), "b", &github, &env).await;

    let (released, deadline) = ("9876543411", "9876543412");
    let mut tokens = Vec::new();
    for job in [released, deadline] {
        let (status, body) = a
            .call(
                "PUT",
                &format!("/v1/jobs/{job}"),
                TOKEN,
                Some(registration(&runner, "octocat")),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        runner.install_from(&body);
        tokens.push(body["job_token"].as_str().expect("token").to_string());
    }
    // A session through each replica on each job.
    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    for job in [released, deadline] {
        on_a.push(spawn_started(a.session_args(&octocat.path, job)).await);
        on_b.push(spawn_started(b.session_args(&octocat.path, job)).await);
    }
    for (job, token) in [released, deadline].iter().zip(&tokens) {
        for _ in 0..100 {
            if b.status(job, token).await.1["active_sessions"].as_u64() == Some(2) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            b.status(job, token).await.1["active_sessions"],
            2,
            "B counts A's session too"
        );
        // The jobs finish on A: A runs their holds.
        let (status, body) = a
            .call("POST", &format!("/v1/jobs/{job}/finished"), token, None)
            .await;
        assert_eq!(status, 200, "{body}");
    }

    let mut a = a;
    a.child.kill().expect("SIGKILL");
    let _ = a.child.wait();
    drop(on_a);
    // A's sessions stop counting once its heartbeat is older than the timeout.
    for (job, token) in [released, deadline].iter().zip(&tokens) {
        let mut seen = Value::Null;
        for _ in 0..150 {
            seen = b.status(job, token).await.1;
            if seen["active_sessions"].as_u64() == Some(1) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            seen["active_sessions"], 1,
            "only B's session counts: {seen}"
        );
        assert_eq!(seen["hold"]["state"], "holding", "{seen}");
    }
    // The last session of one job closes: B, now running its hold, releases it.
    let mut first = on_b.remove(0);
    first.kill().await.expect("close the session");
    let mut reason = String::new();
    for _ in 0..150 {
        let (status, body) = b.status(released, &tokens[0]).await;
        if status == 410 {
            reason = body["error"].as_str().unwrap_or_default().to_string();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // (Which of the two release lines depends on whether B's hold began
    // before or after that close: a taken-over hold does not know that
    // someone was in before.)
    assert!(
        reason.contains("the runner was released"),
        "released by B's hold, not left to the deadline: {reason:?}\n{}",
        b.stderr()
    );
    // The other job's session is ended at the deadline A had set.
    let err = ended(on_b.remove(0)).await;
    assert!(err.contains("hold") && err.contains("is over"), "{err}");
}

/// `serve`, `check-config` and `migrate` against a database that is down,
/// then up; and a replica whose host key differs from the others' refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_is_checked_migrated_and_its_absence_is_a_clear_exit() {
    let dir = tempdir();
    let github = FakeGithub::start().await;
    let nobody = format!("postgres://gw:hunter2@127.0.0.177:{}/cigw", free_port());
    let down = [
        ("CI_GATEWAY__STORAGE__BACKEND", "postgres".to_string()),
        ("CI_GATEWAY__STORAGE__POSTGRES_URL", nobody),
    ];
    let (code, err) = Process::spawn(dir.path(), "down", &github, &down)
        .exit()
        .await;
    assert_eq!(code, Some(69), "EX_UNAVAILABLE: {err}");
    assert!(
        err.contains("cannot reach PostgreSQL at 127.0.0.177:"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "the password never shows: {err}");

    let tool = |args: &[&str], env: &[(&str, String)]| {
        let out = std::process::Command::new(GATEWAY)
            .args(args)
            .env("CI_GATEWAY__REGISTRATION__TOKENS", TOKEN)
            .env("CI_GATEWAY__STORAGE__DATA_DIR", dir.path().join("tool"))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .output()
            .expect("runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (code, out) = tool(&["check-config"], &down);
    assert_eq!(code, Some(69), "{out}");
    assert!(
        out.contains("cannot reach PostgreSQL") && !out.contains("hunter2"),
        "{out}"
    );

    let pg = Postgres::start("127.0.0.178").await;
    let up = pg.replica_env();
    let (code, out) = tool(&["check-config"], &up);
    assert_eq!(code, Some(0), "{out}");
    let latest = ci_gateway::pg::MIGRATIONS.len();
    let all: Vec<i32> = ci_gateway::pg::MIGRATIONS.iter().map(|(v, _)| *v).collect();
    assert!(
        out.contains(&format!("reachable; schema version 0 of {latest}")),
        "{out}"
    );
    let (code, out) = tool(&["migrate"], &up);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("applied migrations {all:?}")),
        "{out}"
    );
    let (code, out) = tool(&["migrate"], &up);
    assert!(code == Some(0) && out.contains("nothing to apply"), "{out}");
    let (code, out) = tool(&["check-config"], &up);
    assert!(code == Some(0) && out.contains("(current)"), "{out}");

    // Replica one records its keys; a second with keys of its own is refused.
    let one = Process::start(dir.path(), "one", &github, &up).await;
    let (code, err) = Process::spawn(dir.path(), "two", &github, &up).exit().await;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("key differs from the one the other replicas present"),
        "{err}"
    );
    drop(one);
}

/// An operator on replica A ends a session replica B holds: A sees it in
/// B's published sessions (with its id), tells B through PostgreSQL, and
/// the user sees the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_kick_on_one_replica_closes_a_session_another_holds() {
    const ADMIN: &str = "ops-bob:abcdef0123456789abcdef0123456789";
    let mut pg = Postgres::start("127.0.0.188").await;
    let env = env_of(&pg);
    let mut config: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    config.push(("CI_GATEWAY__API__ADMIN_TOKENS", ADMIN));
    let w = World::with_config("127.0.0.189", "9876543637", &config).await;
    let token = w.gateway.token_for(&w.job);
    let b = w
        .replica(&pg, "data-b", &[("CI_GATEWAY__API__ADMIN_TOKENS", ADMIN)])
        .await;
    let session = echo_session(&b, &w.octocat.path, &w.job).await;
    until_sessions(&w.gateway, &w.job, &token, 1).await;
    let (status, body) = w
        .gateway
        .http("GET", "/v1/admin/sessions", Some(ADMIN), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let listed: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(listed[0]["here"], false, "{listed}");
    let id = listed[0]["id"].as_str().expect("an id").to_string();
    let (status, body) = w
        .gateway
        .http(
            "POST",
            &format!("/v1/admin/sessions/{id}/kick"),
            Some(ADMIN),
            Some(r#"{"reason": "rotating replica b"}"#),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"asked\""), "{body}");
    let err = ended(session).await;
    assert!(
        err.contains("an operator ended this session: rotating replica b"),
        "{err}"
    );
    until_sessions(&w.gateway, &w.job, &token, 0).await;

    // With the database down, /healthz fails on the store, with the cause
    // on the operator's listener only.
    pg.halt();
    let (status, body) = http_raw(w.gateway.metrics, "GET", "/healthz", None, None).await;
    assert_eq!(status, 503, "{body}");
    let report: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(report["checks"]["store"]["status"], "failing", "{report}");
    assert!(report["checks"]["store"]["cause"].is_string(), "{report}");
    let (status, body) = w.gateway.http("GET", "/healthz", None, None).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        !body.contains("127.0.0.188"),
        "the API's copy names the database: {body}"
    );
    pg.resume().await;
    b.stop().await;
}
