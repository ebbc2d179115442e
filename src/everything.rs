//! Segment everything: SAM's point-grid generator and TinySAM's hierarchical strategy.
//!
//! Flat mode prompts the decoder with every point of an n x n grid (in batches), keeps the masks
//! whose predicted IoU and stability pass their thresholds, and removes duplicates by box NMS.
//! Hierarchical mode (TinySAM §3.4) first runs the sparse (n/4)^2 grid, marks as done every point
//! where a kept mask's logit exceeds a high-confidence threshold, then prompts only the dense-grid
//! points not done, and merges both rounds before NMS.
//!
//! Deliberate differences from the official Python generators: the stability score is computed on
//! the decoder's low-res logits inside the unpadded area (not on frame-size logits), so masks are
//! upsampled only once they pass the filters; round 2 uses the plain dense grid (TinySAM builds a
//! 4x4 neighbourhood around each sparse point: the same density); "done" is tested at the grid
//! point itself (the official code tests the union of high-confidence masks at that pixel, which
//! is the same test).

use std::ops::ControlFlow;

use serde::Serialize;

use crate::model::{Embedding, MaskLogits};
use crate::postprocess::{stability_score, BinaryMask, MaskResult, Upsampler};
use crate::prompt::Prompt;
use crate::segmenter::Segmenter;
use crate::Result;

/// Which generator to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// SAM's single dense grid.
    Flat,
    /// TinySAM's sparse-then-dense strategy.
    Hierarchical,
}

/// Parameters of the generator; defaults are SAM's and TinySAM's.
#[derive(Debug, Clone, Serialize)]
pub struct EverythingParams {
    /// Flat or hierarchical.
    pub strategy: Strategy,
    /// Dense grid side (SAM: 32).
    pub points_per_side: usize,
    /// Decoder batch size (SAM: 64).
    pub points_per_batch: usize,
    /// Minimum predicted IoU (SAM: 0.88).
    pub pred_iou_thresh: f32,
    /// Minimum stability score (SAM: 0.95).
    pub stability_score_thresh: f32,
    /// Logit offset of the stability score (SAM: 1.0).
    pub stability_score_offset: f32,
    /// Box IoU above which the lower-scored mask is dropped (SAM: 0.7).
    pub box_nms_thresh: f32,
    /// Holes and islands smaller than this (pixels) are removed; 0 disables (SAM: 0).
    pub min_mask_region_area: u64,
    /// Logit above which a round-1 mask marks a point as done (TinySAM: 8.5).
    pub high_confidence_logit: f32,
    /// Sparse grid side is points_per_side / this (TinySAM: 4).
    pub sparse_divisor: usize,
}

impl Default for EverythingParams {
    fn default() -> Self {
        EverythingParams {
            strategy: Strategy::Hierarchical,
            points_per_side: 32,
            points_per_batch: 64,
            pred_iou_thresh: 0.88,
            stability_score_thresh: 0.95,
            stability_score_offset: 1.0,
            box_nms_thresh: 0.7,
            min_mask_region_area: 0,
            high_confidence_logit: 8.5,
            sparse_divisor: 4,
        }
    }
}

/// What one generator run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EverythingStats {
    /// Points sent to the decoder, all rounds.
    pub decoder_prompts: usize,
    /// Prompts with a mask above the IoU threshold: the only ones whose masks were upscaled
    /// from the decoder's image tokens (and then tested for stability).
    pub promising_prompts: usize,
    /// Points of round 2 skipped because they were done (hierarchical only).
    pub skipped_points: usize,
    /// Masks that passed the IoU and stability filters, before NMS.
    pub candidates: usize,
}

/// Masks found, largest first, with statistics.
#[derive(Debug, Clone)]
pub struct EverythingResult {
    /// Kept masks, by decreasing area.
    pub masks: Vec<MaskResult>,
    /// Counters.
    pub stats: EverythingStats,
    /// Round-2 grid points that were skipped (frame pixels), for inspection and tests.
    pub skipped: Vec<(f32, f32)>,
}

