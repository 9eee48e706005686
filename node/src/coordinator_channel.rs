//! A channel to whichever of several coordinators leads, for the calls a
//! node or `fabricctl` makes one at a time (not the node's `Session`, which
//! [`crate::session`] follows itself).
//!
//! Coordinators that do not lead answer every call UNAVAILABLE with the
//! leader's address in the metadata key [`LEADER_METADATA_KEY`] when they
//! know it; a coordinator that is down refuses connections. A
//! [`CoordinatorChannel`] sends each call to the coordinator that answered
//! last; when the call is refused that way, or the connection cannot be
//! made, it sends the call again to the address [`LeaderSearch`] picks (the
//! hint, else the next listed address), for at most its `patience`, and
//! then fails UNAVAILABLE naming every address it tried and why each
//! failed. It gives up at once when a whole round through the list
//! found no coordinator answering at all (nothing is running).
//!
//! Only calls that never reached a leader are sent again: a refusal by a
//! coordinator that does not lead (it did nothing) and a connection that
//! could not be made. A connection that breaks while a call is under way
//! fails that call, as the leader may have acted on it. A request is
//! buffered whole to be sent again, so the one client-streaming call,
//! `Session`, goes once to the current address and is never repeated.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fabric_proto::coordinator_addresses::{
    Backoff, CoordinatorAddress, CoordinatorAddresses, LEADER_METADATA_KEY, LeaderSearch,
};
use fabric_trust::Transport;
use http_body_util::BodyExt;
use tonic::body::Body;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tower_service::Service;

use crate::client::Peer;

/// How long a call keeps looking for the leader before it fails: enough to
/// ride out an election (a lost leader's lease expiring, a new one taking
/// over).
pub const FAILOVER_PATIENCE: Duration = Duration::from_secs(15);

/// How long dialling one coordinator may take before the next is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The wait after a round that found no leader: 200 ms, doubling to 2 s.
fn round_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(200), Duration::from_secs(2))
}

/// The one coordinator call whose request is a stream.
const SESSION_PATH: &str = "/fabric.v1.Coordinator/Session";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One coordinator a call tried, and why it did not serve the call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// The address dialled.
    pub address: String,
    /// Why: the transport's error, or the coordinator's refusal.
    pub reason: String,
    /// Whether a coordinator answered there (it refused as not the
    /// leader) rather than the connection failing.
    pub answered: bool,
}

