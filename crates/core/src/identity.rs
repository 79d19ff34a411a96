//! Peer identity: a Noise static X25519 key pair. The peer id is the public key's lowercase hex.
//!
//! Key files (written by `pluresdb-sync keygen`) are text, created with mode 0600:
//!
//! ```text
//! # pluresdb-sync identity: a Noise static X25519 key. Keep this file secret.
//! # peer id: 5c0e...
//! secret-key: 8f1a... (64 hex digits)
//! ```
//!
//! A key path is outside input, and may point anywhere. Loading opens it without blocking
//! (a FIFO cannot hang it), reads only a regular file (not `/dev/zero`, a FIFO, a device or a
//! directory) and at most [`MAX_KEY_FILE_BYTES`] of it. It follows symbolic links, as secret
//! mounts (Kubernetes) use them. Saving never writes through a link or in place: it writes a
//! new 0600 file beside the target, syncs it, renames it over the target and syncs the
//! directory, so a crash leaves the old key or the new one, never neither.

use std::fmt;
use std::io::{Read, Write};
use std::path::Path;

use x25519_dalek::{PublicKey, StaticSecret};

use crate::{Error, PeerId};

const FILE_HEADER: &str =
    "# pluresdb-sync identity: a Noise static X25519 key. Keep this file secret.";
const SECRET_FIELD: &str = "secret-key:";
/// The largest key file [`Identity::load`] reads. A key file is under 200 bytes; the rest is
/// room for comments.
pub const MAX_KEY_FILE_BYTES: usize = 4096;
/// Name prefix of the file [`Identity::save`] writes before renaming it into place.
const TEMP_PREFIX: &str = ".pluresdb-sync-key-";

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
        Self::from_secret_bytes(bytes)
    }

    /// The identity with this X25519 secret key.
    ///
    /// Refuses a secret anyone could guess: one byte repeated 32 times (a zeroed or
    /// placeholder key) and any secret X25519 treats as the all-zero one (it differs only in
    /// the bits X25519 clamps, so it has the same well-known public key). No secret can give a
    /// low-order public key: X25519 multiplies the base point (of prime order l) by the
    /// clamped secret, a multiple of 8 between 2^254 and 2^255, so its eighth lies between
    /// 2^251 and 2^252 < l and the product is never the identity.
    pub fn from_secret_bytes(bytes: [u8; 32]) -> Result<Self, Error> {
        let secret = StaticSecret::from(bytes);
        let public = PublicKey::from(&secret);
        let zero_public = PublicKey::from(&StaticSecret::from([0u8; 32]));
        if bytes.iter().all(|&b| b == bytes[0]) || public == zero_public {
            return Err(Error::InvalidIdentity {
                reason: "the secret key is degenerate (a repeated byte, or equal to zero once \
                         clamped): anyone can guess it; create a new one with keygen"
                    .into(),
            });
        }
        Ok(Self { secret, public })
    }

    /// Parses the text of a key file (what [`Identity::save`] writes): the one line
    /// `secret-key: <64 hex digits>`; other lines are ignored. Pure, for any bytes.
    pub fn from_key_file_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidIdentity { reason };
        let text = std::str::from_utf8(bytes).map_err(|e| {
            invalid(format!(
                "not UTF-8 text (bad byte at offset {})",
                e.valid_up_to()
            ))
        })?;
        let mut values = text
            .lines()
            .map(str::trim)
            .filter_map(|line| line.strip_prefix(SECRET_FIELD));
        let value = values
            .next()
            .ok_or_else(|| invalid(format!("no {SECRET_FIELD:?} line")))?
            .trim();
        if values.next().is_some() {
            return Err(invalid(format!("more than one {SECRET_FIELD:?} line")));
        }
        let mut secret = [0u8; 32];
        hex::decode_to_slice(value, &mut secret).map_err(|e| {
            invalid(format!(
                "the secret key is not 64 hex digits ({} characters: {e})",
                value.chars().count()
            ))
        })?;
        Self::from_secret_bytes(secret)
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

    /// Reads a key file written by [`Identity::save`]: a regular file (symbolic links are
    /// followed) of at most [`MAX_KEY_FILE_BYTES`]. Never blocks on a FIFO or device.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let fail = |reason: String| Error::IdentityFile {
            path: path.to_owned(),
            reason,
        };
        let bytes = read_key_file(path).map_err(fail)?;
        Self::from_key_file_bytes(&bytes).map_err(|e| match e {
            Error::InvalidIdentity { reason } => fail(reason),
            other => other,
        })
    }

    /// Writes the key file with mode 0600, atomically: a crash leaves the old file or the new
    /// one. Refuses to replace an existing file unless `overwrite` is set, and never replaces
    /// (or writes through) a symbolic link or anything else that is not a regular file.
    pub fn save(&self, path: &Path, overwrite: bool) -> Result<(), Error> {
        let fail = |reason: String| Error::IdentityFile {
            path: path.to_owned(),
            reason,
        };
        let exists = || fail("already exists (pass --force to replace it)".into());
        match std::fs::symlink_metadata(path) {
            Ok(_) if !overwrite => return Err(exists()),
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(fail(
                    "is a symbolic link: refusing to replace it or write through it; remove it \
                     or give the path of the file itself"
                        .into(),
                ));
            }
            Ok(meta) if !meta.is_file() => {
                return Err(fail(format!(
                    "is a {}, not a regular file: refusing to replace it",
                    kind(&meta.file_type())
                )));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(e.to_string())),
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        // tempfile creates it with O_EXCL and mode 0600, and deletes it if anything fails.
        let mut temp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .suffix(".tmp")
            .tempfile_in(dir)
            .map_err(|e| fail(format!("cannot create a file in {}: {e}", dir.display())))?;
        let text = format!(
            "{FILE_HEADER}\n# peer id: {}\n{SECRET_FIELD} {}\n",
            self.peer_id(),
            hex::encode(self.secret.as_bytes())
        );
        temp.write_all(text.as_bytes())
            .and_then(|()| temp.as_file().sync_all())
            .map_err(|e| fail(e.to_string()))?;
        let persisted = if overwrite {
            temp.persist(path)
        } else {
            temp.persist_noclobber(path)
        };
        persisted.map_err(|e| {
            if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                exists()
            } else {
                fail(e.error.to_string())
            }
        })?;
        sync_dir(dir).map_err(|e| fail(format!("cannot sync directory {}: {e}", dir.display())))
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("peer_id", &self.peer_id())
            .finish_non_exhaustive()
    }
}

