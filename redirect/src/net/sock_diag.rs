//! This network namespace's TCP sockets, as the kernel's inet_diag lists them over
//! NETLINK_SOCK_DIAG (what `ss -t` reads).
//!
//! The zero-hop socket mode opens its sessions on the old server without SNAT ports, so the
//! fence cannot name them by port range: it lists the sockets this host has to the old backend
//! and matches them to `pg_stat_activity` by client address and port.
//!
//! One `SOCK_DIAG_BY_FAMILY` dump (`struct inet_diag_req_v2`) per address family, filtered by
//! remote in user space: a bytecode filter would save little for the few sockets a host has to
//! one backend, and user-space filtering needs no second encoding of the match to keep right.
//! The netlink messages are read from bytes at the kernel's offsets rather than cast to
//! `#[repr(C)]` structs, so the parsing needs no `unsafe`.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// One TCP socket of this network namespace, as the kernel's inet_diag reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    pub local: std::net::SocketAddrV4,
    pub remote: std::net::SocketAddrV4,
    /// The kernel's TCP state (1 = ESTABLISHED, 2 = SYN_SENT, ... 10 = LISTEN), as `tcp_states.h` numbers them.
    pub state: u8,
    /// The socket's cookie: the value `bpf_get_socket_cookie` and SO_COOKIE give for it.
    pub cookie: u64,
    /// The socket's inode: `socket:[inode]` in the `/proc/<pid>/fd` of the processes holding
    /// it (0 once no file refers to it, as for a socket closed and still in `FIN_WAIT`).
    pub inode: u32,
}

/// `SOCK_DIAG_BY_FAMILY` (`linux/sock_diag.h`): the request type, and the type of each socket
/// message of the reply. libc does not define it.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `TCP_LISTEN` (`net/tcp_states.h`).
const TCP_LISTEN: u8 = 10;
/// `TCPF_ALL`: one bit per state, `1 << state`, for states 0 to 11.
const TCPF_ALL: u32 = 0xfff;
/// Every state but LISTEN: a listener has no remote end. The kernel adds NEW_SYN_RECV (12) to a
/// request asking for SYN_RECV, and reports those request sockets as SYN_RECV. Bound but
/// unconnected sockets (BOUND_INACTIVE, 13) are not asked for: they have no remote either.
const STATES: u32 = TCPF_ALL & !(1 << TCP_LISTEN);

/// `sizeof(struct nlmsghdr)`, already a multiple of the 4-byte netlink alignment.
const NLMSG_HDRLEN: usize = 16;
/// `sizeof(struct inet_diag_req_v2)`: family, protocol, ext, pad, states (u32), then a 48-byte
/// `struct inet_diag_sockid` left zero (a dump does not match on it).
const REQ_LEN: usize = 56;
/// `sizeof(struct inet_diag_msg)`: family, state, timer, retrans, the 48-byte
/// `inet_diag_sockid`, then expires, rqueue, wqueue, uid and inode (u32 each).
const MSG_LEN: usize = 72;
/// Offsets in `inet_diag_msg`: `inet_diag_sockid` starts at 4 with sport and dport (u16,
/// network order), src and dst (16 bytes each: an IPv4 address is the first 4, network order),
/// the interface (u32), then the cookie as two host-order u32 halves.
const MSG_SPORT: usize = 4;
const MSG_DPORT: usize = 6;
const MSG_SRC: usize = 8;
const MSG_DST: usize = 24;
const MSG_COOKIE: usize = 44;
/// `idiag_inode`, the last u32 of `inet_diag_msg`.
const MSG_INODE: usize = 68;

/// The kernel sizes each part of a dump to the reader's buffer, capped just under 32 KiB
/// (`netlink_recvmsg`); a read that still comes out larger is caught by `MSG_TRUNC`.
const RECV_BUF: usize = 32 * 1024;

/// Every TCP socket (all states except LISTEN) whose remote end is `remote`, IPv4 sockets and IPv6 sockets connected to the IPv4-mapped form (::ffff:a.b.c.d) alike (the latter reported with their IPv4 addresses).
pub fn tcp_sockets_to(remote: std::net::SocketAddrV4) -> std::io::Result<Vec<TcpSocket>> {
    tcp_sockets_to_any(&[remote])
}

