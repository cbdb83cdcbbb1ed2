//! Step 1: preflight. Everything that can be checked is checked before anything changes;
//! then the barrier is rehearsed with nothing held, to prove the marker replicates.
//!
//! - this file: [`check`], the list of checks over one [`Verdict`];
//! - [`lag_wait`]: the lag, waited for while replication is only behind;
//! - [`lane`]: the checks of one database;
//! - [`reverse`]: the way back (room for reverse replication, and a probe of its connection);
//! - [`rehearsal`]: the barrier table made to replicate, and rehearsed.

mod lag_wait;
mod lane;
mod rehearsal;
mod reverse;

pub use rehearsal::{CREATE_BARRIER, SEE_MARKER, WRITE_MARKER, prepare, prepare_barrier, rehearse};

use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;
use tokio_postgres::Client;

use super::{
    BARRIER_TABLE, Controller, CutoverError, FlipReport, FlipRequest, Recorder, Run, Undo, grants,
    guardrails,
    journal::{self, Entry, Step},
    lane::Lane,
    quote_ident,
};
use crate::{
    datapath::Role,
    pg::{
        cluster,
        lag::{self, Replication, Watch},
        timed,
    },
    sync::lock,
};

use crate::pg::Server;
use lag_wait::settle_lag;
use lane::check_lane;
use reverse::reverse_capacity;

const WRITABLE: &str = "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')";
const LOGIN_ROLES: &str = "SELECT rolname::text FROM pg_roles WHERE rolcanlogin ORDER BY 1";
const BYPASS_SESSIONS: &str = "SELECT count(*)::int8, coalesce(string_agg(DISTINCT coalesce(host(client_addr), 'local socket'), ', '), '') \
     FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
     AND application_name <> 'redirect' AND (client_addr IS NULL OR host(client_addr) <> ALL($1::text[]))";

/// What preflight decided.
pub enum Outcome {
    /// A dry run, or nothing to do: the report is the answer.
    Report(Box<FlipReport>),
    /// Go: the cutover's state, journaled as started.
    Go(Box<Run>),
}

/// Why preflight refused a cutover, with nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// What the checks found: every blocking reason, then the guardrails that stop it.
    #[error("{}", blocked(blocking, stopped_by))]
    Blocked {
        blocking: Vec<String>,
        stopped_by: Vec<guardrails::Finding>,
    },
    /// Other published tables would be marked synced, uncopied, by the barrier's refresh.
    #[error(
        "publication {publications:?} has {} table(s) subscription {subscription:?} has never copied: {tables:?}; run `ALTER SUBSCRIPTION {} REFRESH PUBLICATION` on the subscriber (it copies them), wait until they are synced, then retry",
        tables.len(),
        quote_ident(subscription)
    )]
    UnsyncedTables {
        publications: Vec<String>,
        subscription: String,
        tables: Vec<String>,
    },
    #[error("{BARRIER_TABLE} does not replicate through subscription {subscription:?}")]
    BarrierDoesNotReplicate { subscription: String },
    #[error(
        "the {to} did not apply a rehearsal marker within --timeout {timeout:?}; nothing was changed"
    )]
    RehearsalMissed { to: Role, timeout: Duration },
    #[error("database {database}: {refusal}")]
    InDatabase {
        database: String,
        refusal: Box<Refusal>,
    },
}

fn blocked(blocking: &[String], stopped_by: &[guardrails::Finding]) -> String {
    let mut why = blocking.join("; ");
    if !stopped_by.is_empty() {
        if !why.is_empty() {
            why.push('\n');
        }
        why += &guardrails::refusal(stopped_by);
    }
    why
}

/// What the checks found so far: what blocks the cutover, and the report the operator reads.
struct Verdict {
    force: bool,
    report: FlipReport,
    /// Blocks; `--force` does not pass it.
    blocking: Vec<String>,
    /// Guardrail findings that stop the cutover: only `--allow` passes them, never `--force`.
    stopped_by: Vec<guardrails::Finding>,
}

