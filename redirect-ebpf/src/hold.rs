//! Parking a SYN during a cutover's hold: the untouched frame goes into the `HELD` ring, and
//! the controller re-injects it after the flip. Shared by both hooks; only the copy differs.

use redirect_common::{cutover::HELD_FRAME_MAX, events::EventKind, stats::Stat};

use crate::{HELD, count, events};

/// Copies a `len`-byte frame that arrived on `ifindex` into `HELD` with `copy(dst, n)` (a
/// `bpf_*_load_bytes` from offset 0, returning 0 on success). If it cannot (ring full, frame
/// too long), the SYN is dropped all the same and the client's retransmit arrives after the
/// hold.
#[inline(always)]
pub fn park(
    len: usize,
    ifindex: u32,
    now: u64,
    flow: &events::Flow,
    copy: impl FnOnce(*mut u8, u32) -> i64,
) {
    if len == 0 || len > HELD_FRAME_MAX {
        count(Stat::SynHoldFailed);
        return;
    }
    let Some(mut slot) = HELD.reserve(0) else {
        count(Stat::SynHoldFailed);
        events::send(EventKind::HoldRingFull, flow, 0, now);
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
        (*held).ifindex = ifindex;
        (*held).len = n;
        (*held).held_ns = now;
        copy((&raw mut (*held).frame).cast(), n)
    };
    if copied == 0 {
        slot.submit(0);
        count(Stat::SynHeld);
    } else {
        slot.discard(0);
        count(Stat::SynHoldFailed);
    }
}

/// The flow of a parsed packet, for an event's log line.
#[inline(always)]
pub fn flow_of(pkt: &crate::headers::Packet) -> events::Flow {
    // SAFETY: `parse` bounds-checked the headers.
    unsafe {
        events::Flow {
            client_addr_be: (*pkt.ip).saddr_be,
            client_port_be: (*pkt.tcp).sport_be,
            backend_addr_be: (*pkt.ip).daddr_be,
            backend_port_be: (*pkt.tcp).dport_be,
        }
    }
}
