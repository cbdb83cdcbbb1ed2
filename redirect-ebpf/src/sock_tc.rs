//! Socket mode's TC hooks, on the application host's uplink. A connection that `connect()`
//! sent straight to its backend meets no work here beyond a parse and two map reads per
//! packet (and the fence while one is raised). Their work is the connections opened during a
//! hold, which `connect()` sent to the backend the cutover flips to (the *presumed* one):
//!
//! - egress, during the hold: their SYN is parked (copied into `HELD`, dropped; the flow is
//!   recorded `PARKED`). When the controller re-injects it (or the client retransmits it)
//!   after the hold: if `ACTIVE` is the presumed backend, the SYN goes on untouched and the
//!   connection is direct like any other; if not (the cutover aborted or lapsed), the flow is
//!   given the active backend and translated for its life (DNAT: the source is this host
//!   already, so no SNAT and no port to allocate), and `FLOW_GATE` opens;
//! - ingress, while `FLOW_GATE` is open: a translated flow's replies are shown as from the
//!   presumed backend, so they reach the socket;
//! - egress, during a fence: data from a hooked socket to the fenced backend is dropped, as
//!   the proxy drops it, so a query sent after the fence was raised never reaches the old
//!   server (the controller ends the sessions themselves).

use aya_ebpf::{
    EbpfContext,
    bindings::{
        TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
    },
    helpers::{bpf_get_socket_cookie, bpf_sk_lookup_tcp, bpf_sk_release},
    macros::classifier,
    programs::TcContext,
};
use redirect_common::{
    backend::{MAX_BACKENDS, SOURCE, TARGET},
    config::{Config, FLAG_SOCKET_MODE},
    ct::CtKey,
    cutover::{Cutover, NO_FENCE},
    socket::{FLOW_GATE_NS, FlowEntry, PARKED, SOCK_HELD, SockStat},
    tcp,
};

