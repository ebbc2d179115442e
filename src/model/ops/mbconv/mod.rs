//! [`MbConv`]: TinyViT's convolutional blocks — the inverted residuals of stage 0 (MBConv) and
//! the patch merging that ends it — as one op that keeps the ×4-wide hidden maps in cache.
//!
//! Each is a 1×1 expansion, GELU, a 3×3 depthwise convolution (stride 1, or 2 when merging),
//! GELU and a 1×1 projection; MBConv then adds its input and applies GELU, patch merging hands
//! its result on as tokens. tract 0.23.9 runs the five to eight nodes one after the other on
//! the whole 256 × 256 image, each a pass over up to 64 MB (the hidden map), and repacks the
//! hidden map for the projection: about 145 ms per MBConv block on 2 threads of an AVX-512 host,
//! 70 % of the FLOPs' worth at our product kernel's rate (`benches/encoder-profile-results.md`).
//! Here a task takes a band of output rows and walks it top to bottom: each hidden row is
//! computed once (expansion on our [`super::gemm`] kernels, bias, GELU) into a ring of three,
//! each output row is the depthwise convolution of the ring, GELU, and the projection, finished
//! and written in place (see `kernel`). Bands go to tract's threads; a band recomputes the
//! hidden rows at its two edges.
//!
//! [`rewrite_mbconv`] finds the chains in a decluttered encoder after our GELU rewrite and
//! replaces them; chains that start like one but differ are logged with the reason and left
//! to tract.
#![allow(unsafe_code)]

mod kernel;

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::math::Add;

use super::gemm::PackedWeights;
#[cfg(target_arch = "x86_64")]
use super::gemm::{Avx2, Avx512};
use super::graph::{
    axis_bias_add_after, axis_op_chain, canonical, concrete_shape, indices_through, next_op,
    replace_chains, sole_consumer, Isa, Match, Replacement,
};
use super::w8a16::{ProductPair, W8A16Kernel};
use crate::model::qmatmul::GeluOp;
use kernel::{Geometry, Out, Scratch, Weights, TAPS};

/// What follows the projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Finish {
    /// MBConv: add the block's input, GELU; CHW planes out, shaped as the input.
    Residual,
    /// Patch merging: the projection plus bias as tokens, `[pixels, C_out]` pixel-major.
    Tokens,
}

/// `[1, C_in, H, W]` (or `[C_in, H, W]`) image → MBConv's output planes or patch merging's
/// tokens (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MbConv {
    geometry: Geometry,
    /// What the block ends with.
    pub finish: Finish,
    /// The shape of the output, as the graph it replaces had it.
    output_shape: TVec<usize>,
    weights: Arc<Weights>,
}

impl MbConv {
    /// The kernel name reported in kernel tables, e.g. `tinysam_mbconv_avx512f`, or with
    /// integer products `tinysam_mbconv_avx512f_w8a16_vnni`.
    pub fn kernel_name(&self) -> String {
        match &self.weights.integer {
            Some(int) => format!("tinysam_mbconv_{}_{}", Isa::detect(), int.kernel.name()),
            None => format!("tinysam_mbconv_{}", Isa::detect()),
        }
    }

    /// The kernel of its integer products, if they are integer.
    pub fn integer_kernel(&self) -> Option<W8A16Kernel> {
        self.weights.integer.as_ref().map(|int| int.kernel)
    }

    /// Multiply-adds per image.
    pub fn macs(&self) -> usize {
        let (products, depthwise) = self.macs_by_part();
        products + depthwise
    }

    /// Multiply-adds per image of the two 1×1 products and of the depthwise convolution.
    fn macs_by_part(&self) -> (usize, usize) {
        let w = &self.weights;
        let g = &self.geometry;
        let (oh, ow) = g.output();
        (
            g.height * g.width * w.inputs() * w.hidden() + oh * ow * w.hidden() * w.outputs(),
            oh * ow * w.hidden() * TAPS,
        )
    }

