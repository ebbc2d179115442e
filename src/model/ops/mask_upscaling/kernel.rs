//! The arithmetic of [`super::MaskUpscaling`] for one row of the image-token grid of one prompt,
//! free of tract (so that `benches/pi5_mca.py` can compile it alone): per tile of [`TILE`]
//! tokens, the first transposed convolution as a product, bias, LayerNorm and GELU, the second
//! transposed convolution as a product, bias and GELU, and the product of the prompt's few mask
//! weight rows with the tile's pixels (packed as the product's wide operand), written straight
//! to the mask planes, all while the tile is in cache.
//! The first product is either the image tokens times its weight, or its low-rank form
//! ([`LowRankRow`], see `super::low_rank`).
//!
//! One generic body, compiled three times: with AVX-512F, with AVX2 + FMA (x86_64, chosen at
//! run time) and plainly (NEON with fused multiply-adds on aarch64).
#![allow(unsafe_code)]

use super::super::fastmath::{gelu, layer_norm};
use super::super::gemm::{block_scratch, product, same_bits, Micro, PackedWeights};
#[cfg(target_arch = "x86_64")]
use super::super::gemm::{Avx2, Avx512};

/// Image tokens per tile: the tile's feature maps (16 × 256 and 64 × 128 values) stay in L1/L2.
pub(crate) const TILE: usize = 16;
/// The most rows per product block of any kernel (scratch is sized for it).
const MAX_ROWS: usize = 8;

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

/// Per-task buffers: one product block, the tile's low-rank coefficients, the tile after each
/// transposed convolution, its pixels packed for the mask product, its mask values.
pub(crate) struct Scratch {
    block: Vec<f32>,
    coefficients: Vec<f32>,
    up1: Vec<f32>,
    up2: Vec<f32>,
    pixels: PackedWeights,
    masks: Vec<f32>,
}

impl Scratch {
    /// Buffers for `masks` masks per prompt and, in the low-rank form, a basis of
    /// `basis_rows` rows (0 otherwise).
    pub(crate) fn new(w: &Weights, masks: usize, basis_rows: usize) -> Scratch {
        let k = w.up1.k().max(w.up2.k()).max(w.up2.n()).max(basis_rows);
        Scratch {
            block: block_scratch(k, MAX_ROWS),
            coefficients: vec![0f32; TILE * basis_rows],
            up1: vec![0f32; TILE * w.up1.n()],
            up2: vec![0f32; TILE * 4 * w.up2.n()],
            pixels: PackedWeights::empty(),
            masks: vec![0f32; TILE * 16 * masks],
        }
    }
}

/// One grid row's inputs of the first product in its low-rank form (see `super::low_rank`):
/// token `i`'s first product is `coefficients(i) · basis + r₁r₂ · base(i) + constant`.
pub(crate) struct LowRankRow<'a> {
    /// Softmax weights per token of the first and the second image->token output (`n₁`, `n₂`).
    pub(crate) weights: (usize, usize),
    /// The first image->token output's coefficients: `side` rows of `n₁ + 2` (weights, then
    /// the LayerNorm's mean μ₁ and scale r₁).
    pub(crate) first: &'a [f32],
    /// The second's: `side` rows of `n₂ + 2` (weights, μ₂, r₂).
    pub(crate) second: &'a [f32],
    /// The per-frame base: `side` rows of `4·C1`.
    pub(crate) base: &'a [f32],
    /// This prompt's basis, `(n₁ + n₂ + 4) × 4·C1`, packed.
    pub(crate) basis: &'a PackedWeights,
    /// Added to every token's first product, `4·C1`.
    pub(crate) constant: &'a [f32],
}

