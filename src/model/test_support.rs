//! Helpers for the unit tests of our graph rewrites: the fixture model's encoder as tract
//! declutters it, a deterministic input, and runs of a graph to its first output.
#![cfg(test)]

use std::path::PathBuf;

use tract_onnx::prelude::*;

use super::{Manifest, Precision, Role};

/// `tests/fixtures/test_model`.
pub(crate) fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/test_model")
}

/// The encoder of the model in `dir` at `precision`, typed and decluttered as `optimize` gets
/// it, with its input side.
pub(crate) fn decluttered_encoder(
    dir: &std::path::Path,
    precision: Precision,
) -> (TypedModel, usize) {
    let manifest = Manifest::load(dir).expect("manifest");
    let (_, mut model) =
        super::parse_onnx(dir, &manifest, Role::Encoder, precision).expect("encoder");
    let s = manifest.config.image_size;
    model
        .set_input_fact(0, f32::fact([1, 3, s, s]).into())
        .expect("input fact");
    let typed = model
        .into_typed()
        .and_then(|m| m.into_decluttered())
        .expect("typed");
    (typed, s)
}

/// A deterministic image-like input `[1, 3, s, s]` in [-1, 1].
pub(crate) fn pattern_input(s: usize) -> Tensor {
    Tensor::from_shape(
        &[1, 3, s, s],
        &(0..3 * s * s)
            .map(|i| ((i * 7919 % 4001) as f32 / 2000.0) - 1.0)
            .collect::<Vec<_>>(),
    )
    .expect("shape")
}

/// `model` optimised and run on `input`: its first output's values.
pub(crate) fn run_first_output(model: TypedModel, input: &Tensor) -> TractResult<Vec<f32>> {
    run_model(model, std::slice::from_ref(input))
}

/// The largest |a - b| and the largest |b|.
pub(crate) fn max_difference(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len(), "outputs differ in size");
    let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    (err, scale)
}

/// A graph of one tract `GeluExact` over `len` values.
pub(crate) fn gelu_model(len: usize) -> TractResult<TypedModel> {
    let mut model = TypedModel::default();
    let x = model.add_source("x", f32::fact([len]))?;
    let y = model.wire_node(
        "gelu",
        tract_onnx::tract_core::ops::nn::gelu_exact::gelu_exact(),
        &[x],
    )?;
    model.select_output_outlets(&y)?;
    Ok(model)
}

/// tract's `GeluExact` of `xs`, evaluated by tract.
pub(crate) fn tract_gelu(xs: &[f32]) -> TractResult<Vec<f32>> {
    run_first_output(gelu_model(xs.len())?, &tensor1(xs))
}

/// The split decoder's mask graph of the model in `dir` for `batch` prompts, typed,
/// decluttered and with our LayerNorm and GELU rewrites applied (as `optimize` hands it to the
/// mask-upscaling rewrite); with its image-token shape `[batch, P, D]` and mask-weight shape
/// `[batch, K, C]`.
pub(crate) fn decluttered_mask_graph(
    dir: &std::path::Path,
    batch: usize,
) -> (TypedModel, [usize; 3], [usize; 3]) {
    let manifest = Manifest::load(dir).expect("manifest");
    let (_, mut model) =
        super::parse_onnx(dir, &manifest, Role::DecoderMasks, Precision::Fp32).expect("mask graph");
    let c = &manifest.config;
    let e = c.embedding_size();
    let tokens = [batch, e * e, c.prompt_embed_dim];
    let weights = [batch, c.num_multimask_outputs, c.prompt_embed_dim / 8];
    model
        .set_input_fact(0, f32::fact(tokens).into())
        .expect("tokens fact");
    model
        .set_input_fact(1, f32::fact(weights).into())
        .expect("weights fact");
    (with_float_rewrites(model, false), tokens, weights)
}

/// `model` typed and decluttered with our LayerNorm and GELU rewrites (and the softmax one if
/// `softmax`) applied, as `optimize` hands it to the later rewrites.
fn with_float_rewrites(model: InferenceModel, softmax: bool) -> TypedModel {
    let mut typed = model
        .into_typed()
        .and_then(|m| m.into_decluttered())
        .expect("typed");
    super::ops::rewrite_layer_norm(&mut typed).expect("LayerNorm rewrite");
    super::qmatmul::rewrite_gelu(&mut typed).expect("GELU rewrite");
    if softmax {
        super::ops::rewrite_softmax(&mut typed).expect("softmax rewrite");
    }
    typed
}

/// `len` deterministic values in [-scale, scale], different for each `seed`.
pub(crate) fn pattern_values(len: usize, seed: usize, scale: f32) -> Vec<f32> {
    (0..len)
        .map(|i| (((i * 7919 + seed * 104_729) % 4001) as f32 / 2000.0 - 1.0) * scale)
        .collect()
}

/// A deterministic tensor of `shape` with values in [-scale, scale] ([`pattern_values`]).
pub(crate) fn pattern_tensor(shape: &[usize], seed: usize, scale: f32) -> Tensor {
    let len: usize = shape.iter().product();
    Tensor::from_shape(shape, &pattern_values(len, seed, scale)).expect("shape")
}

