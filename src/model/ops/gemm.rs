//! f32 matrix products for our fused ops: `C = A·W` for a few rows of activations `A` already in
//! cache against a weight `W` packed once at load, with no dependency on tract (so that
//! `benches/pi5_mca.py` can compile it alone for the Cortex-A76 cycle model).
//!
//! tract's own products are fast on big operands, but inside a fused op each product is a
//! tile of a few dozen rows whose result is used at once (normalised, activated, multiplied
//! again) while it is still in L1/L2; calling tract's `MatMul` per tile would repack the
//! operands every time. Here `W` is packed once into column panels of [`PANEL`] values, `A` is
//! re-laid per block of `R` rows (`R · k` copies for `R · k · n` multiply-adds), and the block's
//! `R × PANEL` accumulators stay in registers for the whole `k` loop.
//!
//! The body is generic over `FMA` and `R` and marked `#[inline(always)]`: callers compile it
//! inside their own `#[target_feature]` functions (AVX-512, AVX2 + FMA, or plainly for NEON),
//! as the attention kernel does.
#![deny(unsafe_code)]

/// Columns per packed panel: two AVX-512 vectors, four AVX2 vectors, eight NEON vectors.
pub const PANEL: usize = 32;

/// A `k × n` f32 matrix packed into `⌈n / PANEL⌉` panels, each `k` rows of [`PANEL`] values
/// (columns past `n` are zero).
#[derive(Debug, Clone)]
pub struct PackedWeights {
    k: usize,
    n: usize,
    panels: Vec<f32>,
}

impl PackedWeights {
    /// A matrix of nothing, to be filled by [`PackedWeights::repack`] or
    /// [`PackedWeights::repack_transposed`].
    pub fn empty() -> PackedWeights {
        PackedWeights {
            k: 0,
            n: 0,
            panels: Vec::new(),
        }
    }

    /// Pack `b`, `k` rows of `n` values, row-major; `None` if the sizes do not fit.
    pub fn pack(b: &[f32], k: usize, n: usize) -> Option<PackedWeights> {
        let mut packed = PackedWeights::empty();
        packed.repack(b, k, n)?;
        Some(packed)
    }

    /// Pack `b` (as [`PackedWeights::pack`]) into this value, reusing its allocation: for
    /// operands packed anew many times in a loop. `None` (and `self` unchanged) if the sizes do
    /// not fit.
    pub fn repack(&mut self, b: &[f32], k: usize, n: usize) -> Option<()> {
        if k == 0 || n == 0 || k.checked_mul(n)? != b.len() {
            return None;
        }
        self.reset_panels(n.div_ceil(PANEL) * k * PANEL, n, k);
        for (p, panel) in self.panels.chunks_exact_mut(k * PANEL).enumerate() {
            let c0 = p * PANEL;
            let width = PANEL.min(n - c0);
            for (dst, src) in panel.chunks_exact_mut(PANEL).zip(b.chunks_exact(n)) {
                dst[..width].copy_from_slice(&src[c0..c0 + width]);
            }
        }
        (self.k, self.n) = (k, n);
        Some(())
    }

    /// Pack the transpose of `a` (`rows` rows of `cols` values, row-major), i.e. a `cols ×
    /// rows` matrix, into this value, reusing its allocation: for activations that serve as
    /// the wide operand of a product with a few weight rows. `None` (and `self` unchanged) if
    /// the sizes do not fit.
    pub fn repack_transposed(&mut self, a: &[f32], rows: usize, cols: usize) -> Option<()> {
        if rows == 0 || cols == 0 || rows.checked_mul(cols)? != a.len() {
            return None;
        }
        self.reset_panels(rows.div_ceil(PANEL) * cols * PANEL, rows, cols);
        for (panel, block) in self
            .panels
            .chunks_exact_mut(cols * PANEL)
            .zip(a.chunks(PANEL * cols))
        {
            for (j, row) in block.chunks_exact(cols).enumerate() {
                for (i, &v) in row.iter().enumerate() {
                    panel[i * PANEL + j] = v;
                }
            }
        }
        (self.k, self.n) = (cols, rows);
        Some(())
    }

