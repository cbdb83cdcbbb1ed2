//! `redirect status`: where new connections go, how many each backend holds, and the
//! datapath's counters. Reads the pinned maps, so it works without `redirect run`; with a
//! controller running, connection counts and port use come from its last GC pass instead of a
//! walk of the tables. `--watch` keeps a live view open (`watch.rs`).

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddrV4,
    path::Path,
    time::Duration,
};

use serde::Serialize;

use crate::{
    conntrack::{self, PortUse},
    control::{
        self, Ask,
        protocol::{Databases, FleetRequest, Lag, SnapshotRequest, StateRequest},
    },
    datapath::{Maps, Role},
    net,
    snapshot::Snapshot,
};

/// Show the active backend, connections per backend and the datapath counters.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the result as JSON. With --watch: one JSON object per interval (JSON lines).
    #[arg(long)]
    pub json: bool,
    /// Keep watching, like `top`: the active backend, connections and new connections per
    /// second, counter rates, replication lag with its recent history, SNAT port use and any
    /// cutover in progress, redrawn every --interval; q or Ctrl-C quits. Reads the running
    /// controller (retrying while it is away). Not on a terminal: plain frames, one after
    /// another.
    #[arg(long)]
    pub watch: bool,
    /// How often --watch redraws.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s", requires = "watch")]
    pub interval: Duration,
}

#[derive(Serialize)]
pub struct BackendStatus {
    pub addr: String,
    pub snat: String,
    /// Live (not closing) tracked connections.
    pub connections: u64,
    /// SNAT ports claimed for this backend (live, closing and quarantined), and the range.
    pub snat_ports_claimed: u64,
    pub snat_ports_capacity: u64,
}

#[derive(Serialize)]
pub struct Status {
    pub pin_dir: String,
    /// "proxy" (NAT on the interfaces) or "socket" (zero-hop, at `connect()`).
    pub mode: &'static str,
    pub vip: Option<String>,
    /// "source" or "target".
    pub active: Option<Role>,
    pub interfaces: Vec<String>,
    /// Interface → the hook its pinned link is on ("xdp" or "tc").
    pub hooks: BTreeMap<String, &'static str>,
    pub backends: BTreeMap<&'static str, BackendStatus>,
    /// All tracked entries, including closing ones.
    pub tracked: u64,
    /// Connections, port use and tracked entries are as of the running controller's last GC
    /// pass, this many milliseconds ago; absent: counted by walking the tables just now
    /// (no controller running).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counted_gc_age_ms: Option<u64>,
    pub stats: BTreeMap<&'static str, u64>,
    /// Replication lag from the running controller, when it knows the databases.
    pub lag: Option<crate::pg::lag::ReplicaLag>,
    /// Every database on the two servers and what a cutover would do with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub databases: Option<Vec<crate::pg::cluster::Database>>,
    /// The controller's cutover phase and what its last recovery of an interrupted cutover did.
    pub controller: Option<crate::control::State>,
    /// A cutover the journal shows as started and not ended (a controller resumes or undoes
    /// it when it starts).
    pub interrupted: Option<String>,
    /// The controller's answers this CLI could not read (another version), by what they are.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub unreadable: BTreeMap<&'static str, String>,
    /// The fleet, from the running controller, when it is a member of one (`run --etcd`):
    /// members, the committed epoch and backend, and the epoch this host applied.
    pub fleet: Option<crate::fleet::View>,
    /// Socket mode: its hooks, and the connections opened during a hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<SocketStatus>,
}

/// Socket mode's part of the status. Its backends' `connections` are this host's hooked
/// sockets to each (from `sock_diag`: `status` must run on the host, in its namespace).
#[derive(Serialize)]
pub struct SocketStatus {
    /// The pinned hooks (`sockhook_<hook>`, `sockhook_<egress|ingress>_<iface>`).
    pub hooks: Vec<String>,
    /// Connections whose SYN waits for a hold's release.
    pub parked: u64,
    /// Connections translated for their life (held while a cutover that then did not flip).
    pub translated: u64,
}

/// Connections per backend, SNAT port use and tracked entries, from wherever is cheapest.
pub struct Counts {
    live: HashMap<SocketAddrV4, u64>,
    ports: Vec<PortUse>,
    tracked: u64,
    /// Age of the controller's GC pass they come from; `None`: walked just now.
    gc_age_ms: Option<u64>,
}

