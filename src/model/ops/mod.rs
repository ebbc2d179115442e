//! Our own float tract ops, put in place of tract's where tract's evaluation is slow for the
//! shapes TinySAM has (see each op), by rewrite passes run at load before tract's optimiser.

pub mod attention;
pub mod fastmath;
pub mod layer_norm;
pub mod softmax;

pub use attention::{rewrite_window_attention, AttentionReport, WindowAttention};
pub use layer_norm::{rewrite_layer_norm, LayerNormOp};
pub use softmax::{rewrite_softmax, AxisSoftmax};
