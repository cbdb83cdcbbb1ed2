//! No superuser anywhere: the whole lifecycle as a managed service allows it. PostgreSQL 17 on
//! both sides, every TCP connection authenticated by SCRAM, the controller's role `migrator`
//! with only what RDS, Cloud SQL or Azure grant (REPLICATION, `pg_read_all_stats`,
//! `pg_signal_backend`, `pg_create_subscription`, CREATE on the database and on the schema,
//! ownership of the application's tables), and the application with a role of its own.

use std::{collections::HashSet, sync::Arc, time::Duration};

use redirect_tests::{
    Lab, Ns, SOURCE_ADDR, TARGET_ADDR, VIP,
    cutover_lab::{self, flip},
    pg::{self, Pg, psql},
    require_root, wait_for, workload,
};

/// Quotes and a space, so a conninfo or SQL literal that is not quoted right fails.
const MIGRATOR_PASSWORD: &str = "mig s3cret'q\\z";
const APP_PASSWORD: &str = "app-Secret-9";

struct Managed {
    lab: Arc<Lab>,
    source: Pg,
    target: Pg,
}

fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn conninfo(host: &str, user: &str, password: &str) -> String {
    format!(
        "host={host} port={} user={user} dbname=postgres password={} connect_timeout=10",
        redirect_tests::PG_PORT,
        redirect::pg::quote_conninfo(password)
    )
}

/// The roles and grants a managed service gives, on one server: superuser only to set them
/// up (over the local socket, as the provider's console would).
fn provision(lab: &Lab, ns: Ns, pg: &Pg) {
    // First in pg_hba: every TCP connection from the lab's range needs a SCRAM password.
    let hba_path = pg.data_dir.join("pg_hba.conf");
    let hba = std::fs::read_to_string(&hba_path).expect("pg_hba.conf");
    std::fs::write(
        &hba_path,
        format!(
            "host all all 198.18.0.0/15 scram-sha-256\nhost replication all 198.18.0.0/15 scram-sha-256\n{hba}"
        ),
    )
    .expect("writing pg_hba.conf");
    psql(lab, ns, pg, "SELECT pg_reload_conf()");
    psql(
        lab,
        ns,
        pg,
        &format!(
            "SET password_encryption = 'scram-sha-256'; \
             CREATE ROLE migrator LOGIN REPLICATION PASSWORD {}; \
             GRANT pg_read_all_stats, pg_signal_backend, pg_create_subscription TO migrator; \
             GRANT CREATE ON DATABASE postgres TO migrator; GRANT CREATE ON SCHEMA public TO migrator; \
             CREATE ROLE app LOGIN PASSWORD {}; \
             SET ROLE migrator; {}; \
             GRANT SELECT, INSERT, UPDATE, DELETE ON acks TO app; GRANT USAGE, SELECT ON SEQUENCE acks_id_seq TO app",
            sql_literal(MIGRATOR_PASSWORD),
            sql_literal(APP_PASSWORD),
            pg::SCHEMA
        ),
    );
}

