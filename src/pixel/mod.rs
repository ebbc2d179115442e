//! Camera pixel formats to packed RGB8: YUYV (4:2:2), NV12 (4:2:0), RGB24 and MJPEG; and still
//! images (JPEG as libjpeg-turbo decodes them, PNG).
//!
//! The YUV paths use BT.601 limited range (what UVC webcams and the Pi's ISP deliver by default)
//! in 8.8 fixed point, write into a caller's buffer and allocate nothing. Every function checks
//! the buffer sizes first: a short or oversized camera buffer is an error, never a panic.

mod libjpeg;

use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

/// A camera buffer that cannot be turned into RGB.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PixelError {
    /// The buffer is smaller than the format and size require.
    #[error("{format} buffer has {got} bytes, {width}x{height} with stride {stride} needs {need}")]
    ShortBuffer {
        /// Pixel format name.
        format: &'static str,
        /// Frame width.
        width: u32,
        /// Frame height.
        height: u32,
        /// Bytes per row of the (first) plane.
        stride: usize,
        /// Bytes given.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The size or stride is impossible for the format (odd width for 4:2:x, stride < row).
    #[error("{format} frame geometry {width}x{height} stride {stride} is invalid")]
    Geometry {
        /// Pixel format name.
        format: &'static str,
        /// Frame width.
        width: u32,
        /// Frame height.
        height: u32,
        /// Bytes per row.
        stride: usize,
    },
    /// The output buffer does not hold width * height * 3 bytes.
    #[error("RGB output has {got} bytes, needs {need}")]
    Output {
        /// Bytes given.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// A JPEG that does not decode (corrupt or truncated frame).
    #[error("corrupt MJPEG frame: {0}")]
    Jpeg(String),
    /// A still image (file) that does not decode completely: corrupt, truncated or not an image.
    #[error("image does not decode: {0}")]
    Image(String),
    /// A JPEG whose size differs from the negotiated one.
    #[error("MJPEG frame is {got_width}x{got_height}, expected {width}x{height}")]
    JpegSize {
        /// Negotiated width.
        width: u32,
        /// Negotiated height.
        height: u32,
        /// Decoded width.
        got_width: usize,
        /// Decoded height.
        got_height: usize,
    },
}

/// Pixel formats the daemon accepts from a camera.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PixelFormat {
    /// Motion JPEG.
    Mjpeg,
    /// Packed Y0 U Y1 V, 4:2:2.
    Yuyv,
    /// Y plane, then interleaved U V plane at half resolution.
    Nv12,
    /// Packed R G B.
    Rgb24,
}

impl PixelFormat {
    /// The V4L2 FourCC code.
    pub fn fourcc(self) -> [u8; 4] {
        match self {
            PixelFormat::Mjpeg => *b"MJPG",
            PixelFormat::Yuyv => *b"YUYV",
            PixelFormat::Nv12 => *b"NV12",
            PixelFormat::Rgb24 => *b"RGB3",
        }
    }

    /// The format with this FourCC, if we support it.
    pub fn from_fourcc(code: [u8; 4]) -> Option<PixelFormat> {
        [
            PixelFormat::Mjpeg,
            PixelFormat::Yuyv,
            PixelFormat::Nv12,
            PixelFormat::Rgb24,
        ]
        .into_iter()
        .find(|f| f.fourcc() == code)
    }

    /// Lower-case name, as in configs.
    pub fn name(self) -> &'static str {
        match self {
            PixelFormat::Mjpeg => "mjpeg",
            PixelFormat::Yuyv => "yuyv",
            PixelFormat::Nv12 => "nv12",
            PixelFormat::Rgb24 => "rgb24",
        }
    }
}

/// BT.601 limited-range Y'CbCr to RGB for one pixel, 8.8 fixed point.
#[inline(always)]
pub fn yuv_to_rgb(y: u8, u: u8, v: u8) -> [u8; 3] {
    let c = 298 * (i32::from(y) - 16);
    let d = i32::from(u) - 128;
    let e = i32::from(v) - 128;
    let clamp = |x: i32| ((x + 128) >> 8).clamp(0, 255) as u8;
    [
        clamp(c + 409 * e),
        clamp(c - 100 * d - 208 * e),
        clamp(c + 516 * d),
    ]
}

fn check_output(width: u32, height: u32, out: &[u8]) -> Result<(usize, usize), PixelError> {
    let (w, h) = (width as usize, height as usize);
    let need = w * h * 3;
    if out.len() != need {
        return Err(PixelError::Output {
            got: out.len(),
            need,
        });
    }
    Ok((w, h))
}

