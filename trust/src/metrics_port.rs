//! The metrics port every server may open (`metrics_listen`): `GET
//! /metrics` over HTTP/1.1 or HTTP/2, on the server's own transport.
//!
//! With TLS the port presents the server's certificate and lets through
//! only a scraper whose client certificate (or, where the server has a
//! [`TokenVerifier`], bearer token) has a role in
//! [`crate::authz::METRICS_SCRAPERS`]: no credentials is 401, another role
//! 403, each with one line saying what was needed. With
//! `--insecure-plaintext` the port is plain HTTP and open, as the main port
//! is. A server may add pages of its own ([`serve_metrics_and_pages`]: the
//! coordinator's status page), behind the same admission; for a browser,
//! which can send neither a client certificate of the fabric's nor a bearer
//! header, a token is also taken as the password of HTTP Basic credentials
//! (any user name), and a page's 401 asks for them (`WWW-Authenticate`).
//! Any other path is 404.
//!
//! This module owns serving and admission only: it never knows a metric's
//! name or value (the server hands it a [`MetricsSource`] that renders the
//! text), and never echoes a token.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use tonic::transport::server::Connected as _;

use crate::authz::METRICS_SCRAPERS;
use crate::identity::Identity;
use crate::layer::TokenVerifier;
use crate::tls::TlsError;
use crate::transport::{PeerInfo, ServerStream, Transport};

/// The one path the port serves.
pub const METRICS_PATH: &str = "/metrics";

/// The content type of the OpenMetrics text format, which the port answers
/// with.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the port serves: the server's metrics, rendered in the OpenMetrics
/// text format at each scrape.
pub trait MetricsSource: Send + Sync + 'static {
    /// The text of one scrape, or why it could not be made (answered 500).
    fn render(&self) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send + '_>>;
}

/// Who may scrape: the server's transport and, on the coordinator, its
/// token store.
#[derive(Clone)]
pub struct Admission {
    insecure: bool,
    tokens: Option<Arc<dyn TokenVerifier>>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("insecure", &self.insecure)
            .field("tokens", &self.tokens.is_some())
            .finish()
    }
}

/// Why a scrape was refused: the status and the one line of its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// 401 (no or bad credentials) or 403 (a role that may not scrape).
    pub status: StatusCode,
    /// What was needed, never a secret.
    pub message: String,
}

impl Admission {
    /// The admission of a server with `transport` (open when it runs
    /// insecure) that accepts bearer tokens when given `tokens`.
    pub fn for_transport(transport: &Transport, tokens: Option<Arc<dyn TokenVerifier>>) -> Self {
        Self {
            insecure: !transport.is_tls(),
            tokens,
        }
    }

    /// Whether the scraper on `peer` presenting `authorization` may scrape.
    pub async fn admit(
        &self,
        peer: &PeerInfo,
        authorization: Option<&header::HeaderValue>,
    ) -> Result<(), Refusal> {
        self.admit_to(peer, authorization, METRICS_PATH).await
    }

    /// Whether the caller on `peer` presenting `authorization` may read
    /// `what` (a path, for the messages).
    pub async fn admit_to(
        &self,
        peer: &PeerInfo,
        authorization: Option<&header::HeaderValue>,
        what: &str,
    ) -> Result<(), Refusal> {
        if self.insecure {
            return Ok(());
        }
        let needed = needed();
        let unauthorized = |message: String| Refusal {
            status: StatusCode::UNAUTHORIZED,
            message,
        };
        let certificate = peer
            .certificates
            .as_ref()
            .and_then(|chain| chain.first().cloned());
        let identity = if let Some(certificate) = certificate {
            Identity::from_certificate(&certificate).map_err(|err| {
                unauthorized(format!(
                    "the client certificate names no usable fabric identity ({err}): {what} needs {needed}"
                ))
            })?
        } else if let Some(header) = authorization {
            let token = header
                .to_str()
                .ok()
                .and_then(token_of)
                .ok_or_else(|| {
                    unauthorized(format!(
                        "the authorization header is neither `Bearer TOKEN` nor Basic credentials with the token as password: {what} needs {needed}"
                    ))
                })?;
            let verifier = self.tokens.as_ref().ok_or_else(|| {
                unauthorized(format!(
                    "this server takes client certificates, not tokens: {what} needs a certificate of {needed}"
                ))
            })?;
            verifier
                .verify(token.to_owned())
                .await
                .map_err(|reason| unauthorized(format!("{reason}: {what} needs {needed}")))?
        } else {
            return Err(unauthorized(format!(
                "no client certificate or token: {what} needs {needed}"
            )));
        };
        if METRICS_SCRAPERS.contains(&identity.role) {
            Ok(())
        } else {
            Err(Refusal {
                status: StatusCode::FORBIDDEN,
                message: format!("{identity} may not read {what}: it needs {needed}"),
            })
        }
    }
}

