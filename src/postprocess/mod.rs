//! Low-resolution mask logits -> frame-sized binary masks with score, stability, box and area.
//!
//! The decoder's m x m logits cover the padded model input. One bilinear pass maps every frame
//! pixel centre to its place in that grid (SAM upsamples to the model size, crops the padding and
//! resizes again: the same sampling positions, one interpolation instead of two), thresholds at 0
//! and counts the pixels above +-offset for the stability score in the same pass.

pub mod polygon;
pub mod rle;

use serde::Serialize;

use crate::preprocess::Geometry;
pub use rle::Rle;

/// Logit above which a pixel belongs to the mask.
pub const MASK_THRESHOLD: f32 = 0.0;

/// SAM's default stability-score offset.
pub const STABILITY_OFFSET: f32 = 1.0;

/// A frame-sized binary mask, row-major, one byte (0 or 1) per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryMask {
    /// Frame width.
    pub width: u32,
    /// Frame height.
    pub height: u32,
    /// `width * height` bytes.
    pub data: Vec<u8>,
}

impl BinaryMask {
    /// COCO RLE of the mask.
    pub fn to_rle(&self) -> Rle {
        Rle::encode(&self.data, self.width, self.height)
    }

    /// Pixel value at (x, y); 0 outside.
    pub fn get(&self, x: u32, y: u32) -> u8 {
        if x >= self.width || y >= self.height {
            return 0;
        }
        self.data[(y as usize) * (self.width as usize) + x as usize]
    }
}

/// One predicted mask with its statistics.
#[derive(Debug, Clone)]
pub struct MaskResult {
    /// Which of the decoder's masks (0..K) this is.
    pub index: usize,
    /// The decoder's predicted IoU.
    pub score: f32,
    /// Stability score: IoU of the masks thresholded at +offset and -offset.
    pub stability: f32,
    /// Bounding box `[x, y, width, height]` in frame pixels (COCO XYWH); zeros when empty.
    pub bbox: [u32; 4],
    /// Object pixels.
    pub area: u64,
    /// The mask at frame size.
    pub mask: BinaryMask,
    /// The m x m logits it came from (feed back as mask input to refine).
    pub low_res_logits: Vec<f32>,
}

/// Precomputed bilinear taps from frame pixels to low-res logits.
#[derive(Debug, Clone)]
pub struct Upsampler {
    geometry: Geometry,
    size: usize,
    cols: Vec<(usize, usize, f32)>,
    rows: Vec<(usize, usize, f32)>,
}

/// Bilinear tap `(i0, i1, weight of i1)` in low-res logits of side `m` for a model-space
/// coordinate (align_corners = false, clamped to the grid).
fn low_res_tap(model_px: f32, model: u32, m: usize) -> (usize, usize, f32) {
    let low = (model_px * m as f32 / model as f32 - 0.5).clamp(0.0, (m - 1) as f32);
    // `low` is clamped to 0..=m-1, so the cast is exact and in range.
    let i0 = low.floor() as usize;
    (i0, (i0 + 1).min(m - 1), low - i0 as f32)
}

fn taps(frame: u32, resized: u32, model: u32, m: usize) -> Vec<(usize, usize, f32)> {
    (0..frame)
        .map(|i| low_res_tap((i as f32 + 0.5) * resized as f32 / frame as f32, model, m))
        .collect()
}

impl Upsampler {
    /// Taps for masks of side `size` on frames of `geometry`.
    pub fn new(geometry: Geometry, size: usize) -> Upsampler {
        let size = size.max(1);
        Upsampler {
            geometry,
            size,
            cols: taps(
                geometry.frame_width,
                geometry.resized_width,
                geometry.model_size,
                size,
            ),
            rows: taps(
                geometry.frame_height,
                geometry.resized_height,
                geometry.model_size,
                size,
            ),
        }
    }

