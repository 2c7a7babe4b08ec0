//! `ci-gateway admin`: the operator's commands over the API's `/v1/admin`
//! routes, with an admin token (`api.admin_tokens`). A table for people,
//! `--json` for scripts. The token is read from the environment or a file,
//! never from the command line (where `ps` would show it).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::{json, Value};

use crate::agent::client::{Api, ApiError};
use crate::api::admin::{AdminJob, AdminSession, Ended, Kicked};
use crate::secret::Secret;

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The gateway's API, e.g. https://ci-gateway.example.com:8443
    #[arg(long, env = "CI_GATEWAY_URL", default_value = "http://127.0.0.1:8022")]
    pub gateway: String,
    /// A file holding the admin token (`name:secret`, one of api.admin_tokens);
    /// else CI_GATEWAY_ADMIN_TOKEN.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Extra PEM trust roots for the gateway's HTTPS certificate.
    #[arg(long, env = "CI_GATEWAY_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// JSON instead of a table (for scripts).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// The registered jobs: state, sessions, where the runner is.
    Jobs,
    /// The open sessions (of one job with --job), with the ids `kick` takes.
    Sessions {
        #[arg(long)]
        job: Option<String>,
    },
    /// Close one session; the user sees the reason.
    Kick {
        session: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// End a job now: its sessions are closed with the reason, its hold
    /// ends, and its runner's agent goes on.
    End {
        job: String,
        #[arg(long)]
        reason: String,
    },
}

pub fn run(args: AdminArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ci-gateway admin: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(admin(args)) {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("ci-gateway admin: {message}");
            ExitCode::FAILURE
        }
    }
}

fn token(args: &AdminArgs) -> Result<Secret<String>, String> {
    let raw = match &args.token_file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("--token-file {}: {e}", path.display()))?,
        None => std::env::var("CI_GATEWAY_ADMIN_TOKEN").map_err(|_| {
            "no admin token: set CI_GATEWAY_ADMIN_TOKEN or give --token-file (an entry of the \
             gateway's api.admin_tokens, name:secret)"
                .to_string()
        })?,
    };
    let token = raw.trim();
    if token.is_empty() || token.chars().any(char::is_control) {
        return Err("the admin token is empty or not one line".into());
    }
    Ok(Secret::new(token.to_string()))
}

async fn admin(args: AdminArgs) -> Result<String, String> {
    let api = Api::new(&args.gateway, token(&args)?, args.ca_cert.as_deref())
        .map_err(|e| e.to_string())?;
    let said = |e: ApiError| e.to_string();
    match &args.command {
        AdminCommand::Jobs => {
            let jobs: Vec<AdminJob> = api
                .admin(Method::GET, "/v1/admin/jobs", None)
                .await
                .map_err(said)?;
            if args.json {
                return Ok(to_json(&jobs));
            }
            let now = crate::registry::unix_now();
            let rows = jobs.iter().map(|j| {
                vec![
                    j.job_id.clone(),
                    j.repository.clone().unwrap_or_else(|| "-".into()),
                    j.actor.clone(),
                    j.state.clone(),
                    j.sessions.to_string(),
                    age(now, j.registered_at),
                    j.runner.clone(),
                ]
            });
            Ok(table(
                &[
                    "JOB",
                    "REPOSITORY",
                    "ACTOR",
                    "STATE",
                    "SESSIONS",
                    "AGE",
                    "RUNNER",
                ],
                rows,
            ))
        }
        AdminCommand::Sessions { job } => {
            let path = match job {
                Some(job) => format!("/v1/admin/sessions?job={}", encode(job)),
                None => "/v1/admin/sessions".into(),
            };
            let sessions: Vec<AdminSession> =
                api.admin(Method::GET, &path, None).await.map_err(said)?;
            if args.json {
                return Ok(to_json(&sessions));
            }
            let now = crate::registry::unix_now();
            let rows = sessions.iter().map(|s| {
                vec![
                    s.id.clone(),
                    s.login.clone(),
                    s.mode.clone(),
                    s.jobs.join(","),
                    age(now, s.since),
                    if s.here {
                        "this replica"
                    } else {
                        "another replica"
                    }
                    .into(),
                ]
            });
            Ok(table(
                &["SESSION", "LOGIN", "MODE", "JOBS", "AGE", "WHERE"],
                rows,
            ))
        }
        AdminCommand::Kick { session, reason } => {
            let path = format!("/v1/admin/sessions/{}/kick", encode(session));
            let body = json!({ "reason": reason });
            let kicked: Kicked = api
                .admin(Method::POST, &path, Some(&body))
                .await
                .map_err(said)?;
            if args.json {
                return Ok(to_json(&kicked));
            }
            Ok(match kicked.closed.as_str() {
                "here" => format!("session {} closed\n", kicked.session),
                _ => format!(
                    "session {} is on another replica, which was told to close it\n",
                    kicked.session
                ),
            })
        }
        AdminCommand::End { job, reason } => {
            let path = format!("/v1/admin/jobs/{}/end", encode(job));
            let body = json!({ "reason": reason });
            let ended: Ended = api
                .admin(Method::POST, &path, Some(&body))
                .await
                .map_err(said)?;
            if args.json {
                return Ok(to_json(&ended));
            }
            Ok(format!(
                "job {} ended; {} session(s) closed\n",
                ended.job_id, ended.sessions_closed
            ))
        }
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| Value::Null.to_string());
    s.push('\n');
    s
}

