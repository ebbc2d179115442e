//! Pictures a person can look at: masks blended over the frame, with prompts drawn on top.

use image::{Rgb, RgbImage};

use crate::postprocess::BinaryMask;
use crate::prompt::{PointLabel, Prompt};

/// A fixed, distinguishable palette (cycled).
const PALETTE: [[u8; 3]; 10] = [
    [230, 25, 75],
    [60, 180, 75],
    [255, 225, 25],
    [0, 130, 200],
    [245, 130, 48],
    [145, 30, 180],
    [70, 240, 240],
    [240, 50, 230],
    [210, 245, 60],
    [250, 190, 212],
];

/// Colour `i` of the palette.
pub fn color(i: usize) -> [u8; 3] {
    PALETTE[i % PALETTE.len()]
}

/// Blend each mask over `frame` (alpha 0.5) and outline it.
pub fn draw_masks(frame: &mut RgbImage, masks: &[&BinaryMask]) {
    for (i, mask) in masks.iter().enumerate() {
        if mask.width != frame.width() || mask.height != frame.height() {
            continue;
        }
        let c = color(i);
        for (x, y, px) in frame.enumerate_pixels_mut() {
            if mask.get(x, y) == 0 {
                continue;
            }
            let edge = x == 0
                || y == 0
                || mask.get(x - 1, y) == 0
                || mask.get(x + 1, y) == 0
                || mask.get(x, y - 1) == 0
                || mask.get(x, y + 1) == 0;
            for (v, &cv) in px.0.iter_mut().zip(&c) {
                // The mean of two u8 values fits in u8.
                *v = if edge {
                    cv
                } else {
                    ((u16::from(*v) + u16::from(cv)) / 2) as u8
                };
            }
        }
    }
}

/// Draw points (green foreground, red background) and boxes (white) of `prompts`.
pub fn draw_prompts(frame: &mut RgbImage, prompts: &[Prompt]) {
    let (w, h) = (frame.width() as i64, frame.height() as i64);
    let mut put = |x: i64, y: i64, c: [u8; 3]| {
        if x >= 0 && y >= 0 && x < w && y < h {
            frame.put_pixel(x as u32, y as u32, Rgb(c));
        }
    };
    for p in prompts {
        for pt in &p.points {
            let c = if pt.label == PointLabel::Foreground {
                [0, 255, 0]
            } else {
                [255, 0, 0]
            };
            let (cx, cy) = (pt.x as i64, pt.y as i64);
            for dy in -5i64..=5 {
                for dx in -5i64..=5 {
                    let d2 = dx * dx + dy * dy;
                    if d2 <= 25 {
                        put(cx + dx, cy + dy, if d2 >= 16 { [0, 0, 0] } else { c });
                    }
                }
            }
        }
        if let Some(b) = p.bbox {
            let (x0, y0, x1, y1) = (b.x0 as i64, b.y0 as i64, b.x1 as i64, b.y1 as i64);
            for t in 0..2 {
                for x in x0..=x1 {
                    put(x, y0 + t, [255, 255, 255]);
                    put(x, y1 - t, [255, 255, 255]);
                }
                for y in y0..=y1 {
                    put(x0 + t, y, [255, 255, 255]);
                    put(x1 - t, y, [255, 255, 255]);
                }
            }
        }
    }
}
