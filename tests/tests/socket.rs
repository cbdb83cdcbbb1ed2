//! Socket mode (zero-hop, `redirect run --mode socket`): the hooks inside `connect()` on an
//! application host. Real clients (psql, Python's socket module and psycopg2, tokio-postgres)
//! in the client namespace, in the cgroup the lab hooks; PostgreSQL servers in their own
//! namespaces. See `Lab::new_app_host`.

#![allow(
    clippy::too_many_lines,
    reason = "a lab scenario reads top to bottom as one story"
)]

use std::time::Duration;

use redirect_tests::{
    APP_VIP, CLIENT_ADDR, Lab, Ns, PG_PORT, SOURCE_ADDR, TARGET_ADDR,
    pg::{self, Pg},
    require_root,
};

fn servers(lab: &mut Lab) -> (Pg, Pg) {
    let source = pg::start(lab, Ns::Source, "source", &[]);
    let target = pg::start(lab, Ns::Target, "target", &[]);
    (source, target)
}

/// `psql` through the VIP from the client namespace (inside the hooked cgroup): who the
/// server is, and whom it sees.
fn who(lab: &Lab, sql: &str) -> String {
    let dsn = pg::dsn(APP_VIP);
    let out = lab.exec_ok(
        Ns::Client,
        &["psql", "-X", "-At", "-F", " ", &dsn, "-c", sql],
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

const WHO: &str =
    "SELECT current_setting('cluster_name'), host(inet_client_addr()), host(inet_server_addr())";

/// A Python program in the client namespace; returns its stdout. Debian's interpreter, whose
/// psycopg2 `cargo xtask setup` installs (a PATH may put another Python first).
fn python(lab: &Lab, program: &str) -> String {
    let out = lab.exec_ok(Ns::Client, &["/usr/bin/python3", "-c", program]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn connect_goes_straight_to_the_active_backend_and_the_client_sees_the_vip() {
    require_root();
    let mut lab = Lab::new_app_host("sock");
    let (_source, _target) = servers(&mut lab);
    lab.start_redirect(&[]);

    // The server is the source, and it sees the client's own address: no SNAT, no proxy.
    assert_eq!(
        who(&lab, WHO),
        format!("source {CLIENT_ADDR} {SOURCE_ADDR}"),
        "psql through the VIP"
    );
    assert!(lab.stat("connect_redirected") >= 1);

    // getpeername() shows the VIP, on an IPv4 socket and on a dual-stack one connected to
    // the IPv4-mapped VIP (how Java and many Python clients connect).
    let peers = python(
        &lab,
        &format!(
            "import socket\n\
             s = socket.create_connection(('{APP_VIP}', {PG_PORT}))\n\
             print(s.getpeername()[0], s.getpeername()[1])\n\
             s6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\n\
             s6.connect(('::ffff:{APP_VIP}', {PG_PORT}))\n\
             print(s6.getpeername()[0], s6.getpeername()[1])\n"
        ),
    );
    assert_eq!(
        peers,
        format!("{APP_VIP} {PG_PORT}\n::ffff:{APP_VIP} {PG_PORT}"),
        "getpeername() of redirected sockets"
    );
    assert!(lab.stat("peer_shown_vip") >= 2);

    // psycopg2 (libpq underneath): connects, and reconnects after its session is ended, the
    // way a pool's health check does.
    let reconnected = python(
        &lab,
        &format!(
            "import psycopg2\n\
             dsn = 'host={APP_VIP} port={PG_PORT} user=postgres dbname=postgres'\n\
             c = psycopg2.connect(dsn)\n\
             cur = c.cursor()\n\
             cur.execute(\"SELECT current_setting('cluster_name'), pg_backend_pid()\")\n\
             name, pid = cur.fetchone()\n\
             other = psycopg2.connect(dsn)\n\
             other.autocommit = True\n\
             other.cursor().execute('SELECT pg_terminate_backend(%s)', (pid,))\n\
             try:\n\
             \x20   cur.execute('SELECT 1')\n\
             except psycopg2.OperationalError:\n\
             \x20   pass\n\
             c = psycopg2.connect(dsn)\n\
             cur = c.cursor()\n\
             cur.execute(\"SELECT current_setting('cluster_name'), host(inet_client_addr())\")\n\
             print(name, *cur.fetchone())\n"
        ),
    );
    assert_eq!(reconnected, format!("source source {CLIENT_ADDR}"));

    // bpftool reads the socket table by name, with typed fields: one entry per open
    // redirected socket, gone with the socket.
    let dsn = pg::dsn(APP_VIP);
    let sleeper = lab.spawn(
        Ns::Client,
        &["psql", "-X", &dsn, "-c", "SELECT pg_sleep(30)"],
        "sleeper.log",
    );
    let sockets = |lab: &Lab| {
        let dump = lab.exec_ok(
            Ns::Client,
            &[
                "bpftool",
                "-j",
                "map",
                "dump",
                "pinned",
                &lab.pin_dir.join("SOCKETS").display().to_string(),
            ],
        );
        let dump: serde_json::Value =
            serde_json::from_slice(&dump.stdout).expect("bpftool -j prints JSON");
        dump.as_array().cloned().unwrap_or_default()
    };
    redirect_tests::wait_for(Duration::from_secs(10), "the sleeper's socket", || {
        sockets(&lab).len() == 1
    });
    let entry = &sockets(&lab)[0];
    assert_eq!(
        entry["formatted"]["value"]["backend_id"], 0,
        "the socket went to the source: {entry}"
    );
    // status: the mode, the hooks, and the hooked connection per backend; /metrics counts
    // the hooks' decisions.
    let status = lab.status();
    assert_eq!(status["mode"], "socket");
    assert_eq!(status["backends"]["source"]["connections"], 1, "{status}");
    assert_eq!(status["backends"]["target"]["connections"], 0, "{status}");
    let hooks = status["socket"]["hooks"].to_string();
    for hook in [
        "sockhook_connect4",
        "sockhook_getpeername6",
        "sockhook_sock_release",
    ] {
        assert!(hooks.contains(hook), "status lists {hook}: {hooks}");
    }
    // Between cutovers nothing runs on the uplink: a connection costs what a direct one does.
    assert!(
        !hooks.contains("sockhook_egress") && !hooks.contains("sockhook_ingress"),
        "the uplink's hooks are armed at rest: {hooks}"
    );
    let tc = lab.exec_ok(Ns::Client, &["bpftool", "net", "show", "dev", "eth0"]);
    assert!(
        !String::from_utf8_lossy(&tc.stdout).contains("socket_"),
        "a program runs on eth0 at rest: {}",
        String::from_utf8_lossy(&tc.stdout)
    );
    let text = lab.redirect_ok(&["status"]);
    assert!(text.contains("mode:       socket"), "{text}");
    assert!(text.contains("1 hooked connection(s)"), "{text}");
    let metrics = lab.metrics();
    assert!(
        metrics.contains("connect_redirected"),
        "/metrics counts the hooks' decisions:\n{metrics}"
    );
    lab.signal(sleeper, libc::SIGTERM);
    redirect_tests::wait_for(
        Duration::from_secs(10),
        "the entry to go with the socket",
        || sockets(&lab).is_empty(),
    );
}

#[test]
fn a_process_outside_the_cgroup_is_not_redirected_and_an_immediate_flip_moves_new_connections() {
    require_root();
    let mut lab = Lab::new_app_host("sout");
    let (_source, _target) = servers(&mut lab);
    lab.start_redirect(&[]);

    // Outside the hooked cgroup, the VIP is just an address with no route behind it.
    let dsn = format!("{} connect_timeout=3", pg::dsn(APP_VIP));
    let out = lab
        .outside_cgroup_cmd(&["psql", "-X", "-At", &dsn, "-c", "SELECT 1"])
        .output()
        .expect("spawning psql");
    assert!(
        !out.status.success(),
        "a process outside the cgroup reached a server through the VIP: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // ... and the same process, inside, is redirected.
    assert!(who(&lab, WHO).starts_with("source "));
    // A process in the hooked cgroup but another network namespace (a container's, a pod's)
    // is not redirected either: its packets would reach the uplink without their socket, so
    // neither the hold nor the fence could see it. (From the proxy namespace the source is
    // reachable: a redirected connect would succeed.)
    let out = lab
        .cmd(Ns::Proxy, &["psql", "-X", "-At", &dsn, "-c", "SELECT 1"])
        .output()
        .expect("spawning psql");
    assert!(
        !out.status.success(),
        "a socket of another network namespace was redirected: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A connection opened before the flip stays where it started; new ones go to the target.
    let pinned = lab.spawn_in_ns(Ns::Client, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let before = pg::connect(APP_VIP).await;
            let first = pg::cluster_name(&before).await;
            // Long enough for the flip below.
            tokio::time::sleep(Duration::from_secs(3)).await;
            (first, pg::cluster_name(&before).await)
        })
    });
    std::thread::sleep(Duration::from_millis(800));
    lab.redirect_ok(&["flip", "--immediate", "--to", "target"]);
    assert_eq!(
        who(&lab, WHO),
        format!("target {CLIENT_ADDR} {TARGET_ADDR}"),
        "a new connection after the flip"
    );
    let (first, later) = pinned.join().expect("the pinned client");
    assert_eq!(
        (first.as_str(), later.as_str()),
        ("source", "source"),
        "a connection opened before the flip stays on its server"
    );
}

fn rows(lab: &Lab, ns: Ns, pg: &Pg) -> std::collections::HashSet<(i32, i64)> {
    pg::acked_rows(lab, ns, pg, "")
}

/// A stream of new connections through the VIP during the cutover, each asking which server
/// it reached: some arrive during the hold, are held, and must reach the target.
fn connect_churn(lab: &Lab, secs: u64) -> std::thread::JoinHandle<Vec<(String, Duration)>> {
    lab.spawn_in_ns(Ns::Client, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mut seen = Vec::new();
            let end = std::time::Instant::now() + Duration::from_secs(secs);
            // Bounded: one connection every 5 ms for `secs`.
            while std::time::Instant::now() < end && seen.len() < 5_000 {
                let t = std::time::Instant::now();
                let dsn = pg::dsn(APP_VIP);
                let name = match tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await {
                    Ok((client, conn)) => {
                        tokio::spawn(conn);
                        pg::cluster_name(&client).await
                    }
                    Err(e) => format!("error: {e}"),
                };
                seen.push((name, t.elapsed()));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seen
        })
    })
}

#[test]
fn a_zero_hop_cutover_under_writes_loses_nothing_holds_new_connections_and_rolls_back() {
    let c = redirect_tests::cutover_lab::setup_app_host("scut", &[]);
    let lab = &c.lab;
    let load = redirect_tests::cutover_lab::workload(lab, 0..6, 10);
    let churn = connect_churn(lab, 8);
    // A session of this host that bypasses the hook (its DSN names the source itself): the
    // fence ends it too, and preflight says so.
    let mut bypass = lab
        .cmd(
            Ns::Client,
            &[
                "psql",
                "-X",
                &pg::dsn(SOURCE_ADDR),
                "-c",
                "SELECT pg_sleep(60)",
            ],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning psql");
    std::thread::sleep(Duration::from_secs(3));
    let bypass_port = pg::psql(
        lab,
        Ns::Source,
        &c.source,
        "SELECT client_port FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'",
    );
    let out = redirect_tests::cutover_lab::flip(
        lab,
        &["--to", "target", "--drain-timeout", "2s", "--json"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cutover failed: {stderr}");
    let report: redirect::cutover::FlipReport =
        serde_json::from_slice(&out.stdout).expect("flip --json");
    let v = load.join().expect("workload");
    let seen = churn.join().expect("the connecting client");
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.contains("did not come through the hook")
                && f.contains(&format!("{CLIENT_ADDR}:{bypass_port}"))),
        "preflight names the bypassing session ({CLIENT_ADDR}:{bypass_port}): {:?}",
        report.findings
    );
    assert!(
        redirect_tests::wait_until(Duration::from_secs(5), || bypass
            .try_wait()
            .is_ok_and(|s| s.is_some())),
        "the fence did not end the session that bypassed the hook"
    );
    let _ = bypass.kill();
    let mut said = String::new();
    let _ = std::io::Read::read_to_string(&mut bypass.stderr.take().unwrap(), &mut said);
    assert!(said.contains("terminating connection"), "psql said: {said}");
    assert_eq!(lab.status()["active"], "target");

    // Every acknowledged write is on the target, whichever server took it; nothing refused.
    let on_target = rows(lab, Ns::Target, &c.target);
    redirect_tests::cutover_lab::assert_no_loss_through_a_cutover(&v, &on_target, "target");
    // Every new connection reached a server, and once one reached the target, none reached
    // the source again.
    let errors: Vec<&(String, Duration)> = seen
        .iter()
        .filter(|(n, _)| n.starts_with("error"))
        .collect();
    assert!(errors.is_empty(), "connections failed: {errors:?}");
    let first_target = seen
        .iter()
        .position(|(n, _)| n == "target")
        .expect("new connections reached the target");
    assert!(
        seen[first_target..].iter().all(|(n, _)| n == "target"),
        "a new connection reached the source after one had reached the target"
    );
    // Connections opened during the hold were held, not refused, and released to the
    // target: untouched, since their connect() had already chosen it. No packet of any
    // connection was translated.
    let held = lab.stat("connect_held");
    let direct = lab.stat("held_released_direct");
    let forwarded = lab.stat("held_flow_forward");
    let replies = lab.stat("held_flow_reply");
    eprintln!(
        "zero-hop cutover: write pause {:.1} ms, hold {:.1} ms, held connects {held}, held SYNs {}, released untouched {direct}, translated packets out {forwarded} / in {replies}, slowest connect {:?}, longest client pause {:?}, acked {}",
        report.write_pause_ms,
        report.hold_ms,
        report.held_syns,
        seen.iter().map(|(_, d)| *d).max().unwrap_or_default(),
        v.longest_pause(),
        v.acked().count()
    );
    assert!(
        held > 0,
        "no connection arrived during the hold: the test proves nothing"
    );
    assert!(
        direct >= held,
        "every held connection went straight to the target"
    );
    assert_eq!(
        (forwarded, replies, lab.stat("held_redirected")),
        (0, 0, 0),
        "a successful cutover translates no packet"
    );
    assert!(
        v.max_connect() < Duration::from_millis(900),
        "no connection waited for a SYN retransmit: {:?}",
        v.max_connect()
    );
    assert!(
        report.terminated_at_fence > 0,
        "the fence ended the writers' sessions"
    );

    // Rollback over the reverse replication: writes taken by the target come back.
    let load = redirect_tests::cutover_lab::workload(lab, 10..14, 7);
    std::thread::sleep(Duration::from_secs(2));
    let out = redirect_tests::cutover_lab::flip(lab, &["--to", "source", "--drain-timeout", "2s"]);
    assert!(
        out.status.success(),
        "rollback failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v2 = load.join().expect("workload");
    assert_eq!(lab.status()["active"], "source");
    let on_source = rows(lab, Ns::Source, &c.source);
    redirect_tests::cutover_lab::assert_no_loss_through_a_cutover(&v2, &on_source, "source");
    redirect_tests::cutover_lab::assert_no_loss_through_a_cutover(
        &v,
        &on_source,
        "source (first workload)",
    );
    // The cutovers armed the uplink's hooks; once idle, with nothing parked or translated,
    // the controller disarms them again.
    assert!(
        redirect_tests::wait_until(Duration::from_secs(10), || {
            lab.last_redirect_log()
                .contains("disarmed the uplink's hooks")
        }),
        "the uplink's hooks stayed armed after the cutovers"
    );
    let hooks = lab.status()["socket"]["hooks"].to_string();
    assert!(!hooks.contains("sockhook_egress"), "{hooks}");
}

#[test]
fn a_connection_held_when_the_controller_dies_reaches_the_source_never_the_target() {
    let c = redirect_tests::cutover_lab::setup_app_host("skil", &[]);
    pg::psql(
        &c.lab,
        Ns::Target,
        &c.target,
        "ALTER SUBSCRIPTION redirect_sub DISABLE",
    );
    // A cutover that will wait for a barrier that never comes.
    let flipper = redirect_tests::cutover_lab::flip_in_background(
        &c.lab,
        &["--to", "target", "--force", "--timeout", "30s"],
    );
    redirect_tests::wait_for(
        Duration::from_secs(20),
        "the cutover to reach the barrier",
        || {
            c.lab
                .last_cutover_steps()
                .contains(&redirect::journal::Step::Fence)
        },
    );
    // A client connects during the hold: its connect() presumes the target, and its SYN is
    // parked. It then runs queries on the connection for a while.
    let held = c.lab.spawn_in_ns(Ns::Client, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let client = pg::connect(APP_VIP).await;
            let mut names = Vec::new();
            for _ in 0..20 {
                names.push(pg::cluster_name(&client).await);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            names
        })
    });
    redirect_tests::wait_for(Duration::from_secs(5), "the client to be held", || {
        c.lab.stat("connect_held") >= 1
    });
    let pid = c.lab.redirect_pid().expect("the controller's pid");
    // SAFETY: killing the controller this lab started.
    unsafe { libc::kill(i32::try_from(pid).unwrap(), libc::SIGKILL) };
    let _ = flipper.join();
    // The hold lapses with the dead controller's lease. The flip never happened, so the held
    // connection must not reach the target it presumed: it is sent to the source and
    // translated for its life, every query of it answered there.
    let names = held.join().expect("the held client");
    assert!(
        names.iter().all(|n| n == "source"),
        "the held connection was answered by {names:?}"
    );
    assert!(c.lab.stat("held_redirected") >= 1);
    assert!(c.lab.stat("held_flow_forward") >= 20 && c.lab.stat("held_flow_reply") >= 20);
    // A new connection goes to the source directly.
    assert_eq!(
        who(&c.lab, WHO),
        format!("source {CLIENT_ADDR} {SOURCE_ADDR}")
    );
    // The restart ends the interrupted cutover in the journal, undone: no flip was written.
    let mut c = c;
    let lab = std::sync::Arc::get_mut(&mut c.lab).expect("no other owner");
    lab.reap_exited();
    pg::psql(
        lab,
        Ns::Target,
        &c.target,
        "ALTER SUBSCRIPTION redirect_sub ENABLE",
    );
    redirect_tests::cutover_lab::start(lab, &[]);
    let steps = lab.last_cutover_steps();
    assert_eq!(
        steps.last(),
        Some(&redirect::journal::Step::Recovered),
        "{steps:?}"
    );
    assert!(!steps.contains(&redirect::journal::Step::Flip), "{steps:?}");
    assert_eq!(lab.status()["active"], "source");
}

/// `redirect run` with `args` in place of the lab's, expecting a refusal that says `says`
/// and leaves nothing attached or pinned.
fn refused(lab: &Lab, args: &[String], says: &str) {
    let command: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lab.redirect(&command);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "redirect {command:?} was not refused"
    );
    assert!(stderr.contains(says), "redirect {command:?} said: {stderr}");
    let pins: Vec<_> = std::fs::read_dir(&lab.pin_dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(pins.is_empty(), "{command:?} left pins behind: {pins:?}");
    let app = lab.app.as_ref().expect("an app-host lab");
    let attached = lab.exec_ok(
        Ns::Client,
        &["bpftool", "cgroup", "show", &app.path.display().to_string()],
    );
    assert!(
        String::from_utf8_lossy(&attached.stdout).trim().is_empty(),
        "{command:?} left programs on the cgroup: {}",
        String::from_utf8_lossy(&attached.stdout)
    );
}

/// The lab's `run` arguments with `flag`'s value replaced (or the flag added).
fn with(lab: &Lab, flag: &str, value: &str) -> Vec<String> {
    let mut args = lab.run_args();
    match args.iter().position(|a| a == flag) {
        Some(i) => value.clone_into(&mut args[i + 1]),
        None => args.extend([flag.to_owned(), value.to_owned()]),
    }
    args.push("--once".into());
    args
}

#[test]
fn bad_input_is_refused_clearly_with_nothing_attached() {
    require_root();
    let lab = Lab::new_app_host("sbad");
    // A VIP of the wrong family.
    refused(
        &lab,
        &with(&lab, "--vip", "[2001:db8::1]:5432"),
        "an IPv6 VIP is not supported yet",
    );
    // A VIP this host owns: a held connection would never leave by the uplink.
    refused(
        &lab,
        &with(&lab, "--vip", &format!("{CLIENT_ADDR}:5432")),
        "is an address of this host",
    );
    // A cgroup that does not exist.
    refused(
        &lab,
        &with(&lab, "--cgroup", "/run/redirect-no-such-cgroup"),
        "does not exist",
    );
    // A directory that is no cgroup at all.
    refused(
        &lab,
        &with(&lab, "--cgroup", "/run"),
        "is not a cgroup v2 directory",
    );
    // A cgroup v1 hierarchy (a named one without controllers, mounted for this test).
    let v1 = lab.work_dir.join("cgroup-v1");
    std::fs::create_dir_all(&v1).unwrap();
    redirect_tests::sh(std::process::Command::new("mount").args([
        "-t",
        "cgroup",
        "-o",
        "none,name=redirectlab",
        "cgroup",
        &v1.display().to_string(),
    ]));
    let v1_refused = std::panic::catch_unwind(|| {
        refused(
            &lab,
            &with(&lab, "--cgroup", &v1.display().to_string()),
            "is a cgroup v1 hierarchy",
        );
    });
    let _ = std::process::Command::new("umount").arg(&v1).output();
    if let Err(e) = v1_refused {
        std::panic::resume_unwind(e);
    }
    // The controller's DSN naming the VIP: its own sessions would be redirected.
    let mut vip_dsn = lab.run_args();
    vip_dsn.extend([
        "--source-dsn".into(),
        pg::dsn(APP_VIP),
        "--target-dsn".into(),
        pg::dsn(TARGET_ADDR),
        "--once".into(),
    ]);
    refused(&lab, &vip_dsn, "--source-dsn names the VIP");
    // An uplink that traffic to the servers does not leave by: held connections would reach
    // the backend they presumed before the flip.
    lab.exec_ok(
        Ns::Client,
        &[
            "ip", "link", "add", "side0", "type", "veth", "peer", "name", "side1",
        ],
    );
    refused(
        &lab,
        &with(&lab, "--iface", "side0"),
        "not by an --iface (side0)",
    );
    // An uplink that is no Ethernet device: the hooks could not parse its packets.
    refused(
        &lab,
        &with(&lab, "--iface", "lo"),
        "does not carry Ethernet frames",
    );
    // --cgroup means nothing to proxy mode.
    let mut proxy = lab.run_args();
    let i = proxy.iter().position(|a| a == "socket").unwrap();
    proxy[i] = "proxy".into();
    refused(&lab, &proxy, "--cgroup is for --mode socket");
    // A socket-mode fleet member (not yet supported) is refused before anything changes.
    let mut member = with(&lab, "--fleet", "pg");
    member.extend(["--etcd".into(), "http://198.18.0.9:2379".into()]);
    refused(
        &lab,
        &member,
        "--mode socket does not run as a fleet member yet",
    );
}
