//! `redirect finish`: end a completed migration. It retires the replication the migration no
//! longer needs (the forward subscription and its slot on the old primary, the reverse
//! subscription, slot and publication) and lifts the stale fence, after showing what it will
//! do. Slots left behind retain WAL without bound, so this is the last step of a migration.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_postgres::Client;

use super::catalog::{SLOT_EXISTS, SUB_EXISTS, SUB_SLOT};
use super::{
    Controller, CutoverError, Phase, PhaseGuard, REVERSE,
    journal::{self, Entry, Journal, Step},
    quote_ident,
};
use crate::pg::Server;
use crate::{
    conntrack,
    controller::Databases,
    datapath::Role,
    pg::{cluster, lag::Replication, timed},
    sync::lock,
};

/// What `finish` will do (or did).
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct FinishReport {
    pub executed: bool,
    pub plan: Vec<String>,
    pub done: Vec<String>,
    pub left_alone: Vec<String>,
}

/// One thing to retire: where, what to run, and how to describe it.
struct Action {
    on: Role,
    database: String,
    sql: String,
    what: String,
    /// A slot drop: the slot, checked for after the drop (a walsender that has not exited
    /// yet keeps it active, and an active slot is not dropped).
    slot: Option<String>,
}

/// What to retire in one database: its forward subscription (on the target) and slot (on the
/// source), and its reverse subscription, slot and publication.
#[expect(
    clippy::too_many_arguments,
    reason = "each is one database's part of the plan; a struct would only rename them"
)]
async fn plan_database(
    ctl: &Controller,
    database: &str,
    home: &str,
    (source, target): (&Client, &Client),
    known: Option<(String, Option<String>)>,
    carried: bool,
    qt: Duration,
    actions: &mut Vec<Action>,
    report: &mut FinishReport,
) -> Result<(), CutoverError> {
    let act = |on: Role, sql: String, what: String| Action {
        on,
        database: database.to_owned(),
        slot: None,
        sql,
        what: if database == home {
            what
        } else {
            format!("database {database}: {what}")
        },
    };
    // The forward subscription only where a cutover carried this database: another
    // database's subscription (a third cluster's, say) is not the migration's to drop.
    let fwd = match ctl.forward_subscription_for(database) {
        Some(f) => Some(f),
        None if carried => lone_forward(target, qt).await?,
        None => None,
    };
    if let Some(fwd) = fwd {
        let slot = timed(
            Role::Target,
            "reading the subscription",
            qt,
            target.query_opt(SUB_SLOT, &[&fwd]),
        )
        .await
        .ok()
        .flatten()
        .and_then(|r| r.get::<_, Option<String>>(0))
        .or(known.and_then(|(_, slot)| slot));
        if count(target, SUB_EXISTS, &fwd, qt).await? {
            actions.push(act(
                Role::Target,
                drop_sub(&fwd),
                format!("drop the forward subscription {fwd} on the target"),
            ));
        }
        if let Some(slot) = slot
            && count(source, SLOT_EXISTS, &slot, qt).await?
        {
            actions.push(Action {
                slot: Some(slot.clone()),
                ..act(
                    Role::Source,
                    drop_slot(&slot),
                    format!(
                        "drop the forward slot {slot} on the source (it retains the source's WAL)"
                    ),
                )
            });
        }
    } else if database == home {
        report.left_alone.push("the forward subscription is unknown (no --subscription and none journaled): drop it and its slot by hand".into());
    }
    if count(source, SUB_EXISTS, REVERSE, qt).await? {
        actions.push(act(
            Role::Source,
            drop_sub(REVERSE),
            format!("drop the reverse subscription {REVERSE} on the source (rollback will no longer be possible)"),
        ));
    }
    let reverse_slot = super::lane::reverse_slot(database, home);
    if count(target, SLOT_EXISTS, &reverse_slot, qt).await? {
        actions.push(act(
            Role::Target,
            drop_slot(&reverse_slot),
            format!(
                "drop the reverse slot {reverse_slot} on the target (it retains the target's WAL)"
            ),
        ));
    }
    if count(target, PUB_EXISTS, REVERSE, qt).await? {
        actions.push(act(
            Role::Target,
            format!("DROP PUBLICATION {REVERSE}"),
            format!("drop the reverse publication {REVERSE} on the target"),
        ));
    }
    Ok(())
}

/// The only forward subscription of the session's database, if there is exactly one.
async fn lone_forward(db: &Client, qt: Duration) -> Result<Option<String>, CutoverError> {
    let rows = timed(
        Role::Target,
        "listing subscriptions",
        qt,
        db.query(crate::pg::lag::SUBSCRIPTIONS, &[]),
    )
    .await?;
    Ok(match rows.as_slice() {
        [one] => Some(one.get(0)),
        _ => None,
    })
}

const PUB_EXISTS: &str = "SELECT count(*)::int8 FROM pg_publication WHERE pubname = $1";

