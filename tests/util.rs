//! Helpers shared by the integration tests.

use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::process::Child;
use std::sync::OnceLock;

use ndarray_npy::ReadNpyExt;
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
    let path = fixtures().join("golden").join(name);
    let file =
        std::fs::File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    ArrayD::<f32>::read_npy(file).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
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
