//! Reading the connection table, and its garbage collection.
//!
//! The datapath only ever creates entries; the controller deletes them, always the `CT` entry
//! before its `REV` twin, and keeps the `REV` entry (the SNAT port claim) for a quarantine after
//! the connection is gone, longer than the backend's `TIME_WAIT` (cilium#45863: a port reused
//! while the server still holds the old tuple gets a challenge ACK and the connect times out).

use std::{
    collections::HashMap as StdHashMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use redirect_common::{
    ct::{self, CtEntry, CtKey},
    rev::{RevEntry, RevKey},
};
use serde::Serialize;

use crate::{
    clock,
    datapath::{DatapathError, Maps, Role, ip_from_be},
};

/// The lifecycle of a tracked connection, from its flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnState {
    /// Only the client's SYN has been seen.
    SynSent,
    Established,
    /// One side has sent a FIN.
    Closing,
    /// Both FINs, or a RST: kept only for the close timeout.
    Closed,
}

impl ConnState {
    #[must_use]
    pub const fn of(flags: u32) -> Self {
        if ct::is_closed(flags) {
            Self::Closed
        } else if ct::is_closing(flags) {
            Self::Closing
        } else if flags & ct::FLAG_SEEN_NON_SYN != 0 {
            Self::Established
        } else {
            Self::SynSent
        }
    }

    /// Counts as a live connection (not closing or closed).
    #[must_use]
    pub const fn is_live(self) -> bool {
        matches!(self, Self::SynSent | Self::Established)
    }
}

/// One row of `redirect connections`.
#[derive(Clone, Debug, Serialize)]
pub struct Connection {
    pub client: SocketAddrV4,
    pub vip: SocketAddrV4,
    /// "source", "target", or the address when it matches neither current backend.
    pub backend: String,
    pub backend_addr: SocketAddrV4,
    pub snat: SocketAddrV4,
    pub state: ConnState,
    /// The client tried to send data to a fenced (old) server.
    pub fenced: bool,
    /// The next sequence number the client expects from the server, as of its last fenced
    /// packet (for a reset).
    #[serde(skip)]
    pub fenced_ack: u32,
    #[serde(serialize_with = "as_secs")]
    pub age: Duration,
    #[serde(serialize_with = "as_secs")]
    pub idle: Duration,
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1000.0).round() / 1000.0)
}

fn client_of(k: &CtKey) -> SocketAddrV4 {
    SocketAddrV4::new(ip_from_be(k.client_addr_be), u16::from_be(k.client_port_be))
}

/// The backend a connection was sent to.
fn backend_of(e: &CtEntry) -> SocketAddrV4 {
    SocketAddrV4::new(
        ip_from_be(e.backend_addr_be),
        u16::from_be(e.backend_port_be),
    )
}

/// Every tracked connection.
pub fn list(maps: &Maps) -> Result<Vec<Connection>, DatapathError> {
    let now = clock::monotonic_ns();
    let mut roles = Vec::new();
    for role in [Role::Source, Role::Target] {
        if let Some(b) = maps.backend(role)? {
            roles.push((b.addr, role));
        }
    }
    let mut out = Vec::new();
    for item in &maps.ct {
        let (k, e) = item.map_err(|source| DatapathError::Map {
            what: "reading CT".into(),
            source,
        })?;
        let backend_addr = backend_of(&e);
        let backend = roles
            .iter()
            .find(|(a, _)| *a == backend_addr)
            .map_or_else(|| backend_addr.to_string(), |(_, r)| r.name().to_owned());
        out.push(Connection {
            client: client_of(&k),
            vip: SocketAddrV4::new(ip_from_be(k.vip_addr_be), u16::from_be(k.vip_port_be)),
            backend,
            backend_addr,
            snat: SocketAddrV4::new(ip_from_be(e.snat_addr_be), u16::from_be(e.snat_port_be)),
            state: ConnState::of(e.flags),
            fenced: e.flags & ct::FLAG_FENCED != 0,
            fenced_ack: u32::from_be(e.fenced_ack_be),
            age: clock::since(e.created_ns, now),
            idle: clock::since(e.last_seen_ns, now),
        });
    }
    out.sort_by_key(|c| (c.backend.clone(), c.client));
    Ok(out)
}

