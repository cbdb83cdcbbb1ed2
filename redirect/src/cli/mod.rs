//! The `redirect` command line: one module per subcommand.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub mod connections;
pub mod detach;
pub mod flip;
pub mod run;
pub mod status;

/// Move a live PostgreSQL database to a new server without downtime.
///
/// An XDP program on this proxy host sends each new TCP connection for the VIP to the active
/// backend and keeps every existing connection on the backend it started on.
#[derive(Debug, Parser)]
#[command(name = "redirect", version, propagate_version = true)]
pub struct Cli {
    /// bpffs directory holding the pinned maps and XDP links.
    #[arg(long, global = true, env = "REDIRECT_PIN_DIR", default_value = crate::datapath::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Run(run::Args),
    Flip(flip::Args),
    Status(status::Args),
    Connections(connections::Args),
    Detach(detach::Args),
}

/// An inclusive port range, written `LO-HI`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl std::str::FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (lo, hi) = s.split_once('-').ok_or_else(|| format!("{s:?} is not LO-HI, e.g. 40000-59999"))?;
        let parse = |p: &str| p.trim().parse::<u16>().map_err(|e| format!("{p:?}: {e}"));
        let (lo, hi) = (parse(lo)?, parse(hi)?);
        if lo == 0 || lo > hi {
            return Err(format!("{s:?}: need 1 <= LO <= HI"));
        }
        Ok(Self { lo, hi })
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges() {
        assert_eq!("40000-59999".parse(), Ok(PortRange { lo: 40000, hi: 59999 }));
        assert!("59999-40000".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("40000".parse::<PortRange>().is_err());
        assert!("1-70000".parse::<PortRange>().is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
