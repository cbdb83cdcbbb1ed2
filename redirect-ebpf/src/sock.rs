//! Socket mode's cgroup hooks (`redirect run --mode socket`): the backend is chosen inside
//! `connect()`, so the socket talks straight to it and no packet of the connection is ever
//! translated (Cilium's socket load balancer, with a safe cutover's hold).
//!
//! - `connect4`/`connect6` (IPv4, and IPv4-mapped IPv6 from dual-stack sockets): VIP:port
//!   becomes the active backend, and the socket is recorded in `SOCKETS` by cookie. During a
//!   hold it becomes the backend the cutover flips to, and the socket is marked held: the TC
//!   egress hook (`sock_tc.rs`) parks its SYN, and at the release sends it on untouched if
//!   the flip happened, or to the backend still active if it did not.
//! - `getpeername4`/`getpeername6`: a redirected socket's peer reads as the VIP, so a client
//!   that checks whom it talks to (libpq's `PQhost` does not; some pools and audit code do)
//!   sees what it connected to.
//! - `sock_release`: the socket's entry goes with it.
//!
//! A hook that cannot decide safely refuses the `connect()` (`EPERM`, counted): a full
//! `SOCKETS` would leave a session the fence cannot find, and a bad `ACTIVE` has nowhere to
//! go. The client retries, as after a dropped SYN in proxy mode.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_coarse_ns},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use redirect_common::{
    backend::MAX_BACKENDS,
    config::{FLAG_CONFIGURED, FLAG_SOCKET_MODE},
    cutover::Cutover,
    socket::{SOCK_HELD, SockEntry, SockStat},
};

use crate::{ACTIVE, BACKENDS, CONFIG, CUTOVER, SOCK_NETNS, SOCK_STATS, SOCKETS};

/// What a `cgroup_sock_addr` program returns to let the call go on (rewritten or not).
const ALLOW: i32 = 1;
/// ... and to fail it with `EPERM`.
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// `::ffff:0:0/96`, the third word of an IPv4-mapped IPv6 address, as stored (big endian).
const V4_MAPPED_BE: u32 = 0x0000_ffffu32.to_be();

#[inline(always)]
fn count(stat: SockStat) {
    if let Some(counter) = SOCK_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU value, no concurrent writer.
        unsafe { *counter += 1 };
    }
}

/// Where a `connect()` to the VIP goes: this backend's address and port (network order).
struct Decision {
    addr_be: u32,
    port_be: u16,
}

/// `connect()` to VIP:port over IPv4.
#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    // TCP only: an MPTCP socket is a SOCK_STREAM too, but its subflows are other sockets
    // (other cookies) that neither the hold nor the fence would know.
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return ALLOW;
    }
    let Some((vip, vip_port)) = vip() else {
        return ALLOW;
    };
    if sa.user_ip4 != vip || sa.user_port as u16 != vip_port || !own_netns(&ctx) {
        return ALLOW;
    }
    let Some(to) = decide(&ctx, vip, vip_port) else {
        return REFUSE;
    };
    sa.user_ip4 = to.addr_be;
    sa.user_port = u32::from(to.port_be);
    ALLOW
}

/// `connect()` of a dual-stack (AF_INET6) socket to `::ffff:VIP`: Java and many Python
/// clients open IPv6 sockets and connect them to IPv4 addresses this way.
#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid context.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM || sa.protocol != IPPROTO_TCP {
        return ALLOW;
    }
    let Some((vip, vip_port)) = vip() else {
        return ALLOW;
    };
    if sa.user_ip6[0] != 0
        || sa.user_ip6[1] != 0
        || sa.user_ip6[2] != V4_MAPPED_BE
        || sa.user_ip6[3] != vip
        || sa.user_port as u16 != vip_port
        || !own_netns(&ctx)
    {
        return ALLOW;
    }
    let Some(to) = decide(&ctx, vip, vip_port) else {
        return REFUSE;
    };
    sa.user_ip6[3] = to.addr_be;
    sa.user_port = u32::from(to.port_be);
    ALLOW
}

