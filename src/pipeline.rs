//! The daemon's threads and channels: capture → encoder → mask worker → subscribers.
//!
//! Queues between stages hold one item with latest-frame-wins semantics: a new frame replaces the
//! one still waiting, so the encoder always works on the newest frame and nothing backs up (the
//! replaced frames are counted). Encoded frames go into an [`EmbeddingRing`] so that a prompt for
//! a recent frame is answered against that frame. The [`Hub`] holds the subscribers; each has its
//! own bounded outbound queue and a full queue drops results for that subscriber only.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, select, Receiver, Sender, TrySendError};

use crate::camera::{error_chain, Frame, FrameSource, SourceInfo};
use crate::everything::{EverythingParams, Generator, Progress};
use crate::heartbeat::{first_stalled, Heartbeat, Working};
use crate::metrics::{Counters, Metrics, Stage};
use crate::model::Embedding;
use crate::postprocess::{MaskEncoding, MaskResult};
use crate::prompt::Prompt;
pub use crate::scheduler::{ClientId, PromptJob};
use crate::scheduler::{EncoderYield, RequestQueue};
use crate::segmenter::{MaskSelection, Segmenter};

/// Sends into a one-slot queue, replacing what is still waiting there.
pub struct LatestSender<T> {
    tx: Sender<T>,
    /// Its own receiver, to take out a value still waiting when a newer one comes.
    rx: Receiver<T>,
    /// Alive while the [`LatestReceiver`] is: the channel itself cannot tell, because of `rx`.
    receiver: Weak<()>,
}

/// The receiving side of [`LatestSender::channel`]; dropping it (its stage ended or panicked)
/// makes the sender's `send` return `None`.
pub struct LatestReceiver<T> {
    rx: Receiver<T>,
    _alive: Arc<()>,
}

impl<T> std::ops::Deref for LatestReceiver<T> {
    type Target = Receiver<T>;
    fn deref(&self) -> &Receiver<T> {
        &self.rx
    }
}

impl<T> LatestSender<T> {
    /// A one-slot queue: the sender and the receiver side.
    pub fn channel() -> (LatestSender<T>, LatestReceiver<T>) {
        let (tx, rx) = bounded(1);
        let alive = Arc::new(());
        let sender = LatestSender {
            tx,
            rx: rx.clone(),
            receiver: Arc::downgrade(&alive),
        };
        (sender, LatestReceiver { rx, _alive: alive })
    }

    /// Put `value` in the slot; returns how many waiting values it replaced, or `None` if the
    /// receiver is gone.
    pub fn send(&self, mut value: T) -> Option<u64> {
        if self.receiver.strong_count() == 0 {
            return None;
        }
        let mut replaced = 0;
        loop {
            match self.tx.try_send(value) {
                Ok(()) => return Some(replaced),
                Err(TrySendError::Disconnected(_)) => return None,
                Err(TrySendError::Full(v)) => {
                    value = v;
                    if self.rx.try_recv().is_ok() {
                        replaced += 1;
                    }
                }
            }
        }
    }
}

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

/// A frame after the encoder.
pub struct EncodedFrame {
    /// Sequence number from the source.
    pub seq: u64,
    /// Capture time, CLOCK_MONOTONIC ns.
    pub captured_ns: u64,
    /// Frame width.
    pub width: u32,
    /// Frame height.
    pub height: u32,
    /// The image embedding.
    pub embedding: Embedding,
}

/// Why the ring has no embedding for a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RingMiss {
    /// Nothing encoded yet.
    Empty,
    /// The frame is older than the oldest held.
    Expired {
        /// Asked for.
        requested: u64,
        /// Oldest held.
        oldest: u64,
        /// Newest held.
        newest: u64,
    },
    /// The frame is newer than the newest held.
    NotYet {
        /// Asked for.
        requested: u64,
        /// Newest held.
        newest: u64,
    },
    /// Between held frames but never encoded (it was dropped before the encoder).
    Skipped {
        /// Asked for.
        requested: u64,
    },
}

