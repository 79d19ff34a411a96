//! Fuzzes the identity key file parser (`Identity::from_key_file_bytes`, what `Identity::load`
//! runs on a file's bytes): it must never panic; a key it accepts is not degenerate, and the
//! canonical text of that key parses back to the same public key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pluresdb_sync_core::Identity;

fuzz_target!(|data: &[u8]| {
    if let Ok(id) = Identity::from_key_file_bytes(data) {
        let secret = id.secret_bytes();
        assert!(
            secret.iter().any(|&b| b != secret[0]),
            "a degenerate secret was accepted"
        );
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let again = Identity::from_key_file_bytes(format!("secret-key: {hex}\n").as_bytes())
            .expect("the canonical text of an accepted key parses");
        assert_eq!(again.public_bytes(), id.public_bytes());
        assert_eq!(id.peer_id().len(), 64);
    }
});
