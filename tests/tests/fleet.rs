//! Fleets (issue 10, docs/fleet.md) with a real 3-node etcd cluster and the real datapath:
//! membership under leases, the joining-host invariant, and quorum loss outside a cutover.
//! Root only; run under `flock /tmp/redirect-lab.lock`.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use redirect::journal::Step;
use redirect_tests::{
    Lab, Ns, VIP, assert_steps_in_order, cutover_lab,
    fleet::Etcd,
    fleet_faults,
    fleet_lab::{FLEET, FleetLab, members, new_connection_lands_on},
    pg::{self, Pg},
    wait_for,
    workload::Verdict,
};

/// The leader journaled that every one of `members` took the hold and applied the commit
/// (the hold's and the release's entries name who acknowledged).
fn assert_every_member_held_and_applied(leader: &Lab, members: &str) {
    let entries = leader.last_cutover();
    let detail = |step: Step| {
        entries.iter().find(|e| e.step == step).map_or_else(
            || panic!("no {step} entry in {entries:#?}"),
            |e| e.detail.clone(),
        )
    };
    let hold = detail(Step::Hold);
    assert!(
        hold.contains(&format!("every member ({members}) parks new SYNs")),
        "{hold}"
    );
    let release = detail(Step::Release);
    assert!(
        release.contains(&format!("applied by every member ({members})")),
        "{release}"
    );
}

/// What the leader's journal of a fleet cutover that went through holds, in order (each
/// member drains its own connections, so the leader journals no drain).
const CUTOVER_STEPS: &[Step] = &[
    Step::Start,
    Step::Preflight,
    Step::Hold,
    Step::Fence,
    Step::Barrier,
    Step::Flip,
    Step::Release,
    Step::Done,
];

