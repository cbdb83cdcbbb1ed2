//! Connection tracking and the full-NAT rewrite. Independent of the hook: it works on parsed
//! header pointers and returns a verdict, so the same logic backs the XDP and the TC program.
//!
//! `KERNEL_L4: bool` says who updates the TCP checksum. XDP updates it here, incrementally: a
//! frame from a wire always carries a full checksum. A TC hook sees socket buffers, which may
//! carry `CHECKSUM_PARTIAL` (GRO-merged frames, local senders with TX offload): their checksum
//! field holds only the pseudo-header sum, which a port change must not touch at all. Only the
//! kernel knows which, so under TC the field is left alone here and the hook fixes it with
//! `bpf_l4_csum_replace` (see `tc.rs`).

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
};
use redirect_common::{
    backend::{Backend, MAX_BACKENDS},
    config::{Config, FLAG_DROP_NONSYN_MISS},
    csum,
    ct::{
        CtEntry, CtKey, FLAG_BACKEND_CLOSED_FIRST, FLAG_FENCED, FLAG_FIN_CLIENT, FLAG_REOPENED,
        FLAG_RST, SeqSpace, is_closed, port_reusable_at_once,
    },
    cutover::{Cutover, LAPSE_CLOSED, NO_FENCE},
    events::EventKind,
    limits::SNAT_PROBES,
    ports,
    rev::{self, RevEntry, RevKey},
    stats::Stat,
    tcp::{self, Direction, Observed, Segment},
};

use crate::{
    ACTIVE, BACKENDS, CT, REV, count,
    events::{self, Flow},
    headers::{IP_LEN, IcmpError, IcmpHdr, Ipv4Hdr, Packet, QuotedTcp, TcpHdr},
};

/// What to do with a packet after conntrack.
pub enum Verdict {
    /// The headers were rewritten: forward the packet toward its new destination. Carries the
    /// addresses and ports as the sender sent them, for a fragmentation-needed error back to
    /// it (none for an ICMP error itself: no error about an error).
    Forward(Option<Sent>),
    /// Not ours or not translatable: hand it to the stack untouched.
    Pass,
    /// Drop it (the reason is already counted).
    Drop,
    /// A new connection's SYN while new connections are held: park it (untouched).
    Hold,
}

/// A TCP packet's addresses and ports as its sender sent them (before translation).
#[derive(Clone, Copy)]
#[expect(
    clippy::struct_field_names,
    reason = "every field is in network byte order, and says so"
)]
pub struct Sent {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
}

const EEXIST: i32 = 17;

/// Runs conntrack for one parsed TCP/IPv4 packet and rewrites it in place.
#[inline(always)]
pub fn process<const KERNEL_L4: bool>(
    pkt: &Packet,
    cfg: &Config,
    cut: &Cutover,
    now: u64,
) -> Verdict {
    // SAFETY: `parse` bounds-checked every header.
    let (ip, tcp) = unsafe { (&mut *pkt.ip, &mut *pkt.tcp) };
    if ip.daddr_be == cfg.vip_addr_be && tcp.dport_be == cfg.vip_port_be {
        forward::<KERNEL_L4>(ip, tcp, cfg, cut, now)
    } else {
        reply::<KERNEL_L4>(ip, tcp, now)
    }
}

