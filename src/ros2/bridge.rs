//! The bridge's daemon side: one connection to `tinysamd` at a time, kept up across daemon
//! restarts; every result it receives becomes a label image, a `Detection2DArray` and, when asked
//! for, a JPEG overlay of the masks on the frame (the daemon then sends each result's frame),
//! handed to a [`Publish`] (the middleware, in the `tinysam-ros2` binary; a recorder in tests); prompts from
//! ROS topics become prompt requests on the newest frame.
//!
//! Threads: [`Bridge::run`] owns the connection and blocks in its receive; a keep-alive thread per
//! connection asks for a status report every [`KEEPALIVE`] (an on-demand client that sends
//! nothing would be closed by the daemon's idle timeout, and the report carries the frame size
//! prompts are checked against); any thread may call [`Bridge::submit_detections`] and
//! [`Bridge::submit_point`], which send through the connection's second handle.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::client::{Client, ClientError, ClientSender};
use crate::protocol::{
    ClientMessage, MaskEncoding, Masks, PromptRequest, ServerMessage, StatusRequest, Subscribe,
    SubscribeMode, WirePrompt,
};

use super::convert::{self, Answering, FrameSize, PromptBatch, RejectedPrompt};
use super::messages::{CompressedImage, Detection2DArray, Header, Image, PointStamped};

/// Between two status requests on an idle connection.
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// The first wait before reconnecting; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// The longest wait between two connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Recent prompt requests whose answers can still be told apart (their prompts' sources).
const PENDING_REQUESTS: usize = 64;
/// The subscription id of the standing prompts (or everything, or on-demand).
const SUBSCRIPTION: u32 = 1;
/// The request id of the bridge's status requests.
const STATUS_REQUEST: u32 = u32::MAX;
/// Prompt requests count up from here (after the subscription's id, which error replies share)
/// and wrap below [`STATUS_REQUEST`].
const FIRST_REQUEST: u32 = SUBSCRIPTION + 1;

/// What the bridge publishes for one result.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameOutput {
    /// The `mono16` label image (`None` when masks are not published or could not be drawn).
    pub label_image: Option<Image>,
    /// One detection per mask.
    pub detections: Detection2DArray,
    /// The masks over the frame, JPEG (`None` when the overlay is off or could not be drawn).
    pub overlay: Option<CompressedImage>,
}

/// Where results go: the middleware's publishers.
pub trait Publish {
    /// Publish one result; an error is logged and counted, and the bridge goes on.
    fn publish(&self, output: FrameOutput) -> Result<(), String>;
}

/// Prompts the bridge keeps on the daemon for every frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Standing {
    /// None: only prompts from ROS topics are answered.
    Nothing,
    /// These prompts, on every frame.
    Prompts(Vec<WirePrompt>),
    /// Segment-everything on every frame.
    Everything,
}

/// How the bridge talks to the daemon and stamps what it publishes.
#[derive(Debug, Clone)]
pub struct BridgeOptions {
    /// The daemon's socket.
    pub socket: PathBuf,
    /// The client name the daemon logs.
    pub client_name: String,
    /// Standing prompts.
    pub standing: Standing,
    /// Most results per second of the standing subscription (0: every frame).
    pub max_rate_hz: f32,
    /// `header.frame_id` of everything published.
    pub frame_id: String,
    /// Whether to draw the label image (detections are always published).
    pub publish_masks: bool,
    /// Whether to ask the daemon for the frames and publish the masks drawn over them.
    pub publish_overlay: bool,
}

/// Running totals, for logs and tests.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections made to the daemon.
    pub connections: AtomicU64,
    /// Results published.
    pub published: AtomicU64,
    /// Results the publisher failed on.
    pub publish_errors: AtomicU64,
    /// Results whose label image or overlay could not be drawn.
    pub convert_errors: AtomicU64,
    /// Prompts sent to the daemon.
    pub prompts_sent: AtomicU64,
    /// Prompts refused by the bridge (malformed or out of frame) or by the daemon.
    pub prompts_rejected: AtomicU64,
    /// Prompts that arrived while no daemon was connected.
    pub prompts_dropped: AtomicU64,
    /// Error replies from the daemon.
    pub daemon_errors: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) -> u64 {
    counter.fetch_add(by, Ordering::Relaxed).saturating_add(by)
}

