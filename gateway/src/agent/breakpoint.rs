//! `runner breakpoint`: the job waits at this step while someone debugs it.
//!
//! The gateway marks the job paused (`POST …/pause`, shown by `GET` as
//! `paused`) and hands back the terms: the deadline (`hold.max`) and how
//! long to wait for a first person (`hold.connect_grace`). The job goes on
//! (`POST …/resume`) when a connected person runs `ci-gateway-continue`
//! on the runner, when the last session closes after someone was in, when
//! nobody came within the grace, or at the deadline. Sessions are not
//! closed: the job is still running, and they may stay for its next steps.
//!
//! `ci-gateway-continue` is a small script next to this binary: it makes a
//! flag file in the agent's private state directory, which only the runner
//! user (the one people log in as) can write.

use super::*;

/// How often the flag file is looked at while waiting for the gateway.
const POLL: Duration = Duration::from_secs(1);

/// The flag file `ci-gateway-continue` makes for `job`.
fn flag_path(state_path: &Path) -> PathBuf {
    state_path.with_extension("continue")
}

/// Installs `ci-gateway-continue` (and a `.cmd` twin on Windows) in `dir`.
fn install_continue(dir: &Path, job: &str, flag: &Path) -> Result<PathBuf, Failure> {
    let failed = |p: &Path, e: std::io::Error| {
        Failure(format!(
            "cannot install {} ({e}); pass --bin-dir with a directory you can write",
            p.display()
        ))
    };
    let path = dir.join("ci-gateway-continue");
    let flag_shown = flag.display().to_string().replace('\'', "'\\''");
    let script = format!(
        "#!/bin/sh\n# Installed by `ci-gateway runner breakpoint`: job {job} goes on.\n\
         : > '{flag_shown}' && echo \"ci-gateway: job {job} goes on with its next step\"\n"
    );
    std::fs::write(&path, script).map_err(|e| failed(&path, e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| failed(&path, e))?;
    }
    if cfg!(windows) {
        let cmd = dir.join("ci-gateway-continue.cmd");
        let text = format!(
            "@echo off\r\ntype nul > \"{}\"\r\necho ci-gateway: job {job} goes on with its next step\r\n",
            flag.display()
        );
        std::fs::write(&cmd, text).map_err(|e| failed(&cmd, e))?;
    }
    Ok(path)
}

/// Why the job goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GoOn {
    Continued,
    LastLeft,
    NobodyCame,
    Deadline,
}

/// The pure part: whether the job goes on now, and why.
fn go_on(
    continued: bool,
    had_sessions: bool,
    sessions: usize,
    now: u64,
    pause: &crate::api::PauseView,
) -> Option<GoOn> {
    if continued {
        Some(GoOn::Continued)
    } else if had_sessions && sessions == 0 {
        Some(GoOn::LastLeft)
    } else if !had_sessions && sessions == 0 && now >= pause.since + pause.connect_grace_seconds {
        Some(GoOn::NobodyCame)
    } else if now >= pause.deadline {
        Some(GoOn::Deadline)
    } else {
        None
    }
}

pub(super) async fn breakpoint(args: BreakpointArgs) -> Result<ExitCode, Failure> {
    let job = job_id(&args.common).await?;
    let path = state_path(&args.common, &job)?;
    let state = read_state(&path);
    let api = job_api(&args.common, state.as_ref())?;
    let flag = flag_path(&path);
    let _ = std::fs::remove_file(&flag);
    let dir = match &args.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .ok_or_else(|| Failure("cannot tell where this binary is; pass --bin-dir".into()))?,
    };
    let script = install_continue(&dir, &job, &flag)?;
    let status = match api.set_paused(&job, true).await {
        Ok(s) => s,
        Err(e) if matches!(e.status().map(|s| s.as_u16()), Some(404 | 410)) => {
            println!("ci-gateway: {}; nothing to pause", wait::message(&e));
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(Failure(format!("job {job}: {e}"))),
    };
    let Some(mut pause) = status.pause.clone() else {
        return Err(Failure(format!("job {job}: the gateway did not pause it")));
    };
    // Timed by this machine's clock from now on, whatever the gateway's says.
    let now = unix_now();
    pause.deadline = now + pause.deadline.saturating_sub(pause.since);
    pause.since = now;
    println!("ci-gateway: job {job} is paused at this step");
    println!("      {}", pause.ssh_command);
    println!("      {}", pause.jump_command);
    println!(
        "  It goes on when someone connected runs `ci-gateway-continue` ({}), when the last \
         session closes, if nobody connects within {}, or at {} at the latest.",
        script.display(),
        span(pause.connect_grace_seconds),
        clock(pause.deadline)
    );
    let mut had_sessions = status.active_sessions > 0;
    let mut sessions = status.active_sessions;
    let mut unreachable_since: Option<tokio::time::Instant> = None;
    let mut last = String::new();
    let why = loop {
        let continued = flag.exists();
        if let Some(why) = go_on(continued, had_sessions, sessions, unix_now(), &pause) {
            break why;
        }
        match api.get(&job, Some(POLL)).await {
            Ok(now) => {
                unreachable_since = None;
                sessions = now.active_sessions;
                had_sessions |= sessions > 0;
                let line = wait::summary(&now);
                let who = line
                    .split("; the hold")
                    .next()
                    .unwrap_or_default()
                    .to_string();
                if who != last {
                    println!("ci-gateway: {who}");
                    last = who;
                }
            }
            Err(e) if matches!(e.status().map(|s| s.as_u16()), Some(404 | 410)) => {
                println!("ci-gateway: {}; going on", wait::message(&e));
                let _ = std::fs::remove_file(&flag);
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) => {
                let since = *unreachable_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= args.unreachable_timeout {
                    println!(
                        "ci-gateway: the gateway has been unreachable too long; going on ({e})"
                    );
                    break GoOn::Deadline;
                }
                eprintln!("ci-gateway: {e}; retrying");
                tokio::time::sleep(POLL).await;
            }
        }
    };
    let _ = std::fs::remove_file(&flag);
    let said = match why {
        GoOn::Continued => "ci-gateway-continue was run",
        GoOn::LastLeft => "the last session closed",
        GoOn::NobodyCame => "nobody connected",
        GoOn::Deadline => "the breakpoint's time is up",
    };
    if let Err(e) = api.set_paused(&job, false).await {
        eprintln!("ci-gateway: could not tell the gateway the job goes on: {e}");
    }
    println!("ci-gateway: {said}; job {job} goes on");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_goes_on_for_exactly_these_reasons() {
        let pause = crate::api::PauseView {
            since: 1000,
            deadline: 1000 + 7200,
            connect_grace_seconds: 600,
            ssh_command: String::new(),
            jump_command: String::new(),
        };
        assert_eq!(go_on(true, false, 0, 1000, &pause), Some(GoOn::Continued));
        assert_eq!(
            go_on(false, false, 0, 1599, &pause),
            None,
            "within the grace"
        );
        assert_eq!(go_on(false, false, 0, 1600, &pause), Some(GoOn::NobodyCame));
        assert_eq!(go_on(false, true, 1, 5000, &pause), None, "someone is in");
        assert_eq!(go_on(false, true, 0, 5000, &pause), Some(GoOn::LastLeft));
        assert_eq!(go_on(false, true, 2, 8200, &pause), Some(GoOn::Deadline));
    }
}
