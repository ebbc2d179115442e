//! Integer products of 16-bit activations and 8-bit weights (W8A16) for our fused float ops:
//! `C = A·W` with `W` quantized once at load (symmetric, one scale per output column) and each
//! row of `A` quantized to i16 as it is used (symmetric, one scale per row, from the row's
//! largest magnitude).
//!
//! Why 16 bits on the activation side: the convolution blocks of TinySAM's stage 0 lose mask
//! fidelity at 8-bit activations with per-tensor scales (`benches/stage0-int8-results.md`:
//! their GELU maps' channels differ widely in range), while the weights quantize to 8 bits with
//! no measurable loss. At 16 bits per row the activation error is ~2⁻¹⁵ of the row's largest
//! value, and the products still run on integer units: AVX-512 VNNI's `vpdpwssd` and AVX2's
//! `vpmaddwd` multiply i16 pairs into i32 lanes, twice the multiply-adds an instruction of f32
//! fused multiply-adds (AVX2's int8 kernel widens to i16 pairs too, so it costs the same there).
//! aarch64 has no such instruction: `sdot` is i8 only, and `smlal` does 4 i16 multiply-adds,
//! as many as an f32 `fmla`, which a Cortex-A76 issues on both vector pipes and `smlal` on one;
//! so there the runtime keeps these products in f32.
//!
//! Layout: `W` (`k × n`) is packed in panels of [`PANEL`] columns; within a panel, for each pair
//! of depths `(2j, 2j + 1)`, each column's two weights sit side by side as i16, so one 32-bit
//! lane holds a column's pair and one broadcast 32-bit value holds a row's pair of activations.
//! `k` is padded to even with zero weights. Every kernel computes the same exact i32 sums and
//! dequantizes them the same way, `(acc as f32 · row scale) · column scale`, so all give the
//! same bits.
//!
//! Free of tract, as [`super::gemm`] is.
#![allow(unsafe_code)]

use super::fastmath::lane_max_abs;

/// Columns per packed panel: two AVX-512 registers of i32 lanes.
pub const PANEL: usize = 32;
/// Rows per tile of the widest kernel.
pub const MAX_ROWS: usize = 8;

/// The kernels, chosen at run time from what the CPU reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum W8A16Kernel {
    /// AVX-512F + VNNI: `vpdpwssd`, 8 rows × 32 columns.
    Vnni,
    /// AVX2: `vpmaddwd` + `vpaddd`, 4 rows × 16 columns.
    Avx2,
    /// Plain Rust: the reference, and the fallback where neither x86 kernel runs. Not chosen
    /// by the runtime: compiled for aarch64 it uses NEON's `smlal`, no faster than f32 `fmla`
    /// there (see the module docs and `benches/pi5-mca-results.md`).
    Portable,
}

impl W8A16Kernel {
    /// The fastest kernel this CPU runs.
    pub fn detect() -> W8A16Kernel {
        [W8A16Kernel::Vnni, W8A16Kernel::Avx2]
            .into_iter()
            .find(|k| k.is_supported())
            .unwrap_or(W8A16Kernel::Portable)
    }

    /// Whether this CPU runs it.
    pub fn is_supported(self) -> bool {
        match self {
            W8A16Kernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            W8A16Kernel::Vnni => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(target_arch = "x86_64")]
            W8A16Kernel::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every kernel this CPU runs, the fastest first.
    pub fn supported() -> Vec<W8A16Kernel> {
        [W8A16Kernel::Vnni, W8A16Kernel::Avx2, W8A16Kernel::Portable]
            .into_iter()
            .filter(|k| k.is_supported())
            .collect()
    }

    /// Its name in kernel tables: `w8a16_vnni`, `w8a16_avx2`, `w8a16_portable`.
    pub fn name(self) -> &'static str {
        match self {
            W8A16Kernel::Vnni => "w8a16_vnni",
            W8A16Kernel::Avx2 => "w8a16_avx2",
            W8A16Kernel::Portable => "w8a16_portable",
        }
    }

    /// Rows per tile.
    fn rows(self) -> usize {
        match self {
            W8A16Kernel::Vnni => 8,
            W8A16Kernel::Avx2 => 4,
            W8A16Kernel::Portable => 4,
        }
    }
}

/// A `k × n` weight matrix quantized to i8 per column and packed (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct W8Weights {
    k: usize,
    n: usize,
    /// Per panel: `⌈k / 2⌉` depth pairs × [`PANEL`] columns × 2 values.
    panels: Vec<i16>,
    /// One per column, padded with zeros to whole panels: the weight is `q · scale`.
    scales: Vec<f32>,
    /// The largest activation magnitude (in quantized units) whose products cannot overflow an
    /// i32 sum over `k`: 32767 for `k ≤ 516`.
    activation_limit: i16,
}

impl Eq for W8Weights {}

impl W8Weights {
    /// Quantize and pack `w`, `k` rows of `n` values, row-major: each column scaled so that its
    /// largest magnitude is 127, rounded to nearest even. `None` if the sizes do not fit. A
    /// column of zeros (or of non-finite values) gets the scale 0 and zero weights.
    pub fn quantize(w: &[f32], k: usize, n: usize) -> Option<W8Weights> {
        W8Weights::quantize_levels(w, k, n, 127)
    }

    /// [`W8Weights::quantize`] with each column's largest magnitude at `levels` (1 to 2047)
    /// instead of 127: wider weights on the same kernels (they hold each weight as i16), for
    /// products of two activations where neither side is a constant that 8 bits represent well.
    /// The activations' limit falls as the weights widen, so that the i32 sums still cannot
    /// overflow: at 2047 levels (12 bits) and a depth of 256 the activations get 12 bits too.
    /// `None` if the sizes do not fit or `levels` is out of range.
    pub fn quantize_levels(w: &[f32], k: usize, n: usize, levels: i16) -> Option<W8Weights> {
        let mut quantized = W8Weights {
            k: 0,
            n: 0,
            panels: Vec::new(),
            scales: Vec::new(),
            activation_limit: 0,
        };
        quantized.requantize(w, k, n, levels)?;
        Some(quantized)
    }

