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

/// The decoder graph, parsed once, with optimised plans per batch shape.
pub struct Decoder {
    source: InferenceModel,
    cache: Mutex<PlanCache>,
    /// The ONNX file.
    pub path: PathBuf,
    /// Its precision.
    pub precision: Precision,
    int8: super::Int8Matmul,
    embedding_shape: [usize; 4],
    mask_size: usize,
    masks_per_prompt: usize,
}

impl Decoder {
    /// Parse the decoder of `manifest` at `precision` and build the single-prompt plan.
    pub fn load(
        dir: &Path,
        manifest: &Manifest,
        precision: Precision,
        int8: super::Int8Matmul,
    ) -> Result<Decoder> {
        let (path, source) = parse_onnx(dir, manifest, Role::Decoder, precision)?;
        let e = manifest.config.embedding_size();
        let decoder = Decoder {
            source,
            cache: Mutex::new(PlanCache {
                plans: HashMap::new(),
                order: VecDeque::new(),
            }),
            path,
            precision,
            int8,
            embedding_shape: [1, manifest.config.prompt_embed_dim, e, e],
            mask_size: manifest.config.low_res_mask_size(),
            masks_per_prompt: manifest.config.num_multimask_outputs,
        };
        // Fail at load, not at the first prompt, if the graph does not fit the manifest.
        decoder.plan(1, 2)?;
        Ok(decoder)
    }

    /// Side of the low-res mask logits.
    pub fn mask_size(&self) -> usize {
        self.mask_size
    }

    /// The runnable plan for B prompts of N points, built on first use (also for kernel reports).
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
        let stage = stage_name(Role::Decoder);
        let load_err = |source| Error::ModelLoad {
            stage,
            path: self.path.clone(),
            source,
        };
        let m = self.mask_size;
        let mut model = self.source.clone();
        let facts: [InferenceFact; 5] = [
            f32::fact(self.embedding_shape).into(),
            f32::fact([batch, points, 2]).into(),
            f32::fact([batch, points]).into(),
            f32::fact([1, 1, m, m]).into(),
            f32::fact([1]).into(),
        ];
        for (ix, fact) in facts.into_iter().enumerate() {
            model.set_input_fact(ix, fact).map_err(load_err)?;
        }
        let typed = super::optimize(model, Role::Decoder, &self.path, self.int8)?;
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

    /// Decode one batch of prompts against `embedding`.
    pub fn decode(&self, embedding: &Embedding, input: &DecoderInput) -> Result<MaskLogits> {
        let n = input.points_per_prompt;
        let b = input.batch();
        let m = self.mask_size;
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
        let (mask, has_mask) = match &input.mask_input {
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
        let out = plan
            .run(tvec!(
                TValue::from_const(embedding.tensor.clone()),
                coords.into(),
                labels.into(),
                mask.into(),
                has_mask.into()
            ))
            .map_err(infer)?;
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
            size: m,
        })
    }
}
