//! The safe cutover: hold new connections, fence writes on the old server, wait until the new
//! server has applied the old one's last write (an LSN barrier observed directly), sync
//! sequences, set up reverse replication, flip, release the held connections, drain.
//!
//! Every failure before the flip undoes what was done (fence, hold, disabled subscription,
//! reverse slot) and releases the held connections to the old server, so nothing is left
//! half-done. The kernel enforces a deadline on the hold and the pre-flip fence itself, so even
//! a controller killed mid-cutover cannot strand clients.

pub mod journal;

use std::{
    fmt::Write as _,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::Ebpf;
use redirect_common::{
    ct::CtKey,
    cutover::{Cutover, HeldSyn, NO_FENCE},
};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;
use tokio_postgres::Client;

use self::journal::{Entry, Journal};
use crate::{
    clock,
    conntrack::{self, ConnState},
    datapath::{self, Maps, Role},
    pg::{
        Dsn, PgError,
        lag::{self, ReplicaLag, Replication, Watch},
        parse_lsn, timed,
    },
};

/// The name of the reverse publication, slot and subscription used for lossless rollback.
pub const REVERSE: &str = "redirect_reverse";
/// The table whose marker row is the LSN barrier.
pub const BARRIER_TABLE: &str = "public.redirect_barrier";

const CREATE_BARRIER: &str = "CREATE TABLE IF NOT EXISTS public.redirect_barrier (token text PRIMARY KEY, created timestamptz NOT NULL DEFAULT now())";
const WRITE_MARKER: &str = "INSERT INTO public.redirect_barrier (token) VALUES ($1)";
const SEE_MARKER: &str = "SELECT 1 FROM public.redirect_barrier WHERE token = $1";
const CURRENT_LSN: &str = "SELECT pg_current_wal_lsn()::text";
const WRITABLE: &str = "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')";
const LOGIN_ROLES: &str = "SELECT rolname::text FROM pg_roles WHERE rolcanlogin ORDER BY 1";
const SEQUENCES: &str = "SELECT quote_ident(schemaname) || '.' || quote_ident(sequencename), last_value FROM pg_sequences";
const BYPASS_SESSIONS: &str = "SELECT count(*)::int8, coalesce(string_agg(DISTINCT coalesce(host(client_addr), 'local socket'), ', '), '') \
     FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
     AND application_name <> 'redirect' AND (client_addr IS NULL OR host(client_addr) <> $1)";
/// Proxied sessions that may be mid-write: running a statement, or inside a transaction.
/// Idle sessions are fenced by the network and cannot start one.
/// The candidates are materialized first: in a single WHERE the planner may evaluate
/// `pg_terminate_backend()` before the other conditions, ending sessions (a walsender!) that
/// they would have excluded.
const TERMINATE_BUSY: &str = "WITH busy AS MATERIALIZED (SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' \
     AND pid <> pg_backend_pid() AND application_name <> 'redirect' AND host(client_addr) = $1 \
     AND (state <> 'idle' OR backend_xid IS NOT NULL)) SELECT pid FROM busy WHERE pg_terminate_backend(pid)";
const STILL_RUNNING: &str = "SELECT count(*)::int8 FROM pg_stat_activity WHERE pid = ANY($1)";
const TERMINATE_TUPLES: &str = "WITH drained AS MATERIALIZED (SELECT pid, client_port FROM pg_stat_activity WHERE backend_type = 'client backend' \
     AND pid <> pg_backend_pid() AND application_name <> 'redirect' AND host(client_addr) = $1 \
     AND client_port = ANY($2)) SELECT client_port FROM drained WHERE pg_terminate_backend(pid)";
const SUB_SLOT: &str = "SELECT subslotname::text FROM pg_subscription WHERE subname = $1";
const APPLY_WORKER: &str = "SELECT st.pid FROM pg_stat_subscription st JOIN pg_subscription s ON s.oid = st.subid \
     WHERE s.subname = $1 AND st.relid IS NULL";
const PUBLICATION_HAS_BARRIER: &str = "SELECT count(*)::int8 FROM pg_publication_tables \
     WHERE pubname = ANY($1) AND schemaname = 'public' AND tablename = 'redirect_barrier'";
const SUB_PUBLICATIONS: &str =
    "SELECT subpublications::text[] FROM pg_subscription WHERE subname = $1";
/// Whether the subscription already replicates the barrier table (a table added to a
/// publication, even FOR ALL TABLES, needs a REFRESH PUBLICATION on the subscriber).
const SUBSCRIPTION_HAS_BARRIER: &str = "SELECT count(*)::int8 FROM pg_subscription_rel sr JOIN pg_subscription s ON s.oid = sr.srsubid      JOIN pg_class c ON c.oid = sr.srrelid JOIN pg_namespace n ON n.oid = c.relnamespace      WHERE s.subname = $1 AND n.nspname = 'public' AND c.relname = 'redirect_barrier'";

/// What the operator asked for.
#[derive(Clone, Debug)]
pub struct FlipRequest {
    pub to: Role,
    pub max_lag_bytes: u64,
    pub max_lag_time: Duration,
    pub timeout: Duration,
    pub drain_timeout: Duration,
    pub dry_run: bool,
    pub force: bool,
}

/// What a cutover did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FlipReport {
    pub from: Option<Role>,
    pub to: Option<Role>,
    pub dry_run: bool,
    pub forced: bool,
    pub findings: Vec<String>,
    pub plan: Vec<String>,
    pub lag: Option<ReplicaLag>,
    pub fence_lsn: Option<String>,
    pub applied_lsn: Option<String>,
    pub sequences_synced: u64,
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

/// Why a cutover did not happen (after undoing whatever it had started).
#[derive(Debug, thiserror::Error)]
pub enum CutoverError {
    #[error("another cutover is in progress")]
    Busy,
    #[error("no databases configured: start `redirect run` with --source-dsn and --target-dsn")]
    NoDatabases,
    #[error("preflight failed: {0}")]
    Preflight(String),
    #[error("{0}")]
    Refused(String),
    #[error("{step}: {source} (rolled back: the source is writable and new connections go to it)")]
    Aborted {
        step: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("datapath: {0}")]
    Datapath(#[from] datapath::DatapathError),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
}

/// How to reach the two servers.
#[derive(Clone, Debug)]
pub struct Databases {
    pub source: Dsn,
    pub target: Dsn,
    pub replication: Replication,
    /// The forward subscription on the target (logical).
    pub subscription: Option<String>,
    /// How the source reaches the target for reverse replication (default: the target DSN).
    pub reverse_conninfo: Option<String>,
    pub query_timeout: Duration,
}

/// The controller state a cutover works on, shared with the control socket and `/metrics`.
pub struct Controller {
    pub maps: Mutex<Maps>,
    pub ebpf: Mutex<Ebpf>,
    pub db: Option<Databases>,
    pub journal_path: PathBuf,
    pub busy: tokio::sync::Mutex<()>,
    pub phase: Mutex<&'static str>,
    pub last_lag: Mutex<Option<ReplicaLag>>,
    pub last_report: Mutex<Option<FlipReport>>,
}

fn other(role: Role) -> Role {
    match role {
        Role::Source => Role::Target,
        Role::Target => Role::Source,
    }
}

/// Journals steps with their timings.
struct Recorder {
    journal: Journal,
    id: String,
    from: Role,
    to: Role,
    steps: Vec<(String, f64)>,
    progress: UnboundedSender<String>,
}

impl Recorder {
    fn log(
        &mut self,
        step: &str,
        since: Instant,
        lsns: (Option<String>, Option<String>),
        detail: String,
    ) -> Result<(), CutoverError> {
        let ms = since.elapsed().as_secs_f64() * 1000.0;
        self.steps.push((step.to_owned(), ms));
        let _ = self
            .progress
            .send(format!("{step:<10} {ms:>8.1} ms  {detail}"));
        self.journal.append(Entry {
            cutover: self.id.clone(),
            step: step.to_owned(),
            from: self.from.name().to_owned(),
            to: self.to.name().to_owned(),
            duration_ms: Some(ms),
            source_lsn: lsns.0,
            target_lsn: lsns.1,
            detail,
            ..Entry::default()
        })?;
        Ok(())
    }
}

/// What has to be undone if the cutover stops before the flip.
#[derive(Default)]
struct Undo {
    datapath: bool,
    /// The subscription disabled to stop forward replication, and on which side.
    disabled_subscription: Option<(Role, String)>,
    reverse_slot: bool,
}

impl Controller {
    fn set_phase(&self, p: &'static str) {
        *self.phase.lock().expect("phase lock") = p;
    }

    fn dsn(&self, role: Role) -> Result<&Dsn, CutoverError> {
        let db = self.db.as_ref().ok_or(CutoverError::NoDatabases)?;
        Ok(match role {
            Role::Source => &db.source,
            Role::Target => &db.target,
        })
    }

    /// The replication that carries `from`'s writes to `to`: the forward subscription, or the
    /// reverse one set up by an earlier cutover.
    fn watch_for(&self, to: Role) -> Result<Watch, CutoverError> {
        let db = self.db.as_ref().ok_or(CutoverError::NoDatabases)?;
        Ok(match to {
            Role::Target => Watch {
                replication: db.replication,
                subscription: db.subscription.clone(),
            },
            Role::Source => Watch {
                replication: Replication::Logical,
                subscription: Some(REVERSE.to_owned()),
            },
        })
    }

    /// Lag of the replication feeding the backend that is not active now.
    pub async fn measure_lag(&self) -> Result<ReplicaLag, CutoverError> {
        let db = self.db.as_ref().ok_or(CutoverError::NoDatabases)?;
        let active = self
            .maps
            .lock()
            .expect("maps lock")
            .active()?
            .unwrap_or(Role::Source);
        let (from, to) = (active, other(active));
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
        *self.last_lag.lock().expect("lag lock") = Some(lag.clone());
        Ok(lag)
    }

    /// Runs a safe cutover to `req.to`, reporting progress lines on `progress`.
    pub async fn cutover(
        self: &Arc<Self>,
        req: FlipRequest,
        progress: UnboundedSender<String>,
    ) -> Result<FlipReport, CutoverError> {
        // Waits briefly for start-up work (recovery, preparation); refuses a concurrent cutover.
        let _guard = match tokio::time::timeout(Duration::from_secs(30), self.busy.lock()).await {
            Ok(g) if *self.phase.lock().expect("phase lock") == "idle" => g,
            _ => return Err(CutoverError::Busy),
        };
        let db = self.db.clone().ok_or(CutoverError::NoDatabases)?;
        let qt = db.query_timeout;
        let from = self
            .maps
            .lock()
            .expect("maps lock")
            .active()?
            .unwrap_or(Role::Source);
        let to = req.to;
        if from == to {
            return Err(CutoverError::Refused(format!(
                "new connections already go to the {to}"
            )));
        }
        let mut report = FlipReport {
            from: Some(from),
            to: Some(to),
            dry_run: req.dry_run,
            forced: req.force,
            ..FlipReport::default()
        };
        let say = |s: String| {
            let _ = progress.send(s);
        };
        self.set_phase("preflight");
        let t0 = Instant::now();
        let from_db = self.dsn(from)?.connect().await?;
        let to_db = self.dsn(to)?.connect().await?;
        let from_snat = self
            .maps
            .lock()
            .expect("maps lock")
            .backend(from)?
            .map(|b| b.snat.to_string())
            .unwrap_or_default();
        let watch = self.watch_for(to)?;
        let logical = watch.replication == Replication::Logical;

        // 1. Preflight: everything that can fail is checked before anything changes.
        let mut blocking = Vec::new();
        let lag = lag::measure(&from_db, &to_db, &watch, qt).await;
        match &lag {
            Ok(l) => {
                say(format!("lag: {} bytes, {:.3} s ({})", l.bytes, l.seconds, if l.healthy { "healthy" } else { "UNHEALTHY" }));
                if let Err(why) = lag::gate(l, req.max_lag_bytes, req.max_lag_time) {
                    let why = if to == Role::Source && !l.healthy {
                        format!(
                            "rollback cannot be lossless: no working reverse replication from the target ({}); pass --force to flip back anyway, losing the target's writes since the cutover",
                            l.problems.join("; ")
                        )
                    } else {
                        why
                    };
                    if req.force {
                        report.findings.push(format!("FORCED past the lag gate: {why}"));
                    } else {
                        blocking.push(why);
                    }
                }
                report.lag = Some(l.clone());
            }
            Err(e) if to == Role::Source && !req.force => blocking.push(format!(
                "rollback cannot be lossless: no reverse replication from the target ({e}); pass --force to flip back anyway, losing the target's writes since the cutover"
            )),
            Err(e) if req.force => report.findings.push(format!("FORCED without a lag reading: {e}")),
            Err(e) => blocking.push(format!("cannot read replication lag: {e}")),
        }
        let row = timed(
            "target",
            "checking writability",
            qt,
            to_db.query_one(WRITABLE, &[]),
        )
        .await?;
        let (in_recovery, read_only): (bool, String) = (row.get(0), row.get(1));
        if logical && (in_recovery || read_only == "on") {
            blocking.push(format!(
                "the {to} is not writable (in recovery: {in_recovery}, read only: {read_only})"
            ));
        }
        if !logical && !in_recovery {
            blocking.push(format!(
                "the {to} is not a standby, so there is nothing to promote"
            ));
        }
        let from_roles: Vec<String> = timed(
            "source",
            "listing roles",
            qt,
            from_db.query(LOGIN_ROLES, &[]),
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
        let to_roles: Vec<String> =
            timed("target", "listing roles", qt, to_db.query(LOGIN_ROLES, &[]))
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
        let missing: Vec<&String> = from_roles
            .iter()
            .filter(|r| !to_roles.contains(r))
            .collect();
        if !missing.is_empty() {
            let why = format!(
                "login roles missing on the {to}: {missing:?} (their new connections would fail)"
            );
            if req.force {
                report.findings.push(format!("FORCED: {why}"));
            } else {
                blocking.push(why);
            }
        }
        let sequences = timed(
            "source",
            "listing sequences",
            qt,
            from_db.query(SEQUENCES, &[]),
        )
        .await?;
        report
            .findings
            .push(format!("{} sequence(s) to sync", sequences.len()));
        let bypass = timed(
            "source",
            "listing sessions",
            qt,
            from_db.query_one(BYPASS_SESSIONS, &[&from_snat]),
        )
        .await?;
        let (n_bypass, bypass_from): (i64, String) = (bypass.get(0), bypass.get(1));
        if n_bypass > 0 {
            report.findings.push(format!(
                "WARNING: {n_bypass} session(s) on the {from} bypass the proxy (from {bypass_from}); the fence cannot stop their writes"
            ));
        }
        let mut prepare = Vec::new();
        if logical {
            let sub = lag::subscription_name(&to_db, &watch, qt).await?;
            let pubs: Option<Vec<String>> = timed(
                "subscriber",
                "reading the subscription",
                qt,
                to_db.query_opt(SUB_PUBLICATIONS, &[&sub]),
            )
            .await?
            .map(|r| r.get(0));
            let pubs = pubs.unwrap_or_default();
            let published = from_db
                .query_one(PUBLICATION_HAS_BARRIER, &[&pubs])
                .await
                .map_or(0, |r| r.get::<_, i64>(0))
                > 0;
            let subscribed = to_db
                .query_one(SUBSCRIPTION_HAS_BARRIER, &[&sub])
                .await
                .map_or(0, |r| r.get::<_, i64>(0))
                > 0;
            if !(published && subscribed) {
                prepare.push(format!("create {BARRIER_TABLE} on both servers, add it to publication {pubs:?} and refresh subscription {sub:?}"));
            }
            report.plan.push(format!("barrier: a marker row in {BARRIER_TABLE}, written on the {from} after the fence, seen on the {to}"));
        } else {
            report.plan.push(format!(
                "barrier: the {to} replays up to the {from}'s LSN after the fence, then is promoted"
            ));
        }
        report.plan.splice(0..0, prepare.iter().cloned());
        report.plan.extend([
            format!("hold new connections (SYNs parked in the kernel, at most {:?})", req.timeout),
            format!("fence: drop every data packet of proxied connections to the {from}; terminate its busy proxied sessions"),
            format!("sync {} sequence(s) to the {to}", sequences.len()),
            if to == Role::Target && logical {
                format!("reverse replication {to} -> {from} ({REVERSE}) for a lossless rollback")
            } else {
                format!("stop the reverse replication {from} -> {to}")
            },
            format!("flip: new connections go to the {to}; release the held ones to it"),
            format!("drain the {from}'s connections for {:?}, then terminate the rest", req.drain_timeout),
        ]);
        if !blocking.is_empty() {
            self.set_phase("idle");
            report
                .findings
                .extend(blocking.iter().map(|b| format!("BLOCKING: {b}")));
            if req.dry_run {
                return Ok(report);
            }
            return Err(CutoverError::Preflight(blocking.join("; ")));
        }
        if req.dry_run {
            self.set_phase("idle");
            return Ok(report);
        }
        if req.force {
            say(
                "WARNING: --force: the lag gate is skipped; writes not yet replicated may be lost"
                    .into(),
            );
        }

        let mut rec = Recorder {
            journal: Journal::open(&self.journal_path)?,
            id: journal::new_id(),
            from,
            to,
            steps: Vec::new(),
            progress: progress.clone(),
        };
        rec.log(
            "start",
            t0,
            (None, None),
            format!(
                "cutover {from} -> {to}{}",
                if req.force { " (FORCED)" } else { "" }
            ),
        )?;
        if logical {
            if !prepare.is_empty() {
                let t = Instant::now();
                self.prepare_barrier(&from_db, &to_db, &watch, qt).await?;
                rec.log("prepare", t, (None, None), prepare.join("; "))?;
            }
            // A rehearsal of the barrier with nothing held or fenced: it proves the marker
            // replicates (a refreshed subscription restarts its worker, which can take
            // seconds) and shows what the real one will cost.
            let t = Instant::now();
            let token = format!("rehearsal-{}-{}", rec.id, std::process::id());
            timed(
                "source",
                "writing the rehearsal marker",
                qt,
                from_db.execute(WRITE_MARKER, &[&token]),
            )
            .await?;
            // Forced, a failed rehearsal is only reported: the real barrier still guards the flip.
            let until = Instant::now()
                + if req.force {
                    Duration::from_secs(1)
                } else {
                    req.timeout
                };
            let mut arrived = true;
            while timed(
                "target",
                "looking for the rehearsal marker",
                qt,
                to_db.query_opt(SEE_MARKER, &[&token]),
            )
            .await?
            .is_none()
            {
                if Instant::now() > until {
                    if !req.force {
                        return Err(CutoverError::Preflight(format!(
                            "the {to} did not apply a rehearsal marker within --timeout {:?}; nothing was changed",
                            req.timeout
                        )));
                    }
                    arrived = false;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let what = if arrived {
                format!(
                    "a marker took {:.1} ms to reach the {to}",
                    t.elapsed().as_secs_f64() * 1000.0
                )
            } else {
                format!("FORCED: a marker did not reach the {to}; the barrier will likely time out")
            };
            rec.log("rehearsal", t, (None, None), what)?;
        }
        rec.log(
            "preflight",
            t0,
            (report.lag.as_ref().map(|l| l.source_lsn.clone()), None),
            report.findings.join("; "),
        )?;

        let mut undo = Undo::default();
        let result = self
            .critical(
                &req,
                &mut rec,
                &mut report,
                &mut undo,
                &from_db,
                &to_db,
                &from_snat,
                logical,
            )
            .await;
        if let Err(e) = result {
            self.set_phase("aborting");
            let why = e.to_string();
            let t = Instant::now();
            let undone = self.undo(&undo, &from_db, &to_db).await;
            let _ = rec.log("aborted", t, (None, None), format!("{why}; undo: {undone}"));
            self.set_phase("idle");
            return Err(e);
        }

        // 8. Drain: the old server's connections can no longer send data. One that tries (the
        // datapath marks it) is ended at once, so its client reconnects to the new server; idle
        // ones may close by themselves until the deadline, then the rest are ended. Sessions are
        // found by joining the conntrack SNAT tuples to the old server's pg_stat_activity.
        self.set_phase("drain");
        let t = Instant::now();
        let from_addr = self
            .maps
            .lock()
            .expect("maps lock")
            .backend(from)?
            .map(|b| b.addr);
        let deadline = Instant::now() + req.drain_timeout;
        // Port -> when its session was asked to end.
        let mut ended: std::collections::HashMap<i32, Instant> = std::collections::HashMap::new();
        let mut at_deadline = 0;
        loop {
            let live: Vec<conntrack::Connection> = {
                let maps = self.maps.lock().expect("maps lock");
                conntrack::list(&maps)?
                    .into_iter()
                    // Half-closed ones too: a client FIN queued behind fenced data never arrives.
                    .filter(|c| Some(c.backend_addr) == from_addr && c.state != ConnState::Closed)
                    .collect()
            };
            let past = Instant::now() >= deadline;
            let kill: Vec<&conntrack::Connection> = live
                .iter()
                .filter(|c| (c.fenced || past) && !ended.contains_key(&i32::from(c.snat.port())))
                .collect();
            if !kill.is_empty() {
                let ports: Vec<i32> = kill.iter().map(|c| i32::from(c.snat.port())).collect();
                let found: std::collections::HashSet<i32> = timed(
                    "source",
                    "ending drained sessions",
                    qt,
                    from_db.query(TERMINATE_TUPLES, &[&from_snat, &ports]),
                )
                .await
                .map(|rows| rows.iter().map(|r| r.get::<_, i32>(0)).collect())
                .unwrap_or_default();
                let n = found.len() as u64;
                if past {
                    at_deadline += n;
                } else {
                    report.drained_on_use += n;
                }
                // A fenced connection with no session (its startup packet was dropped by the
                // fence, so pg_stat_activity does not show it) cannot be ended by the server:
                // reset it ourselves with the sequence number its client expects, and forget
                // it, so the client reconnects at once, to the new server.
                let mut maps = self.maps.lock().expect("maps lock");
                for c in kill
                    .iter()
                    .filter(|c| c.fenced && !found.contains(&i32::from(c.snat.port())))
                {
                    if crate::net::send_rst(c.vip, c.client, c.fenced_ack).is_ok()
                        && maps.ct.remove(&ct_key(c)).is_ok()
                    {
                        report.reset_unknown += 1;
                    }
                }
                drop(maps);
                let now = Instant::now();
                ended.extend(ports.into_iter().map(|p| (p, now)));
            }
            // Whatever is still there 300 ms after it was asked to end (a client FIN stuck
            // behind fenced data, a session that would not die): forget it, so the client's
            // next packet meets this host's stack, which answers with a RST.
            let stuck: Vec<CtKey> = live
                .iter()
                .filter(|c| {
                    ended
                        .get(&i32::from(c.snat.port()))
                        .is_some_and(|t| past || t.elapsed() > Duration::from_millis(300))
                })
                .map(ct_key)
                .collect();
            if !stuck.is_empty() {
                let mut maps = self.maps.lock().expect("maps lock");
                for k in &stuck {
                    let _ = maps.ct.remove(k);
                }
            }
            if past || live.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        report.terminated_at_drain = at_deadline;
        rec.log(
            "drain",
            t,
            (None, None),
            format!(
                "{} session(s) on the {from} ended when their client used them, {at_deadline} at the deadline, {} unknown connection(s) reset",
                report.drained_on_use, report.reset_unknown
            ),
        )?;
        rec.log(
            "done",
            t0,
            (report.fence_lsn.clone(), report.applied_lsn.clone()),
            format!(
                "write pause {:.1} ms, hold {:.1} ms",
                report.write_pause_ms, report.hold_ms
            ),
        )?;
        report.steps = rec.steps.clone();
        self.set_phase("idle");
        *self.last_report.lock().expect("report lock") = Some(report.clone());
        Ok(report)
    }

    /// Steps 2–7: everything between the hold and the release. An error here is undone.
    #[expect(clippy::too_many_arguments, reason = "one cutover's shared state")]
    async fn critical(
        &self,
        req: &FlipRequest,
        rec: &mut Recorder,
        report: &mut FlipReport,
        undo: &mut Undo,
        from_db: &Client,
        to_db: &Client,
        from_snat: &str,
        logical: bool,
    ) -> Result<(), CutoverError> {
        let (from, to) = (rec.from, rec.to);
        let qt = self
            .db
            .as_ref()
            .ok_or(CutoverError::NoDatabases)?
            .query_timeout;
        let abort = |step: &'static str| {
            move |e: PgError| CutoverError::Aborted {
                step,
                source: Box::new(e),
            }
        };
        let started = Instant::now();
        let deadline_ns =
            clock::monotonic_ns() + u64::try_from(req.timeout.as_nanos()).unwrap_or(u64::MAX);

        // 2 + 3a. Hold and fence in one map write: from here no new connection starts anywhere
        // and no proxied client's query or COMMIT reaches the old server. Both expire on their
        // own at the deadline if this controller dies.
        self.set_phase("hold");
        undo.datapath = true;
        let t = Instant::now();
        self.maps.lock().expect("maps lock").set_cutover(Cutover {
            hold_until_ns: deadline_ns,
            fence_until_ns: deadline_ns,
            fenced_backend: from.index(),
            _pad0: 0,
        })?;
        rec.log(
            "hold",
            t,
            (None, None),
            format!(
                "new SYNs parked until the flip (deadline {:?})",
                req.timeout
            ),
        )?;

        // 3b. Fence in the database: sessions that were mid-statement or mid-transaction when
        // the fence fell are terminated (they can no longer commit anyway), and we wait for
        // them to exit, so every commit that will ever happen on the old server is in its WAL
        // before the marker. A short settle first lets packets already delivered be picked up.
        self.set_phase("fence");
        let t = Instant::now();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let pids: Vec<i32> = timed(
            "source",
            "terminating busy sessions",
            qt,
            from_db.query(TERMINATE_BUSY, &[&from_snat]),
        )
        .await
        .map_err(abort("fence"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
        while !pids.is_empty() {
            let n: i64 = timed(
                "source",
                "waiting for terminated sessions",
                qt,
                from_db.query_one(STILL_RUNNING, &[&pids]),
            )
            .await
            .map_err(abort("fence"))?
            .get(0);
            if n == 0 {
                break;
            }
            if clock::monotonic_ns() > deadline_ns {
                return Err(CutoverError::Aborted {
                    step: "fence",
                    source: "terminated sessions did not exit before --timeout".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        report.terminated_at_fence = pids.len() as u64;
        rec.log(
            "fence",
            t,
            (None, None),
            format!(
                "{} busy proxied session(s) terminated on the {from}",
                pids.len()
            ),
        )?;

        // 4. The LSN barrier, observed directly: a marker written after the fence; logical
        // replication applies in commit order, so once the target sees it, it has everything.
        self.set_phase("barrier");
        let t = Instant::now();
        // Logical: the marker is written first, so the fence LSN covers it.
        let token = format!("{}-{}", rec.id, std::process::id());
        if logical {
            timed(
                "source",
                "writing the barrier marker",
                qt,
                from_db.execute(WRITE_MARKER, &[&token]),
            )
            .await
            .map_err(abort("barrier"))?;
        }
        let fence_lsn: String = timed(
            "source",
            "reading the fence LSN",
            qt,
            from_db.query_one(CURRENT_LSN, &[]),
        )
        .await
        .map_err(abort("barrier"))?
        .get(0);
        if logical {
            loop {
                if timed(
                    "target",
                    "looking for the marker",
                    qt,
                    to_db.query_opt(SEE_MARKER, &[&token]),
                )
                .await
                .map_err(abort("barrier"))?
                .is_some()
                {
                    break;
                }
                if clock::monotonic_ns() > deadline_ns {
                    return Err(CutoverError::Aborted {
                        step: "barrier",
                        source: format!(
                            "the {to} did not apply the marker within --timeout {:?}",
                            req.timeout
                        )
                        .into(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        } else {
            let want = parse_lsn(&fence_lsn).unwrap_or(u64::MAX);
            loop {
                let replayed: Option<String> = timed(
                    "target",
                    "reading the replay LSN",
                    qt,
                    to_db.query_one("SELECT pg_last_wal_replay_lsn()::text", &[]),
                )
                .await
                .map_err(abort("barrier"))?
                .get(0);
                if replayed
                    .as_deref()
                    .and_then(parse_lsn)
                    .is_some_and(|r| r >= want)
                {
                    break;
                }
                if clock::monotonic_ns() > deadline_ns {
                    return Err(CutoverError::Aborted {
                        step: "barrier",
                        source: format!("the {to} did not replay {fence_lsn} within --timeout")
                            .into(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        report.barrier_ms = t.elapsed().as_secs_f64() * 1000.0;
        report.fence_lsn = Some(fence_lsn.clone());
        let applied = if logical {
            timed(
                "target",
                "reading its LSN",
                qt,
                to_db.query_one(CURRENT_LSN, &[]),
            )
            .await
            .ok()
            .map(|r| r.get::<_, String>(0))
        } else {
            None
        };
        report.applied_lsn.clone_from(&applied);
        let lsns = if from == Role::Source {
            (Some(fence_lsn.clone()), applied.clone())
        } else {
            (applied.clone(), Some(fence_lsn.clone()))
        };
        rec.log(
            "barrier",
            t,
            lsns,
            format!("the {to} has applied everything up to {fence_lsn}"),
        )?;

        // 5. Sequences are not replicated: carry every value over. Read now, behind the fence,
        // not at preflight: writes until the fence advanced them, and a stale value makes the
        // new server hand out ids it already has (duplicate keys).
        self.set_phase("sequences");
        let t = Instant::now();
        let sequences = if logical {
            timed(
                "source",
                "reading sequences",
                qt,
                from_db.query(SEQUENCES, &[]),
            )
            .await
            .map_err(abort("sequences"))?
        } else {
            Vec::new()
        };
        let calls: Vec<String> = sequences
            .iter()
            .filter_map(|r| {
                let name: String = r.get(0);
                let last: Option<i64> = r.get(1);
                last.map(|v| format!("setval({}::regclass, {v}, true)", quote_literal(&name)))
            })
            .collect();
        // Physical replication carries sequences itself (and a standby cannot setval).
        let calls = if logical { calls } else { Vec::new() };
        if !calls.is_empty() {
            let sql = format!("SELECT {}", calls.join(", "));
            timed("target", "setting sequences", qt, to_db.execute(&sql, &[]))
                .await
                .map_err(abort("sequences"))?;
        }
        report.sequences_synced = calls.len() as u64;
        rec.log(
            "sequences",
            t,
            (None, None),
            format!("{} sequence value(s) set on the {to}", calls.len()),
        )?;

        // 6. Replication direction. Forward: stop source -> target (so target writes are not
        // looped back) and create the reverse slot on the target now, before any write is
        // released there, so rollback can replay every one of them. Rollback: stop reverse.
        self.set_phase("reverse");
        let t = Instant::now();
        if logical {
            let watch = self.watch_for(to)?;
            let sub = lag::subscription_name(to_db, &watch, qt).await?;
            timed(
                "subscriber",
                "disabling the subscription",
                qt,
                to_db.batch_execute(&format!("ALTER SUBSCRIPTION {} DISABLE", quote_ident(&sub))),
            )
            .await
            .map_err(abort("reverse"))?;
            undo.disabled_subscription = Some((to, sub.clone()));
            if to == Role::Target {
                // Separate statements: a slot cannot be created in a transaction that wrote.
                let reverse = async {
                    to_db
                        .batch_execute(&format!(
                            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = '{REVERSE}') THEN CREATE PUBLICATION {REVERSE} FOR ALL TABLES; END IF; END $$"
                        ))
                        .await?;
                    to_db
                        .execute(&format!("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{REVERSE}' AND NOT active"), &[])
                        .await?;
                    to_db
                        .execute(
                            &format!(
                                "SELECT pg_create_logical_replication_slot('{REVERSE}', 'pgoutput')"
                            ),
                            &[],
                        )
                        .await
                        .map(|_| ())
                };
                match timed("target", "creating the reverse slot", qt, reverse).await {
                    Ok(()) => {
                        undo.reverse_slot = true;
                        report.reverse_replication = format!(
                            "slot {REVERSE} on the target from {}",
                            applied.clone().unwrap_or_default()
                        );
                    }
                    Err(e) if req.force => {
                        report.reverse_replication = format!("NONE (forced): {e}");
                    }
                    Err(e) => return Err(abort("reverse")(e)),
                }
            } else {
                // Rollback: retire the reverse replication, and restart the forward one from
                // here, skipping what the source received back from the target (the target
                // has it already), so a later cutover can run again.
                let fwd = self.db.as_ref().and_then(|d| d.subscription.clone());
                let rollback = async {
                    to_db
                        .batch_execute(&format!("ALTER SUBSCRIPTION {REVERSE} SET (slot_name = NONE); DROP SUBSCRIPTION {REVERSE}"))
                        .await?;
                    from_db.execute(&format!("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{REVERSE}'"), &[]).await?;
                    let Some(fwd) = fwd else {
                        return Ok::<_, tokio_postgres::Error>("forward subscription unknown (name it with --subscription); not restarted".to_owned());
                    };
                    let slot: Option<String> = from_db
                        .query_opt(SUB_SLOT, &[&fwd])
                        .await?
                        .and_then(|r| r.get(0));
                    if let Some(slot) = slot {
                        to_db
                            .execute(
                                "SELECT pg_replication_slot_advance($1, pg_current_wal_lsn())",
                                &[&slot],
                            )
                            .await?;
                    }
                    from_db
                        .batch_execute(&format!("ALTER SUBSCRIPTION {} ENABLE", quote_ident(&fwd)))
                        .await?;
                    Ok(format!(
                        "reverse replication retired; forward subscription {fwd} restarted from the rollback point"
                    ))
                };
                report.reverse_replication = match timed(
                    "source",
                    "retiring reverse replication",
                    qt,
                    rollback,
                )
                .await
                {
                    Ok(s) => s,
                    Err(e) => format!(
                        "FAILED to restart forward replication: {e}; the rollback itself is complete"
                    ),
                };
                undo.disabled_subscription = None;
            }
        } else {
            timed(
                "target",
                "promoting",
                qt,
                to_db.query_one("SELECT pg_promote(true, 60)", &[]),
            )
            .await
            .map_err(abort("promote"))?;
            report.reverse_replication = "none: physical replication; the old primary must be rebuilt as a standby to roll back".into();
        }
        rec.log(
            "reverse",
            t,
            (None, None),
            report.reverse_replication.clone(),
        )?;

        // 7. The flip: one write of ACTIVE, then lift the hold (the fence on the old server
        // stays, forever: it is stale now), then re-inject every parked SYN, which the
        // datapath now sends to the new server.
        self.set_phase("flip");
        let t = Instant::now();
        {
            let mut maps = self.maps.lock().expect("maps lock");
            maps.set_active(to)?;
            maps.set_cutover(Cutover {
                hold_until_ns: 0,
                fence_until_ns: u64::MAX,
                fenced_backend: from.index(),
                _pad0: 0,
            })?;
        }
        report.write_pause_ms = started.elapsed().as_secs_f64() * 1000.0;
        rec.log(
            "flip",
            t,
            (report.fence_lsn.clone(), report.applied_lsn.clone()),
            format!("new connections go to the {to}"),
        )?;
        let t = Instant::now();
        report.held_syns = self.release_held()?;
        // A CPU that read the hold just before it was lifted may submit its SYN a moment
        // after the first pass; a second pass picks it up instead of leaving it to a 1 s
        // client retransmit.
        tokio::time::sleep(Duration::from_millis(2)).await;
        report.held_syns += self.release_held()?;
        report.hold_ms = started.elapsed().as_secs_f64() * 1000.0;
        rec.log(
            "release",
            t,
            (None, None),
            format!(
                "{} held connection(s) released to the {to}",
                report.held_syns
            ),
        )?;

        if logical && to == Role::Target && undo.reverse_slot {
            // The slot already holds every target write since before the release; the
            // subscription can start after it without losing any.
            let conninfo = self
                .db
                .as_ref()
                .and_then(|d| d.reverse_conninfo.clone())
                .unwrap_or_else(|| {
                    self.dsn(Role::Target)
                        .map(Dsn::conninfo)
                        .unwrap_or_default()
                });
            let sql = format!(
                "DROP SUBSCRIPTION IF EXISTS {REVERSE}; CREATE SUBSCRIPTION {REVERSE} CONNECTION {} PUBLICATION {REVERSE} \
                 WITH (create_slot = false, slot_name = '{REVERSE}', copy_data = false, enabled = true)",
                quote_literal(&conninfo)
            );
            let t = Instant::now();
            match timed(
                "source",
                "creating the reverse subscription",
                qt,
                from_db.batch_execute(&sql),
            )
            .await
            {
                Ok(()) => rec.log(
                    "reverse",
                    t,
                    (None, None),
                    format!("subscription {REVERSE} on the {from}: rollback is lossless"),
                )?,
                Err(e) => {
                    report.reverse_replication =
                        format!("FAILED: {e}; `flip --to source` will need --force");
                    rec.log(
                        "reverse",
                        t,
                        (None, None),
                        report.reverse_replication.clone(),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Re-injects every parked SYN through the datapath; returns how many.
    pub fn release_held(&self) -> Result<u64, CutoverError> {
        let mut ring = self.maps.lock().expect("maps lock").held()?;
        let mut ebpf = self.ebpf.lock().expect("ebpf lock");
        let prog = datapath::program(&mut ebpf);
        let mut n = 0;
        while let Some(item) = ring.next() {
            if item.len() < std::mem::size_of::<HeldSyn>() {
                continue;
            }
            // SAFETY: the datapath wrote a HeldSyn into this record; read it unaligned.
            let held: HeldSyn = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            datapath::reinject(prog, &held)?;
            n += 1;
        }
        Ok(n)
    }

    /// Undoes a cutover stopped before the flip. Returns what it did.
    async fn undo(&self, undo: &Undo, from_db: &Client, to_db: &Client) -> String {
        let mut did = Vec::new();
        if undo.datapath {
            let r = {
                let mut maps = self.maps.lock().expect("maps lock");
                maps.set_cutover(Cutover {
                    hold_until_ns: 0,
                    fence_until_ns: 0,
                    fenced_backend: NO_FENCE,
                    _pad0: 0,
                })
            };
            match r
                .map_err(CutoverError::from)
                .and_then(|()| self.release_held())
            {
                Ok(n) => did.push(format!(
                    "fence lifted, {n} held connection(s) released to the old server"
                )),
                Err(e) => did.push(format!(
                    "FAILED to lift the fence ({e}); it expires by itself at the deadline"
                )),
            }
        }
        if let Some((side, sub)) = &undo.disabled_subscription {
            let c = if *side == Role::Target {
                to_db
            } else {
                from_db
            };
            match c
                .batch_execute(&format!("ALTER SUBSCRIPTION {} ENABLE", quote_ident(sub)))
                .await
            {
                Ok(()) => did.push(format!("subscription {sub} re-enabled")),
                Err(e) => did.push(format!("FAILED to re-enable subscription {sub}: {e}")),
            }
        }
        if undo.reverse_slot {
            let _ = to_db
                .batch_execute(&format!("SELECT pg_drop_replication_slot('{REVERSE}')"))
                .await;
            did.push("reverse slot dropped".into());
        }
        if did.is_empty() {
            "nothing to undo".into()
        } else {
            did.join(", ")
        }
    }

    async fn prepare_barrier(
        &self,
        from_db: &Client,
        to_db: &Client,
        watch: &Watch,
        qt: Duration,
    ) -> Result<(), CutoverError> {
        timed(
            "publisher",
            "creating the barrier table",
            qt,
            from_db.batch_execute(CREATE_BARRIER),
        )
        .await?;
        timed(
            "subscriber",
            "creating the barrier table",
            qt,
            to_db.batch_execute(CREATE_BARRIER),
        )
        .await?;
        let sub = lag::subscription_name(to_db, watch, qt).await?;
        let pubs: Vec<String> = timed(
            "subscriber",
            "reading the subscription",
            qt,
            to_db.query_one(SUB_PUBLICATIONS, &[&sub]),
        )
        .await?
        .get(0);
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
        let m: i64 = timed(
            "subscriber",
            "checking the subscription",
            qt,
            to_db.query_one(SUBSCRIPTION_HAS_BARRIER, &[&sub]),
        )
        .await?
        .get(0);
        if m == 0 {
            timed(
                "subscriber",
                "refreshing the subscription",
                qt,
                to_db.batch_execute(&format!(
                    "ALTER SUBSCRIPTION {} REFRESH PUBLICATION WITH (copy_data = false)",
                    quote_ident(&sub)
                )),
            )
            .await?;
        }
        // Prove it: a marker must arrive while the same apply worker runs before and after
        // (a refresh may restart the worker, and the launcher takes up to
        // wal_retrieve_retry_interval, 5 s by default, to start a new one).
        let until = Instant::now() + Duration::from_secs(15);
        let mut n = 0u32;
        loop {
            n += 1;
            let before = apply_worker(to_db, &sub).await;
            let token = format!("prepare-{}-{n}", journal::new_id());
            timed(
                "publisher",
                "writing a test marker",
                qt,
                from_db.execute(WRITE_MARKER, &[&token]),
            )
            .await?;
            let seen_by = Instant::now() + Duration::from_secs(2);
            let mut seen = false;
            while Instant::now() < seen_by {
                if timed(
                    "subscriber",
                    "looking for the test marker",
                    qt,
                    to_db.query_opt(SEE_MARKER, &[&token]),
                )
                .await?
                .is_some()
                {
                    seen = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if seen && before.is_some() && apply_worker(to_db, &sub).await == before {
                break;
            }
            if Instant::now() > until {
                return Err(CutoverError::Preflight(format!(
                    "{BARRIER_TABLE} does not replicate through subscription {sub:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// Makes the barrier table replicate from the active server to the other, off the critical
    /// path: `run` does this at start, so a cutover finds it ready.
    pub async fn prepare(&self) -> Result<(), CutoverError> {
        let db = self.db.as_ref().ok_or(CutoverError::NoDatabases)?;
        let active = self
            .maps
            .lock()
            .expect("maps lock")
            .active()?
            .unwrap_or(Role::Source);
        let to = other(active);
        let watch = self.watch_for(to)?;
        if watch.replication != Replication::Logical {
            return Ok(());
        }
        let (from_db, to_db) = (
            self.dsn(active)?.connect().await?,
            self.dsn(to)?.connect().await?,
        );
        self.prepare_barrier(&from_db, &to_db, &watch, db.query_timeout)
            .await
    }

    /// After a restart: finish or undo a cutover the previous controller left unfinished.
    /// Before the flip was journaled, the old server never stopped being the truth: undo
    /// (lift the fence, release held SYNs to it, re-enable forward replication). After it, the
    /// new server has taken writes: keep the flip, lift the hold, release held SYNs to it.
    pub async fn recover(&self) -> Result<Option<String>, CutoverError> {
        let entries = journal::read(&self.journal_path)?;
        let Some(steps) = journal::unfinished(&entries) else {
            return Ok(None);
        };
        let first = steps.first().cloned().unwrap_or_default();
        let flipped = steps.iter().any(|e| e.step == "flip");
        let mut journal = Journal::open(&self.journal_path)?;
        let what = if flipped {
            {
                let mut maps = self.maps.lock().expect("maps lock");
                let mut c = maps.cutover()?;
                c.hold_until_ns = 0;
                maps.set_cutover(c)?;
            }
            let n = self.release_held()?;
            format!(
                "resumed: the flip to the {} had happened; hold lifted, {n} held connection(s) released to it",
                first.to
            )
        } else {
            {
                let mut maps = self.maps.lock().expect("maps lock");
                maps.set_cutover(Cutover::IDLE)?;
            }
            let n = self.release_held()?;
            let mut did = format!(
                "rolled back: no flip had happened; fence lifted, {n} held connection(s) released to the {}",
                first.from
            );
            if steps.iter().any(|e| e.step == "reverse")
                && let Some(db) = &self.db
            {
                // The forward subscription may have been disabled just before the crash.
                let to = if first.to == "target" {
                    &db.target
                } else {
                    &db.source
                };
                if let Ok(c) = to.connect().await {
                    let watch = self.watch_for(if first.to == "target" {
                        Role::Target
                    } else {
                        Role::Source
                    })?;
                    if let Ok(sub) = lag::subscription_name(&c, &watch, db.query_timeout).await {
                        let _ = c
                            .batch_execute(&format!(
                                "ALTER SUBSCRIPTION {} ENABLE",
                                quote_ident(&sub)
                            ))
                            .await;
                        let _ = c.batch_execute(&format!("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{REVERSE}' AND NOT active")).await;
                        let _ = write!(did, "; subscription {sub} re-enabled");
                    }
                }
            }
            did
        };
        journal.append(Entry {
            cutover: first.cutover.clone(),
            step: "recovered".into(),
            from: first.from,
            to: first.to,
            detail: what.clone(),
            ..Entry::default()
        })?;
        Ok(Some(what))
    }
}

/// The datapath key of a listed connection.
fn ct_key(c: &conntrack::Connection) -> CtKey {
    CtKey {
        client_addr_be: u32::from(*c.client.ip()).to_be(),
        vip_addr_be: u32::from(*c.vip.ip()).to_be(),
        client_port_be: c.client.port().to_be(),
        vip_port_be: c.vip.port().to_be(),
    }
}

/// The pid of a subscription's apply worker, if one runs.
async fn apply_worker(c: &Client, sub: &str) -> Option<i32> {
    c.query_opt(APPLY_WORKER, &[&sub])
        .await
        .ok()
        .flatten()
        .and_then(|r| r.get::<_, Option<i32>>(0))
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
