//! `redirect verify`: ask the running controller (which holds both DSNs and their passwords)
//! to compare the source and the target, and print a verdict per table.

use std::{io::Write as _, path::Path, time::Duration};

use crate::{
    control::{self, protocol::Verify},
    verify::report::{Report, TableVerdict, show_key},
};

/// Compare the source and the target: do they hold the same rows?
///
/// Per table, row counts and md5 hashes of primary-key-ordered chunks, each chunk read at a
/// consistent point (on the replica once replication has applied the primary's WAL position).
/// Differences are re-checked before they are reported, so live writes do not show as
/// differences. Exits non-zero when any table differs.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this table (`schema.table`, or `table` for `public.table`); repeat for more.
    #[arg(long = "table", value_name = "SCHEMA.TABLE")]
    pub tables: Vec<String>,
    /// Rows per chunk: each chunk is one statement on each server.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub chunk_rows: u64,
    /// At most this many rows per second (on each server), to bound the load during business
    /// hours (default: as fast as the servers answer).
    #[arg(long, value_name = "ROWS_PER_SEC", value_parser = clap::value_parser!(u64).range(1..))]
    pub rate: Option<u64>,
    /// Give up if replication has not reached a chunk's consistent point within this.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub catch_up_timeout: Duration,
    /// `statement_timeout` of verify's sessions (each chunk is one statement).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub statement_timeout: Duration,
    /// How many differing keys to name per table.
    #[arg(long, default_value_t = 10)]
    pub max_keys: usize,
    /// Only these databases (default: every replicated database, and the DSNs').
    #[arg(long, value_delimiter = ',', value_name = "DB,...")]
    pub databases: Vec<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub fn run(args: &Args, socket: &Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let req = Verify {
        tables: args.tables.clone(),
        chunk_rows: args.chunk_rows,
        rate: args.rate,
        catch_up_timeout_ms: millis(args.catch_up_timeout),
        statement_timeout_ms: millis(args.statement_timeout),
        max_keys: args.max_keys,
        databases: args.databases.clone(),
    };
    let report = rt
        .block_on(control::ask(socket, req, |p| {
            eprintln!("  {p}");
            let _ = std::io::stderr().flush();
        }))?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no controller answers on {}: verify needs `redirect run` with --source-dsn and --target-dsn (it holds the passwords)",
                socket.display()
            )
        })?;
    if args.json {
        super::print_json(&report)?;
    } else {
        print_human(&report);
    }
    if report.differ > 0 {
        anyhow::bail!(
            "{} of {} table(s) differ",
            report.differ,
            report.tables.len()
        );
    }
    Ok(())
}

fn print_human(report: &Report) {
    // With several databases, each table is named with its database.
    let several = report
        .tables
        .iter()
        .filter_map(|t| t.database.as_deref())
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        > 1;
    let name = |t: &crate::verify::report::TableReport| match &t.database {
        Some(d) if several => format!("{d}: {}", t.table),
        _ => t.table.clone(),
    };
    let width = report
        .tables
        .iter()
        .map(|t| name(t).len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "{:<width$}  {:<18} {:>12} {:>12}  detail",
        "table", "verdict", "source rows", "target rows"
    );
    for t in &report.tables {
        let rows = |n: Option<u64>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
        let detail = match &t.verdict {
            TableVerdict::Equal if t.key_columns.is_empty() => {
                "no primary key: compared by count and an order-independent hash".to_owned()
            }
            TableVerdict::Equal => String::new(),
            TableVerdict::Differs {
                differing_rows,
                first_keys,
            } => {
                let keys: Vec<String> = first_keys
                    .iter()
                    .map(|k| format!("{} ({})", show_key(&t.key_columns, &k.key), k.diff))
                    .collect();
                if keys.is_empty() {
                    format!("{differing_rows} row(s) differ (no primary key to name them)")
                } else {
                    format!("{differing_rows} row(s) differ, first: {}", keys.join(", "))
                }
            }
            TableVerdict::MissingOnTarget => "never replicated: not on the target".to_owned(),
            TableVerdict::MissingOnSource => "on the target only".to_owned(),
            TableVerdict::SchemaDiffers { detail } => detail.clone(),
            TableVerdict::Unsettled { keys } => format!(
                "{} row(s) kept changing under live writes and could not be compared (none found different); run verify again",
                keys.len()
            ),
            TableVerdict::Failed { error } => error.clone(),
        };
        let line = format!(
            "{:<width$}  {:<18} {:>12} {:>12}  {detail}",
            name(t),
            t.verdict.word(),
            rows(t.source_rows),
            rows(t.target_rows)
        );
        println!("{}", line.trim_end());
    }
    println!("consistency: {}", report.consistency);
    println!(
        "{} (in {:.1} s)",
        report.summary(),
        report.elapsed_ms / 1000.0
    );
}
