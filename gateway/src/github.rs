//! Whose keys are whose: the SSH public keys on people's GitHub accounts,
//! fetched with octocrab from `github.api_url` (`GET /users/{login}/keys`),
//! cached for `key_cache_ttl`, fetched once when many ask at once, and served
//! stale for up to `stale_for` while GitHub is unreachable. The optional
//! static table in the config answers first (offline and air-gapped setups);
//! with `github.enabled = false` it is the only answer.
//!
//! Also the people GitHub roles admit (`access.repository_permission`,
//! `access.teams`): collaborator and team member lists, cached the same way,
//! handed to the access decision as facts. Knows nothing of sessions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::keys::PublicKey;
use tokio::time::Instant;

use crate::config::GithubConfig;
use crate::ids::GithubLogin;

/// Cached logins beyond this are evicted, oldest first, so memory stays bounded.
const MAX_CACHED_LOGINS: usize = 50_000;
/// At most this many keys are taken from one account.
const MAX_KEYS_PER_LOGIN: usize = 100;
/// GitHub requests in flight at once; more askers wait (within the timeout).
const MAX_FETCHES_IN_FLIGHT: usize = 32;
/// Pages of 100 read of one role's people (collaborators or a team).
const MAX_ROLE_PAGES: u32 = 5;
/// People one job's roles admit at most: job mode tries each one's keys.
pub const MAX_ROLE_PEOPLE: usize = 500;

#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyFetchError {
    #[error("GitHub is unreachable and no recent copy of {0}'s keys is cached: {1}")]
    Unavailable(GithubLogin, #[source] CallError),
}

/// Why a call to GitHub's API got no usable answer (a 404 is an answer).
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("no GitHub client")]
    NoClient,
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    /// GitHub's error (status and message) or the transport's, on one line.
    #[error("{}", one_line(.0))]
    Failed(#[source] Arc<octocrab::Error>),
}

type Keys = Arc<Vec<PublicKey>>;

/// What GitHub says of one login: its keys, and whether the account exists
/// (a 404 is an account with no keys, but a refusal can say which).
#[derive(Clone)]
pub struct Account {
    pub keys: Keys,
    pub exists: bool,
}

/// A list of people GitHub gives for a role.
type Members = Arc<Vec<GithubLogin>>;

/// Where a role's people come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Group {
    /// Collaborators holding at least this on `repository`.
    Permission {
        repository: String,
        at_least: crate::access::Permission,
    },
    Team(crate::access::Team),
}

/// One slot per key; the async mutex makes concurrent askers wait for the
/// one fetch in flight instead of starting their own.
type Slot<V> = Arc<tokio::sync::Mutex<Option<(V, Instant)>>>;

/// GitHub's answers by key, bounded: at most [`MAX_CACHED_LOGINS`] slots,
/// the unused ones dropped first.
struct Answers<K, V> {
    slots: Mutex<HashMap<K, (Slot<V>, Instant)>>,
}

impl<K: std::hash::Hash + Eq + Clone, V> Answers<K, V> {
    fn new() -> Self {
        Answers {
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, key: &K, keep_for: Duration) -> Slot<V> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if let Some((slot, used)) = slots.get_mut(key) {
            *used = now;
            return slot.clone();
        }
        if slots.len() >= MAX_CACHED_LOGINS {
            slots.retain(|_, (_, used)| used.elapsed() < keep_for);
            if slots.len() >= MAX_CACHED_LOGINS {
                if let Some(oldest) = slots
                    .iter()
                    .min_by_key(|(_, (_, u))| *u)
                    .map(|(k, _)| k.clone())
                {
                    slots.remove(&oldest);
                }
            }
        }
        let slot: Slot<V> = Arc::new(tokio::sync::Mutex::new(None));
        slots.insert(key.clone(), (slot.clone(), now));
        slot
    }
}

pub struct KeySource {
    static_keys: HashMap<GithubLogin, Keys>,
    client: Option<octocrab::Octocrab>,
    accounts: Answers<GithubLogin, Account>,
    members: Answers<Group, Members>,
    ttl: Duration,
    stale_for: Duration,
    fetch_timeout: Duration,
    in_flight: tokio::sync::Semaphore,
    metrics: Arc<crate::metrics::Metrics>,
    /// The last call's outcome (`/healthz`).
    last: std::sync::Mutex<Option<(std::time::Instant, Result<(), String>)>>,
    /// `/healthz`'s own probe, reused for [`PROBE_EVERY`].
    probe: tokio::sync::Mutex<Option<(std::time::Instant, Result<String, String>)>>,
}

