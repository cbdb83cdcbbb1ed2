//! The lab: four network namespaces (client, proxy, source, target) joined by veth pairs, with
//! addresses in 198.18.0.0/15, two real `PostgreSQL` servers, and the `redirect` binary running
//! on the proxy. Every name is unique per lab, and dropping a [`Lab`] stops what it started (by
//! pid), deletes its namespaces and removes its pins, even when a test panics.
//!
//! ```text
//!  ns cli               ns proxy (XDP on p-cli, p-src, p-tgt)           ns src / ns tgt
//!  eth0 198.18.1.2 ─── p-cli 198.18.1.1 (VIP :5432)
//!                      p-src 198.18.2.1 ────────────────────────────── eth0 198.18.2.2 source
//!                      p-tgt 198.18.3.1 ────────────────────────────── eth0 198.18.3.2 target
//! ```
//!
//! [`Lab::new_one_nic`] builds the other common shape, a cloud VM with one NIC: the four hosts on
//! one L2 segment (a bridge in a fifth namespace), the proxy with a single `eth0` holding
//! 198.18.{1,2,3}.1, so every translated packet leaves by `XDP_TX`.
//!
//! [`Lab::new_host_bridge`] is containers on the proxy host: the bridge `br0` is the proxy's own
//! interface (holding 198.18.{1,2,3}.1), and client and servers are containers on its ports,
//! sending with TX offload on (GSO buffers with partial checksums), as Docker's do.
//!
//! [`Lab::new_sharing_servers`] is one more proxy host in front of *another* lab's servers, as
//! in a fleet (issue 10): its own client and proxy namespaces, and links of its own into the
//! servers lab's source and target namespaces. Every proxy reaches the servers at the same
//! addresses (198.18.2.2, 198.18.3.2), as hosts in front of one database do, by a host route
//! over its own link; the servers see each proxy's own SNAT address.
//!
//! ```text
//!  ns cli (k)           ns proxy (k)                                    servers lab's ns src / ns tgt
//!  eth0 198.18.1.2 ─── p-cli 198.18.1.1 (VIP :5432)
//!                      p-src 198.19.{10+2k}.1 ──────────────────────── px<k> 198.19.{10+2k}.2 (source)
//!                        route 198.18.2.2 via 198.19.{10+2k}.2
//!                      p-tgt 198.19.{11+2k}.1 ──────────────────────── px<k> 198.19.{11+2k}.2 (target)
//!                        route 198.18.3.2 via 198.19.{11+2k}.2
//! ```

#![allow(
    clippy::must_use_candidate,
    reason = "a test harness: callers decide what to check"
)]
#![allow(
    clippy::too_many_lines,
    reason = "a lab scenario reads top to bottom as one story"
)]

pub mod churn;
pub mod cutover_lab;
pub mod faults;
pub mod fleet;
pub mod fleet_faults;
pub mod fleet_lab;
pub mod packet;
pub mod pg;
pub mod pgbench;
pub mod plot;
pub mod versions;
pub mod workload;

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub const VIP: &str = "198.18.1.1";
/// The VIP of an application-host lab ([`Lab::new_app_host`]): an address nobody owns, routed
/// from the client namespace by its default route (to the proxy namespace, a plain router
/// there, which has no route for it: a connection that is not redirected fails at once).
pub const APP_VIP: &str = "198.18.9.1";
/// Where labs mount the cgroup v2 hierarchy: outside /sys, which `ip netns exec` remounts.
pub const LAB_CGROUP_ROOT: &str = "/run/redirect-lab-cgroup";
pub const CLIENT_ADDR: &str = "198.18.1.2";
pub const SOURCE_ADDR: &str = "198.18.2.2";
pub const TARGET_ADDR: &str = "198.18.3.2";
pub const PG_PORT: u16 = 5432;
/// Where labs mount their own bpffs: outside /sys, because `ip netns exec` remounts /sys and
/// would hide a bpffs mounted there (see toolchain.md).
pub const LAB_BPFFS: &str = "/run/redirect-lab-bpf";

/// The `p` quantile (0 to 1) of `v`, by nearest rank; `NaN` for no samples. Benchmarks
/// report medians and tails with it.
#[must_use]
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a sample of a few thousand: exact in f64, and p is in [0, 1]"
    )]
    let i = ((s.len() - 1) as f64 * p).round() as usize;
    s[i]
}

/// The `redirect` binary built alongside the tests.
#[must_use]
pub fn redirect_bin() -> PathBuf {
    if let Ok(p) = std::env::var("REDIRECT_BIN") {
        return PathBuf::from(p);
    }
    // Tests run from target/<profile>/deps/, binaries such as the demo from target/<profile>/.
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("the executable's directory");

    [dir.join("redirect"), dir.parent().expect("target/<profile>").join("redirect")]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("no redirect binary next to {}: build it with `cargo build -p redirect` (cargo xtask test does)", exe.display()))
}

