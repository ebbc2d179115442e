//! [`TokenToImageAttention`]: the core of SAM's token->image attention in the split decoder —
//! the image tokens' keys with the positional encoding added, the logits of the prompt's query
//! rows against them, the softmax over the 4 096 image tokens and the weighted sum of the image
//! tokens — as one op that reads each image token once.
//!
//! The per-prompt graph (`models/tinysam_export/split_decoder.py`, `_token_to_image`) reorders
//! the attention so that both products have the width of the query rows (H·T, 56 for a point
//! prompt): `softmax((Wkᵀq) · (keys + pe)) · keys`. tract 0.23.9 runs that as an add over the
//! whole `[P, D]` map, a product that packs that sum, a softmax over `[H·T, P]` and a product
//! that packs the keys again: four passes over 4 MB per block, two blocks per prompt, ~8 ms of a
//! ~30 ms one-point prompt on the default model (`benches/decoder-results.md`). Here each task
//! takes a fixed part of the image tokens and walks it a tile at a time (see [`kernel`]): keys +
//! pe, logits, an online softmax and the weighted sum all happen while the tile is in L1; the
//! parts' running sums are combined at the end.
//!
//! [`rewrite_token_to_image`] finds the chain in a decluttered graph (before the softmax
//! rewrite) and replaces it; anything that starts like it but differs stays with tract, with
//! the reason logged.
#![allow(unsafe_code)]

mod kernel;

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::math::Add;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

use super::gemm::{same_bits, transpose, PackedWeights};
#[cfg(target_arch = "x86_64")]
use super::gemm::{Avx2, Avx512};
use super::graph::{
    axis_op_chain, canonical, concrete_shape, const_operand, keeps_order, next_op,
    producer_before_axis_ops, replace_chains, sole_consumer, Isa, Match, Replacement,
};
use kernel::{Part, Scratch, PART, TILE};

/// `softmax_P(q · (keys + pe)ᵀ) · keys` for every query row: queries `[.., D]` (`R` rows, for
/// a batch of B prompts `[B, .., D]`), keys `[B or 1, P, D]` → `[R, D]` (batched `[B, R, D]`);
/// the positional encoding `pe` (`[P, D]`) is a constant of the op.
#[derive(Debug, Clone)]
pub struct TokenToImageAttention {
    /// Query rows per prompt (R = heads × prompt tokens).
    pub rows: usize,
    /// Image tokens (P).
    pub pixels: usize,
    /// Width of queries and keys (D).
    pub dim: usize,
    /// Whether queries and output have the batch axis.
    pub batched: bool,
    key_pe: Arc<Vec<f32>>,
}

// tract wants ops `Eq`: the positional encoding compares by its bits.
impl PartialEq for TokenToImageAttention {
    fn eq(&self, other: &TokenToImageAttention) -> bool {
        (self.rows, self.pixels, self.dim, self.batched)
            == (other.rows, other.pixels, other.dim, other.batched)
            && same_bits(&self.key_pe, &other.key_pe)
    }
}
impl Eq for TokenToImageAttention {}

impl TokenToImageAttention {
    /// The kernel name reported in kernel tables, e.g. `tinysam_token_to_image_avx512f`.
    pub fn kernel_name(&self) -> String {
        format!("tinysam_token_to_image_{}", Isa::detect())
    }

