//! Identifier newtypes, parsed once at the edge: everything inside trusts them.
//!
//! Also the SSH username grammar (`<job-id>`, `job-<job-id>`, `<github-login>`)
//! and the jump-mode destination grammar.

use std::fmt;

/// A GitHub Actions job id (the numeric id in the job's URL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(u64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("a job id is 1 to 19 digits")]
    BadJobId,
    #[error("a GitHub login is 1 to 39 letters, digits or single hyphens, not starting or ending with a hyphen")]
    BadLogin,
    #[error("not a job id (digits or job-<digits>) nor a GitHub login")]
    BadUser,
}

impl JobId {
    /// Accepts `123` and `job-123`. Leading zeros are refused so that one job
    /// has exactly one spelling.
    pub fn parse(s: &str) -> Result<JobId, IdError> {
        let digits = s.strip_prefix("job-").unwrap_or(s);
        if digits.is_empty()
            || digits.len() > 19
            || !digits.bytes().all(|b| b.is_ascii_digit())
            || (digits.len() > 1 && digits.starts_with('0'))
        {
            return Err(IdError::BadJobId);
        }
        let n: u64 = digits.parse().map_err(|_| IdError::BadJobId)?;
        if n == 0 {
            return Err(IdError::BadJobId);
        }
        Ok(JobId(n))
    }

    pub fn get(self) -> u64 {
        self.0
    }

