//! `redirect flip`: send new connections to the other backend. Existing connections stay on
//! the backend they started on.

use std::path::Path;

use serde::Serialize;

use crate::{
    conntrack,
    datapath::{Maps, Role},
    net,
};

/// Send new connections to a backend from now on; existing connections stay where they are.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The backend that receives new connections.
    #[arg(long, value_enum)]
    pub to: Role,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Flipped {
    from: Option<Role>,
    to: Role,
    addr: String,
    /// Live connections still pinned to the other backend.
    staying: u64,
}

pub fn run(args: &Args, pin_dir: &Path) -> anyhow::Result<()> {
    net::require_root()?;
    let mut maps = Maps::open(pin_dir)?;
    let from = maps.active()?;
    let to_addr = maps
        .backend(args.to)?
        .ok_or_else(|| anyhow::anyhow!("the {} backend is not configured", args.to))?;
    maps.set_active(args.to)?;
    let other = match args.to {
        Role::Source => Role::Target,
        Role::Target => Role::Source,
    };
    let staying = match maps.backend(other)? {
        Some(b) => conntrack::live_per_backend(&maps)?.get(&b.addr).copied().unwrap_or(0),
        None => 0,
    };
    let out = Flipped { from, to: args.to, addr: to_addr.addr.to_string(), staying };
    if args.json {
        return super::print_json(&out);
    }
    if from == Some(args.to) {
        println!("new connections already go to {} ({}); nothing changed", args.to, out.addr);
    } else {
        println!("new connections now go to {} ({})", args.to, out.addr);
    }
    println!("{staying} live connection(s) stay on {other} until they close");
    Ok(())
}
