//! The arithmetic of [`super::ImageToTokenOutput`] for one tile of image tokens of one prompt,
//! free of tract: the softmax over each head's prompt tokens (scores read with the image tokens
//! contiguous, as the graph keeps them), written transposed as the rows of a product with the
//! prompt's projected token values, then the bias and the residual.
//!
//! One generic body, compiled three times: with AVX-512F, with AVX2 + FMA (x86_64, chosen at
//! run time) and plainly (NEON on aarch64).
#![allow(unsafe_code)]

use super::super::fastmath::{exp_fused, layer_norm};
use super::super::gemm::{block_scratch, product, Micro, PackedWeights};
#[cfg(target_arch = "x86_64")]
use super::super::gemm::{Avx2, Avx512};

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

/// One tile: `scores` are the prompt's `[H, T, P]` attention logits (all of them), `first` the
/// tile's first image token; `values` the prompt's `[H·T, D]` projected token values, packed;
/// `residual` the tile's `[TILE, D]` input image tokens; `bias` `D` values.
pub(crate) struct Tile<'a> {
    pub(crate) scores: &'a [f32],
    pub(crate) heads: usize,
    pub(crate) tokens: usize,
    pub(crate) pixels: usize,
    pub(crate) first: usize,
    pub(crate) values: &'a PackedWeights,
    pub(crate) residual: &'a [f32],
    pub(crate) bias: &'a [f32],
    pub(crate) norm: Norm<'a>,
}

/// Per-task buffers: the tile's exponentials per head, its weights, a product block.
pub(crate) struct Scratch {
    exps: Vec<f32>,
    weights: Vec<f32>,
    block: Vec<f32>,
}

impl Scratch {
    pub(crate) fn new(heads: usize, tokens: usize) -> Scratch {
        Scratch {
            exps: vec![0f32; tokens * TILE],
            weights: vec![0f32; TILE * heads * tokens],
            block: block_scratch(heads * tokens, MAX_ROWS),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn tile_avx512(m: Avx512, tile: &Tile<'_>, out: &mut [f32], s: &mut Scratch) {
    mix::<true, _>(m, tile, out, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn tile_avx2(m: Avx2, tile: &Tile<'_>, out: &mut [f32], s: &mut Scratch) {
    mix::<true, _>(m, tile, out, s)
}

pub(crate) fn tile_portable(tile: &Tile<'_>, out: &mut [f32], s: &mut Scratch) {
    #[cfg(target_arch = "aarch64")]
    mix::<true, _>(super::super::gemm::Neon, tile, out, s);
    #[cfg(not(target_arch = "aarch64"))]
    mix::<false, _>(super::super::gemm::Scalar, tile, out, s);
}

/// `out` (the tile's rows of `D`) = LayerNorm(softmax-weighted sum of the token values + bias +
/// residual).
#[inline(always)]
fn mix<const FMA: bool, M: Micro>(m: M, tile: &Tile<'_>, out: &mut [f32], scratch: &mut Scratch) {
    let (h, t, p) = (tile.heads, tile.tokens, tile.pixels);
    let rows = out.len() / tile.values.n();
    let ht = h * t;
    let Scratch {
        exps,
        weights,
        block,
    } = scratch;
    let weights = &mut weights[..rows * ht];
    for head in 0..h {
        // Max over the head's T tokens, for each image token of the tile.
        let mut max = [f32::NEG_INFINITY; TILE];
        for token in 0..t {
            let at = (head * t + token) * p + tile.first;
            for (mx, &s) in max.iter_mut().zip(&tile.scores[at..at + rows]) {
                *mx = if s > *mx { s } else { *mx };
            }
        }
        let mut sum = [0f32; TILE];
        for token in 0..t {
            let at = (head * t + token) * p + tile.first;
            let e = &mut exps[token * TILE..token * TILE + rows];
            for (((e, &s), &mx), sum) in e
                .iter_mut()
                .zip(&tile.scores[at..at + rows])
                .zip(&max)
                .zip(sum.iter_mut())
            {
                *e = exp_fused::<FMA>(s - mx);
                *sum += *e;
            }
        }
        let recip = sum.map(|s| 1.0 / s);
        for token in 0..t {
            let e = &exps[token * TILE..token * TILE + rows];
            let column = head * t + token;
            for (r, (&e, &recip)) in e.iter().zip(&recip).enumerate() {
                weights[r * ht + column] = e * recip;
            }
        }
    }
    product(m, weights, tile.values, out, block);
    let d = tile.values.n();
    let Norm { eps, gamma, beta } = tile.norm;
    for (row, residual) in out.chunks_exact_mut(d).zip(tile.residual.chunks_exact(d)) {
        for ((x, &b), &r) in row.iter_mut().zip(tile.bias).zip(residual) {
            *x = r + (*x + b);
        }
        layer_norm::<FMA>(row, eps, gamma, beta, |x| x);
    }
}
