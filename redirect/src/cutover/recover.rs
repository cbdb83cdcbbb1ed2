//! After a restart: finish or undo a cutover the previous controller left unfinished.
//!
//! `ACTIVE` decides, not the journal: it is written before the journal's `flip` entry, so a
//! crash between the two must count as flipped.
//! - Not flipped: the old server never stopped being the truth. Undo: lift the fence (it
//!   lapses by itself within the lease anyway), release held SYNs to it, re-enable the
//!   subscription and drop the reverse slot if the journal shows they were being changed.
//! - Flipped: the new server has taken writes. Finish: release held SYNs, do the replication
//!   step after the flip if it is not journaled, and resume the drain until its journaled
//!   deadline, so old connections are ended and their clients told.
//!
//! Every action is idempotent, so a controller that dies while recovering is recovered again.

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redirect_common::cutover::Cutover;
use tokio_postgres::Client;

use super::catalog::DROP_IDLE_SLOT;
use super::{
    Controller, CutoverError, Phase,
    journal::{self, Entry, Journal, Step},
    lane, quote_ident, replication,
};
use crate::pg::Server;
use crate::{datapath::Role, host::drain, sync::lock};

/// A drain to resume in the background (the controller serves meanwhile).
pub struct PendingDrain {
    pub cutover: String,
    pub from: Role,
    pub to: Role,
    pub until: SystemTime,
    done_so_far: String,
}

/// Recovers an interrupted cutover, up to (not including) its drain. Returns what was done
/// and, for a flipped cutover, the drain still to run.
pub async fn recover(
    ctl: &Arc<Controller>,
) -> Result<Option<(String, Option<PendingDrain>)>, CutoverError> {
    let entries = journal::read(&ctl.journal_path)?;
    let Some(steps) = journal::unfinished(&entries) else {
        return Ok(None);
    };
    let first = steps.first().cloned().unwrap_or_default();
    let (Some(from), Some(to)) = (first.from, first.to) else {
        return Ok(None);
    };
    ctl.set_phase(Phase::Recovering);
    let flipped = match fleet_outcome(ctl, from).await {
        Some(active) => active == to,
        None => ctl.active()? == to,
    };
    let has = |s: Step| steps.iter().any(|e| e.step == s);
    if !flipped {
        let what = roll_back(ctl, from, to, &steps).await;
        journal_recovered(ctl, &first, &what)?;
        return Ok(Some((what, None)));
    }
    let mut did = Vec::new();
    {
        let mut maps = lock(&ctl.host.maps);
        if ctl.fleet.is_some() {
            // The fleet committed `to` (its follower writes it too; no window without it).
            maps.set_active(to)?;
        }
        let mut c = maps.cutover()?;
        if c.fenced_backend != from.index() {
            // Cannot happen (the fence is set before the flip), but never leave the old
            // server unfenced next to a flipped ACTIVE.
            c = Cutover {
                fenced_backend: from.index(),
                ..Cutover::IDLE
            };
        }
        c.hold_until_ns = 0;
        maps.set_cutover(c)?;
    }
    match ctl.host.release_twice() {
        Ok(n) => did.push(format!(
            "the flip to the {to} had happened; {n} held connection(s) released to it"
        )),
        Err(e) => did.push(format!(
            "the flip to the {to} had happened; releasing held connections failed ({e})"
        )),
    }
    let logical = ctl.db.as_ref().is_some_and(|d| {
        to == Role::Source || d.replication == crate::pg::lag::Replication::Logical
    });
    if logical && ctl.db.is_some() {
        did.extend(after_flip_replication(ctl, to, &steps).await);
    }
    let until = steps.iter().find_map(|e| e.drain_until_ms).map_or_else(
        || SystemTime::now() + Duration::from_millis(first.drain_timeout_ms.unwrap_or(30_000)),
        |ms| UNIX_EPOCH + Duration::from_millis(ms),
    );
    if has(Step::Drain) {
        let what = did.join("; ");
        journal_recovered(ctl, &first, &what)?;
        return Ok(Some((what, None)));
    }
    let left = until.duration_since(SystemTime::now()).unwrap_or_default();
    did.push(format!("resuming the drain of the {from} ({left:?} left)"));
    Ok(Some((
        did.join("; "),
        Some(PendingDrain {
            cutover: first.cutover.clone(),
            from,
            to,
            until,
            done_so_far: did.join("; "),
        }),
    )))
}

