//! Runs the project's jobs: `setup` (install what a fresh machine lacks), `test` (every test),
//! `demo` (the lab walk-through). It does not build the eBPF object: `redirect/build.rs` does.
//! Before every build it checks that what the build needs is there ([`setup::check`]), and
//! any failure is one line on stderr (`xtask: ...`) and exit status 1.

mod postgres;
mod setup;

use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing on this machine (idempotent; needs root).
    Setup,
    /// Set up, build, then run every test: unit, property, `BPF_PROG_TEST_RUN` and the netns lab.
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
        /// Instead of the tests: cutover and rollback between every pair of PostgreSQL majors
        /// (13, 15, 16, 17, 18; logical and physical), about 10 minutes; writes
        /// docs/compatibility.md.
        #[arg(long, conflicts_with = "filter")]
        matrix: bool,
    },
    /// Check that what the build needs is there, then build the workspace as `test` and `demo`
    /// do (every target, the eBPF object included); no setup, no lab. `.ci/installer-test`
    /// runs it in a clean root after `setup`.
    Build,
    /// Set up, build, then run the demo lab: two PostgreSQL servers, a proxy, a cutover.
    Demo,
    /// rustfmt and clippy (pedantic), for the host crates and for the eBPF crate.
    Lint,
    /// Benchmarks: redirect against direct, iptables, HAProxy and PgBouncer, side by side;
    /// writes docs/benchmarks.md and SVG plots.
    Bench {
        /// A few minutes instead of about half an hour.
        #[arg(long)]
        quick: bool,
        /// Only profile the datapath under load (perf), and print where its time goes.
        #[arg(long, conflicts_with = "quick")]
        profile: bool,
        /// Only the fleet cutover: write pause with 1, 2 and 3 proxy hosts, side by side
        /// (about 5 minutes); writes docs/benchmarks-fleet.md.
        #[arg(long, conflicts_with_all = ["quick", "profile"])]
        fleet: bool,
        /// Only the cutover across databases: write pause covering 1, 2 and 5 databases of
        /// the same servers, side by side (about 5 minutes); writes
        /// docs/benchmarks-databases.md.
        #[arg(long, conflicts_with_all = ["quick", "profile", "fleet"])]
        databases: bool,
        /// Only socket mode (zero-hop) against direct: pgbench -S at 1, 8 and 32 clients and
        /// -C, the hooks' own time, connect() latency, and zero-hop cutovers' write pause
        /// next to proxy ones (about 8 minutes; with --quick, 2); writes
        /// docs/benchmarks-zero-hop.md.
        #[arg(long, conflicts_with_all = ["profile", "fleet", "databases"])]
        zero_hop: bool,
        /// Only the fleet protocol's growth: hold, write pause and release with 1, 10 and 30
        /// members under light load (about 10 minutes); writes docs/benchmarks-fleet-scale.md.
        #[arg(long, conflicts_with_all = ["quick", "profile", "fleet", "databases", "zero_hop"])]
        fleet_scale: bool,
    },
    /// The cutover's full fault matrix (every fault at every step boundary, under load);
    /// writes docs/reliability.md. About 20 minutes. CI runs a subset (tests/tests/fault_matrix.rs).
    Faults {
        /// Only faults whose name contains this (prints the table instead of writing the doc).
        only: Option<String>,
        /// Instead: the fleet under etcd faults (etcd paused past the lease, its leader
        /// killed, a member partitioned or killed, etcd slowed), each at each step of the fleet
        /// protocol, about 20 minutes; writes the fleet section of docs/reliability.md.
        #[arg(long)]
        fleet: bool,
    },
    /// Build the Debian package (cargo-deb): the binary with its embedded eBPF object, the
    /// systemd unit, /etc/redirect/redirect.toml, man pages and bash/zsh/fish completions.
    /// Prints the .deb's path.
    Package,
    /// Sustained connection churn (TCP CRR, then `pgbench -C`) with default settings and the GC
    /// running, 3 minutes each; writes docs/churn.md.
    Churn {
        /// 30 seconds per phase instead of 3 minutes.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line, never a backtrace: `{:#}` joins the error's context on one line.
            eprintln!("xtask: {}", format!("{e:#}").replace('\n', " "));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> anyhow::Result<()> {
    match task {
        Task::Setup => setup::install(),
        Task::Build => build(),
        Task::Test { matrix: true, .. } => {
            setup::install()?;
            postgres::install(postgres::FOR_MATRIX)?;
            build()?;
            run_lab_bin("version_matrix", None, "the version matrix")
        }
        Task::Test { filter, .. } => {
            setup::install()?;
            test(filter.as_deref())
        }
        Task::Bench { fleet: true, .. } => {
            setup::install()?;
            build()?;
            run_lab_bin("fleet_bench", None, "the fleet benchmark")
        }
        Task::Bench {
            fleet_scale: true, ..
        } => {
            setup::install()?;
            build()?;
            run_lab_bin("fleet_scale", None, "the fleet scale benchmark")
        }
        Task::Bench {
            zero_hop: true,
            quick,
            ..
        } => {
            setup::install()?;
            build()?;
            run_lab_bin(
                "zero_hop_bench",
                quick.then_some("--quick"),
                "the zero-hop benchmark",
            )
        }
        Task::Bench {
            databases: true, ..
        } => {
            setup::install()?;
            build()?;
            run_lab_bin("databases_bench", None, "the databases benchmark")
        }
        Task::Bench { quick, profile, .. } => {
            setup::install()?;
            setup::install_bench_tools()?;
            build()?;
            let mode = if profile {
                Some("--profile")
            } else {
                quick.then_some("--quick")
            };
            run_lab_bin("bench", mode, "the benchmark")
        }
        Task::Churn { quick } => {
            setup::install()?;
            build()?;
            run_lab_bin("churn", quick.then_some("--quick"), "the churn benchmark")
        }
        Task::Faults { only, fleet } => {
            setup::install()?;
            build()?;
            if fleet {
                run_lab_bin("fleet_faults", only.as_deref(), "the fleet fault set")
            } else {
                run_lab_bin("fault_matrix", only.as_deref(), "the fault matrix")
            }
        }
        Task::Package => {
            setup::install()?;
            let deb = package()?;
            println!("{}", deb.display());
            Ok(())
        }
        Task::Lint => {
            // clippy runs the build scripts too (etcd-client's protoc, the eBPF object).
            setup::check()?;
            let failed = lint().iter().filter(|(_, ok)| !ok).count();
            if failed > 0 {
                bail!("{failed} lint check(s) failed");
            }
            Ok(())
        }
        Task::Demo => {
            setup::install()?;
            build()?;
            run_lab_bin("demo", None, "the demo")
        }
    }
}

/// `cargo` with what the eBPF build needs: bpf-linker on PATH and `RUSTC_BOOTSTRAP=1`
/// (aya-build then passes `-Z build-std=core` to the `debian-web` toolchain).
fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.env("RUSTC_BOOTSTRAP", "1")
        .env("PATH", setup::path_with_cargo_bin());
    c
}

