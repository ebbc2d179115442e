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
//! takes a fixed part of the image tokens and walks it a tile at a time (see `kernel`): keys +
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

use super::gemm::{head_columns, pack_head_columns, PackedWeights};
#[cfg(target_arch = "x86_64")]
use super::gemm::{Avx2, Avx512};
use super::graph::{
    axis_op_chain, canonical, change_ops, concrete_shape, const_operand, keeps_order, next_op,
    producer_before_axis_ops, replace_chains, sole_consumer, Isa, Match, Replacement,
};
use super::w8a16::{W8A16Kernel, W8Weights, PANEL as W8_PANEL};
use kernel::{Part, Scratch, PART, TILE};

/// `softmax_P(q · (keys + pe)ᵀ) · values` for every query row of every head: queries `[T, H, c]`
/// (for a batch of B prompts `[B, T, H, c]`), keys `[B or 1, H, P, c]`, values the keys
/// themselves or an input of their shape → `[T, H, c]` (batched `[B, T, H, c]`). The positional
/// encoding `pe` (`[P, c]`, one head) is a constant of the op, or absent.
///
/// SAM's later blocks have one "head" of the model width (queries `[R, D]`, keys `[B, P, D]`,
/// values = keys, with pe); its first block has 8 heads of 16 over the per-frame tensors (keys and
/// values separate, no pe).
#[derive(Debug, Clone)]
pub struct TokenToImageAttention {
    /// Heads (H).
    pub heads: usize,
    /// Query rows per head and prompt (T).
    pub rows: usize,
    /// Image tokens (P).
    pub pixels: usize,
    /// Width of a head's queries, keys and values (c).
    pub dim: usize,
    /// Whether queries and output have the batch axis.
    pub batched: bool,
    /// Whether the values are an input of their own (else the keys).
    pub separate_values: bool,
    key_pe: Option<Arc<Vec<f32>>>,
    /// When set, both products run in integers on this W8A16 kernel (the INT8 decoder
    /// quantized at load; see `kernel`): the logits with each prompt's query rows at 12 bits
    /// per row ([`QUERY_LEVELS`], quantized once per call) and the image tokens + pe at 12 bits
    /// per token (16 for the first block's 16-wide heads), the weighted sum with the image
    /// tokens at 12 bits per channel and tile ([`VALUE_LEVELS`]) and the softmax weights at 15.
    pub integer: Option<W8A16Kernel>,
}

// tract wants ops `Eq`: the positional encoding compares by its bits.
impl PartialEq for TokenToImageAttention {
    fn eq(&self, other: &TokenToImageAttention) -> bool {
        (
            self.heads,
            self.rows,
            self.pixels,
            self.dim,
            self.batched,
            self.separate_values,
            self.integer,
        ) == (
            other.heads,
            other.rows,
            other.pixels,
            other.dim,
            other.batched,
            other.separate_values,
            other.integer,
        ) && super::same_bits(&self.key_pe, &other.key_pe)
    }
}
impl Eq for TokenToImageAttention {}

