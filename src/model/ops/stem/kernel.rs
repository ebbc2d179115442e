//! The arithmetic of [`super::Stem`] free of tract (so that `benches/pi5_mca.py` can compile it
//! alone): a band of output rows of two 3×3 stride-2 convolutions with a GELU between them,
//! each output row computed from a ring of three rows of the intermediate map, so the
//! intermediate (32 MB on a 1024² frame) never exists whole.
//!
//! Both convolutions are products on our [`product`] kernels with image patches as rows: the
//! first gathers its `C_in · 3 · 3` patch values from the CHW input, the second copies 9 runs of
//! intermediate channels from the pixel-major ring. Output rows are transposed to CHW planes.
//!
//! One generic body, compiled three times: with AVX-512F, with AVX2 + FMA (x86_64, chosen at
//! run time) and plainly (NEON with fused multiply-adds on aarch64).
#![allow(unsafe_code)]

use super::super::fastmath::gelu;
use super::super::gemm::{block_scratch, product, same_bits, Micro, PackedWeights};
#[cfg(target_arch = "x86_64")]
use super::super::gemm::{Avx2, Avx512};
use super::super::transpose::transpose;
use super::super::w8a16::{self, A16Rows, W8A16Kernel, W8Weights};

/// The most rows per product block of any kernel (scratch is sized for it).
const MAX_ROWS: usize = 8;

/// The two convolutions' parameters.
#[derive(Debug, Clone)]
pub(crate) struct Weights {
    /// First convolution, `C_in · 9 × C_mid`, patch values in (channel, ky, kx) order.
    pub(crate) first: PackedWeights,
    pub(crate) first_bias: Vec<f32>,
    /// Second convolution, `9 · C_mid × C_out`, patch values in (ky, kx, channel) order.
    pub(crate) second: PackedWeights,
    pub(crate) second_bias: Vec<f32>,
    /// When set, the second convolution's product runs in integers (W8A16: [`w8a16`]) on this
    /// kernel instead of f32. The first stays f32: its 27 weights a channel read the image, and
    /// at 8 bits they cost the default model measurable fidelity (`docs/performance.md`).
    pub(crate) integer: Option<(W8A16Kernel, W8Weights)>,
}

impl PartialEq for Weights {
    fn eq(&self, other: &Weights) -> bool {
        self.first == other.first
            && self.second == other.second
            && same_bits(&self.first_bias, &other.first_bias)
            && same_bits(&self.second_bias, &other.second_bias)
            && self.integer == other.integer
    }
}
impl Eq for Weights {}

impl Weights {
    pub(crate) fn inputs(&self) -> usize {
        self.first.k() / 9
    }

    pub(crate) fn middle(&self) -> usize {
        self.first.n()
    }

    pub(crate) fn outputs(&self) -> usize {
        self.second.n()
    }
}

/// Output side of a 3×3 stride-2 convolution padded by one pixel.
pub(crate) fn halved(side: usize) -> usize {
    // A side of 0 gives 1, not 0: the matcher then rejects it against tract's output size.
    (side + 2).saturating_sub(3) / 2 + 1
}

/// Input height and width; the intermediate and output sides follow ([`halved`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Geometry {
    pub(crate) height: usize,
    pub(crate) width: usize,
}

impl Geometry {
    pub(crate) fn middle(&self) -> (usize, usize) {
        (halved(self.height), halved(self.width))
    }

    pub(crate) fn output(&self) -> (usize, usize) {
        let (h, w) = self.middle();
        (halved(h), halved(w))
    }
}

/// Per-task buffers.
pub(crate) struct Scratch {
    block: Vec<f32>,
    /// Patch rows of either convolution.
    patches: Vec<f32>,
    /// Three intermediate rows (after the first convolution, bias and GELU), pixel-major, and
    /// which row each holds.
    ring: Vec<f32>,
    ring_rows: [usize; 3],
    /// One output row, pixel-major and channel-major.
    pixels: Vec<f32>,
    planes: Vec<f32>,
    /// Patch rows quantized to i16, when the products are integer.
    quantized: A16Rows,
}

