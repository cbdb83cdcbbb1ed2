//! The fleet lab: a real 3-node etcd cluster, each node in its own network namespace, on one
//! L2 segment (a bridge in a namespace of its own) that proxy namespaces join with a veth.
//!
//! ```text
//!  ns <id>e1 eth0 198.19.0.11 ─┐
//!  ns <id>e2 eth0 198.19.0.12 ─┤ ns <id>eb: br0 198.19.0.1 (etcdctl runs here)
//!  ns <id>e3 eth0 198.19.0.13 ─┤
//!  a Lab's proxy ns: etcd0 198.19.0.<100+k> ─┘
//! ```
//!
//! Every name is unique per cluster; dropping an [`Etcd`] stops the etcd processes it started
//! (by pid), deletes its namespaces and its data, even when a test panics.

use std::{
    fmt::Write as _,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::{Lab, Ns, sh};

/// The etcd cluster's segment, inside the labs' 198.18.0.0/15.
pub const ETCD_NET: &str = "198.19.0";
/// The name of the veth a proxy namespace reaches etcd by.
pub const PROXY_ETCD_IFACE: &str = "etcd0";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// One etcd node: its namespace, address and (while it runs) its process.
struct Node {
    name: String,
    ns: String,
    addr: String,
    data_dir: PathBuf,
    child: Option<Child>,
    runs: u32,
}

/// A 3-node etcd cluster in namespaces.
pub struct Etcd {
    pub id: String,
    pub work_dir: PathBuf,
    nodes: Vec<Node>,
    /// Proxy namespaces joined to the segment (their veths go with their namespace).
    joined: u32,
    /// While [`Etcd::slow`] runs: its stop flag and thread.
    slowed: Option<(
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        std::thread::JoinHandle<()>,
    )>,
}

impl Etcd {
    /// Builds the namespaces and starts a 3-node cluster; returns once it has a leader.
    #[must_use]
    pub fn new(name: &str) -> Self {
        crate::require_root();
        assert!(
            PathBuf::from("/usr/bin/etcd").exists(),
            "etcd is not installed: run `cargo xtask setup` (Debian etcd-server)"
        );
        let id = format!(
            "rd{}{}{}",
            std::process::id() % 100_000,
            NEXT.fetch_add(1, Ordering::Relaxed),
            &name[..name.len().min(3)]
        );
        let work_dir = std::env::temp_dir().join(format!("redirect-etcd-{id}"));
        let _ = std::fs::remove_dir_all(&work_dir);
        std::fs::create_dir_all(&work_dir).expect("creating the etcd work dir");
        let nodes = (1..=3)
            .map(|i| Node {
                name: format!("e{i}"),
                ns: format!("{id}e{i}"),
                addr: format!("{ETCD_NET}.{}", 10 + i),
                data_dir: work_dir.join(format!("e{i}.etcd")),
                child: None,
                runs: 0,
            })
            .collect();
        let mut etcd = Self {
            id,
            work_dir,
            nodes,
            joined: 0,
            slowed: None,
        };
        etcd.build();
        for i in 0..3 {
            etcd.start(i);
        }
        etcd.wait_healthy(Duration::from_secs(30));
        etcd
    }

    fn bridge_ns(&self) -> String {
        format!("{}eb", self.id)
    }

    fn build(&self) {
        let br = self.bridge_ns();
        sh(Command::new("ip").args(["netns", "add", &br]));
        let ipn = |ns: &str, args: &[&str]| sh(Command::new("ip").arg("-n").arg(ns).args(args));
        ipn(&br, &["link", "set", "lo", "up"]);
        ipn(&br, &["link", "add", "br0", "type", "bridge"]);
        ipn(
            &br,
            &["addr", "add", &format!("{ETCD_NET}.1/24"), "dev", "br0"],
        );
        ipn(&br, &["link", "set", "br0", "up"]);
        for (i, node) in self.nodes.iter().enumerate() {
            sh(Command::new("ip").args(["netns", "add", &node.ns]));
            ipn(&node.ns, &["link", "set", "lo", "up"]);
            let port = format!("e{}", i + 1);
            sh(Command::new("ip").args([
                "link", "add", "eth0", "netns", &node.ns, "type", "veth", "peer", "name", &port,
                "netns", &br,
            ]));
            ipn(
                &node.ns,
                &["addr", "add", &format!("{}/24", node.addr), "dev", "eth0"],
            );
            ipn(&node.ns, &["link", "set", "eth0", "up"]);
            ipn(&br, &["link", "set", &port, "master", "br0"]);
            ipn(&br, &["link", "set", &port, "up"]);
        }
    }

    fn initial_cluster(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("{}=http://{}:2380", n.name, n.addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client URLs, comma-separated, as `redirect run --etcd` takes them.
    #[must_use]
    pub fn endpoints(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("http://{}:2379", n.addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts node `i` (0-based); a restart re-uses its data directory and rejoins.
    pub fn start(&mut self, i: usize) {
        let initial_cluster = self.initial_cluster();
        let token = self.id.clone();
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "etcd node {} already runs", node.name);
        let log = std::fs::File::create(
            self.work_dir
                .join(format!("{}-{}.log", node.name, node.runs)),
        )
        .expect("etcd log");
        node.runs += 1;
        let peer = format!("http://{}:2380", node.addr);
        let client = format!("http://{}:2379", node.addr);
        let child = Command::new("ip")
            .args(["netns", "exec", &node.ns, "etcd"])
            .args(["--name", &node.name])
            .arg("--data-dir")
            .arg(&node.data_dir)
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--initial-cluster", &initial_cluster])
            .args(["--initial-cluster-token", &token])
            .args(["--initial-cluster-state", "new"])
            // A lab's elections should settle in about a second.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning etcd");
        node.child = Some(child);
    }

    /// SIGKILLs node `i` (0-based), as a crash would.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOPs every node: etcd is there (its sockets accept) but answers nothing, as a
    /// stalled cluster does. [`Etcd::resume`] SIGCONTs them.
    pub fn pause(&self) {
        self.signal_all(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal_all(libc::SIGCONT);
    }

    fn signal_all(&self, signal: i32) {
        for node in &self.nodes {
            if let Some(child) = &node.child {
                // SAFETY: signalling an etcd this cluster spawned and has not reaped
                // (`ip netns exec` execs etcd in place, so the pid is etcd's).
                unsafe { libc::kill(i32::try_from(child.id()).expect("pid fits i32"), signal) };
            }
        }
    }

    /// Slows every node down: each is stopped for `ms` of every `ms` + 50 ms (SIGSTOP, then
    /// SIGCONT), so an answer waits up to `ms` longer, peers' heartbeats included, and no
    /// election is lost (its timeout is 1 s). This kernel has no `sch_netem`
    /// (CONFIG_NET_SCH_NETEM is not set), so a packet delay is not to be had; a server that
    /// answers late is what a client of a slow etcd sees. [`Etcd::unslow`] ends it.
    pub fn slow(&mut self, ms: u64) {
        let pids: Vec<i32> = self
            .nodes
            .iter()
            .filter_map(|n| n.child.as_ref())
            .map(|c| i32::try_from(c.id()).expect("pid fits i32"))
            .collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                // Bounded whatever the caller does: at most 10 minutes.
                let until = Instant::now() + Duration::from_secs(600);
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    for pid in &pids {
                        // SAFETY: signalling etcd processes this cluster spawned.
                        unsafe { libc::kill(*pid, libc::SIGSTOP) };
                    }
                    std::thread::sleep(Duration::from_millis(ms));
                    for pid in &pids {
                        // SAFETY: as above.
                        unsafe { libc::kill(*pid, libc::SIGCONT) };
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        });
        self.slowed = Some((stop, thread));
    }

    pub fn unslow(&mut self) {
        if let Some((stop, thread)) = self.slowed.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = thread.join();
        }
        self.resume();
    }

    /// The lease `key` is attached to (`None`: absent, no lease, or etcd did not answer).
    #[must_use]
    pub fn lease_of(&self, key: &str) -> Option<i64> {
        let out = self.etcdctl(&["get", key, "-w", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["kvs"][0]["lease"].as_i64().filter(|l| *l != 0)
    }

    /// Revokes `lease` (as an operator's `etcdctl lease revoke` would), asserting success.
    pub fn revoke(&self, lease: i64) {
        let out = self.etcdctl(&["lease", "revoke", &format!("{lease:x}")]);
        assert!(
            out.status.success(),
            "etcdctl lease revoke: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Saves a snapshot of the cluster's data (from the first node) to `path`.
    pub fn snapshot(&self, path: &std::path::Path) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.bridge_ns(), "etcdctl"])
            .args([
                "--endpoints",
                &format!("http://{}:2379", self.nodes[0].addr),
            ])
            .arg("snapshot")
            .arg("save")
            .arg(path)
            .env("ETCDCTL_API", "3")
            .output()
            .expect("spawning etcdctl snapshot save");
        assert!(
            out.status.success(),
            "etcdctl snapshot save: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Disaster recovery as etcd documents it: every node stopped, its data replaced by
    /// `snapshot` (`etcdctl snapshot restore`), then started again. Whatever was written
    /// after the snapshot is gone, leases included.
    pub fn restore(&mut self, snapshot: &std::path::Path) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let initial_cluster = self.initial_cluster();
        for node in &self.nodes {
            let _ = std::fs::remove_dir_all(&node.data_dir);
            let out = Command::new("etcdctl")
                .arg("snapshot")
                .arg("restore")
                .arg(snapshot)
                .args(["--name", &node.name])
                .args(["--initial-cluster", &initial_cluster])
                .args(["--initial-cluster-token", &self.id])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://{}:2380", node.addr),
                ])
                .arg("--data-dir")
                .arg(&node.data_dir)
                .env("ETCDCTL_API", "3")
                .output()
                .expect("spawning etcdctl snapshot restore");
            assert!(
                out.status.success(),
                "etcdctl snapshot restore: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for i in 0..self.nodes.len() {
            self.start(i);
        }
        self.wait_healthy(Duration::from_secs(30));
    }

    /// Cuts node `i` off the segment (its link goes down); [`Etcd::heal`] undoes it.
    pub fn partition(&self, i: usize) {
        sh(Command::new("ip").args(["-n", &self.nodes[i].ns, "link", "set", "eth0", "down"]));
    }

    pub fn heal(&self, i: usize) {
        sh(Command::new("ip").args(["-n", &self.nodes[i].ns, "link", "set", "eth0", "up"]));
    }

    /// `etcdctl <args>` from the bridge namespace, against every node.
    #[must_use]
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.bridge_ns(), "etcdctl"])
            .args(["--endpoints", &self.endpoints(), "--command-timeout", "3s"])
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .expect("spawning etcdctl")
    }

    /// The value of `key` (`None`: absent, or etcd did not answer).
    #[must_use]
    pub fn get(&self, key: &str) -> Option<String> {
        let out = self.etcdctl(&["get", "--print-value-only", key]);
        let value = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success() && !value.is_empty()).then_some(value)
    }

    /// Puts `value` at `key`, asserting success.
    pub fn put(&self, key: &str, value: &str) {
        let out = self.etcdctl(&["put", key, value]);
        assert!(
            out.status.success(),
            "etcdctl put {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The index (0-based) of the node that leads now, if the cluster has a leader.
    #[must_use]
    pub fn leader(&self) -> Option<usize> {
        let out = self.etcdctl(&["endpoint", "status", "-w", "json"]);
        let statuses: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        statuses.as_array()?.iter().find_map(|s| {
            let member = s["Status"]["header"]["member_id"].as_u64()?;
            let leader = s["Status"]["leader"].as_u64()?;
            let endpoint = s["Endpoint"].as_str()?;
            (member == leader)
                .then(|| self.nodes.iter().position(|n| endpoint.contains(&n.addr)))
                .flatten()
        })
    }

    /// Waits until the cluster has a leader and answers a linearizable read.
    pub fn wait_healthy(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.etcdctl(&["get", "--consistency=l", "/redirect-lab-probe"]);
            if out.status.success() && self.leader().is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy within {timeout:?}: {}\nlogs in {}",
                String::from_utf8_lossy(&out.stderr),
                self.work_dir.display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Joins `lab`'s proxy namespace to the etcd segment (a veth named [`PROXY_ETCD_IFACE`]),
    /// so its controller reaches [`Etcd::endpoints`]. Returns the proxy's address there.
    pub fn join(&mut self, lab: &Lab) -> String {
        self.joined += 1;
        let addr = format!("{ETCD_NET}.{}", 100 + self.joined);
        let proxy = lab.ns(Ns::Proxy);
        let port = format!("p{}", self.joined);
        let br = self.bridge_ns();
        sh(Command::new("ip").args([
            "link",
            "add",
            PROXY_ETCD_IFACE,
            "netns",
            &proxy,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &br,
        ]));
        let ipn = |ns: &str, args: &[&str]| sh(Command::new("ip").arg("-n").arg(ns).args(args));
        ipn(
            &proxy,
            &[
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                PROXY_ETCD_IFACE,
            ],
        );
        ipn(&proxy, &["link", "set", PROXY_ETCD_IFACE, "up"]);
        ipn(&br, &["link", "set", &port, "master", "br0"]);
        ipn(&br, &["link", "set", &port, "up"]);
        addr
    }

    /// Cuts `lab`'s proxy off etcd (its etcd link goes down); [`Etcd::reconnect`] undoes it.
    pub fn disconnect(lab: &Lab) {
        lab.exec_ok(Ns::Proxy, &["ip", "link", "set", PROXY_ETCD_IFACE, "down"]);
    }

    pub fn reconnect(lab: &Lab) {
        lab.exec_ok(Ns::Proxy, &["ip", "link", "set", PROXY_ETCD_IFACE, "up"]);
    }

    /// The etcd logs, for a failing test's message.
    #[must_use]
    pub fn logs(&self) -> String {
        let mut all = String::new();
        if let Ok(dir) = std::fs::read_dir(&self.work_dir) {
            for entry in dir.flatten() {
                if entry.path().extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(20).collect();
                    let _ = writeln!(all, "== {}", entry.path().display());
                    for line in tail.into_iter().rev() {
                        all.push_str(line);
                        all.push('\n');
                    }
                }
            }
        }
        all
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // A test that failed while etcd was paused or slowed: continue it before the kill.
        self.unslow();
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        for ns in self
            .nodes
            .iter()
            .map(|n| n.ns.clone())
            .chain([self.bridge_ns()])
        {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.work_dir);
        }
    }
}