/// Keeps a path segment a path segment (ids are digits or hex, but what a
/// person typed goes to the gateway as typed, and the gateway says why not).
fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// How long ago `then` was, in the largest whole unit.
fn age(now: u64, then: u64) -> String {
    let s = now.saturating_sub(then);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// Columns padded to their widest cell; control characters never reach
/// the operator's terminal.
fn table(head: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect()
    };
    let mut all: Vec<Vec<String>> = vec![head.iter().map(|h| h.to_string()).collect()];
    all.extend(rows.map(|r| r.iter().map(|c| clean(c)).collect()));
    let mut width = vec![0; head.len()];
    for row in &all {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &all {
        let line: Vec<String> = row
            .iter()
            .zip(&width)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_line_up_and_escape_nothing_to_the_terminal() {
        let t = table(
            &["A", "LONGER"],
            vec![vec!["wide cell".into(), "x\u{1b}[2J".into()]].into_iter(),
        );
        assert_eq!(t, "A          LONGER\nwide cell  x?[2J\n");
        assert_eq!(age(1000, 990), "10s");
        assert_eq!(age(10_000, 0), "2h");
        assert_eq!(encode("12/../x"), "12%2F..%2Fx");
    }
}

/// `ci-gateway recordings …`: run where the recordings are (the gateway's
/// host, or wherever `recording.dir` is copied to).
#[derive(Debug, Args)]
pub struct RecordingsArgs {
    /// The gateway's config, for recording.dir (or give --dir).
    #[arg(long, env = "CI_GATEWAY_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// The recordings' directory (default: the config's recording.dir).
    #[arg(long, global = true)]
    pub dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: RecordingsCommand,
}

#[derive(Debug, Subcommand)]
pub enum RecordingsCommand {
    /// The recordings, oldest first: session, job, login, start, size.
    List {
        #[arg(long)]
        job: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Replays one in this terminal with its timing (the files also play in
    /// asciinema's player).
    Play {
        /// A recording's id (as `list` shows it) or a .cast file's path.
        recording: String,
        /// Faster (2) or slower (0.5) than it happened.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// The longest pause shown, in seconds (an idle hour plays in this).
        #[arg(long, default_value_t = 2.0)]
        max_wait: f64,
    },
}

/// One recording as `recordings list` shows it.
#[derive(Debug, serde::Serialize)]
pub struct Listed {
    pub id: String,
    pub session: String,
    pub job: String,
    pub login: String,
    pub started: u64,
    pub bytes: u64,
    pub path: String,
}

pub fn recordings(args: RecordingsArgs) -> ExitCode {
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => match crate::config::Config::load(args.config.as_deref()) {
            Ok(config) => config.recording_dir(),
            Err(e) => {
                eprintln!("ci-gateway recordings: {e}");
                return ExitCode::from(64);
            }
        },
    };
    let result = match args.command {
        RecordingsCommand::List { job, json } => list(&dir, job.as_deref()).map(|all| {
            if json {
                return to_json(&all);
            }
            let rows = all.iter().map(|r| {
                vec![
                    r.id.clone(),
                    r.job.clone(),
                    r.login.clone(),
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + std::time::Duration::from_secs(r.started),
                    )
                    .to_string(),
                    r.bytes.to_string(),
                ]
            });
            table(&["RECORDING", "JOB", "LOGIN", "STARTED", "BYTES"], rows)
        }),
        RecordingsCommand::Play {
            recording,
            speed,
            max_wait,
        } => play(&dir, &recording, speed, max_wait).map(|()| String::new()),
    };
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("ci-gateway recordings: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The header line of a recording (bounded: a header is small).
fn header(path: &std::path::Path) -> Option<Value> {
    use std::io::{BufRead, Read};
    let file = std::fs::File::open(path).ok()?;
    let mut line = String::new();
    std::io::BufReader::new(file.take(64 * 1024))
        .read_line(&mut line)
        .ok()?;
    let v: Value = serde_json::from_str(&line).ok()?;
    (v["version"] == 2).then_some(v)
}

fn list(dir: &std::path::Path, job: Option<&str>) -> Result<Vec<Listed>, String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    };
    let mut all = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(id) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(crate::recording::SUFFIX))
        else {
            continue;
        };
        let Some(h) = header(&path) else {
            continue;
        };
        let field = |k: &str| h["ci_gateway"][k].as_str().unwrap_or_default().to_string();
        if job.is_some_and(|j| j != field("job")) {
            continue;
        }
        all.push(Listed {
            id: id.to_string(),
            session: field("session"),
            job: field("job"),
            login: field("login"),
            started: h["timestamp"].as_u64().unwrap_or(0),
            bytes: entry.metadata().map(|m| m.len()).unwrap_or(0),
            path: path.display().to_string(),
        });
    }
    all.sort_by(|a, b| (a.started, &a.id).cmp(&(b.started, &b.id)));
    Ok(all)
}

