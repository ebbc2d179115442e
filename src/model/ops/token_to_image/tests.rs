use super::*;
use crate::model::test_support::{
    assert_outputs_agree, decluttered_prompt_graph, fixture_dir, max_difference, pattern_values,
};

/// The per-prompt graph of the model in `dir`: tract's nodes against our op, every output
/// (image tokens, mask weights, IoU).
fn compare(dir: &std::path::Path, batch: usize, points: usize) -> TractResult<()> {
    let (tract_nodes, inputs) = decluttered_prompt_graph(dir, batch, points);
    let mut ours = tract_nodes.clone();
    let n = rewrite_token_to_image(&mut ours)?;
    // The second block's and the final token->image attention, and the first block's per-head
    // one over the per-frame tensors (for a batch, all its prompts' rows in one product).
    assert_eq!(n, 3, "{n} chains matched");
    let label = format!("{}: batch {batch}", dir.display());
    assert_outputs_agree(&label, tract_nodes, ours, &inputs)?;
    Ok(())
}

#[test]
fn fused_attention_matches_the_fixtures_prompt_graph() -> TractResult<()> {
    compare(&fixture_dir(), 1, 2)?;
    compare(&fixture_dir(), 3, 1)
}

/// The default model's sizes: 56 query rows, 256 channels, 4 096 image tokens in 8 parts; one
/// prompt, as the decoder runs them (batches: the fixture's test and the definition's).
#[test]
fn fused_attention_matches_the_default_models_prompt_graph() -> TractResult<()> {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/default");
    compare(&dir, 1, 2)
}

