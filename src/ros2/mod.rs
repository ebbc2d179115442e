//! ROS 2 for `tinysam-ros2`, the bridge that makes the daemon an ordinary ROS 2 node: the message
//! types it speaks ([`messages`]), the conversions between them and the daemon's results and
//! prompts ([`convert`]), and the daemon side of the bridge ([`bridge`]). The middleware itself
//! (DDS through `ros2-client`) lives in the binary, behind [`bridge::Publish`]: this module
//! depends on no ROS crate, and the bridge's logic is tested without a network.

pub mod bridge;
pub mod convert;
pub mod messages;

pub use bridge::{Bridge, BridgeOptions, FrameOutput, Publish, Standing};
