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
    /// Which machine this member runs on ([`instance`]): two hosts given the same member
    /// name would otherwise count as one, and one's acknowledgement would stand for both.
    #[serde(default)]
    pub instance: String,
}

/// This machine's identity: `/etc/machine-id` (systemd's), else the host name.
#[must_use]
pub fn instance() -> String {
    std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map_or_else(|_| "unknown".into(), |h| h.trim().to_owned())
        })
}

/// Enrolls `member` on the roster, grants a lease and puts `member` under it (enrolled
/// first, so no member is ever live without being on the roster). Returns the lease id.
pub async fn register(
    client: &mut Client,
    fleet: &str,
    member: &Member,
) -> Result<i64, FleetError> {
    enroll(client, fleet, &Enrolled::of(member)).await?;
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

/// A member on the fleet's roster: it joined once and nobody has forgotten it since. The
/// roster has no lease: a member whose controller is down or cut off from etcd keeps its
/// place, because its datapath may still be serving, and a cutover must hear from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    pub id: String,
    pub vip: String,
    /// Seconds since the Unix epoch when it last (re)joined.
    pub joined_at: u64,
    /// The machine it runs on ([`instance`]).
    #[serde(default)]
    pub instance: String,
}

impl Enrolled {
    #[must_use]
    pub fn of(member: &Member) -> Self {
        Self {
            id: member.id.clone(),
            vip: member.vip.clone(),
            joined_at: member.joined_at,
            instance: member.instance.clone(),
        }
    }
}

/// Puts `member` on the roster, before its datapath attaches (`run`) and again when it
/// registers. A restart rewrites the record, which keeps its creation revision: only a member
/// new to the roster has a creation revision after a cutover's `Hold`. Refused while another
/// machine is live under the same name.
pub async fn enroll(client: &mut Client, fleet: &str, member: &Enrolled) -> Result<(), FleetError> {
    let live = super::retry(|| {
        let mut client = client.clone();
        async move { client.get(keys::member(fleet, &member.id), None).await }
    })
    .await?;
    if let Some(other) = live
        .kvs()
        .first()
        .and_then(|kv| serde_json::from_slice::<Member>(kv.value()).ok())
        .filter(|m| !m.instance.is_empty() && m.instance != member.instance)
    {
        return Err(FleetError::Refused(format!(
            "fleet member name {} is in use by another live host (machine {}): give each host its own --fleet-member",
            member.id, other.instance
        )));
    }
    let value = serde_json::to_vec(member).expect("a roster record serializes");
    let key = keys::enrolled(fleet, &member.id);
    super::retry(|| {
        let (mut client, key, value) = (client.clone(), key.clone(), value.clone());
        async move { client.put(key, value, None).await }
    })
    .await?;
    Ok(())
}

/// The roster, with the etcd revision it was read at: a member enrolled after that revision
/// is not in it.
pub async fn roster(client: &mut Client, fleet: &str) -> Result<(Vec<Enrolled>, i64), FleetError> {
    let resp = super::retry(|| {
        let mut client = client.clone();
        async move {
            client
                .get(keys::roster(fleet), Some(GetOptions::new().with_prefix()))
                .await
        }
    })
    .await?;
    let revision = resp
        .header()
        .map_or(0, etcd_client::ResponseHeader::revision);
    let prefix = keys::roster(fleet);
    let mut enrolled = Vec::new();
    for kv in resp.kvs() {
        match serde_json::from_slice(kv.value()) {
            Ok(m) => enrolled.push(m),
            // Unreadable (a newer version's record, or a hand edit): still enrolled under its
            // key's name, so a cutover waits for it and `fleet forget` can remove it.
            Err(e) => {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                warn!(%key, error = %e, "an unreadable roster record counts as enrolled");
                enrolled.push(Enrolled {
                    id: key.strip_prefix(&prefix).unwrap_or(&key).to_owned(),
                    vip: String::new(),
                    joined_at: 0,
                    instance: String::new(),
                });
            }
        }
    }
    Ok((enrolled, revision))
}

/// Takes `id` off the roster, so cutovers stop waiting for it: for a proxy host that is gone
/// for good (its datapath detached or the host decommissioned). Refused while `id` is live:
/// one transaction checks that it holds no member key and deletes its roster record.
pub async fn forget(client: &mut Client, fleet: &str, id: &str) -> Result<Enrolled, FleetError> {
    let (roster, _) = roster(client, fleet).await?;
    let Some(record) = roster.into_iter().find(|m| m.id == id) else {
        return Err(FleetError::Refused(format!(
            "{id} is not on fleet {fleet}'s roster (see `redirect status`)"
        )));
    };
    let txn = etcd_client::Txn::new()
        .when([etcd_client::Compare::create_revision(
            keys::member(fleet, id),
            etcd_client::CompareOp::Equal,
            0,
        )])
        .and_then([etcd_client::TxnOp::delete(keys::enrolled(fleet, id), None)]);
    let resp = client.txn(txn).await?;
    if !resp.succeeded() {
        return Err(FleetError::Refused(format!(
            "{id} is live (its controller holds a lease): stop it and detach its datapath (`redirect detach`) first; a member that is only cut off from etcd still serves and must stay on the roster"
        )));
    }
    Ok(record)
}
