//! Registered jobs: what each runner told us, persisted in an embedded redb
//! store under `storage.data_dir` so a restart loses nothing, plus each job's
//! live state ([`Live`]: open sessions and the kick signal).
//!
//! No sockets here: the API writes registrations, the SSH side reads them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};

pub mod directory;
mod sync;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{ReadableTable, TableDefinition};
use russh::keys::PrivateKey;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::sync::watch;

use crate::ids::{GithubLogin, JobId};
use crate::secret::Secret;

const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");
/// Runner keys of `runner_login = "key"` jobs (OpenSSH private key text).
const JOB_KEYS: TableDefinition<u64, &[u8]> = TableDefinition::new("job_keys");
/// Ended job ids, with why and when.
const ENDED: TableDefinition<u64, &[u8]> = TableDefinition::new("ended");

/// Ended ids remembered; beyond this the oldest is forgotten first. At the
/// default 10,000 live jobs and jobs of hours, this is weeks of endings.
const MAX_TOMBSTONES: usize = 200_000;
/// A tombstone is forgotten after this long: far beyond any job's life
/// (GitHub's longest job is 5 days on a self-hosted runner, plus the hold).
pub const TOMBSTONE_AGE: std::time::Duration = std::time::Duration::from_secs(90 * 24 * 3600);

/// How the gateway logs in to a runner in job mode (DESIGN §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RunnerLogin {
    /// A certificate from the gateway's CA whose only principal names the job.
    #[default]
    Certificate,
    /// A key made for this one job (Windows, dropbear).
    Key,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Os {
    #[default]
    Linux,
    Windows,
    Macos,
}

/// One job as its runner registered it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    pub job_id: JobId,
    pub actor: GithubLogin,
    pub host: IpAddr,
    pub port: u16,
    pub user: String,
    /// The runner's SSH host public keys, OpenSSH format; pinned on connect.
    pub host_keys: Vec<String>,
    pub repository: Option<String>,
    pub run_id: Option<u64>,
    pub os: Os,
    pub allowed_users: Vec<GithubLogin>,
    pub registered_at: u64,
    pub refreshed_at: u64,
    pub finished_at: Option<u64>,
    /// Since when the job waits at a breakpoint (`runner breakpoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_at: Option<u64>,
    #[serde(default)]
    pub runner_login: RunnerLogin,
    /// Hex SHA-256 of the job token. Empty in records of versions before
    /// job tokens: those are ended at start.
    #[serde(default)]
    pub token_hash: String,
    /// Bumped by every write of the record.
    #[serde(default)]
    pub version: u64,
    /// Reached through its agent's reverse tunnel, never dialed (DESIGN
    /// §10): `host` is then the unspecified address, which no dial accepts,
    /// and `port` the sshd's port on the runner's side.
    #[serde(default)]
    pub tunnel: bool,
}

impl Registration {
    /// Whether `presented` is this job's token.
    pub fn token_matches(&self, presented: &str) -> bool {
        crate::secret::TokenHash::from_hex(&self.token_hash).is_some_and(|h| h.verify(presented))
    }

    /// The only principal of this job's certificates.
    pub fn principal(&self) -> String {
        format!("ci-gateway-job-{}", self.job_id)
    }
}

impl Serialize for JobId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for JobId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        JobId::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for GithubLogin {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for GithubLogin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        GithubLogin::parse(&s).map_err(serde::de::Error::custom)
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One open user connection as the API shows it. No source address: the
/// runner side (and a public CI log) has no business knowing where users are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionInfo {
    /// The session's id ([`directory`]): what `admin kick` names.
    pub id: String,
    pub login: String,
    /// `job` (the gateway bridges it) or `jump` (end to end to the runner).
    pub mode: &'static str,
    pub since: u64,
}

/// A job's live state, shared by its sessions, the API and the hold.
pub struct Live {
    /// Every session the gateway knows of: this replica's and, with
    /// PostgreSQL, the other live replicas'.
    sessions: watch::Sender<usize>,
    /// The other live replicas' sessions (PostgreSQL; see `registry::sync`).
    remote: std::sync::Mutex<Vec<SessionInfo>>,
    /// Where this replica's session changes are published (PostgreSQL).
    publish: Option<(u64, Arc<crate::pg::Dirty>)>,
    kick: watch::Sender<Option<String>>,
    notice: watch::Sender<Option<String>>,
    who: std::sync::Mutex<HashMap<u64, SessionInfo>>,
    next_session: std::sync::atomic::AtomicU64,
    /// The agent's tunnel connection while one is up (tunnel registrations).
    tunnel: watch::Sender<Option<Arc<crate::ssh::tunnel::TunnelLink>>>,
    tunnel_connects: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("sessions", &self.active_sessions())
            .finish_non_exhaustive()
    }
}

impl Live {
    pub(crate) fn new() -> Arc<Live> {
        Self::published(None)
    }

    fn published(publish: Option<(u64, Arc<crate::pg::Dirty>)>) -> Arc<Live> {
        Arc::new(Live {
            sessions: watch::Sender::new(0),
            remote: Default::default(),
            publish,
            kick: watch::Sender::new(None),
            notice: watch::Sender::new(None),
            who: Default::default(),
            next_session: Default::default(),
            tunnel: watch::Sender::new(None),
            tunnel_connects: Default::default(),
        })
    }

    /// The tunnel that is up, if any.
    pub fn tunnel(&self) -> Option<Arc<crate::ssh::tunnel::TunnelLink>> {
        self.tunnel.borrow().clone()
    }

