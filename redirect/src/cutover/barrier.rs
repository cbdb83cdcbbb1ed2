//! Step 4: the LSN barrier, observed directly.
//!
//! Logical: a marker row written on the old server after the fence; logical replication
//! applies in commit order, so once the new server has the marker it has every earlier
//! commit. Physical: the old server's WAL *insert* position after the fence (the write
//! position can lag behind records already inserted), replayed by the standby.

use std::{
    ops::ControlFlow,
    time::{Duration, Instant},
};

use super::catalog::CURRENT_LSN;
use super::{
    CutoverError, Phase, Run,
    journal::{Entry, Step},
    lane::Lane,
    preflight::{SEE_MARKER, WRITE_MARKER},
};
use crate::pg::Server;
use crate::{
    datapath::Role,
    pg::{Lsn, parse_lsn_of},
};

const INSERT_LSN: &str = "SELECT pg_current_wal_insert_lsn()::text";
const REPLAY_LSN: &str = "SELECT pg_last_wal_replay_lsn()::text";
/// Whether the subscription can still deliver the marker: enabled, with an apply worker.
const APPLYING: &str = "SELECT s.subenabled AND EXISTS (SELECT 1 FROM pg_stat_subscription st \
     WHERE st.subid = s.oid AND st.relid IS NULL AND st.pid IS NOT NULL) FROM pg_subscription s \
     WHERE s.subname = $1 AND s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())";
/// How long replication may look stopped before the barrier gives up without waiting for
/// `--timeout` (an apply worker restarting is briefly absent).
const STOPPED_FOR: Duration = Duration::from_secs(1);

/// Waits until the new server has applied everything the old one committed before the fence.
pub async fn wait_for_new_server(run: &mut Run) -> Result<(), CutoverError> {
    run.ctl.set_phase(Phase::Barrier);
    let t = Instant::now();
    if !run.barrier {
        run.rec.step(
            Step::Barrier,
            t,
            format!("SKIPPED (forced, no replication): the {}'s writes since the last cutover are not on the {}", run.from, run.to),
        )?;
        return Ok(());
    }
    let (fence_lsn, applied) = if run.logical {
        no_database_appeared(run).await?;
        logical(run).await?
    } else {
        physical(run).await?
    };
    run.report.barrier_ms = t.elapsed().as_secs_f64() * 1000.0;
    run.report.fence_lsn = Some(fence_lsn);
    run.report.applied_lsn = applied;
    let (source_lsn, target_lsn) = if run.from == Role::Source {
        (Some(fence_lsn), applied)
    } else {
        (applied, Some(fence_lsn))
    };
    let detail = format!(
        "the {} has applied everything up to {fence_lsn}{}",
        run.to,
        if run.lanes.len() > 1 {
            format!(
                " in each of {} databases ({})",
                run.lanes.len(),
                super::lane::names(&run.lanes)
            )
        } else {
            String::new()
        }
    );
    run.rec.log(
        t,
        Entry {
            step: Step::Barrier,
            source_lsn,
            target_lsn,
            detail,
            ..Entry::default()
        },
    )
}

/// A database created since preflight would move with the VIP unprotected: its writes before
/// the fence reached no barrier. One query, behind the fence, before anything is flipped.
async fn no_database_appeared(run: &Run) -> Result<(), CutoverError> {
    if run.report.databases.is_empty() {
        return Ok(());
    }
    let now = run
        .query(
            Phase::Barrier,
            Server::Old,
            "listing databases",
            run.from_db.query(crate::pg::cluster::DATABASES, &[]),
        )
        .await?;
    let new: Vec<String> = now
        .iter()
        .map(|r| r.get::<_, String>(0))
        .filter(|d| !run.report.databases.iter().any(|k| k.name == *d))
        .collect();
    if new.is_empty() {
        return Ok(());
    }
    Err(CutoverError::abort(
        Phase::Barrier,
        format!(
            "database(s) {} appeared on the {} during the cutover: nothing carries them; flip again once each is replicated or left out",
            new.join(", "),
            run.from
        ),
    ))
}

/// Every database's marker, written and waited for side by side: the write pause grows by
/// the slowest database, not by their sum. The fence LSN is the latest marker's.
async fn logical(run: &Run) -> Result<(Lsn, Option<Lsn>), CutoverError> {
    let each =
        futures_util::future::try_join_all(run.lanes.iter().map(|l| logical_lane(run, l))).await?;
    let fence_lsn =
        each.iter().map(|(f, _)| *f).max().ok_or_else(|| {
            CutoverError::abort(Phase::Barrier, "no database to put a barrier in")
        })?;
    let applied = each.iter().filter_map(|(_, a)| *a).max();
    Ok((fence_lsn, applied))
}

