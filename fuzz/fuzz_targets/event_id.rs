//! An event stream's `Last-Event-ID`: read back or refused, and one read back names
//! itself again.
#![no_main]
use outpost_gateway::events::Cursor;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(id) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = Cursor::parse(id) {
        assert_eq!(Cursor::parse(&c.id()).expect("its own id"), c);
    }
});
