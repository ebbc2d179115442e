//! Loading TinySAM's two graphs with tract: plans are optimised once and reused.
//!
//! Owns everything that touches tract: the [`encoder::Encoder`] (image -> embedding), the
//! [`decoder::Decoder`] (embedding + prompts -> mask logits) and the [`kernels`] report of which
//! matmul kernels tract chose. Nothing here knows about frames, cameras or sockets.

pub mod decoder;
pub mod encoder;
pub mod kernels;
pub mod manifest;
pub mod ops;
pub mod profile;
pub mod qmatmul;
#[cfg(test)]
pub(crate) mod test_support;

use std::path::{Path, PathBuf};

use tract_onnx::prelude::*;

pub use decoder::{Decoder, DecoderForm, DecoderInput, MaskLogits};
pub use encoder::{input_tensor, Embedding, Encoder};
pub use manifest::{Manifest, Precision, Role};

use crate::{Error, Result};

/// Which file of each stage to load.
#[derive(Debug, Clone, Copy, Default)]
pub struct PrecisionChoice {
    /// Encoder precision; the manifest's default when `None`.
    pub encoder: Option<Precision>,
    /// Decoder precision; the manifest's default when `None`.
    pub decoder: Option<Precision>,
    /// Which int8 matmul runs the quantized layers.
    pub int8_matmul: Int8Matmul,
    /// Which form of the decoder runs prompts.
    pub decoder_graph: DecoderGraph,
    /// How an INT8 encoder's float convolutional front (stem, stage 0) runs its products.
    pub conv_blocks: ConvBlocks,
}

/// How the convolutional front of an INT8 encoder, which the model's quantization leaves in
/// f32, runs its products: stage 0's MBConv blocks and the patch merging after it (their 1×1
/// products) and the patch embedding's second convolution (its first, on the image, stays f32).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ConvBlocks {
    /// As W8A16 integer products ([`ops::w8a16`]: weights at 8 bits per output channel, each
    /// pixel's activations at 16 bits) on the kernel that matches the int8 matmul's where one
    /// is faster than f32 (x86_64 with AVX2 or VNNI, see [`ConvBlocks::kernel`]); in f32
    /// otherwise and when the int8 matmul is tract's. FP32 encoders keep f32.
    #[default]
    Auto,
    /// In f32, as the graph has them.
    F32,
}

impl ConvBlocks {
    /// The W8A16 kernel for an INT8 graph whose products run on `int8`, or `None` for f32.
    /// Only x86_64's VNNI and AVX2 families have one worth running: on aarch64 NEON's i16
    /// multiply-adds (`smlal`, 4 lanes) are no faster than its f32 ones (`fmla`, 4 lanes, on
    /// both of a Cortex-A76's vector pipes where `smlal` has one), so W8A16 would only add its
    /// quantization pass: the blocks stay f32 there (`benches/pi5-mca-results.md`), as without
    /// AVX2.
    pub fn kernel(self, int8: Int8Matmul) -> Option<ops::w8a16::W8A16Kernel> {
        use ops::w8a16::W8A16Kernel;
        match (self, int8.kernel()?) {
            (ConvBlocks::Auto, qmatmul::Kernel::Avx512Vnni) => Some(W8A16Kernel::Vnni),
            (ConvBlocks::Auto, qmatmul::Kernel::Avx2) => Some(W8A16Kernel::Avx2),
            (ConvBlocks::Auto, qmatmul::Kernel::Portable | qmatmul::Kernel::NeonDot)
            | (ConvBlocks::F32, _) => None,
        }
    }
}

impl std::str::FromStr for ConvBlocks {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<ConvBlocks, String> {
        match s {
            "auto" | "w8a16" => Ok(ConvBlocks::Auto),
            "f32" => Ok(ConvBlocks::F32),
            other => Err(format!(
                "unknown convolution-block products `{other}` (auto, w8a16, f32)"
            )),
        }
    }
}

impl std::fmt::Display for ConvBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConvBlocks::Auto => "auto",
            ConvBlocks::F32 => "f32",
        })
    }
}

/// The form of the decoder that runs prompts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DecoderGraph {
    /// The per-frame + per-prompt pair when the directory has it at the decoder's precision,
    /// else the one graph.
    #[default]
    Auto,
    /// The one-graph decoder (the reference the pair is checked against).
    OneGraph,
    /// The per-frame + per-prompt pair with the mask upscaling's first product at full rank
    /// (the reference the low-rank form is checked and timed against).
    SplitFullRank,
}