/// Live (not closing) connections per backend address, by walking the whole table: for the
/// one-off CLI commands that run without a controller. A running controller counts them in
/// each GC pass ([`GcReport::live_per_backend`]) instead.
pub fn live_per_backend(maps: &Maps) -> Result<StdHashMap<SocketAddrV4, u64>, DatapathError> {
    let mut counts = StdHashMap::new();
    for c in list(maps)? {
        if c.state.is_live() {
            *counts.entry(c.backend_addr).or_default() += 1;
        }
    }
    Ok(counts)
}

/// How long entries live without traffic, by state.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// A SYN that never got an answer.
    pub syn: Duration,
    /// An established connection with no packet either way. Keep it above the longest idle
    /// time of pooled connections, or set `tcp_keepalives_idle` on the servers below it.
    pub established: Duration,
    /// After both FINs or a RST: time for the last ACKs and retransmitted FINs.
    pub close: Duration,
    /// How long a SNAT port stays claimed after its connection is gone, when the backend
    /// closed first and so holds the tuple in `TIME_WAIT`.
    pub port_quarantine: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            syn: Duration::from_secs(60),
            established: Duration::from_secs(6 * 3600),
            close: Duration::from_secs(2),
            port_quarantine: Duration::from_secs(120),
        }
    }
}

/// Port pressure at or above which the GC runs more often and forgets half-open handshakes
/// sooner (a SYN flood, or a backend that stopped answering).
pub const PRESSURE_HIGH: f64 = 0.5;
/// Pressure below which that stops again. The gap keeps the short timeouts on until a flood's
/// leftovers are gone: leaving at 50% stranded the rest of them for the full 60 s.
pub const PRESSURE_RELIEVED: f64 = 0.1;

/// Whether the GC runs pressured after a pass that measured `pressure`, given whether it was.
#[must_use]
pub fn pressured(was: bool, pressure: f64) -> bool {
    pressure
        >= if was {
            PRESSURE_RELIEVED
        } else {
            PRESSURE_HIGH
        }
}
/// The SYN timeout under high pressure. Forgetting a half-open entry is harmless: the client's
/// next SYN retransmit (1, 3, 7, 15 s after the first) simply opens it again.
pub const PRESSURED_SYN_TIMEOUT: Duration = Duration::from_secs(3);
/// The close timeout under high pressure: still several round trips and a retransmitted FIN
/// (200 ms minimum RTO) for the last packets of a closed connection.
pub const PRESSURED_CLOSE_TIMEOUT: Duration = Duration::from_millis(500);

/// When the next GC pass runs, given the highest port pressure the last one measured: the
/// configured interval while ports are plentiful, down to 250 ms as a range fills, so the
/// time a closed connection's port stays claimed shrinks when it matters.
#[must_use]
pub fn next_gc_interval(configured: Duration, pressure: f64) -> Duration {
    let cap = if pressure >= PRESSURE_HIGH {
        Duration::from_millis(250)
    } else if pressure >= 0.1 {
        Duration::from_secs(1)
    } else {
        configured
    };
    configured.min(cap)
}

/// SNAT ports claimed for one backend through one SNAT address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PortUse {
    pub backend: SocketAddrV4,
    pub snat: Ipv4Addr,
    /// Ports of live, closing and quarantined connections.
    pub claimed: u64,
    /// Ports in the SNAT range.
    pub capacity: u64,
}

impl PortUse {
    /// Claimed share of the range, 0.0 to 1.0.
    #[must_use]
    pub fn pressure(&self) -> f64 {
        if self.capacity == 0 {
            return 1.0;
        }
        #[expect(clippy::cast_precision_loss, reason = "at most 65,536 ports")]
        let p = self.claimed as f64 / self.capacity as f64;
        p
    }
}