impl RingMiss {
    /// The failure a request for this frame gets.
    pub fn failure(&self, request_id: u32) -> Failure {
        let (kind, message) = match self {
            RingMiss::Empty => (FailureKind::NoFrame, "no frame has been encoded yet".into()),
            RingMiss::Expired {
                requested,
                oldest,
                newest,
            } => (
                FailureKind::FrameExpired,
                format!("frame {requested} has left the ring (holds {oldest}..={newest})"),
            ),
            RingMiss::NotYet { requested, newest } => (
                FailureKind::FrameNotYet,
                format!("frame {requested} is not encoded yet (newest is {newest})"),
            ),
            RingMiss::Skipped { requested } => (
                FailureKind::FrameExpired,
                format!("frame {requested} was dropped before the encoder"),
            ),
        };
        Failure {
            id: Some(request_id),
            kind,
            message,
        }
    }
}

/// Why a request, a subscription or a subscription's prompts got no masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// No frame has been encoded yet.
    NoFrame,
    /// The frame has left the embedding ring, or never reached the encoder.
    FrameExpired,
    /// The frame has not been encoded yet.
    FrameNotYet,
    /// The model cannot take the prompt (outside the frame, empty).
    InvalidPrompt,
    /// The client has as many subscriptions as it may.
    TooManySubscriptions,
    /// The client has gone, or the model failed.
    Internal,
}

/// A failure for a client: of its request or subscription `id`, with a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The request or subscription it concerns.
    pub id: Option<u32>,
    /// What went wrong.
    pub kind: FailureKind,
    /// The details.
    pub message: String,
}

/// The embeddings of the last K encoded frames.
pub struct EmbeddingRing {
    frames: Mutex<VecDeque<Arc<EncodedFrame>>>,
    capacity: usize,
}

impl EmbeddingRing {
    /// A ring of `capacity` (≥ 1) frames.
    pub fn new(capacity: usize) -> EmbeddingRing {
        EmbeddingRing {
            frames: Mutex::new(VecDeque::with_capacity(capacity.max(1))),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<EncodedFrame>>> {
        self.frames.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Add the newest frame, evicting the oldest when full.
    pub fn push(&self, frame: Arc<EncodedFrame>) {
        let mut frames = self.lock();
        if frames.len() == self.capacity {
            frames.pop_front();
        }
        frames.push_back(frame);
    }

    /// The frame `seq`, or the newest with `None`.
    pub fn get(&self, seq: Option<u64>) -> Result<Arc<EncodedFrame>, RingMiss> {
        let frames = self.lock();
        let (Some(oldest), Some(newest)) = (frames.front(), frames.back()) else {
            return Err(RingMiss::Empty);
        };
        let Some(requested) = seq else {
            return Ok(newest.clone());
        };
        if requested < oldest.seq {
            return Err(RingMiss::Expired {
                requested,
                oldest: oldest.seq,
                newest: newest.seq,
            });
        }
        if requested > newest.seq {
            return Err(RingMiss::NotYet {
                requested,
                newest: newest.seq,
            });
        }
        frames
            .iter()
            .find(|f| f.seq == requested)
            .cloned()
            .ok_or(RingMiss::Skipped { requested })
    }

    /// Oldest and newest sequence numbers held.
    pub fn span(&self) -> Option<(u64, u64)> {
        let frames = self.lock();
        Some((frames.front()?.seq, frames.back()?.seq))
    }
}

/// Frame facts sent with every result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameMeta {
    /// Sequence number.
    pub seq: u64,
    /// Capture time, CLOCK_MONOTONIC ns.
    pub captured_ns: u64,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
}

/// Masks on their way to one client, encoded by that client's writer thread.
#[derive(Debug, Clone)]
pub struct MaskBatch {
    /// Subscription it answers.
    pub subscription: Option<u32>,
    /// Request it answers.
    pub request_id: Option<u32>,
    /// The frame.
    pub frame: FrameMeta,
    /// (prompt index, mask), shared between subscribers of the same frame.
    pub masks: Arc<Vec<(u32, MaskResult)>>,
    /// Wire encoding.
    pub encoding: MaskEncoding,
    /// Prompts of a request that were refused: (prompt index, why).
    pub refused: Vec<(u32, String)>,
}

/// What a client's writer thread sends.
#[derive(Debug)]
pub enum Outbound {
    /// Masks to encode and send.
    Masks(MaskBatch),
    /// A failure to report.
    Failed(Failure),
    /// A message the server has already encoded.
    Encoded(Vec<u8>),
}

/// Per-client counters.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// Messages written.
    pub sent: AtomicU64,
    /// Results dropped because its queue was full.
    pub dropped: AtomicU64,
    /// Results skipped by its rate cap.
    pub rate_limited: AtomicU64,
}

/// What a subscription delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionKind {
    /// Segment-everything masks for every frame.
    Everything,
    /// The subscription's prompts, applied to every frame.
    Prompts,
    /// Nothing per frame: the client's prompt requests only.
    OnDemand,
}

