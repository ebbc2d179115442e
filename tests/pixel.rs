//! Camera format conversion against reference images: the fixture photo encoded as YUYV, NV12
//! and MJPEG, converted back, compared with an independent float BT.601 decoder and the original.

use image::RgbImage;
use tinysam_edge::pixel::{
    mjpeg_to_rgb, nv12_to_rgb, rgb24_to_rgb, rgb_to_nv12, rgb_to_yuyv, yuyv_to_rgb, PixelError,
};

use crate::util::fixtures;

fn photo() -> RgbImage {
    image::open(fixtures().join("golden/frame.png"))
        .expect("fixture frame")
        .to_rgb8()
}

/// BT.601 limited range in f64: the reference our fixed-point path must match to ±1.
fn reference_pixel(y: u8, u: u8, v: u8) -> [f64; 3] {
    let (y, u, v) = (
        f64::from(y) - 16.0,
        f64::from(u) - 128.0,
        f64::from(v) - 128.0,
    );
    [
        1.164_383 * y + 1.596_027 * v,
        1.164_383 * y - 0.391_762 * u - 0.812_968 * v,
        1.164_383 * y + 2.017_232 * u,
    ]
    .map(|c| c.clamp(0.0, 255.0))
}

fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).abs())
        .sum::<f64>()
        / a.len() as f64
}

#[test]
fn yuyv_matches_float_reference_and_photo() {
    let img = photo();
    let (w, h) = img.dimensions();
    let yuyv = rgb_to_yuyv(img.as_raw(), w, h);
    let mut out = vec![0u8; (w * h * 3) as usize];
    yuyv_to_rgb(&yuyv, w, h, (w * 2) as usize, &mut out).unwrap();
    for (i, (px, quad)) in out
        .chunks_exact(3)
        .zip(
            yuyv.chunks_exact(4)
                .flat_map(|q| [(q[0], q[1], q[3]), (q[2], q[1], q[3])]),
        )
        .enumerate()
    {
        let r = reference_pixel(quad.0, quad.1, quad.2);
        for c in 0..3 {
            assert!(
                (f64::from(px[c]) - r[c]).abs() <= 1.0,
                "pixel {i} channel {c}: {} vs {:.2}",
                px[c],
                r[c]
            );
        }
    }
    // Chroma subsampling and 8-bit YUV cost a little colour detail, nothing more.
    assert!(mean_abs_diff(&out, img.as_raw()) < 3.0);
}

#[test]
fn nv12_round_trip_is_close_to_the_photo() {
    let img = photo();
    let (w, h) = img.dimensions();
    let nv12 = rgb_to_nv12(img.as_raw(), w, h);
    let mut out = vec![0u8; (w * h * 3) as usize];
    nv12_to_rgb(&nv12, w, h, w as usize, &mut out).unwrap();
    let d = mean_abs_diff(&out, img.as_raw());
    assert!(d < 4.0, "mean abs diff {d}");
    // The same frame with a padded stride (as drivers align rows) gives the same pixels.
    let stride = w as usize + 32;
    let mut padded = vec![0u8; stride * (h as usize) * 3 / 2];
    for (row, chunk) in nv12.chunks(w as usize).enumerate() {
        padded[row * stride..row * stride + w as usize].copy_from_slice(chunk);
    }
    let mut out2 = vec![0u8; out.len()];
    nv12_to_rgb(&padded, w, h, stride, &mut out2).unwrap();
    assert_eq!(out, out2);
}

#[test]
fn rgb24_copies_rows() {
    let img = photo();
    let (w, h) = img.dimensions();
    let mut out = vec![0u8; (w * h * 3) as usize];
    rgb24_to_rgb(img.as_raw(), w, h, (w * 3) as usize, &mut out).unwrap();
    assert_eq!(&out, img.as_raw());
}

fn jpeg_of(img: &RgbImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90)
        .encode_image(img)
        .unwrap();
    bytes
}

#[test]
fn mjpeg_decodes_close_to_the_photo() {
    let img = photo();
    let (w, h) = img.dimensions();
    let jpeg = jpeg_of(&img);
    let mut out = vec![0u8; (w * h * 3) as usize];
    mjpeg_to_rgb(&jpeg, w, h, &mut out).unwrap();
    let d = mean_abs_diff(&out, img.as_raw());
    assert!(d < 4.0, "mean abs diff {d}");
}

