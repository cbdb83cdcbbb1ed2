//! The safe cutover, as an explicit state machine.
//!
//! [`run`] is the ordered list of steps; each step is a small function in its
//! own file, journaled (write-ahead where its effect must be undone after a crash) with what
//! it learned: the subscription and slot it relies on, LSNs, the drain deadline.
//!
//! The protocol has one commit point, the write of `ACTIVE` ([`flip`]):
//! - Before it, the old server stays the truth. Any failure undoes what was done ([`undo`]),
//!   and a controller that dies leaves a hold and a fence that lapse by themselves within
//!   [`crate::host::lease::LEASE`]: the kernel deadlines are short and renewed while the cutover lives.
//! - After it, the new server is the truth. Nothing is undone; every later step (release,
//!   reverse subscription, drain) is finished, by this controller or by its successor
//!   ([`recover`]). The same `ACTIVE` write makes the old server's fence permanent, so there
//!   is no moment when old and new clients can both write.

pub mod barrier;
pub mod catalog;
pub mod drain;
pub mod failover;
pub mod fence;
pub mod finish;
pub mod fleet_steps;
pub mod flip;
pub mod grants;
pub mod guardrails;
pub mod lane;
pub mod lease;
pub mod preflight;
pub mod recover;
pub mod replication;
pub mod sequences;
pub mod undo;

mod fault_point;
mod recorder;

pub use fault_point::FaultPoint;
pub(crate) use fault_point::fault_point;
pub use preflight::prepare;
pub use recorder::Recorder;

pub use crate::pg::quote::{quote_ident, quote_literal};

use std::{
    fmt::Write as _,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;
use tokio_postgres::Client;

pub use crate::controller::REVERSE;
use crate::pg::Server;
use crate::{
    controller::{Controller, ControllerError, Phase, PhaseGuard, Timings},
    datapath::{self, Role},
    fleet::{Fleet, hold::Proxied, lead::Leadership, state::Committed},
    journal::{self, Entry, Step},
    pg::{
        Lsn, PgError,
        lag::{ReplicaLag, Watch},
        timed,
    },
    sync::lock,
};

/// The table whose marker row is the LSN barrier.
pub const BARRIER_TABLE: &str = "public.redirect_barrier";

/// What the operator asked for.
#[derive(Clone, Debug)]
pub struct FlipRequest {
    pub to: Role,
    pub max_lag_bytes: u64,
    pub max_lag_time: Duration,
    /// How long preflight waits for a healthy replica that is only behind to come within
    /// the lag limits before it refuses (`--lag-wait`).
    pub lag_wait: Duration,
    /// Fires when nobody waits for this cutover any more (its CLI went away, or the
    /// controller is stopping): a preflight still waiting for lag refuses.
    pub called_off: tokio_util::sync::CancellationToken,
    pub timeout: Duration,
    pub drain_timeout: Duration,
    pub dry_run: bool,
    pub force: bool,
    /// Guardrails whose findings may not stop this cutover (`--allow`).
    pub allow: Vec<guardrails::Guardrail>,
    /// A transaction open longer than this on the old server is a finding.
    pub max_transaction_age: Duration,
    /// In a fleet: how long preflight waits for etcd (and for every member to be live)
    /// before it refuses, changing nothing.
    pub etcd_timeout: Duration,
}

/// `flip --etcd-timeout`'s default: long enough for an etcd leader election, short enough
/// that a flip into an etcd outage says so at once.
pub const DEFAULT_ETCD_TIMEOUT: Duration = Duration::from_secs(3);
/// `flip --lag-wait`'s default: long enough for a forward slot restarted by a rollback to
/// re-decode to the present, short enough that a replica hours behind is refused promptly.
pub const DEFAULT_LAG_WAIT: Duration = Duration::from_secs(30);

/// What a cutover did.
/// A field an older controller does not send reads as its default (the CLI may be newer).
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct FlipReport {
    pub from: Option<Role>,
    pub to: Option<Role>,
    pub dry_run: bool,
    pub forced: bool,
    pub findings: Vec<String>,
    /// What logical replication will not carry: every guardrail finding, blocking,
    /// allowed (with `--allow`) or a note.
    pub guardrails: Vec<guardrails::Finding>,
    pub plan: Vec<String>,
    pub lag: Option<ReplicaLag>,
    /// Every database on the two servers and what this cutover does with it.
    pub databases: Vec<crate::pg::cluster::Database>,
    pub fence_lsn: Option<Lsn>,
    pub applied_lsn: Option<Lsn>,
    pub sequences_synced: u64,
    /// Proxied sessions on the old server ended at the fence (all of them, busy or idle).
    pub terminated_at_fence: u64,
    pub held_syns: u64,
    /// From the hold to the release of held connections: the longest a new connection waited.
    pub hold_ms: f64,
    /// From the fence to the flip: the longest a write could pause.
    pub write_pause_ms: f64,
    pub barrier_ms: f64,
    pub reverse_replication: String,
    /// Old-server sessions ended right after their client tried to use them.
    pub drained_on_use: u64,
    /// Old-server connections with no session to end (their startup packet was fenced):
    /// reset by the controller and forgotten, so the client reconnects at once.
    pub reset_unknown: u64,
    pub terminated_at_drain: u64,
    pub steps: Vec<(Step, f64)>,
}

/// Why a cutover did not happen (after undoing whatever it had started).
#[derive(Debug, thiserror::Error)]
pub enum CutoverError {
    #[error("another cutover is in progress (phase: {0}); try again when it has finished")]
    Busy(Phase),
    #[error(transparent)]
    Controller(#[from] ControllerError),
    #[error("preflight failed: {0}")]
    Preflight(preflight::Refusal),
    #[error("new connections already go to the {0}")]
    AlreadyThere(Role),
    #[error(
        "the cutover was called off while it waited for replication (its CLI went away, or the controller is stopping); nothing was changed"
    )]
    CalledOff,
    #[error("{0}")]
    Refused(String),
    /// The fleet cannot cut over now (etcd unreachable, a member not live): refused before
    /// anything changed.
    #[error("{0}; nothing was changed")]
    FleetNotReady(crate::fleet::FleetError),
    #[error(
        "{step}: {source} (rolled back: the old server is writable and new connections go to it)"
    )]
    Aborted {
        step: Phase,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("datapath: {0}")]
    Datapath(#[from] datapath::DatapathError),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
}

