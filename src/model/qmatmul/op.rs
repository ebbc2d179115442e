//! [`QMatMulOp`]: the tract op that runs [`super::qmatmul`] on one activation input against
//! weights packed at load time.
#![deny(unsafe_code)]

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::Cost;

use super::epilogue::{apply_rows, Epilogue};
use super::{
    qmatmul_then, Activations, Dequantize, Layout, MatrixA, Output, PackedB, Quantize, Requant,
    RowsFinish,
};
use crate::model::ops::LayerNormOp;

/// What [`QMatMulOp`] and [`QConvOp`](super::QConvOp) share: packed weights and the
/// quantization steps that can be folded into them.
pub trait Int8Op {
    /// The packed weights (their kernel, sizes).
    fn packed(&self) -> &PackedB;
    /// The fused input quantization and output dequantization.
    fn fused(&self) -> (Option<Quantize>, Option<Dequantize>);
    /// The same op with these fused steps.
    fn with_fused(&self, quant: Option<Quantize>, dequant: Option<Dequantize>) -> Box<dyn TypedOp>;
}

/// The node's op as one of ours, if it is.
pub fn as_int8_op(node: &TypedNode) -> Option<&dyn Int8Op> {
    node.op_as::<QMatMulOp>()
        .map(|op| op as &dyn Int8Op)
        .or_else(|| node.op_as::<super::QConvOp>().map(|op| op as &dyn Int8Op))
}

impl Int8Op for QMatMulOp {
    fn packed(&self) -> &PackedB {
        &self.b
    }
    fn fused(&self) -> (Option<Quantize>, Option<Dequantize>) {
        (self.input_quant, self.output_dequant)
    }
    fn with_fused(&self, quant: Option<Quantize>, dequant: Option<Dequantize>) -> Box<dyn TypedOp> {
        Box::new(QMatMulOp {
            input_quant: quant,
            output_dequant: dequant,
            ..self.clone()
        })
    }
}

/// Where an output axis takes its size from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutAxis {
    /// The same size as this axis of the activation input (an m axis).
    FromA(usize),
    /// A fixed size (n axes, and size-1 axes).
    Fixed(usize),
}

/// `y = requant(a · B)` with a constant, prepacked B: i8 activations in, i8 out.
///
/// The activation's axes are the m axes then the k axes ([`Layout::RowMajor`]) or the other way
/// round; the output's are m then n axes (or n then m), plus any size-1 axes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QMatMulOp {
    /// The packed weights (k × n).
    pub b: Arc<PackedB>,
    /// Bias and scales.
    pub requant: Requant,
    /// Memory order of the activation seen as an m × k matrix.
    pub a_layout: Layout,
    /// Memory order of the output seen as an m × n matrix.
    pub c_layout: Layout,
    /// Output shape, axis by axis.
    pub out_axes: Vec<OutAxis>,
    /// A fused `QuantizeLinear` before: the input is f32, quantized while packing.
    pub input_quant: Option<Quantize>,
    /// A fused `DequantizeLinear` after: the output is f32.
    pub output_dequant: Option<Dequantize>,
    /// Bias and activation applied to the f32 output (fused nodes after the dequantization).
    pub epilogue: Epilogue,
    /// The next product's input quantization, fused after the epilogue: the output is i8
    /// again, and the f32 results exist only a task's rows at a time (see
    /// [`chain_products`]).
    pub output_requant: Option<Quantize>,
    /// A LayerNorm before the fused input quantization: each row is normalised as it is
    /// packed, so the normalised tensor is never written (see [`fold_layer_norms`]).
    pub input_norm: Option<LayerNormOp>,
}

impl QMatMulOp {
    fn output_shape<D: DimLike>(&self, a_shape: &[D]) -> TractResult<TVec<D>> {
        self.out_axes
            .iter()
            .map(|ax| match *ax {
                OutAxis::FromA(i) => a_shape
                    .get(i)
                    .cloned()
                    .ok_or_else(|| format_err!("activation has no axis {i}")),
                OutAxis::Fixed(s) => Ok(D::from(s)),
            })
            .collect()
    }
}

