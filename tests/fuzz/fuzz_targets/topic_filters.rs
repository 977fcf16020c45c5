//! The ACL's filter-covers-filter check against matching: if `outer` covers `inner`, every
//! name `inner` matches (sampled from the input) is matched by `outer`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trainrelay::topic::{covers, matches, validate_filter, validate_name};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.split('\n');
    let (Some(outer), Some(inner)) = (parts.next(), parts.next()) else {
        return;
    };
    if validate_filter(outer).is_err() || validate_filter(inner).is_err() {
        return;
    }
    if !covers(outer, inner) {
        return;
    }
    for name in parts {
        if validate_name(name).is_ok() && matches(inner, name) {
            assert!(matches(outer, name), "{outer} covers {inner} but not {name}");
        }
    }
});