impl Verdict {
    fn new(req: &FlipRequest, from: Role, to: Role) -> Self {
        Self {
            force: req.force,
            report: FlipReport {
                from: Some(from),
                to: Some(to),
                dry_run: req.dry_run,
                forced: req.force,
                ..FlipReport::default()
            },
            blocking: Vec::new(),
            stopped_by: Vec::new(),
        }
    }

    /// Blocks the cutover; with `--force` it is only reported.
    fn block_unless_forced(&mut self, why: String) {
        if self.force {
            self.report.findings.push(format!("FORCED: {why}"));
        } else {
            self.blocking.push(why);
        }
    }

    fn note(&mut self, finding: String) {
        self.report.findings.push(finding);
    }

    /// The end of the checks: `true` when the report is the answer (a dry run), an error
    /// when something blocks, `false` to go ahead. What blocks is in the report as well.
    fn decide(&mut self, dry_run: bool) -> Result<bool, CutoverError> {
        let blocked = !self.blocking.is_empty() || !self.stopped_by.is_empty();
        if blocked {
            let blocking = self.blocking.iter().map(|b| format!("BLOCKING: {b}"));
            self.report.findings.extend(blocking);
            if !dry_run {
                return Err(CutoverError::Preflight(Refusal::Blocked {
                    blocking: self.blocking.clone(),
                    stopped_by: self.stopped_by.clone(),
                }));
            }
        }
        Ok(dry_run)
    }
}

/// What every check reads: the request, the direction and the two servers' sessions.
struct Ctx<'a> {
    ctl: &'a std::sync::Arc<Controller>,
    req: &'a FlipRequest,
    from: Role,
    to: Role,
    from_db: &'a Client,
    to_db: &'a Client,
    qt: Duration,
    say: &'a (dyn Fn(String) + Sync),
}

/// What the databases' checks leave for the start of the cutover.
#[derive(Default)]
struct Carried {
    /// What making the barrier replicate needs (done after the start is journaled).
    prepare: Vec<String>,
    /// Grants a step would be refused, from every database and the cluster.
    missing: Vec<grants::Missing>,
    sequences: usize,
}

