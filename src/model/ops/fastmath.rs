//! Vectorisable float functions for our ops, with no dependency on tract (so that
//! `benches/pi5_mca.py` can compile the kernels that use them on their own).
#![deny(unsafe_code)]

/// `e^x` for `x <= 0` (softmax arguments after subtracting the max), within ~2 ulp, in a form
/// the compiler vectorises: `2^n * p(r)` with `x = n ln 2 + r`, `|r| <= ln 2 / 2`, and `p` the
/// degree-7 Taylor polynomial (relative error < 6e-9 on that interval). Arguments below -87
/// (where `e^x` is below f32's normal range) give 0; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    exp_fused::<false>(x)
}

/// `a * b + c`, fused where `FMA` says the calling code is compiled with fused multiply-adds
/// (or on aarch64, which always has them); unfused elsewhere, where `mul_add` would be a libm
/// call.
#[inline(always)]
pub fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// [`exp`] with fused multiply-adds (`FMA = true`: where the calling code is compiled with FMA,
/// or on aarch64) for the range reduction and the polynomial: half the floating-point
/// instructions, same accuracy.
#[inline(always)]
pub fn exp_fused<const FMA: bool>(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Not `max`: it would turn NaN into -87.
    let x = if x < -87.0 { -87.0 } else { x };
    // Any integer n near x / ln 2 works: adding 1.5 · 2^23 rounds to an integer (to nearest
    // even) and leaves it in the low mantissa bits, with no float-to-int conversion.
    const SHIFTER: f32 = 12_582_912.0;
    let shifted = x * std::f32::consts::LOG2_E + SHIFTER;
    let n = shifted - SHIFTER;
    let r = madd::<FMA>(-n, LN2_LO, madd::<FMA>(-n, LN2_HI, x));
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = madd::<FMA>(p, r, c);
    }
    // n is in [-126, 0] here, so the exponent field 127 + n is a normal exponent; the low bits
    // of `shifted` hold n + 2^22. A NaN `x` gives a NaN `p`, and the product stays NaN.
    let scale = f32::from_bits(
        shifted
            .to_bits()
            .wrapping_sub(SHIFTER.to_bits())
            .wrapping_add(127)
            << 23,
    );
    p * scale
}

/// `0.5 · x · (1 + erf(x / √2))`, the order of operations of tract's `GeluExact`, with erf's
/// polynomial in fused multiply-adds where `fused` says the calling code has them (a constant
/// at every call site: FMA compiled in, or aarch64). The fused form has half the polynomial's
/// instructions; it moves the result by rounding only (within 1e-6 of tract's, as the unfused
/// form).
#[inline(always)]
pub fn gelu(fused: bool, x: f32) -> f32 {
    (x * 0.5) * (erf(fused, x * std::f32::consts::FRAC_1_SQRT_2) + 1.0)
}

/// erf by Abramowitz & Stegun 7.1.28 (absolute error below 3e-7), the approximation tract's
/// `Erf` uses, in a branch-free form the compiler vectorises; the polynomial in fused
/// multiply-adds where `fused` (see [`gelu`]).
#[inline(always)]
#[allow(clippy::excessive_precision)]
pub fn erf(fused: bool, x: f32) -> f32 {
    const A: [f32; 6] = [
        0.070_523_078_4,
        0.042_282_012_3,
        0.009_270_527_2,
        0.000_152_014_3,
        0.000_276_567_2,
        0.000_043_063_8,
    ];
    let a = x.abs();
    let p = if fused {
        let mut p = A[5];
        for c in [A[4], A[3], A[2], A[1], A[0], 1.0] {
            p = p.mul_add(a, c);
        }
        p
    } else {
        1.0 + a * (A[0] + a * (A[1] + a * (A[2] + a * (A[3] + a * (A[4] + a * A[5])))))
    };
    let p2 = p * p;
    let p4 = p2 * p2;
    let p8 = p4 * p4;
    (1.0 - 1.0 / (p8 * p8)).copysign(x)
}

/// `row = residual + (row + bias)`, then LayerNorm of it in place as SAM's (mean, biased
/// variance, `ε` inside the root), then `γ` and `β` (`bias`, `residual`, `gamma`, `beta`: one
/// per value of the row). Returns the row's mean and the scale `1 / √(variance + ε)` it
/// applied.
///
/// Two passes over the row instead of four: the first adds the residual and sums the values and
/// their squares, both shifted by the row's first value `K` so that the variance `Σ(x − K)²/n −
/// (Σ(x − K)/n)²` does not cancel when the mean is large against the spread; the second
/// normalises.
#[inline(always)]
pub fn residual_layer_norm<const FMA: bool>(
    row: &mut [f32],
    (residual, bias): (&[f32], &[f32]),
    eps: f32,
    gamma: &[f32],
    beta: &[f32],
) -> (f32, f32) {
    let n = row.len() as f32;
    let shift = match (row.first(), residual.first(), bias.first()) {
        (Some(&x), Some(&r), Some(&b)) => r + (x + b),
        _ => return (0.0, 0.0),
    };
    let mut sum = [0f32; LANES];
    let mut squares = [0f32; LANES];
    let add = |x: &mut [f32], r: &[f32], b: &[f32], sum: &mut [f32], squares: &mut [f32]| {
        for ((((x, &r), &b), s), q) in x.iter_mut().zip(r).zip(b).zip(sum).zip(squares) {
            *x = r + (*x + b);
            let centred = *x - shift;
            *s += centred;
            *q = madd::<FMA>(centred, centred, *q);
        }
    };
    let mut rows = row.chunks_exact_mut(LANES);
    let mut residuals = residual.chunks_exact(LANES);
    let mut biases = bias.chunks_exact(LANES);
    for ((x, r), b) in (&mut rows).zip(&mut residuals).zip(&mut biases) {
        add(x, r, b, &mut sum, &mut squares);
    }
    add(
        rows.into_remainder(),
        residuals.remainder(),
        biases.remainder(),
        &mut sum,
        &mut squares,
    );
    let shifted_mean = pairwise(sum) / n;
    let variance = (pairwise(squares) / n - shifted_mean * shifted_mean).max(0.0);
    let mean = shift + shifted_mean;
    let scale = 1.0 / (variance + eps).sqrt();
    for ((x, &g), &b) in row.iter_mut().zip(gamma).zip(beta) {
        *x = madd::<FMA>((*x - mean) * scale, g, b);
    }
    (mean, scale)
}

