//! Tables: which ones replication carries, whether they are copied, and whether their
//! changes can be applied.

use super::{Finding, Guardrail, Replication};
use crate::pg::PgError;

/// User tables that no publication of the subscription carries (a partition counts as
/// published when an ancestor is; `pg_partition_ancestors` is empty for a plain table).
/// Unlogged and temporary tables are the unlogged check's; tables of extensions are the
/// extension's. The published set is read once (the view expands every publication), not
/// once per table: thousands of partitions would otherwise take longer than the timeout.
const UNPUBLISHED: &str = "WITH published AS MATERIALIZED (SELECT to_regclass(format('%I.%I', schemaname, tablename)) AS oid \
       FROM pg_publication_tables WHERE pubname = ANY($1)) \
     SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
     JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind = 'r' AND c.relpersistence = 'p' \
     AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%' \
     AND NOT (n.nspname = 'public' AND c.relname = 'redirect_barrier') \
     AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e') \
     AND NOT EXISTS (SELECT 1 FROM published p \
         WHERE p.oid IN (SELECT c.oid UNION ALL SELECT relid FROM pg_partition_ancestors(c.oid))) \
     ORDER BY 1";
/// Which of the names in $1 do not exist here.
const ABSENT: &str = "SELECT x FROM unnest($1::text[]) x WHERE to_regclass(x) IS NULL ORDER BY 1";
/// Sequences the sequence sync will set (used ones), as `schema.sequence`.
const USED_SEQUENCES: &str = "SELECT format('%I.%I', schemaname, sequencename) FROM pg_sequences \
     WHERE last_value IS NOT NULL ORDER BY 1";
/// Tables of the subscription still in their initial copy (or not yet started).
const NOT_READY: &str = "SELECT format('%I.%I', n.nspname, c.relname) || ' (' || sr.srsubstate::text || ')' \
     FROM pg_subscription_rel sr JOIN pg_subscription s ON s.oid = sr.srsubid \
     JOIN pg_class c ON c.oid = sr.srrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE s.subname = $1 AND sr.srsubstate <> 'r' \
     AND s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database()) ORDER BY 1";
/// Tables the subscription knows (copied or copying).
const SUBSCRIBED: &str = "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_subscription_rel sr \
     JOIN pg_subscription s ON s.oid = sr.srsubid JOIN pg_class c ON c.oid = sr.srrelid \
     JOIN pg_namespace n ON n.oid = c.relnamespace WHERE s.subname = $1 \
     AND s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())";
/// Published tables with no usable replica identity, with the updates and deletes the
/// statistics have seen on them.
const NO_IDENTITY: &str = "SELECT format('%I.%I', n.nspname, c.relname), coalesce(s.n_tup_upd + s.n_tup_del, 0)::int8 \
     FROM unnest($1::text[]) x JOIN pg_class c ON c.oid = to_regclass(x) \
     JOIN pg_namespace n ON n.oid = c.relnamespace LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid \
     WHERE c.relkind = 'r' AND (c.relreplident = 'n' \
       OR (c.relreplident = 'd' AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)) \
       OR (c.relreplident = 'i' AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident))) \
     ORDER BY 1";
/// Whether any of the publications publishes UPDATE or DELETE.
const PUBLISHES_CHANGES: &str = "SELECT coalesce(bool_or(pubupdate OR pubdelete), false) FROM pg_publication WHERE pubname = ANY($1)";
/// Publications that leave out an operation.
const PARTIAL_OPERATIONS: &str = "SELECT format('publication %I (does not publish %s)', pubname, \
     concat_ws(', ', CASE WHEN NOT pubinsert THEN 'INSERT' END, CASE WHEN NOT pubupdate THEN 'UPDATE' END, \
     CASE WHEN NOT pubdelete THEN 'DELETE' END, CASE WHEN NOT pubtruncate THEN 'TRUNCATE' END)) \
     FROM pg_publication WHERE pubname = ANY($1) AND NOT (pubinsert AND pubupdate AND pubdelete AND pubtruncate) ORDER BY 1";
/// Published tables with a row filter or a column list (`PostgreSQL` 15 and later).
const FILTERED_TABLES: &str = "SELECT format('%I.%I', pt.schemaname, pt.tablename) || ' in ' || quote_ident(pt.pubname) || ' (' || \
     concat_ws('; ', CASE WHEN pt.rowfilter IS NOT NULL THEN 'rows WHERE ' || pt.rowfilter END, \
       CASE WHEN EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = format('%I.%I', pt.schemaname, pt.tablename)::regclass \
         AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' AND NOT (a.attname = ANY (pt.attnames))) \
       THEN 'columns ' || array_to_string(pt.attnames, ', ') || ' only' END) || ')' \
     FROM pg_publication_tables pt WHERE pt.pubname = ANY($1) AND (pt.rowfilter IS NOT NULL \
       OR EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = format('%I.%I', pt.schemaname, pt.tablename)::regclass \
         AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' AND NOT (a.attname = ANY (pt.attnames)))) \
     ORDER BY 1";
