//! The trust model (DESIGN §2, §4, §7), attacked end to end: each test is
//! an attack that worked against the gateway before per-job credentials,
//! job tokens, address rules and atomic job states, asserting the refusal
//! (status and reason) and that the victim still works.

mod common;

use common::*;
use serde_json::{json, Value};

fn lines(body: &Value) -> Vec<String> {
    body["authorized_keys"]
        .as_array()
        .expect("authorized_keys")
        .iter()
        .map(|l| l.as_str().expect("line").to_string())
        .collect()
}

async fn put_with(gw: &Gateway, job: &str, token: &str, body: &Value) -> (u16, Value) {
    let (status, text) = gw
        .http(
            "PUT",
            &format!("/v1/jobs/{job}"),
            Some(token),
            Some(&body.to_string()),
        )
        .await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn call_with(gw: &Gateway, method: &str, path: &str, token: &str) -> (u16, Value) {
    let (status, text) = gw.http(method, path, Some(token), None).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Attack 1: mallory registers her own job at the victim's runner address
/// and host key (neither is secret), then asks for a shell on "her" job.
/// The certificate names her job, and the victim's runner trusts only
/// certificates naming its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_one_job_never_opens_another_jobs_runner() {
    let w = World::new("127.0.0.101", "9876543101").await;
    let installed = std::fs::read_to_string(&w.runner.authorized_keys).expect("read");
    assert!(
        installed.contains("cert-authority,principals=\"ci-gateway-job-9876543101\""),
        "{installed}"
    );
    let mine = "7000000101";
    let (status, body) = w
        .gateway
        .register(mine, registration(&w.runner, "mallory"))
        .await;
    assert_eq!(status, 201, "{body}");
    let r = ssh(&w.gateway, &w.mallory.path, mine, &["echo pwned"], None).await;
    assert_eq!(r.code, 255, "{r:?}");
    assert!(!r.stdout.contains("pwned"), "{r:?}");
    assert!(
        r.stderr.contains("refused the gateway's login") && r.stderr.contains("cert-authority"),
        "the reason names the fix: {r:?}"
    );
    // The victim is untouched.
    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        &w.job,
        &["echo still-mine"],
        None,
    )
    .await;
    assert_eq!(r.stdout.trim(), "still-mine", "{r:?}");
}

/// Attack 1, Windows form: one plain gateway key used to be trusted by
/// every Windows runner. Each job now has its own key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_made_for_one_job_never_opens_another_jobs_runner() {
    let w = World::unregistered("127.0.0.102", "9876543102", &[]).await;
    let mut body = registration(&w.runner, "octocat");
    body["os"] = json!("windows");
    let (status, victim) = w.gateway.register(&w.job, body.clone()).await;
    assert_eq!(status, 201, "{victim}");
    let victim_lines = lines(&victim);
    assert!(
        !victim_lines[0].contains("cert-authority")
            && victim_lines[0].ends_with("ci-gateway-job-9876543102"),
        "a key line for this job: {victim_lines:?}"
    );
    w.runner.install(&victim_lines);
    let r = ssh(&w.gateway, &w.octocat.path, &w.job, &["echo in"], None).await;
    assert_eq!(r.stdout.trim(), "in", "{r:?}");

    let mine = "7000000102";
    body["actor"] = json!("mallory");
    let (status, attacker) = w.gateway.register(mine, body).await;
    assert_eq!(status, 201, "{attacker}");
    assert_ne!(
        lines(&attacker)[0],
        victim_lines[0],
        "every job gets its own key"
    );
    let r = ssh(&w.gateway, &w.mallory.path, mine, &["echo pwned"], None).await;
    assert_eq!(r.code, 255, "{r:?}");
    assert!(!r.stdout.contains("pwned"), "{r:?}");
    assert!(r.stderr.contains("does not trust this job's key"), "{r:?}");
    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        &w.job,
        &["echo still-in"],
        None,
    )
    .await;
    assert_eq!(r.stdout.trim(), "still-in", "{r:?}");
}

