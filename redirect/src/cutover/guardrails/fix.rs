//! Mechanical fixes for guardrail findings, printed first and applied only when asked.
//!
//! `fix replica-identity` sets a table's replica identity on both servers: the publisher
//! sends the old row's key by it, the subscriber finds the row by its own, and after a
//! cutover the reverse replication runs the other way. Both servers are validated before
//! either changes; if the second refuses, the first is put back: nothing is half-done.

use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use crate::{
    controller::Controller,
    cutover::{CutoverError, catalog::SUB_PUBLICATIONS, quote_ident},
    datapath::Role,
    pg::{
        lag::{self, Replication},
        timed,
    },
};

/// What identifies a row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Identity {
    /// A unique, non-partial, non-deferrable index on NOT NULL columns.
    Index(String),
    /// The whole old row (works for any table; every UPDATE/DELETE scans on the subscriber
    /// unless it has a usable index).
    Full,
}

/// What a fix did or would do.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct FixReport {
    /// The statements in order, each with the server it runs on (names as the servers
    /// spell them).
    pub steps: Vec<(Role, String)>,
    /// What puts each server back as it was, if needed.
    pub undo: Vec<(Role, String)>,
    pub applied: bool,
    /// What happens next, if anything.
    pub next: Option<String>,
}

/// One statement of a fix, on one server, with what undoes it.
struct Step {
    role: Role,
    db: Client,
    sql: String,
    undo: String,
}

/// Runs `steps` in order; if one fails, undoes those done (newest first) and says so.
async fn run_steps(steps: &[Step], qt: Duration) -> Result<(), CutoverError> {
    for (i, step) in steps.iter().enumerate() {
        let Err(e) = timed(
            step.role,
            "applying the fix",
            qt,
            step.db.batch_execute(&step.sql),
        )
        .await
        else {
            continue;
        };
        let mut undone = Vec::new();
        for d in steps[..i].iter().rev() {
            undone.push(
                match timed(d.role, "undoing the fix", qt, d.db.batch_execute(&d.undo)).await {
                    Ok(()) => format!("the {} was put back ({})", d.role, d.undo),
                    Err(b) => format!(
                        "the {} could NOT be put back ({b}): run {} there",
                        d.role, d.undo
                    ),
                },
            );
        }
        return Err(CutoverError::Refused(format!(
            "the {} refused {}: {e}; {}",
            step.role,
            step.sql,
            if undone.is_empty() {
                "nothing was changed".to_owned()
            } else {
                undone.join("; ")
            }
        )));
    }
    Ok(())
}

/// A session to `role` whose statements and lock waits are bounded by `qt`: a fix must not
/// queue behind a long transaction, holding every other query on the table behind it.
async fn connect(ctl: &Controller, role: Role, qt: Duration) -> Result<Client, CutoverError> {
    let client = ctl.dsn(role)?.connect().await?;
    let bound = format!(
        "SET statement_timeout = {ms}; SET lock_timeout = {ms}",
        ms = qt.as_millis().max(1)
    );
    timed(
        role,
        "bounding statements",
        qt,
        client.batch_execute(&bound),
    )
    .await?;
    Ok(client)
}

/// Holds off cutovers while a fix is applied (they read what it changes).
fn not_during_a_cutover(
    ctl: &Controller,
    apply: bool,
) -> Result<Option<tokio::sync::MutexGuard<'_, ()>>, CutoverError> {
    if !apply {
        return Ok(None);
    }
    ctl.busy
        .try_lock()
        .map(Some)
        .map_err(|_| CutoverError::Busy(ctl.phase()))
}

/// The table as the server names it, its kind, and its replica identity as SQL.
const TABLE: &str = "SELECT format('%I.%I', n.nspname, c.relname), c.relkind::text, \
     CASE c.relreplident WHEN 'd' THEN 'DEFAULT' WHEN 'n' THEN 'NOTHING' WHEN 'f' THEN 'FULL' ELSE \
       coalesce('USING INDEX ' || (SELECT quote_ident(ic.relname) FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
         WHERE i.indrelid = c.oid AND i.indisreplident), 'DEFAULT') END \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)";
/// An index of table $1 named $2, and what makes it usable as a replica identity.
const INDEX: &str = "SELECT quote_ident(ic.relname), i.indisunique, i.indpred IS NULL, i.indexprs IS NULL, \
     i.indimmediate, i.indisvalid, coalesce((SELECT string_agg(quote_ident(a.attname), ', ') \
       FROM unnest(i.indkey::int2[]) k(attnum) JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
       WHERE NOT a.attnotnull), '') \
     FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
     WHERE i.indrelid = to_regclass($1) AND (ic.relname = $2 OR quote_ident(ic.relname) = $2)";
