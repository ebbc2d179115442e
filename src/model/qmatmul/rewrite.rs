//! The model-rewrite pass: quantized `EinSum` nodes with constant weights become [`QMatMulOp`].
//!
//! Runs on a decluttered graph, before tract's codegen. A node is taken only when everything the
//! op needs is known and simple: i8 activations, constant i8 weights, zero zero points (our
//! symmetric export), scalar activation/output scales, a bias and weight scale that are scalar or
//! one per output column, and axes that read as a plain (batched-into-m) matrix product. Anything
//! else is left to tract and counted in the report with the reason.
#![deny(unsafe_code)]

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;

use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::nn::DataFormat;

use super::conv::{patch_order, ConvGeometry, QConvOp};
use super::op::{as_int8_op, OutAxis, QMatMulOp};
use super::{Dequantize, Kernel, Layout, PackedB, Quantize, Requant};
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::quant::{DequantizeLinearF32, QuantizeLinearI8};

/// What the pass did.
#[derive(Debug, Clone, Default)]
pub struct RewriteReport {
    /// Names of the nodes now running on our kernel.
    pub replaced: Vec<String>,
    /// Quantized matmuls left to tract, with the reason.
    pub kept: Vec<(String, String)>,
    /// `QuantizeLinear` nodes folded into the op after them.
    pub fused_quantize: usize,
    /// `DequantizeLinear` nodes folded into the op before them.
    pub fused_dequantize: usize,
}

/// Replace every eligible quantized matmul of `model` by [`QMatMulOp`] and every eligible
/// quantized convolution by [`QConvOp`], on `kernel`. [`fuse_quantization`] goes next.
pub fn rewrite_quantized_matmuls(
    model: &mut TypedModel,
    kernel: Kernel,
) -> TractResult<RewriteReport> {
    let mut report = RewriteReport::default();
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(plan) = replacement(model, node, kernel)? else {
            continue;
        };
        let name = node.name.clone();
        match plan {
            Ok(op) => {
                let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs[..1], op)?;
                patch.apply(model)?;
                report.replaced.push(name);
            }
            Err(reason) => report.kept.push((name, reason)),
        }
    }
    model.compact()?;
    Ok(report)
}

/// For a quantized matmul or convolution: our op for it, or why there is none; `None` for any
/// other node.
fn replacement(
    model: &TypedModel,
    node: &TypedNode,
    kernel: Kernel,
) -> TractResult<Option<Result<Box<dyn TypedOp>, String>>> {
    let quantized = node.op_as::<EinSum>().is_some_and(|e| e.q_params.is_some())
        || node.op_as::<Conv>().is_some_and(|c| c.q_params.is_some());
    if quantized && node.inputs.len() != 9 {
        return Ok(Some(Err(format!(
            "{} inputs, expected 9",
            node.inputs.len()
        ))));
    }
    if let Some(einsum) = node.op_as::<EinSum>().filter(|e| e.q_params.is_some()) {
        Ok(Some(
            plan_node(model, node, einsum, kernel)?.map(|op| Box::new(op) as _),
        ))
    } else if let Some(conv) = node.op_as::<Conv>().filter(|c| c.q_params.is_some()) {
        Ok(Some(
            plan_conv(model, node, conv, kernel)?.map(|op| Box::new(op) as _),
        ))
    } else {
        Ok(None)
    }
}

/// Fold the `QuantizeLinear` feeding each of our ops, and the `DequantizeLinear` it feeds, into
/// the op: one pass over the activations instead of three, and on our threads (tract's Q/DQ
/// loops are scalar and single-threaded). Only where our op is the Q's sole consumer and the DQ
/// is our op's sole consumer, and the quantization is symmetric like the op's own.
pub fn fuse_quantization(model: &mut TypedModel, report: &mut RewriteReport) -> TractResult<()> {
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(ours) = as_int8_op(node) else {
            continue;
        };
        let (in_q, out_dq) = ours.fused();
        let mut input = node.inputs[0];
        let mut quant = in_q;
        let prev = model.node(input.node);
        if quant.is_none() && prev.outputs[0].successors.len() == 1 {
            if let Some(q) = prev
                .op_as::<ElementWiseOp>()
                .and_then(|e| e.0.downcast_ref::<QuantizeLinearI8>())
            {
                if q.zero_point == 0
                    && model.outlet_fact(prev.inputs[0])?.datum_type == f32::datum_type()
                {
                    quant = Some(Quantize {
                        scale: q.scale,
                        zero_point: 0,
                    });
                    input = prev.inputs[0];
                }
            }
        }
        let mut dequant = out_dq;
        let mut replaced_outlet = OutletId::new(id, 0);
        if dequant.is_none() && node.outputs[0].successors.len() == 1 {
            let next = model.node(node.outputs[0].successors[0].node);
            if let Some(dq) = next.op_as::<DequantizeLinearF32>() {
                dequant = Some(Dequantize {
                    scale: dq.scale,
                    zero_point: dq.zero_point,
                });
                replaced_outlet = OutletId::new(next.id, 0);
            }
        }
        if quant == in_q && dequant == out_dq {
            continue;
        }
        let op = ours.with_fused(quant, dequant);
        report.fused_quantize += (quant != in_q) as usize;
        report.fused_dequantize += (dequant != out_dq) as usize;
        let name = node.name.clone();
        let mut patch = TypedModelPatch::new(format!("fuse quantization into {name}"));
        let tap = patch.tap_model(model, input)?;
        let out = patch.wire_node(format!("{name}.fused"), op, &[tap])?[0];
        patch.shunt_outside(model, replaced_outlet, out)?;
        patch.apply(model)?;
    }
    model.compact()?;
    Ok(())
}

