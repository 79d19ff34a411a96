//! Fuzzes what the Hyperswarm data socket does with a received datagram: the classifier, the
//! batch filter that takes non-QUIC segments out of a GRO batch, and the KRPC reply decoder.
//! Nothing may panic; a decodable KRPC reply must be classified as KRPC; the filter keeps
//! exactly the QUIC segments, in order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pluresdb_sync_transport_hyperswarm::fuzzing::datagram;

fuzz_target!(|data: &[u8]| datagram(data));
