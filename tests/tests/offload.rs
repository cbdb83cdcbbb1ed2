//! Local senders with offloads (issue 8, sections 4 and 5): clients and servers that send GSO
//! buffers with partial checksums, as containers on the proxy host do, and a proxy whose legs
//! merge frames (GRO). XDP cannot see a buffer's checksum state, so `auto` puts the datapath on
//! TC there, where the kernel's checksum helpers update partial and full checksums alike. Every
//! receiver verifies each segment (the proxy's egress completes checksums in software), so a
//! wrong checksum shows as `TcpInCsumErrors`, and the bytes are compared end to end.

use redirect_tests::{Lab, Ns, SOURCE_ADDR, TARGET_ADDR, VIP, pg};

/// About 200 MB of `COPY ... TO STDOUT` (rows of ~1 KB).
const COPY_ROWS: u32 = 205_000;
/// About 16 MB of `COPY ... FROM STDIN`.
const UPLOAD_NUMBERS: u32 = 2_000_000;

fn assert_no_checksum_errors(lab: &Lab) {
    for ns in [Ns::Client, Ns::Proxy, Ns::Source, Ns::Target] {
        assert_eq!(lab.csum_errors(ns), 0, "TcpInCsumErrors in {ns:?}");
    }
}

/// Bulk data both ways through the VIP, byte-identical to what the server holds.
fn assert_bulk_both_ways(lab: &Lab, server: Ns, server_addr: &str, rows: u32) {
    let through_vip = pg::copy_out_md5(lab, Ns::Client, VIP, rows);
    let at_server = pg::copy_out_md5(lab, server, server_addr, rows);
    assert_eq!(through_vip, at_server, "the same bytes out through the VIP");
    let n = u64::from(UPLOAD_NUMBERS);
    assert_eq!(
        pg::copy_in_sum(lab, Ns::Client, VIP, UPLOAD_NUMBERS),
        n * (n + 1) / 2,
        "every byte of the upload arrived"
    );
}

#[test]
fn gro_merged_frames_and_partial_checksums_cross_the_tc_hook_intact() {
    redirect_tests::require_root();
    let mut lab = Lab::new("offl");
    lab.enable_sender_offloads();
    let _source = pg::start(&mut lab, Ns::Source, "source", &[]);
    let _target = pg::start(&mut lab, Ns::Target, "target", &[]);
    lab.start_redirect(&[]);
    let status = lab.status();
    for leg in ["p-cli", "p-src", "p-tgt"] {
        assert_eq!(
            status["hooks"][leg], "tc",
            "auto picks TC on a veth: {status}"
        );
    }

    assert_bulk_both_ways(&lab, Ns::Source, SOURCE_ADDR, COPY_ROWS);
    assert_no_checksum_errors(&lab);
    assert!(
        lab.stat("reply_tracked") > 1_000,
        "the transfer went through the datapath ({} replies)",
        lab.stat("reply_tracked")
    );
    // GRO and TSO at work: far fewer buffers than 1,448-byte segments in 200 MB.
    assert!(
        lab.stat("reply_tracked") < 200_000_000 / 1_448,
        "merged buffers were translated whole ({} replies)",
        lab.stat("reply_tracked")
    );
}

#[test]
fn containers_on_the_proxy_bridge_pin_flip_and_move_bulk_data_intact() {
    redirect_tests::require_root();
    let mut lab = Lab::new_host_bridge("hbr");
    let _source = pg::start(&mut lab, Ns::Source, "source", &[]);
    let _target = pg::start(&mut lab, Ns::Target, "target", &[]);
    lab.start_redirect(&[]);
    assert_eq!(
        lab.status()["hooks"]["br0"],
        "tc",
        "auto picks TC on a bridge"
    );

    // A session opened before the flip stays on the source; new ones go to the target.
    let (before, after, new_one) = pg::sessions_across_an_immediate_flip(&lab);
    assert_eq!(
        (before.as_str(), after.as_str()),
        ("source", "source"),
        "pinned"
    );
    assert_eq!(new_one, "target");

    assert_bulk_both_ways(&lab, Ns::Target, TARGET_ADDR, COPY_ROWS / 4);
    assert_no_checksum_errors(&lab);
    assert!(
        lab.stat("fib_tx") > 1_000,
        "translated buffers went back out of br0 ({})",
        lab.stat("fib_tx")
    );
}
