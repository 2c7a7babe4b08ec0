//! `ssh <login>@gateway` (jump mode's login with a shell, or the command
//! `jobs` / `jobs --json`): the jobs that login may enter, with the
//! commands to copy for both modes, then exit 0. Nothing else runs on a
//! jump-mode session channel: any other command gets one line saying what
//! does, and exit 2. The listing is built from [`crate::access::may_enter`],
//! the same decision the forwards take, so it never shows a job the login
//! may not enter.

use std::sync::Arc;
use std::time::Duration;

use russh::server::{self, Msg};
use russh::{Channel, ChannelMsg};

use crate::api::{HoldView, SessionView};
use crate::gateway::Gateway;
use crate::ids::GithubLogin;

/// At most this many jobs are listed (an admin on a big gateway); the rest
/// are counted.
pub const MAX_LISTED: usize = 200;
/// A session channel that asks for nothing within this is closed.
const IDLE: Duration = Duration::from_secs(30);
/// Requests taken before the shell or exec (pty, env, window changes).
const MAX_REQUESTS: usize = 64;

/// One job as the listing shows it: what a person needs to pick it and
/// get in, and nothing of where the runner is (its address, its keys).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    pub job_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<u64>,
    pub actor: String,
    pub os: crate::registry::Os,
    /// `https://github.com/<repo>/actions/runs/<run>/job/<id>`, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub hold: HoldView,
    /// Waiting at a breakpoint (`runner breakpoint`).
    pub paused: bool,
    pub sessions: Vec<SessionView>,
    pub ssh_command: String,
    /// Absent when only a GitHub role admits the login: jump mode reaches
    /// the runner's own sshd, which has only the named people's keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jump_command: Option<String>,
}

/// Repositories one listing asks GitHub's roles for, at most.
const MAX_ROLE_REPOSITORIES: usize = 16;
/// How long one listing waits for GitHub's roles in all.
const ROLE_BUDGET: std::time::Duration = std::time::Duration::from_secs(10);

/// Every job `login` may enter, lowest id first, at most [`MAX_LISTED`];
/// and how many more there were.
pub async fn jobs_for(gw: &Gateway, login: &GithubLogin) -> (Vec<Listed>, usize) {
    let mut jobs = Vec::new();
    let mut by_role = Vec::new();
    for (reg, live) in gw.registry.active() {
        if crate::access::named_people(&reg, &gw.policy).contains(login) {
            jobs.push((reg, live, true));
        } else {
            by_role.push((reg, live));
        }
    }
    // The jobs only a role could admit: one role lookup per repository
    // (cached like keys), for at most MAX_ROLE_REPOSITORIES repositories
    // and ROLE_BUDGET in all, so one listing cannot spend GitHub's rate
    // limit or wait on it without end. The rest are left out (deny).
    let roles_configured = gw.policy.repository_permission.is_some() || !gw.policy.teams.is_empty();
    if roles_configured && !by_role.is_empty() {
        let mut roles: std::collections::HashMap<Option<String>, crate::access::Roles> =
            Default::default();
        let lookups = async {
            for (reg, _) in &by_role {
                if roles.len() >= MAX_ROLE_REPOSITORIES {
                    break;
                }
                if !roles.contains_key(&reg.repository) {
                    let facts = gw.keys.roles(&gw.policy, reg.repository.as_deref()).await;
                    roles.insert(reg.repository.clone(), facts);
                }
            }
        };
        let _ = tokio::time::timeout(ROLE_BUDGET, lookups).await;
        for (reg, live) in by_role {
            let admitted = roles
                .get(&reg.repository)
                .is_some_and(|r| crate::access::may_enter(&reg, login, &gw.policy, r));
            if admitted {
                jobs.push((reg, live, false));
            }
        }
    }
    jobs.sort_by_key(|(reg, _, _)| reg.job_id.get());
    let more = jobs.len().saturating_sub(MAX_LISTED);
    let public = gw.config.public_address();
    let listed = jobs
        .into_iter()
        .take(MAX_LISTED)
        .map(|(reg, live, named)| {
            let (ssh_command, _, _, _) = crate::api::user_commands(&public, &reg);
            let sessions = live.sessions();
            Listed {
                job_id: reg.job_id.to_string(),
                repository: reg.repository.clone(),
                run_id: reg.run_id,
                actor: reg.actor.to_string(),
                os: reg.os,
                url: job_url(&reg),
                hold: crate::hold::describe(gw, &reg, sessions.len()),
                paused: reg.paused_at.is_some(),
                sessions: sessions.iter().map(SessionView::from).collect(),
                ssh_command,
                jump_command: named.then(|| {
                    format!(
                        "ssh -J {login}@{} {}@job-{}",
                        public.jump_spec(),
                        reg.user,
                        reg.job_id
                    )
                }),
            }
        })
        .collect();
    (listed, more)
}

