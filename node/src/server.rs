//! `serve`: the node as a function of a listener, a config and a shutdown
//! signal, so the binary, the tests and the embedded fabric all start it the
//! same way (mini-redis' pattern).
//!
//! Order: open the store (health NOT_SERVING meanwhile, the node's
//! [`NodeHealth`] saying why), serve, flip health to SERVING, watch free
//! space (NOT_SERVING and uploads refused under the configured minimum, or
//! for good once the store refuses writes after a failed fsync, the
//! reasons in the shared health that uploads, `Stats` and heartbeats
//! report), and, when a coordinator is configured, keep a session
//! with it. On shutdown: first the session ends the runs in progress (their
//! scripts' process groups get SIGTERM, then SIGKILL after a grace) and
//! reports them failed, naming the signal; then stop accepting, let
//! in-flight calls finish; an upload cut short leaves no snapshot (the
//! commit is the last step).
//!
//! Every call passes the authorization layer (`fabric_trust::AuthLayer`)
//! over TLS with the node's certificate, which must be for its `node_id`;
//! plaintext only with `insecure_plaintext`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fabric_chunkstore::{Store, StoreConfig};
use fabric_proto::service_names;
use fabric_proto::standard::StandardServices;
use fabric_proto::v1::source_server::SourceServer;
use fabric_proto::v1::storage_server::StorageServer;
use tokio::net::TcpListener;

use crate::commands::CommandPolicy;
use crate::config::{NodeConfig, Role};
use crate::health::{Measured, NodeHealth, SharedHealth};
use crate::pull_permits::PullPermits;
use crate::source_service::SourceService;
use crate::storage_service::StorageService;
use crate::transfer::MAX_MESSAGE_BYTES;

