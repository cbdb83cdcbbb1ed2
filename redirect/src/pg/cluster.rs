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

use super::Server;
use super::{
    Dsn, PgError,
    lag::{Replication, SubscriptionRow, Watch, choose, cluster_subscriptions},
    timed,
};

/// Every database a client may connect to.
pub const DATABASES: &str =
    "SELECT datname::text FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY 1";
/// The user's data in the session's database: its tables (not the catalogs, temporary
/// tables, an extension's own tables or the barrier table), plus one for any large object
/// (logical replication never carries them, so they are data to account for too).
pub const USER_TABLES: &str = "SELECT count(*)::int8 + (SELECT count(*) FROM (SELECT 1 FROM pg_largeobject_metadata LIMIT 1) l)::int8 \
     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't' \
     AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%' \
     AND NOT (n.nspname = 'public' AND c.relname = 'redirect_barrier') \
     AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')";
/// Whether the session's role may connect to each database.
pub const CAN_CONNECT: &str = "SELECT datname::text, has_database_privilege(datname, 'CONNECT') \
     FROM pg_database WHERE datallowconn AND NOT datistemplate";
/// A managed service's own databases: connectable, but not the customer's (and closed to
/// the customer's roles).
pub const PROVIDER_DATABASES: &[&str] = &[
    "rdsadmin",
    "cloudsqladmin",
    "azure_maintenance",
    "azure_sys",
];

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
    /// A managed service's own database, closed to the customer (`rdsadmin`, ...).
    Provider,
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
    which: impl Into<Server>,
    qt: Duration,
) -> Result<Vec<String>, PgError> {
    let which: Server = which.into();
    Ok(
        timed(which, "listing databases", qt, db.query(DATABASES, &[]))
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect(),
    )
}

/// Finds every database on both servers and what covers it. Each database's subscription is
/// chosen from the cluster's catalog here (not taken from a lag reading that may have
/// failed), and databases with no replication are opened on the old server (`old` in that
/// database) to look for data.
pub async fn discover(
    old: &Dsn,
    old_db: &Client,
    new_db: &Client,
    watch: &Watch,
    qt: Duration,
) -> Result<Vec<Database>, PgError> {
    let on_old = databases(old_db, Server::Old, qt).await?;
    let on_new = databases(new_db, Server::New, qt).await?;
    let may_connect: Vec<(String, bool)> = timed(
        Server::Old,
        "checking CONNECT on each database",
        qt,
        old_db.query(CAN_CONNECT, &[]),
    )
    .await?
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    let chosen = if watch.replication == Replication::Logical {
        choose(
            &cluster_subscriptions(new_db, Server::New, qt).await?,
            watch,
        )
    } else {
        std::collections::BTreeMap::default()
    };
    // A name in --databases/--exclude-databases that no server has is a typo: say so, or
    // the database meant would be flipped unprotected.
    let mut out = unknown_scope_names(watch, &on_old, &on_new);
    for name in &on_old {
        let connectable = may_connect
            .iter()
            .find(|(d, _)| d == name)
            .is_none_or(|(_, ok)| *ok);
        let db = on_old_server(old, name, watch, &on_new, connectable, chosen.get(name), qt);
        out.push(db.await);
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

/// The names in `--databases`/`--exclude-databases` that neither server has, each a problem.
fn unknown_scope_names(watch: &Watch, on_old: &[String], on_new: &[String]) -> Vec<Database> {
    let mut out = Vec::new();
    for name in watch.scope.only.iter().chain(&watch.scope.exclude) {
        if !on_old.contains(name) && !on_new.contains(name) {
            out.push(Database {
                name: name.clone(),
                coverage: Coverage::Broken,
                subscription: None,
                tables: None,
                problem: Some(format!(
                    "--databases/--exclude-databases names {name:?}, which is on neither server (the databases are: {})",
                    on_old.join(", ")
                )),
            });
        }
    }
    out
}

/// What covers `name`, a database on the old server: `connectable` says whether the
/// controller's role may connect to it, `chosen` is its subscription as the catalog names it.
async fn on_old_server(
    old: &Dsn,
    name: &str,
    watch: &Watch,
    on_new: &[String],
    connectable: bool,
    chosen: Option<&Result<SubscriptionRow, String>>,
    qt: Duration,
) -> Database {
    let mut db = Database {
        name: name.to_owned(),
        coverage: Coverage::Replicated,
        subscription: None,
        tables: None,
        problem: None,
    };
    if !watch.scope.covers(name) {
        db.coverage = Coverage::Excluded;
        if name == watch.home {
            db.coverage = Coverage::Broken;
            db.problem = Some(format!(
                "--databases/--exclude-databases leaves out {name:?}, the database the DSNs name: the controller's own sessions are there; point the DSNs at a database the cutover covers"
            ));
        }
    } else if watch.replication == Replication::Physical {
        // One stream carries the whole cluster.
    } else if !connectable && PROVIDER_DATABASES.contains(&name) {
        db.coverage = Coverage::Provider;
    } else if !on_new.iter().any(|n| n == name) {
        db.coverage = Coverage::OldServerOnly;
        db.problem = Some(format!(
            "database {name:?} exists on the old server only: its clients would fail after the flip; create and replicate it on the new server, or leave it out with --exclude-databases {name}"
        ));
    } else if let Some(c) = chosen {
        match c {
            Ok(sub) => db.subscription = Some(sub.name.clone()),
            Err(why) => {
                db.coverage = Coverage::Broken;
                db.problem = Some(why.clone());
            }
        }
    } else {
        unreplicated(&mut db, old, qt).await;
    }
    db
}

/// A database no subscription carries: empty, or data that would be lost (or that cannot
/// be checked, which counts the same).
async fn unreplicated(db: &mut Database, old: &Dsn, qt: Duration) {
    let name = &db.name;
    match count_tables(old, name, qt).await {
        Ok(0) => {
            db.coverage = Coverage::Empty;
            db.tables = Some(0);
        }
        Ok(n) => {
            db.coverage = Coverage::Unreplicated;
            db.tables = Some(n);
            db.problem = Some(format!(
                "database {name:?} has {n} table(s) on the old server and no subscription on the new one carries it: its writes would not reach the new server; replicate it (a publication there, a subscription here), or leave it out with --exclude-databases {name} (its clients are moved all the same, unprotected)"
            ));
        }
        Err(e) => {
            db.coverage = Coverage::Unreplicated;
            db.problem = Some(format!(
                "database {name:?} cannot be checked for data ({e}); GRANT CONNECT ON DATABASE {name} to the controller's role, replicate it, or leave it out with --exclude-databases {name}"
            ));
        }
    }
}

/// The user tables in `database` on the server behind `dsn`.
async fn count_tables(dsn: &Dsn, database: &str, qt: Duration) -> Result<i64, PgError> {
    let db = tokio::time::timeout(qt, dsn.for_database(database).connect())
        .await
        .map_err(|_| PgError::Timeout {
            which: Server::Old,
            what: "connecting to count tables",
            timeout: qt,
        })??;
    Ok(timed(
        Server::Old,
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
                Coverage::Broken => "CANNOT BE CUT OVER".to_owned(),
                Coverage::Provider => {
                    "the provider's own database: not the customer's, left alone".to_owned()
                }
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
