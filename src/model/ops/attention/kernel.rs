//! The arithmetic of [`super::WindowAttention`] for one (window, head) pair, free of tract (so
//! that `benches/pi5_mca.py` compiles it alone for the Cortex-A76 cycle model): gather kᵀ and v
//! into cache, then per block of [`ROWS`] query rows (read where they are) the scores
//! ([`LANES`] keys at a time, in registers), the softmax and the weighted sum of v rows.
//!
//! One generic body, compiled three times: with AVX-512F, with AVX2 + FMA (x86_64, chosen at
//! run time) and plainly (NEON with fused multiply-adds on aarch64). The AVX-512 form computes
//! its scores two key chunks at a time with intrinsics (12 accumulators: written generically,
//! the compiler spilled them, 4x slower) and its weighted sums 16 lanes wide.
#![allow(unsafe_code)]

use super::super::fastmath::{exp_fused, madd};
use super::super::transpose::transpose_strided;

/// Query rows per block: 4 (6 with AVX-512's 32 vector registers: more chains, no spills).
pub(crate) const ROWS: usize = 4;
/// The most query rows per block of any compiled form (scratch is sized for it).
const MAX_ROWS: usize = 8;
/// Key columns per vector chunk.
pub(crate) const LANES: usize = 16;

/// Per-task buffers: a zero row (the padding query rows read it), kᵀ (column-padded, scaled),
/// v and one block of scores.
pub(crate) struct Scratch {
    zero_row: Vec<f32>,
    kt: Vec<f32>,
    v: Vec<f32>,
    p: Vec<f32>,
}

impl Scratch {
    pub(crate) fn new(tokens: usize, dim: usize) -> Scratch {
        let cols = tokens.div_ceil(LANES) * LANES;
        Scratch {
            zero_row: vec![0.0; dim],
            kt: vec![0.0; dim * cols],
            v: vec![0.0; tokens * dim],
            p: vec![0.0; MAX_ROWS * cols],
        }
    }
}