/// Forgotten connections by how they ended: who closed first decides whether a SNAT port
/// needs a quarantine, so this is what the port budget depends on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Forgotten {
    /// Both FINs, the client's first (`PostgreSQL`'s Terminate): port freed at once.
    pub client_closed_first: u64,
    /// Both FINs, the backend's first: port quarantined.
    pub backend_closed_first: u64,
    /// Ended by a RST: port freed at once.
    pub reset: u64,
    /// A handshake that never completed: port freed at once.
    pub half_open: u64,
    /// Idle past the established timeout, or half-closed: port quarantined.
    pub idle: u64,
}

impl Forgotten {
    fn count(&mut self, flags: u32) {
        let slot = match ConnState::of(flags) {
            ConnState::SynSent => &mut self.half_open,
            _ if flags & ct::FLAG_RST != 0 => &mut self.reset,
            ConnState::Closed if flags & ct::FLAG_BACKEND_CLOSED_FIRST != 0 => {
                &mut self.backend_closed_first
            }
            ConnState::Closed => &mut self.client_closed_first,
            ConnState::Established | ConnState::Closing => &mut self.idle,
        };
        *slot += 1;
    }

    /// Adds another tally to this one.
    pub fn add(&mut self, other: &Self) {
        self.client_closed_first += other.client_closed_first;
        self.backend_closed_first += other.backend_closed_first;
        self.reset += other.reset;
        self.half_open += other.half_open;
        self.idle += other.idle;
    }

    /// Each tally with its metric label.
    #[must_use]
    pub const fn labelled(&self) -> [(&'static str, u64); 5] {
        [
            ("client_closed_first", self.client_closed_first),
            ("backend_closed_first", self.backend_closed_first),
            ("reset", self.reset),
            ("half_open", self.half_open),
            ("idle", self.idle),
        ]
    }
}

/// What one GC pass did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct GcReport {
    pub ct_expired: u64,
    /// Entries found alive when taken out (a reopen or a packet raced the pass), put back.
    pub ct_restored: u64,
    /// How the connections this pass forgot had ended.
    pub forgotten: Forgotten,
    /// The same, summed over every pass of this controller (filled in by the GC task).
    pub forgotten_total: Forgotten,
    /// Ports freed with their connection: nobody holds `TIME_WAIT` for them.
    pub ports_released_at_once: u64,
    pub ports_quarantined: u64,
    /// Ports freed at the end of their quarantine.
    pub ports_released: u64,
    pub ct_live: u64,
    /// Live (not closing) connections per backend address, counted during the pass: what
    /// `/metrics`, `status` and `status --watch` show, so that none of them walks the table.
    #[serde(skip)]
    pub live_per_backend: StdHashMap<SocketAddrV4, u64>,
    /// When the pass ended, on the datapath's clock ([`clock::monotonic_ns`]).
    #[serde(skip)]
    pub at_ns: u64,
    /// Port use per backend and SNAT address, after the pass.
    pub ports: Vec<PortUse>,
    /// How long the pass took.
    pub took_ms: u64,
    /// Entries a map operation failed on (skipped; the next pass retries them).
    pub errors: u64,
}

impl GcReport {
    /// Live connections to `backend` as of this pass.
    #[must_use]
    pub fn live(&self, backend: SocketAddrV4) -> u64 {
        self.live_per_backend.get(&backend).copied().unwrap_or(0)
    }

    /// Counts a connection the pass keeps.
    fn kept(&mut self, e: &CtEntry) {
        self.ct_live += 1;
        if ConnState::of(e.flags).is_live() {
            *self.live_per_backend.entry(backend_of(e)).or_default() += 1;
        }
    }

    /// The highest port pressure of any backend.
    #[must_use]
    pub fn max_pressure(&self) -> f64 {
        self.ports.iter().map(PortUse::pressure).fold(0.0, f64::max)
    }
}

/// What to do with an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Keep,
    /// Delete it; free its port now, or leave it to the quarantine.
    Forget {
        release_port: bool,
    },
}

