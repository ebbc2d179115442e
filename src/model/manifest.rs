//! `manifest.json`: what a model directory holds, written by `models/` and checked before loading.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::preprocess::PreprocessSpec;
use crate::{Error, Result};

/// The manifest layout this build understands.
pub const MANIFEST_FORMAT: u32 = 1;

/// The whole manifest of a model directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout version; must equal [`MANIFEST_FORMAT`].
    pub format: u32,
    /// Model name, e.g. `tinysam_vit_t`.
    pub model: String,
    /// Architecture numbers.
    pub config: ModelConfig,
    /// Where the weights came from (checkpoint hash or synthetic seed).
    pub weights: serde_json::Value,
    /// Image normalisation.
    pub preprocess: PreprocessSpec,
    /// The precision loaded when the caller does not choose.
    pub default: DefaultPrecision,
    /// Every ONNX file in the directory.
    pub files: Vec<ModelFile>,
    /// How the INT8 files were quantized.
    #[serde(default)]
    pub quantization: serde_json::Value,
    /// INT8-vs-FP32 fidelity summary.
    #[serde(default)]
    pub fidelity: serde_json::Value,
}

/// Architecture numbers the runtime needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Side of the square encoder input.
    pub image_size: usize,
    /// Channels of the image embedding.
    pub prompt_embed_dim: usize,
    /// Number of masks the decoder returns per prompt.
    pub num_multimask_outputs: usize,
}

impl ModelConfig {
    /// Side of the square image embedding.
    pub fn embedding_size(&self) -> usize {
        self.image_size / 16
    }

    /// Side of the decoder's low-resolution mask logits.
    pub fn low_res_mask_size(&self) -> usize {
        4 * self.embedding_size()
    }
}

/// Default precision per stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DefaultPrecision {
    /// Encoder precision.
    pub encoder: Precision,
    /// Decoder precision.
    pub decoder: Precision,
}

/// Numeric form of a model file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Float weights and activations.
    Fp32,
    /// QOperator INT8 (QLinearConv / QLinearMatMul).
    Int8,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Int8 => "int8",
        })
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "int8" => Ok(Precision::Int8),
            other => Err(format!(
                "unknown precision {other:?} (expected fp32 or int8)"
            )),
        }
    }
}

/// Which graph a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Image encoder.
    Encoder,
    /// Prompt encoder + mask decoder in one graph (the reference, and what any directory has).
    Decoder,
    /// The decoder's per-frame half: image tokens and the first block's image-side projections.
    #[serde(rename = "decoder_frame")]
    DecoderFrame,
    /// The decoder's per-prompt transformer and IoU head, run on the per-frame half's outputs.
    #[serde(rename = "decoder_prompt")]
    DecoderPrompt,
    /// The decoder's mask upscaling, run on the per-prompt graph's image tokens and mask weights.
    #[serde(rename = "decoder_masks")]
    DecoderMasks,
}

/// One ONNX file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelFile {
    /// Encoder or decoder.
    pub role: Role,
    /// FP32 or INT8.
    pub precision: Precision,
    /// File name relative to the manifest.
    pub path: String,
    /// Hex SHA-256 of the file.
    pub sha256: String,
    /// Graph inputs.
    pub inputs: Vec<TensorSpec>,
    /// Graph outputs.
    pub outputs: Vec<TensorSpec>,
}

/// Name and shape of a graph input or output; symbolic dimensions are strings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Tensor name in the graph.
    pub name: String,
    /// Dimensions: numbers, or names for dynamic axes.
    pub shape: Vec<serde_json::Value>,
}

