//! Membership: each controller is a key under `/redirect/<fleet>/members/`, attached to its
//! own lease and kept alive, so a member that dies (or is cut off from etcd) disappears from
//! the fleet within the lease's TTL, and one that lost its lease registers again under a new
//! one as soon as etcd answers ([`keep_membership`]), with no restart.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use etcd_client::{Client, GetOptions, PutOptions};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{FleetError, keepalive, keys, state::Epoch};
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

/// How often the keep-alive renews the lease: a quarter of its TTL, so three renewals in a
/// row can fail before it lapses.
pub const RENEW_EVERY: Duration = Duration::from_millis(2500);
/// How long a renewal (or a registration step) may take before etcd counts as away: the next
/// renewal is due by then.
pub const REPLY_TIMEOUT: Duration = Duration::from_millis(2500);
/// How long a confirmed renewal vouches for the member's key: past it, this member cannot
/// say it is live, and says so (`status`, `/metrics`, the keepalived check). The lease lives
/// a TTL past each renewal, so this is the TTL less one reply's wait: sound, with room for
/// one slow renewal and a re-opened stream before a health check moves a VIP.
pub const LIVE_FOR: Duration = Duration::from_millis(7500);
/// Every this many renewals the member's record is written again under its lease: a key
/// deleted by hand (or by a second controller of the same name) comes back, so "live" stays
/// what it claims, the key existing under the lease.
const REPUBLISH_EVERY: u32 = 4;
/// How often a member that is away tries etcd again.
const REJOIN_EVERY: Duration = Duration::from_secs(1);
/// How often a member that stays away says so again.
const AWAY_NOTICE_EVERY: Duration = Duration::from_secs(60);

/// This member's standing in etcd, shared by the keep-alive (which writes it) with `status`,
/// `/metrics` and the follower's acknowledgements (which read it).
#[derive(Debug)]
pub struct Standing {
    /// The lease its keys live under now; a new one when it registers again.
    lease: AtomicI64,
    /// When etcd last renewed that lease with the member's record under it (`None`: not
    /// since the member lost it).
    confirmed: Mutex<Option<Instant>>,
    /// An acknowledgement that could not be written (etcd away, or the lease gone): the
    /// keep-alive writes it once the member is back, so a leader waiting for it sees it.
    unacked: Mutex<Option<(String, Vec<u8>)>>,
}

impl Standing {
    #[must_use]
    pub fn new(lease: i64) -> Self {
        Self {
            lease: AtomicI64::new(lease),
            confirmed: Mutex::new(Some(Instant::now())),
            unacked: Mutex::new(None),
        }
    }

    /// The lease this member's keys live under now.
    pub fn lease(&self) -> i64 {
        self.lease.load(Ordering::Relaxed)
    }

    /// This member's key exists under its current lease, as far as etcd confirmed within
    /// [`LIVE_FOR`]. A function of time: a keep-alive that hangs cannot keep it true.
    pub fn live(&self) -> bool {
        lock(&self.confirmed).is_some_and(|at| at.elapsed() < LIVE_FOR)
    }

    fn confirm(&self) {
        *lock(&self.confirmed) = Some(Instant::now());
    }

    fn lose(&self) {
        *lock(&self.confirmed) = None;
    }

    /// Keeps an acknowledgement to write again if writing it failed.
    pub fn owe_ack(&self, key: String, value: Vec<u8>) {
        *lock(&self.unacked) = Some((key, value));
    }

    /// The acknowledgement at `key` was written: it is no longer owed (a newer one, owed
    /// since, stays owed).
    pub fn acked(&self, key: &str) {
        let mut owed = lock(&self.unacked);
        if owed.as_ref().is_some_and(|(k, _)| k == key) {
            *owed = None;
        }
    }
}

/// Why this member is not live, for its one log line.
#[derive(Debug)]
enum Left {
    /// The lease no longer exists (it expired while etcd was away, was revoked, or was lost
    /// when etcd was restored from a snapshot): the member registers again.
    LeaseGone,
    /// etcd did not answer, or the keep-alive stream broke: the same lease is tried again.
    Unreachable(String),
    /// etcd answered but refused the registration (the name is live on another machine).
    Refused(String),
}

impl std::fmt::Display for Left {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::LeaseGone => write!(
                f,
                "its lease ended (expired while etcd was away, revoked, or lost in a restore)"
            ),
            Self::Unreachable(why) => write!(f, "etcd is unreachable ({why})"),
            Self::Refused(why) => write!(f, "registering again was refused: {why}"),
        }
    }
}

