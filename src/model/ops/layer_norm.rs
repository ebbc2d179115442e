//! [`LayerNormOp`]: LayerNorm over the last axis in one threaded pass per row.
//!
//! tract declutters ONNX's `LayerNormalization` into six nodes: `Reduce<Sum>`, a `Mul` by 1/C
//! (the mean), a `Sub`, its own `RmsNorm`, a `Mul` by γ and an `Add` of β: five passes over the
//! tensor, most of them single-threaded. TinySAM's encoder has 20 of them over tensors of up
//! to 9 MB. [`rewrite_layer_norm`] finds the chain and
//! replaces it. The arithmetic is the chain's own, bit for bit (INT8 graphs quantize the result,
//! and a last-bit difference there changes later roundings): the row sum and the RMS
//! normalisation by tract-linalg's own routines, the mean as the sum times the graph's 1/C, then
//! γ and β as two separate roundings.
#![deny(unsafe_code)]

use std::sync::Arc;

use tract_linalg::routines::Func;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::math::{Add, Mul, Sub};

use super::graph::{axis_vector, const_operand, sole_consumer};
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer, RmsNorm};

/// `(x - mean) / sqrt(var + eps) · γ + β` over the last axis (`γ`, `β` one per element of it,
/// or absent).
#[derive(Debug, Clone)]
pub struct LayerNormOp {
    /// Added to the variance.
    pub eps: f32,
    /// The graph's 1/C, which multiplies the sum into the mean.
    pub recip: f32,
    /// Scale per element of the axis.
    pub gamma: Option<Arc<Vec<f32>>>,
    /// Shift per element of the axis.
    pub beta: Option<Arc<Vec<f32>>>,
}

impl PartialEq for LayerNormOp {
    fn eq(&self, other: &LayerNormOp) -> bool {
        self.eps.to_bits() == other.eps.to_bits()
            && self.recip.to_bits() == other.recip.to_bits()
            && super::same_bits(&self.gamma, &other.gamma)
            && super::same_bits(&self.beta, &other.beta)
    }
}
impl Eq for LayerNormOp {}

impl Op for LayerNormOp {
    fn name(&self) -> StaticName {
        "TinysamLayerNorm".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "eps {}{}{}",
            self.eps,
            if self.gamma.is_some() { ", γ" } else { "" },
            if self.beta.is_some() { ", β" } else { "" }
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for LayerNormOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1, "TinysamLayerNorm takes one input");
        let mut t = inputs
            .into_iter()
            .next()
            .context("one input")?
            .into_tensor();
        let c = t.shape().last().copied().unwrap_or(0);
        self.check_parameters(c)?;
        if c == 0 {
            return Ok(tvec!(t.into_tvalue()));
        }
        {
            let mut view = t.try_as_plain_ram_mut()?;
            let data = view.as_slice_mut::<f32>()?;
            let total = data.len();
            // As tract's Reduce<Sum>: its kernel from 4 values, a plain sum below.
            tract_linalg::multithread::par_chunks_mut(data, c, total, |_, rows| {
                self.normalise_rows(rows, c)
            })?;
        }
        Ok(tvec!(t.into_tvalue()))
    }
}

impl LayerNormOp {
    /// γ and β (where present) hold one value per element of the `c` normalised.
    fn check_parameters(&self, c: usize) -> TractResult<()> {
        for v in [&self.gamma, &self.beta].into_iter().flatten() {
            ensure!(
                v.len() == c,
                "LayerNorm over {c} values with {} parameters",
                v.len()
            );
        }
        Ok(())
    }

    /// Whether its mean factor is 1/`c` (to f32 rounding): it normalises rows of `c` values.
    pub(crate) fn averages_over(&self, c: usize) -> bool {
        c > 0 && (self.recip - 1.0 / c as f32).abs() <= f32::EPSILON / c as f32
    }

    /// Normalise `rows`, rows of `c` values, in place on this thread, exactly as the op does
    /// (for fused ops that end in this LayerNorm).
    pub(crate) fn normalise_rows(&self, rows: &mut [f32], c: usize) -> TractResult<()> {
        if c == 0 {
            return Ok(());
        }
        let sum = Func::ReduceSum.reduce_f32()?;
        let rms_norm = tract_linalg::routines::rms_norm_f32()?;
        for row in rows.chunks_exact_mut(c) {
            let total = if c >= 4 {
                sum.run_with_params(row, ())?
            } else {
                row.iter().sum()
            };
            self.row(row, total, rms_norm);
        }
        Ok(())
    }

