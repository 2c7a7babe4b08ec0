//! `runner wait`: tell the gateway the job finished, then long-poll until
//! the hold is over, showing who is connected.

use super::*;
use crate::hold::HoldState;

/// One line about who is connected and how long the hold may last.
pub(super) fn summary(job: &JobStatus) -> String {
    let who: Vec<String> = job
        .sessions
        .iter()
        .map(|s| format!("{} ({} mode, since {})", s.login, s.mode, clock(s.since)))
        .collect();
    let deadline = match job.hold.deadline {
        Some(d) => format!(
            "; the hold ends when the last one leaves, or at {} (in {})",
            clock(d),
            span(d.saturating_sub(unix_now()))
        ),
        None => String::new(),
    };
    if who.is_empty() {
        format!("nobody connected{deadline}")
    } else {
        format!("{} connected: {}{deadline}", who.len(), who.join(", "))
    }
}

pub(super) async fn wait(args: WaitArgs) -> Result<ExitCode, Failure> {
    let job = job_id(&args.common).await?;
    let path = state_path(&args.common, &job)?;
    let mut state = read_state(&path);
    if let Some(state) = state.as_mut() {
        state.finished = true;
        write_state(&path, state)?;
    }
    let api = job_api(&args.common, state.as_ref())?;
    let mut unreachable_since: Option<tokio::time::Instant> = None;
    let mut last = String::new();
    let mut first = true;
    let mut had_sessions = false;
    loop {
        let answer = if first {
            api.finish(&job).await
        } else {
            api.get(
                &job,
                Some(Duration::from_secs(crate::api::MAX_WAIT_SECONDS)),
            )
            .await
        };
        let job_state = match answer {
            Ok(v) => {
                unreachable_since = None;
                if first {
                    first = false;
                    println!(
                        "ci-gateway: job {job} finished; the runner stays only while someone is connected"
                    );
                }
                v
            }
            Err(e) => match e.status().map(|s| s.as_u16()) {
                Some(410) => {
                    println!("ci-gateway: {}; done", message(&e));
                    return Ok(ExitCode::SUCCESS);
                }
                Some(404) => {
                    println!(
                        "ci-gateway: job {job} is not registered at the gateway; nothing to hold"
                    );
                    return Ok(ExitCode::SUCCESS);
                }
                Some(_) if !e.is_busy() => return Err(Failure(format!("job {job}: {e}"))),
                // Unreachable, or busy (429, 5xx) beyond the client's own
                // retries: keep the hold and ask again, up to the timeout.
                _ => {
                    let since = *unreachable_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= args.unreachable_timeout {
                        println!(
                            "ci-gateway: the gateway has been unreachable for {}; releasing the runner ({e})",
                            humantime::format_duration(args.unreachable_timeout)
                        );
                        return Ok(ExitCode::SUCCESS);
                    }
                    eprintln!("ci-gateway: {e}; retrying");
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    continue;
                }
            },
        };
        match job_state.hold.state {
            HoldState::Released if had_sessions => {
                println!("ci-gateway: the last session closed; the runner is released");
                return Ok(ExitCode::SUCCESS);
            }
            HoldState::Released => {
                println!("ci-gateway: nobody is connected; the runner is released");
                return Ok(ExitCode::SUCCESS);
            }
            HoldState::Expired => {
                println!("ci-gateway: the hold's time is up; the runner is released");
                return Ok(ExitCode::SUCCESS);
            }
            _ => {}
        }
        had_sessions |= job_state.active_sessions > 0;
        let now = summary(&job_state);
        // Who is connected changes rarely; say it when it does.
        let who = now
            .split("; the hold")
            .next()
            .unwrap_or_default()
            .to_string();
        if who != last {
            println!("ci-gateway: {now}");
            last = who;
        }
    }
}

pub(super) fn message(e: &ApiError) -> String {
    match e {
        ApiError::Status { message, .. } => message.clone(),
        other => other.to_string(),
    }
}
