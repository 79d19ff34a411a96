//! Peer identity: a Noise static X25519 key pair. The peer id is the public key's lowercase hex.
//!
//! Key files (written by `pluresdb-sync keygen`) are text, created with mode 0600:
//!
//! ```text
//! # pluresdb-sync identity: a Noise static X25519 key. Keep this file secret.
//! # peer id: 5c0e...
//! secret-key: 8f1a... (64 hex digits)
//! ```

use std::fmt;
use std::path::Path;

use x25519_dalek::{PublicKey, StaticSecret};

use crate::{Error, PeerId};

const FILE_HEADER: &str =
    "# pluresdb-sync identity: a Noise static X25519 key. Keep this file secret.";
const SECRET_FIELD: &str = "secret-key:";
/// Key files are tiny; refuse anything bigger instead of reading it whole.
const MAX_KEY_FILE_BYTES: u64 = 4096;

/// A peer's static key pair. `Debug` never prints the secret.
#[derive(Clone)]
pub struct Identity {
    secret: StaticSecret,
    public: PublicKey,
}

impl Identity {
    /// A new random identity (from the operating system's CSPRNG).
    pub fn generate() -> Result<Self, Error> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| Error::IdentityFile {
            path: "<random>".into(),
            reason: format!("the system random number generator failed: {e}"),
        })?;
        Ok(Self::from_secret_bytes(bytes))
    }

    /// The identity with this X25519 secret key.
    pub fn from_secret_bytes(bytes: [u8; 32]) -> Self {
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret);
        Self { secret, public }
    }

    /// The secret key (for the Noise handshake). Never log it.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    /// The public key.
    pub fn public_bytes(&self) -> [u8; 32] {
        self.public.to_bytes()
    }

    /// The peer id: lowercase hex of the public key.
    pub fn peer_id(&self) -> PeerId {
        hex::encode(self.public.as_bytes())
    }

    /// Reads a key file written by [`Identity::save`].
    pub fn load(path: &Path) -> Result<Self, Error> {
        let fail = |reason: String| Error::IdentityFile {
            path: path.to_owned(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
        if meta.len() > MAX_KEY_FILE_BYTES {
            return Err(fail(format!(
                "{} bytes is too large for a key file (at most {MAX_KEY_FILE_BYTES})",
                meta.len()
            )));
        }
        warn_if_readable_by_others(path, &meta);
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let value = text
            .lines()
            .map(str::trim)
            .find_map(|line| line.strip_prefix(SECRET_FIELD))
            .ok_or_else(|| fail(format!("no {SECRET_FIELD:?} line")))?
            .trim();
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(value, &mut bytes).map_err(|e| {
            fail(format!(
                "the secret key is not 64 hex digits ({} characters: {e})",
                value.len()
            ))
        })?;
        Ok(Self::from_secret_bytes(bytes))
    }

    /// Writes the key file with mode 0600. Refuses to replace an existing file unless
    /// `overwrite` is set.
    pub fn save(&self, path: &Path, overwrite: bool) -> Result<(), Error> {
        use std::io::Write;
        let fail = |reason: String| Error::IdentityFile {
            path: path.to_owned(),
            reason,
        };
        let mut options = std::fs::OpenOptions::new();
        options.write(true);
        if overwrite {
            options.create(true).truncate(true);
        } else {
            options.create_new(true);
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options.open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                fail("already exists (pass --force to replace it)".into())
            } else {
                fail(e.to_string())
            }
        })?;
        #[cfg(unix)]
        {
            // `mode` only applies to new files; tighten a replaced one too.
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(|e| fail(e.to_string()))?;
        }
        let text = format!(
            "{FILE_HEADER}\n# peer id: {}\n{SECRET_FIELD} {}\n",
            self.peer_id(),
            hex::encode(self.secret.as_bytes())
        );
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| fail(e.to_string()))
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("peer_id", &self.peer_id())
            .finish_non_exhaustive()
    }
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path, meta: &std::fs::Metadata) {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format_args!("{:o}", mode & 0o777),
            "identity key file is readable by other users; chmod 600 it"
        );
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_: &Path, _: &std::fs::Metadata) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_roundtrip_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id.key");
        let id = Identity::generate().unwrap();
        id.save(&path, false).unwrap();
        let loaded = Identity::load(&path).unwrap();
        assert_eq!(loaded.public_bytes(), id.public_bytes());
        assert_eq!(loaded.peer_id(), id.peer_id());
        assert_eq!(id.peer_id().len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let err = id.save(&path, false).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        Identity::generate().unwrap().save(&path, true).unwrap();
        assert_ne!(Identity::load(&path).unwrap().peer_id(), id.peer_id());
    }

    #[test]
    fn debug_hides_the_secret() {
        let id = Identity::from_secret_bytes([7; 32]);
        let shown = format!("{id:?}");
        assert!(shown.contains(&id.peer_id()));
        assert!(!shown.contains(&hex::encode([7u8; 32])));
    }

    #[test]
    fn known_public_key() {
        // RFC 7748 section 6.1, Alice's key pair.
        let secret =
            hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap();
        let id = Identity::from_secret_bytes(secret.try_into().unwrap());
        assert_eq!(
            id.peer_id(),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Identity::load(&dir.path().join("nope"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("nope"), "{missing}");

        let path = dir.path().join("bad.key");
        std::fs::write(&path, "secret-key: 1234\n").unwrap();
        let err = Identity::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("64 hex digits") && err.contains("4 characters"),
            "{err}"
        );

        std::fs::write(&path, "hello\n").unwrap();
        assert!(
            Identity::load(&path)
                .unwrap_err()
                .to_string()
                .contains("secret-key")
        );

        std::fs::write(&path, vec![b'#'; 5000]).unwrap();
        assert!(
            Identity::load(&path)
                .unwrap_err()
                .to_string()
                .contains("too large")
        );
    }
}
