//! The kernel datapath: the embedded eBPF object, its pins, and typed handles on its maps.
//!
//! Everything lives under one bpffs directory (the pin dir):
//! `CONFIG BACKENDS ACTIVE CT REV STATS TX_PORTS` (maps, by name) and `link_<iface>` (one XDP
//! or TCX link per interface, whichever hook runs the datapath there). The maps are BTF-defined, so `bpftool map dump pinned <dir>/CT` shows
//! typed keys and values. Socket mode (`socket.rs`) adds its own maps and links there.

pub mod socket;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, DevMapHash, HashMap, Map, MapData, PerCpuArray, RingBuf},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkType, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use redirect_common::{
    backend::{Backend, MAX_BACKENDS, SOURCE, TARGET},
    config::{Config, FLAG_CONFIGURED, FLAG_SOCKET_MODE},
    ct::{CtEntry, CtKey},
    cutover::{Cutover, HeldSyn},
    limits, map_names,
    rev::{RevEntry, RevKey},
    socket::{FLOWS_ENTRIES, FlowEntry, SOCK_STATS_ALL, SOCKETS_ENTRIES, SockEntry},
    stats::{ALL, STAT_COUNT},
};

/// The datapath object, built by `build.rs` from `redirect-ebpf`.
#[must_use]
pub fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/redirect-datapath"))
}

/// Name of the datapath's XDP program in the object (it also re-injects parked SYNs).
pub const PROGRAM: &str = "redirect_xdp";
/// Name of the datapath's TC (clsact ingress) program in the object: the same NAT core.
pub const TC_PROGRAM: &str = "redirect_tc";
/// Name of the program that re-injects SYNs parked on a TC interface.
pub const TC_REINJECT_PROGRAM: &str = "reinject_tc";
/// Name of the `XDP_PASS` helper program in the object (for veth peers in labs).
pub const PASS_PROGRAM: &str = "xdp_pass";

/// The default pin directory on a real proxy host.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/redirect";

const ALL_MAPS: [&str; 14] = [
    map_names::SOCK_NETNS,
    map_names::SOCKETS,
    map_names::FLOW_GATE,
    map_names::FLOWS,
    map_names::SOCK_STATS,
    map_names::CUTOVER,
    map_names::HELD,
    map_names::CONFIG,
    map_names::BACKENDS,
    map_names::ACTIVE,
    map_names::CT,
    map_names::REV,
    map_names::STATS,
    map_names::TX_PORTS,
];

/// Why the datapath could not be loaded, attached or opened.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// No datapath is pinned at the directory.
    #[error("no redirect datapath is pinned at {} (start one with `redirect run`)", .0.display())]
    NotPinned(PathBuf),
    /// The pinned datapath was created for another VIP.
    #[error("the datapath pinned at {} serves {pinned}, not {requested}; run `redirect detach` first or use another --pin-dir", dir.display())]
    VipMismatch {
        dir: PathBuf,
        pinned: SocketAddrV4,
        requested: SocketAddrV4,
    },
    /// The pinned datapath was created for other backends. `ACTIVE` is kept by role index, so
    /// adopting it with new addresses would silently send new connections to another server.
    #[error(
        "the datapath pinned at {} has {}; ACTIVE is kept by role, so new connections would silently go to the new server while live ones stay on the old one: run `redirect detach` first, use another --pin-dir, or pass --replace-backends",
        dir.display(),
        changes.iter().map(ToString::to_string).collect::<Vec<_>>().join(", and ")
    )]
    BackendMismatch {
        dir: PathBuf,
        changes: Vec<BackendChange>,
    },
    /// The pinned maps were made by a version of redirect with another map layout.
    #[error(
        "the datapath pinned at {} was made by another version of redirect: map {map} has {pinned}, this version needs {wanted}. Its tracked connections cannot be carried over. Let the proxy drain (or accept that live connections through it break), run `redirect detach`, then start this version",
        dir.display()
    )]
    LayoutChanged {
        dir: PathBuf,
        map: &'static str,
        pinned: String,
        wanted: String,
    },
    /// A pinned map could not be opened.
    #[error("opening pinned map {}: {source}", path.display())]
    OpenMap {
        path: PathBuf,
        source: aya::maps::MapError,
    },
    /// The kernel refused the program.
    #[error("loading the datapath: {0}")]
    Load(#[from] aya::EbpfError),
    /// Attaching or upgrading a program failed.
    #[error("{what}: {source}")]
    Program {
        what: String,
        source: aya::programs::ProgramError,
    },
    /// Pinning or unpinning failed.
    #[error("{what}: {source}")]
    Pin {
        what: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A map operation failed.
    #[error("{what}: {source}")]
    Map {
        what: String,
        source: aya::maps::MapError,
    },
    /// A restart would put new interfaces on another hook family than the pinned links.
    #[error(
        "the pinned links are on {pinned}, and {new} would go on {wanted}: one hook serves all the interfaces (a frame redirected between XDP and TC interfaces is dropped). Pass --hook {pinned}, or let the proxy drain, run `redirect detach`, and start again"
    )]
    MixedHooks {
        pinned: &'static str,
        wanted: &'static str,
        new: String,
    },
    /// `bpf_clone_redirect` could not re-inject a held SYN on its interface.
    #[error("re-injecting a held SYN on interface #{ifindex} failed; its client retries")]
    Reinject { ifindex: u32 },
    /// `run --mode socket --cgroup PATH` names no usable cgroup.
    #[error("--cgroup {}: {why}", path.display())]
    Cgroup { path: PathBuf, why: String },
    /// The pinned datapath runs in the other mode.
    #[error(
        "the datapath pinned at {} runs in {pinned} mode, not {requested}: run `redirect detach` first (once its connections have moved), or use another --pin-dir",
        dir.display()
    )]
    ModeMismatch {
        dir: PathBuf,
        pinned: &'static str,
        requested: &'static str,
    },
    /// The filesystem refused an operation under the pin dir.
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// Where a datapath's pins live.
#[derive(Clone, Debug)]
pub struct PinDir(pub PathBuf);