/// The daemon side of `tinysam-ros2`.
pub struct Bridge {
    options: BridgeOptions,
    /// The live connection's sending half, `None` between connections.
    link: Mutex<Option<ClientSender>>,
    /// The frame size from the latest status report.
    frame: Mutex<Option<FrameSize>>,
    /// Recent prompt requests: id and, per prompt, the index of the detection it came from.
    requests: Mutex<VecDeque<(u32, Vec<usize>)>>,
    next_request: AtomicU32,
    stopped: AtomicBool,
    /// Running totals.
    pub counters: Counters,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere while holding one of these cannot leave it half-updated (each holds one
    // value replaced whole), so a poisoned lock is still good.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Bridge {
    /// A bridge that has not connected yet.
    pub fn new(options: BridgeOptions) -> Bridge {
        Bridge {
            options,
            link: Mutex::new(None),
            frame: Mutex::new(None),
            requests: Mutex::new(VecDeque::new()),
            next_request: AtomicU32::new(FIRST_REQUEST),
            stopped: AtomicBool::new(false),
            counters: Counters::default(),
        }
    }

    /// Connect, publish every result to `sink`, reconnect when the daemon goes away; returns
    /// after [`Bridge::stop`].
    pub fn run(&self, sink: &dyn Publish) {
        let mut backoff = MIN_BACKOFF;
        let mut last_error = String::new();
        while !self.stopped.load(Ordering::SeqCst) {
            match self.serve(sink) {
                Ok(()) => {
                    backoff = MIN_BACKOFF;
                    last_error.clear();
                    if !self.stopped.load(Ordering::SeqCst) {
                        log::warn!("tinysamd closed the connection; reconnecting");
                    }
                }
                Err(e) => {
                    let message = crate::error_chain(&e);
                    // Once per kind of failure, not every attempt of a long outage.
                    if message != last_error {
                        log::warn!(
                            "tinysamd at {}: {message}; retrying every {MAX_BACKOFF:?} at most",
                            self.options.socket.display()
                        );
                        last_error = message;
                    }
                }
            }
            let until = std::time::Instant::now() + backoff;
            while !self.stopped.load(Ordering::SeqCst) && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Make [`Bridge::run`] return: closes the connection it waits on.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        if let Some(link) = locked(&self.link).as_ref() {
            link.shutdown();
        }
    }

    /// The frame size prompts are checked against (from the daemon's latest status report).
    pub fn frame_size(&self) -> Option<FrameSize> {
        *locked(&self.frame)
    }

    /// One connection: handshake, status, subscription, then results until it closes.
    fn serve(&self, sink: &dyn Publish) -> Result<(), ClientError> {
        let mut client = Client::connect(&self.options.socket, &self.options.client_name)?;
        let status = client.status(STATUS_REQUEST)?;
        self.set_frame(status.source.width, status.source.height);
        let (mode, prompts) = match &self.options.standing {
            Standing::Nothing => (SubscribeMode::OnDemand, Vec::new()),
            Standing::Prompts(p) => (SubscribeMode::Prompts, p.clone()),
            Standing::Everything => (SubscribeMode::Everything, Vec::new()),
        };
        client.subscribe(Subscribe {
            id: SUBSCRIPTION,
            mode,
            prompts,
            encoding: MaskEncoding::Rle,
            max_rate_hz: self.options.max_rate_hz,
            multimask: false,
            frames: self.options.publish_overlay,
        })?;
        bump(&self.counters.connections, 1);
        log::info!(
            "connected to {} at {} ({}), frames {}x{}",
            client.welcome.server,
            self.options.socket.display(),
            status.model.name,
            status.source.width,
            status.source.height
        );
        let mut keepalive = client.sender()?;
        *locked(&self.link) = Some(client.sender()?);
        if self.stopped.load(Ordering::SeqCst) {
            self.stop();
        }
        let (ended, ending) = crossbeam_channel::bounded::<()>(0);
        let result = std::thread::scope(|scope| {
            scope.spawn(move || {
                let status = ClientMessage::StatusRequest(StatusRequest {
                    request_id: STATUS_REQUEST,
                });
                // Until the receive loop ends (the channel disconnects) or a send fails.
                while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
                    ending.recv_timeout(KEEPALIVE)
                {
                    if keepalive.send(&status).is_err() {
                        break;
                    }
                }
            });
            let result = self.receive(&mut client, sink);
            drop(ended);
            result
        });
        *locked(&self.link) = None;
        result
    }

    /// Results until the connection closes (`Ok`) or fails.
    fn receive(&self, client: &mut Client, sink: &dyn Publish) -> Result<(), ClientError> {
        loop {
            match client.recv(None) {
                Ok(ServerMessage::Masks(masks)) => self.publish(&masks, sink),
                Ok(ServerMessage::Status(s)) => self.set_frame(s.source.width, s.source.height),
                Ok(ServerMessage::Error(e)) => {
                    let n = bump(&self.counters.daemon_errors, 1);
                    let is_request = e.id.is_some_and(|id| id != SUBSCRIPTION);
                    if is_request {
                        bump(&self.counters.prompts_rejected, 1);
                    }
                    log::warn!(
                        "tinysamd refused {}: {}: {} ({n} errors so far)",
                        e.id.map_or_else(
                            || "a message".to_string(),
                            |id| {
                                if is_request {
                                    format!("prompt request {id}")
                                } else {
                                    "the subscription".to_string()
                                }
                            }
                        ),
                        e.code,
                        e.message
                    );
                }
                Ok(_) => {}
                Err(ClientError::Closed) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    fn set_frame(&self, width: u32, height: u32) {
        *locked(&self.frame) = (width > 0 && height > 0).then_some(FrameSize { width, height });
    }

    /// One result to the sink.
    fn publish(&self, masks: &Masks, sink: &dyn Publish) {
        let header = Header {
            stamp: convert::stamp_from_capture(
                masks.capture_ns,
                crate::monotonic_now_ns(),
                convert::realtime_now_ns(),
            ),
            frame_id: self.options.frame_id.clone(),
        };
        for refused in &masks.refused {
            let n = bump(&self.counters.prompts_rejected, 1);
            log::warn!(
                "tinysamd refused prompt {} of request {:?}: {} ({n} prompts refused so far)",
                refused.prompt,
                masks.request_id,
                refused.message
            );
        }
        let sources = masks.request_id.and_then(|id| {
            locked(&self.requests)
                .iter()
                .find(|(r, _)| *r == id)
                .map(|(_, s)| s.clone())
        });
        let answering = match (&sources, &self.options.standing) {
            (Some(s), _) => Answering::Prompts(s),
            (None, Standing::Everything) if masks.subscription.is_some() => Answering::Everything,
            (None, _) => Answering::Prompts(&[]),
        };
        let detections = convert::detections(masks, &header, &answering);
        // The label image and the overlay are drawn from the same labels, computed once.
        let (want_masks, want_overlay) = (self.options.publish_masks, self.options.publish_overlay);
        let labels = match (want_masks || want_overlay).then(|| convert::labels(masks)) {
            Some(Ok(labels)) => Some(labels),
            Some(Err(e)) => {
                let n = bump(&self.counters.convert_errors, 1);
                log::warn!(
                    "frame {}: no label image or overlay: {e} ({n} so far)",
                    masks.frame_seq
                );
                None
            }
            None => None,
        };
        let label_image = labels
            .as_deref()
            .filter(|_| want_masks)
            .map(|l| convert::label_image(masks, l, &header));
        let overlay = match labels.as_deref().filter(|_| want_overlay) {
            Some(l) => match convert::overlay(masks, l, &header) {
                Ok(image) => Some(image),
                Err(e) => {
                    let n = bump(&self.counters.convert_errors, 1);
                    log::warn!("frame {}: no overlay: {e} ({n} so far)", masks.frame_seq);
                    None
                }
            },
            None => None,
        };
        match sink.publish(FrameOutput {
            label_image,
            detections,
            overlay,
        }) {
            Ok(()) => {
                bump(&self.counters.published, 1);
            }
            Err(e) => {
                let n = bump(&self.counters.publish_errors, 1);
                log::warn!(
                    "publishing frame {}: {e} ({n} failures so far)",
                    masks.frame_seq
                );
            }
        }
    }

    /// Box prompts from a `Detection2DArray`, answered on the newest frame.
    pub fn submit_detections(&self, msg: &Detection2DArray) {
        let batch = convert::prompts_from_detections(msg, self.frame_size());
        self.submit(batch, "box");
    }

    /// A point prompt from a `PointStamped`, answered on the newest frame.
    pub fn submit_point(&self, msg: &PointStamped) {
        let batch = convert::prompt_from_point(msg, self.frame_size());
        self.submit(batch, "point");
    }

    /// Count and log a prompt that could not even be read (its message did not deserialise).
    pub fn reject_unreadable(&self, topic: &str, reason: &str) {
        self.reject(
            &RejectedPrompt {
                index: 0,
                // Middleware errors span lines; a log line should not.
                reason: format!(
                    "unreadable message on {topic}: {}",
                    reason.split_whitespace().collect::<Vec<_>>().join(" ")
                ),
            },
            "message",
        );
    }

    fn reject(&self, r: &RejectedPrompt, kind: &str) {
        let n = bump(&self.counters.prompts_rejected, 1);
        log::warn!(
            "{kind} prompt {} refused: {} ({n} prompts refused so far)",
            r.index,
            r.reason
        );
    }

    fn submit(&self, batch: PromptBatch, kind: &str) {
        for r in &batch.rejected {
            self.reject(r, kind);
        }
        if batch.prompts.is_empty() {
            return;
        }
        let count = batch.prompts.len() as u64;
        let request_id = self
            .next_request
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |id| {
                Some(if id >= STATUS_REQUEST - 1 {
                    FIRST_REQUEST
                } else {
                    id + 1
                })
            })
            .unwrap_or(FIRST_REQUEST);
        {
            let mut requests = locked(&self.requests);
            requests.push_back((request_id, batch.sources));
            while requests.len() > PENDING_REQUESTS {
                requests.pop_front();
            }
        }
        let request = ClientMessage::PromptRequest(PromptRequest {
            request_id,
            frame_seq: None,
            prompts: batch.prompts,
            encoding: MaskEncoding::Rle,
            multimask: false,
            frames: self.options.publish_overlay,
        });
        let mut link = locked(&self.link);
        let sent = match link.as_mut() {
            Some(sender) => sender.send(&request).map_err(|e| crate::error_chain(&e)),
            None => Err("no connection to tinysamd".to_string()),
        };
        match sent {
            Ok(()) => {
                bump(&self.counters.prompts_sent, count);
            }
            Err(e) => {
                let n = bump(&self.counters.prompts_dropped, count);
                log::warn!("{kind} prompts dropped: {e} ({n} dropped so far)");
            }
        }
    }
}
