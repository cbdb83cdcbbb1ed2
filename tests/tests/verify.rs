//! `redirect verify` against two real `PostgreSQL` servers kept in sync by logical
//! replication: equal when they are (also under live writes and after a cutover), and each
//! kind of difference named down to its key when they are not.

#![allow(
    clippy::too_many_lines,
    reason = "a lab scenario reads top to bottom as one story"
)]

use std::{
    process::Output,
    time::{Duration, Instant},
};

use redirect_tests::{
    Lab, Ns,
    cutover_lab::{flip, setup, workload},
    pg::psql,
    redirect_bin, wait_for,
};
use serde_json::Value;

/// `redirect verify --json <args>`: the report and the process output.
fn verify(lab: &Lab, args: &[&str]) -> (Value, Output) {
    let mut a = vec!["verify", "--json"];
    a.extend_from_slice(args);
    let out = lab.redirect(&a);
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "verify --json printed no report ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (report, out)
}

/// The report's entry for `table`.
fn table<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .find(|t| t["table"] == name)
        .unwrap_or_else(|| panic!("{name} is not in the report: {report:#}"))
}

/// Asserts every table is equal, with the same row count on both sides, and the exit is 0.
fn assert_all_equal(report: &Value, out: &Output, when: &str) {
    assert!(
        out.status.success(),
        "verify {when} failed: {report:#}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["differ"], 0, "{when}: {report:#}");
    for t in report["tables"].as_array().unwrap() {
        assert_eq!(t["verdict"], "equal", "{when}: {t:#}");
        assert_eq!(t["source_rows"], t["target_rows"], "{when}: {t:#}");
    }
}

/// The `(key, diff)` pairs a table's verdict names.
fn named_keys(t: &Value) -> Vec<(Vec<String>, String)> {
    t["first_keys"]
        .as_array()
        .unwrap_or_else(|| panic!("no first_keys: {t:#}"))
        .iter()
        .map(|k| {
            (
                k["key"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_owned())
                    .collect(),
                k["diff"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn count(lab: &Lab, ns: Ns, pg: &redirect_tests::pg::Pg, table: &str) -> u64 {
    psql(lab, ns, pg, &format!("SELECT count(*) FROM {table}"))
        .parse()
        .unwrap()
}

#[test]
fn verify_without_a_controller_says_how_to_start_one() {
    let out = std::process::Command::new(redirect_bin())
        .args(["--socket", "/nonexistent/redirect-verify.sock", "verify"])
        .output()
        .expect("running redirect");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no controller answers") && err.contains("--source-dsn"),
        "{err}"
    );
}

/// Equal right after setup, under the live ledger workload (no false positives while rows
/// are written and replicated), across a safe cutover, and after it.
#[test]
fn verify_is_equal_under_live_writes_and_after_a_clean_cutover() {
    let c = setup("verify-eq", &[]);
    let lab = &c.lab;
    let (report, out) = verify(lab, &[]);
    assert_all_equal(&report, &out, "right after setup");
    assert_eq!(
        table(&report, "public.acks")["method"],
        "chunked_by_primary_key"
    );

    let load = workload(lab, 0..6, 16);
    std::thread::sleep(Duration::from_secs(2));
    // Small chunks, so the live tail of the table is crossed many times.
    for round in 0..2 {
        let t = Instant::now();
        let (report, out) = verify(lab, &["--chunk-rows", "200"]);
        eprintln!("verify under live writes took {:?}", t.elapsed());
        if round == 0 {
            // It compares the table up to where it ended when verify began: a table that
            // keeps growing at its end is not chased until the writes stop.
            assert!(
                !load.is_finished(),
                "verify only finished after the workload did ({:?})",
                t.elapsed()
            );
        }
        assert_all_equal(&report, &out, &format!("under live writes (round {round})"));
        assert!(
            table(&report, "public.acks")["source_rows"]
                .as_u64()
                .unwrap()
                > 0,
            "the workload wrote: {report:#}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "verify under load took {:?}",
            t.elapsed()
        );
    }
    let out = flip(lab, &["--to", "target", "--drain-timeout", "2s"]);
    assert!(
        out.status.success(),
        "cutover failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Writes now go to the target and replicate back to the source.
    let (report, out) = verify(lab, &["--chunk-rows", "200"]);
    assert_all_equal(&report, &out, "after the cutover, under live writes");
    assert!(
        report["consistency"]
            .as_str()
            .unwrap()
            .contains("writes go to the target"),
        "{report:#}"
    );
    let v = load.join().expect("workload");
    assert!(v.acked().count() > 0);
    let (report, out) = verify(lab, &[]);
    assert_all_equal(&report, &out, "after the cutover, at rest");
    let acks = table(&report, "public.acks");
    assert_eq!(
        acks["target_rows"].as_u64().unwrap(),
        count(lab, Ns::Target, &c.target, "acks"),
        "the counts are exact"
    );
    // The human form ends with the summary line.
    let human = lab.redirect_ok(&["verify"]);
    assert!(
        human.contains("verify: 1 tables equal, 0 differ"),
        "{human}"
    );
}

/// Rows deleted and changed directly on the target, a composite-key table changed in a
/// middle chunk, a table the subscription never picked up, and one that is not on the
/// target at all: each reported, with its keys.
#[test]
fn verify_names_every_kind_of_difference() {
    let mut lab_ = setup("verify-diff", &[]);
    let lab = &lab_.lab;
    let (src, tgt) = (&lab_.source, &lab_.target);
    // A composite key (integer, text) with 25,000 rows, replicated.
    let pairs = "CREATE TABLE pairs (a int, b text, v text NOT NULL, PRIMARY KEY (a, b))";
    psql(lab, Ns::Source, src, pairs);
    psql(lab, Ns::Target, tgt, pairs);
    psql(
        lab,
        Ns::Target,
        tgt,
        "ALTER SUBSCRIPTION redirect_sub REFRESH PUBLICATION",
    );
    wait_for(Duration::from_secs(30), "pairs to be subscribed", || {
        psql(
            lab,
            Ns::Target,
            tgt,
            "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'",
        ) == "0"
    });
    psql(
        lab,
        Ns::Source,
        src,
        "INSERT INTO pairs SELECT a, 'k' || lpad(b::text, 3, '0'), md5(a || '/' || b) \
         FROM generate_series(1, 250) a, generate_series(1, 100) b; \
         INSERT INTO acks (writer, seq) SELECT 1, g FROM generate_series(1, 3000) g",
    );
    wait_for(Duration::from_secs(30), "the rows to replicate", || {
        count(lab, Ns::Target, tgt, "pairs") == 25_000
            && count(lab, Ns::Target, tgt, "acks") == 3000
    });
    let (report, out) = verify(lab, &["--chunk-rows", "1000"]);
    assert_all_equal(&report, &out, "before anything is broken");
    assert_eq!(table(&report, "public.pairs")["chunks"], 25, "{report:#}");

    // --rate bounds the load: 25,000 rows at 10,000 rows/s take at least 2 s.
    let started = Instant::now();
    let (report, out) = verify(
        lab,
        &[
            "--table",
            "public.pairs",
            "--chunk-rows",
            "1000",
            "--rate",
            "10000",
        ],
    );
    assert_all_equal(&report, &out, "rate-limited");
    assert_eq!(
        report["tables"].as_array().unwrap().len(),
        1,
        "only --table"
    );
    // Progress while it runs: the chunk it is at, of how many, and the pace.
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(
        progress.contains("public.pairs: chunk ") && progress.contains(" rows/s"),
        "{progress}"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // Break things.
    let (deleted, changed): (i64, i64) = (1234, 2345);
    psql(
        lab,
        Ns::Target,
        tgt,
        &format!(
            "DELETE FROM acks WHERE id = {deleted}; UPDATE acks SET seq = -1 WHERE id = {changed}; \
             UPDATE pairs SET v = 'tampered' WHERE a = 120 AND b = 'k050'"
        ),
    );
    // No primary key, a row missing on the target.
    let bag = "CREATE TABLE bag (v text)";
    psql(lab, Ns::Source, src, bag);
    psql(lab, Ns::Target, tgt, bag);
    psql(
        lab,
        Ns::Target,
        tgt,
        "ALTER SUBSCRIPTION redirect_sub REFRESH PUBLICATION",
    );
    wait_for(Duration::from_secs(30), "bag to be subscribed", || {
        psql(
            lab,
            Ns::Target,
            tgt,
            "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'",
        ) == "0"
    });
    psql(
        lab,
        Ns::Source,
        src,
        "INSERT INTO bag VALUES ('a'), ('b'), ('b')",
    );
    wait_for(Duration::from_secs(30), "bag to replicate", || {
        count(lab, Ns::Target, tgt, "bag") == 3
    });
    psql(
        lab,
        Ns::Target,
        tgt,
        "DELETE FROM bag WHERE ctid = (SELECT ctid FROM bag WHERE v = 'b' LIMIT 1)",
    );

    // Created on both after the last refresh: the subscription never copies its rows.
    let unsubscribed = "CREATE TABLE not_subscribed (id int PRIMARY KEY, v text)";
    psql(lab, Ns::Target, tgt, unsubscribed);
    psql(lab, Ns::Source, src, unsubscribed);
    psql(
        lab,
        Ns::Source,
        src,
        "INSERT INTO not_subscribed SELECT g, 'x' FROM generate_series(1, 5) g",
    );
    // Rows only on the target, more than a chunk of them, after an empty source.
    let extra = "CREATE TABLE target_extra (id int PRIMARY KEY)";
    psql(lab, Ns::Source, src, extra);
    psql(lab, Ns::Target, tgt, extra);
    psql(
        lab,
        Ns::Target,
        tgt,
        "INSERT INTO target_extra SELECT generate_series(1, 2500)",
    );
    // Unlogged: never published, and not on the target at all.
    psql(
        lab,
        Ns::Source,
        src,
        "CREATE UNLOGGED TABLE source_only (id int PRIMARY KEY); INSERT INTO source_only VALUES (1)",
    );
    let (report, out) = verify(lab, &["--chunk-rows", "1000"]);
    assert!(
        !out.status.success(),
        "differences exit non-zero: {report:#}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("table(s) differ"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let acks = table(&report, "public.acks");
    assert_eq!(acks["verdict"], "differs", "{acks:#}");
    assert_eq!(acks["differing_rows"], 2, "{acks:#}");
    assert_eq!(
        named_keys(acks),
        [
            (vec![deleted.to_string()], "missing_on_target".to_owned()),
            (vec![changed.to_string()], "changed".to_owned()),
        ]
    );
    assert_eq!(acks["source_rows"], 3000);
    assert_eq!(acks["target_rows"], 2999);
    let pairs_t = table(&report, "public.pairs");
    assert_eq!(pairs_t["verdict"], "differs", "{pairs_t:#}");
    assert_eq!(pairs_t["key_columns"], serde_json::json!(["a", "b"]));
    assert_eq!(
        named_keys(pairs_t),
        [(
            vec!["120".to_owned(), "k050".to_owned()],
            "changed".to_owned()
        )]
    );
    assert_eq!(pairs_t["differing_rows"], 1);
    let unsub = table(&report, "public.not_subscribed");
    assert_eq!(unsub["verdict"], "differs", "{unsub:#}");
    assert_eq!(
        (unsub["source_rows"].as_u64(), unsub["target_rows"].as_u64()),
        (Some(5), Some(0))
    );
    assert_eq!(unsub["differing_rows"], 5);
    assert_eq!(
        named_keys(unsub)[0],
        (vec!["1".to_owned()], "missing_on_target".to_owned())
    );
    assert_eq!(
        table(&report, "public.source_only")["verdict"],
        "missing_on_target"
    );
    let bag_t = table(&report, "public.bag");
    assert_eq!(bag_t["verdict"], "differs", "{bag_t:#}");
    assert_eq!(bag_t["method"], "whole_table");
    assert_eq!(
        (bag_t["source_rows"].as_u64(), bag_t["target_rows"].as_u64()),
        (Some(3), Some(2))
    );
    let extra = table(&report, "public.target_extra");
    assert_eq!(extra["verdict"], "differs", "{extra:#}");
    assert_eq!(extra["differing_rows"], 2500, "{extra:#}");
    assert_eq!(
        (extra["source_rows"].as_u64(), extra["target_rows"].as_u64()),
        (Some(0), Some(2500))
    );
    assert_eq!(
        named_keys(extra)[0],
        (vec!["1".to_owned()], "missing_on_source".to_owned())
    );
    assert!(
        extra["chunks"].as_u64().unwrap() >= 3,
        "a chunk at a time: {extra:#}"
    );
    assert_eq!(report["equal"], 0, "{report:#}");
    assert_eq!(report["differ"], 6, "{report:#}");

    // The human form names the keys and ends with the summary.
    let out = lab.redirect(&["verify", "--table", "pairs", "--table", "acks"]);
    let human = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(human.contains("(a, b)=(120, k050) (changed)"), "{human}");
    assert!(
        human.contains(&format!("id={deleted} (missing on target)")),
        "{human}"
    );
    assert!(
        human.contains("verify: 0 tables equal, 2 differ"),
        "{human}"
    );

    // A table that is not anywhere is a clear error.
    let out = lab.redirect(&["verify", "--table", "public.nope"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("no table public.nope") && err.contains("public.acks"),
        "{err}"
    );

    // Replication that cannot apply (a lock on the target holds the apply worker): verify
    // does not compare against a stale target; it says so within --catch-up-timeout.
    let lab = std::sync::Arc::get_mut(&mut lab_.lab).expect("no other handle on the lab");
    redirect_tests::pg::spawn_psql(
        lab,
        Ns::Target,
        &lab_.target,
        "BEGIN; LOCK TABLE acks IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(60)",
        "locker",
    );
    wait_for(Duration::from_secs(20), "the lock on the target", || {
        psql(
            lab,
            Ns::Target,
            &lab_.target,
            "SELECT count(*) FROM pg_locks WHERE relation = 'acks'::regclass AND mode = 'AccessExclusiveLock' AND granted",
        ) == "1"
    });
    psql(
        lab,
        Ns::Source,
        &lab_.source,
        "INSERT INTO acks (writer, seq) VALUES (9, 10)",
    );
    let started = Instant::now();
    let out = lab.redirect(&[
        "verify",
        "--table",
        "acks",
        "--catch-up-timeout",
        "2s",
        "--statement-timeout",
        "5s",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("the target did not reach the source's WAL position")
            && err.contains("redirect lag"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}