impl std::str::FromStr for DecoderGraph {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<DecoderGraph, String> {
        match s {
            "auto" | "split" => Ok(DecoderGraph::Auto),
            "one" | "one-graph" => Ok(DecoderGraph::OneGraph),
            "split-full-rank" => Ok(DecoderGraph::SplitFullRank),
            other => Err(format!(
                "unknown decoder graph `{other}` (auto, one-graph, split-full-rank)"
            )),
        }
    }
}

/// Which implementation runs an INT8 graph's quantized matrix products.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Int8Matmul {
    /// Ours ([`qmatmul`]), on the fastest kernel this CPU has (or `TINYSAM_INT8_KERNEL`'s).
    #[default]
    Auto,
    /// tract's own kernels, as tract chooses them.
    Tract,
    /// Ours, on this kernel.
    Kernel(qmatmul::Kernel),
}

impl Int8Matmul {
    /// The kernel of ours to use, `None` for tract's (`Auto` detects it: resolve it once with
    /// [`Int8Matmul::resolved`] where the answer is used more than once).
    pub fn kernel(self) -> Option<qmatmul::Kernel> {
        match self {
            Int8Matmul::Auto => Some(qmatmul::Kernel::detect()),
            Int8Matmul::Tract => None,
            Int8Matmul::Kernel(k) => Some(k),
        }
    }

    /// `Auto` replaced by the kernel it detects now.
    pub fn resolved(self) -> Int8Matmul {
        self.kernel().map_or(Int8Matmul::Tract, Int8Matmul::Kernel)
    }
}

impl std::fmt::Display for Int8Matmul {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Int8Matmul::Auto => f.write_str("auto"),
            Int8Matmul::Tract => f.write_str("tract"),
            Int8Matmul::Kernel(k) => write!(f, "{k}"),
        }
    }
}

impl std::str::FromStr for Int8Matmul {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Int8Matmul, String> {
        match s {
            "auto" => Ok(Int8Matmul::Auto),
            "tract" => Ok(Int8Matmul::Tract),
            other => other
                .parse::<qmatmul::Kernel>()
                .map(Int8Matmul::Kernel)
                .map_err(|_| {
                    format!(
                        "unknown int8 matmul `{other}` (auto, tract, portable, avx2, vnni, sdot)"
                    )
                }),
        }
    }
}

/// A loaded model directory: manifest plus ready-to-run encoder and decoder.
pub struct Model {
    /// The directory it was loaded from.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// Image encoder.
    pub encoder: Encoder,
    /// Prompt encoder + mask decoder.
    pub decoder: Decoder,
}

impl Model {
    /// Load `dir` (with `manifest.json`) at the chosen precisions.
    pub fn load(dir: &Path, choice: PrecisionChoice) -> Result<Model> {
        let (manifest, enc_p, dec_p, int8) = resolve(dir, &choice)?;
        let encoder = Encoder::load(dir, &manifest, enc_p, int8, choice.conv_blocks)?;
        let decoder = Decoder::load(dir, &manifest, dec_p, int8, choice.decoder_graph)?;
        log::info!(
            "loaded {} from {} (encoder {enc_p}, decoder {dec_p} {}; weights: {})",
            manifest.model,
            dir.display(),
            decoder.form(),
            manifest
                .weights
                .get("kind")
                .and_then(|k| k.as_str())
                .unwrap_or("unknown")
        );
        match kernels::analyse(encoder.model()) {
            Ok(report) => log::info!(
                "tract ISA {}; encoder {:.1} GMAC, {:.1}% in integer kernels, top kernels {:?}",
                native_isa(),
                (report.integer_macs + report.float_macs) as f64 / 1e9,
                report.integer_share() * 100.0,
                report
                    .kernel_totals()
                    .iter()
                    .take(3)
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>()
            ),
            Err(e) => log::warn!("could not analyse the encoder's kernels: {e}"),
        }
        Ok(Model {
            dir: dir.to_path_buf(),
            manifest,
            encoder,
            decoder,
        })
    }
}

