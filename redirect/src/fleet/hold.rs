//! A member's side of a fleet cutover: the hold and the fence a `Hold` epoch asks for, kept
//! up only while this member can confirm that epoch is still the committed one, and lifted
//! only by the next committed epoch.
//!
//! 1. [`hold`]: park new SYNs, let short-lived connections finish, raise the fence, all with
//!    [`LAPSE_CLOSED`]: if this member stops renewing (it lost etcd, or its controller died),
//!    its kernel keeps the fence and drops new SYNs instead of sending them to the old server,
//!    which the fleet may no longer name. It never guesses.
//! 2. The renewer re-reads the committed state (linearizable) before every renewal. It also
//!    watches the leader: a `Hold` whose leader is gone (its lease expired) is aborted by
//!    compare-and-swap, so a dead leader cannot leave the fleet fenced.
//! 3. [`release`]: the next epoch names the new backend (the commit) or the old one (an
//!    abort); the member writes `ACTIVE`, lifts its hold, re-injects the parked SYNs and, after
//!    a commit, drains its own connections to the old server.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use etcd_client::GetOptions;
use redirect_common::cutover::{Cutover, LAPSE_CLOSED};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{
    Fleet, keys,
    state::{self, Epoch, FleetPhase, FleetState},
};
use crate::{
    clock,
    cutover::{
        Controller, CutoverError, drain, fence, flip,
        lease::{LEASE, RENEW_EVERY},
    },
    datapath::{Maps, Role},
    sync::lock,
};

/// How long a member keeps holding past the leader's `--timeout` before it aborts the `Hold`
/// itself (the leader checks its deadline before it commits, and both writes are
/// compare-and-swaps on the `Hold`, so only one of them can land).
const HOLD_GRACE: Duration = Duration::from_secs(2);
/// How often the renewer checks that the cutover's leader is still there.
const LEADER_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a confirmation read may take before this renewal is skipped.
const CONFIRM_TIMEOUT: Duration = Duration::from_millis(400);

/// What the leader needs to end this member's proxied sessions on the old server: the
/// address the old server sees them come from, and the SNAT port range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proxied {
    pub snat: String,
    pub ports: (u16, u16),
}

