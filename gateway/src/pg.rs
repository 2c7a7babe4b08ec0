//! PostgreSQL, the registry replicas share (`[storage] backend =
//! "postgres"`, DESIGN §8, docs/operations.md): connections, TLS, the
//! versioned schema, and the rows. What the rows mean stays in
//! [`crate::registry`]; this module only moves them.
//!
//! Every replica keeps the registry in memory, as with redb, and keeps it
//! current from the database: each write is one transaction under the job's
//! advisory lock that re-reads the job first, so a decision never acts on a
//! stale copy (compare-and-set across replicas), and ends with a
//! `NOTIFY cigw_jobs` that the other replicas `LISTEN` to.

use std::collections::HashSet;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, GenericClient};

use crate::registry::StoreError;

/// The schema, one migration per version, applied in order and recorded in
/// `schema_migrations`. Never edit one that shipped: add the next.
pub const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE jobs (
         id BIGINT PRIMARY KEY,
         version BIGINT NOT NULL,
         record JSONB NOT NULL,
         runner_key BYTEA
     );
     CREATE TABLE ended (id BIGINT PRIMARY KEY, reason TEXT NOT NULL, at BIGINT NOT NULL);
     CREATE INDEX ended_at ON ended (at);
     CREATE TABLE replicas (
         id TEXT PRIMARY KEY,
         name TEXT NOT NULL,
         started BIGINT NOT NULL,
         heartbeat TIMESTAMPTZ NOT NULL
     );
     CREATE TABLE sessions (
         replica TEXT NOT NULL,
         job BIGINT NOT NULL,
         who JSONB NOT NULL,
         PRIMARY KEY (replica, job)
     );
     CREATE TABLE hold_owners (job BIGINT PRIMARY KEY, replica TEXT NOT NULL);
     CREATE TABLE gateway_keys (name TEXT PRIMARY KEY, public TEXT NOT NULL);",
    ),
    (
        2,
        // Reverse tunnels with replicas: who holds each job's tunnel, and
        // where the other replicas reach it (ssh::relay).
        "ALTER TABLE replicas ADD COLUMN ssh_address TEXT NOT NULL DEFAULT '';
         CREATE TABLE tunnels (job BIGINT PRIMARY KEY, replica TEXT NOT NULL);",
    ),
];

/// The advisory lock key migrations take (any constant apart from job ids,
/// which are positive).
const MIGRATION_LOCK: i64 = -0x6369_6777;

/// Connection attempts give up after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The database could not be reached (exit code 69 at start).
#[derive(Debug, thiserror::Error)]
#[error("cannot reach PostgreSQL at {place}: {reason}")]
pub struct Unreachable {
    pub place: String,
    pub reason: String,
}

/// Parses `storage.postgres_url` (a URL or `key=value` pairs).
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
    let config = tokio_postgres::Config::from_str(url).map_err(|e| {
        // The parser's message never echoes the password, but keep to our own words.
        format!("not a PostgreSQL connection string ({e})")
    })?;
    if config.get_hosts().is_empty() {
        return Err("names no host".into());
    }
    Ok(config)
}

/// `host:port/db` for messages: never the user or password.
pub fn place(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "?".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", config.get_dbname().unwrap_or(""))
}