fn fate(e: &CtEntry, now: u64, t: &Timeouts, pressured: bool) -> Fate {
    let idle = clock::since(e.last_seen_ns, now);
    let limit = match ConnState::of(e.flags) {
        ConnState::Closed if pressured => t.close.min(PRESSURED_CLOSE_TIMEOUT),
        ConnState::Closed => t.close,
        ConnState::SynSent if pressured => t.syn.min(PRESSURED_SYN_TIMEOUT),
        ConnState::SynSent => t.syn,
        ConnState::Established | ConnState::Closing => t.established,
    };
    if idle > limit {
        Fate::Forget {
            release_port: ct::port_reusable_at_once(e.flags),
        }
    } else {
        Fate::Keep
    }
}

/// One pass: forget `CT` entries by state and idle time, freeing the SNAT port of those whose
/// backend holds no `TIME_WAIT` at once; then mark `REV` entries whose `CT` twin is gone (or
/// belongs to a newer connection) as orphaned, and delete them once the quarantine has
/// passed. `pressured` (the last pass measured high port pressure) shortens the SYN timeout.
pub fn gc(maps: &mut Maps, t: &Timeouts, pressured: bool) -> Result<GcReport, DatapathError> {
    let started = std::time::Instant::now();
    let now = clock::monotonic_ns();
    let mut report = GcReport::default();
    let dead = scan_ct(maps, t, pressured, now, &mut report)?;
    for k in &dead {
        forget_ct(maps, k, t, pressured, &mut report);
    }
    let rev = scan_rev(maps, t, now)?;
    apply_rev(maps, rev.orphan, rev.release, &mut report);
    report.ports = port_use_of(maps, &rev.claimed)?;
    report.took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    report.at_ns = clock::monotonic_ns();
    Ok(report)
}

/// A map read that failed, as the pass reports it.
fn map_err(what: &'static str) -> impl Fn(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map {
        what: what.into(),
        source,
    }
}

/// Walks `CT`: the keys of entries to forget; the others are counted as kept.
fn scan_ct(
    maps: &Maps,
    t: &Timeouts,
    pressured: bool,
    now: u64,
    report: &mut GcReport,
) -> Result<Vec<CtKey>, DatapathError> {
    let mut dead = Vec::new();
    for item in &maps.ct {
        let (k, e) = item.map_err(map_err("reading CT"))?;
        if fate(&e, now, t, pressured) == Fate::Keep {
            report.kept(&e);
        } else {
            dead.push(k);
        }
    }
    Ok(dead)
}

/// Forgets one `CT` entry the scan found dead, if it still is, and frees its port if nobody
/// holds `TIME_WAIT` for it.
fn forget_ct(maps: &mut Maps, k: &CtKey, t: &Timeouts, pressured: bool, report: &mut GcReport) {
    // Re-check first: most entries that changed since the scan (a client reopening its
    // tuple) are skipped here without ever leaving the table.
    if !maps
        .ct
        .get(k, 0)
        .is_ok_and(|e| fate(&e, clock::monotonic_ns(), t, pressured) != Fate::Keep)
    {
        // Kept after all (refreshed since the scan): still a connection to count.
        if let Ok(e) = maps.ct.get(k, 0) {
            report.kept(&e);
        }
        return;
    }
    // Take the entry out and look at what was really removed: the datapath may still have
    // refreshed it, or reopened the tuple, between the check and the delete.
    // A failure on one entry skips that entry, not the pass: a pass that stopped at the
    // first error would let the table fill up while the error lasts.
    let e = match maps.take_ct(k) {
        Ok(Some(e)) => e,
        Ok(None) => return,
        Err(_) => {
            report.errors += 1;
            return;
        }
    };
    let Fate::Forget { release_port } = fate(&e, clock::monotonic_ns(), t, pressured) else {
        // Alive after all: put it back, unless the datapath already made a newer one (then
        // the newer one wins and this one is gone: counted).
        if maps.ct.insert(k, e, BPF_NOEXIST).is_err() {
            report.errors += 1;
        }
        report.ct_restored += 1;
        report.kept(&e);
        return;
    };
    report.ct_expired += 1;
    report.forgotten.count(e.flags);
    if release_port {
        release_port_of(maps, k, &e, report);
    }
}

