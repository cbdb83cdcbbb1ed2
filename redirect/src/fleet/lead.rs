//! The leader's side of a fleet cutover. The member that is asked to `flip` becomes the
//! fleet's leader for that cutover (an etcd election on its member lease, so a dead leader
//! loses the office within the lease's TTL), then drives two committed epochs:
//!
//! 1. [`commit_hold`]: `Hold` with the old backend still active. [`await_acks`] waits until
//!    every live member has held, settled and fenced, and says where its sessions come from.
//!    A missing or failed ack aborts (see [`commit_next`] with the old backend).
//! 2. The database side runs here alone (barrier, sequences, replication).
//! 3. [`commit_next`] with the new backend: the commit point, a compare-and-swap on the
//!    `Hold`'s revision, so it fails if a member aborted a cutover it thought leaderless.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use etcd_client::{GetOptions, LeaderKey, ResignOptions};

use super::{
    Fleet, FleetError,
    follow::Ack,
    hold::Proxied,
    keys, member,
    state::{self, Committed, Epoch, FleetPhase, FleetState},
};
use crate::datapath::Role;

/// How long `flip` waits to become the leader before it reports who leads.
const CAMPAIGN_TIMEOUT: Duration = Duration::from_secs(3);

/// This member leads the fleet's cutovers until dropped or [`Leadership::resign`]ed.
pub struct Leadership {
    key: LeaderKey,
    client: etcd_client::Client,
}

impl Leadership {
    /// Steps down at once (otherwise the office lapses with the member's lease).
    pub async fn resign(mut self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.client
                .resign(Some(ResignOptions::new().with_leader(self.key.clone()))),
        )
        .await;
    }
}

/// Becomes the fleet's leader, or says who is.
pub async fn lead(fleet: &Fleet) -> Result<Leadership, FleetError> {
    let mut client = fleet.client();
    let name = keys::election(&fleet.settings.fleet);
    let campaign = client.campaign(name.clone(), fleet.settings.member.clone(), fleet.lease());
    match tokio::time::timeout(CAMPAIGN_TIMEOUT, campaign).await {
        Ok(Ok(mut won)) => Ok(Leadership {
            key: won
                .take_leader()
                .ok_or_else(|| FleetError::Refused("etcd elected no leader key".into()))?,
            client,
        }),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => {
            let leader = client
                .get(name, Some(GetOptions::new().with_prefix()))
                .await
                .ok()
                .and_then(|r| {
                    r.kvs()
                        .first()
                        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                })
                .unwrap_or_else(|| "another member".into());
            Err(FleetError::Refused(format!(
                "{leader} is leading a cutover of fleet {}; wait for it to end (redirect status)",
                fleet.settings.fleet
            )))
        }
    }
}

/// Commits a `Hold` of `from` (still active) for a cutover to `to`.
pub async fn commit_hold(
    fleet: &Fleet,
    from: Role,
    to: Role,
    hold: Duration,
    drain: Duration,
) -> Result<Committed, FleetError> {
    let mut client = fleet.client();
    let name = &fleet.settings.fleet;
    let current = state::read(&mut client, name)
        .await?
        .ok_or_else(|| FleetError::Refused(format!("fleet {name} has no committed state")))?;
    if current.state.phase != FleetPhase::Idle || current.state.active != from {
        return Err(FleetError::Refused(format!(
            "fleet {name} is at epoch {} ({:?}, active {}), not idle on the {from}: see `redirect status`",
            current.state.epoch, current.state.phase, current.state.active
        )));
    }
    let mut next = current
        .state
        .next(FleetPhase::Hold, from, &fleet.settings.member);
    next.to = Some(to);
    next.hold_ms = Some(u64::try_from(hold.as_millis()).unwrap_or(u64::MAX));
    next.drain_ms = Some(u64::try_from(drain.as_millis()).unwrap_or(u64::MAX));
    let revision = write_or_read_back(&mut client, name, current.mod_revision, &next)
        .await?
        .ok_or_else(|| {
            FleetError::Refused(format!(
                "another member committed a new epoch of fleet {name} meanwhile; retry"
            ))
        })?;
    Ok(Committed {
        state: next,
        mod_revision: revision,
    })
}

