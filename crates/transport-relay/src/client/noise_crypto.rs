//! The crypto snow runs the relay handshakes with: snow's own ring-accelerated resolver for
//! hashes, ciphers and randomness, and an X25519 that derives a public key only when a
//! handshake message carries it and counts every scalar multiplication. So building a
//! responder for an HS1 costs no curve arithmetic (snow's own X25519 derives the static
//! public key when the state is built), and a bogus HS1, which fails at its PSK-keyed tag,
//! costs symmetric crypto only; the count is how tests see that.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{CryptoResolver, DefaultResolver, FallbackResolver, RingResolver};
use snow::types::{Cipher, Dh, Hash, Random};
use x25519_dalek::{PublicKey, StaticSecret};

/// Scalar multiplications (Diffie-Hellman or public-key derivation) one transport's
/// handshakes did, shared by its handshake states.
#[derive(Clone, Debug, Default)]
pub(crate) struct ScalarMults(Arc<AtomicU64>);

impl ScalarMults {
    /// How many so far (read by tests and the testkit only).
    #[cfg_attr(not(any(test, feature = "testkit")), allow(dead_code))]
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// snow's resolver (ring first, its default crates second) with [`LazyX25519`].
pub(crate) struct Resolver {
    inner: FallbackResolver,
    count: ScalarMults,
}

impl Resolver {
    /// A resolver whose X25519 counts into `count`.
    pub(crate) fn new(count: ScalarMults) -> Self {
        Self {
            inner: FallbackResolver::new(Box::new(RingResolver), Box::new(DefaultResolver)),
            count,
        }
    }
}

impl CryptoResolver for Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        self.inner.resolve_rng()
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        match choice {
            DHChoice::Curve25519 => Some(Box::new(LazyX25519 {
                secret: StaticSecret::from([0u8; 32]),
                public: OnceLock::new(),
                count: self.count.clone(),
            })),
            _ => None,
        }
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        self.inner.resolve_hash(choice)
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        self.inner.resolve_cipher(choice)
    }
}

/// X25519 (x25519-dalek) whose public key is derived on first use. The secret is zeroed on
/// drop (`StaticSecret`).
struct LazyX25519 {
    secret: StaticSecret,
    public: OnceLock<[u8; 32]>,
    count: ScalarMults,
}

impl Dh for LazyX25519 {
    fn name(&self) -> &'static str {
        "25519"
    }

    fn pub_len(&self) -> usize {
        32
    }

    fn priv_len(&self) -> usize {
        32
    }

    fn set(&mut self, privkey: &[u8]) {
        let mut k = [0u8; 32];
        let n = privkey.len().min(32);
        k[..n].copy_from_slice(&privkey[..n]);
        self.secret = StaticSecret::from(k);
        self.public = OnceLock::new();
    }

    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        let mut k = [0u8; 32];
        rng.try_fill_bytes(&mut k)?;
        self.set(&k);
        Ok(())
    }

    fn pubkey(&self) -> &[u8] {
        self.public.get_or_init(|| {
            self.count.add();
            PublicKey::from(&self.secret).to_bytes()
        })
    }

    fn privkey(&self) -> &[u8] {
        self.secret.as_bytes()
    }

    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let theirs = <[u8; 32]>::try_from(pubkey.get(..32).ok_or(snow::Error::Dh)?)
            .map_err(|_| snow::Error::Dh)?;
        let shared = self.secret.diffie_hellman(&PublicKey::from(theirs));
        self.count.add();
        out.get_mut(..32)
            .ok_or(snow::Error::Dh)?
            .copy_from_slice(shared.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PSK: [u8; 32] = [5; 32];

    fn builder<'a>(
        ours: Option<&ScalarMults>,
        s: &'a [u8; 32],
        e: &'a [u8; 32],
    ) -> snow::Builder<'a> {
        let params: snow::params::NoiseParams =
            "Noise_XXpsk0_25519_ChaChaPoly_BLAKE2s".parse().unwrap();
        let b = match ours {
            Some(count) => {
                snow::Builder::with_resolver(params, Box::new(Resolver::new(count.clone())))
            }
            None => snow::Builder::new(params),
        };
        b.local_private_key(s)
            .unwrap()
            .psk(0, &PSK)
            .unwrap()
            .fixed_ephemeral_key_for_testing_only(e)
    }

    /// The same handshake with snow's resolver and with this one: byte-identical messages
    /// when both use the same ephemeral keys, so the wrapper changes cost, not results.
    #[test]
    fn agrees_with_snows_own_x25519() {
        let (si, sr) = ([1u8; 32], [2u8; 32]);
        let (ei, er) = ([3u8; 32], [4u8; 32]);
        let run = |ours: bool| {
            let count = ScalarMults::default();
            let c = ours.then_some(&count);
            let mut i = builder(c, &si, &ei).build_initiator().unwrap();
            let mut r = builder(c, &sr, &er).build_responder().unwrap();
            let (mut buf, mut out) = ([0u8; 256], [0u8; 256]);
            let mut msgs = Vec::new();
            for turn in 0..3 {
                let (w, rd) = if turn % 2 == 0 {
                    (&mut i, &mut r)
                } else {
                    (&mut r, &mut i)
                };
                let n = w.write_message(b"p", &mut buf).unwrap();
                rd.read_message(&buf[..n], &mut out).unwrap();
                msgs.push(buf[..n].to_vec());
            }
            (msgs, r.get_remote_static().unwrap().to_vec(), count.get())
        };
        let (theirs, key, _) = run(false);
        let (ours, our_key, mults) = run(true);
        assert_eq!(ours, theirs);
        assert_eq!(our_key, key);
        // XX: each side derives e and s (2 × 2) and does ee, es, se (2 × 3).
        assert_eq!(mults, 10);
    }
}
