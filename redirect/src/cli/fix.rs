//! `redirect fix`: mechanical fixes for what the cutover's guardrails find. Each prints the
//! SQL and where it runs; only `--apply` runs it (through the controller, which has the DSNs).

use std::path::Path;

use clap::Subcommand;

use crate::{
    control::{self, Request},
    cutover::guardrails::fix::Identity,
};

/// Fix a guardrail finding: print what would change, and change it with --apply.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(Debug, Subcommand)]
pub enum What {
    ReplicaIdentity(ReplicaIdentity),
}

/// Give a table a replica identity on both servers (guardrail no-replica-identity), so its
/// UPDATEs and DELETEs replicate in both directions.
///
/// Prints `ALTER TABLE ... REPLICA IDENTITY ...` and the servers it runs on; with --apply it
/// runs on both, or on neither: both are checked first, and if the second refuses, the first
/// is put back.
#[derive(Debug, clap::Args)]
pub struct ReplicaIdentity {
    /// The table, as schema.table (quote mixed-case names: '"MyTable"').
    #[arg(long)]
    pub table: String,
    /// A unique, non-partial, non-deferrable index on NOT NULL columns of the table.
    #[arg(
        long,
        value_name = "INDEX",
        required_unless_present = "full",
        conflicts_with = "full"
    )]
    pub using_index: Option<String>,
    /// The whole old row identifies it: works for any table, but each replicated UPDATE or
    /// DELETE of a big table without a usable index scans it on the subscriber.
    #[arg(long)]
    pub full: bool,
    /// Run it (otherwise only print it).
    #[arg(long)]
    pub apply: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &Args, socket: &Path) -> anyhow::Result<()> {
    match &args.what {
        What::ReplicaIdentity(a) => replica_identity(a, socket),
    }
}

fn replica_identity(args: &ReplicaIdentity, socket: &Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let req = Request::FixReplicaIdentity {
        table: args.table.clone(),
        identity: args
            .using_index
            .clone()
            .map_or(Identity::Full, Identity::Index),
        apply: args.apply,
    };
    let report = rt.block_on(control::call(socket, &req, |p| eprintln!("  {p}")))?.ok_or_else(|| {
        anyhow::anyhow!(
            "no controller answers on {}: fix needs `redirect run` with --source-dsn and --target-dsn",
            socket.display()
        )
    })?;
    if args.json {
        return super::print_json(&report);
    }
    let servers: Vec<&str> = report["servers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_str)
        .collect();
    println!("on the {}:", servers.join(" and the "));
    println!("  {};", report["sql"].as_str().unwrap_or_default());
    for b in report["before"].as_array().into_iter().flatten() {
        println!(
            "before, on the {}: {}",
            b[0].as_str().unwrap_or_default(),
            b[1].as_str().unwrap_or_default()
        );
    }
    if report["applied"].as_bool() == Some(true) {
        println!("applied on the {}", servers.join(" and the "));
    } else {
        println!("nothing was changed: run again with --apply to do it");
    }
    Ok(())
}
