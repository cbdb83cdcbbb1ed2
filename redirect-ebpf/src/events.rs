//! Rare, actionable datapath events for the controller's log, with the flow's addresses
//! (`redirect_common::events`). Counters stay the hot path's only output; each kind goes out at
//! most once a second per CPU, so a flood cannot become a log storm (the counters still count
//! every packet).
//!
//! Why not aya-log: aya-log-ebpf 0.2's format machinery emits BTF (`MaybeUninit<u8>` and kin)
//! that the kernel's `BPF_BTF_LOAD` rejects, and without the object's BTF none of the BTF-defined
//! maps can be created (aya#1490). A typed ring buffer also keeps the format strings, and their
//! instructions, out of the kernel.

use aya_ebpf::{
    btf_maps::{PerCpuArray, RingBuf},
    macros::btf_map,
};
use redirect_common::events::{DatapathEvent, EVENT_KINDS, EventKind};

const KINDS: usize = EVENT_KINDS as usize;
const ONE_SECOND_NS: u64 = 1_000_000_000;

/// When each kind was last sent, per CPU.
#[btf_map(name = "EVENTS_LAST")]
static EVENTS_LAST: PerCpuArray<u64, KINDS> = PerCpuArray::new();

/// Events for the controller (one page: far more than a second's worth).
#[btf_map(name = "EVENTS")]
static EVENTS: RingBuf<DatapathEvent, 4096> = RingBuf::new();

/// Whether `kind` may be sent at `now`; if so, records it.
#[inline(always)]
fn may_send(kind: EventKind, now: u64) -> bool {
    let Some(last) = EVENTS_LAST.get_ptr_mut(kind as u32) else {
        return false;
    };
    // SAFETY: a per-CPU value, no concurrent writer.
    unsafe {
        if *last != 0 && now.wrapping_sub(*last) < ONE_SECOND_NS {
            return false;
        }
        *last = now;
    }
    true
}

/// Addresses and ports of a flow, in network byte order as they travel.
#[derive(Clone, Copy)]
#[expect(
    clippy::struct_field_names,
    reason = "every field is in network byte order, and says so"
)]
pub struct Flow {
    pub client_addr_be: u32,
    pub client_port_be: u16,
    pub backend_addr_be: u32,
    pub backend_port_be: u16,
}

/// Sends `kind` about `flow`, rate-limited; `detail` is kind-specific.
#[inline(always)]
pub fn send(kind: EventKind, flow: &Flow, detail: u32, now: u64) {
    if !may_send(kind, now) {
        return;
    }
    let event = DatapathEvent {
        kind: kind as u32,
        detail,
        at_ns: now,
        client_addr_be: flow.client_addr_be,
        backend_addr_be: flow.backend_addr_be,
        client_port_be: flow.client_port_be,
        backend_port_be: flow.backend_port_be,
        _pad0: 0,
    };
    // A full ring loses the event; the counter has it anyway.
    let _ = EVENTS.output(event, 0);
}
