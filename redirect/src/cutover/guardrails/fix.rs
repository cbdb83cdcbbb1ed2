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
    cutover::{Controller, CutoverError},
    datapath::Role,
    pg::timed,
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

/// What `fix replica-identity` did or would do.
#[derive(Clone, Debug, Serialize)]
pub struct FixReport {
    /// The statement, with the table and index as the servers name them.
    pub sql: String,
    /// Where it runs, in order.
    pub servers: Vec<Role>,
    /// Each server's replica identity before, as SQL that would put it back.
    pub before: Vec<(Role, String)>,
    pub applied: bool,
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
        role.name(),
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
    if kind != "r" && kind != "p" {
        return Ok(Err(vec![format!(
            "{name} on the {role} is not a table (relkind {kind})"
        )]));
    }
    let mut problems = Vec::new();
    let mut set = format!("ALTER TABLE {name} REPLICA IDENTITY FULL");
    if let Identity::Index(index) = identity {
        let candidates: String = timed(
            role.name(),
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
            role.name(),
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
    let db = ctl.db.as_ref().ok_or(CutoverError::NoDatabases)?;
    let qt = db.query_timeout;
    // Not while a cutover runs: it reads the identities it relies on.
    let _busy = if apply {
        Some(
            ctl.busy
                .try_lock()
                .map_err(|_| CutoverError::Busy(ctl.phase()))?,
        )
    } else {
        None
    };
    let mut checked = Vec::new();
    let mut problems = Vec::new();
    for role in [Role::Source, Role::Target] {
        let client = ctl.dsn(role)?.connect().await?;
        let bound = format!(
            "SET statement_timeout = {ms}; SET lock_timeout = {ms}",
            ms = qt.as_millis().max(1)
        );
        timed(
            role.name(),
            "bounding statements",
            qt,
            client.batch_execute(&bound),
        )
        .await?;
        match validate(role, client, table, identity, qt).await? {
            Ok(c) => checked.push(c),
            Err(p) => problems.extend(p),
        }
    }
    if !problems.is_empty() {
        return Err(CutoverError::Refused(format!(
            "nothing was changed: {}",
            problems.join("; ")
        )));
    }
    let sql = checked[0].set.clone();
    let mut report = FixReport {
        sql: sql.clone(),
        servers: checked.iter().map(|c| c.role).collect(),
        before: checked.iter().map(|c| (c.role, c.before.clone())).collect(),
        applied: false,
    };
    if !apply {
        return Ok(report);
    }
    let mut done: Vec<&Checked> = Vec::new();
    for c in &checked {
        let sql = &c.set;
        if let Err(e) = timed(
            c.role.name(),
            "setting the replica identity",
            qt,
            c.db.batch_execute(sql),
        )
        .await
        {
            let mut undone = Vec::new();
            for d in &done {
                let back = timed(
                    d.role.name(),
                    "putting the replica identity back",
                    qt,
                    d.db.batch_execute(&d.before),
                )
                .await;
                undone.push(match back {
                    Ok(()) => format!("the {} was put back ({})", d.role, d.before),
                    Err(b) => format!(
                        "the {} could NOT be put back ({b}): run {} there",
                        d.role, d.before
                    ),
                });
            }
            return Err(CutoverError::Refused(format!(
                "the {} refused {sql}: {e}; {}",
                c.role,
                if undone.is_empty() {
                    "nothing was changed".to_owned()
                } else {
                    undone.join("; ")
                }
            )));
        }
        done.push(c);
    }
    report.applied = true;
    Ok(report)
}
