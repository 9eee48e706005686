//! The standard services every fabric server exposes beside its own:
//! grpc.health.v1 (so Kubernetes' `grpc` probes and any health checker work)
//! and server reflection in both v1 and v1alpha (so grpcurl and other tools
//! can discover the API; grpcurl 1.8 and Python's client speak only v1alpha).
//!
//! tonic-health reports the empty service name as SERVING from the start; a
//! fabric server must not claim that before it is ready, so
//! [`StandardServices::new`] flips it to NOT_SERVING and leaves it to the
//! server to call [`Readiness::set_serving`] once its store or state is open.
//!
//! Also the two things every fabric binary does the same way around its
//! server: logging ([`init_logging`]) and shutdown signals
//! ([`shutdown_signal`]).

use tonic::service::Routes;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// Why the standard services could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StandardServicesError {
    /// A descriptor set could not be decoded by the reflection builder.
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// The readiness a server reports through grpc.health.v1: for the whole
/// server (the empty service name) and for each of its own services.
#[derive(Clone)]
pub struct Readiness {
    reporter: HealthReporter,
    services: Vec<&'static str>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field("services", &self.services)
            .finish()
    }
}

impl Readiness {
    /// Report SERVING for the server and each of its services.
    pub async fn set_serving(&self) {
        self.set(ServingStatus::Serving).await;
    }

    /// Report SERVING for the server (service `""`: the process is alive)
    /// and NOT_SERVING for each of its services (not ready): a coordinator
    /// that does not lead.
    pub async fn set_alive_only(&self) {
        self.reporter
            .set_service_status("", ServingStatus::Serving)
            .await;
        for service in &self.services {
            self.reporter
                .set_service_status(*service, ServingStatus::NotServing)
                .await;
        }
    }

    /// Report NOT_SERVING for the server and each of its services.
    pub async fn set_not_serving(&self) {
        self.set(ServingStatus::NotServing).await;
    }

    /// Serve grpc.health.v1 alone, in plaintext, on `listener` until
    /// `shutdown`: for probes that cannot present a client certificate
    /// (Kubernetes' `grpc` probes). It shares this readiness; it serves no
    /// other service, so it gives nothing away.
    pub async fn serve_plaintext_health(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), tonic::transport::Error> {
        let health = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(self.reporter.clone()),
        );
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming_shutdown(incoming(listener), shutdown)
            .await
    }

    async fn set(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
        for service in &self.services {
            self.reporter.set_service_status(*service, status).await;
        }
    }
}

/// Health and reflection, ready to be served beside a server's own services.
pub struct StandardServices {
    /// Add the server's own services to these routes, then serve them.
    pub routes: Routes,
    /// Flip to SERVING when the server is ready.
    pub readiness: Readiness,
}

impl std::fmt::Debug for StandardServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandardServices")
            .field("readiness", &self.readiness)
            .finish_non_exhaustive()
    }
}

