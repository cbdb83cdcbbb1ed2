//! `cargo xtask bench --zero-hop [--quick]`: socket mode (zero-hop) against direct, side by
//! side in one lab and one run, interleaved round by round (the order alternating), so
//! machine noise hits both alike. Writes docs/benchmarks-zero-hop.md. Every number comes
//! from this run:
//! - `pgbench -S` at 1, 8 and 32 clients and `-C` (connect per transaction) at 8, through
//!   the VIP (the hooks rewrite `connect()` to the source) and to the source itself;
//! - the hooks' own time (`kernel.bpf_stats_enabled`): per `connect()` and per
//!   `getpeername()`, and how often a program ran on the uplink during the pgbench rounds
//!   (its hooks are armed for cutovers only: never, between them);
//! - `connect()` latency through the VIP and direct, interleaved in blocks;
//! - the write pause of zero-hop cutovers next to proxy cutovers, alternating.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss,
    reason = "a measurement report: counts and percentiles become floats and back"
)]
#![allow(
    clippy::too_many_lines,
    reason = "a measurement run reads top to bottom as one story, like a lab scenario"
)]

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use redirect_tests::{
    APP_VIP, Lab, Ns, PG_PORT, SOURCE_ADDR, cutover_lab, percentile,
    pg::{self},
    pgbench::{self, Sample, Scenario},
    require_root,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Direct,
    ZeroHop,
}

impl Path {
    fn host(self) -> &'static str {
        match self {
            Self::Direct => SOURCE_ADDR,
            Self::ZeroHop => APP_VIP,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct (to the source's address)",
            Self::ZeroHop => "zero-hop (to the VIP, socket mode)",
        }
    }
}

fn median(v: &[f64]) -> f64 {
    percentile(v, 0.5)
}

/// (run time ns, runs) of the loaded program named `name` (`bpftool prog show`).
fn prog_stats(name: &str) -> (f64, f64) {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("bpftool");
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    progs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == name)
        .map(|p| {
            (
                p["run_time_ns"].as_f64().unwrap_or(0.0),
                p["run_cnt"].as_f64().unwrap_or(0.0),
            )
        })
        .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
}

/// `n` `connect()`s to `host`:5432 from the client namespace, each closed at once; their
/// latencies in µs.
fn connects(lab: &Lab, host: &'static str, n: usize) -> Vec<f64> {
    lab.in_ns(Ns::Client, move || {
        let addr: std::net::SocketAddr = format!("{host}:{PG_PORT}").parse().unwrap();
        (0..n)
            .map(|_| {
                let t = Instant::now();
                let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                    .expect("connect");
                let us = t.elapsed().as_secs_f64() * 1e6;
                drop(s);
                us
            })
            .collect()
    })
}

struct Row {
    scenario: Scenario,
    direct: Vec<Sample>,
    zero_hop: Vec<Sample>,
}