    /// Make this a `k × n` matrix to be written in place, and return its panels: `⌈n /
    /// PANEL⌉` panels of `k` rows of [`PANEL`] values, value `(i, j)` at `(j / PANEL · k + i) ·
    /// PANEL + j % PANEL`. The caller writes every value it needs; the padding columns of a
    /// partial last panel are zero. `None` (and `self` unchanged) if `k` or `n` is zero or the
    /// size overflows.
    pub fn fill(&mut self, k: usize, n: usize) -> Option<&mut [f32]> {
        if k == 0 || n == 0 {
            return None;
        }
        let len = n.div_ceil(PANEL).checked_mul(k)?.checked_mul(PANEL)?;
        self.reset_panels(len, n, k);
        (self.k, self.n) = (k, n);
        Some(&mut self.panels)
    }

    /// Panels of `len` values for a matrix of `columns` columns in panels of `k` rows, ready to
    /// be overwritten: every value a repack writes is written, so only the padding columns of
    /// a partial last panel must be zero. A buffer of the same size (the loop case) keeps its
    /// values and zeroes that last panel alone; any other is zeroed whole.
    fn reset_panels(&mut self, len: usize, columns: usize, k: usize) {
        if self.panels.len() != len {
            self.panels.clear();
            self.panels.resize(len, 0.0);
        } else if !columns.is_multiple_of(PANEL) {
            let last = len - k * PANEL;
            self.panels[last..].fill(0.0);
        }
    }

    /// The matrix again, `k` rows of `n` values, row-major.
    pub fn unpack(&self) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        let mut b = vec![0f32; k * n];
        for (p, panel) in self.panels.chunks_exact(k * PANEL).enumerate() {
            let c0 = p * PANEL;
            let width = PANEL.min(n - c0);
            for (src, dst) in panel.chunks_exact(PANEL).zip(b.chunks_exact_mut(n)) {
                dst[c0..c0 + width].copy_from_slice(&src[..width]);
            }
        }
        b
    }

    /// Rows of the matrix (the products' inner dimension).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns of the matrix (of each product row).
    pub fn n(&self) -> usize {
        self.n
    }
}

/// Head `head` of a block of query rows `q` laid out `[T, H, c]` (`heads` = H), as the columns
/// of a logits product: its `T × c` rows transposed and packed as a `c × T` matrix. With one
/// head, a `[T, c]` block. `None` if the sizes do not fit.
pub fn pack_head_columns(q: &[f32], heads: usize, head: usize, c: usize) -> Option<PackedWeights> {
    let (columns, t) = head_columns(q, heads, head, c)?;
    PackedWeights::pack(&columns, c, t)
}

/// Head `head`'s query rows of `q` (`[T, heads, c]` row-major) as a `c × T` row-major matrix,
/// with `T`: the columns of a logits product, before packing or quantizing. `None` if the sizes
/// do not fit.
pub fn head_columns(q: &[f32], heads: usize, head: usize, c: usize) -> Option<(Vec<f32>, usize)> {
    let width = heads.checked_mul(c)?;
    if width == 0 || head >= heads || !q.len().is_multiple_of(width) {
        return None;
    }
    let t = q.len() / width;
    let mut columns = vec![0f32; c * t];
    for (ti, row) in q.chunks_exact(width).enumerate() {
        for (ci, &v) in row[head * c..(head + 1) * c].iter().enumerate() {
            columns[ci * t + ti] = v;
        }
    }
    Some((columns, t))
}

// Values compare by their bits (tract wants its ops `Eq`).
impl PartialEq for PackedWeights {
    fn eq(&self, other: &PackedWeights) -> bool {
        (self.k, self.n) == (other.k, other.n) && same_bits(&self.panels, &other.panels)
    }
}
impl Eq for PackedWeights {}

