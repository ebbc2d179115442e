//! [`ImageToTokenOutput`]: the end of SAM's image->token attention in the split decoder — the
//! softmax over each head's prompt tokens, the weighted sum of the projected token values, the
//! output bias, the residual and the LayerNorm after it (`norm4`) — as one op that works a tile
//! of image tokens at a time in cache.
//!
//! The per-prompt graph (`models/tinysam_export/split_decoder.py`, `_image_to_token_output`)
//! keeps the attention logits as `[B, H, T, P]`, image tokens contiguous. tract 0.23.9 then runs
//! the softmax, reshapes and an axis move that copies the weights to `[B, P, H·T]`, packs them,
//! multiplies by the `[H·T, D]` values (k = 56: a shape its kernels run at ~16 GMAC/s on this
//! AVX-512 host), adds bias and residual and normalises: ~7 ms of a 25 ms one-point prompt
//! graph per block, two blocks (`benches/decoder-results.md`). Here each task takes 32 image
//! tokens: the softmax is computed and transposed into the product's rows in one go, the
//! product runs on our f32 kernel (`gemm`) with the prompt's values packed once, and bias,
//! residual and LayerNorm follow while the tile is in cache.
//!
//! [`rewrite_image_to_token_output`] finds the chain after the softmax rewrite, checks that the
//! axis ops between the softmax and the product put the image tokens first (by running them on
//! an index tensor), and replaces it; anything else stays with tract, with the reason logged.
#![allow(unsafe_code)]

mod kernel;

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::math::Add;

use super::gemm::{pack_head_columns, same_bits, PackedWeights};
#[cfg(target_arch = "x86_64")]
use super::gemm::{Avx2, Avx512};
use super::graph::{
    axis_op_chain, bias_add_after, canonical, change_ops, concrete_shape, indices_through,
    keeps_order, next_op, producer_before_axis_ops, replace_chains, sole_consumer, Isa, Match,
    Replacement,
};
use super::layer_norm::LayerNormOp;
use super::softmax::AxisSoftmax;
use super::token_to_image::{einsum_expr, keys_logits, quantize_head_columns, HEAD_LOGITS};
use super::w8a16::{W8A16Kernel, W8Weights};
use kernel::{Logits, Norm, Scratch, Tile, TILE};

/// Where the op's attention logits come from.
#[derive(Debug, Clone)]
pub enum LogitsSource {
    /// Its first input, `[B, H, T, P]`.
    Input,
    /// Computed per tile: `(residual + pe) · queries + bias`, with the query rows `[B, H, T, D]`
    /// and one bias per row `[B, H·T]` as the first two inputs, and this positional encoding
    /// (`[P, D]`, a constant of the op).
    FromKeys(Arc<Vec<f32>>),
    /// Computed per tile, head by head: the query rows `[T, H, c]` (batched `[B, T, H, c]`, the
    /// first input) against per-frame keys `[1, H, P, c]` (the second), SAM's first block; holds
    /// `c`.
    PerHead(usize),
}

/// An [`ImageToTokenOutput`]'s output bias and LayerNorm: `LayerNorm(x + bias)` is
/// `(x + bias − μ) · γ / √(σ² + ε) + β`.
#[derive(Debug, Clone)]
pub struct NormParams {
    /// ε inside the root.
    pub eps: f32,
    /// γ, one per channel.
    pub gamma: Arc<Vec<f32>>,
    /// β, one per channel.
    pub beta: Arc<Vec<f32>>,
    /// The output projection's bias, added before the residual.
    pub bias: Arc<Vec<f32>>,
}

