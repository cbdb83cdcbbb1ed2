//! Everything the redirect datapath (kernel) and controller (user space) must agree on.
//!
//! Every map key and value is defined here exactly once, `#[repr(C)]`, with explicit padding
//! and a size assertion, so the two halves cannot drift apart (the classic "must be kept in
//! sync" bug of hand-mirrored structs). Addresses and ports are stored as they travel on the
//! wire (network byte order) and the field names end in `_be` to say so.
//!
//! The pure logic the datapath depends on (checksum arithmetic, TCP flag classification, SNAT
//! port probing) also lives here, so it is unit- and property-tested on the host.
#![no_std]

pub mod csum;
pub mod ports;
pub mod socket;
pub mod tcp;

/// Names of the pinned maps, as they appear under the pin directory and in `bpftool`.
pub mod map_names {
    pub const CONFIG: &str = "CONFIG";
    pub const BACKENDS: &str = "BACKENDS";
    pub const ACTIVE: &str = "ACTIVE";
    pub const CT: &str = "CT";
    pub const REV: &str = "REV";
    pub const STATS: &str = "STATS";
    pub const TX_PORTS: &str = "TX_PORTS";
    pub const CUTOVER: &str = "CUTOVER";
    pub const HELD: &str = "HELD";
    /// Socket mode: every socket whose `connect()` the hook rewrote, by cookie.
    pub const SOCKETS: &str = "SOCKETS";
    /// Socket mode: connections parked during a hold, or translated after an aborted one.
    pub const FLOWS: &str = "FLOWS";
    /// Socket mode: its own counters (`socket::SockStat`), so proxy pins keep their layout.
    pub const SOCK_STATS: &str = "SOCK_STATS";
    /// Socket mode: until when packets to and from backends are looked up in `FLOWS`.
    pub const FLOW_GATE: &str = "FLOW_GATE";
    /// Socket mode: the network namespace (its cookie) whose sockets the hooks redirect.
    pub const SOCK_NETNS: &str = "SOCK_NETNS";
}

/// The `CONFIG` array map (one entry): what the datapath serves. Changed only by the
/// controller, read by the datapath on every packet.
pub mod config {
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Config {
        /// The address clients connect to.
        pub vip_addr_be: u32,
        pub vip_port_be: u16,
        pub _pad0: u16,
        /// SNAT port range, inclusive, in host byte order (it is arithmetic, not a header).
        pub snat_port_min: u16,
        pub snat_port_max: u16,
        /// `FLAG_*` bits.
        pub flags: u32,
    }
    const _: () = assert!(core::mem::size_of::<Config>() == 16);

    /// A non-SYN packet with no tracked connection is dropped instead of handed to the
    /// stack (which would answer it with a RST from the VIP).
    pub const FLAG_DROP_NONSYN_MISS: u32 = 1 << 0;
    /// Ask the FIB for every packet instead of caching next hops for 100 ms (for hosts whose
    /// routes or neighbours change faster than that; and the benchmark's "before").
    pub const FLAG_FIB_EVERY_PACKET: u32 = 1 << 1;
    /// Socket mode (`run --mode socket`): the cgroup hooks redirect `connect()` and the VIP
    /// is not served by NAT; the proxy programs are not attached.
    pub const FLAG_SOCKET_MODE: u32 = 1 << 2;
    /// Set by the controller once it has written the config; a zeroed entry means "not
    /// configured yet" and the datapath passes everything.
    pub const FLAG_CONFIGURED: u32 = 1 << 31;

    #[cfg(feature = "user")]
    // SAFETY: plain old data, every bit pattern is valid, no implicit padding.
    unsafe impl aya::Pod for Config {}
}

/// The `BACKENDS` array map: index → where new connections of that backend go.
pub mod backend {
    /// Index of the source (old) server in `BACKENDS`.
    pub const SOURCE: u32 = 0;
    /// Index of the target (new) server in `BACKENDS`.
    pub const TARGET: u32 = 1;
    pub const MAX_BACKENDS: u32 = 2;

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Backend {
        pub addr_be: u32,
        /// The proxy address the backend sees as the client (full NAT).
        pub snat_addr_be: u32,
        pub port_be: u16,
        pub _pad0: u16,
    }
    const _: () = assert!(core::mem::size_of::<Backend>() == 12);