/// Parse an ONNX file and check its declared inputs against the manifest entry.
pub(crate) fn parse_onnx(
    dir: &Path,
    manifest: &Manifest,
    role: Role,
    precision: Precision,
) -> Result<(PathBuf, InferenceModel)> {
    let stage = stage_name(role);
    let (entry, _) = manifest
        .loadable(role, precision)
        .ok_or_else(|| Error::Manifest {
            path: dir.join("manifest.json"),
            reason: format!(
                "no {precision} {stage} file (available: {:?})",
                manifest
                    .precisions(role)
                    .iter()
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
            ),
        })?;
    let path = Manifest::path_of(dir, entry);
    if !path.is_file() {
        return Err(Error::Io {
            path,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "model file missing"),
        });
    }
    verify_sha256(&path, &entry.sha256)?;
    // Shapes come from the input facts we set: the symbolic `batch`/`points` names that shape
    // inference left in value_info and outputs would otherwise clash with concrete batch sizes.
    let model = unpanic(|| {
        tract_onnx::onnx()
            .with_ignore_value_info(true)
            .with_ignore_output_shapes(true)
            .model_for_path(&path)
    })
    .map_err(|source| Error::ModelLoad {
        stage,
        path: path.clone(),
        source,
    })?;
    let names: Vec<String> = model
        .input_outlets()
        .map_err(|source| Error::ModelLoad {
            stage,
            path: path.clone(),
            source,
        })?
        .iter()
        .map(|o| model.node(o.node).name.clone())
        .collect();
    let expected: Vec<String> = entry.inputs.iter().map(|t| t.name.clone()).collect();
    if names != expected {
        return Err(Error::ModelMismatch {
            path,
            reason: format!("graph inputs are {names:?}, manifest says {expected:?}"),
        });
    }
    Ok((path, model))
}

/// The manifest of `dir` and what a load with `choice` uses from it: the encoder and decoder
/// precisions (the manifest's defaults where `choice` has none) and the INT8 implementation,
/// refused if its kernel does not run on this CPU.
fn resolve(
    dir: &Path,
    choice: &PrecisionChoice,
) -> Result<(Manifest, Precision, Precision, Int8Matmul)> {
    let manifest = Manifest::load(dir)?;
    let encoder = choice
        .encoder
        .unwrap_or(manifest.default_precision(Role::Encoder));
    let decoder = choice
        .decoder
        .unwrap_or(manifest.default_precision(Role::Decoder));
    let int8 = choice.int8_matmul.resolved();
    if let Some(k) = int8.kernel() {
        if !k.is_supported() {
            return Err(Error::Unsupported(format!(
                "int8 kernel {k} does not run on this CPU (supported: {:?})",
                qmatmul::Kernel::supported()
            )));
        }
    }
    Ok((manifest, encoder, decoder, int8))
}

/// What [`verify_files`] found: the model, the precisions a load would pick and the files it
/// checked.
#[derive(Debug, Clone)]
pub struct VerifiedModel {
    /// The manifest's model name.
    pub model: String,
    /// Encoder precision a load would use.
    pub encoder: Precision,
    /// Decoder precision a load would use.
    pub decoder: Precision,
    /// Every file of those precisions, each of which matched its SHA-256.
    pub files: Vec<PathBuf>,
}

/// Check a model directory the way [`Model::load`] would, without building anything: the
/// manifest, the chosen (or default) precisions, the INT8 kernel on this CPU, and the SHA-256 of
/// every file of those precisions (`tinysamd --check-config`).
pub fn verify_files(dir: &Path, choice: &PrecisionChoice) -> Result<VerifiedModel> {
    let (manifest, encoder, decoder, _) = resolve(dir, choice)?;
    if manifest.file(Role::Encoder, encoder).is_none() {
        return Err(Error::ModelMismatch {
            path: dir.join("manifest.json"),
            reason: format!("it lists no {encoder} encoder"),
        });
    }
    if !manifest
        .loadable_precisions(Role::Decoder)
        .contains(&decoder)
    {
        return Err(Error::ModelMismatch {
            path: dir.join("manifest.json"),
            reason: format!("it lists no {decoder} decoder"),
        });
    }
    // Every file a load could parse at those precisions (an INT8 decoder quantized at load is
    // the FP32 split decoder's files).
    let mut files = Vec::new();
    let roles = [
        (Role::Encoder, encoder),
        (Role::Decoder, decoder),
        (Role::DecoderFrame, decoder),
        (Role::DecoderPrompt, decoder),
        (Role::DecoderMasks, decoder),
    ];
    for entry in roles
        .into_iter()
        .filter_map(|(role, precision)| manifest.loadable(role, precision))
        .map(|(entry, _)| entry)
    {
        let path = dir.join(&entry.path);
        verify_sha256(&path, &entry.sha256)?;
        files.push(path);
    }
    Ok(VerifiedModel {
        model: manifest.model.clone(),
        encoder,
        decoder,
        files,
    })
}

