//! Step 1: preflight. Everything that can be checked is checked before anything changes;
//! then the barrier is rehearsed with nothing held, to prove the marker replicates.

use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;
use tokio_postgres::Client;

use super::catalog::{SUB_PUBLICATIONS, SUB_SLOT};
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

pub const CREATE_BARRIER: &str = "CREATE TABLE IF NOT EXISTS public.redirect_barrier (token text PRIMARY KEY, created timestamptz NOT NULL DEFAULT now())";
pub const WRITE_MARKER: &str = "INSERT INTO public.redirect_barrier (token) VALUES ($1)";
pub const SEE_MARKER: &str = "SELECT 1 FROM public.redirect_barrier WHERE token = $1";
const WRITABLE: &str = "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')";
const LOGIN_ROLES: &str = "SELECT rolname::text FROM pg_roles WHERE rolcanlogin ORDER BY 1";
const BYPASS_SESSIONS: &str = "SELECT count(*)::int8, coalesce(string_agg(DISTINCT coalesce(host(client_addr), 'local socket'), ', '), '') \
     FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
     AND application_name <> 'redirect' AND (client_addr IS NULL OR host(client_addr) <> ALL($1::text[]))";
const APPLY_WORKER: &str = "SELECT min(st.pid) FROM pg_stat_subscription st JOIN pg_subscription s ON s.oid = st.subid \
     WHERE s.subname = $1 AND st.relid IS NULL AND st.pid IS NOT NULL \
     AND s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())";
const PUBLICATION_HAS_BARRIER: &str = "SELECT count(*)::int8 FROM pg_publication_tables \
     WHERE pubname = ANY($1) AND schemaname = 'public' AND tablename = 'redirect_barrier'";
/// Whether the subscription already replicates the barrier table (a table added to a
/// publication, even FOR ALL TABLES, needs a REFRESH PUBLICATION on the subscriber).
const SUBSCRIPTION_HAS_BARRIER: &str = "SELECT count(*)::int8 FROM pg_subscription_rel sr JOIN pg_subscription s ON s.oid = sr.srsubid \
     JOIN pg_class c ON c.oid = sr.srrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE s.subname = $1 AND n.nspname = 'public' AND c.relname = 'redirect_barrier' \
     AND s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())";
/// Published tables (other than the barrier) the subscription does not know yet, as
/// `schema.table` (publisher side).
const PUBLISHED_TABLES: &str = "SELECT format('%I.%I', schemaname, tablename) FROM pg_publication_tables \
     WHERE pubname = ANY($1) AND NOT (schemaname = 'public' AND tablename = 'redirect_barrier')";
const SUBSCRIBED_TABLES: &str = "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_subscription_rel sr \
     JOIN pg_subscription s ON s.oid = sr.srsubid JOIN pg_class c ON c.oid = sr.srrelid \
     JOIN pg_namespace n ON n.oid = c.relnamespace WHERE s.subname = $1 \
     AND s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())";

