//! Guardrails: what logical replication will not carry to the new server.
//!
//! Logical replication moves the rows of published tables and nothing else: not sequences'
//! values, large objects, unlogged tables, DDL, or rows whose replica identity cannot be
//! found. Each [`Guardrail`] is one such gap, found by a catalog query on the server that
//! feeds the new one (forward: the source; a rollback: the target) and on the new server.
//! A finding names the objects, says why it loses data or fails, and how to fix it; a
//! blocking finding stops the cutover unless the operator passes `--allow NAME` for it.
//!
//! With physical replication none of this applies: the standby replays every byte of WAL.

mod activity;
pub mod fix;
mod objects;
mod schema;
mod sequences;
mod slot;

use std::{fmt::Write as _, time::Duration};

use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, Row, types::ToSql};

use crate::pg::Server;
use crate::{
    datapath::Role,
    pg::{PgError, timed},
};

/// One kind of thing logical replication does not carry; its name is what `--allow` takes.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    clap::ValueEnum,
    Serialize,
    Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Guardrail {
    /// A table on the old server that no publication of the subscription carries.
    UnpublishedTable,
    /// A published table (or a sequence the sync sets) that does not exist on the new server.
    MissingOnTarget,
    /// A published table still in (or not yet started on) its initial copy.
    InitialCopy,
    /// A published table with no usable replica identity.
    NoReplicaIdentity,
    /// A publication that leaves out operations, rows (row filter) or columns (column list).
    FilteredPublication,
    /// Large objects (`pg_largeobject`): never replicated.
    LargeObjects,
    /// Unlogged tables: not in the WAL, so never replicated.
    UnloggedTable,
    /// Prepared transactions on the old server: committed later, on the wrong server.
    PreparedTransactions,
    /// Transactions open longer than `--max-transaction-age` on the old server.
    LongTransaction,
    /// Columns, types, constraints or replica identity that differ between the servers.
    SchemaDrift,
    /// Generated columns that differ between the servers.
    GeneratedColumn,
    /// Sequences no column owns (a note: the sequence sync carries them).
    UnownedSequence,
    /// Identity columns (a note: the sequence sync carries their sequences).
    IdentityColumn,
    /// Extensions installed on the old server but not on the new one.
    MissingExtension,
    /// A `max_slot_wal_keep_size` that could invalidate the slot at the current lag.
    SlotWalLimit,
    /// The old server is 17+ with a standby, and the subscription's slot is not a failover
    /// slot (a note: a failover of the old server loses the slot).
    FailoverSlot,
    /// Different major versions, where the new server is older.
    VersionIncompatibility,
    /// A guardrail query failed (a timeout on a huge catalog, a table dropped under it): what
    /// it would have found is unknown.
    CheckFailed,
}

impl Guardrail {
    /// The name `--allow` takes (kebab-case, as clap spells it).
    #[must_use]
    pub fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }
}

impl std::fmt::Display for Guardrail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

/// What a guardrail found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub guardrail: Guardrail,
    /// The objects, as `schema.table`, `schema.table.column`, `pid 123 ...`.
    pub objects: Vec<String>,
    /// Why it loses data or makes the cutover fail.
    pub why: String,
    /// How to fix it.
    pub fix: String,
    /// Whether it stops the cutover; `false` is a note (nothing is lost).
    pub blocks: bool,
    /// Passed with `--allow`: reported, but the cutover goes ahead.
    pub allowed: bool,
    /// The database the objects are in (a cutover covers every database of the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
}

impl Finding {
    fn blocking(guardrail: Guardrail, objects: Vec<String>, why: &str, fix: &str) -> Self {
        Self {
            guardrail,
            objects,
            why: why.to_owned(),
            fix: fix.to_owned(),
            blocks: true,
            allowed: false,
            database: None,
        }
    }

    fn note(guardrail: Guardrail, objects: Vec<String>, why: &str, fix: &str) -> Self {
        Self {
            blocks: false,
            ..Self::blocking(guardrail, objects, why, fix)
        }
    }

    /// Whether it stops this cutover (blocking and not allowed).
    #[must_use]
    pub fn stops(&self) -> bool {
        self.blocks && !self.allowed
    }

    /// The finding as the operator reads it: what, which objects, why, how to fix.
    #[must_use]
    pub fn render(&self) -> String {
        let label = match (self.blocks, self.allowed) {
            (true, false) => "BLOCKING",
            (true, true) => "ALLOWED",
            (false, _) => "NOTE",
        };
        let mut s = format!(
            "{label} {}: {}{}\n    why: {}\n    fix: {}",
            self.guardrail,
            self.database
                .as_ref()
                .map(|d| format!("(database {d}) "))
                .unwrap_or_default(),
            self.objects.join(", "),
            self.why,
            self.fix
        );
        if self.stops() {
            let _ = write!(
                s,
                "\n    pass --allow {} to go ahead anyway",
                self.guardrail
            );
        } else if self.allowed {
            let _ = write!(
                s,
                "\n    allowed with --allow {}: the cutover goes ahead",
                self.guardrail
            );
        }
        s
    }
}

/// The replication the checks describe: the server that feeds the new one (`old`, the
/// publisher) and the new one (`new`, the subscriber), with what they share.
pub struct Replication<'a> {
    pub old: &'a Client,
    pub new: &'a Client,
    pub old_role: Role,
    pub new_role: Role,
    pub subscription: &'a str,
    pub publications: &'a [String],
    /// The subscription's slot on the old server.
    pub slot: Option<&'a str>,
    /// Every query's bound (the statement timeout preflight sets is the same).
    pub qt: Duration,
    /// A transaction open longer than this on the old server is a finding.
    pub max_transaction_age: Duration,
}