impl Scratch {
    pub(crate) fn new(w: &Weights, g: &Geometry) -> Scratch {
        let (_, mid_w) = g.middle();
        let (_, out_w) = g.output();
        let k = w.first.k().max(w.second.k());
        Scratch {
            block: block_scratch(k, MAX_ROWS),
            patches: vec![0f32; (mid_w * w.first.k()).max(out_w * w.second.k())],
            ring: vec![0f32; 3 * mid_w * w.middle()],
            ring_rows: [usize::MAX; 3],
            pixels: vec![0f32; out_w * w.outputs()],
            planes: vec![0f32; out_w * w.outputs()],
            quantized: A16Rows::new(),
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
    rows: &mut [Vec<&mut [f32]>],
    scratch: &mut Scratch,
) {
    band(m, w, g, input, first_row, rows, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn band_avx2(
    m: Avx2,
    w: &Weights,
    g: &Geometry,
    input: &[f32],
    first_row: usize,
    rows: &mut [Vec<&mut [f32]>],
    scratch: &mut Scratch,
) {
    band(m, w, g, input, first_row, rows, scratch)
}

pub(crate) fn band_portable(
    w: &Weights,
    g: &Geometry,
    input: &[f32],
    first_row: usize,
    rows: &mut [Vec<&mut [f32]>],
    scratch: &mut Scratch,
) {
    #[cfg(target_arch = "aarch64")]
    band(
        super::super::gemm::Neon,
        w,
        g,
        input,
        first_row,
        rows,
        scratch,
    );
    #[cfg(not(target_arch = "aarch64"))]
    band(
        super::super::gemm::Scalar,
        w,
        g,
        input,
        first_row,
        rows,
        scratch,
    );
}

/// The rows of a 3×3 stride-2 window centred on row (or column) `2·i` of a side of `len`:
/// `None` where it falls in the padding.
#[inline(always)]
fn window(i: usize, len: usize) -> [Option<usize>; 3] {
    [(2 * i).checked_sub(1), Some(2 * i), Some(2 * i + 1)].map(|r| r.filter(|&r| r < len))
}

/// Output rows `first_row ..` (one per entry of `rows`: a slice of `out_width` values in each
/// output plane) on `input` (CHW planes). Panics if `input` is smaller than the geometry says.
#[inline(always)]
fn band<M: Micro>(
    m: M,
    w: &Weights,
    g: &Geometry,
    input: &[f32],
    first_row: usize,
    rows: &mut [Vec<&mut [f32]>],
    scratch: &mut Scratch,
) {
    let (mid_h, mid_w) = g.middle();
    let (_, out_w) = g.output();
    let (cmid, cout) = (w.middle(), w.outputs());
    assert!(input.len() >= w.inputs() * g.height * g.width);
    let Scratch {
        block,
        patches,
        ring,
        ring_rows,
        pixels,
        planes,
        quantized,
    } = scratch;
    let row_len = mid_w * cmid;
    for (i, out_planes) in rows.iter_mut().enumerate() {
        let y = first_row + i;
        let mid_rows = window(y, mid_h);
        for yy in mid_rows.into_iter().flatten() {
            let slot = yy % 3;
            if ring_rows[slot] != yy {
                let dst = &mut ring[slot * row_len..(slot + 1) * row_len];
                middle_row(m, w, g, input, yy, patches, dst, block);
                ring_rows[slot] = yy;
            }
        }
        // Patches of the second convolution: per output pixel, 9 runs of C_mid channels.
        let k = 9 * cmid;
        let patches = &mut patches[..out_w * k];
        for (ox, patch) in patches.chunks_exact_mut(k).enumerate() {
            let cols = window(ox, mid_w);
            for (ky, yy) in mid_rows.iter().enumerate() {
                for (kx, xx) in cols.iter().enumerate() {
                    let dst = &mut patch[(3 * ky + kx) * cmid..(3 * ky + kx + 1) * cmid];
                    match (yy, xx) {
                        (Some(yy), Some(xx)) => {
                            let at = (yy % 3) * row_len + xx * cmid;
                            dst.copy_from_slice(&ring[at..at + cmid]);
                        }
                        _ => dst.fill(0.0),
                    }
                }
            }
        }
        match &w.integer {
            Some((kernel, weights)) => {
                w8a16::multiply(*kernel, patches, weights, quantized, pixels)
            }
            None => product(m, patches, &w.second, pixels, block),
        }
        for pixel in pixels.chunks_exact_mut(cout) {
            for (o, &b) in pixel.iter_mut().zip(&w.second_bias) {
                *o += b;
            }
        }
        transpose(pixels, out_w, cout, planes);
        for (plane_row, values) in out_planes.iter_mut().zip(planes.chunks_exact(out_w)) {
            plane_row.copy_from_slice(values);
        }
    }
}

/// Intermediate row `yy`: the first convolution's patches gathered from the CHW input, times
/// its weights, plus bias, GELU, into `dst` (`mid_width × C_mid`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn middle_row<M: Micro>(
    m: M,
    w: &Weights,
    g: &Geometry,
    input: &[f32],
    yy: usize,
    patches: &mut [f32],
    dst: &mut [f32],
    block: &mut [f32],
) {
    let (_, mid_w) = g.middle();
    let cin = w.inputs();
    let k = 9 * cin;
    let patches = &mut patches[..mid_w * k];
    let rows = window(yy, g.height);
    let plane_len = g.height * g.width;
    for (mx, patch) in patches.chunks_exact_mut(k).enumerate() {
        let cols = window(mx, g.width);
        // Columns 2·mx − 1 ..= 2·mx + 1 all inside the image: each (channel, row) of the patch
        // is three neighbouring values, copied at once.
        let interior = match cols {
            [Some(first), Some(_), Some(_)] => Some(first),
            _ => None,
        };
        for c in 0..cin {
            let plane = &input[c * plane_len..(c + 1) * plane_len];
            for (ky, y) in rows.iter().enumerate() {
                let dst = &mut patch[c * 9 + 3 * ky..c * 9 + 3 * ky + 3];
                match (y, interior) {
                    (Some(y), Some(first)) => {
                        let at = y * g.width + first;
                        dst.copy_from_slice(&plane[at..at + 3]);
                    }
                    (Some(y), None) => {
                        for (d, x) in dst.iter_mut().zip(cols) {
                            *d = x.map_or(0.0, |x| plane[y * g.width + x]);
                        }
                    }
                    (None, _) => dst.fill(0.0),
                }
            }
        }
    }
    product(m, patches, &w.first, dst, block);
    for pixel in dst.chunks_exact_mut(w.middle()) {
        for (v, &b) in pixel.iter_mut().zip(&w.first_bias) {
            *v = gelu(M::FMA, *v + b);
        }
    }
}
