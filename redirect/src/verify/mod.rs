//! `redirect verify`: do the two servers hold the same data?
//!
//! Per table: key-ordered chunks (keyset pagination on the primary key), each summarized on
//! both servers as a row count and an md5 of its rows, as pgcopydb's `compare data` and
//! Vitess's `VDiff` do. Every chunk is compared at a consistent point: read on the server
//! that takes the writes (the *primary*), then read on the other once replication has applied
//! everything the primary had written by then. Rows written in between can still make a
//! chunk differ for a moment, so a differing chunk is only a difference once it is *settled*:
//! the primary's rows did not change around the replica's read (their `xmin`s are the same
//! before and after) and the difference is seen twice. Rows that never hold still are
//! reported as unsettled, never as different.
//!
//! The load is bounded: chunks of `--chunk-rows`, an optional `--rate` in rows per second,
//! a `statement_timeout` on both sessions, read-only sessions named `redirect`.

pub mod catch_up;
pub mod chunk;
pub mod report;
mod settle;
pub mod tables;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::mpsc::UnboundedSender;
use tokio_postgres::Client;

use self::{
    catch_up::CatchUp,
    chunk::{Aggregate, ChunkSql},
    report::{Key, KeyDiff, Method, Report, TableReport, TableVerdict},
    tables::Table,
};
use crate::{
    controller::{Controller, Phase},
    datapath::Role,
    pg::{PgError, timed},
};

/// What the operator asked for.
#[derive(Clone, Debug)]
pub struct VerifyRequest {
    /// `schema.table` (or `table` for `public.table`); empty: every table.
    pub tables: Vec<String>,
    pub chunk_rows: u64,
    /// Rows per second, read on each server; `None`: as fast as the servers answer.
    pub rate: Option<u64>,
    /// How long to wait for replication to reach a chunk's consistent point.
    pub catch_up_timeout: Duration,
    pub statement_timeout: Duration,
    /// How many differing keys to name per table.
    pub max_keys: usize,
    /// Only these databases; empty: every replicated database (and the DSNs').
    pub databases: Vec<String>,
}

/// Why verify could not run at all (a table's own failure is its verdict instead).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(
        "the controller has no databases: start `redirect run` with --source-dsn and --target-dsn (passwords in --source-password-file/--target-password-file or ~/.pgpass)"
    )]
    NoDatabases,
    #[error("a cutover is in progress (phase: {0}); verify when it has finished")]
    Busy(Phase),
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("{0}")]
    CatchUp(String),
}

/// How many times a differing chunk is re-read at a fresh consistent point before its rows
/// are compared one by one.
const CHUNK_ATTEMPTS: u32 = 3;
/// How many row-by-row passes a differing chunk gets to settle.
const ROW_PASSES: u32 = 5;
/// A difference is reported only once seen this many times with the primary's rows still.
const SETTLED_AFTER: u32 = 2;

/// The two sessions, and which one takes the writes now.
struct Sessions {
    source: Client,
    target: Client,
    statement_timeout: Duration,
}

impl Sessions {
    fn of(&self, role: Role) -> (Role, &Client) {
        match role {
            Role::Source => (role, &self.source),
            Role::Target => (role, &self.target),
        }
    }

    /// The client-side bound: a little more than the server's, so the server's error (which
    /// names the statement) arrives first.
    fn timeout(&self) -> Duration {
        self.statement_timeout + Duration::from_secs(5)
    }
}

/// One verify in progress.
struct Verify<'a> {
    ctl: &'a Controller,
    req: VerifyRequest,
    db: Sessions,
    catch_up: CatchUp,
    progress: UnboundedSender<String>,
    started: Instant,
    /// Rows read so far (the larger side of each chunk), for `--rate` and progress.
    rows_read: u64,
    /// `--rate`'s window: rows read since `window_start`. Time spent waiting elsewhere (a
    /// replication catch-up, a slow scan) must not bank credit that later chunks then spend
    /// at full speed, so the window restarts whenever the reads fall behind the budget.
    window_start: Instant,
    window_rows: u64,
    last_progress: Instant,
}

