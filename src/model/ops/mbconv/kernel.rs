//! The arithmetic of [`super::MbConv`] free of tract (so that `benches/pi5_mca.py` can compile it
//! alone): a band of output rows of TinyViT's inverted-residual convolution — 1×1 expansion,
//! GELU, 3×3 depthwise, GELU, 1×1 projection — computed one image row at a time with the
//! expanded rows in a ring of three, so the ×4-wide hidden maps never exist whole.
//!
//! Inside, pixels are rows and channels columns (HWC), which makes both 1×1 convolutions plain
//! products on our [`product`] kernels and the depthwise taps contiguous vectors of channels.
//! Input in CHW planes is transposed one image row at a time, when its hidden row is computed;
//! pixel-major input (tokens) is read as it is.
//!
//! One generic body, compiled three times: with AVX-512F, with AVX2 + FMA (x86_64, chosen at
//! run time) and plainly (NEON with fused multiply-adds on aarch64).
#![allow(unsafe_code)]

use super::super::fastmath::{gelu, madd};
use super::super::gemm::{block_scratch, product, same_bits, Micro, PackedWeights};
#[cfg(target_arch = "x86_64")]
use super::super::gemm::{Avx2, Avx512};
use super::super::transpose::{transpose, transpose_strided};
use super::super::w8a16::{self, A16Rows, ProductPair};

/// Taps of the depthwise convolution (3 × 3).
pub(crate) const TAPS: usize = 9;
/// The most rows per product block of any kernel (scratch is sized for it).
const MAX_ROWS: usize = 8;

/// The block's parameters.
#[derive(Debug, Clone)]
pub(crate) struct Weights {
    /// Expansion, `C_in × hidden`.
    pub(crate) expand: PackedWeights,
    /// Its bias, one per hidden channel.
    pub(crate) expand_bias: Vec<f32>,
    /// Depthwise kernel, tap-major: tap `3·ky + kx` holds one weight per hidden channel.
    pub(crate) depthwise: Vec<f32>,
    /// Its bias, one per hidden channel.
    pub(crate) depthwise_bias: Vec<f32>,
    /// Projection, `hidden × C_out`.
    pub(crate) project: PackedWeights,
    /// Its bias, one per output channel.
    pub(crate) project_bias: Vec<f32>,
    /// When set, both 1×1 products (expansion first, projection second) run in integers
    /// (W8A16: [`w8a16`]) instead of f32.
    pub(crate) integer: Option<ProductPair>,
}

impl PartialEq for Weights {
    fn eq(&self, other: &Weights) -> bool {
        self.expand == other.expand
            && self.project == other.project
            && self.integer == other.integer
            && [
                &self.expand_bias,
                &self.depthwise,
                &self.depthwise_bias,
                &self.project_bias,
            ]
            .into_iter()
            .zip([
                &other.expand_bias,
                &other.depthwise,
                &other.depthwise_bias,
                &other.project_bias,
            ])
            .all(|(a, b)| same_bits(a, b))
    }
}
impl Eq for Weights {}

impl Weights {
    pub(crate) fn inputs(&self) -> usize {
        self.expand.k()
    }

    pub(crate) fn hidden(&self) -> usize {
        self.expand.n()
    }

    pub(crate) fn outputs(&self) -> usize {
        self.project.n()
    }
}

/// Sizes of one image through the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Geometry {
    /// Input height and width.
    pub(crate) height: usize,
    pub(crate) width: usize,
    /// Stride of the depthwise convolution (1, or 2 where the block downsamples); its padding
    /// is one pixel on every side.
    pub(crate) stride: usize,
    /// Whether the input is pixel-major (`H × W × C`, tokens) instead of CHW planes.
    pub(crate) pixel_major_input: bool,
}

impl Geometry {
    /// Output height and width.
    pub(crate) fn output(&self) -> (usize, usize) {
        // A side of 0 gives 1 here, not 0: such a graph fails the matcher's check against
        // tract's own output size instead of underflowing.
        let out = |side: usize| (side + 2).saturating_sub(3) / self.stride + 1;
        (out(self.height), out(self.width))
    }
}

/// Where a band's rows go.
pub(crate) enum Out<'a, 'b> {
    /// CHW planes (`C_out = C_in`, stride 1): per output row, one slice of `width` values in
    /// each plane; the value is `GELU(projection + bias + input)` (MBConv's residual and final
    /// activation).
    Residual(&'b mut [Vec<&'a mut [f32]>]),
    /// Tokens: output rows of `out_width × C_out` values, pixel-major; the value is
    /// `projection + bias`.
    Tokens(&'b mut [f32]),
}