/// Client → VIP.
#[inline(always)]
fn forward<const KERNEL_L4: bool>(
    ip: &mut Ipv4Hdr,
    tcp: &mut TcpHdr,
    cfg: &Config,
    cut: &Cutover,
    now: u64,
) -> Verdict {
    let key = CtKey {
        client_addr_be: ip.saddr_be,
        vip_addr_be: ip.daddr_be,
        client_port_be: tcp.sport_be,
        vip_port_be: tcp.dport_be,
    };
    let flags = tcp.flags;
    let pure_syn = tcp::is_pure_syn(flags);
    if cut.fenced_backend != NO_FENCE {
        report_if_lease_expired(&key, cut, now);
    }
    if let Some(entry) = CT.get_ptr_mut(key) {
        // SAFETY: a valid map value pointer; concurrent updates of `flags`/`last_seen_ns`
        // from another CPU can lose an OR (benign, as in Cilium: the GC then relies on the
        // idle timeout instead of the close timeout).
        let entry = unsafe { &mut *entry };
        // A SYN after the client's own FIN is a new connection: the old one can send no SYN.
        if !(pure_syn && (is_closed(entry.flags) || entry.flags & FLAG_FIN_CLIENT != 0)) {
            if entry.backend_id == cut.fenced_backend
                && carries_data(ip, tcp)
                && cut.fences(entry.backend_id, active_backend(), now)
            {
                // The write fence: nothing a client sends (a query, a COMMIT) reaches the
                // fenced server, whatever the role. Bare ACKs, FINs and RSTs still pass, so
                // replies are acknowledged and connections can still close.
                if entry.flags & FLAG_FENCED == 0 {
                    entry.flags |= FLAG_FENCED;
                }
                entry.fenced_ack_be = tcp.ack_seq_be;
                count(Stat::Fenced);
                return Verdict::Drop;
            }
            // Established packets and retransmitted SYNs keep the backend they started with,
            // whatever ACTIVE says now.
            if !observed(&key, entry, Direction::Forward, segment(ip, tcp), now) {
                return Verdict::Drop;
            }
            count(Stat::ForwardTracked);
            let e = *entry;
            let sent = rewrite::<KERNEL_L4>(
                ip,
                tcp,
                e.snat_addr_be,
                e.backend_addr_be,
                e.snat_port_be,
                e.backend_port_be,
            );
            return Verdict::Forward(Some(sent));
        }
        // The client reused the port of a closed connection: a new connection, which goes
        // to the active backend with a fresh SNAT port.
        if cut.holds(active_backend(), now) {
            return Verdict::Hold;
        }
        if cut.refuses(active_backend(), now) {
            count(Stat::SynUnconfirmed);
            return Verdict::Drop;
        }
        // Usually freed already when it closed; this covers a close seen out of order.
        let closed = *entry;
        release_port(&key, &closed);
        return open::<KERNEL_L4>(&key, ip, tcp, cfg, now, true);
    }
    if !pure_syn {
        // Never load balance a mid-stream packet: after a flip it would land on the other
        // server. The stack answers it with a RST (or it is dropped, by config).
        count(Stat::NonSynMiss);
        return if cfg.flags & FLAG_DROP_NONSYN_MISS != 0 {
            Verdict::Drop
        } else {
            Verdict::Pass
        };
    }
    if cut.holds(active_backend(), now) {
        return Verdict::Hold;
    }
    if cut.refuses(active_backend(), now) {
        count(Stat::SynUnconfirmed);
        let backend = BACKENDS
            .get(cut.fenced_backend)
            .copied()
            .unwrap_or_default();
        events::send(
            EventKind::Unconfirmed,
            &flow_of(&key, backend.addr_be, backend.port_be),
            0,
            now,
        );
        return Verdict::Drop;
    }
    open::<KERNEL_L4>(&key, ip, tcp, cfg, now, false)
}

/// The cutover lease ran out while its fenced backend is still active: the kernel lifted the
/// hold and the fence on its own, as designed for a dead controller. Worth a line if a
/// controller is alive to read it (it is then stuck).
#[inline(always)]
fn report_if_lease_expired(key: &CtKey, cut: &Cutover, now: u64) {
    // During a hold the fence deadline is still 0, and after the flip the fence is permanent:
    // only both deadlines past, with the fenced backend still active, is a lapse.
    let deadline = if cut.hold_until_ns > cut.fence_until_ns {
        cut.hold_until_ns
    } else {
        cut.fence_until_ns
    };
    // A closed lapse (a fleet member) lifts nothing: it drops, and says so (`Unconfirmed`).
    if deadline == 0
        || now < deadline
        || active_backend() != cut.fenced_backend
        || cut.flags & LAPSE_CLOSED != 0
    {
        return;
    }
    let backend = BACKENDS
        .get(cut.fenced_backend)
        .copied()
        .unwrap_or_default();
    events::send(
        EventKind::LeaseExpired,
        &flow_of(key, backend.addr_be, backend.port_be),
        0,
        now,
    );
}

/// A flow for an event's log line.
#[inline(always)]
fn flow_of(key: &CtKey, backend_addr_be: u32, backend_port_be: u16) -> Flow {
    Flow {
        client_addr_be: key.client_addr_be,
        client_port_be: key.client_port_be,
        backend_addr_be,
        backend_port_be,
    }
}

/// The `BACKENDS` index new connections go to (`NO_FENCE`, matching nothing, if unset).
#[inline(always)]
fn active_backend() -> u32 {
    ACTIVE.get(0).copied().unwrap_or(NO_FENCE)
}