    fn band(&self, isa: Isa, input: &[f32], first_row: usize, out: Out<'_, '_>) {
        let (w, g) = (&*self.weights, &self.geometry);
        let mut scratch = Scratch::new(w, g);
        let scratch = &mut scratch;
        #[cfg(target_arch = "x86_64")]
        match isa {
            Isa::Avx512 => {
                if let Some(m) = Avx512::detect() {
                    // SAFETY: `Isa::detect` found AVX-512F and FMA on this CPU.
                    return unsafe { kernel::band_avx512(m, w, g, input, first_row, out, scratch) };
                }
            }
            Isa::Avx2 => {
                if let Some(m) = Avx2::detect() {
                    // SAFETY: `Isa::detect` found AVX2 and FMA on this CPU.
                    return unsafe { kernel::band_avx2(m, w, g, input, first_row, out, scratch) };
                }
            }
            Isa::Portable => {}
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = isa;
        kernel::band_portable(w, g, input, first_row, out, scratch)
    }

    /// The block on `input` (`C_in × H × W` values) with the kernels of `isa`, into `output`
    /// (`C_out × H × W` planes or `pixels × C_out` tokens), rows spread over tract's threads.
    fn run(&self, isa: Isa, input: &[f32], output: &mut [f32]) -> TractResult<()> {
        let (w, g) = (&*self.weights, &self.geometry);
        let (oh, ow) = g.output();
        let cout = w.outputs();
        ensure!(
            input.len() == w.inputs() * g.height * g.width && output.len() == cout * oh * ow,
            "TinysamMbConv: {} input and {} output values for {:?} and {} → {} → {} channels",
            input.len(),
            output.len(),
            g,
            w.inputs(),
            w.hidden(),
            cout
        );
        let work = self.macs();
        match self.finish {
            Finish::Residual => {
                // One unit per output row: its slice in each of the C_out planes.
                let mut units: Vec<Vec<&mut [f32]>> =
                    (0..oh).map(|_| Vec::with_capacity(cout)).collect();
                for (i, run) in output.chunks_exact_mut(ow).enumerate() {
                    if let Some(unit) = units.get_mut(i % oh) {
                        unit.push(run);
                    }
                }
                tract_linalg::multithread::par_chunks_mut(&mut units, 1, work, |first, chunk| {
                    self.band(isa, input, first, Out::Residual(chunk));
                    Ok(())
                })
            }
            Finish::Tokens => tract_linalg::multithread::par_chunks_mut(
                output,
                ow * cout,
                work,
                |first, chunk| {
                    self.band(isa, input, first, Out::Tokens(chunk));
                    Ok(())
                },
            ),
        }
    }
}

impl Op for MbConv {
    fn name(&self) -> StaticName {
        "TinysamMbConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let (w, g) = (&self.weights, &self.geometry);
        let products = match &w.integer {
            Some(int) => format!("W8A16 products on {}", int.kernel.name()),
            None => "f32 products".to_string(),
        };
        Ok(vec![format!(
            "{}×{} × {} → {} → {} channels, depthwise stride {}, {:?}, kernel {}, {products}",
            g.height,
            g.width,
            w.inputs(),
            w.hidden(),
            w.outputs(),
            g.stride,
            self.finish,
            Isa::detect()
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for MbConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let view = input.try_as_plain_ram()?;
        let values = view.as_slice::<f32>()?;
        // SAFETY: f32 has no invalid bit patterns, and `run` writes every output value (each
        // band covers its rows whole) before the tensor is read; on an error it is dropped.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&self.output_shape)? };
        {
            let mut out_view = out.try_as_plain_ram_mut()?;
            self.run(Isa::detect(), values, out_view.as_slice_mut::<f32>()?)?;
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for MbConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs[0].datum_type == f32::datum_type(),
            "TinysamMbConv is f32 only"
        );
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        // W8A16 products accumulate in i32; the depthwise convolution is f32 either way.
        let (products, depthwise) = self.macs_by_part();
        Ok(match self.weights.integer {
            Some(_) => tvec!(
                (Cost::FMA(i32::datum_type()), products.into()),
                (Cost::FMA(f32::datum_type()), depthwise.into()),
            ),
            None => tvec!((Cost::FMA(f32::datum_type()), self.macs().into())),
        })
    }

    as_op!();
}

/// Replace TinyViT's MBConv and patch-merging chains (see the module docs) by [`MbConv`];
/// returns how many. Run after `qmatmul::rewrite_gelu` (the chains' activations are our GELU).
/// With `integer`, the blocks' two 1×1 products run as W8A16 on that kernel (see
/// [`super::w8a16`]); without, in f32 as the graph has them.
pub fn rewrite_mbconv(model: &mut TypedModel, integer: Option<W8A16Kernel>) -> TractResult<usize> {
    let starts = |node: &TypedNode| node.op_as::<EinSum>().is_some_and(is_expansion);
    replace_chains(
        model,
        ("convolution block", "mbconv"),
        starts,
        |model: &TypedModel, first| plan(model, first, integer),
    )
}

// The 1×1 convolutions' einsum forms as tract declutters them, canonical (`graph::canonical`),
// with the layouts they imply. tract lays the hidden maps out channel-first on x86_64 and
// channel-last on aarch64 (where its depthwise convolution then runs HWC), so both occur.

/// An expansion form: whether its input is pixel-major (`HWI`, tokens: the patch merging after
/// stage 0) and whether its output, the hidden map, is channel-last (`HWO`).
const EXPAND: [(&str, bool, bool); 5] = [
    ("abcd,eb->ecd", false, false), // NIHW,OI->OHW (the batch of one dropped)
    ("abcd,eb->aecd", false, false), // NIHW,OI->NOHW
    ("abcd,eb->cde", false, true),  // NIHW,OI->HWO
    ("abc,dc->dab", true, false),   // HWI,OI->OHW
    ("abc,dc->abd", true, true),    // HWI,OI->HWO
];

/// A projection form: whether its input (the hidden map) is channel-last, and whether its
/// output is.
const PROJECT: [(&str, bool, bool); 7] = [
    ("abc,da->edbc", false, false),  // IHW,OI->NOHW
    ("abc,da->dbc", false, false),   // IHW,OI->OHW
    ("abcd,eb->aecd", false, false), // NIHW,OI->NOHW
    ("abcd,eb->ecd", false, false),  // NIHW,OI->OHW
    ("abc,dc->edab", true, false),   // HWI,OI->NOHW
    ("abc,dc->dab", true, false),    // HWI,OI->OHW
    ("abc,dc->abd", true, true),     // HWI,OI->HWO
];

/// The layouts of `e` if it has the form of one of `forms`.
fn form_of(e: &EinSum, forms: &[(&str, bool, bool)]) -> Option<(bool, bool)> {
    let form = canonical(&e.axes.to_string());
    forms
        .iter()
        .find(|(f, _, _)| *f == form)
        .map(|&(_, a, b)| (a, b))
}

/// Whether `e` has the form of a block's expansion product (any layout).
fn is_expansion(e: &EinSum) -> bool {
    form_of(e, &EXPAND).is_some()
}

/// The per-channel bias `Add` after `outlet`, for a map whose channels are its last axis
/// (`channel_last`, a `[…, n]` constant) or its third from last (`[…, n, 1, 1]`).
fn bias_after(
    model: &TypedModel,
    outlet: OutletId,
    n: usize,
    channel_last: bool,
) -> TractResult<Option<(usize, Vec<f32>)>> {
    axis_bias_add_after(model, outlet, n, if channel_last { 0 } else { 2 })
}

/// A matched block.
type Plan = Replacement<MbConv>;

/// A constant `O × I` matrix (the 1×1 kernel as tract keeps it) as the `I × O` right operand of
/// our products, row-major, and packed for the f32 ones.
fn pointwise_weights(
    t: &Tensor,
    o: usize,
    i: usize,
) -> TractResult<Option<(Vec<f32>, PackedWeights)>> {
    if t.datum_type() != f32::datum_type() || t.shape() != [o, i] {
        return Ok(None);
    }
    let view = t.try_as_plain_ram()?;
    let w = view.as_slice::<f32>()?;
    let transposed: Vec<f32> = (0..i * o).map(|at| w[(at % o) * i + at / o]).collect();
    Ok(PackedWeights::pack(&transposed, i, o).map(|packed| (transposed, packed)))
}

/// Match the block starting at the expansion product `first`: `Ok(None)` if `first` does not
/// start one, `Err(reason)` if it starts like one but differs.
fn plan(
    model: &TypedModel,
    first: usize,
    integer: Option<W8A16Kernel>,
) -> TractResult<Match<MbConv>> {
    let shape_of = |outlet: OutletId| concrete_shape(model, outlet);
    let start = model.node(first);
    let input = start.inputs[0];
    let (Some(expand_k), Some(in_shape)) = (
        model.outlet_fact(start.inputs[1])?.konst.clone(),
        shape_of(input)?,
    ) else {
        return Ok(Ok(None));
    };
    let Some((pixel_major, hidden_last)) =
        start.op_as::<EinSum>().and_then(|e| form_of(e, &EXPAND))
    else {
        return Ok(Ok(None));
    };
    let (cin, height, width) = match (pixel_major, in_shape.as_slice()) {
        (false, &[1, c, h, w] | &[c, h, w]) => (c, h, w),
        (true, &[h, w, c]) => (c, h, w),
        _ => return Ok(Ok(None)),
    };
    let hidden = match *expand_k.shape() {
        [o, i] if i == cin && o > 0 => o,
        _ => return Ok(Ok(None)),
    };
    // Expansion, its bias, GELU: anything else is another 1×1 convolution.
    let Some((expand_rows, expand)) = pointwise_weights(&expand_k, hidden, cin)? else {
        return Ok(Ok(None));
    };
    let Some((bias1_node, expand_bias)) =
        bias_after(model, OutletId::new(first, 0), hidden, hidden_last)?
    else {
        return Ok(Ok(None));
    };
    let Some(gelu1) = next_op::<GeluOp>(model, bias1_node) else {
        return Ok(Ok(None));
    };
    let Some(dw) = next_op::<Conv>(model, gelu1) else {
        return Ok(Ok(None));
    };
    let (geometry, depthwise, depthwise_bias) =
        match depthwise_of(model, dw, hidden, (height, width, pixel_major), hidden_last)? {
            Ok(found) => found,
            Err(why) => return Ok(Err(why)),
        };
    let (oh, ow) = geometry.output();
    let Some(gelu2) = next_op::<GeluOp>(model, dw) else {
        return Ok(Err("no GELU after the depthwise convolution".into()));
    };
    let Some(proj) = next_op::<EinSum>(model, gelu2) else {
        return Ok(Err("no product after the second GELU".into()));
    };
    let proj_node = model.node(proj);
    let proj_form = proj_node
        .op_as::<EinSum>()
        .and_then(|e| form_of(e, &PROJECT));
    let out_last = match proj_form {
        Some((from_last, out_last))
            if from_last == hidden_last && proj_node.inputs[0].node == gelu2 =>
        {
            out_last
        }
        _ => {
            let expr = proj_node
                .op_as::<EinSum>()
                .map(|e| canonical(&e.axes.to_string()));
            return Ok(Err(format!(
                "projection is {expr:?} after a {} hidden map",
                if hidden_last {
                    "channel-last"
                } else {
                    "channel-first"
                }
            )));
        }
    };
    let Some(project_k) = model.outlet_fact(proj_node.inputs[1])?.konst.clone() else {
        return Ok(Err("projection weight is not a constant".into()));
    };
    let cout = match *project_k.shape() {
        [o, i] if i == hidden && o > 0 => o,
        ref other => return Ok(Err(format!("projection weight is {other:?}"))),
    };
    let Some((project_rows, project)) = pointwise_weights(&project_k, cout, hidden)? else {
        return Ok(Err("projection weight is not f32".into()));
    };
    let Some((bias3_node, project_bias)) =
        bias_after(model, OutletId::new(proj, 0), cout, out_last)?
    else {
        return Ok(Err(format!("no bias of {cout} after the projection")));
    };
    let weights = Arc::new(Weights {
        expand,
        expand_bias,
        depthwise,
        depthwise_bias,
        project,
        project_bias,
        integer: integer.and_then(|kernel| {
            ProductPair::quantize(
                kernel,
                (&expand_rows, cin, hidden),
                (&project_rows, hidden, cout),
            )
        }),
    });

    // MBConv: the residual add of the block's input, then GELU.
    if let Some(add) = sole_consumer(model, OutletId::new(bias3_node, 0)) {
        let add_node = model.node(add);
        let is_residual = add_node
            .op_as::<TypedBinOp>()
            .is_some_and(|b| b.0.is::<Add>() && b.1.is_none())
            && add_node.inputs.len() == 2
            && add_node.inputs.contains(&input)
            && add_node.inputs.contains(&OutletId::new(bias3_node, 0));
        if is_residual {
            need!(
                geometry.stride == 1 && cout == cin && !pixel_major && !out_last,
                "residual around a block of stride {} from {cin} to {cout} channels{}",
                geometry.stride,
                if pixel_major { ", input tokens" } else { "" }
            );
            let Some(gelu3) = next_op::<GeluOp>(model, add) else {
                return Ok(Err("no GELU after the residual add".into()));
            };
            let output = OutletId::new(gelu3, 0);
            let output_shape = shape_of(output)?.unwrap_or_default();
            need!(
                output_shape == in_shape,
                "block output {output_shape:?} for input {in_shape:?}"
            );
            return Ok(Ok(Some(Plan {
                inputs: vec![input],
                output,
                op: MbConv {
                    geometry,
                    finish: Finish::Residual,
                    output_shape: output_shape.into(),
                    weights,
                },
            })));
        }
    }

    // Patch merging: the result moved to pixel-major tokens by the axis ops that follow.
    let (chain, _) = axis_op_chain(model, bias3_node);
    let mut taken = Vec::new();
    for id in chain {
        taken.push(id);
        let shape = shape_of(OutletId::new(id, 0))?.unwrap_or_default();
        if matches!(shape.as_slice(), [p, c] | [1, p, c] if *p == oh * ow && *c == cout) {
            let chw = [cout, oh, ow];
            need!(
                is_pixel_major(model, &taken, &chw, out_last)?,
                "the axis ops after the projection do not give pixel-major tokens"
            );
            return Ok(Ok(Some(Plan {
                inputs: vec![input],
                output: OutletId::new(id, 0),
                op: MbConv {
                    geometry,
                    finish: Finish::Tokens,
                    output_shape: shape.into(),
                    weights,
                },
            })));
        }
    }
    Ok(Err(
        "the projection is followed neither by a residual add nor by a move to tokens".into(),
    ))
}

/// The depthwise convolution at node `dw` on `channels × height × width` hidden maps (laid out
/// channel-last or not), the block's input pixel-major or not: its geometry, its kernel
/// tap-major and its bias, or why it is not one [`MbConv`] runs.
#[allow(clippy::type_complexity)]
fn depthwise_of(
    model: &TypedModel,
    dw: usize,
    channels: usize,
    (height, width, pixel_major_input): (usize, usize, bool),
    channel_last: bool,
) -> TractResult<Result<(Geometry, Vec<f32>, Vec<f32>), String>> {
    let node = model.node(dw);
    let conv = node.op_as::<Conv>().context("a Conv")?;
    let spec = &conv.pool_spec;
    need!(
        conv.q_params.is_none() && node.inputs.len() == 3,
        "depthwise convolution is quantized"
    );
    need!(
        conv.group == channels
            && spec.input_channels == channels
            && spec.output_channels == channels,
        "convolution after the expansion is not depthwise over {channels} channels"
    );
    need!(
        spec.data_format.c_is_last() == channel_last
            && conv.kernel_fmt == KernelFormat::OIHW
            && spec.kernel_shape.as_slice() == [3, 3],
        "depthwise convolution is not a 3×3 OIHW one in the hidden map's layout"
    );
    let strides = spec.strides();
    let stride = strides[0];
    need!(
        spec.dilations().iter().all(|&d| d == 1)
            && strides.len() == 2
            && strides[1] == stride
            && (stride == 1 || stride == 2),
        "depthwise strides {strides:?}, dilations {:?}",
        spec.dilations()
    );
    let geometry = Geometry {
        height,
        width,
        stride,
        pixel_major_input,
    };
    let padding = spec.computed_padding(&[height, width]);
    let (oh, ow) = geometry.output();
    need!(
        padding.len() == 2
            && padding.iter().all(|p| p.pad_before == 1)
            && (padding[0].convoluted, padding[1].convoluted) == (oh, ow),
        "depthwise padding is not one pixel on every side"
    );
    let facts = model.node_input_facts(dw)?;
    let (Some(kernel), Some(bias)) = (facts[1].konst.clone(), facts[2].konst.clone()) else {
        return Ok(Err("depthwise kernel or bias is not a constant".into()));
    };
    need!(
        kernel.datum_type() == f32::datum_type()
            && kernel.shape() == [channels, 1, 3, 3]
            && bias.datum_type() == f32::datum_type()
            && (bias.len() == channels || bias.len() == 1),
        "depthwise kernel {:?}, bias {:?}",
        kernel.shape(),
        bias.shape()
    );
    let k_view = kernel.try_as_plain_ram()?;
    let k = k_view.as_slice::<f32>()?;
    let taps: Vec<f32> = (0..TAPS * channels)
        .map(|at| k[(at % channels) * TAPS + at / channels])
        .collect();
    let b_view = bias.try_as_plain_ram()?;
    let b = b_view.as_slice::<f32>()?;
    let bias: Vec<f32> = (0..channels).map(|c| b[c.min(b.len() - 1)]).collect();
    Ok(Ok((geometry, taps, bias)))
}

/// Whether the axis ops `chain` move a `[C, H, W]` tensor (`[H, W, C]` if `channel_last`) to
/// `[H·W, C]` (or `[1, H·W, C]`) tokens, pixel `y·W + x`: checked by running them on the
/// indices.
fn is_pixel_major(
    model: &TypedModel,
    chain: &[usize],
    chw: &[usize; 3],
    channel_last: bool,
) -> TractResult<bool> {
    let [c, h, w] = *chw;
    // The chain starts from the projection's output, with or without the batch axis.
    let start = concrete_shape(model, model.node(chain[0]).inputs[0])?.unwrap_or_default();
    let Some(got) = indices_through(model, chain, &start)? else {
        return Ok(false);
    };
    if got.len() != c * h * w {
        return Ok(false);
    }
    Ok((0..h * w).all(|p| {
        (0..c).all(|ch| {
            let from = if channel_last {
                p * c + ch
            } else {
                ch * h * w + p
            };
            got.get(p * c + ch).and_then(|&v| usize::try_from(v).ok()) == Some(from)
        })
    }))
}

#[cfg(test)]
mod tests;
