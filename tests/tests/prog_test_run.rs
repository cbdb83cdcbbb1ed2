//! L1: the datapath program run by the kernel on crafted packets (`BPF_PROG_TEST_RUN`), with
//! its maps seeded and inspected from user space. Each test runs in a fresh network namespace,
//! so `bpf_fib_lookup` finds no route and the program takes its `XDP_PASS` fallback with the
//! packet already rewritten; that is what lets the tests read the rewrite.
//! Every packet the program rewrites is run with repeat = 1 (a repeat would re-run on the
//! rewritten bytes).

use std::net::Ipv4Addr;

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions, Xdp},
};
use redirect_common::{
    backend::{Backend, SOURCE, TARGET},
    config::{Config, FLAG_CONFIGURED, FLAG_DROP_NONSYN_MISS},
    ct::{
        CtEntry, CtKey, FLAG_BACKEND_CLOSED_FIRST, FLAG_FIN_BACKEND, FLAG_FIN_CLIENT,
        FLAG_REOPENED, FLAG_RST, FLAG_SEEN_NON_SYN, FLAG_SYNACK_SEEN,
    },
    rev::{RevEntry, RevKey},
    stats::Stat,
};
use redirect_tests::packet::{self, ACK, FIN, PSH, RST, SYN, Tcp};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const C1: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
const C2: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 3);
const SRC: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
const SRC_SNAT: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
const TGT: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 2);
const TGT_SNAT: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 1);

fn be(ip: Ipv4Addr) -> u32 {
    u32::from(ip).to_be()
}

struct Prog {
    ebpf: Ebpf,
}

impl Prog {
    /// Loads the datapath into a fresh netns (this thread only) with the lab's addresses.
    fn new(ports: (u16, u16), flags: u32) -> Self {
        redirect_tests::require_root();
        // SAFETY: affects only this test's thread.
        assert_eq!(
            unsafe { libc::unshare(libc::CLONE_NEWNET) },
            0,
            "unshare(CLONE_NEWNET)"
        );
        let mut ebpf =
            Ebpf::load(redirect::datapath::object()).expect("loading the datapath object");
        let prog: &mut Xdp = ebpf
            .program_mut("redirect_xdp")
            .unwrap()
            .try_into()
            .unwrap();
        prog.load().expect("the verifier accepts the datapath");
        let mut p = Self { ebpf };
        let mut backends: Array<&mut MapData, Backend> = p.map("BACKENDS");
        for (i, (ip, snat)) in [(SOURCE, (SRC, SRC_SNAT)), (TARGET, (TGT, TGT_SNAT))] {
            backends
                .set(
                    i,
                    Backend {
                        addr_be: be(ip),
                        snat_addr_be: be(snat),
                        port_be: 5432u16.to_be(),
                        _pad0: 0,
                    },
                    0,
                )
                .unwrap();
        }
        let mut config: Array<&mut MapData, Config> = p.map("CONFIG");
        config
            .set(
                0,
                Config {
                    vip_addr_be: be(VIP),
                    vip_port_be: 5432u16.to_be(),
                    _pad0: 0,
                    snat_port_min: ports.0,
                    snat_port_max: ports.1,
                    flags: FLAG_CONFIGURED | flags,
                },
                0,
            )
            .unwrap();
        p.flip(SOURCE);
        // As `install` does: an all-zero CUTOVER would name backend 0 as fenced.
        let mut cut: Array<&mut MapData, redirect_common::cutover::Cutover> = p.map("CUTOVER");
        cut.set(0, redirect_common::cutover::Cutover::IDLE, 0)
            .unwrap();
        p
    }

    fn map<'a, T: TryFrom<&'a mut aya::maps::Map>>(&'a mut self, name: &str) -> T
    where
        T::Error: std::fmt::Debug,
    {
        self.ebpf
            .map_mut(name)
            .unwrap_or_else(|| panic!("map {name}"))
            .try_into()
            .unwrap()
    }

    fn flip(&mut self, to: u32) {
        let mut active: Array<&mut MapData, u32> = self.map("ACTIVE");
        active.set(0, to, 0).unwrap();
    }

    /// Runs one frame through the program; returns the verdict and the frame after it.
    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut("redirect_xdp")
            .unwrap()
            .try_into()
            .unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..TestRunOptions::default()
        };
        let r = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    /// Runs a TCP frame that must be translated; returns what came out, checked.
    fn translate(&mut self, t: Tcp) -> Tcp {
        self.translate_with(t, 1000, packet::ACK_NUMBER, b"payload")
    }