impl PinDir {
    #[must_use]
    pub fn map(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    #[must_use]
    pub fn link(&self, iface: &str) -> PathBuf {
        self.0.join(format!("link_{iface}"))
    }

    /// Interfaces with a pinned link, from the pin file names.
    #[must_use]
    pub fn linked_ifaces(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(&self.0)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("link_")
                    .map(str::to_owned)
            })
            .collect();
        out.sort();
        out
    }

    /// The hook of the link pinned for `iface` (XDP driver and generic both read as XDP).
    #[must_use]
    pub fn link_hook(&self, iface: &str) -> Option<Hook> {
        let link = FdLink::from(PinnedLink::from_pin(self.link(iface)).ok()?);
        match link.info().ok()?.link_type().ok()? {
            LinkType::Tcx => Some(Hook::Tc),
            LinkType::Xdp => Some(Hook::Xdp),
            _ => None,
        }
    }

    #[must_use]
    pub fn is_pinned(&self) -> bool {
        self.map(map_names::CONFIG).exists()
    }
}

/// Which backend: the server we migrate from, or the one we migrate to.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Source,
    Target,
}

impl Role {
    /// The other backend.
    #[must_use]
    pub const fn other(self) -> Self {
        match self {
            Self::Source => Self::Target,
            Self::Target => Self::Source,
        }
    }

    #[must_use]
    pub const fn index(self) -> u32 {
        match self {
            Self::Source => SOURCE,
            Self::Target => TARGET,
        }
    }

    #[must_use]
    pub const fn from_index(i: u32) -> Option<Self> {
        match i {
            SOURCE => Some(Self::Source),
            TARGET => Some(Self::Target),
            _ => None,
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Target => "target",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A backend as the datapath stores it, in host types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendAddr {
    pub addr: SocketAddrV4,
    pub snat: Ipv4Addr,
}

impl BackendAddr {
    #[must_use]
    pub fn to_map(self) -> Backend {
        Backend {
            addr_be: u32::from(*self.addr.ip()).to_be(),
            snat_addr_be: u32::from(self.snat).to_be(),
            port_be: self.addr.port().to_be(),
            _pad0: 0,
        }
    }

    #[must_use]
    pub fn from_map(b: &Backend) -> Option<Self> {
        (b.addr_be != 0).then(|| Self {
            addr: SocketAddrV4::new(ip_from_be(b.addr_be), u16::from_be(b.port_be)),
            snat: ip_from_be(b.snat_addr_be),
        })
    }
}

#[must_use]
pub fn ip_from_be(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(be))
}

/// A backend address a restart asks to change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendChange {
    pub role: Role,
    pub pinned: SocketAddrV4,
    pub requested: SocketAddrV4,
}

impl std::fmt::Display for BackendChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} where --{} is {}",
            self.role, self.pinned, self.role, self.requested
        )
    }
}

/// The backends whose pinned address differs from what `spec` asks for (a role with nothing
/// pinned is not a change). Only the address counts: a new SNAT address moves no connection.
#[must_use]
pub fn backend_changes(
    pinned_source: Option<BackendAddr>,
    pinned_target: Option<BackendAddr>,
    spec: &Spec,
) -> Vec<BackendChange> {
    [
        (Role::Source, pinned_source, spec.source),
        (Role::Target, pinned_target, spec.target),
    ]
    .into_iter()
    .filter_map(|(role, pinned, wanted)| {
        let pinned = pinned?.addr;
        (pinned != wanted.addr).then_some(BackendChange {
            role,
            pinned,
            requested: wanted.addr,
        })
    })
    .collect()
}

/// Typed handles on every pinned map of one datapath.
pub struct Maps {
    pub dir: PinDir,
    pub config: Array<MapData, Config>,
    pub backends: Array<MapData, Backend>,
    pub active: Array<MapData, u32>,
    pub ct: HashMap<MapData, CtKey, CtEntry>,
    pub rev: HashMap<MapData, RevKey, RevEntry>,
    pub stats: PerCpuArray<MapData, u64>,
    pub tx_ports: DevMapHash<MapData>,
    pub cutover: Array<MapData, Cutover>,
    /// Socket mode's maps; `None` for pins made before socket mode existed.
    pub socket: Option<SocketMaps>,
    /// `CT` once more, untyped, for the one operation aya does not offer on hash maps.
    ct_raw: MapData,
}

/// Socket mode's maps (see `redirect-common/src/socket.rs`).
pub struct SocketMaps {
    pub sockets: HashMap<MapData, u64, SockEntry>,
    pub flows: HashMap<MapData, CtKey, FlowEntry>,
    pub gate: Array<MapData, u64>,
    pub stats: PerCpuArray<MapData, u64>,
}

fn open_pinned(dir: &PinDir, name: &str) -> Result<Map, DatapathError> {
    let path = dir.map(name);
    let data = MapData::from_pin(&path).map_err(|source| DatapathError::OpenMap {
        path: path.clone(),
        source,
    })?;
    Map::from_map_data(data).map_err(|source| DatapathError::OpenMap { path, source })
}

macro_rules! typed {
    ($dir:expr, $name:expr) => {{
        let map = open_pinned($dir, $name)?;
        map.try_into().map_err(|source| DatapathError::OpenMap {
            path: $dir.map($name),
            source,
        })?
    }};
}

impl Maps {
    /// Opens the maps of the datapath pinned at `dir`; works whether or not `run` is running.
    pub fn open(dir: &Path) -> Result<Self, DatapathError> {
        let dir = PinDir(dir.to_path_buf());
        if !dir.is_pinned() {
            return Err(DatapathError::NotPinned(dir.0));
        }
        Ok(Self {
            config: typed!(&dir, map_names::CONFIG),
            backends: typed!(&dir, map_names::BACKENDS),
            active: typed!(&dir, map_names::ACTIVE),
            ct: typed!(&dir, map_names::CT),
            rev: typed!(&dir, map_names::REV),
            stats: typed!(&dir, map_names::STATS),
            tx_ports: typed!(&dir, map_names::TX_PORTS),
            cutover: typed!(&dir, map_names::CUTOVER),
            socket: if dir.map(map_names::SOCKETS).exists() {
                Some(SocketMaps {
                    sockets: typed!(&dir, map_names::SOCKETS),
                    flows: typed!(&dir, map_names::FLOWS),
                    gate: typed!(&dir, map_names::FLOW_GATE),
                    stats: typed!(&dir, map_names::SOCK_STATS),
                })
            } else {
                None
            },
            ct_raw: {
                let path = dir.map(map_names::CT);
                MapData::from_pin(&path)
                    .map_err(|source| DatapathError::OpenMap { path, source })?
            },
            dir,
        })
    }

