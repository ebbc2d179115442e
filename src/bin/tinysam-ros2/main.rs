//! `tinysam-ros2`: the ROS 2 bridge. A client of `tinysamd`'s socket and a ROS 2 node (`tinysam`
//! by default) that a stock ROS 2 system sees as any other: it publishes every result as a
//! `mono16` label image (`~/masks`) and a `vision_msgs/Detection2DArray` (`~/detections`), and
//! answers box prompts (`~/prompts`, `Detection2DArray`) and point prompts (`~/points`,
//! `geometry_msgs/PointStamped`) on the newest frame. No ROS installation: the middleware is
//! RustDDS through `ros2-client` ([`dds`]), or Zenoh laid out as `rmw_zenoh` does ([`zenoh`],
//! the `zenoh` feature, on by default), chosen by `ros2.transport`.
//!
//! Flags and the config file's `[ros2]` table become `Ros2Settings`; the daemon side is
//! `tinysam_edge::ros2::Bridge`, the middleware side is [`dds`] or [`zenoh`]. Runs until
//! SIGTERM/SIGINT.
//! Exit codes: 0 clean stop, 1 failure (the middleware would not start), 78 bad configuration.

mod dds;
#[path = "../shared/prompt_flags.rs"]
mod prompt_flags;
#[cfg(feature = "zenoh")]
mod zenoh;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use tinysam_edge::config::{Config, ConfigError, Ros2Settings, Ros2Transport};
use tinysam_edge::error_chain;
use tinysam_edge::ros2::messages::{CompressedImage, Detection2DArray, Image};
use tinysam_edge::ros2::{Bridge, BridgeOptions, FrameOutput, Publish};

use crate::prompt_flags::PromptFlags;

/// systemd's EX_CONFIG: the unit does not restart on it.
const EXIT_CONFIG: u8 = 78;

/// ROS 2 bridge for tinysamd: masks and detections out, box and point prompts in, over DDS or
/// Zenoh (rmw_zenoh).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// TOML config file: its `[ros2]` table and the socket of `[socket]` (docs/config.md).
    #[arg(long, env = "TINYSAMD_CONFIG")]
    config: Option<PathBuf>,
    /// tinysamd's socket (default: as tinysamd picks it).
    #[arg(long)]
    socket: Option<PathBuf>,
    #[command(flatten)]
    prompts: PromptFlags,
    /// Most standing results per second (0: every frame).
    #[arg(long)]
    max_rate: Option<f32>,
    /// ROS domain id 0..=232 (default: $ROS_DOMAIN_ID, else 0).
    #[arg(long)]
    domain_id: Option<i64>,
    /// Node namespace (`/` or `/robot1`).
    #[arg(long)]
    namespace: Option<String>,
    /// Node name.
    #[arg(long)]
    node_name: Option<String>,
    /// `header.frame_id` of everything published.
    #[arg(long)]
    frame_id: Option<String>,
    /// Publish detections only, not the label image.
    #[arg(long)]
    no_masks: bool,
    /// Also publish the masks drawn over the frame (JPEG) on `~/overlay/compressed`, for RViz.
    #[arg(long)]
    overlay: bool,
    /// Middleware: dds or zenoh.
    #[arg(long)]
    transport: Option<String>,
    /// The Zenoh router to connect to (transport zenoh; default tcp/127.0.0.1:7447, as
    /// rmw_zenohd listens). `$ZENOH_SESSION_CONFIG_URI` replaces the whole session config.
    #[arg(long)]
    zenoh_router: Option<String>,
    /// Validate the configuration, print the effective `[ros2]` table, and exit.
    #[arg(long)]
    check_config: bool,
}

/// A configuration problem (exit 78).
#[derive(Debug)]
struct ConfigFailure(String);

impl std::fmt::Display for ConfigFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigFailure {}

