//! Step 6 (before the flip) and step 9 (after it): turning replication around.
//!
//! Forward cutover (logical): stop source → target, so target writes are not looped back,
//! and create the reverse slot on the target now, before any write is released there, so a
//! rollback can replay every one of them; after the flip, the source subscribes to it.
//! Rollback: stop the reverse apply and note the source's LSN (the rollback point); after the
//! flip, retire the reverse replication and restart the forward subscription from that point,
//! skipping what the source received back from the target (the target has it).
//! Physical: promote the standby. Each change is journaled before it is made, so a successor
//! can undo or finish it.
//! Both servers 16 or newer: the reverse subscription is made before the hold, with
//! `origin = none` (the source then receives only the target's own writes, never the forward
//! replication's changes coming back), so rollback is ready at once and the write pause only
//! stops the forward subscription. It is standing replication, like the barrier table: an
//! aborted cutover leaves it in place for the next attempt; a rollback or `finish` retires it.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::catalog::{
    CURRENT_LSN, DROP_IDLE_SLOT, SLOT_EXISTS, SUB_EXISTS, SUB_PUBLICATIONS, SUB_SLOT,
};
use super::{
    CutoverError, Phase, REVERSE, Run, failover,
    journal::{Entry, Step},
    lane::Lane,
    quote_ident, quote_literal,
};
use crate::pg::Server;
use crate::{
    datapath::Role,
    pg::{Lsn, PgError, timed},
};

const PUB_ALL_TABLES: &str =
    "SELECT bool_or(puballtables) FROM pg_publication WHERE pubname = ANY($1)";
pub const PUB_TABLES: &str = "SELECT DISTINCT format('%I.%I', schemaname, tablename) FROM pg_publication_tables WHERE pubname = ANY($1)";
const SUB_ENABLED: &str = "SELECT subenabled FROM pg_subscription WHERE subname = $1 \
     AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())";
const IN_RECOVERY: &str = "SELECT pg_is_in_recovery()";
const VERSION_NUM: &str = "SELECT current_setting('server_version_num')::int4";
/// Whether the reverse subscription is the one [`reverse_before_hold`] makes: disabled, with
/// `origin = none`. `suborigin` is 16+: asked only where the early path ran (both 16+). Named
/// columns only: `subconninfo` is not readable without superuser (a managed service's role).
const REVERSE_SUB_EARLY: &str = "SELECT NOT s.subenabled AND s.suborigin = 'none' FROM pg_subscription s WHERE s.subname = $1 \
     AND s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())";
/// `=off` makes the reverse slot during the pause even on 16+, as on older servers: only to
/// measure the difference.
pub const REVERSE_EARLY_ENV: &str = "REDIRECT_REVERSE_EARLY";
/// `origin = none` (and so a reverse subscription made before the cutover) needs 16 on both.
const ORIGIN_NONE_SINCE: i32 = 160_000;
/// How long a requested promotion may take. Once asked for it cannot be taken back, so the
/// cutover waits for it past `--timeout` (keeping the fence) rather than leave two primaries.
pub const PROMOTION_WAIT: Duration = Duration::from_secs(60);

/// Before the flip: stop the replication into the new server, prepare the way back, in
/// every database.
pub async fn turn_around(run: &mut Run) -> Result<(), CutoverError> {
    run.ctl.set_phase(Phase::Reverse);
    let t = Instant::now();
    if !run.logical {
        return promote(run).await;
    }
    if run.to == Role::Source {
        // A forced rollback: a database it does not carry must not keep applying the
        // target's changes onto the source once clients write there.
        stop_uncarried_reverse(run).await?;
    }
    if !run.barrier {
        // Forced rollback with no working replication: nothing else to stop.
        run.report.reverse_replication = "none (forced)".into();
        return run
            .rec
            .step(Step::Reverse, t, "no replication to turn around (forced)");
    }
    // Write-ahead, every database first (one fsync for all): a successor re-enables each
    // if we die from here on before the flip.
    let mut entries = Vec::with_capacity(run.lanes.len());
    for lane in &run.lanes {
        let sub = lane.subscription.clone().ok_or_else(|| {
            CutoverError::abort(
                Phase::Reverse,
                format!("{}the subscription to stop is unknown", lane.prefix()),
            )
        })?;
        entries.push(Entry {
            step: Step::Disabling,
            subscription: Some(sub.clone()),
            slot: lane.slot.clone(),
            database: Some(lane.database.clone()),
            detail: format!(
                "disabling subscription {sub} on the {} in database {}",
                run.to, lane.database
            ),
            ..Entry::default()
        });
    }
    run.rec.log_all(Instant::now(), entries)?;
    for lane in &mut run.lanes {
        lane.disabled_subscription = true;
    }
    // Side by side: this is inside the write pause.
    let shared: &Run = run;
    futures_util::future::try_join_all(shared.lanes.iter().map(|lane| {
        let sub = lane.subscription.clone().unwrap_or_default();
        let sql = format!("ALTER SUBSCRIPTION {} DISABLE", quote_ident(&sub));
        async move {
            shared
                .query(
                    Phase::Reverse,
                    Server::New,
                    "disabling the subscription",
                    lane.to_db.batch_execute(&sql),
                )
                .await
        }
    }))
    .await?;
    let said = if run.to == Role::Target {
        make_reverse_slots(run).await?
    } else {
        rollback_points(run).await?
    };
    run.report.reverse_replication = summary(&run.lanes, &said);
    let entries = run
        .lanes
        .iter()
        .zip(&said)
        .map(|(lane, detail)| Entry {
            step: Step::Reverse,
            subscription: lane.subscription.clone(),
            source_lsn: lane.rollback_point,
            database: Some(lane.database.clone()),
            detail: detail.clone(),
            ..Entry::default()
        })
        .collect();
    run.rec.log_all(t, entries)
}

