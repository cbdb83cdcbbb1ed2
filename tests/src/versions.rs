//! Cutovers between servers of different `PostgreSQL` majors, under the ledger workload: the
//! scenarios behind tests/tests/versions.rs (CI's three pairs) and `cargo xtask test --matrix`
//! (every pair, written to docs/compatibility.md).

use std::{collections::HashSet, sync::Arc, time::Duration};

use crate::{
    Lab, Ns, SOURCE_ADDR, TARGET_ADDR,
    cutover_lab::{self, flip, workload},
    pg::{self, Major, Pg, psql},
    require_root,
};

/// How a server pair replicates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replication {
    Logical,
    Physical,
}

impl Replication {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Replication::Logical => "logical",
            Replication::Physical => "physical",
        }
    }
}

/// A step of a scenario that passed, reported as soon as it did (the matrix records which step
/// a failure came after).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Passed {
    /// Writes moved to the target, every acknowledged one on it; how long writes paused
    /// (the controller's `write_pause_ms`).
    Cutover { write_pause_ms: f64 },
    /// Writes moved back to the source, every acknowledged one on it (logical); or, physical,
    /// `flip --to source` was refused and changed nothing.
    Rollback,
}

/// What [`PHYSICAL_ROLLBACK_REFUSAL`] the controller prints when asked to roll back a physical
/// cutover: the old primary must be rebuilt as a standby of the new one first.
pub const PHYSICAL_ROLLBACK_REFUSAL: &str = "rollback cannot be lossless";

fn rows(lab: &Lab, ns: Ns, pg: &Pg) -> HashSet<(i32, i64)> {
    pg::acked_rows(lab, ns, pg, "")
}

/// The server answers as `want`, so a scenario cannot silently run Debian's 15.
fn assert_answers_as(lab: &Lab, ns: Ns, pg: &Pg, want: Major) {
    assert_eq!(
        pg::answering_major(lab, ns, pg),
        want,
        "the {} server runs another major than asked",
        pg.name
    );
}

