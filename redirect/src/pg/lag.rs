//! Replication lag, in bytes and in time, with the health of the replication itself, for
//! every database the replication carries.
//!
//! Logical replication is per database: each database has its own subscription on the new
//! server and its own slot on the old one, so each has its own lag. The catalogs that say
//! where each stands are shared by the whole cluster (`pg_subscription`,
//! `pg_stat_subscription`, `pg_replication_slots`, `pg_stat_replication`), so one session to
//! each server reads every database's lag in three queries, however many databases there are.
//! Physical replication is one stream for the whole cluster.
//!
//! Like pgdog's `LsnMonitor`: persistent sessions, every query under a timeout, SQL in named
//! constants, and the go/no-go decision as a pure function.

use std::{collections::BTreeMap, time::Duration};

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::{Lsn, PgError, Server, parse_lsn_of, timed};
use crate::datapath::Role;

/// How the target is kept in sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Replication {
    /// A publication on the source, a subscription on the target (one pair per database).
    Logical,
    /// Streaming replication; the flip promotes the target.
    Physical,
}

/// The source's current WAL write position.
pub const SOURCE_LSN: &str = "SELECT pg_current_wal_lsn()::text";
/// The subscription's slot on the source: active, and how far the subscriber confirmed.
pub const SLOT: &str =
    "SELECT active, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1";
/// The subscription on the target, in the session's database: enabled, apply worker
/// running, its slot. (`pg_subscription` is shared by every database of the cluster, and
/// two databases may each have a subscription of the same name.)
pub const SUBSCRIPTION: &str = "SELECT s.subenabled, EXISTS (SELECT 1 FROM pg_stat_subscription st \
     WHERE st.subid = s.oid AND st.relid IS NULL AND st.pid IS NOT NULL), s.subslotname::text \
     FROM pg_subscription s WHERE s.subname = $1 \
     AND s.subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())";
/// Every subscription of the session's database (to pick the only one when none is named).
pub const SUBSCRIPTIONS: &str = "SELECT subname::text FROM pg_subscription \
     WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
     AND subname <> 'redirect_reverse' AND subname NOT LIKE 'redirect\\_probe%'";
/// Every subscription of the cluster, with its database: enabled, apply worker running, slot.
pub const CLUSTER_SUBSCRIPTIONS: &str = "SELECT d.datname::text, s.subname::text, s.subenabled, \
     EXISTS (SELECT 1 FROM pg_stat_subscription st WHERE st.subid = s.oid AND st.relid IS NULL AND st.pid IS NOT NULL), \
     s.subslotname::text FROM pg_subscription s JOIN pg_database d ON d.oid = s.subdbid ORDER BY 1, 2";
/// The named slots on the source: active, confirmed position, and the replay lag of the
/// walsender streaming from each (joined by pid: two databases' subscriptions may share an
/// `application_name`).
pub const SLOTS: &str = "SELECT sl.slot_name::text, sl.active, sl.confirmed_flush_lsn::text, \
     EXTRACT(epoch FROM coalesce(r.replay_lag, interval '0'))::float8, sl.slot_type::text, sl.database::text \
     FROM pg_replication_slots sl LEFT JOIN pg_stat_replication r ON r.pid = sl.active_pid \
     WHERE sl.slot_name = ANY($1)";
/// A physical standby's state.
pub const STANDBY: &str = "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text";
/// Every physical walsender on the source (not the logical ones: a subscriber's walsender
/// says nothing of the standby).
pub const PHYSICAL_SENDERS: &str = "SELECT r.application_name, r.replay_lsn::text, \
     EXTRACT(epoch FROM coalesce(r.replay_lag, interval '0'))::float8 FROM pg_stat_replication r \
     WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots s WHERE s.active_pid = r.pid AND s.slot_type = 'logical')";
/// The name of the reverse subscription in each database (see `cutover::REVERSE`).
const REVERSE: &str = "redirect_reverse";