/// Disables the reverse subscription of every database a (forced) rollback does not carry.
async fn stop_uncarried_reverse(run: &Run) -> Result<(), CutoverError> {
    let subs = run
        .query(
            Phase::Reverse,
            Role::Source,
            "listing the reverse subscriptions",
            run.to_db.query(crate::pg::lag::CLUSTER_SUBSCRIPTIONS, &[]),
        )
        .await?;
    for row in subs {
        let (database, name, enabled): (String, String, bool) =
            (row.get(0), row.get(1), row.get(2));
        if name != REVERSE || !enabled || run.lanes.iter().any(|l| l.database == database) {
            continue;
        }
        let source = run
            .ctl
            .dsn(Role::Source)?
            .for_database(&database)
            .connect()
            .await?;
        run.query(
            Phase::Reverse,
            Role::Source,
            "disabling an uncarried reverse subscription",
            source.batch_execute(&format!("ALTER SUBSCRIPTION {REVERSE} DISABLE")),
        )
        .await?;
        run.rec.say(format!(
            "reverse   database {database}: not carried (forced): its reverse subscription is disabled"
        ));
    }
    Ok(())
}

/// A forward cutover, every forward subscription stopped: each database's reverse slot, made
/// side by side (a logical slot waits for running transactions, so one after another would
/// lengthen the write pause by each database's wait), each journaled first, with one fsync.
/// A database whose reverse replication was made before the hold has its slot already.
/// Returns what the report says of each.
async fn make_reverse_slots(run: &mut Run) -> Result<Vec<String>, CutoverError> {
    let pending: Vec<usize> = (0..run.lanes.len())
        .filter(|&i| !run.lanes[i].reverse_ready)
        .collect();
    let entries = pending
        .iter()
        .map(|&i| {
            let lane = &run.lanes[i];
            Entry {
                step: Step::CreatingReverseSlot,
                database: Some(lane.database.clone()),
                slot: Some(lane.reverse_slot.clone()),
                detail: format!("creating slot {} on the target", lane.reverse_slot),
                ..Entry::default()
            }
        })
        .collect::<Vec<_>>();
    if !entries.is_empty() {
        run.rec.log_all(Instant::now(), entries)?;
    }
    for &i in &pending {
        run.lanes[i].made_reverse_slot = true;
    }
    let shared: &Run = run;
    let made = futures_util::future::join_all(
        pending
            .iter()
            .map(|&i| create_reverse_slot(shared, &shared.lanes[i])),
    )
    .await;
    let applied = run
        .report
        .applied_lsn
        .map(|l| l.to_string())
        .unwrap_or_default();
    let mut made = pending.into_iter().zip(made);
    let mut said = Vec::with_capacity(run.lanes.len());
    let mut failed = None;
    for i in 0..run.lanes.len() {
        if run.lanes[i].reverse_ready {
            // Made before the hold; its slot has kept every target write since.
            run.lanes[i].reverse_slot_made = true;
            said.push(format!(
                "subscription {REVERSE} on the source, made before the hold (origin = none): rollback is lossless{}",
                failover_suffix(&run.lanes[i])
            ));
            continue;
        }
        let Some((_, result)) = made.next() else {
            break;
        };
        match result {
            Ok(failover) => {
                let lane = &mut run.lanes[i];
                lane.reverse_slot_made = true;
                lane.reverse_failover = failover;
                said.push(format!(
                    "slot {} on the target from {applied}{}",
                    lane.reverse_slot,
                    failover_suffix(lane)
                ));
            }
            Err(e) if run.req.force => said.push(format!("NONE (forced): {e}")),
            Err(e) => {
                failed.get_or_insert(e);
                said.push(String::new());
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(said),
    }
}

/// A rollback, every reverse apply stopped: everything they brought is before this LSN. The
/// WAL is the cluster's, so one reading after every stop is each database's rollback point.
async fn rollback_points(run: &mut Run) -> Result<Vec<String>, CutoverError> {
    let lsn = run
        .query_lsn(
            Phase::Reverse,
            Role::Source,
            "reading the rollback point",
            run.to_db.query_one(CURRENT_LSN, &[]),
        )
        .await?;
    for lane in &mut run.lanes {
        lane.rollback_point = Some(lsn);
    }
    Ok(vec![
        format!("reverse subscription {REVERSE} stopped");
        run.lanes.len()
    ])
}

/// The report's line for every database: the one database's own words, or each one's.
fn summary(lanes: &[super::lane::Lane], said: &[String]) -> String {
    match said {
        [one] => one.clone(),
        _ => lanes
            .iter()
            .zip(said)
            .map(|(l, s)| format!("{}{s}", l.prefix()))
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// Forward logical cutover with both servers 16 or newer: sets up the reverse replication
/// (publication and slot on the target, subscription with `origin = none` on the source) now,
/// before anything is held, in every database. Never fails the cutover: where it cannot, it
/// takes back what it made and that database's reverse slot is made during the pause, as on
/// older servers.
pub async fn reverse_before_hold(run: &mut Run) {
    if !run.logical || !run.barrier || run.to != Role::Target {
        return;
    }
    let (source, target) = match (
        timed(
            Role::Source,
            "reading the version",
            run.qt,
            run.from_db.query_one(VERSION_NUM, &[]),
        )
        .await,
        timed(
            Role::Target,
            "reading the version",
            run.qt,
            run.to_db.query_one(VERSION_NUM, &[]),
        )
        .await,
    ) {
        (Ok(s), Ok(t)) => (s.get::<_, i32>(0), t.get::<_, i32>(0)),
        _ => return, // The steps that follow report an unreachable server.
    };
    if source < ORIGIN_NONE_SINCE || target < ORIGIN_NONE_SINCE {
        return;
    }
    // For measuring what this saves (docs/compatibility.md): the pre-16 path on any server.
    if std::env::var(REVERSE_EARLY_ENV).is_ok_and(|v| v == "off") {
        return;
    }
    for i in 0..run.lanes.len() {
        reverse_before_hold_lane(run, i).await;
    }
}

async fn reverse_before_hold_lane(run: &mut Run, i: usize) {
    let t = Instant::now();
    let (database, slot) = (
        run.lanes[i].database.clone(),
        run.lanes[i].reverse_slot.clone(),
    );
    // Write-ahead, as on the old path: an undo, or the successor of a controller that dies
    // from here on before the flip, drops the slot (an unused slot retains WAL for ever).
    let entry = Entry {
        step: Step::CreatingReverseSlot,
        database: Some(database.clone()),
        slot: Some(slot.clone()),
        detail: format!("creating slot {slot} on the target, before the hold"),
        ..Entry::default()
    };
    if run.rec.log(Instant::now(), entry).is_err() {
        return;
    }
    run.lanes[i].made_reverse_slot = true;
    let detail = match make_reverse_early(run, &run.lanes[i]).await {
        Ok(failover) => {
            let lane = &mut run.lanes[i];
            lane.reverse_ready = true;
            lane.reverse_failover = failover;
            format!(
                "slot {slot} on the target and subscription {REVERSE} on the source (origin = none, enabled after the forward subscription stops): rollback ready before the hold{}",
                failover_suffix(lane)
            )
        }
        Err(e) => {
            let lane = &run.lanes[i];
            let cleaned = drop_reverse_subscription(&lane.from_db, run.qt).await.and(
                timed(
                    Role::Target,
                    "dropping the reverse slot",
                    run.qt,
                    lane.to_db.execute(DROP_IDLE_SLOT, &[&slot]),
                )
                .await
                .map(|_| ()),
            );
            format!(
                "could not set up the reverse replication before the hold ({e}){}; the reverse slot is made during the pause instead",
                cleaned
                    .err()
                    .map(|e| format!(" nor take it back ({e})"))
                    .unwrap_or_default()
            )
        }
    };
    let detail = if run.lanes.len() > 1 {
        format!("{}{detail}", run.lanes[i].prefix())
    } else {
        detail
    };
    // Journaled only when made: a successor enables the disabled subscription only if this
    // attempt made it (see `start_reverse`); otherwise it is said, not journaled.
    if run.lanes[i].reverse_ready {
        let _ = run.rec.log(
            t,
            Entry {
                step: Step::ReverseReady,
                database: Some(database),
                detail,
                ..Entry::default()
            },
        );
    } else {
        run.rec.say(format!("reverse   {detail}"));
    }
}

/// What the report and journal add when the reverse slot is a failover slot.
fn failover_suffix(lane: &super::lane::Lane) -> String {
    lane.reverse_failover
        .as_ref()
        .map(|f| format!("; {f}"))
        .unwrap_or_default()
}

/// The target's standbys decide whether the reverse slot is a failover slot (17+ with a
/// standby streaming from a physical slot); what to say about it when it is.
async fn reverse_slot_failover(run: &Run) -> Result<Option<String>, CutoverError> {
    let standbys = run
        .query(
            Phase::Reverse,
            Role::Target,
            "looking for the target's standbys",
            failover::standbys(&run.to_db),
        )
        .await?;
    Ok(standbys.failover_slots().then(|| {
        format!(
            "a failover slot (the target has standby slot(s) {}): a failover of the target to a standby with sync_replication_slots = on keeps the rollback path, once the target's synchronized_standby_slots names {}",
            standbys.slots.join(", "),
            standbys.setting()
        )
    }))
}

/// Fresh every time: a reverse replication left by an earlier attempt may be stale (its
/// publication missing tables added since, its slot invalidated), so it is replaced.
///
/// The subscription is made **disabled**. Enabled now, anything written directly on the
/// target would reach the source and then come back to the target over the forward
/// subscription (which the user made with `origin = any`): a unique violation that stalls the
/// forward apply, or duplicate rows. It is enabled after the flip ([`start_reverse`]), once the
/// forward subscription is off. Until then the slot keeps every target change; `origin = none`
/// then skips the ones that came from the source.
async fn make_reverse_early(run: &Run, lane: &Lane) -> Result<Option<String>, CutoverError> {
    drop_reverse_subscription(&lane.from_db, run.qt)
        .await
        .map_err(|e| CutoverError::abort(Phase::Reverse, e.to_string()))?;
    run.query(
        Phase::Reverse,
        Role::Target,
        "dropping an earlier reverse slot",
        lane.to_db.execute(DROP_IDLE_SLOT, &[&lane.reverse_slot]),
    )
    .await?;
    let failover = create_reverse_slot(run, lane).await?;
    let sql = format!(
        "CREATE SUBSCRIPTION {REVERSE} CONNECTION {} PUBLICATION {REVERSE} \
         WITH (create_slot = false, slot_name = {}, copy_data = false, enabled = false, origin = none)",
        quote_literal(&reverse_conninfo(&run.ctl, &lane.database)),
        quote_literal(&lane.reverse_slot)
    );
    run.query(
        Phase::Reverse,
        Role::Source,
        "creating the reverse subscription (disabled)",
        lane.from_db.batch_execute(&sql),
    )
    .await?;
    Ok(failover)
}

/// Drops the reverse subscription on the source if there is one, keeping its slot (on the
/// target) for the caller to drop: the slot outlives a subscription whose `slot_name` is NONE.
async fn drop_reverse_subscription(source: &Client, qt: Duration) -> Result<(), PgError> {
    let exists: i64 = timed(
        Role::Source,
        "checking the reverse subscription",
        qt,
        source.query_one(SUB_EXISTS, &[&REVERSE]),
    )
    .await?
    .get(0);
    if exists == 0 {
        return Ok(());
    }
    timed(
        Role::Source,
        "dropping the reverse subscription",
        qt,
        source.batch_execute(&format!(
            "ALTER SUBSCRIPTION {REVERSE} DISABLE; ALTER SUBSCRIPTION {REVERSE} SET (slot_name = NONE); DROP SUBSCRIPTION {REVERSE}"
        )),
    )
    .await
}

/// Makes this database's reverse publication and slot on the target; returns what the report
/// says if the slot is a failover slot.
async fn create_reverse_slot(run: &Run, lane: &Lane) -> Result<Option<String>, CutoverError> {
    // The reverse publication carries exactly what the forward one carried: publishing more
    // (FOR ALL TABLES) would make UPDATE and DELETE fail on the new primary for every table
    // without a replica identity that the forward publication never included.
    let sub = lane.subscription.clone().unwrap_or_default();
    let pubs: Vec<String> = run
        .query(
            Phase::Reverse,
            Role::Target,
            "reading the forward publications",
            lane.to_db.query_one(SUB_PUBLICATIONS, &[&sub]),
        )
        .await?
        .get(0);
    let all: Option<bool> = run
        .query(
            Phase::Reverse,
            Role::Source,
            "reading the forward publications",
            lane.from_db.query_one(PUB_ALL_TABLES, &[&pubs]),
        )
        .await?
        .get(0);
    // FOR ALL TABLES is for superusers only: a managed service's role lists the tables.
    let superuser = super::grants::role(&lane.to_db, Role::Target, run.qt)
        .await
        .map_err(|e| CutoverError::Aborted {
            step: Phase::Reverse,
            source: Box::new(e),
        })?
        .superuser;
    let what = if all == Some(true) && superuser {
        "FOR ALL TABLES".to_owned()
    } else {
        let tables: Vec<String> = run
            .query(
                Phase::Reverse,
                Role::Source,
                "listing the forward publications' tables",
                lane.from_db.query(PUB_TABLES, &[&pubs]),
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if tables.is_empty() {
            return Err(CutoverError::abort(
                Phase::Reverse,
                format!(
                    "{}the forward publication(s) {pubs:?} publish no table",
                    lane.prefix()
                ),
            ));
        }
        // Names come back from format('%I.%I'): already quoted identifiers.
        format!("FOR TABLE {}", tables.join(", "))
    };
    run.query(
        Phase::Reverse,
        Role::Target,
        "creating the reverse publication",
        lane.to_db.batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {REVERSE}; CREATE PUBLICATION {REVERSE} {what}"
        )),
    )
    .await?;
    // A slot left by an earlier, interrupted attempt starts at the wrong point.
    run.query(
        Phase::Reverse,
        Role::Target,
        "dropping a stale reverse slot",
        lane.to_db.execute(DROP_IDLE_SLOT, &[&lane.reverse_slot]),
    )
    .await?;
    // The target is the primary after the cutover: with a standby (17+), the rollback path
    // must survive its failover too.
    let failover = reverse_slot_failover(run).await?;
    // Its own statement: a slot cannot be created in a transaction that wrote.
    run.query(
        Phase::Reverse,
        Role::Target,
        "creating the reverse slot",
        lane.to_db.execute(
            failover::create_slot_sql(failover.is_some()),
            &[&lane.reverse_slot],
        ),
    )
    .await?;
    Ok(failover)
}

/// Physical: promote the standby. `pg_promote` is asked not to wait, so no query timeout can
/// abort the cutover while the promotion goes on; then the controller waits for it to end.
async fn promote(run: &mut Run) -> Result<(), CutoverError> {
    run.ctl.set_phase(Phase::Promote);
    let t = Instant::now();
    run.query(
        Phase::Promote,
        Role::Target,
        "asking for promotion",
        run.to_db.query_one("SELECT pg_promote(false)", &[]),
    )
    .await?;
    // The point of no return for the target: from here, wait for it rather than undo (an
    // undo would leave the old primary and a promoted standby both writable).
    run.deadline = run.deadline.max(Instant::now() + PROMOTION_WAIT);
    await_promotion(run).await?;
    run.report.reverse_replication =
        "none: physical replication; the old primary must be rebuilt as a standby to roll back"
            .into();
    let detail = run.report.reverse_replication.clone();
    run.rec.step(Step::Reverse, t, detail)
}

/// Waits until the target has left recovery, within the cutover's deadline.
async fn await_promotion(run: &Run) -> Result<(), CutoverError> {
    // Every 10 ms: a promotion usually ends well within a second, and the cutover waits
    // on it.
    let promoted = crate::poll::until(run.deadline, Duration::from_millis(10), || async {
        let in_recovery: bool = run
            .query(
                Phase::Promote,
                Role::Target,
                "waiting for the promotion",
                run.to_db.query_one(IN_RECOVERY, &[]),
            )
            .await?
            .get(0);
        Ok::<_, CutoverError>((!in_recovery).then_some(()))
    })
    .await?;
    if promoted.is_none() {
        return Err(CutoverError::abort(
            Phase::Promote,
            "the target was asked to promote but is still in recovery; check it before retrying",
        ));
    }
    Ok(())
}

/// After the flip: start the reverse subscription (forward cutover), or retire the reverse
/// replication and restart the forward one (rollback). Failures are reported, never undone.
pub async fn after_flip(run: &mut Run) {
    if !run.logical || !run.barrier {
        return;
    }
    let ctl = run.ctl.clone();
    let mut said = Vec::new();
    for i in 0..run.lanes.len() {
        let t = Instant::now();
        let lane = &run.lanes[i];
        let result = if run.to == Role::Target {
            if !lane.reverse_slot_made {
                continue;
            }
            // Made before the hold, it is disabled until now (live, a row written on the
            // target would travel back over the forward subscription): `start_reverse`
            // switches it on. Otherwise it is created here, over the slot made in the pause.
            let way_back = ReverseTarget {
                database: &lane.database,
                slot: &lane.reverse_slot,
            };
            match start_reverse(
                &ctl,
                &lane.from_db,
                &lane.to_db,
                run.qt,
                lane.reverse_ready,
                &way_back,
            )
            .await
            {
                Ok(ReverseStart::Running) if lane.reverse_ready => Ok(format!(
                    "subscription {REVERSE} on the source, made before the hold (origin = none): rollback is lossless{}; enabled after the flip",
                    failover_suffix(lane)
                )),
                started => started.map(|s| s.to_string()),
            }
        } else {
            let point = lane.rollback_point;
            let forward = ctl.forward_subscription_for(&lane.database);
            // The reverse subscription's own slot, as the catalog named it at preflight.
            let way_back = ReverseTarget {
                database: &lane.database,
                slot: lane.slot.as_deref().unwrap_or(&lane.reverse_slot),
            };
            restart_forward(
                &lane.to_db,
                &lane.from_db,
                point,
                run.qt,
                forward,
                &way_back,
            )
            .await
        };
        let detail = match result {
            Ok(s) => s,
            Err(e) => format!("FAILED: {e}"),
        };
        let database = lane.database.clone();
        said.push(detail.clone());
        run.rec.note(
            t,
            Entry {
                step: Step::ReverseSubscription,
                database: Some(database),
                detail,
                ..Entry::default()
            },
        );
    }
    if !said.is_empty() {
        run.report.reverse_replication = summary(&run.lanes, &said);
    }
}

/// Which database's reverse replication a step works on, and its slot on the target.
pub struct ReverseTarget<'a> {
    pub database: &'a str,
    pub slot: &'a str,
}

/// What [`start_reverse`] left behind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReverseStart {
    /// The reverse subscription is enabled: rollback is lossless.
    Running,
    /// No reverse slot on the target, so nothing to subscribe to.
    NoSlot,
    /// It could not be started; `slot` says what is left and how to finish by hand.
    Failed { error: String, slot: String },
}

impl std::fmt::Display for ReverseStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Running => write!(
                f,
                "subscription {REVERSE} on the source: rollback is lossless"
            ),
            Self::NoSlot => write!(
                f,
                "no reverse slot {REVERSE} on the target: rollback will need --force"
            ),
            Self::Failed { error, slot } => write!(
                f,
                "FAILED to start the reverse subscription ({error}); {slot}; until then `flip --to source` refuses (or loses the target's writes with --force)"
            ),
        }
    }
}

