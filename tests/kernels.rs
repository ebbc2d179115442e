//! The INT8 proof: quantized graphs run on tract's integer (i32-accumulating) kernels.

use tinysam_edge::model::{kernels, Precision};

use crate::util::shared_model;

#[test]
fn int8_encoder_runs_mostly_in_integer_kernels() {
    let model = shared_model(Precision::Int8);
    let report = kernels::analyse(model.encoder.model()).unwrap();
    let share = report.integer_share();
    println!(
        "int8 encoder: {:.1}% of MACs in integer kernels; {:?}",
        share * 100.0,
        report.kernel_totals()
    );
    // The fixture's encoder is fully quantized (stem included): every Conv and weight MatMul.
    // What remains float is the depthwise convolutions.
    assert!(share >= 0.9, "only {:.1}% integer", share * 100.0);
    assert!(
        report.nodes.iter().any(|n| n.kernel.contains("i32")),
        "no i32 matmul kernel chosen: {:?}",
        report.kernel_totals()
    );
}

#[test]
fn fp32_encoder_has_no_integer_kernels() {
    let report = kernels::analyse(shared_model(Precision::Fp32).encoder.model()).unwrap();
    assert_eq!(report.integer_macs, 0);
    assert!(report.float_macs > 0);
}

/// On aarch64 (a Pi, a Jetson, or qemu-aarch64 in the test command) the quantized matmuls run on
/// tract's NEON i32 kernels: the SDOT ones where the CPU has dot product (Cortex-A76, Pi 5),
/// the plain NEON ones otherwise (Cortex-A53, Pi 3/Zero 2).
#[cfg(target_arch = "aarch64")]
#[test]
fn int8_encoder_uses_neon_i32_kernels() {
    let model = shared_model(Precision::Int8);
    let report = kernels::analyse(model.encoder.model()).unwrap();
    let totals = report.kernel_totals();
    println!(
        "aarch64 ({}), dotprod {}: {totals:?}",
        tinysam_edge::model::native_isa(),
        std::arch::is_aarch64_feature_detected!("dotprod")
    );
    let int_kernels: Vec<&String> = totals
        .iter()
        .map(|(k, _)| k)
        .filter(|k| k.contains("i32"))
        .collect();
    assert!(!int_kernels.is_empty(), "no i32 kernel: {totals:?}");
    assert!(
        int_kernels.iter().all(|k| k.starts_with("arm64")),
        "non-NEON integer kernel: {int_kernels:?}"
    );
    if std::arch::is_aarch64_feature_detected!("dotprod") {
        assert!(
            int_kernels.iter().any(|k| k.contains("dot")),
            "dotprod CPU but no SDOT kernel: {int_kernels:?}"
        );
    }
    // Our kernels carry the weight products: `sdot` on a dotprod core, portable NEON otherwise.
    let own = if std::arch::is_aarch64_feature_detected!("dotprod") {
        "tinysam_i8_sdot_8x8"
    } else {
        "tinysam_i8_portable_6x16"
    };
    assert!(
        totals.iter().any(|(k, _)| k == own),
        "{own} missing: {totals:?}"
    );
}

/// The fixture's INT8 encoder, parsed and decluttered the way `Model::load` does before the
/// rewrite, with the golden preprocessed input.
fn decluttered_int8_encoder() -> (
    tract_onnx::prelude::TypedModel,
    tract_onnx::prelude::TVec<tract_onnx::prelude::TValue>,
) {
    use tract_onnx::prelude::*;
    let path = crate::util::test_model().join("encoder.int8.onnx");
    let mut model = tract_onnx::onnx()
        .with_ignore_value_info(true)
        .with_ignore_output_shapes(true)
        .model_for_path(&path)
        .unwrap();
    let input: Tensor = crate::util::npy("preprocessed.npy").into();
    model
        .set_input_fact(0, f32::fact(input.shape()).into())
        .unwrap();
    let typed = model.into_typed().unwrap().into_decluttered().unwrap();
    (typed, tvec!(input.into_tvalue()))
}

/// Our int8 ops compute what tract computes, node by node, on the activations of a real run:
/// every quantized matmul and convolution of the fixture encoder (its stem convs too), with each
/// kernel this CPU runs. tract's plain evaluation requantizes with the same folded f32 scale,
/// so any difference would be a kernel bug, not rounding.
#[test]
fn own_int8_ops_agree_with_tract_node_by_node() {
    use tinysam_edge::model::qmatmul::{compare_with_tract, Kernel};
    let (model, input) = decluttered_int8_encoder();
    for kernel in Kernel::supported() {
        let agreement = compare_with_tract(&model, input.clone(), kernel).unwrap();
        println!("{kernel}: {agreement:?}");
        assert!(
            agreement.nodes >= 50,
            "{kernel}: only {} nodes",
            agreement.nodes
        );
        assert!(agreement.values > 1_000_000);
        assert_eq!(agreement.differing, 0, "{kernel}: {agreement:?}");
    }
}

/// The rewrite takes every quantized matmul with constant weights and every quantized
/// convolution; what stays with tract is the activation × activation attention products.
#[test]
fn rewrite_replaces_every_constant_weight_product() {
    use tinysam_edge::model::qmatmul::{rewrite_quantized_matmuls, Kernel};
    let (mut model, _) = decluttered_int8_encoder();
    let report = rewrite_quantized_matmuls(&mut model, Kernel::detect()).unwrap();
    println!("replaced {}, kept {:?}", report.replaced.len(), report.kept);
    assert!(report.replaced.len() >= 50);
    assert!(report
        .replaced
        .iter()
        .any(|n| n.contains("patch_embed") && n.contains("Conv")));
    for (node, why) in &report.kept {
        assert!(
            node.contains("attn/MatMul") && why.contains("not constant"),
            "{node} kept: {why}"
        );
    }
    let ours = shared_model(Precision::Int8);
    let report = kernels::analyse(ours.encoder.model()).unwrap();
    let own: u64 = report
        .nodes
        .iter()
        .filter(|n| n.kernel.starts_with("tinysam_i8_"))
        .map(|n| n.macs)
        .sum();
    println!("{:?}", report.kernel_totals());
    assert!(own as f64 / (report.integer_macs as f64) > 0.5);
}

/// Folding the QuantizeLinear/DequantizeLinear passes into our ops changes no output bit: the
/// whole fixture encoder, fused and not.
#[test]
fn fusing_quantization_changes_no_output() {
    use tinysam_edge::model::qmatmul::{fuse_quantization, rewrite_quantized_matmuls, Kernel};
    use tract_onnx::prelude::*;
    let (model, input) = decluttered_int8_encoder();
    let run = |fuse: bool| -> Vec<f32> {
        let mut m = model.clone();
        let mut report = rewrite_quantized_matmuls(&mut m, Kernel::detect()).unwrap();
        if fuse {
            fuse_quantization(&mut m, &mut report).unwrap();
            println!(
                "fused {} quantize and {} dequantize passes",
                report.fused_quantize, report.fused_dequantize
            );
            assert!(report.fused_quantize >= 30 && report.fused_dequantize >= 40);
        }
        let out = m
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap()
            .run(input.clone())
            .unwrap();
        out[0]
            .to_plain_array_view::<f32>()
            .unwrap()
            .iter()
            .copied()
            .collect()
    };
    let (plain, fused) = (run(false), run(true));
    assert_eq!(plain.len(), fused.len());
    assert!(plain
        .iter()
        .zip(&fused)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}
