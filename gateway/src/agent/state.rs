//! The agent's state file: where it lives (a private directory), and how it
//! is read and written (owner-only, through a fresh temporary file).

use super::*;

/// What `register` leaves for `wait`, `deregister` and the refresher. Holds
/// the job token, so it is written owner-only.
#[derive(Serialize, Deserialize)]
pub(super) struct StateFile {
    pub(super) gateway: String,
    pub(super) job_id: String,
    pub(super) authorized_keys: PathBuf,
    pub(super) registration: RegisterRequest,
    pub(super) refresh_seconds: u64,
    pub(super) finished: bool,
    /// The job's own token from the creating `PUT`.
    #[serde(default)]
    pub(super) job_token: Option<String>,
    /// A `--tunnel` registration's tunnel.
    #[serde(default)]
    pub(super) tunnel: Option<TunnelState>,
}

/// Where the private state directory goes: `--state-dir`, `RUNNER_TEMP`, or
/// the system's temporary directory (possibly shared with other users).
pub(super) fn state_base(common: &Common) -> PathBuf {
    common
        .state_dir
        .clone()
        .or_else(|| env("RUNNER_TEMP").map(PathBuf::from))
        .unwrap_or_else(std::env::temp_dir)
}

/// The job's state file, inside `<base>/ci-gateway-state`: a directory of
/// this user's alone (0700), made if missing and checked like sshd's
/// StrictModes (a real directory, not a symlink, owned by us, closed to
/// others), because the file holds the job token.
pub(super) fn state_path(common: &Common, job: &str) -> Result<PathBuf, Failure> {
    let dir = state_base(common).join("ci-gateway-state");
    private_dir(&dir)?;
    Ok(dir.join(format!("ci-gateway-job-{job}.json")))
}

pub(super) fn private_dir(dir: &Path) -> Result<(), Failure> {
    let shown = dir.display();
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| Failure(format!("{}: {e}", parent.display())))?;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Failure(format!("{shown}: {e}"))),
        }
        let meta = std::fs::symlink_metadata(dir).map_err(|e| Failure(format!("{shown}: {e}")))?;
        if !meta.file_type().is_dir() {
            return Err(Failure(format!(
                "{shown} is not a directory (a symlink?); refusing to keep the job token there"
            )));
        }
        // /proc/self belongs to the effective user (Linux); elsewhere the
        // mode check below still holds.
        if let Ok(me) = std::fs::metadata("/proc/self").map(|m| m.uid()) {
            if meta.uid() != me {
                return Err(Failure(format!(
                    "{shown} belongs to another user; refusing to keep the job token there"
                )));
            }
        }
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(Failure(format!(
                "{shown} is open to other users (mode {:o}); it must be 0700",
                meta.permissions().mode() & 0o777
            )));
        }
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir).map_err(|e| Failure(format!("{shown}: {e}")))?;
    Ok(())
}

/// The state, if `path` is a regular file (no symlink) of at most 1 MiB.
pub(super) fn read_state(path: &Path) -> Option<StateFile> {
    use std::io::Read;
    const MAX: u64 = 1 << 20;
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.file_type().is_file() || meta.len() > MAX {
        return None;
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX)
        .read_to_end(&mut bytes)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Writes the state owner-only: a fresh temporary file (created new, so a
/// symlink planted at its name is not followed), then renamed into place.
pub(super) fn write_state(path: &Path, state: &StateFile) -> Result<(), Failure> {
    let bytes = serde_json::to_vec_pretty(state)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let written = options.open(&tmp).and_then(|mut f| {
        use std::io::Write;
        f.write_all(&bytes)?;
        f.sync_all()
    });
    written.map_err(|e| Failure(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| Failure(format!("{}: {e}", path.display())))?;
    Ok(())
}