    /// [`Self::translate`] with given sequence and acknowledgement numbers, and no payload.
    fn translate_at(&mut self, t: Tcp, seq: u32, ack: u32) -> Tcp {
        self.translate_with(t, seq, ack, b"")
    }

    fn translate_with(&mut self, t: Tcp, seq: u32, ack: u32, payload: &[u8]) -> Tcp {
        let (verdict, out) = self.run(&packet::tcp_frame_at(t, seq, ack, payload));
        assert_eq!(
            verdict, XDP_PASS,
            "no route in the test netns: rewritten, then passed"
        );
        let (got, csum_ok) = packet::parse(&out);
        assert!(
            csum_ok,
            "checksums of {got:?} are valid after the incremental update"
        );
        got
    }

    fn stat(&mut self, s: Stat) -> u64 {
        let stats: PerCpuArray<&mut MapData, u64> = self.map("STATS");
        stats.get(&(s as u32), 0).unwrap().iter().sum()
    }

    fn ct(&mut self, client: Ipv4Addr, port: u16) -> Option<CtEntry> {
        let ct: HashMap<&mut MapData, CtKey, CtEntry> = self.map("CT");
        ct.get(
            &CtKey {
                client_addr_be: be(client),
                vip_addr_be: be(VIP),
                client_port_be: port.to_be(),
                vip_port_be: 5432u16.to_be(),
            },
            0,
        )
        .ok()
    }

    fn rev_len(&mut self) -> usize {
        let rev: HashMap<&mut MapData, RevKey, RevEntry> = self.map("REV");
        rev.keys().count()
    }
}

fn syn(client: Ipv4Addr, port: u16) -> Tcp {
    Tcp {
        src: client,
        sport: port,
        dst: VIP,
        dport: 5432,
        flags: SYN,
    }
}

#[test]
fn syn_goes_to_the_active_backend_with_full_nat() {
    let mut p = Prog::new((40000, 59999), 0);
    let out = p.translate(syn(C1, 45000));
    assert_eq!(
        out,
        Tcp {
            src: SRC_SNAT,
            sport: 45000,
            dst: SRC,
            dport: 5432,
            flags: SYN
        },
        "client port kept inside the range"
    );
    let e = p.ct(C1, 45000).expect("the SYN created a CT entry");
    assert_eq!(
        (
            e.backend_id,
            e.backend_addr_be,
            u16::from_be(e.snat_port_be)
        ),
        (SOURCE, be(SRC), 45000)
    );
    assert_eq!(p.rev_len(), 1);
    assert_eq!(p.stat(Stat::NewConnSource), 1);
}

#[test]
fn flip_moves_new_syns_but_not_a_retransmitted_first_syn() {
    let mut p = Prog::new((40000, 59999), 0);
    let first = p.translate(syn(C1, 45000));
    assert_eq!(first.dst, SRC);
    p.flip(TARGET);
    let other = p.translate(syn(C2, 45001));
    assert_eq!(
        (other.src, other.dst),
        (TGT_SNAT, TGT),
        "a new connection after the flip goes to the target"
    );
    let retransmit = p.translate(syn(C1, 45000));
    assert_eq!(
        retransmit, first,
        "the retransmitted SYN keeps its backend and SNAT port"
    );
    let data = p.translate(Tcp {
        flags: ACK | PSH,
        ..syn(C1, 45000)
    });
    assert_eq!(
        (data.dst, data.sport),
        (SRC, 45000),
        "established packets stay on the source"
    );
    assert_eq!(
        (
            p.stat(Stat::NewConnSource),
            p.stat(Stat::NewConnTarget),
            p.stat(Stat::ForwardTracked)
        ),
        (1, 1, 2)
    );
}

