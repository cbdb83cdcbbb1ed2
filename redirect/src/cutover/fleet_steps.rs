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
use tracing::warn;

use crate::fleet::{
    Fleet, FleetError, lead,
    state::{self, Committed, Epoch, FleetPhase, Guard},
};

/// How long the leader waits for every member to acknowledge an epoch.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// This cutover's fleet part: the fleet steps run only when it leads one.
fn fleet_run(run: &mut Run) -> &mut super::FleetRun {
    run.fleet
        .as_mut()
        .expect("a fleet step runs only in a cutover that leads a fleet")
}

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
    fleet_run(run).hold = Some(committed);
    super::fault_point(super::FaultPoint::Acks).await;
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
    let members_proxied = acks
        .applied
        .iter()
        .filter(|(m, _)| **m != fleet.settings.member)
        .filter_map(|(_, p)| p.clone())
        .collect();
    let this = fleet_run(run);
    this.roster_revision = acks.roster_revision;
    this.members_proxied = members_proxied;
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
    let this = fleet_run(run);
    let hold = this
        .hold
        .clone()
        .ok_or_else(|| CutoverError::abort(Phase::Flip, "no fleet hold was committed"))?;
    let guard = Guard::Commit {
        enrolled_by: this.roster_revision,
        leader_key: this.leadership.key(),
    };
    let committed = match lead::commit_next(fleet, &hold, run.to, &guard).await {
        Ok(c) => c,
        Err(FleetError::Refused(why)) => return Err(fleet_error(Phase::Flip, why)),
        // The answer was lost and etcd stayed unreadable: the commit may have landed, and the
        // members would then follow it. Undoing the database side beside a committed target
        // would be the split this protocol exists to prevent: wait for etcd to say.
        Err(unknown) => settle_unknown_commit(run, fleet, &hold, &unknown).await?,
    };
    // Committed: nothing is undone from here.
    fleet_run(run).hold = None;
    let detail = format!(
        "fleet epoch {} committed: every member sends new connections to the {}",
        committed.state.epoch, run.to
    );
    super::flip::record_commit(run, t, detail);
    fleet_run(run).hold = Some(committed);
    Ok(())
}

/// How often the leader reads etcd while a commit's outcome is unknown.
const SETTLE_EVERY: Duration = Duration::from_millis(500);

/// Reads etcd until it says whether the commit after `hold` landed: `Ok` with it if it did
/// (the caller takes the after-commit path), an abort if the `Hold` is still there or was
/// aborted. No deadline: guessing either way could split the fleet from the database. The
/// members meanwhile hold, then drop new connections (they cannot confirm either).
async fn settle_unknown_commit(
    run: &Run,
    fleet: &Fleet,
    hold: &Committed,
    why: &FleetError,
) -> Result<Committed, CutoverError> {
    let started = Instant::now();
    let mut said: Option<Instant> = None;
    let mut client = fleet.client();
    // Not a `crate::poll` wait: it has no deadline (see above), and it says every 5 s that
    // it is still waiting.
    loop {
        let read = tokio::time::timeout(
            Duration::from_secs(2),
            state::read(&mut client, &fleet.settings.fleet),
        )
        .await;
        match read {
            Ok(Ok(Some(now))) => {
                let committed = now.state.epoch.0 == hold.state.epoch.0 + 1
                    && now.state.phase == FleetPhase::Idle
                    && now.state.active == run.to;
                if committed {
                    run.rec.say(format!(
                        "etcd answered after {:.1} s: the commit had landed (epoch {})",
                        started.elapsed().as_secs_f64(),
                        now.state.epoch
                    ));
                    return Ok(now);
                }
                return Err(fleet_error(
                    Phase::Flip,
                    format!(
                        "the commit did not land (etcd holds epoch {} with the {} active)",
                        now.state.epoch, now.state.active
                    ),
                ));
            }
            Ok(Ok(None)) => {
                return Err(fleet_error(
                    Phase::Flip,
                    "the fleet's state is gone from etcd",
                ));
            }
            Ok(Err(_)) | Err(_) => {}
        }
        if said.is_none_or(|at| at.elapsed() >= Duration::from_secs(5)) {
            said = Some(Instant::now());
            let line = format!(
                "the commit's outcome is unknown ({why}); etcd has not answered for {:.0} s. Waiting: nothing is undone until etcd says whether it landed (restore etcd's quorum: etcdctl endpoint health)",
                started.elapsed().as_secs_f64()
            );
            warn!("{line}");
            run.rec.say(line);
        }
        tokio::time::sleep(SETTLE_EVERY).await;
    }
}

