//! The connected clients as the mask worker sees them: their subscriptions, their outbound
//! queues (results bounded and dropped for that client only when full; answers to requests never
//! dropped) and their counters. Only domain types: the server turns them into wire messages.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};

use crate::picture::FramePicture;
use crate::postprocess::{MaskEncoding, MaskResult};
use crate::prompt::Prompt;
use crate::scheduler::ClientId;

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
    /// The frame's picture, when the subscription or request asked for frames.
    pub picture: Option<Arc<FramePicture>>,
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
    /// Each result carries the frame (JPEG).
    pub frames: bool,
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
        frames: bool,
        max_rate_hz: f32,
    ) -> Subscription {
        Subscription {
            id,
            mode,
            prompts,
            encoding,
            multimask,
            frames,
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

    /// Whether `client` is connected and still holds subscription `id`.
    pub fn is_subscribed(&self, client: ClientId, id: u32) -> bool {
        self.lock()
            .get(&client)
            .is_some_and(|c| c.subscriptions.iter().any(|s| s.id == id))
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

    /// Subscriptions of `kind` due for a frame now (rate caps applied and counted), by client.
    /// (On-demand subscriptions are never due: they are answered per request.)
    pub(crate) fn due(
        &self,
        now: Instant,
        kind: SubscriptionKind,
    ) -> Vec<(ClientId, Subscription)> {
        let mut clients = self.lock();
        let mut out = Vec::new();
        for (id, c) in clients.iter_mut() {
            for s in c.subscriptions.iter_mut() {
                if s.mode != kind || s.mode == SubscriptionKind::OnDemand {
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
    pub(crate) fn mark_invalid(&self, client: ClientId, id: u32) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::bounded;

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
            false,
            2.0,
        );
        hub.subscribe(id, sub).unwrap();
        let t0 = Instant::now();
        let everything = SubscriptionKind::Everything;
        assert_eq!(hub.due(t0, everything).len(), 1);
        assert_eq!(
            hub.due(t0 + Duration::from_millis(100), everything).len(),
            0
        );
        assert_eq!(
            hub.due(t0 + Duration::from_millis(600), everything).len(),
            1
        );
        assert_eq!(stats.rate_limited.load(Ordering::Relaxed), 1);
        // Another kind's turn neither takes this one's nor counts it as limited.
        let later = t0 + Duration::from_secs(5);
        assert!(hub.due(later, SubscriptionKind::Prompts).is_empty());
        assert_eq!(hub.due(later, everything).len(), 1);
        assert_eq!(stats.rate_limited.load(Ordering::Relaxed), 1);
        assert!(hub.is_subscribed(id, 1));
        assert!(!hub.is_subscribed(id, 2));
        assert!(hub.unsubscribe(id, 1));
        assert!(!hub.is_subscribed(id, 1));
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
