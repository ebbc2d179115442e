//! Quantized 2-D convolution as a matmul whose rows are image patches, gathered while packing
//! (no im2col buffer): [`Im2Col`] is the row source, [`QConvOp`] the tract op.
#![deny(unsafe_code)]

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::Cost;

use super::op::{activations, output_fact, output_tensor, with_output};
use super::{qmatmul, Activations, Dequantize, Layout, PackedB, Quantize, Requant, RowSource};
use crate::model::ops::gemm::transpose_strided;

/// Geometry of a 2-D convolution on one CHW image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConvGeometry {
    /// Input channels, height, width.
    pub input: [usize; 3],
    /// Kernel height and width.
    pub kernel: [usize; 2],
    /// Strides (y, x).
    pub strides: [usize; 2],
    /// Dilations (y, x).
    pub dilations: [usize; 2],
    /// Zero padding before (top, left); the bottom/right padding follows from `output`.
    pub pad_before: [usize; 2],
    /// Output height and width.
    pub output: [usize; 2],
}

impl ConvGeometry {
    /// Values of one patch: channels × kernel height × kernel width.
    pub fn depth(&self) -> usize {
        self.input[0] * self.kernel[0] * self.kernel[1]
    }

    /// Output pixels.
    pub fn pixels(&self) -> usize {
        self.output[0] * self.output[1]
    }
}

/// One image, quantized, in pixel-major (HWC) order with its zero padding written out: every
/// patch reads `kernel height × kernel width` runs of `channels` contiguous bytes, with no
/// bounds checks (the CHW layout the graph holds would make each value of a patch a read from
/// another cache line: the default model's 3×3 neck convolution gathered at ~80 GMAC/s).
#[derive(Debug, Clone)]
pub struct PaddedImage {
    /// Rows × columns × channels, row-major.
    data: Vec<i8>,
    /// Columns, padding included.
    width: usize,
    /// The convolution it is laid out for.
    geometry: ConvGeometry,
}

impl PaddedImage {
    /// Lay out a CHW image (`geometry.input`) for `geometry`'s patches, quantizing on the way.
    pub fn new(image: Activations<'_>, geometry: ConvGeometry) -> PaddedImage {
        let [c, h, w] = geometry.input;
        // Far enough right and down for the last patch, and never less than the image.
        let reach = |axis: usize, size: usize| {
            let last = (geometry.output[axis].max(1) - 1) * geometry.strides[axis]
                + (geometry.kernel[axis].max(1) - 1) * geometry.dilations[axis]
                + 1;
            last.max(size + geometry.pad_before[axis])
        };
        let (height, width) = (reach(0, h), reach(1, w));
        // Quantize the planes in one vectorised pass, then transpose in tiles: a value at a time
        // (`Quantize::apply` per element) took 13 ms for the neck's 256 × 64 × 64.
        let quantized: std::borrow::Cow<'_, [i8]> = match image {
            Activations::I8(v) => v.into(),
            Activations::F32(v, q) => {
                let mut buf = vec![0i8; v.len()];
                q.slice(v, &mut buf);
                buf.into()
            }
        };
        let mut data = vec![0i8; height * width * c];
        let [top, left] = geometry.pad_before;
        for y in 0..h {
            // Image row y of every plane (c runs of w, a plane apart) as w pixels of c values.
            let row = &mut data[((y + top) * width + left) * c..][..w * c];
            transpose_strided(&quantized, (c, w), h * w, y * w, row);
        }
        PaddedImage {
            data,
            width,
            geometry,
        }
    }
}

/// The patches of a [`PaddedImage`] as the rows of a matrix: row = output pixel (y-major),
/// columns = (ky, kx, channel), so a kernel's OIHW weights are reordered to (ky, kx, channel)
/// rows when packed (see [`patch_order`]).
#[derive(Debug, Clone, Copy)]
pub struct Im2Col<'a> {
    /// The image, laid out for `geometry`.
    pub image: &'a PaddedImage,
}

/// Row `kk` of the packed kernel in [`Im2Col`]'s (ky, kx, channel) order is row
/// `patch_order(geometry, kk)` of the OIHW kernel's (channel, ky, kx) order.
pub fn patch_order(geometry: &ConvGeometry, kk: usize) -> usize {
    let c = geometry.input[0];
    let taps = geometry.kernel[0] * geometry.kernel[1];
    let (tap, ch) = (kk / c, kk % c);
    ch * taps + tap
}

