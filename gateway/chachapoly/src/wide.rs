//! ChaCha20 sixteen blocks (1 KiB) at a time in AVX-512, for the bulk of
//! large packets only.
//!
//! Why our own: RustCrypto's `chacha20` has an AVX-512 backend, but it can
//! only be chosen for the whole build (`--cfg chacha20_avx512`), and it is
//! slow on short inputs (98 MB/s at 100 bytes against 481 for its AVX2
//! backend on the machine in docs/performance.md), which are most of an
//! interactive session's packets. Here the wide path runs only on whole
//! 1,024-byte chunks, when the CPU has AVX-512F (checked at run time), and
//! the rest of a packet goes through `chacha20` as before; 32 KiB packets
//! go from about 2.3 to 4.3 GB/s.
//!
//! The layout is the "vertical" one of OpenSSL's `ChaCha20_16x` and Linux's
//! `chacha-avx512vl`: register `i` holds word `i` of sixteen consecutive
//! blocks, one per 32-bit lane, so a quarter round is four vector
//! additions, xors and rotations (`vprold`), and the blocks are transposed
//! into byte order only once, at the end. Nothing branches on or indexes by
//! secret data.
//!
//! This is the crate's only `unsafe`: the call into the
//! `#[target_feature]` function after the run-time check, and the unaligned
//! 64-byte loads and stores of each block, whose bounds come from
//! `chunks_exact_mut`. Every output is compared with `chacha20`'s in the
//! tests.
#![allow(unsafe_code)]

use core::arch::x86_64::{
    __m512i, _mm512_add_epi32, _mm512_loadu_si512, _mm512_rol_epi32, _mm512_set1_epi32,
    _mm512_set_epi32, _mm512_setzero_si512, _mm512_shuffle_i32x4, _mm512_storeu_si512,
    _mm512_unpackhi_epi32, _mm512_unpackhi_epi64, _mm512_unpacklo_epi32, _mm512_unpacklo_epi64,
    _mm512_xor_si512,
};

/// The bytes one pass of the wide path covers: sixteen 64-byte blocks.
pub(crate) const CHUNK: usize = 16 * 64;

/// Whether this CPU runs the wide path (std caches the answer).
pub(crate) fn available() -> bool {
    std::is_x86_feature_detected!("avx512f")
}

/// XORs the ChaCha20 keystream (RFC 8439: 32-bit block counter, 96-bit
/// nonce) from block `counter` on into the whole 1 KiB chunks at the front
/// of `data`, and returns how many bytes that was: 0 when the CPU lacks
/// AVX-512F or `data` is shorter than a chunk, so the caller finishes (or
/// does) the rest with the portable cipher from that byte on.
pub(crate) fn xor_keystream(
    key: &[u8; 32],
    nonce: &[u8; 12],
    counter: u32,
    data: &mut [u8],
) -> usize {
    let chunks = data.len() / CHUNK;
    if chunks == 0 || !available() {
        return 0;
    }
    let mut state = [0u32; 16];
    state[..4].copy_from_slice(&[0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574]);
    for (word, bytes) in state[4..12].iter_mut().zip(key.chunks_exact(4)) {
        *word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    }
    state[12] = counter;
    for (word, bytes) in state[13..].iter_mut().zip(nonce.chunks_exact(4)) {
        *word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    }
    let bulk = &mut data[..chunks * CHUNK];
    // SAFETY: the CPU has AVX-512F (checked above), the only feature the
    // function is compiled for.
    unsafe { xor_chunks(&state, bulk) };
    chunks * CHUNK
}

macro_rules! quarter_round {
    ($x:ident, $a:literal, $b:literal, $c:literal, $d:literal) => {
        $x[$a] = _mm512_add_epi32($x[$a], $x[$b]);
        $x[$d] = _mm512_rol_epi32::<16>(_mm512_xor_si512($x[$d], $x[$a]));
        $x[$c] = _mm512_add_epi32($x[$c], $x[$d]);
        $x[$b] = _mm512_rol_epi32::<12>(_mm512_xor_si512($x[$b], $x[$c]));
        $x[$a] = _mm512_add_epi32($x[$a], $x[$b]);
        $x[$d] = _mm512_rol_epi32::<8>(_mm512_xor_si512($x[$d], $x[$a]));
        $x[$c] = _mm512_add_epi32($x[$c], $x[$d]);
        $x[$b] = _mm512_rol_epi32::<7>(_mm512_xor_si512($x[$b], $x[$c]));
    };
}

