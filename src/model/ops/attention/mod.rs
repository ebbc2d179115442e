//! [`WindowAttention`]: TinyViT's attention core, `softmax(q·kᵀ · scale + bias) · v`, as one op
//! that works one window and head at a time in cache.
//!
//! tract 0.23.9 runs this core as seven nodes: two `Slice`s of the qkv tensor, an `EinSum` for
//! q·kᵀ (its operands packed for the matrix kernel first), a scalar `Mul`, the bias `Add`, a
//! `Softmax` and the attn·v `EinSum`, each a full pass over tensors of up to 29 MB, the
//! non-product ones on one thread (the default model's ten softmaxes alone took 292 ms of a
//! 2.35 s INT8 encoder, `benches/encoder-profile-results.md`). Here each (window, head) pair reads
//! its q, k and v rows straight from the qkv tensor, keeps the 49×49 (or 196×196) scores in
//! cache, and writes its output rows where the projection reads them; windows are split across
//! tract's threads.
//!
//! [`rewrite_window_attention`] finds the pattern in a decluttered graph (the layout TinyViT's
//! export gives, with or without a head axis) and replaces it; anything else is left to tract and
//! reported with the reason.
#![allow(unsafe_code)]

mod kernel;

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::Slice;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::math::{Add, Mul};
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

use super::graph::{canonical, const_operand, sole_consumer, Isa};
use kernel::{Head, Scratch};

/// Attention of every window and head of a `[windows, tokens, heads, width]` qkv tensor (or
/// `[windows, tokens, width]` when the graph has no head axis): for head `h`, q, k and v are
/// the `head_dim` values at `q_at`, `k_at`, `v_at` of its `width`. Output `[windows, tokens,
/// heads, head_dim]` (or `[windows, tokens, head_dim]`), the layout of tract's attn·v product.
#[derive(Debug, Clone)]
pub struct WindowAttention {
    /// Heads (1 for a graph without a head axis).
    pub heads: usize,
    /// Whether the tensors have a head axis.
    pub head_axis: bool,
    /// Tokens per window.
    pub tokens: usize,
    /// Values per head of q, k and v.
    pub head_dim: usize,
    /// Values per head (and token) in the input: q, k and v side by side.
    pub width: usize,
    /// Where q, k and v start within `width`.
    pub q_at: usize,
    /// See `q_at`.
    pub k_at: usize,
    /// See `q_at`.
    pub v_at: usize,
    /// Factor of q·kᵀ.
    pub scale: f32,
    /// Added to the scaled scores, `[heads, tokens, tokens]`, if the graph adds one.
    pub bias: Option<Arc<Vec<f32>>>,
}

impl WindowAttention {
    /// The kernel name reported in kernel tables, e.g. `tinysam_attention_avx512f`.
    pub fn kernel_name(&self) -> String {
        format!("tinysam_attention_{}", Isa::detect())
    }
}

// tract wants ops `Eq`: the float parameters compare by their bits.
impl PartialEq for WindowAttention {
    fn eq(&self, other: &WindowAttention) -> bool {
        (
            self.heads,
            self.head_axis,
            self.tokens,
            self.head_dim,
            self.width,
        ) == (
            other.heads,
            other.head_axis,
            other.tokens,
            other.head_dim,
            other.width,
        ) && (self.q_at, self.k_at, self.v_at) == (other.q_at, other.k_at, other.v_at)
            && self.scale.to_bits() == other.scale.to_bits()
            && super::same_bits(&self.bias, &other.bias)
    }
}
impl Eq for WindowAttention {}

