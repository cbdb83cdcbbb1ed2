//! `redirect detach`: remove the programs and every pin.

use std::path::Path;

use crate::{conntrack, datapath, net};

/// Detach the XDP program from every interface and remove the pinned maps.
///
/// Refuses while live connections are tracked: detaching breaks them (their packets would
/// no longer be translated).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Detach even though live connections would break.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: &Args, pin_dir: &Path) -> anyhow::Result<()> {
    net::require_root()?;
    let maps = datapath::Maps::open(pin_dir)?;
    let live: u64 = conntrack::live_per_backend(&maps)?.values().sum();
    drop(maps);
    if live > 0 && !args.force {
        anyhow::bail!(
            "{live} live connection(s) are tracked and would break; drain them first, or pass --force"
        );
    }
    let ifaces = datapath::remove(pin_dir)?;
    println!(
        "detached from {}; removed pins under {}{}",
        if ifaces.is_empty() {
            "no interface".to_owned()
        } else {
            ifaces.join(", ")
        },
        pin_dir.display(),
        if live > 0 {
            format!(" ({live} live connection(s) broken, --force)")
        } else {
            String::new()
        }
    );
    Ok(())
}