/// Compares the servers the controller knows and reports a verdict per table.
pub async fn verify(
    ctl: &Arc<Controller>,
    req: VerifyRequest,
    progress: UnboundedSender<String>,
) -> Result<Report, VerifyError> {
    let started = Instant::now();
    refuse_during_a_cutover(ctl)?;
    if req.chunk_rows == 0 || req.rate == Some(0) {
        return Err(VerifyError::BadRequest(
            "--chunk-rows and --rate must be at least 1".into(),
        ));
    }
    let databases = databases_to_compare(ctl, &req, &progress).await?;
    let many = databases.len() > 1;
    let mut reports = Vec::new();
    let mut consistency = Vec::new();
    let mut v: Option<Verify<'_>> = None;
    for database in &databases {
        let db = open_sessions(ctl, req.statement_timeout, database).await?;
        let (source_tables, target_tables) = (
            tables::list(Role::Source, &db.source, db.timeout()).await?,
            tables::list(Role::Target, &db.target, db.timeout()).await?,
        );
        let names = tables::select(&source_tables, &target_tables, &req.tables).map_err(|e| {
            VerifyError::BadRequest(if many {
                format!("database {database}: {e}")
            } else {
                e
            })
        })?;
        let catch_up = CatchUp::discover(ctl, &db.source, &db.target, db.timeout()).await?;
        let _ = progress.send(format!(
            "{}comparing {} table(s) in chunks of {} rows{}; {}",
            if many {
                format!("database {database}: ")
            } else {
                String::new()
            },
            names.len(),
            req.chunk_rows,
            req.rate
                .map_or_else(String::new, |r| format!(" at most {r} rows/s")),
            catch_up.describe()
        ));
        // One `Verify` across databases: `--rate` and the progress span all of them.
        let mut this = match v.take() {
            Some(mut prev) => {
                prev.db = db;
                prev.catch_up = catch_up;
                prev
            }
            None => Verify {
                ctl,
                req: req.clone(),
                db,
                catch_up,
                progress: progress.clone(),
                started,
                rows_read: 0,
                window_start: Instant::now(),
                window_rows: 0,
                last_progress: Instant::now(),
            },
        };
        for name in names {
            let mut report = this
                .table(source_tables.get(&name), target_tables.get(&name), &name)
                .await?;
            this.say(format!(
                "{}{name}: {} ({} source rows, {} target rows, {} chunk(s))",
                if many {
                    format!("{database}: ")
                } else {
                    String::new()
                },
                report.verdict.word(),
                report.source_rows.map_or("-".into(), |n| n.to_string()),
                report.target_rows.map_or("-".into(), |n| n.to_string()),
                report.chunks
            ));
            report.database = Some(database.clone());
            reports.push(report);
        }
        consistency.push(if many {
            format!("{database}: {}", this.catch_up.describe())
        } else {
            this.catch_up.describe()
        });
        v = Some(this);
    }
    Ok(Report::new(
        reports,
        consistency.join("; "),
        req.chunk_rows,
        req.rate,
        started.elapsed().as_secs_f64() * 1000.0,
    ))
}