/// `LayerNorm(residual + bias + Σ_{h,t} softmax_t(scores)[h, t, p] · values[h, t, :])` for
/// every image token `p`: scores `[B, H, T, P]` (an input, or computed from the residual, see
/// [`LogitsSource`]), values `[B, H, T, D]`, residual `[B or 1, P, D]` → `[B, P, D]` (without
/// the leading `B` axis on scores, queries and values for a batch of one, as tract declutters
/// it). With [`coefficients`](Self::coefficients), a second output `[B, P, H·T + 2]` holds each
/// image token's softmax weights (in the values' (head, token) row order), then the LayerNorm's
/// mean and scale `1 / √(variance + ε)`: what the mask upscaling's low-rank first product needs
/// (`mask_upscaling::low_rank`).
#[derive(Debug, Clone)]
pub struct ImageToTokenOutput {
    /// Heads (H).
    pub heads: usize,
    /// Prompt tokens per head (T).
    pub tokens: usize,
    /// Image tokens (P).
    pub pixels: usize,
    /// Width of the output (D).
    pub dim: usize,
    /// Whether scores and values have the batch axis.
    pub batched: bool,
    /// Where the logits come from.
    pub logits: LogitsSource,
    /// Whether the op also gives each image token's weights and LayerNorm statistics.
    pub coefficients: bool,
    bias: Arc<Vec<f32>>,
    /// The LayerNorm after the residual: ε, γ and β (absent ones in the graph as 1 and 0).
    eps: f32,
    gamma: Arc<Vec<f32>>,
    beta: Arc<Vec<f32>>,
    /// When set, the weighted sum of the prompt's projected token values runs as W8A16 on this
    /// kernel (see [`super::w8a16`]): the values at 8 bits per output channel, quantized once
    /// per prompt, each image token's softmax weights at 16 bits. So do logits computed from
    /// keys ([`LogitsSource::FromKeys`]), at 12 bits a side: the prompt's query rows per row,
    /// each image token + pe per token.
    pub integer: Option<W8A16Kernel>,
}

// tract wants ops `Eq`: the float parameters compare by their bits.
impl PartialEq for ImageToTokenOutput {
    fn eq(&self, other: &ImageToTokenOutput) -> bool {
        (
            self.heads,
            self.tokens,
            self.pixels,
            self.dim,
            self.batched,
            self.coefficients,
            self.integer,
        ) == (
            other.heads,
            other.tokens,
            other.pixels,
            other.dim,
            other.batched,
            other.coefficients,
            other.integer,
        ) && self.eps.to_bits() == other.eps.to_bits()
            && match (&self.logits, &other.logits) {
                (LogitsSource::Input, LogitsSource::Input) => true,
                (LogitsSource::FromKeys(a), LogitsSource::FromKeys(b)) => same_bits(a, b),
                (LogitsSource::PerHead(a), LogitsSource::PerHead(b)) => a == b,
                _ => false,
            }
            && [&self.bias, &self.gamma, &self.beta]
                .into_iter()
                .zip([&other.bias, &other.gamma, &other.beta])
                .all(|(a, b)| same_bits(a, b))
    }
}
impl Eq for ImageToTokenOutput {}

/// A tile of the output: its index (prompt after prompt), its rows of the output and of the
/// coefficients (empty without them).
type TileRows<'a> = (usize, &'a mut [f32], &'a mut [f32]);

impl ImageToTokenOutput {
    /// The kernel name reported in kernel tables, e.g. `tinysam_token_mixing_avx512f`.
    pub fn kernel_name(&self) -> String {
        match self.integer {
            Some(kernel) => format!("tinysam_token_mixing_{}_{}", Isa::detect(), kernel.name()),
            None => format!("tinysam_token_mixing_{}", Isa::detect()),
        }
    }

    /// The LayerNorm after the residual and the output bias before it.
    pub fn norm(&self) -> NormParams {
        NormParams {
            eps: self.eps,
            gamma: self.gamma.clone(),
            beta: self.beta.clone(),
            bias: self.bias.clone(),
        }
    }

    /// Values per image token of the coefficients output: `H·T` weights, mean, scale.
    pub fn coefficient_width(&self) -> usize {
        self.heads * self.tokens + 2
    }

