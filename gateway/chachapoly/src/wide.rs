//! AVX-512 for the bulk of large packets only: ChaCha20 sixteen blocks
//! (1 KiB) at a time, and Poly1305 eight 16-byte blocks at a time.
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
//! Poly1305 runs eight interleaved Horner chains in radix 2^26, one block
//! per 64-bit lane (`vpmuludq`, 32×32→64-bit products, 25 per eight
//! blocks), as poly1305-donna's and OpenSSL's vector paths do: each lane
//! multiplies by r^8 per step and, at the last step, by the power that puts
//! its blocks in place (r^8 … r^1), and the lanes' sum is the scalar
//! state after those blocks. The scalar radix-2^64 code takes over from
//! there for the last few blocks. The powers of r cost about a hundred
//! scalar products per packet, so the wide path starts at 2 KiB (at 1 KiB
//! it was 10% slower than the scalar code; at 32 KiB packets it seals at
//! 2.4 GB/s against 1.95 without it).
//!
//! This is the crate's only `unsafe`: the calls into the
//! `#[target_feature]` functions after the run-time check, and the
//! unaligned 64-byte loads and stores, whose bounds come from
//! `chunks_exact`/`chunks_exact_mut`. Every output is compared with
//! `chacha20`'s, ring's and RustCrypto's `poly1305` in the tests.
#![allow(unsafe_code)]

