//! Mask outlines as COCO polygons: outer borders traced by imageproc (Suzuki–Abe), simplified by
//! Douglas–Peucker to within `tolerance` pixels.

use image::GrayImage;
use imageproc::contours::{find_contours, BorderType};
use imageproc::geometry::approximate_polygon_dp;

use super::BinaryMask;

/// Outer contours of `mask` as flat `[x0, y0, x1, y1, ...]` lists (≥ 3 vertices each), largest
/// outline first; holes are not returned (COCO polygons describe outer borders).
pub fn mask_polygons(mask: &BinaryMask, tolerance: f64) -> Vec<Vec<i32>> {
    let Some(image) = GrayImage::from_raw(mask.width, mask.height, mask.data.clone()) else {
        return Vec::new();
    };
    let mut polygons: Vec<Vec<i32>> = find_contours::<i32>(&image)
        .into_iter()
        .filter(|c| c.border_type == BorderType::Outer)
        .map(|c| {
            let simplified = if tolerance > 0.0 && c.points.len() > 3 {
                approximate_polygon_dp(&c.points, tolerance, true)
            } else {
                c.points
            };
            simplified
                .iter()
                .flat_map(|p| [p.x, p.y])
                .collect::<Vec<i32>>()
        })
        .filter(|flat| flat.len() >= 6)
        .collect();
    polygons.sort_by_key(|p| std::cmp::Reverse(p.len()));
    polygons
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rectangle_becomes_four_corners() {
        let (w, h) = (20u32, 10u32);
        let mut data = vec![0u8; (w * h) as usize];
        for y in 2..7 {
            for x in 3..15 {
                data[(y * w + x) as usize] = 1;
            }
        }
        let mask = BinaryMask {
            width: w,
            height: h,
            data,
        };
        let polys = mask_polygons(&mask, 1.0);
        assert_eq!(polys.len(), 1);
        let mut corners: Vec<(i32, i32)> = polys[0].chunks(2).map(|p| (p[0], p[1])).collect();
        corners.sort();
        assert_eq!(corners, vec![(3, 2), (3, 6), (14, 2), (14, 6)]);
    }

    #[test]
    fn empty_mask_has_no_polygon() {
        let mask = BinaryMask {
            width: 4,
            height: 4,
            data: vec![0; 16],
        };
        assert!(mask_polygons(&mask, 1.0).is_empty());
    }
}
