//! Our own int8 matrix product for the quantized encoder: i8 × i8 → i32, exact, with the bias and
//! the per-tensor or per-column requantization to i8 fused in.
//!
//! Why it exists: tract 0.23.9's AVX2 int8 kernel runs at ~1 % of peak on AMD CPUs (one
//! legacy-SSE `movq` in its inner loop, see `docs/performance.md`), and even fixed its
//! widen-and-multiply scheme is slower than FP32. tract has no hook to add kernels to its
//! dispatcher, so [`rewrite`] replaces the quantized `EinSum` nodes whose weights are constant by
//! [`QMatMulOp`], which runs one of these kernels:
//!
//! * [`Kernel::Avx512Vnni`]: `vpdpbusd` on u8 × i8 quads (64 exact MACs an instruction), 8×32
//!   tiles, on CPUs with AVX-512 VNNI (Ice Lake and later Xeons, Zen 4);
//! * [`Kernel::Avx2`]: `vpmaddwd` on i16 pairs (16 exact MACs an instruction), 6×16 tiles;
//! * [`Kernel::NeonDot`]: `sdot` (Armv8.2 dotprod, Cortex-A76/A78/X1, Jetson Orin), 8×8 tiles;
//! * [`Kernel::Portable`]: the same i16-pair scheme in plain Rust (the compiler vectorises it:
//!   NEON `smlal` on a Cortex-A53/A72, SSE2 `pmaddwd` on old x86), 6×16 tiles.
//!
//! All kernels give the same integers as [`reference_qmatmul`]; requantization is
//! `round_ties_even((acc + bias) as f32 * scale) + zero_point`, saturated to i8 — ONNX's
//! QLinearMatMul rule.
//!
//! `unsafe` here, each with its SAFETY note: SIMD intrinsics, inline `sdot` assembly, the
//! disjoint-rows output pointer of the threaded loop, and output tensors left unzeroed because
//! the product writes every element (`op::output_tensor`).
#![allow(unsafe_code)]

mod avx2;
pub mod conv;
pub mod epilogue;
mod neon;
mod op;
mod portable;
pub mod quantize_op;
pub mod rewrite;
mod vnni;

use std::fmt;

use tract_linalg::multithread::{current_tract_executor, Executor};

pub use conv::{patch_order, Im2Col, PaddedImage, QConvOp};
pub use epilogue::{fuse_epilogues, rewrite_gelu, Epilogue, GeluOp};
pub use op::{as_int8_op, chain_products, fold_layer_norms, Int8Op, QMatMulOp};
pub use quantize_op::{rewrite_quantize, QuantizeOp};
pub use rewrite::{
    compare_with_tract, fuse_quantization, rewrite_quantized_matmuls, Agreement, RewriteReport,
};

/// An int8 matmul implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Plain Rust on i16 pairs; runs everywhere.
    Portable,
    /// x86_64 AVX2 `vpmaddwd`.
    Avx2,
    /// x86_64 AVX-512 VNNI `vpdpbusd`.
    Avx512Vnni,
    /// aarch64 `sdot` (dotprod extension).
    NeonDot,
}

impl Kernel {
    /// The fastest kernel this CPU runs within `TINYSAM_ISA`'s ceiling (`avx2`: not VNNI,
    /// `portable`: neither x86 kernel; see `ops::graph::ceiling`), unless `TINYSAM_INT8_KERNEL`
    /// names another (`portable`, `avx2`, `vnni`, `sdot`); an unknown or unsupported name falls
    /// back to detection.
    pub fn detect() -> Kernel {
        if let Ok(name) = std::env::var("TINYSAM_INT8_KERNEL") {
            match name.parse::<Kernel>() {
                Ok(k) if k.is_supported() => return k,
                Ok(k) => log::warn!("TINYSAM_INT8_KERNEL={name}: {k} is not supported here"),
                Err(e) => log::warn!("TINYSAM_INT8_KERNEL={name}: {e}"),
            }
        }
        let cap = super::ops::graph::ceiling();
        let allowed = |k: &Kernel| match k {
            Kernel::Avx512Vnni => cap >= super::ops::graph::Isa::Avx512,
            Kernel::Avx2 => cap >= super::ops::graph::Isa::Avx2,
            Kernel::NeonDot | Kernel::Portable => true,
        };
        [Kernel::Avx512Vnni, Kernel::Avx2, Kernel::NeonDot]
            .into_iter()
            .find(|k| allowed(k) && k.is_supported())
            .unwrap_or(Kernel::Portable)
    }

