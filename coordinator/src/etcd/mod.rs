//! A small etcd v3 client: the generated clients of etcd's KV, Lease and
//! Election services (see `coordinator/etcd-api/`) and the few calls the
//! coordinator makes with them. It owns connecting (every endpoint, load
//! balanced, optionally TLS) and turning etcd's replies into [`EtcdError`]s;
//! it never decides anything about leadership or state layout: that is
//! [`crate::leadership`] and [`crate::state::etcd`].

pub mod api;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use api::etcdserverpb::kv_client::KvClient;
use api::etcdserverpb::lease_client::LeaseClient;
use api::v3electionpb::election_client::ElectionClient;

/// Why a call to etcd failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// An endpoint is not a URL tonic accepts.
    #[error("bad etcd endpoint {endpoint:?}: {message}")]
    Endpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong.
        message: String,
    },
    /// No endpoint was given.
    #[error("no etcd endpoint given (etcd_endpoints)")]
    NoEndpoints,
    /// The TLS files could not be read or used.
    #[error("etcd TLS: {0}")]
    Tls(String),
    /// etcd answered with an error, or could not be reached.
    #[error("etcd: cannot {action}: {status}")]
    Call {
        /// What was being done.
        action: String,
        /// The gRPC status.
        status: Box<tonic::Status>,
    },
}

impl EtcdError {
    /// An error of `action` from a gRPC status.
    pub fn call(action: impl Into<String>) -> impl FnOnce(tonic::Status) -> Self {
        let action = action.into();
        move |status| Self::Call {
            action,
            status: Box::new(status),
        }
    }
}

/// PEM files for TLS to etcd: its CA, and this coordinator's client
/// certificate and key.
#[derive(Debug, Clone, Default)]
pub struct EtcdTls {
    /// The CA that signed etcd's server certificates.
    pub ca_pem: Vec<u8>,
    /// The client certificate and key (etcd's `--client-cert-auth`), if any.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Clients of the three etcd services the coordinator uses, over one
/// balanced channel to every endpoint.
#[derive(Debug, Clone)]
pub struct Etcd {
    /// Keys and transactions.
    pub kv: KvClient<Channel>,
    /// Leases and their keep-alives.
    pub lease: LeaseClient<Channel>,
    /// Campaigns and the current leader.
    pub election: ElectionClient<Channel>,
}

/// Largest message exchanged with etcd: its own default request limit is
/// 1.5 MiB, replies of a paged range stay far below this.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// How long one endpoint may take to accept a connection.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);

/// One etcd member to dial.
#[derive(Debug, Clone)]
struct Member {
    host: String,
    port: u16,
}

/// A byte stream to etcd, plain or TLS.
trait EtcdStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> EtcdStream for T {}

/// Dials the members in turn from the one that last answered, so that a
/// connection lost to a dead member is made again to a live one.
#[derive(Clone)]
struct MemberDialer {
    members: Arc<Vec<Member>>,
    next: Arc<AtomicUsize>,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl MemberDialer {
    async fn dial(self) -> std::io::Result<hyper_util::rt::TokioIo<Box<dyn EtcdStream>>> {
        let start = self.next.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for offset in 0..self.members.len() {
            let index = (start + offset) % self.members.len();
            let member = &self.members[index];
            match self.dial_member(member).await {
                Ok(stream) => {
                    self.next.store(index, Ordering::Relaxed);
                    return Ok(hyper_util::rt::TokioIo::new(stream));
                }
                Err(error) => failures.push(format!("{}:{}: {error}", member.host, member.port)),
            }
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            format!("no etcd endpoint answers ({})", failures.join("; ")),
        ))
    }

    async fn dial_member(&self, member: &Member) -> std::io::Result<Box<dyn EtcdStream>> {
        let tcp = tokio::time::timeout(
            DIAL_TIMEOUT,
            tokio::net::TcpStream::connect((member.host.as_str(), member.port)),
        )
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
        tcp.set_nodelay(true)?;
        let Some(tls) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        // etcd's certificate must name the host as given in the endpoint.
        let name = rustls_pki_types::ServerName::try_from(member.host.clone())
            .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
        let stream = tokio::time::timeout(DIAL_TIMEOUT, tls.connect(name, tcp))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
            })??;
        Ok(Box::new(stream))
    }
}

/// A TLS client configuration for etcd: its CA (with the usual host name
/// checks), and the client certificate when given.
fn client_config(tls: &EtcdTls) -> Result<Arc<rustls::ClientConfig>, EtcdError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let bad =
        |what: &str, error: &dyn std::fmt::Display| EtcdError::Tls(format!("{what}: {error}"));
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(&tls.ca_pem) {
        let certificate = certificate.map_err(|error| bad("etcd_tls_ca", &error))?;
        roots
            .add(certificate)
            .map_err(|error| bad("etcd_tls_ca", &error))?;
    }
    if roots.is_empty() {
        return Err(EtcdError::Tls("etcd_tls_ca holds no certificate".into()));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|error| bad("etcd TLS", &error))?
    .with_root_certificates(roots);
    let mut config = match &tls.identity {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| bad("etcd_tls_cert", &error))?;
            let key =
                PrivateKeyDer::from_pem_slice(key).map_err(|error| bad("etcd_tls_key", &error))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|error| bad("etcd_tls_cert and etcd_tls_key", &error))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

impl Etcd {
    /// A client of `endpoints` (`http://host:port`, or `https://` with
    /// `tls`). Connects lazily: an etcd that is down makes calls fail, not
    /// this. One connection at a time, to the first member that answers;
    /// when it breaks the next connection tries the members in turn.
    pub fn connect(endpoints: &[String], tls: Option<&EtcdTls>) -> Result<Self, EtcdError> {
        if endpoints.is_empty() {
            return Err(EtcdError::NoEndpoints);
        }
        let mut members = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let bad = |message: String| EtcdError::Endpoint {
                endpoint: endpoint.clone(),
                message,
            };
            let uri: http::Uri = endpoint
                .parse()
                .map_err(|error: http::uri::InvalidUri| bad(error.to_string()))?;
            let secure = match uri.scheme_str() {
                Some("https") => true,
                Some("http") => false,
                _ => return Err(bad("not an http:// or https:// URL".into())),
            };
            if secure != tls.is_some() {
                return Err(bad(if secure {
                    "an https:// endpoint needs etcd_tls_ca (and usually etcd_tls_cert/key)".into()
                } else {
                    "etcd TLS is set, so every endpoint must be https://".into()
                }));
            }
            let host = uri
                .host()
                .ok_or_else(|| bad("no host".into()))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(2379);
            members.push(Member { host, port });
        }
        let dialer = MemberDialer {
            members: Arc::new(members),
            next: Arc::new(AtomicUsize::new(0)),
            tls: tls
                .map(client_config)
                .transpose()?
                .map(tokio_rustls::TlsConnector::from),
        };
        // The URI only names the origin: the dialer picks the member.
        let channel = Endpoint::from_static("http://etcd")
            .connect_timeout(DIAL_TIMEOUT * 2)
            .http2_keep_alive_interval(Duration::from_secs(2))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true)
            .connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
                dialer.clone().dial()
            }));
        Ok(Self {
            kv: KvClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            lease: LeaseClient::new(channel.clone()),
            election: ElectionClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES),
        })
    }
}

/// The smallest key greater than every key starting with `prefix` (etcd's
/// `range_end` for a prefix scan).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: "\0" means "to the end of the key space".
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_at_its_last_byte_plus_one() {
        assert_eq!(prefix_end(b"fabric/jobs/"), b"fabric/jobs0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
    }
}
