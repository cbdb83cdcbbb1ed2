//! The XDP hook, for NICs: frames straight off a wire, whose checksums are always complete, so
//! the NAT core updates them itself.

use aya_ebpf::{
    bindings::xdp_action, helpers::bpf_xdp_load_bytes, macros::xdp, programs::XdpContext,
};
use redirect_common::stats::Stat;

use crate::{count, forward, headers, hold, nat, packet_context};

/// The datapath. Attach it to every interface that receives client or backend traffic.
#[xdp]
pub fn redirect_xdp(ctx: XdpContext) -> u32 {
    match try_redirect_xdp(&ctx) {
        Ok(action) => action,
        Err(stat) => {
            count(stat);
            xdp_action::XDP_PASS
        }
    }
}

#[inline(always)]
fn try_redirect_xdp(ctx: &XdpContext) -> Result<u32, Stat> {
    let parsed = headers::parse(ctx.data(), ctx.data_end(), ctx.data_end() - ctx.data())?;
    let (cfg, now, cut) = packet_context()?;
    let pkt = match parsed {
        headers::Parsed::Tcp(pkt) => pkt,
        headers::Parsed::IcmpError(err) => {
            return Ok(match nat::icmp_error(&err, cfg) {
                nat::Verdict::Forward(_) => {
                    forward::xdp(ctx, err.eth, err.ip, None, now, cfg.flags)
                }
                _ => xdp_action::XDP_PASS,
            });
        }
    };
    Ok(match nat::process::<false>(&pkt, cfg, &cut, now) {
        nat::Verdict::Forward(sent) => forward::xdp(ctx, pkt.eth, pkt.ip, sent, now, cfg.flags),
        nat::Verdict::Pass => xdp_action::XDP_PASS,
        nat::Verdict::Drop => xdp_action::XDP_DROP,
        nat::Verdict::Hold => {
            let flow = hold::flow_of(&pkt);
            let len = ctx.data_end() - ctx.data();
            hold::park(len, ctx.ingress_ifindex() as u32, now, &flow, |dst, n| {
                // SAFETY: `dst` has room for `n` bytes, and `n` is at most the frame's length.
                unsafe { bpf_xdp_load_bytes(ctx.ctx, 0, dst.cast(), n) }
            });
            xdp_action::XDP_DROP
        }
    })
}
