//! A moving test pattern as a frame source (for trying the daemon without a camera, and tests).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use image::RgbImage;

use super::{CameraError, Frame, FrameSource, Pacer, SourceInfo};
use crate::monotonic_now_ns;

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
        let frame = Frame::converted_since(self.seq, captured_ns, image, started);
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
}