/// Lag and health at one instant: the worst of every database's.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ReplicaLag {
    pub replication: Replication,
    /// WAL the target has not confirmed (logical) or replayed (physical) yet: the largest of
    /// any database. `None` (JSON `null`): some database's position is unknown.
    pub bytes: Option<u64>,
    /// How long ago the last confirmed change was written (`pg_stat_replication.replay_lag`),
    /// the largest of any database.
    pub seconds: f64,
    pub source_lsn: Lsn,
    pub healthy: bool,
    /// What is wrong, when not healthy (each naming its database).
    pub problems: Vec<String>,
    /// Logical: each replicated database's own lag, by name. Physical: empty (one stream).
    #[serde(default)]
    pub databases: Vec<DatabaseLag>,
}

/// One database's logical replication at one instant.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DatabaseLag {
    pub database: String,
    /// Its subscription on the new server, once found.
    pub subscription: Option<String>,
    /// That subscription's slot on the old server.
    pub slot: Option<String>,
    /// `None`: unknown (no slot, or one that never confirmed anything).
    pub bytes: Option<u64>,
    pub seconds: f64,
    pub healthy: bool,
    pub problems: Vec<String>,
}

/// Which replication to watch.
#[derive(Clone, Debug)]
pub struct Watch {
    pub replication: Replication,
    /// Logical, forward: the subscription named for the DSN's database (`--subscription NAME`,
    /// or remembered from the journal); otherwise the only one there.
    pub subscription: Option<String>,
    /// Logical: subscriptions named per database (`--subscription DB=NAME`).
    pub named: BTreeMap<String, String>,
    /// The database the DSNs name.
    pub home: String,
    /// Logical: the reverse replication (`redirect_reverse` in each database), not the
    /// forward one.
    pub reverse: bool,
    /// Which databases the cutover covers.
    pub scope: Scope,
}

impl Watch {
    /// A watch of the DSN's database only, through `subscription` (or the only one there).
    #[must_use]
    pub fn one(replication: Replication, subscription: Option<String>) -> Self {
        Self {
            replication,
            subscription,
            named: BTreeMap::new(),
            home: String::new(),
            reverse: false,
            scope: Scope::default(),
        }
    }

    /// The subscription named for `database`, if any.
    #[must_use]
    pub fn named_for(&self, database: &str) -> Option<&str> {
        if self.reverse {
            return Some(REVERSE);
        }
        self.named
            .get(database)
            .map(String::as_str)
            .or(if database == self.home {
                self.subscription.as_deref()
            } else {
                None
            })
    }
}

/// `--databases` and `--exclude-databases`: which databases a cutover covers. Empty `only`
/// means every connectable database.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    pub only: Vec<String>,
    pub exclude: Vec<String>,
}

impl Scope {
    #[must_use]
    pub fn covers(&self, database: &str) -> bool {
        (self.only.is_empty() || self.only.iter().any(|d| d == database))
            && !self.exclude.iter().any(|d| d == database)
    }
}

/// A subscription as the cluster catalog shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionRow {
    pub database: String,
    pub name: String,
    pub enabled: bool,
    pub running: bool,
    pub slot: Option<String>,
}

/// Whether a subscription is one this tool makes for itself (never a forward one).
#[must_use]
pub fn is_ours(name: &str) -> bool {
    name == REVERSE || name.starts_with("redirect_probe")
}

