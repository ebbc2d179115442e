//! The arithmetic of [`super::MaskUpscaling`] for one row of the image-token grid of one prompt,
//! free of tract (so that `benches/pi5_mca.py` can compile it alone): per tile of [`TILE`]
//! tokens, the first transposed convolution as a product, bias, LayerNorm and GELU, the second
//! transposed convolution as a product, bias and GELU, and the mask weights' dot products,
//! written straight to the mask planes, all while the tile is in cache.
//!
//! One generic body, compiled three times: with AVX-512F, with AVX2 + FMA (x86_64, chosen at
//! run time) and plainly (NEON with fused multiply-adds on aarch64).
#![allow(unsafe_code)]

use super::super::fastmath::{gelu_exact, madd};
use super::super::gemm::{block_scratch, product, same_bits, Micro, PackedWeights};
#[cfg(target_arch = "x86_64")]
use super::super::gemm::{Avx2, Avx512};

/// Image tokens per tile: the tile's feature maps (16 × 256 and 64 × 128 values) stay in L1/L2.
pub(crate) const TILE: usize = 16;
/// The most rows per product block of any kernel (scratch is sized for it).
const MAX_ROWS: usize = 8;
/// Lanes of the mask weights' dot products.
const LANES: usize = 16;

/// The upscaling's parameters: `C1` and `C2` are the channels after each transposed
/// convolution (64 and 32 in SAM), `D` the image tokens' width.
#[derive(Debug, Clone)]
pub(crate) struct Weights {
    /// First transposed convolution as a `D × 4·C1` matrix, columns in (dy, dx, c) order.
    pub(crate) up1: PackedWeights,
    /// Its bias, `C1`.
    pub(crate) bias1: Vec<f32>,
    /// LayerNorm over the `C1` channels: ε, γ and β.
    pub(crate) eps: f32,
    pub(crate) gamma: Vec<f32>,
    pub(crate) beta: Vec<f32>,
    /// Second transposed convolution as a `C1 × 4·C2` matrix, columns in (dy, dx, c) order.
    pub(crate) up2: PackedWeights,
    /// Its bias, `C2`.
    pub(crate) bias2: Vec<f32>,
}

impl PartialEq for Weights {
    fn eq(&self, other: &Weights) -> bool {
        self.up1 == other.up1
            && self.up2 == other.up2
            && self.eps.to_bits() == other.eps.to_bits()
            && [&self.bias1, &self.gamma, &self.beta, &self.bias2]
                .into_iter()
                .zip([&other.bias1, &other.gamma, &other.beta, &other.bias2])
                .all(|(a, b)| same_bits(a, b))
    }
}
impl Eq for Weights {}

impl Weights {
    fn c1(&self) -> usize {
        self.bias1.len()
    }

    fn c2(&self) -> usize {
        self.bias2.len()
    }
}

/// Per-task buffers: one product block, the tile after each transposed convolution.
pub(crate) struct Scratch {
    block: Vec<f32>,
    up1: Vec<f32>,
    up2: Vec<f32>,
}

impl Scratch {
    pub(crate) fn new(w: &Weights) -> Scratch {
        Scratch {
            block: block_scratch(w.up1.k().max(w.up2.k()), MAX_ROWS),
            up1: vec![0f32; TILE * w.up1.n()],
            up2: vec![0f32; TILE * 4 * w.up2.n()],
        }
    }
}

