//! `redirect connections`: every tracked connection.

use std::path::Path;

use crate::{conntrack, datapath::Maps, net};

/// List every tracked connection: client, backend, SNAT port, state and age.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &Args, pin_dir: &Path) -> anyhow::Result<()> {
    net::require_root()?;
    let maps = Maps::open(pin_dir)?;
    let conns = conntrack::list(&maps)?;
    if args.json {
        return super::print_json(&conns);
    }
    println!(
        "{:<21} {:<7} {:<21} {:<21} {:<11} {:>9} {:>9}",
        "CLIENT", "BACKEND", "BACKEND ADDR", "SNAT", "STATE", "AGE", "IDLE"
    );
    for c in &conns {
        println!(
            "{:<21} {:<7} {:<21} {:<21} {:<11} {:>8.1}s {:>8.1}s",
            c.client.to_string(),
            c.backend,
            c.backend_addr.to_string(),
            c.snat.to_string(),
            serde_json::to_value(c.state)?.as_str().unwrap_or("?"),
            c.age.as_secs_f64(),
            c.idle.as_secs_f64()
        );
    }
    println!("{} connection(s)", conns.len());
    Ok(())
}
