//! `redirect history`: the cutover journal.

use std::path::Path;

use crate::journal;

/// Show every cutover step from the journal, with its timing and LSNs.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the entries as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &Args, path: &Path) -> anyhow::Result<()> {
    let entries = journal::read(path)?;
    if args.json {
        return super::print_json(&entries);
    }
    if entries.is_empty() {
        println!("no cutover recorded in {}", path.display());
    }
    for e in entries {
        println!(
            "{} {:<13} {:<21} {:>9} {:<12} {:<12} {}",
            e.time,
            e.cutover,
            e.step,
            e.duration_ms.map_or(String::new(), |d| format!("{d:.1}ms")),
            e.source_lsn.map(|l| l.to_string()).unwrap_or_default(),
            e.target_lsn.map(|l| l.to_string()).unwrap_or_default(),
            e.detail
        );
    }
    Ok(())
}