fn db(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// How a replica reaches the database.
#[derive(Clone)]
pub struct Connector {
    config: tokio_postgres::Config,
    tls: Option<tls::MakeRustls>,
}

impl Connector {
    pub fn new(url: &str, ca: &Path) -> Result<Connector, String> {
        let mut config = parse_url(url)?;
        config.connect_timeout(CONNECT_TIMEOUT);
        let tls = match config.get_ssl_mode() {
            SslMode::Disable => None,
            _ => {
                let ca = (!ca.as_os_str().is_empty()).then_some(ca);
                let client = crate::agent::client::tls_client_config(ca, "storage.postgres_ca")
                    .map_err(|e| e.to_string())?;
                Some(tls::MakeRustls(Arc::new(client)))
            }
        };
        Ok(Connector { config, tls })
    }

    pub fn place(&self) -> String {
        place(&self.config)
    }

    /// One connection; its I/O runs on its own task, which ends with the
    /// client. Notifications, when `notes` is given, go there.
    pub async fn connect(
        &self,
        notes: Option<tokio::sync::mpsc::Sender<Note>>,
    ) -> Result<Client, Unreachable> {
        let unreachable = |e: tokio_postgres::Error| Unreachable {
            place: self.place(),
            reason: e.to_string(),
        };
        let connect = async {
            match &self.tls {
                Some(tls) => {
                    let (client, conn) = self.config.connect(tls.clone()).await?;
                    tokio::spawn(drive(conn, notes));
                    Ok(client)
                }
                None => {
                    let (client, conn) = self.config.connect(tokio_postgres::NoTls).await?;
                    tokio::spawn(drive(conn, notes));
                    Ok(client)
                }
            }
        };
        match tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(1), connect).await {
            Ok(r) => r.map_err(unreachable),
            Err(_) => Err(Unreachable {
                place: self.place(),
                reason: "timed out".into(),
            }),
        }
    }
}

/// What a `LISTEN` connection heard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// A job's record or ending changed.
    Job(u64),
    /// A job's sessions on another replica changed.
    Sessions(u64),
    /// An operator ended a session (its id, the reason); the replica that
    /// holds it closes it.
    Kick(Box<(String, String)>),
    /// Notifications were dropped (the queue was full): reload everything.
    Lost,
}

/// Notifications queued per replica before the rest are dropped (and a
/// full reload replaces them).
pub const NOTE_QUEUE: usize = 4096;

async fn drive<S, T>(
    mut conn: tokio_postgres::Connection<S, T>,
    notes: Option<tokio::sync::mpsc::Sender<Note>>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio_postgres::tls::TlsStream + Unpin,
{
    let Some(notes) = notes else {
        if let Err(e) = conn.await {
            tracing::debug!("PostgreSQL connection closed: {e}");
        }
        return;
    };
    let mut lost = false;
    loop {
        let message = std::future::poll_fn(|cx| conn.poll_message(cx)).await;
        let note = match message {
            Some(Ok(tokio_postgres::AsyncMessage::Notification(n)))
                if n.channel() == "cigw_kick" =>
            {
                let Some(kick) = kick_note(n.payload()) else {
                    continue;
                };
                Note::Kick(Box::new(kick))
            }
            Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                let Ok(id) = n.payload().parse::<u64>() else {
                    continue;
                };
                match n.channel() {
                    "cigw_jobs" => Note::Job(id),
                    "cigw_sessions" => Note::Sessions(id),
                    _ => continue,
                }
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                tracing::warn!("PostgreSQL notifications: {e}");
                return;
            }
            None => return,
        };
        let note = if lost { Note::Lost } else { note };
        match notes.try_send(note) {
            Ok(()) => lost = false,
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => lost = true,
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return,
        }
    }
}

/// A `cigw_kick` payload: `{"session": id, "reason": line}`.
fn kick_note(payload: &str) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(payload).ok()?;
    let id = v.get("session")?.as_str()?;
    if !crate::registry::directory::is_session_id(id) {
        return None;
    }
    let reason: String = v.get("reason")?.as_str()?.chars().take(300).collect();
    Some((id.to_string(), reason))
}

/// Applies the migrations this binary has and the database lacks, under one
/// advisory lock so replicas that start together do not race. Returns the
/// versions applied; refuses a schema newer than this binary knows.
pub async fn migrate(client: &mut Client) -> Result<(i32, Vec<i32>), StoreError> {
    let tx = client.transaction().await.map_err(db)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version INT PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await
    .map_err(db)?;
    let current: i32 = tx
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )
        .await
        .map_err(db)?
        .get(0);
    let latest = MIGRATIONS.last().map_or(0, |(v, _)| *v);
    if current > latest {
        return Err(StoreError::Db(format!(
            "the database's schema is at version {current}, newer than this binary's {latest}: \
             run the newer ci-gateway (docs/operations.md, rolling upgrades)"
        )));
    }
    let mut applied = Vec::new();
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        tx.batch_execute(sql)
            .await
            .map_err(|e| StoreError::Db(format!("migration {version}: {e}")))?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[version],
        )
        .await
        .map_err(db)?;
        applied.push(*version);
    }
    tx.commit().await.map_err(db)?;
    Ok((latest, applied))
}