/// Starts the reverse subscription on the source: enables the one made disabled before the
/// hold ([`make_reverse_early`]), or creates it over the slot made during the pause. If it
/// cannot, after a few tries, the slot is kept (it retains WAL) and the report says how to
/// finish by hand or give rollback up (`redirect finish`).
pub async fn start_reverse(
    ctl: &super::Controller,
    source: &Client,
    target: &Client,
    qt: Duration,
    made_before_hold: bool,
    way_back: &ReverseTarget<'_>,
) -> Result<ReverseStart, PgError> {
    let conninfo = reverse_conninfo(ctl, way_back.database);
    let slot_name = way_back.slot;
    // On 16+ always `origin = none`: the reverse slot may hold changes the forward
    // subscription applied (made before the hold), which must not go back to the source.
    let both_16 = both_at_least(source, target, ORIGIN_NONE_SINCE, qt).await?;
    let sql = format!(
        "CREATE SUBSCRIPTION {REVERSE} CONNECTION {} PUBLICATION {REVERSE} \
         WITH (create_slot = false, slot_name = {}, copy_data = false, enabled = true{})",
        quote_literal(&conninfo),
        quote_literal(slot_name),
        if both_16 { ", origin = none" } else { "" }
    );
    let slot: i64 = timed(
        Role::Target,
        "finding the reverse slot",
        qt,
        target.query_one(SLOT_EXISTS, &[&slot_name]),
    )
    .await?
    .get(0);
    if slot == 0 {
        return Ok(ReverseStart::NoSlot);
    }
    // 3 tries, 500 ms apart: the source may be restarting or briefly unreachable, and any
    // error is worth another try (each try starts over from what the source holds).
    let started = crate::poll::retry_times(
        3,
        Duration::from_millis(500),
        |_| true,
        || subscribe_back(source, qt, made_before_hold, &sql),
    )
    .await;
    let last = match started {
        Ok(()) => return Ok(ReverseStart::Running),
        Err(e) => e.to_string(),
    };
    // The slot is kept: dropped, it would end lossless rollback for good over what may be a
    // short outage of the source. It retains WAL on the target meanwhile, so say how to
    // finish by hand, or give it up.
    let slot = format!(
        "slot {slot_name} KEPT on the target (it retains WAL until used): in database {} on the source run `ALTER SUBSCRIPTION {REVERSE} ENABLE` if it exists, else `CREATE SUBSCRIPTION {REVERSE} CONNECTION '<target conninfo>' PUBLICATION {REVERSE} WITH (create_slot = false, slot_name = '{slot_name}', copy_data = false{})`; to give rollback up instead, `redirect finish`",
        way_back.database,
        if sql.contains("origin = none") {
            ", origin = none"
        } else {
            ""
        }
    );
    Ok(ReverseStart::Failed { error: last, slot })
}

