//! The fleet under etcd faults (issue 23, docs/reliability.md): a member that lost its lease
//! comes back with no restart, `status` and `/metrics` say whether it is live, a flip into an
//! etcd outage is refused at once in one line, and after each fault the fleet cuts over again.
//! Real 3-node etcd, real PostgreSQL, XDP in namespaces, the ledger workload through every
//! proxy. The full set (every fault at every step) is `cargo xtask faults --fleet`.
//! Root only; run under `flock /tmp/redirect-lab.lock`.

use std::time::{Duration, Instant};

use redirect_tests::{
    Lab, Ns,
    fleet::Etcd,
    fleet_faults::{LEASE, PAST_THE_LEASE, Prober, flip_until_it_succeeds, timed_flip, wait_live},
    fleet_lab::{FLEET, FleetLab, members, new_connection_lands_on},
    wait_for,
    workload::Verdict,
};

/// One renewal period of the member lease (redirect's `fleet::member::RENEW_EVERY`), and
/// what a member may take past it to say it lost etcd (`LIVE_FOR`).
const RENEWAL: Duration = Duration::from_millis(2500);
const LIVE_FOR: Duration = Duration::from_millis(7500);
/// How long a refused flip may take: `--etcd-timeout` (3 s) and the CLI around it.
const REFUSED_WITHIN: Duration = Duration::from_secs(6);

fn member_key(i: usize) -> String {
    format!("/redirect/{FLEET}/members/{}", FleetLab::member_id(i))
}

fn live_series(i: usize) -> String {
    format!(
        "redirect_fleet_member_live{{fleet=\"{FLEET}\",member=\"{}\"}}",
        FleetLab::member_id(i)
    )
}

/// Waits until proxy `i` says, in `status` and `/metrics`, that it is not live (and so not
/// in sync): within [`LIVE_FOR`] of losing etcd, plus one status round trip.
fn assert_says_not_live(fl: &FleetLab, i: usize) {
    let lab = &fl.proxies[i];
    wait_for(
        LIVE_FOR + Duration::from_secs(3),
        "the member to say it is not live",
        || {
            let f = &lab.status()["fleet"];
            f["live"] == false && f["in_sync"] == false
        },
    );
    assert_eq!(lab.metric(&live_series(i)), Some(0.0), "{}", lab.metrics());
    let text = lab.redirect_ok(&["status"]);
    assert!(text.contains("this member is NOT LIVE"), "{text}");
}

