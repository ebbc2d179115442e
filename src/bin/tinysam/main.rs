//! `tinysam`: segment images from the command line, inspect models, benchmark.

mod bench;
mod bench_daemon;
mod bench_raw;
mod fidelity;
#[path = "../shared/prompt_flags.rs"]
mod prompt_flags;
mod sub;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use tinysam_edge::everything::{EverythingParams, Generator, Progress, Strategy};
use tinysam_edge::model::{self, kernels, Embedding, Precision, PrecisionChoice, Role};
use tinysam_edge::overlay;
use tinysam_edge::postprocess::MaskSummary;
use tinysam_edge::prompt::{BoxPrompt, Prompt, PromptPoint};
use tinysam_edge::segmenter::{MaskSelection, Segmenter};

#[derive(Parser)]
#[command(
    name = "tinysam",
    version,
    about = "TinySAM promptable segmentation on the CPU (tract, INT8)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// Model directory with manifest.json (default: $TINYSAM_MODEL, ./models/default, ...).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Encoder precision (default: the manifest's).
    #[arg(long)]
    encoder: Option<Precision>,
    /// Decoder precision (default: the manifest's).
    #[arg(long)]
    decoder: Option<Precision>,
    /// Threads for tract's matrix products.
    #[arg(long, default_value_t = default_threads())]
    threads: usize,
    /// INT8 matrix products: auto (ours, this CPU's fastest kernel), tract, portable, avx2, vnni, sdot.
    #[arg(long, default_value = "auto")]
    int8_matmul: model::Int8Matmul,
    /// Decoder form: auto (per-frame + per-prompt graphs when the model has them, the mask
    /// upscaling in low rank), one-graph, split-full-rank.
    #[arg(long, default_value = "auto")]
    decoder_graph: model::DecoderGraph,
    /// Products of an INT8 encoder's float convolutional front (stage 0's blocks, its patch
    /// merging, the stem's second convolution): auto (W8A16 integers where faster: x86_64 with
    /// AVX2 or VNNI; f32 elsewhere), f32.
    #[arg(long, default_value = "auto")]
    conv_blocks: model::ConvBlocks,
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl ModelArgs {
    fn dir(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(model::default_model_dir)
    }

    fn load(&self) -> anyhow::Result<Segmenter> {
        model::set_threads(self.threads);
        let dir = self.dir();
        let choice = PrecisionChoice {
            encoder: self.encoder,
            decoder: self.decoder,
            int8_matmul: self.int8_matmul,
            decoder_graph: self.decoder_graph,
            conv_blocks: self.conv_blocks,
        };
        Segmenter::load(&dir, choice)
            .with_context(|| format!("loading model directory {}", dir.display()))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Segment an image with point and box prompts; writes PNG masks, an overlay and JSON.
    Segment(SegmentArgs),
    /// Print a model's manifest summary, the CPU's ISA and the kernels tract chose.
    Info(InfoArgs),
    /// Time encoder and decoder per precision, side by side, with peak RSS.
    Bench(bench::BenchArgs),
    /// Subscribe to a running tinysamd and print or save the masks it publishes.
    Sub(sub::SubArgs),
    /// Compare the model's INT8 forms with its FP32 form as this runtime runs them: embedding
    /// cosine, best-mask IoU, IoU-score error, best-mask agreement.
    Fidelity(fidelity::FidelityArgs),
}

#[derive(Args)]
struct SegmentArgs {
    /// Image file (PNG or JPEG).
    image: PathBuf,
    /// A point prompt `x,y` or `x,y,label` (label 1 foreground, 0 background); repeat for more
    /// points in the same prompt.
    #[arg(long = "point")]
    points: Vec<PromptPoint>,
    /// A box prompt `x0,y0,x1,y1`; repeat for several objects (each box is its own prompt,
    /// points join the first box).
    #[arg(long = "box")]
    boxes: Vec<BoxPrompt>,
    /// Return all 3 masks per prompt instead of the best one.
    #[arg(long)]
    all_masks: bool,
    /// Segment everything (no prompts needed): TinySAM's hierarchical strategy by default.
    #[arg(long)]
    everything: bool,
    /// With --everything: SAM's flat point grid instead of the hierarchical strategy.
    #[arg(long, requires = "everything")]
    flat: bool,
    /// With --everything: dense grid side.
    #[arg(long, default_value_t = 32)]
    points_per_side: usize,
    /// With --everything: minimum predicted IoU.
    #[arg(long, default_value_t = 0.88)]
    pred_iou_thresh: f32,
    /// With --everything: minimum stability score.
    #[arg(long, default_value_t = 0.95)]
    stability_thresh: f32,
    /// With --everything: remove holes and islands smaller than this many pixels.
    #[arg(long, default_value_t = 0)]
    min_region_area: u64,
    /// Output prefix: writes PREFIX.json, PREFIX.overlay.png, PREFIX.mask-N.png.
    #[arg(long, default_value = "out/segment")]
    out: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
}

#[derive(Args)]
struct InfoArgs {
    /// List every compute node with its kernel and MACs.
    #[arg(long)]
    nodes: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    model: ModelArgs,
}

#[derive(Serialize)]
struct SegmentReport<'a> {
    image: &'a Path,
    width: u32,
    height: u32,
    model: &'a str,
    encoder_ms: f64,
    decoder_ms: f64,
    prompts: Vec<PromptReport>,
}

