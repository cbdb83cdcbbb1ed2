//! Socket mode (`redirect run --mode socket`, zero-hop): the datapath runs inside `connect()`
//! on the application host itself, so a connection goes straight to its backend and no packet
//! of it is ever translated. The kernel and the controller share these.
//!
//! - `SOCKETS`: every socket whose `connect()` to the VIP the hook saw, by socket cookie (the
//!   value `bpf_get_socket_cookie`, `SO_COOKIE` and `sock_diag` all give). `getpeername()`
//!   reads it to show the VIP, the fence reads it (with `sock_diag`) to find this host's
//!   sessions on the old server, and the release hook deletes the entry with the socket.
//! - `FLOWS`: connections opened during a hold. Their `connect()` left the VIP as the
//!   destination (the backend is not decided yet), so their SYN is parked by the TC egress
//!   hook, and from the release on their packets are translated (DNAT only: the source is
//!   this host's own address) for as long as they live. Only these few connections ever meet
//!   per-packet work.

/// A `SOCKETS` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockEntry {
    /// The VIP the application connected to (what `getpeername()` shows).
    pub vip_addr_be: u32,
    pub vip_port_be: u16,
    pub _pad0: u16,
    /// The `BACKENDS` index `connect()` sent it to, or [`HELD_BACKEND`].
    pub backend_id: u32,
    /// `SOCK_*` bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<SockEntry>() == 16);

/// `backend_id` of a socket connected during a hold: its destination stayed the VIP, and
/// `FLOWS` says where its packets go.
pub const HELD_BACKEND: u32 = u32::MAX;

/// Set on a socket connected during a hold.
pub const SOCK_HELD: u32 = 1 << 0;

/// A `FLOWS` value (keyed by [`crate::ct::CtKey`]: this host's address and port as the
/// client, the VIP).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    /// `bpf_ktime_get_ns` when its first SYN was seen.
    pub created_ns: u64,
    /// The backend its packets go to, once decided (`backend_id != PARKED`).
    pub backend_addr_be: u32,
    pub backend_port_be: u16,
    pub _pad0: u16,
    /// The `BACKENDS` index, or [`PARKED`].
    pub backend_id: u32,
    pub _pad1: u32,
}
const _: () = assert!(core::mem::size_of::<FlowEntry>() == 24);

/// `backend_id` of a flow whose SYN is parked: no backend yet.
pub const PARKED: u32 = u32::MAX;

/// Sockets the hook can know at once. A full table refuses the `connect()` (`EPERM`, counted
/// as `sockets_full`) rather than let a session on the old server escape the fence.
pub const SOCKETS_ENTRIES: u32 = 1 << 18;
/// Connections opened during holds and still open.
pub const FLOWS_ENTRIES: u32 = 1 << 14;

/// Socket mode's counters (the `SOCK_STATS` per-CPU array). The discriminant is the index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockStat {
    /// A `connect()` to the VIP, sent to the active backend.
    ConnectRedirected = 0,
    /// A `connect()` to the VIP during a hold: left on the VIP, its SYN parked.
    ConnectHeld,
    /// A `connect()` to the VIP refused (`EPERM`): `SOCKETS` was full.
    SocketsFull,
    /// A `connect()` to the VIP refused (`EPERM`): `ACTIVE` named no configured backend.
    BadActive,
    /// A `connect()` to the VIP refused: a fleet member's hold lapsed unconfirmed.
    Unconfirmed,
    /// `getpeername()` of a redirected socket, answered with the VIP.
    PeerShownVip,
    /// A held connection's packet, sent to its backend (egress).
    FlowForward,
    /// A held connection's reply, shown as from the VIP (ingress).
    FlowReply,
    /// A held connection's SYN after its hold, with no room in `FLOWS`: dropped, retried.
    FlowsFull,
    /// A data packet of a hooked socket to the fenced backend, dropped.
    Fenced,
}

pub const SOCK_STAT_COUNT: u32 = SockStat::Fenced as u32 + 1;

/// Every counter, in index order, with the name `redirect status` and `/metrics` show.
pub const SOCK_STATS_ALL: [(SockStat, &str); SOCK_STAT_COUNT as usize] = [
    (SockStat::ConnectRedirected, "connect_redirected"),
    (SockStat::ConnectHeld, "connect_held"),
    (SockStat::SocketsFull, "sockets_full"),
    (SockStat::BadActive, "connect_bad_active"),
    (SockStat::Unconfirmed, "connect_unconfirmed"),
    (SockStat::PeerShownVip, "peer_shown_vip"),
    (SockStat::FlowForward, "held_flow_forward"),
    (SockStat::FlowReply, "held_flow_reply"),
    (SockStat::FlowsFull, "flows_full"),
    (SockStat::Fenced, "socket_fenced"),
];

#[cfg(feature = "user")]
// SAFETY: plain old data, every bit pattern is valid, no implicit padding.
unsafe impl aya::Pod for SockEntry {}
#[cfg(feature = "user")]
// SAFETY: plain old data, every bit pattern is valid, no implicit padding.
unsafe impl aya::Pod for FlowEntry {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_in_index_order() {
        for (i, (stat, _)) in SOCK_STATS_ALL.iter().enumerate() {
            assert_eq!(*stat as usize, i, "{stat:?} is out of order");
        }
    }
}
