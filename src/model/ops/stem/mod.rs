//! [`Stem`]: TinyViT's patch embedding — a 3×3 stride-2 convolution, GELU, and a second 3×3
//! stride-2 convolution, 1024² × 3 → 256² × 64 — as one op.
//!
//! tract 0.23.9 runs the two convolutions with its direct (non-product) convolution, on one
//! thread, with the 32-channel 512² intermediate (32 MB) written and read in between: about
//! 80–100 ms of an INT8 frame on 2 threads of an AVX-512 host for 1.4 GMAC
//! (`benches/encoder-profile-results.md`). Here a task walks a band of output rows; each
//! intermediate row is computed once into a ring of three, both convolutions are products on
//! our [`super::gemm`] kernels with patches as rows (see `kernel`), and bands go to tract's
//! threads.
//!
//! [`rewrite_stem`] finds the chain in a decluttered encoder after our GELU rewrite; a chain
//! that starts like one but differs is logged with the reason and left to tract.
#![allow(unsafe_code)]

mod kernel;

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::nn::DataFormat;

use super::gemm::PackedWeights;
#[cfg(target_arch = "x86_64")]
use super::gemm::{Avx2, Avx512};
use super::graph::{concrete_shape, next_op, replace_chains, Isa, Match, Replacement};
use super::w8a16::{W8A16Kernel, W8Weights};
use crate::model::qmatmul::GeluOp;
use kernel::{halved, Geometry, Scratch, Weights};

/// `[1, C_in, H, W]` image → `[1, C_out, H/4, W/4]`: conv 3×3 stride 2, bias, GELU, conv 3×3
/// stride 2, bias (both padded by one pixel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stem {
    geometry: Geometry,
    output_shape: TVec<usize>,
    weights: Arc<Weights>,
}

impl Stem {
    /// The kernel name reported in kernel tables, e.g. `tinysam_stem_avx512f`, or with integer
    /// products `tinysam_stem_avx512f_w8a16_vnni`.
    pub fn kernel_name(&self) -> String {
        match &self.weights.integer {
            Some((kernel, _)) => format!("tinysam_stem_{}_{}", Isa::detect(), kernel.name()),
            None => format!("tinysam_stem_{}", Isa::detect()),
        }
    }

    /// Multiply-adds per image.
    pub fn macs(&self) -> usize {
        let (first, second) = self.macs_by_convolution();
        first + second
    }

    /// Multiply-adds per image of the first and of the second convolution.
    fn macs_by_convolution(&self) -> (usize, usize) {
        let (w, g) = (&self.weights, &self.geometry);
        let (mh, mw) = g.middle();
        let (oh, ow) = g.output();
        (
            mh * mw * w.first.k() * w.first.n(),
            oh * ow * w.second.k() * w.second.n(),
        )
    }