/// `getpeername()` over IPv4: a redirected socket's peer is the VIP.
#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(entry) = redirected(&ctx) {
        // SAFETY: the kernel passes a valid context.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = entry.vip_addr_be;
        sa.user_port = u32::from(entry.vip_port_be);
        count(SockStat::PeerShownVip);
    }
    ALLOW
}

/// `getpeername()` of a dual-stack socket: `::ffff:VIP`.
#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(entry) = redirected(&ctx) {
        // SAFETY: the kernel passes a valid context.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip6[3] = entry.vip_addr_be;
        sa.user_port = u32::from(entry.vip_port_be);
        count(SockStat::PeerShownVip);
    }
    ALLOW
}

/// A socket closes: forget it. (A held connection's `FLOWS` entry stays until the
/// controller's GC sees its socket gone: its FIN exchange still needs translating.)
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the kernel passes a valid socket.
    let (kind, protocol) = unsafe { ((*ctx.sock).type_, (*ctx.sock).protocol) };
    if kind == SOCK_STREAM && protocol == IPPROTO_TCP {
        // SAFETY: a helper that reads the context's socket.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let _ = SOCKETS.remove(cookie);
    }
    1
}

/// Whether the socket is in the controller's network namespace. A container's or pod's
/// socket (a cgroup below the hooked one, in a namespace of its own) is not redirected: its
/// packets reach the uplink without their socket and translated by its namespace's NAT, so
/// neither the hold nor the fence could see it, and the controller's `sock_diag` does not
/// list it. Left alone, it meets the VIP as it is, like a process outside the cgroup.
#[inline(always)]
fn own_netns(ctx: &SockAddrContext) -> bool {
    // SAFETY: a helper that reads the context's socket.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    SOCK_NETNS.get(0).is_some_and(|own| *own == netns)
}

/// The VIP (address, port; network order) when socket mode is configured.
#[inline(always)]
fn vip() -> Option<(u32, u16)> {
    let cfg = CONFIG.get(0)?;
    let wanted = FLAG_CONFIGURED | FLAG_SOCKET_MODE;
    (cfg.flags & wanted == wanted).then_some((cfg.vip_addr_be, cfg.vip_port_be))
}

/// The entry of a socket whose destination `connect()` rewrote.
#[inline(always)]
fn redirected(ctx: &SockAddrContext) -> Option<SockEntry> {
    // SAFETY: a helper that reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: a map value, copied out at once.
    unsafe { SOCKETS.get(cookie) }.copied()
}

/// Where a `connect()` to the VIP goes, recorded in `SOCKETS`; `None` refuses it.
#[inline(always)]
fn decide(ctx: &SockAddrContext, vip: u32, vip_port: u16) -> Option<Decision> {
    // Jiffy resolution, as the packet path: the hold's deadline may end a jiffy late.
    // SAFETY: a helper with no preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let cut = CUTOVER.get(0).copied().unwrap_or(Cutover::IDLE);
    let active = ACTIVE.get(0).copied().unwrap_or(u32::MAX);
    if cut.refuses(active, now) {
        count(SockStat::Unconfirmed);
        return None;
    }
    let held = cut.holds(active, now);
    // During a hold: the backend the cutover flips to (the one it fences is the other).
    let id = if held && cut.fenced_backend < MAX_BACKENDS {
        1 - cut.fenced_backend
    } else {
        active
    };
    let backend = if id < MAX_BACKENDS {
        BACKENDS.get(id).copied()
    } else {
        None
    };
    let Some(b) = backend.filter(|b| b.addr_be != 0) else {
        count(SockStat::BadActive);
        return None;
    };
    let entry = SockEntry {
        vip_addr_be: vip,
        vip_port_be: vip_port,
        _pad0: 0,
        backend_id: id,
        flags: if held { SOCK_HELD } else { 0 },
    };
    // SAFETY: a helper that reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if SOCKETS.insert(cookie, entry, 0).is_err() {
        count(SockStat::SocketsFull);
        return None;
    }
    count(if held {
        SockStat::ConnectHeld
    } else {
        SockStat::ConnectRedirected
    });
    Some(Decision {
        addr_be: b.addr_be,
        port_be: b.port_be,
    })
}
