//! Prompt encoder + mask decoder: a batch of prompts against one embedding.
//!
//! The graph has a dynamic prompt batch `B` and point count `N`. tract optimises best with
//! concrete shapes, so a plan is built per (B, N) and cached. The split form runs one prompt at
//! a time (B = 1); the one graph runs batches padded up to one of [`ONE_GRAPH_BATCHES`].
//! [`Decoder::prepare_plans`] builds the plans of the usual prompts ahead (the daemon does so
//! at start, so that no plan is optimised while a client waits); others are built on first use.
//!
//! The split form runs the mask graph's first product in low rank
//! (`ops::mask_upscaling::low_rank`): the per-prompt plans also give the transformer's
//! coefficients and projected token values, the per-frame tensors gain the upscaling's base,
//! and the mask plans take those instead of the image tokens.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use tract_onnx::prelude::*;

use super::encoder::Embedding;
use super::manifest::{Manifest, Precision, Role};
use super::ops::mask_upscaling::low_rank::{self, LowRankSource};
use super::ops::MaskUpscaling;
use super::{parse_onnx, stage_name};
use crate::{Error, Result};

/// The per-prompt graph's own outputs: image tokens, mask weights, IoU (the low-rank form's
/// follow).
const PROMPT_OUTPUTS: usize = 3;

/// Largest chunk of a batch the per-prompt graph runs at once, on one thread (see
/// [`split_chunk_size`]: a batch is first spread over the threads, one prompt each, and only
/// then grouped). Four: their token-side products share a pass over the weights, and since the
/// allocator keeps freed memory (`crate::allocator`) the larger image-side tensors cost no page
/// faults; a prompt at batch 64 takes 22.3-23.4 ms in chunks of 4 against 24.0-25.0 ms alone at
/// one thread, 11.8-12.7 against 12.0-13.9 ms at two (`docs/performance.md`, 2026-12-05).
/// Before that change chunks were no faster than single prompts (15.1 against 16.0 ms on
/// 12-02, not faster in alternating runs on 12-04 and 12-05).
pub const SPLIT_CHUNK: usize = 4;

/// Prompts per chunk for a batch of `batch` prompts on `threads` threads: up to
/// [`SPLIT_CHUNK`], but never so many that a thread would have no chunk (a batch of two on two
/// threads runs as two single prompts side by side, as the daemon's request batches do).
pub fn split_chunk_size(batch: usize, threads: usize) -> usize {
    SPLIT_CHUNK.min(batch.div_ceil(threads.max(1))).max(1)
}

/// Plans kept before the least recently built is dropped (not counting those
/// [`Decoder::prepare_plans`] built, which stay).
const MAX_CACHED_PLANS: usize = 8;

/// The batch sizes the one-graph decoder's plans are built for: a batch runs in chunks of the
/// largest, the last chunk padded (with copies of its last prompt, whose rows are then dropped:
/// prompts of a batch do not see each other, so this is exact) up to the smallest size that
/// holds it. Four plans serve every batch size.
pub const ONE_GRAPH_BATCHES: [usize; 4] = [1, 4, 16, 64];

/// A batch of B prompts with N points each, in model-input coordinates.
#[derive(Debug, Clone)]
pub struct DecoderInput {
    /// Points per prompt (N).
    pub points_per_prompt: usize,
    /// B*N (x, y) pairs in model-input pixels.
    pub coords: Vec<[f32; 2]>,
    /// B*N labels: 1 fg, 0 bg, 2/3 box corners, -1 padding.
    pub labels: Vec<f32>,
    /// Low-res mask logits (m*m) shared by the batch, from an earlier prediction.
    pub mask_input: Option<Vec<f32>>,
}

impl DecoderInput {
    /// Number of prompts in the batch (B).
    pub fn batch(&self) -> usize {
        self.labels
            .len()
            .checked_div(self.points_per_prompt)
            .unwrap_or(0)
    }

    /// Whether the coordinates and labels hold `points_per_prompt` points for every prompt.
    fn well_formed(&self) -> bool {
        let points = self.batch() * self.points_per_prompt;
        self.coords.len() == points && self.labels.len() == points
    }

    /// Chunk `c` of the batch cut into chunks of `size` prompts, as the split form runs it: the
    /// chunk's prompts (indices in this batch) and the chunk as a batch of its own, with the same
    /// mask input. Panics if the batch is not well formed or has no chunk `c`.
    fn split_chunk(&self, c: usize, size: usize) -> (std::ops::Range<usize>, DecoderInput) {
        let n = self.points_per_prompt;
        let first = c * size;
        let end = (first + size).min(self.batch());
        let chunk = DecoderInput {
            points_per_prompt: n,
            coords: self.coords[first * n..end * n].to_vec(),
            labels: self.labels[first * n..end * n].to_vec(),
            mask_input: self.mask_input.clone(),
        };
        (first..end, chunk)
    }
}

/// Decoder output for a batch: (B, K, m, m) logits and (B, K) predicted IoU.
#[derive(Debug, Clone)]
pub struct MaskLogits {
    /// Mask logits, row-major (B, K, m, m).
    pub masks: Arc<Tensor>,
    /// Predicted IoU, (B, K).
    pub iou: Arc<Tensor>,
    /// K, masks per prompt.
    pub masks_per_prompt: usize,
    /// m, side of the low-res masks.
    pub size: usize,
}

impl MaskLogits {
    /// Logits of mask `k` of prompt `b`, m*m row-major.
    pub fn mask(&self, b: usize, k: usize) -> &[f32] {
        let m2 = self.size * self.size;
        let start = (b * self.masks_per_prompt + k) * m2;
        f32_slice(&self.masks).get(start..start + m2).unwrap_or(&[])
    }

    /// Predicted IoU of mask `k` of prompt `b`.
    pub fn iou(&self, b: usize, k: usize) -> f32 {
        f32_slice(&self.iou)
            .get(b * self.masks_per_prompt + k)
            .copied()
            .unwrap_or(0.0)
    }

    /// Number of prompts (B).
    pub fn batch(&self) -> usize {
        self.iou.shape().first().copied().unwrap_or(0)
    }
}

/// The f32 contents of a plain tensor (empty for anything else: callers check shapes first).
pub(crate) fn f32_slice(t: &Tensor) -> &[f32] {
    t.as_plain_ram()
        .and_then(|v| v.as_slice::<f32>().ok())
        .unwrap_or(&[])
}

#[derive(Default)]
struct PlanCache {
    plans: HashMap<(usize, usize), Arc<TypedRunnableModel>>,
    /// The keys that may be dropped, least recently built first (kept plans are not here).
    order: VecDeque<(usize, usize)>,
    /// Plans built so far (for the tests of what is built when).
    built: usize,
}

/// Whether a plan stays in the cache whatever else is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    Always,
    WhileRecent,
}

