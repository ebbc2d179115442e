//! Pattern matching shared by our rewrite passes (`ops` and `qmatmul::epilogue`): who consumes
//! an outlet, a binary op's constant operand, a per-column constant or bias add, chains of axis
//! ops and what they do to the indices, and our SIMD dispatch level.
#![deny(unsafe_code)]

use std::sync::Arc;

use anyhow::Context;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::AxisOp;
use tract_onnx::tract_core::ops::binary::{BinMiniOp, TypedBinOp};
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::math::Add;
use tract_onnx::tract_core::ops::nn::gelu_exact::GeluExact;

/// Replace every op of type `O` in `model` for which `change` gives a new one (the same inputs
/// and outputs: a setting of the op, not its shape); returns how many changed.
pub(crate) fn change_ops<O: TypedOp>(
    model: &mut TypedModel,
    change: impl Fn(&O) -> Option<O>,
) -> usize {
    let mut count = 0;
    for id in 0..model.nodes().len() {
        let node = model.node_mut(id);
        if let Some(op) = node.op_as::<O>().and_then(&change) {
            node.op = Box::new(op);
            count += 1;
        }
    }
    count
}

/// The only node consuming `outlet`, if it has exactly one consumer.
pub(crate) fn sole_consumer(model: &TypedModel, outlet: OutletId) -> Option<usize> {
    match model.outlet_successors(outlet) {
        [one] => Some(one.node),
        _ => None,
    }
}

/// The sole consumer of node `id`'s first output, if it is a `T`.
pub(crate) fn next_op<T: Op>(model: &TypedModel, id: usize) -> Option<usize> {
    let next = sole_consumer(model, OutletId::new(id, 0))?;
    model.node(next).op_as::<T>().map(|_| next)
}

/// The concrete shape of `outlet`, if it has one.
pub(crate) fn concrete_shape(
    model: &TypedModel,
    outlet: OutletId,
) -> TractResult<Option<Vec<usize>>> {
    Ok(model
        .outlet_fact(outlet)?
        .shape
        .as_concrete()
        .map(<[usize]>::to_vec))
}

/// For a two-input binary node of mini-op `M` (no output type override) with exactly one
/// constant input: that constant and the other input.
pub(crate) fn const_operand<M: BinMiniOp>(
    model: &TypedModel,
    node: &TypedNode,
) -> TractResult<Option<(Arc<Tensor>, OutletId)>> {
    let is_m = node
        .op_as::<TypedBinOp>()
        .is_some_and(|b| b.0.is::<M>() && b.1.is_none());
    if !is_m || node.inputs.len() != 2 {
        return Ok(None);
    }
    for (c, x) in [(0, 1), (1, 0)] {
        if let Some(k) = model.outlet_fact(node.inputs[c])?.konst.clone() {
            if model.outlet_fact(node.inputs[x])?.konst.is_none() {
                return Ok(Some((k, node.inputs[x])));
            }
        }
    }
    Ok(None)
}

/// The values of an f32 constant shaped `[1, …, 1, n]` followed by `trailing` axes of 1, with
/// at most `rank` axes: one per index of the axis `trailing + 1` from the end of a rank-`rank`
/// tensor it broadcasts over without changing its shape (`trailing = 0`: one per column of
/// rows; `trailing = 2`: one per channel of a CHW map).
pub(crate) fn axis_vector(
    t: &Tensor,
    n: usize,
    rank: usize,
    trailing: usize,
) -> TractResult<Option<Vec<f32>>> {
    let shape = t.shape();
    let Some(lead) = shape.len().checked_sub(trailing + 1) else {
        return Ok(None);
    };
    let fits = shape[lead] == n
        && shape.len() <= rank
        && shape[..lead].iter().all(|&d| d == 1)
        && shape[lead + 1..].iter().all(|&d| d == 1);
    if t.datum_type() != f32::datum_type() || !fits {
        return Ok(None);
    }
    Ok(Some(t.try_as_plain_ram()?.as_slice::<f32>()?.to_vec()))
}

/// Axis letters renamed in order of first appearance, so that `ambk,anbk->abmn` and
/// `acbd,aebd->abce` compare equal.
pub(crate) fn canonical(expr: &str) -> String {
    let mut seen: Vec<char> = Vec::new();
    expr.chars()
        .map(|c| {
            if !c.is_ascii_alphabetic() {
                return c;
            }
            let i = seen.iter().position(|&s| s == c).unwrap_or_else(|| {
                seen.push(c);
                seen.len() - 1
            });
            (b'a' + i as u8) as char
        })
        .collect()
}