/// The same, for several remotes in one dump per family.
pub fn tcp_sockets_to_any(remotes: &[std::net::SocketAddrV4]) -> std::io::Result<Vec<TcpSocket>> {
    let fd = open()?;
    let mut found = Vec::new();
    // An AF_INET6 socket connected to ::ffff:a.b.c.d talks IPv4 on the wire but is only in the
    // AF_INET6 dump: a client library may well open its sockets that way.
    for (seq, family) in [(1, libc::AF_INET), (2, libc::AF_INET6)] {
        dump(&fd, family, seq, &mut |socket| {
            if remotes.contains(&socket.remote) {
                found.push(socket);
            }
        })?;
    }
    Ok(found)
}

/// A NETLINK_SOCK_DIAG socket connected to the kernel.
fn open() -> io::Result<OwnedFd> {
    // SAFETY: socket takes no pointers; the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_nl is made of integers, for which all zeroes is a valid value.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::sa_family_t::try_from(libc::AF_NETLINK).expect("AF_NETLINK fits");
    // Connected to the kernel (port id 0), the socket takes messages from no other process:
    // a local process that learnt our port id cannot slip sockets into the list.
    // SAFETY: `kernel` is a live sockaddr_nl and the length passed is its size.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const kernel).cast(),
            socklen_of::<libc::sockaddr_nl>(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// One dump of `family`'s TCP sockets (all states but LISTEN), each handed to `each`.
fn dump(
    fd: &OwnedFd,
    family: libc::c_int,
    seq: u32,
    each: &mut dyn FnMut(TcpSocket),
) -> io::Result<()> {
    let req = request(family, seq);
    // SAFETY: `req` is live for the call and the length passed is its own.
    let sent = unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    if usize::try_from(sent).ok() != Some(req.len()) {
        return Err(io::Error::other(
            "sock_diag: short send of the dump request",
        ));
    }
    let mut buf = vec![0u8; RECV_BUF];
    loop {
        let len = recv(fd, &mut buf)?;
        if parse_datagram(&buf[..len], seq, each)? {
            return Ok(());
        }
    }
}

/// The dump request: a netlink header, then `inet_diag_req_v2`.
fn request(family: libc::c_int, seq: u32) -> [u8; NLMSG_HDRLEN + REQ_LEN] {
    let mut req = [0u8; NLMSG_HDRLEN + REQ_LEN];
    let len = u32::try_from(req.len()).expect("72 fits in u32");
    let flags = u16::try_from(libc::NLM_F_REQUEST | libc::NLM_F_DUMP).expect("flags fit in u16");
    req[0..4].copy_from_slice(&len.to_ne_bytes());
    req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    req[8..12].copy_from_slice(&seq.to_ne_bytes());
    // nlmsg_pid stays 0: the kernel knows who sent the request without it.
    let body = &mut req[NLMSG_HDRLEN..];
    body[0] = u8::try_from(family).expect("address families fit in u8");
    body[1] = u8::try_from(libc::IPPROTO_TCP).expect("IPPROTO_TCP fits in u8");
    // idiag_ext 0 (no extra attributes), pad 0, then the states.
    body[4..8].copy_from_slice(&STATES.to_ne_bytes());
    req
}

/// One datagram from the socket, `MSG_TRUNC` telling its full length so a part larger than
/// `buf` is an error rather than sockets silently missing from the list.
fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is live and writable for its whole length, which is what is passed.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
            )
        };
        let Ok(n) = usize::try_from(n) else {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        };
        if n > buf.len() {
            return Err(io::Error::other(format!(
                "sock_diag: a {n}-byte dump part does not fit the {}-byte buffer",
                buf.len()
            )));
        }
        if n == 0 {
            // Netlink never sends an empty datagram; reading on would spin.
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        return Ok(n);
    }
}