impl CutoverError {
    /// The same error, said of one database (a preflight refusal names the database).
    #[must_use]
    pub fn in_database(self, database: &str) -> Self {
        match self {
            Self::Preflight(refusal) => Self::Preflight(preflight::Refusal::InDatabase {
                database: database.to_owned(),
                refusal: Box::new(refusal),
            }),
            other => other,
        }
    }

    /// An abort at `step` for a reason of our own.
    fn abort(step: Phase, why: impl Into<String>) -> Self {
        Self::Aborted {
            step,
            source: why.into().into(),
        }
    }
}

/// What has to be undone if the cutover stops before the flip (the database side is each
/// lane's: [`lane::Lane`]).
#[derive(Default)]
pub struct Undo {
    /// The hold and fence were set.
    pub datapath: bool,
}

/// One cutover in progress: what every step reads and writes.
pub struct Run {
    pub ctl: Arc<Controller>,
    pub req: FlipRequest,
    pub from: Role,
    pub to: Role,
    pub from_db: Client,
    pub to_db: Client,
    /// The address the old server sees proxied clients come from.
    pub from_snat: String,
    /// The datapath's SNAT port range: every proxied session's client port is in it.
    pub snat_ports: (u16, u16),
    pub logical: bool,
    pub qt: Duration,
    /// The replication that carries the old server's writes to the new one.
    pub watch: Watch,
    /// Each replicated database's own sessions and replication (logical); empty with
    /// physical replication (one stream for the cluster) or a forced flip without any.
    pub lanes: Vec<lane::Lane>,
    /// When the hold began, when the fence went up, and when `--timeout` runs out.
    pub held_at: Instant,
    pub fenced_at: Option<Instant>,
    pub deadline: Instant,
    pub rec: Recorder,
    pub report: FlipReport,
    pub undo: Undo,
    pub lease: Option<crate::host::lease::Lease>,
    /// Whether an LSN barrier guards the flip (not for a forced flip with no replication).
    pub barrier: bool,
    /// A fleet cutover: what this leader learned and committed; `None` on a host on its own.
    pub fleet: Option<FleetRun>,
}

/// A fleet cutover's own part (docs/fleet.md): the members hold, fence, release and drain
/// their own datapaths from the epochs this leader commits in etcd.
pub struct FleetRun {
    pub fleet: Arc<Fleet>,
    /// This leader's election: its key guards the commit; resigned when the cutover ends.
    pub leadership: Leadership,
    /// The other members' proxied sessions, from their acks of the hold (the fence step
    /// ends them too).
    pub members_proxied: Vec<Proxied>,
    /// The committed `Hold` epoch this leader wrote (undo aborts it), then the commit.
    pub hold: Option<Committed>,
    /// The etcd revision of the roster the hold's acknowledgements were counted against
    /// (the commit refuses if anyone enrolled since).
    pub roster_revision: i64,
}