/// Subscriptions one client may hold, unless the pipeline is told otherwise.
pub const DEFAULT_SUBSCRIPTIONS_PER_CLIENT: usize = 8;

/// A standing subscription.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// Client-chosen id.
    pub id: u32,
    /// What it delivers.
    pub mode: SubscriptionKind,
    /// Standing prompts.
    pub prompts: Vec<Prompt>,
    /// Wire encoding.
    pub encoding: MaskEncoding,
    /// Three masks per prompt instead of one.
    pub multimask: bool,
    /// Shortest time between two results (from the rate cap).
    pub min_interval: Option<Duration>,
    last_sent: Option<Instant>,
    reported_invalid: bool,
}

impl Subscription {
    /// A new subscription.
    pub fn new(
        id: u32,
        mode: SubscriptionKind,
        prompts: Vec<Prompt>,
        encoding: MaskEncoding,
        multimask: bool,
        max_rate_hz: f32,
    ) -> Subscription {
        Subscription {
            id,
            mode,
            prompts,
            encoding,
            multimask,
            min_interval: min_interval(max_rate_hz),
            last_sent: None,
            reported_invalid: false,
        }
    }
}

/// The least time between two results at `max_rate_hz` (`None`: no limit, for 0 or less). The
/// protocol admits 0 or 0.001..=1000; any other value is still no panic: rates whose interval
/// does not fit a `Duration` (below ~5e-20 Hz) mean "at most once".
fn min_interval(max_rate_hz: f32) -> Option<Duration> {
    if max_rate_hz.is_nan() || max_rate_hz <= 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f32(1.0 / max_rate_hz).unwrap_or(Duration::MAX))
}

struct ClientEntry {
    name: String,
    /// Subscription results and the like: bounded, dropped and counted when full.
    tx: Sender<Outbound>,
    /// Answers to the client's prompt requests: never dropped (their number is bounded by the
    /// request queue), and sent before the results waiting in `tx`.
    answers: Sender<Outbound>,
    stats: Arc<ClientStats>,
    subscriptions: Vec<Subscription>,
}

/// A client as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSnapshot {
    /// The hub's id for it.
    pub id: ClientId,
    /// Its name from the hello.
    pub name: String,
    /// Subscriptions it holds.
    pub subscriptions: usize,
    /// Messages written to it.
    pub sent: u64,
    /// Results dropped because its queue was full.
    pub dropped: u64,
    /// Results skipped by its rate caps.
    pub rate_limited: u64,
}

/// The connected clients and their subscriptions.
pub struct Hub {
    clients: Mutex<BTreeMap<ClientId, ClientEntry>>,
    next_id: AtomicU64,
    max_subscriptions: usize,
}

impl Default for Hub {
    fn default() -> Hub {
        Hub::new(DEFAULT_SUBSCRIPTIONS_PER_CLIENT)
    }
}