/// The UNAVAILABLE of a coordinator that does not lead: its message and
/// the leader it names, if any.
pub fn leader_hint(status: &Status) -> Option<String> {
    if status.code() != Code::Unavailable {
        return None;
    }
    status
        .metadata()
        .get(LEADER_METADATA_KEY)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

/// The last, most specific part of a transport error chain ("connection
/// refused" rather than "transport error: tcp connect error: ...").
pub fn short_reason(reason: &str) -> String {
    // A certificate check's own sentence arrives wrapped in debug output
    // (`Other(OtherError(Reason("the server's certificate is ...")))`).
    if let (Some(start), Some(end)) = (reason.find("(\""), reason.rfind("\")"))
        && start + 2 < end
    {
        return reason[start + 2..end].replace("\\\"", "\"");
    }
    let last = reason.rsplit(": ").next().unwrap_or(reason);
    let last = last.split(" (os error").next().unwrap_or(last);
    last.to_lowercase()
}

/// What `attempts` come to, as one sentence: each address once (its last
/// reason), in the order first tried.
pub fn describe_attempts(attempts: &[Attempt]) -> String {
    let mut last: Vec<(&str, &Attempt)> = Vec::new();
    for attempt in attempts {
        match last
            .iter_mut()
            .find(|(address, _)| *address == attempt.address)
        {
            Some(entry) => entry.1 = attempt,
            None => last.push((&attempt.address, attempt)),
        }
    }
    last.iter()
        .map(|(address, attempt)| {
            let reason = if attempt.answered {
                attempt.reason.clone()
            } else {
                short_reason(&attempt.reason)
            };
            format!("{address}: {reason}")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The error a call ends with when no coordinator served it.
fn no_leader(attempts: &[Attempt], tried_for: Duration) -> Status {
    let tried = describe_attempts(attempts);
    let single = attempts
        .first()
        .is_some_and(|first| attempts.iter().all(|a| a.address == first.address));
    if attempts.iter().all(|attempt| !attempt.answered) {
        if single {
            return Status::unavailable(format!("cannot reach the coordinator at {tried}"));
        }
        return Status::unavailable(format!("cannot reach any coordinator: {tried}"));
    }
    Status::unavailable(format!(
        "no coordinator served the call as the leader in {}s of trying: {tried}",
        tried_for.as_secs().max(1)
    ))
}

struct State {
    search: LeaderSearch,
    /// A connection to `search.current()`, once made.
    connected: Option<Channel>,
}

struct Shared {
    transport: Transport,
    patience: Duration,
    state: tokio::sync::Mutex<State>,
}

/// A channel to the leading coordinator among `addresses`; see the module.
/// Clones share the connection and what they learnt of the leader.
#[derive(Clone)]
pub struct CoordinatorChannel {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CoordinatorChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorChannel")
            .field("patience", &self.shared.patience)
            .finish_non_exhaustive()
    }
}

impl CoordinatorChannel {
    /// A channel that dials at its first call, and keeps looking for the
    /// leader for at most `patience` per call.
    pub fn new(addresses: CoordinatorAddresses, transport: Transport, patience: Duration) -> Self {
        Self {
            shared: Arc::new(Shared {
                transport,
                patience,
                state: tokio::sync::Mutex::new(State {
                    search: LeaderSearch::new(addresses, round_backoff()),
                    connected: None,
                }),
            }),
        }
    }

    /// [`Self::new`], connected now to the first address that takes a
    /// connection (in the order given); when none does, every address
    /// and why it could not be reached.
    pub async fn connect(
        addresses: CoordinatorAddresses,
        transport: Transport,
        patience: Duration,
    ) -> Result<Self, Vec<Attempt>> {
        let channel = Self::new(addresses, transport, patience);
        let mut attempts = Vec::new();
        loop {
            match channel.current().await {
                Ok(_) => return Ok(channel),
                Err(attempt) => {
                    let address = attempt.address.clone();
                    attempts.push(attempt);
                    if channel.failed(&address, None).await.round_ended {
                        return Err(attempts);
                    }
                }
            }
        }
    }

    /// The address calls go to now.
    pub async fn address(&self) -> String {
        self.shared
            .state
            .lock()
            .await
            .search
            .current()
            .as_str()
            .to_owned()
    }

    /// The current address and a connection to it (dialled now if there
    /// is none), or why it cannot be reached.
    async fn current(&self) -> Result<(CoordinatorAddress, Channel), Attempt> {
        let mut state = self.shared.state.lock().await;
        let address = state.search.current().clone();
        if let Some(channel) = &state.connected {
            return Ok((address, channel.clone()));
        }
        // Dialled under the lock: concurrent calls share the one dial.
        let peer = Peer::coordinator(address.as_str());
        let reason = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            dial(&peer, &self.shared.transport),
        )
        .await
        {
            Ok(Ok(channel)) => {
                state.connected = Some(channel.clone());
                return Ok((address, channel));
            }
            Ok(Err(reason)) => reason,
            Err(_) => format!("no connection within {}s", CONNECT_TIMEOUT.as_secs()),
        };
        Err(Attempt {
            address: address.as_str().to_owned(),
            reason,
            answered: false,
        })
    }

    /// `address` failed (with the leader `hint` its refusal named): move
    /// the search on, unless another call already did.
    async fn failed(
        &self,
        address: &str,
        hint: Option<&str>,
    ) -> fabric_proto::coordinator_addresses::Step {
        let mut state = self.shared.state.lock().await;
        if state.search.current().as_str() != address {
            return fabric_proto::coordinator_addresses::Step {
                wait: Duration::ZERO,
                followed_hint: false,
                round_ended: false,
            };
        }
        state.connected = None;
        let step = state.search.failed(hint);
        if step.followed_hint {
            tracing::info!(
                coordinator = %address,
                leader = %state.search.current(),
                "the coordinator does not lead: following it to the leader it names"
            );
        }
        step
    }

    async fn succeeded(&self, address: &str) {
        let mut state = self.shared.state.lock().await;
        if state.search.current().as_str() == address {
            state.search.succeeded();
        }
    }

    /// Send `request` to the leader; see the module.
    async fn send(self, request: http::Request<Body>) -> Result<http::Response<Body>, BoxError> {
        let (parts, body) = request.into_parts();
        if parts.uri.path() == SESSION_PATH {
            let (_, mut channel) = self
                .current()
                .await
                .map_err(|attempt| no_leader(&[attempt], Duration::ZERO))?;
            return call(&mut channel, http::Request::from_parts(parts, body)).await;
        }
        let bytes: Bytes = body.collect().await?.to_bytes();
        let started = Instant::now();
        let mut attempts: Vec<Attempt> = Vec::new();
        let mut answered_in_round = false;
        loop {
            let (attempt, hint) = match self.current().await {
                Err(attempt) => (attempt, None),
                Ok((address, mut channel)) => {
                    let request = http::Request::from_parts(
                        parts.clone(),
                        Body::new(http_body_util::Full::new(bytes.clone())),
                    );
                    match call(&mut channel, request).await {
                        Err(error) if is_connect_failure(&*error) => (
                            Attempt {
                                address: address.as_str().to_owned(),
                                reason: crate::client::describe(&*error),
                                answered: false,
                            },
                            None,
                        ),
                        Err(error) => return Err(error),
                        Ok(response) => match refusal(&response) {
                            None => {
                                self.succeeded(address.as_str()).await;
                                return Ok(response);
                            }
                            Some(status) => (
                                Attempt {
                                    address: address.as_str().to_owned(),
                                    reason: status.message().to_owned(),
                                    answered: true,
                                },
                                leader_hint(&status),
                            ),
                        },
                    }
                }
            };
            answered_in_round |= attempt.answered;
            let address = attempt.address.clone();
            attempts.push(attempt);
            let step = self.failed(&address, hint.as_deref()).await;
            if step.round_ended {
                if !answered_in_round {
                    // Nothing is running at any address: no point waiting.
                    return Err(no_leader(&attempts, started.elapsed()).into());
                }
                answered_in_round = false;
            }
            if started.elapsed() + step.wait > self.shared.patience {
                return Err(no_leader(&attempts, started.elapsed()).into());
            }
            tokio::time::sleep(step.wait).await;
        }
    }
}

async fn dial(peer: &Peer, transport: &Transport) -> Result<Channel, String> {
    crate::client::channel(peer, transport)
        .await
        .map_err(|err| err.reason)
}

async fn call(
    channel: &mut Channel,
    request: http::Request<Body>,
) -> Result<http::Response<Body>, BoxError> {
    std::future::poll_fn(|cx| channel.poll_ready(cx)).await?;
    Ok(channel.call(request).await?)
}

/// Whether `error` happened while connecting (nothing was sent).
fn is_connect_failure(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(error) = source {
        if error.is::<tonic::ConnectError>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// The UNAVAILABLE a coordinator that does not lead answers with (a
/// response of headers only), if `response` is one.
fn refusal(response: &http::Response<Body>) -> Option<Status> {
    let headers = response.headers();
    if Code::from_bytes(headers.get("grpc-status")?.as_bytes()) != Code::Unavailable {
        return None;
    }
    // tonic panics on details that are not base64; a refusal needs none.
    let mut headers = headers.clone();
    headers.remove("grpc-status-details-bin");
    Status::from_header_map(&headers)
}

impl Service<http::Request<Body>> for CoordinatorChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each call finds (and waits for) its connection itself.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(self.clone().send(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(address: &str, reason: &str, answered: bool) -> Attempt {
        Attempt {
            address: address.into(),
            reason: reason.into(),
            answered,
        }
    }

    #[test]
    fn a_transport_reason_is_cut_to_its_last_sentence() {
        assert_eq!(
            short_reason("transport error: tcp connect error: Connection refused (os error 111)"),
            "connection refused"
        );
        assert_eq!(
            short_reason(
                "transport error: invalid peer certificate: Other(OtherError(Reason(\"the server's certificate is for node/n1, but a coordinator was expected\")))"
            ),
            "the server's certificate is for node/n1, but a coordinator was expected"
        );
    }

    #[test]
    fn the_final_error_names_every_address_once_with_its_last_reason() {
        let refused = "tcp connect error: Connection refused (os error 111)";
        let status = no_leader(
            &[attempt("http://127.0.0.1:1", refused, false)],
            Duration::ZERO,
        );
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.message(),
            "cannot reach the coordinator at http://127.0.0.1:1: connection refused"
        );
        let status = no_leader(
            &[
                attempt("https://c1:7400", refused, false),
                attempt("https://c2:7400", refused, false),
            ],
            Duration::ZERO,
        );
        assert_eq!(
            status.message(),
            "cannot reach any coordinator: https://c1:7400: connection refused; https://c2:7400: connection refused"
        );
        let status = no_leader(
            &[
                attempt("https://c1:7400", refused, false),
                attempt("https://c2:7400", "coordinator c2 is not the leader", true),
                attempt("https://c1:7400", refused, false),
                attempt(
                    "https://c2:7400",
                    "coordinator c2 is not the leader; the leader is https://c1:7400",
                    true,
                ),
            ],
            Duration::from_secs(15),
        );
        assert_eq!(
            status.message(),
            "no coordinator served the call as the leader in 15s of trying: https://c1:7400: connection refused; https://c2:7400: coordinator c2 is not the leader; the leader is https://c1:7400"
        );
    }

    #[test]
    fn only_an_unavailable_names_a_leader() {
        let mut status = Status::unavailable("coordinator c2 is not the leader");
        assert_eq!(leader_hint(&status), None);
        status.metadata_mut().insert(
            LEADER_METADATA_KEY,
            tonic::metadata::MetadataValue::from_static("https://c1:7400"),
        );
        assert_eq!(leader_hint(&status).as_deref(), Some("https://c1:7400"));
        let mut other = Status::not_found("no such job");
        other.metadata_mut().insert(
            LEADER_METADATA_KEY,
            tonic::metadata::MetadataValue::from_static("https://c1:7400"),
        );
        assert_eq!(leader_hint(&other), None);
    }
}
