//! The daemon's threads and channels: capture → encoder → mask worker → subscribers.
//!
//! Queues between stages hold one item with latest-frame-wins semantics ([`crate::latest`]): a
//! new frame replaces the one still waiting, so the encoder always works on the newest frame and
//! nothing backs up (the replaced frames are counted). Encoded frames go into an
//! [`EmbeddingRing`] so that a prompt for a recent frame is answered against that frame. The
//! [`Hub`] holds the subscribers; the [`RequestQueue`] the prompt requests, served in turn.

use std::cell::RefCell;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::select;

use crate::camera::{Frame, FrameSource, SourceInfo};
use crate::error_chain;
use crate::everything::{EverythingParams, Generator, Progress};
use crate::heartbeat::{first_stalled, Heartbeat, Working};
use crate::hub::{
    Failure, FailureKind, FrameMeta, Hub, MaskBatch, Outbound, Subscription, SubscriptionKind,
    DEFAULT_SUBSCRIPTIONS_PER_CLIENT,
};
use crate::latest::{LatestReceiver, LatestSender};
use crate::metrics::{Counters, Metrics, Stage};
use crate::picture::FramePicture;
use crate::postprocess::MaskResult;
use crate::prompt::Prompt;
use crate::ring::{EmbeddingRing, EncodedFrame};
use crate::scheduler::{ClientId, EncoderYield, PromptJob, RequestQueue};
use crate::segmenter::{MaskSelection, Segmenter};

/// The first reason a pipeline stage stopped without being asked to: a panic, or the stage after
/// it gone. The daemon polls it and exits non-zero, so that systemd restarts it, instead of
/// serving on with a capture thread that feeds nobody.
#[derive(Debug, Default)]
pub struct StageFailure(Mutex<Option<String>>);

impl StageFailure {
    fn record(&self, why: String) {
        let mut first = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if first.is_none() {
            *first = Some(why);
        }
    }

    /// Why a stage failed, if one did.
    pub fn get(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Run `body` as the pipeline stage `name` on a thread of its own. An `Err` or a panic, unless
/// `stop` was set (at shutdown the stages end in any order), is logged and recorded in `failure`.
fn spawn_stage(
    name: &'static str,
    failure: Arc<StageFailure>,
    stop: Arc<AtomicBool>,
    body: impl FnOnce() -> Result<(), String> + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let why = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
                Ok(Ok(())) => return,
                Ok(Err(why)) => why,
                Err(panic) => format!("panicked: {}", crate::panic_message(&*panic)),
            };
            if !stop.load(Ordering::Relaxed) {
                log::error!("pipeline stage {name} stopped: {why}");
                failure.record(format!("{name}: {why}"));
            }
        })
}

/// Prompt requests one client may have waiting (the protocol's `busy` past it).
pub const DEFAULT_REQUESTS_PER_CLIENT: usize = 8;

/// Prompts decoded together, unless the pipeline is told otherwise (the daemon asks its
/// decoder, [`crate::model::Decoder::unpadded_batch`]): an everything pass's chunk between two
/// looks at the request queue (a request waits for at most this many prompts of a pass instead
/// of the whole pass), and the most prompts of different clients' requests decoded together.
/// Decoding runs one prompt per thread at a time whatever the batch, so a chunk of one prompt
/// per thread costs nothing per prompt, and a request waits for at most one prompt's decoding
/// per thread (~40 ms on the default model).
/// Measured with `benches/daemon_scheduling.py` (2 threads, a request beside 3 everything
/// subscribers, the encoder yielding to requests): p50 242 ms with chunks of 16 prompts, 98 ms
/// with 4, 51 ms with 2.
pub const DEFAULT_DECODER_BATCH: usize = 2;