/// Commits the epoch after `hold`: `active` is the new backend (the commit point) or the
/// old one (an abort). Fails if anyone wrote the state since the `Hold`.
pub async fn commit_next(
    fleet: &Fleet,
    hold: &Committed,
    active: Role,
) -> Result<Committed, FleetError> {
    let mut client = fleet.client();
    let name = &fleet.settings.fleet;
    let next = hold
        .state
        .next(FleetPhase::Idle, active, &fleet.settings.member);
    let revision = write_or_read_back(&mut client, name, hold.mod_revision, &next)
        .await?
        .ok_or_else(|| {
            FleetError::Refused(format!(
                "the fleet's state moved past epoch {} (a member aborted the cutover: its leader seemed gone, or its --timeout passed)",
                hold.state.epoch
            ))
        })?;
    Ok(Committed {
        state: next,
        mod_revision: revision,
    })
}

/// Writes `next` by compare-and-swap on `seen`; `Some(revision)` if it is committed, `None`
/// if someone else wrote first. A request that never reached etcd is retried, and an answer
/// that was lost (or a retry refused because the first try did land) is settled by reading
/// what etcd holds now: a lost answer cannot tell "written" from "refused".
pub(super) async fn write_or_read_back(
    client: &mut etcd_client::Client,
    name: &str,
    seen: i64,
    next: &FleetState,
) -> Result<Option<i64>, FleetError> {
    let written = super::retry(|| {
        let mut client = client.clone();
        async move {
            state::compare_and_swap(&mut client, name, seen, next)
                .await
                .map_err(|e| match e {
                    FleetError::Etcd(e) => e,
                    other => etcd_client::Error::InvalidArgs(other.to_string()),
                })
        }
    })
    .await;
    match written {
        Ok(Some(r)) => Ok(Some(r)),
        // The same epoch, phase and backend is the same outcome, whoever wrote it (a member's
        // abort and the leader's are one decision).
        _ => Ok(read_back(client, name)
            .await?
            .filter(|now| {
                (now.state.epoch, now.state.phase, now.state.active)
                    == (next.epoch, next.phase, next.active)
            })
            .map(|now| now.mod_revision)),
    }
}

/// Reads the committed state after a write whose outcome is unknown, for up to
/// [`READ_BACK`]: etcd electing a new leader takes a second or two, and giving up sooner
/// would undo a cutover etcd may have committed.
async fn read_back(
    client: &mut etcd_client::Client,
    name: &str,
) -> Result<Option<Committed>, FleetError> {
    let until = Instant::now() + READ_BACK;
    loop {
        match state::read(client, name).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() >= until => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// How long [`read_back`] keeps trying.
const READ_BACK: Duration = Duration::from_secs(6);

/// The acknowledgements of one epoch.
#[derive(Debug, Default)]
pub struct Acks {
    /// Members that applied it, with their proxied sessions (for a `Hold`).
    pub applied: BTreeMap<String, Option<Proxied>>,
    /// Live members that did not acknowledge in time, or failed (with why).
    pub missing: BTreeMap<String, String>,
}

/// Waits up to `timeout` until every live member acknowledged `epoch` as applied.
pub async fn await_acks(
    fleet: &Fleet,
    epoch: Epoch,
    timeout: Duration,
) -> Result<Acks, FleetError> {
    let mut client = fleet.client();
    let name = &fleet.settings.fleet;
    let deadline = Instant::now() + timeout;
    loop {
        let live: BTreeSet<String> = member::list(&mut client, name)
            .await?
            .into_iter()
            .map(|m| m.id)
            .collect();
        let resp = client
            .get(
                keys::acks(name, epoch),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        let mut acks = Acks::default();
        for ack in resp
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice::<Ack>(kv.value()).ok())
        {
            match (&ack.applied, &ack.error) {
                (Some(_), _) => {
                    acks.applied.insert(ack.member, ack.proxied);
                }
                (None, error) => {
                    acks.missing
                        .insert(ack.member, error.clone().unwrap_or_else(|| "failed".into()));
                }
            }
        }
        for m in &live {
            if !acks.applied.contains_key(m) && !acks.missing.contains_key(m) {
                acks.missing
                    .insert(m.clone(), "no acknowledgement yet".into());
            }
        }
        let failed = acks
            .missing
            .values()
            .any(|why| why != "no acknowledgement yet");
        if acks.missing.is_empty() || failed || Instant::now() >= deadline {
            return Ok(acks);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Acks {
    /// "proxy-b (no acknowledgement yet), proxy-c (...)".
    #[must_use]
    pub fn describe_missing(&self) -> String {
        self.missing
            .iter()
            .map(|(m, why)| format!("{m} ({why})"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
