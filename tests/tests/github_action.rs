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
        out.contains("must be register, wait or deregister"),
        "{out}"
    );
}
