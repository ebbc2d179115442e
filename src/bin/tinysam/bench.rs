//! `tinysam bench`: encoder and decoder latency per precision, side by side in one run.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use tinysam_edge::model::{self, profile, Model, Precision, PrecisionChoice, Role};
use tinysam_edge::prompt::Prompt;
use tinysam_edge::segmenter::Segmenter;

/// Options of `tinysam bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// Model directory (needs the files of every precision benchmarked).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Image to encode (default: a synthetic 640x480 test pattern).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Precisions to compare (each used for encoder and decoder where the file exists).
    #[arg(long, value_delimiter = ',', default_value = "int8,fp32")]
    pub precisions: Vec<Precision>,
    /// Decoder batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub batches: Vec<usize>,
    /// Timed runs per measurement (after one warm-up run).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Threads for tract's matrix products.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// INT8 matrix products: auto (ours, this CPU's fastest kernel), tract, portable, avx2, vnni, sdot.
    #[arg(long, default_value = "auto")]
    pub int8_matmul: model::Int8Matmul,
    /// Decoder form: auto (per-frame + per-prompt graphs when the model has them, the mask
    /// upscaling in low rank), one-graph, split-full-rank.
    #[arg(long, default_value = "auto")]
    pub decoder_graph: model::DecoderGraph,
    /// Products of an INT8 encoder's float convolutional front (stage 0's blocks, its patch
    /// merging, the stem's second convolution): auto (W8A16 integers where faster: x86_64 with
    /// AVX2 or VNNI; f32 elsewhere), f32.
    #[arg(long, default_value = "auto")]
    pub conv_blocks: model::ConvBlocks,
    /// Print the slowest encoder ops of each precision.
    #[arg(long)]
    pub profile: bool,
    /// Also compare segment-everything flat vs hierarchical (one run each, first precision).
    #[arg(long)]
    pub everything: bool,
    /// Predicted-IoU and stability thresholds of the everything comparison (SAM: 0.88,0.95).
    #[arg(long, value_delimiter = ',', default_value = "0.88,0.95")]
    pub everything_thresholds: Vec<f32>,
    /// Also write the Markdown table to this file.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Instead: run the whole daemon (synthetic 640x480 camera, socket, one subscriber) for
    /// --runs frames with the first precision, and report end-to-end latency, overhead, RSS.
    #[arg(long)]
    pub daemon: bool,
    /// With --daemon: the synthetic camera's frame rate cap.
    #[arg(long, default_value_t = 5.0)]
    pub daemon_fps: f32,
    /// Instead: model-only timings of the first precision (preprocessed tensor in, raw outputs
    /// out, as onnxruntime's `session.run`) written as JSON to this file (`-`: stdout), for
    /// `benches/compare.py`.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// With --json: stop repeating a measurement after this many seconds (at least one run).
    #[arg(long, default_value_t = 120.0)]
    pub budget_s: f64,
}

struct Stats {
    median: Duration,
    min: Duration,
    max: Duration,
}