/// Geometry of one head's work, shared by the compiled forms.
pub(crate) struct Head<'a> {
    /// The window's qkv values, `tokens` rows of `stride`.
    pub(crate) input: &'a [f32],
    pub(crate) stride: usize,
    pub(crate) q_at: usize,
    pub(crate) k_at: usize,
    pub(crate) v_at: usize,
    pub(crate) tokens: usize,
    pub(crate) dim: usize,
    pub(crate) scale: f32,
    pub(crate) bias: Option<&'a [f32]>,
    /// The window's output, `tokens` rows of `out_stride`, this head's values at `out_at`.
    pub(crate) out_stride: usize,
    pub(crate) out_at: usize,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn head_avx512(head: &Head<'_>, out: &mut [f32], scratch: &mut Scratch) {
    attend::<true, 6, true>(head, out, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn head_avx2(head: &Head<'_>, out: &mut [f32], scratch: &mut Scratch) {
    attend::<true, ROWS, false>(head, out, scratch)
}

pub(crate) fn head_portable(head: &Head<'_>, out: &mut [f32], scratch: &mut Scratch) {
    // aarch64 always has fused multiply-add (NEON `fmla`); elsewhere it would be a libm call.
    attend::<{ cfg!(target_arch = "aarch64") }, ROWS, false>(head, out, scratch)
}

/// The kernel, written so that the compiler vectorises it for whichever target features the
/// calling function enables: fixed-size inner loops over [`LANES`] key columns and [`ROWS`]
/// query rows, accumulators in registers.
#[inline(always)]
pub(crate) fn attend<const FMA: bool, const R: usize, const WIDE: bool>(
    head: &Head<'_>,
    out: &mut [f32],
    scratch: &mut Scratch,
) {
    let (n, d) = (head.tokens, head.dim);
    let rows = n.div_ceil(R) * R;
    let cols = n.div_ceil(LANES) * LANES;
    let Scratch { zero_row, kt, v, p } = scratch;
    // Gather this head's kᵀ · scale and v. kᵀ per chunk of LANES keys as [d][LANES], so that
    // the score loop reads it in order; padding keys stay zero. q is read where it is, one
    // value of R rows at a time (a broadcast each); padding rows read zeros.
    // Each chunk is written in order, a depth's LANES keys at a time: the keys' rows (LANES
    // of them) stay in cache while they are read across. (Written key by key, each value went
    // to another cache line of kᵀ: 14 % of the AVX2 kernel's samples, on one store.)
    kt[..cols * d].fill(0.0);
    for t in 0..n {
        let row = &head.input[t * head.stride..(t + 1) * head.stride];
        v[t * d..(t + 1) * d].copy_from_slice(&row[head.v_at..head.v_at + d]);
    }
    for (c, chunk) in kt[..cols * d].chunks_exact_mut(d * LANES).enumerate() {
        let t0 = c * LANES;
        let keys = LANES.min(n - t0);
        if keys == LANES {
            // A whole chunk: its keys' rows transposed in registers, then scaled (the same
            // product per value as below).
            let at = t0 * head.stride + head.k_at;
            transpose_strided(head.input, (LANES, d), head.stride, at, chunk);
            for x in chunk.iter_mut() {
                *x *= head.scale;
            }
            continue;
        }
        let rows: [&[f32]; LANES] = std::array::from_fn(|l| {
            if l < keys {
                let at = (t0 + l) * head.stride + head.k_at;
                &head.input[at..at + d]
            } else {
                zero_row.as_slice()
            }
        });
        for (dd, lanes) in chunk.chunks_exact_mut(LANES).enumerate() {
            for (x, row) in lanes.iter_mut().zip(&rows) {
                // SAFETY: `dd < d`, and every row holds d values (the zero row too).
                *x = unsafe { *row.get_unchecked(dd) } * head.scale;
            }
        }
    }
    let zeros = &zero_row[..d];
    for block in 0..rows / R {
        let r0 = block * R;
        let qrows: [&[f32]; R] = std::array::from_fn(|r| {
            let t = r0 + r;
            if t < n {
                let at = t * head.stride + head.q_at;
                &head.input[at..at + d]
            } else {
                zeros
            }
        });
        // Scores of R query rows against every key, LANES keys at a time; with AVX-512 two
        // chunks at once in registers (2·R accumulator chains hide the multiply-add latency,
        // and each q value is broadcast once for both).
        // Chunks done two at a time (none outside AVX-512).
        let chunk = if WIDE && R == 6 {
            #[cfg(target_arch = "x86_64")]
            {
                let pairs = cols / LANES / 2;
                // SAFETY: WIDE is only compiled into `head_avx512` (AVX-512F and FMA present);
                // kt holds `chunks` chunks of d × LANES, p holds R rows of `cols`, every q row
                // d values.
                unsafe { score_pairs_avx512(&qrows, &kt[..cols * d], d, pairs, p, cols) };
                2 * pairs
            }
            #[cfg(not(target_arch = "x86_64"))]
            0
        } else {
            0
        };
        for (chunk, kchunk) in kt[chunk * d * LANES..cols * d]
            .chunks_exact(d * LANES)
            .enumerate()
            .map(|(i, k)| (chunk + i, k))
        {
            let mut acc = [[0f32; LANES]; R];
            for (dd, k) in kchunk.chunks_exact(LANES).enumerate() {
                for (acc, qrow) in acc.iter_mut().zip(&qrows) {
                    // SAFETY: `dd < d` (kchunk holds d chunks) and every row holds d values.
                    let qv = unsafe { *qrow.get_unchecked(dd) };
                    for (a, &kv) in acc.iter_mut().zip(k) {
                        *a = madd::<FMA>(qv, kv, *a);
                    }
                }
            }
            let c0 = chunk * LANES;
            for (r, acc) in acc.iter().enumerate() {
                p[r * cols + c0..r * cols + c0 + LANES].copy_from_slice(acc);
            }
        }
        let valid = R.min(n - r0);
        let mut recips = [0f32; R];
        for (r, recip) in recips.iter_mut().enumerate().take(valid) {
            let i = r0 + r;
            let s = &mut p[r * cols..r * cols + n];
            if let Some(bias) = head.bias {
                for (s, &b) in s.iter_mut().zip(&bias[i * n..(i + 1) * n]) {
                    *s += b;
                }
            }
            *recip = softmax_unnormalised::<FMA>(s);
        }
        // o_i = Σ_j p_ij v_j / Σ_j p_ij. With AVX-512 and 32-value heads (TinyViT's), the
        // block's 6 rows at once, sharing each v row's loads, in registers.
        #[cfg(target_arch = "x86_64")]
        if WIDE && R == 6 && d == 32 {
            // SAFETY: WIDE is only compiled into `head_avx512` (AVX-512F and FMA present); p
            // holds 6 rows of `cols ≥ n` scores, v holds n rows of 32 values.
            let sums = unsafe { weighted_block_avx512(&p[..5 * cols + n], cols, &v[..n * 32], n) };
            for (rr, (&recip, sum)) in recips.iter().zip(&sums).enumerate().take(valid) {
                let o = &mut out[(r0 + rr) * head.out_stride + head.out_at..][..d];
                for (o, &x) in o.iter_mut().zip(sum) {
                    *o = x * recip;
                }
            }
            continue;
        }
        // With 32-value heads (TinyViT's) on AVX2 or NEON, two rows at a time in registers:
        // 8 (AVX2) or 16 (NEON) independent chains, where one row alone has 4, half of what
        // keeps two FMA pipes busy. `FMA && !WIDE` is `head_avx2` on x86_64 (`head_portable`
        // has FMA there only on aarch64) and `head_portable` on aarch64.
        #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
        if FMA && !WIDE && R.is_multiple_of(2) && d == 32 {
            for pair in 0..valid.div_ceil(2) {
                let rr = 2 * pair;
                // SAFETY: AVX2 and FMA are present on x86_64 (see above); p holds R ≥ rr + 2
                // rows of `cols ≥ n` scores, v holds n rows of 32 values.
                let sums = unsafe {
                    weighted_pair(&p[rr * cols..(rr + 1) * cols + n], cols, &v[..n * 32], n)
                };
                for (r, sum) in sums.iter().enumerate().take(valid - rr) {
                    let o = &mut out[(r0 + rr + r) * head.out_stride + head.out_at..][..d];
                    for (o, &x) in o.iter_mut().zip(sum) {
                        *o = x * recips[rr + r];
                    }
                }
            }
            continue;
        }
        // Elsewhere one row at a time. (Blocks of rows sharing each v row ran 3x slower
        // written generically: the compiler kept their accumulators in memory.)
        for (rr, &recip) in recips.iter().enumerate().take(valid) {
            let o = &mut out[(r0 + rr) * head.out_stride + head.out_at..][..d];
            weighted_rows::<FMA, WIDE>(&p[rr * cols..rr * cols + n], v, d, recip, o);
        }
    }
}

/// `s ← exp(s − max s)`; returns `1 / Σ s`.
#[inline(always)]
fn softmax_unnormalised<const FMA: bool>(s: &mut [f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let mut chunks = s.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            m[l] = if c[l] > m[l] { c[l] } else { m[l] };
        }
    }
    let mut max = m.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &x in chunks.remainder() {
        max = max.max(x);
    }
    // 16 at a time: four NEON vectors (one AVX-512 vector) of independent exp chains per
    // iteration, which the out-of-order core overlaps (one vector's chain is ~17 dependent ops).
    let mut chunks = s.chunks_exact_mut(16);
    for c in &mut chunks {
        for x in c.iter_mut() {
            *x = exp_fused::<FMA>(*x - max);
        }
    }
    for x in chunks.into_remainder() {
        *x = exp_fused::<FMA>(*x - max);
    }
    let mut sums = [0f32; 8];
    let mut chunks = s.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            sums[l] += c[l];
        }
    }
    let sum = sums.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>();
    1.0 / sum
}