/// Check a camera buffer laid out as `rows` rows of `row_bytes` useful bytes, `stride` bytes
/// apart (`shape_ok`: the format's own constraints on the size, e.g. even widths for 4:2:x).
fn check_buffer(
    format: &'static str,
    (width, height, stride): (u32, u32, usize),
    (row_bytes, rows): (usize, usize),
    shape_ok: bool,
    src: &[u8],
) -> Result<(), PixelError> {
    if !shape_ok || stride < row_bytes {
        return Err(PixelError::Geometry {
            format,
            width,
            height,
            stride,
        });
    }
    let need = if rows == 0 {
        0
    } else {
        stride * (rows - 1) + row_bytes
    };
    if src.len() < need {
        return Err(PixelError::ShortBuffer {
            format,
            width,
            height,
            stride,
            got: src.len(),
            need,
        });
    }
    Ok(())
}

/// Packed YUYV with `stride` bytes per row to RGB8 in `out` (width * height * 3 bytes).
pub fn yuyv_to_rgb(
    src: &[u8],
    width: u32,
    height: u32,
    stride: usize,
    out: &mut [u8],
) -> Result<(), PixelError> {
    let (w, h) = check_output(width, height, out)?;
    check_buffer("YUYV", (width, height, stride), (w * 2, h), w % 2 == 0, src)?;
    for (row_out, row_in) in out.chunks_exact_mut(w * 3).zip(src.chunks(stride)) {
        for (px, yuyv) in row_out
            .chunks_exact_mut(6)
            .zip(row_in[..w * 2].chunks_exact(4))
        {
            let (u, v) = (yuyv[1], yuyv[3]);
            px[..3].copy_from_slice(&yuv_to_rgb(yuyv[0], u, v));
            px[3..].copy_from_slice(&yuv_to_rgb(yuyv[2], u, v));
        }
    }
    Ok(())
}

/// NV12 (Y plane of `stride` bytes per row, then the interleaved UV plane with the same stride)
/// to RGB8 in `out`.
pub fn nv12_to_rgb(
    src: &[u8],
    width: u32,
    height: u32,
    stride: usize,
    out: &mut [u8],
) -> Result<(), PixelError> {
    let (w, h) = check_output(width, height, out)?;
    // The Y plane (h rows) and the UV plane (h/2 rows) share the stride.
    let shape_ok = w % 2 == 0 && h % 2 == 0;
    check_buffer(
        "NV12",
        (width, height, stride),
        (w, h + h / 2),
        shape_ok,
        src,
    )?;
    let y_size = stride * h;
    let (y_plane, uv_plane) = src.split_at(y_size);
    for (row, row_out) in out.chunks_exact_mut(w * 3).enumerate() {
        let y_row = &y_plane[row * stride..row * stride + w];
        let uv_start = (row / 2) * stride;
        let uv_row = &uv_plane[uv_start..uv_start + w];
        for ((px, ys), uv) in row_out
            .chunks_exact_mut(6)
            .zip(y_row.chunks_exact(2))
            .zip(uv_row.chunks_exact(2))
        {
            px[..3].copy_from_slice(&yuv_to_rgb(ys[0], uv[0], uv[1]));
            px[3..].copy_from_slice(&yuv_to_rgb(ys[1], uv[0], uv[1]));
        }
    }
    Ok(())
}

/// Packed RGB24 with `stride` bytes per row to tightly packed RGB8 in `out`.
pub fn rgb24_to_rgb(
    src: &[u8],
    width: u32,
    height: u32,
    stride: usize,
    out: &mut [u8],
) -> Result<(), PixelError> {
    let (w, h) = check_output(width, height, out)?;
    check_buffer("RGB24", (width, height, stride), (w * 3, h), true, src)?;
    for (row_out, row_in) in out.chunks_exact_mut(w * 3).zip(src.chunks(stride)) {
        row_out.copy_from_slice(&row_in[..w * 3]);
    }
    Ok(())
}

/// Largest JPEG side the decoder accepts before allocating (bigger is a corrupt header).
const MAX_JPEG_SIDE: usize = 8192;