/// A pure SYN with no live entry: pick the active backend, claim a SNAT port, track it.
#[inline(always)]
fn open<const KERNEL_L4: bool>(
    key: &CtKey,
    ip: &mut Ipv4Hdr,
    tcp: &mut TcpHdr,
    cfg: &Config,
    now: u64,
    reopen: bool,
) -> Verdict {
    // The precise clock, once per connection: `created_ns` is the connection's identity on its
    // client tuple (`conn_id`), which the coarse per-packet clock would give every SYN of one
    // jiffy, and a tuple can come back that fast (after a RST, or behind a NAT).
    // SAFETY: a helper with no preconditions.
    let created = unsafe { bpf_ktime_get_ns() };
    let active = ACTIVE.get(0).copied().unwrap_or(NO_FENCE);
    let Some(backend) = backend_for_new(key, active, now) else {
        return Verdict::Drop;
    };
    let Some(rev_key) = claim_snat_port(key, &backend, cfg, created, now) else {
        return Verdict::Drop;
    };
    let entry = CtEntry {
        // A SYN may carry data (TCP Fast Open): sent up to its end, acknowledged up to the SYN.
        client_seq: tcp::opened_by(&segment(ip, tcp)),
        backend_seq: SeqSpace::default(),
        created_ns: created,
        last_seen_ns: now,
        backend_addr_be: backend.addr_be,
        snat_addr_be: backend.snat_addr_be,
        backend_port_be: backend.port_be,
        snat_port_be: rev_key.snat_port_be,
        backend_id: active,
        flags: if reopen { FLAG_REOPENED } else { 0 },
        fenced_ack_be: 0,
    };
    if let Err(verdict) = track::<KERNEL_L4>(key, &entry, rev_key, reopen, ip, tcp, now) {
        return verdict;
    }
    count(if reopen {
        Stat::ConnReopened
    } else if active == redirect_common::backend::SOURCE {
        Stat::NewConnSource
    } else {
        Stat::NewConnTarget
    });
    let sent = rewrite::<KERNEL_L4>(
        ip,
        tcp,
        entry.snat_addr_be,
        entry.backend_addr_be,
        entry.snat_port_be,
        entry.backend_port_be,
    );
    Verdict::Forward(Some(sent))
}

/// The backend `ACTIVE` names for a new connection; `None` (counted) if it is unset.
#[inline(always)]
fn backend_for_new(key: &CtKey, active: u32, now: u64) -> Option<Backend> {
    let backend = if active < MAX_BACKENDS {
        BACKENDS.get(active).copied().unwrap_or_default()
    } else {
        Backend::default()
    };
    if backend.addr_be == 0 {
        count(Stat::BadActive);
        events::send(EventKind::BadActive, &flow_of(key, 0, 0), active, now);
        return None;
    }
    Some(backend)
}

/// A free SNAT port towards `backend`, claimed in `REV` for this client tuple; `None`
/// (counted) when every probe found its port taken, or the map is full.
#[inline(always)]
fn claim_snat_port(
    key: &CtKey,
    backend: &Backend,
    cfg: &Config,
    created: u64,
    now: u64,
) -> Option<RevKey> {
    let rev_value = RevEntry {
        client_addr_be: key.client_addr_be,
        vip_addr_be: key.vip_addr_be,
        client_port_be: key.client_port_be,
        vip_port_be: key.vip_port_be,
        conn_id: rev::conn_id(created),
        orphaned_ns: 0,
    };
    let client_port = u16::from_be(key.client_port_be);
    for attempt in 0..SNAT_PROBES {
        // SAFETY: a helper with no preconditions.
        let random = unsafe { bpf_get_prandom_u32() };
        let port = ports::candidate(
            client_port,
            random,
            attempt,
            cfg.snat_port_min,
            cfg.snat_port_max,
        );
        let rev_key = RevKey {
            backend_addr_be: backend.addr_be,
            snat_addr_be: backend.snat_addr_be,
            backend_port_be: backend.port_be,
            snat_port_be: port.to_be(),
        };
        match REV.insert(rev_key, rev_value, u64::from(BPF_NOEXIST)) {
            Ok(()) => return Some(rev_key),
            Err(e) if e == -EEXIST => {}
            Err(_) => {
                count(Stat::CtFull);
                let flow = flow_of(key, backend.addr_be, backend.port_be);
                events::send(EventKind::CtFull, &flow, 0, now);
                return None;
            }
        }
    }
    count(Stat::SnatExhausted);
    let flow = flow_of(key, backend.addr_be, backend.port_be);
    events::send(EventKind::SnatExhausted, &flow, 0, now);
    None
}

