//! Crafted Ethernet/IPv4/TCP frames for `BPF_PROG_TEST_RUN`, and a parser for what comes out.

use std::net::Ipv4Addr;

use redirect_common::csum;

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const FIN: u8 = 0x01;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
/// The acknowledgement number every crafted segment carries.
pub const ACK_NUMBER: u32 = 2000;

/// A TCP segment's addressing and flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tcp {
    pub src: Ipv4Addr,
    pub sport: u16,
    pub dst: Ipv4Addr,
    pub dport: u16,
    pub flags: u8,
}

/// Builds a frame with valid IPv4 and TCP checksums (sequence number 1000, [`ACK_NUMBER`]).
#[must_use]
pub fn tcp_frame(t: Tcp, payload: &[u8]) -> Vec<u8> {
    tcp_frame_at(t, 1000, ACK_NUMBER, payload)
}

/// Like [`tcp_frame`], with the given sequence and acknowledgement numbers.
#[must_use]
pub fn tcp_frame_at(t: Tcp, seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 14];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let total = u16::try_from(20 + 20 + payload.len()).expect("small frame");
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&t.src.octets());
    ip[16..20].copy_from_slice(&t.dst.octets());
    let c = csum::ipv4_header(&ip);
    ip[10..12].copy_from_slice(&c.to_ne_bytes());
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&t.sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&t.dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = t.flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    tcp.extend_from_slice(payload);
    let c = csum::tcp_ipv4(t.src.octets(), t.dst.octets(), &tcp);
    tcp[16..18].copy_from_slice(&c.to_ne_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp);
    f
}

/// Parses a frame built like [`tcp_frame`] and checks both checksums by full recomputation.
#[must_use]
pub fn parse(frame: &[u8]) -> (Tcp, bool) {
    let ip = &frame[14..34];
    let tcp = &frame[34..];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let t = Tcp {
        src,
        sport: u16::from_be_bytes([tcp[0], tcp[1]]),
        dst,
        dport: u16::from_be_bytes([tcp[2], tcp[3]]),
        flags: tcp[13],
    };
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let seg = &frame[34..14 + total];
    let mut pseudo = [0u8; 12];
    pseudo[..4].copy_from_slice(&src.octets());
    pseudo[4..8].copy_from_slice(&dst.octets());
    pseudo[9] = 6;
    pseudo[10..12].copy_from_slice(&u16::try_from(seg.len()).expect("small").to_be_bytes());
    // A valid checksum makes the one's complement sum of everything it covers all ones.
    let ip_ok = csum::fold(csum::sum_words(ip, 0)) == 0xffff;
    let tcp_ok = csum::fold(csum::sum_words(seg, csum::sum_words(&pseudo, 0))) == 0xffff;
    (t, ip_ok && tcp_ok)
}

/// Sends crafted IPv4 packets (the frames of [`tcp_frame_at`] without their Ethernet header)
/// through a raw socket of the calling thread's namespace: the kernel routes them as they are,
/// spoofed source and all. Returns how many were sent.
///
/// # Panics
/// If the raw socket cannot be opened (needs `CAP_NET_RAW`).
pub fn send_raw(frames: impl IntoIterator<Item = Vec<u8>>) -> usize {
    // SAFETY: plain socket(2); the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    let mut sent = 0;
    for frame in frames {
        let ip = &frame[14..];
        let dst = [ip[16], ip[17], ip[18], ip[19]];
        let addr = libc::sockaddr_in {
            sin_family: libc::sa_family_t::try_from(libc::AF_INET).expect("AF_INET fits"),
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: a valid buffer and address for the socket's lifetime.
        let rc = unsafe {
            libc::sendto(
                fd,
                ip.as_ptr().cast(),
                ip.len(),
                0,
                (&raw const addr).cast(),
                u32::try_from(std::mem::size_of::<libc::sockaddr_in>()).expect("small"),
            )
        };
        if rc >= 0 {
            sent += 1;
        }
    }
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    sent
}

/// An ICMP error as a router sends it: from `router` to `to`, quoting the first 28 bytes of
/// the TCP packet `quoted` (as [`tcp_frame_at`] builds it), with valid checksums throughout.
#[must_use]
pub fn icmp_error_frame(
    router: Ipv4Addr,
    to: Ipv4Addr,
    kind: u8,
    code: u8,
    mtu: u16,
    quoted: Tcp,
) -> Vec<u8> {
    let q = tcp_frame_at(quoted, 777, 0, b"");
    let quote = &q[14..14 + 28];
    let mut icmp = vec![kind, code, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(quote);
    let c = !csum::fold(csum::sum_words(&icmp, 0));
    icmp[2..4].copy_from_slice(&c.to_ne_bytes());
    let mut f = vec![0u8; 14];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    let total = u16::try_from(20 + icmp.len()).expect("small");
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = 1;
    ip[12..16].copy_from_slice(&router.octets());
    ip[16..20].copy_from_slice(&to.octets());
    let c = csum::ipv4_header(&ip);
    ip[10..12].copy_from_slice(&c.to_ne_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

/// An ICMP error frame taken apart: outer source and destination, type, code, MTU, the quoted
/// packet's addressing, and whether the outer IP, ICMP and quoted IP checksums all hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcmpSeen {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub kind: u8,
    pub code: u8,
    pub mtu: u16,
    pub quoted: Tcp,
    pub checksums_ok: bool,
}

/// Parses what [`icmp_error_frame`] builds (or the datapath's own fragmentation-needed).
#[must_use]
pub fn parse_icmp(frame: &[u8]) -> IcmpSeen {
    let ip = &frame[14..34];
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let icmp = &frame[34..14 + total];
    let inner = &icmp[8..28];
    let ports = &icmp[28..32];
    let ok = |b: &[u8]| csum::fold(csum::sum_words(b, 0)) == 0xffff;
    IcmpSeen {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        kind: icmp[0],
        code: icmp[1],
        mtu: u16::from_be_bytes([icmp[6], icmp[7]]),
        quoted: Tcp {
            src: Ipv4Addr::new(inner[12], inner[13], inner[14], inner[15]),
            sport: u16::from_be_bytes([ports[0], ports[1]]),
            dst: Ipv4Addr::new(inner[16], inner[17], inner[18], inner[19]),
            dport: u16::from_be_bytes([ports[2], ports[3]]),
            flags: 0,
        },
        checksums_ok: ok(ip) && ok(icmp) && ok(inner),
    }
}