/// `o = recip · Σ_j w_j v_j` over the rows of `v` (`w.len()` rows of `d`); `WIDE`: 16-lane
/// vectors (AVX-512) where `d` is a multiple of 16.
#[inline(always)]
fn weighted_rows<const FMA: bool, const WIDE: bool>(
    w: &[f32],
    v: &[f32],
    d: usize,
    recip: f32,
    o: &mut [f32],
) {
    match d {
        16 if WIDE => weighted_rows_const::<FMA, 16, 16>(w, v, recip, o),
        32 if WIDE => weighted_rows_const::<FMA, 32, 16>(w, v, recip, o),
        48 if WIDE => weighted_rows_const::<FMA, 48, 16>(w, v, recip, o),
        64 if WIDE => weighted_rows_const::<FMA, 64, 16>(w, v, recip, o),
        16 => weighted_rows_const::<FMA, 16, 8>(w, v, recip, o),
        24 => weighted_rows_const::<FMA, 24, 8>(w, v, recip, o),
        32 => weighted_rows_const::<FMA, 32, 8>(w, v, recip, o),
        48 => weighted_rows_const::<FMA, 48, 8>(w, v, recip, o),
        64 => weighted_rows_const::<FMA, 64, 8>(w, v, recip, o),
        _ => {
            o.fill(0.0);
            for (&wj, vj) in w.iter().zip(v.chunks_exact(d)) {
                for (o, &x) in o.iter_mut().zip(vj) {
                    *o = madd::<FMA>(wj, x, *o);
                }
            }
            for o in o.iter_mut() {
                *o *= recip;
            }
        }
    }
}