impl PlanCache {
    /// The cache behind `cache`; a panic while holding the lock leaves a consistent map, so a
    /// poisoned lock is used as it is.
    fn locked(cache: &Mutex<PlanCache>) -> std::sync::MutexGuard<'_, PlanCache> {
        cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The plan under `key`, built by `build` on first use; the least recently built beyond
    /// [`MAX_CACHED_PLANS`] is dropped, unless it was built to be kept always (a plan built on
    /// first use and asked for again with `Keep::Always` becomes one).
    fn get_or_build(
        cache: &Mutex<PlanCache>,
        key: (usize, usize),
        keep: Keep,
        build: impl FnOnce() -> Result<Arc<TypedRunnableModel>>,
    ) -> Result<Arc<TypedRunnableModel>> {
        let lock = || PlanCache::locked(cache);
        {
            let mut cache = lock();
            if let Some(p) = cache.plans.get(&key).cloned() {
                if keep == Keep::Always {
                    cache.order.retain(|k| *k != key);
                }
                return Ok(p);
            }
        }
        let plan = build()?;
        let mut cache = lock();
        cache.built = cache.built.saturating_add(1);
        cache.plans.insert(key, plan.clone());
        if keep == Keep::WhileRecent {
            cache.order.push_back(key);
        }
        while cache.order.len() > MAX_CACHED_PLANS {
            if let Some(old) = cache.order.pop_front() {
                cache.plans.remove(&old);
            }
        }
        Ok(plan)
    }
}

/// Which graphs run the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderForm {
    /// The one-graph decoder: every prompt batch redoes the image-side work.
    OneGraph,
    /// The per-frame graph once per embedding (and mask input), the per-prompt graph per batch.
    Split,
}

impl std::fmt::Display for DecoderForm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DecoderForm::OneGraph => "one graph",
            DecoderForm::Split => "per-frame + per-prompt",
        })
    }
}

/// The parsed graphs; plans per batch shape are built from `prompts`.
enum Graphs {
    /// `prompts` is the whole decoder.
    One,
    /// `frame` computes the prompt-independent tensors that `prompts` takes first; `prompts`
    /// gives each prompt's image tokens, mask weights and IoU predictions, and `masks` turns the
    /// first two into mask logits.
    Split {
        frame: Arc<TypedRunnableModel>,
        /// Concrete shapes of `frame`'s outputs, the first inputs of `prompts`.
        frame_shapes: Vec<Vec<usize>>,
        masks: Box<InferenceModel>,
        /// The mask graph's file, for its errors.
        masks_path: PathBuf,
        /// Whether the graphs are FP32 files loaded as the INT8 decoder: their constant-weight
        /// products quantized at load (see [`Manifest::has_decoder_quantized_at_load`]).
        quantized_at_load: bool,
    },
}

/// The per-frame decoder tensors of one embedding (and mask input): the inputs of the
/// per-prompt graph, then (low-rank form) the mask upscaling's base. Computed once per embedding
/// without mask input and kept with it.
pub struct FrameTensors(Vec<Arc<Tensor>>);

/// A batch's plan, its inputs and (split form) the per-frame tensors they came from.
type BatchInputs = (
    Arc<TypedRunnableModel>,
    TVec<TValue>,
    Option<Arc<FrameTensors>>,
);

/// The split form's mask upscaling in low rank, once the first plans found it.
struct LowRank {
    /// What the per-prompt plans expose.
    source: LowRankSource,
    /// The mask plans' op, which computes the per-frame base.
    upscaling: MaskUpscaling,
}

/// The decoder, parsed once, with optimised plans per batch shape.
pub struct Decoder {
    /// The graph run per prompt batch: the whole decoder, or its per-prompt half.
    prompts: InferenceModel,
    graphs: Graphs,
    cache: Mutex<PlanCache>,
    /// Plans of the split form's mask graph, by batch (`(batch, 0)` keys).
    mask_plans: Mutex<PlanCache>,
    /// The ONNX file run per prompt batch.
    pub path: PathBuf,
    /// Its precision.
    pub precision: Precision,
    int8: super::Int8Matmul,
    embedding_shape: [usize; 4],
    mask_size: usize,
    masks_per_prompt: usize,
    /// Whether the split form may run the mask upscaling in low rank.
    low_rank_wanted: bool,
    /// What the first per-prompt plan exposed for the low-rank form (`None`: not found, or not
    /// wanted); every later plan must expose the same.
    low_rank_source: OnceLock<Option<LowRankSource>>,
    /// The low-rank form, once the first mask plan is built in it.
    low_rank: OnceLock<Option<Arc<LowRank>>>,
}

impl Decoder {
    /// Parse the decoder of `manifest` at `precision` and build the single-prompt plan. With
    /// [`DecoderGraph::Auto`](super::DecoderGraph) the per-frame + per-prompt pair is used when
    /// the directory has both at `precision`.
    pub fn load(
        dir: &Path,
        manifest: &Manifest,
        precision: Precision,
        int8: super::Int8Matmul,
        graph: super::DecoderGraph,
    ) -> Result<Decoder> {
        let e = manifest.config.embedding_size();
        let embedding_shape = [1, manifest.config.prompt_embed_dim, e, e];
        let mask_size = manifest.config.low_res_mask_size();
        let loadable = |role| manifest.loadable(role, precision);
        let split = graph != super::DecoderGraph::OneGraph
            && loadable(Role::DecoderFrame).is_some()
            && loadable(Role::DecoderPrompt).is_some()
            && loadable(Role::DecoderMasks).is_some();
        let (path, prompts, graphs) = if split {
            let (frame_path, frame) = parse_onnx(dir, manifest, Role::DecoderFrame, precision)?;
            let frame = frame_plan(frame, &frame_path, embedding_shape, mask_size, int8)?;
            let frame_shapes = frame_output_shapes(&frame, &frame_path)?;
            let (path, prompts) = parse_onnx(dir, manifest, Role::DecoderPrompt, precision)?;
            let (masks_path, masks) = parse_onnx(dir, manifest, Role::DecoderMasks, precision)?;
            let graphs = Graphs::Split {
                frame,
                frame_shapes,
                masks: Box::new(masks),
                masks_path,
                quantized_at_load: loadable(Role::DecoderMasks).is_some_and(|(_, q)| q),
            };
            (path, prompts, graphs)
        } else {
            let (path, prompts) = parse_onnx(dir, manifest, Role::Decoder, precision)?;
            (path, prompts, Graphs::One)
        };
        let decoder = Decoder {
            prompts,
            graphs,
            cache: Mutex::new(PlanCache::default()),
            mask_plans: Mutex::new(PlanCache::default()),
            path,
            precision,
            int8,
            embedding_shape,
            mask_size,
            masks_per_prompt: manifest.config.num_multimask_outputs,
            low_rank_wanted: graph == super::DecoderGraph::Auto,
            low_rank_source: OnceLock::new(),
            low_rank: OnceLock::new(),
        };
        // Fail at load, not at the first prompt, if the graph does not fit the manifest; the
        // first mask plan decides the low-rank form before any per-frame tensors are computed.
        let plan = decoder.plan(1, 2)?;
        if let Graphs::Split {
            masks, masks_path, ..
        } = &decoder.graphs
        {
            let shapes = decoder.output_shapes(&plan)?;
            decoder.mask_plan_kept((masks, masks_path), &shapes, Keep::WhileRecent)?;
            match decoder.low_rank() {
                Some(l) => log::info!(
                    "decoder: mask upscaling's first product in low rank ({} rows per prompt)",
                    l.source.weights.0 + l.source.weights.1 + 4
                ),
                None => log::info!("decoder: mask upscaling at full rank"),
            }
        }
        Ok(decoder)
    }

