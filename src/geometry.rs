//! Where a frame sits in the model's input: SAM resizes the longest side to the model size and
//! pads the rest, and prompts and masks move between frame and model coordinates through it.

use crate::{Error, Result};

/// Frame and model-input sizes of one image, for coordinate and mask transforms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Original frame width in pixels.
    pub frame_width: u32,
    /// Original frame height in pixels.
    pub frame_height: u32,
    /// Width after the longest-side resize (before padding).
    pub resized_width: u32,
    /// Height after the longest-side resize (before padding).
    pub resized_height: u32,
    /// Side of the square model input.
    pub model_size: u32,
}

impl Geometry {
    /// Geometry of a `width` x `height` frame for a model of side `model_size`, rounded as SAM does.
    pub fn new(width: u32, height: u32, model_size: u32) -> Result<Geometry> {
        if width == 0 || height == 0 {
            return Err(Error::Image(format!("empty image ({width}x{height})")));
        }
        let scale = f64::from(model_size) / f64::from(width.max(height));
        // Rounded and clamped to 1..=model_size, so the casts below cannot truncate.
        let resized = |v: u32| ((f64::from(v) * scale + 0.5).floor() as u32).clamp(1, model_size);
        Ok(Geometry {
            frame_width: width,
            frame_height: height,
            resized_width: resized(width),
            resized_height: resized(height),
            model_size,
        })
    }

    /// Frame pixel coordinates -> model-input coordinates.
    pub fn frame_to_model(&self, x: f32, y: f32) -> (f32, f32) {
        (
            x * self.resized_width as f32 / self.frame_width as f32,
            y * self.resized_height as f32 / self.frame_height as f32,
        )
    }

    /// Model-input coordinates -> frame pixel coordinates.
    pub fn model_to_frame(&self, x: f32, y: f32) -> (f32, f32) {
        (
            x * self.frame_width as f32 / self.resized_width as f32,
            y * self.frame_height as f32 / self.resized_height as f32,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_rounds_like_sam() {
        let g = Geometry::new(769, 770, 1024).unwrap();
        assert_eq!((g.resized_width, g.resized_height), (1023, 1024));
        let g = Geometry::new(640, 480, 1024).unwrap();
        assert_eq!((g.resized_width, g.resized_height), (1024, 768));
        assert!(Geometry::new(0, 10, 1024).is_err());
    }

    #[test]
    fn coordinate_round_trip() {
        let g = Geometry::new(640, 480, 1024).unwrap();
        let (mx, my) = g.frame_to_model(320.0, 240.0);
        assert_eq!((mx, my), (512.0, 384.0));
        assert_eq!(g.model_to_frame(mx, my), (320.0, 240.0));
    }
}
