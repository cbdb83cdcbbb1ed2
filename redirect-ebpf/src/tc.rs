//! The TC (clsact ingress) hook, for virtual interfaces (veth, bridges: containers on this
//! host) and for drivers without native XDP. It sees socket buffers, not raw frames:
//! - GRO may have merged many segments into one buffer whose payload sits in pages; only the
//!   headers need to be linear, and the egress device re-segments it;
//! - a buffer may carry `CHECKSUM_PARTIAL` (GRO-merged, or from a local sender with TX
//!   offload on): its TCP checksum field holds only the pseudo-header sum, to be completed on
//!   the way out. An incremental update as XDP does it corrupts that (generic XDP cannot see
//!   the buffer's checksum state), so here the kernel's `bpf_l4_csum_replace` updates the
//!   field, knowing which kind it is.
//!
//! A packet that is not ours gets `TC_ACT_UNSPEC` (TCX "next"), not `TC_ACT_OK`: other TCX
//! programs and classic tc filters on the interface (Docker's, a CNI's, shaping) still see it.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_INGRESS, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use redirect_common::stats::Stat;

use crate::{
    count, forward,
    headers::{self, ETH_LEN, ICMP_LEN, IP_LEN, QUOTED_LEN},
    hold, nat, packet_context,
};

/// The most the parser reads: an ICMP error quoting a TCP header (more than a bare TCP header).
const HEADERS_LEN: u32 = (ETH_LEN + IP_LEN + ICMP_LEN + IP_LEN + QUOTED_LEN) as u32;
/// Where the TCP checksum field is (IPv4 without options, which is all `parse` accepts).
const TCP_CHECK_OFFSET: usize = ETH_LEN + IP_LEN + 16;

/// The datapath on a TC ingress hook (`redirect run --hook tc`, or `auto` on a virtual
/// interface).
#[classifier]
pub fn redirect_tc(ctx: TcContext) -> i32 {
    match try_redirect_tc(&ctx) {
        Ok(action) => action,
        Err(stat) => {
            count(stat);
            TC_ACT_UNSPEC
        }
    }
}

#[inline(always)]
fn try_redirect_tc(ctx: &TcContext) -> Result<i32, Stat> {
    let frame_len = ctx.len();
    let want = if frame_len < HEADERS_LEN {
        frame_len
    } else {
        HEADERS_LEN
    };
    if ((ctx.data_end() - ctx.data()) as u32) < want && ctx.pull_data(want).is_err() {
        return Err(Stat::PassTruncated);
    }
    let parsed = headers::parse(ctx.data(), ctx.data_end(), frame_len as usize)?;
    let (cfg, now, cut) = packet_context()?;
    let pkt = match parsed {
        headers::Parsed::Tcp(pkt) => pkt,
        headers::Parsed::IcmpError(err) => {
            return Ok(match nat::icmp_error(&err, cfg) {
                nat::Verdict::Forward(_) => forward::tc(ctx, None, now, cfg.flags),
                _ => TC_ACT_UNSPEC,
            });
        }
    };
    Ok(match nat::process::<true>(&pkt, cfg, &cut, now) {
        nat::Verdict::Forward(sent) => {
            if let Some(sent) = sent {
                // SAFETY: `parse` bounds-checked the headers; read before any helper that may
                // move the buffer's data invalidates the pointers.
                let now_in_packet = unsafe {
                    nat::Sent {
                        saddr_be: (*pkt.ip).saddr_be,
                        daddr_be: (*pkt.ip).daddr_be,
                        sport_be: (*pkt.tcp).sport_be,
                        dport_be: (*pkt.tcp).dport_be,
                    }
                };
                if !fix_tcp_checksum(ctx, &sent, &now_in_packet) {
                    // Cannot happen for a buffer we just wrote to; a corrupt segment must
                    // not go out.
                    count(Stat::PassTruncated);
                    return Ok(TC_ACT_SHOT);
                }
            }
            forward::tc(ctx, sent, now, cfg.flags)
        }
        nat::Verdict::Pass => TC_ACT_UNSPEC,
        nat::Verdict::Drop => TC_ACT_SHOT,
        nat::Verdict::Hold => {
            let flow = hold::flow_of(&pkt);
            // SAFETY: reading a field of the context the kernel passed.
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            hold::park(frame_len as usize, ifindex, now, &flow, |dst, n| {
                // SAFETY: `dst` has room for `n` bytes, and `n` is at most the buffer's length.
                unsafe { aya_ebpf::helpers::bpf_skb_load_bytes(ctx.as_ptr(), 0, dst.cast(), n) }
            });
            TC_ACT_SHOT
        }
    })
}

/// Moves the TCP checksum from the tuple `old` to `new`: addresses as part of the
/// pseudo-header (which is all a partial checksum holds), ports as payload (which a partial
/// checksum does not cover yet, so the kernel leaves it alone for them).
#[inline(always)]
pub fn fix_tcp_checksum(ctx: &TcContext, old: &nat::Sent, new: &nat::Sent) -> bool {
    let pseudo = u64::from(BPF_F_PSEUDO_HDR) | 4;
    ctx.l4_csum_replace(
        TCP_CHECK_OFFSET,
        u64::from(old.saddr_be),
        u64::from(new.saddr_be),
        pseudo,
    )
    .is_ok()
        && ctx
            .l4_csum_replace(
                TCP_CHECK_OFFSET,
                u64::from(old.daddr_be),
                u64::from(new.daddr_be),
                pseudo,
            )
            .is_ok()
        && ctx
            .l4_csum_replace(
                TCP_CHECK_OFFSET,
                u64::from(old.sport_be),
                u64::from(new.sport_be),
                2,
            )
            .is_ok()
        && ctx
            .l4_csum_replace(
                TCP_CHECK_OFFSET,
                u64::from(old.dport_be),
                u64::from(new.dport_be),
                2,
            )
            .is_ok()
}

/// Re-injects a SYN parked by [`redirect_tc`] (the controller runs it with
/// `BPF_PROG_TEST_RUN` after a flip): a copy of the frame is received on the interface
/// `cb[0]` names, as if it had just arrived there, and passes that interface's TC hook again,
/// which now translates it to the new backend. With `cb[1]` set, the copy is sent out of that
/// interface instead (socket mode parks SYNs on egress). (The XDP program's live-frame re-injection
/// cannot serve TC interfaces: a bridge, or a veth whose peer has no NAPI, has no
/// `ndo_xdp_xmit`.)
#[classifier]
///
/// Returns `TC_ACT_OK` once the copy is on its way, `TC_ACT_SHOT` if it could not be made (the
/// controller reports that SYN as lost: its client retries).
pub fn reinject_tc(ctx: TcContext) -> i32 {
    let ifindex = ctx.cb()[0];
    // cb[1] set: socket mode parked it on the way out (its egress hook translates the copy).
    let direction = if ctx.cb()[1] == 0 {
        u64::from(BPF_F_INGRESS)
    } else {
        0
    };
    if ctx.clone_redirect(ifindex, direction).is_err() {
        count(Stat::SynHoldFailed);
        return TC_ACT_SHOT;
    }
    TC_ACT_OK
}