/// A JPEG decoder to RGB that refuses truncated or corrupt data (strict mode) and headers
/// larger than [`MAX_JPEG_SIDE`].
fn strict_jpeg(bytes: &[u8]) -> JpegDecoder<std::io::Cursor<&[u8]>> {
    let options = DecoderOptions::default()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_strict_mode(true)
        .set_max_width(MAX_JPEG_SIDE)
        .set_max_height(MAX_JPEG_SIDE);
    JpegDecoder::new_with_options(std::io::Cursor::new(bytes), options)
}

/// Decode one MJPEG frame (baseline JPEG, default Huffman tables allowed) into RGB8 `out` of the
/// negotiated size. Truncated or corrupt data is an error (strict mode), never a partial image.
pub fn mjpeg_to_rgb(src: &[u8], width: u32, height: u32, out: &mut [u8]) -> Result<(), PixelError> {
    let (w, h) = check_output(width, height, out)?;
    let mut decoder = strict_jpeg(src);
    decoder
        .decode_headers()
        .map_err(|e| PixelError::Jpeg(e.to_string()))?;
    let info = decoder
        .info()
        .ok_or_else(|| PixelError::Jpeg("no frame header".into()))?;
    if (info.width as usize, info.height as usize) != (w, h) {
        return Err(PixelError::JpegSize {
            width,
            height,
            got_width: info.width as usize,
            got_height: info.height as usize,
        });
    }
    decoder
        .decode_into(out)
        .map_err(|e| PixelError::Jpeg(e.to_string()))
}

/// Decode a still image (JPEG, PNG) to RGB8, strictly: a truncated or corrupt JPEG is an
/// error, never a partly grey picture. JPEGs are decoded as libjpeg-turbo (and so Pillow and
/// OpenCV) decodes them, pixel for pixel ([`libjpeg`]), except CMYK ones, which libjpeg does not
/// turn into RGB: zune-jpeg (strict too) converts those; other formats go through the `image`
/// crate, which refuses truncated PNGs itself.
pub fn decode_image(bytes: &[u8]) -> Result<image::RgbImage, PixelError> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return image::load_from_memory(bytes)
            .map(|i| i.to_rgb8())
            .map_err(|e| PixelError::Image(e.to_string()));
    }
    if let Some(rgb) = libjpeg::decode(bytes, MAX_JPEG_SIDE)? {
        return Ok(rgb);
    }
    let bad = |e: &dyn std::fmt::Display| PixelError::Image(format!("JPEG: {e}"));
    let mut decoder = strict_jpeg(bytes);
    decoder.decode_headers().map_err(|e| bad(&e))?;
    let info = decoder.info().ok_or_else(|| bad(&"no frame header"))?;
    let (w, h) = (u32::from(info.width), u32::from(info.height));
    // Both sides are at most MAX_JPEG_SIDE (checked by the decoder), so this cannot overflow.
    let mut rgb = vec![0u8; usize::from(info.width) * usize::from(info.height) * 3];
    decoder.decode_into(&mut rgb).map_err(|e| bad(&e))?;
    image::RgbImage::from_raw(w, h, rgb).ok_or_else(|| bad(&"size does not match its pixels"))
}

/// Read and decode an image file with [`decode_image`].
pub fn read_image(path: &std::path::Path) -> Result<image::RgbImage, PixelError> {
    let bytes = std::fs::read(path).map_err(|e| PixelError::Image(e.to_string()))?;
    decode_image(&bytes)
}

/// Convert one camera buffer of `format` to RGB8 in `out`.
pub fn to_rgb(
    format: PixelFormat,
    src: &[u8],
    width: u32,
    height: u32,
    stride: usize,
    out: &mut [u8],
) -> Result<(), PixelError> {
    match format {
        PixelFormat::Mjpeg => mjpeg_to_rgb(src, width, height, out),
        PixelFormat::Yuyv => yuyv_to_rgb(src, width, height, stride, out),
        PixelFormat::Nv12 => nv12_to_rgb(src, width, height, stride, out),
        PixelFormat::Rgb24 => rgb24_to_rgb(src, width, height, stride, out),
    }
}

/// RGB to BT.601 limited-range Y'CbCr (the inverse of [`yuv_to_rgb`], in float): for tests,
/// recorded streams and the synthetic YUV camera.
pub fn rgb_to_yuv(rgb: [u8; 3]) -> [u8; 3] {
    let [r, g, b] = rgb.map(f32::from);
    let y = 16.0 + 0.256_79 * r + 0.504_13 * g + 0.097_91 * b;
    let u = 128.0 - 0.148_22 * r - 0.290_99 * g + 0.439_21 * b;
    let v = 128.0 + 0.439_21 * r - 0.367_79 * g - 0.071_42 * b;
    [y, u, v].map(|c| c.round().clamp(0.0, 255.0) as u8)
}

