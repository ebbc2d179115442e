//! The arithmetic of [`super::MaskUpscaling`] for one row of the image-token grid of one prompt,
//! free of tract (so that `benches/pi5_mca.py` can compile it alone).
//!
//! Per tile of up to [`TILE`] tokens the work runs *transposed*, with the tile's tokens along
//! the vector lanes: each product has a weight (or the prompt's basis) as its rows and the
//! tile as its one packed panel, so
//! - the first transposed convolution gives `4·C1` rows of the tile's tokens (as a product, or
//!   in its low-rank form, [`LowRankRow`], see `super::low_rank`);
//! - bias, LayerNorm over each sub-pixel's `C1` channels and GELU run along the tokens, with no
//!   sum across the lanes of a vector, and write the second product's panel directly;
//! - the second transposed convolution gives, per sub-pixel, `4·C2` rows of tokens; bias and
//!   GELU write them as the panels of the mask product;
//! - the prompt's few mask weight rows times those panels give each mask's values per
//!   (sub-pixel, sub-sub-pixel), tokens contiguous, interleaved into the mask rows.
//!
//! One generic body, compiled three times: with AVX-512F, with AVX2 + FMA (x86_64, chosen at
//! run time) and plainly (NEON with fused multiply-adds on aarch64).
#![allow(unsafe_code)]

use super::super::fastmath::{gelu, madd};
use super::super::gemm::{block_scratch, product, same_bits, Micro, PackedWeights, PANEL};
#[cfg(target_arch = "x86_64")]
use super::super::gemm::{Avx2, Avx512};
use super::super::w8a16::{rows_times_panel, A16Panel, W8A16Kernel, W8Rows};

/// Image tokens per tile: one panel of the products, the tokens along the vector lanes.
pub(crate) const TILE: usize = PANEL;
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
    /// `up1` transposed, `4·C1` rows of `D` (the rows of the full-rank first product).
    up1_rows: Vec<f32>,
    /// `up2` transposed, `4·C2` rows of `C1` (the rows of the second product).
    up2_rows: Vec<f32>,
    /// When set, the second product runs in integers on this kernel: `up2_rows` at 8 bits per
    /// row, each tile's normalised channels at 16 bits per token (W8A16, see
    /// [`super::super::w8a16`]).
    pub(crate) integer: Option<(W8A16Kernel, W8Rows)>,
}

impl PartialEq for Weights {
    fn eq(&self, other: &Weights) -> bool {
        self.up1 == other.up1
            && self.up2 == other.up2
            && self.integer == other.integer
            && self.eps.to_bits() == other.eps.to_bits()
            && [&self.bias1, &self.gamma, &self.beta, &self.bias2]
                .into_iter()
                .zip([&other.bias1, &other.gamma, &other.beta, &other.bias2])
                .all(|(a, b)| same_bits(a, b))
    }
}
impl Eq for Weights {}

impl Weights {
    /// The parameters, with the products' transposed rows derived from `up1` and `up2`, and
    /// the second product's integer form on `integer` when given (`None` if its rows do not
    /// quantize: never for SAM's sizes).
    pub(crate) fn new(
        up1: PackedWeights,
        bias1: Vec<f32>,
        (eps, gamma, beta): (f32, Vec<f32>, Vec<f32>),
        up2: PackedWeights,
        bias2: Vec<f32>,
        integer: Option<W8A16Kernel>,
    ) -> Option<Weights> {
        let transposed = |w: &PackedWeights| {
            let mut rows = vec![0f32; w.k() * w.n()];
            super::super::transpose::transpose(&w.unpack(), w.k(), w.n(), &mut rows);
            rows
        };
        let up2_rows = transposed(&up2);
        let integer = match integer {
            Some(kernel) => Some((kernel, W8Rows::quantize(&up2_rows, up2.n(), up2.k())?)),
            None => None,
        };
        Some(Weights {
            up1_rows: transposed(&up1),
            up2_rows,
            integer,
            up1,
            bias1,
            eps,
            gamma,
            beta,
            up2,
            bias2,
        })
    }

    fn c1(&self) -> usize {
        self.bias1.len()
    }

    fn c2(&self) -> usize {
        self.bias2.len()
    }
}

