//! Sequences: logical replication does not carry their values, but redirect's sequence sync
//! does (`cutover::sequences`): behind the write fence it sets every used sequence in
//! `pg_sequences` on the new server, by name, owned by a column or not, identity sequences
//! included. So these findings are notes: nothing is lost, and they say why. What would
//! make the sync fail, a sequence missing on the new server, is `missing-on-target`.

use super::{Finding, Guardrail, Replication};
use crate::pg::PgError;

/// Sequences no column owns (`OWNED BY NONE`; serial and identity sequences are owned).
const UNOWNED: &str = "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c \
     JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'S' \
     AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid \
       AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')) \
     AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e') \
     ORDER BY 1";
/// Identity columns of the published tables, with their sequences.
const IDENTITY: &str = "SELECT x || '.' || quote_ident(a.attname) || ' (' || \
     coalesce(pg_get_serial_sequence(x, a.attname), '?') || ')' \
     FROM unnest($1::text[]) x JOIN pg_attribute a ON a.attrelid = to_regclass(x) \
     WHERE a.attidentity <> '' AND NOT a.attisdropped ORDER BY 1";

const CARRIED: &str = "logical replication does not carry sequence values, but redirect's sequence sync does: behind the write fence it sets every used sequence on the new server to its value on the old one, by name, whether a column owns it or not (identity sequences included), so no id is handed out twice";

/// unowned-sequence: a note.
pub async fn unowned(r: &Replication<'_>) -> Result<Vec<Finding>, PgError> {
    let seqs: Vec<String> = r
        .on_old("listing sequences", UNOWNED, &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    Ok((!seqs.is_empty())
        .then(|| {
            Finding::note(
                Guardrail::UnownedSequence,
                seqs,
                CARRIED,
                "nothing to do: the sync sets them at the cutover (a sequence missing on the new server would be reported as missing-on-target)",
            )
        })
        .into_iter()
        .collect())
}

/// identity-column: a note.
pub async fn identity_columns(
    r: &Replication<'_>,
    published: &[String],
) -> Result<Vec<Finding>, PgError> {
    let cols: Vec<String> = r
        .on_old("listing identity columns", IDENTITY, &[&published])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    Ok((!cols.is_empty())
        .then(|| {
            Finding::note(
                Guardrail::IdentityColumn,
                cols,
                &format!(
                    "{CARRIED}; the rows' identity values replicate as plain data (the apply writes them even into GENERATED ALWAYS columns)"
                ),
                "nothing to do: the sync sets their sequences at the cutover",
            )
        })
        .into_iter()
        .collect())
}
