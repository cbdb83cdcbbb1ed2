//! Which tables to compare, and their columns and primary keys, read from each server's
//! catalog.

use std::{collections::BTreeMap, time::Duration};

use tokio_postgres::Client;

use crate::{
    cutover::BARRIER_TABLE,
    pg::{PgError, Server, quote::quote_ident, timed},
};

/// Every user table (partitioned tables as a whole, not their partitions), with its columns,
/// their types, and its primary key. The project's own barrier table is left out: its rows
/// are per-cutover markers.
const USER_TABLES: &str = "SELECT n.nspname::text, c.relname::text, \
       coalesce((SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a \
                 WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '{}'), \
       coalesce((SELECT array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum) FROM pg_attribute a \
                 WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '{}'), \
       coalesce((SELECT array_agg(a.attname::text ORDER BY k.ord) FROM pg_index i \
                 CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum \
                 WHERE i.indrelid = c.oid AND i.indisprimary), '{}'), \
       coalesce((SELECT array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY k.ord) FROM pg_index i \
                 CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
                 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum \
                 WHERE i.indrelid = c.oid AND i.indisprimary), '{}'), \
       greatest(c.reltuples, 0)::int8 \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
       AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
       AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' \
       AND format('%s.%s', n.nspname, c.relname) <> $1 \
     ORDER BY 1, 2";

/// A table's shape on one server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    pub schema: String,
    pub name: String,
    /// `(name, type)` of every column, in order: rows are compared as whole-row text, so
    /// this must match between the servers.
    pub columns: Vec<(String, String)>,
    /// `(name, type)` of the primary key's columns, in key order; empty without one.
    pub key: Vec<(String, String)>,
    /// The planner's row estimate, for progress (`~n chunks`).
    pub estimated_rows: u64,
}

impl Table {
    /// `schema.table` as people write it.
    #[must_use]
    pub fn display(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// `"schema"."table"` for SQL.
    #[must_use]
    pub fn sql_name(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    #[must_use]
    pub fn key_names(&self) -> Vec<String> {
        self.key.iter().map(|(n, _)| n.clone()).collect()
    }
}

/// Reads every user table of one server, by `schema.table`.
pub async fn list(
    which: impl Into<Server>,
    db: &Client,
    timeout: Duration,
) -> Result<BTreeMap<String, Table>, PgError> {
    let which: Server = which.into();
    let rows = timed(
        which,
        "listing tables",
        timeout,
        db.query(USER_TABLES, &[&BARRIER_TABLE]),
    )
    .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let pairs = |names: Vec<String>, types: Vec<String>| -> Vec<(String, String)> {
                names.into_iter().zip(types).collect()
            };
            let t = Table {
                schema: r.get(0),
                name: r.get(1),
                columns: pairs(r.get(2), r.get(3)),
                key: pairs(r.get(4), r.get(5)),
                estimated_rows: u64::try_from(r.get::<_, i64>(6)).unwrap_or(0),
            };
            (t.display(), t)
        })
        .collect())
}

/// The tables to compare: all of the source's and the target's, or only those `wanted`
/// (`schema.table`, or `table` for `public.table`). A wanted table on neither server is an
/// error that lists what there is.
pub fn select(
    source: &BTreeMap<String, Table>,
    target: &BTreeMap<String, Table>,
    wanted: &[String],
) -> Result<Vec<String>, String> {
    let mut all: Vec<String> = source.keys().chain(target.keys()).cloned().collect();
    all.sort();
    all.dedup();
    if wanted.is_empty() {
        return Ok(all);
    }
    let mut chosen = Vec::new();
    for w in wanted {
        let name = if w.contains('.') {
            w.clone()
        } else {
            format!("public.{w}")
        };
        if !all.contains(&name) {
            return Err(format!(
                "--table {w}: no table {name} on either server (tables: {})",
                if all.is_empty() {
                    "none".to_owned()
                } else {
                    all.join(", ")
                }
            ));
        }
        if !chosen.contains(&name) {
            chosen.push(name);
        }
    }
    Ok(chosen)
}

/// Why two shapes of one table cannot be compared row by row, if they cannot.
#[must_use]
pub fn schema_difference(source: &Table, target: &Table) -> Option<String> {
    if source.columns == target.columns {
        return None;
    }
    let show = |t: &Table| {
        t.columns
            .iter()
            .map(|(n, ty)| format!("{n} {ty}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    Some(format!(
        "columns differ: source ({}), target ({})",
        show(source),
        show(target)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str, cols: &[(&str, &str)]) -> Table {
        Table {
            schema: "public".into(),
            name: name.into(),
            columns: cols
                .iter()
                .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
                .collect(),
            key: vec![],
            estimated_rows: 0,
        }
    }

    #[test]
    fn selection_and_schema_checks() {
        let on_source: BTreeMap<_, _> = [table("a", &[]), table("b", &[])]
            .into_iter()
            .map(|t| (t.display(), t))
            .collect();
        let on_target: BTreeMap<_, _> = [table("c", &[])]
            .into_iter()
            .map(|t| (t.display(), t))
            .collect();
        assert_eq!(
            select(&on_source, &on_target, &[]).unwrap(),
            ["public.a", "public.b", "public.c"]
        );
        assert_eq!(
            select(
                &on_source,
                &on_target,
                &["b".into(), "public.c".into(), "b".into()]
            )
            .unwrap(),
            ["public.b", "public.c"]
        );
        let err = select(&on_source, &on_target, &["x.y".into()]).unwrap_err();
        assert!(
            err.contains("no table x.y") && err.contains("public.a"),
            "{err}"
        );
        let wide = table("a", &[("id", "integer"), ("v", "text")]);
        assert_eq!(schema_difference(&wide, &wide.clone()), None);
        let narrow = table("a", &[("id", "integer")]);
        assert_eq!(
            schema_difference(&wide, &narrow).unwrap(),
            "columns differ: source (id integer, v text), target (id integer)"
        );
    }
}
