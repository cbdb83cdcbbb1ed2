//! `cargo xtask faults --fleet`: the fleet under etcd faults, every fault at every step of the
//! fleet protocol, on one two-member fleet (3-node etcd, real PostgreSQL, XDP in namespaces)
//! under the ledger workload; writes its section of docs/reliability.md. About 45 s a case.

use std::fmt::Write as _;

use redirect_tests::{
    fleet_faults::{self, Fault, STEPS},
    fleet_lab::FleetLab,
};

/// docs/reliability.md's fleet section lies between these (the single-host matrix's writer
/// keeps it).
pub const BEGIN: &str = "<!-- fleet faults: begin -->";
pub const END: &str = "<!-- fleet faults: end -->";

fn main() {
    redirect_tests::require_root();
    let only: Option<String> = std::env::args().nth(1);
    let t = std::time::Instant::now();
    let mut fl = FleetLab::new("ffset", 2);
    fl.start_members(&[]);
    let mut outcomes = Vec::new();
    let mut round = 0;
    for fault in Fault::ALL {
        if only.as_deref().is_some_and(|o| !fault.name().contains(o)) {
            continue;
        }
        for step in STEPS {
            round += 1;
            let o = fleet_faults::run_case(&mut fl, fault, step, round);
            eprintln!(
                "{:<44} at {:<8} {:<40} ended on {:<14} changes {}/{} flips, unanswered {}/{} lost {} of {}, longest wait {:.2} s, next flip after {}",
                fault.name(),
                step,
                o.flip,
                o.ended_on,
                o.probes.changes,
                o.flips,
                o.probes.unanswered,
                o.probes.rounds * 2,
                o.lost,
                o.acked,
                o.max_wait.as_secs_f64(),
                o.recovered.map_or_else(
                    || "NONE".to_owned(),
                    |d| format!("{:.1} s", d.as_secs_f64())
                )
            );
            outcomes.push(o);
        }
    }
    let lost: usize = outcomes.iter().map(|o| o.lost).sum();
    let split = outcomes
        .iter()
        .filter(|o| o.probes.changes > o.flips)
        .count();
    let unrecovered = outcomes.iter().filter(|o| o.recovered.is_none()).count();
    let mut section = format!("{BEGIN}\n## The fleet under etcd faults\n\n");
    let _ = writeln!(
        section,
        "Produced by `cargo xtask faults --fleet` ({} cases in {:.0} s on {}). One fleet of two proxy hosts (members `proxy-0`, `proxy-1`) in front of the same two PostgreSQL 15 servers (logical replication), a real 3-node etcd cluster, XDP in the kernel; four writers of every shape behind each VIP. For each case, `proxy-0`'s controller is restarted with a fault point just before the named step of the fleet protocol (it pauses 1.5 s there), asked to flip, and the fault is injected during the pause; it heals after the time its name gives. Every 250 ms both VIPs are probed at once with a new connection (`SHOW cluster_name`, 2 s connect timeout); *backend changes seen* is the most changes of backend along a chain of probes each sent after the previous one was answered (so provably in that order): without a split it is at most the number of flips that took effect. Afterwards: every acknowledged write is looked for on the backend the fleet ended on, and `proxy-1` is asked to flip back until it succeeds (no controller restarted), for up to twice the 10 s member lease.\n",
        outcomes.len(),
        t.elapsed().as_secs_f64(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let _ = writeln!(
        section,
        "**Across the set: {lost} acknowledged writes lost, {split} cases in which the probes show the VIPs split (more backend changes in provable order than flips), {unrecovered} cases with no successful flip within 20 s of the heal.**\n"
    );
    section.push_str(&fleet_faults::table(&outcomes));
    let _ = write!(
        section,
        "\nReading it: *unanswered* probes are new connections held or dropped, never sent to a server the fleet had left: during a hold a member parks SYNs, and a member that cannot confirm its hold with etcd drops them rather than guess. *longest client wait* is the longest any writer waited for an answer to a statement or a connection attempt.\n{END}\n"
    );
    if only.is_some() {
        print!("{section}");
    } else {
        write_section(&section);
        eprintln!("wrote the fleet section of docs/reliability.md");
    }
    assert_eq!(lost, 0, "acknowledged writes were lost");
}

/// Replaces the fleet section of docs/reliability.md (or appends it).
fn write_section(section: &str) {
    let path = "docs/reliability.md";
    let doc = std::fs::read_to_string(path).unwrap_or_default();
    let doc = match (doc.find(BEGIN), doc.find(END)) {
        (Some(b), Some(e)) => format!(
            "{}{section}{}",
            &doc[..b],
            &doc[e + END.len()..].trim_start_matches('\n')
        ),
        _ => format!("{}\n{section}", doc.trim_end()),
    };
    std::fs::write(path, doc).expect("writing docs/reliability.md");
}
