//! `cargo xtask faults`: every fault at every step boundary of a cutover under load; writes
//! docs/reliability.md. About 25 s per case, 49 cases.

use std::fmt::Write as _;

use redirect_tests::faults::{self, Fault, STEPS};

fn main() {
    redirect_tests::require_root();
    let only: Option<String> = std::env::args().nth(1);
    let t = std::time::Instant::now();
    let mut outcomes = Vec::new();
    for fault in Fault::ALL {
        for step in STEPS {
            if only.as_deref().is_some_and(|o| !fault.name().contains(o)) {
                continue;
            }
            let o = faults::run_case(fault, step);
            eprintln!(
                "{:<28} before {:<10} {:<12} lost {} of {}, refused {}, longest wait {:.2} s ({:.0} s)",
                fault.name(),
                step,
                o.result,
                o.lost,
                o.acked,
                o.refused,
                o.max_wait.as_secs_f64(),
                o.took.as_secs_f64()
            );
            outcomes.push(o);
        }
    }
    let lost: usize = outcomes.iter().map(|o| o.lost).sum();
    let mut doc = String::from("# Reliability: the cutover's fault matrix\n\n");
    let _ = writeln!(
        doc,
        "Produced by `cargo xtask faults` ({} cases in {:.0} s on {}). Each case is a fresh lab (two real PostgreSQL 15 servers, logical replication, XDP in the kernel) with six writers of every shape (prepared statements, reconnecting, explicit transactions, idle pooled connections) writing through the VIP while `redirect flip --to target --timeout 10s --drain-timeout 3s` runs. The controller pauses 3 s just before the named step (a fault point); the fault is injected during the pause; a killed controller is restarted one second later, as systemd would. Outcome is read from outside: where new connections go, every acknowledged write checked on that server, the workload's refused connects and longest wait for any statement's answer.\n",
        outcomes.len(),
        t.elapsed().as_secs_f64(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let _ = writeln!(
        doc,
        "**Acknowledged writes lost across the matrix: {lost}.**\n"
    );
    doc.push_str(&faults::table(&outcomes));
    doc.push_str("\nReading it: before `release` and `drain` the flip has not happened, so a fault ends in a rollback (the source never stopped being the truth) unless the step could still finish; from `release` on, the flip has happened and every fault ends with the cutover finished by the controller or its successor. SIGTERM (`systemctl stop`) lets a cutover in progress flip or undo itself before the controller exits, so it ends finished; SIGKILL leaves it to the restarted controller, which rolls back before the flip and finishes after it. A server's own outage (link down) makes its clients wait for it whatever the proxy does; those waits are the server's, and are shown as measured. Every wait above 1.5 s includes the 3 s pause of the fault point itself, during which new connections are held. A sequence lock that is still held on the target after the flip makes the target's own writers wait for it (their `nextval` queues behind the lock), which is the 7.7–8 s in its last two rows.\n");
    if only.is_none() {
        // The fleet's section (`cargo xtask faults --fleet`) is kept as it is.
        let old = std::fs::read_to_string("docs/reliability.md").unwrap_or_default();
        if let Some(fleet) = old.find("<!-- fleet faults: begin -->") {
            doc.push('\n');
            doc.push_str(&old[fleet..]);
        }
        std::fs::write("docs/reliability.md", doc).expect("writing docs/reliability.md");
        eprintln!("wrote docs/reliability.md");
    } else {
        print!("{doc}");
    }
    assert_eq!(lost, 0, "acknowledged writes were lost");
}
