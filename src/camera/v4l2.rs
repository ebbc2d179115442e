//! The V4L2 side: negotiation, mmap streaming, device listing. Only this file talks to `v4l`.

use super::*;
use crate::monotonic_now_ns;
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
        let frame = Frame::converted_since(seq, captured_ns, image, started);
        Ok(Some(frame))
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
