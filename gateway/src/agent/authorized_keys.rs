//! Editing an `authorized_keys` file without clobbering anyone's lines.
//!
//! The lines `register` installs live in one marked block per job:
//!
//! ```text
//! # ci-gateway job 9876543210 begin (managed by `ci-gateway runner`; do not edit)
//! cert-authority,principals="runner" ssh-ed25519 AAAA... ci-gateway
//! # ci-gateway job 9876543210 end
//! ```
//!
//! Installing replaces that job's block (so running `register` twice changes
//! nothing); removing deletes only it. Everything outside the block keeps its
//! bytes, its order and its line endings (CRLF files stay CRLF), and a last
//! line without a newline gets one before the block is appended.

use std::io::Write;
use std::path::Path;

fn begin_marker(job: &str) -> String {
    format!("# ci-gateway job {job} begin (managed by `ci-gateway runner`; do not edit)")
}

fn end_marker(job: &str) -> String {
    format!("# ci-gateway job {job} end")
}

/// Splits into lines keeping each line's terminator.
fn lines(text: &str) -> Vec<&str> {
    text.split_inclusive('\n').collect()
}

fn content(line: &str) -> &str {
    line.trim_end_matches(['\n', '\r'])
}

/// `text` without the job's block (and without a begin marker whose end is
/// missing: that block runs to the end of the file, which only we write).
pub fn remove(text: &str, job: &str) -> String {
    let (begin, end) = (begin_marker(job), end_marker(job));
    let mut out = String::with_capacity(text.len());
    let mut inside = false;
    for line in lines(text) {
        let c = content(line);
        if !inside && c == begin {
            inside = true;
        } else if inside {
            if c == end {
                inside = false;
            }
        } else {
            out.push_str(line);
        }
    }
    out
}

/// Why `authorized_keys` was not changed. Each names the file or line.
#[derive(Debug, thiserror::Error)]
pub enum KeysFileError {
    /// The gateway's answer held a line that would not be one key line.
    #[error("the gateway sent an unusable authorized_keys line: {0:?}")]
    BadLine(String),
    #[error("{0} is not UTF-8 text (written as UTF-16 by PowerShell's '>'?); sshd cannot read it either")]
    NotUtf8(String),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    /// The file or its directory is not a safe place (symlink, not a
    /// file, someone else's, writable by others), as sshd's StrictModes
    /// would say.
    #[error("{path} {why}")]
    Place { path: String, why: &'static str },
}

fn place(path: &Path, why: &'static str) -> KeysFileError {
    KeysFileError::Place {
        path: path.display().to_string(),
        why,
    }
}

/// `text` with the job's block set to `keys` (replacing an earlier one).
pub fn install(text: &str, job: &str, keys: &[String]) -> Result<String, KeysFileError> {
    for key in keys {
        if key.contains(['\n', '\r']) || key.trim().is_empty() || key.starts_with('#') {
            return Err(KeysFileError::BadLine(key.chars().take(60).collect()));
        }
    }
    let mut out = remove(text, job);
    if !out.is_empty() && !out.ends_with('\n') {
        out.push_str(if text.contains("\r\n") { "\r\n" } else { "\n" });
    }
    // The block follows the file's style as it now is (a dangling CR that
    // the terminator turned into CRLF counts: found by cargo fuzz).
    let newline = if out.contains("\r\n") { "\r\n" } else { "\n" };
    out.push_str(&begin_marker(job));
    out.push_str(newline);
    for key in keys {
        out.push_str(key);
        out.push_str(newline);
    }
    out.push_str(&end_marker(job));
    out.push_str(newline);
    Ok(out)
}

/// The lines of the job's block now in `text`.
pub fn installed<'a>(text: &'a str, job: &str) -> Vec<&'a str> {
    let (begin, end) = (begin_marker(job), end_marker(job));
    let mut found = Vec::new();
    let mut inside = false;
    for line in lines(text) {
        let c = content(line);
        if !inside && c == begin {
            inside = true;
        } else if inside && c == end {
            inside = false;
        } else if inside {
            found.push(c);
        }
    }
    found
}