    fn tile(
        &self,
        isa: Isa,
        tile: &Tile<'_>,
        out: &mut [f32],
        coefficients: &mut [f32],
        scratch: &mut Scratch,
    ) {
        #[cfg(target_arch = "x86_64")]
        match isa {
            Isa::Avx512 => {
                if let Some(m) = Avx512::detect() {
                    // SAFETY: `Isa::detect` found AVX-512F and FMA on this CPU.
                    return unsafe { kernel::tile_avx512(m, tile, out, coefficients, scratch) };
                }
            }
            Isa::Avx2 => {
                if let Some(m) = Avx2::detect() {
                    // SAFETY: `Isa::detect` found AVX2 and FMA on this CPU.
                    return unsafe { kernel::tile_avx2(m, tile, out, coefficients, scratch) };
                }
            }
            Isa::Portable => {}
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = isa;
        kernel::tile_portable(tile, out, coefficients, scratch)
    }
}

impl Op for ImageToTokenOutput {
    fn name(&self) -> StaticName {
        "TinysamImageToTokenOutput".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} heads × {} tokens → {} image tokens × {}, LayerNorm{}, kernel {}",
            self.heads,
            self.tokens,
            self.pixels,
            self.dim,
            match self.logits {
                LogitsSource::Input => "",
                LogitsSource::FromKeys(_) => ", logits from keys + pe",
                LogitsSource::PerHead(_) => ", logits per head",
            },
            Isa::detect()
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for ImageToTokenOutput {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (h, t, p, d) = (self.heads, self.tokens, self.pixels, self.dim);
        let ht = h * t;
        let mut inputs = inputs.into_iter();
        let mut next = || {
            inputs
                .next()
                .context("TinysamImageToTokenOutput: too few inputs")
        };
        let first = next()?;
        // The row bias (logits from keys + pe) or the per-head keys (logits per head).
        let second = match self.logits {
            LogitsSource::Input => None,
            LogitsSource::FromKeys(_) | LogitsSource::PerHead(_) => Some(next()?),
        };
        let (values, residual) = (next()?, next()?);
        let batch = if self.batched {
            first.shape().first().copied().unwrap_or(0)
        } else {
            1
        };
        let lead: &[usize] = if self.batched { &[batch] } else { &[] };
        let want = |tail: &[usize]| [lead, tail].concat();
        let first_tail = match self.logits {
            LogitsSource::Input => [h, t, p],
            LogitsSource::FromKeys(_) => [h, t, d],
            LogitsSource::PerHead(c) => [t, h, c],
        };
        ensure!(
            first.shape() == want(&first_tail) && values.shape() == want(&[h, t, d]),
            "TinysamImageToTokenOutput: {} {:?} and values {:?} do not fit {self:?}",
            if matches!(self.logits, LogitsSource::Input) {
                "scores"
            } else {
                "queries"
            },
            first.shape(),
            values.shape()
        );
        match (&self.logits, &second) {
            (LogitsSource::FromKeys(_), Some(row_bias)) => ensure!(
                row_bias.len() == batch * ht,
                "TinysamImageToTokenOutput: row bias {:?} for {batch} prompts of {ht} rows",
                row_bias.shape()
            ),
            (&LogitsSource::PerHead(c), Some(keys)) => ensure!(
                keys.shape() == [1, h, p, c],
                "TinysamImageToTokenOutput: per-head keys {:?}, expected [1, {h}, {p}, {c}]",
                keys.shape()
            ),
            _ => {}
        }
        let rs = residual.shape();
        ensure!(
            rs.len() == 3 && (rs[0] == 1 || rs[0] == batch) && rs[1] == p && rs[2] == d,
            "TinysamImageToTokenOutput: residual {rs:?} for {batch} prompts of [{p}, {d}]"
        );
        let residual_batch = rs[0];
        let first_view = first.try_as_plain_ram()?;
        let first = first_view.as_slice::<f32>()?;
        let second_view = second.as_ref().map(|s| s.try_as_plain_ram()).transpose()?;
        let second = second_view
            .as_ref()
            .map(|v| v.as_slice::<f32>())
            .transpose()?;
        let values_view = values.try_as_plain_ram()?;
        let values = values_view.as_slice::<f32>()?;
        let residual_view = residual.try_as_plain_ram()?;
        let residual = residual_view.as_slice::<f32>()?;
        let packed: Vec<PackedWeights> = values
            .chunks_exact(ht * d)
            .map(|v| PackedWeights::pack(v, ht, d).context("token values"))
            .collect::<TractResult<_>>()?;
        let quantized: Vec<W8Weights> = match self.integer {
            Some(_) => values
                .chunks_exact(ht * d)
                .map(|v| W8Weights::quantize(v, ht, d).context("token values"))
                .collect::<TractResult<_>>()?,
            None => Vec::new(),
        };
        // With logits computed here: each prompt's (or head's) query rows as the columns of a
        // product.
        let queries: Vec<PackedWeights> = match self.logits {
            LogitsSource::Input => Vec::new(),
            // Each head's query rows of the whole batch, prompt after prompt.
            LogitsSource::PerHead(c) => (0..h)
                .map(|head| pack_head_columns(first, h, head, c))
                .collect::<Option<_>>()
                .context("query rows")?,
            LogitsSource::FromKeys(_) => first
                .chunks_exact(ht * d)
                .map(|q| pack_head_columns(q, 1, 0, d))
                .collect::<Option<_>>()
                .context("query rows")?,
        };
        // In integers, logits from keys take the same query rows at 12 bits per row (both sides
        // of the product change per prompt; see `token_to_image::QUERY_LEVELS`).
        let quantized_queries: Vec<W8Weights> = match (&self.logits, self.integer) {
            (LogitsSource::FromKeys(_), Some(_)) => first
                .chunks_exact(ht * d)
                .map(|q| quantize_head_columns(q, 1, 0, d))
                .collect::<Option<_>>()
                .context("query rows")?,
            _ => Vec::new(),
        };
        ensure!(
            p.is_multiple_of(TILE),
            "TinysamImageToTokenOutput: {p} image tokens are not a multiple of {TILE}"
        );
        let width = self.coefficient_width();
        // Not zeroed first (4 MB and 1 MB a prompt): every tile writes its rows whole.
        // SAFETY: f32 has no invalid bit patterns; the tiles cover all `batch · p` image tokens
        // (p is a multiple of TILE, checked above), and each writes its TILE output rows (the
        // product, then the LayerNorm in place) and, with coefficients, its TILE rows of
        // `width` values, before the tensors are read; on an error they are dropped unread.
        let (mut out, mut coefficients) = unsafe {
            (
                Tensor::uninitialized::<f32>(&[batch, p, d])?,
                Tensor::uninitialized::<f32>(&[
                    batch,
                    p,
                    if self.coefficients { width } else { 0 },
                ])?,
            )
        };
        let isa = Isa::detect();
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let data = view.as_slice_mut::<f32>()?;
            let mut coefficients_view = coefficients.try_as_plain_ram_mut()?;
            let coefficients = coefficients_view.as_slice_mut::<f32>()?;
            let mut tiles: Vec<TileRows<'_>> = data
                .chunks_exact_mut(TILE * d)
                .enumerate()
                .map(|(tile, out)| (tile, out, Default::default()))
                .collect();
            if self.coefficients {
                for ((_, _, c), rows) in tiles
                    .iter_mut()
                    .zip(coefficients.chunks_exact_mut(TILE * width))
                {
                    *c = rows;
                }
            }
            let work = batch * p * ht * d;
            let tiles_per_prompt = p / TILE;
            // With per-head logits, a task takes the batch's tiles at one position, one prompt
            // after another: their logits come from one product per head (see
            // `kernel::Logits::PerHead`). Else a tile at a time, prompt after prompt.
            let per_task = match self.logits {
                LogitsSource::PerHead(_) => batch.max(1),
                _ => 1,
            };
            if per_task > 1 {
                tiles.sort_by_key(|&(tile, _, _)| {
                    (tile % tiles_per_prompt, tile / tiles_per_prompt)
                });
            }
            tract_linalg::multithread::par_chunks_mut(&mut tiles, per_task, work, |_, chunk| {
                let mut scratch = Scratch::new(h, t, d);
                for (tile, out, coefficients) in chunk.iter_mut() {
                    let tile = *tile;
                    let (b, start) = (tile / tiles_per_prompt, tile % tiles_per_prompt * TILE);
                    let rb = if residual_batch == 1 { 0 } else { b };
                    let at = (rb * p + start) * d;
                    let logits = match &self.logits {
                        LogitsSource::PerHead(_) => Logits::PerHead {
                            queries: &queries,
                            keys: second.context("per-head keys")?,
                            pixels: p,
                            first: start,
                            prompt: b,
                        },
                        LogitsSource::FromKeys(pe) => Logits::FromKeys {
                            queries: queries.get(b).context("query rows")?,
                            quantized: quantized_queries.get(b),
                            bias: second
                                .and_then(|bias| bias.get(b * ht..(b + 1) * ht))
                                .context("row bias")?,
                            pe: pe.get(start * d..(start + TILE) * d).context("pe")?,
                        },
                        LogitsSource::Input => Logits::Given {
                            all: first.get(b * ht * p..(b + 1) * ht * p).context("scores")?,
                            pixels: p,
                            first: start,
                        },
                    };
                    let job = Tile {
                        logits,
                        heads: h,
                        tokens: t,
                        values: packed.get(b).context("values")?,
                        integer: match self.integer {
                            Some(kernel) => {
                                Some((kernel, quantized.get(b).context("quantized values")?))
                            }
                            None => None,
                        },
                        residual: residual.get(at..at + TILE * d).context("residual")?,
                        bias: &self.bias,
                        norm: Norm {
                            eps: self.eps,
                            gamma: &self.gamma,
                            beta: &self.beta,
                        },
                    };
                    self.tile(isa, &job, out, coefficients, &mut scratch);
                }
                Ok(())
            })?;
        }
        if self.coefficients {
            Ok(tvec!(out.into_tvalue(), coefficients.into_tvalue()))
        } else {
            Ok(tvec!(out.into_tvalue()))
        }
    }
}