/// An `Add` of a constant `[1, …, 1, n]` as the only consumer of `outlet`: its node and the n
/// values.
pub(crate) fn bias_add_after(
    model: &TypedModel,
    outlet: OutletId,
    n: usize,
) -> TractResult<Option<(usize, Vec<f32>)>> {
    axis_bias_add_after(model, outlet, n, 0)
}

/// An `Add` of a constant `[1, …, 1, n, 1 × trailing]` (see [`axis_vector`]) as the only
/// consumer of `outlet`: its node and the n values.
pub(crate) fn axis_bias_add_after(
    model: &TypedModel,
    outlet: OutletId,
    n: usize,
    trailing: usize,
) -> TractResult<Option<(usize, Vec<f32>)>> {
    let Some(add) = sole_consumer(model, outlet) else {
        return Ok(None);
    };
    let Some((k, _)) = const_operand::<Add>(model, model.node(add))? else {
        return Ok(None);
    };
    let rank = model.outlet_fact(outlet)?.rank();
    Ok(axis_vector(&k, n, rank, trailing)?.map(|bias| (add, bias)))
}

/// A chain of nodes matched for one of our ops: the outlets the op reads, the outlet whose
/// consumers it takes over, and the op.
pub(crate) struct Replacement<O> {
    pub(crate) inputs: Vec<OutletId>,
    pub(crate) output: OutletId,
    pub(crate) op: O,
}

/// What a rewrite pass's matcher says of a node: `Ok(None)` if no chain starts there, `Err`
/// with the reason if one starts like it but differs, else the replacement.
pub(crate) type Match<O> = Result<Option<Replacement<O>>, String>;

/// The loop of our rewrite passes: every node `starts` accepts, in evaluation order, is given to
/// `plan`; a replacement is wired in as a node named `<start>.<suffix>` that takes over the
/// chain's output; a chain left to tract is logged as `<what> at <start> left to tract: <why>`.
/// Returns how many chains were replaced.
pub(crate) fn replace_chains<O: TypedOp>(
    model: &mut TypedModel,
    (what, suffix): (&str, &str),
    starts: impl Fn(&TypedNode) -> bool,
    plan: impl Fn(&TypedModel, usize) -> TractResult<Match<O>>,
) -> TractResult<usize> {
    let mut replaced = 0;
    for id in model.eval_order()? {
        let Some(node) = model.nodes().get(id) else {
            continue;
        };
        if !starts(node) {
            continue;
        }
        let name = node.name.clone();
        match plan(model, id)? {
            Ok(Some(found)) => {
                let mut patch = TypedModelPatch::default();
                let inputs = found
                    .inputs
                    .iter()
                    .map(|&o| patch.tap_model(model, o))
                    .collect::<TractResult<Vec<_>>>()?;
                let out = patch.wire_node(format!("{name}.{suffix}"), found.op, &inputs)?;
                patch.shunt_outside(model, found.output, out[0])?;
                patch.apply(model)?;
                replaced += 1;
            }
            Ok(None) => {}
            Err(why) => log::debug!("{what} at {name} left to tract: {why}"),
        }
    }
    model.compact()?;
    Ok(replaced)
}

/// The axis ops that follow node `id`, each the sole consumer of the one before, and the last
/// node of the run (`id` itself if none follows).
pub(crate) fn axis_op_chain(model: &TypedModel, id: usize) -> (Vec<usize>, usize) {
    let mut chain = Vec::new();
    let mut end = id;
    while let Some(next) = next_op::<AxisOp>(model, end) {
        chain.push(next);
        end = next;
    }
    (chain, end)
}

/// The node producing `outlet` through axis ops only (each with one input), and those axis
/// ops in evaluation order (empty if `outlet` is that node's own output).
pub(crate) fn producer_before_axis_ops(
    model: &TypedModel,
    outlet: OutletId,
) -> (usize, Vec<usize>) {
    let mut chain = Vec::new();
    let mut at = outlet.node;
    loop {
        let node = model.node(at);
        if node.op_as::<AxisOp>().is_none() || node.inputs.len() != 1 {
            chain.reverse();
            return (at, chain);
        }
        chain.push(at);
        at = node.inputs[0].node;
    }
}

/// Whether the axis ops `chain` leave a `shape` tensor's values in their order (reshapes that
/// only split or merge axes), checked by running them on the indices.
pub(crate) fn keeps_order(
    model: &TypedModel,
    chain: &[usize],
    shape: &[usize],
) -> TractResult<bool> {
    Ok(indices_through(model, chain, shape)?.is_some_and(|got| {
        got.iter()
            .enumerate()
            .all(|(i, &v)| usize::try_from(v) == Ok(i))
    }))
}

