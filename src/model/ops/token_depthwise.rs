//! Depthwise convolutions of token tensors, without the round trip through channel planes.
//!
//! Every TinyViT block of stages 1-3 ends its attention half with a 3×3 depthwise "local"
//! convolution of its tokens `[H·W, C]`. The graph turns the tokens into CHW planes (a
//! transpose), convolves the planes and turns them back (a second transpose): two
//! single-threaded passes over tensors of up to 8 MB each, which cost more than the
//! convolution itself (5.1 + 5.4 ms around a 1.6 ms convolution in a block of stage 1 on the
//! default model, 2 threads). tract's own channel-last depthwise path is slower still there
//! (8 ms: it walks the image once per block of 16 channels). [`TokenDepthwise`] convolves the
//! tokens where they are, one image row per step, all channels of a pixel as one vector, threads
//! over rows; [`rewrite_token_depthwise`] puts it in place of the transpose, convolution,
//! transpose chain.
//!
//! On x86_64 the arithmetic is tract's, bit for bit (INT8 graphs quantize what follows, and a
//! last-bit difference there changes later roundings): the bias, then each tap inside the image
//! added in row-major order as a product rounded on its own. On aarch64 tract's NEON kernels use
//! fused multiply-adds for their vector parts and plain ones for the scalar tails of its own
//! zones; ours fuses everywhere, which agrees within rounding (the tests state the bound).
#![allow(unsafe_code)]

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
use tract_onnx::tract_core::ops::nn::DataFormat;

use super::graph::{axis_op_chain, concrete_shape, indices_through, producer_before_axis_ops, Isa};

/// Taps of the 3×3 kernel.
const TAPS: usize = 9;

/// A 3×3 depthwise convolution (stride 1, one pixel of zero padding) of tokens `[H·W, C]`, to
/// tokens `[H·W, C]`.
#[derive(Debug, Clone)]
pub struct TokenDepthwise {
    /// Image height (`H·W` tokens).
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Channels per token.
    pub channels: usize,
    /// The kernel tap-major: tap `3·ky + kx` holds one weight per channel.
    pub taps: Arc<Vec<f32>>,
    /// One bias per channel.
    pub bias: Arc<Vec<f32>>,
    /// Which compiled form runs (the widest this CPU has; tests pick others).
    isa: Isa,
}

impl PartialEq for TokenDepthwise {
    fn eq(&self, other: &TokenDepthwise) -> bool {
        (self.height, self.width, self.channels, self.isa)
            == (other.height, other.width, other.channels, other.isa)
            && super::same_bits(&Some(self.taps.clone()), &Some(other.taps.clone()))
            && super::same_bits(&Some(self.bias.clone()), &Some(other.bias.clone()))
    }
}
impl Eq for TokenDepthwise {}

impl Op for TokenDepthwise {
    fn name(&self) -> StaticName {
        "TinysamTokenDepthwise".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "3×3 over {}×{} tokens of {} channels, kernel {}",
            self.height, self.width, self.channels, self.isa
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for TokenDepthwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1, "TinysamTokenDepthwise takes one input");
        let input = inputs[0].to_plain_array_view::<f32>()?;
        let input = input
            .as_slice()
            .context("TinysamTokenDepthwise needs contiguous tokens")?;
        let mut out = Tensor::zero::<f32>(&[self.height * self.width, self.channels])?;
        {
            let mut view = out.try_as_plain_ram_mut()?;
            self.run(self.isa, input, view.as_slice_mut::<f32>()?)?;
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for TokenDepthwise {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let tokens = self.height * self.width;
        ensure!(
            inputs[0].datum_type == f32::datum_type()
                && inputs[0].shape.as_concrete() == Some(&[tokens, self.channels][..]),
            "TinysamTokenDepthwise takes f32 tokens [{tokens}, {}], got {:?}",
            self.channels,
            inputs[0]
        );
        Ok(tvec!(f32::fact([tokens, self.channels])))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let macs = self.height * self.width * self.channels * TAPS;
        Ok(tvec!((Cost::FMA(f32::datum_type()), macs.into())))
    }

    as_op!();
}

impl TokenDepthwise {
    /// The convolution with `taps` (tap-major) and `bias`, on this CPU's widest form.
    pub fn new(
        (height, width, channels): (usize, usize, usize),
        taps: Vec<f32>,
        bias: Vec<f32>,
    ) -> TractResult<TokenDepthwise> {
        ensure!(
            taps.len() == TAPS * channels && bias.len() == channels,
            "a 3×3 depthwise kernel of {channels} channels needs {} taps and {channels} \
             biases, got {} and {}",
            TAPS * channels,
            taps.len(),
            bias.len()
        );
        Ok(TokenDepthwise {
            height,
            width,
            channels,
            taps: Arc::new(taps),
            bias: Arc::new(bias),
            isa: Isa::detect(),
        })
    }

