//! The one place every server authorizes a call: a tower layer in front of
//! all its services.
//!
//! For each request it finds the RPC's row in [`crate::authz::TABLE`], works
//! out the caller (the fabric identity of the client certificate the TLS
//! handshake verified, else a bearer token the server's [`TokenVerifier`]
//! accepts, else anonymous), and either refuses the call with
//! UNAUTHENTICATED (no or bad credentials) or PERMISSION_DENIED (the role
//! may not call it), or passes it on with the [`Caller`] in the request's
//! extensions for the services' checks by name. A refusal says what was
//! missing or wrong, and never echoes a secret.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::body::Body;

use crate::authz::{self, Access};
use crate::identity::{Identity, Role, shorten};
use crate::transport::PeerInfo;

/// The caller of a request, as the layer established it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A verified certificate or token.
    Authenticated(Identity),
    /// No credentials (only RPCs open to anyone get this far).
    Anonymous,
    /// The server runs with `--insecure-plaintext`: nobody is checked.
    Insecure,
}

impl Caller {
    /// The caller of `request` (anonymous when no layer ran).
    pub fn of<T>(request: &tonic::Request<T>) -> Caller {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .unwrap_or(Caller::Anonymous)
    }

    /// The identity, if authenticated.
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Caller::Authenticated(identity) => Some(identity),
            _ => None,
        }
    }

    /// Whether the caller has `role` (an insecure server grants every role).
    pub fn has_role(&self, role: Role) -> bool {
        match self {
            Caller::Authenticated(identity) => identity.role == role,
            Caller::Anonymous => false,
            Caller::Insecure => true,
        }
    }

    /// Refused unless the caller may act as node `id`: a node only under its
    /// own id (an insecure server believes every claim).
    pub fn check_node(&self, id: &str) -> Result<(), Status> {
        match self {
            Caller::Insecure => Ok(()),
            Caller::Authenticated(identity) if identity.role == Role::Node => {
                if identity.name == id {
                    Ok(())
                } else {
                    Err(Status::permission_denied(format!(
                        "node id mismatch: the certificate is for node {}, the request claims node {}",
                        identity.name,
                        shorten(id)
                    )))
                }
            }
            other => Err(Status::permission_denied(format!(
                "only node {} itself may speak for it, not {}",
                shorten(id),
                other.describe()
            ))),
        }
    }

    /// The host a client caller is limited to; `None` for every other caller.
    pub fn client_host(&self) -> Option<&str> {
        match self {
            Caller::Authenticated(identity) if identity.role == Role::Client => {
                Some(&identity.name)
            }
            _ => None,
        }
    }

    /// For messages and logs: `operator/alice`, `anonymous`, `insecure`.
    pub fn describe(&self) -> String {
        match self {
            Caller::Authenticated(identity) => identity.to_string(),
            Caller::Anonymous => "an anonymous caller".to_owned(),
            Caller::Insecure => "an unauthenticated caller (insecure plaintext)".to_owned(),
        }
    }

    /// Who made a change, for records (`operator/alice`).
    pub fn record(&self) -> String {
        match self {
            Caller::Authenticated(identity) => identity.to_string(),
            Caller::Anonymous => "anonymous".to_owned(),
            Caller::Insecure => "insecure-plaintext".to_owned(),
        }
    }
}

/// Checks bearer tokens (the coordinator's token store).
pub trait TokenVerifier: Send + Sync + 'static {
    /// The identity `token` stands for, or why it is refused (a message for
    /// the caller that does not contain the token).
    fn verify(
        &self,
        token: String,
    ) -> Pin<Box<dyn Future<Output = Result<Identity, String>> + Send>>;
}

/// The authorization layer.
#[derive(Clone)]
pub struct AuthLayer {
    insecure: bool,
    tokens: Option<Arc<dyn TokenVerifier>>,
}

impl std::fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthLayer")
            .field("insecure", &self.insecure)
            .field("tokens", &self.tokens.is_some())
            .finish()
    }
}

impl AuthLayer {
    /// Authorize by certificate and, with `tokens`, by bearer token.
    pub fn new(tokens: Option<Arc<dyn TokenVerifier>>) -> Self {
        Self {
            insecure: false,
            tokens,
        }
    }

