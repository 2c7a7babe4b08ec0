//! The end-to-end harness: a fake GitHub API (in-process), a real OpenSSH
//! `sshd` as the runner on a loopback address, the gateway in-process on
//! port 0, and the real `ssh`/`scp`/`sftp` clients driving it.
//!
//! Tools that are missing make the test fail with what to install; nothing
//! is skipped.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const TOKEN: &str = "test-registration-token-0123456789";

/// Fails (not skips) when a tool is missing, saying what to install.
pub fn require_tools() {
    for (tool, package) in [
        ("ssh", "openssh-client"),
        ("scp", "openssh-client"),
        ("sftp", "openssh-client"),
        ("ssh-keygen", "openssh-client"),
        ("rsync", "rsync"),
    ] {
        let found = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(found, "`{tool}` is missing: install the Debian package {package} (or run scripts/test, which does)");
    }
    assert!(
        sshd_path().is_some(),
        "`sshd` is missing: install the Debian package openssh-server (or run scripts/test, which does)"
    );
}

pub fn sshd_path() -> Option<PathBuf> {
    ["/usr/sbin/sshd", "/usr/local/sbin/sshd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

pub fn current_user() -> String {
    let out = std::process::Command::new("id")
        .arg("-un")
        .output()
        .expect("id -un");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A fresh temporary directory readable by sshd (which reads as the user).
pub fn tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("cigw-e2e-")
        .tempdir()
        .expect("tempdir");
    set_mode(dir.path(), 0o755);
    dir
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// An SSH key pair made by ssh-keygen: `path` and `path.pub`.
pub struct KeyPair {
    pub path: PathBuf,
    pub public: String,
}

pub fn keygen(dir: &Path, name: &str, kind: &str) -> KeyPair {
    let path = dir.join(name);
    let mut cmd = std::process::Command::new("ssh-keygen");
    cmd.args(["-q", "-N", "", "-C", name, "-t", kind, "-f"])
        .arg(&path);
    if kind == "rsa" {
        cmd.args(["-b", "2048"]);
    }
    let status = cmd.status().expect("ssh-keygen runs");
    assert!(status.success(), "ssh-keygen failed");
    let public = std::fs::read_to_string(path.with_extension("pub"))
        .or_else(|_| std::fs::read_to_string(format!("{}.pub", path.display())))
        .expect("public key");
    KeyPair {
        path,
        public: public.trim().to_string(),
    }
}

/// A collaborator's login and permission.
pub type Grant = (String, String);

/// The fake GitHub API: `GET /users/{login}/keys` from a table.
#[derive(Clone, Default)]
pub struct FakeGithub {
    pub keys: Arc<Mutex<HashMap<String, Vec<String>>>>,
    pub hits: Arc<AtomicUsize>,
    pub down: Arc<AtomicBool>,
    pub delay_ms: Arc<AtomicUsize>,
    /// Served at `/repos/{o}/{r}/actions/runs/{run}/attempts/{n}/jobs`.
    pub run_jobs: Arc<Mutex<serde_json::Value>>,
    /// The Authorization headers GitHub saw on that route.
    pub run_jobs_auth: Arc<Mutex<Vec<String>>>,
    /// `GET /repos/{o}/{r}/actions/jobs/{job}`: ("o/r", job) -> run id.
    pub job_runs: Arc<Mutex<HashMap<(String, u64), u64>>>,
    /// `GET /repos/{o}/{r}/collaborators?permission=`: "o/r" -> (login,
    /// pull|triage|push|maintain|admin).
    pub collaborators: Arc<Mutex<HashMap<String, Vec<Grant>>>>,
    /// `GET /orgs/{org}/teams/{slug}/members`: "org/slug" -> logins.
    pub teams: Arc<Mutex<HashMap<String, Vec<String>>>>,
    /// The Authorization headers seen on the two role routes.
    pub role_auth: Arc<Mutex<Vec<String>>>,
    pub url: String,
}

impl FakeGithub {
    pub async fn start() -> FakeGithub {
        let mut gh = FakeGithub::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        gh.url = format!("http://{}", listener.local_addr().expect("addr"));
        let app = Router::new()
            .route("/users/{login}/keys", get(user_keys))
            .route(
                "/repos/{owner}/{repo}/actions/runs/{run}/attempts/{attempt}/jobs",
                get(run_jobs),
            )
            .route("/repos/{owner}/{repo}/actions/jobs/{job}", get(job_run))
            .route("/repos/{owner}/{repo}/collaborators", get(collaborators))
            .route("/orgs/{org}/teams/{slug}/members", get(team_members))
            .route("/rate_limit", get(rate_limit))
            .with_state(gh.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        gh
    }

    pub fn set(&self, login: &str, keys: &[&str]) {
        self.keys.lock().expect("lock").insert(
            login.to_string(),
            keys.iter().map(|k| k.to_string()).collect(),
        );
    }
}

async fn run_jobs(
    State(gh): State<FakeGithub>,
    headers: axum::http::HeaderMap,
) -> Json<serde_json::Value> {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    gh.run_jobs_auth.lock().expect("lock").push(auth);
    Json(gh.run_jobs.lock().expect("lock").clone())
}

/// GitHub's `GET /rate_limit` (the shape of its answer), or 503 while down.
async fn rate_limit(State(gh): State<FakeGithub>) -> Result<Json<serde_json::Value>, StatusCode> {
    if gh.down.load(Ordering::SeqCst) {
        return Err(StatusCode::SERVICE_UNAVAILABLE);
    }
    let core = serde_json::json!({"limit": 5000, "used": 10, "remaining": 4990, "reset": 1});
    Ok(Json(
        serde_json::json!({"resources": {"core": core}, "rate": core}),
    ))
}

/// The logins of a role route, 100 a page, or 503 while GitHub is down.
fn role_page(
    gh: &FakeGithub,
    headers: &axum::http::HeaderMap,
    logins: Option<Vec<String>>,
    page: usize,
) -> Result<Json<serde_json::Value>, (StatusCode, Json<serde_json::Value>)> {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    gh.role_auth.lock().expect("lock").push(auth);
    if gh.down.load(Ordering::SeqCst) {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"message": "unavailable"})),
        ));
    }
    let Some(logins) = logins else {
        return Err((
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"message": "Not Found"})),
        ));
    };
    let page: Vec<serde_json::Value> = logins
        .iter()
        .skip(page.saturating_sub(1) * 100)
        .take(100)
        .map(|l| serde_json::json!({"login": l, "type": "User"}))
        .collect();
    Ok(Json(serde_json::Value::Array(page)))
}