fn fleet_flags(etcd: &Etcd, member: &str) -> Vec<String> {
    [
        "--etcd",
        &etcd.endpoints(),
        "--fleet",
        FLEET,
        "--fleet-member",
        member,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

fn start_member(lab: &mut Lab, etcd: &Etcd, member: &str) -> u32 {
    let flags = fleet_flags(etcd, member);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    lab.start_redirect(&flags)
}

/// A lab with both servers up (no replication: these tests only ask which server answers).
fn lab_with_servers(name: &str) -> (Lab, Pg, Pg) {
    let mut lab = Lab::new(name);
    let source = pg::start(&mut lab, Ns::Source, "source", &[]);
    let target = pg::start(&mut lab, Ns::Target, "target", &[]);
    (lab, source, target)
}

#[test]
fn members_register_under_leases_and_a_killed_member_leaves_the_live_list_not_the_roster() {
    let mut etcd = Etcd::new("mem");
    let mut labs: Vec<Lab> = ["fla", "flb", "flc"].iter().map(|n| Lab::new(n)).collect();
    let ids = ["proxy-a", "proxy-b", "proxy-c"];
    let mut pids = Vec::new();
    for (lab, id) in labs.iter_mut().zip(ids) {
        etcd.join(lab);
        pids.push(start_member(lab, &etcd, id));
    }
    wait_for(Duration::from_secs(10), "three members", || {
        members(&labs[0]).len() == 3
    });
    assert_eq!(members(&labs[1]), ids, "every member sees the same fleet");

    // The first member founded the fleet at epoch 0 with its (fresh) datapath's source.
    let status = labs[0].status();
    assert_eq!(status["fleet"]["committed"]["epoch"], 0, "{status:#}");
    assert_eq!(status["fleet"]["committed"]["active"], "source");
    assert_eq!(status["fleet"]["in_sync"], true);
    let text = labs[0].redirect_ok(&["status"]);
    assert!(
        text.contains("fleet:") && text.contains("member proxy-c"),
        "status shows the fleet:\n{text}"
    );

    // SIGKILL: no clean leave, so the member stays until its lease expires, then goes.
    let killed_at = Instant::now();
    labs[2].signal(pids[2], libc::SIGKILL);
    assert!(
        members(&labs[0]).contains(&"proxy-c".to_owned()),
        "a killed member stays until its lease expires"
    );
    wait_for(
        redirect::fleet::member::LEASE_TTL + Duration::from_secs(5),
        "the killed member to leave when its lease expires",
        || members(&labs[0]) == ["proxy-a", "proxy-b"],
    );
    assert!(
        killed_at.elapsed() >= redirect::fleet::member::LEASE_TTL / 2,
        "it left by its lease, not at once"
    );

    // A clean stop (SIGTERM) leaves at once: the lease is revoked.
    labs[1].signal(pids[1], libc::SIGTERM);
    wait_for(
        Duration::from_secs(3),
        "a stopped member to leave at once",
        || members(&labs[0]) == ["proxy-a"],
    );
    // Both stay on the roster: their datapaths may still serve, so cutovers wait for them.
    let roster: Vec<String> = labs[0].status()["fleet"]["roster"]
        .as_array()
        .expect("the roster")
        .iter()
        .filter_map(|m| m["id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(roster, ids, "every member that joined stays enrolled");
}

#[test]
fn a_restarting_member_applies_the_committed_target_before_it_attaches() {
    let mut etcd = Etcd::new("join");
    let (mut lab, _source, _target) = lab_with_servers("fjoin");
    etcd.join(&lab);

    // A host on its own first: its pinned datapath says source.
    let alone = lab.start_redirect(&[]);
    assert_eq!(new_connection_lands_on(&lab), "source");
    lab.signal(alone, libc::SIGTERM);
    assert_eq!(lab.status()["active"], "source", "the pins say source");

    // Meanwhile the fleet committed the target (as a fleet cutover will).
    etcd.put(
        &format!("/redirect/{FLEET}/state"),
        r#"{"epoch":3,"active":"target","phase":"idle","written_by":"another-proxy"}"#,
    );
    start_member(&mut lab, &etcd, "proxy-a");
    let log = lab.last_redirect_log();
    let joined = log
        .find("joined the fleet")
        .unwrap_or_else(|| panic!("no join in the log:\n{log}"));
    let ready = log.find("datapath ready").expect("datapath ready");
    assert!(
        joined < ready,
        "the fleet state is read before the datapath is ready:\n{log}"
    );

    assert_eq!(
        new_connection_lands_on(&lab),
        "target",
        "new connections follow the committed state, not the pins"
    );
    wait_for(Duration::from_secs(10), "status to show the fleet", || {
        lab.status()["fleet"]["applied_epoch"] == 3
    });
    let status = lab.status();
    assert_eq!(status["active"], "target", "{status:#}");
    assert_eq!(status["fleet"]["in_sync"], true);

    // On a member, an immediate flip is the fleet's: committed in etcd as the next epoch.
    let out = lab.redirect_ok(&["flip", "--to", "source", "--immediate"]);
    assert!(out.contains("epoch 4 committed"), "{out}");
    let state = etcd
        .get(&format!("/redirect/{FLEET}/state"))
        .expect("the state");
    assert!(state.contains(r#""epoch":4,"active":"source""#), "{state}");
    assert_eq!(new_connection_lands_on(&lab), "source");
}

#[test]
fn losing_etcd_quorum_outside_a_cutover_changes_nothing_on_the_datapath() {
    let mut etcd = Etcd::new("quo");
    let (mut lab, _source, _target) = lab_with_servers("fquo");
    etcd.join(&lab);
    let pid = start_member(&mut lab, &etcd, "proxy-a");
    assert_eq!(new_connection_lands_on(&lab), "source");

    // A session opened before the loss, used after it.
    let (used, use_it) = std::sync::mpsc::channel::<()>();
    let (opened, wait_open) = std::sync::mpsc::channel::<()>();
    let session = lab.spawn_in_ns(Ns::Client, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async move {
                let c = pg::connect(VIP).await;
                let before = pg::cluster_name(&c).await;
                opened.send(()).unwrap();
                let _ = tokio::task::spawn_blocking(move || {
                    use_it.recv_timeout(Duration::from_secs(90))
                })
                .await;
                (before, pg::cluster_name(&c).await)
            })
    });
    wait_open.recv_timeout(Duration::from_secs(30)).unwrap();

    // Two of three nodes gone: no quorum, no reads, no keep-alives.
    let leader = etcd.leader().expect("a leader");
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    etcd.kill(leader);
    etcd.kill(others[0]);
    assert!(
        !etcd
            .etcdctl(&["get", "--consistency=l", "/x"])
            .status
            .success(),
        "the cluster has lost quorum"
    );

    // Past the lease's TTL, new connections keep landing where the committed state says.
    let until = Instant::now() + redirect::fleet::member::LEASE_TTL + Duration::from_secs(3);
    let mut opened_count = 0;
    while Instant::now() < until {
        assert_eq!(new_connection_lands_on(&lab), "source");
        opened_count += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(opened_count >= 10, "{opened_count} connections opened");
    used.send(()).unwrap();
    assert_eq!(
        session.join().unwrap(),
        ("source".to_owned(), "source".to_owned())
    );

    // The controller lives on, and status says etcd is away.
    assert!(
        lab.status()["fleet"]["etcd_error"].is_string(),
        "{:#}",
        lab.status()
    );
    let log = lab.last_redirect_log();
    assert!(
        log.contains("the datapath keeps its committed state"),
        "the lost keep-alive is logged:\n{log}"
    );

    // Quorum back: the member is listed again (re-registered if its lease expired).
    etcd.start(leader);
    etcd.wait_healthy(Duration::from_secs(30));
    wait_for(
        Duration::from_secs(20),
        "the member to be listed again",
        || members(&lab) == ["proxy-a"],
    );
    // One node of three is still down: every read must still succeed (requests that hit the
    // dead endpoint are retried on another).
    for _ in 0..6 {
        let status = lab.status();
        assert_eq!(status["fleet"]["in_sync"], true, "{}", status["fleet"]);
    }
    lab.signal(pid, libc::SIGTERM);
}

#[test]
fn run_refuses_to_start_when_etcd_is_unreachable_and_changes_nothing() {
    let lab = Lab::new("fnoe");
    // No etcd segment joined: nothing answers at this address.
    let mut args = lab.run_args();
    args.extend(
        [
            "--etcd",
            "http://198.19.0.11:2379",
            "--fleet",
            FLEET,
            "--no-sysctl",
        ]
        .iter()
        .map(|s| (*s).to_owned()),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let out = lab.redirect(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "run must fail: {stderr}");
    assert!(stderr.contains("cannot reach etcd"), "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30));
    let pinned: Vec<_> = std::fs::read_dir(&lab.pin_dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(pinned.is_empty(), "nothing was pinned: {pinned:?}");

    // Bad input is named: --etcd without --fleet, and a password on argv is not an option.
    let out = lab.redirect(&[
        "run",
        "--iface",
        "p-cli",
        "--vip",
        "198.18.1.1:5432",
        "--source",
        "198.18.2.2:5432",
        "--target",
        "198.18.3.2:5432",
        "--etcd",
        "http://198.19.0.11:2379",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--fleet"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_immediate_flip_on_one_member_moves_the_whole_fleet() {
    let mut etcd = Etcd::new("flp");
    let (mut a, _a_source, _a_target) = lab_with_servers("ffla");
    let (mut b, _b_source, _b_target) = lab_with_servers("fflb");
    etcd.join(&a);
    etcd.join(&b);
    start_member(&mut a, &etcd, "proxy-a");
    start_member(&mut b, &etcd, "proxy-b");
    wait_for(Duration::from_secs(10), "two members", || {
        members(&a).len() == 2
    });
    assert_eq!(new_connection_lands_on(&b), "source");

    // Flipped on A: committed in etcd, applied by B too (the standby the VIP may move to).
    let out = a.redirect_ok(&["flip", "--to", "target", "--immediate"]);
    assert!(out.contains("epoch 1 committed"), "{out}");
    assert!(
        out.contains("proxy-a, proxy-b"),
        "both members applied it: {out}"
    );
    assert_eq!(new_connection_lands_on(&b), "target");
    assert_eq!(new_connection_lands_on(&a), "target");
    for lab in [&a, &b] {
        let status = lab.status();
        assert_eq!(status["active"], "target", "{status:#}");
        assert_eq!(status["fleet"]["applied_epoch"], 1);
        assert_eq!(status["fleet"]["in_sync"], true);
    }
    let metrics = b.in_ns(Ns::Proxy, || {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect("127.0.0.1:9187").expect("metrics port");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    });
    assert!(
        metrics.contains(
            r#"redirect_fleet_applied_epoch{fleet="lab",member="proxy-b",active="target"} 1"#
        ),
        "{metrics}"
    );
    let again = a.redirect(&["flip", "--to", "target", "--immediate"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already"));

    // B cut off from etcd: the flip is committed, the operator is told B did not apply it,
    // and B catches up once it reaches etcd again.
    Etcd::disconnect(&b);
    let out = a.redirect(&["flip", "--to", "source", "--immediate"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a missing member fails the command");
    assert!(stderr.contains("proxy-b did not apply it"), "{stderr}");
    assert_eq!(new_connection_lands_on(&a), "source");
    Etcd::reconnect(&b);
    wait_for(
        Duration::from_secs(30),
        "B to apply epoch 2 after reconnecting",
        || b.status()["fleet"]["applied_epoch"] == 2,
    );
    assert_eq!(new_connection_lands_on(&b), "source");
    assert!(
        b.last_redirect_log()
            .contains("applied the fleet's committed epoch"),
        "{}",
        b.last_redirect_log()
    );
}

/// The safe cutover on a fleet member: the hold and the flip are committed epochs that the
/// member applies to its own datapath (here the fleet's only member, which also leads), and
/// the database side (fence of sessions, barrier, replication) runs as on one host. Under the
/// ledger workload, a cutover and a rollback lose nothing, and etcd records hold → commit.
#[test]
fn a_fleet_cutover_and_rollback_commit_epochs_and_lose_nothing() {
    use redirect_tests::cutover_lab::{self, assert_no_loss_through_a_cutover, flip, workload};
    let mut etcd = Etcd::new("fcut");
    let mut lab = Lab::new("fcut");
    let source = pg::start(&mut lab, Ns::Source, "source", &[]);
    let target = pg::start(&mut lab, Ns::Target, "target", &[]);
    pg::setup_logical(&lab, &source, &target);
    etcd.join(&lab);
    let flags = fleet_flags(&etcd, "proxy-a");
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    cutover_lab::start(&mut lab, &flags);
    let lab = std::sync::Arc::new(lab);

    let load = workload(&lab, 0..4, 6);
    std::thread::sleep(Duration::from_secs(2));
    let out = flip(&lab, &["--to", "target", "--json"]);
    let v = load.join().expect("workload");
    assert!(
        out.status.success(),
        "the fleet cutover failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        lab.last_redirect_log()
    );
    let report: redirect::cutover::FlipReport =
        serde_json::from_slice(&out.stdout).expect("flip --json is a flip report");
    let on_target = pg::acked_rows(&lab, Ns::Target, &target, "");
    assert_no_loss_through_a_cutover(&v, &on_target, "target");
    // Writes paused from the fence to the commit, and for less than the cutover's --timeout.
    assert!(
        report.write_pause_ms > 0.0 && report.write_pause_ms < 10_000.0,
        "{report:#?}"
    );
    assert_eq!(report.to, Some(redirect::datapath::Role::Target));
    // The protocol ran in order, and ended: held, fenced, past the barrier, flipped, released.
    assert_steps_in_order(&lab.last_cutover_steps(), CUTOVER_STEPS);
    assert_every_member_held_and_applied(&lab, "proxy-a");
    let state = etcd
        .get(&format!("/redirect/{FLEET}/state"))
        .expect("state");
    assert!(
        state.contains(r#""epoch":2,"active":"target","phase":"idle""#),
        "{state}"
    );
    assert_eq!(new_connection_lands_on(&lab), "target");
    let cut = lab.status();
    assert_eq!(cut["fleet"]["applied_epoch"], 2, "{cut:#}");

    let load = workload(&lab, 10..14, 6);
    std::thread::sleep(Duration::from_secs(2));
    let out = flip(&lab, &["--to", "source"]);
    let v2 = load.join().expect("workload");
    assert!(
        out.status.success(),
        "the fleet rollback failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let on_source = pg::acked_rows(&lab, Ns::Source, &source, "");
    assert_no_loss_through_a_cutover(&v2, &on_source, "source");
    assert_no_loss_through_a_cutover(&v, &on_source, "source (before the cutover)");
    assert_eq!(new_connection_lands_on(&lab), "source");
    let state = etcd
        .get(&format!("/redirect/{FLEET}/state"))
        .expect("state");
    assert!(state.contains(r#""epoch":4,"active":"source""#), "{state}");
}

/// The server a new connection through `lab`'s VIP reaches, and the client address that
/// server sees (the proxy's SNAT address on its link to it).
fn new_connection_seen_as(lab: &Lab) -> (String, String) {
    lab.in_ns(Ns::Client, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async {
                let row = pg::connect(VIP)
                    .await
                    .query_one(
                        "SELECT current_setting('cluster_name'), host(inet_client_addr())",
                        &[],
                    )
                    .await
                    .expect("who am I");
                (row.get(0), row.get(1))
            })
    })
}

#[test]
fn a_sharing_lab_fronts_the_same_servers_and_leaves_them_alone_when_dropped() {
    redirect_tests::require_root();
    let (mut servers, source, _target) = lab_with_servers("fsrv");
    let mut sharing = Lab::new_sharing_servers("fshr", &servers, 1);
    servers.start_redirect(&[]);
    sharing.start_redirect(&[]);

    // Both proxies reach the one source, each seen at its own SNAT address.
    assert_eq!(
        new_connection_seen_as(&servers),
        ("source".to_owned(), "198.18.2.1".to_owned())
    );
    assert_eq!(
        new_connection_seen_as(&sharing),
        ("source".to_owned(), "198.19.12.1".to_owned())
    );
    // Flipping one proxy alone (no fleet) moves only its own new connections.
    sharing.redirect_ok(&["flip", "--to", "target", "--immediate"]);
    assert_eq!(
        new_connection_seen_as(&sharing),
        ("target".to_owned(), "198.19.13.1".to_owned())
    );
    assert_eq!(new_connection_lands_on(&servers), "source");
    // The sharing lab's controller reaches the databases at their usual addresses too.
    let out = sharing.exec_ok(
        Ns::Proxy,
        &[
            "psql",
            "-X",
            "-At",
            "-h",
            redirect_tests::SOURCE_ADDR,
            "-U",
            "postgres",
            "-c",
            "SHOW cluster_name",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "source");

    // Dropped: its links are gone from the servers' namespaces, the servers still serve
    // through their own lab's proxy, and their processes were not touched.
    let link = sharing
        .shared_servers()
        .expect("a sharing lab")
        .server_side_link();
    drop(sharing);
    for server in [Ns::Source, Ns::Target] {
        let links = servers.exec_ok(server, &["ip", "-br", "link"]);
        let links = String::from_utf8_lossy(&links.stdout);
        assert!(
            !links.contains(&link),
            "{link} is left in {server:?}:\n{links}"
        );
    }
    assert_eq!(new_connection_lands_on(&servers), "source");
    // SAFETY: signal 0 only checks that the process exists.
    let alive = unsafe { libc::kill(i32::try_from(source.pid).unwrap(), 0) } == 0;
    assert!(alive, "the source server still runs");
}

/// Where the target's ids start in tests that write on it after an immediate flip (which
/// carries no sequences): far above the source's, so they never collide with the rows
/// replicated from it.
const TARGET_IDS_FROM: i64 = 1_000_000_000;

#[test]
fn three_proxies_in_front_of_the_same_servers_flip_together_under_writes() {
    let mut fleet = FleetLab::new("fsh", 3);
    fleet.start_members(&[]);
    for lab in &fleet.proxies {
        assert_eq!(new_connection_lands_on(lab), "source");
    }
    fleet.psql(
        Ns::Target,
        &format!("SELECT setval('acks_id_seq', {TARGET_IDS_FROM})"),
    );

    let load = fleet.workload(8);
    std::thread::sleep(Duration::from_secs(3));
    let flipped_at = Instant::now();
    let out = fleet.proxies[1].redirect_ok(&["flip", "--to", "target", "--immediate"]);
    assert!(out.contains("epoch 1 committed"), "{out}");
    assert!(
        out.contains("proxy-0, proxy-1, proxy-2"),
        "every member applied it: {out}"
    );
    for lab in &fleet.proxies {
        assert_eq!(new_connection_lands_on(lab), "target");
        assert_eq!(lab.status()["fleet"]["applied_epoch"], 1);
    }
    let verdicts: Vec<Verdict> = load
        .into_iter()
        .map(|h| h.join().expect("workload"))
        .collect();

    let on_source = fleet.rows(Ns::Source, "");
    let written_on_target = fleet.rows(Ns::Target, &format!("WHERE id > {TARGET_IDS_FROM}"));
    let anywhere: HashSet<(i32, i64)> = on_source.union(&written_on_target).copied().collect();
    for (i, v) in verdicts.iter().enumerate() {
        let proxy = FleetLab::member_id(i);
        // Acknowledged before the flip: on the source, whichever proxy carried it.
        let before: Vec<(i32, i64)> = v.acked_before(flipped_at).collect();
        assert!(
            !before.is_empty(),
            "{proxy}'s writers wrote before the flip"
        );
        let lost: Vec<_> = before.iter().filter(|a| !on_source.contains(a)).collect();
        assert!(
            lost.is_empty(),
            "{} writes acknowledged through {proxy} before the flip are missing on the source: {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        );
        // Every acknowledged write is on the server that took it; nothing was refused.
        cutover_lab::assert_no_loss(v, &anywhere, "source or the target");
        // Through every proxy, the writers reached the source, and their new connections
        // after the flip reached the target.
        let writers = FleetLab::writers(i);
        let through =
            |rows: &HashSet<(i32, i64)>| rows.iter().filter(|(w, _)| writers.contains(w)).count();
        assert!(through(&on_source) > 0, "{proxy} reached the source");
        assert!(
            through(&written_on_target) > 0,
            "{proxy}'s new connections after the flip wrote on the target"
        );
        eprintln!(
            "{proxy}: {} acked ({} before the flip), {} written on the target",
            v.acked().count(),
            before.len(),
            through(&written_on_target)
        );
    }
}

/// What a new connection through `lab`'s VIP reaches within `secs` (its `cluster_name`), or
/// `None` if it does not connect in time: bounded, for a member that must not answer.
fn within(lab: &Lab, secs: u32) -> Option<String> {
    let out = lab
        .cmd(
            Ns::Client,
            &[
                "psql",
                "-X",
                "-At",
                "-h",
                VIP,
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                "SHOW cluster_name",
            ],
        )
        .env("PGCONNECT_TIMEOUT", secs.to_string())
        .output()
        .expect("psql");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Every acknowledged write of every proxy's workload is on `ns`.
fn assert_every_proxy_lost_nothing(fl: &FleetLab, verdicts: &[Verdict], ns: Ns, what: &str) {
    let rows = fl.rows(ns, "");
    for (i, v) in verdicts.iter().enumerate() {
        cutover_lab::assert_no_loss_through_a_cutover(
            v,
            &rows,
            &format!("{what} (writes through proxy-{i})"),
        );
    }
}

/// A command that must have succeeded, or the failure with the leader's log.
fn assert_flip_succeeded(fl: &FleetLab, out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        fl.proxies[0].last_redirect_log()
    );
}

/// Proxy-0's controller, when started next, pauses `ms` before the cutover step `step`.
fn pause_leader_before(fl: &mut FleetLab, step: &str, ms: u32) {
    fl.proxies[0].redirect_env.extend([
        ("REDIRECT_FAULT_PAUSE".into(), step.into()),
        ("REDIRECT_FAULT_PAUSE_MS".into(), ms.to_string()),
    ]);
}

/// The safe cutover across three proxies in front of the same servers, asked of a member
/// that is not the servers' own: it leads, every member holds and fences, the barrier covers
/// every member's sessions, and the commit moves all of them. Then a rollback asked of a third
/// member. Under the ledger workload behind every proxy: 0 lost, 0 refused, both ways.
#[test]
fn three_members_cut_over_and_roll_back_as_one_losing_nothing() {
    let mut fl = FleetLab::new("fsafe", 3);
    fl.start_members(&[]);
    let load = fl.workload(7);
    std::thread::sleep(Duration::from_secs(2));
    let out = fl.proxies[1].redirect(&["flip", "--to", "target"]);
    let verdicts: Vec<Verdict> = load
        .into_iter()
        .map(|h| h.join().expect("workload"))
        .collect();
    assert!(
        out.status.success(),
        "the fleet cutover failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        fl.proxies[1].last_redirect_log()
    );
    assert_every_proxy_lost_nothing(&fl, &verdicts, Ns::Target, "target");
    let progress = String::from_utf8_lossy(&out.stderr);
    assert!(
        !progress.contains("bypass the proxy"),
        "the other members' sessions are proxied, not bypassing: {progress}"
    );
    assert_steps_in_order(&fl.proxies[1].last_cutover_steps(), CUTOVER_STEPS);
    assert_every_member_held_and_applied(&fl.proxies[1], "proxy-0, proxy-1, proxy-2");
    for lab in &fl.proxies {
        assert_eq!(new_connection_lands_on(lab), "target");
        assert_eq!(lab.status()["fleet"]["applied_epoch"], 2);
    }

    let load = fl.workload_round(1, 7);
    std::thread::sleep(Duration::from_secs(2));
    let out = fl.proxies[2].redirect(&["flip", "--to", "source"]);
    let back: Vec<Verdict> = load
        .into_iter()
        .map(|h| h.join().expect("workload"))
        .collect();
    assert!(
        out.status.success(),
        "the fleet rollback failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        fl.proxies[2].last_redirect_log()
    );
    assert_every_proxy_lost_nothing(&fl, &back, Ns::Source, "source");
    assert_every_proxy_lost_nothing(&fl, &verdicts, Ns::Source, "source (the first cutover's)");
    for lab in &fl.proxies {
        assert_eq!(new_connection_lands_on(lab), "source");
    }
}

/// A member cut off from etcd in the middle of a cutover (after it held and fenced) never
/// guesses: once its hold lapses it drops new connections instead of sending them to the old
/// server, which the fleet has just left; the cutover commits for the others; when the
/// partition heals the member applies the committed epoch and serves the target.
#[test]
fn a_member_partitioned_mid_cutover_holds_then_drops_and_never_guesses() {
    let mut fl = FleetLab::new("fpart", 3);
    // The leader pauses before the barrier, after every member held and fenced.
    fl.proxies[0]
        .redirect_env
        .push(("REDIRECT_FAULT_PAUSE".into(), "barrier".into()));
    fl.start_members(&[]);
    let leader = fl.proxies[0]
        .redirect_cmd()
        .args(["flip", "--to", "target"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning the flip");
    // Held and fenced everywhere: cut proxy-2 off from etcd during the pause.
    wait_for(Duration::from_secs(10), "proxy-2 to hold", || {
        fl.proxies[2]
            .last_redirect_log()
            .contains("fleet hold applied")
    });
    // After its acknowledgement reached etcd (cut off before it, the leader aborts instead).
    wait_for(Duration::from_secs(5), "proxy-2's ack of the hold", || {
        fl.etcd
            .get(&format!("/redirect/{FLEET}/acks/1/proxy-2"))
            .is_some()
    });
    Etcd::disconnect(&fl.proxies[2]);
    let out = leader.wait_with_output().expect("the leader's flip");
    assert!(
        out.status.success(),
        "the cutover should commit for the members that answer: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        fl.proxies[0].last_redirect_log()
    );
    assert!(
        fl.proxies[0]
            .last_redirect_log()
            .contains("NOT yet applied by proxy-2"),
        "{}",
        fl.proxies[0].last_redirect_log()
    );
    assert_eq!(new_connection_lands_on(&fl.proxies[1]), "target");
    // proxy-2 cannot confirm: past its lease it drops new connections, never sends them on.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        within(&fl.proxies[2], 3),
        None,
        "a partitioned member answered"
    );
    let stats = fl.proxies[2].status();
    assert!(
        stats["stats"]["syn_unconfirmed"].as_u64().unwrap_or(0) > 0,
        "{stats:#}"
    );
    Etcd::reconnect(&fl.proxies[2]);
    wait_for(
        Duration::from_secs(30),
        "proxy-2 to apply the commit",
        || within(&fl.proxies[2], 3).as_deref() == Some("target"),
    );
    assert_eq!(fl.proxies[2].status()["fleet"]["applied_epoch"], 2);
}

/// Starts `flip --to target` on proxy-0 (whose controller pauses before the barrier, after
/// every member held and fenced) and returns once proxy `watch` has applied the hold.
fn cutover_paused_after_the_hold(fl: &FleetLab, watch: usize) -> std::process::Child {
    let leader = fl.proxies[0]
        .redirect_cmd()
        .args(["flip", "--to", "target"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning the flip");
    wait_for(Duration::from_secs(10), "the member to hold", || {
        fl.proxies[watch]
            .last_redirect_log()
            .contains("fleet hold applied")
    });
    leader
}

/// Every member ends on the same committed backend, and serves it.
fn assert_one_backend_everywhere(fl: &FleetLab) -> String {
    let mut seen = Vec::new();
    for lab in &fl.proxies {
        wait_for(Duration::from_secs(30), "every member in sync", || {
            lab.status()["fleet"]["in_sync"] == true
        });
        seen.push(new_connection_lands_on(lab));
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "split: {seen:?}");
    seen[0].clone()
}

/// A member SIGKILLed mid-cutover, after it held and fenced: its kernel keeps the fence and
/// drops new connections (nothing reaches the old server); the cutover completes for the
/// others; restarted, it applies the committed epoch before it serves. No acknowledged write
/// through any proxy is lost.
#[test]
fn a_member_killed_mid_cutover_comes_back_with_the_committed_state() {
    let mut fl = FleetLab::new("fkill", 3);
    fl.proxies[0]
        .redirect_env
        .push(("REDIRECT_FAULT_PAUSE".into(), "barrier".into()));
    fl.start_members(&[]);
    let load = fl.workload(8);
    std::thread::sleep(Duration::from_secs(1));
    let leader = cutover_paused_after_the_hold(&fl, 2);
    // After its acknowledgement reached etcd (killed before it, the leader aborts the
    // cutover everywhere instead, which is as safe: see the etcd-leader test).
    wait_for(Duration::from_secs(5), "proxy-2's ack of the hold", || {
        fl.etcd
            .get(&format!("/redirect/{FLEET}/acks/1/proxy-2"))
            .is_some()
    });
    fl.stop_member(2, libc::SIGKILL);
    let out = leader.wait_with_output().expect("the flip");
    assert_flip_succeeded(&fl, &out);
    assert!(
        fl.proxies[0]
            .last_redirect_log()
            .contains("NOT yet applied by proxy-2"),
        "{}",
        fl.proxies[0].last_redirect_log()
    );
    // Dead controller, closed lapse: nothing through proxy-2 reaches the old server.
    assert_eq!(within(&fl.proxies[2], 3), None);
    let verdicts: Vec<Verdict> = load
        .into_iter()
        .map(|h| h.join().expect("workload"))
        .collect();
    let on_target = fl.rows(Ns::Target, "");
    for (i, v) in verdicts.iter().enumerate() {
        let lost: Vec<_> = v.acked().filter(|a| !on_target.contains(a)).collect();
        assert!(lost.is_empty(), "proxy-{i} lost {lost:?}");
    }
    for v in &verdicts[..2] {
        cutover_lab::assert_no_loss_through_a_cutover(v, &on_target, "target");
    }
    fl.start_member(2, &[]);
    assert_eq!(assert_one_backend_everywhere(&fl), "target");
    assert!(
        fl.proxies[2]
            .last_redirect_log()
            .contains("applying its committed backend before attaching"),
        "{}",
        fl.proxies[2].last_redirect_log()
    );
}

/// The etcd leader killed mid-cutover (after every member held): the cutover either commits
/// or aborts, never both: every member ends on one backend, and no acknowledged write is lost.
#[test]
fn the_etcd_leader_killed_mid_cutover_leaves_one_backend_everywhere() {
    let mut fl = FleetLab::new("fetl", 2);
    fl.proxies[0]
        .redirect_env
        .push(("REDIRECT_FAULT_PAUSE".into(), "barrier".into()));
    fl.start_members(&[]);
    let load = fl.workload(10);
    std::thread::sleep(Duration::from_secs(1));
    let leader = cutover_paused_after_the_hold(&fl, 1);
    let etcd_leader = fl.etcd.leader().expect("an etcd leader");
    fl.etcd.kill(etcd_leader);
    let out = leader.wait_with_output().expect("the flip");
    let verdicts: Vec<Verdict> = load
        .into_iter()
        .map(|h| h.join().expect("workload"))
        .collect();
    let active = assert_one_backend_everywhere(&fl);
    let rows = fl.rows(
        if active == "target" {
            Ns::Target
        } else {
            Ns::Source
        },
        "",
    );
    for (i, v) in verdicts.iter().enumerate() {
        let lost: Vec<_> = v.acked().filter(|a| !rows.contains(a)).collect();
        assert!(
            lost.is_empty(),
            "proxy-{i} lost {lost:?} (flip: {}; ended on the {active})",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        out.status.success(),
        active == "target",
        "the flip's verdict and the committed backend disagree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Healed (the killed node restarted on its data): with no controller restarted, the
    // next flip succeeds within twice the member lease, under writes, losing nothing.
    fl.etcd.start(etcd_leader);
    fl.etcd.wait_healthy(Duration::from_secs(30));
    let back = fleet_faults::other(&active);
    let load = fl.workload_round(1, 12);
    std::thread::sleep(Duration::from_secs(1));
    let took = fleet_faults::flip_until_it_succeeds(&fl.proxies[1], back, 2 * fleet_faults::LEASE)
        .unwrap_or_else(|e| panic!("no flip succeeded after the etcd leader came back: {e}"));
    eprintln!("a flip to the {back} succeeded {took:?} after etcd healed");
    assert_eq!(assert_one_backend_everywhere(&fl), back);
    for lab in &fl.proxies {
        assert_eq!(lab.status()["fleet"]["live"], true);
    }
    fl.assert_acked_writes_kept(
        load,
        if back == "target" {
            Ns::Target
        } else {
            Ns::Source
        },
    );
}

/// An active/standby pair as keepalived runs it: the standby member starts without the VIP
/// (run accepts that in a fleet), follows the fleet through a cutover it takes part in, and
/// once the VIP moves to it, its new connections go to the target: no split brain.
#[test]
fn after_a_cutover_the_vip_moves_to_the_standby_and_new_connections_go_to_the_target() {
    let mut fl = FleetLab::new("fvip", 2);
    // The standby does not hold the VIP: its client link keeps an address of its own, so
    // only the VIP is missing (as before keepalived adds it).
    let standby = &fl.proxies[1];
    standby.exec_ok(
        Ns::Proxy,
        &["ip", "addr", "add", "198.18.1.3/24", "dev", "p-cli"],
    );
    standby.exec_ok(
        Ns::Proxy,
        &["ip", "addr", "del", "198.18.1.1/24", "dev", "p-cli"],
    );
    fl.start_members(&[]);
    assert!(
        fl.proxies[1]
            .last_redirect_log()
            .contains("the VIP is not on this host (yet)"),
        "{}",
        fl.proxies[1].last_redirect_log()
    );
    assert_eq!(
        within(&fl.proxies[1], 2),
        None,
        "the standby has no VIP yet"
    );

    let load = fl.workload(6);
    std::thread::sleep(Duration::from_secs(2));
    let out = fl.proxies[0].redirect(&["flip", "--to", "target"]);
    let verdicts: Vec<Verdict> = load
        .into_iter()
        .map(|h| h.join().expect("workload"))
        .collect();
    assert_flip_succeeded(&fl, &out);
    cutover_lab::assert_no_loss_through_a_cutover(&verdicts[0], &fl.rows(Ns::Target, ""), "target");
    assert!(
        fl.proxies[0]
            .last_redirect_log()
            .contains("every member (proxy-0, proxy-1) parks new SYNs"),
        "the standby took part in the hold: {}",
        fl.proxies[0].last_redirect_log()
    );

    // keepalived moves the VIP: the active host loses it, the standby gains it.
    fl.proxies[0].exec_ok(
        Ns::Proxy,
        &["ip", "addr", "add", "198.18.1.3/24", "dev", "p-cli"],
    );
    fl.proxies[0].exec_ok(
        Ns::Proxy,
        &["ip", "addr", "del", "198.18.1.1/24", "dev", "p-cli"],
    );
    fl.proxies[1].exec_ok(
        Ns::Proxy,
        &["ip", "addr", "add", "198.18.1.1/24", "dev", "p-cli"],
    );
    assert_eq!(
        within(&fl.proxies[0], 2),
        None,
        "the old active host gave the VIP up"
    );
    wait_for(
        Duration::from_secs(10),
        "the standby to answer on the VIP",
        || within(&fl.proxies[1], 2).is_some(),
    );
    assert_eq!(within(&fl.proxies[1], 3).as_deref(), Some("target"));
    assert_eq!(fl.proxies[1].status()["fleet"]["applied_epoch"], 2);
}

/// A member whose controller stopped before the flip (its lease is gone, its datapath still
/// serves the old server) stays on the roster: the cutover aborts, naming it, rather than
/// leave a host sending writes to the old server past the barrier. Forgetting a live member
/// is refused; once its datapath is detached, forgetting it lets the cutover through.
#[test]
fn a_member_down_before_the_flip_blocks_the_cutover_until_it_is_forgotten() {
    let mut fl = FleetLab::new("fdown", 3);
    fl.start_members(&[]);
    fl.stop_member(2, libc::SIGTERM);
    wait_for(Duration::from_secs(5), "proxy-2's lease to go", || {
        members(&fl.proxies[0]) == ["proxy-0", "proxy-1"]
    });
    assert_eq!(
        new_connection_lands_on(&fl.proxies[2]),
        "source",
        "its datapath serves on without a controller"
    );
    let text = fl.proxies[0].redirect_ok(&["status"]);
    assert!(
        text.contains("proxy-2") && text.contains("NOT LIVE"),
        "status names the member a cutover waits for:\n{text}"
    );

    let out = fl.proxies[0].redirect(&["flip", "--to", "target"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the flip went through without proxy-2"
    );
    // Refused in preflight, before any epoch: no member held anything for nothing.
    assert!(
        err.contains("fleet member(s) proxy-2 not live") && err.contains("nothing was changed"),
        "{err}"
    );
    let state = fl
        .etcd
        .get(&format!("/redirect/{FLEET}/state"))
        .expect("state");
    assert!(
        state.contains(r#""epoch":0,"active":"source","phase":"idle""#),
        "no hold was committed: {state}"
    );
    for i in 0..3 {
        assert_eq!(
            new_connection_lands_on(&fl.proxies[i]),
            "source",
            "proxy-{i}"
        );
    }
    // Nor does an immediate flip split the fleet around it.
    let immediate = fl.proxies[0].redirect(&["flip", "--to", "target", "--immediate"]);
    assert!(!immediate.status.success());
    assert!(
        String::from_utf8_lossy(&immediate.stderr).contains("fleet member(s) proxy-2 not live"),
        "{}",
        String::from_utf8_lossy(&immediate.stderr)
    );

    let refused = fl.proxies[0].redirect(&["fleet", "forget", "proxy-1"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("proxy-1 is live"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    fl.proxies[2].redirect_ok(&["detach", "--force"]);
    let forgot = fl.proxies[0].redirect_ok(&["fleet", "forget", "proxy-2", "--json"]);
    let forgot: serde_json::Value = serde_json::from_str(&forgot).expect("json");
    assert_eq!(forgot["id"], "proxy-2");
    assert!(!fl.proxies[0].redirect_ok(&["status"]).contains("proxy-2"));

    let out = fl.proxies[0].redirect(&["flip", "--to", "target"]);
    assert_flip_succeeded(&fl, &out);
    assert_eq!(new_connection_lands_on(&fl.proxies[1]), "target");
}

/// A member that joins while the fleet is in a cutover's hold holds new connections before it
/// attaches, and the leader does not commit past it: it was not fenced with the others (its
/// sessions were not ended before the barrier), so the cutover aborts and a second flip,
/// which counts it, goes through.
#[test]
fn a_member_joining_during_the_hold_is_held_before_it_attaches_and_not_committed_past() {
    let mut fl = FleetLab::new("fjoinh", 3);
    pause_leader_before(&mut fl, "barrier", 8000);
    fl.start_member(0, &[]);
    fl.start_member(1, &[]);
    let leader = cutover_paused_after_the_hold(&fl, 1);
    fl.start_member(2, &[]);
    let log = fl.proxies[2].last_redirect_log();
    let held = log
        .find("the fleet is in a cutover's hold")
        .unwrap_or_else(|| panic!("proxy-2 did not hold before attaching:\n{log}"));
    // Logged from the kernel's map as the datapath became ready, before the member's
    // follower applied the hold itself.
    let followed = log.find("fleet hold applied").unwrap_or(usize::MAX);
    assert!(held < followed, "{log}");
    assert_eq!(
        within(&fl.proxies[2], 2),
        None,
        "a new connection through the joining member got through during the hold"
    );
    let out = leader.wait_with_output().expect("the flip");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "committed past a member that was not fenced: {}",
        fl.proxies[0].last_redirect_log()
    );
    assert!(
        err.contains("a member joined the fleet after the others acknowledged"),
        "{err}"
    );
    assert_eq!(assert_one_backend_everywhere(&fl), "source");

    fl.proxies[0].redirect_env.clear();
    fl.stop_member(0, libc::SIGTERM);
    fl.start_member(0, &[]);
    let out = fl.proxies[0].redirect(&["flip", "--to", "target"]);
    assert_flip_succeeded(&fl, &out);
    assert!(
        fl.proxies[0]
            .last_redirect_log()
            .contains("every member (proxy-0, proxy-1, proxy-2) parks new SYNs"),
        "{}",
        fl.proxies[0].last_redirect_log()
    );
    assert_eq!(assert_one_backend_everywhere(&fl), "target");
}

/// etcd loses its quorum right before the commit: the leader cannot tell whether its commit
/// landed, so it waits, saying so, instead of undoing the database side beside a fleet that
/// may follow the new backend. Quorum back, etcd says the commit did not land: the cutover
/// aborts everywhere, and no acknowledged write is lost.
#[test]
fn an_unknown_commit_outcome_waits_for_etcd_instead_of_undoing() {
    let mut fl = FleetLab::new("funk", 2);
    pause_leader_before(&mut fl, "flip", 4000);
    fl.start_members(&[]);
    let load = fl.workload(30);
    std::thread::sleep(Duration::from_secs(1));
    let mut leader = cutover_paused_after_the_hold(&fl, 1);
    // Killed while the leader pauses right before its commit (the database side is done).
    wait_for(
        Duration::from_secs(10),
        "the leader's pause before the commit",
        || {
            fl.proxies[0]
                .last_redirect_log()
                .contains("fault point: pausing before this step")
        },
    );
    let etcd_leader = fl.etcd.leader().expect("an etcd leader");
    let other = (0..3).find(|i| *i != etcd_leader).expect("another node");
    fl.etcd.kill(etcd_leader);
    fl.etcd.kill(other);
    // Each attempt to reach a dead etcd waits out its connect timeout, retried: the first
    // "unknown" line can take 30 s or more.
    let until = Instant::now() + Duration::from_secs(90);
    while !fl.proxies[0]
        .last_redirect_log()
        .contains("the commit's outcome is unknown")
    {
        assert!(
            Instant::now() < until,
            "the leader did not say it waits:\n{}",
            fl.proxies[0].last_redirect_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        leader.try_wait().expect("the flip").is_none(),
        "the flip ended while etcd could not say whether it committed"
    );
    assert!(
        !fl.proxies[0]
            .last_redirect_log()
            .contains("progress=aborted"),
        "undone while the outcome was unknown:\n{}",
        fl.proxies[0].last_redirect_log()
    );
    fl.etcd.start(etcd_leader);
    fl.etcd.start(other);
    fl.etcd.wait_healthy(Duration::from_secs(30));
    let out = leader.wait_with_output().expect("the flip");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("the commit did not land"), "{err}");
    assert_eq!(assert_one_backend_everywhere(&fl), "source");
    fl.assert_acked_writes_kept(load, Ns::Source);
}

/// The leader's controller SIGKILLed mid-cutover (every member holds) and restarted at once:
/// the fleet's committed epoch decides its recovery, not its journal. It aborts the hold it
/// left (by compare-and-swap, so a commit that landed would win), rolls the database side
/// back, and every member serves the source again without waiting for the old leadership
/// to lapse. A second flip then goes through; no acknowledged write is lost.
#[test]
fn a_leader_killed_mid_cutover_recovers_by_the_fleets_committed_epoch() {
    let mut fl = FleetLab::new("flead", 2);
    pause_leader_before(&mut fl, "barrier", 8000);
    fl.start_members(&[]);
    let load = fl.workload(20);
    std::thread::sleep(Duration::from_secs(1));
    let leader = cutover_paused_after_the_hold(&fl, 1);
    fl.stop_member(0, libc::SIGKILL);
    let _ = leader.wait_with_output();
    fl.proxies[0].redirect_env.clear();
    let restarted = Instant::now();
    fl.start_member(0, &[]);
    let log = fl.proxies[0].last_redirect_log();
    assert!(
        log.contains("aborted the fleet hold this member's previous controller left"),
        "{log}"
    );
    assert_eq!(assert_one_backend_everywhere(&fl), "source");
    assert!(
        restarted.elapsed() < redirect::fleet::member::LEASE_TTL,
        "recovered by its own abort, not by the old leadership lapsing"
    );
    fl.assert_acked_writes_kept(load, Ns::Source);
    let out = fl.proxies[0].redirect(&["flip", "--to", "target"]);
    assert_flip_succeeded(&fl, &out);
    assert_eq!(assert_one_backend_everywhere(&fl), "target");
}

/// A member stopped (SIGTERM, as `systemctl stop`) while it holds for a fleet cutover keeps
/// following the fleet until the next epoch lifts its hold, then stops: its datapath, left
/// serving, sends new connections to the committed backend instead of dropping them all
/// until someone restarts it.
#[test]
fn a_member_stopped_during_a_hold_stops_after_the_commit_and_keeps_serving() {
    let mut fl = FleetLab::new("fstop", 2);
    pause_leader_before(&mut fl, "barrier", 3000);
    fl.start_members(&[]);
    let leader = cutover_paused_after_the_hold(&fl, 1);
    wait_for(Duration::from_secs(5), "proxy-1's ack of the hold", || {
        fl.etcd
            .get(&format!("/redirect/{FLEET}/acks/1/proxy-1"))
            .is_some()
    });
    fl.stop_member(1, libc::SIGTERM);
    let out = leader.wait_with_output().expect("the flip");
    assert_flip_succeeded(&fl, &out);
    let log = fl.proxies[1].last_redirect_log();
    assert!(
        log.contains("waiting for the fleet's next epoch to lift this member's hold")
            && log.contains("fleet hold lifted"),
        "{log}"
    );
    assert_eq!(
        within(&fl.proxies[1], 3).as_deref(),
        Some("target"),
        "the stopped member's datapath serves the committed backend"
    );
}

/// etcd lost the fleet's state (a restore from an old snapshot, a hand delete) while members
/// are enrolled: a starting member refuses to found it again from its own pins (they could
/// name the other backend than the fleet serves), says how to restore it, and writes nothing.
#[test]
fn a_lost_state_is_not_founded_again_while_members_are_enrolled() {
    let mut etcd = Etcd::new("lost");
    let mut lab = Lab::new("flost");
    etcd.join(&lab);
    let pid = start_member(&mut lab, &etcd, "proxy-a");
    lab.signal(pid, libc::SIGTERM);
    let state = format!("/redirect/{FLEET}/state");
    assert!(etcd.get(&state).is_some(), "the first member founded it");
    assert!(etcd.etcdctl(&["del", &state]).status.success());

    let mut args = lab.run_args();
    args.extend(fleet_flags(&etcd, "proxy-a"));
    args.push("--once".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lab.redirect(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "run founded a lost state again: {stderr}"
    );
    assert!(
        stderr.contains("no committed state") && stderr.contains("nothing was changed"),
        "{stderr}"
    );
    assert!(etcd.get(&state).is_none(), "nothing was written");
}