/// The indexes of table $1 that could be its replica identity.
const CANDIDATES: &str = "SELECT coalesce(string_agg(quote_ident(ic.relname), ', ' ORDER BY ic.relname), '') \
     FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid \
     WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL \
     AND i.indimmediate AND i.indisvalid AND NOT EXISTS (SELECT 1 FROM unnest(i.indkey::int2[]) k(attnum) \
       JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum WHERE NOT a.attnotnull)";

/// One server's view of the table, once validated.
struct Checked {
    role: Role,
    db: Client,
    /// The change, with the table and index as this server spells them.
    set: String,
    /// The identity before, as SQL that puts it back.
    before: String,
}

/// Checks that `table` (and the index) can take the identity on one server; the problems
/// found, or what is needed to change it.
async fn validate(
    role: Role,
    db: Client,
    table: &str,
    identity: &Identity,
    qt: Duration,
) -> Result<Result<Checked, Vec<String>>, CutoverError> {
    let Some(row) = timed(
        role,
        "looking up the table",
        qt,
        db.query_opt(TABLE, &[&table]),
    )
    .await?
    else {
        return Ok(Err(vec![format!(
            "the {role} has no table {table:?} (name it as schema.table; quote mixed-case names: '\"MyTable\"')"
        )]));
    };
    let (name, kind, before): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    if kind == "p" {
        // ALTER TABLE ... REPLICA IDENTITY on a partitioned table does not reach its
        // partitions, which are what replication sends: "applied" would be a lie.
        return Ok(Err(vec![format!(
            "{name} on the {role} is partitioned: a replica identity is set per partition (run this for each partition)"
        )]));
    }
    if kind != "r" {
        return Ok(Err(vec![format!(
            "{name} on the {role} is not a table (relkind {kind})"
        )]));
    }
    let mut problems = Vec::new();
    let mut set = format!("ALTER TABLE {name} REPLICA IDENTITY FULL");
    if let Identity::Index(index) = identity {
        let candidates: String = timed(
            role,
            "listing usable indexes",
            qt,
            db.query_one(CANDIDATES, &[&table]),
        )
        .await?
        .get(0);
        let usable = if candidates.is_empty() {
            "it has no usable index: create a unique index on NOT NULL columns first, or use --full"
                .to_owned()
        } else {
            format!("usable indexes: {candidates}")
        };
        match timed(
            role,
            "looking up the index",
            qt,
            db.query_opt(INDEX, &[&table, index]),
        )
        .await?
        {
            None => problems.push(format!(
                "{name} on the {role} has no index {index:?} ({usable})"
            )),
            Some(i) => {
                let idx: String = i.get(0);
                let mut why = Vec::new();
                if !i.get::<_, bool>(1) {
                    why.push("not unique".to_owned());
                }
                if !i.get::<_, bool>(2) {
                    why.push("partial (it has a WHERE)".to_owned());
                }
                if !i.get::<_, bool>(3) {
                    why.push("on an expression".to_owned());
                }
                if !i.get::<_, bool>(4) {
                    why.push("deferrable".to_owned());
                }
                if !i.get::<_, bool>(5) {
                    why.push("not valid (a failed CREATE INDEX CONCURRENTLY?)".to_owned());
                }
                let nullable: String = i.get(6);
                if !nullable.is_empty() {
                    why.push(format!("on nullable column(s) {nullable}"));
                }
                set = format!("ALTER TABLE {name} REPLICA IDENTITY USING INDEX {idx}");
                if !why.is_empty() {
                    problems.push(format!(
                        "index {idx} of {name} on the {role} cannot be a replica identity: {} ({usable})",
                        why.join(", ")
                    ));
                }
            }
        }
    }
    if !problems.is_empty() {
        return Ok(Err(problems));
    }
    Ok(Ok(Checked {
        role,
        db,
        set,
        before: format!("ALTER TABLE {name} REPLICA IDENTITY {before}"),
    }))
}

/// `redirect fix replica-identity`: validates on both servers, then (with `apply`) changes
/// both, or neither.
pub async fn replica_identity(
    ctl: &Arc<Controller>,
    table: &str,
    identity: &Identity,
    apply: bool,
) -> Result<FixReport, CutoverError> {
    let db = ctl.databases()?;
    let qt = db.query_timeout;
    let _busy = not_during_a_cutover(ctl, apply)?;
    let mut steps = Vec::new();
    let mut problems = Vec::new();
    // The subscriber (the server not taking writes) first: with a key there and none yet on
    // the publisher, nothing changes; the other way round, the publisher would start sending
    // UPDATEs/DELETEs keyed by an identity the subscriber lacks, and its apply worker would
    // fail on them and stop replicating every table until the second change lands.
    let publisher = ctl.active()?;
    for role in [publisher.other(), publisher] {
        let client = connect(ctl, role, qt).await?;
        match validate(role, client, table, identity, qt).await? {
            Ok(c) => steps.push(Step {
                role: c.role,
                db: c.db,
                sql: c.set,
                undo: c.before,
            }),
            Err(p) => problems.extend(p),
        }
    }
    if !problems.is_empty() {
        return Err(CutoverError::Refused(format!(
            "nothing was changed: {}",
            problems.join("; ")
        )));
    }
    report(&steps, apply, None, qt).await
}

