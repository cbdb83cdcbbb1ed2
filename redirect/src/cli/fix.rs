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
    Publication(Publication),
}

/// Add a table to the publication that feeds the new server (guardrail unpublished-table),
/// and have the subscription copy it.
///
/// Prints `ALTER PUBLICATION ... ADD TABLE ...` (on the active server) and
/// `ALTER SUBSCRIPTION ... REFRESH PUBLICATION` (on the other); with --apply runs both, and
/// if the refresh is refused, takes the table out of the publication again.
#[derive(Debug, clap::Args)]
pub struct Publication {
    /// The table, as schema.table; it must exist on both servers.
    #[arg(long)]
    pub add_table: String,
    /// Run it (otherwise only print it).
    #[arg(long)]
    pub apply: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
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
        What::ReplicaIdentity(a) => {
            let req = Request::FixReplicaIdentity {
                table: a.table.clone(),
                identity: a
                    .using_index
                    .clone()
                    .map_or(Identity::Full, Identity::Index),
                apply: a.apply,
            };
            call(&req, a.json, socket)
        }
        What::Publication(a) => {
            let req = Request::FixPublication {
                table: a.add_table.clone(),
                apply: a.apply,
            };
            call(&req, a.json, socket)
        }
    }
}

/// Sends a fix to the controller and prints what it did or would do.
fn call(req: &Request, json: bool, socket: &Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(control::call(socket, req, |p| eprintln!("  {p}")))?.ok_or_else(|| {
        anyhow::anyhow!(
            "no controller answers on {}: fix needs `redirect run` with --source-dsn and --target-dsn",
            socket.display()
        )
    })?;
    if json {
        return super::print_json(&report);
    }
    let pairs = |k: &str| -> Vec<(String, String)> {
        report[k]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    p[0].as_str().unwrap_or_default().to_owned(),
                    p[1].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    let steps = pairs("steps");
    let mut servers: Vec<&str> = steps.iter().map(|(r, _)| r.as_str()).collect();
    servers.dedup();
    let servers = servers.join(" and the ");
    if steps.windows(2).all(|w| w[0].1 == w[1].1) {
        println!("on the {servers}:");
        if let Some((_, sql)) = steps.first() {
            println!("  {sql};");
        }
    } else {
        for (role, sql) in &steps {
            println!("on the {role}:\n  {sql};");
        }
    }
    for (role, sql) in pairs("undo") {
        println!("to put it back, on the {role}: {sql}");
    }
    if report["applied"].as_bool() == Some(true) {
        println!("applied on the {servers}");
        if let Some(next) = report["next"].as_str() {
            println!("{next}");
        }
    } else {
        println!("nothing was changed: run again with --apply to do it");
    }
    Ok(())
}