    fn part(
        &self,
        isa: Isa,
        job: &Part<'_>,
        state: &mut [f32],
        scratch: &mut Scratch,
    ) -> Option<()> {
        #[cfg(target_arch = "x86_64")]
        match isa {
            Isa::Avx512 => {
                if let Some(m) = Avx512::detect() {
                    // SAFETY: `Isa::detect` found AVX-512F and FMA on this CPU.
                    return unsafe { kernel::part_avx512(m, job, state, scratch) };
                }
            }
            Isa::Avx2 => {
                if let Some(m) = Avx2::detect() {
                    // SAFETY: `Isa::detect` found AVX2 and FMA on this CPU.
                    return unsafe { kernel::part_avx2(m, job, state, scratch) };
                }
            }
            Isa::Portable => {}
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = isa;
        kernel::part_portable(job, state, scratch)
    }

    fn batch_of(&self, queries: &TypedFact) -> TDim {
        if self.batched {
            queries.shape[0].clone()
        } else {
            1.into()
        }
    }
}

impl Op for TokenToImageAttention {
    fn name(&self) -> StaticName {
        "TinysamTokenToImageAttention".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} query rows × {} image tokens × {}, online softmax, kernel {}",
            self.rows,
            self.pixels,
            self.dim,
            Isa::detect()
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for TokenToImageAttention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (queries, keys) = args_2!(inputs);
        let (r, p, d) = (self.rows, self.pixels, self.dim);
        let qs = queries.shape();
        let batch = if self.batched {
            qs.first().copied().unwrap_or(0)
        } else {
            1
        };
        ensure!(
            qs.last() == Some(&d) && queries.len() == batch * r * d,
            "TinysamTokenToImageAttention: queries {qs:?} do not fit {r} rows of {d}"
        );
        let ks = keys.shape();
        ensure!(
            ks.len() == 3 && (ks[0] == 1 || ks[0] == batch) && ks[1] == p && ks[2] == d,
            "TinysamTokenToImageAttention: keys {ks:?} for {batch} prompts of [{p}, {d}]"
        );
        let keys_batch = ks[0];
        let queries_view = queries.try_as_plain_ram()?;
        let queries = queries_view.as_slice::<f32>()?;
        let keys_view = keys.try_as_plain_ram()?;
        let keys = keys_view.as_slice::<f32>()?;
        // Each prompt's query rows as the columns of the logits product.
        let mut transposed = vec![0f32; r * d];
        let packed: Vec<PackedWeights> = queries
            .chunks_exact(r * d)
            .map(|q| {
                transpose(q, r, d, &mut transposed);
                PackedWeights::pack(&transposed, d, r).context("query rows")
            })
            .collect::<TractResult<_>>()?;
        let parts = p.div_ceil(PART);
        let len = kernel::state_len(r, d).context("state size")?;
        let mut states = vec![0f32; batch * parts * len];
        let isa = Isa::detect();
        let work = batch * r * p * d;
        tract_linalg::multithread::par_chunks_mut(&mut states, len, work, |first, chunk| {
            let mut scratch = Scratch::new(r, d).context("scratch")?;
            for (i, state) in chunk.chunks_exact_mut(len).enumerate() {
                let unit = first + i;
                let (b, part) = (unit / parts, unit % parts);
                let kb = if keys_batch == 1 { 0 } else { b };
                let start = part * PART;
                let end = (start + PART).min(p);
                let job = Part {
                    queries: packed.get(b).context("query rows")?,
                    keys: keys
                        .get((kb * p + start) * d..(kb * p + end) * d)
                        .context("keys")?,
                    key_pe: self.key_pe.get(start * d..end * d).context("pe")?,
                };
                self.part(isa, &job, state, &mut scratch)
                    .context("TinysamTokenToImageAttention: part sizes")?;
            }
            Ok(())
        })?;
        let shape: Vec<usize> = if self.batched {
            vec![batch, r, d]
        } else {
            vec![r, d]
        };
        let mut out = Tensor::zero::<f32>(&shape)?;
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let data = view.as_slice_mut::<f32>()?;
            for (out, states) in data
                .chunks_exact_mut(r * d)
                .zip(states.chunks_exact(parts * len))
            {
                kernel::finish(states, r, d, out).context("finishing the softmax")?;
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for TokenToImageAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs.iter().all(|f| f.datum_type == f32::datum_type()),
            "TinysamTokenToImageAttention is f32 only"
        );
        let shape: TVec<TDim> = if self.batched {
            tvec![self.batch_of(inputs[0]), self.rows.into(), self.dim.into()]
        } else {
            tvec![self.rows.into(), self.dim.into()]
        };
        Ok(tvec!(f32::fact(shape)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        // Two products of R × P × D.
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            self.batch_of(inputs[0]) * (2 * self.rows * self.pixels * self.dim)
        )))
    }

    as_op!();
}

// The einsum forms, canonical (`graph::canonical`), for a batch of one as tract declutters it
// and batched: the logits (`bmk,ank->bmn`, `abmk,ank->abmn`) and the weighted sum
// (`mk,akn->mn`, `amk,akn->amn`).
const LOGITS: [&str; 2] = ["abc,dec->abe", "abcd,aed->abce"];
const WEIGHTED_SUM: [&str; 2] = ["ab,cbd->ad", "abc,acd->abd"];

/// Replace each token->image attention core (see the module docs) by
/// [`TokenToImageAttention`]; returns how many. Chains that start like one but differ are
/// logged with the reason and left to tract.
pub fn rewrite_token_to_image(model: &mut TypedModel) -> TractResult<usize> {
    let is_softmax = |node: &TypedNode| node.op_as::<Softmax>().is_some();
    replace_chains(
        model,
        ("token->image attention", "token_to_image"),
        is_softmax,
        plan,
    )
}

/// A matched chain.
type Plan = Replacement<TokenToImageAttention>;

/// The canonical expression of einsum node `id`.
fn einsum_expr(model: &TypedModel, id: usize) -> Option<String> {
    model
        .node(id)
        .op_as::<EinSum>()
        .map(|e| canonical(&e.axes.to_string()))
}

/// The logits of query rows against the image tokens plus a constant positional encoding, as
/// the split decoder computes them before each attention over the image tokens: an einsum
/// `queries [.., D] · (keys + pe)` (one of the [`LOGITS`] forms).
pub(crate) struct KeysLogits {
    /// The query rows.
    pub(crate) queries: OutletId,
    /// The image tokens, `[B or 1, P, D]`.
    pub(crate) keys: OutletId,
    /// The positional encoding, `[P · D]` values.
    pub(crate) pe: Vec<f32>,
}

