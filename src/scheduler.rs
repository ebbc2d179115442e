//! Prompt requests waiting for the mask worker: one queue per client, served round-robin.
//!
//! A single first-in-first-out queue lets one client that sends many requests delay every other
//! client behind all of them (a flood of 64 legal requests kept another client's single prompt
//! waiting for seconds). Here each client has its own queue, capped at a number of waiting
//! requests, and the worker takes one request from each client in turn, so a client waits for at
//! most one request of each other client before its own. The whole queue is capped too
//! ([`RequestQueue::new`]): past either cap a request is refused at once (`busy`), the others
//! are not affected. The requests of a client that leaves
//! are dropped with it ([`RequestQueue::cancel`]).
//!
//! The cores are scheduled too ([`EncoderYield`]): while a request is decoded the encoder waits
//! at its next op boundary, so that the request has every thread instead of sharing them with the
//! next frame's encoding (which made a one-prompt request take 3.5 times its standalone time).

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::postprocess::MaskEncoding;
use crate::prompt::Prompt;

/// Server-given client id.
pub type ClientId = u64;

/// A prompt request from a client, for the mask worker.
#[derive(Debug)]
pub struct PromptJob {
    /// Who asked.
    pub client: ClientId,
    /// Their id for it.
    pub request_id: u32,
    /// Frame, or newest.
    pub frame_seq: Option<u64>,
    /// The prompts.
    pub prompts: Vec<Prompt>,
    /// How its masks are to be encoded.
    pub encoding: MaskEncoding,
    /// Three masks per prompt.
    pub multimask: bool,
    /// The answer carries the frame (JPEG).
    pub frames: bool,
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The client already has this many requests waiting.
    #[error("{0} of this client's requests are already waiting; retry when one is answered")]
    ClientFull(usize),
    /// All clients together have this many requests waiting.
    #[error("{0} requests of all clients are already waiting; retry")]
    Full(usize),
    /// The mask worker has stopped.
    #[error("the mask worker has stopped")]
    Closed,
}

#[derive(Default)]
struct Queues {
    /// Only clients with a request waiting: a queue is removed when it empties.
    by_client: BTreeMap<ClientId, VecDeque<PromptJob>>,
    /// The client served last: the next turn goes to the first client after it.
    last_served: Option<ClientId>,
    closed: bool,
}

impl Queues {
    fn waiting(&self) -> usize {
        self.by_client.values().map(VecDeque::len).sum()
    }
}

/// Per-client queues of prompt requests with round-robin service.
pub struct RequestQueue {
    queues: Mutex<Queues>,
    per_client: usize,
    capacity: usize,
    /// Rung (without blocking) when a request is queued: the worker waits on it.
    bell: Sender<()>,
    bell_rx: Receiver<()>,
}