    /// Quantize `w` (`k` rows of `n` values, row-major) into this matrix's buffers at `levels`
    /// (what [`W8Weights::quantize_levels`] does into new ones): for fused ops whose weight-side
    /// operand changes per tile (a tile's image tokens), so that it allocates nothing once the
    /// sizes are set and vectorises (a panel's 32 columns at a time; inlined, so with the
    /// caller's target features). `None` if the sizes do not fit or `levels` is out of range.
    #[inline(always)]
    pub fn requantize(&mut self, w: &[f32], k: usize, n: usize, levels: i16) -> Option<()> {
        if k == 0 || n == 0 || k.checked_mul(n)? != w.len() || !(1..=2047).contains(&levels) {
            return None;
        }
        let top = f32::from(levels);
        let pairs = k.div_ceil(2);
        let panels_n = n.div_ceil(PANEL);
        self.activation_limit = activation_limit(pairs, levels)?;
        (self.k, self.n) = (k, n);
        self.scales.resize(panels_n * PANEL, 0.0);
        self.panels.resize(panels_n * pairs * PANEL * 2, 0);
        let row = |r: usize| &w[r * n..(r + 1) * n];
        for (p, (panel, scales)) in self
            .panels
            .chunks_exact_mut(pairs * PANEL * 2)
            .zip(self.scales.chunks_exact_mut(PANEL))
            .enumerate()
        {
            let c0 = p * PANEL;
            let width = PANEL.min(n - c0);
            let mut largest = [0f32; PANEL];
            for r in 0..k {
                for (m, &x) in largest.iter_mut().zip(&row(r)[c0..c0 + width]) {
                    // NaN compares false and is skipped, as `f32::max` skips it.
                    if x.abs() > *m {
                        *m = x.abs();
                    }
                }
            }
            let mut inverse = [0f32; PANEL];
            for ((s, i), &m) in scales.iter_mut().zip(inverse.iter_mut()).zip(&largest) {
                (*s, *i) = if m > 0.0 && m.is_finite() {
                    (m / top, top / m)
                } else {
                    (0.0, 0.0)
                };
            }
            const ZEROS: [f32; PANEL] = [0f32; PANEL];
            for (j, pair) in panel.chunks_exact_mut(PANEL * 2).enumerate() {
                let first = &row(2 * j)[c0..c0 + width];
                let second = if 2 * j + 1 < k {
                    &row(2 * j + 1)[c0..c0 + width]
                } else {
                    &ZEROS[..width]
                };
                let (used, unused) = pair.split_at_mut(width * 2);
                for (((q, &a), &b), &i) in used
                    .chunks_exact_mut(2)
                    .zip(first)
                    .zip(second)
                    .zip(&inverse)
                {
                    // |a · i| ≤ `levels` for finite values; NaN (and ∞ · 0) gives 0.
                    q[0] = round_to_i16(a * i);
                    q[1] = round_to_i16(b * i);
                }
                unused.fill(0);
            }
        }
        Some(())
    }

    /// Rows of the matrix (the products' inner dimension).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns of the matrix.
    pub fn n(&self) -> usize {
        self.n
    }

    /// i16 values per quantized activation row: `k` rounded up to even.
    pub fn row_stride(&self) -> usize {
        self.k.div_ceil(2) * 2
    }

    /// The weights as they are used, `k` rows of `n` values (quantized and scaled back).
    pub fn dequantized(&self) -> Vec<f32> {
        let (k, n, pairs) = (self.k, self.n, self.k.div_ceil(2));
        let mut w = vec![0f32; k * n];
        for r in 0..k {
            for c in 0..n {
                let (p, i) = (c / PANEL, c % PANEL);
                let q = self.panels[((p * pairs + r / 2) * PANEL + i) * 2 + r % 2];
                w[r * n + c] = f32::from(q) * self.scales[c];
            }
        }
        w
    }
}

/// The largest activation magnitude (in quantized units) whose products with weights of up to
/// `levels` (127 for 8 bits) cannot overflow an i32 sum over `pairs` depth pairs:
/// `|Σ| ≤ 2·pairs · limit · levels` must stay below 2^31 (32767 for up to 258 pairs of 8-bit
/// weights). `None` when that would leave the activations under 11 bits (past ~2 million depths
/// at 8 bits).
fn activation_limit(pairs: usize, levels: i16) -> Option<i16> {
    let levels = usize::try_from(levels).ok().filter(|&l| l > 0)?;
    let limit = (i32::MAX as usize / pairs.checked_mul(2 * levels)?).min(i16::MAX as usize);
    if limit < 1024 {
        return None;
    }
    i16::try_from(limit).ok()
}

/// Rows of activations quantized to i16 for a product with a [`W8Weights`]: reusable buffers,
/// one per task.
#[derive(Debug, Default, Clone)]
pub struct A16Rows {
    /// Row-major, `stride` values a row (the depth padded to even with zeros), then zero rows up
    /// to a whole tile.
    values: Vec<i16>,
    /// One per row (and per padding row): the activation is `q · scale`.
    scales: Vec<f32>,
    rows: usize,
    stride: usize,
}

impl A16Rows {
    /// Empty buffers.
    pub fn new() -> A16Rows {
        A16Rows::default()
    }