/// The replacement op for one quantized convolution (9 inputs), or why there is none.
fn plan_conv(
    model: &TypedModel,
    node: &TypedNode,
    conv: &Conv,
    kernel: Kernel,
) -> TractResult<Result<QConvOp, String>> {
    if node.outputs[0].fact.datum_type.unquantized() != i8::datum_type() {
        return Ok(Err("output is not i8".into()));
    }
    let spec = &conv.pool_spec;
    if conv.group != 1 {
        return Ok(Err(format!("grouped ({}) convolution", conv.group)));
    }
    if spec.data_format != DataFormat::NCHW || conv.kernel_fmt != KernelFormat::OIHW {
        return Ok(Err("not NCHW/OIHW".into()));
    }
    if spec.kernel_shape.len() != 2 {
        return Ok(Err("not a 2-D convolution".into()));
    }
    let facts = model.node_input_facts(node.id)?;
    let x = facts[0];
    if x.datum_type != i8::datum_type() || x.konst.is_some() || x.rank() != 4 {
        return Ok(Err("input is not a runtime NCHW i8 tensor".into()));
    }
    let Some(chw) = x
        .shape
        .iter()
        .skip(1)
        .map(|d| d.to_usize().ok())
        .collect::<Option<Vec<_>>>()
    else {
        return Ok(Err("symbolic image size".into()));
    };
    let Some(w) = facts[1].konst.clone() else {
        return Ok(Err("kernel is not constant".into()));
    };
    if w.datum_type() != i8::datum_type() || w.rank() != 4 || w.shape()[1] != chw[0] {
        return Ok(Err(format!(
            "kernel is {:?} {:?}",
            w.datum_type(),
            w.shape()
        )));
    }
    if let Some(reason) = zero_points_not_zero(&facts)? {
        return Ok(Err(reason));
    }
    let o = w.shape()[0];
    let padding = spec.computed_padding(&[chw[1], chw[2]]);
    let (strides, dilations) = (spec.strides(), spec.dilations());
    let geometry = ConvGeometry {
        input: [chw[0], chw[1], chw[2]],
        kernel: [spec.kernel_shape[0], spec.kernel_shape[1]],
        strides: [strides[0], strides[1]],
        dilations: [dilations[0], dilations[1]],
        pad_before: [padding[0].pad_before, padding[1].pad_before],
        output: [padding[0].convoluted, padding[1].convoluted],
    };
    let k = geometry.depth();
    let w_view = w.try_as_plain_ram()?;
    let w_data = w_view.as_slice::<i8>()?;
    // OIHW: output channel o's patch weights are contiguous, (channel, ky, kx); Im2Col's rows
    // are (ky, kx, channel).
    let packed = PackedB::new(kernel, k, o, |kk, c| {
        w_data[c * k + patch_order(&geometry, kk)]
    });
    let per_channel = |slot: usize| facts[slot].shape.volume().to_usize().ok() == Some(o);
    let requant = match requant_of(&facts, per_channel)? {
        Ok(r) => r,
        Err(reason) => return Ok(Err(reason)),
    };
    Ok(Ok(QConvOp {
        b: Arc::new(packed),
        requant,
        geometry,
        input_quant: None,
        output_dequant: None,
    }))
}

