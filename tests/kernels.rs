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

/// The test model without its exported INT8 decoder: its INT8 decoder is then the FP32 split
/// decoder quantized at load.
fn model_without_int8_decoder(dir: &std::path::Path) {
    for entry in std::fs::read_dir(crate::util::test_model()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "decoder.int8.onnx" {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    let path = dir.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let files = manifest["files"].as_array_mut().unwrap();
    files.retain(|f| f["path"] != "decoder.int8.onnx");
    manifest["default"]["decoder"] = "fp32".into();
    std::fs::write(&path, serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
}

/// The decoder's kernel report counts the low-rank mask upscaling (whose plan's widths are
/// symbols), and the INT8 decoder's W8A16 product as integer where the int8 matmul has a W8A16
/// kernel (x86_64 with AVX2 or VNNI); aarch64 runs it in f32. `--check-config`'s file check lists the FP32 split
/// files for it.
#[test]
fn int8_decoder_quantized_at_load_reports_its_integer_product() {
    use tinysam_edge::model::{verify_files, Model, PrecisionChoice};
    let dir = tempfile::tempdir().unwrap();
    model_without_int8_decoder(dir.path());
    let report = |decoder| {
        let choice = PrecisionChoice {
            encoder: Some(Precision::Fp32),
            decoder: Some(decoder),
            ..Default::default()
        };
        let files = verify_files(dir.path(), &choice).unwrap().files;
        let model = Model::load(dir.path(), choice).unwrap();
        assert_eq!(
            model.decoder.quantized_at_load(),
            decoder == Precision::Int8
        );
        let all = kernels::analyse_prompts(&model.decoder, 1, 2).unwrap();
        (all, files)
    };
    let (fp32, fp32_files) = report(Precision::Fp32);
    let (int8, int8_files) = report(Precision::Int8);
    println!(
        "fp32: {:?}\nint8: {:?}",
        fp32.kernel_totals(),
        int8.kernel_totals()
    );
    let upscaling = |r: &kernels::KernelReport| {
        r.kernel_totals()
            .into_iter()
            .filter(|(k, _)| k.starts_with("tinysam_upscaling"))
            .map(|(_, m)| m)
            .sum::<u64>()
    };
    assert!(upscaling(&fp32) > 0, "{:?}", fp32.kernel_totals());
    assert_eq!(upscaling(&fp32), upscaling(&int8));
    assert_eq!(fp32.integer_macs, 0);
    use tinysam_edge::model::{ConvBlocks, Int8Matmul};
    if ConvBlocks::Auto
        .kernel(Int8Matmul::Auto.resolved())
        .is_some()
    {
        // The upscaling's second product, the image->token weighted sums and the later
        // token->image attentions' products, in integers.
        assert!(int8.integer_macs > 0 && int8.float_macs > 0);
        let totals = int8.kernel_totals();
        for op in [
            "tinysam_upscaling",
            "tinysam_token_mixing",
            "tinysam_token_to_image",
        ] {
            let named = |(k, _): &&(String, u64)| k.starts_with(op) && k.contains("w8a16");
            assert!(totals.iter().any(|t| named(&t)), "{op}: {totals:?}");
        }
    } else {
        assert_eq!(int8.integer_macs, 0);
    }
    // The same decoder files are checked (the FP32 split graphs), not the one-graph decoder.
    let names = |files: &[std::path::PathBuf]| -> Vec<String> {
        let mut n: Vec<String> = files
            .iter()
            .filter_map(|f| f.file_name()?.to_str().map(String::from))
            .filter(|n| n.starts_with("decoder."))
            .collect();
        n.sort();
        n
    };
    assert_eq!(
        names(&int8_files),
        [
            "decoder.frame.fp32.onnx",
            "decoder.masks.fp32.onnx",
            "decoder.prompt.fp32.onnx"
        ]
    );
    assert_eq!(names(&fp32_files).len(), 4, "{fp32_files:?}");
}
