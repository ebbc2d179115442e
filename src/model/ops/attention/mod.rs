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
use crate::model::qmatmul::{Dequantize, Layout, QMatMulOp, Quantize};
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
    /// The int8 products around it, folded in (see [`fuse_attention_quantization`]).
    pub quant: AttentionQuant,
}

/// How [`WindowAttention`] meets the int8 products around it: by default it reads and writes
/// f32. With `input`, it reads the qkv product's i8 results and dequantizes them itself (then
/// adds that product's bias, one per qkv column); with `output`, it quantizes its results for
/// the projection (which then reads i8). The arithmetic is the products' own, so the values are
/// the same bit for bit; what goes is a pass writing and re-reading the f32 qkv tensor (27 MB in
/// stage 1 of the default model) and the f32 output.
#[derive(Debug, Clone, Default)]
pub struct AttentionQuant {
    /// Dequantization of the i8 qkv input and the bias added after it.
    pub input: Option<(Dequantize, Option<Arc<Vec<f32>>>)>,
    /// Quantization of the output to i8.
    pub output: Option<Quantize>,
}

impl PartialEq for AttentionQuant {
    fn eq(&self, other: &AttentionQuant) -> bool {
        let input = match (&self.input, &other.input) {
            (None, None) => true,
            (Some((a, ab)), Some((b, bb))) => a == b && super::same_bits(ab, bb),
            _ => false,
        };
        input && self.output == other.output
    }
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
            && self.quant == other.quant
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
        let mut out_shape: TVec<usize> = tvec!(windows, self.tokens);
        if self.head_axis {
            out_shape.push(self.heads);
        }
        out_shape.push(self.head_dim);
        let window_out = self.tokens * self.heads * self.head_dim;
        let window_in = self.tokens * self.heads * self.width;
        let view = input.try_as_plain_ram()?;
        let qkv = match &self.quant.input {
            None => Qkv::F32(view.as_slice::<f32>()?),
            Some((dq, bias)) => {
                let bias = bias.as_deref().map(Vec::as_slice);
                ensure!(
                    bias.is_none_or(|b| b.len() == self.heads * self.width),
                    "TinysamWindowAttention: a qkv bias of {} values for {} columns",
                    bias.map_or(0, <[f32]>::len),
                    self.heads * self.width
                );
                Qkv::I8(view.as_slice::<i8>()?, *dq, bias)
            }
        };
        ensure!(
            qkv.len() == windows * window_in,
            "TinysamWindowAttention: {} qkv values for {windows} windows",
            qkv.len()
        );
        let isa = Isa::detect();
        let total = windows * window_in;
        // One window: its heads into `out_w` (f32).
        let window = |w: usize, out_w: &mut [f32], scratch: &mut WindowScratch| {
            match qkv {
                Qkv::F32(all) => {
                    let in_w = &all[w * window_in..(w + 1) * window_in];
                    for h in 0..self.heads {
                        self.head(isa, in_w, h, out_w, &mut scratch.head);
                    }
                }
                Qkv::I8(all, dq, bias) => {
                    let in_w = &all[w * window_in..(w + 1) * window_in];
                    // As the qkv product's epilogue: dequantize, then add the bias; a token's
                    // row at a time, so that the loops vectorise.
                    let cols = self.heads * self.width;
                    for (f, q) in scratch
                        .dequantized
                        .chunks_exact_mut(cols)
                        .zip(in_w.chunks_exact(cols))
                    {
                        for (f, &q) in f.iter_mut().zip(q) {
                            *f = dq.apply(q);
                        }
                        if let Some(bias) = bias {
                            for (f, &b) in f.iter_mut().zip(bias) {
                                *f += b;
                            }
                        }
                    }
                    for h in 0..self.heads {
                        self.head(isa, &scratch.dequantized, h, out_w, &mut scratch.head);
                    }
                }
            }
        };
        let new_scratch = || WindowScratch {
            head: Scratch::new(self.tokens, self.head_dim),
            dequantized: match qkv {
                Qkv::F32(_) => Vec::new(),
                Qkv::I8(..) => vec![0f32; window_in],
            },
            out: vec![0f32; window_out],
        };
        let out = match self.quant.output {
            None => per_window::<f32>(
                &out_shape,
                (window_out, total),
                new_scratch,
                |w, out_w, scratch| window(w, out_w, scratch),
            )?,
            Some(q) => per_window::<i8>(
                &out_shape,
                (window_out, total),
                new_scratch,
                |w, out_w, scratch| {
                    let mut f32_out = std::mem::take(&mut scratch.out);
                    window(w, &mut f32_out, scratch);
                    // As the projection's fused quantization of its input.
                    q.slice(&f32_out, out_w);
                    scratch.out = f32_out;
                },
            )?,
        };
        Ok(tvec!(out.into_tvalue()))
    }
}