impl Op for WindowAttention {
    fn name(&self) -> StaticName {
        "TinysamWindowAttention".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} heads × {} tokens × {} dims, scale {}, {}, kernel {}",
            self.heads,
            self.tokens,
            self.head_dim,
            self.scale,
            if self.bias.is_some() {
                "with bias"
            } else {
                "no bias"
            },
            Isa::detect()
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for WindowAttention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1, "TinysamWindowAttention takes one input");
        let input = &inputs[0];
        let shape = input.shape();
        let expected_rank = if self.head_axis { 4 } else { 3 };
        ensure!(
            shape.len() == expected_rank
                && shape[1] == self.tokens
                && shape[shape.len() - 1] == self.width
                && (!self.head_axis || shape[2] == self.heads),
            "TinysamWindowAttention: input shape {shape:?} does not fit {self:?}"
        );
        let windows = shape[0];
        let view = input.try_as_plain_ram()?;
        let qkv = view.as_slice::<f32>()?;
        let mut out_shape: TVec<usize> = tvec!(windows, self.tokens);
        if self.head_axis {
            out_shape.push(self.heads);
        }
        out_shape.push(self.head_dim);
        let mut out = Tensor::zero::<f32>(&out_shape)?;
        let window_out = self.tokens * self.heads * self.head_dim;
        let window_in = self.tokens * self.heads * self.width;
        let isa = Isa::detect();
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let out_data = view.as_slice_mut::<f32>()?;
            tract_linalg::multithread::par_chunks_mut(
                out_data,
                window_out,
                qkv.len(),
                |first, chunk| {
                    let mut scratch = Scratch::new(self.tokens, self.head_dim);
                    for (i, out_w) in chunk.chunks_exact_mut(window_out).enumerate() {
                        let w = first + i;
                        let in_w = &qkv[w * window_in..(w + 1) * window_in];
                        for h in 0..self.heads {
                            self.head(isa, in_w, h, out_w, &mut scratch);
                        }
                    }
                    Ok(())
                },
            )?;
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for WindowAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs[0].datum_type == f32::datum_type(),
            "TinysamWindowAttention is f32 only"
        );
        let shape = &inputs[0].shape;
        let mut out: TVec<TDim> = tvec!(shape[0].clone(), self.tokens.into());
        if self.head_axis {
            out.push(self.heads.into());
        }
        out.push(self.head_dim.into());
        Ok(tvec!(f32::fact(out)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let per_window = 2 * self.heads * self.tokens * self.tokens * self.head_dim;
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            inputs[0].shape[0].clone() * per_window
        )))
    }

    as_op!();
}

impl WindowAttention {
    /// Attention of head `h` of one window.
    fn head(&self, isa: Isa, input: &[f32], h: usize, out: &mut [f32], scratch: &mut Scratch) {
        let n = self.tokens;
        let head = Head {
            input,
            stride: self.heads * self.width,
            q_at: h * self.width + self.q_at,
            k_at: h * self.width + self.k_at,
            v_at: h * self.width + self.v_at,
            tokens: n,
            dim: self.head_dim,
            scale: self.scale,
            bias: self.bias.as_ref().map(|b| &b[h * n * n..(h + 1) * n * n]),
            out_stride: self.heads * self.head_dim,
            out_at: h * self.head_dim,
        };
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::detect` found AVX-512F and FMA on this CPU.
            Isa::Avx512 => unsafe { kernel::head_avx512(&head, out, scratch) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::detect` found AVX2 and FMA on this CPU.
            Isa::Avx2 => unsafe { kernel::head_avx2(&head, out, scratch) },
            _ => kernel::head_portable(&head, out, scratch),
        }
    }
}

/// What [`rewrite_window_attention`] did.
#[derive(Debug, Clone, Default)]
pub struct AttentionReport {
    /// Softmax nodes whose attention now runs on [`WindowAttention`].
    pub replaced: Vec<String>,
    /// Softmax nodes left to tract, with the reason.
    pub kept: Vec<(String, String)>,
}

