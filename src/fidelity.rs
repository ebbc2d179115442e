//! Fidelity of a model's INT8 forms against its FP32 form, as this runtime runs them: the same
//! comparison the export's report makes with onnxruntime (`models/tinysam_export/validate.py`,
//! `fidelity.json`), here on tract with our fused ops and the quantization done at load, which
//! onnxruntime cannot see (the INT8 decoder of a directory without an INT8 decoder file, the
//! encoder's W8A16 convolution blocks).
//!
//! For every frame: the embeddings of the FP32 and the INT8 encoder and their cosine; then the
//! fixed prompts (five points and two boxes, as the export's report has them) decoded by the
//! FP32 pipeline (the reference) and by three mixtures — INT8 encoder + INT8 decoder, INT8
//! encoder + FP32 decoder, FP32 encoder + INT8 decoder — compared on the reference's best mask
//! (highest predicted IoU): the low-res masks' IoU over the frame's part of them (logits > 0),
//! whether the candidate picks the same best mask, the predicted IoU's error and the largest
//! logit difference.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::geometry::Geometry;
use crate::model::{Embedding, MaskLogits};
use crate::prompt::{BoxPrompt, PointLabel, Prompt, PromptPoint};
use crate::segmenter::Segmenter;
use crate::{Error, Result};

/// The fixed prompts on a `width × height` frame, named as the export's report names them:
/// single foreground points at the centre and the four quarter points, a centred box over half
/// the frame and a wide one over most of it.
pub fn fixed_prompts(width: u32, height: u32) -> Vec<(String, Prompt)> {
    let (w, h) = (width as f32, height as f32);
    let mut prompts: Vec<(String, Prompt)> = [
        (0.5, 0.5),
        (0.25, 0.25),
        (0.75, 0.25),
        (0.25, 0.75),
        (0.75, 0.75),
    ]
    .iter()
    .map(|&(fx, fy)| {
        let point = PromptPoint {
            x: fx * w,
            y: fy * h,
            label: PointLabel::Foreground,
        };
        (
            format!("point@{fx},{fy}"),
            Prompt {
                points: vec![point],
                ..Prompt::default()
            },
        )
    })
    .collect();
    for (name, (x0, y0, x1, y1)) in [
        ("box:centre", (0.25, 0.25, 0.75, 0.75)),
        ("box:wide", (0.05, 0.1, 0.95, 0.9)),
    ] {
        let bbox = BoxPrompt {
            x0: x0 * w,
            y0: y0 * h,
            x1: x1 * w,
            y1: y1 * h,
        };
        prompts.push((
            name.to_string(),
            Prompt {
                bbox: Some(bbox),
                ..Prompt::default()
            },
        ));
    }
    prompts
}

/// The rows and columns of an `m × m` low-res mask that cover the frame (the rest is the
/// encoder input's padding), rounded as the export's report rounds them (half to even).
pub fn frame_region(geometry: &Geometry, m: usize) -> (usize, usize) {
    let side = f64::from(geometry.model_size.max(1));
    let cover = |resized: u32| {
        let v = (f64::from(resized) * m as f64 / side).round_ties_even();
        (v as usize).clamp(1, m)
    };
    (
        cover(geometry.resized_height),
        cover(geometry.resized_width),
    )
}

/// One prompt's comparison of a candidate with the reference.
#[derive(Debug, Clone, Serialize)]
pub struct PromptFidelity {
    /// The prompt's name (see [`fixed_prompts`]).
    pub prompt: String,
    /// The reference's best mask (highest predicted IoU).
    pub best_mask: usize,
    /// Whether the candidate's highest predicted IoU is on the same mask.
    pub best_mask_agrees: bool,
    /// IoU of the two pipelines' best-mask logits > 0 over the frame's part of the low-res mask.
    pub mask_iou: f64,
    /// |reference − candidate| predicted IoU of the best mask.
    pub iou_score_error: f32,
    /// The largest |reference − candidate| logit of the best mask over the same region.
    pub largest_logit_difference: f32,
}

