//! Fuzzes LAN discovery's packet decoder and the state machine that takes received packets:
//! nothing may panic, what the decoder accepts re-encodes to the same bytes, and no bytes
//! made without the topic's key yield a candidate.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pluresdb_sync_transport_hyperswarm::fuzzing::lan_packet;

fuzz_target!(|data: &[u8]| lan_packet(data));