fn main() {
    require_root();
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, secs, cutovers) = if quick { (1, 3, 1) } else { (3, 10, 3) };
    let started = Instant::now();

    // The application host, its source server, and the hooks (no databases: no cutover here).
    let mut lab = Lab::new_app_host("zhb");
    let source = pg::start(&mut lab, Ns::Source, "source", &[]);
    let _target = pg::start(&mut lab, Ns::Target, "target", &[]);
    lab.exec_ok(
        Ns::Source,
        &[
            &format!("{}/pgbench", pg::PG_BIN),
            "-i",
            "-q",
            "-s",
            "10",
            "-h",
            &source.data_dir.display().to_string(),
            "-U",
            "postgres",
            "postgres",
        ],
    );
    lab.start_redirect(&[]);
    let _ = std::process::Command::new("sysctl")
        .args(["-qw", "kernel.bpf_stats_enabled=1"])
        .output();

    let scenarios = [
        Scenario {
            clients: 1,
            connect_per_tx: false,
        },
        Scenario {
            clients: 8,
            connect_per_tx: false,
        },
        Scenario {
            clients: 32,
            connect_per_tx: false,
        },
        Scenario {
            clients: 8,
            connect_per_tx: true,
        },
    ];
    let mut rows: Vec<Row> = scenarios
        .iter()
        .map(|&scenario| Row {
            scenario,
            direct: Vec::new(),
            zero_hop: Vec::new(),
        })
        .collect();
    // Per packet and per call: measured over the pgbench rounds (direct and zero-hop alike
    // pass the uplink's hooks).
    let before: Vec<(f64, f64)> = ["socket_egress", "socket_ingress", "getpeername4"]
        .iter()
        .map(|n| prog_stats(n))
        .collect();
    for round in 0..rounds {
        for row in &mut rows {
            let order = if round % 2 == 0 {
                [Path::Direct, Path::ZeroHop]
            } else {
                [Path::ZeroHop, Path::Direct]
            };
            for path in order {
                let tag = format!(
                    "{round}-{}-{:?}",
                    row.scenario.name().replace(' ', ""),
                    path
                );
                eprintln!("round {round}: {} via {}", row.scenario.name(), path.name());
                let sample = pgbench::run(&lab, Ns::Client, path.host(), row.scenario, secs, &tag);
                match path {
                    Path::Direct => row.direct.push(sample),
                    Path::ZeroHop => row.zero_hop.push(sample),
                }
            }
        }
    }
    let after: Vec<(f64, f64)> = ["socket_egress", "socket_ingress", "getpeername4"]
        .iter()
        .map(|n| prog_stats(n))
        .collect();

    // connect(): the hook's own time, and the latency a client sees, interleaved in blocks.
    let connect_before = prog_stats("connect4");
    let (mut direct_connect, mut hooked_connect) = (Vec::new(), Vec::new());
    let blocks = if quick { 5 } else { 20 };
    for b in 0..blocks {
        if b % 2 == 0 {
            direct_connect.extend(connects(&lab, SOURCE_ADDR, 100));
            hooked_connect.extend(connects(&lab, APP_VIP, 100));
        } else {
            hooked_connect.extend(connects(&lab, APP_VIP, 100));
            direct_connect.extend(connects(&lab, SOURCE_ADDR, 100));
        }
    }
    let connect_after = prog_stats("connect4");
    let hook_ns = |b: (f64, f64), a: (f64, f64)| {
        if a.1 > b.1 {
            (a.0 - b.0) / (a.1 - b.1)
        } else {
            f64::NAN
        }
    };
    let connect_ns = hook_ns(connect_before, connect_after);
    let getpeername_ns = hook_ns(before[2], after[2]);
    let uplink_runs = (after[0].1 - before[0].1) + (after[1].1 - before[1].1);
    drop(lab);

    // Write pauses: zero-hop cutovers and proxy cutovers, alternating.
    let app = cutover_lab::setup_app_host("zhc", &[]);
    let proxy = cutover_lab::setup("zhp", &[]);
    let (mut socket_pauses, mut proxy_pauses) = (Vec::new(), Vec::new());
    for i in 0..cutovers {
        let order = if i % 2 == 0 {
            [("socket", &app), ("proxy", &proxy)]
        } else {
            [("proxy", &proxy), ("socket", &app)]
        };
        for (mode, c) in order {
            // New writer ids each time: a writer's seq restarts at 1.
            let first = i * 20;
            let load = cutover_lab::workload(&c.lab, first..first + 4, 7);
            std::thread::sleep(Duration::from_secs(2));
            let out = cutover_lab::flip(
                &c.lab,
                &["--to", "target", "--drain-timeout", "1s", "--json"],
            );
            assert!(
                out.status.success(),
                "{mode} cutover failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let report: redirect::cutover::FlipReport =
                serde_json::from_slice(&out.stdout).expect("flip --json");
            let v = load.join().expect("workload");
            let on = pg::acked_rows(&c.lab, Ns::Target, &c.target, "");
            cutover_lab::assert_no_loss_through_a_cutover(&v, &on, "target");
            eprintln!(
                "{mode} cutover {i}: write pause {:.1} ms",
                report.write_pause_ms
            );
            if mode == "socket" {
                socket_pauses.push(report.write_pause_ms);
            } else {
                proxy_pauses.push(report.write_pause_ms);
            }
            let back = cutover_lab::flip(&c.lab, &["--to", "source", "--drain-timeout", "1s"]);
            assert!(
                back.status.success(),
                "{mode} rollback failed: {}",
                String::from_utf8_lossy(&back.stderr)
            );
        }
    }

    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Benchmarks: zero-hop (socket mode) against direct\n\n\
         Written by `cargo xtask bench --zero-hop{}` ({} rounds of {secs} s per path and \
         scenario, interleaved, the order alternating each round; {:.0} s in all). One \
         application-host lab: pgbench runs in the client namespace, inside the cgroup the \
         hooks are attached to; *direct* connects to the source's own address, *zero-hop* to \
         the VIP, which `connect()` rewrites to the source, so both take the same packet \
         path. Machine: 2 cores shared by every namespace; compare the columns with each \
         other, not with NIC figures.\n",
        if quick { " --quick" } else { "" },
        rounds,
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(
        md,
        "| scenario | direct TPS | zero-hop TPS | ratio | direct p50 | zero-hop p50 | ratio | direct p99 | zero-hop p99 |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for row in &rows {
        let tps = |v: &[Sample]| median(&v.iter().map(|s| s.tps).collect::<Vec<_>>());
        let lat = |v: &[Sample], p: f64| {
            let all: Vec<f64> = v.iter().flat_map(|s| s.lat_us.iter().copied()).collect();
            percentile(&all, p)
        };
        let (dt, zt) = (tps(&row.direct), tps(&row.zero_hop));
        let (dp, zp) = (lat(&row.direct, 0.5), lat(&row.zero_hop, 0.5));
        let _ = writeln!(
            md,
            "| {} | {dt:.0} | {zt:.0} | {:.3}x | {dp:.0} µs | {zp:.0} µs | {:.3}x | {:.0} µs | {:.0} µs |",
            row.scenario.name(),
            zt / dt,
            zp / dp,
            lat(&row.direct, 0.99),
            lat(&row.zero_hop, 0.99)
        );
    }
    let (dc, hc) = (median(&direct_connect), median(&hooked_connect));
    let _ = writeln!(
        md,
        "\n## connect() and the hooks' own time\n\n\
         | measure | value |\n|---|---:|\n\
         | connect4 hook, per `connect()` (bpf_stats) | {connect_ns:.0} ns |\n\
         | getpeername4 hook, per call | {getpeername_ns:.0} ns |\n\
         | runs of the uplink's hooks during the pgbench rounds (armed for cutovers only) | {uplink_runs:.0} |\n\
         | connect() latency, direct, median of {} | {dc:.1} µs |\n\
         | connect() latency, through the VIP, median of {} | {hc:.1} µs |\n\
         | added per connect() (median difference) | {:.2} µs |\n",
        direct_connect.len(),
        hooked_connect.len(),
        hc - dc
    );
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|p| format!("{p:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        md,
        "## Write pause of a cutover\n\n\
         {cutovers} cutover(s) to the target in each mode, alternating, each under 4 writers \
         and rolled back before the next; 0 acknowledged writes lost in every one.\n\n\
         | mode | write pause (ms), each run | median |\n|---|---|---:|\n\
         | zero-hop (socket mode) | {} | {:.1} ms |\n\
         | proxy (TC on the proxy host) | {} | {:.1} ms |\n",
        fmt(&socket_pauses),
        median(&socket_pauses),
        fmt(&proxy_pauses),
        median(&proxy_pauses),
    );
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks-zero-hop.md");
    std::fs::write(&path, &md).expect("writing docs/benchmarks-zero-hop.md");
    println!("{md}");
    eprintln!("wrote {}", path.display());
}
