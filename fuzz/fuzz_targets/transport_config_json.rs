//! Fuzzes `TransportConfig` from JSON (serde) and its checks: nothing may panic, and a config
//! that parses serialises to JSON that parses back to the same config. The text, if UTF-8, is
//! also tried as a mode name and a relay URL.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pluresdb_sync_core::{TransportConfig, TransportMode, config::check_relay_url};

fuzz_target!(|data: &[u8]| {
    if let Ok(config) = serde_json::from_slice::<TransportConfig>(data) {
        let _ = config.check();
        let _ = config.timeout();
        let json = serde_json::to_vec(&config).expect("a parsed config serialises");
        let back: TransportConfig = serde_json::from_slice(&json).expect("and parses back");
        assert_eq!(back, config);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<TransportMode>();
        let _ = check_relay_url(text);
    }
});
