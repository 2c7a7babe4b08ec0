//! Every output is compared with ring's `chacha20_poly1305_openssh`, the
//! implementation this crate replaces, and the bare Poly1305 with
//! RustCrypto's, on random and on adversarial inputs.

use super::*;
use poly1305::universal_hash::KeyInit;
use ring::aead::chacha20_poly1305_openssh as reference;

/// splitmix64: reproducible inputs without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill(&mut self, out: &mut [u8]) {
        for byte in out {
            *byte = self.next() as u8;
        }
    }

    /// A raw ChaCha20 key and IETF nonce.
    fn key_and_nonce(&mut self) -> ([u8; 32], [u8; 12]) {
        let (mut key, mut nonce) = ([0u8; 32], [0u8; 12]);
        self.fill(&mut key);
        self.fill(&mut nonce);
        (key, nonce)
    }

    fn key(&mut self) -> [u8; KEY_LEN] {
        let mut key = [0; KEY_LEN];
        self.fill(&mut key);
        key
    }
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn rustcrypto_poly1305(key: &[u8; 32], msg: &[u8]) -> [u8; 16] {
    poly1305::Poly1305::new(key.into())
        .compute_unpadded(msg)
        .into()
}

#[test]
fn poly1305_rfc8439_section_2_5_2() {
    let key: [u8; 32] = hex("85d6be7857556d337f4452fe42d506a80103808afb0db2fd4abff6af4149f51b")
        .try_into()
        .unwrap();
    let tag = poly1305(&key, b"Cryptographic Forum Research Group");
    assert_eq!(tag.to_vec(), hex("a8061dc1305136c6c22b8baf0c0127a9"));
}

/// Inputs that push the accumulator to and past 2^130 − 5 and the final
/// subtraction's both sides, with the largest clamped `r` and `s` all ones
/// (the carries into and out of every limb).
#[test]
fn poly1305_matches_rustcrypto_on_edge_inputs() {
    let mut rng = Rng(5);
    let mut keys: Vec<[u8; 32]> = vec![[0; 32], [0xff; 32]];
    for r in [1u8, 2, 5] {
        let mut key = [0u8; 32];
        key[0] = r;
        keys.push(key);
        key[16..].fill(0xff);
        keys.push(key);
    }
    for _ in 0..20 {
        let mut key = [0; 32];
        rng.fill(&mut key);
        keys.push(key);
    }
    let mut messages: Vec<Vec<u8>> = Vec::new();
    for len in [0usize, 1, 15, 16, 17, 31, 32, 33, 48, 64, 200, 1024, 4099] {
        messages.push(vec![0xff; len]);
        messages.push(vec![0; len]);
        let mut random = vec![0; len];
        rng.fill(&mut random);
        messages.push(random);
        // Blocks whose value is just below and just above p's low limbs.
        let mut near_p = vec![0xff; len];
        for block in near_p.chunks_mut(16) {
            block[0] = 0xfb;
        }
        messages.push(near_p);
    }
    for key in &keys {
        for msg in &messages {
            assert_eq!(
                poly1305(key, msg),
                rustcrypto_poly1305(key, msg),
                "key {key:02x?}, message of {} bytes",
                msg.len()
            );
        }
    }
}

/// Random keys, random sequence numbers (and the edges), every packet size
/// from the 4-byte length alone to 1,100 bytes, and the bulk sizes.
#[test]
fn seal_is_byte_for_byte_ring() {
    let mut rng = Rng(17);
    let mut sizes: Vec<usize> = (PACKET_LENGTH_LEN..=1100).collect();
    sizes.extend([8192, 32768 + 4, 35000, 256 * 1024]);
    for (i, &size) in sizes.iter().enumerate() {
        let key = rng.key();
        let seq = match i % 4 {
            0 => 0,
            1 => u32::MAX,
            _ => rng.next() as u32,
        };
        let mut ours = vec![0; size];
        rng.fill(&mut ours);
        let mut theirs = ours.clone();
        let (mut our_tag, mut their_tag) = ([0; TAG_LEN], [0; TAG_LEN]);
        SealingKey::new(&key).seal_in_place(seq, &mut ours, &mut our_tag);
        reference::SealingKey::new(&key).seal_in_place(seq, &mut theirs, &mut their_tag);
        assert!(
            ours == theirs,
            "ciphertext differs at size {size}, seq {seq}"
        );
        assert_eq!(our_tag, their_tag, "tag differs at size {size}, seq {seq}");
    }
}

