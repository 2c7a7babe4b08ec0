//! The PostgreSQL registry's replica side: transitions as transactions,
//! this replica's copy kept current from `LISTEN`, its sessions published
//! for the others, its heartbeat, and the hold leases.
//!
//! Freshness rules: a record only ever replaces an older version of
//! itself, and an ending is final, so a reload that read the database a
//! moment before a transition of this replica applied cannot undo it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::keys::PrivateKey;

use super::{
    apply, oldest_tombstone, read, unix_now, write, Change, Entry, Inner, Live, Room, SessionInfo,
    Shared, State, StoreError, Tombstone, MAX_TOMBSTONES, TOMBSTONE_AGE,
};
use crate::ids::JobId;
use crate::pg::{self, Note};
use crate::registry::Registration;

fn db(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// A connection that failed this recently is not tried again: requests fail
/// at once instead of each waiting out a connect timeout.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// A job as a row holds it, parsed.
struct Parts {
    registration: Registration,
    runner_key: Option<Arc<PrivateKey>>,
}

impl Shared {
    async fn connect(&self) -> Result<tokio_postgres::Client, StoreError> {
        self.connector.connect(None).await.map_err(db)
    }

    /// The transaction connection, made again when it broke.
    pub(super) async fn writer(
        &self,
    ) -> Result<tokio::sync::MutexGuard<'_, Option<tokio_postgres::Client>>, StoreError> {
        let mut slot = self.writer.lock().await;
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            *slot = None;
            self.recently_down()?;
            match self.connect().await {
                Ok(c) => *slot = Some(c),
                Err(e) => {
                    self.went_down();
                    return Err(e);
                }
            }
        }
        Ok(slot)
    }

    /// The shared read connection, made again when it broke.
    async fn reader(&self) -> Result<Arc<tokio_postgres::Client>, StoreError> {
        let mut slot = self.reader.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        self.recently_down()?;
        match self.connect().await {
            Ok(c) => {
                let c = Arc::new(c);
                *slot = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                self.went_down();
                Err(e)
            }
        }
    }

    fn recently_down(&self) -> Result<(), StoreError> {
        let down = *self.down.lock().unwrap_or_else(|e| e.into_inner());
        match down {
            Some(at) if at.elapsed() < RETRY_AFTER => Err(StoreError::Db(format!(
                "PostgreSQL at {} is unreachable (retrying)",
                self.connector.place()
            ))),
            _ => Ok(()),
        }
    }

    fn went_down(&self) {
        *self.down.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    fn timeout_secs(&self) -> f64 {
        self.timeout.as_secs_f64()
    }

    /// Says this replica is alive, and forgets what dead replicas left.
    pub(super) async fn beat(&self) -> Result<(), StoreError> {
        let c = self.reader().await?;
        let address = self
            .address
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        c.execute(
            "INSERT INTO replicas (id, name, started, heartbeat, ssh_address)
             VALUES ($1, $2, $3, now(), $4)
             ON CONFLICT (id) DO UPDATE SET heartbeat = now(), ssh_address = excluded.ssh_address",
            &[&self.replica, &self.name, &pg::key(self.started), &address],
        )
        .await
        .map_err(db)?;
        let cutoff = pg::key(unix_now().saturating_sub(TOMBSTONE_AGE.as_secs()));
        c.batch_execute(
            "DELETE FROM replicas WHERE heartbeat < now() - interval '1 hour';
             DELETE FROM sessions s WHERE NOT EXISTS
                 (SELECT 1 FROM replicas r WHERE r.id = s.replica);
             DELETE FROM tunnels t WHERE NOT EXISTS
                 (SELECT 1 FROM replicas r WHERE r.id = t.replica);",
        )
        .await
        .map_err(db)?;
        c.execute("DELETE FROM ended WHERE at < $1", &[&cutoff])
            .await
            .map_err(db)?;
        Ok(())
    }

    /// Checks that this replica presents the keys the others do: the first
    /// replica records its public keys, every later one must match (the
    /// keys themselves are operator files, never in the database).
    pub async fn agree_keys(&self, ours: &[(String, String)]) -> Result<(), StoreError> {
        let c = self.reader().await?;
        for (name, public) in ours {
            c.execute(
                "INSERT INTO gateway_keys (name, public) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                &[name, public],
            )
            .await
            .map_err(db)?;
            let theirs: String = c
                .query_one("SELECT public FROM gateway_keys WHERE name = $1", &[name])
                .await
                .map_err(db)?
                .get(0);
            if theirs
                .split_whitespace()
                .take(2)
                .ne(public.split_whitespace().take(2))
            {
                return Err(StoreError::Conflict(format!(
                    "this replica's {name} key differs from the one the other replicas present \
                     ({}): give every replica the same key files (docs/operations.md)",
                    theirs
                        .split_whitespace()
                        .take(2)
                        .collect::<Vec<_>>()
                        .join(" ")
                )));
            }
        }
        Ok(())
    }

    /// Where the other replicas reach this one (unless configured): the
    /// SSH listener's address as bound.
    pub fn set_address(&self, bound: std::net::SocketAddr) {
        let mut address = self.address.lock().unwrap_or_else(|e| e.into_inner());
        if address.is_empty() {
            *address = bound.to_string();
        }
    }

    /// The address of the live replica, other than this one, that holds
    /// `job`'s tunnel.
    pub async fn tunnel_holder(&self, job: JobId) -> Result<Option<String>, StoreError> {
        let c = self.reader().await?;
        let row = c
            .query_opt(
                "SELECT r.ssh_address FROM tunnels t JOIN replicas r ON r.id = t.replica
                 WHERE t.job = $1 AND t.replica <> $2 AND r.ssh_address <> ''
                   AND r.heartbeat > now() - make_interval(secs => $3)",
                &[&pg::key(job.get()), &self.replica, &self.timeout_secs()],
            )
            .await
            .map_err(db)?;
        Ok(row.map(|r| r.get(0)))
    }

    pub(super) async fn acquire_hold(&self, job: JobId) -> Result<bool, StoreError> {
        let c = self.reader().await?;
        let row = c
            .query_opt(
                "INSERT INTO hold_owners (job, replica)
                     SELECT $1, $2 WHERE EXISTS (SELECT 1 FROM jobs WHERE id = $1)
                 ON CONFLICT (job) DO UPDATE SET replica = excluded.replica
                 WHERE hold_owners.replica = excluded.replica
                    OR NOT EXISTS (SELECT 1 FROM replicas r WHERE r.id = hold_owners.replica
                                   AND r.heartbeat > now() - make_interval(secs => $3))
                 RETURNING replica",
                &[&pg::key(job.get()), &self.replica, &self.timeout_secs()],
            )
            .await
            .map_err(db)?;
        Ok(row.is_some())
    }

    pub(super) async fn owns_hold(&self, job: JobId) -> Result<bool, StoreError> {
        let c = self.reader().await?;
        let row = c
            .query_opt(
                "SELECT replica FROM hold_owners WHERE job = $1",
                &[&pg::key(job.get())],
            )
            .await
            .map_err(db)?;
        Ok(row.is_some_and(|r| r.get::<_, String>(0) == self.replica))
    }

    pub(super) async fn orphaned_holds(&self) -> Result<Vec<JobId>, StoreError> {
        let c = self.reader().await?;
        let rows = c
            .query(
                "SELECT j.id FROM jobs j
                 WHERE j.record->>'finished_at' IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM hold_owners h JOIN replicas r ON r.id = h.replica
                                   WHERE h.job = j.id
                                     AND r.heartbeat > now() - make_interval(secs => $1))",
                &[&self.timeout_secs()],
            )
            .await
            .map_err(db)?;
        Ok(rows
            .iter()
            .filter_map(|r| u64::try_from(r.get::<_, i64>(0)).ok())
            .filter_map(JobId::from_u64)
            .collect())
    }

    pub(super) async fn leave(&self) -> Result<(), StoreError> {
        let c = self.reader().await?;
        let jobs = c
            .query(
                "DELETE FROM sessions WHERE replica = $1 RETURNING job",
                &[&self.replica],
            )
            .await
            .map_err(db)?;
        c.execute(
            "DELETE FROM hold_owners WHERE replica = $1",
            &[&self.replica],
        )
        .await
        .map_err(db)?;
        c.execute("DELETE FROM tunnels WHERE replica = $1", &[&self.replica])
            .await
            .map_err(db)?;
        c.execute("DELETE FROM replicas WHERE id = $1", &[&self.replica])
            .await
            .map_err(db)?;
        for row in jobs {
            let job: i64 = row.get(0);
            notify_sessions(&c, job).await?;
        }
        Ok(())
    }

    /// The row's record and key, parsed and opened.
    fn parts(&self, row: pg::JobRow) -> Result<Parts, StoreError> {
        let registration: Registration = serde_json::from_value(row.record)
            .map_err(|e| StoreError::Db(format!("job {}: unreadable record: {e}", row.id)))?;
        let runner_key = match row.runner_key {
            None => None,
            Some(sealed) => {
                let key = self
                    .sealer
                    .open(row.id, &sealed)
                    .and_then(|plain| String::from_utf8(plain).ok())
                    .and_then(|text| PrivateKey::from_openssh(text).ok());
                if key.is_none() {
                    tracing::error!(
                        job = row.id,
                        "its runner key does not open with this replica's CA key: give every \
                         replica the same ca_ed25519_key"
                    );
                }
                key.map(Arc::new)
            }
        };
        Ok(Parts {
            registration,
            runner_key,
        })
    }
}