/// Running partials of [`lane_sum`] and [`lane_max`].
const LANES: usize = 16;

/// `a` folded into `LANES` running partials, each starting at `init`, value `i` into partial
/// `i mod LANES` (vectorisable, unlike one running value).
#[inline(always)]
fn lanes(a: &[f32], init: f32, step: impl Fn(f32, f32) -> f32) -> [f32; LANES] {
    let mut acc = [init; LANES];
    let mut chunks = a.chunks_exact(LANES);
    for chunk in &mut chunks {
        for l in 0..LANES {
            acc[l] = step(acc[l], chunk[l]);
        }
    }
    for (l, &x) in chunks.remainder().iter().enumerate() {
        acc[l] = step(acc[l], x);
    }
    acc
}

/// `Σ f(a_i)` in `LANES` partial sums, added pairwise.
#[inline(always)]
pub fn lane_sum(a: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    pairwise(lanes(a, 0.0, |acc, x| acc + f(x)))
}

/// The largest value of `a` (−∞ for none; NaNs are passed over), in `LANES` running maxima.
#[inline(always)]
pub fn lane_max(a: &[f32]) -> f32 {
    let above = |m: f32, v: f32| if v > m { v } else { m };
    halving(lanes(a, f32::NEG_INFINITY, above), above)
}

/// The largest magnitude in `a` (0 for none; NaNs are passed over), in `LANES` running maxima.
#[inline(always)]
pub fn lane_max_abs(a: &[f32]) -> f32 {
    let above = |m: f32, v: f32| if v.abs() > m { v.abs() } else { m };
    halving(lanes(a, 0.0, above), |m, v| if v > m { v } else { m })
}

/// The sum of the lanes, halving the width each step.
#[inline(always)]
fn pairwise(acc: [f32; LANES]) -> f32 {
    halving(acc, |a, b| a + b)
}

/// The lanes combined by `join`, halving the width each step: four dependent vector steps
/// instead of fifteen dependent scalar ones (for the maxima: the same value as any order, the
/// partials holding no NaN).
#[inline(always)]
fn halving(mut acc: [f32; LANES], join: impl Fn(f32, f32) -> f32) -> f32 {
    let mut half = LANES / 2;
    while half > 0 {
        for l in 0..half {
            acc[l] = join(acc[l], acc[l + half]);
        }
        half /= 2;
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`residual_layer_norm`] against a two-pass LayerNorm in f64, on rows whose mean is large
    /// against their spread (where a one-pass variance without the shift would cancel), of
    /// lengths with and without a remainder after the lanes.
    #[test]
    fn residual_layer_norm_matches_a_two_pass_reference() {
        for (len, offset) in [(256, 0.0), (256, 1000.0), (7, -300.0), (33, 5.0), (1, 2.0)] {
            let values = |seed: usize| -> Vec<f32> {
                (0..len)
                    .map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0)
                    .collect()
            };
            let (mut row, residual, bias) = (values(1), values(2), values(3));
            for x in row.iter_mut() {
                *x += offset;
            }
            let (gamma, beta) = (values(4), values(5));
            let sums: Vec<f64> = (0..len)
                .map(|i| f64::from(residual[i]) + (f64::from(row[i]) + f64::from(bias[i])))
                .collect();
            let mean = sums.iter().sum::<f64>() / len as f64;
            let variance = sums.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / len as f64;
            let eps = 1e-5;
            let scale = 1.0 / (variance + eps).sqrt();
            let (got_mean, got_scale) = residual_layer_norm::<false>(
                &mut row,
                (&residual, &bias),
                eps as f32,
                &gamma,
                &beta,
            );
            assert!((f64::from(got_mean) - mean).abs() <= 1e-6 * mean.abs().max(1.0));
            assert!(
                (f64::from(got_scale) - scale).abs() <= 1e-3 * scale,
                "{len} {offset}"
            );
            for i in 0..len {
                let want = (sums[i] - mean) * scale * f64::from(gamma[i]) + f64::from(beta[i]);
                assert!(
                    (f64::from(row[i]) - want).abs() <= 1e-3 * want.abs().max(1.0),
                    "{len} {offset}: {i}: {} against {want}",
                    row[i]
                );
            }
        }
    }

    #[test]
    fn residual_layer_norm_of_nothing_is_nothing() {
        let mut row: [f32; 0] = [];
        assert_eq!(
            residual_layer_norm::<false>(&mut row, (&[], &[]), 1e-5, &[], &[]),
            (0.0, 0.0)
        );
    }
}
