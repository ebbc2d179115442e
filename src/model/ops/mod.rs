//! Our own float tract ops, put in place of tract's where tract's evaluation is slow for the
//! shapes TinySAM has (see each op), by rewrite passes run at load before tract's optimiser.

/// In a rewrite pass's matcher: return `Ok(Err(reason))` (the pattern started but does not fit,
/// and why) unless `cond` holds.
macro_rules! need {
    ($cond:expr, $($why:tt)*) => {
        if !$cond {
            return Ok(Err(format!($($why)*)));
        }
    };
}

pub mod attention;
pub mod fastmath;
pub mod gemm;
pub(crate) mod graph;
pub mod layer_norm;
pub mod mask_upscaling;
pub mod mbconv;
pub mod row_gather;
pub mod softmax;
pub mod stem;
pub mod token_depthwise;
pub mod token_mixing;
pub mod token_to_image;
pub mod transpose;
pub mod w8a16;

pub use attention::{
    fuse_attention_quantization, rewrite_window_attention, AttentionQuant, AttentionReport,
    WindowAttention,
};
pub use layer_norm::{
    rewrite_channel_layer_norm, rewrite_layer_norm, ChannelLayerNormOp, LayerNormOp,
};
pub use mask_upscaling::{rewrite_mask_upscaling, MaskUpscaling};
pub use mbconv::{rewrite_mbconv, MbConv};
pub use row_gather::{rewrite_row_gathers, RowGather};
pub use softmax::{rewrite_softmax, AxisSoftmax};
pub use stem::{rewrite_stem, Stem};
pub use token_depthwise::{rewrite_token_depthwise, TokenDepthwise};
pub use token_mixing::{
    image_to_token_outputs_in_integers, rewrite_image_to_token_logits,
    rewrite_image_to_token_output, ImageToTokenOutput, LogitsSource,
};
pub use token_to_image::{
    rewrite_token_to_image, token_to_image_in_integers, TokenToImageAttention,
};

/// Whether two optional float vectors hold the same values bit for bit (how our ops with float
/// parameters are `Eq`, as tract requires of ops).
pub(crate) fn same_bits(
    a: &Option<std::sync::Arc<Vec<f32>>>,
    b: &Option<std::sync::Arc<Vec<f32>>>,
) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            a.len() == b.len()
                && a.iter()
                    .zip(b.iter())
                    .all(|(x, y)| x.to_bits() == y.to_bits())
        }
        _ => false,
    }
}