    /// Deletes a `CT` entry and returns the value that was deleted, in one step
    /// (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`, hash maps since Linux 5.14): the garbage collector
    /// then knows exactly what it removed, even if the datapath rewrote the entry (a client
    /// reopening the tuple) between its check and the delete. `None` if there was no entry.
    pub fn take_ct(&self, key: &CtKey) -> Result<Option<CtEntry>, DatapathError> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        #[repr(C)]
        struct Attr {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
        let mut value = CtEntry::default();
        let attr = Attr {
            map_fd: u32::try_from(self.ct_raw.fd().as_fd().as_raw_fd()).expect("an open fd"),
            _pad: 0,
            key: std::ptr::from_ref(key) as u64,
            value: std::ptr::from_mut(&mut value) as u64,
            flags: 0,
        };
        // SAFETY: `attr` points to a live key and a value buffer of the map's sizes (checked
        // by `check_layout` at adoption and by the typed open above).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_AND_DELETE_ELEM,
                &raw const attr,
                std::mem::size_of::<Attr>(),
            )
        };
        if rc == 0 {
            return Ok(Some(value));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOENT) {
            return Ok(None);
        }
        Err(DatapathError::Io {
            what: "deleting from CT".into(),
            source: err,
        })
    }

    /// Whether this datapath runs in socket mode (`run --mode socket`).
    pub fn is_socket_mode(&self) -> Result<bool, DatapathError> {
        Ok(self.config()?.flags & FLAG_SOCKET_MODE != 0)
    }

    pub fn config(&self) -> Result<Config, DatapathError> {
        self.config.get(&0, 0).map_err(|source| DatapathError::Map {
            what: "reading CONFIG".into(),
            source,
        })
    }

    /// The VIP the datapath serves, if it is configured.
    pub fn vip(&self) -> Result<Option<SocketAddrV4>, DatapathError> {
        let c = self.config()?;
        Ok((c.flags & FLAG_CONFIGURED != 0)
            .then(|| SocketAddrV4::new(ip_from_be(c.vip_addr_be), u16::from_be(c.vip_port_be))))
    }

    pub fn backend(&self, role: Role) -> Result<Option<BackendAddr>, DatapathError> {
        let b = self
            .backends
            .get(&role.index(), 0)
            .map_err(|source| DatapathError::Map {
                what: "reading BACKENDS".into(),
                source,
            })?;
        Ok(BackendAddr::from_map(&b))
    }

    /// The raw `ACTIVE` value.
    pub fn active_index(&self) -> Result<u32, DatapathError> {
        self.active.get(&0, 0).map_err(|source| DatapathError::Map {
            what: "reading ACTIVE".into(),
            source,
        })
    }

    /// Where new connections go now.
    pub fn active(&self) -> Result<Option<Role>, DatapathError> {
        Ok(Role::from_index(self.active_index()?))
    }

    /// The flip: one aligned 32-bit write. New SYNs read it; tracked connections never do.
    pub fn set_active(&mut self, role: Role) -> Result<(), DatapathError> {
        if self.backend(role)?.is_none() {
            return Err(DatapathError::Map {
                what: format!("flipping to {role}"),
                source: aya::maps::MapError::KeyNotFound,
            });
        }
        self.active
            .set(0, role.index(), 0)
            .map_err(|source| DatapathError::Map {
                what: "writing ACTIVE".into(),
                source,
            })
    }

    pub fn cutover(&self) -> Result<Cutover, DatapathError> {
        self.cutover
            .get(&0, 0)
            .map_err(|source| DatapathError::Map {
                what: "reading CUTOVER".into(),
                source,
            })
    }

    pub fn set_cutover(&mut self, c: Cutover) -> Result<(), DatapathError> {
        self.cutover
            .set(0, c, 0)
            .map_err(|source| DatapathError::Map {
                what: "writing CUTOVER".into(),
                source,
            })
    }

    /// Opens the ring of parked SYNs (one reader at a time: the controller).
    pub fn held(&self) -> Result<RingBuf<MapData>, DatapathError> {
        let map = open_pinned(&self.dir, map_names::HELD)?;
        map.try_into().map_err(|source| DatapathError::OpenMap {
            path: self.dir.map(map_names::HELD),
            source,
        })
    }

    /// Every counter summed over CPUs, in `Stat` order with its name.
    pub fn stats(&self) -> Result<Vec<(&'static str, u64)>, DatapathError> {
        let mut out = Vec::with_capacity(STAT_COUNT as usize);
        for (stat, name) in ALL {
            let per_cpu =
                self.stats
                    .get(&(stat as u32), 0)
                    .map_err(|source| DatapathError::Map {
                        what: "reading STATS".into(),
                        source,
                    })?;
            out.push((name, per_cpu.iter().sum()));
        }
        if let Some(socket) = &self.socket
            && self.is_socket_mode()?
        {
            for (stat, name) in SOCK_STATS_ALL {
                let per_cpu =
                    socket
                        .stats
                        .get(&(stat as u32), 0)
                        .map_err(|source| DatapathError::Map {
                            what: "reading SOCK_STATS".into(),
                            source,
                        })?;
                out.push((name, per_cpu.iter().sum()));
            }
        }
        Ok(out)
    }
}

/// Which kernel hook runs the datapath on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Hook {
    /// One hook for all the interfaces: native XDP when they are all NICs, whose frames come
    /// off a wire; TC if any is virtual (veth, bridges: containers on this host send
    /// GRO-merged frames and partial checksums). A restart keeps the pinned links' hook.
    Auto,
    /// Native XDP, run by the driver: the fastest. Only for frames from a wire: on a veth whose
    /// sender has TX checksum offload on, translated segments leave with bad checksums.
    #[value(alias = "driver")]
    Xdp,
    /// Generic XDP, run by the stack. Kept for comparison: it cannot see a buffer's checksum
    /// state, so GRO-merged frames and partial checksums leave corrupted. Use `tc` instead.
    #[value(alias = "skb")]
    XdpGeneric,
    /// TC (a clsact ingress TCX link, kernel 6.6+): socket buffers, whose GRO-merged payloads
    /// and partial checksums the kernel's checksum helpers handle correctly.
    Tc,
}

impl Hook {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Xdp => "xdp",
            Self::XdpGeneric => "xdp-generic",
            Self::Tc => "tc",
        }
    }
}

/// Whether `iface` is virtual (veth, bridge, bond, vlan...): no device behind it in sysfs.
/// Unknown (no sysfs for this namespace) counts as a NIC.
fn is_virtual(iface: &str) -> bool {
    let class = Path::new("/sys/class/net").join(iface);
    class.exists() && !class.join("device").exists()
}