    /// How many tunnel connections the agent made.
    pub fn tunnel_connects(&self) -> u64 {
        self.tunnel_connects
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes `link` the job's tunnel; returns the one it replaces (the
    /// agent reconnected before the gateway saw the old one die).
    pub fn attach_tunnel(
        &self,
        link: Arc<crate::ssh::tunnel::TunnelLink>,
    ) -> Option<Arc<crate::ssh::tunnel::TunnelLink>> {
        self.tunnel_connects
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let replaced = self.tunnel.send_replace(Some(link));
        self.changed();
        replaced
    }

    /// Forgets the tunnel of connection `conn`, if it is still the job's.
    pub fn detach_tunnel(&self, conn: u64) -> bool {
        let detached = self.tunnel.send_if_modified(|slot| {
            if slot.as_ref().is_some_and(|l| l.conn == conn) {
                *slot = None;
                true
            } else {
                false
            }
        });
        if detached {
            self.changed();
        }
        detached
    }

    fn who(&self) -> std::sync::MutexGuard<'_, HashMap<u64, SessionInfo>> {
        self.who.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one open user connection until the guard drops.
    pub fn enter(self: &Arc<Self>, info: SessionInfo) -> SessionGuard {
        let key = self
            .next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.who().insert(key, info);
        self.changed();
        SessionGuard(self.clone(), key)
    }

    /// Recounts after a change of either side, and queues this replica's
    /// side for publishing.
    fn changed(&self) {
        let total = self.who().len() + self.remote().len();
        self.sessions
            .send_if_modified(|n| std::mem::replace(n, total) != total);
        if let Some((job, dirty)) = &self.publish {
            dirty.mark(*job);
        }
    }

    fn remote(&self) -> std::sync::MutexGuard<'_, Vec<SessionInfo>> {
        self.remote.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The sessions other live replicas hold (PostgreSQL).
    pub(crate) fn set_remote(&self, sessions: Vec<SessionInfo>) {
        let total = self.who().len() + sessions.len();
        *self.remote() = sessions;
        self.sessions
            .send_if_modified(|n| std::mem::replace(n, total) != total);
    }

    /// Sessions on every live replica.
    pub fn active_sessions(&self) -> usize {
        *self.sessions.borrow()
    }

    /// Who is connected, oldest first: this replica's, then the others'.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let mut all = self.local_sessions();
        all.extend(self.remote().iter().cloned());
        all
    }

    /// Who is connected through this replica, oldest first.
    pub fn local_sessions(&self) -> Vec<SessionInfo> {
        let mut all: Vec<(u64, SessionInfo)> =
            self.who().iter().map(|(k, v)| (*k, v.clone())).collect();
        all.sort_by_key(|(k, _)| *k);
        all.into_iter().map(|(_, v)| v).collect()
    }

    /// Changes of the session count (the hold logic waits on these).
    pub fn watch_sessions(&self) -> watch::Receiver<usize> {
        self.sessions.subscribe()
    }

    /// Tells every session of this job to close, with `reason`. Sticky: a
    /// session that subscribes afterwards sees it at once.
    pub fn kick(&self, reason: String) {
        self.kick.send_replace(Some(reason));
    }

    pub fn watch_kick(&self) -> watch::Receiver<Option<String>> {
        self.kick.subscribe()
    }

    /// Shows `line` on the terminals of this job's job-mode sessions.
    pub fn notify(&self, line: String) {
        self.notice.send_replace(Some(line));
    }

    pub fn watch_notices(&self) -> watch::Receiver<Option<String>> {
        let mut rx = self.notice.subscribe();
        // A session that opens later does not replay an old warning.
        rx.mark_unchanged();
        rx
    }
}

/// Where `kick_session` closed a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KickedWhere {
    Here,
    /// Another replica holds it and was told (PostgreSQL `NOTIFY`).
    Asked,
}

/// One open user connection to a job; the count drops with it.
#[derive(Debug)]
pub struct SessionGuard(Arc<Live>, u64);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.who().remove(&self.1);
        self.0.changed();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("registry store: {0}")]
    Db(String),
    #[error("the gateway holds its maximum of {0} jobs")]
    Full(usize),
    /// The job ended; job ids are not reused.
    #[error("{0}")]
    Ended(String),
    #[error("job {0} is not registered")]
    Unknown(JobId),
    /// A create lost to another create of the same id.
    #[error("job {0} is already registered")]
    Exists(JobId),
    /// A refresh tried to change what the job is.
    #[error("{0}")]
    Conflict(String),
}

/// Why the registry could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Unreachable(#[from] crate::pg::Unreachable),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// What a lookup found.
#[derive(Debug, Clone)]
pub enum Lookup {
    Active(Arc<Registration>, Arc<Live>),
    Ended(String),
    Unknown,
}

#[derive(Debug)]
struct Entry {
    registration: Arc<Registration>,
    live: Arc<Live>,
    /// The key made for this one job (`runner_login = "key"`).
    runner_key: Option<Arc<PrivateKey>>,
}

/// Why an ended job ended, and when; persisted so an ended id stays ended
/// across restarts.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Tombstone {
    reason: String,
    at: u64,
}

#[derive(Default)]
struct State {
    jobs: HashMap<JobId, Entry>,
    ended: HashMap<JobId, Tombstone>,
}

