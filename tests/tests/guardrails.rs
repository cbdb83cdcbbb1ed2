//! Guardrails: preflight finds what logical replication will not carry, names the objects,
//! says why and how to fix it, and blocks the cutover until `--allow NAME`. Each guardrail's
//! condition is created on real servers, seen blocking (dry run, and a real flip refused),
//! seen allowed, then removed; a clean lab has no blocking finding.

#![allow(
    clippy::too_many_lines,
    reason = "a lab scenario reads top to bottom as one story"
)]

use std::{sync::Arc, time::Duration};

use redirect::cutover::{FlipReport, guardrails::Finding};
use redirect_tests::{
    Lab, Ns,
    cutover_lab::{self, Cutover, flip, setup, workload},
    pg::{self, psql},
    require_root, wait_for,
};

/// A lab whose publication lists its tables (so a table can be left out of it), with
/// prepared transactions enabled on the source.
fn listed_publication_lab(name: &str) -> Cutover {
    require_root();
    let mut lab = Lab::new(name);
    let source = pg::start(
        &mut lab,
        Ns::Source,
        "source",
        &["max_prepared_transactions = 4"],
    );
    let target = pg::start(&mut lab, Ns::Target, "target", &[]);
    psql(&lab, Ns::Source, &source, pg::SCHEMA);
    psql(&lab, Ns::Target, &target, pg::SCHEMA);
    psql(
        &lab,
        Ns::Source,
        &source,
        "CREATE PUBLICATION redirect_pub FOR TABLE acks",
    );
    psql(
        &lab,
        Ns::Target,
        &target,
        &format!(
            "CREATE SUBSCRIPTION redirect_sub CONNECTION '{}' PUBLICATION redirect_pub",
            pg::dsn(redirect_tests::SOURCE_ADDR)
        ),
    );
    wait_for(Duration::from_secs(60), "the initial copy", || {
        psql(
            &lab,
            Ns::Target,
            &target,
            "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'",
        ) == "0"
    });
    cutover_lab::start(&mut lab, &[]);
    Cutover {
        lab: Arc::new(lab),
        source,
        target,
    }
}

fn on_source(c: &Cutover, sql: &str) -> String {
    psql(&c.lab, Ns::Source, &c.source, sql)
}

fn on_target(c: &Cutover, sql: &str) -> String {
    psql(&c.lab, Ns::Target, &c.target, sql)
}

fn on_both(c: &Cutover, sql: &str) {
    on_source(c, sql);
    on_target(c, sql);
}

/// Every table of the subscription copied, and its worker streaming.
fn wait_synced(c: &Cutover) {
    wait_for(Duration::from_secs(60), "every table copied", || {
        on_target(
            c,
            "SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'",
        ) == "0"
    });
}

/// The subscription picks up the publication's new tables and copies them.
fn refresh(c: &Cutover) {
    on_target(c, "ALTER SUBSCRIPTION redirect_sub REFRESH PUBLICATION");
    wait_synced(c);
}

/// `flip --to <to> --dry-run --json` with `extra`: the report's guardrail findings.
fn findings(c: &Cutover, to: &str, extra: &[&str]) -> Vec<Finding> {
    let mut args = vec!["--to", to, "--dry-run", "--json"];
    args.extend_from_slice(extra);
    let out = flip(&c.lab, &args);
    assert!(
        out.status.success(),
        "dry run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: FlipReport =
        serde_json::from_slice(&out.stdout).expect("flip --dry-run --json is a flip report");
    report.guardrails
}

fn named<'a>(found: &'a [Finding], guardrail: &str) -> Option<&'a Finding> {
    found.iter().find(|f| f.guardrail.name() == guardrail)
}

/// Nothing stops a cutover to `to`.
fn assert_clear(c: &Cutover, to: &str, extra: &[&str]) {
    let found = findings(c, to, extra);
    let stopping: Vec<&Finding> = found.iter().filter(|f| f.stops()).collect();
    assert!(stopping.is_empty(), "blocking findings: {stopping:#?}");
}