fn setup(name: &str) -> Managed {
    require_root();
    let mut lab = Lab::new(name);
    let source = pg::start_version(&mut lab, Ns::Source, "source", pg::Major(17), &[]);
    let target = pg::start_version(&mut lab, Ns::Target, "target", pg::Major(17), &[]);
    provision(&lab, Ns::Source, &source);
    provision(&lab, Ns::Target, &target);
    psql(
        &lab,
        Ns::Source,
        &source,
        "SET ROLE migrator; CREATE PUBLICATION redirect_pub FOR TABLE acks",
    );
    // Made by the superuser, then given to migrator, as a provider's tooling does; from then
    // on it connects as migrator with a password (password_required).
    psql(
        &lab,
        Ns::Target,
        &target,
        &format!(
            "CREATE SUBSCRIPTION redirect_sub CONNECTION {} PUBLICATION redirect_pub",
            sql_literal(&conninfo(SOURCE_ADDR, "migrator", MIGRATOR_PASSWORD))
        ),
    );
    psql(
        &lab,
        Ns::Target,
        &target,
        "ALTER SUBSCRIPTION redirect_sub OWNER TO migrator",
    );
    wait_for(Duration::from_secs(60), "the initial sync", || {
        psql(
            &lab,
            Ns::Target,
            &target,
            "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'",
        ) == "0"
            && psql(
                &lab,
                Ns::Source,
                &source,
                "SELECT count(*) FROM pg_replication_slots WHERE active",
            ) == "1"
    });
    // The controller's secrets are files only root reads; nothing goes on its command line.
    for which in ["source", "target"] {
        let path = lab.work_dir.join(format!("{which}.password"));
        std::fs::write(&path, format!("{MIGRATOR_PASSWORD}\n")).expect("password file");
    }
    let source_pw = lab.work_dir.join("source.password").display().to_string();
    let target_pw = lab.work_dir.join("target.password").display().to_string();
    let source_dsn = format!(
        "host={SOURCE_ADDR} port={} user=migrator dbname=postgres",
        redirect_tests::PG_PORT
    );
    let target_dsn = format!(
        "host={TARGET_ADDR} port={} user=migrator dbname=postgres",
        redirect_tests::PG_PORT
    );
    lab.start_redirect(&[
        "--source-dsn",
        &source_dsn,
        "--target-dsn",
        &target_dsn,
        "--source-password-file",
        &source_pw,
        "--target-password-file",
        &target_pw,
    ]);
    Managed {
        lab: Arc::new(lab),
        source,
        target,
    }
}

fn app_workload(
    lab: &Lab,
    writers: std::ops::Range<i32>,
    secs: u64,
) -> std::thread::JoinHandle<workload::Verdict> {
    cutover_lab::workload_with(lab, conninfo(VIP, "app", APP_PASSWORD), writers, secs)
}

