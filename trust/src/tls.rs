//! TLS 1.3 with mutual authentication, as rustls configurations.
//!
//! Every fabric process trusts one CA (the fabric's, `tls_ca`) and nothing
//! else. A server presents its certificate and asks every client for one;
//! a client without a certificate is let through the handshake so that it
//! can present a bearer token instead, and [`crate::layer`] then refuses it
//! everything but what the table lets anyone call (health).
//!
//! A client checks the server's chain to the fabric's CA and then the
//! server's *identity*, not its host name: dialling node `n2` demands a
//! certificate for `node/n2` ([`Expect`]), whatever address it answers on,
//! so a node dials only a registered node that proves its id, and a stolen
//! client certificate cannot pose as a server. This module builds configs;
//! it never opens a socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
};

use crate::identity::{Identity, Role};

/// Why TLS credentials could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which setting (`tls_cert`, `tls_key`, `tls_ca`).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file holds no usable PEM of the expected kind.
    #[error("{what} {path} holds no {kind} in PEM form{detail}")]
    Pem {
        /// Which setting.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What was expected.
        kind: &'static str,
        /// The parser's reason, if any.
        detail: String,
    },
    /// The own certificate cannot be used.
    #[error("tls_cert {path}: {reason}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// No TLS material, and plaintext was not asked for.
    #[error("{0}")]
    Missing(String),
    /// Only one of certificate and key was given.
    #[error("tls_cert and tls_key go together: give both or neither")]
    HalfPair,
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// Which server a client means to reach; the server's certificate must
/// carry a matching identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The coordinator (any `coordinator/NAME`).
    Coordinator,
    /// The node with this id (`node/ID`).
    Node(String),
    /// Any node (`fabricctl backup --node ADDR`, a restore from an address).
    AnyNode,
}

impl Expect {
    /// Whether `identity` is what was expected, or why not.
    pub fn check(&self, identity: &Identity) -> Result<(), String> {
        let ok = match self {
            Expect::Coordinator => identity.role == Role::Coordinator,
            Expect::Node(id) => identity.role == Role::Node && identity.name == *id,
            Expect::AnyNode => identity.role == Role::Node,
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "the server's certificate is for {identity}, but {} was expected",
                self.describe()
            ))
        }
    }

    fn describe(&self) -> String {
        match self {
            Expect::Coordinator => "a coordinator".to_owned(),
            Expect::Node(id) => format!("node/{id}"),
            Expect::AnyNode => "a node".to_owned(),
        }
    }
}

/// The crypto every fabric TLS connection uses: aws-lc-rs, TLS 1.3, with
/// the post-quantum hybrid key exchange (X25519MLKEM768) preferred: backups
/// live for years, so traffic recorded today must stay unreadable later.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A process's TLS material: the fabric's CA and, for servers and
/// certificate-holding clients, its own certificate and key.
pub struct TlsCredentials {
    roots: Arc<RootCertStore>,
    own: Option<OwnCertificate>,
}

struct OwnCertificate {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    identity: Identity,
}

impl std::fmt::Debug for TlsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCredentials")
            .field("identity", &self.identity())
            .finish_non_exhaustive()
    }
}

/// Where a process's TLS material lives (`tls_ca`, `tls_cert`, `tls_key`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// The fabric's CA certificate.
    pub ca: PathBuf,
    /// The own certificate (optional for a client with a token).
    pub cert: Option<PathBuf>,
    /// Its key.
    pub key: Option<PathBuf>,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(what, path)?;
    let pem_error = |detail: String| TlsError::Pem {
        what,
        path: path.to_owned(),
        kind: "certificate",
        detail,
    };
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| pem_error(format!(": {err}")))?;
    if certificates.is_empty() {
        return Err(pem_error(String::new()));
    }
    Ok(certificates)
}

