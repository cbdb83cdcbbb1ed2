//! The fault matrix in socket mode (zero-hop): the controller killed at every step boundary,
//! and the faults that bite a host's own clients, on an application host whose clients the
//! hooks redirect inside `connect()`. Each case cuts over two databases under writes; the
//! promises are the proxy's: nothing acknowledged lost, no connect refused, no client left
//! waiting.

use std::time::Duration;

use redirect_tests::{
    faults::{Fault, Mode, STEPS, run_case_in},
    require_root,
};

fn check(fault: Fault, step: &'static str, expect: Option<&str>) {
    let o = run_case_in(Mode::AppHost, fault, step);
    eprintln!("socket mode: {o:?}");
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
fn socket_mode_controller_killed_at_every_step_boundary() {
    require_root();
    for step in STEPS {
        let want = if matches!(step, "release" | "drain") {
            "finished"
        } else {
            "rolled back"
        };
        check(Fault::Kill, step, Some(want));
    }
}

#[test]
fn socket_mode_other_faults_where_they_bite() {
    require_root();
    check(Fault::Term, "flip", Some("finished"));
    check(Fault::ReplicationStopped, "barrier", Some("rolled back"));
    check(Fault::TargetDown, "barrier", None);
    check(Fault::SourceDown, "sequences", None);
}
