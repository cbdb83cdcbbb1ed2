//! The redirect datapath: an XDP program that sends each new TCP connection for the VIP to
//! the active backend (full NAT: DNAT + SNAT) and keeps every tracked connection on the
//! backend it started on.
//!
//! What happens to traffic when the controller exits: nothing. Every map and the XDP link are
//! pinned, so the program keeps translating established and new connections with the last
//! `ACTIVE` value; only conntrack garbage collection pauses until a controller re-adopts the
//! pins. Internal errors never blackhole traffic: unparseable or foreign packets go to the
//! stack untouched, and only SYNs that cannot be tracked (table full, no SNAT port) are dropped,
//! which the client retries.
#![no_std]
#![no_main]
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::needless_pass_by_value,
    reason = "BPF: context fields and sizes are small values in 64-bit registers; #[xdp] entry points take their context by value"
)]

mod events;
mod forward;
mod headers;
mod nat;

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, DevMapHash, HashMap, PerCpuArray, RingBuf},
    helpers::bpf_ktime_get_ns,
    helpers::bpf_xdp_load_bytes,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use redirect_common::{
    backend::{Backend, MAX_BACKENDS},
    config::{Config, FLAG_CONFIGURED},
    ct::{CtEntry, CtKey},
    cutover::{Cutover, HELD_FRAME_MAX, HeldSyn},
    limits,
    rev::{RevEntry, RevKey},
    stats::{STAT_COUNT, Stat},
};

// BTF-defined maps (`.maps` section): the kernel records their key and value types, so
// `bpftool map dump pinned <dir>/CT` prints typed, named fields. The controller pins each one
// by name under its pin directory (`EbpfLoader::map_pin_path`), and a reload re-uses the pins.
const CT_ENTRIES: usize = limits::CT_ENTRIES as usize;
const REV_ENTRIES: usize = limits::REV_ENTRIES as usize;
const BACKEND_SLOTS: usize = MAX_BACKENDS as usize;
const STAT_SLOTS: usize = STAT_COUNT as usize;
const TX_PORT_SLOTS: usize = limits::TX_PORTS as usize;

/// What this datapath serves (one entry).
#[btf_map(name = "CONFIG")]
static CONFIG: Array<Config, 1> = Array::new();

/// Backend index → address, port and SNAT address.
#[btf_map(name = "BACKENDS")]
static BACKENDS: Array<Backend, BACKEND_SLOTS> = Array::new();

/// Index 0: the `BACKENDS` index new connections go to. The flip is one write here.
#[btf_map(name = "ACTIVE")]
static ACTIVE: Array<u32, 1> = Array::new();

/// Client-side tuple → translation. A plain (not LRU) hash: a full table refuses new SYNs
/// instead of evicting half of a live connection (cilium#12686, #29305, #34833).
#[btf_map(name = "CT")]
static CT: HashMap<CtKey, CtEntry, CT_ENTRIES> = HashMap::new();

/// Backend-side tuple → client-side tuple; its `BPF_NOEXIST` insert claims the SNAT port.
#[btf_map(name = "REV")]
static REV: HashMap<RevKey, RevEntry, REV_ENTRIES> = HashMap::new();

/// One counter per decision (`redirect_common::stats::Stat`).
#[btf_map(name = "STATS")]
static STATS: PerCpuArray<u64, STAT_SLOTS> = PerCpuArray::new();

/// Interfaces this datapath may `XDP_REDIRECT` to (the ones it is attached to).
#[btf_map(name = "TX_PORTS")]
static TX_PORTS: DevMapHash<TX_PORT_SLOTS> = DevMapHash::new();

/// The hold and fence levers of a safe cutover (one entry).
#[btf_map(name = "CUTOVER")]
static CUTOVER: Array<Cutover, 1> = Array::new();