/// A tensor of `shape` made of windows of `window_out` values, each filled by `fill(window,
/// values, scratch)`, threaded over windows (`work`: the values read, for the threading
/// threshold) with one scratch per task.
fn per_window<T: Datum + Copy + tract_onnx::tract_core::num_traits::Zero>(
    shape: &[usize],
    (window_out, work): (usize, usize),
    new_scratch: impl Fn() -> WindowScratch + Sync,
    fill: impl Fn(usize, &mut [T], &mut WindowScratch) + Sync,
) -> TractResult<Tensor> {
    let mut out = Tensor::zero::<T>(shape)?;
    {
        let mut view = out.try_as_plain_ram_mut()?;
        let values = view.as_slice_mut::<T>()?;
        tract_linalg::multithread::par_chunks_mut(values, window_out, work, |first, chunk| {
            let mut scratch = new_scratch();
            for (i, out_w) in chunk.chunks_exact_mut(window_out).enumerate() {
                fill(first + i, out_w, &mut scratch);
            }
            Ok(())
        })?;
    }
    Ok(out)
}

/// The qkv input as the op receives it.
#[derive(Clone, Copy)]
enum Qkv<'a> {
    F32(&'a [f32]),
    I8(&'a [i8], Dequantize, Option<&'a [f32]>),
}

impl Qkv<'_> {
    fn len(&self) -> usize {
        match self {
            Qkv::F32(v) => v.len(),
            Qkv::I8(v, _, _) => v.len(),
        }
    }
}

/// A task's buffers: the kernel's, one window's qkv dequantized, one window's f32 output.
struct WindowScratch {
    head: Scratch,
    dequantized: Vec<f32>,
    out: Vec<f32>,
}

impl TypedOp for WindowAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let input_type = if self.quant.input.is_some() {
            i8::datum_type()
        } else {
            f32::datum_type()
        };
        ensure!(
            inputs[0].datum_type.unquantized() == input_type,
            "TinysamWindowAttention takes {input_type:?} qkv, got {:?}",
            inputs[0].datum_type
        );
        let shape = &inputs[0].shape;
        let mut out: TVec<TDim> = tvec!(shape[0].clone(), self.tokens.into());
        if self.head_axis {
            out.push(self.heads.into());
        }
        out.push(self.head_dim.into());
        Ok(tvec!(if self.quant.output.is_some() {
            i8::fact(out)
        } else {
            f32::fact(out)
        }))
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

