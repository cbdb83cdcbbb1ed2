//! The kernel-side steps of a cutover when this host leads a fleet (docs/fleet.md): instead
//! of writing its own maps, the leader commits epochs in etcd that every member (itself
//! included) applies, and waits for every member's acknowledgement.
//!
//! - [`hold`]: commit `Hold`; every live member holds, settles and fences, and says where its
//!   sessions come from (the fence step then ends them all). A member that does not
//!   acknowledge in time, or fails, aborts the cutover (the undo commits the old backend).
//! - [`commit`]: commit the new backend, by compare-and-swap on the `Hold`: the commit point.
//! - [`await_members`]: after it, wait for the members to apply it; one that does not is
//!   reported, never undone (it applies the committed epoch when it reaches etcd again, and
//!   drops new connections meanwhile instead of guessing).

use std::time::{Duration, Instant};

use super::{
    CutoverError, Phase, Run,
    journal::{Entry, Step},
};
use crate::fleet::{Fleet, lead};

/// How long the leader waits for every member to acknowledge an epoch.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(2);

fn fleet_error(phase: Phase, e: impl std::fmt::Display) -> CutoverError {
    CutoverError::abort(phase, format!("fleet: {e}"))
}

/// Commits the `Hold` and waits until every live member has held and fenced.
pub async fn hold(run: &mut Run, fleet: &Fleet) -> Result<(), CutoverError> {
    run.ctl.set_phase(Phase::Hold);
    let t = Instant::now();
    run.held_at = t;
    run.deadline = t + run.req.timeout;
    let committed = lead::commit_hold(
        fleet,
        run.from,
        run.to,
        run.req.timeout,
        run.req.drain_timeout,
    )
    .await
    .map_err(|e| fleet_error(Phase::Hold, e))?;
    let epoch = committed.state.epoch;
    run.fleet_hold = Some(committed);
    let acks = lead::await_acks(fleet, epoch, ACK_TIMEOUT.min(run.remaining()))
        .await
        .map_err(|e| fleet_error(Phase::Hold, e))?;
    if !acks.missing.is_empty() {
        return Err(fleet_error(
            Phase::Hold,
            format!(
                "epoch {epoch} (hold) was not applied by {} within {ACK_TIMEOUT:?}; aborting everywhere",
                acks.describe_missing()
            ),
        ));
    }
    run.members_proxied = acks
        .applied
        .iter()
        .filter(|(m, _)| **m != fleet.settings.member)
        .filter_map(|(_, p)| p.clone())
        .collect();
    run.fenced_at = Some(Instant::now());
    let members: Vec<&String> = acks.applied.keys().collect();
    run.rec.step(
        Step::Hold,
        t,
        format!(
            "fleet epoch {epoch}: every member ({}) parks new SYNs and fences the {}",
            members
                .iter()
                .map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            run.from
        ),
    )
}

/// The commit point: the epoch that names the new backend.
pub async fn commit(run: &mut Run, fleet: &Fleet) -> Result<(), CutoverError> {
    run.ctl.set_phase(Phase::Flip);
    run.check_deadline(Phase::Flip)?;
    let t = Instant::now();
    let hold = run
        .fleet_hold
        .clone()
        .ok_or_else(|| CutoverError::abort(Phase::Flip, "no fleet hold was committed"))?;
    let committed = lead::commit_next(fleet, &hold, run.to)
        .await
        .map_err(|e| fleet_error(Phase::Flip, e))?;
    // Committed: nothing is undone from here.
    run.fleet_hold = None;
    let detail = format!(
        "fleet epoch {} committed: every member sends new connections to the {}",
        committed.state.epoch, run.to
    );
    super::flip::record_commit(run, t, detail);
    run.fleet_hold = Some(committed);
    Ok(())
}

/// After the commit: waits for the members to apply it, and says who did not.
pub async fn await_members(run: &mut Run, fleet: &Fleet) {
    run.ctl.set_phase(Phase::Release);
    let t = Instant::now();
    let Some(committed) = run.fleet_hold.take() else {
        return;
    };
    let epoch = committed.state.epoch;
    let detail = match lead::await_acks(fleet, epoch, ACK_TIMEOUT).await {
        Ok(acks) if acks.missing.is_empty() => format!(
            "fleet epoch {epoch} applied by every member ({}): held connections released, old connections draining",
            acks.applied.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
        Ok(acks) => format!(
            "fleet epoch {epoch} NOT yet applied by {}: it drops new connections until it reaches etcd and applies it",
            acks.describe_missing()
        ),
        Err(e) => format!("could not read the members' acknowledgements ({e})"),
    };
    run.report.hold_ms = run.held_at.elapsed().as_secs_f64() * 1000.0;
    run.rec.note(
        t,
        Entry {
            step: Step::Release,
            detail,
            ..Entry::default()
        },
    );
}

/// Undo before the commit: the epoch after the `Hold` names the old backend again, so every
/// member lifts its fence and releases its held connections there.
pub async fn abort(run: &mut Run) -> Option<String> {
    let hold = run.fleet_hold.take()?;
    let fleet = run.ctl.fleet.as_ref()?;
    Some(match lead::commit_next(fleet, &hold, run.from).await {
        Ok(c) => {
            let acks = lead::await_acks(fleet, c.state.epoch, ACK_TIMEOUT).await;
            match acks {
                Ok(a) if a.missing.is_empty() => format!(
                    "fleet epoch {} committed: every member lifted its fence and released its held connections to the {}",
                    c.state.epoch, run.from
                ),
                Ok(a) => format!(
                    "fleet epoch {} committed (the {} stays active); not yet applied by {}",
                    c.state.epoch,
                    run.from,
                    a.describe_missing()
                ),
                Err(e) => format!(
                    "fleet epoch {} committed; acknowledgements unreadable ({e})",
                    c.state.epoch
                ),
            }
        }
        Err(e) => format!(
            "could not commit the fleet's abort ({e}): members abort by themselves once this leader is gone, and drop new connections until then"
        ),
    })
}
