//! What an int8 product does to its dequantized f32 output before handing it on: the layer's
//! bias (a per-column add) and, in TinyViT's MLPs, the exact GELU after it.
//!
//! In the QDQ graph both are tract nodes of their own after the `DequantizeLinear`: a
//! broadcast `Add` and `GeluExact`, each a full single-threaded pass over the output (the fc1
//! outputs are 33 MB). [`fuse_epilogues`] folds them into the [`QMatMulOp`] before them, which
//! applies them in one pass on tract's threads right after the product.
#![deny(unsafe_code)]

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::op::{OutAxis, QMatMulOp};
use super::Layout;
use crate::model::ops::fastmath;
use crate::model::ops::graph::{bias_add_after, is_gelu_exact, sole_consumer, Isa};

/// Per-column bias and optional GELU applied to an f32 output of `n` columns.
#[derive(Debug, Clone, Default)]
pub struct Epilogue {
    /// Added to every row, one value per column.
    pub bias: Option<Arc<Vec<f32>>>,
    /// Then `x · Φ(x)`, GELU with the exact (erf) form, as ONNX's `Gelu` and tract's `GeluExact`.
    pub gelu: bool,
}

impl PartialEq for Epilogue {
    fn eq(&self, other: &Epilogue) -> bool {
        self.gelu == other.gelu && crate::model::ops::same_bits(&self.bias, &other.bias)
    }
}
impl Eq for Epilogue {}

impl Epilogue {
    /// Whether it does nothing.
    pub fn is_empty(&self) -> bool {
        self.bias.is_none() && !self.gelu
    }

    /// Apply to `out`, rows of `n` values, on tract's threads.
    pub fn apply(&self, out: &mut [f32], n: usize) -> TractResult<()> {
        if self.is_empty() || n == 0 {
            return Ok(());
        }
        ensure!(
            out.len().is_multiple_of(n) && self.bias.as_ref().is_none_or(|b| b.len() == n),
            "epilogue of {n} columns on {} values",
            out.len()
        );
        let total = out.len();
        tract_linalg::multithread::par_chunks_mut(out, n, total, |_, rows| {
            apply_rows(rows, n, self.bias.as_deref().map(Vec::as_slice), self.gelu);
            Ok(())
        })
    }
}

