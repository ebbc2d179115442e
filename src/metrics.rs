//! Daemon metrics: rolling per-stage latency (p50/p95 over the last samples), frame counters and
//! the encoder's recent frame rate. Cheap to record from any thread.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

/// Rolling latency of one stage.
#[derive(Debug, Clone, PartialEq)]
pub struct StageLatency {
    /// Stage name.
    pub stage: &'static str,
    /// Samples in the window.
    pub count: u64,
    /// Median, ms.
    pub p50_ms: f32,
    /// 95th percentile, ms.
    pub p95_ms: f32,
}
use std::time::{Duration, Instant};

/// Samples kept per stage.
const WINDOW: usize = 512;

/// Pipeline stages with a latency window, in flow order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Capture timestamp to RGB frame ready (driver queue, dequeue, conversion).
    Capture,
    /// Camera buffer to RGB.
    Convert,
    /// Resize, normalise, pad.
    Preprocess,
    /// Image encoder.
    Encode,
    /// Prompt decoder (standing prompts and requests).
    Decode,
    /// Segment everything.
    Everything,
    /// Mask encoding and socket write, per message.
    Publish,
    /// Capture time to the end of the socket write.
    EndToEnd,
}

impl Stage {
    /// All stages.
    pub const ALL: [Stage; 8] = [
        Stage::Capture,
        Stage::Convert,
        Stage::Preprocess,
        Stage::Encode,
        Stage::Decode,
        Stage::Everything,
        Stage::Publish,
        Stage::EndToEnd,
    ];

    /// Name in logs and status.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Capture => "capture",
            Stage::Convert => "convert",
            Stage::Preprocess => "preprocess",
            Stage::Encode => "encode",
            Stage::Decode => "decode",
            Stage::Everything => "everything",
            Stage::Publish => "publish",
            Stage::EndToEnd => "capture_to_publish",
        }
    }
}

/// Frame counters, shared by the pipeline threads.
#[derive(Debug, Default)]
pub struct Counters {
    /// Frames delivered by the source.
    pub captured: AtomicU64,
    /// Frames replaced before the encoder took them.
    pub dropped: AtomicU64,
    /// Encoded frames the mask worker never saw (it was busy).
    pub skipped: AtomicU64,
    /// Corrupt frames.
    pub corrupt: AtomicU64,
    /// Frames encoded.
    pub encoded: AtomicU64,
    /// Camera reopens after the device failed.
    pub reopens: AtomicU64,
    /// Everything passes begun.
    pub everything_started: AtomicU64,
    /// Everything passes stopped before their end because all their subscribers had left.
    pub everything_stopped: AtomicU64,
}

impl Counters {
    /// Read a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Add one.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything the daemon measures.
pub struct Metrics {
    windows: Mutex<Vec<VecDeque<f32>>>,
    encode_times: Mutex<VecDeque<Instant>>,
    /// Frame counters.
    pub counters: Counters,
    /// Daemon start.
    pub started: Instant,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Empty metrics.
    pub fn new() -> Metrics {
        Metrics {
            windows: Mutex::new(vec![VecDeque::with_capacity(WINDOW); Stage::ALL.len()]),
            encode_times: Mutex::new(VecDeque::with_capacity(64)),
            counters: Counters::default(),
            started: Instant::now(),
        }
    }

    /// Record one sample of `stage`.
    pub fn record(&self, stage: Stage, took: Duration) {
        let mut windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        let i = Stage::ALL.iter().position(|s| *s == stage).unwrap_or(0);
        let w = &mut windows[i];
        if w.len() == WINDOW {
            w.pop_front();
        }
        w.push_back(took.as_secs_f32() * 1000.0);
    }

    /// Note that a frame finished encoding now (for the frame rate).
    pub fn frame_encoded(&self) {
        Counters::bump(&self.counters.encoded);
        let mut times = self
            .encode_times
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if times.len() == 64 {
            times.pop_front();
        }
        times.push_back(Instant::now());
    }

    /// Encoded frames per second over the recent window (0 with fewer than two frames).
    pub fn fps(&self) -> f32 {
        let times = self
            .encode_times
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match (times.front(), times.back()) {
            (Some(a), Some(b)) if times.len() > 1 && b > a => {
                (times.len() - 1) as f32 / (*b - *a).as_secs_f32()
            }
            _ => 0.0,
        }
    }

    /// p50/p95 of every stage with samples.
    pub fn latencies(&self) -> Vec<StageLatency> {
        let windows = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        Stage::ALL
            .iter()
            .zip(windows.iter())
            .filter(|(_, w)| !w.is_empty())
            .map(|(stage, w)| {
                let mut v: Vec<f32> = w.iter().copied().collect();
                v.sort_by(f32::total_cmp);
                StageLatency {
                    stage: stage.name(),
                    count: v.len() as u64,
                    p50_ms: percentile(&v, 0.50),
                    p95_ms: percentile(&v, 0.95),
                }
            })
            .collect()
    }

    /// One log line: fps, counters and stage latencies.
    pub fn summary(&self) -> String {
        let c = &self.counters;
        let mut line = format!(
            "fps {:.2}, frames captured {} encoded {} dropped {} skipped {} corrupt {}",
            self.fps(),
            Counters::get(&c.captured),
            Counters::get(&c.encoded),
            Counters::get(&c.dropped),
            Counters::get(&c.skipped),
            Counters::get(&c.corrupt),
        );
        for l in self.latencies() {
            line.push_str(&format!(
                "; {} p50 {:.1} p95 {:.1} ms",
                l.stage, l.p50_ms, l.p95_ms
            ));
        }
        line
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f32], q: f32) -> f32 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f32).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f32> = (1..=100).map(|i| i as f32).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.95), 95.0);
        assert_eq!(percentile(&[3.0], 0.95), 3.0);
    }

    #[test]
    fn window_keeps_recent_samples() {
        let m = Metrics::new();
        for i in 0..(WINDOW + 10) {
            m.record(Stage::Encode, Duration::from_millis(i as u64));
        }
        let l = &m.latencies()[0];
        assert_eq!(l.count, WINDOW as u64);
        assert!(l.p50_ms >= 10.0 + (WINDOW as f32) / 2.0 - 1.0);
    }
}
