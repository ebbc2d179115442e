//! The arithmetic of [`super::WindowAttention`] for one (window, head) pair, free of tract (so
//! that `benches/pi5_mca.py` compiles it alone for the Cortex-A76 cycle model): gather q, kᵀ and
//! v into cache, then per block of [`ROWS`] query rows the scores ([`LANES`] keys at a time, in
//! registers), the softmax and the weighted sum of v rows.
//!
//! One generic body, compiled three times: with AVX-512F, with AVX2 + FMA (x86_64, chosen at
//! run time) and plainly (NEON with fused multiply-adds on aarch64).
#![allow(unsafe_code)]

use super::super::fastmath::{exp_fused, madd};

/// Query rows per block: 4 (6 with AVX-512's 32 vector registers: more chains, no spills).
pub(crate) const ROWS: usize = 4;
/// The most query rows per block of any compiled form (scratch is sized for it).
const MAX_ROWS: usize = 8;
/// Key columns per vector chunk.
pub(crate) const LANES: usize = 16;

/// Per-task buffers: q (row-padded), kᵀ (column-padded, scaled) and one block of scores.
pub(crate) struct Scratch {
    q: Vec<f32>,
    kt: Vec<f32>,
    v: Vec<f32>,
    p: Vec<f32>,
}

impl Scratch {
    pub(crate) fn new(tokens: usize, dim: usize) -> Scratch {
        // Rows padded to a multiple of any block height up to MAX_ROWS.
        let rows = tokens + MAX_ROWS;
        let cols = tokens.div_ceil(LANES) * LANES;
        Scratch {
            q: vec![0.0; rows * dim],
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
    attend::<true, 6>(head, out, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn head_avx2(head: &Head<'_>, out: &mut [f32], scratch: &mut Scratch) {
    attend::<true, ROWS>(head, out, scratch)
}

pub(crate) fn head_portable(head: &Head<'_>, out: &mut [f32], scratch: &mut Scratch) {
    // aarch64 always has fused multiply-add (NEON `fmla`); elsewhere it would be a libm call.
    attend::<{ cfg!(target_arch = "aarch64") }, ROWS>(head, out, scratch)
}

/// The kernel, written so that the compiler vectorises it for whichever target features the
/// calling function enables: fixed-size inner loops over [`LANES`] key columns and [`ROWS`]
/// query rows, accumulators in registers.
#[inline(always)]
pub(crate) fn attend<const FMA: bool, const R: usize>(
    head: &Head<'_>,
    out: &mut [f32],
    scratch: &mut Scratch,
) {
    let (n, d) = (head.tokens, head.dim);
    let rows = n.div_ceil(R) * R;
    let cols = n.div_ceil(LANES) * LANES;
    let Scratch { q, kt, v, p } = scratch;
    // Gather this head's q, kᵀ · scale and v. Layouts for the score loop, so that it reads
    // both operands in order without index checks: q per block of R rows as [d][R], kᵀ per
    // chunk of LANES keys as [d][LANES]. Padding rows and keys stay zero.
    q[..rows * d].fill(0.0);
    kt[..cols * d].fill(0.0);
    for t in 0..n {
        let row = &head.input[t * head.stride..(t + 1) * head.stride];
        v[t * d..(t + 1) * d].copy_from_slice(&row[head.v_at..head.v_at + d]);
        let (qb, qr) = (t / R * d * R, t % R);
        for (dd, &x) in row[head.q_at..head.q_at + d].iter().enumerate() {
            q[qb + dd * R + qr] = x;
        }
        let (kc, kl) = (t / LANES * d * LANES, t % LANES);
        for (dd, &x) in row[head.k_at..head.k_at + d].iter().enumerate() {
            kt[kc + dd * LANES + kl] = x * head.scale;
        }
    }
    for (block, qblock) in q[..rows * d].chunks_exact(d * R).enumerate() {
        let r0 = block * R;
        // Scores of R query rows against every key, LANES keys at a time.
        for (chunk, kchunk) in kt[..cols * d].chunks_exact(d * LANES).enumerate() {
            let mut acc = [[0f32; LANES]; R];
            for (k, qd) in kchunk.chunks_exact(LANES).zip(qblock.chunks_exact(R)) {
                for (acc, &qv) in acc.iter_mut().zip(qd) {
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
        // o_i = Σ_j p_ij v_j / Σ_j p_ij, one row at a time. (Blocks of rows sharing each v
        // row ran 3x slower: the compiler kept their accumulators in memory.)
        for (rr, &recip) in recips.iter().enumerate().take(valid) {
            let o = &mut out[(r0 + rr) * head.out_stride + head.out_at..][..d];
            weighted_rows::<FMA>(&p[rr * cols..rr * cols + n], v, d, recip, o);
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

/// `o = recip · Σ_j w_j v_j` over the rows of `v` (`w.len()` rows of `d`).
#[inline(always)]
fn weighted_rows<const FMA: bool>(w: &[f32], v: &[f32], d: usize, recip: f32, o: &mut [f32]) {
    match d {
        16 => weighted_rows_const::<FMA, 16>(w, v, recip, o),
        24 => weighted_rows_const::<FMA, 24>(w, v, recip, o),
        32 => weighted_rows_const::<FMA, 32>(w, v, recip, o),
        48 => weighted_rows_const::<FMA, 48>(w, v, recip, o),
        64 => weighted_rows_const::<FMA, 64>(w, v, recip, o),
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
fn weighted_rows_const<const FMA: bool, const D: usize>(
    w: &[f32],
    v: &[f32],
    recip: f32,
    o: &mut [f32],
) {
    // One vector of L output values at a time, with two partial sums (even and odd rows of
    // v): independent FMA chains on fixed-size arrays, which the compiler keeps in registers.
    // (With the whole D-wide row as two arrays, or runs of a run-time length, it kept them on
    // the stack: a store and a reload per multiply-add, 40 % of the attention's time.)
    const L: usize = 8;
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