/// Why the zero points (slots 3, 5, 7) are not all constant zeros, if they are not.
fn zero_points_not_zero(facts: &[&TypedFact]) -> TractResult<Option<String>> {
    for (slot, what) in [(3, "activation"), (5, "weight"), (7, "output")] {
        match const_i32s(facts[slot])? {
            Some(v) if v.iter().all(|&z| z == 0) => {}
            Some(_) => return Ok(Some(format!("{what} zero point is not 0"))),
            None => return Ok(Some(format!("{what} zero point is not constant"))),
        }
    }
    Ok(None)
}

/// Bias (slot 2) and the folded scale from slots 4, 6, 8; `per_column(slot)` says whether a
/// non-scalar bias or weight scale lines up with the output columns.
fn requant_of(
    facts: &[&TypedFact],
    per_column: impl Fn(usize) -> bool,
) -> TractResult<Result<Requant, String>> {
    let Some(bias) = const_i32s(facts[2])? else {
        return Ok(Err("bias is not constant".into()));
    };
    if bias.len() != 1 && !per_column(2) {
        return Ok(Err("bias is neither scalar nor per output column".into()));
    }
    let mut scales = Vec::with_capacity(3);
    for slot in [4, 6, 8] {
        match const_f32s(facts[slot])? {
            Some(v) if v.iter().all(|s| s.is_finite() && *s > 0.0) => scales.push(v),
            Some(_) => return Ok(Err("a scale is not a positive finite number".into())),
            None => return Ok(Err("a scale is not constant".into())),
        }
    }
    let (a_scale, b_scale, c_scale) = (&scales[0], &scales[1], &scales[2]);
    if a_scale.len() != 1 || c_scale.len() != 1 {
        return Ok(Err("activation or output scale is not per tensor".into()));
    }
    if b_scale.len() != 1 && !per_column(6) {
        return Ok(Err(
            "weight scale is neither scalar nor per output column".into()
        ));
    }
    // tract folds the scales the same way: (a · b) / c in f32.
    let scale = b_scale
        .iter()
        .map(|&bs| a_scale[0] * bs / c_scale[0])
        .collect();
    Ok(Ok(Requant {
        bias,
        scale,
        zero_point: 0,
    }))
}

/// How our op's outputs compare with tract's on the same inputs, node by node.
#[derive(Debug, Clone, Default)]
pub struct Agreement {
    /// Quantized matmul nodes checked.
    pub nodes: usize,
    /// Output values compared.
    pub values: usize,
    /// Values that differ.
    pub differing: usize,
    /// Largest difference, in i8 steps.
    pub max_abs_diff: i32,
}

/// Run the decluttered `model` on `inputs` with tract's plain evaluation and, at every quantized
/// matmul the rewrite would replace, also evaluate [`QMatMulOp`] on the very same input and
/// compare: the per-node check that our kernels compute what tract computes (tract's plain path
/// requantizes with the same folded f32 scale, so the outputs should be identical).
pub fn compare_with_tract(
    model: &TypedModel,
    inputs: TVec<TValue>,
    kernel: Kernel,
) -> TractResult<Agreement> {
    let mut replacements = std::collections::HashMap::new();
    for id in model.eval_order()? {
        let node = model.node(id);
        if let Some(Ok(op)) = replacement(model, node, kernel)? {
            replacements.insert(id, op);
        }
    }
    let plan = model.clone().into_runnable()?;
    let mut state = plan.spawn()?;
    let mut agreement = Agreement::default();
    state.run_plan_with_eval(inputs, |ctx, op_state, node, input| -> TractResult<_> {
        let a = input.first().cloned();
        let theirs = tract_onnx::tract_core::plan::eval(ctx, op_state, node, input)?;
        if let (Some(op), Some(a)) = (replacements.get(&node.id), a) {
            let ours = op.eval(ctx, tvec!(a))?;
            let t = theirs[0].cast_to::<i8>()?;
            let t = t.try_as_plain_ram()?;
            let o = ours[0].try_as_plain_ram()?;
            let (t, o) = (t.as_slice::<i8>()?, o.as_slice::<i8>()?);
            ensure!(t.len() == o.len(), "{}: output sizes differ", node.name);
            agreement.nodes += 1;
            agreement.values += t.len();
            for (x, y) in t.iter().zip(o) {
                let d = (*x as i32 - *y as i32).abs();
                if d != 0 {
                    agreement.differing += 1;
                    agreement.max_abs_diff = agreement.max_abs_diff.max(d);
                }
            }
        }
        Ok(theirs)
    })?;
    Ok(agreement)
}