/// Check that `path` hashes to the manifest's `expected` SHA-256 (hex): a damaged or swapped
/// model file is refused by name before tract parses it.
pub(crate) fn verify_sha256(path: &Path, expected: &str) -> Result<()> {
    use sha2::{Digest, Sha256};
    let io_err = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io_err)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io_err)?;
    let actual = format!("{:x}", hasher.finalize());
    if actual.eq_ignore_ascii_case(expected.trim()) {
        return Ok(());
    }
    Err(Error::ModelMismatch {
        path: path.to_path_buf(),
        reason: if expected.trim().is_empty() {
            "the manifest gives no SHA-256 for it".to_string()
        } else {
            format!(
                "its SHA-256 is {actual}, the manifest says {expected}: the file is damaged or \
                 not the one the manifest was written for"
            )
        },
    })
}

/// Run `f`, turning a panic inside it into an error that carries the panic's message: tract
/// panics on some malformed graphs (an index out of bounds from a corrupt constant, say), and a
/// model file must never take a thread, or the daemon, down with it.
pub(crate) fn unpanic<T>(f: impl FnOnce() -> TractResult<T>) -> TractResult<T> {
    caught(f).unwrap_or_else(|panic| Err(anyhow::anyhow!("{panic}")))
}

/// `f`'s value, or `tract panicked: <message>` if it panicked.
fn caught<R>(f: impl FnOnce() -> R) -> std::result::Result<R, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|payload| format!("tract panicked: {}", crate::panic_message(&*payload)))
}

/// Optimise a parsed graph for running; INT8 graphs get their quantized matmuls replaced by
/// ours first (unless `int8` says tract's), and their convolution blocks integer products as
/// `conv_blocks` says. For the split decoder's per-prompt and mask graphs, `conv_blocks` is how
/// the INT8 decoder quantized at load asks for its W8A16 products (`Auto`; `F32` otherwise). A
/// panic inside tract comes out as [`Error::ModelLoad`].
pub(crate) fn optimize(
    model: InferenceModel,
    role: Role,
    path: &Path,
    int8: Int8Matmul,
    conv_blocks: ConvBlocks,
) -> Result<TypedModel> {
    caught(|| optimize_unguarded(model, role, path, int8, conv_blocks)).unwrap_or_else(|panic| {
        Err(Error::ModelLoad {
            stage: stage_name(role),
            path: path.to_path_buf(),
            source: anyhow::anyhow!("{panic}"),
        })
    })
}