    /// The frame geometry these taps are for.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The upsampled logit at frame point (x, y) (pixel centres are at +0.5), computed alone.
    pub fn logit_at(&self, low: &[f32], x: f32, y: f32) -> f32 {
        let m = self.size;
        if low.len() != m * m {
            return f32::NEG_INFINITY;
        }
        let (mx, my) = self.geometry.frame_to_model(x, y);
        let (x0, x1, fx) = low_res_tap(mx, self.geometry.model_size, m);
        let (y0, y1, fy) = low_res_tap(my, self.geometry.model_size, m);
        bilinear(low, m, y0, y1, fy, x0, x1, fx)
    }

    /// Frame-sized logits, row-major (for callers that need the values, e.g. tests).
    pub fn logits(&self, low: &[f32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows.len() * self.cols.len());
        let m = self.size;
        for &(y0, y1, fy) in &self.rows {
            for &(x0, x1, fx) in &self.cols {
                out.push(bilinear(low, m, y0, y1, fy, x0, x1, fx));
            }
        }
        out
    }

    /// Threshold `low` (m*m logits) at frame size and measure the mask.
    pub fn mask(&self, low: &[f32], index: usize, score: f32) -> MaskResult {
        let m = self.size;
        let (w, h) = (self.geometry.frame_width, self.geometry.frame_height);
        let mut data = vec![0u8; self.rows.len() * self.cols.len()];
        let (mut hi, mut lo, mut area) = (0u64, 0u64, 0u64);
        let (mut min_x, mut min_y, mut max_x, mut max_y) = (u32::MAX, u32::MAX, 0u32, 0u32);
        if low.len() == m * m {
            for (y, &(y0, y1, fy)) in self.rows.iter().enumerate() {
                let row = &mut data[y * self.cols.len()..(y + 1) * self.cols.len()];
                let mut row_any = false;
                for (x, &(x0, x1, fx)) in self.cols.iter().enumerate() {
                    let v = bilinear(low, m, y0, y1, fy, x0, x1, fx);
                    hi += u64::from(v > MASK_THRESHOLD + STABILITY_OFFSET);
                    lo += u64::from(v > MASK_THRESHOLD - STABILITY_OFFSET);
                    if v > MASK_THRESHOLD {
                        row[x] = 1;
                        area += 1;
                        row_any = true;
                        // x < width <= u32::MAX
                        let xu = x as u32;
                        min_x = min_x.min(xu);
                        max_x = max_x.max(xu);
                    }
                }
                if row_any {
                    let yu = y as u32;
                    min_y = min_y.min(yu);
                    max_y = max_y.max(yu);
                }
            }
        }
        let bbox = if area > 0 {
            [min_x, min_y, max_x - min_x + 1, max_y - min_y + 1]
        } else {
            [0; 4]
        };
        MaskResult {
            index,
            score,
            stability: if lo == 0 { 0.0 } else { hi as f32 / lo as f32 },
            bbox,
            area,
            mask: BinaryMask {
                width: w,
                height: h,
                data,
            },
            low_res_logits: low.to_vec(),
        }
    }
}

#[inline]
#[allow(clippy::too_many_arguments)]
fn bilinear(
    low: &[f32],
    m: usize,
    y0: usize,
    y1: usize,
    fy: f32,
    x0: usize,
    x1: usize,
    fx: f32,
) -> f32 {
    let a = low[y0 * m + x0] * (1.0 - fx) + low[y0 * m + x1] * fx;
    let b = low[y1 * m + x0] * (1.0 - fx) + low[y1 * m + x1] * fx;
    a * (1.0 - fy) + b * fy
}

/// Stability score of logits (used to filter before upsampling): the share of pixels above
/// `-offset` that are also above `+offset`.
pub fn stability_score<'a>(logits: impl IntoIterator<Item = &'a f32>, offset: f32) -> f32 {
    let (mut hi, mut lo) = (0u64, 0u64);
    for &v in logits {
        hi += u64::from(v > MASK_THRESHOLD + offset);
        lo += u64::from(v > MASK_THRESHOLD - offset);
    }
    if lo == 0 {
        0.0
    } else {
        hi as f32 / lo as f32
    }
}

