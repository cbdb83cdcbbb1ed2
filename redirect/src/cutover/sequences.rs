//! Step 5: sequences are not replicated by logical replication: carry every value over.
//!
//! They are read behind the fence, not at preflight: writes until the fence advanced them,
//! and a stale value makes the new server hand out ids it already has (duplicate keys). A
//! sequence the controller's role cannot read is an error, never skipped: skipping it would
//! leave the new server handing out taken ids.
//!
//! PostgreSQL 19 can synchronize sequences itself (a publication `FOR ALL SEQUENCES`, then
//! `ALTER SUBSCRIPTION ... REFRESH SEQUENCES`). Where both servers are 19+ and the
//! subscription's publications publish sequences, this step asks for that sync first and waits
//! for it, then still sets every value itself: the `setval` sync stays the safety net (and the
//! only sync everywhere else). Untested against a real 19: no 19 server runs in the lab.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::{
    CutoverError, Phase, Run, catalog::SUB_PUBLICATIONS, journal::Step, lane::Lane, quote_ident,
    quote_literal,
};
use crate::datapath::Role;
use crate::pg::Server;
use crate::pg::{PgError, timed};

/// Every sequence, its last value (NULL when never used, or when unreadable) and whether
/// this role may read it (which tells the two NULLs apart).
const SEQUENCES: &str = "SELECT format('%I.%I', schemaname, sequencename), last_value, \
     has_sequence_privilege(format('%I.%I', schemaname, sequencename), 'SELECT, USAGE') \
     FROM pg_sequences ORDER BY 1";

/// PostgreSQL 19's native sequence synchronization (`pg_publication.puballsequences`).
pub const NATIVE_SYNC_SINCE: i32 = 190_000;
const VERSION_NUM: &str = "SELECT current_setting('server_version_num')::int4";
/// Whether `pg_publication` has the column: read before naming it, so an older server (or a
/// 19 whose catalog differs) never sees a query it cannot parse.
const HAS_PUBALLSEQUENCES: &str = "SELECT EXISTS (SELECT 1 FROM pg_attribute \
     WHERE attrelid = 'pg_catalog.pg_publication'::regclass AND attname = 'puballsequences' AND NOT attisdropped)";
const PUBLISHES_SEQUENCES: &str =
    "SELECT coalesce(bool_or(puballsequences), false) FROM pg_publication WHERE pubname = ANY($1)";
/// Sequences of the subscription not yet synchronized (`pg_subscription_rel` lists them on 19).
const SEQUENCES_PENDING: &str = "SELECT count(*) FROM pg_subscription_rel r JOIN pg_class c ON c.oid = r.srrelid \
     WHERE r.srsubid = (SELECT oid FROM pg_subscription WHERE subname = $1 \
     AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())) \
     AND c.relkind = 'S' AND r.srsubstate <> 'r'";

/// Whether PostgreSQL 19's own sequence sync applies: both servers 19+ and the publications
/// publish sequences (`None`: the column is not there).
#[must_use]
pub fn native_sync(publisher: i32, subscriber: i32, publishes_sequences: Option<bool>) -> bool {
    publisher >= NATIVE_SYNC_SINCE
        && subscriber >= NATIVE_SYNC_SINCE
        && publishes_sequences == Some(true)
}

/// The statement that asks the subscriber to synchronize every published sequence now.
#[must_use]
pub fn refresh_sequences_sql(subscription: &str) -> String {
    format!(
        "ALTER SUBSCRIPTION {} REFRESH SEQUENCES",
        quote_ident(subscription)
    )
}

/// A sequence and its value on the old server (`None`: never used, nothing to carry).
pub struct Sequence {
    pub name: String,
    pub last_value: Option<i64>,
}