/// The job's page on GitHub, when the registration named its repository
/// and run.
pub fn job_url(reg: &crate::registry::Registration) -> Option<String> {
    match (&reg.repository, reg.run_id) {
        (Some(repo), Some(run)) => Some(format!(
            "https://github.com/{repo}/actions/runs/{run}/job/{}",
            reg.job_id
        )),
        _ => None,
    }
}

/// "1h 5m", "12m", "40s": whole minutes from a minute up (humantime, as
/// the agent prints spans).
pub fn span(seconds: u64) -> String {
    let shown = if seconds >= 60 {
        seconds / 60 * 60
    } else {
        seconds
    };
    humantime::format_duration(Duration::from_secs(shown)).to_string()
}

/// Where a job stands, in words: "running", or "holding, 1h 5m left".
pub fn state_line(hold: &HoldView) -> String {
    use crate::hold::HoldState;
    match (hold.state, hold.remaining_seconds) {
        (HoldState::Running, _) => "running".to_string(),
        (state, Some(left)) => format!("{}, {} left", state.as_str(), span(left)),
        (state, None) => state.as_str().to_string(),
    }
}

/// The listing as text, `\n`-terminated lines.
pub fn text(login: &GithubLogin, jobs: &[Listed], more: usize) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if jobs.is_empty() {
        let _ = writeln!(
            out,
            "ci-gateway: no job that {login} may enter is registered now"
        );
        return out;
    }
    let _ = writeln!(
        out,
        "ci-gateway: {} job(s) {login} may enter",
        jobs.len() + more
    );
    for job in jobs {
        let _ = writeln!(out);
        let mut head = format!("job {}", job.job_id);
        if let Some(repo) = &job.repository {
            let _ = write!(head, "  {repo}");
            if let Some(run) = job.run_id {
                let _ = write!(head, " run {run}");
            }
        }
        let _ = writeln!(
            out,
            "{head}  actor {}  {}{}",
            job.actor,
            state_line(&job.hold),
            if job.paused {
                ", paused at a breakpoint"
            } else {
                ""
            }
        );
        if let Some(url) = &job.url {
            let _ = writeln!(out, "  {url}");
        }
        if !job.sessions.is_empty() {
            let who: Vec<String> = job
                .sessions
                .iter()
                .map(|p| format!("{} ({})", p.login, p.mode))
                .collect();
            let _ = writeln!(out, "  connected: {}", who.join(", "));
        }
        let _ = writeln!(out, "  shell: {}", job.ssh_command);
        if let Some(jump) = &job.jump_command {
            let _ = writeln!(out, "  jump:  {jump}");
        }
    }
    if more > 0 {
        let _ = writeln!(out, "\n... and {more} more (jobs --json lists the same)");
    }
    out
}

/// What a job-mode session channel needs to write its banner: the text is
/// made when a shell with a pty starts, not when the channel opens, so it
/// names who is connected then, and a channel that never starts a shell
/// (exec, scp, sftp, or one left idle) holds no text.
pub struct Banner {
    pub gw: Arc<Gateway>,
    pub job: Arc<crate::registry::Registration>,
    pub live: Arc<crate::registry::Live>,
    /// The login entering; one of the job's sessions is this one.
    pub login: String,
}