    /// The low-rank form of the split decoder, if it runs in it.
    fn low_rank(&self) -> Option<&Arc<LowRank>> {
        self.low_rank.get().and_then(Option::as_ref)
    }

    /// Whether the split form runs the mask upscaling's first product in low rank (see
    /// `ops::mask_upscaling::low_rank`).
    pub fn low_rank_upscaling(&self) -> bool {
        self.low_rank().is_some()
    }

    /// Which graphs run prompts.
    pub fn form(&self) -> DecoderForm {
        match self.graphs {
            Graphs::One => DecoderForm::OneGraph,
            Graphs::Split { .. } => DecoderForm::Split,
        }
    }

    /// Whether this is the INT8 decoder quantized at load: the FP32 split graphs with their
    /// largest products in integers on the W8A16 kernels (x86_64: the mask upscaling's second
    /// transposed convolution, the image->token weighted sums and the later token->image
    /// attentions' two products; see [`Manifest::has_decoder_quantized_at_load`]).
    pub fn quantized_at_load(&self) -> bool {
        matches!(
            self.graphs,
            Graphs::Split {
                quantized_at_load: true,
                ..
            }
        )
    }

    /// The smallest prompt batch that keeps `threads` inference threads busy without padding:
    /// the split form decodes one prompt per thread whatever the batch; the one graph pads a
    /// batch up to one of [`ONE_GRAPH_BATCHES`], so a smaller batch would cost the padded one.
    /// (The daemon's everything passes run in chunks of this size.)
    pub fn unpadded_batch(&self, threads: usize) -> usize {
        let threads = threads.max(1);
        match self.form() {
            DecoderForm::Split => threads,
            DecoderForm::OneGraph => ONE_GRAPH_BATCHES
                .into_iter()
                .find(|&s| s >= threads)
                .unwrap_or(threads),
        }
    }

    /// Side of the low-res mask logits.
    pub fn mask_size(&self) -> usize {
        self.mask_size
    }

    /// The runnable plan run per batch of B prompts of N points (the whole decoder, or its
    /// per-prompt half), built on first use (also for kernel reports).
    pub fn plan(&self, batch: usize, points: usize) -> Result<Arc<TypedRunnableModel>> {
        PlanCache::get_or_build(&self.cache, (batch, points), Keep::WhileRecent, || {
            self.build_plan(batch, points)
        })
    }