impl Manifest {
    /// Read and check `dir/manifest.json`.
    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = dir.join("manifest.json");
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| Error::Manifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        manifest.check(&path)?;
        Ok(manifest)
    }

    fn check(&self, path: &Path) -> Result<()> {
        let invalid = |reason: String| Error::Manifest {
            path: path.to_path_buf(),
            reason,
        };
        if self.format != MANIFEST_FORMAT {
            return Err(invalid(format!(
                "format {} (this build reads {MANIFEST_FORMAT})",
                self.format
            )));
        }
        let c = &self.config;
        if c.image_size == 0
            || !c.image_size.is_multiple_of(16)
            || c.image_size != self.preprocess.image_size
        {
            return Err(invalid(format!(
                "image_size {} (config) / {} (preprocess) must agree and be a positive multiple of 16",
                c.image_size, self.preprocess.image_size
            )));
        }
        if self
            .preprocess
            .pixel_std
            .iter()
            .any(|s| !(s.is_finite() && *s > 0.0))
        {
            return Err(invalid(format!(
                "pixel_std {:?} must be positive",
                self.preprocess.pixel_std
            )));
        }
        if c.num_multimask_outputs == 0 {
            return Err(invalid("num_multimask_outputs is 0".into()));
        }
        for role in [Role::Encoder, Role::Decoder] {
            let p = self.default_precision(role);
            if !self.loadable_precisions(role).contains(&p) {
                return Err(invalid(format!(
                    "default {role:?} precision {p} has no file entry"
                )));
            }
        }
        Ok(())
    }

    /// The precision loaded by default for `role`.
    pub fn default_precision(&self, role: Role) -> Precision {
        match role {
            Role::Encoder => self.default.encoder,
            Role::Decoder | Role::DecoderFrame | Role::DecoderPrompt | Role::DecoderMasks => {
                self.default.decoder
            }
        }
    }

    /// The file entry for `role` at `precision`, if the directory has one.
    pub fn file(&self, role: Role, precision: Precision) -> Option<&ModelFile> {
        self.files
            .iter()
            .find(|f| f.role == role && f.precision == precision)
    }

    /// The precisions of the files listed for `role`.
    pub fn precisions(&self, role: Role) -> Vec<Precision> {
        self.files
            .iter()
            .filter(|f| f.role == role)
            .map(|f| f.precision)
            .collect()
    }

    /// The file a load of `role` at `precision` parses, and whether the runtime quantizes its
    /// constant-weight products as it loads: the directory's own entry (`false`), or — for the
    /// split decoder's three graphs at INT8 when the directory has no INT8 split decoder of its
    /// own — the FP32 entry (`true`; see [`Manifest::has_decoder_quantized_at_load`]).
    pub fn loadable(&self, role: Role, precision: Precision) -> Option<(&ModelFile, bool)> {
        if let Some(file) = self.file(role, precision) {
            return Some((file, false));
        }
        let split = matches!(
            role,
            Role::DecoderFrame | Role::DecoderPrompt | Role::DecoderMasks
        );
        if split && precision == Precision::Int8 && self.has_decoder_quantized_at_load() {
            return self.file(role, Precision::Fp32).map(|f| (f, true));
        }
        None
    }

    /// Whether the INT8 decoder is the FP32 split decoder with its largest products quantized
    /// at load (the runtime's dynamic quantization on the W8A16 kernels, see `ops::w8a16`:
    /// constant weights at 8 bits per output channel, activations at 16 bits per token, products
    /// of two activations at 12 bits a side): the directory lists the
    /// three FP32 split graphs and no INT8 decoder file of its own (an exported INT8 decoder,
    /// one graph or split, is what `int8` loads when there is one).
    pub fn has_decoder_quantized_at_load(&self) -> bool {
        const SPLIT: [Role; 3] = [Role::DecoderFrame, Role::DecoderPrompt, Role::DecoderMasks];
        SPLIT
            .iter()
            .all(|&r| self.file(r, Precision::Fp32).is_some())
            && [
                Role::Decoder,
                Role::DecoderFrame,
                Role::DecoderPrompt,
                Role::DecoderMasks,
            ]
            .iter()
            .all(|&r| self.file(r, Precision::Int8).is_none())
    }

    /// The precisions a load can choose for `role`: those of its files, and for the decoder
    /// INT8 when it is quantized at load.
    pub fn loadable_precisions(&self, role: Role) -> Vec<Precision> {
        let mut found = self.precisions(role);
        if role == Role::Decoder
            && !found.contains(&Precision::Int8)
            && self.has_decoder_quantized_at_load()
        {
            found.push(Precision::Int8);
        }
        found
    }

    /// Full path of a file entry.
    pub fn path_of(dir: &Path, file: &ModelFile) -> PathBuf {
        dir.join(&file.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest listing `files` (role, precision), defaults FP32.
    fn listing(files: &[(Role, Precision)]) -> Manifest {
        let file = |&(role, precision): &(Role, Precision)| {
            serde_json::json!({
                "role": role, "precision": precision, "path": format!("{role:?}.{precision}.onnx"),
                "sha256": "", "inputs": [], "outputs": []
            })
        };
        serde_json::from_value(serde_json::json!({
            "format": MANIFEST_FORMAT,
            "model": "m",
            "config": {"image_size": 1024, "prompt_embed_dim": 256, "num_multimask_outputs": 3},
            "weights": {},
            "preprocess": {
                "input": "", "image_size": 1024,
                "pixel_mean": [0.0, 0.0, 0.0], "pixel_std": [1.0, 1.0, 1.0]
            },
            "default": {"encoder": "fp32", "decoder": "fp32"},
            "files": files.iter().map(file).collect::<Vec<_>>(),
        }))
        .expect("a valid manifest")
    }

    const SPLIT_FP32: [(Role, Precision); 4] = [
        (Role::Decoder, Precision::Fp32),
        (Role::DecoderFrame, Precision::Fp32),
        (Role::DecoderPrompt, Precision::Fp32),
        (Role::DecoderMasks, Precision::Fp32),
    ];

    #[test]
    fn the_default_models_default_decoder_is_int8_quantized_at_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default");
        let m = Manifest::load(&dir).expect("the default model's manifest");
        assert_eq!(m.default_precision(Role::Encoder), Precision::Int8);
        assert_eq!(m.default_precision(Role::Decoder), Precision::Int8);
        assert!(m.has_decoder_quantized_at_load());
        let (file, quantized) = m
            .loadable(Role::DecoderPrompt, Precision::Int8)
            .expect("loadable");
        assert!(quantized && file.precision == Precision::Fp32);
    }

    #[test]
    fn the_int8_decoder_is_the_fp32_split_decoder_quantized_at_load() {
        let m = listing(&SPLIT_FP32);
        assert!(m.has_decoder_quantized_at_load());
        assert_eq!(
            m.loadable_precisions(Role::Decoder),
            [Precision::Fp32, Precision::Int8]
        );
        let (file, quantized) = m
            .loadable(Role::DecoderMasks, Precision::Int8)
            .expect("loadable");
        assert!(quantized && file.precision == Precision::Fp32);
        let (_, quantized) = m
            .loadable(Role::DecoderMasks, Precision::Fp32)
            .expect("loadable");
        assert!(!quantized);
        // The one graph has no integer form of its own.
        assert!(m.loadable(Role::Decoder, Precision::Int8).is_none());
        assert_eq!(m.precisions(Role::Decoder), [Precision::Fp32]);
    }

    #[test]
    fn an_exported_int8_decoder_or_a_missing_split_graph_has_no_quantized_at_load_form() {
        let mut with_int8 = SPLIT_FP32.to_vec();
        with_int8.push((Role::Decoder, Precision::Int8));
        let m = listing(&with_int8);
        assert!(!m.has_decoder_quantized_at_load());
        assert!(m.loadable(Role::DecoderMasks, Precision::Int8).is_none());
        assert_eq!(
            m.loadable_precisions(Role::Decoder),
            [Precision::Fp32, Precision::Int8]
        );
        let m = listing(&SPLIT_FP32[..3]);
        assert!(!m.has_decoder_quantized_at_load());
        assert_eq!(m.loadable_precisions(Role::Decoder), [Precision::Fp32]);
    }
}