impl Banner {
    pub fn text(&self) -> String {
        banner(&self.gw, &self.job, &self.live, &self.login)
    }
}

/// The most others a banner names; the rest are counted.
const BANNER_NAMES: usize = 8;

/// The lines a job-mode shell with a pty shows on stderr before the shell
/// (`me`: the login entering; one of its sessions is this one).
fn banner(
    gw: &Gateway,
    reg: &crate::registry::Registration,
    live: &crate::registry::Live,
    me: &str,
) -> String {
    use std::fmt::Write;
    let mut sessions = live.sessions();
    let hold = crate::hold::describe(gw, reg, sessions.len());
    if let Some(mine) = sessions.iter().position(|s| s.login == me) {
        sessions.remove(mine);
    }
    let mut out = format!("ci-gateway: job {}", reg.job_id);
    if let Some(repo) = &reg.repository {
        let _ = write!(out, " of {repo}");
    }
    out.push('\n');
    if let Some(url) = job_url(reg) {
        let _ = writeln!(out, "  {url}");
    }
    match hold.deadline {
        Some(deadline) => {
            let _ = writeln!(
                out,
                "  {}: the runner is held until {} UTC, or until the last session closes",
                state_line(&hold),
                clock(deadline)
            );
        }
        None if reg.paused_at.is_some() => {
            let _ = writeln!(
                out,
                "  paused at a breakpoint: run ci-gateway-continue to let the job go on, or leave and it goes on when the last session closes"
            );
        }
        None => {
            let _ = writeln!(
                out,
                "  running; after its steps the runner stays while someone is connected, at most {}",
                span(gw.config.hold.max.as_secs())
            );
        }
    }
    if !sessions.is_empty() {
        let _ = writeln!(out, "  also connected: {}", others(&sessions));
    }
    out
}

/// The others on a job, as a banner names them: the first few, and how
/// many more (a job with many sessions gets one short line, not a list).
fn others(sessions: &[crate::registry::SessionInfo]) -> String {
    let mut who: Vec<String> = sessions
        .iter()
        .take(BANNER_NAMES)
        .map(|p| format!("{} ({})", p.login, p.mode))
        .collect();
    if sessions.len() > BANNER_NAMES {
        who.push(format!("and {} more", sessions.len() - BANNER_NAMES));
    }
    who.join(", ")
}

/// `HH:MM` of a Unix time, UTC.
fn clock(unix: u64) -> String {
    let day = unix % 86_400;
    format!("{:02}:{:02}", day / 3600, (day % 3600) / 60)
}

/// What a command on a jump-mode login asks for.
#[derive(Debug, PartialEq, Eq)]
enum Ask {
    Text,
    Json,
    Other(String),
}

fn parse_command(command: &[u8]) -> Ask {
    let command = String::from_utf8_lossy(command);
    let words: Vec<&str> = command.split_whitespace().collect();
    match words.as_slice() {
        [] | ["jobs"] => Ask::Text,
        ["jobs", "--json"] => Ask::Json,
        _ => Ask::Other(crate::audit::shown(&command)),
    }
}