impl TokenToImageAttention {
    /// The kernel name reported in kernel tables, e.g. `tinysam_token_to_image_avx512f` (with
    /// the W8A16 kernel's name appended when the products run in integers).
    pub fn kernel_name(&self) -> String {
        match self.integer {
            Some(kernel) => format!("tinysam_token_to_image_{}_{}", Isa::detect(), kernel.name()),
            None => format!("tinysam_token_to_image_{}", Isa::detect()),
        }
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

    /// `[T, H, c]`, batched `[B, T, H, c]`; one head: `[T, c]` (`[B, T, c]`), as the graph has it.
    fn output_shape<D: Clone + From<usize>>(&self, batch: D) -> TVec<D> {
        let mut shape: TVec<D> = if self.batched { tvec![batch] } else { tvec![] };
        shape.push(self.rows.into());
        if self.heads > 1 {
            shape.push(self.heads.into());
        }
        shape.push(self.dim.into());
        shape
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
            "{} head(s) × {} query rows × {} image tokens × {}{}, online softmax, kernel {}{}",
            self.heads,
            self.rows,
            self.pixels,
            self.dim,
            if self.key_pe.is_some() { ", + pe" } else { "" },
            Isa::detect(),
            match self.integer {
                Some(kernel) => format!(", products W8A16 on {}", kernel.name()),
                None => String::new(),
            }
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for TokenToImageAttention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (h, t, p, c) = (self.heads, self.rows, self.pixels, self.dim);
        let mut inputs = inputs.into_iter();
        let mut next = || {
            inputs
                .next()
                .context("TinysamTokenToImageAttention: too few inputs")
        };
        let queries = next()?;
        let keys = next()?;
        let values = if self.separate_values {
            Some(next()?)
        } else {
            None
        };
        let qs = queries.shape();
        let batch = if self.batched {
            qs.first().copied().unwrap_or(0)
        } else {
            1
        };
        let per_prompt = t * h * c;
        ensure!(
            qs.last() == Some(&c) && queries.len() == batch * per_prompt,
            "TinysamTokenToImageAttention: queries {qs:?} do not fit {t} rows × {h} heads of {c}"
        );
        let ks = keys.shape();
        let keys_batch = ks.first().copied().unwrap_or(0);
        ensure!(
            (keys_batch == 1 || keys_batch == batch) && keys.len() == keys_batch * h * p * c,
            "TinysamTokenToImageAttention: keys {ks:?} for {batch} prompts of {h} × [{p}, {c}]"
        );
        if let Some(values) = &values {
            ensure!(
                values.shape() == ks,
                "TinysamTokenToImageAttention: values {:?} and keys {ks:?} differ",
                values.shape()
            );
        }
        let queries_view = queries.try_as_plain_ram()?;
        let queries = queries_view.as_slice::<f32>()?;
        let keys_view = keys.try_as_plain_ram()?;
        let keys = keys_view.as_slice::<f32>()?;
        let values_view = values.as_ref().map(|v| v.try_as_plain_ram()).transpose()?;
        let values = match &values_view {
            Some(v) => v.as_slice::<f32>()?,
            None => keys,
        };
        // The query rows of one group of prompts that see the same keys as the columns of each
        // head's logits product: the whole batch when the keys are shared (SAM's first block,
        // per frame: one wide product instead of a narrow one per prompt; each row's values
        // are the same), else each prompt.
        let prompts_per_group = if keys_batch == 1 { batch.max(1) } else { 1 };
        let groups = batch / prompts_per_group;
        let r = prompts_per_group * t;
        let packed: Vec<PackedWeights> = queries
            .chunks_exact(prompts_per_group * per_prompt)
            .flat_map(|q| (0..h).map(move |head| pack_head_columns(q, h, head, c)))
            .collect::<Option<_>>()
            .context("query rows")?;
        // The same query rows at 12 bits per row for the integer products.
        let quantized: Vec<W8Weights> = match self.integer {
            Some(_) => queries
                .chunks_exact(prompts_per_group * per_prompt)
                .flat_map(|q| (0..h).map(move |head| quantize_head_columns(q, h, head, c)))
                .collect::<Option<_>>()
                .context("query rows")?,
            None => Vec::new(),
        };
        let parts = p.div_ceil(PART);
        let len = kernel::state_len(r, c).context("state size")?;
        let mut states = vec![0f32; groups * h * parts * len];
        let isa = Isa::detect();
        let work = batch * h * t * p * c;
        tract_linalg::multithread::par_chunks_mut(&mut states, len, work, |first, chunk| {
            let mut scratch = Scratch::new(r, c).context("scratch")?;
            for (i, state) in chunk.chunks_exact_mut(len).enumerate() {
                let unit = first + i;
                let (group_head, part) = (unit / parts, unit % parts);
                let (g, head) = (group_head / h, group_head % h);
                let kb = if keys_batch == 1 { 0 } else { g };
                let start = part * PART;
                let end = (start + PART).min(p);
                let at = ((kb * h + head) * p + start) * c..((kb * h + head) * p + end) * c;
                let job = Part {
                    queries: packed.get(group_head).context("query rows")?,
                    keys: keys.get(at.clone()).context("keys")?,
                    key_pe: match &self.key_pe {
                        Some(pe) => Some(pe.get(start * c..end * c).context("pe")?),
                        None => None,
                    },
                    values: values.get(at).context("values")?,
                    integer: match self.integer {
                        Some(kernel) => {
                            Some((kernel, quantized.get(group_head).context("query rows")?))
                        }
                        None => None,
                    },
                };
                self.part(isa, &job, state, &mut scratch)
                    .context("TinysamTokenToImageAttention: part sizes")?;
            }
            Ok(())
        })?;
        let mut out = Tensor::zero::<f32>(&self.output_shape(batch))?;
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let data = view.as_slice_mut::<f32>()?;
            let mut head_out = vec![0f32; r * c];
            for (group_head, states) in states.chunks_exact(parts * len).enumerate() {
                let (g, head) = (group_head / h, group_head % h);
                kernel::finish(states, r, c, &mut head_out).context("finishing the softmax")?;
                // The group's rows are its prompts' T rows one prompt after another, as the
                // output has them.
                let group = &mut data[g * r * h * c..(g + 1) * r * h * c];
                for (dst, src) in group.chunks_exact_mut(h * c).zip(head_out.chunks_exact(c)) {
                    dst[head * c..(head + 1) * c].copy_from_slice(src);
                }
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
        Ok(tvec!(f32::fact(
            self.output_shape(self.batch_of(inputs[0]))
        )))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        // Two products of R × P × D; in integers they accumulate in i32.
        let accumulator = match self.integer {
            Some(_) => i32::datum_type(),
            None => f32::datum_type(),
        };
        Ok(tvec!((
            Cost::FMA(accumulator),
            self.batch_of(inputs[0]) * (2 * self.heads * self.rows * self.pixels * self.dim)
        )))
    }

    as_op!();
}

// The einsum forms, canonical (`graph::canonical`), for a batch of one as tract declutters it
// and batched: the logits (`bmk,ank->bmn`, `abmk,ank->abmn`) and the weighted sum
// (`mk,akn->mn`, `amk,akn->amn`).
const LOGITS: [&str; 2] = ["abc,dec->abe", "abcd,aed->abce"];
const WEIGHTED_SUM: [&str; 2] = ["ab,cbd->ad", "abc,acd->abd"];
// The first block's per-head forms, for one prompt and batched: logits `mbk,abnk->bmn`
// (`pmbk,abnk->pbmn`), weighted sum `bmk,abkn->mbn` (`pbmk,abkn->pmbn`; the per-frame keys' and
// values' leading 1 shares the batch's label).
pub(crate) const HEAD_LOGITS: [&str; 2] = ["abc,dbec->bae", "abcd,aced->acbe"];
const HEAD_SUM: [&str; 2] = ["abc,dace->bae", "abcd,abde->acbe"];

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

/// The largest quantized magnitude of a query row (12 bits) in the integer logits. Both
/// products multiply two operands that change per prompt (no constant that 8 bits represent
/// well), and logit errors grow through the softmax's exponential: with both at 8 bits the op's
/// output moved by up to 0.4 % of its scale on sharp logits
/// (`tests::fused_attention_matches_its_definition`). The kernels hold the weight side as i16
/// whatever its range, so wider costs no speed, only activation bits: with 12-bit query rows an
/// i32 sum over 256 depths leaves the keys 12 bits.
pub const QUERY_LEVELS: i16 = 2047;

/// [`pack_head_columns`]' matrix (head `head`'s query rows of `q` as the `c × T` columns of a
/// logits product) quantized at [`QUERY_LEVELS`] per query row, for the integer logits.
pub(crate) fn quantize_head_columns(
    q: &[f32],
    heads: usize,
    head: usize,
    c: usize,
) -> Option<W8Weights> {
    let (columns, t) = head_columns(q, heads, head, c)?;
    W8Weights::quantize_levels(&columns, c, t, QUERY_LEVELS)
}

/// The largest quantized magnitude of a tile's values (12 bits, per channel) in the integer
/// weighted sum; over a tile's 64 image tokens that leaves the softmax weights 15 bits.
pub const VALUE_LEVELS: i16 = 2047;

/// Run the [`TokenToImageAttention`]s of `model` whose heads fill whole panels of the W8A16
/// kernels (SAM's later blocks: one head of 256) with their products in integers on `kernel`
/// (the INT8 decoder quantized at load); returns how many. The first block's heads of 16 stay
/// f32: half a panel wide, they ran slower in integers (`tests::token_to_image_op_speed`,
/// AVX-512 + VNNI, 1 thread: 1.48 against 0.95 ms).
pub fn token_to_image_in_integers(
    model: &mut TypedModel,
    kernel: W8A16Kernel,
) -> TractResult<usize> {
    Ok(change_ops(model, |op: &TokenToImageAttention| {
        op.dim
            .is_multiple_of(W8_PANEL)
            .then(|| TokenToImageAttention {
                integer: Some(kernel),
                ..op.clone()
            })
    }))
}

/// A matched chain.
type Plan = Replacement<TokenToImageAttention>;

/// The canonical expression of einsum node `id`.
pub(crate) fn einsum_expr(model: &TypedModel, id: usize) -> Option<String> {
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

/// The weighted sum after the softmax `softmax`: an einsum of one of `forms` taking the
/// softmax's output as its first operand, with no axis ops between. `Ok(Some(node))`, `Ok(None)`
/// if the softmax feeds no such product, `Err(reason)` if it does in another way.
fn weighted_sum_after(
    model: &TypedModel,
    softmax: usize,
    forms: &[&str],
) -> Result<Option<usize>, String> {
    let (after, end) = axis_op_chain(model, softmax);
    let Some(sum) = next_op::<EinSum>(model, end) else {
        return Ok(None);
    };
    if !einsum_expr(model, sum).is_some_and(|e| forms.contains(&e.as_str())) {
        return Ok(None);
    }
    if !after.is_empty() {
        return Err("axis ops between the softmax and the product".into());
    }
    if model.node(sum).inputs[0] != OutletId::new(softmax, 0) {
        return Err("the softmax is not the product's first operand".into());
    }
    Ok(Some(sum))
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
        || !(2..=4).contains(&rank)
    {
        return Ok(Ok(None));
    }
    let (logits, reshapes) = producer_before_axis_ops(model, node.inputs[0]);
    // The first block's per-head form: rank 3 for one prompt, 4 for a batch.
    let head_form = rank
        .checked_sub(3)
        .and_then(|i| HEAD_LOGITS.get(i))
        .copied();
    if reshapes.is_empty()
        && head_form.is_some()
        && einsum_expr(model, logits).as_deref() == head_form
    {
        return plan_per_head(model, softmax, logits, &shape);
    }
    if rank == 4 {
        return Ok(Ok(None));
    }
    let batched = rank == 3;
    let (r, p) = (shape[rank - 2], shape[rank - 1]);
    let found = match keys_logits(model, logits, p)? {
        Ok(Some(found)) => found,
        Ok(None) => return Ok(Ok(None)),
        Err(why) => return Ok(Err(why)),
    };
    let sum = match weighted_sum_after(model, softmax, &WEIGHTED_SUM) {
        Ok(Some(sum)) => sum,
        Ok(None) => return Ok(Ok(None)),
        Err(why) => return Ok(Err(why)),
    };
    let sum_node = model.node(sum);
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
            heads: 1,
            rows: r,
            pixels: p,
            dim: d,
            batched,
            separate_values: false,
            key_pe: Some(Arc::new(pe)),
            integer: None,
        },
    })))
}