/// `guardrail` blocks a cutover to `to`, naming `object`: in the dry run's text (with why,
/// fix and how to go ahead) and typed in its JSON; with `--allow guardrail` it is reported
/// as allowed and stops nothing. `extra` flags go to every run.
fn assert_blocks_until_allowed(
    c: &Cutover,
    to: &str,
    guardrail: &str,
    object: &str,
    extra: &[&str],
) {
    let mut args = vec!["--to", to, "--dry-run"];
    args.extend_from_slice(extra);
    let out = flip(&c.lab, &args);
    let text = String::from_utf8_lossy(&out.stdout);
    let head = format!("BLOCKING {guardrail}: ");
    let line = text
        .lines()
        .find(|l| l.contains(&head))
        .unwrap_or_else(|| panic!("no {head:?} in the dry run:\n{text}"));
    assert!(line.contains(object), "{line:?} names {object:?}");
    let block = &text[text.find(&head).unwrap()..];
    eprintln!("{}", block.lines().take(4).collect::<Vec<_>>().join("\n"));
    assert!(
        block.contains("why: ")
            && block.contains("fix: ")
            && block.contains(&format!("pass --allow {guardrail} to go ahead anyway")),
        "{block}"
    );
    let found = findings(c, to, extra);
    let f = named(&found, guardrail).expect("the finding in --json");
    assert!(f.stops(), "{f:#?}");
    assert!(f.objects.iter().any(|o| o.contains(object)), "{f:#?}");
    assert!(!f.why.is_empty() && !f.fix.is_empty(), "{f:#?}");

    let mut allowed = extra.to_vec();
    allowed.extend(["--allow", guardrail]);
    let found = findings(c, to, &allowed);
    let f = named(&found, guardrail).expect("an allowed finding is still reported");
    assert!(f.allowed && !f.stops(), "{f:#?}");
    let out = flip(&c.lab, &[&["--to", to, "--dry-run"][..], &allowed].concat());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("ALLOWED {guardrail}: ")), "{text}");
}

/// A real `flip` refused by `guardrail`, with the message naming `object`; nothing changed.
fn assert_flip_refused(c: &Cutover, guardrail: &str, object: &str) {
    let out = flip(&c.lab, &["--to", "target", "--drain-timeout", "1s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the flip went ahead: {err}");
    assert!(
        err.contains(&format!("BLOCKING {guardrail}: "))
            && err.contains(object)
            && err.contains(&format!("pass --allow {guardrail} to go ahead anyway"))
            && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(c.lab.status()["active"], "source");
}

fn fix(c: &Cutover, args: &[&str]) -> std::process::Output {
    c.lab
        .redirect(&[&["fix", "replica-identity"][..], args].concat())
}

fn replica_identity(c: &Cutover, table: &str) -> (String, String) {
    let q = format!("SELECT relreplident FROM pg_class WHERE oid = '{table}'::regclass");
    (on_source(c, &q), on_target(c, &q))
}

/// Where a case's SQL runs.
#[derive(Clone, Copy)]
enum On {
    Source,
    Target,
    Both,
    /// `ALTER SUBSCRIPTION ... REFRESH PUBLICATION` on the target, then every table copied.
    Refresh,
}

/// One guardrail's condition, made on real servers and taken away again.
struct Case {
    guardrail: &'static str,
    /// What makes the condition, in order.
    make: &'static [(On, &'static str)],
    /// What the finding must name.
    object: &'static str,
    /// What puts the lab back as it was, in order.
    undo: &'static [(On, &'static str)],
}

fn run_sql(c: &Cutover, steps: &[(On, &str)]) {
    for (on, sql) in steps {
        match on {
            On::Source => drop(on_source(c, sql)),
            On::Target => drop(on_target(c, sql)),
            On::Both => on_both(c, sql),
            On::Refresh => refresh(c),
        }
    }
}