impl Counts {
    /// By walking the connection and port tables: without a controller.
    pub fn walked(maps: &Maps) -> anyhow::Result<Self> {
        let conns = conntrack::list(maps)?;
        let mut live = HashMap::new();
        for c in conns.iter().filter(|c| c.state.is_live()) {
            *live.entry(c.backend_addr).or_default() += 1;
        }
        Ok(Self {
            live,
            ports: conntrack::port_use(maps)?,
            tracked: conns.len() as u64,
            gc_age_ms: None,
        })
    }

    /// As of the running controller's last GC pass (`None` before its first one).
    #[must_use]
    pub fn counted(snapshot: &Snapshot) -> Option<Self> {
        Some(Self {
            live: snapshot
                .backends
                .iter()
                .map(|b| Some((b.addr, b.connections?)))
                .collect::<Option<_>>()?,
            ports: snapshot
                .ports
                .iter()
                .map(|p| PortUse {
                    backend: p.backend,
                    snat: p.snat,
                    claimed: p.claimed,
                    capacity: p.capacity,
                })
                .collect(),
            tracked: snapshot.tracked?,
            gc_age_ms: Some(snapshot.gc_age_ms?),
        })
    }
}

pub fn collect(maps: &Maps, counts: &Counts) -> anyhow::Result<Status> {
    let socket_mode = maps.is_socket_mode()?;
    let mut backends = BTreeMap::new();
    for role in [Role::Source, Role::Target] {
        if let Some(b) = maps.backend(role)? {
            let connections = if socket_mode {
                crate::host::sockets::hooked_to(maps, role)?.len() as u64
            } else {
                counts.live.get(&b.addr).copied().unwrap_or(0)
            };
            let port_use = counts
                .ports
                .iter()
                .find(|p| p.backend == b.addr && p.snat == b.snat);
            backends.insert(
                role.name(),
                BackendStatus {
                    addr: b.addr.to_string(),
                    snat: b.snat.to_string(),
                    connections,
                    snat_ports_claimed: port_use.map_or(0, |p| p.claimed),
                    snat_ports_capacity: port_use.map_or(0, |p| p.capacity),
                },
            );
        }
    }
    let socket = if socket_mode {
        Some(socket_status(maps))
    } else {
        None
    };
    Ok(Status {
        pin_dir: maps.dir.0.display().to_string(),
        mode: if socket_mode { "socket" } else { "proxy" },
        vip: maps.vip()?.map(|v| v.to_string()),
        active: maps.active()?,
        interfaces: maps.dir.linked_ifaces(),
        hooks: maps
            .dir
            .linked_ifaces()
            .into_iter()
            .map(|iface| {
                let hook = maps.dir.link_hook(&iface).map_or("unknown", |h| h.name());
                (iface, hook)
            })
            .collect(),
        backends,
        tracked: counts.tracked,
        counted_gc_age_ms: counts.gc_age_ms,
        stats: maps.stats()?.into_iter().collect(),
        unreadable: BTreeMap::new(),
        lag: None,
        databases: None,
        controller: None,
        interrupted: None,
        fleet: None,
        socket,
    })
}

fn socket_status(maps: &Maps) -> SocketStatus {
    let (mut parked, mut translated) = (0, 0);
    if let Some(s) = &maps.socket {
        for (_, flow) in s.flows.iter().filter_map(Result::ok) {
            if flow.backend_id == redirect_common::socket::PARKED {
                parked += 1;
            } else {
                translated += 1;
            }
        }
    }
    SocketStatus {
        hooks: crate::datapath::socket::pinned_links(&maps.dir),
        parked,
        translated,
    }
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".into();
    }
    format!("{}%", part * 100 / whole)
}

/// The journal's unfinished cutover, described.
fn interrupted(journal: &Path) -> Option<String> {
    let entries = crate::journal::read(journal).ok()?;
    let steps = crate::journal::unfinished(&entries)?;
    let first = steps.first()?;
    let last = steps.last()?;
    Some(format!(
        "cutover {} ({} -> {}) stopped after step {} at {}",
        first.cutover,
        first.from.map_or("?", Role::name),
        first.to.map_or("?", Role::name),
        last.step,
        last.time
    ))
}

