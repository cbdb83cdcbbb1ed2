//! Socket mode (`redirect run --mode socket`, zero-hop): the datapath runs inside `connect()`
//! on the application host itself, so a connection goes straight to its backend and no packet
//! of it is ever translated. The kernel and the controller share these.
//!
//! - `SOCKETS`: every socket whose `connect()` to the VIP the hook saw, by socket cookie (the
//!   value `bpf_get_socket_cookie`, `SO_COOKIE` and `sock_diag` all give). `getpeername()`
//!   reads it to show the VIP, the fence reads it (with `sock_diag`) to find this host's
//!   sessions on the old server, and the release hook deletes the entry with the socket.
//! - `FLOWS`: connections opened during a hold. Their `connect()` went to the backend the
//!   cutover flips to (the *presumed* backend: the one not fenced), marked held, and the TC
//!   egress hook parks their SYN (`PARKED`) until the release. If the flip happened, the
//!   released SYN goes on untouched and the connection is as direct as any other. If it did
//!   not (the cutover aborted, or its lease lapsed), the connection must not reach the
//!   presumed backend: it is sent to the active one instead, translated (DNAT only: the source
//!   is this host's own address) for as long as it lives. Only those connections, after an
//!   aborted cutover, ever meet per-packet work.
//! - `FLOW_GATE`: until this `bpf_ktime_get_ns` time, the TC hooks look a packet to or from a
//!   backend up in `FLOWS` (a translated flow may exist); past it, only SYNs are looked at.
//!   The egress hook opens it for an hour when it translates a flow, and the controller keeps
//!   it open while any translated flow lives, so no packet path pays for translation when
//!   none can be needed.

/// A `SOCKETS` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockEntry {
    /// The VIP the application connected to (what `getpeername()` shows).
    pub vip_addr_be: u32,
    pub vip_port_be: u16,
    pub _pad0: u16,
    /// The `BACKENDS` index `connect()` sent it to (during a hold: the presumed backend).
    pub backend_id: u32,
    /// `SOCK_*` bits.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<SockEntry>() == 16);

/// Set on a socket connected during a hold: its SYN waits for the release.
pub const SOCK_HELD: u32 = 1 << 0;

/// A `FLOWS` value (keyed by [`crate::ct::CtKey`]: this host's address and port as the
/// client, and the presumed backend's in place of the VIP).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    /// `bpf_ktime_get_ns` when its first SYN was seen.
    pub created_ns: u64,
    /// The backend its packets are sent to instead, once decided (`backend_id != PARKED`).
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
/// Connections parked during a hold, or translated after an aborted one, and still open.
pub const FLOWS_ENTRIES: u32 = 1 << 14;
/// How long `FLOW_GATE` stays open after the last translated flow was seen: longer than a
/// held socket can keep sending SYNs (`tcp_syn_retries` 6: 127 s), and than a controller
/// restart.
pub const FLOW_GATE_NS: u64 = 3_600_000_000_000;

/// Socket mode's counters (the `SOCK_STATS` per-CPU array). The discriminant is the index.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SockStat {
    /// A `connect()` to the VIP, sent to the active backend.
    ConnectRedirected = 0,
    /// A `connect()` to the VIP during a hold: sent to the presumed backend, its SYN parked.
    ConnectHeld,
    /// A `connect()` to the VIP refused (`EPERM`): `SOCKETS` was full.
    SocketsFull,
    /// A `connect()` to the VIP refused (`EPERM`): `ACTIVE` named no configured backend.
    BadActive,
    /// A `connect()` to the VIP refused: a fleet member's hold lapsed unconfirmed.
    Unconfirmed,
    /// `getpeername()` of a redirected socket, answered with the VIP.
    PeerShownVip,
    /// A held connection's SYN, released untouched: the flip went where it presumed.
    HeldReleasedDirect,
    /// A held connection's SYN sent to the active backend instead: the cutover did not flip.
    HeldRedirected,
    /// A translated flow's packet, sent to the active backend (egress).
    FlowForward,
    /// A translated flow's reply, shown as from the presumed backend (ingress).
    FlowReply,
    /// A held connection's SYN after its hold, with no room in `FLOWS`: dropped, retried.
    FlowsFull,
    /// A held connection that the aborted cutover could not send to the active backend: this
    /// host already talks to it from the same port (the client's connect times out).
    HeldCollision,
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
    (SockStat::HeldReleasedDirect, "held_released_direct"),
    (SockStat::HeldRedirected, "held_redirected"),
    (SockStat::FlowForward, "held_flow_forward"),
    (SockStat::FlowReply, "held_flow_reply"),
    (SockStat::FlowsFull, "flows_full"),
    (SockStat::HeldCollision, "held_collision"),
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
