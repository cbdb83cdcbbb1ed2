//! What the running controller sees, in one cheap answer: the `Snapshot` control request that
//! `status --watch` asks for every second, and `status` once.
//!
//! Nothing here walks the connection table: connection counts and SNAT port use come from the
//! last GC pass (which walks it anyway, every `--gc-interval`), the datapath counters are one
//! per-CPU array read each, and the lag is the one the controller measures every
//! `--lag-interval`. So any number of watchers cost the datapath nothing measurable.

use std::net::{Ipv4Addr, SocketAddrV4};

use serde::{Deserialize, Serialize};

use crate::{
    clock,
    controller::{Controller, Phase},
    datapath::Role,
};

/// One backend as the datapath has it, with its connections as of the last GC pass.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Backend {
    pub role: Role,
    pub addr: SocketAddrV4,
    pub snat: Ipv4Addr,
    /// Live (not closing) connections, as of the last GC pass; `None` before the first pass.
    pub connections: Option<u64>,
}

/// SNAT ports claimed for one backend through one SNAT address, as of the last GC pass.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ports {
    pub backend: SocketAddrV4,
    pub snat: Ipv4Addr,
    pub claimed: u64,
    pub capacity: u64,
}

/// One datapath counter (a total since the datapath was pinned).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Counter {
    pub name: String,
    pub value: u64,
}

/// Replication lag, as the controller last measured it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lag {
    /// The worst database's; `None`: unknown.
    pub bytes: Option<u64>,
    pub seconds: f64,
    pub healthy: bool,
    pub problems: Vec<String>,
    /// Each replicated database's own lag (logical replication).
    #[serde(default)]
    pub databases: Vec<crate::pg::lag::DatabaseLag>,
}

/// The fleet epoch this host applies (`run --etcd`), from the controller's memory: no etcd
/// round trip per watch frame (`status` shows the committed state as etcd has it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fleet {
    pub fleet: String,
    pub member: String,
    pub epoch: u64,
    pub active: Role,
    /// This member's key exists under its current lease, as etcd confirmed lately (from the
    /// keep-alive's memory, not a round trip).
    /// `None`: an older controller that does not say.
    #[serde(default)]
    pub live: Option<bool>,
}

/// What the controller answers to `Request::Snapshot`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// When the counters were read, on the datapath's clock (`CLOCK_MONOTONIC`): rates are
    /// differences of two snapshots over the difference of their `at_ns`.
    pub at_ns: u64,
    pub vip: Option<SocketAddrV4>,
    /// Where new connections go (`None`: ACTIVE holds no valid role).
    pub active: Option<Role>,
    pub backends: Vec<Backend>,
    /// All tracked entries, closing ones included, as of the last GC pass.
    pub tracked: Option<u64>,
    /// How old the connection counts and port use are (`None`: no GC pass yet).
    pub gc_age_ms: Option<u64>,
    pub ports: Vec<Ports>,
    pub counters: Vec<Counter>,
    pub lag: Option<Lag>,
    pub phase: Phase,
    pub last_recovery: Option<String>,
    pub fleet: Option<Fleet>,
}

impl Snapshot {
    /// A counter's total (0 when the datapath has no counter of that name).
    #[must_use]
    pub fn counter(&self, name: &str) -> u64 {
        self.counters
            .iter()
            .find(|c| c.name == name)
            .map_or(0, |c| c.value)
    }
}

/// Takes a snapshot of `ctl`. Errors reading a map leave that part out rather than fail the
/// whole answer: a watcher keeps showing what can be read.
pub fn take(ctl: &Controller) -> Snapshot {
    let maps = crate::sync::lock(&ctl.host.maps);
    let at_ns = clock::monotonic_ns();
    let counters = maps
        .stats()
        .unwrap_or_default()
        .into_iter()
        .map(|(name, value)| Counter {
            name: name.to_owned(),
            value,
        })
        .collect();
    let vip = maps.vip().ok().flatten();
    let active = maps.active().ok().flatten();
    let configured: Vec<_> = [Role::Source, Role::Target]
        .into_iter()
        .filter_map(|role| Some((role, maps.backend(role).ok().flatten()?)))
        .collect();
    drop(maps);

    let gc = crate::sync::lock(&ctl.last_gc).clone();
    let backends = configured
        .into_iter()
        .map(|(role, b)| Backend {
            role,
            addr: b.addr,
            snat: b.snat,
            connections: gc.as_ref().map(|gc| gc.live(b.addr)),
        })
        .collect();
    let lag = crate::sync::lock(&ctl.last_lag).as_ref().map(|l| Lag {
        bytes: l.bytes,
        seconds: l.seconds,
        healthy: l.healthy,
        problems: l.problems.clone(),
        databases: l.databases.clone(),
    });
    Snapshot {
        at_ns,
        vip,
        active,
        backends,
        tracked: gc.as_ref().map(|gc| gc.ct_live),
        gc_age_ms: gc.as_ref().map(|gc| {
            u64::try_from(clock::since(gc.at_ns, clock::monotonic_ns()).as_millis())
                .unwrap_or(u64::MAX)
        }),
        ports: gc
            .as_ref()
            .map(|gc| {
                gc.ports
                    .iter()
                    .map(|p| Ports {
                        backend: p.backend,
                        snat: p.snat,
                        claimed: p.claimed,
                        capacity: p.capacity,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        counters,
        lag,
        phase: ctl.phase(),
        last_recovery: crate::sync::lock(&ctl.last_recovery).clone(),
        fleet: ctl.fleet.as_ref().map(|f| {
            let applied = f.applied();
            Fleet {
                fleet: f.settings.fleet.clone(),
                member: f.settings.member.clone(),
                epoch: applied.epoch.0,
                active: applied.active,
                live: Some(f.live()),
            }
        }),
    }
}