impl RowSource for Im2Col<'_> {
    fn rows(&self) -> usize {
        self.image.geometry.pixels()
    }

    fn depth(&self) -> usize {
        self.image.geometry.depth()
    }

    fn fetch(&self, row: usize, buf: &mut [i8]) {
        let image = self.image;
        let g = &image.geometry;
        let c = g.input[0];
        let (oy, ox) = (row / g.output[1], row % g.output[1]);
        let mut runs = buf.chunks_exact_mut(c);
        for ky in 0..g.kernel[0] {
            let y = oy * g.strides[0] + ky * g.dilations[0];
            for kx in 0..g.kernel[1] {
                let x = ox * g.strides[1] + kx * g.dilations[1];
                let at = (y * image.width + x) * c;
                if let Some(run) = runs.next() {
                    run.copy_from_slice(&image.data[at..at + c]);
                }
            }
        }
    }
}

/// A quantized NCHW convolution (one group) on our kernels: i8 in, i8 out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QConvOp {
    /// The kernel as a (C·KH·KW) × O matrix.
    pub b: Arc<PackedB>,
    /// Bias and scales per output channel.
    pub requant: Requant,
    /// Shapes.
    pub geometry: ConvGeometry,
    /// A fused `QuantizeLinear` before: the input is f32, quantized while gathering.
    pub input_quant: Option<Quantize>,
    /// A fused `DequantizeLinear` after: the output is f32.
    pub output_dequant: Option<Dequantize>,
}

impl super::Int8Op for QConvOp {
    fn packed(&self) -> &PackedB {
        &self.b
    }
    fn fused(&self) -> (Option<Quantize>, Option<Dequantize>) {
        (self.input_quant, self.output_dequant)
    }
    fn with_fused(&self, quant: Option<Quantize>, dequant: Option<Dequantize>) -> Box<dyn TypedOp> {
        Box::new(QConvOp {
            input_quant: quant,
            output_dequant: dequant,
            ..self.clone()
        })
    }
}

impl Op for QConvOp {
    fn name(&self) -> StaticName {
        "TinysamQConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "kernel {} {:?}",
            self.b.kernel().report_name(),
            self.geometry
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for QConvOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1, "TinysamQConv takes one input");
        let x = &inputs[0];
        let [c, h, w] = self.geometry.input;
        ensure!(
            x.rank() == 4 && x.shape()[1..] == [c, h, w],
            "input {:?} is not N×{c}×{h}×{w}",
            x.shape()
        );
        let image_len = c * h * w;
        let batch = x.shape()[0];
        let [oh, ow] = self.geometry.output;
        let o = self.b.n();
        let out_len = o * oh * ow;
        let x = activations(x, self.input_quant)?;
        let mut y = output_tensor(&[batch, o, oh, ow], self.output_dequant)?;
        with_output(&mut y, self.output_dequant, |mut out| {
            for i in 0..batch {
                let range = i * image_len..(i + 1) * image_len;
                // A fused quantization runs once per pixel, while laying the image out.
                let image = match x {
                    Activations::I8(v) => Activations::I8(&v[range]),
                    Activations::F32(v, q) => Activations::F32(&v[range], q),
                };
                let padded = PaddedImage::new(image, self.geometry);
                let patches = Im2Col { image: &padded };
                // NCHW output = pixels × channels, column-major.
                let range = i * out_len..(i + 1) * out_len;
                let out_i = match &mut out {
                    super::Output::I8(v) => super::Output::I8(&mut v[range]),
                    super::Output::F32(v, dq) => super::Output::F32(&mut v[range], *dq),
                    super::Output::Requantized(v, dq, q) => {
                        super::Output::Requantized(&mut v[range], *dq, *q)
                    }
                };
                qmatmul(&patches, &self.b, &self.requant, out_i, Layout::ColMajor)
                    .map_err(|e| format_err!("{e}"))?;
            }
            Ok(())
        })?;
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for QConvOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let batch = inputs[0].shape[0].clone();
        let [oh, ow] = self.geometry.output;
        let shape = [batch, self.b.n().to_dim(), oh.to_dim(), ow.to_dim()];
        Ok(tvec!(output_fact(&shape, self.output_dequant)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let macs = self.geometry.pixels() * self.geometry.depth() * self.b.n();
        Ok(tvec!((
            Cost::FMA(i32::datum_type()),
            inputs[0].shape[0].clone() * macs
        )))
    }

    as_op!();
}
