//! Abuse limits (governor): failed authentications per source address and
//! per username, and API requests per token.
//!
//! A source or username that spends its budget of failures is blocked until
//! the budget refills: its new SSH connections are dropped at accept (before
//! any key exchange work) and its logins are refused without asking GitHub.
//! Everyone else is untouched; the budgets are per key. IPv6 sources are
//! keyed by their /64 (one host owns a whole /64). Memory stays bounded:
//! limiter state of keys back at full budget is dropped every sweep, and the
//! block lists are capped.

use crate::metrics::Refusal;
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Blocked keys remembered at most (beyond it the soonest-to-expire go).
const MAX_BLOCKED: usize = 100_000;

/// The key of a source address.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::V6(o.into())
            }
        },
    }
}

/// Counts holders per key, each at most `max`; a [`Slot`] gives its place
/// back when dropped. Connections per source (/64 for IPv6) and per login.
pub struct Counted<K: std::hash::Hash + Eq + Clone>(Mutex<HashMap<K, usize>>);

impl<K: std::hash::Hash + Eq + Clone> Default for Counted<K> {
    fn default() -> Self {
        Counted(Mutex::new(HashMap::new()))
    }
}

/// One place taken in a [`Counted`].
pub struct Slot<K: std::hash::Hash + Eq + Clone>(std::sync::Arc<Counted<K>>, K);

impl<K: std::hash::Hash + Eq + Clone> Counted<K> {
    /// A place for `key`, unless it already holds `max`.
    pub fn take(self: &std::sync::Arc<Self>, key: K, max: usize) -> Option<Slot<K>> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(key.clone()).or_insert(0);
        if *n >= max {
            if *n == 0 {
                map.remove(&key);
            }
            return None;
        }
        *n += 1;
        Some(Slot(self.clone(), key))
    }
}

impl<K: std::hash::Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut map = (self.0).0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.1);
            }
        }
    }
}

/// At most `per_key` holders per key at once, the rest waiting in line (a
/// fair semaphore per key). The map holds only keys someone holds or waits
/// for, so it is bounded by the callers, who are bounded themselves.
pub struct Gates<K: std::hash::Hash + Eq + Clone> {
    map: Mutex<HashMap<K, std::sync::Arc<tokio::sync::Semaphore>>>,
    per_key: usize,
}