    #[cfg(feature = "user")]
    // SAFETY: plain old data, every bit pattern is valid, no implicit padding.
    unsafe impl aya::Pod for Backend {}
}

/// The `CUTOVER` array map (one entry): the two datapath levers of a safe cutover, each with
/// a deadline the kernel enforces itself, so a controller that dies mid-cutover can never
/// leave clients parked or fenced forever.
pub mod cutover {
    /// No backend is fenced.
    pub const NO_FENCE: u32 = u32::MAX;

    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Cutover {
        /// Until this `bpf_ktime_get_ns` time, a new connection's SYN is parked in `HELD`
        /// (and dropped here) instead of being sent to `ACTIVE`; the controller re-injects
        /// it once the flip is decided. Past it, SYNs go to `ACTIVE` again.
        pub hold_until_ns: u64,
        /// Until this time, client packets that carry data on connections pinned to
        /// `fenced_backend` are dropped: no query or COMMIT of a proxied client reaches that
        /// server, whatever its role. Replies, bare ACKs, FINs and RSTs still flow.
        pub fence_until_ns: u64,
        /// Index in `BACKENDS`, or [`NO_FENCE`]. The map must be initialised (`install`
        /// writes [`Cutover::IDLE`]): all zeros would name backend 0.
        pub fenced_backend: u32,
        /// [`LAPSE_CLOSED`] or 0.
        pub flags: u32,
    }
    const _: () = assert!(core::mem::size_of::<Cutover>() == 24);

    /// A fleet member's cutover: when its deadlines pass without a renewal (the member lost
    /// etcd, or its controller died), it does not guess. A raised fence stays up while the
    /// fenced backend is still `ACTIVE`, and new connections to it are dropped (their clients
    /// retry) instead of being sent there: the fleet may have committed the other backend.
    /// Only the controller, reading the committed state, lifts it. Without this flag (one
    /// host alone), a lapse lifts both, because that host's old server is still the truth.
    pub const LAPSE_CLOSED: u32 = 1;

    /// How long a controller's hold and fence last without a renewal: long enough to ride
    /// out a stalled renewal, short enough that a dead controller strands nobody for long.
    pub const LEASE_NS: u64 = 1_500_000_000;

    impl Cutover {
        pub const IDLE: Self = Self {
            hold_until_ns: 0,
            fence_until_ns: 0,
            fenced_backend: NO_FENCE,
            flags: 0,
        };

        /// Whether data from a client of `backend` is dropped at `now`, given `active`.
        ///
        /// The flip and the fence are one atomic state: while the fenced backend is still
        /// `ACTIVE`, the fence holds only until its deadline (a controller that dies before
        /// the flip strands nobody: the old server simply takes writes again). Once `ACTIVE`
        /// names another backend, the fence on the old one no longer expires: the one map
        /// write that flips also makes the fence permanent, so no crash between two writes
        /// can leave old and new clients both writing.
        #[inline(always)]
        #[must_use]
        pub fn fences(&self, backend: u32, active: u32, now: u64) -> bool {
            backend == self.fenced_backend
                && (active != backend
                    || now < self.fence_until_ns
                    || (self.flags & LAPSE_CLOSED != 0 && self.fence_until_ns != 0))
        }

        /// Whether a new connection's SYN is dropped at `now`, given `active`: a fleet
        /// member's hold ran out before it could confirm the fleet's state (see
        /// [`LAPSE_CLOSED`]). Never while the hold runs, nor once `ACTIVE` moved on.
        #[inline(always)]
        #[must_use]
        pub fn refuses(&self, active: u32, now: u64) -> bool {
            self.flags & LAPSE_CLOSED != 0
                && self.hold_until_ns != 0
                && now >= self.hold_until_ns
                && (self.fenced_backend == NO_FENCE || self.fenced_backend == active)
        }

