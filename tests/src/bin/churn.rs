//! `cargo xtask churn [--quick]`: sustained connection churn through the VIP with the default
//! settings and the controller's GC running. Two phases, each 3 minutes (30 s with --quick):
//! 1. TCP CRR (connect, 64-byte round trip, close) against an echo server on the source, as
//!    fast as the lab's client threads go;
//! 2. `pgbench -C -S` (a new `PostgreSQL` connection per transaction) against the target.
//!
//! It counts failed connects, SYNs dropped for lack of a SNAT port and the ports claimed over
//! time, and measures who closed first. Writes docs/churn.md and docs/churn-ports.svg.

#![allow(
    clippy::cast_precision_loss,
    reason = "a measurement report: counts become floats"
)]
#![allow(
    clippy::too_many_lines,
    reason = "a measurement run reads top to bottom as one story, like a lab scenario"
)]

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    path::PathBuf,
    time::{Duration, Instant},
};

use redirect_tests::{
    Lab, Ns, VIP,
    churn::{self, ChurnRun, Sample},
    pg::{self, PG_BIN},
    plot::svg_lines,
    require_root,
};

/// The controller's `/metrics`, fetched from inside the proxy namespace.
fn metrics(lab: &Lab) -> String {
    lab.in_ns(Ns::Proxy, || {
        let mut s = std::net::TcpStream::connect("127.0.0.1:9187").expect("metrics endpoint");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    })
}

