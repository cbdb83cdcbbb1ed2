//! Steps 2 and 3: hold new connections, then fence the old server, under a lease.
//!
//! The hold and the fence are a [`Lease`] on this host's datapath ([`crate::host::lease`]):
//! a controller that dies (or stalls) strands nobody for longer than [`LEASE`]. The hold
//! lapses, held clients retransmit to the old server, which is still `ACTIVE` and still the
//! truth. A step that is merely slow never lets the fence lapse, because the lease is
//! renewed, and `--timeout` is enforced by the controller. If the lease ever did lapse (the
//! whole process stalled past it), the flip refuses: a client may have written to the old
//! server after the barrier.

use std::time::{Duration, Instant};

use super::{CutoverError, Phase, Run, journal::Step};
use crate::{
    host::lease::{LEASE, Lapse, Lease, Until},
    sync::lock,
};

/// Raises the fence under the running lease: from here no proxied client's query or COMMIT
/// reaches the old server.
pub fn fence(run: &mut Run) -> Result<(), CutoverError> {
    let lease = run
        .lease
        .as_ref()
        .ok_or_else(|| CutoverError::abort(Phase::Fence, "no hold was taken"))?;
    lease.fence()?;
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
    // The renewer stops by itself a little after --timeout: by then the cutover has either
    // flipped or is undoing, and a stuck controller must not hold clients for ever.
    // A promotion may outlast --timeout (it cannot be taken back): keep the fence for it.
    let extra = if run.logical {
        Duration::ZERO
    } else {
        super::replication::PROMOTION_WAIT
    };
    let dir = lock(&run.ctl.host.maps).dir.0.clone();
    run.lease = Some(Lease::take(
        &dir,
        run.from,
        Lapse::Open,
        false,
        Until(run.deadline + LEASE + extra),
    )?);
    run.rec.step(
        Step::Hold,
        t,
        format!(
            "new SYNs parked; the {} is fenced next (kernel lease {:?}, renewed; --timeout {:?})",
            run.from, LEASE, run.req.timeout
        ),
    )
}