/// Runs a command and panics with its output if it fails.
pub fn sh(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ip(args: &[&str]) {
    sh(Command::new("ip").args(args));
}

/// Mounts the lab bpffs once per machine (idempotent).
pub fn ensure_lab_bpffs() {
    std::fs::create_dir_all(LAB_BPFFS).expect("creating the lab bpffs mount point");
    let mounted = Command::new("mountpoint")
        .arg("-q")
        .arg(LAB_BPFFS)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        sh(Command::new("mount").args(["-t", "bpf", "bpf", LAB_BPFFS]));
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// One lab: namespaces, links, servers, and a pin directory, all cleaned up on drop.
pub struct Lab {
    pub id: String,
    pub pin_dir: PathBuf,
    pub work_dir: PathBuf,
    children: Vec<Child>,
    /// How many times `redirect run` was started; names its log `redirect-<n>.log`.
    runs: u32,
    /// The pid of the latest `redirect run`.
    redirect_pid: Option<u32>,
    /// Extra environment for every `redirect` command (fault points).
    pub redirect_env: Vec<(String, String)>,
    /// The journal every `redirect` command of this lab uses.
    pub journal: PathBuf,
    /// How the hosts are wired.
    pub topology: Topology,
    /// `--hook` for `redirect run` (default: none, so `auto`).
    pub hook: Option<&'static str>,
    /// The `xdp_pass` program on the bridge's port facing the proxy, which gives that veth the
    /// NAPI context `XDP_TX`ed frames need (without GRO, which would merge them); detached on drop.
    bridge_port_pass: Option<aya::Ebpf>,
    /// Set when this lab's proxy fronts another lab's servers ([`Lab::new_sharing_servers`]).
    shared: Option<SharedServers>,
    /// Set for an application-host lab ([`Lab::new_app_host`]).
    pub app: Option<AppCgroup>,
}

/// The cgroup of an application-host lab: this test process moves into it (so its threads'
/// clients and every process it spawns are hooked), and back out on drop.
#[derive(Clone, Debug)]
pub struct AppCgroup {
    /// The lab's cgroup (under [`LAB_CGROUP_ROOT`]), which `redirect run --cgroup` hooks.
    pub path: PathBuf,
    /// The cgroup this process came from: outside the hooked one.
    pub outside: PathBuf,
}

/// Whose servers a sharing lab's proxy reaches, and by which links.
#[derive(Clone, Debug)]
pub struct SharedServers {
    /// The id of the lab that owns the source and target namespaces (and their servers).
    pub servers_lab: String,
    /// This proxy's number among the servers' proxies (the servers lab's own proxy is 0).
    pub k: u8,
}

impl SharedServers {
    /// The name of this proxy's link inside the servers' namespaces (one per server).
    #[must_use]
    pub fn server_side_link(&self) -> String {
        format!("px{}", self.k)
    }

    /// The /24 (its first three octets) of this proxy's link to `server`: 198.19.{10+2k} for
    /// the source, 198.19.{11+2k} for the target, clear of the etcd segment (198.19.0.0/24).
    #[must_use]
    pub fn subnet(&self, server: Ns) -> String {
        let offset = match server {
            Ns::Source => 0,
            Ns::Target => 1,
            other => panic!("{other:?} is not a server namespace"),
        };
        format!("198.19.{}", 10 + 2 * u32::from(self.k) + offset)
    }
}

/// How a lab's hosts are wired (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// Three veth legs on the proxy, routed.
    Routed,
    /// One NIC on a wire-like L2 segment (a bridge in its own namespace).
    OneNic,
    /// The proxy's own bridge, with the other hosts as containers on its ports.
    HostBridge,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ns {
    Client,
    Proxy,
    Source,
    Target,
    /// The L2 segment of a one-NIC lab.
    Bridge,
}

impl Lab {
    /// Builds the four namespaces and links. `name` makes the namespaces recognizable.
    #[must_use]
    pub fn new(name: &str) -> Self {
        Self::with_topology(name, Topology::Routed)
    }

    /// The one-NIC lab (see the module docs).
    #[must_use]
    pub fn new_one_nic(name: &str) -> Self {
        Self::with_topology(name, Topology::OneNic)
    }

    /// Containers on the proxy's own bridge (see the module docs).
    #[must_use]
    pub fn new_host_bridge(name: &str) -> Self {
        Self::with_topology(name, Topology::HostBridge)
    }

    /// One more proxy host in front of `servers`' source and target (see the module docs):
    /// its own client and proxy namespaces, with the usual client addressing and VIP, and links
    /// of its own into `servers`' source and target namespaces. `k` (1 to 100) numbers this
    /// proxy among the servers' proxies (the servers lab's own proxy is 0): it names the links
    /// and picks their subnets, so every sharing lab of one servers lab needs its own `k`.
    ///
    /// `redirect run` takes the usual `--source`/`--target` ([`SOURCE_ADDR`], [`TARGET_ADDR`]),
    /// and the servers see this proxy's own SNAT address (198.19.{10+2k}.1 and
    /// 198.19.{11+2k}.1). `ns(Ns::Source)` and `ns(Ns::Target)` name `servers`' namespaces, so
    /// `exec_ok` and `pg::psql` reach the shared servers. Dropping this lab removes its links
    /// and namespaces only: the servers, their namespaces and `servers`' processes are left
    /// alone.
    #[must_use]
    pub fn new_sharing_servers(name: &str, servers: &Lab, k: u8) -> Self {
        assert!(
            servers.topology == Topology::Routed && servers.shared.is_none(),
            "a lab can share the servers of a routed lab that owns them (Lab::new), not of {}",
            servers.id
        );
        assert!(
            (1..=100).contains(&k),
            "k numbers the sharing proxies from 1 to 100 (0 is the servers lab's own proxy)"
        );
        let mut lab = Self::empty(name, Topology::Routed);
        let shared = SharedServers {
            servers_lab: servers.id.clone(),
            k,
        };
        lab.shared = Some(shared.clone());
        lab.build_sharing(&shared);
        lab
    }

    /// An application host (socket mode, zero-hop): the routed lab, with `redirect run --mode
    /// socket` in the client namespace hooking a cgroup of its own, which this test process
    /// joins. The proxy namespace only routes. The servers see the client's own address.
    ///
    /// ```text
    ///  ns cli (app host: redirect, clients)   ns proxy (a router)     ns src / ns tgt
    ///  eth0 198.18.1.2 ─────────────────────── p-cli 198.18.1.1
    ///    connect(198.18.9.1:5432) ─► backend   p-src 198.18.2.1 ────── 198.18.2.2 source
    ///                                          p-tgt 198.18.3.1 ────── 198.18.3.2 target
    /// ```
    #[must_use]
    pub fn new_app_host(name: &str) -> Self {
        let mut lab = Self::with_topology(name, Topology::Routed);
        let root = ensure_lab_cgroup_root();
        let path = root.join(format!("redirect-lab-{}", lab.id));
        std::fs::create_dir_all(&path).expect("creating the lab's cgroup");
        let outside = root.join(own_cgroup().trim_start_matches('/'));
        lab.app = Some(AppCgroup {
            path: path.clone(),
            outside,
        });
        std::fs::write(path.join("cgroup.procs"), std::process::id().to_string())
            .expect("joining the lab's cgroup");
        lab
    }

    /// The address clients connect to: the VIP, or an application host's.
    #[must_use]
    pub fn vip(&self) -> &'static str {
        if self.app.is_some() { APP_VIP } else { VIP }
    }

    /// `argv` in the client namespace, run from outside the hooked cgroup (an application
    /// host's process that is not redirected).
    #[must_use]
    pub fn outside_cgroup_cmd(&self, argv: &[&str]) -> Command {
        let app = self.app.as_ref().expect("an application-host lab");
        let procs = app.outside.join("cgroup.procs");
        let mut c = self.cmd(
            Ns::Client,
            &[
                "sh",
                "-c",
                &format!("echo $$ > {} && exec \"$@\"", procs.display()),
                "sh",
            ],
        );
        c.args(argv);
        c
    }

    fn with_topology(name: &str, topology: Topology) -> Self {
        let mut lab = Self::empty(name, topology);
        match topology {
            Topology::Routed => lab.build(),
            Topology::OneNic => lab.build_one_nic(),
            Topology::HostBridge => lab.build_host_bridge(),
        }
        lab
    }

    /// A lab with its names and work dir, and nothing built yet.
    fn empty(name: &str, topology: Topology) -> Self {
        ensure_lab_bpffs();
        let id = format!(
            "rd{}{}{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed),
            &name[..name.len().min(4)]
        );
        let work_dir = std::env::temp_dir().join(format!("redirect-lab-{id}"));
        let _ = std::fs::remove_dir_all(&work_dir);
        std::fs::create_dir_all(&work_dir).expect("creating the lab work dir");
        Self {
            topology,
            hook: None,
            bridge_port_pass: None,
            pin_dir: Path::new(LAB_BPFFS).join(&id),
            id,
            journal: work_dir.join("journal.jsonl"),
            redirect_env: Vec::new(),
            work_dir,
            children: Vec::new(),
            runs: 0,
            redirect_pid: None,
            shared: None,
            app: None,
        }
    }

    /// The namespaces this lab created, and deletes on drop: a sharing lab's servers belong to
    /// the servers lab.
    fn namespaces(&self) -> Vec<Ns> {
        if self.shared.is_some() {
            return vec![Ns::Client, Ns::Proxy];
        }
        let mut all = vec![Ns::Client, Ns::Proxy, Ns::Source, Ns::Target];
        if self.topology == Topology::OneNic {
            all.push(Ns::Bridge);
        }
        all
    }

    fn build_one_nic(&mut self) {
        for ns in self.namespaces() {
            ip(&["netns", "add", &self.ns(ns)]);
            ip(&["-n", &self.ns(ns), "link", "set", "lo", "up"]);
        }
        let br = self.ns(Ns::Bridge);
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &br, "link", "set", "br0", "up"]);
        let hosts: [(Ns, &str, &[&str], Option<&str>); 4] = [
            (
                Ns::Proxy,
                "b-prx",
                &["198.18.1.1/24", "198.18.2.1/24", "198.18.3.1/24"],
                None,
            ),
            (Ns::Client, "b-cli", &["198.18.1.2/24"], Some("198.18.1.1")),
            (Ns::Source, "b-src", &["198.18.2.2/24"], Some("198.18.2.1")),
            (Ns::Target, "b-tgt", &["198.18.3.2/24"], Some("198.18.3.1")),
        ];
        for (ns, port, addrs, gateway) in hosts {
            let host = self.ns(ns);
            ip(&[
                "link", "add", "eth0", "netns", &host, "type", "veth", "peer", "name", port,
                "netns", &br,
            ]);
            ip(&["-n", &br, "link", "set", port, "master", "br0"]);
            ip(&["-n", &br, "link", "set", port, "up"]);
            for addr in addrs {
                ip(&["-n", &host, "addr", "add", addr, "dev", "eth0"]);
            }
            ip(&["-n", &host, "link", "set", "eth0", "up"]);
            if let Some(gw) = gateway {
                ip(&["-n", &host, "route", "add", "default", "via", gw]);
            }
            // Full checksums from every sender, as from a wire (see `build`).
            self.exec_ok(ns, &["ethtool", "-K", "eth0", "tx", "off"]);
        }
        self.exec_ok(Ns::Proxy, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        // Routed traffic (replication between the servers) leaves by the interface it came in
        // on, which is the point of this topology: no ICMP redirects.
        self.exec_ok(
            Ns::Proxy,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.eth0.send_redirects=0",
            ],
        );
        // The bridge port facing the proxy receives its XDP_TX frames: give it NAPI with an
        // XDP_PASS program, as on a wire-like segment (GRO there would merge the frames).
        let ebpf = self.in_ns(Ns::Bridge, || {
            let mut ebpf =
                aya::Ebpf::load(redirect::datapath::object()).expect("loading the object");
            let prog: &mut aya::programs::Xdp = ebpf
                .program_mut("xdp_pass")
                .expect("xdp_pass")
                .try_into()
                .expect("XDP");
            prog.load().expect("xdp_pass loads");
            prog.attach("b-prx", aya::programs::XdpMode::Driver)
                .expect("attaching xdp_pass to the bridge port");
            ebpf
        });
        self.bridge_port_pass = Some(ebpf);
    }

    fn build_host_bridge(&self) {
        for ns in self.namespaces() {
            ip(&["netns", "add", &self.ns(ns)]);
            ip(&["-n", &self.ns(ns), "link", "set", "lo", "up"]);
        }
        let proxy = self.ns(Ns::Proxy);
        ip(&["-n", &proxy, "link", "add", "br0", "type", "bridge"]);
        for addr in ["198.18.1.1/24", "198.18.2.1/24", "198.18.3.1/24"] {
            ip(&["-n", &proxy, "addr", "add", addr, "dev", "br0"]);
        }
        ip(&["-n", &proxy, "link", "set", "br0", "up"]);
        for (ns, port, addr, gateway) in [
            (Ns::Client, "c-cli", "198.18.1.2/24", "198.18.1.1"),
            (Ns::Source, "c-src", "198.18.2.2/24", "198.18.2.1"),
            (Ns::Target, "c-tgt", "198.18.3.2/24", "198.18.3.1"),
        ] {
            let host = self.ns(ns);
            ip(&[
                "link", "add", "eth0", "netns", &host, "type", "veth", "peer", "name", port,
                "netns", &proxy,
            ]);
            ip(&["-n", &proxy, "link", "set", port, "master", "br0"]);
            ip(&["-n", &proxy, "link", "set", port, "up"]);
            ip(&["-n", &host, "addr", "add", addr, "dev", "eth0"]);
            ip(&["-n", &host, "link", "set", "eth0", "up"]);
            ip(&["-n", &host, "route", "add", "default", "via", gateway]);
            // Containers send as Docker's do: TX checksum offload and TSO on (the veth
            // default, set anyway), so the proxy sees GSO buffers with partial checksums.
            self.exec_ok(ns, &["ethtool", "-K", "eth0", "tx", "on", "tso", "on"]);
            // The bridge ports complete checksums in software on the way to each container,
            // so the container's stack verifies every segment the proxy translated: a wrong
            // checksum shows as TcpInCsumErrors instead of being trusted as "partial".
            self.exec_ok(Ns::Proxy, &["ethtool", "-K", port, "tx", "off"]);
        }
        self.exec_ok(Ns::Proxy, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        self.exec_ok(
            Ns::Proxy,
            &[
                "sysctl",
                "-qw",
                "net.ipv4.conf.all.send_redirects=0",
                "net.ipv4.conf.br0.send_redirects=0",
            ],
        );
    }

    /// Turns the routed lab's senders into local senders with offloads (TX checksum offload,
    /// TSO) and lets the proxy's legs merge frames (GRO), while the proxy's legs complete
    /// checksums in software on the way out, so every receiver verifies what the proxy
    /// translated. That is what containers behind veths on the proxy host look like.
    pub fn enable_sender_offloads(&self) {
        assert_eq!(self.topology, Topology::Routed);
        assert!(
            self.shared.is_none(),
            "the servers' senders belong to the servers lab"
        );
        for (ns, leg) in [
            (Ns::Client, "p-cli"),
            (Ns::Source, "p-src"),
            (Ns::Target, "p-tgt"),
        ] {
            self.exec_ok(ns, &["ethtool", "-K", "eth0", "tx", "on", "tso", "on"]);
            self.exec_ok(Ns::Proxy, &["ethtool", "-K", leg, "gro", "on", "tx", "off"]);
        }
    }

    #[must_use]
    pub fn ns(&self, ns: Ns) -> String {
        let suffix = match ns {
            Ns::Client => "cli",
            Ns::Proxy => "prx",
            Ns::Source => "src",
            Ns::Target => "tgt",
            Ns::Bridge => "br",
        };
        let owner = match (ns, &self.shared) {
            (Ns::Source | Ns::Target, Some(shared)) => &shared.servers_lab,
            _ => &self.id,
        };
        format!("{owner}{suffix}")
    }

    /// Whose servers this lab's proxy fronts, if they belong to another lab.
    #[must_use]
    pub fn shared_servers(&self) -> Option<&SharedServers> {
        self.shared.as_ref()
    }

    fn build(&self) {
        for ns in [Ns::Client, Ns::Proxy, Ns::Source, Ns::Target] {
            ip(&["netns", "add", &self.ns(ns)]);
            ip(&["-n", &self.ns(ns), "link", "set", "lo", "up"]);
        }
        for (ns, leg, net) in [
            (Ns::Client, "p-cli", 1),
            (Ns::Source, "p-src", 2),
            (Ns::Target, "p-tgt", 3),
        ] {
            let net = format!("198.18.{net}");
            self.add_leg(ns, "eth0", leg, &net);
            ip(&[
                "-n",
                &self.ns(ns),
                "route",
                "add",
                "default",
                "via",
                &format!("{net}.1"),
            ]);
        }
    }

    /// A sharing lab (see [`Lab::new_sharing_servers`]): the client leg as in [`Lab::build`],
    /// and a leg into each of the servers lab's server namespaces, with a host route to that
    /// server's usual address over it. The servers keep their default route (to their own
    /// lab's proxy): they answer this proxy over the connected route of its link.
    fn build_sharing(&self, shared: &SharedServers) {
        for ns in [Ns::Client, Ns::Proxy] {
            ip(&["netns", "add", &self.ns(ns)]);
            ip(&["-n", &self.ns(ns), "link", "set", "lo", "up"]);
        }
        self.add_leg(Ns::Client, "eth0", "p-cli", "198.18.1");
        ip(&[
            "-n",
            &self.ns(Ns::Client),
            "route",
            "add",
            "default",
            "via",
            "198.18.1.1",
        ]);
        for (server, leg, addr) in [
            (Ns::Source, "p-src", SOURCE_ADDR),
            (Ns::Target, "p-tgt", TARGET_ADDR),
        ] {
            let net = shared.subnet(server);
            self.add_leg(server, &shared.server_side_link(), leg, &net);
            ip(&[
                "-n",
                &self.ns(Ns::Proxy),
                "route",
                "add",
                &format!("{addr}/32"),
                "via",
                &format!("{net}.2"),
                "dev",
                leg,
            ]);
        }
    }

    /// One routed leg of the proxy: a veth from `leg` (`<net>.1/24`, in the proxy) to
    /// `peer_link` (`<net>.2/24`, in `peer`), with the settings the datapath needs.
    fn add_leg(&self, peer: Ns, peer_link: &str, leg: &str, net: &str) {
        let peer_ns = self.ns(peer);
        let proxy = self.ns(Ns::Proxy);
        ip(&[
            "link", "add", peer_link, "netns", &peer_ns, "type", "veth", "peer", "name", leg,
            "netns", &proxy,
        ]);
        ip(&[
            "-n",
            &peer_ns,
            "addr",
            "add",
            &format!("{net}.2/24"),
            "dev",
            peer_link,
        ]);
        ip(&[
            "-n",
            &proxy,
            "addr",
            "add",
            &format!("{net}.1/24"),
            "dev",
            leg,
        ]);
        ip(&["-n", &peer_ns, "link", "set", peer_link, "up"]);
        ip(&["-n", &proxy, "link", "set", leg, "up"]);
        // The servers reach each other through the proxy (replication), routed, not NATed.
        self.exec_ok(Ns::Proxy, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        // Full checksums from every sender: XDP cannot see CHECKSUM_PARTIAL, so an
        // incremental update of a partial checksum would be wrong. Fail loudly if ethtool
        // is missing: a silent failure leaves ping working and TCP broken.
        self.exec_ok(peer, &["ethtool", "-K", peer_link, "tx", "off"]);
        // Frames XDP_REDIRECTed into a veth are only received if the peer has NAPI
        // (kernel veth_xdp_xmit); GRO on gives it one.
        self.exec_ok(peer, &["ethtool", "-K", peer_link, "gro", "on"]);
    }

    /// `ip netns exec <ns> <argv>` as a Command.
    #[must_use]
    pub fn cmd(&self, ns: Ns, argv: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(ns)]).args(argv);
        c
    }

    /// Runs a command in a namespace; panics if it fails.
    pub fn exec_ok(&self, ns: Ns, argv: &[&str]) -> Output {
        sh(&mut self.cmd(ns, argv))
    }

    /// Runs `redirect <args>` in the proxy namespace with this lab's pin dir.
    #[must_use]
    pub fn redirect(&self, args: &[&str]) -> Output {
        self.redirect_cmd()
            .args(args)
            .output()
            .expect("spawning redirect")
    }

    /// `redirect` in the proxy namespace (an application host's: the client namespace) with
    /// this lab's pin dir, control socket and journal.
    #[must_use]
    pub fn redirect_cmd(&self) -> Command {
        let mut c = self.cmd(self.redirect_ns(), &[]);
        c.arg(redirect_bin())
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--socket")
            .arg(self.work_dir.join("control.sock"))
            .arg("--journal")
            .arg(&self.journal);
        c.envs(self.redirect_env.iter().map(|(k, v)| (k, v)));
        c
    }

    /// `redirect <args>`, asserting success; returns stdout.
    pub fn redirect_ok(&self, args: &[&str]) -> String {
        let out = self.redirect(args);
        assert!(
            out.status.success(),
            "redirect {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    /// Where `redirect` runs: the proxy, or an application host's own namespace.
    #[must_use]
    pub fn redirect_ns(&self) -> Ns {
        if self.app.is_some() {
            Ns::Client
        } else {
            Ns::Proxy
        }
    }

    /// The standard `run` arguments for this lab.
    #[must_use]
    pub fn run_args(&self) -> Vec<String> {
        if let Some(app) = &self.app {
            return [
                "run",
                "--mode",
                "socket",
                "--cgroup",
                &app.path.display().to_string(),
                "--iface",
                "eth0",
                "--vip",
                &format!("{APP_VIP}:{PG_PORT}"),
                "--source",
                &format!("{SOURCE_ADDR}:{PG_PORT}"),
                "--target",
                &format!("{TARGET_ADDR}:{PG_PORT}"),
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        }
        let ifaces: &[&str] = match self.topology {
            Topology::Routed => &["--iface", "p-cli", "--iface", "p-src", "--iface", "p-tgt"],
            Topology::OneNic => &["--iface", "eth0"],
            Topology::HostBridge => &["--iface", "br0"],
        };
        let mut args = vec!["run".to_owned()];
        args.extend(ifaces.iter().map(|s| (*s).to_owned()));
        if let Some(hook) = self.hook {
            args.extend(["--hook".to_owned(), hook.to_owned()]);
        }
        args.extend(
            [
                "--vip",
                &format!("{VIP}:{PG_PORT}"),
                "--source",
                &format!("{SOURCE_ADDR}:{PG_PORT}"),
                "--target",
                &format!("{TARGET_ADDR}:{PG_PORT}"),
            ]
            .iter()
            .map(|s| (*s).to_owned()),
        );
        args
    }

    /// Starts `redirect run` in the proxy namespace and waits until the datapath is pinned.
    pub fn start_redirect(&mut self, extra: &[&str]) -> u32 {
        let log_path = self.work_dir.join(format!("redirect-{}.log", self.runs));
        self.runs += 1;
        let log = File::create(&log_path).expect("log file");
        let mut cmd = self.redirect_cmd();
        cmd.args(self.run_args()).args(extra);
        cmd.stdout(Stdio::null()).stderr(log);
        let child = cmd.spawn().expect("spawning redirect run");
        let pid = child.id();
        // Owned by the lab at once, so a failure below still stops it.
        self.children.push(child);
        self.redirect_pid = Some(pid);
        // Ready once it has logged that the datapath is configured (pins alone may be
        // left over from an earlier run).
        let deadline = Instant::now() + Duration::from_secs(45);
        loop {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let want_db = extra.contains(&"--source-dsn");
            if log.contains("datapath ready")
                && (!want_db
                    || log.contains("cutovers are ready")
                    || log.contains("could not prepare"))
            {
                break;
            }
            let exited = self
                .children
                .last_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!("redirect run exited ({status}):\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "redirect run did not get ready:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        pid
    }

    /// The pid of the latest `redirect run` this lab started.
    #[must_use]
    pub fn redirect_pid(&self) -> Option<u32> {
        self.redirect_pid
    }

    /// The journal's entries for the latest cutover (`redirect history --json`), in the order
    /// they were written.
    #[must_use]
    pub fn last_cutover(&self) -> Vec<redirect::journal::Entry> {
        let entries: Vec<redirect::journal::Entry> =
            serde_json::from_str(&self.redirect_ok(&["history", "--json"]))
                .expect("history --json is the journal");
        let last = entries
            .last()
            .map(|e| e.cutover.clone())
            .unwrap_or_default();
        entries.into_iter().filter(|e| e.cutover == last).collect()
    }

    /// The steps of [`Self::last_cutover`].
    #[must_use]
    pub fn last_cutover_steps(&self) -> Vec<redirect::journal::Step> {
        self.last_cutover().into_iter().map(|e| e.step).collect()
    }

    /// The log of the latest `redirect run`.
    #[must_use]
    pub fn last_redirect_log(&self) -> String {
        let n = self.runs.saturating_sub(1);
        std::fs::read_to_string(self.work_dir.join(format!("redirect-{n}.log"))).unwrap_or_default()
    }

    /// Reaps children that have exited (after a test killed one).
    pub fn reap_exited(&mut self) {
        self.children
            .retain_mut(|c| matches!(c.try_wait(), Ok(None)));
    }

    /// Spawns a long-running process in a namespace; it is killed when the lab drops.
    pub fn spawn(&mut self, ns: Ns, argv: &[&str], log_name: &str) -> u32 {
        let log = File::create(self.work_dir.join(log_name)).expect("log file");
        let child = self
            .cmd(ns, argv)
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {argv:?}: {e}"));
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Sends `signal` to a process this lab started, and reaps it if it exits.
    pub fn signal(&mut self, pid: u32, signal: i32) {
        let Some(pos) = self.children.iter().position(|c| c.id() == pid) else {
            panic!("pid {pid} was not started by this lab");
        };
        // SAFETY: signalling a child we spawned and have not reaped.
        unsafe { libc::kill(i32::try_from(pid).expect("pid fits i32"), signal) };
        let mut child = self.children.remove(pos);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if child.try_wait().expect("try_wait").is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// One datapath counter from `redirect status --json` (0 if absent).
    #[must_use]
    pub fn stat(&self, name: &str) -> u64 {
        self.status()["stats"][name].as_u64().unwrap_or(0)
    }

    /// The controller's `/metrics` body (its default address, in the namespace it runs in).
    #[must_use]
    pub fn metrics(&self) -> String {
        self.in_ns(self.redirect_ns(), || {
            use std::io::{Read as _, Write as _};
            let mut s = std::net::TcpStream::connect("127.0.0.1:9187").expect("the metrics port");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).unwrap();
            body
        })
    }

    /// The value of one series (`name{labels}` exactly, or a bare name) in [`Lab::metrics`].
    #[must_use]
    pub fn metric(&self, series: &str) -> Option<f64> {
        self.metrics().lines().find_map(|l| {
            let rest = l.strip_prefix(series)?;
            let rest = rest.strip_prefix(' ')?;
            rest.trim().parse().ok()
        })
    }

    /// `redirect status --json`.
    #[must_use]
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.redirect_ok(&["status", "--json"]))
            .expect("status --json is JSON")
    }

    /// Writes /etc/netns/<ns>/hosts, which `ip netns exec` mounts over /etc/hosts there.
    pub fn set_hosts(&self, ns: Ns, hosts: &str) {
        let dir = Path::new("/etc/netns").join(self.ns(ns));
        std::fs::create_dir_all(&dir).expect("creating /etc/netns/<ns>");
        std::fs::write(dir.join("hosts"), format!("127.0.0.1 localhost\n{hosts}"))
            .expect("writing hosts");
    }

    /// `nstat TcpInCsumErrors` of one namespace.
    #[must_use]
    pub fn csum_errors(&self, ns: Ns) -> u64 {
        let out = self.exec_ok(ns, &["nstat", "-az", "TcpInCsumErrors"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| {
                l.strip_prefix("TcpInCsumErrors").map(|r| {
                    r.split_whitespace()
                        .next()
                        .unwrap_or("0")
                        .parse()
                        .unwrap_or(0)
                })
            })
            .unwrap_or(0)
    }

    /// Runs `f` on a thread that has entered the namespace `ns`: every socket it opens lives
    /// there.
    pub fn in_ns<T: Send + 'static>(&self, ns: Ns, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.spawn_in_ns(ns, f)
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// Like [`Lab::in_ns`], but returns the thread to join. The thread holds no reference to
    /// the lab, so a failing test still tears the lab down at once.
    pub fn spawn_in_ns<T: Send + 'static>(
        &self,
        ns: Ns,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.ns(ns));
        std::thread::spawn(move || {
            let fd = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            // SAFETY: setns on a valid namespace fd affects only this thread.
            let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
            f()
        })
    }
}

/// Mounts the cgroup v2 hierarchy at [`LAB_CGROUP_ROOT`] (once).
fn ensure_lab_cgroup_root() -> PathBuf {
    let root = PathBuf::from(LAB_CGROUP_ROOT);
    if !root.join("cgroup.procs").exists() {
        std::fs::create_dir_all(&root).expect("creating the lab cgroup mount point");
        sh(Command::new("mount").args(["-t", "cgroup2", "none", LAB_CGROUP_ROOT]));
    }
    root
}

/// This process's cgroup v2 path (`0::/...` in /proc/self/cgroup).
fn own_cgroup() -> String {
    std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .unwrap_or_else(|| "/".into())
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(app) = &self.app {
            // Out of the lab's cgroup first: processes started from here on are not hooked.
            let _ = std::fs::write(
                app.outside.join("cgroup.procs"),
                std::process::id().to_string(),
            );
        }
        for child in &mut self.children {
            // SAFETY: signalling our own child by pid; SIGTERM lets PostgreSQL shut down.
            unsafe { libc::kill(i32::try_from(child.id()).unwrap_or(0), libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for child in &mut self.children {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.pin_dir.exists() {
            let _ = Command::new(redirect_bin())
                .arg("--pin-dir")
                .arg(&self.pin_dir)
                .args(["detach", "--force"])
                .output();
            let _ = std::fs::remove_dir_all(&self.pin_dir);
        }
        drop(self.bridge_port_pass.take());
        // A sharing lab's links end in the servers lab's namespaces: delete them there (a veth
        // goes with its peer), so the servers lab is left as it was, whichever drops first.
        if let Some(shared) = &self.shared {
            for server in [Ns::Source, Ns::Target] {
                let _ = Command::new("ip")
                    .args(["-n", &self.ns(server), "link", "del"])
                    .arg(shared.server_side_link())
                    .output();
            }
        }
        for ns in self.namespaces() {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(ns)])
                .output();
            let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(self.ns(ns)));
        }
        if let Some(app) = &self.app {
            // Empty once its processes are gone (the servers' children exit a moment later).
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::fs::remove_dir(&app.path).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.work_dir);
        }
    }
}

/// Polls `cond` until it holds (true), or until `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// Polls `cond` until it holds, or panics with `what` after `timeout`.
pub fn wait_for(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Skips nothing: the lab needs root, and CI runs as root. Fail with a clear message otherwise.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the lab tests need root (run `cargo xtask test` as root)"
    );
}

/// `steps` holds `expected` in this order (other steps may come between).
///
/// # Panics
/// When it does not.
pub fn assert_steps_in_order(
    steps: &[redirect::journal::Step],
    expected: &[redirect::journal::Step],
) {
    let mut rest = steps.iter();
    for want in expected {
        assert!(
            rest.any(|s| s == want),
            "the journal's steps {steps:?} do not hold {expected:?} in order (missing {want:?})"
        );
    }
}
