//! The mask upscaling's first product in low rank: exact algebra that does the first transposed
//! convolution's prompt-independent part once per frame.
//!
//! The image tokens that reach the mask graph are those after the two-way transformer's two
//! blocks. In each block they change only through the image->token attention's output, a
//! softmax-weighted sum of the prompt's `n = H·T` projected token values `R` (56 for a
//! one-point prompt), and a LayerNorm (see [`ImageToTokenOutput`]). With `k₀` the per-frame
//! image tokens (the embedding plus the no-mask embedding), `a₁`, `a₂` a token's softmax
//! weights, `μ`, `r = 1/σ` its LayerNorm statistics and `o` the output biases:
//!
//! ```text
//! k₁ = γ₁ ⊙ (k₀ + a₁·R₁ + o₁ − μ₁) r₁ + β₁
//! k₂ = γ₂ ⊙ (k₁ + a₂·R₂ + o₂ − μ₂) r₂ + β₂
//!    = r₁r₂ (γ₂γ₁ ⊙ k₀) + Σⱼ r₁r₂a₁ⱼ (γ₂γ₁ ⊙ R₁ⱼ) + r₁r₂ (γ₂γ₁ ⊙ o₁) − r₁r₂μ₁ γ₂γ₁
//!      + Σⱼ r₂a₂ⱼ (γ₂ ⊙ R₂ⱼ) + r₂ γ₂ ⊙ (β₁ + o₂) − r₂μ₂ γ₂ + β₂
//! ```
//!
//! The first transposed convolution is linear (`k₂ · U`, a `D × 4·C1` matrix), so each image
//! token's first product is `r₁r₂ · base + coefficients · basis + constant`, where
//! - `base = (γ₂γ₁ ⊙ k₀) · U` is per frame ([`MaskUpscaling::frame_base`]),
//! - `basis` is the prompt's `n₁ + n₂ + 4` rows mapped through `U` (`LowRank::basis`),
//! - `constant = β₂ · U`.
//!
//! The per-prompt multiply-adds per image token fall from `D · 4·C1` (256 · 256) to
//! `(n₁ + n₂ + 4) · 4·C1` (116 · 256 for a one-point prompt) plus `4·C1` for the base.
//!
//! [`expose_coefficients`] makes the per-prompt graph give the two ops' coefficients
//! ([`ImageToTokenOutput::coefficients`]) and projected token values as extra outputs;
//! [`low_rank_mask_model`] builds the mask graph that takes them.

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::super::gemm::{same_bits, PackedWeights};
use super::super::token_mixing::{ImageToTokenOutput, NormParams};
use super::MaskUpscaling;

/// What [`expose_coefficients`] found in a per-prompt graph: enough to build the low-rank mask
/// graph, and to compute the per-frame base.
#[derive(Debug, Clone)]
pub struct LowRankSource {
    /// Index, among the per-prompt graph's inputs, of the first block's input image tokens
    /// (`k₀`, per frame).
    pub frame_tokens_input: usize,
    /// The first and the second image->token output's bias and LayerNorm.
    pub norms: [NormParams; 2],
    /// Softmax weights per image token of each (`n₁`, `n₂`) in the plan that found it (they
    /// grow with the prompt's points).
    pub weights: (usize, usize),
}

impl LowRankSource {
    /// Whether two graphs' sources agree but for the prompt's size (every per-prompt plan of a
    /// decoder must).
    pub fn same_as(&self, other: &LowRankSource) -> bool {
        let same_norm = |a: &NormParams, b: &NormParams| {
            a.eps.to_bits() == b.eps.to_bits()
                && same_bits(&a.gamma, &b.gamma)
                && same_bits(&a.beta, &b.beta)
                && same_bits(&a.bias, &b.bias)
        };
        self.frame_tokens_input == other.frame_tokens_input
            && same_norm(&self.norms[0], &other.norms[0])
            && same_norm(&self.norms[1], &other.norms[1])
    }
}

/// The outputs [`expose_coefficients`] appends to a per-prompt graph, in this order.
pub const EXTRA_OUTPUTS: usize = 4;

