//! The server as a function: [`serve`] opens the state, serves the
//! coordinator (with health and reflection) on a listener the caller bound,
//! runs the periodic work, and on `shutdown` ends every stream, waits for the
//! connections to close and flushes the state. Tests and embedders call it
//! directly; the binary only parses flags, sets up logging and binds.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fabric_proto::service_names;
use fabric_proto::standard::{StandardServices, StandardServicesError};
use fabric_proto::v1::coordinator_server::CoordinatorServer;
use fabric_trust::{Identity, TokenVerifier};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{ConfigError, CoordinatorConfig, StateKind};
use crate::engine::{Engine, EngineError, Settings};
use crate::etcd::Etcd;
use crate::leader_gate::{LateService, LeaderGate};
use crate::leadership::{Candidate, Leadership};
use crate::service::CoordinatorService;
use crate::state::StateEngine;
use crate::state::etcd::EtcdEngine;
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
    /// This coordinator lost its etcd lease (or etcd refused a write):
    /// another may lead now, so it stopped.
    #[error("this coordinator no longer leads: {0}")]
    LeadershipLost(String),
    /// The TLS settings are unusable.
    #[error(transparent)]
    Tls(#[from] fabric_trust::TlsError),
}

/// How long a graceful shutdown waits for clients to hang up.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How often the engine's periodic work runs: often enough to notice a
/// missed heartbeat within a fraction of an interval, and to start a
/// scheduled run well within a second of its slot.
fn tick_period(heartbeat_interval: Duration) -> Duration {
    (heartbeat_interval / 4).clamp(Duration::from_millis(10), Duration::from_millis(500))
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
///
/// With `state = "etcd"` the server answers health and reflection at once
/// and refuses coordinator calls with the leader's address
/// ([`crate::leader_gate`]) until this process wins the election; then it
/// loads the state and serves like a single coordinator, until it stops or
/// loses its lease, when it returns [`ServeError::LeadershipLost`] without
/// writing anything more.
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
    let advertised = match listener.local_addr() {
        Ok(bound) => config.advertised_address(bound),
        Err(_) => config.advertise_address.clone(),
    };
    let incoming = fabric_trust::transport::incoming(listener, &transport)?;
    let standard =
        StandardServices::new(&[service_names::COORDINATOR], "the fabric coordinator").await?;
    let (stop_sender, stop) = watch::channel(false);
    let (hint_sender, hint) = watch::channel(None);
    let gate = LeaderGate::new(hint, &advertised);
    let coordinator = Arc::new(OnceLock::new());
    let late_tokens = Arc::new(LateTokens::default());
    let routes = standard
        .routes
        .add_service(LateService::new(Arc::clone(&coordinator)));
    let verifier: Arc<dyn fabric_trust::TokenVerifier> = late_tokens.clone();
    let layer = fabric_trust::AuthLayer::for_transport(&transport, Some(verifier.clone()));
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
    // Alive (service ""), not ready (the coordinator's service) until it leads.
    standard.readiness.set_alive_only().await;
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
            .layer(gate.clone())
            .layer(layer)
            .add_routes(routes)
            .serve_with_incoming_shutdown(incoming, signal),
    );

    let acquired = tokio::select! {
        biased;
        // sled opens at once: the server is polled only after it did, so no
        // caller of a single coordinator ever sees it not leading.
        acquired = acquire_state(&config, &advertised, &hint_sender) => acquired?,
        result = &mut server => {
            // Stopped before leading: nothing to flush.
            result?;
            tracing::info!("coordinator stopped before it led");
            return Ok(());
        }
    };
    let Acquired {
        store,
        leadership,
        etcd_engine,
    } = acquired;
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
    // A leader acts only while its lease surely lives; a single coordinator always.
    let may_act: Arc<dyn Fn() -> bool + Send + Sync> = match &leadership {
        Some(leadership) => {
            let clock = leadership.clock.clone();
            Arc::new(move || clock.may_act())
        }
        None => Arc::new(|| true),
    };
    let service = CoordinatorService::new(Arc::clone(&engine), tokens.clone(), stop.clone())
        .with_leadership_check(Arc::clone(&may_act));
    let _ = late_tokens.tokens.set(tokens);
    let _ = coordinator.set(
        CoordinatorServer::new(service)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    gate.open();
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

    let ticker = {
        let engine = Arc::clone(&engine);
        let mut stop = stop.clone();
        let period = tick_period(config.heartbeat_interval);
        let lag = engine.metrics().scheduler_lag_seconds;
        let may_act = Arc::clone(&may_act);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    due = interval.tick() => {
                        if !may_act() {
                            // The lease may be gone: the watchdog stops the
                            // server; until then, start nothing.
                            continue;
                        }
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
    // etcd's writes are queued in memory; most paths flush before they
    // answer, this sends the rest within a moment.
    let flusher = etcd_engine.as_ref().map(|etcd_engine| {
        let etcd_engine = Arc::clone(etcd_engine);
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(ETCD_FLUSH_EVERY);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = interval.tick() => {
                        if let Err(error) = StateEngine::flush(etcd_engine.as_ref()).await {
                            tracing::warn!(%error, "cannot write the state to etcd");
                        }
                    }
                    _ = crate::service::stopped(&mut stop) => break,
                }
            }
        })
    });

    standard.readiness.set_serving().await;
    tracing::info!(
        state = ?config.state,
        data_dir = %config.data_dir.display(),
        tls = transport.is_tls(),
        identity = %transport.identity().map(ToString::to_string).unwrap_or_default(),
        "coordinator ready"
    );
    let lost = async {
        match (&leadership, &etcd_engine) {
            (Some(leadership), Some(etcd_engine)) => {
                let mut deposed = etcd_engine.deposed();
                tokio::select! {
                    reason = leadership.lost() => reason,
                    _ = deposed.wait_for(|deposed| *deposed) => {
                        "etcd refused a write: the leader key is gone".to_owned()
                    }
                }
            }
            _ => std::future::pending().await,
        }
    };
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
        reason = lost => {
            // Another coordinator may lead already: stop acting at once,
            // write nothing, and let the caller end the process.
            gate.close();
            ticker.abort();
            if let Some(flusher) = &flusher {
                flusher.abort();
            }
            tracing::error!(%reason, "this coordinator no longer leads; stopping");
            return Err(ServeError::LeadershipLost(reason));
        }
    };
    drop(server);
    let _ = ticker.await;
    if let Some(flusher) = flusher {
        let _ = flusher.await;
    }
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
    if let Some(leadership) = leadership {
        leadership.resign().await;
    }
    served?;
    tracing::info!("coordinator stopped");
    Ok(())
}