impl TlsCredentials {
    /// Read the files; the own certificate must come from the CA, be valid
    /// now and carry a fabric identity.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let ca = certificates("tls_ca", &files.ca)?;
        let own = match (&files.cert, &files.key) {
            (Some(cert), Some(key)) => {
                let chain = certificates("tls_cert", cert)?;
                let key_bytes = read("tls_key", key)?;
                let key =
                    PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|err| TlsError::Pem {
                        what: "tls_key",
                        path: key.clone(),
                        kind: "private key",
                        detail: format!(": {err}"),
                    })?;
                Some((cert.clone(), chain, key))
            }
            (None, None) => None,
            _ => return Err(TlsError::HalfPair),
        };
        Self::new(ca, own)
    }

    /// From PEM text (the embedded fabric keeps its ephemeral CA in memory).
    pub fn from_pem(ca_pem: &str, own: Option<(&str, &str)>) -> Result<Self, TlsError> {
        let pem = |what: &'static str, kind: &'static str, detail: String| TlsError::Pem {
            what,
            path: PathBuf::from("<memory>"),
            kind,
            detail,
        };
        let ca = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| pem("tls_ca", "certificate", format!(": {err}")))?;
        let own = match own {
            Some((cert_pem, key_pem)) => {
                let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|err| pem("tls_cert", "certificate", format!(": {err}")))?;
                let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                    .map_err(|err| pem("tls_key", "private key", format!(": {err}")))?;
                Some((PathBuf::from("<memory>"), chain, key))
            }
            None => None,
        };
        Self::new(ca, own)
    }

    fn new(
        ca: Vec<CertificateDer<'static>>,
        own: Option<(
            PathBuf,
            Vec<CertificateDer<'static>>,
            PrivateKeyDer<'static>,
        )>,
    ) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for certificate in ca {
            roots
                .add(certificate)
                .map_err(|err| TlsError::Config(format!("tls_ca: {err}")))?;
        }
        let roots = Arc::new(roots);
        let own = match own {
            None => None,
            Some((path, chain, key)) => {
                let bad = |reason: String| TlsError::Certificate {
                    path: path.clone(),
                    reason,
                };
                let leaf = chain.first().ok_or_else(|| bad("no certificate".into()))?;
                let identity =
                    Identity::from_certificate(leaf).map_err(|err| bad(err.to_string()))?;
                // Checked here, so a wrong file fails at start with a clear
                // reason rather than every handshake later.
                check_own_certificate(leaf, &chain[1..], &roots, identity.role)
                    .map_err(|err| bad(format!("not usable with tls_ca: {err}")))?;
                Some(OwnCertificate {
                    chain,
                    key,
                    identity,
                })
            }
        };
        Ok(Self { roots, own })
    }

    /// The identity of the own certificate, if any.
    pub fn identity(&self) -> Option<&Identity> {
        self.own.as_ref().map(|own| &own.identity)
    }

    /// A server config: TLS 1.3, the own certificate, client certificates
    /// from the fabric's CA verified when presented (a client may instead
    /// present a token).
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.server_config_for(&[b"h2"])
    }

    /// [`Self::server_config`] for a plain HTTP port (the metrics port):
    /// HTTP/2 or HTTP/1.1, whichever the client offers.
    pub fn http_server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        self.server_config_for(&[b"h2", b"http/1.1"])
    }

    fn server_config_for(&self, protocols: &[&[u8]]) -> Result<Arc<ServerConfig>, TlsError> {
        let own = self
            .own
            .as_ref()
            .ok_or_else(|| TlsError::Config("a server needs tls_cert and tls_key".to_owned()))?;
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|err| TlsError::Config(err.to_string()))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|err| TlsError::Config(err.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(own.chain.clone(), own.key.clone_key())
            .map_err(|err| TlsError::Config(format!("tls_cert and tls_key: {err}")))?;
        config.alpn_protocols = protocols.iter().map(|protocol| protocol.to_vec()).collect();
        Ok(Arc::new(config))
    }

    /// A client config that presents the own certificate (if any) and
    /// accepts only a server from the fabric's CA with the `expect`ed
    /// identity.
    pub fn client_config(&self, expect: Expect) -> Result<Arc<ClientConfig>, TlsError> {
        let verifier = Arc::new(IdentityVerifier {
            roots: self.roots.clone(),
            expect,
        });
        let builder = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|err| TlsError::Config(err.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match &self.own {
            Some(own) => builder
                .with_client_auth_cert(own.chain.clone(), own.key.clone_key())
                .map_err(|err| TlsError::Config(format!("tls_cert and tls_key: {err}")))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The own certificate chains to the CA, is valid now, and may be used as
/// its role uses it (servers serve, everyone dials).
fn check_own_certificate(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &RootCertStore,
    role: Role,
) -> Result<(), String> {
    let certificate = webpki::EndEntityCert::try_from(leaf).map_err(|err| err.to_string())?;
    let usage = match role {
        Role::Node | Role::Coordinator => webpki::KeyUsage::server_auth(),
        Role::Operator | Role::Monitor | Role::Client => webpki::KeyUsage::client_auth(),
    };
    certificate
        .verify_for_usage(
            algorithms().all,
            &roots.roots,
            intermediates,
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .map(|_| ())
        .map_err(|err| match err {
            webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
                "it was not issued by this CA".to_owned()
            }
            webpki::Error::CertExpired { .. } => "it has expired".to_owned(),
            webpki::Error::CertNotValidYet { .. } => "it is not valid yet".to_owned(),
            other => other.to_string(),
        })
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms
}

/// Checks the server's chain to the fabric's CA, then its identity. The
/// host name the client dialled plays no part: the identity is the name.
#[derive(Debug)]
struct IdentityVerifier {
    roots: Arc<RootCertStore>,
    expect: Expect,
}

fn other_error(reason: String) -> rustls::Error {
    #[derive(Debug)]
    struct Reason(String);
    impl std::fmt::Display for Reason {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for Reason {}
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Reason(
        reason,
    )))))
}

impl ServerCertVerifier for IdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            algorithms().all,
        )?;
        let identity = Identity::from_certificate(end_entity)
            .map_err(|err| other_error(format!("the server's certificate: {err}")))?;
        self.expect.check(&identity).map_err(other_error)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algorithms().supported_schemes()
    }
}

/// When the own certificate expires, for a warning at start.
pub fn seconds_until_expiry(credentials: &TlsCredentials) -> Option<i64> {
    let own = credentials.own.as_ref()?;
    let (_, certificate) = x509_parser::parse_x509_certificate(own.chain.first()?).ok()?;
    let not_after = certificate.validity().not_after.timestamp();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_secs()).ok())?;
    Some(not_after - now)
}
