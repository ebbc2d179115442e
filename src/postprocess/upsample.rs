//! SAM's two-step mask interpolation along one axis, as the weights it gives each low-res value.
//!
//! `postprocess_masks` interpolates the low-res logits (side `m`) to the model input size `S`,
//! keeps the first `R` values (the resized frame; the rest is padding) and interpolates those to
//! the frame size `F`, both times with PyTorch's bilinear rule for `align_corners=False`:
//! output `o` reads input `s = (o + 0.5) · in/out − 0.5` (clamped at 0), from `⌊s⌋` and the next
//! index (the last index repeats at the end). Each step is linear, so their composite is too:
//! frame pixel `o` is a weighted sum of a few consecutive low-res values, with weights that are
//! products of the two steps' bilinear weights. [`AxisTaps::sam`] computes those sums' taps once
//! per geometry; applying them row then column gives SAM's frame-size logits without the
//! model-size intermediate (equal up to float rounding of the reordered sums).

/// PyTorch's bilinear taps (`align_corners=False`, no antialias) from `input` values to `output`:
/// per output index, the two input indices and their weights. Empty if either size is 0.
pub fn torch_bilinear(input: usize, output: usize) -> Vec<(usize, usize, f32, f32)> {
    if input == 0 || output == 0 {
        return Vec::new();
    }
    // As ATen: the scale in f32 from the sizes, the source index in f32.
    let scale = input as f32 / output as f32;
    let last = input - 1;
    (0..output)
        .map(|o| {
            let source = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
            // `source` >= 0 and finite: the cast floors it; clamped to the last index.
            let i0 = (source as usize).min(last);
            let w1 = (source - i0 as f32).clamp(0.0, 1.0);
            let i1 = if i0 < last { i0 + 1 } else { i0 };
            (i0, i1, 1.0 - w1, w1)
        })
        .collect()
}

/// For every frame pixel along one axis: the first low-res index it reads and the weights of
/// the consecutive values from there (a fixed number per pixel, trailing zeros where fewer).
#[derive(Debug, Clone)]
pub struct AxisTaps {
    first: Vec<usize>,
    weights: Vec<f32>,
    stride: usize,
}

impl AxisTaps {
    /// The composite of SAM's two steps: `low` values up to `model`, the first `resized` of
    /// those (clamped to `1..=model`) down or up to `frame`.
    pub fn sam(low: usize, model: usize, resized: usize, frame: usize) -> AxisTaps {
        let (low, model) = (low.max(1), model.max(1));
        let resized = resized.clamp(1, model);
        let to_model = torch_bilinear(low, model);
        let to_frame = torch_bilinear(resized, frame);
        // Each frame pixel reads two model-size values, each of those two low-res ones.
        let reach = |o: &(usize, usize, f32, f32)| {
            let (j0, j1) = (o.0, o.1);
            let lo = to_model[j0].0.min(to_model[j1].0);
            let hi = to_model[j0].1.max(to_model[j1].1);
            (lo, hi)
        };
        let stride = to_frame
            .iter()
            .map(|o| {
                let (lo, hi) = reach(o);
                hi - lo + 1
            })
            .max()
            .unwrap_or(1);
        let mut first = Vec::with_capacity(frame);
        let mut weights = vec![0f32; frame * stride];
        for (o, w) in to_frame.iter().zip(weights.chunks_exact_mut(stride)) {
            let (lo, _) = reach(o);
            for (j, a) in [(o.0, o.2), (o.1, o.3)] {
                let (l0, l1, b0, b1) = to_model[j];
                w[l0 - lo] += a * b0;
                w[l1 - lo] += a * b1;
            }
            first.push(lo);
        }
        AxisTaps {
            first,
            weights,
            stride,
        }
    }

    /// Frame pixels along the axis.
    pub fn len(&self) -> usize {
        self.first.len()
    }

    /// Whether the axis has no pixels.
    pub fn is_empty(&self) -> bool {
        self.first.is_empty()
    }

    /// Frame pixel `o`'s first low-res index and its weights (panics if `o >= len()`).
    #[inline]
    pub fn taps(&self, o: usize) -> (usize, &[f32]) {
        let at = o * self.stride;
        (self.first[o], &self.weights[at..at + self.stride])
    }

    /// Frame pixel `o`'s value from one line of low-res values: its weights times the values
    /// from its first index (trailing taps past the line's end have weight 0 and are skipped).
    #[inline]
    pub fn apply(&self, o: usize, line: &[f32]) -> f32 {
        let (first, weights) = self.taps(o);
        let values = line.get(first..).unwrap_or_default();
        weights.iter().zip(values).map(|(&w, &v)| w * v).sum()
    }

    /// The low-res indices any pixel reads: `first..end` (`0..0` when empty).
    pub fn span(&self) -> (usize, usize) {
        let first = self.first.iter().copied().min().unwrap_or(0);
        let end = self
            .first
            .iter()
            .map(|&f| f + self.stride)
            .max()
            .unwrap_or(0);
        (first, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SAM's two steps, literally: the model-size values, cropped, then the frame's.
    fn two_steps(values: &[f32], model: usize, resized: usize, frame: usize) -> Vec<f32> {
        let up: Vec<f32> = torch_bilinear(values.len(), model)
            .iter()
            .map(|&(a, b, wa, wb)| values[a] * wa + values[b] * wb)
            .collect();
        torch_bilinear(resized, frame)
            .iter()
            .map(|&(a, b, wa, wb)| up[a] * wa + up[b] * wb)
            .collect()
    }

    #[test]
    fn composite_equals_the_two_steps() {
        for (low, model, resized, frame) in [
            (16, 64, 48, 40),
            (16, 64, 64, 64),
            (16, 64, 64, 200),
            (16, 64, 1, 9),
            (256, 1024, 1023, 769),
            (256, 1024, 576, 1080),
            (4, 4, 3, 2),
        ] {
            let values: Vec<f32> = (0..low).map(|i| ((i * 7919) % 97) as f32 - 48.0).collect();
            let taps = AxisTaps::sam(low, model, resized, frame);
            assert_eq!(taps.len(), frame);
            let want = two_steps(&values, model, resized, frame);
            let (lo, end) = taps.span();
            assert!(lo < end && end <= low + taps.stride);
            for (o, want) in want.iter().enumerate() {
                let (first, w) = taps.taps(o);
                let got: f32 = w
                    .iter()
                    .zip(values[first..].iter().chain(std::iter::repeat(&0.0)))
                    .map(|(a, b)| a * b)
                    .sum();
                assert!(
                    (got - want).abs() < 1e-4,
                    "{low} {model} {resized} {frame} @{o}"
                );
                let total: f32 = w.iter().sum();
                assert!((total - 1.0).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn torch_taps_clamp_at_both_ends() {
        let t = torch_bilinear(4, 8);
        assert_eq!(t[0], (0, 1, 1.0, 0.0));
        assert_eq!(t[7].0, 3);
        assert_eq!(t[7].1, 3);
        assert!(torch_bilinear(0, 3).is_empty());
    }
}
