//! Entry points for the `cargo fuzz` targets in `fuzz/` (feature `fuzzing`; not a public API).
//! Each feeds arbitrary bytes to a decoder that other machines reach and checks what it
//! accepts.

use super::nats::bus;

/// A message from the NATS bus, as another relay node (or anyone who can publish on the
/// relay's subjects) sends it: whatever decodes re-encodes to the same bytes. Panics when
/// that breaks.
pub fn nats_bus(data: &[u8]) {
    if let Ok(message) = bus::decode(data) {
        assert_eq!(
            message.encode(),
            data,
            "a bus message re-encodes differently"
        );
    }
}