/// What `redirect run` asks of the datapath.
#[derive(Clone, Debug)]
pub struct Spec {
    pub vip: SocketAddrV4,
    pub source: BackendAddr,
    pub target: BackendAddr,
    pub snat_ports: (u16, u16),
    pub drop_nonsyn_miss: bool,
    /// Ask the FIB for every packet (`run --fib-every-packet`).
    pub fib_every_packet: bool,
    /// Adopt pins whose backends differ from `source`/`target` (`run --replace-backends`).
    pub replace_backends: bool,
    /// Proxy (NAT on the interfaces) or socket (at `connect()`, on this host's own clients).
    pub mode: Mode,
}

/// How the datapath reaches connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A proxy host: full NAT on the interfaces, for clients elsewhere.
    Proxy,
    /// Zero-hop: inside `connect()` of every process in this cgroup (v2) directory.
    Socket { cgroup: PathBuf },
}

impl Mode {
    #[must_use]
    pub const fn name(&self) -> &'static str {
        match self {
            Self::Proxy => "proxy",
            Self::Socket { .. } => "socket",
        }
    }

    #[must_use]
    pub const fn is_socket(&self) -> bool {
        matches!(self, Self::Socket { .. })
    }
}

/// Checks a restart against the datapath pinned at `dir`, reading only: the VIP must be the
/// same, and so must the backend addresses unless `spec.replace_backends`. Returns the
/// backends that will be replaced (empty when nothing is pinned). Call it before changing
/// anything, so a refusal leaves nothing half-done.
pub fn check_adoption(dir: &Path, spec: &Spec) -> Result<Vec<BackendChange>, DatapathError> {
    if !PinDir(dir.to_path_buf()).is_pinned() {
        return Ok(Vec::new());
    }
    let maps = Maps::open(dir)?;
    let pinned_socket = maps.config()?.flags & FLAG_SOCKET_MODE != 0;
    if pinned_socket != spec.mode.is_socket() {
        return Err(DatapathError::ModeMismatch {
            dir: dir.into(),
            pinned: if pinned_socket { "socket" } else { "proxy" },
            requested: spec.mode.name(),
        });
    }
    check_layout(&PinDir(dir.to_path_buf()), spec.mode.is_socket())?;
    if let Some(pinned) = maps.vip()?
        && pinned != spec.vip
    {
        return Err(DatapathError::VipMismatch {
            dir: dir.into(),
            pinned,
            requested: spec.vip,
        });
    }
    let changes = backend_changes(
        maps.backend(Role::Source)?,
        maps.backend(Role::Target)?,
        spec,
    );
    if !changes.is_empty() && !spec.replace_backends {
        return Err(DatapathError::BackendMismatch {
            dir: dir.into(),
            changes,
        });
    }
    Ok(changes)
}