/// What the first product starts from.
pub(crate) enum FirstProduct<'a> {
    /// The grid row's image tokens, `side` rows of `D`.
    Tokens(&'a [f32]),
    /// Its low-rank form.
    LowRank(LowRankRow<'a>),
}

/// One grid row's first-product input and one prompt's mask weights (`K` rows of `C2`): the
/// 4 mask rows of this grid row in each of the `K` planes (`planes[k]`: 4 rows of `4 · side`).
pub(crate) struct Band<'a> {
    pub(crate) first: FirstProduct<'a>,
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
    let masks = band.hyper.len() / c2;
    let width = 4 * band.side;
    let Scratch {
        block,
        coefficients,
        up1,
        up2,
        pixels,
        masks: values,
    } = scratch;
    for (tile, first) in (0..band.side).step_by(TILE).enumerate() {
        let t = TILE.min(band.side - first);
        let up1 = &mut up1[..t * 4 * c1];
        match &band.first {
            FirstProduct::Tokens(tokens) => {
                product(m, &tokens[first * d..(first + t) * d], &w.up1, up1, block)
            }
            FirstProduct::LowRank(row) => {
                low_rank_first_product(m, row, (first, t), coefficients, up1, block)
            }
        }
        for row in up1.chunks_exact_mut(c1) {
            normalise::<FMA>(row, w);
        }
        let up2 = &mut up2[..t * 16 * c2];
        product(m, up1, &w.up2, up2, block);
        for pixel in up2.chunks_exact_mut(c2) {
            for (x, &b) in pixel.iter_mut().zip(&w.bias2) {
                *x = gelu(FMA, *x + b);
            }
        }
        // The K mask rows times the tile's 16·t pixels (rows of C2 channels, in (token, dy,
        // dx, dy2, dx2) order) as the product's wide operand: no zero padding of K.
        let count = t * 16;
        let values = &mut values[..masks * count];
        if pixels.repack_transposed(up2, count, c2).is_none() {
            return;
        }
        product(m, band.hyper, pixels, values, block);
        // Pixel q of the tile is (token, dy, dx, dy2, dx2): mask row 2·dy + dy2, column
        // 4·token + 2·dx + dx2.
        for (plane, row) in planes.iter_mut().zip(values.chunks_exact(count)) {
            for (q, &v) in row.iter().enumerate() {
                let token = tile * TILE + q / 16;
                let (dy, dx, dy2, dx2) = (q >> 3 & 1, q >> 2 & 1, q >> 1 & 1, q & 1);
                let at = (2 * dy + dy2) * width + 4 * token + 2 * dx + dx2;
                if let Some(out) = plane.get_mut(at) {
                    *out = v;
                }
            }
        }
    }
}

/// Tokens `first .. first + count` of a grid row: their first product, `count` rows of `4·C1`,
/// from the low-rank form (see [`LowRankRow`]): the coefficient rows `[r₁r₂·a₁, r₂·a₂, r₁r₂,
/// −r₁r₂μ₁, r₂, −r₂μ₂]` times the basis, plus `r₁r₂` times the base and the constant.
#[inline(always)]
fn low_rank_first_product<M: Micro>(
    m: M,
    row: &LowRankRow<'_>,
    (first, count): (usize, usize),
    coefficients: &mut [f32],
    up1: &mut [f32],
    block: &mut [f32],
) {
    let rows = row.basis.k();
    let width = row.basis.n();
    let (n1, n2) = row.weights;
    let coefficients = &mut coefficients[..count * rows];
    let mut scales = [0f32; TILE];
    for ((i, c), scale) in coefficients
        .chunks_exact_mut(rows)
        .enumerate()
        .zip(scales.iter_mut())
    {
        let token = first + i;
        let a1 = &row.first[token * (n1 + 2)..(token + 1) * (n1 + 2)];
        let a2 = &row.second[token * (n2 + 2)..(token + 1) * (n2 + 2)];
        let (mean1, r1, mean2, r2) = (a1[n1], a1[n1 + 1], a2[n2], a2[n2 + 1]);
        let r12 = r1 * r2;
        for (c, &a) in c[..n1].iter_mut().zip(&a1[..n1]) {
            *c = r12 * a;
        }
        for (c, &a) in c[n1..n1 + n2].iter_mut().zip(&a2[..n2]) {
            *c = r2 * a;
        }
        c[n1 + n2..].copy_from_slice(&[r12, -r12 * mean1, r2, -r2 * mean2]);
        *scale = r12;
    }
    product(m, coefficients, row.basis, up1, block);
    for (i, (out, &scale)) in up1.chunks_exact_mut(width).zip(&scales).enumerate() {
        let base = &row.base[(first + i) * width..(first + i + 1) * width];
        for ((x, &b), &k) in out.iter_mut().zip(base).zip(row.constant) {
            *x += scale * b + k;
        }
    }
}

/// `c = a · w` for rows of any count (the per-frame base, each prompt's basis).
#[inline(always)]
fn times<M: Micro>(m: M, a: &[f32], w: &PackedWeights, c: &mut [f32]) {
    let mut block = block_scratch(w.k(), MAX_ROWS);
    product(m, a, w, c, &mut block);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn times_avx512(m: Avx512, a: &[f32], w: &PackedWeights, c: &mut [f32]) {
    times(m, a, w, c)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn times_avx2(m: Avx2, a: &[f32], w: &PackedWeights, c: &mut [f32]) {
    times(m, a, w, c)
}

pub(crate) fn times_portable(a: &[f32], w: &PackedWeights, c: &mut [f32]) {
    #[cfg(target_arch = "aarch64")]
    times(super::super::gemm::Neon, a, w, c);
    #[cfg(not(target_arch = "aarch64"))]
    times(super::super::gemm::Scalar, a, w, c);
}

/// Bias, LayerNorm over the row (SAM's `LayerNorm2d`), then GELU, in place.
#[inline(always)]
fn normalise<const FMA: bool>(row: &mut [f32], w: &Weights) {
    for (x, &b) in row.iter_mut().zip(&w.bias1) {
        *x += b;
    }
    layer_norm::<FMA>(row, w.eps, &w.gamma, &w.beta, |x| gelu(FMA, x));
}