/// Per-task buffers.
pub(crate) struct Scratch {
    block: Vec<f32>,
    /// One image row, pixel-major.
    row_in: Vec<f32>,
    /// Three hidden rows (after expansion and GELU), pixel-major, and which image row each
    /// holds.
    ring: Vec<f32>,
    ring_rows: [usize; 3],
    /// One output row after the depthwise convolution and GELU.
    mid: Vec<f32>,
    /// One output row after the projection.
    projected: Vec<f32>,
    /// The same, channel-major (for CHW output).
    planes: Vec<f32>,
    /// The rows of a product quantized to i16, when the products are integer.
    quantized: A16Rows,
    /// One hidden pixel of zeros: the depthwise taps outside the image read it.
    zeros: Vec<f32>,
}

impl Scratch {
    pub(crate) fn new(w: &Weights, g: &Geometry) -> Scratch {
        let (_, out_width) = g.output();
        let k = w.inputs().max(w.hidden());
        Scratch {
            block: block_scratch(k, MAX_ROWS),
            row_in: vec![0f32; g.width * w.inputs()],
            ring: vec![0f32; 3 * g.width * w.hidden()],
            ring_rows: [usize::MAX; 3],
            mid: vec![0f32; out_width * w.hidden()],
            projected: vec![0f32; out_width * w.outputs()],
            planes: vec![0f32; out_width * w.outputs()],
            quantized: A16Rows::new(),
            zeros: vec![0f32; w.hidden()],
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn band_avx512(
    m: Avx512,
    w: &Weights,
    g: &Geometry,
    input: &[f32],
    first_row: usize,
    out: Out<'_, '_>,
    scratch: &mut Scratch,
) {
    band::<true, _>(m, w, g, input, first_row, out, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn band_avx2(
    m: Avx2,
    w: &Weights,
    g: &Geometry,
    input: &[f32],
    first_row: usize,
    out: Out<'_, '_>,
    scratch: &mut Scratch,
) {
    band::<true, _>(m, w, g, input, first_row, out, scratch)
}

pub(crate) fn band_portable(
    w: &Weights,
    g: &Geometry,
    input: &[f32],
    first_row: usize,
    out: Out<'_, '_>,
    scratch: &mut Scratch,
) {
    #[cfg(target_arch = "aarch64")]
    band::<true, _>(
        super::super::gemm::Neon,
        w,
        g,
        input,
        first_row,
        out,
        scratch,
    );
    #[cfg(not(target_arch = "aarch64"))]
    band::<false, _>(
        super::super::gemm::Scalar,
        w,
        g,
        input,
        first_row,
        out,
        scratch,
    );
}

/// Output rows `first_row ..` (as many as `out` holds) of the block on `input` (CHW planes).
/// Panics if `input` or `out` are smaller than the geometry says.
#[inline(always)]
fn band<const FMA: bool, M: Micro>(
    m: M,
    w: &Weights,
    g: &Geometry,
    input: &[f32],
    first_row: usize,
    out: Out<'_, '_>,
    scratch: &mut Scratch,
) {
    let (cin, hidden, cout) = (w.inputs(), w.hidden(), w.outputs());
    let (height, width) = (g.height, g.width);
    let (_, out_width) = g.output();
    assert!(input.len() >= cin * height * width);
    let Scratch {
        block,
        row_in,
        ring,
        ring_rows,
        mid,
        projected,
        planes,
        quantized,
        zeros,
    } = scratch;
    let rows = match &out {
        Out::Residual(rows) => rows.len(),
        Out::Tokens(values) => values.len() / (out_width * cout),
    };
    let mut out = out;
    for i in 0..rows {
        let y = first_row + i;
        // The hidden rows this output row reads (the ones outside the image are zeros).
        let top = (y * g.stride).checked_sub(1);
        let taps_rows: [Option<usize>; 3] =
            [top, Some(y * g.stride), Some(y * g.stride + 1)].map(|r| r.filter(|&r| r < height));
        for yy in taps_rows.into_iter().flatten() {
            let slot = yy % 3;
            if ring_rows[slot] != yy {
                let dst = &mut ring[slot * width * hidden..(slot + 1) * width * hidden];
                expand_row(
                    m,
                    w,
                    input,
                    (height, width, g.pixel_major_input),
                    yy,
                    row_in,
                    dst,
                    (block, quantized),
                );
                ring_rows[slot] = yy;
            }
        }
        depthwise_row::<FMA>(w, g, taps_rows, ring, zeros, mid);
        match &w.integer {
            Some(int) => w8a16::multiply(int.kernel, mid, &int.second, quantized, projected),
            None => product(m, mid, &w.project, projected, block),
        }
        match &mut out {
            Out::Residual(planes_rows) => {
                transpose(projected, out_width, cout, planes);
                for (c, plane_row) in planes_rows[i].iter_mut().enumerate() {
                    let residual = &input[(c * height + y) * width..(c * height + y + 1) * width];
                    let projected = &planes[c * out_width..(c + 1) * out_width];
                    let bias = w.project_bias[c];
                    for ((o, &p), &r) in plane_row.iter_mut().zip(projected).zip(residual) {
                        *o = gelu(FMA, (p + bias) + r);
                    }
                }
            }
            Out::Tokens(values) => {
                let row = &mut values[i * out_width * cout..(i + 1) * out_width * cout];
                for (o, p) in row.chunks_exact_mut(cout).zip(projected.chunks_exact(cout)) {
                    for ((o, &p), &b) in o.iter_mut().zip(p).zip(&w.project_bias) {
                        *o = p + b;
                    }
                }
            }
        }
    }
}

/// Hidden row `yy`: the image row (transposed to pixel-major if it is in CHW planes) times the
/// expansion, plus bias, GELU, into `dst` (`width × hidden`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn expand_row<M: Micro>(
    m: M,
    w: &Weights,
    input: &[f32],
    (height, width, pixel_major): (usize, usize, bool),
    yy: usize,
    row_in: &mut [f32],
    dst: &mut [f32],
    (block, quantized): (&mut [f32], &mut A16Rows),
) {
    let cin = w.inputs();
    let row: &[f32] = if pixel_major {
        &input[yy * width * cin..(yy + 1) * width * cin]
    } else {
        let planes = &input[..cin * height * width];
        transpose_strided(planes, (cin, width), height * width, yy * width, row_in);
        row_in
    };
    match &w.integer {
        Some(int) => w8a16::multiply(int.kernel, row, &int.first, quantized, dst),
        None => product(m, row, &w.expand, dst, block),
    }
    for pixel in dst.chunks_exact_mut(w.hidden()) {
        for (v, &b) in pixel.iter_mut().zip(&w.expand_bias) {
            *v = gelu(M::FMA, *v + b);
        }
    }
}

/// One output row of the depthwise convolution plus bias, then GELU, into `mid`
/// (`out_width × hidden`), from the hidden rows `rows` (top, middle, bottom; `None` outside the
/// image) held in `ring`. Each pixel's channels go in blocks of [`DEPTHWISE_BLOCK`] whose sums
/// stay in registers over the nine taps (independent chains for the FMA units' latency).
#[inline(always)]
fn depthwise_row<const FMA: bool>(
    w: &Weights,
    g: &Geometry,
    rows: [Option<usize>; 3],
    ring: &[f32],
    zeros: &[f32],
    mid: &mut [f32],
) {
    let hidden = w.hidden();
    let row_len = g.width * hidden;
    for (ox, out) in mid.chunks_exact_mut(hidden).enumerate() {
        // The nine taps in the order ky, kx: the pixel's channels (zeros outside the image)
        // and the tap's weights.
        let taps: [(&[f32], &[f32]); TAPS] = std::array::from_fn(|t| {
            let (ky, kx) = (t / 3, t % 3);
            let weights = &w.depthwise[t * hidden..(t + 1) * hidden];
            let xx = (ox * g.stride + kx).checked_sub(1).filter(|&x| x < g.width);
            match (rows[ky], xx) {
                (Some(yy), Some(xx)) => {
                    let at = (yy % 3) * row_len + xx * hidden;
                    (&ring[at..at + hidden], weights)
                }
                _ => (zeros, weights),
            }
        });
        let mut c0 = 0;
        for block in out.chunks_exact_mut(DEPTHWISE_BLOCK) {
            let mut acc = [0f32; DEPTHWISE_BLOCK];
            acc.copy_from_slice(&w.depthwise_bias[c0..c0 + DEPTHWISE_BLOCK]);
            for &(src, tap) in &taps {
                let (src, tap) = (
                    &src[c0..c0 + DEPTHWISE_BLOCK],
                    &tap[c0..c0 + DEPTHWISE_BLOCK],
                );
                for ((a, &v), &k) in acc.iter_mut().zip(src).zip(tap) {
                    *a = madd::<FMA>(v, k, *a);
                }
            }
            block.copy_from_slice(&acc);
            c0 += DEPTHWISE_BLOCK;
        }
        for o in out[..c0].iter_mut() {
            *o = gelu(FMA, *o);
        }
        // Channels past the last whole block.
        for c in c0..hidden {
            let mut a = w.depthwise_bias[c];
            for &(src, tap) in &taps {
                a = madd::<FMA>(src[c], tap[c], a);
            }
            out[c] = gelu(FMA, a);
        }
    }
}

/// Channels per register-held block of the depthwise convolution: four AVX-512 vectors.
const DEPTHWISE_BLOCK: usize = 64;
