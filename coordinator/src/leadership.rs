//! Who leads when several coordinators share one etcd: a lease kept alive
//! by this process, and a campaign in etcd's election (`PREFIX/leader`)
//! whose value is this coordinator's advertised address.
//!
//! [`Candidate::campaign`] waits until this process leads, telling
//! [`LeaderHint`] where the current leader is meanwhile (followers pass it
//! on to callers). The [`Leadership`] it returns holds the fence for the
//! state's writes and resolves [`Leadership::lost`] once this process can no
//! longer be sure it leads: a keep-alive unanswered for the lease's TTL
//! (counted from when it was *sent*, so before etcd itself can expire the
//! lease and elect another), or etcd saying the lease is gone. The caller
//! must then stop acting at once. This module never touches the state or
//! the gRPC services.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::etcd::api::etcdserverpb::{
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseRevokeRequest,
};
use crate::etcd::api::v3electionpb::{CampaignRequest, LeaderRequest};
use crate::etcd::{Etcd, EtcdError};
use crate::state::etcd::Fence;

/// Where the leader is, as far as this process knows: its advertised
/// address, or `None` while unknown.
pub type LeaderHint = watch::Receiver<Option<String>>;

/// How often a follower asks etcd who leads.
const LEADER_POLL: Duration = Duration::from_millis(500);

/// A coordinator that wants to lead.
#[derive(Debug, Clone)]
pub struct Candidate {
    etcd: Etcd,
    election: Vec<u8>,
    advertise: String,
    lease_ttl: Duration,
}

/// Until when this process's lease surely lives: a keep-alive's send time
/// plus the TTL etcd answered it with. Before that instant etcd cannot have
/// expired the lease, so no other coordinator can lead.
#[derive(Debug, Clone)]
pub struct LeaseClock {
    valid_until: Arc<Mutex<Instant>>,
}

impl LeaseClock {
    fn new(valid_until: Instant) -> Self {
        Self {
            valid_until: Arc::new(Mutex::new(valid_until)),
        }
    }

    /// Whether this process may still act as the leader now.
    pub fn may_act(&self) -> bool {
        self.valid_until
            .lock()
            .map(|until| Instant::now() < *until)
            .unwrap_or(false)
    }

    fn until(&self) -> Instant {
        self.valid_until
            .lock()
            .map(|until| *until)
            .unwrap_or_else(|_| Instant::now())
    }

    fn extend_to(&self, until: Instant) {
        if let Ok(mut valid_until) = self.valid_until.lock()
            && until > *valid_until
        {
            *valid_until = until;
        }
    }
}

/// This process leads, until [`Leadership::lost`] says otherwise.
#[derive(Debug)]
pub struct Leadership {
    /// Guards every write of the state.
    pub fence: Fence,
    /// Whether this process may still act: checked before every tick and
    /// every message sent down a session.
    pub clock: LeaseClock,
    lease_id: i64,
    etcd: Etcd,
    lost: watch::Receiver<Option<String>>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Candidate {
    /// A candidate under `prefix` advertising `advertise`, with a lease of
    /// `lease_ttl` (whole seconds, at least 2).
    pub fn new(etcd: Etcd, prefix: &str, advertise: &str, lease_ttl: Duration) -> Self {
        Self {
            etcd,
            election: format!("{}/leader", prefix.trim_end_matches('/')).into_bytes(),
            advertise: advertise.to_owned(),
            lease_ttl: Duration::from_secs(lease_ttl.as_secs().max(2)),
        }
    }

    /// Who leads now, by etcd (`None`: nobody).
    pub async fn current_leader(&self) -> Result<Option<String>, EtcdError> {
        match self
            .etcd
            .election
            .clone()
            .leader(LeaderRequest {
                name: self.election.clone(),
            })
            .await
        {
            Ok(reply) => Ok(reply
                .into_inner()
                .kv
                .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())),
            // etcd answers "election: no leader" when there is none.
            Err(status) if status.message().contains("no leader") => Ok(None),
            Err(status) => Err(EtcdError::call("ask etcd who leads")(status)),
        }
    }

    /// Campaigns until this process leads. Meanwhile `hint` follows the
    /// current leader. An error (etcd unreachable, the lease lost before
    /// winning) ends this campaign; the caller starts another.
    pub async fn campaign(
        &self,
        hint: &watch::Sender<Option<String>>,
    ) -> Result<Leadership, EtcdError> {
        let ttl = i64::try_from(self.lease_ttl.as_secs()).unwrap_or(i64::MAX);
        let granted_at = Instant::now();
        let lease_id = self
            .etcd
            .lease
            .clone()
            .lease_grant(LeaseGrantRequest { ttl, id: 0 })
            .await
            .map_err(EtcdError::call("grant the leader lease"))?
            .into_inner()
            .id;
        let (lost_sender, lost) = watch::channel(None);
        // Counted from before the grant was asked for.
        let clock = LeaseClock::new(granted_at + self.lease_ttl);
        let keeper = tokio::spawn(keep_alive(
            self.etcd.clone(),
            lease_id,
            self.lease_ttl,
            clock.clone(),
            lost_sender,
        ));
        let follower = {
            let candidate = self.clone();
            let hint = hint.clone();
            tokio::spawn(async move {
                loop {
                    match candidate.current_leader().await {
                        Ok(leader) => {
                            hint.send_if_modified(|known| {
                                let changed = *known != leader;
                                *known = leader.clone();
                                changed
                            });
                        }
                        Err(error) => tracing::debug!(%error, "cannot learn the leader"),
                    }
                    tokio::time::sleep(LEADER_POLL).await;
                }
            })
        };
        let mut lost_before = lost.clone();
        let mut election = self.etcd.election.clone();
        let campaign = election.campaign(CampaignRequest {
            name: self.election.clone(),
            lease: lease_id,
            value: self.advertise.clone().into_bytes(),
        });
        let won = tokio::select! {
            won = campaign => won.map_err(EtcdError::call("campaign for leadership")),
            _ = lost_before.wait_for(Option::is_some) => Err(EtcdError::call("campaign for leadership")(
                tonic::Status::unavailable("the lease expired before this coordinator won"),
            )),
        };
        follower.abort();
        let leader = match won.map(|reply| reply.into_inner().leader) {
            Ok(Some(leader)) => leader,
            Ok(None) => {
                keeper.abort();
                return Err(EtcdError::call("campaign for leadership")(
                    tonic::Status::internal("etcd's campaign reply has no leader key"),
                ));
            }
            Err(error) => {
                keeper.abort();
                return Err(error);
            }
        };
        // etcd may answer a campaign whose lease has just expired (its key
        // went with it): such a win is no leadership.
        if lost.borrow().is_some() || !clock.may_act() {
            keeper.abort();
            return Err(EtcdError::call("campaign for leadership")(
                tonic::Status::unavailable("the lease expired as this coordinator won"),
            ));
        }
        hint.send_replace(Some(self.advertise.clone()));
        Ok(Leadership {
            fence: Fence {
                key: leader.key,
                create_revision: leader.rev,
            },
            clock,
            lease_id,
            etcd: self.etcd.clone(),
            lost,
            keeper,
        })
    }
}