impl Hub {
    /// A hub whose clients may hold up to `max_subscriptions` subscriptions each.
    pub fn new(max_subscriptions: usize) -> Hub {
        Hub {
            clients: Mutex::default(),
            next_id: AtomicU64::new(0),
            max_subscriptions,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ClientId, ClientEntry>> {
        self.clients.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Add a client whose writer drains `tx`.
    pub fn register(
        &self,
        name: String,
        tx: Sender<Outbound>,
        answers: Sender<Outbound>,
    ) -> (ClientId, Arc<ClientStats>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let stats = Arc::new(ClientStats::default());
        self.lock().insert(
            id,
            ClientEntry {
                name,
                tx,
                answers,
                stats: stats.clone(),
                subscriptions: Vec::new(),
            },
        );
        (id, stats)
    }

    /// Name a client after its hello.
    pub fn rename(&self, client: ClientId, name: String) {
        if let Some(c) = self.lock().get_mut(&client) {
            c.name = name;
        }
    }

    /// Remove a client (its queue closes when the last sender goes).
    pub fn unregister(&self, client: ClientId) {
        self.lock().remove(&client);
    }

    /// Add or replace a subscription.
    pub fn subscribe(&self, client: ClientId, sub: Subscription) -> Result<(), Failure> {
        let mut clients = self.lock();
        let fail = |kind, message| Failure {
            id: Some(sub.id),
            kind,
            message,
        };
        let Some(c) = clients.get_mut(&client) else {
            return Err(fail(FailureKind::Internal, "client is gone".into()));
        };
        if let Some(existing) = c.subscriptions.iter_mut().find(|s| s.id == sub.id) {
            *existing = sub;
            return Ok(());
        }
        if c.subscriptions.len() >= self.max_subscriptions {
            return Err(fail(
                FailureKind::TooManySubscriptions,
                format!(
                    "at most {} subscriptions per client",
                    self.max_subscriptions
                ),
            ));
        }
        c.subscriptions.push(sub);
        Ok(())
    }

    /// Remove a subscription; false if it did not exist.
    pub fn unsubscribe(&self, client: ClientId, id: u32) -> bool {
        let mut clients = self.lock();
        let Some(c) = clients.get_mut(&client) else {
            return false;
        };
        let before = c.subscriptions.len();
        c.subscriptions.retain(|s| s.id != id);
        before != c.subscriptions.len()
    }

    /// Queue `item` for `client` without blocking; a full queue drops it and counts the drop.
    pub fn deliver(&self, client: ClientId, item: Outbound) {
        let clients = self.lock();
        if let Some(c) = clients.get(&client) {
            Hub::offer(c, item);
        }
    }

    /// Whether `client` has a subscription that sends it results by itself (prompts or
    /// everything, not on-demand).
    pub fn has_standing_subscription(&self, client: ClientId) -> bool {
        self.lock().get(&client).is_some_and(|c| {
            c.subscriptions
                .iter()
                .any(|s| s.mode != SubscriptionKind::OnDemand)
        })
    }

    /// Whether `client` is still registered (connected).
    pub fn is_connected(&self, client: ClientId) -> bool {
        self.lock().contains_key(&client)
    }

    /// Queue the answer to one of `client`'s prompt requests: never dropped, whatever its
    /// result queue holds (a client that is gone simply gets nothing).
    pub fn answer(&self, client: ClientId, item: Outbound) {
        let clients = self.lock();
        if let Some(c) = clients.get(&client) {
            // Unbounded: a disconnected client is the only failure, and then nobody waits.
            let _ = c.answers.send(item);
        }
    }

    fn offer(c: &ClientEntry, item: Outbound) {
        match c.tx.try_send(item) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                c.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Subscriptions due for a frame now (rate caps applied and counted), by client.
    fn due(&self, now: Instant) -> Vec<(ClientId, Subscription)> {
        let mut clients = self.lock();
        let mut out = Vec::new();
        for (id, c) in clients.iter_mut() {
            for s in c.subscriptions.iter_mut() {
                if s.mode == SubscriptionKind::OnDemand {
                    continue;
                }
                if let (Some(min), Some(last)) = (s.min_interval, s.last_sent) {
                    if now.duration_since(last) < min {
                        c.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
                s.last_sent = Some(now);
                out.push((*id, s.clone()));
            }
        }
        out
    }

    /// Mark that a subscription's prompts were refused (reported once).
    fn mark_invalid(&self, client: ClientId, id: u32) -> bool {
        let mut clients = self.lock();
        let Some(s) = clients
            .get_mut(&client)
            .and_then(|c| c.subscriptions.iter_mut().find(|s| s.id == id))
        else {
            return false;
        };
        !std::mem::replace(&mut s.reported_invalid, true)
    }

    /// Counters of every client.
    pub fn counters(&self) -> Vec<ClientSnapshot> {
        self.lock()
            .iter()
            .map(|(id, c)| ClientSnapshot {
                id: *id,
                name: c.name.clone(),
                subscriptions: c.subscriptions.len(),
                sent: c.stats.sent.load(Ordering::Relaxed),
                dropped: c.stats.dropped.load(Ordering::Relaxed),
                rate_limited: c.stats.rate_limited.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// Prompt requests one client may have waiting (the protocol's `busy` past it).
pub const DEFAULT_REQUESTS_PER_CLIENT: usize = 8;

/// Prompts an everything pass decodes between two looks at the request queue, unless the
/// pipeline is told otherwise (the daemon uses its thread count): a request waits for at most
/// this many prompts of a pass instead of the whole pass. Decoding runs one prompt per thread at
/// a time whatever the batch, so a chunk of one prompt per thread costs nothing per prompt, and a
/// request waits for at most one prompt's decoding per thread (~40 ms on the default model).
/// Measured with `benches/daemon_scheduling.py` (2 threads, a request beside 3 everything
/// subscribers, the encoder yielding to requests): p50 242 ms with chunks of 16 prompts, 98 ms
/// with 4, 51 ms with 2.
pub const DEFAULT_EVERYTHING_CHUNK: usize = 2;

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
    /// Most prompts an everything pass decodes between two looks at the request queue (its
    /// decoder batch; the pass's result does not depend on it).
    pub everything_chunk: usize,
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
            everything_chunk: DEFAULT_EVERYTHING_CHUNK,
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
                everything_chunk: options.everything_chunk.max(1),
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
                let lag_ns = crate::camera::monotonic_now_ns().saturating_sub(frame.captured_ns);
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
            let mut between_ops = || {
                if !budget.is_zero() {
                    let waited = cores.wait_while_urgent(budget);
                    budget = budget.saturating_sub(waited);
                    yielded += waited;
                }
            };
            let embedding = match segmenter.encode_between_ops(input, &mut between_ops) {
                Ok(e) => e,
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
    /// Prompts of an everything pass between two looks at the request queue.
    everything_chunk: usize,
    requests: Arc<RequestQueue>,
    heartbeat: Arc<Heartbeat>,
    /// Takes the cores from the encoder while a request is decoded.
    cores: Arc<EncoderYield>,
}

impl MaskWorker {
    /// Until `stop`. Priorities: prompt requests (clients in turn), then the standing prompts
    /// and everything passes of the newest frame; an everything pass answers the requests that
    /// arrive meanwhile after each of its decoder batches.
    fn run(
        &self,
        frames: LatestReceiver<Arc<EncodedFrame>>,
        stop: &AtomicBool,
    ) -> Result<(), String> {
        let mut frames_open = true;
        while !stop.load(Ordering::Relaxed) {
            // Requests first: a client waiting for an answer beats the next frame.
            if let Some(job) = self.requests.pop() {
                let working = self.heartbeat.working();
                self.answer(job);
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
                        self.publish(&frame, &working);
                    }
                    Err(_) => frames_open = false,
                },
                default(Duration::from_millis(100)) => {}
            }
        }
        self.requests.close();
        Ok(())
    }

    /// Answer every request waiting now, clients in turn, beating after each.
    fn answer_waiting(&self, working: &Working<'_>) {
        while let Some(job) = self.requests.pop() {
            self.answer(job);
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

    fn answer(&self, job: PromptJob) {
        // A client that has gone waits for nothing: its queued requests are skipped, not run
        // (a flood of requests from a client that then left kept the decoder busy for ~45 s).
        if !self.hub.is_connected(job.client) {
            log::debug!(
                "request {} of client {}: the client has gone; skipped",
                job.request_id,
                job.client
            );
            return;
        }
        let frame = match self.ring.get(job.frame_seq) {
            Ok(f) => f,
            Err(miss) => {
                self.hub
                    .answer(job.client, Outbound::Failed(miss.failure(job.request_id)));
                return;
            }
        };
        let decoded = {
            let _urgent = self.cores.urgent();
            self.segment(&frame, &job.prompts, job.multimask)
        };
        let reply = match decoded {
            Ok(outcomes) => {
                // A bad prompt is refused on its own; the others are answered.
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
                        frame: MaskWorker::meta(&frame),
                        masks: Arc::new(masks),
                        encoding: job.encoding,
                        refused,
                    })
                }
            }
            Err(e) => {
                log::error!("request {}: {}", job.request_id, error_chain(&e));
                Outbound::Failed(Failure {
                    id: Some(job.request_id),
                    kind: FailureKind::Internal,
                    message: error_chain(&e),
                })
            }
        };
        self.hub.answer(job.client, reply);
    }

    /// Standing prompts and everything passes due on `frame`; `working` beats after each group
    /// of prompts and each decoder batch of an everything pass.
    fn publish(&self, frame: &EncodedFrame, working: &Working<'_>) {
        let due = self.hub.due(Instant::now());
        if due.is_empty() {
            return;
        }
        let meta = MaskWorker::meta(frame);
        let mut everything: Option<Arc<Vec<(u32, MaskResult)>>> = None;
        // Standing prompts of all subscribers go to the decoder together, per mask selection.
        for multimask in [false, true] {
            let group: Vec<&(ClientId, Subscription)> = due
                .iter()
                .filter(|(_, s)| s.mode == SubscriptionKind::Prompts && s.multimask == multimask)
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
                    }),
                );
            }
        }
        for (client, sub) in due
            .iter()
            .filter(|(_, s)| s.mode == SubscriptionKind::Everything)
        {
            if everything.is_none() {
                let params = self
                    .everything
                    .read()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                let started = Instant::now();
                // Between decoder batches: the requests that came meanwhile, then a beat.
                let params = EverythingParams {
                    points_per_batch: params.points_per_batch.min(self.everything_chunk),
                    ..params
                };
                let between_batches = |_: Progress| {
                    self.answer_waiting(working);
                    working.beat();
                };
                let generator =
                    Generator::new(&self.segmenter, params).on_progress(&between_batches);
                match generator.run(&frame.embedding) {
                    Ok(result) => {
                        self.metrics.record(Stage::Everything, started.elapsed());
                        everything = Some(Arc::new(
                            result
                                .masks
                                .into_iter()
                                .enumerate()
                                .map(|(i, m)| (i as u32, m))
                                .collect(),
                        ));
                    }
                    Err(e) => {
                        log::error!("everything, frame {}: {}", frame.seq, error_chain(&e));
                        return;
                    }
                }
            }
            if let Some(masks) = &everything {
                self.hub.deliver(
                    *client,
                    Outbound::Masks(MaskBatch {
                        subscription: Some(sub.id),
                        request_id: None,
                        frame: meta,
                        masks: masks.clone(),
                        encoding: sub.encoding,
                        refused: Vec::new(),
                    }),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any rate gives an interval without panicking; tiny ones mean "at most once".
    #[test]
    fn any_rate_gives_an_interval() {
        assert_eq!(min_interval(0.0), None);
        assert_eq!(min_interval(-3.0), None);
        assert_eq!(min_interval(f32::NAN), None);
        assert_eq!(min_interval(4.0), Some(Duration::from_millis(250)));
        assert_eq!(min_interval(1e-20), Some(Duration::MAX));
        assert_eq!(min_interval(f32::MIN_POSITIVE), Some(Duration::MAX));
        assert_eq!(min_interval(f32::INFINITY), Some(Duration::ZERO));
    }

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

    #[test]
    fn latest_wins_replaces_and_counts() {
        let (tx, rx) = LatestSender::channel();
        assert_eq!(tx.send(1), Some(0));
        assert_eq!(tx.send(2), Some(1));
        assert_eq!(tx.send(3), Some(1));
        assert_eq!(rx.try_recv().ok(), Some(3));
        // The sender keeps a receiver of its own, yet sees the consumer go (before: it never
        // did, so a capture thread fed a dead encoder forever).
        drop(rx);
        assert_eq!(tx.send(4), None);
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

    #[test]
    fn rate_cap_skips_and_counts() {
        let hub = Hub::default();
        let (tx, _rx) = bounded(4);
        let (id, stats) = hub.register("t".into(), tx, crossbeam_channel::unbounded().0);
        let sub = Subscription::new(
            1,
            SubscriptionKind::Everything,
            vec![],
            MaskEncoding::Bbox,
            false,
            2.0,
        );
        hub.subscribe(id, sub).unwrap();
        let t0 = Instant::now();
        assert_eq!(hub.due(t0).len(), 1);
        assert_eq!(hub.due(t0 + Duration::from_millis(100)).len(), 0);
        assert_eq!(hub.due(t0 + Duration::from_millis(600)).len(), 1);
        assert_eq!(stats.rate_limited.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn full_queue_drops_for_that_client_only() {
        let hub = Hub::default();
        let (tx_a, rx_a) = bounded(1);
        let (tx_b, rx_b) = bounded(1);
        let (answers_a, answers_rx) = crossbeam_channel::unbounded();
        let (a, stats_a) = hub.register("a".into(), tx_a, answers_a);
        let (b, stats_b) = hub.register("b".into(), tx_b, crossbeam_channel::unbounded().0);
        for _ in 0..3 {
            hub.deliver(a, Outbound::Encoded(b"x".to_vec()));
        }
        hub.deliver(b, Outbound::Encoded(b"y".to_vec()));
        assert_eq!(stats_a.dropped.load(Ordering::Relaxed), 2);
        assert_eq!(stats_b.dropped.load(Ordering::Relaxed), 0);
        assert_eq!((rx_a.len(), rx_b.len()), (1, 1));
        // An answer to a request still gets through a full result queue, and is not counted
        // as dropped (issue 16: it used to be lost, and the client waited forever).
        hub.answer(a, Outbound::Encoded(b"answer".to_vec()));
        assert_eq!(answers_rx.len(), 1);
        assert_eq!(stats_a.dropped.load(Ordering::Relaxed), 2);
        for i in 0..DEFAULT_SUBSCRIPTIONS_PER_CLIENT as u32 {
            let s = Subscription::new(
                i,
                SubscriptionKind::OnDemand,
                vec![],
                MaskEncoding::Rle,
                false,
                0.0,
            );
            hub.subscribe(a, s).unwrap();
        }
        let s = Subscription::new(
            99,
            SubscriptionKind::OnDemand,
            vec![],
            MaskEncoding::Rle,
            false,
            0.0,
        );
        assert_eq!(
            hub.subscribe(a, s).unwrap_err().kind,
            FailureKind::TooManySubscriptions
        );
        // A client that leaves is no longer connected: its queued requests are skipped.
        assert!(hub.is_connected(a));
        hub.unregister(a);
        assert!(!hub.is_connected(a) && hub.is_connected(b));
    }
}
