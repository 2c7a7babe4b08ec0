//! The SSH side: the accept loop and limits (`server`), the per-connection
//! handler (`handler`, thin), authentication (`auth`), what lasts as long as
//! a connection (`session`), opening channels and refusing them (`open`),
//! jump mode's forwards (`jump`, spliced by `splice`), the client to runners
//! (`upstream`) and job mode's relay, one task per channel (`channel`).

mod auth;
pub mod channel;
pub mod handler;
pub mod inbox;
pub mod jump;
pub mod listing;
pub mod open;
pub mod relay;
pub mod server;
mod session;
pub mod shards;
pub mod splice;
pub mod tunnel;
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

/// Key exchanges offered on both sides: OpenSSH's default set as far as
/// russh has it (no sntrup761), plus russh's extra DH groups. russh's
/// default omits ECDH over the NIST curves, the only kex that FIPS-mode
/// clients and some hardened runner sshds take. Where the gateway is the
/// client (the runner leg) this order decides: post-quantum hybrid first,
/// then curve25519, as before; on the user leg the client's order decides.
pub const KEX: &[russh::kex::Name] = &[
    russh::kex::MLKEM768X25519_SHA256,
    russh::kex::CURVE25519,
    russh::kex::CURVE25519_PRE_RFC_8731,
    russh::kex::ECDH_SHA2_NISTP256,
    russh::kex::ECDH_SHA2_NISTP384,
    russh::kex::ECDH_SHA2_NISTP521,
    russh::kex::DH_GEX_SHA256,
    russh::kex::DH_G16_SHA512,
    russh::kex::DH_G18_SHA512,
    russh::kex::DH_G17_SHA512,
    russh::kex::DH_G15_SHA512,
    russh::kex::DH_G14_SHA256,
    russh::kex::EXTENSION_SUPPORT_AS_CLIENT,
    russh::kex::EXTENSION_SUPPORT_AS_SERVER,
    russh::kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT,
    russh::kex::EXTENSION_OPENSSH_STRICT_KEX_AS_SERVER,
];

/// The user-key signature algorithms the gateway takes (and advertises in
/// `server-sig-algs`): russh's default list without `ssh-rsa`, whose SHA-1
/// signatures OpenSSH has refused by default since 8.8.
const KEY_ALGORITHMS_WITHOUT_SHA1: &[russh::keys::Algorithm] = &[
    russh::keys::Algorithm::Ed25519,
    russh::keys::Algorithm::Ecdsa {
        curve: russh::keys::EcdsaCurve::NistP256,
    },
    russh::keys::Algorithm::Ecdsa {
        curve: russh::keys::EcdsaCurve::NistP384,
    },
    russh::keys::Algorithm::Ecdsa {
        curve: russh::keys::EcdsaCurve::NistP521,
    },
    russh::keys::Algorithm::Rsa {
        hash: Some(russh::keys::HashAlg::Sha512),
    },
    russh::keys::Algorithm::Rsa {
        hash: Some(russh::keys::HashAlg::Sha256),
    },
];

/// The server's algorithm order; `ssh-rsa` (SHA-1) user signatures only
/// with `ssh.allow_sha1_rsa`.
pub fn preferred(allow_sha1_rsa: bool) -> russh::Preferred {
    russh::Preferred {
        kex: std::borrow::Cow::Borrowed(KEX),
        cipher: std::borrow::Cow::Borrowed(CIPHERS),
        key: if allow_sha1_rsa {
            russh::Preferred::DEFAULT.key
        } else {
            std::borrow::Cow::Borrowed(KEY_ALGORITHMS_WITHOUT_SHA1)
        },
        ..russh::Preferred::DEFAULT
    }
}

/// Whether `algorithm` is `ssh-rsa` with SHA-1 signatures.
pub fn is_sha1_rsa(algorithm: &russh::keys::Algorithm) -> bool {
    *algorithm == russh::keys::Algorithm::Rsa { hash: None }
}

/// The gateway's own order on its connections to runners, where it is the
/// client and its preference decides: AES-GCM first. Job mode encrypts every
/// byte twice (user leg and runner leg); with chacha20-poly1305 on the runner
/// leg, ring's Poly1305 alone took a quarter of the gateway's CPU in a
/// profile of a bulk upload. ring's AES-GCM uses AES-NI/VAES where the CPU
/// has them and a constant-time fallback where it does not. Same set as
/// [`CIPHERS`]: a runner whose sshd refuses AES-GCM gets chacha20-poly1305.
pub const UPSTREAM_CIPHERS: &[russh::cipher::Name] = &[
    russh::cipher::AES_128_GCM,
    russh::cipher::AES_256_GCM,
    russh::cipher::CHACHA20_POLY1305,
    russh::cipher::AES_128_CTR,
    russh::cipher::AES_192_CTR,
    russh::cipher::AES_256_CTR,
];

#[cfg(test)]
mod tests {
    /// The runner leg changes the order, never the set: a runner that serves
    /// what a user's client may pick is served by the gateway too.
    /// Every kex russh offers by default is still offered, ECDH added.
    #[test]
    fn kex_is_russh_default_plus_ecdh() {
        let ours: Vec<&str> = super::KEX.iter().map(|k| k.as_ref()).collect();
        for k in russh::Preferred::DEFAULT.kex.iter() {
            assert!(ours.contains(&k.as_ref()), "{}", k.as_ref());
        }
        for k in [
            "ecdh-sha2-nistp256",
            "ecdh-sha2-nistp384",
            "ecdh-sha2-nistp521",
        ] {
            assert!(ours.contains(&k), "{k}");
        }
    }

    /// Each of russh's session queues allocates 32 slots of its message type
    /// when a connection starts (tokio's block), four to six queues for a
    /// job-mode session: a message type sized for its rarest variant cost
    /// 5.4 KiB a queue (vendor/russh/PATCH.md, "Queue messages sized for
    /// the common case"). 96 bytes is `Msg::Channel` (an id and a
    /// `ChannelMsg`).
    #[test]
    fn russh_queue_messages_stay_small() {
        assert!(std::mem::size_of::<russh::ChannelMsg>() <= 80);
        assert!(std::mem::size_of::<russh::server::Msg>() <= 96);
        assert!(std::mem::size_of::<russh::client::Msg>() <= 96);
    }

    #[test]
    fn upstream_ciphers_are_the_same_set_in_another_order() {
        let mut ours: Vec<&str> = super::CIPHERS.iter().map(|c| c.as_ref()).collect();
        let mut upstream: Vec<&str> = super::UPSTREAM_CIPHERS.iter().map(|c| c.as_ref()).collect();
        assert_eq!(upstream[0], "aes128-gcm@openssh.com");
        ours.sort_unstable();
        upstream.sort_unstable();
        assert_eq!(ours, upstream);
    }
}