/// The messages of one datagram, sockets handed to `each`. True once the dump is done.
fn parse_datagram(mut data: &[u8], seq: u32, each: &mut dyn FnMut(TcpSocket)) -> io::Result<bool> {
    while !data.is_empty() {
        if data.len() < NLMSG_HDRLEN {
            return Err(invalid("a netlink header cut short"));
        }
        let len = usize::try_from(u32_at(data, 0)).expect("u32 fits in usize");
        if len < NLMSG_HDRLEN || len > data.len() {
            return Err(invalid("a netlink message length out of bounds"));
        }
        let kind = u16::from_ne_bytes([data[4], data[5]]);
        let payload = &data[NLMSG_HDRLEN..len];
        // One socket serves both dumps in turn: a message with another sequence number would
        // be a stray from the other one, and is skipped rather than taken for this dump's.
        if u32_at(data, 8) == seq {
            match i32::from(kind) {
                libc::NLMSG_DONE => {
                    // NLMSG_DONE carries the dump's outcome: a negative errno means the kernel
                    // stopped early and the list is incomplete.
                    return match payload.get(..4) {
                        Some(e) if i32_at(e) < 0 => Err(io::Error::from_raw_os_error(-i32_at(e))),
                        _ => Ok(true),
                    };
                }
                libc::NLMSG_ERROR => {
                    let Some(e) = payload.get(..4) else {
                        return Err(invalid("an NLMSG_ERROR without its error"));
                    };
                    // Error 0 is an acknowledgement, which a dump does not ask for: skip it.
                    if i32_at(e) < 0 {
                        return Err(io::Error::from_raw_os_error(-i32_at(e)));
                    }
                }
                libc::NLMSG_OVERRUN => return Err(invalid("the kernel overran the dump")),
                _ if kind == SOCK_DIAG_BY_FAMILY => {
                    if let Some(socket) = parse_socket(payload)? {
                        each(socket);
                    }
                }
                // NLMSG_NOOP and anything newer carry no socket.
                _ => {}
            }
        }
        // Messages are 4-byte aligned; the last one of a datagram may end unpadded.
        let next = len.next_multiple_of(4).min(data.len());
        data = &data[next..];
    }
    Ok(false)
}

/// The socket an `inet_diag_msg` describes, or None for an IPv6 socket with a native IPv6
/// peer (it cannot be talking to an IPv4 remote).
fn parse_socket(msg: &[u8]) -> io::Result<Option<TcpSocket>> {
    // The attributes after the fixed part (none asked for) are not read.
    if msg.len() < MSG_LEN {
        return Err(invalid("an inet_diag_msg cut short"));
    }
    let addr = |at: usize| -> Option<Ipv4Addr> {
        match i32::from(msg[0]) {
            libc::AF_INET => Some(Ipv4Addr::new(
                msg[at],
                msg[at + 1],
                msg[at + 2],
                msg[at + 3],
            )),
            libc::AF_INET6 => {
                let bytes: [u8; 16] = msg[at..at + 16].try_into().expect("16 bytes");
                Ipv6Addr::from(bytes).to_ipv4_mapped()
            }
            _ => None,
        }
    };
    let (Some(local), Some(remote)) = (addr(MSG_SRC), addr(MSG_DST)) else {
        return Ok(None);
    };
    let port = |at: usize| u16::from_be_bytes([msg[at], msg[at + 1]]);
    // sock_diag_save_cookie stores the low half first: cookie[0] = (u32)res,
    // cookie[1] = (u32)(res >> 32).
    let cookie = u64::from(u32_at(msg, MSG_COOKIE)) | u64::from(u32_at(msg, MSG_COOKIE + 4)) << 32;
    Ok(Some(TcpSocket {
        local: SocketAddrV4::new(local, port(MSG_SPORT)),
        remote: SocketAddrV4::new(remote, port(MSG_DPORT)),
        state: msg[1],
        cookie,
        inode: u32_at(msg, MSG_INODE),
    }))
}

/// The host-order u32 at `at` (callers have checked the bounds).
fn u32_at(data: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(data[at..at + 4].try_into().expect("4 bytes"))
}

/// The host-order i32 at the start of `data`.
fn i32_at(data: &[u8]) -> i32 {
    i32::from_ne_bytes(data[..4].try_into().expect("4 bytes"))
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {what}"))
}

fn socklen_of<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(size_of::<T>()).expect("socket structures fit in socklen_t")
}

#[cfg(test)]
mod tests {
    use std::{
        net::{SocketAddr, TcpListener, TcpStream},
        os::fd::AsRawFd as _,
    };

    use super::*;