/// One place taken in [`Gates`]; the key's entry goes when the last holder
/// or waiter does.
pub struct Gate<K: std::hash::Hash + Eq + Clone> {
    gates: std::sync::Arc<Gates<K>>,
    key: K,
    semaphore: std::sync::Arc<tokio::sync::Semaphore>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl<K: std::hash::Hash + Eq + Clone> Gates<K> {
    pub fn new(per_key: usize) -> Gates<K> {
        Gates {
            map: Mutex::new(HashMap::new()),
            per_key: per_key.max(1),
        }
    }

    pub fn per_key(&self) -> usize {
        self.per_key
    }

    /// Waits up to `patience` for a place for `key`; `None` when none came.
    pub async fn enter(self: &std::sync::Arc<Self>, key: K, patience: Duration) -> Option<Gate<K>> {
        let semaphore = {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(key.clone())
                .or_insert_with(|| std::sync::Arc::new(tokio::sync::Semaphore::new(self.per_key)))
                .clone()
        };
        // The gate is built before the wait so that a waiter that gives up
        // cleans its key up as a holder does (the wait's own reference is
        // gone by then).
        let mut gate = Gate {
            gates: self.clone(),
            key,
            semaphore,
            permit: None,
        };
        let permit = tokio::time::timeout(patience, gate.semaphore.clone().acquire_owned())
            .await
            .ok()?
            .ok()?;
        gate.permit = Some(permit);
        Some(gate)
    }

    /// How many keys are held or waited for (for tests and metrics).
    pub fn keys(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl<K: std::hash::Hash + Eq + Clone> Drop for Gate<K> {
    fn drop(&mut self) {
        let mut map = self.gates.map.lock().unwrap_or_else(|e| e.into_inner());
        self.permit.take();
        // Held by the map and by this gate only: nobody else holds or waits.
        if std::sync::Arc::strong_count(&self.semaphore) == 2 {
            map.remove(&self.key);
        }
    }
}

/// The soft `RLIMIT_NOFILE` of this process, from `/proc/self/limits`
/// (Linux; `None` elsewhere or when unlimited).
pub fn open_files_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Descriptors kept free for everything but connections: listeners, the
/// store, the audit log, API connections' bursts, GitHub fetches.
pub const DESCRIPTOR_HEADROOM: u64 = 256;

/// With `nofile` descriptors, how many each of user connections and
/// upstream sockets (runner connections, jump forwards) may hold: half of
/// what is left after the headroom, so neither side can starve the other or
/// make `accept` fail for everyone.
pub fn descriptor_share(nofile: u64) -> usize {
    (nofile.saturating_sub(DESCRIPTOR_HEADROOM) / 2).max(8) as usize
}

/// `n` events per `window`, all of them allowed in a burst.
pub fn quota(n: u32, window: Duration) -> Quota {
    let n = NonZeroU32::new(n.max(1)).unwrap_or(NonZeroU32::MIN);
    let per = (window / n.get()).max(Duration::from_micros(1));
    Quota::with_period(per)
        .unwrap_or_else(|| Quota::per_second(n))
        .allow_burst(n)
}

struct Budget<K: std::hash::Hash + Eq + Clone> {
    limiter: DefaultKeyedRateLimiter<K>,
    blocked: Mutex<HashMap<K, Instant>>,
}

impl<K: std::hash::Hash + Eq + Clone> Budget<K> {
    fn new(quota: Quota) -> Self {
        Budget {
            limiter: RateLimiter::keyed(quota),
            blocked: Mutex::new(HashMap::new()),
        }
    }

    fn blocked_for(&self, key: &K) -> Option<Duration> {
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        let until = *blocked.get(key)?;
        let now = Instant::now();
        if until <= now {
            blocked.remove(key);
            return None;
        }
        Some(until - now)
    }

    /// Spends one unit; returns how long the key is blocked if it is now out.
    fn spend(&self, key: &K) -> Option<Duration> {
        match self.limiter.check_key(key) {
            Ok(()) => None,
            Err(not_until) => {
                let wait = not_until
                    .wait_time_from(DefaultClock::default().now())
                    .max(Duration::from_secs(1));
                let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
                if blocked.len() >= MAX_BLOCKED {
                    let now = Instant::now();
                    blocked.retain(|_, until| *until > now);
                    if blocked.len() >= MAX_BLOCKED {
                        if let Some(k) = blocked
                            .iter()
                            .min_by_key(|(_, until)| **until)
                            .map(|(k, _)| k.clone())
                        {
                            blocked.remove(&k);
                        }
                    }
                }
                blocked.insert(key.clone(), Instant::now() + wait);
                Some(wait)
            }
        }
    }

    fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
        let now = Instant::now();
        self.blocked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, until| *until > now);
    }

    fn tracked(&self) -> usize {
        self.limiter.len()
    }
}

/// GitHub key lookups per source for logins the peer names (jump mode): a
/// source that asks for too many uncached logins is served from the cache
/// only until its budget refills.
pub struct LookupBudget(Budget<IpAddr>);

impl LookupBudget {
    pub fn new(per_source: Quota) -> LookupBudget {
        LookupBudget(Budget::new(per_source))
    }

    /// Spends one lookup of `ip`'s source; `Some(wait)` when it is out.
    pub fn spend(&self, ip: IpAddr) -> Option<Duration> {
        let key = source_key(ip);
        if let Some(d) = self.0.blocked_for(&key) {
            return Some(d);
        }
        self.0.spend(&key)
    }

    pub fn sweep(&self) {
        self.0.sweep();
    }
}

/// Failed-authentication budgets of the SSH side.
///
/// A username whose budget is spent (attacked from many sources) is refused
/// only to sources that have themselves failed recently: the failing sources
/// are penalised, and the owner's first connection from a clean address is
/// always heard. Each attacking source still gets at most one connection's
/// attempts (`ssh.max_auth_attempts`) before it, too, is refused for that user
/// and soon for everyone (its own budget).
pub struct AuthLimits {
    sources: Budget<IpAddr>,
    users: Budget<String>,
    /// Sources with a failure in the last `window`, when it was.
    recent: Mutex<HashMap<IpAddr, Instant>>,
    window: Duration,
}

/// Why a login is refused before any key is looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocked {
    Source(Duration),
    User(Duration),
}

