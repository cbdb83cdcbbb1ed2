//! Sends a rewritten packet on its way: `bpf_fib_lookup`, then `XDP_TX` out of the same
//! interface, `XDP_REDIRECT` to another attached interface, or `XDP_PASS` to let the kernel
//! route it (no neighbour entry yet, forwarding disabled, an interface we may not redirect
//! to). The packet is fully rewritten before any of these, so the fallback is always correct.

use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use redirect_common::stats::Stat;

use crate::{TX_PORTS, count, headers::Packet};

const AF_INET: u8 = 2;
const IPPROTO_TCP: u8 = 6;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;

#[inline(always)]
pub fn xdp(ctx: &XdpContext, pkt: &Packet) -> u32 {
    // SAFETY: headers were bounds-checked by `parse`.
    let (ip, eth) = unsafe { (&*pkt.ip, &mut *pkt.eth) };
    let ingress = ctx.ingress_ifindex() as u32;
    // SAFETY: an all-zero `bpf_fib_lookup` is a valid (empty) request.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = IPPROTO_TCP;
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