        /// The lease a controller writes and renews: new SYNs parked until `now_ns +
        /// lease_ns`, and, once `fencing`, data to `fenced_backend` dropped until then too.
        #[must_use]
        pub const fn leased(
            fenced_backend: u32,
            fencing: bool,
            flags: u32,
            now_ns: u64,
            lease_ns: u64,
        ) -> Self {
            let until = now_ns.saturating_add(lease_ns);
            Self {
                hold_until_ns: until,
                fence_until_ns: if fencing { until } else { 0 },
                fenced_backend,
                flags,
            }
        }

        /// Whether this is a closed fence of `fenced` that a controller raised for a fleet
        /// hold: a controller restarted in the middle of the hold keeps it up rather than
        /// lower it to settle again (the leader may have taken its barrier: the old server
        /// must take no more writes).
        #[must_use]
        pub const fn is_closed_fence_of(&self, fenced: u32) -> bool {
            self.flags & LAPSE_CLOSED != 0
                && self.fenced_backend == fenced
                && self.fence_until_ns != 0
        }

        /// The hold a fleet member writes before it attaches when it joins, or restarts,
        /// while the fleet is in a hold: closed, so new SYNs are parked, then dropped if the
        /// member does not confirm the hold in time, never sent on unfenced; and a fence
        /// `self` holds for it stays up.
        #[must_use]
        pub const fn prearmed(&self, active: u32, now_ns: u64) -> Self {
            Self::leased(
                active,
                self.is_closed_fence_of(active),
                LAPSE_CLOSED,
                now_ns,
                LEASE_NS,
            )
        }

        /// Whether a new connection's SYN is parked at `now`, given `active`. The hold only
        /// covers the time before the flip: once `ACTIVE` moved off the fenced backend, new
        /// connections go to the new one at once, whatever the deadline says.
        #[inline(always)]
        #[must_use]
        pub fn holds(&self, active: u32, now: u64) -> bool {
            now < self.hold_until_ns
                && (self.fenced_backend == NO_FENCE || self.fenced_backend == active)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        const SRC: u32 = 0;
        const TGT: u32 = 1;

        fn pre_flip(deadline: u64) -> Cutover {
            Cutover {
                hold_until_ns: deadline,
                fence_until_ns: deadline,
                fenced_backend: SRC,
                flags: 0,
            }
        }

        #[test]
        fn before_the_flip_hold_and_fence_lapse_at_their_deadline() {
            let c = pre_flip(100);
            assert!(c.fences(SRC, SRC, 99) && c.holds(SRC, 99));
            assert!(!c.fences(SRC, SRC, 100) && !c.holds(SRC, 100));
            assert!(!c.fences(TGT, SRC, 50), "only the fenced backend");
        }

        #[test]
        fn the_active_write_lifts_the_hold_and_makes_the_fence_permanent() {
            let c = pre_flip(100);
            // The same CUTOVER value, after ACTIVE moved: no hold, a fence that never lapses.
            assert!(!c.holds(TGT, 50));
            assert!(c.fences(SRC, TGT, 50) && c.fences(SRC, TGT, u64::MAX - 1));
            assert!(!c.fences(TGT, TGT, 50), "the new server is never fenced");
        }

        #[test]
        fn flipping_back_lifts_a_stale_fence() {
            // After a cutover to the target, `flip --immediate --to source`.
            let c = pre_flip(100);
            assert!(!c.fences(SRC, SRC, 200));
            assert!(!Cutover::IDLE.fences(SRC, SRC, 0) && !Cutover::IDLE.holds(SRC, 0));
        }

        #[test]
        fn a_fleet_member_that_cannot_confirm_drops_instead_of_guessing() {
            let closed = Cutover {
                flags: LAPSE_CLOSED,
                ..pre_flip(100)
            };
            // While the hold runs it parks, as on one host.
            assert!(closed.holds(SRC, 99) && !closed.refuses(SRC, 99));
            // Past it: SYNs dropped, never sent to the old server; the fence stays up.
            assert!(!closed.holds(SRC, 100) && closed.refuses(SRC, 100));
            assert!(closed.fences(SRC, SRC, u64::MAX - 1));
            // Once ACTIVE moved (the member applied the committed flip): no drop.
            assert!(!closed.refuses(TGT, 200) && !closed.fences(TGT, TGT, 200));
            // A hold alone (no fence raised yet) never fences, lapsed or not.
            let held = Cutover {
                fence_until_ns: 0,
                ..closed
            };
            assert!(!held.fences(SRC, SRC, 200) && held.refuses(SRC, 200));
            // A member restarted mid-hold keeps a fence it had raised, and only that one.
            let fenced = Cutover::leased(SRC, true, LAPSE_CLOSED, 0, 100);
            assert!(fenced.prearmed(SRC, 50).fences(SRC, SRC, u64::MAX - 1));
            assert!(!fenced.prearmed(TGT, 50).fences(TGT, TGT, 150));
            assert!(!Cutover::leased(SRC, true, 0, 0, 100).is_closed_fence_of(SRC));
            let held_only = Cutover::IDLE.prearmed(SRC, 50);
            assert!(held_only.holds(SRC, 50 + LEASE_NS - 1) && !held_only.fences(SRC, SRC, 60));
            // One host alone: a lapse lifts both.
            assert!(!pre_flip(100).refuses(SRC, 200));
            assert!(!Cutover::IDLE.refuses(SRC, 0));
        }
    }

