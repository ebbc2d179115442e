//! Frame -> encoder input, exactly as SAM prepares images.
//!
//! Longest side resized to the model size with Pillow's bilinear (antialiased) filter on 8-bit
//! RGB, bit for bit ([`pillow`]), per-channel `(x - mean) / std` through a lookup table, zero
//! padding at the bottom and right.

pub mod pillow;

use image::RgbImage;
use serde::{Deserialize, Serialize};

pub use crate::geometry::Geometry;
use crate::{Error, Result};

/// Normalisation constants of the encoder input.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreprocessSpec {
    /// Side of the square encoder input.
    pub image_size: usize,
    /// Per-channel mean in 0..255 units, RGB order.
    pub pixel_mean: [f32; 3],
    /// Per-channel standard deviation in 0..255 units, RGB order.
    pub pixel_std: [f32; 3],
}

/// The encoder input (1, 3, S, S) and the geometry it was made with.
#[derive(Debug, Clone)]
pub struct ImageTensor {
    /// Normalised, padded NCHW values: 3 planes of S x S.
    pub data: Vec<f32>,
    /// S, the side of the model input.
    pub side: usize,
    /// Frame and model sizes.
    pub geometry: Geometry,
}

/// One model's preprocessing: its input size and normalisation table.
pub struct Preprocessor {
    size: u32,
    /// `lut[c][v]` = (v - mean[c]) / std[c].
    lut: [[f32; 256]; 3],
}

impl Preprocessor {
    /// A preprocessor for the manifest's size and normalisation.
    pub fn new(spec: &PreprocessSpec) -> Preprocessor {
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                *out = (v as f32 - spec.pixel_mean[c]) / spec.pixel_std[c];
            }
        }
        Preprocessor {
            size: u32::try_from(spec.image_size).unwrap_or(u32::MAX),
            lut,
        }
    }

    /// Resize, normalise and pad `frame` into a fresh encoder input.
    pub fn run(&self, frame: &RgbImage) -> Result<ImageTensor> {
        let geometry = Geometry::new(frame.width(), frame.height(), self.size)?;
        let (rw, rh) = (geometry.resized_width, geometry.resized_height);
        let (fw, fh) = (frame.width() as usize, frame.height() as usize);
        let resized = pillow::resize_rgb8(frame.as_raw(), (fw, fh), (rw as usize, rh as usize))
            .ok_or_else(|| {
                Error::Image(format!(
                    "resizing a {fw}x{fh} frame to {rw}x{rh}: the buffer does not match its size"
                ))
            })?;
        let s = self.size as usize;
        let mut data = vec![0f32; 3 * s * s];
        let (rw, rh) = (rw as usize, rh as usize);
        let (r_plane, rest) = data.split_at_mut(s * s);
        let (g_plane, b_plane) = rest.split_at_mut(s * s);
        for (y, row) in resized.chunks_exact(rw * 3).take(rh).enumerate() {
            let o = y * s;
            let (r, g, b) = (
                &mut r_plane[o..o + rw],
                &mut g_plane[o..o + rw],
                &mut b_plane[o..o + rw],
            );
            for (x, px) in row.chunks_exact(3).enumerate() {
                r[x] = self.lut[0][usize::from(px[0])];
                g[x] = self.lut[1][usize::from(px[1])];
                b[x] = self.lut[2][usize::from(px[2])];
            }
        }
        Ok(ImageTensor {
            data,
            side: s,
            geometry,
        })
    }
}