#[derive(Serialize)]
struct PromptReport {
    prompt: usize,
    error: Option<String>,
    masks: Vec<MaskReport>,
}

/// A mask of one prompt and the PNG it was written to.
#[derive(Serialize)]
struct MaskReport {
    #[serde(flatten)]
    summary: MaskSummary,
    /// The PNG's file name (`PREFIX.mask-N.png`, numbered in the order of this report).
    file: String,
}

fn prompts_from(args: &SegmentArgs) -> Vec<Prompt> {
    if args.boxes.is_empty() {
        if args.points.is_empty() {
            return Vec::new();
        }
        return vec![Prompt {
            points: args.points.clone(),
            ..Prompt::default()
        }];
    }
    args.boxes
        .iter()
        .enumerate()
        .map(|(i, b)| Prompt {
            points: if i == 0 {
                args.points.clone()
            } else {
                Vec::new()
            },
            bbox: Some(*b),
            mask_input: None,
        })
        .collect()
}

/// Read the image, check `prompts` against its size (before the seconds of model loading and
/// encoding), load the model and encode the frame; the encoder time in ms.
fn load_and_embed(
    args: &SegmentArgs,
    prompts: &[Prompt],
) -> anyhow::Result<(image::RgbImage, Segmenter, Embedding, f64)> {
    let frame = tinysam_edge::pixel::read_image(&args.image)
        .with_context(|| format!("reading image {}", args.image.display()))?;
    let (width, height) = frame.dimensions();
    // Whether a prompt fits the frame does not depend on the model size: any valid one will do.
    let geometry = tinysam_edge::preprocess::Geometry::new(width, height, width.max(height))?;
    for (i, prompt) in prompts.iter().enumerate() {
        prompt
            .to_model(&geometry, 0)
            .with_context(|| format!("prompt {i}"))?;
    }
    let seg = args.model.load()?;
    let t0 = Instant::now();
    let embedding = seg.embed(&frame)?;
    Ok((frame, seg, embedding, t0.elapsed().as_secs_f64() * 1e3))
}