/// `data.len()` is a multiple of [`CHUNK`]; the block counter must not wrap
/// within it (an SSH packet is at most a few hundred blocks).
#[target_feature(enable = "avx512f")]
fn xor_chunks(state: &[u32; 16], data: &mut [u8]) {
    let mut input = [_mm512_setzero_si512(); 16];
    for (vector, &word) in input.iter_mut().zip(state) {
        *vector = _mm512_set1_epi32(word as i32);
    }
    // Lane j is block counter + j.
    input[12] = _mm512_add_epi32(
        input[12],
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
    );
    let sixteen = _mm512_set1_epi32(16);

    for chunk in data.chunks_exact_mut(CHUNK) {
        let mut x = input;
        for _ in 0..10 {
            quarter_round!(x, 0, 4, 8, 12);
            quarter_round!(x, 1, 5, 9, 13);
            quarter_round!(x, 2, 6, 10, 14);
            quarter_round!(x, 3, 7, 11, 15);
            quarter_round!(x, 0, 5, 10, 15);
            quarter_round!(x, 1, 6, 11, 12);
            quarter_round!(x, 2, 7, 8, 13);
            quarter_round!(x, 3, 4, 9, 14);
        }
        for (word, start) in x.iter_mut().zip(&input) {
            *word = _mm512_add_epi32(*word, *start);
        }

        // Transpose. Per quad of words 4k..4k+3, a 4×4 transpose inside
        // each 128-bit lane l gives y[k][m], whose lane l is those four
        // words of block 4l + m.
        let mut y = [[_mm512_setzero_si512(); 4]; 4];
        for (k, quad) in y.iter_mut().enumerate() {
            let (a, b, c, d) = (x[4 * k], x[4 * k + 1], x[4 * k + 2], x[4 * k + 3]);
            let t0 = _mm512_unpacklo_epi32(a, b);
            let t1 = _mm512_unpackhi_epi32(a, b);
            let t2 = _mm512_unpacklo_epi32(c, d);
            let t3 = _mm512_unpackhi_epi32(c, d);
            quad[0] = _mm512_unpacklo_epi64(t0, t2);
            quad[1] = _mm512_unpackhi_epi64(t0, t2);
            quad[2] = _mm512_unpacklo_epi64(t1, t3);
            quad[3] = _mm512_unpackhi_epi64(t1, t3);
        }
        // Then, per m, a 4×4 transpose of 128-bit lanes: block 4l + m is
        // lane l of y[0][m], y[1][m], y[2][m], y[3][m] in turn.
        #[allow(clippy::needless_range_loop)] // m indexes four arrays at once
        for m in 0..4 {
            let u0 = _mm512_shuffle_i32x4::<0x44>(y[0][m], y[1][m]);
            let u1 = _mm512_shuffle_i32x4::<0xee>(y[0][m], y[1][m]);
            let u2 = _mm512_shuffle_i32x4::<0x44>(y[2][m], y[3][m]);
            let u3 = _mm512_shuffle_i32x4::<0xee>(y[2][m], y[3][m]);
            let blocks = [
                _mm512_shuffle_i32x4::<0x88>(u0, u2),
                _mm512_shuffle_i32x4::<0xdd>(u0, u2),
                _mm512_shuffle_i32x4::<0x88>(u1, u3),
                _mm512_shuffle_i32x4::<0xdd>(u1, u3),
            ];
            for (l, keystream) in blocks.into_iter().enumerate() {
                let at = (4 * l + m) * 64;
                let block = &mut chunk[at..at + 64];
                let ptr = block.as_mut_ptr().cast::<__m512i>();
                // SAFETY: `block` is 64 valid, exclusively borrowed bytes;
                // loadu and storeu have no alignment requirement.
                unsafe {
                    let text = _mm512_loadu_si512(ptr);
                    _mm512_storeu_si512(ptr, _mm512_xor_si512(text, keystream));
                }
            }
        }
        input[12] = _mm512_add_epi32(input[12], sixteen);
    }
}
