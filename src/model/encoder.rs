//! The image encoder: one normalised, padded image tensor in, one embedding out.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::eval;

use super::decoder::FrameTensors;
use super::manifest::{Manifest, Precision, Role};
use super::{parse_onnx, stage_name};
use crate::preprocess::ImageTensor;
use crate::{Error, Result};

/// An image embedding (1, D, e, e) with the geometry of the frame it came from.
#[derive(Clone)]
pub struct Embedding {
    /// The encoder output.
    pub tensor: Arc<Tensor>,
    /// Frame and model sizes, for prompt and mask transforms.
    pub geometry: crate::preprocess::Geometry,
    /// The decoder's per-frame tensors of `tensor` without mask input, once a prompt needed
    /// them (shared by clones).
    pub(crate) decoder_frame: Arc<OnceLock<Arc<FrameTensors>>>,
}

impl Embedding {
    /// An embedding of a frame with `geometry`.
    pub fn new(tensor: Arc<Tensor>, geometry: crate::preprocess::Geometry) -> Embedding {
        Embedding {
            tensor,
            geometry,
            decoder_frame: Arc::default(),
        }
    }
}

/// The encoder's input tensor (1, 3, S, S) of a preprocessed image, without copying its values.
pub fn input_tensor(image: ImageTensor) -> Result<Tensor> {
    let s = image.side;
    let values = image.data.len();
    tract_ndarray::Array4::from_shape_vec((1, 3, s, s), image.data)
        .map(Tensor::from)
        .map_err(|e| Error::Inference {
            stage: "encoder",
            source: anyhow::anyhow!("an input of {values} values is not 3 planes of {s}x{s}: {e}"),
        })
}

/// The caller's hook asked the encoder to stop between two ops.
#[derive(Debug, thiserror::Error)]
#[error("stopped between two ops")]
struct Stopped;

/// An optimised, runnable encoder plan.
pub struct Encoder {
    plan: Arc<TypedRunnableModel>,
    /// The ONNX file.
    pub path: PathBuf,
    /// Its precision.
    pub precision: Precision,
    /// Encoder input side.
    pub image_size: usize,
    /// Embedding shape (1, D, e, e).
    pub output_shape: [usize; 4],
}

impl Encoder {
    /// Load and optimise the encoder of `manifest` at `precision`.
    pub fn load(
        dir: &Path,
        manifest: &Manifest,
        precision: Precision,
        int8: super::Int8Matmul,
        conv_blocks: super::ConvBlocks,
    ) -> Result<Encoder> {
        let stage = stage_name(Role::Encoder);
        let (path, mut model) = parse_onnx(dir, manifest, Role::Encoder, precision)?;
        let s = manifest.config.image_size;
        let load_err = |source| Error::ModelLoad {
            stage,
            path: path.clone(),
            source,
        };
        model
            .set_input_fact(0, f32::fact([1, 3, s, s]).into())
            .map_err(load_err)?;
        let typed = super::optimize(model, Role::Encoder, &path, int8, conv_blocks)?;
        let e = manifest.config.embedding_size();
        let d = manifest.config.prompt_embed_dim;
        let out_fact = typed.output_fact(0).map_err(load_err)?;
        let expected = [1, d, e, e];
        if out_fact.shape.as_concrete() != Some(&expected[..]) {
            return Err(Error::ModelMismatch {
                path,
                reason: format!(
                    "encoder output is {:?}, expected {expected:?}",
                    out_fact.shape
                ),
            });
        }
        let plan = super::unpanic(|| typed.into_runnable()).map_err(load_err)?;
        Ok(Encoder {
            plan,
            path,
            precision,
            image_size: s,
            output_shape: expected,
        })
    }

    /// Run the encoder on a preprocessed image.
    pub fn embed(&self, image: ImageTensor) -> Result<Embedding> {
        self.embed_between_ops(image, &mut || true)
    }

    /// [`Encoder::embed`], calling `between_ops` before each op of the plan runs. A caller
    /// that must at times give the cores to more urgent work blocks there: the daemon's encoder
    /// waits while a prompt request is decoded, instead of sharing the threads with it. When
    /// `between_ops` returns false the encoding is abandoned at once ([`Error::Stopped`]): a
    /// daemon that is stopping does not finish the frame first.
    pub fn embed_between_ops(
        &self,
        image: ImageTensor,
        between_ops: &mut dyn FnMut() -> bool,
    ) -> Result<Embedding> {
        let geometry = image.geometry;
        let input = input_tensor(image)?;
        let mut out = super::unpanic(|| {
            let mut state = self.plan.spawn()?;
            state.run_plan_with_eval(tvec!(input.into()), |ctx, op_state, node, input| {
                if between_ops() {
                    eval(ctx, op_state, node, input)
                } else {
                    Err(anyhow::Error::new(Stopped))
                }
            })
        })
        .map_err(|source| {
            if source.downcast_ref::<Stopped>().is_some() {
                Error::Stopped { stage: "encoder" }
            } else {
                Error::Inference {
                    stage: "encoder",
                    source,
                }
            }
        })?;
        let tensor = out.remove(0).into_arc_tensor();
        Ok(Embedding::new(tensor, geometry))
    }

    /// The runnable plan, for profiling.
    pub fn plan(&self) -> &Arc<TypedRunnableModel> {
        &self.plan
    }

    /// The optimised graph, for kernel reports.
    pub fn model(&self) -> &TypedModel {
        self.plan.model()
    }
}
