//! Key material the gateway owns: its SSH host key, the CA that signs the
//! short-lived certificates it presents to runners, and the plain client key
//! used where certificates are not trusted (Windows runners, DESIGN §9).
//!
//! Private keys live as OpenSSH files (mode 0600) under `storage.data_dir`,
//! created on first start and reused afterwards, so a restart changes nothing
//! a runner or a user has pinned.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use russh::keys::ssh_key::certificate::{Builder, CertType};
use russh::keys::ssh_key::{self, LineEnding};
use russh::keys::{Algorithm, Certificate, HashAlg, PrivateKey, PublicKey};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not an OpenSSH private key: {source}")]
    Parse {
        path: String,
        source: ssh_key::Error,
    },
    #[error("{path}: holds a {found} key, where {want} belongs")]
    Kind {
        path: String,
        want: &'static str,
        found: String,
    },
    #[error("key: {0}")]
    Ssh(#[from] ssh_key::Error),
}

/// Why a public key line was refused.
#[derive(Debug, thiserror::Error)]
pub enum PublicKeyError {
    #[error("key line longer than 16 KiB")]
    TooLong,
    #[error("not an OpenSSH public key ({0})")]
    NotOpenSsh(#[source] ssh_key::Error),
}

/// Parses one `authorized_keys`-style public key line (`type base64 [comment]`).
/// Options before the key type are refused: callers give bare keys.
pub fn parse_public_key(line: &str) -> Result<PublicKey, PublicKeyError> {
    let line = line.trim();
    if line.len() > 16 * 1024 {
        return Err(PublicKeyError::TooLong);
    }
    PublicKey::from_openssh(line).map_err(PublicKeyError::NotOpenSsh)
}

/// SHA-256 fingerprint as OpenSSH prints it: `SHA256:...`.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// `type base64` without the comment, as used in authorized_keys lines we write.
/// Whether a host presented one of the `pinned` keys. A host certificate
/// is no match: pins are plain keys, with no CA to vouch for others.
pub fn is_pinned(pinned: &[PublicKey], presented: &russh::keys::PublicKeyOrCertificate) -> bool {
    match presented {
        russh::keys::PublicKeyOrCertificate::PublicKey { key, .. } => {
            pinned.iter().any(|p| same_key(p, key))
        }
        russh::keys::PublicKeyOrCertificate::Certificate(_) => false,
    }
}

pub fn openssh_line(key: &PublicKey) -> String {
    let mut key = key.clone();
    key.set_comment("");
    key.to_openssh().unwrap_or_default().trim().to_string()
}

/// Two keys are the same key when their key data (not comments) match.
pub fn same_key(a: &PublicKey, b: &PublicKey) -> bool {
    a.key_data() == b.key_data()
}

/// Loads an Ed25519 private key from `path`, creating it (0600) if missing.
pub fn load_or_generate(path: &Path) -> Result<PrivateKey, KeyError> {
    load_or_generate_kind(path, HostKeyKind::Ed25519)
}

/// The kinds of host key the gateway serves, in the order it offers them.
/// Ed25519 is what current clients pick; ECDSA P-256 and RSA (signing with
/// `rsa-sha2-256/512`, never SHA-1) are for hardened and FIPS-mode clients
/// that take nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKeyKind {
    Ed25519,
    EcdsaP256,
    Rsa3072,
}

impl HostKeyKind {
    pub const ALL: [HostKeyKind; 3] = [
        HostKeyKind::Ed25519,
        HostKeyKind::EcdsaP256,
        HostKeyKind::Rsa3072,
    ];

    /// The file name under `storage.data_dir`, as OpenSSH names its own.
    pub fn file_name(self) -> &'static str {
        match self {
            HostKeyKind::Ed25519 => "ssh_host_ed25519_key",
            HostKeyKind::EcdsaP256 => "ssh_host_ecdsa_key",
            HostKeyKind::Rsa3072 => "ssh_host_rsa_key",
        }
    }

    fn generate(self) -> Result<PrivateKey, ssh_key::Error> {
        let mut rng = rand::rng();
        match self {
            HostKeyKind::Ed25519 => PrivateKey::random(&mut rng, Algorithm::Ed25519),
            HostKeyKind::EcdsaP256 => PrivateKey::random(
                &mut rng,
                Algorithm::Ecdsa {
                    curve: ssh_key::EcdsaCurve::NistP256,
                },
            ),
            HostKeyKind::Rsa3072 => {
                let key = ssh_key::private::RsaKeypair::random(&mut rng, 3072)?;
                PrivateKey::new(ssh_key::private::KeypairData::Rsa(key), "")
            }
        }
    }

    fn matches(self, key: &PrivateKey) -> bool {
        matches!(
            (self, key.algorithm()),
            (HostKeyKind::Ed25519, Algorithm::Ed25519)
                | (HostKeyKind::EcdsaP256, Algorithm::Ecdsa { .. })
                | (HostKeyKind::Rsa3072, Algorithm::Rsa { .. })
        )
    }
}