/// UVC cameras send JPEGs without a DHT segment, marked by an `AVI1` APP0 (MJPEG's implied
/// default Huffman tables).
#[test]
fn mjpeg_without_huffman_tables_uses_the_defaults() {
    let img = photo();
    let (w, h) = img.dimensions();
    let jpeg = jpeg_of(&img);
    let mut stripped = Vec::with_capacity(jpeg.len());
    let mut i = 0;
    while i + 4 <= jpeg.len() {
        if jpeg[i] == 0xFF && jpeg[i + 1] == 0xC4 {
            let len = usize::from(u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]));
            i += 2 + len;
            continue;
        }
        if jpeg[i] == 0xFF && jpeg[i + 1] == 0xDA {
            break;
        }
        stripped.push(jpeg[i]);
        i += 1;
    }
    stripped.extend_from_slice(&jpeg[i..]);
    assert!(
        stripped.len() < jpeg.len(),
        "the encoder wrote DHT segments"
    );
    let jfif = stripped
        .windows(5)
        .position(|w| w == b"JFIF\0")
        .expect("JFIF APP0");
    stripped[jfif..jfif + 5].copy_from_slice(b"AVI1\0");
    let mut a = vec![0u8; (w * h * 3) as usize];
    let mut b = vec![0u8; a.len()];
    mjpeg_to_rgb(&jpeg, w, h, &mut a).unwrap();
    mjpeg_to_rgb(&stripped, w, h, &mut b).unwrap();
    assert_eq!(a, b);
}

#[test]
fn corrupt_and_truncated_mjpeg_are_errors_not_panics() {
    let img = photo();
    let (w, h) = img.dimensions();
    let jpeg = jpeg_of(&img);
    let mut out = vec![0u8; (w * h * 3) as usize];
    for cut in [0, 2, 100, jpeg.len() / 2, jpeg.len() - 200] {
        assert!(
            matches!(
                mjpeg_to_rgb(&jpeg[..cut], w, h, &mut out),
                Err(PixelError::Jpeg(_))
            ),
            "truncated at {cut}"
        );
    }
    assert!(matches!(
        mjpeg_to_rgb(&[0xAB; 4096], w, h, &mut out),
        Err(PixelError::Jpeg(_))
    ));
    // Flipped bits in the entropy-coded data decode to garbage or fail; never a panic.
    let mut flipped = jpeg.clone();
    for k in (600..flipped.len() - 2).step_by(97) {
        flipped[k] ^= 0x5A;
    }
    let _ = mjpeg_to_rgb(&flipped, w, h, &mut out);
    // A frame of another size than negotiated is refused.
    let mut small = vec![0u8; 100 * 75 * 3];
    assert!(matches!(
        mjpeg_to_rgb(&jpeg, 100, 75, &mut small),
        Err(PixelError::JpegSize { .. })
    ));
}

/// An image as a quality-90 JPEG (RGB or grey, as given).
fn still_jpeg(image: &image::DynamicImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90)
        .encode_image(image)
        .expect("encodes");
    bytes
}

/// Still images decode strictly: a whole JPEG (as libjpeg-turbo decodes it: pixel for pixel
/// Pillow's in `tests/reference.rs`; the `image` crate's decoder rounds some differently), a cut
/// one, one with corrupt data or an impossible size refused with an error naming the problem
/// instead of decoded with its missing part grey, a cut PNG refused, grey JPEGs as RGB.
#[test]
fn still_images_decode_strictly() {
    use tinysam_edge::pixel::decode_image;
    let frame = image::DynamicImage::ImageRgb8(photo());
    let jpeg = still_jpeg(&frame);
    let ours = decode_image(&jpeg).expect("a whole JPEG decodes");
    let theirs = image::load_from_memory(&jpeg).unwrap().to_rgb8();
    assert_eq!(ours.dimensions(), theirs.dimensions());
    let off = ours
        .as_raw()
        .iter()
        .zip(theirs.as_raw())
        .map(|(&a, &b)| u64::from(a.abs_diff(b)))
        .sum::<u64>() as f64
        / ours.as_raw().len() as f64;
    assert!(off < 1.0, "mean difference {off} from image's decoder");

    let cut = &jpeg[..jpeg.len() * 4 / 10];
    let err = decode_image(cut).expect_err("a truncated JPEG is refused");
    assert!(matches!(err, PixelError::Image(_)), "{err:?}");
    assert!(err.to_string().contains("JPEG"), "{err}");

    // Entropy-coded data overwritten with a marker-like run: libjpeg warns and carries on; an
    // error here.
    let mut corrupt = jpeg.clone();
    let middle = corrupt.len() / 2;
    corrupt[middle..middle + 16].fill(0xFF);
    assert!(decode_image(&corrupt).is_err(), "corrupt data is refused");

    // The frame header (SOF0) claims 60000 x 60000 pixels: refused before allocating.
    let mut huge = jpeg.clone();
    let sof = huge
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("a baseline frame header");
    huge[sof + 5..sof + 9].copy_from_slice(&[0xEA, 0x60, 0xEA, 0x60]);
    let err = decode_image(&huge).expect_err("a huge header is refused");
    assert!(err.to_string().contains("60000x60000"), "{err}");

    let mut png = Vec::new();
    frame
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    assert_eq!(decode_image(&png).unwrap().as_raw(), photo().as_raw());
    assert!(decode_image(&png[..png.len() / 2]).is_err());
    assert!(decode_image(b"not an image").is_err());

    let grey = decode_image(&still_jpeg(&image::DynamicImage::ImageLuma8(
        frame.to_luma8(),
    )))
    .expect("a grey JPEG decodes");
    assert!(grey.pixels().all(|p| p[0] == p[1] && p[1] == p[2]));
}