/// Replace every attention core `softmax(q·kᵀ · scale + bias) · v` of `model` whose q, k and v
/// are slices of one contiguous qkv tensor by [`WindowAttention`].
pub fn rewrite_window_attention(model: &mut TypedModel) -> TractResult<AttentionReport> {
    let mut report = AttentionReport::default();
    for id in model.eval_order()? {
        let node = model.node(id);
        if node.op_as::<Softmax>().is_none() {
            continue;
        }
        let name = node.name.clone();
        match plan(model, node)? {
            Ok(plan) => {
                let mut patch = TypedModelPatch::default();
                let input = patch.tap_model(model, plan.qkv)?;
                let out = patch.wire_node(format!("{name}.attention"), plan.op, &[input])?;
                patch.shunt_outside(model, plan.output, out[0])?;
                patch.apply(model)?;
                report.replaced.push(name);
            }
            Err(reason) => report.kept.push((name, reason)),
        }
    }
    model.compact()?;
    Ok(report)
}

/// A matched attention core.
struct Plan {
    qkv: OutletId,
    output: OutletId,
    op: WindowAttention,
}

/// The slice feeding `outlet`: (its input, start, end) along `axis`, if `outlet` is one.
fn slice_of(model: &TypedModel, outlet: OutletId, axis: usize) -> Option<(OutletId, usize, usize)> {
    let node = model.node(outlet.node);
    let slice = node.op_as::<Slice>()?;
    if slice.axis != axis || node.outputs[0].successors.len() != 1 {
        return None;
    }
    let start = usize::try_from(slice.start.as_i64()?).ok()?;
    let end = usize::try_from(slice.end.as_i64()?).ok()?;
    Some((node.inputs[0], start, end))
}