/// `redirect_conntrack_forgotten_total{how="..."}` values.
fn forgotten(m: &str) -> Vec<(String, u64)> {
    m.lines()
        .filter_map(|l| l.strip_prefix("redirect_conntrack_forgotten_total{how=\""))
        .filter_map(|r| {
            let (how, v) = r.split_once("\"} ")?;
            Some((how.to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

/// `pgbench -C -S` against the VIP for `secs`, sampling the proxy every second.
fn pgbench_churn(lab: &Lab, secs: u64) -> (ChurnRun, String) {
    let started = Instant::now();
    let mut samples = vec![churn::sample(lab, "target", 0.0, 0.0)];
    let log = lab.work_dir.join("pgbench-churn.log");
    let out_file = std::fs::File::create(&log).expect("pgbench log");
    let mut child = lab
        .cmd(Ns::Client, &[&format!("{PG_BIN}/pgbench")])
        .args([
            "-h", VIP, "-p", "5432", "-U", "postgres", "-n", "-S", "-C", "-c", "8", "-j", "2", "-T",
        ])
        .arg(secs.to_string())
        .arg("postgres")
        .stdout(out_file.try_clone().unwrap())
        .stderr(out_file)
        .spawn()
        .expect("pgbench");
    let mut last = (Instant::now(), 0u64);
    let deadline = Instant::now() + Duration::from_secs(secs + 60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("pgbench status") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().expect("pgbench reaped");
        }
        std::thread::sleep(Duration::from_secs(1));
        let mut s = churn::sample(lab, "target", started.elapsed().as_secs_f64(), 0.0);
        let opened = lab.status()["stats"]["new_conn_target"]
            .as_u64()
            .unwrap_or(0);
        if last.1 > 0 {
            s.conns_per_s = (opened - last.1) as f64 / last.0.elapsed().as_secs_f64();
        }
        last = (Instant::now(), opened);
        samples.push(s);
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let connections = field("number of transactions actually processed:");
    // Failed connects abort a pgbench client ("connection to server ... failed"); failed
    // transactions are counted separately by pgbench 15.
    let failed = field("number of failed transactions:")
        + text.matches("connection to server").count() as u64
        + u64::from(!status.success());
    let elapsed = started.elapsed();
    samples.push(churn::sample(lab, "target", elapsed.as_secs_f64(), 0.0));
    (
        ChurnRun {
            connections,
            failed,
            elapsed: Duration::from_secs(secs),
            samples,
        },
        text,
    )
}

fn row(name: &str, r: &ChurnRun) -> String {
    let capacity = r.samples.first().map_or(0, |s| s.ports_capacity).max(1);
    format!(
        "| {name} | {:.0} s | {} | {:.0} | {} | {} | {} ({:.1}%) |",
        r.elapsed.as_secs_f64(),
        r.connections,
        r.per_s(),
        r.failed,
        r.exhausted(),
        r.max_claimed(),
        r.max_claimed() as f64 * 100.0 / capacity as f64,
    )
}

fn series(name: &str, samples: &[Sample], f: fn(&Sample) -> f64) -> (String, Vec<(f64, f64)>) {
    (
        name.to_owned(),
        samples.iter().map(|s| (s.at_s, f(s))).collect(),
    )
}

fn main() {
    require_root();
    let quick = std::env::args().any(|a| a == "--quick");
    let secs: u64 = if quick { 30 } else { 180 };
    let out_dir = PathBuf::from(std::env::var("BENCH_OUT").unwrap_or_else(|_| "docs".into()));
    std::fs::create_dir_all(&out_dir).unwrap();

    eprintln!(
        "== lab: echo server on the source, PostgreSQL on the target, redirect with defaults"
    );
    let mut lab = Lab::new("churn");
    let target = pg::start(&mut lab, Ns::Target, "target", &["max_connections = 200"]);
    let data = target.data_dir.display().to_string();
    lab.exec_ok(
        Ns::Target,
        &[
            &format!("{PG_BIN}/pgbench"),
            "-i",
            "-s",
            "1",
            "-q",
            "-h",
            &data,
            "-U",
            "postgres",
            "postgres",
        ],
    );
    churn::tune_client(&lab);
    let _echo = churn::EchoServer::start(&lab, Ns::Source, 4, Duration::from_secs(secs + 120));
    lab.start_redirect(&[]);

    eprintln!("== phase 1: TCP CRR for {secs} s (4 client threads, client closes first)");
    let start_stats = lab.status()["stats"].clone();
    let crr = churn::crr(&lab, 4, Duration::from_secs(secs), u64::MAX);
    eprintln!("{}", row("TCP CRR", &crr));
    let crr_stats = lab.status()["stats"].clone();

    lab.redirect_ok(&["flip", "--to", "target", "--immediate"]);
    eprintln!("== phase 2: pgbench -C -S -c 8 for {secs} s against PostgreSQL on the target");
    let (pgb, pgb_text) = pgbench_churn(&lab, secs);
    eprintln!("{}", row("pgbench -C", &pgb));
    let pgb_stats = lab.status()["stats"].clone();
    let delta = |a: &serde_json::Value, b: &serde_json::Value, name: &str| {
        b[name].as_u64().unwrap_or(0) - a[name].as_u64().unwrap_or(0)
    };
    std::thread::sleep(Duration::from_secs(4));
    let gc = forgotten(&metrics(&lab));
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## Sustained connection churn\n\nReproduce: `cargo xtask churn` (3 minutes per phase; `--quick` runs 30 s each). Written by `tests/src/bin/churn.rs`; every number is from this run. `redirect run` with its defaults (20,000 SNAT ports per backend, GC running); the client namespace has `net.ipv4.tcp_tw_reuse=1` and a wide ephemeral range, as a host that opens thousands of connections per second needs (without them the client runs out of its own ports near 470/s).\n"
    );
    let _ = writeln!(
        md,
        "| load | duration | connections | per second | failed connects | SYNs without a SNAT port | most SNAT ports claimed |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    let _ = writeln!(md, "{}", row("TCP CRR, 4 threads, 64-byte echo", &crr));
    let _ = writeln!(md, "{}", row("`pgbench -C -S -c 8`", &pgb));
    let _ = writeln!(
        md,
        "\nPorts claimed stay near the number of open connections: a connection that closes without the backend holding `TIME_WAIT` (the client closed first, or a RST) frees its port in the datapath the moment it closes. Only a backend that closed first leaves its port quarantined for `--port-quarantine`.\n"
    );
    let _ = writeln!(
        md,
        "### Who closed first (measured, not assumed)\n\nThe datapath's close counters during each phase:\n\n| counter | TCP CRR | pgbench -C (PostgreSQL) |\n|---|---:|---:|"
    );
    for name in [
        "closed_client_first",
        "closed_backend_first",
        "closed_by_reset",
        "port_released",
        "conn_reopened",
        "snat_exhausted",
        "ct_full",
        "nonsyn_miss",
        "reply_orphan",
        "rst_out_of_window",
    ] {
        let _ = writeln!(
            md,
            "| `{name}` | {} | {} |",
            delta(&start_stats, &crr_stats, name),
            delta(&crr_stats, &pgb_stats, name)
        );
    }
    let _ = writeln!(
        md,
        "\nThe GC's tally over the whole run (`redirect_conntrack_forgotten_total`; a connection whose client port was reused before the GC saw it is counted as `conn_reopened` above instead): {}.",
        gc.iter()
            .map(|(how, n)| format!("{how} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        md,
        "\n![SNAT ports claimed over time](churn-ports.svg)\n\n<details><summary>pgbench output</summary>\n\n```\n{}\n```\n</details>",
        pgb_text.trim()
    );
    let svg = svg_lines(
        "SNAT ports claimed and new connections/s under sustained churn",
        "seconds",
        "count",
        &[
            series("CRR: ports claimed", &crr.samples, |s| {
                s.ports_claimed as f64
            }),
            series("CRR: connections/s", &crr.samples, |s| s.conns_per_s),
            series("pgbench -C: ports claimed", &pgb.samples, |s| {
                s.ports_claimed as f64
            }),
            series("pgbench -C: connections/s", &pgb.samples, |s| s.conns_per_s),
        ],
    );
    std::fs::write(out_dir.join("churn-ports.svg"), svg).unwrap();
    std::fs::write(out_dir.join("churn.md"), &md).unwrap();
    println!("{md}");
    let bad = crr.failed + crr.exhausted() + pgb.failed + pgb.exhausted();
    assert_eq!(bad, 0, "failed connects or SYNs without a port: see above");
}
