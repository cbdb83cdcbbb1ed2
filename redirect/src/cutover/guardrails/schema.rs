//! The two servers' schemas side by side: published tables' columns, constraints and
//! replica identity; extensions; major versions.
//!
//! There is no DDL log without event triggers, so "DDL since the subscription started" is
//! found as what it leaves behind: a difference between the two servers.

use std::collections::{BTreeMap, BTreeSet};

use super::{Finding, Guardrail, Replication};
use crate::{datapath::Role, pg::PgError};

/// One line per column, constraint and replica identity of each table in $1:
/// `(table, what, definition)`. A generated column's definition says `GENERATED`.
const SHAPE: &str = "WITH t AS (SELECT x AS name, to_regclass(x) AS oid FROM unnest($1::text[]) x) \
     SELECT t.name, 'column ' || quote_ident(a.attname), format_type(a.atttypid, a.atttypmod) \
       || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END \
       || CASE WHEN a.attgenerated <> '' THEN ' GENERATED ALWAYS AS ' || pg_get_expr(d.adbin, d.adrelid) || ' STORED' ELSE '' END \
     FROM t JOIN pg_attribute a ON a.attrelid = t.oid \
     LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum AND a.attgenerated <> '' \
     WHERE a.attnum > 0 AND NOT a.attisdropped \
     UNION ALL \
     SELECT t.name, 'constraint ' || pg_get_constraintdef(co.oid), co.conname::text \
     FROM t JOIN pg_constraint co ON co.conrelid = t.oid WHERE co.contype IN ('p', 'u', 'c', 'x', 'f') \
     UNION ALL \
     SELECT t.name, 'replica identity', CASE c.relreplident WHEN 'f' THEN 'full' WHEN 'n' THEN 'nothing' ELSE \
       coalesce((SELECT CASE WHEN i.indisprimary THEN 'primary key (' ELSE 'index (' END \
         || (SELECT string_agg(quote_ident(a2.attname), ', ' ORDER BY k.ord) \
             FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord) \
             JOIN pg_attribute a2 ON a2.attrelid = c.oid AND a2.attnum = k.attnum) || ')' \
         FROM pg_index i WHERE i.indrelid = c.oid \
         AND CASE c.relreplident WHEN 'i' THEN i.indisreplident ELSE i.indisprimary END LIMIT 1), 'none') END \
     FROM t JOIN pg_class c ON c.oid = t.oid";
const EXTENSIONS: &str = "SELECT extname::text, extversion FROM pg_extension ORDER BY 1";
const MAJOR: &str = "SELECT current_setting('server_version_num')::int4 / 10000";

type Shape = BTreeMap<(String, String), String>;

async fn shape(r: &Replication<'_>, old: bool, tables: &[String]) -> Result<Shape, PgError> {
    let rows = if old {
        r.on_old("reading the published tables' schema", SHAPE, &[&tables])
            .await?
    } else {
        r.on_new("reading the published tables' schema", SHAPE, &[&tables])
            .await?
    };
    Ok(rows
        .iter()
        .map(|row| ((row.get(0), row.get(1)), row.get(2)))
        .collect())
}

/// The differences between two shapes, as `(is about a generated column, description)`.
fn differences(old: &Shape, new: &Shape, old_role: &str, new_role: &str) -> Vec<(bool, String)> {
    let keys: BTreeSet<&(String, String)> = old.keys().chain(new.keys()).collect();
    let mut out = Vec::new();
    for key in keys {
        let (table, what) = key;
        let (o, n) = (old.get(key), new.get(key));
        // A constraint is named by its definition; its name may differ harmlessly.
        let constraint = what.starts_with("constraint ");
        let text = match (o, n) {
            (Some(o), Some(n)) if constraint || o == n => continue,
            (Some(o), Some(n)) => {
                format!("{table} {what}: {o} on the {old_role}, {n} on the {new_role}")
            }
            (Some(o), None) if constraint => {
                format!("{table} {what} ({o}): only on the {old_role}")
            }
            (None, Some(n)) if constraint => {
                format!("{table} {what} ({n}): only on the {new_role}")
            }
            (Some(o), None) => format!("{table} {what} {o}: only on the {old_role}"),
            (None, Some(n)) => format!("{table} {what} {n}: only on the {new_role}"),
            (None, None) => continue,
        };
        let generated = [o, n]
            .iter()
            .flatten()
            .any(|d| d.contains(" GENERATED ALWAYS AS "));
        out.push((generated, text));
    }
    out
}