async fn count(db: &Client, sql: &str, name: &str, qt: Duration) -> Result<bool, CutoverError> {
    let row = timed(
        Server::Either,
        "finding what to retire",
        qt,
        db.query_one(sql, &[&name]),
    )
    .await?;
    Ok(row.get::<_, i64>(0) > 0)
}

fn drop_sub(name: &str) -> String {
    let n = quote_ident(name);
    format!(
        "ALTER SUBSCRIPTION {n} DISABLE; ALTER SUBSCRIPTION {n} SET (slot_name = NONE); DROP SUBSCRIPTION {n}"
    )
}

fn drop_slot(name: &str) -> String {
    format!(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = {} AND NOT active",
        super::quote_literal(name)
    )
}

/// Each database's sessions on the source and the target, by name.
type Sessions = Vec<(String, Client, Client)>;

/// Plans, and with `execute` carries out, the end of the migration.
pub async fn finish(
    ctl: &Controller,
    execute: bool,
    force: bool,
) -> Result<FinishReport, CutoverError> {
    let Ok(_busy) = ctl.busy.try_lock() else {
        return Err(CutoverError::Busy(ctl.phase()));
    };
    let db = ctl.databases()?.clone();
    refuse_unless_cut_over(ctl)?;
    let pinned_to_source = pinned_to_source(ctl)?;
    if pinned_to_source > 0 && !force {
        return Err(CutoverError::Refused(format!(
            "{pinned_to_source} connection(s) are still pinned to the source; let the drain end them, or pass --force"
        )));
    }
    let (source, target) = connect(&db).await?;
    let mut actions = Vec::new();
    let mut report = FinishReport::default();
    let sessions = if db.replication == Replication::Logical {
        plan_logical(ctl, &db, (&source, &target), &mut actions, &mut report).await?
    } else {
        report.left_alone.push("physical replication: the old primary is no longer followed; decommission or rebuild it".into());
        Vec::new()
    };
    let stale_fence = stale_fence(ctl, pinned_to_source, &mut report)?;
    report.plan = actions.iter().map(|a| a.what.clone()).collect();
    if stale_fence {
        report
            .plan
            .push("lift the datapath's stale fence on the source".into());
    }
    if !execute {
        return Ok(report);
    }
    let _idle_after = PhaseGuard(ctl);
    ctl.set_phase(Phase::Finishing);
    let t = Instant::now();
    retire(&actions, &sessions, db.query_timeout, &mut report).await?;
    if stale_fence {
        lock(&ctl.host.maps).set_cutover(redirect_common::cutover::Cutover::IDLE)?;
        report.done.push("stale fence lifted".into());
    }
    report.executed = true;
    journal_finished(ctl, t, &report)?;
    Ok(report)
}

/// Refuses unless new connections go to the target: only a completed cutover is finished.
fn refuse_unless_cut_over(ctl: &Controller) -> Result<(), CutoverError> {
    if ctl.active()? != Role::Target {
        return Err(CutoverError::Refused(
            "new connections go to the source: there is no completed cutover to finish (finish ends a migration after `flip --to target`)".into(),
        ));
    }
    Ok(())
}

/// Live connections still pinned to the source.
fn pinned_to_source(ctl: &Controller) -> Result<usize, CutoverError> {
    let maps = lock(&ctl.host.maps);
    let src = maps.backend(Role::Source)?.map(|b| b.addr);
    Ok(conntrack::list(&maps)?
        .iter()
        .filter(|c| Some(c.backend_addr) == src && c.state.is_live())
        .count())
}

/// Sessions on the source and the target, each given twice the query timeout to answer.
async fn connect(db: &Databases) -> Result<(Client, Client), CutoverError> {
    let qt = db.query_timeout;
    let (Ok(source), Ok(target)) = (
        tokio::time::timeout(qt * 2, db.source.connect()).await,
        tokio::time::timeout(qt * 2, db.target.connect()).await,
    ) else {
        return Err(CutoverError::Refused(format!(
            "a server did not answer within {:?}",
            qt * 2
        )));
    };
    Ok((source?, target?))
}

/// What to retire of logical replication, database by database, and the sessions to retire
/// it with.
async fn plan_logical(
    ctl: &Controller,
    db: &Databases,
    (source, target): (&Client, &Client),
    actions: &mut Vec<Action>,
    report: &mut FinishReport,
) -> Result<Sessions, CutoverError> {
    let qt = db.query_timeout;
    // Each database's sessions, opened once: the replication is per database.
    let mut sessions = Vec::new();
    let home = db.source.database().to_owned();
    let on_source = cluster::databases(source, Role::Source, qt).await?;
    let on_target = cluster::databases(target, Role::Target, qt).await?;
    let entries = journal::read(&ctl.journal_path)?;
    for database in on_target
        .iter()
        .filter(|d| on_source.contains(d) && db.scope.covers(d))
    {
        let Some((s, t)) = connect_database(db, database).await else {
            report.left_alone.push(format!(
                "database {database}: not reachable on both servers; retire its replication by hand"
            ));
            continue;
        };
        let known = if *database == home {
            journal::known_subscription(&entries, Role::Source, Role::Target)
        } else {
            None
        };
        let carried = *database == home
            || entries.iter().any(|e| {
                e.step == Step::Disabling && e.database.as_deref() == Some(database.as_str())
            });
        plan_database(
            ctl,
            database,
            &home,
            (&s, &t),
            known,
            carried,
            qt,
            actions,
            report,
        )
        .await?;
        sessions.push((database.clone(), s, t));
    }
    plan_stray_reverse_slots(target, &home, qt, actions).await?;
    report.left_alone.push(format!(
        "{} and the source's own publication(s): drop them when you like",
        super::BARRIER_TABLE
    ));
    Ok(sessions)
}