/// The databases to compare: those asked for, else every one a forward subscription on the
/// target carries, and the DSNs' own.
async fn databases_to_compare(
    ctl: &Controller,
    req: &VerifyRequest,
    progress: &UnboundedSender<String>,
) -> Result<Vec<String>, VerifyError> {
    let dbs = ctl.db.as_ref().ok_or(VerifyError::NoDatabases)?;
    let home = dbs.source.database().to_owned();
    let (source, target) = (dbs.source.connect().await?, dbs.target.connect().await?);
    let on_source = crate::pg::cluster::databases(&source, Role::Source, dbs.query_timeout).await?;
    let on_target = crate::pg::cluster::databases(&target, Role::Target, dbs.query_timeout).await?;
    if !req.databases.is_empty() {
        for d in &req.databases {
            if !(on_source.contains(d) && on_target.contains(d)) {
                return Err(VerifyError::BadRequest(format!(
                    "database {d:?} is not on both servers"
                )));
            }
        }
        return Ok(req.databases.clone());
    }
    let watch = ctl
        .watch_for(Role::Target)
        .map_err(|e| VerifyError::BadRequest(e.to_string()))?;
    let subs =
        crate::pg::lag::cluster_subscriptions(&target, Role::Target, dbs.query_timeout).await?;
    let mut out = vec![home.clone()];
    let mut add = |db: String| {
        if on_source.contains(&db) && on_target.contains(&db) && !out.contains(&db) {
            out.push(db);
        }
    };
    for (db, chosen) in crate::pg::lag::choose(&subs, &watch) {
        match chosen {
            Ok(_) => add(db),
            // Compared all the same (as they are), and the reason said.
            Err(why) => {
                let _ = progress.send(format!(
                    "database {db}: its replication cannot be used to wait for a consistent point ({why})"
                ));
                add(db);
            }
        }
    }
    // The databases earlier cutovers carried, whose subscriptions `finish` may have retired.
    if let Ok(entries) = crate::journal::read(&ctl.journal_path) {
        for e in entries
            .iter()
            .filter(|e| e.step == crate::journal::Step::Disabling)
        {
            if let Some(db) = &e.database {
                add(db.clone());
            }
        }
    }
    Ok(out)
}

/// A cutover changes which server takes the writes half-way through a chunk: not then.
fn refuse_during_a_cutover(ctl: &Controller) -> Result<(), VerifyError> {
    if ctl.db.is_none() {
        return Err(VerifyError::NoDatabases);
    }
    match ctl.phase() {
        Phase::Idle => Ok(()),
        p => Err(VerifyError::Busy(p)),
    }
}

/// Read-only sessions with bounded statements and the same text forms of values on both
/// sides (whole rows are compared as text: time zones and float digits must agree).
async fn open_sessions(
    ctl: &Controller,
    statement_timeout: Duration,
    database: &str,
) -> Result<Sessions, VerifyError> {
    let dbs = ctl.db.as_ref().ok_or(VerifyError::NoDatabases)?;
    let settings = format!(
        "SET statement_timeout = {}; SET default_transaction_read_only = on; \
         SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; \
         SET extra_float_digits = 3; SET bytea_output = 'hex'; SET lc_monetary = 'C'; \
         SET lock_timeout = '5s'",
        statement_timeout.as_millis().max(1)
    );
    let source = dbs.source.for_database(database).connect().await?;
    let target = dbs.target.for_database(database).connect().await?;
    for (which, c) in [(Role::Source, &source), (Role::Target, &target)] {
        timed(
            which,
            "setting up the session",
            dbs.query_timeout,
            c.batch_execute(&settings),
        )
        .await?;
    }
    Ok(Sessions {
        source,
        target,
        statement_timeout,
    })
}

/// What one chunk came to.
struct ChunkOutcome {
    primary: Role,
    primary_rows: u64,
    replica_rows: u64,
    /// The chunk's upper key (inclusive).
    hi: Key,
    /// The table's last chunk.
    last: bool,
    diffs: Vec<KeyDiff>,
    unsettled: Vec<Key>,
}

/// A table's running totals.
#[derive(Default)]
struct Tally {
    source_rows: u64,
    target_rows: u64,
    chunks: u64,
    differing: u64,
    first_keys: Vec<KeyDiff>,
    unsettled: Vec<Key>,
}

impl Tally {
    fn add(&mut self, c: ChunkOutcome, max_keys: usize) {
        let (s, t) = match c.primary {
            Role::Source => (c.primary_rows, c.replica_rows),
            Role::Target => (c.replica_rows, c.primary_rows),
        };
        self.source_rows += s;
        self.target_rows += t;
        self.chunks += 1;
        self.differing += c.diffs.len() as u64;
        let room = max_keys.saturating_sub(self.first_keys.len());
        self.first_keys.extend(c.diffs.into_iter().take(room));
        self.unsettled.extend(c.unsettled);
    }

    fn verdict(self) -> TableVerdict {
        if self.differing > 0 {
            TableVerdict::Differs {
                differing_rows: self.differing,
                first_keys: self.first_keys,
            }
        } else if !self.unsettled.is_empty() {
            TableVerdict::Unsettled {
                keys: self.unsettled,
            }
        } else {
            TableVerdict::Equal
        }
    }
}