use crate::{
    ACTIVE, BACKENDS, FLOW_GATE, FLOWS, SOCK_STATS, SOCKETS,
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

/// A parsed TCP/IPv4 packet of socket mode and its tuple (network order).
struct Seen {
    pkt: Packet,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    flags: u8,
    /// It carries payload (what a fence drops).
    carries_data: bool,
}

/// Parses a TCP/IPv4 packet of socket mode; `None` for anything else (passed untouched).
#[inline(always)]
fn parse(ctx: &TcContext) -> Option<(Seen, &'static Config, u64, Cutover)> {
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
    if cfg.flags & FLAG_SOCKET_MODE == 0 {
        return None;
    }
    // SAFETY: `parse` bounds-checked the headers.
    let seen = unsafe {
        Seen {
            saddr: (*pkt.ip).saddr_be,
            daddr: (*pkt.ip).daddr_be,
            sport: (*pkt.tcp).sport_be,
            dport: (*pkt.tcp).dport_be,
            flags: (*pkt.tcp).flags,
            carries_data: usize::from(u16::from_be((*pkt.ip).tot_len_be))
                > IP_LEN + usize::from((*pkt.tcp).doff_reserved >> 4) * 4,
            pkt,
        }
    };
    Some((seen, cfg, now, cut))
}

/// Whether a translated flow may exist (`FLOW_GATE` is open).
#[inline(always)]
fn gate_open(now: u64) -> bool {
    FLOW_GATE.get(0).is_some_and(|until| now < *until)
}

/// The uplink's egress.
#[classifier]
pub fn socket_egress(ctx: TcContext) -> i32 {
    let Some((seen, _, now, cut)) = parse(&ctx) else {
        return TC_ACT_UNSPEC;
    };
    let key = CtKey {
        client_addr_be: seen.saddr,
        vip_addr_be: seen.daddr,
        client_port_be: seen.sport,
        vip_port_be: seen.dport,
    };
    let mut daddr = seen.daddr;
    let mut dport = seen.dport;
    if tcp::is_pure_syn(seen.flags) {
        match held_syn(&ctx, &seen, &key, &cut, now) {
            Held::Other | Held::Direct => {}
            Held::Drop => return TC_ACT_SHOT,
            Held::Translate(flow) => {
                translate_out(&ctx, &seen, &flow);
                daddr = flow.backend_addr_be;
                dport = flow.backend_port_be;
            }
        }
    } else if gate_open(now) {
        // SAFETY: a map value, copied out at once.
        if let Some(flow) = unsafe { FLOWS.get(key) }.copied()
            && flow.backend_id != PARKED
        {
            translate_out(&ctx, &seen, &flow);
            daddr = flow.backend_addr_be;
            dport = flow.backend_port_be;
        }
    }
    if cut.fenced_backend != NO_FENCE && fenced(&ctx, &seen, (daddr, dport), &cut, now) {
        count(SockStat::Fenced);
        return TC_ACT_SHOT;
    }
    TC_ACT_UNSPEC
}

/// The uplink's ingress: replies of translated flows come back from the presumed backend.
#[classifier]
pub fn socket_ingress(ctx: TcContext) -> i32 {
    let Some((seen, _, now, _)) = parse(&ctx) else {
        return TC_ACT_UNSPEC;
    };
    if !gate_open(now) {
        return TC_ACT_UNSPEC;
    }
    let Some(from) = backend_at(seen.saddr, seen.sport) else {
        return TC_ACT_UNSPEC;
    };
    // The flow is keyed by the backend its socket presumed: with two, the other one.
    let Some(presumed) = BACKENDS.get(1 - from).copied() else {
        return TC_ACT_UNSPEC;
    };
    let key = CtKey {
        client_addr_be: seen.daddr,
        vip_addr_be: presumed.addr_be,
        client_port_be: seen.dport,
        vip_port_be: presumed.port_be,
    };
    // SAFETY: a map value, copied out at once.
    let Some(flow) = (unsafe { FLOWS.get(key) }).copied() else {
        return TC_ACT_UNSPEC;
    };
    // The kernel knows the translated socket as talking to the presumed backend, so it may
    // give its port to a direct connection to this backend: that connection's replies are
    // its own, never the translated flow's.
    if flow.backend_id != from || socket_at(&ctx, seen.saddr, seen.sport, seen.daddr, seen.dport) {
        return TC_ACT_UNSPEC;
    }
    rewrite(
        &ctx,
        &seen,
        (presumed.addr_be, seen.daddr, presumed.port_be, seen.dport),
    );
    count(SockStat::FlowReply);
    TC_ACT_UNSPEC
}

/// What becomes of a SYN.
enum Held {
    /// Not a held connection's: it goes on as it is.
    Other,
    /// A held connection's, released to the backend it presumed: it goes on untouched.
    Direct,
    /// Dropped: parked in `HELD` (or a retransmit of a parked one) while the hold runs.
    Drop,
    /// A held connection's, sent to the active backend instead.
    Translate(FlowEntry),
}

/// A SYN of a connection opened during a hold (its flow is in `FLOWS`, or its socket is
/// marked held), and what the hold, and then `ACTIVE`, make of it.
#[inline(always)]
fn held_syn(ctx: &TcContext, seen: &Seen, key: &CtKey, cut: &Cutover, now: u64) -> Held {
    // SAFETY: a map value, copied out at once.
    let known = unsafe { FLOWS.get(key) }.copied();
    if known.is_none() && !held_socket(ctx) {
        return Held::Other;
    }
    let Some(presumed) = backend_at(seen.daddr, seen.dport) else {
        return Held::Other;
    };
    let active = ACTIVE.get(0).copied().unwrap_or(u32::MAX);
    if cut.holds(active, now) {
        if known.is_none() {
            park(ctx, seen, key, now);
        }
        return Held::Drop;
    }
    match known {
        // A retransmitted SYN of a flow already sent elsewhere.
        Some(flow) if flow.backend_id != PARKED => Held::Translate(flow),
        _ if presumed == active => {
            let _ = FLOWS.remove(key);
            count(SockStat::HeldReleasedDirect);
            Held::Direct
        }
        parked => {
            // A connection of this host's to the active backend from the same port would share
            // its tuple on the wire: this one cannot be sent there (its client times out).
            if let Some(b) = BACKENDS.get(active)
                && socket_at(ctx, b.addr_be, b.port_be, seen.saddr, seen.sport)
            {
                count(SockStat::HeldCollision);
                return Held::Drop;
            }
            let created = parked.map_or(now, |f| f.created_ns);
            match send_elsewhere(key, created, active, now) {
                Some(flow) => {
                    count(SockStat::HeldRedirected);
                    Held::Translate(flow)
                }
                None => Held::Drop,
            }
        }
    }
}

/// Whether this host has a connection's socket for `remote` ↔ `local`, as an arriving packet
/// of it would be delivered (network order). Full sockets only: a `TIME_WAIT` of an earlier
/// connection on that tuple is no collision (this host sent its last ACK; the server forgot
/// it), and neither is a listener the lookup falls back to.
#[inline(always)]
fn socket_at(ctx: &TcContext, remote: u32, remote_port: u16, local: u32, local_port: u16) -> bool {
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: remote,
                daddr: local,
                sport: remote_port,
                dport: local_port,
            },
        },
    };
    let size = core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32;
    // SAFETY: a valid context and tuple; the socket found is read, then released at once.
    unsafe {
        let sk = bpf_sk_lookup_tcp(
            ctx.as_ptr(),
            &raw mut tuple,
            size,
            // BPF_F_CURRENT_NETNS (-1), as the u64 the helper takes.
            u64::MAX,
            0,
        );
        if sk.is_null() {
            return false;
        }
        let listening = (*sk).state == TCP_LISTEN;
        bpf_sk_release(sk.cast());
        !listening
    }
}

