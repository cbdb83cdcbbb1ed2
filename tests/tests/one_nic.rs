//! The one-NIC proxy (most cloud VMs): client, proxy and both servers on one L2 segment, the
//! proxy with a single interface, so every translated packet leaves by `XDP_TX`. Pinning, the
//! flip, and a bulk transfer with checksums checked at every host.

use std::time::Duration;

use redirect_tests::{
    Lab, Ns, VIP,
    pg::{self, cluster_name, connect},
};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn a_one_nic_proxy_pins_flips_and_moves_bulk_data_over_xdp_tx() {
    redirect_tests::require_root();
    let mut lab = Lab::new_one_nic("onenic");
    // A wire-like segment, as a cloud VM's NIC: XDP, explicitly (`auto` picks TC on a veth).
    lab.hook = Some("xdp");
    let _source = pg::start(&mut lab, Ns::Source, "source", &[]);
    let _target = pg::start(&mut lab, Ns::Target, "target", &[]);
    lab.start_redirect(&[]);

    // A session opened before the flip stays on the source; new ones go to the target.
    let (flipped, wait_flip) = std::sync::mpsc::channel::<()>();
    let (opened, wait_open) = std::sync::mpsc::channel::<()>();
    let session = lab.spawn_in_ns(Ns::Client, move || {
        rt().block_on(async move {
            let c = connect(VIP).await;
            let before = cluster_name(&c).await;
            opened.send(()).unwrap();
            let _ = tokio::task::spawn_blocking(move || {
                wait_flip.recv_timeout(Duration::from_secs(60))
            })
            .await;
            (before, cluster_name(&c).await)
        })
    });
    wait_open.recv_timeout(Duration::from_secs(30)).unwrap();
    lab.redirect_ok(&["flip", "--to", "target", "--immediate"]);
    let new_one = lab.in_ns(Ns::Client, || {
        rt().block_on(async { cluster_name(&connect(VIP).await).await })
    });
    flipped.send(()).unwrap();
    let (before, after) = session.join().unwrap();
    assert_eq!(
        (before.as_str(), after.as_str()),
        ("source", "source"),
        "pinned"
    );
    assert_eq!(new_one, "target");

    // Bulk data out through the VIP, byte-identical to reading the target directly.
    let through_vip = pg::copy_out_md5(&lab, Ns::Client, VIP, 50_000);
    let direct = pg::copy_out_md5(&lab, Ns::Target, redirect_tests::TARGET_ADDR, 50_000);
    assert_eq!(through_vip, direct, "the same bytes through the VIP");
    assert!(
        lab.stat("fib_tx") > 10_000,
        "translated packets left by XDP_TX ({})",
        lab.stat("fib_tx")
    );
    assert_eq!(
        lab.stat("fib_redirect"),
        0,
        "one interface: nothing to redirect to"
    );
    for ns in [Ns::Client, Ns::Proxy, Ns::Source, Ns::Target] {
        assert_eq!(lab.csum_errors(ns), 0, "TcpInCsumErrors in {ns:?}");
    }
}
