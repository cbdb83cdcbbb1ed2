//! What the controller's role must be allowed to do, checked before anything changes.
//!
//! Managed services (RDS, Cloud SQL, Azure, Supabase, Neon) never grant superuser. What they
//! grant is enough for every step, if the role has each piece: this module names the piece a
//! step lacks and the statement that gives it, so preflight refuses with something an operator
//! can paste, not with the permission error the step would have hit halfway through.
//!
//! Each check runs on the server the step changes, as the controller's own role (a superuser
//! passes them all).

use std::time::Duration;

use tokio_postgres::Client;

use super::{REVERSE, quote_ident};
use crate::pg::Server;
use crate::pg::{PgError, timed};

/// Whether the session's role is a superuser, and its name.
const WHO: &str =
    "SELECT rolsuper, rolname::text, rolreplication FROM pg_roles WHERE rolname = current_user";
/// The fence sees every proxied session's address (`pg_read_all_stats`) and ends it
/// (`pg_signal_backend`).
const CAN_FENCE: &str = "SELECT pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER') \
     AND pg_has_role(current_user, 'pg_signal_backend', 'MEMBER')";
/// Creating a subscription without superuser: `pg_create_subscription` (16+) and `CREATE` on
/// the database.
const CAN_SUBSCRIBE: &str = "SELECT current_setting('server_version_num')::int4 >= 160000, \
     coalesce((SELECT pg_has_role(current_user, oid, 'USAGE') FROM pg_roles WHERE rolname = 'pg_create_subscription'), false), \
     has_database_privilege(current_database(), 'CREATE'), current_database()::text";
/// The forward subscription's owner (only an owner may disable, enable or refresh it).
const SUBSCRIPTION_OWNED: &str = "SELECT pg_has_role(current_user, s.subowner, 'USAGE'), pg_get_userbyid(s.subowner)::text \
     FROM pg_subscription s WHERE s.subname = $1 \
     AND s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())";
/// Tables (`schema.table`, quoted) this role does not own: the reverse publication must list
/// them, and only an owner may publish a table.
const NOT_OWNED: &str = "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE format('%I.%I', n.nspname, c.relname) = ANY($1) AND NOT pg_has_role(current_user, c.relowner, 'USAGE') ORDER BY 1";
/// Of the sequences the sync sets (`$1`, used on the old server), those it cannot `setval`
/// here (it needs `UPDATE`).
const SEQUENCES_NOT_SETTABLE: &str = "SELECT format('%I.%I', schemaname, sequencename) FROM pg_sequences \
     WHERE format('%I.%I', schemaname, sequencename) = ANY($1) \
     AND NOT has_sequence_privilege(format('%I.%I', schemaname, sequencename), 'UPDATE') ORDER BY 1";
/// `CREATE` on the session's database (the reverse publication is made there).
const CAN_CREATE_HERE: &str = "SELECT has_database_privilege(current_database(), 'CREATE')";
/// The barrier table: usable if it exists, else creatable in `public`.
const BARRIER_USABLE: &str = "SELECT CASE WHEN to_regclass('public.redirect_barrier') IS NULL \
     THEN has_schema_privilege('public', 'CREATE') \
     ELSE has_table_privilege('public.redirect_barrier', 'SELECT') AND has_table_privilege('public.redirect_barrier', 'INSERT') END, \
     to_regclass('public.redirect_barrier') IS NOT NULL";
/// Publications of `$1` this role does not own (the barrier table is added to one).
const PUBLICATIONS_NOT_OWNED: &str = "SELECT pubname::text FROM pg_publication \
     WHERE pubname = ANY($1) AND NOT pg_has_role(current_user, pubowner, 'USAGE') ORDER BY 1";

/// One thing the role may not do, the step that needs it, and how to allow it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing {
    pub server: crate::datapath::Role,
    pub needed_for: String,
    pub grant: String,
    /// Needed only for a lossless rollback (the reverse replication): `--force` may go
    /// ahead without it, as without any reverse path.
    pub for_rollback: bool,
    /// The database it is missing in, for a grant of one database (not of the cluster).
    pub database: Option<String>,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the controller's role cannot {} on the {}{}: run `{}` there",
            self.needed_for,
            self.server,
            self.database
                .as_ref()
                .map(|d| format!(" in database {d}"))
                .unwrap_or_default(),
            self.grant
        )
    }
}

