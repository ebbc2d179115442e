//! The arithmetic of [`super::TokenToImageAttention`] for one part of a prompt's image tokens,
//! free of tract: a tile of image tokens at a time, their keys with the positional encoding
//! added, the logits of every query row against them (a product on our f32 kernel), an online
//! softmax (running maximum and sum per query row, earlier sums rescaled when the maximum grows)
//! and the weighted sum of the tile's keys added to the part's accumulator. [`finish`] combines
//! the parts' running sums into the softmax-weighted sums.
//!
//! With [`Part::integer`] set (the INT8 decoder quantized at load) both products run in
//! integers on the W8A16 kernels (see [`super::super::w8a16`]): the logits with the query rows
//! at 12 bits per row (quantized once per prompt by the caller) and the tile's keys + pe at the
//! bits the sum over their depth allows (12 for 256 channels) per image token; the weighted sum
//! with the tile's values at 12 bits per channel (quantized per tile, as they change with the
//! tile) and the softmax weights at 15 bits per query row. The softmax stays in f32.
//!
//! One generic body, compiled three times: with AVX-512F, with AVX2 + FMA (x86_64, chosen at
//! run time) and plainly (NEON on aarch64).
#![allow(unsafe_code)]

use super::super::fastmath::{exp_fused, lane_max, lane_sum};
use super::super::gemm::{block_scratch, product, Micro, PackedWeights};
#[cfg(target_arch = "x86_64")]
use super::super::gemm::{Avx2, Avx512};
use super::super::transpose::transpose;
use super::super::w8a16::{self, A16Rows, W8A16Kernel, W8Weights};

/// Image tokens per tile.
pub(crate) const TILE: usize = 64;
/// Image tokens per part (one task). A fixed split, so that the result does not depend on how
/// many threads run the parts.
pub(crate) const PART: usize = 512;
/// The most rows per product block of any kernel (scratch is sized for it).
const MAX_ROWS: usize = 8;

/// Values in one part's running state for `rows` query rows of width `dim`: the running
/// maximum and sum per row, then the `rows × dim` accumulated weighted sums.
pub(crate) fn state_len(rows: usize, dim: usize) -> Option<usize> {
    dim.checked_add(2)?.checked_mul(rows)
}

/// One part: `queries` the prompt's query rows (already scaled) transposed and packed
/// (`D × R`), `keys` the part's image tokens (`[n, D]`, `n` a multiple of [`TILE`]), `key_pe`
/// the positional encoding of the same tokens (added to the keys for the logits only) if any,
/// and `values` what the weights sum (`[n, D]`: the keys themselves in SAM's later blocks).
pub(crate) struct Part<'a> {
    pub(crate) queries: &'a PackedWeights,
    pub(crate) keys: &'a [f32],
    pub(crate) key_pe: Option<&'a [f32]>,
    pub(crate) values: &'a [f32],
    /// When set, both products run in integers on this kernel, with these query rows (the
    /// same as `queries`, `D × R`, at 12 bits per row).
    pub(crate) integer: Option<(W8A16Kernel, &'a W8Weights)>,
}

/// Per-task buffers: a tile's keys with the positional encoding, its logits and weights, its
/// keys packed, the tile's weighted sum and a product block; for the integer products the
/// tile's keys + pe and weights as 16-bit rows and its values quantized per channel.
pub(crate) struct Scratch {
    keys_pe: Vec<f32>,
    scores: Vec<f32>,
    weights: Vec<f32>,
    tile_keys: PackedWeights,
    mixed: Vec<f32>,
    block: Vec<f32>,
    key_rows: A16Rows,
    weight_rows: A16Rows,
    tile_values: W8Weights,
}