/// Why the sequences cannot be carried over.
#[derive(Debug, thiserror::Error)]
pub enum SequenceError {
    #[error("the controller's role cannot read {} sequence(s) on the old server: {}; GRANT SELECT ON them (their values must be carried to the new server)", .0.len(), .0.join(", "))]
    Unreadable(Vec<String>),
    #[error(transparent)]
    Pg(#[from] PgError),
}

/// Reads every sequence on `db`; an unreadable one is an error.
pub async fn read(db: &Client, qt: Duration) -> Result<Vec<Sequence>, SequenceError> {
    let rows = timed(
        Server::Old,
        "reading sequences",
        qt,
        db.query(SEQUENCES, &[]),
    )
    .await?;
    let unreadable: Vec<String> = rows
        .iter()
        .filter(|r| !r.get::<_, bool>(2))
        .map(|r| r.get(0))
        .collect();
    if !unreadable.is_empty() {
        return Err(SequenceError::Unreadable(unreadable));
    }
    Ok(rows
        .iter()
        .map(|r| Sequence {
            name: r.get(0),
            last_value: r.get(1),
        })
        .collect())
}

/// Sets every used sequence on the new server to its value on the old one, in every
/// database (side by side: inside the write pause).
pub async fn carry_over(run: &mut Run) -> Result<(), CutoverError> {
    run.ctl.set_phase(Phase::Sequences);
    let t = Instant::now();
    run.check_deadline(Phase::Sequences)?;
    // Physical replication carries sequences itself (and a standby cannot setval).
    let each = if run.logical {
        futures_util::future::try_join_all(run.lanes.iter().map(|l| carry_over_lane(run, l)))
            .await?
    } else {
        Vec::new()
    };
    let set: u64 = each.iter().map(|(n, _)| n).sum();
    let native = each.iter().any(|(_, native)| *native);
    run.report.sequences_synced = set;
    run.rec.step(
        Step::Sequences,
        t,
        format!(
            "{set} sequence value(s) set on the {}{}{}",
            run.to,
            if run.lanes.len() > 1 {
                format!(" across {} databases", run.lanes.len())
            } else {
                String::new()
            },
            if native {
                " (after PostgreSQL 19's REFRESH SEQUENCES; setval is the safety net)"
            } else {
                ""
            }
        ),
    )
}

/// One database's sequences: how many were set, and whether PostgreSQL 19 synced them first.
async fn carry_over_lane(run: &Run, lane: &Lane) -> Result<(u64, bool), CutoverError> {
    let native = if run.to == Role::Target {
        native_sync_first(run, lane).await?
    } else {
        false
    };
    let budget = run.qt.min(run.remaining());
    let calls: Vec<String> = read(&lane.from_db, budget)
        .await
        .map_err(|e| CutoverError::Aborted {
            step: Phase::Sequences,
            source: format!("{}{e}", lane.prefix()).into(),
        })?
        .iter()
        .filter_map(|s| {
            s.last_value
                .map(|v| format!("setval({}::regclass, {v}, true)", quote_literal(&s.name)))
        })
        .collect();
    if !calls.is_empty() {
        let sql = format!("SELECT {}", calls.join(", "));
        run.query(
            Phase::Sequences,
            Server::New,
            "setting sequences",
            lane.to_db.execute(&sql, &[]),
        )
        .await?;
    }
    Ok((calls.len() as u64, native))
}

/// PostgreSQL 19 with sequences published: `REFRESH SEQUENCES` on the subscriber, then wait
/// (within the step's budget) until it has synchronized every one, so no late native sync
/// can set a sequence back after writes reach the new server. Returns whether it ran.
async fn native_sync_first(run: &Run, lane: &Lane) -> Result<bool, CutoverError> {
    let Some(sub) = lane.subscription.clone() else {
        return Ok(false);
    };
    let publisher: i32 = run
        .query(
            Phase::Sequences,
            Server::Old,
            "reading the version",
            lane.from_db.query_one(VERSION_NUM, &[]),
        )
        .await?
        .get(0);
    let subscriber: i32 = run
        .query(
            Phase::Sequences,
            Server::New,
            "reading the version",
            lane.to_db.query_one(VERSION_NUM, &[]),
        )
        .await?
        .get(0);
    if !native_sync(publisher, subscriber, Some(true)) {
        return Ok(false); // Every server before 19: nothing more to read.
    }
    let has_column: bool = run
        .query(
            Phase::Sequences,
            Server::Old,
            "looking for sequence publishing",
            lane.from_db.query_one(HAS_PUBALLSEQUENCES, &[]),
        )
        .await?
        .get(0);
    let sequences_published = if has_column {
        let pubs: Vec<String> = run
            .query(
                Phase::Sequences,
                Server::New,
                "reading the subscription's publications",
                lane.to_db.query_one(SUB_PUBLICATIONS, &[&sub]),
            )
            .await?
            .get(0);
        Some(
            run.query(
                Phase::Sequences,
                Server::Old,
                "reading sequence publishing",
                lane.from_db.query_one(PUBLISHES_SEQUENCES, &[&pubs]),
            )
            .await?
            .get::<_, bool>(0),
        )
    } else {
        None
    };
    if !native_sync(publisher, subscriber, sequences_published) {
        return Ok(false);
    }
    run.query(
        Phase::Sequences,
        Server::New,
        "refreshing sequences (PostgreSQL 19)",
        lane.to_db.batch_execute(&refresh_sequences_sql(&sub)),
    )
    .await?;
    // Every 20 ms: this waits inside the write pause, so it looks often.
    let synced = crate::poll::until(run.deadline, Duration::from_millis(20), || async {
        let pending: i64 = run
            .query(
                Phase::Sequences,
                Server::New,
                "waiting for PostgreSQL 19's sequence sync",
                lane.to_db.query_one(SEQUENCES_PENDING, &[&sub]),
            )
            .await?
            .get(0);
        Ok::<_, CutoverError>((pending == 0).then_some(()))
    })
    .await?;
    match synced {
        Some(()) => Ok(true),
        // Out of time (`until` gives up only past the deadline, so this refuses): refusing
        // is safe (nothing has moved yet); a sync still running after the flip could set a
        // sequence back under new writes.
        None => run.check_deadline(Phase::Sequences).map(|()| false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_sync_needs_19_on_both_and_published_sequences() {
        assert!(native_sync(190_000, 190_002, Some(true)));
        assert!(!native_sync(180_004, 190_000, Some(true)), "publisher 18");
        assert!(!native_sync(190_000, 180_004, Some(true)), "subscriber 18");
        assert!(
            !native_sync(190_000, 190_000, Some(false)),
            "no FOR ALL SEQUENCES"
        );
        assert!(
            !native_sync(190_000, 190_000, None),
            "no puballsequences column"
        );
    }

    #[test]
    fn the_refresh_quotes_the_subscription() {
        assert_eq!(
            refresh_sequences_sql("sub"),
            "ALTER SUBSCRIPTION \"sub\" REFRESH SEQUENCES"
        );
        assert_eq!(
            refresh_sequences_sql("My Sub"),
            "ALTER SUBSCRIPTION \"My Sub\" REFRESH SEQUENCES"
        );
    }

    #[test]
    fn the_column_is_looked_up_before_it_is_named() {
        assert!(HAS_PUBALLSEQUENCES.contains("pg_attribute"));
        assert!(!HAS_PUBALLSEQUENCES.contains("bool_or(puballsequences)"));
        assert!(PUBLISHES_SEQUENCES.contains("puballsequences"));
    }
}
