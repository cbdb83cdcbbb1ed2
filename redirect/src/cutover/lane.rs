//! One database of a cutover.
//!
//! A flip moves every database's clients at once, but logical replication is per database:
//! each database has its own subscription, slot and publication, its own sequences and its
//! own barrier table. So a cutover runs the database-side steps (barrier, sequences,
//! replication turned around, undo) once per *lane*, each over its own sessions, while the
//! cluster-wide steps (hold, fence, flip, drain) run once, over the run's sessions to the
//! DSNs' database: `pg_stat_activity`, `pg_terminate_backend` and the WAL are the cluster's.

use std::time::Duration;

use tokio_postgres::Client;

use super::{CutoverError, REVERSE};
use crate::pg::Server;
use crate::{
    datapath::Role,
    pg::{Dsn, timed},
};

/// One replicated database in a cutover, with its own sessions and replication.
pub struct Lane {
    pub database: String,
    /// Sessions to this database on the old and the new server.
    pub from_db: Client,
    pub to_db: Client,
    /// The subscription (on the new server) that carries this database, and its slot (on
    /// the old one).
    pub subscription: Option<String>,
    pub slot: Option<String>,
    /// This database's reverse slot, on the target ([`reverse_slot`]).
    pub reverse_slot: String,
    /// Rollback: the source's LSN once this database's reverse apply stopped.
    pub rollback_point: Option<crate::pg::Lsn>,
    /// The reverse slot exists on the new server (forward cutover).
    pub reverse_slot_made: bool,
    /// The reverse subscription was made before the hold (both servers 16+).
    pub reverse_ready: bool,
    /// The reverse slot is a failover slot: what the report says about it.
    pub reverse_failover: Option<String>,
    /// Undo: the subscription was (or may have been) disabled, on the new server.
    pub disabled_subscription: bool,
    /// Undo: the reverse slot was (or may have been) created on the target.
    pub made_reverse_slot: bool,
}

impl Lane {
    /// Opens a lane for `database`: a session to it on each server, statements bounded by
    /// `qt` on the server side too.
    pub async fn open(
        database: &str,
        from: &Dsn,
        to: &Dsn,
        home: &str,
        subscription: Option<String>,
        slot: Option<String>,
        qt: Duration,
    ) -> Result<Self, CutoverError> {
        let from_db = from.for_database(database).connect().await?;
        let to_db = to.for_database(database).connect().await?;
        let bound = format!("SET statement_timeout = {}", qt.as_millis().max(1));
        for (which, c) in [(Server::Old, &from_db), (Server::New, &to_db)] {
            timed(which, "bounding statements", qt, c.batch_execute(&bound)).await?;
        }
        Ok(Self {
            database: database.to_owned(),
            from_db,
            to_db,
            subscription,
            slot,
            reverse_slot: reverse_slot(database, home),
            rollback_point: None,
            reverse_slot_made: false,
            reverse_ready: false,
            reverse_failover: None,
            disabled_subscription: false,
            made_reverse_slot: false,
        })
    }

    /// The session for `side` (`from` is the old server).
    #[must_use]
    pub fn db(&self, side: Role, from: Role) -> &Client {
        if side == from {
            &self.from_db
        } else {
            &self.to_db
        }
    }

    /// `database postgres: ` before a message, so every finding names its database.
    #[must_use]
    pub fn prefix(&self) -> String {
        format!("database {}: ", self.database)
    }
}

/// The lanes' databases, as messages list them: `app1, app2`.
#[must_use]
pub fn names(lanes: &[Lane]) -> String {
    lanes
        .iter()
        .map(|l| l.database.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The reverse slot of `database`. Slot names are the cluster's (not per database) and allow
/// only `[a-z0-9_]` up to 63 bytes, so each database needs its own, derived the same way by
/// every controller (a successor finds it from the database's name alone). The DSNs'
/// database keeps the plain name, as before several databases were cut over.
#[must_use]
pub fn reverse_slot(database: &str, home: &str) -> String {
    if database == home {
        return REVERSE.to_owned();
    }
    let clean: String = database
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let base = format!("{REVERSE}_{clean}");
    if clean == database && base.len() <= 63 {
        return base;
    }
    // Lowercased, changed or too long: a hash of the real name keeps two databases that
    // clean to the same text apart.
    let hash = database.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let suffix = format!("_{:08x}", hash & 0xffff_ffff);
    let keep = 63 - suffix.len();
    format!("{}{suffix}", &base[..base.len().min(keep)])
}

/// `conninfo` with its `dbname` set to `database` (added if missing).
#[must_use]
pub fn conninfo_for(conninfo: &str, database: &str) -> String {
    let value = crate::pg::quote_conninfo(database);
    match crate::pg::conninfo_value(conninfo, "dbname") {
        Some(_) => {
            // Rebuilt pair by pair: a plain text replace could touch another value.
            let pairs = crate::pg::conninfo_pairs(conninfo).unwrap_or_default();
            pairs
                .into_iter()
                .map(|(k, v)| {
                    if k == "dbname" {
                        format!("dbname={value}")
                    } else {
                        format!("{k}={}", crate::pg::quote_conninfo(&v))
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        }
        None => format!("{conninfo} dbname={value}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_database_has_its_own_valid_reverse_slot() {
        assert_eq!(reverse_slot("postgres", "postgres"), REVERSE);
        assert_eq!(reverse_slot("app2", "postgres"), "redirect_reverse_app2");
        let odd = reverse_slot("Billing-EU", "postgres");
        assert!(odd.starts_with("redirect_reverse_billing_eu_"), "{odd}");
        assert_ne!(
            odd,
            reverse_slot("billing_eu", "postgres"),
            "kept apart by the hash"
        );
        let long = reverse_slot(&"x".repeat(80), "postgres");
        assert!(long.len() <= 63, "{long}");
        for name in [odd, long] {
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            );
        }
        assert_eq!(
            reverse_slot("Billing-EU", "postgres"),
            reverse_slot("Billing-EU", "postgres"),
            "the same every time, for a successor"
        );
    }

    #[test]
    fn a_conninfo_is_pointed_at_another_database() {
        assert_eq!(
            crate::pg::conninfo_value(
                &conninfo_for("host=h user=u dbname=postgres", "app2"),
                "dbname"
            )
            .as_deref(),
            Some("app2")
        );
        assert_eq!(
            crate::pg::conninfo_value(&conninfo_for("host=h user=u", "my db"), "dbname").as_deref(),
            Some("my db")
        );
        let c = conninfo_for("host=h password='a b' dbname=x", "y");
        assert_eq!(
            crate::pg::conninfo_value(&c, "password").as_deref(),
            Some("a b")
        );
    }
}
