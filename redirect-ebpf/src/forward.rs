//! Sends a rewritten packet on its way: `bpf_fib_lookup`, then out of the same interface
//! (`XDP_TX`), to another attached interface (`XDP_REDIRECT`; under TC both are
//! `bpf_redirect` to an egress), or to the stack to route it (no neighbour entry yet,
//! forwarding disabled, an interface we may not redirect to). The packet is fully rewritten
//! before any of these, so the fallback is always correct.
//!
//! A packet too big for the next hop (the lookup's MTU check) cannot go to the stack: it would
//! send its fragmentation-needed error to the translated source, an address of this host. So
//! the datapath answers the original sender itself (Katran does the same), quoting the packet
//! as that sender sent it, and PMTU discovery works through the proxy.

use aya_ebpf::{
    EbpfContext,
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC, bpf_fib_lookup as FibParams, xdp_action},
    btf_maps::PerCpuArray,
    helpers::{
        bpf_check_mtu, bpf_fib_lookup, bpf_redirect, bpf_skb_change_tail, bpf_xdp_adjust_tail,
    },
    macros::btf_map,
    programs::{TcContext, XdpContext},
};
use redirect_common::{config::FLAG_FIB_EVERY_PACKET, csum, stats::Stat};

use crate::{
    TX_PORTS, count,
    headers::{
        ETH_LEN, EthHdr, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMP_LEN, IP_LEN, IPPROTO_ICMP,
        IcmpHdr, Ipv4Hdr, QUOTED_LEN, QuotedTcp, TCP_LEN,
    },
    nat::Sent,
};

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_FRAG_NEEDED: i64 = 8;
const IP_DF_BE: u16 = 0x4000u16.to_be();
/// A fragmentation-needed error: headers, ICMP header, quoted IP header and 8 bytes of TCP.
const ERROR_FRAME_LEN: usize = ETH_LEN + IP_LEN + ICMP_LEN + IP_LEN + QUOTED_LEN;

/// Where the kernel's FIB sends a rewritten packet.
enum Hop {
    /// Out of `ifindex` (the ingress interface, or another attached one), with these MACs,
    /// on a route of this MTU.
    Next {
        ifindex: u32,
        smac: [u8; 6],
        dmac: [u8; 6],
        mtu: u16,
    },
    /// The next hop's MTU is below the packet's size, and the packet says Don't Fragment.
    TooBig { mtu: u16 },
    /// Anything else (no neighbour entry yet, forwarding disabled, an interface we may not
    /// send to): the stack routes the packet, which is fully rewritten, so that is correct.
    Stack,
}

/// Looks up the next hop of the packet whose IPv4 header is `ip`, checking `tot_len` bytes
/// against the route's MTU.
/// `check_owned`: whether to check here that the interface is one we may send to (XDP leaves
/// that to `bpf_redirect_map`, whose miss is the same answer without a second lookup).
#[inline(always)]
fn lookup(
    ctx: *mut core::ffi::c_void,
    ip: &Ipv4Hdr,
    ingress: u32,
    tot_len: u16,
    check_owned: bool,
) -> Hop {
    // SAFETY: an all-zero `bpf_fib_lookup` is a valid (empty) request.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = ip.protocol;
    params.__bindgen_anon_1.tot_len = tot_len;
    params.ifindex = ingress;
    params.__bindgen_anon_3.ipv4_src = ip.saddr_be;
    params.__bindgen_anon_4.ipv4_dst = ip.daddr_be;
    // SAFETY: `params` is a live, correctly sized `bpf_fib_lookup`.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx,
            &raw mut params,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED && ip.frag_off_be & IP_DF_BE != 0 {
        // SAFETY: reading a union field the kernel wrote for this return code.
        let mtu = unsafe { params.__bindgen_anon_1.mtu_result };
        return Hop::TooBig { mtu };
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        return Hop::Stack;
    }
    if check_owned && params.ifindex != ingress && TX_PORTS.get(params.ifindex).is_none() {
        // Not an interface we own: the MACs would be wrong for the stack, so leave them.
        return Hop::Stack;
    }
    Hop::Next {
        ifindex: params.ifindex,
        smac: params.smac,
        dmac: params.dmac,
        // SAFETY: on success the kernel writes the route's MTU here (`bpf_fib_set_fwd_params`).
        mtu: unsafe { params.__bindgen_anon_1.mtu_result },
    }
}

/// How long a cached next hop is used before the FIB is asked again: a route or neighbour
/// change (a new MAC after a failover) reaches the datapath within this.
const NEXT_HOP_TTL_NS: u64 = 100_000_000;
/// 2^8: the slot is a hash's top 8 bits.
const NEXT_HOP_SLOTS: u32 = 256;