/// Writes the recording's output to stdout with its pauses (each at most
/// `max_wait`, divided by `speed`); the exit status it marked goes to stderr.
fn play(dir: &std::path::Path, recording: &str, speed: f64, max_wait: f64) -> Result<(), String> {
    use std::io::{BufRead, Write};
    if !(speed > 0.0 && speed.is_finite() && max_wait >= 0.0 && max_wait.is_finite()) {
        return Err("--speed must be above 0 and --max-wait at least 0".into());
    }
    let path = if recording.ends_with(crate::recording::SUFFIX) || recording.contains('/') {
        PathBuf::from(recording)
    } else if recording
        .bytes()
        .all(|b| b.is_ascii_hexdigit() || b == b'-')
    {
        dir.join(format!("{recording}{}", crate::recording::SUFFIX))
    } else {
        return Err(format!(
            "{recording:?} is neither a recording id (see `recordings list`) nor a .cast file"
        ));
    };
    let file = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = std::io::BufReader::new(file).lines();
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    let head: Value = serde_json::from_str(&first)
        .map_err(|e| format!("{}: not an asciicast file ({e})", path.display()))?;
    if head["version"] != 2 {
        return Err(format!("{}: not an asciicast v2 file", path.display()));
    }
    let mut out = std::io::stdout().lock();
    let mut last = 0.0f64;
    for (n, line) in lines.enumerate() {
        let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let event: Value = serde_json::from_str(&line)
            .map_err(|e| format!("{} line {}: {e}", path.display(), n + 2))?;
        let (Some(t), Some(kind), Some(data)) =
            (event[0].as_f64(), event[1].as_str(), event[2].as_str())
        else {
            return Err(format!("{} line {}: not an event", path.display(), n + 2));
        };
        let pause = (t - last).clamp(0.0, max_wait) / speed;
        last = t;
        match kind {
            "o" => {
                if pause > 0.0 {
                    let _ = out.flush();
                    std::thread::sleep(std::time::Duration::from_secs_f64(pause));
                }
                out.write_all(data.as_bytes())
                    .map_err(|e| format!("stdout: {e}"))?;
            }
            "m" => eprintln!("\r\n[{data}]"),
            _ => {}
        }
    }
    out.flush().map_err(|e| format!("stdout: {e}"))
}
