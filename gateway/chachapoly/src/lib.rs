//! `chacha20-poly1305@openssh.com`, the SSH packet cipher every OpenSSH
//! client offers first (PROTOCOL.chacha20poly1305 in OpenSSH's source).
//!
//! The API is ring's `aead::chacha20_poly1305_openssh`, so the vendored russh
//! swaps one for the other. Why not ring's: ring 0.17 runs Poly1305 in
//! portable C with 26-bit limbs on x86_64 (`crypto/poly1305/poly1305.c`), and
//! that was the largest single part of the gateway's CPU in the jump relay
//! (docs/performance.md). Here Poly1305 works in radix 2^64 (two 64-bit limbs
//! and two bits, 64×64→128-bit products), after OpenSSL's `poly1305.c`
//! (the `POLY1305_64` path): about twice ring's speed on 32 KiB packets and
//! faster on 100-byte ones, with no per-key setup. ChaCha20 is a scalar
//! block function for the length, the Poly1305 key and bodies of up to four
//! blocks (an interactive packet's three blocks), RustCrypto's `chacha20`
//! with its AVX2 or SSE2 backend chosen at run time for longer bodies, and
//! for the whole kilobytes of large packets sixteen blocks at a time in
//! AVX-512 where the CPU has it (`wide`, the crate's only `unsafe`).
//!
//! Everything is constant time in the secret data: additions with carries,
//! multiplications, masks; no table look-ups and no branches on the key,
//! the state or the tag. Tests compare every output with ring's byte for
//! byte.

use chacha20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use chacha20::ChaCha20;

#[cfg(target_arch = "x86_64")]
mod wide;

/// Elsewhere the portable cipher does every byte.
#[cfg(not(target_arch = "x86_64"))]
mod wide {
    pub(crate) fn xor_keystream(_: &[u8; 32], _: &[u8; 12], _: u32, _: &mut [u8]) -> usize {
        0
    }
    pub(crate) fn poly1305_blocks(_: u64, _: u64, _: &[u8]) -> (usize, [u64; 3]) {
        (0, [0; 3])
    }
}

/// 512 bits: K_2 (the payload's key) then K_1 (the packet length's).
pub const KEY_LEN: usize = 64;
/// The Poly1305 tag after each packet.
pub const TAG_LEN: usize = 16;
/// The encrypted `packet_length` field at the front of each packet.
pub const PACKET_LENGTH_LEN: usize = 4;

/// A packet failed authentication or was shorter than its length field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unspecified;

impl std::fmt::Display for Unspecified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("chacha20-poly1305@openssh.com: packet authentication failed")
    }
}

impl std::error::Error for Unspecified {}

struct Keys {
    /// K_1: encrypts the 4-byte packet length.
    length: [u8; 32],
    /// K_2: the Poly1305 key (block 0) and the payload (blocks 1..).
    payload: [u8; 32],
}

impl Keys {
    fn new(key: &[u8; KEY_LEN]) -> Self {
        let mut payload = [0; 32];
        let mut length = [0; 32];
        payload.copy_from_slice(&key[..32]);
        length.copy_from_slice(&key[32..]);
        Keys { length, payload }
    }

    /// The 96-bit IETF nonce whose keystream equals the original 64-bit-nonce
    /// ChaCha20 OpenSSH uses: the counter's high word (always 0 here, an SSH
    /// packet is far below 2^32 blocks) then the sequence number, big endian,
    /// as a 64-bit value.
    fn nonce(sequence_number: u32) -> [u8; 12] {
        let mut nonce = [0; 12];
        nonce[8..].copy_from_slice(&sequence_number.to_be_bytes());
        nonce
    }

    fn crypt_length(&self, sequence_number: u32, length: &mut [u8; PACKET_LENGTH_LEN]) {
        let mut keystream = block(&self.length, 0, &Self::nonce(sequence_number));
        for (byte, k) in length.iter_mut().zip(keystream) {
            *byte ^= k;
        }
        keystream.fill(0);
    }