    /// A parked SYN, as `HELD` carries it to user space.
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct HeldSyn {
        /// The interface it arrived on (re-injection replays it there).
        pub ifindex: u32,
        /// Bytes of `frame` in use.
        pub len: u32,
        pub held_ns: u64,
        pub frame: [u8; HELD_FRAME_MAX],
    }
    /// A SYN frame is 54 bytes plus at most 40 bytes of TCP options.
    pub const HELD_FRAME_MAX: usize = 128;
    const _: () = assert!(core::mem::size_of::<HeldSyn>() == 144);

    #[cfg(feature = "user")]
    // SAFETY: plain old data, every bit pattern is valid, no implicit padding.
    unsafe impl aya::Pod for Cutover {}
}

/// The `CT` hash map: client-side tuple → the translation of that connection.
/// Created only by a pure SYN; deleted only by the controller, together with its `REV` twin.
pub mod ct {
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct CtKey {
        pub client_addr_be: u32,
        pub vip_addr_be: u32,
        pub client_port_be: u16,
        pub vip_port_be: u16,
    }
    const _: () = assert!(core::mem::size_of::<CtKey>() == 12);

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct CtEntry {
        /// `bpf_ktime_get_ns` (`CLOCK_MONOTONIC`) of the first SYN.
        pub created_ns: u64,
        /// `bpf_ktime_get_ns` of the latest packet in either direction.
        pub last_seen_ns: u64,
        pub backend_addr_be: u32,
        pub snat_addr_be: u32,
        pub backend_port_be: u16,
        pub snat_port_be: u16,
        /// Index in `BACKENDS` at the time of the SYN (for accounting only: the translation
        /// above is what the datapath uses, so rewriting `BACKENDS` never moves a connection).
        pub backend_id: u32,
        /// `FLAG_*` bits, OR-accumulated.
        pub flags: u32,
        /// The acknowledgement number of the client's last fenced data packet: the sequence
        /// number the client expects next from the server, which lets the controller reset
        /// a fenced connection that has no server session to end (RFC 5961 needs it exact).
        pub fenced_ack_be: u32,
        /// Each side's sequence space, as far as this host has seen it (host byte order: it is
        /// arithmetic). A RST counts only if its sequence number lies between what the peer has
        /// acknowledged and what the sender has sent (`crate::tcp::observe`).
        pub client_seq: SeqSpace,
        pub backend_seq: SeqSpace,
    }
    const _: () = assert!(core::mem::size_of::<CtEntry>() == 56);

    /// One direction's sequence numbers.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct SeqSpace {
        /// The sequence number after the sender's latest segment (`SND.NXT` as seen here).
        pub next: u32,
        /// The highest acknowledgement the peer has sent for it (the peer's `RCV.NXT`).
        pub acked: u32,
    }