/// Whether two float slices hold the same values bit for bit.
pub fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Scratch for [`product`] with up to `k` inner values and blocks of up to `rows` rows: a
/// zero-padded copy of the last partial block, and a block's accumulators.
pub fn block_scratch(k: usize, rows: usize) -> Vec<f32> {
    vec![0f32; (k + PANEL) * rows]
}

/// A register-blocked product kernel: `R` rows times one panel, accumulators in registers.
/// Values of the implementing types exist only where the CPU runs them (their constructors
/// detect the features), which is what makes [`Micro::block`] safe to call.
pub trait Micro: Copy {
    /// Rows per block.
    const R: usize;
    /// Whether code compiled for this kernel has fused multiply-adds (for the element-wise
    /// work around the products, e.g. [`super::fastmath::gelu`]).
    const FMA: bool;
    /// `out[r] = Σ_i a[r][i] · panel[i]` for `R` rows of `a` (row `r` starts at `r · lda`,
    /// `k = panel.len() / PANEL` values each) and one panel (`k` rows of [`PANEL`]); `out`
    /// holds `R` rows of [`PANEL`]. Panics if `a` is too short.
    fn block(self, a: &[f32], lda: usize, panel: &[f32], out: &mut [f32]);
}

/// The `R` rows of a block as slices of `k` values; panics if `a` is too short.
#[inline(always)]
fn block_rows<const R: usize>(a: &[f32], lda: usize, k: usize) -> [&[f32]; R] {
    std::array::from_fn(|r| &a[r * lda..r * lda + k])
}

/// `c = a · w`: `a` holds rows of `w.k()` values, `c` as many rows of `w.n()` values.
/// `scratch` holds at least `(w.k() + PANEL) · M::R` values ([`block_scratch`]). The kernel
/// reads whole blocks of `M::R` rows where they are; the last partial block runs from a
/// zero-padded copy.
#[inline(always)]
pub fn product<M: Micro>(m: M, a: &[f32], w: &PackedWeights, c: &mut [f32], scratch: &mut [f32]) {
    let (k, n, r) = (w.k, w.n, M::R);
    let rows = (a.len() / k).min(c.len() / n);
    let (padded, acc) = scratch.split_at_mut(k * r);
    let acc = &mut acc[..r * PANEL];
    for r0 in (0..rows).step_by(r) {
        let live = r.min(rows - r0);
        let block = if live == r {
            &a[r0 * k..(r0 + r) * k]
        } else {
            padded.fill(0.0);
            padded[..live * k].copy_from_slice(&a[r0 * k..(r0 + live) * k]);
            &padded[..]
        };
        let out = &mut c[r0 * n..(r0 + live) * n];
        for (p, panel) in w.panels.chunks_exact(k * PANEL).enumerate() {
            m.block(block, k, panel, acc);
            let c0 = p * PANEL;
            let width = PANEL.min(n - c0);
            // A full panel's width is a constant, so its copy is a few vector moves rather than
            // a call to memmove per row.
            for (row, acc) in out.chunks_exact_mut(n).zip(acc.chunks_exact(PANEL)) {
                if width == PANEL {
                    row[c0..c0 + PANEL].copy_from_slice(&acc[..PANEL]);
                } else {
                    row[c0..c0 + width].copy_from_slice(&acc[..width]);
                }
            }
        }
    }
}

/// `dst[c · rows + r] = src[offset + r · stride + c]` for `r < rows`, `c < cols`: `rows` runs
/// of `cols` values, `stride` apart, transposed, in 8 × 8 tiles, value by value, for any value
/// type (the int8 convolution's rows); f32 matrices move whole tiles in registers through
/// [`super::transpose`].
#[inline(always)]
pub fn transpose_strided<T: Copy>(
    src: &[T],
    (rows, cols): (usize, usize),
    stride: usize,
    offset: usize,
    dst: &mut [T],
) {
    const T: usize = 8;
    for r0 in (0..rows).step_by(T) {
        let r1 = (r0 + T).min(rows);
        for c0 in (0..cols).step_by(T) {
            let c1 = (c0 + T).min(cols);
            for r in r0..r1 {
                let run = &src[offset + r * stride + c0..offset + r * stride + c1];
                for (c, &v) in (c0..c1).zip(run) {
                    dst[c * rows + r] = v;
                }
            }
        }
    }
}