/// One cached FIB answer for a destination reached from an ingress interface.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NextHop {
    daddr_be: u32,
    ingress: u32,
    ifindex: u32,
    mtu: u32,
    expires_ns: u64,
    smac: [u8; 6],
    dmac: [u8; 6],
    _pad: [u8; 4],
}

/// Per-CPU, direct-mapped next-hop cache (both hooks). `bpf_fib_lookup` was 40% of the program's
/// time (`cargo xtask bench --profile`): a full FIB walk, a neighbour lookup and a uid mapping
/// for every packet, for the same few destinations. Per CPU, so nothing bounces between
/// cores; a collision only costs a lookup. Not pinned: a fresh program starts empty.
///
/// Keyed by destination and ingress only, not source: `ip rule from ...` policy routing by
/// source is not followed for up to the TTL. Nor is an interface leaving `TX_PORTS` (TC checks
/// ownership on a miss only); the TTL bounds both.
#[btf_map(name = "NEXTHOPS")]
static NEXTHOPS: PerCpuArray<NextHop, { NEXT_HOP_SLOTS as usize }> = PerCpuArray::new();

/// The next hop for `daddr_be` from `ingress` for `tot_len` bytes (see [`lookup`]): the
/// cache's if still fresh and the packet fits its MTU (a packet that does not goes to the FIB,
/// which answers `TooBig`), else the FIB's, which is then cached. `cfg_flags` may ask for the
/// FIB every time (`FLAG_FIB_EVERY_PACKET`).
#[inline(always)]
fn cached_lookup(
    ctx: *mut core::ffi::c_void,
    ip: &Ipv4Hdr,
    ingress: u32,
    tot_len: u16,
    check_owned: bool,
    (now, cfg_flags): (u64, u32),
) -> Hop {
    if cfg_flags & FLAG_FIB_EVERY_PACKET != 0 {
        return lookup(ctx, ip, ingress, tot_len, check_owned);
    }
    let daddr = ip.daddr_be;
    // Every bit of the address counts (clients in one /24 must not share a slot): a
    // multiplicative hash, its top 8 bits.
    let mixed = u32::from_be(daddr).wrapping_mul(0x9E37_79B1) ^ ingress.wrapping_mul(0x85EB_CA6B);
    let slot = mixed.wrapping_mul(0x9E37_79B1) >> 24;
    let entry = NEXTHOPS.get_ptr_mut(slot);
    if let Some(e) = entry {
        // SAFETY: a per-CPU value: no other writer.
        let e = unsafe { &*e };
        if e.daddr_be == daddr
            && e.ingress == ingress
            && now < e.expires_ns
            && u32::from(tot_len) <= e.mtu
        {
            return Hop::Next {
                ifindex: e.ifindex,
                smac: e.smac,
                dmac: e.dmac,
                mtu: e.mtu as u16,
            };
        }
    }
    let hop = lookup(ctx, ip, ingress, tot_len, check_owned);
    if let (
        Some(e),
        Hop::Next {
            ifindex,
            smac,
            dmac,
            mtu,
        },
    ) = (entry, &hop)
    {
        // SAFETY: as above.
        unsafe {
            *e = NextHop {
                daddr_be: daddr,
                ingress,
                ifindex: *ifindex,
                mtu: u32::from(*mtu),
                expires_ns: now + NEXT_HOP_TTL_NS,
                smac: *smac,
                dmac: *dmac,
                _pad: [0; 4],
            };
        }
    }
    hop
}