    /// Whether this CPU can run the kernel.
    pub fn is_supported(self) -> bool {
        match self {
            Kernel::Portable => true,
            Kernel::Avx2 => avx2::is_supported(),
            Kernel::Avx512Vnni => vnni::is_supported(),
            Kernel::NeonDot => neon::is_supported(),
        }
    }

    /// Every kernel this CPU can run.
    pub fn supported() -> Vec<Kernel> {
        [
            Kernel::Portable,
            Kernel::Avx2,
            Kernel::Avx512Vnni,
            Kernel::NeonDot,
        ]
        .into_iter()
        .filter(|k| k.is_supported())
        .collect()
    }

    /// Tile rows.
    fn mr(self) -> usize {
        match self {
            Kernel::Portable | Kernel::Avx2 => PAIR_MR,
            Kernel::Avx512Vnni => vnni::MR,
            Kernel::NeonDot => neon::MR,
        }
    }

    /// Tile columns.
    fn nr(self) -> usize {
        match self {
            Kernel::Portable | Kernel::Avx2 => PAIR_NR,
            Kernel::Avx512Vnni => vnni::NR,
            Kernel::NeonDot => neon::NR,
        }
    }

    /// Depth step of the packed formats (2 for i16 pairs, 4 for `sdot` quads).
    fn k_step(self) -> usize {
        match self {
            Kernel::Portable | Kernel::Avx2 => 2,
            Kernel::Avx512Vnni | Kernel::NeonDot => 4,
        }
    }

    /// The name reported in kernel tables, e.g. `tinysam_i8_avx2_6x16`.
    pub fn report_name(self) -> String {
        format!("tinysam_i8_{self}_{}x{}", self.mr(), self.nr())
    }
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kernel::Portable => "portable",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512Vnni => "vnni",
            Kernel::NeonDot => "sdot",
        })
    }
}

impl std::str::FromStr for Kernel {
    type Err = String;
    fn from_str(s: &str) -> Result<Kernel, String> {
        match s {
            "portable" => Ok(Kernel::Portable),
            "avx2" => Ok(Kernel::Avx2),
            "vnni" => Ok(Kernel::Avx512Vnni),
            "sdot" => Ok(Kernel::NeonDot),
            other => Err(format!(
                "unknown int8 kernel `{other}` (portable, avx2, vnni, sdot)"
            )),
        }
    }
}

/// Tile rows of the i16-pair kernels.
const PAIR_MR: usize = 6;
/// Tile columns of the i16-pair kernels.
const PAIR_NR: usize = 16;

/// How a matrix sits in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// Row-major: element (row, col) at `row * cols + col`.
    RowMajor,
    /// Column-major: element (row, col) at `col * rows + row`.
    ColMajor,
}

/// Requantization of the i32 accumulators to i8, per output column.
#[derive(Debug, Clone)]
pub struct Requant {
    /// Added to the accumulator before scaling; one per column, or one for all.
    pub bias: Vec<i32>,
    /// `a_scale * b_scale / c_scale`; one per column, or one for all.
    pub scale: Vec<f32>,
    /// Output zero point.
    pub zero_point: i32,
}

impl PartialEq for Requant {
    fn eq(&self, other: &Requant) -> bool {
        self.bias == other.bias
            && self.zero_point == other.zero_point
            && self.scale.len() == other.scale.len()
            && self
                .scale
                .iter()
                .zip(&other.scale)
                .all(|(a, b)| a.to_bits() == b.to_bits())
    }
}
impl Eq for Requant {}

impl Requant {
    /// The i8 value of accumulator `acc` in column `col`.
    #[inline]
    pub fn apply(&self, acc: i32, col: usize) -> i8 {
        requantize(
            acc,
            pick(&self.bias, col),
            pick(&self.scale, col),
            self.zero_point,
        )
    }

    /// Whether the vectors fit `n` columns (length 1 or `n`, never empty).
    fn fits(&self, n: usize) -> bool {
        [self.bias.len(), self.scale.len()]
            .iter()
            .all(|&l| l == 1 || l == n)
    }
}

/// The requantization rule: `round_ties_even((acc + bias) as f32 * scale) + zero_point`,
/// saturated to i8 (the AVX2 kernel does the same in registers).
#[inline]
fn requantize(acc: i32, bias: i32, scale: f32, zero_point: i32) -> i8 {
    let scaled = (acc.wrapping_add(bias) as f32 * scale).round_ties_even();
    // `as i32` saturates, so huge scales cannot wrap before the clamp.
    (scaled as i32)
        .saturating_add(zero_point)
        .clamp(i8::MIN as i32, i8::MAX as i32) as i8
}