/// Fold the int8 products around each [`WindowAttention`] into it (see [`AttentionQuant`]):
/// where its qkv comes, through axis ops only, from a [`QMatMulOp`] whose f32 output (its
/// dequantization, plus at most a bias) only the attention reads, that product writes i8 and the
/// attention dequantizes; where its output goes, through axis ops only, to a [`QMatMulOp`] that
/// quantizes its f32 input first, the attention quantizes. Run after the int8 rewrites and
/// their epilogue fusion. Returns how many inputs and outputs were folded.
pub fn fuse_attention_quantization(model: &mut TypedModel) -> TractResult<(usize, usize)> {
    let (mut inputs, mut outputs) = (0, 0);
    for id in model.eval_order()? {
        let Some(node) = model.nodes().get(id) else {
            continue;
        };
        let Some(attention) = node.op_as::<WindowAttention>() else {
            continue;
        };
        let mut op = attention.clone();
        // Input side: attention <- axis ops <- qkv product.
        let (producer, before) = super::graph::producer_before_axis_ops(model, node.inputs[0]);
        let product = model.node(producer).op_as::<QMatMulOp>().filter(|p| {
            p.output_dequant.is_some()
                && p.output_requant.is_none()
                && !p.epilogue.gelu
                && p.c_layout == Layout::RowMajor
                && p.epilogue.bias.as_ref().is_none_or(|b| b.len() == p.b.n())
                && p.b.n() == op.heads * op.width
        });
        let only_reader = |chain: &[usize], start: usize| {
            let mut at = start;
            for &next in chain {
                if sole_consumer(model, OutletId::new(at, 0)) != Some(next) {
                    return false;
                }
                at = next;
            }
            sole_consumer(model, OutletId::new(at, 0)) == Some(id)
        };
        let fold_input =
            op.quant.input.is_none() && product.is_some() && only_reader(&before, producer);
        // Output side: attention -> axis ops -> projection product.
        let (after, last) = super::graph::axis_op_chain(model, id);
        let projection = sole_consumer(model, OutletId::new(last, 0)).and_then(|n| {
            model.node(n).op_as::<QMatMulOp>().and_then(|p| {
                (p.a_layout == Layout::RowMajor).then_some(())?;
                p.input_quant.map(|q| (n, q))
            })
        });
        let fold_output = op.quant.output.is_none() && projection.is_some();
        if !fold_input && !fold_output {
            continue;
        }
        let name = node.name.clone();
        let mut patch = TypedModelPatch::new(format!("fold quantization into {name}"));
        let mut wire = if fold_input {
            let product = product.context("the qkv product")?;
            let (dq, bias) = (
                product.output_dequant.context("a dequantization")?,
                product.epilogue.bias.clone(),
            );
            op.quant.input = Some((dq, bias));
            let i8_product = QMatMulOp {
                output_dequant: None,
                epilogue: Default::default(),
                ..product.clone()
            };
            let tap = patch.tap_model(model, model.node(producer).inputs[0])?;
            let mut wire = patch.wire_node(
                format!("{}.i8_for_attention", model.node(producer).name),
                i8_product,
                &[tap],
            )?[0];
            for &axis in &before {
                let n = model.node(axis);
                wire = patch.wire_node(format!("{}.i8", n.name), n.op.clone(), &[wire])?[0];
            }
            inputs += 1;
            wire
        } else {
            patch.tap_model(model, node.inputs[0])?
        };
        let replaced = if let (true, Some((proj, q))) = (fold_output, projection) {
            op.quant.output = Some(q);
            wire = patch.wire_node(format!("{name}.quantized"), op, &[wire])?[0];
            for &axis in &after {
                let n = model.node(axis);
                wire = patch.wire_node(format!("{}.i8", n.name), n.op.clone(), &[wire])?[0];
            }
            let proj_node = model.node(proj);
            let i8_proj = QMatMulOp {
                input_quant: None,
                ..proj_node
                    .op_as::<QMatMulOp>()
                    .context("the projection")?
                    .clone()
            };
            wire = patch.wire_node(format!("{}.i8_input", proj_node.name), i8_proj, &[wire])?[0];
            outputs += 1;
            OutletId::new(proj, 0)
        } else {
            wire = patch.wire_node(format!("{name}.dequantizing"), op, &[wire])?[0];
            OutletId::new(id, 0)
        };
        patch.shunt_outside(model, replaced, wire)?;
        patch.apply(model)?;
    }
    model.compact()?;
    Ok((inputs, outputs))
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
            quant: AttentionQuant::default(),
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
            (2, 7, 32, false),
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
                quant: AttentionQuant::default(),
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

    /// i8 qkv in and i8 out give exactly the f32 op on the dequantized qkv plus bias, quantized
    /// afterwards (on every platform: the fixture has no such core).
    #[test]
    fn i8_boundaries_equal_the_f32_op_around_the_same_steps() -> TractResult<()> {
        let (heads, n, d, windows) = (2, 13, 16, 3);
        let width = 3 * d;
        let cols = heads * width;
        let qkv: Vec<i8> = (0..windows * n * cols)
            .map(|i| ((i * 7919 % 251) as i32 - 125) as i8)
            .collect();
        let dq = Dequantize {
            scale: 0.013,
            zero_point: 0,
        };
        let qkv_bias: Vec<f32> = (0..cols).map(|c| (c % 7) as f32 * 0.05 - 0.15).collect();
        let q = Quantize {
            scale: 40.0,
            zero_point: 0,
        };
        let base = WindowAttention {
            heads,
            head_axis: true,
            tokens: n,
            head_dim: d,
            width,
            q_at: 0,
            k_at: d,
            v_at: 2 * d,
            scale: 0.25,
            bias: Some(Arc::new(
                (0..heads * n * n).map(|i| (i % 5) as f32 * 0.1).collect(),
            )),
            quant: AttentionQuant::default(),
        };
        let float_qkv: Vec<f32> = qkv
            .iter()
            .enumerate()
            .map(|(i, &v)| dq.apply(v) + qkv_bias[i % cols])
            .collect();
        let shape = [windows, n, heads, width];
        let eval = |op: WindowAttention, t: Tensor| -> TractResult<Tensor> {
            let out = op.eval(&EvalContext::out_of_plan(), tvec!(t.into_tvalue()))?;
            Ok(out[0].clone().into_tensor())
        };
        let want_f32 = eval(base.clone(), Tensor::from_shape(&shape, &float_qkv)?)?;
        let want_f32 = f32_slice(&want_f32).to_vec();
        let mut want = vec![0i8; want_f32.len()];
        q.slice(&want_f32, &mut want);
        let folded = WindowAttention {
            quant: AttentionQuant {
                input: Some((dq, Some(Arc::new(qkv_bias.clone())))),
                output: Some(q),
            },
            ..base.clone()
        };
        let got = eval(folded, Tensor::from_shape(&shape, &qkv)?)?;
        assert_eq!(got.try_as_plain_ram()?.as_slice::<i8>()?, &want[..]);
        // Only the input folded: f32 out, the same values.
        let input_only = WindowAttention {
            quant: AttentionQuant {
                input: Some((dq, Some(Arc::new(qkv_bias)))),
                output: None,
            },
            ..base
        };
        let got = eval(input_only, Tensor::from_shape(&shape, &qkv)?)?;
        assert_eq!(f32_slice(&got), &want_f32[..]);
        Ok(())
    }

    /// The shipped INT8 encoder (the fixture's quantizes its attention products: no core to
    /// fold) with the attention cores reading the qkv product's i8 results and writing i8 for
    /// their projections: all ten fold both sides, and the embedding is the same bit for bit.
    /// Only on x86_64 (under qemu the 1024² encoder takes minutes).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn folded_quantization_keeps_the_default_embedding() -> TractResult<()> {
        use crate::model::qmatmul::{
            fuse_epilogues, fuse_quantization, rewrite_quantized_matmuls, Kernel,
        };
        use crate::model::test_support::{golden_input, run_first_output};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default");
        let (mut graph, _) = crate::model::test_support::decluttered_encoder(&dir, Precision::Int8);
        let mut report = rewrite_quantized_matmuls(&mut graph, Kernel::detect())?;
        fuse_quantization(&mut graph, &mut report)?;
        fuse_epilogues(&mut graph)?;
        let cores = rewrite_window_attention(&mut graph)?.replaced.len();
        let mut folded = graph.clone();
        let (inputs, outputs) = fuse_attention_quantization(&mut folded)?;
        assert_eq!((cores, inputs, outputs), (10, 10, 10));
        let ops: Vec<&WindowAttention> = folded
            .nodes()
            .iter()
            .filter_map(|n| n.op_as::<WindowAttention>())
            .collect();
        assert!(ops
            .iter()
            .all(|op| op.quant.input.is_some() && op.quant.output.is_some()));
        let input = golden_input(&dir);
        assert_eq!(
            run_first_output(folded, &input)?,
            run_first_output(graph, &input)?
        );
        Ok(())
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
                quant: AttentionQuant::default(),
            };
            for isa in Isa::runnable() {
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
        let (mut typed, _) = crate::model::test_support::decluttered_encoder(dir, precision);
        if precision == Precision::Int8 {
            crate::model::test_support::int8_products_on_our_kernels(&mut typed).expect("int8");
        }
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