fn segment(args: SegmentArgs) -> anyhow::Result<()> {
    if args.everything {
        return segment_everything(args);
    }
    let prompts = prompts_from(&args);
    if prompts.is_empty() {
        bail!("give at least one --point or --box, or --everything");
    }
    let (frame, seg, embedding, encoder_ms) = load_and_embed(&args, &prompts)?;
    let selection = if args.all_masks {
        MaskSelection::All
    } else {
        MaskSelection::Best
    };
    let t1 = Instant::now();
    let outcomes = seg.segment(&embedding, &prompts, selection)?;
    let decoder_ms = t1.elapsed().as_secs_f64() * 1e3;

    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let prefix = args.out.to_string_lossy().to_string();
    let mut overlay_img = frame.clone();
    let mut drawn = Vec::new();
    let mut reports = Vec::new();
    let mut mask_no = 0;
    for (i, outcome) in outcomes.iter().enumerate() {
        match outcome {
            Ok(masks) => {
                let mut files = Vec::with_capacity(masks.len());
                for m in masks {
                    let path = format!("{prefix}.mask-{mask_no}.png");
                    let png = image::GrayImage::from_raw(
                        m.mask.width,
                        m.mask.height,
                        m.mask.data.iter().map(|v| v * 255).collect(),
                    )
                    .context("mask buffer size")?;
                    png.save(&path).with_context(|| format!("writing {path}"))?;
                    mask_no += 1;
                    drawn.push(&m.mask);
                    files.push(path);
                }
                reports.push(PromptReport {
                    prompt: i,
                    error: None,
                    masks: masks
                        .iter()
                        .zip(files)
                        .map(|(m, file)| MaskReport {
                            summary: MaskSummary::from(m),
                            file,
                        })
                        .collect(),
                });
            }
            Err(e) => {
                eprintln!("prompt {i}: {e}");
                reports.push(PromptReport {
                    prompt: i,
                    error: Some(e.to_string()),
                    masks: Vec::new(),
                });
            }
        }
    }
    overlay::draw_masks(&mut overlay_img, &drawn);
    overlay::draw_prompts(&mut overlay_img, &prompts);
    let overlay_path = format!("{prefix}.overlay.png");
    overlay_img
        .save(&overlay_path)
        .with_context(|| format!("writing {overlay_path}"))?;
    let report = SegmentReport {
        image: &args.image,
        width: frame.width(),
        height: frame.height(),
        model: &seg.model.manifest.model,
        encoder_ms,
        decoder_ms,
        prompts: reports,
    };
    let json_path = format!("{prefix}.json");
    // Compact: the masks' RLE strings make it megabytes when pretty-printed.
    std::fs::write(&json_path, serde_json::to_string(&report)?)
        .with_context(|| format!("writing {json_path}"))?;
    for r in &report.prompts {
        for m in &r.masks {
            let s = &m.summary;
            println!(
                "prompt {} mask {} (best first): score {:.3} stability {:.3} area {} bbox {:?} -> {}",
                r.prompt, s.index, s.score, s.stability, s.area, s.bbox, m.file
            );
        }
    }
    println!("encoder {encoder_ms:.1} ms, decoder {decoder_ms:.1} ms; wrote {json_path}, {overlay_path} and {mask_no} mask PNG(s)");
    if report.prompts.iter().all(|r| r.error.is_some()) {
        bail!("every prompt was refused");
    }
    Ok(())
}

fn output_prefix(out: &Path) -> anyhow::Result<String> {
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    Ok(out.to_string_lossy().to_string())
}

/// Progress of a long everything pass on stderr: one line rewritten in place on a terminal, else a
/// line at most every few seconds (a pass takes seconds to minutes).
struct EverythingProgress {
    started: Instant,
    terminal: bool,
    last: std::cell::Cell<Option<Instant>>,
}

impl EverythingProgress {
    fn new(started: Instant) -> EverythingProgress {
        EverythingProgress {
            started,
            terminal: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            last: std::cell::Cell::new(None),
        }
    }

    fn report(&self, p: Progress) {
        let every = if self.terminal { 0.2 } else { 5.0 };
        let now = Instant::now();
        let due = self
            .last
            .get()
            .is_none_or(|t| (now - t).as_secs_f32() >= every);
        if !due && p.done < p.total {
            return;
        }
        self.last.set(Some(now));
        let line = format!(
            "everything: round {}: {}/{} points decoded, {:.1} s",
            p.round,
            p.done,
            p.total,
            (now - self.started).as_secs_f32()
        );
        if self.terminal {
            eprint!("\r{line}\x1b[K");
        } else {
            eprintln!("{line}");
        }
    }

    fn finish(&self) {
        if self.terminal && self.last.get().is_some() {
            eprintln!();
        }
    }
}

fn segment_everything(args: SegmentArgs) -> anyhow::Result<()> {
    let (frame, seg, embedding, encoder_ms) = load_and_embed(&args, &[])?;
    let params = EverythingParams {
        strategy: if args.flat {
            Strategy::Flat
        } else {
            Strategy::Hierarchical
        },
        points_per_side: args.points_per_side,
        pred_iou_thresh: args.pred_iou_thresh,
        stability_score_thresh: args.stability_thresh,
        min_mask_region_area: args.min_region_area,
        ..EverythingParams::default()
    };
    let t1 = Instant::now();
    let progress = EverythingProgress::new(t1);
    let report = |p: Progress| {
        progress.report(p);
        std::ops::ControlFlow::Continue(())
    };
    let result = Generator::new(&seg, params.clone())
        .on_progress(&report)
        .run(&embedding);
    progress.finish();
    let result = result?;
    let everything_ms = t1.elapsed().as_secs_f64() * 1e3;
    let prefix = output_prefix(&args.out)?;
    let mut overlay_img = frame.clone();
    let masks: Vec<_> = result.masks.iter().map(|m| &m.mask).collect();
    overlay::draw_masks(&mut overlay_img, &masks);
    let overlay_path = format!("{prefix}.overlay.png");
    overlay_img
        .save(&overlay_path)
        .with_context(|| format!("writing {overlay_path}"))?;
    let json = serde_json::json!({
        "image": args.image,
        "width": frame.width(),
        "height": frame.height(),
        "params": params,
        "stats": result.stats,
        "encoder_ms": encoder_ms,
        "everything_ms": everything_ms,
        "masks": result.masks.iter().map(MaskSummary::from).collect::<Vec<_>>(),
    });
    let json_path = format!("{prefix}.json");
    std::fs::write(&json_path, serde_json::to_string(&json)?)
        .with_context(|| format!("writing {json_path}"))?;
    println!(
        "{:?}: {} masks from {} decoder prompts ({} skipped, {} with a mask above the IoU threshold, \
         {} candidates before NMS); encoder {encoder_ms:.0} ms, everything {everything_ms:.0} ms; \
         wrote {json_path} and {overlay_path}",
        params.strategy,
        result.masks.len(),
        result.stats.decoder_prompts,
        result.stats.skipped_points,
        result.stats.promising_prompts,
        result.stats.candidates
    );
    Ok(())
}