    /// Build (and keep for good) every plan that a prompt of up to `max_points` points, with or
    /// without a box, needs, and those of segment-everything's batches: after this, such prompts
    /// never wait for a plan to be optimised (~0.2 s each on the default model on x86, longer on
    /// a Pi). Point counts above it are built on first use, as before.
    pub fn prepare_plans(&self, max_points: usize) -> Result<()> {
        // A prompt of p points without a box gets one padding point, with a box two corners.
        let counts = 2..=max_points.saturating_add(2);
        let mut one_point = None;
        for n in counts {
            let plan = PlanCache::get_or_build(&self.cache, (1, n), Keep::Always, || {
                self.build_plan(1, n)
            })?;
            one_point.get_or_insert(plan);
        }
        match &self.graphs {
            // Every point count gives the mask graph inputs of the same shapes.
            Graphs::Split {
                masks, masks_path, ..
            } => {
                if let Some(plan) = one_point {
                    let shapes = self.output_shapes(&plan)?;
                    self.mask_plan_kept((masks, masks_path), &shapes, Keep::Always)?;
                }
            }
            // Segment-everything: one point (and its padding) per prompt, every batch size.
            Graphs::One => {
                for b in ONE_GRAPH_BATCHES {
                    PlanCache::get_or_build(&self.cache, (b, 2), Keep::Always, || {
                        self.build_plan(b, 2)
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Plans built so far, of every graph (for tests of what is built when).
    pub fn plans_built(&self) -> usize {
        let built = |cache| PlanCache::locked(cache).built;
        built(&self.cache).saturating_add(built(&self.mask_plans))
    }

    /// Every plan a batch of B prompts of N points runs, for kernel reports: the one above, and
    /// for the split form the mask plan after it (the per-frame plan, once per frame, is not
    /// counted), each with the values of its symbols at that batch (the low-rank mask plan
    /// serves every point count: its coefficient and value widths are symbols).
    pub fn prompt_plans(
        &self,
        batch: usize,
        points: usize,
    ) -> Result<Vec<(Arc<TypedRunnableModel>, SymbolValues)>> {
        let plan = self.plan(batch, points)?;
        let mut plans = vec![(plan.clone(), SymbolValues::default())];
        if let Graphs::Split {
            masks, masks_path, ..
        } = &self.graphs
        {
            let shapes = self.output_shapes(&plan)?;
            let mask_plan = self.mask_plan((masks, masks_path), &shapes)?;
            // The mask plan's inputs after the first take the per-prompt outputs after the
            // first PROMPT_OUTPUTS (see `mask_plan_inputs`): their symbols get those sizes.
            let mut values = SymbolValues::default();
            if self.low_rank().is_some() {
                let model = mask_plan.model();
                let extra = shapes.get(PROMPT_OUTPUTS..).unwrap_or_default();
                for (outlet, shape) in model.inputs.iter().skip(1).zip(extra) {
                    let fact = model.outlet_fact(*outlet).map_err(infer_err)?;
                    for (dim, &n) in fact.shape.iter().zip(shape) {
                        if let (TDim::Sym(symbol), Ok(n)) = (dim, i64::try_from(n)) {
                            values = values.with(symbol, n);
                        }
                    }
                }
            }
            plans.push((mask_plan, values));
        }
        Ok(plans)
    }

    /// The concrete shapes of a per-prompt plan's outputs.
    fn output_shapes(&self, plan: &TypedRunnableModel) -> Result<Vec<Vec<usize>>> {
        let count = plan.model().outputs.len();
        (0..count)
            .map(|ix| {
                plan.model()
                    .output_fact(ix)
                    .ok()
                    .and_then(|f| f.shape.as_concrete().map(<[usize]>::to_vec))
                    .ok_or_else(|| Error::ModelMismatch {
                        path: self.path.clone(),
                        reason: format!("per-prompt output {ix} has no concrete shape"),
                    })
            })
            .collect()
    }

    /// The split form's mask plan for per-prompt outputs of these shapes (image tokens, mask
    /// weights, IoU, then in the low-rank form the coefficients and values).
    fn mask_plan(
        &self,
        graph: (&InferenceModel, &Path),
        prompt_outputs: &[Vec<usize>],
    ) -> Result<Arc<TypedRunnableModel>> {
        self.mask_plan_kept(graph, prompt_outputs, Keep::WhileRecent)
    }

    fn mask_plan_kept(
        &self,
        (masks, path): (&InferenceModel, &Path),
        prompt_outputs: &[Vec<usize>],
        keep: Keep,
    ) -> Result<Arc<TypedRunnableModel>> {
        let (Some(tokens), Some(weights)) = (prompt_outputs.first(), prompt_outputs.get(1)) else {
            return Err(Error::ModelMismatch {
                path: self.path.clone(),
                reason: format!("per-prompt graph has {} outputs", prompt_outputs.len()),
            });
        };
        let batch = tokens.first().copied().unwrap_or(0);
        PlanCache::get_or_build(&self.mask_plans, (batch, 0), keep, || {
            let load_err = |source| Error::ModelLoad {
                stage: stage_name(Role::DecoderMasks),
                path: path.to_path_buf(),
                source,
            };
            let mut model = masks.clone();
            model
                .set_input_fact(0, f32::fact(tokens).into())
                .map_err(load_err)?;
            model
                .set_input_fact(1, f32::fact(weights).into())
                .map_err(load_err)?;
            let mut typed = super::optimize(
                model,
                Role::DecoderMasks,
                path,
                self.int8,
                // The INT8 decoder's mask upscaling runs its constant-weight product as W8A16
                // where the int8 products have a kernel for it (x86_64), as the INT8 encoder's
                // float convolution blocks do.
                if self.quantized_at_load() {
                    super::ConvBlocks::Auto
                } else {
                    super::ConvBlocks::F32
                },
            )?;
            if let Some(model) = self.low_rank_masks(&typed, prompt_outputs, path)? {
                typed = model;
            }
            let m = self.mask_size;
            let want = [batch, self.masks_per_prompt, m, m];
            let fact = typed.output_fact(0).map_err(load_err)?;
            if fact.shape.as_concrete() != Some(&want[..]) {
                return Err(Error::ModelMismatch {
                    path: path.to_path_buf(),
                    reason: format!("mask graph output is {:?}, expected {want:?}", fact.shape),
                });
            }
            super::unpanic(|| typed.into_runnable()).map_err(load_err)
        })
    }

    /// The optimised mask graph `typed` in the low-rank form that takes the low-rank outputs of
    /// a per-prompt plan (shapes `prompt_outputs`), or `None` for the full-rank form. The first
    /// mask plan decides which (`Self::low_rank`); later ones must follow it.
    fn low_rank_masks(
        &self,
        typed: &TypedModel,
        prompt_outputs: &[Vec<usize>],
        path: &Path,
    ) -> Result<Option<TypedModel>> {
        let Some(Some(source)) = self.low_rank_source.get() else {
            self.low_rank.get_or_init(|| None);
            return Ok(None);
        };
        if let Some(None) = self.low_rank.get() {
            return Ok(None);
        }
        let load_err = |source| Error::ModelLoad {
            stage: stage_name(Role::DecoderMasks),
            path: path.to_path_buf(),
            source,
        };
        let mismatch = |reason: String| Error::ModelMismatch {
            path: path.to_path_buf(),
            reason,
        };
        let extra: [Vec<usize>; low_rank::EXTRA_OUTPUTS] = prompt_outputs
            .get(PROMPT_OUTPUTS..)
            .and_then(|e| e.to_vec().try_into().ok())
            .ok_or_else(|| {
                mismatch(format!(
                    "per-prompt plan has {} outputs, expected {}",
                    prompt_outputs.len(),
                    PROMPT_OUTPUTS + low_rank::EXTRA_OUTPUTS
                ))
            })?;
        let model = match low_rank::low_rank_mask_model(typed, source, &extra).map_err(load_err)? {
            Ok(model) => model,
            Err(why) if self.low_rank.get().is_none() => {
                log::debug!("mask upscaling at full rank: {why}");
                self.low_rank.get_or_init(|| None);
                return Ok(None);
            }
            Err(why) => return Err(mismatch(format!("mask graph not in low-rank form: {why}"))),
        };
        let upscaling = model
            .nodes()
            .iter()
            .find_map(|n| n.op_as::<MaskUpscaling>())
            .cloned()
            .ok_or_else(|| mismatch("no low-rank upscaling op".into()))?;
        let decided = self.low_rank.get_or_init(|| {
            Some(Arc::new(LowRank {
                source: source.clone(),
                upscaling,
            }))
        });
        Ok(decided.is_some().then_some(model))
    }

    fn build_plan(&self, batch: usize, points: usize) -> Result<Arc<TypedRunnableModel>> {
        let role = match self.graphs {
            Graphs::One => Role::Decoder,
            Graphs::Split { .. } => Role::DecoderPrompt,
        };
        let load_err = |source| Error::ModelLoad {
            stage: stage_name(role),
            path: self.path.clone(),
            source,
        };
        let m = self.mask_size;
        let mut model = self.prompts.clone();
        let mut facts: Vec<InferenceFact> = match &self.graphs {
            Graphs::One => vec![f32::fact(self.embedding_shape).into()],
            Graphs::Split { frame_shapes, .. } => frame_shapes
                .iter()
                .map(|s| f32::fact(s.as_slice()).into())
                .collect(),
        };
        facts.push(f32::fact([batch, points, 2]).into());
        facts.push(f32::fact([batch, points]).into());
        if let Graphs::One = self.graphs {
            facts.push(f32::fact([1, 1, m, m]).into());
            facts.push(f32::fact([1]).into());
        }
        for (ix, fact) in facts.into_iter().enumerate() {
            model.set_input_fact(ix, fact).map_err(load_err)?;
        }
        // The INT8 decoder's per-prompt graph runs its image->token weighted sums as W8A16
        // (see the mask plan's note).
        let conv_blocks = if role == Role::DecoderPrompt && self.quantized_at_load() {
            super::ConvBlocks::Auto
        } else {
            super::ConvBlocks::F32
        };
        let mut typed = super::optimize(model, role, &self.path, self.int8, conv_blocks)?;
        if role == Role::DecoderPrompt {
            self.expose_low_rank(&mut typed, batch)?;
        }
        let k = self.masks_per_prompt;
        // The one graph gives masks and IoU; the per-prompt graph image tokens, mask weights
        // (shapes checked by the mask plan) and IoU.
        let expect: Vec<(usize, Vec<usize>)> = match self.graphs {
            Graphs::One => vec![(0, vec![batch, k, m, m]), (1, vec![batch, k])],
            Graphs::Split { .. } => vec![(2, vec![batch, k])],
        };
        for (ix, want) in &expect {
            let ix = *ix;
            let fact = typed.output_fact(ix).map_err(load_err)?;
            if fact.shape.as_concrete() != Some(&want[..]) {
                return Err(Error::ModelMismatch {
                    path: self.path.clone(),
                    reason: format!("decoder output {ix} is {:?}, expected {want:?}", fact.shape),
                });
            }
        }
        log::debug!("decoder plan built for batch {batch} x {points} points");
        super::unpanic(|| typed.into_runnable()).map_err(load_err)
    }

    /// Make the per-prompt plan `typed` give the low-rank form's extra outputs when the decoder
    /// runs in it (the first plan decides).
    fn expose_low_rank(&self, typed: &mut TypedModel, batch: usize) -> Result<()> {
        if !self.low_rank_wanted {
            self.low_rank_source.get_or_init(|| None);
            return Ok(());
        }
        let load_err = |source| Error::ModelLoad {
            stage: stage_name(Role::DecoderPrompt),
            path: self.path.clone(),
            source,
        };
        let found = low_rank::expose_coefficients(typed).map_err(load_err)?;
        let decided = self
            .low_rank_source
            .get_or_init(|| found.as_ref().ok().cloned());
        match (decided, &found) {
            (Some(want), Ok(got)) if want.same_as(got) => Ok(()),
            (None, Err(why)) => {
                log::debug!("mask upscaling at full rank: {why}");
                Ok(())
            }
            // Exposed, but not used: the extra outputs are ignored.
            (None, Ok(_)) => Ok(()),
            (Some(_), Ok(_)) => Err(Error::ModelMismatch {
                path: self.path.clone(),
                reason: format!("the batch-{batch} plan's low-rank parameters differ"),
            }),
            (Some(_), Err(why)) => Err(Error::ModelMismatch {
                path: self.path.clone(),
                reason: format!("the batch-{batch} plan has no low-rank form: {why}"),
            }),
        }
    }

    /// Compute and keep the per-frame tensors of `embedding` (no mask input) now, so the first
    /// prompt on it does not pay for them; nothing to do for the one-graph decoder.
    pub fn prepare(&self, embedding: &Embedding) -> Result<()> {
        if let Graphs::Split { frame, .. } = &self.graphs {
            self.frame_tensors(frame, embedding, None)?;
        }
        Ok(())
    }

    /// The per-frame tensors of `embedding` with `mask` (`None`: no mask input). Without a mask
    /// they are computed once per embedding and kept with it.
    fn frame_tensors(
        &self,
        frame: &Arc<TypedRunnableModel>,
        embedding: &Embedding,
        mask: Option<&[f32]>,
    ) -> Result<Arc<FrameTensors>> {
        if mask.is_none() {
            if let Some(kept) = embedding.decoder_frame.get() {
                return Ok(kept.clone());
            }
        }
        let infer = |source| Error::Inference {
            stage: "decoder (per frame)",
            source,
        };
        let (mask_tensor, has_mask) = self.mask_inputs(mask)?;
        let out = super::unpanic(|| {
            frame.run(tvec!(
                TValue::from_const(embedding.tensor.clone()),
                mask_tensor.into(),
                has_mask.into()
            ))
        })
        .map_err(infer)?;
        let mut tensors: Vec<Arc<Tensor>> = out.into_iter().map(|t| t.into_arc_tensor()).collect();
        if let Some(l) = self.low_rank() {
            let tokens = tensors
                .get(l.source.frame_tokens_input)
                .ok_or_else(|| infer(anyhow::anyhow!("no per-frame image tokens")))?;
            let base = super::unpanic(|| l.upscaling.frame_base(tokens)).map_err(infer)?;
            tensors.push(Arc::new(base));
        }
        let tensors = Arc::new(FrameTensors(tensors));
        if mask.is_none() {
            // Another thread may have won the race with the same values: either is right.
            let _ = embedding.decoder_frame.set(tensors.clone());
        }
        Ok(tensors)
    }

    /// The `mask_input` and `has_mask_input` tensors for an optional m*m mask.
    fn mask_inputs(&self, mask: Option<&[f32]>) -> Result<(Tensor, Tensor)> {
        let m = self.mask_size;
        let (mask, has_mask) = match mask {
            Some(mask) if mask.len() == m * m => (
                Tensor::from_shape(&[1, 1, m, m], mask).map_err(infer_err)?,
                1.0f32,
            ),
            Some(mask) => {
                return Err(infer_err(anyhow::anyhow!(
                    "mask input has {} values, expected {}",
                    mask.len(),
                    m * m
                )))
            }
            None => (Tensor::zero::<f32>(&[1, 1, m, m]).map_err(infer_err)?, 0.0),
        };
        let has_mask = Tensor::from_shape(&[1], &[has_mask]).map_err(infer_err)?;
        Ok((mask, has_mask))
    }

    /// Per-node times of the plans that decode `input` as [`Decoder::decode`] runs them, slowest
    /// first; the split form's mask-graph nodes are named `masks:…`. The split form runs a
    /// batch in chunks of up to [`SPLIT_CHUNK`] prompts on the plans of that size
    /// ([`split_chunk_size`] for tract's thread count), so it is profiled
    /// chunk by chunk on those plans (one thread, the chunks one after the other), each node's
    /// time summed over the chunks; the per-frame tensors are computed once, before, and not
    /// timed. The one-graph form runs the batch's own plan once.
    pub fn profile(
        &self,
        embedding: &Embedding,
        input: &DecoderInput,
    ) -> Result<Vec<super::profile::NodeTime>> {
        let Graphs::Split {
            masks, masks_path, ..
        } = &self.graphs
        else {
            let (plan, inputs, _) = self.batch_inputs(embedding, input, None)?;
            let (times, _) = super::profile::profile_values(&plan, inputs).map_err(infer_err)?;
            return Ok(times);
        };
        let b = input.batch();
        if input.points_per_prompt == 0 || b == 0 || !input.well_formed() {
            // batch_inputs names what is wrong with the batch.
            self.batch_inputs(embedding, input, None)?;
        }
        let mut frame = None;
        let mut times: Vec<super::profile::NodeTime> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        let size = split_chunk_size(b, decoding_threads());
        for c in 0..b.div_ceil(size) {
            let (_, chunk) = input.split_chunk(c, size);
            let (plan, inputs, kept) = self.batch_inputs(embedding, &chunk, frame.as_ref())?;
            let (prompt_times, outputs) =
                super::profile::profile_values(&plan, inputs).map_err(infer_err)?;
            let outputs: Vec<Tensor> = outputs.into_iter().map(|t| t.into_tensor()).collect();
            let shapes: Vec<Vec<usize>> = outputs.iter().map(|t| t.shape().to_vec()).collect();
            let mask_plan = self.mask_plan((masks, masks_path), &shapes)?;
            let mask_inputs = self.mask_plan_inputs(kept.as_deref(), outputs)?;
            let (mask_times, _) =
                super::profile::profile_values(&mask_plan, mask_inputs).map_err(infer_err)?;
            let chunk_times =
                prompt_times
                    .into_iter()
                    .chain(mask_times.into_iter().map(|mut t| {
                        t.node = format!("masks:{}", t.node);
                        t
                    }));
            for t in chunk_times {
                match index.get(&t.node).and_then(|&i| times.get_mut(i)) {
                    Some(sum) => sum.time += t.time,
                    None => {
                        index.insert(t.node.clone(), times.len());
                        times.push(t);
                    }
                }
            }
            frame = kept;
        }
        times.sort_by_key(|t| std::cmp::Reverse(t.time));
        Ok(times)
    }

    /// The per-prompt graph's outputs of a chunk cut down to one prompt, shaped as a one-prompt
    /// run gives them: the low-rank form's projected token values have no batch axis then
    /// (`[H, T, D]` instead of `[1, H, T, D]`), so that the one-prompt mask plan takes them.
    fn as_one_prompt(&self, outputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        if self.low_rank().is_none() {
            return Ok(outputs);
        }
        let values = PROMPT_OUTPUTS + 2..PROMPT_OUTPUTS + low_rank::EXTRA_OUTPUTS;
        outputs
            .into_iter()
            .enumerate()
            .map(|(i, t)| match t.shape() {
                [1, rest @ ..] if values.contains(&i) => {
                    let rest = rest.to_vec();
                    t.into_shape(&rest).map_err(infer_err)
                }
                _ => Ok(t),
            })
            .collect()
    }

    /// The mask plan's inputs from a per-prompt plan's `outputs` (on the per-frame tensors
    /// `frame`): image tokens and mask weights, or in the low-rank form the base, the
    /// coefficients, the values and the mask weights.
    fn mask_plan_inputs(
        &self,
        frame: Option<&FrameTensors>,
        outputs: Vec<Tensor>,
    ) -> Result<TVec<TValue>> {
        let count = outputs.len();
        let short = || infer_err(anyhow::anyhow!("per-prompt graph returned {count} outputs"));
        let mut outputs = outputs.into_iter().map(Tensor::into_tvalue);
        let tokens = outputs.next().ok_or_else(short)?;
        let weights = outputs.next().ok_or_else(short)?;
        if self.low_rank().is_none() {
            return Ok(tvec!(tokens, weights));
        }
        let base = frame
            .and_then(|f| f.0.last())
            .ok_or_else(|| infer_err(anyhow::anyhow!("no upscaling base with the frame")))?;
        let extra: Vec<TValue> = outputs.skip(1).collect();
        if extra.len() != low_rank::EXTRA_OUTPUTS {
            return Err(short());
        }
        let mut inputs: TVec<TValue> = tvec!(TValue::from_const(base.clone()));
        inputs.extend(extra);
        inputs.push(weights);
        Ok(inputs)
    }

    /// The plan for `input`'s batch shape, its inputs and (split form) the per-frame tensors,
    /// `frame` if given.
    fn batch_inputs(
        &self,
        embedding: &Embedding,
        input: &DecoderInput,
        frame: Option<&Arc<FrameTensors>>,
    ) -> Result<BatchInputs> {
        let n = input.points_per_prompt;
        let b = input.batch();
        if n == 0 || b == 0 || input.coords.len() != b * n || input.labels.len() != b * n {
            return Err(Error::Inference {
                stage: "decoder",
                source: anyhow::anyhow!(
                    "malformed batch: {} coords, {} labels, {n} points per prompt",
                    input.coords.len(),
                    input.labels.len()
                ),
            });
        }
        if embedding.tensor.shape() != self.embedding_shape {
            return Err(Error::Inference {
                stage: "decoder",
                source: anyhow::anyhow!(
                    "embedding shape {:?} does not fit this decoder ({:?})",
                    embedding.tensor.shape(),
                    self.embedding_shape
                ),
            });
        }
        let plan = self.plan(b, n)?;
        let coords: Vec<f32> = input.coords.iter().flatten().copied().collect();
        let coords = Tensor::from_shape(&[b, n, 2], &coords).map_err(infer_err)?;
        let labels = Tensor::from_shape(&[b, n], &input.labels).map_err(infer_err)?;
        let mut kept_frame = None;
        let inputs: TVec<TValue> = match &self.graphs {
            Graphs::One => {
                let (mask, has_mask) = self.mask_inputs(input.mask_input.as_deref())?;
                tvec!(
                    TValue::from_const(embedding.tensor.clone()),
                    coords.into(),
                    labels.into(),
                    mask.into(),
                    has_mask.into()
                )
            }
            Graphs::Split {
                frame: frame_plan,
                frame_shapes,
                ..
            } => {
                let kept = match frame {
                    Some(kept) => kept.clone(),
                    None => {
                        self.frame_tensors(frame_plan, embedding, input.mask_input.as_deref())?
                    }
                };
                let mut inputs: TVec<TValue> = kept
                    .0
                    .iter()
                    .take(frame_shapes.len())
                    .map(|t| TValue::from_const(t.clone()))
                    .collect();
                inputs.push(coords.into());
                inputs.push(labels.into());
                kept_frame = Some(kept);
                inputs
            }
        };
        Ok((plan, inputs, kept_frame))
    }

    /// Decode one batch of prompts against `embedding`.
    ///
    /// The per-prompt graph runs larger batches in chunks of up to [`SPLIT_CHUNK`] prompts
    /// ([`split_chunk_size`]: each prompt has megabytes of image-side tensors, and a small chunk
    /// stays in cache), the chunks spread over tract's threads, one single-threaded chunk per
    /// thread at a time.
    pub fn decode(&self, embedding: &Embedding, input: &DecoderInput) -> Result<MaskLogits> {
        Ok(self.decode_where(embedding, input, None)?.0)
    }

    /// Decode `input` but keep only the prompts with at least one mask of predicted IoU above
    /// `min_iou`; returns their logits and their indices in `input`. The split form does not
    /// upscale the masks of the others at all (segment-everything drops them anyway).
    pub fn decode_promising(
        &self,
        embedding: &Embedding,
        input: &DecoderInput,
        min_iou: f32,
    ) -> Result<(MaskLogits, Vec<usize>)> {
        self.decode_where(embedding, input, Some(min_iou))
    }

    fn decode_where(
        &self,
        embedding: &Embedding,
        input: &DecoderInput,
        min_iou: Option<f32>,
    ) -> Result<(MaskLogits, Vec<usize>)> {
        let b = input.batch();
        let (k, m) = (self.masks_per_prompt, self.mask_size);
        let promising = |iou: &[f32]| min_iou.is_none_or(|t| iou.iter().any(|&v| v > t));
        let mut masks = Vec::new();
        let mut iou = Vec::new();
        let mut kept = Vec::new();
        match &self.graphs {
            // Malformed batches get batch_inputs' error.
            Graphs::Split {
                masks: graph,
                masks_path,
                frame: frame_plan,
                ..
            } if input.well_formed() => {
                // The per-frame tensors once for every chunk (with a mask input they are not
                // kept with the embedding).
                let frame =
                    self.frame_tensors(frame_plan, embedding, input.mask_input.as_deref())?;
                let size = split_chunk_size(b, decoding_threads());
                let chunks = b.div_ceil(size);
                let decoded = spread_over_threads(chunks, |c| {
                    let (prompts, chunk) = input.split_chunk(c, size);
                    let (first, end) = (prompts.start, prompts.end);
                    let outputs = self.run_prompts(embedding, &chunk, &frame)?;
                    let scores = outputs
                        .get(2)
                        .map(f32_slice)
                        .ok_or_else(|| infer_err(anyhow::anyhow!("no IoU output")))?;
                    let keep: Vec<usize> = (0..end - first)
                        .filter(|&i| promising(scores.get(i * k..(i + 1) * k).unwrap_or(&[])))
                        .collect();
                    if keep.is_empty() {
                        return Ok(None);
                    }
                    let scores = scores.to_vec();
                    let outputs = if keep.len() == end - first {
                        outputs
                    } else {
                        let selected = outputs
                            .iter()
                            .map(|t| select_rows(t, &keep))
                            .collect::<Result<Vec<_>>>()?;
                        if keep.len() == 1 {
                            self.as_one_prompt(selected)?
                        } else {
                            selected
                        }
                    };
                    let shapes: Vec<Vec<usize>> =
                        outputs.iter().map(|t| t.shape().to_vec()).collect();
                    let plan = self.mask_plan((graph, masks_path), &shapes)?;
                    let inputs = self.mask_plan_inputs(Some(&frame), outputs)?;
                    let out = super::unpanic(|| plan.run(inputs)).map_err(infer_err)?;
                    let chunk_masks = out
                        .into_iter()
                        .next()
                        .ok_or_else(|| infer_err(anyhow::anyhow!("mask graph gave no output")))?;
                    let iou: Vec<f32> = keep
                        .iter()
                        .flat_map(|&i| scores[i * k..(i + 1) * k].iter().copied())
                        .collect();
                    let kept: Vec<usize> = keep.iter().map(|&i| first + i).collect();
                    Ok(Some((chunk_masks, iou, kept)))
                })?;
                for (chunk_masks, chunk_iou, chunk_kept) in decoded.into_iter().flatten() {
                    masks.extend_from_slice(f32_slice(&chunk_masks));
                    iou.extend_from_slice(&chunk_iou);
                    kept.extend_from_slice(&chunk_kept);
                }
            }
            _ => {
                let all = self.decode_one_graph(embedding, input)?;
                if min_iou.is_none() {
                    // Every prompt kept: the plan's outputs as they are, no copy.
                    let every = (0..all.batch()).collect();
                    return Ok((all, every));
                }
                for i in 0..all.batch() {
                    let row: Vec<f32> = (0..k).map(|j| all.iou(i, j)).collect();
                    if promising(&row) {
                        for j in 0..k {
                            masks.extend_from_slice(all.mask(i, j));
                        }
                        iou.extend_from_slice(&row);
                        kept.push(i);
                    }
                }
            }
        }
        let s = kept.len();
        let logits = MaskLogits {
            // The collected values become the tensors as they are (a batch of 64 prompts is
            // 50 MB of logits: not copied again).
            masks: Arc::new(
                tract_ndarray::Array4::from_shape_vec((s, k, m, m), masks)
                    .map_err(|e| infer_err(e.into()))?
                    .into_tensor(),
            ),
            iou: Arc::new(
                tract_ndarray::Array2::from_shape_vec((s, k), iou)
                    .map_err(|e| infer_err(e.into()))?
                    .into_tensor(),
            ),
            masks_per_prompt: k,
            size: m,
        };
        Ok((logits, kept))
    }

    /// The split form's per-prompt graph on one batch, on the per-frame tensors `frame`: image
    /// tokens, mask weights, IoU (and the low-rank form's outputs).
    fn run_prompts(
        &self,
        embedding: &Embedding,
        input: &DecoderInput,
        frame: &Arc<FrameTensors>,
    ) -> Result<Vec<Tensor>> {
        let (plan, inputs, _) = self.batch_inputs(embedding, input, Some(frame))?;
        let out: Vec<Tensor> = super::unpanic(|| plan.run(inputs))
            .map_err(infer_err)?
            .into_iter()
            .map(|t| t.into_tensor())
            .collect();
        if out.len() < PROMPT_OUTPUTS {
            return Err(infer_err(anyhow::anyhow!(
                "per-prompt graph returned {} outputs",
                out.len()
            )));
        }
        Ok(out)
    }

    /// The one graph on a batch of any size: chunks of the largest of [`ONE_GRAPH_BATCHES`], the
    /// last padded up to the smallest that holds it (see there).
    fn decode_one_graph(&self, embedding: &Embedding, input: &DecoderInput) -> Result<MaskLogits> {
        let (b, n) = (input.batch(), input.points_per_prompt);
        let largest = ONE_GRAPH_BATCHES[ONE_GRAPH_BATCHES.len() - 1];
        let bucket = |c: usize| ONE_GRAPH_BATCHES.into_iter().find(|&s| s >= c);
        if n == 0 || input.coords.len() != b * n || input.labels.len() != b * n {
            // batch_inputs' error.
            return self.decode_one_graph_batch(embedding, input);
        }
        if bucket(b) == Some(b) {
            return self.decode_one_graph_batch(embedding, input);
        }
        let (k, m) = (self.masks_per_prompt, self.mask_size);
        let (mut masks, mut iou) = (Vec::new(), Vec::new());
        let mut first = 0;
        while first < b {
            let end = (first + largest).min(b);
            let size = bucket(end - first).unwrap_or(largest);
            let (mut coords, mut labels) = (
                input.coords[first * n..end * n].to_vec(),
                input.labels[first * n..end * n].to_vec(),
            );
            // Copies of the chunk's last prompt fill it up to the plan's batch.
            let last = (end - 1) * n..end * n;
            for _ in end - first..size {
                coords.extend_from_slice(&input.coords[last.clone()]);
                labels.extend_from_slice(&input.labels[last.clone()]);
            }
            let chunk = DecoderInput {
                points_per_prompt: n,
                coords,
                labels,
                mask_input: input.mask_input.clone(),
            };
            let out = self.decode_one_graph_batch(embedding, &chunk)?;
            let real = end - first;
            let short = || infer_err(anyhow::anyhow!("decoder gave fewer rows than its batch"));
            masks.extend_from_slice(
                f32_slice(&out.masks)
                    .get(..real * k * m * m)
                    .ok_or_else(short)?,
            );
            iou.extend_from_slice(f32_slice(&out.iou).get(..real * k).ok_or_else(short)?);
            first = end;
        }
        Ok(MaskLogits {
            masks: Arc::new(Tensor::from_shape(&[b, k, m, m], &masks).map_err(infer_err)?),
            iou: Arc::new(Tensor::from_shape(&[b, k], &iou).map_err(infer_err)?),
            masks_per_prompt: k,
            size: m,
        })
    }

    /// The one graph on one batch, with the plan of its size.
    fn decode_one_graph_batch(
        &self,
        embedding: &Embedding,
        input: &DecoderInput,
    ) -> Result<MaskLogits> {
        let (plan, inputs, _) = self.batch_inputs(embedding, input, None)?;
        let mut out = super::unpanic(|| plan.run(inputs))
            .map_err(infer_err)?
            .into_iter();
        let (Some(masks), Some(iou)) = (out.next(), out.next()) else {
            return Err(infer_err(anyhow::anyhow!(
                "decoder returned fewer than 2 outputs"
            )));
        };
        Ok(MaskLogits {
            masks: masks.into_arc_tensor(),
            iou: iou.into_arc_tensor(),
            masks_per_prompt: self.masks_per_prompt,
            size: self.mask_size,
        })
    }
}

/// Threads [`spread_over_threads`] runs chunks on: tract's pool's, or one.
fn decoding_threads() -> usize {
    use tract_linalg::multithread::{current_tract_executor, Executor};
    match current_tract_executor() {
        Executor::MultiThread(pool) => pool.current_num_threads().max(1),
        _ => 1,
    }
}

/// `job(i)` for every `i < count`, in index order of the results: spread over tract's threads,
/// each job running single-threaded, when tract runs on more than one thread and there is more
/// than one job; in the caller's thread otherwise. Chunks of prompts are independent: one per
/// core runs its ops with no hand-offs between threads, where one prompt spread over the cores
/// waits for them at every op (on 2 cores a prompt takes ~0.8x its one-thread time on both, two
/// prompts side by side take their one-thread time). The first error is returned; jobs not yet
/// started then do not start.
fn spread_over_threads<T: Send>(
    count: usize,
    job: impl Fn(usize) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tract_linalg::multithread::{current_tract_executor, multithread_tract_scope, Executor};

    let pool = match current_tract_executor() {
        Executor::MultiThread(pool) if pool.current_num_threads() > 1 && count > 1 => pool,
        _ => return (0..count).map(job).collect(),
    };
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Result<T>>>> = (0..count).map(|_| Mutex::new(None)).collect();
    let workers = pool.current_num_threads().min(count);
    pool.scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|_| {
                multithread_tract_scope(Executor::SingleThread, || loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(slot) = results.get(i) else {
                        break;
                    };
                    let result = job(i);
                    let failed = result.is_err();
                    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
                    if failed {
                        next.store(count, Ordering::Relaxed);
                    }
                })
            });
        }
    });
    let mut out = Vec::with_capacity(count);
    let mut missing = false;
    for slot in results {
        match slot.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(Ok(value)) => out.push(value),
            Some(Err(e)) => return Err(e),
            None => missing = true,
        }
    }
    if missing {
        // Only an error stops the workers early, and it was returned above.
        return Err(infer_err(anyhow::anyhow!("a decoder job did not run")));
    }
    Ok(out)
}