/// Make the per-prompt graph `model` give, after its own outputs, the first and second
/// image->token outputs' coefficients (`[B, P, n + 2]`) and their projected token values
/// (`[B, H, T, D]`, without `B` for one prompt). `Ok(Err(reason))`, with `model` unchanged, if
/// its first output is not the second block's [`ImageToTokenOutput`] fed by the first's, on
/// per-frame image tokens.
pub fn expose_coefficients(model: &mut TypedModel) -> TractResult<Result<LowRankSource, String>> {
    let outputs = model.output_outlets()?.to_vec();
    let Some(&tokens) = outputs.first() else {
        return Ok(Err("the graph has no outputs".into()));
    };
    let mixing = |outlet: OutletId| -> Option<(usize, ImageToTokenOutput)> {
        let node = model.node(outlet.node);
        let op = node.op_as::<ImageToTokenOutput>()?;
        (outlet.slot == 0 && !op.coefficients).then(|| (node.id, op.clone()))
    };
    let Some((second_id, second)) = mixing(tokens) else {
        return Ok(Err("image tokens are not an image->token output's".into()));
    };
    let second_inputs = model.node(second_id).inputs.clone();
    let Some((first_id, first)) = second_inputs.last().and_then(|&o| mixing(o)) else {
        return Ok(Err(
            "the second block's residual is not the first block's output".into(),
        ));
    };
    let first_inputs = model.node(first_id).inputs.clone();
    let (Some(&frame_tokens), Some(&values1), Some(&values2)) = (
        first_inputs.last(),
        first_inputs.iter().rev().nth(1),
        second_inputs.iter().rev().nth(1),
    ) else {
        return Ok(Err("too few inputs".into()));
    };
    let Some(frame_tokens_input) = model
        .input_outlets()?
        .iter()
        .position(|&i| i == frame_tokens)
    else {
        return Ok(Err("the first block's residual is not a graph input".into()));
    };
    let (p, d) = (first.pixels, first.dim);
    let frame_shape = model
        .outlet_fact(frame_tokens)?
        .shape
        .as_concrete()
        .map(<[usize]>::to_vec);
    if frame_shape.as_deref() != Some(&[1, p, d][..]) {
        return Ok(Err(format!("per-frame image tokens are {frame_shape:?}")));
    }
    if (second.pixels, second.dim) != (p, d) {
        return Ok(Err("the two blocks' image tokens differ in size".into()));
    }
    for (id, op) in [(first_id, &first), (second_id, &second)] {
        let mut new = op.clone();
        new.coefficients = true;
        let inputs: Vec<TypedFact> = model
            .node(id)
            .inputs
            .iter()
            .map(|&i| model.outlet_fact(i).cloned())
            .collect::<TractResult<_>>()?;
        let facts = new.output_facts(&inputs.iter().collect::<Vec<_>>())?;
        let coefficients = facts.get(1).cloned().context("coefficients fact")?;
        let node = model.node_mut(id);
        node.op = Box::new(new);
        node.outputs.push(Outlet {
            fact: coefficients,
            successors: tvec!(),
        });
    }
    let mut all = outputs;
    all.extend([
        OutletId::new(first_id, 1),
        OutletId::new(second_id, 1),
        values1,
        values2,
    ]);
    model.select_output_outlets(&all)?;
    Ok(Ok(LowRankSource {
        frame_tokens_input,
        norms: [first.norm(), second.norm()],
        weights: (first.heads * first.tokens, second.heads * second.tokens),
    }))
}

/// The mask graph `masks` (its only node our [`MaskUpscaling`], on the graph's two inputs) in
/// its low-rank form: inputs the per-frame base `[1, P, 4·C1]`, the two coefficient tensors
/// and the two projected token values (shapes `extra`, as a per-prompt plan gives them, but
/// with the prompt-token axis symbolic: one mask plan serves every point count), and the mask
/// weights. `Ok(Err(reason))` if `masks` is not that graph.
pub fn low_rank_mask_model(
    masks: &TypedModel,
    source: &LowRankSource,
    extra: &[Vec<usize>; EXTRA_OUTPUTS],
) -> TractResult<Result<TypedModel, String>> {
    let outputs = masks.output_outlets()?;
    let inputs = masks.input_outlets()?;
    let [output] = outputs else {
        return Ok(Err(format!("{} outputs", outputs.len())));
    };
    let node = masks.node(output.node);
    let Some(op) = node.op_as::<MaskUpscaling>() else {
        return Ok(Err(format!("the output comes from {}", node.op.name())));
    };
    if node.inputs.as_slice() != inputs || inputs.len() != 2 {
        return Ok(Err("the upscaling does not take the graph's inputs".into()));
    }
    let Some(low_rank) = LowRank::new(&op.weights.up1, source) else {
        return Ok(Err("LayerNorm sizes do not fit the first product".into()));
    };
    let width = op.weights.up1.n();
    let mut model = TypedModel::default();
    let mut wires =
        vec![model.add_source("upscaling_base", f32::fact([1, op.side, width, op.side]))?];
    let names = [
        "first_coefficients",
        "second_coefficients",
        "first_values",
        "second_values",
    ];
    for (i, (name, shape)) in names.into_iter().zip(extra).enumerate() {
        // The coefficients' last axis (n + 2) and the values' token axis (T) vary.
        let varying = if i < 2 {
            shape.len().checked_sub(1)
        } else {
            shape.len().checked_sub(2)
        };
        let Some(varying) = varying else {
            return Ok(Err(format!("{name} is {shape:?}")));
        };
        let symbol = model.symbols.sym(&format!("{name}_tokens"));
        let dims: TVec<TDim> = shape
            .iter()
            .enumerate()
            .map(|(axis, &n)| {
                if axis == varying {
                    symbol.clone().into()
                } else {
                    n.into()
                }
            })
            .collect();
        wires.push(model.add_source(name, f32::fact(dims))?);
    }
    wires.push(model.add_source("mask_weights", masks.outlet_fact(inputs[1])?.clone())?);
    let op = MaskUpscaling {
        low_rank: Some(Arc::new(low_rank)),
        ..op.clone()
    };
    let out = model.wire_node(format!("{}.low_rank", node.name), op, &wires)?;
    model.select_output_outlets(&out)?;
    Ok(Ok(model))
}

