//! `cargo xtask bench --databases`: the write pause of a safe cutover that covers 1, 2 and 5
//! databases of the same servers, side by side. One lab holds five replicated databases; the
//! controller is restarted with `--databases` naming the first 1, 2 or all 5, and the three
//! are interleaved (1, 2, 5, then 2, 5, 1, ...), each a cutover and a rollback under the ledger
//! workload in the first database and in the last one it covers, each checked for loss. Writes
//! docs/benchmarks-databases.md. `databases_bench N` runs N rounds (default 5).

use std::{fmt::Write as _, time::Duration};

use redirect_tests::{
    Lab, Ns, VIP,
    cutover_lab::{self, flip},
    percentile,
    pg::{self, Pg},
    require_root,
};

const DATABASES: [&str; 5] = ["postgres", "db2", "db3", "db4", "db5"];
const SIZES: [usize; 3] = [1, 2, 5];

#[derive(Default)]
struct Samples {
    write_pause_ms: Vec<f64>,
    barrier_ms: Vec<f64>,
    hold_ms: Vec<f64>,
    acked: usize,
    lost: usize,
    failed: Vec<String>,
}

/// Restarts the controller covering the first `n` databases.
fn controller_for(lab: &mut Lab, n: usize) {
    if let Some(pid) = lab.redirect_pid() {
        // Waits for it to exit (a SIGTERMed controller finishes what it was doing).
        lab.signal(pid, libc::SIGTERM);
    }
    let mut flags = pg::controller_flags();
    if n < DATABASES.len() {
        flags.push("--databases".into());
        flags.push(DATABASES[..n].join(","));
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    lab.start_redirect(&flags);
}

/// Waits, as an operator would, until every covered database's replication is healthy (a
/// subscription enabled after a flip takes a few seconds to start its apply worker).
fn healthy(lab: &Lab) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        let out = lab.redirect(&["lag", "--json"]);
        if serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .is_ok_and(|l| l["healthy"] == true)
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    false
}

/// One flip to `to` under the workload in the first and the last covered database.
fn cutover(lab: &Lab, servers: (&Pg, &Pg), n: usize, to: &str, round: i32, s: &mut Samples) {
    if !healthy(lab) {
        s.failed.push(format!(
            "replication not healthy within 30 s before the flip to the {to}: {}",
            lab.redirect_ok(&["lag"]).trim()
        ));
        return;
    }
    let dbs = if n == 1 {
        vec![DATABASES[0]]
    } else {
        vec![DATABASES[0], DATABASES[n - 1]]
    };
    let loads: Vec<_> = dbs
        .iter()
        .enumerate()
        .map(|(i, db)| {
            let dsn = pg::dsn_in(VIP, db);
            let base = round * 1000
                + i32::try_from(i).unwrap() * 100
                + if to == "target" { 0 } else { 50 };
            let h = cutover_lab::workload_with(lab, dsn, base..base + 3, 5);
            (*db, h)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let out = flip(lab, &["--to", to, "--drain-timeout", "1s", "--json"]);
    let (ns, on) = if to == "target" {
        (Ns::Target, servers.1)
    } else {
        (Ns::Source, servers.0)
    };
    for (db, h) in loads {
        let v = h.join().expect("workload");
        let rows = pg::acked_rows_in(lab, ns, on, db, "");
        let acked: Vec<_> = v.acked().collect();
        s.acked += acked.len();
        if out.status.success() {
            s.lost += acked.iter().filter(|a| !rows.contains(a)).count();
        }
    }
    if !out.status.success() {
        s.failed
            .push(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        return;
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("flip --json");
    let f = |k: &str| report[k].as_f64().unwrap_or(f64::NAN);
    s.write_pause_ms.push(f("write_pause_ms"));
    s.barrier_ms.push(f("barrier_ms"));
    s.hold_ms.push(f("hold_ms"));
}

fn main() {
    require_root();
    let rounds: i32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    // `databases_bench N 17`: both servers PostgreSQL 17, where the reverse slots are made
    // before the hold (origin = none) and the pause holds only the stops.
    let major = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .map_or(pg::Major::DEBIAN, pg::Major);
    let t0 = std::time::Instant::now();
    let mut lab = Lab::new("dbb");
    // A subscription (forward, and reverse after a cutover) per database: more apply workers,
    // slots and walsenders than the lab's defaults.
    let conf = [
        "max_logical_replication_workers = 12",
        "max_worker_processes = 24",
        "max_replication_slots = 20",
        "max_wal_senders = 20",
    ];
    let source = pg::start_version(&mut lab, Ns::Source, "source", major, &conf);
    let target = pg::start_version(&mut lab, Ns::Target, "target", major, &conf);
    pg::setup_logical(&lab, &source, &target);
    for db in &DATABASES[1..] {
        pg::replicate_database(&lab, &source, &target, db);
    }
    let mut samples: Vec<Samples> = SIZES.iter().map(|_| Samples::default()).collect();
    for round in 0..rounds {
        // Interleaved, the order rotating each round: no size always runs first.
        for k in 0..SIZES.len() {
            let i = (k + usize::try_from(round).unwrap()) % SIZES.len();
            let n = SIZES[i];
            controller_for(&mut lab, n);
            eprintln!("round {round}: {n} database(s)");
            cutover(
                &lab,
                (&source, &target),
                n,
                "target",
                round,
                &mut samples[i],
            );
            std::thread::sleep(Duration::from_millis(500));
            cutover(
                &lab,
                (&source, &target),
                n,
                "source",
                round,
                &mut samples[i],
            );
        }
    }
    let base = percentile(&samples[0].write_pause_ms, 0.5);
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Write pause by number of databases\n\n\
         `cargo xtask bench --databases` (tests/src/bin/databases_bench.rs), {rounds} rounds, {:.0} s \
         in all, on a 2-core machine, PostgreSQL {} on both servers. One lab with five databases, each replicated by a \
         subscription of its own. The controller is restarted with `--databases` naming the first \
         1, 2 or 5; the three are interleaved, the order rotating each round. A round is a cutover \
         and a rollback for each, under the ledger workload in the first and the last database \
         covered. The write pause is from the fence to the flip, as the controller measures it; \
         the barrier (a marker in every database, side by side) is inside it.\n",
        t0.elapsed().as_secs_f64(),
        major.0
    );
    md.push_str("| databases | flips | write pause p50 | p90 | vs 1 database (p50) | barrier p50 | hold p50 | acked writes | lost | failed |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (n, s) in SIZES.iter().zip(&samples) {
        let p50 = percentile(&s.write_pause_ms, 0.5);
        let _ = writeln!(
            md,
            "| {n} | {} | {p50:.1} ms | {:.1} ms | {:+.1} ms | {:.1} ms | {:.1} ms | {} | {} | {} |",
            s.write_pause_ms.len(),
            percentile(&s.write_pause_ms, 0.9),
            p50 - base,
            percentile(&s.barrier_ms, 0.5),
            percentile(&s.hold_ms, 0.5),
            s.acked,
            s.lost,
            s.failed.len()
        );
    }
    for (n, s) in SIZES.iter().zip(&samples) {
        for f in &s.failed {
            let _ = writeln!(md, "\nA flip with {n} database(s) failed: {f}");
        }
    }
    print!("{md}");
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks-databases.md");
    std::fs::write(&path, &md).expect("writing the benchmark's doc");
    eprintln!("wrote {}", path.display());
    let lost: usize = samples.iter().map(|s| s.lost).sum();
    assert_eq!(lost, 0, "acknowledged writes were lost");
}
