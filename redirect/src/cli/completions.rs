//! `redirect completions SHELL` and `redirect manpages DIR`: shell completions and man pages,
//! generated from the same clap definitions that parse the command line, so they never drift.
//! The Debian package (`cargo xtask package`) installs both.

use std::path::PathBuf;

use clap::CommandFactory as _;

use super::Cli;

/// Print a completion script for a shell, e.g. `source <(redirect completions bash)`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    // Into a buffer first: clap_complete panics on a write error (`| head`).
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), "redirect", &mut script);
    std::io::Write::write_all(&mut std::io::stdout(), &script)?;
    Ok(())
}

/// Write the man pages (redirect.1, redirect-run.1, ...) into a directory (for packaging).
#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// The directory to write them into (created if missing).
    pub dir: PathBuf,
}

pub fn manpages(args: &ManArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)?;
    clap_mangen::generate_to(Cli::command(), &args.dir)?;
    Ok(())
}