/// In a fleet, the committed epoch decides whether the interrupted cutover flipped, not this
/// host's journal: returns the backend the fleet committed (`None`: not a fleet member, or
/// etcd unreadable, and then `ACTIVE`, which `run` wrote from etcd moments ago, decides).
/// A `Hold` this member wrote and never finished is aborted first, by compare-and-swap: if
/// the dead controller's commit landed after all, the swap fails and the commit is what
/// etcd then shows.
async fn fleet_outcome(ctl: &Controller, from: Role) -> Option<Role> {
    let fleet = ctl.fleet.as_ref()?;
    let mut client = fleet.client();
    let name = &fleet.settings.fleet;
    let read = |mut client: etcd_client::Client| async move {
        tokio::time::timeout(
            Duration::from_secs(5),
            crate::fleet::state::read(&mut client, name),
        )
        .await
        .ok()?
        .ok()?
    };
    let now = read(client.clone()).await?;
    let mine = now.state.phase == crate::fleet::state::FleetPhase::Hold
        && now.state.written_by == fleet.settings.member;
    if !mine {
        // Idle: the outcome. Another member's Hold: its `active` is what the fleet had
        // committed when that cutover began, so this one's outcome too.
        return Some(now.state.active);
    }
    let guard = crate::fleet::state::Guard::StateOnly;
    if crate::fleet::lead::commit_next(fleet, &now, from, &guard)
        .await
        .is_ok()
    {
        tracing::warn!(epoch = %now.state.epoch, "aborted the fleet hold this member's previous controller left");
        return Some(from);
    }
    client = fleet.client();
    read(client).await.map(|c| c.state.active)
}

/// Runs a resumed drain to its end and journals the recovery.
pub async fn resume_drain(ctl: &Arc<Controller>, p: PendingDrain) -> Result<String, CutoverError> {
    ctl.set_phase(Phase::Drain);
    let from_db = match ctl.dsn(p.from) {
        Ok(dsn) => dsn.connect().await.ok(),
        Err(_) => None,
    };
    let d = drain::drain(
        &ctl.host,
        p.from,
        from_db.as_ref(),
        ctl.query_timeout(),
        p.until,
    )
    .await;
    ctl.set_phase(Phase::Idle);
    let what = format!(
        "{}; drain: {}",
        p.done_so_far,
        d.as_ref()
            .map_or_else(|e| format!("FAILED: {e}"), |d| drain::describe(p.from, d))
    );
    journal_recovered(
        ctl,
        &Entry {
            cutover: p.cutover,
            from: Some(p.from),
            to: Some(p.to),
            ..Entry::default()
        },
        &what,
    )?;
    *lock(&ctl.last_recovery) = Some(what.clone());
    Ok(what)
}

fn journal_recovered(ctl: &Controller, first: &Entry, what: &str) -> Result<(), CutoverError> {
    *lock(&ctl.last_recovery) = Some(what.to_owned());
    Journal::open(&ctl.journal_path)?.append(Entry {
        cutover: first.cutover.clone(),
        step: Step::Recovered,
        from: first.from,
        to: first.to,
        detail: what.to_owned(),
        ..Entry::default()
    })?;
    Ok(())
}

/// A session to `database` on the server of `role`.
async fn connect(ctl: &Controller, role: Role, database: &str) -> Option<Client> {
    let dsn = ctl.dsn(role).ok()?.for_database(database);
    tokio::time::timeout(Duration::from_secs(10), dsn.connect())
        .await
        .ok()?
        .ok()
}

/// The DSNs' database: what a journal entry without a database concerns.
fn home(ctl: &Controller) -> String {
    ctl.db
        .as_ref()
        .map_or_else(|| "postgres".to_owned(), |d| d.source.database().to_owned())
}

/// The databases (in journal order, each once) whose entries of `step` the journal holds.
fn databases_with(steps: &[Entry], step: Step, home: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for e in steps.iter().filter(|e| e.step == step) {
        let db = e.database.clone().unwrap_or_else(|| home.to_owned());
        if !out.contains(&db) {
            out.push(db);
        }
    }
    out
}

async fn roll_back(ctl: &Arc<Controller>, from: Role, to: Role, steps: &[Entry]) -> String {
    let mut did = Vec::new();
    let lifted = lock(&ctl.host.maps).set_cutover(Cutover::IDLE);
    match lifted.map_err(CutoverError::from).and_then(|()| Ok(ctl.host.release_twice()?)) {
        Ok(n) => did.push(format!("rolled back: no flip had happened; fence lifted, {n} held connection(s) released to the {from}")),
        Err(e) => did.push(format!("rolled back: no flip had happened; lifting the fence failed ({e}), it lapses by itself")),
    }
    let home = home(ctl);
    let qt = ctl
        .db
        .as_ref()
        .map_or(Duration::from_secs(5), |d| d.query_timeout);
    let mut databases = databases_with(steps, Step::Disabling, &home);
    for db in databases_with(steps, Step::CreatingReverseSlot, &home) {
        if !databases.contains(&db) {
            databases.push(db);
        }
    }
    let many = databases.len() > 1;
    for database in databases {
        let named = |s: String| {
            if many {
                format!("database {database}: {s}")
            } else {
                s
            }
        };
        let in_db = |e: &&Entry| e.database.as_deref().unwrap_or(&home) == database;
        let disabled: Vec<String> = steps
            .iter()
            .filter(|e| e.step == Step::Disabling)
            .filter(in_db)
            .filter_map(|e| e.subscription.clone())
            .collect();
        // The name the journal recorded (an older journal: derived as that version did).
        let slot: Option<String> = steps
            .iter()
            .filter(in_db)
            .find(|e| e.step == Step::CreatingReverseSlot)
            .map(|e| {
                e.slot
                    .clone()
                    .unwrap_or_else(|| lane::reverse_slot(&database, &home))
            });
        let Some(db) = connect(ctl, to, &database).await else {
            did.push(named(format!(
                "the {to} is unreachable: re-enable subscription(s) {disabled:?} there by hand{}",
                slot.as_ref()
                    .map(|s| format!(", and drop the reverse slot {s} (it retains WAL)"))
                    .unwrap_or_default()
            )));
            continue;
        };
        for sub in disabled {
            let sql = format!("ALTER SUBSCRIPTION {} ENABLE", quote_ident(&sub));
            match crate::pg::timed(
                Server::Subscriber,
                "re-enabling the subscription",
                qt,
                db.batch_execute(&sql),
            )
            .await
            {
                Ok(()) => did.push(named(format!("subscription {sub} re-enabled"))),
                Err(e) => did.push(named(format!(
                    "FAILED to re-enable subscription {sub}: {e}"
                ))),
            }
        }
        if let Some(reverse_slot) = slot {
            let r = crate::pg::timed(
                Role::Target,
                "dropping the reverse slot",
                qt,
                db.execute(DROP_IDLE_SLOT, &[&reverse_slot]),
            )
            .await;
            did.push(named(match r {
                Ok(_) => "reverse slot dropped".into(),
                Err(e) => format!("FAILED to drop the reverse slot: {e}"),
            }));
        }
    }
    did.join("; ")
}