fn info(args: InfoArgs) -> anyhow::Result<()> {
    let seg = args.model.load()?;
    let m = &seg.model;
    let enc = kernels::analyse(m.encoder.model())?;
    let dec = kernels::analyse_prompts(&m.decoder, 1, 2)?;
    if args.json {
        let v = serde_json::json!({
            "dir": m.dir,
            "model": m.manifest.model,
            "weights": m.manifest.weights,
            "isa": model::native_isa(),
            "encoder": {"file": m.encoder.path, "precision": m.encoder.precision, "kernels": enc},
            "decoder": {"file": m.decoder.path, "precision": m.decoder.precision,
                        "form": m.decoder.form().to_string(), "kernels": dec},
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("model      {} ({})", m.manifest.model, m.dir.display());
    println!("weights    {}", m.manifest.weights);
    println!(
        "input      {0}x{0}, embedding {1:?}",
        m.manifest.config.image_size, m.encoder.output_shape
    );
    println!(
        "available  encoder {:?}, decoder {:?}",
        m.manifest.loadable_precisions(Role::Encoder),
        m.manifest.loadable_precisions(Role::Decoder)
    );
    println!("cpu isa    {}", model::native_isa());
    println!("our ops    {}", model::ops_isa());
    println!(
        "decoding   {}{} ({}; MACs below per prompt of one point)",
        m.decoder.form(),
        if m.decoder.quantized_at_load() {
            ", INT8 quantized at load from the FP32 graphs"
        } else {
            ""
        },
        m.decoder.path.display()
    );
    for (name, precision, rep) in [
        ("encoder", m.encoder.precision, &enc),
        ("decoder", m.decoder.precision, &dec),
    ] {
        println!(
            "{name:<10} {precision}: {:.2} GMAC, {:.1}% in integer kernels",
            (rep.integer_macs + rep.float_macs) as f64 / 1e9,
            rep.integer_share() * 100.0
        );
        for (kernel, macs) in rep.kernel_totals() {
            println!("    {:>8.3} GMAC  {kernel}", macs as f64 / 1e9);
        }
        if !rep.our_ops.is_empty() {
            let ours: Vec<String> = rep
                .our_ops
                .iter()
                .map(|(name, n)| format!("{n} x {name}"))
                .collect();
            println!("    our ops: {}", ours.join(", "));
        }
        if args.nodes {
            for n in &rep.nodes {
                println!(
                    "    {:>12} MAC  {:<10} {:<28} {}",
                    n.macs, n.accumulator, n.kernel, n.node
                );
            }
        }
    }
    Ok(())
}

/// Let a closed stdout end the process quietly, as it ends `head` or `grep -q`'s other Unix
/// producers, instead of a panic in `println!` (Rust ignores SIGPIPE by default).
#[allow(unsafe_code)]
fn default_sigpipe() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: called first thing in `main`, before any thread exists; SIG_DFL installs no
    // handler code.
    if let Err(e) = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) } {
        eprintln!("warning: cannot restore the default SIGPIPE action: {e}");
    }
}

fn main() -> ExitCode {
    default_sigpipe();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let tuning = tinysam_edge::allocator::keep_freed_memory();
    log::debug!("allocator: {tuning:?}");
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Segment(a) => segment(a),
        Command::Info(a) => info(a),
        Command::Bench(a) => bench::run(a),
        Command::Sub(a) => sub::run(a),
        Command::Fidelity(a) => fidelity::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