/// Knobs of a pipeline.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// Embedding ring size.
    pub ring: usize,
    /// Prompt requests of all clients waiting before a client gets `busy`.
    pub request_queue: usize,
    /// Prompt requests of one client waiting before it gets `busy`.
    pub requests_per_client: usize,
    /// Subscriptions one client may hold.
    pub subscriptions_per_client: usize,
    /// Prompts decoded together: an everything pass's chunk between two looks at the request
    /// queue, and the most prompts of a turn of requests of different clients (no result
    /// depends on it).
    pub decoder_batch: usize,
    /// Segment-everything parameters (changed on reload).
    pub everything: Arc<RwLock<EverythingParams>>,
    /// Extra time the encoder spends per frame: for backpressure tests and benchmarks only.
    pub extra_encode_delay: Option<Duration>,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            ring: 4,
            request_queue: 64,
            requests_per_client: DEFAULT_REQUESTS_PER_CLIENT,
            subscriptions_per_client: DEFAULT_SUBSCRIPTIONS_PER_CLIENT,
            decoder_batch: DEFAULT_DECODER_BATCH,
            everything: Arc::default(),
            extra_encode_delay: None,
        }
    }
}

/// The running pipeline.
pub struct Pipeline {
    /// Subscribers.
    pub hub: Arc<Hub>,
    /// Recent embeddings.
    pub ring: Arc<EmbeddingRing>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Prompt requests waiting for the mask worker.
    pub requests: Arc<RequestQueue>,
    /// The source as it last described itself.
    pub source_info: Arc<Mutex<SourceInfo>>,
    /// Set to stop every thread.
    pub stop: Arc<AtomicBool>,
    /// Why a stage stopped on its own, if one did.
    pub failure: Arc<StageFailure>,
    /// The encoder's and the mask worker's progress, for the service watchdog. (Capture has
    /// none: its waits are the camera's, and a camera that stops is reopened, not restarted.)
    pub heartbeats: [Arc<Heartbeat>; 2],
    threads: Vec<JoinHandle<()>>,
}

impl Pipeline {
    /// Start the capture, encoder and mask-worker threads.
    pub fn start(
        segmenter: Arc<Segmenter>,
        source: Box<dyn FrameSource>,
        options: PipelineOptions,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<Pipeline> {
        let hub = Arc::new(Hub::new(options.subscriptions_per_client));
        let ring = Arc::new(EmbeddingRing::new(options.ring));
        let metrics = Arc::new(Metrics::new());
        let source_info = Arc::new(Mutex::new(source.info()));
        let (frame_tx, frame_rx) = LatestSender::channel();
        let (encoded_tx, encoded_rx) = LatestSender::channel();
        let requests = Arc::new(RequestQueue::new(
            options.requests_per_client,
            options.request_queue,
        ));

        let cores = Arc::new(EncoderYield::default());
        let failure = Arc::new(StageFailure::default());
        let encoder_beat = Arc::new(Heartbeat::new("encoder"));
        let worker_beat = Arc::new(Heartbeat::new("masks"));
        type StageBody = Box<dyn FnOnce() -> Result<(), String> + Send>;
        let stage = |name: &'static str, body: StageBody| {
            spawn_stage(name, failure.clone(), stop.clone(), body)
        };
        let capture = {
            let (metrics, info, stop) = (metrics.clone(), source_info.clone(), stop.clone());
            stage(
                "capture",
                Box::new(move || capture_loop(source, frame_tx, &metrics, &info, &stop)),
            )?
        };
        let encoder = {
            let encoder = Encoder {
                segmenter: segmenter.clone(),
                ring: ring.clone(),
                metrics: metrics.clone(),
                heartbeat: encoder_beat.clone(),
                cores: cores.clone(),
                extra_delay: options.extra_encode_delay,
            };
            let stop = stop.clone();
            stage(
                "encoder",
                Box::new(move || encoder.run(frame_rx, encoded_tx, &stop)),
            )?
        };
        let worker = {
            let (hub, metrics, ring, stop) =
                (hub.clone(), metrics.clone(), ring.clone(), stop.clone());
            let everything = options.everything.clone();
            let worker = MaskWorker {
                segmenter,
                hub,
                ring,
                metrics,
                everything,
                decoder_batch: options.decoder_batch.max(1),
                requests: requests.clone(),
                heartbeat: worker_beat.clone(),
                cores,
            };
            stage("masks", Box::new(move || worker.run(encoded_rx, &stop)))?
        };
        Ok(Pipeline {
            hub,
            ring,
            metrics,
            requests,
            source_info,
            stop,
            failure,
            heartbeats: [encoder_beat, worker_beat],
            threads: vec![capture, encoder, worker],
        })
    }

