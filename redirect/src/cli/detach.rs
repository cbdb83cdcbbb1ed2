//! `redirect detach`: remove the programs and every pin, and restore the host settings `run`
//! changed.

use std::path::Path;

use crate::{
    conntrack, datapath,
    net::{
        self,
        host_settings::{HostSettings, Outcome, write_sysctl},
    },
};

/// Detach the XDP program from every interface, remove the pinned maps, and put back the
/// sysctls `run` changed (recorded next to the journal).
///
/// Refuses while live connections are tracked: detaching breaks them (their packets would
/// no longer be translated).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Detach even though live connections would break.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: &Args, pin_dir: &Path, journal: &Path) -> anyhow::Result<()> {
    net::require_root()?;
    let record = HostSettings::new(journal, pin_dir)?;
    let pinned = datapath::PinDir(pin_dir.to_path_buf()).is_pinned();
    if pinned || !record.path().exists() {
        detach(args, pin_dir)?;
    } else {
        println!(
            "no datapath is pinned at {}; restoring the host settings recorded for it",
            pin_dir.display()
        );
    }
    restore(&record)
}

fn detach(args: &Args, pin_dir: &Path) -> anyhow::Result<()> {
    // Pins left by another version may not be readable by this one; detaching them is how an
    // upgrade across a map-layout change proceeds, so that needs --force, not a dead end.
    let live: u64 = match datapath::Maps::open(pin_dir) {
        Ok(maps) if maps.is_socket_mode()? => crate::host::sockets::translated_count(&maps)?,
        Ok(maps) => conntrack::live_per_backend(&maps)?.values().sum(),
        Err(e) if args.force => {
            println!("cannot count tracked connections ({e}); detaching anyway (--force)");
            0
        }
        Err(e) => anyhow::bail!(
            "cannot count the tracked connections that detaching would break: {e}\nPass --force to detach anyway."
        ),
    };
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

/// Puts back every sysctl `run` recorded, and says what it did.
fn restore(record: &HostSettings) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for (original, outcome) in record.restore(write_sysctl)? {
        let setting = if original.value.is_empty() {
            format!("{}=\"\"", original.sysctl)
        } else {
            format!("{}={}", original.sysctl, original.value)
        };
        match outcome {
            Outcome::Restored => println!("restored {setting}"),
            Outcome::Gone => println!("skipped {setting}: the setting no longer exists"),
            Outcome::Failed(e) => {
                eprintln!("could not restore {setting}: {e}");
                failed.push(setting);
            }
        }
    }
    anyhow::ensure!(
        failed.is_empty(),
        "could not restore {}; they stay recorded in {}",
        failed.join(" "),
        record.path().display()
    );
    Ok(())
}