/// The prompt-independent parts of the low-rank first product (see the module docs).
#[derive(Debug, Clone)]
pub struct LowRank {
    /// `diag(γ₂γ₁) · U`: maps the per-frame image tokens and the first block's values.
    first_map: PackedWeights,
    /// `diag(γ₂) · U`: maps the second block's values.
    second_map: PackedWeights,
    /// `(γ₂γ₁ ⊙ o₁) · U`, `γ₂γ₁ · U`, `(γ₂ ⊙ (β₁ + o₂)) · U`, `γ₂ · U`: the basis's last 4 rows.
    fixed_rows: Vec<f32>,
    /// `β₂ · U`.
    pub(crate) constant: Vec<f32>,
}

impl PartialEq for LowRank {
    fn eq(&self, other: &LowRank) -> bool {
        self.first_map == other.first_map
            && self.second_map == other.second_map
            && same_bits(&self.fixed_rows, &other.fixed_rows)
            && same_bits(&self.constant, &other.constant)
    }
}
impl Eq for LowRank {}

impl LowRank {
    /// From the first product's weight `U` (`D × 4·C1`) and the two blocks' norms; `None` if
    /// their sizes differ from `D`.
    pub fn new(up1: &PackedWeights, source: &LowRankSource) -> Option<LowRank> {
        let (d, width) = (up1.k(), up1.n());
        let [first, second] = &source.norms;
        let vectors = [
            &first.gamma,
            &first.beta,
            &first.bias,
            &second.gamma,
            &second.beta,
        ];
        if vectors.iter().any(|v| v.len() != d) || second.bias.len() != d {
            return None;
        }
        let u = up1.unpack();
        let g21: Vec<f32> = second
            .gamma
            .iter()
            .zip(first.gamma.iter())
            .map(|(a, b)| a * b)
            .collect();
        let scaled = |scale: &[f32]| -> Option<PackedWeights> {
            let rows: Vec<f32> = u
                .chunks_exact(width)
                .zip(scale)
                .flat_map(|(row, &s)| row.iter().map(move |&x| x * s))
                .collect();
            PackedWeights::pack(&rows, d, width)
        };
        // A row vector times U, in f64 (once per model).
        let times_u = |v: &[f32]| -> Vec<f32> {
            let mut out = vec![0f64; width];
            for (row, &x) in u.chunks_exact(width).zip(v) {
                for (o, &w) in out.iter_mut().zip(row) {
                    *o += f64::from(x) * f64::from(w);
                }
            }
            out.into_iter().map(|x| x as f32).collect()
        };
        let g21_o1: Vec<f32> = g21
            .iter()
            .zip(first.bias.iter())
            .map(|(g, o)| g * o)
            .collect();
        let g2_b1_o2: Vec<f32> = second
            .gamma
            .iter()
            .zip(first.beta.iter().zip(second.bias.iter()))
            .map(|(g, (b, o))| g * (b + o))
            .collect();
        let fixed_rows = [
            times_u(&g21_o1),
            times_u(&g21),
            times_u(&g2_b1_o2),
            times_u(&second.gamma),
        ]
        .concat();
        Some(LowRank {
            first_map: scaled(&g21)?,
            second_map: scaled(&second.gamma)?,
            fixed_rows,
            constant: times_u(&second.beta),
        })
    }

    /// Width of the image tokens (D).
    pub fn dim(&self) -> usize {
        self.first_map.k()
    }

    /// The map of the per-frame image tokens to the base (`diag(γ₂γ₁) · U`).
    pub(crate) fn frame_map(&self) -> &PackedWeights {
        &self.first_map
    }

    /// One prompt's basis, `n₁ + n₂ + 4` rows, transposed (`4·C1` rows of `n₁ + n₂ + 4`): its
    /// two blocks' projected token values (`n₁` and `n₂` rows of `D`) through their maps, then
    /// the fixed rows; `times(a, w, c)` is the product `c = a · w`.
    pub(crate) fn basis(
        &self,
        values: [&[f32]; 2],
        times: impl Fn(&[f32], &PackedWeights, &mut [f32]),
    ) -> Option<Vec<f32>> {
        let width = self.first_map.n();
        let d = self.first_map.k();
        let (n1, n2) = (values[0].len() / d, values[1].len() / d);
        if values[0].len() != n1 * d || values[1].len() != n2 * d {
            return None;
        }
        let rows_count = n1 + n2 + 4;
        let mut rows = vec![0f32; rows_count * width];
        let (first, rest) = rows.split_at_mut(n1 * width);
        let (second, fixed) = rest.split_at_mut(n2 * width);
        times(values[0], &self.first_map, first);
        times(values[1], &self.second_map, second);
        fixed.copy_from_slice(&self.fixed_rows);
        let mut transposed = vec![0f32; rows.len()];
        super::super::transpose::transpose(&rows, rows_count, width, &mut transposed);
        Some(transposed)
    }
}