/// Who should own a file we create, on Unix: the runner user when the agent
/// runs as root on their behalf.
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// Applies `edit` to the file at `path` (missing = empty) and writes the
/// result back, only if it changed. Returns whether it changed.
///
/// Unix: the new content goes to a temporary file in the same directory
/// (mode 0600, owner and mode of the old file, or `owner` for a new one),
/// synced, then renamed over the old one: a crash leaves the old file or the
/// new one, never half of one. A missing `~/.ssh` is created 0700.
/// Windows: written in place, which keeps the file's ACL (sshd insists on
/// one that only Administrators and SYSTEM can write; the action sets it).
pub fn edit_file(
    path: &Path,
    owner: Option<Owner>,
    edit: impl FnOnce(&str) -> Result<String, KeysFileError>,
) -> Result<bool, KeysFileError> {
    let shown = || path.display().to_string();
    check_place(path, owner)?;
    let old = match read_capped(path) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|_| KeysFileError::NotUtf8(shown()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(KeysFileError::Read {
                path: shown(),
                source,
            })
        }
    };
    let new = edit(&old)?;
    if new == old {
        return Ok(false);
    }
    write(path, new.as_bytes(), owner).map_err(|source| KeysFileError::Write {
        path: shown(),
        source,
    })?;
    Ok(true)
}

/// The largest `authorized_keys` the agent reads (sshd's are kilobytes).
const MAX_FILE: u64 = 1 << 20;

/// Reads at most [`MAX_FILE`] bytes; a bigger file (or a device that never
/// ends) is refused, not read into memory.
fn read_capped(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_FILE + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(std::io::Error::other("larger than 1 MiB"));
    }
    Ok(bytes)
}

/// Like sshd's StrictModes, before anything is read or written: the file
/// (if it exists) and its directory are real ones, not symlinks (a link
/// would send the lines, and the rewrite, to its target), the file is a
/// regular file, and neither belongs to someone other than the runner user
/// or root, nor is writable by others.
#[cfg(unix)]
pub fn check_place(path: &Path, owner: Option<Owner>) -> Result<(), KeysFileError> {
    use std::os::unix::fs::MetadataExt;
    let allowed = |uid: u32| uid == 0 || owner.is_none_or(|o| o.uid == uid);
    let dir = path.parent().unwrap_or(Path::new("."));
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_symlink() => {
            return Err(place(
                dir,
                "is a symlink; refusing to install keys through it",
            ))
        }
        Ok(m) if !m.is_dir() => return Err(place(dir, "is not a directory")),
        Ok(m) if !allowed(m.uid()) || m.mode() & 0o022 != 0 => {
            return Err(place(
                dir,
                "belongs to another user or is writable by others; sshd's StrictModes would refuse it too",
            ))
        }
        _ => {}
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            Err(place(path, "is a symlink; refusing to write through it"))
        }
        Ok(m) if !m.is_file() => Err(place(path, "is not a regular file")),
        Ok(m) if !allowed(m.uid()) => {
            Err(place(path, "belongs to another user; refusing to edit it"))
        }
        _ => Ok(()),
    }
}

#[cfg(not(unix))]
pub fn check_place(path: &Path, _owner: Option<Owner>) -> Result<(), KeysFileError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            Err(place(path, "is a symlink; refusing to write through it"))
        }
        Ok(m) if !m.is_file() => Err(place(path, "is not a regular file")),
        _ => Ok(()),
    }
}