/// Compare `candidate` with `reference`, logits of the same prompts (`names`, one a prompt),
/// over the top-left `region` (rows, columns) of each mask.
pub fn compare(
    names: &[String],
    reference: &MaskLogits,
    candidate: &MaskLogits,
    region: (usize, usize),
) -> Result<Vec<PromptFidelity>> {
    let m = reference.size;
    if reference.batch() != names.len()
        || candidate.batch() != names.len()
        || candidate.size != m
        || candidate.masks_per_prompt != reference.masks_per_prompt
        || region.0 > m
        || region.1 > m
    {
        return Err(Error::Inference {
            stage: "decoder",
            source: anyhow::anyhow!(
                "fidelity: {} prompts against {} reference and {} candidate results of \
                 different shapes",
                names.len(),
                reference.batch(),
                candidate.batch()
            ),
        });
    }
    let best_of = |logits: &MaskLogits, b: usize| {
        (0..logits.masks_per_prompt)
            .max_by(|&i, &j| logits.iou(b, i).total_cmp(&logits.iou(b, j)))
            .unwrap_or(0)
    };
    let (rows, cols) = region;
    Ok(names
        .iter()
        .enumerate()
        .map(|(b, name)| {
            let best = best_of(reference, b);
            let (want, got) = (reference.mask(b, best), candidate.mask(b, best));
            let (mut inter, mut union, mut largest) = (0usize, 0usize, 0f32);
            for r in 0..rows {
                let (want, got) = (&want[r * m..r * m + cols], &got[r * m..r * m + cols]);
                for (&x, &y) in want.iter().zip(got) {
                    let (a, c) = (x > 0.0, y > 0.0);
                    inter += usize::from(a && c);
                    union += usize::from(a || c);
                    largest = largest.max((x - y).abs());
                }
            }
            PromptFidelity {
                prompt: name.clone(),
                best_mask: best,
                best_mask_agrees: best_of(candidate, b) == best,
                mask_iou: if union == 0 {
                    1.0
                } else {
                    inter as f64 / union as f64
                },
                iou_score_error: (reference.iou(b, best) - candidate.iou(b, best)).abs(),
                largest_logit_difference: largest,
            }
        })
        .collect())
}

/// A mixture's figures over every frame and prompt.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Mean best-mask IoU against the reference.
    pub mean_mask_iou: f64,
    /// The worst best-mask IoU.
    pub min_mask_iou: f64,
    /// Mean |error| of the best mask's predicted IoU.
    pub mean_iou_score_error: f64,
    /// Share of prompts whose best mask is the reference's.
    pub best_mask_agreement: f64,
    /// The largest logit difference of any best mask.
    pub largest_logit_difference: f32,
    /// Prompts compared.
    pub prompts: usize,
}

impl Summary {
    /// The figures of `rows`; `None` if there are none.
    pub fn of<'a>(rows: impl IntoIterator<Item = &'a PromptFidelity>) -> Option<Summary> {
        let rows: Vec<&PromptFidelity> = rows.into_iter().collect();
        let n = rows.len() as f64;
        let mean = |f: &dyn Fn(&PromptFidelity) -> f64| rows.iter().map(|r| f(r)).sum::<f64>() / n;
        (!rows.is_empty()).then(|| Summary {
            mean_mask_iou: mean(&|r| r.mask_iou),
            min_mask_iou: rows.iter().map(|r| r.mask_iou).fold(1.0, f64::min),
            mean_iou_score_error: mean(&|r| f64::from(r.iou_score_error)),
            best_mask_agreement: mean(&|r| f64::from(u8::from(r.best_mask_agrees))),
            largest_logit_difference: rows
                .iter()
                .map(|r| r.largest_logit_difference)
                .fold(0.0, f32::max),
            prompts: rows.len(),
        })
    }
}

/// The mixtures compared with the FP32 pipeline, as (report key, encoder INT8?, decoder INT8?).
pub const MIXTURES: [(&str, bool, bool); 3] = [
    ("int8_encoder_int8_decoder", true, true),
    ("int8_encoder_fp32_decoder", true, false),
    ("fp32_encoder_int8_decoder", false, true),
];

