//! Between the daemon's results and ROS 2 messages: a frame's masks become a `mono16` label
//! image, a `Detection2DArray` and (with the frame) a JPEG overlay; `Detection2DArray` boxes and
//! `PointStamped` points become prompts, checked against the frame first. Pure functions: no
//! sockets, no middleware.

use crate::postprocess::rle::Rle;
use crate::protocol::{Masks, WireMask, WirePrompt, MAX_PROMPTS};

use super::messages::{
    BoundingBox2D, CompressedImage, Detection2D, Detection2DArray, Header, Image, ObjectHypothesis,
    ObjectHypothesisWithPose, Point2D, PointStamped, Pose2D, Time,
};

/// Largest frame side the bridge accepts from the daemon (the daemon's own limit).
const MAX_SIDE: u32 = 8192;

/// A result the bridge cannot turn into messages.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The frame size is zero or beyond 8192 on a side.
    #[error("frame size {width}x{height} is outside 1..={MAX_SIDE} per side")]
    FrameSize {
        /// Width.
        width: u32,
        /// Height.
        height: u32,
    },
    /// More masks than a `mono16` label can tell apart.
    #[error("{0} masks: a mono16 label image holds at most 65535")]
    TooManyMasks(usize),
    /// A mask carries no pixels in an encoding the label image can use.
    #[error("mask {index} has no RLE or bitmap pixels")]
    NoPixels {
        /// Its index in the result.
        index: usize,
    },
    /// A mask's pixels do not decode to the frame's size.
    #[error("mask {index}: {reason}")]
    BadPixels {
        /// Its index in the result.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// The result carries no frame (the overlay needs one).
    #[error("the result carries no frame")]
    NoFrame,
    /// The frame does not decode, or not to the result's size.
    #[error("the frame: {0}")]
    BadFrame(String),
}

/// A prompt that was not sent to the daemon, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct RejectedPrompt {
    /// Index of the detection in its message (0 for a point).
    pub index: usize,
    /// What is wrong with it.
    pub reason: String,
}

/// Prompts taken from one ROS message: those to send (with the index of the detection each came
/// from) and those refused.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PromptBatch {
    /// Prompts for the daemon, in order.
    pub prompts: Vec<WirePrompt>,
    /// For each prompt, the index of the detection (or point) it came from.
    pub sources: Vec<usize>,
    /// Refused ones.
    pub rejected: Vec<RejectedPrompt>,
}

/// Width and height of the frames prompts refer to, when known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSize {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// The system-clock stamp of a capture: `capture_ns` is CLOCK_MONOTONIC (the daemon's and V4L2's
/// clock), mapped through the two clocks read now. A capture "in the future" (clock skew between
/// reads) is stamped now.
pub fn stamp_from_capture(capture_ns: u64, monotonic_now_ns: u64, realtime_now_ns: u64) -> Time {
    let age = monotonic_now_ns.saturating_sub(capture_ns);
    let at = realtime_now_ns.saturating_sub(age);
    Time {
        sec: i32::try_from(at / 1_000_000_000).unwrap_or(i32::MAX),
        nanosec: (at % 1_000_000_000) as u32,
    }
}

/// Nanoseconds since the Unix epoch on the system clock (0 if the clock is before 1970).
pub fn realtime_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// What the detections of a result answer: standing or requested prompts (each detection's
/// `class_id` is its prompt's index), or segment-everything.
#[derive(Debug, Clone, PartialEq)]
pub enum Answering<'a> {
    /// Prompts: the class id of mask `m` is `class_ids[m.prompt]` (its prompt's index in the
    /// message it came from), or `m.prompt` itself when the list is shorter.
    Prompts(&'a [usize]),
    /// Segment-everything.
    Everything,
}

/// One `Detection2D` per mask, in the result's order: `id` is the mask's label value
/// (`1 + index`, as in [`label_image`]), `bbox` its box in frame pixels, the hypothesis' score
/// the predicted IoU and its class id the prompt index (or `everything`).
pub fn detections(masks: &Masks, header: &Header, answering: &Answering) -> Detection2DArray {
    let detections = masks
        .masks
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let class_id = match answering {
                Answering::Everything => "everything".to_string(),
                Answering::Prompts(ids) => usize::try_from(m.prompt)
                    .ok()
                    .and_then(|p| ids.get(p).copied().or(Some(p)))
                    .map_or_else(|| m.prompt.to_string(), |p| p.to_string()),
            };
            let [x, y, w, h] = m.bbox.map(f64::from);
            Detection2D {
                header: header.clone(),
                results: vec![ObjectHypothesisWithPose {
                    hypothesis: ObjectHypothesis {
                        class_id,
                        score: f64::from(m.score),
                    },
                    ..Default::default()
                }],
                bbox: BoundingBox2D {
                    center: Pose2D {
                        position: Point2D {
                            x: x + w / 2.0,
                            y: y + h / 2.0,
                        },
                        theta: 0.0,
                    },
                    size_x: w,
                    size_y: h,
                },
                id: (i + 1).to_string(),
            }
        })
        .collect();
    Detection2DArray {
        header: header.clone(),
        detections,
    }
}