    fn band(&self, isa: Isa, input: &[f32], first_row: usize, rows: &mut [Vec<&mut [f32]>]) {
        let (w, g) = (&*self.weights, &self.geometry);
        let mut scratch = Scratch::new(w, g);
        let scratch = &mut scratch;
        #[cfg(target_arch = "x86_64")]
        match isa {
            Isa::Avx512 => {
                if let Some(m) = Avx512::detect() {
                    // SAFETY: `Isa::detect` found AVX-512F and FMA on this CPU.
                    return unsafe {
                        kernel::band_avx512(m, w, g, input, first_row, rows, scratch)
                    };
                }
            }
            Isa::Avx2 => {
                if let Some(m) = Avx2::detect() {
                    // SAFETY: `Isa::detect` found AVX2 and FMA on this CPU.
                    return unsafe { kernel::band_avx2(m, w, g, input, first_row, rows, scratch) };
                }
            }
            Isa::Portable => {}
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = isa;
        kernel::band_portable(w, g, input, first_row, rows, scratch)
    }

    /// The stem on `input` (`C_in × H × W`) with the kernels of `isa`, into `output` (CHW
    /// planes), rows spread over tract's threads.
    fn run(&self, isa: Isa, input: &[f32], output: &mut [f32]) -> TractResult<()> {
        let (w, g) = (&*self.weights, &self.geometry);
        let (oh, ow) = g.output();
        ensure!(
            input.len() == w.inputs() * g.height * g.width && output.len() == w.outputs() * oh * ow,
            "TinysamStem: {} input and {} output values for a {}×{} image of {} channels → {}",
            input.len(),
            output.len(),
            g.height,
            g.width,
            w.inputs(),
            w.outputs()
        );
        // One unit per output row: its slice in each output plane.
        let mut units: Vec<Vec<&mut [f32]>> =
            (0..oh).map(|_| Vec::with_capacity(w.outputs())).collect();
        for (i, run) in output.chunks_exact_mut(ow).enumerate() {
            if let Some(unit) = units.get_mut(i % oh) {
                unit.push(run);
            }
        }
        tract_linalg::multithread::par_chunks_mut(&mut units, 1, self.macs(), |first, chunk| {
            self.band(isa, input, first, chunk);
            Ok(())
        })
    }
}

impl Op for Stem {
    fn name(&self) -> StaticName {
        "TinysamStem".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let (w, g) = (&self.weights, &self.geometry);
        let (oh, ow) = g.output();
        Ok(vec![format!(
            "{}×{}×{} → {} → {}×{}×{}, kernel {}, {}",
            w.inputs(),
            g.height,
            g.width,
            w.middle(),
            w.outputs(),
            oh,
            ow,
            Isa::detect(),
            match &w.integer {
                Some((kernel, _)) => format!("second product W8A16 on {}", kernel.name()),
                None => "f32 products".to_string(),
            }
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for Stem {
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

impl TypedOp for Stem {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs[0].datum_type == f32::datum_type(),
            "TinysamStem is f32 only"
        );
        Ok(tvec!(f32::fact(&*self.output_shape)))
    }

    fn cost(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        // A W8A16 product accumulates in i32.
        let (first, second) = self.macs_by_convolution();
        Ok(match self.weights.integer {
            Some(_) => tvec!(
                (Cost::FMA(f32::datum_type()), first.into()),
                (Cost::FMA(i32::datum_type()), second.into()),
            ),
            None => tvec!((Cost::FMA(f32::datum_type()), self.macs().into())),
        })
    }

    as_op!();
}

/// Replace the patch embedding (see the module docs) by [`Stem`]; returns how many (0 or 1 in
/// practice). Run after `qmatmul::rewrite_gelu`. With `integer`, the second convolution's
/// product runs as W8A16 on that kernel (see [`super::w8a16`]; the first stays f32);
/// without, in f32 as the graph has them.
pub fn rewrite_stem(model: &mut TypedModel, integer: Option<W8A16Kernel>) -> TractResult<usize> {
    let is_conv = |node: &TypedNode| node.op_is::<Conv>();
    replace_chains(
        model,
        ("patch embedding", "stem"),
        is_conv,
        |model: &TypedModel, first| plan(model, first, integer),
    )
}

/// A matched stem.
type Plan = Replacement<Stem>;

/// A float 3×3 stride-2 convolution padded by one pixel on `[1, C, H, W]`, group 1: its
/// OIHW kernel and its bias (one per output channel), or `None`.
fn strided_conv(
    model: &TypedModel,
    id: usize,
    (channels, height, width): (usize, usize, usize),
) -> TractResult<Option<(Arc<Tensor>, Vec<f32>)>> {
    let node = model.node(id);
    let Some(conv) = node.op_as::<Conv>() else {
        return Ok(None);
    };
    let spec = &conv.pool_spec;
    let padding = spec.computed_padding(&[height, width]);
    let plain = conv.q_params.is_none()
        && node.inputs.len() == 3
        && conv.group == 1
        && spec.input_channels == channels
        && spec.data_format == DataFormat::NCHW
        && conv.kernel_fmt == KernelFormat::OIHW
        && spec.kernel_shape.as_slice() == [3, 3]
        && spec.strides().iter().all(|&s| s == 2)
        && spec.dilations().iter().all(|&d| d == 1)
        && padding.len() == 2
        && padding.iter().all(|p| p.pad_before == 1)
        && (padding[0].convoluted, padding[1].convoluted) == (halved(height), halved(width));
    if !plain {
        return Ok(None);
    }
    let facts = model.node_input_facts(id)?;
    let (Some(kernel), Some(bias)) = (facts[1].konst.clone(), facts[2].konst.clone()) else {
        return Ok(None);
    };
    let o = spec.output_channels;
    if kernel.datum_type() != f32::datum_type()
        || kernel.shape() != [o, channels, 3, 3]
        || bias.datum_type() != f32::datum_type()
        || !(bias.len() == o || bias.len() == 1)
    {
        return Ok(None);
    }
    let view = bias.try_as_plain_ram()?;
    let b = view.as_slice::<f32>()?;
    Ok(Some((
        kernel,
        (0..o).map(|c| b[c.min(b.len() - 1)]).collect(),
    )))
}

/// Match the stem starting at the convolution `first`: `Ok(None)` if `first` does not start
/// one, `Err(reason)` if it starts like one but differs.
fn plan(
    model: &TypedModel,
    first: usize,
    integer: Option<W8A16Kernel>,
) -> TractResult<Match<Stem>> {
    let input = model.node(first).inputs[0];
    let Some(&[1, cin, height, width]) = concrete_shape(model, input)?.as_deref() else {
        return Ok(Ok(None));
    };
    let Some((first_k, first_bias)) = strided_conv(model, first, (cin, height, width))? else {
        return Ok(Ok(None));
    };
    let Some(gelu) = next_op::<GeluOp>(model, first) else {
        return Ok(Ok(None));
    };
    let cmid = first_k.shape()[0];
    let (mh, mw) = (halved(height), halved(width));
    let Some(second) = next_op::<Conv>(model, gelu) else {
        return Ok(Ok(None));
    };
    let Some((second_k, second_bias)) = strided_conv(model, second, (cmid, mh, mw))? else {
        return Ok(Err(
            "the convolution after the GELU is not a float 3×3 stride-2 one".into(),
        ));
    };
    let cout = second_k.shape()[0];
    let output = OutletId::new(second, 0);
    let output_shape = concrete_shape(model, output)?.unwrap_or_default();
    need!(
        output_shape == [1, cout, halved(mh), halved(mw)],
        "stem output is {output_shape:?}"
    );
    // First: OIHW rows are already the (channel, ky, kx) patch order. Second: patch order
    // (ky, kx, channel).
    let first_view = first_k.try_as_plain_ram()?;
    let k0 = first_view.as_slice::<f32>()?;
    let first_rows: Vec<f32> = (0..cin * 9 * cmid)
        .map(|at| k0[(at % cmid) * cin * 9 + at / cmid])
        .collect();
    let second_view = second_k.try_as_plain_ram()?;
    let k1 = second_view.as_slice::<f32>()?;
    let second_rows: Vec<f32> = (0..9 * cmid * cout)
        .map(|at| {
            let (row, o) = (at / cout, at % cout);
            let (tap, c) = (row / cmid, row % cmid);
            k1[(o * cmid + c) * 9 + tap]
        })
        .collect();
    let (Some(first_w), Some(second_w)) = (
        PackedWeights::pack(&first_rows, cin * 9, cmid),
        PackedWeights::pack(&second_rows, 9 * cmid, cout),
    ) else {
        return Ok(Err("stem weights do not pack".into()));
    };
    Ok(Ok(Some(Plan {
        inputs: vec![input],
        output,
        op: Stem {
            geometry: Geometry { height, width },
            output_shape: output_shape.into(),
            weights: Arc::new(Weights {
                first: first_w,
                first_bias,
                second: second_w,
                second_bias,
                integer: integer.and_then(|kernel| {
                    W8Weights::quantize(&second_rows, 9 * cmid, cout).map(|w| (kernel, w))
                }),
            }),
        },
    })))
}

#[cfg(test)]
mod tests;
