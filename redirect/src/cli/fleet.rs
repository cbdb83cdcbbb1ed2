//! `redirect fleet`: acting on the fleet this host's controller is a member of.

use std::path::Path;

use crate::control::{self, protocol::FleetForget};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: FleetCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum FleetCommand {
    /// Take a member off the fleet's roster, so cutovers stop waiting for it.
    ///
    /// Every member that ever joined stays on the roster, live or not: a member whose
    /// controller is down, or cut off from etcd, may still be serving through its datapath,
    /// so a cutover aborts until it answers. Forget a member only when its host is gone for
    /// good or its datapath is detached (`redirect detach` on it). A live member is refused.
    Forget {
        /// The member's name, as `redirect status` lists it.
        member: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: &Args, socket: &Path) -> anyhow::Result<()> {
    let FleetCommand::Forget { member, json } = &args.command;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let req = FleetForget {
        member: member.clone(),
    };
    let forgotten = rt
        .block_on(control::ask(socket, req, |p| eprintln!("  {p}")))?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no controller answers on {}: `fleet forget` asks this host's fleet member (redirect run --etcd ...)",
                socket.display()
            )
        })?;
    if *json {
        return super::print_json(&forgotten);
    }
    println!(
        "forgot {member}: cutovers of this fleet no longer wait for it (it rejoins the roster if it starts again)"
    );
    Ok(())
}