    /// Quantize `a` (rows of `w.k()` values, row-major) for a product with `w`: each row scaled
    /// so that its largest magnitude is `w`'s activation limit, rounded to nearest even. A row
    /// of zeros (or with a non-finite largest value) gets the scale 0. Panics if `a` is not whole
    /// rows.
    #[inline(always)]
    pub fn quantize(&mut self, a: &[f32], w: &W8Weights) {
        let k = w.k;
        assert!(k > 0 && a.len().is_multiple_of(k));
        let rows = a.len() / k;
        let stride = w.row_stride();
        let padded = rows.div_ceil(MAX_ROWS) * MAX_ROWS;
        // Every value is written below (rows, their padding to `stride`, the padding rows): the
        // buffers are only resized, not cleared first.
        self.values.resize(padded * stride, 0);
        self.scales.resize(padded, 0.0);
        let limit = f32::from(w.activation_limit);
        let (used, padding) = self.values.split_at_mut(rows * stride);
        padding.fill(0);
        self.scales[rows..].fill(0.0);
        for ((src, dst), scale) in a
            .chunks_exact(k)
            .zip(used.chunks_exact_mut(stride))
            .zip(self.scales.iter_mut())
        {
            let (dst, pad) = dst.split_at_mut(k);
            pad.fill(0);
            let largest = lane_max_abs(src);
            if !(largest > 0.0 && largest.is_finite()) {
                dst.fill(0);
                *scale = 0.0;
                continue;
            }
            let inverse = limit / largest;
            *scale = largest / limit;
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = round_to_i16(x * inverse);
            }
        }
        self.rows = rows;
        self.stride = stride;
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// A fused op's two products (its first, then its second) as W8A16 on one kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProductPair {
    /// The kernel both run on.
    pub kernel: W8A16Kernel,
    /// The op's first product.
    pub first: W8Weights,
    /// The op's second product.
    pub second: W8Weights,
}

impl ProductPair {
    /// `first` and `second` (each `k` rows of `n` values, row-major, with their sizes)
    /// quantized for `kernel`; `None` if either does not fit.
    pub fn quantize(
        kernel: W8A16Kernel,
        (first, k1, n1): (&[f32], usize, usize),
        (second, k2, n2): (&[f32], usize, usize),
    ) -> Option<ProductPair> {
        Some(ProductPair {
            kernel,
            first: W8Weights::quantize(first, k1, n1)?,
            second: W8Weights::quantize(second, k2, n2)?,
        })
    }
}

/// `c = a·w` with `a` (rows of `w.k()` values) quantized into `rows` first: the step a fused op
/// takes per block of rows. Inlined, so that the quantization compiles with the caller's
/// target features.
#[inline(always)]
pub fn multiply(kernel: W8A16Kernel, a: &[f32], w: &W8Weights, rows: &mut A16Rows, c: &mut [f32]) {
    rows.quantize(a, w);
    product(kernel, rows, w, c);
}

/// `v` rounded to the nearest integer (ties to even), for `|v| ≤ 2^22`, as i16 (the caller keeps
/// `|v|` within i16); NaN gives 0. Adding 1.5 · 2^23 leaves the rounded integer in the low
/// mantissa bits: plain adds and integer subtracts, which vectorise on every target (a
/// rounding instruction and a saturating conversion would not on x86's SSE2 baseline).
#[inline(always)]
fn round_to_i16(v: f32) -> i16 {
    const SHIFTER: f32 = 12_582_912.0;
    let bits = (v + SHIFTER).to_bits().wrapping_sub(SHIFTER.to_bits());
    // `v == v` is false for NaN only.
    #[allow(clippy::eq_op)]
    let q = if v == v { bits as i16 } else { 0 };
    q
}

/// `c = A·W` for the rows in `a` (quantized for `w`), `c` row-major `a.rows() × w.n()`, on
/// `kernel` (which must be supported by this CPU; see [`W8A16Kernel::detect`]). Panics if the
/// sizes do not fit.
pub fn product(kernel: W8A16Kernel, a: &A16Rows, w: &W8Weights, c: &mut [f32]) {
    let (m, n) = (a.rows, w.n);
    assert!(a.stride == w.row_stride() && c.len() == m * n);
    assert!(a.values.len() >= m.div_ceil(MAX_ROWS) * MAX_ROWS * a.stride);
    assert!(kernel.is_supported());
    let pairs = a.stride / 2;
    let mr = kernel.rows();
    let mut tile = [0f32; MAX_ROWS * PANEL];
    for (p, panel) in w.panels.chunks_exact(pairs * PANEL * 2).enumerate() {
        let c0 = p * PANEL;
        let width = PANEL.min(n - c0);
        let scales = &w.scales[c0..c0 + PANEL];
        for r0 in (0..m).step_by(mr) {
            let rows = mr.min(m - r0);
            let a_rows = &a.values[r0 * a.stride..(r0 + mr) * a.stride];
            let a_scales = &a.scales[r0..r0 + mr];
            let direct = rows == mr && width == PANEL;
            // Whole tiles are written in place, partial ones through `tile`.
            let (out, out_stride): (&mut [f32], usize) = if direct {
                (&mut c[r0 * n + c0..], n)
            } else {
                (&mut tile[..], PANEL)
            };
            run_tile(
                kernel,
                (a_rows, a_scales),
                (panel, scales),
                pairs,
                out,
                out_stride,
            );
            if !direct {
                for r in 0..rows {
                    let at = (r0 + r) * n + c0;
                    c[at..at + width].copy_from_slice(&tile[r * PANEL..r * PANEL + width]);
                }
            }
        }
    }
}

/// A constant `rows × k` matrix as the *rows* of a product whose other operand is a panel of
/// activations ([`A16Panel`]): the transposed form of [`W8Weights`], for fused ops that keep
/// their tiles with tokens along the vector lanes (weights as rows, tokens as the panel). Each
/// row quantized to i8 (symmetric, one scale per row, rounded to nearest even), stored as i16
/// so that one 32-bit load holds a row's pair of depths, padded with zero rows to whole tiles.
#[derive(Debug, Clone, PartialEq)]
pub struct W8Rows {
    rows: usize,
    k: usize,
    /// Row-major, [`W8Rows::stride`] values a row, then zero rows up to a multiple of
    /// [`MAX_ROWS`].
    values: Vec<i16>,
    /// One per row (and per padding row): the weight is `q · scale`.
    scales: Vec<f32>,
    /// As [`W8Weights`]'s: the largest activation (in quantized units) whose products cannot
    /// overflow an i32 sum over `k`.
    activation_limit: i16,
}