const SERVER_VERSION: &str = "SELECT current_setting('server_version_num')::int4";
/// Unlogged user tables.
const UNLOGGED: &str = "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
     JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relpersistence = 'u' AND c.relkind IN ('r', 'p') \
     AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e') \
     ORDER BY 1";

fn names(rows: &[tokio_postgres::Row]) -> Vec<String> {
    rows.iter().map(|r| r.get(0)).collect()
}

/// unpublished-table: its writes never reach the new server.
pub async fn unpublished_tables(r: &Replication<'_>) -> Result<Vec<Finding>, PgError> {
    let tables = names(
        &r.on_old(
            "listing unpublished tables",
            UNPUBLISHED,
            &[&r.publications],
        )
        .await?,
    );
    Ok((!tables.is_empty())
        .then(|| {
            Finding::blocking(
                Guardrail::UnpublishedTable,
                tables,
                &format!(
                    "no publication of subscription {:?} ({}) carries these tables: their rows (and every write until the cutover) are not on the {}",
                    r.subscription,
                    r.publications.join(", "),
                    r.new_role
                ),
                &format!(
                    "on the {}: ALTER PUBLICATION {} ADD TABLE <table>; then on the {}: ALTER SUBSCRIPTION {} REFRESH PUBLICATION (it copies them); wait until they are copied, then retry",
                    r.old_role,
                    r.publications.first().map_or("<publication>", String::as_str),
                    r.new_role,
                    r.subscription
                ),
            )
        })
        .into_iter()
        .collect())
}

/// The published tables that do not exist on the new server.
pub async fn missing_on_new(
    r: &Replication<'_>,
    published: &[String],
) -> Result<Vec<String>, PgError> {
    Ok(names(
        &r.on_new("looking for the published tables", ABSENT, &[&published])
            .await?,
    ))
}

/// missing-on-target: published tables missing on the new server (the subscription cannot
/// copy or apply them), and used sequences missing there (the sequence sync would fail
/// behind the write fence, and the cutover roll back).
pub async fn missing_finding(
    r: &Replication<'_>,
    tables: Vec<String>,
) -> Result<Vec<Finding>, PgError> {
    let sequences = names(&r.on_old("listing sequences", USED_SEQUENCES, &[]).await?);
    let absent_sequences = names(
        &r.on_new("looking for the sequences", ABSENT, &[&sequences])
            .await?,
    );
    let mut objects: Vec<String> = tables.iter().map(|t| format!("table {t}")).collect();
    objects.extend(absent_sequences.iter().map(|s| format!("sequence {s}")));
    Ok((!objects.is_empty())
        .then(|| {
            Finding::blocking(
                Guardrail::MissingOnTarget,
                objects,
                &format!(
                    "these exist on the {} but not on the {}: a missing table's rows cannot be copied or applied (the subscription stops with an error), and a missing sequence makes the sequence sync fail behind the write fence (the cutover rolls back)",
                    r.old_role, r.new_role
                ),
                &format!(
                    "create them on the {} with the {}'s definition (pg_dump --schema-only -t <name> on the {} | psql on the {}), then ALTER SUBSCRIPTION {} REFRESH PUBLICATION there",
                    r.new_role, r.old_role, r.old_role, r.new_role, r.subscription
                ),
            )
        })
        .into_iter()
        .collect())
}

/// initial-copy: tables still copying, or published but never copied.
pub async fn initial_copy(
    r: &Replication<'_>,
    on_both: &[String],
) -> Result<Vec<Finding>, PgError> {
    let mut objects = names(
        &r.on_new("checking table sync states", NOT_READY, &[&r.subscription])
            .await?,
    );
    let subscribed = names(
        &r.on_new("listing subscribed tables", SUBSCRIBED, &[&r.subscription])
            .await?,
    );
    objects.extend(
        on_both
            .iter()
            .filter(|t| !subscribed.contains(t))
            .map(|t| format!("{t} (never copied: not in the subscription)")),
    );
    Ok((!objects.is_empty())
        .then(|| {
            Finding::blocking(
                Guardrail::InitialCopy,
                objects,
                &format!(
                    "subscription {:?} is still copying (or has not started copying) these tables: their rows are not all on the {} yet, whatever the lag says",
                    r.subscription, r.new_role
                ),
                &format!(
                    "a table never copied: ALTER SUBSCRIPTION {} REFRESH PUBLICATION on the {}; then wait until pg_subscription_rel shows every table 'r' (a copy that keeps failing is in the {}'s log)",
                    r.subscription, r.new_role, r.new_role
                ),
            )
        })
        .into_iter()
        .collect())
}

