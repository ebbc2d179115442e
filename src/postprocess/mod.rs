//! Low-resolution mask logits -> frame-sized binary masks with score, stability, box and area.
//!
//! The decoder's m x m logits cover the padded model input. SAM's `postprocess_masks` maps them to
//! the frame in two bilinear steps (PyTorch's `F.interpolate`, `align_corners=False`, no
//! antialias): up to the model size, crop of the padding, then to the frame size. The two steps
//! are not one bilinear interpolation, but along each axis their composite is a fixed linear map:
//! every frame pixel takes a weighted sum of at most a few consecutive low-res values
//! ([`upsample`]). So the frame-size logits are computed as SAM's, without the model-size
//! intermediate, one axis at a time; the same pass thresholds at 0 and counts the pixels above
//! +-offset for the stability score.

pub mod polygon;
pub mod rle;
pub mod upsample;

use serde::Serialize;

use crate::geometry::Geometry;
pub use rle::Rle;
use upsample::AxisTaps;

/// How masks are represented for a consumer (the wire protocol sends them so).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskEncoding {
    /// COCO compressed RLE string (pycocotools `counts`), column-major.
    #[default]
    Rle,
    /// Raw mono8 bitmap, row-major, 0 or 255, width * height bytes.
    Bitmap,
    /// Outer contours as COCO polygons `[x0, y0, x1, y1, ...]`.
    Polygon,
    /// Box, area and scores only.
    Bbox,
}

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

/// SAM's mask upsampling from m x m logits to one frame geometry, its taps computed once.
#[derive(Debug, Clone)]
pub struct Upsampler {
    geometry: Geometry,
    size: usize,
    cols: AxisTaps,
    rows: AxisTaps,
}

impl Upsampler {
    /// Taps for masks of side `size` on frames of `geometry`.
    pub fn new(geometry: Geometry, size: usize) -> Upsampler {
        let size = size.max(1);
        let model = geometry.model_size as usize;
        let axis =
            |frame: u32, resized: u32| AxisTaps::sam(size, model, resized as usize, frame as usize);
        Upsampler {
            geometry,
            size,
            cols: axis(geometry.frame_width, geometry.resized_width),
            rows: axis(geometry.frame_height, geometry.resized_height),
        }
    }

    /// The frame geometry these taps are for.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The upsampled logit of the frame pixel that contains the point (x, y) (frame pixel
    /// coordinates, clamped to the frame), computed alone; -inf if `low` is not m x m.
    pub fn logit_at(&self, low: &[f32], x: f32, y: f32) -> f32 {
        let m = self.size;
        if low.len() != m * m {
            return f32::NEG_INFINITY;
        }
        // Saturating float-to-int casts, then clamped to the frame: NaN lands on pixel 0.
        let px = (x.floor().max(0.0) as usize).min(self.cols.len().saturating_sub(1));
        let py = (y.floor().max(0.0) as usize).min(self.rows.len().saturating_sub(1));
        let (row0, wy) = self.rows.taps(py);
        // Trailing taps past the grid have weight 0: skip them rather than read past a row.
        low.chunks_exact(m)
            .skip(row0)
            .zip(wy)
            .map(|(line, &w)| w * self.cols.apply(px, line))
            .sum()
    }

    /// Frame-sized logits, row-major (for callers that need the values, e.g. tests); empty if
    /// `low` is not m x m.
    pub fn logits(&self, low: &[f32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows.len() * self.cols.len());
        self.for_each_row(low, |_, row| out.extend_from_slice(row));
        out
    }

    /// Call `f(y, logits of frame row y)` for every frame row, top to bottom; nothing if `low`
    /// is not m x m. One horizontal pass over the low-res rows the frame uses, then each frame
    /// row from the few low-res rows it takes.
    fn for_each_row(&self, low: &[f32], mut f: impl FnMut(usize, &[f32])) {
        let m = self.size;
        if low.len() != m * m || self.rows.is_empty() || self.cols.is_empty() {
            return;
        }
        let width = self.cols.len();
        let (first_row, end_row) = self.rows.span();
        let end_row = end_row.min(m);
        let mut across = vec![0f32; end_row.saturating_sub(first_row) * width];
        for (line, out) in low
            .chunks_exact(m)
            .skip(first_row)
            .zip(across.chunks_exact_mut(width))
        {
            for (x, o) in out.iter_mut().enumerate() {
                *o = self.cols.apply(x, line);
            }
        }
        let mut row = vec![0f32; width];
        for y in 0..self.rows.len() {
            let (row0, w) = self.rows.taps(y);
            row.fill(0.0);
            let lines = across.chunks_exact(width).skip(row0 - first_row);
            for (line, &w) in lines.zip(w) {
                for (o, &v) in row.iter_mut().zip(line) {
                    *o += w * v;
                }
            }
            f(y, &row);
        }
    }

    /// Threshold `low` (m*m logits) at frame size and measure the mask.
    pub fn mask(&self, low: &[f32], index: usize, score: f32) -> MaskResult {
        let (w, h) = (self.geometry.frame_width, self.geometry.frame_height);
        let width = self.cols.len();
        let mut data = vec![0u8; self.rows.len() * width];
        let (mut hi, mut lo, mut area) = (0u64, 0u64, 0u64);
        let (mut min_x, mut min_y, mut max_x, mut max_y) = (u32::MAX, u32::MAX, 0u32, 0u32);
        self.for_each_row(low, |y, logits| {
            let row = &mut data[y * width..(y + 1) * width];
            let mut row_any = false;
            for (x, &v) in logits.iter().enumerate() {
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
                // y < height <= u32::MAX
                let yu = y as u32;
                min_y = min_y.min(yu);
                max_y = max_y.max(yu);
            }
        });
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
    /// The mask as COCO's compressed RLE, `{"size": [h, w], "counts": "..."}`: what
    /// `pycocotools.mask.decode` takes as it is (and what the socket sends).
    pub rle: CompressedRle,
}

/// COCO RLE with pycocotools' compressed counts string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CompressedRle {
    /// `[height, width]`.
    pub size: [u32; 2],
    /// pycocotools' compressed counts.
    pub counts: String,
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
            rle: CompressedRle {
                size: rle.size,
                counts: rle.to_compressed(),
            },
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

#[cfg(test)]
mod speed {
    use super::*;

    /// Not a test: `cargo test --release --lib upsample_speed -- --ignored --nocapture` times one
    /// 256 x 256 mask to common frame sizes (SAM's model size 1024; best of 10).
    #[test]
    #[ignore]
    fn upsample_speed() {
        let m = 256;
        let low: Vec<f32> = (0..m * m)
            .map(|i| ((i * 7919) % 2003) as f32 / 100.0 - 10.0)
            .collect();
        for (w, h) in [(640, 480), (769, 770), (1920, 1080)] {
            let up = Upsampler::new(Geometry::new(w, h, 1024).expect("size"), m);
            let best = (0..10)
                .map(|_| {
                    let t = std::time::Instant::now();
                    std::hint::black_box(up.mask(&low, 0, 1.0));
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::MAX, f64::min);
            eprintln!("mask {m}x{m} -> {w}x{h}: {:.2} ms", best * 1e3);
        }
    }
}
