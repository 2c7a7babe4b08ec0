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
    /// `access.repository_permission`: who holds at least this on the job's
    /// repository may enter it (job mode).
    pub repository_permission: Option<Permission>,
    /// `access.teams`: the members of these teams may enter every job.
    pub teams: Vec<Team>,
}

/// A permission on a repository, from the lowest that admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    Write,
    Maintain,
    Admin,
}

impl Permission {
    /// `write`, `maintain` or `admin`; `read` and `triage` are refused: on
    /// a public repository everyone has them.
    pub fn parse(s: &str) -> Result<Permission, String> {
        match s {
            "write" => Ok(Permission::Write),
            "maintain" => Ok(Permission::Maintain),
            "admin" => Ok(Permission::Admin),
            other => Err(format!(
                "{other:?}: expected \"write\", \"maintain\" or \"admin\" (read and triage would admit anyone on a public repository)"
            )),
        }
    }

    /// The name GitHub's collaborators filter takes (`push` is write).
    pub fn api_name(self) -> &'static str {
        match self {
            Permission::Write => "push",
            Permission::Maintain => "maintain",
            Permission::Admin => "admin",
        }
    }
}

/// A GitHub team, `org/team-slug`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Team {
    pub org: String,
    pub slug: String,
}

impl Team {
    pub fn parse(s: &str) -> Result<Team, String> {
        let part = |p: &str| {
            !p.is_empty()
                && p.len() <= 100
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                && !p.starts_with('.')
        };
        match s.split_once('/') {
            Some((org, slug)) if part(org) && part(slug) => Ok(Team {
                org: org.to_ascii_lowercase(),
                slug: slug.to_ascii_lowercase(),
            }),
            _ => Err(format!("{s:?}: expected org/team-slug")),
        }
    }
}

impl std::fmt::Display for Team {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.org, self.slug)
    }
}

/// What GitHub said, before the decision, of the people a job's roles
/// admit: those with the policy's permission on its repository and the
/// members of the policy's teams. `incomplete` when GitHub could not be
/// asked and nothing was cached: the missing people are not admitted.
#[derive(Debug, Clone, Default)]
pub struct Roles {
    pub people: Vec<GithubLogin>,
    pub incomplete: bool,
}

/// The people a job names (actor, listed users, admins), in that order
/// without repeats: the ones whose keys registration installs on the
/// runner, so the only ones jump mode admits.
pub fn named_people(job: &Registration, policy: &Policy) -> Vec<GithubLogin> {
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

/// Everyone allowed on `job`: [`named_people`], then those its roles
/// admit. Job mode tries the offered key against these people's keys.
pub fn allowed_people(job: &Registration, policy: &Policy, roles: &Roles) -> Vec<GithubLogin> {
    let mut people = named_people(job, policy);
    for login in &roles.people {
        if !people.contains(login) {
            people.push(login.clone());
        }
    }
    people
}

/// Deny by default: only the people [`allowed_people`] names get in.
pub fn may_enter(job: &Registration, who: &GithubLogin, policy: &Policy, roles: &Roles) -> bool {
    named_people(job, policy).contains(who) || roles.people.contains(who)
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
    if !named_people(&job, policy).contains(who) {
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
    /// Allowed through a GitHub role or team, which the runner's sshd
    /// cannot check (its keys were installed at registration).
    #[error("{who} may enter job {job} through a GitHub role, which jump mode cannot check end to end: use ssh {job}@<gateway>")]
    RoleOnly { who: GithubLogin, job: JobId },
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
        let none = Roles::default();
        assert!(may_enter(&job, &login("octocat"), &policy, &none));
        assert!(may_enter(&job, &login("OctoCat"), &policy, &none));
        assert!(!may_enter(&job, &login("mallory"), &policy, &none));
        // Roles admit exactly the people GitHub named.
        let roles = Roles {
            people: vec![login("mallory")],
            incomplete: false,
        };
        assert!(may_enter(&job, &login("mallory"), &policy, &roles));
        assert!(!may_enter(&job, &login("eve"), &policy, &roles));
        let people = allowed_people(&job, &policy, &roles);
        assert_eq!(people, [login("octocat"), login("mallory")]);
        assert_eq!(named_people(&job, &policy), [login("octocat")]);
    }

    #[test]
    fn admins_may_enter_every_job() {
        let job = registration(1, "octocat", &[]);
        let policy = Policy {
            admins: vec![login("root-admin")],
            allow_extra_users: false,
            ..Policy::default()
        };
        assert!(may_enter(
            &job,
            &login("root-admin"),
            &policy,
            &Roles::default()
        ));
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
        assert!(may_enter(&job, &login("hubot"), &on, &Roles::default()));
        assert!(!may_enter(&job, &login("hubot"), &off, &Roles::default()));
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
    fn roles_and_teams_parse_strictly() {
        assert_eq!(Permission::parse("write"), Ok(Permission::Write));
        assert_eq!(Permission::Admin.api_name(), "admin");
        for bad in ["read", "triage", "Write", ""] {
            assert!(Permission::parse(bad).is_err(), "{bad}");
        }
        let team = Team::parse("Acme/Platform-Team").expect("team");
        assert_eq!(team.to_string(), "acme/platform-team");
        for bad in ["acme", "acme/", "/x", "a/b/c", "acme/../x", "acme/x?y"] {
            assert!(Team::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn people_are_listed_once_in_order() {
        let job = registration(1, "octocat", &["hubot", "octocat"]);
        let policy = Policy {
            admins: vec![login("hubot"), login("admin")],
            allow_extra_users: true,
            ..Policy::default()
        };
        let people: Vec<String> = named_people(&job, &policy)
            .into_iter()
            .map(|l| l.to_string())
            .collect();
        assert_eq!(people, ["octocat", "hubot", "admin"]);
    }
}