    /// A packet other than the first SYN was seen: the connection is past its handshake.
    pub const FLAG_SEEN_NON_SYN: u32 = 1 << 0;
    /// The client sent a FIN.
    pub const FLAG_FIN_CLIENT: u32 = 1 << 1;
    /// The backend sent a FIN.
    pub const FLAG_FIN_BACKEND: u32 = 1 << 2;
    /// Either side sent a RST.
    pub const FLAG_RST: u32 = 1 << 3;
    /// The entry was reopened by a new SYN from the same client port after a close.
    pub const FLAG_REOPENED: u32 = 1 << 4;
    /// The client sent data while its backend was fenced: it wants to use a connection to the
    /// old server, so the controller ends that session at once (the client reconnects to the
    /// new one) instead of letting it hang until the drain deadline.
    pub const FLAG_FENCED: u32 = 1 << 5;
    /// The backend sent its FIN before the client: the backend, not the client, holds the
    /// tuple in `TIME_WAIT`, so the SNAT port must be quarantined before it is reused. When the
    /// client closes first (`PostgreSQL`'s Terminate) or a RST ends the connection, the port is
    /// released right after the close timeout.
    pub const FLAG_BACKEND_CLOSED_FIRST: u32 = 1 << 6;
    /// The backend's SYN-ACK was seen (`backend_seq` is valid). It does not make the entry
    /// established: only the client's ACK completing the handshake does.
    pub const FLAG_SYNACK_SEEN: u32 = 1 << 7;
    /// Before any SYN-ACK, the backend answered the SYN with a bare ACK: a socket of an older
    /// connection on the same backend-side tuple (`TIME_WAIT`, `LAST_ACK`) is still there.
    /// `backend_seq.acked` then holds that ACK's acknowledgement number, which the client's
    /// RFC 793 reset of the stale connection carries as its sequence number.
    pub const FLAG_STALE_ACK: u32 = 1 << 8;

    /// Closed from both ends, or reset: only the close timeout keeps the entry alive.
    #[must_use]
    pub const fn is_closed(flags: u32) -> bool {
        flags & FLAG_RST != 0 || (flags & FLAG_FIN_CLIENT != 0 && flags & FLAG_FIN_BACKEND != 0)
    }

    /// Whether a forgotten entry's SNAT port can be reused at once: nobody holds the tuple in
    /// `TIME_WAIT` on the backend (a handshake that never completed, a reset, or a close the
    /// client started). Otherwise the port is quarantined (cilium#45863).
    #[must_use]
    pub const fn port_reusable_at_once(flags: u32) -> bool {
        flags & FLAG_SEEN_NON_SYN == 0
            || flags & FLAG_RST != 0
            || (is_closed(flags) && flags & FLAG_BACKEND_CLOSED_FIRST == 0)
    }

    /// Either side has started to close: the connection no longer counts as live.
    #[must_use]
    pub const fn is_closing(flags: u32) -> bool {
        flags & (FLAG_RST | FLAG_FIN_CLIENT | FLAG_FIN_BACKEND) != 0
    }

    #[cfg(feature = "user")]
    // SAFETY: plain old data, every bit pattern is valid, no implicit padding.
    unsafe impl aya::Pod for CtKey {}
    #[cfg(feature = "user")]
    // SAFETY: plain old data, every bit pattern is valid, no implicit padding.
    unsafe impl aya::Pod for CtEntry {}
    #[cfg(feature = "user")]
    // SAFETY: plain old data, every bit pattern is valid, no implicit padding.
    unsafe impl aya::Pod for SeqSpace {}
}