impl Op for QMatMulOp {
    fn name(&self) -> StaticName {
        "TinysamQMatMul".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![
            format!(
                "kernel {} k={} n={} a {:?} c {:?}{}{}",
                self.b.kernel().report_name(),
                self.b.k(),
                self.b.n(),
                self.a_layout,
                self.c_layout,
                if self.input_quant.is_some() {
                    ", quantizes its f32 input"
                } else {
                    ""
                },
                if self.output_dequant.is_some() {
                    ", dequantizes to f32"
                } else {
                    ""
                },
            ) + match (self.epilogue.bias.is_some(), self.epilogue.gelu) {
                (true, true) => ", adds its bias, GELU",
                (true, false) => ", adds its bias",
                (false, true) => ", GELU",
                (false, false) => "",
            } + if self.output_requant.is_some() {
                ", quantizes for the next product"
            } else {
                ""
            } + if self.input_norm.is_some() {
                ", normalises its input rows (LayerNorm)"
            } else {
                ""
            },
        ])
    }

    op_as_typed_op!();
}

impl EvalOp for QMatMulOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1, "TinysamQMatMul takes one input");
        let input = &inputs[0];
        let k = self.b.k();
        let shape = self.output_shape(input.shape())?;
        let c = if let Some(norm) = &self.input_norm {
            // Rows normalised and quantized as they are packed.
            let quant = self
                .input_quant
                .context("a folded LayerNorm needs the fused input quantization")?;
            ensure!(
                self.a_layout == Layout::RowMajor,
                "a folded LayerNorm needs row-major activations"
            );
            let view = input.try_as_plain_ram()?;
            let data = view.as_slice::<f32>()?;
            ensure!(
                k > 0 && data.len() % k == 0,
                "activation of shape {:?} is not m × {k}",
                input.shape()
            );
            let source = NormalizedRows {
                data,
                k,
                normaliser: norm.row_normaliser(k)?,
                quant,
                failure: std::sync::Mutex::new(None),
            };
            let c = self.run(&source, &shape)?;
            if let Some(why) = source.failure.lock().ok().and_then(|mut f| f.take()) {
                bail!("folded LayerNorm: {why}");
            }
            c
        } else {
            let a = activations(input, self.input_quant)?;
            ensure!(
                k > 0 && a.len() % k == 0,
                "activation of shape {:?} is not m × {k}",
                input.shape()
            );
            let a = MatrixA {
                data: a,
                m: a.len() / k,
                layout: self.a_layout,
            };
            self.run(&a, &shape)?
        };
        Ok(tvec!(c.into_tvalue()))
    }
}

impl QMatMulOp {
    /// The product of the rows of `a` into a new output tensor of `shape`, in the output form
    /// the op's fused steps ask for, with its epilogue.
    fn run(&self, a: &impl super::RowSource, shape: &[usize]) -> TractResult<Tensor> {
        let n = self.b.n();
        let (bias, gelu) = (
            self.epilogue.bias.as_deref().map(Vec::as_slice),
            self.epilogue.gelu,
        );
        let finish = |rows: &mut [f32]| apply_rows(rows, n, bias, gelu);
        let rows_fit = self.c_layout == Layout::RowMajor && bias.is_none_or(|b| b.len() == n);
        if let (Some(q), Some(dq)) = (self.output_requant, self.output_dequant) {
            ensure!(
                rows_fit,
                "a requantized output needs a row-major output and a bias per column"
            );
            let mut c = output_tensor(shape, None)?;
            {
                let mut view = c.try_as_plain_ram_mut()?;
                let out = Output::Requantized(view.as_slice_mut::<i8>()?, dq, q);
                let finish: Option<RowsFinish<'_>> = if self.epilogue.is_empty() {
                    None
                } else {
                    Some(&finish)
                };
                qmatmul_then(a, &self.b, &self.requant, out, self.c_layout, finish)
                    .map_err(|e| format_err!("{e}"))?;
            }
            return Ok(c);
        }
        let mut c = output_tensor(shape, self.output_dequant)?;
        // The epilogue runs on each task's rows as they are finished (while in cache) when the
        // output is row-major f32, else in a pass of its own.
        let fused = !self.epilogue.is_empty() && self.output_dequant.is_some() && rows_fit;
        with_output(&mut c, self.output_dequant, |out| {
            let finish: Option<RowsFinish<'_>> = if fused { Some(&finish) } else { None };
            qmatmul_then(a, &self.b, &self.requant, out, self.c_layout, finish)
                .map_err(|e| format_err!("{e}"))
        })?;
        if !self.epilogue.is_empty() && !fused {
            let mut view = c.try_as_plain_ram_mut()?;
            self.epilogue.apply(view.as_slice_mut::<f32>()?, n)?;
        }
        Ok(c)
    }
}

