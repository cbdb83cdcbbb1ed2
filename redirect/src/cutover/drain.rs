//! Step 10: drain the old server's connections ([`crate::host::drain`]), journaled.
//!
//! The drain's deadline is journaled with the flip, so a controller restarted mid-drain
//! resumes it ([`super::recover`]).

use std::time::{Instant, SystemTime};

use super::{
    Phase, Run,
    journal::{Entry, Step},
};
use crate::host::drain::{describe, drain};

/// The drain of a cutover that just flipped, journaled.
pub async fn after_cutover(run: &mut Run) {
    run.ctl.set_phase(Phase::Drain);
    let t = Instant::now();
    let until = SystemTime::now() + run.req.drain_timeout;
    let result = drain(
        &run.ctl.host,
        run.from,
        Some(&run.from_db),
        run.ctl.query_timeout(),
        until,
    )
    .await;
    let detail = match result {
        Ok(d) => {
            run.report.drained_on_use = d.on_use;
            run.report.reset_unknown = d.reset_unknown;
            run.report.terminated_at_drain = d.at_deadline;
            describe(run.from, &d)
        }
        Err(e) => format!("FAILED: {e}; the old server's connections stay fenced"),
    };
    run.rec.note(
        t,
        Entry {
            step: Step::Drain,
            detail,
            ..Entry::default()
        },
    );
}
