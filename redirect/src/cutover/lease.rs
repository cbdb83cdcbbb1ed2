//! Steps 2 and 3: hold new connections, then fence the old server, under a lease.
//!
//! The kernel enforces the hold and the fence only until a deadline [`LEASE`] ahead, and a
//! task renews it every [`RENEW_EVERY`] while the cutover lives. A controller that dies (or
//! stalls) therefore strands nobody for longer than the lease: the hold lapses, held clients
//! retransmit to the old server, which is still `ACTIVE` and still the truth. A step that is
//! merely slow never lets the fence lapse, because the lease is renewed, and `--timeout` is
//! enforced by the controller. If the lease ever did lapse (the whole process stalled past
//! it), the flip refuses: a client may have written to the old server after the barrier.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use redirect_common::cutover::Cutover;
use tracing::warn;

use super::{CutoverError, Phase, Run, journal::Step};
use crate::{clock, datapath::Maps, sync::lock};

/// How long the kernel keeps a hold and a fence without a renewal.
pub const LEASE: Duration = Duration::from_millis(1500);
/// How often the lease is renewed.
pub const RENEW_EVERY: Duration = Duration::from_millis(200);
/// The flip only happens with at least this much of the lease left.
const FLIP_MARGIN: Duration = Duration::from_millis(200);

/// A renewed hold and fence on one backend.
///
/// The lease has its own handle on the pinned `CUTOVER` map, behind its own lock: a GC pass
/// over a million connections holds the shared maps lock for seconds, and must never delay a
/// renewal past the lease.
pub struct Lease {
    state: Arc<State>,
    maps: Arc<std::sync::Mutex<Maps>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Lease {
    /// A cutover that ends in any way (an error, a panic, a dropped task) stops renewing,
    /// so the kernel lifts the hold and the fence within [`LEASE`].
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct State {
    /// Set under the maps lock: no renewal is written after it.
    stopped: AtomicBool,
    /// The fence is up (before it, only the hold is).
    fencing: AtomicBool,
    /// The deadline passed before a renewal: the fence had a gap.
    lapsed: AtomicBool,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn leased(fenced: u32, fencing: bool, now_ns: u64) -> Cutover {
    let until = now_ns + ns(LEASE);
    Cutover {
        hold_until_ns: until,
        fence_until_ns: if fencing { until } else { 0 },
        fenced_backend: fenced,
        flags: 0,
    }
}

/// Raises the fence under the running lease: from here no proxied client's query or COMMIT
/// reaches the old server.
pub fn fence(run: &mut Run) -> Result<(), CutoverError> {
    let lease = run
        .lease
        .as_ref()
        .ok_or_else(|| CutoverError::abort(Phase::Fence, "no hold was taken"))?;
    let mut maps = lock(&run.ctl.maps);
    lease.state.fencing.store(true, Ordering::SeqCst);
    maps.set_cutover(leased(run.from.index(), true, clock::monotonic_ns()))?;
    run.fenced_at = Some(Instant::now());
    Ok(())
}

/// Holds new connections: from here no new connection starts anywhere (SYNs are parked).
/// The fence follows once short-lived connections have finished ([`fence`]).
pub fn hold(run: &mut Run) -> Result<(), CutoverError> {
    run.ctl.set_phase(Phase::Hold);
    let t = Instant::now();
    run.held_at = t;
    run.deadline = t + run.req.timeout;
    run.undo.datapath = true;
    let fenced = run.from.index();
    let own = Maps::open(&lock(&run.ctl.maps).dir.0)?;
    let maps = Arc::new(std::sync::Mutex::new(own));
    lock(&maps).set_cutover(leased(fenced, false, clock::monotonic_ns()))?;
    let state = Arc::new(State {
        stopped: AtomicBool::new(false),
        fencing: AtomicBool::new(false),
        lapsed: AtomicBool::new(false),
    });
    // The renewer stops by itself a little after --timeout: by then the cutover has either
    // flipped or is undoing, and a stuck controller must not hold clients for ever.
    // A promotion may outlast --timeout (it cannot be taken back): keep the fence for it.
    let extra = if run.logical {
        Duration::ZERO
    } else {
        super::replication::PROMOTION_WAIT
    };
    let give_up = run.deadline + LEASE + extra;
    let task = tokio::spawn(renew(maps.clone(), state.clone(), fenced, give_up));
    run.lease = Some(Lease { state, maps, task });
    run.rec.step(
        Step::Hold,
        t,
        format!(
            "new SYNs parked; the {} is fenced next (kernel lease {:?}, renewed; --timeout {:?})",
            run.from, LEASE, run.req.timeout
        ),
    )
}

async fn renew(
    shared: Arc<std::sync::Mutex<Maps>>,
    state: Arc<State>,
    fenced: u32,
    give_up: Instant,
) {
    let mut tick = tokio::time::interval(RENEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if Instant::now() > give_up {
            return;
        }
        let mut maps = lock(&shared);
        if state.stopped.load(Ordering::SeqCst) {
            return;
        }
        let now = clock::monotonic_ns();
        let fencing = state.fencing.load(Ordering::SeqCst);
        match maps.cutover() {
            Ok(c)
                if c.fenced_backend == fenced
                    && now
                        < if fencing {
                            c.fence_until_ns
                        } else {
                            c.hold_until_ns
                        } =>
            {
                if let Err(e) = maps.set_cutover(leased(fenced, fencing, now)) {
                    warn!(error = %e, "renewing the cutover lease");
                }
            }
            _ => {
                state.lapsed.store(true, Ordering::SeqCst);
                return;
            }
        }
    }
}

impl Lease {
    /// The fence has held without a gap and holds for a while yet. Call under [`Lease::locked`].
    pub fn unbroken(&self, maps: &Maps) -> Result<bool, CutoverError> {
        let c = maps.cutover()?;
        Ok(!self.state.lapsed.load(Ordering::SeqCst)
            && self.state.fencing.load(Ordering::SeqCst)
            && clock::monotonic_ns() + ns(FLIP_MARGIN) < c.fence_until_ns)
    }

    /// The lease's own map handle, locked: no renewal happens while it is held.
    pub fn locked(&self) -> std::sync::MutexGuard<'_, Maps> {
        lock(&self.maps)
    }

    /// Stops renewing; call under [`Lease::locked`], before the write that replaces the lease.
    pub fn stop(&self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        self.task.abort();
    }
}
