//! Helpers shared by the integration tests.

use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::OnceLock;

use tinysam_edge::model::{Model, Precision, PrecisionChoice};
use tinysam_edge::segmenter::Segmenter;
use tract_onnx::prelude::tract_ndarray::ArrayD;

/// `tests/fixtures/` in the source tree.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A child process that is killed and reaped when the test ends, panics included: a failed
/// assertion must not leave a daemon running that holds the test runner's output pipe open (CI
/// then waits for that pipe's end until its time limit).
pub struct KillOnDrop(pub Child);

impl Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The test-size model directory.
pub fn test_model() -> PathBuf {
    fixtures().join("test_model")
}

/// The test model with both stages at precision `p`, loaded once per test binary and shared by
/// every test that only reads it (tract optimises each graph at load: seconds under qemu).
pub fn shared_model(p: Precision) -> &'static Model {
    &segmenter(Some(p)).model
}

/// A [`Segmenter`] on the test model, loaded once per test binary: both stages at `p`, or the
/// manifest's default precisions for `None`.
pub fn segmenter(p: Option<Precision>) -> &'static Segmenter {
    static DEFAULT: OnceLock<Segmenter> = OnceLock::new();
    static FP32: OnceLock<Segmenter> = OnceLock::new();
    static INT8: OnceLock<Segmenter> = OnceLock::new();
    let cell = match p {
        None => &DEFAULT,
        Some(Precision::Fp32) => &FP32,
        Some(Precision::Int8) => &INT8,
    };
    cell.get_or_init(|| {
        let choice = PrecisionChoice {
            encoder: p,
            decoder: p,
            ..Default::default()
        };
        Segmenter::load(&test_model(), choice).expect("test model loads")
    })
}

/// A golden tensor written by `models/` with numpy.
pub fn npy(name: &str) -> ArrayD<f32> {
    read_npy(&fixtures().join("golden").join(name))
}

/// A float32 `.npy` file as numpy writes it (C order, little-endian `<f4`; format versions 1 to
/// 3). Read here rather than with a crate: ndarray-npy's header parser (py_literal, pest, psm,
/// stacker) cost the test command a compile on each target, for the few lines below.
pub fn read_npy(path: &Path) -> ArrayD<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let fail = |why: &str| -> ! { panic!("{}: not a float32 .npy file: {why}", path.display()) };
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        fail("no NUMPY magic");
    }
    let (header_len, start) = match bytes[6] {
        1 => (
            usize::from(u16::from_le_bytes([bytes[8], bytes[9]])),
            10usize,
        ),
        2 | 3 if bytes.len() >= 12 => {
            let len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
            (usize::try_from(len).unwrap_or(usize::MAX), 12)
        }
        v => fail(&format!("format version {v}")),
    };
    let header = bytes
        .get(start..start.saturating_add(header_len))
        .and_then(|h| std::str::from_utf8(h).ok())
        .unwrap_or_else(|| fail("header cut short or not text"));
    let value_of = |key: &str| -> &str {
        let at = header
            .find(&format!("'{key}':"))
            .unwrap_or_else(|| fail(&format!("no '{key}' in {header:?}")));
        header[at + key.len() + 3..].trim_start()
    };
    if !value_of("descr").starts_with("'<f4'") {
        fail(&format!("dtype is not '<f4' in {header:?}"));
    }
    if !value_of("fortran_order").starts_with("False") {
        fail("Fortran order");
    }
    let shape_text = value_of("shape");
    let shape: Vec<usize> = shape_text
        .strip_prefix('(')
        .and_then(|t| t.split(')').next())
        .unwrap_or_else(|| fail(&format!("shape in {header:?}")))
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.parse().unwrap_or_else(|_| fail(&format!("shape {d:?}"))))
        .collect();
    let data = &bytes[start + header_len..];
    let count: usize = shape.iter().product();
    if data.len() != count * 4 {
        fail(&format!("{} data bytes for shape {shape:?}", data.len()));
    }
    let values: Vec<f32> = data
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    ArrayD::from_shape_vec(shape, values).unwrap_or_else(|e| fail(&e.to_string()))
}

/// The golden cases (prompts, RLE strings).
pub fn cases() -> serde_json::Value {
    let path = fixtures().join("golden/cases.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("cases.json"))
        .expect("cases.json is JSON")
}

/// Max |a - b| divided by max(1, max |b|): output error relative to the output's scale.
pub fn scaled_max_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Cosine similarity.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb + 1e-12)
}