/// Each covered database's subscription, chosen from every subscription of the cluster: the
/// one named for it, else its only one. `Err` says why none can be chosen.
#[must_use]
pub fn choose(
    rows: &[SubscriptionRow],
    watch: &Watch,
) -> BTreeMap<String, Result<SubscriptionRow, String>> {
    let mut by_db: BTreeMap<String, Vec<&SubscriptionRow>> = BTreeMap::new();
    for r in rows.iter().filter(|r| watch.scope.covers(&r.database)) {
        by_db.entry(r.database.clone()).or_default().push(r);
    }
    let mut named: Vec<String> = watch.named.keys().cloned().collect();
    if watch.subscription.is_some() && !watch.reverse {
        named.push(watch.home.clone());
    }
    for db in named.into_iter().filter(|d| watch.scope.covers(d)) {
        by_db.entry(db).or_default();
    }
    by_db
        .into_iter()
        .filter_map(|(db, subs)| {
            let chosen = if let Some(name) = watch.named_for(&db) {
                let others: Vec<&str> = subs
                    .iter()
                    .filter(|s| s.name != name && s.enabled && !is_ours(&s.name))
                    .map(|s| s.name.as_str())
                    .collect();
                match subs.iter().find(|s| s.name == name) {
                    // Another enabled subscription carries part of this database too: the
                    // barrier and the stop at the cutover would cover only one of them.
                    Some(_) if !watch.reverse && !others.is_empty() => Err(format!(
                        "database {db:?} has other enabled subscriptions besides {name:?} ({}): a cutover stops and waits for one subscription per database; merge their publications into one subscription, or disable the ones not in use",
                        others.join(", ")
                    )),
                    Some(s) => Ok((*s).clone()),
                    // The reverse subscription exists only where a cutover made it: a
                    // database without one is not part of the reverse replication.
                    None if watch.reverse => return None,
                    None => Err(format!(
                        "subscription {name:?} does not exist in database {db:?} on the new server"
                    )),
                }
            } else {
                let forward: Vec<&&SubscriptionRow> =
                    subs.iter().filter(|s| !is_ours(&s.name)).collect();
                match forward.as_slice() {
                    [] => return None,
                    [one] => Ok((**one).clone()),
                    several => Err(format!(
                        "database {db:?} has {} subscriptions ({}): name the one that carries it with --subscription {db}=NAME",
                        several.len(),
                        several.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
                    )),
                }
            };
            Some((db, chosen))
        })
        .collect()
}

/// Reads every subscription of the cluster over `db` (any database's session).
pub async fn cluster_subscriptions(
    db: &Client,
    which: impl Into<Server>,
    timeout: Duration,
) -> Result<Vec<SubscriptionRow>, PgError> {
    let which: Server = which.into();
    Ok(timed(
        which,
        "listing the cluster's subscriptions",
        timeout,
        db.query(CLUSTER_SUBSCRIPTIONS, &[]),
    )
    .await?
    .iter()
    .map(|r| SubscriptionRow {
        database: r.get(0),
        name: r.get(1),
        enabled: r.get(2),
        running: r.get(3),
        slot: r.get(4),
    })
    .collect())
}

/// A slot on the publisher, as [`SLOTS`] reads it.
struct SlotRow {
    active: bool,
    confirmed: Option<Lsn>,
    seconds: f64,
    /// `logical`, and the publisher's database it decodes.
    logical_in: Option<String>,
}

/// Reads lag once over the two sessions (each to any database of its server).
pub async fn measure(
    source: &Client,
    target: &Client,
    watch: &Watch,
    timeout: Duration,
) -> Result<ReplicaLag, PgError> {
    let src_lsn: String = timed(
        Role::Source,
        "reading the WAL position",
        timeout,
        source.query_one(SOURCE_LSN, &[]),
    )
    .await?
    .get(0);
    let current = parse_lsn_of(Role::Source, "pg_current_wal_lsn()", &src_lsn)?;
    let lag = match watch.replication {
        Replication::Logical => logical_lag(source, target, watch, timeout, current).await?,
        Replication::Physical => physical_lag(source, target, timeout, current).await?,
    };
    Ok(lag)
}

/// Logical lag: each covered database's subscription on the target against its slot on the
/// source, `current` being the source's WAL position.
async fn logical_lag(
    source: &Client,
    target: &Client,
    watch: &Watch,
    timeout: Duration,
    current: Lsn,
) -> Result<ReplicaLag, PgError> {
    let subscriptions = cluster_subscriptions(target, Role::Target, timeout).await?;
    let chosen = choose(&subscriptions, watch);
    let slot_names: Vec<String> = chosen
        .values()
        .filter_map(|c| c.as_ref().ok())
        .map(|s| s.slot.clone().unwrap_or_else(|| s.name.clone()))
        .collect();
    let slots = read_slots(source, &slot_names, timeout).await?;
    let mut databases: Vec<DatabaseLag> = chosen
        .into_iter()
        .map(|(db, c)| database_lag(db, c, &slots, current))
        .collect();
    if watch.reverse {
        add_missing_reverse(source, watch, timeout, &mut databases).await?;
    }
    Ok(combine(
        Replication::Logical,
        current,
        databases,
        watch.reverse,
    ))
}