fn optimize_unguarded(
    model: InferenceModel,
    role: Role,
    path: &Path,
    int8: Int8Matmul,
    conv_blocks: ConvBlocks,
) -> Result<TypedModel> {
    let stage = stage_name(role);
    let load_err = |source| Error::ModelLoad {
        stage,
        path: path.to_path_buf(),
        source,
    };
    let mut typed = model
        .into_typed()
        .and_then(|m| m.into_decluttered())
        .map_err(load_err)?;
    // Integer convolution blocks in a quantized graph only.
    let mut block_kernel = None;
    if let Some(kernel) = int8.kernel() {
        let mut report =
            qmatmul::rewrite_quantized_matmuls(&mut typed, kernel).map_err(load_err)?;
        qmatmul::fuse_quantization(&mut typed, &mut report).map_err(load_err)?;
        let (biases, gelus) = qmatmul::fuse_epilogues(&mut typed).map_err(load_err)?;
        log::debug!("{stage}: {biases} bias adds and {gelus} GELUs fused into int8 products");
        let chained = qmatmul::chain_products(&mut typed).map_err(load_err)?;
        if chained > 0 {
            log::debug!("{stage}: {chained} int8 products hand i8 rows to the next");
        }
        if !report.replaced.is_empty() || !report.kept.is_empty() {
            log::info!(
                "{stage}: {} quantized matmuls on {}, {} left to tract; {} quantize and {} \
                 dequantize passes fused into them",
                report.replaced.len(),
                kernel.report_name(),
                report.kept.len(),
                report.fused_quantize,
                report.fused_dequantize
            );
        }
        for (node, why) in &report.kept {
            log::debug!("{stage}: {node} left to tract: {why}");
        }
        if !report.replaced.is_empty() {
            block_kernel = conv_blocks.kernel(int8);
        }
    }
    let attention = ops::rewrite_window_attention(&mut typed).map_err(load_err)?;
    if !attention.replaced.is_empty() {
        log::info!(
            "{stage}: {} attention cores on TinysamWindowAttention, {} softmaxes left to tract",
            attention.replaced.len(),
            attention.kept.len()
        );
    }
    for (node, why) in &attention.kept {
        log::debug!("{stage}: attention at {node} left to tract: {why}");
    }
    let (qkv_in, i8_out) = ops::fuse_attention_quantization(&mut typed).map_err(load_err)?;
    if qkv_in + i8_out > 0 {
        log::debug!(
            "{stage}: {qkv_in} attention cores read i8 qkv, {i8_out} write i8 for their projection"
        );
    }
    let norms = ops::rewrite_layer_norm(&mut typed).map_err(load_err)?;
    if norms > 0 {
        log::debug!("{stage}: {norms} LayerNorms on TinysamLayerNorm");
    }
    let channel_norms = ops::rewrite_channel_layer_norm(&mut typed).map_err(load_err)?;
    if channel_norms > 0 {
        log::debug!("{stage}: {channel_norms} channel LayerNorms on TinysamChannelLayerNorm");
    }
    let folded = qmatmul::fold_layer_norms(&mut typed).map_err(load_err)?;
    if folded > 0 {
        log::debug!("{stage}: {folded} LayerNorms normalise rows as an int8 product packs them");
    }
    let local_convs = ops::rewrite_token_depthwise(&mut typed).map_err(load_err)?;
    if local_convs > 0 {
        log::debug!("{stage}: {local_convs} depthwise convolutions read tokens as HWC images");
    }
    let gelus = qmatmul::rewrite_gelu(&mut typed).map_err(load_err)?;
    if gelus > 0 {
        log::debug!("{stage}: {gelus} GELUs on TinysamGelu");
    }
    let stems = ops::rewrite_stem(&mut typed, block_kernel).map_err(load_err)?;
    if stems > 0 {
        log::debug!(
            "{stage}: patch embedding on TinysamStem, {} products",
            block_kernel.map_or("f32", |k| k.name())
        );
    }
    let blocks = ops::rewrite_mbconv(&mut typed, block_kernel).map_err(load_err)?;
    if blocks > 0 {
        log::debug!(
            "{stage}: {blocks} convolution blocks on TinysamMbConv, {} products",
            block_kernel.map_or("f32", |k| k.name())
        );
    }
    let upscaling_kernel = match role {
        Role::DecoderMasks => conv_blocks.kernel(int8),
        _ => None,
    };
    let upscaling = ops::rewrite_mask_upscaling(&mut typed, upscaling_kernel).map_err(load_err)?;
    if upscaling > 0 {
        log::debug!("{stage}: mask upscaling on TinysamMaskUpscaling");
    }
    let token_to_image = ops::rewrite_token_to_image(&mut typed).map_err(load_err)?;
    if token_to_image > 0 {
        log::debug!(
            "{stage}: {token_to_image} token->image attention cores on TinysamTokenToImageAttention"
        );
    }
    let softmax = ops::rewrite_softmax(&mut typed).map_err(load_err)?;
    if softmax > 0 {
        log::debug!("{stage}: {softmax} softmax ops on TinysamSoftmax");
    }
    let mixing = ops::rewrite_image_to_token_output(&mut typed).map_err(load_err)?;
    if mixing > 0 {
        log::debug!(
            "{stage}: {mixing} image->token attention outputs on TinysamImageToTokenOutput"
        );
    }
    let logits = ops::rewrite_image_to_token_logits(&mut typed).map_err(load_err)?;
    if logits > 0 {
        log::debug!("{stage}: {logits} image->token outputs compute their own logits");
    }
    if let (Role::DecoderPrompt, Some(kernel)) = (role, conv_blocks.kernel(int8)) {
        let integer =
            ops::image_to_token_outputs_in_integers(&mut typed, kernel).map_err(load_err)?;
        log::debug!(
            "{stage}: {integer} image->token weighted sums as W8A16 on {}",
            kernel.name()
        );
        let integer = ops::token_to_image_in_integers(&mut typed, kernel).map_err(load_err)?;
        log::debug!(
            "{stage}: {integer} token->image attention cores' products as W8A16 on {}",
            kernel.name()
        );
    }
    let quantizes = qmatmul::rewrite_quantize(&mut typed).map_err(load_err)?;
    if quantizes > 0 {
        log::debug!("{stage}: {quantizes} quantizations on TinysamQuantize");
    }
    // Last: the other rewrites match some of the same axis ops.
    let gathers = ops::rewrite_row_gathers(&mut typed).map_err(load_err)?;
    if gathers > 0 {
        log::debug!(
            "{stage}: {gathers} row-moving chains (window partitions, merges) on TinysamRowGather"
        );
    }
    typed.into_optimized().map_err(load_err)
}

