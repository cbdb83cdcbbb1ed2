//! The redirect datapath: a program that sends each new TCP connection for the VIP to the
//! active backend (full NAT: DNAT + SNAT) and keeps every tracked connection on the backend it
//! started on. One NAT core (`nat.rs`), two hooks: XDP (`xdp.rs`) for NICs, where frames come
//! off a wire, and TC (`tc.rs`) for virtual interfaces and drivers without native XDP, where
//! socket buffers may be GRO-merged or carry partial checksums.
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
mod floor;
mod forward;
mod headers;
mod hold;
mod nat;
mod sock;
mod sock_tc;
mod tc;
mod xdp;

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, DevMapHash, HashMap, PerCpuArray, RingBuf},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use redirect_common::{
    backend::{Backend, MAX_BACKENDS},
    config::{Config, FLAG_CONFIGURED},
    ct::{CtEntry, CtKey},
    cutover::{Cutover, HeldSyn},
    limits,
    rev::{RevEntry, RevKey},
    socket::{FLOWS_ENTRIES, FlowEntry, SOCK_STAT_COUNT, SOCKETS_ENTRIES, SockEntry},
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

/// Socket mode: every socket whose `connect()` to the VIP the hook saw, by cookie.
#[btf_map(name = "SOCKETS")]
static SOCKETS: HashMap<u64, SockEntry, { SOCKETS_ENTRIES as usize }> = HashMap::new();

/// Socket mode: connections opened during a hold (this host's address and port, the VIP),
/// translated per packet for their life.
#[btf_map(name = "FLOWS")]
static FLOWS: HashMap<CtKey, FlowEntry, { FLOWS_ENTRIES as usize }> = HashMap::new();

/// Socket mode: until when (`bpf_ktime_get_ns`) the TC hooks look packets to and from
/// backends up in `FLOWS`.
#[btf_map(name = "FLOW_GATE")]
static FLOW_GATE: Array<u64, 1> = Array::new();

/// Socket mode: the cookie of the network namespace whose sockets the hooks redirect (the
/// controller's: the one its `sock_diag` sees and its fence can end sessions of).
#[btf_map(name = "SOCK_NETNS")]
static SOCK_NETNS: Array<u64, 1> = Array::new();

/// Socket mode's counters (`redirect_common::socket::SockStat`).
#[btf_map(name = "SOCK_STATS")]
static SOCK_STATS: PerCpuArray<u64, { SOCK_STAT_COUNT as usize }> = PerCpuArray::new();

#[inline(always)]
fn count(stat: Stat) {
    if let Some(counter) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU value, no concurrent writer.
        unsafe { *counter += 1 };
    }
}

/// What every packet's processing starts from: the configuration (or why there is none to
/// act on), the time, and the cutover levers.
#[inline(always)]
fn packet_context() -> Result<(&'static Config, u64, Cutover), Stat> {
    let Some(cfg) = CONFIG.get(0) else {
        return Err(Stat::PassUnconfigured);
    };
    if cfg.flags & FLAG_CONFIGURED == 0 {
        return Err(Stat::PassUnconfigured);
    }
    // CLOCK_MONOTONIC at jiffy resolution (1-4 ms): the precise clock cost about 70 ns per
    // packet (`cargo xtask bench --profile`), and every use tolerates a clock a jiffy behind:
    // idle and close timeouts of half a second and more; hold and fence deadlines, which then
    // end up to a jiffy late (the safe side). (A connection's `created_ns`, its identity, still
    // comes from the precise clock: see `nat::open`.)
    // SAFETY: a helper with no preconditions.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() };
    let cut = CUTOVER.get(0).copied().unwrap_or(Cutover::IDLE);
    Ok((cfg, now, cut))
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
