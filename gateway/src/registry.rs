//! Registered jobs: what each runner told us, persisted in an embedded redb
//! store under `storage.data_dir` so a restart loses nothing, plus each job's
//! live state ([`Live`]: open sessions and the kick signal).
//!
//! No sockets here: the API writes registrations, the SSH side reads them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::sync::watch;

use crate::ids::{GithubLogin, JobId};

const JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("jobs");

/// Tombstones of ended jobs kept in memory, so late users hear "job ended".
const MAX_TOMBSTONES: usize = 10_000;

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
    pub login: String,
    /// `job` (the gateway bridges it) or `jump` (end to end to the runner).
    pub mode: &'static str,
    pub since: u64,
}

/// A job's live state, shared by its sessions, the API and the hold.
#[derive(Debug)]
pub struct Live {
    sessions: watch::Sender<usize>,
    kick: watch::Sender<Option<String>>,
    notice: watch::Sender<Option<String>>,
    who: std::sync::Mutex<HashMap<u64, SessionInfo>>,
    next_session: std::sync::atomic::AtomicU64,
}

impl Live {
    fn new() -> Arc<Live> {
        Arc::new(Live {
            sessions: watch::Sender::new(0),
            kick: watch::Sender::new(None),
            notice: watch::Sender::new(None),
            who: Default::default(),
            next_session: Default::default(),
        })
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
        self.sessions.send_modify(|n| *n += 1);
        SessionGuard(self.clone(), key)
    }

    pub fn active_sessions(&self) -> usize {
        *self.sessions.borrow()
    }

    /// Who is connected, oldest first.
    pub fn sessions(&self) -> Vec<SessionInfo> {
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

/// One open user connection to a job; the count drops with it.
#[derive(Debug)]
pub struct SessionGuard(Arc<Live>, u64);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.who().remove(&self.1);
        self.0.sessions.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("registry store: {0}")]
    Db(String),
    #[error("the gateway holds its maximum of {0} jobs")]
    Full(usize),
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
}

pub struct Registry {
    db: Arc<redb::Database>,
    jobs: RwLock<HashMap<JobId, Entry>>,
    ended: RwLock<HashMap<JobId, (String, u64)>>,
    max_jobs: usize,
}