/// One grid row's tokens (`side` rows of `D`) and one prompt's mask weights (`K` rows of `C2`):
/// the 4 mask rows of this grid row in each of the `K` planes (`planes[k]`: 4 rows of
/// `4 · side`).
pub(crate) struct Band<'a> {
    pub(crate) tokens: &'a [f32],
    pub(crate) side: usize,
    pub(crate) hyper: &'a [f32],
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn band_avx512(
    m: Avx512,
    w: &Weights,
    band: &Band<'_>,
    planes: &mut [&mut [f32]],
    scratch: &mut Scratch,
) {
    upscale::<true, _>(m, w, band, planes, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn band_avx2(
    m: Avx2,
    w: &Weights,
    band: &Band<'_>,
    planes: &mut [&mut [f32]],
    scratch: &mut Scratch,
) {
    upscale::<true, _>(m, w, band, planes, scratch)
}

pub(crate) fn band_portable(
    w: &Weights,
    band: &Band<'_>,
    planes: &mut [&mut [f32]],
    scratch: &mut Scratch,
) {
    #[cfg(target_arch = "aarch64")]
    upscale::<true, _>(super::super::gemm::Neon, w, band, planes, scratch);
    #[cfg(not(target_arch = "aarch64"))]
    upscale::<false, _>(super::super::gemm::Scalar, w, band, planes, scratch);
}

#[inline(always)]
fn upscale<const FMA: bool, M: Micro>(
    m: M,
    w: &Weights,
    band: &Band<'_>,
    planes: &mut [&mut [f32]],
    scratch: &mut Scratch,
) {
    let (d, c1, c2) = (w.up1.k(), w.c1(), w.c2());
    let width = 4 * band.side;
    let Scratch { block, up1, up2 } = scratch;
    for (tile, tokens) in band.tokens.chunks(TILE * d).enumerate() {
        let t = tokens.len() / d;
        let up1 = &mut up1[..t * 4 * c1];
        product(m, tokens, &w.up1, up1, block);
        for row in up1.chunks_exact_mut(c1) {
            normalise::<FMA>(row, w);
        }
        let up2 = &mut up2[..t * 16 * c2];
        product(m, up1, &w.up2, up2, block);
        // Pixel q of the tile is (token, dy, dx, dy2, dx2) in binary; its mask row is
        // 2·dy + dy2, its column 4·token + 2·dx + dx2.
        for (q, pixel) in up2.chunks_exact_mut(c2).enumerate() {
            for (x, &b) in pixel.iter_mut().zip(&w.bias2) {
                *x = gelu_exact(*x + b);
            }
            let token = tile * TILE + q / 16;
            let row = 2 * (q >> 3 & 1) + (q >> 1 & 1);
            let col = 4 * token + 2 * (q >> 2 & 1) + (q & 1);
            for (plane, hyper) in planes.iter_mut().zip(band.hyper.chunks_exact(c2)) {
                if let Some(out) = plane.get_mut(row * width + col) {
                    *out = dot::<FMA>(pixel, hyper);
                }
            }
        }
    }
}

/// Bias, LayerNorm over the row (SAM's `LayerNorm2d`: biased variance, `ε` inside the root),
/// then GELU, in place.
#[inline(always)]
fn normalise<const FMA: bool>(row: &mut [f32], w: &Weights) {
    let n = row.len() as f32;
    for (x, &b) in row.iter_mut().zip(&w.bias1) {
        *x += b;
    }
    let mean = lane_sum(row, |x| x) / n;
    let variance = lane_sum(row, |x| (x - mean) * (x - mean)) / n;
    let scale = 1.0 / (variance + w.eps).sqrt();
    for ((x, &g), &b) in row.iter_mut().zip(&w.gamma).zip(&w.beta) {
        *x = gelu_exact(madd::<FMA>((*x - mean) * scale, g, b));
    }
}

/// `Σ f(a_i)` in [`LANES`] partial sums (vectorisable, unlike one running sum), added pairwise.
#[inline(always)]
fn lane_sum(a: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = a.chunks_exact(LANES);
    for chunk in &mut chunks {
        for l in 0..LANES {
            acc[l] += f(chunk[l]);
        }
    }
    for (l, &x) in chunks.remainder().iter().enumerate() {
        acc[l] += f(x);
    }
    pairwise(acc)
}

/// `Σ a_i b_i` in [`LANES`] partial sums, added pairwise at the end.
#[inline(always)]
fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut a_chunks = a.chunks_exact(LANES);
    for (a, b) in (&mut a_chunks).zip(b.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] = madd::<FMA>(a[l], b[l], acc[l]);
        }
    }
    let whole = a.len() - a_chunks.remainder().len();
    for (l, (&a, &b)) in a_chunks.remainder().iter().zip(&b[whole..]).enumerate() {
        acc[l] = madd::<FMA>(a, b, acc[l]);
    }
    pairwise(acc)
}

/// The sum of the lanes, halving the width each step.
#[inline(always)]
fn pairwise(mut acc: [f32; LANES]) -> f32 {
    let mut half = LANES / 2;
    while half > 0 {
        for l in 0..half {
            acc[l] += acc[l + half];
        }
        half /= 2;
    }
    acc[0]
}
