//! SAM's reference pre- and post-processing against the golden outputs of Pillow and PyTorch in
//! `tests/fixtures/reference/` (`cd models && python -m tinysam_export reference-fixtures`): JPEG
//! decoding and the longest-side resize bit for bit, the two-step mask interpolation to float
//! rounding.

use std::path::PathBuf;

use tinysam_edge::postprocess::Upsampler;
use tinysam_edge::preprocess::{pillow, Geometry};
use tract_onnx::prelude::tract_ndarray::ArrayD;

use crate::util::fixtures;

fn reference(name: &str) -> PathBuf {
    fixtures().join("reference").join(name)
}

fn cases() -> serde_json::Value {
    let text = std::fs::read_to_string(reference("cases.json")).expect("reference cases.json");
    serde_json::from_str(&text).expect("cases.json parses")
}

fn npy(name: &str) -> ArrayD<f32> {
    crate::util::read_npy(&reference(name))
}

fn field<'a>(case: &'a serde_json::Value, key: &str) -> &'a serde_json::Value {
    case.get(key)
        .unwrap_or_else(|| panic!("case without {key}: {case}"))
}

/// The picture a case names under `key`, as RGB (decoded by the `image` crate: the golden PNGs).
fn picture(case: &serde_json::Value, key: &str) -> image::RgbImage {
    image::open(reference(field(case, key).as_str().expect("name")))
        .unwrap_or_else(|e| panic!("{case}: {key}: {e}"))
        .to_rgb8()
}

/// A JPEG case's file as `pixel::decode_image` decodes it, and Pillow's decode of it, of the same
/// size.
fn decoded_jpeg(case: &serde_json::Value) -> (image::RgbImage, image::RgbImage) {
    let bytes =
        std::fs::read(reference(field(case, "input").as_str().expect("name"))).expect("input jpg");
    let ours = tinysam_edge::pixel::decode_image(&bytes)
        .unwrap_or_else(|e| panic!("{case}: the JPEG does not decode: {e}"));
    let expected = picture(case, "expected");
    assert_eq!(ours.dimensions(), expected.dimensions(), "{case}");
    (ours, expected)
}

fn size(case: &serde_json::Value, key: &str) -> u32 {
    let v = field(case, key).as_u64().expect("a size");
    u32::try_from(v).expect("a small size")
}

#[test]
fn resize_equals_pillow_bit_for_bit() {
    let cases = cases();
    let resize = field(&cases, "resize").as_array().expect("resize cases");
    assert!(resize.len() >= 8);
    for case in resize {
        let (input, expected) = (picture(case, "input"), picture(case, "expected"));
        let g = Geometry::new(input.width(), input.height(), size(case, "model_size")).unwrap();
        assert_eq!(
            (g.resized_width, g.resized_height),
            expected.dimensions(),
            "{case}: SAM's rounding of the resized size"
        );
        let ours = pillow::resize_rgb8(
            input.as_raw(),
            (input.width() as usize, input.height() as usize),
            (g.resized_width as usize, g.resized_height as usize),
        )
        .expect("sizes fit");
        let differing = ours
            .iter()
            .zip(expected.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            differing, 0,
            "{case}: {differing} values differ from Pillow's"
        );
    }
}

#[test]
fn jpeg_decodes_as_pillow_does_bit_for_bit() {
    let cases = cases();
    let jpeg = field(&cases, "jpeg").as_array().expect("jpeg cases");
    assert!(jpeg.len() >= 5);
    for case in jpeg {
        let (ours, expected) = decoded_jpeg(case);
        let differing = ours
            .as_raw()
            .iter()
            .zip(expected.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            differing, 0,
            "{case}: {differing} values differ from Pillow's"
        );
    }
}

/// A CMYK JPEG, which libjpeg does not turn into RGB (Pillow converts it itself): decoded all the
/// same, close to Pillow's colours.
#[test]
fn cmyk_jpeg_decodes_close_to_pillow() {
    let cases = cases();
    let jpeg = field(&cases, "jpeg_cmyk").as_array().expect("cmyk cases");
    assert!(!jpeg.is_empty());
    for case in jpeg {
        let (ours, expected) = decoded_jpeg(case);
        let worst = ours
            .as_raw()
            .iter()
            .zip(expected.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap_or(0);
        eprintln!("{case}: largest difference from Pillow {worst}");
        // 1 here (the two conversions round differently).
        assert!(worst <= 2, "{case}: a value {worst} away from Pillow's");
    }
}

#[test]
fn upsampling_equals_sams_two_steps() {
    let cases = cases();
    let upsample = field(&cases, "upsample")
        .as_array()
        .expect("upsample cases");
    assert!(upsample.len() >= 6);
    for case in upsample {
        let low = npy(field(case, "low").as_str().expect("name"));
        let expected = npy(field(case, "expected").as_str().expect("name"));
        let m = low.shape()[0];
        let (w, h) = (size(case, "width"), size(case, "height"));
        assert_eq!(expected.shape(), [h as usize, w as usize]);
        let g = Geometry::new(w, h, size(case, "model_size")).unwrap();
        let up = Upsampler::new(g, m);
        let low: Vec<f32> = low.iter().copied().collect();
        let want: Vec<f32> = expected.iter().copied().collect();
        let ours = up.logits(&low);
        assert_eq!(ours.len(), want.len());
        let err = ours
            .iter()
            .zip(&want)
            .fold(0f32, |e, (a, b)| e.max((a - b).abs()));
        // Logits of +-20: the reordered sums round differently in the last bits only.
        assert!(err < 1e-4, "{case}: max abs difference {err}");
        let mask = up.mask(&low, 0, 1.0);
        for (i, (&bit, &v)) in mask.mask.data.iter().zip(&want).enumerate() {
            if v.abs() > 1e-4 {
                assert_eq!(bit == 1, v > 0.0, "{case}: pixel {i}, reference logit {v}");
            }
        }
        assert_eq!(
            mask.area,
            ours.iter().filter(|&&v| v > 0.0).count() as u64,
            "{case}"
        );
        // One pixel alone, as segment-everything reads it.
        for (x, y) in [(0, 0), (w - 1, h - 1), (w / 2, h / 3)] {
            let alone = up.logit_at(&low, x as f32 + 0.25, y as f32 + 0.75);
            let row = ours[(y * w + x) as usize];
            assert!(
                (alone - row).abs() < 1e-5,
                "{case}: ({x}, {y}) {alone} vs {row}"
            );
        }
    }
}
