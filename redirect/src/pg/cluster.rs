//! The databases behind the VIP: a flip moves every database's connections at once, so a
//! cutover must know every database on both servers and what carries each one's writes.
//!
//! Each connectable database (`datallowconn`, not a template) on the old server is one of:
//! replicated (a subscription on the new server carries it), empty (no user table), excluded
//! (`--databases`/`--exclude-databases`), or a problem the cutover refuses: data with no
//! replication, or a database the new server lacks.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::{
    Dsn, PgError,
    lag::{ReplicaLag, Replication, Scope},
    timed,
};

/// Every database a client may connect to.
pub const DATABASES: &str =
    "SELECT datname::text FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1";
/// The user's tables in the session's database (not the catalogs, not the barrier table).
pub const USER_TABLES: &str = "SELECT count(*)::int8 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND n.nspname NOT LIKE 'pg\\_toast%' AND NOT (n.nspname = 'public' AND c.relname = 'redirect_barrier')";

/// What a cutover does with one database.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Coverage {
    /// A subscription on the new server carries it: gated, fenced, synced and verified.
    Replicated,
    /// No user table on the old server: nothing to carry.
    Empty,
    /// Left out by `--databases`/`--exclude-databases`: moved with the VIP, unprotected.
    Excluded,
    /// User tables on the old server and no replication: its writes would be lost.
    Unreplicated,
    /// On the old server only: its clients would fail on the new one.
    OldServerOnly,
    /// On the new server only: nothing to carry.
    NewServerOnly,
    /// Its replication is there but cannot be used as it is (named in `problem`).
    Broken,
}

/// One database and what the cutover does with it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Database {
    pub name: String,
    pub coverage: Coverage,
    /// The subscription that carries it (replicated).
    pub subscription: Option<String>,
    /// User tables on the old server, when counted.
    pub tables: Option<i64>,
    /// Why it stops the cutover, if it does.
    pub problem: Option<String>,
}

impl Database {
    /// Whether this database stops a cutover.
    #[must_use]
    pub fn blocks(&self) -> bool {
        self.problem.is_some()
    }
}

/// Lists the connectable databases of the server behind `db`.
pub async fn databases(
    db: &Client,
    which: &'static str,
    qt: Duration,
) -> Result<Vec<String>, PgError> {
    Ok(
        timed(which, "listing databases", qt, db.query(DATABASES, &[]))
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect(),
    )
}

/// Finds every database on both servers and what covers it, from the lag just measured
/// (which chose each database's subscription). Databases with no replication are opened
/// on the old server (`old` in that database) to count their tables.
pub async fn discover(
    old: &Dsn,
    old_db: &Client,
    new_db: &Client,
    lag: &ReplicaLag,
    scope: &Scope,
    qt: Duration,
) -> Result<Vec<Database>, PgError> {
    let on_old = databases(old_db, "old server", qt).await?;
    let on_new = databases(new_db, "new server", qt).await?;
    let mut out = Vec::new();
    for name in &on_old {
        let replicated = lag.databases.iter().find(|d| &d.database == name);
        let mut db = Database {
            name: name.clone(),
            coverage: Coverage::Replicated,
            subscription: replicated.and_then(|d| d.subscription.clone()),
            tables: None,
            problem: None,
        };
        if !scope.covers(name) {
            db.coverage = Coverage::Excluded;
        } else if lag.replication == Replication::Physical {
            // One stream carries the whole cluster.
        } else if !on_new.contains(name) {
            db.coverage = Coverage::OldServerOnly;
            db.problem = Some(format!(
                "database {name:?} exists on the old server only: its clients would fail after the flip; create and replicate it on the new server, or leave it out with --exclude-databases {name}"
            ));
        } else if let Some(r) = replicated {
            if r.subscription.is_none() {
                // The subscription could not be chosen (several, or a named one missing).
                db.coverage = Coverage::Broken;
                db.problem = Some(r.problems.join("; "));
            }
        } else {
            db.tables = Some(match count_tables(old, name, qt).await {
                Ok(n) => n,
                Err(e) => {
                    db.coverage = Coverage::Unreplicated;
                    db.problem = Some(format!(
                        "database {name:?} cannot be checked for data ({e}); GRANT CONNECT ON DATABASE to the controller's role, replicate it, or leave it out with --exclude-databases {name}"
                    ));
                    out.push(db);
                    continue;
                }
            });
            if db.tables == Some(0) {
                db.coverage = Coverage::Empty;
            } else {
                db.coverage = Coverage::Unreplicated;
                db.problem = Some(format!(
                    "database {name:?} has {} table(s) on the old server and no subscription on the new one carries it: its writes would not reach the new server; replicate it (a publication there, a subscription here), or leave it out with --exclude-databases {name} (its clients are moved all the same)",
                    db.tables.unwrap_or(0)
                ));
            }
        }
        out.push(db);
    }
    for name in on_new.iter().filter(|n| !on_old.contains(n)) {
        out.push(Database {
            name: name.clone(),
            coverage: Coverage::NewServerOnly,
            subscription: None,
            tables: None,
            problem: None,
        });
    }
    Ok(out)
}

/// The user tables in `database` on the server behind `dsn`.
async fn count_tables(dsn: &Dsn, database: &str, qt: Duration) -> Result<i64, PgError> {
    let db = tokio::time::timeout(qt, dsn.for_database(database).connect())
        .await
        .map_err(|_| PgError::Timeout {
            which: "old server",
            what: "connecting to count tables",
            timeout: qt,
        })??;
    Ok(timed(
        "old server",
        "counting user tables",
        qt,
        db.query_one(USER_TABLES, &[]),
    )
    .await?
    .get(0))
}

/// One line per database, for the dry run and `status`.
#[must_use]
pub fn describe(databases: &[Database]) -> Vec<String> {
    databases
        .iter()
        .map(|d| {
            let what = match d.coverage {
                Coverage::Replicated => format!(
                    "replicated by subscription {}",
                    d.subscription.as_deref().unwrap_or("(physical)")
                ),
                Coverage::Empty => "empty (no user table): nothing to carry".to_owned(),
                Coverage::Excluded => {
                    "EXCLUDED: moved with the VIP, its writes not protected".to_owned()
                }
                Coverage::Unreplicated => "NOT REPLICATED".to_owned(),
                Coverage::OldServerOnly => "on the old server only".to_owned(),
                Coverage::NewServerOnly => "on the new server only: nothing to carry".to_owned(),
                Coverage::Broken => "replication unusable".to_owned(),
            };
            format!(
                "database {}: {what}{}",
                d.name,
                d.problem
                    .as_ref()
                    .map(|p| format!(" ({p})"))
                    .unwrap_or_default()
            )
        })
        .collect()
}
