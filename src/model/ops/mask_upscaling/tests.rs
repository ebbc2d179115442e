use super::*;
use crate::model::test_support::{
    decluttered_mask_graph, decluttered_prompt_graph, fixture_dir, max_difference, pattern_tensor,
    run_model,
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
    let (mut typed, _) = decluttered_prompt_graph(&fixture_dir(), 1, 2);
    assert_eq!(rewrite_mask_upscaling(&mut typed)?, 0);
    Ok(())
}

/// Not a test: `cargo test --release --lib upscaling_speed -- --ignored --nocapture` times the
/// mask graph on tract's nodes and on our op (default model, 2 threads, best of 8).
#[test]
#[ignore]
fn upscaling_speed() -> TractResult<()> {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/default");
    crate::model::set_threads(2);
    for batch in [1, 4] {
        let (tract_nodes, tokens, weights) = decluttered_mask_graph(&dir, batch);
        let mut ours = tract_nodes.clone();
        rewrite_mask_upscaling(&mut ours)?;
        let inputs: TVec<TValue> = tvec![
            pattern_tensor(&tokens, 1, 3.0).into(),
            pattern_tensor(&weights, 2, 1.0).into()
        ];
        for (name, model) in [("tract", tract_nodes), ("ours", ours)] {
            let best = crate::model::test_support::best_of_8(model, &inputs)?;
            eprintln!("mask graph, {name}, batch {batch}: best of 8 {best:.2} ms");
        }
    }
    Ok(())
}

/// Not a test: `cargo test --release --lib upscaling_op_speed -- --ignored --nocapture` times
/// the op alone at the default model's sizes (64² tokens × 256 → 64 → 32 channels, 3 masks),
/// best of 20 at 1 and 2 threads.
#[test]
#[ignore]
fn upscaling_op_speed() -> TractResult<()> {
    use crate::model::test_support::pattern_values;
    let (side, d, c1, c2, masks) = (64, 256, 64, 32, 3);
    let op = MaskUpscaling {
        side,
        weights: Arc::new(kernel::Weights {
            up1: PackedWeights::pack(&pattern_values(d * 4 * c1, 1, 0.1), d, 4 * c1).expect("up1"),
            bias1: pattern_values(c1, 2, 0.1),
            eps: 1e-6,
            gamma: pattern_values(c1, 3, 1.0),
            beta: pattern_values(c1, 4, 0.1),
            up2: PackedWeights::pack(&pattern_values(c1 * 4 * c2, 5, 0.2), c1, 4 * c2)
                .expect("up2"),
            bias2: pattern_values(c2, 6, 0.1),
        }),
    };
    let inputs = tvec![
        pattern_tensor(&[1, side * side, d], 7, 3.0).into_tvalue(),
        pattern_tensor(&[1, masks, c2], 8, 1.0).into_tvalue(),
    ];
    let macs = side * side * (d * 4 * c1 + 4 * c1 * 4 * c2 + 16 * c2 * masks);
    for threads in [1, 2] {
        crate::model::set_threads(threads);
        let mut best = f64::MAX;
        for _ in 0..20 {
            let start = std::time::Instant::now();
            op.eval(&EvalContext::out_of_plan(), inputs.clone())?;
            best = best.min(start.elapsed().as_secs_f64() * 1e3);
        }
        let gmacs = macs as f64 / best / 1e6;
        eprintln!("upscaling op, {threads} thread(s): best of 20 {best:.2} ms, {gmacs:.1} GMAC/s");
    }
    Ok(())
}
