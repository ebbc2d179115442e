//! `tinysamd`: the segmentation daemon. Parses flags and the config file, then runs
//! `tinysam_edge::daemon::Daemon` until SIGTERM/SIGINT; SIGHUP reloads the config where safe.
//! Exit codes: 0 clean stop, 1 start-up failure (model, camera, socket), 78 bad configuration.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tinysam_edge::config::{Config, ConfigError, Settings, SourceKind};
use tinysam_edge::daemon::{Daemon, DaemonError, DaemonOptions};
use tinysam_edge::error_chain;

/// systemd's EX_CONFIG: the unit does not restart on it (RestartPreventExitStatus=78).
const EXIT_CONFIG: u8 = 78;

/// Promptable segmentation daemon: camera → TinySAM (tract) → masks on a Unix socket.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Args {
    /// TOML config file (keys: docs/config.md, example: systemd/config.toml).
    #[arg(long, env = "TINYSAMD_CONFIG")]
    config: Option<PathBuf>,
    /// Frame source: synthetic, file:PATH (image or directory), v4l2:/dev/videoN.
    #[arg(long)]
    source: Option<String>,
    /// Unix socket path.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Model directory (manifest.json + ONNX files).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Frame width asked of the source.
    #[arg(long)]
    width: Option<u32>,
    /// Frame height asked of the source.
    #[arg(long)]
    height: Option<u32>,
    /// Capture rate cap (0: as fast as the source goes).
    #[arg(long)]
    fps: Option<f32>,
    /// V4L2 pixel format: auto, mjpeg, yuyv, nv12, rgb24.
    #[arg(long)]
    format: Option<String>,
    /// Play a file source once instead of looping.
    #[arg(long)]
    once: bool,
    /// Encoder precision: auto, int8, fp32.
    #[arg(long)]
    encoder: Option<String>,
    /// Decoder precision: auto, int8, fp32.
    #[arg(long)]
    decoder: Option<String>,
    /// Inference threads (0: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Embeddings kept for prompts that name a recent frame.
    #[arg(long)]
    ring: Option<usize>,
    /// Seconds between metric lines in the log (0: never).
    #[arg(long)]
    stats_interval: Option<f32>,
    /// Validate the configuration, print it, and exit.
    #[arg(long)]
    check_config: bool,
    /// List V4L2 capture devices and their formats, and exit.
    #[arg(long)]
    list_cameras: bool,
}

impl Args {
    /// The config file with the flags applied on top.
    fn config(&self) -> Result<Config, ConfigError> {
        let mut c = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        let s = &mut c.source;
        if let Some(v) = &self.source {
            s.uri = v.clone();
        }
        if let Some(v) = self.width {
            s.width = v;
        }
        if let Some(v) = self.height {
            s.height = v;
        }
        if let Some(v) = self.fps {
            s.fps = v;
        }
        if let Some(v) = &self.format {
            s.format = v.clone();
        }
        if self.once {
            s.looped = false;
        }
        if let Some(v) = &self.socket {
            c.socket.path = v.clone();
        }
        if let Some(v) = &self.model {
            c.model.dir = v.clone();
        }
        if let Some(v) = &self.encoder {
            c.model.encoder = v.clone();
        }
        if let Some(v) = &self.decoder {
            c.model.decoder = v.clone();
        }
        if let Some(v) = self.threads {
            c.model.threads = v;
        }
        if let Some(v) = self.ring {
            c.pipeline.ring = v;
        }
        if let Some(v) = self.stats_interval {
            c.pipeline.stats_interval_s = v;
        }
        Ok(c)
    }

    fn settings(&self) -> Result<Settings, ConfigError> {
        self.config()?.validate()
    }
}

fn init_logging() {
    let under_systemd =
        std::env::var_os("JOURNAL_STREAM").is_some() || std::env::var_os("INVOCATION_ID").is_some();
    let mut builder =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    if under_systemd {
        // journald stamps every line itself.
        builder.format_timestamp(None);
    }
    builder.init();
}

fn notify(states: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(states) {
            log::warn!("sd_notify: {e}");
        }
    }
}

