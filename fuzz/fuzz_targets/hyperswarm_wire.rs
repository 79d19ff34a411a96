//! Fuzzes the Hyperswarm connection's stream decoders (handshake length, hello, verdict,
//! message header): nothing may panic, and whatever they accept re-encodes to the same bytes
//! within the limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pluresdb_sync_transport_hyperswarm::fuzzing::stream;

fuzz_target!(|data: &[u8]| stream(data));
