//! L2: the safe cutover in the netns lab, with logical replication between two real
//! `PostgreSQL` servers and a workload that records every acknowledged commit.

#![allow(
    clippy::too_many_lines,
    reason = "a lab scenario reads top to bottom as one story"
)]

use std::{collections::HashSet, sync::Arc, time::Duration};

use redirect::journal::Step;
use redirect_tests::{
    Lab, Ns,
    cutover_lab::{self, Cutover, flip, flip_in_background, setup, workload},
    pg::{self, Pg, psql},
    require_root, wait_for,
};

fn rows(lab: &Lab, ns: Ns, pg: &Pg) -> HashSet<(i32, i64)> {
    pg::acked_rows(lab, ns, pg, "")
}

#[test]
fn cutover_under_writes_loses_nothing_refuses_nothing_and_rolls_back_losslessly() {
    let c = setup("cut", &[]);
    let lab = &c.lab;
    let load = workload(lab, 0..6, 10);
    std::thread::sleep(Duration::from_secs(3));
    let out = flip(lab, &["--to", "target", "--drain-timeout", "2s", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cutover failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("flip --json");
    for step in [
        "hold",
        "fence",
        "barrier",
        "sequences",
        "reverse",
        "flip",
        "release",
    ] {
        assert!(stderr.contains(step), "progress shows {step}: {stderr}");
    }
    let v = load.join().expect("workload");
    assert_eq!(lab.status()["active"], "target");

    // Every acknowledged write is on the target, whichever server took it.
    let on_target = rows(lab, Ns::Target, &c.target);
    cutover_lab::assert_no_loss_through_a_cutover(&v, &on_target, "target");
    // Writes went on after the flip, through new and re-established connections, and the
    // target's sequence continued past the source's.
    let after = psql(
        lab,
        Ns::Target,
        &c.target,
        "SELECT count(*) FROM acks WHERE id > (SELECT max(id) FROM acks WHERE at < (SELECT max(created) FROM redirect_barrier))",
    );
    assert!(
        after.parse::<u64>().unwrap() > 0,
        "writes continued on the target after the cutover"
    );
    let ids_unique = psql(
        lab,
        Ns::Target,
        &c.target,
        "SELECT count(*) = count(DISTINCT id) FROM acks",
    );
    assert_eq!(ids_unique, "t");
    let pause = report["write_pause_ms"].as_f64().unwrap();
    let hold = report["hold_ms"].as_f64().unwrap();
    eprintln!(
        "cutover: write pause {pause:.1} ms, hold {hold:.1} ms, held SYNs {}, longest client-seen pause {:?}, slowest connect {:?}, acked {}",
        report["held_syns"],
        v.longest_pause(),
        v.max_connect(),
        v.acked().count()
    );
    assert!(
        v.max_connect() < Duration::from_millis(900),
        "no connection waited for a SYN retransmit: {:?}",
        v.max_connect()
    );

    // The journal has every step with LSNs.
    let history: serde_json::Value =
        serde_json::from_str(&lab.redirect_ok(&["history", "--json"])).unwrap();
    let steps: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["step"].as_str().unwrap())
        .collect();
    for step in [
        "start",
        "hold",
        "fence",
        "barrier",
        "sequences",
        "flip",
        "release",
        "drain",
        "done",
    ] {
        assert!(steps.contains(&step), "journal has {step}: {steps:?}");
    }
    assert!(
        history
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["step"] == "barrier"
                && e["source_lsn"].is_string()
                && e["target_lsn"].is_string())
    );

    // /metrics and lag.
    let metrics = lab.in_ns(Ns::Proxy, || {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect("127.0.0.1:9187").expect("metrics port");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    });
    for m in [
        "redirect_active_backend{backend=\"target\"} 1",
        "redirect_cutover_phase{phase=\"idle\"} 1",
        "redirect_datapath_packets_total",
        "redirect_cutover_write_pause_seconds",
    ] {
        assert!(metrics.contains(m), "/metrics has {m}:\n{metrics}");
    }
    let lag: serde_json::Value =
        serde_json::from_str(&lab.redirect_ok(&["lag", "--json"])).unwrap();
    assert!(lag["bytes"].is_u64() && lag["seconds"].is_f64(), "{lag}");

    // Rollback over the reverse replication: writes taken by the target come back.
    let load = workload(lab, 10..14, 7);
    std::thread::sleep(Duration::from_secs(2));
    let out = flip(lab, &["--to", "source", "--drain-timeout", "2s"]);
    assert!(
        out.status.success(),
        "rollback failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v2 = load.join().expect("workload");
    assert_eq!(lab.status()["active"], "source");
    let on_source = rows(lab, Ns::Source, &c.source);
    cutover_lab::assert_no_loss_through_a_cutover(&v2, &on_source, "source");
    cutover_lab::assert_no_loss_through_a_cutover(&v, &on_source, "source (first workload)");
}

#[test]
fn dry_run_changes_nothing() {
    let c = setup("dry", &[]);
    let lab = &c.lab;
    let out = flip(lab, &["--to", "target", "--dry-run"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("dry run: nothing was changed") && text.contains("barrier"),
        "{text}"
    );
    assert_eq!(lab.status()["active"], "source");
    assert_eq!(
        psql(
            lab,
            Ns::Target,
            &c.target,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'redirect_reverse'"
        ),
        "0"
    );
    assert_eq!(
        psql(
            lab,
            Ns::Source,
            &c.source,
            "SELECT count(*) FROM pg_subscription"
        ),
        "0"
    );
    assert_eq!(
        psql(
            lab,
            Ns::Target,
            &c.target,
            "SELECT subenabled FROM pg_subscription"
        ),
        "t"
    );
    assert_eq!(lab.status()["stats"]["syn_held"], 0);
    let history = lab.redirect_ok(&["history"]);
    assert!(history.contains("no cutover recorded"), "{history}");
}

/// After a refused or aborted cutover: new connections still go to the source, which takes
/// writes, and the datapath holds and fences nothing.
fn assert_source_serves(c: &Cutover) {
    let lab = &c.lab;
    assert_eq!(lab.status()["active"], "source");
    let stats_before = lab.status()["stats"]["fenced"].as_u64().unwrap_or(0);
    let v = workload(lab, 100..102, 1).join().expect("workload");
    assert_eq!(v.refused(), 0, "{:?}", v.errors());
    let on_source = rows(lab, Ns::Source, &c.source);
    assert!(
        v.acked().all(|a| on_source.contains(&a)),
        "writes land on the source"
    );
    assert!(v.acked().count() > 10);
    assert_eq!(
        lab.status()["stats"]["fenced"].as_u64().unwrap_or(0),
        stats_before,
        "nothing is fenced"
    );
}

#[test]
fn broken_replication_or_lag_is_refused_before_anything_changes() {
    let c = setup("lag", &[]);
    psql(
        &c.lab,
        Ns::Target,
        &c.target,
        "ALTER SUBSCRIPTION redirect_sub DISABLE",
    );
    // Let the slot go inactive and writes pile up behind it.
    wait_for(Duration::from_secs(20), "the slot to go inactive", || {
        psql(
            &c.lab,
            Ns::Source,
            &c.source,
            "SELECT count(*) FROM pg_replication_slots WHERE active",
        ) == "0"
    });
    psql(
        &c.lab,
        Ns::Source,
        &c.source,
        "INSERT INTO acks (writer, seq) SELECT -1, g FROM generate_series(1, 20000) g",
    );
    let out = flip(&c.lab, &["--to", "target", "--max-lag", "64kB"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("preflight failed")
            && (err.contains("not healthy") || err.contains("above --max-lag")),
        "{err}"
    );
    assert!(
        err.lines()
            .last()
            .is_some_and(|l| l.starts_with("redirect: ")),
        "ends with one error line: {err}"
    );
    assert_source_serves(&c);
}

/// A target whose apply is held back (a lock on the table it applies to) is healthy but
/// behind. A flip waits for it, holding nothing, for up to --lag-wait: given too little, it
/// refuses, having said it waited; once the lock goes, the same flip cuts over, losing
/// nothing written while it waited.
#[test]
fn a_replica_catching_up_is_waited_for_and_one_that_stays_behind_is_refused() {
    let mut c = setup("wait", &[]);
    let lock_acks = |c: &mut Cutover, secs: u32, name: &str| {
        let lab = Arc::get_mut(&mut c.lab).expect("no other handle on the lab");
        pg::spawn_psql(
            lab,
            Ns::Target,
            &c.target,
            &format!(
                "BEGIN; LOCK TABLE acks IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep({secs}); COMMIT"
            ),
            name,
        );
        wait_for(Duration::from_secs(20), "the lock on the target", || {
            psql(
                &c.lab,
                Ns::Target,
                &c.target,
                "SELECT count(*) FROM pg_locks WHERE relation = 'acks'::regclass AND mode = 'AccessExclusiveLock' AND granted",
            ) == "1"
        });
    };
    let pile_up = |c: &Cutover, writer: i32| {
        psql(
            &c.lab,
            Ns::Source,
            &c.source,
            &format!(
                "INSERT INTO acks (writer, seq) SELECT {writer}, g FROM generate_series(1, 5000) g"
            ),
        );
    };

    // Held back for longer than --lag-wait: refused, after waiting, with nothing changed.
    lock_acks(&mut c, 60, "locker-long");
    pile_up(&c, -1);
    let started = std::time::Instant::now();
    let out = flip(
        &c.lab,
        &["--to", "target", "--max-lag", "64kB", "--lag-wait", "2s"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("waiting for replication to catch up")
            && err.contains("preflight failed")
            && err.contains("above --max-lag"),
        "{err}"
    );
    assert!(started.elapsed() >= Duration::from_secs(2), "it waited");
    psql(
        &c.lab,
        Ns::Target,
        &c.target,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%LOCK TABLE acks%' AND pid <> pg_backend_pid()",
    );
    assert_source_serves(&c);

    // The operator gives up on a flip while it waits (Ctrl-C): it is called off, and does
    // not go ahead by itself once replication catches up.
    lock_acks(&mut c, 60, "locker-abandoned");
    pile_up(&c, -3);
    let mut cli = c
        .lab
        .redirect_cmd()
        .args(["flip", "--to", "target", "--max-lag", "64kB"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning redirect flip");
    let mut stderr = std::io::BufReader::new(cli.stderr.take().expect("piped"));
    let mut said = String::new();
    while !said.contains("waiting for replication to catch up") {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut stderr, &mut line).expect("reading flip");
        assert!(n > 0, "flip ended before it waited: {said}");
        said.push_str(&line);
    }
    cli.kill().expect("ending the CLI");
    let _ = cli.wait();
    drop(stderr);
    psql(
        &c.lab,
        Ns::Target,
        &c.target,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE '%LOCK TABLE acks%' AND pid <> pg_backend_pid()",
    );
    wait_for(
        Duration::from_secs(20),
        "the controller to be idle again",
        || c.lab.status()["controller"]["phase"] == "idle",
    );
    assert_eq!(
        c.lab.status()["active"],
        "source",
        "an abandoned flip never ran"
    );
    let history: serde_json::Value =
        serde_json::from_slice(&c.lab.redirect(&["history", "--json"]).stdout).unwrap_or_default();
    assert!(
        history
            .as_array()
            .is_none_or(|steps| steps.iter().all(|e| e["step"] != "hold")),
        "nothing was held: {history}"
    );

    // Held back for a few seconds: the default --lag-wait sees it through.
    lock_acks(&mut c, 4, "locker-short");
    pile_up(&c, -2);
    let out = flip(
        &c.lab,
        &[
            "--to",
            "target",
            "--max-lag",
            "64kB",
            "--drain-timeout",
            "2s",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("waiting for replication to catch up"), "{err}");
    assert_eq!(c.lab.status()["active"], "target");
    assert_eq!(
        psql(
            &c.lab,
            Ns::Target,
            &c.target,
            "SELECT count(*) FROM acks WHERE writer IN (-1, -2)"
        ),
        "10000",
        "what was written while the flip waited is on the target"
    );
}

/// The target down: a flip is refused; the lag stops being reported healthy (so the
/// unhealthy alert can fire, instead of the last good reading staying green); and a
/// controller restarted meanwhile starts anyway, because its pinned datapath is serving.
#[test]
fn unreachable_target_is_refused() {
    let mut c = setup("unr", &[]);
    let lab = Arc::get_mut(&mut c.lab).expect("no other owner yet");
    let lag: serde_json::Value =
        serde_json::from_str(&lab.redirect_ok(&["lag", "--json"])).expect("lag --json");
    assert_eq!(lag["healthy"], true, "{lag}");
    lab.signal(c.target.pid, libc::SIGTERM);
    let out = flip(lab, &["--to", "target"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("target"), "{err}");
    let scrape = |lab: &redirect_tests::Lab| {
        lab.in_ns(Ns::Proxy, || {
            use std::io::{Read as _, Write as _};
            let Ok(mut s) = std::net::TcpStream::connect("127.0.0.1:9187") else {
                return String::new();
            };
            let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
            let mut body = String::new();
            let _ = s.read_to_string(&mut body);
            body
        })
    };
    wait_for(
        Duration::from_secs(20),
        "/metrics to report the lag unhealthy",
        || scrape(lab).contains("redirect_replication_healthy 0"),
    );
    let pid = lab.redirect_pid().expect("the controller");
    lab.signal(pid, libc::SIGTERM);
    cutover_lab::start(lab, &[]);
    assert!(
        lab.last_redirect_log().contains("starting anyway"),
        "{}",
        lab.last_redirect_log()
    );
    assert_source_serves(&c);
}

#[test]
fn barrier_timeout_rolls_back_to_a_writable_source() {
    let c = setup("bar", &[]);
    // Forced past the lag gate while the subscription is off: the marker never arrives.
    psql(
        &c.lab,
        Ns::Target,
        &c.target,
        "ALTER SUBSCRIPTION redirect_sub DISABLE",
    );
    let load = workload(&c.lab, 20..22, 4);
    std::thread::sleep(Duration::from_millis(500));
    let out = flip(&c.lab, &["--to", "target", "--force", "--timeout", "1s"]);
    let v = load.join().expect("workload");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("did not apply the marker") && err.contains("rolled back"),
        "{err}"
    );
    assert_eq!(
        v.refused(),
        0,
        "connections held during the attempt were released, not refused: {:?}",
        v.errors()
    );
    let on_source = rows(&c.lab, Ns::Source, &c.source);
    assert!(v.acked().all(|a| on_source.contains(&a)));
    let history = c.lab.redirect_ok(&["history"]);
    assert!(history.contains("aborted"), "{history}");
    assert_source_serves(&c);
}

#[test]
fn a_controller_killed_mid_cutover_rolls_back_on_restart() {
    let c = setup("kill", &[]);
    psql(
        &c.lab,
        Ns::Target,
        &c.target,
        "ALTER SUBSCRIPTION redirect_sub DISABLE",
    );
    // A cutover that will wait for a barrier that never comes.
    let flipper = flip_in_background(&c.lab, &["--to", "target", "--force", "--timeout", "30s"]);
    wait_for(
        Duration::from_secs(20),
        "the cutover to reach the barrier",
        || c.lab.redirect_ok(&["history"]).contains("fence"),
    );
    let pid = c.lab.redirect_pid().expect("the controller's pid");
    // SAFETY: killing the controller this lab started.
    unsafe { libc::kill(i32::try_from(pid).unwrap(), libc::SIGKILL) };
    let _ = flipper.join();
    // The dead controller's hold and fence were the kernel's to lift: they lapse with the
    // lease (1.5 s), so a new connection reaches the source before anything is restarted.
    std::thread::sleep(redirect::host::lease::LEASE + Duration::from_millis(500));
    assert_eq!(
        redirect_tests::fleet_lab::new_connection_lands_on(&c.lab),
        "source",
        "a new connection after the controller died"
    );
    let mut flags = pg::controller_flags();
    flags.extend(["--gc-interval".to_owned(), "1s".to_owned()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    // Arc: the lab is shared with nobody now.
    let mut c = c;
    let lab = Arc::get_mut(&mut c.lab).expect("no other owner");
    lab.reap_exited();
    psql(
        lab,
        Ns::Target,
        &c.target,
        "ALTER SUBSCRIPTION redirect_sub ENABLE",
    );
    lab.start_redirect(&flags);
    // The restart ended the interrupted cutover in the journal, undone: no flip was written.
    let steps = lab.last_cutover_steps();
    assert_eq!(steps.last(), Some(&Step::Recovered), "{steps:?}");
    assert!(!steps.contains(&Step::Flip), "{steps:?}");
    assert_source_serves(&c);
}

#[test]
fn physical_replication_cutover_promotes_the_target_and_loses_nothing() {
    require_root();
    let mut lab = Lab::new("phys");
    let source = pg::start(&mut lab, Ns::Source, "source", &[]);
    psql(&lab, Ns::Source, &source, pg::SCHEMA);
    let target = pg::start_standby(&mut lab, Ns::Target, "target", redirect_tests::SOURCE_ADDR);
    assert_eq!(
        psql(&lab, Ns::Target, &target, "SELECT pg_is_in_recovery()"),
        "t"
    );
    let mut flags = pg::controller_flags();
    flags.truncate(4); // no --subscription
    flags.extend(["--replication".to_owned(), "physical".to_owned()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    lab.start_redirect(&flags);
    let lab = Arc::new(lab);
    let lag: serde_json::Value =
        serde_json::from_str(&lab.redirect_ok(&["lag", "--json"])).unwrap();
    assert_eq!(
        (lag["replication"].as_str(), lag["healthy"].as_bool()),
        (Some("physical"), Some(true)),
        "{lag}"
    );
    let load = workload(&lab, 0..4, 6);
    std::thread::sleep(Duration::from_secs(2));
    let out = flip(&lab, &["--to", "target", "--drain-timeout", "2s"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    assert_eq!(lab.status()["active"], "target");
    // Rolling back is not lossless with physical replication: refused without --force.
    let out = flip(&lab, &["--to", "source"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rollback cannot be lossless"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_controller_talks_tls_with_verify_full_and_refuses_a_wrong_ca() {
    require_root();
    let mut lab = Lab::new("tls");
    // A certificate for the name the proxy uses for the target (resolved through
    // /etc/netns/<proxy ns>/hosts, which `ip netns exec` mounts over /etc/hosts).
    let dir = lab.work_dir.clone();
    for (name, cn) in [("server", "target.lab"), ("other", "target.lab")] {
        redirect_tests::sh(
            std::process::Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                ])
                .arg("-keyout")
                .arg(dir.join(format!("{name}.key")))
                .arg("-out")
                .arg(dir.join(format!("{name}.crt")))
                .args([
                    "-subj",
                    &format!("/CN={cn}"),
                    "-addext",
                    &format!("subjectAltName=DNS:{cn}"),
                ]),
        );
    }
    redirect_tests::sh(
        std::process::Command::new("chown")
            .arg("postgres")
            .arg(dir.join("server.key"))
            .arg(dir.join("server.crt")),
    );
    redirect_tests::sh(
        std::process::Command::new("chmod")
            .arg("600")
            .arg(dir.join("server.key")),
    );
    let ssl = [
        "log_connections = on".to_owned(),
        "ssl = on".to_owned(),
        format!("ssl_cert_file = '{}'", dir.join("server.crt").display()),
        format!("ssl_key_file = '{}'", dir.join("server.key").display()),
    ];
    let ssl: Vec<&str> = ssl.iter().map(String::as_str).collect();
    let source = pg::start(&mut lab, Ns::Source, "source", &[]);
    let target = pg::start(&mut lab, Ns::Target, "target", &ssl);
    pg::setup_logical(&lab, &source, &target);
    lab.set_hosts(
        Ns::Proxy,
        &format!("{} target.lab\n", redirect_tests::TARGET_ADDR),
    );
    let dsn = |ca: &str| {
        format!(
            "host=target.lab port=5432 user=postgres dbname=postgres sslmode=verify-full sslrootcert={}",
            dir.join(ca).display()
        )
    };

    // A certificate signed by someone else: refused, with a clear error, before anything.
    let mut bad = lab.run_args();
    bad.extend([
        "--source-dsn".into(),
        pg::dsn(redirect_tests::SOURCE_ADDR),
        "--target-dsn".into(),
        dsn("other.crt"),
        "--once".into(),
    ]);
    let bad: Vec<&str> = bad.iter().map(String::as_str).collect();
    let out = lab.redirect(&bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("connecting to the target") && err.to_lowercase().contains("certificate"),
        "{err}"
    );
    assert!(!lab.pin_dir.join("CT").exists(), "nothing was loaded");

    let flags = [
        "--source-dsn".to_owned(),
        pg::dsn(redirect_tests::SOURCE_ADDR),
        "--target-dsn".to_owned(),
        dsn("server.crt"),
        "--subscription".to_owned(),
        "redirect_sub".to_owned(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    lab.start_redirect(&flags);
    let lag: serde_json::Value =
        serde_json::from_str(&lab.redirect_ok(&["lag", "--json"])).unwrap();
    assert_eq!(lag["healthy"], true, "{lag}");
    let log = std::fs::read_to_string(lab.work_dir.join("pg-target.log")).unwrap_or_default();
    let sessions: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection authorized") && l.contains("application_name=redirect"))
        .collect();
    assert!(
        !sessions.is_empty(),
        "the controller connected to the target:\n{log}"
    );
    assert!(
        sessions.iter().all(|l| l.contains("SSL enabled")),
        "every controller session to the target uses TLS: {sessions:?}"
    );
    let _ = &target;
    assert!(
        lab.status()["lag"]["bytes"].is_u64(),
        "status --json carries the lag"
    );
}