/// The golden frame (`tests/fixtures/golden/frame.png`) preprocessed for the model in `dir`:
/// the encoder's input.
pub(crate) fn golden_input(dir: &std::path::Path) -> Tensor {
    let manifest = Manifest::load(dir).expect("manifest");
    let frame = image::open(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden/frame.png"),
    )
    .expect("frame.png")
    .to_rgb8();
    let image = crate::preprocess::Preprocessor::new(&manifest.preprocess)
        .run(&frame)
        .expect("preprocess");
    super::input_tensor(image).expect("input tensor")
}

/// GELU in f64 from its definition, `x · Φ(x)`, with erf by its Taylor series (exact enough
/// for |x| < 8; beyond, erf is ±1 to f64 precision): the reference of the fused ops' tests.
pub(crate) fn gelu_f64(x: f64) -> f64 {
    let z = x / std::f64::consts::SQRT_2;
    let erf = if z.abs() > 6.0 {
        z.signum()
    } else {
        let (mut term, mut sum) = (z, z);
        for n in 1..200 {
            term *= -z * z / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    };
    0.5 * x * (1.0 + erf)
}

/// `model` optimised and run on `inputs`: its first output's values.
pub(crate) fn run_model(model: TypedModel, inputs: &[Tensor]) -> TractResult<Vec<f32>> {
    run_all_outputs(model, inputs)?
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("the model has no output"))
}

/// The split decoder's per-prompt graph of the model in `dir` for `batch` prompts of `points`
/// points, typed, decluttered and with our LayerNorm, GELU and softmax rewrites applied (as
/// `optimize` hands it to the later rewrites); with deterministic inputs.
pub(crate) fn decluttered_prompt_graph(
    dir: &std::path::Path,
    batch: usize,
    points: usize,
) -> (TypedModel, Vec<Tensor>) {
    let manifest = Manifest::load(dir).expect("manifest");
    let (_, mut model) = super::parse_onnx(dir, &manifest, Role::DecoderPrompt, Precision::Fp32)
        .expect("prompt graph");
    let c = &manifest.config;
    // The per-frame tensors' shapes, from the per-frame graph.
    let (_, mut frame) = super::parse_onnx(dir, &manifest, Role::DecoderFrame, Precision::Fp32)
        .expect("per-frame graph");
    let (e, m) = (c.embedding_size(), c.low_res_mask_size());
    for (ix, shape) in [vec![1, c.prompt_embed_dim, e, e], vec![1, 1, m, m], vec![1]]
        .iter()
        .enumerate()
    {
        frame
            .set_input_fact(ix, f32::fact(shape.as_slice()).into())
            .expect("frame fact");
    }
    let frame = frame.into_typed().expect("typed frame graph");
    let s = c.image_size as f32;
    let coords: Vec<f32> = (0..batch * points * 2)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 * s)
        .collect();
    let mut inputs: Vec<Tensor> = frame
        .output_outlets()
        .expect("outputs")
        .iter()
        .enumerate()
        .map(|(i, &o)| {
            let shape = frame
                .outlet_fact(o)
                .expect("fact")
                .shape
                .as_concrete()
                .map(<[usize]>::to_vec);
            pattern_tensor(
                &shape.expect("concrete"),
                i + 1,
                if i == 0 { 2.0 } else { 0.5 },
            )
        })
        .collect();
    inputs.push(Tensor::from_shape(&[batch, points, 2], &coords).expect("coords"));
    inputs.push(Tensor::from_shape(&[batch, points], &vec![1f32; batch * points]).expect("labels"));
    for (ix, t) in inputs.iter().enumerate() {
        model
            .set_input_fact(ix, f32::fact(t.shape()).into())
            .expect("input fact");
    }
    (with_float_rewrites(model, true), inputs)
}

/// `model` optimised and run on `inputs`: every output's values.
pub(crate) fn run_all_outputs(model: TypedModel, inputs: &[Tensor]) -> TractResult<Vec<Vec<f32>>> {
    let out = model
        .into_optimized()?
        .into_runnable()?
        .run(inputs.iter().cloned().map(TValue::from).collect())?;
    out.iter()
        .map(|t| Ok(t.try_as_plain_ram()?.as_slice::<f32>()?.to_vec()))
        .collect()
}

/// The ignored speed tests of the decoder ops: the default model's per-prompt graph at 2
/// threads, batches 1 and 4, with tract's nodes and after `rewrite`; prints the best of 8 runs.
pub(crate) fn time_prompt_graph(
    what: &str,
    rewrite: fn(&mut TypedModel) -> TractResult<usize>,
) -> TractResult<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/default");
    super::set_threads(2);
    for batch in [1, 4] {
        let (tract_nodes, inputs) = decluttered_prompt_graph(&dir, batch, 2);
        let mut ours = tract_nodes.clone();
        rewrite(&mut ours)?;
        let values: TVec<TValue> = inputs.iter().cloned().map(TValue::from).collect();
        for (name, model) in [("tract", tract_nodes), (what, ours)] {
            let best = best_of_8(model, &values)?;
            eprintln!("prompt graph, {name}, batch {batch}: best of 8 {best:.2} ms");
        }
    }
    Ok(())
}