    /// A normaliser of single rows of `c` values, exactly as [`Self::normalise_rows`], with
    /// tract's routines looked up once (for products that normalise their input rows as they
    /// pack them).
    pub(crate) fn row_normaliser(&self, c: usize) -> TractResult<RowNormaliser<'_>> {
        Ok(RowNormaliser {
            op: self,
            c,
            sum: Func::ReduceSum.reduce_f32()?,
            rms_norm: tract_linalg::routines::rms_norm_f32()?,
        })
    }

    /// Normalise one row in place, given its sum and the RMS normalisation routine.
    fn row(&self, row: &mut [f32], sum: f32, rms_norm: fn(&mut [f32], f32)) {
        let mean = sum * self.recip;
        for x in row.iter_mut() {
            *x -= mean;
        }
        rms_norm(row, self.eps);
        if let Some(g) = &self.gamma {
            for (x, &g) in row.iter_mut().zip(g.iter()) {
                *x *= g;
            }
        }
        if let Some(b) = &self.beta {
            for (x, &b) in row.iter_mut().zip(b.iter()) {
                *x += b;
            }
        }
    }
}

/// See [`LayerNormOp::row_normaliser`].
pub(crate) struct RowNormaliser<'a> {
    op: &'a LayerNormOp,
    c: usize,
    sum: Box<dyn tract_linalg::reduce::Reduce<f32>>,
    rms_norm: fn(&mut [f32], f32),
}

impl RowNormaliser<'_> {
    /// Normalise `row` (`c` values) in place.
    pub(crate) fn normalise(&self, row: &mut [f32]) -> TractResult<()> {
        ensure!(
            row.len() == self.c,
            "a row of {} values for a LayerNorm over {}",
            row.len(),
            self.c
        );
        let total = if self.c >= 4 {
            self.sum.run_with_params(row, ())?
        } else {
            row.iter().sum()
        };
        self.op.row(row, total, self.rms_norm);
        Ok(())
    }
}

impl TypedOp for LayerNormOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs[0].datum_type == f32::datum_type(),
            "TinysamLayerNorm is f32 only"
        );
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// Replace every `Reduce<Sum> → Mul(1/C) → Sub → RmsNorm → Mul(γ)? → Add(β)?` chain over the
/// last axis of an f32 tensor by [`LayerNormOp`]; returns how many.
pub fn rewrite_layer_norm(model: &mut TypedModel) -> TractResult<usize> {
    replace_chains(model, 0, "layer_norm", |norm| Box::new(norm))
}

/// Replace each LayerNorm chain over the axis `trailing + 1` from the end (see [`plan`]) by the
/// op `wrap` makes of its parameters, named after the chain's `RmsNorm` and `suffix`; a chain
/// over the channels (`trailing > 0`) must be over axis 1. Returns how many.
fn replace_chains(
    model: &mut TypedModel,
    trailing: usize,
    suffix: &str,
    wrap: impl Fn(LayerNormOp) -> Box<dyn TypedOp>,
) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(rms) = node.op_as::<RmsNorm>() else {
            continue;
        };
        if trailing > 0 && rms.axis != 1 {
            continue;
        }
        let Some((x, last, norm)) = plan(model, node, rms, trailing)? else {
            continue;
        };
        let mut patch = TypedModelPatch::new(format!("{suffix} at {}", node.name));
        let tap = patch.tap_model(model, x)?;
        let out = patch.wire_node(format!("{}.{suffix}", node.name), wrap(norm), &[tap])?[0];
        patch.shunt_outside(model, last, out)?;
        patch.apply(model)?;
        replaced += 1;
    }
    model.compact()?;
    Ok(replaced)
}

