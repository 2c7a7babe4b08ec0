//! Whose keys are whose: the SSH public keys on people's GitHub accounts,
//! fetched with octocrab from `github.api_url` (`GET /users/{login}/keys`),
//! cached for `key_cache_ttl`, fetched once when many ask at once, and served
//! stale for up to `stale_for` while GitHub is unreachable. The optional
//! static table in the config answers first (offline and air-gapped setups).
//!
//! Knows nothing of sessions or jobs.

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

struct Cached {
    account: Account,
    fetched: Instant,
}

/// One slot per login; the async mutex makes concurrent askers wait for the
/// one fetch in flight instead of starting their own.
type Slot = Arc<tokio::sync::Mutex<Option<Cached>>>;

pub struct KeySource {
    static_keys: HashMap<GithubLogin, Keys>,
    client: Option<octocrab::Octocrab>,
    slots: Mutex<HashMap<GithubLogin, (Slot, Instant)>>,
    ttl: Duration,
    stale_for: Duration,
    fetch_timeout: Duration,
    in_flight: tokio::sync::Semaphore,
    metrics: Arc<crate::metrics::Metrics>,
}

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
            client: Some(builder.build()?),
            slots: Mutex::new(HashMap::new()),
            ttl: config.key_cache_ttl,
            stale_for: config.stale_for,
            fetch_timeout: config.fetch_timeout,
            in_flight: tokio::sync::Semaphore::new(MAX_FETCHES_IN_FLIGHT),
            metrics,
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
        result
    }

    /// Whether `keys(login)` would answer without asking GitHub.
    pub async fn is_fresh(&self, login: &GithubLogin) -> bool {
        if self.static_keys.contains_key(login) {
            return true;
        }
        let slot = self.slot(login);
        let cached = slot.lock().await;
        cached
            .as_ref()
            .is_some_and(|c| c.fetched.elapsed() < self.ttl)
    }

    /// The keys of `login`. Static entries win; then the cache; then GitHub.
    pub async fn keys(&self, login: &GithubLogin) -> Result<Keys, KeyFetchError> {
        self.account(login).await.map(|a| a.keys)
    }

    /// [`KeySource::keys`], and whether GitHub has such an account.
    pub async fn account(&self, login: &GithubLogin) -> Result<Account, KeyFetchError> {
        if let Some(keys) = self.static_keys.get(login) {
            return Ok(Account {
                keys: keys.clone(),
                exists: true,
            });
        }
        let slot = self.slot(login);
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref() {
            if c.fetched.elapsed() < self.ttl {
                return Ok(c.account.clone());
            }
        }
        match self.fetch(login).await {
            Ok(account) => {
                *cached = Some(Cached {
                    account: account.clone(),
                    fetched: Instant::now(),
                });
                Ok(account)
            }
            Err(reason) => match cached.as_ref() {
                Some(c) if c.fetched.elapsed() < self.ttl + self.stale_for => {
                    tracing::warn!(%login, "GitHub key fetch failed, serving cached keys: {reason}");
                    Ok(c.account.clone())
                }
                _ => Err(KeyFetchError::Unavailable(login.clone(), reason)),
            },
        }
    }

    fn slot(&self, login: &GithubLogin) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if let Some((slot, used)) = slots.get_mut(login) {
            *used = now;
            return slot.clone();
        }
        if slots.len() >= MAX_CACHED_LOGINS {
            let keep_for = self.ttl + self.stale_for;
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
        let slot: Slot = Default::default();
        slots.insert(login.clone(), (slot.clone(), now));
        slot
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
