//! [`AxisSoftmax`]: softmax over one axis of an f32 tensor, vectorised across the axes after it.
//!
//! tract 0.23.9 runs a softmax fast only over the last axis with long rows: over a middle axis
//! it walks the tensor one lane at a time through `ndarray` views, and on short last-axis rows
//! the per-row set-up dominates. The decoder's image->token attention normalises over the ~7
//! prompt tokens for each of 4 096 image tokens, 8 heads and every prompt of the batch:
//! millions of short lanes, 0.2-0.7 s per batch of 16 in tract. Here the tensor is seen as
//! `[outer, axis, inner]`; for each outer index the max, the exponentials and the sum run along
//! `axis` with the `inner` values as contiguous vectors, and outer indices are split across
//! tract's threads.

pub use super::fastmath::exp;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

/// Softmax over `axis` of an f32 tensor (any rank, any position of the axis).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AxisSoftmax {
    /// The normalised axis.
    pub axis: usize,
}

impl Op for AxisSoftmax {
    fn name(&self) -> StaticName {
        "TinysamSoftmax".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("axis {}", self.axis)])
    }

    op_as_typed_op!();
}

impl EvalOp for AxisSoftmax {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1, "TinysamSoftmax takes one input");
        let mut t = inputs
            .into_iter()
            .next()
            .context("one input")?
            .into_tensor();
        let shape = t.shape().to_vec();
        ensure!(
            self.axis < shape.len(),
            "softmax axis {} of a rank-{} tensor",
            self.axis,
            shape.len()
        );
        let len = shape[self.axis];
        let inner: usize = shape[self.axis + 1..].iter().product();
        let group = len * inner;
        if group == 0 {
            return Ok(tvec!(t.into_tvalue()));
        }
        {
            let mut view = t.try_as_plain_ram_mut()?;
            let data = view.as_slice_mut::<f32>()?;
            let total = data.len();
            tract_linalg::multithread::par_chunks_mut(data, group, total, |_, chunk| {
                let mut scratch = vec![0f32; inner];
                for g in chunk.chunks_exact_mut(group) {
                    softmax_group(g, len, inner, &mut scratch);
                }
                Ok(())
            })?;
        }
        Ok(tvec!(t.into_tvalue()))
    }
}

impl TypedOp for AxisSoftmax {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs[0].datum_type == f32::datum_type(),
            "TinysamSoftmax is f32 only"
        );
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// Softmax of one `[len, inner]` block over its first axis, in place; `scratch` has `inner`
/// values (the running max, then the sums).
pub fn softmax_group(g: &mut [f32], len: usize, inner: usize, scratch: &mut [f32]) {
    if inner == 1 {
        softmax_row(g);
        return;
    }
    let Some((first, _)) = g.split_at_mut_checked(inner) else {
        return;
    };
    let max = &mut scratch[..inner];
    max.copy_from_slice(first);
    for row in g.chunks_exact(inner).skip(1).take(len.saturating_sub(1)) {
        for (m, &x) in max.iter_mut().zip(row) {
            *m = m.max(x);
        }
    }
    for row in g.chunks_exact_mut(inner) {
        for (x, &m) in row.iter_mut().zip(max.iter()) {
            *x = exp(*x - m);
        }
    }
    let sum = max;
    sum.fill(0.0);
    for row in g.chunks_exact(inner) {
        for (s, &x) in sum.iter_mut().zip(row) {
            *s += x;
        }
    }
    for s in sum.iter_mut() {
        *s = 1.0 / *s;
    }
    for row in g.chunks_exact_mut(inner) {
        for (x, &r) in row.iter_mut().zip(sum.iter()) {
            *x *= r;
        }
    }
}

/// Softmax of one contiguous row, in place.
fn softmax_row(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in row.iter_mut() {
        *x = exp(*x - max);
        sum += *x;
    }
    let r = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= r;
    }
}

/// Replace every f32 [`Softmax`] over one axis that tract would run slowly (a middle axis, or
/// a last axis shorter than 16) by [`AxisSoftmax`]; returns how many were replaced.
pub fn rewrite_softmax(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(op) = node.op_as::<Softmax>() else {
            continue;
        };
        let fact = model.outlet_fact(node.inputs[0])?;
        let Some(shape) = fact.shape.as_concrete() else {
            continue;
        };
        if op.kind != SoftmaxKind::Softmax
            || op.quant_output_dt.is_some()
            || fact.datum_type != f32::datum_type()
            || op.axes.len() != 1
        {
            continue;
        }
        let axis = op.axes[0];
        let last = axis + 1 == shape.len();
        if last && shape[axis] >= 16 {
            continue;
        }
        let patch =
            TypedModelPatch::replace_single_op(model, node, &node.inputs, AxisSoftmax { axis })?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::decoder::f32_slice;

    fn reference(g: &[f32], len: usize, inner: usize) -> Vec<f32> {
        let mut out = g.to_vec();
        for j in 0..inner {
            let lane: Vec<f64> = (0..len).map(|t| f64::from(g[t * inner + j])).collect();
            let m = lane.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let s: f64 = lane.iter().map(|x| (x - m).exp()).sum();
            for t in 0..len {
                out[t * inner + j] = ((lane[t] - m).exp() / s) as f32;
            }
        }
        out
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm_on_the_softmax_range() {
        let mut worst = 0f32;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let (got, want) = (exp(x), x.exp());
            worst = worst.max((got - want).abs() / want.max(f32::MIN_POSITIVE));
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp(-1000.0), exp(-87.0));
        assert!(exp(-87.0) > 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn groups_match_a_double_precision_softmax() {
        for (len, inner) in [(7, 1), (7, 4096), (3, 5), (1, 9), (13, 1), (49, 1)] {
            let g: Vec<f32> = (0..len * inner)
                .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.03)
                .collect();
            let want = reference(&g, len, inner);
            let mut got = g.clone();
            softmax_group(&mut got, len, inner, &mut vec![0.0; inner]);
            let err = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 1e-6, "len {len} inner {inner}: {err}");
        }
    }

    #[test]
    fn the_rewritten_graph_gives_tracts_softmax() -> TractResult<()> {
        for (shape, axis) in [
            (vec![2usize, 3, 7, 50], 2usize),
            (vec![4, 7], 1),
            (vec![5, 9, 2], 0),
        ] {
            let mut model = TypedModel::default();
            let x = model.add_source("x", f32::fact(&shape))?;
            let y = model.wire_node(
                "softmax",
                Softmax {
                    axes: tvec!(axis),
                    quant_output_dt: None,
                    kind: SoftmaxKind::Softmax,
                },
                &[x],
            )?;
            model.select_output_outlets(&y)?;
            let n: usize = shape.iter().product();
            let input = Tensor::from_shape(
                &shape,
                &(0..n)
                    .map(|i| ((i * 31 % 97) as f32 - 48.0) * 0.1)
                    .collect::<Vec<_>>(),
            )?;
            let want = model
                .clone()
                .into_runnable()?
                .run(tvec!(input.clone().into()))?;
            let mut ours = model.clone();
            assert_eq!(rewrite_softmax(&mut ours)?, 1);
            let got = ours.into_runnable()?.run(tvec!(input.into()))?;
            let (a, b) = (f32_slice(&got[0]), f32_slice(&want[0]));
            assert_eq!(a.len(), n);
            let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(err < 1e-6, "{shape:?} axis {axis}: {err}");
        }
        Ok(())
    }
}