/// Serializable summary of a mask (everything but the pixels).
#[derive(Debug, Clone, Serialize)]
pub struct MaskSummary {
    /// Which decoder mask.
    pub index: usize,
    /// Predicted IoU.
    pub score: f32,
    /// Stability score.
    pub stability: f32,
    /// `[x, y, w, h]`.
    pub bbox: [u32; 4],
    /// Object pixels.
    pub area: u64,
    /// COCO RLE, uncompressed counts.
    pub rle: Rle,
    /// COCO RLE, pycocotools compressed string.
    pub rle_string: String,
}

impl From<&MaskResult> for MaskSummary {
    fn from(m: &MaskResult) -> Self {
        let rle = m.mask.to_rle();
        MaskSummary {
            index: m.index,
            score: m.score,
            stability: m.stability,
            bbox: m.bbox,
            area: m.area,
            rle_string: rle.to_compressed(),
            rle,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn constant_logits_give_full_or_empty_masks() {
        let g = Geometry::new(40, 30, 64).unwrap();
        let up = Upsampler::new(g, 16);
        let full = up.mask(&vec![5.0; 256], 0, 0.9);
        assert_eq!(full.area, 1200);
        assert_eq!(full.bbox, [0, 0, 40, 30]);
        assert_eq!(full.stability, 1.0);
        let empty = up.mask(&vec![-5.0; 256], 1, 0.1);
        assert_eq!(empty.area, 0);
        assert_eq!(empty.bbox, [0; 4]);
    }

    #[test]
    fn left_half_maps_to_left_half() {
        // A square frame: the whole low-res grid is image; left half positive.
        let g = Geometry::new(100, 100, 64).unwrap();
        let m = 16;
        let low: Vec<f32> = (0..m * m)
            .map(|i| if i % m < m / 2 { 3.0 } else { -3.0 })
            .collect();
        let r = Upsampler::new(g, m).mask(&low, 0, 1.0);
        assert_eq!(r.bbox, [0, 0, 50, 100]);
        assert_eq!(r.area, 5000);
    }

    #[test]
    fn padding_is_cropped() {
        // Wide frame: the bottom of the model input is padding; the mask is positive only there.
        let g = Geometry::new(100, 50, 64).unwrap();
        let m = 16;
        let low: Vec<f32> = (0..m * m)
            .map(|i| if i / m >= m / 2 { 9.0 } else { -9.0 })
            .collect();
        assert_eq!(Upsampler::new(g, m).mask(&low, 0, 1.0).area, 0);
    }

    proptest! {
        #[test]
        fn upsampled_logits_stay_within_input_range(w in 1u32..300, h in 1u32..300, seed in any::<u32>()) {
            let g = Geometry::new(w, h, 64).unwrap();
            let m = 16;
            let low: Vec<f32> = (0..m * m).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 50.0 - 10.0).collect();
            let (lo, hi) = low.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            let up = Upsampler::new(g, m);
            let out = up.logits(&low);
            prop_assert_eq!(out.len(), (w * h) as usize);
            prop_assert!(out.iter().all(|&v| v >= lo - 1e-4 && v <= hi + 1e-4));
            let (px, py) = (seed % w, (seed / 7) % h);
            let single = up.logit_at(&low, px as f32 + 0.5, py as f32 + 0.5);
            prop_assert!((single - out[(py * w + px) as usize]).abs() < 1e-4);
            let r = up.mask(&low, 0, 0.5);
            prop_assert!(r.bbox[0] + r.bbox[2] <= w && r.bbox[1] + r.bbox[3] <= h);
            prop_assert!(r.stability >= 0.0 && r.stability <= 1.0);
            prop_assert_eq!(r.area, out.iter().filter(|&&v| v > 0.0).count() as u64);
        }
    }
}
