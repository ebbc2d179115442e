//! Window partition and merge as one pass each: chains of reshapes, transposes, pads and slices
//! that only move whole rows (the last axis) become one gather of rows.
//!
//! TinyViT's attention works on 7×7 (or 14×14) windows of the token grid. The graph partitions
//! the tokens `[H·W, C]` with a reshape to `[H, W, C]`, a zero pad to whole windows, a reshape
//! and a transpose, and merges the windows back with a reshape, a transpose and two slices, then
//! adds the residual: per block two single-threaded copies of up to 9 MB on the way in (the pad
//! and the transpose, 3-7 ms and 2-6 ms in stage 1 on the default model, 2 threads) and three
//! on the way out. Every one of those ops moves the `C` values of a token together, so the whole
//! chain is a gather of rows: output row `r` is input row `map[r]`, or zeros where the chain pads.
//! [`rewrite_row_gathers`] finds such chains, works out `map` by running the chain itself on a
//! tensor of row numbers (so nothing about the ops is assumed), and puts [`RowGather`] in their
//! place, with the residual add that follows a merge folded in. Values are copied (or added, as
//! tract adds them), so the results are bit for bit the same.
#![deny(unsafe_code)]

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::{Pad, Slice};
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::math::Add;

use super::graph::{concrete_shape, sole_consumer};

/// Output row `r` is input row `rows[r] - 1`, or zeros where `rows[r]` is 0; with a second
/// input, the residual (same shape as the output) is added to every row.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RowGather {
    /// Per output row: 1 + the input row it copies, 0 for a row of zeros.
    pub rows: Arc<Vec<u32>>,
    /// Values per row (the last axis, the same in input and output).
    pub width: usize,
    /// Input rows (all input axes but the last).
    pub input_rows: usize,
    /// Output shape (its last axis is `width`).
    pub output_shape: TVec<usize>,
    /// Whether a residual of the output's shape is added (a second input).
    pub adds_residual: bool,
}

