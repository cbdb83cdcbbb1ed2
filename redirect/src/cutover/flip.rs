//! Step 7: the flip, the cutover's one commit point, and the release of held connections.

use std::time::{Instant, SystemTime};

use redirect_common::cutover::Cutover;

use super::{
    CutoverError, Phase, Run,
    journal::{self, Entry, Step},
};
use crate::sync::lock;

/// Writes `ACTIVE`, if and only if the fence has held without a gap since the barrier.
///
/// That one write moves new connections, lifts the hold and makes the old server's fence
/// permanent (`Cutover::fences`/`holds` read `ACTIVE`), so a crash right after it leaves a
/// consistent state. Before it, any error is undone; after it, nothing is.
pub fn commit(run: &mut Run) -> Result<(), CutoverError> {
    run.ctl.set_phase(Phase::Flip);
    run.check_deadline(Phase::Flip)?;
    let t = Instant::now();
    {
        let mut maps = lock(&run.ctl.host.maps);
        let lease = run
            .lease
            .as_ref()
            .ok_or_else(|| CutoverError::abort(Phase::Flip, "no hold was taken"))?;
        let own = lease.locked();
        if maps.active()? != Some(run.from) {
            return Err(CutoverError::abort(
                Phase::Flip,
                "ACTIVE was changed behind the cutover's back (flip --immediate?); not flipping",
            ));
        }
        if !lease.unbroken(&own)? {
            return Err(CutoverError::abort(
                Phase::Flip,
                "the fence lapsed before the flip (the controller stalled longer than its lease), so a client may have written to the old server after the barrier",
            ));
        }
        maps.set_active(run.to)?;
        lease.stop();
        drop(own);
        // Tidy only: with ACTIVE moved, the hold no longer applies and the fence no longer
        // expires, whatever these deadlines say.
        let _ = maps.set_cutover(Cutover {
            hold_until_ns: 0,
            fence_until_ns: 0,
            fenced_backend: run.from.index(),
            flags: 0,
        });
    }
    let detail = format!("new connections go to the {}", run.to);
    record_commit(run, t, detail);
    Ok(())
}

/// After the commit point (one host's `ACTIVE` write, or a fleet's committed epoch): nothing
/// is undone from here; the write pause is measured and the flip journaled with the drain's
/// deadline, which a successor that finds it resumes.
pub fn record_commit(run: &mut Run, t: Instant, detail: String) {
    run.undo = super::Undo::default();
    // Writes pause from the fence (not the hold: short-lived connections still write
    // between the two) to the flip.
    run.report.write_pause_ms =
        run.fenced_at.unwrap_or(run.held_at).elapsed().as_secs_f64() * 1000.0;
    let drain_until = SystemTime::now() + run.req.drain_timeout;
    run.rec.note(
        t,
        Entry {
            step: Step::Flip,
            source_lsn: run.report.fence_lsn,
            target_lsn: run.report.applied_lsn,
            drain_until_ms: Some(journal::unix_ms(drain_until)),
            detail,
            ..Entry::default()
        },
    );
}

/// Re-injects every parked SYN, which the datapath now sends to the new server.
pub fn release(run: &mut Run) {
    run.ctl.set_phase(Phase::Release);
    let t = Instant::now();
    let released = run.ctl.host.release_twice();
    run.report.held_syns = released.as_ref().map_or(0, |n| *n);
    run.report.hold_ms = run.held_at.elapsed().as_secs_f64() * 1000.0;
    let detail = match released {
        Ok(n) => format!("{n} held connection(s) released to the {}", run.to),
        Err(e) => format!(
            "releasing held connections failed ({e}); their clients retransmit to the {}",
            run.to
        ),
    };
    run.rec.note(
        t,
        Entry {
            step: Step::Release,
            detail,
            ..Entry::default()
        },
    );
}