/// A hold this member applied; dropped (or [`release`]d) to stop renewing it.
pub struct MemberHold {
    pub epoch: Epoch,
    /// The backend held and fenced: the fleet's `active` when the hold was committed.
    pub fenced: Role,
    /// How long to drain the old backend's connections after a commit.
    drain: Duration,
    stopped: Arc<AtomicBool>,
    fencing: Arc<AtomicBool>,
    maps: Arc<std::sync::Mutex<Maps>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MemberHold {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.task.abort();
    }
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn closed(fenced: Role, fencing: bool, now_ns: u64) -> Cutover {
    let until = now_ns + ns(LEASE);
    Cutover {
        hold_until_ns: until,
        fence_until_ns: if fencing { until } else { 0 },
        fenced_backend: fenced.index(),
        flags: LAPSE_CLOSED,
    }
}

/// Whether `c` is a closed fence of `fenced` that a controller raised for a fleet hold: a
/// controller restarted in the middle of the hold keeps it up rather than lower it to settle
/// again (the leader may have taken its barrier: the old server must take no more writes).
fn already_fenced(c: Cutover, fenced: Role) -> bool {
    c.flags & LAPSE_CLOSED != 0 && c.fenced_backend == fenced.index() && c.fence_until_ns != 0
}

/// The hold a member writes before it attaches when it joins, or restarts, while the fleet
/// is in a `Hold` ([`crate::datapath::Joining`]): closed, so new SYNs are parked, then
/// dropped if `follow` does not confirm the hold in time, never sent on unfenced; and a fence
/// `existing` holds for it stays up.
#[must_use]
pub fn prearmed(existing: Cutover, active: Role, now_ns: u64) -> Cutover {
    closed(active, already_fenced(existing, active), now_ns)
}

/// Applies a `Hold` epoch: hold, settle, fence. Returns the hold (renewed until released)
/// and what the leader needs to end this member's sessions.
pub async fn hold(
    ctl: &Arc<Controller>,
    fleet: &Fleet,
    committed: &FleetState,
) -> Result<(MemberHold, Proxied), CutoverError> {
    let fenced = committed.active;
    let (own, proxied) = {
        let maps = lock(&ctl.maps);
        let cfg = maps.config()?;
        let snat = maps
            .backend(fenced)?
            .map(|b| b.snat.to_string())
            .unwrap_or_default();
        (
            Maps::open(&maps.dir.0)?,
            Proxied {
                snat,
                ports: (cfg.snat_port_min, cfg.snat_port_max),
            },
        )
    };
    // A member that missed epochs (partitioned across a whole cutover) may still send new
    // connections elsewhere: the hold is of the committed backend, so write it first.
    let was_fenced = {
        let mut maps = lock(&ctl.maps);
        maps.set_active(fenced)?;
        already_fenced(maps.cutover()?, fenced)
    };
    let maps = Arc::new(std::sync::Mutex::new(own));
    lock(&maps).set_cutover(closed(fenced, was_fenced, clock::monotonic_ns()))?;
    let stopped = Arc::new(AtomicBool::new(false));
    let fencing = Arc::new(AtomicBool::new(was_fenced));
    let hold_for = Duration::from_millis(committed.hold_ms.unwrap_or(10_000)) + HOLD_GRACE;
    let task = tokio::spawn(renew(
        Renewal {
            maps: maps.clone(),
            stopped: stopped.clone(),
            fencing: fencing.clone(),
            fenced,
            epoch: committed.epoch,
            give_up: Instant::now() + hold_for,
        },
        fleet.client(),
        fleet.settings.fleet.clone(),
        fleet.settings.member.clone(),
    ));
    let held = MemberHold {
        epoch: committed.epoch,
        fenced,
        drain: Duration::from_millis(committed.drain_ms.unwrap_or(30_000)),
        stopped,
        fencing,
        maps,
        task,
    };
    let busy = if was_fenced {
        0
    } else {
        fence::settle(ctl, fenced).await?
    };
    {
        let mut own = lock(&held.maps);
        held.fencing.store(true, Ordering::SeqCst);
        own.set_cutover(closed(fenced, true, clock::monotonic_ns()))?;
    }
    info!(epoch = %committed.epoch, %fenced, busy, "fleet hold applied: new SYNs parked, the {fenced} fenced");
    Ok((held, proxied))
}

struct Renewal {
    maps: Arc<std::sync::Mutex<Maps>>,
    stopped: Arc<AtomicBool>,
    fencing: Arc<AtomicBool>,
    fenced: Role,
    epoch: Epoch,
    give_up: Instant,
}

/// Renews the kernel deadlines while the `Hold` epoch is confirmed to be the committed one;
/// aborts it if its leader is gone.
async fn renew(r: Renewal, mut client: etcd_client::Client, fleet: String, member: String) {
    let mut tick = tokio::time::interval(RENEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leader_checked = Instant::now();
    loop {
        tick.tick().await;
        if r.stopped.load(Ordering::SeqCst) {
            return;
        }
        let timed_out = Instant::now() > r.give_up;
        let confirmed =
            match tokio::time::timeout(CONFIRM_TIMEOUT, state::read(&mut client, &fleet)).await {
                Ok(Ok(Some(c))) if c.state.epoch == r.epoch => Some(c),
                _ => None,
            };
        let Some(current) = confirmed else {
            // etcd away, or a newer epoch the follower is about to apply: no renewal, so
            // the kernel's closed lapse takes over if this lasts.
            continue;
        };
        if timed_out {
            // The leader's --timeout has passed (it no longer commits), yet the Hold is
            // still the committed epoch: abort it, by the same compare-and-swap.
            abort_hold(
                &mut client,
                &fleet,
                &member,
                &current,
                "outlasted the cutover's --timeout",
            )
            .await;
            continue;
        }
        {
            let mut maps = lock(&r.maps);
            if r.stopped.load(Ordering::SeqCst) {
                return;
            }
            let fencing = r.fencing.load(Ordering::SeqCst);
            if let Err(e) = maps.set_cutover(closed(r.fenced, fencing, clock::monotonic_ns())) {
                warn!(error = %e, "renewing the fleet hold failed");
            }
        }
        if leader_checked.elapsed() >= LEADER_CHECK_EVERY {
            leader_checked = Instant::now();
            abort_if_leaderless(&mut client, &fleet, &member, &current).await;
        }
    }
}

/// A `Hold` whose leader is gone would fence the fleet until someone acts: abort it (the old
/// backend stays active; nothing was committed). Compare-and-swap, so if the leader did
/// commit meanwhile, or another member aborted first, this writes nothing.
async fn abort_if_leaderless(
    client: &mut etcd_client::Client,
    fleet: &str,
    member: &str,
    current: &state::Committed,
) {
    let leaders = super::retry(|| {
        let mut client = client.clone();
        async move {
            client
                .get(
                    keys::election(fleet),
                    Some(GetOptions::new().with_prefix().with_count_only()),
                )
                .await
        }
    })
    .await;
    if !matches!(leaders, Ok(ref r) if r.count() == 0) {
        return;
    }
    abort_hold(client, fleet, member, current, "its leader is gone").await;
}

/// Commits the epoch after `current` (a `Hold`) with the old backend still active.
async fn abort_hold(
    client: &mut etcd_client::Client,
    fleet: &str,
    member: &str,
    current: &state::Committed,
    why: &str,
) {
    let abort = current
        .state
        .next(FleetPhase::Idle, current.state.active, member);
    match state::compare_and_swap(
        client,
        fleet,
        current.mod_revision,
        &state::Guard::StateOnly,
        &abort,
    )
    .await
    {
        Ok(Some(_)) => {
            warn!(epoch = %abort.epoch, "the fleet cutover {why}: aborted it (epoch {} keeps the {})", abort.epoch, abort.active);
        }
        Ok(None) => {}
        Err(e) => warn!(error = %e, "could not abort a fleet cutover that {why}"),
    }
}

/// What [`release`] did.
#[derive(Debug)]
pub struct Released {
    pub held_syns: u64,
    /// The backend new connections now go to.
    pub active: Role,
}

/// Applies the epoch after a `Hold`: `committed.active` is the new backend (the cutover
/// committed) or the fenced one (it aborted). Writes `ACTIVE` and lifts the hold under the
/// hold's own map handle (no renewal can land after it), then re-injects parked SYNs; after a
/// commit, drains this member's connections to the old backend in the background.
pub fn release(
    ctl: &Arc<Controller>,
    held: MemberHold,
    committed: &FleetState,
) -> Result<Released, CutoverError> {
    let drain_timeout = held.drain;
    let moved = committed.active != held.fenced;
    {
        let own = lock(&held.maps);
        held.stopped.store(true, Ordering::SeqCst);
        held.task.abort();
        drop(own);
        let mut maps = lock(&ctl.maps);
        // Whatever the hold found, the committed backend is what new connections get.
        maps.set_active(committed.active)?;
        if moved {
            // ACTIVE moved: the fence on the old backend is permanent and the hold no longer
            // applies, whatever the deadlines say; clear them and the closed lapse.
            maps.set_cutover(Cutover {
                hold_until_ns: 0,
                fence_until_ns: 0,
                fenced_backend: held.fenced.index(),
                flags: 0,
            })?;
        } else {
            maps.set_cutover(Cutover::IDLE)?;
        }
    }
    let held_syns = flip::release_twice(ctl)?;
    if moved {
        let ctl = ctl.clone();
        let from = held.fenced;
        tokio::spawn(async move {
            let from_db = match ctl.dsn(from) {
                Ok(dsn) => dsn.connect().await.ok(),
                Err(_) => None,
            };
            let until = SystemTime::now() + drain_timeout;
            match drain::drain(&ctl, from, from_db.as_ref(), until).await {
                Ok(d) => info!(drained = %drain::describe(from, &d), "fleet drain done"),
                Err(e) => {
                    warn!(error = %e, "fleet drain failed; the old backend's connections stay fenced");
                }
            }
        });
    }
    // Ends the hold for good (its renewer is stopped already).
    drop(held);
    Ok(Released {
        held_syns,
        active: committed.active,
    })
}

/// Lifts a closed hold that no live [`MemberHold`] owns (its controller died, or the hold
/// failed half-way), once the committed `active` is applied: towards a moved backend the
/// fence stays permanent; otherwise everything is lifted.
pub fn clear_stale(ctl: &Controller, active: Role) -> Result<(), CutoverError> {
    let mut maps = lock(&ctl.maps);
    let c = maps.cutover()?;
    if c.flags & LAPSE_CLOSED == 0 {
        return Ok(());
    }
    let lifted = if c.fenced_backend == active.index() {
        Cutover::IDLE
    } else {
        Cutover {
            hold_until_ns: 0,
            fence_until_ns: 0,
            fenced_backend: c.fenced_backend,
            flags: 0,
        }
    };
    maps.set_cutover(lifted)?;
    drop(maps);
    flip::release_twice(ctl)?;
    Ok(())
}