/// Whether both servers run `version` (`server_version_num`) or later.
async fn both_at_least(
    source: &Client,
    target: &Client,
    version: i32,
    qt: Duration,
) -> Result<bool, PgError> {
    Ok(timed(
        Role::Source,
        "reading the versions",
        qt,
        source.query_one(VERSION_NUM, &[]),
    )
    .await?
    .get::<_, i32>(0)
        >= version
        && timed(
            Role::Target,
            "reading the versions",
            qt,
            target.query_one(VERSION_NUM, &[]),
        )
        .await?
        .get::<_, i32>(0)
            >= version)
}

/// One try at the reverse subscription on the source: enabled already, switched on (made
/// disabled before the hold by this cutover), or created by `create` (replacing a stale one).
async fn subscribe_back(
    source: &Client,
    qt: Duration,
    made_before_hold: bool,
    create: &str,
) -> Result<(), PgError> {
    // A subscription left by an earlier cutover (possibly disabled) is replaced.
    let enabled: Option<bool> = timed(
        Role::Source,
        "checking the reverse subscription",
        qt,
        source.query_opt(SUB_ENABLED, &[&REVERSE]),
    )
    .await?
    .map(|r| r.get(0));
    let ours: bool = made_before_hold
        && timed(
            Role::Source,
            "checking the reverse subscription",
            qt,
            source.query_opt(REVERSE_SUB_EARLY, &[&REVERSE]),
        )
        .await?
        .is_some_and(|r| r.get(0));
    match enabled {
        Some(true) => return Ok(()),
        // Made disabled before the hold ([`make_reverse_early`]): its slot holds every
        // target write since, so it is only switched on.
        // Only the one this attempt made: a disabled one left by an aborted attempt
        // lacks the tables added since (its apply would skip their changes).
        Some(false) if ours && made_before_hold => {
            return timed(
                Role::Source,
                "enabling the reverse subscription",
                qt,
                source.batch_execute(&format!("ALTER SUBSCRIPTION {REVERSE} ENABLE")),
            )
            .await;
        }
        Some(false) => {
            timed(Role::Source, "dropping a stale reverse subscription", qt, source.batch_execute(&format!(
                "ALTER SUBSCRIPTION {REVERSE} SET (slot_name = NONE); DROP SUBSCRIPTION {REVERSE}"
            )))
            .await?;
        }
        None => {}
    }
    timed(
        Role::Source,
        "creating the reverse subscription",
        qt,
        source.batch_execute(create),
    )
    .await
}

