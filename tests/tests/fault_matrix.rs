//! The fault matrix's CI subset: the controller killed at every step boundary, and each other
//! fault where it bites hardest. Every case cuts over two databases under writes. The full matrix (every fault × every step) is
//! `cargo xtask faults`, which writes docs/reliability.md.

use std::time::Duration;

use redirect_tests::{
    faults::{Fault, STEPS, run_case},
    require_root,
};

fn check(fault: Fault, step: &'static str, expect: Option<&str>) {
    let o = run_case(fault, step);
    eprintln!("{o:?}");
    assert!(o.acked > 0, "the workload wrote nothing: {o:?}");
    assert_eq!(o.lost, 0, "acknowledged writes lost: {o:?}");
    if let Some(want) = expect {
        assert_eq!(o.result, want, "{o:?}");
    }
    if !fault.is_server_outage() {
        assert_eq!(o.refused, 0, "refused connects: {o:?}");
        assert!(
            o.max_wait < Duration::from_secs(8),
            "a client waited {:?}: {o:?}",
            o.max_wait
        );
    }
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
