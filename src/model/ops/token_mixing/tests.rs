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
        assert_eq!(attentions, if batch == 1 { 3 } else { 2 });
        // The second block's logits, and for one prompt the first block's (per head, from the
        // per-frame queries).
        let n = rewrite_image_to_token_logits(&mut ours)?;
        assert_eq!(n, if batch == 1 { 2 } else { 1 }, "{n} logits matched");
        let kinds: Vec<&LogitsSource> = ours
            .nodes()
            .iter()
            .filter_map(|n| n.op_as::<ImageToTokenOutput>())
            .map(|op| &op.logits)
            .collect();
        assert_eq!(kinds.len(), 2);
        assert!(kinds.iter().any(|k| matches!(k, LogitsSource::FromKeys(_))));
        assert_eq!(
            kinds.iter().any(|k| matches!(k, LogitsSource::PerHead(_))),
            batch == 1
        );
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
    compare(&dir, 2, 2, false)?;
    // One prompt at a time, as the decoder runs them (batches: the fixture's test).
    compare(&dir, 1, 2, true)
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