#[cfg(unix)]
fn write(path: &Path, bytes: &[u8], owner: Option<Owner>) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        if let Some(o) = owner {
            std::os::unix::fs::chown(dir, Some(o.uid), Some(o.gid))?;
        }
    }
    let (mode, own) = match std::fs::metadata(path) {
        // Keep the old mode, minus group/other write (sshd's StrictModes).
        Ok(m) => (m.mode() & 0o7755, Some((m.uid(), m.gid()))),
        Err(_) => (0o600, owner.map(|o| (o.uid, o.gid))),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "authorized_keys".into());
    let tmp = dir.join(format!(".{name}.ci-gateway-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        if let Some((uid, gid)) = own {
            // Only root can give a file away; as the user it is ours already.
            if let Err(e) = std::os::unix::fs::fchown(&file, Some(uid), Some(gid)) {
                if e.kind() != std::io::ErrorKind::PermissionDenied {
                    return Err(e);
                }
            }
        }
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(not(unix))]
fn write(path: &Path, bytes: &[u8], _owner: Option<Owner>) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Vec<String> {
        vec![
            "cert-authority,principals=\"runner\" ssh-ed25519 AAAAC3Nza ci-gateway".into(),
            "ssh-ed25519 AAAAC3Nzb octocat".into(),
        ]
    }

    const EXISTING: &str =
        "# my own comment\nssh-rsa AAAAB3 me@laptop\n\nssh-ed25519 AAAAC3 other\n";

    #[test]
    fn install_appends_a_block_and_keeps_everything_else() {
        let out = install(EXISTING, "42", &keys()).expect("install");
        assert!(out.starts_with(EXISTING), "{out}");
        assert_eq!(installed(&out, "42"), keys());
        assert_eq!(remove(&out, "42"), EXISTING);
    }

    #[test]
    fn install_twice_is_the_same_as_once() {
        let once = install(EXISTING, "42", &keys()).expect("install");
        let twice = install(&once, "42", &keys()).expect("again");
        assert_eq!(once, twice);
        let changed = install(&once, "42", &keys()[..1]).expect("fewer keys");
        assert_eq!(installed(&changed, "42").len(), 1);
        assert!(changed.starts_with(EXISTING));
    }

    #[test]
    fn a_last_line_without_newline_is_kept_whole() {
        let text = "ssh-rsa AAAAB3 me@laptop";
        let out = install(text, "42", &keys()).expect("install");
        assert!(out.starts_with("ssh-rsa AAAAB3 me@laptop\n# ci-gateway job 42 begin"));
        // Removing leaves the user's line (now with its newline).
        assert_eq!(remove(&out, "42"), "ssh-rsa AAAAB3 me@laptop\n");
    }

    #[test]
    fn a_dangling_carriage_return_does_not_flip_the_style_between_runs() {
        let once = install("\r", "7", &keys()).expect("install");
        assert_eq!(install(&once, "7", &keys()).expect("again"), once);
        assert_eq!(remove(&once, "7"), "\r\n");
    }

    #[test]
    fn crlf_files_stay_crlf() {
        let text = "ssh-rsa AAAAB3 me\r\n";
        let out = install(text, "7", &keys()).expect("install");
        assert!(!out.replace("\r\n", "").contains('\n'), "{out:?}");
        assert_eq!(remove(&out, "7"), text);
    }

    #[test]
    fn blocks_of_other_jobs_and_lookalike_lines_are_untouched() {
        let other = install(EXISTING, "1", &keys()).expect("job 1");
        let both = install(&other, "2", &keys()).expect("job 2");
        assert_eq!(remove(&both, "2"), other);
        assert_eq!(installed(&remove(&both, "1"), "2"), keys());
        // A user's line that mentions ci-gateway is not ours.
        let text = "ssh-ed25519 AAAA ci-gateway job 2 end\n";
        assert_eq!(remove(text, "2"), text);
    }

    #[test]
    fn removing_from_a_file_without_a_block_changes_nothing() {
        assert_eq!(remove(EXISTING, "42"), EXISTING);
        assert_eq!(remove("", "42"), "");
    }

    /// The fuzz target's property (fuzz/fuzz_targets/authorized_keys.rs) on
    /// random files built from awkward pieces, so stable CI checks it too.
    #[test]
    fn install_then_remove_gives_the_file_back_on_random_files() {
        let pieces = [
            "ssh-rsa AAAA me",
            "\n",
            "\r\n",
            "\r",
            "# comment",
            "",
            " ",
            "\t",
            "# ci-gateway job 1 begin (managed by `ci-gateway runner`; do not edit)",
            "# ci-gateway job 1 end",
            "# ci-gateway job 42 end",
            "é",
            "\u{feff}",
        ];
        for _ in 0..5000 {
            let n = rand::random_range(0..12);
            let text: String = (0..n)
                .map(|_| pieces[rand::random_range(0..pieces.len())])
                .collect();
            let once = install(&text, "42", &keys()).expect("install");
            assert_eq!(
                install(&once, "42", &keys()).expect("again"),
                once,
                "{text:?}"
            );
            assert_eq!(installed(&once, "42"), keys(), "{text:?}");
            let mut expected = text.clone();
            if !expected.is_empty() && !expected.ends_with('\n') {
                expected.push_str(if text.contains("\r\n") { "\r\n" } else { "\n" });
            }
            assert_eq!(remove(&once, "42"), expected, "{text:?}");
        }
    }

    #[test]
    fn lines_that_would_break_the_file_are_refused() {
        for bad in ["ssh-ed25519 AAAA\nssh-rsa BBBB", "", "# comment"] {
            assert!(install("", "1", &[bad.to_string()]).is_err(), "{bad:?}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn edit_file_keeps_the_mode_and_creates_missing_files_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile_dir();
        let path = dir.join(".ssh").join("authorized_keys");
        assert!(edit_file(&path, None, |t| install(t, "5", &keys())).expect("create"));
        let meta = std::fs::metadata(&path).expect("exists");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let ssh_dir = std::fs::metadata(path.parent().expect("dir")).expect("dir");
        assert_eq!(ssh_dir.permissions().mode() & 0o777, 0o700);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert!(!edit_file(&path, None, |t| install(t, "5", &keys())).expect("same"));
        assert!(edit_file(&path, None, |t| Ok(remove(t, "5"))).expect("remove"));
        let meta = std::fs::metadata(&path).expect("exists");
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_utf16_file_is_refused_not_rewritten() {
        let dir = tempfile_dir();
        let path = dir.join("administrators_authorized_keys");
        let utf16: Vec<u8> = [0xFF, 0xFE, b's', 0, b's', 0, 0xD8, 0x00].to_vec();
        std::fs::write(&path, &utf16).expect("write");
        let err = edit_file(&path, None, |t| install(t, "5", &keys())).expect_err("refused");
        assert!(matches!(err, KeysFileError::NotUtf8(_)), "{err}");
        assert!(err.to_string().contains("UTF-16"), "{err}");
        assert_eq!(std::fs::read(&path).expect("read"), utf16);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[cfg(unix)]
    #[test]
    fn symlinks_devices_and_huge_files_are_refused_and_their_targets_untouched() {
        let dir = tempfile_dir();
        let lines = keys();
        // A symlinked authorized_keys pointing at a victim file.
        let victim = dir.join("victim");
        std::fs::write(&victim, "precious\n").expect("write");
        let link = dir.join("authorized_keys");
        std::os::unix::fs::symlink(&victim, &link).expect("symlink");
        let err = edit_file(&link, None, |t| install(t, "1", &lines)).expect_err("a link");
        assert!(err.to_string().contains("symlink"), "{err}");
        assert_eq!(
            std::fs::read_to_string(&victim).expect("read"),
            "precious\n"
        );
        assert!(std::fs::symlink_metadata(&link)
            .expect("meta")
            .file_type()
            .is_symlink());
        // A symlinked ~/.ssh.
        let elsewhere = dir.join("elsewhere");
        std::fs::create_dir_all(&elsewhere).expect("mkdir");
        let ssh_dir = dir.join("dot-ssh");
        std::os::unix::fs::symlink(&elsewhere, &ssh_dir).expect("symlink");
        let err = edit_file(&ssh_dir.join("authorized_keys"), None, |t| {
            install(t, "1", &lines)
        })
        .expect_err("a linked directory");
        assert!(err.to_string().contains("symlink"), "{err}");
        assert!(!elsewhere.join("authorized_keys").exists());
        // A device that never ends, and a file over 1 MiB.
        let zero = dir.join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).expect("symlink");
        assert!(edit_file(&zero, None, |t| install(t, "1", &lines)).is_err());
        let big = dir.join("big");
        std::fs::write(&big, vec![b'#'; (1 << 20) + 10]).expect("write");
        let err = edit_file(&big, None, |t| install(t, "1", &lines)).expect_err("too big");
        assert!(err.to_string().contains("1 MiB"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[cfg(unix)]
    #[test]
    fn a_file_of_another_user_or_a_world_writable_directory_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile_dir();
        let lines = keys();
        let open = dir.join("open");
        std::fs::create_dir_all(&open).expect("mkdir");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let err = edit_file(&open.join("authorized_keys"), None, |t| {
            install(t, "1", &lines)
        })
        .expect_err("world-writable dir");
        assert!(err.to_string().contains("StrictModes"), "{err}");
        // Someone else's file, when the runner user is known (uid 4242 here).
        let mine = dir.join("mine");
        std::fs::create_dir_all(&mine).expect("mkdir");
        let theirs = mine.join("authorized_keys");
        std::fs::write(&theirs, "").expect("write");
        let runner = Owner {
            uid: 4242,
            gid: 4242,
        };
        // As root, hand the file to a third user first; as anyone else it is
        // the tester's own, which is not uid 4242 either.
        let _ = std::os::unix::fs::chown(&theirs, Some(5555), Some(5555));
        let err = edit_file(&theirs, Some(runner), |t| install(t, "1", &lines))
            .expect_err("another user's file");
        assert!(err.to_string().contains("another user"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("cigw-ak-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }
}