/// no-replica-identity: UPDATE and DELETE cannot be replicated without one.
pub async fn no_replica_identity(
    r: &Replication<'_>,
    published: &[String],
) -> Result<Vec<Finding>, PgError> {
    let rows = r
        .on_old("checking replica identities", NO_IDENTITY, &[&published])
        .await?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let publishes_changes: bool = r
        .on_old(
            "reading the publications",
            PUBLISHES_CHANGES,
            &[&r.publications],
        )
        .await?
        .first()
        .is_some_and(|row| row.get(0));
    let changed = rows.iter().any(|row| row.get::<_, i64>(1) > 0);
    let objects = rows
        .iter()
        .map(|row| {
            let (t, n): (String, i64) = (row.get(0), row.get(1));
            if n > 0 {
                format!("{t} ({n} UPDATE/DELETE row(s) seen since statistics were reset)")
            } else {
                t
            }
        })
        .collect();
    let why = "logical replication finds the row an UPDATE or DELETE changes by its replica identity, and these tables have none (no primary key, REPLICA IDENTITY NOTHING, or a dropped identity index): while they are published with UPDATE/DELETE, every UPDATE or DELETE on them fails on the old server (\"cannot update table ... because it does not have a replica identity\"), and one made while they were not published never reached the new server";
    let fix = "give each a key: `redirect fix replica-identity --table <table> --using-index <unique index on NOT NULL columns>` (or --full: the whole old row is the key, slow on big tables), printed first and applied on both servers with --apply; or add a primary key. An insert-only table is safe as it is: pass --allow no-replica-identity";
    let f = if publishes_changes || changed {
        Finding::blocking(Guardrail::NoReplicaIdentity, objects, why, fix)
    } else {
        Finding::note(Guardrail::NoReplicaIdentity, objects, why, fix)
    };
    Ok(vec![f])
}

/// filtered-publication: operations, rows or columns the publication leaves out never reach
/// the new server.
pub async fn filtered_publication(r: &Replication<'_>) -> Result<Vec<Finding>, PgError> {
    let mut objects = names(
        &r.on_old(
            "reading the publications",
            PARTIAL_OPERATIONS,
            &[&r.publications],
        )
        .await?,
    );
    let version: i32 = r
        .on_old("reading the server version", SERVER_VERSION, &[])
        .await?
        .first()
        .map_or(0, |row| row.get(0));
    // Row filters and column lists exist since PostgreSQL 15.
    if version >= 150_000 {
        objects.extend(names(
            &r.on_old(
                "reading publication filters",
                FILTERED_TABLES,
                &[&r.publications],
            )
            .await?,
        ));
    }
    Ok((!objects.is_empty())
        .then(|| {
            Finding::blocking(
                Guardrail::FilteredPublication,
                objects,
                &format!(
                    "the publication leaves these out: operations it does not publish, rows outside its row filter and columns outside its column list are not on the {}, so the new server's data differs from the old one's",
                    r.new_role
                ),
                "publish everything for the migration: ALTER PUBLICATION <pub> SET (publish = 'insert, update, delete, truncate'), and ALTER PUBLICATION <pub> SET TABLE <table> without a WHERE or column list; then re-copy what was left out (ALTER SUBSCRIPTION ... REFRESH PUBLICATION copies only new tables)",
            )
        })
        .into_iter()
        .collect())
}

/// unlogged-table: not in the WAL, so never replicated (logically or physically).
pub async fn unlogged_tables(r: &Replication<'_>) -> Result<Vec<Finding>, PgError> {
    let tables = names(&r.on_old("listing unlogged tables", UNLOGGED, &[]).await?);
    let then = if r.subscription.is_empty() {
        String::new()
    } else {
        format!(
            ", make sure the publication carries it, and ALTER SUBSCRIPTION {} REFRESH PUBLICATION on the {}",
            r.subscription, r.new_role
        )
    };
    Ok((!tables.is_empty())
        .then(|| {
            Finding::blocking(
                Guardrail::UnloggedTable,
                tables,
                &format!(
                    "unlogged tables are not written to the WAL, so replication (logical or physical) never carries their rows: they are empty (or stale) on the {}",
                    r.new_role
                ),
                &format!(
                    "if their rows matter: ALTER TABLE <table> SET LOGGED on the {} (it rewrites the table){then}; if they are scratch data, pass --allow unlogged-table",
                    r.old_role
                ),
            )
        })
        .into_iter()
        .collect())
}