/// A call this recent says how GitHub is; older, `/healthz` asks itself.
const RECENT: Duration = Duration::from_secs(60);
/// `/healthz` asks GitHub at most this often, however often it is polled.
const PROBE_EVERY: Duration = Duration::from_secs(30);

#[derive(serde::Deserialize)]
struct GithubKey {
    key: String,
}

impl KeySource {
    pub fn new(
        config: &GithubConfig,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> anyhow::Result<KeySource> {
        let mut static_keys = HashMap::new();
        for (login, lines) in &config.static_keys {
            let login = GithubLogin::parse(login)?;
            let keys = lines
                .iter()
                .map(|l| crate::keys::parse_public_key(l).map_err(anyhow::Error::from))
                .collect::<Result<Vec<_>, _>>()?;
            static_keys.insert(login, Arc::new(keys));
        }
        let mut builder = octocrab::Octocrab::builder()
            .base_uri(config.api_url.as_str())?
            .set_connect_timeout(Some(config.fetch_timeout))
            .set_read_timeout(Some(config.fetch_timeout))
            .add_header(
                axum::http::header::USER_AGENT,
                concat!("ci-gateway/", env!("CARGO_PKG_VERSION")).to_string(),
            );
        if !config.token.expose().is_empty() {
            builder = builder.personal_token(config.token.expose().clone());
        }
        Ok(KeySource {
            static_keys,
            client: if config.enabled {
                Some(builder.build()?)
            } else {
                None
            },
            accounts: Answers::new(),
            members: Answers::new(),
            ttl: config.key_cache_ttl,
            stale_for: config.stale_for,
            fetch_timeout: config.fetch_timeout,
            in_flight: tokio::sync::Semaphore::new(MAX_FETCHES_IN_FLIGHT),
            metrics,
            last: Default::default(),
            probe: Default::default(),
        })
    }

    /// `GET route` on GitHub's API, counted by outcome; a 404 is `None`.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        route: String,
    ) -> Result<Option<T>, CallError> {
        use crate::metrics::Outcome;
        let Some(client) = &self.client else {
            return Err(CallError::NoClient);
        };
        let request = async {
            let _permit = self.in_flight.acquire().await;
            client.get::<T, _, ()>(route, None).await
        };
        let (outcome, result) = match tokio::time::timeout(self.fetch_timeout, request).await {
            Err(_) => (
                Outcome::Timeout,
                Err(CallError::Timeout(self.fetch_timeout)),
            ),
            Ok(Ok(value)) => (Outcome::Ok, Ok(Some(value))),
            Ok(Err(octocrab::Error::GitHub { source, .. }))
                if source.status_code.as_u16() == 404 =>
            {
                (Outcome::NotFound, Ok(None))
            }
            Ok(Err(e)) => (Outcome::Error, Err(CallError::Failed(Arc::new(e)))),
        };
        self.metrics.github_call(outcome);
        let said = match &result {
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        };
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((std::time::Instant::now(), said));
        result
    }

    /// Whether GitHub answers: `Ok` with how, or `Err` with why not. From
    /// the last call if recent, else from `GET /rate_limit` (which spends
    /// no rate limit), asked at most every [`PROBE_EVERY`].
    pub async fn health(&self) -> Result<String, String> {
        if self.client.is_none() {
            return Ok("disabled (github.enabled = false): only github.static_keys log in".into());
        }
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some((at, outcome)) = last.filter(|(at, _)| at.elapsed() < RECENT) {
            let ago = at.elapsed().as_secs();
            return match outcome {
                Ok(()) => Ok(format!("the last call answered {ago}s ago")),
                Err(e) => Err(format!("the last call ({ago}s ago) failed: {e}; cached keys are served for github.stale_for")),
            };
        }
        let mut probe = self.probe.lock().await;
        if let Some((_, said)) = probe.as_ref().filter(|(at, _)| at.elapsed() < PROBE_EVERY) {
            return said.clone();
        }
        let said = match self.call::<serde_json::Value>("/rate_limit".into()).await {
            Ok(Some(v)) => {
                let core = &v["resources"]["core"];
                match (core["remaining"].as_u64(), core["limit"].as_u64()) {
                    (Some(0), _) => Err(format!(
                        "reachable, but the rate limit is spent until {} (unix time); set github.token",
                        core["reset"].as_u64().unwrap_or(0)
                    )),
                    (Some(left), Some(limit)) => {
                        Ok(format!("reachable; {left} of {limit} calls left this hour"))
                    }
                    _ => Ok("reachable".into()),
                }
            }
            Ok(None) => Ok("reachable".into()),
            Err(e) => Err(format!(
                "unreachable: {e}; cached keys are served for github.stale_for"
            )),
        };
        *probe = Some((std::time::Instant::now(), said.clone()));
        said
    }