/// Frees the port claim of a forgotten `CT` entry at once. The entry is gone, so no packet
/// refers to this claim any more; free it unless the datapath already did (and someone else
/// claimed the port since).
fn release_port_of(maps: &mut Maps, k: &CtKey, e: &CtEntry, report: &mut GcReport) {
    let rk = e.rev_key();
    if maps.rev.get(&rk, 0).is_ok_and(|re| re.belongs_to(k, e)) {
        match maps.rev.remove(&rk) {
            Ok(()) => report.ports_released_at_once += 1,
            Err(aya::maps::MapError::KeyNotFound) => {}
            Err(_) => report.errors += 1,
        }
    }
}

/// What a walk of `REV` found.
struct RevScan {
    /// Claims still held, by (backend address, backend port, SNAT address).
    claimed: StdHashMap<(u32, u16, u32), u64>,
    /// Entries whose orphan mark changes (set, or cleared), with the mark they get.
    orphan: Vec<(RevKey, RevEntry)>,
    /// Orphans whose quarantine has passed.
    release: Vec<RevKey>,
}

/// Walks `REV`: which claims are held, which lost their `CT` twin (or found it again), and
/// which orphans have served their quarantine.
fn scan_rev(maps: &Maps, t: &Timeouts, now: u64) -> Result<RevScan, DatapathError> {
    let mut scan = RevScan {
        claimed: StdHashMap::new(),
        orphan: Vec::new(),
        release: Vec::new(),
    };
    for item in &maps.rev {
        let (rk, re) = item.map_err(map_err("reading REV"))?;
        let key = CtKey {
            client_addr_be: re.client_addr_be,
            vip_addr_be: re.vip_addr_be,
            client_port_be: re.client_port_be,
            vip_port_be: re.vip_port_be,
        };
        let owned = maps
            .ct
            .get(&key, 0)
            .is_ok_and(|e| e.rev_key() == rk && re.belongs_to(&key, &e));
        if owned {
            *scan
                .claimed
                .entry((rk.backend_addr_be, rk.backend_port_be, rk.snat_addr_be))
                .or_default() += 1;
            if re.orphaned_ns != 0 {
                // Seen between the datapath's REV and CT inserts last pass: not an orphan.
                scan.orphan.push((
                    rk,
                    RevEntry {
                        orphaned_ns: 0,
                        ..re
                    },
                ));
            }
            continue;
        }
        if re.orphaned_ns == 0 {
            scan.orphan.push((
                rk,
                RevEntry {
                    orphaned_ns: now,
                    ..re
                },
            ));
        } else if clock::since(re.orphaned_ns, now) > t.port_quarantine {
            scan.release.push(rk);
            continue;
        }
        *scan
            .claimed
            .entry((rk.backend_addr_be, rk.backend_port_be, rk.snat_addr_be))
            .or_default() += 1;
    }
    Ok(scan)
}

/// Writes the orphan marks and frees the ports whose quarantine has passed.
fn apply_rev(
    maps: &mut Maps,
    orphan: Vec<(RevKey, RevEntry)>,
    release: Vec<RevKey>,
    report: &mut GcReport,
) {
    for (rk, re) in orphan {
        // BPF_EXIST: never resurrect an entry deleted meanwhile.
        if maps.rev.insert(rk, re, BPF_EXIST).is_ok() && re.orphaned_ns != 0 {
            report.ports_quarantined += 1;
        }
    }
    for rk in release {
        match maps.rev.remove(&rk) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => report.ports_released += 1,
            Err(_) => report.errors += 1,
        }
    }
}

