//! Reading the connection table, and its garbage collection.
//!
//! The datapath only ever creates entries; the controller deletes them, always the `CT` entry
//! before its `REV` twin, and keeps the `REV` entry (the SNAT port claim) for a quarantine after
//! the connection is gone, longer than the backend's `TIME_WAIT` (cilium#45863: a port reused
//! while the server still holds the old tuple gets a challenge ACK and the connect times out).

use std::{collections::HashMap as StdHashMap, net::SocketAddrV4, time::Duration};

use redirect_common::{
    ct::{self, CtEntry, CtKey},
    rev::RevEntry,
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
        let backend_addr = SocketAddrV4::new(
            ip_from_be(e.backend_addr_be),
            u16::from_be(e.backend_port_be),
        );
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

/// Live (not closing) connections per backend address.
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
    /// How long a SNAT port stays claimed after its connection is gone.
    pub port_quarantine: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            syn: Duration::from_secs(60),
            established: Duration::from_secs(6 * 3600),
            close: Duration::from_secs(10),
            port_quarantine: Duration::from_secs(120),
        }
    }
}

/// What one GC pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    pub ct_expired: u64,
    pub ports_quarantined: u64,
    pub ports_released: u64,
    pub ct_live: u64,
}

fn expired(e: &CtEntry, now: u64, t: &Timeouts) -> bool {
    let idle = clock::since(e.last_seen_ns, now);
    let limit = match ConnState::of(e.flags) {
        ConnState::Closed => t.close,
        ConnState::SynSent => t.syn,
        ConnState::Established | ConnState::Closing => t.established,
    };
    idle > limit
}

/// One pass: expire `CT` entries by state and idle time; then mark `REV` entries whose `CT`
/// twin is gone (or belongs to a newer connection) as orphaned, and delete them once the
/// quarantine has passed.
pub fn gc(maps: &mut Maps, t: &Timeouts) -> Result<GcReport, DatapathError> {
    let map_err = |what: &'static str| {
        move |source| DatapathError::Map {
            what: what.into(),
            source,
        }
    };
    let now = clock::monotonic_ns();
    let mut report = GcReport::default();

    let mut dead = Vec::new();
    for item in &maps.ct {
        let (k, e) = item.map_err(map_err("reading CT"))?;
        if expired(&e, now, t) {
            dead.push(k);
        } else {
            report.ct_live += 1;
        }
    }
    for k in &dead {
        // Re-check: the entry may have been refreshed or reopened since the scan.
        if let Ok(e) = maps.ct.get(k, 0)
            && expired(&e, clock::monotonic_ns(), t)
        {
            match maps.ct.remove(k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => report.ct_expired += 1,
                Err(e) => return Err(map_err("deleting from CT")(e)),
            }
        }
    }

    let mut orphan = Vec::new();
    let mut release = Vec::new();
    for item in &maps.rev {
        let (rk, re) = item.map_err(map_err("reading REV"))?;
        let key = CtKey {
            client_addr_be: re.client_addr_be,
            vip_addr_be: re.vip_addr_be,
            client_port_be: re.client_port_be,
            vip_port_be: re.vip_port_be,
        };
        let owned = maps.ct.get(&key, 0).is_ok_and(|e| {
            e.snat_port_be == rk.snat_port_be
                && e.snat_addr_be == rk.snat_addr_be
                && e.backend_addr_be == rk.backend_addr_be
                && e.backend_port_be == rk.backend_port_be
        });
        if owned {
            if re.orphaned_ns != 0 {
                // Seen between the datapath's REV and CT inserts last pass: not an orphan.
                orphan.push((
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
            orphan.push((
                rk,
                RevEntry {
                    orphaned_ns: now,
                    ..re
                },
            ));
        } else if clock::since(re.orphaned_ns, now) > t.port_quarantine {
            release.push(rk);
        }
    }
    for (rk, re) in orphan {
        // BPF_EXIST: never resurrect an entry deleted meanwhile.
        if maps.rev.insert(rk, re, BPF_EXIST).is_ok() && re.orphaned_ns != 0 {
            report.ports_quarantined += 1;
        }
    }
    for rk in release {
        match maps.rev.remove(&rk) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => report.ports_released += 1,
            Err(e) => return Err(map_err("deleting from REV")(e)),
        }
    }
    Ok(report)
}

/// `BPF_EXIST` from `linux/bpf.h`: update only an element that exists.
const BPF_EXIST: u64 = 2;
