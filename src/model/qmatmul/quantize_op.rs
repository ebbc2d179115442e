//! [`QuantizeOp`]: tract's `QuantizeLinearI8` on f32 input, vectorised and on tract's threads,
//! for the quantizations [`super::fuse_quantization`] cannot fold into a product (one feeding
//! an axis move before the neck's first convolution, or a depthwise convolution's input).
//!
//! tract rounds each value with a software round-to-even, one value at a time on one thread:
//! 10.5 ms for the neck's 1.3 M values on one x86 thread (`tinysam bench --profile`).
#![deny(unsafe_code)]

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::quant::QuantizeLinearI8;

use super::Quantize;

/// f32 → i8 as tract's `QuantizeLinearI8` computes it ([`Quantize::apply`]: scale, round to
/// nearest even, zero point, saturate; NaN gives the zero point), same shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuantizeOp {
    /// The quantization.
    pub quant: Quantize,
}

impl Op for QuantizeOp {
    fn name(&self) -> StaticName {
        "TinysamQuantize".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "× {} + {}, to i8",
            self.quant.scale, self.quant.zero_point
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for QuantizeOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1, "TinysamQuantize takes one input");
        let input = &inputs[0];
        let view = input.try_as_plain_ram()?;
        let values = view.as_slice::<f32>()?;
        let mut out = Tensor::zero::<i8>(input.shape())?;
        {
            let mut out_view = out.try_as_plain_ram_mut()?;
            let dst = out_view.as_slice_mut::<i8>()?;
            let total = dst.len();
            // Rows of 16 K values: enough work per task, any length (the last row is short).
            let row = 16384.min(total.max(1));
            let whole = total - total % row;
            let (dst_whole, dst_rest) = dst.split_at_mut(whole);
            let (src_whole, src_rest) = values.split_at(whole);
            let quant = self.quant;
            tract_linalg::multithread::par_chunks_mut(dst_whole, row, total, |first, chunk| {
                let start = first * row;
                let src = src_whole
                    .get(start..start + chunk.len())
                    .context("TinysamQuantize: a task past the input")?;
                quant.slice(src, chunk);
                Ok(())
            })?;
            quant.slice(src_rest, dst_rest);
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for QuantizeOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs[0].datum_type == f32::datum_type(),
            "TinysamQuantize is f32 only"
        );
        Ok(tvec!(i8::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// Replace every `QuantizeLinearI8` of `model` that takes f32 and gives plain i8 by
/// [`QuantizeOp`]; returns how many.
pub fn rewrite_quantize(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(q) = node
            .op_as::<ElementWiseOp>()
            .and_then(|e| e.0.downcast_ref::<QuantizeLinearI8>())
        else {
            continue;
        };
        if model.outlet_fact(node.inputs[0])?.datum_type != f32::datum_type()
            || node.outputs[0].fact.datum_type != i8::datum_type()
        {
            continue;
        }
        let op = QuantizeOp {
            quant: Quantize {
                scale: q.scale,
                zero_point: i32::from(q.zero_point),
            },
        };
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs, op)?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A graph of one `QuantizeLinearI8` on `[len]` f32 values.
    fn quantize_model(len: usize, scale: f32, zero_point: i8) -> TractResult<TypedModel> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([len]))?;
        let q = model.wire_node(
            "q",
            ElementWiseOp(
                Box::new(QuantizeLinearI8 { scale, zero_point }),
                Some(i8::datum_type()),
            ),
            &[x],
        )?;
        model.select_output_outlets(&q)?;
        Ok(model)
    }

    fn i8_output(model: TypedModel, input: &[f32]) -> TractResult<Vec<i8>> {
        let out = model
            .into_optimized()?
            .into_runnable()?
            .run(tvec!(tensor1(input).into()))?;
        Ok(out[0].try_as_plain_ram()?.as_slice::<i8>()?.to_vec())
    }

    #[test]
    fn equals_tracts_quantize_on_any_length_and_odd_values() -> TractResult<()> {
        for len in [1usize, 7, 16384, 16385, 40_000] {
            let mut xs: Vec<f32> = (0..len).map(|i| (i % 977) as f32 * 0.37 - 180.0).collect();
            // Ties (both ways), values past the range, and a NaN.
            for (at, v) in [2.5, -2.5, 3.5, 1e6, -1e6, f32::NAN]
                .into_iter()
                .enumerate()
            {
                if let Some(x) = xs.get_mut(at) {
                    *x = v;
                }
            }
            for (scale, zp) in [(1.0, 0), (0.71, 3), (20.0, -5)] {
                let model = quantize_model(len, scale, zp)?;
                let want = i8_output(model.clone(), &xs)?;
                let mut ours = model;
                assert_eq!(rewrite_quantize(&mut ours)?, 1);
                assert_eq!(
                    ours.nodes()
                        .iter()
                        .filter(|n| n.op_is::<QuantizeOp>())
                        .count(),
                    1
                );
                assert_eq!(
                    i8_output(ours, &xs)?,
                    want,
                    "len {len}, scale {scale}, zp {zp}"
                );
            }
        }
        Ok(())
    }

    /// Past i32's range tract's sum with a negative zero point wraps (−2·10¹⁰ → i32::MIN, − 5
    /// → +2³¹ − 5 → 127); ours saturates, as the products' fused quantization does.
    #[test]
    fn values_past_i32_saturate_to_their_side() -> TractResult<()> {
        let xs = [-1e9f32, 1e9, -3e38, 3e38];
        let mut ours = quantize_model(xs.len(), 20.0, -5)?;
        assert_eq!(rewrite_quantize(&mut ours)?, 1);
        assert_eq!(i8_output(ours, &xs)?, [-128, 127, -128, 127]);
        Ok(())
    }
}