    /// The Poly1305 key: the first half of the payload key's block 0.
    fn poly_key(&self, sequence_number: u32) -> [u8; 32] {
        let mut block0 = block(&self.payload, 0, &Self::nonce(sequence_number));
        let mut poly_key = [0; 32];
        poly_key.copy_from_slice(&block0[..32]);
        block0.fill(0);
        poly_key
    }

    /// Encrypts or decrypts the packet body (blocks 1.. of the payload
    /// key's keystream): a short body block by block in scalar code, a long
    /// one's whole 1 KiB chunks in AVX-512 where the CPU has it and the rest
    /// with RustCrypto's cipher (AVX2 or SSE2).
    fn crypt_body(&self, sequence_number: u32, body: &mut [u8]) {
        let nonce = Self::nonce(sequence_number);
        if body.len() <= SHORT_BODY {
            for (i, chunk) in body.chunks_mut(64).enumerate() {
                let mut keystream = block(&self.payload, 1 + i as u32, &nonce);
                for (byte, k) in chunk.iter_mut().zip(keystream) {
                    *byte ^= k;
                }
                keystream.fill(0);
            }
            return;
        }
        let done = wide::xor_keystream(&self.payload, &nonce, 1, body);
        let mut cipher = ChaCha20::new(&self.payload.into(), &nonce.into());
        cipher.seek(64 + done as u64);
        cipher.apply_keystream(&mut body[done..]);
    }
}

/// Bodies up to this many bytes (four blocks) are encrypted by [`block`]:
/// for an interactive packet, setting up RustCrypto's vector cipher three
/// times cost more than the blocks themselves (36-byte packets sealed at
/// 0.56× ring's rate with it, docs/performance.md).
const SHORT_BODY: usize = 4 * 64;

/// One ChaCha20 block (RFC 8439 §2.3: 32-bit counter, 96-bit nonce), in
/// scalar code: additions, rotations and XORs only, constant time.
fn block(key: &[u8; 32], counter: u32, nonce: &[u8; 12]) -> [u8; 64] {
    let word = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let mut state = [0u32; 16];
    state[..4].copy_from_slice(&[0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574]);
    for (w, b) in state[4..12].iter_mut().zip(key.chunks_exact(4)) {
        *w = word(b);
    }
    state[12] = counter;
    for (w, b) in state[13..].iter_mut().zip(nonce.chunks_exact(4)) {
        *w = word(b);
    }
    let mut x = state;
    #[inline(always)]
    fn quarter(x: &mut [u32; 16], a: usize, b: usize, c: usize, d: usize) {
        x[a] = x[a].wrapping_add(x[b]);
        x[d] = (x[d] ^ x[a]).rotate_left(16);
        x[c] = x[c].wrapping_add(x[d]);
        x[b] = (x[b] ^ x[c]).rotate_left(12);
        x[a] = x[a].wrapping_add(x[b]);
        x[d] = (x[d] ^ x[a]).rotate_left(8);
        x[c] = x[c].wrapping_add(x[d]);
        x[b] = (x[b] ^ x[c]).rotate_left(7);
    }
    for _ in 0..10 {
        quarter(&mut x, 0, 4, 8, 12);
        quarter(&mut x, 1, 5, 9, 13);
        quarter(&mut x, 2, 6, 10, 14);
        quarter(&mut x, 3, 7, 11, 15);
        quarter(&mut x, 0, 5, 10, 15);
        quarter(&mut x, 1, 6, 11, 12);
        quarter(&mut x, 2, 7, 8, 13);
        quarter(&mut x, 3, 4, 9, 14);
    }
    let mut out = [0u8; 64];
    for ((o, w), s) in out.chunks_exact_mut(4).zip(x).zip(state) {
        o.copy_from_slice(&w.wrapping_add(s).to_le_bytes());
    }
    out
}

/// Encrypts and authenticates packets (ring's `SealingKey`).
pub struct SealingKey(Keys);