/// Match the attention core around `softmax`, or say why it does not fit.
fn plan(model: &TypedModel, softmax: &TypedNode) -> TractResult<Result<Plan, String>> {
    let op = softmax.op_as::<Softmax>().context("a softmax")?;
    let fact = model.outlet_fact(softmax.inputs[0])?;
    need!(
        fact.datum_type == f32::datum_type() && op.kind == SoftmaxKind::Softmax,
        "not an f32 softmax"
    );
    let Some(scores) = fact.shape.as_concrete().map(|s| s.to_vec()) else {
        return Ok(Err("symbolic shape".into()));
    };
    let rank = scores.len();
    need!(rank == 3 || rank == 4, "scores of rank {rank}");
    need!(
        op.axes.as_slice() == [rank - 1],
        "softmax over axis {:?}",
        op.axes
    );
    let head_axis = rank == 4;
    let tokens = scores[rank - 1];
    need!(
        scores[rank - 2] == tokens,
        "scores are not square: {scores:?}"
    );
    let heads = if head_axis { scores[1] } else { 1 };

    // Before the softmax: Add(bias)? of Mul(scale)? of EinSum(q, k).
    let mut cur = model.node(softmax.inputs[0].node);
    let mut bias = None;
    let mut scale = 1.0f32;
    if cur.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Add>()) {
        let Some((k, x)) = const_operand::<Add>(model, cur)? else {
            return Ok(Err("the add before the softmax is not of a constant".into()));
        };
        need!(
            cur.outputs[0].successors.len() == 1,
            "the bias add has other uses"
        );
        let k = k.cast_to::<f32>()?;
        let kshape = k.shape();
        let hnn = heads * tokens * tokens;
        need!(
            k.len() == hnn
                && kshape.ends_with(&[tokens, tokens])
                && (!head_axis || kshape[kshape.len() - 3] == heads),
            "bias of shape {kshape:?}"
        );
        bias = Some(Arc::new(k.try_as_plain_ram()?.as_slice::<f32>()?.to_vec()));
        cur = model.node(x.node);
    }
    if cur.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Mul>()) {
        let Some((k, x)) = const_operand::<Mul>(model, cur)? else {
            return Ok(Err("the mul before the softmax is not by a constant".into()));
        };
        need!(
            k.len() == 1 && cur.outputs[0].successors.len() == 1,
            "the scale is not a scalar"
        );
        scale = *k
            .cast_to::<f32>()?
            .try_as_plain_ram()?
            .as_slice::<f32>()?
            .first()
            .context("one value")?;
        cur = model.node(x.node);
    }
    let Some(qk) = cur.op_as::<EinSum>() else {
        return Ok(Err(format!(
            "scores come from {}, not an EinSum",
            cur.op.name()
        )));
    };
    need!(
        qk.q_params.is_none() && cur.inputs.len() == 2 && cur.outputs[0].successors.len() == 1,
        "q·kᵀ is quantized or shared"
    );
    let (qk_expr, pv_expr, slice_axis) = if head_axis {
        ("abcd,aecd->acbe", "abcd,adbe->acbe", 3)
    } else {
        ("abc,adc->abd", "abc,acd->abd", 2)
    };
    need!(
        canonical(&qk.axes.to_string()) == qk_expr,
        "q·kᵀ is `{}`",
        qk.axes
    );
    // After: the attn·v EinSum.
    let Some(pv_id) = sole_consumer(model, softmax.id.into()) else {
        return Ok(Err("the softmax has more than one use".into()));
    };
    let pv_node = model.node(pv_id);
    let Some(pv) = pv_node.op_as::<EinSum>() else {
        return Ok(Err(format!(
            "the softmax feeds {}, not an EinSum",
            pv_node.op.name()
        )));
    };
    need!(
        pv.q_params.is_none()
            && pv_node.inputs.len() == 2
            && pv_node.inputs[0] == softmax.id.into(),
        "attn·v is quantized or takes the softmax second"
    );
    need!(
        canonical(&pv.axes.to_string()) == pv_expr,
        "attn·v is `{}`",
        pv.axes
    );
    // q, k, v: slices of one tensor along its last axis.
    let slices = [cur.inputs[0], cur.inputs[1], pv_node.inputs[1]];
    let mut parts = Vec::new();
    for s in slices {
        match slice_of(model, s, slice_axis) {
            Some(p) => parts.push(p),
            None => return Ok(Err("q, k or v is not a slice of the qkv tensor".into())),
        }
    }
    let qkv = parts[0].0;
    need!(
        parts.iter().all(|p| p.0 == qkv),
        "q, k and v come from different tensors"
    );
    let head_dim = parts[0].2.saturating_sub(parts[0].1);
    need!(
        head_dim > 0 && parts.iter().all(|p| p.2.saturating_sub(p.1) == head_dim),
        "q, k and v differ in size"
    );
    let qkv_fact = model.outlet_fact(qkv)?;
    let Some(qkv_shape) = qkv_fact.shape.as_concrete() else {
        return Ok(Err("symbolic qkv shape".into()));
    };
    need!(
        qkv_fact.datum_type == f32::datum_type()
            && qkv_shape.len() == rank
            && qkv_shape[0] == scores[0]
            && qkv_shape[1] == tokens
            && (!head_axis || qkv_shape[2] == heads),
        "qkv of shape {qkv_shape:?}"
    );
    let width = qkv_shape[rank - 1];
    need!(
        parts.iter().all(|p| p.2 <= width),
        "a slice past the qkv width"
    );
    Ok(Ok(Plan {
        qkv,
        output: pv_id.into(),
        op: WindowAttention {
            heads,
            head_axis,
            tokens,
            head_dim,
            width,
            q_at: parts[0].1,
            k_at: parts[1].1,
            v_at: parts[2].1,
            scale,
            bias,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::decoder::f32_slice;
    use crate::model::Precision;

    /// The same attention in f64, straight from the definition.
    fn reference(op: &WindowAttention, qkv: &[f32], windows: usize) -> Vec<f32> {
        let (h_n, n, d, c) = (op.heads, op.tokens, op.head_dim, op.width);
        let mut out = vec![0f32; windows * n * h_n * d];
        let at =
            |w: usize, t: usize, h: usize, i: usize| qkv[((w * n + t) * h_n + h) * c + i] as f64;
        for w in 0..windows {
            for h in 0..h_n {
                for i in 0..n {
                    let mut s: Vec<f64> = (0..n)
                        .map(|j| {
                            let dot: f64 = (0..d)
                                .map(|e| at(w, i, h, op.q_at + e) * at(w, j, h, op.k_at + e))
                                .sum();
                            dot * op.scale as f64
                                + op.bias
                                    .as_ref()
                                    .map_or(0.0, |b| b[(h * n + i) * n + j] as f64)
                        })
                        .collect();
                    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    s.iter_mut().for_each(|x| *x = (*x - m).exp());
                    let sum: f64 = s.iter().sum();
                    for e in 0..d {
                        let o: f64 = (0..n).map(|j| s[j] * at(w, j, h, op.v_at + e)).sum();
                        out[((w * n + i) * h_n + h) * d + e] = (o / sum) as f32;
                    }
                }
            }
        }
        out
    }

    fn run(op: &WindowAttention, isa: Isa, qkv: &[f32], windows: usize) -> Vec<f32> {
        let (n, d) = (op.tokens, op.head_dim);
        let mut out = vec![0f32; windows * n * op.heads * d];
        let mut scratch = Scratch::new(n, d);
        let (wi, wo) = (n * op.heads * op.width, n * op.heads * d);
        for w in 0..windows {
            for h in 0..op.heads {
                op.head(
                    isa,
                    &qkv[w * wi..(w + 1) * wi],
                    h,
                    &mut out[w * wo..(w + 1) * wo],
                    &mut scratch,
                );
            }
        }
        out
    }

    #[test]
    fn every_kernel_matches_a_double_precision_attention() {
        let isas: Vec<Isa> = [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&i| i == Isa::Portable || (Isa::detect() == Isa::Avx512) || i == Isa::detect())
            .collect();
        for (heads, n, d, bias) in [
            (2, 49, 32, true),
            (1, 13, 24, false),
            (3, 5, 16, true),
            (1, 20, 20, true),
        ] {
            let width = 3 * d + 2;
            let windows = 3;
            let qkv: Vec<f32> = (0..windows * n * heads * width)
                .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.004)
                .collect();
            let op = WindowAttention {
                heads,
                head_axis: heads > 1,
                tokens: n,
                head_dim: d,
                width,
                q_at: 1,
                k_at: d + 2,
                v_at: 2 * d + 2,
                scale: 0.17,
                bias: bias.then(|| {
                    Arc::new(
                        (0..heads * n * n)
                            .map(|i| (i % 17) as f32 * 0.1 - 0.8)
                            .collect(),
                    )
                }),
            };
            let want = reference(&op, &qkv, windows);
            for &isa in &isas {
                let got = run(&op, isa, &qkv, windows);
                let err = got
                    .iter()
                    .zip(&want)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(err < 2e-6, "{isa} heads {heads} n {n} d {d}: {err}");
            }
        }
    }

    /// Not a test: `cargo test --release --lib window_attention_speed -- --ignored --nocapture`
    /// times stage 1's attention (361 windows of 49 tokens, 4 heads of 32) and stage 2's (25
    /// windows of 196 tokens, 5 heads of 32) per compiled form, on one thread: best of 5.
    #[test]
    #[ignore]
    fn window_attention_speed() {
        for (heads, n, d, windows) in [(4, 49, 32, 361), (5, 196, 32, 25)] {
            let width = 3 * d;
            let qkv: Vec<f32> = (0..windows * n * heads * width)
                .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.004)
                .collect();
            let op = WindowAttention {
                heads,
                head_axis: true,
                tokens: n,
                head_dim: d,
                width,
                q_at: 0,
                k_at: d,
                v_at: 2 * d,
                scale: 0.17,
                bias: Some(Arc::new(
                    (0..heads * n * n)
                        .map(|i| (i % 17) as f32 * 0.1 - 0.8)
                        .collect(),
                )),
            };
            for isa in [Isa::Portable, Isa::Avx2, Isa::Avx512] {
                if isa != Isa::Portable && Isa::detect() != Isa::Avx512 && isa != Isa::detect() {
                    continue;
                }
                let best = (0..5)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        std::hint::black_box(run(&op, isa, &qkv, windows));
                        t.elapsed().as_secs_f64() * 1e3
                    })
                    .fold(f64::MAX, f64::min);
                let gmac = (windows * heads * 2 * n * n * d) as f64 / 1e9;
                eprintln!(
                    "{windows} windows x {heads} heads x {n} tokens, {isa}: {best:.2} ms, {:.1} GMAC/s",
                    gmac / best * 1e3
                );
            }
        }
    }

    /// Every attention core of `dir`'s encoder at `precision`, fed the qkv tensor tract computes
    /// for the golden frame, against tract's own output of the subgraph it replaces; returns the
    /// cores checked and the largest error relative to the output's largest value.
    fn against_tract(dir: &std::path::Path, precision: Precision) -> (usize, f32) {
        let (typed, _) = crate::model::test_support::decluttered_encoder(dir, precision);
        let mut plans = Vec::new();
        for id in typed.eval_order().expect("order") {
            let node = typed.node(id);
            if node.op_as::<Softmax>().is_some() {
                if let Ok(p) = plan(&typed, node).expect("plan") {
                    plans.push(p);
                }
            }
        }
        let mut probe = typed.clone();
        let outlets: Vec<OutletId> = plans.iter().flat_map(|p| [p.qkv, p.output]).collect();
        probe.select_output_outlets(&outlets).expect("outputs");
        let runnable = probe
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .expect("plan");
        let outs = runnable
            .run(tvec!(crate::model::test_support::golden_input(dir).into()))
            .expect("run");
        let mut worst = 0f32;
        for (i, p) in plans.iter().enumerate() {
            let got =
                p.op.eval(&EvalContext::out_of_plan(), tvec!(outs[2 * i].clone()))
                    .expect("our op");
            let (a, b) = (f32_slice(&got[0]), f32_slice(&outs[2 * i + 1]));
            assert_eq!(a.len(), b.len());
            let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
            let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            worst = worst.max(err / scale);
        }
        (plans.len(), worst)
    }

    #[test]
    fn fused_attention_equals_tracts_subgraph_on_the_fixture() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/test_model");
        // The fixture's FP32 encoder: 2 heads in stage 3 (the 4-axis form), 1 in the others.
        let (cores, err) = against_tract(&dir, Precision::Fp32);
        eprintln!("fixture: {cores} attention cores, largest relative error {err:e}");
        assert!(cores >= 2, "only {cores} attention cores matched");
        assert!(err < 1e-5, "relative error {err}");
    }

    /// The shipped model (its INT8 encoder keeps the attention products float): every core
    /// matches and agrees. Only on x86_64: under qemu the 1024² encoder takes minutes.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn fused_attention_equals_tracts_subgraph_on_the_default_model() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default");
        let (cores, err) = against_tract(&dir, Precision::Int8);
        eprintln!("default model: {cores} attention cores, largest relative error {err:e}");
        assert_eq!(cores, 10, "TinySAM's 10 attention blocks");
        assert!(err < 1e-5, "relative error {err}");
    }

    #[test]
    fn canonical_names_ignore_letters() {
        assert_eq!(canonical("ambk,anbk->abmn"), "abcd,aecd->acbe");
        assert_eq!(canonical("abmk,akbn->ambn"), "abcd,adbe->acbe");
        assert_eq!(canonical("amk,ank->amn"), "abc,adc->abd");
        assert_eq!(canonical("amk,akn->amn"), "abc,acd->abd");
    }
}