impl TypedOp for ImageToTokenOutput {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs.iter().all(|f| f.datum_type == f32::datum_type()),
            "TinysamImageToTokenOutput is f32 only"
        );
        let batch: TDim = if self.batched {
            inputs[0].shape[0].clone()
        } else {
            1.into()
        };
        let out = f32::fact([batch.clone(), self.pixels.into(), self.dim.into()]);
        if self.coefficients {
            let width = self.coefficient_width();
            Ok(tvec!(
                out,
                f32::fact([batch, self.pixels.into(), width.into()])
            ))
        } else {
            Ok(tvec!(out))
        }
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let batch: TDim = if self.batched {
            inputs[0].shape[0].clone()
        } else {
            1.into()
        };
        // The weighted sum; in integers it accumulates in i32.
        let (float, int) = (f32::datum_type(), i32::datum_type());
        let accumulator = if self.integer.is_some() { int } else { float };
        let rows = self.heads * self.tokens * self.pixels;
        let mut costs = tvec!((Cost::FMA(accumulator), batch.clone() * (rows * self.dim)));
        // Logits computed here (given ones are the graph's products): from keys over the whole
        // width (in integers with the weighted sum), per head over the head's width.
        match self.logits {
            LogitsSource::Input => {}
            LogitsSource::FromKeys(_) => {
                costs.push((Cost::FMA(accumulator), batch * (rows * self.dim)))
            }
            LogitsSource::PerHead(c) => costs.push((Cost::FMA(float), batch * (rows * c))),
        }
        Ok(costs)
    }

    as_op!();
}

