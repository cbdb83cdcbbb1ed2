//! A member's side of a fleet cutover: the hold and the fence a `Hold` epoch asks for, kept
//! up only while this member can confirm that epoch is still the committed one, and lifted
//! only by the next committed epoch.
//!
//! 1. [`hold`]: park new SYNs, let short-lived connections finish, raise the fence, all with
//!    [`Lapse::Closed`]: if this member stops renewing (it lost etcd, or its controller died),
//!    its kernel keeps the fence and drops new SYNs instead of sending them to the old server,
//!    which the fleet may no longer name. It never guesses.
//! 2. The renewer re-reads the committed state (linearizable) before every renewal. It also
//!    watches the leader: a `Hold` whose leader is gone (its lease expired) is aborted by
//!    compare-and-swap, so a dead leader cannot leave the fleet fenced.
//! 3. [`release`]: the next epoch names the new backend (the commit) or the old one (an
//!    abort); the member writes `ACTIVE`, lifts its hold, re-injects the parked SYNs and, after
//!    a commit, drains its own connections to the old server.

use std::{
    sync::Arc,
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
    datapath::{DatapathError, Role},
    host::{
        Host, drain,
        lease::{Keeper, Lapse, Lease, Renewal},
        settle::settle,
    },
    pg::Dsn,
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

/// The two servers, for the drain after a committed flip (without them the drain resets
/// fenced connections and forgets the rest at its deadline).
#[derive(Clone, Debug)]
pub struct Servers {
    pub source: Dsn,
    pub target: Dsn,
    pub query_timeout: Duration,
}

impl Servers {
    fn dsn(&self, role: Role) -> &Dsn {
        match role {
            Role::Source => &self.source,
            Role::Target => &self.target,
        }
    }
}

/// A hold this member applied; dropped (or [`release`]d) to stop renewing it.
pub struct MemberHold {
    pub epoch: Epoch,
    /// The backend held and fenced: the fleet's `active` when the hold was committed.
    pub fenced: Role,
    /// How long to drain the old backend's connections after a commit.
    drain: Duration,
    lease: Lease,
}

/// Applies a `Hold` epoch: hold, settle, fence. Returns the hold (renewed until released)
/// and what the leader needs to end this member's sessions.
pub async fn hold(
    host: &Host,
    fleet: &Fleet,
    committed: &FleetState,
) -> Result<(MemberHold, Proxied), DatapathError> {
    let fenced = committed.active;
    let (dir, proxied) = {
        let maps = lock(&host.maps);
        let cfg = maps.config()?;
        let snat = maps
            .backend(fenced)?
            .map(|b| b.snat.to_string())
            .unwrap_or_default();
        (
            maps.dir.0.clone(),
            Proxied {
                snat,
                ports: (cfg.snat_port_min, cfg.snat_port_max),
            },
        )
    };
    // A member that missed epochs (partitioned across a whole cutover) may still send new
    // connections elsewhere: the hold is of the committed backend, so write it first.
    let was_fenced = {
        let mut maps = lock(&host.maps);
        maps.set_active(fenced)?;
        maps.cutover()?.is_closed_fence_of(fenced.index())
    };
    let hold_for = Duration::from_millis(committed.hold_ms.unwrap_or(10_000)) + HOLD_GRACE;
    let lease = Lease::take(
        &dir,
        fenced,
        Lapse::Closed,
        was_fenced,
        Confirmed {
            client: fleet.client(),
            fleet: fleet.settings.fleet.clone(),
            member: fleet.settings.member.clone(),
            epoch: committed.epoch,
            give_up: Instant::now() + hold_for,
            current: None,
            leader_checked: Instant::now(),
        },
    )?;
    let held = MemberHold {
        epoch: committed.epoch,
        fenced,
        drain: Duration::from_millis(committed.drain_ms.unwrap_or(30_000)),
        lease,
    };
    let busy = if was_fenced {
        0
    } else {
        settle(host, fenced).await?
    };
    held.lease.fence()?;
    info!(epoch = %committed.epoch, %fenced, busy, "fleet hold applied: new SYNs parked, the {fenced} fenced");
    Ok((held, proxied))
}

/// Renews a member's hold only while etcd confirms its `Hold` epoch is still the committed
/// one; aborts the `Hold` when it outlasts the leader's `--timeout` or its leader is gone.
struct Confirmed {
    client: etcd_client::Client,
    fleet: String,
    member: String,
    epoch: Epoch,
    give_up: Instant,
    /// The committed `Hold` as last confirmed.
    current: Option<state::Committed>,
    leader_checked: Instant,
}

impl Keeper for Confirmed {
    async fn before(&mut self) -> Renewal {
        let confirmed =
            match tokio::time::timeout(CONFIRM_TIMEOUT, state::read(&mut self.client, &self.fleet))
                .await
            {
                Ok(Ok(Some(c))) if c.state.epoch == self.epoch => Some(c),
                _ => None,
            };
        self.current.clone_from(&confirmed);
        let Some(current) = confirmed else {
            // etcd away, or a newer epoch the follower is about to apply: no renewal, so
            // the kernel's closed lapse takes over if this lasts.
            return Renewal::Skip;
        };
        if Instant::now() > self.give_up {
            // The leader's --timeout has passed (it no longer commits), yet the Hold is
            // still the committed epoch: abort it, by the same compare-and-swap.
            abort_hold(
                &mut self.client,
                &self.fleet,
                &self.member,
                &current,
                "outlasted the cutover's --timeout",
            )
            .await;
            return Renewal::Skip;
        }
        Renewal::Renew
    }

    async fn after(&mut self) {
        if self.leader_checked.elapsed() < LEADER_CHECK_EVERY {
            return;
        }
        self.leader_checked = Instant::now();
        if let Some(current) = self.current.clone() {
            abort_if_leaderless(&mut self.client, &self.fleet, &self.member, &current).await;
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
    host: &Arc<Host>,
    servers: Option<&Servers>,
    held: MemberHold,
    committed: &FleetState,
) -> Result<Released, DatapathError> {
    let drain_timeout = held.drain;
    let moved = committed.active != held.fenced;
    {
        let own = held.lease.locked();
        held.lease.stop();
        drop(own);
        let mut maps = lock(&host.maps);
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
    let held_syns = host.release_twice()?;
    if moved {
        let host = host.clone();
        let from = held.fenced;
        let servers = servers.cloned();
        tokio::spawn(async move {
            let qt = servers
                .as_ref()
                .map_or(Duration::from_secs(5), |s| s.query_timeout);
            let from_db = match &servers {
                Some(s) => s.dsn(from).connect().await.ok(),
                None => None,
            };
            let until = SystemTime::now() + drain_timeout;
            match drain::drain(&host, from, from_db.as_ref(), qt, until).await {
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
pub fn clear_stale(host: &Host, active: Role) -> Result<(), DatapathError> {
    let mut maps = lock(&host.maps);
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
    host.release_twice()?;
    Ok(())
}
