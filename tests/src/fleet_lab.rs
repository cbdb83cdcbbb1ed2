//! A fleet in front of one database (issue 10, docs/fleet.md): a 3-node etcd cluster, two real
//! `PostgreSQL` servers with logical replication, and N proxy hosts in front of those same two
//! servers, each with its own clients and VIP, all joined to etcd.
//!
//! ```text
//!  proxies[0]  Lab::new: cli ── prx ── src, tgt     (the servers' own lab: it owns the servers,
//!                                                     and replication between them routes
//!                                                     through its proxy)
//!  proxies[k]  Lab::new_sharing_servers(.., k): cli ── prx ── links of its own into src, tgt
//!  every prx   joined to the etcd segment (198.19.0.0/24), member `proxy-<i>` of fleet `lab`
//! ```
//!
//! Every proxy is started with the same `--source`/`--target` and DSNs, as hosts in front of
//! one database are; the servers tell the proxies apart by their SNAT addresses.

use std::{collections::HashSet, ops::Range, thread::JoinHandle, time::Duration};

use crate::{
    Lab, Ns, VIP, cutover_lab,
    fleet::Etcd,
    pg::{self, Pg},
    require_root, wait_for, workload,
};

/// The fleet's name in every lab fleet.
pub const FLEET: &str = "lab";
/// How many writers the workload runs behind each proxy: one of each shape.
pub const WRITERS_PER_PROXY: i32 = 4;

/// Three etcd nodes, two servers, and the proxies in front of them (see the module docs).
pub struct FleetLab {
    /// `proxy-0` first. `proxies[0]` is the servers' own lab; the others share its servers.
    pub proxies: Vec<Lab>,
    pub source: Pg,
    pub target: Pg,
    pub etcd: Etcd,
}

impl FleetLab {
    /// Builds etcd, the servers (logical replication source → target, the workload's schema on
    /// both) and `n` proxies joined to etcd. No controller runs yet: see
    /// [`FleetLab::start_members`].
    #[must_use]
    pub fn new(name: &str, n: usize) -> Self {
        require_root();
        assert!(
            (1..=100).contains(&n),
            "a lab fleet has 1 to 100 proxies, not {n}"
        );
        let mut etcd = Etcd::new(name);
        let mut servers = Lab::new(name);
        let source = pg::start(&mut servers, Ns::Source, "source", &[]);
        let target = pg::start(&mut servers, Ns::Target, "target", &[]);
        pg::setup_logical(&servers, &source, &target);
        let mut proxies = vec![servers];
        for k in 1..n {
            let k = u8::try_from(k).expect("at most 100 proxies");
            proxies.push(Lab::new_sharing_servers(name, &proxies[0], k));
        }
        for lab in &proxies {
            etcd.join(lab);
        }
        Self {
            proxies,
            source,
            target,
            etcd,
        }
    }

    /// The lab that owns the servers (and is also proxy 0): run server-side commands here.
    #[must_use]
    pub fn servers(&self) -> &Lab {
        &self.proxies[0]
    }

    /// Proxy `i`'s member id.
    #[must_use]
    pub fn member_id(i: usize) -> String {
        format!("proxy-{i}")
    }

    /// Every member's id, in order.
    #[must_use]
    pub fn member_ids(&self) -> Vec<String> {
        (0..self.proxies.len()).map(Self::member_id).collect()
    }

    /// The `run` flags that make proxy `i` a member of this fleet.
    #[must_use]
    pub fn fleet_flags(&self, i: usize) -> Vec<String> {
        vec![
            "--etcd".to_owned(),
            self.etcd.endpoints(),
            "--fleet".to_owned(),
            FLEET.to_owned(),
            "--fleet-member".to_owned(),
            Self::member_id(i),
        ]
    }

    /// Starts (or restarts) proxy `i`'s controller as a fleet member, with both databases (as
    /// the README's `run` line) and `extra` flags; returns its pid once it is ready.
    pub fn start_member(&mut self, i: usize, extra: &[&str]) -> u32 {
        let mut flags = self.fleet_flags(i);
        flags.extend(extra.iter().map(|s| (*s).to_owned()));
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        cutover_lab::start(&mut self.proxies[i], &flags)
    }

    /// Starts every proxy's controller, one after the other (the first founds the fleet and
    /// prepares the barrier table alone), and waits until each lists every member.
    pub fn start_members(&mut self, extra: &[&str]) -> Vec<u32> {
        let pids = (0..self.proxies.len())
            .map(|i| self.start_member(i, extra))
            .collect();
        let mut all = self.member_ids();
        all.sort();
        for lab in &self.proxies {
            wait_for(Duration::from_secs(10), "every member to be listed", || {
                members(lab) == all
            });
        }
        pids
    }