async fn collaborators(
    State(gh): State<FakeGithub>,
    UrlPath((owner, repo)): UrlPath<(String, String)>,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
    headers: axum::http::HeaderMap,
) -> Result<Json<serde_json::Value>, (StatusCode, Json<serde_json::Value>)> {
    const LEVELS: [&str; 5] = ["pull", "triage", "push", "maintain", "admin"];
    let rank = |p: &str| LEVELS.iter().position(|l| *l == p).unwrap_or(0);
    let at_least = q.get("permission").map(|p| rank(p)).unwrap_or(0);
    let table = gh.collaborators.lock().expect("lock").clone();
    let logins = table.get(&format!("{owner}/{repo}")).map(|people| {
        people
            .iter()
            .filter(|(_, p)| rank(p) >= at_least)
            .map(|(l, _)| l.clone())
            .collect()
    });
    let page = q.get("page").and_then(|p| p.parse().ok()).unwrap_or(1);
    role_page(&gh, &headers, logins, page)
}

async fn team_members(
    State(gh): State<FakeGithub>,
    UrlPath((org, slug)): UrlPath<(String, String)>,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
    headers: axum::http::HeaderMap,
) -> Result<Json<serde_json::Value>, (StatusCode, Json<serde_json::Value>)> {
    let logins = gh
        .teams
        .lock()
        .expect("lock")
        .get(&format!("{org}/{slug}"))
        .cloned();
    let page = q.get("page").and_then(|p| p.parse().ok()).unwrap_or(1);
    role_page(&gh, &headers, logins, page)
}

async fn job_run(
    State(gh): State<FakeGithub>,
    UrlPath((owner, repo, job)): UrlPath<(String, String, u64)>,
) -> Result<Json<serde_json::Value>, (StatusCode, Json<serde_json::Value>)> {
    let runs = gh.job_runs.lock().expect("lock").clone();
    match runs.get(&(format!("{owner}/{repo}"), job)) {
        Some(run) => Ok(Json(
            serde_json::json!({"id": job, "run_id": run, "status": "in_progress"}),
        )),
        None => Err((
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"message": "Not Found"})),
        )),
    }
}

async fn user_keys(
    State(gh): State<FakeGithub>,
    UrlPath(login): UrlPath<String>,
) -> Result<Json<serde_json::Value>, (StatusCode, Json<serde_json::Value>)> {
    gh.hits.fetch_add(1, Ordering::SeqCst);
    let delay = gh.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay as u64)).await;
    }
    if gh.down.load(Ordering::SeqCst) {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"message": "unavailable"})),
        ));
    }
    let table = gh.keys.lock().expect("lock").clone();
    match table.get(&login.to_lowercase()) {
        Some(keys) => Ok(Json(serde_json::Value::Array(
            keys.iter()
                .enumerate()
                .map(|(i, k)| serde_json::json!({"id": i + 1, "key": k}))
                .collect(),
        ))),
        None => Err((
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"message": "Not Found"})),
        )),
    }
}

