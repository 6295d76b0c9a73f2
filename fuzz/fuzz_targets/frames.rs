//! The protocol's frames, both directions: never a panic, and a frame that decodes
//! encodes to text that decodes to the same frame.
#![no_main]
use outpost_protocol::{decode_agent_frame, decode_gateway_frame, encode};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(frame) = decode_agent_frame(text) {
        let again = encode(&frame);
        let back = decode_agent_frame(&again).expect("an encoded agent frame decodes");
        assert_eq!(encode(&back), again, "agent frame round trip");
    }
    if let Ok(frame) = decode_gateway_frame(text) {
        let again = encode(&frame);
        let back = decode_gateway_frame(&again).expect("an encoded gateway frame decodes");
        assert_eq!(encode(&back), again, "gateway frame round trip");
    }
});