/// Per-task buffers: one product block, the tile's low-rank coefficients (token-major, then as
/// a panel), the tile after the first product (`4·C1` rows of [`TILE`]), one sub-pixel's
/// normalised channels as the second product's panel, its second product (`4·C2` rows of
/// [`TILE`]), the mask product's panels and its values.
pub(crate) struct Scratch {
    block: Vec<f32>,
    coefficients: Vec<f32>,
    tile: PackedWeights,
    up1: Vec<f32>,
    channels: PackedWeights,
    up2: Vec<f32>,
    pixels: PackedWeights,
    masks: Vec<f32>,
    quantized: A16Panel,
}

impl Scratch {
    /// Buffers for `masks` masks per prompt and, in the low-rank form, a basis of
    /// `basis_rows` rows (0 otherwise).
    pub(crate) fn new(w: &Weights, masks: usize, basis_rows: usize) -> Scratch {
        let k = w.up1.k().max(w.up2.k()).max(w.up2.n()).max(basis_rows);
        Scratch {
            block: block_scratch(k, MAX_ROWS),
            coefficients: vec![0f32; TILE * basis_rows],
            tile: PackedWeights::empty(),
            up1: vec![0f32; w.up1.n() * TILE],
            channels: PackedWeights::empty(),
            up2: vec![0f32; w.up2.n() * TILE],
            pixels: PackedWeights::empty(),
            masks: vec![0f32; 16 * TILE * masks],
            quantized: A16Panel::new(),
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
    /// The per-frame base of this grid row, transposed: `4·C1` rows of `side` tokens.
    pub(crate) base: &'a [f32],
    /// This prompt's basis, transposed: `4·C1` rows of `n₁ + n₂ + 4`.
    pub(crate) basis: &'a [f32],
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
        tile,
        up1,
        channels,
        up2,
        pixels,
        masks: values,
        quantized,
    } = scratch;
    for first in (0..band.side).step_by(TILE) {
        let t = TILE.min(band.side - first);
        // The first product: 4·C1 rows (sub-pixel, channel) of the tile's t tokens.
        let up1 = &mut up1[..4 * c1 * t];
        let filled = match &band.first {
            FirstProduct::Tokens(tokens) => tile
                .repack_transposed(&tokens[first * d..(first + t) * d], t, d)
                .map(|()| product(m, &w.up1_rows, tile, up1, block)),
            FirstProduct::LowRank(row) => low_rank_first_product(
                m,
                row,
                (band.side, first, t),
                coefficients,
                tile,
                up1,
                block,
            ),
        };
        if filled.is_none() {
            return;
        }
        // Per sub-pixel: LayerNorm and GELU along the tokens into the second product's panel,
        // then the second product (4·C2 rows: sub-sub-pixel, channel), then bias and GELU into
        // the mask product's panels (one per sub-pixel and sub-sub-pixel, C2 rows of tokens).
        let Some(panels) = pixels.fill(c2, 16 * TILE) else {
            return;
        };
        for (s, rows) in up1.chunks_exact(c1 * t).enumerate() {
            let Some(normalised) = channels.fill(c1, t) else {
                return;
            };
            normalise::<FMA>(rows, t, w, normalised);
            // The second product's rows: `t` values each, or a whole panel in integers.
            let stride = match &w.integer {
                Some((kernel, rows)) => {
                    quantized.quantize(normalised, t, rows);
                    rows_times_panel(*kernel, rows, quantized, up2, PANEL);
                    PANEL
                }
                None => {
                    product(m, &w.up2_rows, channels, &mut up2[..4 * c2 * t], block);
                    t
                }
            };
            for (s2, rows) in up2[..4 * c2 * stride].chunks_exact(c2 * stride).enumerate() {
                let panel = &mut panels[(4 * s + s2) * c2 * PANEL..][..c2 * PANEL];
                for ((row, out), &b) in rows
                    .chunks_exact(stride)
                    .zip(panel.chunks_exact_mut(PANEL))
                    .zip(&w.bias2)
                {
                    for (o, &x) in out.iter_mut().zip(&row[..t]) {
                        *o = gelu(FMA, x + b);
                    }
                }
            }
        }
        let values = &mut values[..masks * 16 * TILE];
        product(m, band.hyper, pixels, values, block);
        // Mask value (s, s2, token) with s = (dy, dx), s2 = (dy2, dx2) goes to mask row
        // 2·dy + dy2, column 4·token + 2·dx + dx2.
        for (plane, row) in planes.iter_mut().zip(values.chunks_exact(16 * TILE)) {
            for dy in 0..2 {
                for dy2 in 0..2 {
                    let at = (2 * dy + dy2) * width + 4 * first;
                    let Some(out) = plane.get_mut(at..at + 4 * t) else {
                        return;
                    };
                    let run = |dx: usize, dx2: usize| {
                        let p = 4 * (2 * dy + dx) + 2 * dy2 + dx2;
                        &row[p * TILE..p * TILE + t]
                    };
                    let runs = [run(0, 0), run(0, 1), run(1, 0), run(1, 1)];
                    for (j, quad) in out.chunks_exact_mut(4).enumerate() {
                        for (o, r) in quad.iter_mut().zip(runs) {
                            *o = r[j];
                        }
                    }
                }
            }
        }
    }
}

/// Tokens `first .. first + count` of a grid row of `side` tokens: their first product, `4·C1` rows of `count`
/// values, from the low-rank form (see [`LowRankRow`]): the transposed basis times the
/// coefficient rows `[r₁r₂·a₁, r₂·a₂, r₁r₂, −r₁r₂μ₁, r₂, −r₂μ₂]` as a panel, plus `r₁r₂` times
/// the base and the constant. `None` if the sizes do not fit.
#[inline(always)]
fn low_rank_first_product<M: Micro>(
    m: M,
    row: &LowRankRow<'_>,
    (side, first, count): (usize, usize, usize),
    coefficients: &mut [f32],
    tile: &mut PackedWeights,
    up1: &mut [f32],
    block: &mut [f32],
) -> Option<()> {
    let (n1, n2) = row.weights;
    let rows = n1 + n2 + 4;
    let coefficients = coefficients.get_mut(..count * rows)?;
    let mut scales = [0f32; TILE];
    for ((i, c), scale) in coefficients
        .chunks_exact_mut(rows)
        .enumerate()
        .zip(scales.iter_mut())
    {
        let token = first + i;
        let a1 = row.first.get(token * (n1 + 2)..(token + 1) * (n1 + 2))?;
        let a2 = row.second.get(token * (n2 + 2)..(token + 1) * (n2 + 2))?;
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
    tile.repack_transposed(coefficients, count, rows)?;
    product(m, row.basis, tile, up1, block);
    let scales = &scales[..count];
    for ((r, out), &k) in up1.chunks_exact_mut(count).enumerate().zip(row.constant) {
        let base = row.base.get(r * side + first..r * side + first + count)?;
        for ((x, &b), &scale) in out.iter_mut().zip(base).zip(scales) {
            *x += scale * b + k;
        }
    }
    Some(())
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

/// One sub-pixel of a tile: `C1` rows (channels) of `t` tokens; adds the bias, normalises each
/// token over the channels (SAM's `LayerNorm2d`: mean, biased variance, ε inside the root),
/// applies γ, β and GELU, and writes the channels as the rows of `out` (rows of [`PANEL`]).
/// Every step runs along the tokens.
#[inline(always)]
fn normalise<const FMA: bool>(rows: &[f32], t: usize, w: &Weights, out: &mut [f32]) {
    let n = w.c1() as f32;
    let mut mean = [0f32; TILE];
    let mean = &mut mean[..t];
    for (row, &b) in rows.chunks_exact(t).zip(&w.bias1) {
        for (m, &x) in mean.iter_mut().zip(row) {
            *m += x + b;
        }
    }
    for m in mean.iter_mut() {
        *m /= n;
    }
    let mut scale = [0f32; TILE];
    let scale = &mut scale[..t];
    for (row, &b) in rows.chunks_exact(t).zip(&w.bias1) {
        for ((v, &x), &m) in scale.iter_mut().zip(row).zip(mean.iter()) {
            let centred = x + b - m;
            *v += centred * centred;
        }
    }
    for v in scale.iter_mut() {
        *v = 1.0 / (*v / n + w.eps).sqrt();
    }
    for (((row, o), &b), (&g, &beta)) in rows
        .chunks_exact(t)
        .zip(out.chunks_exact_mut(PANEL))
        .zip(&w.bias1)
        .zip(w.gamma.iter().zip(&w.beta))
    {
        for (((o, &x), &m), &r) in o.iter_mut().zip(row).zip(mean.iter()).zip(scale.iter()) {
            let y = (x + b - m) * r;
            *o = gelu(FMA, madd::<FMA>(y, g, beta));
        }
    }
}
