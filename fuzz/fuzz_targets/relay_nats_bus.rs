//! Fuzzes the relay's NATS bus decoder (what other relay nodes publish): it must never panic,
//! and every message it accepts must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pluresdb_sync_transport_relay::server::fuzzing::nats_bus;

fuzz_target!(|data: &[u8]| nats_bus(data));