/// The replacement op for one quantized EinSum (9 inputs), or why there is none.
fn plan_node(
    model: &TypedModel,
    node: &TypedNode,
    op: &EinSum,
    kernel: Kernel,
) -> TractResult<Result<QMatMulOp, String>> {
    if op.q_params != Some(i8::datum_type()) {
        return Ok(Err(format!("output type {:?}", op.q_params)));
    }
    let facts = model.node_input_facts(node.id)?;
    let (a, b) = (facts[0], facts[1]);
    if a.datum_type != i8::datum_type() || a.konst.is_some() {
        return Ok(Err("activation is not a runtime i8 tensor".into()));
    }
    let Some(b_tensor) = b.konst.clone() else {
        return Ok(Err("weights are not constant".into()));
    };
    if b_tensor.datum_type() != i8::datum_type() {
        return Ok(Err(format!("weights are {:?}", b_tensor.datum_type())));
    }
    // Zero points: all zero (symmetric quantization), whatever their integer type.
    if let Some(reason) = zero_points_not_zero(&facts)? {
        return Ok(Err(reason));
    }

    // Axis roles. Slots: 0 = activation, 1 = weights, output 0.
    let b_shape: Vec<usize> = b_tensor.shape().to_vec();
    let out_rank = op.axes.rank(InOut::Out(0));
    let mut m_axes: Vec<(usize, Option<usize>)> = vec![]; // (a position, output position)
    let mut k_axes: Vec<(usize, usize, usize)> = vec![]; // (a position, b position, size)
    let mut n_axes: Vec<(usize, usize, usize)> = vec![]; // (b position, output position, size)
    let mut out_axes: Vec<Option<OutAxis>> = vec![None; out_rank];
    let mut n_link: Option<char> = None;
    for axis in op.axes.iter_all_axes() {
        let (ia, ib, io) = (&axis.inputs[0], &axis.inputs[1], &axis.outputs[0]);
        if ia.len() > 1 || ib.len() > 1 || io.len() > 1 {
            return Ok(Err(format!("axis {} repeats in one operand", axis.repr)));
        }
        let size_a = ia.first().map(|&p| a.shape[p].clone());
        let size_b = ib.first().map(|&p| b_shape[p]);
        match (ia.first(), ib.first(), io.first()) {
            (Some(&pa), Some(&pb), None) => {
                let Some(size) = size_a.as_ref().and_then(|d| d.to_usize().ok()) else {
                    return Ok(Err("symbolic depth".into()));
                };
                if size != b_shape[pb] {
                    return Ok(Err(format!("depth axis {} sizes differ", axis.repr)));
                }
                k_axes.push((pa, pb, size));
            }
            (Some(&pa), None, Some(&po)) => {
                m_axes.push((pa, Some(po)));
                out_axes[po] = Some(OutAxis::FromA(pa));
            }
            (None, Some(&pb), Some(&po)) => {
                n_axes.push((pb, po, b_shape[pb]));
                out_axes[po] = Some(OutAxis::Fixed(b_shape[pb]));
                if b_shape[pb] > 1 {
                    n_link = Some(axis.repr);
                }
            }
            (None, None, Some(&po)) => out_axes[po] = Some(OutAxis::Fixed(1)),
            (Some(&pa), None, None) if size_a.as_ref().is_some_and(|d| d.is_one()) => {
                m_axes.push((pa, None));
            }
            (None, Some(_), None) if size_b == Some(1) => {}
            (None, None, None) => {}
            _ => {
                return Ok(Err(format!(
                    "axis {} is a batch or reduction axis of one operand",
                    axis.repr
                )))
            }
        }
    }
    let Some(out_axes) = out_axes.into_iter().collect::<Option<Vec<_>>>() else {
        return Ok(Err("an output axis has no source".into()));
    };

    // Memory orders, ignoring size-1 axes (they do not move memory).
    let a_big = |p: usize| !a.shape[p].is_one();
    let a_order: Vec<char> = (0..a.rank())
        .filter(|&p| a_big(p))
        .map(|p| {
            if k_axes.iter().any(|k| k.0 == p) {
                'k'
            } else {
                'm'
            }
        })
        .collect();
    let Some(a_layout) = two_block_layout(&a_order, 'm', 'k') else {
        return Ok(Err("activation axes interleave m and k".into()));
    };
    let out_big = |p: usize| match out_axes[p] {
        OutAxis::FromA(pa) => a_big(pa),
        OutAxis::Fixed(s) => s > 1,
    };
    let out_order: Vec<char> = (0..out_rank)
        .filter(|&p| out_big(p))
        .map(|p| match out_axes[p] {
            OutAxis::FromA(_) => 'm',
            OutAxis::Fixed(_) => 'n',
        })
        .collect();
    let Some(c_layout) = two_block_layout(&out_order, 'm', 'n') else {
        return Ok(Err("output axes interleave m and n".into()));
    };
    // The m axes must keep their order from activation to output.
    let mut m_by_a: Vec<_> = m_axes.iter().filter(|m| a_big(m.0)).collect();
    m_by_a.sort_by_key(|m| m.0);
    if m_by_a.windows(2).any(|w| w[0].1 > w[1].1) {
        return Ok(Err("m axes are reordered".into()));
    }

    // B as a k × n matrix: flat k in the activation's order, flat n in the output's order.
    k_axes.sort_by_key(|k| k.0);
    n_axes.sort_by_key(|n| n.1);
    let k: usize = k_axes.iter().map(|k| k.2).product();
    let n: usize = n_axes.iter().map(|n| n.2).product();
    let b_strides = strides(&b_shape);
    let b_view = b_tensor.try_as_plain_ram()?;
    let b_data = b_view.as_slice::<i8>()?;
    let offset_of = |index: usize, axes: &[(usize, usize)]| -> usize {
        // axes: (b position, size), slowest first.
        let mut rest = index;
        let mut off = 0;
        for &(pb, size) in axes.iter().rev() {
            off += (rest % size) * b_strides[pb];
            rest /= size;
        }
        off
    };
    let k_list: Vec<(usize, usize)> = k_axes.iter().map(|k| (k.1, k.2)).collect();
    let n_list: Vec<(usize, usize)> = n_axes.iter().map(|n| (n.0, n.2)).collect();
    let k_off: Vec<usize> = (0..k).map(|i| offset_of(i, &k_list)).collect();
    let n_off: Vec<usize> = (0..n).map(|j| offset_of(j, &n_list)).collect();
    let packed = PackedB::new(kernel, k, n, |kk, c| b_data[k_off[kk] + n_off[c]]);

    // Bias (slot 2) and weight scale (slot 6): scalar, or one value per column of a single n axis.
    let per_column = |slot: usize| -> bool {
        let fact = facts[slot];
        let Some(link) = n_link else { return false };
        let Ok(axis) = op.axes.axis(link) else {
            return false;
        };
        n_axes.iter().filter(|a| a.2 > 1).count() == 1
            && fact.shape.iter().filter(|d| !d.is_one()).count() == 1
            && axis.inputs[slot].len() == 1
            && fact.shape[axis.inputs[slot][0]].to_usize().ok() == Some(n)
    };
    let requant = match requant_of(&facts, per_column)? {
        Ok(r) => r,
        Err(reason) => return Ok(Err(reason)),
    };
    Ok(Ok(QMatMulOp {
        b: Arc::new(packed),
        requant,
        a_layout,
        c_layout,
        out_axes,
        input_quant: None,
        output_dequant: None,
        epilogue: Default::default(),
        output_requant: None,
        input_norm: None,
    }))
}