/// Attack 2: the fleet's shared registration token against a job that is
/// not the holder's: take it over, read it, end it. Each is refused, and
/// the job's own token cannot change what the job is either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registration_token_creates_jobs_and_nothing_else() {
    let w = World::new("127.0.0.103", "9876543103").await;
    let gw = &w.gateway;
    let path = format!("/v1/jobs/{}", w.job);
    let mut takeover = registration(&w.runner, "mallory");
    let (status, body) = put_with(gw, &w.job, TOKEN, &takeover).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .expect("error")
            .contains("may only create jobs"),
        "{body}"
    );
    let (status, body) = call_with(gw, "GET", &path, TOKEN).await;
    assert_eq!(status, 403);
    assert!(
        !body.to_string().contains("host_keys"),
        "nothing disclosed: {body}"
    );
    for (method, p) in [
        ("POST", format!("{path}/finished")),
        ("DELETE", path.clone()),
    ] {
        let (status, body) = call_with(gw, method, &p, TOKEN).await;
        assert_eq!(status, 403, "{method}: {body}");
    }
    // Another job's token is no key to this one.
    let other = RunnerSshd::start(w.dir.path(), "127.0.0.104");
    let (status, body) = gw
        .register("7000000103", registration(&other, "mallory"))
        .await;
    assert_eq!(status, 201, "{body}");
    let mallorys = body["job_token"].as_str().expect("token").to_string();
    let (status, _) = put_with(gw, &w.job, &mallorys, &takeover).await;
    assert_eq!(status, 403);
    for (method, p) in [("GET", path.clone()), ("DELETE", path.clone())] {
        let (status, _) = call_with(gw, method, &p, &mallorys).await;
        assert_eq!(status, 403, "{method}");
    }
    // With the job's own token, what the job is stays fixed: 409 naming it.
    let own = registration(&w.runner, "octocat");
    let impostor = keygen(w.dir.path(), "impostor", "ed25519");
    for (field, value) in [
        ("actor", json!("mallory")),
        ("host", json!("127.0.0.104")),
        ("port", json!(other.addr.port())),
        ("host_keys", json!([impostor.public])),
        ("user", json!("nobody")),
        ("os", json!("windows")),
        ("repository", json!("evil/repo")),
    ] {
        let mut changed = own.clone();
        changed[field] = value;
        let (status, body) = gw.register(&w.job, changed).await;
        assert_eq!(status, 409, "{field}: {body}");
        assert!(
            body["error"].as_str().expect("error").starts_with(field),
            "{field}: {body}"
        );
    }
    takeover = own;
    let (status, body) = gw.register(&w.job, takeover).await;
    assert_eq!(status, 200, "an unchanged refresh is fine: {body}");
    assert!(body.get("job_token").is_none(), "the token is shown once");
    // The victim still gets in, and their runner still sees its job.
    let r = ssh(gw, &w.octocat.path, &w.job, &["echo mine"], None).await;
    assert_eq!(r.stdout.trim(), "mine", "{r:?}");
    let r = ssh(gw, &w.mallory.path, &w.job, &["true"], None).await;
    assert_eq!(r.code, 255, "{r:?}");
    let (status, body) = gw.job(&w.job).await;
    assert_eq!(status, 200);
    assert_eq!(body["actor"], "octocat");
    assert!(body.get("token_hash").is_none(), "{body}");
    // At rest the store holds the token's hash, never the token.
    let token = gw.token_for(&w.job);
    let stored = std::fs::read(w.dir.path().join("data").join("registry.redb")).expect("store");
    let has = |needle: &[u8]| stored.windows(needle.len()).any(|win| win == needle);
    assert!(!has(token.as_bytes()), "the job token is stored in clear");
    let hash = ci_gateway::secret::TokenHash::of(&token).to_hex();
    assert!(has(hash.as_bytes()), "the store keeps the hash");
}

