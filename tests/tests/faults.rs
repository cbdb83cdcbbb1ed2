//! The cutover's promise off the happy path: each test breaks something at the moment it
//! matters (a stopped backend, a restart mid-drain, an unreachable server, a lock, a full
//! disk) and checks that nothing acknowledged is lost and no client is left waiting.

use std::{
    io::{Read as _, Write as _},
    sync::Arc,
    time::{Duration, Instant},
};

use redirect_tests::{
    Lab, Ns, PG_PORT, VIP,
    cutover_lab::{assert_no_loss, flip, flip_in_background, setup, start, workload},
    pg::{self, Pg, psql},
    require_root, wait_for, workload,
};

fn flip_ok(lab: &Lab, args: &[&str]) -> String {
    let out = flip(lab, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "flip {args:?} failed: {err}");
    err
}

fn assert_all_on(v: &workload::Verdict, lab: &Lab, ns: Ns, pg: &Pg, server: &str) {
    assert_no_loss(v, &pg::acked_rows(lab, ns, pg, ""), server);
}

fn history(lab: &Lab) -> Vec<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(&lab.redirect_ok(&["history", "--json"]))
        .expect("history --json")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn journaled(lab: &Lab, step: &str) -> bool {
    history(lab).iter().any(|e| e["step"] == step)
}