/// The source's slots named `slot_names`, by name.
async fn read_slots(
    source: &Client,
    slot_names: &[String],
    timeout: Duration,
) -> Result<BTreeMap<String, SlotRow>, PgError> {
    let mut slots = BTreeMap::new();
    for r in timed(
        Role::Source,
        "reading the slots",
        timeout,
        source.query(SLOTS, &[&slot_names]),
    )
    .await?
    {
        // NULL (the slot never confirmed anything) is an unknown lag; text that is
        // not an LSN is an error, never a zero.
        let confirmed = r
            .get::<_, Option<String>>(2)
            .map(|s| parse_lsn_of(Role::Source, "pg_replication_slots.confirmed_flush_lsn", &s))
            .transpose()?;
        slots.insert(
            r.get::<_, String>(0),
            SlotRow {
                active: r.get(1),
                confirmed,
                seconds: r.get::<_, Option<f64>>(3).unwrap_or(0.0),
                logical_in: (r.get::<_, String>(4) == "logical")
                    .then(|| r.get::<_, Option<String>>(5))
                    .flatten(),
            },
        );
    }
    Ok(slots)
}

/// Reverse replication: every database the forward replication carried needs its way back:
/// one without it would lose its writes on the new primary in a rollback. Adds each such
/// database that has no reverse subscription, as a problem, and sorts them by name.
async fn add_missing_reverse(
    source: &Client,
    watch: &Watch,
    timeout: Duration,
    databases: &mut Vec<DatabaseLag>,
) -> Result<(), PgError> {
    let forward = cluster_subscriptions(source, Role::Source, timeout).await?;
    for db in forward
        .iter()
        .filter(|s| !is_ours(&s.name) && watch.scope.covers(&s.database))
        .map(|s| s.database.clone())
        .collect::<std::collections::BTreeSet<_>>()
    {
        if !databases.iter().any(|d| d.database == db) {
            databases.push(DatabaseLag {
                problems: vec![format!(
                    "database {db:?} has no reverse subscription {REVERSE}"
                )],
                ..DatabaseLag::unknown(db)
            });
        }
    }
    databases.sort_by(|a, b| a.database.cmp(&b.database));
    Ok(())
}

/// Physical lag: the standby's replayed position against `current`, the source's, and
/// whether it streams at all.
async fn physical_lag(
    source: &Client,
    target: &Client,
    timeout: Duration,
    current: Lsn,
) -> Result<ReplicaLag, PgError> {
    let row = timed(
        Role::Target,
        "reading the standby state",
        timeout,
        target.query_one(STANDBY, &[]),
    )
    .await?;
    let mut problems = Vec::new();
    let in_recovery: bool = row.get(0);
    if !in_recovery {
        problems.push("the target is not a standby (pg_is_in_recovery() is false)".into());
    }
    let replayed = row
        .get::<_, Option<String>>(1)
        .map(|s| parse_lsn_of(Role::Target, "pg_last_wal_replay_lsn()", &s))
        .transpose()?;
    let senders = timed(
        Role::Source,
        "reading pg_stat_replication",
        timeout,
        source.query(PHYSICAL_SENDERS, &[]),
    )
    .await?;
    if senders.is_empty() {
        problems.push("no walsender on the source: the standby is not streaming".into());
    }
    let seconds = senders
        .first()
        .map_or(0.0, |r| r.get::<_, Option<f64>>(2).unwrap_or(0.0));
    Ok(ReplicaLag {
        replication: Replication::Physical,
        bytes: lag_bytes(current, replayed),
        seconds,
        source_lsn: current,
        healthy: problems.is_empty(),
        problems,
        databases: Vec::new(),
    })
}

