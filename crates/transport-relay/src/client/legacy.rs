//! Telling session versions apart across the handshake change. Versions 1 and 2 opened with
//! `Noise_XXpsk3`, whose message 1 (kind 0x01) anyone can write and read: the topic key
//! enters only at message 3. Version 3 opens with `XXpsk0` under new kinds, which an old
//! client ignores, so a version 3 initiator follows its HS1 with a *version probe*: an
//! `XXpsk3` message 1 whose payload is its session parameters. An old responder answers the
//! probe with its HS2 (kind 0x02), which tells the initiator to refuse with REJECT (version
//! mismatch); a version 3 responder reads the probe's version and ignores it. A kind 0x01
//! with an empty payload is an old initiator's HS1, refused the same way. Reading either
//! costs symmetric crypto only (message 1 holds no Diffie-Hellman), and the probe carries no
//! identity.

use super::handshake::{Local, noise, noise_error, read, write};
use super::wire::{kind, session_params};
use crate::error::SessionError;

/// The pattern of session versions 1 and 2.
const LEGACY_NOISE_PARAMS: &str = "Noise_XXpsk3_25519_ChaChaPoly_BLAKE2s";
/// Where versions 1 and 2 put the PSK (after message 3's tokens).
const LEGACY_PSK_POSITION: u8 = 3;
/// The version reported for an `XXpsk3` client: 1 and 2 look alike in message 1.
pub(crate) const LEGACY_VERSION: u8 = 2;

/// What a kind 0x01 frame is.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Opening {
    /// The HS1 of a session version 1 or 2 initiator.
    Old,
    /// The version probe of a peer of this session version (its first payload byte).
    Probe(u8),
}

/// This side's version probe: an `XXpsk3` message 1 carrying its session parameters.
pub(crate) fn probe(local: Local<'_>) -> Result<Vec<u8>, SessionError> {
    let mut hs =
        noise(local, LEGACY_NOISE_PARAMS, LEGACY_PSK_POSITION, true).map_err(noise_error(1))?;
    write(&mut hs, kind::LEGACY_HS1, &session_params(local.window)).map_err(noise_error(1))
}

/// Reads a kind 0x01 frame's body: an old peer's HS1, or a version probe. Anything else (it
/// does not verify as `XXpsk3` message 1 in this room) is a Noise error.
pub(crate) fn read_opening(local: Local<'_>, body: &[u8]) -> Result<Opening, SessionError> {
    let err = noise_error(1);
    let mut hs = noise(local, LEGACY_NOISE_PARAMS, LEGACY_PSK_POSITION, false).map_err(&err)?;
    let payload = read(&mut hs, body).map_err(&err)?;
    Ok(match payload.first() {
        None => Opening::Old,
        Some(&version) => Opening::Probe(version),
    })
}