/// schema-drift and generated-column, for the tables on both servers.
pub async fn drift(r: &Replication<'_>, tables: &[String]) -> Result<Vec<Finding>, PgError> {
    if tables.is_empty() {
        return Ok(Vec::new());
    }
    let old = shape(r, true, tables).await?;
    let new = shape(r, false, tables).await?;
    let (generated, drift): (Vec<_>, Vec<_>) =
        differences(&old, &new, r.old_role.name(), r.new_role.name())
            .into_iter()
            .partition(|(g, _)| *g);
    let mut found = Vec::new();
    if !drift.is_empty() {
        found.push(Finding::blocking(
            Guardrail::SchemaDrift,
            drift.into_iter().map(|(_, d)| d).collect(),
            &format!(
                "the published tables differ between the servers (DDL run on one and not the other since the subscription started: logical replication does not carry DDL): a column missing on the {new}, a type that does not take the {old}'s values, or a constraint only the {new} has stops the subscription with an error; a different replica identity or primary key on the {new} leaves it unable to find the rows an UPDATE or DELETE changes",
                old = r.old_role,
                new = r.new_role
            ),
            &format!(
                "run the same DDL on the {} (ALTER TABLE ...) so both match, then retry; a difference you know is harmless: pass --allow schema-drift",
                r.new_role
            ),
        ));
    }
    if !generated.is_empty() {
        found.push(Finding::blocking(
            Guardrail::GeneratedColumn,
            generated.into_iter().map(|(_, d)| d).collect(),
            &format!(
                "logical replication does not send generated columns: the {} computes them itself. A column generated on the {} but a plain column on the {} stays NULL there; one generated only on the {} makes the apply fail; a different expression gives different values",
                r.new_role, r.old_role, r.new_role, r.new_role
            ),
            &format!(
                "define the column the same way on the {} as on the {} (ALTER TABLE ... DROP COLUMN, ADD COLUMN ... GENERATED ALWAYS AS (...) STORED), then retry",
                r.new_role, r.old_role
            ),
        ));
    }
    Ok(found)
}

/// missing-extension: objects of an extension the new server lacks cannot be created or
/// used there (types, functions, operators its tables and queries need).
pub async fn missing_extensions(r: &Replication<'_>) -> Result<Vec<Finding>, PgError> {
    let list = |rows: Vec<tokio_postgres::Row>| -> BTreeMap<String, String> {
        rows.iter().map(|row| (row.get(0), row.get(1))).collect()
    };
    let old = list(r.on_old("listing extensions", EXTENSIONS, &[]).await?);
    let new = list(r.on_new("listing extensions", EXTENSIONS, &[]).await?);
    let missing: Vec<String> = old
        .iter()
        .filter(|(name, _)| !new.contains_key(*name))
        .map(|(name, v)| format!("{name} {v}"))
        .collect();
    let other_version: Vec<String> = old
        .iter()
        .filter_map(|(name, v)| {
            new.get(name).filter(|nv| *nv != v).map(|nv| {
                format!(
                    "{name} ({v} on the {}, {nv} on the {})",
                    r.old_role, r.new_role
                )
            })
        })
        .collect();
    let mut found = Vec::new();
    if !missing.is_empty() {
        found.push(Finding::blocking(
            Guardrail::MissingExtension,
            missing,
            &format!(
                "extensions on the {} that the {} does not have: their types, functions and operators are missing there, so tables that use them cannot receive rows and queries that use them fail after the cutover",
                r.old_role, r.new_role
            ),
            &format!(
                "install the extension's package on the {} host, then CREATE EXTENSION <name> VERSION '<version>' there; retry",
                r.new_role
            ),
        ));
    }
    if !other_version.is_empty() {
        found.push(Finding::note(
            Guardrail::MissingExtension,
            other_version,
            "the same extension at a different version: its functions may behave differently after the cutover",
            "ALTER EXTENSION <name> UPDATE TO '<version>' on the older side if they must match",
        ));
    }
    Ok(found)
}