impl Run {
    /// The sessions every other fleet member proxies to the old server (none on one host).
    #[must_use]
    pub fn members_proxied(&self) -> &[Proxied] {
        self.fleet.as_ref().map_or(&[], |f| &f.members_proxied)
    }

    /// What is left of `--timeout`.
    #[must_use]
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Fails the step if `--timeout` has run out: the controller enforces it, not only the
    /// kernel deadline, so a slow step never lets the fence lapse before the flip.
    pub fn check_deadline(&self, step: Phase) -> Result<(), CutoverError> {
        if self.remaining().is_zero() {
            return Err(CutoverError::abort(
                step,
                format!("--timeout {:?} ran out", self.req.timeout),
            ));
        }
        Ok(())
    }

    /// A query of a step before the flip: bounded by the query timeout and by what is left
    /// of `--timeout`; a failure aborts the cutover at `step`.
    pub async fn query<T>(
        &self,
        step: Phase,
        which: impl Into<Server>,
        what: &'static str,
        fut: impl Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, CutoverError> {
        self.check_deadline(step)?;
        let budget = self.qt.min(self.remaining());
        timed(which, what, budget, fut)
            .await
            .map_err(|e| CutoverError::Aborted {
                step,
                source: Box::new(e),
            })
    }

    /// A `pg_lsn` a step's query returned; `NULL`, or text that is not one, aborts the
    /// cutover at `step` (never a zero).
    pub async fn query_lsn(
        &self,
        step: Phase,
        which: impl Into<Server>,
        what: &'static str,
        fut: impl Future<Output = Result<tokio_postgres::Row, tokio_postgres::Error>>,
    ) -> Result<Lsn, CutoverError> {
        let which = which.into();
        let text: Option<String> = self.query(step, which, what, fut).await?.get(0);
        crate::pg::parse_lsn_of(which, what, text.as_deref().unwrap_or_default())
            .map_err(|e| CutoverError::abort(step, e.to_string()))
    }

    /// The client for `side`.
    #[must_use]
    pub fn db(&self, side: Role) -> &Client {
        if side == self.from {
            &self.from_db
        } else {
            &self.to_db
        }
    }
}

/// Runs a safe cutover to `req.to`, reporting progress lines on `progress`. It reads as the
/// protocol: preflight, then the steps up to the flip (undone on any failure), then the
/// steps after it (always finished).
pub async fn run(
    ctl: &Arc<Controller>,
    req: FlipRequest,
    progress: UnboundedSender<String>,
) -> Result<FlipReport, CutoverError> {
    let Ok(_busy) = ctl.busy.try_lock() else {
        return Err(CutoverError::Busy(ctl.phase()));
    };
    let _idle_after = PhaseGuard(ctl);
    ctl.set_phase(Phase::Preflight);
    let mut run = match preflight::check(ctl, req, progress).await? {
        preflight::Outcome::Report(report) => return Ok(*report),
        preflight::Outcome::Go(run) => *run,
    };
    rehearse(&mut run).await?;
    lead_the_fleet(&mut run).await?;
    if let Err(e) = before_flip(&mut run).await {
        Box::pin(undo_or_follow_the_commit(&mut run, e)).await?;
    }
    after_flip(&mut run).await;
    if let Some(fleet) = run.fleet.take() {
        fleet.leadership.resign().await;
    }
    run.report.steps.clone_from(&run.rec.steps);
    *lock(&ctl.last_cutover) = Some(Timings {
        steps: run.report.steps.clone(),
        write_pause_ms: run.report.write_pause_ms,
    });
    Ok(run.report)
}

/// Step 1b: every statement the cutover will run, tried where it changes nothing.
async fn rehearse(run: &mut Run) -> Result<(), CutoverError> {
    if let Err(e) = preflight::rehearse(run).await {
        let _ = run.rec.step(
            Step::Aborted,
            Instant::now(),
            format!("{e}; nothing was changed"),
        );
        return Err(e);
    }
    Ok(())
}

/// A fleet member leads the whole fleet through this cutover (docs/fleet.md).
async fn lead_the_fleet(run: &mut Run) -> Result<(), CutoverError> {
    let Some(fleet) = run.ctl.fleet.clone() else {
        return Ok(());
    };
    let leadership = crate::fleet::lead::lead(&fleet)
        .await
        .map_err(|e| CutoverError::abort(Phase::Hold, e.to_string()))?;
    run.fleet = Some(FleetRun {
        fleet,
        leadership,
        members_proxied: Vec::new(),
        hold: None,
        roster_revision: 0,
    });
    Ok(())
}

/// Steps 2–7: everything up to and including the flip. An error here is undone.
async fn before_flip(run: &mut Run) -> Result<(), CutoverError> {
    replication::reverse_before_hold(run).await;
    hold_and_fence(run).await?;
    fence::end_old_sessions(run).await?;
    fault_point(FaultPoint::Barrier).await;
    barrier::wait_for_new_server(run).await?;
    fault_point(FaultPoint::Sequences).await;
    sequences::carry_over(run).await?;
    fault_point(FaultPoint::Reverse).await;
    replication::turn_around(run).await?;
    fault_point(FaultPoint::Flip).await;
    commit(run).await
}

/// Steps 8–10: after the flip nothing is undone; each step is finished, here or by a
/// successor that finds it missing from the journal.
async fn after_flip(run: &mut Run) {
    fault_point(FaultPoint::Release).await;
    release_and_drain(run).await;
    replication::after_flip(run).await;
    done(run);
}

/// Steps 2–3, the hold and the fence. On one host, on this host's maps under a lease; in a
/// fleet, as a committed `Hold` epoch that every member applies to its own datapath
/// ([`crate::fleet::hold`]) and acknowledges.
async fn hold_and_fence(run: &mut Run) -> Result<(), CutoverError> {
    if let Some(fleet) = fleet_of(run) {
        fault_point(FaultPoint::Hold).await;
        return fleet_steps::hold(run, &fleet).await;
    }
    // Socket mode: the uplink's hooks park held SYNs and fence; they run for cutovers only.
    if run.ctl.host.arm_for_cutover()? {
        run.rec
            .say("armed the uplink's hooks for the hold and the fence".to_owned());
    }
    lease::hold(run)?;
    fence::let_short_connections_finish(run).await?;
    fault_point(FaultPoint::Fence).await;
    lease::fence(run)
}

/// Step 7, the commit point: `ACTIVE` on one host, the epoch naming the new backend in a
/// fleet.
async fn commit(run: &mut Run) -> Result<(), CutoverError> {
    match fleet_of(run) {
        Some(fleet) => fleet_steps::commit(run, &fleet).await,
        None => flip::commit(run),
    }
}

/// Steps 8–9: held connections released and old ones drained. In a fleet each member does
/// this for its own when it applies the committed epoch; the leader waits for their acks.
async fn release_and_drain(run: &mut Run) {
    if let Some(fleet) = fleet_of(run) {
        fleet_steps::await_members(run, &fleet).await;
        return;
    }
    flip::release(run);
    // The drain first: old connections whose clients try them are told at once. The
    // reverse slot already keeps every new-server write, so its subscription can follow.
    fault_point(FaultPoint::Drain).await;
    drain::after_cutover(run).await;
}

/// The failure before the flip is undone, and returned; unless the fleet's commit turns out
/// to have landed after all, and then the cutover goes on as after any commit.
async fn undo_or_follow_the_commit(run: &mut Run, e: CutoverError) -> Result<(), CutoverError> {
    run.ctl.set_phase(Phase::Aborting);
    let t = Instant::now();
    match undo::undo(run).await {
        undo::Undone::Done(undone) => {
            let _ = run
                .rec
                .step(Step::Aborted, t, format!("{e}; undo: {undone}"));
            if let Some(fleet) = run.fleet.take() {
                fleet.leadership.resign().await;
            }
            Err(e)
        }
        // The fleet follows the new backend: finish, as after any commit.
        undo::Undone::CommittedAfterAll(committed) => {
            let detail = format!(
                "fleet epoch {} committed after all ({e}): every member sends new connections to the {}",
                committed.state.epoch, run.to
            );
            flip::record_commit(run, t, detail);
            if let Some(fleet) = run.fleet.as_mut() {
                fleet.hold = Some(committed);
            }
            Ok(())
        }
    }
}

/// The journal's last word on this cutover: how long writes paused and connections waited.
fn done(run: &mut Run) {
    let mut detail = format!(
        "write pause {:.1} ms, hold {:.1} ms",
        run.report.write_pause_ms, run.report.hold_ms
    );
    if run.fleet.is_some() {
        let _ = write!(
            detail,
            " (fleet of {} member(s))",
            run.members_proxied().len() + 1
        );
    }
    run.rec.note(
        run.held_at,
        Entry {
            step: Step::Done,
            source_lsn: run.report.fence_lsn,
            target_lsn: run.report.applied_lsn,
            detail,
            ..Entry::default()
        },
    );
}

/// The fleet this cutover leads, if any (a handle, so a step can borrow the run mutably).
fn fleet_of(run: &Run) -> Option<Arc<Fleet>> {
    run.fleet.as_ref().map(|f| f.fleet.clone())
}