/// How the source reaches the target, as `CREATE SUBSCRIPTION` takes it: `--reverse-conninfo`,
/// else the target DSN's, with the target's password from the controller's own secrets
/// (`--target-password-file`, `REDIRECT_TARGET_PASSWORD`, its pgpass) when it is for the same
/// user. A managed service requires it (`password_required`: a non-superuser's subscription
/// must authenticate with a password) and gives no access to its server's `~/.pgpass`.
///
/// It holds a secret: it goes into SQL only, never into a message, a log or the journal
/// (the server keeps it in `pg_subscription.subconninfo`, readable by superusers only).
#[must_use]
pub fn reverse_conninfo(ctl: &super::Controller, database: &str) -> String {
    let Ok(target) = ctl.dsn(Role::Target) else {
        return String::new();
    };
    let base = ctl
        .db
        .as_ref()
        .and_then(|d| d.reverse_conninfo.clone())
        .unwrap_or_else(|| target.conninfo());
    // Each database's reverse subscription reads that database on the target.
    let mut base = super::lane::conninfo_for(&base, database);
    // Without a user, the source server's libpq would log in as its own OS user: name the
    // target DSN's, the one whose password the controller holds.
    if crate::pg::conninfo_value(&base, "user").is_none()
        && let Some(user) = target.config.get_user()
    {
        base = format!("{base} user={}", crate::pg::quote_conninfo(user));
    }
    let same_user = crate::pg::conninfo_value(&base, "user").as_deref() == target.config.get_user();
    match target.config.get_password() {
        Some(pw) if same_user => format!(
            "{base} password={}",
            crate::pg::quote_conninfo(&String::from_utf8_lossy(pw))
        ),
        _ => base,
    }
}

