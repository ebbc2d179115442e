//! Integration tests of the public API against the committed fixtures (tests/fixtures/).

mod util;

mod bad_input;
mod cli;
mod daemon;
mod everything;
mod kernels;
mod parity;
mod pixel;
mod reference;
mod rle;
mod ros2;
mod tinysamd;
mod wire;