impl Shared {
    /// `SELECT 1` on the read connection, within 3 s.
    pub(super) async fn check(&self) -> Result<String, StoreError> {
        let probe = async {
            self.reader()
                .await?
                .query_one("SELECT 1", &[])
                .await
                .map_err(db)
        };
        match tokio::time::timeout(Duration::from_secs(3), probe).await {
            Ok(Ok(_)) => Ok(format!("PostgreSQL: answers (replica {})", self.name)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(StoreError::Db(format!(
                "PostgreSQL at {} did not answer within 3s",
                self.connector.place()
            ))),
        }
    }

    /// Asks every replica to close session `id` (the one holding it does).
    pub(super) async fn ask_kick(&self, id: &str, reason: &str) -> Result<(), StoreError> {
        // NOTIFY payloads are under 8000 bytes; the reason is bounded well below.
        let payload = serde_json::json!({ "session": id, "reason": reason }).to_string();
        self.reader()
            .await?
            .execute("SELECT pg_notify('cigw_kick', $1)", &[&payload])
            .await
            .map_err(db)?;
        Ok(())
    }
}

async fn notify_sessions(c: &tokio_postgres::Client, job: i64) -> Result<(), StoreError> {
    c.execute("SELECT pg_notify('cigw_sessions', $1)", &[&job.to_string()])
        .await
        .map_err(db)?;
    Ok(())
}

/// Brings one job's memory copy to what the database says. A record
/// replaces only an older version; an ending is final.
fn settle(
    state: &mut State,
    shared: &Shared,
    job: JobId,
    parts: Option<Parts>,
    ended: Option<Tombstone>,
) {
    if let Some(tombstone) = ended {
        if let Some(entry) = state.jobs.remove(&job) {
            entry.live.kick(tombstone.reason.clone());
        }
        if !state.ended.contains_key(&job) {
            if let Some(old) = oldest_tombstone(state) {
                state.ended.remove(&old);
            }
            state.ended.insert(job, tombstone);
        }
        return;
    }
    match parts {
        Some(parts) => {
            if state.ended.contains_key(&job) {
                return;
            }
            match state.jobs.get_mut(&job) {
                Some(entry) => {
                    if entry.registration.version < parts.registration.version {
                        entry.registration = Arc::new(parts.registration);
                    }
                    if entry.runner_key.is_none() {
                        entry.runner_key = parts.runner_key;
                    }
                }
                None => {
                    state.jobs.insert(
                        job,
                        Entry {
                            registration: Arc::new(parts.registration),
                            live: Live::published(Some((job.get(), shared.dirty.clone()))),
                            runner_key: parts.runner_key,
                        },
                    );
                }
            }
        }
        None => {
            // Neither registered nor ended: removed from the database by hand.
            if let Some(entry) = state.jobs.remove(&job) {
                entry
                    .live
                    .kick(format!("job {job} is no longer registered"));
            }
        }
    }
}

fn tombstone(row: pg::EndedRow) -> Tombstone {
    Tombstone {
        reason: row.reason,
        at: row.at,
    }
}

impl Inner {
    /// Re-reads one job; returns the version its row has (none: no row).
    async fn settle_from(
        &self,
        shared: &Shared,
        job: JobId,
        facts: (Option<pg::JobRow>, Option<pg::EndedRow>),
    ) -> Result<Option<i64>, StoreError> {
        let (row, ended) = facts;
        let version = row.as_ref().map(|r| r.version);
        let parts = row.map(|r| shared.parts(r)).transpose()?;
        settle(
            &mut write(&self.state),
            shared,
            job,
            parts,
            ended.map(tombstone),
        );
        Ok(version)
    }

