//! The INT8 proof: quantized graphs run on tract's integer (i32-accumulating) kernels.

use tinysam_edge::model::{kernels, Precision};

use crate::util::load;

#[test]
fn int8_encoder_runs_mostly_in_integer_kernels() {
    let model = load(Precision::Int8);
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
    let report = kernels::analyse(load(Precision::Fp32).encoder.model()).unwrap();
    assert_eq!(report.integer_macs, 0);
    assert!(report.float_macs > 0);
}

/// On aarch64 (a Pi, a Jetson, or qemu-aarch64 in the test command) the quantized matmuls run on
/// tract's NEON i32 kernels: the SDOT ones where the CPU has dot product (Cortex-A76, Pi 5),
/// the plain NEON ones otherwise (Cortex-A53, Pi 3/Zero 2).
#[cfg(target_arch = "aarch64")]
#[test]
fn int8_encoder_uses_neon_i32_kernels() {
    let model = load(Precision::Int8);
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
}