/// Paint `label` on the pixels of mask `index` (RLE or bitmap encodings) in the row-major
/// `labels` of a `width` × `height` frame. An RLE is painted run by run, touching only the mask's
/// own pixels: a frame-size pass per mask would cost 100 passes over the frame for an everything
/// result of 100 masks (70 ms at 1280 × 720 on x86, `label_image_speed`).
fn paint(
    labels: &mut [u16],
    label: u16,
    index: usize,
    m: &WireMask,
    width: u32,
    height: u32,
) -> Result<(), ConvertError> {
    let bad = |reason: String| ConvertError::BadPixels { index, reason };
    let (w, h) = (width as usize, height as usize);
    if let Some(counts) = &m.rle {
        let rle = Rle::from_compressed(counts, width, height).map_err(|e| bad(e.to_string()))?;
        let covered: u64 = rle.counts.iter().map(|&c| u64::from(c)).sum();
        if covered != labels.len() as u64 {
            return Err(bad(format!(
                "RLE runs cover {covered} pixels, the frame has {}",
                labels.len()
            )));
        }
        // Column-major runs, zeros first; every run ends inside the frame (they sum to it).
        let mut pos = 0usize;
        for (i, &c) in rle.counts.iter().enumerate() {
            let end = pos + c as usize;
            if i % 2 == 1 {
                for p in pos..end {
                    labels[(p % h) * w + p / h] = label;
                }
            }
            pos = end;
        }
        return Ok(());
    }
    if let Some(bitmap) = &m.bitmap {
        if bitmap.len() != labels.len() {
            return Err(bad(format!(
                "bitmap of {} bytes, the frame has {} pixels",
                bitmap.len(),
                labels.len()
            )));
        }
        for (out, &p) in labels.iter_mut().zip(bitmap) {
            if p != 0 {
                *out = label;
            }
        }
        return Ok(());
    }
    Err(ConvertError::NoPixels { index })
}

