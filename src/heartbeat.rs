//! Whether the pipeline's stages are getting on with their work, for the service watchdog.
//!
//! systemd restarts a service whose watchdog it stops hearing from; a daemon that pings it from a
//! timer whatever its threads do would never be restarted when one of them hangs. So a stage
//! marks each unit of work it takes on (a frame to encode, a prompt request, a frame's standing
//! prompts, an everything pass) with [`Heartbeat::working`], and beats through the long ones
//! ([`Working::beat`]: the everything pass after every decoder batch). A stage waiting for input
//! is idle, which is never a stall: a camera that went quiet or a `--once` file source that ended
//! stops no ping. The daemon pings only while no stage has been inside one piece of work for
//! longer than the watchdog's interval ([`Heartbeat::stalled_for`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The progress of one pipeline stage.
#[derive(Debug)]
pub struct Heartbeat {
    name: &'static str,
    epoch: Instant,
    /// Nanoseconds from `epoch` (plus one, so that 0 is free) of the last beat of the work in
    /// hand; 0 while the stage is idle.
    last_beat: AtomicU64,
}

impl Heartbeat {
    /// An idle stage called `name`.
    pub fn new(name: &'static str) -> Heartbeat {
        Heartbeat {
            name,
            epoch: Instant::now(),
            last_beat: AtomicU64::new(0),
        }
    }

    /// The stage's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    fn stamp(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.epoch).as_nanos();
        u64::try_from(nanos)
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    /// Start a unit of work; the stage is idle again when the guard is dropped, on every path
    /// out (a panic included).
    pub fn working(&self) -> Working<'_> {
        self.last_beat
            .store(self.stamp(Instant::now()), Ordering::Relaxed);
        Working { heartbeat: self }
    }

    /// How long the work in hand has gone without a beat, as of `now`; `None` while idle.
    pub fn stalled_for(&self, now: Instant) -> Option<Duration> {
        let last = self.last_beat.load(Ordering::Relaxed);
        if last == 0 {
            return None;
        }
        Some(Duration::from_nanos(self.stamp(now).saturating_sub(last)))
    }
}

/// A unit of work in hand (see [`Heartbeat::working`]).
#[derive(Debug)]
pub struct Working<'a> {
    heartbeat: &'a Heartbeat,
}

impl Working<'_> {
    /// Part of the work is done: the stage is making progress.
    pub fn beat(&self) {
        let h = self.heartbeat;
        h.last_beat
            .store(h.stamp(Instant::now()), Ordering::Relaxed);
    }
}

impl Drop for Working<'_> {
    fn drop(&mut self) {
        self.heartbeat.last_beat.store(0, Ordering::Relaxed);
    }
}

/// The first of `stages` that has been inside one piece of work for longer than `limit` without
/// a beat, with how long, as of `now`.
pub fn first_stalled<'a>(
    stages: impl IntoIterator<Item = &'a Heartbeat>,
    limit: Duration,
    now: Instant,
) -> Option<(&'static str, Duration)> {
    stages.into_iter().find_map(|h| {
        h.stalled_for(now)
            .filter(|d| *d > limit)
            .map(|d| (h.name(), d))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_is_never_a_stall() {
        let h = Heartbeat::new("encoder");
        let later = Instant::now() + Duration::from_secs(3600);
        assert_eq!(h.stalled_for(later), None);
        assert_eq!(first_stalled([&h], Duration::ZERO, later), None);
    }

    #[test]
    fn work_without_beats_stalls_and_beats_reset_it() {
        let h = Heartbeat::new("masks");
        let other = Heartbeat::new("encoder");
        let work = h.working();
        let soon = Instant::now() + Duration::from_secs(1);
        let late = Instant::now() + Duration::from_secs(40);
        assert_eq!(
            first_stalled([&other, &h], Duration::from_secs(30), soon),
            None
        );
        let (name, for_how_long) =
            first_stalled([&other, &h], Duration::from_secs(30), late).expect("stalled");
        assert_eq!(name, "masks");
        assert!(for_how_long > Duration::from_secs(30));
        work.beat();
        let after_beat = h.stalled_for(Instant::now()).expect("still working");
        assert!(after_beat < Duration::from_secs(1));
        drop(work);
        assert_eq!(h.stalled_for(late), None);
    }

    #[test]
    fn a_panic_inside_the_work_leaves_the_stage_idle() {
        let h = Heartbeat::new("masks");
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _work = h.working();
            panic!("inside the work");
        }));
        assert!(result.is_err());
        assert_eq!(
            h.stalled_for(Instant::now() + Duration::from_secs(60)),
            None
        );
    }
}