/// Forwards the rewritten frame whose headers are at `eth` and `ip` (XDP). `sent` is what its
/// sender sent (for an error back to it); `None` for an ICMP error.
#[inline(always)]
pub fn xdp(
    ctx: &XdpContext,
    eth: *mut EthHdr,
    ip: *mut Ipv4Hdr,
    sent: Option<Sent>,
    now: u64,
    cfg_flags: u32,
) -> u32 {
    // SAFETY: headers were bounds-checked by `parse`.
    let (ip, eth) = unsafe { (&*ip, &mut *eth) };
    let ingress = ctx.ingress_ifindex() as u32;
    let hop = cached_lookup(
        ctx.as_ptr(),
        ip,
        ingress,
        u16::from_be(ip.tot_len_be),
        false,
        (now, cfg_flags),
    );
    let (ifindex, smac, dmac) = match hop {
        Hop::Next {
            ifindex,
            smac,
            dmac,
            ..
        } => (ifindex, smac, dmac),
        Hop::TooBig { mtu } => {
            // A frame larger than its ingress MTU was merged by GRO before generic
            // (skb-mode) XDP saw it; its segments may fit, and the stack re-segments it. It
            // is answered only if the next hop's MTU is below the ingress MTU too (a sender
            // told an MTU at or above its segment size ignores it, so that is harmless).
            let (fits, ingress_mtu) = ingress_mtu(ctx, ingress);
            if let Some(sent) = sent
                && (fits || u32::from(mtu) < ingress_mtu)
            {
                return frag_needed_xdp(ctx, &sent, mtu);
            }
            count(Stat::FibPass);
            return xdp_action::XDP_PASS;
        }
        Hop::Stack => {
            count(Stat::FibPass);
            return xdp_action::XDP_PASS;
        }
    };
    if ifindex == ingress {
        eth.src = smac;
        eth.dst = dmac;
        count(Stat::FibTx);
        return xdp_action::XDP_TX;
    }
    // Only records where the frame goes; it leaves after the program returns, so the MACs
    // are written after a success. A miss (an interface we do not own: the MACs would be
    // wrong for the stack) leaves the frame untouched for the stack.
    if let Ok(action) = TX_PORTS.redirect(ifindex, u64::from(xdp_action::XDP_PASS)) {
        eth.src = smac;
        eth.dst = dmac;
        count(Stat::FibRedirect);
        action
    } else {
        count(Stat::FibPass);
        xdp_action::XDP_PASS
    }
}

/// Forwards the rewritten socket buffer (TC ingress): `bpf_redirect` to the egress of the
/// next hop's interface, where a GSO buffer is segmented and a partial checksum completed.
#[inline(always)]
pub fn tc(ctx: &TcContext, sent: Option<Sent>, now: u64, cfg_flags: u32) -> i32 {
    let data = ctx.data();
    if data + ETH_LEN + IP_LEN > ctx.data_end() {
        count(Stat::FibPass);
        return TC_ACT_UNSPEC;
    }
    // SAFETY: bounds checked above (the checksum helpers invalidated the parser's pointers).
    let (eth, ip) = unsafe {
        (
            &mut *(data as *mut EthHdr),
            &*((data + ETH_LEN) as *const Ipv4Hdr),
        )
    };
    // SAFETY: reading fields of the context the kernel passed.
    let (ingress, gso_size) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).gso_size) };
    // The route's MTU applies to each segment: the whole buffer, or for a GSO buffer (merged
    // by GRO, or from a local sender with TSO) its segment size plus headers. A TCP header's
    // length is at most 60 bytes; the kernel's own check uses the exact one, which the
    // segment size already leaves room for when the sender chose it from this route.
    let tot_len = if gso_size == 0 {
        u16::from_be(ip.tot_len_be)
    } else {
        (gso_size as u16).saturating_add((IP_LEN + TCP_LEN) as u16)
    };
    match cached_lookup(ctx.as_ptr(), ip, ingress, tot_len, true, (now, cfg_flags)) {
        Hop::Next {
            ifindex,
            smac,
            dmac,
            ..
        } => {
            eth.src = smac;
            eth.dst = dmac;
            count(if ifindex == ingress {
                Stat::FibTx
            } else {
                Stat::FibRedirect
            });
            // SAFETY: a helper with no preconditions; it returns TC_ACT_REDIRECT.
            unsafe { bpf_redirect(ifindex, 0) as i32 }
        }
        Hop::TooBig { mtu } if let Some(sent) = sent => frag_needed_tc(ctx, ingress, &sent, mtu),
        Hop::TooBig { .. } | Hop::Stack => {
            count(Stat::FibPass);
            TC_ACT_UNSPEC
        }
    }
}

/// Turns the too-big frame into an ICMP fragmentation-needed error and sends it back out of
/// the interface it came in on (XDP).
#[inline(always)]
fn frag_needed_xdp(ctx: &XdpContext, sent: &Sent, mtu: u16) -> u32 {
    if !write_frag_needed(ctx.data(), ctx.data_end(), sent, mtu) {
        count(Stat::FibPass);
        return xdp_action::XDP_PASS;
    }
    let len = ctx.data_end() - ctx.data();
    // SAFETY: shrinking the frame to the error's length, which `len` exceeds.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, ERROR_FRAME_LEN as i32 - len as i32) } != 0 {
        count(Stat::FibPass);
        return xdp_action::XDP_DROP;
    }
    count(Stat::FragNeededSent);
    xdp_action::XDP_TX
}