// The product's einsum forms, canonical (`graph::canonical`): for a batch of one as tract
// declutters it (`mbk,bkn->amn`), and batched (`ambk,abkn->amn`).
const PRODUCT: [&str; 2] = ["abc,bcd->ead", "abcd,acde->abe"];

/// Replace each image->token attention output chain (see the module docs) by
/// [`ImageToTokenOutput`]; returns how many. Chains that start like one but differ are logged
/// with the reason and left to tract.
pub fn rewrite_image_to_token_output(model: &mut TypedModel) -> TractResult<usize> {
    let is_softmax = |node: &TypedNode| node.op_as::<AxisSoftmax>().is_some();
    replace_chains(
        model,
        ("image->token output", "token_mixing"),
        is_softmax,
        plan,
    )
}

/// A matched chain.
type Plan = Replacement<ImageToTokenOutput>;

/// Match the chain starting at the softmax `softmax`: `Ok(None)` if it is some other softmax,
/// `Err(reason)` if it starts like the chain but differs.
fn plan(model: &TypedModel, softmax: usize) -> TractResult<Match<ImageToTokenOutput>> {
    let shape_of = |outlet: OutletId| concrete_shape(model, outlet);
    let node = model.node(softmax);
    let axis = node.op_as::<AxisSoftmax>().context("a softmax")?.axis;
    let Some(scores_shape) = shape_of(node.inputs[0])? else {
        return Ok(Ok(None));
    };
    let rank = scores_shape.len();
    if !(rank == 3 || rank == 4) || axis + 2 != rank {
        return Ok(Ok(None));
    }
    let batched = rank == 4;
    let (h, t, p) = (
        scores_shape[rank - 3],
        scores_shape[rank - 2],
        scores_shape[rank - 1],
    );
    let batch = if batched { scores_shape[0] } else { 1 };
    // Axis ops up to the product.
    let (chain, end) = axis_op_chain(model, softmax);
    let Some(product) = next_op::<EinSum>(model, end) else {
        return Ok(Ok(None));
    };
    let product_node = model.node(product);
    let expr = product_node
        .op_as::<EinSum>()
        .map(|e| canonical(&e.axes.to_string()));
    if !expr.as_deref().is_some_and(|e| PRODUCT.contains(&e)) || product_node.inputs[0].node != end
    {
        return Ok(Ok(None));
    }
    need!(
        p.is_multiple_of(TILE),
        "{p} image tokens are not a multiple of {TILE}"
    );
    need!(
        weights_put_image_tokens_first(model, &chain, &scores_shape)?,
        "the axis ops after the softmax do not give [.., P, H, T]"
    );
    let values = product_node.inputs[1];
    let Some(values_shape) = shape_of(values)? else {
        return Ok(Err("values have a symbolic shape".into()));
    };
    let d = values_shape.last().copied().unwrap_or(0);
    let lead: &[usize] = if batched { &[batch] } else { &[] };
    need!(
        values_shape == [lead, &[h, t, d]].concat(),
        "values are {values_shape:?}"
    );
    need!(
        shape_of(OutletId::new(product, 0))? == Some(vec![batch, p, d]),
        "product gives {:?}",
        shape_of(OutletId::new(product, 0))?
    );
    let Some((bias_node, bias)) = bias_add_after(model, OutletId::new(product, 0), d)? else {
        return Ok(Err(format!("no constant bias of {d} after the product")));
    };
    let Some(residual_node) = next_op::<TypedBinOp>(model, bias_node) else {
        return Ok(Err("no residual add after the bias".into()));
    };
    let residual_add = model.node(residual_node);
    let is_add = residual_add
        .op_as::<TypedBinOp>()
        .is_some_and(|b| b.0.is::<Add>() && b.1.is_none());
    let biased = OutletId::new(bias_node, 0);
    let residual = match *residual_add.inputs.as_slice() {
        [a, b] if is_add && b == biased => a,
        [a, b] if is_add && a == biased => b,
        _ => return Ok(Err("the residual add is not an add of two tensors".into())),
    };
    let residual_shape = shape_of(residual)?;
    need!(
        matches!(residual_shape.as_deref(), Some(&[rb, rp, rd]) if (rb == 1 || rb == batch) && rp == p && rd == d)
            && model.outlet_fact(residual)?.konst.is_none(),
        "residual is {residual_shape:?}"
    );
    need!(
        shape_of(OutletId::new(residual_node, 0))? == Some(vec![batch, p, d]),
        "residual add gives {:?}",
        shape_of(OutletId::new(residual_node, 0))?
    );
    let Some(norm) = next_op::<LayerNormOp>(model, residual_node) else {
        return Ok(Err("no LayerNorm after the residual".into()));
    };
    let norm_op = model
        .node(norm)
        .op_as::<LayerNormOp>()
        .context("a LayerNorm")?;
    need!(
        [&norm_op.gamma, &norm_op.beta]
            .iter()
            .all(|v| v.as_ref().is_none_or(|v| v.len() == d)),
        "LayerNorm parameters are not one per channel"
    );
    need!(
        norm_op.averages_over(d),
        "LayerNorm mean factor {} is not 1/{d}",
        norm_op.recip
    );
    Ok(Ok(Some(Plan {
        inputs: vec![node.inputs[0], values, residual],
        output: OutletId::new(norm, 0),
        op: ImageToTokenOutput {
            heads: h,
            tokens: t,
            pixels: p,
            dim: d,
            batched,
            logits: LogitsSource::Input,
            coefficients: false,
            integer: None,
            bias: Arc::new(bias),
            eps: norm_op.eps,
            gamma: Arc::new(
                norm_op
                    .gamma
                    .as_deref()
                    .cloned()
                    .unwrap_or_else(|| vec![1.0; d]),
            ),
            beta: Arc::new(
                norm_op
                    .beta
                    .as_deref()
                    .cloned()
                    .unwrap_or_else(|| vec![0.0; d]),
            ),
        },
    })))
}

