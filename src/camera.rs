//! Frame sources: V4L2 cameras, image files or directories, and a synthetic moving pattern, all
//! behind [`FrameSource`], each yielding RGB8 frames with a sequence number and a CLOCK_MONOTONIC
//! capture time.
//!
//! Only this module talks to `v4l`. A camera that fails mid-stream is reopened with backoff by
//! [`Reopening`], which works on any [`CameraOpener`] so tests drive it with a fake device.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::{error_chain, monotonic_now_ns};

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

/// What a source is, for status reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
struct Pacer {
    start: Option<(Instant, u64)>,
    fps: f32,
}

impl Pacer {
    fn new(fps: f32) -> Pacer {
        Pacer { start: None, fps }
    }

    fn wait(&mut self, index: u64, stop: &AtomicBool) {
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

/// A moving test pattern: a gradient background with a disc and a square that move, so that
/// prompts land on objects whose masks change from frame to frame.
pub struct SyntheticSource {
    width: u32,
    height: u32,
    pacer: Pacer,
    seq: u64,
    stop: Arc<AtomicBool>,
}

impl SyntheticSource {
    /// A `width` x `height` pattern at `fps` (0: as fast as asked).
    pub fn new(width: u32, height: u32, fps: f32, stop: Arc<AtomicBool>) -> SyntheticSource {
        SyntheticSource {
            width,
            height,
            pacer: Pacer::new(fps),
            seq: 0,
            stop,
        }
    }

    /// Frame `seq` of the pattern (deterministic).
    pub fn render(width: u32, height: u32, seq: u64) -> RgbImage {
        let (w, h) = (width as f32, height as f32);
        let t = seq as f32;
        let disc = (w * (0.3 + 0.2 * (t * 0.05).sin()), h * 0.5, w.min(h) * 0.18);
        let side = w.min(h) * 0.25;
        let square = (w * 0.65, h * (0.2 + 0.3 * (0.5 + 0.5 * (t * 0.07).cos())));
        RgbImage::from_fn(width, height, |x, y| {
            let (fx, fy) = (x as f32, y as f32);
            let (dx, dy) = (fx - disc.0, fy - disc.1);
            if dx * dx + dy * dy <= disc.2 * disc.2 {
                return image::Rgb([220, 60, 40]);
            }
            if fx >= square.0 && fx < square.0 + side && fy >= square.1 && fy < square.1 + side {
                return image::Rgb([40, 90, 210]);
            }
            let g = (60.0 + 80.0 * fx / w + 40.0 * fy / h) as u8;
            image::Rgb([g, g.saturating_add(20), g / 2 + 40])
        })
    }
}

impl FrameSource for SyntheticSource {
    fn next_frame(&mut self) -> Result<Option<Frame>, CameraError> {
        self.pacer.wait(self.seq, &self.stop);
        let captured_ns = monotonic_now_ns();
        let started = Instant::now();
        let image = SyntheticSource::render(self.width, self.height, self.seq);
        let frame = Frame {
            seq: self.seq,
            captured_ns,
            image,
            convert: started.elapsed(),
        };
        self.seq += 1;
        Ok(Some(frame))
    }

    fn info(&self) -> SourceInfo {
        SourceInfo {
            uri: "synthetic".into(),
            width: self.width,
            height: self.height,
            format: None,
            fps: self.pacer.fps,
        }
    }
}

/// A still image or a directory of images (PNG/JPEG, sorted by name), played once or looped.
pub struct FileSource {
    path: PathBuf,
    files: Vec<PathBuf>,
    looped: bool,
    pacer: Pacer,
    seq: u64,
    stop: Arc<AtomicBool>,
    last_size: (u32, u32),
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        .unwrap_or(false)
}

impl FileSource {
    /// Open `path` (file or directory) at `fps` (0: as fast as asked).
    pub fn open(
        path: &Path,
        looped: bool,
        fps: f32,
        stop: Arc<AtomicBool>,
    ) -> Result<FileSource, CameraError> {
        let no_images = |reason: String| CameraError::NoImages {
            path: path.to_path_buf(),
            reason,
        };
        let files = if path.is_dir() {
            let entries = std::fs::read_dir(path).map_err(|e| no_images(e.to_string()))?;
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_image(p))
                .collect();
            files.sort();
            files
        } else if path.is_file() {
            vec![path.to_path_buf()]
        } else {
            return Err(no_images("no such file or directory".into()));
        };
        if files.is_empty() {
            return Err(no_images("directory has no .png/.jpg/.jpeg files".into()));
        }
        let first = image::image_dimensions(&files[0]).unwrap_or((0, 0));
        Ok(FileSource {
            path: path.to_path_buf(),
            files,
            looped,
            pacer: Pacer::new(fps),
            seq: 0,
            stop,
            last_size: first,
        })
    }
}

impl FrameSource for FileSource {
    fn next_frame(&mut self) -> Result<Option<Frame>, CameraError> {
        let n = self.files.len() as u64;
        if !self.looped && self.seq >= n {
            return Ok(None);
        }
        self.pacer.wait(self.seq, &self.stop);
        let path = &self.files[(self.seq % n) as usize];
        let seq = self.seq;
        self.seq += 1;
        let captured_ns = monotonic_now_ns();
        let started = Instant::now();
        let image = crate::pixel::read_image(path).map_err(|e| CameraError::BadFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        self.last_size = image.dimensions();
        Ok(Some(Frame {
            seq,
            captured_ns,
            image,
            convert: started.elapsed(),
        }))
    }

    fn info(&self) -> SourceInfo {
        SourceInfo {
            uri: format!("file:{}", self.path.display()),
            width: self.last_size.0,
            height: self.last_size.1,
            format: None,
            fps: self.pacer.fps,
        }
    }
}

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

pub use v4l2::{list_cameras, CameraDescription, V4l2Opener};

/// The V4L2 side: negotiation, mmap streaming, device listing.
mod v4l2 {
    use super::*;
    use v4l::buffer::Type;
    use v4l::io::traits::CaptureStream;
    use v4l::prelude::MmapStream;
    use v4l::video::Capture;
    use v4l::{Device, FourCC};