impl DatabaseLag {
    /// A database whose replication could not be found.
    #[must_use]
    pub fn unknown(database: String) -> Self {
        Self {
            database,
            subscription: None,
            slot: None,
            bytes: None,
            seconds: 0.0,
            healthy: false,
            problems: Vec::new(),
        }
    }
}

/// One database's lag from its chosen subscription and the publisher's slots.
fn database_lag(
    database: String,
    chosen: Result<SubscriptionRow, String>,
    slots: &BTreeMap<String, SlotRow>,
    current: Lsn,
) -> DatabaseLag {
    let sub = match chosen {
        Ok(s) => s,
        Err(why) => {
            return DatabaseLag {
                problems: vec![why],
                ..DatabaseLag::unknown(database)
            };
        }
    };
    let mut problems = Vec::new();
    if !sub.enabled {
        problems.push(format!("subscription {:?} is disabled", sub.name));
    }
    if !sub.running {
        problems.push(format!(
            "subscription {:?} has no apply worker running",
            sub.name
        ));
    }
    let slot_name = sub.slot.clone().unwrap_or_else(|| sub.name.clone());
    let (bytes, seconds) = match slots.get(&slot_name) {
        None => {
            problems.push(format!(
                "replication slot {slot_name:?} does not exist on the source"
            ));
            (None, 0.0)
        }
        Some(slot) => {
            if !slot.active {
                problems.push(format!("replication slot {slot_name:?} is not active"));
            }
            // A cutover carries each database to the database of the same name: a slot of
            // another database (or a physical one) does not carry this one.
            match &slot.logical_in {
                Some(d) if *d == database => {}
                Some(d) => problems.push(format!(
                    "subscription {:?} streams database {d:?} of the source, not {database:?}: redirect cuts each database over to the one of the same name",
                    sub.name
                )),
                None => problems.push(format!(
                    "replication slot {slot_name:?} is not a logical slot"
                )),
            }
            (lag_bytes(current, slot.confirmed), slot.seconds)
        }
    };
    DatabaseLag {
        database,
        subscription: Some(sub.name),
        slot: Some(slot_name),
        bytes,
        seconds,
        healthy: problems.is_empty(),
        problems,
    }
}

/// The cluster's lag: the worst database's bytes and seconds, healthy only if every one is
/// (and there is at least one).
#[must_use]
pub fn combine(
    replication: Replication,
    source_lsn: Lsn,
    databases: Vec<DatabaseLag>,
    reverse: bool,
) -> ReplicaLag {
    let mut problems: Vec<String> = databases
        .iter()
        .flat_map(|d| {
            d.problems
                .iter()
                .map(move |p| format!("{}: {p}", d.database))
        })
        .collect();
    if databases.is_empty() {
        problems.push(if reverse {
            format!("no reverse subscription {REVERSE} in any database")
        } else {
            "no subscription on the target carries any database (create one, or name it with --subscription)".to_owned()
        });
    }
    let bytes = if databases.is_empty() {
        None
    } else {
        databases
            .iter()
            .map(|d| d.bytes)
            .collect::<Option<Vec<u64>>>()
            .map(|b| b.into_iter().max().unwrap_or(0))
    };
    ReplicaLag {
        replication,
        bytes,
        seconds: databases.iter().map(|d| d.seconds).fold(0.0, f64::max),
        source_lsn,
        healthy: problems.is_empty(),
        problems,
        databases,
    }
}

/// WAL the replica has not reached: `None` (never passes the gate) when its position is
/// unknown, 0 when it was read after `current` and has passed it.
#[must_use]
pub fn lag_bytes(current: Lsn, replica: Option<Lsn>) -> Option<u64> {
    replica.map(|r| current.saturating_sub(r))
}

