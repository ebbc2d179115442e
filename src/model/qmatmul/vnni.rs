//! The AVX-512 VNNI tile: `vpdpbusd` multiplies 64 u8 × i8 pairs and adds each group of four
//! into an i32 lane — 64 exact multiply-adds an instruction, four times `vpmaddwd` on AVX2.
//!
//! `vpdpbusd` wants its first operand unsigned, so A is packed as `a + 128` (the sign bit
//! flipped) and the excess `128 · Σ_k b[k][c]` is taken off each column's bias
//! ([`super::PackedB`] keeps it per column). The products are exact and the i32 sums cannot
//! overflow for any k below 2^31 / (255 · 128 · 4): the result is the same integers as the
//! reference.

use super::{Dequantize, TileRequant};

/// Tile rows.
pub(super) const MR: usize = 8;
/// Tile columns: two 512-bit registers of i32 lanes. With 8 rows that is 16 accumulators (a
/// `vpdpbusd` has 5 cycles of latency and two issue ports: 8 independent sums, the 8×16 tile
/// this replaced, could keep only 1.6 of the 2 busy) and one A broadcast per 2 instructions.
pub(super) const NR: usize = 32;
/// i32 lanes per register.
#[cfg(target_arch = "x86_64")]
const LANES: usize = 16;

/// Whether this CPU has AVX-512F and AVX-512 VNNI.
pub(super) fn is_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `Σ_q Σ_d a[q][r][d] · b[q][c][d]` over packed quads with A's bytes read as `u8`, requantized
/// into `out` (row-major MR × NR); the bias must already hold the `-128 · Σ b` correction.
///
/// `a`: per k quad, MR rows × 4 depths (sign bit flipped); `b`: per k quad, NR columns × 4.
pub(super) fn tile(a: &[i8], b: &[i8], requant: TileRequant<'_>, out: &mut [i8]) {
    let quads = a.len() / (MR * 4);
    assert!(b.len() >= quads * NR * 4 && out.len() >= MR * NR);
    assert!(requant.0.len() >= NR && requant.1.len() >= NR);
    #[cfg(target_arch = "x86_64")]
    {
        if is_supported() {
            // SAFETY: AVX-512F and VNNI are present; lengths checked above.
            unsafe { tile_vnni::<false>(a, b, quads, requant, out.as_mut_ptr(), None) };
            return;
        }
    }
    tile_reference(a, b, quads, requant, out)
}

/// [`tile`], then dequantized by `dq` into `out` (row-major MR × NR f32): the same values as
/// `dq.apply` of each i8 result, computed in registers.
pub(super) fn tile_f32(
    a: &[i8],
    b: &[i8],
    requant: TileRequant<'_>,
    dq: Dequantize,
    out: &mut [f32],
) {
    let quads = a.len() / (MR * 4);
    assert!(b.len() >= quads * NR * 4 && out.len() >= MR * NR);
    assert!(requant.0.len() >= NR && requant.1.len() >= NR);
    #[cfg(target_arch = "x86_64")]
    {
        if is_supported() {
            // SAFETY: AVX-512F and VNNI are present; lengths checked above.
            unsafe {
                tile_vnni::<true>(
                    a,
                    b,
                    quads,
                    requant,
                    std::ptr::null_mut(),
                    Some((dq, out.as_mut_ptr())),
                )
            };
            return;
        }
    }
    let mut bytes = [0i8; MR * NR];
    tile_reference(a, b, quads, requant, &mut bytes);
    for (o, &v) in out.iter_mut().zip(&bytes) {
        *o = dq.apply(v);
    }
}

/// The tile in plain Rust (for CPUs without VNNI, where the kernel is not chosen anyway).
fn tile_reference(a: &[i8], b: &[i8], quads: usize, requant: TileRequant<'_>, out: &mut [i8]) {
    let mut acc = [0i32; MR * NR];
    for q in 0..quads {
        for r in 0..MR {
            for c in 0..NR {
                for d in 0..4 {
                    let av = a[(q * MR + r) * 4 + d] as u8 as i32;
                    acc[r * NR + c] += av * b[(q * NR + c) * 4 + d] as i32;
                }
            }
        }
    }
    super::requant_tile(&acc, NR, requant, out);
}