impl Replication<'_> {
    async fn on_old(
        &self,
        what: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, PgError> {
        timed(Server::Old, what, self.qt, self.old.query(sql, params)).await
    }

    async fn on_new(
        &self,
        what: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, PgError> {
        timed(Server::New, what, self.qt, self.new.query(sql, params)).await
    }
}

/// Published tables other than the barrier, as `schema.table` (quoted where needed).
const PUBLISHED_TABLES: &str = "SELECT DISTINCT format('%I.%I', schemaname, tablename) FROM pg_publication_tables \
     WHERE pubname = ANY($1) AND NOT (schemaname = 'public' AND tablename = 'redirect_barrier') ORDER BY 1";

/// Runs every guardrail against `r`, marking the findings `allow` names as allowed.
pub async fn check(r: &Replication<'_>, allow: &[Guardrail]) -> Result<Vec<Finding>, PgError> {
    let published: Vec<String> = r
        .on_old(
            "listing published tables",
            PUBLISHED_TABLES,
            &[&r.publications],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut found = Vec::new();
    found.extend(objects::unpublished_tables(r).await?);
    let missing = objects::missing_on_new(r, &published).await?;
    let on_both: Vec<String> = published
        .iter()
        .filter(|t| !missing.iter().any(|m| m == *t))
        .cloned()
        .collect();
    found.extend(objects::missing_finding(r, missing).await?);
    found.extend(objects::initial_copy(r, &on_both).await?);
    found.extend(objects::no_replica_identity(r, &published).await?);
    found.extend(objects::filtered_publication(r).await?);
    found.extend(objects::unlogged_tables(r).await?);
    found.extend(activity::large_objects(r).await?);
    found.extend(activity::prepared_transactions(r).await?);
    found.extend(activity::long_transactions(r).await?);
    found.extend(schema::drift(r, &on_both).await?);
    found.extend(sequences::unowned(r).await?);
    found.extend(sequences::identity_columns(r, &published).await?);
    found.extend(schema::missing_extensions(r).await?);
    found.extend(slot::wal_limit(r).await?);
    found.extend(slot::not_failover(r).await?);
    found.extend(schema::versions(r).await?);
    for f in &mut found {
        f.allowed = f.blocks && allow.contains(&f.guardrail);
    }
    Ok(found)
}

/// The guardrails could not all run: unknown is not safe, so it blocks like a finding (and can
/// be allowed like one) instead of failing the whole preflight, which would leave a rollback
/// with no way through at 2 a.m.
#[must_use]
pub fn check_failed(error: &PgError, allow: &[Guardrail]) -> Finding {
    let mut f = Finding::blocking(
        Guardrail::CheckFailed,
        Vec::new(),
        &format!(
            "the guardrail checks could not finish ({error}), so what they look for is unknown"
        ),
        "fix what the error names and run the dry run again (a timeout: raise run --query-timeout); or pass --allow check-failed to go ahead without them",
    );
    f.allowed = allow.contains(&Guardrail::CheckFailed);
    f
}

/// Why a cutover is refused: every finding that stops it, rendered.
#[must_use]
pub fn refusal(stopping: &[Finding]) -> String {
    format!(
        "{} guardrail(s) found what logical replication will not carry (nothing was changed):\n{}",
        stopping.len(),
        stopping
            .iter()
            .map(Finding::render)
            .collect::<Vec<_>>()
            .join("\n")
    )
}

/// The guardrails that still apply to physical replication: it replays every byte of WAL
/// (every table, sequence, large object, prepared transaction and DDL), but unlogged tables
/// are not in the WAL, and a long transaction that bypasses the proxy still commits on the
/// old server after the barrier. `r` needs no subscription or publication.
pub async fn check_physical(
    r: &Replication<'_>,
    allow: &[Guardrail],
) -> Result<Vec<Finding>, PgError> {
    let mut found = objects::unlogged_tables(r).await?;
    found.extend(activity::long_transactions(r).await?);
    for f in &mut found {
        f.allowed = f.blocks && allow.contains(&f.guardrail);
    }
    Ok(found)
}

/// What the dry run says about the guardrails physical replication makes moot.
pub const PHYSICAL: &str = "physical replication carries every table, sequence, large object, prepared transaction and DDL, so only the unlogged-table and long-transaction guardrails apply; the others (publications, replica identity, schema drift, extensions, slots) are skipped";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_kebab_case_and_round_trip() {
        assert_eq!(Guardrail::NoReplicaIdentity.name(), "no-replica-identity");
        assert_eq!(Guardrail::SlotWalLimit.name(), "slot-wal-limit");
        for g in <Guardrail as clap::ValueEnum>::value_variants() {
            let json = serde_json::to_string(g).unwrap();
            assert_eq!(json, format!("\"{}\"", g.name()));
            assert_eq!(serde_json::from_str::<Guardrail>(&json).unwrap(), *g);
        }
    }

    #[test]
    fn a_blocking_finding_says_how_to_go_ahead() {
        let mut f = Finding::blocking(
            Guardrail::UnloggedTable,
            vec!["public.scratch".into()],
            "not in the WAL",
            "ALTER TABLE public.scratch SET LOGGED",
        );
        assert!(f.stops());
        assert!(f.render().contains("pass --allow unlogged-table"));
        f.allowed = true;
        assert!(!f.stops());
        assert!(
            f.render()
                .starts_with("ALLOWED unlogged-table: public.scratch")
        );
    }
}
