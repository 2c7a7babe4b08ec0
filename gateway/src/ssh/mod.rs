//! The SSH side: the accept loop and limits (`server`), the per-connection
//! handler (`handler`), the client to runners (`upstream`) and the channel
//! bridge between them (`bridge`).

pub mod bridge;
pub mod handler;
pub mod server;
pub mod splice;
pub mod upstream;

/// Ciphers offered on both sides: OpenSSH's default set (russh's default
/// omits aes128-gcm, which `ssh -c aes128-gcm@openssh.com` and many
/// hardened client configs ask for). AEAD first; among them the client's
/// order decides (OpenSSH prefers chacha20-poly1305).
pub const CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_128_GCM,
    russh::cipher::AES_256_GCM,
    russh::cipher::AES_128_CTR,
    russh::cipher::AES_192_CTR,
    russh::cipher::AES_256_CTR,
];

pub fn preferred() -> russh::Preferred {
    russh::Preferred {
        cipher: std::borrow::Cow::Borrowed(CIPHERS),
        ..russh::Preferred::DEFAULT
    }
}