impl StandardServices {
    /// Build health (everything NOT_SERVING until the server says otherwise)
    /// and reflection (v1 and v1alpha) for a server that will serve
    /// `services` (fully qualified names, see [`crate::service_names`]).
    ///
    /// Reflection advertises only those services (and health); a call of
    /// any other service is answered UNIMPLEMENTED with a message saying
    /// what this server is (`server`, e.g. "a fabric storage node"), so a
    /// client pointed at the wrong address learns why.
    pub async fn new(
        services: &[&'static str],
        server: &'static str,
    ) -> Result<Self, StandardServicesError> {
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let readiness = Readiness {
            reporter,
            services: services.to_vec(),
        };
        readiness.set_not_serving().await;

        let configure = || {
            services.iter().chain([&HEALTH_SERVICE]).fold(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(crate::FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
                |builder, name| builder.with_service_name(*name),
            )
        };
        let reflection_v1 = configure().build_v1()?;
        let reflection_v1alpha = configure().build_v1alpha()?;

        let served = services.join(", ");
        let routes = Routes::new(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .into_axum_router()
            .fallback(move |uri: tonic::codegen::http::Uri| {
                let message = unknown_call_message(server, &served, uri.path());
                async move {
                    let (parts, ()) = tonic::Status::unimplemented(message)
                        .into_http::<()>()
                        .into_parts();
                    tonic::codegen::http::Response::from_parts(parts, tonic::body::Body::empty())
                }
            });
        Ok(Self {
            routes: Routes::from(routes),
            readiness,
        })
    }
}

/// grpc.health.v1's service name.
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// What a server answers a call of a service it does not serve.
fn unknown_call_message(server: &str, served: &str, path: &str) -> String {
    let service = path
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or_default();
    let mut message = format!("this is {server}, which does not serve {service}");
    if !served.is_empty() {
        message.push_str(&format!(" (it serves {served})"));
    }
    if service == crate::service_names::COORDINATOR {
        message.push_str(": give the coordinator's address instead");
    }
    message
}

/// Log to stderr, as human-readable lines or (with `json`) one JSON object
/// per line; `RUST_LOG` filters (default `info`).
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// A future that resolves on SIGTERM or SIGINT. The handlers are installed
/// before this returns, so a binary that calls it before announcing its
/// address loses no signal sent right after start-up (which would otherwise
/// kill it with the default action instead of a clean shutdown).
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static>
{
    let named = shutdown_signal_named()?;
    Ok(async move {
        named.await;
    })
}

/// [`shutdown_signal`], resolving to the signal's name (`SIGTERM` or
/// `SIGINT`), for a server that says why it stopped.
pub fn shutdown_signal_named()
-> std::io::Result<impl std::future::Future<Output = &'static str> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {
                tracing::info!("SIGTERM: shutting down");
                "SIGTERM"
            }
            _ = interrupt.recv() => {
                tracing::info!("interrupted: shutting down");
                "SIGINT"
            }
        }
    })
}

/// Bind the plaintext health port `address` (`""`: none) and print
/// `<binary> health listening on <address>` on stdout, after the main line.
pub async fn bind_health(
    binary: &str,
    address: &str,
) -> std::io::Result<Option<tokio::net::TcpListener>> {
    if address.trim().is_empty() {
        return Ok(None);
    }
    let address: std::net::SocketAddr = address.trim().parse().map_err(|err| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("health_listen {address:?} is not an address like 0.0.0.0:7420: {err}"),
        )
    })?;
    let listener = tokio::net::TcpListener::bind(address).await?;
    println!("{binary} health listening on {}", listener.local_addr()?);
    Ok(Some(listener))
}

/// Bind the metrics port `address` (`""`: none) and print `<binary>
/// metrics listening on <address>` on stdout, after the main line (and the
/// health line, if any).
pub async fn bind_metrics(
    binary: &str,
    address: &str,
) -> std::io::Result<Option<tokio::net::TcpListener>> {
    if address.trim().is_empty() {
        return Ok(None);
    }
    let address: std::net::SocketAddr = address.trim().parse().map_err(|err| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("metrics_listen {address:?} is not an address like 0.0.0.0:7410: {err}"),
        )
    })?;
    let listener = tokio::net::TcpListener::bind(address).await?;
    println!("{binary} metrics listening on {}", listener.local_addr()?);
    Ok(Some(listener))
}

/// Bind `address` and print the one line on stdout that scripts and tests
/// read to find an OS-chosen port: `<binary> listening on <address>`.
pub async fn bind_and_announce(
    binary: &str,
    address: std::net::SocketAddr,
) -> std::io::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    println!("{binary} listening on {}", listener.local_addr()?);
    Ok(listener)
}

/// The connections `listener` accepts, for `serve_with_incoming*`, with
/// `TCP_NODELAY` set. Tonic sets it only on sockets it binds itself; without
/// it a small message (an offer's reply, a tree, a commit) written after
/// another waits for the peer's delayed ACK, up to 40 ms a round trip.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}
