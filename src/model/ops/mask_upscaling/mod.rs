//! [`MaskUpscaling`]: SAM's output upscaling and mask product — the whole mask graph of the
//! split decoder — as one op that works a tile of image tokens at a time in cache.
//!
//! The mask graph (`decoder.masks.*.onnx`, written by `models/tinysam_export/split_decoder.py`)
//! takes each prompt's image tokens after the two-way transformer, `[B, e·e, D]`, and its mask
//! weights, `[B, K, C2]`: a transposed convolution (as a `D × 4·C1` product), bias, LayerNorm,
//! GELU, a second transposed convolution (`C1 × 4·C2`), bias, GELU, the product with the mask
//! weights and three axis moves that put the 2×2×2×2 sub-pixels in place, giving `[B, K, 4e, 4e]`.
//! tract 0.23.9 runs that as fourteen nodes, each a pass over 4–8 MB per prompt, the bias adds and
//! axis moves on one thread: 20 ms of a 51 ms one-point decode on the default model
//! (`benches/decoder-results.md`). Here each task takes a row of the token grid, works 16 tokens
//! at a time (their feature maps stay in L1/L2, see `kernel`) and writes the finished mask
//! values straight to their place in the K planes; rows are spread over tract's threads.
//!
//! The split decoder runs it in its low-rank form ([`low_rank`]): the first transposed
//! convolution's prompt-independent part once per frame, the rest from the transformer's
//! coefficients, with about half the multiply-adds per prompt.
//!
//! [`rewrite_mask_upscaling`] finds the chain in a decluttered graph after our LayerNorm and
//! GELU rewrites, checks that the final axis moves compose to SAM's pixel order (by running them
//! on an index tensor), and replaces it; anything else stays with tract, with the reason logged.
#![allow(unsafe_code)]

mod kernel;
pub mod low_rank;

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;

use super::gemm::PackedWeights;
#[cfg(target_arch = "x86_64")]
use super::gemm::{Avx2, Avx512};
use super::graph::{
    axis_op_chain, bias_add_after, canonical, concrete_shape, indices_through, next_op,
    replace_chains, Isa, Match, Replacement,
};
use super::layer_norm::LayerNormOp;
use super::w8a16::W8A16Kernel;
use crate::model::qmatmul::GeluOp;
use kernel::{Band, FirstProduct, LowRankRow, Scratch, Weights};
use low_rank::LowRank;

/// `[B, side², D]` image tokens and `[B, K, C2]` mask weights → `[B, K, 4·side, 4·side]` mask
/// logits, as SAM's `output_upscaling` followed by the hypernetwork product.
///
/// In the low-rank form (see [`low_rank`]) the inputs are instead the per-frame base `[1,
/// side, 4·C1, side]` (per grid row, transposed: see [`MaskUpscaling::frame_base`]), the first
/// and second image->token outputs' coefficients `[B, side², n + 2]` and projected token values
/// (`B · n · D` values each), and the mask weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskUpscaling {
    /// Side of the image-token grid (64 for a 1024² input).
    pub side: usize,
    weights: Arc<Weights>,
    low_rank: Option<Arc<LowRank>>,
}

impl MaskUpscaling {
    /// The kernel name reported in kernel tables, e.g. `tinysam_upscaling_avx512f`, or with an
    /// integer second product `tinysam_upscaling_avx512f_w8a16_vnni`.
    pub fn kernel_name(&self) -> String {
        match &self.weights.integer {
            Some((kernel, _)) => format!("tinysam_upscaling_{}_{}", Isa::detect(), kernel.name()),
            None => format!("tinysam_upscaling_{}", Isa::detect()),
        }
    }

    /// Width of the image tokens (D).
    pub fn dim(&self) -> usize {
        self.weights.up1.k()
    }

    /// Multiply-adds per prompt of `masks` masks; in the low-rank form with a basis of
    /// `basis_rows` rows (`n₁ + n₂ + 4`, the two coefficient widths summed), which the full-rank
    /// form ignores.
    pub fn macs_per_prompt<D>(&self, masks: usize, basis_rows: D) -> D
    where
        D: From<usize> + std::ops::Add<Output = D> + std::ops::Mul<usize, Output = D>,
    {
        let w = &self.weights;
        let pixels = self.side * self.side;
        let rest = pixels * (4 * w.up2.k() * w.up2.n() + 16 * w.bias2.len() * masks);
        let first = match &self.low_rank {
            // The basis rows, and the per-frame base's one.
            Some(_) => (basis_rows + D::from(1)) * (pixels * w.up1.n()),
            None => D::from(pixels * w.up1.k() * w.up1.n()),
        };
        first + D::from(rest)
    }

