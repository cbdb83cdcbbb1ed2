//! The XDP datapath caches each destination's next hop (`bpf_fib_lookup`'s answer) per CPU
//! for 100 ms. A neighbour that changes its MAC (a failover to another host with the same
//! address, announced by gratuitous ARP) must be reached at its new MAC within that, by a
//! connection that is already open: a cache that never re-validated would send its packets to
//! the old MAC forever.

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

#[test]
fn a_backend_that_changes_its_mac_is_reached_at_the_new_one_within_the_cache_ttl() {
    redirect_tests::require_root();
    let mut lab = Lab::new("nhop");
    lab.hook = Some("xdp");
    let _source = pg::start(&mut lab, Ns::Source, "source", &[]);
    lab.start_redirect(&[]);
    let (to_test, from_client) = std::sync::mpsc::channel::<()>();
    let (to_client, from_test) = std::sync::mpsc::channel::<()>();
    let client = lab.spawn_in_ns(Ns::Client, move || {
        rt().block_on(async move {
            let c = connect(VIP).await;
            c.simple_query("SELECT 1").await.expect("a query before");
            to_test.send(()).unwrap();
            let _ = tokio::task::spawn_blocking(move || from_test.recv()).await;
            let started = Instant::now();
            tokio::time::timeout(Duration::from_secs(10), c.simple_query("SELECT 2"))
                .await
                .expect("the query after the MAC change completes")
                .expect("and succeeds");
            started.elapsed()
        })
    });
    from_client.recv_timeout(Duration::from_secs(30)).unwrap();
    // Warm the cache, then move the source to a new MAC and announce it to the proxy.
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
    let took = client.join().unwrap();
    // At most the cache's 100 ms plus TCP's retransmission timeout (200 ms minimum, doubling):
    // well under a second. Forever without re-validation.
    assert!(
        took < Duration::from_secs(2),
        "the query after the MAC change took {took:?}"
    );
    assert!(lab.stat("fib_redirect") > 0, "XDP redirected the traffic");
}
