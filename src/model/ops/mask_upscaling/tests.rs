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
    assert_eq!(
        rewrite_mask_upscaling(&mut ours, None)?,
        1,
        "chain not matched"
    );
    assert!(
        ours.nodes().iter().any(|n| n.op_is::<MaskUpscaling>()),
        "no TinysamMaskUpscaling in the graph"
    );
    let inputs = [
        pattern_tensor(&tokens, 1, 3.0),
        pattern_tensor(&weights, 2, 1.0),
    ];
    let want = run_model(tract_nodes.clone(), &inputs)?;
    let got = run_model(ours, &inputs)?;
    let (err, scale) = max_difference(&got, &want);
    eprintln!(
        "{}: batch {batch}, largest difference {err:e} of {scale}",
        dir.display()
    );
    assert!(err <= 1e-5 * scale.max(1.0), "{err} of {scale}");
    // With the second product as W8A16 (the INT8 decoder's form): every kernel gives the same
    // bits, within the 8-bit weights' rounding of tract's f32 values.
    let mut first_kernel: Option<Vec<f32>> = None;
    for kernel in W8A16Kernel::supported() {
        let mut integer = tract_nodes.clone();
        assert_eq!(rewrite_mask_upscaling(&mut integer, Some(kernel))?, 1);
        let got = run_model(integer, &inputs)?;
        let (err, scale) = max_difference(&got, &want);
        eprintln!("  W8A16 on {kernel:?}: largest difference {err:e} of {scale}");
        assert!(err <= 1e-2 * scale.max(1.0), "{kernel:?}: {err} of {scale}");
        match &first_kernel {
            None => first_kernel = Some(got),
            Some(first) => assert!(
                crate::model::ops::gemm::same_bits(first, &got),
                "{kernel:?} differs from the first kernel"
            ),
        }
    }
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
    assert_eq!(rewrite_mask_upscaling(&mut typed, None)?, 0);
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
        rewrite_mask_upscaling(&mut ours, None)?;
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
/// at full rank and in low rank for a one-point prompt (2 × 56 weights per token), best of 20
/// at 1 and 2 threads.
#[test]
#[ignore]
fn upscaling_op_speed() -> TractResult<()> {
    use crate::model::ops::token_mixing::NormParams;
    use crate::model::test_support::pattern_values;
    let (side, d, c1, c2, masks, n) = (64, 256, 64, 32, 3, 56);
    let pixels = side * side;
    let full = MaskUpscaling {
        side,
        weights: Arc::new(
            kernel::Weights::new(
                PackedWeights::pack(&pattern_values(d * 4 * c1, 1, 0.1), d, 4 * c1).expect("up1"),
                pattern_values(c1, 2, 0.1),
                (1e-6, pattern_values(c1, 3, 1.0), pattern_values(c1, 4, 0.1)),
                PackedWeights::pack(&pattern_values(c1 * 4 * c2, 5, 0.2), c1, 4 * c2).expect("up2"),
                pattern_values(c2, 6, 0.1),
                None,
            )
            .expect("weights"),
        ),
        low_rank: None,
    };
    let norm = |seed| NormParams {
        eps: 1e-5,
        gamma: Arc::new(pattern_values(d, seed, 1.0)),
        beta: Arc::new(pattern_values(d, seed + 1, 0.1)),
        bias: Arc::new(pattern_values(d, seed + 2, 0.1)),
    };
    let source = low_rank::LowRankSource {
        frame_tokens_input: 0,
        norms: [norm(20), norm(30)],
        weights: (n, n),
    };
    let low = MaskUpscaling {
        low_rank: Some(Arc::new(
            low_rank::LowRank::new(&full.weights.up1, &source).expect("low rank"),
        )),
        ..full.clone()
    };
    // The low-rank form with its second product as W8A16, where this CPU has a kernel for it.
    let integer = W8A16Kernel::supported()
        .into_iter()
        .find(|k| *k != W8A16Kernel::Portable)
        .map(|kernel| {
            let w = &low.weights;
            let weights = kernel::Weights::new(
                w.up1.clone(),
                w.bias1.clone(),
                (w.eps, w.gamma.clone(), w.beta.clone()),
                w.up2.clone(),
                w.bias2.clone(),
                Some(kernel),
            )
            .expect("weights");
            MaskUpscaling {
                weights: Arc::new(weights),
                ..low.clone()
            }
        });
    let hyper = pattern_tensor(&[1, masks, c2], 8, 1.0).into_tvalue();
    let low_inputs = tvec![
        pattern_tensor(&[1, side, 4 * c1, side], 9, 3.0).into_tvalue(),
        pattern_tensor(&[1, pixels, n + 2], 10, 0.1).into_tvalue(),
        pattern_tensor(&[1, pixels, n + 2], 11, 0.1).into_tvalue(),
        pattern_tensor(&[n, d], 12, 1.0).into_tvalue(),
        pattern_tensor(&[n, d], 13, 1.0).into_tvalue(),
        hyper.clone(),
    ];
    let cases = [
        (
            "full rank",
            &full,
            tvec![
                pattern_tensor(&[1, pixels, d], 7, 3.0).into_tvalue(),
                hyper.clone()
            ],
            full.macs_per_prompt(masks, 0),
        ),
        (
            "low rank",
            &low,
            low_inputs.clone(),
            low.macs_per_prompt(masks, 2 * n + 4),
        ),
    ];
    let integer_case = integer.as_ref().map(|op| {
        (
            "low rank, W8A16 second product",
            op,
            low_inputs,
            op.macs_per_prompt(masks, 2 * n + 4),
        )
    });
    for (name, op, inputs, macs) in cases.into_iter().chain(integer_case) {
        for threads in [1, 2] {
            crate::model::set_threads(threads);
            let best = crate::model::test_support::op_best_of_20(op, &inputs)?;
            let gmacs = macs as f64 / best / 1e6;
            eprintln!(
                "upscaling op, {name}, {threads} thread(s): best of 20 {best:.2} ms, {gmacs:.1} GMAC/s"
            );
        }
    }
    Ok(())
}

