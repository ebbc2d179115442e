//! The prompt flags `tinysam sub` and `tinysam-ros2` share (one definition, so that the two read
//! alike): segment-everything, or points and boxes in frame pixels.

use clap::Args;
use tinysam_edge::prompt::{BoxPrompt, PromptPoint};

/// `--everything`, `--point`, `--box`.
#[derive(Args, Debug, Clone)]
pub struct PromptFlags {
    /// Segment everything in every frame.
    #[arg(long, conflicts_with_all = ["points", "boxes"])]
    pub everything: bool,
    /// A point `x,y[,label]` in frame pixels; repeat for more points in the same prompt.
    #[arg(long = "point")]
    pub points: Vec<PromptPoint>,
    /// A box `x0,y0,x1,y1`; each box is its own prompt (points join the first).
    #[arg(long = "box")]
    pub boxes: Vec<BoxPrompt>,
}