/// How often queued etcd writes are sent when nothing flushed them.
const ETCD_FLUSH_EVERY: Duration = Duration::from_millis(100);

/// The state, once this process may use it.
struct Acquired {
    store: Store,
    leadership: Option<Leadership>,
    etcd_engine: Option<Arc<EtcdEngine>>,
}

/// Opens sled at once, or campaigns in etcd until this process leads and
/// then loads the state under its fence.
async fn acquire_state(
    config: &CoordinatorConfig,
    advertised: &str,
    hint: &watch::Sender<Option<String>>,
) -> Result<Acquired, ServeError> {
    match config.state {
        StateKind::Sled => {
            std::fs::create_dir_all(&config.data_dir).map_err(|source| ServeError::DataDir {
                path: config.data_dir.clone(),
                source,
            })?;
            Ok(Acquired {
                store: Store::open(&config.data_dir)?,
                leadership: None,
                etcd_engine: None,
            })
        }
        StateKind::Etcd => {
            let tls = config.etcd_tls()?;
            let etcd =
                Etcd::connect(&config.etcd_endpoints, tls.as_ref()).map_err(StateError::from)?;
            let candidate = Candidate::new(
                etcd.clone(),
                &config.etcd_prefix,
                advertised,
                config.leader_lease,
            );
            tracing::info!(endpoints = ?config.etcd_endpoints, advertise = %advertised, "campaigning for leadership");
            let leadership = loop {
                match candidate.campaign(hint).await {
                    Ok(leadership) => break leadership,
                    Err(error) => {
                        tracing::warn!(%error, "campaign failed; trying again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            };
            tracing::info!("this coordinator leads; loading the state from etcd");
            let etcd_engine = tokio::select! {
                loaded = EtcdEngine::load(etcd, &config.etcd_prefix, Some(leadership.fence.clone())) => loaded?,
                reason = leadership.lost() => return Err(ServeError::LeadershipLost(reason)),
            };
            tracing::info!(keys = etcd_engine.key_count(), "state loaded");
            Ok(Acquired {
                store: Store::new(etcd_engine.clone()),
                leadership: Some(leadership),
                etcd_engine: Some(etcd_engine),
            })
        }
    }
}

/// The token verifier of a coordinator that may not lead yet.
#[derive(Debug, Default)]
struct LateTokens {
    tokens: OnceLock<Tokens>,
}

impl TokenVerifier for LateTokens {
    fn verify(
        &self,
        token: String,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Identity, String>> + Send>> {
        match self.tokens.get() {
            Some(tokens) => tokens.verify(token),
            None => Box::pin(async { Err("the coordinator is not serving yet".to_owned()) }),
        }
    }
}