/// If einsum node `id` computes [`KeysLogits`] for `p` image tokens: `Ok(Ok(Some))`; `Ok(Ok(None))`
/// if it is some other einsum, `Ok(Err(reason))` if it starts like one but differs.
pub(crate) fn keys_logits(
    model: &TypedModel,
    id: usize,
    p: usize,
) -> TractResult<Result<Option<KeysLogits>, String>> {
    if !einsum_expr(model, id).is_some_and(|e| LOGITS.contains(&e.as_str())) {
        return Ok(Ok(None));
    }
    let node = model.node(id);
    let queries = node.inputs[0];
    let Some(queries_shape) = concrete_shape(model, queries)? else {
        return Ok(Err("queries have a symbolic shape".into()));
    };
    let d = queries_shape.last().copied().unwrap_or(0);
    let Some((pe, keys)) = const_operand::<Add>(model, model.node(node.inputs[1].node))? else {
        return Ok(Err("the logits' keys are not keys + a constant".into()));
    };
    need!(
        pe.datum_type() == f32::datum_type() && pe.shape() == [1, p, d],
        "positional encoding is {:?}, expected [1, {p}, {d}]",
        pe.shape()
    );
    let keys_shape = concrete_shape(model, keys)?;
    need!(
        matches!(keys_shape.as_deref(), Some(&[_, kp, kd]) if kp == p && kd == d),
        "keys are {keys_shape:?}"
    );
    let pe = pe.try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
    Ok(Ok(Some(KeysLogits { queries, keys, pe })))
}

/// Match the chain through the softmax `softmax`: `Ok(None)` if it is some other softmax,
/// `Err(reason)` if it starts like the chain but differs.
fn plan(model: &TypedModel, softmax: usize) -> TractResult<Match<TokenToImageAttention>> {
    let shape_of = |outlet: OutletId| concrete_shape(model, outlet);
    let node = model.node(softmax);
    let op = node.op_as::<Softmax>().context("a softmax")?;
    let Some(shape) = shape_of(node.inputs[0])? else {
        return Ok(Ok(None));
    };
    let rank = shape.len();
    if op.axes.as_slice() != [rank.saturating_sub(1)]
        || op.kind != SoftmaxKind::Softmax
        || op.quant_output_dt.is_some()
        || !(rank == 2 || rank == 3)
    {
        return Ok(Ok(None));
    }
    let batched = rank == 3;
    let (logits, reshapes) = producer_before_axis_ops(model, node.inputs[0]);
    let (r, p) = (shape[rank - 2], shape[rank - 1]);
    let found = match keys_logits(model, logits, p)? {
        Ok(Some(found)) => found,
        Ok(None) => return Ok(Ok(None)),
        Err(why) => return Ok(Err(why)),
    };
    // The weighted sum after the softmax.
    let (after, end) = axis_op_chain(model, softmax);
    let Some(sum) = next_op::<EinSum>(model, end) else {
        return Ok(Ok(None));
    };
    if !einsum_expr(model, sum).is_some_and(|e| WEIGHTED_SUM.contains(&e.as_str())) {
        return Ok(Ok(None));
    }
    need!(
        after.is_empty(),
        "axis ops between the softmax and the product"
    );
    let sum_node = model.node(sum);
    need!(
        sum_node.inputs[0] == OutletId::new(softmax, 0),
        "the softmax is not the product's first operand"
    );
    let batch = if batched { shape[0] } else { 1 };
    for &id in std::iter::once(&logits).chain(&reshapes) {
        need!(
            sole_consumer(model, OutletId::new(id, 0)).is_some(),
            "the logits have other consumers"
        );
    }
    let Some(logits_shape) = shape_of(OutletId::new(logits, 0))? else {
        return Ok(Err("logits have a symbolic shape".into()));
    };
    need!(
        logits_shape.iter().product::<usize>() == batch * r * p
            && keeps_order(model, &reshapes, &logits_shape)?,
        "the axis ops after the logits reorder them"
    );
    let KeysLogits { queries, keys, pe } = found;
    let d = pe.len() / p;
    let queries_shape = shape_of(queries)?.unwrap_or_default();
    need!(
        queries_shape.iter().product::<usize>() == batch * r * d
            && (!batched || queries_shape.first() == Some(&batch)),
        "queries are {queries_shape:?} for {batch} prompts of {r} rows"
    );
    need!(
        sum_node.inputs[1] == keys,
        "the weighted sum is not over the keys the logits saw"
    );
    let keys_shape = shape_of(keys)?;
    need!(
        matches!(keys_shape.as_deref(), Some(&[kb, _, _]) if kb == 1 || kb == batch),
        "keys are {keys_shape:?}"
    );
    need!(
        p.is_multiple_of(TILE) && d > 0,
        "{p} image tokens are not a multiple of {TILE}"
    );
    let want: Vec<usize> = if batched {
        vec![batch, r, d]
    } else {
        vec![r, d]
    };
    need!(
        shape_of(OutletId::new(sum, 0))? == Some(want.clone()),
        "the weighted sum gives {:?}, expected {want:?}",
        shape_of(OutletId::new(sum, 0))?
    );
    Ok(Ok(Some(Plan {
        inputs: vec![queries, keys],
        output: OutletId::new(sum, 0),
        op: TokenToImageAttention {
            rows: r,
            pixels: p,
            dim: d,
            batched,
            key_pe: Arc::new(pe),
        },
    })))
}

#[cfg(test)]
mod tests;
