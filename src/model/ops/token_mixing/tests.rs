use super::*;
use crate::model::test_support::{assert_outputs_agree, decluttered_prompt_graph, fixture_dir};

/// The per-prompt graph of the model in `dir`: tract's nodes against our op, every output
/// (image tokens, mask weights, IoU); with `logits`, the later block's op computes its own
/// logits, and the token->image attention is ours too (as `optimize` leaves the graph).
fn compare(dir: &std::path::Path, batch: usize, points: usize, logits: bool) -> TractResult<()> {
    let (tract_nodes, inputs) = decluttered_prompt_graph(dir, batch, points);
    let mut ours = tract_nodes.clone();
    let n = rewrite_image_to_token_output(&mut ours)?;
    // Both blocks of the two-way transformer.
    assert_eq!(n, 2, "{n} chains matched");
    if logits {
        let attentions = super::super::rewrite_token_to_image(&mut ours)?;
        assert_eq!(attentions, 3);
        // The second block's logits and the first block's (per head, from the per-frame
        // queries; for a batch, all its prompts' logits in one product per head).
        let n = rewrite_image_to_token_logits(&mut ours)?;
        assert_eq!(n, 2, "{n} logits matched");
        let kinds: Vec<&LogitsSource> = ours
            .nodes()
            .iter()
            .filter_map(|n| n.op_as::<ImageToTokenOutput>())
            .map(|op| &op.logits)
            .collect();
        assert_eq!(kinds.len(), 2);
        assert!(kinds.iter().any(|k| matches!(k, LogitsSource::FromKeys(_))));
        assert!(kinds.iter().any(|k| matches!(k, LogitsSource::PerHead(_))));
    }
    let label = format!("{}: batch {batch}, logits {logits}", dir.display());
    assert_outputs_agree(&label, tract_nodes, ours, &inputs)?;
    Ok(())
}

#[test]
fn fused_output_matches_the_fixtures_prompt_graph() -> TractResult<()> {
    for logits in [false, true] {
        compare(&fixture_dir(), 1, 2, logits)?;
        compare(&fixture_dir(), 3, 1, logits)?;
    }
    Ok(())
}

/// The default model's sizes: 8 heads, 256 channels, 4 096 image tokens, whole product blocks.
#[test]
fn fused_output_matches_the_default_models_prompt_graph() -> TractResult<()> {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/default");
    // A batch of the default model's size on x86_64 only: under qemu it took 19 of this test's
    // 38 s, and the batched path is the same kernel code as the fixture's batch of 3.
    if cfg!(target_arch = "x86_64") {
        compare(&dir, 2, 2, false)?;
    }
    // One prompt at a time, as the decoder runs them (batches: the fixture's test).
    compare(&dir, 1, 2, true)
}

/// The fixture's per-prompt graph on our ops in the INT8 decoder's form (the image->token
/// weighted sums and logits from keys, and the token->image attentions' products, in integers on
/// the W8A16 kernels) against f32: every kernel gives the same bits, within the quantization's
/// rounding of the f32 outputs (image tokens, mask weights, IoU).
#[test]
fn integer_weighted_sums_stay_close_to_f32() -> TractResult<()> {
    use crate::model::ops::w8a16::W8A16Kernel;
    use crate::model::test_support::{max_difference, run_all_outputs};
    for (batch, points) in [(1, 2), (3, 1)] {
        let (mut f32_ops, inputs) = decluttered_prompt_graph(&fixture_dir(), batch, points);
        rewrite_image_to_token_output(&mut f32_ops)?;
        super::super::rewrite_token_to_image(&mut f32_ops)?;
        rewrite_image_to_token_logits(&mut f32_ops)?;
        let want = run_all_outputs(f32_ops.clone(), &inputs)?;
        let mut first_kernel: Option<Vec<Vec<f32>>> = None;
        for kernel in W8A16Kernel::supported() {
            let mut integer = f32_ops.clone();
            assert_eq!(image_to_token_outputs_in_integers(&mut integer, kernel)?, 2);
            // The later two (the first block's heads are half a panel wide).
            let later = super::super::token_to_image_in_integers(&mut integer, kernel)?;
            assert_eq!(later, 2);
            let got = run_all_outputs(integer, &inputs)?;
            for (i, (got, want)) in got.iter().zip(&want).enumerate() {
                let (err, scale) = max_difference(got, want);
                eprintln!("batch {batch}, {kernel:?}, output {i}: {err:e} of {scale}");
                assert!(err <= 1e-2 * scale.max(1.0), "output {i}: {err} of {scale}");
            }
            match &first_kernel {
                None => first_kernel = Some(got),
                Some(first) => assert!(
                    first
                        .iter()
                        .zip(&got)
                        .all(|(a, b)| crate::model::ops::gemm::same_bits(a, b)),
                    "{kernel:?} differs from the first kernel"
                ),
            }
        }
    }
    Ok(())
}