    pub(super) async fn reload_job(&self, shared: &Shared, job: JobId) -> Result<(), StoreError> {
        let c = shared.reader().await?;
        let facts = pg::job_facts(&*c, job.get()).await?;
        self.settle_from(shared, job, facts).await.map(|_| ())
    }

    /// Re-reads everything (at start and after a reconnect, when
    /// notifications may have been missed).
    pub(super) async fn reload_all(&self, shared: &Shared) -> Result<(), StoreError> {
        let c = shared.reader().await?;
        let since = unix_now().saturating_sub(TOMBSTONE_AGE.as_secs());
        let (jobs, mut ended) = pg::everything(&*c, since).await?;
        let mut parsed = Vec::with_capacity(jobs.len());
        for row in jobs {
            let id = row.id;
            match (JobId::from_u64(id), shared.parts(row)) {
                (Some(job), Ok(parts)) => parsed.push((job, parts)),
                (_, Err(e)) => tracing::error!("{e}"),
                (None, _) => {}
            }
        }
        ended.sort_by_key(|e| std::cmp::Reverse(e.at));
        ended.truncate(MAX_TOMBSTONES);
        let mut state = write(&self.state);
        for row in ended {
            if let Some(job) = JobId::from_u64(row.id) {
                settle(&mut state, shared, job, None, Some(tombstone(row)));
            }
        }
        let present: HashSet<JobId> = parsed.iter().map(|(j, _)| *j).collect();
        for (job, parts) in parsed {
            settle(&mut state, shared, job, Some(parts), None);
        }
        let gone: Vec<JobId> = state
            .jobs
            .keys()
            .filter(|j| !present.contains(j))
            .copied()
            .collect();
        for job in gone {
            settle(&mut state, shared, job, None, None);
        }
        Ok(())
    }

