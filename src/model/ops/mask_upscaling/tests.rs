use super::*;
use crate::model::test_support::{
    decluttered_mask_graph, fixture_dir, max_difference, pattern_tensor, run_model,
};

/// The mask graph of the model in `dir` at `batch` prompts: tract's nodes against our op, on
/// image tokens like the transformer's (values of a few units) and mask weights.
fn compare(dir: &std::path::Path, batch: usize) -> TractResult<()> {
    let (tract_nodes, tokens, weights) = decluttered_mask_graph(dir, batch);
    let mut ours = tract_nodes.clone();
    assert_eq!(rewrite_mask_upscaling(&mut ours)?, 1, "chain not matched");
    assert!(
        ours.nodes().iter().any(|n| n.op_is::<MaskUpscaling>()),
        "no TinysamMaskUpscaling in the graph"
    );
    let inputs = [
        pattern_tensor(&tokens, 1, 3.0),
        pattern_tensor(&weights, 2, 1.0),
    ];
    let want = run_model(tract_nodes, &inputs)?;
    let got = run_model(ours, &inputs)?;
    let (err, scale) = max_difference(&got, &want);
    eprintln!(
        "{}: batch {batch}, largest difference {err:e} of {scale}",
        dir.display()
    );
    assert!(err <= 1e-5 * scale.max(1.0), "{err} of {scale}");
    Ok(())
}

#[test]
fn fused_upscaling_matches_the_fixtures_mask_graph() -> TractResult<()> {
    for batch in [1, 3] {
        compare(&fixture_dir(), batch)?;
    }
    Ok(())
}

/// The default model's sizes (D = 256, 64 and 32 channels, a 64² grid) take every path of the
/// kernel: whole product blocks and panels, whole dot-product lanes.
#[test]
fn fused_upscaling_matches_the_default_models_mask_graph() -> TractResult<()> {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/default");
    compare(&dir, 1)
}

#[test]
fn the_identity_is_not_sams_pixel_order() -> TractResult<()> {
    let (model, _, _) = decluttered_mask_graph(&fixture_dir(), 1);
    assert!(!moves_to_sam_pixel_order(
        &model,
        &[],
        [1, 16 * 16 * 16, 3],
        16
    )?);
    Ok(())
}

#[test]
fn other_products_are_left_alone() -> TractResult<()> {
    // The decoder's per-prompt graph has many `[B, N, D] x [D, M]` products, none an upscaling.
    let dir = fixture_dir();
    let manifest = crate::model::Manifest::load(&dir).expect("manifest");
    let (_, mut model) = crate::model::parse_onnx(
        &dir,
        &manifest,
        crate::model::Role::DecoderPrompt,
        crate::model::Precision::Fp32,
    )
    .expect("prompt graph");
    let inputs = model.input_outlets()?.len();
    for ix in 0..inputs {
        let fact = model.input_fact(ix)?.clone();
        if fact.shape.as_concrete_finite()?.is_none() {
            let shape: Vec<usize> = if ix == inputs - 2 {
                vec![1, 2, 2]
            } else {
                vec![1, 2]
            };
            model.set_input_fact(ix, f32::fact(shape).into())?;
        }
    }
    let mut typed = model.into_typed()?.into_decluttered()?;
    crate::model::ops::rewrite_layer_norm(&mut typed)?;
    crate::model::qmatmul::rewrite_gelu(&mut typed)?;
    assert_eq!(rewrite_mask_upscaling(&mut typed)?, 0);
    Ok(())
}

/// Not a test: `cargo test --release --lib upscaling_speed -- --ignored --nocapture`.
#[test]
#[ignore]
fn upscaling_speed() -> TractResult<()> {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/default");
    crate::model::set_threads(2);
    for batch in [1, 4] {
        let (mut model, tokens, weights) = decluttered_mask_graph(&dir, batch);
        rewrite_mask_upscaling(&mut model)?;
        let plan = model.into_optimized()?.into_runnable()?;
        let inputs: TVec<TValue> = tvec![
            pattern_tensor(&tokens, 1, 3.0).into(),
            pattern_tensor(&weights, 2, 1.0).into()
        ];
        for _ in 0..5 {
            let t = std::time::Instant::now();
            plan.run(inputs.clone())?;
            eprintln!("batch {batch}: {:.2} ms", t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(())
}