/// Attack 4: a stranger's `DELETE` (or `finished`) of an id nobody
/// registered yet used to leave a tombstone, so the real runner got 410.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_an_unregistered_job_is_404_and_leaves_nothing_behind() {
    let w = World::unregistered("127.0.0.105", "9876543105", &[]).await;
    let gw = &w.gateway;
    let path = format!("/v1/jobs/{}", w.job);
    for (method, p) in [
        ("DELETE", path.clone()),
        ("POST", format!("{path}/finished")),
    ] {
        let (status, body) = call_with(gw, method, &p, TOKEN).await;
        assert_eq!(status, 404, "{method}: {body}");
    }
    let forged = format!("cgj_{}", "A".repeat(43));
    let (status, _) = call_with(gw, "DELETE", &path, &forged).await;
    assert_eq!(status, 404);
    let (status, _) = put_with(gw, &w.job, &forged, &registration(&w.runner, "mallory")).await;
    assert_eq!(status, 404, "a job token never creates a job");
    assert_eq!(gw.gw.registry.tombstones(), 0);
    let (status, body) = gw
        .register(&w.job, registration(&w.runner, "octocat"))
        .await;
    assert_eq!(status, 201, "the real runner registers: {body}");
}

/// Attack 3: the registered host was free, so jump mode dialled the
/// gateway's own ports, loopback v6, cloud metadata and link-local.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_hosts_follow_the_address_rules() {
    let w = World::unregistered("127.0.0.106", "9876543106", &[]).await;
    let gw = &w.gateway;
    let ssh_port = gw.ssh.port();
    let api_port = gw.api.port();
    let cases = [
        (
            json!("127.0.0.1"),
            ssh_port,
            "where the gateway itself listens",
        ),
        (
            json!("::ffff:127.0.0.1"),
            api_port,
            "where the gateway itself listens",
        ),
        (json!(null), ssh_port, "where the gateway itself listens"),
        (json!("::1"), 22, "runner_networks"),
        (json!("169.254.169.254"), 80, "link-local"),
        (json!("::ffff:169.254.169.254"), 80, "link-local"),
        (json!("fe80::1"), 22, "link-local"),
        (json!("0.0.0.0"), 22, "not a unicast"),
        (json!("10.0.0.1"), 22, "runner_networks"),
    ];
    for (n, (host, port, why)) in cases.iter().enumerate() {
        let mut body = registration(&w.runner, "mallory");
        body["host"] = host.clone();
        body["port"] = json!(port);
        let job = format!("70000001{n:02}");
        let (status, answer) = gw.register(&job, body).await;
        assert_eq!(status, 400, "{host}:{port}: {answer}");
        let error = answer["error"].as_str().expect("error");
        assert!(
            error.starts_with("host: ") && error.contains(why),
            "{host}: {error}"
        );
        assert_eq!(gw.job(&job).await.0, 404, "nothing registered for {host}");
    }
    // Jump mode to any of them is then "not registered", never a dial.
    let mut args = client_opts(&w.mallory.path);
    args.extend([
        "-p".into(),
        ssh_port.to_string(),
        "-W".into(),
        "job-7000000104:22".into(),
        "mallory@127.0.0.1".into(),
    ]);
    let r = run("ssh", &args, None).await;
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("not registered"), "{r:?}");
    // A runner in the networks is fine, in either spelling.
    let mut body = registration(&w.runner, "octocat");
    body["host"] = json!(format!("::ffff:{}", w.runner.addr.ip()));
    let (status, answer) = gw.register(&w.job, body).await;
    assert_eq!(status, 201, "{answer}");
    let (_, job) = gw.job(&w.job).await;
    assert_eq!(job["host"], w.runner.addr.ip().to_string());
}