/// Centres of an n x n grid over a `width` x `height` frame, row by row.
pub fn point_grid(n: usize, width: u32, height: u32) -> Vec<(f32, f32)> {
    let mut out = Vec::with_capacity(n * n);
    for j in 0..n {
        for i in 0..n {
            let x = (i as f32 + 0.5) / n as f32 * width as f32;
            let y = (j as f32 + 0.5) / n as f32 * height as f32;
            out.push((x, y));
        }
    }
    out
}

/// IoU of two boxes given as `[x, y, w, h]`.
pub fn box_iou(a: [u32; 4], b: [u32; 4]) -> f32 {
    let (ax1, ay1) = (a[0] + a[2], a[1] + a[3]);
    let (bx1, by1) = (b[0] + b[2], b[1] + b[3]);
    let iw = ax1.min(bx1).saturating_sub(a[0].max(b[0]));
    let ih = ay1.min(by1).saturating_sub(a[1].max(b[1]));
    let inter = f64::from(iw) * f64::from(ih);
    let union = f64::from(a[2]) * f64::from(a[3]) + f64::from(b[2]) * f64::from(b[3]) - inter;
    if union <= 0.0 {
        0.0
    } else {
        (inter / union) as f32
    }
}

/// Greedy NMS: indices of the kept boxes, highest score first.
pub fn nms(boxes: &[[u32; 4]], scores: &[f32], iou_thresh: f32) -> Vec<usize> {
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut keep: Vec<usize> = Vec::new();
    for i in order {
        if keep
            .iter()
            .all(|&k| box_iou(boxes[i], boxes[k]) <= iou_thresh)
        {
            keep.push(i);
        }
    }
    keep
}

/// IoU of two frame-size masks.
pub fn mask_iou(a: &BinaryMask, b: &BinaryMask) -> f32 {
    let (mut inter, mut union) = (0u64, 0u64);
    for (x, y) in a.data.iter().zip(&b.data) {
        inter += u64::from(*x != 0 && *y != 0);
        union += u64::from(*x != 0 || *y != 0);
    }
    if union == 0 {
        1.0
    } else {
        inter as f32 / union as f32
    }
}

/// Mean over `reference` masks of the best IoU with any `candidate` mask (1.0 when both empty).
pub fn agreement(reference: &[&BinaryMask], candidate: &[&BinaryMask]) -> f32 {
    if reference.is_empty() {
        return if candidate.is_empty() { 1.0 } else { 0.0 };
    }
    let total: f32 = reference
        .iter()
        .map(|r| candidate.iter().map(|c| mask_iou(r, c)).fold(0.0, f32::max))
        .sum();
    total / reference.len() as f32
}

/// How far an everything pass has got, after each decoder batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The round: 1 (flat mode's only one, or the hierarchical sparse grid) or 2 (the dense
    /// points the first round left open).
    pub round: u8,
    /// Points of this round decoded so far.
    pub done: usize,
    /// Points of this round.
    pub total: usize,
}

/// Runs the generator against one embedding.
pub struct Generator<'a> {
    segmenter: &'a Segmenter,
    params: EverythingParams,
    on_progress: Option<&'a dyn Fn(Progress) -> ControlFlow<()>>,
}