/// The schema version of the database, without changing it (0: none).
pub async fn schema_version(client: &Client) -> Result<i32, StoreError> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
        .await
        .map_err(db)?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(client
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            &[],
        )
        .await
        .map_err(db)?
        .get(0))
}

/// A job's row.
pub struct JobRow {
    pub id: u64,
    pub version: i64,
    pub record: serde_json::Value,
    /// The sealed runner key (`runner_login = "key"`).
    pub runner_key: Option<Vec<u8>>,
}

/// An ended job's row.
pub struct EndedRow {
    pub id: u64,
    pub reason: String,
    pub at: u64,
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn job_row(row: &tokio_postgres::Row) -> JobRow {
    JobRow {
        id: to_u64(row.get(0)),
        version: row.get(1),
        record: row.get(2),
        runner_key: row.get(3),
    }
}

fn ended_row(row: &tokio_postgres::Row) -> EndedRow {
    EndedRow {
        id: to_u64(row.get(0)),
        reason: row.get(1),
        at: to_u64(row.get(2)),
    }
}

/// Job ids are at most `i64::MAX` (`JobId` rejects more), so this holds.
pub fn key(job: u64) -> i64 {
    i64::try_from(job).unwrap_or(i64::MAX)
}

/// One job's row and ending, as the database has them now.
pub async fn job_facts(
    c: &impl GenericClient,
    job: u64,
) -> Result<(Option<JobRow>, Option<EndedRow>), StoreError> {
    let id = key(job);
    let row = c
        .query_opt(
            "SELECT id, version, record, runner_key FROM jobs WHERE id = $1",
            &[&id],
        )
        .await
        .map_err(db)?;
    let ended = c
        .query_opt("SELECT id, reason, at FROM ended WHERE id = $1", &[&id])
        .await
        .map_err(db)?;
    Ok((row.as_ref().map(job_row), ended.as_ref().map(ended_row)))
}

/// Every job and every ending since `since` (unix seconds).
pub async fn everything(
    c: &impl GenericClient,
    since: u64,
) -> Result<(Vec<JobRow>, Vec<EndedRow>), StoreError> {
    let jobs = c
        .query("SELECT id, version, record, runner_key FROM jobs", &[])
        .await
        .map_err(db)?;
    let ended = c
        .query(
            "SELECT id, reason, at FROM ended WHERE at >= $1",
            &[&key(since)],
        )
        .await
        .map_err(db)?;
    Ok((
        jobs.iter().map(job_row).collect(),
        ended.iter().map(ended_row).collect(),
    ))
}

/// Jobs whose sessions changed, waiting to be written.
#[derive(Default)]
pub struct Dirty {
    jobs: Mutex<HashSet<u64>>,
    wake: tokio::sync::Notify,
}

impl Dirty {
    pub fn mark(&self, job: u64) {
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(job);
        self.wake.notify_one();
    }