#[test]
fn other_orders_are_not_image_tokens_first() -> TractResult<()> {
    let (model, _) = decluttered_prompt_graph(&fixture_dir(), 1, 2);
    // No axis ops at all: [H, T, P] as it is.
    assert!(!weights_put_image_tokens_first(&model, &[], &[2, 7, 256])?);
    Ok(())
}

/// Not a test: `cargo test --release --lib token_mixing_speed -- --ignored --nocapture` times the
/// per-prompt graph with tract's nodes and with our op (default model, 2 threads, best of 8).
#[test]
#[ignore]
fn token_mixing_speed() -> TractResult<()> {
    crate::model::test_support::time_prompt_graph(
        "our image->token output",
        rewrite_image_to_token_output,
    )
}

/// Not a test: `cargo test --release --lib token_mixing_op_speed -- --ignored --nocapture` times
/// the op alone at the default model's sizes (8 heads x 7 tokens, 4 096 image tokens, 256
/// channels), logits given, from keys + pe and per head (c = 16), best of 20 at 1 and 2 threads.
#[test]
#[ignore]
fn token_mixing_op_speed() -> TractResult<()> {
    use crate::model::test_support::pattern_tensor;
    let (h, t, p, d) = (8, 7, 4096, 256);
    let op = |logits| ImageToTokenOutput {
        heads: h,
        tokens: t,
        pixels: p,
        dim: d,
        batched: false,
        logits,
        coefficients: false,
        integer: None,
        bias: Arc::new(vec![0.01; d]),
        eps: 1e-5,
        gamma: Arc::new(vec![1.0; d]),
        beta: Arc::new(vec![0.0; d]),
    };
    let pe = Arc::new(crate::model::test_support::pattern_values(p * d, 5, 0.5));
    let cases = [
        (
            "logits given",
            op(LogitsSource::Input),
            tvec![
                pattern_tensor(&[h, t, p], 1, 4.0).into_tvalue(),
                pattern_tensor(&[h, t, d], 2, 1.0).into_tvalue(),
                pattern_tensor(&[1, p, d], 3, 1.0).into_tvalue(),
            ],
            h * t * p * d,
        ),
        (
            "logits from keys + pe",
            op(LogitsSource::FromKeys(pe)),
            tvec![
                pattern_tensor(&[h, t, d], 1, 0.1).into_tvalue(),
                pattern_tensor(&[h * t], 4, 0.1).into_tvalue(),
                pattern_tensor(&[h, t, d], 2, 1.0).into_tvalue(),
                pattern_tensor(&[1, p, d], 3, 1.0).into_tvalue(),
            ],
            2 * h * t * p * d,
        ),
        (
            "logits per head",
            op(LogitsSource::PerHead(16)),
            tvec![
                pattern_tensor(&[t, h, 16], 1, 0.5).into_tvalue(),
                pattern_tensor(&[1, h, p, 16], 4, 1.0).into_tvalue(),
                pattern_tensor(&[h, t, d], 2, 1.0).into_tvalue(),
                pattern_tensor(&[1, p, d], 3, 1.0).into_tvalue(),
            ],
            h * t * p * (d + 16),
        ),
    ];
    // Each case again in the INT8 form (the weighted sum, and logits from keys, in integers)
    // where this CPU has a kernel for it.
    let integer: Vec<_> = crate::model::ops::w8a16::W8A16Kernel::supported()
        .into_iter()
        .find(|k| *k != crate::model::ops::w8a16::W8A16Kernel::Portable)
        .map(|kernel| {
            cases.iter().map(move |(name, op, inputs, macs)| {
                let op = ImageToTokenOutput {
                    integer: Some(kernel),
                    ..op.clone()
                };
                (
                    *name,
                    op,
                    inputs.clone(),
                    *macs,
                    " (W8A16; logits from keys too)",
                )
            })
        })
        .into_iter()
        .flatten()
        .collect();
    let cases: Vec<_> = cases
        .into_iter()
        .map(|(name, op, inputs, macs)| (name, op, inputs, macs, ""))
        .chain(integer)
        .collect();
    for threads in [1, 2] {
        crate::model::set_threads(threads);
        for (name, op, inputs, macs, form) in &cases {
            let best = crate::model::test_support::op_best_of_20(op, inputs)?;
            let gmacs = *macs as f64 / best / 1e6;
            eprintln!(
                "token mixing op, {name}{form}, {threads} thread(s): best of 20 {best:.2} ms, \
                 {gmacs:.1} GMAC/s"
            );
        }
    }
    Ok(())
}