/// The decoder of the model in `dir` in its low-rank form against the full-rank split form, on
/// an embedding of image-like scale: one-point prompts, several points, a box, a batch and a
/// mask input, within 1e-5 of the logits' scale (issue 18 asks 1e-4 of the one graph, which
/// `parity::split_decoder_matches_the_one_graph_decoder` checks end to end).
fn low_rank_matches_full_rank(dir: &std::path::Path) -> TractResult<()> {
    use crate::model::{DecoderGraph, DecoderInput, Embedding, Int8Matmul, Manifest, Precision};
    let manifest = Manifest::load(dir)?;
    let load = |graph| {
        crate::model::Decoder::load(dir, &manifest, Precision::Fp32, Int8Matmul::Auto, graph)
    };
    let low = load(DecoderGraph::Auto)?;
    let full = load(DecoderGraph::SplitFullRank)?;
    assert!(
        low.low_rank_upscaling(),
        "{}: not in low rank",
        dir.display()
    );
    assert!(!full.low_rank_upscaling());
    let e = manifest.config.embedding_size();
    let d = manifest.config.prompt_embed_dim;
    let side = manifest.config.image_size as f32;
    let tensor = pattern_tensor(&[1, d, e, e], 11, 1.5);
    let geometry = crate::geometry::Geometry::new(
        manifest.config.image_size as u32,
        manifest.config.image_size as u32,
        manifest.config.image_size as u32,
    )?;
    let embedding = Embedding::new(Arc::new(tensor), geometry);
    let at = |f: f32| f * side;
    let prompts: Vec<(Vec<[f32; 2]>, Vec<f32>)> = vec![
        (vec![[at(0.3), at(0.6)], [0.0, 0.0]], vec![1.0, -1.0]),
        (
            vec![
                [at(0.2), at(0.2)],
                [at(0.7), at(0.4)],
                [at(0.5), at(0.9)],
                [0.0, 0.0],
            ],
            vec![1.0, 0.0, 1.0, -1.0],
        ),
        (vec![[at(0.1), at(0.2)], [at(0.8), at(0.7)]], vec![2.0, 3.0]),
    ];
    let m = low.mask_size();
    let mut mask_input: Option<Vec<f32>> = None;
    for (coords, labels) in &prompts {
        for batch in [1, 3] {
            let input = DecoderInput {
                points_per_prompt: labels.len(),
                coords: coords.repeat(batch),
                labels: labels.repeat(batch),
                mask_input: mask_input.clone(),
            };
            let got = low.decode(&embedding, &input)?;
            let want = full.decode(&embedding, &input)?;
            let (err, scale) = max_difference(
                crate::model::decoder::f32_slice(&got.masks),
                crate::model::decoder::f32_slice(&want.masks),
            );
            eprintln!(
                "{}: {} points, batch {batch}, mask input {}: logits {err:e} of {scale}",
                dir.display(),
                labels.len(),
                mask_input.is_some()
            );
            assert!(err <= 1e-5 * scale.max(1.0), "logits {err} of {scale}");
            let (err, scale) = max_difference(
                crate::model::decoder::f32_slice(&got.iou),
                crate::model::decoder::f32_slice(&want.iou),
            );
            assert!(err <= 1e-5 * scale.max(1.0), "IoU {err} of {scale}");
            if mask_input.is_none() {
                mask_input = Some(want.mask(0, 0).get(..m * m).unwrap_or_default().to_vec());
            }
        }
    }
    Ok(())
}

#[test]
fn low_rank_upscaling_matches_full_rank_on_the_fixture() -> TractResult<()> {
    low_rank_matches_full_rank(&fixture_dir())
}

/// The default model's sizes: 8 heads, 256 channels, whole product blocks of the basis.
#[test]
fn low_rank_upscaling_matches_full_rank_on_the_default_model() -> TractResult<()> {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/default");
    low_rank_matches_full_rank(&dir)
}

/// Graphs not in the shape the low-rank form needs are left as they are, with the reason: a
/// per-prompt graph whose image->token outputs are still tract's nodes, and a mask graph whose
/// upscaling is.
#[test]
fn graphs_without_our_ops_stay_at_full_rank() -> TractResult<()> {
    let (mut prompt, _) = decluttered_prompt_graph(&fixture_dir(), 1, 2);
    let outputs = prompt.output_outlets()?.to_vec();
    let found = low_rank::expose_coefficients(&mut prompt)?;
    assert!(found.is_err(), "{found:?}");
    assert_eq!(prompt.output_outlets()?, outputs.as_slice());

    let (masks, tokens, _) = decluttered_mask_graph(&fixture_dir(), 1);
    let d = *tokens.last().unwrap_or(&0);
    let norm = || crate::model::ops::token_mixing::NormParams {
        eps: 1e-5,
        gamma: Arc::new(vec![1.0; d]),
        beta: Arc::new(vec![0.0; d]),
        bias: Arc::new(vec![0.0; d]),
    };
    let source = low_rank::LowRankSource {
        frame_tokens_input: 0,
        norms: [norm(), norm()],
        weights: (14, 14),
    };
    let extra = [vec![1, 4, 16], vec![1, 4, 16], vec![2, 7, d], vec![2, 7, d]];
    let built = low_rank::low_rank_mask_model(&masks, &source, &extra)?;
    assert!(built.is_err(), "a mask graph of tract's nodes was rebuilt");
    Ok(())
}
