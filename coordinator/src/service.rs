//! The `fabric.v1.Coordinator` gRPC service: turns requests into engine
//! calls and engine errors into gRPC statuses (in [`status_of`], the one
//! place that mapping lives). It holds no state of its own beyond the
//! engine and the shutdown signal that ends its long-lived streams.

use std::pin::Pin;
use std::sync::Arc;

use fabric_proto::v1::coordinator_server::Coordinator;
use fabric_proto::v1::{
    CancelRunRequest, CheckRequest, CheckResponse, CollectGarbageRequest, CollectGarbageResponse,
    CoordinatorMessage, CreateTokenRequest, CreateTokenResponse, DrainNodeRequest, ForgetRequest,
    ForgetResponse, GetJobRequest, GetRunRequest, Job, ListCatalogRequest, ListCatalogResponse,
    ListJobsRequest, ListJobsResponse, ListNodesRequest, ListNodesResponse, ListRunsRequest,
    ListRunsResponse, ListTokensRequest, ListTokensResponse, Node, NodeInfo, NodeMessage,
    RegisterNodeResponse, ResetSyncRequest, ResetSyncResponse, RetryRunRequest, RevokeTokenRequest,
    Run, RunDetail, RunEvent, SubmitJobsRequest, SubmitJobsResponse, TokenInfo, WatchRunRequest,
    node_message,
};
use fabric_trust::Caller;
use futures::Stream;
use futures::StreamExt;
use tokio::sync::{broadcast, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::engine::{Engine, EngineError};
use crate::record::is_final;
use crate::tokens::Tokens;

/// The one mapping from engine errors to gRPC statuses.
pub fn status_of(error: EngineError) -> Status {
    match error {
        EngineError::State(error) => Status::internal(error.to_string()),
        EngineError::NotFound(message) => Status::not_found(message),
        EngineError::InvalidArgument(message) => Status::invalid_argument(message),
        EngineError::FailedPrecondition(message) => Status::failed_precondition(message),
        EngineError::Ambiguous(error) => Status::invalid_argument(error.to_string()),
        EngineError::PermissionDenied(message) => Status::permission_denied(message),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The coordinator service.
#[derive(Clone)]
pub struct CoordinatorService {
    engine: Arc<Engine>,
    tokens: Tokens,
    shutdown: watch::Receiver<bool>,
    may_act: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl std::fmt::Debug for CoordinatorService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorService").finish_non_exhaustive()
    }
}

impl CoordinatorService {
    /// A service over `engine` and `tokens`; its streams end when `shutdown`
    /// turns true. Who may call each RPC is `fabric_trust::authz::TABLE`'s
    /// business (the layer in front of this service); this service checks
    /// only what depends on the caller's name.
    pub fn new(engine: Arc<Engine>, tokens: Tokens, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            engine,
            tokens,
            shutdown,
            may_act: Arc::new(|| true),
        }
    }

    /// Sends nothing down a session once `may_act` says this process may no
    /// longer lead (its etcd lease may have expired): the session ends
    /// instead, and the node goes to the leader.
    pub fn with_leadership_check(mut self, may_act: Arc<dyn Fn() -> bool + Send + Sync>) -> Self {
        self.may_act = may_act;
        self
    }
}

async fn shut_down(mut shutdown: watch::Receiver<bool>) {
    stopped(&mut shutdown).await;
}

/// Completes once the server is stopping.
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // An error means the sender is gone: the server is stopping too.
    let _ = shutdown.wait_for(|stopping| *stopping).await;
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register_node(
        &self,
        request: Request<NodeInfo>,
    ) -> Result<Response<RegisterNodeResponse>, Status> {
        let caller = Caller::of(&request);
        let info = request.into_inner();
        caller.check_node(&info.id)?;
        tracing::info!(node = %info.id, address = %info.address, "node registered");
        self.engine.register_node(info).await.map_err(status_of)?;
        let interval = self.engine.settings().heartbeat_interval;
        Ok(Response::new(RegisterNodeResponse {
            heartbeat_interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
        }))
    }

    type SessionStream = BoxStream<CoordinatorMessage>;

    async fn session(
        &self,
        request: Request<Streaming<NodeMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let caller = Caller::of(&request);
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(NodeMessage {
                kind: Some(node_message::Kind::Hello(hello)),
            }) => hello,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a session must be hello",
                ));
            }
        };
        caller.check_node(&hello.id)?;
        let node_id = hello.id.clone();
        let (generation, outbound) = self.engine.open_session(hello).await.map_err(status_of)?;

        let engine = Arc::clone(&self.engine);
        let mut stop = self.shutdown.clone();
        let reader_node = node_id.clone();
        tokio::spawn(async move {
            let ended_by_node = loop {
                let message = tokio::select! {
                    message = inbound.message() => message,
                    _ = crate::service::stopped(&mut stop) => break false,
                };
                match message {
                    Ok(Some(message)) => {
                        if let Err(error) = engine.session_message(&reader_node, message).await {
                            tracing::warn!(node = %reader_node, %error, "session message refused");
                        }
                    }
                    Ok(None) => break true,
                    Err(status) => {
                        tracing::info!(node = %reader_node, %status, "session stream broke");
                        break false;
                    }
                }
            };
            engine
                .session_closed(&reader_node, generation, ended_by_node)
                .await;
        });

        let may_act = Arc::clone(&self.may_act);
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(outbound)
            .take_while(move |_| futures::future::ready(may_act()))
            .map(Ok)
            .take_until(shut_down(self.shutdown.clone()));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn submit_jobs(
        &self,
        request: Request<SubmitJobsRequest>,
    ) -> Result<Response<SubmitJobsResponse>, Status> {
        let by = Caller::of(&request).record();
        self.engine
            .submit_jobs(request.into_inner(), &by)
            .await
            .map(Response::new)
            .map_err(status_of)
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        self.engine
            .job(&request.into_inner().name)
            .await
            .map(Response::new)
            .map_err(status_of)
    }

    async fn list_jobs(
        &self,
        _request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let jobs = self.engine.jobs().await.map_err(status_of)?;
        Ok(Response::new(ListJobsResponse { jobs }))
    }

    async fn list_runs(
        &self,
        request: Request<ListRunsRequest>,
    ) -> Result<Response<ListRunsResponse>, Status> {
        let runs = self
            .engine
            .list_runs(&request.into_inner())
            .await
            .map_err(status_of)?;
        Ok(Response::new(ListRunsResponse { runs }))
    }

    async fn get_run(
        &self,
        request: Request<GetRunRequest>,
    ) -> Result<Response<RunDetail>, Status> {
        self.engine
            .run_detail(&request.into_inner().run_id)
            .await
            .map(Response::new)
            .map_err(status_of)
    }

    type WatchRunStream = BoxStream<RunEvent>;

    async fn watch_run(
        &self,
        request: Request<WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        // Subscribe before reading the stored events so none falls between.
        let mut live = self.engine.subscribe();
        let detail = self
            .engine
            .run_detail(&request.into_inner().run_id)
            .await
            .map_err(status_of)?;
        let run_id = detail
            .run
            .as_ref()
            .map(|run| run.id.clone())
            .unwrap_or_default();
        let finished = detail.run.as_ref().is_some_and(|run| is_final(run.state()));
        let engine = Arc::clone(&self.engine);
        let stream = async_stream(move |sender| async move {
            let mut last_seq = 0;
            for event in detail.events {
                // Live progress (seq 0) comes after the stored history.
                last_seq = last_seq.max(event.seq);
                if sender.send(Ok(event)).await.is_err() {
                    return;
                }
            }
            if finished {
                return;
            }
            loop {
                match live.recv().await {
                    Ok(event) => {
                        if event.run_id != run_id {
                            continue;
                        }
                        if event.seq == 0 {
                            // Live progress, not stored: passed on as it comes.
                            if sender.send(Ok(event)).await.is_err() {
                                return;
                            }
                            continue;
                        }
                        if event.seq <= last_seq {
                            continue;
                        }
                        last_seq = event.seq;
                        let ended = is_final(event.state());
                        if sender.send(Ok(event)).await.is_err() || ended {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Fell behind the feed: catch up from the store.
                        match engine.events_after(&run_id, last_seq).await {
                            Ok((events, ended)) => {
                                for event in events {
                                    last_seq = event.seq;
                                    if sender.send(Ok(event)).await.is_err() {
                                        return;
                                    }
                                }
                                if ended {
                                    return;
                                }
                            }
                            Err(error) => {
                                let _ = sender.send(Err(status_of(error))).await;
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        })
        .take_until(shut_down(self.shutdown.clone()));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn retry_run(&self, request: Request<RetryRunRequest>) -> Result<Response<Run>, Status> {
        self.engine
            .retry_run(&request.into_inner().run_id)
            .await
            .map(Response::new)
            .map_err(status_of)
    }

    async fn cancel_run(
        &self,
        request: Request<CancelRunRequest>,
    ) -> Result<Response<Run>, Status> {
        self.engine
            .cancel_run(&request.into_inner().run_id)
            .await
            .map(Response::new)
            .map_err(status_of)
    }

    async fn list_nodes(
        &self,
        _request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        Ok(Response::new(ListNodesResponse {
            nodes: self.engine.nodes().await,
        }))
    }

    async fn list_catalog(
        &self,
        request: Request<ListCatalogRequest>,
    ) -> Result<Response<ListCatalogResponse>, Status> {
        let caller = Caller::of(&request);
        let mut filter = request.into_inner();
        if let Some(host) = caller.client_host() {
            // A client sees its own host's snapshots only.
            if !filter.host.is_empty() && filter.host != host {
                return Err(Status::permission_denied(format!(
                    "{} may list only host {host}'s snapshots",
                    caller.describe()
                )));
            }
            filter.host = host.to_owned();
        }
        let entries = self.engine.catalog(&filter).await.map_err(status_of)?;
        let jobs: std::collections::BTreeSet<String> = entries
            .iter()
            .filter_map(|entry| entry.snapshot.as_ref().map(|snapshot| snapshot.job.clone()))
            .collect();
        let jobs: Vec<String> = jobs.into_iter().collect();
        let job_quotas = self.engine.job_quotas(&jobs).await.map_err(status_of)?;
        Ok(Response::new(ListCatalogResponse {
            entries,
            job_quotas,
        }))
    }

    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        self.engine
            .check(&request.into_inner().jobs)
            .await
            .map(Response::new)
            .map_err(status_of)
    }

    async fn pause_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        self.engine
            .set_paused(&request.into_inner().name, true)
            .await
            .map(Response::new)
            .map_err(status_of)
    }

    async fn resume_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        self.engine
            .set_paused(&request.into_inner().name, false)
            .await
            .map(Response::new)
            .map_err(status_of)
    }

    async fn delete_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        self.engine
            .delete_job(&request.into_inner().name)
            .await
            .map(Response::new)
            .map_err(status_of)
    }

    async fn run_job(
        &self,
        request: Request<fabric_proto::v1::RunJobRequest>,
    ) -> Result<Response<Run>, Status> {
        let fabric_proto::v1::RunJobRequest { name, instance } = request.into_inner();
        self.engine
            .run_job(&name, &instance)
            .await
            .map(Response::new)
            .map_err(status_of)
    }

    async fn forget(
        &self,
        request: Request<ForgetRequest>,
    ) -> Result<Response<ForgetResponse>, Status> {
        let caller = Caller::of(&request);
        let ForgetRequest { job, dry_run } = request.into_inner();
        // A monitor may see what retention would do; only an operator
        // removes anything.
        if !dry_run
            && let Some(identity) = caller.identity()
            && identity.role != fabric_trust::Role::Operator
        {
            return Err(Status::permission_denied(format!(
                "{} may only ask what retention would remove (--dry-run); removing is for operators",
                caller.describe()
            )));
        }
        self.engine
            .forget(&job, dry_run)
            .await
            .map(Response::new)
            .map_err(status_of)
    }

    async fn collect_garbage(
        &self,
        request: Request<CollectGarbageRequest>,
    ) -> Result<Response<CollectGarbageResponse>, Status> {
        let CollectGarbageRequest {
            node,
            repack_threshold,
        } = request.into_inner();
        let report = self
            .engine
            .collect_garbage(&node, repack_threshold)
            .await
            .map_err(status_of)?;
        Ok(Response::new(CollectGarbageResponse {
            node,
            report: Some(report),
        }))
    }

    async fn drain_node(
        &self,
        request: Request<DrainNodeRequest>,
    ) -> Result<Response<Node>, Status> {
        let by = Caller::of(&request).record();
        let DrainNodeRequest { node, cancel } = request.into_inner();
        let drained = self
            .engine
            .drain_node(&node, cancel)
            .await
            .map_err(status_of)?;
        tracing::info!(%node, cancel, %by, "drain asked");
        Ok(Response::new(drained))
    }

    async fn reset_sync(
        &self,
        request: Request<ResetSyncRequest>,
    ) -> Result<Response<ResetSyncResponse>, Status> {
        let by = Caller::of(&request).record();
        let ResetSyncRequest { job, snapshot_ids } = request.into_inner();
        let reset = self
            .engine
            .reset_sync(&job, &snapshot_ids)
            .await
            .map_err(status_of)?;
        tracing::info!(%job, reset, %by, "off-site sync state reset");
        Ok(Response::new(ResetSyncResponse { reset }))
    }

    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let by = Caller::of(&request).record();
        self.tokens
            .create(request.get_ref(), &by)
            .await
            .map(Response::new)
            .map_err(status_of)
    }

    async fn list_tokens(
        &self,
        _request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        let tokens = self.tokens.list().map_err(status_of)?;
        Ok(Response::new(ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<TokenInfo>, Status> {
        let by = Caller::of(&request).record();
        self.tokens
            .revoke(&request.get_ref().id, &by)
            .await
            .map(Response::new)
            .map_err(status_of)
    }
}

/// A stream fed by a producer task through a small bounded channel: the
/// producer stops when the receiver is dropped.
fn async_stream<T, F, Fut>(producer: F) -> tokio_stream::wrappers::ReceiverStream<Result<T, Status>>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    tokio::spawn(producer(sender));
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}
