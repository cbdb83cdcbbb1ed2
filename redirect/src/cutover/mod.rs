//! The safe cutover, as an explicit state machine.
//!
//! [`Controller::cutover`] is the ordered list of steps; each step is a small function in its
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
pub mod journal;
pub mod lane;
pub mod lease;
pub mod preflight;
pub mod recover;
pub mod replication;
pub mod sequences;
pub mod undo;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;
use tokio_postgres::Client;
use tracing::warn;

use self::journal::{Entry, Journal, Step};
use crate::{
    datapath::{self, Role},
    pg::{
        Dsn, Lsn, PgError,
        lag::{self, ReplicaLag, Replication, Watch},
        timed,
    },
    sync::lock,
};

/// The name of the reverse publication, slot and subscription used for lossless rollback.
pub const REVERSE: &str = "redirect_reverse";
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
#[derive(Clone, Debug, Default, Serialize)]
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
    pub steps: Vec<(String, f64)>,
}

/// Where a cutover is; `/metrics` and error messages show it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    #[default]
    Idle,
    Preflight,
    Hold,
    Fence,
    Barrier,
    Sequences,
    Reverse,
    Promote,
    Flip,
    Release,
    Drain,
    Aborting,
    Recovering,
    Finishing,
}

impl Phase {
    pub const ALL: [Self; 14] = [
        Self::Idle,
        Self::Preflight,
        Self::Hold,
        Self::Fence,
        Self::Barrier,
        Self::Sequences,
        Self::Reverse,
        Self::Promote,
        Self::Flip,
        Self::Release,
        Self::Drain,
        Self::Aborting,
        Self::Recovering,
        Self::Finishing,
    ];

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Preflight => "preflight",
            Self::Hold => "hold",
            Self::Fence => "fence",
            Self::Barrier => "barrier",
            Self::Sequences => "sequences",
            Self::Reverse => "reverse",
            Self::Promote => "promote",
            Self::Flip => "flip",
            Self::Release => "release",
            Self::Drain => "drain",
            Self::Aborting => "aborting",
            Self::Recovering => "recovering",
            Self::Finishing => "finishing",
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a cutover did not happen (after undoing whatever it had started).
#[derive(Debug, thiserror::Error)]
pub enum CutoverError {
    #[error("another cutover is in progress (phase: {0}); try again when it has finished")]
    Busy(Phase),
    #[error("no databases configured: start `redirect run` with --source-dsn and --target-dsn")]
    NoDatabases,
    #[error("preflight failed: {0}")]
    Preflight(String),
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
    /// An abort at `step` for a reason of our own.
    fn abort(step: Phase, why: impl Into<String>) -> Self {
        Self::Aborted {
            step,
            source: why.into().into(),
        }
    }
}

/// How to reach the two servers.
#[derive(Clone, Debug)]
pub struct Databases {
    pub source: Dsn,
    pub target: Dsn,
    pub replication: Replication,
    /// The forward subscription on the target in the DSN's database (logical).
    pub subscription: Option<String>,
    /// Forward subscriptions named for other databases (`--subscription DB=NAME`).
    pub subscriptions: std::collections::BTreeMap<String, String>,
    /// Which databases the cutover covers (`--databases`, `--exclude-databases`).
    pub scope: lag::Scope,
    /// How the source reaches the target for reverse replication (default: the target DSN).
    pub reverse_conninfo: Option<String>,
    pub query_timeout: Duration,
}

/// The controller state a cutover works on, shared with the control socket and `/metrics`.
pub struct Controller {
    /// This host's datapath.
    pub host: Arc<crate::host::Host>,
    pub db: Option<Databases>,
    pub journal_path: PathBuf,
    /// Held for the whole of a cutover, a recovery or a `finish`.
    pub busy: Arc<tokio::sync::Mutex<()>>,
    pub phase: Mutex<Phase>,
    pub last_lag: Mutex<Option<ReplicaLag>>,
    pub last_report: Mutex<Option<FlipReport>>,
    /// What the last recovery of an interrupted cutover did.
    pub last_recovery: Mutex<Option<String>>,
    /// The last conntrack GC pass: `/metrics` reads port use from it instead of walking maps.
    pub last_gc: Mutex<Option<crate::conntrack::GcReport>>,
    /// The fleet this host is a member of (`run --etcd`); `None`: a host on its own.
    pub fleet: Option<Arc<crate::fleet::Fleet>>,
}

/// Puts the controller back to idle however a cutover ends (an error, a `?`, a panic), so a
/// failed step can never wedge later cutovers.
struct PhaseGuard<'a>(&'a Controller);