/// Runs one of the lab binaries of `redirect-tests` (bench, fault matrix) with `arg`.
fn run_lab_bin(bin: &str, arg: Option<&str>, what: &str) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.args(["run", "--quiet", "-p", "redirect-tests", "--bin", bin, "--"]);
    cmd.args(arg);
    let status = cmd.status()?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn build() -> anyhow::Result<()> {
    setup::check()?;
    step("building the workspace (the eBPF object is built by redirect/build.rs)");
    let status = cargo().args(["build", "--all-targets"]).status()?;
    if !status.success() {
        bail!("build failed ({status})");
    }
    Ok(())
}

/// Builds the release binary, generates the man pages and completions from it (so they are
/// the clap definitions of exactly this build), then packages them with cargo-deb.
fn package() -> anyhow::Result<std::path::PathBuf> {
    setup::check()?;
    step("building the release binary");
    let status = cargo()
        .args(["build", "--release", "-p", "redirect"])
        .status()?;
    if !status.success() {
        bail!("release build failed ({status})");
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), std::path::PathBuf::from);
    let bin = target.join("release/redirect");
    let assets = target.join("release/deb-assets");
    let _ = std::fs::remove_dir_all(&assets);
    let (man, completions) = (assets.join("man"), assets.join("completions"));
    std::fs::create_dir_all(&completions)?;
    step("generating man pages and completions");
    let run = |cmd: &mut Command| -> anyhow::Result<Vec<u8>> {
        let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
        if !out.status.success() {
            bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(out.stdout)
    };
    run(Command::new(&bin).arg("manpages").arg(&man))?;
    // Debian keeps man pages compressed (-n: no timestamp, so builds are reproducible).
    for page in std::fs::read_dir(&man)? {
        run(Command::new("gzip")
            .args(["-n", "-9", "-f"])
            .arg(page?.path()))?;
    }
    for (shell, file) in [
        ("bash", "redirect.bash"),
        ("zsh", "_redirect"),
        ("fish", "redirect.fish"),
    ] {
        let script = run(Command::new(&bin).args(["completions", shell]))?;
        std::fs::write(completions.join(file), script)?;
    }
    step("packaging with cargo-deb");
    let out = cargo()
        .args(["deb", "-p", "redirect", "--no-build"])
        .current_dir(&root)
        .stderr(Stdio::inherit())
        .output()
        .context("spawning cargo deb (cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!("cargo deb failed ({})", out.status);
    }
    // cargo-deb prints the package's path last.
    let printed = String::from_utf8_lossy(&out.stdout);
    let deb = printed
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| {
            std::path::Path::new(l)
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("deb"))
        })
        .ok_or_else(|| anyhow::anyhow!("cargo deb printed no .deb path: {printed}"))?;
    Ok(std::path::PathBuf::from(deb))
}