    /// Sessions on the other live replicas: of `job`, or of every job.
    async fn reload_remote(&self, shared: &Shared, job: Option<JobId>) -> Result<(), StoreError> {
        let c = shared.reader().await?;
        let filter = job.map(|j| pg::key(j.get())).unwrap_or(0);
        let rows = c
            .query(
                "SELECT s.job, s.who FROM sessions s JOIN replicas r ON r.id = s.replica
                 WHERE s.replica <> $1 AND r.heartbeat > now() - make_interval(secs => $2)
                   AND ($3::bigint = 0 OR s.job = $3::bigint)",
                &[&shared.replica, &shared.timeout_secs(), &filter],
            )
            .await
            .map_err(db)?;
        let mut by_job: HashMap<u64, Vec<SessionInfo>> = HashMap::new();
        for row in rows {
            let id = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
            let who: serde_json::Value = row.get(1);
            by_job.entry(id).or_default().extend(sessions_from(&who));
        }
        let state = read(&self.state);
        match job {
            Some(job) => {
                if let Some(entry) = state.jobs.get(&job) {
                    entry
                        .live
                        .set_remote(by_job.remove(&job.get()).unwrap_or_default());
                }
            }
            None => {
                for (id, entry) in &state.jobs {
                    entry
                        .live
                        .set_remote(by_job.remove(&id.get()).unwrap_or_default());
                }
            }
        }
        Ok(())
    }

    /// Writes this replica's sessions of the jobs that changed.
    async fn publish(&self, shared: &Shared) -> Result<(), StoreError> {
        let jobs = shared.dirty.take();
        if jobs.is_empty() {
            return Ok(());
        }
        let result = self.publish_these(shared, &jobs).await;
        if result.is_err() {
            for job in jobs {
                shared.dirty.mark(job);
            }
        }
        result
    }

