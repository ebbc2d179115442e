//! A camera that fails mid-stream is reopened with backoff; [`Reopening`] works on any
//! [`CameraOpener`], so tests drive it with a fake device.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{CameraError, Frame, FrameSource, SourceInfo};
use crate::error_chain;
use crate::pixel::PixelFormat;

/// What to ask of a V4L2 camera.
#[derive(Debug, Clone, PartialEq)]
pub struct CameraRequest {
    /// Device node, e.g. `/dev/video0`.
    pub device: PathBuf,
    /// Wanted width (the driver may pick the nearest it has).
    pub width: u32,
    /// Wanted height.
    pub height: u32,
    /// Wanted frame rate (0: leave the driver's).
    pub fps: f32,
    /// Pixel format; `None` tries MJPEG, YUYV, NV12, RGB24 in that order.
    pub format: Option<PixelFormat>,
}

/// Something that opens a camera stream; [`Reopening`] calls it again after a failure.
pub trait CameraOpener: Send {
    /// Open (or reopen) the stream.
    fn open(&mut self) -> Result<Box<dyn FrameSource>, CameraError>;
    /// The device, for logs.
    fn device(&self) -> String;
}

/// A source that reopens its camera with exponential backoff (100 ms to 5 s) when the stream
/// fails, and keeps sequence numbers increasing across reopens.
pub struct Reopening<O: CameraOpener> {
    opener: O,
    stream: Option<Box<dyn FrameSource>>,
    last_info: Option<SourceInfo>,
    next_seq: u64,
    stop: Arc<AtomicBool>,
    /// Backoff bounds.
    backoff: (Duration, Duration),
    reopens: u64,
}

impl<O: CameraOpener> Reopening<O> {
    /// Wrap `opener`; the first open happens on the first frame request.
    pub fn new(opener: O, stop: Arc<AtomicBool>) -> Reopening<O> {
        Reopening {
            opener,
            stream: None,
            last_info: None,
            next_seq: 0,
            stop,
            backoff: (Duration::from_millis(100), Duration::from_secs(5)),
            reopens: 0,
        }
    }

    /// Use other backoff bounds (tests use milliseconds).
    pub fn with_backoff(mut self, first: Duration, max: Duration) -> Reopening<O> {
        self.backoff = (first, max);
        self
    }

    /// Open the stream, retrying until it opens or `stop` is set (then `None`).
    fn ensure_open(&mut self) -> Option<&mut Box<dyn FrameSource>> {
        let mut delay = self.backoff.0;
        let mut attempt = 0u32;
        while self.stream.is_none() {
            if self.stop.load(Ordering::Relaxed) {
                return None;
            }
            match self.opener.open() {
                Ok(stream) => {
                    if attempt > 0 || self.last_info.is_some() {
                        log::info!("camera {} is back", self.opener.device());
                    }
                    self.last_info = Some(stream.info());
                    self.stream = Some(stream);
                }
                Err(e) => {
                    if attempt == 0 {
                        log::warn!("{}; retrying", error_chain(&e));
                    } else {
                        log::debug!("reopen attempt {attempt}: {}", error_chain(&e));
                    }
                    attempt += 1;
                    let until = Instant::now() + delay;
                    while Instant::now() < until && !self.stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    delay = (delay * 2).min(self.backoff.1);
                }
            }
        }
        self.stream.as_mut()
    }
}

impl<O: CameraOpener> FrameSource for Reopening<O> {
    fn next_frame(&mut self) -> Result<Option<Frame>, CameraError> {
        loop {
            let Some(stream) = self.ensure_open() else {
                return Ok(None);
            };
            match stream.next_frame() {
                Ok(Some(mut frame)) => {
                    frame.seq = self.next_seq;
                    self.next_seq += 1;
                    return Ok(Some(frame));
                }
                Ok(None) => return Ok(None),
                Err(e) if e.is_frame_error() => {
                    let seq = self.next_seq;
                    self.next_seq += 1;
                    return Err(match e {
                        CameraError::Corrupt { source, .. } => CameraError::Corrupt { seq, source },
                        other => other,
                    });
                }
                Err(e) => {
                    log::warn!("{}; reopening", error_chain(&e));
                    self.stream = None;
                    self.reopens += 1;
                }
            }
        }
    }

    fn reopens(&self) -> u64 {
        self.reopens
    }

    fn info(&self) -> SourceInfo {
        self.stream
            .as_ref()
            .map(|s| s.info())
            .or_else(|| self.last_info.clone())
            .unwrap_or(SourceInfo {
                uri: format!("v4l2:{}", self.opener.device()),
                width: 0,
                height: 0,
                format: None,
                fps: 0.0,
            })
    }
}
