//! Socket mode's TC hooks, on the application host's uplink. They do nothing to a connection
//! that `connect()` sent straight to its backend, apart from the fence; their work is the few
//! connections opened during a hold, whose destination stayed the VIP:
//!
//! - egress: a held connection's SYN is parked (copied into `HELD`, dropped) while the hold
//!   runs. When the controller re-injects it (or the client retransmits it) after the hold,
//!   the connection gets a `FLOWS` entry for the backend `ACTIVE` then names, and it and every
//!   later packet are sent there (DNAT: the source is this host already, so no SNAT and no
//!   port to allocate).
//! - ingress: that backend's replies are shown as from the VIP, so they reach the socket.
//! - egress, during a fence: data from a hooked socket to the fenced backend is dropped, as
//!   the proxy drops it, so a query sent after the fence was raised never reaches the old
//!   server (the controller ends the sessions themselves).
//!
//! What these programs cost a direct connection's packet: the parse, one `CONFIG` read and
//! two compares (egress), or two `BACKENDS` reads and compares and one `FLOWS` lookup for
//! packets from a backend (ingress).

use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_get_socket_cookie,
    macros::classifier,
    programs::TcContext,
};
use redirect_common::{
    backend::{MAX_BACKENDS, SOURCE, TARGET},
    config::{Config, FLAG_SOCKET_MODE},
    ct::CtKey,
    cutover::{Cutover, NO_FENCE},
    socket::{FlowEntry, PARKED, SOCK_HELD, SockStat},
    tcp,
};

use crate::{
    ACTIVE, BACKENDS, FLOWS, SOCK_STATS, SOCKETS,
    headers::{self, ETH_LEN, IP_LEN, Packet, TCP_LEN},
    hold, nat, packet_context, tc,
};

const HEADERS_LEN: u32 = (ETH_LEN + IP_LEN + TCP_LEN) as u32;

#[inline(always)]
fn count(stat: SockStat) {
    if let Some(counter) = SOCK_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU value, no concurrent writer.
        unsafe { *counter += 1 };
    }
}

/// Parses a TCP/IPv4 packet of socket mode; `None` for anything else (passed untouched).
#[inline(always)]
fn parse(ctx: &TcContext) -> Option<(Packet, &'static Config, u64, Cutover)> {
    let frame_len = ctx.len();
    let want = frame_len.min(HEADERS_LEN);
    if ((ctx.data_end() - ctx.data()) as u32) < want && ctx.pull_data(want).is_err() {
        return None;
    }
    let headers::Parsed::Tcp(pkt) =
        headers::parse(ctx.data(), ctx.data_end(), frame_len as usize).ok()?
    else {
        return None;
    };
    let (cfg, now, cut) = packet_context().ok()?;
    (cfg.flags & FLAG_SOCKET_MODE != 0).then_some((pkt, cfg, now, cut))
}

/// The uplink's egress.
#[classifier]
pub fn socket_egress(ctx: TcContext) -> i32 {
    let Some((pkt, cfg, now, cut)) = parse(&ctx) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: `parse` bounds-checked the headers.
    let (daddr, dport) = unsafe { ((*pkt.ip).daddr_be, (*pkt.tcp).dport_be) };
    if daddr == cfg.vip_addr_be && dport == cfg.vip_port_be {
        return held_flow_out(&ctx, &pkt, &cut, now);
    }
    if cut.fenced_backend != NO_FENCE && fenced(&ctx, &pkt, &cut, now) {
        count(SockStat::Fenced);
        return TC_ACT_SHOT;
    }
    TC_ACT_UNSPEC
}

/// The uplink's ingress: replies of held connections come back from the VIP.
#[classifier]
pub fn socket_ingress(ctx: TcContext) -> i32 {
    let Some((pkt, cfg, _, _)) = parse(&ctx) else {
        return TC_ACT_UNSPEC;
    };
    // SAFETY: `parse` bounds-checked the headers.
    let (saddr, sport, daddr, dport) = unsafe {
        (
            (*pkt.ip).saddr_be,
            (*pkt.tcp).sport_be,
            (*pkt.ip).daddr_be,
            (*pkt.tcp).dport_be,
        )
    };
    let Some(from) = backend_at(saddr, sport) else {
        return TC_ACT_UNSPEC;
    };
    let key = CtKey {
        client_addr_be: daddr,
        vip_addr_be: cfg.vip_addr_be,
        client_port_be: dport,
        vip_port_be: cfg.vip_port_be,
    };
    // SAFETY: a map value, copied out at once.
    let Some(flow) = (unsafe { FLOWS.get(key) }).copied() else {
        return TC_ACT_UNSPEC;
    };
    if flow.backend_id != from {
        return TC_ACT_UNSPEC;
    }
    translate(
        &ctx,
        &pkt,
        (cfg.vip_addr_be, daddr, cfg.vip_port_be, dport),
        SockStat::FlowReply,
    )
}

/// The `BACKENDS` index of the server at `addr:port` (network order).
#[inline(always)]
fn backend_at(addr: u32, port: u16) -> Option<u32> {
    for id in [SOURCE, TARGET] {
        if let Some(b) = BACKENDS.get(id)
            && b.addr_be == addr
            && b.port_be == port
        {
            return Some(id);
        }
    }
    None
}