#[inline(always)]
fn weighted_rows_const<const FMA: bool, const D: usize, const L: usize>(
    w: &[f32],
    v: &[f32],
    recip: f32,
    o: &mut [f32],
) {
    // One vector of L output values at a time, with two partial sums (even and odd rows of
    // v): independent FMA chains on fixed-size arrays, which the compiler keeps in registers.
    // (With the whole D-wide row as two arrays, or runs of a run-time length, it kept them on
    // the stack: a store and a reload per multiply-add, 40 % of the attention's time.)
    let rows = w.len().min(v.len() / D);
    let lane = |j: usize, c: usize| -> &[f32; L] {
        <&[f32; L]>::try_from(&v[j * D + c * L..j * D + (c + 1) * L]).unwrap_or(&[0.0; L])
    };
    for (c, o) in o[..D].chunks_exact_mut(L).enumerate() {
        let (mut even, mut odd) = ([0f32; L], [0f32; L]);
        let mut j = 0;
        while j + 1 < rows {
            let (va, vb) = (lane(j, c), lane(j + 1, c));
            let (wa, wb) = (w[j], w[j + 1]);
            for l in 0..L {
                even[l] = madd::<FMA>(wa, va[l], even[l]);
                odd[l] = madd::<FMA>(wb, vb[l], odd[l]);
            }
            j += 2;
        }
        if j < rows {
            let va = lane(j, c);
            for l in 0..L {
                even[l] = madd::<FMA>(w[j], va[l], even[l]);
            }
        }
        for l in 0..L {
            o[l] = (even[l] + odd[l]) * recip;
        }
    }
}

/// Scores of 6 query rows (`qrows`, d values each) against chunk pairs `0 .. pairs` of `kt`
/// (per chunk [d][LANES]), into rows of `p` (`cols` apart): 12 accumulators in registers.
///
/// # Safety
/// AVX-512F and FMA present; `kt` holds `2 · pairs` chunks of `d × LANES`; `p` holds 6 rows of
/// `cols ≥ 2 · pairs · LANES`; `qrows` has at least 6 rows of at least `d` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn score_pairs_avx512<const R: usize>(
    qrows: &[&[f32]; R],
    kt: &[f32],
    d: usize,
    pairs: usize,
    p: &mut [f32],
    cols: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(
        R == 6 && kt.len() >= 2 * pairs * d * LANES && p.len() >= 5 * cols + 2 * pairs * LANES
    );
    let q: [*const f32; 6] = std::array::from_fn(|r| qrows[r].as_ptr());
    for pair in 0..pairs {
        // SAFETY (all reads and writes): inside the slices, per the contract above.
        unsafe {
            let ka = kt.as_ptr().add(2 * pair * d * LANES);
            let kb = ka.add(d * LANES);
            let z = _mm512_setzero_ps();
            let (mut a0, mut a1, mut a2, mut a3, mut a4, mut a5) = (z, z, z, z, z, z);
            let (mut b0, mut b1, mut b2, mut b3, mut b4, mut b5) = (z, z, z, z, z, z);
            for dd in 0..d {
                let va = _mm512_loadu_ps(ka.add(dd * LANES));
                let vb = _mm512_loadu_ps(kb.add(dd * LANES));
                let s0 = _mm512_set1_ps(*q[0].add(dd));
                a0 = _mm512_fmadd_ps(s0, va, a0);
                b0 = _mm512_fmadd_ps(s0, vb, b0);
                let s1 = _mm512_set1_ps(*q[1].add(dd));
                a1 = _mm512_fmadd_ps(s1, va, a1);
                b1 = _mm512_fmadd_ps(s1, vb, b1);
                let s2 = _mm512_set1_ps(*q[2].add(dd));
                a2 = _mm512_fmadd_ps(s2, va, a2);
                b2 = _mm512_fmadd_ps(s2, vb, b2);
                let s3 = _mm512_set1_ps(*q[3].add(dd));
                a3 = _mm512_fmadd_ps(s3, va, a3);
                b3 = _mm512_fmadd_ps(s3, vb, b3);
                let s4 = _mm512_set1_ps(*q[4].add(dd));
                a4 = _mm512_fmadd_ps(s4, va, a4);
                b4 = _mm512_fmadd_ps(s4, vb, b4);
                let s5 = _mm512_set1_ps(*q[5].add(dd));
                a5 = _mm512_fmadd_ps(s5, va, a5);
                b5 = _mm512_fmadd_ps(s5, vb, b5);
            }
            let c0 = 2 * pair * LANES;
            let out = p.as_mut_ptr().add(c0);
            for (r, (a, b)) in [(a0, b0), (a1, b1), (a2, b2), (a3, b3), (a4, b4), (a5, b5)]
                .into_iter()
                .enumerate()
            {
                _mm512_storeu_ps(out.add(r * cols), a);
                _mm512_storeu_ps(out.add(r * cols + LANES), b);
            }
        }
    }
}