/// The role behind a session.
pub struct Role {
    pub name: String,
    pub superuser: bool,
    pub replication: bool,
}

pub async fn role(db: &Client, which: impl Into<Server>, qt: Duration) -> Result<Role, PgError> {
    let which: Server = which.into();
    let r = timed(which, "reading the role", qt, db.query_one(WHO, &[])).await?;
    Ok(Role {
        superuser: r.get(0),
        name: r.get(1),
        replication: r.get(2),
    })
}

/// What the steps of a logical cutover need, per server.
pub struct Needs<'a> {
    /// The server whose sessions the fence ends and whose writes are carried.
    pub old: (crate::datapath::Role, &'a Client),
    /// The server the clients go to.
    pub new: (crate::datapath::Role, &'a Client),
    /// Logical replication (else only the fence is checked).
    pub logical: bool,
    /// A forward cutover: the reverse replication is made (publication and slot on the
    /// new server, subscription on the old one).
    pub forward: bool,
    /// The subscription on the new server that the cutover stops (forward).
    pub subscription: Option<&'a str>,
    /// Its publications on the old server.
    pub publications: &'a [String],
    /// The tables they publish (`schema.table`, quoted).
    pub tables: &'a [String],
    /// The sequences the sync will set (`schema.sequence`, quoted).
    pub sequences: &'a [String],
    /// The database the sessions are in (a lane), `None` for the cluster-wide checks only.
    pub database: Option<&'a str>,
}

/// Everything the role lacks for this cutover; empty when it may do every step.
pub async fn check(needs: &Needs<'_>, qt: Duration) -> Result<Vec<Missing>, PgError> {
    let mut missing = Vec::new();
    let (old_name, old) = needs.old;
    let (new_name, new) = needs.new;
    let old_role = role(old, old_name, qt).await?;
    let new_role = role(new, new_name, qt).await?;
    if !old_role.superuser {
        missing.extend(fence(needs, &old_role, qt).await?);
    }
    if !needs.logical {
        return Ok(missing);
    }
    // The barrier marker is written on the old server and read on the new one.
    for (server, r) in [(needs.old, &old_role), (needs.new, &new_role)] {
        if !r.superuser {
            missing.extend(barrier_table(server, r, qt).await?);
        }
    }
    if !old_role.superuser && needs.forward {
        missing.extend(publication_owners(needs, &old_role, qt).await?);
    }
    // The slot: the reverse slot is made on the new server (forward); a rollback advances
    // the forward slot on the new server (the source) before restarting it.
    if !new_role.superuser && !new_role.replication {
        missing.push(replication_slot(needs, &new_role));
    }
    if !new_role.superuser {
        missing.extend(subscription_owner(needs, &new_role, qt).await?);
        missing.extend(settable_sequences(needs, &new_role, qt).await?);
    }
    if needs.forward && !new_role.superuser {
        missing.extend(create_on_new_database(needs, &new_role, qt).await?);
        missing.extend(table_owners(needs, &new_role, qt).await?);
    }
    if needs.forward && !old_role.superuser {
        missing.extend(reverse_subscription(needs, &old_role, qt).await?);
    }
    name_the_database(&mut missing, needs.database);
    Ok(missing)
}

/// A role's name as SQL writes it.
fn quoted(r: &Role) -> String {
    quote_ident(&r.name)
}

/// The fence, on the old server: see every proxied session's address and end it.
async fn fence(
    needs: &Needs<'_>,
    old_role: &Role,
    qt: Duration,
) -> Result<Option<Missing>, PgError> {
    let (old_name, old) = needs.old;
    let can_fence: bool = timed(
        old_name,
        "checking the fence's grants",
        qt,
        old.query_one(CAN_FENCE, &[]),
    )
    .await?
    .get(0);
    Ok((!can_fence).then(|| Missing {
        for_rollback: false,
        database: None,
        server: old_name,
        needed_for: "see and end every proxied session (the fence)".into(),
        grant: format!(
            "GRANT pg_read_all_stats, pg_signal_backend TO {}",
            quoted(old_role)
        ),
    }))
}

/// The barrier table on `server`: usable if it exists, else creatable.
async fn barrier_table(
    (name, db): (crate::datapath::Role, &Client),
    r: &Role,
    qt: Duration,
) -> Result<Option<Missing>, PgError> {
    let row = timed(
        name,
        "checking the barrier table's grants",
        qt,
        db.query_one(BARRIER_USABLE, &[]),
    )
    .await?;
    let (usable, exists): (bool, bool) = (row.get(0), row.get(1));
    Ok((!usable).then(|| Missing {
        for_rollback: false,
        database: None,
        server: name,
        needed_for: if exists {
            "write and read the barrier marker in public.redirect_barrier".into()
        } else {
            "create the barrier table public.redirect_barrier".into()
        },
        grant: if exists {
            format!(
                "GRANT SELECT, INSERT ON public.redirect_barrier TO {}",
                quoted(r)
            )
        } else {
            format!("GRANT CREATE ON SCHEMA public TO {}", quoted(r))
        },
    }))
}

/// The forward publications on the old server, which the barrier table is added to: only
/// their owner may.
async fn publication_owners(
    needs: &Needs<'_>,
    old_role: &Role,
    qt: Duration,
) -> Result<Vec<Missing>, PgError> {
    let (old_name, old) = needs.old;
    let mut missing = Vec::new();
    for p in timed(
        old_name,
        "checking the publications' owners",
        qt,
        old.query(PUBLICATIONS_NOT_OWNED, &[&needs.publications]),
    )
    .await?
    {
        let p: String = p.get(0);
        missing.push(Missing {
            for_rollback: false,
            database: None,
            server: old_name,
            needed_for: format!("add the barrier table to publication {p}"),
            grant: format!(
                "ALTER PUBLICATION {} OWNER TO {}",
                quote_ident(&p),
                quoted(old_role)
            ),
        });
    }
    Ok(missing)
}

/// REPLICATION on the new server, which a role without it lacks: the reverse slot is made
/// there (forward), and a rollback advances the forward slot there.
fn replication_slot(needs: &Needs<'_>, new_role: &Role) -> Missing {
    Missing {
        for_rollback: false,
        database: None,
        server: needs.new.0,
        needed_for: if needs.forward {
            format!("create the reverse replication slot {REVERSE}")
        } else {
            "advance the forward replication slot".into()
        },
        grant: format!(
            "ALTER ROLE {} REPLICATION (on RDS: GRANT rds_replication TO {})",
            quoted(new_role),
            quoted(new_role)
        ),
    }
}

/// The forward subscription on the new server, which the cutover stops and a rollback
/// restarts: only its owner may.
async fn subscription_owner(
    needs: &Needs<'_>,
    new_role: &Role,
    qt: Duration,
) -> Result<Option<Missing>, PgError> {
    let (new_name, new) = needs.new;
    let Some(sub) = needs.subscription else {
        return Ok(None);
    };
    let owned = timed(
        new_name,
        "checking the subscription's owner",
        qt,
        new.query_opt(SUBSCRIPTION_OWNED, &[&sub]),
    )
    .await?;
    let Some(row) = owned.filter(|row| !row.get::<_, bool>(0)) else {
        return Ok(None);
    };
    Ok(Some(Missing {
        for_rollback: false,
        database: None,
        server: new_name,
        needed_for: format!(
            "stop and restart subscription {sub} (owned by {}; 16+ lets a non-superuser own it, and its conninfo then needs a password; before 16 only a superuser may, so run the controller as that owner)",
            row.get::<_, String>(1)
        ),
        grant: format!(
            "ALTER SUBSCRIPTION {} OWNER TO {}",
            quote_ident(sub),
            quoted(new_role)
        ),
    }))
}

/// The sequences the sync sets on the new server (`UPDATE` on each).
async fn settable_sequences(
    needs: &Needs<'_>,
    new_role: &Role,
    qt: Duration,
) -> Result<Option<Missing>, PgError> {
    let (new_name, new) = needs.new;
    let unsettable: Vec<String> = timed(
        new_name,
        "checking the sequences' grants",
        qt,
        new.query(SEQUENCES_NOT_SETTABLE, &[&needs.sequences]),
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect();
    Ok((!unsettable.is_empty()).then(|| Missing {
        for_rollback: false,
        database: None,
        server: new_name,
        needed_for: format!(
            "set {} sequence(s) to the old server's values",
            unsettable.len()
        ),
        grant: format!(
            "GRANT UPDATE ON SEQUENCE {} TO {}",
            unsettable.join(", "),
            quoted(new_role)
        ),
    }))
}

/// `CREATE` on the new server's database, where the reverse publication is made.
async fn create_on_new_database(
    needs: &Needs<'_>,
    new_role: &Role,
    qt: Duration,
) -> Result<Option<Missing>, PgError> {
    let (new_name, new) = needs.new;
    let can_create: bool = timed(
        new_name,
        "checking CREATE on the database",
        qt,
        new.query_one(CAN_CREATE_HERE, &[]),
    )
    .await?
    .get(0);
    Ok((!can_create).then(|| Missing {
        for_rollback: true,
        database: None,
        server: new_name,
        needed_for: format!("create the reverse publication {REVERSE} (for a lossless rollback)"),
        grant: format!(
            "GRANT CREATE ON DATABASE {} TO {}",
            quote_ident(needs.database.unwrap_or("<database>")),
            quoted(new_role)
        ),
    }))
}

/// The tables the reverse publication lists, on the new server: only their owner may
/// publish them.
async fn table_owners(
    needs: &Needs<'_>,
    new_role: &Role,
    qt: Duration,
) -> Result<Option<Missing>, PgError> {
    let (new_name, new) = needs.new;
    let not_owned: Vec<String> = timed(
        new_name,
        "checking the tables' owners",
        qt,
        new.query(NOT_OWNED, &[&needs.tables]),
    )
    .await?
    .iter()
    .map(|r| r.get(0))
    .collect();
    Ok((!not_owned.is_empty()).then(|| Missing {
        for_rollback: false,
        database: None,
        server: new_name,
        needed_for: format!(
            "publish {} table(s) back to the old server for a lossless rollback: {}",
            not_owned.len(),
            not_owned.join(", ")
        ),
        grant: not_owned
            .iter()
            .map(|t| format!("ALTER TABLE {t} OWNER TO {}", quoted(new_role)))
            .collect::<Vec<_>>()
            .join("; "),
    }))
}

/// Creating the reverse subscription on the old server: `pg_create_subscription` and
/// `CREATE` on the database from 16, superuser before.
async fn reverse_subscription(
    needs: &Needs<'_>,
    old_role: &Role,
    qt: Duration,
) -> Result<Option<Missing>, PgError> {
    let (old_name, old) = needs.old;
    let row = timed(
        old_name,
        "checking the subscription grants",
        qt,
        old.query_one(CAN_SUBSCRIBE, &[]),
    )
    .await?;
    let (v16, member, create, database): (bool, bool, bool, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let what = format!("create the reverse subscription {REVERSE} (for a lossless rollback)");
    if !v16 {
        return Ok(Some(Missing {
            for_rollback: true,
            database: None,
            server: old_name,
            needed_for: what,
            grant: format!(
                "ALTER ROLE {} SUPERUSER (before PostgreSQL 16 only a superuser may create a subscription)",
                quoted(old_role)
            ),
        }));
    }
    let mut grants = Vec::new();
    if !member {
        grants.push(format!(
            "GRANT pg_create_subscription TO {}",
            quoted(old_role)
        ));
    }
    if !create {
        grants.push(format!(
            "GRANT CREATE ON DATABASE {} TO {}",
            quote_ident(&database),
            quoted(old_role)
        ));
    }
    Ok((!grants.is_empty()).then(|| Missing {
        for_rollback: true,
        database: None,
        server: old_name,
        needed_for: what,
        grant: grants.join("; "),
    }))
}

/// Everything but the cluster's own grants (the fence's roles, REPLICATION) is of the
/// database the sessions are in.
fn name_the_database(missing: &mut [Missing], database: Option<&str>) {
    for m in missing {
        let cluster_wide =
            m.grant.starts_with("GRANT pg_read_all_stats") || m.grant.starts_with("ALTER ROLE");
        if !cluster_wide {
            m.database = database.map(str::to_owned);
        }
    }
}
