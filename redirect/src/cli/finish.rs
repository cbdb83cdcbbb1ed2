//! `redirect finish`: end a completed migration (drop the replication it no longer needs,
//! lift stale fences), after showing what it will do.

use std::path::Path;

use crate::control::{self, protocol::Finish};

/// End the migration: drop the forward subscription and its slot on the old primary, the
/// reverse subscription, slot and publication, and lift the stale fence.
///
/// Without --yes it only prints the plan. Rollback is no longer possible afterwards.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Carry out the plan (otherwise only print it).
    #[arg(long)]
    pub yes: bool,
    /// Go ahead even though connections are still pinned to the source.
    #[arg(long)]
    pub force: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &Args, socket: &Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let req = Finish {
        execute: args.yes,
        force: args.force,
    };
    let report = rt.block_on(control::ask(socket, req, |p| eprintln!("  {p}")))?.ok_or_else(|| {
        anyhow::anyhow!(
            "no controller answers on {}: finish needs `redirect run` with --source-dsn and --target-dsn",
            socket.display()
        )
    })?;
    if args.json {
        return super::print_json(&report);
    }
    if args.yes {
        println!("finished the migration:");
        for d in &report.done {
            println!("  - {d}");
        }
    } else {
        println!("plan (nothing was changed; run again with --yes to carry it out):");
        for d in &report.plan {
            println!("  - {d}");
        }
        if report.plan.is_empty() {
            println!("  - nothing to retire");
        }
    }
    for d in &report.left_alone {
        println!("left alone: {d}");
    }
    Ok(())
}