#[test]
fn reply_is_rewritten_back_to_vip_and_client() {
    let mut p = Prog::new((40000, 59999), 0);
    let fwd = p.translate_at(syn(C1, 1234), 1000, 0); // outside the range: a random SNAT port
    assert!((40000..=59999).contains(&fwd.sport));
    let reply = p.translate_at(
        Tcp {
            src: SRC,
            sport: 5432,
            dst: SRC_SNAT,
            dport: fwd.sport,
            flags: SYN | ACK,
        },
        5000,
        1001,
    );
    assert_eq!(
        reply,
        Tcp {
            src: VIP,
            sport: 5432,
            dst: C1,
            dport: 1234,
            flags: SYN | ACK
        }
    );
    assert_eq!(p.stat(Stat::ReplyTracked), 1);
    let e = p.ct(C1, 1234).unwrap();
    assert_eq!(
        e.flags & (FLAG_SEEN_NON_SYN | FLAG_SYNACK_SEEN),
        FLAG_SYNACK_SEEN,
        "a SYN-ACK alone leaves the entry half-open"
    );
}

#[test]
fn same_client_port_from_two_clients_gets_distinct_snat_ports() {
    let mut p = Prog::new((40000, 59999), 0);
    let a = p.translate(syn(C1, 45000));
    let b = p.translate(syn(C2, 45000));
    assert_eq!(a.sport, 45000);
    assert_ne!(
        a.sport, b.sport,
        "both map to (SNAT, source): the REV claim forces another port"
    );
    assert!(
        (40000..=59999).contains(&b.sport),
        "a random probe inside the range"
    );
    // Each reply finds its own client.
    let ra = p.translate(Tcp {
        src: SRC,
        sport: 5432,
        dst: SRC_SNAT,
        dport: a.sport,
        flags: SYN | ACK,
    });
    let rb = p.translate(Tcp {
        src: SRC,
        sport: 5432,
        dst: SRC_SNAT,
        dport: b.sport,
        flags: SYN | ACK,
    });
    assert_eq!((ra.dst, rb.dst), (C1, C2));
}

#[test]
fn untracked_non_syn_is_never_forwarded() {
    let mut p = Prog::new((40000, 59999), 0);
    let frame = packet::tcp_frame(
        Tcp {
            flags: ACK,
            ..syn(C1, 45000)
        },
        b"x",
    );
    let (verdict, out) = p.run(&frame);
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(
        out, frame,
        "passed to the stack untouched (it answers with a RST)"
    );
    assert_eq!(p.stat(Stat::NonSynMiss), 1);
    assert!(p.ct(C1, 45000).is_none(), "only a pure SYN creates state");
    for flags in [SYN | ACK, FIN | ACK, packet::RST] {
        let (_, out) = p.run(&packet::tcp_frame(
            Tcp {
                flags,
                ..syn(C1, 45000)
            },
            b"",
        ));
        assert_eq!(
            packet::parse(&out).0.dst,
            VIP,
            "flags {flags:#x} never open a connection"
        );
    }
    assert_eq!(p.rev_len(), 0);

    let mut strict = Prog::new((40000, 59999), FLAG_DROP_NONSYN_MISS);
    assert_eq!(strict.run(&frame).0, XDP_DROP);
}

/// The backend's side of `syn(client, port)` through SNAT port `snat_port` of the source.
fn from_source(snat_port: u16, flags: u8) -> Tcp {
    Tcp {
        src: SRC,
        sport: 5432,
        dst: SRC_SNAT,
        dport: snat_port,
        flags,
    }
}

/// Client ISN 1000 and backend ISN 5000: SYN, SYN-ACK, ACK. Returns the SNAT port.
fn handshake(p: &mut Prog, client: Ipv4Addr, port: u16) -> u16 {
    let snat = p.translate_at(syn(client, port), 1000, 0).sport;
    p.translate_at(from_source(snat, SYN | ACK), 5000, 1001);
    p.translate_at(
        Tcp {
            flags: ACK,
            ..syn(client, port)
        },
        1001,
        5001,
    );
    snat
}