/// What a running controller answers to `request`; `None` when none does or it refuses (a
/// controller without the databases has no lag). An answer it gave that this CLI cannot
/// read is kept, as `what`, in `unreadable`: the operator sees that it exists.
fn answer<Q: Ask>(
    rt: &tokio::runtime::Runtime,
    socket: &Path,
    request: Q,
    what: &'static str,
    unreadable: &mut BTreeMap<&'static str, String>,
) -> Option<Q::Answer> {
    match rt.block_on(control::ask(socket, request, |_| {})) {
        Ok(answer) => answer,
        Err(e) => {
            if e.downcast_ref::<control::client::Unreadable>().is_some() {
                unreadable.insert(what, e.to_string());
            }
            None
        }
    }
}

/// What a running controller answers; `None` when none does (or its answer is not one).
fn ask<Q: Ask>(rt: &tokio::runtime::Runtime, socket: &Path, request: Q) -> Option<Q::Answer> {
    if !socket.exists() {
        return None;
    }
    rt.block_on(control::ask(socket, request, |_| {}))
        .ok()
        .flatten()
}

pub fn run(args: &Args, pin_dir: &Path, socket: &Path, journal: &Path) -> anyhow::Result<()> {
    if args.watch {
        return super::watch::run(socket, args.interval, args.json);
    }
    net::require_root()?;
    let status = gather(pin_dir, socket, journal)?;
    if args.json {
        return super::print_json(&status);
    }
    print_human(&status);
    Ok(())
}

/// The status from the pinned maps and the journal, and from the controller if one runs.
fn gather(pin_dir: &Path, socket: &Path, journal: &Path) -> anyhow::Result<Status> {
    let maps = Maps::open(pin_dir)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // A running controller has the counts from its last GC pass: walking a big connection
    // table here would only repeat that work, holding nothing but costing seconds.
    let counted = ask(&rt, socket, SnapshotRequest).and_then(|s| Counts::counted(&s));
    let counts = match counted {
        Some(c) => c,
        None => Counts::walked(&maps)?,
    };
    let mut status = collect(&maps, &counts)?;
    status.interrupted = interrupted(journal);
    if socket.exists() {
        let unreadable = &mut status.unreadable;
        status.lag = answer(&rt, socket, Lag, "lag", unreadable);
        status.databases = answer(&rt, socket, Databases, "databases", unreadable);
        status.controller = answer(&rt, socket, StateRequest, "controller", unreadable);
        status.fleet = answer(&rt, socket, FleetRequest, "fleet", unreadable).flatten();
    }
    // An unfinished cutover is "interrupted" only if no controller is working on it.
    if status
        .controller
        .as_ref()
        .is_some_and(|c| c.phase != crate::controller::Phase::Idle)
    {
        status.interrupted = None;
    }
    Ok(status)
}

/// The status for a person to read.
fn print_human(status: &Status) {
    for (what, why) in &status.unreadable {
        println!("{what:<11} (unreadable: {why})");
    }
    print_routing(status);
    print_backends(status);
    print_controller(status);
    print_replication(status);
    print_counters(status);
}

/// Where the VIP is, which backend it goes to, and the hooked interfaces.
fn print_routing(status: &Status) {
    println!(
        "vip:        {}",
        status.vip.as_deref().unwrap_or("(not configured)")
    );
    println!(
        "active:     {}",
        status.active.map_or("(invalid)", Role::name)
    );
    let interfaces: Vec<String> = status
        .interfaces
        .iter()
        .map(|i| {
            format!(
                "{i} ({})",
                status.hooks.get(i).copied().unwrap_or("unknown")
            )
        })
        .collect();
    let Some(socket) = &status.socket else {
        println!("interfaces: {}", interfaces.join(", "));
        return;
    };
    println!("mode:       socket (zero-hop: connect() of this host's processes is redirected)");
    println!("hooks:      {}", socket.hooks.join(", "));
    println!(
        "held:       {} parked, {} translated (held while a cutover that did not flip)",
        socket.parked, socket.translated
    );
}