/// `v[col]`, or `v[0]` for a per-tensor value.
#[inline]
fn pick<T: Copy>(v: &[T], col: usize) -> T {
    if v.len() == 1 {
        v[0]
    } else {
        v[col]
    }
}

/// f32 → i8 as tract's `QuantizeLinearI8` does it: `x * scale` (scale is the reciprocal of
/// ONNX's), rounded to nearest even, + zero point, saturated; NaN gives the zero point.
#[derive(Debug, Clone, Copy)]
pub struct Quantize {
    /// Multiplier (1 / ONNX scale).
    pub scale: f32,
    /// Zero point.
    pub zero_point: i32,
}

impl Quantize {
    /// The i8 value of `x`.
    #[inline]
    pub fn apply(self, x: f32) -> i8 {
        // `as i32` saturates and maps NaN to 0, as tract's cast does.
        ((x * self.scale).round_ties_even() as i32)
            .saturating_add(self.zero_point)
            .clamp(i8::MIN as i32, i8::MAX as i32) as i8
    }

    /// Quantize `src` into `dst` (same length).
    pub fn slice(self, src: &[f32], dst: &mut [i8]) {
        avx2::quantize(src, self, dst)
    }
}

/// i8 → f32 as tract's `DequantizeLinearF32`: `(q - zero_point) * scale`.
#[derive(Debug, Clone, Copy)]
pub struct Dequantize {
    /// Scale.
    pub scale: f32,
    /// Zero point.
    pub zero_point: i32,
}

impl Dequantize {
    /// The f32 value of `q`.
    #[inline]
    pub fn apply(self, q: i8) -> f32 {
        (q as i32 - self.zero_point) as f32 * self.scale
    }
}

macro_rules! eq_by_bits {
    ($t:ty) => {
        impl PartialEq for $t {
            fn eq(&self, other: &$t) -> bool {
                self.scale.to_bits() == other.scale.to_bits() && self.zero_point == other.zero_point
            }
        }
        impl Eq for $t {}
    };
}
eq_by_bits!(Quantize);
eq_by_bits!(Dequantize);

/// Activations as an op receives them: i8 already, or f32 quantized while packing (a fused
/// `QuantizeLinear`).
#[derive(Debug, Clone, Copy)]
pub enum Activations<'a> {
    /// Quantized values.
    I8(&'a [i8]),
    /// Float values and how to quantize them.
    F32(&'a [f32], Quantize),
}

impl Activations<'_> {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Activations::I8(v) => v.len(),
            Activations::F32(v, _) => v.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Value `i`, quantized.
    #[inline]
    pub fn get(&self, i: usize) -> i8 {
        match self {
            Activations::I8(v) => v[i],
            Activations::F32(v, q) => q.apply(v[i]),
        }
    }

    /// Values `start .. start + dst.len()`, quantized, into `dst`.
    pub fn copy_to(&self, start: usize, dst: &mut [i8]) {
        match self {
            Activations::I8(v) => dst.copy_from_slice(&v[start..start + dst.len()]),
            Activations::F32(v, q) => q.slice(&v[start..start + dst.len()], dst),
        }
    }

    /// Values `start`, `start + stride`, … (`dst.len()` of them), quantized, into `dst`: f32
    /// values are gathered first and quantized as one slice (vectorised), not one by one
    /// (where the scalar rounding is a libm call on baseline x86_64).
    pub fn copy_strided_to(&self, start: usize, stride: usize, dst: &mut [i8]) {
        match self {
            Activations::I8(v) => {
                for (d, &x) in dst.iter_mut().zip(v[start..].iter().step_by(stride)) {
                    *d = x;
                }
            }
            Activations::F32(v, q) => GATHERED.with_borrow_mut(|gathered| {
                gathered.clear();
                gathered.extend(v[start..].iter().step_by(stride).take(dst.len()));
                q.slice(gathered, dst);
            }),
        }
    }
}

