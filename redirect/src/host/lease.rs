//! The hold and the fence, under a lease the kernel enforces.
//!
//! The kernel keeps a hold and a fence only until a deadline [`LEASE`] ahead, and a task
//! renews it every [`RENEW_EVERY`] while its owner lives. A controller that dies (or stalls)
//! therefore strands nobody for longer than the lease. What happens at a lapse is the
//! lease's [`Lapse`]: on one host the old server is still the truth, so both lift; in a
//! fleet another member may have committed the flip, so the fence stays and new SYNs are
//! dropped (their clients retry) until the committed state is read.
//!
//! One renewer serves both: what it asks before each renewal (nothing but a deadline on one
//! host; etcd, in a fleet) is its [`Keeper`].

use std::{
    path::Path,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use redirect_common::cutover::{Cutover, LAPSE_CLOSED, LEASE_NS};
use tracing::warn;

use crate::{
    clock,
    datapath::{DatapathError, Maps, Role},
    sync::lock,
};

/// How long the kernel keeps a hold and a fence without a renewal.
pub const LEASE: Duration = Duration::from_nanos(LEASE_NS);
/// How often the lease is renewed.
pub const RENEW_EVERY: Duration = Duration::from_millis(200);
/// The flip only happens with at least this much of the lease left.
const FLIP_MARGIN: Duration = Duration::from_millis(200);

/// What the kernel does when the lease runs out without a renewal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lapse {
    /// Hold and fence lift: one host alone, whose old server is still `ACTIVE` and the truth.
    Open,
    /// The fence stays and new SYNs are dropped ([`LAPSE_CLOSED`]): a fleet member, which
    /// must not guess what the fleet committed.
    Closed,
}

impl Lapse {
    const fn flags(self) -> u32 {
        match self {
            Self::Open => 0,
            Self::Closed => LAPSE_CLOSED,
        }
    }
}

/// What the renewer does at a tick.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    Renew,
    /// Not now (the owner cannot confirm it should): the kernel's lapse takes over if this
    /// lasts.
    Skip,
    /// Never again: the lease runs out within [`LEASE`].
    Stop,
}

/// Asked by the renewer around each renewal.
pub trait Keeper: Send + 'static {
    /// Before a renewal: whether to write it.
    fn before(&mut self) -> impl Future<Output = Renewal> + Send;
    /// After a renewal was written.
    fn after(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Renews until a deadline: a cutover on one host, which has flipped or is undoing by then.
/// A stuck controller must not hold clients for ever.
pub struct Until(pub Instant);

impl Keeper for Until {
    async fn before(&mut self) -> Renewal {
        if Instant::now() > self.0 {
            Renewal::Stop
        } else {
            Renewal::Renew
        }
    }
}

/// A renewed hold, and once [`Lease::fence`] is called a fence, on one backend.
///
/// The lease has its own handle on the pinned `CUTOVER` map, behind its own lock: a GC pass
/// over a million connections holds the shared maps lock for seconds, and must never delay
/// a renewal past the lease.
pub struct Lease {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Lease {
    /// An owner that ends in any way (an error, a panic, a dropped task) stops renewing, so
    /// the kernel's lapse takes over within [`LEASE`].
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.task.abort();
    }
}

struct Shared {
    maps: Mutex<Maps>,
    fenced: u32,
    lapse: Lapse,
    /// Set under the maps lock: no renewal is written after it.
    stopped: AtomicBool,
    /// The fence is up (before it, only the hold is).
    fencing: AtomicBool,
    /// An open lease's deadline passed before a renewal: the fence had a gap.
    lapsed: AtomicBool,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Shared {
    fn value(&self, now_ns: u64) -> Cutover {
        Cutover::leased(
            self.fenced,
            self.fencing.load(Ordering::SeqCst),
            self.lapse.flags(),
            now_ns,
            ns(LEASE),
        )
    }

    /// An open lease still in force: nobody replaced it and its deadline has not passed.
    fn in_force(&self, maps: &Maps, now_ns: u64) -> bool {
        let fencing = self.fencing.load(Ordering::SeqCst);
        maps.cutover().is_ok_and(|c| {
            c.fenced_backend == self.fenced
                && now_ns
                    < if fencing {
                        c.fence_until_ns
                    } else {
                        c.hold_until_ns
                    }
        })
    }
}

impl Lease {
    /// Writes the hold of `fenced` (and its fence, if `fencing`: a fence raised before that
    /// must stay up) on a map handle of its own under the pins in `dir`, and renews it.
    pub fn take(
        dir: &Path,
        fenced: Role,
        lapse: Lapse,
        fencing: bool,
        keeper: impl Keeper,
    ) -> Result<Self, DatapathError> {
        let shared = Arc::new(Shared {
            maps: Mutex::new(Maps::open(dir)?),
            fenced: fenced.index(),
            lapse,
            stopped: AtomicBool::new(false),
            fencing: AtomicBool::new(fencing),
            lapsed: AtomicBool::new(false),
        });
        {
            let mut maps = lock(&shared.maps);
            maps.set_cutover(shared.value(clock::monotonic_ns()))?;
        }
        let task = tokio::spawn(renew(shared.clone(), keeper));
        Ok(Self { shared, task })
    }

    /// Raises the fence under the running lease: from here no proxied client's query or
    /// COMMIT reaches the fenced backend.
    pub fn fence(&self) -> Result<(), DatapathError> {
        let mut maps = lock(&self.shared.maps);
        self.shared.fencing.store(true, Ordering::SeqCst);
        maps.set_cutover(self.shared.value(clock::monotonic_ns()))
    }

    /// The fence has held without a gap and holds for a while yet. Call under
    /// [`Lease::locked`].
    pub fn unbroken(&self, maps: &Maps) -> Result<bool, DatapathError> {
        let c = maps.cutover()?;
        Ok(!self.shared.lapsed.load(Ordering::SeqCst)
            && self.shared.fencing.load(Ordering::SeqCst)
            && clock::monotonic_ns() + ns(FLIP_MARGIN) < c.fence_until_ns)
    }

    /// The lease's own map handle, locked: no renewal happens while it is held.
    pub fn locked(&self) -> MutexGuard<'_, Maps> {
        lock(&self.shared.maps)
    }

    /// Stops renewing; call under [`Lease::locked`], before the write that replaces the
    /// lease.
    pub fn stop(&self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.task.abort();
    }
}

async fn renew(shared: Arc<Shared>, mut keeper: impl Keeper) {
    let mut tick = tokio::time::interval(RENEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // `take` wrote the first lease.
    tick.tick().await;
    loop {
        tick.tick().await;
        if shared.stopped.load(Ordering::SeqCst) {
            return;
        }
        match keeper.before().await {
            Renewal::Stop => return,
            Renewal::Skip => continue,
            Renewal::Renew => {}
        }
        {
            let mut maps = lock(&shared.maps);
            if shared.stopped.load(Ordering::SeqCst) {
                return;
            }
            let now = clock::monotonic_ns();
            if shared.lapse == Lapse::Open && !shared.in_force(&maps, now) {
                // Renewing now would raise a fence that had a gap: a client may have written
                // to the old server meanwhile. The flip sees this and refuses.
                shared.lapsed.store(true, Ordering::SeqCst);
                return;
            }
            if let Err(e) = maps.set_cutover(shared.value(now)) {
                warn!(error = %e, "renewing the cutover lease failed");
            }
        }
        keeper.after().await;
    }
}
