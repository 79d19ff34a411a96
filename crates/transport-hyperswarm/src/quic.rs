//! The data socket and the QUIC endpoint on it.
//!
//! TLS here only sets up QUIC's packet protection and checks the protocol version (the ALPN:
//! a peer of another version fails the TLS handshake with `no_application_protocol`): the
//! certificate is a throwaway self-signed one and the client accepts any certificate
//! (checking only the handshake signature). Peers are authenticated by the Noise XXpsk0
//! handshake that follows, bound to this QUIC connection through its exported keying
//! material (see `noise.rs`). Which incoming connections get that far is `node/admission.rs`'s
//! decision; the Retry tokens it relies on are quinn's (keyed per endpoint, valid 15 s).

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use quinn::Runtime;

use crate::config::Settings;
use crate::socket::DataSocket;
use crate::wire::ALPN;

/// UDP socket buffer size: the default 208 KiB drops 0.3–1.8% of packets at full speed on
/// loopback (measured); 4 MiB does not. The kernel may cap it (`net.core.rmem_max`).
pub const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Most incoming connection attempts quinn holds until the accept loop decides about them
/// (it decides at once: accept, Retry or refuse; more are refused by quinn).
pub(crate) const MAX_PENDING_INCOMING: usize = 256;

/// Bytes quinn buffers for one incoming attempt before it is accepted (its Initials, any
/// early packets), and for all of them together: a flood of Initials cannot pin more.
pub(crate) const INCOMING_BUFFER_BYTES: u64 = 64 * 1024;

/// See [`INCOMING_BUFFER_BYTES`].
pub(crate) const INCOMING_BUFFER_TOTAL_BYTES: u64 = 4 * 1024 * 1024;

/// The server name the client asks for; meaningless here (no certificate is checked by name).
pub(crate) const SERVER_NAME: &str = "pluresdb-sync";

/// Binds the data socket with large buffers.
pub(crate) fn bind_socket(addr: SocketAddrV4) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer works, it only drops more under load.
    if let Err(e) = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES) {
        tracing::debug!(error = %e, "cannot enlarge the UDP receive buffer");
    }
    if let Err(e) = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES) {
        tracing::debug!(error = %e, "cannot enlarge the UDP send buffer");
    }
    socket.bind(&SocketAddr::V4(addr).into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// The endpoint, the data socket under it (for raw sends) and the diverted datagrams.
pub(crate) type Started = (
    quinn::Endpoint,
    Arc<DataSocket>,
    tokio::sync::mpsc::Receiver<(SocketAddr, Vec<u8>)>,
);

/// Creates the QUIC endpoint (client and server) on `socket`.
pub(crate) fn endpoint(settings: &Settings, socket: UdpSocket) -> anyhow::Result<Started> {
    endpoint_for(settings, socket, ALPN)
}

/// [`endpoint`] speaking the protocol `alpn` (tests make old peers with it).
pub(crate) fn endpoint_for(
    settings: &Settings,
    socket: UdpSocket,
    alpn: &[u8],
) -> anyhow::Result<Started> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let transport = Arc::new(transport_config(settings)?);

    let cert = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])?;
    let cert_der = CertificateDer::from(cert.cert);
    let key_der = PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der());
    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert_der], key_der.into())?;
    server_tls.alpn_protocols = vec![alpn.to_vec()];
    server_tls.max_early_data_size = 0;
    let mut server =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls)?));
    server.transport_config(transport.clone());
    server
        .max_incoming(MAX_PENDING_INCOMING)
        .incoming_buffer_size(INCOMING_BUFFER_BYTES)
        .incoming_buffer_size_total(INCOMING_BUFFER_TOTAL_BYTES);

    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoiseAuthenticates(provider)))
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![alpn.to_vec()];
    let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_tls)?));
    client.transport_config(transport);

    let mut endpoint_config = quinn::EndpointConfig::default();
    // Non-QUIC datagrams (hole-punch probes) are told apart by the QUIC fixed bit, so it
    // must not be greased.
    endpoint_config.grease_quic_bit(false);
    let runtime = Arc::new(quinn::TokioRuntime);
    let (data, diverted) = DataSocket::new(
        runtime.wrap_udp_socket(socket)?,
        settings.relay.clone(),
        settings.direct,
    );
    let mut endpoint = quinn::Endpoint::new_with_abstract_socket(
        endpoint_config,
        Some(server),
        data.clone(),
        runtime,
    )?;
    endpoint.set_default_client_config(client);
    Ok((endpoint, data, diverted))
}

fn transport_config(settings: &Settings) -> anyhow::Result<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(settings.keep_alive));
    t.max_idle_timeout(Some(settings.idle_timeout.try_into()?));
    // One bidirectional stream per connection, opened by the initiator.
    t.max_concurrent_bidi_streams(1u8.into());
    t.max_concurrent_uni_streams(0u8.into());
    t.initial_rtt(Duration::from_millis(100));
    Ok(t)
}

/// Accepts any server certificate: peers are authenticated by Noise XX, not by TLS. The TLS
/// handshake signature is still verified, so the server holds the certificate's key.
#[derive(Debug)]
struct NoiseAuthenticates(Arc<CryptoProvider>);

impl ServerCertVerifier for NoiseAuthenticates {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
