//! One-slot queues with latest-wins semantics, between the daemon's stages: a new item replaces
//! the one still waiting (counted), so the stage after always works on the newest frame and
//! nothing backs up.

use std::sync::{Arc, Weak};

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
