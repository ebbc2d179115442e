//! Any bytes a client may send: the server's parser must answer with a typed error, never panic
//! or allocate more than the body cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tinysam_edge::protocol::{parse_client_bytes, ClientMessage};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = parse_client_bytes(data) {
        // What parses re-encodes to something that parses to the same message.
        let again = parse_client_bytes(&msg.encode()).expect("re-encoded message parses");
        assert_eq!(again, msg);
        if let ClientMessage::PromptRequest(r) = &msg {
            for p in &r.prompts {
                let _ = p.to_prompt();
            }
        }
    }
});