/// `TCP_LISTEN` (`net/tcp_states.h`).
const TCP_LISTEN: u32 = 10;

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
fn park(ctx: &TcContext, seen: &Seen, key: &CtKey, now: u64) {
    let parked = FlowEntry {
        created_ns: now,
        backend_id: PARKED,
        ..FlowEntry::default()
    };
    if FLOWS.insert(key, parked, 0).is_err() {
        count(SockStat::FlowsFull);
        return;
    }
    let flow = hold::flow_of(&seen.pkt);
    // SAFETY: reading a field of the context the kernel passed.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    hold::park(ctx.len() as usize, ifindex, now, &flow, |dst, n| {
        // SAFETY: `dst` has room for `n` bytes, and `n` is at most the buffer's length.
        unsafe { aya_ebpf::helpers::bpf_skb_load_bytes(ctx.as_ptr(), 0, dst.cast(), n) }
    });
}

/// Gives a held flow the backend `ACTIVE` names now, for the rest of its life, and opens
/// `FLOW_GATE` so its later packets and replies are translated too.
#[inline(always)]
fn send_elsewhere(key: &CtKey, created_ns: u64, active: u32, now: u64) -> Option<FlowEntry> {
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
    if let Some(gate) = FLOW_GATE.get_ptr_mut(0) {
        // SAFETY: an array value; a racing writer writes a time as recent.
        unsafe { *gate = now + FLOW_GATE_NS };
    }
    if FLOWS.insert(key, flow, 0).is_err() {
        count(SockStat::FlowsFull);
        return None;
    }
    Some(flow)
}

/// Sends a translated flow's packet to its backend.
#[inline(always)]
fn translate_out(ctx: &TcContext, seen: &Seen, flow: &FlowEntry) {
    rewrite(
        ctx,
        seen,
        (
            seen.saddr,
            flow.backend_addr_be,
            seen.sport,
            flow.backend_port_be,
        ),
    );
    count(SockStat::FlowForward);
}

/// Rewrites the packet's tuple to `(saddr, daddr, sport, dport)`, checksums included.
#[inline(always)]
fn rewrite(ctx: &TcContext, seen: &Seen, to: (u32, u32, u16, u16)) {
    // SAFETY: `parse` bounds-checked the headers; nothing has moved the buffer since.
    let sent = unsafe {
        nat::rewrite::<true>(
            &mut *seen.pkt.ip,
            &mut *seen.pkt.tcp,
            to.0,
            to.1,
            to.2,
            to.3,
        )
    };
    let now_in_packet = nat::Sent {
        saddr_be: to.0,
        daddr_be: to.1,
        sport_be: to.2,
        dport_be: to.3,
    };
    // Cannot fail for a buffer just written to (its data is linear and writable).
    let _ = tc::fix_tcp_checksum(ctx, &sent, &now_in_packet);
}

/// Whether this is data from a hooked socket to the fenced backend (`to`: where the packet
/// goes now), while the fence holds.
#[inline(always)]
fn fenced(ctx: &TcContext, seen: &Seen, to: (u32, u16), cut: &Cutover, now: u64) -> bool {
    let fenced = cut.fenced_backend;
    if fenced >= MAX_BACKENDS {
        return false;
    }
    let Some(b) = BACKENDS.get(fenced) else {
        return false;
    };
    if to.0 != b.addr_be || to.1 != b.port_be {
        return false;
    }
    let active = ACTIVE.get(0).copied().unwrap_or(u32::MAX);
    if !seen.carries_data || !cut.fences(fenced, active, now) {
        return false;
    }
    // SAFETY: a helper that reads the buffer's socket (0 without one).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: a map value, read at once.
    cookie != 0 && unsafe { SOCKETS.get(cookie) }.is_some()
}