/// (input, last outlet of the chain, op) for the chain around `rms_node`.
///
/// The chain normalises the axis `trailing + 1` from the end: 0 for rows (the last axis), 2 for
/// the channels of an NCHW map.
fn plan(
    model: &TypedModel,
    rms_node: &TypedNode,
    rms: &RmsNorm,
    trailing: usize,
) -> TractResult<Option<(OutletId, OutletId, LayerNormOp)>> {
    let d_fact = model.outlet_fact(rms_node.inputs[0])?;
    let rank = d_fact.rank();
    if d_fact.datum_type != f32::datum_type() || rms.axis + 1 + trailing != rank {
        return Ok(None);
    }
    let axis = rms.axis;
    let Some(c) = d_fact.shape[axis].to_usize().ok() else {
        return Ok(None);
    };
    // d = Sub(x, mean), mean = Mul(Reduce<Sum>(x), 1/c)
    let sub = model.node(rms_node.inputs[0].node);
    if !sub
        .op_as::<TypedBinOp>()
        .is_some_and(|b| b.0.is::<Sub>() && b.1.is_none())
        || sub.inputs.len() != 2
        || sub.outputs[0].successors.len() != 1
    {
        return Ok(None);
    }
    let (x, mean_outlet) = (sub.inputs[0], sub.inputs[1]);
    let mean = model.node(mean_outlet.node);
    let Some((recip, sum_outlet)) = const_operand::<Mul>(model, mean)? else {
        return Ok(None);
    };
    let recip = match recip.cast_to_scalar::<f32>() {
        Ok(r) if recip.len() == 1 => r,
        _ => return Ok(None),
    };
    let recip_ok = (recip * c as f32 - 1.0).abs() < 1e-6;
    let sum = model.node(sum_outlet.node);
    let sum_ok = sum
        .op_as::<Reduce>()
        .is_some_and(|r| r.reducer == Reducer::Sum && r.axes.as_slice() == [axis])
        && sum.inputs.first() == Some(&x);
    // The mean and the sum feed only this chain.
    if !recip_ok
        || !sum_ok
        || mean.outputs[0].successors.len() != 1
        || sum.outputs[0].successors.len() != 1
    {
        return Ok(None);
    }
    let eps = rms.eps.cast_to_scalar::<f32>()?;
    let mut op = LayerNormOp {
        eps,
        recip,
        gamma: None,
        beta: None,
    };
    let mut last = OutletId::new(rms_node.id, 0);
    if let Some(next) = sole_consumer(model, last) {
        if let Some((g, _)) = const_operand::<Mul>(model, model.node(next))? {
            if let Some(g) = axis_vector(&g, c, rank, trailing)? {
                op.gamma = Some(Arc::new(g));
                last = OutletId::new(next, 0);
            }
        }
    }
    if let Some(next) = sole_consumer(model, last) {
        if let Some((b, _)) = const_operand::<Add>(model, model.node(next))? {
            if let Some(b) = axis_vector(&b, c, rank, trailing)? {
                op.beta = Some(Arc::new(b));
                last = OutletId::new(next, 0);
            }
        }
    }
    Ok(Some((x, last, op)))
}

/// [`LayerNormOp`]'s normalisation over the channels of an `N × C × …` map (axis 1, every axis
/// after it one pixel): the neck's `LayerNorm2d`. tract runs that chain as five passes on one
/// thread; this op runs each block of pixels of every channel plane at once, threaded over the
/// blocks, with the arithmetic of tract's chain over a non-last axis: sums in channel order, the
/// mean of squares scaled by the output/input length ratio, `1 / sqrt(ms + eps)`, then γ and β
/// as two roundings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelLayerNormOp {
    /// ε, 1/C, γ and β, one per channel.
    pub norm: LayerNormOp,
}

/// Pixels of one task: 16 cache lines of each channel plane.
const PIXEL_BLOCK: usize = 256;

impl Op for ChannelLayerNormOp {
    fn name(&self) -> StaticName {
        "TinysamChannelLayerNorm".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let mut info = self.norm.info()?;
        info.push("over axis 1 (channels), threaded over pixel blocks".into());
        Ok(info)
    }

    op_as_typed_op!();
}

impl EvalOp for ChannelLayerNormOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1, "TinysamChannelLayerNorm takes one input");
        let mut t = inputs
            .into_iter()
            .next()
            .context("one input")?
            .into_tensor();
        ensure!(
            t.rank() >= 2,
            "a channel LayerNorm needs N × C × …, got {:?}",
            t.shape()
        );
        let c = t.shape()[1];
        let inner: usize = t.shape()[2..].iter().product();
        self.norm.check_parameters(c)?;
        if c == 0 || inner == 0 || t.len() == 0 {
            return Ok(tvec!(t.into_tvalue()));
        }
        // tract's mean of squares: the sum times output length / input length.
        let norm = (t.len() / c) as f32 / t.len() as f32;
        {
            let mut view = t.try_as_plain_ram_mut()?;
            let data = view.as_slice_mut::<f32>()?;
            // Every image's channel planes, cut into blocks of pixels: task b gets block b of
            // each plane of its image.
            let mut tasks: Vec<Vec<&mut [f32]>> = Vec::new();
            for image in data.chunks_exact_mut(c * inner) {
                let first = tasks.len();
                tasks.extend((0..inner.div_ceil(PIXEL_BLOCK)).map(|_| Vec::with_capacity(c)));
                for plane in image.chunks_exact_mut(inner) {
                    for (task, block) in
                        tasks[first..].iter_mut().zip(plane.chunks_mut(PIXEL_BLOCK))
                    {
                        task.push(block);
                    }
                }
            }
            let run = |planes: &mut Vec<&mut [f32]>| self.normalise_block(planes, norm);
            match tract_linalg::multithread::current_tract_executor() {
                tract_linalg::multithread::Executor::MultiThread(pool) if tasks.len() > 1 => {
                    use rayon::prelude::*;
                    pool.install(|| tasks.par_iter_mut().for_each(run));
                }
                _ => tasks.iter_mut().for_each(run),
            }
        }
        Ok(tvec!(t.into_tvalue()))
    }
}