/// One database's barrier: a marker written on the old server after the fence, seen on the
/// new one.
async fn logical_lane(run: &Run, lane: &Lane) -> Result<(Lsn, Option<Lsn>), CutoverError> {
    let token = format!("{}-{}", run.rec.id, std::process::id());
    run.query(
        Phase::Barrier,
        Server::Old,
        "writing the barrier marker",
        lane.from_db.execute(WRITE_MARKER, &[&token]),
    )
    .await?;
    let fence_lsn = run
        .query_lsn(
            Phase::Barrier,
            Server::Old,
            "reading the fence LSN",
            lane.from_db.query_one(CURRENT_LSN, &[]),
        )
        .await?;
    let too_late = || {
        CutoverError::abort(
            Phase::Barrier,
            format!(
                "{}the {} did not apply the marker within --timeout {:?}",
                lane.prefix(),
                run.to,
                run.req.timeout
            ),
        )
    };
    let token = &token;
    // Every 2 ms: held clients wait for as long as the barrier does, and the marker
    // usually arrives within a few. A stopped replication ends the wait early (`Applying`).
    let seen = crate::poll::until_with(
        run.deadline,
        Duration::from_millis(2),
        Applying::new(),
        |mut applying| async move {
            let seen = match run
                .query(
                    Phase::Barrier,
                    Server::New,
                    "looking for the marker",
                    lane.to_db.query_opt(SEE_MARKER, &[token]),
                )
                .await
            {
                // A look the deadline cut short is the deadline's, not a failed query.
                Err(_) if run.remaining().is_zero() => return Err(too_late()),
                other => other?,
            };
            if seen.is_some() {
                return Ok(ControlFlow::Break(()));
            }
            applying.check(run, lane).await?;
            Ok(ControlFlow::Continue(applying))
        },
    )
    .await?;
    if seen.is_continue() {
        return Err(too_late());
    }
    // Only reported: the barrier is the marker, not this position.
    let applied = run
        .query_lsn(
            Phase::Barrier,
            Server::New,
            "reading its LSN",
            lane.to_db.query_one(CURRENT_LSN, &[]),
        )
        .await
        .ok();
    Ok((fence_lsn, applied))
}

/// Whether the marker can still arrive. Held clients wait for as long as the barrier does:
/// if replication has stopped, the marker never will, so the barrier gives up as soon as
/// that is clear, not at --timeout.
struct Applying {
    /// When the apply worker was last looked at (every 200 ms at most).
    checked: Instant,
    /// Since when replication has looked stopped.
    stopped_since: Option<Instant>,
}

impl Applying {
    fn new() -> Self {
        Self {
            checked: Instant::now(),
            stopped_since: None,
        }
    }

    /// Looks at the subscription's apply worker if the last look is 200 ms old; aborts once
    /// replication has looked stopped for [`STOPPED_FOR`].
    async fn check(&mut self, run: &Run, lane: &Lane) -> Result<(), CutoverError> {
        if self.checked.elapsed() <= Duration::from_millis(200) {
            return Ok(());
        }
        let Some(sub) = &lane.subscription else {
            return Ok(());
        };
        self.checked = Instant::now();
        let applying: Option<bool> = run
            .query(
                Phase::Barrier,
                Server::New,
                "checking the apply worker",
                lane.to_db.query_opt(APPLYING, &[sub]),
            )
            .await?
            .and_then(|r| r.get(0));
        if applying == Some(true) {
            self.stopped_since = None;
        } else if self
            .stopped_since
            .get_or_insert_with(Instant::now)
            .elapsed()
            > STOPPED_FOR
        {
            return Err(CutoverError::abort(
                Phase::Barrier,
                format!(
                    "{}replication into the {} stopped (subscription {sub} disabled or its apply worker gone); the marker cannot arrive",
                    lane.prefix(),
                    run.to
                ),
            ));
        }
        Ok(())
    }
}

async fn physical(run: &Run) -> Result<(Lsn, Option<Lsn>), CutoverError> {
    let fence_lsn = run
        .query_lsn(
            Phase::Barrier,
            Server::Old,
            "reading the WAL insert position",
            run.from_db.query_one(INSERT_LSN, &[]),
        )
        .await?;
    // Every 2 ms: held clients wait for as long as the barrier does.
    let replayed = crate::poll::until(run.deadline, Duration::from_millis(2), || async {
        // NULL until the standby has replayed anything.
        let replayed: Option<String> = run
            .query(
                Phase::Barrier,
                Server::New,
                "reading the replay LSN",
                run.to_db.query_one(REPLAY_LSN, &[]),
            )
            .await?
            .get(0);
        let Some(r) = replayed.as_deref() else {
            return Ok::<_, CutoverError>(None);
        };
        let r = parse_lsn_of(Server::New, "pg_last_wal_replay_lsn()", r)
            .map_err(|e| CutoverError::abort(Phase::Barrier, e.to_string()))?;
        Ok((r >= fence_lsn).then_some(r))
    })
    .await?;
    let Some(r) = replayed else {
        return Err(CutoverError::abort(
            Phase::Barrier,
            format!(
                "the {} did not replay {fence_lsn} within --timeout {:?}",
                run.to, run.req.timeout
            ),
        ));
    };
    Ok((fence_lsn, Some(r)))
}
