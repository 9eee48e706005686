//! The server as a function: [`serve`] opens the state, serves the
//! coordinator (with health and reflection) on a listener the caller bound,
//! runs the periodic work, and on `shutdown` ends every stream, waits for the
//! connections to close and flushes the state. Tests and embedders call it
//! directly; the binary only parses flags, sets up logging and binds.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fabric_proto::service_names;
use fabric_proto::standard::{StandardServices, StandardServicesError};
use fabric_proto::v1::coordinator_server::CoordinatorServer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{ConfigError, CoordinatorConfig};
use crate::engine::{Engine, EngineError, Settings};
use crate::service::CoordinatorService;
use crate::state::{StateError, Store};
use crate::tokens::Tokens;

/// Largest message the coordinator sends or accepts: a jobs file, a long
/// run history, a large catalogue.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024 * 1024;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data directory could not be created.
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The state database failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The state could not be flushed at shutdown.
    #[error("cannot flush the state at shutdown: {0}")]
    Flush(#[from] EngineError),
    /// Health or reflection could not be built.
    #[error(transparent)]
    Standard(#[from] StandardServicesError),
    /// The gRPC server failed.
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The TLS settings are unusable.
    #[error(transparent)]
    Tls(#[from] fabric_trust::TlsError),
}

/// How long a graceful shutdown waits for clients to hang up.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How often the engine's periodic work runs: often enough to notice a
/// missed heartbeat within a fraction of an interval.
fn tick_period(heartbeat_interval: Duration) -> Duration {
    (heartbeat_interval / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Serves the coordinator on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve_with_health(listener, None, config, shutdown).await
}

/// Serves the coordinator on `listener`, and grpc.health.v1 alone in
/// plaintext on `health` (for probes), until `shutdown` completes.
pub async fn serve_with_health(
    listener: TcpListener,
    health: Option<TcpListener>,
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve_with_ports(listener, health, None, config, shutdown).await
}

/// [`serve_with_health`], and on `metrics` `GET /metrics` and the status
/// page (`/`, [`crate::status_page`]), both for roles operator and monitor,
/// by certificate or token.
pub async fn serve_with_ports(
    listener: TcpListener,
    health: Option<TcpListener>,
    metrics: Option<TcpListener>,
    config: CoordinatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    config.validate()?;
    let transport = config
        .transport_settings()
        .server(&fabric_trust::Expect::Coordinator)?;
    let incoming = fabric_trust::transport::incoming(listener, &transport)?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServeError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let standard =
        StandardServices::new(&[service_names::COORDINATOR], "the fabric coordinator").await?;
    let store = Store::open(&config.data_dir)?;
    let engine = Arc::new(Engine::open(
        store,
        Settings {
            heartbeat_interval: config.heartbeat_interval,
            lost_after: config.lost_after(),
            queue_timeout: config.queue_timeout,
            worker_limit: config.worker_limit,
            node_worker_limit: config.node_worker_limit,
            gc: config.gc_settings()?,
            replication: config.replication_settings(),
        },
    )?);
    let tokens = Tokens::new(engine.state());
    let (stop_sender, stop) = watch::channel(false);
    let service = CoordinatorService::new(Arc::clone(&engine), tokens.clone(), stop.clone());
    let routes = standard.routes.add_service(
        CoordinatorServer::new(service)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    let verifier: Arc<dyn fabric_trust::TokenVerifier> = Arc::new(tokens);
    let layer = fabric_trust::AuthLayer::for_transport(&transport, Some(verifier.clone()));
    if let Some(listener) = metrics {
        let source = Arc::new(crate::metrics::CoordinatorMetricsSource::new(
            Arc::clone(&engine),
            &engine.metrics(),
        ));
        let admission =
            fabric_trust::metrics_port::Admission::for_transport(&transport, Some(verifier));
        let transport = transport.clone();
        let status_engine = Arc::clone(&engine);
        let mut stopping = stop.clone();
        tokio::spawn(async move {
            let stopped = async move { crate::service::stopped(&mut stopping).await };
            if let Err(error) = fabric_trust::metrics_port::serve_metrics_and_pages(
                listener,
                &transport,
                admission,
                source,
                crate::status_page::routes(status_engine),
                stopped,
            )
            .await
            {
                tracing::error!(%error, "the metrics port failed");
            }
        });
    }
    if let Some(health) = health {
        let readiness = standard.readiness.clone();
        let mut stopping = stop.clone();
        tokio::spawn(async move {
            let stopped = async move { crate::service::stopped(&mut stopping).await };
            if let Err(error) = readiness.serve_plaintext_health(health, stopped).await {
                tracing::error!(%error, "the health port failed");
            }
        });
    }

    let ticker = {
        let engine = Arc::clone(&engine);
        let mut stop = stop.clone();
        let period = tick_period(config.heartbeat_interval);
        let lag = engine.metrics().scheduler_lag_seconds;
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    due = interval.tick() => {
                        if let Err(error) = engine.tick().await {
                            tracing::error!(%error, "periodic work failed");
                        }
                        lag.set(due.elapsed().as_secs_f64());
                    }
                    _ = crate::service::stopped(&mut stop) => break,
                }
            }
        })
    };

    standard.readiness.set_serving().await;
    tracing::info!(
        data_dir = %config.data_dir.display(),
        tls = transport.is_tls(),
        identity = %transport.identity().map(ToString::to_string).unwrap_or_default(),
        "coordinator ready"
    );
    let readiness = standard.readiness.clone();
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down");
        readiness.set_not_serving().await;
        // Ends the sessions and watches so the graceful shutdown can finish.
        let _ = stop_sender.send(true);
    };
    let mut server = Box::pin(
        tonic::transport::Server::builder()
            .layer(layer)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, signal),
    );
    let mut stopping = stop.clone();
    let served = tokio::select! {
        result = &mut server => result,
        _ = async {
            crate::service::stopped(&mut stopping).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "clients still connected after the grace period; closing them");
            Ok(())
        }
    };
    drop(server);
    let _ = ticker.await;
    // Session readers hold the engine until they see the stop; sled keeps
    // its lock until the last holder is gone, and a restart in the same
    // process needs it.
    for _ in 0..500 {
        if Arc::strong_count(&engine) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    engine.flush().await?;
    served?;
    tracing::info!("coordinator stopped");
    Ok(())
}