/// `model` optimised, then the fastest of 8 runs on `inputs`, in milliseconds.
pub(crate) fn best_of_8(model: TypedModel, inputs: &TVec<TValue>) -> TractResult<f64> {
    let plan = model.into_optimized()?.into_runnable()?;
    let mut best = f64::MAX;
    for _ in 0..8 {
        let t = std::time::Instant::now();
        plan.run(inputs.clone())?;
        best = best.min(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(best)
}

/// The fastest of 20 evaluations of `op` alone on `inputs`, in milliseconds (on the threads
/// last set with [`crate::model::set_threads`]).
pub(crate) fn op_best_of_20(
    op: &impl tract_onnx::tract_core::internal::EvalOp,
    inputs: &TVec<TValue>,
) -> TractResult<f64> {
    let mut best = f64::MAX;
    for _ in 0..20 {
        let started = std::time::Instant::now();
        op.eval(
            &tract_onnx::tract_core::internal::EvalContext::out_of_plan(),
            inputs.clone(),
        )?;
        best = best.min(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(best)
}

/// Run `tract_nodes` and `ours` on `inputs` and check that every output agrees within 1e-5 of
/// its scale (at least 1); `label` names the case in the printed differences.
pub(crate) fn assert_outputs_agree(
    label: &str,
    tract_nodes: TypedModel,
    ours: TypedModel,
    inputs: &[Tensor],
) -> TractResult<()> {
    let want = run_all_outputs(tract_nodes, inputs)?;
    let got = run_all_outputs(ours, inputs)?;
    for (i, (got, want)) in got.iter().zip(&want).enumerate() {
        let (err, scale) = max_difference(got, want);
        eprintln!("{label}, output {i}: largest difference {err:e} of {scale}");
        assert!(
            err <= 1e-5 * scale.max(1.0),
            "{label}, output {i}: {err} of {scale}"
        );
    }
    Ok(())
}

/// The int8 products of a decluttered graph on our kernels, with their quantize passes and
/// epilogues, as a load does before the other rewrites. Tests of later rewrites start here:
/// left to tract, the default INT8 encoder takes ~60 s a run on an AVX2-only host (tract's AVX2
/// int8 kernel), against ~1 s.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn int8_products_on_our_kernels(graph: &mut TypedModel) -> TractResult<()> {
    use crate::model::qmatmul;
    let mut report = qmatmul::rewrite_quantized_matmuls(graph, qmatmul::Kernel::detect())?;
    qmatmul::fuse_quantization(graph, &mut report)?;
    qmatmul::fuse_epilogues(graph)?;
    Ok(())
}

// Its tests run on x86_64 only (under qemu the 1024² encoder takes minutes).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
/// The shipped model's INT8 encoder at 1024², decluttered and its int8 products on our kernels,
/// with and without `rewrite` (which must replace `expected` chains), run on the golden frame:
/// the two embeddings must be equal bit for bit. For the rewrites that only move values or keep tract's arithmetic.
pub(crate) fn assert_default_int8_encoder_unchanged(
    rewrite: impl Fn(&mut TypedModel) -> TractResult<usize>,
    expected: usize,
) -> TractResult<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/default");
    let (mut graph, _) = decluttered_encoder(&dir, Precision::Int8);
    int8_products_on_our_kernels(&mut graph)?;
    let mut ours = graph.clone();
    assert_eq!(rewrite(&mut ours)?, expected, "chains replaced");
    let input = golden_input(&dir);
    let (err, scale) = max_difference(
        &run_model(ours, std::slice::from_ref(&input))?,
        &run_model(graph, std::slice::from_ref(&input))?,
    );
    assert_eq!(err, 0.0, "the embedding moved by {err} of {scale}");
    Ok(())
}

/// The outputs `outputs` gives for each of `kernels` (W8A16 kernels this CPU runs), asserted
/// bit-identical: the first kernel's, returned.
pub(crate) fn same_bits_on_every_w8a16_kernel(
    kernels: &[crate::model::ops::w8a16::W8A16Kernel],
    mut outputs: impl FnMut(crate::model::ops::w8a16::W8A16Kernel) -> TractResult<Vec<f32>>,
) -> TractResult<Vec<f32>> {
    let mut first: Option<Vec<f32>> = None;
    for &kernel in kernels {
        let got = outputs(kernel)?;
        match &first {
            None => first = Some(got),
            Some(f) => assert!(
                crate::model::ops::gemm::same_bits(f, &got),
                "{kernel:?} differs from {:?}",
                kernels[0]
            ),
        }
    }
    first.ok_or_else(|| anyhow::anyhow!("no W8A16 kernel runs here"))
}
