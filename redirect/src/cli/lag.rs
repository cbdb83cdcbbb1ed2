//! `redirect lag`: replication lag in bytes and seconds, and its health, from the controller.

use std::{path::Path, time::Duration};

use crate::control::{self, protocol::Lag};

/// Show replication lag (bytes and seconds) and health.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Keep printing, once per interval.
    #[arg(long)]
    pub watch: bool,
    /// The interval for --watch.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    pub interval: Duration,
}

pub fn run(args: &Args, socket: &Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    loop {
        let lag = rt
            .block_on(control::ask(socket, Lag, |_| {}))?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no controller at {} (start `redirect run` with --source-dsn and --target-dsn)",
                    socket.display()
                )
            })?;
        if args.json {
            println!("{}", serde_json::to_string(&lag)?);
        } else {
            for line in lag.lines() {
                println!("{line}");
            }
        }
        if !args.watch {
            return Ok(());
        }
        std::thread::sleep(args.interval);
    }
}