thread_local! {
    /// Strided f32 activations on their way to being quantized ([`Activations::copy_strided_to`]).
    static GATHERED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Where results go: i8, or f32 dequantized on the way out (a fused `DequantizeLinear`).
#[derive(Debug)]
pub enum Output<'a> {
    /// Quantized results.
    I8(&'a mut [i8]),
    /// Float results and how to dequantize them.
    F32(&'a mut [f32], Dequantize),
    /// Results dequantized to f32, finished (bias, GELU) and quantized again by the next
    /// product's input quantization (a fused `QuantizeLinear`), each task's rows in a buffer of
    /// its own: the f32 values never reach memory whole. Row-major only.
    Requantized(&'a mut [i8], Dequantize, Quantize),
}

impl Output<'_> {
    fn len(&self) -> usize {
        match self {
            Output::I8(v) | Output::Requantized(v, _, _) => v.len(),
            Output::F32(v, _) => v.len(),
        }
    }

    fn ptr(&mut self) -> TaskOut {
        match self {
            Output::I8(v) => TaskOut::Direct(OutPtr::I8(v.as_mut_ptr())),
            Output::F32(v, dq) => TaskOut::Direct(OutPtr::F32(v.as_mut_ptr(), *dq)),
            Output::Requantized(v, dq, q) => TaskOut::Requantized(v.as_mut_ptr(), *dq, *q),
        }
    }
}

thread_local! {
    /// A task's f32 rows on their way to [`Output::Requantized`], kept between tasks.
    static REQUANTIZE_ROWS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A constant right-hand matrix (k × n), packed once for one kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedB {
    kernel: Kernel,
    k: usize,
    n: usize,
    /// Packed depth: `k` rounded up to the kernel's depth step.
    kp: usize,
    /// i16 pairs (Portable, Avx2) or i8 quads (NeonDot, Avx512Vnni), panel after panel.
    data: PackedData,
    /// Per (padded) column, what the kernel's sums exceed the true ones by: `128 · Σ_k b[k][c]`
    /// for `vpdpbusd`, which reads A as `a + 128`; empty for the other kernels.
    col_excess: Vec<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PackedData {
    I16(Vec<i16>),
    I8(Vec<i8>),
}

impl PackedB {
    /// Pack the k × n matrix whose element (k, n) is `b(k, n)` for `kernel`.
    pub fn new(kernel: Kernel, k: usize, n: usize, b: impl Fn(usize, usize) -> i8) -> PackedB {
        let (step, nr) = (kernel.k_step(), kernel.nr());
        let kp = k.div_ceil(step) * step;
        let panels = n.div_ceil(nr);
        let at = |kk: usize, col: usize| -> i8 {
            if kk < k && col < n {
                b(kk, col)
            } else {
                0
            }
        };
        let data = match kernel {
            Kernel::Portable | Kernel::Avx2 => {
                // Per panel, per k pair: column c's (k, k+1) at [2c, 2c+1].
                let mut v = Vec::with_capacity(panels * kp * nr);
                for p in 0..panels {
                    for kk in (0..kp).step_by(2) {
                        for c in p * nr..(p + 1) * nr {
                            v.push(at(kk, c) as i16);
                            v.push(at(kk + 1, c) as i16);
                        }
                    }
                }
                PackedData::I16(v)
            }
            Kernel::NeonDot | Kernel::Avx512Vnni => {
                // Per panel, per k quad: column c's 4 depths at [4c .. 4c+4].
                let mut v = Vec::with_capacity(panels * kp * nr);
                for p in 0..panels {
                    for kk in (0..kp).step_by(4) {
                        for c in p * nr..(p + 1) * nr {
                            for d in 0..4 {
                                v.push(at(kk + d, c));
                            }
                        }
                    }
                }
                PackedData::I8(v)
            }
        };
        let col_excess = match kernel {
            Kernel::Avx512Vnni => (0..panels * nr)
                .map(|c| (0..k).map(|kk| 128 * i32::from(at(kk, c))).sum())
                .collect(),
            _ => Vec::new(),
        };
        PackedB {
            kernel,
            k,
            n,
            kp,
            data,
            col_excess,
        }
    }

    /// Pack a row-major k × n slice.
    pub fn from_row_major(kernel: Kernel, k: usize, n: usize, b: &[i8]) -> PackedB {
        assert_eq!(b.len(), k * n, "B is not k × n");
        PackedB::new(kernel, k, n, |kk, c| b[kk * n + c])
    }

    /// Depth.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns.
    pub fn n(&self) -> usize {
        self.n
    }

    /// The kernel it is packed for.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match &self.data {
            PackedData::I16(v) => v.len() * 2,
            PackedData::I8(v) => v.len(),
        }
    }
}

/// The left operand: `m` × `k` i8 values in `layout`.
#[derive(Debug, Clone, Copy)]
pub struct MatrixA<'a> {
    /// The values.
    pub data: Activations<'a>,
    /// Rows.
    pub m: usize,
    /// Memory order.
    pub layout: Layout,
}

/// Where the kernels read A's rows from: a matrix, or image patches gathered on the fly.
pub trait RowSource: Sync {
    /// Rows (m).
    fn rows(&self) -> usize;
    /// Values per row (k).
    fn depth(&self) -> usize;
    /// Write row `row` (`< rows()`) into `buf[..depth()]`.
    fn fetch(&self, row: usize, buf: &mut [i8]);
    /// Why the source is inconsistent, if it is.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

impl RowSource for MatrixA<'_> {
    fn rows(&self) -> usize {
        self.m
    }
    fn depth(&self) -> usize {
        self.data.len().checked_div(self.m).unwrap_or(0)
    }
    fn check(&self) -> Result<(), String> {
        if self.m == 0 || self.data.len().is_multiple_of(self.m) {
            Ok(())
        } else {
            Err(format!(
                "A has {} values, not a multiple of {} rows",
                self.data.len(),
                self.m
            ))
        }
    }
    fn fetch(&self, row: usize, buf: &mut [i8]) {
        let (m, k) = (self.m, self.depth());
        match self.layout {
            Layout::RowMajor => self.data.copy_to(row * k, &mut buf[..k]),
            // Row `row` is a column of memory: values `row`, `row + m`, ….
            Layout::ColMajor => self.data.copy_strided_to(row, m, &mut buf[..k]),
        }
    }
}

/// Errors of [`qmatmul`]: operands that do not fit together.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QMatMulError {
    /// A, B, the requantization or the output disagree on a size.
    #[error("int8 matmul operands do not fit: {0}")]
    Shape(String),
}

