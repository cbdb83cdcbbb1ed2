//! Cutovers across `PostgreSQL` majors (13 and 17/18 from `cargo xtask setup`, 15 from Debian)
//! under the ledger workload, with rollback: the pairs CI runs. The full matrix is
//! `cargo xtask test --matrix` (docs/compatibility.md).

#![allow(
    clippy::too_many_lines,
    reason = "a lab scenario reads top to bottom as one story"
)]

use redirect_tests::{pg::Major, versions};

#[test]
fn logical_13_to_17_cuts_over_and_rolls_back_losing_nothing() {
    let mut steps = Vec::new();
    versions::logical("v1317", Major(13), Major(17), &mut |p| steps.push(p));
    assert_eq!(steps.len(), 2);
}

#[test]
fn logical_15_to_18_cuts_over_and_rolls_back_losing_nothing() {
    let mut steps = Vec::new();
    versions::logical("v1518", Major(15), Major(18), &mut |p| steps.push(p));
    assert_eq!(steps.len(), 2);
}

#[test]
fn physical_17_to_17_promotes_losing_nothing_and_refuses_a_rollback() {
    let mut steps = Vec::new();
    versions::physical("p17", Major(17), &mut |p| steps.push(p));
    assert_eq!(steps.len(), 2);
}

/// On 16+ the reverse replication is made before the hold. An attempt that aborts must take
/// it back (its slot would retain WAL on the target for ever), and it must never be live
/// while the forward subscription runs: a row written directly on the target would reach the
/// source and come back over the forward subscription (`origin = any`), a duplicate key that
/// stalls the forward apply. Then the next cutover still loses nothing.
#[test]
fn an_aborted_cutover_on_16_plus_takes_its_reverse_replication_back() {
    use redirect_tests::{
        Ns,
        cutover_lab::{assert_no_loss, flip, setup_versions, workload},
        pg::{acked_rows, psql},
        wait_for,
    };
    use std::time::Duration;

    let c = setup_versions("vab", Major(17), Major(17), &[]);
    let (lab, source, target) = (&c.lab, &c.source, &c.target);
    // The marker never arrives with the forward subscription off: the barrier times out.
    psql(
        lab,
        Ns::Target,
        target,
        "ALTER SUBSCRIPTION redirect_sub DISABLE",
    );
    let out = flip(lab, &["--to", "target", "--force", "--timeout", "1s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("rolled back"),
        "{err}"
    );
    let history = lab.redirect_ok(&["history"]);
    assert!(
        history.contains("before the hold"),
        "the early path ran: {history}"
    );
    assert_eq!(
        psql(
            lab,
            Ns::Target,
            target,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'redirect_reverse'"
        ),
        "0",
        "the aborted attempt dropped its reverse slot"
    );
    assert_eq!(
        psql(
            lab,
            Ns::Source,
            source,
            "SELECT count(*) FROM pg_subscription WHERE subname = 'redirect_reverse' AND subenabled"
        ),
        "0",
        "no live reverse subscription is left on the source"
    );
    psql(
        lab,
        Ns::Target,
        target,
        "ALTER SUBSCRIPTION redirect_sub ENABLE",
    );
    // A write made directly on the target (a key the source's sequence will hand out next).
    let next: i64 = psql(
        lab,
        Ns::Source,
        source,
        "SELECT last_value + 1 FROM acks_id_seq",
    )
    .parse()
    .expect("a sequence value");
    psql(
        lab,
        Ns::Target,
        target,
        &format!(
            "INSERT INTO acks (id, writer, seq) VALUES ({}, 999, 1)",
            next + 10_000_000
        ),
    );
    // Forward replication still flows: nothing came back to stall it.
    psql(
        lab,
        Ns::Source,
        source,
        "INSERT INTO acks (writer, seq) VALUES (998, 1)",
    );
    wait_for(
        Duration::from_secs(15),
        "a source write on the target",
        || {
            psql(
                lab,
                Ns::Target,
                target,
                "SELECT count(*) FROM acks WHERE writer = 998",
            ) == "1"
        },
    );
    assert_eq!(
        psql(
            lab,
            Ns::Source,
            source,
            "SELECT count(*) FROM acks WHERE writer = 999"
        ),
        "0",
        "the target's own write did not reach the source before the cutover"
    );
    // The next cutover makes it afresh and loses nothing.
    let load = workload(lab, 0..4, 4);
    std::thread::sleep(Duration::from_millis(1500));
    let out = flip(lab, &["--to", "target"]);
    let v = load.join().expect("workload");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_no_loss(&v, &acked_rows(lab, Ns::Target, target, ""), "target");
}

#[test]
fn logical_17_with_standbys_uses_failover_slots_and_rolls_back_losing_nothing() {
    let mut steps = Vec::new();
    versions::logical_with_standbys("v17fo", Major(17), &mut |p| steps.push(p));
    assert_eq!(steps.len(), 2);
}