impl<'a> Generator<'a> {
    /// A generator with `params`.
    pub fn new(segmenter: &'a Segmenter, params: EverythingParams) -> Generator<'a> {
        Generator {
            segmenter,
            params,
            on_progress: None,
        }
    }

    /// Call `report` after every decoder batch (a pass takes seconds to minutes: progress
    /// output, the service watchdog, other work in between). `ControlFlow::Break` stops the
    /// pass there: [`run`](Self::run) returns [`Error::Stopped`](crate::Error::Stopped) (a
    /// daemon whose everything subscribers have all left).
    pub fn on_progress(mut self, report: &'a dyn Fn(Progress) -> ControlFlow<()>) -> Generator<'a> {
        self.on_progress = Some(report);
        self
    }

    /// Segment everything in the frame `embedding` came from.
    pub fn run(&self, embedding: &Embedding) -> Result<EverythingResult> {
        let g = embedding.geometry;
        let m = self.segmenter.mask_size();
        let up = Upsampler::new(g, m);
        let p = &self.params;
        let mut stats = EverythingStats::default();
        let mut kept: Vec<MaskResult> = Vec::new();
        let mut skipped = Vec::new();
        let dense = point_grid(p.points_per_side.max(1), g.frame_width, g.frame_height);
        match p.strategy {
            Strategy::Flat => {
                kept = self.round(embedding, &up, &dense, 1, &mut stats)?;
            }
            Strategy::Hierarchical => {
                let n_sparse = (p.points_per_side / p.sparse_divisor.max(1)).max(1);
                let sparse = point_grid(n_sparse, g.frame_width, g.frame_height);
                let first = self.round(embedding, &up, &sparse, 1, &mut stats)?;
                let mut todo = Vec::with_capacity(dense.len());
                for &(x, y) in &dense {
                    let done = first
                        .iter()
                        .any(|r| up.logit_at(&r.low_res_logits, x, y) > p.high_confidence_logit);
                    if done {
                        skipped.push((x, y));
                    } else {
                        todo.push((x, y));
                    }
                }
                stats.skipped_points = skipped.len();
                kept.extend(first);
                kept.extend(self.round(embedding, &up, &todo, 2, &mut stats)?);
            }
        }
        stats.candidates = kept.len();
        let boxes: Vec<[u32; 4]> = kept.iter().map(|r| r.bbox).collect();
        let scores: Vec<f32> = kept.iter().map(|r| r.score).collect();
        let keep = nms(&boxes, &scores, p.box_nms_thresh);
        let mut slots: Vec<Option<MaskResult>> = kept.into_iter().map(Some).collect();
        let mut masks: Vec<MaskResult> = keep.into_iter().filter_map(|i| slots[i].take()).collect();
        if p.min_mask_region_area > 0 {
            masks = self.clean_small_regions(masks);
        }
        masks.sort_by_key(|r| std::cmp::Reverse(r.area));
        Ok(EverythingResult {
            masks,
            stats,
            skipped,
        })
    }

    /// Decode `points` (frame pixels) in batches; return the masks passing the IoU and stability
    /// filters (one generator round, before NMS).
    pub fn decode_points(
        &self,
        embedding: &Embedding,
        points: &[(f32, f32)],
    ) -> Result<Vec<MaskResult>> {
        let up = Upsampler::new(embedding.geometry, self.segmenter.mask_size());
        self.round(embedding, &up, points, 1, &mut EverythingStats::default())
    }

    fn round(
        &self,
        embedding: &Embedding,
        up: &Upsampler,
        points: &[(f32, f32)],
        round: u8,
        stats: &mut EverythingStats,
    ) -> Result<Vec<MaskResult>> {
        let p = &self.params;
        let g = embedding.geometry;
        let m = self.segmenter.mask_size();
        let valid_rows =
            ((g.resized_height as usize * m).div_ceil(g.model_size as usize)).clamp(1, m);
        let valid_cols =
            ((g.resized_width as usize * m).div_ceil(g.model_size as usize)).clamp(1, m);
        let mut out = Vec::new();
        let done_before = stats.decoder_prompts;
        for chunk in points.chunks(p.points_per_batch.max(1)) {
            let prompts: Vec<_> = chunk
                .iter()
                .map(|&(x, y)| Prompt::point(x, y).to_model(&g, m * m))
                .collect::<std::result::Result<_, _>>()?;
            stats.decoder_prompts += prompts.len();
            // Prompts without a mask above the IoU threshold would be dropped below: the
            // decoder does not upscale their masks.
            let (logits, _): (MaskLogits, _) =
                self.segmenter
                    .decode_promising(embedding, &prompts, p.pred_iou_thresh)?;
            stats.promising_prompts += logits.batch();
            for b in 0..logits.batch() {
                for k in 0..logits.masks_per_prompt {
                    let score = logits.iou(b, k);
                    if score <= p.pred_iou_thresh {
                        continue;
                    }
                    let low = logits.mask(b, k);
                    // Only the unpadded part of the grid, without copying it out.
                    let valid = low
                        .chunks_exact(m)
                        .take(valid_rows)
                        .flat_map(|row| &row[..valid_cols]);
                    let stability = stability_score(valid, p.stability_score_offset);
                    if stability < p.stability_score_thresh {
                        continue;
                    }
                    let mut r = up.mask(low, k, score);
                    if r.area == 0 {
                        continue;
                    }
                    r.stability = stability;
                    out.push(r);
                }
            }
            if let Some(report) = self.on_progress {
                let progress = Progress {
                    round,
                    done: stats.decoder_prompts.saturating_sub(done_before),
                    total: points.len(),
                };
                if report(progress).is_break() {
                    return Err(crate::Error::Stopped {
                        stage: "everything pass",
                    });
                }
            }
        }
        Ok(out)
    }

    /// SAM's small-region clean-up: fill small holes, drop small islands, then NMS again
    /// preferring masks that did not change.
    fn clean_small_regions(&self, masks: Vec<MaskResult>) -> Vec<MaskResult> {
        let min = self.params.min_mask_region_area;
        let mut changed = Vec::with_capacity(masks.len());
        let mut cleaned = Vec::with_capacity(masks.len());
        for mut r in masks {
            let holes = remove_small_regions(&mut r.mask, min, true);
            let islands = remove_small_regions(&mut r.mask, min, false);
            if holes || islands {
                r.area = r.mask.data.iter().map(|&v| u64::from(v)).sum();
                r.bbox = mask_box(&r.mask);
            }
            changed.push(holes || islands);
            cleaned.push(r);
        }
        let boxes: Vec<[u32; 4]> = cleaned.iter().map(|r| r.bbox).collect();
        let scores: Vec<f32> = changed.iter().map(|&c| if c { 0.0 } else { 1.0 }).collect();
        let keep = nms(&boxes, &scores, self.params.box_nms_thresh);
        let mut slots: Vec<Option<MaskResult>> = cleaned.into_iter().map(Some).collect();
        keep.into_iter()
            .filter_map(|i| slots[i].take())
            .filter(|r| r.area > 0)
            .collect()
    }
}

/// `[x, y, w, h]` of a mask's pixels; zeros when empty.
pub fn mask_box(mask: &BinaryMask) -> [u32; 4] {
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for y in 0..mask.height {
        for x in 0..mask.width {
            if mask.get(x, y) != 0 {
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x);
                y1 = y1.max(y);
            }
        }
    }
    if x0 == u32::MAX {
        [0; 4]
    } else {
        [x0, y0, x1 - x0 + 1, y1 - y0 + 1]
    }
}

/// Flip every 8-connected region smaller than `min_area` pixels: background regions (holes)
/// when `holes`, else foreground regions (islands). Returns whether anything changed.
pub fn remove_small_regions(mask: &mut BinaryMask, min_area: u64, holes: bool) -> bool {
    let (w, h) = (mask.width as usize, mask.height as usize);
    let target = u8::from(!holes); // the value whose small regions get flipped
    let mut label = vec![0u32; w * h];
    let mut next = 0u32;
    let mut changed = false;
    let mut stack = Vec::new();
    let mut region = Vec::new();
    for start in 0..w * h {
        if mask.data[start] != target || label[start] != 0 {
            continue;
        }
        next += 1;
        region.clear();
        stack.push(start);
        label[start] = next;
        while let Some(i) = stack.pop() {
            region.push(i);
            let (x, y) = ((i % w) as i64, (i / w) as i64);
            for dy in -1i64..=1 {
                for dx in -1i64..=1 {
                    if dx == 0 && dy == 0 {
                        continue;
                    }
                    let (nx, ny) = (x + dx, y + dy);
                    if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                        continue;
                    }
                    // In range: checked just above.
                    let j = ny as usize * w + nx as usize;
                    if mask.data[j] == target && label[j] == 0 {
                        label[j] = next;
                        stack.push(j);
                    }
                }
            }
        }
        if (region.len() as u64) < min_area {
            for &i in &region {
                mask.data[i] = 1 - target;
            }
            changed = true;
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_is_cell_centres() {
        let g = point_grid(2, 100, 50);
        assert_eq!(
            g,
            vec![(25.0, 12.5), (75.0, 12.5), (25.0, 37.5), (75.0, 37.5)]
        );
        assert_eq!(point_grid(32, 640, 480).len(), 1024);
    }

    #[test]
    fn box_iou_hand_computed() {
        assert_eq!(box_iou([0, 0, 10, 10], [0, 0, 10, 10]), 1.0);
        assert_eq!(box_iou([0, 0, 10, 10], [10, 0, 10, 10]), 0.0);
        // overlap 5x10 = 50, union 150
        assert!((box_iou([0, 0, 10, 10], [5, 0, 10, 10]) - 50.0 / 150.0).abs() < 1e-6);
    }

    #[test]
    fn nms_keeps_best_of_overlapping() {
        let boxes = [
            [0, 0, 10, 10],
            [1, 1, 10, 10],
            [50, 50, 5, 5],
            [0, 0, 10, 9],
        ];
        let scores = [0.8, 0.9, 0.5, 0.95];
        // 3 (0.95) suppresses 0 (iou 90/100 = 0.9) but not 1 (iou 72/118 = 0.61); 2 is apart.
        assert_eq!(nms(&boxes, &scores, 0.7), vec![3, 1, 2]);
        assert_eq!(nms(&boxes, &scores, 0.5), vec![3, 2]);
        assert_eq!(nms(&boxes, &scores, 0.95), vec![3, 1, 0, 2]);
    }

    #[test]
    fn stability_hand_computed() {
        // above +1: 2 values; above -1: 3 values -> 2/3
        assert!((stability_score(&[5.0, 2.0, 0.5, -3.0], 1.0) - 2.0 / 3.0).abs() < 1e-6);
        assert_eq!(stability_score(&[-5.0, -6.0], 1.0), 0.0);
    }

    fn mask(w: u32, h: u32, on: &[(u32, u32)]) -> BinaryMask {
        let mut data = vec![0u8; (w * h) as usize];
        for &(x, y) in on {
            data[(y * w + x) as usize] = 1;
        }
        BinaryMask {
            width: w,
            height: h,
            data,
        }
    }

    #[test]
    fn agreement_is_mean_best_match_iou() {
        let a = mask(4, 1, &[(0, 0), (1, 0)]);
        let b = mask(4, 1, &[(2, 0), (3, 0)]);
        let c = mask(4, 1, &[(0, 0)]);
        assert_eq!(agreement(&[&a, &b], &[&a, &b]), 1.0);
        // a best-matches c with 1/2; b matches nothing.
        assert_eq!(agreement(&[&a, &b], &[&c]), 0.25);
        assert_eq!(agreement(&[], &[]), 1.0);
        assert_eq!(mask_iou(&a, &c), 0.5);
    }

    #[test]
    fn small_islands_and_holes_are_removed() {
        // 5x5: a 3x3 block with a one-pixel hole, and a lone pixel far away.
        let mut on = vec![];
        for y in 0..3 {
            for x in 0..3 {
                if (x, y) != (1, 1) {
                    on.push((x, y));
                }
            }
        }
        on.push((4, 4));
        let mut m = mask(5, 5, &on);
        assert!(remove_small_regions(&mut m, 2, true));
        assert_eq!(m.get(1, 1), 1, "hole filled");
        assert!(remove_small_regions(&mut m, 2, false));
        assert_eq!(m.get(4, 4), 0, "island removed");
        assert_eq!(mask_box(&m), [0, 0, 3, 3]);
        assert!(!remove_small_regions(&mut m, 2, false));
    }
}