async fn report(
    steps: &[Step],
    apply: bool,
    next: Option<String>,
    qt: Duration,
) -> Result<FixReport, CutoverError> {
    if apply {
        run_steps(steps, qt).await?;
    }
    Ok(FixReport {
        steps: steps.iter().map(|s| (s.role, s.sql.clone())).collect(),
        undo: steps
            .iter()
            .filter(|s| !s.undo.is_empty())
            .map(|s| (s.role, s.undo.clone()))
            .collect(),
        applied: apply,
        next: next.filter(|_| apply),
    })
}

/// The table on the old server: its name as the server spells it, kind and persistence.
const TABLE_KIND: &str = "SELECT format('%I.%I', n.nspname, c.relname), c.relkind::text, c.relpersistence::text \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)";
/// The publications of $1 that already carry table $2.
const PUBLISHED_BY: &str = "SELECT coalesce(string_agg(DISTINCT pubname::text, ', '), '') FROM pg_publication_tables \
     WHERE pubname = ANY($1) AND format('%I.%I', schemaname, tablename) = $2";
/// Whether table $1 has no usable replica identity while publication $2 publishes UPDATE or
/// DELETE (then publishing it makes those fail on the publisher).
const KEYLESS_UNDER_PUBLICATION: &str = "SELECT coalesce((SELECT pubupdate OR pubdelete FROM pg_publication WHERE pubname = $2), false) \
     AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = to_regclass($1) AND (c.relreplident = 'f' \
       OR (c.relreplident = 'd' AND EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)) \
       OR (c.relreplident = 'i' AND EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident))))";
/// Whether a name is a relation here.
const EXISTS: &str = "SELECT to_regclass($1) IS NOT NULL";

/// `redirect fix publication --add-table`: adds a table to the publication of the
/// replication that feeds the new server, and has the subscription copy it. Both are
/// checked first; if the refresh is refused, the table leaves the publication again.
pub async fn publish_table(
    ctl: &Arc<Controller>,
    table: &str,
    apply: bool,
) -> Result<FixReport, CutoverError> {
    let db = ctl.databases()?;
    let qt = db.query_timeout;
    let _busy = not_during_a_cutover(ctl, apply)?;
    let old = ctl.active()?;
    let new = old.other();
    let watch = ctl.watch_for(new)?;
    if watch.replication != Replication::Logical {
        return Err(CutoverError::Refused(
            "physical replication carries every table: there is no publication to add to".into(),
        ));
    }
    let old_db = connect(ctl, old, qt).await?;
    let new_db = connect(ctl, new, qt).await?;
    let sub = lag::subscription_name(&new_db, &watch, qt).await?;
    let (pubs, publication) = subscribed_publications(new, &new_db, &sub, qt).await?;
    let (name, mut problems) = look_up_table(old, &old_db, table, qt).await?;
    problems.extend(already_published(old, new, &old_db, &pubs, &name, &sub, qt).await?);
    problems.extend(not_ready_on_new(old, new, &new_db, &name, qt).await?);
    problems.extend(keyless(old, &old_db, &name, &publication, qt).await?);
    if !problems.is_empty() {
        return Err(CutoverError::Refused(format!(
            "nothing was changed: {}",
            problems.join("; ")
        )));
    }
    let (publication, sub) = (quote_ident(&publication), quote_ident(&sub));
    let steps = [
        Step {
            role: old,
            db: old_db,
            sql: format!("ALTER PUBLICATION {publication} ADD TABLE {name}"),
            undo: format!("ALTER PUBLICATION {publication} DROP TABLE {name}"),
        },
        Step {
            role: new,
            db: new_db,
            sql: format!("ALTER SUBSCRIPTION {sub} REFRESH PUBLICATION"),
            undo: String::new(),
        },
    ];
    report(
        &steps,
        apply,
        Some(format!(
            "the {new} copies {name} now; `redirect flip --dry-run` shows it under initial-copy until the copy is done"
        )),
        qt,
    )
    .await
}

