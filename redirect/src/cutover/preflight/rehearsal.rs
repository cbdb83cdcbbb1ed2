//! The barrier before anything is held: its table made to replicate in every database, and
//! a rehearsal of its marker.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::Refusal;
use crate::controller::Controller;
use crate::cutover::catalog::SUB_PUBLICATIONS;
use crate::cutover::{
    BARRIER_TABLE, CutoverError, Run,
    journal::{self, Entry, Step},
    lane::Lane,
    quote_ident,
};
use crate::pg::Server;
use crate::pg::{
    lag::{self, Replication, Watch},
    timed,
};

pub const CREATE_BARRIER: &str = "CREATE TABLE IF NOT EXISTS public.redirect_barrier (token text PRIMARY KEY, created timestamptz NOT NULL DEFAULT now())";
pub const WRITE_MARKER: &str = "INSERT INTO public.redirect_barrier (token) VALUES ($1)";
pub const SEE_MARKER: &str = "SELECT 1 FROM public.redirect_barrier WHERE token = $1";
const APPLY_WORKER: &str = "SELECT min(st.pid) FROM pg_stat_subscription st JOIN pg_subscription s ON s.oid = st.subid \
     WHERE s.subname = $1 AND st.relid IS NULL AND st.pid IS NOT NULL \
     AND s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())";
pub(super) const PUBLICATION_HAS_BARRIER: &str = "SELECT count(*)::int8 FROM pg_publication_tables \
     WHERE pubname = ANY($1) AND schemaname = 'public' AND tablename = 'redirect_barrier'";
/// Whether the subscription already replicates the barrier table (a table added to a
/// publication, even FOR ALL TABLES, needs a REFRESH PUBLICATION on the subscriber).
pub(super) const SUBSCRIPTION_HAS_BARRIER: &str = "SELECT count(*)::int8 FROM pg_subscription_rel sr JOIN pg_subscription s ON s.oid = sr.srsubid \
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
pub(super) async fn rehearse_lane(run: &Run, lane: &Lane) -> Result<bool, CutoverError> {
    let token = format!("rehearsal-{}-{}", run.rec.id, std::process::id());
    timed(
        Server::Old,
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
            Server::New,
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

/// The pid of a subscription's apply worker, if one runs.
pub(super) async fn apply_worker(c: &Client, sub: &str) -> Option<i32> {
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
    for (which, db) in [(Server::Publisher, from_db), (Server::Subscriber, to_db)] {
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
        Server::Subscriber,
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
pub(super) async fn publish_barrier(
    from_db: &Client,
    pubs: &[String],
    qt: Duration,
) -> Result<(), CutoverError> {
    let n: i64 = timed(
        Server::Publisher,
        "checking the publication",
        qt,
        from_db.query_one(PUBLICATION_HAS_BARRIER, &[&pubs]),
    )
    .await?
    .get(0);
    if n == 0 {
        let first = pubs.first().cloned().unwrap_or_default();
        timed(
            Server::Publisher,
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
pub(super) async fn subscribe_barrier(
    from_db: &Client,
    to_db: &Client,
    pubs: &[String],
    sub: &str,
    qt: Duration,
) -> Result<(), CutoverError> {
    let m: i64 = timed(
        Server::Subscriber,
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
            Server::Publisher,
            "listing published tables",
            qt,
            from_db.query(PUBLISHED_TABLES, &[&pubs]),
        )
        .await?,
    );
    let subscribed = names(
        timed(
            Server::Subscriber,
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
        Server::Subscriber,
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
pub(super) async fn prove_barrier_replicates(
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
            Server::Publisher,
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
                    Server::Subscriber,
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

/// Makes the barrier table replicate from the active server to the other, in every
/// replicated database, off the critical path: `run` does this at start, so a cutover finds
/// it ready.
pub async fn prepare(ctl: &Controller) -> Result<(), CutoverError> {
    let db = ctl.databases()?;
    let active = ctl.active()?;
    let to = active.other();
    let watch = ctl.watch_for(to)?;
    if watch.replication != Replication::Logical {
        return Ok(());
    }
    let (from_dsn, to_dsn) = (ctl.dsn(active)?, ctl.dsn(to)?);
    let subscriber = to_dsn.connect().await?;
    let subs = lag::cluster_subscriptions(&subscriber, to, db.query_timeout).await?;
    for (database, chosen) in lag::choose(&subs, &watch) {
        let Ok(sub) = chosen else { continue };
        let (from_db, to_db) = (
            from_dsn.for_database(&database).connect().await?,
            to_dsn.for_database(&database).connect().await?,
        );
        let one = Watch::one(Replication::Logical, Some(sub.name));
        prepare_barrier(&from_db, &to_db, &one, db.query_timeout)
            .await
            .map_err(|e| e.in_database(&database))?;
    }
    Ok(())
}