/// Closes a connection set up by [`handshake`], `client_first` or not.
fn close(p: &mut Prog, client: Ipv4Addr, port: u16, snat: u16, client_first: bool) {
    let client_fin = Tcp {
        flags: FIN | ACK,
        ..syn(client, port)
    };
    if client_first {
        p.translate_at(client_fin, 1001, 5001);
        p.translate_at(from_source(snat, FIN | ACK), 5001, 1002);
    } else {
        p.translate_at(from_source(snat, FIN | ACK), 5001, 1001);
        p.translate_at(client_fin, 1001, 5002);
    }
    let closed = p.ct(client, port).unwrap();
    assert_eq!(
        closed.flags & (FLAG_FIN_CLIENT | FLAG_FIN_BACKEND | FLAG_BACKEND_CLOSED_FIRST),
        FLAG_FIN_CLIENT
            | FLAG_FIN_BACKEND
            | if client_first {
                0
            } else {
                FLAG_BACKEND_CLOSED_FIRST
            }
    );
}

#[test]
fn a_syn_after_a_close_the_client_started_reopens_with_the_port_released_at_once() {
    let mut p = Prog::new((40000, 59999), 0);
    let first = handshake(&mut p, C1, 45000);
    close(&mut p, C1, 45000, first, true);
    p.flip(TARGET);
    let again = p.translate_at(syn(C1, 45000), 90_000, 0);
    assert_eq!(again.dst, TGT, "port reuse after close is a new connection");
    let e = p.ct(C1, 45000).unwrap();
    assert_eq!((e.backend_id, e.flags), (TARGET, FLAG_REOPENED));
    assert_eq!(
        p.rev_len(),
        1,
        "the old SNAT port was freed, not quarantined"
    );
    assert_eq!(p.stat(Stat::PortReleased), 1);
    // A late packet from the old backend on the old port is not sent to the client.
    let (verdict, late) = p.run(&packet::tcp_frame(from_source(first, ACK), b""));
    assert_eq!((verdict, packet::parse(&late).0.dst), (XDP_PASS, SRC_SNAT));
    assert_eq!(p.stat(Stat::PassNotOurs), 1);
}

#[test]
fn a_syn_after_a_close_the_backend_started_leaves_the_old_port_quarantined() {
    let mut p = Prog::new((40000, 59999), 0);
    let first = handshake(&mut p, C1, 45000);
    close(&mut p, C1, 45000, first, false);
    p.flip(TARGET);
    let again = p.translate_at(syn(C1, 45000), 90_000, 0);
    assert_eq!(again.dst, TGT);
    assert_eq!(
        p.rev_len(),
        2,
        "the backend holds TIME_WAIT on the old port: it stays claimed"
    );
    assert_eq!(p.stat(Stat::PortReleased), 0);
    let (verdict, late) = p.run(&packet::tcp_frame(from_source(first, ACK), b""));
    assert_eq!((verdict, packet::parse(&late).0.dst), (XDP_PASS, SRC_SNAT));
    assert_eq!(p.stat(Stat::ReplyOrphan), 1);
}

#[test]
fn only_the_clients_ack_of_the_synack_establishes() {
    let mut p = Prog::new((40000, 59999), 0);
    let snat = p.translate_at(syn(C1, 45000), 1000, 0).sport;
    p.translate_at(from_source(snat, SYN | ACK), 5000, 1001);
    // A blind ACK (a flood's third packet) that does not acknowledge the SYN-ACK.
    p.translate_at(
        Tcp {
            flags: ACK,
            ..syn(C1, 45000)
        },
        1001,
        777,
    );
    assert_eq!(p.ct(C1, 45000).unwrap().flags & FLAG_SEEN_NON_SYN, 0);
    assert_eq!(p.stat(Stat::HandshakeCompleted), 0);
    p.translate_at(
        Tcp {
            flags: ACK,
            ..syn(C1, 45000)
        },
        1001,
        5001,
    );
    assert_ne!(p.ct(C1, 45000).unwrap().flags & FLAG_SEEN_NON_SYN, 0);
    assert_eq!(p.stat(Stat::HandshakeCompleted), 1);
}