/// The first block's per-head form: logits `[H, T, P]` of queries `[T, H, c]` against the
/// per-frame keys `[1, H, P, c]` (einsum `mbk,abnk->bmn`), the softmax `softmax`, and the
/// weighted sum of the per-frame values `[1, H, P, c]` (`bmk,abkn->mbn`); for a batch of B
/// prompts the same with a leading `B` on logits, queries and the sum (the [`HEAD_LOGITS`] and
/// [`HEAD_SUM`] forms; the caller has matched the logits' form to their rank).
fn plan_per_head(
    model: &TypedModel,
    softmax: usize,
    logits: usize,
    shape: &[usize],
) -> TractResult<Match<TokenToImageAttention>> {
    let shape_of = |outlet: OutletId| concrete_shape(model, outlet);
    let (lead, [h, t, p]): (&[usize], [usize; 3]) = match *shape {
        [h, t, p] => (&[], [h, t, p]),
        [_, h, t, p] => (&shape[..1], [h, t, p]),
        _ => return Ok(Err(format!("per-head logits are {shape:?}"))),
    };
    let batched = !lead.is_empty();
    let sum = match weighted_sum_after(model, softmax, &[HEAD_SUM[usize::from(batched)]]) {
        Ok(Some(sum)) => sum,
        Ok(None) => return Ok(Ok(None)),
        Err(why) => return Ok(Err(why)),
    };
    let sum_node = model.node(sum);
    need!(
        sole_consumer(model, OutletId::new(logits, 0)).is_some(),
        "the logits have other consumers"
    );
    let logits_node = model.node(logits);
    let (queries, keys, values) = (
        logits_node.inputs[0],
        logits_node.inputs[1],
        sum_node.inputs[1],
    );
    let queries_shape = shape_of(queries)?.unwrap_or_default();
    let c = queries_shape.last().copied().unwrap_or(0);
    let with_lead = |tail: [usize; 3]| [lead, &tail].concat();
    need!(
        queries_shape == with_lead([t, h, c]) && c > 0,
        "queries are {queries_shape:?}, expected {lead:?} + [{t}, {h}, c]"
    );
    let want = Some(vec![1, h, p, c]);
    need!(
        shape_of(keys)? == want && shape_of(values)? == want,
        "keys {:?} and values {:?}, expected {want:?}",
        shape_of(keys)?,
        shape_of(values)?
    );
    need!(
        p.is_multiple_of(TILE),
        "{p} image tokens are not a multiple of {TILE}"
    );
    need!(
        shape_of(OutletId::new(sum, 0))? == Some(with_lead([t, h, c])),
        "the weighted sum gives {:?}",
        shape_of(OutletId::new(sum, 0))?
    );
    Ok(Ok(Some(Plan {
        inputs: vec![queries, keys, values],
        output: OutletId::new(sum, 0),
        op: TokenToImageAttention {
            heads: h,
            rows: t,
            pixels: p,
            dim: c,
            batched,
            separate_values: true,
            key_pe: None,
            integer: None,
        },
    })))
}

#[cfg(test)]
mod tests;
