//! Which kernels tract chose: the proof that INT8 models run on integer matmul kernels.
//!
//! Walks an optimised tract graph and, for every node with multiply-accumulate cost, records the
//! op, the kernel name (for `OptMatMul`) and its MAC count by accumulator type.

use serde::Serialize;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::matmul::optimized::OptMatMul;
use tract_onnx::tract_core::ops::Cost;

/// One compute node of an optimised graph.
#[derive(Debug, Clone, Serialize)]
pub struct NodeKernel {
    /// tract node name (from the ONNX node it came from).
    pub node: String,
    /// tract op name, e.g. `OptMatMul`, `DepthWise`.
    pub op: String,
    /// Kernel of a matmul: tract's choice (e.g. `avx512_mmm_i32_16x8`) or ours
    /// (`tinysam_i8_avx2_6x16`); empty otherwise.
    pub kernel: String,
    /// Accumulator type of the MACs, e.g. `I32` or `F32`.
    pub accumulator: String,
    /// Multiply-accumulates per run.
    pub macs: u64,
}

/// Kernel choices and MAC split of a graph.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KernelReport {
    /// Every node with MAC cost, in evaluation order.
    pub nodes: Vec<NodeKernel>,
    /// MACs accumulated in integers (i32).
    pub integer_macs: u64,
    /// MACs accumulated in floating point.
    pub float_macs: u64,
    /// Our ops that replaced tract's (see `model::ops` and `model::qmatmul`), by name, with how
    /// many nodes run each; an int8 product with a fused bias add or GELU is named so.
    pub our_ops: Vec<(String, usize)>,
}

impl KernelReport {
    /// Share of MACs in integer kernels, 0..1.
    pub fn integer_share(&self) -> f64 {
        let total = self.integer_macs + self.float_macs;
        if total == 0 {
            0.0
        } else {
            self.integer_macs as f64 / total as f64
        }
    }

    /// This report followed by `other`'s, as for two graphs run one after the other.
    pub fn merge(mut self, other: KernelReport) -> KernelReport {
        self.nodes.extend(other.nodes);
        self.integer_macs += other.integer_macs;
        self.float_macs += other.float_macs;
        for (name, n) in other.our_ops {
            count(&mut self.our_ops, name, n);
        }
        self
    }

    /// Distinct kernel names with the MACs each runs, largest first.
    pub fn kernel_totals(&self) -> Vec<(String, u64)> {
        let mut totals: Vec<(String, u64)> = Vec::new();
        for n in &self.nodes {
            let name = if n.kernel.is_empty() {
                format!("{} ({})", n.op, n.accumulator)
            } else {
                n.kernel.clone()
            };
            match totals.iter_mut().find(|(k, _)| *k == name) {
                Some((_, m)) => *m += n.macs,
                None => totals.push((name, n.macs)),
            }
        }
        totals.sort_by_key(|t| std::cmp::Reverse(t.1));
        totals
    }
}

/// Add `n` to `name`'s count.
fn count(counts: &mut Vec<(String, usize)>, name: String, n: usize) {
    match counts.iter_mut().find(|(k, _)| *k == name) {
        Some((_, c)) => *c += n,
        None => counts.push((name, n)),
    }
}

/// The name a node of ours is counted under, `None` for tract's own ops.
fn our_op_name(node: &TypedNode) -> Option<String> {
    let name = node.op.name();
    if !name.starts_with("Tinysam") {
        return None;
    }
    let epilogue = node
        .op_as::<super::qmatmul::QMatMulOp>()
        .map(|op| &op.epilogue);
    Some(match epilogue {
        Some(e) if e.bias.is_some() && e.gelu => format!("{name} + bias + GELU"),
        Some(e) if e.bias.is_some() => format!("{name} + bias"),
        Some(e) if e.gelu => format!("{name} + GELU"),
        _ => name.to_string(),
    })
}

/// Analyse an optimised graph with concrete shapes.
pub fn analyse(model: &TypedModel) -> TractResult<KernelReport> {
    analyse_with(model, &SymbolValues::default())
}

/// Analyse every plan `decoder` runs for a batch of `batch` prompts of `points` points (see
/// [`super::Decoder::prompt_plans`]), as one report.
pub fn analyse_prompts(
    decoder: &super::Decoder,
    batch: usize,
    points: usize,
) -> TractResult<KernelReport> {
    let mut report = KernelReport::default();
    for (plan, symbols) in decoder.prompt_plans(batch, points)? {
        report = report.merge(analyse_with(plan.model(), &symbols)?);
    }
    Ok(report)
}

/// Analyse an optimised graph whose symbols take `values`.
pub fn analyse_with(model: &TypedModel, values: &SymbolValues) -> TractResult<KernelReport> {
    let mut nodes = Vec::new();
    let (mut integer_macs, mut float_macs) = (0u64, 0u64);
    let mut our_ops = Vec::new();
    for &id in model.eval_order()?.iter() {
        let node = model.node(id);
        if let Some(name) = our_op_name(node) {
            count(&mut our_ops, name, 1);
        }
        let inputs = model.node_input_facts(id)?;
        let op_name = node.op.name();
        // Element-wise ops (GELU, norms) report FMA costs too; only products count as model MACs.
        if ![
            "MatMul",
            "Conv",
            "DepthWise",
            "TokenDepthwise",
            "Deconv",
            "Attention",
            "Upscaling",
            "Stem",
            "ImageToToken",
        ]
        .iter()
        .any(|k| op_name.contains(k))
        {
            continue;
        }
        for (cost, count) in node.op.cost(&inputs)? {
            let Cost::FMA(dt) = cost else { continue };
            let macs = count.eval(values).to_i64().unwrap_or(0).max(0) as u64;
            if macs == 0 {
                continue;
            }
            let kernel = node
                .op_as::<OptMatMul>()
                .and_then(|mm| mm.mmm.first())
                .map(|k| k.name().to_string())
                .or_else(|| {
                    super::qmatmul::as_int8_op(node).map(|op| op.packed().kernel().report_name())
                })
                .or_else(|| {
                    node.op_as::<super::ops::WindowAttention>()
                        .map(|op| op.kernel_name())
                })
                .or_else(|| {
                    node.op_as::<super::ops::MaskUpscaling>()
                        .map(|op| op.kernel_name())
                })
                .or_else(|| {
                    node.op_as::<super::ops::ImageToTokenOutput>()
                        .map(|op| op.kernel_name())
                })
                .or_else(|| {
                    node.op_as::<super::ops::TokenToImageAttention>()
                        .map(|op| op.kernel_name())
                })
                .or_else(|| {
                    node.op_as::<super::ops::MbConv>()
                        .map(|op| op.kernel_name())
                })
                .or_else(|| node.op_as::<super::ops::Stem>().map(|op| op.kernel_name()))
                .or_else(|| {
                    node.op_as::<super::ops::TokenDepthwise>()
                        .map(|op| op.kernel_name())
                })
                .unwrap_or_default();
            if dt.is_integer() {
                integer_macs += macs;
            } else {
                float_macs += macs;
            }
            nodes.push(NodeKernel {
                node: node.name.clone(),
                op: op_name.to_string(),
                kernel,
                accumulator: format!("{dt:?}"),
                macs,
            });
        }
    }
    Ok(KernelReport {
        nodes,
        integer_macs,
        float_macs,
        our_ops,
    })
}
