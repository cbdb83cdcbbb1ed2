//! The fault matrix: a cutover under a write load, with one fault injected at one step
//! boundary, and the outcome measured from the outside: did it finish or roll back, were
//! acknowledged writes lost, and how long did any client wait for an answer.
//!
//! The controller pauses at the chosen step (`REDIRECT_FAULT_PAUSE`, a fault point in the
//! cutover), the fault is injected during the pause, and a killed controller is restarted the
//! way systemd would restart it.

use std::{
    fmt::Write as _,
    process::Command,
    time::{Duration, Instant},
};

use crate::{
    Lab, Ns,
    pg::{self, psql},
    wait_for, workload,
};

/// The second database every case cuts over with the first.
pub const SECOND: &str = "app2";

/// What breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL of the controller, restarted a second later.
    Kill,
    /// SIGTERM of the controller (`systemctl restart`), restarted a second later.
    Term,
    /// The target's link goes down for 4 s.
    TargetDown,
    /// The source's link goes down for 4 s.
    SourceDown,
    /// The forward subscription is disabled.
    ReplicationStopped,
    /// A lock on the target's sequence for 8 s (blocks `setval`).
    TargetLock,
    /// The journal's file system is full from then on.
    JournalFull,
    /// A new database appears on the source (a table in it, nothing replicating it).
    DatabaseAppears,
    /// The second database's subscription is disabled (the first one's keeps going).
    OneDatabaseStopped,
}

impl Fault {
    pub const ALL: [Self; 9] = [
        Self::Kill,
        Self::Term,
        Self::TargetDown,
        Self::SourceDown,
        Self::ReplicationStopped,
        Self::TargetLock,
        Self::JournalFull,
        Self::DatabaseAppears,
        Self::OneDatabaseStopped,
    ];

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Kill => "SIGKILL controller",
            Self::Term => "SIGTERM controller",
            Self::TargetDown => "target link down 4 s",
            Self::SourceDown => "source link down 4 s",
            Self::ReplicationStopped => "replication stopped",
            Self::TargetLock => "sequence lock on target 8 s",
            Self::JournalFull => "journal disk full",
            Self::DatabaseAppears => "a database appears on the source",
            Self::OneDatabaseStopped => "one database's replication stopped",
        }
    }

    /// Whether the fault is an outage of a server itself (clients of that server wait for
    /// it whatever the proxy does).
    #[must_use]
    pub fn is_server_outage(self) -> bool {
        matches!(self, Self::TargetDown | Self::SourceDown)
    }
}

/// The step boundaries (the fault point is just before each).
pub const STEPS: [&str; 7] = [
    "fence",
    "barrier",
    "sequences",
    "reverse",
    "flip",
    "release",
    "drain",
];

/// What one case did.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub fault: Fault,
    pub step: &'static str,
    /// "finished" (new connections go to the target) or "rolled back" (to the source).
    pub result: &'static str,
    pub flip_succeeded: bool,
    pub acked: usize,
    pub lost: usize,
    pub refused: u64,
    pub max_wait: Duration,
    pub took: Duration,
}

/// Unmounts the journal's tmpfs even if the case panics.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

fn link(lab: &Lab, ns: Ns, up: bool, gw: &str) {
    lab.exec_ok(
        ns,
        &["ip", "link", "set", "eth0", if up { "up" } else { "down" }],
    );
    if up {
        lab.exec_ok(ns, &["ip", "route", "replace", "default", "via", gw]);
    }
}

/// Where the datapath runs in a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A proxy host in front of the clients (`Lab::new`).
    Proxy,
    /// Socket mode on the clients' own host (`Lab::new_app_host`).
    AppHost,
}

/// Runs one case in a lab of its own, with a proxy.
#[must_use]
pub fn run_case(fault: Fault, step: &'static str) -> Outcome {
    run_case_in(Mode::Proxy, fault, step)
}