/// Plain Rust, any CPU: as fast as the compiler makes it (a fallback; not used where one of
/// the SIMD kernels runs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Scalar;

impl Micro for Scalar {
    const R: usize = 2;
    const FMA: bool = false;

    fn block(self, a: &[f32], lda: usize, panel: &[f32], out: &mut [f32]) {
        let k = panel.len() / PANEL;
        let rows = block_rows::<2>(a, lda, k);
        for (acc, row) in out.chunks_exact_mut(PANEL).zip(rows) {
            acc.fill(0.0);
            for (w, &a) in panel.chunks_exact(PANEL).zip(row) {
                for (acc, &w) in acc.iter_mut().zip(w) {
                    *acc += a * w;
                }
            }
        }
    }
}

/// AVX-512F: 8 rows × 2 vectors of 16, 16 of the 32 vector registers.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
pub struct Avx512(());

#[cfg(target_arch = "x86_64")]
impl Avx512 {
    /// The kernel, if this CPU has AVX-512F.
    pub fn detect() -> Option<Avx512> {
        std::arch::is_x86_feature_detected!("avx512f").then_some(Avx512(()))
    }
}

#[cfg(target_arch = "x86_64")]
impl Micro for Avx512 {
    const R: usize = 8;
    const FMA: bool = true;

    #[inline(always)]
    fn block(self, a: &[f32], lda: usize, panel: &[f32], out: &mut [f32]) {
        let rows = block_rows::<8>(a, lda, panel.len() / PANEL);
        // SAFETY: an `Avx512` exists only where `detect` found AVX-512F.
        #[allow(unsafe_code)]
        unsafe {
            x86::block_avx512(rows, panel, out)
        }
    }
}

/// AVX2 + FMA: 3 rows × 4 vectors of 8, with the row broadcasts, all 16 vector registers.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy)]
pub struct Avx2(());

#[cfg(target_arch = "x86_64")]
impl Avx2 {
    /// The kernel, if this CPU has AVX2 and FMA.
    pub fn detect() -> Option<Avx2> {
        (std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"))
            .then_some(Avx2(()))
    }
}

#[cfg(target_arch = "x86_64")]
impl Micro for Avx2 {
    const R: usize = 3;
    const FMA: bool = true;

    #[inline(always)]
    fn block(self, a: &[f32], lda: usize, panel: &[f32], out: &mut [f32]) {
        let rows = block_rows::<3>(a, lda, panel.len() / PANEL);
        // SAFETY: an `Avx2` exists only where `detect` found AVX2 and FMA.
        #[allow(unsafe_code)]
        unsafe {
            x86::block_avx2(rows, panel, out)
        }
    }
}

/// NEON (every aarch64 CPU): 3 rows × 8 vectors of 4, 24 of the 32 vector registers.
#[cfg(target_arch = "aarch64")]
#[derive(Debug, Clone, Copy, Default)]
pub struct Neon;

#[cfg(target_arch = "aarch64")]
impl Micro for Neon {
    const R: usize = 3;
    const FMA: bool = true;