/// A real OpenSSH sshd playing the runner, on its own loopback address.
pub struct RunnerSshd {
    pub addr: SocketAddr,
    pub host_key_pub: String,
    pub authorized_keys: PathBuf,
    pub user: String,
    child: std::process::Child,
    pub dir: PathBuf,
}

impl RunnerSshd {
    /// `ip` is a loopback address such as 127.0.0.5.
    pub fn start(dir: &Path, ip: &str) -> RunnerSshd {
        Self::start_with(dir, ip, "ed25519", "")
    }

    /// A runner whose host key is of `key_kind` (as `ssh-keygen -t` takes
    /// it) and whose sshd_config has `extra` lines in place of defaults.
    pub fn start_with(dir: &Path, ip: &str, key_kind: &str, extra: &str) -> RunnerSshd {
        Self::launch(dir, ip, key_kind, extra, None)
    }

    /// A runner inside network namespace `netns`, its sshd on that
    /// namespace's own 127.0.0.1:22: nothing outside the namespace can
    /// connect to it (the reverse tunnel's tests).
    pub fn start_in_netns(dir: &Path, netns: &str) -> RunnerSshd {
        Self::launch(dir, "127.0.0.1", "ed25519", "", Some(netns))
    }

    fn launch(
        dir: &Path,
        ip: &str,
        key_kind: &str,
        extra: &str,
        netns: Option<&str>,
    ) -> RunnerSshd {
        require_tools();
        let dir = dir.join(format!("runner-{}", netns.unwrap_or(ip)));
        std::fs::create_dir_all(&dir).expect("mkdir");
        set_mode(&dir, 0o755);
        let host_key = keygen(&dir, &format!("ssh_host_{key_kind}_key"), key_kind);
        let authorized_keys = dir.join("authorized_keys");
        std::fs::write(&authorized_keys, "").expect("write");
        set_mode(&authorized_keys, 0o644);
        if nix_is_root() {
            let _ = std::fs::create_dir_all("/run/sshd");
        }
        let user = current_user();
        // sshd needs a port number in its config; take a free one from the
        // kernel (a small race with other tests, retried below).
        for _attempt in 0..5 {
            let port = match netns {
                Some(_) => 22,
                None => {
                    let l = std::net::TcpListener::bind(format!("{ip}:0")).expect("bind probe");
                    l.local_addr().expect("addr").port()
                }
            };
            let config = dir.join("sshd_config");
            let defaults = format!(
                "ListenAddress {ip}:{port}\nHostKey {hk}\nAuthorizedKeysFile {ak}\nPidFile {pid}\n\
                 StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\nLogLevel DEBUG1\n\
                 AllowTcpForwarding yes\nMaxStartups 100:30:200\nMaxSessions 50\n",
                hk = host_key.path.display(),
                ak = authorized_keys.display(),
                pid = dir.join("sshd.pid").display(),
            );
            // A keyword in `extra` replaces the default line (sshd keeps the
            // first value of most keywords and the last of some).
            let keyword = |l: &str| l.split_whitespace().next().unwrap_or("").to_lowercase();
            let replaced: Vec<String> = extra.lines().map(keyword).collect();
            let mut text: String = defaults
                .lines()
                .filter(|l| !replaced.contains(&keyword(l)))
                .map(|l| format!("{l}\n"))
                .collect();
            text.push_str(extra);
            std::fs::write(&config, text).expect("write sshd_config");
            let log = dir.join("sshd.log");
            let mut command = match netns {
                Some(ns) => {
                    let mut c = std::process::Command::new("ip");
                    c.args(["netns", "exec", ns])
                        .arg(sshd_path().expect("sshd"));
                    c
                }
                None => std::process::Command::new(sshd_path().expect("sshd")),
            };
            let child = command
                .args(["-D", "-e", "-f"])
                .arg(&config)
                .stderr(std::fs::File::create(&log).expect("log"))
                .stdout(Stdio::null())
                .spawn()
                .expect("sshd starts");
            let addr: SocketAddr = format!("{ip}:{port}").parse().expect("addr");
            let mut child = child;
            for _ in 0..100 {
                // A namespace's sshd cannot be reached from here: its log
                // says when it listens.
                let up = match netns {
                    Some(_) => std::fs::read_to_string(&log)
                        .unwrap_or_default()
                        .contains("Server listening on"),
                    None => std::net::TcpStream::connect(addr).is_ok(),
                };
                if up {
                    return RunnerSshd {
                        addr,
                        host_key_pub: host_key.public.clone(),
                        authorized_keys,
                        user,
                        child,
                        dir,
                    };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
        }
        panic!(
            "sshd did not start: {}",
            std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
        );
    }

    /// Adds the `authorized_keys` lines of a registration's answer.
    pub fn install_from(&self, answer: &serde_json::Value) {
        let had = std::fs::read_to_string(&self.authorized_keys).unwrap_or_default();
        let lines: Vec<String> = had
            .lines()
            .map(str::to_string)
            .chain(
                answer["authorized_keys"]
                    .as_array()
                    .expect("authorized_keys")
                    .iter()
                    .map(|l| l.as_str().expect("line").to_string()),
            )
            .collect();
        self.install(&lines);
    }

    pub fn install(&self, lines: &[String]) {
        std::fs::write(&self.authorized_keys, lines.join("\n") + "\n")
            .expect("write authorized_keys");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for RunnerSshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nix_is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The gateway, in-process, on 127.0.0.1 port 0.
pub struct Gateway {
    pub ssh: SocketAddr,
    pub api: SocketAddr,
    /// `/metrics` (on in every test gateway).
    pub metrics: SocketAddr,
    pub gw: Arc<ci_gateway::Gateway>,
    /// The job tokens `register` got back, by job id.
    pub job_tokens: Mutex<HashMap<String, String>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Gateway {
    pub async fn start(data_dir: &Path, github_url: &str, extra: &[(&str, &str)]) -> Gateway {
        Self::start_on("127.0.0.1", data_dir, github_url, extra).await
    }

    /// The gateway listening on `ip` (a veth address a network namespace
    /// reaches, in the tunnel's tests).
    pub async fn start_on(
        ip: &str,
        data_dir: &Path,
        github_url: &str,
        extra: &[(&str, &str)],
    ) -> Gateway {
        let ssh_l = tokio::net::TcpListener::bind(format!("{ip}:0"))
            .await
            .expect("bind ssh");
        let api_l = tokio::net::TcpListener::bind(format!("{ip}:0"))
            .await
            .expect("bind api");
        let ssh = ssh_l.local_addr().expect("addr");
        let api = api_l.local_addr().expect("addr");
        let mut env = vec![
            // The commands the API hands out are the ones that work here.
            ("CI_GATEWAY__SSH__PUBLIC_HOST".to_string(), ssh.to_string()),
            (
                "CI_GATEWAY__GITHUB__API_URL".to_string(),
                github_url.to_string(),
            ),
            (
                "CI_GATEWAY__REGISTRATION__TOKENS".to_string(),
                TOKEN.to_string(),
            ),
            (
                "CI_GATEWAY__STORAGE__DATA_DIR".to_string(),
                data_dir.display().to_string(),
            ),
            (
                "CI_GATEWAY__SSH__AUTH_REJECTION_TIME".to_string(),
                "10ms".to_string(),
            ),
            (
                "CI_GATEWAY__UPSTREAM__CONNECT_TIMEOUT".to_string(),
                "5s".to_string(),
            ),
            // A restart with sessions open waits this long for them.
            (
                "CI_GATEWAY__SSH__SHUTDOWN_GRACE".to_string(),
                "1s".to_string(),
            ),
        ];
        for (k, v) in extra {
            env.push((k.to_string(), v.to_string()));
        }
        let config =
            ci_gateway::config::Config::load_with_env(None, env).expect("test config is valid");
        let gw = Arc::new(
            ci_gateway::Gateway::new(config)
                .await
                .expect("gateway starts"),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let metrics_l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind metrics");
        let metrics = metrics_l.local_addr().expect("addr");
        let listeners = ci_gateway::Listeners {
            ssh: ssh_l,
            api: api_l,
            metrics: Some(metrics_l),
        };
        let task = tokio::spawn(ci_gateway::run(gw.clone(), listeners, async move {
            let _ = stopped.await;
        }));
        Gateway {
            ssh,
            api,
            metrics,
            gw,
            job_tokens: Mutex::new(HashMap::new()),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops serving: `run` returns only once every task it started has
    /// ended, so nothing holds the gateway's state (and its store) after.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("run did not panic")
                .expect("run stopped without an error");
        }
        let gw = self.gw.clone();
        drop(self);
        assert_eq!(
            Arc::strong_count(&gw),
            1,
            "a task outlived run and still holds the gateway's state"
        );
    }

    /// A raw HTTP/1.1 request to the API; returns (status, body).
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String) {
        http_raw(
            self.api,
            method,
            path,
            token,
            body.map(|b| b.as_bytes().to_vec()),
        )
        .await
    }

    /// `PUT` as the runner would: with the job's token once it has one
    /// (a refresh), with the registration token before (a creation, whose
    /// job token is kept for later calls).
    pub async fn register(&self, job: &str, json: serde_json::Value) -> (u16, serde_json::Value) {
        let token = self.token_for(job);
        let (status, body) = self
            .http(
                "PUT",
                &format!("/v1/jobs/{job}"),
                Some(&token),
                Some(&json.to_string()),
            )
            .await;
        let body = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
        if let Some(t) = body["job_token"].as_str() {
            self.job_tokens
                .lock()
                .expect("lock")
                .insert(job.to_string(), t.to_string());
        }
        (status, body)
    }

    /// The job's token if `register` got one, else the registration token.
    pub fn token_for(&self, job: &str) -> String {
        self.job_tokens
            .lock()
            .expect("lock")
            .get(job)
            .cloned()
            .unwrap_or_else(|| TOKEN.to_string())
    }

    /// A call on a job with its job token: `GET`, `DELETE`, `POST finished`.
    pub async fn call(&self, method: &str, job: &str, suffix: &str) -> (u16, serde_json::Value) {
        let token = self.token_for(job);
        let (status, body) = self
            .http(
                method,
                &format!("/v1/jobs/{job}{suffix}"),
                Some(&token),
                None,
            )
            .await;
        (
            status,
            serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
        )
    }

    pub async fn job(&self, job: &str) -> (u16, serde_json::Value) {
        self.call("GET", job, "").await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub async fn http_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> (u16, String) {
    http_from(None, addr, method, path, token, body).await
}

/// `http_raw` from a chosen loopback source address (a different runner).
pub async fn http_from(
    source: Option<std::net::IpAddr>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> (u16, String) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0)).expect("bind source");
    }
    let mut stream = socket.connect(addr).await.expect("api connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or_default();
    if !body.is_empty() || method == "PUT" || method == "POST" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.expect("write");
    let _ = stream.write_all(&body).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

/// The gateway's `/metrics` text.
pub async fn metrics(gw: &Gateway) -> String {
    let (status, body) = http_raw(gw.metrics, "GET", "/metrics", None, None).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of the sample `name` (with its labels) in metrics `text`; 0
/// when absent (a counter never incremented is not shown).
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// `ci-gateway` (built from the same library by the test crate) as a
/// process, with nothing inherited from a CI environment the tests might run
/// in (GitHub's variables, ours, the Actions token endpoint, a CA bundle).
pub fn agent_command() -> tokio::process::Command {
    agent_command_in(None)
}

/// [`agent_command`], run inside network namespace `netns` if given.
pub fn agent_command_in(netns: Option<&str>) -> tokio::process::Command {
    let agent = env!("CARGO_BIN_EXE_ci-gateway-under-test");
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = tokio::process::Command::new("ip");
            c.args(["netns", "exec", ns, agent]);
            c
        }
        None => tokio::process::Command::new(agent),
    };
    for (name, _) in std::env::vars() {
        let inherited = ["GITHUB_", "CI_GATEWAY_", "ACTIONS_", "RUNNER_"]
            .iter()
            .any(|p| name.starts_with(p));
        // A proxy of the machine's would carry the agent's loopback calls.
        let proxy = name.to_ascii_lowercase().ends_with("_proxy");
        if inherited || proxy || name == "SSL_CERT_FILE" {
            cmd.env_remove(name);
        }
    }
    cmd.env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Runs a prepared command to its end (a hang of 60 s is a failure).
pub async fn finish(mut cmd: tokio::process::Command) -> Run {
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the process finishes within 60s")
        .expect("the process starts");
    Run::from(out)
}

impl From<std::process::Output> for Run {
    fn from(out: std::process::Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).to_string(),
            raw_stdout: out.stdout,
        }
    }
}

/// Output of a client command.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub raw_stdout: Vec<u8>,
    pub stdout: String,
    pub stderr: String,
}

/// Options every client run uses: no user config, no agent, no prompts, a
/// fresh known_hosts, the given identity only.
pub fn client_opts(key: &Path) -> Vec<String> {
    vec![
        "-F".into(),
        "/dev/null".into(),
        "-o".into(),
        "StrictHostKeyChecking=no".into(),
        "-o".into(),
        "UserKnownHostsFile=/dev/null".into(),
        "-o".into(),
        "GlobalKnownHostsFile=/dev/null".into(),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        "IdentitiesOnly=yes".into(),
        "-o".into(),
        "IdentityAgent=none".into(),
        "-o".into(),
        "LogLevel=ERROR".into(),
        "-o".into(),
        "ConnectTimeout=20".into(),
        "-i".into(),
        key.display().to_string(),
    ]
}

/// Runs a program with a deadline (a hang is a failure, not a stuck test).
pub async fn run(program: &str, args: &[String], stdin: Option<Vec<u8>>) -> Run {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{program} does not start: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        tokio::spawn(async move {
            let _ = pipe.write_all(&input).await;
            let _ = pipe.shutdown().await;
        });
    }
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} hung for 120s"))
        .expect("wait");
    Run {
        code: out.status.code().unwrap_or(-1),
        raw_stdout: out.stdout.clone(),
        stdout: String::from_utf8_lossy(&out.stdout).to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

/// `ssh <user>@gateway <command...>` with `key`.
pub async fn ssh(
    gw: &Gateway,
    key: &Path,
    user: &str,
    extra: &[&str],
    stdin: Option<Vec<u8>>,
) -> Run {
    let mut args = client_opts(key);
    args.extend(["-p".into(), gw.ssh.port().to_string()]);
    // Leading `-x` words are client options; the rest is the remote command.
    let split = extra
        .iter()
        .position(|a| !a.starts_with('-'))
        .unwrap_or(extra.len());
    args.extend(extra[..split].iter().map(|s| s.to_string()));
    args.push(format!("{user}@{}", gw.ssh.ip()));
    args.extend(extra[split..].iter().map(|s| s.to_string()));
    run("ssh", &args, stdin).await
}

/// Jump mode: `ssh -J <login>@gateway <runner-user>@<dest>`; the jump is
/// spelled as a ProxyCommand so that the jump leg uses the same options.
pub async fn ssh_jump(
    gw: &Gateway,
    key: &Path,
    login: &str,
    runner_user: &str,
    dest: &str,
    port: u16,
    command: &[&str],
) -> Run {
    let args = jump_args(gw, key, login, runner_user, dest, port, command);
    run("ssh", &args, None).await
}

/// The `ssh` arguments of [`ssh_jump`], for callers that feed stdin or spawn.
pub fn jump_args(
    gw: &Gateway,
    key: &Path,
    login: &str,
    runner_user: &str,
    dest: &str,
    port: u16,
    command: &[&str],
) -> Vec<String> {
    let inner = client_opts(key).join(" ");
    let mut args = client_opts(key);
    args.extend([
        "-o".into(),
        format!(
            "ProxyCommand=ssh {inner} -p {} -W %h:%p {login}@{}",
            gw.ssh.port(),
            gw.ssh.ip()
        ),
        "-p".into(),
        port.to_string(),
        format!("{runner_user}@{dest}"),
    ]);
    args.extend(command.iter().map(|s| s.to_string()));
    args
}

/// Whether something listens on `addr` within 10 s.
pub async fn listening(addr: SocketAddr) -> bool {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A loopback port nothing listens on (a small race with other tests).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
    l.local_addr().expect("addr").port()
}

/// `scp <from> <to>` through the gateway with `key`; a side written as
/// `job:path` is that path on the job's runner.
pub async fn scp(gw: &Gateway, key: &Path, from: &str, to: &str) -> Run {
    let side = |s: &str| match s.split_once(':') {
        Some((job, path)) => format!("{job}@{}:{path}", gw.ssh.ip()),
        None => s.to_string(),
    };
    let mut args = client_opts(key);
    args.extend(["-P".into(), gw.ssh.port().to_string(), side(from), side(to)]);
    run("scp", &args, None).await
}

/// Waits until `cond` holds, polling; panics with `what` after 20 s.
pub async fn eventually<F: FnMut() -> bool>(what: &str, mut cond: F) {
    for _ in 0..400 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// A registration body for `runner` with `actor`.
pub fn registration(runner: &RunnerSshd, actor: &str) -> serde_json::Value {
    serde_json::json!({
        "actor": actor,
        "host": runner.addr.ip().to_string(),
        "port": runner.addr.port(),
        "user": runner.user,
        "host_keys": [runner.host_key_pub],
        "repository": "acme/widgets",
        "run_id": 42,
        "os": "linux",
    })
}

/// Everything most tests need: GitHub with three people, a runner, a gateway,
/// and job `job` registered with octocat as its actor.
pub struct World {
    pub dir: tempfile::TempDir,
    pub github: FakeGithub,
    pub runner: RunnerSshd,
    pub gateway: Gateway,
    pub octocat: KeyPair,
    pub mallory: KeyPair,
    pub hubot: KeyPair,
    pub admin: KeyPair,
    pub job: String,
}

impl World {
    pub async fn new(runner_ip: &str, job: &str) -> World {
        Self::with_config(runner_ip, job, &[]).await
    }

    pub async fn with_config(runner_ip: &str, job: &str, extra: &[(&str, &str)]) -> World {
        let world = Self::unregistered(runner_ip, job, extra).await;
        world.register_job().await;
        world
    }

    /// Registers the world's job on its runner with octocat as the actor,
    /// and installs what the answer says; returns the answer.
    pub async fn register_job(&self) -> serde_json::Value {
        let (status, body) = self
            .gateway
            .register(&self.job, registration(&self.runner, "octocat"))
            .await;
        assert_eq!(status, 201, "registration failed: {body}");
        self.runner.install_from(&body);
        body
    }

    /// The world before its job registers (the runner agent's tests).
    pub async fn unregistered(runner_ip: &str, job: &str, extra: &[(&str, &str)]) -> World {
        Self::assemble(job, extra, "127.0.0.1", |dir| {
            RunnerSshd::start(dir, runner_ip)
        })
        .await
    }

    /// The world with its runner made by `runner` and the gateway on
    /// `gateway_ip`, before its job registers.
    pub async fn assemble(
        job: &str,
        extra: &[(&str, &str)],
        gateway_ip: &str,
        runner: impl FnOnce(&Path) -> RunnerSshd,
    ) -> World {
        require_tools();
        let dir = tempdir();
        let octocat = keygen(dir.path(), "octocat", "ed25519");
        let mallory = keygen(dir.path(), "mallory", "ed25519");
        let hubot = keygen(dir.path(), "hubot", "ecdsa");
        let admin = keygen(dir.path(), "admin", "rsa");
        let github = FakeGithub::start().await;
        github.set("octocat", &[&octocat.public]);
        github.set("mallory", &[&mallory.public]);
        github.set("hubot", &[&hubot.public]);
        github.set("the-admin", &[&admin.public]);
        let runner = runner(dir.path());
        let mut config = vec![("CI_GATEWAY__ACCESS__ADMINS", "the-admin")];
        config.extend_from_slice(extra);
        let data = dir.path().join("data");
        let gateway = Gateway::start_on(gateway_ip, &data, &github.url, &config).await;
        World {
            dir,
            github,
            runner,
            gateway,
            octocat,
            mallory,
            hubot,
            admin,
            job: job.to_string(),
        }
    }
}

impl World {
    /// Stops the gateway and starts a new one on the same data directory.
    pub async fn restart(self, extra: &[(&str, &str)]) -> World {
        let World {
            dir,
            github,
            runner,
            gateway,
            octocat,
            mallory,
            hubot,
            admin,
            job,
        } = self;
        let tokens = std::mem::take(&mut *gateway.job_tokens.lock().expect("lock"));
        gateway.stop().await;
        let gateway = Gateway::start(&dir.path().join("data"), &github.url, extra).await;
        *gateway.job_tokens.lock().expect("lock") = tokens;
        World {
            dir,
            github,
            runner,
            gateway,
            octocat,
            mallory,
            hubot,
            admin,
            job,
        }
    }

    /// Takes the job token the agent keeps in its state file (under
    /// `<dir>/state/ci-gateway-state`), so the harness's calls act as the
    /// runner; checks the directory and file are the owner's alone, as they
    /// hold that token.
    pub fn adopt_agent_state(&self) {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.dir.path().join("state").join("ci-gateway-state");
        let meta = std::fs::symlink_metadata(&dir).expect("the agent's state directory");
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o700,
            "a private directory"
        );
        let path = dir.join(format!("ci-gateway-job-{}.json", self.job));
        let meta = std::fs::symlink_metadata(&path).expect("the agent left its state file");
        assert_eq!(
            meta.permissions().mode() & 0o077,
            0,
            "the state file holds a token: 0600"
        );
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).expect("read state")).expect("json");
        let token = state["job_token"]
            .as_str()
            .expect("the state keeps the job token");
        self.gateway
            .job_tokens
            .lock()
            .expect("lock")
            .insert(self.job.clone(), token.to_string());
    }

    /// Replica `name` of the world's gateway: its own data dir with the
    /// keys of the world's, on `pg`'s database, listening on 127.0.0.1.
    pub async fn replica(&self, pg: &Postgres, name: &str, extra: &[(&str, &str)]) -> Gateway {
        let data = self.dir.path().join(name);
        share_keys(&self.dir.path().join("data"), &data);
        let env = pg.replica_env();
        let mut config: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        config.push(("CI_GATEWAY__ACCESS__ADMINS", "the-admin"));
        config.extend_from_slice(extra);
        Gateway::start(&data, &self.github.url, &config).await
    }

    /// octocat's ProxyJump to the world's job (`job-<id>`, port 22),
    /// running `command` on the runner.
    pub async fn jump(&self, command: &[&str]) -> Run {
        ssh_jump(
            &self.gateway,
            &self.octocat.path,
            "octocat",
            &self.runner.user,
            &format!("job-{}", self.job),
            22,
            command,
        )
        .await
    }

    /// The live state (session count, kick signal) of the world's job.
    pub fn live(&self) -> Arc<ci_gateway::registry::Live> {
        let id = ci_gateway::ids::JobId::parse(&self.job).expect("job id");
        match self.gateway.gw.registry.lookup(id) {
            ci_gateway::registry::Lookup::Active(_, live) => live,
            other => panic!("job {} is not active: {other:?}", self.job),
        }
    }
}

/// A real PostgreSQL server for the replica tests: Debian's `postgresql`
/// binaries, `initdb` into a temp dir and `postgres` on a loopback address,
/// run as the unprivileged `postgres` user when the tests run as root (the
/// server refuses root). `fsync=off`: the data is thrown away.
pub struct Postgres {
    pub ip: String,
    pub port: u16,
    pub url: String,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

fn postgres_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    versions.sort();
    let bin = versions
        .last()
        .map(|v| v.join("bin").join(name))
        .filter(|p| p.exists());
    bin.unwrap_or_else(|| {
        panic!("PostgreSQL's {name} is missing: install it (apt-get install postgresql; scripts/test does)")
    })
}

/// `program` as the `postgres` user when we are root.
fn as_postgres(program: &Path) -> std::process::Command {
    let root = current_user() == "root";
    let mut cmd = if root {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        std::process::Command::new(program)
    };
    cmd.stdin(Stdio::null());
    cmd
}

impl Postgres {
    /// A fresh cluster listening on `ip` (a loopback address of its own).
    pub async fn start(ip: &str) -> Postgres {
        let dir = tempfile::Builder::new()
            .prefix("cigw-pg-")
            .tempdir()
            .expect("tempdir");
        if current_user() == "root" {
            let status = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown the PostgreSQL dir to postgres");
        }
        let data = dir.path().join("data");
        let out = as_postgres(&postgres_bin("initdb"))
            .args(["-A", "trust", "-U", "cigw", "--no-sync", "-E", "UTF8", "-D"])
            .arg(&data)
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let mut pg = Postgres {
            ip: ip.to_string(),
            port,
            url: format!("postgres://cigw@{ip}:{port}/postgres?sslmode=disable"),
            dir,
            child: None,
        };
        pg.resume().await;
        pg
    }