impl Verify<'_> {
    fn say(&mut self, line: String) {
        self.last_progress = Instant::now();
        let _ = self.progress.send(line);
    }

    /// One table: missing on a side, different columns, or compared chunk by chunk.
    async fn table(
        &mut self,
        source: Option<&Table>,
        target: Option<&Table>,
        name: &str,
    ) -> Result<TableReport, VerifyError> {
        let not_compared = |verdict, key_columns| TableReport {
            database: None,
            table: name.to_owned(),
            key_columns,
            method: Method::None,
            source_rows: None,
            target_rows: None,
            chunks: 0,
            verdict,
        };
        let (s, t) = match (source, target) {
            (Some(s), Some(t)) => (s, t),
            (Some(s), None) => {
                return Ok(not_compared(TableVerdict::MissingOnTarget, s.key_names()));
            }
            (None, Some(t)) => {
                return Ok(not_compared(TableVerdict::MissingOnSource, t.key_names()));
            }
            (None, None) => unreachable!("selected tables exist on a side"),
        };
        if let Some(detail) = tables::schema_difference(s, t) {
            return Ok(not_compared(
                TableVerdict::SchemaDiffers { detail },
                s.key_names(),
            ));
        }
        let (method, tally) = if s.key.is_empty() {
            (Method::WholeTable, self.whole_table(s).await)
        } else {
            (Method::ChunkedByPrimaryKey, self.chunked(s).await)
        };
        let tally = match tally {
            Ok(t) => t,
            // A catch-up that times out is about replication, not this table: stop.
            Err(e @ VerifyError::CatchUp(_)) => return Err(e),
            Err(e) => {
                return Ok(TableReport {
                    method,
                    ..not_compared(
                        TableVerdict::Failed {
                            error: e.to_string(),
                        },
                        s.key_names(),
                    )
                });
            }
        };
        Ok(TableReport {
            database: None,
            table: name.to_owned(),
            key_columns: s.key_names(),
            method,
            source_rows: Some(tally.source_rows),
            target_rows: Some(tally.target_rows),
            chunks: tally.chunks,
            verdict: tally.verdict(),
        })
    }

    /// Keyset pagination: each chunk starts after the previous one's last key, up to the
    /// table's end as it was when its comparison began. Rows appended after that are left
    /// for the next verify: a table that grows at its end is not chased forever.
    async fn chunked(&mut self, t: &Table) -> Result<Tally, VerifyError> {
        let sql = ChunkSql::new(t);
        let estimated_chunks = t.estimated_rows / self.req.chunk_rows + 1;
        let mut tally = Tally::default();
        let Some(end) = self.end_of_table(&sql).await? else {
            // Empty on both sides when the comparison began.
            tally.chunks = 1;
            return Ok(tally);
        };
        let mut lo: Option<Key> = None;
        loop {
            let c = self.chunk(&sql, lo.as_ref(), &end).await?;
            let (done, hi) = (c.last, c.hi.clone());
            let read = c.primary_rows.max(c.replica_rows);
            self.rows_read += read;
            tally.add(c, self.req.max_keys);
            if done {
                return Ok(tally);
            }
            lo = Some(hi);
            if self.last_progress.elapsed() >= Duration::from_secs(1) {
                let secs = self.started.elapsed().as_secs_f64().max(0.001);
                #[allow(
                    clippy::cast_precision_loss,
                    reason = "a rate to show: rows beyond 2^52 need no exact digit"
                )]
                let rate = self.rows_read as f64 / secs;
                self.say(format!(
                    "{}: chunk {} of ~{}, {} rows compared, {rate:.0} rows/s",
                    t.display(),
                    tally.chunks,
                    estimated_chunks.max(tally.chunks + 1),
                    tally.source_rows.max(tally.target_rows),
                ));
            }
            self.throttle(read).await;
        }
    }

    /// The larger of the two servers' last keys (so rows only on the replica count too), or
    /// `None` if both are empty.
    async fn end_of_table(&mut self, sql: &ChunkSql) -> Result<Option<Key>, VerifyError> {
        let timeout = self.db.timeout();
        let (primary, replica) = self.roles().await?;
        let (pw, pdb) = self.db.of(primary);
        let (rw, rdb) = self.db.of(replica);
        let ours = chunk::read_last_key(pw, pdb, sql, timeout).await?;
        self.consistent_point(primary).await?;
        let theirs = chunk::read_last_key(rw, rdb, sql, timeout).await?;
        Ok(match (ours, theirs) {
            (Some(a), Some(b)) => {
                if chunk::key_after(pw, pdb, sql, &b, &a, timeout).await? {
                    Some(b)
                } else {
                    Some(a)
                }
            }
            (a, b) => a.or(b),
        })
    }

    /// The key range of the chunk after `lo`: the primary's next `--chunk-rows` keys; where
    /// the primary runs out before `end`, the replica's (it may hold rows the primary does
    /// not), or `end` itself. Returns `(hi, last chunk, the primary's aggregate of it if read)`.
    async fn next_range(
        &mut self,
        sql: &ChunkSql,
        lo: Option<&Key>,
        end: &Key,
    ) -> Result<(Key, bool, Option<Aggregate>), VerifyError> {
        let timeout = self.db.timeout();
        let n = self.req.chunk_rows;
        let (primary, replica) = self.roles().await?;
        let (pw, pdb) = self.db.of(primary);
        let p =
            chunk::read_aggregate(pw, pdb, &sql.aggregate(lo, Some(end), Some(n)), timeout).await?;
        if p.rows >= n
            && let Some(hi) = p.last.clone()
        {
            let last = &hi == end;
            return Ok((hi, last, Some(p)));
        }
        let (rw, rdb) = self.db.of(replica);
        let r =
            chunk::read_aggregate(rw, rdb, &sql.aggregate(lo, Some(end), Some(n)), timeout).await?;
        if r.rows >= n
            && let Some(hi) = r.last
        {
            let last = &hi == end;
            return Ok((hi, last, None));
        }
        Ok((end.clone(), true, None))
    }

    /// `--rate`: sleep until the rows read so far are within the budget.
    async fn throttle(&mut self, rows: u64) {
        let Some(rate) = self.req.rate else { return };
        self.window_rows += rows;
        #[allow(
            clippy::cast_precision_loss,
            reason = "a pause to wait: rows and rates beyond 2^52 need no exact digit"
        )]
        let due = Duration::from_secs_f64(self.window_rows as f64 / rate as f64);
        let elapsed = self.window_start.elapsed();
        if elapsed >= due {
            self.window_start = Instant::now();
            self.window_rows = 0;
        } else {
            tokio::time::sleep(due.saturating_sub(elapsed)).await;
        }
    }

    /// The chunk after `lo`, compared: the primary's aggregate, then (once the replica has
    /// caught up with it) the replica's over the same key range. A difference is re-read a
    /// few times, then settled row by row.
    async fn chunk(
        &mut self,
        sql: &ChunkSql,
        lo: Option<&Key>,
        end: &Key,
    ) -> Result<ChunkOutcome, VerifyError> {
        let timeout = self.db.timeout();
        let (hi, last, mut first_read) = self.next_range(sql, lo, end).await?;
        let range = sql.aggregate(lo, Some(&hi), None);
        // Not a `crate::poll` retry: a fixed number of re-reads while the chunk differs and the
        // primary's copy moves under the comparison (a failed read ends it at once), each
        // using `self`.
        for attempt in 0..CHUNK_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            }
            let (primary, replica) = self.roles().await?;
            let (pw, pdb) = self.db.of(primary);
            let p = match first_read.take() {
                Some(p) => p,
                None => chunk::read_aggregate(pw, pdb, &range, timeout).await?,
            };
            self.consistent_point(primary).await?;
            let (rw, rdb) = self.db.of(replica);
            let r = chunk::read_aggregate(rw, rdb, &range, timeout).await?;
            if p.rows == r.rows && p.hash == r.hash {
                return Ok(ChunkOutcome {
                    primary,
                    primary_rows: p.rows,
                    replica_rows: r.rows,
                    hi,
                    last,
                    diffs: vec![],
                    unsettled: vec![],
                });
            }
            // Did the primary's range change while the replica was read? Then the difference
            // may be a write in flight: read again at a fresh point.
            let again = chunk::read_aggregate(pw, pdb, &range, timeout).await?;
            if again.version == p.version && again.rows == p.rows {
                break;
            }
        }
        let settled = self.settle(sql, lo, Some(&hi)).await?;
        let (primary, _) = self.roles().await?;
        Ok(ChunkOutcome {
            primary,
            primary_rows: settled.primary_rows,
            replica_rows: settled.replica_rows,
            hi,
            last,
            diffs: settled.diffs,
            unsettled: settled.unsettled,
        })
    }

    /// A table without a primary key: one order-independent aggregate per side, re-read while
    /// the primary's copy moves.
    async fn whole_table(&mut self, t: &Table) -> Result<Tally, VerifyError> {
        let timeout = self.db.timeout();
        let stmt = (chunk::whole_table(t), Vec::new());
        let mut tally = Tally::default();
        // Not a `crate::poll` retry, as in `chunk`: a fixed number of re-reads while the
        // primary's copy moves.
        for attempt in 0..CHUNK_ATTEMPTS + ROW_PASSES {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 << attempt.min(4))).await;
            }
            let (primary, replica) = self.roles().await?;
            let (pw, pdb) = self.db.of(primary);
            let p: Aggregate = chunk::read_aggregate(pw, pdb, &stmt, timeout).await?;
            self.consistent_point(primary).await?;
            let (rw, rdb) = self.db.of(replica);
            let r = chunk::read_aggregate(rw, rdb, &stmt, timeout).await?;
            let again = chunk::read_aggregate(pw, pdb, &stmt, timeout).await?;
            // Full scans (the primary twice): --rate holds for keyless tables too.
            self.rows_read += p.rows.max(r.rows);
            self.throttle(p.rows.max(r.rows) + again.rows).await;
            let equal = p.rows == r.rows && p.hash == r.hash;
            let still = again == p;
            tally = Tally::default();
            tally.add(
                ChunkOutcome {
                    primary,
                    primary_rows: p.rows,
                    replica_rows: r.rows,
                    hi: Vec::new(),
                    last: true,
                    diffs: vec![],
                    unsettled: vec![],
                },
                0,
            );
            if equal {
                return Ok(tally);
            }
            if still {
                // Settled, but without a key there is no row to name.
                tally.differing = p.rows.abs_diff(r.rows).max(1);
                return Ok(tally);
            }
        }
        tally.unsettled.push(vec!["(whole table)".into()]);
        Ok(tally)
    }

    /// Which server takes the writes now (a flip between chunks moves it), and the other.
    async fn roles(&mut self) -> Result<(Role, Role), VerifyError> {
        let primary = self
            .ctl
            .active()
            .map_err(|e| VerifyError::BadRequest(e.to_string()))?;
        if primary != self.catch_up.primary {
            self.catch_up = CatchUp::discover(
                self.ctl,
                &self.db.source,
                &self.db.target,
                self.db.timeout(),
            )
            .await?;
            let line = format!(
                "writes now go to the {primary}: {}",
                self.catch_up.describe()
            );
            self.say(line);
        }
        Ok((primary, primary.other()))
    }

    /// Waits until the replica has applied everything the primary had written by now.
    async fn consistent_point(&self, primary: Role) -> Result<(), VerifyError> {
        let (_, pdb) = self.db.of(primary);
        let (_, rdb) = self.db.of(primary.other());
        let mut said = false;
        let progress = self.progress.clone();
        self.catch_up
            .wait(
                pdb,
                rdb,
                self.req.catch_up_timeout,
                self.db.timeout(),
                |lsn, at| {
                    if !said {
                        said = true;
                        let _ = progress
                            .send(format!("waiting for replication to reach {lsn} (at {at})"));
                    }
                },
            )
            .await
    }
}