#[test]
fn opens_what_ring_seals_and_ring_opens_ours() {
    let mut rng = Rng(29);
    for size in [4usize, 5, 16, 20, 36, 100, 1024, 32768 + 4] {
        let key = rng.key();
        let seq = rng.next() as u32;
        let mut plain = vec![0; size];
        rng.fill(&mut plain);

        let mut packet = plain.clone();
        let mut tag = [0; TAG_LEN];
        reference::SealingKey::new(&key).seal_in_place(seq, &mut packet, &mut tag);
        let opener = OpeningKey::new(&key);
        let length: [u8; 4] = packet[..4].try_into().unwrap();
        assert_eq!(opener.decrypt_packet_length(seq, length), plain[..4]);
        assert_eq!(
            opener.open_in_place(seq, &mut packet, &tag).unwrap(),
            &plain[4..]
        );

        let mut packet = plain.clone();
        SealingKey::new(&key).seal_in_place(seq, &mut packet, &mut tag);
        let opened = reference::OpeningKey::new(&key)
            .open_in_place(seq, &mut packet, &tag)
            .unwrap();
        assert_eq!(opened, &plain[4..]);
    }
}

/// A flipped bit anywhere (length, body, tag), the wrong sequence number or
/// the wrong key is refused, and the packet is left as it came.
#[test]
fn refuses_any_change_and_leaves_the_packet_alone() {
    let mut rng = Rng(41);
    let key = rng.key();
    let seq = 7;
    let mut sealed = vec![0; 4 + 60];
    rng.fill(&mut sealed);
    let mut tag = [0; TAG_LEN];
    SealingKey::new(&key).seal_in_place(seq, &mut sealed, &mut tag);
    let opener = OpeningKey::new(&key);

    for bit in 0..(sealed.len() + TAG_LEN) * 8 {
        let (mut packet, mut bad_tag) = (sealed.clone(), tag);
        let byte = bit / 8;
        if byte < packet.len() {
            packet[byte] ^= 1 << (bit % 8);
        } else {
            bad_tag[byte - packet.len()] ^= 1 << (bit % 8);
        }
        let before = packet.clone();
        assert_eq!(
            opener.open_in_place(seq, &mut packet, &bad_tag),
            Err(Unspecified),
            "bit {bit}"
        );
        assert_eq!(packet, before, "bit {bit}: a refused packet was modified");
    }
    let mut packet = sealed.clone();
    assert!(opener.open_in_place(seq + 1, &mut packet, &tag).is_err());
    let mut other_key = key;
    other_key[10] ^= 1; // K_2: the payload's and the MAC's key
    assert!(OpeningKey::new(&other_key)
        .open_in_place(seq, &mut packet, &tag)
        .is_err());
    // K_1 only hides the length; the MAC (under K_2) covers its ciphertext.
    let mut other_key = key;
    other_key[40] ^= 1;
    let length: [u8; 4] = sealed[..4].try_into().unwrap();
    assert_ne!(
        OpeningKey::new(&other_key).decrypt_packet_length(seq, length),
        opener.decrypt_packet_length(seq, length)
    );
    assert!(opener.open_in_place(seq, &mut [0; 3], &tag).is_err());
    assert!(opener.open_in_place(seq, &mut sealed, &tag).is_ok());
}

