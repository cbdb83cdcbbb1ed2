//! The checks of one database (a lane): its subscription and slot, sequences, guardrails,
//! barrier, way back and grants.

use std::time::Duration;

use crate::cutover::catalog::{SUB_PUBLICATIONS, SUB_SLOT};
use crate::cutover::{
    BARRIER_TABLE, Controller, CutoverError, FlipRequest, grants, guardrails, lane::Lane,
};
use crate::{datapath::Role, pg::timed};

use super::rehearsal::{PUBLICATION_HAS_BARRIER, SUBSCRIPTION_HAS_BARRIER};
use super::reverse::probe_reverse;
use crate::pg::Server;

/// What preflight found in one database.
#[derive(Default)]
pub(super) struct LaneCheck {
    /// Blocks; `--force` does not pass it.
    pub(super) blocking: Vec<String>,
    /// Blocks unless `--force`.
    pub(super) forcible: Vec<String>,
    pub(super) findings: Vec<String>,
    pub(super) guardrails: Vec<guardrails::Finding>,
    /// What making the barrier replicate here needs (done after the start is journaled).
    pub(super) prepare: Vec<String>,
    pub(super) missing: Vec<grants::Missing>,
    pub(super) sequences: usize,
}

/// Every check of one database: its subscription and slot, its sequences, its guardrails,
/// whether its barrier table replicates, its way back (forward), and its grants.
pub(super) async fn check_lane(
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
        Server::New,
        "reading the subscription",
        qt,
        lane.to_db.query_opt(SUB_SLOT, &[&sub]),
    )
    .await?
    .and_then(|r| r.get::<_, Option<String>>(0));
    let pubs: Vec<String> = timed(
        Server::New,
        "reading the subscription",
        qt,
        lane.to_db.query_opt(SUB_PUBLICATIONS, &[&sub]),
    )
    .await?
    .map(|r| r.get(0))
    .unwrap_or_default();
    let mut settable = Vec::new();
    match crate::cutover::sequences::read(&lane.from_db, qt).await {
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
pub(super) async fn lane_guardrails(
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
pub(super) async fn barrier_replicates(lane: &Lane, pubs: &[String], sub: &str) -> bool {
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
pub(super) async fn lane_grants(
    lane: &Lane,
    (from, to): (Role, Role),
    sub: &str,
    pubs: &[String],
    settable: &[String],
    qt: Duration,
) -> Result<Vec<grants::Missing>, CutoverError> {
    let tables: Vec<String> = if to == Role::Target && !pubs.is_empty() {
        timed(
            Server::Old,
            "listing the published tables",
            qt,
            lane.from_db
                .query(crate::cutover::replication::PUB_TABLES, &[&pubs]),
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
            old: (from, &lane.from_db),
            new: (to, &lane.to_db),
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
