//! Who may reach which job: pure functions of the job, the person and the
//! operator's policy. No I/O, no keys: callers identify the person first and
//! look the job up.

use std::sync::Arc;

use crate::ids::{GithubLogin, JobId};
use crate::registry::{Live, Lookup, Registration};

/// The operator's side of the decision.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub admins: Vec<GithubLogin>,
    /// Whether a registration's own `allowed_users` list is honoured.
    pub allow_extra_users: bool,
    /// The ports a jump-mode forward may name (`<job-id>:<port>`); 22 is
    /// the runner's registered SSH port.
    pub jump_ports: Vec<u16>,
}

/// Everyone allowed on `job`, in a stable order (actor, listed users, admins),
/// without repeats. Job mode tries the offered key against these people's keys.
pub fn allowed_people(job: &Registration, policy: &Policy) -> Vec<GithubLogin> {
    let mut people = vec![job.actor.clone()];
    let extra = if policy.allow_extra_users {
        job.allowed_users.as_slice()
    } else {
        &[]
    };
    for login in extra.iter().chain(policy.admins.iter()) {
        if !people.contains(login) {
            people.push(login.clone());
        }
    }
    people
}

/// Deny by default: only the people [`allowed_people`] names get in.
pub fn may_enter(job: &Registration, who: &GithubLogin, policy: &Policy) -> bool {
    allowed_people(job, policy).contains(who)
}

/// Where a jump-mode forward may go: the job and the port to dial.
pub struct JumpTarget {
    pub job: Arc<Registration>,
    pub live: Arc<Live>,
    pub port: u16,
}

/// Decides a jump-mode forward to `host:port` by `who`, with `lookup`
/// finding the job a valid id names. Every refusal is a reason the user can
/// act on. The address rules (DESIGN §4) are the dialer's, at the dial.
pub fn jump(
    host: &str,
    port: u32,
    who: &GithubLogin,
    policy: &Policy,
    lookup: impl FnOnce(JobId) -> Lookup,
) -> Result<JumpTarget, JumpRefused> {
    let job_id = JobId::parse(host).map_err(|_| JumpRefused::NotAJob {
        destination: format!("{}:{port}", crate::audit::shown(host)),
        who: who.clone(),
        hint: bare_number_hint(host),
    })?;
    let port = u16::try_from(port)
        .ok()
        .filter(|p| policy.jump_ports.contains(p))
        .ok_or_else(|| JumpRefused::Port {
            port,
            allowed: policy.jump_ports.clone(),
        })?;
    let (job, live) = match lookup(job_id) {
        Lookup::Active(job, live) => (job, live),
        Lookup::Ended(reason) => return Err(JumpRefused::Ended(reason)),
        Lookup::Unknown => return Err(JumpRefused::Unknown(job_id)),
    };
    if !may_enter(&job, who, policy) {
        return Err(JumpRefused::NotAllowed {
            who: who.clone(),
            job: job_id,
        });
    }
    // Port 22 means the runner's registered SSH port.
    let port = if port == 22 { job.port } else { port };
    Ok(JumpTarget { job, live, port })
}

/// OpenSSH reads a bare number below 2^24 as an address in 0.0.0.0/8
/// (`runner@1234` becomes 0.0.4.210), which no one dials on purpose: the
/// hint names the spelling that reaches job 1234.
fn bare_number_hint(host: &str) -> String {
    match host.parse::<std::net::Ipv4Addr>() {
        Ok(ip) if ip.octets()[0] == 0 && u32::from(ip) != 0 => {
            let n = u32::from(ip);
            format!("; OpenSSH reads the bare number {n} as the address {ip}: write job-{n}")
        }
        _ => String::new(),
    }
}