/// The token in an `Authorization` value: `Bearer TOKEN`, or HTTP Basic
/// credentials whose password is the token (the user name is not looked
/// at), which is what a browser can send.
fn token_of(value: &str) -> Option<String> {
    use base64::Engine as _;
    if let Some(token) = value.strip_prefix("Bearer ") {
        return Some(token.to_owned());
    }
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let credentials = String::from_utf8(decoded).ok()?;
    let (_, password) = credentials.split_once(':')?;
    (!password.is_empty()).then(|| password.to_owned())
}

/// "role operator or monitor".
fn needed() -> String {
    crate::authz::describe(crate::authz::Access::Roles(METRICS_SCRAPERS))
}

/// Why the metrics port could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsPortError {
    /// The TLS settings are unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Serving failed.
    #[error("the metrics port failed: {0}")]
    Serve(io::Error),
}

/// Serve `source` at `/metrics` on `listener`, over `transport`, to the
/// scrapers `admission` lets in, until `shutdown` resolves.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    transport: &Transport,
    admission: Admission,
    source: Arc<dyn MetricsSource>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), MetricsPortError> {
    serve_metrics_and_pages(
        listener,
        transport,
        admission,
        source,
        axum::Router::new(),
        shutdown,
    )
    .await
}

/// [`serve_metrics`], and the server's own `pages` beside `/metrics`,
/// each request let through by the same `admission` first.
pub async fn serve_metrics_and_pages(
    listener: tokio::net::TcpListener,
    transport: &Transport,
    admission: Admission,
    source: Arc<dyn MetricsSource>,
    pages: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), MetricsPortError> {
    let incoming = crate::transport::incoming_http(listener, transport)?;
    let guarded = pages.layer(axum::middleware::from_fn_with_state(
        admission.clone(),
        admit_page,
    ));
    let state = Arc::new(PortState { admission, source });
    let app = axum::Router::new()
        .route(METRICS_PATH, axum::routing::get(scrape))
        .with_state(state)
        .merge(guarded)
        .fallback(not_found);
    axum::serve(
        Accepted { incoming },
        app.into_make_service_with_connect_info::<PeerInfo>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .map_err(MetricsPortError::Serve)
}

struct PortState {
    admission: Admission,
    source: Arc<dyn MetricsSource>,
}

async fn scrape(
    State(state): State<Arc<PortState>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = state
        .admission
        .admit(&peer, headers.get(header::AUTHORIZATION))
        .await
    {
        tracing::info!(
            peer = ?peer.remote_addr,
            status = refusal.status.as_u16(),
            reason = %refusal.message,
            "scrape refused"
        );
        return text(refusal.status, refusal.message);
    }
    match state.source.render().await {
        Ok(body) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response(),
        Err(reason) => {
            tracing::warn!(%reason, "cannot render the metrics");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot render the metrics: {reason}"),
            )
        }
    }
}

/// The admission in front of a server's own pages. A 401 asks a browser
/// for Basic credentials where a token would do.
async fn admit_page(
    State(admission): State<Admission>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = request.uri().path().to_owned();
    match admission
        .admit_to(&peer, request.headers().get(header::AUTHORIZATION), &path)
        .await
    {
        Ok(()) => next.run(request).await,
        Err(refusal) => {
            tracing::info!(
                peer = ?peer.remote_addr,
                %path,
                status = refusal.status.as_u16(),
                reason = %refusal.message,
                "page refused"
            );
            let mut response = text(refusal.status, refusal.message);
            if refusal.status == StatusCode::UNAUTHORIZED && admission.tokens.is_some() {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Basic realm=\"fabric\", charset=\"UTF-8\""),
                );
            }
            response
        }
    }
}

async fn not_found() -> Response {
    text(
        StatusCode::NOT_FOUND,
        format!(
            "not found: this port serves GET {METRICS_PATH} (and, on the coordinator, its status page at /)"
        ),
    )
}

fn text(status: StatusCode, line: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{line}\n"),
    )
        .into_response()
}

/// The accepted connections as axum's listener, each with what its
/// handshake proved.
struct Accepted {
    incoming: Pin<Box<dyn Stream<Item = io::Result<ServerStream>> + Send>>,
}

