//! `GET /v1/agent/{os}-{arch}`: the agent for runners that have none (a
//! hosted runner has no ci-gateway binary, and nothing publishes one). The
//! gateway serves its own binary for its own platform, so agent and gateway
//! always match, and any binaries the operator puts in `[agent] dir`, each
//! with its SHA-256 alongside. `…/{os}-{arch}.sha256` is that digest as a
//! `sha256sum` line. No credential is needed (the binary is no secret);
//! each source has a download budget (`agent.downloads_per_source_per_minute`).
//!
//! A binary is hashed once (again if its size or modification time change)
//! and streamed from disk, so no download holds it in memory. A file that
//! changed between its hash and a download is not served under the old
//! hash. On Linux the gateway's own binary is read through `/proc/self/exe`,
//! the file that is running even if an upgrade replaced its path.

use std::collections::HashMap;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::http::{header, HeaderValue};

use super::*;

/// The largest binary served (a release build is about 50 MB, a debug one
/// about 270 MB).
const MAX_BINARY: u64 = 1 << 30;

/// One platform's agent, hashed: where it is and what it was when hashed.
#[derive(Debug)]
pub struct Binary {
    pub path: PathBuf,
    /// Size and modification time when hashed.
    pub stamp: (u64, SystemTime),
    /// Lowercase hex.
    pub sha256: String,
    /// What the file is called when saved (`ci-gateway-linux-x86_64`, with
    /// `.exe` for Windows).
    pub file_name: String,
}

/// Why a platform's agent cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("{0:?} is not a platform; expected <os>-<arch>, e.g. linux-x86_64")]
    BadName(String),
    #[error("this gateway has no agent for {target}; it serves: {available}")]
    Unknown { target: String, available: String },
    #[error("the agent for {target} cannot be read: {source}")]
    Read {
        target: String,
        source: std::io::Error,
    },
    #[error("the agent for {0} is larger than 1 GiB")]
    TooLarge(String),
    #[error("the agent for {0} changed on disk while being served; try again")]
    Changed(String),
    #[error("the agent for {0} has no .sha256 file next to it; the operator must add one")]
    NoChecksum(String),
    #[error(
        "the agent for {0} does not match its .sha256 file; the operator must replace one of them"
    )]
    Mismatch(String),
}

/// `<os>-<arch>` of the running gateway, in the names the API uses.
pub fn own_target() -> String {
    format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH)
}

/// A platform name: lowercase letters, digits and `_`, one `-` between os
/// and arch; nothing that could name another file.
fn valid_target(target: &str) -> bool {
    let mut parts = target.split('-');
    let part_ok = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && p.len() <= 20
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
    };
    part_ok(parts.next()) && part_ok(parts.next()) && parts.next().is_none()
}

fn file_name(target: &str) -> String {
    if target.starts_with("windows-") {
        format!("ci-gateway-{target}.exe")
    } else {
        format!("ci-gateway-{target}")
    }
}

#[cfg(test)]
fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn stamp(meta: &std::fs::Metadata) -> (u64, SystemTime) {
    (
        meta.len(),
        meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
    )
}