/// [`frag_needed_xdp`] for TC. The headers are in the linear part `tc.rs` pulled; trimming
/// the buffer also ends its GSO state (`bpf_skb_change_tail` resets it).
#[inline(always)]
fn frag_needed_tc(ctx: &TcContext, ingress: u32, sent: &Sent, mtu: u16) -> i32 {
    if !write_frag_needed(ctx.data(), ctx.data_end(), sent, mtu) {
        count(Stat::FibPass);
        return TC_ACT_UNSPEC;
    }
    // SAFETY: trimming the buffer to the error's length.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, ERROR_FRAME_LEN as u32, 0) } != 0 {
        count(Stat::FibPass);
        return TC_ACT_SHOT;
    }
    count(Stat::FragNeededSent);
    // SAFETY: a helper with no preconditions; it returns TC_ACT_REDIRECT.
    unsafe { bpf_redirect(ingress, 0) as i32 }
}

/// Rewrites the first [`ERROR_FRAME_LEN`] bytes at `data` into an ICMP fragmentation-needed
/// error to the packet's sender: the packet's own first 28 bytes, restored to what the sender
/// sent, become the quote. `false` if the frame is too short (nothing was written).
#[inline(always)]
fn write_frag_needed(data: usize, data_end: usize, sent: &Sent, mtu: u16) -> bool {
    if data + ERROR_FRAME_LEN > data_end {
        return false;
    }
    let eth = data as *mut EthHdr;
    let ip = (data + ETH_LEN) as *mut Ipv4Hdr;
    let icmp = (data + ETH_LEN + IP_LEN) as *mut IcmpHdr;
    let quote_at = data + ETH_LEN + IP_LEN + ICMP_LEN;
    let inner = quote_at as *mut Ipv4Hdr;
    let quoted = (quote_at + IP_LEN) as *mut QuotedTcp;
    // SAFETY: every pointer is inside [data, data + ERROR_FRAME_LEN), checked above; the quote
    // is copied forward from non-overlapping bytes before the outer headers are rewritten.
    unsafe {
        let from = (data + ETH_LEN) as *const u8;
        let to = quote_at as *mut u8;
        for i in 0..IP_LEN + QUOTED_LEN {
            *to.add(i) = *from.add(i);
        }
        let i = &mut *inner;
        i.check = csum::replace4(
            csum::replace4(i.check, i.saddr_be, sent.saddr_be),
            i.daddr_be,
            sent.daddr_be,
        );
        i.saddr_be = sent.saddr_be;
        i.daddr_be = sent.daddr_be;
        (*quoted).sport_be = sent.sport_be;
        (*quoted).dport_be = sent.dport_be;

        let e = &mut *eth;
        core::mem::swap(&mut e.src, &mut e.dst);
        let o = &mut *ip;
        o.version_ihl = 0x45;
        o.tos = 0xc0; // internetwork control, as the kernel's own ICMP errors
        o.tot_len_be = ((IP_LEN + ICMP_LEN + IP_LEN + QUOTED_LEN) as u16).to_be();
        o.id_be = 0;
        o.frag_off_be = 0;
        o.ttl = 64;
        o.protocol = IPPROTO_ICMP;
        o.check = 0;
        // From the address the sender was talking to (the VIP, or the SNAT address).
        o.saddr_be = sent.daddr_be;
        o.daddr_be = sent.saddr_be;
        o.check = !csum::fold(sum16(ip as *const u16, IP_LEN / 2));
        let c = &mut *icmp;
        c.kind = ICMP_DEST_UNREACH;
        c.code = ICMP_FRAG_NEEDED;
        c.check = 0;
        c.rest_be = u32::from(mtu).to_be();
        c.check = !csum::fold(sum16(
            icmp as *const u16,
            (ICMP_LEN + IP_LEN + QUOTED_LEN) / 2,
        ));
    }
    true
}

/// Whether the frame fits the MTU of the interface it arrived on, and that MTU.
#[inline(always)]
fn ingress_mtu(ctx: &XdpContext, ingress: u32) -> (bool, u32) {
    let mut mtu_len = 0u32;
    // SAFETY: a valid XDP context and a writable u32.
    let fits = unsafe { bpf_check_mtu(ctx.as_ptr(), ingress, &raw mut mtu_len, 0, 0) == 0 };
    (fits, mtu_len)
}

/// The one's complement sum of `words` 16-bit words at `p`.
///
/// # Safety
/// `p` must point to `words` readable, bounds-checked words.
#[inline(always)]
unsafe fn sum16(p: *const u16, words: usize) -> u32 {
    let mut sum = 0u32;
    for i in 0..words {
        // SAFETY: the caller's contract.
        sum += u32::from(unsafe { p.add(i).read_unaligned() });
    }
    sum
}