impl Blocked {
    /// The metric's kind for this refusal.
    pub fn kind(&self) -> crate::metrics::Refusal {
        match self {
            Blocked::Source(_) => crate::metrics::Refusal::SshSource,
            Blocked::User(_) => crate::metrics::Refusal::SshUser,
        }
    }
}

impl std::fmt::Display for Blocked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Blocked::Source(d) => write!(
                f,
                "too many failed logins from your address; try again in {}s",
                d.as_secs().max(1)
            ),
            Blocked::User(d) => write!(
                f,
                "too many failed logins for this user; try again in {}s",
                d.as_secs().max(1)
            ),
        }
    }
}

impl AuthLimits {
    pub fn new(per_source: Quota, per_user: Quota) -> AuthLimits {
        Self::with_window(per_source, per_user, Duration::from_secs(60))
    }

    /// As `new`; a source counts as failing for `window` after a failure.
    pub fn with_window(per_source: Quota, per_user: Quota, window: Duration) -> AuthLimits {
        AuthLimits {
            sources: Budget::new(per_source),
            users: Budget::new(per_user),
            recent: Mutex::new(HashMap::new()),
            window,
        }
    }

    fn failed_recently(&self, source: &IpAddr) -> bool {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent
            .get(source)
            .is_some_and(|at| at.elapsed() < self.window)
    }

    fn remember_failure(&self, source: IpAddr) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() >= MAX_BLOCKED && !recent.contains_key(&source) {
            let window = self.window;
            recent.retain(|_, at| at.elapsed() < window);
            if recent.len() >= MAX_BLOCKED {
                if let Some(oldest) = recent.iter().min_by_key(|(_, at)| **at).map(|(k, _)| *k) {
                    recent.remove(&oldest);
                }
            }
        }
        recent.insert(source, Instant::now());
    }

    /// Whether new connections from `ip` are refused right now.
    pub fn source_blocked(&self, ip: IpAddr) -> Option<Duration> {
        self.sources.blocked_for(&source_key(ip))
    }

    /// Whether a connection logging in as `user` from `ip` is refused right
    /// now (asked once per connection, before any key is looked at). A
    /// blocked username is refused only to a source that failed recently.
    pub fn check(&self, ip: IpAddr, user: &str) -> Result<(), Blocked> {
        let source = source_key(ip);
        if let Some(d) = self.sources.blocked_for(&source) {
            return Err(Blocked::Source(d));
        }
        if let Some(d) = self.users.blocked_for(&user_key(user)) {
            if self.failed_recently(&source) {
                return Err(Blocked::User(d));
            }
        }
        Ok(())
    }

    /// Counts one failed authentication (or refused username) against the
    /// source and the username. Only the source's own budget ends the
    /// connection at once; a spent username budget applies to the next
    /// connections of failing sources ([`AuthLimits::check`]).
    pub fn failed(&self, ip: IpAddr, user: &str) -> Result<(), Blocked> {
        let source = source_key(ip);
        self.remember_failure(source);
        let _ = self.users.spend(&user_key(user));
        if let Some(d) = self.sources.spend(&source) {
            return Err(Blocked::Source(d));
        }
        Ok(())
    }

    /// Drops the state of keys back at full budget (call periodically).
    pub fn sweep(&self) {
        self.sources.sweep();
        self.users.sweep();
        let window = self.window;
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, at| at.elapsed() < window);
    }

    /// Keys with limiter state, for tests and metrics.
    pub fn tracked(&self) -> usize {
        self.sources.tracked() + self.users.tracked()
    }
}

/// Usernames are keyed case-insensitively and cut short (a 10 KiB username
/// does not become a 10 KiB key).
fn user_key(user: &str) -> String {
    user.chars().take(64).collect::<String>().to_lowercase()
}

/// API request budgets: one per caller (a job, or a shared token as used
/// from one source) and one per source over every caller it presents.
pub struct ApiLimits {
    tokens: Budget<String>,
    sources: Budget<IpAddr>,
    bad_tokens: Budget<IpAddr>,
}