/// "encoder" or "decoder", for messages.
pub(crate) fn stage_name(role: Role) -> &'static str {
    match role {
        Role::Encoder => "encoder",
        Role::Decoder => "decoder",
        Role::DecoderFrame => "decoder (per frame)",
        Role::DecoderPrompt => "decoder (per prompt)",
        Role::DecoderMasks => "decoder (masks)",
    }
}

/// The ISA tract detected on this CPU, e.g. `x86_64+avx2+fma+avx512f`.
pub fn native_isa() -> String {
    format!("{:?}", tract_linalg::isa::native())
}

/// The form our float ops run (`avx512f`, `avx2+fma`, `neon`, `portable`) and the int8 kernel,
/// naming the `TINYSAM_ISA` cap when one applies (x86_64), e.g. `avx512f, int8 on vnni` or
/// `avx2+fma, int8 on avx2 (capped at avx2+fma by TINYSAM_ISA)`.
pub fn ops_isa() -> String {
    let ceiling = ops::graph::ceiling();
    let capped = cfg!(target_arch = "x86_64") && ceiling < ops::graph::Isa::Avx512;
    format!(
        "{}, int8 on {}{}",
        ops::graph::Isa::detect(),
        qmatmul::Kernel::detect(),
        if capped {
            format!(" (capped at {ceiling} by TINYSAM_ISA)")
        } else {
            String::new()
        }
    )
}

/// Make tract's matrix products use `threads` threads (1 = tract's default single thread).
pub fn set_threads(threads: usize) {
    let executor = if threads > 1 {
        tract_linalg::multithread::Executor::multithread(threads)
    } else {
        tract_linalg::multithread::Executor::SingleThread
    };
    tract_linalg::multithread::set_default_executor(executor);
}

/// Where to look for a model directory when the caller names none, first match wins:
/// `$TINYSAM_MODEL`, `./models/default`, the source tree's `models/default`,
/// `/usr/share/tinysam-edge/model` (the .deb's location).
pub fn default_model_dir() -> PathBuf {
    let candidates = [
        std::env::var_os("TINYSAM_MODEL").map(PathBuf::from),
        Some(PathBuf::from("models/default")),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default")),
        Some(PathBuf::from("/usr/share/tinysam-edge/model")),
    ];
    candidates
        .iter()
        .flatten()
        .find(|p| p.join("manifest.json").is_file())
        .cloned()
        .unwrap_or_else(|| PathBuf::from("models/default"))
}

#[cfg(test)]
mod conv_blocks_tests {
    use super::ops::w8a16::W8A16Kernel;
    use super::qmatmul::Kernel;
    use super::{ConvBlocks, Int8Matmul};

    #[test]
    fn w8a16_only_where_it_is_faster_than_f32() {
        let auto = |kernel| ConvBlocks::Auto.kernel(Int8Matmul::Kernel(kernel));
        assert_eq!(auto(Kernel::Avx512Vnni), Some(W8A16Kernel::Vnni));
        assert_eq!(auto(Kernel::Avx2), Some(W8A16Kernel::Avx2));
        // NEON's i16 products are no faster than its f32 ones; no AVX2, no fast form.
        assert_eq!(auto(Kernel::NeonDot), None);
        assert_eq!(auto(Kernel::Portable), None);
        assert_eq!(ConvBlocks::Auto.kernel(Int8Matmul::Tract), None);
        let f32_blocks = ConvBlocks::F32.kernel(Int8Matmul::Kernel(Kernel::Avx512Vnni));
        assert_eq!(f32_blocks, None);
    }

    #[test]
    fn names_parse_and_unknown_ones_are_named_in_the_error() {
        assert_eq!("auto".parse(), Ok(ConvBlocks::Auto));
        assert_eq!("w8a16".parse(), Ok(ConvBlocks::Auto));
        assert_eq!("f32".parse(), Ok(ConvBlocks::F32));
        let err = "int4".parse::<ConvBlocks>().unwrap_err();
        assert!(err.contains("`int4`") && err.contains("f32"), "{err}");
    }
}