fn step(what: &str) {
    eprintln!("==> {what}");
}

/// Each lint check and whether it passed.
fn lint() -> Vec<(&'static str, bool)> {
    let run = |name: &'static str, cmd: &mut Command| {
        step(name);
        (name, cmd.status().is_ok_and(|s| s.success()))
    };
    vec![
        run("lint: rustfmt", cargo().args(["fmt", "--all", "--check"])),
        run(
            "lint: clippy (host crates)",
            cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]),
        ),
        // The eBPF crate is checked for the host with panic=abort (clippy cannot run on the
        // debian-web toolchain that builds it for BPF), in its own target dir.
        run(
            "lint: clippy (eBPF crate)",
            cargo()
                .args([
                    "clippy",
                    "-p",
                    "redirect-ebpf",
                    "--bins",
                    "--target-dir",
                    "target/clippy-ebpf",
                    "--",
                    "-D",
                    "warnings",
                ])
                .env("RUSTFLAGS", "-C panic=abort"),
        ),
    ]
}

/// Runs `cargo test` over the workspace, streams its output, and ends with one summary line.
fn test(filter: Option<&str>) -> anyhow::Result<()> {
    build()?;
    let lints = if filter.is_none() { lint() } else { Vec::new() };
    step("running every test (the lab tests need root and run one at a time)");
    let mut cmd = cargo();
    cmd.args(["test", "--no-fail-fast", "--"]);
    cmd.arg("--test-threads=1");
    if let Some(f) = filter {
        cmd.arg(f);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("spawning cargo test")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let n = |label: &str| -> u64 {
                rest.split([';', '.'])
                    .find_map(|part| {
                        part.trim()
                            .strip_suffix(label)
                            .and_then(|v| v.trim().parse().ok())
                    })
                    .unwrap_or(0)
            };
            passed += n(" passed");
            failed += n(" failed");
            ignored += n(" ignored");
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        failed += 1; // a build or harness failure outside any test
    }
    for (name, ok) in lints {
        println!("{name} ... {}", if ok { "ok" } else { "FAILED" });
        if ok { passed += 1 } else { failed += 1 }
    }
    println!("{passed} passed, {failed} failed, {ignored} ignored");
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