/// The replication step after a flip, in every database whose step the interrupted
/// controller did not journal.
async fn after_flip_replication(ctl: &Arc<Controller>, to: Role, steps: &[Entry]) -> Vec<String> {
    let home = home(ctl);
    let done = databases_with(steps, Step::ReverseSubscription, &home);
    let turned = databases_with(steps, Step::Reverse, &home);
    if turned.is_empty() && to == Role::Target {
        return vec!["no reverse slot had been made: rollback will need --force".into()];
    }
    let many = turned.len() > 1;
    let mut said = Vec::new();
    for database in turned.into_iter().filter(|d| !done.contains(d)) {
        let what = after_flip_in(ctl, to, steps, &database, &home).await;
        let what = if many {
            format!("database {database}: {what}")
        } else {
            what
        };
        let _ = Journal::open(&ctl.journal_path).and_then(|mut j| {
            j.append(Entry {
                cutover: steps.first().map(|e| e.cutover.clone()).unwrap_or_default(),
                step: Step::ReverseSubscription,
                from: steps.first().and_then(|e| e.from),
                to: Some(to),
                database: Some(database.clone()),
                detail: what.clone(),
                ..Entry::default()
            })
        });
        said.push(what);
    }
    said
}

/// One database's replication step after the flip.
async fn after_flip_in(
    ctl: &Arc<Controller>,
    to: Role,
    steps: &[Entry],
    database: &str,
    home: &str,
) -> String {
    let (Some(source), Some(target)) = (
        connect(ctl, Role::Source, database).await,
        connect(ctl, Role::Target, database).await,
    ) else {
        return "a server is unreachable: the replication step after the flip was not finished; restart the controller when both are reachable".into();
    };
    let qt = ctl
        .db
        .as_ref()
        .map_or(Duration::from_secs(5), |d| d.query_timeout);
    let in_db = |e: &&Entry| e.database.as_deref().unwrap_or(home) == database;
    // Forward: the reverse slot the journal recorded. Rollback: the reverse subscription's
    // slot, which its `disabling` entry recorded.
    let recorded = if to == Role::Target {
        steps
            .iter()
            .filter(in_db)
            .find(|e| e.step == Step::CreatingReverseSlot)
            .and_then(|e| e.slot.clone())
    } else {
        steps
            .iter()
            .filter(in_db)
            .find(|e| e.step == Step::Disabling)
            .and_then(|e| e.slot.clone())
    };
    let slot = recorded.unwrap_or_else(|| lane::reverse_slot(database, home));
    let way_back = replication::ReverseTarget {
        database,
        slot: &slot,
    };
    let result = if to == Role::Target {
        // Made disabled before the hold by this attempt: its ReverseReady is journaled.
        let made_before_hold = steps
            .iter()
            .filter(in_db)
            .any(|e| e.step == Step::ReverseReady);
        replication::start_reverse(ctl, &source, &target, qt, made_before_hold, &way_back)
            .await
            .map(|s| s.to_string())
    } else {
        let Some(point) = steps
            .iter()
            .filter(in_db)
            .rev()
            .find(|e| e.step == Step::Reverse)
            .and_then(|e| e.source_lsn)
        else {
            // A forced rollback with no replication, or no readable rollback point:
            // restarting the forward subscription unadvanced would replay the target's own
            // writes back into it. The live path skips it too.
            return "no rollback point journaled (forced rollback?): the forward subscription is left disabled; re-sync the target before another cutover".into();
        };
        let forward = ctl.forward_subscription_for(database);
        replication::restart_forward(&source, &target, Some(point), qt, forward, &way_back).await
    };
    result.unwrap_or_else(|e| format!("FAILED: {e}"))
}