impl Registry {
    /// Opens (or creates) the store at `path` and loads every registration.
    pub fn open(path: &Path, max_jobs: usize) -> Result<Registry, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(db_err)?;
        }
        let db = redb::Database::create(path).map_err(db_err)?;
        {
            let txn = db.begin_write().map_err(db_err)?;
            txn.open_table(JOBS).map_err(db_err)?;
            txn.commit().map_err(db_err)?;
        }
        let mut jobs = HashMap::new();
        {
            let txn = db.begin_read().map_err(db_err)?;
            let table = txn.open_table(JOBS).map_err(db_err)?;
            for row in table.iter().map_err(db_err)? {
                let (_, value) = row.map_err(db_err)?;
                match serde_json::from_slice::<Registration>(value.value()) {
                    Ok(reg) => {
                        jobs.insert(
                            reg.job_id,
                            Entry {
                                registration: Arc::new(reg),
                                live: Live::new(),
                            },
                        );
                    }
                    Err(e) => tracing::error!("skipping an unreadable stored registration: {e}"),
                }
            }
        }
        Ok(Registry {
            db: Arc::new(db),
            jobs: RwLock::new(jobs),
            ended: RwLock::new(HashMap::new()),
            max_jobs,
        })
    }

    pub fn lookup(&self, job: JobId) -> Lookup {
        if let Some(entry) = self.read_jobs().get(&job) {
            return Lookup::Active(entry.registration.clone(), entry.live.clone());
        }
        match self
            .ended
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&job)
        {
            Some((reason, _)) => Lookup::Ended(reason.clone()),
            None => Lookup::Unknown,
        }
    }

    pub fn len(&self) -> usize {
        self.read_jobs().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read_jobs(&self) -> std::sync::RwLockReadGuard<'_, HashMap<JobId, Entry>> {
        // A poisoned lock means a panic elsewhere mid-update of a plain map;
        // the map itself is still consistent, so keep serving.
        self.jobs.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_jobs(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<JobId, Entry>> {
        self.jobs.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers or refreshes; persists durably before it returns. A refresh
    /// keeps the job's live state (its sessions stay open).
    pub async fn put(&self, registration: Registration) -> Result<Arc<Registration>, StoreError> {
        let job = registration.job_id;
        {
            let jobs = self.read_jobs();
            if !jobs.contains_key(&job) && jobs.len() >= self.max_jobs {
                return Err(StoreError::Full(self.max_jobs));
            }
        }
        let bytes = serde_json::to_vec(&registration).map_err(db_err)?;
        self.persist(job, Some(bytes)).await?;
        let registration = Arc::new(registration);
        let mut jobs = self.write_jobs();
        let live = jobs
            .get(&job)
            .map(|e| e.live.clone())
            .unwrap_or_else(Live::new);
        jobs.insert(
            job,
            Entry {
                registration: registration.clone(),
                live,
            },
        );
        drop(jobs);
        self.ended
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&job);
        Ok(registration)
    }

    /// Marks the job finished (the hold starts); returns the record and
    /// whether this call was the one that finished it.
    pub async fn mark_finished(
        &self,
        job: JobId,
    ) -> Result<Option<(Arc<Registration>, bool)>, StoreError> {
        let Lookup::Active(reg, _) = self.lookup(job) else {
            return Ok(None);
        };
        if reg.finished_at.is_some() {
            return Ok(Some((reg, false)));
        }
        let mut updated = (*reg).clone();
        updated.finished_at = Some(unix_now());
        self.put(updated).await.map(|r| Some((r, true)))
    }

    /// Removes the job, kicks its sessions with `reason`, and remembers that it
    /// ended. Returns whether it was registered.
    pub async fn remove(&self, job: JobId, reason: String) -> Result<bool, StoreError> {
        self.persist(job, None).await?;
        let entry = self.write_jobs().remove(&job);
        let mut ended = self.ended.write().unwrap_or_else(|e| e.into_inner());
        if ended.len() >= MAX_TOMBSTONES {
            if let Some(oldest) = ended.iter().min_by_key(|(_, (_, at))| *at).map(|(k, _)| *k) {
                ended.remove(&oldest);
            }
        }
        ended.insert(job, (reason.clone(), unix_now()));
        drop(ended);
        match entry {
            Some(entry) => {
                entry.live.kick(reason);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Jobs whose runner stopped refreshing before `cutoff` (unix seconds).
    pub fn stale_jobs(&self, cutoff: u64) -> Vec<JobId> {
        self.read_jobs()
            .values()
            .filter(|e| e.registration.refreshed_at < cutoff)
            .map(|e| e.registration.job_id)
            .collect()
    }

    /// Jobs whose steps are done (their hold has started).
    pub fn finished_jobs(&self) -> Vec<JobId> {
        self.read_jobs()
            .values()
            .filter(|e| e.registration.finished_at.is_some())
            .map(|e| e.registration.job_id)
            .collect()
    }

    async fn persist(&self, job: JobId, value: Option<Vec<u8>>) -> Result<(), StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let txn = db.begin_write().map_err(db_err)?;
            {
                let mut table = txn.open_table(JOBS).map_err(db_err)?;
                match &value {
                    Some(bytes) => {
                        table.insert(job.get(), bytes.as_slice()).map_err(db_err)?;
                    }
                    None => {
                        table.remove(job.get()).map_err(db_err)?;
                    }
                }
            }
            txn.commit().map_err(db_err)
        })
        .await
        .map_err(db_err)?
    }
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
            refreshed_at: 1,
            finished_at: None,
        }
    }

    fn temp_db() -> std::path::PathBuf {
        std::env::temp_dir()
            .join(format!("cigw-reg-{}", rand::random::<u64>()))
            .join("registry.redb")
    }

    #[tokio::test]
    async fn registrations_survive_reopening() {
        let path = temp_db();
        {
            let reg = Registry::open(&path, 10).expect("open");
            reg.put(registration(7, "octocat", &["hubot"]))
                .await
                .expect("put");
        }
        let reg = Registry::open(&path, 10).expect("reopen");
        match reg.lookup(JobId::from_u64(7).expect("id")) {
            Lookup::Active(r, _) => assert_eq!(r.allowed_users[0].as_str(), "hubot"),
            other => panic!("expected the job back, got {other:?}"),
        }
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    #[tokio::test]
    async fn removal_kicks_sessions_and_leaves_a_tombstone() {
        let path = temp_db();
        let reg = Registry::open(&path, 10).expect("open");
        let id = JobId::from_u64(8).expect("id");
        reg.put(registration(8, "octocat", &[])).await.expect("put");
        let Lookup::Active(_, live) = reg.lookup(id) else {
            panic!("registered")
        };
        let guard = live.enter(SessionInfo {
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
        assert!(matches!(reopened.lookup(id), Lookup::Unknown));
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    #[tokio::test]
    async fn the_job_limit_refuses_new_jobs_but_not_refreshes() {
        let path = temp_db();
        let reg = Registry::open(&path, 1).expect("open");
        reg.put(registration(1, "a", &[])).await.expect("first");
        assert!(matches!(
            reg.put(registration(2, "a", &[])).await,
            Err(StoreError::Full(1))
        ));
        reg.put(registration(1, "b", &[])).await.expect("refresh");
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }
}
