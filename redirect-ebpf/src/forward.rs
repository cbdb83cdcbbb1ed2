//! Sends a rewritten packet on its way: `bpf_fib_lookup`, then `XDP_TX` out of the same
//! interface, `XDP_REDIRECT` to another attached interface, or `XDP_PASS` to let the kernel
//! route it (no neighbour entry yet, forwarding disabled, an interface we may not redirect
//! to). The packet is fully rewritten before any of these, so the fallback is always correct.
//!
//! A packet too big for the next hop (the lookup's MTU check) cannot go to the stack: it would
//! send its fragmentation-needed error to the translated source, an address of this host. So
//! the datapath answers the original sender itself (Katran does the same), quoting the packet
//! as that sender sent it, and PMTU discovery works through the proxy.

use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    helpers::{bpf_check_mtu, bpf_fib_lookup, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use redirect_common::{csum, stats::Stat};

use crate::{
    TX_PORTS, count,
    headers::{
        ETH_LEN, EthHdr, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, ICMP_LEN, IP_LEN, IPPROTO_ICMP,
        IcmpHdr, Ipv4Hdr, QUOTED_LEN, QuotedTcp,
    },
    nat::Sent,
};

const AF_INET: u8 = 2;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_FRAG_NEEDED: i64 = 8;
const IP_DF_BE: u16 = 0x4000u16.to_be();
/// A fragmentation-needed error: headers, ICMP header, quoted IP header and 8 bytes of TCP.
const ERROR_FRAME_LEN: usize = ETH_LEN + IP_LEN + ICMP_LEN + IP_LEN + QUOTED_LEN;

/// Forwards the rewritten packet whose headers are at `eth` and `ip`. `sent` is what its
/// sender sent (for an error back to it); `None` for an ICMP error.
#[inline(always)]
pub fn xdp(ctx: &XdpContext, eth: *mut EthHdr, ip: *mut Ipv4Hdr, sent: Option<Sent>) -> u32 {
    // SAFETY: headers were bounds-checked by `parse`.
    let (ip, eth) = unsafe { (&*ip, &mut *eth) };
    let ingress = ctx.ingress_ifindex() as u32;
    // SAFETY: an all-zero `bpf_fib_lookup` is a valid (empty) request.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = ip.protocol;
    params.__bindgen_anon_1.tot_len = u16::from_be(ip.tot_len_be);
    params.ifindex = ingress;
    params.__bindgen_anon_3.ipv4_src = ip.saddr_be;
    params.__bindgen_anon_4.ipv4_dst = ip.daddr_be;
    // SAFETY: `params` is a live, correctly sized `bpf_fib_lookup`.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &raw mut params,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED
        && let Some(sent) = sent
        && ip.frag_off_be & IP_DF_BE != 0
    {
        // SAFETY: reading a union field the kernel wrote for this return code.
        let mtu = unsafe { params.__bindgen_anon_1.mtu_result };
        // A frame larger than its ingress MTU was merged by GRO before generic (skb-mode) XDP
        // saw it; its segments may fit, and the stack re-segments it. It is answered only if
        // the next hop's MTU is below the ingress MTU too (a sender told an MTU at or above its
        // segment size ignores it, so that is harmless).
        let (fits, ingress_mtu) = ingress_mtu(ctx, ingress);
        if fits || u32::from(mtu) < ingress_mtu {
            return frag_needed(ctx, &sent, mtu);
        }
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        count(Stat::FibPass);
        return xdp_action::XDP_PASS;
    }
    if params.ifindex != ingress && TX_PORTS.get(params.ifindex).is_none() {
        // Not an interface we own: the MACs would be wrong for the stack, so leave them.
        count(Stat::FibPass);
        return xdp_action::XDP_PASS;
    }
    let (old_src, old_dst) = (eth.src, eth.dst);
    eth.src = params.smac;
    eth.dst = params.dmac;
    if params.ifindex == ingress {
        count(Stat::FibTx);
        return xdp_action::XDP_TX;
    }
    if let Ok(action) = TX_PORTS.redirect(params.ifindex, 0) {
        count(Stat::FibRedirect);
        action
    } else {
        // Checked above; reaching this means the entry vanished meanwhile. Put the MACs
        // back, or the stack would discard the frame as not addressed to this host.
        eth.src = old_src;
        eth.dst = old_dst;
        count(Stat::FibPass);
        xdp_action::XDP_PASS
    }
}

/// Turns the too-big packet into an ICMP fragmentation-needed error to its sender and sends it
/// back out of the interface it came in on: the packet's own first 28 bytes, restored to what
/// the sender sent, become the quote; then the frame is cut to size.
#[inline(always)]
fn frag_needed(ctx: &XdpContext, sent: &Sent, mtu: u16) -> u32 {
    let data = ctx.data();
    if data + ERROR_FRAME_LEN > ctx.data_end() {
        count(Stat::FibPass);
        return xdp_action::XDP_PASS;
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
    let len = ctx.data_end() - ctx.data();
    // SAFETY: shrinking the frame to the error's length, which `len` exceeds.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, ERROR_FRAME_LEN as i32 - len as i32) } != 0 {
        count(Stat::FibPass);
        return xdp_action::XDP_DROP;
    }
    count(Stat::FragNeededSent);
    xdp_action::XDP_TX
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