impl Op for RowGather {
    fn name(&self) -> StaticName {
        "TinysamRowGather".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let zeros = self.rows.iter().filter(|&&r| r == 0).count();
        Ok(vec![format!(
            "{} rows of {} values from {} ({zeros} of zeros){}",
            self.rows.len(),
            self.width,
            self.input_rows,
            if self.adds_residual {
                ", plus the residual"
            } else {
                ""
            }
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for RowGather {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(
            inputs.len() == 1 + usize::from(self.adds_residual),
            "TinysamRowGather takes {} input(s), got {}",
            1 + usize::from(self.adds_residual),
            inputs.len()
        );
        let source = inputs[0].to_plain_array_view::<f32>()?;
        let source = source.as_slice().context("contiguous rows")?;
        ensure!(
            source.len() == self.input_rows * self.width,
            "TinysamRowGather expects {} rows of {}, got {} values",
            self.input_rows,
            self.width,
            source.len()
        );
        let residual = match inputs.get(1) {
            Some(r) => Some(r.to_plain_array_view::<f32>()?),
            None => None,
        };
        let residual = match &residual {
            Some(r) => Some(r.as_slice().context("contiguous residual")?),
            None => None,
        };
        // Not zeroed first: a pass over up to 8 MB per node (20 nodes a frame) that `gather`
        // overwrites.
        // SAFETY: f32 has no invalid bit patterns, and `gather` writes every row of `out`
        // (copied, zero-filled or summed; every task covers whole rows) before the tensor is
        // read; on an error it is dropped unread.
        #[allow(unsafe_code)]
        let mut out = unsafe { Tensor::uninitialized::<f32>(&self.output_shape)? };
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let out = view.as_slice_mut::<f32>()?;
            ensure!(
                residual.is_none_or(|r| r.len() == out.len()),
                "the residual does not have the output's {} values",
                out.len()
            );
            self.gather(source, residual, out)?;
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl RowGather {
    /// Fill `out` (threaded over rows on tract's executor).
    fn gather(&self, source: &[f32], residual: Option<&[f32]>, out: &mut [f32]) -> TractResult<()> {
        let w = self.width;
        if w == 0 || out.is_empty() {
            return Ok(());
        }
        tract_linalg::multithread::par_chunks_mut(out, w, out.len(), |first, chunk| {
            for (i, row) in chunk.chunks_exact_mut(w).enumerate() {
                let r = first + i;
                let from = match self.rows.get(r).copied().unwrap_or(0) {
                    0 => None,
                    k => {
                        let k = (k - 1) as usize;
                        source.get(k * w..(k + 1) * w)
                    }
                };
                match (from, residual) {
                    (Some(from), None) => row.copy_from_slice(from),
                    (None, None) => row.fill(0.0),
                    (from, Some(res)) => {
                        let res = &res[r * w..(r + 1) * w];
                        match from {
                            Some(from) => {
                                for ((o, &a), &b) in row.iter_mut().zip(res).zip(from) {
                                    *o = a + b;
                                }
                            }
                            None => {
                                for (o, &a) in row.iter_mut().zip(res) {
                                    *o = a + 0.0;
                                }
                            }
                        }
                    }
                }
            }
            Ok(())
        })
    }
}

impl TypedOp for RowGather {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs
                .iter()
                .all(|f| f.datum_type == f32::datum_type() && f.shape.as_concrete().is_some()),
            "TinysamRowGather takes f32 tensors of known shape"
        );
        if let Some(res) = inputs.get(1) {
            ensure!(
                res.shape.as_concrete() == Some(&self.output_shape[..]),
                "the residual {:?} is not of the output's shape {:?}",
                res.shape,
                self.output_shape
            );
        }
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }

    as_op!();
}

/// Whether `node` only moves values: an axis op, a pad or a slice, with one input.
fn moves_values(node: &TypedNode) -> bool {
    node.inputs.len() == 1
        && (node.op_is::<AxisOp>() || node.op_is::<Pad>() || node.op_is::<Slice>())
}

/// Whether `node` moves values across positions (not only reshapes them).
fn reorders(node: &TypedNode) -> bool {
    node.op_is::<Pad>()
        || node.op_is::<Slice>()
        || matches!(node.op_as::<AxisOp>(), Some(AxisOp::Move(..)))
}

/// Replace every chain of axis ops, pads and slices that moves whole rows (and is more than
/// reshapes) by [`RowGather`], with a following residual add folded in; returns how many.
pub fn rewrite_row_gathers(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let Some(node) = model.nodes().get(id) else {
            continue;
        };
        // Chains start after a node that does not move values, or whose output others read too.
        let producer = node.inputs.first().map(|i| i.node);
        let continues = producer.is_some_and(|p| {
            moves_values(model.node(p)) && sole_consumer(model, OutletId::new(p, 0)) == Some(id)
        });
        if !moves_values(node) || continues {
            continue;
        }
        let name = node.name.clone();
        let Some(plan) = plan(model, id)? else {
            continue;
        };
        let mut patch = TypedModelPatch::new(format!("row gather from {name}"));
        let mut inputs = vec![patch.tap_model(model, plan.source)?];
        if let Some(res) = plan.residual {
            inputs.push(patch.tap_model(model, res)?);
        }
        let out = patch.wire_node(format!("{name}.row_gather"), plan.op, &inputs)?[0];
        patch.shunt_outside(model, plan.end, out)?;
        patch.apply(model)?;
        replaced += 1;
    }
    model.compact()?;
    Ok(replaced)
}

/// What replaces one chain.
struct Plan {
    source: OutletId,
    residual: Option<OutletId>,
    end: OutletId,
    op: RowGather,
}

/// The chain starting at node `start`, if it is a row gather worth replacing.
fn plan(model: &TypedModel, start: usize) -> TractResult<Option<Plan>> {
    let mut chain = vec![start];
    let mut end = start;
    while let Some(next) = sole_consumer(model, OutletId::new(end, 0)) {
        if !moves_values(model.node(next)) {
            break;
        }
        chain.push(next);
        end = next;
    }
    if !chain.iter().any(|&id| reorders(model.node(id))) {
        return Ok(None);
    }
    let source = model.node(start).inputs[0];
    let end = OutletId::new(end, 0);
    let (Some(in_shape), Some(out_shape)) =
        (concrete_shape(model, source)?, concrete_shape(model, end)?)
    else {
        return Ok(None);
    };
    let (Some(&width), Some(&out_width)) = (in_shape.last(), out_shape.last()) else {
        return Ok(None);
    };
    if model.outlet_fact(source)?.datum_type != f32::datum_type()
        || width != out_width
        || width == 0
    {
        return Ok(None);
    }
    let input_rows = in_shape.iter().product::<usize>() / width;
    let Some(rows) = rows_through(model, &chain, &in_shape)? else {
        log::debug!(
            "{}: the chain does not move whole rows",
            model.node(start).name
        );
        return Ok(None);
    };
    if rows.iter().enumerate().all(|(r, &k)| k as usize == r + 1) && rows.len() == input_rows {
        return Ok(None);
    }
    // A residual add of the output's shape that only this chain feeds is folded in.
    let mut residual = None;
    let mut last = end;
    if let Some(add) = sole_consumer(model, end) {
        let node = model.node(add);
        let is_add = node
            .op_as::<TypedBinOp>()
            .is_some_and(|b| b.0.is::<Add>() && b.1.is_none());
        if is_add && node.inputs.len() == 2 {
            let other = if node.inputs[0] == end {
                node.inputs[1]
            } else {
                node.inputs[0]
            };
            let same = concrete_shape(model, other)?.as_deref() == Some(&out_shape[..])
                && model.outlet_fact(other)?.datum_type == f32::datum_type()
                && concrete_shape(model, OutletId::new(add, 0))?.as_deref() == Some(&out_shape[..]);
            if same && other != end {
                residual = Some(other);
                last = OutletId::new(add, 0);
            }
        }
    }
    Ok(Some(Plan {
        source,
        residual,
        end: last,
        op: RowGather {
            rows: Arc::new(rows),
            width,
            input_rows,
            output_shape: out_shape.into(),
            adds_residual: residual.is_some(),
        },
    }))
}

/// Run `chain` on a `shape` tensor whose value at row `k`, column `j` is `k·width + j + 1`; if
/// every output row is either all zeros or one whole input row in order, the input row of each
/// (plus one, 0 for zeros). `None` otherwise, or if the values would not be exact in f32.
fn rows_through(
    model: &TypedModel,
    chain: &[usize],
    shape: &[usize],
) -> TractResult<Option<Vec<u32>>> {
    let len: usize = shape.iter().product();
    let width = shape.last().copied().unwrap_or(0);
    if len == 0 || width == 0 || len >= 1 << 24 {
        return Ok(None);
    }
    let values: Vec<f32> = (1..=len).map(|v| v as f32).collect();
    let mut t = Tensor::from_shape(shape, &values)?.into_tvalue();
    for &id in chain {
        let Some(out) = model.node(id).op.eval_out_of_plan(tvec!(t))? else {
            return Ok(None);
        };
        t = out.into_iter().next().context("an output")?;
    }
    if t.shape().last() != Some(&width) {
        return Ok(None);
    }
    let view = t.to_plain_array_view::<f32>()?;
    let Some(out) = view.as_slice() else {
        return Ok(None);
    };
    let mut rows = Vec::with_capacity(out.len() / width);
    for row in out.chunks_exact(width) {
        let first = row[0];
        if first == 0.0 {
            if row.iter().any(|&v| v != 0.0) {
                return Ok(None);
            }
            rows.push(0);
            continue;
        }
        let k = (first as usize - 1) / width;
        let whole = (first as usize - 1).is_multiple_of(width)
            && row
                .iter()
                .enumerate()
                .all(|(j, &v)| v == (k * width + j + 1) as f32);
        if !whole {
            return Ok(None);
        }
        rows.push(u32::try_from(k + 1)?);
    }
    Ok(Some(rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::{
        decluttered_encoder, fixture_dir, max_difference, pattern_input, pattern_tensor,
        run_first_output, run_model,
    };
    use crate::model::Precision;
    use tract_onnx::tract_core::ops::array::PadMode;

    /// TinyViT's partition of `h × w` tokens into `ws × ws` windows (zero-padded), an identity
    /// in between, then the merge and the residual add.
    fn window_graph(h: usize, w: usize, c: usize, ws: usize) -> TractResult<TypedModel> {
        let (ph, pw) = (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws);
        let (nh, nw) = (ph / ws, pw / ws);
        let d = |v: usize| -> TDim { v.into() };
        let mut m = TypedModel::default();
        let x = m.add_source("tokens", f32::fact([h * w, c]))?;
        let t = m.wire_node(
            "grid",
            AxisOp::Reshape(0, tvec![d(h * w)], tvec![d(h), d(w)]),
            &[x],
        )?[0];
        let pad = Pad::new(
            vec![(0, ph - h), (0, pw - w), (0, 0)],
            PadMode::Constant(Arc::new(tensor0(0f32))),
        );
        let t = m.wire_node("pad", pad, &[t])?[0];
        let t = m.wire_node(
            "split_h",
            AxisOp::Reshape(0, tvec![d(ph)], tvec![d(nh), d(ws)]),
            &[t],
        )?[0];
        let t = m.wire_node(
            "split_w",
            AxisOp::Reshape(2, tvec![d(pw)], tvec![d(nw), d(ws)]),
            &[t],
        )?[0];
        let t = m.wire_node("windows", AxisOp::Move(1, 2), &[t])?[0];
        let t = m.wire_node(
            "flat",
            AxisOp::Reshape(
                0,
                tvec![d(nh), d(nw), d(ws), d(ws)],
                tvec![d(nh * nw), d(ws * ws)],
            ),
            &[t],
        )?[0];
        // Something between partition and merge that is not a move.
        let scale = m.add_const("scale", tensor0(1.5f32).broadcast_into_rank(3)?)?;
        let t = m.wire_node(
            "work",
            tract_onnx::tract_core::ops::math::mul(),
            &[t, scale],
        )?[0];
        let t = m.wire_node(
            "unflat",
            AxisOp::Reshape(
                0,
                tvec![d(nh * nw), d(ws * ws)],
                tvec![d(nh), d(nw), d(ws), d(ws)],
            ),
            &[t],
        )?[0];
        let t = m.wire_node("unwindows", AxisOp::Move(2, 1), &[t])?[0];
        let t = m.wire_node(
            "merge",
            AxisOp::Reshape(0, tvec![d(nh), d(ws), d(nw), d(ws)], tvec![d(ph), d(pw)]),
            &[t],
        )?[0];
        let t = m.wire_node("crop_h", Slice::new(0, 0, h), &[t])?[0];
        let t = m.wire_node("crop_w", Slice::new(1, 0, w), &[t])?[0];
        let t = m.wire_node(
            "tokens_out",
            AxisOp::Reshape(0, tvec![d(h), d(w)], tvec![d(h * w)]),
            &[t],
        )?[0];
        let t = m.wire_node(
            "residual",
            tract_onnx::tract_core::ops::math::add(),
            &[x, t],
        )?[0];
        m.select_output_outlets(&[t])?;
        Ok(m)
    }

    #[test]
    fn window_partition_and_merge_are_row_gathers_bit_for_bit() -> TractResult<()> {
        for (h, w, c, ws) in [(9, 9, 8, 7), (14, 14, 5, 7), (3, 10, 16, 4), (1, 1, 3, 2)] {
            let graph = window_graph(h, w, c, ws)?;
            let mut ours = graph.clone();
            assert_eq!(rewrite_row_gathers(&mut ours)?, 2, "{h}x{w}x{c} ws {ws}");
            assert!(!ours.nodes().iter().any(reorders), "{h}x{w}x{c}");
            let gathers: Vec<&RowGather> = ours
                .nodes()
                .iter()
                .filter_map(|n| n.op_as::<RowGather>())
                .collect();
            assert_eq!(gathers.iter().filter(|g| g.adds_residual).count(), 1);
            let padded = h.div_ceil(ws) * w.div_ceil(ws) * ws * ws;
            assert_eq!(gathers[0].rows.len(), padded);
            assert_eq!(
                gathers[0].rows.iter().filter(|&&r| r == 0).count(),
                padded - h * w
            );
            let input = pattern_tensor(&[h * w, c], 7, 2.0);
            assert_eq!(
                run_first_output(ours, &input)?,
                run_first_output(graph, &input)?,
                "{h}x{w}x{c} ws {ws}"
            );
        }
        Ok(())
    }

    #[test]
    fn moves_that_split_rows_are_left_alone() -> TractResult<()> {
        // A transpose of the last axis: values of a row end up in different rows.
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact([4, 6]))?;
        let t = m.wire_node("t", AxisOp::Move(0, 1), &[x])?[0];
        m.select_output_outlets(&[t])?;
        assert_eq!(rewrite_row_gathers(&mut m)?, 0);
        // A pad of the last axis.
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact([4, 6]))?;
        let pad = Pad::new(
            vec![(0, 1), (1, 0)],
            PadMode::Constant(Arc::new(tensor0(0f32))),
        );
        let t = m.wire_node("p", pad, &[x])?[0];
        m.select_output_outlets(&[t])?;
        assert_eq!(rewrite_row_gathers(&mut m)?, 0);
        // A pad with a value other than zero.
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact([4, 6]))?;
        let pad = Pad::new(
            vec![(0, 2), (0, 0)],
            PadMode::Constant(Arc::new(tensor0(1f32))),
        );
        let t = m.wire_node("p", pad, &[x])?[0];
        m.select_output_outlets(&[t])?;
        assert_eq!(rewrite_row_gathers(&mut m)?, 0);
        Ok(())
    }

    /// The fixture's encoders: every window partition and merge becomes a gather, and the
    /// embedding stays the same bit for bit.
    #[test]
    fn the_fixture_encoders_keep_their_embeddings() -> TractResult<()> {
        for precision in [Precision::Fp32, Precision::Int8] {
            let (graph, s) = decluttered_encoder(&fixture_dir(), precision);
            let mut ours = graph.clone();
            let replaced = rewrite_row_gathers(&mut ours)?;
            // A partition and a merge per attention block.
            let blocks = graph
                .nodes()
                .iter()
                .filter(|n| n.op.name() == "Softmax")
                .count();
            assert!(
                blocks > 0 && replaced >= 2 * blocks,
                "{precision}: {replaced}, {blocks} blocks"
            );
            let input = pattern_input(s);
            let (err, scale) = max_difference(
                &run_model(ours, std::slice::from_ref(&input))?,
                &run_model(graph, std::slice::from_ref(&input))?,
            );
            eprintln!("fixture {precision} encoder, {replaced} row gathers: {err:e} of {scale}");
            assert_eq!(
                err, 0.0,
                "{precision}: the embedding moved by {err} of {scale}"
            );
        }
        Ok(())
    }

    /// The shipped model's INT8 encoder at 1024²: the ten blocks' partitions and merges, and
    /// the same embedding bit for bit. Only on x86_64 (under qemu the encoder takes minutes).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_default_int8_encoder_keeps_its_embedding() -> TractResult<()> {
        crate::model::test_support::assert_default_int8_encoder_unchanged(rewrite_row_gathers, 20)
    }
}