impl Eq for W8Rows {}

impl W8Rows {
    /// Quantize `w`, `rows` rows of `k` values, row-major: each row scaled so that its largest
    /// magnitude is 127. `None` if the sizes do not fit. A row of zeros (or with a non-finite
    /// value) gets the scale 0 and zero weights.
    pub fn quantize(w: &[f32], rows: usize, k: usize) -> Option<W8Rows> {
        if rows == 0 || k == 0 || rows.checked_mul(k)? != w.len() {
            return None;
        }
        let stride = k.div_ceil(2) * 2;
        let padded = rows.div_ceil(MAX_ROWS) * MAX_ROWS;
        let mut values = vec![0i16; padded.checked_mul(stride)?];
        let mut scales = vec![0f32; padded];
        for ((src, dst), scale) in w
            .chunks_exact(k)
            .zip(values.chunks_exact_mut(stride))
            .zip(scales.iter_mut())
        {
            let largest = src.iter().fold(0f32, |m, v| m.max(v.abs()));
            if !(largest > 0.0 && largest.is_finite() && src.iter().all(|v| v.is_finite())) {
                continue;
            }
            *scale = largest / 127.0;
            let inverse = 127.0 / largest;
            for (d, &x) in dst.iter_mut().zip(src) {
                *d = (x * inverse).round_ties_even().clamp(-127.0, 127.0) as i16;
            }
        }
        Some(W8Rows {
            rows,
            k,
            values,
            scales,
            activation_limit: activation_limit(stride / 2, 127)?,
        })
    }

    /// Rows of the matrix (of the product's result).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Values per row (the products' inner dimension).
    pub fn k(&self) -> usize {
        self.k
    }

    /// i16 values per stored row: `k` rounded up to even.
    fn stride(&self) -> usize {
        self.k.div_ceil(2) * 2
    }

    /// The matrix as it is used, `rows` rows of `k` values (quantized and scaled back).
    pub fn dequantized(&self) -> Vec<f32> {
        let stride = self.stride();
        (0..self.rows * self.k)
            .map(|i| {
                let (r, d) = (i / self.k, i % self.k);
                f32::from(self.values[r * stride + d]) * self.scales[r]
            })
            .collect()
    }
}

/// One panel of activations — `k` rows of [`PANEL`] columns, a column per token — quantized to
/// i16 per column for a product with a [`W8Rows`]: reusable buffers, one per task. Laid out as
/// [`W8Weights`]' panels are (each column's pair of depths side by side), so the same kernels
/// run both forms.
#[derive(Debug, Clone)]
pub struct A16Panel {
    /// `⌈k / 2⌉` depth pairs × [`PANEL`] columns × 2 values.
    values: Vec<i16>,
    /// One per column: the activation is `q · scale`.
    scales: [f32; PANEL],
    k: usize,
}

impl Default for A16Panel {
    fn default() -> A16Panel {
        A16Panel {
            values: Vec::new(),
            scales: [0.0; PANEL],
            k: 0,
        }
    }
}

impl A16Panel {
    /// Empty buffers.
    pub fn new() -> A16Panel {
        A16Panel::default()
    }

    /// Quantize `panel` (`w.k()` rows of [`PANEL`] values, row-major, of which the first `cols`
    /// columns are used; the others become zeros) for a product with `w`: each column scaled so
    /// that its largest magnitude is `w`'s activation limit, rounded to nearest even. A column of
    /// zeros, or whose largest magnitude is not finite, gets the scale 0. Panics if `panel` is
    /// not `w.k()` whole rows or `cols` exceeds [`PANEL`].
    #[inline(always)]
    pub fn quantize(&mut self, panel: &[f32], cols: usize, w: &W8Rows) {
        let k = w.k;
        assert!(panel.len() == k * PANEL && cols <= PANEL);
        let limit = f32::from(w.activation_limit);
        let mut largest = [0f32; PANEL];
        for row in panel.chunks_exact(PANEL) {
            for (m, &x) in largest.iter_mut().zip(row) {
                // NaNs are passed over: they quantize to 0 below.
                *m = if x.abs() > *m { x.abs() } else { *m };
            }
        }
        let mut inverse = [0f32; PANEL];
        for (i, ((&m, inv), scale)) in largest
            .iter()
            .zip(inverse.iter_mut())
            .zip(self.scales.iter_mut())
            .enumerate()
        {
            let used = i < cols && m > 0.0 && m.is_finite();
            *inv = if used { limit / m } else { 0.0 };
            *scale = if used { m / limit } else { 0.0 };
        }
        let pairs = k.div_ceil(2);
        self.values.resize(pairs * PANEL * 2, 0);
        self.k = k;
        let zeros = [0f32; PANEL];
        for (j, out) in self.values.chunks_exact_mut(PANEL * 2).enumerate() {
            let even = &panel[2 * j * PANEL..(2 * j + 1) * PANEL];
            let odd = panel
                .get((2 * j + 1) * PANEL..(2 * j + 2) * PANEL)
                .unwrap_or(&zeros);
            for (((o, &e), &d), &inv) in out.chunks_exact_mut(2).zip(even).zip(odd).zip(&inverse) {
                // Times 0 for unused columns: a NaN or infinity there gives NaN, which rounds
                // to 0.
                o[0] = round_to_i16(e * inv);
                o[1] = round_to_i16(d * inv);
            }
        }
    }
}