/// Bias then GELU over whole rows, compiled for the widest vectors the CPU has.
pub(super) fn apply_rows(rows: &mut [f32], n: usize, bias: Option<&[f32]>, gelu: bool) {
    match Isa::detect() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detect` found AVX-512F and FMA on this CPU.
        Isa::Avx512 => {
            #[allow(unsafe_code)]
            unsafe {
                apply_rows_avx512(rows, n, bias, gelu)
            }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detect` found AVX2 and FMA on this CPU.
        Isa::Avx2 => {
            #[allow(unsafe_code)]
            unsafe {
                apply_rows_avx2(rows, n, bias, gelu)
            }
        }
        // aarch64 always has fused multiply-adds; elsewhere they would be libm calls.
        _ => apply_rows_generic::<{ cfg!(target_arch = "aarch64") }>(rows, n, bias, gelu),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn apply_rows_avx512(rows: &mut [f32], n: usize, bias: Option<&[f32]>, gelu: bool) {
    apply_rows_generic::<true>(rows, n, bias, gelu)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn apply_rows_avx2(rows: &mut [f32], n: usize, bias: Option<&[f32]>, gelu: bool) {
    apply_rows_generic::<true>(rows, n, bias, gelu)
}

#[inline(always)]
fn apply_rows_generic<const FMA: bool>(
    rows: &mut [f32],
    n: usize,
    bias: Option<&[f32]>,
    gelu: bool,
) {
    for row in rows.chunks_exact_mut(n) {
        if let Some(bias) = bias {
            for (x, &b) in row.iter_mut().zip(bias) {
                *x += b;
            }
        }
        if gelu {
            for x in row.iter_mut() {
                *x = fastmath::gelu(FMA, *x);
            }
        }
    }
}

/// Fold the per-column bias `Add` after each f32-output [`QMatMulOp`], and a `GeluExact` after
/// that, into the op. Returns how many bias adds and GELUs were folded.
pub fn fuse_epilogues(model: &mut TypedModel) -> TractResult<(usize, usize)> {
    let (mut biases, mut gelus) = (0, 0);
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(op) = node.op_as::<QMatMulOp>() else {
            continue;
        };
        if op.output_dequant.is_none() || !op.epilogue.is_empty() || op.c_layout != Layout::RowMajor
        {
            continue;
        }
        let Some(&OutAxis::Fixed(n)) = op.out_axes.last() else {
            continue;
        };
        if n != op.b.n() {
            continue;
        }
        let mut epilogue = Epilogue::default();
        let mut last = OutletId::new(id, 0);
        if let Some((add, bias)) = bias_add_after(model, last, n)? {
            epilogue.bias = Some(Arc::new(bias));
            last = OutletId::new(add, 0);
        }
        if let Some(g) = sole_consumer(model, last).filter(|&g| is_gelu_exact(model.node(g))) {
            epilogue.gelu = true;
            last = OutletId::new(g, 0);
        }
        if epilogue.is_empty() {
            continue;
        }
        biases += epilogue.bias.is_some() as usize;
        gelus += epilogue.gelu as usize;
        let name = node.name.clone();
        let input = node.inputs[0];
        let fused = QMatMulOp {
            epilogue,
            ..op.clone()
        };
        let mut patch = TypedModelPatch::new(format!("fuse bias and activation into {name}"));
        let tap = patch.tap_model(model, input)?;
        let out = patch.wire_node(format!("{name}.epilogue"), fused, &[tap])?[0];
        patch.shunt_outside(model, last, out)?;
        patch.apply(model)?;
    }
    model.compact()?;
    Ok((biases, gelus))
}

/// tract's `GeluExact` on tract's threads and the CPU's widest vectors: for the GELUs that follow
/// float products (TinyViT's stem and stage 0), which [`fuse_epilogues`] cannot reach.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GeluOp;

impl Op for GeluOp {
    fn name(&self) -> StaticName {
        "TinysamGelu".into()
    }

    op_as_typed_op!();
}

impl EvalOp for GeluOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1, "TinysamGelu takes one input");
        let mut t = inputs
            .into_iter()
            .next()
            .context("one input")?
            .into_tensor();
        {
            let mut view = t.try_as_plain_ram_mut()?;
            let data = view.as_slice_mut::<f32>()?;
            let total = data.len();
            // Rows of 4 096 values: enough work per task, any length (the last row is short).
            let row = 4096.min(total.max(1));
            let (whole, rest) = data.split_at_mut(total - total % row);
            tract_linalg::multithread::par_chunks_mut(whole, row, total, |_, chunk| {
                apply_rows(chunk, row, None, true);
                Ok(())
            })?;
            apply_rows(rest, rest.len().max(1), None, true);
        }
        Ok(tvec!(t.into_tvalue()))
    }
}

