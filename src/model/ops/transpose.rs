//! f32 matrix transposes for our fused ops, whole tiles at a time in vector registers: 8 × 8 with
//! AVX (x86_64, chosen at run time), 4 × 4 with NEON (aarch64); the edges (and other CPUs)
//! value by value.
//!
//! The fused ops switch layouts a row at a time (CHW planes to pixel-major rows and back in the
//! MBConv and stem ops, tiles of scores in the decoder's): done value by value, with a bounds
//! check each, those copies were 10 % of a stage-0 MBConv block on AVX2 (`perf`). A tile held in
//! registers moves with a few shuffles per vector instead. Values are only moved, so the result
//! is the same bits on every path.
#![allow(unsafe_code)]

/// `dst[c · rows + r] = src[r · cols + c]`: a `rows × cols` matrix transposed.
#[inline]
pub fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    transpose_strided(src, (rows, cols), cols, 0, dst);
}

/// `dst[c · rows + r] = src[offset + r · stride + c]` for `r < rows`, `c < cols`: `rows` runs of
/// `cols` values, `stride` apart, transposed. Panics if `src` or `dst` is too short (or
/// `stride < cols`), before anything is written.
pub fn transpose_strided(
    src: &[f32],
    shape: (usize, usize),
    stride: usize,
    offset: usize,
    dst: &mut [f32],
) {
    moved_in_tiles(tile_side(), src, shape, stride, offset, dst);
}

/// [`transpose_strided`] with tiles of `tile` (1: value by value; else the side of the tile
/// kernel this CPU has).
fn moved_in_tiles(
    tile: usize,
    src: &[f32],
    (rows, cols): (usize, usize),
    stride: usize,
    offset: usize,
    dst: &mut [f32],
) {
    if rows == 0 || cols == 0 {
        return;
    }
    // The last value read and the last written, checked once: every tile below lies inside.
    let last_read = (rows - 1)
        .checked_mul(stride)
        .and_then(|v| v.checked_add(offset))
        .and_then(|v| v.checked_add(cols - 1));
    assert!(
        stride >= cols && last_read.is_some_and(|last| last < src.len()),
        "transpose: the source holds too few values"
    );
    assert!(
        rows.checked_mul(cols).is_some_and(|n| n <= dst.len()),
        "transpose: the destination holds too few values"
    );
    assert!(
        tile == 1 || tile == tile_side(),
        "transpose: no {tile} x {tile} tiles here"
    );
    let (whole_rows, whole_cols) = if tile > 1 {
        (rows / tile * tile, cols / tile * tile)
    } else {
        (0, 0)
    };
    for r0 in (0..whole_rows).step_by(tile) {
        for c0 in (0..whole_cols).step_by(tile) {
            let (from, to) = (offset + r0 * stride + c0, c0 * rows + r0);
            // SAFETY: rows r0 .. r0 + tile and columns c0 .. c0 + tile are inside the matrix,
            // whose last source and destination values were checked above; the tile is this
            // CPU's tile kernel's (checked above).
            unsafe { move_tile(src, from, stride, dst, to, rows) };
        }
    }
    // The edges, value by value: the columns past the whole tiles (every row), then the rows
    // past them (the whole tiles' columns).
    let edge = |r: usize, columns: std::ops::Range<usize>, dst: &mut [f32]| {
        let run = &src[offset + r * stride + columns.start..offset + r * stride + columns.end];
        for (c, &v) in columns.zip(run) {
            dst[c * rows + r] = v;
        }
    };
    if whole_cols < cols {
        for r in 0..rows {
            edge(r, whole_cols..cols, dst);
        }
    }
    for r in whole_rows..rows {
        edge(r, 0..whole_cols, dst);
    }
}

/// The side of the tiles this CPU moves in registers (1: none, all values go value by value):
/// on x86_64 with AVX unless `TINYSAM_ISA=portable` ([`super::graph::ceiling`]).
#[inline]
fn tile_side() -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        use super::graph::{ceiling, Isa};
        if ceiling() >= Isa::Avx2 && std::arch::is_x86_feature_detected!("avx") {
            8
        } else {
            1
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        4
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        1
    }
}