/// Checks everything, journals the start (with the subscription and slot relied on), and
/// hands back the cutover's state. Nothing is changed on any server or in the datapath.
pub async fn check(
    ctl: &std::sync::Arc<Controller>,
    req: FlipRequest,
    progress: UnboundedSender<String>,
) -> Result<Outcome, CutoverError> {
    let qt = ctl.databases()?.query_timeout;
    let (from, to) = (ctl.active()?, req.to);
    if from == to {
        return Err(CutoverError::AlreadyThere(to));
    }
    // A fleet cutover needs etcd and every member: find out now, bounded, not after the
    // hold was committed (a dry run says so too: it would not pass).
    fleet_ready(ctl, &req).await?;
    let t0 = Instant::now();
    let from_db = bounded(ctl, from, Server::Old, qt).await?;
    let to_db = bounded(ctl, to, Server::New, qt).await?;
    let (from_snat, snat_ports) = snat_of(ctl, from)?;
    let mut watch = ctl.watch_for(to)?;
    let logical = watch.replication == Replication::Logical;
    let mut v = Verdict::new(&req, from, to);
    let say = |s: String| {
        let _ = progress.send(s);
    };
    let cx = Ctx {
        ctl,
        req: &req,
        from,
        to,
        from_db: &from_db,
        to_db: &to_db,
        qt,
        say: &say,
    };
    let no_replication = replication(&cx, &watch, &mut v).await?;
    if logical {
        databases(&cx, &watch, &mut v).await?;
    }
    writable(&cx, logical, &mut v).await?;
    login_roles(&cx, &mut v).await?;
    bypassing_sessions(&cx, &from_snat, &mut v).await?;
    let mut lanes = open_lanes(&cx, &watch.home, logical, &v.report).await?;
    let carried = logical && !(lanes.is_empty() && no_replication && req.force);
    if carried && lanes.is_empty() && v.blocking.is_empty() {
        v.blocking.push(format!(
            "no database is replicated from the {from} to the {to}: nothing would carry its writes"
        ));
    }
    let mut found = check_lanes(&cx, &mut lanes, &mut v).await?;
    plan_the_barrier(&cx, carried, logical, lanes.len(), found.sequences, &mut v).await;
    if lanes.is_empty() {
        found.missing.extend(cluster_grants(&cx).await?);
    }
    if carried && to == Role::Target && !lanes.is_empty() {
        for why in reverse_capacity(&from_db, &to_db, lanes.len(), qt).await? {
            v.block_unless_forced(why);
        }
    }
    missing_grants(found.missing, &mut v);
    // Journaled at start, so a rollback or a successor finds them without --subscription.
    let home_lane = lanes.iter().find(|l| l.database == watch.home);
    watch.subscription = home_lane.and_then(|l| l.subscription.clone());
    let slot = home_lane.and_then(|l| l.slot.clone());
    plan_the_steps(&cx, logical, &found.prepare, &mut v.report).await;
    if v.decide(req.dry_run)? {
        return Ok(Outcome::Report(Box::new(v.report)));
    }
    if req.force {
        say(
            "WARNING: --force: the lag gate is skipped; writes not yet replicated may be lost"
                .into(),
        );
    }
    let mut rec = journal_the_start(&cx, t0, &watch, slot, logical, &lanes, progress.clone())?;
    prepare_barriers(&lanes, &found.prepare, &mut rec, qt).await?;
    let now = Instant::now();
    Ok(Outcome::Go(Box::new(Run {
        ctl: ctl.clone(),
        from,
        to,
        from_db,
        to_db,
        from_snat,
        snat_ports,
        logical,
        qt,
        watch,
        lanes,
        held_at: now,
        fenced_at: None,
        deadline: now + req.timeout,
        rec,
        report: v.report,
        undo: Undo::default(),
        lease: None,
        barrier: carried || !logical,
        fleet: None,
        req,
    })))
}

/// In a fleet: etcd answers and every rostered member is live, within `--etcd-timeout`.
async fn fleet_ready(ctl: &Controller, req: &FlipRequest) -> Result<(), CutoverError> {
    if let Some(fleet) = &ctl.fleet {
        fleet
            .ready(req.etcd_timeout)
            .await
            .map_err(CutoverError::FleetNotReady)?;
    }
    Ok(())
}

/// A session to `role`'s server whose statements end when the controller gives up on them:
/// a timed-out query must not keep running (holding locks, or queueing the undo behind it on
/// the same session).
async fn bounded(
    ctl: &Controller,
    role: Role,
    which: impl Into<Server>,
    qt: Duration,
) -> Result<Client, CutoverError> {
    let which: Server = which.into();
    let c = ctl.dsn(role)?.connect().await?;
    let bound = format!("SET statement_timeout = {}", qt.as_millis().max(1));
    timed(which, "bounding statements", qt, c.batch_execute(&bound)).await?;
    Ok(c)
}

/// The address the old server sees proxied sessions come from, and the SNAT port range.
fn snat_of(ctl: &Controller, from: Role) -> Result<(String, (u16, u16)), CutoverError> {
    let maps = lock(&ctl.host.maps);
    let cfg = maps.config()?;
    let snat = maps
        .backend(from)?
        .map(|b| b.snat.to_string())
        .unwrap_or_default();
    Ok((snat, (cfg.snat_port_min, cfg.snat_port_max)))
}