/// Key size, value size and entries of every map whose layout `redirect-common` defines.
/// Each mode's unused tables are one entry long (see [`table_sizes`]).
fn expected_layouts(socket: bool) -> [(&'static str, u32, u32, u32); 7] {
    use std::mem::size_of;
    let size = |n: usize| u32::try_from(n).expect("small");
    let entries = |name: &str| {
        table_sizes(socket)
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(1, |(_, e)| *e)
    };
    [
        (map_names::CONFIG, 4, size(size_of::<Config>()), 1),
        (
            map_names::BACKENDS,
            4,
            size(size_of::<Backend>()),
            MAX_BACKENDS,
        ),
        (map_names::ACTIVE, 4, 4, 1),
        (
            map_names::CT,
            size(size_of::<CtKey>()),
            size(size_of::<CtEntry>()),
            entries(map_names::CT),
        ),
        (
            map_names::REV,
            size(size_of::<RevKey>()),
            size(size_of::<RevEntry>()),
            entries(map_names::REV),
        ),
        (map_names::STATS, 4, 8, STAT_COUNT),
        (map_names::CUTOVER, 4, size(size_of::<Cutover>()), 1),
    ]
}

/// Key size, value size and entries of socket mode's maps (present in both modes' pins).
fn socket_layouts(socket: bool) -> [(&'static str, u32, u32, u32); 5] {
    use std::mem::size_of;
    let size = |n: usize| u32::try_from(n).expect("small");
    let entries = |name: &str| {
        table_sizes(socket)
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(1, |(_, e)| *e)
    };
    [
        (
            map_names::SOCKETS,
            8,
            size(size_of::<SockEntry>()),
            entries(map_names::SOCKETS),
        ),
        (
            map_names::FLOWS,
            size(size_of::<CtKey>()),
            size(size_of::<FlowEntry>()),
            entries(map_names::FLOWS),
        ),
        (map_names::FLOW_GATE, 4, 8, 1),
        (map_names::SOCK_NETNS, 4, 8, 1),
        (
            map_names::SOCK_STATS,
            4,
            8,
            redirect_common::socket::SOCK_STAT_COUNT,
        ),
    ]
}

/// The sizes of the big tables in each mode: the other mode's are one entry long, so an
/// application host does not preallocate a proxy's million-connection table (about 100 MB
/// each for `CT` and `REV`), nor a proxy the socket table.
#[must_use]
pub fn table_sizes(socket: bool) -> [(&'static str, u32); 4] {
    let (proxy, sock) = if socket { (1, u32::MAX) } else { (u32::MAX, 1) };
    [
        (map_names::CT, limits::CT_ENTRIES.min(proxy)),
        (map_names::REV, limits::REV_ENTRIES.min(proxy)),
        (map_names::SOCKETS, SOCKETS_ENTRIES.min(sock)),
        (map_names::FLOWS, FLOWS_ENTRIES.min(sock)),
    ]
}

/// Refuses pins whose maps another version laid out differently: the kernel would re-use
/// them as they are, and the new program would misread every entry (or never count a new
/// statistic).
fn check_layout(dir: &PinDir, socket: bool) -> Result<(), DatapathError> {
    let socket_maps = socket_layouts(socket)
        .into_iter()
        // Pins from before socket mode have none of its maps: the load creates them.
        .filter(|(map, ..)| dir.map(map).exists());
    for (map, key, value, entries) in expected_layouts(socket).into_iter().chain(socket_maps) {
        let path = dir.map(map);
        let data = MapData::from_pin(&path).map_err(|source| DatapathError::OpenMap {
            path: path.clone(),
            source,
        })?;
        let info = data
            .info()
            .map_err(|source| DatapathError::OpenMap { path, source })?;
        let pinned = (info.key_size(), info.value_size(), info.max_entries());
        if pinned != (key, value, entries) {
            let show =
                |(k, v, n): (u32, u32, u32)| format!("{k}-byte keys, {v}-byte values, {n} entries");
            return Err(DatapathError::LayoutChanged {
                dir: dir.0.clone(),
                map,
                pinned: show(pinned),
                wanted: show((key, value, entries)),
            });
        }
    }
    Ok(())
}

/// What [`install`] did.
pub struct InstallReport {
    /// The loaded object; its XDP program re-injects parked SYNs.
    pub ebpf: Ebpf,
    /// The maps already existed and were re-used (a restart).
    pub adopted_maps: bool,
    /// Interfaces whose pinned link now runs the freshly loaded program, and its hook.
    pub upgraded: Vec<(String, Hook)>,
    /// Interfaces newly attached, and the hook chosen for each.
    pub attached: Vec<(String, Hook)>,
}

/// Loads the datapath with its maps pinned under `dir` (re-using pins that exist), writes the
/// configuration, and makes sure every interface in `ifaces` has a pinned link running this
/// program, on the hook `hook` asks for (see [`Hook::Auto`]). A restart re-uses the maps,
/// keeps `ACTIVE` and every tracked connection, and swaps the program of existing links
/// atomically (`bpf_link_update`), so no packet is missed; an existing link keeps its hook.
pub fn install(
    dir: &Path,
    ifaces: &[(String, u32)],
    hook: Hook,
    spec: &Spec,
) -> Result<InstallReport, DatapathError> {
    install_with_active(dir, ifaces, hook, spec, None)
}

/// What a fleet member applies before any program is attached or swapped (docs/fleet.md,
/// the joining-host invariant), whatever the pins or the defaults say.
#[derive(Clone, Copy, Debug)]
pub struct Joining {
    /// The fleet's committed backend.
    pub active: Role,
    /// The fleet is in a cutover's `Hold`: new SYNs are held (closed: dropped if this member
    /// does not go on to confirm the hold) from the first packet, not from when the member
    /// catches up with the other members.
    pub in_hold: bool,
}

/// [`install`], with `ACTIVE` (and, during a fleet cutover, a closed hold) set as `joining`
/// says before any program is attached or swapped.
pub fn install_with_active(
    dir: &Path,
    ifaces: &[(String, u32)],
    hook: Hook,
    spec: &Spec,
    joining: Option<Joining>,
) -> Result<InstallReport, DatapathError> {
    let pins = PinDir(dir.to_path_buf());
    let io = |what: String| move |source| DatapathError::Io { what, source };
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    let adopted_maps = pins.is_pinned();
    if adopted_maps {
        // Refuse before loading anything: nothing is half-done on a mismatch. (`run` checks
        // this earlier too, before it touches sysctls.)
        check_adoption(dir, spec)?;
    }
    let hook = if spec.mode.is_socket() {
        Hook::Tc
    } else {
        one_hook(&pins, ifaces, hook)?
    };
    let mut loader = EbpfLoader::new();
    let paths: Vec<(&str, PathBuf)> = ALL_MAPS.iter().map(|n| (*n, pins.map(n))).collect();
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    for (name, entries) in table_sizes(spec.mode.is_socket()) {
        loader.map_max_entries(name, entries);
    }
    let mut ebpf: Ebpf = loader.load(object())?;

    let mut maps = Maps::open(dir)?;
    configure(&mut maps, spec, adopted_maps)?;
    if let Some(joining) = joining {
        maps.set_active(joining.active)?;
        if joining.in_hold {
            let existing = maps.cutover()?;
            maps.set_cutover(
                existing.prearmed(joining.active.index(), crate::clock::monotonic_ns()),
            )?;
        }
    }
    if let Mode::Socket { cgroup } = &spec.mode {
        socket::own_netns(&pins)?;
        let at = socket::Attachment {
            cgroup: cgroup.clone(),
            uplinks: ifaces.to_vec(),
        };
        let attached = socket::load_programs(&mut ebpf)
            .and_then(|()| socket::attach_all(&mut ebpf, &pins, &at))
            .inspect_err(|_| {
                // A first start that fails half-way leaves nothing behind: no hook stays
                // attached, and no pin makes the next start an adoption.
                if !adopted_maps {
                    let _ = remove(dir);
                }
            })?;
        return Ok(InstallReport {
            ebpf,
            adopted_maps,
            upgraded: Vec::new(),
            attached: attached.into_iter().map(|a| (a, Hook::Tc)).collect(),
        });
    }

    program(&mut ebpf)
        .load()
        .map_err(|source| DatapathError::Program {
            what: "loading the XDP program (verifier)".into(),
            source,
        })?;
    // Only what the hooks need: a TC verifier failure must not block an XDP restart. (The
    // choice was checked before anything changed: see `install`'s start.)
    let any_tcx_pin = pins
        .linked_ifaces()
        .iter()
        .any(|i| pins.link_hook(i) == Some(Hook::Tc));
    if hook == Hook::Tc || any_tcx_pin {
        for name in [TC_PROGRAM, TC_REINJECT_PROGRAM] {
            classifier(&mut ebpf, name)
                .load()
                .map_err(|source| DatapathError::Program {
                    what: format!("loading the TC program {name} (verifier)"),
                    source,
                })?;
        }
    }

    let mut upgraded = Vec::new();
    let mut attached = Vec::new();
    for (iface, index) in ifaces {
        let link_path = pins.link(iface);
        if link_path.exists() {
            let used = upgrade(&mut ebpf, iface, &link_path)?;
            upgraded.push((iface.clone(), used));
        } else {
            let (used, link) = attach(&mut ebpf, iface, hook)?;
            link.pin(&link_path).map_err(|e| DatapathError::Pin {
                what: format!("pinning {}", link_path.display()),
                source: Box::new(e),
            })?;
            attached.push((iface.clone(), used));
        }
        maps.tx_ports
            .insert(*index, *index, None, 0)
            .map_err(|e| DatapathError::Pin {
                what: format!("adding {iface} to TX_PORTS"),
                source: Box::new(e),
            })?;
    }
    Ok(InstallReport {
        ebpf,
        adopted_maps,
        upgraded,
        attached,
    })
}

/// Swaps the freshly loaded program into the link pinned at `path`, on whichever hook that
/// link is. Returns the hook.
fn upgrade(ebpf: &mut Ebpf, iface: &str, path: &Path) -> Result<Hook, DatapathError> {
    let pin_err = |what: String| {
        move |e: aya::programs::links::LinkError| DatapathError::Pin {
            what,
            source: Box::new(e),
        }
    };
    let pinned = PinnedLink::from_pin(path).map_err(|e| DatapathError::Pin {
        what: format!("opening {}", path.display()),
        source: Box::new(e),
    })?;
    let link = FdLink::from(pinned);
    let kind = link
        .info()
        .and_then(|info| info.link_type())
        .map_err(pin_err(format!("reading {}", path.display())))?;
    let upgrade_err = |source| DatapathError::Program {
        what: format!("upgrading the program on {iface}"),
        source,
    };
    if kind == LinkType::Tcx {
        let link = SchedClassifierLink::try_from(link)
            .map_err(pin_err(format!("{} is not a TCX link", path.display())))?;
        classifier(ebpf, TC_PROGRAM)
            .attach_to_link(link)
            .map_err(upgrade_err)?;
        return Ok(Hook::Tc);
    }
    let link = XdpLink::try_from(link)
        .map_err(pin_err(format!("{} is not an XDP link", path.display())))?;
    program(ebpf).attach_to_link(link).map_err(upgrade_err)?;
    // Driver or generic: the link does not say, and both are XDP to an upgrade.
    Ok(Hook::Xdp)
}

/// One hook for the whole interface set: a frame redirected from an XDP interface to a TC
/// one needs `ndo_xdp_xmit` there, which bridges never have (and veths only with a NAPI peer).
/// `auto` picks TC if any interface is virtual (see [`Hook::Auto`]), else native XDP. Links
/// already pinned (a restart) keep their hook, with a warning if another was asked for; but a
/// new interface on a different hook family from the pinned links is refused, before anything
/// changes: it would mix the families.
pub fn one_hook(
    pins: &PinDir,
    ifaces: &[(String, u32)],
    requested: Hook,
) -> Result<Hook, DatapathError> {
    let any_virtual = ifaces.iter().any(|(iface, _)| is_virtual(iface));
    let chosen = match requested {
        Hook::Auto if any_virtual => Hook::Tc,
        Hook::Auto => Hook::Xdp,
        explicit => explicit,
    };
    let pinned: Vec<(String, Hook)> = pins
        .linked_ifaces()
        .into_iter()
        .filter_map(|i| pins.link_hook(&i).map(|h| (i, h)))
        .collect();
    let Some((_, first)) = pinned.first() else {
        return Ok(chosen);
    };
    let is_tc = |h: Hook| h == Hook::Tc;
    if pinned.iter().any(|(_, h)| is_tc(*h) != is_tc(*first)) {
        // Left by a version that allowed it; upgrading each link on its own hook still works.
        tracing::warn!(
            "the pinned links are on both XDP and TC; run `redirect detach` when the proxy is drained, and start again"
        );
    }
    if is_tc(*first) != is_tc(chosen) {
        let new: Vec<&str> = ifaces
            .iter()
            .map(|(i, _)| i.as_str())
            .filter(|i| !pinned.iter().any(|(p, _)| p == i))
            .collect();
        if !new.is_empty() {
            return Err(DatapathError::MixedHooks {
                pinned: first.name(),
                wanted: chosen.name(),
                new: new.join(", "),
            });
        }
        tracing::warn!(
            pinned = first.name(),
            wanted = chosen.name(),
            "the pinned links keep their hook; to change hooks, let the proxy drain, run `redirect detach`, and start again"
        );
    }
    if *first == Hook::Xdp && requested == Hook::XdpGeneric {
        // The link does not say which XDP mode; new interfaces get the one asked for.
        return Ok(Hook::XdpGeneric);
    }
    Ok(*first)
}

/// Attaches the datapath to `iface` on `hook` and returns the hook used and the link (to pin).
/// A driver without native XDP makes this fail with a pointer to `--hook tc`.
fn attach(ebpf: &mut Ebpf, iface: &str, hook: Hook) -> Result<(Hook, FdLink), DatapathError> {
    match hook {
        Hook::Tc => Ok((hook, attach_tc(ebpf, iface)?)),
        Hook::Xdp | Hook::XdpGeneric | Hook::Auto => {
            let hook = if hook == Hook::Auto { Hook::Xdp } else { hook };
            Ok((hook, attach_xdp(ebpf, iface, hook)?))
        }
    }
}

fn attach_xdp(ebpf: &mut Ebpf, iface: &str, hook: Hook) -> Result<FdLink, DatapathError> {
    let mode = if hook == Hook::XdpGeneric {
        XdpMode::Skb
    } else {
        XdpMode::Driver
    };
    let prog = program(ebpf);
    let id = prog
        .attach(iface, mode)
        .map_err(|source| DatapathError::Program {
            what: format!(
                "attaching XDP ({}) to {iface} (without native XDP in its driver, use --hook tc)",
                hook.name()
            ),
            source,
        })?;
    let link = prog
        .take_link(id)
        .map_err(|source| DatapathError::Program {
            what: format!("taking the link on {iface}"),
            source,
        })?;
    link.try_into()
        .map_err(|e: aya::programs::links::LinkError| DatapathError::Pin {
            what: format!("{iface}: XDP link is not a bpf_link (kernel too old?)"),
            source: Box::new(e),
        })
}

fn attach_tc(ebpf: &mut Ebpf, iface: &str) -> Result<FdLink, DatapathError> {
    let prog = classifier(ebpf, TC_PROGRAM);
    let id = prog
        .attach_with_options(
            iface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|source| DatapathError::Program {
            what: format!(
                "attaching TC (a TCX ingress link, kernel 6.6+) to {iface}; on an older kernel use --hook xdp, with TX checksum offload off on local senders"
            ),
            source,
        })?;
    let link = prog
        .take_link(id)
        .map_err(|source| DatapathError::Program {
            what: format!("taking the link on {iface}"),
            source,
        })?;
    link.try_into()
        .map_err(|e: aya::programs::links::LinkError| DatapathError::Pin {
            what: format!("{iface}: TC link is not a bpf_link"),
            source: Box::new(e),
        })
}

/// Replays a parked SYN through the datapath as if it had just arrived on its interface:
/// - parked by XDP: the XDP program runs on it (`BPF_PROG_TEST_RUN` with
///   `BPF_F_TEST_XDP_LIVE_FRAMES`), translates it to the now-active backend and transmits it;
/// - parked by TC: `reinject_tc` has a copy received on the interface again
///   (`bpf_clone_redirect` to its ingress), where the TC hook translates it. Its TCP checksum
///   is completed first: a local sender with TX offload left only the pseudo-header sum, which
///   its `CHECKSUM_PARTIAL` buffer would have completed on the way out, and the copy is a
///   fresh buffer with no such state.
/// - parked by socket mode's egress hook (`on_egress`): the same, but the copy is sent out of
///   the interface, whose egress hook sends it to the backend.
pub fn reinject(
    ebpf: &mut Ebpf,
    pins: &PinDir,
    held: &HeldSyn,
    on_egress: bool,
) -> Result<(), DatapathError> {
    use aya::programs::{TestRun as _, TestRunAttrs, TestRunOptions};
    let len = (held.len as usize).min(held.frame.len());
    let parked_by_tc = on_egress
        || crate::net::ifname(held.ifindex).and_then(|iface| pins.link_hook(&iface))
            == Some(Hook::Tc);
    let err = |source| DatapathError::Program {
        what: "re-injecting a held SYN".into(),
        source,
    };
    if parked_by_tc {
        let mut frame = held.frame;
        complete_tcp_checksum(&mut frame[..len]);
        // struct __sk_buff up to cb[1]: ifindex at 40, cb[0] at 48, cb[1] (egress) at 52 (the
        // rest stays zero).
        let mut ctx = [0u8; 56];
        ctx[40..44].copy_from_slice(&held.ifindex.to_ne_bytes());
        ctx[48..52].copy_from_slice(&held.ifindex.to_ne_bytes());
        ctx[52..56].copy_from_slice(&u32::from(on_egress).to_ne_bytes());
        let opts = TestRunOptions {
            data_in: Some(&frame[..len]),
            ctx_in: Some(&ctx),
            repeat: 1,
            ..TestRunOptions::default()
        };
        let result = classifier(ebpf, TC_REINJECT_PROGRAM)
            .test_run(opts)
            .map_err(err)?;
        // TC_ACT_OK (0): the copy is on its way; anything else: it could not be made.
        return if result.return_value == 0 {
            Ok(())
        } else {
            Err(DatapathError::Reinject {
                ifindex: held.ifindex,
            })
        };
    }
    // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&u32::try_from(len).expect("small frame").to_ne_bytes());
    ctx[12..16].copy_from_slice(&held.ifindex.to_ne_bytes());
    let opts = TestRunOptions {
        data_in: Some(&held.frame[..len]),
        ctx_in: Some(&ctx),
        repeat: 1,
        attrs: TestRunAttrs::new().xdp_live_frames(1),
        ..TestRunOptions::default()
    };
    program(ebpf).test_run(opts).map(|_| ()).map_err(err)
}

/// Recomputes the TCP checksum of an Ethernet/IPv4 (no options)/TCP frame in place; leaves
/// anything else alone.
fn complete_tcp_checksum(frame: &mut [u8]) {
    const ETH: usize = 14;
    const IP: usize = 20;
    if frame.len() < ETH + IP + 20 || frame[12..14] != [0x08, 0x00] || frame[ETH] != 0x45 {
        return;
    }
    let tot_len = usize::from(u16::from_be_bytes([frame[ETH + 2], frame[ETH + 3]]));
    if frame[ETH + 9] != 6 || tot_len < IP + 20 || ETH + tot_len > frame.len() {
        return;
    }
    let (src, dst): ([u8; 4], [u8; 4]) = (
        frame[ETH + 12..ETH + 16].try_into().expect("4 bytes"),
        frame[ETH + 16..ETH + 20].try_into().expect("4 bytes"),
    );
    let segment = &mut frame[ETH + IP..ETH + tot_len];
    segment[16..18].fill(0);
    let check = redirect_common::csum::tcp_ipv4(src, dst, segment);
    segment[16..18].copy_from_slice(&check.to_ne_bytes());
}

/// The datapath's XDP program in a loaded object.
pub fn program(ebpf: &mut Ebpf) -> &mut Xdp {
    ebpf.program_mut(PROGRAM)
        .expect("the object has the datapath program")
        .try_into()
        .expect("the datapath program is XDP")
}

/// A TC program of a loaded object, by name.
fn classifier<'a>(ebpf: &'a mut Ebpf, name: &str) -> &'a mut SchedClassifier {
    ebpf.program_mut(name)
        .expect("the object has its TC programs")
        .try_into()
        .expect("a TC program is a classifier")
}

/// Writes `CONFIG` and `BACKENDS`. `ACTIVE` starts at the source, and a restart keeps it.
fn configure(maps: &mut Maps, spec: &Spec, adopted: bool) -> Result<(), DatapathError> {
    let map_err = |what: &str| {
        let what = what.to_owned();
        move |source| DatapathError::Map { what, source }
    };
    maps.backends
        .set(SOURCE, spec.source.to_map(), 0)
        .map_err(map_err("writing BACKENDS"))?;
    maps.backends
        .set(TARGET, spec.target.to_map(), 0)
        .map_err(map_err("writing BACKENDS"))?;
    let active = maps.active_index()?;
    if !adopted || active >= MAX_BACKENDS {
        maps.active
            .set(0, SOURCE, 0)
            .map_err(map_err("writing ACTIVE"))?;
        maps.cutover
            .set(0, Cutover::IDLE, 0)
            .map_err(map_err("writing CUTOVER"))?;
    }
    let mut flags = FLAG_CONFIGURED;
    if spec.drop_nonsyn_miss {
        flags |= redirect_common::config::FLAG_DROP_NONSYN_MISS;
    }
    if spec.fib_every_packet {
        flags |= redirect_common::config::FLAG_FIB_EVERY_PACKET;
    }
    if spec.mode.is_socket() {
        flags |= FLAG_SOCKET_MODE;
    }
    let config = Config {
        vip_addr_be: u32::from(*spec.vip.ip()).to_be(),
        vip_port_be: spec.vip.port().to_be(),
        _pad0: 0,
        snat_port_min: spec.snat_ports.0,
        snat_port_max: spec.snat_ports.1,
        flags,
    };
    // Written last: the datapath passes everything until CONFIGURED is set.
    maps.config
        .set(0, config, 0)
        .map_err(map_err("writing CONFIG"))
}

/// Removes every link and map pin under `dir`, which detaches the program.
pub fn remove(dir: &Path) -> Result<Vec<String>, DatapathError> {
    let pins = PinDir(dir.to_path_buf());
    let mut ifaces = socket::detach_all(&pins)?;
    let proxy_links = pins.linked_ifaces();
    for iface in &proxy_links {
        let path = pins.link(iface);
        let link = PinnedLink::from_pin(&path).map_err(|e| DatapathError::Pin {
            what: format!("opening {}", path.display()),
            source: Box::new(e),
        })?;
        // Dropping the last reference (pin and fd) detaches the program from the interface.
        drop(link.unpin().map_err(|source| DatapathError::Io {
            what: format!("unpinning {}", path.display()),
            source,
        })?);
    }
    for name in ALL_MAPS {
        let path = pins.map(name);
        if path.exists() {
            std::fs::remove_file(&path).map_err(|source| DatapathError::Io {
                what: format!("removing {}", path.display()),
                source,
            })?;
        }
    }
    // Only remove the directory if nothing else lives there.
    let _ = std::fs::remove_dir(dir);
    ifaces.extend(proxy_links);
    Ok(ifaces)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SYN frame (Ethernet, IPv4, 24-byte TCP header with an MSS option) whose TCP checksum
    /// field holds `check`.
    fn syn_frame(check: [u8; 2]) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 24];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[16..18].copy_from_slice(&44u16.to_be_bytes());
        f[23] = 6;
        f[26..30].copy_from_slice(&[198, 18, 1, 2]);
        f[30..34].copy_from_slice(&[198, 18, 1, 1]);
        f[34..36].copy_from_slice(&40000u16.to_be_bytes());
        f[36..38].copy_from_slice(&5432u16.to_be_bytes());
        f[38..42].copy_from_slice(&7u32.to_be_bytes());
        f[46] = 6 << 4;
        f[47] = 0x02;
        f[48..50].copy_from_slice(&64240u16.to_be_bytes());
        f[50..52].copy_from_slice(&check);
        f[54..58].copy_from_slice(&[2, 4, 0x05, 0xb4]);
        f
    }

    #[test]
    fn a_partial_checksum_of_a_held_syn_is_completed() {
        // What a sender with TX offload leaves: the pseudo-header sum only.
        let mut frame = syn_frame([0x12, 0x34]);
        complete_tcp_checksum(&mut frame);
        let (src, dst) = ([198, 18, 1, 2], [198, 18, 1, 1]);
        let mut zeroed = frame[34..].to_vec();
        zeroed[16..18].fill(0);
        let want = redirect_common::csum::tcp_ipv4(src, dst, &zeroed);
        assert_eq!(frame[50..52], want.to_ne_bytes());
        // A full checksum verifies: the sum over the segment with it is all ones.
        let sum = redirect_common::csum::sum_words(&frame[34..], 0);
        let pseudo = [198, 18, 1, 2, 198, 18, 1, 1, 0, 6, 0, 24];
        assert_eq!(
            redirect_common::csum::fold(redirect_common::csum::sum_words(&pseudo, sum)),
            0xffff
        );
    }

    #[test]
    fn anything_but_a_well_formed_tcp_frame_is_left_alone() {
        for corrupt in [
            |f: &mut Vec<u8>| f[12] = 0x86, // not IPv4
            |f: &mut Vec<u8>| f[14] = 0x46, // IP options
            |f: &mut Vec<u8>| f[23] = 17,   // UDP
            |f: &mut Vec<u8>| f[16..18].copy_from_slice(&400u16.to_be_bytes()), // too long
            |f: &mut Vec<u8>| f.truncate(40), // truncated
        ] {
            let mut frame = syn_frame([0x12, 0x34]);
            corrupt(&mut frame);
            let before = frame.clone();
            complete_tcp_checksum(&mut frame);
            assert_eq!(frame, before);
        }
    }

    fn backend(addr: &str, snat: &str) -> BackendAddr {
        BackendAddr {
            addr: addr.parse().unwrap(),
            snat: snat.parse().unwrap(),
        }
    }

    fn spec(source: &str, target: &str, replace_backends: bool) -> Spec {
        Spec {
            vip: "10.0.0.10:5432".parse().unwrap(),
            source: backend(source, "10.0.0.1"),
            target: backend(target, "10.0.0.1"),
            snat_ports: (40000, 59999),
            drop_nonsyn_miss: false,
            fib_every_packet: false,
            replace_backends,
            mode: Mode::Proxy,
        }
    }

    #[test]
    fn a_restart_with_other_backends_is_a_change() {
        let src = backend("10.0.1.5:5432", "10.0.0.1");
        let tgt = backend("10.0.2.7:5432", "10.0.0.1");
        let same = spec("10.0.1.5:5432", "10.0.2.7:5432", false);
        assert_eq!(backend_changes(Some(src), Some(tgt), &same), vec![]);
        assert_eq!(
            backend_changes(None, None, &same),
            vec![],
            "nothing pinned yet"
        );
        let other_snat = backend("10.0.2.7:5432", "10.0.0.2");
        assert_eq!(
            backend_changes(Some(src), Some(other_snat), &same),
            vec![],
            "a new SNAT address moves no connection"
        );

        let new_target = spec("10.0.1.5:5432", "10.0.3.9:5432", false);
        let changes = backend_changes(Some(src), Some(tgt), &new_target);
        assert_eq!(
            changes,
            vec![BackendChange {
                role: Role::Target,
                pinned: "10.0.2.7:5432".parse().unwrap(),
                requested: "10.0.3.9:5432".parse().unwrap(),
            }]
        );
        let other_port = spec("10.0.1.5:5433", "10.0.2.7:5432", false);
        assert_eq!(backend_changes(Some(src), Some(tgt), &other_port).len(), 1);

        let swapped = spec("10.0.2.7:5432", "10.0.1.5:5432", false);
        let changes = backend_changes(Some(src), Some(tgt), &swapped);
        assert_eq!(changes.len(), 2);
        let e = DatapathError::BackendMismatch {
            dir: "/sys/fs/bpf/redirect".into(),
            changes,
        }
        .to_string();
        assert!(
            e.starts_with("the datapath pinned at /sys/fs/bpf/redirect has source 10.0.1.5:5432 where --source is 10.0.2.7:5432, and target 10.0.2.7:5432 where --target is 10.0.1.5:5432;")
                && e.contains("--replace-backends"),
            "{e}"
        );
    }
}