    pub fn take(&self) -> HashSet<u64> {
        std::mem::take(&mut *self.jobs.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub async fn wait(&self) {
        self.wake.notified().await;
    }
}

/// Runner keys at rest in the database are sealed with ChaCha20-Poly1305
/// under a key derived (HKDF-SHA256) from the CA's private key, which every
/// replica has as a file and the database never sees: a copy of the
/// database alone opens no runner. The job id is the associated data, so a
/// sealed key cannot be moved to another job's row.
pub struct Sealer(ring::aead::LessSafeKey);

impl Sealer {
    pub fn new(secret: &[u8]) -> Sealer {
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"ci-gateway");
        let prk = salt.extract(secret);
        let info: &[&[u8]] = &[b"runner-key seal v1"];
        let key = match prk.expand(info, &ring::aead::CHACHA20_POLY1305) {
            Ok(okm) => ring::aead::UnboundKey::from(okm),
            // The length is the algorithm's own: expand cannot refuse it.
            Err(_) => unreachable!("HKDF output of the AEAD's key length"),
        };
        Sealer(ring::aead::LessSafeKey::new(key))
    }

    pub fn seal(&self, job: u64, plain: &[u8]) -> Vec<u8> {
        let nonce: [u8; 12] = rand::random();
        let mut out = plain.to_vec();
        let sealed = self.0.seal_in_place_append_tag(
            ring::aead::Nonce::assume_unique_for_key(nonce),
            ring::aead::Aad::from(job.to_be_bytes()),
            &mut out,
        );
        match sealed {
            Ok(()) => [nonce.as_slice(), &out].concat(),
            Err(_) => unreachable!("sealing fails only past 256 GiB"),
        }
    }

    pub fn open(&self, job: u64, sealed: &[u8]) -> Option<Vec<u8>> {
        let (nonce, body) = sealed.split_at_checked(12)?;
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, ring::aead::Aad::from(job.to_be_bytes()), &mut body)
            .ok()?;
        Some(plain.to_vec())
    }
}

/// TLS to the database with rustls (the system's roots plus
/// `storage.postgres_ca`), for any `sslmode` but `disable`. With
/// `require` or stronger the connection fails rather than fall back.
mod tls {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

    #[derive(Clone)]
    pub struct MakeRustls(pub Arc<rustls::ClientConfig>);

    pub struct Connect {
        config: Arc<rustls::ClientConfig>,
        name: rustls::pki_types::ServerName<'static>,
    }

    impl<S> MakeTlsConnect<S> for MakeRustls
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        type Stream = Stream<S>;
        type TlsConnect = Connect;
        type Error = rustls::pki_types::InvalidDnsNameError;

        fn make_tls_connect(&mut self, domain: &str) -> Result<Connect, Self::Error> {
            Ok(Connect {
                config: self.0.clone(),
                name: rustls::pki_types::ServerName::try_from(domain.to_string())?,
            })
        }
    }

    impl<S> TlsConnect<S> for Connect
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        type Stream = Stream<S>;
        type Error = std::io::Error;
        type Future = Pin<Box<dyn Future<Output = std::io::Result<Stream<S>>> + Send>>;

        fn connect(self, stream: S) -> Self::Future {
            Box::pin(async move {
                let connector = tokio_rustls::TlsConnector::from(self.config);
                Ok(Stream(connector.connect(self.name, stream).await?))
            })
        }
    }

    pub struct Stream<S>(tokio_rustls::client::TlsStream<S>);

    impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for Stream<S> {
        fn channel_binding(&self) -> ChannelBinding {
            ChannelBinding::none()
        }
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Stream<S> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Stream<S> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_key_opens_only_for_its_job_and_secret() {
        let s = Sealer::new(b"the CA key");
        let sealed = s.seal(7, b"-----BEGIN OPENSSH PRIVATE KEY-----");
        assert_eq!(
            s.open(7, &sealed).as_deref(),
            Some(&b"-----BEGIN OPENSSH PRIVATE KEY-----"[..])
        );
        assert_eq!(s.open(8, &sealed), None, "moved to another job's row");
        assert_eq!(Sealer::new(b"another CA").open(7, &sealed), None);
        let mut flipped = sealed.clone();
        flipped[20] ^= 1;
        assert_eq!(s.open(7, &flipped), None);
        assert_eq!(s.open(7, &sealed[..5]), None);
    }

    #[test]
    fn urls_are_checked_and_shown_without_credentials() {
        let c = parse_url("postgres://gw:hunter2@db.internal:6543/cigw").expect("url");
        assert_eq!(place(&c), "db.internal:6543/cigw");
        assert!(!place(&c).contains("hunter2"));
        assert!(parse_url("mysql://x").is_err());
        assert!(parse_url("dbname=x").is_err(), "no host");
    }
}