const CASES: &[Case] = &[
    Case {
        guardrail: "unpublished-table",
        make: &[(On::Both, "CREATE TABLE unpub (id int PRIMARY KEY)")],
        object: "public.unpub",
        undo: &[(On::Both, "DROP TABLE unpub")],
    },
    Case {
        guardrail: "initial-copy",
        make: &[
            (On::Both, "CREATE TABLE uncopied (id int PRIMARY KEY)"),
            (
                On::Source,
                "ALTER PUBLICATION redirect_pub ADD TABLE uncopied",
            ),
        ],
        object: "public.uncopied (never copied",
        // The refresh copies it: that alone clears the finding (the table stays published).
        undo: &[(On::Refresh, "")],
    },
    Case {
        guardrail: "missing-on-target",
        make: &[(
            On::Source,
            "CREATE TABLE lonely (id int PRIMARY KEY); ALTER PUBLICATION redirect_pub ADD TABLE lonely",
        )],
        object: "table public.lonely",
        undo: &[(
            On::Source,
            "ALTER PUBLICATION redirect_pub DROP TABLE lonely; DROP TABLE lonely",
        )],
    },
    Case {
        guardrail: "missing-on-target",
        make: &[(
            On::Source,
            "CREATE SEQUENCE only_here; SELECT nextval('only_here')",
        )],
        object: "sequence public.only_here",
        undo: &[(On::Source, "DROP SEQUENCE only_here")],
    },
    Case {
        guardrail: "filtered-publication",
        make: &[(
            On::Source,
            "ALTER PUBLICATION redirect_pub SET (publish = 'insert')",
        )],
        object: "publication redirect_pub (does not publish UPDATE, DELETE, TRUNCATE)",
        undo: &[(
            On::Source,
            "ALTER PUBLICATION redirect_pub SET (publish = 'insert, update, delete, truncate')",
        )],
    },
    Case {
        guardrail: "filtered-publication",
        make: &[
            (On::Both, "CREATE TABLE filt (id int PRIMARY KEY)"),
            (
                On::Source,
                "ALTER PUBLICATION redirect_pub ADD TABLE filt WHERE (id > 10)",
            ),
            (On::Refresh, ""),
        ],
        object: "public.filt in redirect_pub (rows WHERE (id > 10))",
        undo: &[
            (On::Source, "ALTER PUBLICATION redirect_pub DROP TABLE filt"),
            (On::Refresh, ""),
            (On::Both, "DROP TABLE filt"),
        ],
    },
    Case {
        guardrail: "large-objects",
        make: &[(On::Source, "SELECT lo_create(4242)")],
        object: "oid 4242",
        undo: &[(On::Source, "SELECT lo_unlink(4242)")],
    },
    Case {
        guardrail: "unlogged-table",
        make: &[(On::Source, "CREATE UNLOGGED TABLE scratch (id int)")],
        object: "public.scratch",
        undo: &[(On::Source, "DROP TABLE scratch")],
    },
    Case {
        guardrail: "prepared-transactions",
        make: &[(
            On::Source,
            "BEGIN; SELECT txid_current(); PREPARE TRANSACTION 'pt_guard'",
        )],
        object: "'pt_guard'",
        undo: &[(On::Source, "COMMIT PREPARED 'pt_guard'")],
    },
    Case {
        guardrail: "schema-drift",
        make: &[
            (On::Both, "CREATE TABLE drift (id int PRIMARY KEY)"),
            (On::Source, "ALTER PUBLICATION redirect_pub ADD TABLE drift"),
            (On::Refresh, ""),
            (On::Source, "ALTER TABLE drift ADD COLUMN note text"),
        ],
        object: "public.drift column note text: only on the source",
        undo: &[(On::Target, "ALTER TABLE drift ADD COLUMN note text")],
    },
    Case {
        guardrail: "schema-drift",
        make: &[(
            On::Target,
            "ALTER TABLE drift ADD CONSTRAINT positive CHECK (id > 0)",
        )],
        object: "CHECK ((id > 0)) (positive): only on the target",
        undo: &[
            (On::Target, "ALTER TABLE drift DROP CONSTRAINT positive"),
            (
                On::Source,
                "ALTER PUBLICATION redirect_pub DROP TABLE drift",
            ),
            (On::Refresh, ""),
            (On::Both, "DROP TABLE drift"),
        ],
    },
    Case {
        guardrail: "generated-column",
        make: &[
            (
                On::Source,
                "CREATE TABLE gen (id int PRIMARY KEY, a int, b int GENERATED ALWAYS AS (a * 2) STORED)",
            ),
            (
                On::Target,
                "CREATE TABLE gen (id int PRIMARY KEY, a int, b int)",
            ),
            (On::Source, "ALTER PUBLICATION redirect_pub ADD TABLE gen"),
            (On::Refresh, ""),
        ],
        object: "public.gen column b",
        undo: &[
            (On::Source, "ALTER PUBLICATION redirect_pub DROP TABLE gen"),
            (On::Refresh, ""),
            (On::Both, "DROP TABLE gen"),
        ],
    },
    Case {
        guardrail: "missing-extension",
        make: &[(On::Source, "CREATE EXTENSION citext")],
        object: "citext",
        undo: &[(On::Source, "DROP EXTENSION citext")],
    },
];

