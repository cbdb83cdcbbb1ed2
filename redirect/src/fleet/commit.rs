//! Committing a fleet-wide immediate flip: the new epoch is written by a compare-and-swap on
//! the state's revision (two members flipping at once: one wins, the other is refused), then
//! every live member's acknowledgement is awaited, within a deadline.
//!
//! This is the `flip --immediate` of a fleet: no hold, no fence, no barrier, as on one host.
//! The leader-driven safe cutover (hold+fence, flip+release, drain, rollback as epochs) is
//! the next step (docs/fleet.md).

use std::time::{Duration, Instant};

use serde::Serialize;

use super::{
    Fleet, FleetError,
    state::{self, Epoch, FleetPhase},
};
use crate::datapath::Role;

/// What a fleet flip did.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct FleetFlip {
    pub fleet: String,
    pub epoch: Epoch,
    pub from: Role,
    pub to: Role,
    /// Members that applied the new epoch in time.
    #[serde(default)]
    pub acked: Vec<String>,
    /// Live members that did not acknowledge within the deadline (they apply it when they
    /// reach etcd again).
    #[serde(default)]
    pub missing: Vec<String>,
    #[serde(default)]
    pub took_ms: u64,
}

/// Commits `to` as the fleet's active backend and waits up to `ack_timeout` for every live
/// member to apply it.
pub async fn flip(fleet: &Fleet, to: Role, ack_timeout: Duration) -> Result<FleetFlip, FleetError> {
    let started = Instant::now();
    let mut client = fleet.client();
    let name = &fleet.settings.fleet;
    let current = state::read(&mut client, name)
        .await?
        .ok_or_else(|| FleetError::Refused(format!("fleet {name} has no committed state")))?;
    if current.state.active == to {
        return Err(FleetError::Refused(format!(
            "fleet {name} already sends new connections to {to} (epoch {})",
            current.state.epoch
        )));
    }
    let next = current
        .state
        .next(FleetPhase::Idle, to, &fleet.settings.member);
    if current.state.phase != FleetPhase::Idle {
        return Err(FleetError::Refused(format!(
            "fleet {name} is in a cutover (epoch {} by {}); wait for it to end, or see `redirect status`",
            current.state.epoch, current.state.written_by
        )));
    }
    // A member on the roster that is not live may still serve through its datapath, and
    // would keep sending new connections to the old backend: refuse rather than split.
    let (roster, _) = super::member::roster(&mut client, name).await?;
    let live: Vec<String> = super::member::list(&mut client, name)
        .await?
        .into_iter()
        .map(|m| m.id)
        .collect();
    let down: Vec<String> = roster
        .into_iter()
        .map(|m| m.id)
        .filter(|id| !live.contains(id))
        .collect();
    if !down.is_empty() {
        return Err(FleetError::Refused(format!(
            "member(s) {} of fleet {name} are enrolled but not live: their datapaths may still send new connections to the {} and could not follow; bring them back, or if their hosts are gone for good, `redirect fleet forget` them",
            down.join(", "),
            current.state.active
        )));
    }
    if super::lead::write_or_read_back(
        &mut client,
        name,
        current.mod_revision,
        &state::Guard::StateOnly,
        &next,
    )
    .await?
    .is_none()
    {
        return Err(FleetError::Refused(format!(
            "another member committed a new epoch of fleet {name} meanwhile; check `redirect status` and retry"
        )));
    }
    let acks = super::lead::await_acks(fleet, next.epoch, ack_timeout).await?;
    Ok(FleetFlip {
        fleet: name.clone(),
        epoch: next.epoch,
        from: current.state.active,
        to,
        acked: acks.applied.into_keys().collect(),
        missing: acks.missing.into_keys().collect(),
        took_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}