/// One decided transition, written to the store in one transaction and
/// then applied to memory.
enum Change {
    Put {
        registration: Arc<Registration>,
        /// A new job's own runner key: (OpenSSH text, parsed).
        new_key: Option<(Secret<String>, Arc<PrivateKey>)>,
    },
    End {
        job: JobId,
        tombstone: Tombstone,
    },
}

/// Where the registry is kept.
enum Backend {
    Redb(redb::Database),
    Postgres(Arc<Shared>),
}

/// A replica's side of the PostgreSQL registry.
pub struct Shared {
    connector: crate::pg::Connector,
    /// This replica's id in `replicas`, `sessions` and `hold_owners`:
    /// random per start, so a restarted replica never inherits a dead
    /// one's rows.
    pub replica: String,
    name: String,
    started: u64,
    /// The connection transactions run on (one at a time: `Inner::writer`).
    writer: tokio::sync::Mutex<Option<tokio_postgres::Client>>,
    /// The connection reads and heartbeats share (queries pipeline on it).
    reader: tokio::sync::Mutex<Option<Arc<tokio_postgres::Client>>>,
    sealer: crate::pg::Sealer,
    dirty: Arc<crate::pg::Dirty>,
    heartbeat: std::time::Duration,
    timeout: std::time::Duration,
    /// When a connection last failed (requests then fail fast for a moment).
    down: std::sync::Mutex<Option<std::time::Instant>>,
    /// Where the other replicas reach this one's SSH port (tunnel relays).
    address: std::sync::Mutex<String>,
}

struct Inner {
    backend: Backend,
    state: RwLock<State>,
    /// Held by every transition from its decision to its application, so a
    /// decision never acts on a state another transition is changing: each
    /// move is compare-and-set in effect. Readers only take `state`. With
    /// PostgreSQL the job's advisory lock extends this across replicas.
    writer: tokio::sync::Mutex<()>,
    max_jobs: usize,
    /// This replica's sessions by id.
    directory: Arc<directory::Directory>,
}

pub struct Registry {
    inner: Arc<Inner>,
}

/// Reads of a poisoned lock keep serving: every write below leaves the maps
/// consistent before anything that can panic.
fn read(lock: &RwLock<State>) -> std::sync::RwLockReadGuard<'_, State> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write(lock: &RwLock<State>) -> std::sync::RwLockWriteGuard<'_, State> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

/// The reason an old-format registration is ended at start (see
/// docs/upgrading.md).
pub fn upgraded_reason(job: JobId) -> String {
    format!(
        "job {job} was registered before this gateway moved to per-job credentials and was ended \
         at the upgrade; re-run the job to debug it (docs/upgrading.md)"
    )
}

