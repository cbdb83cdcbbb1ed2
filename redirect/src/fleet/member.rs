//! Membership: each controller is a key under `/redirect/<fleet>/members/`, attached to its
//! own lease and kept alive, so a member that dies (or is cut off from etcd) disappears from
//! the fleet within the lease's TTL.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use etcd_client::{Client, GetOptions, PutOptions};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{FleetError, keys, state::Epoch};
use crate::{datapath::Role, sync::lock};

/// How long a member survives without a keep-alive.
pub const LEASE_TTL: Duration = Duration::from_secs(10);

/// What a member publishes about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    pub vip: String,
    /// The committed epoch this member's datapath follows.
    pub applied_epoch: Epoch,
    /// The backend its datapath sends new connections to.
    pub applied_active: Role,
    /// Seconds since the Unix epoch when it joined.
    pub joined_at: u64,
    /// Milliseconds since the Unix epoch when it applied (and acknowledged) its epoch.
    #[serde(default)]
    pub applied_at_ms: u64,
    /// The addresses the servers see this member's proxied sessions come from (its SNAT
    /// address towards each backend): the leader's preflight does not count them as
    /// sessions that bypass the proxy.
    #[serde(default)]
    pub snat: Vec<String>,
}

/// Grants a lease and puts `member` under it. Returns the lease id.
pub async fn register(
    client: &mut Client,
    fleet: &str,
    member: &Member,
) -> Result<i64, FleetError> {
    let ttl = i64::try_from(LEASE_TTL.as_secs()).expect("small");
    let lease = super::retry(|| {
        let mut client = client.clone();
        async move { client.lease_grant(ttl, None).await }
    })
    .await?
    .id();
    publish(client, fleet, member, lease).await?;
    Ok(lease)
}

/// Keeps `lease` alive every TTL/3 until `shutdown`. A failed keep-alive is logged and retried:
/// losing etcd changes nothing on the datapath (docs/fleet.md, invariant 4); the member only
/// drops out of the member list until it re-registers.
pub async fn keep_alive(
    mut client: Client,
    fleet: String,
    member: Arc<Mutex<Member>>,
    lease: Arc<AtomicI64>,
    shutdown: CancellationToken,
) {
    let mut healthy = true;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(LEASE_TTL / 3) => {}
        }
        let renewed = tokio::time::timeout(
            LEASE_TTL / 3,
            renew(&mut client, lease.load(Ordering::Relaxed)),
        )
        .await;
        match renewed {
            Ok(Ok(true)) => {
                if !healthy {
                    info!(fleet = %fleet, "etcd reachable again; membership renewed");
                }
                healthy = true;
            }
            // The lease expired while etcd was away: join again under a new one.
            Ok(Ok(false)) => match register(&mut client, &fleet, &current(&member)).await {
                Ok(new) => {
                    info!(fleet = %fleet, "membership lease had expired; registered again");
                    lease.store(new, Ordering::Relaxed);
                    healthy = true;
                }
                Err(e) => warn!(fleet = %fleet, error = %e, "registering again"),
            },
            Ok(Err(e)) => {
                if healthy {
                    warn!(fleet = %fleet, error = %e, "etcd keep-alive failed; the datapath keeps its committed state");
                }
                healthy = false;
            }
            Err(_) => {
                if healthy {
                    warn!(fleet = %fleet, "etcd keep-alive timed out; the datapath keeps its committed state");
                }
                healthy = false;
            }
        }
    }
    // A clean stop leaves the fleet at once instead of after the TTL.
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        client.lease_revoke(lease.load(Ordering::Relaxed)),
    )
    .await;
}

/// One keep-alive round trip. `false`: the lease no longer exists.
async fn renew(client: &mut Client, lease: i64) -> Result<bool, etcd_client::Error> {
    super::retry(|| {
        let mut client = client.clone();
        async move {
            let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            Ok(stream.message().await?.is_some_and(|r| r.ttl() > 0))
        }
    })
    .await
}

/// Every live member (those whose lease has not expired).
pub async fn list(client: &mut Client, fleet: &str) -> Result<Vec<Member>, FleetError> {
    let resp = super::retry(|| {
        let mut client = client.clone();
        async move {
            client
                .get(keys::members(fleet), Some(GetOptions::new().with_prefix()))
                .await
        }
    })
    .await?;
    let mut members = Vec::new();
    for kv in resp.kvs() {
        match serde_json::from_slice(kv.value()) {
            Ok(m) => members.push(m),
            Err(e) => {
                warn!(key = %String::from_utf8_lossy(kv.key()), error = %e, "skipping an unreadable member record");
            }
        }
    }
    Ok(members)
}

/// Rewrites this member's record (under its current lease) after it applied a new epoch.
pub async fn publish(
    client: &mut Client,
    fleet: &str,
    member: &Member,
    lease: i64,
) -> Result<(), FleetError> {
    let value = serde_json::to_vec(member).expect("a member serializes");
    let key = keys::member(fleet, &member.id);
    super::retry(|| {
        let (mut client, key, value) = (client.clone(), key.clone(), value.clone());
        async move {
            client
                .put(key, value, Some(PutOptions::new().with_lease(lease)))
                .await
        }
    })
    .await?;
    Ok(())
}

/// A copy of the member record (the lock is not held across an await).
fn current(member: &Mutex<Member>) -> Member {
    lock(member).clone()
}