#[test]
fn a_blind_rst_then_syn_cannot_detach_a_live_connection() {
    let mut p = Prog::new((40000, 59999), 0);
    let snat = handshake(&mut p, C1, 45000);
    p.flip(TARGET);
    // An attacker spoofing the client: a RST with a guessed sequence number, then a SYN.
    for seq in [0, 1000, 1002, 70_000, u32::MAX] {
        let (verdict, _) = p.run(&packet::tcp_frame_at(
            Tcp {
                flags: RST,
                ..syn(C1, 45000)
            },
            seq,
            0,
            b"",
        ));
        assert_eq!(
            verdict, XDP_DROP,
            "out-of-window RST (seq {seq}) is dropped"
        );
    }
    // And spoofing the backend.
    let (verdict, _) = p.run(&packet::tcp_frame_at(
        from_source(snat, RST | ACK),
        9,
        0,
        b"",
    ));
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(p.stat(Stat::RstOutOfWindow), 6);
    assert_eq!(p.ct(C1, 45000).unwrap().flags & FLAG_RST, 0);
    let out = p.translate_at(syn(C1, 45000), 123_456, 0);
    assert_eq!(
        (out.dst, out.sport),
        (SRC, snat),
        "a SYN on a live connection stays on its backend, never reopens"
    );
    assert_eq!(p.stat(Stat::SynOnLive), 1);
    assert_eq!(p.stat(Stat::ConnReopened), 0);
    // The client's own RST, at the sequence number the backend expects, does close it.
    p.translate_at(
        Tcp {
            flags: RST,
            ..syn(C1, 45000)
        },
        1001,
        0,
    );
    assert_ne!(p.ct(C1, 45000).unwrap().flags & FLAG_RST, 0);
    assert_eq!(p.translate_at(syn(C1, 45000), 200_000, 0).dst, TGT);
}

#[test]
fn snat_exhaustion_drops_the_syn_and_counts_it() {
    let mut p = Prog::new((50000, 50000), 0);
    assert_eq!(p.translate(syn(C1, 1111)).sport, 50000);
    let (verdict, _) = p.run(&packet::tcp_frame(syn(C2, 1111), b""));
    assert_eq!(
        verdict, XDP_DROP,
        "no port left: drop the SYN (the client retries), never evict"
    );
    assert_eq!(p.stat(Stat::SnatExhausted), 1);
    assert!(p.ct(C2, 1111).is_none());
}

#[test]
fn everything_else_passes_untouched() {
    let mut p = Prog::new((40000, 59999), 0);
    let base = packet::tcp_frame(syn(C1, 45000), b"");
    let mut cases: Vec<(&str, Vec<u8>, Stat)> = Vec::new();

    let mut options = base.clone();
    options[14] = 0x46; // IHL 6: one option word
    options.splice(34..34, [1u8, 1, 1, 0]);
    cases.push(("ip options", options, Stat::PassIpOptions));

    let mut fragment = base.clone();
    fragment[20] = 0x20; // MF
    cases.push(("fragment", fragment.clone(), Stat::PassFragment));
    fragment[20] = 0x00;
    fragment[21] = 0x10; // offset
    cases.push(("later fragment", fragment, Stat::PassFragment));

    let mut udp = base.clone();
    udp[23] = 17;
    cases.push(("udp", udp, Stat::PassNotTcp));

    let mut arp = base.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    cases.push(("arp", arp, Stat::PassNotIpv4));

    let mut ipv6 = base.clone();
    ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    cases.push(("ipv6", ipv6, Stat::PassNotIpv4));

    cases.push((
        "truncated tcp",
        base[..14 + 20 + 10].to_vec(),
        Stat::PassTruncated,
    ));
    cases.push((
        "truncated ip",
        base[..14 + 12].to_vec(),
        Stat::PassTruncated,
    ));
    let mut short_total = base.clone();
    short_total[16..18].copy_from_slice(&30u16.to_be_bytes());
    cases.push((
        "ip total length too short",
        short_total,
        Stat::PassTruncated,
    ));

    for (name, frame, stat) in cases {
        let before = p.stat(stat);
        let (verdict, out) = p.run(&frame);
        assert_eq!(verdict, XDP_PASS, "{name}");
        assert_eq!(out, frame, "{name}: untouched");
        assert_eq!(p.stat(stat), before + 1, "{name}: counted as {stat:?}");
    }
    assert!(p.ct(C1, 45000).is_none());
}