/// Loads a private key of `kind` from `path`, creating it (0600) if
/// missing. A file holding another kind of key is an error, not a silent
/// second key of the same type.
pub fn load_or_generate_kind(path: &Path, kind: HostKeyKind) -> Result<PrivateKey, KeyError> {
    let key = load_or_create(path, || kind.generate())?;
    if !kind.matches(&key) {
        return Err(KeyError::Kind {
            path: path.display().to_string(),
            want: kind.file_name(),
            found: key.algorithm().to_string(),
        });
    }
    Ok(key)
}

fn load_or_create(
    path: &Path,
    generate: impl FnOnce() -> Result<PrivateKey, ssh_key::Error>,
) -> Result<PrivateKey, KeyError> {
    let display = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => PrivateKey::from_openssh(text.as_bytes()).map_err(|source| KeyError::Parse {
            path: display,
            source,
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = generate()?;
            let text = key.to_openssh(LineEnding::LF)?;
            write_private(path, text.as_bytes()).map_err(|source| KeyError::Io {
                path: display,
                source,
            })?;
            Ok(key)
        }
        Err(source) => Err(KeyError::Io {
            path: display,
            source,
        }),
    }
}

/// Writes a file only its owner can read, atomically (temp file + rename).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// The gateway's signing authority for runner logins.
pub struct Ca {
    key: PrivateKey,
}

impl Ca {
    pub fn new(key: PrivateKey) -> Ca {
        Ca { key }
    }

    pub fn public_key(&self) -> &PublicKey {
        self.key.public_key()
    }

    /// The CA's private ed25519 seed: the secret runner keys are sealed
    /// under in a shared database (`pg::Sealer`). Every replica has it.
    pub fn seal_secret(&self) -> Option<[u8; 32]> {
        self.key.key_data().ed25519().map(|k| k.private.to_bytes())
    }

    /// A user certificate for `principal` on the runner, valid from a minute
    /// ago (clock skew) for `validity`. The key id names the person and job so
    /// the runner's sshd log says who came in.
    pub fn issue(
        &self,
        subject: &PublicKey,
        principal: &str,
        key_id: &str,
        validity: Duration,
    ) -> Result<Certificate, KeyError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let nonce: [u8; 32] = rand::random();
        let mut builder = Builder::new(
            nonce.to_vec(),
            subject.key_data().clone(),
            now.saturating_sub(60),
            now + validity.as_secs(),
        )?;
        builder.serial(rand::random())?;
        builder.cert_type(CertType::User)?;
        builder.key_id(key_id)?;
        builder.valid_principal(principal)?;
        for ext in ["permit-pty", "permit-port-forwarding"] {
            builder.extension(ext, "")?;
        }
        Ok(builder.sign(&self.key)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_host_key_kind_is_generated_once_and_a_wrong_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("cigw-hostkeys-{}", rand::random::<u64>()));
        for kind in HostKeyKind::ALL {
            let path = dir.join(kind.file_name());
            let started = std::time::Instant::now();
            let a = load_or_generate_kind(&path, kind).expect("generate");
            eprintln!("{kind:?}: {:?}", started.elapsed());
            assert!(kind.matches(&a), "{kind:?} {}", a.algorithm());
            let b = load_or_generate_kind(&path, kind).expect("reload");
            assert_eq!(a.public_key(), b.public_key());
        }
        let err = load_or_generate_kind(&dir.join("ssh_host_rsa_key"), HostKeyKind::Ed25519)
            .expect_err("an RSA file is not an ed25519 key");
        assert!(err.to_string().contains("ssh_host_ed25519_key"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn generated_key_is_reloaded_unchanged_and_private() {
        let dir = std::env::temp_dir().join(format!("cigw-keys-{}", rand::random::<u64>()));
        let path = dir.join("k");
        let a = load_or_generate(&path).expect("generate");
        let b = load_or_generate(&path).expect("reload");
        assert!(same_key(a.public_key(), b.public_key()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o077, 0);
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn certificate_names_principal_and_is_signed_by_the_ca() {
        let ca = Ca::new(PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).expect("key"));
        let subject = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519).expect("key");
        let cert = ca
            .issue(
                subject.public_key(),
                "runner",
                "octocat@job-1",
                Duration::from_secs(300),
            )
            .expect("issue");
        assert_eq!(cert.valid_principals(), ["runner".to_string()]);
        assert_eq!(cert.key_id(), "octocat@job-1");
        assert!(cert
            .validate([&ca.public_key().fingerprint(HashAlg::Sha256)])
            .is_ok());
    }

    #[test]
    fn public_key_parsing_refuses_garbage() {
        assert!(parse_public_key("ssh-ed25519 AAAA").is_err());
        assert!(parse_public_key("").is_err());
        assert!(parse_public_key("command=\"x\" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB").is_err());
    }
}