/// Rollback, after the flip: retire the reverse replication and restart the forward
/// subscription from `point` (none: where its slot stands), so a later cutover can run again.
pub async fn restart_forward(
    source: &Client,
    target: &Client,
    point: Option<Lsn>,
    qt: Duration,
    forward: Option<String>,
    way_back: &ReverseTarget<'_>,
) -> Result<String, PgError> {
    let exists: i64 = timed(
        Role::Source,
        "checking the reverse subscription",
        qt,
        source.query_one(SUB_EXISTS, &[&REVERSE]),
    )
    .await?
    .get(0);
    if exists > 0 {
        timed(
            Role::Source,
            "dropping the reverse subscription",
            qt,
            source.batch_execute(&format!(
                "ALTER SUBSCRIPTION {REVERSE} DISABLE; ALTER SUBSCRIPTION {REVERSE} SET (slot_name = NONE); DROP SUBSCRIPTION {REVERSE}"
            )),
        )
        .await?;
    }
    timed(
        Role::Target,
        "dropping the reverse slot",
        qt,
        target.execute(DROP_IDLE_SLOT, &[&way_back.slot]),
    )
    .await?;
    let fwd = match forward {
        Some(f) => Some(f),
        None => lone_subscription(target, qt).await?,
    };
    let Some(fwd) = fwd else {
        return Ok("reverse replication retired; the forward subscription is unknown (no --subscription, none journaled, not exactly one on the target): not restarted".into());
    };
    let slot: Option<String> = timed(
        Role::Target,
        "reading the forward subscription",
        qt,
        target.query_opt(SUB_SLOT, &[&fwd]),
    )
    .await?
    .and_then(|r| r.get(0));
    if let Some(slot) = &slot {
        let n: i64 = timed(
            Role::Source,
            "finding the forward slot",
            qt,
            source.query_one(SLOT_EXISTS, &[slot]),
        )
        .await?
        .get(0);
        if n > 0
            && let Some(point) = point
        {
            let point = point.to_string();
            // Only forward: advancing to a point the slot already passed is an error.
            timed(
                Role::Source,
                "advancing the forward slot",
                qt,
                source.execute(
                    "SELECT pg_replication_slot_advance(slot_name, $2::text::pg_lsn) FROM pg_replication_slots \
                     WHERE slot_name = $1 AND confirmed_flush_lsn < $2::text::pg_lsn",
                    &[slot, &point],
                ),
            )
            .await?;
        }
    }
    timed(
        Role::Target,
        "enabling the forward subscription",
        qt,
        target.batch_execute(&format!("ALTER SUBSCRIPTION {} ENABLE", quote_ident(&fwd))),
    )
    .await?;
    Ok(format!(
        "reverse replication retired; forward subscription {fwd} restarted from {}",
        point.map_or_else(|| "where its slot stood".to_owned(), |p| p.to_string())
    ))
}

/// The only subscription on `db`, if there is exactly one.
async fn lone_subscription(db: &Client, qt: Duration) -> Result<Option<String>, PgError> {
    let rows = timed(
        Role::Target,
        "listing subscriptions",
        qt,
        db.query(
            "SELECT subname::text FROM pg_subscription WHERE subname <> $1 \
             AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&REVERSE],
        ),
    )
    .await?;
    Ok(match rows.as_slice() {
        [one] => Some(one.get(0)),
        _ => None,
    })
}