    /// The first stage that has been inside one piece of work for longer than `limit` without
    /// progress, and for how long (see [`crate::heartbeat`]).
    pub fn stalled(&self, limit: Duration) -> Option<(&'static str, Duration)> {
        first_stalled(self.heartbeats.iter().map(|h| &**h), limit, Instant::now())
    }

    /// Stop the threads and wait up to `deadline` for them (an encoder mid-frame is left to
    /// finish on its own: the process may exit under it).
    pub fn shutdown(self, deadline: Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let until = Instant::now() + deadline;
        for t in self.threads {
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// What the capture loop does after frames that do not decode: nothing for the first few in
/// a row (a camera's occasional bad frame costs no time), then waits that double from
/// [`CorruptBackoff::FIRST`] up to [`CorruptBackoff::MAX`], so that a source with nothing
/// decodable (a folder of broken files at `--fps 0`, a camera sending garbage) does not spin; one
/// log line says so when the waits start, and one when a frame decodes again.
#[derive(Debug, Default)]
struct CorruptBackoff {
    /// Bad frames since the last good one.
    in_a_row: u32,
    /// The next wait, once waiting has started.
    wait: Option<Duration>,
}

impl CorruptBackoff {
    /// Bad frames in a row before the first wait.
    const TOLERATED: u32 = 3;
    const FIRST: Duration = Duration::from_millis(20);
    const MAX: Duration = Duration::from_secs(1);

    fn decoded(&mut self) {
        if self.wait.is_some() {
            log::info!(
                "source decodes again after {} bad frames in a row",
                self.in_a_row
            );
        }
        *self = CorruptBackoff::default();
    }

    /// After a bad frame: wait if it is one too many in a row (waking early on `stop`).
    fn failed(&mut self, stop: &AtomicBool) {
        self.in_a_row = self.in_a_row.saturating_add(1);
        if self.in_a_row < Self::TOLERATED {
            return;
        }
        let wait = match self.wait {
            Some(w) => (w * 2).min(Self::MAX),
            None => {
                log::warn!(
                    "{} bad frames in a row: waiting between tries (up to {:?})",
                    self.in_a_row,
                    Self::MAX
                );
                Self::FIRST
            }
        };
        self.wait = Some(wait);
        crate::camera::sleep_until(Instant::now() + wait, stop);
    }
}

/// Frames from `source` to the encoder until `stop` or the source ends; `Err` if the encoder is
/// gone.
fn capture_loop(
    mut source: Box<dyn FrameSource>,
    out: LatestSender<Frame>,
    metrics: &Metrics,
    info: &Mutex<SourceInfo>,
    stop: &AtomicBool,
) -> Result<(), String> {
    let c = &metrics.counters;
    let mut last_size = (0, 0);
    let mut backoff = CorruptBackoff::default();
    while !stop.load(Ordering::Relaxed) {
        let next = source.next_frame();
        c.reopens.store(source.reopens(), Ordering::Relaxed);
        match next {
            Ok(Some(frame)) => {
                backoff.decoded();
                // Capture latency: from the capture timestamp until the RGB frame is ready
                // (driver queue + dequeue + conversion); pacing waits are not part of it.
                let lag_ns = crate::monotonic_now_ns().saturating_sub(frame.captured_ns);
                metrics.record(Stage::Capture, Duration::from_nanos(lag_ns));
                metrics.record(Stage::Convert, frame.convert);
                Counters::bump(&c.captured);
                log::trace!("frame {} captured", frame.seq);
                if frame.image.dimensions() != last_size {
                    last_size = frame.image.dimensions();
                    *info.lock().unwrap_or_else(PoisonError::into_inner) = source.info();
                }
                match out.send(frame) {
                    Some(replaced) => {
                        c.dropped.fetch_add(replaced, Ordering::Relaxed);
                    }
                    None => return Err("the encoder takes no more frames".into()),
                }
            }
            Ok(None) => {
                if !stop.load(Ordering::Relaxed) {
                    log::info!("source ended; clients stay connected and the ring stays available");
                }
                break;
            }
            Err(e) if e.is_frame_error() => {
                let n = c.corrupt.fetch_add(1, Ordering::Relaxed) + 1;
                // Every bad frame is counted; the log gets the first ten and every 100th.
                if n <= 10 || n.is_multiple_of(100) {
                    log::warn!("{} (corrupt frames so far: {n})", error_chain(&e));
                }
                backoff.failed(stop);
            }
            Err(e) => {
                log::error!("source failed: {}", error_chain(&e));
                break;
            }
        }
    }
    Ok(())
}

/// Turns frames into embeddings, kept in the ring and handed to the mask worker.
struct Encoder {
    segmenter: Arc<Segmenter>,
    ring: Arc<EmbeddingRing>,
    metrics: Arc<Metrics>,
    heartbeat: Arc<Heartbeat>,
    /// Where the encoder gives the cores to prompt requests.
    cores: Arc<EncoderYield>,
    /// Extra time per frame (tests and benchmarks).
    extra_delay: Option<Duration>,
}

impl Encoder {
    /// Frames to embeddings until `stop` or the capture ends; `Err` if the mask worker is gone.
    fn run(
        &self,
        frames: LatestReceiver<Frame>,
        out: LatestSender<Arc<EncodedFrame>>,
        stop: &AtomicBool,
    ) -> Result<(), String> {
        let Encoder {
            segmenter,
            ring,
            metrics,
            heartbeat,
            cores,
            extra_delay,
        } = self;
        // How long the last frame's encoding took: the most the encoder waits for requests in
        // one frame, so that a stream of requests halves the frame rate at worst.
        let mut last_encode = FIRST_YIELD_BUDGET;
        while !stop.load(Ordering::Relaxed) {
            let frame = match frames.recv_timeout(Duration::from_millis(100)) {
                Ok(f) => f,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            };
            let _working = heartbeat.working();
            let started = Instant::now();
            let input = match segmenter.preprocess(&frame.image) {
                Ok(i) => i,
                Err(e) => {
                    log::error!("frame {}: {}", frame.seq, error_chain(&e));
                    continue;
                }
            };
            metrics.record(Stage::Preprocess, started.elapsed());
            let started = Instant::now();
            let mut budget = last_encode;
            let mut yielded = Duration::ZERO;
            // Between two ops: wait while a request is decoded; give up the frame on `stop` (a
            // daemon that is stopping does not finish a frame nobody will get).
            let mut between_ops = || {
                if !budget.is_zero() {
                    let waited = cores.wait_while_urgent(budget);
                    budget = budget.saturating_sub(waited);
                    yielded += waited;
                }
                !stop.load(Ordering::Relaxed)
            };
            let embedding = match segmenter.encode_between_ops(input, &mut between_ops) {
                Ok(e) => e,
                Err(crate::Error::Stopped { .. }) => break,
                Err(e) => {
                    log::error!("frame {}: {}", frame.seq, error_chain(&e));
                    continue;
                }
            };
            // The decoder's per-frame work belongs to the frame, not to its first prompt.
            if let Err(e) = segmenter.model.decoder.prepare(&embedding) {
                log::warn!(
                    "frame {}: decoder per-frame tensors: {} (computed again at the first prompt)",
                    frame.seq,
                    error_chain(&e)
                );
            }
            last_encode = started.elapsed().saturating_sub(yielded);
            if let Some(d) = extra_delay {
                std::thread::sleep(*d);
            }
            metrics.record(Stage::Encode, started.elapsed());
            let (width, height) = frame.image.dimensions();
            let encoded = Arc::new(EncodedFrame {
                seq: frame.seq,
                captured_ns: frame.captured_ns,
                width,
                height,
                embedding,
                picture: Arc::new(FramePicture::new(frame.image)),
            });
            ring.push(encoded.clone());
            metrics.frame_encoded();
            log::trace!("frame {} encoded", frame.seq);
            match out.send(encoded) {
                Some(replaced) => {
                    metrics
                        .counters
                        .skipped
                        .fetch_add(replaced, Ordering::Relaxed);
                }
                None => return Err("the mask worker takes no more embeddings".into()),
            }
        }
        Ok(())
    }
}

/// The most the encoder waits for prompt requests while it encodes its first frame; later
/// frames wait at most as long as the frame before took to encode.
const FIRST_YIELD_BUDGET: Duration = Duration::from_secs(1);

/// Turns embeddings into masks for subscriptions and requests.
struct MaskWorker {
    segmenter: Arc<Segmenter>,
    hub: Arc<Hub>,
    ring: Arc<EmbeddingRing>,
    metrics: Arc<Metrics>,
    everything: Arc<RwLock<EverythingParams>>,
    /// Prompts decoded together (see [`PipelineOptions::decoder_batch`]).
    decoder_batch: usize,
    requests: Arc<RequestQueue>,
    heartbeat: Arc<Heartbeat>,
    /// Takes the cores from the encoder while a request is decoded.
    cores: Arc<EncoderYield>,
}

impl MaskWorker {
    /// Until `stop`. Priorities: prompt requests (clients in turn), then the standing prompts
    /// of the newest frame, then everything passes, in chunks: between two chunks the requests
    /// that arrived meanwhile are answered and the standing prompts of a newer frame served.
    fn run(
        &self,
        frames: LatestReceiver<Arc<EncodedFrame>>,
        stop: &AtomicBool,
    ) -> Result<(), String> {
        let mut frames_open = true;
        while !stop.load(Ordering::Relaxed) {
            // Requests first: a client waiting for an answer beats the next frame.
            let jobs = self.requests.pop_turn(self.decoder_batch);
            if !jobs.is_empty() {
                let working = self.heartbeat.working();
                self.answer(jobs);
                self.answer_waiting(&working);
                continue;
            }
            let never = crossbeam_channel::never();
            let frames_rx = if frames_open { &*frames } else { &never };
            select! {
                recv(self.requests.bell()) -> _ => {}
                recv(frames_rx) -> frame => match frame {
                    Ok(frame) => {
                        let working = self.heartbeat.working();
                        self.publish_prompts(&frame, &working);
                        self.publish_everything(frame, &frames, &working);
                    }
                    Err(_) => frames_open = false,
                },
                default(Duration::from_millis(100)) => {}
            }
        }
        self.requests.close();
        Ok(())
    }

    /// Answer every request waiting now, clients in turn, beating after each turn.
    fn answer_waiting(&self, working: &Working<'_>) {
        loop {
            let jobs = self.requests.pop_turn(self.decoder_batch);
            if jobs.is_empty() {
                return;
            }
            self.answer(jobs);
            working.beat();
        }
    }

    fn segment(
        &self,
        frame: &EncodedFrame,
        prompts: &[Prompt],
        multimask: bool,
    ) -> crate::Result<Vec<crate::segmenter::PromptOutcome>> {
        let started = Instant::now();
        let selection = if multimask {
            MaskSelection::All
        } else {
            MaskSelection::Best
        };
        let out = self.segmenter.segment(&frame.embedding, prompts, selection);
        self.metrics.record(Stage::Decode, started.elapsed());
        out
    }

    fn meta(frame: &EncodedFrame) -> FrameMeta {
        FrameMeta {
            seq: frame.seq,
            captured_ns: frame.captured_ns,
            width: frame.width,
            height: frame.height,
        }
    }

    /// Answer one turn of requests (one per client, [`RequestQueue::pop_turn`]): those on the
    /// same frame with the same mask selection are decoded together, so that two clients'
    /// prompts run side by side on the inference threads (the split decoder decodes one prompt
    /// per thread) instead of one after the other. Rows of a batch are independent: each
    /// request gets the masks it would get alone.
    fn answer(&self, jobs: Vec<PromptJob>) {
        // (frame, multimask, requests)
        let mut groups: Vec<(Arc<EncodedFrame>, bool, Vec<PromptJob>)> = Vec::new();
        for job in jobs {
            // A client that has gone waits for nothing: its queued requests are skipped, not
            // run (a flood of requests from a client that then left kept the decoder busy for
            // ~45 s).
            if !self.hub.is_connected(job.client) {
                log::debug!(
                    "request {} of client {}: the client has gone; skipped",
                    job.request_id,
                    job.client
                );
                continue;
            }
            match self.ring.get(job.frame_seq) {
                Ok(frame) => {
                    let same = groups.iter_mut().find(|(f, multimask, _)| {
                        f.seq == frame.seq && *multimask == job.multimask
                    });
                    match same {
                        Some((_, _, group)) => group.push(job),
                        None => groups.push((frame, job.multimask, vec![job])),
                    }
                }
                Err(miss) => self
                    .hub
                    .answer(job.client, Outbound::Failed(miss.failure(job.request_id))),
            }
        }
        for (frame, multimask, group) in groups {
            let all: Vec<Prompt> = group
                .iter()
                .flat_map(|j| j.prompts.iter().cloned())
                .collect();
            let decoded = {
                let _urgent = self.cores.urgent();
                self.segment(&frame, &all, multimask)
            };
            match decoded {
                Ok(outcomes) => {
                    let mut outcomes = outcomes.into_iter();
                    for job in group {
                        let mine: Vec<_> = outcomes.by_ref().take(job.prompts.len()).collect();
                        let reply = MaskWorker::reply(&job, &frame, mine);
                        self.hub.answer(job.client, reply);
                    }
                }
                Err(e) => {
                    log::error!(
                        "requests {:?}: {}",
                        group.iter().map(|j| j.request_id).collect::<Vec<_>>(),
                        error_chain(&e)
                    );
                    for job in group {
                        self.hub.answer(
                            job.client,
                            Outbound::Failed(Failure {
                                id: Some(job.request_id),
                                kind: FailureKind::Internal,
                                message: error_chain(&e),
                            }),
                        );
                    }
                }
            }
        }
    }

    /// The reply to `job` from its prompts' outcomes: the masks, with the prompts refused on
    /// their own listed; an error when every prompt was refused.
    fn reply(
        job: &PromptJob,
        frame: &EncodedFrame,
        outcomes: Vec<crate::segmenter::PromptOutcome>,
    ) -> Outbound {
        let (mut masks, mut refused) = (Vec::new(), Vec::new());
        for (i, outcome) in (0u32..).zip(outcomes) {
            match outcome {
                Ok(ms) => masks.extend(ms.into_iter().map(|m| (i, m))),
                Err(e) => refused.push((i, e.to_string())),
            }
        }
        if !refused.is_empty() && refused.len() == job.prompts.len() {
            let why: Vec<String> = refused
                .iter()
                .map(|(i, e)| format!("prompt {i}: {e}"))
                .collect();
            Outbound::Failed(Failure {
                id: Some(job.request_id),
                kind: FailureKind::InvalidPrompt,
                message: why.join("; "),
            })
        } else {
            Outbound::Masks(MaskBatch {
                subscription: None,
                request_id: Some(job.request_id),
                frame: MaskWorker::meta(frame),
                masks: Arc::new(masks),
                encoding: job.encoding,
                refused,
                picture: job.frames.then(|| frame.picture.clone()),
            })
        }
    }

    /// The standing prompts due on `frame`, all subscribers' prompts decoded together per mask
    /// selection; `working` beats after each group, and waiting requests go first.
    fn publish_prompts(&self, frame: &EncodedFrame, working: &Working<'_>) {
        let due = self.hub.due(Instant::now(), SubscriptionKind::Prompts);
        if due.is_empty() {
            return;
        }
        let meta = MaskWorker::meta(frame);
        for multimask in [false, true] {
            let group: Vec<&(ClientId, Subscription)> = due
                .iter()
                .filter(|(_, s)| s.multimask == multimask)
                .collect();
            if group.is_empty() {
                continue;
            }
            let all: Vec<Prompt> = group
                .iter()
                .flat_map(|(_, s)| s.prompts.iter().cloned())
                .collect();
            let outcomes = match self.segment(frame, &all, multimask) {
                Ok(o) => o,
                Err(e) => {
                    log::error!("frame {}: {}", frame.seq, error_chain(&e));
                    return;
                }
            };
            working.beat();
            self.answer_waiting(working);
            let mut outcomes = outcomes.into_iter();
            for (client, sub) in group {
                let mut masks = Vec::new();
                let mut refused = None;
                for (i, outcome) in outcomes.by_ref().take(sub.prompts.len()).enumerate() {
                    match outcome {
                        Ok(ms) => masks.extend(ms.into_iter().map(|m| (i as u32, m))),
                        Err(e) => refused = refused.or(Some(format!("prompt {i}: {e}"))),
                    }
                }
                if let Some(msg) = refused {
                    if self.hub.mark_invalid(*client, sub.id) {
                        self.hub.deliver(
                            *client,
                            Outbound::Failed(Failure {
                                id: Some(sub.id),
                                kind: FailureKind::InvalidPrompt,
                                message: msg,
                            }),
                        );
                    }
                }
                self.hub.deliver(
                    *client,
                    Outbound::Masks(MaskBatch {
                        subscription: Some(sub.id),
                        request_id: None,
                        frame: meta,
                        masks: Arc::new(masks),
                        encoding: sub.encoding,
                        refused: Vec::new(),
                        picture: sub.frames.then(|| frame.picture.clone()),
                    }),
                );
            }
        }
    }

    /// The everything passes due on `frame`: one pass for all its subscribers, in chunks. Between
    /// two chunks go, in this order, the requests waiting, the standing prompts of a frame that
    /// arrived meanwhile (so that a pass of seconds does not hold them back), and a beat. A pass
    /// stops when every subscriber it was for has left or unsubscribed. When a newer frame came
    /// during the pass, the next pass runs on it (its standing prompts were served already).
    fn publish_everything(
        &self,
        frame: Arc<EncodedFrame>,
        frames: &LatestReceiver<Arc<EncodedFrame>>,
        working: &Working<'_>,
    ) {
        let mut next = Some(frame);
        while let Some(frame) = next.take() {
            let due = self.hub.due(Instant::now(), SubscriptionKind::Everything);
            if due.is_empty() {
                return;
            }
            let params = self
                .everything
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            let params = EverythingParams {
                points_per_batch: params.points_per_batch.min(self.decoder_batch),
                ..params
            };
            let newer: RefCell<Option<Arc<EncodedFrame>>> = RefCell::new(None);
            let between_batches = |_: Progress| {
                self.answer_waiting(working);
                if let Some(f) = self.serve_newer_frame(frames, working) {
                    *newer.borrow_mut() = Some(f);
                }
                working.beat();
                if due.iter().any(|(c, s)| self.hub.is_subscribed(*c, s.id)) {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            };
            let started = Instant::now();
            Counters::bump(&self.metrics.counters.everything_started);
            let generator = Generator::new(&self.segmenter, params).on_progress(&between_batches);
            match generator.run(&frame.embedding) {
                Ok(result) => {
                    self.metrics.record(Stage::Everything, started.elapsed());
                    let masks: Arc<Vec<(u32, MaskResult)>> =
                        Arc::new((0u32..).zip(result.masks).collect());
                    let meta = MaskWorker::meta(&frame);
                    for (client, sub) in &due {
                        self.hub.deliver(
                            *client,
                            Outbound::Masks(MaskBatch {
                                subscription: Some(sub.id),
                                request_id: None,
                                frame: meta,
                                masks: masks.clone(),
                                encoding: sub.encoding,
                                refused: Vec::new(),
                                picture: sub.frames.then(|| frame.picture.clone()),
                            }),
                        );
                    }
                }
                Err(crate::Error::Stopped { .. }) => {
                    Counters::bump(&self.metrics.counters.everything_stopped);
                    log::info!(
                        "everything pass on frame {} stopped after {:.1} s: its subscribers have left",
                        frame.seq,
                        started.elapsed().as_secs_f64()
                    );
                }
                Err(e) => {
                    log::error!("everything, frame {}: {}", frame.seq, error_chain(&e));
                    return;
                }
            }
            next = newer.into_inner();
            // A frame encoded after the pass's last chunk is newer still: its standing prompts
            // first, then the next pass on it.
            if next.is_some() {
                next = self.serve_newer_frame(frames, working).or(next);
            }
        }
    }

    /// The frame encoded since the worker last looked, if any, its standing prompts served.
    fn serve_newer_frame(
        &self,
        frames: &LatestReceiver<Arc<EncodedFrame>>,
        working: &Working<'_>,
    ) -> Option<Arc<EncodedFrame>> {
        let frame = frames.try_recv().ok()?;
        self.publish_prompts(&frame, working);
        Some(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source whose every frame is bad: the loop keeps trying, but waits between tries
    /// instead of spinning (before: thousands of tries per second at `--fps 0`).
    #[test]
    fn undecodable_source_backs_off() {
        struct Broken(std::sync::Arc<std::sync::atomic::AtomicU64>);
        impl FrameSource for Broken {
            fn next_frame(
                &mut self,
            ) -> std::result::Result<Option<Frame>, crate::camera::CameraError> {
                self.0.fetch_add(1, Ordering::Relaxed);
                Err(crate::camera::CameraError::BadFile {
                    path: "broken.jpg".into(),
                    reason: "image does not decode".into(),
                })
            }
            fn info(&self) -> SourceInfo {
                SourceInfo {
                    uri: "test:broken".into(),
                    width: 0,
                    height: 0,
                    format: None,
                    fps: 0.0,
                }
            }
        }
        let tries = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (tx, _rx) = LatestSender::channel();
        let metrics = Metrics::new();
        let info = Mutex::new(Broken(tries.clone()).info());
        let loop_stop = stop.clone();
        let source = Box::new(Broken(tries.clone()));
        let started = Instant::now();
        std::thread::scope(|scope| {
            scope.spawn(|| capture_loop(source, tx, &metrics, &info, &loop_stop));
            std::thread::sleep(Duration::from_millis(600));
            stop.store(true, Ordering::Relaxed);
        });
        let n = tries.load(Ordering::Relaxed);
        // 3 without waiting, then 20, 40, 80, 160, 320 ms: about 8 tries in 0.6 s.
        assert!(
            (4..=12).contains(&n),
            "{n} tries in {:?}",
            started.elapsed()
        );
        assert_eq!(metrics.counters.corrupt.load(Ordering::Relaxed), n);
        // Stopping is not held up by the wait.
        assert!(started.elapsed() < Duration::from_millis(900));
    }

    /// A stage whose consumer died ends with an error, and the failure is recorded once; a
    /// panicking stage is recorded too; nothing is recorded after `stop`.
    #[test]
    fn a_dead_stage_is_a_recorded_failure() {
        let failure = Arc::new(StageFailure::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = LatestSender::channel();
        drop(rx);
        let metrics = Arc::new(Metrics::new());
        let info = Arc::new(Mutex::new(SourceInfo {
            uri: "synthetic".into(),
            width: 0,
            height: 0,
            format: None,
            fps: 0.0,
        }));
        let source: Box<dyn FrameSource> = Box::new(crate::camera::SyntheticSource::new(
            32,
            24,
            0.0,
            stop.clone(),
        ));
        let (m, i, st) = (metrics.clone(), info.clone(), stop.clone());
        let capture = spawn_stage("capture", failure.clone(), stop.clone(), move || {
            capture_loop(source, tx, &m, &i, &st)
        })
        .expect("thread");
        capture.join().expect("no panic escapes a stage");
        let why = failure.get().expect("recorded");
        assert!(why.starts_with("capture: the encoder"), "{why}");

        let panicking = spawn_stage("masks", failure.clone(), stop.clone(), || {
            panic!("kernel bug")
        })
        .expect("thread");
        panicking.join().expect("no panic escapes a stage");
        // The first failure stays the one reported.
        assert!(failure.get().expect("recorded").starts_with("capture:"));
        let other = Arc::new(StageFailure::default());
        spawn_stage("masks", other.clone(), stop.clone(), || {
            panic!("kernel bug")
        })
        .expect("thread")
        .join()
        .expect("no panic escapes a stage");
        assert_eq!(other.get().as_deref(), Some("masks: panicked: kernel bug"));

        stop.store(true, Ordering::Relaxed);
        let after_stop = Arc::new(StageFailure::default());
        spawn_stage("encoder", after_stop.clone(), stop, || Err("gone".into()))
            .expect("thread")
            .join()
            .expect("joins");
        assert_eq!(after_stop.get(), None);
    }
}
