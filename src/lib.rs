//! tinysam-edge: promptable segmentation with INT8 TinySAM through tract, for robots.
//!
//! The flow is `RgbImage -> ImageTensor -> Embedding (+ Prompt) -> MaskLogits -> Mask`:
//! [`preprocess`] turns a frame into the encoder's input, [`model`] runs the encoder once per frame
//! and the decoder per batch of prompts, [`postprocess`] turns low-resolution logits into masks at
//! the frame's size with scores, boxes and COCO RLE. [`segmenter::Segmenter`] ties them together.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod allocator;
pub mod camera;
pub mod client;
pub mod config;
pub mod daemon;
pub mod everything;
pub mod fidelity;
pub mod geometry;
pub mod heartbeat;
pub mod hub;
pub mod latest;
pub mod metrics;
pub mod model;
pub mod overlay;
pub mod picture;
pub mod pipeline;
pub mod pixel;
pub mod postprocess;
pub mod preprocess;
pub mod prompt;
pub mod protocol;
pub mod ring;
pub mod ros2;
pub mod scheduler;
pub mod segmenter;
pub mod server;

use std::path::PathBuf;

/// Nanoseconds of CLOCK_MONOTONIC now (what V4L2 stamps its buffers with).
pub fn monotonic_now_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => (t.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(t.tv_nsec() as u64),
        Err(_) => 0,
    }
}

/// An error and its causes on one line, for logs (line breaks inside a message become spaces).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The message a panic carried (`panic!`'s text), for errors and logs that report a caught one.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// Everything the library can fail with; each variant names what it was working on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model directory or one of its files could not be read.
    #[error("reading {path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// `manifest.json` is malformed or describes something this build cannot run.
    #[error("model manifest {path} is invalid: {reason}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An ONNX file does not match what its manifest promises.
    #[error("model file {path} does not match its manifest: {reason}")]
    ModelMismatch {
        /// The ONNX file.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
    /// tract could not load or optimise a model file.
    #[error("loading the {stage} model {path}")]
    ModelLoad {
        /// "encoder" or "decoder".
        stage: &'static str,
        /// The ONNX file.
        path: PathBuf,
        /// tract's error chain.
        #[source]
        source: anyhow::Error,
    },
    /// tract failed while running a model.
    #[error("running the {stage} model")]
    Inference {
        /// "encoder" or "decoder".
        stage: &'static str,
        /// tract's error chain.
        #[source]
        source: anyhow::Error,
    },
    /// The caller stopped a model run before it ended (a daemon shutting down, an everything
    /// pass nobody waits for any more).
    #[error("the {stage} was stopped before it finished")]
    Stopped {
        /// "encoder" or "everything pass".
        stage: &'static str,
    },
    /// A setting this CPU or build cannot honour (e.g. an int8 kernel it lacks).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// An input image that cannot be segmented.
    #[error("invalid image: {0}")]
    Image(String),
    /// A prompt that is out of bounds or malformed.
    #[error(transparent)]
    Prompt(#[from] prompt::PromptError),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