    /// The kernel's name in reports (`tinysam info`).
    pub fn kernel_name(&self) -> String {
        format!("tinysam_token_depthwise_{}", self.isa)
    }

    /// Convolve `input` into `out` (both `H·W × C` values) with the form `isa`, threaded over
    /// image rows on tract's executor.
    pub(crate) fn run(&self, isa: Isa, input: &[f32], out: &mut [f32]) -> TractResult<()> {
        let (h, w, c) = (self.height, self.width, self.channels);
        let len = h * w * c;
        ensure!(
            input.len() == len && out.len() == len,
            "{h}×{w} tokens of {c} channels are {len} values, got {} in and {} out",
            input.len(),
            out.len()
        );
        if len == 0 {
            return Ok(());
        }
        let image = Image {
            input,
            height: h,
            width: w,
            channels: c,
            taps: &self.taps,
            bias: &self.bias,
        };
        tract_linalg::multithread::par_chunks_mut(out, w * c, len * TAPS, |first, rows| {
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Isa::Avx512` is only chosen where the CPU has AVX-512F.
                Isa::Avx512 => unsafe { rows_avx512(&image, first, rows) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `Isa::Avx2` is only chosen where the CPU has AVX2.
                Isa::Avx2 => unsafe { rows_avx2(&image, first, rows) },
                _ => convolve_rows(&image, first, rows),
            }
            Ok(())
        })
    }
}

/// The operands of one convolution, shared by the threads.
struct Image<'a> {
    input: &'a [f32],
    height: usize,
    width: usize,
    channels: usize,
    taps: &'a [f32],
    bias: &'a [f32],
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512(image: &Image<'_>, first_row: usize, out: &mut [f32]) {
    convolve_rows(image, first_row, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rows_avx2(image: &Image<'_>, first_row: usize, out: &mut [f32]) {
    convolve_rows(image, first_row, out)
}

/// Output rows `first_row ..` (as many as `out` holds, whole rows of `W·C` values).
#[inline(always)]
fn convolve_rows(image: &Image<'_>, first_row: usize, out: &mut [f32]) {
    let (h, w, c) = (image.height, image.width, image.channels);
    for (i, row) in out.chunks_exact_mut(w * c).enumerate() {
        let y = first_row + i;
        for (x, acc) in row.chunks_exact_mut(c).enumerate() {
            acc.copy_from_slice(image.bias);
            for ky in 0..3 {
                let Some(yy) = (y + ky).checked_sub(1).filter(|&r| r < h) else {
                    continue;
                };
                for kx in 0..3 {
                    let Some(xx) = (x + kx).checked_sub(1).filter(|&r| r < w) else {
                        continue;
                    };
                    let pixel = &image.input[(yy * w + xx) * c..(yy * w + xx + 1) * c];
                    let tap = &image.taps[(3 * ky + kx) * c..(3 * ky + kx + 1) * c];
                    // x86_64: as tract, the product rounded, then added. aarch64: fused
                    // multiply-adds (tract's NEON kernels fuse too, but split rows and channels
                    // into vector and scalar parts by its own zones: within rounding of ours).
                    for ((a, &v), &k) in acc.iter_mut().zip(pixel).zip(tap) {
                        *a = if cfg!(target_arch = "aarch64") {
                            v.mul_add(k, *a)
                        } else {
                            *a + k * v
                        };
                    }
                }
            }
        }
    }
}

/// What replaces one convolution chain: its token input, the last node of its output chain,
/// and the op.
struct Plan {
    tokens: OutletId,
    end: OutletId,
    op: TokenDepthwise,
}

/// Replace every 3×3 depthwise convolution that reads tokens `[H·W, C]` through a transpose to
/// planes, and whose planes go back to tokens the same way, by [`TokenDepthwise`]; returns how
/// many. A convolution that does not fit is left as it is (the reason is logged).
pub fn rewrite_token_depthwise(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let Some(node) = model.nodes().get(id) else {
            continue;
        };
        if !node.op_is::<Conv>() {
            continue;
        }
        let name = node.name.clone();
        let plan = match plan(model, id)? {
            Ok(Some(plan)) => plan,
            Ok(None) => continue,
            Err(why) => {
                log::debug!("depthwise convolution at {name} left to tract: {why}");
                continue;
            }
        };
        let mut patch = TypedModelPatch::new(format!("token depthwise at {name}"));
        let tokens = patch.tap_model(model, plan.tokens)?;
        let out = patch.wire_node(format!("{name}.tokens"), plan.op, &[tokens])?[0];
        patch.shunt_outside(model, plan.end, out)?;
        patch.apply(model)?;
        replaced += 1;
    }
    model.compact()?;
    Ok(replaced)
}

/// The plan for the convolution node `id`: `Ok(None)` if it is not a float depthwise
/// convolution of one image in planes, `Ok(Err(why))` if it is but its input or output is not
/// a token tensor moved by axis ops alone.
fn plan(model: &TypedModel, id: usize) -> TractResult<Result<Option<Plan>, String>> {
    let node = model.node(id);
    let Some(conv) = node.op_as::<Conv>() else {
        return Ok(Ok(None));
    };
    let spec = &conv.pool_spec;
    let c = spec.input_channels;
    let ones = |v: &Option<TVec<usize>>| v.as_ref().is_none_or(|v| v.iter().all(|&x| x == 1));
    if conv.q_params.is_some()
        || node.inputs.len() != 3
        || conv.group < 2
        || conv.group != c
        || spec.output_channels != c
        || !matches!(spec.data_format, DataFormat::CHW | DataFormat::NCHW)
        || model.outlet_fact(node.inputs[0])?.datum_type != f32::datum_type()
    {
        return Ok(Ok(None));
    }
    let Some(in_shape) = concrete_shape(model, node.inputs[0])? else {
        return Ok(Err("input shape is not concrete".into()));
    };
    let Some(out_shape) = concrete_shape(model, OutletId::new(id, 0))? else {
        return Ok(Err("output shape is not concrete".into()));
    };
    // One image: [C, H, W] or [1, C, H, W].
    let planes = |shape: &[usize]| match shape {
        [cc, h, w] | [1, cc, h, w] if *cc == c => Some((*h, *w)),
        _ => None,
    };
    let (Some((h, w)), Some(out_hw)) = (planes(&in_shape), planes(&out_shape)) else {
        return Ok(Err(format!(
            "shapes {in_shape:?} -> {out_shape:?} are not one image of {c} channels"
        )));
    };
    need!(
        out_hw == (h, w),
        "the convolution changes the image size ({h}x{w} -> {out_hw:?})"
    );
    need!(
        spec.kernel_shape.as_slice() == [3, 3]
            && ones(&spec.strides)
            && ones(&spec.dilations)
            && (matches!(&spec.padding, PaddingSpec::Explicit(b, a) if b.as_slice() == [1, 1] && a.as_slice() == [1, 1])
                || matches!(
                    spec.padding,
                    PaddingSpec::SameUpper | PaddingSpec::SameLower
                )),
        "not a 3×3 kernel at stride 1 with one pixel of padding ({spec:?})"
    );
    let (Some(kernel), Some(bias)) = (
        model.outlet_fact(node.inputs[1])?.konst.clone(),
        model.outlet_fact(node.inputs[2])?.konst.clone(),
    ) else {
        return Ok(Err("its kernel or bias is not a constant".into()));
    };
    need!(
        conv.kernel_fmt == KernelFormat::OIHW
            && kernel.shape() == [c, 1, 3, 3]
            && kernel.datum_type() == f32::datum_type()
            && bias.datum_type() == f32::datum_type()
            && bias.len() == c,
        "kernel {:?} ({:?}) or bias {:?} do not fit {c} channels",
        kernel.shape(),
        conv.kernel_fmt,
        bias.shape()
    );
    let kernel = kernel.to_plain_array_view::<f32>()?;
    let kernel = kernel.as_slice().context("contiguous kernel")?;
    // OIHW [C, 1, 3, 3] to tap-major [9][C].
    let taps: Vec<f32> = (0..TAPS * c)
        .map(|at| kernel[(at % c) * TAPS + at / c])
        .collect();
    let bias = bias
        .cast_to::<f32>()?
        .to_plain_array_view::<f32>()?
        .iter()
        .copied()
        .collect();
    let l = h * w;
    // Input: tokens [L, C] through axis ops only, landing each token's channel c at plane c.
    let (source, chain) = producer_before_axis_ops(model, node.inputs[0]);
    need!(!chain.is_empty(), "its input is not moved from tokens");
    let tokens = model.node(chain[0]).inputs[0];
    need!(
        source == tokens.node && concrete_shape(model, tokens)?.as_deref() == Some(&[l, c][..]),
        "its input does not come from tokens [{l}, {c}]"
    );
    let to_planes: Vec<i32> = (0..c * l)
        .map(|at| i32::try_from((at % l) * c + at / l))
        .collect::<Result<_, _>>()
        .map_err(|e| format_err!("{e}"))?;
    need!(
        indices_through(model, &chain, &[l, c])?.as_deref() == Some(&to_planes[..]),
        "the axis ops before it are not a transpose of tokens to planes"
    );
    // Output: planes back to tokens [L, C] through axis ops only.
    let (out_chain, end) = axis_op_chain(model, id);
    let end = OutletId::new(end, 0);
    need!(
        concrete_shape(model, end)?.as_deref() == Some(&[l, c][..]),
        "its output does not end as tokens [{l}, {c}]"
    );
    let to_tokens: Vec<i32> = (0..l * c)
        .map(|at| i32::try_from((at % c) * l + at / c))
        .collect::<Result<_, _>>()
        .map_err(|e| format_err!("{e}"))?;
    need!(
        indices_through(model, &out_chain, &out_shape)?.as_deref() == Some(&to_tokens[..]),
        "the axis ops after it are not a transpose of planes to tokens"
    );
    Ok(Ok(Some(Plan {
        tokens,
        end,
        op: TokenDepthwise::new((h, w, c), taps, bias)?,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::{
        decluttered_encoder, fixture_dir, max_difference, pattern_input, run_first_output,
    };
    use crate::model::Precision;

    /// A graph `[L, C]` tokens → transpose → planes `[1, C, H, W]` → depthwise 3×3 → transpose
    /// back to tokens, as TinyViT's blocks have it, with non-square sizes.
    fn token_conv_graph(h: usize, w: usize, c: usize) -> TractResult<TypedModel> {
        use crate::model::test_support::pattern_tensor;
        use tract_onnx::tract_core::ops::cnn::{KernelFormat, PaddingSpec, PoolSpec};
        let l = h * w;
        let mut model = TypedModel::default();
        let x = model.add_source("tokens", f32::fact([l, c]))?;
        let t = model.wire_node("to_planes", AxisOp::Move(0, 1), &[x])?[0];
        let t = model.wire_node(
            "planes",
            AxisOp::Reshape(1, tvec![l.into()], tvec![h.into(), w.into()]),
            &[t],
        )?[0];
        let t = model.wire_node("batch", AxisOp::Add(0), &[t])?[0];
        let kernel = model.add_const("kernel", pattern_tensor(&[c, 1, 3, 3], 3, 0.7))?;
        let bias = model.add_const("bias", pattern_tensor(&[c], 4, 0.2))?;
        let conv = Conv {
            pool_spec: PoolSpec {
                data_format: DataFormat::NCHW,
                kernel_shape: tvec![3, 3],
                padding: PaddingSpec::Explicit(tvec![1, 1], tvec![1, 1]),
                dilations: None,
                strides: None,
                input_channels: c,
                output_channels: c,
            },
            kernel_fmt: KernelFormat::OIHW,
            group: c,
            q_params: None,
        };
        let t = model.wire_node("conv", conv, &[t, kernel, bias])?[0];
        let t = model.wire_node("unbatch", AxisOp::Rm(0), &[t])?[0];
        let t = model.wire_node(
            "flat",
            AxisOp::Reshape(1, tvec![h.into(), w.into()], tvec![l.into()]),
            &[t],
        )?[0];
        let t = model.wire_node("to_tokens", AxisOp::Move(1, 0), &[t])?[0];
        model.select_output_outlets(&[t])?;
        Ok(model)
    }

    /// `graph` with its one convolution rewritten, and the op that took its place.
    fn rewritten(graph: &TypedModel) -> TractResult<(TypedModel, TokenDepthwise)> {
        let mut ours = graph.clone();
        ensure!(rewrite_token_depthwise(&mut ours)? == 1, "not rewritten");
        let op = ours
            .nodes()
            .iter()
            .find_map(|n| n.op_as::<TokenDepthwise>())
            .context("the op")?
            .clone();
        Ok((ours, op))
    }

    #[test]
    fn tokens_convolve_with_tracts_values() -> TractResult<()> {
        let isas = Isa::runnable();
        // Channels that fill no vector evenly, one-pixel images and rows.
        for (h, w, c) in [
            (5, 7, 16),
            (3, 2, 5),
            (9, 9, 40),
            (1, 1, 3),
            (1, 6, 17),
            (4, 1, 33),
            (3, 4, 64),
        ] {
            let graph = token_conv_graph(h, w, c)?;
            let (ours, op) = rewritten(&graph).with_context(|| format!("{h}x{w}x{c}"))?;
            assert!(!ours
                .nodes()
                .iter()
                .any(|n| n.op_is::<AxisOp>() || n.op_is::<Conv>()));
            let input = crate::model::test_support::pattern_tensor(&[h * w, c], 7, 2.0);
            let want = run_first_output(graph, &input)?;
            // Bit for bit on x86_64; within rounding on aarch64 (see the module docs).
            let agree = |got: &[f32], what: &str| {
                if cfg!(target_arch = "x86_64") {
                    assert_eq!(got, &want[..], "{what} {h}x{w}x{c}");
                } else {
                    let (err, scale) = max_difference(got, &want);
                    assert!(
                        err <= 1e-6 * scale.max(1.0),
                        "{what} {h}x{w}x{c}: {err} of {scale}"
                    );
                }
            };
            agree(&run_first_output(ours, &input)?, "graph");
            for &isa in &isas {
                let mut got = vec![f32::NAN; want.len()];
                op.run(isa, crate::model::decoder::f32_slice(&input), &mut got)?;
                agree(&got, &isa.to_string());
            }
            let mut short = vec![0f32; want.len() - 1];
            let data = crate::model::decoder::f32_slice(&input);
            assert!(op.run(Isa::Portable, data, &mut short).is_err());
            assert!(op
                .run(Isa::Portable, &data[1..], &mut vec![0f32; want.len()])
                .is_err());
        }
        Ok(())
    }

    /// The op on the default model's largest sizes (stage 1: 128² tokens of 128 channels; stage
    /// 3: 64² of 320) with each form, on one thread and on two:
    /// `cargo test --release --lib token_depthwise_speed -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn token_depthwise_speed() -> TractResult<()> {
        for (side, c) in [(128, 128), (64, 320)] {
            let (_, op) = rewritten(&token_conv_graph(side, side, c)?)?;
            let input = crate::model::test_support::pattern_values(side * side * c, 7, 2.0);
            let mut out = vec![0f32; input.len()];
            for isa in Isa::runnable() {
                for threads in [1, 2] {
                    let executor = tract_linalg::multithread::Executor::multithread(threads);
                    let mut best = f64::MAX;
                    tract_linalg::multithread::multithread_tract_scope(executor, || {
                        for _ in 0..10 {
                            let t = std::time::Instant::now();
                            op.run(isa, &input, &mut out)?;
                            best = best.min(t.elapsed().as_secs_f64() * 1e3);
                        }
                        TractResult::Ok(())
                    })?;
                    eprintln!("{side}² tokens × {c}, {isa}, {threads} thread(s): {best:.2} ms");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_convolution_of_planes_that_are_not_tokens_is_left_alone() -> TractResult<()> {
        // The tokens are read channel-major (no transpose before the planes): not this pattern.
        let (h, w, c) = (4, 4, 8);
        let mut graph = token_conv_graph(h, w, c)?;
        let first = graph
            .nodes()
            .iter()
            .find(|n| n.name == "to_planes")
            .map(|n| n.id)
            .context("node")?;
        graph.nodes_mut()[first].op = Box::new(AxisOp::Reshape(
            0,
            tvec![(h * w).into(), c.into()],
            tvec![c.into(), (h * w).into()],
        ));
        assert_eq!(rewrite_token_depthwise(&mut graph)?, 0);
        Ok(())
    }

    /// The fixture's encoders: every block's local convolution is rewritten and the embedding
    /// stays the same, bit for bit on x86_64.
    #[test]
    fn the_fixture_encoders_keep_their_embeddings() -> TractResult<()> {
        for precision in [Precision::Fp32, Precision::Int8] {
            let (graph, s) = decluttered_encoder(&fixture_dir(), precision);
            let mut ours = graph.clone();
            let replaced = rewrite_token_depthwise(&mut ours)?;
            let blocks = graph
                .nodes()
                .iter()
                .filter(|n| n.name.contains("local_conv") && n.op_is::<Conv>())
                .count();
            assert!(blocks > 0);
            assert_eq!(replaced, blocks, "{precision}");
            let input = pattern_input(s);
            let (err, scale) = max_difference(
                &run_first_output(ours, &input)?,
                &run_first_output(graph, &input)?,
            );
            eprintln!("fixture {precision} encoder, token depthwise: {err:e} of {scale}");
            // Bit for bit on x86_64; on aarch64 by rounding (and the int8 steps it may flip).
            let bound = if cfg!(target_arch = "x86_64") {
                0.0
            } else {
                1e-3 * scale
            };
            assert!(
                err <= bound,
                "{precision}: the embedding moved by {err} of {scale}"
            );
        }
        Ok(())
    }

    /// The shipped model's INT8 encoder at 1024²: all ten local convolutions, and the same
    /// embedding bit for bit. Only on x86_64 (under qemu the encoder takes minutes).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_default_int8_encoder_keeps_its_embedding() -> TractResult<()> {
        crate::model::test_support::assert_default_int8_encoder_unchanged(
            rewrite_token_depthwise,
            10,
        )
    }
}
