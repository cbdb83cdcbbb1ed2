//! Each rare datapath event reaches the controller's log with the flow's address: caused for
//! real (ports run out, the table fills, the parked-SYN ring overflows) or by writing the maps
//! as a stuck controller or a bad hand edit would leave them.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

use redirect::datapath::Maps;
use redirect_common::{
    ct::{CtEntry, CtKey},
    cutover::Cutover,
    limits,
};
use redirect_tests::{
    CLIENT_ADDR, Lab, Ns, PG_PORT, VIP, churn,
    packet::{self, SYN, Tcp},
    require_root, wait_for,
};

fn vip() -> SocketAddr {
    format!("{VIP}:{PG_PORT}").parse().unwrap()
}

/// Tries to connect from the client namespace with a short timeout; the outcome is not the
/// point, the SYN is.
fn knock(lab: &Lab) -> Option<TcpStream> {
    lab.in_ns(Ns::Client, || {
        TcpStream::connect_timeout(&vip(), Duration::from_millis(300)).ok()
    })
}

fn expect_logged(lab: &Lab, what: &str) {
    wait_for(Duration::from_secs(5), what, || {
        lab.last_redirect_log()
            .lines()
            .any(|l| l.contains(what) && l.contains(CLIENT_ADDR))
    });
}

#[test]
fn every_rare_datapath_event_reaches_the_controller_log() {
    require_root();
    let mut lab = Lab::new("events");
    let _echo = churn::EchoServer::start(&lab, Ns::Source, 4, Duration::from_secs(120));
    lab.start_redirect(&["--snat-ports", "40000-40001"]);
    let mut maps = Maps::open(&lab.pin_dir).unwrap();

    // No SNAT port: two connections hold the two ports, the third SYN has none.
    let held: Vec<TcpStream> = (0..2).filter_map(|_| knock(&lab)).collect();
    assert_eq!(held.len(), 2);
    assert!(knock(&lab).is_none());
    expect_logged(&lab, "no free SNAT port");
    drop(held);

    // A bad ACTIVE value.
    maps.active.set(0, 7, 0).unwrap();
    assert!(knock(&lab).is_none());
    expect_logged(&lab, "ACTIVE names a backend that is not configured");
    maps.active.set(0, 0, 0).unwrap();

    // A cutover lease that ran out in the kernel while the fenced backend is still active.
    let lapsed = Cutover {
        hold_until_ns: 1,
        fence_until_ns: 1,
        fenced_backend: 0,
        flags: 0,
    };
    maps.cutover.set(0, lapsed, 0).unwrap();
    let _ = knock(&lab);
    expect_logged(&lab, "lease expired in the kernel");

    // A hold nobody drains: more SYNs than the parked-SYN ring holds.
    let parked_forever = Cutover {
        hold_until_ns: u64::MAX,
        fence_until_ns: u64::MAX,
        fenced_backend: 0,
        flags: 0,
    };
    maps.cutover.set(0, parked_forever, 0).unwrap();
    let (client, vip_ip): (Ipv4Addr, Ipv4Addr) =
        (CLIENT_ADDR.parse().unwrap(), VIP.parse().unwrap());
    lab.in_ns(Ns::Client, move || {
        packet::send_raw((0..2500u16).map(|i| {
            packet::tcp_frame_at(
                Tcp {
                    src: client,
                    sport: 20_000 + i,
                    dst: vip_ip,
                    dport: PG_PORT,
                    flags: SYN,
                },
                1,
                0,
                b"",
            )
        }))
    });
    expect_logged(&lab, "parked-SYN ring is full");
    maps.cutover.set(0, Cutover::IDLE, 0).unwrap();

    // A full connection table: fill CT from here with established, fresh entries (which the
    // controller's GC leaves alone), then one more SYN.
    let vip_be = u32::from(vip_ip).to_be();
    let live = CtEntry {
        created_ns: redirect::clock::monotonic_ns(),
        last_seen_ns: redirect::clock::monotonic_ns() + 3_600_000_000_000,
        flags: redirect_common::ct::FLAG_SEEN_NON_SYN,
        ..CtEntry::default()
    };
    for i in 0..limits::CT_ENTRIES {
        let key = CtKey {
            client_addr_be: (0xc613_0000u32 + (i >> 12)).to_be(),
            vip_addr_be: vip_be,
            client_port_be: u16::try_from(i & 0xfff).unwrap().to_be(),
            vip_port_be: PG_PORT.to_be(),
        };
        if maps.ct.insert(key, live, 0).is_err() {
            break; // full
        }
    }
    // Room in the port range for the claim, so the table is what refuses it.
    assert!(knock(&lab).is_none());
    expect_logged(&lab, "connection table is full");
    assert!(lab.stat("ct_full") > 0);
}