fn run(args: Args) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    let r = &mut config.ros2;
    if args.prompts.everything {
        r.everything = true;
        r.points.clear();
        r.boxes.clear();
    }
    if !args.prompts.points.is_empty() || !args.prompts.boxes.is_empty() {
        r.everything = false;
        r.points = args.prompts.points.iter().map(|p| p.to_string()).collect();
        r.boxes = args.prompts.boxes.iter().map(|b| b.to_string()).collect();
    }
    if let Some(v) = args.max_rate {
        r.max_rate_hz = v;
    }
    if let Some(v) = args.domain_id {
        r.domain_id = v;
    }
    if let Some(v) = &args.namespace {
        r.namespace = v.clone();
    }
    if let Some(v) = &args.node_name {
        r.node_name = v.clone();
    }
    if let Some(v) = &args.frame_id {
        r.frame_id = v.clone();
    }
    if args.no_masks {
        r.publish_masks = false;
    }
    if args.overlay {
        r.publish_overlay = true;
    }
    if let Some(v) = &args.transport {
        r.transport = v.clone();
    }
    if let Some(v) = &args.zenoh_router {
        r.zenoh_router = v.clone();
    }
    let env_domain = std::env::var("ROS_DOMAIN_ID").ok();
    let settings = config.ros2.validate(env_domain.as_deref())?;
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| config.socket.resolved_path());
    if args.check_config {
        println!(
            "# socket {}, domain id {}\n[ros2]\n{}",
            socket.display(),
            settings.domain_id,
            toml::to_string(&config.ros2).context("printing the configuration")?
        );
        return Ok(());
    }
    let bridge = Arc::new(Bridge::new(BridgeOptions {
        socket,
        client_name: format!("tinysam-ros2 {}", settings.node_name),
        standing: settings.standing.clone(),
        max_rate_hz: settings.max_rate_hz,
        frame_id: settings.frame_id.clone(),
        publish_masks: settings.publish_masks,
        publish_overlay: settings.publish_overlay,
    }));
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [SIGTERM, SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing signal handlers")?;
    }
    match settings.transport {
        Ros2Transport::Dds => dds::run(&settings, &bridge, &stop)?,
        #[cfg(feature = "zenoh")]
        Ros2Transport::Zenoh => zenoh::run(&settings, &bridge, &stop)?,
        #[cfg(not(feature = "zenoh"))]
        Ros2Transport::Zenoh => {
            return Err(ConfigFailure(
                "ros2.transport = \"zenoh\": this build has only the DDS middleware \
                 (built without the `zenoh` feature)"
                    .into(),
            )
            .into())
        }
    }
    let c = &bridge.counters;
    log::info!(
        "stopped: {} results published, {} prompts sent, {} refused, {} dropped",
        c.published.load(Ordering::Relaxed),
        c.prompts_sent.load(Ordering::Relaxed),
        c.prompts_rejected.load(Ordering::Relaxed),
        c.prompts_dropped.load(Ordering::Relaxed)
    );
    Ok(())
}

/// The overlay's topic under the node's: image_transport's `compressed` transport of the base
/// topic `~/overlay`, the name RViz's Image display and `rqt_image_view` subscribe to.
const OVERLAY_TOPIC: &str = "overlay/compressed";

/// One topic's publisher, whatever the middleware.
trait TopicPublisher<M> {
    /// Publish `message`; the error says why not.
    fn send(&self, message: M) -> Result<(), String>;
}

/// The bridge's publishers on one middleware: what [`Bridge::run`] publishes each result to.
struct Publishers<P, Q, R> {
    masks: P,
    detections: Q,
    overlay: Option<R>,
}

impl<P, Q, R> Publish for Publishers<P, Q, R>
where
    P: TopicPublisher<Image>,
    Q: TopicPublisher<Detection2DArray>,
    R: TopicPublisher<CompressedImage>,
{
    fn publish(&self, output: FrameOutput) -> Result<(), String> {
        if let Some(image) = output.label_image {
            self.masks
                .send(image)
                .map_err(|e| format!("~/masks: {e}"))?;
        }
        if let (Some(publisher), Some(image)) = (&self.overlay, output.overlay) {
            publisher
                .send(image)
                .map_err(|e| format!("~/{OVERLAY_TOPIC}: {e}"))?;
        }
        self.detections
            .send(output.detections)
            .map_err(|e| format!("~/detections: {e}"))
    }
}

/// The topics the node publishes, for its start-up log line.
fn published_topics(settings: &Ros2Settings) -> String {
    let private = settings.private_namespace();
    let mut topics = vec![format!("{private}/detections")];
    if settings.publish_masks {
        topics.push(format!("{private}/masks"));
    }
    if settings.publish_overlay {
        topics.push(format!("{private}/{OVERLAY_TOPIC}"));
    }
    topics.join(", ")
}

/// How often a middleware's prompt subscriptions are polled.
const POLL: Duration = Duration::from_millis(10);

/// Run the bridge's daemon link on its own thread, publishing through `publishers`, and call
/// `poll_prompts` every [`POLL`] on this one, until `stop` is set or the link ends.
fn serve(
    bridge: &Bridge,
    stop: &AtomicBool,
    publishers: &(impl Publish + Sync),
    mut poll_prompts: impl FnMut(),
) -> anyhow::Result<()> {
    std::thread::scope(|scope| {
        let daemon = std::thread::Builder::new()
            .name("daemon-link".into())
            .spawn_scoped(scope, move || bridge.run(publishers))
            .context("starting the daemon link")?;
        while !stop.load(Ordering::SeqCst) && !daemon.is_finished() {
            poll_prompts();
            std::thread::sleep(POLL);
        }
        bridge.stop();
        daemon
            .join()
            .map_err(|_| anyhow::anyhow!("the daemon link thread panicked"))
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let under_systemd =
        std::env::var_os("JOURNAL_STREAM").is_some() || std::env::var_os("INVOCATION_ID").is_some();
    let mut logger = env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,rustdds=warn,ros2_client=warn"),
    );
    if under_systemd {
        logger.format_timestamp(None);
    }
    logger.init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tinysam-ros2: error: {}", error_chain(e.as_ref()));
            let config = e
                .chain()
                .any(|c| c.is::<ConfigError>() || c.is::<ConfigFailure>());
            if config {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
