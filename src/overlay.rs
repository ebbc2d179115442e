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

/// Blend a label image over `frame` (`labels`: one value per pixel, row-major, 0 = none, `l` =
/// mask `l - 1`): each labelled pixel half its colour ([`color`] of `l - 1`), its region's edge
/// (a 4-neighbour with another label, or the frame's border) in full colour. `false` (and the
/// frame unchanged) if the sizes differ.
pub fn draw_labels(frame: &mut RgbImage, labels: &[u16]) -> bool {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    if labels.len() != w * h {
        return false;
    }
    let label = |x: usize, y: usize| labels[y * w + x];
    for (x, y, px) in frame.enumerate_pixels_mut() {
        let (x, y) = (x as usize, y as usize);
        let l = label(x, y);
        if l == 0 {
            continue;
        }
        let c = color(usize::from(l) - 1);
        let edge = x == 0
            || y == 0
            || x + 1 == w
            || y + 1 == h
            || label(x - 1, y) != l
            || label(x + 1, y) != l
            || label(x, y - 1) != l
            || label(x, y + 1) != l;
        *px = if edge {
            Rgb(c)
        } else {
            Rgb(std::array::from_fn(|k| {
                // (a + b) / 2 of two bytes: at most 255.
                ((u16::from(px.0[k]) + u16::from(c[k])) / 2) as u8
            }))
        };
    }
    true
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_half_blended_inside_and_outlined() {
        // 5x4 frame of grey 100; label 1 on a 3x3 block at (1, 0), label 2 at (4, 3).
        let mut frame = RgbImage::from_pixel(5, 4, Rgb([100, 100, 100]));
        let mut labels = vec![0u16; 20];
        for y in 0..3 {
            for x in 1..4 {
                labels[y * 5 + x] = 1;
            }
        }
        labels[3 * 5 + 4] = 2;
        assert!(draw_labels(&mut frame, &labels));
        let c0 = color(0);
        let half = Rgb(c0.map(|v| ((u16::from(v) + 100) / 2) as u8));
        // The block's centre (2, 1) is inside; its other pixels are on an edge.
        assert_eq!(*frame.get_pixel(2, 1), half);
        assert_eq!(*frame.get_pixel(1, 1), Rgb(c0));
        assert_eq!(
            *frame.get_pixel(2, 0),
            Rgb(c0),
            "the frame's border is an edge"
        );
        assert_eq!(*frame.get_pixel(4, 3), Rgb(color(1)));
        assert_eq!(*frame.get_pixel(0, 0), Rgb([100, 100, 100]));
        assert!(!draw_labels(&mut frame, &labels[..19]));
    }
}
