//! Pillow's bilinear resize of 8-bit RGB images, bit for bit.
//!
//! SAM's `ResizeLongestSide` resizes the frame with `PIL.Image.resize(size, BILINEAR)`, and the
//! masks are sensitive to a single grey level of difference in its output, so this module
//! reproduces Pillow's algorithm (`libImaging/Resample.c`) exactly rather than approximating it:
//!
//! - per output pixel along each axis, a triangle filter stretched by the downscale factor
//!   (antialiasing; plain bilinear interpolation when enlarging), its weights computed in `f64`,
//!   normalised to sum to one, then rounded to fixed point with `PRECISION_BITS` fraction bits;
//! - a horizontal pass over only the rows the vertical pass reads, kept as 8-bit pixels (rounded
//!   and clamped), then the vertical pass over those;
//! - each sum starts at one half (`1 << (PRECISION_BITS - 1)`) and is shifted right and clamped
//!   to `0..=255`.
//!
//! The golden tests compare it with Pillow's output on odd, enlarged, reduced and 1 × N sizes
//! (`tests/fixtures/reference/`, made by `python -m tinysam_export reference-fixtures`).

/// Fraction bits of Pillow's fixed-point coefficients for 8-bit images (`32 - 8 - 2`: 8 bits of
/// pixel, 2 of headroom for filters with negative lobes).
const PRECISION_BITS: u32 = 22;

/// Pillow's bilinear (triangle) filter of support 1.
fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// The fixed-point filter taps of every output pixel along one axis.
#[derive(Debug, Clone)]
struct AxisTaps {
    /// Per output pixel: first input index and number of taps.
    bounds: Vec<(usize, usize)>,
    /// Per output pixel, `stride` coefficients (the first `bounds[i].1` used).
    coefficients: Vec<i32>,
    stride: usize,
}

impl AxisTaps {
    /// Pillow's `precompute_coeffs` then `normalize_coeffs_8bpc` for `input` pixels resized to
    /// `output` (both at least 1), the whole input as the source box.
    fn new(input: usize, output: usize) -> AxisTaps {
        let scale = input as f64 / output as f64;
        let filter_scale = scale.max(1.0);
        let support = filter_scale;
        // Pillow multiplies by the reciprocal (not the same rounding as dividing).
        let inverse_scale = 1.0 / filter_scale;
        // `support` <= input (as output >= 1): a small positive value, the cast is exact.
        let stride = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(output);
        let mut coefficients = vec![0i32; output * stride];
        let mut weights = vec![0f64; stride];
        for (out, fixed) in coefficients.chunks_exact_mut(stride).enumerate() {
            let center = (out as f64 + 0.5) * scale;
            // Truncation towards zero, as C's `(int)` cast, then clamped to the input.
            let first = ((center - support + 0.5) as i64).max(0);
            let end = ((center + support + 0.5) as i64).min(input as i64);
            // Both in 0..=input, and `end > first` (the support is at least 1 wide).
            let (first, count) = (first as usize, (end - first).max(0) as usize);
            let count = count.min(stride);
            let mut total = 0f64;
            for (i, w) in weights[..count].iter_mut().enumerate() {
                *w = triangle(((first + i) as f64 - center + 0.5) * inverse_scale);
                total += *w;
            }
            for (w, k) in weights[..count].iter().zip(fixed.iter_mut()) {
                let w = if total != 0.0 { w / total } else { *w };
                // The triangle filter is never negative, so Pillow's rounding is `+ 0.5`, then
                // truncation; 0 <= w <= 1, so the value fits an i32 with room to spare.
                *k = (w * f64::from(1u32 << PRECISION_BITS) + 0.5) as i32;
            }
            bounds.push((first, count));
        }
        AxisTaps {
            bounds,
            coefficients,
            stride,
        }
    }

    /// Output pixel `out`'s first input index and its coefficients.
    fn taps(&self, out: usize) -> (usize, &[i32]) {
        let (first, count) = self.bounds[out];
        let at = out * self.stride;
        (first, &self.coefficients[at..at + count])
    }
}

