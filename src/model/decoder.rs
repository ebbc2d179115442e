//! Prompt encoder + mask decoder: a batch of prompts against one embedding.
//!
//! The graph has a dynamic prompt batch `B` and point count `N`. tract optimises best with
//! concrete shapes, so a plan is built per (B, N) on first use and cached (a handful of shapes
//! occur in practice: single prompts, the everything-mode batch, boxes).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tract_onnx::prelude::*;

use super::encoder::Embedding;
use super::manifest::{Manifest, Precision, Role};
use super::{parse_onnx, stage_name};
use crate::{Error, Result};

/// Largest batch the per-prompt graph runs at once (larger ones run in chunks of this size).
pub const SPLIT_CHUNK: usize = 4;

/// Plans kept before the least recently built is dropped.
const MAX_CACHED_PLANS: usize = 8;

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

struct PlanCache {
    plans: HashMap<(usize, usize), Arc<TypedRunnableModel>>,
    order: VecDeque<(usize, usize)>,
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
    /// `frame` computes the prompt-independent tensors that `prompts` takes first.
    Split {
        frame: Arc<TypedRunnableModel>,
        /// Concrete shapes of `frame`'s outputs, the first inputs of `prompts`.
        frame_shapes: Vec<Vec<usize>>,
    },
}

/// The per-frame decoder tensors of one embedding (and mask input), inputs of the per-prompt
/// graph. Computed once per embedding without mask input and kept with it.
pub struct FrameTensors(Vec<Arc<Tensor>>);