    /// For `--insecure-plaintext`: every caller may call everything that is
    /// in the table.
    pub fn insecure() -> Self {
        Self {
            insecure: true,
            tokens: None,
        }
    }

    /// The layer a server with `transport` uses.
    pub fn for_transport(
        transport: &crate::transport::Transport,
        tokens: Option<Arc<dyn TokenVerifier>>,
    ) -> Self {
        if transport.is_tls() {
            Self::new(tokens)
        } else {
            Self::insecure()
        }
    }

    /// Who is calling, or why the call is refused.
    async fn authorize(&self, request: CallFacts) -> Result<Caller, Status> {
        let path = request.path.as_str();
        let rpc = path.trim_start_matches('/');
        let access = authz::access(path).ok_or_else(|| {
            Status::permission_denied(format!(
                "{} is not in the authorization table: nobody may call it",
                shorten(rpc)
            ))
        })?;
        if self.insecure {
            return Ok(Caller::Insecure);
        }
        let caller = if let Some(certificate) = request.certificate {
            let identity = Identity::from_certificate(&certificate).map_err(|err| {
                Status::unauthenticated(format!(
                    "the client certificate names no usable fabric identity: {err}"
                ))
            })?;
            Caller::Authenticated(identity)
        } else if let Some(header) = request.authorization {
            let token = header
                .to_str()
                .ok()
                .and_then(|value| value.strip_prefix("Bearer "))
                .ok_or_else(|| {
                    Status::unauthenticated("the authorization header is not `Bearer TOKEN`")
                })?;
            let verifier = self.tokens.as_ref().ok_or_else(|| {
                Status::unauthenticated(
                    "this server accepts client certificates, not tokens: tokens are for the coordinator",
                )
            })?;
            let identity = verifier
                .verify(token.to_owned())
                .await
                .map_err(Status::unauthenticated)?;
            Caller::Authenticated(identity)
        } else {
            Caller::Anonymous
        };
        let allowed = match (access, &caller) {
            (Access::Anyone, _) => true,
            (_, Caller::Anonymous) => {
                return Err(Status::unauthenticated(format!(
                    "no client certificate or token: {rpc} needs {}",
                    authz::describe(access)
                )));
            }
            (Access::Authenticated, _) => true,
            (Access::Roles(roles), Caller::Authenticated(identity)) => {
                roles.contains(&identity.role)
            }
            (Access::Roles(_), Caller::Insecure) => true,
        };
        if allowed {
            Ok(caller)
        } else {
            Err(Status::permission_denied(format!(
                "{} may not call {rpc}: it needs {}",
                caller.describe(),
                authz::describe(access)
            )))
        }
    }
}

/// What the decision needs of a request, taken out of it so that the
/// request (whose body is not `Sync`) is not held across the token check.
struct CallFacts {
    path: String,
    certificate: Option<rustls::pki_types::CertificateDer<'static>>,
    authorization: Option<http::HeaderValue>,
}

impl CallFacts {
    fn of(request: &http::Request<Body>) -> Self {
        Self {
            path: request.uri().path().to_owned(),
            certificate: request
                .extensions()
                .get::<PeerInfo>()
                .and_then(|peer| peer.certificates.as_ref())
                .and_then(|chain| chain.first().cloned()),
            authorization: request.headers().get(http::header::AUTHORIZATION).cloned(),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service the layer wraps around a server's routes.
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    layer: AuthLayer,
}

impl<S> tower::Service<http::Request<Body>> for AuthService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        // The clone is ready only after poll_ready; use the ready one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        let facts = CallFacts::of(&request);
        Box::pin(async move {
            match layer.authorize(facts).await {
                Ok(caller) => {
                    request.extensions_mut().insert(caller);
                    inner.call(request).await
                }
                Err(status) => {
                    let peer = request
                        .extensions()
                        .get::<PeerInfo>()
                        .and_then(|peer| peer.remote_addr);
                    tracing::info!(
                        rpc = %shorten(request.uri().path()),
                        peer = ?peer,
                        code = ?status.code(),
                        reason = status.message(),
                        "call refused"
                    );
                    Ok(status.into_http())
                }
            }
        })
    }
}
