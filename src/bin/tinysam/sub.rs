//! `tinysam sub`: subscribe to a running `tinysamd` and print (or save) the masks it publishes.

use std::path::PathBuf;
use std::time::Duration;

use crate::prompt_flags::PromptFlags;
use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use tinysam_edge::client::{Client, ClientError};
use tinysam_edge::postprocess::rle::Rle;
use tinysam_edge::protocol::{
    ClientMessage, MaskEncoding, Masks, PromptRequest, ServerMessage, StatusRequest, Subscribe,
    SubscribeMode, WirePrompt,
};

/// Mask encodings, for the command line.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum EncodingArg {
    /// COCO compressed RLE.
    Rle,
    /// Raw mono8 bitmap.
    Bitmap,
    /// COCO polygons.
    Polygon,
    /// Boxes and scores only.
    Bbox,
}

impl From<EncodingArg> for MaskEncoding {
    fn from(e: EncodingArg) -> MaskEncoding {
        match e {
            EncodingArg::Rle => MaskEncoding::Rle,
            EncodingArg::Bitmap => MaskEncoding::Bitmap,
            EncodingArg::Polygon => MaskEncoding::Polygon,
            EncodingArg::Bbox => MaskEncoding::Bbox,
        }
    }
}

#[derive(Args)]
pub struct SubArgs {
    /// Daemon socket (default: as tinysamd picks it).
    #[arg(long)]
    socket: Option<PathBuf>,
    #[command(flatten)]
    prompts: PromptFlags,
    /// Ask once (for `--frame` or the newest frame) instead of subscribing.
    #[arg(long)]
    once: bool,
    /// With --once: the frame sequence number to segment.
    #[arg(long, requires = "once")]
    frame: Option<u64>,
    /// Print the daemon's status report and exit.
    #[arg(long, conflicts_with_all = ["everything", "points", "boxes", "once"])]
    status: bool,
    /// Exit after this many results (0: run until interrupted).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Mask encoding on the wire.
    #[arg(long, value_enum, default_value = "rle")]
    encoding: EncodingArg,
    /// Three masks per prompt instead of the best.
    #[arg(long)]
    multimask: bool,
    /// Most results per second (0: every frame).
    #[arg(long, default_value_t = 0.0)]
    max_rate: f32,
    /// Print each result as one JSON line.
    #[arg(long)]
    json: bool,
    /// Write each mask as a PNG into this directory (rle and bitmap encodings).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Ask for each result's frame and write it as frameNNNNNN.jpg beside the masks.
    #[arg(long, requires = "out")]
    frames: bool,
    /// Give up after this many seconds without a result while the daemon makes no progress
    /// (it encodes no new frame): a slow model on a slow machine is waited for, a stuck daemon
    /// is not.
    #[arg(long, default_value_t = 60.0)]
    timeout: f32,
}

fn mask_pixels(
    m: &tinysam_edge::protocol::WireMask,
    w: u32,
    h: u32,
) -> anyhow::Result<Option<Vec<u8>>> {
    if let Some(counts) = &m.rle {
        let rle = Rle::from_compressed(counts, w, h).context("decoding RLE")?;
        return Ok(Some(
            rle.decode()
                .context("decoding RLE")?
                .iter()
                .map(|v| v * 255)
                .collect(),
        ));
    }
    Ok(m.bitmap.clone())
}