/// Replication health and lag, waited for (`--lag-wait`) while only behind. A rollback
/// without working reverse replication cannot be lossless; with `--force` it goes ahead
/// without a barrier, and says so. Answers whether there is no replication to rely on.
async fn replication(cx: &Ctx<'_>, watch: &Watch, v: &mut Verdict) -> Result<bool, CutoverError> {
    let (req, to) = (cx.req, cx.to);
    let waited = Instant::now();
    let measured = settle_lag(cx.from_db, cx.to_db, watch, req, cx.qt, &cx.say).await;
    if req.called_off.is_cancelled() {
        return Err(CutoverError::CalledOff);
    }
    // A fleet member may have gone while preflight waited: find out before the hold.
    if waited.elapsed() > Duration::from_secs(1) {
        fleet_ready(cx.ctl, req).await?;
    }
    let rollback = to == Role::Source;
    match measured {
        Ok(l) => {
            (cx.say)(format!(
                "lag: {} bytes, {:.3} s ({})",
                lag::bytes_text(l.bytes),
                l.seconds,
                if l.healthy { "healthy" } else { "UNHEALTHY" }
            ));
            let mut no_replication = false;
            if let Err(why) = lag::gate(&l, req.max_lag_bytes, req.max_lag_time) {
                // Only a rollback may go ahead with no barrier: forced forward, the barrier
                // still guards the flip (and times out if replication is broken).
                no_replication = rollback && !l.healthy;
                v.block_unless_forced(if no_replication {
                    format!(
                        "rollback cannot be lossless: no working reverse replication from the target ({}); pass --force to flip back anyway, losing the target's writes since the cutover",
                        l.problems.join("; ")
                    )
                } else {
                    why.to_string()
                });
            }
            v.report.lag = Some(l);
            Ok(no_replication)
        }
        Err(e) => {
            v.block_unless_forced(if rollback {
                format!(
                    "rollback cannot be lossless: no reverse replication from the target ({e}); pass --force to flip back anyway, losing the target's writes since the cutover"
                )
            } else {
                format!("cannot read replication lag: {e}")
            });
            Ok(rollback)
        }
    }
}

/// Every database behind the VIP moves with it: each needs its writes carried. Found from
/// the catalogs, whatever the lag reading gave, and never passed by `--force` forward: a
/// database with data and nothing to carry it loses its writes for certain. A rollback too:
/// a database made on the target since the cutover, or one whose way back is gone, would
/// lose its writes; there `--force` ("losing the target's writes") may pass it, as it passes
/// a rollback without reverse replication.
async fn databases(cx: &Ctx<'_>, watch: &Watch, v: &mut Verdict) -> Result<(), CutoverError> {
    let found = cluster::discover(cx.ctl.dsn(cx.from)?, cx.from_db, cx.to_db, watch, cx.qt).await?;
    for line in cluster::describe(&found) {
        (cx.say)(line);
    }
    for d in &found {
        if let Some(problem) = &d.problem {
            if cx.to == Role::Target {
                v.blocking.push(problem.clone());
            } else {
                v.block_unless_forced(problem.clone());
            }
        } else if d.coverage == cluster::Coverage::Excluded {
            v.note(format!(
                "WARNING: database {} is left out (--databases/--exclude-databases): its clients move with the VIP with no barrier, no sequence sync and no way back",
                d.name
            ));
        }
    }
    v.report.databases = found;
    Ok(())
}

/// A logical target takes writes; a physical one is a standby to promote.
async fn writable(cx: &Ctx<'_>, logical: bool, v: &mut Verdict) -> Result<(), CutoverError> {
    let to = cx.to;
    let row = timed(
        Server::New,
        "checking writability",
        cx.qt,
        cx.to_db.query_one(WRITABLE, &[]),
    )
    .await?;
    let (in_recovery, read_only): (bool, String) = (row.get(0), row.get(1));
    if logical && (in_recovery || read_only == "on") {
        v.blocking.push(format!(
            "the {to} is not writable (in recovery: {in_recovery}, read only: {read_only})"
        ));
    }
    if !logical && !in_recovery {
        v.blocking.push(format!(
            "the {to} is not a standby, so there is nothing to promote"
        ));
    }
    Ok(())
}