/// `Σ_j p[r][j] · v[j]` for the 6 rows `r` of `p` (`cols` apart) over the `n` rows of `v` (32
/// values each): 12 accumulators in registers, each v row loaded once for all six.
///
/// # Safety
/// AVX-512F and FMA present; `p` holds at least `5 · cols + n` values, `v` at least `32 · n`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn weighted_block_avx512(p: &[f32], cols: usize, v: &[f32], n: usize) -> [[f32; 32]; 6] {
    use std::arch::x86_64::*;
    debug_assert!(p.len() >= 5 * cols + n && v.len() >= 32 * n);
    let z = _mm512_setzero_ps();
    let (mut a0, mut a1, mut a2, mut a3, mut a4, mut a5) = (z, z, z, z, z, z);
    let (mut b0, mut b1, mut b2, mut b3, mut b4, mut b5) = (z, z, z, z, z, z);
    let (pp, vp) = (p.as_ptr(), v.as_ptr());
    for j in 0..n {
        // SAFETY (all reads): j < n and r < 6, inside `p` and `v` per the contract.
        unsafe {
            let lo = _mm512_loadu_ps(vp.add(32 * j));
            let hi = _mm512_loadu_ps(vp.add(32 * j + 16));
            let w = _mm512_set1_ps(*pp.add(j));
            a0 = _mm512_fmadd_ps(w, lo, a0);
            b0 = _mm512_fmadd_ps(w, hi, b0);
            let w = _mm512_set1_ps(*pp.add(cols + j));
            a1 = _mm512_fmadd_ps(w, lo, a1);
            b1 = _mm512_fmadd_ps(w, hi, b1);
            let w = _mm512_set1_ps(*pp.add(2 * cols + j));
            a2 = _mm512_fmadd_ps(w, lo, a2);
            b2 = _mm512_fmadd_ps(w, hi, b2);
            let w = _mm512_set1_ps(*pp.add(3 * cols + j));
            a3 = _mm512_fmadd_ps(w, lo, a3);
            b3 = _mm512_fmadd_ps(w, hi, b3);
            let w = _mm512_set1_ps(*pp.add(4 * cols + j));
            a4 = _mm512_fmadd_ps(w, lo, a4);
            b4 = _mm512_fmadd_ps(w, hi, b4);
            let w = _mm512_set1_ps(*pp.add(5 * cols + j));
            a5 = _mm512_fmadd_ps(w, lo, a5);
            b5 = _mm512_fmadd_ps(w, hi, b5);
        }
    }
    let mut sums = [[0f32; 32]; 6];
    for (sum, (a, b)) in
        sums.iter_mut()
            .zip([(a0, b0), (a1, b1), (a2, b2), (a3, b3), (a4, b4), (a5, b5)])
    {
        // SAFETY: each row holds 32 values.
        unsafe {
            _mm512_storeu_ps(sum.as_mut_ptr(), a);
            _mm512_storeu_ps(sum.as_mut_ptr().add(16), b);
        }
    }
    sums
}