/// Against the definition in f64, on sizes that fill no block evenly (5 query rows, 40
/// channels, two whole parts and one of a single tile) and logits large enough that each
/// row's maximum moves between tiles and parts, so the online rescaling is exercised: the later
/// blocks' form (one head, pe, values = keys) for one prompt and for a batch of two with the
/// keys shared and per prompt, and the first block's (3 heads of 16, separate values, no pe)
/// for one prompt and for a batch of two sharing the per-frame keys. In f32 and with the
/// products as W8A16 on every kernel this CPU has (the same bits on each).
#[test]
fn fused_attention_matches_its_definition() -> TractResult<()> {
    let p = 2 * PART + TILE;
    let forms = std::iter::once(None).chain(W8A16Kernel::supported().into_iter().map(Some));
    // (heads, dim, with pe and values = keys, batched, keys batch)
    let cases = [
        (1, 40, true, false, 1),
        (1, 40, true, true, 1),
        (1, 40, true, true, 2),
        (3, 16, false, false, 1),
        (3, 16, false, true, 1),
    ];
    for (h, d, later, batched, keys_batch) in cases {
        let mut integer_bits: Option<Vec<u32>> = None;
        for integer in forms.clone() {
            let (r, batch) = (5, if batched { 2 } else { 1 });
            let op = TokenToImageAttention {
                heads: h,
                rows: r,
                pixels: p,
                dim: d,
                batched,
                separate_values: !later,
                key_pe: later.then(|| Arc::new(pattern_values(p * d, 3, 0.5))),
                integer,
            };
            let queries = pattern_values(batch * r * h * d, 1, 1.5);
            // A ramp along the image tokens on top of the pattern: later tokens score higher
            // for some rows and lower for others.
            let ramp = |seed| -> Vec<f32> {
                pattern_values(keys_batch * h * p * d, seed, 2.0)
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| {
                        v + ((i / d) % p) as f32 / p as f32 * if i % 2 == 0 { 3.0 } else { -3.0 }
                    })
                    .collect()
            };
            let keys = ramp(2);
            let values = if later { keys.clone() } else { ramp(4) };
            let mut q_shape = vec![r, h, d];
            if batched {
                q_shape.insert(0, batch);
            }
            let kv_shape = [keys_batch, h, p, d];
            let mut inputs = tvec!(
                Tensor::from_shape(&q_shape, &queries)?.into_tvalue(),
                Tensor::from_shape(&kv_shape, &keys)?.into_tvalue()
            );
            if !later {
                inputs.push(Tensor::from_shape(&kv_shape, &values)?.into_tvalue());
            }
            let got = op.eval(&EvalContext::out_of_plan(), inputs)?;
            let got = got[0].try_as_plain_ram()?.as_slice::<f32>()?.to_vec();
            let pe = op
                .key_pe
                .as_deref()
                .cloned()
                .unwrap_or_else(|| vec![0.0; p * d]);
            let mut want = vec![0f32; batch * r * h * d];
            for b in 0..batch {
                for head in 0..h {
                    let at = ((if keys_batch == 1 { 0 } else { b }) * h + head) * p * d;
                    let (keys, values) = (&keys[at..][..p * d], &values[at..][..p * d]);
                    for j in 0..r {
                        let row = ((b * r + j) * h + head) * d;
                        let q = &queries[row..][..d];
                        let logits: Vec<f64> = (0..p)
                            .map(|i| {
                                (0..d)
                                    .map(|c| q[c] as f64 * (keys[i * d + c] + pe[i * d + c]) as f64)
                                    .sum()
                            })
                            .collect();
                        let top = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let weights: Vec<f64> = logits.iter().map(|l| (l - top).exp()).collect();
                        let total: f64 = weights.iter().sum();
                        for c in 0..d {
                            let v: f64 =
                                (0..p).map(|i| weights[i] * values[i * d + c] as f64).sum();
                            want[row + c] = (v / total) as f32;
                        }
                    }
                }
            }
            let (err, scale) = max_difference(&got, &want);
            eprintln!(
            "{h} head(s) of {d}, batched {batched}, keys batch {keys_batch}, {integer:?}: largest \
             difference {err:e} of {scale}"
        );
            match integer {
                None => assert!(err <= 2e-6 * scale.max(1.0), "{err} of {scale}"),
                Some(kernel) => {
                    // 12-bit query rows and values per tile: each term off by up to half a step
                    // of 1/2047 of its row's or column's largest value, through the softmax's
                    // exponential on these sharp logits (measured: ≤ 5.2e-4 of the scale; with
                    // both at 8 bits, 4.1e-3).
                    assert!(err <= 1e-3 * scale.max(1.0), "{kernel:?}: {err} of {scale}");
                    let bits: Vec<u32> = got.iter().map(|x| x.to_bits()).collect();
                    match &integer_bits {
                        Some(first) => assert!(*first == bits, "{kernel:?} differs"),
                        None => integer_bits = Some(bits),
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn other_softmaxes_are_left_alone() -> TractResult<()> {
    // The per-prompt graph's image->token softmax (over the prompt tokens) is not followed
    // by the weighted sum of keys.
    let (mut model, _) = decluttered_prompt_graph(&fixture_dir(), 1, 2);
    let before = model.nodes().len();
    assert_eq!(rewrite_token_to_image(&mut model)?, 3);
    assert!(model.nodes().len() < before);
    assert_eq!(rewrite_token_to_image(&mut model)?, 0);
    Ok(())
}

/// Not a test: `cargo test --release --lib token_to_image_speed -- --ignored --nocapture`
/// times the per-prompt graph with tract's nodes and with our op (default model, 2 threads,
/// best of 8).
#[test]
#[ignore]
fn token_to_image_speed() -> TractResult<()> {
    crate::model::test_support::time_prompt_graph(
        "our token->image attention",
        rewrite_token_to_image,
    )
}

/// Best of 20 runs of `op` on `inputs` at 1 and 2 threads, printed with `label` and the rate of
/// its `macs` multiply-adds.
fn time_op(
    label: &str,
    op: &TokenToImageAttention,
    inputs: TVec<TValue>,
    macs: usize,
) -> TractResult<()> {
    for threads in [1, 2] {
        crate::model::set_threads(threads);
        let best = crate::model::test_support::op_best_of_20(op, &inputs)?;
        let gmacs = macs as f64 / best / 1e6;
        eprintln!("{label}, {threads} thread(s): best of 20 {best:.2} ms, {gmacs:.1} GMAC/s");
    }
    Ok(())
}

/// Not a test: `cargo test --release --lib token_to_image_op_speed -- --ignored --nocapture`
/// times the op alone at the default model's sizes (56 query rows, 4 096 image tokens, 256
/// channels; and the first block's 8 heads of 7 rows × 16 over per-frame keys and values), best
/// of 20, at 1 and 2 threads.
#[test]
#[ignore]
fn token_to_image_op_speed() -> TractResult<()> {
    let (h, t, p, c) = (8, 7, 4096, 16);
    let per_head = TokenToImageAttention {
        heads: h,
        rows: t,
        pixels: p,
        dim: c,
        batched: false,
        separate_values: true,
        key_pe: None,
        integer: None,
    };
    let tensor = |shape: &[usize], seed| {
        let n = shape.iter().product();
        Tensor::from_shape(shape, &pattern_values(n, seed, 1.0)).map(Tensor::into_tvalue)
    };
    let inputs = tvec![
        tensor(&[t, h, c], 1)?,
        tensor(&[1, h, p, c], 2)?,
        tensor(&[1, h, p, c], 3)?
    ];
    let integer = Some(W8A16Kernel::detect()).filter(|k| *k != W8A16Kernel::Portable);
    let label = format!("token->image op, {h} heads of {t} rows × {c}");
    time_op(&label, &per_head, inputs.clone(), 2 * h * t * p * c)?;
    if let Some(kernel) = integer {
        let op = TokenToImageAttention {
            integer,
            ..per_head.clone()
        };
        time_op(
            &format!("{label}, W8A16 {kernel:?}"),
            &op,
            inputs,
            2 * h * t * p * c,
        )?;
    }

    let (r, p, d) = (56, 4096, 256);
    let op = TokenToImageAttention {
        heads: 1,
        rows: r,
        pixels: p,
        dim: d,
        batched: false,
        separate_values: false,
        key_pe: Some(Arc::new(pattern_values(p * d, 3, 0.5))),
        integer: None,
    };
    let queries = Tensor::from_shape(&[r, d], &pattern_values(r * d, 1, 0.2))?.into_tvalue();
    let keys = Tensor::from_shape(&[1, p, d], &pattern_values(p * d, 2, 1.0))?.into_tvalue();
    let inputs = tvec![queries, keys];
    time_op("token->image op", &op, inputs.clone(), 2 * r * p * d)?;
    if let Some(kernel) = integer {
        let op = TokenToImageAttention { integer, ..op };
        time_op(
            &format!("token->image op, W8A16 {kernel:?}"),
            &op,
            inputs,
            2 * r * p * d,
        )?;
    }
    Ok(())
}