/// The AVX-512 path against RustCrypto's portable ChaCha20, on its own:
/// every chunk count up to 5 KiB and a 256 KiB packet, short tails left
/// alone, random keys, nonces and starting counters (including one whose
/// low byte carries within the chunk). Skipped, saying so, on a CPU
/// without AVX-512F, where the wide path never runs.
#[cfg(target_arch = "x86_64")]
#[test]
fn wide_keystream_matches_the_portable_cipher() {
    if !wide::available() {
        eprintln!("no AVX-512F on this CPU: the wide path is not used here");
        return;
    }
    let mut rng = Rng(3);
    let lengths = (0..=5 * wide::CHUNK + 70).step_by(67).chain([
        wide::CHUNK - 1,
        wide::CHUNK,
        2 * wide::CHUNK + 1,
        256 << 10,
    ]);
    for (round, len) in lengths.enumerate() {
        let (key, nonce) = rng.key_and_nonce();
        let counter = match round % 3 {
            0 => 1,
            1 => 0xf9,
            _ => rng.next() as u32 >> 8,
        };
        let mut data = vec![0u8; len];
        rng.fill(&mut data);
        let original = data.clone();
        let mut expected = data.clone();
        let mut portable = ChaCha20::new(&key.into(), &nonce.into());
        portable.seek(u64::from(counter) * 64);
        portable.apply_keystream(&mut expected);

        let done = wide::xor_keystream(&key, &nonce, counter, &mut data);
        assert_eq!(done, len - len % wide::CHUNK, "len {len}");
        assert_eq!(
            data[..done],
            expected[..done],
            "len {len} counter {counter}"
        );
        assert_eq!(
            data[done..],
            original[done..],
            "len {len}: the tail is the caller's"
        );
    }
}

/// The AVX-512 Poly1305 against RustCrypto's, around its threshold and its
/// step (every 16-byte length from just below 1 KiB to past 1.5 KiB), at
/// several KiB and at 256 KiB, on all-ones blocks (every limb full, the
/// most carries), blocks at p's low limbs and random ones, with the largest
/// clamped `r` and random keys. It also checks that the wide path takes
/// the bulk, so the comparison is not of the scalar code with itself.
#[cfg(target_arch = "x86_64")]
#[test]
fn wide_poly1305_matches_rustcrypto() {
    if !wide::available() {
        eprintln!("no AVX-512F on this CPU: the wide path is not used here");
        return;
    }
    let mut rng = Rng(11);
    let mut keys: Vec<[u8; 32]> = vec![[0xff; 32]];
    for _ in 0..6 {
        let mut key = [0; 32];
        rng.fill(&mut key);
        keys.push(key);
    }
    let lengths = (wide::POLY_MIN - 48..=wide::POLY_MIN + 4 * wide::POLY_STEP + 17)
        .step_by(16)
        .chain([wide::POLY_MIN + 1, 3000, 4096, 9001, 256 << 10]);
    for len in lengths {
        let mut random = vec![0; len];
        rng.fill(&mut random);
        let mut near_p = vec![0xff; len];
        for block in near_p.chunks_mut(16) {
            block[0] = 0xfb;
        }
        for msg in [vec![0xff; len], near_p, random] {
            for key in &keys {
                let state = Poly1305::new(key);
                let full = len - len % 16;
                let (done, _) = wide::poly1305_blocks(state.r0, state.r1, &msg[..full]);
                let expected = if full >= wide::POLY_MIN {
                    full - full % wide::POLY_STEP
                } else {
                    0
                };
                assert_eq!(done, expected, "len {len}");
                assert_eq!(
                    poly1305(key, &msg),
                    rustcrypto_poly1305(key, &msg),
                    "len {len}, key {key:02x?}"
                );
            }
        }
    }
}

/// The scalar block function short packets use is the RFC 8439 block
/// function: its output is RustCrypto's keystream at that block, for random
/// keys, nonces and counters (and the counter's edges).
#[test]
fn the_scalar_block_is_the_portable_ciphers_keystream() {
    let mut rng = Rng(11);
    for round in 0..200 {
        let (key, nonce) = rng.key_and_nonce();
        let counter = match round % 4 {
            0 => 0,
            1 => 1,
            2 => u32::MAX >> 1,
            _ => rng.next() as u32 >> 4,
        };
        let mut expected = [0u8; 64];
        let mut portable = ChaCha20::new(&key.into(), &nonce.into());
        portable.seek(64 * u64::from(counter));
        portable.apply_keystream(&mut expected);
        assert_eq!(block(&key, counter, &nonce), expected, "round {round}");
    }
}