/// While a member is away: since when, and when it last said so.
struct Away {
    since: Instant,
    said: Instant,
}

/// Logs each change of standing once: left, still away (every minute), rejoined.
#[derive(Default)]
struct Log {
    away: Option<Away>,
}

impl Log {
    fn left(&mut self, fleet: &str, why: &Left) {
        match &mut self.away {
            None => {
                warn!(fleet = %fleet, "this member left the fleet: {why}; the datapath keeps its committed state, and the member rejoins as soon as etcd answers");
                let now = Instant::now();
                self.away = Some(Away {
                    since: now,
                    said: now,
                });
            }
            Some(away) if away.said.elapsed() >= AWAY_NOTICE_EVERY => {
                warn!(fleet = %fleet, away_s = away.since.elapsed().as_secs(), "this member is still away from the fleet: {why}");
                away.said = Instant::now();
            }
            Some(_) => {}
        }
    }

    fn rejoined(&mut self, fleet: &str, lease: i64, new_lease: bool) {
        if let Some(away) = self.away.take() {
            info!(fleet = %fleet, lease = %format!("{lease:x}"), new_lease, away_s = %format!("{:.1}", away.since.elapsed().as_secs_f64()), "this member rejoined the fleet");
        }
    }
}

/// Keeps this member in the fleet until `shutdown`, on one keep-alive stream re-made when it
/// breaks. Whatever ended the lease, the member notices within [`LIVE_FOR`] and registers again
/// under a new one as soon as etcd answers. Losing etcd changes nothing on the datapath
/// (docs/fleet.md, invariant 4). On `shutdown` the lease is revoked, so a clean stop leaves
/// the fleet at once instead of after the TTL.
///
/// A broken stream alone does not make the member "not live": with one etcd node of three
/// down, a third of new streams land on it and fail, and the next attempt (at once) lands
/// elsewhere. Only a lease that is gone, or no confirmation for [`LIVE_FOR`], does.
pub async fn keep_membership(
    mut client: Client,
    fleet: String,
    member: Arc<Mutex<Member>>,
    standing: Arc<Standing>,
    shutdown: CancellationToken,
) {
    let mut log = Log::default();
    let mut new_lease = false;
    // Failed attempts in a row: the first is retried at once, the others after a pause.
    let mut failed = 0u32;
    while !shutdown.is_cancelled() {
        if failed > 1 {
            pause(&shutdown).await;
        }
        let lease = standing.lease();
        let open = super::retry(|| {
            let mut client = client.clone();
            async move {
                keepalive::Renewer::open(&mut client, lease)
                    .await
                    .map_err(keepalive::Broken::into_etcd)
            }
        });
        let opened = tokio::select! {
            () = shutdown.cancelled() => break,
            o = tokio::time::timeout(REPLY_TIMEOUT, open) => o,
        };
        let mut renewer = match opened {
            Ok(Ok(Some(renewer))) => renewer,
            Ok(Ok(None)) => {
                standing.lose();
                log.left(&fleet, &Left::LeaseGone);
                match register_again(&mut client, &fleet, &member).await {
                    Ok(lease) => {
                        standing.lease.store(lease, Ordering::Relaxed);
                        new_lease = true;
                        failed = 0;
                    }
                    Err(why) => {
                        log.left(&fleet, &why);
                        failed += 2;
                    }
                }
                continue;
            }
            Ok(Err(e)) => {
                failed += 1;
                unconfirmed(&standing, &mut log, &fleet, e.to_string());
                continue;
            }
            Err(_) => {
                failed += 1;
                let why = format!("no answer within {REPLY_TIMEOUT:?}");
                unconfirmed(&standing, &mut log, &fleet, why);
                continue;
            }
        };
        // The record again under this lease (a restore may have lost or aged it), and any
        // acknowledgement that could not be written while the member was away.
        if let Err(why) = republish(&mut client, &fleet, &member, &standing).await {
            failed += 1;
            unconfirmed(&standing, &mut log, &fleet, why);
            continue;
        }
        failed = 0;
        standing.confirm();
        log.rejoined(&fleet, lease, std::mem::take(&mut new_lease));
        let mut renewals = 0u32;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(RENEW_EVERY) => {}
            }
            match tokio::time::timeout(REPLY_TIMEOUT, renewer.renew()).await {
                Ok(Ok(keepalive::Renewal::Alive)) => {
                    standing.confirm();
                    renewals += 1;
                    // An owed acknowledgement is written at once; the record now and then.
                    let owed = lock(&standing.unacked).is_some();
                    if owed || renewals.is_multiple_of(REPUBLISH_EVERY) {
                        if let Err(why) = republish(&mut client, &fleet, &member, &standing).await {
                            tracing::debug!(fleet = %fleet, error = %why, "writing the member record again failed; next renewal");
                        }
                    }
                }
                Ok(Ok(keepalive::Renewal::Gone)) => {
                    standing.lose();
                    log.left(&fleet, &Left::LeaseGone);
                    break;
                }
                Ok(Err(e)) => {
                    unconfirmed(&standing, &mut log, &fleet, e.to_string());
                    break;
                }
                Err(_) => {
                    let why = format!("no answer within {REPLY_TIMEOUT:?}");
                    unconfirmed(&standing, &mut log, &fleet, why);
                    break;
                }
            }
        }
    }
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        client.lease_revoke(standing.lease()),
    )
    .await;
}