#[test]
fn a_hold_parks_new_syns_and_a_fence_drops_client_data_of_the_fenced_backend() {
    use aya::maps::RingBuf;
    use redirect_common::cutover::{Cutover, HeldSyn, NO_FENCE};
    let mut p = Prog::new((40000, 59999), 0);
    let established = p.translate(syn(C1, 45000));
    assert_eq!(established.dst, SRC);
    {
        let mut cut: Array<&mut MapData, Cutover> = p.map("CUTOVER");
        cut.set(
            0,
            Cutover {
                hold_until_ns: u64::MAX,
                fence_until_ns: u64::MAX,
                fenced_backend: SOURCE,
                flags: 0,
            },
            0,
        )
        .unwrap();
    }
    // A new connection's SYN is parked, untouched.
    let frame = packet::tcp_frame(syn(C2, 45001), b"");
    assert_eq!(p.run(&frame).0, XDP_DROP);
    assert!(p.ct(C2, 45001).is_none(), "a held SYN creates no state");
    assert_eq!(p.stat(Stat::SynHeld), 1);
    let mut ring: RingBuf<&mut MapData> = p.map("HELD");
    let item = ring.next().expect("the SYN is in HELD");
    assert_eq!(item.len(), std::mem::size_of::<HeldSyn>());
    // SAFETY: the datapath wrote a HeldSyn.
    let held: HeldSyn = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
    assert_eq!(
        &held.frame[..held.len as usize],
        &frame[..],
        "the frame is parked byte for byte"
    );
    drop(item);
    drop(ring);
    // Data from a client of the fenced source is dropped; a bare ACK or FIN still passes.
    let (v, _) = p.run(&packet::tcp_frame(
        Tcp {
            flags: ACK | PSH,
            ..syn(C1, 45000)
        },
        b"INSERT",
    ));
    assert_eq!(v, XDP_DROP, "a query to the fenced server never arrives");
    assert_eq!(p.stat(Stat::Fenced), 1);
    assert_ne!(
        p.ct(C1, 45000).unwrap().flags & redirect_common::ct::FLAG_FENCED,
        0,
        "marked for the drain"
    );
    assert_eq!(
        u32::from_be(p.ct(C1, 45000).unwrap().fenced_ack_be),
        packet::ACK_NUMBER,
        "the client's ACK number is kept for a reset"
    );
    for flags in [ACK, FIN | ACK] {
        let (v, out) = p.run(&packet::tcp_frame(
            Tcp {
                flags,
                ..syn(C1, 45000)
            },
            b"",
        ));
        assert_eq!(
            (v, packet::parse(&out).0.dst),
            (XDP_PASS, SRC),
            "a bare {flags:#x} passes the fence"
        );
    }
    // Replies from the fenced server still reach the client.
    let reply = p.translate(Tcp {
        src: SRC,
        sport: 5432,
        dst: SRC_SNAT,
        dport: established.sport,
        flags: ACK | PSH,
    });
    assert_eq!(reply.dst, C1);
    // Lifting the hold: new SYNs go to ACTIVE again.
    {
        let mut cut: Array<&mut MapData, Cutover> = p.map("CUTOVER");
        cut.set(
            0,
            Cutover {
                hold_until_ns: 0,
                fence_until_ns: 0,
                fenced_backend: NO_FENCE,
                flags: 0,
            },
            0,
        )
        .unwrap();
    }
    assert_eq!(p.translate(syn(C2, 45001)).dst, SRC);
}