    async fn publish_these(&self, shared: &Shared, jobs: &HashSet<u64>) -> Result<(), StoreError> {
        let c = shared.reader().await?;
        for &job in jobs {
            let (who, tunnel) = JobId::from_u64(job)
                .and_then(|j| {
                    read(&self.state).jobs.get(&j).map(|e| {
                        let local = e.live.tunnel().is_some_and(|l| l.is_local());
                        (e.live.local_sessions(), local)
                    })
                })
                .unwrap_or_default();
            let id = pg::key(job);
            if tunnel {
                c.execute(
                    "INSERT INTO tunnels (job, replica) VALUES ($1, $2)
                     ON CONFLICT (job) DO UPDATE SET replica = excluded.replica",
                    &[&id, &shared.replica],
                )
                .await
                .map_err(db)?;
            } else {
                c.execute(
                    "DELETE FROM tunnels WHERE job = $1 AND replica = $2",
                    &[&id, &shared.replica],
                )
                .await
                .map_err(db)?;
            }
            if who.is_empty() {
                c.execute(
                    "DELETE FROM sessions WHERE replica = $1 AND job = $2",
                    &[&shared.replica, &id],
                )
                .await
                .map_err(db)?;
            } else {
                let who = serde_json::to_value(&who).map_err(db)?;
                c.execute(
                    "INSERT INTO sessions (replica, job, who) VALUES ($1, $2, $3)
                     ON CONFLICT (replica, job) DO UPDATE SET who = excluded.who",
                    &[&shared.replica, &id, &who],
                )
                .await
                .map_err(db)?;
            }
            notify_sessions(&c, id).await?;
        }
        Ok(())
    }
}

/// Sessions as another replica published them (unknown modes read as job).
fn sessions_from(who: &serde_json::Value) -> Vec<SessionInfo> {
    who.as_array()
        .into_iter()
        .flatten()
        .take(10_000)
        .filter_map(|s| {
            Some(SessionInfo {
                id: s
                    .get("id")
                    .and_then(|v| v.as_str())
                    .filter(|id| super::directory::is_session_id(id))
                    .unwrap_or_default()
                    .to_string(),
                login: s.get("login")?.as_str()?.to_string(),
                mode: match s.get("mode")?.as_str()? {
                    "jump" => "jump",
                    _ => "job",
                },
                since: s.get("since")?.as_u64()?,
            })
        })
        .collect()
}

/// One transition as one transaction under the job's advisory lock: re-read
/// the job, decide, write (conditionally on the version read), notify,
/// commit, then apply to memory.
pub(super) async fn transact<T>(
    inner: &Inner,
    shared: &Shared,
    client: &mut tokio_postgres::Client,
    job: JobId,
    counts: bool,
    decide: impl FnOnce(&State, Room) -> Result<(Option<Change>, T), StoreError>,
) -> Result<T, StoreError> {
    let id = pg::key(job.get());
    let tx = client.transaction().await.map_err(db)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&id])
        .await
        .map_err(db)?;
    let facts = pg::job_facts(&tx, job.get()).await?;
    let before = inner.settle_from(shared, job, facts).await?;
    let len = if counts {
        let n: i64 = tx
            .query_one("SELECT count(*) FROM jobs", &[])
            .await
            .map_err(db)?
            .get(0);
        usize::try_from(n).unwrap_or(usize::MAX)
    } else {
        0
    };
    let room = Room {
        max: inner.max_jobs,
        len,
    };
    let (change, out) = decide(&read(&inner.state), room)?;
    let Some(change) = change else {
        return Ok(out);
    };
    match &change {
        Change::Put {
            registration,
            new_key,
        } => {
            let record = serde_json::to_value(&**registration).map_err(db)?;
            let version = i64::try_from(registration.version).unwrap_or(i64::MAX);
            match before {
                None => {
                    let sealed = new_key
                        .as_ref()
                        .map(|(text, _)| shared.sealer.seal(job.get(), text.expose().as_bytes()));
                    let n = tx
                        .execute(
                            "INSERT INTO jobs (id, version, record, runner_key)
                             VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
                            &[&id, &version, &record, &sealed],
                        )
                        .await
                        .map_err(db)?;
                    if n == 0 {
                        return Err(StoreError::Exists(job));
                    }
                }
                Some(previous) => {
                    let n = tx
                        .execute(
                            "UPDATE jobs SET version = $2, record = $3 WHERE id = $1 AND version = $4",
                            &[&id, &version, &record, &previous],
                        )
                        .await
                        .map_err(db)?;
                    if n == 0 {
                        return Err(StoreError::Conflict(format!(
                            "job {job} changed while this update was made; try again"
                        )));
                    }
                }
            }
        }
        Change::End { tombstone, .. } => {
            tx.execute("DELETE FROM jobs WHERE id = $1", &[&id])
                .await
                .map_err(db)?;
            tx.execute(
                "INSERT INTO ended (id, reason, at) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
                &[&id, &tombstone.reason, &pg::key(tombstone.at)],
            )
            .await
            .map_err(db)?;
            tx.execute("DELETE FROM hold_owners WHERE job = $1", &[&id])
                .await
                .map_err(db)?;
        }
    }
    tx.execute("SELECT pg_notify('cigw_jobs', $1)", &[&job.to_string()])
        .await
        .map_err(db)?;
    tx.commit().await.map_err(db)?;
    let mut state = write(&inner.state);
    let evict = match &change {
        Change::End { .. } => oldest_tombstone(&state),
        Change::Put { .. } => None,
    };
    apply(&mut state, change, evict, Some(&shared.dirty));
    Ok(out)
}