impl axum::serve::Listener for Accepted {
    type Io = ServerStream;
    type Addr = PeerInfo;

    async fn accept(&mut self) -> (ServerStream, PeerInfo) {
        loop {
            match self.incoming.next().await {
                Some(Ok(stream)) => {
                    let peer = stream.connect_info();
                    return (stream, peer);
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "the metrics port cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<PeerInfo> {
        Ok(PeerInfo::default())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Accepted>>
    for PeerInfo
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, Accepted>) -> Self {
        stream.remote_addr().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Role;

    struct OneToken;

    impl TokenVerifier for OneToken {
        fn verify(
            &self,
            token: String,
        ) -> Pin<Box<dyn Future<Output = Result<Identity, String>> + Send>> {
            Box::pin(async move {
                match token.as_str() {
                    "monitor" => Identity::new(Role::Monitor, "grafana").map_err(|e| e.to_string()),
                    "client" => Identity::new(Role::Client, "web1").map_err(|e| e.to_string()),
                    _ => Err("unknown token".to_owned()),
                }
            })
        }
    }

    fn secure(tokens: bool) -> Admission {
        Admission {
            insecure: false,
            tokens: tokens.then(|| Arc::new(OneToken) as Arc<dyn TokenVerifier>),
        }
    }

    fn bearer(token: &str) -> header::HeaderValue {
        header::HeaderValue::from_str(&format!("Bearer {token}")).expect("a header value")
    }

    #[tokio::test]
    async fn no_credentials_is_401_naming_the_roles() {
        let refusal = secure(true)
            .admit(&PeerInfo::default(), None)
            .await
            .expect_err("refused");
        assert_eq!(refusal.status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            refusal.message,
            "no client certificate or token: /metrics needs role operator or monitor"
        );
    }

    #[tokio::test]
    async fn a_monitor_token_may_scrape_and_a_client_token_is_403() {
        let admission = secure(true);
        let peer = PeerInfo::default();
        assert_eq!(
            admission.admit(&peer, Some(&bearer("monitor"))).await,
            Ok(())
        );
        let refusal = admission
            .admit(&peer, Some(&bearer("client")))
            .await
            .expect_err("refused");
        assert_eq!(refusal.status, StatusCode::FORBIDDEN);
        assert_eq!(
            refusal.message,
            "client/web1 may not read /metrics: it needs role operator or monitor"
        );
        let refusal = admission
            .admit(&peer, Some(&bearer("wrong")))
            .await
            .expect_err("refused");
        assert_eq!(refusal.status, StatusCode::UNAUTHORIZED);
        assert!(!refusal.message.contains("wrong"), "{}", refusal.message);
    }

    #[test]
    fn a_token_comes_as_a_bearer_or_as_the_password_of_basic_credentials() {
        use base64::Engine as _;
        let basic = |text: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(text)
            )
        };
        assert_eq!(token_of("Bearer abc").as_deref(), Some("abc"));
        assert_eq!(token_of(&basic("anyone:abc")).as_deref(), Some("abc"));
        assert_eq!(token_of(&basic(":a:b")).as_deref(), Some("a:b"));
        assert_eq!(token_of(&basic("anyone:")), None, "no password");
        assert_eq!(token_of(&basic("no colon")), None);
        assert_eq!(token_of("Basic not base64!"), None);
        assert_eq!(token_of("Digest x"), None);
    }

    #[tokio::test]
    async fn a_monitor_token_as_basic_credentials_may_read_a_page() {
        use base64::Engine as _;
        let value = header::HeaderValue::from_str(&format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("browser:monitor")
        ))
        .expect("a header value");
        assert_eq!(
            secure(true)
                .admit_to(&PeerInfo::default(), Some(&value), "/")
                .await,
            Ok(())
        );
    }

    #[tokio::test]
    async fn a_server_without_tokens_says_it_takes_certificates() {
        let refusal = secure(false)
            .admit(&PeerInfo::default(), Some(&bearer("monitor")))
            .await
            .expect_err("refused");
        assert_eq!(refusal.status, StatusCode::UNAUTHORIZED);
        assert!(
            refusal.message.contains("not tokens"),
            "{}",
            refusal.message
        );
    }

    #[tokio::test]
    async fn insecure_lets_anyone_scrape() {
        let admission = Admission::for_transport(&Transport::InsecurePlaintext, None);
        assert_eq!(admission.admit(&PeerInfo::default(), None).await, Ok(()));
    }
}