impl TypedOp for GeluOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs[0].datum_type == f32::datum_type(),
            "TinysamGelu is f32 only"
        );
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// Replace every f32 `GeluExact` of `model` by [`GeluOp`]; returns how many.
pub fn rewrite_gelu(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        if !is_gelu_exact(node)
            || model.outlet_fact(node.inputs[0])?.datum_type != f32::datum_type()
        {
            continue;
        }
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, GeluOp)?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::{
        decluttered_encoder, fixture_dir, gelu_model, max_difference, pattern_input,
        run_first_output, tract_gelu,
    };
    use crate::model::Precision;

    #[test]
    fn gelu_matches_tracts_gelu_exact() -> TractResult<()> {
        let xs: Vec<f32> = (-4000..4000).map(|i| i as f32 * 0.003).collect();
        let want = tract_gelu(&xs)?;
        let mut got = xs.clone();
        apply_rows(&mut got, xs.len(), None, true);
        let (err, _) = max_difference(&got, &want);
        assert!(err < 1e-6, "{err}");
        Ok(())
    }

    /// Not a test: `cargo test --release --lib gelu_speed -- --ignored --nocapture` times the
    /// exact GELU on this CPU's epilogue path, on 8 K values that stay in cache (as the fused
    /// ops' tiles do) passed over 128 times, best of 20.
    #[test]
    #[ignore]
    fn gelu_speed() {
        let (n, passes) = (8192, 128);
        // Inputs in [3, 5], where GELU moves a value by less than 2e-4 a pass: the passes stay
        // there (from smaller values GELU of GELU of ... sinks into slow subnormals), and the
        // branch-free GELU costs the same for every normal input.
        let xs: Vec<f32> = (0..n).map(|i| 4.0 + (i as f32 * 0.37).sin()).collect();
        let mut best = f64::MAX;
        for _ in 0..20 {
            let mut v = xs.clone();
            let started = std::time::Instant::now();
            for _ in 0..passes {
                apply_rows(&mut v, n, None, true);
                std::hint::black_box(&mut v);
            }
            best = best.min(started.elapsed().as_secs_f64());
        }
        eprintln!(
            "exact GELU on the epilogue path: {:.3} ns per value (8 K values in cache, best of 20)",
            best * 1e9 / (n * passes) as f64
        );
    }

    #[test]
    fn the_gelu_op_gives_tracts_gelu_on_any_length() -> TractResult<()> {
        for len in [1usize, 7, 4096, 4097, 20_000] {
            let xs: Vec<f32> = (0..len).map(|i| (i % 977) as f32 * 0.01 - 4.8).collect();
            let mut model = gelu_model(len)?;
            assert_eq!(rewrite_gelu(&mut model)?, 1);
            let got = run_first_output(model, &tensor1(&xs))?;
            let (err, _) = max_difference(&got, &tract_gelu(&xs)?);
            assert!(err < 1e-6, "len {len}: {err}");
        }
        Ok(())
    }

    /// The fixture's INT8 encoder with its bias adds and GELUs folded into our products (and
    /// the other GELUs on our op) against the same graph with tract running them.
    #[test]
    fn fused_epilogues_keep_the_fixture_encoders_output() -> TractResult<()> {
        let (mut unfused, s) = decluttered_encoder(&fixture_dir(), Precision::Int8);
        let kernel = super::super::Kernel::detect();
        let mut report = super::super::rewrite_quantized_matmuls(&mut unfused, kernel)?;
        super::super::fuse_quantization(&mut unfused, &mut report)?;
        let mut fused = unfused.clone();
        let (biases, gelus) = fuse_epilogues(&mut fused)?;
        assert!(
            biases >= 20 && gelus >= 10,
            "{biases} biases, {gelus} GELUs"
        );
        assert!(rewrite_gelu(&mut fused)? > 0);
        let input = pattern_input(s);
        let (err, scale) = max_difference(
            &run_first_output(fused, &input)?,
            &run_first_output(unfused, &input)?,
        );
        eprintln!(
            "fixture INT8 encoder: {biases} biases and {gelus} GELUs fused, largest difference \
             {err:e} of {scale}"
        );
        assert!(err <= 1e-5 * scale, "{err} of {scale}");
        Ok(())
    }

    #[test]
    fn bias_then_gelu_per_column() {
        let bias = Arc::new(vec![1.0, -2.0, 0.5]);
        let e = Epilogue {
            bias: Some(bias),
            gelu: true,
        };
        let mut out = vec![0.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        e.apply(&mut out, 3).expect("fits");
        let want = [1.0, -2.0, 0.5, 2.0, -1.0, 1.5]
            .map(|x: f32| 0.5 * x * (1.0 + erf_f64(f64::from(x) / 2f64.sqrt()) as f32));
        for (a, b) in out.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        assert!(e.apply(&mut out, 4).is_err());
    }

    /// erf by its series, in double precision.
    fn erf_f64(x: f64) -> f64 {
        let mut sum = 0.0;
        let mut term = x;
        for n in 0..60 {
            sum += term / (2 * n + 1) as f64;
            term *= -x * x / (n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }
}
