//! Every bad input gets a typed error that names the problem; nothing panics.

use std::path::Path;

use tinysam_edge::model::{Model, Precision, PrecisionChoice};
use tinysam_edge::prompt::{Prompt, PromptError};
use tinysam_edge::segmenter::MaskSelection;
use tinysam_edge::Error;

use crate::util::test_model;

fn copy_model(to: &Path) {
    for entry in std::fs::read_dir(test_model()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// Both stages in FP32.
fn fp32() -> PrecisionChoice {
    PrecisionChoice {
        encoder: Some(Precision::Fp32),
        decoder: Some(Precision::Fp32),
        ..Default::default()
    }
}

/// Write `file`'s new SHA-256 into the manifest of `dir`, as a manifest written for the damaged
/// file would have it: the load then gets past the hash check to tract.
fn rehash(dir: &Path, file: &str) {
    use sha2::{Digest, Sha256};
    let hash = format!(
        "{:x}",
        Sha256::digest(std::fs::read(dir.join(file)).unwrap())
    );
    let path = dir.join("manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for entry in manifest["files"].as_array_mut().unwrap() {
        if entry["path"] == file {
            entry["sha256"] = hash.clone().into();
        }
    }
    std::fs::write(&path, serde_json::to_string_pretty(&manifest).unwrap()).unwrap();
}

#[test]
fn missing_model_directory() {
    let err = Model::load(Path::new("/nonexistent/model"), PrecisionChoice::default())
        .err()
        .unwrap();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/model/manifest.json"));
}

#[test]
fn corrupt_manifest() {
    let dir = tempfile::tempdir().unwrap();
    copy_model(dir.path());
    std::fs::write(dir.path().join("manifest.json"), "{ not json").unwrap();
    let err = Model::load(dir.path(), PrecisionChoice::default())
        .err()
        .unwrap();
    assert!(matches!(err, Error::Manifest { .. }), "{err:?}");
}

#[test]
fn manifest_of_another_format() {
    let dir = tempfile::tempdir().unwrap();
    copy_model(dir.path());
    let path = dir.path().join("manifest.json");
    let text =
        std::fs::read_to_string(&path)
            .unwrap()
            .replacen("\"format\": 1", "\"format\": 99", 1);
    std::fs::write(&path, text).unwrap();
    let err = Model::load(dir.path(), PrecisionChoice::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("format 99"), "{err}");
}

#[test]
fn missing_and_corrupt_model_files() {
    let dir = tempfile::tempdir().unwrap();
    copy_model(dir.path());
    std::fs::remove_file(dir.path().join("encoder.int8.onnx")).unwrap();
    let choice = PrecisionChoice {
        encoder: Some(Precision::Int8),
        decoder: None,
        ..Default::default()
    };
    let err = Model::load(dir.path(), choice).err().unwrap();
    assert!(
        matches!(err, Error::Io { .. }) && err.to_string().contains("encoder.int8.onnx"),
        "{err}"
    );

    std::fs::write(dir.path().join("encoder.int8.onnx"), b"garbage").unwrap();
    let err = Model::load(dir.path(), choice).err().unwrap();
    assert!(
        matches!(err, Error::ModelMismatch { .. }) && err.to_string().contains("SHA-256"),
        "{err:?}"
    );
    // The same garbage with a manifest written for it: tract refuses to parse it.
    rehash(dir.path(), "encoder.int8.onnx");
    let err = Model::load(dir.path(), choice).err().unwrap();
    assert!(
        matches!(
            err,
            Error::ModelLoad {
                stage: "encoder",
                ..
            }
        ),
        "{err:?}"
    );
}

/// One flipped bit in a weight: the graph still parses and would serve wrong masks, so the
/// manifest's hash is what catches it.
#[test]
fn damaged_weights_are_refused_by_their_hash() {
    let dir = tempfile::tempdir().unwrap();
    copy_model(dir.path());
    let path = dir.path().join("encoder.fp32.onnx");
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&path, bytes).unwrap();
    let err = Model::load(dir.path(), fp32()).err().unwrap();
    assert!(matches!(err, Error::ModelMismatch { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("encoder.fp32.onnx") && text.contains("SHA-256"),
        "{text}"
    );
}

/// An index constant out of range (the window attention's relative-position index) with a
/// manifest that matches the file: tract panics while optimising the graph, and the load must
/// come back as an error naming the file, not unwind through the caller.
#[test]
fn corrupt_index_constant_is_an_error_not_a_panic() {
    use prost::Message;
    use tract_onnx::pb::ModelProto;

    let dir = tempfile::tempdir().unwrap();
    copy_model(dir.path());
    let path = dir.path().join("encoder.int8.onnx");
    let mut model = ModelProto::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
    let graph = model.graph.as_mut().unwrap();
    let mut damaged = 0;
    for node in &mut graph.node {
        let feeds_gather = node.op_type == "Constant" && node.output[0].starts_with("onnx::Gather");
        if !feeds_gather {
            continue;
        }
        for attr in &mut node.attribute {
            if let Some(t) = attr.t.as_mut() {
                // int64 (data type 7), stored raw little-endian or as int64_data.
                if t.data_type == 7 && t.raw_data.len() >= 8 {
                    t.raw_data[..8].copy_from_slice(&1_000_000i64.to_le_bytes());
                    damaged += 1;
                } else if let Some(first) = t.int64_data.first_mut() {
                    *first = 1_000_000;
                    damaged += 1;
                }
            }
        }
    }
    assert!(
        damaged > 0,
        "the test model has no index constant to damage"
    );
    std::fs::write(&path, model.encode_to_vec()).unwrap();
    rehash(dir.path(), "encoder.int8.onnx");
    let choice = PrecisionChoice {
        encoder: Some(Precision::Int8),
        decoder: Some(Precision::Fp32),
        ..Default::default()
    };
    let loaded = std::panic::catch_unwind(|| Model::load(dir.path(), choice));
    let err = loaded
        .expect("the load returns instead of panicking")
        .err()
        .expect("a damaged index is an error");
    let text = format!("{err:#}");
    assert!(matches!(err, Error::ModelLoad { .. }), "{err:?}");
    assert!(text.contains("encoder.int8.onnx"), "{text}");
}

#[test]
fn wrong_graph_for_the_role() {
    let dir = tempfile::tempdir().unwrap();
    copy_model(dir.path());
    // Put the decoder where the encoder should be: inputs differ from the manifest's.
    std::fs::copy(
        dir.path().join("decoder.fp32.onnx"),
        dir.path().join("encoder.fp32.onnx"),
    )
    .unwrap();
    let err = Model::load(dir.path(), fp32()).err().unwrap();
    assert!(matches!(err, Error::ModelMismatch { .. }), "{err:?}");
    assert!(err.to_string().contains("encoder.fp32.onnx"));
}

#[test]
fn bad_prompts_fail_alone() {
    let seg = crate::util::segmenter(None);
    let frame = image::RgbImage::from_pixel(64, 48, image::Rgb([120, 80, 40]));
    let emb = seg.embed(&frame).unwrap();
    let prompts = vec![
        Prompt::point(10.0, 10.0),
        Prompt::point(1000.0, 10.0),
        Prompt::point(f32::NAN, 1.0),
        Prompt::default(),
        Prompt {
            mask_input: Some(vec![0.0; 7]),
            ..Prompt::point(5.0, 5.0)
        },
        Prompt::point(63.0, 47.0),
    ];
    let out = seg.segment(&emb, &prompts, MaskSelection::Best).unwrap();
    assert!(out[0].is_ok());
    assert!(matches!(
        out[1],
        Err(PromptError::PointOutside { index: 0, .. })
    ));
    assert!(matches!(out[2], Err(PromptError::NotFinite { .. })));
    assert!(matches!(out[3], Err(PromptError::Empty)));
    assert!(matches!(
        out[4],
        Err(PromptError::MaskInputSize { got: 7, .. })
    ));
    assert!(out[5].is_ok());
}

#[test]
fn empty_image_is_refused() {
    let seg = crate::util::segmenter(None);
    let err = seg.embed(&image::RgbImage::new(0, 0)).err().unwrap();
    assert!(matches!(err, Error::Image(_)), "{err:?}");
}

#[test]
fn mask_input_refines_against_the_same_frame() {
    let seg = crate::util::segmenter(None);
    let frame = image::open(crate::util::fixtures().join("golden/frame.png"))
        .unwrap()
        .to_rgb8();
    let emb = seg.embed(&frame).unwrap();
    let first = seg
        .segment(&emb, &[Prompt::point(100.0, 75.0)], MaskSelection::Best)
        .unwrap();
    let low = first[0].as_ref().unwrap()[0].low_res_logits.clone();
    let refined = Prompt {
        mask_input: Some(low),
        ..Prompt::point(100.0, 75.0)
    };
    let second = seg.segment(&emb, &[refined], MaskSelection::Best).unwrap();
    assert!(second[0].is_ok());
}

/// Asking for an int8 kernel this CPU lacks is a load error naming the kernel, not a crash.
#[test]
fn unsupported_int8_kernel_is_a_clear_error() {
    use tinysam_edge::model::qmatmul::Kernel;
    use tinysam_edge::model::Int8Matmul;
    let Some(missing) = [Kernel::Avx2, Kernel::NeonDot]
        .into_iter()
        .find(|k| !k.is_supported())
    else {
        return; // a CPU with every kernel: nothing to refuse
    };
    let choice = PrecisionChoice {
        encoder: Some(Precision::Int8),
        decoder: None,
        int8_matmul: Int8Matmul::Kernel(missing),
        ..Default::default()
    };
    let err = Model::load(&crate::util::test_model(), choice)
        .err()
        .expect("load must fail");
    assert!(
        matches!(err, Error::Unsupported(_)) && err.to_string().contains(&missing.to_string()),
        "{err}"
    );
}