/// Give each [`ImageToTokenOutput`] whose logits the graph computes from the op's own residual
/// input — `queries · (residual + pe) + row bias`, the split decoder's later blocks — the
/// logits' inputs instead ([`LogitsSource::FromKeys`]), so that the logits are computed a tile
/// at a time inside it and the graph's add over the image tokens, its logits product and the
/// packing of its operand go; returns how many. Run after [`rewrite_image_to_token_output`].
pub fn rewrite_image_to_token_logits(model: &mut TypedModel) -> TractResult<usize> {
    let takes_logits = |node: &TypedNode| {
        node.op_as::<ImageToTokenOutput>()
            .is_some_and(|op| matches!(op.logits, LogitsSource::Input))
    };
    replace_chains(
        model,
        ("image->token logits", "logits"),
        takes_logits,
        plan_logits,
    )
}

/// Match the logits feeding the [`ImageToTokenOutput`] node `id`: `Ok(None)` if they are not an
/// add of a logits product and a row bias, `Err(reason)` if they start like it but differ.
fn plan_logits(model: &TypedModel, id: usize) -> TractResult<Match<ImageToTokenOutput>> {
    let shape_of = |outlet: OutletId| concrete_shape(model, outlet);
    let node = model.node(id);
    let op = node
        .op_as::<ImageToTokenOutput>()
        .context("an image->token output")?;
    let &[scores, values, residual] = node.inputs.as_slice() else {
        return Ok(Ok(None));
    };
    let (h, t, p, d) = (op.heads, op.tokens, op.pixels, op.dim);
    let ht = h * t;
    let Some(scores_shape) = shape_of(scores)? else {
        return Ok(Ok(None));
    };
    let batch = if op.batched { scores_shape[0] } else { 1 };
    let (add, after_add) = producer_before_axis_ops(model, scores);
    let head_form = HEAD_LOGITS[usize::from(op.batched)];
    if after_add.is_empty() && einsum_expr(model, add).as_deref() == Some(head_form) {
        return plan_head_logits(model, (id, op), add, [values, residual]);
    }
    let add_node = model.node(add);
    let is_add = add_node
        .op_as::<TypedBinOp>()
        .is_some_and(|b| b.0.is::<Add>() && b.1.is_none());
    if !is_add || add_node.inputs.len() != 2 {
        return Ok(Ok(None));
    }
    let Some(add_shape) = shape_of(OutletId::new(add, 0))? else {
        return Ok(Ok(None));
    };
    for (logits_at, bias_at) in [(0, 1), (1, 0)] {
        let (logits, before_add) = producer_before_axis_ops(model, add_node.inputs[logits_at]);
        let found = match keys_logits(model, logits, p)? {
            Ok(Some(found)) => found,
            Ok(None) => continue,
            Err(why) => return Ok(Err(why)),
        };
        need!(
            found.keys == residual,
            "the logits are not over the residual image tokens"
        );
        let Some(logits_shape) = shape_of(OutletId::new(logits, 0))? else {
            return Ok(Err("logits have a symbolic shape".into()));
        };
        need!(
            add_shape.iter().product::<usize>() == batch * ht * p
                && keeps_order(model, &after_add, &add_shape)?
                && keeps_order(model, &before_add, &logits_shape)?
                && shape_of(add_node.inputs[logits_at])?.as_ref() == Some(&add_shape),
            "the axis ops around the logits reorder them"
        );
        let lead: &[usize] = if op.batched { &[batch] } else { &[] };
        let queries_shape = shape_of(found.queries)?;
        need!(
            queries_shape == Some([lead, &[h, t, d]].concat()),
            "queries are {queries_shape:?}"
        );
        let bias = add_node.inputs[bias_at];
        let bias_shape = shape_of(bias)?.unwrap_or_default();
        let rank = add_shape.len();
        need!(
            bias_shape.len() == rank
                && bias_shape[rank - 1] == 1
                && add_shape[rank - 1] == p
                && bias_shape.iter().product::<usize>() == batch * ht
                && bias_shape[..rank - 1] == add_shape[..rank - 1],
            "row bias is {bias_shape:?} for logits {add_shape:?}"
        );
        need!(found.pe.len() == p * d, "positional encoding size");
        return Ok(Ok(Some(Plan {
            inputs: vec![found.queries, bias, values, residual],
            output: OutletId::new(id, 0),
            op: ImageToTokenOutput {
                logits: LogitsSource::FromKeys(Arc::new(found.pe)),
                ..op.clone()
            },
        })));
    }
    Ok(Ok(None))
}