/// Issue 7, reproduced failure 1, and the acceptance run: five cutovers in a row (forward,
/// back, forward, back, forward) under writes of every shape and under `pgbench -C`, with
/// the controller started without `--subscription`.
#[test]
fn five_cutovers_in_a_row_under_writes_and_connection_churn() {
    let mut c = setup("five", &[]);
    let lab_mut = Arc::get_mut(&mut c.lab).expect("sole owner");
    std::fs::write(lab_mut.work_dir.join("select1.sql"), "SELECT 1;\n").unwrap();
    let script = lab_mut.work_dir.join("select1.sql").display().to_string();
    let port = PG_PORT.to_string();
    let pgbench = lab_mut.spawn(
        Ns::Client,
        &[
            "pgbench", "-n", "-C", "-c", "4", "-T", "40", "-f", &script, "-h", VIP, "-p", &port,
            "-U", "postgres", "postgres",
        ],
        "pgbench.log",
    );
    let lab = &c.lab;
    let load = workload(lab, 0..8, 40);
    std::thread::sleep(Duration::from_secs(2));
    for (i, to) in ["target", "source", "target", "source", "target"]
        .iter()
        .enumerate()
    {
        let err = flip_ok(lab, &["--to", to, "--drain-timeout", "2s"]);
        assert_eq!(
            lab.status()["active"],
            *to,
            "cutover {i} to the {to}: {err}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    let v = load.join().expect("workload");
    assert_all_on(&v, lab, Ns::Target, &c.target, "target");
    eprintln!(
        "five cutovers: {} acked, longest client wait {:?}, longest pause {:?}",
        v.acked().count(),
        v.max_wait(),
        v.longest_pause()
    );
    // pgbench -C: every connection attempt through five cutovers succeeded.
    wait_for(Duration::from_secs(60), "pgbench to finish", || {
        std::fs::read_to_string(lab.work_dir.join("pgbench.log"))
            .unwrap_or_default()
            .contains("tps =")
    });
    let out = std::fs::read_to_string(lab.work_dir.join("pgbench.log")).unwrap();
    assert!(
        !out.contains("error") && !out.contains("aborted"),
        "pgbench -C saw failures:\n{out}"
    );
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    let _ = pgbench;
    // The forward subscription was found without --subscription, remembered, and restarted
    // after each rollback.
    let starts: Vec<_> = history(lab)
        .into_iter()
        .filter(|e| e["step"] == "start" && e["to"] == "target")
        .collect();
    assert_eq!(starts.len(), 3);
    assert!(
        starts.iter().all(|e| e["subscription"] == "redirect_sub"),
        "{starts:?}"
    );
}

/// Reproduced failure 2: a preflight that fails (target unreachable: its link is down) does
/// not wedge the controller; once the target is back, the cutover runs.
#[test]
fn a_failed_preflight_does_not_wedge_the_controller() {
    let c = setup("wedg", &["--query-timeout", "2s"]);
    let lab = &c.lab;
    lab.exec_ok(Ns::Target, &["ip", "link", "set", "eth0", "down"]);
    let t = Instant::now();
    let out = flip(lab, &["--to", "target"]);
    assert!(!out.status.success());
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "the refusal took {:?}",
        t.elapsed()
    );
    assert_eq!(lab.status()["active"], "source");
    lab.exec_ok(Ns::Target, &["ip", "link", "set", "eth0", "up"]);
    lab.exec_ok(
        Ns::Target,
        &["ip", "route", "replace", "default", "via", "198.18.3.1"],
    );
    wait_for(Duration::from_secs(30), "replication to recover", || {
        psql(
            lab,
            Ns::Source,
            &c.source,
            "SELECT count(*) FROM pg_replication_slots WHERE active",
        ) == "1"
    });
    let err = flip_ok(lab, &["--to", "target", "--drain-timeout", "1s"]);
    assert!(!err.contains("another cutover"), "{err}");
    assert_eq!(lab.status()["active"], "target");
}

/// The pid of the source backend serving the proxied connection from SNAT port `port`.
fn source_backend(lab: &Lab, source: &Pg, port: u16) -> i32 {
    psql(
        lab,
        Ns::Source,
        source,
        &format!("SELECT pid FROM pg_stat_activity WHERE client_port = {port}"),
    )
    .parse()
    .expect("the proxied session's pid")
}

/// Reproduced failure 3: an INSERT reaches an idle proxied backend's socket just before the
/// fence while that backend is not scheduled (SIGSTOP). It must not be acknowledged unless
/// it is on the new server; and its client gets an answer soon after the backend runs again.
#[test]
fn a_write_queued_behind_a_stopped_backend_is_not_lost() {
    let c = setup("stop", &[]);
    let lab = c.lab.clone();
    let (to_test, from_client) = std::sync::mpsc::channel::<String>();
    let (to_client, from_test) = std::sync::mpsc::channel::<()>();
    let client = lab.spawn_in_ns(Ns::Client, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let db = pg::connect(VIP).await;
            let port: i32 = db
                .query_one("SELECT inet_client_port()", &[])
                .await
                .unwrap()
                .get(0);
            to_test.send(port.to_string()).unwrap();
            // The test stops our backend, then lets us write into its socket.
            tokio::task::spawn_blocking(move || from_test.recv().unwrap())
                .await
                .unwrap();
            let t = Instant::now();
            let r = tokio::time::timeout(
                Duration::from_secs(20),
                db.execute("INSERT INTO acks (writer, seq) VALUES (777, 1)", &[]),
            )
            .await;
            (r.map(|r| r.map_err(|e| e.to_string())), t.elapsed())
        })
    });
    // inet_client_port() on the server is the SNAT port.
    let snat_port: u16 = from_client
        .recv_timeout(Duration::from_secs(20))
        .unwrap()
        .parse()
        .unwrap();
    let backend = source_backend(&lab, &c.source, snat_port);
    // SAFETY: stopping a backend of this lab's own PostgreSQL server.
    unsafe { libc::kill(backend, libc::SIGSTOP) };
    to_client.send(()).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let flipper = flip_in_background(&lab, &["--to", "target", "--drain-timeout", "1s"]);
    wait_for(Duration::from_secs(20), "the hold and fence", || {
        journaled(&lab, "hold")
    });
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: as above.
    unsafe { libc::kill(backend, libc::SIGCONT) };
    let out = flipper.join().unwrap();
    let (answer, waited) = client.join().unwrap();
    let answer = answer.expect("the client got an answer within 20 s");
    eprintln!(
        "stopped backend: flip ok={} answer={answer:?} after {waited:?}",
        out.status.success()
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let on_target = psql(
        &lab,
        Ns::Target,
        &c.target,
        "SELECT count(*) FROM acks WHERE writer = 777",
    );
    let on_source = psql(
        &lab,
        Ns::Source,
        &c.source,
        "SELECT count(*) FROM acks WHERE writer = 777",
    );
    if answer.is_ok() {
        assert_eq!(on_target, "1", "an acknowledged write is on the new server");
    } else {
        assert_eq!(
            on_source, on_target,
            "an unacknowledged write is on both or neither"
        );
    }
}

