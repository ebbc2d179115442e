//! The `sdot` tile for Armv8.2 dotprod cores (Cortex-A76 in the Raspberry Pi 5, Jetson Orin's
//! A78AE): each `sdot` multiplies four i8 quads and adds them into four i32 lanes.

use super::{requant_tile, TileRequant};

/// Tile rows.
pub(super) const MR: usize = 8;
/// Tile columns.
pub(super) const NR: usize = 8;

/// Whether this CPU has the dotprod extension.
pub(super) fn is_supported() -> bool {
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("dotprod")
    }
    #[cfg(not(target_arch = "aarch64"))]
    {
        false
    }
}

/// Sums `Σ_q Σ_d a[q][r][d] · b[q][c][d]` over packed quads, requantized into `out`
/// (row-major MR × NR).
///
/// `a`: per k quad, MR rows × 4 depths; `b`: per k quad, NR columns × 4 depths.
pub(super) fn tile(a: &[i8], b: &[i8], requant: TileRequant<'_>, out: &mut [i8]) {
    let mut acc = [0i32; MR * NR];
    sums(a, b, &mut acc);
    requant_tile(&acc, NR, requant, out);
}

/// The i32 sums alone.
fn sums(a: &[i8], b: &[i8], tile: &mut [i32]) {
    let quads = a.len() / (MR * 4);
    assert!(b.len() >= quads * NR * 4 && tile.len() >= MR * NR);
    #[cfg(target_arch = "aarch64")]
    {
        if is_supported() && quads > 0 {
            // SAFETY: dotprod is present; lengths checked above.
            unsafe { tile_sdot(a, b, quads, tile) };
            return;
        }
    }
    tile_scalar(a, b, quads, tile)
}

/// The same sums without `sdot` (used off aarch64, and by tests as a cross-check).
fn tile_scalar(a: &[i8], b: &[i8], quads: usize, tile: &mut [i32]) {
    tile[..MR * NR].fill(0);
    for q in 0..quads {
        for r in 0..MR {
            for c in 0..NR {
                let mut s = 0i32;
                for d in 0..4 {
                    s += a[(q * MR + r) * 4 + d] as i32 * b[(q * NR + c) * 4 + d] as i32;
                }
                tile[r * NR + c] += s;
            }
        }
    }
}

#[cfg(target_arch = "aarch64")]
#[target_feature(enable = "neon,dotprod")]
unsafe fn tile_sdot(a: &[i8], b: &[i8], quads: usize, tile: &mut [i32]) {
    // v0..v15: accumulators, row r in v(2r) (columns 0-3) and v(2r+1) (columns 4-7).
    // Per quad: B columns 0-3 in v16, 4-7 in v17; A rows 0-3 in v18, rows 4-7 in v19.
    // SAFETY: reads `quads` × 32 bytes of each of A and B and writes 64 i32, all in bounds.
    unsafe {
        std::arch::asm!(
            "movi v0.4s, #0", "movi v1.4s, #0", "movi v2.4s, #0", "movi v3.4s, #0",
            "movi v4.4s, #0", "movi v5.4s, #0", "movi v6.4s, #0", "movi v7.4s, #0",
            "movi v8.4s, #0", "movi v9.4s, #0", "movi v10.4s, #0", "movi v11.4s, #0",
            "movi v12.4s, #0", "movi v13.4s, #0", "movi v14.4s, #0", "movi v15.4s, #0",
            "2:",
            "ld1 {{v16.16b, v17.16b}}, [{b}], #32",
            "ld1 {{v18.16b, v19.16b}}, [{a}], #32",
            "sdot v0.4s, v16.16b, v18.4b[0]",
            "sdot v1.4s, v17.16b, v18.4b[0]",
            "sdot v2.4s, v16.16b, v18.4b[1]",
            "sdot v3.4s, v17.16b, v18.4b[1]",
            "sdot v4.4s, v16.16b, v18.4b[2]",
            "sdot v5.4s, v17.16b, v18.4b[2]",
            "sdot v6.4s, v16.16b, v18.4b[3]",
            "sdot v7.4s, v17.16b, v18.4b[3]",
            "sdot v8.4s, v16.16b, v19.4b[0]",
            "sdot v9.4s, v17.16b, v19.4b[0]",
            "sdot v10.4s, v16.16b, v19.4b[1]",
            "sdot v11.4s, v17.16b, v19.4b[1]",
            "sdot v12.4s, v16.16b, v19.4b[2]",
            "sdot v13.4s, v17.16b, v19.4b[2]",
            "sdot v14.4s, v16.16b, v19.4b[3]",
            "sdot v15.4s, v17.16b, v19.4b[3]",
            "subs {q}, {q}, #1",
            "b.ne 2b",
            "st1 {{v0.4s, v1.4s, v2.4s, v3.4s}}, [{out}], #64",
            "st1 {{v4.4s, v5.4s, v6.4s, v7.4s}}, [{out}], #64",
            "st1 {{v8.4s, v9.4s, v10.4s, v11.4s}}, [{out}], #64",
            "st1 {{v12.4s, v13.4s, v14.4s, v15.4s}}, [{out}], #64",
            a = inout(reg) a.as_ptr() => _,
            b = inout(reg) b.as_ptr() => _,
            q = inout(reg) quads => _,
            out = inout(reg) tile.as_mut_ptr() => _,
            out("v0") _, out("v1") _, out("v2") _, out("v3") _,
            out("v4") _, out("v5") _, out("v6") _, out("v7") _,
            out("v8") _, out("v9") _, out("v10") _, out("v11") _,
            out("v12") _, out("v13") _, out("v14") _, out("v15") _,
            out("v16") _, out("v17") _, out("v18") _, out("v19") _,
            options(nostack),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sdot tile (where it runs) equals the scalar sums, odd values included.
    #[test]
    fn tile_matches_scalar() {
        let quads = 5;
        let a: Vec<i8> = (0..quads * MR * 4)
            .map(|i| (i * 37 % 256) as u8 as i8)
            .collect();
        let b: Vec<i8> = (0..quads * NR * 4)
            .map(|i| (i * 91 % 256) as u8 as i8)
            .collect();
        let (mut fast, mut slow) = ([0i32; MR * NR], [0i32; MR * NR]);
        sums(&a, &b, &mut fast);
        tile_scalar(&a, &b, quads, &mut slow);
        assert_eq!(fast, slow);
        assert!(slow.iter().any(|&v| v != 0));
    }
}