/// Port use of each configured backend, from claim counts keyed by (backend address, backend
/// port, SNAT address), all in network byte order.
fn port_use_of(
    maps: &Maps,
    claimed: &StdHashMap<(u32, u16, u32), u64>,
) -> Result<Vec<PortUse>, DatapathError> {
    let cfg = maps.config()?;
    let capacity = u64::from(cfg.snat_port_max.saturating_sub(cfg.snat_port_min)) + 1;
    let mut out = Vec::new();
    for role in [Role::Source, Role::Target] {
        if let Some(b) = maps.backend(role)? {
            let key = (
                u32::from(*b.addr.ip()).to_be(),
                b.addr.port().to_be(),
                u32::from(b.snat).to_be(),
            );
            out.push(PortUse {
                backend: b.addr,
                snat: b.snat,
                claimed: claimed.get(&key).copied().unwrap_or(0),
                capacity,
            });
        }
    }
    Ok(out)
}

/// Port use per backend now (one pass over `REV`; `status` uses it without a controller).
pub fn port_use(maps: &Maps) -> Result<Vec<PortUse>, DatapathError> {
    let mut claimed: StdHashMap<(u32, u16, u32), u64> = StdHashMap::new();
    for item in &maps.rev {
        let (rk, _) = item.map_err(|source| DatapathError::Map {
            what: "reading REV".into(),
            source,
        })?;
        *claimed
            .entry((rk.backend_addr_be, rk.backend_port_be, rk.snat_addr_be))
            .or_default() += 1;
    }
    port_use_of(maps, &claimed)
}

/// `BPF_EXIST` from `linux/bpf.h`: update only an element that exists.
const BPF_EXIST: u64 = 2;
/// `BPF_NOEXIST`: create only an element that does not exist.
const BPF_NOEXIST: u64 = 1;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_starts_at_half_full_and_ends_below_a_tenth() {
        assert!(!pressured(false, 0.3));
        assert!(pressured(false, 0.5));
        assert!(pressured(true, 0.3), "still draining a flood");
        assert!(!pressured(true, 0.05));
    }

    #[test]
    fn the_gc_speeds_up_as_the_port_range_fills() {
        let base = Duration::from_secs(5);
        assert_eq!(next_gc_interval(base, 0.0), base);
        assert_eq!(next_gc_interval(base, 0.2), Duration::from_secs(1));
        assert_eq!(next_gc_interval(base, 0.9), Duration::from_millis(250));
        let fast = Duration::from_millis(100);
        assert_eq!(
            next_gc_interval(fast, 0.9),
            fast,
            "never slower than configured"
        );
    }

    #[test]
    fn half_open_entries_go_sooner_under_pressure_and_free_their_port() {
        let t = Timeouts::default();
        let now = 100_000_000_000;
        let half_open = CtEntry {
            last_seen_ns: now - 5_000_000_000,
            flags: ct::FLAG_SYNACK_SEEN,
            ..CtEntry::default()
        };
        assert_eq!(fate(&half_open, now, &t, false), Fate::Keep);
        assert_eq!(
            fate(&half_open, now, &t, true),
            Fate::Forget { release_port: true }
        );
    }

    #[test]
    fn only_a_backend_that_closed_first_quarantines_its_port() {
        let t = Timeouts::default();
        let now = 100_000_000_000;
        let closed = |extra| CtEntry {
            last_seen_ns: now - 3_000_000_000,
            flags: ct::FLAG_SEEN_NON_SYN | ct::FLAG_FIN_CLIENT | ct::FLAG_FIN_BACKEND | extra,
            ..CtEntry::default()
        };
        assert_eq!(
            fate(&closed(0), now, &t, false),
            Fate::Forget { release_port: true }
        );
        assert_eq!(
            fate(&closed(ct::FLAG_BACKEND_CLOSED_FIRST), now, &t, false),
            Fate::Forget {
                release_port: false
            }
        );
        let idle = CtEntry {
            last_seen_ns: 0,
            flags: ct::FLAG_SEEN_NON_SYN,
            ..CtEntry::default()
        };
        assert_eq!(
            fate(&idle, 7 * 3600 * 1_000_000_000, &t, false),
            Fate::Forget {
                release_port: false
            },
            "an idle-expired connection may still be open on the backend"
        );
    }
}
