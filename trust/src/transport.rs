//! Sockets with or without TLS: the connections a server accepts
//! ([`incoming`]) and the channels a client dials ([`connect`]).
//!
//! A server's TLS handshakes run in tasks of their own, bounded in time, so
//! a client that stalls its handshake holds up nobody else. What the
//! handshake proved (the client's certificate chain) travels with the
//! connection as [`PeerInfo`], where the authorization layer reads it.
//!
//! Plaintext is only ever used when a process was started with
//! `--insecure-plaintext` ([`Transport::InsecurePlaintext`]).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

use crate::identity::Identity;
use crate::tls::{Expect, TlsCredentials, TlsError};

/// How a process talks: TLS with its credentials, or plaintext when asked
/// for by name.
#[derive(Clone, Debug)]
pub enum Transport {
    /// TLS 1.3, mutual where the process holds a certificate.
    Tls(Arc<TlsCredentials>),
    /// No TLS, no authentication: every caller may do everything.
    InsecurePlaintext,
}

impl Transport {
    /// Whether connections are encrypted and callers authenticated.
    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }

    /// The identity this process presents, if any.
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Transport::Tls(credentials) => credentials.identity(),
            Transport::InsecurePlaintext => None,
        }
    }

    /// `https` or `http`, for the addresses a server advertises.
    pub fn scheme(&self) -> &'static str {
        if self.is_tls() { "https" } else { "http" }
    }
}

/// What a server or client was configured with: the three TLS files, or
/// `insecure_plaintext`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransportSettings {
    /// `tls_ca`.
    pub ca: Option<std::path::PathBuf>,
    /// `tls_cert`.
    pub cert: Option<std::path::PathBuf>,
    /// `tls_key`.
    pub key: Option<std::path::PathBuf>,
    /// `insecure_plaintext`.
    pub insecure_plaintext: bool,
}

impl TransportSettings {
    /// From a config's `tls_ca`, `tls_cert`, `tls_key` and
    /// `insecure_plaintext`.
    pub fn new(
        ca: Option<&std::path::Path>,
        cert: Option<&std::path::Path>,
        key: Option<&std::path::Path>,
        insecure_plaintext: bool,
    ) -> Self {
        Self {
            ca: ca.map(Into::into),
            cert: cert.map(Into::into),
            key: key.map(Into::into),
            insecure_plaintext,
        }
    }

    /// The transport of a server whose certificate must be `expected`'s: TLS
    /// with all three files, or plaintext only when asked for by name (which
    /// is logged as a warning).
    pub fn server(&self, expected: &Expect) -> Result<Transport, TlsError> {
        if self.insecure_plaintext {
            tracing::warn!(
                "--insecure-plaintext: no TLS and no authentication; anyone who reaches this port may do anything"
            );
            return Ok(Transport::InsecurePlaintext);
        }
        let (Some(ca), Some(cert), Some(key)) = (&self.ca, &self.cert, &self.key) else {
            let issue = match expected {
                Expect::Node(id) => format!("--node {id}"),
                Expect::AnyNode => "--node ID".to_owned(),
                Expect::Coordinator => "--coordinator NAME".to_owned(),
            };
            return Err(TlsError::Missing(format!(
                "a server needs tls_cert, tls_key and tls_ca (`fabricctl pki issue {issue}` makes them), or --insecure-plaintext"
            )));
        };
        let credentials = TlsCredentials::load(&crate::tls::TlsFiles {
            ca: ca.clone(),
            cert: Some(cert.clone()),
            key: Some(key.clone()),
        })?;
        let identity = credentials.identity().ok_or(TlsError::HalfPair)?;
        expected
            .check(identity)
            .map_err(|reason| TlsError::Certificate {
                path: cert.clone(),
                reason: reason.replace("the server's certificate is", "it is"),
            })?;
        if let Some(left) = crate::tls::seconds_until_expiry(&credentials)
            && left < 30 * 24 * 3600
        {
            tracing::warn!(
                certificate = %cert.display(),
                days_left = left / 86_400,
                "the server certificate expires soon: issue a new one"
            );
        }
        Ok(Transport::Tls(Arc::new(credentials)))
    }

    /// The transport of a client: TLS with the CA (and the certificate, if
    /// given), or plaintext when asked for by name.
    pub fn client(&self) -> Result<Transport, TlsError> {
        if self.insecure_plaintext {
            return Ok(Transport::InsecurePlaintext);
        }
        let Some(ca) = &self.ca else {
            return Err(TlsError::Missing(
                "no tls_ca: give the fabric's CA certificate (and a certificate and key, or a token), or --insecure-plaintext"
                    .to_owned(),
            ));
        };
        let credentials = TlsCredentials::load(&crate::tls::TlsFiles {
            ca: ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        })?;
        Ok(Transport::Tls(Arc::new(credentials)))
    }
}

/// How long a server waits for a client to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a server knows of the other end of a connection.
#[derive(Clone, Debug, Default)]
pub struct PeerInfo {
    /// The peer's address.
    pub remote_addr: Option<SocketAddr>,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The certificate chain the client presented and the handshake
    /// verified against the fabric's CA (none: no certificate).
    pub certificates: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// An accepted connection, plaintext or TLS.
#[derive(Debug)]
pub enum ServerStream {
    /// Plaintext (`--insecure-plaintext`, or the health port).
    Plain(TcpStream),
    /// After a completed TLS handshake.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Connected for ServerStream {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self {
            ServerStream::Plain(stream) => PeerInfo {
                remote_addr: stream.peer_addr().ok(),
                tls: false,
                certificates: None,
            },
            ServerStream::Tls(stream) => {
                let (tcp, session) = stream.get_ref();
                PeerInfo {
                    remote_addr: tcp.peer_addr().ok(),
                    tls: true,
                    certificates: session
                        .peer_certificates()
                        .map(|certificates| Arc::new(certificates.to_vec())),
                }
            }
        }
    }
}