/// The VNNI tile: requantized i8 results to `out_i8` (MR × NR, row-major), or with `F32`
/// dequantized by `dq` to its f32 pointer instead.
///
/// # Safety
/// AVX-512F and VNNI present; `a` and `b` hold `quads` quads; the pointer written holds MR × NR
/// values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn tile_vnni<const F32: bool>(
    a: &[i8],
    b: &[i8],
    quads: usize,
    (bias, scale, zp): TileRequant<'_>,
    out_i8: *mut i8,
    dq: Option<(Dequantize, *mut f32)>,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_si512(); NR / LANES]; MR];
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    for q in 0..quads {
        // SAFETY (all reads): q < quads, so the NR × 4 bytes of B and the MR × 4 bytes of A of
        // this quad are inside the slices (checked by the caller).
        let bq = unsafe { bp.add(q * NR * 4) };
        let bv: [__m512i; NR / LANES] = std::array::from_fn(|h| unsafe {
            _mm512_loadu_si512(bq.add(h * LANES * 4) as *const __m512i)
        });
        for (r, acc) in acc.iter_mut().enumerate() {
            let quad = unsafe { std::ptr::read_unaligned(ap.add((q * MR + r) * 4) as *const i32) };
            let av = _mm512_set1_epi32(quad);
            for (acc, &bv) in acc.iter_mut().zip(&bv) {
                *acc = _mm512_dpbusd_epi32(*acc, av, bv);
            }
        }
    }
    // Requantize as the AVX2 tile does: (acc + bias) as f32 * scale, rounded to nearest even
    // (the MXCSR default), clamped to ±1e9 so huge values saturate, + zero point, then the
    // saturating narrow to i8.
    // SAFETY: NR values of bias and scale, checked by the caller.
    let (biasv, scalev): ([__m512i; NR / LANES], [__m512; NR / LANES]) = unsafe {
        (
            std::array::from_fn(|h| {
                _mm512_loadu_si512(bias.as_ptr().add(h * LANES) as *const __m512i)
            }),
            std::array::from_fn(|h| _mm512_loadu_ps(scale.as_ptr().add(h * LANES))),
        )
    };
    let (lo, hi, zpv) = (
        _mm512_set1_ps(-1e9),
        _mm512_set1_ps(1e9),
        _mm512_set1_epi32(zp),
    );
    // Dequantization as `Dequantize::apply`: (q - zero point) as f32 * scale.
    let (dq_zp, dq_scale, dq_out) = match dq {
        Some((d, p)) => (_mm512_set1_epi32(d.zero_point), _mm512_set1_ps(d.scale), p),
        None => (
            _mm512_setzero_si512(),
            _mm512_setzero_ps(),
            std::ptr::null_mut(),
        ),
    };
    for (r, acc) in acc.iter().enumerate() {
        for h in 0..NR / LANES {
            let x = _mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_add_epi32(acc[h], biasv[h])),
                scalev[h],
            );
            let x = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
            let v = _mm512_add_epi32(_mm512_cvtps_epi32(x), zpv);
            let bytes = _mm512_cvtsepi32_epi8(v);
            let at = r * NR + h * LANES;
            if F32 {
                let q = _mm512_sub_epi32(_mm512_cvtepi8_epi32(bytes), dq_zp);
                let f = _mm512_mul_ps(_mm512_cvtepi32_ps(q), dq_scale);
                // SAFETY: these LANES values of row r are inside the f32 tile (MR × NR, the
                // caller's contract).
                unsafe { _mm512_storeu_ps(dq_out.add(at), f) };
            } else {
                // SAFETY: these LANES bytes of row r are inside `out_i8` (MR × NR, the
                // caller's contract).
                unsafe { _mm_storeu_si128(out_i8.add(at) as *mut __m128i, bytes) };
            }
        }
    }
}