/// version-incompatibility: moving to an older major version.
pub async fn versions(r: &Replication<'_>) -> Result<Vec<Finding>, PgError> {
    let major = |rows: Vec<tokio_postgres::Row>| rows.first().map_or(0, |row| row.get::<_, i32>(0));
    let old = major(r.on_old("reading the version", MAJOR, &[]).await?);
    let new = major(r.on_new("reading the version", MAJOR, &[]).await?);
    let objects = vec![format!(
        "PostgreSQL {old} on the {}, {new} on the {}",
        r.old_role, r.new_role
    )];
    Ok(match new.cmp(&old) {
        // A rollback goes back to the server the applications ran on before the cutover: its
        // older major is where they came from, not a risk to block on.
        std::cmp::Ordering::Less if r.new_role == Role::Source => vec![Finding::note(
            Guardrail::VersionIncompatibility,
            objects,
            &format!(
                "a rollback to the older major version the applications ran on before the cutover; anything written since that only {old} accepts fails on the reverse replication, which the lag check then shows"
            ),
            "nothing, if the applications have not started using features of the newer version",
        )],
        std::cmp::Ordering::Less => vec![Finding::blocking(
            Guardrail::VersionIncompatibility,
            objects,
            &format!(
                "the {} runs an older major version: types, functions, syntax and catalog features of {old} that the schema or the applications use may not exist on {new}, and the schema checks above compare only what both have",
                r.new_role
            ),
            "move to the same or a newer major version; if the application was tested against the older one, pass --allow version-incompatibility",
        )],
        std::cmp::Ordering::Greater => vec![Finding::note(
            Guardrail::VersionIncompatibility,
            objects,
            "logical replication works from an older to a newer major version; the checks above compare the schema, but not query plans or behaviour changed by the upgrade (see the release notes)",
            "test the application against the new major version before the cutover",
        )],
        std::cmp::Ordering::Equal => Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(lines: &[(&str, &str, &str)]) -> Shape {
        lines
            .iter()
            .map(|(t, w, d)| (((*t).to_owned(), (*w).to_owned()), (*d).to_owned()))
            .collect()
    }

    #[test]
    fn differences_name_the_table_the_object_and_the_side() {
        let old = shape(&[
            ("public.t", "column id", "bigint NOT NULL"),
            ("public.t", "column note", "text"),
            ("public.t", "constraint PRIMARY KEY (id)", "t_pkey"),
            (
                "public.t",
                "column total",
                "numeric GENERATED ALWAYS AS (a + b) STORED",
            ),
        ]);
        let new = shape(&[
            ("public.t", "column id", "integer NOT NULL"),
            ("public.t", "constraint PRIMARY KEY (id)", "other_name"),
            ("public.t", "column total", "numeric"),
        ]);
        let d = differences(&old, &new, "source", "target");
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(
            d.contains(&(
                false,
                "public.t column id: bigint NOT NULL on the source, integer NOT NULL on the target"
                    .into()
            ))
        );
        assert!(d.contains(&(
            false,
            "public.t column note text: only on the source".into()
        )));
        assert!(d.iter().any(|(g, s)| *g && s.contains("column total")));
    }
}
