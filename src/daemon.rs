//! Assembles the daemon from validated [`Settings`]: model, source, socket, pipeline, server;
//! and takes it apart again on shutdown. The binary adds signals, logging and systemd.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use crate::camera::{
    CameraRequest, FileSource, FrameSource, Reopening, SyntheticSource, V4l2Opener,
};
use crate::config::{Settings, SourceKind};
use crate::everything::EverythingParams;
use crate::metrics::Counters;
use crate::model::PrecisionChoice;
use crate::pipeline::{Pipeline, PipelineOptions};
use crate::protocol::{
    ClientCounters, ModelInfo, SourceStatus, StageLatency, Status, MAX_SUBSCRIPTIONS,
};
use crate::segmenter::Segmenter;
use crate::server::{self, Server, ServerContext, ServerError};

/// Prompts of up to this many points (with or without a box) have their decoder plans built
/// when the daemon starts, so that no client waits while one is optimised; larger prompts build
/// theirs on first use.
pub const PREPARED_PROMPT_POINTS: usize = 4;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The model directory is missing or invalid.
    #[error("loading the model")]
    Model(#[source] crate::Error),
    /// The source could not be opened.
    #[error("opening the source")]
    Source(#[source] crate::camera::CameraError),
    /// The socket could not be set up.
    #[error(transparent)]
    Socket(#[from] ServerError),
    /// A thread could not be started.
    #[error("starting threads")]
    Threads(#[source] std::io::Error),
}

impl DaemonError {
    /// Whether the configuration is at fault, so that a restart would fail the same way (a
    /// socket group that does not exist): the daemon then exits 78 (systemd's EX_CONFIG).
    pub fn is_configuration(&self) -> bool {
        matches!(self, DaemonError::Socket(ServerError::NoSuchGroup(_)))
    }
}

/// Start-up options beyond the config file.
#[derive(Debug, Clone, Default)]
pub struct DaemonOptions {
    /// Extra encoder time per frame, for backpressure tests and benchmarks.
    pub extra_encode_delay: Option<Duration>,
    /// Do not look for a systemd-passed socket (tests).
    pub ignore_socket_activation: bool,
}

/// A running daemon.
pub struct Daemon {
    pipeline: Pipeline,
    server: Server,
    /// Socket file to remove at exit (`None` when systemd owns it).
    socket_file: Option<PathBuf>,
    everything: Arc<RwLock<EverythingParams>>,
    /// The settings it started with.
    pub settings: Settings,
    /// Set on shutdown.
    pub stop: Arc<AtomicBool>,
}

/// Open the configured source. V4L2 devices are wrapped so that they reopen after failures.
pub fn open_source(
    settings: &Settings,
    stop: Arc<AtomicBool>,
) -> Result<Box<dyn FrameSource>, crate::camera::CameraError> {
    let s = &settings.source_config;
    Ok(match &settings.source {
        SourceKind::Synthetic => Box::new(SyntheticSource::new(s.width, s.height, s.fps, stop)),
        SourceKind::File(path) => Box::new(FileSource::open(path, s.looped, s.fps, stop)?),
        SourceKind::V4l2(device) => {
            let opener = V4l2Opener {
                request: CameraRequest {
                    device: device.clone(),
                    width: s.width,
                    height: s.height,
                    fps: s.fps,
                    format: settings.pixel_format,
                },
            };
            Box::new(Reopening::new(opener, stop))
        }
    })
}

impl Daemon {
    /// Load the model, open the source and the socket, start every thread.
    pub fn start(settings: Settings, options: DaemonOptions) -> Result<Daemon, DaemonError> {
        let stop = Arc::new(AtomicBool::new(false));
        let source = open_source(&settings, stop.clone()).map_err(DaemonError::Source)?;
        Daemon::start_with_source(settings, source, stop, options)
    }

    /// Start on a source opened by the caller (tests pass fake cameras); `stop` must be the
    /// flag the source watches.
    pub fn start_with_source(
        settings: Settings,
        source: Box<dyn FrameSource>,
        stop: Arc<AtomicBool>,
        options: DaemonOptions,
    ) -> Result<Daemon, DaemonError> {
        crate::model::set_threads(settings.threads);
        let segmenter = Segmenter::load(
            &settings.model_dir,
            PrecisionChoice {
                encoder: settings.encoder,
                decoder: settings.decoder,
                int8_matmul: settings.int8_matmul,
                conv_blocks: settings.conv_blocks,
                ..Default::default()
            },
        )
        .map_err(DaemonError::Model)?;
        let started = std::time::Instant::now();
        segmenter
            .model
            .decoder
            .prepare_plans(PREPARED_PROMPT_POINTS)
            .map_err(DaemonError::Model)?;
        log::info!(
            "decoder plans for prompts of up to {PREPARED_PROMPT_POINTS} points (with or without a box) built in {:.2} s",
            started.elapsed().as_secs_f64()
        );
        let segmenter = Arc::new(segmenter);
        let (listener, socket_file) = match (!options.ignore_socket_activation)
            .then(server::listener_from_systemd)
            .flatten()
        {
            Some(l) => {
                log::info!("using the socket passed by systemd");
                (l, None)
            }
            None => {
                let l = server::bind(
                    &settings.socket_path,
                    settings.socket_mode,
                    settings.socket_group.as_deref(),
                )?;
                (l, Some(settings.socket_path.clone()))
            }
        };
        let everything = Arc::new(RwLock::new(settings.everything.clone()));
        let pipeline = Pipeline::start(
            segmenter.clone(),
            source,
            PipelineOptions {
                ring: settings.ring,
                everything: everything.clone(),
                extra_encode_delay: options.extra_encode_delay,
                // One prompt per decoder thread (a one-graph decoder: the batch it would pad
                // that to): everything chunks, and requests of different clients together.
                decoder_batch: segmenter.model.decoder.unpadded_batch(settings.threads),
                subscriptions_per_client: MAX_SUBSCRIPTIONS,
                ..PipelineOptions::default()
            },
            stop.clone(),
        )
        .map_err(DaemonError::Threads)?;
        let model = &segmenter.model;
        let model_info = ModelInfo {
            dir: model.dir.display().to_string(),
            name: model.manifest.model.clone(),
            encoder: model.encoder.precision.to_string(),
            decoder: model.decoder.precision.to_string(),
            image_size: model.encoder.image_size as u32,
            threads: settings.threads as u32,
        };
        let status = {
            let (metrics, ring, hub, info) = (
                pipeline.metrics.clone(),
                pipeline.ring.clone(),
                pipeline.hub.clone(),
                pipeline.source_info.clone(),
            );
            move |request_id: u32| {
                let c = &metrics.counters;
                let span = ring.span();
                Status {
                    request_id,
                    uptime_s: metrics.started.elapsed().as_secs_f64(),
                    source: {
                        let s = info.lock().unwrap_or_else(PoisonError::into_inner).clone();
                        SourceStatus {
                            uri: s.uri,
                            width: s.width,
                            height: s.height,
                            format: s.format,
                            fps: s.fps,
                        }
                    },
                    model: model_info.clone(),
                    fps: metrics.fps(),
                    frames_captured: Counters::get(&c.captured),
                    frames_encoded: Counters::get(&c.encoded),
                    frames_dropped: Counters::get(&c.dropped),
                    frames_skipped: Counters::get(&c.skipped),
                    frames_corrupt: Counters::get(&c.corrupt),
                    camera_reopens: Counters::get(&c.reopens),
                    everything_stopped: Counters::get(&c.everything_stopped),
                    newest_frame: span.map(|s| s.1),
                    oldest_frame: span.map(|s| s.0),
                    stages: metrics
                        .latencies()
                        .into_iter()
                        .map(|l| StageLatency {
                            stage: l.stage.into(),
                            count: l.count,
                            p50_ms: l.p50_ms,
                            p95_ms: l.p95_ms,
                        })
                        .collect(),
                    clients: hub
                        .counters()
                        .into_iter()
                        .map(|c| ClientCounters {
                            client_id: c.id,
                            name: c.name,
                            subscriptions: u32::try_from(c.subscriptions).unwrap_or(u32::MAX),
                            sent: c.sent,
                            dropped: c.dropped,
                            rate_limited: c.rate_limited,
                        })
                        .collect(),
                }
            }
        };
        let server = Server::start(
            listener,
            ServerContext {
                hub: pipeline.hub.clone(),
                requests: pipeline.requests.clone(),
                metrics: pipeline.metrics.clone(),
                status: Arc::new(status),
                max_clients: settings.max_clients,
                queue: settings.queue,
                stall_timeout: settings.stall_timeout,
                idle_timeout: settings.idle_timeout,
                stop: stop.clone(),
            },
        )
        .map_err(DaemonError::Threads)?;
        log::info!(
            "serving on {} (source {})",
            settings.socket_path.display(),
            settings.source_config.uri
        );
        Ok(Daemon {
            pipeline,
            server,
            socket_file,
            everything,
            settings,
            stop,
        })
    }

    /// The pipeline's metrics (for periodic logs).
    pub fn metrics(&self) -> &crate::metrics::Metrics {
        &self.pipeline.metrics
    }

    /// Why a pipeline stage stopped without being asked (a panic, or the stage after it gone),
    /// if one did: the daemon can no longer do its job and should exit non-zero.
    pub fn failure(&self) -> Option<String> {
        self.pipeline.failure.get()
    }

    /// The first pipeline stage that has been inside one piece of work (a frame to encode, a
    /// request, an everything batch) for longer than `limit`, and for how long: the service
    /// watchdog is pinged only while there is none.
    pub fn stalled(&self, limit: Duration) -> Option<(&'static str, Duration)> {
        self.pipeline.stalled(limit)
    }

    /// Clients connected now.
    pub fn client_count(&self) -> usize {
        self.server.client_count()
    }

    /// Apply what can change without a restart (everything-mode parameters, stats interval);
    /// returns the keys that changed but need a restart.
    pub fn reload(&mut self, new: Settings) -> Vec<&'static str> {
        *self
            .everything
            .write()
            .unwrap_or_else(PoisonError::into_inner) = new.everything.clone();
        let old = &self.settings;
        // Every field by name, no `..`: a new setting does not compile until it is sorted into
        // "applied live" or "needs a restart" here (before, `int8_matmul` and `source.loop`
        // changed silently without taking effect).
        let Settings {
            source,
            source_config,
            pixel_format,
            model_dir,
            encoder,
            decoder,
            threads,
            int8_matmul,
            conv_blocks,
            socket_path,
            socket_mode,
            socket_group,
            max_clients,
            queue,
            stall_timeout,
            idle_timeout,
            ring,
            // Applied live, below.
            stats_interval: _,
            everything: _,
        } = &new;
        let mut restart = Vec::new();
        if *source != old.source
            || *source_config != old.source_config
            || *pixel_format != old.pixel_format
        {
            restart.push("source");
        }
        if *model_dir != old.model_dir
            || *encoder != old.encoder
            || *decoder != old.decoder
            || *threads != old.threads
            || *int8_matmul != old.int8_matmul
            || *conv_blocks != old.conv_blocks
        {
            restart.push("model");
        }
        if *socket_path != old.socket_path
            || *socket_mode != old.socket_mode
            || *socket_group != old.socket_group
            || *max_clients != old.max_clients
            || *queue != old.queue
            || *stall_timeout != old.stall_timeout
            || *idle_timeout != old.idle_timeout
        {
            restart.push("socket");
        }
        if *ring != old.ring {
            restart.push("pipeline.ring");
        }
        self.settings.everything = new.everything;
        self.settings.stats_interval = new.stats_interval;
        restart
    }

    /// Stop: close the socket to new clients, let writers flush briefly, remove the socket file.
    /// Returns within about `deadline` even if the encoder is mid-frame.
    pub fn shutdown(self, deadline: Duration) {
        self.stop.store(true, Ordering::Relaxed);
        self.server.stop();
        if let Some(path) = &self.socket_file {
            if let Err(e) = std::fs::remove_file(path) {
                log::warn!("removing {}: {e}", path.display());
            }
        }
        self.server.join(deadline / 2);
        self.pipeline.shutdown(deadline / 2);
    }
}