/// Tracks the new connection in `CT`. A reopen overwrites the closed entry; a new one must
/// not race a retransmitted SYN that another CPU is handling at the same instant: the loser
/// gives its port back and forwards with the winner's translation (`Err` carries that
/// verdict, or a drop when the table is full).
#[inline(always)]
fn track<const KERNEL_L4: bool>(
    key: &CtKey,
    entry: &CtEntry,
    rev_key: RevKey,
    reopen: bool,
    ip: &mut Ipv4Hdr,
    tcp: &mut TcpHdr,
    now: u64,
) -> Result<(), Verdict> {
    let insert_flags = if reopen { 0 } else { u64::from(BPF_NOEXIST) };
    let Err(e) = CT.insert(key, entry, insert_flags) else {
        return Ok(());
    };
    let _ = REV.remove(rev_key);
    if e == -EEXIST {
        // Lost the race: use the winner's translation.
        if let Some(winner) = CT.get_ptr(key) {
            // SAFETY: a valid map value pointer.
            let w = unsafe { *winner };
            count(Stat::ForwardTracked);
            let sent = rewrite::<KERNEL_L4>(
                ip,
                tcp,
                w.snat_addr_be,
                w.backend_addr_be,
                w.snat_port_be,
                w.backend_port_be,
            );
            return Err(Verdict::Forward(Some(sent)));
        }
    }
    count(Stat::CtFull);
    let flow = flow_of(key, entry.backend_addr_be, entry.backend_port_be);
    events::send(EventKind::CtFull, &flow, 0, now);
    Err(Verdict::Drop)
}

/// Backend → SNAT address: translate back to VIP → client.
#[inline(always)]
fn reply<const KERNEL_L4: bool>(ip: &mut Ipv4Hdr, tcp: &mut TcpHdr, now: u64) -> Verdict {
    let rev_key = RevKey {
        backend_addr_be: ip.saddr_be,
        snat_addr_be: ip.daddr_be,
        backend_port_be: tcp.sport_be,
        snat_port_be: tcp.dport_be,
    };
    let Some(rev) = REV.get_ptr(rev_key) else {
        count(Stat::PassNotOurs);
        return Verdict::Pass;
    };
    // SAFETY: a valid map value pointer.
    let rev = unsafe { *rev };
    let key = CtKey {
        client_addr_be: rev.client_addr_be,
        vip_addr_be: rev.vip_addr_be,
        client_port_be: rev.client_port_be,
        vip_port_be: rev.vip_port_be,
    };
    let Some(entry) = CT.get_ptr_mut(key) else {
        count(Stat::ReplyOrphan);
        return Verdict::Pass;
    };
    // SAFETY: a valid map value pointer (see `forward` on concurrent updates).
    let entry = unsafe { &mut *entry };
    if entry.snat_port_be != rev_key.snat_port_be
        || entry.backend_addr_be != rev_key.backend_addr_be
        || entry.backend_port_be != rev_key.backend_port_be
        || entry.snat_addr_be != rev_key.snat_addr_be
    {
        // A quarantined port whose client tuple now belongs to a newer connection: the
        // backend is talking about the old one, which the client no longer has.
        count(Stat::ReplyOrphan);
        return Verdict::Pass;
    }
    if !observed(&key, entry, Direction::Reply, segment(ip, tcp), now) {
        return Verdict::Drop;
    }
    count(Stat::ReplyTracked);
    let sent = rewrite::<KERNEL_L4>(
        ip,
        tcp,
        rev.vip_addr_be,
        rev.client_addr_be,
        rev.vip_port_be,
        rev.client_port_be,
    );
    Verdict::Forward(Some(sent))
}