/// The flip and the fence are one atomic datapath state: the `ACTIVE` write alone lifts the
/// hold and makes the old server's fence permanent, so a controller that dies right after it
/// (before any other write), and whose lease then lapses, leaves no moment when clients of
/// the old server and of the new one can both write. Flipping back lifts the stale fence.
#[test]
fn the_active_write_alone_flips_lifts_the_hold_and_makes_the_fence_permanent() {
    use redirect_common::cutover::Cutover;
    let mut p = Prog::new((40000, 59999), 0);
    assert_eq!(p.translate(syn(C1, 45000)).dst, SRC);
    let set_cutover = |p: &mut Prog, until: u64| {
        let mut cut: Array<&mut MapData, Cutover> = p.map("CUTOVER");
        cut.set(
            0,
            Cutover {
                hold_until_ns: until,
                fence_until_ns: until,
                fenced_backend: SOURCE,
                flags: 0,
            },
            0,
        )
        .unwrap();
    };
    let query = |p: &mut Prog| {
        p.run(&packet::tcp_frame(
            Tcp {
                flags: ACK | PSH,
                ..syn(C1, 45000)
            },
            b"INSERT",
        ))
        .0
    };
    // Before the flip, under a live lease: new SYNs held, the source fenced.
    set_cutover(&mut p, u64::MAX);
    assert_eq!(p.run(&packet::tcp_frame(syn(C2, 45001), b"")).0, XDP_DROP);
    assert_eq!(query(&mut p), XDP_DROP);
    // Only ACTIVE is written: new connections go to the target at once, the hold no longer
    // applies, and the source stays fenced.
    p.flip(TARGET);
    assert_eq!(p.translate(syn(C2, 45002)).dst, TGT);
    assert_eq!(query(&mut p), XDP_DROP);
    // The controller died there and its lease lapsed: the fence on the old server holds.
    set_cutover(&mut p, 1);
    assert_eq!(query(&mut p), XDP_DROP, "no split after a lapsed lease");
    // A lapsed lease before the flip (ACTIVE still the source) lifts the fence instead.
    p.flip(SOURCE);
    assert_ne!(
        query(&mut p),
        XDP_DROP,
        "the stale fence on an active backend is lifted"
    );
    assert_eq!(p.translate(syn(C2, 45003)).dst, SRC, "and nothing is held");
}

/// xorshift64*: reproducible noise without a dependency.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[usize::try_from(self.next() % from.len() as u64).unwrap()]
    }
}

#[allow(
    clippy::cast_possible_truncation,
    reason = "noise: truncating random numbers is the point"
)]
/// Random frames, and random TCP segments on a few colliding tuples in both directions: the
/// program never fails, and nothing reaches a backend unless its tuple was opened by a pure
/// SYN that the program tracked.
#[test]
fn random_frames_never_reach_a_backend_without_a_tracked_syn() {
    let mut p = Prog::new((40000, 40063), 0);
    let mut noise = Noise(0x5eed_1234_abcd_0001);
    let mut opened = std::collections::HashSet::new();
    for round in 0..20_000u32 {
        if round % 10 == 0 {
            // Raw noise of any length the kernel runs (an Ethernet header at least): never a
            // failure, never rewritten.
            let len = 14 + usize::try_from(noise.next() % 120).unwrap();
            let mut frame: Vec<u8> = (0..len).map(|_| noise.next() as u8).collect();
            if noise.next().is_multiple_of(2) {
                frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
            }
            let (verdict, out) = p.run(&frame);
            assert!(
                verdict == XDP_DROP || verdict == XDP_PASS,
                "verdict {verdict}"
            );
            assert!(
                !(verdict == XDP_PASS && out.len() >= 34 && out != frame),
                "noise was rewritten: {frame:02x?} -> {out:02x?}"
            );
            continue;
        }
        let flags = noise.pick(&[
            SYN,
            SYN,
            SYN | ACK,
            ACK,
            ACK | PSH,
            FIN | ACK,
            RST,
            RST | ACK,
            0,
            0xff,
        ]);
        let (seq, ack) = (noise.next() as u32 % 4096, noise.next() as u32 % 4096);
        let client = noise.pick(&[C1, C2]);
        let cport = noise.pick(&[40000u16, 40001, 1111]);
        let t = if noise.next().is_multiple_of(3) {
            // From a backend toward a SNAT port in (and just outside) the range.
            let src = noise.pick(&[SRC, TGT]);
            Tcp {
                src,
                sport: 5432,
                dst: if src == SRC { SRC_SNAT } else { TGT_SNAT },
                dport: 40000 + u16::try_from(noise.next() % 70).unwrap(),
                flags,
            }
        } else {
            Tcp {
                src: client,
                sport: cport,
                dst: VIP,
                dport: 5432,
                flags,
            }
        };
        if round % 500 == 0 {
            p.flip(noise.pick(&[SOURCE, TARGET]));
        }
        let (verdict, out) = p.run(&packet::tcp_frame_at(t, seq, ack, b""));
        assert!(
            verdict == XDP_DROP || verdict == XDP_PASS,
            "verdict {verdict}"
        );
        if verdict == XDP_DROP {
            continue;
        }
        let (got, csum_ok) = packet::parse(&out);
        assert!(csum_ok, "checksums after {t:?} -> {got:?}");
        if t.dst == VIP && (got.dst == SRC || got.dst == TGT) {
            if t.flags & (SYN | ACK | RST | FIN) == SYN {
                opened.insert((client, cport));
            }
            assert!(
                opened.contains(&(client, cport)),
                "{t:?} reached a backend without a tracked SYN"
            );
        }
        if got.dst == C1 || got.dst == C2 {
            assert_eq!(
                (got.src, got.sport),
                (VIP, 5432),
                "a reply comes from the VIP"
            );
        }
    }
    assert!(!opened.is_empty());
}