/// The publications of subscription `sub` on the new server, and the first of them (the one
/// a table is added to).
async fn subscribed_publications(
    new: Role,
    new_db: &Client,
    sub: &str,
    qt: Duration,
) -> Result<(Vec<String>, String), CutoverError> {
    let pubs: Vec<String> = timed(
        new,
        "reading the subscription",
        qt,
        new_db.query_opt(SUB_PUBLICATIONS, &[&sub]),
    )
    .await?
    .map(|r| r.get(0))
    .unwrap_or_default();
    let Some(publication) = pubs.first().cloned() else {
        return Err(CutoverError::Refused(format!(
            "the {new} has no subscription {sub:?} with a publication (name it with run --subscription)"
        )));
    };
    Ok((pubs, publication))
}

/// The table on the old server: its name as the catalog spells it, and what keeps it from
/// being replicated (not a table, unlogged, temporary).
async fn look_up_table(
    old: Role,
    old_db: &Client,
    table: &str,
    qt: Duration,
) -> Result<(String, Vec<String>), CutoverError> {
    let Some(row) = timed(
        old,
        "looking up the table",
        qt,
        old_db.query_opt(TABLE_KIND, &[&table]),
    )
    .await?
    else {
        return Err(CutoverError::Refused(format!(
            "nothing was changed: the {old} has no table {table:?} (name it as schema.table; quote mixed-case names: '\"MyTable\"')"
        )));
    };
    let (name, kind, persistence): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    let mut problems = Vec::new();
    if kind != "r" && kind != "p" {
        problems.push(format!(
            "{name} on the {old} is not a table (relkind {kind})"
        ));
    }
    match persistence.as_str() {
        "u" => problems.push(format!(
            "{name} is unlogged, so it cannot be replicated: ALTER TABLE {name} SET LOGGED on the {old} first"
        )),
        "t" => problems.push(format!("{name} is a temporary table")),
        _ => {}
    }
    Ok((name, problems))
}

/// Whether one of the subscription's publications `pubs` carries the table already.
async fn already_published(
    old: Role,
    new: Role,
    old_db: &Client,
    pubs: &[String],
    name: &str,
    sub: &str,
    qt: Duration,
) -> Result<Option<String>, CutoverError> {
    let by: String = timed(
        old,
        "reading the publications",
        qt,
        old_db.query_one(PUBLISHED_BY, &[&pubs, &name]),
    )
    .await?
    .get(0);
    Ok((!by.is_empty()).then(|| {
        format!(
            "{name} is already published by {by}; if the subscription has not copied it, run ALTER SUBSCRIPTION {} REFRESH PUBLICATION on the {new}",
            quote_ident(sub)
        )
    }))
}

/// Whether the new server is ready for the subscription's copy of the table: it must have
/// the table, empty.
async fn not_ready_on_new(
    old: Role,
    new: Role,
    new_db: &Client,
    name: &str,
    qt: Duration,
) -> Result<Option<String>, CutoverError> {
    let on_new: bool = timed(
        new,
        "looking up the table",
        qt,
        new_db.query_one(EXISTS, &[&name]),
    )
    .await?
    .get(0);
    if !on_new {
        return Ok(Some(format!(
            "the {new} has no table {name}: create it there first with the {old}'s definition (pg_dump --schema-only -t {name} on the {old} | psql on the {new})"
        )));
    }
    // The refresh copies every row: rows already there would be duplicated (no key) or
    // stop the copy on a duplicate key, retried for ever.
    let has_rows: bool = timed(
        new,
        "looking for rows",
        qt,
        new_db.query_one(&format!("SELECT EXISTS (SELECT 1 FROM {name})"), &[]),
    )
    .await?
    .get(0);
    Ok(has_rows.then(|| {
        format!(
            "{name} on the {new} already has rows, and the subscription's initial copy would add the {old}'s on top: empty it there first (TRUNCATE {name}, if nothing on the {new} needs them)"
        )
    }))
}

/// Once published with UPDATE/DELETE, a table with no replica identity fails every UPDATE
/// and DELETE on the server taking the writes: an outage, not a fix.
async fn keyless(
    old: Role,
    old_db: &Client,
    name: &str,
    publication: &str,
    qt: Duration,
) -> Result<Option<String>, CutoverError> {
    let keyless: bool = timed(
        old,
        "reading the replica identity",
        qt,
        old_db.query_one(KEYLESS_UNDER_PUBLICATION, &[&name, &publication]),
    )
    .await?
    .get(0);
    Ok(keyless.then(|| {
        format!(
            "{name} has no replica identity and publication {publication} publishes UPDATE/DELETE: once published, every UPDATE and DELETE on it would fail on the {old}; give it one first (redirect fix replica-identity --table {name} --using-index <index> or --full)"
        )
    }))
}