impl Drop for PhaseGuard<'_> {
    fn drop(&mut self) {
        self.0.set_phase(Phase::Idle);
    }
}

/// Journals steps with their timings and streams progress lines.
pub struct Recorder {
    journal: Journal,
    pub id: String,
    pub from: Role,
    pub to: Role,
    pub steps: Vec<(String, f64)>,
    progress: UnboundedSender<String>,
}

impl Recorder {
    fn new(
        path: &std::path::Path,
        id: String,
        from: Role,
        to: Role,
        progress: UnboundedSender<String>,
    ) -> Result<Self, CutoverError> {
        Ok(Self {
            journal: Journal::open(path)?,
            id,
            from,
            to,
            steps: Vec::new(),
            progress,
        })
    }

    /// A progress line for the operator (not journaled).
    pub fn say(&self, line: impl Into<String>) {
        let _ = self.progress.send(line.into());
    }

    /// Journals `entry` for this cutover (stamping id, direction and duration), and shows it.
    pub fn log(&mut self, since: Instant, entry: Entry) -> Result<(), CutoverError> {
        let ms = since.elapsed().as_secs_f64() * 1000.0;
        let step = entry.step.to_string();
        self.steps.push((step.clone(), ms));
        self.say(format!("{step:<10} {ms:>8.1} ms  {}", entry.detail));
        self.journal.append(Entry {
            cutover: self.id.clone(),
            from: Some(self.from),
            to: Some(self.to),
            duration_ms: Some(ms),
            ..entry
        })?;
        Ok(())
    }

    /// [`Self::log`] for several entries at once (one per database), with one fsync.
    pub fn log_all(&mut self, since: Instant, entries: Vec<Entry>) -> Result<(), CutoverError> {
        let ms = since.elapsed().as_secs_f64() * 1000.0;
        let mut stamped = Vec::with_capacity(entries.len());
        for entry in entries {
            let step = entry.step.to_string();
            self.steps.push((step.clone(), ms));
            self.say(format!("{step:<10} {ms:>8.1} ms  {}", entry.detail));
            stamped.push(Entry {
                cutover: self.id.clone(),
                from: Some(self.from),
                to: Some(self.to),
                duration_ms: Some(ms),
                ..entry
            });
        }
        self.journal.append_all(stamped)?;
        Ok(())
    }

    /// `log` for a step with only a detail.
    pub fn step(
        &mut self,
        step: Step,
        since: Instant,
        detail: impl Into<String>,
    ) -> Result<(), CutoverError> {
        self.log(
            since,
            Entry {
                step,
                detail: detail.into(),
                ..Entry::default()
            },
        )
    }