#[test]
fn each_guardrail_blocks_until_allowed_and_a_clean_lab_has_none() {
    let c = listed_publication_lab("guard");
    let lab = &c.lab;
    assert!(
        findings(&c, "target", &[]).is_empty(),
        "a clean lab has no finding at all"
    );
    for case in CASES {
        eprintln!("case: {} naming {:?}", case.guardrail, case.object);
        run_sql(&c, case.make);
        assert_blocks_until_allowed(&c, "target", case.guardrail, case.object, &[]);
        if case.guardrail == "generated-column" {
            assert!(
                named(&findings(&c, "target", &[]), "schema-drift").is_none(),
                "a generated column's difference is generated-column's alone"
            );
        }
        run_sql(&c, case.undo);
        assert_clear(&c, "target", &[]);
    }
    // A real flip is refused by a blocking finding, and changes nothing.
    run_sql(&c, CASES[0].make);
    assert_flip_refused(&c, "unpublished-table", "public.unpub");
    run_sql(&c, CASES[0].undo);

    // Notes, not blocks: the sequence sync carries unowned sequences and identity columns.
    on_both(
        &c,
        "CREATE SEQUENCE free_seq; CREATE TABLE ident (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v int)",
    );
    on_source(&c, "ALTER PUBLICATION redirect_pub ADD TABLE ident");
    refresh(&c);
    let found = findings(&c, "target", &[]);
    for (g, object) in [
        ("unowned-sequence", "public.free_seq"),
        ("identity-column", "public.ident.id"),
    ] {
        let f = named(&found, g).unwrap_or_else(|| panic!("{g} reported: {found:#?}"));
        assert!(!f.blocks, "{f:#?}");
        assert!(f.why.contains("sequence sync"), "{f:#?}");
        assert!(f.objects.iter().any(|o| o.contains(object)), "{f:#?}");
    }
    assert_clear(&c, "target", &[]);
    // A typo is a clear error listing the names.
    let out = flip(
        lab,
        &[
            "--to",
            "target",
            "--dry-run",
            "--allow",
            "no-replica-identiy",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("no-replica-identity")
            && err.contains("slot-wal-limit"),
        "{err}"
    );
}

/// `fix publication`: printed, refused on bad input (with nothing changed), then applied and
/// copied.
#[test]
fn fix_publication_prints_refuses_bad_input_and_applies() {
    let c = listed_publication_lab("guardpub");
    let lab = &c.lab;
    // The mechanical fix for unpublished-table: printed, refused on bad input, applied.
    on_both(&c, "CREATE TABLE more (id int PRIMARY KEY)");
    on_source(&c, "INSERT INTO more VALUES (1), (2)");
    let publish = |args: &[&str]| lab.redirect(&[&["fix", "publication"][..], args].concat());
    let out = publish(&["--add-table", "public.nothere"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("the source has no table \"public.nothere\""),
        "{err}"
    );
    on_source(&c, "CREATE TABLE source_only (id int PRIMARY KEY)");
    let out = publish(&["--add-table", "public.source_only", "--apply"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("nothing was changed")
            && err.contains("the target has no table public.source_only"),
        "{err}"
    );
    on_source(&c, "DROP TABLE source_only");
    // Publishing a keyless table would make every UPDATE/DELETE on it fail on the source.
    on_both(&c, "CREATE TABLE keyless (v text)");
    let out = publish(&["--add-table", "public.keyless", "--apply"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("nothing was changed")
            && err.contains("public.keyless has no replica identity")
            && err.contains("fix replica-identity"),
        "{err}"
    );
    assert_eq!(
        on_source(
            &c,
            "SELECT count(*) FROM pg_publication_tables WHERE tablename = 'keyless'"
        ),
        "0",
        "nothing was published"
    );
    on_source(&c, "UPDATE keyless SET v = 'still works'");
    // Rows already on the target would be doubled (or stop the copy) by the initial copy.
    on_both(&c, "CREATE TABLE filled (id int PRIMARY KEY)");
    on_target(&c, "INSERT INTO filled VALUES (1)");
    let out = publish(&["--add-table", "public.filled", "--apply"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("nothing was changed")
            && err.contains("public.filled on the target already has rows"),
        "{err}"
    );
    on_both(&c, "DROP TABLE keyless; DROP TABLE filled");
    // A partitioned table's identity would not reach its partitions: refused, not "applied".
    on_both(
        &c,
        "CREATE TABLE parted (k int NOT NULL) PARTITION BY RANGE (k); \
         CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (10)",
    );
    let out = lab.redirect(&[
        "fix",
        "replica-identity",
        "--table",
        "public.parted",
        "--full",
        "--apply",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("public.parted on the target is partitioned"),
        "{err}"
    );
    on_both(&c, "DROP TABLE parted");
    let text = lab.redirect_ok(&["fix", "publication", "--add-table", "public.more"]);
    assert!(
        text.contains(
            "on the source:\n  ALTER PUBLICATION \"redirect_pub\" ADD TABLE public.more;"
        ) && text
            .contains("on the target:\n  ALTER SUBSCRIPTION \"redirect_sub\" REFRESH PUBLICATION;")
            && text.contains("nothing was changed"),
        "{text}"
    );
    assert_blocks_until_allowed(&c, "target", "unpublished-table", "public.more", &[]);
    let text = lab.redirect_ok(&[
        "fix",
        "publication",
        "--add-table",
        "public.more",
        "--apply",
    ]);
    assert!(
        text.contains("applied on the source and the target"),
        "{text}"
    );
    wait_synced(&c);
    assert_eq!(on_target(&c, "SELECT count(*) FROM more"), "2", "copied");
    assert_clear(&c, "target", &[]);
    let out = publish(&["--add-table", "public.more"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already published by redirect_pub"),
        "{out:?}"
    );
}

/// `no-replica-identity`: an UPDATE fails on the source, a real flip is refused, and `fix
/// replica-identity` validates both servers, prints, then applies on both.
#[test]
fn no_replica_identity_blocks_and_fix_replica_identity_mends_it() {
    let c = listed_publication_lab("guardri");
    let lab = &c.lab;
    let data = c.source.data_dir.display().to_string();
    on_both(&c, "CREATE TABLE nokey (k int, v text)");
    on_source(&c, "ALTER PUBLICATION redirect_pub ADD TABLE nokey");
    refresh(&c);
    on_source(&c, "INSERT INTO nokey VALUES (1, 'a'), (2, 'b')");
    let update = lab
        .cmd(
            Ns::Source,
            &[
                "psql",
                "-X",
                "-h",
                &data,
                "-U",
                "postgres",
                "-c",
                "UPDATE nokey SET v = 'z' WHERE k = 1",
            ],
        )
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&update.stderr).contains("does not have a replica identity"),
        "{update:?}"
    );
    assert_blocks_until_allowed(&c, "target", "no-replica-identity", "public.nokey", &[]);
    assert_flip_refused(&c, "no-replica-identity", "public.nokey");

    let out = fix(&c, &["--table", "public.nokey", "--using-index", "nokey_k"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("has no index \"nokey_k\"")
            && err.contains("no usable index"),
        "{err}"
    );
    let out = fix(&c, &["--table", "public.nope", "--full"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("has no table \"public.nope\""),
        "{err}"
    );
    let out = fix(&c, &["--table", "public.nokey"]);
    assert!(!out.status.success(), "needs --using-index or --full");
    // An index on the source only, on a nullable column: both problems named, nothing changed.
    on_source(&c, "CREATE UNIQUE INDEX nokey_k ON nokey (k)");
    let out = fix(
        &c,
        &[
            "--table",
            "public.nokey",
            "--using-index",
            "nokey_k",
            "--apply",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("nothing was changed")
            && err.contains("nullable column(s) k")
            && err.contains("target has no index"),
        "{err}"
    );
    assert_eq!(replica_identity(&c, "nokey"), ("d".into(), "d".into()));
    on_source(&c, "ALTER TABLE nokey ALTER k SET NOT NULL");
    on_target(
        &c,
        "ALTER TABLE nokey ALTER k SET NOT NULL; CREATE UNIQUE INDEX nokey_k ON nokey (k)",
    );
    let out = fix(&c, &["--table", "public.nokey", "--using-index", "nokey_k"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success()
            && text.contains("on the target and the source:")
            && text.contains("ALTER TABLE public.nokey REPLICA IDENTITY USING INDEX nokey_k;")
            && text.contains("nothing was changed"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        replica_identity(&c, "nokey"),
        ("d".into(), "d".into()),
        "print only"
    );
    let text = lab.redirect_ok(&[
        "fix",
        "replica-identity",
        "--table",
        "public.nokey",
        "--using-index",
        "nokey_k",
        "--apply",
    ]);
    assert!(
        text.contains("applied on the target and the source"),
        "{text}"
    );
    assert_eq!(replica_identity(&c, "nokey"), ("i".into(), "i".into()));
    assert!(named(&findings(&c, "target", &[]), "no-replica-identity").is_none());
    on_source(&c, "UPDATE nokey SET v = 'z' WHERE k = 1");
    wait_for(Duration::from_secs(10), "the UPDATE to replicate", || {
        on_target(&c, "SELECT v FROM nokey WHERE k = 1") == "z"
    });
    assert_clear(&c, "target", &[]);
}

/// `long-transaction`: a session that bypasses the proxy with a transaction open blocks only
/// once it is older than `--max-transaction-age`.
#[test]
fn a_long_transaction_blocks_past_max_transaction_age() {
    let c = listed_publication_lab("guardtx");
    let lab = &c.lab;
    let data = c.source.data_dir.display().to_string();
    let mut long = lab.cmd(
        Ns::Source,
        &[
            "psql",
            "-X",
            "-h",
            &data,
            "-U",
            "postgres",
            "-c",
            "BEGIN; SELECT txid_current(); SELECT pg_sleep(60); COMMIT",
        ],
    );
    let long = std::thread::spawn(move || long.output());
    wait_for(Duration::from_secs(10), "the long transaction", || {
        on_source(
            &c,
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(60)%' AND xact_start < now() - interval '1 s' AND pid <> pg_backend_pid()",
        ) == "1"
    });
    assert!(
        named(&findings(&c, "target", &[]), "long-transaction").is_none(),
        "under the default --max-transaction-age (5 min)"
    );
    assert_blocks_until_allowed(
        &c,
        "target",
        "long-transaction",
        "pid ",
        &["--max-transaction-age", "1s"],
    );
    on_source(
        &c,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(60)%' AND pid <> pg_backend_pid()",
    );
    let _ = long.join();
}

/// A real cutover goes ahead with `--allow` under writes and loses nothing; the sequence
/// sync carries an unowned sequence and an identity column, as their notes say; and the
/// rollback's checks look at the reverse replication (the slot on the target).
#[test]
fn an_allowed_cutover_loses_nothing_and_rollback_checks_the_reverse_slot() {
    let c = setup("guardcut", &[]);
    let lab = &c.lab;
    assert_clear(&c, "target", &[]);
    on_source(
        &c,
        "CREATE UNLOGGED TABLE scratch (id int); INSERT INTO scratch VALUES (1)",
    );
    on_both(
        &c,
        "CREATE SEQUENCE free_seq; CREATE TABLE ident (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v int)",
    );
    refresh(&c);
    on_source(
        &c,
        "SELECT nextval('free_seq') FROM generate_series(1, 3); INSERT INTO ident (v) SELECT generate_series(1, 5)",
    );
    assert_flip_refused(&c, "unlogged-table", "public.scratch");

    let load = workload(lab, 0..4, 8);
    std::thread::sleep(Duration::from_secs(2));
    let out = flip(
        lab,
        &[
            "--to",
            "target",
            "--allow",
            "unlogged-table",
            "--drain-timeout",
            "2s",
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "the allowed cutover failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: FlipReport = serde_json::from_slice(&out.stdout).expect("flip --json");
    let f = named(&report.guardrails, "unlogged-table").expect("the allowed finding");
    assert!(f.allowed, "{f:#?}");
    let v = load.join().expect("workload");
    assert_eq!(lab.status()["active"], "target");
    cutover_lab::assert_no_loss(
        &v,
        &pg::acked_rows(lab, Ns::Target, &c.target, ""),
        "target",
    );
    assert_eq!(on_target(&c, "SELECT nextval('free_seq')"), "4");
    assert_eq!(
        on_target(&c, "INSERT INTO ident (v) VALUES (99) RETURNING id"),
        "6"
    );

    // Rollback: the reverse slot on the target, capped by max_slot_wal_keep_size and held
    // back while the reverse subscription is off, two WAL segments behind.
    on_target(&c, "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'");
    on_target(&c, "SELECT pg_reload_conf()");
    on_source(&c, "ALTER SUBSCRIPTION redirect_reverse DISABLE");
    for _ in 0..3 {
        on_target(
            &c,
            "SELECT pg_logical_emit_message(false, 'fill', 'x'); SELECT pg_switch_wal()",
        );
    }
    assert_blocks_until_allowed(
        &c,
        "source",
        "slot-wal-limit",
        "slot redirect_reverse on the target",
        &[],
    );
    on_target(&c, "ALTER SYSTEM RESET max_slot_wal_keep_size");
    on_target(&c, "SELECT pg_reload_conf()");
    on_source(&c, "ALTER SUBSCRIPTION redirect_reverse ENABLE");
    assert!(named(&findings(&c, "source", &[]), "slot-wal-limit").is_none());
    // No false positive on the way back: the reverse replication carries what it must.
    assert_clear(&c, "source", &[]);
}

/// With physical replication the standby replays every byte of WAL, so only the guardrails
/// about what is not in the WAL (or not yet) apply: an unlogged table blocks, a large object
/// does not. Allowed, the cutover promotes the target, and the unlogged table's rows are
/// indeed not there: the finding was true.
#[test]
fn physical_replication_checks_only_what_is_not_in_the_wal() {
    require_root();
    let mut lab = Lab::new("guardphys");
    let source = pg::start(&mut lab, Ns::Source, "source", &[]);
    psql(&lab, Ns::Source, &source, pg::SCHEMA);
    let target = pg::start_standby(&mut lab, Ns::Target, "target", redirect_tests::SOURCE_ADDR);
    let mut flags = pg::controller_flags();
    flags.extend(["--replication".to_owned(), "physical".to_owned()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    lab.start_redirect(&flags);
    let c = Cutover {
        lab: Arc::new(lab),
        source,
        target,
    };
    on_source(
        &c,
        "CREATE UNLOGGED TABLE scratch (id int); INSERT INTO scratch VALUES (1); SELECT lo_create(4243)",
    );
    let out = flip(&c.lab, &["--to", "target", "--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("only the unlogged-table and long-transaction guardrails apply"),
        "{text}"
    );
    let found = findings(&c, "target", &[]);
    assert!(named(&found, "large-objects").is_none(), "{found:#?}");
    assert_blocks_until_allowed(&c, "target", "unlogged-table", "public.scratch", &[]);
    assert_flip_refused(&c, "unlogged-table", "public.scratch");
    let out = flip(
        &c.lab,
        &[
            "--to",
            "target",
            "--allow",
            "unlogged-table",
            "--drain-timeout",
            "1s",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(on_target(&c, "SELECT pg_is_in_recovery()"), "f");
    assert_eq!(
        on_target(&c, "SELECT count(*) FROM scratch"),
        "0",
        "unlogged rows are not replicated"
    );
    assert_eq!(
        on_target(
            &c,
            "SELECT count(*) FROM pg_largeobject_metadata WHERE oid = 4243"
        ),
        "1"
    );
}
