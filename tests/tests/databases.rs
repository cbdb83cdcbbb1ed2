//! A server holds several databases, and one flip of the VIP moves every one's clients. Each
//! database is replicated on its own (a subscription per database), so the controller must
//! find them all, measure each one's lag, and refuse a cutover that would leave one behind.

#![allow(
    clippy::too_many_lines,
    reason = "a lab scenario reads top to bottom as one story"
)]

use std::time::Duration;

use redirect_tests::{
    Lab, Ns, VIP,
    cutover_lab::{self, flip, setup},
    pg::{self, Pg, psql, psql_in},
    wait_for, workload,
};

fn lag(lab: &Lab) -> serde_json::Value {
    serde_json::from_str(&lab.redirect_ok(&["lag", "--json"])).expect("lag --json")
}

fn database<'a>(lag: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    lag["databases"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["database"] == name))
        .unwrap_or_else(|| panic!("no database {name} in {lag}"))
}

#[test]
fn every_database_is_found_and_one_the_cutover_would_leave_behind_is_named_before_anything_changes()
{
    let c = setup("dbs", &[]);
    let lab = &c.lab;
    pg::replicate_database(lab, &c.source, &c.target, "app2");
    // A database with no table (nothing to carry), and one with data and no replication.
    for ns_pg in [(Ns::Source, &c.source), (Ns::Target, &c.target)] {
        psql(lab, ns_pg.0, ns_pg.1, "CREATE DATABASE scratch");
        psql(lab, ns_pg.0, ns_pg.1, "CREATE DATABASE reports");
    }
    psql_in(
        lab,
        Ns::Source,
        &c.source,
        "reports",
        "CREATE TABLE daily (d date PRIMARY KEY); INSERT INTO daily VALUES (now())",
    );
    // One on the source only: its clients would find no database after the flip.
    psql(lab, Ns::Source, &c.source, "CREATE DATABASE onlysrc");

    // Each replicated database has its own lag, in bytes (never 2^64-1).
    let l = lag(lab);
    assert_eq!(l["healthy"], true, "{l}");
    for name in ["postgres", "app2"] {
        let d = database(&l, name);
        assert!(d["bytes"].is_u64(), "{d}");
        assert_eq!(d["healthy"], true, "{d}");
    }
    assert_eq!(database(&l, "app2")["subscription"], "app2_sub");
    assert_eq!(database(&l, "postgres")["subscription"], "redirect_sub");

    // One database's replication stops: the cluster is unhealthy, and it is named.
    psql_in(
        lab,
        Ns::Target,
        &c.target,
        "app2",
        "ALTER SUBSCRIPTION app2_sub DISABLE",
    );
    let l = lag(lab);
    assert_eq!(l["healthy"], false, "{l}");
    assert_eq!(database(&l, "app2")["healthy"], false);
    assert_eq!(database(&l, "postgres")["healthy"], true);
    let text = lab.redirect_ok(&["lag"]);
    assert!(
        text.contains("app2") && text.contains("subscription \"app2_sub\" is disabled"),
        "{text}"
    );

    // The dry run says what each database is, and what blocks.
    let out = flip(lab, &["--to", "target", "--dry-run", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("dry run --json");
    let coverage = |name: &str| {
        report["databases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {report}"))["coverage"]
            .clone()
    };
    assert_eq!(coverage("postgres"), "replicated");
    assert_eq!(coverage("app2"), "replicated");
    assert_eq!(coverage("scratch"), "empty");
    assert_eq!(coverage("reports"), "unreplicated");
    assert_eq!(coverage("onlysrc"), "old-server-only");
    let findings = report["findings"].to_string();
    assert!(findings.contains("BLOCKING"), "{findings}");
    assert!(
        findings.contains("\\\"reports\\\" has 1 table(s)"),
        "{findings}"
    );
    assert!(findings.contains("app2"), "{findings}");
    assert!(
        findings.contains("\\\"onlysrc\\\" exists on the old server only"),
        "{findings}"
    );

    // `status` says the same, per database.
    let status = lab.status();
    let coverage_in_status = |name: &str| {
        status["databases"]
            .as_array()
            .and_then(|d| d.iter().find(|d| d["name"] == name))
            .map(|d| d["coverage"].clone())
    };
    assert_eq!(
        coverage_in_status("reports"),
        Some("unreplicated".into()),
        "{status}"
    );
    assert_eq!(
        coverage_in_status("scratch"),
        Some("empty".into()),
        "{status}"
    );
    let text = lab.redirect_ok(&["status"]);
    assert!(text.contains("database reports: NOT REPLICATED"), "{text}");

    // The real flip is refused, and nothing changed: no hold, no fence, no reverse slot.
    let out = flip(lab, &["--to", "target"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the flip went ahead: {stderr}");
    assert!(stderr.contains("reports"), "{stderr}");
    assert_eq!(lab.status()["active"], "source");
    assert_eq!(
        psql(
            lab,
            Ns::Target,
            &c.target,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'redirect%'"
        ),
        "0"
    );
    assert_eq!(
        psql(
            lab,
            Ns::Target,
            &c.target,
            "SELECT subenabled FROM pg_subscription WHERE subname = 'redirect_sub'"
        ),
        "t",
        "the forward subscription was left as it was"
    );

    // A subscription whose slot does not exist: its lag is unknown (null), not 2^64-1.
    psql(lab, Ns::Target, &c.target, "CREATE DATABASE app3");
    psql(lab, Ns::Source, &c.source, "CREATE DATABASE app3");
    psql_in(
        lab,
        Ns::Target,
        &c.target,
        "app3",
        &format!(
            "CREATE SUBSCRIPTION app3_sub CONNECTION '{}' PUBLICATION nothing WITH (connect = false)",
            pg::dsn(redirect_tests::SOURCE_ADDR)
        ),
    );
    wait_for(Duration::from_secs(10), "app3 in lag", || {
        lag(lab)["databases"].to_string().contains("app3")
    });
    let l = lag(lab);
    assert!(database(&l, "app3")["bytes"].is_null(), "{l}");
    assert!(
        l["bytes"].is_null(),
        "the cluster's lag is unknown too: {l}"
    );
    let text = lab.redirect_ok(&["lag"]);
    assert!(text.contains("unknown bytes"), "{text}");
    assert!(!text.contains("18446744073709551615"), "{text}");
    // /metrics has each database's lag; the unknown one is NaN, never a made-up number.
    wait_for(Duration::from_secs(10), "app3 in /metrics", || {
        lab.metrics()
            .contains("redirect_database_lag_bytes{database=\"app3\"}")
    });
    assert!(
        lab.metric("redirect_database_lag_bytes{database=\"app3\"}")
            .is_some_and(f64::is_nan)
    );
    assert!(
        lab.metric("redirect_database_lag_bytes{database=\"postgres\"}")
            .is_some_and(f64::is_finite)
    );
    assert_eq!(
        lab.metric("redirect_database_replication_healthy{database=\"app2\"}"),
        Some(0.0),
        "app2's subscription is still disabled"
    );
}

/// The ledger workload through the VIP on two databases at once.
fn two_workloads(
    lab: &Lab,
    writers: std::ops::Range<i32>,
    secs: u64,
) -> Vec<(&'static str, std::thread::JoinHandle<workload::Verdict>)> {
    ["postgres", "app2"]
        .into_iter()
        .enumerate()
        .map(|(i, db)| {
            let dsn = pg::dsn_in(VIP, db);
            let writers = (writers.start + 100 * i32::try_from(i).unwrap())
                ..(writers.end + 100 * i32::try_from(i).unwrap());
            (db, cutover_lab::workload_with(lab, dsn, writers, secs))
        })
        .collect()
}

/// A cutover under writes to two databases; every acknowledged write of each is on `to`.
fn cut_over_both(
    lab: &Lab,
    to: &str,
    on: &Pg,
    ns: Ns,
    writers: std::ops::Range<i32>,
) -> serde_json::Value {
    let loads = two_workloads(lab, writers, 8);
    std::thread::sleep(Duration::from_secs(2));
    let out = flip(lab, &["--to", to, "--drain-timeout", "2s", "--json"]);
    assert!(
        out.status.success(),
        "flip --to {to} across databases failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (db, load) in loads {
        let v = load.join().expect("workload");
        let rows = pg::acked_rows_in(lab, ns, on, db, "");
        cutover_lab::assert_no_loss_through_a_cutover(&v, &rows, &format!("{to} ({db})"));
    }
    serde_json::from_slice(&out.stdout).expect("flip --json")
}

/// A new row in `database` through the VIP gets an id past every id the old server gave out:
/// the sequence was carried over in that database too.
fn next_id_is_fresh(lab: &Lab, old: (Ns, &Pg), database: &str, writer: i32) {
    let max_old: i64 = psql_in(
        lab,
        old.0,
        old.1,
        database,
        "SELECT coalesce(max(id), 0) FROM acks",
    )
    .parse()
    .unwrap();
    let dsn = pg::dsn_in(VIP, database);
    let id: i64 = lab.in_ns(Ns::Client, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async move {
                let (c, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
                    .await
                    .expect("connecting through the VIP");
                tokio::spawn(conn);
                c.query_one(
                    "INSERT INTO acks (writer, seq) VALUES ($1, 1) RETURNING id",
                    &[&writer],
                )
                .await
                .expect("a new row through the VIP")
                .get(0)
            })
    });
    assert!(
        id > max_old,
        "{database}: new id {id} is not past the old server's {max_old}"
    );
}

#[test]
fn three_databases_cut_over_roll_back_and_cut_over_again_each_one_protected() {
    let c = setup("dbs3", &[]);
    let lab = &c.lab;
    for db in ["app2", "app3"] {
        pg::replicate_database(lab, &c.source, &c.target, db);
    }
    // app3 takes no load, but has rows (and so a sequence) the flip must carry.
    psql_in(
        lab,
        Ns::Source,
        &c.source,
        "app3",
        "INSERT INTO acks (writer, seq) SELECT 900, g FROM generate_series(1, 50) g",
    );
    wait_for(Duration::from_secs(20), "app3's rows on the target", || {
        psql_in(
            lab,
            Ns::Target,
            &c.target,
            "app3",
            "SELECT count(*) FROM acks",
        ) == "50"
    });

    // One database's replication is stopped: refused, naming it, and nothing changed.
    psql_in(
        lab,
        Ns::Target,
        &c.target,
        "app3",
        "ALTER SUBSCRIPTION app3_sub DISABLE",
    );
    let out = flip(lab, &["--to", "target"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a flip with app3's replication stopped went ahead: {stderr}"
    );
    assert!(
        stderr.contains("app3: subscription \"app3_sub\" is disabled"),
        "{stderr}"
    );
    assert_eq!(lab.status()["active"], "source");
    psql_in(
        lab,
        Ns::Target,
        &c.target,
        "app3",
        "ALTER SUBSCRIPTION app3_sub ENABLE",
    );
    wait_for(Duration::from_secs(20), "app3 healthy again", || {
        lag(lab)["healthy"] == true
    });

    let report = cut_over_both(lab, "target", &c.target, Ns::Target, 0..4);
    assert_eq!(
        report["databases"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["coverage"] == "replicated")
            .count(),
        3,
        "{report}"
    );
    assert!(
        report["reverse_replication"]
            .to_string()
            .contains("database app3"),
        "{report}"
    );
    for slot in [
        "redirect_reverse",
        "redirect_reverse_app2",
        "redirect_reverse_app3",
    ] {
        wait_for(
            Duration::from_secs(15),
            &format!("{slot} streaming back"),
            || {
                psql(
                    lab,
                    Ns::Target,
                    &c.target,
                    &format!(
                        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}' AND active"
                    ),
                ) == "1"
            },
        );
    }
    for (db, w) in [("postgres", 700), ("app2", 701), ("app3", 702)] {
        next_id_is_fresh(lab, (Ns::Source, &c.source), db, w);
    }

    cut_over_both(lab, "source", &c.source, Ns::Source, 10..14);
    // What the target took in app3 came back with the rollback.
    assert_eq!(
        psql_in(
            lab,
            Ns::Source,
            &c.source,
            "app3",
            "SELECT count(*) FROM acks WHERE writer = 702"
        ),
        "1"
    );
    for (db, w) in [("postgres", 710), ("app2", 711), ("app3", 712)] {
        next_id_is_fresh(lab, (Ns::Target, &c.target), db, w);
    }

    cut_over_both(lab, "target", &c.target, Ns::Target, 20..24);
    for (db, w) in [("postgres", 720), ("app2", 721), ("app3", 722)] {
        next_id_is_fresh(lab, (Ns::Source, &c.source), db, w);
    }

    let out = lab.redirect(&["verify", "--json"]);
    let verdict: serde_json::Value = serde_json::from_slice(&out.stdout).expect("verify --json");
    assert!(out.status.success(), "verify: {verdict}");
    let tables = verdict["tables"].as_array().unwrap();
    for db in ["postgres", "app2", "app3"] {
        assert!(
            tables.iter().any(|t| t["database"] == db
                && t["table"] == "public.acks"
                && t["verdict"] == "equal"),
            "{db}'s acks not verified equal: {verdict}"
        );
    }
}
