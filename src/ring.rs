//! The embeddings of the last frames the encoder finished, so that a prompt that names a recent
//! frame is answered against that frame.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use crate::hub::{Failure, FailureKind};
use crate::model::Embedding;
use crate::picture::FramePicture;

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
    /// The frame's pixels, for results that carry the frame.
    pub picture: Arc<FramePicture>,
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
