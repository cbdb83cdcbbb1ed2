//! The fault matrix's CI subset: the controller killed at every step boundary, and each other
//! fault where it bites hardest. Every case cuts over two databases under writes. The full matrix (every fault × every step) is
//! `cargo xtask faults`, which writes docs/reliability.md.

use redirect_tests::{
    faults::{self, Fault, Mode, STEPS},
    require_root,
};

fn check(fault: Fault, step: &'static str, expect: Option<&str>) {
    faults::check(Mode::Proxy, fault, step, expect);
}

#[test]
fn controller_killed_at_every_step_boundary() {
    require_root();
    for step in STEPS {
        // Before the flip the successor rolls back; from `release` on it finishes.
        let want = if matches!(step, "release" | "drain") {
            "finished"
        } else {
            "rolled back"
        };
        check(Fault::Kill, step, Some(want));
    }
}

#[test]
fn other_faults_where_they_bite() {
    require_root();
    // SIGTERM lets a cutover in progress flip or undo itself before the controller exits.
    check(Fault::Term, "flip", Some("finished"));
    check(Fault::ReplicationStopped, "barrier", Some("rolled back"));
    check(Fault::TargetLock, "sequences", Some("rolled back"));
    check(Fault::JournalFull, "barrier", Some("rolled back"));
    check(Fault::JournalFull, "drain", Some("finished"));
    // Several databases: one that appears mid-cutover has nothing to carry it, and one
    // database's replication stopping stops the cutover like the first one's would.
    check(Fault::DatabaseAppears, "barrier", Some("rolled back"));
    check(Fault::OneDatabaseStopped, "barrier", Some("rolled back"));
    // A short outage: the cutover may ride it out or roll back; either keeps the promise.
    check(Fault::TargetDown, "barrier", None);
    check(Fault::SourceDown, "sequences", None);
}
