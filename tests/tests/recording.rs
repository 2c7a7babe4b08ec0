//! Session recordings (issue 16 point 3): a real pty session through the
//! gateway is written as asciicast v2, replays to what the user saw, keeps
//! what was typed out by default, and a recording that cannot be written
//! refuses the session before the runner sees a byte.

mod common;

use std::os::unix::fs::PermissionsExt;

use base64::Engine as _;
use common::*;
use serde_json::Value;

fn events(path: &std::path::Path) -> (Value, Vec<Value>) {
    let text = std::fs::read_to_string(path).expect("the recording");
    let mut lines = text.lines();
    let header = serde_json::from_str(lines.next().expect("a header")).expect("json header");
    let events = lines
        .map(|l| serde_json::from_str(l).expect("json event"))
        .collect();
    (header, events)
}

/// `tests/scripts/pty_session.py` as octocat on the world's job: a pty
/// session that types with echo off, resizes, and exits 3.
async fn pty_session(w: &World) -> Run {
    let args = vec![
        format!("{}/scripts/pty_session.py", env!("CARGO_MANIFEST_DIR")),
        w.gateway.ssh.ip().to_string(),
        w.gateway.ssh.port().to_string(),
        w.job.clone(),
        w.octocat.path.display().to_string(),
    ];
    run("/usr/bin/python3", &args, None).await
}

/// The files in the recordings directory.
fn recordings(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .expect("the recordings directory")
        .map(|e| e.expect("entry").path())
        .collect()
}