/// Runs one case in a lab of its own, the datapath in `mode`.
#[must_use]
pub fn run_case_in(mode: Mode, fault: Fault, step: &'static str) -> Outcome {
    let t0 = Instant::now();
    let mut lab = match mode {
        Mode::Proxy => Lab::new("fm"),
        Mode::AppHost => Lab::new_app_host("fms"),
    };
    let vip = lab.vip();
    let source = pg::start(&mut lab, Ns::Source, "source", &[]);
    let target = pg::start(&mut lab, Ns::Target, "target", &[]);
    pg::setup_logical(&lab, &source, &target);
    // Every case cuts over two databases, each replicated on its own and written to: the
    // per-database steps (and a successor's undo of them) are under test at every boundary.
    pg::replicate_database(&lab, &source, &target, SECOND);
    let _mount = (fault == Fault::JournalFull).then(|| {
        let dir = lab.work_dir.join("jfs");
        std::fs::create_dir_all(&dir).unwrap();
        crate::sh(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
                .arg(&dir),
        );
        lab.journal = dir.join("journal.jsonl");
        Mount(dir)
    });
    let mut flags = pg::controller_flags();
    flags.extend(["--query-timeout".to_owned(), "2s".to_owned()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    lab.redirect_env = vec![
        ("REDIRECT_FAULT_PAUSE".into(), step.into()),
        ("REDIRECT_FAULT_PAUSE_MS".into(), "3000".into()),
    ];
    lab.start_redirect(&flags);
    let load = lab.spawn_in_ns(Ns::Client, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(workload::run(vip, 0..6, Duration::from_secs(18), 20))
    });
    let second_load =
        crate::cutover_lab::workload_with(&lab, pg::dsn_in(vip, SECOND), 100..102, 18);
    std::thread::sleep(Duration::from_millis(1500));
    let mut flip = lab.redirect_cmd();
    flip.args([
        "flip",
        "--to",
        "target",
        "--timeout",
        "10s",
        "--drain-timeout",
        "3s",
    ]);
    let flipper = std::thread::spawn(move || flip.output().expect("spawning redirect flip"));
    wait_for(Duration::from_secs(30), "the fault point", || {
        lab.last_redirect_log().contains("fault point")
    });
    // Faults are injected while the controller is paused just before `step`.
    let mut locker = None;
    match fault {
        Fault::Kill | Fault::Term => {
            let pid = lab.redirect_pid().expect("controller pid");
            let sig = if fault == Fault::Kill {
                libc::SIGKILL
            } else {
                libc::SIGTERM
            };
            lab.signal(pid, sig);
            std::thread::sleep(Duration::from_secs(1));
            lab.redirect_env.clear();
            lab.start_redirect(&flags);
        }
        Fault::TargetDown | Fault::SourceDown => {
            let (ns, gw) = if fault == Fault::TargetDown {
                (Ns::Target, "198.18.3.1")
            } else {
                (Ns::Source, "198.18.2.1")
            };
            link(&lab, ns, false, gw);
            std::thread::sleep(Duration::from_secs(4));
            link(&lab, ns, true, gw);
        }
        Fault::DatabaseAppears => {
            psql(&lab, Ns::Source, &source, "CREATE DATABASE appeared");
            pg::psql_in(
                &lab,
                Ns::Source,
                &source,
                "appeared",
                "CREATE TABLE t (i int PRIMARY KEY); INSERT INTO t VALUES (1)",
            );
        }
        Fault::OneDatabaseStopped => {
            pg::psql_in(
                &lab,
                Ns::Target,
                &target,
                SECOND,
                &format!("ALTER SUBSCRIPTION {SECOND}_sub DISABLE"),
            );
        }
        Fault::ReplicationStopped => {
            psql(
                &lab,
                Ns::Target,
                &target,
                "ALTER SUBSCRIPTION redirect_sub DISABLE",
            );
        }
        Fault::TargetLock => {
            locker = Some(pg::spawn_psql(
                &mut lab,
                Ns::Target,
                &target,
                "BEGIN; ALTER SEQUENCE acks_id_seq CACHE 1; SELECT pg_sleep(8); COMMIT",
                "locker.log",
            ));
        }
        Fault::JournalFull => {
            // Small appends land in the journal's last, already allocated page: pad it to a
            // page boundary first, so the very next append needs a page the full disk
            // cannot give (ENOSPC), as on a real full disk.
            use std::io::Write as _;
            let len = std::fs::metadata(&lab.journal).map_or(0, |m| m.len());
            let pad = usize::try_from((4096 - len % 4096) % 4096).unwrap_or(0);
            if pad > 0 {
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&lab.journal)
                    .expect("journal");
                let mut line = vec![b' '; pad - 1];
                line.push(b'\n');
                f.write_all(&line).expect("padding the journal");
            }
            let fill = lab.journal.with_file_name("fill");
            let _ = Command::new("dd")
                .arg("if=/dev/zero")
                .arg(format!("of={}", fill.display()))
                .args(["bs=4k", "count=1000"])
                .output();
        }
    }
    let out = flipper.join().expect("flip thread");
    // Whatever happened, the cutover ends: finished, undone, or recovered by a successor.
    wait_for(Duration::from_secs(60), "the controller to be idle", || {
        lab.status()["controller"]["phase"] == "idle"
    });
    let v = load.join().expect("workload");
    let v2 = second_load.join().expect("the second database's workload");
    if let Some(pid) = locker {
        lab.reap_exited();
        let _ = pid;
    }
    if v.max_wait().max(v2.max_wait()) > Duration::from_secs(8) {
        // What the slow client saw, and what the controllers and the datapath said: a case
        // that strands a client must say why.
        let errors: Vec<String> = v.errors().into_iter().chain(v2.errors()).collect();
        eprintln!(
            "a client waited {:?}; its errors: {:?}\nstatus: {}\nlast controller log:\n{}",
            v.max_wait().max(v2.max_wait()),
            &errors[errors.len().saturating_sub(12)..],
            lab.status(),
            lab.last_redirect_log()
                .lines()
                .filter(|l| !l.contains("tokio_postgres::connection"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let active = lab.status()["active"].as_str().unwrap_or("?").to_owned();
    let (ns, server) = if active == "target" {
        (Ns::Target, &target)
    } else {
        (Ns::Source, &source)
    };
    // Replication may need a moment to bring the last writes over after a rollback.
    std::thread::sleep(Duration::from_millis(500));
    let on = pg::acked_rows(&lab, ns, server, "");
    let on_second = pg::acked_rows_in(&lab, ns, server, SECOND, "");
    let acked: Vec<(i32, i64)> = v.acked().collect();
    let acked_second: Vec<(i32, i64)> = v2.acked().collect();
    let lost = acked.iter().filter(|a| !on.contains(a)).count()
        + acked_second
            .iter()
            .filter(|a| !on_second.contains(a))
            .count();
    Outcome {
        fault,
        step,
        result: if active == "target" {
            "finished"
        } else {
            "rolled back"
        },
        flip_succeeded: out.status.success(),
        acked: acked.len() + acked_second.len(),
        lost,
        refused: v.refused() + v2.refused(),
        max_wait: v.max_wait().max(v2.max_wait()),
        took: t0.elapsed(),
    }
}

/// Runs one case in `mode` and asserts the promise: writes were acknowledged, none lost, the
/// outcome `expect` (if given), and unless the fault is a server's own outage, no connect
/// refused and no client waiting 8 s or more.
///
/// # Panics
/// When the promise is broken.
pub fn check(mode: Mode, fault: Fault, step: &'static str, expect: Option<&str>) {
    let o = run_case_in(mode, fault, step);
    eprintln!("{mode:?}: {o:?}");
    assert!(o.acked > 0, "the workload wrote nothing: {o:?}");
    assert_eq!(o.lost, 0, "acknowledged writes lost: {o:?}");
    if let Some(want) = expect {
        assert_eq!(o.result, want, "{o:?}");
    }
    if !fault.is_server_outage() {
        assert_eq!(o.refused, 0, "refused connects: {o:?}");
        assert!(
            o.max_wait < Duration::from_secs(8),
            "a client waited {:?}: {o:?}",
            o.max_wait
        );
    }
}

/// The matrix as a markdown table.
#[must_use]
pub fn table(outcomes: &[Outcome]) -> String {
    let mut s = String::from(
        "| fault | before step | outcome | flip command | acked writes | lost | refused connects | longest client wait |\n|---|---|---|---|---:|---:|---:|---:|\n",
    );
    for o in outcomes {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} s |",
            o.fault.name(),
            o.step,
            o.result,
            if o.flip_succeeded { "ok" } else { "error" },
            o.acked,
            o.lost,
            o.refused,
            o.max_wait.as_secs_f64()
        );
    }
    s
}
