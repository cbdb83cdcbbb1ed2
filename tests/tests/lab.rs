//! L2: the datapath in a netns lab with two real `PostgreSQL` servers and real clients.
//! Each test builds its own uniquely named lab and tears it down on drop, even on panic.

#![allow(
    clippy::too_many_lines,
    reason = "a lab scenario reads top to bottom as one story"
)]

use std::{collections::HashSet, time::Duration};

use redirect_tests::{
    Lab, Ns, SOURCE_ADDR, TARGET_ADDR, VIP,
    pg::{self, cluster_name, connect},
    require_root, wait_for,
};

/// A lab with both servers up and `redirect run` serving; `extra` goes to `run`.
fn lab_with_servers(name: &str, extra: &[&str]) -> Lab {
    require_root();
    let mut lab = Lab::new(name);
    pg::start(&mut lab, Ns::Source, "source", &[]);
    pg::start(&mut lab, Ns::Target, "target", &[]);
    lab.start_redirect(extra);
    lab
}

/// `status` once it counts `source` and `target` live connections. With a controller running,
/// `status` shows the counts of its last GC pass, so this waits a few passes (1 s by default).
fn wait_for_live(lab: &Lab, source: u64, target: u64) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let counts = |s: &serde_json::Value| {
        (
            s["backends"]["source"]["connections"].as_u64(),
            s["backends"]["target"]["connections"].as_u64(),
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        last = lab.status();
        if counts(&last) == (Some(source), Some(target)) {
            return last;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "status never counted {source} live connection(s) on the source and {target} on the target within 5 s (a few GC passes): {:?}\n{last}",
        counts(&last)
    );
}

fn assert_no_checksum_errors(lab: &Lab) {
    for ns in [Ns::Client, Ns::Proxy, Ns::Source, Ns::Target] {
        assert_eq!(lab.csum_errors(ns), 0, "TcpInCsumErrors in {ns:?}");
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn open_connection_stays_on_source_while_new_ones_go_to_target_and_back() {
    let lab = lab_with_servers("flip", &[]);
    let status = lab.status();
    assert_eq!(status["active"], "source");
    assert_eq!(
        status["backends"]["source"]["addr"],
        format!("{SOURCE_ADDR}:5432")
    );
    assert_eq!(
        status["backends"]["target"]["addr"],
        format!("{TARGET_ADDR}:5432")
    );

    // One client thread holds every connection for the whole test, so they stay open.
    let (to_test, from_lab) = std::sync::mpsc::channel::<&'static str>();
    let (to_lab, from_test) = std::sync::mpsc::channel::<String>();
    let lab_ref = std::sync::Arc::new(lab);
    let handle = {
        let lab = lab_ref.clone();
        std::thread::spawn(move || {
            lab.in_ns(Ns::Client, move || {
                rt().block_on(async move {
                    let vip = VIP;
                    let a = connect(vip).await;
                    to_lab.send(cluster_name(&a).await).unwrap();
                    assert_eq!(from_lab.recv().unwrap(), "flipped");
                    let b = connect(vip).await;
                    to_lab.send(cluster_name(&b).await).unwrap();
                    to_lab.send(cluster_name(&a).await).unwrap();
                    assert_eq!(from_lab.recv().unwrap(), "flipped back");
                    let c = connect(vip).await;
                    to_lab.send(cluster_name(&c).await).unwrap();
                    to_lab.send(cluster_name(&b).await).unwrap();
                    to_lab.send(cluster_name(&a).await).unwrap();
                    // Writes on the pinned connection keep working too.
                    a.batch_execute(
                        "CREATE TABLE IF NOT EXISTS t(x int); INSERT INTO t VALUES (1)",
                    )
                    .await
                    .expect("write on source");
                    assert_eq!(from_lab.recv().unwrap(), "done");
                });
            });
        })
    };
    let lab = lab_ref;
    let next = || {
        from_test
            .recv_timeout(Duration::from_secs(30))
            .expect("client step")
    };
    assert_eq!(next(), "source", "A: before the flip");

    let out = lab.redirect_ok(&["flip", "--to", "target", "--immediate"]);
    assert!(out.contains("new connections now go to target"), "{out}");
    assert_eq!(lab.status()["active"], "target");
    to_test.send("flipped").unwrap();
    assert_eq!(next(), "target", "B: a new connection after the flip");
    assert_eq!(
        next(),
        "source",
        "A: the open connection stays on the source"
    );

    wait_for_live(&lab, 1, 1);

    lab.redirect_ok(&["flip", "--to", "source", "--immediate"]);
    to_test.send("flipped back").unwrap();
    assert_eq!(next(), "source", "C: after flipping back");
    assert_eq!(next(), "target", "B stays on the target");
    assert_eq!(next(), "source", "A stays on the source");
    to_test.send("done").unwrap();
    handle.join().expect("client thread");

    let s = lab.status();
    assert!(s["stats"]["new_conn_source"].as_u64().unwrap() >= 2);
    assert!(s["stats"]["new_conn_target"].as_u64().unwrap() >= 1);
    assert_eq!(
        s["stats"]["nonsyn_miss"], 0,
        "no established packet ever missed its entry"
    );
    let conns: serde_json::Value =
        serde_json::from_str(&lab.redirect_ok(&["connections", "--json"])).unwrap();
    assert!(conns.as_array().unwrap().len() >= 3);
    assert_no_checksum_errors(&lab);
}

#[test]
fn a_thousand_concurrent_connections_are_all_routed_correctly() {
    const PER_SIDE: usize = 500;
    let lab = std::sync::Arc::new(lab_with_servers("1k", &[]));
    let (to_lab, from_client) = std::sync::mpsc::channel::<()>();
    let (to_client, from_lab) = std::sync::mpsc::channel::<()>();
    let client = {
        let lab = lab.clone();
        std::thread::spawn(move || {
            lab.in_ns(Ns::Client, move || {
                rt().block_on(async move {
                    let open = |n: usize| async move {
                        let mut set = tokio::task::JoinSet::new();
                        for _ in 0..n {
                            set.spawn(async { connect(VIP).await });
                        }
                        let mut clients = Vec::new();
                        while let Some(c) = set.join_next().await {
                            clients.push(c.expect("connect task"));
                        }
                        clients
                    };
                    let before = open(PER_SIDE).await;
                    to_lab.send(()).unwrap();
                    from_lab.recv().unwrap();
                    let after = open(PER_SIDE).await;
                    // Every connection, old and new, answers from the server it started on.
                    let mut wrong = 0;
                    for (clients, want) in [(&before, "source"), (&after, "target")] {
                        for c in clients {
                            if cluster_name(c).await != want {
                                wrong += 1;
                            }
                        }
                    }
                    to_lab.send(()).unwrap();
                    from_lab.recv().unwrap();
                    (wrong, before.len() + after.len())
                })
            })
        })
    };
    from_client
        .recv_timeout(Duration::from_secs(120))
        .expect("first 500 connections");
    lab.redirect_ok(&["flip", "--to", "target", "--immediate"]);
    to_client.send(()).unwrap();
    from_client
        .recv_timeout(Duration::from_secs(180))
        .expect("second 500 connections and checks");

    let conns: serde_json::Value =
        serde_json::from_str(&lab.redirect_ok(&["connections", "--json"])).unwrap();
    let conns = conns.as_array().unwrap();
    let live: Vec<_> = conns
        .iter()
        .filter(|c| c["state"] == "established")
        .collect();
    assert_eq!(
        live.len(),
        2 * PER_SIDE,
        "every connection is tracked and established"
    );
    let snat: HashSet<(String, String)> = live
        .iter()
        .map(|c| {
            (
                c["backend_addr"].as_str().unwrap().to_owned(),
                c["snat"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        snat.len(),
        2 * PER_SIDE,
        "no two connections share a backend-side tuple"
    );
    let s = wait_for_live(&lab, PER_SIDE as u64, PER_SIDE as u64);
    for stat in ["snat_exhausted", "ct_full", "nonsyn_miss", "reply_orphan"] {
        assert_eq!(s["stats"][stat], 0, "{stat}");
    }
    to_client.send(()).unwrap();
    let (wrong, total) = client.join().expect("client thread");
    assert_eq!((wrong, total), (0, 2 * PER_SIDE), "misrouted connections");
    assert_no_checksum_errors(&lab);
}

#[test]
fn restarting_the_controller_keeps_established_connections_and_the_flip() {
    require_root();
    let mut lab = Lab::new("rst");
    pg::start(&mut lab, Ns::Source, "source", &[]);
    pg::start(&mut lab, Ns::Target, "target", &[]);
    let first = lab.start_redirect(&[]);
    let lab = std::sync::Arc::new(std::sync::Mutex::new(lab));
    let (to_lab, from_client) = std::sync::mpsc::channel::<String>();
    let (to_client, from_lab) = std::sync::mpsc::channel::<()>();
    let ns_lab = lab.clone();
    let client = std::thread::spawn(move || {
        let guard = ns_lab.lock().unwrap();
        let path = format!("/var/run/netns/{}", guard.ns(Ns::Client));
        drop(guard);
        let fd = std::fs::File::open(&path).unwrap();
        // SAFETY: affects only this thread.
        assert_eq!(
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::CLONE_NEWNET) },
            0
        );
        rt().block_on(async move {
            let a = connect(VIP).await;
            to_lab.send(cluster_name(&a).await).unwrap();
            for _ in 0..3 {
                from_lab.recv().unwrap();
                let fresh = connect(VIP).await;
                to_lab
                    .send(format!(
                        "{} {}",
                        cluster_name(&a).await,
                        cluster_name(&fresh).await
                    ))
                    .unwrap();
            }
        });
    });
    let next = || {
        from_client
            .recv_timeout(Duration::from_secs(30))
            .expect("client step")
    };
    assert_eq!(next(), "source");
    lab.lock()
        .unwrap()
        .redirect_ok(&["flip", "--to", "target", "--immediate"]);

    // Controller gone: the pinned datapath keeps serving old and new connections.
    lab.lock().unwrap().signal(first, libc::SIGTERM);
    to_client.send(()).unwrap();
    assert_eq!(next(), "source target", "with no controller running");

    // A restart re-adopts the pins: ACTIVE and the tracked connection survive.
    let second = lab.lock().unwrap().start_redirect(&[]);
    assert_eq!(
        lab.lock().unwrap().status()["active"],
        "target",
        "the flip survives a restart"
    );
    to_client.send(()).unwrap();
    assert_eq!(next(), "source target", "after the restart");

    // Even a SIGKILL changes nothing for traffic.
    lab.lock().unwrap().signal(second, libc::SIGKILL);
    lab.lock().unwrap().start_redirect(&[]);
    to_client.send(()).unwrap();
    assert_eq!(next(), "source target", "after a SIGKILL and restart");
    client.join().expect("client thread");
    let log = std::fs::read_to_string(lab.lock().unwrap().work_dir.join("redirect-1.log"))
        .unwrap_or_default();
    assert!(
        log.contains("adopted=true"),
        "the second run re-adopted the pins: {log}"
    );
}

#[test]
fn fin_and_rst_lead_to_cleanup_after_the_timeouts() {
    let lab = lab_with_servers(
        "gc",
        &[
            "--gc-interval",
            "100ms",
            "--close-timeout",
            "1s",
            "--port-quarantine",
            "2s",
            "--syn-timeout",
            "5s",
        ],
    );
    // A graceful close (FIN both ways) and an abortive one (RST, SO_LINGER 0).
    lab.in_ns(Ns::Client, || {
        rt().block_on(async {
            let c = connect(VIP).await;
            assert_eq!(cluster_name(&c).await, "source");
            drop(c); // sends Terminate, then FIN
        });
        let s = std::net::TcpStream::connect((VIP, 5432)).expect("raw connect");
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket and option struct.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                u32::try_from(std::mem::size_of::<libc::linger>()).unwrap(),
            )
        };
        assert_eq!(rc, 0);
        std::thread::sleep(Duration::from_millis(200));
        drop(s); // RST
    });
    let states = || -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_str(&lab.redirect_ok(&["connections", "--json"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|c| c["state"].as_str().unwrap().to_owned())
            .collect()
    };
    let seen = states();
    assert!(
        seen.iter().all(|s| s == "closed"),
        "both connections are closed: {seen:?}"
    );
    // Closed connections do not count as live.
    wait_for_live(&lab, 0, 0);
    wait_for(
        Duration::from_secs(10),
        "CT entries to expire after the close timeout",
        || states().is_empty(),
    );
    let rev_entries = || {
        let out = lab.exec_ok(
            Ns::Proxy,
            &[
                "bpftool",
                "-j",
                "map",
                "dump",
                "pinned",
                &lab.pin_dir.join("REV").display().to_string(),
            ],
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .unwrap()
            .as_array()
            .map_or(0, Vec::len)
    };
    assert_eq!(
        rev_entries(),
        0,
        "the client closed first and a RST ended the other: nobody holds TIME_WAIT, both ports are free at once"
    );
    // The server ends the session: its FIN comes first, so it holds TIME_WAIT, and the port
    // stays quarantined after the entry is gone.
    // The server ends the connection first: a startup packet with an impossible length makes
    // PostgreSQL close at once (and send nothing). Our side only closes after reading its FIN.
    lab.in_ns(Ns::Client, || {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect((VIP, 5432)).expect("raw connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&[0, 0, 0, 1]).unwrap();
        let mut buf = [0u8; 64];
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        std::thread::sleep(Duration::from_millis(100));
        drop(s);
    });
    wait_for(
        Duration::from_secs(10),
        "the server-closed entry to expire after the close timeout",
        || states().is_empty(),
    );
    assert_eq!(
        rev_entries(),
        1,
        "the port of the connection the server closed is quarantined: {}",
        lab.status()["stats"]
    );
    assert!(
        lab.status()["stats"]["closed_backend_first"]
            .as_u64()
            .unwrap()
            >= 1
    );
    wait_for(
        Duration::from_secs(15),
        "the quarantined SNAT port to be released",
        || rev_entries() == 0,
    );
    assert_no_checksum_errors(&lab);
}

#[test]
fn bpftool_shows_typed_maps_and_detach_guards_live_connections() {
    let lab = lab_with_servers("tool", &[]);
    let (keep, release) = std::sync::mpsc::channel::<()>();
    let (opened, wait_open) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn({
        let path = format!("/var/run/netns/{}", lab.ns(Ns::Client));
        move || {
            let fd = std::fs::File::open(&path).unwrap();
            // SAFETY: affects only this thread.
            assert_eq!(
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::CLONE_NEWNET) },
                0
            );
            rt().block_on(async move {
                let c = connect(VIP).await;
                cluster_name(&c).await;
                opened.send(()).unwrap();
                tokio::task::spawn_blocking(move || release.recv())
                    .await
                    .unwrap()
                    .ok();
                drop(c);
            });
        }
    });
    wait_open.recv_timeout(Duration::from_secs(30)).unwrap();
    let ct = lab.pin_dir.join("CT").display().to_string();
    let dump = lab.exec_ok(Ns::Proxy, &["bpftool", "map", "dump", "pinned", &ct]);
    let text = String::from_utf8_lossy(&dump.stdout);
    for field in [
        "client_addr_be",
        "client_port_be",
        "backend_addr_be",
        "snat_port_be",
        "last_seen_ns",
    ] {
        assert!(
            text.contains(field),
            "bpftool shows the BTF field {field}:\n{text}"
        );
    }
    let show = lab.exec_ok(Ns::Proxy, &["bpftool", "map", "show", "pinned", &ct]);
    assert!(
        String::from_utf8_lossy(&show.stdout).contains("btf_id"),
        "CT carries BTF"
    );

    let refused = lab.redirect(&["detach"]);
    assert!(
        !refused.status.success(),
        "detach refuses while a connection is live"
    );
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("live connection") && err.lines().count() == 1,
        "one clear line: {err}"
    );
    assert!(lab.pin_dir.join("CT").exists(), "nothing was removed");

    keep.send(()).unwrap();
    holder.join().unwrap();
    // The links' ids, whichever hook they are on (`bpftool net` does not list TCX links).
    let link_ids: Vec<u64> = ["p-cli", "p-src", "p-tgt"]
        .iter()
        .map(|iface| {
            let pin = lab.pin_dir.join(format!("link_{iface}"));
            let out = lab.exec_ok(
                Ns::Proxy,
                &[
                    "bpftool",
                    "-j",
                    "link",
                    "show",
                    "pinned",
                    &pin.display().to_string(),
                ],
            );
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            v["id"].as_u64().expect("a pinned link has an id")
        })
        .collect();
    let out = lab.redirect_ok(&["detach", "--force"]);
    assert!(out.contains("detached from p-cli, p-src, p-tgt"), "{out}");
    assert!(!lab.pin_dir.join("CT").exists());
    for id in link_ids {
        let gone = !lab
            .cmd(
                Ns::Proxy,
                &["bpftool", "link", "show", "id", &id.to_string()],
            )
            .output()
            .unwrap()
            .status
            .success();
        assert!(gone, "link {id} is gone: the program is detached");
    }
}

#[test]
fn bad_input_fails_with_one_clear_line_and_changes_nothing() {
    require_root();
    let lab = Lab::new("err");
    let base = lab.run_args();
    let with = |replace: &str, value: &str| -> Vec<String> {
        let mut args = base.clone();
        let i = args.iter().position(|a| a == replace).unwrap();
        args[i + 1] = value.to_owned();
        args
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (with("--iface", "nosuch0"), "unknown interface \"nosuch0\""),
        (
            with("--vip", "198.18.9.9:5432"),
            "VIP 198.18.9.9 is not a local address",
        ),
        (
            with("--source", "198.18.2.300:5432"),
            "invalid value '198.18.2.300:5432' for '--source",
        ),
        (
            with("--vip", "198.18.1.1"),
            "invalid value '198.18.1.1' for '--vip",
        ),
    ];
    for (args, want) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = lab.redirect(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err:?}");
        assert!(!lab.pin_dir.exists(), "{args:?} left pins behind");
    }
    // No bpffs at the pin dir.
    let out = lab
        .cmd(Ns::Proxy, &[])
        .arg(redirect_tests::redirect_bin())
        .args(["--pin-dir", "/tmp/not-bpffs/redirect"])
        .args(&base)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not on a bpffs mount"),
        "{out:?}"
    );
    // Not root.
    let out = lab
        .cmd(
            Ns::Proxy,
            &[
                "setpriv",
                "--reuid",
                "nobody",
                "--regid",
                "nogroup",
                "--clear-groups",
            ],
        )
        .arg(redirect_tests::redirect_bin())
        .args(["--pin-dir", &lab.pin_dir.display().to_string(), "status"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("must run as root"),
        "{out:?}"
    );
    // Nothing pinned.
    let out = lab.redirect(&["status"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no redirect datapath is pinned"),
        "{out:?}"
    );
}

#[test]
fn a_restart_that_would_mix_xdp_and_tc_is_refused_and_changes_nothing() {
    require_root();
    let lab = Lab::new("mix");
    let vip = format!("{VIP}:5432");
    let source = format!("{SOURCE_ADDR}:5432");
    let target = format!("{TARGET_ADDR}:5432");
    let run = |ifaces: &[&str], hook: &str| {
        let mut args = vec!["run"];
        for i in ifaces {
            args.extend(["--iface", i]);
        }
        args.extend([
            "--vip", &vip, "--source", &source, "--target", &target, "--hook", hook, "--once",
        ]);
        lab.redirect(&args)
    };
    assert!(run(&["p-cli", "p-src"], "xdp").status.success());
    // `auto` on veths means TC: p-tgt would be on TC next to XDP links, whose redirects into
    // it would be dropped.
    let out = run(&["p-cli", "p-src", "p-tgt"], "auto");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "mixing hooks must fail");
    assert!(
        err.contains("the pinned links are on xdp, and p-tgt would go on tc"),
        "{err}"
    );
    assert!(
        !lab.pin_dir.join("link_p-tgt").exists(),
        "nothing was attached"
    );
    // Asking for the pinned hook adds the interface.
    assert!(run(&["p-cli", "p-src", "p-tgt"], "xdp").status.success());
    assert_eq!(lab.status()["hooks"]["p-tgt"], "xdp");
}