fn cli(args: &[&str]) -> tokio::process::Command {
    let mut cmd = agent_command();
    cmd.args(args);
    cmd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pty_session_is_recorded_as_asciicast_and_replays_to_what_the_user_saw() {
    let w = World::with_config(
        "127.0.0.190",
        "9876543638",
        &[("CI_GATEWAY__RECORDING__ENABLED", "true")],
    )
    .await;
    let dir = w.dir.path().join("data/recordings");

    // Not a pty: not recorded.
    let r = ssh(&w.gateway, &w.octocat.path, &w.job, &["echo plain"], None).await;
    assert_eq!(r.stdout, "plain\n", "{r:?}");
    assert!(!dir.exists() || std::fs::read_dir(&dir).expect("dir").next().is_none());

    let r = pty_session(&w).await;
    assert_eq!(r.code, 0, "{r:?}");
    let answer: Value = serde_json::from_str(r.stdout.trim()).expect("the script's json");
    assert_eq!(answer["status"], 3, "{answer}");
    let seen = base64::engine::general_purpose::STANDARD
        .decode(answer["out"].as_str().expect("out"))
        .expect("base64");
    let seen = String::from_utf8(seen).expect("utf-8");
    assert!(seen.contains("café"), "{seen:?}");

    // One file, named by the session id the audit trail gives it, private.
    let files = recordings(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    let path = &files[0];
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(path), 0o600);
    assert_eq!(mode(&dir), 0o700);
    let id = path
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("a name")
        .to_string();
    let audit = std::fs::read_to_string(w.dir.path().join("data/audit.jsonl")).expect("audit");
    let audit: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let shown = path.display().to_string();
    assert!(
        audit.iter().any(|e| e["event"] == "session_start"
            && e["session"] == id.as_str()
            && e["recording"] == shown.as_str()),
        "session_start names the recording"
    );
    eventually("session_end is written", || {
        std::fs::read_to_string(w.dir.path().join("data/audit.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|e| e["event"] == "session_end" && e["recordings"][0] == shown.as_str())
    })
    .await;
    // The recording's writer task finishes the file on its own, after the
    // channel closed: session_end can be on disk before the last lines are.
    eventually("the recording ends with the exit marker", || {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .last()
            .is_some_and(|l| l.contains("\"m\""))
    })
    .await;

    // asciicast v2: the header, then events in time order.
    let (header, events) = events(path);
    assert_eq!(header["version"], 2);
    assert_eq!(
        (header["width"].clone(), header["height"].clone()),
        (80.into(), 24.into())
    );
    assert_eq!(header["env"]["TERM"], "xterm");
    assert_eq!(header["ci_gateway"]["job"], w.job.as_str());
    assert_eq!(header["ci_gateway"]["login"], "octocat");
    assert_eq!(header["ci_gateway"]["session"], id.as_str());
    let mut last = 0.0;
    for e in &events {
        let t = e[0].as_f64().expect("a time");
        assert!(t >= last, "out of order: {e}");
        last = t;
        let kind = e[1].as_str().expect("a kind");
        assert!(["o", "r", "m"].contains(&kind), "input was recorded: {e}");
    }
    let output: String = events
        .iter()
        .filter(|e| e[1] == "o")
        .map(|e| e[2].as_str().expect("text"))
        .collect();
    assert_eq!(output, seen, "the recording differs from what the user saw");
    let resize = events
        .iter()
        .position(|e| e[1] == "r" && e[2] == "120x40")
        .expect("a resize event");
    let size_shown = events
        .iter()
        .position(|e| e[1] == "o" && e[2].as_str().is_some_and(|t| t.contains("40 120")))
        .expect("the new size's output");
    assert!(
        resize < size_shown,
        "the resize is recorded where it happened"
    );
    let exit = events.last().expect("events");
    assert_eq!(
        (&exit[1], &exit[2]),
        (&"m".into(), &"exit status 3".into()),
        "{exit}"
    );
    // Typed with echo off: the typed text is nowhere, its output is.
    let raw = std::fs::read_to_string(path).expect("read");
    assert!(
        raw.contains("typed-42") && !raw.contains("$((6*7))"),
        "{raw}"
    );

    // The CLI lists it by job and replays it to the same bytes.
    let config = w.dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\ndata_dir = {:?}\n[recording]\nenabled = true\n",
            w.dir.path().join("data").display().to_string()
        ),
    )
    .expect("config");
    let listed = finish(cli(&[
        "recordings",
        "--config",
        &config.display().to_string(),
        "list",
        "--job",
        &w.job,
        "--json",
    ]))
    .await;
    assert_eq!(listed.code, 0, "{listed:?}");
    let listed: Value = serde_json::from_str(&listed.stdout).expect("json");
    assert_eq!(listed[0]["id"], id.as_str(), "{listed}");
    assert_eq!(listed[0]["login"], "octocat");
    let other = finish(cli(&[
        "recordings",
        "--dir",
        &dir.display().to_string(),
        "list",
        "--job",
        "1",
    ]))
    .await;
    assert_eq!(
        other.stdout.lines().count(),
        1,
        "only the header: {other:?}"
    );
    let played = finish(cli(&[
        "recordings",
        "--dir",
        &dir.display().to_string(),
        "play",
        &id,
        "--speed",
        "100",
    ]))
    .await;
    assert_eq!(played.code, 0, "{played:?}");
    assert_eq!(played.stdout, seen);
    assert!(played.stderr.contains("[exit status 3]"), "{played:?}");
    let refused = finish(cli(&["recordings", "--dir", "/", "play", "../etc/passwd"])).await;
    assert_ne!(refused.code, 0);
}

/// With `record_input`, what the user typed is recorded too (`i` events),
/// also with the terminal's echo off, in order with the output it caused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_record_input_what_the_user_typed_is_recorded_in_order() {
    let w = World::with_config(
        "127.0.0.195",
        "9876543195",
        &[
            ("CI_GATEWAY__RECORDING__ENABLED", "true"),
            ("CI_GATEWAY__RECORDING__RECORD_INPUT", "true"),
        ],
    )
    .await;
    let r = pty_session(&w).await;
    assert_eq!(r.code, 0, "{r:?}");
    let dir = w.dir.path().join("data/recordings");
    let files = recordings(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    let (_, events) = events(&files[0]);
    let typed: String = events
        .iter()
        .filter(|e| e[1] == "i")
        .map(|e| e[2].as_str().expect("text"))
        .collect();
    // The script types these with `stty -echo` in force: only the input
    // events have them.
    assert!(typed.contains("echo typed-$((6*7))"), "{typed:?}");
    assert!(typed.contains("exit 3\n"), "{typed:?}");
    let typed_at = events
        .iter()
        .position(|e| e[1] == "i" && e[2].as_str().is_some_and(|t| t.contains("$((6*7))")))
        .expect("the typed command");
    let output_at = events
        .iter()
        .position(|e| e[1] == "o" && e[2].as_str().is_some_and(|t| t.contains("typed-42")))
        .expect("its output");
    assert!(typed_at < output_at, "input recorded after its output");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recording_that_cannot_be_written_refuses_the_session_and_jump_mode_can_be_off() {
    let dir = tempdir();
    // A directory under a file: nobody (root included) can make it.
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, "x").expect("write");
    let recordings = blocker.join("recordings").display().to_string();
    let w = World::with_config(
        "127.0.0.191",
        "9876543639",
        &[
            ("CI_GATEWAY__RECORDING__ENABLED", "true"),
            ("CI_GATEWAY__RECORDING__DIR", &recordings),
            ("CI_GATEWAY__RECORDING__ALLOW_JUMP", "false"),
        ],
    )
    .await;
    let touched = w.dir.path().join("ran");
    let mut args = client_opts(&w.octocat.path);
    args.extend([
        "-tt".into(),
        "-p".into(),
        w.gateway.ssh.port().to_string(),
        format!("{}@127.0.0.1", w.job),
        format!("touch {}", touched.display()),
    ]);
    let r = run("ssh", &args, None).await;
    assert_eq!(r.code, 255, "{r:?}");
    assert!(
        r.stderr.contains("cannot record this one") && r.stderr.contains("recording.required"),
        "{r:?}"
    );
    assert!(!touched.exists(), "the runner ran an unrecorded command");
    let (status, body) = w.gateway.http("GET", "/healthz", None, None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("pty sessions are refused"), "{body}");
    // Without a pty nothing is recorded, so nothing is refused.
    let r = ssh(&w.gateway, &w.octocat.path, &w.job, &["echo fine"], None).await;
    assert_eq!(r.stdout, "fine\n", "{r:?}");

    // Jump mode cannot be recorded: off, with the reason.
    let r = w.jump(&["true"]).await;
    assert_eq!(r.code, 255, "{r:?}");
    assert!(r.stderr.contains("recording.allow_jump = false"), "{r:?}");
}