    /// The low-rank form's per-frame base `(γ₂γ₁ ⊙ k₀) · U` of the per-frame image tokens
    /// `tokens` (`[1, side², D]`), laid out as the kernel reads it: `[1, side, 4·C1, side]`,
    /// each grid row's tokens transposed (its `4·C1` values per token as rows of `side`
    /// tokens). Grid rows spread over tract's threads.
    pub fn frame_base(&self, tokens: &Tensor) -> TractResult<Tensor> {
        let low_rank = self
            .low_rank
            .as_ref()
            .context("TinysamMaskUpscaling: not in low-rank form")?;
        let map = low_rank.frame_map();
        let (d, width, side) = (map.k(), map.n(), self.side);
        let pixels = side * side;
        ensure!(
            tokens.shape() == [1, pixels, d],
            "TinysamMaskUpscaling: per-frame image tokens {:?}, expected [1, {pixels}, {d}]",
            tokens.shape()
        );
        let view = tokens.try_as_plain_ram()?;
        let tokens = view.as_slice::<f32>()?;
        let mut base = Tensor::zero::<f32>(&[1, side, width, side])?;
        {
            let mut out = base.try_as_plain_ram_mut()?;
            let out = out.as_slice_mut::<f32>()?;
            let isa = Isa::detect();
            tract_linalg::multithread::par_chunks_mut(
                out,
                width * side,
                pixels * d * width,
                |first, chunk| {
                    let mut rows = vec![0f32; side * width];
                    for (i, block) in chunk.chunks_exact_mut(width * side).enumerate() {
                        let at = (first + i) * side * d;
                        let a = tokens.get(at..at + side * d).context("tokens")?;
                        self.times(isa, a, map, &mut rows);
                        super::transpose::transpose(&rows, side, width, block);
                    }
                    Ok(())
                },
            )?;
        }
        Ok(base)
    }

