//! Who may call what in a fabric.
//!
//! - [`identity`]: roles and identities (`node/n1`, `operator/alice`), as
//!   certificates carry them (`fabric://ROLE/NAME`);
//! - [`pki`]: the fabric's own CA and the certificates it issues;
//! - [`tls`]: rustls configurations, TLS 1.3 with mutual authentication,
//!   where a client checks the server's *identity* ([`tls::Expect`]);
//! - [`transport`]: accepting and dialling, with TLS or (only when asked for
//!   by name) plaintext;
//! - [`authz`]: the one table of RPC -> roles;
//! - [`layer`]: the one tower layer every server puts in front of its
//!   services, which enforces the table and hands services the [`Caller`];
//! - [`token`]: bearer tokens, stored only as hashes;
//! - [`metrics_port`]: the metrics port (`GET /metrics`) on the server's
//!   transport, open to roles operator and monitor.
//!
//! This crate knows nothing of chunks, jobs or runs: it answers "who is this
//! and may they call this RPC", and services decide what a name may touch.

pub mod authz;
pub mod identity;
pub mod layer;
pub mod metrics_port;
pub mod pki;
pub mod tls;
pub mod token;
pub mod transport;

pub use identity::{Identity, IdentityError, Role};
pub use layer::{AuthLayer, Caller, TokenVerifier};
pub use tls::{Expect, TlsCredentials, TlsError, TlsFiles};
pub use transport::{PeerInfo, Transport};

/// Adds a bearer token to every call of a client (`fabricctl --token`).
#[derive(Clone, Debug, Default)]
pub struct BearerToken(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl BearerToken {
    /// Calls carry `token`; `None`: no token.
    pub fn new(token: Option<&str>) -> Result<Self, token::MalformedToken> {
        match token {
            None => Ok(Self(None)),
            Some(token) => {
                let parsed = token::Token::parse(token)?;
                let value = format!("Bearer {}", parsed.reveal())
                    .parse()
                    .map_err(|_| token::MalformedToken)?;
                Ok(Self(Some(value)))
            }
        }
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry the process's bearer token, if any.
pub type AuthChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerToken>;
