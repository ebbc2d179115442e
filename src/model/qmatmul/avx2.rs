//! The i16-pair tile on AVX2: `vpmaddwd` multiplies 16 i16 pairs and adds each pair into an i32
//! lane — 16 exact multiply-adds an instruction, two per cycle on Zen 3 — with the
//! requantization done on the 12 accumulator registers before they leave the core.

use super::TileRequant;

/// Whether this CPU has AVX2.
pub(super) fn is_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Same contract as `portable::tile`; falls back to it where AVX2 is missing.
pub(super) fn tile(a: &[i32], b: &[i16], requant: TileRequant<'_>, out: &mut [i8]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_supported() {
            // SAFETY: AVX2 is present; the slices' lengths are checked inside.
            unsafe { tile_avx2(a, b, requant, out) };
            return;
        }
    }
    super::portable::tile(a, b, requant, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn tile_avx2(a: &[i32], b: &[i16], (bias, scale, zp): TileRequant<'_>, out: &mut [i8]) {
    use super::{PAIR_MR as MR, PAIR_NR as NR};
    use std::arch::x86_64::*;
    let pairs = a.len() / MR;
    assert!(b.len() >= pairs * 2 * NR && out.len() >= MR * NR);
    assert!(bias.len() >= NR && scale.len() >= NR);
    let mut acc = [_mm256_setzero_si256(); 2 * MR];
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    for kk in 0..pairs {
        // SAFETY (both loads): kk < pairs, so 32 i16 of B and MR i32 of A are in bounds.
        let b0 = unsafe { _mm256_loadu_si256(bp.add(kk * 2 * NR) as *const __m256i) };
        let b1 = unsafe { _mm256_loadu_si256(bp.add(kk * 2 * NR + 16) as *const __m256i) };
        for r in 0..MR {
            let av = _mm256_set1_epi32(unsafe { *ap.add(kk * MR + r) });
            acc[2 * r] = _mm256_add_epi32(acc[2 * r], _mm256_madd_epi16(av, b0));
            acc[2 * r + 1] = _mm256_add_epi32(acc[2 * r + 1], _mm256_madd_epi16(av, b1));
        }
    }
    // Requantize: (acc + bias) as f32 * scale, rounded to nearest even (the MXCSR default, as
    // `round_ties_even`), + zero point, saturated to i8 by the two packs. Clamping the floats to
    // ±1e9 first keeps out-of-range values saturating instead of turning into i32::MIN.
    // SAFETY: NR = 16 values of bias and scale, checked above.
    let (bias0, bias1, scale0, scale1) = unsafe {
        (
            _mm256_loadu_si256(bias.as_ptr() as *const __m256i),
            _mm256_loadu_si256(bias.as_ptr().add(8) as *const __m256i),
            _mm256_loadu_ps(scale.as_ptr()),
            _mm256_loadu_ps(scale.as_ptr().add(8)),
        )
    };
    let (lo, hi, zpv) = (
        _mm256_set1_ps(-1e9),
        _mm256_set1_ps(1e9),
        _mm256_set1_epi32(zp),
    );
    let to_i32 = |v: __m256i, bias: __m256i, scale: __m256| {
        let x = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(v, bias)), scale);
        let x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
        _mm256_add_epi32(_mm256_cvtps_epi32(x), zpv)
    };
    for r in 0..MR {
        let c0 = to_i32(acc[2 * r], bias0, scale0);
        let c1 = to_i32(acc[2 * r + 1], bias1, scale1);
        // packs works per 128-bit lane: [c0 0-3, c1 0-3 | c0 4-7, c1 4-7]; reorder to columns.
        let w = _mm256_permute4x64_epi64(_mm256_packs_epi32(c0, c1), 0b11_01_10_00);
        let bytes = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
        // SAFETY: row r's 16 bytes are inside `out` (MR × NR, checked above).
        unsafe { _mm_storeu_si128(out.as_mut_ptr().add(r * NR) as *mut __m128i, bytes) };
    }
}

/// Quantize `src` into `dst` with `q`: eight values an instruction where AVX2 is present.
pub(super) fn quantize(src: &[f32], q: super::Quantize, dst: &mut [i8]) {
    assert_eq!(src.len(), dst.len(), "quantize: lengths differ");
    #[cfg(target_arch = "x86_64")]
    {
        if is_supported() {
            // SAFETY: AVX2 is present; lengths checked above.
            unsafe { quantize_avx2(src, q, dst) };
            return;
        }
    }
    for (x, y) in src.iter().zip(dst.iter_mut()) {
        *y = q.apply(*x);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_avx2(src: &[f32], q: super::Quantize, dst: &mut [i8]) {
    use std::arch::x86_64::*;
    let n8 = src.len() / 8 * 8;
    let (scale, lo, hi, zp) = (
        _mm256_set1_ps(q.scale),
        _mm256_set1_ps(-1e9),
        _mm256_set1_ps(1e9),
        _mm256_set1_epi32(q.zero_point),
    );
    for i in (0..n8).step_by(8) {
        // SAFETY: i + 8 <= n8 <= len of both slices.
        let x = unsafe { _mm256_loadu_ps(src.as_ptr().add(i)) };
        let x = _mm256_mul_ps(x, scale);
        // NaN → 0 (as `as i32` does), then clamp so the conversion cannot overflow; the
        // conversion rounds to nearest even (MXCSR default), as `round_ties_even`.
        let x = _mm256_and_ps(x, _mm256_cmp_ps::<_CMP_ORD_Q>(x, x));
        let x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
        let v = _mm256_add_epi32(_mm256_cvtps_epi32(x), zp);
        let w = _mm256_packs_epi32(v, v); // [v0-3, v0-3 | v4-7, v4-7] as i16
        let w = _mm256_permute4x64_epi64(w, 0b11_01_10_00); // v0-7 in the low 128 bits
        let b = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_castsi256_si128(w));
        // SAFETY: 8 bytes at i are inside dst.
        unsafe { _mm_storel_epi64(dst.as_mut_ptr().add(i) as *mut __m128i, b) };
    }
    for i in n8..src.len() {
        dst[i] = q.apply(src[i]);
    }
}
