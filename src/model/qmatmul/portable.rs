//! The i16-pair tile in plain Rust: the reference layout the AVX2 kernel also uses, and the
//! kernel of CPUs without a faster one (the compiler turns it into NEON `smlal` on a
//! Cortex-A53).
#![deny(unsafe_code)]

use super::{requant_tile, TileRequant, PAIR_MR as MR, PAIR_NR as NR};

/// Sums `Σ_kk a[kk][r] · b[kk][c]` over packed pairs, requantized into `out` (MR × NR, row-major).
///
/// `a`: per k pair, MR i32 each holding (even k, odd k) as i16 halves (low = even);
/// `b`: per k pair, NR columns × (even k, odd k) as i16.
pub(super) fn tile(a: &[i32], b: &[i16], requant: TileRequant<'_>, out: &mut [i8]) {
    let mut acc = [0i32; MR * NR];
    sums(a, b, &mut acc);
    requant_tile(&acc, NR, requant, out);
}

/// The i32 sums alone (row-major MR × NR).
pub(super) fn sums(a: &[i32], b: &[i16], out: &mut [i32; MR * NR]) {
    let pairs = a.len() / MR;
    let mut acc = [[0i32; NR]; MR];
    for kk in 0..pairs {
        let ap = &a[kk * MR..(kk + 1) * MR];
        let bp = &b[kk * 2 * NR..(kk + 1) * 2 * NR];
        for (r, row) in acc.iter_mut().enumerate() {
            let a0 = ap[r] as i16 as i32;
            let a1 = (ap[r] >> 16) as i16 as i32;
            for (c, v) in row.iter_mut().enumerate() {
                *v += a0 * bp[2 * c] as i32 + a1 * bp[2 * c + 1] as i32;
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        out[r * NR..(r + 1) * NR].copy_from_slice(row);
    }
}