/// An ICMP error about a tracked connection, from a router on either side: translated like
/// the connection's own packets, outer destination and quoted packet alike, so the sender of
/// the quoted packet (the client, or the backend) learns the path MTU or the failure.
#[inline(always)]
pub fn icmp_error(err: &IcmpError, cfg: &Config) -> Verdict {
    // SAFETY: `parse` bounds-checked every header.
    let (ip, icmp, inner, quoted) = unsafe {
        (
            &mut *err.ip,
            &mut *err.icmp,
            &mut *err.inner_ip,
            &mut *err.inner_tcp,
        )
    };
    if inner.saddr_be == cfg.vip_addr_be && quoted.sport_be == cfg.vip_port_be {
        // About a packet the VIP sent to a client: it was the backend's, sent to the SNAT port.
        if ip.daddr_be != cfg.vip_addr_be {
            return Verdict::Pass;
        }
        let key = CtKey {
            client_addr_be: inner.daddr_be,
            vip_addr_be: inner.saddr_be,
            client_port_be: quoted.dport_be,
            vip_port_be: quoted.sport_be,
        };
        let Some(e) = CT.get_ptr(key) else {
            count(Stat::IcmpUntracked);
            return Verdict::Pass;
        };
        // SAFETY: a valid map value pointer.
        let e = unsafe { *e };
        translate_icmp(
            ip,
            icmp,
            inner,
            quoted,
            e.backend_addr_be,
            (e.backend_addr_be, e.backend_port_be),
            (e.snat_addr_be, e.snat_port_be),
        );
    } else {
        // About a packet this host sent to a backend from a SNAT port: it was the client's.
        if ip.daddr_be != inner.saddr_be {
            return Verdict::Pass;
        }
        let rev_key = RevKey {
            backend_addr_be: inner.daddr_be,
            snat_addr_be: inner.saddr_be,
            backend_port_be: quoted.dport_be,
            snat_port_be: quoted.sport_be,
        };
        let Some(rev) = REV.get_ptr(rev_key) else {
            count(Stat::IcmpUntracked);
            return Verdict::Pass;
        };
        // SAFETY: a valid map value pointer.
        let rev = unsafe { *rev };
        translate_icmp(
            ip,
            icmp,
            inner,
            quoted,
            rev.client_addr_be,
            (rev.client_addr_be, rev.client_port_be),
            (rev.vip_addr_be, rev.vip_port_be),
        );
    }
    count(Stat::IcmpTranslated);
    Verdict::Forward(None)
}

/// Rewrites an ICMP error's outer destination and its quoted packet's addresses and ports.
/// The ICMP checksum covers the quote, so every quoted word that changes (including the quoted
/// IP header's own checksum) is folded into it. The quoted TCP checksum is left alone: a quote
/// rarely holds it, and no receiver checks it.
#[inline(always)]
fn translate_icmp(
    ip: &mut Ipv4Hdr,
    icmp: &mut IcmpHdr,
    inner: &mut Ipv4Hdr,
    quoted: &mut QuotedTcp,
    outer_dst: u32,
    src: (u32, u16),
    dst: (u32, u16),
) {
    ip.check = csum::replace4(ip.check, ip.daddr_be, outer_dst);
    ip.daddr_be = outer_dst;
    let inner_check = csum::replace4(
        csum::replace4(inner.check, inner.saddr_be, src.0),
        inner.daddr_be,
        dst.0,
    );
    let mut c = csum::replace4(icmp.check, inner.saddr_be, src.0);
    c = csum::replace4(c, inner.daddr_be, dst.0);
    c = csum::replace2(c, quoted.sport_be, src.1);
    c = csum::replace2(c, quoted.dport_be, dst.1);
    c = csum::replace2(c, inner.check, inner_check);
    icmp.check = c;
    inner.check = inner_check;
    inner.saddr_be = src.0;
    inner.daddr_be = dst.0;
    quoted.sport_be = src.1;
    quoted.dport_be = dst.1;
}

/// Whether the segment has a payload (IPv4 total length beyond both headers).
#[inline(always)]
fn carries_data(ip: &Ipv4Hdr, tcp: &TcpHdr) -> bool {
    let headers = IP_LEN + usize::from(tcp.doff_reserved >> 4) * 4;
    usize::from(u16::from_be(ip.tot_len_be)) > headers
}

/// The segment's sequence numbers and payload length, for conntrack.
#[inline(always)]
fn segment(ip: &Ipv4Hdr, tcp: &TcpHdr) -> Segment {
    let headers = (IP_LEN + usize::from(tcp.doff_reserved >> 4) * 4) as u32;
    Segment {
        flags: tcp.flags,
        seq: u32::from_be(tcp.seq_be),
        ack: u32::from_be(tcp.ack_seq_be),
        len: u32::from(u16::from_be(ip.tot_len_be)).saturating_sub(headers),
    }
}