/// A decoder inference error.
fn infer_err(source: anyhow::Error) -> Error {
    Error::Inference {
        stage: "decoder",
        source,
    }
}

/// Rows `keep` (along axis 0) of an f32 tensor.
fn select_rows(t: &Tensor, keep: &[usize]) -> Result<Tensor> {
    let shape = t.shape();
    let row: usize = shape.iter().skip(1).product();
    let data = f32_slice(t);
    let mut out = Vec::with_capacity(keep.len() * row);
    for &i in keep {
        let Some(values) = data.get(i * row..(i + 1) * row) else {
            return Err(infer_err(anyhow::anyhow!("row {i} of a {shape:?} tensor")));
        };
        out.extend_from_slice(values);
    }
    let mut new_shape = shape.to_vec();
    new_shape[0] = keep.len();
    Tensor::from_shape(&new_shape, &out).map_err(infer_err)
}

/// The optimised per-frame plan: (1, D, e, e) embedding, (1, 1, m, m) mask, (1) flag.
fn frame_plan(
    mut model: InferenceModel,
    path: &Path,
    embedding_shape: [usize; 4],
    mask_size: usize,
    int8: super::Int8Matmul,
) -> Result<Arc<TypedRunnableModel>> {
    let load_err = |source| Error::ModelLoad {
        stage: stage_name(Role::DecoderFrame),
        path: path.to_path_buf(),
        source,
    };
    let facts: [InferenceFact; 3] = [
        f32::fact(embedding_shape).into(),
        f32::fact([1, 1, mask_size, mask_size]).into(),
        f32::fact([1]).into(),
    ];
    for (ix, fact) in facts.into_iter().enumerate() {
        model.set_input_fact(ix, fact).map_err(load_err)?;
    }
    let typed = super::optimize(
        model,
        Role::DecoderFrame,
        path,
        int8,
        super::ConvBlocks::F32,
    )?;
    super::unpanic(|| typed.into_runnable()).map_err(load_err)
}