use core::arch::x86_64::{
    __m512i, _mm512_add_epi32, _mm512_add_epi64, _mm512_and_si512, _mm512_loadu_si512,
    _mm512_mul_epu32, _mm512_or_si512, _mm512_reduce_add_epi64, _mm512_rol_epi32,
    _mm512_set1_epi32, _mm512_set1_epi64, _mm512_set_epi32, _mm512_set_epi64, _mm512_setzero_si512,
    _mm512_shuffle_i32x4, _mm512_slli_epi64, _mm512_srli_epi64, _mm512_storeu_si512,
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

/// Bytes of whole blocks below which Poly1305 stays scalar (the powers of r
/// would cost more than the wide loop saves).
pub(crate) const POLY_MIN: usize = 2048;
/// Bytes one step of the wide Poly1305 covers: eight 16-byte blocks.
pub(crate) const POLY_STEP: usize = 8 * 16;

const MASK26: u64 = (1 << 26) - 1;

/// Radix 2^26: five limbs.
type Limbs = [u64; 5];

/// `a·b mod 2^130 − 5`, limbs back below about 2^26 (the top carry folded
/// in as ·5). Inputs up to 2^27 per limb keep every sum below 2^64.
fn mul_mod(a: &Limbs, b: &Limbs) -> Limbs {
    let s: [u64; 5] = [0, b[1] * 5, b[2] * 5, b[3] * 5, b[4] * 5];
    let d = [
        a[0] * b[0] + a[1] * s[4] + a[2] * s[3] + a[3] * s[2] + a[4] * s[1],
        a[0] * b[1] + a[1] * b[0] + a[2] * s[4] + a[3] * s[3] + a[4] * s[2],
        a[0] * b[2] + a[1] * b[1] + a[2] * b[0] + a[3] * s[4] + a[4] * s[3],
        a[0] * b[3] + a[1] * b[2] + a[2] * b[1] + a[3] * b[0] + a[4] * s[4],
        a[0] * b[4] + a[1] * b[3] + a[2] * b[2] + a[3] * b[1] + a[4] * b[0],
    ];
    carry(d)
}

/// The donna carry chain: each limb to 26 bits, the top carry ·5 into the
/// bottom, one more step from limb 0 to 1.
fn carry(mut d: [u64; 5]) -> Limbs {
    for i in 0..4 {
        d[i + 1] += d[i] >> 26;
        d[i] &= MASK26;
    }
    d[0] += (d[4] >> 26) * 5;
    d[4] &= MASK26;
    d[1] += d[0] >> 26;
    d[0] &= MASK26;
    d
}

/// A 128-bit value in radix 2^64 (`lo`, `hi`; here the clamped `r`) as
/// limbs of 26 bits.
fn to_limbs(lo: u64, hi: u64) -> Limbs {
    [
        lo & MASK26,
        (lo >> 26) & MASK26,
        ((lo >> 52) | (hi << 12)) & MASK26,
        (hi >> 14) & MASK26,
        hi >> 40,
    ]
}

/// Poly1305's accumulator after the whole eight-block steps at the front
/// of `data` (full 16-byte blocks with their 2^128 bit), from zero, with
/// the clamped `r = r0 + r1·2^64`: `(bytes consumed, [h0, h1, h2])` in the
/// scalar code's radix 2^64, not fully reduced (h2 at most 4). Consumes
/// nothing (and the caller does it all) below [`POLY_MIN`] or without
/// AVX-512F.
pub(crate) fn poly1305_blocks(r0: u64, r1: u64, data: &[u8]) -> (usize, [u64; 3]) {
    let steps = data.len() / POLY_STEP;
    if data.len() < POLY_MIN || !available() {
        return (0, [0; 3]);
    }
    let r = to_limbs(r0, r1);
    let mut powers = [r; 8];
    for i in 1..8 {
        powers[i] = mul_mod(&powers[i - 1], &r);
    }
    let bulk = &data[..steps * POLY_STEP];
    // SAFETY: the CPU has AVX-512F (checked above), the only feature the
    // function is compiled for.
    let h = unsafe { poly_steps(&powers, bulk) };
    // Carried (with the top folded in), then once more without the fold so
    // limbs 0..3 are below 2^26 exactly and the shifts below do not
    // overlap; h4 keeps the few bits above 2^130's place for h2.
    let mut h = carry(h);
    for i in 0..4 {
        h[i + 1] += h[i] >> 26;
        h[i] &= MASK26;
    }
    let lo = h[0] | (h[1] << 26) | (h[2] << 52);
    let hi = (h[2] >> 12) | (h[3] << 14) | (h[4] << 40);
    (bulk.len(), [lo, hi, h[4] >> 24])
}

/// Eight chains over `data` (a whole number of eight-block steps, at least
/// one); `powers[i]` is r^(i+1). Returns the lanes' sum as limbs (each
/// below 2^30, not carried).
#[target_feature(enable = "avx512f")]
fn poly_steps(powers: &[Limbs; 8], data: &[u8]) -> Limbs {
    let mask = _mm512_set1_epi64(MASK26 as i64);
    let pad = _mm512_set1_epi64(1 << 24);
    let broadcast = |p: &Limbs| {
        let mut v = [_mm512_setzero_si512(); 5];
        for (v, &limb) in v.iter_mut().zip(p) {
            *v = _mm512_set1_epi64(limb as i64);
        }
        v
    };
    let r8 = broadcast(&powers[7]);
    // The last step's multipliers. After the unpacks below, 64-bit lane q
    // holds block [0, 4, 1, 5, 2, 6, 3, 7][q] of its step, and block j
    // needs r^(8 − j).
    let mut last = [_mm512_setzero_si512(); 5];
    for (limb, v) in last.iter_mut().enumerate() {
        let p = |j: usize| powers[7 - j][limb] as i64;
        *v = _mm512_set_epi64(p(7), p(3), p(6), p(2), p(5), p(1), p(4), p(0));
    }

    let mut h = [_mm512_setzero_si512(); 5];
    let steps = data.len() / POLY_STEP;
    for (k, step) in data.chunks_exact(POLY_STEP).enumerate() {
        // SAFETY: `step` is 128 valid bytes; loadu has no alignment
        // requirement.
        let (a, b) = unsafe {
            (
                _mm512_loadu_si512(step.as_ptr().cast::<__m512i>()),
                _mm512_loadu_si512(step[64..].as_ptr().cast::<__m512i>()),
            )
        };
        let lo = _mm512_unpacklo_epi64(a, b);
        let hi = _mm512_unpackhi_epi64(a, b);
        let m = [
            _mm512_and_si512(lo, mask),
            _mm512_and_si512(_mm512_srli_epi64::<26>(lo), mask),
            _mm512_and_si512(
                _mm512_or_si512(_mm512_srli_epi64::<52>(lo), _mm512_slli_epi64::<12>(hi)),
                mask,
            ),
            _mm512_and_si512(_mm512_srli_epi64::<14>(hi), mask),
            _mm512_or_si512(_mm512_srli_epi64::<40>(hi), pad),
        ];
        for (h, m) in h.iter_mut().zip(m) {
            *h = _mm512_add_epi64(*h, m);
        }
        let r = if k + 1 == steps { &last } else { &r8 };
        h = mul_mod_x8(&h, r);
    }
    let mut sum = [0u64; 5];
    for (s, v) in sum.iter_mut().zip(h) {
        *s = _mm512_reduce_add_epi64(v) as u64;
    }
    sum
}

/// [`mul_mod`] in each 64-bit lane.
#[target_feature(enable = "avx512f")]
fn mul_mod_x8(a: &[__m512i; 5], b: &[__m512i; 5]) -> [__m512i; 5] {
    let mask = _mm512_set1_epi64(MASK26 as i64);
    let times5 = |x: __m512i| _mm512_add_epi64(_mm512_slli_epi64::<2>(x), x);
    let s = [b[0], times5(b[1]), times5(b[2]), times5(b[3]), times5(b[4])];
    let mul = |x: __m512i, y: __m512i| _mm512_mul_epu32(x, y);
    let sum5 = |t: [__m512i; 5]| {
        _mm512_add_epi64(
            _mm512_add_epi64(_mm512_add_epi64(t[0], t[1]), _mm512_add_epi64(t[2], t[3])),
            t[4],
        )
    };
    let mut d = [
        sum5([
            mul(a[0], b[0]),
            mul(a[1], s[4]),
            mul(a[2], s[3]),
            mul(a[3], s[2]),
            mul(a[4], s[1]),
        ]),
        sum5([
            mul(a[0], b[1]),
            mul(a[1], b[0]),
            mul(a[2], s[4]),
            mul(a[3], s[3]),
            mul(a[4], s[2]),
        ]),
        sum5([
            mul(a[0], b[2]),
            mul(a[1], b[1]),
            mul(a[2], b[0]),
            mul(a[3], s[4]),
            mul(a[4], s[3]),
        ]),
        sum5([
            mul(a[0], b[3]),
            mul(a[1], b[2]),
            mul(a[2], b[1]),
            mul(a[3], b[0]),
            mul(a[4], s[4]),
        ]),
        sum5([
            mul(a[0], b[4]),
            mul(a[1], b[3]),
            mul(a[2], b[2]),
            mul(a[3], b[1]),
            mul(a[4], b[0]),
        ]),
    ];
    for i in 0..4 {
        d[i + 1] = _mm512_add_epi64(d[i + 1], _mm512_srli_epi64::<26>(d[i]));
        d[i] = _mm512_and_si512(d[i], mask);
    }
    d[0] = _mm512_add_epi64(d[0], times5(_mm512_srli_epi64::<26>(d[4])));
    d[4] = _mm512_and_si512(d[4], mask);
    d[1] = _mm512_add_epi64(d[1], _mm512_srli_epi64::<26>(d[0]));
    d[0] = _mm512_and_si512(d[0], mask);
    d
}
