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
    let choice = PrecisionChoice {
        encoder: Some(Precision::Fp32),
        decoder: Some(Precision::Fp32),
        ..Default::default()
    };
    let err = Model::load(dir.path(), choice).err().unwrap();
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
