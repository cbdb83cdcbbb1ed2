//! Path MTU discovery through the proxy. The proxy's routes to the client and to the source
//! carry an MTU of 1280 (as a tunnel or VPN hop would), while every interface stays at 1500,
//! so both servers and clients start with 1460-byte segments. XDP forwards without the stack's
//! MTU check, so the datapath itself must answer a too-big packet with fragmentation-needed,
//! quoting it as its sender sent it; otherwise large results hang.

use redirect_tests::{Lab, Ns, VIP, pg, require_root};

fn psql_via_vip(lab: &Lab, args: &[&str]) -> std::process::Output {
    let mut cmd = lab.cmd(
        Ns::Client,
        &[
            "timeout",
            "60",
            "psql",
            "-X",
            "-q",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            VIP,
            "-U",
            "postgres",
            "-d",
            "postgres",
        ],
    );
    cmd.args(args);
    cmd.output().expect("psql")
}

#[test]
fn large_results_and_large_writes_cross_a_1280_byte_hop() {
    require_root();
    let mut lab = Lab::new("pmtu");
    let _source = pg::start(&mut lab, Ns::Source, "source", &[]);
    lab.start_redirect(&[]);
    for (net, dev, src) in [
        ("198.18.1.0/24", "p-cli", "198.18.1.1"),
        ("198.18.2.0/24", "p-src", "198.18.2.1"),
    ] {
        lab.exec_ok(
            Ns::Proxy,
            &[
                "ip", "route", "replace", net, "dev", dev, "proto", "kernel", "scope", "link",
                "src", src, "mtu", "lock", "1280",
            ],
        );
    }
    // Backend → client: a 10 MB value in full-size segments.
    let out = psql_via_vip(&lab, &["-c", "SELECT repeat('x', 10000000)"]);
    assert!(
        out.status.success(),
        "SELECT through the VIP failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.stdout.len(),
        10_000_001,
        "the whole value arrived (and a newline)"
    );
    assert!(out.stdout[..10_000_000].iter().all(|&b| b == b'x'));
    // Client → backend: a 2 MB literal in one statement.
    let file = lab.work_dir.join("big-insert.sql");
    std::fs::write(
        &file,
        format!(
            "CREATE TABLE big (t text); INSERT INTO big VALUES ('{}'); SELECT length(t) FROM big;",
            "y".repeat(2_000_000)
        ),
    )
    .unwrap();
    let out = psql_via_vip(&lab, &["-f", &file.display().to_string()]);
    assert!(
        out.status.success(),
        "INSERT through the VIP failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2000000");
    let sent = lab.stat("frag_needed_sent");
    assert!(
        sent >= 2,
        "fragmentation-needed went to both senders ({sent})"
    );
    assert_eq!(lab.csum_errors(Ns::Client), 0);
    assert_eq!(lab.csum_errors(Ns::Source), 0);
}