/// Concrete shapes of the per-frame plan's outputs.
fn frame_output_shapes(frame: &TypedRunnableModel, path: &Path) -> Result<Vec<Vec<usize>>> {
    let model = frame.model();
    let outputs = model.output_outlets().map_err(|source| Error::ModelLoad {
        stage: stage_name(Role::DecoderFrame),
        path: path.to_path_buf(),
        source,
    })?;
    outputs
        .iter()
        .map(|&outlet| {
            model
                .outlet_fact(outlet)
                .ok()
                .and_then(|f| f.shape.as_concrete().map(<[usize]>::to_vec))
                .ok_or_else(|| Error::ModelMismatch {
                    path: path.to_path_buf(),
                    reason: format!("per-frame output {outlet:?} has no concrete shape"),
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch is spread over the threads first, one prompt each, and grouped only beyond that.
    #[test]
    fn chunks_keep_every_thread_busy_first() {
        assert_eq!(split_chunk_size(64, 2), SPLIT_CHUNK);
        assert_eq!(split_chunk_size(2, 2), 1);
        assert_eq!(split_chunk_size(3, 1), 3.min(SPLIT_CHUNK));
        assert_eq!(split_chunk_size(6, 4), 2.min(SPLIT_CHUNK));
        assert_eq!(split_chunk_size(1, 8), 1);
        assert_eq!(split_chunk_size(0, 2), 1);
        assert_eq!(split_chunk_size(5, 0), SPLIT_CHUNK);
    }
}
