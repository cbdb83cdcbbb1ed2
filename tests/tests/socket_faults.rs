//! The fault matrix in socket mode (zero-hop): the controller killed at every step boundary,
//! and the faults that bite a host's own clients, on an application host whose clients the
//! hooks redirect inside `connect()`. Each case cuts over two databases under writes; the
//! promises are the proxy's: nothing acknowledged lost, no connect refused, no client left
//! waiting.

use redirect_tests::{
    faults::{self, Fault, Mode, STEPS},
    require_root,
};

fn check(fault: Fault, step: &'static str, expect: Option<&str>) {
    faults::check(Mode::AppHost, fault, step, expect);
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