fn cut_over(m: &Managed, to: &str, writers: std::ops::Range<i32>) -> serde_json::Value {
    let lab = &m.lab;
    let load = app_workload(lab, writers, 8);
    std::thread::sleep(Duration::from_secs(2));
    let out = flip(lab, &["--to", to, "--drain-timeout", "2s", "--json"]);
    assert!(
        out.status.success(),
        "flip --to {to} as a non-superuser failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = load.join().expect("workload");
    let (ns, pg) = if to == "target" {
        (Ns::Target, &m.target)
    } else {
        (Ns::Source, &m.source)
    };
    let on: HashSet<(i32, i64)> = pg::acked_rows(lab, ns, pg, "");
    cutover_lab::assert_no_loss_through_a_cutover(&v, &on, to);
    serde_json::from_slice(&out.stdout).expect("flip --json")
}

#[test]
fn the_whole_lifecycle_runs_as_a_managed_services_role_with_scram() {
    let m = setup("mgd");
    let lab = &m.lab;
    let report = cut_over(&m, "target", 0..4);
    assert!(
        report["reverse_replication"]
            .as_str()
            .is_some_and(|r| r.contains("rollback is lossless")),
        "{report}"
    );
    // The reverse subscription is migrator's, and authenticates with its password.
    assert_eq!(
        psql(
            lab,
            Ns::Source,
            &m.source,
            "SELECT pg_get_userbyid(subowner) || ' ' || subenabled || ' ' || subpasswordrequired FROM pg_subscription WHERE subname = 'redirect_reverse'"
        ),
        "migrator true true"
    );
    cut_over(&m, "source", 10..14);
    cut_over(&m, "target", 20..24);

    let out = lab.redirect(&["verify", "--json"]);
    assert!(
        out.status.success(),
        "verify as migrator: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verdict: serde_json::Value = serde_json::from_slice(&out.stdout).expect("verify --json");
    assert_eq!(verdict["differ"], 0, "{verdict}");
    assert!(
        verdict["tables"]
            .as_array()
            .is_some_and(|t| !t.is_empty() && t.iter().all(|t| t["verdict"] == "equal")),
        "{verdict}"
    );

    let out = lab.redirect(&["finish", "--yes"]);
    assert!(
        out.status.success(),
        "finish as migrator: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        psql(
            lab,
            Ns::Source,
            &m.source,
            "SELECT count(*) FROM pg_subscription WHERE subname = 'redirect_reverse'"
        ),
        "0"
    );

    // The password is in no log, journal, status or command line of the controller.
    let status = lab.redirect_ok(&["status", "--json"]);
    let journal = std::fs::read_to_string(&lab.journal).expect("journal");
    let log = lab.last_redirect_log();
    let cmdline = std::fs::read(format!(
        "/proc/{}/cmdline",
        lab.redirect_pid().expect("pid")
    ))
    .map(|b| String::from_utf8_lossy(&b).into_owned())
    .unwrap_or_default();
    for (what, text) in [
        ("status", &status),
        ("journal", &journal),
        ("log", &log),
        ("cmdline", &cmdline),
    ] {
        assert!(
            !text.contains("s3cret"),
            "the password is in the controller's {what}"
        );
    }
}

#[test]
fn preflight_names_each_missing_grant_with_the_statement_that_gives_it() {
    let m = setup("grants");
    let lab = &m.lab;
    let dry_run = || {
        let out = flip(lab, &["--to", "target", "--dry-run", "--json"]);
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("dry run --json");
        r["findings"].to_string()
    };
    let clean = dry_run();
    assert!(
        !clean.contains("BLOCKING"),
        "a fully granted role is refused: {clean}"
    );
    let cases: [(Ns, &Pg, &str, &str, &str); 6] = [
        (
            Ns::Source,
            &m.source,
            "REVOKE pg_signal_backend FROM migrator",
            "GRANT pg_read_all_stats, pg_signal_backend TO",
            "GRANT pg_signal_backend TO migrator",
        ),
        (
            Ns::Source,
            &m.source,
            "REVOKE pg_create_subscription FROM migrator",
            "GRANT pg_create_subscription TO",
            "GRANT pg_create_subscription TO migrator",
        ),
        (
            Ns::Source,
            &m.source,
            "REVOKE CREATE ON DATABASE postgres FROM migrator",
            "GRANT CREATE ON DATABASE",
            "GRANT CREATE ON DATABASE postgres TO migrator",
        ),
        (
            Ns::Target,
            &m.target,
            "ALTER ROLE migrator NOREPLICATION",
            "REPLICATION (on RDS: GRANT rds_replication",
            "ALTER ROLE migrator REPLICATION",
        ),
        (
            Ns::Target,
            &m.target,
            "ALTER SUBSCRIPTION redirect_sub OWNER TO postgres",
            "ALTER SUBSCRIPTION \\\"redirect_sub\\\" OWNER TO",
            "ALTER SUBSCRIPTION redirect_sub OWNER TO migrator",
        ),
        (
            Ns::Target,
            &m.target,
            "ALTER TABLE acks OWNER TO postgres",
            "ALTER TABLE public.acks OWNER TO",
            "ALTER TABLE acks OWNER TO migrator",
        ),
    ];
    for (ns, pg, revoke, expect, regrant) in cases {
        psql(lab, ns, pg, revoke);
        let findings = dry_run();
        psql(lab, ns, pg, regrant);
        assert!(
            findings.contains("BLOCKING") && findings.contains(expect),
            "after `{revoke}` the dry run does not say `{expect}`: {findings}"
        );
    }
    // A real flip with one grant missing changes nothing.
    psql(
        lab,
        Ns::Source,
        &m.source,
        "REVOKE pg_create_subscription FROM migrator",
    );
    let out = flip(lab, &["--to", "target"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("GRANT pg_create_subscription TO"));
    assert_eq!(lab.status()["active"], "source");
    assert_eq!(
        psql(
            lab,
            Ns::Target,
            &m.target,
            "SELECT count(*) FROM pg_replication_slots"
        ),
        "0",
        "no reverse slot was made"
    );
}