/// Reproduced failure 4: the controller restarted (as `systemctl restart` would) during a
/// 60 s drain. A connection that never started a session (its client sends its first bytes
/// only after the flip) and an idle pooled client are both answered within seconds: the
/// successor resumes the drain from the journal.
#[test]
fn a_controller_restarted_during_the_drain_resumes_it() {
    let mut c = setup("drn", &[]);
    let lab = c.lab.clone();
    let (to_test, from_client) = std::sync::mpsc::channel::<()>();
    let (to_client, from_test) = std::sync::mpsc::channel::<()>();
    let client = lab.spawn_in_ns(Ns::Client, move || {
        let mut raw = std::net::TcpStream::connect((VIP, PG_PORT)).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let idle = pg::connect(VIP).await;
            to_test.send(()).unwrap();
            tokio::task::spawn_blocking(move || from_test.recv().unwrap())
                .await
                .unwrap();
            // The raw connection's first bytes (a startup packet), after the flip.
            let t = Instant::now();
            raw.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            let _ = raw.write_all(&[0, 0, 0, 8, 4, 210, 22, 47]);
            let mut buf = [0u8; 64];
            let raw_answer = raw
                .read(&mut buf)
                .map(|n| n.to_string())
                .map_err(|e| e.kind());
            let raw_wait = t.elapsed();
            let t = Instant::now();
            let idle_answer =
                tokio::time::timeout(Duration::from_secs(15), idle.simple_query("SELECT 1")).await;
            (
                raw_answer,
                raw_wait,
                idle_answer.map(|r| r.is_ok()),
                t.elapsed(),
            )
        })
    });
    from_client.recv_timeout(Duration::from_secs(20)).unwrap();
    let flipper = flip_in_background(&lab, &["--to", "target", "--drain-timeout", "60s"]);
    wait_for(Duration::from_secs(30), "the flip", || {
        journaled(&lab, "flip")
    });
    let pid = lab.redirect_pid().unwrap();
    // SAFETY: stopping the controller this lab started, as `systemctl restart` would.
    unsafe { libc::kill(i32::try_from(pid).unwrap(), libc::SIGTERM) };
    let _ = flipper.join();
    drop(lab);
    let lab = Arc::get_mut(&mut c.lab).expect("sole owner");
    wait_for(Duration::from_secs(20), "the controller to exit", || {
        lab.reap_exited();
        // SAFETY: probing a pid this lab started.
        unsafe { libc::kill(i32::try_from(pid).unwrap(), 0) != 0 }
    });
    start(lab, &[]);
    to_client.send(()).unwrap();
    let (raw_answer, raw_wait, idle_answer, idle_wait) = client.join().unwrap();
    eprintln!(
        "after restart: raw {raw_answer:?} in {raw_wait:?}, idle {idle_answer:?} in {idle_wait:?}"
    );
    assert!(
        raw_wait < Duration::from_secs(5),
        "the raw client waited {raw_wait:?} ({raw_answer:?})"
    );
    assert!(
        idle_answer.is_ok() && idle_wait < Duration::from_secs(5),
        "the idle client waited {idle_wait:?}"
    );
    assert!(
        lab.last_redirect_log().contains("resuming the drain"),
        "{}",
        lab.last_redirect_log()
    );
    wait_for(
        Duration::from_secs(70),
        "the resumed drain to be journaled",
        || {
            history(lab).iter().any(|e| {
                e["step"] == "recovered" && e["detail"].as_str().unwrap_or("").contains("drain")
            })
        },
    );
    let status = lab.status();
    assert_eq!(status["active"], "target");
    assert!(
        status["controller"]["last_recovery"]
            .as_str()
            .unwrap_or("")
            .contains("drain"),
        "{status}"
    );
    assert!(status["interrupted"].is_null(), "{status}");
}

/// `--timeout` is enforced by the controller after the barrier too: a lock on a sequence on
/// the target blocks `setval` past it, and the cutover rolls back instead of flipping late.
#[test]
fn a_lock_on_the_target_past_timeout_rolls_back() {
    let mut c = setup("lock", &[]);
    let locker = pg::spawn_psql(
        Arc::get_mut(&mut c.lab).expect("sole owner"),
        Ns::Target,
        &c.target,
        "BEGIN; ALTER SEQUENCE acks_id_seq CACHE 1; SELECT pg_sleep(25); COMMIT",
        "locker.log",
    );
    let lab = &c.lab;
    wait_for(Duration::from_secs(10), "the lock", || {
        psql(
            lab,
            Ns::Target,
            &c.target,
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation WHERE c.relname = 'acks_id_seq' AND l.granted AND l.mode <> 'AccessShareLock'",
        ) != "0"
    });
    let load = workload(lab, 30..34, 8);
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    let out = flip(lab, &["--to", "target", "--timeout", "2s"]);
    let took = t.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("sequences") && err.contains("rolled back"),
        "{err}"
    );
    assert!(took < Duration::from_secs(8), "the abort took {took:?}");
    let v = load.join().unwrap();
    assert_eq!(lab.status()["active"], "source");
    assert_all_on(&v, lab, Ns::Source, &c.source, "source");
    assert!(
        v.max_wait() < Duration::from_secs(5),
        "a client waited {:?}",
        v.max_wait()
    );
    let _ = locker;
}