impl RequestQueue {
    /// A queue holding at most `per_client` requests of one client and `capacity` in all
    /// (each at least 1).
    pub fn new(per_client: usize, capacity: usize) -> RequestQueue {
        let (bell, bell_rx) = bounded(1);
        RequestQueue {
            queues: Mutex::new(Queues::default()),
            per_client: per_client.max(1),
            capacity: capacity.max(1),
            bell,
            bell_rx,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queue `job` behind its client's earlier requests.
    pub fn submit(&self, job: PromptJob) -> Result<(), Refusal> {
        let mut q = self.lock();
        if q.closed {
            return Err(Refusal::Closed);
        }
        let waiting = q.waiting();
        if waiting >= self.capacity {
            return Err(Refusal::Full(waiting));
        }
        let mine = q.by_client.entry(job.client).or_default();
        if mine.len() >= self.per_client {
            return Err(Refusal::ClientFull(mine.len()));
        }
        mine.push_back(job);
        drop(q);
        // A full bell already says "something is waiting".
        let _ = self.bell.try_send(());
        Ok(())
    }

    /// The next request: the oldest of the first client, after the one served last, that has
    /// one waiting.
    pub fn pop(&self) -> Option<PromptJob> {
        self.pop_turn(0).into_iter().next()
    }

    /// Requests of different clients to decode together: the oldest request of each client that
    /// has one waiting, in turn from the one after the client served last, until they hold
    /// `max_prompts` prompts (always one request when any is waiting, however many prompts it
    /// has). One request per client: a client's own requests are still answered one after
    /// another, in its order.
    pub fn pop_turn(&self, max_prompts: usize) -> Vec<PromptJob> {
        let mut q = self.lock();
        let clients: Vec<ClientId> = match q.last_served {
            None => q.by_client.keys().copied().collect(),
            Some(last) => q
                .by_client
                .range((Bound::Excluded(last), Bound::Unbounded))
                .chain(q.by_client.range(..=last))
                .map(|(c, _)| *c)
                .collect(),
        };
        let mut jobs = Vec::new();
        let mut prompts = 0usize;
        for client in clients {
            if !jobs.is_empty() && prompts >= max_prompts {
                break;
            }
            let Some(waiting) = q.by_client.get_mut(&client) else {
                continue;
            };
            let Some(job) = waiting.pop_front() else {
                continue;
            };
            if waiting.is_empty() {
                q.by_client.remove(&client);
            }
            prompts = prompts.saturating_add(job.prompts.len());
            q.last_served = Some(client);
            jobs.push(job);
        }
        jobs
    }

    /// Drop every request of `client` (it has gone); returns how many.
    pub fn cancel(&self, client: ClientId) -> usize {
        self.lock()
            .by_client
            .remove(&client)
            .map_or(0, |jobs| jobs.len())
    }

    /// Requests waiting in all.
    pub fn waiting(&self) -> usize {
        self.lock().waiting()
    }

    /// Refuse requests from now on (the worker is stopping).
    pub fn close(&self) {
        self.lock().closed = true;
    }

    /// Ready whenever a request may be waiting (for `select!`); [`pop`](Self::pop) says whether
    /// one is.
    pub fn bell(&self) -> &Receiver<()> {
        &self.bell_rx
    }
}

/// Decoder work that takes the cores from the encoder. While any [`UrgentWork`] guard lives, an
/// encoder calling [`EncoderYield::wait_while_urgent`] between its ops waits (up to a limit the
/// encoder chooses, so that a stream of requests slows frames down but cannot stop them).
#[derive(Default)]
pub struct EncoderYield {
    urgent: Mutex<usize>,
    cleared: Condvar,
}

impl EncoderYield {
    fn lock(&self) -> std::sync::MutexGuard<'_, usize> {
        self.urgent.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Mark urgent work until the guard is dropped (on every exit path, panics included).
    pub fn urgent(&self) -> UrgentWork<'_> {
        let mut urgent = self.lock();
        *urgent = urgent.saturating_add(1);
        UrgentWork { owner: self }
    }

    /// Whether urgent work is under way.
    #[cfg(test)]
    fn is_urgent(&self) -> bool {
        *self.lock() > 0
    }

    /// Block while urgent work is under way, at most `limit`; returns the time waited.
    pub fn wait_while_urgent(&self, limit: Duration) -> Duration {
        let started = Instant::now();
        let urgent = self.lock();
        if *urgent == 0 {
            return Duration::ZERO;
        }
        let _ = self
            .cleared
            .wait_timeout_while(urgent, limit, |n| *n > 0)
            .unwrap_or_else(PoisonError::into_inner);
        started.elapsed()
    }
}

/// Urgent work in progress (see [`EncoderYield::urgent`]).
pub struct UrgentWork<'a> {
    owner: &'a EncoderYield,
}

