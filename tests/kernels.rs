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