/// Serves one session channel of a jump-mode login, then closes it.
pub async fn serve(
    gw: Arc<Gateway>,
    login: GithubLogin,
    mut channel: Channel<Msg>,
    handle: server::Handle,
) {
    let id = channel.id();
    let mut pty = false;
    let mut ask = None;
    for _ in 0..MAX_REQUESTS {
        let Ok(Some(msg)) = tokio::time::timeout(IDLE, channel.wait()).await else {
            break;
        };
        match msg {
            ChannelMsg::RequestPty { want_reply, .. } => {
                pty = true;
                if want_reply {
                    let _ = handle.channel_reply(id, true).await;
                }
            }
            ChannelMsg::RequestShell { want_reply } => {
                if want_reply {
                    let _ = handle.channel_reply(id, true).await;
                }
                ask = Some(Ask::Text);
                break;
            }
            ChannelMsg::Exec {
                want_reply,
                command,
            } => {
                if want_reply {
                    let _ = handle.channel_reply(id, true).await;
                }
                ask = Some(parse_command(&command));
                break;
            }
            ChannelMsg::RequestSubsystem { want_reply, name } => {
                if want_reply {
                    let _ = handle.channel_reply(id, true).await;
                }
                ask = Some(Ask::Other(format!(
                    "the {} subsystem",
                    crate::audit::shown(&name)
                )));
                break;
            }
            ChannelMsg::WindowChange { .. } => {}
            ChannelMsg::Eof | ChannelMsg::Close => break,
            other => {
                // env, X11, agent forwarding, unknown requests: not here.
                if crate::ssh::channel::wants_reply(&other) {
                    let _ = handle.channel_reply(id, false).await;
                }
            }
        }
    }
    // With a pty the client's terminal is raw: lines end in CR LF.
    let lines = |s: String| {
        if pty {
            s.replace('\n', "\r\n")
        } else {
            s
        }
    };
    let status = match ask {
        Some(Ask::Text) => {
            let (jobs, more) = jobs_for(&gw, &login).await;
            let _ = channel
                .data(lines(text(&login, &jobs, more)).as_bytes())
                .await;
            0
        }
        Some(Ask::Json) => {
            let (jobs, more) = jobs_for(&gw, &login).await;
            let doc = serde_json::json!({ "login": login.as_str(), "jobs": jobs, "more": more });
            let _ = channel.data(lines(format!("{doc}\n")).as_bytes()).await;
            0
        }
        Some(Ask::Other(what)) => {
            let public = gw.config.public_address();
            let line = format!(
                "ci-gateway: {login}@gateway lists your jobs (`jobs`, `jobs --json`) and runs \
                 nothing else ({what}); for a shell on a job: ssh {}<job-id>@{}\n",
                public.port_flag(),
                public.host
            );
            let _ = channel.extended_data(1, lines(line).as_bytes()).await;
            2
        }
        None => {
            let _ = channel.close().await;
            return;
        }
    };
    let _ = channel.exit_status(status).await;
    let _ = channel.eof().await;
    let _ = channel.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_a_login_takes() {
        assert_eq!(parse_command(b""), Ask::Text);
        assert_eq!(parse_command(b"jobs"), Ask::Text);
        assert_eq!(parse_command(b"  jobs  --json "), Ask::Json);
        assert!(matches!(parse_command(b"rm -rf /"), Ask::Other(_)));
        assert!(matches!(parse_command(b"jobs --yaml"), Ask::Other(_)));
    }

    #[test]
    fn a_banner_names_a_few_others_and_counts_the_rest() {
        let people = |n: usize| -> Vec<crate::registry::SessionInfo> {
            (0..n)
                .map(|i| crate::registry::SessionInfo {
                    id: format!("{i:016x}"),
                    login: format!("person{i}"),
                    mode: if i % 2 == 0 { "job" } else { "jump" },
                    since: 0,
                })
                .collect()
        };
        assert_eq!(others(&people(2)), "person0 (job), person1 (jump)");
        assert_eq!(
            others(&people(BANNER_NAMES)).matches('(').count(),
            BANNER_NAMES
        );
        let many = others(&people(1000));
        assert!(many.ends_with("person7 (jump), and 992 more"), "{many}");
        assert!(!many.contains("person8"), "{many}");
    }

    #[test]
    fn spans_read_as_people_say_them() {
        assert_eq!(span(40), "40s");
        assert_eq!(span(720), "12m");
        assert_eq!(span(3900), "1h 5m");
        assert_eq!(span(3959), "1h 5m");
        assert_eq!(clock(86_400 * 3 + 14 * 3600 + 5 * 60 + 59), "14:05");
    }
}