    /// Formats tried when none is asked for, best first (MJPEG saves USB bandwidth).
    const PREFERENCE: [PixelFormat; 4] = [
        PixelFormat::Mjpeg,
        PixelFormat::Yuyv,
        PixelFormat::Nv12,
        PixelFormat::Rgb24,
    ];

    /// How long a dequeue may block before the stream counts as lost.
    const DEQUEUE_TIMEOUT: Duration = Duration::from_secs(2);

    /// Opens a V4L2 device per a [`CameraRequest`].
    pub struct V4l2Opener {
        /// What to ask for.
        pub request: CameraRequest,
    }

    struct V4l2Stream {
        // Field order matters: the stream unmaps its buffers before the device closes.
        stream: MmapStream<'static>,
        _device: Device,
        device_name: String,
        format: PixelFormat,
        width: u32,
        height: u32,
        stride: usize,
        fps: f32,
        seq: u64,
    }

    impl CameraOpener for V4l2Opener {
        fn device(&self) -> String {
            self.request.device.display().to_string()
        }

        fn open(&mut self) -> Result<Box<dyn FrameSource>, CameraError> {
            let name = self.device();
            let open_err = |source| CameraError::Open {
                device: name.clone(),
                source,
            };
            let device = Device::with_path(&self.request.device).map_err(open_err)?;
            let offered: Vec<PixelFormat> = device
                .enum_formats()
                .map_err(open_err)?
                .iter()
                .filter_map(|d| PixelFormat::from_fourcc(d.fourcc.repr))
                .collect();
            let wanted: Vec<PixelFormat> = match self.request.format {
                Some(f) => vec![f],
                None => PREFERENCE.to_vec(),
            };
            let Some(format) = wanted.into_iter().find(|f| offered.contains(f)) else {
                return Err(CameraError::Format {
                    device: name,
                    reason: format!(
                        "offers none of the wanted formats (offers: {})",
                        offered
                            .iter()
                            .map(|f| f.name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            };
            let mut fmt = device.format().map_err(open_err)?;
            fmt.width = self.request.width;
            fmt.height = self.request.height;
            fmt.fourcc = FourCC::new(&format.fourcc());
            // Let the driver choose line and buffer size for the new format: values left from the
            // previous format (another process's RGB24, say) would be kept as padding.
            fmt.stride = 0;
            fmt.size = 0;
            let fmt = device.set_format(&fmt).map_err(open_err)?;
            if fmt.fourcc.repr != format.fourcc() {
                return Err(CameraError::Format {
                    device: name,
                    reason: format!("driver switched the format to {:?}", fmt.fourcc.str()),
                });
            }
            if fmt.width == 0 || fmt.height == 0 || fmt.width > 8192 || fmt.height > 8192 {
                return Err(CameraError::Format {
                    device: name,
                    reason: format!("unusable frame size {}x{}", fmt.width, fmt.height),
                });
            }
            if self.request.fps > 0.0 {
                let fps = self.request.fps.round().max(1.0) as u32;
                if let Err(e) = device.set_params(&v4l::video::capture::Parameters::with_fps(fps)) {
                    log::warn!("camera {name}: cannot set {fps} fps: {e}");
                }
            }
            let mut stream =
                MmapStream::with_buffers(&device, Type::VideoCapture, 4).map_err(open_err)?;
            stream.set_timeout(DEQUEUE_TIMEOUT);
            log::info!(
                "camera {name}: {}x{} {} (stride {})",
                fmt.width,
                fmt.height,
                format.name(),
                fmt.stride
            );
            Ok(Box::new(V4l2Stream {
                stream,
                _device: device,
                device_name: name,
                format,
                width: fmt.width,
                height: fmt.height,
                stride: fmt.stride as usize,
                fps: self.request.fps,
                seq: 0,
            }))
        }
    }

    impl FrameSource for V4l2Stream {
        fn next_frame(&mut self) -> Result<Option<Frame>, CameraError> {
            let (data, meta) = self.stream.next().map_err(|source| CameraError::Capture {
                device: self.device_name.clone(),
                source,
            })?;
            let seq = self.seq;
            self.seq += 1;
            let ts = meta.timestamp;
            let monotonic = meta.flags.contains(v4l::buffer::Flags::TIMESTAMP_MONOTONIC);
            let captured_ns = if monotonic && (ts.sec > 0 || ts.usec > 0) {
                (ts.sec as u64) * 1_000_000_000 + (ts.usec as u64) * 1000
            } else {
                monotonic_now_ns()
            };
            let used = (meta.bytesused as usize).min(data.len());
            let bytes = if used > 0 { &data[..used] } else { data };
            let started = Instant::now();
            let mut image = RgbImage::new(self.width, self.height);
            pixel::to_rgb(
                self.format,
                bytes,
                self.width,
                self.height,
                self.stride,
                &mut image,
            )
            .map_err(|source| CameraError::Corrupt { seq, source })?;
            Ok(Some(Frame {
                seq,
                captured_ns,
                image,
                convert: started.elapsed(),
            }))
        }

        fn info(&self) -> SourceInfo {
            SourceInfo {
                uri: format!("v4l2:{}", self.device_name),
                width: self.width,
                height: self.height,
                format: Some(self.format.name().into()),
                fps: self.fps,
            }
        }
    }

    /// A V4L2 capture device and the formats and sizes it offers.
    #[derive(Debug, Clone, Serialize)]
    pub struct CameraDescription {
        /// Device node.
        pub path: PathBuf,
        /// Driver and card name.
        pub name: String,
        /// `fourcc (supported?) sizes`.
        pub formats: Vec<String>,
    }

    /// Every `/dev/video*` node that can capture, with its formats.
    pub fn list_cameras() -> Vec<CameraDescription> {
        let mut out = Vec::new();
        for node in v4l::context::enum_devices() {
            let path = node.path().to_path_buf();
            let Ok(device) = Device::with_path(&path) else {
                continue;
            };
            let Ok(caps) = device.query_caps() else {
                continue;
            };
            let formats = device.enum_formats().unwrap_or_default();
            if formats.is_empty() {
                continue;
            }
            let formats = formats
                .iter()
                .map(|f| {
                    let code = String::from_utf8_lossy(&f.fourcc.repr).into_owned();
                    let ours = if PixelFormat::from_fourcc(f.fourcc.repr).is_some() {
                        "supported"
                    } else {
                        "not supported"
                    };
                    let sizes: Vec<String> = device
                        .enum_framesizes(f.fourcc)
                        .unwrap_or_default()
                        .into_iter()
                        .flat_map(|s| s.size.to_discrete())
                        .take(12)
                        .map(|d| format!("{}x{}", d.width, d.height))
                        .collect();
                    format!("{code} ({ours}): {}", sizes.join(" "))
                })
                .collect();
            out.push(CameraDescription {
                path,
                name: format!("{} ({})", caps.card, caps.driver),
                formats,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_frames_move_and_count() {
        let stop = Arc::new(AtomicBool::new(false));
        let mut src = SyntheticSource::new(64, 48, 0.0, stop);
        let a = src.next_frame().unwrap().unwrap();
        let b = src.next_frame().unwrap().unwrap();
        assert_eq!((a.seq, b.seq), (0, 1));
        assert!(b.captured_ns >= a.captured_ns);
        assert_eq!(a.image.dimensions(), (64, 48));
        assert_ne!(a.image, SyntheticSource::render(64, 48, 30));
    }

    #[test]
    fn file_source_plays_once_or_loops() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..2 {
            RgbImage::new(8, 6)
                .save(dir.path().join(format!("{i}.png")))
                .unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let mut once = FileSource::open(dir.path(), false, 0.0, stop.clone()).unwrap();
        assert_eq!(once.next_frame().unwrap().unwrap().seq, 0);
        assert_eq!(once.next_frame().unwrap().unwrap().seq, 1);
        assert!(once.next_frame().unwrap().is_none());
        let mut looped = FileSource::open(dir.path(), true, 0.0, stop.clone()).unwrap();
        for i in 0..5 {
            assert_eq!(looped.next_frame().unwrap().unwrap().seq, i);
        }
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            FileSource::open(empty.path(), true, 0.0, stop),
            Err(CameraError::NoImages { .. })
        ));
    }
}
