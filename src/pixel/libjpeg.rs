//! Still JPEG images decoded with libjpeg-turbo's arithmetic (the `mozjpeg` crate builds
//! MozJPEG, a libjpeg-turbo fork, from source with the C compiler Rust already needs): the
//! accurate integer IDCT and smooth ("fancy") chroma upsampling, libjpeg's defaults, which is
//! what Pillow and OpenCV decode with. So a photo gives the same pixels here as in SAM's Python
//! reference pipeline, and the same masks (`benches/reference_masks.py`); zune-jpeg, used for
//! camera frames, rounds some pixels differently.
//!
//! Strict as the rest of [`super`]: libjpeg *warns* about a truncated file (and decodes the
//! missing part as grey) or about corrupt entropy data; both are errors here. libjpeg reports
//! errors through a callback that must not return, so it unwinds (the C code is compiled for
//! it) and [`decode`] catches that and turns it into a [`PixelError`].
#![allow(unsafe_code)]

use std::os::raw::c_int;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use mozjpeg_sys::{jpeg_common_struct, jpeg_error_mgr, jpeg_std_error};

use super::PixelError;

/// A libjpeg error or warning, carried by the unwinding out of the decoder.
struct Failure(String);

/// The message of the error or warning libjpeg reports on `cinfo`.
fn message(cinfo: &mut jpeg_common_struct) -> String {
    // SAFETY: libjpeg calls our callbacks with its error manager installed (`cinfo.err`).
    let Some(err) = (unsafe { cinfo.err.as_ref() }) else {
        return "unknown libjpeg error".into();
    };
    let (code, format) = (err.msg_code, err.format_message);
    let Some(format) = format else {
        return format!("libjpeg message {code}");
    };
    let mut buffer = [0u8; 80];
    // SAFETY: `format_message` writes at most JMSG_LENGTH_MAX (80) bytes, NUL-terminated, into
    // the buffer it is given; the binding declares that buffer `&[u8; 80]`, so it is passed as
    // the same pointer under the type that says it is written.
    unsafe {
        let format: unsafe extern "C-unwind" fn(&mut jpeg_common_struct, *mut u8) =
            std::mem::transmute::<
                unsafe extern "C-unwind" fn(&mut jpeg_common_struct, &[u8; 80]),
                unsafe extern "C-unwind" fn(&mut jpeg_common_struct, *mut u8),
            >(format);
        format(cinfo, buffer.as_mut_ptr());
    }
    let text = buffer.split(|&b| b == 0).next().unwrap_or_default();
    String::from_utf8_lossy(text).into_owned()
}

/// libjpeg's `error_exit`: unwind with the message (libjpeg must not continue).
extern "C-unwind" fn fail(cinfo: &mut jpeg_common_struct) {
    resume_unwind(Box::new(Failure(message(cinfo))));
}

/// libjpeg's `emit_message`: a warning (`level` < 0: truncated data, corrupt entropy codes) is an
/// error too; trace messages (`level` ≥ 0) are ignored.
extern "C-unwind" fn warn(cinfo: &mut jpeg_common_struct, level: c_int) {
    if level < 0 {
        resume_unwind(Box::new(Failure(message(cinfo))));
    }
}

/// An error manager that fails on every error and warning.
fn strict_errors() -> jpeg_error_mgr {
    // SAFETY: an all-zero `jpeg_error_mgr` (null pointers, `None` callbacks) is a valid value,
    // and `jpeg_std_error` fills in every field.
    let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
    // SAFETY: `err` is a valid error manager to initialise.
    unsafe { jpeg_std_error(&mut err) };
    err.error_exit = Some(fail);
    err.emit_message = Some(warn);
    err
}

/// Decode a JPEG to RGB8 as libjpeg-turbo does by default; sides above `max_side` are refused
/// before the pixels are allocated. `Ok(None)` for a CMYK (or YCCK) JPEG, which libjpeg does not
/// convert to RGB (Pillow converts it in its own code): the caller decodes it otherwise.
pub(super) fn decode(bytes: &[u8], max_side: usize) -> Result<Option<image::RgbImage>, PixelError> {
    let bad = |why: String| PixelError::Image(format!("JPEG: {why}"));
    let decoded = catch_unwind(AssertUnwindSafe(|| {
        let header = mozjpeg::decompress::DecompressBuilder::new()
            .with_err(strict_errors())
            .from_mem(bytes)
            .map_err(|e| e.to_string())?;
        if matches!(
            header.color_space(),
            mozjpeg_sys::J_COLOR_SPACE::JCS_CMYK | mozjpeg_sys::J_COLOR_SPACE::JCS_YCCK
        ) {
            return Ok(None);
        }
        let (width, height) = header.size();
        if width == 0 || height == 0 || width > max_side || height > max_side {
            return Err(format!(
                "{width}x{height} pixels (at most {max_side} a side)"
            ));
        }
        let mut started = header.rgb().map_err(|e| e.to_string())?;
        let rgb: Vec<u8> = started.read_scanlines().map_err(|e| e.to_string())?;
        started.finish().map_err(|e| e.to_string())?;
        Ok(Some((width, height, rgb)))
    }));
    let (width, height, rgb) = match decoded {
        Ok(Ok(Some(image))) => image,
        Ok(Ok(None)) => return Ok(None),
        Ok(Err(why)) => return Err(bad(why)),
        Err(payload) => {
            return Err(bad(match payload.downcast::<Failure>() {
                Ok(failure) => failure.0,
                // Any other panic inside the decoder (the binding's own checks).
                Err(payload) => payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "the decoder failed".into()),
            }));
        }
    };
    let (w, h) = (u32::try_from(width), u32::try_from(height));
    match (w, h) {
        (Ok(w), Ok(h)) => image::RgbImage::from_raw(w, h, rgb)
            .map(Some)
            .ok_or_else(|| bad("size does not match its pixels".into())),
        _ => Err(bad(format!("{width}x{height} pixels"))),
    }
}
