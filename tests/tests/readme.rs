//! The README's one-machine trial, run from the README itself (issue 15):
//! the block under "Try the whole path on one machine" runs as a script, as
//! a user without root or sudo, in a fresh home, so the README cannot
//! drift from what works. `cargo run -q -p ci-gateway --` is the one
//! stand-in: a `cargo` on the PATH that runs the binary under test, so the
//! test neither rebuilds nor needs cargo's registry as that user.

mod common;

use common::*;

/// The trial's user: OpenSSH takes `~` from the password database, not
/// from `$HOME`, so a fresh home needs a user of its own.
const TRIAL_USER: &str = "ci-gw-trial";

/// The first ```sh block after the trial's heading.
fn trial_block(readme: &str) -> String {
    let from = readme
        .find("## Try the whole path on one machine")
        .expect("the README has its trial");
    let rest = &readme[from..];
    let start = rest.find("```sh\n").expect("a sh block") + "```sh\n".len();
    let len = rest[start..].find("\n```").expect("the block ends");
    rest[start..start + len + 1].to_string()
}

fn sh(command: &str) -> std::process::Output {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .output()
        .expect("sh")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_trial_runs_as_written() {
    require_tools();
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let block = trial_block(&readme);
    assert!(block.contains("runner register"), "{block}");

    let dir = tempdir();
    set_mode(dir.path(), 0o755);
    let home = dir.path().join("home");
    let trial = dir.path().join("trial");
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&home).expect("home");
    std::fs::create_dir_all(&trial).expect("trial");
    std::fs::create_dir_all(&bin).expect("bin");
    let made = sh(&format!(
        "id -u {TRIAL_USER} >/dev/null 2>&1 && usermod -d {home} {TRIAL_USER} \
         || useradd --system --no-create-home --home-dir {home} --shell /bin/bash {TRIAL_USER}",
        home = home.display()
    ));
    assert!(made.status.success(), "{made:?}");
    let owned = sh(&format!(
        "chown -R {TRIAL_USER} {} {}",
        home.display(),
        trial.display()
    ));
    assert!(owned.status.success(), "{owned:?}");
    let cargo = bin.join("cargo");
    std::fs::write(
        &cargo,
        format!(
            "#!/bin/sh\n# cargo run [-q] -p ci-gateway -- ARGS: the binary under test\nwhile [ $# -gt 0 ] && [ \"$1\" != -- ]; do shift; done\nshift\nexec {} \"$@\"\n",
            env!("CARGO_BIN_EXE_ci-gateway-under-test")
        ),
    )
    .expect("cargo shim");
    set_mode(&cargo, 0o755);
    let script = dir.path().join("trial.sh");
    std::fs::write(&script, &block).expect("script");
    set_mode(&script, 0o644);

    let mut cmd = tokio::process::Command::new("setpriv");
    cmd.args([
        &format!("--reuid={TRIAL_USER}"),
        &format!("--regid={TRIAL_USER}"),
        "--init-groups",
        "env",
        "-i",
        &format!("HOME={}", home.display()),
        &format!(
            "PATH={}:/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
            bin.display()
        ),
        &format!("TRIAL={}", trial.display()),
        &format!("TMPDIR={}", home.display()),
        &format!("USER={TRIAL_USER}"),
        "bash",
        "-e",
        "-o",
        "pipefail",
    ])
    .arg(&script)
    .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
    .stdin(std::process::Stdio::null())
    .kill_on_drop(true);
    let out = tokio::time::timeout(std::time::Duration::from_secs(300), finish(cmd)).await;
    // Whatever happened, nothing of the trial keeps running.
    let _ = sh(&format!("pkill -KILL -u {TRIAL_USER}"));
    let r = out.expect("the trial finishes within 300 s");
    assert_eq!(r.code, 0, "the README trial failed: {r:?}");
    assert!(
        r.stdout
            .contains("ci-gateway: job 9876543210 is registered"),
        "{r:?}"
    );
    // The listing step (`ssh me@`) shows the job.
    assert!(
        r.stdout.contains("ci-gateway: 1 job(s) me may enter"),
        "{r:?}"
    );
    // The first connections were checked against the lines register wrote.
    let known = std::fs::read_to_string(home.join(".ssh/known_hosts")).expect("known_hosts");
    assert!(
        known.lines().any(|l| l.starts_with("[127.0.0.1]:2222 ")),
        "{known}"
    );
    assert!(
        known.lines().any(|l| l.starts_with("job-9876543210 ")),
        "{known}"
    );
    // A key was made for the new user, and it was the one that got in.
    assert!(home.join(".ssh/id_ed25519.pub").exists());
}

/// Every file or directory the README names by path is in the clone (the
/// design lives in docs/, not in a sibling directory a clone lacks).
#[test]
fn the_paths_the_readme_names_exist() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).expect("README.md");
    let mut named = 0;
    for quoted in readme.split('`').skip(1).step_by(2) {
        let path = quoted.trim_end_matches('/');
        let is_path = [
            "docs/", "deploy/", "tests/", "bench/", "gateway/", "scripts/", ".ci/", "config/",
        ]
        .iter()
        .any(|p| path.starts_with(p))
            && !path.contains(' ');
        if is_path {
            named += 1;
            assert!(
                std::path::Path::new(root).join(path).exists(),
                "the README names {path}, which the clone does not have"
            );
        }
    }
    assert!(
        named >= 5,
        "only {named} paths found: the check reads nothing"
    );
    assert!(
        !readme.contains("../shared"),
        "the README points outside the clone"
    );
}