fn report(masks: &Masks, args: &SubArgs) -> anyhow::Result<()> {
    if args.json {
        // The frame goes to --out, not into the JSON line.
        let line = Masks {
            frame_jpeg: None,
            ..masks.clone()
        };
        println!("{}", serde_json::to_string(&line)?);
    } else {
        let latency_ms =
            tinysam_edge::monotonic_now_ns().saturating_sub(masks.capture_ns) as f64 / 1e6;
        println!(
            "frame {} ({}x{}): {} mask(s), dropped {}, {latency_ms:.1} ms after capture",
            masks.frame_seq,
            masks.width,
            masks.height,
            masks.masks.len(),
            masks.dropped
        );
        for m in &masks.masks {
            println!(
                "  prompt {} output {}: score {:.3} stability {:.3} area {} bbox {:?}",
                m.prompt, m.output, m.score, m.stability, m.area, m.bbox
            );
        }
    }
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        if let Some(jpeg) = &masks.frame_jpeg {
            let path = dir.join(format!("frame{:06}.jpg", masks.frame_seq));
            std::fs::write(&path, jpeg).with_context(|| format!("writing {}", path.display()))?;
        }
        for (i, m) in masks.masks.iter().enumerate() {
            if let Some(pixels) = mask_pixels(m, masks.width, masks.height)? {
                let path = dir.join(format!("frame{:06}-mask{i}.png", masks.frame_seq));
                image::GrayImage::from_raw(masks.width, masks.height, pixels)
                    .context("mask size does not match the frame")?
                    .save(&path)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
    }
    Ok(())
}

pub fn run(args: SubArgs) -> anyhow::Result<()> {
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(tinysam_edge::config::default_socket_path);
    let mut client = Client::connect(&socket, "tinysam-sub").with_context(|| {
        format!(
            "connecting to tinysamd at {} (is tinysamd running, and is this its socket? \
             --socket or [socket] path in its config)",
            socket.display()
        )
    })?;
    if args.status {
        let status = client.status(1)?;
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let encoding = MaskEncoding::from(args.encoding);
    let prompts = WirePrompt::from_points_and_boxes(&args.prompts.points, &args.prompts.boxes);
    if args.once {
        if args.prompts.points.is_empty() && args.prompts.boxes.is_empty() {
            bail!("--once needs --point or --box");
        }
        client.request(PromptRequest {
            request_id: 1,
            frame_seq: args.frame,
            prompts,
            encoding,
            multimask: args.multimask,
            frames: args.frames,
        })?;
    } else {
        let mode = if args.prompts.everything {
            SubscribeMode::Everything
        } else if args.prompts.points.is_empty() && args.prompts.boxes.is_empty() {
            bail!("give --everything, --point or --box (or --status)");
        } else {
            SubscribeMode::Prompts
        };
        client.subscribe(Subscribe {
            id: 1,
            mode,
            prompts: if mode == SubscribeMode::Prompts {
                prompts
            } else {
                Vec::new()
            },
            encoding,
            max_rate_hz: args.max_rate,
            multimask: args.multimask,
            frames: args.frames,
        })?;
    }
    let timeout = Duration::try_from_secs_f32(args.timeout.max(0.1))
        .with_context(|| format!("--timeout {} is not a number of seconds", args.timeout))?;
    // While nothing arrives, ask the daemon how far it is, a few times per timeout.
    let poll = (timeout / 4).min(Duration::from_secs(5));
    let mut progress = Progress::new(timeout);
    let ask_progress = |client: &mut Client| {
        client.send(&ClientMessage::StatusRequest(StatusRequest {
            request_id: PROGRESS_REQUEST,
        }))
    };
    ask_progress(&mut client)?;
    let mut received = 0u64;
    loop {
        match client.recv(Some(poll)) {
            Ok(ServerMessage::Status(s)) => progress.encoded(s.frames_encoded),
            Ok(ServerMessage::Masks(m)) => {
                progress.advanced();
                report(&m, &args)?;
                received += 1;
                let done = args.once || (args.count > 0 && received >= args.count);
                if done {
                    return Ok(());
                }
            }
            Ok(ServerMessage::Error(e)) => {
                // The request, or the subscription before any result, was refused: nothing
                // will come, so end with the daemon's reason instead of waiting or succeeding.
                if args.once || (received == 0 && e.id == Some(1)) {
                    bail!("tinysamd refused it: {}: {}", e.code, e.message);
                }
                eprintln!("tinysamd: {}: {}", e.code, e.message);
            }
            Ok(_) => {}
            Err(ClientError::Timeout(_)) => {
                if progress.stalled() {
                    bail!(
                        "no result from tinysamd, and no new frame encoded, within {timeout:?} \
                         (frames encoded so far: {})",
                        progress
                            .last_encoded
                            .map_or_else(|| "unknown".to_string(), |n| n.to_string())
                    );
                }
                ask_progress(&mut client)?;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The request id of the status requests that watch the daemon's progress.
const PROGRESS_REQUEST: u32 = 0xffff_fff0;

/// Whether the daemon still moves: a result, or a new encoded frame, within `timeout`.
struct Progress {
    timeout: Duration,
    since: std::time::Instant,
    last_encoded: Option<u64>,
}

impl Progress {
    fn new(timeout: Duration) -> Progress {
        Progress {
            timeout,
            since: std::time::Instant::now(),
            last_encoded: None,
        }
    }

    fn advanced(&mut self) {
        self.since = std::time::Instant::now();
    }

    /// A status report said the daemon has encoded `frames` frames.
    fn encoded(&mut self, frames: u64) {
        if self.last_encoded.is_some_and(|last| frames > last) {
            self.advanced();
        }
        self.last_encoded = Some(frames);
    }

    fn stalled(&self) -> bool {
        self.since.elapsed() >= self.timeout
    }
}
