//! Bytes from a hostile client through the local broker's packet decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    trainrelay::broker::decode_client_bytes(data);
});