/// Hashes the file at `path` (streamed, 1 MiB at a time).
fn hash_file(path: &FsPath, target: &str, file_name: String) -> Result<Binary, DownloadError> {
    use std::io::Read;
    let read = |source| DownloadError::Read {
        target: target.to_string(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(read)?;
    let before = stamp(&file.metadata().map_err(read)?);
    if before.0 > MAX_BINARY {
        return Err(DownloadError::TooLarge(target.to_string()));
    }
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(read)?;
        if n == 0 {
            break;
        }
        context.update(&buf[..n]);
    }
    if stamp(&file.metadata().map_err(read)?) != before {
        return Err(DownloadError::Changed(target.to_string()));
    }
    Ok(Binary {
        path: path.to_path_buf(),
        stamp: before,
        sha256: hex(context.finish().as_ref()),
        file_name,
    })
}

/// The agents this gateway serves, read on first use.
pub struct Agents {
    dir: Option<PathBuf>,
    own: tokio::sync::OnceCell<Arc<Binary>>,
    /// The operator's binaries, by target (a replaced file is hashed again).
    theirs: Mutex<HashMap<String, Arc<Binary>>>,
}

impl Agents {
    pub fn new(dir: &FsPath) -> Agents {
        Agents {
            dir: (!dir.as_os_str().is_empty()).then(|| dir.to_path_buf()),
            own: tokio::sync::OnceCell::new(),
            theirs: Mutex::new(HashMap::new()),
        }
    }

    /// The targets there are binaries for, the gateway's own first.
    pub fn available(&self) -> Vec<String> {
        let mut found = vec![own_target()];
        let Some(dir) = &self.dir else {
            return found;
        };
        let mut theirs: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|name| {
                let target = name.strip_prefix("ci-gateway-")?.strip_suffix(".sha256")?;
                let target = target.strip_suffix(".exe").unwrap_or(target);
                valid_target(target).then(|| target.to_string())
            })
            .filter(|t| *t != found[0])
            .collect();
        theirs.sort();
        theirs.dedup();
        found.extend(theirs);
        found
    }

    /// The binary for `target`.
    pub async fn get(self: &Arc<Self>, target: &str) -> Result<Arc<Binary>, DownloadError> {
        if !valid_target(target) {
            return Err(DownloadError::BadName(target.chars().take(40).collect()));
        }
        if target == own_target() {
            return self
                .own
                .get_or_try_init(|| async {
                    tokio::task::spawn_blocking(read_own)
                        .await
                        .unwrap_or_else(|e| {
                            Err(DownloadError::Read {
                                target: own_target(),
                                source: std::io::Error::other(e.to_string()),
                            })
                        })
                        .map(Arc::new)
                })
                .await
                .cloned();
        }
        let this = self.clone();
        let name = target.to_string();
        tokio::task::spawn_blocking(move || this.theirs(&name))
            .await
            .unwrap_or_else(|e| {
                Err(DownloadError::Read {
                    target: target.to_string(),
                    source: std::io::Error::other(e.to_string()),
                })
            })
    }

    fn unknown(&self, target: &str) -> DownloadError {
        DownloadError::Unknown {
            target: target.to_string(),
            available: self.available().join(", "),
        }
    }

    /// An operator's binary: read and checked against its `.sha256` when
    /// it is new or changed on disk.
    fn theirs(&self, target: &str) -> Result<Arc<Binary>, DownloadError> {
        let Some(dir) = &self.dir else {
            return Err(self.unknown(target));
        };
        let name = file_name(target);
        let path = dir.join(&name);
        let now = match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => stamp(&m),
            _ => return Err(self.unknown(target)),
        };
        if let Some(binary) = self
            .theirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(target)
        {
            if binary.stamp == now {
                return Ok(binary.clone());
            }
        }
        let sum_path = dir.join(format!("{name}.sha256"));
        let Ok(sum) = std::fs::read_to_string(&sum_path) else {
            return Err(DownloadError::NoChecksum(target.to_string()));
        };
        let want = sum
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        let binary = Arc::new(hash_file(&path, target, name)?);
        if binary.sha256 != want {
            tracing::error!(%target, path = %path.display(), "agent binary does not match its .sha256; not served");
            return Err(DownloadError::Mismatch(target.to_string()));
        }
        self.theirs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(target.to_string(), binary.clone());
        Ok(binary)
    }
}

/// The running binary (on Linux the running file itself, even if an
/// upgrade replaced its path).
fn read_own() -> Result<Binary, DownloadError> {
    let target = own_target();
    let path = if cfg!(target_os = "linux") {
        PathBuf::from("/proc/self/exe")
    } else {
        std::env::current_exe().map_err(|source| DownloadError::Read {
            target: target.clone(),
            source,
        })?
    };
    hash_file(&path, &target, file_name(&target))
}

