//! Who may reach which job: one pure function of the job, the person and the
//! operator's policy. No I/O, no keys: callers identify the person first.

use crate::ids::GithubLogin;
use crate::registry::Registration;

/// The operator's side of the decision.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub admins: Vec<GithubLogin>,
    /// Whether a registration's own `allowed_users` list is honoured.
    pub allow_extra_users: bool,
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
        };
        assert!(may_enter(&job, &login("root-admin"), &policy));
    }

    #[test]
    fn listed_users_need_the_policy() {
        let job = registration(1, "octocat", &["hubot"]);
        let on = Policy {
            admins: vec![],
            allow_extra_users: true,
        };
        let off = Policy::default();
        assert!(may_enter(&job, &login("hubot"), &on));
        assert!(!may_enter(&job, &login("hubot"), &off));
    }

    #[test]
    fn people_are_listed_once_in_order() {
        let job = registration(1, "octocat", &["hubot", "octocat"]);
        let policy = Policy {
            admins: vec![login("hubot"), login("admin")],
            allow_extra_users: true,
        };
        let people: Vec<String> = allowed_people(&job, &policy)
            .into_iter()
            .map(|l| l.to_string())
            .collect();
        assert_eq!(people, ["octocat", "hubot", "admin"]);
    }
}