const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 9, 9);

#[test]
fn icmp_errors_about_a_tracked_connection_are_translated_both_ways() {
    let mut p = Prog::new((40000, 59999), 0);
    let snat = handshake(&mut p, C1, 45000);
    // A router between the proxy and the source: fragmentation needed for a packet this host
    // sent to the source from the SNAT port. It belongs to the client, as the client sent it.
    let frame = packet::icmp_error_frame(
        ROUTER,
        SRC_SNAT,
        3,
        4,
        1280,
        Tcp {
            src: SRC_SNAT,
            sport: snat,
            dst: SRC,
            dport: 5432,
            flags: ACK,
        },
    );
    let (verdict, out) = p.run(&frame);
    assert_eq!(
        verdict, XDP_PASS,
        "rewritten, then no route in the test netns"
    );
    let seen = packet::parse_icmp(&out);
    assert_eq!(
        seen,
        packet::IcmpSeen {
            src: ROUTER,
            dst: C1,
            kind: 3,
            code: 4,
            mtu: 1280,
            quoted: Tcp {
                src: C1,
                sport: 45000,
                dst: VIP,
                dport: 5432,
                flags: 0
            },
            checksums_ok: true,
        }
    );
    // A router on the client's side: time exceeded for a packet the VIP sent to the client.
    // It belongs to the source, which sent it to the SNAT port.
    let frame = packet::icmp_error_frame(
        ROUTER,
        VIP,
        11,
        0,
        0,
        Tcp {
            src: VIP,
            sport: 5432,
            dst: C1,
            dport: 45000,
            flags: ACK,
        },
    );
    let seen = packet::parse_icmp(&p.run(&frame).1);
    assert_eq!((seen.dst, seen.kind), (SRC, 11));
    assert_eq!(
        seen.quoted,
        Tcp {
            src: SRC,
            sport: 5432,
            dst: SRC_SNAT,
            dport: snat,
            flags: 0
        }
    );
    assert!(seen.checksums_ok);
    assert_eq!(p.stat(Stat::IcmpTranslated), 2);
    // About a connection nobody tracks: untouched.
    let stray = packet::icmp_error_frame(
        ROUTER,
        VIP,
        3,
        4,
        1280,
        Tcp {
            src: VIP,
            sport: 5432,
            dst: C2,
            dport: 1,
            flags: ACK,
        },
    );
    let (verdict, out) = p.run(&stray);
    assert_eq!((verdict, out), (XDP_PASS, stray));
    assert_eq!(p.stat(Stat::IcmpUntracked), 1);
}
