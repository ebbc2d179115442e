//! Quantized 2-D convolution as a matmul whose rows are image patches, gathered while packing
//! (no im2col buffer): [`Im2Col`] is the row source, [`QConvOp`] the tract op.
#![deny(unsafe_code)]

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::Cost;

use super::op::{activations, output_fact, output_tensor, with_output};
use super::{qmatmul, Activations, Dequantize, Layout, PackedB, Quantize, Requant, RowSource};

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

/// The patches of one CHW i8 image as the rows of a matrix: row = output pixel (y-major),
/// columns = (channel, ky, kx) like an OIHW kernel's I·H·W; outside the image reads 0 (the zero
/// point of our symmetric quantization).
#[derive(Debug, Clone, Copy)]
pub struct Im2Col<'a> {
    /// The image, C × H × W.
    pub image: Activations<'a>,
    /// Its convolution.
    pub geometry: ConvGeometry,
}

impl RowSource for Im2Col<'_> {
    fn rows(&self) -> usize {
        self.geometry.pixels()
    }

    fn depth(&self) -> usize {
        self.geometry.depth()
    }

    fn check(&self) -> Result<(), String> {
        let [c, h, w] = self.geometry.input;
        if self.image.len() == c * h * w {
            Ok(())
        } else {
            Err(format!(
                "image has {} values, expected {c}×{h}×{w}",
                self.image.len()
            ))
        }
    }

    fn fetch(&self, row: usize, buf: &mut [i8]) {
        let g = &self.geometry;
        let [c, h, w] = g.input;
        let [kh, kw] = g.kernel;
        let (oy, ox) = (row / g.output[1], row % g.output[1]);
        let y0 = (oy * g.strides[0]) as isize - g.pad_before[0] as isize;
        let x0 = (ox * g.strides[1]) as isize - g.pad_before[1] as isize;
        let mut i = 0;
        for ch in 0..c {
            let plane = ch * h * w;
            for ky in 0..kh {
                let y = y0 + (ky * g.dilations[0]) as isize;
                for kx in 0..kw {
                    let x = x0 + (kx * g.dilations[1]) as isize;
                    buf[i] = if y >= 0 && (y as usize) < h && x >= 0 && (x as usize) < w {
                        self.image.get(plane + y as usize * w + x as usize)
                    } else {
                        0
                    };
                    i += 1;
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
        // A fused quantization runs once over the image, not once per patch that reads a pixel.
        let quantized: Vec<i8>;
        let x = match x {
            Activations::F32(v, q) => {
                let mut buf = vec![0i8; v.len()];
                q.slice(v, &mut buf);
                quantized = buf;
                Activations::I8(&quantized)
            }
            i8s => i8s,
        };
        let mut y = output_tensor(&[batch, o, oh, ow], self.output_dequant)?;
        with_output(&mut y, self.output_dequant, |mut out| {
            for i in 0..batch {
                let image = match x {
                    Activations::I8(v) => Activations::I8(&v[i * image_len..(i + 1) * image_len]),
                    Activations::F32(v, q) => {
                        Activations::F32(&v[i * image_len..(i + 1) * image_len], q)
                    }
                };
                let patches = Im2Col {
                    image,
                    geometry: self.geometry,
                };
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
