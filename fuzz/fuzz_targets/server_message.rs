//! Any bytes a server may send: the clients' parser must not panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tinysam_edge::protocol::{read_frame, ServerMessage, MAX_SERVER_BODY};

fuzz_target!(|data: &[u8]| {
    let mut cursor = std::io::Cursor::new(data);
    if let Ok(Some((header, body))) = read_frame(&mut cursor, MAX_SERVER_BODY) {
        let _ = ServerMessage::decode(header.kind, &body);
    }
});
