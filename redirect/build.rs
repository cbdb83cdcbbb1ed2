//! Builds the eBPF datapath (`redirect-ebpf`) with aya-build and leaves the object in
//! `OUT_DIR`, where `src/datapath.rs` embeds it. Needs bpf-linker on PATH, `RUSTC_BOOTSTRAP=1`
//! (aya-build then passes `-Z build-std=core`) and the `debian-web` toolchain, which has the
//! library source that tier-3 `bpfel-unknown-none` needs: `cargo xtask setup` provides all three.
use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let toolchain =
        std::env::var("REDIRECT_EBPF_TOOLCHAIN").unwrap_or_else(|_| "debian-web".into());
    println!("cargo:rerun-if-env-changed=REDIRECT_EBPF_TOOLCHAIN");
    let ebpf = Package {
        name: "redirect-ebpf",
        root_dir: "../redirect-ebpf",
        ..Default::default()
    };
    // The common crate is part of the datapath too.
    println!("cargo:rerun-if-changed=../redirect-common/src");
    aya_build::build_ebpf([ebpf], Toolchain::Custom(&toolchain))
        .context("building the eBPF datapath (run `cargo xtask setup` first)")
}