fn list_cameras() {
    let cameras = tinysam_edge::camera::list_cameras();
    if cameras.is_empty() {
        println!("no V4L2 capture devices found");
    }
    for c in cameras {
        println!("{}  {}", c.path.display(), c.name);
        for f in c.formats {
            println!("    {f}");
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let (config, settings) = match args.config().and_then(|c| c.validate().map(|s| (c, s))) {
        Ok(both) => both,
        Err(e) => return Err(anyhow::Error::new(e).context(ConfigFailure)),
    };
    if args.check_config {
        return check_config(config, &settings);
    }
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("installing signal handlers")?;
    let (sig_tx, sig_rx) = crossbeam_channel::unbounded();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for s in signals.forever() {
                if sig_tx.send(s).is_err() {
                    break;
                }
            }
        })
        .context("starting the signal thread")?;
    let mut daemon = Daemon::start(settings, DaemonOptions::default())?;
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("serving"),
    ]);
    let watchdog = sd_notify::watchdog_enabled();
    let tick = watchdog
        .map(|w| w / 2)
        .unwrap_or(Duration::from_secs(1))
        .min(Duration::from_secs(1));
    let mut last_stats = Instant::now();
    let mut stall_reported = false;
    loop {
        match sig_rx.recv_timeout(tick) {
            Ok(SIGHUP) => {
                notify(&[sd_notify::NotifyState::Reloading]);
                match args.settings() {
                    Ok(new) => {
                        let restart = daemon.reload(new);
                        if restart.is_empty() {
                            log::info!("configuration reloaded");
                        } else {
                            log::warn!(
                                "configuration reloaded; changes to {} take effect after a restart",
                                restart.join(", ")
                            );
                        }
                    }
                    Err(e) => log::error!(
                        "reload refused, keeping the running config: {}",
                        error_chain(&e)
                    ),
                }
                notify(&[sd_notify::NotifyState::Ready]);
            }
            Ok(sig) => {
                log::info!("signal {sig}: stopping");
                notify(&[sd_notify::NotifyState::Stopping]);
                daemon.shutdown(Duration::from_millis(800));
                return Ok(());
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                daemon.shutdown(Duration::from_millis(800));
                return Ok(());
            }
        }
        if let Some(why) = daemon.failure() {
            // A stage that died cannot come back in-process; exit non-zero so that systemd
            // restarts the service (and stop pinging its watchdog).
            notify(&[
                sd_notify::NotifyState::Stopping,
                sd_notify::NotifyState::Status("a pipeline stage failed"),
            ]);
            daemon.shutdown(Duration::from_millis(800));
            anyhow::bail!("pipeline stage {why}; exiting so that the service restarts");
        }
        if let Some(interval) = watchdog {
            // Pinged only while every stage gets on with its work: a hung encoder or mask
            // worker then gets the service restarted by systemd.
            match daemon.stalled(interval) {
                None => {
                    if stall_reported {
                        log::info!("the pipeline makes progress again; watchdog pings resume");
                        stall_reported = false;
                    }
                    notify(&[sd_notify::NotifyState::Watchdog]);
                }
                Some((stage, how_long)) if !stall_reported => {
                    log::error!(
                        "pipeline stage {stage} has made no progress for {:.1} s (watchdog \
                         interval {:.1} s): no more watchdog pings, so systemd restarts the service",
                        how_long.as_secs_f32(),
                        interval.as_secs_f32()
                    );
                    notify(&[sd_notify::NotifyState::Status(
                        "a pipeline stage is stalled",
                    )]);
                    stall_reported = true;
                }
                Some(_) => {}
            }
        }
        if let Some(every) = daemon.settings.stats_interval {
            if last_stats.elapsed() >= every {
                last_stats = Instant::now();
                log::info!(
                    "{} clients; {}",
                    daemon.client_count(),
                    daemon.metrics().summary()
                );
            }
        }
    }
}

/// `--check-config`: what a start would fail on, checked without starting (the model's files
/// and their SHA-256, the source's path, the socket's group), then the effective configuration
/// as TOML. Any problem is a configuration failure (exit 78).
fn check_config(mut effective: Config, settings: &Settings) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    let mut checked = Vec::new();
    let choice = tinysam_edge::model::PrecisionChoice {
        encoder: settings.encoder,
        decoder: settings.decoder,
        int8_matmul: settings.int8_matmul,
        conv_blocks: settings.conv_blocks,
        ..Default::default()
    };
    match tinysam_edge::model::verify_files(&settings.model_dir, &choice) {
        Ok(m) => checked.push(format!(
            "model {} in {}: encoder {}, decoder {}; {} files match their SHA-256",
            m.model,
            settings.model_dir.display(),
            m.encoder,
            m.decoder,
            m.files.len()
        )),
        Err(e) => problems.push(format!("[model] dir: {}", error_chain(&e))),
    }
    match &settings.source {
        SourceKind::Synthetic => checked.push("source: the synthetic test pattern".into()),
        SourceKind::File(p) | SourceKind::V4l2(p) => match std::fs::metadata(p) {
            Ok(_) => checked.push(format!("source {} exists", p.display())),
            Err(e) => problems.push(format!("[source] uri: {}: {e}", p.display())),
        },
    }
    if let Some(group) = &settings.socket_group {
        match nix::unistd::Group::from_name(group) {
            Ok(Some(_)) => checked.push(format!("socket group {group} exists")),
            Ok(None) => problems.push(format!("[socket] group: no group named {group:?}")),
            Err(e) => problems.push(format!("[socket] group: looking up {group:?}: {e}")),
        }
    }
    // The file with the flags applied, paths as resolved.
    effective.model.dir = settings.model_dir.clone();
    effective.socket.path = settings.socket_path.clone();
    let toml = toml::to_string(&effective).context("writing the configuration as TOML")?;
    if problems.is_empty() {
        println!("configuration is valid");
    } else {
        println!("configuration has {} problem(s)", problems.len());
    }
    for line in &checked {
        println!("  ok: {line}");
    }
    for line in &problems {
        println!("  problem: {line}");
    }
    println!("\n# effective configuration (file, then flags; empty paths resolved)\n{toml}");
    if problems.is_empty() {
        Ok(())
    } else {
        Err(anyhow::anyhow!("{}", problems.join("; ")).context(ConfigFailure))
    }
}

/// Marks a configuration error for the exit code.
#[derive(Debug)]
struct ConfigFailure;

impl std::fmt::Display for ConfigFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("invalid configuration")
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.list_cameras {
        list_cameras();
        return ExitCode::SUCCESS;
    }
    init_logging();
    let tuning = tinysam_edge::allocator::keep_freed_memory();
    log::debug!("allocator: {tuning:?}");
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A missing socket group is the configuration's fault too: exit 78, so that
            // systemd does not restart into the same failure every 2 s.
            let config = e.is::<ConfigFailure>()
                || e.chain().any(|c| {
                    c.is::<ConfigError>()
                        || c.downcast_ref::<DaemonError>()
                            .is_some_and(DaemonError::is_configuration)
                });
            eprintln!("tinysamd: error: {}", error_chain(e.as_ref()));
            if config {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