    /// After the flip nothing may be undone, so a journal that cannot be written (disk full)
    /// is reported, not fatal: `ACTIVE` itself records the flip, and a successor finishes
    /// whatever the journal does not show as done.
    pub fn note(&mut self, since: Instant, entry: Entry) {
        if let Err(e) = self.log(since, entry) {
            warn!(error = %e, "journal write failed after the flip; continuing (ACTIVE records the flip)");
            self.say(format!("WARNING: journal: {e}"));
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
    /// A fleet cutover: the other members' proxied sessions, from their acks of the hold
    /// (the fence step ends them too).
    pub members_proxied: Vec<crate::fleet::hold::Proxied>,
    /// A fleet cutover: the committed `Hold` epoch this leader wrote (undo aborts it).
    pub fleet_hold: Option<crate::fleet::state::Committed>,
    /// A fleet cutover: the etcd revision of the roster the hold's acknowledgements were
    /// counted against (the commit refuses if anyone enrolled since).
    pub fleet_roster_revision: i64,
    /// A fleet cutover: the election key this leader holds (the commit requires it).
    pub fleet_leader_key: Vec<u8>,
}

impl Run {
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
        which: &'static str,
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
        which: &'static str,
        what: &'static str,
        fut: impl Future<Output = Result<tokio_postgres::Row, tokio_postgres::Error>>,
    ) -> Result<Lsn, CutoverError> {
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

impl Controller {
    pub fn set_phase(&self, p: Phase) {
        *lock(&self.phase) = p;
    }

    #[must_use]
    pub fn phase(&self) -> Phase {
        *lock(&self.phase)
    }

    pub fn dsn(&self, role: Role) -> Result<&Dsn, CutoverError> {
        let db = self.db.as_ref().ok_or(CutoverError::NoDatabases)?;
        Ok(match role {
            Role::Source => &db.source,
            Role::Target => &db.target,
        })
    }

    /// The backend new connections go to now.
    pub fn active(&self) -> Result<Role, CutoverError> {
        Ok(lock(&self.host.maps).active()?.unwrap_or(Role::Source))
    }

    /// The replication that carries `to.other()`'s writes to `to`: the forward subscription
    /// (configured, else the one an earlier cutover journaled, else discovered), or the
    /// reverse one set up by an earlier cutover.
    pub fn watch_for(&self, to: Role) -> Result<Watch, CutoverError> {
        let db = self.db.as_ref().ok_or(CutoverError::NoDatabases)?;
        let home = db.source.database().to_owned();
        Ok(match to {
            Role::Target => Watch {
                replication: db.replication,
                subscription: self.forward_subscription(),
                named: db.subscriptions.clone(),
                home,
                reverse: false,
                scope: db.scope.clone(),
            },
            Role::Source => Watch {
                replication: Replication::Logical,
                subscription: Some(REVERSE.to_owned()),
                named: std::collections::BTreeMap::new(),
                home,
                reverse: true,
                scope: db.scope.clone(),
            },
        })
    }

    /// The forward subscription's name if configured or remembered from the journal.
    #[must_use]
    pub fn forward_subscription(&self) -> Option<String> {
        self.db
            .as_ref()
            .and_then(|d| d.subscription.clone())
            .or_else(|| {
                journal::read(&self.journal_path)
                    .ok()
                    .and_then(|e| journal::known_subscription(&e, Role::Source, Role::Target))
                    .map(|(s, _)| s)
            })
    }

    /// The forward subscription of `database`: named for it (`--subscription DB=NAME`), the
    /// DSNs' database's [`Self::forward_subscription`], or the one an earlier cutover stopped.
    #[must_use]
    pub fn forward_subscription_for(&self, database: &str) -> Option<String> {
        let db = self.db.as_ref()?;
        let home = db.source.database();
        if let Some(s) = db.subscriptions.get(database) {
            return Some(s.clone());
        }
        if database == home
            && let Some(s) = self.forward_subscription()
        {
            return Some(s);
        }
        journal::read(&self.journal_path)
            .ok()
            .and_then(|e| journal::known_subscription_in(&e, database, home))
    }

    /// Every database on the two servers and what a cutover to the backend that is not
    /// active now would do with it (what its preflight finds).
    pub async fn discover(&self) -> Result<Vec<crate::pg::cluster::Database>, CutoverError> {
        let db = self.db.as_ref().ok_or(CutoverError::NoDatabases)?;
        let from = self.active()?;
        let to = from.other();
        let (old, new) = (
            self.dsn(from)?.connect().await?,
            self.dsn(to)?.connect().await?,
        );
        Ok(crate::pg::cluster::discover(
            self.dsn(from)?,
            &old,
            &new,
            &self.watch_for(to)?,
            db.query_timeout,
        )
        .await?)
    }

    /// Lag of the replication feeding the backend that is not active now.
    pub async fn measure_lag(&self) -> Result<ReplicaLag, CutoverError> {
        let db = self.db.as_ref().ok_or(CutoverError::NoDatabases)?;
        let from = self.active()?;
        let to = from.other();
        let (publisher, subscriber) = (
            self.dsn(from)?.connect().await?,
            self.dsn(to)?.connect().await?,
        );
        let lag = lag::measure(
            &publisher,
            &subscriber,
            &self.watch_for(to)?,
            db.query_timeout,
        )
        .await?;
        *lock(&self.last_lag) = Some(lag.clone());
        Ok(lag)
    }

    /// Runs a safe cutover to `req.to`, reporting progress lines on `progress`. It reads as
    /// the protocol: preflight, then the steps up to the flip (undone on any failure), then
    /// the steps after it (always finished).
    pub async fn cutover(
        self: &Arc<Self>,
        req: FlipRequest,
        progress: UnboundedSender<String>,
    ) -> Result<FlipReport, CutoverError> {
        let Ok(_busy) = self.busy.try_lock() else {
            return Err(CutoverError::Busy(self.phase()));
        };
        let _idle_after = PhaseGuard(self);
        self.set_phase(Phase::Preflight);
        let mut run = match preflight::check(self, req, progress).await? {
            preflight::Outcome::Report(report) => return Ok(*report),
            preflight::Outcome::Go(run) => *run,
        };
        if let Err(e) = preflight::rehearse(&mut run).await {
            let _ = run.rec.step(
                Step::Aborted,
                Instant::now(),
                format!("{e}; nothing was changed"),
            );
            return Err(e);
        }

        // A fleet member leads the whole fleet through this cutover (docs/fleet.md).
        let leadership = match &self.fleet {
            Some(fleet) => Some(
                crate::fleet::lead::lead(fleet)
                    .await
                    .map_err(|e| CutoverError::abort(Phase::Hold, e.to_string()))?,
            ),
            None => None,
        };
        if let Some(l) = &leadership {
            run.fleet_leader_key = l.key();
        }
        let result = match &self.fleet {
            Some(fleet) => Self::before_flip_fleet(&mut run, fleet).await,
            None => Self::before_flip(&mut run).await,
        };
        if let Err(e) = result {
            self.set_phase(Phase::Aborting);
            let t = Instant::now();
            match undo::undo(&mut run).await {
                undo::Undone::Done(undone) => {
                    let _ = run
                        .rec
                        .step(Step::Aborted, t, format!("{e}; undo: {undone}"));
                    if let Some(l) = leadership {
                        l.resign().await;
                    }
                    return Err(e);
                }
                // The fleet follows the new backend: finish, as after any commit.
                undo::Undone::CommittedAfterAll(committed) => {
                    let detail = format!(
                        "fleet epoch {} committed after all ({e}): every member sends new connections to the {}",
                        committed.state.epoch, run.to
                    );
                    flip::record_commit(&mut run, t, detail);
                    run.fleet_hold = Some(committed);
                }
            }
        }
        match &self.fleet {
            Some(fleet) => Self::after_flip_fleet(&mut run, fleet).await,
            None => Self::after_flip(&mut run).await,
        }
        if let Some(l) = leadership {
            l.resign().await;
        }
        run.report.steps.clone_from(&run.rec.steps);
        *lock(&self.last_report) = Some(run.report.clone());
        Ok(run.report)
    }

    /// Steps 2–7: everything up to and including the flip. An error here is undone.
    async fn before_flip(run: &mut Run) -> Result<(), CutoverError> {
        replication::reverse_before_hold(run).await;
        lease::hold(run)?;
        fence::let_short_connections_finish(run).await?;
        fault_point("fence").await;
        lease::fence(run)?;
        fence::end_old_sessions(run).await?;
        fault_point("barrier").await;
        barrier::wait_for_new_server(run).await?;
        fault_point("sequences").await;
        sequences::carry_over(run).await?;
        fault_point("reverse").await;
        replication::turn_around(run).await?;
        fault_point("flip").await;
        flip::commit(run)
    }

    /// A fleet's steps 2–7: the kernel-side steps become committed epochs that every member
    /// applies to its own datapath ([`crate::fleet::hold`]); the database side stays here.
    async fn before_flip_fleet(
        run: &mut Run,
        fleet: &crate::fleet::Fleet,
    ) -> Result<(), CutoverError> {
        replication::reverse_before_hold(run).await;
        fault_point("hold").await;
        fleet_steps::hold(run, fleet).await?;
        fence::end_old_sessions(run).await?;
        fault_point("barrier").await;
        barrier::wait_for_new_server(run).await?;
        fault_point("sequences").await;
        sequences::carry_over(run).await?;
        fault_point("reverse").await;
        replication::turn_around(run).await?;
        fault_point("flip").await;
        fleet_steps::commit(run, fleet).await
    }

    /// A fleet's steps 8–10: every member releases and drains its own connections when it
    /// applies the committed epoch; here, wait for their acks, then the replication.
    async fn after_flip_fleet(run: &mut Run, fleet: &crate::fleet::Fleet) {
        fault_point("release").await;
        fleet_steps::await_members(run, fleet).await;
        replication::after_flip(run).await;
        let detail = format!(
            "write pause {:.1} ms, hold {:.1} ms (fleet of {} member(s))",
            run.report.write_pause_ms,
            run.report.hold_ms,
            run.members_proxied.len() + 1
        );
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

    /// Steps 8–10: after the flip nothing is undone; each step is finished, here or by a
    /// successor that finds it missing from the journal.
    async fn after_flip(run: &mut Run) {
        fault_point("release").await;
        flip::release(run);
        // The drain first: old connections whose clients try them are told at once. The
        // reverse slot already keeps every new-server write, so its subscription can follow.
        fault_point("drain").await;
        drain::after_cutover(run).await;
        replication::after_flip(run).await;
        let t = run.held_at;
        let detail = format!(
            "write pause {:.1} ms, hold {:.1} ms",
            run.report.write_pause_ms, run.report.hold_ms
        );
        run.rec.note(
            t,
            Entry {
                step: Step::Done,
                source_lsn: run.report.fence_lsn,
                target_lsn: run.report.applied_lsn,
                detail,
                ..Entry::default()
            },
        );
    }

    /// How long a statement on either server may take.
    #[must_use]
    pub fn query_timeout(&self) -> Duration {
        self.db
            .as_ref()
            .map_or(Duration::from_secs(5), |d| d.query_timeout)
    }

    /// Makes the barrier table replicate from the active server to the other, in every
    /// replicated database, off the critical path: `run` does this at start, so a cutover
    /// finds it ready.
    pub async fn prepare(&self) -> Result<(), CutoverError> {
        let db = self.db.as_ref().ok_or(CutoverError::NoDatabases)?;
        let active = self.active()?;
        let to = active.other();
        let watch = self.watch_for(to)?;
        if watch.replication != Replication::Logical {
            return Ok(());
        }
        let (from_dsn, to_dsn) = (self.dsn(active)?, self.dsn(to)?);
        let subscriber = to_dsn.connect().await?;
        let subs = lag::cluster_subscriptions(&subscriber, to.name(), db.query_timeout).await?;
        for (database, chosen) in lag::choose(&subs, &watch) {
            let Ok(sub) = chosen else { continue };
            let (from_db, to_db) = (
                from_dsn.for_database(&database).connect().await?,
                to_dsn.for_database(&database).connect().await?,
            );
            let one = Watch::one(Replication::Logical, Some(sub.name));
            preflight::prepare_barrier(&from_db, &to_db, &one, db.query_timeout)
                .await
                .map_err(|e| match e {
                    CutoverError::Preflight(why) => {
                        CutoverError::Preflight(format!("database {database}: {why}"))
                    }
                    other => other,
                })?;
        }
        Ok(())
    }
}

/// A fault-injection point for the fault-matrix tests: with `REDIRECT_FAULT_PAUSE=<step>`
/// the cutover pauses (`REDIRECT_FAULT_PAUSE_MS`, default 3000) just before that step, so a
/// test can kill the controller, cut a link or fill a disk at exactly that moment. The lease
/// keeps being renewed meanwhile, as it would during any slow step. Unset, it costs nothing.
pub(crate) async fn fault_point(step: &str) {
    if std::env::var("REDIRECT_FAULT_PAUSE").is_ok_and(|s| s == step) {
        let ms = std::env::var("REDIRECT_FAULT_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000);
        warn!(step, ms, "fault point: pausing before this step");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// `'text'` with quotes doubled: a SQL string literal.
#[must_use]
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `"name"` with quotes doubled: a SQL identifier.
#[must_use]
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}
