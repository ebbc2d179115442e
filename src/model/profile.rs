//! Per-node wall time of one run of an optimised plan, to see where a model spends its time.

use std::time::{Duration, Instant};

use serde::Serialize;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::eval;

/// Time spent in one node.
#[derive(Debug, Clone, Serialize)]
pub struct NodeTime {
    /// Node name.
    pub node: String,
    /// tract op name.
    pub op: String,
    /// Wall time of its evaluation.
    pub time: Duration,
    /// tract's description of the op (kernel, shapes).
    pub info: Vec<String>,
}

/// Run `plan` once on `inputs`, timing every node; slowest first.
pub fn profile(
    plan: &std::sync::Arc<TypedRunnableModel>,
    inputs: Vec<Tensor>,
) -> TractResult<Vec<NodeTime>> {
    Ok(profile_values(plan, inputs.into_iter().map(TValue::from).collect())?.0)
}

/// [`profile`] with inputs that may be shared constants; also returns the plan's outputs (for a
/// plan whose outputs feed another).
pub fn profile_values(
    plan: &std::sync::Arc<TypedRunnableModel>,
    inputs: TVec<TValue>,
) -> TractResult<(Vec<NodeTime>, TVec<TValue>)> {
    let mut times: Vec<NodeTime> = Vec::new();
    let mut state = plan.spawn()?;
    let outputs = state.run_plan_with_eval(inputs, |ctx, op_state, node, input| {
        let start = Instant::now();
        let out = eval(ctx, op_state, node, input);
        let time = start.elapsed();
        let info = node.op.info().unwrap_or_default();
        times.push(NodeTime {
            node: node.name.clone(),
            op: node.op.name().to_string(),
            time,
            info,
        });
        out
    })?;
    times.sort_by_key(|t| std::cmp::Reverse(t.time));
    Ok((times, outputs))
}

/// Sum node times per op name; slowest first.
pub fn by_op(times: &[NodeTime]) -> Vec<(String, Duration, usize)> {
    let mut out: Vec<(String, Duration, usize)> = Vec::new();
    for t in times {
        match out.iter_mut().find(|(op, _, _)| *op == t.op) {
            Some((_, d, n)) => {
                *d += t.time;
                *n += 1;
            }
            None => out.push((t.op.clone(), t.time, 1)),
        }
    }
    out.sort_by_key(|t| std::cmp::Reverse(t.1));
    out
}

/// Sum node times per layer, the node name's first `depth` path components
/// (`/encoder/layers.3/blocks.0/mlp` for depth 4); slowest first.
pub fn by_layer(times: &[NodeTime], depth: usize) -> Vec<(String, Duration)> {
    let mut out: Vec<(String, Duration)> = Vec::new();
    for t in times {
        let parts: Vec<&str> = t.node.split('/').filter(|p| !p.is_empty()).collect();
        let key = if parts.len() > 1 {
            format!("/{}", parts[..depth.min(parts.len() - 1)].join("/"))
        } else {
            "(graph)".to_string()
        };
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some((_, d)) => *d += t.time,
            None => out.push((key, t.time)),
        }
    }
    out.sort_by_key(|t| std::cmp::Reverse(t.1));
    out
}
