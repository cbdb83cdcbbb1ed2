//! The datapath caches each destination's next hop (`bpf_fib_lookup`'s answer) per CPU for
//! 100 ms, on both hooks. A neighbour that changes its MAC (a failover to another host with the
//! same address, announced by gratuitous ARP) must be reached at its new MAC within that, by a
//! connection that is already open: a cache that never re-validated would send its packets to
//! the old MAC forever. With `--fib-every-packet` the very next packet goes to the new MAC.
//!
//! The client thread is pinned to one CPU, so the query after the change meets the same
//! per-CPU cache entry that the query before it filled (a veth processes what a thread sends
//! on that thread's CPU).

use std::time::{Duration, Instant};

use redirect_tests::{
    Lab, Ns, SOURCE_ADDR, VIP,
    pg::{self, connect},
};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn pin_this_thread_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it; pid 0 is this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set),
            0,
            "pinning the client thread"
        );
    }
}

/// How long an open connection's query takes once the source has moved to a new MAC and the
/// proxy's neighbour table says so, on `hook` with `extra` run flags.
fn query_after_mac_change(hook: &'static str, extra: &[&str]) -> Duration {
    redirect_tests::require_root();
    let mut lab = Lab::new("nhop");
    lab.hook = Some(hook);
    let _source = pg::start(&mut lab, Ns::Source, "source", &[]);
    lab.start_redirect(extra);
    let (to_test, from_client) = std::sync::mpsc::channel::<()>();
    let (to_client, from_test) = std::sync::mpsc::channel::<()>();
    let client = lab.spawn_in_ns(Ns::Client, move || {
        pin_this_thread_to_cpu0();
        rt().block_on(async move {
            let c = connect(VIP).await;
            // Fills this CPU's cache entry for the source.
            c.simple_query("SELECT 1").await.expect("a query before");
            to_test.send(()).unwrap();
            from_test.recv().unwrap();
            let started = Instant::now();
            tokio::time::timeout(Duration::from_secs(10), c.simple_query("SELECT 2"))
                .await
                .expect("the query after the MAC change completes")
                .expect("and succeeds");
            started.elapsed()
        })
    });
    from_client.recv_timeout(Duration::from_secs(30)).unwrap();
    let new_mac = "02:00:00:00:02:99";
    lab.exec_ok(
        Ns::Source,
        &["ip", "link", "set", "eth0", "address", new_mac],
    );
    lab.exec_ok(
        Ns::Proxy,
        &[
            "ip",
            "neigh",
            "replace",
            SOURCE_ADDR,
            "lladdr",
            new_mac,
            "dev",
            "p-src",
            "nud",
            "reachable",
        ],
    );
    to_client.send(()).unwrap();
    client.join().unwrap()
}

#[test]
fn xdp_reaches_a_backend_at_its_new_mac_within_the_cache_ttl() {
    // The first try goes to the old MAC and is lost; TCP resends it after its minimum RTO
    // (200 ms), by when the entry has expired. A TTL of a second or more would take 1.4 s
    // (RTOs 0.2 + 0.4 + 0.8); no expiry, forever.
    let took = query_after_mac_change("xdp", &[]);
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

#[test]
fn tc_reaches_a_backend_at_its_new_mac_within_the_cache_ttl() {
    let took = query_after_mac_change("tc", &[]);
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

#[test]
fn with_fib_every_packet_the_next_packet_goes_to_the_new_mac() {
    // Nothing is lost, so no retransmission: one round trip.
    let took = query_after_mac_change("xdp", &["--fib-every-packet"]);
    assert!(took < Duration::from_millis(150), "took {took:?}");
}