    /// SO_COOKIE of `stream`, the value the dump must report for it.
    fn so_cookie(stream: &TcpStream) -> u64 {
        let mut cookie = 0u64;
        let mut len = socklen_of::<u64>();
        // SAFETY: `cookie` and `len` are live and `len` holds the size of `cookie`.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_COOKIE,
                (&raw mut cookie).cast(),
                &raw mut len,
            )
        };
        assert_eq!(rc, 0, "SO_COOKIE: {}", io::Error::last_os_error());
        cookie
    }

    fn v4(addr: SocketAddr) -> SocketAddrV4 {
        match addr {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(a) => panic!("{a} is not IPv4"),
        }
    }

    #[test]
    fn lists_an_ipv4_connection_with_its_cookie() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = v4(listener.local_addr().unwrap());
        let stream = TcpStream::connect(server).unwrap();
        let local = v4(stream.local_addr().unwrap());

        let sockets = tcp_sockets_to(server).unwrap();
        let found = sockets
            .iter()
            .find(|s| s.local == local)
            .unwrap_or_else(|| panic!("{local} -> {server} not in {sockets:?}"));
        assert_eq!(found.remote, server);
        assert_eq!(found.state, 1, "ESTABLISHED");
        assert_eq!(found.cookie, so_cookie(&stream));
        // Its inode is the one /proc/self/fd shows for the stream's descriptor.
        let link = std::fs::read_link(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&stream)
        ))
        .unwrap();
        assert_eq!(
            link.to_str().unwrap(),
            format!("socket:[{}]", found.inode),
            "the socket's inode"
        );
        // The accepted end's remote is the client, not the listener: it is not listed, and
        // neither is the listener itself.
        assert!(sockets.iter().all(|s| s.remote == server));
        assert!(sockets.iter().all(|s| s.local != server));
    }

    #[test]
    fn lists_an_ipv6_socket_to_the_mapped_address_as_ipv4() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = v4(listener.local_addr().unwrap());
        let mapped = SocketAddr::new(server.ip().to_ipv6_mapped().into(), server.port());
        let stream = TcpStream::connect(mapped).unwrap();
        let SocketAddr::V6(local6) = stream.local_addr().unwrap() else {
            panic!("a socket connected to {mapped} is AF_INET6");
        };
        let local = SocketAddrV4::new(local6.ip().to_ipv4_mapped().unwrap(), local6.port());

        let sockets = tcp_sockets_to(server).unwrap();
        let found = sockets
            .iter()
            .find(|s| s.local == local)
            .unwrap_or_else(|| panic!("{local} -> {server} not in {sockets:?}"));
        assert_eq!(found.remote, server);
        assert_eq!(found.state, 1, "ESTABLISHED");
        assert_eq!(found.cookie, so_cookie(&stream));
    }

    #[test]
    fn leaves_out_sockets_to_other_remotes() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = v4(listener.local_addr().unwrap());
        let elsewhere = v4(other.local_addr().unwrap());
        let stream = TcpStream::connect(elsewhere).unwrap();
        let local = v4(stream.local_addr().unwrap());

        let sockets = tcp_sockets_to(server).unwrap();
        assert!(sockets.iter().all(|s| s.local != local), "{sockets:?}");
        // Asked for both remotes in one go, it is listed.
        let both = tcp_sockets_to_any(&[server, elsewhere]).unwrap();
        assert!(
            both.iter()
                .any(|s| s.local == local && s.remote == elsewhere),
            "{both:?}"
        );
    }

    #[test]
    fn lists_every_socket_of_a_dump_in_several_parts() {
        // About 120 bytes a socket, with the attributes the kernel always adds: 100 clients
        // (under std's listen backlog of 128, so none waits for an accept) and their accepted
        // ends make a dump of some 24 KiB, which came in two parts on 6.18 (the first one
        // sized before the kernel has seen the reader's buffer).
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = v4(listener.local_addr().unwrap());
        let streams: Vec<TcpStream> = (0..100)
            .map(|_| TcpStream::connect(server).unwrap())
            .collect();

        let sockets = tcp_sockets_to(server).unwrap();
        for stream in &streams {
            let local = v4(stream.local_addr().unwrap());
            let found = sockets.iter().find(|s| s.local == local);
            assert_eq!(found.map(|s| s.cookie), Some(so_cookie(stream)), "{local}");
        }
        assert_eq!(sockets.len(), streams.len(), "{sockets:?}");
    }

    /// A netlink message of `kind` with sequence number `seq`, padded to 4 bytes.
    fn message(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(NLMSG_HDRLEN + payload.len()).unwrap();
        let mut m = Vec::new();
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&u16::try_from(libc::NLM_F_MULTI).unwrap().to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(m.len().next_multiple_of(4), 0);
        m
    }

    fn control(kind: libc::c_int, seq: u32, errno: i32) -> Vec<u8> {
        message(u16::try_from(kind).unwrap(), seq, &errno.to_ne_bytes())
    }

    /// An `inet_diag_msg` of an AF_INET socket, with a trailing attribute (unpadded length).
    fn inet_msg(local: SocketAddrV4, remote: SocketAddrV4, cookie: u64) -> Vec<u8> {
        let mut m = vec![0u8; MSG_LEN + 5];
        m[0] = u8::try_from(libc::AF_INET).unwrap();
        m[1] = 1;
        m[MSG_SPORT..MSG_SPORT + 2].copy_from_slice(&local.port().to_be_bytes());
        m[MSG_DPORT..MSG_DPORT + 2].copy_from_slice(&remote.port().to_be_bytes());
        m[MSG_SRC..MSG_SRC + 4].copy_from_slice(&local.ip().octets());
        m[MSG_DST..MSG_DST + 4].copy_from_slice(&remote.ip().octets());
        #[expect(clippy::cast_possible_truncation, reason = "the cookie's two halves")]
        let (low, high) = (cookie as u32, (cookie >> 32) as u32);
        m[MSG_COOKIE..MSG_COOKIE + 4].copy_from_slice(&low.to_ne_bytes());
        m[MSG_COOKIE + 4..MSG_COOKIE + 8].copy_from_slice(&high.to_ne_bytes());
        m
    }

    fn parse(data: &[u8]) -> io::Result<(bool, Vec<TcpSocket>)> {
        let mut sockets = Vec::new();
        let done = parse_datagram(data, 7, &mut |s| sockets.push(s))?;
        Ok((done, sockets))
    }

    #[test]
    fn parses_several_messages_of_a_datagram_until_done() {
        let a = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 40000);
        let b = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 5432);
        let cookie = 0x1234_5678_9abc_def0;
        let mut data = message(SOCK_DIAG_BY_FAMILY, 7, &inet_msg(a, b, cookie));
        // Another request's message is not this dump's.
        data.extend(message(SOCK_DIAG_BY_FAMILY, 6, &inet_msg(b, a, 1)));
        data.extend(message(SOCK_DIAG_BY_FAMILY, 7, &inet_msg(b, a, 2)));
        let (done, sockets) = parse(&data).unwrap();
        assert!(
            !done,
            "no NLMSG_DONE yet: the dump goes on in the next datagram"
        );
        let first = TcpSocket {
            local: a,
            remote: b,
            state: 1,
            cookie,
            inode: 0,
        };
        let second = TcpSocket {
            local: b,
            remote: a,
            state: 1,
            cookie: 2,
            inode: 0,
        };
        assert_eq!(sockets, [first, second]);

        data.extend(control(libc::NLMSG_DONE, 7, 0));
        assert_eq!(parse(&data).unwrap(), (true, vec![first, second]));
    }

    #[test]
    fn returns_the_kernels_errno() {
        let err = parse(&control(libc::NLMSG_ERROR, 7, -libc::EPERM)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        // A dump that stopped early says so in NLMSG_DONE.
        let err = parse(&control(libc::NLMSG_DONE, 7, -libc::ENOBUFS)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOBUFS));
        // An acknowledgement is no error.
        assert_eq!(
            parse(&control(libc::NLMSG_ERROR, 7, 0)).unwrap(),
            (false, vec![])
        );
    }

    #[test]
    fn rejects_a_message_longer_than_the_datagram() {
        let mut data = message(
            SOCK_DIAG_BY_FAMILY,
            7,
            &inet_msg(
                SocketAddrV4::new(Ipv4Addr::LOCALHOST, 1),
                SocketAddrV4::new(Ipv4Addr::LOCALHOST, 2),
                3,
            ),
        );
        data.truncate(40);
        let err = parse(&data).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn nothing_asked_nothing_listed() {
        assert_eq!(tcp_sockets_to_any(&[]).unwrap(), Vec::new());
    }
}
