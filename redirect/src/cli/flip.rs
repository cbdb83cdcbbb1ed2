//! `redirect flip`: move new connections to the other backend.
//!
//! With a running controller that knows both databases, this is the safe cutover (hold, fence,
//! LSN barrier, sequences, reverse replication, flip, release, drain). Without one, it is the
//! immediate map flip: new connections move, nothing is fenced, and it says so.

use std::{io::Write as _, path::Path, time::Duration};

use serde::Serialize;

use super::ByteSize;
use crate::{
    conntrack,
    control::{
        self,
        protocol::{FleetFlipRequest, FleetRequest, Flip, HasDatabases},
    },
    cutover::{
        FlipReport,
        guardrails::{Finding, Guardrail},
    },
    datapath::{Maps, Role},
    net,
};

/// Send new connections to a backend; existing connections stay where they are.
///
/// With a controller running (`redirect run --source-dsn … --target-dsn …`) this is a safe
/// cutover: nothing acknowledged is lost and no connection is refused. `--to source` after a
/// cutover is the rollback, over the reverse replication the cutover set up.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The backend that receives new connections.
    #[arg(long, value_enum)]
    pub to: Role,
    /// Refuse to start while replication lag is above this.
    #[arg(long, default_value = "1MB")]
    pub max_lag: ByteSize,
    /// Refuse to start while replication lag is above this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub max_lag_time: Duration,
    /// Before refusing for lag, wait this long for healthy replication to catch up (right
    /// after a rollback the forward slot is behind for a few seconds). Nothing is held or
    /// fenced while it waits; 0s refuses at once.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub lag_wait: Duration,
    /// Give up (and roll back) if the new server has not caught up within this.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub timeout: Duration,
    /// After the flip, wait this long for the old server's connections to close, then end them.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    pub drain_timeout: Duration,
    /// Print the plan and the preflight findings; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Skip the lag gate (and, for a rollback, the need for reverse replication). It does not
    /// pass guardrails: each needs its own --allow.
    #[arg(long)]
    pub force: bool,
    /// Go ahead despite this guardrail's findings (repeatable). A guardrail finds what
    /// logical replication will not carry; `--dry-run` lists them with the name to allow.
    #[arg(long, value_enum, value_name = "GUARDRAIL")]
    pub allow: Vec<Guardrail>,
    /// A transaction open longer than this on the old server blocks the cutover
    /// (guardrail long-transaction).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    pub max_transaction_age: Duration,
    /// Only write the map: no fence, no barrier (what happens without a controller).
    #[arg(long)]
    pub immediate: bool,
    /// In a fleet: refuse (changing nothing) if etcd does not answer, or a member is not
    /// live, within this long.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
    pub etcd_timeout: Duration,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Immediate {
    mode: &'static str,
    from: Option<Role>,
    to: Role,
    addr: String,
    /// Live connections still pinned to the other backend.
    staying: u64,
}

pub fn run(args: &Args, pin_dir: &Path, socket: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.etcd_timeout >= Duration::from_millis(100),
        "--etcd-timeout {:?} is too short to hear from etcd at all: give it at least 100ms (default 3s)",
        args.etcd_timeout
    );
    net::require_root()?;
    if !args.immediate {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let has_db = rt.block_on(control::ask(socket, HasDatabases, |_| {}))?;
        if has_db == Some(true) {
            return safe(args, socket, &rt);
        }
        if args.dry_run {
            anyhow::bail!(
                "--dry-run needs a running controller that knows both databases (redirect run --source-dsn … --target-dsn …)"
            );
        }
        // Without the safe cutover a flip is only a map write: no fence, no barrier, so
        // writes in flight on the old server can be lost. Never do that implicitly.
        anyhow::bail!(
            "{}; refusing to flip without the safe cutover (pass --immediate to only write the map: no write fence, no LSN barrier)",
            match has_db {
                Some(_) => "the running controller has no --source-dsn/--target-dsn".to_owned(),
                None if socket.exists() => format!(
                    "the control socket {} exists but no controller answers",
                    socket.display()
                ),
                None => format!(
                    "no controller is running (no socket at {})",
                    socket.display()
                ),
            }
        );
    }
    // Even an explicit immediate flip must not cut through a safe cutover in progress: it
    // would send held clients to a server that has not passed the barrier.
    if socket.exists() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        if let Some(state) = rt.block_on(control::state(socket))
            && state.phase != crate::controller::Phase::Idle
        {
            anyhow::bail!(
                "a cutover is in progress (phase: {}); wait for it to finish or fail before an immediate flip",
                state.phase
            );
        }
        // A fleet member follows the fleet's committed state (docs/fleet.md, invariant 1):
        // the immediate flip becomes a fleet-wide one, committed in etcd and applied by
        // every member.
        match rt.block_on(control::ask(socket, FleetRequest, |_| {})) {
            Ok(Some(Some(_))) => return fleet_flip(args, socket, &rt),
            Ok(Some(None) | None) => {}
            // A flip of this host's maps alone, on a fleet member, would send its new
            // connections elsewhere than every other member's: never guess.
            Err(e) => anyhow::bail!(
                "cannot tell whether the running controller is a fleet member ({e}); nothing was changed (an immediate flip on a fleet member must be fleet-wide: use a redirect of the controller's version)"
            ),
        }
    }
    immediate(args, pin_dir)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn safe(args: &Args, socket: &Path, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let req = Flip {
        to: args.to,
        max_lag_bytes: args.max_lag.0,
        max_lag_time_ms: millis(args.max_lag_time),
        timeout_ms: millis(args.timeout),
        drain_timeout_ms: millis(args.drain_timeout),
        dry_run: args.dry_run,
        force: args.force,
        allow: args.allow.clone(),
        max_transaction_age_ms: Some(millis(args.max_transaction_age)),
        etcd_timeout_ms: Some(millis(args.etcd_timeout)),
        lag_wait_ms: Some(millis(args.lag_wait)),
    };
    let report = rt
        .block_on(control::ask(socket, req, |p| {
            eprintln!("  {p}");
            let _ = std::io::stderr().flush();
        }))?
        .ok_or_else(|| anyhow::anyhow!("the controller at {} went away", socket.display()))?;
    if args.json {
        return super::print_json(&report);
    }
    if args.dry_run {
        print_plan(&report);
    } else {
        print_done(args.to, &report);
    }
    Ok(())
}