    pub fn from_u64(n: u64) -> Option<JobId> {
        (n != 0).then_some(JobId(n))
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A GitHub login, normalised to lower case (GitHub logins are case-insensitive).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GithubLogin(String);

impl GithubLogin {
    pub fn parse(s: &str) -> Result<GithubLogin, IdError> {
        let ok = !s.is_empty()
            && s.len() <= 39
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
            && !s.contains("--");
        if ok {
            Ok(GithubLogin(s.to_ascii_lowercase()))
        } else {
            Err(IdError::BadLogin)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for GithubLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the SSH username asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Job mode: a shell (and forwards) on this job's runner, through the gateway.
    Job(JobId),
    /// Jump mode: this person, who will open `direct-tcpip` channels to jobs.
    Jump(GithubLogin),
    /// A runner's agent holding the reverse tunnel of this job (DESIGN §10);
    /// it logs in with the job token, never with a person's key.
    Tunnel(JobId),
    /// Another replica reaching this job's tunnel, which this replica holds
    /// (`ssh::relay`); it logs in with the replicas' shared host key.
    Relay(JobId),
}

/// The username prefix of a replica relaying to another: `relay+<job-id>`.
pub const RELAY_USER_PREFIX: &str = "relay+";

/// The username prefix of a tunnel connection: `tunnel+<job-id>`. A `+` is
/// in no GitHub login and no job id, so the name collides with neither.
pub const TUNNEL_USER_PREFIX: &str = "tunnel+";

/// The username an agent logs in with to hold `job`'s tunnel.
pub fn tunnel_user(job: JobId) -> String {
    format!("{TUNNEL_USER_PREFIX}{job}")
}

impl Target {
    /// Digits (or `job-<digits>`) are a job; anything else must be a GitHub
    /// login. A login made only of digits is therefore read as a job id.
    pub fn parse_user(user: &str) -> Result<Target, IdError> {
        if user.len() > 64 {
            return Err(IdError::BadUser);
        }
        if let Ok(job) = JobId::parse(user) {
            return Ok(Target::Job(job));
        }
        if let Some(id) = user.strip_prefix(TUNNEL_USER_PREFIX) {
            // Digits only: `tunnel+job-1` is not a second spelling.
            return match JobId::parse(id) {
                Ok(job) if !id.starts_with("job-") => Ok(Target::Tunnel(job)),
                _ => Err(IdError::BadJobId),
            };
        }
        if let Some(id) = user.strip_prefix(RELAY_USER_PREFIX) {
            return match JobId::parse(id) {
                Ok(job) if !id.starts_with("job-") => Ok(Target::Relay(job)),
                _ => Err(IdError::BadJobId),
            };
        }
        if user.bytes().all(|b| b.is_ascii_digit()) || user.starts_with("job-") {
            return Err(IdError::BadJobId);
        }
        GithubLogin::parse(user)
            .map(Target::Jump)
            .map_err(|_| IdError::BadUser)
    }
}

/// A runner account name as registered: what sshd on the runner accepts as a
/// user. Conservative: POSIX portable names plus what Windows allows commonly.
pub fn valid_runner_user(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 64
        && !user.starts_with('-')
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_and_job_prefix_are_job_ids() {
        assert_eq!(
            Target::parse_user("9876543210"),
            Ok(Target::Job(JobId(9876543210)))
        );
        assert_eq!(
            Target::parse_user("job-9876543210"),
            Ok(Target::Job(JobId(9876543210)))
        );
    }

    #[test]
    fn tunnel_users_name_a_job_and_collide_with_nothing() {
        assert_eq!(
            Target::parse_user("tunnel+9876543210"),
            Ok(Target::Tunnel(JobId(9876543210)))
        );
        assert_eq!(tunnel_user(JobId(7)), "tunnel+7");
        for bad in [
            "tunnel+",
            "tunnel+job-7",
            "tunnel+07",
            "tunnel+x",
            "tunnel+7 ",
        ] {
            assert!(Target::parse_user(bad).is_err(), "{bad}");
        }
        // No login or job id can be spelt like one, and `tunnel` alone is a login.
        assert!(GithubLogin::parse("tunnel+7").is_err());
        assert!(JobId::parse("tunnel+7").is_err());
        assert!(matches!(Target::parse_user("tunnel"), Ok(Target::Jump(_))));
    }

    #[test]
    fn logins_are_jump_mode_and_lowercased() {
        assert_eq!(
            Target::parse_user("OctoCat"),
            Ok(Target::Jump(GithubLogin("octocat".into())))
        );
        assert_eq!(
            Target::parse_user("a-b-1"),
            Ok(Target::Jump(GithubLogin("a-b-1".into())))
        );
    }

    #[test]
    fn malformed_users_are_refused() {
        for bad in [
            "",
            "-x",
            "x-",
            "a--b",
            "job-",
            "job-x",
            "0123",
            "0",
            "99999999999999999999",
            "a b",
            "ü",
            "root@host",
            "../etc",
            &"a".repeat(40),
            &"1".repeat(10_000),
        ] {
            assert!(Target::parse_user(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn job_id_bounds() {
        assert!(JobId::parse("18446744073709551615").is_err()); // 20 digits
        assert_eq!(
            JobId::parse("9223372036854775807").map(JobId::get),
            Ok(i64::MAX as u64)
        );
        assert!(JobId::parse("+1").is_err());
    }

    #[test]
    fn runner_user_grammar() {
        assert!(valid_runner_user("runner"));
        assert!(valid_runner_user("runneradmin"));
        assert!(valid_runner_user("first.last_1"));
        assert!(!valid_runner_user("-oProxyCommand"));
        assert!(!valid_runner_user("a b"));
        assert!(!valid_runner_user(""));
        assert!(!valid_runner_user("a\"b"));
    }

    /// The fuzz target's property (fuzz/fuzz_targets/username.rs) on random
    /// usernames from awkward characters, so stable CI checks it too.
    #[test]
    fn random_usernames_parse_to_something_valid_or_nothing() {
        let chars = [
            '0', '1', '9', 'a', 'Z', '-', '_', '.', '@', ' ', 'j', 'o', 'b', '\u{0}', 'é',
            '\u{202e}', '/', ':',
        ];
        for _ in 0..20_000 {
            let n = rand::random_range(0..24);
            let user: String = (0..n)
                .map(|_| chars[rand::random_range(0..chars.len())])
                .collect();
            match Target::parse_user(&user) {
                Ok(Target::Job(job)) => {
                    let shown = job.to_string();
                    assert!(shown.bytes().all(|b| b.is_ascii_digit()), "{user:?}");
                    assert_eq!(JobId::parse(&shown).expect("round trip"), job);
                }
                Ok(Target::Jump(login)) => {
                    assert!(login.as_str().len() <= 39, "{user:?}");
                    assert!(GithubLogin::parse(login.as_str()).is_ok(), "{user:?}");
                }
                Ok(Target::Tunnel(job)) => {
                    assert_eq!(user, tunnel_user(job), "one spelling");
                }
                Ok(Target::Relay(job)) => {
                    assert_eq!(user, format!("{RELAY_USER_PREFIX}{job}"), "one spelling");
                }
                Err(_) => {}
            }
        }
    }
}
