//! Building a transport from a [`TransportConfig`].

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::{Connection, Error, PeerInfo, TopicHash, Transport, TransportConfig, TransportMode};

/// Builds the transport `config` asks for, or the error saying why it cannot.
///
/// Errors (as [`Error`] inside the `anyhow::Error`): an invalid configuration
/// ([`TransportConfig::validate`]) or a mode whose Cargo feature is compiled out
/// ([`Error::FeatureNotEnabled`]).
pub fn try_create_transport(config: TransportConfig) -> anyhow::Result<Box<dyn Transport>> {
    config.validate()?;
    match config.mode {
        TransportMode::Disabled => disabled(),
        TransportMode::Relay => relay(&config),
        TransportMode::Hyperswarm => hyperswarm(&config),
        TransportMode::Auto => auto(&config),
    }
}

/// Auto mode; DHT bootstrap nodes come from `PLURESDB_SYNC_BOOTSTRAP` when it is set.
#[cfg(feature = "auto")]
fn auto(config: &TransportConfig) -> anyhow::Result<Box<dyn Transport>> {
    Ok(Box::new(crate::AutoTransport::from_config(config)?))
}

#[cfg(not(feature = "auto"))]
fn auto(_config: &TransportConfig) -> anyhow::Result<Box<dyn Transport>> {
    Err(Error::FeatureNotEnabled {
        mode: "auto",
        feature: "auto",
    }
    .into())
}

/// Hyperswarm mode; bootstrap nodes come from `PLURESDB_SYNC_BOOTSTRAP` when it is set.
#[cfg(feature = "hyperswarm")]
fn hyperswarm(config: &TransportConfig) -> anyhow::Result<Box<dyn Transport>> {
    Ok(Box::new(crate::HyperswarmTransport::from_config(config)?))
}

#[cfg(not(feature = "hyperswarm"))]
fn hyperswarm(_config: &TransportConfig) -> anyhow::Result<Box<dyn Transport>> {
    Err(Error::FeatureNotEnabled {
        mode: "hyperswarm",
        feature: "hyperswarm",
    }
    .into())
}

#[cfg(feature = "disabled")]
fn disabled() -> anyhow::Result<Box<dyn Transport>> {
    Ok(Box::new(crate::DisabledTransport::new()))
}

#[cfg(not(feature = "disabled"))]
fn disabled() -> anyhow::Result<Box<dyn Transport>> {
    Err(Error::FeatureNotEnabled {
        mode: "disabled",
        feature: "disabled",
    }
    .into())
}

#[cfg(feature = "relay")]
fn relay(config: &TransportConfig) -> anyhow::Result<Box<dyn Transport>> {
    Ok(Box::new(crate::RelayTransport::from_config(config)?))
}

#[cfg(not(feature = "relay"))]
fn relay(_: &TransportConfig) -> anyhow::Result<Box<dyn Transport>> {
    Err(Error::FeatureNotEnabled {
        mode: "relay",
        feature: "relay",
    }
    .into())
}

/// Builds the transport `config` asks for (the specification's infallible factory).
///
/// When [`try_create_transport`] would fail, this returns an [`UnavailableTransport`] whose
/// every operation fails with that error, so the problem surfaces at the first call instead of
/// as a panic, and nothing silently falls back to another mode. Prefer
/// [`try_create_transport`] in new code.
pub fn create_transport(config: TransportConfig) -> Box<dyn Transport> {
    let mode = config.mode;
    try_create_transport(config).unwrap_or_else(|err| {
        tracing::error!(%mode, error = %err, "cannot create transport");
        Box::new(UnavailableTransport {
            mode,
            message: format!("{err:#}"),
            error: err.downcast::<Error>().ok(),
        })
    })
}

/// What [`create_transport`] returns when the transport cannot be built: every operation
/// fails with the reason. Its name is `"unavailable"`.
#[derive(Clone, Debug)]
pub struct UnavailableTransport {
    mode: TransportMode,
    message: String,
    error: Option<Error>,
}

impl UnavailableTransport {
    /// The mode that was asked for.
    pub fn mode(&self) -> TransportMode {
        self.mode
    }

    /// Why the transport could not be built, when it is one of the core errors.
    pub fn error(&self) -> Option<&Error> {
        self.error.as_ref()
    }

    /// Why the transport could not be built.
    pub fn message(&self) -> &str {
        &self.message
    }

    fn fail<T>(&self) -> anyhow::Result<T> {
        Err(match &self.error {
            Some(typed) => typed.clone().into(),
            None => anyhow::anyhow!("{}", self.message),
        })
    }
}

#[async_trait]
impl Transport for UnavailableTransport {
    async fn connect(
        &mut self,
        _topic: TopicHash,
    ) -> anyhow::Result<mpsc::Receiver<Box<dyn Connection>>> {
        self.fail()
    }

    async fn announce(&mut self, _topic: TopicHash) -> anyhow::Result<()> {
        self.fail()
    }

    async fn lookup(&self, _topic: TopicHash) -> anyhow::Result<Vec<PeerInfo>> {
        self.fail()
    }

    async fn disconnect(&mut self) -> anyhow::Result<()> {
        // Nothing was started, so there is nothing to stop.
        Ok(())
    }

    fn name(&self) -> &str {
        "unavailable"
    }
}