/// The rollback escape hatches: an immediate flip back lifts the stale fence; a forced
/// rollback with no reverse replication needs no marker; and without a controller a flip
/// refuses to silently become an unfenced map write.
#[test]
fn rollback_escape_hatches_work() {
    let mut c = setup("esc", &[]);
    let lab = c.lab.clone();
    flip_ok(&lab, &["--to", "target", "--drain-timeout", "1s"]);
    flip_ok(&lab, &["--to", "source", "--immediate"]);
    let v = workload(&lab, 40..42, 2).join().unwrap();
    assert!(
        v.acked().count() > 5 && v.errors().is_empty(),
        "new source connections can write: {:?}",
        v.errors()
    );
    flip_ok(&lab, &["--to", "target", "--immediate"]);
    // No reverse replication any more: a lossless rollback is refused, a forced one goes
    // ahead at once, without waiting for a marker that can never arrive.
    psql(
        &lab,
        Ns::Source,
        &c.source,
        "ALTER SUBSCRIPTION redirect_reverse DISABLE",
    );
    psql(
        &lab,
        Ns::Source,
        &c.source,
        "ALTER SUBSCRIPTION redirect_reverse SET (slot_name = NONE)",
    );
    psql(
        &lab,
        Ns::Source,
        &c.source,
        "DROP SUBSCRIPTION redirect_reverse",
    );
    let out = flip(&lab, &["--to", "source"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    let t = Instant::now();
    flip_ok(
        &lab,
        &["--to", "source", "--force", "--drain-timeout", "1s"],
    );
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "forced rollback took {:?}",
        t.elapsed()
    );
    assert_eq!(lab.status()["active"], "source");
    drop(lab);
    let lab = Arc::get_mut(&mut c.lab).expect("sole owner");
    let pid = lab.redirect_pid().unwrap();
    lab.signal(pid, libc::SIGTERM);
    let out = flip(lab, &["--to", "target"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--immediate"), "{err}");
    assert_eq!(lab.status()["active"], "source");
}

/// Preflight refuses while a table is still in its initial copy; and `run` never marks a
/// newly published table as synced without copying it.
#[test]
fn tables_not_yet_copied_block_the_cutover() {
    require_root();
    let mut lab = Lab::new("copy");
    let source = pg::start(&mut lab, Ns::Source, "source", &[]);
    let target = pg::start(&mut lab, Ns::Target, "target", &[]);
    pg::setup_logical(&lab, &source, &target);
    for (ns, pg) in [(Ns::Source, &source), (Ns::Target, &target)] {
        psql(&lab, ns, pg, "CREATE TABLE late (id int PRIMARY KEY)");
    }
    psql(
        &lab,
        Ns::Source,
        &source,
        "INSERT INTO late SELECT generate_series(1, 100)",
    );
    start(&mut lab, &[]);
    let log = lab.last_redirect_log();
    assert!(log.contains("never copied"), "{log}");
    assert_eq!(
        psql(
            &lab,
            Ns::Target,
            &target,
            "SELECT count(*) FROM pg_subscription_rel r JOIN pg_class c ON c.oid = r.srrelid WHERE c.relname = 'late'"
        ),
        "0",
        "not marked synced"
    );
    // Now refreshed properly, but the copy cannot finish (a row the target already has
    // makes every attempt fail): the cutover must wait for it.
    psql(&lab, Ns::Target, &target, "INSERT INTO late VALUES (1)");
    psql(
        &lab,
        Ns::Target,
        &target,
        "ALTER SUBSCRIPTION redirect_sub REFRESH PUBLICATION",
    );
    let out = flip(&lab, &["--to", "target", "--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("BLOCKING") && text.contains("late"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = flip(&lab, &["--to", "target"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("still copying"), "{err}");
    assert_eq!(lab.status()["active"], "source");
}

/// A reverse subscription that cannot be created keeps its slot (dropped, it would end
/// lossless rollback for good over what may be a short outage) and the report says how to
/// finish by hand or give rollback up; `finish` shows its plan, changes nothing without
/// --yes, and retires the migration's replication, that slot included.
#[test]
fn a_failed_reverse_subscription_keeps_its_slot_and_finish_retires_replication() {
    let c = setup(
        "fin",
        &[
            "--reverse-conninfo",
            "host=198.18.9.9 port=5432 user=postgres dbname=postgres connect_timeout=1",
        ],
    );
    let lab = &c.lab;
    // Preflight proves the way back first: without it, a rollback could not be lossless.
    let out = flip(lab, &["--to", "target"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("reverse replication"),
        "{err}"
    );
    assert_eq!(lab.status()["active"], "source");
    let out = flip(
        lab,
        &[
            "--to",
            "target",
            "--force",
            "--drain-timeout",
            "1s",
            "--json",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reverse = report["reverse_replication"].as_str().unwrap();
    assert!(
        reverse.contains("FAILED")
            && reverse.contains("KEPT on the target")
            && reverse.contains("ALTER SUBSCRIPTION redirect_reverse ENABLE")
            && reverse.contains("redirect finish"),
        "{report}"
    );
    let slots = |ns, pg| psql(lab, ns, pg, "SELECT count(*) FROM pg_replication_slots");
    assert_eq!(
        slots(Ns::Target, &c.target),
        "1",
        "the reverse slot is kept for a retry by hand"
    );
    let plan = lab.redirect_ok(&["finish"]);
    assert!(
        plan.contains("nothing was changed") && plan.contains("redirect_sub"),
        "{plan}"
    );
    assert_eq!(slots(Ns::Source, &c.source), "1", "a plan changes nothing");
    let done = lab.redirect_ok(&["finish", "--yes"]);
    assert!(!done.contains("FAILED"), "{done}");
    assert_eq!(
        slots(Ns::Source, &c.source),
        "0",
        "the forward slot is dropped"
    );
    assert_eq!(
        slots(Ns::Target, &c.target),
        "0",
        "the kept reverse slot is dropped"
    );
    assert_eq!(
        psql(
            lab,
            Ns::Target,
            &c.target,
            "SELECT count(*) FROM pg_subscription"
        ),
        "0"
    );
    assert!(journaled(lab, "finished"));
}

/// Restarting `run` with a different `--target` would keep `ACTIVE` by index and move live
/// traffic to the new server: refused before anything changes, unless asked for.
#[test]
fn restarting_run_with_a_different_target_is_refused() {
    let mut c = setup("rtgt", &[]);
    let lab = Arc::get_mut(&mut c.lab).expect("sole owner");
    let pid = lab.redirect_pid().unwrap();
    lab.signal(pid, libc::SIGTERM);
    let mut args = lab.run_args();
    let t = args.iter().position(|a| a == "--target").unwrap();
    args[t + 1] = "198.18.3.9:5432".into();
    args.push("--once".into());
    let out = lab.redirect_cmd().args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("198.18.3.9") && err.contains("--replace-backends"),
        "{err}"
    );
    let status = lab.status();
    assert_eq!(
        status["backends"]["target"]["addr"], "198.18.3.2:5432",
        "nothing changed: {status}"
    );
}

/// A sequence the controller's role cannot read is a blocking finding, never skipped (the
/// target would hand out ids the source already gave).
#[test]
fn an_unreadable_sequence_blocks_the_cutover() {
    require_root();
    let mut lab = Lab::new("seq");
    let source = pg::start(&mut lab, Ns::Source, "source", &[]);
    let target = pg::start(&mut lab, Ns::Target, "target", &[]);
    pg::setup_logical(&lab, &source, &target);
    for (ns, pg) in [(Ns::Source, &source), (Ns::Target, &target)] {
        psql(
            &lab,
            ns,
            pg,
            "CREATE ROLE migrator LOGIN; GRANT pg_read_all_stats TO migrator",
        );
    }
    psql(
        &lab,
        Ns::Source,
        &source,
        "CREATE SEQUENCE private_seq; SELECT nextval('private_seq')",
    );
    let dsn = |host: &str| {
        format!("host={host} port={PG_PORT} user=migrator dbname=postgres connect_timeout=10")
    };
    let (s, t) = (
        dsn(redirect_tests::SOURCE_ADDR),
        dsn(redirect_tests::TARGET_ADDR),
    );
    lab.start_redirect(&["--source-dsn", &s, "--target-dsn", &t]);
    let out = flip(&lab, &["--to", "target", "--dry-run"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("BLOCKING") && text.contains("private_seq") && text.contains("GRANT"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lab.status()["active"], "source");
}