/// Runs conntrack on a tracked connection's segment; `false` means drop it (counted). A
/// connection whose backend will hold no `TIME_WAIT` frees its SNAT port once nothing more can
/// come back on it: at a RST, or when the client acknowledges the backend's FIN.
#[inline(always)]
fn observed(key: &CtKey, entry: &mut CtEntry, dir: Direction, seg: Segment, now: u64) -> bool {
    let was_closed = is_closed(entry.flags);
    match tcp::observe(entry, dir, seg) {
        Observed::RstOutOfWindow => {
            count(Stat::RstOutOfWindow);
            return false;
        }
        Observed::RstChallenged => count(Stat::RstChallenged),
        Observed::SynOnLive => count(Stat::SynOnLive),
        Observed::HandshakeCompleted => count(Stat::HandshakeCompleted),
        Observed::Tracked => {}
    }
    entry.last_seen_ns = now;
    let flags = entry.flags;
    if !is_closed(flags) {
        return true;
    }
    if !was_closed {
        count(if flags & FLAG_RST != 0 {
            Stat::ClosedByReset
        } else if flags & FLAG_BACKEND_CLOSED_FIRST != 0 {
            Stat::ClosedBackendFirst
        } else {
            Stat::ClosedClientFirst
        });
    }
    let last_ack_of_client = dir == Direction::Forward
        && seg.flags & tcp::ACK != 0
        && !tcp::seq_after(entry.backend_seq.next, seg.ack);
    if (!was_closed && flags & FLAG_RST != 0) || last_ack_of_client {
        let closed = *entry;
        release_port(key, &closed);
    }
    true
}

/// Frees the SNAT port of a closed connection if the backend holds no `TIME_WAIT` for it (the
/// client closed first, or a RST ended it), instead of leaving it to the garbage collector:
/// the port budget then no longer depends on how often the GC runs.
///
/// Only replies need the port's `REV` entry. It goes once the client has acknowledged all the
/// backend sent, FIN included, so no data can still need retransmitting; if that last ACK is
/// lost on the way to the backend, the backend's retransmitted FIN gets a RST from the proxy's
/// stack, which ends its `LAST_ACK` just as well. The `CT` entry stays for the close timeout.
#[inline(always)]
fn release_port(key: &CtKey, old: &CtEntry) {
    if !port_reusable_at_once(old.flags) {
        return;
    }
    let rev_key = old.rev_key();
    // Only if the port is still this connection's: never free another connection's claim,
    // nor a newer connection's of the same client tuple.
    let Some(rev) = REV.get_ptr(rev_key) else {
        return;
    };
    // SAFETY: a valid map value pointer.
    let rev = unsafe { *rev };
    if rev.belongs_to(key, old) && REV.remove(rev_key).is_ok() {
        count(Stat::PortReleased);
    }
}

/// Rewrites both addresses and both ports, updating the IPv4 and (unless `KERNEL_L4`) the TCP
/// checksum incrementally (RFC 1624). Addresses are in the TCP pseudo-header, so they change
/// both checksums. Returns what the sender had sent.
#[inline(always)]
pub fn rewrite<const KERNEL_L4: bool>(
    ip: &mut Ipv4Hdr,
    tcp: &mut TcpHdr,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
) -> Sent {
    let sent = Sent {
        saddr_be: ip.saddr_be,
        daddr_be: ip.daddr_be,
        sport_be: tcp.sport_be,
        dport_be: tcp.dport_be,
    };
    let ip_check = csum::replace4(
        csum::replace4(ip.check, ip.saddr_be, saddr),
        ip.daddr_be,
        daddr,
    );
    if !KERNEL_L4 {
        let mut tcp_check = csum::replace4(tcp.check, ip.saddr_be, saddr);
        tcp_check = csum::replace4(tcp_check, ip.daddr_be, daddr);
        tcp_check = csum::replace2(tcp_check, tcp.sport_be, sport);
        tcp_check = csum::replace2(tcp_check, tcp.dport_be, dport);
        tcp.check = tcp_check;
    }
    ip.check = ip_check;
    ip.saddr_be = saddr;
    ip.daddr_be = daddr;
    tcp.sport_be = sport;
    tcp.dport_be = dport;
    sent
}