/// `GET /v1/agent/{target}` and `GET /v1/agent/{target}.sha256`.
pub(super) async fn get_agent(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(raw): Path<String>,
) -> Response {
    if let Some(wait) = gw.agent_downloads.spend(peer.ip()) {
        return too_many(
            &gw,
            Refusal::AgentDownloads,
            wait,
            "too many agent downloads from your address",
        );
    }
    let (target, checksum) = match raw.strip_suffix(".sha256") {
        Some(t) => (t, true),
        None => (raw.as_str(), false),
    };
    let binary = match gw.agents.get(target).await {
        Ok(b) => b,
        Err(e) => {
            let status = match e {
                DownloadError::BadName(_) => StatusCode::BAD_REQUEST,
                DownloadError::Unknown { .. } => StatusCode::NOT_FOUND,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            return ApiError(status, e.to_string()).into_response();
        }
    };
    if checksum {
        return (
            [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"))],
            format!("{}  {}\n", binary.sha256, binary.file_name),
        )
            .into_response();
    }
    // Streamed from the file, checked to be the one that was hashed.
    let file = match tokio::fs::File::open(&binary.path).await {
        Ok(f) => f,
        Err(source) => {
            let e = DownloadError::Read {
                target: target.to_string(),
                source,
            };
            return ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response();
        }
    };
    match file.metadata().await {
        Ok(m) if stamp(&m) == binary.stamp => {}
        _ => {
            let e = DownloadError::Changed(target.to_string());
            return ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response();
        }
    }
    let body =
        axum::body::Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024));
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(binary.stamp.0));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{}\"", binary.file_name))
    {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&binary.sha256) {
        headers.insert("x-checksum-sha256", v);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_names_cannot_name_another_file() {
        for ok in ["linux-x86_64", "windows-aarch64", "macos-aarch64"] {
            assert!(valid_target(ok), "{ok}");
        }
        for bad in [
            "",
            "linux",
            "../etc-passwd",
            "linux-x86_64-extra",
            "Linux-x86_64",
            "linux-x86_64/..",
            "linux-",
            "-x86_64",
            "linux-x86 64",
        ] {
            assert!(!valid_target(bad), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn the_own_binary_is_the_running_file_and_theirs_must_match_its_checksum() {
        let dir = std::env::temp_dir().join(format!("cigw-agents-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("dir");
        let agents = Arc::new(Agents::new(&dir));
        let own = agents.get(&own_target()).await.expect("own binary");
        let running = std::fs::read(std::env::current_exe().expect("exe")).expect("read exe");
        assert_eq!(own.stamp.0, running.len() as u64);
        assert_eq!(own.sha256, sha256_hex(&running));

        // An operator's binary without its checksum is not served.
        std::fs::write(dir.join("ci-gateway-windows-x86_64.exe"), b"MZ fake").expect("write");
        assert!(matches!(
            agents.get("windows-x86_64").await,
            Err(DownloadError::NoChecksum(_))
        ));
        // With a wrong one, neither.
        std::fs::write(
            dir.join("ci-gateway-windows-x86_64.exe.sha256"),
            format!("{}  ci-gateway-windows-x86_64.exe\n", sha256_hex(b"other")),
        )
        .expect("write");
        assert!(matches!(
            agents.get("windows-x86_64").await,
            Err(DownloadError::Mismatch(_))
        ));
        // With the right one, it is, and it is listed.
        std::fs::write(
            dir.join("ci-gateway-windows-x86_64.exe.sha256"),
            format!(
                "{}  ci-gateway-windows-x86_64.exe\n",
                sha256_hex(b"MZ fake")
            ),
        )
        .expect("write");
        let theirs = agents.get("windows-x86_64").await.expect("served");
        assert_eq!(theirs.sha256, sha256_hex(b"MZ fake"));
        assert_eq!(theirs.file_name, "ci-gateway-windows-x86_64.exe");
        assert_eq!(agents.available(), [own_target(), "windows-x86_64".into()]);
        // A platform with no binary says what there is.
        match agents.get("freebsd-x86_64").await {
            Err(e @ DownloadError::Unknown { .. }) => {
                assert!(e.to_string().contains("windows-x86_64"), "{e}")
            }
            other => panic!("expected unknown, got {other:?}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
