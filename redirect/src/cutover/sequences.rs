//! Step 5: sequences are not replicated by logical replication: carry every value over.
//!
//! They are read behind the fence, not at preflight: writes until the fence advanced them,
//! and a stale value makes the new server hand out ids it already has (duplicate keys). A
//! sequence the controller's role cannot read is an error, never skipped: skipping it would
//! leave the new server handing out taken ids.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::{CutoverError, Phase, Run, journal::Step, quote_literal};
use crate::pg::{PgError, timed};

/// Every sequence, its last value (NULL when never used, or when unreadable) and whether
/// this role may read it (which tells the two NULLs apart).
const SEQUENCES: &str = "SELECT format('%I.%I', schemaname, sequencename), last_value, \
     has_sequence_privilege(format('%I.%I', schemaname, sequencename), 'SELECT, USAGE') \
     FROM pg_sequences ORDER BY 1";

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
        "old server",
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

/// Sets every used sequence on the new server to its value on the old one.
pub async fn carry_over(run: &mut Run) -> Result<(), CutoverError> {
    run.ctl.set_phase(Phase::Sequences);
    let t = Instant::now();
    run.check_deadline(Phase::Sequences)?;
    // Physical replication carries sequences itself (and a standby cannot setval).
    let calls: Vec<String> = if run.logical {
        let budget = run.qt.min(run.remaining());
        read(&run.from_db, budget)
            .await
            .map_err(|e| CutoverError::Aborted {
                step: Phase::Sequences,
                source: Box::new(e),
            })?
            .iter()
            .filter_map(|s| {
                s.last_value
                    .map(|v| format!("setval({}::regclass, {v}, true)", quote_literal(&s.name)))
            })
            .collect()
    } else {
        Vec::new()
    };
    if !calls.is_empty() {
        let sql = format!("SELECT {}", calls.join(", "));
        run.query(
            Phase::Sequences,
            "new server",
            "setting sequences",
            run.to_db.execute(&sql, &[]),
        )
        .await?;
    }
    run.report.sequences_synced = calls.len() as u64;
    run.rec.step(
        Step::Sequences,
        t,
        format!("{} sequence value(s) set on the {}", calls.len(), run.to),
    )
}