    /// `c = a · w` on this CPU's kernel.
    fn times(&self, isa: Isa, a: &[f32], w: &PackedWeights, c: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        match isa {
            Isa::Avx512 => {
                if let Some(m) = Avx512::detect() {
                    // SAFETY: `Isa::detect` found AVX-512F and FMA on this CPU.
                    return unsafe { kernel::times_avx512(m, a, w, c) };
                }
            }
            Isa::Avx2 => {
                if let Some(m) = Avx2::detect() {
                    // SAFETY: `Isa::detect` found AVX2 and FMA on this CPU.
                    return unsafe { kernel::times_avx2(m, a, w, c) };
                }
            }
            Isa::Portable => {}
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = isa;
        kernel::times_portable(a, w, c)
    }

    fn band(&self, isa: Isa, band: &Band<'_>, planes: &mut [&mut [f32]], scratch: &mut Scratch) {
        let w = &*self.weights;
        #[cfg(target_arch = "x86_64")]
        match isa {
            Isa::Avx512 => {
                if let Some(m) = Avx512::detect() {
                    // SAFETY: `Isa::detect` found AVX-512F and FMA on this CPU.
                    return unsafe { kernel::band_avx512(m, w, band, planes, scratch) };
                }
            }
            Isa::Avx2 => {
                if let Some(m) = Avx2::detect() {
                    // SAFETY: `Isa::detect` found AVX2 and FMA on this CPU.
                    return unsafe { kernel::band_avx2(m, w, band, planes, scratch) };
                }
            }
            Isa::Portable => {}
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = isa;
        kernel::band_portable(w, band, planes, scratch)
    }
}

impl Op for MaskUpscaling {
    fn name(&self) -> StaticName {
        "TinysamMaskUpscaling".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let w = &self.weights;
        Ok(vec![format!(
            "{}² tokens × {} → {} → {} channels{}, kernel {}{}",
            self.side,
            w.up1.k(),
            w.bias1.len(),
            w.bias2.len(),
            if self.low_rank.is_some() {
                ", low-rank first product"
            } else {
                ""
            },
            Isa::detect(),
            match &w.integer {
                Some((kernel, _)) => format!(", second product W8A16 on {}", kernel.name()),
                None => String::new(),
            }
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for MaskUpscaling {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (d, c2, side) = (self.dim(), self.weights.bias2.len(), self.side);
        let pixels = side * side;
        let Some(hyper) = inputs.last() else {
            bail!("TinysamMaskUpscaling: no inputs");
        };
        let hs = hyper.shape();
        // The first product's input per prompt: image tokens, or the low-rank inputs.
        let (batch, first) = match &self.low_rank {
            None => {
                ensure!(
                    inputs.len() == 2,
                    "TinysamMaskUpscaling: {} inputs, expected 2",
                    inputs.len()
                );
                let ts = inputs[0].shape();
                ensure!(
                    ts.len() == 3 && ts[1] == pixels && ts[2] == d,
                    "TinysamMaskUpscaling: image tokens {ts:?}, expected [B, {pixels}, {d}]"
                );
                (ts[0], None)
            }
            Some(low_rank) => {
                ensure!(
                    inputs.len() == 6,
                    "TinysamMaskUpscaling: {} inputs, expected 6",
                    inputs.len()
                );
                let width = self.weights.up1.n();
                let batch = inputs[1].shape().first().copied().unwrap_or(0);
                let weights = |i: usize| inputs[i].shape().get(2).and_then(|n| n.checked_sub(2));
                let (Some(n1), Some(n2)) = (weights(1), weights(2)) else {
                    bail!(
                        "TinysamMaskUpscaling: coefficients {:?}, {:?}",
                        inputs[1].shape(),
                        inputs[2].shape()
                    );
                };
                ensure!(
                    inputs[0].shape() == [1, side, width, side]
                        && inputs[1].shape() == [batch, pixels, n1 + 2]
                        && inputs[2].shape() == [batch, pixels, n2 + 2]
                        && inputs[3].len() == batch * n1 * d
                        && inputs[4].len() == batch * n2 * d,
                    "TinysamMaskUpscaling: low-rank inputs {:?} do not fit {batch} prompts of \
                     [{pixels}, {n1} + 2] and [{pixels}, {n2} + 2] coefficients",
                    inputs
                        .iter()
                        .take(5)
                        .map(|i| i.shape().to_vec())
                        .collect::<Vec<_>>()
                );
                (batch, Some((low_rank, (n1, n2))))
            }
        };
        ensure!(
            hs.len() == 3 && hs[0] == batch && hs[2] == c2,
            "TinysamMaskUpscaling: mask weights {hs:?} for {batch} prompts of {c2} channels"
        );
        let masks = hs[1];
        let mut out = Tensor::zero::<f32>(&[batch, masks, 4 * side, 4 * side])?;
        if batch == 0 || masks == 0 {
            return Ok(tvec!(out.into_tvalue()));
        }
        let views = inputs
            .iter()
            .map(|t| t.try_as_plain_ram())
            .collect::<TractResult<Vec<_>>>()?;
        let slices = views
            .iter()
            .map(|v| v.as_slice::<f32>())
            .collect::<TractResult<Vec<_>>>()?;
        let hyper = slices.last().copied().context("mask weights")?;
        let isa = Isa::detect();
        // Each prompt's basis (low-rank form).
        let bases: Vec<Vec<f32>> = match first {
            None => Vec::new(),
            Some((low_rank, (n1, n2))) => (0..batch)
                .map(|b| {
                    let values = [
                        slices[3].get(b * n1 * d..(b + 1) * n1 * d),
                        slices[4].get(b * n2 * d..(b + 1) * n2 * d),
                    ];
                    let [Some(v1), Some(v2)] = values else {
                        return None;
                    };
                    low_rank.basis([v1, v2], |a, w, c| self.times(isa, a, w, c))
                })
                .collect::<Option<_>>()
                .context("low-rank basis")?,
        };
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let data = view.as_slice_mut::<f32>()?;
            // One unit per (prompt, grid row): its 4 mask rows in each of the K planes, which
            // are K separate runs of the output (planes are [B][K][4·side][4·side]).
            let band_len = 16 * side;
            let mut units: Vec<Vec<&mut [f32]>> = (0..batch * side)
                .map(|_| Vec::with_capacity(masks))
                .collect();
            for (i, run) in data.chunks_exact_mut(band_len).enumerate() {
                let (b, row) = (i / (masks * side), i % side);
                if let Some(unit) = units.get_mut(b * side + row) {
                    unit.push(run);
                }
            }
            let prompts: Vec<&[f32]> = hyper.chunks_exact(masks * c2).collect();
            let basis_rows = first.map_or(0, |(_, (n1, n2))| n1 + n2 + 4);
            let work = batch * pixels * self.weights.up1.n() * basis_rows.max(d);
            tract_linalg::multithread::par_chunks_mut(&mut units, 1, work, |first_unit, chunk| {
                let mut scratch = Scratch::new(&self.weights, masks, basis_rows);
                for (i, planes) in chunk.iter_mut().enumerate() {
                    let unit = first_unit + i;
                    let (b, row) = (unit / side, unit % side);
                    let first_product = match first {
                        None => {
                            let start = (b * pixels + row * side) * d;
                            FirstProduct::Tokens(
                                slices[0].get(start..start + side * d).context("tokens")?,
                            )
                        }
                        Some((low_rank, (n1, n2))) => {
                            let width = self.weights.up1.n();
                            let rows = |input: usize, per: usize, prompt: usize| {
                                let at = (prompt * pixels + row * side) * per;
                                slices.get(input).and_then(|s| s.get(at..at + side * per))
                            };
                            FirstProduct::LowRank(LowRankRow {
                                weights: (n1, n2),
                                first: rows(1, n1 + 2, b).context("coefficients")?,
                                second: rows(2, n2 + 2, b).context("coefficients")?,
                                base: slices[0]
                                    .get(row * width * side..(row + 1) * width * side)
                                    .context("base")?,
                                basis: bases.get(b).context("basis")?,
                                constant: &low_rank.constant,
                            })
                        }
                    };
                    let band = Band {
                        first: first_product,
                        side,
                        hyper: prompts.get(b).copied().context("mask weights")?,
                    };
                    self.band(isa, &band, planes, &mut scratch);
                }
                Ok(())
            })?;
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for MaskUpscaling {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs.iter().all(|f| f.datum_type == f32::datum_type()),
            "TinysamMaskUpscaling is f32 only"
        );
        let side = 4 * self.side;
        // The batch comes from the image tokens or the first coefficients.
        let prompts = if self.low_rank.is_some() { 1 } else { 0 };
        let (Some(prompts), Some(hyper)) = (inputs.get(prompts), inputs.last()) else {
            bail!("TinysamMaskUpscaling: too few inputs");
        };
        Ok(tvec!(f32::fact([
            prompts.shape[0].clone(),
            hyper.shape[1].clone(),
            side.into(),
            side.into()
        ])))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let facts = self.output_facts(inputs)?;
        let masks = facts[0].shape[1].to_usize().unwrap_or(1);
        let basis_rows: TDim = match (&self.low_rank, inputs.get(1), inputs.get(2)) {
            (Some(_), Some(first), Some(second)) => {
                first.shape[2].clone() + second.shape[2].clone()
            }
            _ => 0.into(),
        };
        let batch = facts[0].shape[0].clone();
        let all = batch.clone() * self.macs_per_prompt(masks, basis_rows);
        Ok(match &self.weights.integer {
            // The W8A16 second product accumulates in i32.
            Some(_) => {
                let w = &self.weights;
                let second = self.side * self.side * 4 * w.up2.k() * w.up2.n();
                let second = batch * second;
                tvec!(
                    (Cost::FMA(f32::datum_type()), all - second.clone()),
                    (Cost::FMA(i32::datum_type()), second),
                )
            }
            None => tvec!((Cost::FMA(f32::datum_type()), all)),
        })
    }

    as_op!();
}

/// Replace the mask graph's upscaling chain (see the module docs) by [`MaskUpscaling`];
/// returns how many (0 or 1 in practice). Chains that start like one but differ are logged
/// with the reason and left to tract. With `integer`, the second transposed convolution's
/// product runs as W8A16 on that kernel (see [`super::w8a16`]); without, in f32.
pub fn rewrite_mask_upscaling(
    model: &mut TypedModel,
    integer: Option<W8A16Kernel>,
) -> TractResult<usize> {
    let is_first_product = |node: &TypedNode| {
        node.op_as::<EinSum>()
            .is_some_and(|e| FIRST_PRODUCT.contains(&canonical(&e.axes.to_string()).as_str()))
    };
    replace_chains(
        model,
        ("mask upscaling", "upscaling"),
        is_first_product,
        |model: &TypedModel, first| plan(model, first, integer),
    )
}

// The products' einsum forms, canonical (`graph::canonical`): with the batch axis, and as
// tract declutters them for a batch of one (the batch axis dropped from the result).
const FIRST_PRODUCT: [&str; 2] = ["abc,cd->abd", "abc,cd->bd"];
const SECOND_PRODUCT: [&str; 2] = ["abc,cd->abd", "ab,bc->ac"];
const MASK_PRODUCT: [&str; 2] = ["abc,adc->abd", "ab,cdb->cad"];

/// Whether `shape` is `[batch, rows, cols]`, or `[rows, cols]` for a batch of one (as tract
/// declutters it).
fn is_rows(shape: Option<&[usize]>, batch: usize, rows: usize, cols: usize) -> bool {
    match shape {
        Some(&[b, r, c]) => (b, r, c) == (batch, rows, cols),
        Some(&[r, c]) => (batch, r, c) == (1, rows, cols),
        _ => false,
    }
}

/// A matched upscaling chain.
type Plan = Replacement<MaskUpscaling>;

/// Match the upscaling chain starting at the product `first`: `Ok(None)` if `first` does not
/// start one, `Err(reason)` if it starts like one but differs.
fn plan(
    model: &TypedModel,
    first: usize,
    integer: Option<W8A16Kernel>,
) -> TractResult<Match<MaskUpscaling>> {
    let shape_of = |outlet: OutletId| concrete_shape(model, outlet);
    let start = model.node(first);
    let tokens = start.inputs[0];
    let (Some(up1), Some(in_shape)) = (
        model.outlet_fact(start.inputs[1])?.konst.clone(),
        shape_of(tokens)?,
    ) else {
        return Ok(Ok(None));
    };
    // [B, e², D] tokens times a constant [D, 4·C1], reshaped to [B, 4e², C1], plus a bias
    // of C1: anything else is some other product.
    let (Some(reshape1), &[batch, pixels, d]) =
        (next_op::<AxisOp>(model, first), in_shape.as_slice())
    else {
        return Ok(Ok(None));
    };
    let c1 = match *up1.shape() {
        [rows, cols] if rows == d && cols > 0 && cols % 4 == 0 => cols / 4,
        _ => return Ok(Ok(None)),
    };
    let reshaped = OutletId::new(reshape1, 0);
    if !is_rows(shape_of(reshaped)?.as_deref(), batch, 4 * pixels, c1) {
        return Ok(Ok(None));
    }
    let Some((bias1_node, bias1)) = bias_add_after(model, reshaped, c1)? else {
        return Ok(Ok(None));
    };
    let side = (1..=pixels).find(|s| s * s >= pixels).unwrap_or(0);
    need!(
        side * side == pixels,
        "{pixels} image tokens are not a square grid"
    );
    need!(
        up1.datum_type() == f32::datum_type(),
        "first product's weight is {:?}",
        up1.datum_type()
    );

    let Some(norm) = next_op::<LayerNormOp>(model, bias1_node) else {
        return Ok(Err("no TinysamLayerNorm after the first bias".into()));
    };
    let norm_op = model
        .node(norm)
        .op_as::<LayerNormOp>()
        .context("a LayerNorm")?;
    need!(
        norm_op.averages_over(c1),
        "LayerNorm mean factor {} is not 1/{c1}",
        norm_op.recip
    );
    let Some(gelu1) = next_op::<GeluOp>(model, norm) else {
        return Ok(Err("no GELU after the LayerNorm".into()));
    };
    let Some(second) = next_op::<EinSum>(model, gelu1) else {
        return Ok(Err("no product after the first GELU".into()));
    };
    let second_node = model.node(second);
    let second_expr = second_node
        .op_as::<EinSum>()
        .map(|e| canonical(&e.axes.to_string()));
    need!(
        second_expr
            .as_deref()
            .is_some_and(|e| SECOND_PRODUCT.contains(&e))
            && second_node.inputs[0].node == gelu1,
        "second product is {second_expr:?}"
    );
    let Some(up2) = model.outlet_fact(second_node.inputs[1])?.konst.clone() else {
        return Ok(Err("second product's weight is not a constant".into()));
    };
    let c2 = match *up2.shape() {
        [rows, cols] if rows == c1 && cols > 0 && cols % 4 == 0 => cols / 4,
        ref other => {
            return Ok(Err(format!(
                "second product's weight is {other:?}, expected [{c1}, 4·C2]"
            )))
        }
    };
    need!(
        up2.datum_type() == f32::datum_type(),
        "second product's weight is {:?}",
        up2.datum_type()
    );
    let Some(reshape2) = next_op::<AxisOp>(model, second) else {
        return Ok(Err("no reshape after the second product".into()));
    };
    let reshaped = OutletId::new(reshape2, 0);
    need!(
        is_rows(shape_of(reshaped)?.as_deref(), batch, 16 * pixels, c2),
        "second product reshaped to {:?}",
        shape_of(reshaped)?
    );
    let Some((bias2_node, bias2)) = bias_add_after(model, reshaped, c2)? else {
        return Ok(Err(format!(
            "no constant bias of {c2} after the second product"
        )));
    };
    let Some(gelu2) = next_op::<GeluOp>(model, bias2_node) else {
        return Ok(Err("no GELU after the second bias".into()));
    };
    let Some(masks) = next_op::<EinSum>(model, gelu2) else {
        return Ok(Err("no mask product after the second GELU".into()));
    };
    let masks_node = model.node(masks);
    let masks_expr = masks_node
        .op_as::<EinSum>()
        .map(|e| canonical(&e.axes.to_string()));
    need!(
        masks_expr
            .as_deref()
            .is_some_and(|e| MASK_PRODUCT.contains(&e))
            && masks_node.inputs[0].node == gelu2,
        "mask product is {masks_expr:?}"
    );
    let hyper = masks_node.inputs[1];
    let hyper_shape = shape_of(hyper)?;
    let k = match hyper_shape.as_deref() {
        Some(&[b, k, c]) if b == batch && c == c2 => k,
        other => return Ok(Err(format!("mask weights are {other:?}"))),
    };
    // The axis moves after the mask product, up to the first node that is not one.
    let (chain, end) = axis_op_chain(model, masks);
    need!(
        shape_of(OutletId::new(end, 0))? == Some(vec![batch, k, 4 * side, 4 * side]),
        "mask output is {:?}",
        shape_of(OutletId::new(end, 0))?
    );
    need!(
        moves_to_sam_pixel_order(model, &chain, [batch, 16 * pixels, k], side)?,
        "the axis moves after the mask product do not give SAM's pixel order"
    );

    let pack = |t: &Tensor, rows: usize, cols: usize| -> TractResult<PackedWeights> {
        let values = t.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
        PackedWeights::pack(&values, rows, cols).context("weight sizes")
    };
    let ones = || vec![1f32; c1];
    let gamma = norm_op.gamma.as_deref().cloned().unwrap_or_else(ones);
    let beta = norm_op
        .beta
        .as_deref()
        .cloned()
        .unwrap_or_else(|| vec![0f32; c1]);
    let weights = Weights::new(
        pack(&up1, d, 4 * c1)?,
        bias1,
        (norm_op.eps, gamma, beta),
        pack(&up2, c1, 4 * c2)?,
        bias2,
        integer,
    );
    let Some(weights) = weights else {
        return Ok(Err("the second product's weights do not quantize".into()));
    };
    need!(
        weights.gamma.len() == c1 && weights.beta.len() == c1,
        "LayerNorm parameters are not one per channel"
    );
    Ok(Ok(Some(Plan {
        inputs: vec![tokens, hyper],
        output: OutletId::new(end, 0),
        op: MaskUpscaling {
            side,
            weights: Arc::new(weights),
            low_rank: None,
        },
    })))
}

/// Whether the axis ops `chain` turn a `[B, 16·side², K]` tensor whose pixel axis is in the
/// order (row, column, dy, dx, dy2, dx2) into `[B, K, 4·side, 4·side]` masks, row `4·row + 2·dy
/// + dy2`, column `4·column + 2·dx + dx2`: checked by running them on the indices.
fn moves_to_sam_pixel_order(
    model: &TypedModel,
    chain: &[usize],
    shape: [usize; 3],
    side: usize,
) -> TractResult<bool> {
    let [batch, pixels, k] = shape;
    let Some(got) = indices_through(model, chain, &shape)? else {
        return Ok(false);
    };
    let width = 4 * side;
    for b in 0..batch {
        for m in 0..k {
            for y in 0..width {
                for x in 0..width {
                    let (row, dy, dy2) = (y / 4, y / 2 % 2, y % 2);
                    let (col, dx, dx2) = (x / 4, x / 2 % 2, x % 2);
                    let q = ((((row * side + col) * 2 + dy) * 2 + dx) * 2 + dy2) * 2 + dx2;
                    let want = (b * pixels + q) * k + m;
                    let at = ((b * k + m) * width + y) * width + x;
                    if got.get(at).and_then(|&v| usize::try_from(v).ok()) != Some(want) {
                        return Ok(false);
                    }
                }
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests;