impl SealingKey {
    pub fn new(key: &[u8; KEY_LEN]) -> Self {
        SealingKey(Keys::new(key))
    }

    /// `packet` holds `packet_length || padding_length || payload || padding`
    /// in the clear and is overwritten with the ciphertext; the tag goes to
    /// `tag_out`.
    ///
    /// # Panics
    /// When `packet` is shorter than the length field.
    pub fn seal_in_place(
        &self,
        sequence_number: u32,
        packet: &mut [u8],
        tag_out: &mut [u8; TAG_LEN],
    ) {
        let (length, body) = packet.split_at_mut(PACKET_LENGTH_LEN);
        let length: &mut [u8; PACKET_LENGTH_LEN] =
            length.try_into().expect("split at PACKET_LENGTH_LEN");
        let poly_key = self.0.poly_key(sequence_number);
        self.0.crypt_length(sequence_number, length);
        self.0.crypt_body(sequence_number, body);
        *tag_out = poly1305(&poly_key, packet);
    }
}

/// Authenticates and decrypts packets (ring's `OpeningKey`).
pub struct OpeningKey(Keys);

impl OpeningKey {
    pub fn new(key: &[u8; KEY_LEN]) -> Self {
        OpeningKey(Keys::new(key))
    }

    /// The packet length, decrypted but not yet authenticated: a caller may
    /// only use it to know how much to read before `open_in_place`.
    pub fn decrypt_packet_length(
        &self,
        sequence_number: u32,
        encrypted_packet_length: [u8; PACKET_LENGTH_LEN],
    ) -> [u8; PACKET_LENGTH_LEN] {
        let mut length = encrypted_packet_length;
        self.0.crypt_length(sequence_number, &mut length);
        length
    }

    /// `packet` is `encrypted_packet_length || ciphertext`. The tag is
    /// checked (in constant time) before anything is decrypted, so a packet
    /// that fails leaves `packet` as it was. On success the ciphertext is
    /// replaced by the plaintext, which is returned (without the length).
    pub fn open_in_place<'a>(
        &self,
        sequence_number: u32,
        packet: &'a mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<&'a [u8], Unspecified> {
        if packet.len() < PACKET_LENGTH_LEN {
            return Err(Unspecified);
        }
        let poly_key = self.0.poly_key(sequence_number);
        let expected = poly1305(&poly_key, packet);
        if !constant_time_eq(&expected, tag) {
            return Err(Unspecified);
        }
        let body = &mut packet[PACKET_LENGTH_LEN..];
        self.0.crypt_body(sequence_number, body);
        Ok(body)
    }
}

fn constant_time_eq(a: &[u8; TAG_LEN], b: &[u8; TAG_LEN]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the compiler from turning the fold into an early-exit compare.
    std::hint::black_box(diff) == 0
}

/// The one-shot Poly1305 tag of `msg` under a 32-byte one-time key
/// (RFC 8439 §2.5): `r` from the first half (clamped), `s` the second.
pub fn poly1305(key: &[u8; 32], msg: &[u8]) -> [u8; 16] {
    let mut state = Poly1305::new(key);
    let full = msg.len() - msg.len() % 16;
    // Large messages: most blocks eight at a time in AVX-512, where the CPU
    // has it; the scalar code goes on from the state that leaves.
    let (done, [h0, h1, h2]) = wide::poly1305_blocks(state.r0, state.r1, &msg[..full]);
    (state.h0, state.h1, state.h2) = (h0, h1, h2);
    state.blocks(&msg[done..full], 1);
    let rest = &msg[full..];
    if !rest.is_empty() {
        // The last, short block gets its 1 byte right after the message and
        // no 2^128 bit.
        let mut last = [0u8; 16];
        last[..rest.len()].copy_from_slice(rest);
        last[rest.len()] = 1;
        state.blocks(&last, 0);
    }
    state.finish()
}