/// Which budget an API request is spent from (besides its source's).
pub enum Spender<'a> {
    /// A job token: the job's own budget, wherever it is used from.
    Job(&'a str),
    /// A token many runners share (the registration token, a repository's
    /// OIDC tokens): its budget is kept per source, so one runner flooding
    /// with it cannot make every other runner's registration wait.
    Shared(&'a str),
}

impl ApiLimits {
    pub fn new(per_token: Quota, per_source: Quota, bad_tokens_per_source: Quota) -> ApiLimits {
        ApiLimits {
            tokens: Budget::new(per_token),
            sources: Budget::new(per_source),
            bad_tokens: Budget::new(bad_tokens_per_source),
        }
    }

    /// Spends one request of `spender` (an index or name, never the token)
    /// and of `source`. Returns the wait and which budget ran out
    /// (`ApiSource` or `ApiToken`).
    pub fn request(
        &self,
        spender: Spender<'_>,
        source: Option<IpAddr>,
    ) -> Result<(), (Duration, Refusal)> {
        if let Some(ip) = source {
            if let Some(d) = self.sources.spend(&source_key(ip)) {
                return Err((d, Refusal::ApiSource));
            }
        }
        let key = match (spender, source) {
            (Spender::Job(id), _) => format!("job:{id}"),
            (Spender::Shared(name), Some(ip)) => format!("{name}@{}", source_key(ip)),
            (Spender::Shared(name), None) => name.to_string(),
        };
        match self.tokens.spend(&key) {
            None => Ok(()),
            Some(d) => Err((d, Refusal::ApiToken)),
        }
    }

    pub fn source_blocked(&self, ip: IpAddr) -> Option<Duration> {
        self.bad_tokens.blocked_for(&source_key(ip))
    }

    /// Counts a request with a missing or wrong token; returns how long the
    /// source is blocked if this one used up its budget.
    pub fn bad_token(&self, ip: IpAddr) -> Option<Duration> {
        self.bad_tokens.spend(&source_key(ip))
    }

    pub fn sweep(&self) {
        self.tokens.sweep();
        self.sources.sweep();
        self.bad_tokens.sweep();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn gates_queue_beyond_the_limit_and_forget_idle_keys() {
        let gates = std::sync::Arc::new(Gates::<u8>::new(2));
        let a = gates
            .enter(1, Duration::from_millis(10))
            .await
            .expect("first");
        let b = gates
            .enter(1, Duration::from_millis(10))
            .await
            .expect("second");
        // A third waits, and gives up when its patience ends.
        assert!(gates.enter(1, Duration::from_millis(20)).await.is_none());
        // Another key is not held up by this one.
        let other = gates
            .enter(2, Duration::from_millis(10))
            .await
            .expect("other key");
        // A waiter gets the place a holder leaves.
        let waiter = {
            let gates = gates.clone();
            tokio::spawn(async move { gates.enter(1, Duration::from_secs(5)).await.is_some() })
        };
        tokio::task::yield_now().await;
        drop(a);
        assert!(waiter.await.expect("join"));
        drop((b, other));
        assert_eq!(gates.keys(), 0, "no key is kept once nobody holds or waits");
    }

    #[test]
    fn a_flooding_source_is_blocked_and_nobody_else_is() {
        let limits = AuthLimits::new(
            quota(5, Duration::from_secs(60)),
            quota(1000, Duration::from_secs(60)),
        );
        let flooder: IpAddr = "10.0.0.1".parse().expect("ip");
        let other: IpAddr = "10.0.0.2".parse().expect("ip");
        for _ in 0..5 {
            assert_eq!(limits.failed(flooder, "octocat"), Ok(()));
        }
        assert!(matches!(
            limits.failed(flooder, "octocat"),
            Err(Blocked::Source(_))
        ));
        assert!(limits.source_blocked(flooder).is_some());
        assert!(matches!(
            limits.check(flooder, "anyone"),
            Err(Blocked::Source(_))
        ));
        assert_eq!(limits.check(other, "octocat"), Ok(()));
        assert!(limits.source_blocked(other).is_none());
    }

    #[test]
    fn a_username_under_attack_is_refused_to_the_failing_sources_only() {
        let limits = AuthLimits::new(
            quota(1000, Duration::from_secs(60)),
            quota(3, Duration::from_secs(60)),
        );
        // Six other addresses fail as octocat, spending the name's budget.
        for i in 0..6u8 {
            let ip = IpAddr::from([10, 0, 1, i]);
            assert_eq!(limits.check(ip, "OctoCat"), Ok(()));
            assert_eq!(limits.failed(ip, "OctoCat"), Ok(()));
        }
        // Each of them is refused as octocat now, but not as anyone else.
        let attacker = IpAddr::from([10, 0, 1, 0]);
        assert!(matches!(
            limits.check(attacker, "OCTOCAT"),
            Err(Blocked::User(_))
        ));
        assert_eq!(limits.check(attacker, "hubot"), Ok(()));
        // The owner's first connection from a clean address is heard, and a
        // wrong key on the way (an ssh client tries several) does not end it.
        let owner = IpAddr::from([192, 168, 7, 7]);
        assert_eq!(limits.check(owner, "octocat"), Ok(()));
        assert_eq!(limits.failed(owner, "octocat"), Ok(()));
        // Having failed, that address is now a failing source too.
        assert!(matches!(
            limits.check(owner, "octocat"),
            Err(Blocked::User(_))
        ));
        // After the window the source is clean again.
        let quick = AuthLimits::with_window(
            quota(1000, Duration::from_secs(60)),
            quota(1, Duration::from_secs(60)),
            Duration::from_millis(20),
        );
        let ip = IpAddr::from([10, 9, 9, 9]);
        let _ = quick.failed(ip, "octocat");
        let _ = quick.failed(ip, "octocat");
        assert!(quick.check(ip, "octocat").is_err());
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(quick.check(ip, "octocat"), Ok(()));
    }

    #[test]
    fn counted_slots_are_bounded_per_key_and_given_back() {
        let c = std::sync::Arc::new(Counted::default());
        let a = c.take(source_key("2001:db8:1:2::1".parse().expect("ip")), 2);
        let b = c.take(source_key("2001:db8:1:2:ffff::9".parse().expect("ip")), 2);
        assert!(a.is_some() && b.is_some());
        // A third address of the same /64 is the same source.
        assert!(c
            .take(source_key("2001:db8:1:2::77".parse().expect("ip")), 2)
            .is_none());
        assert!(c
            .take(source_key("2001:db8:1:3::1".parse().expect("ip")), 2)
            .is_some());
        drop(a);
        assert!(c
            .take(source_key("2001:db8:1:2::77".parse().expect("ip")), 2)
            .is_some());
    }

    #[test]
    fn descriptors_are_shared_with_headroom() {
        assert_eq!(descriptor_share(1024), 384);
        assert_eq!(descriptor_share(65536), 32640);
        assert_eq!(descriptor_share(100), 8);
        let limit = open_files_limit().expect("Linux has /proc/self/limits");
        assert!(limit >= 64, "{limit}");
    }

    #[test]
    fn ipv6_sources_share_their_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        assert_eq!(
            source_key(mapped),
            "10.0.0.1".parse::<IpAddr>().expect("ip")
        );
    }

    #[test]
    fn state_of_idle_keys_is_dropped() {
        let limits = AuthLimits::new(
            quota(1000, Duration::from_millis(10)),
            quota(1000, Duration::from_millis(10)),
        );
        for i in 0..1000u32 {
            let _ = limits.failed(IpAddr::from(i.to_be_bytes()), &format!("u{i}"));
        }
        assert!(limits.tracked() >= 1000);
        std::thread::sleep(Duration::from_millis(30));
        limits.sweep();
        assert_eq!(limits.tracked(), 0);
    }

    #[test]
    fn api_budgets_are_per_job_per_shared_token_source_and_per_source() {
        let minute = Duration::from_secs(60);
        let limits = ApiLimits::new(quota(2, minute), quota(5, minute), quota(2, minute));
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        assert!(limits.request(Spender::Shared("token-0"), a).is_ok());
        assert!(limits.request(Spender::Shared("token-0"), a).is_ok());
        assert!(limits.request(Spender::Shared("token-0"), a).is_err());
        // The same shared token from another runner has its own budget.
        assert!(limits.request(Spender::Shared("token-0"), b).is_ok());
        assert!(limits.request(Spender::Job("1"), a).is_ok());
        assert!(limits.request(Spender::Job("1"), b).is_ok());
        assert!(limits.request(Spender::Job("1"), b).is_err());
        // a has spent 4 of its 5; two more jobs' fresh budgets do not help.
        assert!(limits.request(Spender::Job("2"), a).is_ok());
        let (_, why) = limits.request(Spender::Job("3"), a).unwrap_err();
        assert_eq!(why, Refusal::ApiSource);
    }
}