/// Rows of f32 activations, each normalised by a LayerNorm and quantized as it is fetched.
struct NormalizedRows<'a> {
    data: &'a [f32],
    k: usize,
    normaliser: crate::model::ops::layer_norm::RowNormaliser<'a>,
    quant: Quantize,
    /// The first normalisation error (the kernels' fetch cannot return one).
    failure: std::sync::Mutex<Option<String>>,
}

thread_local! {
    /// One row on its way through the LayerNorm.
    static NORMALISED_ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl super::RowSource for NormalizedRows<'_> {
    fn rows(&self) -> usize {
        self.data.len() / self.k
    }
    fn depth(&self) -> usize {
        self.k
    }
    fn fetch(&self, row: usize, buf: &mut [i8]) {
        let k = self.k;
        NORMALISED_ROW.with_borrow_mut(|x| {
            x.clear();
            x.extend_from_slice(&self.data[row * k..(row + 1) * k]);
            match self.normaliser.normalise(x) {
                Ok(()) => self.quant.slice(x, &mut buf[..k]),
                Err(e) => {
                    buf[..k].fill(0);
                    if let Ok(mut failure) = self.failure.lock() {
                        failure.get_or_insert_with(|| e.to_string());
                    }
                }
            }
        });
    }
}

/// `t` as activations: i8, or f32 when a quantization is fused in.
pub(super) fn activations(t: &Tensor, quant: Option<Quantize>) -> TractResult<Activations<'_>> {
    let view = t.try_as_plain_ram()?;
    match quant {
        None => {
            ensure!(
                t.datum_type().unquantized() == i8::datum_type(),
                "int8 op needs i8 input, got {:?}",
                t.datum_type()
            );
            Ok(Activations::I8(view.as_slice::<i8>()?))
        }
        Some(q) => {
            ensure!(
                t.datum_type() == f32::datum_type(),
                "int8 op with fused quantization needs f32 input, got {:?}",
                t.datum_type()
            );
            Ok(Activations::F32(view.as_slice::<f32>()?, q))
        }
    }
}

/// An output tensor for [`super::qmatmul`] to fill: i8, or f32 when a dequantization is fused
/// in. Not zeroed: the product writes every element (a memset of up to 32 MB per node was a few
/// per cent of the encoder).
pub(super) fn output_tensor(shape: &[usize], dequant: Option<Dequantize>) -> TractResult<Tensor> {
    // SAFETY: i8 and f32 have no invalid bit patterns, and `qmatmul` (every tile of every task,
    // or the k = 0 path) writes each element before the tensor is read; on an error the tensor
    // is dropped unread.
    #[allow(unsafe_code)]
    unsafe {
        match dequant {
            None => Tensor::uninitialized::<i8>(shape),
            Some(_) => Tensor::uninitialized::<f32>(shape),
        }
    }
}

