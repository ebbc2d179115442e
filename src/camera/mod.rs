//! Frame sources: V4L2 cameras, image files or directories, and a synthetic moving pattern, all
//! behind [`FrameSource`], each yielding RGB8 frames with a sequence number and a CLOCK_MONOTONIC
//! capture time.
//!
//! Only the `v4l2` submodule talks to `v4l`. A camera that fails mid-stream is reopened with backoff by
//! [`Reopening`], which works on any [`CameraOpener`] so tests drive it with a fake device.

mod file;
mod reopen;
mod synthetic;
mod v4l2;

pub use file::FileSource;
pub use reopen::{CameraOpener, CameraRequest, Reopening};
pub use synthetic::SyntheticSource;
pub use v4l2::{list_cameras, CameraDescription, V4l2Opener};

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use image::RgbImage;
use serde::Serialize;

use crate::pixel::{self, PixelError, PixelFormat};

/// One RGB frame as it left the camera.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Sequence number, strictly increasing for the life of the source (also across reopens).
    pub seq: u64,
    /// Capture time, CLOCK_MONOTONIC nanoseconds (from the V4L2 buffer where it has one).
    pub captured_ns: u64,
    /// The pixels.
    pub image: RgbImage,
    /// Time spent turning the camera buffer into RGB.
    pub convert: Duration,
}

impl Frame {
    /// Frame `seq` captured at `captured_ns`, whose conversion to RGB started at `started`.
    pub(crate) fn converted_since(
        seq: u64,
        captured_ns: u64,
        image: RgbImage,
        started: Instant,
    ) -> Frame {
        Frame {
            seq,
            captured_ns,
            image,
            convert: started.elapsed(),
        }
    }
}

/// What a source is, for status reports.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceInfo {
    /// The source as configured (`synthetic`, `file:...`, `v4l2:...`).
    pub uri: String,
    /// Frame width.
    pub width: u32,
    /// Frame height.
    pub height: u32,
    /// Camera pixel format, for V4L2 sources.
    pub format: Option<String>,
    /// Frame rate asked of the source (0: as fast as it goes).
    pub fps: f32,
}

/// Why a source could not deliver a frame.
#[derive(Debug, thiserror::Error)]
pub enum CameraError {
    /// The device could not be opened or configured.
    #[error("opening camera {device}")]
    Open {
        /// Device path.
        device: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The device has no format we can convert, or the negotiated one is unusable.
    #[error("camera {device}: {reason}")]
    Format {
        /// Device path.
        device: String,
        /// What is wrong.
        reason: String,
    },
    /// Reading from the device failed (unplugged, ENODEV, timeout): the stream must be reopened.
    #[error("reading from camera {device}")]
    Capture {
        /// Device path.
        device: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// One frame was corrupt; the next may be fine.
    #[error("frame {seq} dropped")]
    Corrupt {
        /// Sequence number the frame would have had.
        seq: u64,
        /// The conversion error.
        #[source]
        source: PixelError,
    },
    /// An image file that cannot be read; the next may be fine.
    #[error("image file {path}: {reason}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file source with nothing to show.
    #[error("file source {path}: {reason}")]
    NoImages {
        /// The path given.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl CameraError {
    /// True if this error costs one frame only and the stream goes on.
    pub fn is_frame_error(&self) -> bool {
        matches!(
            self,
            CameraError::Corrupt { .. } | CameraError::BadFile { .. }
        )
    }
}

/// A stream of frames.
pub trait FrameSource: Send {
    /// The next frame; `Ok(None)` when the source has ended (a file source played once).
    fn next_frame(&mut self) -> Result<Option<Frame>, CameraError>;
    /// What this source is.
    fn info(&self) -> SourceInfo;
    /// Times the source lost its device and reopened it.
    fn reopens(&self) -> u64 {
        0
    }
}

/// Sleeps until frame `index` is due at `fps` (no sleep at fps 0), waking early on `stop`.
/// The clock starts at the first frame, so time spent loading the model is not caught up on.
pub(crate) struct Pacer {
    start: Option<(Instant, u64)>,
    fps: f32,
}

impl Pacer {
    pub(crate) fn new(fps: f32) -> Pacer {
        Pacer { start: None, fps }
    }

    pub(crate) fn wait(&mut self, index: u64, stop: &AtomicBool) {
        if self.fps <= 0.0 {
            return;
        }
        let (start, first) = *self.start.get_or_insert((Instant::now(), index));
        let due = start
            + Duration::from_secs_f64(index.saturating_sub(first) as f64 / f64::from(self.fps));
        sleep_until(due, stop);
    }
}

/// Sleep until `until`, in steps of at most 50 ms so that `stop` ends the wait early.
pub fn sleep_until(until: Instant, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= until {
            return;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(50)));
    }
}