/// The decoder, parsed once, with optimised plans per batch shape.
pub struct Decoder {
    /// The graph run per prompt batch: the whole decoder, or its per-prompt half.
    prompts: InferenceModel,
    graphs: Graphs,
    cache: Mutex<PlanCache>,
    /// The ONNX file run per prompt batch.
    pub path: PathBuf,
    /// Its precision.
    pub precision: Precision,
    int8: super::Int8Matmul,
    embedding_shape: [usize; 4],
    mask_size: usize,
    masks_per_prompt: usize,
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
        let split = graph == super::DecoderGraph::Auto
            && manifest.file(Role::DecoderFrame, precision).is_some()
            && manifest.file(Role::DecoderPrompt, precision).is_some();
        let (path, prompts, graphs) = if split {
            let (frame_path, frame) = parse_onnx(dir, manifest, Role::DecoderFrame, precision)?;
            let frame = frame_plan(frame, &frame_path, embedding_shape, mask_size, int8)?;
            let frame_shapes = frame_output_shapes(&frame, &frame_path)?;
            let (path, prompts) = parse_onnx(dir, manifest, Role::DecoderPrompt, precision)?;
            let graphs = Graphs::Split {
                frame,
                frame_shapes,
            };
            (path, prompts, graphs)
        } else {
            let (path, prompts) = parse_onnx(dir, manifest, Role::Decoder, precision)?;
            (path, prompts, Graphs::One)
        };
        let decoder = Decoder {
            prompts,
            graphs,
            cache: Mutex::new(PlanCache {
                plans: HashMap::new(),
                order: VecDeque::new(),
            }),
            path,
            precision,
            int8,
            embedding_shape,
            mask_size,
            masks_per_prompt: manifest.config.num_multimask_outputs,
        };
        // Fail at load, not at the first prompt, if the graph does not fit the manifest.
        decoder.plan(1, 2)?;
        Ok(decoder)
    }

    /// Which graphs run prompts.
    pub fn form(&self) -> DecoderForm {
        match self.graphs {
            Graphs::One => DecoderForm::OneGraph,
            Graphs::Split { .. } => DecoderForm::Split,
        }
    }

    /// Side of the low-res mask logits.
    pub fn mask_size(&self) -> usize {
        self.mask_size
    }

    /// The runnable plan run per batch of B prompts of N points (the whole decoder, or its
    /// per-prompt half), built on first use (also for kernel reports).
    pub fn plan(&self, batch: usize, points: usize) -> Result<Arc<TypedRunnableModel>> {
        let key = (batch, points);
        if let Some(p) = self.lock_cache().plans.get(&key) {
            return Ok(p.clone());
        }
        let plan = self.build_plan(batch, points)?;
        let mut cache = self.lock_cache();
        cache.plans.insert(key, plan.clone());
        cache.order.push_back(key);
        while cache.order.len() > MAX_CACHED_PLANS {
            if let Some(old) = cache.order.pop_front() {
                cache.plans.remove(&old);
            }
        }
        Ok(plan)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, PlanCache> {
        // A panic while holding the lock leaves a consistent map: keep using it.
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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
        let typed = super::optimize(model, role, &self.path, self.int8)?;
        let k = self.masks_per_prompt;
        let expect = [[batch, k, m, m].to_vec(), [batch, k].to_vec()];
        for (ix, want) in expect.iter().enumerate() {
            let fact = typed.output_fact(ix).map_err(load_err)?;
            if fact.shape.as_concrete() != Some(&want[..]) {
                return Err(Error::ModelMismatch {
                    path: self.path.clone(),
                    reason: format!("decoder output {ix} is {:?}, expected {want:?}", fact.shape),
                });
            }
        }
        log::debug!("decoder plan built for batch {batch} x {points} points");
        typed.into_runnable().map_err(load_err)
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
        let out = frame
            .run(tvec!(
                TValue::from_const(embedding.tensor.clone()),
                mask_tensor.into(),
                has_mask.into()
            ))
            .map_err(infer)?;
        let tensors = Arc::new(FrameTensors(
            out.into_iter().map(|t| t.into_arc_tensor()).collect(),
        ));
        if mask.is_none() {
            // Another thread may have won the race with the same values: either is right.
            let _ = embedding.decoder_frame.set(tensors.clone());
        }
        Ok(tensors)
    }

    /// The `mask_input` and `has_mask_input` tensors for an optional m*m mask.
    fn mask_inputs(&self, mask: Option<&[f32]>) -> Result<(Tensor, Tensor)> {
        let m = self.mask_size;
        let infer = |source| Error::Inference {
            stage: "decoder",
            source,
        };
        let (mask, has_mask) = match mask {
            Some(mask) if mask.len() == m * m => (
                Tensor::from_shape(&[1, 1, m, m], mask).map_err(infer)?,
                1.0f32,
            ),
            Some(mask) => {
                return Err(infer(anyhow::anyhow!(
                    "mask input has {} values, expected {}",
                    mask.len(),
                    m * m
                )))
            }
            None => (Tensor::zero::<f32>(&[1, 1, m, m]).map_err(infer)?, 0.0),
        };
        let has_mask = Tensor::from_shape(&[1], &[has_mask]).map_err(infer)?;
        Ok((mask, has_mask))
    }

    /// Per-node times of one run of the plan that decodes `input` (per-frame tensors computed
    /// and kept first), slowest first.
    pub fn profile(
        &self,
        embedding: &Embedding,
        input: &DecoderInput,
    ) -> Result<Vec<super::profile::NodeTime>> {
        let (plan, inputs) = self.batch_inputs(embedding, input)?;
        super::profile::profile_values(&plan, inputs).map_err(|source| Error::Inference {
            stage: "decoder",
            source,
        })
    }

    /// The plan for `input`'s batch shape and its inputs.
    fn batch_inputs(
        &self,
        embedding: &Embedding,
        input: &DecoderInput,
    ) -> Result<(Arc<TypedRunnableModel>, TVec<TValue>)> {
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
        let infer = |source| Error::Inference {
            stage: "decoder",
            source,
        };
        let coords: Vec<f32> = input.coords.iter().flatten().copied().collect();
        let coords = Tensor::from_shape(&[b, n, 2], &coords).map_err(infer)?;
        let labels = Tensor::from_shape(&[b, n], &input.labels).map_err(infer)?;
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
            Graphs::Split { frame, .. } => {
                let kept = self.frame_tensors(frame, embedding, input.mask_input.as_deref())?;
                let mut inputs: TVec<TValue> = kept
                    .0
                    .iter()
                    .map(|t| TValue::from_const(t.clone()))
                    .collect();
                inputs.push(coords.into());
                inputs.push(labels.into());
                inputs
            }
        };
        Ok((plan, inputs))
    }

    /// Decode one batch of prompts against `embedding`.
    ///
    /// The per-prompt graph runs larger batches in chunks of [`SPLIT_CHUNK`] prompts: each
    /// prompt has megabytes of image-side tensors, and a chunk that stays in cache runs faster
    /// per prompt than one big batch (measured in `docs/performance.md`).
    pub fn decode(&self, embedding: &Embedding, input: &DecoderInput) -> Result<MaskLogits> {
        let (b, n) = (input.batch(), input.points_per_prompt);
        let well_formed = input.coords.len() == b * n && input.labels.len() == b * n;
        if self.form() == DecoderForm::OneGraph || b <= SPLIT_CHUNK || !well_formed {
            // Malformed batches get decode_batch's error.
            return self.decode_batch(embedding, input);
        }
        let (k, m) = (self.masks_per_prompt, self.mask_size);
        let mut masks = Vec::with_capacity(b * k * m * m);
        let mut iou = Vec::with_capacity(b * k);
        for first in (0..b).step_by(SPLIT_CHUNK) {
            let end = (first + SPLIT_CHUNK).min(b);
            let chunk = DecoderInput {
                points_per_prompt: n,
                coords: input.coords[first * n..end * n].to_vec(),
                labels: input.labels[first * n..end * n].to_vec(),
                mask_input: input.mask_input.clone(),
            };
            let out = self.decode_batch(embedding, &chunk)?;
            masks.extend_from_slice(f32_slice(&out.masks));
            iou.extend_from_slice(f32_slice(&out.iou));
        }
        let infer = |source| Error::Inference {
            stage: "decoder",
            source,
        };
        Ok(MaskLogits {
            masks: Arc::new(Tensor::from_shape(&[b, k, m, m], &masks).map_err(infer)?),
            iou: Arc::new(Tensor::from_shape(&[b, k], &iou).map_err(infer)?),
            masks_per_prompt: k,
            size: m,
        })
    }

    /// Decode one batch in one run of its plan.
    fn decode_batch(&self, embedding: &Embedding, input: &DecoderInput) -> Result<MaskLogits> {
        let (plan, inputs) = self.batch_inputs(embedding, input)?;
        let infer = |source| Error::Inference {
            stage: "decoder",
            source,
        };
        let out = plan.run(inputs).map_err(infer)?;
        let mut out = out.into_iter();
        let (Some(masks), Some(iou)) = (out.next(), out.next()) else {
            return Err(infer(anyhow::anyhow!(
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
    super::optimize(model, Role::DecoderFrame, path, int8)?
        .into_runnable()
        .map_err(load_err)
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