    /// Whether `keys(login)` would answer without asking GitHub.
    pub async fn is_fresh(&self, login: &GithubLogin) -> bool {
        if self.static_keys.contains_key(login) || self.client.is_none() {
            return true;
        }
        let slot = self.accounts.slot(login, self.ttl + self.stale_for);
        let cached = slot.lock().await;
        cached
            .as_ref()
            .is_some_and(|(_, fetched)| fetched.elapsed() < self.ttl)
    }

    /// The keys of `login`. Static entries win; then the cache; then GitHub.
    pub async fn keys(&self, login: &GithubLogin) -> Result<Keys, KeyFetchError> {
        self.account(login).await.map(|a| a.keys)
    }

    /// [`KeySource::keys`], and whether GitHub has such an account. With
    /// GitHub disabled, a login outside the static table has no account.
    pub async fn account(&self, login: &GithubLogin) -> Result<Account, KeyFetchError> {
        if let Some(keys) = self.static_keys.get(login) {
            return Ok(Account {
                keys: keys.clone(),
                exists: true,
            });
        }
        if self.client.is_none() {
            return Ok(Account {
                keys: Default::default(),
                exists: false,
            });
        }
        self.cached(&self.accounts, login, self.fetch(login))
            .await
            .map_err(|e| KeyFetchError::Unavailable(login.clone(), e))
    }

    /// Whether GitHub is asked at all (`github.enabled`).
    pub fn enabled(&self) -> bool {
        self.client.is_some()
    }

    /// `key`'s answer from `answers` while fresh; else `fetch`'s, kept; else,
    /// while GitHub fails, the last answer for up to `stale_for`.
    async fn cached<K, V>(
        &self,
        answers: &Answers<K, V>,
        key: &K,
        fetch: impl std::future::Future<Output = Result<V, CallError>>,
    ) -> Result<V, CallError>
    where
        K: std::hash::Hash + Eq + Clone + std::fmt::Debug,
        V: Clone,
    {
        let slot = answers.slot(key, self.ttl + self.stale_for);
        let mut cached = slot.lock().await;
        if let Some((value, fetched)) = cached.as_ref() {
            if fetched.elapsed() < self.ttl {
                return Ok(value.clone());
            }
        }
        match fetch.await {
            Ok(value) => {
                *cached = Some((value.clone(), Instant::now()));
                Ok(value)
            }
            Err(reason) => match cached.as_ref() {
                Some((value, fetched)) if fetched.elapsed() < self.ttl + self.stale_for => {
                    tracing::warn!(?key, "GitHub failed, serving the cached answer: {reason}");
                    Ok(value.clone())
                }
                _ => Err(reason),
            },
        }
    }