impl AsyncRead for ServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            ServerStream::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            ServerStream::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerStream::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            ServerStream::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerStream::Plain(stream) => stream.is_write_vectored(),
            ServerStream::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(stream) => Pin::new(stream).poll_flush(cx),
            ServerStream::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerStream::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            ServerStream::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections `listener` accepts, for tonic's
/// `serve_with_incoming_shutdown`, with `TCP_NODELAY` set (tonic sets it only
/// on sockets it binds itself; without it a small message written after
/// another waits for the peer's delayed ACK). With TLS, only connections
/// whose handshake completed within [`HANDSHAKE_TIMEOUT`] come out; a
/// refused handshake (no fabric certificate, an expired one, plaintext) is
/// logged with the peer's address and why.
pub fn incoming(
    listener: TcpListener,
    transport: &Transport,
) -> Result<Pin<Box<dyn Stream<Item = io::Result<ServerStream>> + Send>>, TlsError> {
    incoming_with(listener, transport, TlsCredentials::server_config)
}

/// [`incoming`] for a plain HTTP port (the metrics port): the same
/// certificate and client verification, with HTTP/1.1 as well as HTTP/2
/// offered to clients, since scrapers often speak only HTTP/1.1.
pub fn incoming_http(
    listener: TcpListener,
    transport: &Transport,
) -> Result<Pin<Box<dyn Stream<Item = io::Result<ServerStream>> + Send>>, TlsError> {
    incoming_with(listener, transport, TlsCredentials::http_server_config)
}

type ServerConfigOf = fn(&TlsCredentials) -> Result<Arc<rustls::ServerConfig>, TlsError>;

fn incoming_with(
    listener: TcpListener,
    transport: &Transport,
    server_config: ServerConfigOf,
) -> Result<Pin<Box<dyn Stream<Item = io::Result<ServerStream>> + Send>>, TlsError> {
    match transport {
        Transport::InsecurePlaintext => Ok(Box::pin(
            tonic::transport::server::TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .map(|accepted| accepted.map(ServerStream::Plain)),
        )),
        Transport::Tls(credentials) => {
            let acceptor = TlsAcceptor::from(server_config(credentials)?);
            let (sender, receiver) = mpsc::channel(64);
            tokio::spawn(accept_tls(listener, acceptor, sender));
            Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
                receiver,
            )))
        }
    }
}

/// Plaintext connections, whatever the process's transport: for the port
/// that serves only grpc.health.v1 to probes.
pub fn incoming_plaintext(
    listener: TcpListener,
) -> Pin<Box<dyn Stream<Item = io::Result<ServerStream>> + Send>> {
    Box::pin(
        tonic::transport::server::TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .map(|accepted| accepted.map(ServerStream::Plain)),
    )
}

async fn accept_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    sender: mpsc::Sender<io::Result<ServerStream>>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // The server stopped and dropped the stream: stop listening.
            () = sender.closed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // EMFILE and the like: wait a little rather than spin.
                tracing::warn!(%error, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let sender = sender.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let _ = sender.send(Ok(ServerStream::Tls(Box::new(stream)))).await;
                }
                Ok(Err(error)) => {
                    tracing::info!(%peer, %error, "TLS handshake refused");
                }
                Err(_) => {
                    tracing::info!(%peer, timeout = ?HANDSHAKE_TIMEOUT, "TLS handshake timed out");
                }
            }
        });
    }
}

/// Why a channel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TLS material is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The connection or the handshake failed.
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

/// Open `endpoint` over `transport`; with TLS, the server must prove the
/// `expect`ed identity. The endpoint's other settings (windows, timeouts)
/// are the caller's.
pub async fn connect(
    endpoint: Endpoint,
    transport: &Transport,
    expect: Expect,
) -> Result<Channel, ConnectError> {
    match transport {
        Transport::InsecurePlaintext => Ok(endpoint.tcp_nodelay(true).connect().await?),
        Transport::Tls(credentials) => {
            let connector = TlsConnector::from(credentials.client_config(expect)?);
            let channel = endpoint
                .connect_with_connector(tower::service_fn(move |uri: http::Uri| {
                    let connector = connector.clone();
                    async move { dial_tls(&uri, &connector).await }
                }))
                .await?;
            Ok(channel)
        }
    }
}

async fn dial_tls(
    uri: &http::Uri,
    connector: &TlsConnector,
) -> io::Result<hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>> {
    let host = uri
        .host()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the address has no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(443);
    let tcp = TcpStream::connect((host, port)).await?;
    tcp.set_nodelay(true)?;
    // The name only goes into SNI: the verifier checks the identity.
    let server_name = ServerName::try_from(host.to_owned())
        .unwrap_or_else(|_| ServerName::try_from("fabric").expect("a valid DNS name"));
    let stream = connector.connect(server_name, tcp).await?;
    Ok(hyper_util::rt::TokioIo::new(stream))
}