fn measure(runs: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<Stats> {
    f()?; // warm-up: plan caches, allocator
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(Stats {
        median: times[times.len() / 2],
        min: times[0],
        max: times[times.len() - 1],
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Peak resident set size of this process so far, in MiB (Linux; 0 elsewhere).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

/// `p` for the decoder when the directory has it (as a file, or the INT8 decoder quantized at
/// load), else the manifest's default decoder.
pub fn decoder_precision(manifest: &model::Manifest, p: Precision) -> Precision {
    if manifest.loadable_precisions(Role::Decoder).contains(&p) {
        p
    } else {
        manifest.default_precision(Role::Decoder)
    }
}

/// The default benchmark frame: a synthetic 640x480 test pattern.
pub fn test_pattern() -> image::RgbImage {
    image::RgbImage::from_fn(640, 480, |x, y| {
        image::Rgb([
            (x % 256) as u8,
            (y % 256) as u8,
            ((x / 8 + y / 8) % 2 * 200) as u8,
        ])
    })
}

/// Run the benchmark and print the table.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(out) = &args.json {
        return super::bench_raw::run(&args, out);
    }
    if args.daemon {
        let md = super::bench_daemon::run(&args)?;
        if let Some(path) = &args.markdown {
            std::fs::write(path, md).with_context(|| format!("writing {}", path.display()))?;
        }
        return Ok(());
    }
    model::set_threads(args.threads);
    let dir = args.model.clone().unwrap_or_else(model::default_model_dir);
    let frame = match &args.image {
        Some(p) => image::open(p)
            .with_context(|| format!("reading {}", p.display()))?
            .to_rgb8(),
        None => test_pattern(),
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let mut md = String::new();
    writeln!(
        md,
        "model `{}`, frame {}x{}, {} thread(s), {} runs + 1 warm-up",
        dir.display(),
        frame.width(),
        frame.height(),
        args.threads,
        args.runs
    )?;
    writeln!(md, "cpu: {cpu}; tract ISA: {}\n", model::native_isa())?;
    let mut header = String::from("| precision | encoder ms (median, min-max) |");
    let mut rule = String::from("|---|---|");
    for b in &args.batches {
        write!(header, " decoder b={b} ms (per prompt) |")?;
        rule.push_str("---|");
    }
    header.push_str(" peak RSS MiB |");
    rule.push_str("---|");
    writeln!(md, "{header}\n{rule}")?;
    let mut encoder_medians = Vec::new();
    let mut profiles = Vec::new();
    for &p in &args.precisions {
        let manifest = model::Manifest::load(&dir)?;
        let dec_p = decoder_precision(&manifest, p);
        if manifest.file(Role::Encoder, p).is_none() {
            eprintln!("skipping {p}: {} has no {p} encoder", dir.display());
            continue;
        }
        let m = Model::load(
            &dir,
            PrecisionChoice {
                encoder: Some(p),
                decoder: Some(dec_p),
                int8_matmul: args.int8_matmul,
                decoder_graph: args.decoder_graph,
                conv_blocks: args.conv_blocks,
            },
        )?;
        let seg = Segmenter::new(m);
        let mut emb = seg.embed(&frame)?;
        let enc = measure(args.runs, || {
            emb = seg.embed(&frame)?;
            Ok(())
        })?;
        encoder_medians.push((p, enc.median));
        let mut row = format!(
            "| enc {p} / dec {dec_p} | {:.1} ({:.1}-{:.1}) |",
            ms(enc.median),
            ms(enc.min),
            ms(enc.max)
        );
        let (w, h) = (frame.width() as f32, frame.height() as f32);
        for &b in &args.batches {
            let prompts: Vec<Prompt> = (0..b)
                .map(|i| {
                    Prompt::point(
                        w * ((i % 8) as f32 + 0.5) / 8.0,
                        h * ((i / 8 % 8) as f32 + 0.5) / 8.0,
                    )
                })
                .collect();
            let model_prompts: Vec<_> = prompts
                .iter()
                .map(|p| p.to_model(&emb.geometry, seg.mask_size().pow(2)))
                .collect::<Result<_, _>>()?;
            let dec = measure(args.runs, || {
                seg.decode(&emb, &model_prompts, None)?;
                Ok(())
            })?;
            if args.profile && Some(&b) == args.batches.iter().max() {
                print_decoder_profile(&seg, &emb, &model_prompts, p)?;
            }
            write!(
                row,
                " {:.1} ({:.2}) |",
                ms(dec.median),
                ms(dec.median) / b as f64
            )?;
        }
        write!(row, " {:.0} |", peak_rss_mib())?;
        writeln!(md, "{row}")?;
        if args.profile {
            let input = tinysam_edge::preprocess::Preprocessor::new(&seg.model.manifest.preprocess)
                .run(&frame)?;
            let input = tinysam_edge::model::input_tensor(input)?;
            let times = profile::profile(seg.model.encoder.plan(), vec![input])?;
            profiles.push((p, profile::by_layer(&times, 4)));
            print_profile(&format!("encoder {p}"), &times, 12);
        }
    }
    if let (Some((_, int8)), Some((_, fp32))) = (
        encoder_medians.iter().find(|(p, _)| *p == Precision::Int8),
        encoder_medians.iter().find(|(p, _)| *p == Precision::Fp32),
    ) {
        writeln!(
            md,
            "\nencoder INT8 / FP32 time ratio: {:.2}",
            int8.as_secs_f64() / fp32.as_secs_f64()
        )?;
    }
    if let [(pa, a), (pb, b)] = profiles.as_slice() {
        layer_table(&mut md, (*pa, a), (*pb, b))?;
    }
    if args.everything {
        if let Some(&p) = args.precisions.first() {
            let (iou, stability) = match args.everything_thresholds.as_slice() {
                [i, s] => (*i, *s),
                other => anyhow::bail!("--everything-thresholds takes two values, got {other:?}"),
            };
            everything_table(
                &mut md,
                &dir,
                (p, args.int8_matmul, args.conv_blocks),
                &frame,
                iou,
                stability,
            )?;
        }
    }
    print!("{md}");
    if let Some(path) = &args.markdown {
        std::fs::write(path, &md).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The encoder's time per layer in two precisions side by side, slowest (in the first) first.
fn layer_table(
    md: &mut String,
    (pa, a): (Precision, &[(String, Duration)]),
    (pb, b): (Precision, &[(String, Duration)]),
) -> anyhow::Result<()> {
    let total = |v: &[(String, Duration)]| v.iter().map(|(_, d)| ms(*d)).sum::<f64>();
    writeln!(
        md,
        "\n### encoder time per layer, {pa} vs {pb} (one profiled run each)\n"
    )?;
    writeln!(md, "| layer | {pa} ms | {pb} ms | {pa} / {pb} |")?;
    writeln!(md, "|---|---|---|---|")?;
    for (layer, da) in a.iter().take(24) {
        let db = b.iter().find(|(l, _)| l == layer).map(|(_, d)| ms(*d));
        let ratio = db.map_or("-".to_string(), |db| format!("{:.1}", ms(*da) / db));
        let db = db.map_or("-".to_string(), |db| format!("{db:.1}"));
        writeln!(md, "| `{layer}` | {:.1} | {db} | {ratio} |", ms(*da))?;
    }
    let (ta, tb) = (total(a), total(b));
    writeln!(
        md,
        "| **all {} / {} layers** | {ta:.1} | {tb:.1} | {:.1} |",
        a.len(),
        b.len(),
        ta / tb
    )?;
    Ok(())
}

/// The slowest ops and nodes of one decoder run of `prompts`.
fn print_decoder_profile(
    seg: &Segmenter,
    emb: &model::Embedding,
    prompts: &[tinysam_edge::prompt::ModelPrompt],
    p: Precision,
) -> anyhow::Result<()> {
    let n = prompts.first().map_or(0, |p| p.labels.len());
    let input = model::DecoderInput {
        points_per_prompt: n,
        coords: prompts
            .iter()
            .flat_map(|p| p.coords.iter().copied())
            .collect(),
        labels: prompts
            .iter()
            .flat_map(|p| p.labels.iter().copied())
            .collect(),
        mask_input: None,
    };
    let decoder = &seg.model.decoder;
    let times = decoder.profile(emb, &input)?;
    let total: Duration = times.iter().map(|t| t.time).sum();
    // The split form decodes a batch in chunks (`Decoder::profile` runs them as `decode` does).
    let chunks = match decoder.form() {
        model::DecoderForm::Split => format!(" in chunks of up to {}", model::decoder::SPLIT_CHUNK),
        model::DecoderForm::OneGraph => String::new(),
    };
    let title = format!(
        "decoder ({} {}, batch {}{chunks}, encoder {p}): {:.1} ms,",
        decoder.form(),
        decoder.precision,
        prompts.len(),
        ms(total)
    );
    print_profile(&title, &times, 16);
    let masks: Duration = times
        .iter()
        .filter(|t| t.node.starts_with("masks:"))
        .map(|t| t.time)
        .sum();
    if !masks.is_zero() {
        eprintln!(
            "of which the mask graph (nodes `masks:…`): {:.1} ms",
            ms(masks)
        );
    }
    Ok(())
}

/// Time by op, then the `slowest` slowest nodes with tract's description, on stderr.
fn print_profile(title: &str, times: &[profile::NodeTime], slowest: usize) {
    eprintln!("\n{title} time by op");
    for (op, d, n) in profile::by_op(times).iter().take(12) {
        eprintln!("  {:>9.1} ms  {n:>4}x  {op}", ms(*d));
    }
    eprintln!("{title} slowest nodes");
    for t in times.iter().take(slowest) {
        eprintln!("  {:>9.1} ms  {:<24} {}", ms(t.time), t.op, t.node);
        for line in &t.info {
            eprintln!("                 {line}");
        }
    }
}

fn everything_table(
    md: &mut String,
    dir: &std::path::Path,
    (p, int8_matmul, conv_blocks): (Precision, model::Int8Matmul, model::ConvBlocks),
    frame: &image::RgbImage,
    pred_iou_thresh: f32,
    stability_score_thresh: f32,
) -> anyhow::Result<()> {
    use tinysam_edge::everything::{agreement, EverythingParams, Generator, Strategy};

    let dec_p = decoder_precision(&model::Manifest::load(dir)?, p);
    let seg = Segmenter::new(Model::load(
        dir,
        PrecisionChoice {
            encoder: Some(p),
            decoder: Some(dec_p),
            int8_matmul,
            conv_blocks,
            ..Default::default()
        },
    )?);
    let emb = seg.embed(frame)?;
    writeln!(
        md,
        "\n### segment everything (encoder {p}, decoder {dec_p}; pred_iou_thresh \
         {pred_iou_thresh}, stability_score_thresh {stability_score_thresh}; time excludes the \
         encoder)\n"
    )?;
    writeln!(
        md,
        "| strategy | time ms | decoder prompts | skipped | candidates | masks |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|")?;
    let mut results = Vec::new();
    for strategy in [Strategy::Flat, Strategy::Hierarchical] {
        let params = EverythingParams {
            strategy,
            pred_iou_thresh,
            stability_score_thresh,
            ..EverythingParams::default()
        };
        let t = Instant::now();
        let r = Generator::new(&seg, params).run(&emb)?;
        let elapsed = t.elapsed();
        writeln!(
            md,
            "| {strategy:?} | {:.0} | {} | {} | {} | {} |",
            ms(elapsed),
            r.stats.decoder_prompts,
            r.stats.skipped_points,
            r.stats.candidates,
            r.masks.len()
        )?;
        results.push((elapsed, r));
    }
    if let [(tf, flat), (th, hier)] = results.as_slice() {
        let a: Vec<_> = flat.masks.iter().map(|m| &m.mask).collect();
        let b: Vec<_> = hier.masks.iter().map(|m| &m.mask).collect();
        writeln!(
            md,
            "\nhierarchical / flat time: {:.2}; agreement (mean best-match IoU of flat masks in hierarchical): {:.3}",
            th.as_secs_f64() / tf.as_secs_f64(),
            agreement(&a, &b)
        )?;
    }
    Ok(())
}