/// A dry run: what a cutover would do, and what stops it.
fn print_plan(report: &FlipReport) {
    println!("dry run: nothing was changed");
    println!("plan:");
    for step in &report.plan {
        println!("  - {step}");
    }
    println!("findings:");
    for x in &report.findings {
        println!("  - {x}");
    }
    if !report.databases.is_empty() {
        println!("databases:");
        for line in crate::pg::cluster::describe(&report.databases) {
            println!("  - {line}");
        }
    }
    print_guardrails(&report.guardrails);
}

/// A cutover that happened: its pauses, its barrier, its reverse replication and its drain.
fn print_done(to: Role, report: &FlipReport) {
    println!(
        "cutover to {to} done: write pause {:.1} ms, connections held {:.1} ms ({} held), barrier {:.1} ms at {}",
        report.write_pause_ms,
        report.hold_ms,
        report.held_syns,
        report.barrier_ms,
        report
            .fence_lsn
            .map_or_else(|| "?".to_owned(), |l| l.to_string()),
    );
    print_guardrails(&report.guardrails);
    println!("reverse replication: {}", report.reverse_replication);
    println!(
        "drain: {} busy session(s) ended at the fence, {} when their client used them, {} at the drain deadline",
        report.terminated_at_fence, report.drained_on_use, report.terminated_at_drain
    );
}

/// The guardrail findings of a report, blocking first.
fn print_guardrails(found: &[Finding]) {
    if found.is_empty() {
        return;
    }
    let mut found = found.to_vec();
    found.sort_by_key(|f| (!f.stops(), !f.blocks, f.guardrail));
    println!("guardrails (what logical replication will not carry):");
    for f in &found {
        println!("  - {}", f.render().replace('\n', "\n    "));
    }
}

fn immediate(args: &Args, pin_dir: &Path) -> anyhow::Result<()> {
    let mut maps = Maps::open(pin_dir)?;
    let from = maps.active()?;
    let to_addr = maps
        .backend(args.to)?
        .ok_or_else(|| anyhow::anyhow!("the {} backend is not configured", args.to))?;
    maps.set_active(args.to)?;
    // A fence left on the backend that is active again (after a cutover away from it) would
    // drop every new connection's data there: clear it.
    if maps.cutover()?.fenced_backend == args.to.index() {
        maps.set_cutover(redirect_common::cutover::Cutover::IDLE)?;
    }
    let other = match args.to {
        Role::Source => Role::Target,
        Role::Target => Role::Source,
    };
    let staying = match maps.backend(other)? {
        // Socket mode tracks no connection: the host's sockets to the other backend stay.
        Some(_) if maps.is_socket_mode()? => {
            crate::host::sockets::hooked_to(&maps, other)?.len() as u64
        }
        Some(b) => conntrack::live_per_backend(&maps)?
            .get(&b.addr)
            .copied()
            .unwrap_or(0),
        None => 0,
    };
    let out = Immediate {
        mode: "immediate",
        from,
        to: args.to,
        addr: to_addr.addr.to_string(),
        staying,
    };
    if args.json {
        return super::print_json(&out);
    }
    if from == Some(args.to) {
        println!(
            "new connections already go to {} ({}); nothing changed",
            args.to, out.addr
        );
    } else {
        println!("new connections now go to {} ({})", args.to, out.addr);
    }
    println!("{staying} live connection(s) stay on {other} until they close");
    eprintln!("note: immediate flip: no write fence, no LSN barrier");
    Ok(())
}

/// How long a fleet flip waits for every live member to apply the new epoch.
const FLEET_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// `flip --immediate` on a fleet member: commit the new epoch, wait for every member.
fn fleet_flip(args: &Args, socket: &Path, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let request = FleetFlipRequest {
        to: args.to,
        ack_timeout_ms: u64::try_from(FLEET_ACK_TIMEOUT.as_millis()).expect("small"),
        etcd_timeout_ms: Some(millis(args.etcd_timeout)),
    };
    let report = rt
        .block_on(control::ask(socket, request, |_| {}))?
        .ok_or_else(|| anyhow::anyhow!("the controller did not answer the fleet flip"))?;
    if args.json {
        return super::print_json(&report);
    }
    println!(
        "fleet {}: epoch {} committed, new connections go to {} (was {}); applied by {} in {} ms",
        report.fleet,
        report.epoch,
        report.to,
        report.from,
        report.acked.join(", "),
        report.took_ms
    );
    if !report.missing.is_empty() {
        anyhow::bail!(
            "epoch {} is committed, but {} did not apply it within {FLEET_ACK_TIMEOUT:?}: check those hosts (`redirect status` there); they apply it as soon as they reach etcd",
            report.epoch,
            report.missing.join(", ")
        );
    }
    Ok(())
}
