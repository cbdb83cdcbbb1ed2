//! `pgbench -S` runs from a lab namespace, with every transaction's latency: what the
//! benchmarks compare paths by.

use crate::{Lab, Ns, pg::PG_BIN};

/// One pgbench scenario: `-S` (select-only) with this many clients, connecting per
/// transaction (`-C`) or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Scenario {
    pub clients: u32,
    pub connect_per_tx: bool,
}

impl Scenario {
    #[must_use]
    pub fn name(self) -> String {
        format!(
            "pgbench -S{} -c {}",
            if self.connect_per_tx { " -C" } else { "" },
            self.clients
        )
    }
}

/// What one run measured: transactions per second, and every transaction's latency (µs,
/// sorted).
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub tps: f64,
    pub lat_us: Vec<f64>,
}

/// Runs `s` for `secs` from `ns` against `host`:5432 (`tag` names its log directory).
///
/// # Panics
/// When pgbench fails: a benchmark of a broken path measures nothing.
#[must_use]
pub fn run(lab: &Lab, ns: Ns, host: &str, s: Scenario, secs: u64, tag: &str) -> Sample {
    let dir = lab.work_dir.join(format!("pgbench-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    let prefix = dir.join("log").display().to_string();
    let jobs = s.clients.min(2).to_string();
    let out = lab
        .cmd(ns, &[&format!("{PG_BIN}/pgbench")])
        .args([
            "-h",
            host,
            "-p",
            "5432",
            "-U",
            "postgres",
            "-n",
            "-S",
            "-c",
            &s.clients.to_string(),
            "-j",
            &jobs,
        ])
        .args(["-T", &secs.to_string(), "-l", "--log-prefix", &prefix])
        .args(if s.connect_per_tx { vec!["-C"] } else { vec![] })
        .arg("postgres")
        .output()
        .expect("pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench to {host} failed: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    let tps = text
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("tps = ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0.0);
    let mut lat_us = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let t = std::fs::read_to_string(e.path()).unwrap_or_default();
        lat_us.extend(
            t.lines()
                .filter_map(|l| l.split_whitespace().nth(2)?.parse::<f64>().ok()),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    lat_us.sort_by(f64::total_cmp);
    Sample { tps, lat_us }
}