/// What the ops `chain` make of a `shape` tensor holding its own flat indices: for each output
/// element, the index of the input element it comes from. `None` if the indices do not fit an
/// `i32` or an op cannot run out of a plan.
pub(crate) fn indices_through(
    model: &TypedModel,
    chain: &[usize],
    shape: &[usize],
) -> TractResult<Option<Vec<i32>>> {
    let len: usize = shape.iter().product();
    let Ok(count) = i32::try_from(len) else {
        return Ok(None);
    };
    let mut t = Tensor::from_shape(shape, &(0..count).collect::<Vec<i32>>())?.into_tvalue();
    for &id in chain {
        let Some(out) = model.node(id).op.eval_out_of_plan(tvec!(t))? else {
            return Ok(None);
        };
        t = out.into_iter().next().context("an output")?;
    }
    let view = t.try_as_plain_ram()?;
    Ok(Some(view.as_slice::<i32>()?.to_vec()))
}

/// Whether `node` is tract's `GeluExact` (without an output type override).
pub(crate) fn is_gelu_exact(node: &TypedNode) -> bool {
    node.op_as::<ElementWiseOp>()
        .is_some_and(|e| e.0.is::<GeluExact>() && e.1.is_none())
}

/// Which compiled form of our vectorised float code runs: one generic body compiled with the
/// widest target features this CPU has. Ordered narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
// The x86 forms exist (tests name them) but are only chosen on x86_64.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) enum Isa {
    /// Plain Rust: NEON with fused multiply-adds on aarch64, SSE2 elsewhere.
    Portable,
    /// x86_64 AVX2 + FMA.
    Avx2,
    /// x86_64 AVX-512F (16-lane vectors) + FMA.
    Avx512,
}

impl Isa {
    /// The widest form this CPU runs, within [`ceiling`].
    pub(crate) fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let fma = std::arch::is_x86_feature_detected!("fma");
            let cap = ceiling();
            if fma && cap >= Isa::Avx512 && std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if fma && cap >= Isa::Avx2 && std::arch::is_x86_feature_detected!("avx2") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Every form this CPU runs (within [`ceiling`]), narrowest first: the portable one and
    /// each wider one up to [`Isa::detect`]'s. For tests that check or time each form.
    #[cfg(test)]
    pub(crate) fn runnable() -> Vec<Isa> {
        let widest = Isa::detect();
        [Isa::Portable, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&isa| isa <= widest)
            .collect()
    }
}

/// The widest instruction set our ops and kernels may choose: `TINYSAM_ISA=avx2` (or
/// `portable`) keeps them below AVX-512 and VNNI (or plain), so that a bigger x86 CPU can be
/// measured as a smaller one (`benches/compare.py` runs an AVX-512/VNNI host as an AVX2-only one
/// this way; tract's and onnxruntime's own kernels are not affected). Unset (or `native`): no
/// limit. Read once; an unknown value is ignored with a warning.
pub(crate) fn ceiling() -> Isa {
    static CEILING: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *CEILING.get_or_init(|| {
        let value = std::env::var("TINYSAM_ISA").ok();
        parse_ceiling(value.as_deref()).unwrap_or_else(|other| {
            log::warn!("TINYSAM_ISA={other}: not native, avx2 or portable; ignored");
            Isa::Avx512
        })
    })
}

/// [`ceiling`]'s reading of `TINYSAM_ISA` (`None`: unset); the value itself if it names none.
fn parse_ceiling(value: Option<&str>) -> Result<Isa, &str> {
    match value {
        None | Some("" | "native") => Ok(Isa::Avx512),
        Some("avx2") => Ok(Isa::Avx2),
        Some("portable") => Ok(Isa::Portable),
        Some(other) => Err(other),
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Isa::Portable if cfg!(target_arch = "aarch64") => "neon",
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2+fma",
            Isa::Avx512 => "avx512f",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_ceiling, Isa};

    #[test]
    fn tinysam_isa_values() {
        assert_eq!(parse_ceiling(None), Ok(Isa::Avx512));
        assert_eq!(parse_ceiling(Some("native")), Ok(Isa::Avx512));
        assert_eq!(parse_ceiling(Some("avx2")), Ok(Isa::Avx2));
        assert_eq!(parse_ceiling(Some("portable")), Ok(Isa::Portable));
        assert_eq!(parse_ceiling(Some("avx512")), Err("avx512"));
        // The ceiling orders the forms narrowest first.
        assert!(Isa::Portable < Isa::Avx2 && Isa::Avx2 < Isa::Avx512);
    }
}
