//! A server holds several databases, and one flip of the VIP moves every one's clients. Each
//! database is replicated on its own (a subscription per database), so the controller must
//! find them all, measure each one's lag, and refuse a cutover that would leave one behind.

use redirect_tests::{
    Ns,
    cutover_lab::{flip, setup},
    pg::{self, psql, psql_in},
    wait_for,
};

fn lag(lab: &redirect_tests::Lab) -> serde_json::Value {
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
    let findings = report["findings"].to_string();
    assert!(findings.contains("BLOCKING"), "{findings}");
    assert!(
        findings.contains("\\\"reports\\\" has 1 table(s)"),
        "{findings}"
    );
    assert!(findings.contains("app2"), "{findings}");

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
    wait_for(std::time::Duration::from_secs(10), "app3 in lag", || {
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
}