/// `Σ_j p[r][j] · v[j]` for the 2 rows `r` of `p` (`cols` apart) over the `n` rows of `v` (32
/// values each): 8 accumulators in registers, each v row loaded once for both.
///
/// # Safety
/// AVX2 and FMA present; `p` holds at least `cols + n` values, `v` at least `32 · n`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weighted_pair(p: &[f32], cols: usize, v: &[f32], n: usize) -> [[f32; 32]; 2] {
    use std::arch::x86_64::*;
    debug_assert!(p.len() >= cols + n && v.len() >= 32 * n);
    let z = _mm256_setzero_ps();
    let (mut a0, mut a1, mut a2, mut a3) = (z, z, z, z);
    let (mut b0, mut b1, mut b2, mut b3) = (z, z, z, z);
    let (pp, vp) = (p.as_ptr(), v.as_ptr());
    for j in 0..n {
        // SAFETY (all reads): j < n, inside `p` and `v` per the contract.
        unsafe {
            let row = vp.add(32 * j);
            let (v0, v1) = (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8)));
            let (v2, v3) = (_mm256_loadu_ps(row.add(16)), _mm256_loadu_ps(row.add(24)));
            let w = _mm256_broadcast_ss(&*pp.add(j));
            a0 = _mm256_fmadd_ps(w, v0, a0);
            a1 = _mm256_fmadd_ps(w, v1, a1);
            a2 = _mm256_fmadd_ps(w, v2, a2);
            a3 = _mm256_fmadd_ps(w, v3, a3);
            let w = _mm256_broadcast_ss(&*pp.add(cols + j));
            b0 = _mm256_fmadd_ps(w, v0, b0);
            b1 = _mm256_fmadd_ps(w, v1, b1);
            b2 = _mm256_fmadd_ps(w, v2, b2);
            b3 = _mm256_fmadd_ps(w, v3, b3);
        }
    }
    let mut sums = [[0f32; 32]; 2];
    for (sum, acc) in sums.iter_mut().zip([[a0, a1, a2, a3], [b0, b1, b2, b3]]) {
        for (c, a) in acc.into_iter().enumerate() {
            // SAFETY: each row holds 32 values, c < 4.
            unsafe { _mm256_storeu_ps(sum.as_mut_ptr().add(8 * c), a) };
        }
    }
    sums
}

/// `Σ_j p[r][j] · v[j]` for the 2 rows `r` of `p` (`cols` apart) over the `n` rows of `v` (32
/// values each): 16 accumulators in registers (of NEON's 32), each v row loaded once for both.
///
/// # Safety
/// `p` holds at least `cols + n` values, `v` at least `32 · n`.
#[cfg(target_arch = "aarch64")]
unsafe fn weighted_pair(p: &[f32], cols: usize, v: &[f32], n: usize) -> [[f32; 32]; 2] {
    use std::arch::aarch64::*;
    debug_assert!(p.len() >= cols + n && v.len() >= 32 * n);
    let (pp, vp) = (p.as_ptr(), v.as_ptr());
    // SAFETY (all reads and writes): j < n, inside `p` and `v` per the contract; each sum row
    // holds 32 values.
    unsafe {
        let z = vdupq_n_f32(0.0);
        let mut a = [z; 8];
        let mut b = [z; 8];
        for j in 0..n {
            let row = vp.add(32 * j);
            let vr: [float32x4_t; 8] = std::array::from_fn(|c| vld1q_f32(row.add(4 * c)));
            let (wa, wb) = (*pp.add(j), *pp.add(cols + j));
            for c in 0..8 {
                a[c] = vfmaq_n_f32(a[c], vr[c], wa);
                b[c] = vfmaq_n_f32(b[c], vr[c], wb);
            }
        }
        let mut sums = [[0f32; 32]; 2];
        for (sum, acc) in sums.iter_mut().zip([a, b]) {
            for (c, x) in acc.into_iter().enumerate() {
                vst1q_f32(sum.as_mut_ptr().add(4 * c), x);
            }
        }
        sums
    }
}