/// The subscription to watch in the session's database: the named one, or the only one.
pub async fn subscription_name(
    target: &Client,
    watch: &Watch,
    timeout: Duration,
) -> Result<String, PgError> {
    if let Some(s) = &watch.subscription {
        return Ok(s.clone());
    }
    let rows = timed(
        Role::Target,
        "listing subscriptions",
        timeout,
        target.query(SUBSCRIPTIONS, &[]),
    )
    .await?;
    Ok(match rows.as_slice() {
        [one] => one.get(0),
        _ => String::from("(name it with --subscription)"),
    })
}

/// Why the lag gate holds a cutover back.
#[derive(Clone, Debug, PartialEq)]
pub enum Refusal {
    /// Replication is broken: waiting will not mend it.
    Unhealthy(Vec<String>),
    /// A replica's position cannot be read: never taken as zero.
    Unknown,
    /// Healthy but behind by more than `--max-lag`: in these databases.
    TooManyBytes {
        bytes: u64,
        max_bytes: u64,
        databases: Vec<String>,
    },
    /// Healthy but behind by more than `--max-lag-time`.
    TooLong { seconds: f64, max: Duration },
}

impl Refusal {
    /// Whether a healthy replica catching up could clear it: a cutover right after a
    /// rollback finds the forward slot re-decoding from its restart point, behind for a
    /// few seconds, and an operator retrying by hand would only be waiting for that.
    #[must_use]
    pub fn is_catching_up(&self) -> bool {
        matches!(self, Self::TooManyBytes { .. } | Self::TooLong { .. })
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unhealthy(problems) => {
                write!(f, "replication is not healthy: {}", problems.join("; "))
            }
            Self::Unknown => f.write_str("lag is unknown (a replica's position cannot be read)"),
            Self::TooManyBytes {
                bytes,
                max_bytes,
                databases,
            } => {
                write!(f, "lag is {bytes} bytes, above --max-lag {max_bytes} bytes")?;
                if !databases.is_empty() {
                    write!(f, " (database {})", databases.join(", "))?;
                }
                Ok(())
            }
            Self::TooLong { seconds, max } => {
                write!(f, "lag is {seconds:.3}s, above --max-lag-time {max:?}")
            }
        }
    }
}

/// Whether a cutover may start: replication healthy and lag within both limits, in every
/// database.
pub fn gate(lag: &ReplicaLag, max_bytes: u64, max_time: Duration) -> Result<(), Refusal> {
    if !lag.healthy {
        return Err(Refusal::Unhealthy(lag.problems.clone()));
    }
    let Some(bytes) = lag.bytes else {
        return Err(Refusal::Unknown);
    };
    if bytes > max_bytes {
        return Err(Refusal::TooManyBytes {
            bytes,
            max_bytes,
            databases: lag
                .databases
                .iter()
                .filter(|d| d.bytes.is_some_and(|b| b > max_bytes))
                .map(|d| d.database.clone())
                .collect(),
        });
    }
    if lag.seconds > max_time.as_secs_f64() {
        return Err(Refusal::TooLong {
            seconds: lag.seconds,
            max: max_time,
        });
    }
    Ok(())
}

impl ReplicaLag {
    /// How `lag` and `status` print it: the cluster's line, then one per database when
    /// there are several (or any is unhealthy).
    #[must_use]
    pub fn lines(&self) -> Vec<String> {
        let health = |healthy: bool, problems: &[String]| {
            if healthy {
                "healthy".to_owned()
            } else {
                format!("UNHEALTHY: {}", problems.join("; "))
            }
        };
        let what = match self.replication {
            Replication::Logical => format!("logical, {} database(s)", self.databases.len()),
            Replication::Physical => "physical".to_owned(),
        };
        let mut out = vec![format!(
            "{} bytes, {:.3} s, source at {} ({what}; {})",
            bytes_text(self.bytes),
            self.seconds,
            self.source_lsn,
            health(self.healthy, &self.problems)
        )];
        if self.databases.len() > 1 || self.databases.iter().any(|d| !d.healthy) {
            for d in &self.databases {
                out.push(format!(
                    "  {:<20} {} bytes, {:.3} s, subscription {} ({})",
                    d.database,
                    bytes_text(d.bytes),
                    d.seconds,
                    d.subscription.as_deref().unwrap_or("unknown"),
                    health(d.healthy, &d.problems)
                ));
            }
        }
        out
    }
}

