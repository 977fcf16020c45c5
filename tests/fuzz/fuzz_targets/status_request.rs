//! Arbitrary bytes as a status-socket request line: a request or an error reply, never a
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = trainrelay::status::protocol::parse_request(text.trim());
});