/// Encode packed RGB8 as YUYV (horizontal chroma averaged), tight stride.
pub fn rgb_to_yuyv(rgb: &[u8], width: u32, height: u32) -> Vec<u8> {
    let (w, h) = (width as usize, height as usize);
    let mut out = Vec::with_capacity(w * h * 2);
    for row in rgb.chunks_exact(w * 3).take(h) {
        for pair in row.chunks_exact(6) {
            let a = rgb_to_yuv([pair[0], pair[1], pair[2]]);
            let b = rgb_to_yuv([pair[3], pair[4], pair[5]]);
            let avg = |i: usize| (u16::from(a[i]) + u16::from(b[i])).div_ceil(2) as u8;
            out.extend_from_slice(&[a[0], avg(1), b[0], avg(2)]);
        }
    }
    out
}

/// Encode packed RGB8 as NV12 (chroma averaged over 2x2), tight stride.
pub fn rgb_to_nv12(rgb: &[u8], width: u32, height: u32) -> Vec<u8> {
    let (w, h) = (width as usize, height as usize);
    let yuv: Vec<[u8; 3]> = rgb
        .chunks_exact(3)
        .map(|p| rgb_to_yuv([p[0], p[1], p[2]]))
        .collect();
    let mut out: Vec<u8> = yuv.iter().map(|p| p[0]).collect();
    for y in (0..h).step_by(2) {
        for x in (0..w).step_by(2) {
            for c in [1, 2] {
                let sum: u32 = [(0, 0), (1, 0), (0, 1), (1, 1)]
                    .iter()
                    .map(|(dx, dy)| u32::from(yuv[(y + dy) * w + x + dx][c]))
                    .sum();
                out.push(((sum + 2) / 4) as u8);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_points_of_bt601() {
        assert_eq!(yuv_to_rgb(16, 128, 128), [0, 0, 0]);
        assert_eq!(yuv_to_rgb(235, 128, 128), [255, 255, 255]);
        // 75 % red and blue bars (studio-range codes) come out as full-range 191.
        let near = |a: [u8; 3], b: [u8; 3]| a.iter().zip(b).all(|(x, y)| x.abs_diff(y) <= 1);
        assert!(near(yuv_to_rgb(65, 100, 212), [191, 0, 0]));
        assert!(near(yuv_to_rgb(35, 212, 114), [0, 0, 191]));
    }

    #[test]
    fn stride_padding_is_skipped() {
        // 2x2 YUYV with 2 bytes of padding per row.
        let src = [16, 128, 235, 128, 9, 9, 235, 128, 16, 128, 9, 9];
        let mut out = [0u8; 12];
        yuyv_to_rgb(&src, 2, 2, 6, &mut out).unwrap();
        assert_eq!(out, [0, 0, 0, 255, 255, 255, 255, 255, 255, 0, 0, 0]);
    }

    #[test]
    fn short_buffers_and_bad_geometry_are_errors() {
        let mut out = vec![0u8; 4 * 2 * 3];
        assert!(matches!(
            yuyv_to_rgb(&[0; 15], 4, 2, 8, &mut out),
            Err(PixelError::ShortBuffer { need: 16, .. })
        ));
        assert!(matches!(
            nv12_to_rgb(&[0; 11], 4, 2, 4, &mut out),
            Err(PixelError::ShortBuffer { need: 12, .. })
        ));
        assert!(matches!(
            yuyv_to_rgb(&[0; 16], 4, 2, 7, &mut out),
            Err(PixelError::Geometry { .. })
        ));
        let mut odd = vec![0u8; 3 * 2 * 3];
        assert!(matches!(
            nv12_to_rgb(&[0; 9], 3, 2, 3, &mut odd),
            Err(PixelError::Geometry { .. })
        ));
        assert!(matches!(
            rgb24_to_rgb(&[0; 24], 4, 2, 12, &mut out[1..]),
            Err(PixelError::Output { .. })
        ));
    }

    #[test]
    fn fourcc_round_trip() {
        for f in [
            PixelFormat::Mjpeg,
            PixelFormat::Yuyv,
            PixelFormat::Nv12,
            PixelFormat::Rgb24,
        ] {
            assert_eq!(PixelFormat::from_fourcc(f.fourcc()), Some(f));
        }
        assert_eq!(PixelFormat::from_fourcc(*b"H264"), None);
    }
}