/// `flip --to <to> --json`; returns its report.
fn flip_ok(lab: &Lab, to: &str) -> serde_json::Value {
    let out = flip(lab, &["--to", to, "--drain-timeout", "2s", "--json"]);
    assert!(
        out.status.success(),
        "flip --to {to} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lab.status()["active"], to);
    serde_json::from_slice(&out.stdout).expect("flip --json")
}

/// The controller sets up the reverse replication before the hold exactly when both servers
/// are 16 or newer (`origin = none`); older ones get the reverse slot during the pause.
fn assert_reverse_timing(report: &serde_json::Value, source: Major, target: Major) {
    let reverse = report["reverse_replication"].as_str().unwrap_or_default();
    let early = reverse.contains("before the hold");
    let turned_off = std::env::var("REDIRECT_REVERSE_EARLY").is_ok_and(|v| v == "off");
    assert_eq!(
        early,
        source >= Major(16) && target >= Major(16) && !turned_off,
        "{source} -> {target}: reverse replication {reverse:?}"
    );
}

/// Logical replication `source` → `target`: a cutover under the ledger workload, then a
/// rollback over the reverse replication under more writes; 0 lost, 0 refused each way.
pub fn logical(lab_name: &str, source: Major, target: Major, passed: &mut dyn FnMut(Passed)) {
    let c = cutover_lab::setup_versions(lab_name, source, target, &[]);
    let lab = &c.lab;
    assert_answers_as(lab, Ns::Source, &c.source, source);
    assert_answers_as(lab, Ns::Target, &c.target, target);

    let load = workload(lab, 0..6, 10);
    std::thread::sleep(Duration::from_secs(3));
    let report = flip_ok(lab, "target");
    let v = load.join().expect("workload");
    cutover_lab::assert_no_loss_through_a_cutover(&v, &rows(lab, Ns::Target, &c.target), "target");
    assert_reverse_timing(&report, source, target);
    // No standby on the target: a failover slot would only stall decoding if someone named a
    // standby in synchronized_standby_slots, so the reverse slot must be a plain one.
    if target >= Major(17) {
        assert_eq!(
            reverse_slot_failover(lab, &c.target),
            "f",
            "{source} -> {target}: a failover reverse slot without a standby"
        );
    }
    passed(Passed::Cutover {
        write_pause_ms: report["write_pause_ms"].as_f64().unwrap_or(f64::NAN),
    });

    let load = workload(lab, 10..14, 7);
    std::thread::sleep(Duration::from_secs(2));
    flip_ok(lab, "source");
    let v2 = load.join().expect("workload");
    let on_source = rows(lab, Ns::Source, &c.source);
    cutover_lab::assert_no_loss_through_a_cutover(&v2, &on_source, "source");
    cutover_lab::assert_no_loss_through_a_cutover(
        &v,
        &on_source,
        "source (writes before the cutover)",
    );
    passed(Passed::Rollback);
}

/// `pg_replication_slots.failover` of the reverse slot on the target (17+).
fn reverse_slot_failover(lab: &Lab, target: &Pg) -> String {
    psql(
        lab,
        Ns::Target,
        target,
        "SELECT failover FROM pg_replication_slots WHERE slot_name = 'redirect_reverse'",
    )
}

/// A physical standby of `primary` in its own namespace (socket only), ready for slot
/// synchronization: `hot_standby_feedback` and a `dbname` in its `primary_conninfo`. Its slot
/// on the primary is `standby_<name>`.
fn standby_for_failover(lab: &mut Lab, ns: Ns, name: &str, primary: &Pg, addr: &str) -> Pg {
    let conninfo = format!(
        "primary_conninfo = 'host={addr} port=5432 user=postgres application_name={name} dbname=postgres'"
    );
    let standby = pg::start_standby_of_with(
        lab,
        ns,
        name,
        primary,
        addr,
        &[
            "listen_addresses = ''",
            "hot_standby_feedback = on",
            &conninfo,
        ],
    );
    crate::wait_for(Duration::from_secs(30), "the standby to stream", || {
        psql(
            lab,
            ns,
            primary,
            &format!(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'standby_{name}' AND active"
            ),
        ) == "1"
    });
    standby
}

/// Logical replication between two servers of `major` (17+), each with a physical standby:
/// the dry run notes that the forward slot is not a failover slot (a failover of the source
/// would lose it); the cutover makes the reverse slot a failover slot (the target has a
/// standby, named in its `synchronized_standby_slots`), which the target's standby can
/// synchronize; and the rollback over it loses nothing under the workload.
pub fn logical_with_standbys(lab_name: &str, major: Major, passed: &mut dyn FnMut(Passed)) {
    require_root();
    let mut lab = Lab::new(lab_name);
    let source = pg::start_version(&mut lab, Ns::Source, "source", major, &[]);
    let target = pg::start_version(&mut lab, Ns::Target, "target", major, &[]);
    // Before the standbys: it waits for exactly one active slot on the source.
    pg::setup_logical(&lab, &source, &target);
    let _source_standby =
        standby_for_failover(&mut lab, Ns::Source, "srcstandby", &source, SOURCE_ADDR);
    let target_standby =
        standby_for_failover(&mut lab, Ns::Target, "tgtstandby", &target, TARGET_ADDR);
    psql(
        &lab,
        Ns::Target,
        &target,
        "ALTER SYSTEM SET synchronized_standby_slots = 'standby_tgtstandby'",
    );
    psql(&lab, Ns::Target, &target, "SELECT pg_reload_conf()");
    cutover_lab::start(&mut lab, &[]);
    let lab = Arc::new(lab);

    let out = flip(&lab, &["--to", "target", "--dry-run", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("dry run --json");
    let note = plan["guardrails"]
        .as_array()
        .and_then(|g| g.iter().find(|f| f["guardrail"] == "failover-slot"))
        .unwrap_or_else(|| panic!("no failover-slot note: {plan}"));
    assert_eq!(note["blocks"], false, "{note}");
    let objects = note["objects"].to_string();
    assert!(objects.contains("standby_srcstandby"), "{note}");
    let fix = note["fix"].as_str().unwrap_or_default();
    assert!(fix.contains("SET (failover = true)"), "{note}");
    assert!(
        fix.contains("synchronized_standby_slots = 'standby_srcstandby'"),
        "{note}"
    );
    assert!(
        plan["plan"].as_array().is_some_and(|p| p
            .iter()
            .any(|l| l.as_str().is_some_and(|l| l.contains("as a failover slot")))),
        "the plan does not say the reverse slot is a failover slot: {plan}"
    );

    let load = workload(&lab, 0..6, 8);
    std::thread::sleep(Duration::from_secs(2));
    let report = flip_ok(&lab, "target");
    let v = load.join().expect("workload");
    cutover_lab::assert_no_loss_through_a_cutover(&v, &rows(&lab, Ns::Target, &target), "target");
    assert!(
        report["reverse_replication"]
            .as_str()
            .is_some_and(|r| r.contains("a failover slot")),
        "{report}"
    );
    assert_eq!(reverse_slot_failover(&lab, &target), "t");
    // What failover = true is for: the target's standby can take a copy of the slot.
    crate::wait_for(
        Duration::from_secs(20),
        "the standby to sync the reverse slot",
        || {
            psql(
                &lab,
                Ns::Target,
                &target_standby,
                "SELECT pg_sync_replication_slots()",
            );
            psql(
                &lab,
                Ns::Target,
                &target_standby,
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'redirect_reverse' AND synced",
            ) == "1"
        },
    );
    passed(Passed::Cutover {
        write_pause_ms: report["write_pause_ms"].as_f64().unwrap_or(f64::NAN),
    });

    let load = workload(&lab, 10..14, 6);
    std::thread::sleep(Duration::from_secs(2));
    flip_ok(&lab, "source");
    let v2 = load.join().expect("workload");
    let on_source = rows(&lab, Ns::Source, &source);
    cutover_lab::assert_no_loss_through_a_cutover(&v2, &on_source, "source");
    cutover_lab::assert_no_loss_through_a_cutover(
        &v,
        &on_source,
        "source (writes before the cutover)",
    );
    passed(Passed::Rollback);
}

/// Physical streaming replication between two servers of `major`: the standby is promoted
/// under the ledger workload with 0 lost, 0 refused; then `flip --to source` is refused (the
/// old primary must be rebuilt as a standby of the new one) and changes nothing.
pub fn physical(lab_name: &str, major: Major, passed: &mut dyn FnMut(Passed)) {
    require_root();
    let mut lab = Lab::new(lab_name);
    let source = pg::start_version(&mut lab, Ns::Source, "source", major, &[]);
    psql(&lab, Ns::Source, &source, pg::SCHEMA);
    let target = if major == Major::DEBIAN {
        pg::start_standby(&mut lab, Ns::Target, "target", SOURCE_ADDR)
    } else {
        pg::start_standby_of(&mut lab, Ns::Target, "target", &source, SOURCE_ADDR)
    };
    assert_answers_as(&lab, Ns::Source, &source, major);
    assert_answers_as(&lab, Ns::Target, &target, major);
    assert_eq!(
        psql(&lab, Ns::Target, &target, "SELECT pg_is_in_recovery()"),
        "t"
    );
    let mut flags = pg::controller_flags();
    flags.extend(["--replication".to_owned(), "physical".to_owned()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    lab.start_redirect(&flags);
    let lab = Arc::new(lab);
    let lag: serde_json::Value =
        serde_json::from_str(&lab.redirect_ok(&["lag", "--json"])).expect("lag --json");
    assert_eq!(
        (lag["replication"].as_str(), lag["healthy"].as_bool()),
        (Some("physical"), Some(true)),
        "{lag}"
    );

    let load = workload(&lab, 0..6, 10);
    std::thread::sleep(Duration::from_secs(3));
    let report = flip_ok(&lab, "target");
    let v = load.join().expect("workload");
    assert_eq!(
        psql(&lab, Ns::Target, &target, "SELECT pg_is_in_recovery()"),
        "f",
        "the target was promoted"
    );
    cutover_lab::assert_no_loss_through_a_cutover(
        &v,
        &rows(&lab, Ns::Target, &target),
        "promoted target",
    );
    passed(Passed::Cutover {
        write_pause_ms: report["write_pause_ms"].as_f64().unwrap_or(f64::NAN),
    });

    let before = rows(&lab, Ns::Target, &target);
    let out = flip(&lab, &["--to", "source", "--drain-timeout", "2s"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a physical rollback was not refused");
    assert!(stderr.contains(PHYSICAL_ROLLBACK_REFUSAL), "{stderr}");
    // Nothing changed: the target still serves, writable, with every row.
    assert_eq!(lab.status()["active"], "target");
    assert_eq!(
        psql(&lab, Ns::Target, &target, "SELECT pg_is_in_recovery()"),
        "f"
    );
    let load = workload(&lab, 10..12, 2);
    let v2 = load.join().expect("workload");
    let after = rows(&lab, Ns::Target, &target);
    assert!(before.is_subset(&after), "rows vanished from the target");
    cutover_lab::assert_no_loss_through_a_cutover(
        &v2,
        &after,
        "target, after the refused rollback",
    );
    passed(Passed::Rollback);
}