/// How a lag in bytes reads: the number, or `unknown`.
#[must_use]
pub fn bytes_text(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "unknown".to_owned(), |b| b.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lag(bytes: Option<u64>, seconds: f64, healthy: bool) -> ReplicaLag {
        ReplicaLag {
            replication: Replication::Logical,
            bytes,
            seconds,
            source_lsn: Lsn(0),
            healthy,
            problems: if healthy {
                vec![]
            } else {
                vec!["slot inactive".into()]
            },
            databases: Vec::new(),
        }
    }

    fn sub(db: &str, name: &str) -> SubscriptionRow {
        SubscriptionRow {
            database: db.into(),
            name: name.into(),
            enabled: true,
            running: true,
            slot: Some(name.into()),
        }
    }

    fn watch() -> Watch {
        Watch {
            home: "postgres".into(),
            ..Watch::one(Replication::Logical, None)
        }
    }

    #[test]
    fn lag_bytes_from_lsns() {
        let at = |s: &str| s.parse::<Lsn>().unwrap();
        assert_eq!(lag_bytes(at("1/0"), Some(at("0/FFFFFF00"))), Some(0x100));
        assert_eq!(
            lag_bytes(at("16/B374D848"), Some(at("16/B374D848"))),
            Some(0)
        );
        assert_eq!(
            lag_bytes(at("0/10"), Some(at("0/20"))),
            Some(0),
            "a replica position read later may be ahead"
        );
        assert_eq!(lag_bytes(at("0/0"), None), None, "unknown is not zero");
    }

    #[test]
    fn the_gate_needs_health_and_both_limits() {
        let max = Duration::from_secs(5);
        assert!(gate(&lag(Some(100), 0.1, true), 1 << 20, max).is_ok());
        assert!(
            gate(&lag(Some(1 << 20), 0.1, true), 1 << 20, max).is_ok(),
            "the limit is inclusive"
        );
        assert!(
            gate(&lag(Some((1 << 20) + 1), 0.1, true), 1 << 20, max)
                .unwrap_err()
                .to_string()
                .contains("above --max-lag")
        );
        assert!(
            gate(&lag(Some(0), 6.0, true), 1 << 20, max)
                .unwrap_err()
                .to_string()
                .contains("--max-lag-time")
        );
        assert!(
            gate(&lag(Some(0), 0.0, false), 1 << 20, max)
                .unwrap_err()
                .to_string()
                .contains("slot inactive")
        );
        assert!(
            gate(&lag(None, 0.0, true), 1 << 20, max)
                .unwrap_err()
                .to_string()
                .contains("unknown"),
            "unknown lag never passes"
        );
        // Only a healthy replica that is behind is worth waiting for.
        let behind = |l: &ReplicaLag| gate(l, 1 << 20, max).unwrap_err().is_catching_up();
        assert!(behind(&lag(Some((1 << 20) + 1), 0.1, true)));
        assert!(behind(&lag(Some(0), 6.0, true)));
        assert!(!behind(&lag(Some((1 << 20) + 1), 0.1, false)));
        assert!(!behind(&lag(None, 0.0, true)));
    }

    #[test]
    fn each_database_gets_its_only_subscription() {
        let rows = [
            sub("app2", "app2_sub"),
            sub("postgres", "main_sub"),
            sub("postgres", REVERSE),
        ];
        let chosen = choose(&rows, &watch());
        assert_eq!(chosen.len(), 2);
        assert_eq!(chosen["app2"].as_ref().unwrap().name, "app2_sub");
        assert_eq!(
            chosen["postgres"].as_ref().unwrap().name,
            "main_sub",
            "the reverse subscription is never a forward one"
        );
    }

    #[test]
    fn several_subscriptions_in_one_database_must_be_named() {
        let rows = [sub("app2", "a"), sub("app2", "b"), sub("postgres", "main")];
        let chosen = choose(&rows, &watch());
        let why = chosen["app2"].as_ref().unwrap_err();
        assert!(why.contains("--subscription app2=NAME"), "{why}");
        assert!(
            chosen["postgres"].is_ok(),
            "the other database is unaffected"
        );
        let mut named = watch();
        named.named.insert("app2".into(), "b".into());
        let why = choose(&rows, &named)["app2"].clone().unwrap_err();
        assert!(
            why.contains("other enabled subscriptions besides \"b\" (a)"),
            "naming one leaves the other unprotected: {why}"
        );
        let mut rows = rows.to_vec();
        rows[0].enabled = false;
        assert_eq!(
            choose(&rows, &named)["app2"].as_ref().unwrap().name,
            "b",
            "a disabled one carries nothing"
        );
    }

    #[test]
    fn a_named_subscription_that_does_not_exist_is_said() {
        let rows = [sub("postgres", "main")];
        let mut w = watch();
        w.subscription = Some("gone".into());
        let why = choose(&rows, &w)["postgres"].clone().unwrap_err();
        assert!(
            why.contains("\"gone\" does not exist in database \"postgres\""),
            "{why}"
        );
    }

    #[test]
    fn the_scope_leaves_databases_out() {
        let rows = [
            sub("app2", "a"),
            sub("postgres", "main"),
            sub("scratch", "s"),
        ];
        let mut w = watch();
        w.scope.exclude = vec!["scratch".into()];
        assert_eq!(
            choose(&rows, &w).keys().cloned().collect::<Vec<_>>(),
            ["app2", "postgres"]
        );
        w.scope = Scope {
            only: vec!["app2".into()],
            exclude: vec![],
        };
        assert_eq!(
            choose(&rows, &w).keys().cloned().collect::<Vec<_>>(),
            ["app2"]
        );
    }

    #[test]
    fn the_reverse_watch_takes_each_databases_reverse_subscription() {
        let rows = [
            sub("app2", REVERSE),
            sub("postgres", REVERSE),
            sub("postgres", "x"),
        ];
        let w = Watch {
            reverse: true,
            ..watch()
        };
        let chosen = choose(&rows, &w);
        assert!(chosen.values().all(|c| c.as_ref().unwrap().name == REVERSE));
        assert_eq!(chosen.len(), 2);
    }

    #[test]
    fn the_cluster_lag_is_the_worst_database_and_unknown_if_any_is() {
        let db = |name: &str, bytes: Option<u64>, seconds: f64| DatabaseLag {
            database: name.into(),
            subscription: Some("s".into()),
            slot: Some("s".into()),
            bytes,
            seconds,
            healthy: true,
            problems: vec![],
        };
        let l = combine(
            Replication::Logical,
            Lsn(0),
            vec![db("a", Some(10), 0.5), db("b", Some(300), 0.1)],
            false,
        );
        assert_eq!((l.bytes, l.seconds, l.healthy), (Some(300), 0.5, true));
        let l = combine(
            Replication::Logical,
            Lsn(0),
            vec![db("a", Some(10), 0.0), db("b", None, 0.0)],
            false,
        );
        assert_eq!(l.bytes, None);
        let l = combine(Replication::Logical, Lsn(0), vec![], false);
        assert!(
            !l.healthy && l.bytes.is_none(),
            "no database is not zero lag"
        );
        let mut sick = db("b", Some(0), 0.0);
        sick.healthy = false;
        sick.problems = vec!["subscription \"s\" is disabled".into()];
        let l = combine(
            Replication::Logical,
            Lsn(0),
            vec![db("a", Some(0), 0.0), sick],
            false,
        );
        assert_eq!(l.problems, ["b: subscription \"s\" is disabled"]);
        assert!(!l.healthy);
        assert_eq!(
            serde_json::to_value(combine(
                Replication::Logical,
                Lsn(0),
                vec![db("a", None, 0.0)],
                false
            ))
            .unwrap()["bytes"],
            serde_json::Value::Null,
            "unknown is null in JSON, never 2^64-1"
        );
    }
}