/// The `mono16` label image of a result from its [`labels`]: little-endian, `step` = 2 × width.
pub fn label_image(masks: &Masks, labels: &[u16], header: &Header) -> Image {
    Image {
        header: header.clone(),
        height: masks.height,
        width: masks.width,
        encoding: "mono16".into(),
        is_bigendian: 0,
        step: masks.width.saturating_mul(2),
        data: labels.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// JPEG quality of the overlay.
const OVERLAY_QUALITY: u8 = 80;

/// The result's masks over its frame (`Masks::frame_jpeg`), as a JPEG `CompressedImage`: the
/// regions of its [`labels`] (the highest-scoring mask wins) blended half over the frame in the
/// palette of [`crate::overlay`], mask `i` in colour `i` (its detection's `id` is `i + 1`),
/// outlined in full colour. The frame is decoded strictly ([`crate::pixel::decode_image`]): a
/// truncated or corrupt JPEG is an error, not a partly grey overlay.
pub fn overlay(
    masks: &Masks,
    labels: &[u16],
    header: &Header,
) -> Result<CompressedImage, ConvertError> {
    let jpeg = masks.frame_jpeg.as_deref().ok_or(ConvertError::NoFrame)?;
    let mut frame =
        crate::pixel::decode_image(jpeg).map_err(|e| ConvertError::BadFrame(e.to_string()))?;
    if !crate::overlay::draw_labels(&mut frame, labels) {
        return Err(ConvertError::BadFrame(format!(
            "{}x{}, the result is {}x{}",
            frame.width(),
            frame.height(),
            masks.width,
            masks.height
        )));
    }
    let mut data = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut data, OVERLAY_QUALITY)
        .encode_image(&frame)
        .map_err(|e| ConvertError::BadFrame(format!("encoding the overlay: {e}")))?;
    Ok(CompressedImage {
        header: header.clone(),
        format: "jpeg".into(),
        data,
    })
}

/// The label of every pixel of a result, row-major: 1 + index of the highest-scoring mask
/// covering it (ties: the earlier mask), 0 where no mask is. Both the label image and the overlay
/// are drawn from it.
pub fn labels(masks: &Masks) -> Result<Vec<u16>, ConvertError> {
    let (width, height) = (masks.width, masks.height);
    if !(1..=MAX_SIDE).contains(&width) || !(1..=MAX_SIDE).contains(&height) {
        return Err(ConvertError::FrameSize { width, height });
    }
    if masks.masks.len() > usize::from(u16::MAX) {
        return Err(ConvertError::TooManyMasks(masks.masks.len()));
    }
    let mut labels = vec![0u16; width as usize * height as usize];
    // Paint from the lowest score up, so that the highest-scoring mask is painted last; among
    // equal scores the earlier mask is painted last.
    let mut order: Vec<usize> = (0..masks.masks.len()).collect();
    order.sort_by(|&a, &b| {
        let (sa, sb) = (masks.masks[a].score, masks.masks[b].score);
        sa.total_cmp(&sb).then(b.cmp(&a))
    });
    for i in order {
        // i < 65535 (checked above), so the label fits.
        paint(
            &mut labels,
            (i + 1) as u16,
            i,
            &masks.masks[i],
            width,
            height,
        )?;
    }
    Ok(labels)
}

/// Box prompts from a `Detection2DArray` (each detection's `bbox`, the Isaac ROS Segment Anything
/// convention): axis-aligned boxes with finite, positive sizes; a box partly outside a known frame
/// is clipped to it, one wholly outside is refused. At most [`MAX_PROMPTS`] are sent.
pub fn prompts_from_detections(msg: &Detection2DArray, frame: Option<FrameSize>) -> PromptBatch {
    let mut batch = PromptBatch::default();
    for (index, det) in msg.detections.iter().enumerate() {
        let reject = |reason: String| RejectedPrompt { index, reason };
        let b = &det.bbox;
        let (cx, cy) = (b.center.position.x, b.center.position.y);
        let values = [cx, cy, b.size_x, b.size_y, b.center.theta];
        let prompt = if values.iter().any(|v| !v.is_finite()) {
            Err(reject(format!(
                "box centre ({cx}, {cy}), size {} x {}, theta {}: not all finite numbers",
                b.size_x, b.size_y, b.center.theta
            )))
        } else if b.center.theta != 0.0 {
            Err(reject(format!(
                "box rotated by {} rad: only axis-aligned boxes are prompts",
                b.center.theta
            )))
        } else if b.size_x <= 0.0 || b.size_y <= 0.0 {
            Err(reject(format!(
                "box size {} x {} is not positive",
                b.size_x, b.size_y
            )))
        } else if batch.prompts.len() >= MAX_PROMPTS {
            Err(reject(format!(
                "more than {MAX_PROMPTS} prompts in one message"
            )))
        } else {
            let (mut x0, mut y0) = (cx - b.size_x / 2.0, cy - b.size_y / 2.0);
            let (mut x1, mut y1) = (cx + b.size_x / 2.0, cy + b.size_y / 2.0);
            let mut inside = true;
            if let Some(f) = frame {
                let (w, h) = (f64::from(f.width), f64::from(f.height));
                inside = x1 > 0.0 && y1 > 0.0 && x0 < w && y0 < h;
                (x0, y0, x1, y1) = (x0.max(0.0), y0.max(0.0), x1.min(w), y1.min(h));
            }
            if inside {
                Ok([x0, y0, x1, y1].map(|v| v as f32))
            } else {
                Err(reject(format!(
                    "box [{x0}, {y0}, {x1}, {y1}] lies outside the {}x{} frame",
                    frame.map_or(0, |f| f.width),
                    frame.map_or(0, |f| f.height)
                )))
            }
        };
        match prompt {
            Ok(bbox) => {
                batch.prompts.push(WirePrompt {
                    points: Vec::new(),
                    bbox: Some(bbox),
                });
                batch.sources.push(index);
            }
            Err(r) => batch.rejected.push(r),
        }
    }
    batch
}

/// A foreground point prompt from a `PointStamped` (`x`, `y` in frame pixels; `z` ignored),
/// refused when not finite or outside a known frame.
pub fn prompt_from_point(msg: &PointStamped, frame: Option<FrameSize>) -> PromptBatch {
    let (x, y) = (msg.point.x, msg.point.y);
    let reject = |reason: String| PromptBatch {
        rejected: vec![RejectedPrompt { index: 0, reason }],
        ..Default::default()
    };
    if !x.is_finite() || !y.is_finite() {
        return reject(format!("point ({x}, {y}) is not finite"));
    }
    if let Some(f) = frame {
        if x < 0.0 || y < 0.0 || x >= f64::from(f.width) || y >= f64::from(f.height) {
            return reject(format!(
                "point ({x}, {y}) lies outside the {}x{} frame",
                f.width, f.height
            ));
        }
    } else if x < 0.0 || y < 0.0 || x > f64::from(MAX_SIDE) || y > f64::from(MAX_SIDE) {
        return reject(format!("point ({x}, {y}) lies outside any frame"));
    }
    PromptBatch {
        prompts: vec![WirePrompt {
            points: vec![(x as f32, y as f32, 1)],
            bbox: None,
        }],
        sources: vec![0],
        rejected: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::WireMask;

    fn mask(score: f32, pixels: &[u8], width: u32, height: u32, prompt: u32) -> WireMask {
        let rle = Rle::encode(pixels, width, height);
        WireMask {
            prompt,
            output: 0,
            score,
            stability: 1.0,
            bbox: [0, 0, 0, 0],
            area: rle.area(),
            rle: Some(rle.to_compressed()),
            bitmap: None,
            polygons: None,
        }
    }

    fn masks(list: Vec<WireMask>, width: u32, height: u32) -> Masks {
        Masks {
            subscription: Some(1),
            request_id: None,
            frame_seq: 5,
            capture_ns: 0,
            width,
            height,
            dropped: 0,
            masks: list,
            refused: Vec::new(),
            frame_jpeg: None,
        }
    }

    #[test]
    fn label_image_gives_overlaps_to_the_higher_score() {
        // 4x2 frame; mask 0 (score 0.5) covers columns 0..3, mask 1 (0.9) columns 2..4,
        // mask 2 (0.5, a tie with mask 0) columns 0..1 of row 1.
        let a = [1, 1, 1, 0, 1, 1, 1, 0];
        let b = [0, 0, 1, 1, 0, 0, 1, 1];
        let c = [0, 0, 0, 0, 1, 0, 0, 0];
        let m = masks(
            vec![
                mask(0.5, &a, 4, 2, 0),
                mask(0.9, &b, 4, 2, 1),
                mask(0.5, &c, 4, 2, 2),
            ],
            4,
            2,
        );
        let image = label_image(&m, &labels(&m).unwrap(), &Header::default());
        let got: Vec<u16> = image
            .data
            .chunks_exact(2)
            .map(|p| u16::from_le_bytes([p[0], p[1]]))
            .collect();
        assert_eq!(got, [1, 1, 2, 2, 1, 1, 2, 2]);
        assert_eq!((image.width, image.height, image.step), (4, 2, 8));
    }

    #[test]
    fn label_image_refuses_what_it_cannot_draw() {
        let mut bad = mask(0.5, &[1, 0], 2, 1, 0);
        bad.rle = None;
        assert!(matches!(
            labels(&masks(vec![bad], 2, 1)),
            Err(ConvertError::NoPixels { index: 0 })
        ));
        let mut short = mask(0.5, &[1, 0], 2, 1, 0);
        short.rle = None;
        short.bitmap = Some(vec![255]);
        assert!(matches!(
            labels(&masks(vec![short], 2, 1)),
            Err(ConvertError::BadPixels { .. })
        ));
        // An RLE of another size.
        let other = mask(0.5, &[1, 0, 1], 3, 1, 0);
        assert!(labels(&masks(vec![other], 2, 1)).is_err());
        assert!(matches!(
            labels(&masks(Vec::new(), 0, 10)),
            Err(ConvertError::FrameSize { .. })
        ));
    }

    /// A 40x30 frame as JPEG (quality 100): a smooth gradient, so that JPEG's error stays small.
    fn frame_jpeg(width: u32, height: u32) -> (image::RgbImage, Vec<u8>) {
        let frame = image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x * 3) as u8, (y * 4) as u8, 100])
        });
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 100)
            .encode_image(&frame)
            .unwrap();
        (frame, jpeg)
    }

    #[test]
    fn overlay_blends_the_label_image_over_the_frame() {
        let (w, h) = (40u32, 30u32);
        // Mask 0: a 20x10 block at (4, 6); mask 1, higher score, overlapping its right part.
        let block = |x0: u32, y0: u32, bw: u32, bh: u32| -> Vec<u8> {
            (0..w * h)
                .map(|p| {
                    let (x, y) = (p % w, p / w);
                    u8::from(x >= x0 && x < x0 + bw && y >= y0 && y < y0 + bh)
                })
                .collect()
        };
        let mut m = masks(
            vec![
                mask(0.5, &block(4, 6, 20, 10), w, h, 0),
                mask(0.9, &block(18, 8, 12, 12), w, h, 1),
            ],
            w,
            h,
        );
        let header = Header {
            frame_id: "cam".into(),
            ..Default::default()
        };
        let labels = labels(&m).unwrap();
        assert!(matches!(
            overlay(&m, &labels, &header),
            Err(ConvertError::NoFrame)
        ));
        let (frame, jpeg) = frame_jpeg(w, h);
        m.frame_jpeg = Some(jpeg);
        let out = overlay(&m, &labels, &header).unwrap();
        assert_eq!((out.format.as_str(), &out.header), ("jpeg", &header));
        let got = image::load_from_memory(&out.data).unwrap().to_rgb8();
        assert_eq!(got.dimensions(), (w, h));
        // What it should be: the label image blended by `draw_labels`, from the exact frame.
        let mut expected = frame.clone();
        assert!(crate::overlay::draw_labels(&mut expected, &labels));
        let diff: Vec<u32> = got
            .pixels()
            .zip(expected.pixels())
            .flat_map(|(a, b)| a.0.iter().zip(b.0).map(|(&a, b)| u32::from(a.abs_diff(b))))
            .collect();
        let mean = f64::from(diff.iter().sum::<u32>()) / diff.len() as f64;
        assert!(mean < 4.0, "mean difference {mean}");
        // An interior pixel of mask 1 is half its colour; one of no mask is the frame's.
        let (x, y) = (24, 14);
        assert_eq!(labels[(y * w + x) as usize], 2);
        let c = crate::overlay::color(1);
        let f = frame.get_pixel(x, y).0;
        for k in 0..3 {
            let want = (i32::from(f[k]) + i32::from(c[k])) / 2;
            assert!((i32::from(got.get_pixel(x, y).0[k]) - want).abs() <= 12);
        }
        // A frame of another size, or not a JPEG, is an error.
        m.frame_jpeg = Some(frame_jpeg(20, 30).1);
        assert!(matches!(
            overlay(&m, &labels, &header),
            Err(ConvertError::BadFrame(_))
        ));
        m.frame_jpeg = Some(vec![0xff, 0xd8, 1, 2, 3]);
        assert!(matches!(
            overlay(&m, &labels, &header),
            Err(ConvertError::BadFrame(_))
        ));
    }

    #[test]
    fn detections_carry_boxes_scores_and_indices() {
        let mut m0 = mask(0.25, &[1, 0], 2, 1, 1);
        m0.bbox = [10, 20, 30, 40];
        let m = masks(vec![m0], 2, 1);
        let header = Header {
            stamp: Time { sec: 3, nanosec: 4 },
            frame_id: "cam".into(),
        };
        let d = detections(&m, &header, &Answering::Prompts(&[7, 9]));
        let det = &d.detections[0];
        assert_eq!(det.id, "1");
        assert_eq!(det.results[0].hypothesis.class_id, "9");
        assert_eq!(det.results[0].hypothesis.score, 0.25);
        assert_eq!(det.results[0].pose.pose.orientation.w, 1.0);
        assert_eq!(det.bbox.center.position, Point2D { x: 25.0, y: 40.0 });
        assert_eq!((det.bbox.size_x, det.bbox.size_y), (30.0, 40.0));
        assert_eq!(det.header, header);
        // Without a source list the prompt index itself; everything-mode says so.
        let d = detections(&m, &header, &Answering::Prompts(&[]));
        assert_eq!(d.detections[0].results[0].hypothesis.class_id, "1");
        let d = detections(&m, &header, &Answering::Everything);
        assert_eq!(d.detections[0].results[0].hypothesis.class_id, "everything");
    }

    fn detection(cx: f64, cy: f64, w: f64, h: f64, theta: f64) -> Detection2D {
        Detection2D {
            bbox: BoundingBox2D {
                center: Pose2D {
                    position: Point2D { x: cx, y: cy },
                    theta,
                },
                size_x: w,
                size_y: h,
            },
            ..Default::default()
        }
    }

    #[test]
    fn box_prompts_are_checked_and_clipped() {
        let frame = Some(FrameSize {
            width: 100,
            height: 50,
        });
        let msg = Detection2DArray {
            detections: vec![
                detection(50.0, 25.0, 20.0, 10.0, 0.0),
                detection(f64::NAN, 25.0, 20.0, 10.0, 0.0),
                detection(50.0, 25.0, f64::INFINITY, 10.0, 0.0),
                detection(50.0, 25.0, 20.0, 10.0, 0.3),
                detection(50.0, 25.0, 0.0, 10.0, 0.0),
                detection(-50.0, 25.0, 20.0, 10.0, 0.0),
                detection(95.0, 48.0, 20.0, 10.0, 0.0),
            ],
            ..Default::default()
        };
        let batch = prompts_from_detections(&msg, frame);
        assert_eq!(batch.sources, [0, 6]);
        assert_eq!(batch.prompts[0].bbox, Some([40.0, 20.0, 60.0, 30.0]));
        // Partly outside: clipped to the frame.
        assert_eq!(batch.prompts[1].bbox, Some([85.0, 43.0, 100.0, 50.0]));
        let rejected: Vec<usize> = batch.rejected.iter().map(|r| r.index).collect();
        assert_eq!(rejected, [1, 2, 3, 4, 5]);
        assert!(batch.rejected[2].reason.contains("rotated"));
        // More than MAX_PROMPTS: the rest refused.
        let many = Detection2DArray {
            detections: vec![detection(5.0, 5.0, 2.0, 2.0, 0.0); MAX_PROMPTS + 3],
            ..Default::default()
        };
        let batch = prompts_from_detections(&many, frame);
        assert_eq!(
            (batch.prompts.len(), batch.rejected.len()),
            (MAX_PROMPTS, 3)
        );
    }

    #[test]
    fn point_prompts_are_checked() {
        let frame = Some(FrameSize {
            width: 100,
            height: 50,
        });
        let point = |x: f64, y: f64| PointStamped {
            point: super::super::messages::Point { x, y, z: 9.0 },
            ..Default::default()
        };
        let ok = prompt_from_point(&point(10.5, 20.0), frame);
        assert_eq!(ok.prompts[0].points, [(10.5, 20.0, 1)]);
        for (x, y) in [(f64::NAN, 1.0), (100.0, 1.0), (-1.0, 1.0), (1.0, 50.0)] {
            let b = prompt_from_point(&point(x, y), frame);
            assert!(b.prompts.is_empty() && b.rejected.len() == 1, "{x},{y}");
        }
        // Without a known frame only the absurd ones are refused.
        assert_eq!(prompt_from_point(&point(500.0, 1.0), None).prompts.len(), 1);
        assert!(prompt_from_point(&point(1e12, 1.0), None)
            .prompts
            .is_empty());
    }

    /// The bridge's cost per result in everything-mode: a 1280 x 720 frame with 100 masks of
    /// 5 % of the frame each. `cargo test --release --lib label_image_speed -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore]
    fn label_image_speed() {
        let (w, h) = (1280u32, 720u32);
        let list: Vec<WireMask> = (0..100u32)
            .map(|i| {
                let mut pixels = vec![0u8; (w * h) as usize];
                let (x0, y0) = ((i * 97) % (w - 290), (i * 53) % (h - 160));
                for y in y0..y0 + 160 {
                    for x in x0..x0 + 288 {
                        pixels[(y * w + x) as usize] = 1;
                    }
                }
                mask(i as f32 / 100.0, &pixels, w, h, i)
            })
            .collect();
        let m = masks(list, w, h);
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            let image = label_image(&m, &labels(&m).unwrap(), &Header::default());
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
            assert_eq!(image.data.len(), (w * h * 2) as usize);
        }
        println!("label image, 100 masks at {w}x{h}: {best:.1} ms (best of 5)");
    }

    #[test]
    fn stamps_map_the_monotonic_capture_to_the_system_clock() {
        let t = stamp_from_capture(1_000, 3_000, 10_000_000_500);
        assert_eq!((t.sec, t.nanosec), (9, 999_998_500));
        // A capture after "now" (the clocks were read in between) is stamped now.
        let t = stamp_from_capture(5_000, 3_000, 10_000_000_500);
        assert_eq!((t.sec, t.nanosec), (10, 500));
        // Past 2038 the seconds saturate instead of wrapping.
        assert_eq!(stamp_from_capture(0, 0, u64::MAX).sec, i32::MAX);
    }
}