impl Registry {
    /// Opens (or creates) the store at `path` and loads every registration
    /// and tombstone. Tombstones older than [`TOMBSTONE_AGE`] are dropped;
    /// registrations made before job tokens existed are ended (logged).
    pub fn open(path: &Path, max_jobs: usize) -> Result<Registry, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(db_err)?;
        }
        let db = redb::Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Db(format!(
                "another gateway is using {} (one process per data directory; \
                 replicas share PostgreSQL instead, docs/operations.md)",
                path.display()
            )),
            e => db_err(e),
        })?;
        restrict_mode(path);
        let mut state = State::default();
        let now = unix_now();
        let txn = db.begin_write().map_err(db_err)?;
        {
            let mut jobs = txn.open_table(JOBS).map_err(db_err)?;
            let mut keys = txn.open_table(JOB_KEYS).map_err(db_err)?;
            let mut ended = txn.open_table(ENDED).map_err(db_err)?;
            let mut aged = Vec::new();
            for row in ended.iter().map_err(db_err)? {
                let (k, v) = row.map_err(db_err)?;
                let id = JobId::from_u64(k.value());
                match (id, serde_json::from_slice::<Tombstone>(v.value())) {
                    (Some(id), Ok(t)) if now.saturating_sub(t.at) < TOMBSTONE_AGE.as_secs() => {
                        state.ended.insert(id, t);
                    }
                    _ => aged.push(k.value()),
                }
            }
            for k in aged {
                ended.remove(k).map_err(db_err)?;
            }
            let mut old = Vec::new();
            for row in jobs.iter().map_err(db_err)? {
                let (k, value) = row.map_err(db_err)?;
                let reg = match serde_json::from_slice::<Registration>(value.value()) {
                    Ok(reg) => reg,
                    Err(e) => {
                        tracing::error!(
                            "ending an unreadable stored registration ({}): {e}",
                            k.value()
                        );
                        old.push(k.value());
                        continue;
                    }
                };
                if reg.token_hash.is_empty() || state.ended.contains_key(&reg.job_id) {
                    old.push(k.value());
                    continue;
                }
                let runner_key = match reg.runner_login {
                    RunnerLogin::Certificate => None,
                    RunnerLogin::Key => {
                        let key = keys
                            .get(k.value())
                            .map_err(db_err)?
                            .and_then(|v| PrivateKey::from_openssh(v.value()).ok());
                        match key {
                            Some(key) => Some(Arc::new(key)),
                            None => {
                                tracing::error!(job = %reg.job_id, "its runner key is missing from the store; ending it");
                                old.push(k.value());
                                continue;
                            }
                        }
                    }
                };
                state.jobs.insert(
                    reg.job_id,
                    Entry {
                        registration: Arc::new(reg),
                        live: Live::new(),
                        runner_key,
                    },
                );
            }
            for k in old {
                let Some(id) = JobId::from_u64(k) else {
                    jobs.remove(k).map_err(db_err)?;
                    continue;
                };
                if let std::collections::hash_map::Entry::Vacant(slot) = state.ended.entry(id) {
                    tracing::warn!(job = %id, "{}", upgraded_reason(id));
                    let t = Tombstone {
                        reason: upgraded_reason(id),
                        at: now,
                    };
                    let bytes = serde_json::to_vec(&t).map_err(db_err)?;
                    ended.insert(k, bytes.as_slice()).map_err(db_err)?;
                    slot.insert(t);
                }
                jobs.remove(k).map_err(db_err)?;
                keys.remove(k).map_err(db_err)?;
            }
        }
        txn.commit().map_err(db_err)?;
        Ok(Registry {
            inner: Arc::new(Inner {
                backend: Backend::Redb(db),
                state: RwLock::new(state),
                writer: tokio::sync::Mutex::new(()),
                max_jobs,
                directory: Default::default(),
            }),
        })
    }

    /// Joins the PostgreSQL registry: migrates the schema, writes this
    /// replica's first heartbeat and loads every job. `seal_secret` keys the
    /// sealing of runner keys (the CA's private key).
    pub async fn open_postgres(
        storage: &crate::config::StorageConfig,
        name: String,
        seal_secret: &[u8],
        max_jobs: usize,
    ) -> Result<Registry, OpenError> {
        let connector =
            crate::pg::Connector::new(storage.postgres_url.expose(), &storage.postgres_ca)
                .map_err(|e| {
                    OpenError::Store(StoreError::Db(format!("storage.postgres_url: {e}")))
                })?;
        let mut client = connector.connect(None).await?;
        crate::pg::migrate(&mut client).await?;
        let shared = Arc::new(Shared {
            replica: format!("{:016x}", rand::random::<u64>()),
            name,
            started: unix_now(),
            writer: tokio::sync::Mutex::new(Some(client)),
            reader: tokio::sync::Mutex::new(None),
            sealer: crate::pg::Sealer::new(seal_secret),
            dirty: Default::default(),
            heartbeat: storage.heartbeat,
            timeout: storage.replica_timeout,
            down: Default::default(),
            address: std::sync::Mutex::new(storage.replica_address.clone()),
            connector,
        });
        shared.beat().await?;
        let inner = Arc::new(Inner {
            backend: Backend::Postgres(shared.clone()),
            state: RwLock::new(State::default()),
            writer: tokio::sync::Mutex::new(()),
            max_jobs,
            directory: Default::default(),
        });
        inner.reload_all(&shared).await?;
        Ok(Registry { inner })
    }

    /// Whether the store answers: a read of the jobs table (redb), or
    /// `SELECT 1` on the read connection (PostgreSQL). `Ok` says which.
    pub async fn check(&self) -> Result<String, StoreError> {
        match &self.inner.backend {
            Backend::Redb(db) => {
                let txn = redb::ReadableDatabase::begin_read(db).map_err(db_err)?;
                txn.open_table(JOBS).map_err(db_err)?;
                Ok(format!("redb: {} jobs", self.len()))
            }
            Backend::Postgres(shared) => shared.check().await,
        }
    }

    /// This replica's sessions by id.
    pub fn directory(&self) -> &Arc<directory::Directory> {
        &self.inner.directory
    }

    /// Closes session `id` with `reason`: here if this replica holds it,
    /// else (PostgreSQL) by asking the replica that published it. `None`:
    /// no live session has that id.
    pub async fn kick_session(
        &self,
        id: &str,
        reason: &str,
    ) -> Result<Option<KickedWhere>, StoreError> {
        if self.inner.directory.kick(id, reason) {
            return Ok(Some(KickedWhere::Here));
        }
        let Some(shared) = self.shared() else {
            return Ok(None);
        };
        let remote = self
            .active()
            .iter()
            .any(|(_, live)| live.sessions().iter().any(|s| s.id == id));
        if !remote {
            return Ok(None);
        }
        shared.ask_kick(id, reason).await?;
        Ok(Some(KickedWhere::Asked))
    }

    /// The PostgreSQL side, when the registry is shared.
    pub fn shared(&self) -> Option<&Arc<Shared>> {
        match &self.inner.backend {
            Backend::Postgres(shared) => Some(shared),
            Backend::Redb(_) => None,
        }
    }

    /// Keeps this replica's copy current and publishes its sessions
    /// (PostgreSQL only): runs until stopped, reconnecting with backoff.
    pub fn replication(&self) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let shared = self.shared()?.clone();
        let inner = self.inner.clone();
        Some(sync::run(inner, shared))
    }

    /// Like [`Registry::lookup`], but a job this replica has not heard of
    /// yet is read from the database (registered a moment ago through
    /// another replica).
    pub async fn lookup_fresh(&self, job: JobId) -> Lookup {
        let found = self.lookup(job);
        let (Lookup::Unknown, Some(shared)) = (&found, self.shared()) else {
            return found;
        };
        match self.inner.reload_job(shared, job).await {
            Ok(()) => self.lookup(job),
            Err(e) => {
                tracing::warn!(job = %job, "reading the job from PostgreSQL: {e}");
                found
            }
        }
    }

    /// Takes the job's hold decisions for this replica, unless a live
    /// replica has them (PostgreSQL); with redb there is one replica.
    pub async fn acquire_hold(&self, job: JobId) -> Result<bool, StoreError> {
        match self.shared() {
            Some(shared) => shared.acquire_hold(job).await,
            None => Ok(true),
        }
    }

    /// Whether this replica still makes the job's hold decisions.
    pub async fn owns_hold(&self, job: JobId) -> Result<bool, StoreError> {
        match self.shared() {
            Some(shared) => shared.owns_hold(job).await,
            None => Ok(true),
        }
    }

    /// Finished jobs whose hold no live replica runs (PostgreSQL; redb
    /// starts every hold itself).
    pub async fn orphaned_holds(&self) -> Result<Vec<JobId>, StoreError> {
        match self.shared() {
            Some(shared) => shared.orphaned_holds().await,
            None => Ok(Vec::new()),
        }
    }

    /// Leaves the replica set at a clean stop: its sessions stop counting
    /// and its holds are free for the others at once.
    pub async fn leave(&self) {
        if let Some(shared) = self.shared() {
            if let Err(e) = shared.leave().await {
                tracing::warn!("leaving the replica set: {e}");
            }
        }
    }

    pub fn lookup(&self, job: JobId) -> Lookup {
        let state = read(&self.inner.state);
        if let Some(entry) = state.jobs.get(&job) {
            return Lookup::Active(entry.registration.clone(), entry.live.clone());
        }
        match state.ended.get(&job) {
            Some(t) => Lookup::Ended(t.reason.clone()),
            None => Lookup::Unknown,
        }
    }

    /// The key made for `job`'s runner, when it logs in with one.
    pub fn runner_key(&self, job: JobId) -> Option<Arc<PrivateKey>> {
        read(&self.inner.state)
            .jobs
            .get(&job)
            .and_then(|e| e.runner_key.clone())
    }

    pub fn len(&self) -> usize {
        read(&self.inner.state).jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ended ids remembered (persisted, bounded).
    pub fn tombstones(&self) -> usize {
        read(&self.inner.state).ended.len()
    }

    /// Creates a job that does not exist and never ended. With
    /// `RunnerLogin::Key`, `runner_key` is its own key (stored with it,
    /// deleted when it ends).
    pub async fn create(
        &self,
        registration: Registration,
        runner_key: Option<PrivateKey>,
    ) -> Result<Arc<Registration>, StoreError> {
        let new_key = match runner_key {
            Some(key) => {
                let text = key
                    .to_openssh(russh::keys::ssh_key::LineEnding::LF)
                    .map_err(db_err)?;
                Some((Secret::new(text.to_string()), Arc::new(key)))
            }
            None => None,
        };
        let registration = Arc::new(registration);
        let job = registration.job_id;
        self.transact(job, true, move |state, room| {
            if let Some(t) = state.ended.get(&job) {
                return Err(StoreError::Ended(t.reason.clone()));
            }
            if state.jobs.contains_key(&job) {
                return Err(StoreError::Exists(job));
            }
            if room.len >= room.max {
                return Err(StoreError::Full(room.max));
            }
            Ok((
                Some(Change::Put {
                    registration: registration.clone(),
                    new_key,
                }),
                registration,
            ))
        })
        .await
    }

    /// Replaces a registered job's record with `update(current)`, as one
    /// step: `update` sees the record as it is at the moment of the write
    /// and may refuse ([`StoreError::Conflict`]). An ended or unknown job is
    /// never brought (back) to life.
    pub async fn update(
        &self,
        job: JobId,
        update: impl FnOnce(&Registration) -> Result<Registration, StoreError> + Send + 'static,
    ) -> Result<Arc<Registration>, StoreError> {
        self.transact(job, false, move |state, _| {
            let current = match state.jobs.get(&job) {
                Some(e) => e.registration.clone(),
                None => return Err(gone(state, job)),
            };
            let mut next = update(&current)?;
            next.job_id = job;
            next.version = current.version + 1;
            let next = Arc::new(next);
            Ok((
                Some(Change::Put {
                    registration: next.clone(),
                    new_key: None,
                }),
                next,
            ))
        })
        .await
    }

    /// Marks the job finished (the hold starts); returns the record and
    /// whether this call was the one that finished it. A job already
    /// finished is left as it is (nothing is written).
    pub async fn mark_finished(&self, job: JobId) -> Result<(Arc<Registration>, bool), StoreError> {
        self.amend(job, |next| {
            if next.finished_at.is_some() {
                return false;
            }
            next.finished_at = Some(unix_now());
            // A breakpoint left behind (its agent killed) ends with the steps.
            next.paused_at = None;
            true
        })
        .await
    }

    /// Pauses the job at a breakpoint (`paused`) or lets it go on. Returns
    /// the record and whether it changed.
    pub async fn set_paused(
        &self,
        job: JobId,
        paused: bool,
    ) -> Result<(Arc<Registration>, bool), StoreError> {
        self.amend(job, move |next| {
            if next.paused_at.is_some() == paused {
                return false;
            }
            next.paused_at = paused.then(unix_now);
            true
        })
        .await
    }

    /// Writes the job's record as `change` leaves it, if it says it changed
    /// it; returns the record and whether it did.
    async fn amend(
        &self,
        job: JobId,
        change: impl FnOnce(&mut Registration) -> bool + Send + 'static,
    ) -> Result<(Arc<Registration>, bool), StoreError> {
        self.transact(job, false, move |state, _| {
            let current = match state.jobs.get(&job) {
                Some(e) => e.registration.clone(),
                None => return Err(gone(state, job)),
            };
            let mut next = (*current).clone();
            if !change(&mut next) {
                return Ok((None, (current, false)));
            }
            next.version += 1;
            let next = Arc::new(next);
            let change = Change::Put {
                registration: next.clone(),
                new_key: None,
            };
            Ok((Some(change), (next, true)))
        })
        .await
    }

    /// Ends the job: removes it and its runner key, remembers (durably) that
    /// it ended with `reason`, and kicks its sessions. Returns whether it was
    /// registered; an unknown or already ended job is left as it is.
    pub async fn remove(&self, job: JobId, reason: String) -> Result<bool, StoreError> {
        let result = self
            .transact(job, false, move |state, _| {
                if !state.jobs.contains_key(&job) {
                    return Err(gone(state, job));
                }
                let tombstone = Tombstone {
                    reason,
                    at: unix_now(),
                };
                Ok((Some(Change::End { job, tombstone }), ()))
            })
            .await;
        match result {
            Ok(()) => Ok(true),
            Err(StoreError::Ended(_) | StoreError::Unknown(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Jobs whose runner stopped refreshing before `cutoff` (unix seconds).
    pub fn stale_jobs(&self, cutoff: u64) -> Vec<JobId> {
        read(&self.inner.state)
            .jobs
            .values()
            .filter(|e| e.registration.refreshed_at < cutoff)
            .map(|e| e.registration.job_id)
            .collect()
    }

    /// Every registered job with its live state (unordered).
    pub fn active(&self) -> Vec<(Arc<Registration>, Arc<Live>)> {
        read(&self.inner.state)
            .jobs
            .values()
            .map(|e| (e.registration.clone(), e.live.clone()))
            .collect()
    }

    /// Jobs whose steps are done (their hold has started).
    pub fn finished_jobs(&self) -> Vec<JobId> {
        read(&self.inner.state)
            .jobs
            .values()
            .filter(|e| e.registration.finished_at.is_some())
            .map(|e| e.registration.job_id)
            .collect()
    }

    /// Runs one transition on `job`: `decide` reads the state under the
    /// writer lock and returns a change (or none), which is committed in one
    /// transaction and then applied to memory, all before the lock is
    /// released. With PostgreSQL the transaction first takes the job's
    /// advisory lock and re-reads the job, so `decide` sees what every
    /// replica wrote before it.
    async fn transact<T: Send + 'static>(
        &self,
        job: JobId,
        counts: bool,
        decide: impl FnOnce(&State, Room) -> Result<(Option<Change>, T), StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        match &inner.backend {
            Backend::Redb(_) => tokio::task::spawn_blocking(move || {
                let _writer = inner.writer.blocking_lock();
                let room = Room {
                    max: inner.max_jobs,
                    len: read(&inner.state).jobs.len(),
                };
                let (change, out) = decide(&read(&inner.state), room)?;
                let Some(change) = change else {
                    return Ok(out);
                };
                let evict = inner.commit(&change)?;
                apply(&mut write(&inner.state), change, evict, None);
                Ok(out)
            })
            .await
            .map_err(db_err)?,
            Backend::Postgres(shared) => {
                let _writer = inner.writer.lock().await;
                let mut slot = shared.writer().await?;
                let Some(client) = slot.as_mut() else {
                    return Err(StoreError::Db("no connection".into()));
                };
                let result = sync::transact(&inner, shared, client, job, counts, decide).await;
                if matches!(result, Err(StoreError::Db(_))) {
                    // The connection may be the cause: the next write makes a new one.
                    *slot = None;
                }
                result
            }
        }
    }
}

/// What a creation may take: the bound and how many jobs there are.
#[derive(Clone, Copy)]
struct Room {
    max: usize,
    len: usize,
}

/// Applies a committed change to memory. `evict` is the tombstone the
/// store dropped to stay within its bound.
fn apply(
    state: &mut State,
    change: Change,
    evict: Option<JobId>,
    publish: Option<&Arc<crate::pg::Dirty>>,
) {
    match change {
        Change::Put {
            registration,
            new_key,
        } => {
            let job = registration.job_id;
            match state.jobs.get_mut(&job) {
                Some(entry) => entry.registration = registration,
                None => {
                    state.jobs.insert(
                        job,
                        Entry {
                            registration,
                            live: Live::published(publish.map(|d| (job.get(), d.clone()))),
                            runner_key: new_key.map(|(_, k)| k),
                        },
                    );
                }
            }
        }
        Change::End { job, tombstone } => {
            if let Some(old) = evict {
                state.ended.remove(&old);
            }
            let reason = tombstone.reason.clone();
            state.ended.insert(job, tombstone);
            if let Some(entry) = state.jobs.remove(&job) {
                entry.live.kick(reason);
            }
        }
    }
}

/// The tombstone to forget when the bound is reached: the oldest.
fn oldest_tombstone(state: &State) -> Option<JobId> {
    if state.ended.len() < MAX_TOMBSTONES {
        return None;
    }
    state
        .ended
        .iter()
        .min_by_key(|(_, t)| t.at)
        .map(|(id, _)| *id)
}

/// Why a job that is not registered cannot move.
fn gone(state: &State, job: JobId) -> StoreError {
    match state.ended.get(&job) {
        Some(t) => StoreError::Ended(t.reason.clone()),
        None => StoreError::Unknown(job),
    }
}

impl Inner {
    /// Writes `change` in one redb transaction. For an end that overflows
    /// the tombstone bound, returns the evicted (oldest) id.
    fn commit(&self, change: &Change) -> Result<Option<JobId>, StoreError> {
        let Backend::Redb(db) = &self.backend else {
            return Err(StoreError::Db("not a redb store".into()));
        };
        let txn = db.begin_write().map_err(db_err)?;
        let mut evicted = None;
        {
            let mut jobs = txn.open_table(JOBS).map_err(db_err)?;
            match change {
                Change::Put {
                    registration,
                    new_key,
                } => {
                    let bytes = serde_json::to_vec(&**registration).map_err(db_err)?;
                    let id = registration.job_id.get();
                    jobs.insert(id, bytes.as_slice()).map_err(db_err)?;
                    if let Some((text, _)) = new_key {
                        let mut keys = txn.open_table(JOB_KEYS).map_err(db_err)?;
                        keys.insert(id, text.expose().as_bytes()).map_err(db_err)?;
                    }
                }
                Change::End { job, tombstone } => {
                    let id = job.get();
                    jobs.remove(id).map_err(db_err)?;
                    txn.open_table(JOB_KEYS)
                        .map_err(db_err)?
                        .remove(id)
                        .map_err(db_err)?;
                    let mut ended = txn.open_table(ENDED).map_err(db_err)?;
                    if let Some(old) = oldest_tombstone(&read(&self.state)) {
                        ended.remove(old.get()).map_err(db_err)?;
                        evicted = Some(old);
                    }
                    let bytes = serde_json::to_vec(tombstone).map_err(db_err)?;
                    ended.insert(id, bytes.as_slice()).map_err(db_err)?;
                }
            }
        }
        txn.commit().map_err(db_err)?;
        Ok(evicted)
    }
}

/// The store holds runner keys: only the gateway's user may read it.
fn restrict_mode(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
            tracing::warn!("{}: cannot restrict its mode to 0600: {e}", path.display());
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn registration(job: u64, actor: &str, allowed: &[&str]) -> Registration {
        Registration {
            job_id: JobId::from_u64(job).expect("nonzero"),
            actor: GithubLogin::parse(actor).expect("login"),
            host: "127.0.0.5".parse().expect("ip"),
            port: 22,
            user: "runner".into(),
            host_keys: vec![],
            repository: None,
            run_id: None,
            os: Os::Linux,
            allowed_users: allowed
                .iter()
                .map(|a| GithubLogin::parse(a).expect("login"))
                .collect(),
            registered_at: 1,
            refreshed_at: unix_now(),
            finished_at: None,
            paused_at: None,
            runner_login: RunnerLogin::Certificate,
            token_hash: crate::secret::new_job_token().1.to_hex(),
            version: 0,
            tunnel: false,
        }
    }

    fn temp_db() -> std::path::PathBuf {
        std::env::temp_dir()
            .join(format!("cigw-reg-{}", rand::random::<u64>()))
            .join("registry.redb")
    }

    fn id(n: u64) -> JobId {
        JobId::from_u64(n).expect("id")
    }

    #[tokio::test]
    async fn registrations_and_runner_keys_survive_reopening() {
        let path = temp_db();
        let key =
            PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519).expect("key");
        {
            let reg = Registry::open(&path, 10).expect("open");
            reg.create(registration(7, "octocat", &["hubot"]), None)
                .await
                .expect("create");
            let mut windows = registration(9, "octocat", &[]);
            windows.runner_login = RunnerLogin::Key;
            reg.create(windows, Some(key.clone()))
                .await
                .expect("create");
        }
        let reg = Registry::open(&path, 10).expect("reopen");
        match reg.lookup(id(7)) {
            Lookup::Active(r, _) => assert_eq!(r.allowed_users[0].as_str(), "hubot"),
            other => panic!("expected the job back, got {other:?}"),
        }
        let back = reg.runner_key(id(9)).expect("the job's key is back");
        assert_eq!(back.public_key(), key.public_key());
        assert!(reg.runner_key(id(7)).is_none());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o077, 0, "the store holds keys: owner only");
        }
        // Ending the job deletes its key from the store.
        assert!(reg.remove(id(9), "done".into()).await.expect("end"));
        drop(reg);
        let reg = Registry::open(&path, 10).expect("reopen");
        assert!(reg.runner_key(id(9)).is_none());
        drop(reg);
        let db = redb::Database::create(&path).expect("db");
        let txn = redb::ReadableDatabase::begin_read(&db).expect("read");
        let keys = txn.open_table(JOB_KEYS).expect("table");
        assert!(
            keys.get(9).expect("get").is_none(),
            "the key is gone at rest"
        );
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    #[tokio::test]
    async fn removal_kicks_sessions_and_the_tombstone_survives_a_restart() {
        let path = temp_db();
        let reg = Registry::open(&path, 10).expect("open");
        let id = id(8);
        reg.create(registration(8, "octocat", &[]), None)
            .await
            .expect("create");
        let Lookup::Active(_, live) = reg.lookup(id) else {
            panic!("registered")
        };
        let guard = live.enter(SessionInfo {
            id: directory::new_session_id(),
            login: "octocat".into(),
            mode: "job",
            since: 1,
        });
        assert_eq!(live.sessions()[0].login, "octocat");
        let mut kick = live.watch_kick();
        assert_eq!(live.active_sessions(), 1);
        assert!(reg.remove(id, "job 8 ended".into()).await.expect("remove"));
        kick.changed().await.expect("kick arrives");
        assert_eq!(kick.borrow().as_deref(), Some("job 8 ended"));
        assert!(matches!(reg.lookup(id), Lookup::Ended(_)));
        drop(guard);
        assert_eq!(live.active_sessions(), 0);
        assert!(live.sessions().is_empty());
        assert!(!reg
            .remove(id, "again".into())
            .await
            .expect("second remove is fine"));
        let reopened = {
            drop(reg);
            Registry::open(&path, 10).expect("reopen")
        };
        match reopened.lookup(id) {
            Lookup::Ended(reason) => assert_eq!(reason, "job 8 ended"),
            other => panic!("an ended id stays ended across restarts: {other:?}"),
        }
        assert!(matches!(
            reopened.create(registration(8, "octocat", &[]), None).await,
            Err(StoreError::Ended(_))
        ));
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    #[tokio::test]
    async fn ending_an_unknown_job_leaves_nothing_behind() {
        let path = temp_db();
        let reg = Registry::open(&path, 10).expect("open");
        assert!(!reg.remove(id(5), "stranger".into()).await.expect("ok"));
        assert!(matches!(reg.lookup(id(5)), Lookup::Unknown));
        assert_eq!(reg.tombstones(), 0);
        assert!(matches!(
            reg.mark_finished(id(5)).await,
            Err(StoreError::Unknown(_))
        ));
        reg.create(registration(5, "octocat", &[]), None)
            .await
            .expect("the real runner still registers");
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    #[tokio::test]
    async fn the_job_limit_refuses_new_jobs_but_not_refreshes() {
        let path = temp_db();
        let reg = Registry::open(&path, 1).expect("open");
        reg.create(registration(1, "a", &[]), None)
            .await
            .expect("first");
        assert!(matches!(
            reg.create(registration(2, "a", &[]), None).await,
            Err(StoreError::Full(1))
        ));
        assert!(matches!(
            reg.create(registration(1, "a", &[]), None).await,
            Err(StoreError::Exists(_))
        ));
        let r = reg.update(id(1), |c| Ok(c.clone())).await.expect("refresh");
        assert_eq!(r.version, 1);
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    #[tokio::test]
    async fn finishing_twice_finishes_once_and_writes_once() {
        let path = temp_db();
        let reg = Registry::open(&path, 10).expect("open");
        reg.create(registration(4, "octocat", &[]), None)
            .await
            .expect("create");
        let (first, newly) = reg.mark_finished(id(4)).await.expect("finish");
        assert!(newly && first.finished_at.is_some());
        let (again, newly) = reg.mark_finished(id(4)).await.expect("again");
        assert!(!newly, "only the first call starts the hold");
        assert_eq!(
            again.version, first.version,
            "nothing written the second time"
        );
        assert_eq!(again.finished_at, first.finished_at);
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    #[tokio::test]
    async fn records_of_the_old_version_are_ended_at_start() {
        let path = temp_db();
        {
            let reg = Registry::open(&path, 10).expect("open");
            let mut old = registration(3, "octocat", &[]);
            old.token_hash.clear();
            reg.create(old, None).await.expect("create");
        }
        let reg = Registry::open(&path, 10).expect("reopen");
        match reg.lookup(id(3)) {
            Lookup::Ended(reason) => assert!(reason.contains("upgrad"), "{reason}"),
            other => panic!("{other:?}"),
        }
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    /// Refreshes, finishes and ends race on many jobs from many threads;
    /// once a job has ended it never comes back, in memory or in the store.
    /// (The registry before this test wrote refreshes unconditionally and
    /// brought ended jobs back.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn racing_transitions_never_bring_an_ended_job_back() {
        let path = temp_db();
        let reg = Arc::new(Registry::open(&path, 1000).expect("open"));
        const JOBS: u64 = 60;
        for j in 1..=JOBS {
            reg.create(registration(j, "octocat", &[]), None)
                .await
                .expect("create");
        }
        let mut tasks = Vec::new();
        for j in 1..=JOBS {
            for kind in 0..4 {
                let reg = reg.clone();
                tasks.push(tokio::spawn(async move {
                    for round in 0..20 {
                        let job = id(j);
                        match (kind + round) % 4 {
                            0 | 1 => {
                                let r = reg
                                    .update(job, |c| {
                                        let mut n = c.clone();
                                        n.refreshed_at = unix_now();
                                        Ok(n)
                                    })
                                    .await;
                                if matches!(reg.lookup(job), Lookup::Active(..)) {
                                    continue;
                                }
                                assert!(
                                    r.is_ok() || matches!(r, Err(StoreError::Ended(_))),
                                    "{r:?}"
                                );
                            }
                            2 => {
                                let _ = reg.mark_finished(job).await;
                            }
                            _ => {
                                reg.remove(job, format!("job {j} ended"))
                                    .await
                                    .expect("end");
                                assert!(
                                    matches!(reg.lookup(job), Lookup::Ended(_)),
                                    "job {j} came back right after it ended"
                                );
                            }
                        }
                        tokio::task::yield_now().await;
                    }
                }));
            }
        }
        for t in tasks {
            t.await.expect("no task panicked");
        }
        for j in 1..=JOBS {
            assert!(
                matches!(reg.lookup(id(j)), Lookup::Ended(_)),
                "job {j} is ended at the end"
            );
        }
        drop(reg);
        let reopened = Registry::open(&path, 1000).expect("reopen");
        assert!(reopened.is_empty(), "no ended job is back in the store");
        assert_eq!(reopened.tombstones(), JOBS as usize);
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }
}