/// Why [`jump`] refused a forward; each is the one line the user sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JumpRefused {
    #[error("{destination} is not a job: the gateway only connects to job ids (ssh -J {who}@gateway runneruser@job-<id>){hint}")]
    NotAJob {
        destination: String,
        who: GithubLogin,
        hint: String,
    },
    #[error("port {port} is not open through the gateway (allowed: {allowed:?})")]
    Port { port: u32, allowed: Vec<u16> },
    #[error("{0}")]
    Ended(String),
    #[error("job {0} is not registered with this gateway")]
    Unknown(JobId),
    #[error("{who} is not allowed on job {job}")]
    NotAllowed { who: GithubLogin, job: JobId },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::tests::registration;

    fn login(s: &str) -> GithubLogin {
        GithubLogin::parse(s).expect("login")
    }

    #[test]
    fn actor_may_enter_and_strangers_may_not() {
        let job = registration(1, "octocat", &[]);
        let policy = Policy::default();
        assert!(may_enter(&job, &login("octocat"), &policy));
        assert!(may_enter(&job, &login("OctoCat"), &policy));
        assert!(!may_enter(&job, &login("mallory"), &policy));
    }

    #[test]
    fn admins_may_enter_every_job() {
        let job = registration(1, "octocat", &[]);
        let policy = Policy {
            admins: vec![login("root-admin")],
            allow_extra_users: false,
            ..Policy::default()
        };
        assert!(may_enter(&job, &login("root-admin"), &policy));
    }

    #[test]
    fn listed_users_need_the_policy() {
        let job = registration(1, "octocat", &["hubot"]);
        let on = Policy {
            admins: vec![],
            allow_extra_users: true,
            ..Policy::default()
        };
        let off = Policy::default();
        assert!(may_enter(&job, &login("hubot"), &on));
        assert!(!may_enter(&job, &login("hubot"), &off));
    }

    #[test]
    fn jump_goes_only_to_allowed_ports_of_jobs_the_person_may_enter() {
        let policy = Policy {
            jump_ports: vec![22, 3389],
            ..Policy::default()
        };
        let mut job = registration(1234567890, "octocat", &[]);
        job.port = 2200;
        let job = Arc::new(job);
        let found = |_: JobId| Lookup::Active(job.clone(), Live::new());
        let octocat = login("octocat");
        let to = |host: &str, port: u32, who: &GithubLogin| {
            jump(host, port, who, &policy, found).map(|t| (t.job.job_id.to_string(), t.port))
        };
        assert_eq!(
            to("1234567890", 22, &octocat),
            Ok(("1234567890".into(), 2200))
        );
        assert_eq!(
            to("job-1234567890", 3389, &octocat),
            Ok(("1234567890".into(), 3389))
        );
        for (host, port, reason) in [
            ("169.254.169.254", 80, "is not a job"),
            ("localhost", 22, "is not a job"),
            ("1234567890", 25, "port 25 is not open"),
            ("1234567890", 65558, "is not open"),
            (
                "0.0.4.210",
                22,
                "the bare number 1234 as the address 0.0.4.210: write job-1234",
            ),
        ] {
            let err = to(host, port, &octocat).expect_err(host).to_string();
            assert!(err.contains(reason), "{host}:{port}: {err}");
        }
        let err = to("1234567890", 22, &login("mallory")).expect_err("stranger");
        assert!(matches!(err, JumpRefused::NotAllowed { .. }), "{err}");
        assert!(err.to_string().contains("mallory is not allowed"), "{err}");
        let unknown = jump("1234567890", 22, &octocat, &policy, |_| Lookup::Unknown);
        assert!(unknown
            .err()
            .is_some_and(|e| e.to_string().contains("not registered")));
        let ended = jump("1234567890", 22, &octocat, &policy, |_| {
            Lookup::Ended("job 1234567890 has ended".into())
        });
        assert!(ended
            .err()
            .is_some_and(|e| e.to_string().contains("has ended")));
    }

    #[test]
    fn people_are_listed_once_in_order() {
        let job = registration(1, "octocat", &["hubot", "octocat"]);
        let policy = Policy {
            admins: vec![login("hubot"), login("admin")],
            allow_extra_users: true,
            ..Policy::default()
        };
        let people: Vec<String> = allowed_people(&job, &policy)
            .into_iter()
            .map(|l| l.to_string())
            .collect();
        assert_eq!(people, ["octocat", "hubot", "admin"]);
    }
}