    /// Starts the server (again) on the same data and port.
    pub async fn resume(&mut self) {
        let data = self.dir.path().join("data");
        let log = std::fs::File::create(self.dir.path().join("server.log")).expect("log");
        let child = as_postgres(&postgres_bin("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-c", &format!("listen_addresses={}", self.ip)])
            .args(["-p", &self.port.to_string()])
            .args([
                "-c",
                &format!("unix_socket_directories={}", self.dir.path().display()),
            ])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=100"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("postgres starts");
        self.child = Some(child);
        let addr: SocketAddr = format!("{}:{}", self.ip, self.port).parse().expect("addr");
        for _ in 0..300 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                // Listening is not accepting logins yet: wait for the
                // startup to finish.
                let ready = as_postgres(&postgres_bin("pg_isready"))
                    .args(["-h", &self.ip, "-p", &self.port.to_string(), "-U", "cigw"])
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false);
                if ready {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("PostgreSQL did not start: {}", self.log());
    }

    /// Stops the server at once (connections drop), keeping its data.
    pub fn halt(&mut self) {
        let pid = self.dir.path().join("data").join("postmaster.pid");
        if let Some(mut child) = self.child.take() {
            // SIGINT to the server itself (not runuser): its fast shutdown.
            let server = std::fs::read_to_string(&pid)
                .ok()
                .and_then(|t| t.lines().next().map(str::to_string))
                .unwrap_or_else(|| child.id().to_string());
            let _ = std::process::Command::new("kill")
                .args(["-INT", &server])
                .status();
            let _ = child.wait();
        }
        for _ in 0..100 {
            if !pid.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The config a replica on this database needs.
    pub fn replica_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CI_GATEWAY__STORAGE__BACKEND", "postgres".to_string()),
            ("CI_GATEWAY__STORAGE__POSTGRES_URL", self.url.clone()),
            ("CI_GATEWAY__STORAGE__HEARTBEAT", "500ms".to_string()),
            ("CI_GATEWAY__STORAGE__REPLICA_TIMEOUT", "3s".to_string()),
        ]
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Copies the keys every replica must share (host keys and CA) from one
/// data dir to another, as an operator deploying replicas does.
pub fn share_keys(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("data dir");
    for entry in std::fs::read_dir(from).expect("keys") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with("_key") {
            std::fs::copy(&path, to.join(name)).expect("copy key");
            set_mode(&to.join(name), 0o600);
        }
    }
}
