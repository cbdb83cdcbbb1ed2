//! The `redirect` command line: one module per subcommand.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub mod completions;
pub mod config;
pub mod connections;
pub mod detach;
pub mod finish;
pub mod fix;
pub mod fleet;
pub mod flip;
pub mod history;
pub mod lag;
pub mod run;
pub mod status;
pub mod verify;
pub mod watch;

/// Move a live `PostgreSQL` database to a new server without downtime.
///
/// An XDP program on this proxy host sends each new TCP connection for the VIP to the active
/// backend and keeps every existing connection on the backend it started on.
#[derive(Debug, Parser)]
#[command(name = "redirect", version, propagate_version = true)]
pub struct Cli {
    /// bpffs directory holding the pinned maps and XDP links.
    #[arg(long, global = true, env = "REDIRECT_PIN_DIR", default_value = crate::datapath::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,

    /// The running controller's control socket.
    #[arg(long, global = true, env = "REDIRECT_SOCKET", default_value = crate::control::DEFAULT_SOCKET)]
    pub socket: PathBuf,

    /// The cutover journal (append-only JSON lines). The sysctls `run` changed are recorded
    /// next to it (`host-settings-<pin dir>.json`), for `detach` to restore.
    #[arg(
        long,
        global = true,
        env = "REDIRECT_JOURNAL",
        default_value = "/var/lib/redirect/journal.jsonl"
    )]
    pub journal: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Run(Box<run::Args>),
    Flip(flip::Args),
    Lag(lag::Args),
    History(history::Args),
    Status(status::Args),
    Connections(connections::Args),
    Detach(detach::Args),
    Finish(finish::Args),
    Fix(fix::Args),
    Fleet(fleet::Args),
    Verify(verify::Args),
    Config(config::Args),
    Completions(completions::Args),
    #[command(hide = true)]
    Manpages(completions::ManArgs),
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
        let (lo, hi) = s
            .split_once('-')
            .ok_or_else(|| format!("{s:?} is not LO-HI, e.g. 40000-59999"))?;
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

/// A size in bytes: `65536`, `512kB`, `1MB`, `2GB` (1024-based, as `PostgreSQL`'s units are).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size like 1MB or 65536"))?;
        // PostgreSQL's own units (kB, MB, GB) are powers of 1024, so are these.
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            other => return Err(format!("unknown size unit {other:?} (use B, kB, MB or GB)")),
        };
        n.checked_mul(mult)
            .map(Self)
            .ok_or_else(|| format!("{s:?} is too large"))
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
        assert_eq!(
            "40000-59999".parse(),
            Ok(PortRange {
                lo: 40000,
                hi: 59999
            })
        );
        assert!("59999-40000".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("40000".parse::<PortRange>().is_err());
        assert!("1-70000".parse::<PortRange>().is_err());
    }

    #[test]
    fn byte_sizes() {
        assert_eq!("1MB".parse(), Ok(ByteSize(1 << 20)));
        assert_eq!("512kB".parse(), Ok(ByteSize(512 << 10)));
        assert_eq!("65536".parse(), Ok(ByteSize(65536)));
        assert!("1XB".parse::<ByteSize>().is_err());
        assert!("MB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }
}