/// etcd did not confirm the lease this time: the member is away once its last confirmation
/// is older than [`LIVE_FOR`] (said once, then every minute).
fn unconfirmed(standing: &Standing, log: &mut Log, fleet: &str, why: String) {
    if standing.live() {
        tracing::debug!(fleet = %fleet, error = %why, "a lease renewal failed; trying again");
    } else {
        log.left(fleet, &Left::Unreachable(why));
    }
}

/// Waits before trying etcd again, or until `shutdown`.
async fn pause(shutdown: &CancellationToken) {
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = tokio::time::sleep(REJOIN_EVERY) => {}
    }
}

/// Registers this member under a new lease, bounded: why not, if etcd did not answer.
async fn register_again(
    client: &mut Client,
    fleet: &str,
    member: &Mutex<Member>,
) -> Result<i64, Left> {
    let me = current(member);
    match tokio::time::timeout(REPLY_TIMEOUT * 2, register(client, fleet, &me)).await {
        Ok(Ok(lease)) => Ok(lease),
        Ok(Err(FleetError::Refused(why))) => Err(Left::Refused(why)),
        Ok(Err(FleetError::Etcd(e))) => Err(Left::Unreachable(super::brief(&e))),
        Ok(Err(e)) => Err(Left::Unreachable(e.to_string())),
        Err(_) => Err(Left::Unreachable(format!(
            "registering: no answer within {:?}",
            REPLY_TIMEOUT * 2
        ))),
    }
}

/// Writes the member record under the current lease, then the acknowledgement it owes.
async fn republish(
    client: &mut Client,
    fleet: &str,
    member: &Mutex<Member>,
    standing: &Standing,
) -> Result<(), String> {
    let lease = standing.lease();
    let me = current(member);
    let owed = lock(&standing.unacked).clone();
    let write = async {
        publish(client, fleet, &me, lease).await?;
        if let Some((key, value)) = owed {
            client
                .put(
                    key.clone(),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await?;
            standing.acked(&key);
        }
        Ok::<_, FleetError>(())
    };
    match tokio::time::timeout(REPLY_TIMEOUT, write).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("publishing: no answer within {REPLY_TIMEOUT:?}")),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_only_while_a_confirmation_is_recent_and_the_lease_is_not_gone() {
        let standing = Standing::new(7);
        assert!(standing.live(), "registered just now");
        *lock(&standing.confirmed) = Instant::now().checked_sub(LIVE_FOR);
        assert!(
            !standing.live(),
            "a keep-alive that hangs cannot keep it live"
        );
        standing.confirm();
        assert!(standing.live());
        standing.lose();
        assert!(!standing.live(), "a lease that is gone is not live at once");
        assert_eq!(standing.lease(), 7);
    }

    #[test]
    fn an_ack_written_late_does_not_clear_a_newer_one_owed_since() {
        let standing = Standing::new(1);
        standing.owe_ack("acks/3/m1".into(), b"3".to_vec());
        // The keep-alive writes epoch 3's; meanwhile epoch 4's write failed and is owed.
        standing.owe_ack("acks/4/m1".into(), b"4".to_vec());
        standing.acked("acks/3/m1");
        assert_eq!(
            lock(&standing.unacked).as_ref().map(|(k, _)| k.clone()),
            Some("acks/4/m1".to_owned())
        );
        standing.acked("acks/4/m1");
        assert!(lock(&standing.unacked).is_none());
    }
}