/// `c = W · P` on `kernel`: `w.rows()` rows of [`PANEL`] values, row `r` at `r · out_stride` in
/// `c` (which must be supported by this CPU; see [`W8A16Kernel::detect`]). Panics if the
/// sizes do not fit.
#[inline(always)]
pub fn rows_times_panel(
    kernel: W8A16Kernel,
    w: &W8Rows,
    p: &A16Panel,
    c: &mut [f32],
    out_stride: usize,
) {
    let stride = w.stride();
    let pairs = stride / 2;
    assert!(p.k == w.k && p.values.len() == pairs * PANEL * 2);
    assert!(out_stride >= PANEL && c.len() >= (w.rows - 1) * out_stride + PANEL);
    assert!(kernel.is_supported());
    let mr = kernel.rows();
    let mut tile = [0f32; MAX_ROWS * PANEL];
    for r0 in (0..w.rows).step_by(mr) {
        let rows = mr.min(w.rows - r0);
        // Whole padding rows exist up to a multiple of MAX_ROWS, hence of every kernel's rows.
        let a_rows = &w.values[r0 * stride..(r0 + mr) * stride];
        let a_scales = &w.scales[r0..r0 + mr];
        let direct = rows == mr;
        let (out, at_stride): (&mut [f32], usize) = if direct {
            (&mut c[r0 * out_stride..], out_stride)
        } else {
            (&mut tile[..], PANEL)
        };
        run_tile(
            kernel,
            (a_rows, a_scales),
            (&p.values, &p.scales),
            pairs,
            out,
            at_stride,
        );
        if !direct {
            for r in 0..rows {
                let at = (r0 + r) * out_stride;
                c[at..at + PANEL].copy_from_slice(&tile[r * PANEL..(r + 1) * PANEL]);
            }
        }
    }
}

/// One tile on `kernel`: its `kernel.rows()` rows of `a` (`2 · pairs` values each, with their
/// scales) times the `pairs` × [`PANEL`] panel (with its column scales), into `out`, rows
/// `out_stride` apart. Checks what the kernels read and write; panics if it does not fit or the
/// CPU lacks the kernel.
#[inline(always)]
fn run_tile(
    kernel: W8A16Kernel,
    (a, a_scales): (&[i16], &[f32]),
    (panel, scales): (&[i16], &[f32]),
    pairs: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let mr = kernel.rows();
    assert!(kernel.is_supported() && out_stride >= PANEL);
    assert!(a.len() >= mr * pairs * 2 && a_scales.len() >= mr);
    assert!(panel.len() >= pairs * PANEL * 2 && scales.len() >= PANEL);
    assert!(out.len() >= (mr - 1) * out_stride + PANEL);
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU has AVX-512F and VNNI, and the slices hold what the kernel reads and
        // writes (both checked above).
        W8A16Kernel::Vnni => unsafe {
            tile_vnni(a, a_scales, panel, scales, pairs, out, out_stride)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, AVX2 and 4 rows.
        W8A16Kernel::Avx2 => unsafe {
            tile_avx2(a, a_scales, panel, scales, pairs, out, out_stride)
        },
        _ => tile_portable(a, a_scales, panel, scales, pairs, out, out_stride),
    }
}

/// 4 rows × [`PANEL`] columns in plain Rust, in a form compilers vectorise: 8 columns at a time
/// (4 × 16 i32 accumulators, which fit NEON's registers), each column's two sums (even and odd
/// depths) in adjacent lanes, by widening i16 multiply-adds (NEON's `smlal`), each row's pairs
/// sliced once so that the loop has no bounds checks; the two sums are added at the end.
#[inline(always)]
fn tile_portable(
    a: &[i16],
    a_scales: &[f32],
    panel: &[i16],
    scales: &[f32],
    pairs: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    const MR: usize = 4;
    const COLS: usize = 8;
    let stride = pairs * 2;
    // Each row's pairs, checked once here so that the loop below has no bounds checks.
    let rows: [&[i16]; MR] = std::array::from_fn(|r| &a[r * stride..(r + 1) * stride]);
    let panel = &panel[..pairs * PANEL * 2];
    for part in 0..PANEL / COLS {
        let mut acc = [[0i32; COLS * 2]; MR];
        let pairs_of = |r: usize| rows[r].chunks_exact(2);
        let steps = panel
            .chunks_exact(PANEL * 2)
            .zip(pairs_of(0))
            .zip(pairs_of(1))
            .zip(pairs_of(2))
            .zip(pairs_of(3));
        for ((((b, p0), p1), p2), p3) in steps {
            let b = &b[part * COLS * 2..(part + 1) * COLS * 2];
            for (acc, p) in acc.iter_mut().zip([p0, p1, p2, p3]) {
                let pattern: [i16; COLS * 2] = std::array::from_fn(|c| p[c % 2]);
                for ((acc, &x), &y) in acc.iter_mut().zip(&pattern).zip(b) {
                    *acc += i32::from(x) * i32::from(y);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let at = r * out_stride + part * COLS;
            let row = &mut out[at..at + COLS];
            let scales = &scales[part * COLS..];
            for ((o, pair), &s) in row.iter_mut().zip(acc.chunks_exact(2)).zip(scales) {
                *o = ((pair[0] + pair[1]) as f32 * a_scales[r]) * s;
            }
        }
    }
}

/// 8 rows × 32 columns on `vpdpwssd`.
///
/// # Safety
/// AVX-512F and VNNI present; `a` holds 8 rows of `2 · pairs` values, `panel` `pairs` × 64,
/// `a_scales` 8 and `scales` 32 values; `out` 8 rows of 32 values `out_stride` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn tile_vnni(
    a: &[i16],
    a_scales: &[f32],
    panel: &[i16],
    scales: &[f32],
    pairs: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    use std::arch::x86_64::*;
    const MR: usize = 8;
    debug_assert!(a.len() >= MR * pairs * 2 && panel.len() >= pairs * PANEL * 2);
    debug_assert!(out.len() >= (MR - 1) * out_stride + PANEL);
    let mut acc = [[_mm512_setzero_si512(); 2]; MR];
    let (ap, bp) = (a.as_ptr(), panel.as_ptr());
    let stride = pairs * 2;
    for j in 0..pairs {
        // SAFETY (all reads): j < pairs, so the pair's 64 weights and each row's two
        // activations are inside the slices (the caller's contract).
        let b = unsafe {
            [
                _mm512_loadu_si512(bp.add(j * PANEL * 2) as *const __m512i),
                _mm512_loadu_si512(bp.add(j * PANEL * 2 + PANEL) as *const __m512i),
            ]
        };
        for (r, acc) in acc.iter_mut().enumerate() {
            let pair =
                unsafe { std::ptr::read_unaligned(ap.add(r * stride + 2 * j) as *const i32) };
            let av = _mm512_set1_epi32(pair);
            acc[0] = _mm512_dpwssd_epi32(acc[0], av, b[0]);
            acc[1] = _mm512_dpwssd_epi32(acc[1], av, b[1]);
        }
    }
    // SAFETY: 32 column scales (the caller's contract).
    let sv = unsafe {
        [
            _mm512_loadu_ps(scales.as_ptr()),
            _mm512_loadu_ps(scales.as_ptr().add(16)),
        ]
    };
    let op = out.as_mut_ptr();
    for (r, acc) in acc.iter().enumerate() {
        let rs = _mm512_set1_ps(a_scales[r]);
        for h in 0..2 {
            let v = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc[h]), rs), sv[h]);
            // SAFETY: row r's 32 values are inside `out` (the caller's contract).
            unsafe { _mm512_storeu_ps(op.add(r * out_stride + 16 * h), v) };
        }
    }
}

