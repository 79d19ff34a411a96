//! Fuzzes the SyncEvent decoder: it must never panic, and whatever it accepts must re-encode
//! to exactly the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pluresdb_sync_core::codec::{decode_event, encode_event};

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = decode_event(data) {
        let again = encode_event(&event).expect("a decoded event re-encodes");
        assert_eq!(again, data, "decode/encode is not the identity");
    }
});
