//! ROS 2 for `tinysam-ros2`, the bridge that makes the daemon an ordinary ROS 2 node: the message
//! types it speaks ([`messages`]), the conversions between them and the daemon's results and
//! prompts ([`convert`]), the daemon side of the bridge ([`bridge`]), and how `rmw_zenoh` lays
//! ROS 2 onto Zenoh ([`rmw_zenoh`], with the messages' [`type_hash`]es). The middleware sessions
//! (DDS through `ros2-client`, Zenoh through `zenoh`) live in the binary, behind
//! [`bridge::Publish`]: this module depends on no middleware crate, and the bridge's logic is
//! tested without a network.

pub mod bridge;
pub mod convert;
pub mod messages;
pub mod rmw_zenoh;
pub mod type_hash;

pub use bridge::{Bridge, BridgeOptions, FrameOutput, Publish, Standing};