/// A fixed-point sum back to a pixel: Pillow's `clip8`.
#[inline]
fn clip8(sum: i32) -> u8 {
    // Clamped to 0..=255 first, so the narrowing cast is exact.
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The rounding half every sum starts from.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Resize a packed RGB8 image (`width × height × 3` bytes, row-major) to `out_width ×
/// out_height`, exactly as `PIL.Image.resize((out_width, out_height), Image.BILINEAR)` does on an
/// `RGB` image. `None` if a size is zero or `rgb` does not hold `width × height` pixels.
///
/// Sums stay inside `i32`: the coefficients of a pixel are non-negative and sum to
/// `2^22` give or take a rounding unit per tap, so a sum is at most about `255 · 2^22 + 2^21`,
/// well below `2^31`.
pub fn resize_rgb8(
    rgb: &[u8],
    (width, height): (usize, usize),
    (out_width, out_height): (usize, usize),
) -> Option<Vec<u8>> {
    if width == 0 || height == 0 || out_width == 0 || out_height == 0 {
        return None;
    }
    if rgb.len() != width.checked_mul(height)?.checked_mul(3)? {
        return None;
    }
    out_width.checked_mul(out_height)?.checked_mul(3)?;
    let need_horizontal = out_width != width;
    let need_vertical = out_height != height;
    let vertical = AxisTaps::new(height, out_height);
    // The rows the vertical pass reads: only those go through the horizontal pass.
    let rows_first = vertical.bounds.first().map_or(0, |b| b.0);
    let rows_end = vertical.bounds.last().map_or(height, |&(f, n)| f + n);
    let (source, source_width, row_offset): (std::borrow::Cow<'_, [u8]>, usize, usize) =
        if need_horizontal {
            let horizontal = AxisTaps::new(width, out_width);
            let mut out = vec![0u8; out_width * (rows_end - rows_first) * 3];
            let rows = rgb
                .chunks_exact(width * 3)
                .skip(rows_first)
                .take(rows_end - rows_first);
            for (row, dst) in rows.zip(out.chunks_exact_mut(out_width * 3)) {
                resample_row(row, &horizontal, dst);
            }
            (out.into(), out_width, rows_first)
        } else {
            (rgb.into(), width, 0)
        };
    if !need_vertical {
        return Some(source.into_owned());
    }
    let row_len = source_width * 3;
    let mut out = vec![0u8; row_len * out_height];
    let mut sums = vec![0i32; row_len];
    for (y, dst) in out.chunks_exact_mut(row_len).enumerate() {
        let (first, taps) = vertical.taps(y);
        sums.fill(HALF);
        for (i, &k) in taps.iter().enumerate() {
            let at = (first + i - row_offset) * row_len;
            for (s, &p) in sums.iter_mut().zip(&source[at..at + row_len]) {
                *s += i32::from(p) * k;
            }
        }
        for (d, &s) in dst.iter_mut().zip(&sums) {
            *d = clip8(s);
        }
    }
    Some(out)
}

/// One row's horizontal pass: every output pixel from its taps along the row.
fn resample_row(row: &[u8], taps: &AxisTaps, dst: &mut [u8]) {
    for (x, px) in dst.chunks_exact_mut(3).enumerate() {
        let (first, coefficients) = taps.taps(x);
        let mut sums = [HALF; 3];
        for (src, &k) in row[first * 3..].chunks_exact(3).zip(coefficients) {
            for (s, &p) in sums.iter_mut().zip(src) {
                *s += i32::from(p) * k;
            }
        }
        for (d, s) in px.iter_mut().zip(sums) {
            *d = clip8(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_a_copy() {
        let rgb: Vec<u8> = (0..5 * 3 * 3).map(|i| (i * 37 % 256) as u8).collect();
        assert_eq!(resize_rgb8(&rgb, (5, 3), (5, 3)).unwrap(), rgb);
    }

    #[test]
    fn flat_images_stay_flat() {
        let rgb = [10u8, 200, 255].repeat(7 * 5);
        for size in [(1, 1), (3, 2), (14, 10), (7, 9), (100, 1)] {
            let out = resize_rgb8(&rgb, (7, 5), size).unwrap();
            assert!(out.chunks_exact(3).all(|p| p == [10, 200, 255]), "{size:?}");
        }
    }

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for (input, output) in [(7, 3), (3, 7), (1024, 769), (769, 1024), (1, 5), (5, 1)] {
            let taps = AxisTaps::new(input, output);
            for out in 0..output {
                let (first, k) = taps.taps(out);
                let sum: i32 = k.iter().sum();
                assert!(first + k.len() <= input);
                assert!((sum - (1 << PRECISION_BITS)).abs() <= k.len() as i32);
            }
        }
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(resize_rgb8(&[0; 12], (2, 2), (0, 3)).is_none());
        assert!(resize_rgb8(&[0; 11], (2, 2), (3, 3)).is_none());
        assert!(resize_rgb8(&[], (0, 2), (3, 3)).is_none());
    }
}

#[cfg(test)]
mod speed {
    /// Not a test: `cargo test --release --lib resize_speed -- --ignored --nocapture` times the
    /// resize of common camera sizes to SAM's 1024 (best of 10).
    #[test]
    #[ignore]
    fn resize_speed() {
        for (w, h, ow, oh) in [
            (640, 480, 1024, 768),
            (769, 770, 1023, 1024),
            (1280, 720, 1024, 576),
            (1920, 1080, 1024, 576),
        ] {
            let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 7919 % 251) as u8).collect();
            let best = (0..10)
                .map(|_| {
                    let t = std::time::Instant::now();
                    let out = super::resize_rgb8(&rgb, (w, h), (ow, oh)).expect("sizes");
                    std::hint::black_box(out);
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::MAX, f64::min);
            eprintln!("{w}x{h} -> {ow}x{oh}: {:.2} ms", best * 1e3);
        }
    }
}