/// `c = requant(a · b)`, an `m × n` i8 matrix in `c_layout`, on the kernel `b` was packed for,
/// using tract's current executor (its thread pool when multithreaded).
pub fn qmatmul(
    a: &impl RowSource,
    b: &PackedB,
    requant: &Requant,
    c: Output<'_>,
    c_layout: Layout,
) -> Result<(), QMatMulError> {
    qmatmul_then(a, b, requant, c, c_layout, None)
}

/// What [`qmatmul_then`] does to each task's finished rows of a row-major f32 output, while
/// they are still in cache (the fused bias and GELU).
pub type RowsFinish<'f> = &'f (dyn Fn(&mut [f32]) + Sync);

/// [`qmatmul`], then `finish` on each task's rows (whole rows of `n` values) as soon as they
/// are written; `finish` needs a row-major f32 output.
pub fn qmatmul_then(
    a: &impl RowSource,
    b: &PackedB,
    requant: &Requant,
    mut c: Output<'_>,
    c_layout: Layout,
    finish: Option<RowsFinish<'_>>,
) -> Result<(), QMatMulError> {
    let (m, k, n) = (a.rows(), b.k, b.n);
    if finish.is_some() && (c_layout != Layout::RowMajor || matches!(c, Output::I8(_))) {
        return Err(QMatMulError::Shape(
            "a fused finish needs a row-major f32 output".into(),
        ));
    }
    if matches!(c, Output::Requantized(..)) && c_layout != Layout::RowMajor {
        return Err(QMatMulError::Shape(
            "a requantized output must be row-major".into(),
        ));
    }
    a.check().map_err(QMatMulError::Shape)?;
    if a.depth() != k {
        return Err(QMatMulError::Shape(format!(
            "A rows have {} values, B has depth {k}",
            a.depth()
        )));
    }
    if c.len() != m * n {
        return Err(QMatMulError::Shape(format!(
            "C has {} values, expected {m} × {n}",
            c.len()
        )));
    }
    if !requant.fits(n) {
        return Err(QMatMulError::Shape(format!(
            "bias ({}) and scale ({}) must have 1 or {n} values",
            requant.bias.len(),
            requant.scale.len()
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        for row in 0..m {
            for col in 0..n {
                let v = requant.apply(0, col);
                let at = c_index(c_layout, m, n, row, col);
                match &mut c {
                    Output::I8(c) => c[at] = v,
                    Output::F32(c, dq) => c[at] = dq.apply(v),
                    // Row by row below.
                    Output::Requantized(..) => {}
                }
            }
        }
        if let Output::Requantized(c, dq, q) = &mut c {
            // Row-major (checked above): each row dequantized, finished, quantized again.
            let mut row = vec![0f32; n];
            for out in c.chunks_exact_mut(n) {
                for (col, x) in row.iter_mut().enumerate() {
                    *x = dq.apply(requant.apply(0, col));
                }
                if let Some(finish) = finish {
                    finish(&mut row);
                }
                q.slice(&row, out);
            }
        }
        if let (Some(finish), Output::F32(c, _)) = (finish, &mut c) {
            finish(c);
        }
        return Ok(());
    }
    let kernel = b.kernel;
    let mr = kernel.mr();
    // Rows per task: several tiles, so the B panel is reused from cache; at least 2 tasks a
    // thread when there is enough work.
    let blocks = m.div_ceil(mr);
    let executor = current_tract_executor();
    let threads = match &executor {
        Executor::SingleThread => 1,
        Executor::MultiThread(pool) => pool.current_num_threads(),
        _ => rayon::current_num_threads(),
    };
    // Bias and scale for every (padded) column, so tiles read them as vectors.
    let cols = n.div_ceil(kernel.nr()) * kernel.nr();
    let columns = ColumnRequant {
        bias: (0..cols)
            .map(|c| {
                let excess = b.col_excess.get(c).copied().unwrap_or(0);
                pick(&requant.bias, c.min(n - 1)).wrapping_sub(excess)
            })
            .collect(),
        scale: (0..cols)
            .map(|c| pick(&requant.scale, c.min(n - 1)))
            .collect(),
        zero_point: requant.zero_point,
    };
    let blocks_per_task = (blocks / (threads * 4)).clamp(1, 16);
    let tasks = blocks.div_ceil(blocks_per_task);
    let out = c.ptr();
    let run_task = |task: usize| {
        let first_row = task * blocks_per_task * mr;
        let rows = (blocks_per_task * mr).min(m - first_row);
        let out = match out {
            TaskOut::Direct(out) => out,
            TaskOut::Requantized(p, dq, q) => {
                REQUANTIZE_ROWS.with_borrow_mut(|buf| {
                    buf.resize(rows * n, 0.0);
                    // SAFETY: the buffer holds this task's `rows × n` values, written at rows
                    // counted from `first_row` (the row base).
                    let rows_out = OutPtr::F32(buf.as_mut_ptr(), dq);
                    unsafe {
                        rows_task(
                            a,
                            b,
                            &columns,
                            (first_row, rows),
                            rows_out,
                            Layout::RowMajor,
                            first_row,
                        )
                    };
                    if let Some(finish) = finish {
                        finish(buf);
                    }
                    // SAFETY: the output is row-major (checked above): this task's rows are the
                    // `rows × n` bytes from row `first_row`, inside C; no other task touches them.
                    let done =
                        unsafe { std::slice::from_raw_parts_mut(p.add(first_row * n), rows * n) };
                    q.slice(buf, done);
                });
                return;
            }
        };
        // SAFETY: tasks cover disjoint row ranges, and every index written is < m × n.
        unsafe { rows_task(a, b, &columns, (first_row, rows), out, c_layout, 0) };
        if let (Some(finish), OutPtr::F32(p, _)) = (finish, out) {
            // SAFETY: the output is row-major (checked above), so this task's rows are the
            // `rows × n` values from row `first_row`, inside C; no other task touches them.
            let done = unsafe { std::slice::from_raw_parts_mut(p.add(first_row * n), rows * n) };
            finish(done);
        }
    };
    match executor {
        Executor::MultiThread(pool) if tasks > 1 => {
            use rayon::prelude::*;
            pool.install(|| (0..tasks).into_par_iter().for_each(run_task));
        }
        _ => (0..tasks).for_each(run_task),
    }
    Ok(())
}

/// A [`Requant`] expanded to one bias and one scale per (padded) output column.
struct ColumnRequant {
    bias: Vec<i32>,
    scale: Vec<f32>,
    zero_point: i32,
}

/// Where a task's tiles go: C itself (i8, or f32 dequantized), shared by tasks that write
/// disjoint elements.
#[derive(Clone, Copy)]
enum OutPtr {
    I8(*mut i8),
    F32(*mut f32, Dequantize),
}
// SAFETY: only used by `qmatmul`'s tasks, each writing its own rows.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Where a task's rows go: straight to C, or (see [`Output::Requantized`]) through the task's
/// f32 buffer to i8 C.
#[derive(Clone, Copy)]
enum TaskOut {
    Direct(OutPtr),
    Requantized(*mut i8, Dequantize, Quantize),
}
// SAFETY: only used by `qmatmul`'s tasks, each writing its own rows.
unsafe impl Send for TaskOut {}
unsafe impl Sync for TaskOut {}

#[inline]
fn c_index(layout: Layout, m: usize, n: usize, row: usize, col: usize) -> usize {
    match layout {
        Layout::RowMajor => row * n + col,
        Layout::ColMajor => col * m + row,
    }
}

/// Rows `first_row .. first_row + rows` of C: pack them from A, run every tile, requantize.
/// Row `r` of C is written at row `r - row_base` of `out` (0, or `first_row` for a task's own
/// buffer).
///
/// # Safety
/// `out` points to `(a.m - row_base) × b.n` values no other task writes in these rows, and a
/// non-zero `row_base` needs a row-major `out`.
unsafe fn rows_task(
    a: &impl RowSource,
    b: &PackedB,
    columns: &ColumnRequant,
    (first_row, rows): (usize, usize),
    out: OutPtr,
    c_layout: Layout,
    row_base: usize,
) {
    let kernel = b.kernel;
    let (mr, nr, kp) = (kernel.mr(), kernel.nr(), b.kp);
    let (m, n) = (a.rows(), b.n);
    let blocks = rows.div_ceil(mr);
    let (bias, scale, zp) = (&columns.bias, &columns.scale, columns.zero_point);
    let task_rows = first_row..first_row + rows;
    let mut tile = vec![0i8; mr * nr];
    let mut tile_f32 = vec![0f32; mr * nr];
    let spot = |blk: usize, p: usize| {
        (
            (first_row + blk * mr - row_base, p * nr),
            (mr, nr),
            (first_row + rows - row_base, n, m),
        )
    };
    // An i8 tile to C, dequantized on the way where C is f32.
    let place = |tile: &[i8], blk: usize, p: usize| {
        let (origin, dims, limits) = spot(blk, p);
        match out {
            OutPtr::I8(ptr) => store_tile(tile, origin, dims, limits, ptr, c_layout, |v| v),
            OutPtr::F32(ptr, dq) => {
                store_tile(tile, origin, dims, limits, ptr, c_layout, |v| dq.apply(v))
            }
        }
    };
    match &b.data {
        PackedData::I16(bdata) => {
            // A blocks: per k pair, each row's (k, k+1) as one i32 (low half = even k).
            let pairs = kp / 2;
            let mut apack = vec![0i32; blocks * pairs * mr];
            for_each_row(a, task_rows.clone(), (blocks, mr, kp), |blk, r, row| {
                // Row r of block blk: pair kk at (blk · pairs + kk) · mr + r.
                let block = &mut apack[blk * pairs * mr..(blk + 1) * pairs * mr];
                for (dst, src) in block.chunks_exact_mut(mr).zip(row[..kp].chunks_exact(2)) {
                    let lo = src[0] as i16 as u16 as u32;
                    let hi = src[1] as i16 as u16 as u32;
                    dst[r] = (lo | (hi << 16)) as i32;
                }
            });
            for (p, bpanel) in bdata.chunks_exact(kp * nr).enumerate() {
                let cols = p * nr..(p + 1) * nr;
                let (bias, scale) = (&bias[cols.clone()], &scale[cols]);
                for blk in 0..blocks {
                    let apanel = &apack[blk * pairs * mr..(blk + 1) * pairs * mr];
                    match kernel {
                        Kernel::Avx2 => avx2::tile(apanel, bpanel, (bias, scale, zp), &mut tile),
                        _ => portable::tile(apanel, bpanel, (bias, scale, zp), &mut tile),
                    }
                    place(&tile, blk, p);
                }
            }
        }
        PackedData::I8(bdata) => {
            // A blocks: per k quad, each row's 4 depths; for `vpdpbusd` as u8, `a + 128`.
            // A quad is moved as one 32-bit word (the bytes' order kept), the sign bits flipped
            // in all four at once: byte by byte this packing was a fifth of the products' time
            // outside the tiles (`perf`, 2026-12-05).
            let quads = kp / 4;
            let mut apack = vec![0i8; blocks * kp * mr];
            let flip = if kernel == Kernel::Avx512Vnni {
                u32::from_ne_bytes([0x80; 4])
            } else {
                0
            };
            for_each_row(a, task_rows, (blocks, mr, kp), |blk, r, row| {
                // Row r of block blk: quad q at ((blk · quads + q) · mr + r) · 4.
                let block = &mut apack[blk * quads * mr * 4..(blk + 1) * quads * mr * 4];
                for (dst, src) in block
                    .chunks_exact_mut(mr * 4)
                    .zip(row[..kp].chunks_exact(4))
                {
                    let word = u32::from_ne_bytes([
                        src[0] as u8,
                        src[1] as u8,
                        src[2] as u8,
                        src[3] as u8,
                    ]);
                    let [b0, b1, b2, b3] = (word ^ flip).to_ne_bytes();
                    dst[r * 4..r * 4 + 4]
                        .copy_from_slice(&[b0 as i8, b1 as i8, b2 as i8, b3 as i8]);
                }
            });
            for (p, bpanel) in bdata.chunks_exact(kp * nr).enumerate() {
                let cols = p * nr..(p + 1) * nr;
                let (bias, scale) = (&bias[cols.clone()], &scale[cols]);
                for blk in 0..blocks {
                    let apanel = &apack[blk * kp * mr..(blk + 1) * kp * mr];
                    match (kernel, out) {
                        // VNNI dequantizes in registers and hands over f32 tiles.
                        (Kernel::Avx512Vnni, OutPtr::F32(ptr, dq)) => {
                            let rq = (bias, scale, zp);
                            vnni::tile_f32(apanel, bpanel, rq, dq, &mut tile_f32);
                            let (origin, dims, limits) = spot(blk, p);
                            store_tile(&tile_f32, origin, dims, limits, ptr, c_layout, |v| v);
                        }
                        (Kernel::Avx512Vnni, OutPtr::I8(_)) => {
                            vnni::tile(apanel, bpanel, (bias, scale, zp), &mut tile);
                            place(&tile, blk, p);
                        }
                        _ => {
                            neon::tile(apanel, bpanel, (bias, scale, zp), &mut tile);
                            place(&tile, blk, p);
                        }
                    }
                }
            }
        }
    }
}

/// Hand every row of a task's `blocks` tiles of `mr` rows to `pack(block, row in block, values)`,
/// one at a time, zero-padded to the packed depth `kp`; rows past the task's end are zeros.
fn for_each_row(
    a: &impl RowSource,
    task_rows: std::ops::Range<usize>,
    (blocks, mr, kp): (usize, usize, usize),
    mut pack: impl FnMut(usize, usize, &[i8]),
) {
    let mut row_buf = vec![0i8; kp];
    for blk in 0..blocks {
        for r in 0..mr {
            let row = task_rows.start + blk * mr + r;
            if task_rows.contains(&row) {
                a.fetch(row, &mut row_buf);
            } else {
                row_buf.fill(0);
            }
            pack(blk, r, &row_buf);
        }
    }
}

/// Bias, scale (both one per tile column) and zero point of one tile's requantization.
type TileRequant<'a> = (&'a [i32], &'a [f32], i32);

/// Requantize a tile of i32 sums (row-major, `nr` columns) the scalar way, into `out`.
fn requant_tile(acc: &[i32], nr: usize, (bias, scale, zp): TileRequant<'_>, out: &mut [i8]) {
    for (i, (&v, o)) in acc.iter().zip(out.iter_mut()).enumerate() {
        let c = i % nr;
        *o = requantize(v, bias[c], scale[c], zp);
    }
}

/// Copy the valid part of one tile (row-major `mr × nr`) into C, through `convert`.
///
/// `origin` is the tile's (row, col); `limits` are (end of this task's rows, n, m); `out` points
/// to C (`m × n` values in `c_layout`).
#[inline]
fn store_tile<T: Copy, U>(
    tile: &[T],
    origin: (usize, usize),
    dims: (usize, usize),
    limits: (usize, usize, usize),
    out: *mut U,
    c_layout: Layout,
    convert: impl Fn(T) -> U,
) {
    let (row0, col0) = origin;
    let (mr, nr) = dims;
    let (row_end, n, m) = limits;
    let rows = mr.min(row_end.saturating_sub(row0));
    let cols = nr.min(n.saturating_sub(col0));
    match c_layout {
        Layout::RowMajor => {
            for r in 0..rows {
                let src = &tile[r * nr..r * nr + cols];
                // SAFETY: row0 + r < m and col0 + cols <= n: `cols` values of that row of C,
                // a row this task owns.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(out.add((row0 + r) * n + col0), cols) };
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d = convert(v);
                }
            }
        }
        // Column by column, so each column's `rows` values are one contiguous run of C.
        Layout::ColMajor => {
            for c in 0..cols {
                // SAFETY: rows row0 .. row0 + rows (< m) of column col0 + c (< n) are `rows`
                // consecutive values of C from `(col0 + c) · m + row0`, rows this task owns.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        out.add(c_index(c_layout, m, n, row0, col0 + c)),
                        rows,
                    )
                };
                for (r, d) in dst.iter_mut().enumerate() {
                    *d = convert(tile[r * nr + c]);
                }
            }
        }
    }
}

/// The straightforward definition: `c[i][j] = requant(Σ_k a[i][k] · b[k][j])`, b row-major k × n.
pub fn reference_qmatmul(
    a: MatrixA<'_>,
    b: &[i8],
    k: usize,
    n: usize,
    requant: &Requant,
    c_layout: Layout,
) -> Vec<i8> {
    let m = a.m;
    let mut c = vec![0i8; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0i32;
            for kk in 0..k {
                let av = match a.layout {
                    Layout::RowMajor => a.data.get(i * k + kk),
                    Layout::ColMajor => a.data.get(kk * m + i),
                };
                acc += av as i32 * b[kk * n + j] as i32;
            }
            c[c_index(c_layout, m, n, i, j)] = requant.apply(acc, j);
        }
    }
    c
}

#[cfg(test)]
mod tests;