/// The first block's logits: einsum node `logits` (`mbk,abnk->bmn`) of the query rows
/// `[T, H, c]` and the per-frame keys `[1, H, P, c]` gives the op's `[H, T, P]` scores (batched,
/// `pmbk,abnk->pbmn`: `[B, T, H, c]` queries give `[B, H, T, P]`).
fn plan_head_logits(
    model: &TypedModel,
    (id, op): (usize, &ImageToTokenOutput),
    logits: usize,
    [values, residual]: [OutletId; 2],
) -> TractResult<Match<ImageToTokenOutput>> {
    let shape_of = |outlet: OutletId| concrete_shape(model, outlet);
    let (h, t, p) = (op.heads, op.tokens, op.pixels);
    let node = model.node(logits);
    let (queries, keys) = (node.inputs[0], node.inputs[1]);
    let queries_shape = shape_of(queries)?.unwrap_or_default();
    let c = queries_shape.last().copied().unwrap_or(0);
    let tail = queries_shape.len().saturating_sub(3);
    need!(
        queries_shape.len() == 3 + usize::from(op.batched)
            && queries_shape[tail..] == [t, h, c]
            && c > 0
            && c <= op.dim,
        "per-head queries are {queries_shape:?} for {h} heads of {t} tokens"
    );
    need!(
        shape_of(keys)? == Some(vec![1, h, p, c]),
        "per-head keys are {:?}",
        shape_of(keys)?
    );
    need!(
        sole_consumer(model, OutletId::new(logits, 0)).is_some(),
        "the logits have other consumers"
    );
    Ok(Ok(Some(Plan {
        inputs: vec![queries, keys, values, residual],
        output: OutletId::new(id, 0),
        op: ImageToTokenOutput {
            logits: LogitsSource::PerHead(c),
            ..op.clone()
        },
    })))
}