impl Scratch {
    /// Buffers for `rows` query rows of width `dim`; `None` if `dim` is 0.
    pub(crate) fn new(rows: usize, dim: usize) -> Option<Scratch> {
        Some(Scratch {
            keys_pe: vec![0f32; TILE * dim],
            scores: vec![0f32; TILE * rows],
            weights: vec![0f32; rows * TILE],
            tile_keys: PackedWeights::pack(&vec![0f32; TILE * dim], TILE, dim)?,
            mixed: vec![0f32; rows * dim],
            block: block_scratch(dim.max(TILE), MAX_ROWS),
            key_rows: A16Rows::new(),
            weight_rows: A16Rows::new(),
            tile_values: W8Weights::quantize(&vec![0f32; TILE * dim], TILE, dim)?,
        })
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn part_avx512(
    m: Avx512,
    job: &Part<'_>,
    state: &mut [f32],
    s: &mut Scratch,
) -> Option<()> {
    part::<true, _>(m, job, state, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn part_avx2(
    m: Avx2,
    job: &Part<'_>,
    state: &mut [f32],
    s: &mut Scratch,
) -> Option<()> {
    part::<true, _>(m, job, state, s)
}

pub(crate) fn part_portable(job: &Part<'_>, state: &mut [f32], s: &mut Scratch) -> Option<()> {
    #[cfg(target_arch = "aarch64")]
    return part::<true, _>(super::super::gemm::Neon, job, state, s);
    #[cfg(not(target_arch = "aarch64"))]
    part::<false, _>(super::super::gemm::Scalar, job, state, s)
}

/// Run the part's tiles into `state` (see [`state_len`]); `None` if the sizes do not fit.
#[inline(always)]
fn part<const FMA: bool, M: Micro>(
    m: M,
    job: &Part<'_>,
    state: &mut [f32],
    scratch: &mut Scratch,
) -> Option<()> {
    let (d, r) = (job.queries.k(), job.queries.n());
    let n = job.keys.len();
    if state.len() != state_len(r, d)?
        || job.key_pe.is_some_and(|pe| pe.len() != n)
        || job.values.len() != n
        || !n.is_multiple_of(TILE * d)
        || job
            .integer
            .is_some_and(|(kernel, q)| (q.k(), q.n()) != (d, r) || !kernel.is_supported())
    {
        return None;
    }
    let (max, rest) = state.split_at_mut(r);
    let (sum, acc) = rest.split_at_mut(r);
    max.fill(f32::NEG_INFINITY);
    sum.fill(0.0);
    acc.fill(0.0);
    let Scratch {
        keys_pe,
        scores,
        weights,
        tile_keys,
        mixed,
        block,
        key_rows,
        weight_rows,
        tile_values,
    } = scratch;
    for (t, (keys, values)) in job
        .keys
        .chunks_exact(TILE * d)
        .zip(job.values.chunks_exact(TILE * d))
        .enumerate()
    {
        // Logits: the tile's tokens as rows, one column per query row.
        let rows: &[f32] = match job.key_pe {
            Some(pe) => {
                let pe = &pe[t * TILE * d..(t + 1) * TILE * d];
                for ((x, &k), &p) in keys_pe.iter_mut().zip(keys).zip(pe) {
                    *x = k + p;
                }
                keys_pe
            }
            None => keys,
        };
        match job.integer {
            Some((kernel, queries)) => w8a16::multiply(kernel, rows, queries, key_rows, scores),
            None => product(m, rows, job.queries, scores, block),
        }
        // One row of TILE logits per query row: the maxima, exponentials and sums below run
        // along it (along the query rows they would not vectorise with SAM's first block's 7).
        transpose(scores, TILE, r, weights);
        for (j, row) in weights.chunks_exact_mut(TILE).enumerate() {
            let tile_max = lane_max(row);
            if tile_max > max[j] {
                // Where a query row's maximum grows, rescale what it has summed so far. A first
                // maximum (-inf before) gives e^-87: the sums it scales are still 0.
                let scale = exp_fused::<FMA>(max[j] - tile_max);
                max[j] = tile_max;
                sum[j] *= scale;
                for a in &mut acc[j * d..(j + 1) * d] {
                    *a *= scale;
                }
            }
            let mx = max[j];
            for x in row.iter_mut() {
                *x = exp_fused::<FMA>(*x - mx);
            }
            sum[j] += lane_sum(row, |x| x);
        }
        // Weighted sum of the tile's values: the weights as rows (one per query row).
        match job.integer {
            Some((kernel, _)) => {
                tile_values.requantize(values, TILE, d, super::VALUE_LEVELS)?;
                w8a16::multiply(kernel, weights, tile_values, weight_rows, mixed);
            }
            None => {
                tile_keys.repack(values, TILE, d)?;
                product(m, weights, tile_keys, mixed, block);
            }
        }
        for (a, &x) in acc.iter_mut().zip(mixed.iter()) {
            *a += x;
        }
    }
    Some(())
}

/// `out` (`R × D`) = the softmax-weighted sums of the keys: the parts' running states
/// (consecutive, [`state_len`] values each) rescaled to their common maximum, summed and
/// divided by the summed weights.
pub(crate) fn finish(states: &[f32], rows: usize, dim: usize, out: &mut [f32]) -> Option<()> {
    let len = state_len(rows, dim)?;
    if len == 0 || !states.len().is_multiple_of(len) || out.len() != rows.checked_mul(dim)? {
        return None;
    }
    for (j, row) in out.chunks_exact_mut(dim).enumerate() {
        let top = states
            .chunks_exact(len)
            .map(|s| s[j])
            .fold(f32::NEG_INFINITY, f32::max);
        row.fill(0.0);
        let mut total = 0f32;
        for state in states.chunks_exact(len) {
            let scale = (state[j] - top).exp();
            total += scale * state[rows + j];
            let at = 2 * rows + j * dim;
            for (o, &a) in row.iter_mut().zip(&state[at..at + dim]) {
                *o += scale * a;
            }
        }
        let recip = 1.0 / total;
        for o in row {
            *o *= recip;
        }
    }
    Some(())
}