/// Sessions on both servers in `database`, or `None` if either does not answer.
async fn connect_database(db: &Databases, database: &str) -> Option<(Client, Client)> {
    let qt = db.query_timeout;
    let (Ok(Ok(s)), Ok(Ok(t))) = (
        tokio::time::timeout(qt * 2, db.source.for_database(database).connect()).await,
        tokio::time::timeout(qt * 2, db.target.for_database(database).connect()).await,
    ) else {
        return None;
    };
    Some((s, t))
}

/// The reverse slots no database's plan drops: a reverse slot of a database no longer in scope
/// (or gone) still retains WAL.
async fn plan_stray_reverse_slots(
    target: &Client,
    home: &str,
    qt: Duration,
    actions: &mut Vec<Action>,
) -> Result<(), CutoverError> {
    for row in timed(
        Role::Target,
        "listing reverse slots",
        qt,
        target.query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE 'redirect\\_reverse%'",
            &[],
        ),
    )
    .await?
    {
        let slot: String = row.get(0);
        if !actions.iter().any(|a| a.slot.as_deref() == Some(slot.as_str())) {
            actions.push(Action {
                on: Role::Target,
                database: home.to_owned(),
                sql: drop_slot(&slot),
                what: format!("drop the reverse slot {slot} on the target (its database is no longer cut over; it retains the target's WAL)"),
                slot: Some(slot),
            });
        }
    }
    Ok(())
}

/// Whether the datapath's fence on the source is stale and is to be lifted.
fn stale_fence(
    ctl: &Controller,
    pinned_to_source: usize,
    report: &mut FinishReport,
) -> Result<bool, CutoverError> {
    let fence = lock(&ctl.host.maps).cutover()?;
    // Never while connections are still pinned to the source (even with --force): lifting
    // the fence would let them write to a server nothing replicates from any more.
    let stale_fence =
        fence.fenced_backend != redirect_common::cutover::NO_FENCE && pinned_to_source == 0;
    if pinned_to_source > 0 {
        report.left_alone.push(format!(
            "the fence on the source stays: {pinned_to_source} connection(s) are still pinned to it"
        ));
    }
    Ok(stale_fence)
}

/// Carries out the actions, each in its database's session, and reports each one done or
/// failed.
async fn retire(
    actions: &[Action],
    sessions: &Sessions,
    qt: Duration,
    report: &mut FinishReport,
) -> Result<(), CutoverError> {
    for a in actions {
        let Some((_, s, t)) = sessions.iter().find(|(d, _, _)| *d == a.database) else {
            continue;
        };
        let c = if a.on == Role::Source { s } else { t };
        report.done.push(retire_one(c, a, qt).await?);
    }
    Ok(())
}

/// Carries out one action: what was done, or why it failed, in words.
async fn retire_one(c: &Client, a: &Action, qt: Duration) -> Result<String, CutoverError> {
    let mut result = timed(a.on, "retiring replication", qt, c.batch_execute(&a.sql)).await;
    // A slot whose walsender has not exited yet is still active and was not dropped:
    // try again for a few seconds, and say so if it stays.
    if let (Ok(()), Some(slot)) = (&result, &a.slot) {
        for _ in 0..25 {
            if !count(c, SLOT_EXISTS, slot, qt).await? {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            result = timed(a.on, "retiring replication", qt, c.batch_execute(&a.sql)).await;
        }
        if result.is_ok() && count(c, SLOT_EXISTS, slot, qt).await? {
            return Ok(format!(
                "FAILED to {}: the slot is still in use after 5 s",
                a.what
            ));
        }
    }
    Ok(match result {
        Ok(()) => a.what.clone(),
        Err(e) => format!("FAILED to {}: {e}", a.what),
    })
}

/// The journal's record that the migration was finished, with what was done.
fn journal_finished(
    ctl: &Controller,
    started: Instant,
    report: &FinishReport,
) -> Result<(), CutoverError> {
    Journal::open(&ctl.journal_path)?.append(Entry {
        cutover: journal::new_id(),
        step: Step::Finished,
        from: Some(Role::Source),
        to: Some(Role::Target),
        duration_ms: Some(started.elapsed().as_secs_f64() * 1000.0),
        detail: report.done.join("; "),
        ..Entry::default()
    })?;
    Ok(())
}
