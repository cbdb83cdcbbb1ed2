//! `redirect fix`: mechanical fixes for what the cutover's guardrails find. Each prints the
//! SQL and where it runs; only `--apply` runs it (through the controller, which has the DSNs).

use std::path::Path;

use clap::Subcommand;

use crate::{
    control::{
        self, Ask,
        protocol::{FixPublication, FixReplicaIdentity},
    },
    cutover::guardrails::fix::{FixReport, Identity},
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
            let req = FixReplicaIdentity {
                table: a.table.clone(),
                identity: a
                    .using_index
                    .clone()
                    .map_or(Identity::Full, Identity::Index),
                apply: a.apply,
            };
            call(req, a.json, socket)
        }
        What::Publication(a) => {
            let req = FixPublication {
                table: a.add_table.clone(),
                apply: a.apply,
            };
            call(req, a.json, socket)
        }
    }
}

/// Sends a fix to the controller and prints what it did or would do.
fn call(req: impl Ask<Answer = FixReport>, json: bool, socket: &Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(control::ask(socket, req, |p| eprintln!("  {p}")))?.ok_or_else(|| {
        anyhow::anyhow!(
            "no controller answers on {}: fix needs `redirect run` with --source-dsn and --target-dsn",
            socket.display()
        )
    })?;
    if json {
        return super::print_json(&report);
    }
    let steps = &report.steps;
    let mut servers: Vec<&str> = steps.iter().map(|(r, _)| r.name()).collect();
    servers.dedup();
    let servers = servers.join(" and the ");
    if steps.windows(2).all(|w| w[0].1 == w[1].1) {
        println!("on the {servers}:");
        if let Some((_, sql)) = steps.first() {
            println!("  {sql};");
        }
    } else {
        for (role, sql) in steps {
            println!("on the {}:\n  {sql};", role.name());
        }
    }
    for (role, sql) in &report.undo {
        println!("to put it back, on the {}: {sql}", role.name());
    }
    if report.applied {
        println!("applied on the {servers}");
        if let Some(next) = &report.next {
            println!("{next}");
        }
    } else {
        println!("nothing was changed: run again with --apply to do it");
    }
    Ok(())
}