/// The lag, measured until it passes the gate, or fails it for a reason waiting will not
/// mend, or `--lag-wait` has passed. Nothing is held meanwhile: clients keep writing to the
/// old server. A dry run and `--force` measure once.
async fn settle_lag(
    from_db: &Client,
    to_db: &Client,
    watch: &Watch,
    req: &FlipRequest,
    qt: Duration,
    say: &impl Fn(String),
) -> Result<lag::ReplicaLag, crate::pg::PgError> {
    const EVERY: Duration = Duration::from_millis(250);
    const SAY_EVERY: Duration = Duration::from_secs(2);
    let wait = if req.dry_run || req.force {
        Duration::ZERO
    } else {
        req.lag_wait
    };
    let started = Instant::now();
    let mut said: Option<Instant> = None;
    let mut measured_once = false;
    loop {
        let l = match lag::measure(from_db, to_db, watch, qt).await {
            Ok(l) => l,
            // Once it has been read, one reading that fails is a blip while waiting: the
            // error is the answer only at the end of the wait.
            Err(_) if measured_once && started.elapsed() < wait => {
                if !pause(req, EVERY).await {
                    return lag::measure(from_db, to_db, watch, qt).await;
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        measured_once = true;
        match lag::gate(&l, req.max_lag_bytes, req.max_lag_time) {
            Err(why) if why.is_catching_up() && started.elapsed() < wait => {
                if said.is_none_or(|t| t.elapsed() >= SAY_EVERY) {
                    say(format!(
                        "waiting for replication to catch up: {why} ({:.0}s of --lag-wait {:?} left)",
                        wait.saturating_sub(started.elapsed()).as_secs_f64(),
                        wait
                    ));
                    said = Some(Instant::now());
                }
                if !pause(req, EVERY).await {
                    return Ok(l);
                }
            }
            _ => return Ok(l),
        }
    }
}

/// Sleeps `d`; `false` if the cutover was called off meanwhile.
async fn pause(req: &FlipRequest, d: Duration) -> bool {
    tokio::select! {
        () = req.called_off.cancelled() => false,
        () = tokio::time::sleep(d) => true,
    }
}

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
    let from_db = bounded(ctl, from, "old server", qt).await?;
    let to_db = bounded(ctl, to, "new server", qt).await?;
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
    which: &'static str,
    qt: Duration,
) -> Result<Client, CutoverError> {
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
        "new server",
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
    let from_roles = roles("old server", cx.from_db, cx.qt).await?;
    let to_roles = roles("new server", cx.to_db, cx.qt).await?;
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
    which: &'static str,
    db: &Client,
    qt: Duration,
) -> Result<Vec<String>, CutoverError> {
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
        "old server",
        "listing sessions",
        cx.qt,
        cx.from_db.query_one(BYPASS_SESSIONS, &[&proxied_from]),
    )
    .await?;
    let (n_bypass, bypass_from): (i64, String) = (bypass.get(0), bypass.get(1));
    if n_bypass > 0 {
        v.note(format!(
            "WARNING: {n_bypass} session(s) on the {} bypass the proxy (from {bypass_from}); the fence cannot stop their writes",
            cx.from
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
            old: (cx.from.name(), cx.from_db),
            new: (cx.to.name(), cx.to_db),
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
            "target",
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
        format!(
            ", database(s) {}",
            lanes
                .iter()
                .map(|l| l.database.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
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

/// What preflight found in one database.
#[derive(Default)]
struct LaneCheck {
    /// Blocks; `--force` does not pass it.
    blocking: Vec<String>,
    /// Blocks unless `--force`.
    forcible: Vec<String>,
    findings: Vec<String>,
    guardrails: Vec<guardrails::Finding>,
    /// What making the barrier replicate here needs (done after the start is journaled).
    prepare: Vec<String>,
    missing: Vec<grants::Missing>,
    sequences: usize,
}

/// Every check of one database: its subscription and slot, its sequences, its guardrails,
/// whether its barrier table replicates, its way back (forward), and its grants.
async fn check_lane(
    ctl: &Controller,
    req: &FlipRequest,
    lane: &mut Lane,
    from: Role,
    to: Role,
    many: bool,
    qt: Duration,
) -> Result<LaneCheck, CutoverError> {
    let mut out = LaneCheck::default();
    let prefix = if many { lane.prefix() } else { String::new() };
    let named = |s: String| format!("{prefix}{s}");
    let sub = lane.subscription.clone().unwrap_or_default();
    lane.slot = timed(
        "new server",
        "reading the subscription",
        qt,
        lane.to_db.query_opt(SUB_SLOT, &[&sub]),
    )
    .await?
    .and_then(|r| r.get::<_, Option<String>>(0));
    let pubs: Vec<String> = timed(
        "new server",
        "reading the subscription",
        qt,
        lane.to_db.query_opt(SUB_PUBLICATIONS, &[&sub]),
    )
    .await?
    .map(|r| r.get(0))
    .unwrap_or_default();
    let mut settable = Vec::new();
    match super::sequences::read(&lane.from_db, qt).await {
        Ok(seqs) => {
            out.sequences = seqs.len();
            settable = seqs
                .into_iter()
                .filter(|s| s.last_value.is_some())
                .map(|s| s.name)
                .collect();
        }
        Err(e) => out.blocking.push(named(e.to_string())),
    }
    if pubs.is_empty() {
        out.findings.push(named(format!(
            "guardrails skipped: subscription {sub:?} subscribes to no publication the {to} can read"
        )));
    } else {
        out.guardrails = lane_guardrails(req, lane, (from, to), &sub, &pubs, qt).await;
    }
    if !barrier_replicates(lane, &pubs, &sub).await {
        out.prepare.push(named(format!("create {BARRIER_TABLE} on both servers, add it to publication {pubs:?} and refresh subscription {sub:?}")));
    }
    if to == Role::Target {
        // Rollback is only lossless if the source can subscribe to the target after the
        // flip: prove now that it can connect with the conninfo it will be given.
        if let Err(why) = probe_reverse(ctl, &lane.from_db, &lane.database, qt).await {
            out.forcible.push(named(format!(
                "the source cannot connect to the target for reverse replication ({why}), so a rollback would not be lossless; set --reverse-conninfo (or REDIRECT_REVERSE_CONNINFO) to what the source server can use; the controller adds the target's password (--target-password-file or REDIRECT_TARGET_PASSWORD) when it is for the target DSN's user"
            )));
        }
    }
    out.missing = lane_grants(lane, (from, to), &sub, &pubs, &settable, qt).await?;
    Ok(out)
}

/// What logical replication will not carry in this database, each finding named with it.
async fn lane_guardrails(
    req: &FlipRequest,
    lane: &Lane,
    (from, to): (Role, Role),
    sub: &str,
    pubs: &[String],
    qt: Duration,
) -> Vec<guardrails::Finding> {
    let mut found = guardrails::check(
        &guardrails::Replication {
            old: &lane.from_db,
            new: &lane.to_db,
            old_role: from,
            new_role: to,
            subscription: sub,
            publications: pubs,
            slot: lane.slot.as_deref(),
            qt,
            max_transaction_age: req.max_transaction_age,
        },
        &req.allow,
    )
    .await
    .unwrap_or_else(|e| vec![guardrails::check_failed(&e, &req.allow)]);
    for f in &mut found {
        f.database = Some(lane.database.clone());
    }
    found
}

/// Whether the barrier table is published and subscribed already (if not, the start of the
/// cutover makes it so).
async fn barrier_replicates(lane: &Lane, pubs: &[String], sub: &str) -> bool {
    let count = |r: Result<tokio_postgres::Row, _>| r.map_or(0, |r| r.get::<_, i64>(0));
    let published = count(
        lane.from_db
            .query_one(PUBLICATION_HAS_BARRIER, &[&pubs])
            .await,
    ) > 0;
    let subscribed = count(
        lane.to_db
            .query_one(SUBSCRIPTION_HAS_BARRIER, &[&sub])
            .await,
    ) > 0;
    published && subscribed
}

/// Every step's grants, checked now: a managed service's role has no superuser to fall back
/// on, and a step refused halfway would leave a half-done cutover to undo.
async fn lane_grants(
    lane: &Lane,
    (from, to): (Role, Role),
    sub: &str,
    pubs: &[String],
    settable: &[String],
    qt: Duration,
) -> Result<Vec<grants::Missing>, CutoverError> {
    let tables: Vec<String> = if to == Role::Target && !pubs.is_empty() {
        timed(
            "old server",
            "listing the published tables",
            qt,
            lane.from_db.query(super::replication::PUB_TABLES, &[&pubs]),
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect()
    } else {
        Vec::new()
    };
    let missing = grants::check(
        &grants::Needs {
            old: (from.name(), &lane.from_db),
            new: (to.name(), &lane.to_db),
            logical: true,
            forward: to == Role::Target,
            subscription: Some(sub),
            publications: pubs,
            tables: &tables,
            sequences: settable,
            database: Some(&lane.database),
        },
        qt,
    )
    .await?;
    Ok(missing)
}

/// Room on the target for a reverse slot and walsender per database, free slots beyond those
/// this tool made itself (they are replaced), and room on the source for an apply worker per
/// reverse subscription: without it a reverse subscription never starts, and a rollback is not
/// lossless.
const TARGET_ROOM: &str = "SELECT current_setting('max_replication_slots')::int \
     - (SELECT count(*) FROM pg_replication_slots WHERE slot_name NOT LIKE 'redirect\\_reverse%')::int, \
     current_setting('max_wal_senders')::int - (SELECT count(*) FROM pg_stat_replication)::int";
const SOURCE_ROOM: &str = "SELECT current_setting('max_logical_replication_workers')::int \
     - (SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL AND subname <> 'redirect_reverse')::int";

async fn reverse_capacity(
    source: &Client,
    target: &Client,
    databases: usize,
    qt: Duration,
) -> Result<Vec<String>, CutoverError> {
    let row = timed(
        "target",
        "checking room for reverse slots",
        qt,
        target.query_one(TARGET_ROOM, &[]),
    )
    .await?;
    let workers: i32 = timed(
        "source",
        "checking room for apply workers",
        qt,
        source.query_one(SOURCE_ROOM, &[]),
    )
    .await?
    .get(0);
    Ok(room_for_reverse(
        Room {
            slots: row.get(0),
            senders: row.get(1),
            workers,
        },
        databases,
    ))
}

/// What the servers have room for, beyond what is in use.
#[derive(Clone, Copy)]
struct Room {
    /// Replication slots on the target.
    slots: i32,
    /// Walsenders on the target.
    senders: i32,
    /// Logical replication workers on the source.
    workers: i32,
}

/// What is short for a reverse slot, walsender and apply worker per database.
fn room_for_reverse(room: Room, databases: usize) -> Vec<String> {
    let want = i32::try_from(databases).unwrap_or(i32::MAX);
    let mut short = Vec::new();
    let mut need = |have: i32, what: &str, on: &str, setting: &str| {
        if have < want {
            short.push(format!(
                "the {on} has room for {have} more {what} and a lossless rollback needs {want} (one per database): raise {setting} on the {on} (a restart)"
            ));
        }
    };
    need(
        room.slots,
        "replication slot(s)",
        "target",
        "max_replication_slots",
    );
    need(room.senders, "walsender(s)", "target", "max_wal_senders");
    need(
        room.workers,
        "logical replication worker(s)",
        "source",
        "max_logical_replication_workers (and max_worker_processes)",
    );
    short
}

/// A rehearsal of the barrier with nothing held or fenced: it proves the marker replicates
/// (a refreshed subscription restarts its worker, which can take seconds) and shows what the
/// real one will cost. Then the preflight is journaled.
pub async fn rehearse(run: &mut Run) -> Result<(), CutoverError> {
    let t0 = Instant::now();
    if run.logical && run.barrier {
        let t = Instant::now();
        let arrived =
            futures_util::future::try_join_all(run.lanes.iter().map(|l| rehearse_lane(run, l)))
                .await?;
        let what = if arrived.iter().all(|a| *a) {
            format!(
                "a marker took {:.1} ms to reach the {}{}",
                t.elapsed().as_secs_f64() * 1000.0,
                run.to,
                if run.lanes.len() > 1 {
                    format!(" in each of {} databases", run.lanes.len())
                } else {
                    String::new()
                }
            )
        } else {
            format!(
                "FORCED: a marker did not reach the {}; the barrier will likely time out",
                run.to
            )
        };
        run.rec.step(Step::Rehearsal, t, what)?;
    }
    let findings = run.report.findings.join("; ");
    let lsn = run.report.lag.as_ref().map(|l| l.source_lsn);
    run.rec.log(
        t0,
        Entry {
            step: Step::Preflight,
            source_lsn: lsn,
            detail: findings,
            ..Entry::default()
        },
    )
}

/// One database's rehearsal marker; `false`: it did not arrive (forced only).
async fn rehearse_lane(run: &Run, lane: &Lane) -> Result<bool, CutoverError> {
    let token = format!("rehearsal-{}-{}", run.rec.id, std::process::id());
    timed(
        "old server",
        "writing the rehearsal marker",
        run.qt,
        lane.from_db.execute(WRITE_MARKER, &[&token]),
    )
    .await?;
    let until = Instant::now()
        + if run.req.force {
            Duration::from_secs(1)
        } else {
            run.req.timeout
        };
    // Every 5 ms: the marker usually arrives within a few.
    let arrived = crate::poll::until(until, Duration::from_millis(5), || async {
        let seen = timed(
            "new server",
            "looking for the rehearsal marker",
            run.qt,
            lane.to_db.query_opt(SEE_MARKER, &[&token]),
        )
        .await?;
        Ok::<_, crate::pg::PgError>(seen.map(|_| ()))
    })
    .await?;
    if arrived.is_some() {
        return Ok(true);
    }
    if !run.req.force {
        let missed = Refusal::RehearsalMissed {
            to: run.to,
            timeout: run.req.timeout,
        };
        return Err(CutoverError::Preflight(missed).in_database(&lane.database));
    }
    Ok(false)
}

/// Has the source open a connection to the target with the reverse conninfo, through a
/// subscription that is created disabled, with no slot, and dropped at once.
async fn probe_reverse(
    ctl: &Controller,
    from_db: &Client,
    database: &str,
    qt: Duration,
) -> Result<(), String> {
    let conninfo = super::replication::reverse_conninfo(ctl, database);
    let probe = "redirect_probe";
    let _ = timed("source", "dropping a stale probe", qt, from_db.batch_execute(&format!(
        "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_subscription WHERE subname = '{probe}' \
         AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())) THEN \
         ALTER SUBSCRIPTION {probe} SET (slot_name = NONE); DROP SUBSCRIPTION {probe}; END IF; END $$"
    )))
    .await;
    let created = timed(
        "source",
        "probing the way back to the target",
        qt,
        from_db.batch_execute(&format!(
            "CREATE SUBSCRIPTION {probe} CONNECTION {} PUBLICATION {} \
             WITH (connect = true, enabled = false, create_slot = false, slot_name = NONE, copy_data = false)",
            super::quote_literal(&conninfo),
            super::REVERSE
        )),
    )
    .await;
    let _ = timed(
        "source",
        "dropping the probe",
        qt,
        from_db.batch_execute(&format!("DROP SUBSCRIPTION IF EXISTS {probe}")),
    )
    .await;
    created.map_err(|e| e.to_string())
}

/// The pid of a subscription's apply worker, if one runs.
async fn apply_worker(c: &Client, sub: &str) -> Option<i32> {
    c.query_opt(APPLY_WORKER, &[&sub])
        .await
        .ok()
        .flatten()
        .and_then(|r| r.get::<_, Option<i32>>(0))
}

/// Makes the barrier table replicate through the subscription, and proves it.
///
/// The subscription is refreshed with `copy_data = false` only when the barrier table is the
/// only table it does not know yet: refreshing that way would otherwise mark the user's newly
/// published tables as synced without copying them.
pub async fn prepare_barrier(
    from_db: &Client,
    to_db: &Client,
    watch: &Watch,
    qt: Duration,
) -> Result<(), CutoverError> {
    for (which, db) in [("publisher", from_db), ("subscriber", to_db)] {
        timed(
            which,
            "creating the barrier table",
            qt,
            db.batch_execute(CREATE_BARRIER),
        )
        .await?;
    }
    let sub = lag::subscription_name(to_db, watch, qt).await?;
    let pubs: Vec<String> = timed(
        "subscriber",
        "reading the subscription",
        qt,
        to_db.query_one(SUB_PUBLICATIONS, &[&sub]),
    )
    .await?
    .get(0);
    publish_barrier(from_db, &pubs, qt).await?;
    subscribe_barrier(from_db, to_db, &pubs, &sub, qt).await?;
    prove_barrier_replicates(from_db, to_db, &sub, qt).await
}

/// The barrier table in the subscription's first publication, unless one has it already.
async fn publish_barrier(
    from_db: &Client,
    pubs: &[String],
    qt: Duration,
) -> Result<(), CutoverError> {
    let n: i64 = timed(
        "publisher",
        "checking the publication",
        qt,
        from_db.query_one(PUBLICATION_HAS_BARRIER, &[&pubs]),
    )
    .await?
    .get(0);
    if n == 0 {
        let first = pubs.first().cloned().unwrap_or_default();
        timed(
            "publisher",
            "adding the barrier table",
            qt,
            from_db.batch_execute(&format!(
                "ALTER PUBLICATION {} ADD TABLE {BARRIER_TABLE}",
                quote_ident(&first)
            )),
        )
        .await?;
    }
    Ok(())
}

/// The subscription learns the barrier table (a refresh that copies nothing), unless it
/// knows it already; refused when other published tables would be marked synced uncopied.
async fn subscribe_barrier(
    from_db: &Client,
    to_db: &Client,
    pubs: &[String],
    sub: &str,
    qt: Duration,
) -> Result<(), CutoverError> {
    let m: i64 = timed(
        "subscriber",
        "checking the subscription",
        qt,
        to_db.query_one(SUBSCRIPTION_HAS_BARRIER, &[&sub]),
    )
    .await?
    .get(0);
    if m > 0 {
        return Ok(());
    }
    let names =
        |rows: Vec<tokio_postgres::Row>| -> Vec<String> { rows.iter().map(|r| r.get(0)).collect() };
    let published = names(
        timed(
            "publisher",
            "listing published tables",
            qt,
            from_db.query(PUBLISHED_TABLES, &[&pubs]),
        )
        .await?,
    );
    let subscribed = names(
        timed(
            "subscriber",
            "listing subscribed tables",
            qt,
            to_db.query(SUBSCRIBED_TABLES, &[&sub]),
        )
        .await?,
    );
    let unsynced: Vec<&String> = published
        .iter()
        .filter(|t| !subscribed.contains(t))
        .collect();
    if !unsynced.is_empty() {
        return Err(CutoverError::Preflight(Refusal::UnsyncedTables {
            publications: pubs.to_vec(),
            subscription: sub.to_owned(),
            tables: unsynced.into_iter().cloned().collect(),
        }));
    }
    timed(
        "subscriber",
        "refreshing the subscription",
        qt,
        to_db.batch_execute(&format!(
            "ALTER SUBSCRIPTION {} REFRESH PUBLICATION WITH (copy_data = false)",
            quote_ident(sub)
        )),
    )
    .await?;
    Ok(())
}

/// Proves it: a marker must arrive while the same apply worker runs before and after (a
/// refresh may restart the worker, and the launcher takes up to
/// `wal_retrieve_retry_interval`, 5 s by default, to start a new one).
async fn prove_barrier_replicates(
    from_db: &Client,
    to_db: &Client,
    sub: &str,
    qt: Duration,
) -> Result<(), CutoverError> {
    let until = Instant::now() + Duration::from_secs(15);
    let mut n = 0u32;
    loop {
        n += 1;
        let before = apply_worker(to_db, sub).await;
        let token = format!("prepare-{}-{n}", journal::new_id());
        timed(
            "publisher",
            "writing a test marker",
            qt,
            from_db.execute(WRITE_MARKER, &[&token]),
        )
        .await?;
        let seen = crate::poll::until(
            Instant::now() + Duration::from_secs(2),
            Duration::from_millis(10),
            || async {
                let seen = timed(
                    "subscriber",
                    "looking for the test marker",
                    qt,
                    to_db.query_opt(SEE_MARKER, &[&token]),
                )
                .await?;
                Ok::<_, crate::pg::PgError>(seen.map(|_| ()))
            },
        )
        .await?
        .is_some();
        if seen && before.is_some() && apply_worker(to_db, sub).await == before {
            return Ok(());
        }
        if Instant::now() > until {
            return Err(CutoverError::Preflight(Refusal::BarrierDoesNotReplicate {
                subscription: sub.to_owned(),
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_database_needs_a_reverse_slot_walsender_and_worker() {
        let plenty = Room {
            slots: 10,
            senders: 10,
            workers: 4,
        };
        assert!(room_for_reverse(plenty, 3).is_empty());
        assert!(
            room_for_reverse(plenty, 4).is_empty(),
            "exactly enough is enough"
        );
        let short = room_for_reverse(plenty, 5);
        assert_eq!(short.len(), 1, "{short:?}");
        assert!(
            short[0].contains("max_logical_replication_workers"),
            "{short:?}"
        );
        let none = Room {
            slots: 0,
            senders: 1,
            workers: 9,
        };
        let short = room_for_reverse(none, 2);
        assert!(
            short[0].contains("room for 0 more replication slot(s)"),
            "{short:?}"
        );
        assert!(short[1].contains("max_wal_senders"), "{short:?}");
    }
}