/// The `REV` hash map: backend-side (post-SNAT) tuple → the client-side tuple.
/// Inserted with `BPF_NOEXIST`, which is what claims a SNAT port atomically.
pub mod rev {
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct RevKey {
        pub backend_addr_be: u32,
        pub snat_addr_be: u32,
        pub backend_port_be: u16,
        pub snat_port_be: u16,
    }
    const _: () = assert!(core::mem::size_of::<RevKey>() == 12);

    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct RevEntry {
        pub client_addr_be: u32,
        pub vip_addr_be: u32,
        pub client_port_be: u16,
        pub vip_port_be: u16,
        /// Which connection of that client tuple claimed the port: [`conn_id`] of its `CT`
        /// entry. A client that reopens its tuple makes a new connection with the same key,
        /// often on the same port; only this tells the new claim from the old one, so nothing
        /// frees the new connection's port while cleaning up after the old.
        pub conn_id: u32,
        /// Written by the controller when this entry's connection is gone: the SNAT port stays
        /// claimed (quarantined) until this time plus the quarantine, longer than the
        /// backend's `TIME_WAIT`, so a reused port never meets a stale server-side tuple
        /// (cilium#45863).
        pub orphaned_ns: u64,
    }
    const _: () = assert!(core::mem::size_of::<RevEntry>() == 24);

    /// A connection's identity among the connections of one client tuple: the low bits of the
    /// `bpf_ktime_get_ns` at which its entry was created.
    #[must_use]
    pub const fn conn_id(created_ns: u64) -> u32 {
        #[expect(
            clippy::cast_possible_truncation,
            reason = "the low bits are the point"
        )]
        let id = created_ns as u32;
        id
    }

    impl RevEntry {
        /// Whether this port claim is the one of connection `entry`, tracked under `key`.
        #[must_use]
        #[inline(always)]
        pub const fn belongs_to(&self, key: &crate::ct::CtKey, entry: &crate::ct::CtEntry) -> bool {
            self.client_addr_be == key.client_addr_be
                && self.client_port_be == key.client_port_be
                && self.vip_addr_be == key.vip_addr_be
                && self.vip_port_be == key.vip_port_be
                && self.conn_id == conn_id(entry.created_ns)
        }
    }

    impl crate::ct::CtEntry {
        /// The `REV` key of this connection's SNAT port.
        #[must_use]
        #[inline(always)]
        pub const fn rev_key(&self) -> RevKey {
            RevKey {
                backend_addr_be: self.backend_addr_be,
                snat_addr_be: self.snat_addr_be,
                backend_port_be: self.backend_port_be,
                snat_port_be: self.snat_port_be,
            }
        }
    }

    #[cfg(feature = "user")]
    // SAFETY: plain old data, every bit pattern is valid, no implicit padding.
    unsafe impl aya::Pod for RevKey {}
    #[cfg(feature = "user")]
    // SAFETY: plain old data, every bit pattern is valid, no implicit padding.
    unsafe impl aya::Pod for RevEntry {}
}

