//! The arithmetic of [`super::ImageToTokenOutput`] for one tile of image tokens of one prompt,
//! free of tract: the attention logits (given with the image tokens contiguous, as the graph
//! keeps them, or computed here from the tile's image tokens plus the positional encoding and
//! the prompt's query rows), the softmax over each head's prompt tokens, written transposed as
//! the rows of a product with the prompt's projected token values, then the bias, the residual
//! and the LayerNorm; optionally each image token's softmax weights and LayerNorm statistics too
//! (the coefficients of the mask upscaling's low-rank first product, see
//! `mask_upscaling::low_rank`).
//!
//! One generic body, compiled three times: with AVX-512F, with AVX2 + FMA (x86_64, chosen at
//! run time) and plainly (NEON on aarch64).
#![allow(unsafe_code)]

use super::super::fastmath::{exp_fused, residual_layer_norm};
use super::super::gemm::{block_scratch, product, Micro, PackedWeights};
#[cfg(target_arch = "x86_64")]
use super::super::gemm::{Avx2, Avx512};
use super::super::transpose::transpose;
use super::super::w8a16::{self, A16Rows, W8A16Kernel, W8Weights};

/// Image tokens per tile.
pub(crate) const TILE: usize = 32;
/// The most rows per product block of any kernel (scratch is sized for it).
const MAX_ROWS: usize = 8;

/// The LayerNorm after the residual: `ε`, then `γ` and `β` (`D` values each).
pub(crate) struct Norm<'a> {
    pub(crate) eps: f32,
    pub(crate) gamma: &'a [f32],
    pub(crate) beta: &'a [f32],
}

/// Where a tile's attention logits come from.
pub(crate) enum Logits<'a> {
    /// The prompt's `[H, T, P]` logits (all of them), computed by the graph; `first` is the
    /// tile's first image token.
    Given {
        all: &'a [f32],
        pixels: usize,
        first: usize,
    },
    /// Computed here: `(residual + pe) · queries + bias` for the tile's image tokens, with the
    /// prompt's query rows transposed and packed (`D × H·T`), one bias per row and the tile's
    /// rows of the positional encoding. With `quantized` (the same query rows at 12 bits per
    /// row) and [`Tile::integer`] set, the product runs in integers on that kernel, the tile's
    /// image tokens + pe at 12 bits per token.
    FromKeys {
        queries: &'a PackedWeights,
        quantized: Option<&'a W8Weights>,
        bias: &'a [f32],
        pe: &'a [f32],
    },
    /// Computed here, head by head: the `[H, P, c]` per-frame keys (all of them; the tile's
    /// rows start at image token `first`) times each head's query rows of the whole batch,
    /// transposed and packed (`c × B·T`, prompt after prompt), of which this tile's prompt is
    /// `prompt`. The keys are shared by the batch, so the logits of all its prompts come from
    /// one product per head, kept in the scratch for the batch's other tiles at `first` (a task
    /// runs them one after another).
    PerHead {
        queries: &'a [PackedWeights],
        keys: &'a [f32],
        pixels: usize,
        first: usize,
        prompt: usize,
    },
}

/// One tile: its logits; `values` the prompt's `[H·T, D]` projected token values, packed;
/// `residual` the tile's `[TILE, D]` input image tokens; `bias` `D` values.
pub(crate) struct Tile<'a> {
    pub(crate) logits: Logits<'a>,
    pub(crate) heads: usize,
    pub(crate) tokens: usize,
    pub(crate) values: &'a PackedWeights,
    /// When set, the weighted sum runs in integers on this kernel: the values at 8 bits per
    /// column (quantized once per prompt), the tile's weights at 16 bits per image token (W8A16);
    /// so do logits computed from keys (see [`Logits::FromKeys`]).
    pub(crate) integer: Option<(W8A16Kernel, &'a W8Weights)>,
    pub(crate) residual: &'a [f32],
    pub(crate) bias: &'a [f32],
    pub(crate) norm: Norm<'a>,
}

