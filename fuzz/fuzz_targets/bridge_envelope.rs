//! Fuzzes the SyncBridge envelope decoder (what every peer's message goes through first): it
//! must never panic, and whatever it accepts must re-encode to exactly the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pluresdb_sync_bridge::envelope::{Frame, decode, encode_events, encode_message};

fuzz_target!(|data: &[u8]| {
    match decode(data) {
        Ok(Frame::Events(events)) => {
            let again = encode_events(&events)
                .expect("decoded events re-encode")
                .expect("only node events decode, at least one");
            assert_eq!(&again[..], data, "decode/encode is not the identity");
        }
        Ok(Frame::Message(payload)) => {
            let again = encode_message(payload).expect("a decoded message re-encodes");
            assert_eq!(&again[..], data, "decode/encode is not the identity");
        }
        Err(_) => {}
    }
});
