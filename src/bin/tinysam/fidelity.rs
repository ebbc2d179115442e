//! `tinysam fidelity`: the model's INT8 forms against its FP32 form as this runtime runs them
//! (see [`tinysam_edge::fidelity`]), printed and optionally written as JSON.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use tinysam_edge::fidelity::{self, FrameFidelity, Summary, MIXTURES};
use tinysam_edge::model::{self, Precision, PrecisionChoice};
use tinysam_edge::segmenter::Segmenter;

/// Options of `tinysam fidelity`.
#[derive(Args)]
pub struct FidelityArgs {
    /// Images to compare on (PNG or JPEG; default: a synthetic 640x480 test pattern).
    images: Vec<PathBuf>,
    /// Model directory (needs FP32 and INT8 forms of encoder and decoder).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Threads for tract's matrix products.
    #[arg(long, default_value_t = super::default_threads())]
    threads: usize,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// The whole report, as written to JSON.
#[derive(Serialize)]
struct Report {
    model: String,
    weights: serde_json::Value,
    cpu_isa: String,
    /// How the INT8 decoder is formed: "quantized at load" or "file".
    int8_decoder: &'static str,
    /// Share of each INT8 stage's counted MACs in integer kernels on this CPU.
    integer_share: BTreeMap<&'static str, f64>,
    summary: BTreeMap<String, serde_json::Value>,
    images: Vec<FrameFidelity>,
}

/// Run the comparison and print it.
pub fn run(args: FidelityArgs) -> anyhow::Result<()> {
    model::set_threads(args.threads);
    let dir = args.model.clone().unwrap_or_else(model::default_model_dir);
    let load = |p: Precision| {
        let choice = PrecisionChoice {
            encoder: Some(p),
            decoder: Some(p),
            ..PrecisionChoice::default()
        };
        Segmenter::load(&dir, choice)
            .with_context(|| format!("loading the {p} model from {}", dir.display()))
    };
    let (fp32, int8) = (load(Precision::Fp32)?, load(Precision::Int8)?);
    let frames: Vec<(String, image::RgbImage)> = if args.images.is_empty() {
        vec![("test pattern 640x480".into(), super::bench::test_pattern())]
    } else {
        args.images
            .iter()
            .map(|p| {
                let frame = image::open(p)
                    .with_context(|| format!("reading image {}", p.display()))?
                    .to_rgb8();
                Ok((p.display().to_string(), frame))
            })
            .collect::<anyhow::Result<_>>()?
    };
    let mut images = Vec::with_capacity(frames.len());
    for (name, frame) in &frames {
        let measured = fidelity::measure_frame(&fp32, &int8, name, frame)
            .with_context(|| format!("comparing on {name}"))?;
        println!(
            "{name} ({}x{}): embedding cosine {:.4}",
            frame.width(),
            frame.height(),
            measured.embedding_cosine
        );
        for (key, rows) in &measured.mixtures {
            if let Some(s) = Summary::of(rows) {
                println!("  {key:<27} {}", line(&s));
            }
        }
        for skipped in &measured.skipped {
            println!("  skipped {skipped}");
        }
        images.push(measured);
    }
    let cosines: Vec<f64> = images.iter().map(|i| i.embedding_cosine).collect();
    let mut summary = BTreeMap::new();
    let mean_cosine = cosines.iter().sum::<f64>() / cosines.len().max(1) as f64;
    let min_cosine = cosines.iter().copied().fold(1.0, f64::min);
    summary.insert("embedding_cosine_mean".into(), mean_cosine.into());
    summary.insert("embedding_cosine_min".into(), min_cosine.into());
    println!(
        "all {} image(s): embedding cosine mean {mean_cosine:.4}, min {min_cosine:.4}",
        images.len(),
    );
    for (key, _, _) in MIXTURES {
        let rows = images.iter().filter_map(|i| i.mixtures.get(key)).flatten();
        if let Some(s) = Summary::of(rows) {
            println!("  {key:<27} {}", line(&s));
            summary.insert(key.to_string(), serde_json::to_value(&s)?);
        }
    }
    let manifest = &int8.model.manifest;
    let mut integer_share = BTreeMap::new();
    let encoder = model::kernels::analyse(int8.model.encoder.model())?;
    integer_share.insert("encoder", encoder.integer_share());
    let decoder = model::kernels::analyse_prompts(&int8.model.decoder, 1, 2)?;
    integer_share.insert("decoder", decoder.integer_share());
    let report = Report {
        model: manifest.model.clone(),
        weights: serde_json::to_value(&manifest.weights)?,
        cpu_isa: model::native_isa().to_string(),
        int8_decoder: if int8.model.decoder.quantized_at_load() {
            "quantized at load"
        } else {
            "file"
        },
        integer_share,
        summary,
        images,
    };
    println!(
        "INT8 decoder {}; MACs in integer kernels on this CPU: encoder {:.1} %, decoder {:.1} %",
        report.int8_decoder,
        100.0 * report.integer_share["encoder"],
        100.0 * report.integer_share["decoder"],
    );
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)? + "\n";
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A summary on one line.
fn line(s: &Summary) -> String {
    format!(
        "best-mask IoU mean {:.4} (min {:.4}), same best mask {:.0} %, IoU-score error {:.2e}, \
         largest logit difference {:.3} ({} prompts)",
        s.mean_mask_iou,
        s.min_mask_iou,
        100.0 * s.best_mask_agreement,
        s.mean_iou_score_error,
        s.largest_logit_difference,
        s.prompts
    )
}