/// Run every [`ImageToTokenOutput`] of `model` with its weighted sum as W8A16 on `kernel` (the
/// INT8 decoder quantized at load); returns how many.
pub fn image_to_token_outputs_in_integers(
    model: &mut TypedModel,
    kernel: W8A16Kernel,
) -> TractResult<usize> {
    Ok(change_ops(model, |op: &ImageToTokenOutput| {
        Some(ImageToTokenOutput {
            integer: Some(kernel),
            ..op.clone()
        })
    }))
}

/// Whether the axis ops `chain` turn the `[.., H, T, P]` weights into `[.., P, H, T]` (any
/// reshapes of the last axes aside): checked by running them on the indices.
fn weights_put_image_tokens_first(
    model: &TypedModel,
    chain: &[usize],
    shape: &[usize],
) -> TractResult<bool> {
    let rank = shape.len();
    let (h, t, p) = (shape[rank - 3], shape[rank - 2], shape[rank - 1]);
    let Some(got) = indices_through(model, chain, shape)? else {
        return Ok(false);
    };
    let len: usize = shape.iter().product();
    let batch = len / (h * t * p);
    let mut at = 0;
    for b in 0..batch {
        for pixel in 0..p {
            for head in 0..h {
                for token in 0..t {
                    let want = ((b * h + head) * t + token) * p + pixel;
                    if got.get(at).and_then(|&v| usize::try_from(v).ok()) != Some(want) {
                        return Ok(false);
                    }
                    at += 1;
                }
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests;