/// Why a node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The chunk store could not be opened.
    #[error("cannot open the chunk store at {path}: {source}")]
    Store {
        /// The data dir.
        path: std::path::PathBuf,
        /// Why.
        source: fabric_chunkstore::StoreError,
    },
    /// The data dir could not be created.
    #[error("cannot create the data dir {path}: {source}")]
    DataDir {
        /// The data dir.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Health or reflection could not be built.
    #[error(transparent)]
    Standard(#[from] fabric_proto::standard::StandardServicesError),
    /// The listener failed.
    #[error("cannot serve on {address}: {source}")]
    Transport {
        /// The listen address.
        address: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// `backup_memory_bytes` is too small to back up in.
    #[error("backup_memory_bytes: {0}")]
    BackupMemory(#[from] crate::memory_budget::BudgetTooSmall),
    /// A task panicked.
    #[error("internal error: {0}")]
    Internal(String),
    /// The listener has no local address.
    #[error("cannot read the listener's address: {0}")]
    Listener(std::io::Error),
    /// The TLS settings are unusable.
    #[error(transparent)]
    Tls(#[from] fabric_trust::TlsError),
    /// `allow_commands` or `hooks` is unusable.
    #[error("bad allow_commands: {0}")]
    Commands(String),
    /// `coordinator` is not a list of addresses.
    #[error(
        "bad coordinator (config key `coordinator`, --coordinator, FABRIC_NODE_COORDINATOR): {0}"
    )]
    Coordinator(#[from] fabric_proto::coordinator_addresses::AddressListError),
}

/// Run a node on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve_with_health(listener, None, config, shutdown).await
}

/// Calls one connection may have open at once.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// How often a node pings a connection that sends nothing.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is dropped.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Run a node on `listener`, and grpc.health.v1 alone in plaintext on
/// `health` (for probes), until `shutdown` resolves.
pub async fn serve_with_health(
    listener: TcpListener,
    health: Option<TcpListener>,
    config: NodeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let ports = SidePorts {
        health,
        metrics: None,
    };
    serve_until_stopped(listener, ports, config, async move {
        shutdown.await;
        String::new()
    })
    .await
}

/// The ports a node serves beside its main one, each bound by the caller
/// (`None`: not served).
#[derive(Debug, Default)]
pub struct SidePorts {
    /// grpc.health.v1 alone, in plaintext, for probes (`health_listen`).
    pub health: Option<TcpListener>,
    /// `GET /metrics` on the node's transport (`metrics_listen`).
    pub metrics: Option<TcpListener>,
}

/// How long a stopping node waits for its runs to be ended and reported
/// (the scripts' grace, then the session's close) before it stops serving.
const STOP_RUNS_WAIT: Duration = Duration::from_secs(12);

/// [`serve_with_health`] with a `shutdown` that says what stopped the node
/// (`SIGTERM`, `SIGINT`; empty when unsaid). Before the node stops serving,
/// the runs it is doing are ended (their scripts' process groups get
/// SIGTERM, then SIGKILL after a grace) and reported failed to the
/// coordinator with that cause.
pub async fn serve_until_stopped(
    listener: TcpListener,
    ports: SidePorts,
    config: NodeConfig,
    shutdown: impl Future<Output = String> + Send + 'static,
) -> Result<(), ServeError> {
    let local_addr = listener.local_addr().map_err(ServeError::Listener)?;
    let config = config.complete(local_addr);
    let coordinators = config.coordinators()?;
    let transport = config
        .transport_settings()
        .server(&fabric_trust::Expect::Node(config.node_id.clone()))?;
    let commands = Arc::new(
        CommandPolicy::new(&config.node_id, &config.allow_commands, &config.hooks)
            .map_err(ServeError::Commands)?,
    );
    let permits = PullPermits::default();
    // A budget too small for any backup fails the start, not each backup.
    let backup_plan = crate::memory_budget::SendPlan::for_this_machine(config.backup_memory_bytes)?;
    // One bucket each, shared by every transfer they govern.
    let upload_limit = crate::rate_limit::RateLimit::new(config.upload_limit_bytes_per_s);
    let ingest_limit = crate::rate_limit::RateLimit::new(config.ingest_limit_bytes_per_s);
    let incoming = fabric_trust::transport::incoming(listener, &transport)?;
    let mut names = Vec::new();
    if config.has_role(Role::Storage) {
        names.push(service_names::STORAGE);
    }
    if config.has_role(Role::Agent) {
        names.push(service_names::SOURCE);
    }
    let server = if config.has_role(Role::Storage) {
        "a fabric storage node"
    } else {
        "a fabric client agent"
    };
    let standard = StandardServices::new(&names, server).await?;
    let readiness = standard.readiness.clone();
    let mut routes = standard.routes;
    let metrics = crate::metrics::NodeMetrics::default();
    // Refusing writes until the store is open and its free space measured;
    // readiness, NOT_SERVING from the start, follows it.
    let health_now = SharedHealth::new(NodeHealth::opening());

    let mut store = None;
    if config.has_role(Role::Storage) {
        let dir = config.data_dir.clone();
        let opened = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|source| ServeError::DataDir {
                path: dir.clone(),
                source,
            })?;
            Store::open_or_create(&dir, StoreConfig::default()).map_err(|source| {
                ServeError::Store {
                    path: dir.clone(),
                    source,
                }
            })
        })
        .await
        .map_err(|err| ServeError::Internal(err.to_string()))??;
        let opened = Arc::new(opened);
        let service = StorageService::new(
            opened.clone(),
            crate::storage_service::StorageSettings {
                memory_bytes: config.upload_memory_bytes,
                memory_per_upload_bytes: config.memory_per_upload_bytes,
                idle_timeout: Duration::from_secs(config.transfer_idle_timeout_s.max(1)),
                guards: config.commit_guards(),
                ingest_limit: ingest_limit.clone(),
                quotas: Arc::new(config.host_quotas()),
                gc_grace: Duration::from_secs(config.gc_grace_s),
            },
            health_now.clone(),
            transport.clone(),
            coordinators.clone(),
        )
        .with_metrics(metrics.clone());
        routes = routes.add_service(
            StorageServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        );
        store = Some(opened);
    }
    if config.has_role(Role::Agent) {
        routes = routes.add_service(
            SourceServer::new(SourceService::new(
                config.hostname.clone(),
                permits.clone(),
                upload_limit.clone(),
                backup_plan,
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        );
    }

    tracing::info!(
        node = %config.node_id,
        listen = %local_addr,
        advertise = %config.advertise,
        data_dir = %config.data_dir.display(),
        tls = transport.is_tls(),
        "fabric-node serving"
    );
    // Ready only if the store can take writes; the watcher below flips
    // health whenever that changes.
    match &store {
        Some(store) => {
            refresh_health(store, config.min_free_bytes, &health_now, &readiness).await;
        }
        None => {
            health_now.update(|_| NodeHealth::accepting());
            readiness.set_serving().await;
        }
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if let Some(store) = store.clone() {
        tokio::spawn(watch_health(
            store,
            config.min_free_bytes,
            health_now.clone(),
            readiness.clone(),
            stop_rx.clone(),
        ));
    }
    let scrub = match &store {
        Some(store) if config.scrub_bytes_per_s > 0 => {
            let scrub = crate::scrub::Scrub::load(&config.data_dir);
            tokio::spawn(crate::scrub::run(
                store.clone(),
                scrub.clone(),
                config.scrub_bytes_per_s,
                stop_rx.clone(),
            ));
            Some(scrub)
        }
        _ => None,
    };
    let stopping = crate::session::Stopping::default();
    let has_session = coordinators.is_some();
    let shutdown = {
        let stopping = stopping.clone();
        async move {
            let cause = shutdown.await;
            // Runs come only through the session; without one there is
            // nothing to end.
            if has_session {
                stopping.stop(&cause, STOP_RUNS_WAIT).await;
            }
        }
    };
    if let Some(coordinators) = coordinators {
        tokio::spawn(crate::session::run_session(
            config.clone(),
            store.clone(),
            crate::session::SessionParts {
                coordinators,
                transport: transport.clone(),
                commands,
                permits,
                upload_limit: upload_limit.clone(),
                ingest_limit: ingest_limit.clone(),
                scrub: scrub.clone(),
                stopping,
                metrics: metrics.clone(),
                health: health_now.clone(),
                backup_plan,
            },
            stop_rx.clone(),
        ));
    }
    if let Some(listener) = ports.metrics {
        let registry =
            metrics.register(config.has_role(Role::Storage), config.has_role(Role::Agent));
        let source = Arc::new(crate::metrics::NodeMetricsSource::new(
            registry,
            metrics.clone(),
            store.clone(),
            scrub.clone(),
        ));
        // Nodes take certificates only, on the metrics port as on the main one.
        let admission = fabric_trust::metrics_port::Admission::for_transport(&transport, None);
        let transport = transport.clone();
        let mut stopping = stop_rx.clone();
        tokio::spawn(async move {
            let stopped = async move {
                let _ = stopping.wait_for(|stopped| *stopped).await;
            };
            if let Err(error) = fabric_trust::metrics_port::serve_metrics(
                listener, &transport, admission, source, stopped,
            )
            .await
            {
                tracing::error!(%error, "the metrics port failed");
            }
        });
    }
    if let Some(health) = ports.health {
        let readiness = readiness.clone();
        let mut stopping = stop_rx.clone();
        tokio::spawn(async move {
            let stopped = async move {
                let _ = stopping.wait_for(|stopped| *stopped).await;
            };
            if let Err(error) = readiness.serve_plaintext_health(health, stopped).await {
                tracing::error!(%error, "the health port failed");
            }
        });
    }

    let address = local_addr.to_string();
    let result = tonic::transport::Server::builder()
        .initial_stream_window_size(crate::client::STREAM_WINDOW_BYTES)
        .initial_connection_window_size(crate::client::CONNECTION_WINDOW_BYTES)
        .max_frame_size(crate::client::MAX_FRAME_BYTES)
        // One connection cannot open calls without bound, and a peer that
        // went away without closing its connection is found and dropped
        // (its streams, and what they hold, with it).
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .layer(fabric_trust::AuthLayer::for_transport(&transport, None))
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = stop_tx.send(true);
    readiness.set_not_serving().await;
    if let Some(store) = store {
        let flushed = tokio::task::spawn_blocking(move || {
            fabric_chunkstore::ChunkSink::flush(store.as_ref())
        })
        .await;
        if let Ok(Err(err)) = flushed {
            tracing::warn!(error = %err, "flushing the store at shutdown failed");
        }
    }
    tracing::info!(node = %config.node_id, "fabric-node stopped");
    result.map_err(|source| ServeError::Transport { address, source })
}

/// Every few seconds, [`refresh_health`]: NOT_SERVING and uploads refused
/// while the store's file system has less than `min_free` bytes free (or
/// its free space cannot be read), back to SERVING when it has; for good
/// once the store refuses writes (a pack fsync failed: only a restart,
/// whose open re-reads the packs, brings it back).
async fn watch_health(
    store: Arc<Store>,
    min_free: u64,
    health_now: SharedHealth,
    readiness: fabric_proto::standard::Readiness,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        refresh_health(&store, min_free, &health_now, &readiness).await;
    }
}

/// Measure the store's free space and failed-write latch, update the
/// node's health, and flip readiness (logging why) when whether it refuses
/// writes changed.
async fn refresh_health(
    store: &Arc<Store>,
    min_free: u64,
    health_now: &SharedHealth,
    readiness: &fabric_proto::standard::Readiness,
) {
    let dir = store.dir().to_owned();
    let free_bytes = match tokio::task::spawn_blocking(move || crate::disk::space(&dir)).await {
        Ok(Ok((_, free))) => Ok(free),
        Ok(Err(err)) => Err(err.to_string()),
        Err(err) => Err(format!("the free-space check failed: {err}")),
    };
    let measured = Measured {
        free_bytes,
        min_free_bytes: min_free,
        write_failure: store.write_failure().map(str::to_owned),
    };
    let (before, after) = health_now.update(|now| now.assess(&measured));
    if after.refuses_writes() && !after.same_kinds_as(&before) {
        let why = after.summary();
        if after
            .reasons()
            .iter()
            .any(|reason| matches!(reason, crate::health::HealthReason::WriteFailed { .. }))
        {
            tracing::error!("refusing writes: {why}");
        } else {
            tracing::warn!("refusing writes: {why}");
        }
    }
    if before.refuses_writes() != after.refuses_writes() {
        if after.refuses_writes() {
            readiness.set_not_serving().await;
        } else {
            if !before.same_kinds_as(&NodeHealth::opening()) {
                tracing::info!("accepting writes again");
            }
            readiness.set_serving().await;
        }
    }
}