    /// Sends `signal` to proxy `i`'s latest controller (`libc::SIGKILL` as a crash,
    /// `libc::SIGTERM` as a clean stop that leaves the fleet at once) and reaps it; its pinned
    /// datapath stays. [`FleetLab::start_member`] restarts it.
    pub fn stop_member(&mut self, i: usize, signal: i32) {
        let lab = &mut self.proxies[i];
        let pid = lab
            .redirect_pid()
            .unwrap_or_else(|| panic!("{} has no controller to stop", Self::member_id(i)));
        lab.signal(pid, signal);
    }

    /// The writer ids of the workload behind proxy `i`: disjoint per proxy, one of each shape.
    #[must_use]
    pub fn writers(i: usize) -> Range<i32> {
        let first = i32::try_from(i).expect("a proxy index") * 100;
        first..first + WRITERS_PER_PROXY
    }

    /// The ledger workload behind every proxy at once, for `secs`: join each handle (in proxy
    /// order) for its verdict.
    #[must_use]
    pub fn workload(&self, secs: u64) -> Vec<JoinHandle<workload::Verdict>> {
        self.workload_round(0, secs)
    }

    /// [`FleetLab::workload`] for a later round of the same test: its writers are new ids
    /// (a writer's `seq` restarts at 1, so reusing an id would collide with its own rows).
    #[must_use]
    pub fn workload_round(&self, round: i32, secs: u64) -> Vec<JoinHandle<workload::Verdict>> {
        self.proxies
            .iter()
            .enumerate()
            .map(|(i, lab)| {
                let w = Self::writers(i);
                let shift = round * 10;
                cutover_lab::workload(lab, w.start + shift..w.end + shift, secs)
            })
            .collect()
    }

    /// The server in `ns` ([`Ns::Source`] or [`Ns::Target`]).
    #[must_use]
    pub fn server(&self, ns: Ns) -> &Pg {
        match ns {
            Ns::Source => &self.source,
            Ns::Target => &self.target,
            other => panic!("{other:?} holds no server"),
        }
    }

    /// Runs SQL on the server in `ns` with psql; returns the unaligned output.
    pub fn psql(&self, ns: Ns, sql: &str) -> String {
        pg::psql(self.servers(), ns, self.server(ns), sql)
    }

    /// Joins the workload behind every proxy and asserts that every write each saw
    /// acknowledged is on the server in `ns` (a fault may refuse or fail writes while it
    /// lasts; none acknowledged may be lost). The verdicts, for further checks.
    pub fn assert_acked_writes_kept(
        &self,
        load: Vec<JoinHandle<workload::Verdict>>,
        ns: Ns,
    ) -> Vec<workload::Verdict> {
        let verdicts: Vec<workload::Verdict> = load
            .into_iter()
            .map(|h| h.join().expect("workload"))
            .collect();
        let rows = self.rows(ns, "");
        for (i, v) in verdicts.iter().enumerate() {
            let lost: Vec<_> = v.acked().filter(|a| !rows.contains(a)).collect();
            assert!(lost.is_empty(), "proxy-{i} lost {lost:?}");
        }
        verdicts
    }

    /// The workload's `(writer, seq)` rows on the server in `ns` (`filter`: a WHERE clause or
    /// empty).
    #[must_use]
    pub fn rows(&self, ns: Ns, filter: &str) -> HashSet<(i32, i64)> {
        pg::acked_rows(self.servers(), ns, self.server(ns), filter)
    }
}

impl Drop for FleetLab {
    /// The sharing proxies go first (their links end in the servers' namespaces), then the
    /// servers' lab, then etcd, so every member leaves while etcd still answers.
    fn drop(&mut self) {
        while self.proxies.len() > 1 {
            self.proxies.pop();
        }
    }
}

/// The member ids `status --json` on `lab` lists, sorted.
#[must_use]
pub fn members(lab: &Lab) -> Vec<String> {
    let status = lab.status();
    let mut ids: Vec<String> = status["fleet"]["members"]
        .as_array()
        .unwrap_or_else(|| panic!("status shows no fleet members: {status:#}"))
        .iter()
        .map(|m| m["id"].as_str().expect("a member id").to_owned())
        .collect();
    ids.sort();
    ids
}

/// Which server a new connection through `lab`'s VIP reaches (its `cluster_name`).
#[must_use]
pub fn new_connection_lands_on(lab: &Lab) -> String {
    lab.in_ns(Ns::Client, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async { pg::cluster_name(&pg::connect(VIP).await).await })
    })
}