/// The per-CPU `STATS` array: one packet counter per datapath decision.
pub mod stats {
    /// Every decision the datapath makes. The discriminant is the index in `STATS`.
    #[repr(u32)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Stat {
        /// Not IPv4 (ARP, IPv6, ...): passed untouched.
        PassNotIpv4 = 0,
        /// IPv4 with options (IHL > 5): passed untouched.
        PassIpOptions,
        /// An IPv4 fragment: passed untouched.
        PassFragment,
        /// Not TCP (ICMP, UDP, ...): passed untouched.
        PassNotTcp,
        /// Shorter than its headers claim: passed untouched.
        PassTruncated,
        /// TCP that is neither for the VIP nor a reply to a tracked connection.
        PassNotOurs,
        /// The datapath has no configuration yet.
        PassUnconfigured,
        /// A pure SYN created a connection to the source.
        NewConnSource,
        /// A pure SYN created a connection to the target.
        NewConnTarget,
        /// A SYN reused the port of a closed connection and was given a fresh one.
        ConnReopened,
        /// Client → backend packets of tracked connections.
        ForwardTracked,
        /// Backend → client packets of tracked connections.
        ReplyTracked,
        /// A non-SYN packet for the VIP with no tracked connection (never load balanced).
        NonSynMiss,
        /// A reply whose `REV` entry no longer has a live `CT` twin: passed to the stack.
        ReplyOrphan,
        /// The `CT` or `REV` table was full: the SYN was dropped (the client retries).
        CtFull,
        /// No free SNAT port after every probe: the SYN was dropped.
        SnatExhausted,
        /// A SYN parked while new connections are held.
        SynHeld,
        /// A SYN that could not be parked (ring full, or too long): dropped, the client retries.
        SynHoldFailed,
        /// A client packet of a fenced backend's connection, dropped.
        Fenced,
        /// Forwarded out of the interface it came in on.
        FibTx,
        /// Forwarded to another interface through the devmap.
        FibRedirect,
        /// Rewritten, then handed to the kernel to route (no neighbour entry yet, ...).
        FibPass,
        /// The `ACTIVE` entry named a backend that is not configured: the SYN was dropped.
        BadActive,
        /// A RST whose sequence number is outside the tracked window (blind or stale): dropped,
        /// the connection stays tracked.
        RstOutOfWindow,
        /// A SYN on a live (not closed) connection: sent to the backend it is pinned to (whose
        /// challenge ACK sorts it out), never treated as a new connection.
        SynOnLive,
        /// The client's ACK that completed a handshake (half-open → established).
        HandshakeCompleted,
        /// A connection closed without the backend holding `TIME_WAIT` (the client closed
        /// first, or a RST): its SNAT port was freed in the datapath, at once.
        PortReleased,
        /// A connection closed: both FINs, the client's first.
        ClosedClientFirst,
        /// A connection closed: both FINs, the backend's first (its port is quarantined).
        ClosedBackendFirst,
        /// A connection closed by a RST (in the window).
        ClosedByReset,
        /// An ICMP error (unreachable, fragmentation needed, time exceeded) about a tracked
        /// connection, translated toward the sender of the packet it quotes.
        IcmpTranslated,
        /// An ICMP error quoting a TCP packet of no tracked connection: passed untouched.
        IcmpUntracked,
        /// A packet too big for the next hop (DF set): a fragmentation-needed error went back
        /// to its sender, so PMTU discovery works through the proxy.
        FragNeededSent,
        /// A RST inside the window but not at the exact sequence number: forwarded without
        /// changing state; the peer answers it with a challenge ACK (RFC 5961).
        RstChallenged,
        /// A SYN dropped because this fleet member's hold ran out before it could confirm
        /// the fleet's committed state (`LAPSE_CLOSED`): its client retries.
        SynUnconfirmed,
    }

    pub const STAT_COUNT: u32 = Stat::SynUnconfirmed as u32 + 1;

    /// Every counter, in index order, with the name `redirect status` and `/metrics` show.
    pub const ALL: [(Stat, &str); STAT_COUNT as usize] = [
        (Stat::PassNotIpv4, "pass_not_ipv4"),
        (Stat::PassIpOptions, "pass_ip_options"),
        (Stat::PassFragment, "pass_fragment"),
        (Stat::PassNotTcp, "pass_not_tcp"),
        (Stat::PassTruncated, "pass_truncated"),
        (Stat::PassNotOurs, "pass_not_ours"),
        (Stat::PassUnconfigured, "pass_unconfigured"),
        (Stat::NewConnSource, "new_conn_source"),
        (Stat::NewConnTarget, "new_conn_target"),
        (Stat::ConnReopened, "conn_reopened"),
        (Stat::ForwardTracked, "forward_tracked"),
        (Stat::ReplyTracked, "reply_tracked"),
        (Stat::NonSynMiss, "nonsyn_miss"),
        (Stat::ReplyOrphan, "reply_orphan"),
        (Stat::CtFull, "ct_full"),
        (Stat::SnatExhausted, "snat_exhausted"),
        (Stat::SynHeld, "syn_held"),
        (Stat::SynHoldFailed, "syn_hold_failed"),
        (Stat::Fenced, "fenced"),
        (Stat::FibTx, "fib_tx"),
        (Stat::FibRedirect, "fib_redirect"),
        (Stat::FibPass, "fib_pass"),
        (Stat::BadActive, "bad_active"),
        (Stat::RstOutOfWindow, "rst_out_of_window"),
        (Stat::SynOnLive, "syn_on_live"),
        (Stat::HandshakeCompleted, "handshake_completed"),
        (Stat::PortReleased, "port_released"),
        (Stat::ClosedClientFirst, "closed_client_first"),
        (Stat::ClosedBackendFirst, "closed_backend_first"),
        (Stat::ClosedByReset, "closed_by_reset"),
        (Stat::IcmpTranslated, "icmp_translated"),
        (Stat::IcmpUntracked, "icmp_untracked"),
        (Stat::FragNeededSent, "frag_needed_sent"),
        (Stat::RstChallenged, "rst_challenged"),
        (Stat::SynUnconfirmed, "syn_unconfirmed"),
    ];

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn names_are_in_index_order() {
            for (i, (stat, _)) in ALL.iter().enumerate() {
                assert_eq!(*stat as usize, i, "{stat:?} is out of order in ALL");
            }
        }
    }
}

