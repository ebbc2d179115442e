//! A frame's pixels after the encoder, for clients that want the picture with its masks (the
//! daemon owns the camera, so a consumer has no other way to see what was segmented): kept with
//! the frame's embedding, compressed to JPEG at most once, when the first result that asks for it
//! is written, and shared by every client that asked.

use std::sync::{Arc, OnceLock};

use image::codecs::jpeg::JpegEncoder;
use image::RgbImage;

/// JPEG quality of frames sent to clients: near-transparent for a person, ~10x smaller than RGB.
pub const JPEG_QUALITY: u8 = 85;

/// One frame's pixels and, once asked for, their JPEG.
pub struct FramePicture {
    image: RgbImage,
    jpeg: OnceLock<Result<Arc<[u8]>, String>>,
}

impl std::fmt::Debug for FramePicture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FramePicture")
            .field("width", &self.image.width())
            .field("height", &self.image.height())
            .field(
                "jpeg",
                &self.jpeg.get().map(|j| j.as_ref().map(|b| b.len())),
            )
            .finish()
    }
}

impl FramePicture {
    /// The frame's pixels.
    pub fn new(image: RgbImage) -> FramePicture {
        FramePicture {
            image,
            jpeg: OnceLock::new(),
        }
    }

    /// The frame as JPEG ([`JPEG_QUALITY`]), encoded by the first caller; an encoder error is
    /// kept and returned to every caller.
    pub fn jpeg(&self) -> Result<Arc<[u8]>, String> {
        self.jpeg
            .get_or_init(|| {
                let mut out = Vec::new();
                JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY)
                    .encode_image(&self.image)
                    .map(|()| Arc::from(out))
                    .map_err(|e| format!("encoding the frame as JPEG: {e}"))
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jpeg_is_encoded_once_and_decodes_to_the_frame() {
        let image = RgbImage::from_fn(64, 48, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 5) as u8, 128])
        });
        let picture = FramePicture::new(image.clone());
        let first = picture.jpeg().expect("encodes");
        let second = picture.jpeg().expect("encodes");
        assert!(Arc::ptr_eq(&first, &second));
        let decoded = image::load_from_memory(&first).expect("decodes").to_rgb8();
        assert_eq!(decoded.dimensions(), (64, 48));
        let worst = decoded
            .pixels()
            .zip(image.pixels())
            .flat_map(|(a, b)| a.0.iter().zip(b.0).map(|(&a, b)| a.abs_diff(b)))
            .max();
        assert!(worst.is_some_and(|w| w <= 12), "{worst:?}");
    }
}