/// One frame's figures.
#[derive(Debug, Clone, Serialize)]
pub struct FrameFidelity {
    /// The frame's name (its file, or what the caller calls it).
    pub image: String,
    /// Height and width in pixels, as the export's report lists them.
    pub size: [u32; 2],
    /// Cosine of the INT8 and FP32 encoders' embeddings.
    pub embedding_cosine: f64,
    /// Per mixture (its key in [`MIXTURES`]): the prompts' comparisons.
    pub mixtures: BTreeMap<String, Vec<PromptFidelity>>,
    /// Fixed prompts this frame refuses (a box with no area inside a 1-pixel-wide frame), with
    /// the reason.
    pub skipped: Vec<String>,
}

/// Cosine similarity of two equally long vectors (in f64); 0 if either is all zeros.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        0.0
    } else {
        ab / (aa.sqrt() * bb.sqrt())
    }
}

/// Measure one frame: `fp32` the all-FP32 pipeline, `int8` the all-INT8 one (each decoder is
/// also run on the other encoder's embedding; each run gets a fresh per-frame cache).
pub fn measure_frame(
    fp32: &Segmenter,
    int8: &Segmenter,
    name: &str,
    frame: &image::RgbImage,
) -> Result<FrameFidelity> {
    let reference_embedding = fp32.embed(frame)?;
    let int8_embedding = int8.embed(frame)?;
    let geometry = reference_embedding.geometry;
    let embedding_cosine = cosine(&values(&reference_embedding)?, &values(&int8_embedding)?);
    let m = fp32.mask_size();
    let mask_values = m.saturating_mul(m);
    let (mut names, mut model_prompts, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    for (name, prompt) in fixed_prompts(frame.width(), frame.height()) {
        match prompt.to_model(&geometry, mask_values) {
            Ok(p) => {
                names.push(name);
                model_prompts.push(p);
            }
            Err(e) => skipped.push(format!("{name}: {e}")),
        }
    }
    if model_prompts.is_empty() {
        return Err(Error::Image(format!(
            "no fixed prompt fits the {}x{} frame",
            frame.width(),
            frame.height()
        )));
    }
    // A fresh embedding per run, so that no decoder reuses another's per-frame tensors.
    let fresh = |e: &Embedding| Embedding::new(e.tensor.clone(), e.geometry);
    let decode = |segmenter: &Segmenter, embedding: &Embedding| {
        segmenter.decode(&fresh(embedding), &model_prompts, None)
    };
    let reference = decode(fp32, &reference_embedding)?;
    let region = frame_region(&geometry, m);
    let mut mixtures = BTreeMap::new();
    for (key, int8_encoder, int8_decoder) in MIXTURES {
        let embedding = if int8_encoder {
            &int8_embedding
        } else {
            &reference_embedding
        };
        let decoder = if int8_decoder { int8 } else { fp32 };
        let candidate = decode(decoder, embedding)?;
        mixtures.insert(
            key.to_string(),
            compare(&names, &reference, &candidate, region)?,
        );
    }
    Ok(FrameFidelity {
        image: name.to_string(),
        size: [frame.height(), frame.width()],
        embedding_cosine,
        mixtures,
        skipped,
    })
}

/// An embedding's values.
fn values(embedding: &Embedding) -> Result<Vec<f32>> {
    let view = embedding
        .tensor
        .to_plain_array_view::<f32>()
        .map_err(|source| Error::Inference {
            stage: "encoder",
            source,
        })?;
    Ok(view.iter().copied().collect())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tract_onnx::prelude::Tensor;

    use super::*;

    /// Logits of `batch` prompts with 3 masks of side `m`: every value `fill`, predicted IoUs
    /// `ious` (3 a prompt).
    fn logits(batch: usize, m: usize, fill: f32, ious: &[f32]) -> MaskLogits {
        with_masks(batch, m, vec![fill; batch * 3 * m * m], ious)
    }

    fn with_masks(batch: usize, m: usize, masks: Vec<f32>, ious: &[f32]) -> MaskLogits {
        MaskLogits {
            masks: Arc::new(Tensor::from_shape(&[batch, 3, m, m], &masks).expect("shape")),
            iou: Arc::new(Tensor::from_shape(&[batch, 3], ious).expect("shape")),
            masks_per_prompt: 3,
            size: m,
        }
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("p{i}")).collect()
    }

    #[test]
    fn a_pipeline_against_itself_is_exact() {
        let a = logits(2, 4, 1.0, &[0.1, 0.9, 0.5, 0.7, 0.2, 0.3]);
        let rows = compare(&names(2), &a, &a, (4, 4)).expect("same shapes");
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].best_mask, rows[1].best_mask), (1, 0));
        for r in &rows {
            assert!(r.best_mask_agrees);
            assert_eq!(r.mask_iou, 1.0);
            assert_eq!((r.iou_score_error, r.largest_logit_difference), (0.0, 0.0));
        }
        let s = Summary::of(&rows).expect("rows");
        assert_eq!((s.mean_mask_iou, s.min_mask_iou, s.prompts), (1.0, 1.0, 2));
        assert_eq!(s.best_mask_agreement, 1.0);
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn differences_are_counted_inside_the_frame_region_only() {
        let m = 4;
        let reference = logits(1, m, 1.0, &[0.2, 0.8, 0.1]);
        // Best mask (1): one pixel inside the 2 × 3 region turns negative, one outside the
        // region differs wildly.
        let mut values = vec![1.0; 3 * m * m];
        values[m * m] = -0.5;
        values[m * m + 3 * m + 3] = 50.0;
        let candidate = with_masks(1, m, values, &[0.9, 0.5, 0.1]);
        let rows = compare(&names(1), &reference, &candidate, (2, 3)).expect("same shapes");
        let r = &rows[0];
        assert_eq!(r.best_mask, 1);
        assert!(!r.best_mask_agrees, "the candidate prefers mask 0");
        assert!((r.mask_iou - 5.0 / 6.0).abs() < 1e-12, "{}", r.mask_iou);
        assert!((r.iou_score_error - 0.3).abs() < 1e-6);
        assert_eq!(r.largest_logit_difference, 1.5);
        // Two empty masks agree.
        let empty = logits(1, m, -1.0, &[0.5, 0.1, 0.1]);
        let rows = compare(&names(1), &empty, &empty, (m, m)).expect("same shapes");
        assert_eq!(rows[0].mask_iou, 1.0);
    }

    #[test]
    fn mismatched_results_are_an_error_not_a_panic() {
        let a = logits(2, 4, 1.0, &[0.1; 6]);
        let b = logits(1, 4, 1.0, &[0.1; 3]);
        assert!(compare(&names(2), &a, &b, (4, 4)).is_err());
        assert!(compare(&names(1), &a, &a, (4, 4)).is_err());
        assert!(
            compare(&names(2), &a, &a, (5, 4)).is_err(),
            "region past the mask"
        );
    }

    #[test]
    fn prompts_and_region_follow_the_exports_report() {
        let prompts = fixed_prompts(640, 480);
        let names: Vec<&str> = prompts.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "point@0.5,0.5",
                "point@0.25,0.25",
                "point@0.75,0.25",
                "point@0.25,0.75",
                "point@0.75,0.75",
                "box:centre",
                "box:wide"
            ]
        );
        assert_eq!(prompts[2].1.points[0].x, 480.0);
        assert_eq!(prompts[6].1.bbox.map(|b| b.y1), Some(432.0));
        // Every prompt takes two decoder points (a point and SAM's padding, or a box).
        assert!(prompts.iter().all(|(_, p)| p.model_point_count() == 2));
        // 769 × 770 → 1023 × 1024 at 1024: 255.75 rows round to 256; 1 × 1000 keeps a row.
        let g = Geometry::new(769, 770, 1024).expect("geometry");
        assert_eq!(frame_region(&g, 256), (256, 256));
        let g = Geometry::new(1000, 1, 1024).expect("geometry");
        assert_eq!(frame_region(&g, 256), (1, 256));
        let g = Geometry::new(640, 480, 1024).expect("geometry");
        assert_eq!(frame_region(&g, 256), (192, 256));
    }

    #[test]
    fn cosine_of_vectors() {
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]) - 1.0).abs() < 1e-12);
        assert!(cosine(&[1.0, 0.0], &[0.0, 1.0]).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 1.0]), 0.0);
    }
}
