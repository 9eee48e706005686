//! What a coordinator that does not lead answers: every
//! `fabric.v1.Coordinator` call gets UNAVAILABLE, saying where the leader
//! is in the message and in the `fabric-leader` metadata key (absent while
//! no leader is known), so that nodes and `fabricctl` given every
//! coordinator's address go to the leader. Health and reflection are
//! answered as usual.
//!
//! [`LeaderGate`] is the outermost layer of the server, before
//! authentication: a follower holds no state, so it could not check a
//! bearer token, and the leader's address is no secret. [`LateService`] is
//! the route of the coordinator's service, set once this process leads.
//! This module never decides who leads.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use fabric_proto::service_names;
use tonic::body::Body;
use tonic::server::NamedService;

use crate::leadership::LeaderHint;

/// The metadata key naming the leader's address.
pub const LEADER_METADATA_KEY: &str = "fabric-leader";

/// Whether this process leads, and where the leader is.
#[derive(Debug, Clone)]
pub struct LeaderGate {
    leading: Arc<AtomicBool>,
    hint: LeaderHint,
    who: Arc<str>,
}

impl LeaderGate {
    /// A gate, closed until [`LeaderGate::open`]; `who` names this
    /// coordinator in refusals.
    pub fn new(hint: LeaderHint, who: &str) -> Self {
        Self {
            leading: Arc::new(AtomicBool::new(false)),
            hint,
            who: who.into(),
        }
    }

    /// This process leads from now on: calls pass.
    pub fn open(&self) {
        self.leading.store(true, Ordering::SeqCst);
    }

    /// This process no longer leads: calls are refused again.
    pub fn close(&self) {
        self.leading.store(false, Ordering::SeqCst);
    }

    /// The refusal a follower answers with.
    pub fn refusal(&self) -> tonic::Status {
        let leader = self.hint.borrow().clone();
        let message = match &leader {
            Some(leader) => format!(
                "coordinator {} is not the leader; the leader is {leader}",
                self.who
            ),
            None => format!(
                "coordinator {} is not the leader, and no leader is elected yet; try again shortly",
                self.who
            ),
        };
        let mut status = tonic::Status::unavailable(message);
        if let Some(value) = leader.and_then(|leader| leader.parse().ok()) {
            status.metadata_mut().insert(LEADER_METADATA_KEY, value);
        }
        status
    }
}

impl<S> tower::Layer<S> for LeaderGate {
    type Service = GatedService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GatedService {
            inner,
            gate: self.clone(),
        }
    }
}

/// The server's routes behind a [`LeaderGate`].
#[derive(Debug, Clone)]
pub struct GatedService<S> {
    inner: S,
    gate: LeaderGate,
}

impl<S> tower::Service<http::Request<Body>> for GatedService<S>
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

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let coordinator_call = request
            .uri()
            .path()
            .strip_prefix('/')
            .and_then(|path| path.strip_prefix(service_names::COORDINATOR))
            .is_some_and(|rest| rest.starts_with('/'));
        if coordinator_call && !self.gate.leading.load(Ordering::SeqCst) {
            let status = self.gate.refusal();
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move { inner.call(request).await })
    }
}

/// A route whose service exists only once this process leads; until then
/// (a call that raced the gate) it answers UNAVAILABLE.
#[derive(Debug)]
pub struct LateService<S> {
    service: Arc<OnceLock<S>>,
}

impl<S> Clone for LateService<S> {
    fn clone(&self) -> Self {
        Self {
            service: Arc::clone(&self.service),
        }
    }
}

impl<S> LateService<S> {
    /// A route served by whatever is set in `service`.
    pub fn new(service: Arc<OnceLock<S>>) -> Self {
        Self { service }
    }
}

impl<S> NamedService for LateService<S> {
    const NAME: &'static str = service_names::COORDINATOR;
}

impl<S> tower::Service<http::Request<Body>> for LateService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // tonic's generated servers are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        match self.service.get() {
            Some(service) => {
                let mut service = service.clone();
                Box::pin(async move { service.call(request).await })
            }
            None => Box::pin(async {
                Ok(tonic::Status::unavailable("the coordinator is not serving yet").into_http())
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::watch;

    #[test]
    fn a_follower_names_the_leader_in_its_refusal() {
        let (hint, receiver) = watch::channel(None);
        let gate = LeaderGate::new(receiver, "c2");
        let status = gate.refusal();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            status.message().contains("no leader"),
            "{}",
            status.message()
        );
        assert!(status.metadata().get(LEADER_METADATA_KEY).is_none());
        hint.send_replace(Some("https://10.0.0.5:7400".into()));
        let status = gate.refusal();
        assert!(status.message().contains("https://10.0.0.5:7400"));
        assert_eq!(
            status.metadata().get(LEADER_METADATA_KEY).unwrap(),
            "https://10.0.0.5:7400"
        );
    }
}