/// The `EVENTS` ring buffer: rare, actionable datapath events for the controller's log, with
/// the flow's addresses. Counters stay the hot path's only output; the datapath sends each kind
/// at most once a second per CPU.
pub mod events {
    /// What happened.
    #[repr(u32)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum EventKind {
        /// A SYN was dropped: no free SNAT port toward the backend.
        SnatExhausted = 0,
        /// A SYN was dropped: the connection table is full.
        CtFull,
        /// The cutover lease ran out in the kernel while its fenced backend was still active:
        /// hold and fence were lifted without the controller (which is then stuck, or gone).
        LeaseExpired,
        /// A SYN was dropped during a hold: the parked-SYN ring was full.
        HoldRingFull,
        /// A SYN was dropped: `ACTIVE` names a backend that is not configured (`detail`).
        BadActive,
        /// A SYN was dropped: a fleet member's hold lapsed closed (`LAPSE_CLOSED`) because its
        /// controller could not confirm the fleet's cutover (etcd away, or the controller down).
        Unconfirmed,
    }

    /// How many kinds there are.
    pub const EVENT_KINDS: u32 = EventKind::Unconfirmed as u32 + 1;

    impl EventKind {
        /// The kind with this discriminant.
        #[must_use]
        pub const fn from_u32(v: u32) -> Option<Self> {
            Some(match v {
                0 => Self::SnatExhausted,
                1 => Self::CtFull,
                2 => Self::LeaseExpired,
                3 => Self::HoldRingFull,
                4 => Self::BadActive,
                5 => Self::Unconfirmed,
                _ => return None,
            })
        }
    }

    /// One event, as `EVENTS` carries it.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct DatapathEvent {
        /// An [`EventKind`] discriminant.
        pub kind: u32,
        /// Kind-specific: the bad `ACTIVE` value.
        pub detail: u32,
        /// `bpf_ktime_get_ns` when it happened.
        pub at_ns: u64,
        pub client_addr_be: u32,
        pub backend_addr_be: u32,
        pub client_port_be: u16,
        pub backend_port_be: u16,
        pub _pad0: u32,
    }
    const _: () = assert!(core::mem::size_of::<DatapathEvent>() == 32);

    #[cfg(feature = "user")]
    // SAFETY: plain old data, every bit pattern is valid, no implicit padding.
    unsafe impl aya::Pod for DatapathEvent {}
}

/// Sizes of the maps. A full table drops the SYN and counts it; it never evicts.
pub mod limits {
    /// Tracked connections. A preallocated hash of this size costs tens of MB of kernel
    /// memory, and a `PostgreSQL` fleet rarely has more than tens of thousands of connections.
    pub const CT_ENTRIES: u32 = 1 << 20;
    /// `REV` also holds quarantined ports, so it is as large as `CT`.
    pub const REV_ENTRIES: u32 = 1 << 20;
    /// Interfaces the datapath may redirect to.
    pub const TX_PORTS: u32 = 64;
    /// SNAT ports tried for one SYN before it is dropped as `SnatExhausted`.
    pub const SNAT_PROBES: u32 = 32;
}