/// A flip that must be refused at once, in one line that names etcd's endpoints and says
/// nothing changed, with no raw gRPC text.
fn assert_refused_at_once(lab: &Lab, to: &str, why: &str) -> String {
    let (out, took) = timed_flip(lab, to);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the flip should be refused: {err}");
    assert!(
        took < REFUSED_WITHIN,
        "refused only after {took:?} (bounded by --etcd-timeout): {err}"
    );
    assert!(err.contains(why), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    assert!(!err.to_lowercase().contains("grpc"), "raw gRPC text: {err}");
    err
}

/// Joins the workload and checks that every write any proxy saw acknowledged is on `ns`,
/// and that no client waited more than a few seconds for an answer.
fn assert_nothing_lost_nobody_stuck(
    fl: &FleetLab,
    load: Vec<std::thread::JoinHandle<Verdict>>,
    ns: Ns,
) {
    let verdicts = fl.assert_acked_writes_kept(load, ns);
    for (i, v) in verdicts.iter().enumerate() {
        assert!(v.acked().count() > 0, "proxy-{i}'s workload wrote nothing");
        assert!(
            v.max_wait() < Duration::from_secs(5),
            "a client behind proxy-{i} waited {:?}",
            v.max_wait()
        );
    }
}

/// After the fault healed: every member live and in sync within `within`, having said it
/// rejoined; every VIP's new connections reach `backend`.
fn assert_fleet_whole(fl: &FleetLab, backend: &str, within: Duration) {
    for (i, lab) in fl.proxies.iter().enumerate() {
        wait_live(lab, within).unwrap_or_else(|f| panic!("proxy-{i} did not come back: {f:#}"));
        assert_eq!(new_connection_lands_on(lab), backend, "proxy-{i}");
    }
}

/// All of etcd stalls (SIGSTOP) for longer than the member lease while writes go on through
/// both proxies. Both members say at once that they are not live; a flip asked meanwhile is
/// refused within --etcd-timeout, in one line; once etcd resumes, both members register again
/// under new leases, with no restart, and a flip succeeds within twice the lease.
#[test]
fn etcd_paused_past_the_lease_refuses_a_flip_at_once_then_the_fleet_cuts_over_with_no_restart() {
    let mut fl = FleetLab::new("fpause", 2);
    fl.start_members(&[]);
    let leases: Vec<Option<i64>> = (0..2).map(|i| fl.etcd.lease_of(&member_key(i))).collect();
    let load = fl.workload(45);
    std::thread::sleep(Duration::from_secs(2));
    let probes = Prober::start(&fl);
    fl.etcd.pause();
    let paused = Instant::now();
    assert_says_not_live(&fl, 0);
    assert_says_not_live(&fl, 1);
    let err = assert_refused_at_once(&fl.proxies[1], "target", "etcd is unreachable at http://");
    assert!(err.contains(&fl.etcd.endpoints()), "{err}");
    std::thread::sleep(PAST_THE_LEASE.saturating_sub(paused.elapsed()));
    fl.etcd.resume();
    let took = flip_until_it_succeeds(&fl.proxies[1], "target", 2 * LEASE).unwrap_or_else(|e| {
        panic!(
            "no flip succeeded within {:?} of etcd resuming: {e}\n{}",
            2 * LEASE,
            fl.proxies[1].last_redirect_log()
        )
    });
    eprintln!("a flip succeeded {took:?} after etcd resumed");
    assert_fleet_whole(&fl, "target", Duration::from_secs(5));
    for (i, lab) in fl.proxies.iter().enumerate() {
        let log = lab.last_redirect_log();
        assert!(log.contains("this member left the fleet"), "{log}");
        assert!(log.contains("this member rejoined the fleet"), "{log}");
        let now = fl.etcd.lease_of(&member_key(i));
        assert!(
            now.is_some() && now != leases[i],
            "proxy-{i} should be under a new lease ({:?} then, {now:?} now)",
            leases[i]
        );
    }
    let seen = probes.finish();
    assert_eq!(seen.changes, 1, "one flip, one change of backend: {seen:?}");
    assert_nothing_lost_nobody_stuck(&fl, load, Ns::Target);
}

/// One member cut off from etcd (its link down, etcd up) past the lease: it says at once that
/// it is not live, the other member sees it go, and flips asked of either are refused in one
/// line. Once the link is back it is live and in sync within about one renewal, under a new
/// lease, and a flip asked of it succeeds, losing nothing.
#[test]
fn a_member_cut_off_past_the_lease_says_so_rejoins_and_leads_the_next_flip() {
    let mut fl = FleetLab::new("fcut", 2);
    fl.start_members(&[]);
    let before = fl.etcd.lease_of(&member_key(0));
    let load = fl.workload(45);
    std::thread::sleep(Duration::from_secs(2));
    let probes = Prober::start(&fl);
    Etcd::disconnect(&fl.proxies[0]);
    let cut = Instant::now();
    assert_says_not_live(&fl, 0);
    assert_refused_at_once(&fl.proxies[0], "target", "etcd is unreachable at http://");
    wait_for(
        LEASE + Duration::from_secs(5),
        "proxy-1 to see proxy-0 go",
        || !members(&fl.proxies[1]).contains(&FleetLab::member_id(0)),
    );
    let err = assert_refused_at_once(&fl.proxies[1], "target", "not live");
    assert!(err.contains("proxy-0"), "{err}");
    std::thread::sleep(PAST_THE_LEASE.saturating_sub(cut.elapsed()));
    Etcd::reconnect(&fl.proxies[0]);
    let back = wait_live(&fl.proxies[0], RENEWAL * 2).unwrap_or_else(|f| {
        panic!(
            "proxy-0 not live again within two renewals: {f:#}\n{}",
            fl.proxies[0].last_redirect_log()
        )
    });
    eprintln!("proxy-0 live and in sync {back:?} after its link came back");
    assert_eq!(fl.proxies[0].metric(&live_series(0)), Some(1.0));
    let after = fl.etcd.lease_of(&member_key(0));
    assert!(
        after.is_some() && after != before,
        "{before:?} -> {after:?}"
    );
    let took = flip_until_it_succeeds(&fl.proxies[0], "target", 2 * LEASE)
        .unwrap_or_else(|e| panic!("{e}\n{}", fl.proxies[0].last_redirect_log()));
    eprintln!("the flip asked of proxy-0 succeeded {took:?} after it was live");
    assert_fleet_whole(&fl, "target", Duration::from_secs(5));
    let seen = probes.finish();
    assert_eq!(seen.changes, 1, "one flip, one change of backend: {seen:?}");
    assert_nothing_lost_nobody_stuck(&fl, load, Ns::Target);
}

/// Every way a lease ends, on one member: revoked by an operator (a new lease within one
/// renewal); a keep-alive stream broken by a short partition (the same lease kept, live again
/// after); etcd restored from a snapshot taken before the current lease existed (a new lease,
/// and still registered after the snapshot's stale lease expires). Then a cutover passes.
#[test]
fn every_way_a_lease_ends_is_noticed_and_the_member_registers_again() {
    let mut fl = FleetLab::new("flease", 1);
    fl.start_members(&[]);
    let key = member_key(0);
    let lab = &fl.proxies[0];

    let first = fl.etcd.lease_of(&key).expect("a member lease");
    fl.etcd.revoke(first);
    let revoked = Instant::now();
    wait_for(RENEWAL * 2, "a new lease after the revoke", || {
        fl.etcd.lease_of(&key).is_some_and(|l| l != first)
    });
    eprintln!("registered again {:?} after the revoke", revoked.elapsed());
    wait_live(lab, RENEWAL).expect("live after the revoke");

    let second = fl.etcd.lease_of(&key).expect("the new lease");
    Etcd::disconnect(lab);
    wait_for(
        LIVE_FOR + Duration::from_secs(3),
        "not live while cut off",
        || lab.status()["fleet"]["live"] == false,
    );
    Etcd::reconnect(lab);
    let back = wait_live(lab, RENEWAL * 2).expect("live after a short partition");
    eprintln!("live again {back:?} after a short partition");
    assert_eq!(
        fl.etcd.lease_of(&key),
        Some(second),
        "a lease that lived is kept"
    );

    let snapshot = fl.etcd.work_dir.join("before-third-lease.db");
    fl.etcd.snapshot(&snapshot);
    fl.etcd.revoke(second);
    wait_for(RENEWAL * 2, "a third lease", || {
        fl.etcd.lease_of(&key).is_some_and(|l| l != second)
    });
    let third = fl.etcd.lease_of(&key).expect("the third lease");
    fl.etcd.restore(&snapshot);
    let lab = &fl.proxies[0];
    wait_for(
        Duration::from_secs(10),
        "a fourth lease after the restore",
        || {
            fl.etcd
                .lease_of(&key)
                .is_some_and(|l| l != second && l != third)
        },
    );
    // The snapshot's lease (the second) expires unrenewed: the record lives on under the new.
    std::thread::sleep(LEASE + Duration::from_secs(2));
    assert!(
        fl.etcd.lease_of(&key).is_some(),
        "the record went with the stale lease"
    );
    wait_live(lab, RENEWAL).expect("live after the restore");
    let log = lab.last_redirect_log();
    assert!(log.contains("its lease ended"), "{log}");

    let out = lab.redirect(&["flip", "--to", "target"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        lab.last_redirect_log()
    );
    assert_eq!(new_connection_lands_on(lab), "target");
}