/// 4 rows × 32 columns on `vpmaddwd`, in two halves of 16 columns (8 accumulators each).
///
/// # Safety
/// AVX2 present; `a` holds 4 rows of `2 · pairs` values, `panel` `pairs` × 64, `a_scales` 4
/// and `scales` 32 values; `out` 4 rows of 32 values `out_stride` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tile_avx2(
    a: &[i16],
    a_scales: &[f32],
    panel: &[i16],
    scales: &[f32],
    pairs: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    use std::arch::x86_64::*;
    const MR: usize = 4;
    debug_assert!(a.len() >= MR * pairs * 2 && panel.len() >= pairs * PANEL * 2);
    debug_assert!(out.len() >= (MR - 1) * out_stride + PANEL);
    let (ap, bp, op) = (a.as_ptr(), panel.as_ptr(), out.as_mut_ptr());
    let stride = pairs * 2;
    for half in 0..2 {
        let mut acc = [[_mm256_setzero_si256(); 2]; MR];
        for j in 0..pairs {
            // SAFETY (all reads): j < pairs and half < 2, inside the slices (the caller's
            // contract).
            let at = j * PANEL * 2 + half * PANEL;
            let b = unsafe {
                [
                    _mm256_loadu_si256(bp.add(at) as *const __m256i),
                    _mm256_loadu_si256(bp.add(at + 16) as *const __m256i),
                ]
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                let pair =
                    unsafe { std::ptr::read_unaligned(ap.add(r * stride + 2 * j) as *const i32) };
                let av = _mm256_set1_epi32(pair);
                acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(av, b[0]));
                acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(av, b[1]));
            }
        }
        // SAFETY: 32 column scales (the caller's contract).
        let sv = unsafe {
            [
                _mm256_loadu_ps(scales.as_ptr().add(half * 16)),
                _mm256_loadu_ps(scales.as_ptr().add(half * 16 + 8)),
            ]
        };
        for (r, acc) in acc.iter().enumerate() {
            let rs = _mm256_set1_ps(a_scales[r]);
            for h in 0..2 {
                let v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[h]), rs), sv[h]);
                // SAFETY: row r's 32 values are inside `out` (the caller's contract).
                unsafe { _mm256_storeu_ps(op.add(r * out_stride + half * 16 + 8 * h), v) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in about [-1, 1].
    fn values(len: usize, seed: usize) -> Vec<f32> {
        crate::model::test_support::pattern_values(len, seed, 1.0)
    }

    /// The exact sums of the quantized operands, dequantized as the kernels do.
    fn reference(a: &A16Rows, w: &W8Weights) -> Vec<f32> {
        let (m, n, k) = (a.rows, w.n, w.k);
        let pairs = w.k.div_ceil(2);
        let mut c = vec![0f32; m * n];
        for r in 0..m {
            for col in 0..n {
                let (p, i) = (col / PANEL, col % PANEL);
                let mut acc = 0i64;
                for d in 0..k {
                    let q = w.panels[((p * pairs + d / 2) * PANEL + i) * 2 + d % 2];
                    acc += i64::from(a.values[r * a.stride + d]) * i64::from(q);
                }
                let acc = i32::try_from(acc).expect("the sum fits an i32");
                c[r * n + col] = (acc as f32 * a.scales[r]) * w.scales[col];
            }
        }
        c
    }

    #[test]
    fn every_kernel_gives_the_reference_bits() {
        // Odd depths, partial panels, partial tiles, a zero row.
        for (m, k, n) in [
            (1, 1, 1),
            (7, 3, 5),
            (13, 64, 256),
            (9, 255, 64),
            (16, 256, 33),
        ] {
            let w = W8Weights::quantize(&values(k * n, 1), k, n).expect("sizes fit");
            let mut a_f = values(m * k, 2);
            a_f[..k].fill(0.0);
            let mut a = A16Rows::new();
            a.quantize(&a_f, &w);
            let expected = reference(&a, &w);
            for kernel in W8A16Kernel::supported() {
                let mut c = vec![f32::NAN; m * n];
                product(kernel, &a, &w, &mut c);
                let same = c
                    .iter()
                    .zip(&expected)
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{kernel:?} at {m}×{k}×{n}");
            }
        }
    }

    #[test]
    fn products_are_close_to_the_float_ones() {
        let (m, k, n) = (24, 256, 64);
        let (a_f, w_f) = (values(m * k, 3), values(k * n, 4));
        let w = W8Weights::quantize(&w_f, k, n).expect("sizes fit");
        let mut a = A16Rows::new();
        a.quantize(&a_f, &w);
        let mut c = vec![0f32; m * n];
        product(W8A16Kernel::detect(), &a, &w, &mut c);
        // Against the float product: the weights' rounding, at most half a step of 1/127 of a
        // column's largest weight per term, averages out over 256 terms.
        let (mut err, mut norm) = (0f64, 0f64);
        for r in 0..m {
            for col in 0..n {
                let exact: f64 = (0..k)
                    .map(|d| f64::from(a_f[r * k + d]) * f64::from(w_f[d * n + col]))
                    .sum();
                err += (f64::from(c[r * n + col]) - exact).powi(2);
                norm += exact * exact;
            }
        }
        let relative = (err / norm).sqrt();
        assert!(relative < 0.01, "relative error {relative}");
        // And exactly the product of the dequantized operands, up to f32 rounding.
        let wd = w.dequantized();
        for col in 0..n {
            let exact: f64 = (0..k)
                .map(|d| {
                    let q = f64::from(a.values[d]) * f64::from(a.scales[0]);
                    q * f64::from(wd[d * n + col])
                })
                .sum();
            assert!((f64::from(c[col]) - exact).abs() < 1e-5, "column {col}");
        }
    }

    #[test]
    fn requantizing_in_place_equals_quantizing_anew() {
        // One matrix reused across sizes (growing and shrinking, odd depths, partial panels)
        // and levels (12 bits, 8 bits, 1) and odd values (NaN, an infinity, a zero column).
        let mut reused = W8Weights::quantize(&[1.0], 1, 1).expect("sizes fit");
        let sizes = [(64, 256, 5), (3, 5, 6), (64, 16, 7), (65, 33, 8), (1, 1, 9)];
        for ((k, n, seed), levels) in sizes.into_iter().zip([2047, 127, 2047, 127, 1]) {
            let mut w = values(k * n, seed);
            w[0] = f32::NAN;
            if k * n > 4 {
                w[n - 1] = f32::INFINITY;
            }
            if n > 2 {
                for r in 0..k {
                    w[r * n + 2] = 0.0;
                }
            }
            reused.requantize(&w, k, n, levels).expect("sizes fit");
            let fresh = W8Weights::quantize_levels(&w, k, n, levels).expect("sizes fit");
            assert_eq!(reused, fresh, "{k}×{n} at {levels}");
            // Against the definition, a column at a time: the largest finite magnitude at
            // `levels`, rounded to nearest even; NaN and columns without a finite largest
            // value give 0.
            let top = f32::from(levels);
            let got = fresh.dequantized();
            for c in 0..n {
                let largest = (0..k).map(|r| w[r * n + c].abs()).fold(0f32, f32::max);
                for r in 0..k {
                    let want = if largest > 0.0 && largest.is_finite() {
                        let q = (w[r * n + c] * (top / largest)).round_ties_even();
                        let q = if q.is_nan() { 0.0 } else { q.clamp(-top, top) };
                        q * (largest / top)
                    } else {
                        0.0
                    };
                    let at = r * n + c;
                    // Compared as numbers: a negative value rounding to 0 is -0 here, 0 there.
                    assert_eq!(got[at], want, "{k}×{n} at {levels}: {at}");
                }
            }
        }
        let bad = reused.requantize(&[0.0; 6], 4, 2, 127);
        assert!(bad.is_none(), "6 values are not 4×2");
        assert!(reused.requantize(&[], 0, 2, 127).is_none());
        assert!(
            reused.requantize(&[0.0; 4], 2, 2, 2048).is_none(),
            "over 12 bits"
        );
        assert!(
            W8Weights::quantize_levels(&[0.0; 4], 2, 2, 0).is_none(),
            "no levels"
        );
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        for (v, q) in [
            (-2.5, -2),
            (-1.5, -2),
            (-0.5, 0),
            (0.5, 0),
            (1.5, 2),
            (0.499_999_97, 0),
            (32_767.0, 32_767),
            (-32_767.0, -32_767),
            (f32::NAN, 0),
        ] {
            assert_eq!(round_to_i16(v), q, "{v}");
        }
    }

    #[test]
    fn odd_values_give_numbers_not_panics() {
        let w = W8Weights::quantize(&[f32::NAN, 1.0, 0.0, 0.0], 2, 2).expect("sizes fit");
        // Columns [NaN, 0] and [1, 0].
        assert_eq!(w.scales[0], 0.0, "a column of NaN and zero has scale 0");
        assert_eq!(w.scales[1], 1.0 / 127.0);
        let mut a = A16Rows::new();
        a.quantize(&[f32::INFINITY, 1.0, f32::NAN, 2.0], &w);
        let mut c = vec![0f32; 4];
        product(W8A16Kernel::detect(), &a, &w, &mut c);
        assert_eq!(a.scales[0], 0.0, "a row with an infinity is zeroed");
        assert!(c[2].is_finite() && c[3].is_finite(), "{c:?}");
        assert!(W8Weights::quantize(&[1.0; 3], 2, 2).is_none());
        assert!(W8Weights::quantize(&[], 0, 2).is_none());
    }

    /// The exact sums of [`rows_times_panel`]'s quantized operands, dequantized as the kernels
    /// do: `w.rows()` rows of [`PANEL`].
    fn rows_reference(w: &W8Rows, p: &A16Panel) -> Vec<f32> {
        let stride = w.stride();
        let mut c = vec![0f32; w.rows * PANEL];
        for r in 0..w.rows {
            for col in 0..PANEL {
                let acc: i64 = (0..w.k)
                    .map(|d| {
                        let q = p.values[((d / 2) * PANEL + col) * 2 + d % 2];
                        i64::from(w.values[r * stride + d]) * i64::from(q)
                    })
                    .sum();
                let acc = i32::try_from(acc).expect("the sum fits an i32");
                c[r * PANEL + col] = (acc as f32 * w.scales[r]) * p.scales[col];
            }
        }
        c
    }

    #[test]
    fn rows_times_panel_gives_the_reference_bits_on_every_kernel() {
        // Odd depths, partial tiles of rows, partial panels, a zero column; `c` wider than a
        // panel (the caller's stride).
        for (rows, k, cols, out_stride) in [
            (1, 1, 1, PANEL),
            (5, 3, 7, PANEL),
            (128, 64, 32, PANEL),
            (13, 255, 17, 40),
        ] {
            let w = W8Rows::quantize(&values(rows * k, 5), rows, k).expect("sizes fit");
            let mut panel = values(k * PANEL, 6);
            for row in panel.chunks_exact_mut(PANEL) {
                row[0] = 0.0;
            }
            let mut p = A16Panel::new();
            p.quantize(&panel, cols, &w);
            assert_eq!(p.scales[0], 0.0, "a zero column has scale 0");
            assert!(p.scales[cols..].iter().all(|&s| s == 0.0), "unused columns");
            let expected = rows_reference(&w, &p);
            for kernel in W8A16Kernel::supported() {
                let mut c = vec![f32::NAN; (rows - 1) * out_stride + PANEL];
                rows_times_panel(kernel, &w, &p, &mut c, out_stride);
                for r in 0..rows {
                    let got = &c[r * out_stride..r * out_stride + PANEL];
                    let want = &expected[r * PANEL..(r + 1) * PANEL];
                    let same = got
                        .iter()
                        .zip(want)
                        .all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{kernel:?} at {rows}×{k}×{cols}, row {r}");
                }
            }
        }
    }

    #[test]
    fn rows_times_panel_is_close_to_the_float_product() {
        let (rows, k) = (128, 64);
        let (w_f, panel) = (values(rows * k, 7), values(k * PANEL, 8));
        let w = W8Rows::quantize(&w_f, rows, k).expect("sizes fit");
        let mut p = A16Panel::new();
        p.quantize(&panel, PANEL, &w);
        let mut c = vec![0f32; rows * PANEL];
        rows_times_panel(W8A16Kernel::detect(), &w, &p, &mut c, PANEL);
        let (mut err, mut norm) = (0f64, 0f64);
        let wd = w.dequantized();
        for r in 0..rows {
            for col in 0..PANEL {
                let term = |d: usize, wv: f32| f64::from(wv) * f64::from(panel[d * PANEL + col]);
                let exact: f64 = (0..k).map(|d| term(d, w_f[r * k + d])).sum();
                err += (f64::from(c[r * PANEL + col]) - exact).powi(2);
                norm += exact * exact;
                // The activations at 16 bits: the dequantized weights' product, up to ~2⁻¹⁵
                // of each column's largest activation per term.
                let with_quantized: f64 = (0..k).map(|d| term(d, wd[r * k + d])).sum();
                let close = (f64::from(c[r * PANEL + col]) - with_quantized).abs() < 1e-3;
                assert!(close, "row {r}, column {col}");
            }
        }
        let relative = (err / norm).sqrt();
        assert!(relative < 0.01, "relative error {relative}");
    }

    #[test]
    fn odd_panel_values_give_numbers_not_panics() {
        let w = W8Rows::quantize(&[1.0, 2.0, f32::NAN, 1.0], 2, 2).expect("sizes fit");
        assert_eq!(w.scales[1], 0.0, "a row with a NaN is zeroed");
        let mut panel = vec![1.0f32; 2 * PANEL];
        panel[0] = f32::INFINITY;
        panel[PANEL + 1] = f32::NAN;
        let mut p = A16Panel::new();
        p.quantize(&panel, PANEL, &w);
        assert_eq!(p.scales[0], 0.0, "a column with an infinity is zeroed");
        let mut c = vec![0f32; 2 * PANEL];
        rows_times_panel(W8A16Kernel::detect(), &w, &p, &mut c, PANEL);
        assert!(c.iter().all(|v| v.is_finite()), "{c:?}");
        assert!(W8Rows::quantize(&[1.0; 3], 2, 2).is_none());
        assert!(W8Rows::quantize(&[], 0, 2).is_none());
    }

    #[test]
    fn deep_products_cannot_overflow() {
        let k = 4096;
        let w = W8Weights::quantize(&vec![-1.0; k], k, 1).expect("sizes fit");
        let mut a = A16Rows::new();
        a.quantize(&vec![1.0; k], &w);
        let mut c = vec![0f32; 1];
        for kernel in W8A16Kernel::supported() {
            product(kernel, &a, &w, &mut c);
            assert!(
                (c[0] + k as f32).abs() < 1e-2 * k as f32,
                "{kernel:?}: {}",
                c[0]
            );
        }
    }
}

/// Speed of the quantization and of each kernel on stage 0's shapes (one image row of 256
/// pixels): `cargo test --release --lib -- --ignored w8a16_speed --nocapture`.
#[cfg(test)]
#[test]
#[ignore]
fn w8a16_speed() {
    let values = |len: usize| crate::model::test_support::pattern_values(len, 9, 1.0);
    for (m, k, n) in [(256, 64, 256), (256, 256, 64)] {
        let w = W8Weights::quantize(&values(k * n), k, n).expect("sizes");
        let a_f = values(m * k);
        let mut a = A16Rows::new();
        let reps = 200;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            a.quantize(std::hint::black_box(&a_f), &w);
        }
        let q = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
        let mut c = vec![0f32; m * n];
        for kernel in W8A16Kernel::supported() {
            let t = std::time::Instant::now();
            for _ in 0..reps {
                product(kernel, std::hint::black_box(&a), &w, &mut c);
            }
            let us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
            eprintln!(
                "{m}×{k}×{n}: quantize {q:.1} µs, {kernel:?} {us:.1} µs ({:.1} GMAC/s)",
                (m * k * n) as f64 / us / 1e3
            );
        }
    }
}