/// Run `f` on the output tensor's values.
pub(super) fn with_output<R>(
    t: &mut Tensor,
    dequant: Option<Dequantize>,
    f: impl FnOnce(Output<'_>) -> TractResult<R>,
) -> TractResult<R> {
    let mut view = t.try_as_plain_ram_mut()?;
    match dequant {
        None => f(Output::I8(view.as_slice_mut::<i8>()?)),
        Some(dq) => f(Output::F32(view.as_slice_mut::<f32>()?, dq)),
    }
}

/// The output fact: i8, or f32 when a dequantization is fused in.
pub(super) fn output_fact<S: Into<ShapeFact>>(shape: S, dequant: Option<Dequantize>) -> TypedFact {
    match dequant {
        None => i8::fact(shape),
        Some(_) => f32::fact(shape),
    }
}

impl TypedOp for QMatMulOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = self.output_shape(&inputs[0].shape.to_tvec())?;
        let dequant = self
            .output_dequant
            .filter(|_| self.output_requant.is_none());
        Ok(tvec!(output_fact(shape, dequant)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let k = self.b.k();
        let m = inputs[0].shape.volume() / k;
        Ok(tvec!((
            Cost::FMA(i32::datum_type()),
            m * (k * self.b.n()).to_dim()
        )))
    }

    as_op!();
}

/// Where one [`QMatMulOp`]'s f32 output (dequantized, with its bias and GELU) feeds only
/// another whose first step quantizes it (TinyViT's MLP: fc1 → GELU → fc2), move that
/// quantization into the first: it writes i8 rows and the second reads them as they are. The
/// f32 hidden values (32 MB in stage 1 of the default model) never go to memory whole, and the
/// second product does not re-read them. Same arithmetic, same bits. Returns how many.
pub fn chain_products(model: &mut TypedModel) -> TractResult<usize> {
    let mut chained = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(first) = node.op_as::<QMatMulOp>() else {
            continue;
        };
        if first.output_dequant.is_none()
            || first.output_requant.is_some()
            || first.c_layout != Layout::RowMajor
            || first
                .epilogue
                .bias
                .as_ref()
                .is_some_and(|b| b.len() != first.b.n())
        {
            continue;
        }
        let Some(next_id) = super::super::ops::graph::sole_consumer(model, OutletId::new(id, 0))
        else {
            continue;
        };
        let next_node = model.node(next_id);
        let Some(next) = next_node.op_as::<QMatMulOp>() else {
            continue;
        };
        let Some(q) = next.input_quant else {
            continue;
        };
        let name = node.name.clone();
        let first = QMatMulOp {
            output_requant: Some(q),
            ..first.clone()
        };
        let next = QMatMulOp {
            input_quant: None,
            ..next.clone()
        };
        let (input, next_name) = (node.inputs[0], next_node.name.clone());
        let mut patch = TypedModelPatch::new(format!("chain {name} into {next_name}"));
        let tap = patch.tap_model(model, input)?;
        let mid = patch.wire_node(format!("{name}.requantized"), first, &[tap])?[0];
        let out = patch.wire_node(format!("{next_name}.i8_input"), next, &[mid])?[0];
        patch.shunt_outside(model, OutletId::new(next_id, 0), out)?;
        patch.apply(model)?;
        chained += 1;
    }
    model.compact()?;
    Ok(chained)
}

/// Fold each [`LayerNormOp`] whose only reader is a [`QMatMulOp`] that quantizes its f32 input
/// (TinyViT's attention and MLP norms before qkv and fc1) into that product: rows are
/// normalised as they are packed, by the same routines, so the values are the same bit for bit
/// and the normalised tensor (up to 9 MB) is never written nor re-read. Returns how many.
pub fn fold_layer_norms(model: &mut TypedModel) -> TractResult<usize> {
    let mut folded = 0;
    for id in model.eval_order()? {
        let Some(node) = model.nodes().get(id) else {
            continue;
        };
        let Some(product) = node.op_as::<QMatMulOp>() else {
            continue;
        };
        if product.input_norm.is_some()
            || product.input_quant.is_none()
            || product.a_layout != Layout::RowMajor
        {
            continue;
        }
        let norm_node = model.node(node.inputs[0].node);
        let Some(norm) = norm_node.op_as::<LayerNormOp>() else {
            continue;
        };
        if !norm.averages_over(product.b.k())
            || norm_node.outputs[0].successors.len() != 1
            || model.outlet_fact(norm_node.inputs[0])?.datum_type != f32::datum_type()
        {
            continue;
        }
        let name = node.name.clone();
        let op = QMatMulOp {
            input_norm: Some(norm.clone()),
            ..product.clone()
        };
        let mut patch = TypedModelPatch::new(format!("fold LayerNorm into {name}"));
        let tap = patch.tap_model(model, norm_node.inputs[0])?;
        let out = patch.wire_node(format!("{name}.normalising"), op, &[tap])?[0];
        patch.shunt_outside(model, OutletId::new(id, 0), out)?;
        patch.apply(model)?;
        folded += 1;
    }
    model.compact()?;
    Ok(folded)
}