/// Keeps this replica current until the gateway stops: on each connection,
/// `LISTEN`, reload everything, rewrite this replica's sessions, then
/// follow notifications, beat, and publish session changes. Reconnects with
/// backoff (and jitter) after any failure; sessions keep running meanwhile.
pub(super) async fn run(inner: Arc<Inner>, shared: Arc<Shared>) {
    let floor = Duration::from_millis(200);
    let mut backoff = floor;
    loop {
        let began = Instant::now();
        if let Err(e) = follow(&inner, &shared).await {
            tracing::warn!(
                "PostgreSQL at {}: {e}; reconnecting in {backoff:?}",
                shared.connector.place()
            );
        }
        if began.elapsed() > Duration::from_secs(30) {
            backoff = floor;
        }
        let jitter = backoff.mul_f64(rand::random::<f64>() / 2.0);
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

async fn follow(inner: &Inner, shared: &Shared) -> Result<(), StoreError> {
    let (tx, mut notes) = tokio::sync::mpsc::channel(pg::NOTE_QUEUE);
    let listener = shared.connector.connect(Some(tx)).await.map_err(db)?;
    listener
        .batch_execute("LISTEN cigw_jobs; LISTEN cigw_sessions; LISTEN cigw_kick")
        .await
        .map_err(db)?;
    inner.reload_all(shared).await?;
    shared.beat().await?;
    // What the database has of this replica's sessions may be stale (or
    // gone, if others saw it dead): write it again.
    shared
        .reader()
        .await?
        .execute(
            "DELETE FROM sessions WHERE replica = $1",
            &[&shared.replica],
        )
        .await
        .map_err(db)?;
    for (id, entry) in &read(&inner.state).jobs {
        if !entry.live.local_sessions().is_empty() || entry.live.tunnel().is_some() {
            shared.dirty.mark(id.get());
        }
    }
    inner.publish(shared).await?;
    inner.reload_remote(shared, None).await?;
    let mut beat = tokio::time::interval(shared.heartbeat);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat.tick().await;
    loop {
        tokio::select! {
            note = notes.recv() => match note {
                None => return Err(StoreError::Db("the notification connection closed".into())),
                Some(Note::Job(id)) => {
                    if let Some(job) = JobId::from_u64(id) {
                        inner.reload_job(shared, job).await?;
                    }
                }
                Some(Note::Sessions(id)) => {
                    if let Some(job) = JobId::from_u64(id) {
                        inner.reload_remote(shared, Some(job)).await?;
                    }
                }
                Some(Note::Kick(kick)) => {
                    let (id, reason) = &*kick;
                    if inner.directory.kick(id, reason) {
                        tracing::info!(session = %id, "closing a session another replica's operator ended");
                    }
                }
                Some(Note::Lost) => {
                    inner.reload_all(shared).await?;
                    inner.reload_remote(shared, None).await?;
                }
            },
            _ = beat.tick() => {
                shared.beat().await?;
                inner.reload_remote(shared, None).await?;
                inner.publish(shared).await?;
            }
            _ = shared.dirty.wait() => inner.publish(shared).await?,
        }
    }
}