/// SYNs parked during a hold, for the controller to re-inject after the flip. 256 KiB holds
/// about 1,800 SYNs: more new connections than a PostgreSQL fleet opens in a barrier's time.
#[btf_map(name = "HELD")]
static HELD: RingBuf<HeldSyn, { 256 * 1024 }> = RingBuf::new();

#[inline(always)]
fn count(stat: Stat) {
    if let Some(counter) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU value, no concurrent writer.
        unsafe { *counter += 1 };
    }
}

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
    let parsed = headers::parse(ctx.data(), ctx.data_end())?;
    let Some(cfg) = CONFIG.get(0) else {
        return Err(Stat::PassUnconfigured);
    };
    if cfg.flags & FLAG_CONFIGURED == 0 {
        return Err(Stat::PassUnconfigured);
    }
    // SAFETY: a helper with no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let cut = CUTOVER.get(0).copied().unwrap_or(Cutover::IDLE);
    let pkt = match parsed {
        headers::Parsed::Tcp(pkt) => pkt,
        headers::Parsed::IcmpError(err) => {
            return Ok(match nat::icmp_error(&err, cfg) {
                nat::Verdict::Forward(_) => forward::xdp(ctx, err.eth, err.ip, None),
                _ => xdp_action::XDP_PASS,
            });
        }
    };
    Ok(match nat::process(&pkt, cfg, &cut, now) {
        nat::Verdict::Forward(sent) => forward::xdp(ctx, pkt.eth, pkt.ip, sent),
        nat::Verdict::Pass => xdp_action::XDP_PASS,
        nat::Verdict::Drop => xdp_action::XDP_DROP,
        nat::Verdict::Hold => {
            // SAFETY: `parse` bounds-checked the headers; read before the frame is copied.
            let flow = unsafe {
                events::Flow {
                    client_addr_be: (*pkt.ip).saddr_be,
                    client_port_be: (*pkt.tcp).sport_be,
                    backend_addr_be: (*pkt.ip).daddr_be,
                    backend_port_be: (*pkt.tcp).dport_be,
                }
            };
            hold(ctx, now, &flow);
            xdp_action::XDP_DROP
        }
    })
}

/// Copies the untouched SYN frame into `HELD`. If it cannot (ring full, frame too long), the
/// SYN is dropped all the same and the client's retransmit arrives after the hold.
#[inline(always)]
fn hold(ctx: &XdpContext, now: u64, flow: &events::Flow) {
    let len = ctx.data_end() - ctx.data();
    if len == 0 || len > HELD_FRAME_MAX {
        count(Stat::SynHoldFailed);
        return;
    }
    let Some(mut slot) = HELD.reserve(0) else {
        count(Stat::SynHoldFailed);
        events::send(
            redirect_common::events::EventKind::HoldRingFull,
            flow,
            0,
            now,
        );
        return;
    };
    let held = slot.as_mut_ptr();
    // 1..=HELD_FRAME_MAX by construction, in a form the verifier can see: LLVM folds the range
    // check above into one on `len - 1`, which tells the verifier nothing about `len`; the
    // volatile read stops LLVM from folding the mask away again.
    // SAFETY: reading a local.
    let m = unsafe { core::ptr::read_volatile(&(len as u32 - 1)) };
    let n = (m & (HELD_FRAME_MAX as u32 - 1)) + 1;
    // SAFETY: `held` points to a reserved, writable HeldSyn; `n` fits its frame.
    let copied = unsafe {
        (*held).ifindex = ctx.ingress_ifindex() as u32;
        (*held).len = n;
        (*held).held_ns = now;
        bpf_xdp_load_bytes(ctx.ctx, 0, (&raw mut (*held).frame).cast(), n)
    };
    if copied == 0 {
        slot.submit(0);
        count(Stat::SynHeld);
    } else {
        slot.discard(0);
        count(Stat::SynHoldFailed);
    }
}

/// Returns `XDP_PASS`. Tests attach it to namespace-side veth peers, which then have the
/// NAPI context that receiving `XDP_REDIRECT`ed frames requires (kernel `veth_xdp_xmit`).
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