impl Drop for UrgentWork<'_> {
    fn drop(&mut self) {
        let mut urgent = self.owner.lock();
        *urgent = urgent.saturating_sub(1);
        if *urgent == 0 {
            self.owner.cleared.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(client: ClientId, request_id: u32) -> PromptJob {
        PromptJob {
            client,
            request_id,
            frame_seq: None,
            prompts: Vec::new(),
            encoding: MaskEncoding::Rle,
            multimask: false,
            frames: false,
        }
    }

    fn order(q: &RequestQueue) -> Vec<(ClientId, u32)> {
        std::iter::from_fn(|| q.pop())
            .map(|j| (j.client, j.request_id))
            .collect()
    }

    #[test]
    fn clients_take_turns_and_each_keeps_its_order() {
        let q = RequestQueue::new(8, 64);
        for r in 0..4 {
            q.submit(job(1, r)).unwrap();
        }
        q.submit(job(2, 10)).unwrap();
        q.submit(job(3, 20)).unwrap();
        q.submit(job(3, 21)).unwrap();
        assert_eq!(
            order(&q),
            [(1, 0), (2, 10), (3, 20), (1, 1), (3, 21), (1, 2), (1, 3)]
        );
        assert_eq!(q.waiting(), 0);
    }

    #[test]
    fn a_late_client_is_served_after_at_most_one_request_of_each_other() {
        let q = RequestQueue::new(16, 64);
        for r in 0..16 {
            q.submit(job(7, r)).unwrap();
        }
        assert_eq!(q.pop().map(|j| j.request_id), Some(0));
        // Client 2 (a lower id than the flood's) arrives while the flood is being served.
        q.submit(job(2, 100)).unwrap();
        assert_eq!(q.pop().map(|j| (j.client, j.request_id)), Some((2, 100)));
        assert_eq!(q.pop().map(|j| j.request_id), Some(1));
    }

    fn prompts(client: ClientId, request_id: u32, n: usize) -> PromptJob {
        PromptJob {
            prompts: vec![Prompt::point(1.0, 1.0); n],
            ..job(client, request_id)
        }
    }

    #[test]
    fn a_turn_takes_one_request_per_client_up_to_the_prompt_budget() {
        let q = RequestQueue::new(8, 64);
        for r in 0..3 {
            q.submit(prompts(1, r, 1)).unwrap();
        }
        q.submit(prompts(2, 10, 1)).unwrap();
        q.submit(prompts(3, 20, 3)).unwrap();
        q.submit(prompts(4, 30, 1)).unwrap();
        let ids = |jobs: Vec<PromptJob>| -> Vec<(ClientId, u32)> {
            jobs.into_iter().map(|j| (j.client, j.request_id)).collect()
        };
        // Clients 1, 2 and 3 in turn; 3's three prompts fill the budget of 4.
        assert_eq!(ids(q.pop_turn(4)), [(1, 0), (2, 10), (3, 20)]);
        // The next turn starts after client 3, wraps round, and never takes two of client 1's.
        assert_eq!(ids(q.pop_turn(4)), [(4, 30), (1, 1)]);
        // A request larger than the budget still goes, alone.
        q.submit(prompts(2, 11, 9)).unwrap();
        assert_eq!(ids(q.pop_turn(4)), [(2, 11)]);
        assert_eq!(ids(q.pop_turn(4)), [(1, 2)]);
        assert!(q.pop_turn(4).is_empty());
    }

    #[test]
    fn a_full_client_is_refused_and_the_others_are_not() {
        let q = RequestQueue::new(2, 3);
        q.submit(job(1, 0)).unwrap();
        q.submit(job(1, 1)).unwrap();
        assert_eq!(q.submit(job(1, 2)), Err(Refusal::ClientFull(2)));
        q.submit(job(2, 0)).unwrap();
        // Three waiting in all: the cap of the whole queue.
        assert_eq!(q.submit(job(3, 0)), Err(Refusal::Full(3)));
        assert_eq!(q.pop().map(|j| j.client), Some(1));
        q.submit(job(3, 0)).unwrap();
        assert_eq!(order(&q), [(2, 0), (3, 0), (1, 1)]);
    }

    #[test]
    fn a_cancelled_client_frees_its_places() {
        let q = RequestQueue::new(4, 4);
        for r in 0..4 {
            q.submit(job(5, r)).unwrap();
        }
        assert_eq!(q.submit(job(6, 0)), Err(Refusal::Full(4)));
        assert_eq!(q.cancel(5), 4);
        assert_eq!(q.cancel(5), 0);
        q.submit(job(6, 0)).unwrap();
        assert_eq!(order(&q), [(6, 0)]);
    }

    #[test]
    fn the_bell_rings_for_a_queued_request_and_a_closed_queue_refuses() {
        let q = RequestQueue::new(4, 4);
        assert!(q.bell().try_recv().is_err());
        q.submit(job(1, 0)).unwrap();
        q.submit(job(1, 1)).unwrap();
        assert!(q.bell().try_recv().is_ok());
        q.close();
        assert_eq!(q.submit(job(1, 2)), Err(Refusal::Closed));
        // What was queued before is still served.
        assert_eq!(order(&q), [(1, 0), (1, 1)]);
    }

    #[test]
    fn the_encoder_waits_while_urgent_work_lasts_and_no_longer() {
        let share = std::sync::Arc::new(EncoderYield::default());
        assert_eq!(
            share.wait_while_urgent(Duration::from_secs(5)),
            Duration::ZERO
        );
        let urgent = share.urgent();
        let nested = share.urgent();
        assert!(share.is_urgent());
        let started = std::sync::Arc::new(std::sync::Barrier::new(2));
        let encoder = {
            let (share, started) = (share.clone(), started.clone());
            std::thread::spawn(move || {
                started.wait();
                share.wait_while_urgent(Duration::from_secs(30))
            })
        };
        started.wait();
        std::thread::sleep(Duration::from_millis(50));
        drop(nested);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!encoder.is_finished(), "one guard is still alive");
        drop(urgent);
        // (How long it waited depends on when the thread got the core: only the bound is sure.)
        let waited = encoder.join().expect("the waiting thread");
        assert!(
            waited < Duration::from_secs(30),
            "woken when the work ended"
        );
        assert!(!share.is_urgent());
    }

    #[test]
    fn the_wait_is_bounded_and_a_panic_releases_the_guard() {
        let share = std::sync::Arc::new(EncoderYield::default());
        let urgent = share.urgent();
        let waited = share.wait_while_urgent(Duration::from_millis(30));
        assert!(waited >= Duration::from_millis(30) && waited < Duration::from_secs(10));
        drop(urgent);
        let panicking = {
            let share = share.clone();
            std::thread::spawn(move || {
                let _urgent = share.urgent();
                panic!("a decoder failure");
            })
        };
        assert!(panicking.join().is_err());
        assert!(!share.is_urgent());
        assert_eq!(
            share.wait_while_urgent(Duration::from_secs(5)),
            Duration::ZERO
        );
    }
}