/// After the commit: waits for the members to apply it, and says who did not.
pub async fn await_members(run: &mut Run, fleet: &Fleet) {
    run.ctl.set_phase(Phase::Release);
    let t = Instant::now();
    let Some(committed) = run.fleet.as_mut().and_then(|f| f.hold.take()) else {
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
    lead::forget_acks(fleet, &[Epoch(epoch.0 - 1), epoch]).await;
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

/// What undoing a fleet cutover found in etcd.
pub enum FleetUndo {
    /// The abort is committed (by this leader or by a member): the old backend stays, and
    /// the database side is undone.
    Aborted(String),
    /// This leader's commit had landed after all: nothing is undone, the cutover finishes.
    Committed(Committed),
    /// etcd holds neither this cutover's abort nor its commit (the fleet moved on: this
    /// leader's office lapsed and another cutover began), or cannot be read: the database
    /// side is left as it is rather than undone under a fleet that may not follow the old
    /// backend.
    Unsettled(String),
}

/// Undo before the commit: the epoch after the `Hold` names the old backend again, so every
/// member lifts its fence and releases its held connections there. Says what etcd holds
/// afterwards, which decides whether the database side may be undone.
pub async fn abort(run: &mut Run) -> Option<FleetUndo> {
    let this = run.fleet.as_mut()?;
    let hold = this.hold.take()?;
    let fleet = &this.fleet.clone();
    let why = match lead::commit_next(fleet, &hold, run.from, &Guard::StateOnly).await {
        Ok(c) => return Some(FleetUndo::Aborted(describe_abort(run, fleet, &c).await)),
        Err(e) => e,
    };
    let mut client = fleet.client();
    let now = match lead::read_back(&mut client, &fleet.settings.fleet).await {
        Ok(Some(now)) => now,
        Ok(None) => {
            return Some(FleetUndo::Unsettled(
                "the fleet's state is gone from etcd".into(),
            ));
        }
        Err(e) => {
            return Some(FleetUndo::Unsettled(format!(
                "could not commit the fleet's abort ({why}) nor read etcd ({e}): members abort by themselves once this leader is gone, and drop new connections until then"
            )));
        }
    };
    let next = hold.state.epoch.0 + 1;
    let s = &now.state;
    if s.epoch.0 == next && s.phase == FleetPhase::Idle && s.active == run.from {
        return Some(FleetUndo::Aborted(describe_abort(run, fleet, &now).await));
    }
    if s.epoch.0 == next
        && s.phase == FleetPhase::Idle
        && s.active == run.to
        && s.written_by == fleet.settings.member
    {
        return Some(FleetUndo::Committed(now));
    }
    Some(FleetUndo::Unsettled(format!(
        "etcd holds epoch {} ({:?}, the {} active, written by {}), neither this cutover's abort nor its commit: the fleet moved on past it ({why})",
        s.epoch, s.phase, s.active, s.written_by
    )))
}

/// "fleet epoch 3 committed: every member lifted its fence ...".
async fn describe_abort(run: &Run, fleet: &Fleet, c: &Committed) -> String {
    let acks = lead::await_acks(fleet, c.state.epoch, ACK_TIMEOUT).await;
    lead::forget_acks(fleet, &[Epoch(c.state.epoch.0 - 1), c.state.epoch]).await;
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
