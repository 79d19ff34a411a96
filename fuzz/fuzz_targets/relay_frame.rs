//! Fuzzes the relay frame decoder (both directions): it must never panic, and every frame it
//! accepts must re-encode to bytes that decode to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pluresdb_sync_transport_relay::protocol::decode;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = decode(data) {
        let again = frame.encode();
        assert_eq!(decode(&again).ok(), Some(frame), "re-encoded frame decodes differently");
    }
});