/// RowMajor when `order` is all `first` then all `second`, ColMajor for the reverse.
fn two_block_layout(order: &[char], first: char, second: char) -> Option<Layout> {
    // Only two letters occur, so "x block then y block" means no x after the first y.
    let x_then_y = |x: char, y: char| {
        let cut = order.iter().position(|&c| c == y).unwrap_or(order.len());
        order[cut..].iter().all(|&c| c != x)
    };
    if x_then_y(first, second) {
        Some(Layout::RowMajor)
    } else if x_then_y(second, first) {
        Some(Layout::ColMajor)
    } else {
        None
    }
}

/// Row-major strides of `shape`.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The values of a constant fact whose type `accept` admits, cast to `T`.
fn const_values<T: Datum + Copy>(
    fact: &TypedFact,
    accept: fn(&DatumType) -> bool,
) -> TractResult<Option<Vec<T>>> {
    let Some(t) = &fact.konst else {
        return Ok(None);
    };
    if !accept(&t.datum_type()) {
        return Ok(None);
    }
    let t = t.cast_to::<T>()?;
    Ok(Some(t.try_as_plain_ram()?.as_slice::<T>()?.to_vec()))
}

/// The values of a constant integer fact as i32.
fn const_i32s(fact: &TypedFact) -> TractResult<Option<Vec<i32>>> {
    const_values(fact, DatumType::is_integer)
}

/// The values of a constant float fact as f32.
fn const_f32s(fact: &TypedFact) -> TractResult<Option<Vec<f32>>> {
    const_values(fact, DatumType::is_float)
}
