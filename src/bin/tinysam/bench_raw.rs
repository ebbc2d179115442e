//! `tinysam bench --json`: model-only timings for the cross-engine comparison
//! (`benches/compare.py`). Encoder: preprocessed tensor in, embedding out. Decoder: embedding and
//! B single-point prompts in, low-resolution mask logits and IoU scores out. No preprocessing, no
//! mask post-processing: exactly what onnxruntime's `session.run` does on the same ONNX files.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tinysam_edge::model::{self, DecoderForm, DecoderInput, Model, PrecisionChoice};
use tinysam_edge::preprocess::Preprocessor;

use super::bench::{decoder_precision, peak_rss_mib, BenchArgs};

/// Time `f` up to `runs` times, stopping early once `budget` is spent (at least one run).
fn timed_runs(
    runs: usize,
    budget: Duration,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Vec<f64>> {
    let start = Instant::now();
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        if start.elapsed() > budget {
            break;
        }
    }
    Ok(times)
}

/// Run the model-only measurements of the first precision and write them as JSON.
pub fn run(args: &BenchArgs, out: &std::path::Path) -> anyhow::Result<()> {
    let precision = *args
        .precisions
        .first()
        .context("--json measures one precision: give --precisions int8 or fp32")?;
    model::set_threads(args.threads);
    let dir = args.model.clone().unwrap_or_else(model::default_model_dir);
    let manifest = model::Manifest::load(&dir)?;
    let dec_precision = decoder_precision(&manifest, precision);
    let load_start = Instant::now();
    let m = Model::load(
        &dir,
        PrecisionChoice {
            encoder: Some(precision),
            decoder: Some(dec_precision),
            int8_matmul: args.int8_matmul,
            decoder_graph: args.decoder_graph,
            conv_blocks: args.conv_blocks,
        },
    )?;
    let load_ms = load_start.elapsed().as_secs_f64() * 1e3;
    let frame = match &args.image {
        Some(p) => image::open(p)
            .with_context(|| format!("reading {}", p.display()))?
            .to_rgb8(),
        None => super::bench::test_pattern(),
    };
    let input = Preprocessor::new(&m.manifest.preprocess).run(&frame)?;
    let budget = Duration::from_secs_f64(args.budget_s);

    // Encoder: one warm-up run (allocator, lazy state), then timed runs on a copy of the input.
    let embed = || -> anyhow::Result<_> { Ok(m.encoder.embed(input.clone())?) };
    let embedding = embed()?;
    let encoder_ms = timed_runs(args.runs, budget, || embed().map(drop))?;

    // Decoder: B prompts of one foreground point plus SAM's padding point, spread over the image.
    let side = input
        .geometry
        .resized_width
        .max(input.geometry.resized_height) as f32;
    // The decoder's per-frame part (split decoder only), on fresh copies of the embedding.
    let decoder_frame_ms = if m.decoder.form() == DecoderForm::Split {
        let fresh = || model::Embedding::new(embedding.tensor.clone(), embedding.geometry);
        m.decoder.prepare(&fresh())?;
        Some(timed_runs(args.runs, budget, || {
            m.decoder.prepare(&fresh())?;
            Ok(())
        })?)
    } else {
        None
    };
    let mut decoder = serde_json::Map::new();
    for &b in &args.batches {
        let mut coords = Vec::with_capacity(2 * b);
        let mut labels = Vec::with_capacity(2 * b);
        for i in 0..b {
            let x = side * ((i % 8) as f32 + 0.5) / 8.0;
            let y = side * ((i / 8 % 8) as f32 + 0.5) / 8.0;
            coords.extend([[x, y], [0.0, 0.0]]);
            labels.extend([1.0, -1.0]);
        }
        let batch = DecoderInput {
            points_per_prompt: 2,
            coords,
            labels,
            mask_input: None,
        };
        let first = Instant::now();
        m.decoder.decode(&embedding, &batch)?; // warm-up
        let times = if first.elapsed() > budget {
            vec![first.elapsed().as_secs_f64() * 1e3] // too slow to repeat: the warm-up counts
        } else {
            timed_runs(args.runs, budget, || {
                m.decoder.decode(&embedding, &batch).map(drop)?;
                Ok(())
            })?
        };
        decoder.insert(b.to_string(), json!(times));
    }
    let report = json!({
        "engine": "tract",
        "encoder_precision": precision.to_string(),
        "decoder_precision": dec_precision.to_string(),
        "threads": args.threads,
        "isa": model::native_isa(),
        "load_ms": load_ms,
        "encoder_ms": encoder_ms,
        "decoder_ms": decoder,
        "decoder_form": m.decoder.form().to_string(),
        "decoder_frame_ms": decoder_frame_ms,
        "peak_rss_mib": peak_rss_mib(),
    });
    let text = serde_json::to_string_pretty(&report)?;
    if out.as_os_str() == "-" {
        println!("{text}");
    } else {
        std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