/// One tile of [`tile_side`]: source rows from `src[from..]`, `stride` apart, to destination
/// rows (the source's columns) from `dst[to..]`, `rows` apart.
///
/// # Safety
/// The tile lies inside both slices, and the CPU has the tile's kernel (`tile_side() > 1`).
#[inline]
unsafe fn move_tile(
    src: &[f32],
    from: usize,
    stride: usize,
    dst: &mut [f32],
    to: usize,
    rows: usize,
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's contract (AVX present, the 8 × 8 tile inside both slices).
    unsafe {
        tile_avx(
            src.as_ptr().add(from),
            stride,
            dst.as_mut_ptr().add(to),
            rows,
        )
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: the caller's contract (the 4 × 4 tile inside both slices; NEON is always there).
    unsafe {
        tile_neon(
            src.as_ptr().add(from),
            stride,
            dst.as_mut_ptr().add(to),
            rows,
        )
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = (src, from, stride, dst, to, rows);
        unreachable!("no tile kernel on this CPU");
    }
}

/// 8 × 8 values: unpack pairs of rows, shuffle quadruples, swap 128-bit halves.
///
/// # Safety
/// AVX present; 8 rows of 8 values readable from `src`, `stride` apart, and 8 rows of 8
/// writable at `dst`, `dst_stride` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn tile_avx(src: *const f32, stride: usize, dst: *mut f32, dst_stride: usize) {
    use std::arch::x86_64::*;
    // SAFETY (every load and store): the caller's contract.
    let r: [__m256; 8] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(src.add(i * stride)) });
    // Pairs of rows interleaved: (0, 1), (2, 3), (4, 5), (6, 7), low and high values.
    let t = [
        _mm256_unpacklo_ps(r[0], r[1]),
        _mm256_unpackhi_ps(r[0], r[1]),
        _mm256_unpacklo_ps(r[2], r[3]),
        _mm256_unpackhi_ps(r[2], r[3]),
        _mm256_unpacklo_ps(r[4], r[5]),
        _mm256_unpackhi_ps(r[4], r[5]),
        _mm256_unpacklo_ps(r[6], r[7]),
        _mm256_unpackhi_ps(r[6], r[7]),
    ];
    // Columns j and j + 4 of four rows in each 128-bit half.
    let s = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
    ];
    for j in 0..4 {
        let low = _mm256_permute2f128_ps::<0x20>(s[j], s[j + 4]);
        let high = _mm256_permute2f128_ps::<0x31>(s[j], s[j + 4]);
        unsafe {
            _mm256_storeu_ps(dst.add(j * dst_stride), low);
            _mm256_storeu_ps(dst.add((j + 4) * dst_stride), high);
        }
    }
}

/// 4 × 4 values: interleave pairs of rows, then pairs of 64-bit halves.
///
/// # Safety
/// 4 rows of 4 values readable from `src`, `stride` apart, and 4 rows of 4 writable at `dst`,
/// `dst_stride` apart.
#[cfg(target_arch = "aarch64")]
#[inline]
unsafe fn tile_neon(src: *const f32, stride: usize, dst: *mut f32, dst_stride: usize) {
    use std::arch::aarch64::*;
    // SAFETY (every load and store): the caller's contract.
    unsafe {
        let r: [float32x4_t; 4] = std::array::from_fn(|i| vld1q_f32(src.add(i * stride)));
        let t0 = vreinterpretq_f64_f32(vtrn1q_f32(r[0], r[1]));
        let t1 = vreinterpretq_f64_f32(vtrn2q_f32(r[0], r[1]));
        let t2 = vreinterpretq_f64_f32(vtrn1q_f32(r[2], r[3]));
        let t3 = vreinterpretq_f64_f32(vtrn2q_f32(r[2], r[3]));
        vst1q_f32(dst, vreinterpretq_f32_f64(vtrn1q_f64(t0, t2)));
        vst1q_f32(
            dst.add(dst_stride),
            vreinterpretq_f32_f64(vtrn1q_f64(t1, t3)),
        );
        vst1q_f32(
            dst.add(2 * dst_stride),
            vreinterpretq_f32_f64(vtrn2q_f64(t0, t2)),
        );
        vst1q_f32(
            dst.add(3 * dst_stride),
            vreinterpretq_f32_f64(vtrn2q_f64(t1, t3)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(
        src: &[f32],
        (rows, cols): (usize, usize),
        stride: usize,
        offset: usize,
    ) -> Vec<f32> {
        let mut out = vec![f32::NAN; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                out[c * rows + r] = src[offset + r * stride + c];
            }
        }
        out
    }

    #[test]
    fn every_shape_moves_every_value_to_its_place() {
        for rows in [1usize, 3, 4, 7, 8, 9, 16, 17, 33] {
            for cols in [1usize, 2, 4, 5, 8, 12, 16, 31, 64] {
                for (stride, offset) in [(cols, 0), (cols + 3, 5)] {
                    let src: Vec<f32> = (0..offset + rows * stride + 2)
                        .map(|i| i as f32 + 0.5)
                        .collect();
                    let want = reference(&src, (rows, cols), stride, offset);
                    for tile in [1, tile_side()] {
                        let mut dst = vec![-1f32; rows * cols + 4];
                        moved_in_tiles(tile, &src, (rows, cols), stride, offset, &mut dst);
                        assert_eq!(
                            &dst[..rows * cols],
                            &want[..],
                            "{rows} x {cols}, {stride}, {tile}"
                        );
                        assert!(dst[rows * cols..].iter().all(|&v| v == -1.0), "wrote past");
                    }
                }
            }
        }
    }

    #[test]
    fn non_finite_values_keep_their_bits() {
        let src: Vec<f32> = (0..64)
            .map(|i| match i % 4 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => -0.0,
                _ => f32::from_bits(1),
            })
            .collect();
        let mut dst = vec![0f32; 64];
        transpose(&src, 8, 8, &mut dst);
        for r in 0..8 {
            for c in 0..8 {
                assert_eq!(dst[c * 8 + r].to_bits(), src[r * 8 + c].to_bits());
            }
        }
    }

    #[test]
    #[should_panic(expected = "source holds too few")]
    fn a_short_source_panics_before_writing() {
        let mut dst = vec![0f32; 64];
        transpose(&[0f32; 63], 8, 8, &mut dst);
    }
}