/// Every login role of the old server exists on the new one.
async fn login_roles(cx: &Ctx<'_>, v: &mut Verdict) -> Result<(), CutoverError> {
    let from_roles = roles(Server::Old, cx.from_db, cx.qt).await?;
    let to_roles = roles(Server::New, cx.to_db, cx.qt).await?;
    let missing: Vec<&String> = from_roles
        .iter()
        .filter(|r| !to_roles.contains(r))
        .collect();
    if !missing.is_empty() {
        v.block_unless_forced(format!(
            "login roles missing on the {}: {missing:?} (their new connections would fail)",
            cx.to
        ));
    }
    Ok(())
}

async fn roles(
    which: impl Into<Server>,
    db: &Client,
    qt: Duration,
) -> Result<Vec<String>, CutoverError> {
    let which: Server = which.into();
    let rows = timed(which, "listing roles", qt, db.query(LOGIN_ROLES, &[])).await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Sessions on the old server that do not come through this proxy (or, in a fleet, any
/// member): the fence cannot stop their writes.
async fn bypassing_sessions(
    cx: &Ctx<'_>,
    from_snat: &str,
    v: &mut Verdict,
) -> Result<(), CutoverError> {
    let mut proxied_from = vec![from_snat.to_owned()];
    if let Some(fleet) = &cx.ctl.fleet {
        proxied_from.extend(fleet.members_snat().await);
    }
    let bypass = timed(
        Server::Old,
        "listing sessions",
        cx.qt,
        cx.from_db.query_one(BYPASS_SESSIONS, &[&proxied_from]),
    )
    .await?;
    let (n_bypass, bypass_from): (i64, String) = (bypass.get(0), bypass.get(1));
    socket_mode_unhooked(cx, v)?;
    if n_bypass > 0 {
        v.note(format!(
            "WARNING: {n_bypass} session(s) on the {} bypass the proxy (from {bypass_from}); the fence cannot stop their writes",
            cx.from
        ));
    }
    Ok(())
}

/// Socket mode: this host's connections to the old server that did not come through the hook
/// (connected before the hooks were attached, or from outside `--cgroup`). The fence ends them
/// too (their address is this host's, so the check above counts them as ours), but a client
/// that connects to the server's own address reconnects there.
fn socket_mode_unhooked(cx: &Ctx<'_>, v: &mut Verdict) -> Result<(), CutoverError> {
    let maps = lock(&cx.ctl.host.maps);
    if !maps.is_socket_mode()? {
        return Ok(());
    }
    let unhooked = crate::host::sockets::unhooked_to(&maps, cx.from)?;
    if !unhooked.is_empty() {
        let from: Vec<String> = unhooked.iter().map(|s| s.local.to_string()).collect();
        v.note(format!(
            "WARNING: {} connection(s) from this host to the {} did not come through the hook (connected before it was attached, or from outside --cgroup; from {}): the fence ends their sessions, but a client whose DSN names the server reconnects there",
            unhooked.len(),
            cx.from,
            from.join(", ")
        ));
    }
    Ok(())
}

/// The databases this cutover carries, each over its own sessions (a lane): forward, every
/// replicated one discovery found; a rollback, every one with a reverse subscription. A
/// forced rollback carries the databases whose way back works, and only the others' target
/// writes are given up.
async fn open_lanes(
    cx: &Ctx<'_>,
    home: &str,
    logical: bool,
    report: &FlipReport,
) -> Result<Vec<Lane>, CutoverError> {
    let lane_dbs: Vec<(String, Option<String>)> = if !logical {
        Vec::new()
    } else if cx.to == Role::Target {
        report
            .databases
            .iter()
            .filter(|d| d.coverage == cluster::Coverage::Replicated)
            .map(|d| (d.name.clone(), d.subscription.clone()))
            .collect()
    } else {
        report
            .lag
            .as_ref()
            .map(|l| {
                l.databases
                    .iter()
                    .filter(|d| d.subscription.is_some() && (d.healthy || !cx.req.force))
                    .map(|d| (d.database.clone(), d.subscription.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut lanes = Vec::new();
    for (name, sub) in lane_dbs {
        let (from, to) = (cx.ctl.dsn(cx.from)?, cx.ctl.dsn(cx.to)?);
        lanes.push(Lane::open(&name, from, to, home, sub, None, cx.qt).await?);
    }
    Ok(lanes)
}

/// Every database's own checks ([`check_lane`]), gathered.
async fn check_lanes(
    cx: &Ctx<'_>,
    lanes: &mut [Lane],
    v: &mut Verdict,
) -> Result<Carried, CutoverError> {
    let mut out = Carried::default();
    let many = lanes.len() > 1;
    for lane in lanes {
        let checked = check_lane(cx.ctl, cx.req, lane, cx.from, cx.to, many, cx.qt).await?;
        out.sequences += checked.sequences;
        v.blocking.extend(checked.blocking);
        for why in checked.forcible {
            v.block_unless_forced(why);
        }
        v.report.findings.extend(checked.findings);
        v.stopped_by
            .extend(checked.guardrails.iter().filter(|f| f.stops()).cloned());
        v.report.guardrails.extend(checked.guardrails);
        out.prepare.extend(checked.prepare);
        for m in checked.missing {
            if !out.missing.contains(&m) {
                out.missing.push(m);
            }
        }
    }
    Ok(out)
}

/// What guards the flip, in the plan: a marker row through each database's replication, the
/// WAL position of a physical standby (whose guardrails are checked here), or nothing (a
/// forced rollback with no replication).
async fn plan_the_barrier(
    cx: &Ctx<'_>,
    carried: bool,
    logical: bool,
    lanes: usize,
    sequences: usize,
    v: &mut Verdict,
) {
    let (from, to) = (cx.from, cx.to);
    if carried {
        let count = |p: fn(&guardrails::Finding) -> bool| {
            v.report.guardrails.iter().filter(|f| p(f)).count()
        };
        (cx.say)(format!(
            "guardrails: {} blocking, {} allowed, {} note(s)",
            count(guardrails::Finding::stops),
            count(|f| f.allowed),
            count(|f| !f.blocks)
        ));
        v.note(format!("{sequences} sequence(s) to sync"));
        v.report.plan.push(format!(
            "barrier: a marker row in {BARRIER_TABLE}, written on the {from} after the fence, seen on the {to}{}",
            if lanes > 1 {
                format!(", in each of {lanes} databases side by side")
            } else {
                String::new()
            }
        ));
    } else if logical {
        v.note("guardrails skipped: there is no replication to check (forced rollback)".to_owned());
        v.report.plan.push(format!(
            "NO barrier (forced, no replication): the {to} will not have the {from}'s writes since the last cutover"
        ));
    } else {
        v.note(guardrails::PHYSICAL.to_owned());
        let found = guardrails::check_physical(
            &guardrails::Replication {
                old: cx.from_db,
                new: cx.to_db,
                old_role: from,
                new_role: to,
                subscription: "",
                publications: &[],
                slot: None,
                qt: cx.qt,
                max_transaction_age: cx.req.max_transaction_age,
            },
            &cx.req.allow,
        )
        .await
        .unwrap_or_else(|e| vec![guardrails::check_failed(&e, &cx.req.allow)]);
        v.stopped_by
            .extend(found.iter().filter(|f| f.stops()).cloned());
        v.report.guardrails = found;
        v.report.plan.push(format!(
            "barrier: the {to} replays up to the {from}'s WAL insert position after the fence, then is promoted"
        ));
    }
}

/// With no database to carry (physical, or a forced flip): the cluster-wide grants only.
async fn cluster_grants(cx: &Ctx<'_>) -> Result<Vec<grants::Missing>, CutoverError> {
    let missing = grants::check(
        &grants::Needs {
            old: (cx.from, cx.from_db),
            new: (cx.to, cx.to_db),
            logical: false,
            forward: false,
            subscription: None,
            publications: &[],
            tables: &[],
            sequences: &[],
            database: None,
        },
        cx.qt,
    )
    .await?;
    Ok(missing)
}

/// A grant a step needs blocks; one only the rollback needs blocks unless `--force`.
fn missing_grants(missing: Vec<grants::Missing>, v: &mut Verdict) {
    for m in missing {
        if m.for_rollback {
            v.block_unless_forced(format!("{m}; without it a rollback would not be lossless"));
        } else {
            v.blocking.push(m.to_string());
        }
    }
}

/// The plan's steps, in order: what the barrier needs first, then the cutover itself.
async fn plan_the_steps(cx: &Ctx<'_>, logical: bool, prepare: &[String], report: &mut FlipReport) {
    let (from, to, req) = (cx.from, cx.to, cx.req);
    report.plan.splice(0..0, prepare.iter().cloned());
    // The reverse slot becomes a failover slot when the target (17+) has a standby.
    let reverse_failover = if to == Role::Target && logical {
        timed(
            Role::Target,
            "looking for standbys",
            cx.qt,
            super::failover::standbys(cx.to_db),
        )
        .await
        .ok()
        .filter(super::failover::Standbys::failover_slots)
        .map(|s| {
            format!(
                ", as a failover slot: the target is 17+ and standby slot(s) {} stream from it",
                s.slots.join(", ")
            )
        })
        .unwrap_or_default()
    } else {
        String::new()
    };
    report.plan.extend([
        format!("hold new connections (SYNs parked in the kernel; lease renewed, at most {:?})", req.timeout),
        format!("fence: drop every data packet of proxied connections to the {from}; end every proxied session there (busy or idle) and wait for them to exit"),
        "sync sequences".to_owned(),
        if to == Role::Target && logical {
            format!("reverse replication {to} -> {from} ({}{reverse_failover}) for a lossless rollback", super::REVERSE)
        } else if logical {
            format!("stop the reverse replication {from} -> {to}; restart the forward one")
        } else {
            format!("promote the {to}")
        },
        format!("flip: new connections go to the {to}; release the held ones to it"),
        format!("drain the {from}'s connections for {:?}, then end the rest (their clients are told)", req.drain_timeout),
    ]);
}

/// Journals the start, with the subscription and slot relied on and the databases carried.
fn journal_the_start(
    cx: &Ctx<'_>,
    t0: Instant,
    watch: &Watch,
    slot: Option<String>,
    logical: bool,
    lanes: &[Lane],
    progress: UnboundedSender<String>,
) -> Result<Recorder, CutoverError> {
    let (from, to, req) = (cx.from, cx.to, cx.req);
    let mut rec = Recorder::new(&cx.ctl.journal_path, journal::new_id(), from, to, progress)?;
    let databases = if lanes.len() > 1 || lanes.iter().any(|l| l.database != watch.home) {
        format!(", database(s) {}", super::lane::names(lanes))
    } else {
        String::new()
    };
    rec.log(
        t0,
        Entry {
            step: Step::Start,
            subscription: watch.subscription.clone().filter(|_| logical),
            slot,
            drain_timeout_ms: Some(
                u64::try_from(req.drain_timeout.as_millis()).unwrap_or(u64::MAX),
            ),
            detail: format!(
                "cutover {from} -> {to}{}{databases}",
                if req.force { " (FORCED)" } else { "" },
            ),
            ..Entry::default()
        },
    )?;
    Ok(rec)
}

/// Makes the barrier table replicate in every database that needs it; a failure is journaled
/// as the end of this cutover, with nothing changed.
async fn prepare_barriers(
    lanes: &[Lane],
    prepare: &[String],
    rec: &mut Recorder,
    qt: Duration,
) -> Result<(), CutoverError> {
    if prepare.is_empty() {
        return Ok(());
    }
    let t = Instant::now();
    for lane in lanes {
        let watch = Watch::one(Replication::Logical, lane.subscription.clone());
        if let Err(e) = prepare_barrier(&lane.from_db, &lane.to_db, &watch, qt).await {
            let e = e.in_database(&lane.database);
            let _ = rec.step(Step::Aborted, t, format!("{e}; nothing was changed"));
            return Err(e);
        }
    }
    rec.step(Step::Prepare, t, prepare.join("; "))?;
    Ok(())
}