impl ChannelLayerNormOp {
    /// Normalise one block of pixels, given as the same pixels of every channel plane in channel
    /// order; `norm` turns a sum of squares into their mean as tract does.
    fn normalise_block(&self, planes: &mut [&mut [f32]], norm: f32) {
        let Some(width) = planes.first().map(|p| p.len()) else {
            return;
        };
        let mut sum = [0f32; PIXEL_BLOCK];
        let sum = &mut sum[..width];
        for plane in planes.iter() {
            for (s, &x) in sum.iter_mut().zip(plane.iter()) {
                *s += x;
            }
        }
        let mut squares = [0f32; PIXEL_BLOCK];
        let squares = &mut squares[..width];
        for plane in planes.iter_mut() {
            for ((x, &s), q) in plane.iter_mut().zip(sum.iter()).zip(squares.iter_mut()) {
                *x -= s * self.norm.recip;
                *q += *x * *x;
            }
        }
        // 1 / sqrt(mean of squares + ε), per pixel.
        for q in squares.iter_mut() {
            *q = (*q * norm + self.norm.eps).sqrt().recip();
        }
        // Scaled, times γ, plus β: the roundings of tract's multiplies and add, in one pass
        // over each plane (an absent γ or β is skipped, not applied as 1 or 0: `-0 + 0` is `+0`).
        let (gamma, beta) = (self.norm.gamma.as_deref(), self.norm.beta.as_deref());
        for (ch, plane) in planes.iter_mut().enumerate() {
            let g = gamma.and_then(|g| g.get(ch)).copied();
            let b = beta.and_then(|b| b.get(ch)).copied();
            for (x, &r) in plane.iter_mut().zip(squares.iter()) {
                let mut y = *x * r;
                if let Some(g) = g {
                    y *= g;
                }
                if let Some(b) = b {
                    y += b;
                }
                *x = y;
            }
        }
    }
}

impl TypedOp for ChannelLayerNormOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs[0].datum_type == f32::datum_type() && inputs[0].rank() == 4,
            "TinysamChannelLayerNorm is f32 N × C × H × W only"
        );
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }

    as_op!();
}