/// Per-task buffers: the tile's image tokens plus positional encoding, its logits (tokens as
/// rows, then transposed), its exponentials per head, its weights, a product block; and the
/// per-head logits of a whole batch at one tile position ([`Logits::PerHead`]), with what they
/// were computed from.
pub(crate) struct Scratch {
    keys_pe: Vec<f32>,
    local: Vec<f32>,
    logits: Vec<f32>,
    exps: Vec<f32>,
    weights: Vec<f32>,
    block: Vec<f32>,
    batch_logits: Vec<f32>,
    batch_logits_of: Option<(usize, usize, usize)>,
    quantized: A16Rows,
    quantized_keys: A16Rows,
}

impl Scratch {
    /// Buffers for `heads × tokens` prompt tokens and image tokens of width `dim`.
    pub(crate) fn new(heads: usize, tokens: usize, dim: usize) -> Scratch {
        let rows = heads * tokens;
        Scratch {
            keys_pe: vec![0f32; TILE * dim],
            local: vec![0f32; TILE * rows],
            logits: vec![0f32; rows * TILE],
            exps: vec![0f32; tokens * TILE],
            weights: vec![0f32; TILE * rows],
            block: block_scratch(rows.max(dim), MAX_ROWS),
            batch_logits: Vec::new(),
            batch_logits_of: None,
            quantized: A16Rows::new(),
            quantized_keys: A16Rows::new(),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn tile_avx512(
    m: Avx512,
    tile: &Tile<'_>,
    out: &mut [f32],
    coefficients: &mut [f32],
    s: &mut Scratch,
) {
    mix::<true, _>(m, tile, out, coefficients, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn tile_avx2(
    m: Avx2,
    tile: &Tile<'_>,
    out: &mut [f32],
    coefficients: &mut [f32],
    s: &mut Scratch,
) {
    mix::<true, _>(m, tile, out, coefficients, s)
}

pub(crate) fn tile_portable(
    tile: &Tile<'_>,
    out: &mut [f32],
    coefficients: &mut [f32],
    s: &mut Scratch,
) {
    #[cfg(target_arch = "aarch64")]
    mix::<true, _>(super::super::gemm::Neon, tile, out, coefficients, s);
    #[cfg(not(target_arch = "aarch64"))]
    mix::<false, _>(super::super::gemm::Scalar, tile, out, coefficients, s);
}

/// `out` (the tile's rows of `D`) = LayerNorm(softmax-weighted sum of the token values + bias +
/// residual). Unless `coefficients` is empty, it gets one row of `H·T + 2` per image token: the
/// softmax weights in (head, token) order, then the LayerNorm's mean and scale `1 / σ`.
#[inline(always)]
fn mix<const FMA: bool, M: Micro>(
    m: M,
    tile: &Tile<'_>,
    out: &mut [f32],
    coefficients: &mut [f32],
    scratch: &mut Scratch,
) {
    let (h, t) = (tile.heads, tile.tokens);
    let d = tile.values.n();
    let rows = out.len() / d;
    let ht = h * t;
    let Scratch {
        keys_pe,
        local,
        logits,
        exps,
        weights,
        block,
        batch_logits,
        batch_logits_of,
        quantized,
        quantized_keys,
    } = scratch;
    let weights = &mut weights[..rows * ht];
    // The logits as `[H·T]` runs of image tokens: `scores[row · stride + first ..]`.
    let (scores, stride, first): (&[f32], usize, usize) = match tile.logits {
        Logits::Given { all, pixels, first } => (all, pixels, first),
        Logits::FromKeys {
            queries,
            quantized,
            bias,
            pe,
        } => {
            let keys_pe = &mut keys_pe[..rows * d];
            for ((x, &k), &p) in keys_pe.iter_mut().zip(tile.residual).zip(pe) {
                *x = k + p;
            }
            let local = &mut local[..rows * ht];
            match (tile.integer, quantized) {
                (Some((kernel, _)), Some(queries)) => {
                    w8a16::multiply(kernel, keys_pe, queries, quantized_keys, local)
                }
                _ => product(m, keys_pe, queries, local, block),
            }
            for row in local.chunks_exact_mut(ht) {
                for (x, &b) in row.iter_mut().zip(bias) {
                    *x += b;
                }
            }
            transpose(local, rows, ht, &mut logits[..ht * rows]);
            (&logits[..], rows, 0)
        }
        Logits::PerHead {
            queries,
            keys,
            pixels,
            first,
            prompt,
        } => {
            // Per head: the tile's image tokens as rows, the batch's B·T query rows as columns.
            let columns = queries.first().map_or(0, |q| q.n());
            let per_head = rows * columns;
            let of = (first, queries.as_ptr() as usize, keys.as_ptr() as usize);
            if *batch_logits_of != Some(of) {
                batch_logits.resize(h * per_head, 0.0);
                for (head, (q, out)) in queries
                    .iter()
                    .zip(batch_logits.chunks_exact_mut(per_head))
                    .enumerate()
                {
                    let c = q.k();
                    let at = (head * pixels + first) * c;
                    product(m, &keys[at..at + rows * c], q, out, block);
                }
                *batch_logits_of = Some(of);
            }
            // This prompt's T columns of each head, transposed into runs of image tokens.
            for (head, all) in batch_logits.chunks_exact(per_head).enumerate() {
                for token in 0..t {
                    let column = prompt * t + token;
                    let run = &mut logits[(head * t + token) * rows..(head * t + token + 1) * rows];
                    for (x, row) in run.iter_mut().zip(all.chunks_exact(columns)) {
                        *x = row[column];
                    }
                }
            }
            (&logits[..], rows, 0)
        }
    };
    for head in 0..h {
        // Max over the head's T tokens, for each image token of the tile.
        let mut max = [f32::NEG_INFINITY; TILE];
        for token in 0..t {
            let at = (head * t + token) * stride + first;
            for (mx, &s) in max.iter_mut().zip(&scores[at..at + rows]) {
                *mx = if s > *mx { s } else { *mx };
            }
        }
        let mut sum = [0f32; TILE];
        for token in 0..t {
            let at = (head * t + token) * stride + first;
            let e = &mut exps[token * TILE..token * TILE + rows];
            for (((e, &s), &mx), sum) in e
                .iter_mut()
                .zip(&scores[at..at + rows])
                .zip(&max)
                .zip(sum.iter_mut())
            {
                *e = exp_fused::<FMA>(s - mx);
                *sum += *e;
            }
        }
        let recip = sum.map(|s| 1.0 / s);
        // The weights as runs of image tokens per (head, token) column (vectorised), in
        // `local`, transposed into rows per image token below.
        for token in 0..t {
            let e = &exps[token * TILE..token * TILE + rows];
            let column = &mut local[(head * t + token) * rows..(head * t + token + 1) * rows];
            for ((w, &e), &recip) in column.iter_mut().zip(e).zip(&recip) {
                *w = e * recip;
            }
        }
    }
    transpose(&local[..ht * rows], ht, rows, weights);
    match tile.integer {
        Some((kernel, values)) => w8a16::multiply(kernel, weights, values, quantized, out),
        None => product(m, weights, tile.values, out, block),
    }
    let Norm { eps, gamma, beta } = tile.norm;
    let mut coefficients = coefficients.chunks_exact_mut(ht + 2);
    for (pixel, (row, residual)) in out
        .chunks_exact_mut(d)
        .zip(tile.residual.chunks_exact(d))
        .enumerate()
    {
        let (mean, scale) =
            residual_layer_norm::<FMA>(row, (residual, tile.bias), eps, gamma, beta);
        if let Some(c) = coefficients.next() {
            c[..ht].copy_from_slice(&weights[pixel * ht..(pixel + 1) * ht]);
            c[ht] = mean;
            c[ht + 1] = scale;
        }
    }
}
