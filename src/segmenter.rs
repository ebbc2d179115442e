//! The library's front door: frame -> embedding once, then any number of prompts against it.

use std::collections::BTreeMap;
use std::path::Path;

use image::RgbImage;

use crate::model::{DecoderInput, Embedding, MaskLogits, Model, PrecisionChoice};
use crate::postprocess::{MaskResult, Upsampler};
use crate::preprocess::Preprocessor;
use crate::prompt::{ModelPrompt, Prompt, PromptError};
use crate::Result;

/// Largest prompt batch sent to the decoder at once by default.
pub const DEFAULT_MAX_BATCH: usize = 64;

/// One decoder batch of prompts with the same point count.
fn decoder_input(prompts: &[ModelPrompt], mask_input: Option<&[f32]>) -> DecoderInput {
    let n = prompts.first().map_or(0, |p| p.labels.len());
    let mut coords = Vec::with_capacity(prompts.len() * n);
    let mut labels = Vec::with_capacity(prompts.len() * n);
    for p in prompts {
        coords.extend_from_slice(&p.coords);
        labels.extend_from_slice(&p.labels);
    }
    DecoderInput {
        points_per_prompt: n,
        coords,
        labels,
        mask_input: mask_input.map(<[f32]>::to_vec),
    }
}

/// Which of the decoder's masks to return per prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MaskSelection {
    /// The mask with the highest predicted IoU.
    #[default]
    Best,
    /// All K masks, highest predicted IoU first.
    All,
}

/// Per-prompt outcome: its masks, or why the prompt was refused.
pub type PromptOutcome = std::result::Result<Vec<MaskResult>, PromptError>;

/// A loaded model with its preprocessing state; shareable between an encoder thread and decoder
/// threads (`Segmenter: Sync`).
pub struct Segmenter {
    /// The model.
    pub model: Model,
    /// Resize and normalisation (no mutable state: any thread may use it).
    preprocessor: Preprocessor,
    /// Largest decoder batch.
    pub max_batch: usize,
}

impl Segmenter {
    /// Load a model directory.
    pub fn load(dir: &Path, choice: PrecisionChoice) -> Result<Segmenter> {
        let model = Model::load(dir, choice)?;
        Ok(Segmenter::new(model))
    }

    /// Wrap a loaded model.
    pub fn new(model: Model) -> Segmenter {
        let preprocessor = Preprocessor::new(&model.manifest.preprocess);
        Segmenter {
            model,
            preprocessor,
            max_batch: DEFAULT_MAX_BATCH,
        }
    }

    /// Preprocess and encode one frame.
    pub fn embed(&self, frame: &RgbImage) -> Result<Embedding> {
        let input = self.preprocess(frame)?;
        self.model.encoder.embed(input)
    }

    /// Resize, normalise and pad one frame into the encoder's input.
    pub fn preprocess(&self, frame: &RgbImage) -> Result<crate::preprocess::ImageTensor> {
        self.preprocessor.run(frame)
    }

    /// Encode an already preprocessed frame.
    pub fn encode(&self, input: crate::preprocess::ImageTensor) -> Result<Embedding> {
        self.model.encoder.embed(input)
    }

    /// [`Segmenter::encode`], calling `between_ops` before each of the encoder's ops (see
    /// [`crate::model::Encoder::embed_between_ops`]).
    pub fn encode_between_ops(
        &self,
        input: crate::preprocess::ImageTensor,
        between_ops: &mut dyn FnMut() -> bool,
    ) -> Result<Embedding> {
        self.model.encoder.embed_between_ops(input, between_ops)
    }

    /// Side of the decoder's low-res masks.
    pub fn mask_size(&self) -> usize {
        self.model.decoder.mask_size()
    }

    /// Decode prompts already in model space (all with the same point count) in one batch.
    pub fn decode(
        &self,
        embedding: &Embedding,
        prompts: &[ModelPrompt],
        mask_input: Option<&[f32]>,
    ) -> Result<MaskLogits> {
        let input = decoder_input(prompts, mask_input);
        self.model.decoder.decode(embedding, &input)
    }

    /// Like [`Segmenter::decode`], keeping only prompts with a mask of predicted IoU above
    /// `min_iou` (the others' masks are not upscaled); also returns the kept prompts' indices.
    pub fn decode_promising(
        &self,
        embedding: &Embedding,
        prompts: &[ModelPrompt],
        min_iou: f32,
    ) -> Result<(MaskLogits, Vec<usize>)> {
        let input = decoder_input(prompts, None);
        self.model
            .decoder
            .decode_promising(embedding, &input, min_iou)
    }

    /// Segment every prompt against `embedding`. Refused prompts get their error; the rest are
    /// batched by point count (prompts with a mask input run alone, the mask is per batch).
    pub fn segment(
        &self,
        embedding: &Embedding,
        prompts: &[Prompt],
        selection: MaskSelection,
    ) -> Result<Vec<PromptOutcome>> {
        let geometry = embedding.geometry;
        let m = self.mask_size();
        let mut outcomes: Vec<Option<PromptOutcome>> = vec![None; prompts.len()];
        let mut groups: BTreeMap<usize, Vec<(usize, ModelPrompt)>> = BTreeMap::new();
        let mut with_mask = Vec::new();
        for (i, prompt) in prompts.iter().enumerate() {
            match prompt.to_model(&geometry, m * m) {
                Ok(mp) if prompt.mask_input.is_some() => with_mask.push((i, mp)),
                Ok(mp) => groups.entry(mp.labels.len()).or_default().push((i, mp)),
                Err(e) => outcomes[i] = Some(Err(e)),
            }
        }
        let upsampler = Upsampler::new(geometry, m);
        for group in groups.values() {
            for chunk in group.chunks(self.max_batch.max(1)) {
                let batch: Vec<ModelPrompt> = chunk.iter().map(|(_, p)| p.clone()).collect();
                let logits = self.decode(embedding, &batch, None)?;
                for (b, (i, _)) in chunk.iter().enumerate() {
                    outcomes[*i] = Some(Ok(select_masks(&logits, b, &upsampler, selection)));
                }
            }
        }
        for (i, mp) in with_mask {
            let logits = self.decode(
                embedding,
                std::slice::from_ref(&mp),
                prompts[i].mask_input.as_deref(),
            )?;
            outcomes[i] = Some(Ok(select_masks(&logits, 0, &upsampler, selection)));
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Err(PromptError::Empty)))
            .collect())
    }
}

/// Masks of prompt `b` in a decoded batch, per `selection`, highest predicted IoU first.
pub fn select_masks(
    logits: &MaskLogits,
    b: usize,
    upsampler: &Upsampler,
    selection: MaskSelection,
) -> Vec<MaskResult> {
    let mut order: Vec<usize> = (0..logits.masks_per_prompt).collect();
    order.sort_by(|&x, &y| logits.iou(b, y).total_cmp(&logits.iou(b, x)));
    if selection == MaskSelection::Best {
        order.truncate(1);
    }
    order
        .into_iter()
        .map(|k| upsampler.mask(logits.mask(b, k), k, logits.iou(b, k)))
        .collect()
}
