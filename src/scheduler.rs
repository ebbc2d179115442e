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

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::{Mutex, PoisonError};

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::pipeline::{ClientId, PromptJob};

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
        let mut q = self.lock();
        let after = q.last_served.map_or(Bound::Unbounded, Bound::Excluded);
        let next = q
            .by_client
            .range((after, Bound::Unbounded))
            .chain(q.by_client.iter())
            .map(|(c, _)| *c)
            .next()?;
        let jobs = q.by_client.get_mut(&next)?;
        let job = jobs.pop_front();
        if jobs.is_empty() {
            q.by_client.remove(&next);
        }
        q.last_served = Some(next);
        job
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::MaskEncoding;

    fn job(client: ClientId, request_id: u32) -> PromptJob {
        PromptJob {
            client,
            request_id,
            frame_seq: None,
            prompts: Vec::new(),
            encoding: MaskEncoding::Rle,
            multimask: false,
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
}
