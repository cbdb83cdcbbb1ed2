//! The one-NIC proxy (most cloud VMs): client, proxy and both servers on one L2 segment, the
//! proxy with a single interface, so every translated packet leaves by `XDP_TX`. Pinning, the
//! flip, and a bulk transfer with checksums checked at every host.

use redirect_tests::{Lab, Ns, VIP, pg};

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
    let (before, after, new_one) = pg::sessions_across_an_immediate_flip(&lab);
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