    #[inline(always)]
    fn block(self, a: &[f32], lda: usize, panel: &[f32], out: &mut [f32]) {
        arm::block_neon(block_rows::<3>(a, lda, panel.len() / PANEL), panel, out)
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use super::PANEL;
    use std::arch::x86_64::*;

    /// See [`super::Micro::block`]; `rows` hold `k = panel.len() / PANEL` values each.
    #[target_feature(enable = "avx512f")]
    pub(super) fn block_avx512(rows: [&[f32]; 8], panel: &[f32], out: &mut [f32]) {
        let k = panel.len() / PANEL;
        assert!(rows.iter().all(|r| r.len() == k) && out.len() >= 8 * PANEL);
        let mut acc = [[_mm512_setzero_ps(); 2]; 8];
        for (i, w) in panel.chunks_exact(PANEL).enumerate() {
            let (w0, w1) = w.split_at(16);
            // SAFETY: `w0` and `w1` hold 16 values each (PANEL = 32).
            let (w0, w1) = unsafe { (_mm512_loadu_ps(w0.as_ptr()), _mm512_loadu_ps(w1.as_ptr())) };
            for (acc, row) in acc.iter_mut().zip(&rows) {
                // SAFETY: i < k, the length of every row (asserted above).
                let a = _mm512_set1_ps(unsafe { *row.get_unchecked(i) });
                acc[0] = _mm512_fmadd_ps(a, w0, acc[0]);
                acc[1] = _mm512_fmadd_ps(a, w1, acc[1]);
            }
        }
        for (row, acc) in out.chunks_exact_mut(PANEL).zip(&acc) {
            let (o0, o1) = row.split_at_mut(16);
            // SAFETY: `o0` and `o1` hold 16 values each.
            unsafe {
                _mm512_storeu_ps(o0.as_mut_ptr(), acc[0]);
                _mm512_storeu_ps(o1.as_mut_ptr(), acc[1]);
            }
        }
    }

    /// See [`super::Micro::block`]; `rows` hold `k = panel.len() / PANEL` values each.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn block_avx2(rows: [&[f32]; 3], panel: &[f32], out: &mut [f32]) {
        let k = panel.len() / PANEL;
        assert!(rows.iter().all(|r| r.len() == k) && out.len() >= 3 * PANEL);
        let mut acc = [[_mm256_setzero_ps(); 4]; 3];
        for (i, w) in panel.chunks_exact(PANEL).enumerate() {
            // SAFETY: i < k, the length of every row (asserted above).
            let a = rows.map(|row| _mm256_set1_ps(unsafe { *row.get_unchecked(i) }));
            for (c, w) in w.chunks_exact(8).enumerate() {
                // SAFETY: `w` holds 8 values.
                let w = unsafe { _mm256_loadu_ps(w.as_ptr()) };
                for (acc, &a) in acc.iter_mut().zip(&a) {
                    acc[c] = _mm256_fmadd_ps(a, w, acc[c]);
                }
            }
        }
        for (row, acc) in out.chunks_exact_mut(PANEL).zip(&acc) {
            for (o, &v) in row.chunks_exact_mut(8).zip(acc) {
                // SAFETY: `o` holds 8 values.
                unsafe { _mm256_storeu_ps(o.as_mut_ptr(), v) };
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
#[allow(unsafe_code)]
mod arm {
    use super::PANEL;
    use std::arch::aarch64::*;

    /// See [`super::Micro::block`]; `rows` hold `k = panel.len() / PANEL` values each.
    #[inline(always)]
    pub(super) fn block_neon(rows: [&[f32]; 3], panel: &[f32], out: &mut [f32]) {
        let k = panel.len() / PANEL;
        assert!(rows.iter().all(|r| r.len() == k) && out.len() >= 3 * PANEL);
        // SAFETY: NEON is part of every aarch64 target Rust supports; every load and store
        // below reads or writes a chunk of exactly 4 values, and i < k, every row's length.
        unsafe {
            let mut acc = [[vdupq_n_f32(0.0); 8]; 3];
            for (i, w) in panel.chunks_exact(PANEL).enumerate() {
                let a = rows.map(|row| *row.get_unchecked(i));
                for (c, w) in w.chunks_exact(4).enumerate() {
                    let w = vld1q_f32(w.as_ptr());
                    for (acc, &a) in acc.iter_mut().zip(&a) {
                        acc[c] = vfmaq_n_f32(acc[c], w, a);
                    }
                }
            }
            for (row, acc) in out.chunks_exact_mut(PANEL).zip(&acc) {
                for (o, &v) in row.chunks_exact_mut(4).zip(acc) {
                    vst1q_f32(o.as_mut_ptr(), v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], k: usize, n: usize) -> Vec<f32> {
        let rows = a.len() / k;
        let mut c = vec![0f32; rows * n];
        for r in 0..rows {
            for j in 0..n {
                c[r * n + j] = (0..k).map(|i| a[r * k + i] * b[i * n + j]).sum();
            }
        }
        c
    }

    fn pattern(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0 - 1.0)
            .collect()
    }

    fn check<M: Micro>(m: M, name: &str) {
        for (rows, k, n) in [
            (16, 256, 256),
            (13, 64, 128),
            (5, 7, 40),
            (1, 3, 1),
            (9, 33, 31),
        ] {
            let a = pattern(rows * k, 1);
            let b = pattern(k * n, 2);
            let w = PackedWeights::pack(&b, k, n).expect("sizes fit");
            let want = naive(&a, &b, k, n);
            let mut c = vec![f32::NAN; rows * n];
            let mut scratch = block_scratch(k, M::R);
            product(m, &a, &w, &mut c, &mut scratch);
            let err = c
                .iter()
                .zip(&want)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(err < 1e-4 * k as f32, "{name} {rows}x{k}x{n}: {err}");
        }
    }

    /// Every shape class: whole blocks and leftover rows, whole and partial panels, on every
    /// kernel this CPU runs.
    #[test]
    fn products_match_the_definition() {
        check(Scalar, "scalar");
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(m) = Avx2::detect() {
                check(m, "avx2");
            }
            if let Some(m) = Avx512::detect() {
                check(m, "avx512");
            }
        }
        #[cfg(target_arch = "aarch64")]
        check(Neon, "neon");
    }

    /// Not a test: `cargo test --release --lib gemm_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    #[cfg(target_arch = "x86_64")]
    fn gemm_speed() {
        fn run<M: Micro>(m: M, a: &[f32], w: &PackedWeights, c: &mut [f32], scratch: &mut [f32]) {
            for tile in 0..a.len() / (16 * w.k()) {
                let a = &a[tile * 16 * w.k()..(tile + 1) * 16 * w.k()];
                let c = &mut c[tile * 16 * w.n()..(tile + 1) * 16 * w.n()];
                product(m, a, w, c, scratch);
            }
        }
        let (rows, k, n) = (4096, 256, 256);
        let a = pattern(rows * k, 1);
        let w = PackedWeights::pack(&pattern(k * n, 2), k, n).expect("sizes");
        let mut c = vec![0f32; rows * n];
        let mut scratch = block_scratch(k, 8);
        for _ in 0..3 {
            let t = std::time::Instant::now();
            if let Some(m) = Avx512::detect() {
                run(m, &a, &w, &mut c, &mut scratch);
            }
            let s = t.elapsed().as_secs_f64();
            eprintln!(
                "avx512 {:.2} ms, {:.1} GMAC/s",
                s * 1e3,
                (rows * k * n) as f64 / s / 1e9
            );
            let t = std::time::Instant::now();
            if let Some(m) = Avx2::detect() {
                run(m, &a, &w, &mut c, &mut scratch);
            }
            let s = t.elapsed().as_secs_f64();
            eprintln!(
                "avx2 {:.2} ms, {:.1} GMAC/s",
                s * 1e3,
                (rows * k * n) as f64 / s / 1e9
            );
        }
    }

    #[test]
    fn packing_rejects_sizes_that_do_not_fit() {
        assert!(PackedWeights::pack(&[1.0; 6], 2, 4).is_none());
        assert!(PackedWeights::pack(&[], 0, 4).is_none());
        assert!(PackedWeights::pack(&[1.0; 6], 2, 3).is_some());
    }
}