/// Replace every `Reduce<Sum> → Mul(1/C) → Sub → RmsNorm → Mul(γ)? → Add(β)?` chain over axis 1
/// of an f32 `N × C × H × W` map by [`ChannelLayerNormOp`]; returns how many.
pub fn rewrite_channel_layer_norm(model: &mut TypedModel) -> TractResult<usize> {
    replace_chains(model, 2, "channel_layer_norm", |norm| {
        Box::new(ChannelLayerNormOp { norm })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::{
        decluttered_encoder, fixture_dir, max_difference, pattern_input, run_first_output,
    };
    use crate::model::Precision;

    /// The fixture's FP32 encoder with its LayerNorms on our op against the same graph with
    /// tract's chains: equal to the bit.
    #[test]
    fn fused_layer_norms_keep_the_fixture_encoders_output() -> TractResult<()> {
        let (tract_chains, s) = decluttered_encoder(&fixture_dir(), Precision::Fp32);
        let mut ours = tract_chains.clone();
        let n = rewrite_layer_norm(&mut ours)?;
        assert!(n >= 20, "only {n} LayerNorms replaced");
        let input = pattern_input(s);
        let (err, scale) = max_difference(
            &run_first_output(ours, &input)?,
            &run_first_output(tract_chains, &input)?,
        );
        eprintln!(
            "fixture FP32 encoder: {n} LayerNorms fused, largest difference {err:e} of {scale}"
        );
        assert_eq!(err, 0.0, "{err} of {scale}");
        Ok(())
    }

    /// The fixture's encoders (FP32 and INT8) with the neck's channel LayerNorms on our op
    /// against the same graphs with tract's chains.
    #[test]
    fn channel_layer_norms_keep_the_fixture_encoders_output() -> TractResult<()> {
        for precision in [Precision::Fp32, Precision::Int8] {
            let (tract_chains, s) = decluttered_encoder(&fixture_dir(), precision);
            let mut ours = tract_chains.clone();
            let n = rewrite_channel_layer_norm(&mut ours)?;
            assert_eq!(
                n, 2,
                "{precision:?}: {n} channel LayerNorms replaced, the neck has 2"
            );
            let input = pattern_input(s);
            let (err, scale) = max_difference(
                &run_first_output(ours, &input)?,
                &run_first_output(tract_chains, &input)?,
            );
            eprintln!("fixture {precision:?} encoder: largest difference {err:e} of {scale}");
            assert_eq!(err, 0.0, "{precision:?}: {err} of {scale}");
        }
        Ok(())
    }

    /// Odd shapes (a block wider than the map, a last block that is partial, two images) against
    /// the definition, and threaded equal to single-threaded to the bit.
    #[test]
    fn channels_normalise_like_the_definition() -> TractResult<()> {
        use crate::model::test_support::pattern_tensor;
        for shape in [[1, 5, 3, 7], [2, 3, 17, 19], [1, 1, 2, 2]] {
            let c = shape[1];
            let op = ChannelLayerNormOp {
                norm: LayerNormOp {
                    eps: 1e-6,
                    recip: 1.0 / c as f32,
                    gamma: Some(Arc::new((0..c).map(|i| 0.5 + i as f32).collect())),
                    beta: Some(Arc::new((0..c).map(|i| i as f32 * 0.1 - 0.2).collect())),
                },
            };
            let x = pattern_tensor(&shape, 3, 4.0);
            let run = |threads: usize| -> TractResult<Vec<f32>> {
                let executor = if threads > 1 {
                    tract_linalg::multithread::Executor::multithread(threads)
                } else {
                    tract_linalg::multithread::Executor::SingleThread
                };
                tract_linalg::multithread::multithread_tract_scope(executor, || {
                    let y = op.eval(&EvalContext::out_of_plan(), tvec!(x.clone().into_tvalue()))?;
                    Ok(y[0].try_as_plain_ram()?.as_slice::<f32>()?.to_vec())
                })
            };
            let (one, two) = (run(1)?, run(2)?);
            assert_eq!(one, two, "{shape:?}: threaded differs");
            let xs = x.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
            let inner = shape[2] * shape[3];
            for (i, &got) in one.iter().enumerate() {
                let (image, ch, pixel) = (i / (c * inner), i / inner % c, i % inner);
                let lane = |k: usize| f64::from(xs[(image * c + k) * inner + pixel]);
                let mean = (0..c).map(lane).sum::<f64>() / c as f64;
                let var = (0..c).map(|k| (lane(k) - mean).powi(2)).sum::<f64>() / c as f64;
                let want = (lane(ch) - mean) / (var + 1e-6).sqrt() * (0.5 + ch as f64)
                    + (ch as f64 * 0.1 - 0.2);
                assert!(
                    (f64::from(got) - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "{shape:?} [{i}]: {got} vs {want}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn a_row_normalises_like_the_definition() {
        let op = LayerNormOp {
            eps: 1e-5,
            recip: 1.0 / 9.0,
            gamma: Some(Arc::new(vec![1.0, 2.0, 0.5, -1.0, 1.0, 1.0, 1.0, 1.0, 3.0])),
            beta: Some(Arc::new(vec![0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])),
        };
        let x = [1.0f32, -2.0, 3.5, 0.25, 8.0, -1.0, 0.0, 2.0, 5.0];
        let mut row = x;
        let rms_norm = tract_linalg::routines::rms_norm_f32().expect("rms_norm routine");
        op.row(&mut row, x.iter().sum(), rms_norm);
        let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / 9.0;
        let var = x
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / 9.0;
        for i in 0..9 {
            let g = op.gamma.as_ref().map_or(1.0, |g| g[i]);
            let b = op.beta.as_ref().map_or(0.0, |b| b[i]);
            let want = (f64::from(x[i]) - mean) / (var + 1e-5).sqrt() * f64::from(g) + f64::from(b);
            assert!(
                (f64::from(row[i]) - want).abs() < 1e-5,
                "{i}: {} vs {want}",
                row[i]
            );
        }
    }
}