/// The bytes of a key file, or why not: opened without blocking, a regular file, bounded.
fn read_key_file(path: &Path) -> Result<Vec<u8>, String> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Opening a FIFO for reading waits for a writer; a terminal would become ours.
        options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let file = options.open(path).map_err(|e| e.to_string())?;
    // The type of what was opened, not of what the path names now.
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err(format!(
            "is a {}, not a regular file",
            kind(&meta.file_type())
        ));
    }
    warn_if_readable_by_others(path, &meta);
    let mut bytes = Vec::new();
    file.take(MAX_KEY_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() > MAX_KEY_FILE_BYTES {
        return Err(format!(
            "is too large for a key file (over {MAX_KEY_FILE_BYTES} bytes)"
        ));
    }
    Ok(bytes)
}

fn kind(t: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "FIFO";
        }
        if t.is_char_device() {
            return "character device";
        }
        if t.is_block_device() {
            return "block device";
        }
        if t.is_socket() {
            return "socket";
        }
    }
    if t.is_dir() {
        "directory"
    } else if t.is_symlink() {
        "symbolic link"
    } else if t.is_file() {
        "regular file"
    } else {
        "special file"
    }
}

/// Makes a rename in `dir` durable.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_: &Path) -> std::io::Result<()> {
    Ok(())
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
    use proptest::prelude::*;
    use std::time::Duration;

    /// A secret that is not degenerate.
    const SECRET: [u8; 32] = [
        1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
        26, 27, 28, 29, 30, 31, 32,
    ];

    /// Runs `f` on its own thread; fails the test (instead of hanging it) after 10 s.
    fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("still blocked after 10 s")
    }

    fn load_err(path: &Path) -> String {
        let path = path.to_owned();
        within_10s(move || Identity::load(&path))
            .unwrap_err()
            .to_string()
    }

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
        // Nothing but the key is left in the directory.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("id.key")]);
    }

    #[test]
    fn debug_hides_the_secret() {
        let id = Identity::from_secret_bytes(SECRET).unwrap();
        let shown = format!("{id:?}");
        assert!(shown.contains(&id.peer_id()));
        assert!(!shown.contains(&hex::encode(SECRET)));
    }

    #[test]
    fn known_public_key() {
        // RFC 7748 section 6.1, Alice's key pair.
        let secret =
            hex::decode("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap();
        let id = Identity::from_secret_bytes(secret.try_into().unwrap()).unwrap();
        assert_eq!(
            id.peer_id(),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
    }

    #[test]
    fn degenerate_secrets_are_refused() {
        let mut clamped_zero = [0u8; 32];
        // Only the bits X25519 clamps away: the same key as all zeros.
        clamped_zero[0] = 0x07;
        clamped_zero[31] = 0xC0;
        for secret in [[0u8; 32], [0xff; 32], [7; 32], clamped_zero] {
            let err = Identity::from_secret_bytes(secret).unwrap_err();
            assert!(matches!(err, Error::InvalidIdentity { .. }), "{err}");
            assert!(err.to_string().contains("degenerate"), "{err}");
        }
        let mut almost = [0u8; 32];
        almost[1] = 1;
        assert!(Identity::from_secret_bytes(almost).is_ok());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zero.key");
        std::fs::write(&path, format!("secret-key: {}\n", "0".repeat(64))).unwrap();
        let err = Identity::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("zero.key") && err.contains("degenerate"),
            "{err}"
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

        let line = format!("secret-key: {}\n", hex::encode(SECRET));
        std::fs::write(&path, format!("{line}{line}")).unwrap();
        let err = Identity::load(&path).unwrap_err().to_string();
        assert!(err.contains("more than one"), "{err}");

        std::fs::write(&path, b"secret-key: \xff\n").unwrap();
        let err = Identity::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("not UTF-8") && err.contains("offset 12"),
            "{err}"
        );

        // The limit is exact: a valid key padded to 4096 bytes loads, one more byte does not.
        let mut padded = format!("{line}#").into_bytes();
        padded.resize(MAX_KEY_FILE_BYTES, b'#');
        std::fs::write(&path, &padded).unwrap();
        assert_eq!(
            Identity::load(&path).unwrap().public_bytes(),
            Identity::from_secret_bytes(SECRET).unwrap().public_bytes()
        );
        padded.push(b'#');
        std::fs::write(&path, &padded).unwrap();
        let err = Identity::load(&path).unwrap_err().to_string();
        assert!(err.contains("too large") && err.contains("4096"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn only_regular_files_are_read_and_nothing_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.key");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo (coreutils) is needed");
        assert!(made.success());
        let err = load_err(&fifo);
        assert!(
            err.contains("fifo.key") && err.contains("is a FIFO"),
            "{err}"
        );

        // Unbounded before: 6 GB of RSS in 6 s.
        let err = load_err(Path::new("/dev/zero"));
        assert!(err.contains("is a character device"), "{err}");
        let err = load_err(dir.path());
        assert!(err.contains("is a directory"), "{err}");

        // Links are followed (secret mounts use them), but only to a regular file.
        let key = dir.path().join("real.key");
        let id = Identity::generate().unwrap();
        id.save(&key, false).unwrap();
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&key, &link).unwrap();
        assert_eq!(Identity::load(&link).unwrap().peer_id(), id.peer_id());
        let to_zero = dir.path().join("zero-link.key");
        std::os::unix::fs::symlink("/dev/zero", &to_zero).unwrap();
        assert!(load_err(&to_zero).contains("character device"));
    }

    #[cfg(unix)]
    #[test]
    fn save_never_writes_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        let link = dir.path().join("id.key");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let id = Identity::generate().unwrap();
        let err = id.save(&link, true).unwrap_err().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        let err = id.save(&link, false).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );

        // A dangling link is not followed to create its target either.
        let dangling = dir.path().join("dangling.key");
        let target = dir.path().join("created-through-link");
        std::os::unix::fs::symlink(&target, &dangling).unwrap();
        assert!(id.save(&dangling, false).is_err());
        assert!(id.save(&dangling, true).is_err());
        assert!(!target.exists());

        // Nor is anything that is not a regular file replaced.
        let fifo = dir.path().join("fifo.key");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let err = within_10s({
            let fifo = fifo.clone();
            move || id.save(&fifo, true)
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("is a FIFO, not a regular file"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn overwrite_replaces_the_file_instead_of_truncating_it() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id.key");
        let old = Identity::generate().unwrap();
        old.save(&path, false).unwrap();
        // A second name for the old file's inode sees whether it was rewritten in place
        // (truncate, then write: a crash between the two lost the old key).
        let backup = dir.path().join("backup");
        std::fs::hard_link(&path, &backup).unwrap();
        let old_inode = std::fs::metadata(&path).unwrap().ino();
        let new = Identity::generate().unwrap();
        new.save(&path, true).unwrap();
        assert_eq!(Identity::load(&path).unwrap().peer_id(), new.peer_id());
        assert_eq!(Identity::load(&backup).unwrap().peer_id(), old.peer_id());
        assert_ne!(std::fs::metadata(&path).unwrap().ino(), old_inode);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    proptest! {
        #[test]
        fn key_file_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Identity::from_key_file_bytes(&bytes);
        }

        #[test]
        fn written_text_reads_back(secret in any::<[u8; 32]>(), comment in "[ -~]{0,40}") {
            let Ok(id) = Identity::from_secret_bytes(secret) else { return Ok(()) };
            let text = format!("# {comment}\r\n  {SECRET_FIELD}{}  \r\n", hex::encode(secret));
            let back = Identity::from_key_file_bytes(text.as_bytes()).unwrap();
            prop_assert_eq!(back.public_bytes(), id.public_bytes());
        }
    }
}
