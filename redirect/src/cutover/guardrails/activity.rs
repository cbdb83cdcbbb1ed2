//! What lives on the old server outside the replicated tables: large objects, prepared
//! transactions and long transactions.

use super::{Finding, Guardrail, Replication};
use crate::pg::PgError;

/// How many large objects there are, and the first few oids.
const LARGE_OBJECTS: &str = "SELECT (SELECT count(*) FROM pg_largeobject_metadata)::int8, \
     coalesce((SELECT string_agg(oid::text, ', ') FROM (SELECT oid FROM pg_largeobject_metadata ORDER BY oid LIMIT 10) o), '')";
/// This database's prepared transactions, oldest first.
const PREPARED: &str = "SELECT format('%L (prepared %s ago by %s)', gid, date_trunc('second', now() - prepared), owner) \
     FROM pg_prepared_xacts WHERE database = current_database() ORDER BY prepared";
/// Sessions in this database whose transaction has been open longer than $1 seconds.
/// The query text is left out: it can hold passwords or personal data, and the finding goes
/// to the terminal, the JSON report and the controller's log.
const LONG: &str = "SELECT format('pid %s (%s from %s, application %L, open %s, %s)', pid, usename, \
     coalesce(host(client_addr), 'local socket'), application_name, date_trunc('second', now() - xact_start), state) \
     FROM pg_stat_activity WHERE datname = current_database() AND backend_type = 'client backend' \
     AND pid <> pg_backend_pid() AND xact_start < now() - make_interval(secs => $1) ORDER BY xact_start";

/// large-objects: `pg_largeobject` is a system catalog, never published.
pub async fn large_objects(r: &Replication<'_>) -> Result<Vec<Finding>, PgError> {
    let rows = r
        .on_old("counting large objects", LARGE_OBJECTS, &[])
        .await?;
    let Some(row) = rows.first() else {
        return Ok(Vec::new());
    };
    let (n, first): (i64, String) = (row.get(0), row.get(1));
    if n == 0 {
        return Ok(Vec::new());
    }
    let more = if n > 10 { ", ..." } else { "" };
    Ok(vec![Finding::blocking(
        Guardrail::LargeObjects,
        vec![format!("{n} large object(s): oid {first}{more}")],
        &format!(
            "large objects live in pg_largeobject, a system catalog that logical replication never carries: none of them (and no lo_write since the copy) is on the {}",
            r.new_role
        ),
        &format!(
            "store them in bytea columns of a published table (those replicate), or copy them to the {} yourself after the last write (pg_dump --data-only --blobs of the database, restoring only the large objects, or lo_export/lo_import) and pass --allow large-objects",
            r.new_role
        ),
    )])
}

/// prepared-transactions: a transaction manager commits them later, on the old server.
pub async fn prepared_transactions(r: &Replication<'_>) -> Result<Vec<Finding>, PgError> {
    let gids: Vec<String> = r
        .on_old("listing prepared transactions", PREPARED, &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    Ok((!gids.is_empty())
        .then(|| {
            Finding::blocking(
                Guardrail::PreparedTransactions,
                gids,
                &format!(
                    "a prepared transaction survives the write fence and is committed later, by its transaction manager, on the {} after the cutover: its writes never reach the {}",
                    r.old_role, r.new_role
                ),
                &format!(
                    "have the transaction manager finish them, or on the {}: COMMIT PREPARED '<gid>' (or ROLLBACK PREPARED '<gid>'); then retry",
                    r.old_role
                ),
            )
        })
        .into_iter()
        .collect())
}

/// long-transaction: a transaction open for longer than `--max-transaction-age`.
pub async fn long_transactions(r: &Replication<'_>) -> Result<Vec<Finding>, PgError> {
    let secs = r.max_transaction_age.as_secs_f64();
    let sessions: Vec<String> = r
        .on_old("listing long transactions", LONG, &[&secs])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    Ok((!sessions.is_empty())
        .then(|| {
            Finding::blocking(
                Guardrail::LongTransaction,
                sessions,
                &format!(
                    "transactions open longer than --max-transaction-age ({}) on the {}: the fence ends proxied sessions, so a long job through the proxy is rolled back (its work is lost, not acknowledged), and one that bypasses the proxy commits on the {} after the cutover, where the {} never sees it",
                    humantime::format_duration(r.max_transaction_age),
                    r.old_role,
                    r.old_role,
                    r.new_role
                ),
                &format!(
                    "let them finish, or end them on the {}: SELECT pg_terminate_backend(<pid>); or raise --max-transaction-age",
                    r.old_role
                ),
            )
        })
        .into_iter()
        .collect())
}