    /// The facts the access decision needs of `repository`'s roles: the
    /// people the policy's permission and teams admit. A list GitHub cannot
    /// give (and no copy is cached) admits nobody and marks it incomplete.
    pub async fn roles(
        &self,
        policy: &crate::access::Policy,
        repository: Option<&str>,
    ) -> crate::access::Roles {
        let mut groups: Vec<Group> = policy.teams.iter().cloned().map(Group::Team).collect();
        if let (Some(at_least), Some(repository)) = (policy.repository_permission, repository) {
            groups.insert(
                0,
                Group::Permission {
                    repository: repository.to_ascii_lowercase(),
                    at_least,
                },
            );
        }
        let mut roles = crate::access::Roles::default();
        let mut seen = std::collections::HashSet::new();
        for group in groups {
            match self
                .cached(&self.members, &group, self.fetch_members(&group))
                .await
            {
                Ok(people) => {
                    for login in people.iter() {
                        if roles.people.len() < MAX_ROLE_PEOPLE && seen.insert(login.clone()) {
                            roles.people.push(login.clone());
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        ?group,
                        "GitHub role lookup failed; its people are not admitted: {e}"
                    );
                    roles.incomplete = true;
                }
            }
        }
        roles
    }

    /// One group's people, page by page, at most [`MAX_ROLE_PAGES`] pages.
    /// A 404 (no such team or repository, or the token may not see it) is
    /// an empty list.
    async fn fetch_members(&self, group: &Group) -> Result<Members, CallError> {
        #[derive(serde::Deserialize)]
        struct Member {
            login: String,
        }
        let mut people = Vec::new();
        for page in 1..=MAX_ROLE_PAGES {
            let route = match group {
                Group::Permission {
                    repository,
                    at_least,
                } => format!(
                    "/repos/{repository}/collaborators?permission={}&per_page=100&page={page}",
                    at_least.api_name()
                ),
                Group::Team(team) => format!(
                    "/orgs/{}/teams/{}/members?per_page=100&page={page}",
                    team.org, team.slug
                ),
            };
            let Some(list) = self.call::<Vec<Member>>(route).await? else {
                tracing::warn!(?group, "GitHub answered 404: no such team or repository, or the gateway's token may not read it");
                break;
            };
            let full = list.len() >= 100;
            people.extend(
                list.iter()
                    .filter_map(|m| GithubLogin::parse(&m.login).ok()),
            );
            if !full {
                break;
            }
            if page == MAX_ROLE_PAGES {
                tracing::warn!(
                    ?group,
                    "more than {} people; the rest are not admitted",
                    people.len()
                );
            }
        }
        Ok(Arc::new(people))
    }

    /// The run a job belongs to (`GET /repos/{repo}/actions/jobs/{job}`),
    /// or `None` when GitHub knows no such job in `repo`. Uncached: asked
    /// once per registration that needs it (OIDC tokens without
    /// `check_run_id`, DESIGN §4).
    pub async fn job_run(
        &self,
        repository: &str,
        job: crate::ids::JobId,
    ) -> Result<Option<u64>, CallError> {
        #[derive(serde::Deserialize)]
        struct Job {
            run_id: u64,
        }
        let route = format!("/repos/{repository}/actions/jobs/{job}");
        Ok(self.call::<Job>(route).await?.map(|j| j.run_id))
    }

    async fn fetch(&self, login: &GithubLogin) -> Result<Account, CallError> {
        let route = format!("/users/{login}/keys");
        // An account that does not exist has no keys; that is an answer.
        let Some(list) = self.call::<Vec<GithubKey>>(route).await? else {
            return Ok(Account {
                keys: Default::default(),
                exists: false,
            });
        };
        let keys = list
            .iter()
            .filter_map(|k| crate::keys::parse_public_key(&k.key).ok())
            .take(MAX_KEYS_PER_LOGIN)
            .collect();
        Ok(Account {
            keys: Arc::new(keys),
            exists: true,
        })
    }
}

fn one_line(e: &octocrab::Error) -> String {
    let text = match e {
        octocrab::Error::GitHub { source, .. } => {
            format!("GitHub answered {}: {}", source.status_code, source.message)
        }
        other => other.to_string(),
    };
    text.lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(env: &[(&str, &str)]) -> KeySource {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let config = crate::config::Config::load_with_env(None, env).expect("config");
        KeySource::new(&config.github, Arc::new(crate::metrics::Metrics::new())).expect("source")
    }

    #[tokio::test]
    async fn a_disabled_github_is_never_asked() {
        // Port 9 (discard) on loopback: any call would fail, not answer.
        let off = source(&[
            ("CI_GATEWAY__GITHUB__ENABLED", "false"),
            ("CI_GATEWAY__GITHUB__API_URL", "http://127.0.0.1:9"),
        ]);
        let login = GithubLogin::parse("stranger").expect("login");
        assert!(off.is_fresh(&login).await);
        let account = off.account(&login).await.expect("answered without GitHub");
        assert!(!account.exists && account.keys.is_empty());
        let on = source(&[("CI_GATEWAY__GITHUB__API_URL", "http://127.0.0.1:9")]);
        assert!(on.account(&login).await.is_err(), "enabled, it does ask");
    }
}