/// The accumulator `h = h0 + h1·2^64 + h2·2^128`, kept below about 2^131
/// between blocks (a partial reduction, finished in `finish`).
struct Poly1305 {
    r0: u64,
    r1: u64,
    /// `r1 + r1/4`, i.e. `5·r1/4`: a product's part at 2^128·r1 wraps to
    /// `·5/4` at 2^0 modulo 2^130 − 5. Exact because clamping clears the two
    /// low bits of `r1`.
    s1: u64,
    h0: u64,
    h1: u64,
    h2: u64,
    s: [u64; 2],
}

fn le64(bytes: &[u8]) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(word)
}

impl Poly1305 {
    fn new(key: &[u8; 32]) -> Self {
        let r0 = le64(&key[0..8]) & 0x0fff_fffc_0fff_ffff;
        let r1 = le64(&key[8..16]) & 0x0fff_fffc_0fff_fffc;
        Poly1305 {
            r0,
            r1,
            s1: r1 + (r1 >> 2),
            h0: 0,
            h1: 0,
            h2: 0,
            s: [le64(&key[16..24]), le64(&key[24..32])],
        }
    }

    /// `h = (h + m)·r mod (2^130 − 5)` for each 16-byte block of `data`
    /// (whose length is a multiple of 16), with `pad_bit` as bit 128 of `m`.
    #[inline(always)]
    fn blocks(&mut self, data: &[u8], pad_bit: u64) {
        let (r0, r1, s1) = (self.r0, self.r1, self.s1);
        let (mut h0, mut h1, mut h2) = (self.h0, self.h1, self.h2);
        for m in data.chunks_exact(16) {
            // h += m
            let (t0, c0) = h0.overflowing_add(le64(&m[0..8]));
            let (t1, c1) = h1.overflowing_add(le64(&m[8..16]));
            let (t1, c2) = t1.overflowing_add(u64::from(c0));
            h0 = t0;
            h1 = t1;
            h2 += u64::from(c1) + u64::from(c2) + pad_bit;

            // h *= r, partly reduced: h2 stays tiny (≤ 7), so h2·s1 and
            // h2·r0 fit in 64 bits and d0, d1 in 128.
            let d0 = u128::from(h0) * u128::from(r0) + u128::from(h1) * u128::from(s1);
            let mut d1 = u128::from(h0) * u128::from(r1)
                + u128::from(h1) * u128::from(r0)
                + u128::from(h2 * s1);
            h2 *= r0;
            h0 = d0 as u64;
            d1 += d0 >> 64;
            h1 = d1 as u64;
            h2 += (d1 >> 64) as u64;

            // Fold the bits at 2^130 and above back in: 2^130 ≡ 5.
            let carry = (h2 >> 2) + (h2 & !3);
            h2 &= 3;
            let (t0, c0) = h0.overflowing_add(carry);
            let (t1, c1) = h1.overflowing_add(u64::from(c0));
            h0 = t0;
            h1 = t1;
            h2 += u64::from(c1);
        }
        self.h0 = h0;
        self.h1 = h1;
        self.h2 = h2;
    }

    /// `(h mod p + s) mod 2^128`, little endian.
    fn finish(self) -> [u8; 16] {
        // h + 5 reaches 2^130 exactly when h ≥ p; then h − p is its low
        // 130 bits. Select without branching.
        let (g0, c0) = self.h0.overflowing_add(5);
        let (g1, c1) = self.h1.overflowing_add(u64::from(c0));
        let g2 = self.h2 + u64::from(c1);
        let take_g = 0u64.wrapping_sub(g2 >> 2);
        let h0 = (self.h0 & !take_g) | (g0 & take_g);
        let h1 = (self.h1 & !take_g) | (g1 & take_g);

        let (t0, c0) = h0.overflowing_add(self.s[0]);
        let t1 = h1.wrapping_add(self.s[1]).wrapping_add(u64::from(c0));
        let mut tag = [0; 16];
        tag[..8].copy_from_slice(&t0.to_le_bytes());
        tag[8..].copy_from_slice(&t1.to_le_bytes());
        tag
    }
}

#[cfg(test)]
mod tests;