/// A packet to the VIP: a held connection's (from a hooked socket), or not ours (a process
/// outside the hooked cgroup, which connects to the VIP itself).
#[inline(always)]
fn held_flow_out(ctx: &TcContext, pkt: &Packet, cut: &Cutover, now: u64) -> i32 {
    // SAFETY: `parse` bounds-checked the headers.
    let (saddr, sport, daddr, dport, flags) = unsafe {
        (
            (*pkt.ip).saddr_be,
            (*pkt.tcp).sport_be,
            (*pkt.ip).daddr_be,
            (*pkt.tcp).dport_be,
            (*pkt.tcp).flags,
        )
    };
    let key = CtKey {
        client_addr_be: saddr,
        vip_addr_be: daddr,
        client_port_be: sport,
        vip_port_be: dport,
    };
    let active = ACTIVE.get(0).copied().unwrap_or(u32::MAX);
    let holding = cut.holds(active, now);
    // SAFETY: a map value, copied out at once.
    let known = unsafe { FLOWS.get(key) }.copied();
    let flow = match known {
        Some(flow) if flow.backend_id != PARKED => flow,
        // A retransmit of a parked SYN while the hold runs: the first copy waits in the ring.
        Some(_) if holding => return TC_ACT_SHOT,
        // The parked SYN, re-injected (or retransmitted) after the hold.
        Some(parked) => match commit(&key, parked.created_ns, active) {
            Some(flow) => flow,
            None => return TC_ACT_SHOT,
        },
        None => {
            if !tcp::is_pure_syn(flags) || !held_socket(ctx) {
                return TC_ACT_UNSPEC;
            }
            if holding {
                park(ctx, pkt, &key, now);
                return TC_ACT_SHOT;
            }
            // Connected during a hold that has ended since (its SYN leaves only now).
            match commit(&key, now, active) {
                Some(flow) => flow,
                None => return TC_ACT_SHOT,
            }
        }
    };
    translate(
        ctx,
        pkt,
        (saddr, flow.backend_addr_be, sport, flow.backend_port_be),
        SockStat::FlowForward,
    )
}

/// Whether the packet's socket was connected by the hook during a hold.
#[inline(always)]
fn held_socket(ctx: &TcContext) -> bool {
    // SAFETY: a helper that reads the buffer's socket (0 without one).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: a map value, read at once.
    cookie != 0 && unsafe { SOCKETS.get(cookie) }.is_some_and(|s| s.flags & SOCK_HELD != 0)
}

/// Records the flow as parked and copies its SYN into `HELD`.
#[inline(always)]
fn park(ctx: &TcContext, pkt: &Packet, key: &CtKey, now: u64) {
    let parked = FlowEntry {
        created_ns: now,
        backend_id: PARKED,
        ..FlowEntry::default()
    };
    if FLOWS.insert(key, parked, 0).is_err() {
        count(SockStat::FlowsFull);
        return;
    }
    let flow = hold::flow_of(pkt);
    // SAFETY: reading a field of the context the kernel passed.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    hold::park(ctx.len() as usize, ifindex, now, &flow, |dst, n| {
        // SAFETY: `dst` has room for `n` bytes, and `n` is at most the buffer's length.
        unsafe { aya_ebpf::helpers::bpf_skb_load_bytes(ctx.as_ptr(), 0, dst.cast(), n) }
    });
}

/// Gives a flow the backend `ACTIVE` names now, for the rest of its life.
#[inline(always)]
fn commit(key: &CtKey, created_ns: u64, active: u32) -> Option<FlowEntry> {
    let backend = if active < MAX_BACKENDS {
        BACKENDS.get(active).copied()
    } else {
        None
    };
    let b = backend.filter(|b| b.addr_be != 0)?;
    let flow = FlowEntry {
        created_ns,
        backend_addr_be: b.addr_be,
        backend_port_be: b.port_be,
        _pad0: 0,
        backend_id: active,
        _pad1: 0,
    };
    if FLOWS.insert(key, flow, 0).is_err() {
        count(SockStat::FlowsFull);
        return None;
    }
    Some(flow)
}

/// Rewrites the packet's tuple to `(saddr, daddr, sport, dport)` and lets it go on its way.
#[inline(always)]
fn translate(ctx: &TcContext, pkt: &Packet, to: (u32, u32, u16, u16), stat: SockStat) -> i32 {
    // SAFETY: `parse` bounds-checked the headers; nothing has moved the buffer since.
    let sent = unsafe { nat::rewrite::<true>(&mut *pkt.ip, &mut *pkt.tcp, to.0, to.1, to.2, to.3) };
    let now_in_packet = nat::Sent {
        saddr_be: to.0,
        daddr_be: to.1,
        sport_be: to.2,
        dport_be: to.3,
    };
    if !tc::fix_tcp_checksum(ctx, &sent, &now_in_packet) {
        // A corrupt segment must not go out.
        return TC_ACT_SHOT;
    }
    count(stat);
    TC_ACT_OK
}

/// Whether this is data from a hooked socket to the fenced backend, while the fence holds.
#[inline(always)]
fn fenced(ctx: &TcContext, pkt: &Packet, cut: &Cutover, now: u64) -> bool {
    let fenced = cut.fenced_backend;
    if fenced >= MAX_BACKENDS {
        return false;
    }
    let Some(b) = BACKENDS.get(fenced) else {
        return false;
    };
    // SAFETY: `parse` bounds-checked the headers.
    let (daddr, dport, tot_len, doff) = unsafe {
        (
            (*pkt.ip).daddr_be,
            (*pkt.tcp).dport_be,
            u16::from_be((*pkt.ip).tot_len_be),
            (*pkt.tcp).doff_reserved >> 4,
        )
    };
    if daddr != b.addr_be || dport != b.port_be {
        return false;
    }
    let carries_data = usize::from(tot_len) > IP_LEN + usize::from(doff) * 4;
    let active = ACTIVE.get(0).copied().unwrap_or(u32::MAX);
    if !carries_data || !cut.fences(fenced, active, now) {
        return false;
    }
    // SAFETY: a helper that reads the buffer's socket (0 without one).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: a map value, read at once.
    cookie != 0 && unsafe { SOCKETS.get(cookie) }.is_some()
}