/// Attack 5: refreshes racing `finished` and `DELETE` brought ended jobs
/// back (11 of 12 in the report). Many jobs, all three at once, over HTTP:
/// once a job has ended, every later answer about it is 410, and after a
/// restart none is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_racing_the_release_never_bring_a_job_back() {
    let w = World::unregistered("127.0.0.107", "9876543107", &[]).await;
    const JOBS: u64 = 16;
    let ids: Vec<String> = (0..JOBS).map(|n| format!("71000000{n:02}")).collect();
    for id in &ids {
        let (status, body) = w
            .gateway
            .register(id, registration(&w.runner, "octocat"))
            .await;
        assert_eq!(status, 201, "{body}");
    }
    let w = std::sync::Arc::new(w);
    let mut tasks = Vec::new();
    for id in ids.clone() {
        for role in 0..3 {
            let w = w.clone();
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                let body = registration(&w.runner, "octocat");
                let mut ended = false;
                for round in 0..12 {
                    let status = match (role, round % 3) {
                        (0, _) => w.gateway.register(&id, body.clone()).await.0,
                        (1, 0) => w.gateway.call("POST", &id, "/finished").await.0,
                        (1, _) => w.gateway.register(&id, body.clone()).await.0,
                        _ if round >= 4 => w.gateway.call("DELETE", &id, "").await.0,
                        _ => w.gateway.register(&id, body.clone()).await.0,
                    };
                    assert!(matches!(status, 200 | 410), "job {id}: {status}");
                    if ended {
                        assert_eq!(status, 410, "job {id} came back after it ended");
                    }
                    ended |= status == 410 || (role == 2 && round >= 4);
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("no task panicked");
    }
    for id in &ids {
        let (status, body) = w.gateway.job(id).await;
        assert_eq!(status, 410, "job {id}: {body}");
    }
    let w = std::sync::Arc::into_inner(w).expect("the tasks are done");
    let w = w.restart(&[]).await;
    assert!(w.gateway.gw.registry.is_empty(), "no ended job is back");
    for id in &ids {
        let (status, _) = w
            .gateway
            .register(id, registration(&w.runner, "octocat"))
            .await;
        assert_eq!(status, 410, "an ended id stays ended across restarts");
    }
}

/// dropbear as the runner: it takes no OpenSSH certificates, so it registers
/// with `runner_login = "key"` and the gateway logs in with that job's own
/// key. Its sshd reads `~/.ssh/authorized_keys` only, so it runs in a mount
/// namespace where the home directory is a temporary one (we are root).
struct Dropbear {
    addr: std::net::SocketAddr,
    host_key_pub: String,
    home: std::path::PathBuf,
    child: std::process::Child,
}

impl Dropbear {
    fn start(dir: &std::path::Path, ip: &str) -> Dropbear {
        let dropbear = ["/usr/sbin/dropbear", "/usr/bin/dropbear"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("`dropbear` is missing: install the Debian package dropbear-bin (scripts/test does)");
        let root = dir.join(format!("dropbear-{ip}"));
        let home = root.join("home");
        std::fs::create_dir_all(home.join(".ssh")).expect("mkdir");
        set_mode(&home, 0o755);
        set_mode(&home.join(".ssh"), 0o700);
        let key = root.join("host_key");
        let made = std::process::Command::new("dropbearkey")
            .args(["-t", "ed25519", "-f"])
            .arg(&key)
            .output()
            .expect("dropbearkey runs");
        assert!(made.status.success(), "{made:?}");
        let public = std::process::Command::new("dropbearkey")
            .args(["-y", "-f"])
            .arg(&key)
            .output()
            .expect("dropbearkey -y");
        let host_key_pub = String::from_utf8_lossy(&public.stdout)
            .lines()
            .find(|l| l.starts_with("ssh-"))
            .expect("a public key line")
            .to_string();
        let user_home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        let port = {
            let l = std::net::TcpListener::bind(format!("{ip}:0")).expect("probe");
            l.local_addr().expect("addr").port()
        };
        let script = format!(
            "mount --bind {home} {user_home} && exec {dropbear} -F -E -s -r {key} -p {ip}:{port}",
            home = home.display(),
            key = key.display(),
        );
        let mut child = std::process::Command::new("unshare")
            .args(["--mount", "sh", "-c", &script])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(root.join("dropbear.log")).expect("log"))
            .spawn()
            .expect("unshare starts (the tests run as root)");
        let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().expect("addr");
        for _ in 0..100 {
            if std::net::TcpStream::connect(addr).is_ok() {
                return Dropbear {
                    addr,
                    host_key_pub,
                    home,
                    child,
                };
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "dropbear did not start: {}",
            std::fs::read_to_string(root.join("dropbear.log")).unwrap_or_default()
        );
    }

    fn install(&self, lines: &[String]) {
        let path = self.home.join(".ssh").join("authorized_keys");
        std::fs::write(&path, lines.join("\n") + "\n").expect("write");
        set_mode(&path, 0o600);
    }
}

impl Drop for Dropbear {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropbear_runner_works_in_job_mode_with_its_own_key() {
    let w = World::unregistered("127.0.0.108", "9876543108", &[]).await;
    let db = Dropbear::start(w.dir.path(), "127.0.0.109");
    let body = |login: &str| {
        json!({
            "actor": "octocat", "host": db.addr.ip().to_string(), "port": db.addr.port(),
            "user": current_user(), "host_keys": [db.host_key_pub], "os": "linux",
            "runner_login": login,
        })
    };
    // With a certificate line dropbear cannot log the gateway in, and the
    // user is told the fix.
    let (status, answer) = w.gateway.register("7000000108", body("certificate")).await;
    assert_eq!(status, 201, "{answer}");
    db.install(&lines(&answer));
    let r = ssh(&w.gateway, &w.octocat.path, "7000000108", &["true"], None).await;
    assert_eq!(r.code, 255, "{r:?}");
    assert!(r.stderr.contains("--runner-login key"), "{r:?}");
    // With its own key it works: a command, its output and exit status.
    let (status, answer) = w.gateway.register(&w.job, body("key")).await;
    assert_eq!(status, 201, "{answer}");
    db.install(&lines(&answer));
    let r = ssh(
        &w.gateway,
        &w.octocat.path,
        &w.job,
        &["echo from-dropbear; exit 7"],
        None,
    )
    .await;
    assert_eq!(r.stdout.trim(), "from-dropbear", "{r:?}");
    assert_eq!(r.code, 7, "{r:?}");
    // Ending the job deletes its key: the same runner lets nobody in after.
    let (status, _) = w.gateway.call("DELETE", &w.job, "").await;
    assert_eq!(status, 200);
    assert!(w
        .gateway
        .gw
        .registry
        .runner_key(ci_gateway::ids::JobId::parse(&w.job).expect("id"))
        .is_none());
}

/// The address rules are checked again at every dial, not only at
/// registration: a stored runner address that has since become one the
/// gateway listens on is never connected to, in either mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_address_rules_hold_again_at_every_dial() {
    let w = World::new("127.0.0.123", "9876543123").await;
    let r = ssh(&w.gateway, &w.octocat.path, &w.job, &["echo before"], None).await;
    assert_eq!(r.stdout.trim(), "before", "{r:?}");
    // The runner's registered address is now one of the gateway's own.
    w.gateway.gw.listening_on(w.runner.addr);
    let r = ssh(&w.gateway, &w.octocat.path, &w.job, &["echo job"], None).await;
    assert_eq!(r.code, 255, "{r:?}");
    assert!(r.stderr.contains("address is refused"), "{r:?}");
    let r = ssh_jump(
        &w.gateway,
        &w.octocat.path,
        "octocat",
        &w.runner.user,
        &format!("job-{}", w.job),
        22,
        &["echo jump"],
    )
    .await;
    assert_ne!(r.code, 0, "{r:?}");
    assert!(!r.stdout.contains("jump"), "{r:?}");
    assert!(r.stderr.contains("address is refused"), "{r:?}");
}

/// Forged job tokens over many unregistered ids used to cost nothing: each
/// was a plain 404. They spend the source's wrong-token budget now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_job_tokens_over_many_ids_are_rate_limited() {
    let w = World::unregistered("127.0.0.124", "9876543124", &[]).await;
    let forged = format!("cgj_{}", "B".repeat(43));
    let mut statuses = Vec::new();
    for n in 0..30 {
        let path = format!("/v1/jobs/71111111{n:02}");
        statuses.push(call_with(&w.gateway, "GET", &path, &forged).await.0);
    }
    assert_eq!(statuses[0], 404, "{statuses:?}");
    assert!(statuses.contains(&429), "never limited: {statuses:?}");
}
