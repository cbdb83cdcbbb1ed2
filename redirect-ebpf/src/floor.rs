//! The benchmark's floor: the least an XDP forwarder on the same legs can do (parse Ethernet
//! and IPv4, `bpf_fib_lookup`, rewrite the MACs, redirect), with no NAT and no state. The
//! benchmark routes the client straight to the source through it, so the page shows how far
//! the NAT datapath is from the limit. Never attached by `redirect` itself.

use aya_ebpf::{
    EbpfContext,
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    helpers::bpf_fib_lookup,
    macros::xdp,
    programs::XdpContext,
};

use crate::{
    TX_PORTS,
    headers::{ETH_LEN, EthHdr, IP_LEN, Ipv4Hdr},
};

const ETH_P_IPV4_BE: u16 = 0x0800u16.to_be();

/// Forwards every IPv4 frame the FIB can route out of an interface in `TX_PORTS`.
#[xdp]
pub fn xdp_floor(ctx: XdpContext) -> u32 {
    let data = ctx.data();
    if data + ETH_LEN + IP_LEN > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: bounds checked above.
    let (eth, ip) = unsafe {
        (
            &mut *(data as *mut EthHdr),
            &*((data + ETH_LEN) as *const Ipv4Hdr),
        )
    };
    if eth.ether_type_be != ETH_P_IPV4_BE {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: an all-zero `bpf_fib_lookup` is a valid (empty) request.
    let mut params: FibParams = unsafe { core::mem::zeroed() };
    params.family = 2;
    params.l4_protocol = ip.protocol;
    params.__bindgen_anon_1.tot_len = u16::from_be(ip.tot_len_be);
    params.ifindex = ctx.ingress_ifindex() as u32;
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
    if rc != 0 {
        return xdp_action::XDP_PASS;
    }
    match TX_PORTS.redirect(params.ifindex, u64::from(xdp_action::XDP_PASS)) {
        Ok(action) => {
            eth.src = params.smac;
            eth.dst = params.dmac;
            action
        }
        Err(pass) => pass,
    }
}