/// Each backend's connections and SNAT port use, and the tracked entries.
fn print_backends(status: &Status) {
    for (name, b) in &status.backends {
        let marker = if status.active.map(Role::name) == Some(*name) {
            "*"
        } else {
            " "
        };
        if status.socket.is_some() {
            // No NAT, no ports: the server sees this host's address.
            println!(
                "{marker} {name:<7} {:<21} from {:<15} {} hooked connection(s)",
                b.addr, b.snat, b.connections
            );
            continue;
        }
        println!(
            "{marker} {name:<7} {:<21} snat {:<15} {} live connection(s), SNAT ports {}/{} ({}){}",
            b.addr,
            b.snat,
            b.connections,
            b.snat_ports_claimed,
            b.snat_ports_capacity,
            percent(b.snat_ports_claimed, b.snat_ports_capacity),
            if b.snat_ports_capacity > 0 && b.snat_ports_claimed * 2 >= b.snat_ports_capacity {
                "  <- running short: add --snat-ip addresses or widen --snat-ports"
            } else {
                ""
            }
        );
    }
    if status.socket.is_some() {
        return;
    }
    match status.counted_gc_age_ms {
        Some(ms) => println!(
            "tracked entries: {} (as of the controller's GC pass {:.1} s ago)",
            status.tracked,
            Duration::from_millis(ms).as_secs_f64()
        ),
        None => println!("tracked entries: {}", status.tracked),
    }
}

/// The controller's cutover phase and last recovery, an interrupted cutover, and the fleet.
fn print_controller(status: &Status) {
    if let Some(c) = &status.controller {
        println!("cutover:    {}", c.phase);
        if let Some(r) = &c.last_recovery {
            println!("recovered:  {r}");
        }
    }
    if let Some(i) = &status.interrupted {
        println!("INTERRUPTED: {i}");
    }
    if let Some(f) = &status.fleet {
        print_fleet(f);
    }
}

/// Replication lag and the databases a cutover would move.
fn print_replication(status: &Status) {
    if let Some(lag) = &status.lag {
        for (i, line) in lag.lines().iter().enumerate() {
            println!("{}{line}", if i == 0 { "lag:        " } else { "  " });
        }
    }
    if let Some(databases) = &status.databases {
        println!("databases:");
        for line in crate::pg::cluster::describe(databases) {
            println!("  {line}");
        }
    }
}

/// The datapath counters that moved.
fn print_counters(status: &Status) {
    println!("counters:");
    for (name, v) in &status.stats {
        if *v > 0 {
            println!("  {name:<18} {v}");
        }
    }
}

/// The fleet part of `status`, from the controller's [`crate::fleet::View`].
fn print_fleet(f: &crate::fleet::View) {
    println!(
        "fleet:      {} (member {}, applied epoch {} -> {})",
        f.fleet, f.member, f.applied_epoch, f.applied_active
    );
    if !f.live {
        println!(
            "  this member is NOT LIVE: etcd has not confirmed its lease lately (cut off from etcd, or rejoining under a new lease). The datapath keeps its committed state; no cutover can pass until it is back"
        );
    }
    if let Some(e) = &f.etcd_error {
        println!("  etcd unreachable: {e} (the datapath keeps its committed state)");
        return;
    }
    match &f.committed {
        Some(c) => println!(
            "  committed: epoch {} -> {} ({}){}",
            c.epoch,
            c.active,
            c.phase,
            if f.in_sync {
                ""
            } else {
                "  <- this host does not apply it"
            }
        ),
        None => println!("  committed: unknown"),
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let committed_epoch = f.committed.as_ref().map(|c| c.epoch);
    for m in &f.members {
        let behind = match committed_epoch {
            Some(c) if m.applied_epoch < c => {
                format!(", {} epoch(s) behind", c.0 - m.applied_epoch.0)
            }
            _ => String::new(),
        };
        let acked = match m.applied_at_ms {
            0 => String::new(),
            at => format!(
                ", acknowledged {:.1} s ago",
                std::time::Duration::from_millis(now_ms.saturating_sub(at)).as_secs_f64()
            ),
        };
        println!(
            "  member {:<24} vip {:<21} epoch {} -> {}{acked}{behind}",
            m.id, m.vip, m.applied_epoch, m.applied_active
        );
    }
    for m in &f.roster {
        if !f.members.iter().any(|live| live.id == m.id) {
            println!(
                "  member {:<24} vip {:<21} NOT LIVE: cutovers abort until it is back, or `redirect fleet forget {}` if its host is gone",
                m.id, m.vip, m.id
            );
        }
    }
}