impl Leadership {
    /// Resolves with the reason once this process may no longer lead.
    pub async fn lost(&self) -> String {
        let mut lost = self.lost.clone();
        match lost.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "the lease keeper stopped".to_owned(),
        }
    }

    /// Gives leadership up at once (a graceful stop): revokes the lease, so
    /// the election's key goes and another coordinator wins now rather than
    /// after the TTL.
    pub async fn resign(self) {
        self.keeper.abort();
        if let Err(status) = self
            .etcd
            .lease
            .clone()
            .lease_revoke(LeaseRevokeRequest { id: self.lease_id })
            .await
        {
            tracing::warn!(%status, "cannot revoke the leader lease; another coordinator takes over when it expires");
        }
    }
}

/// Keeps lease `lease_id` alive, sending every third of `ttl`, and says on
/// `lost` when it can no longer be sure the lease lives.
async fn keep_alive(
    etcd: Etcd,
    lease_id: i64,
    ttl: Duration,
    valid_until: LeaseClock,
    lost: watch::Sender<Option<String>>,
) {
    // The lease lives at least `ttl` past a keep-alive etcd answered, counted
    // from when this process sent it.
    let every = ttl / 3;
    let lose = |reason: String| {
        tracing::error!(%reason, "leadership lost");
        lost.send_replace(Some(reason));
    };
    'connect: loop {
        let (requests, receiver) = tokio::sync::mpsc::channel(4);
        let stream = tokio_stream::wrappers::ReceiverStream::new(receiver);
        let sent_at = Arc::new(Mutex::new(std::collections::VecDeque::new()));
        // etcd answers the stream's headers only with its first reply, so
        // the first keep-alive goes in before the call is awaited.
        if let Ok(mut sent) = sent_at.lock() {
            sent.push_back(Instant::now());
        }
        if requests
            .send(LeaseKeepAliveRequest { id: lease_id })
            .await
            .is_err()
        {
            continue 'connect;
        }
        let mut replies =
            match tokio::time::timeout(every, etcd.lease.clone().lease_keep_alive(stream)).await {
                Ok(Ok(replies)) => replies.into_inner(),
                Ok(Err(status)) => {
                    tracing::warn!(%status, "cannot open the lease keep-alive stream");
                    if !wait_or_expire(&valid_until, every, &lose).await {
                        return;
                    }
                    continue 'connect;
                }
                Err(_) => {
                    if !wait_or_expire(&valid_until, Duration::ZERO, &lose).await {
                        return;
                    }
                    continue 'connect;
                }
            };
        let mut tick = tokio::time::interval_at(Instant::now() + every, every);
        let mut check = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let now = Instant::now();
                    if let Ok(mut sent) = sent_at.lock() {
                        sent.push_back(now);
                    }
                    if requests.send(LeaseKeepAliveRequest { id: lease_id }).await.is_err() {
                        continue 'connect;
                    }
                }
                reply = replies.message() => match reply {
                    Ok(Some(reply)) => {
                        let sent = sent_at.lock().ok().and_then(|mut sent| sent.pop_front());
                        if reply.ttl <= 0 {
                            lose(format!("etcd says the leader lease {lease_id:x} is gone"));
                            return;
                        }
                        if let Some(sent) = sent {
                            valid_until.extend_to(sent + Duration::from_secs(reply.ttl.unsigned_abs()));
                        }
                    }
                    Ok(None) | Err(_) => {
                        tracing::warn!("the lease keep-alive stream broke; reopening");
                        continue 'connect;
                    }
                },
                _ = check.tick() => {
                    if !valid_until.may_act() {
                        lose(format!(
                            "no keep-alive of the leader lease was answered for its TTL of {}s",
                            ttl.as_secs()
                        ));
                        return;
                    }
                }
            }
        }
    }
}

/// Waits `pause` (at least 100 ms) unless the lease's validity ends first;
/// returns false (after saying so) when it ended.
async fn wait_or_expire(valid_until: &LeaseClock, pause: Duration, lose: &impl Fn(String)) -> bool {
    let until = valid_until.until();
    let wake = Instant::now() + pause.max(Duration::from_millis(100));
    if wake >= until {
        tokio::time::sleep_until(until).await;
        lose("etcd could not be reached for the leader lease's TTL".to_owned());
        return false;
    }
    tokio::time::sleep_until(wake).await;
    true
}
