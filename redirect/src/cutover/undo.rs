//! Undoing a cutover stopped before the flip: the old server was the truth all along.

use redirect_common::cutover::Cutover;

use super::catalog::DROP_IDLE_SLOT;
use super::{Run, fleet_steps::FleetUndo, quote_ident};
use crate::pg::Server;
use crate::{datapath::Role, pg::timed, sync::lock};

/// What [`undo`] did.
pub enum Undone {
    /// Undone, as described.
    Done(String),
    /// A fleet's commit had landed after all (its answer was lost): nothing was undone, and
    /// the cutover is to be finished from this committed epoch.
    CommittedAfterAll(crate::fleet::state::Committed),
}

/// Lifts the fence and releases held connections to the old server, re-enables the stopped
/// subscription and drops the reverse slot. In a fleet, only once etcd holds the abort.
pub async fn undo(run: &mut Run) -> Undone {
    let mut did = Vec::new();
    // A fleet's members first: they hold clients until the abort is committed. What etcd
    // then holds decides whether the database side may be undone at all.
    match super::fleet_steps::abort(run).await {
        None => {}
        Some(FleetUndo::Aborted(aborted)) => did.push(aborted),
        Some(FleetUndo::Committed(committed)) => return Undone::CommittedAfterAll(committed),
        Some(FleetUndo::Unsettled(why)) => {
            run.undo = super::Undo::default();
            return Undone::Done(format!(
                "{why}; the database side is LEFT AS IT IS (replication not turned back, the reverse slot kept): check `redirect status` and `redirect history`, then flip again or finish by hand"
            ));
        }
    }
    if run.undo.datapath {
        let moved = {
            let mut maps = lock(&run.ctl.host.maps);
            if let Some(lease) = &run.lease {
                let _own = lease.locked();
                lease.stop();
            }
            match maps.active() {
                // Someone flipped behind the cutover's back (`flip --immediate`): lifting the
                // fence now would let both servers take writes. Leave it, and say so.
                Ok(Some(a)) if a != run.from => Some(a),
                _ => {
                    if let Err(e) = maps.set_cutover(Cutover::IDLE) {
                        did.push(format!(
                            "FAILED to lift the fence ({e}); it lapses by itself within {:?}",
                            crate::host::lease::LEASE
                        ));
                    }
                    None
                }
            }
        };
        if let Some(a) = moved {
            did.push(format!(
                "ACTIVE now names the {a}, not the {}: the fence on the {} is LEFT IN PLACE (both would take writes); check the servers before lifting it",
                run.from, run.from
            ));
        } else {
            match run.ctl.host.release_twice() {
                Ok(n) => did.push(format!(
                    "fence lifted, {n} held connection(s) released to the {}",
                    run.from
                )),
                Err(e) => did.push(format!(
                    "fence lifted; releasing held connections failed ({e}): they retransmit"
                )),
            }
        }
    }
    // Each database's replication, as it was.
    let many = run.lanes.len() > 1;
    for lane in &mut run.lanes {
        let name = |what: String| {
            if many {
                format!("{}{what}", lane.prefix())
            } else {
                what
            }
        };
        if lane.disabled_subscription
            && let Some(sub) = lane.subscription.clone()
        {
            let sql = format!("ALTER SUBSCRIPTION {} ENABLE", quote_ident(&sub));
            match timed(
                Server::Subscriber,
                "re-enabling the subscription",
                run.qt,
                lane.to_db.batch_execute(&sql),
            )
            .await
            {
                Ok(()) => did.push(name(format!("subscription {sub} re-enabled"))),
                Err(e) => did.push(name(format!("FAILED to re-enable subscription {sub}: {e}"))),
            }
        }
        if lane.made_reverse_slot {
            // The reverse slot is on the target: the new server of a forward cutover.
            let target = lane.db(Role::Target, run.from);
            let slot = lane.reverse_slot.clone();
            match timed(
                Role::Target,
                "dropping the reverse slot",
                run.qt,
                target.execute(DROP_IDLE_SLOT, &[&slot]),
            )
            .await
            {
                Ok(_) => did.push(name("reverse slot dropped".into())),
                Err(e) => did.push(name(format!("FAILED to drop the reverse slot {slot}: {e}"))),
            }
        }
        lane.disabled_subscription = false;
        lane.made_reverse_slot = false;
    }
    run.undo = super::Undo::default();
    Undone::Done(if did.is_empty() {
        "nothing to undo".into()
    } else {
        did.join(", ")
    })
}
