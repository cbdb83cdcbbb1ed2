//! The consistent point of a chunk: after reading it on the primary (the server that takes
//! the writes), wait until the replica has applied everything the primary had written, then
//! read it there. Logical replication: the subscription's walsender on the primary reports
//! that the subscriber has applied (committed) that position, or its slot has confirmed it;
//! the subscriber applies commits in order. Physical: the standby replayed it.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::VerifyError;
use crate::{
    controller::Controller,
    datapath::Role,
    pg::{
        Lsn, PgError,
        lag::{self, Replication},
        parse_lsn_of, timed,
    },
};

/// The primary's WAL insert position: at or past the end of every commit it has made
/// visible (the write position can lag behind records already inserted).
const INSERT_LSN: &str = "SELECT pg_current_wal_insert_lsn()::text";
const REPLAY_LSN: &str = "SELECT pg_last_wal_replay_lsn()::text";
/// What a logical subscriber has applied: its walsender's `replay_lsn` is the end of the last
/// transaction it committed (the slot's `confirmed_flush_lsn` waits for the subscriber's own
/// WAL flush, up to `wal_writer_delay` later with its asynchronous commits), whichever is
/// further.
/// The walsender is the one serving the slot (`active_pid`), not any with the subscription's
/// `application_name`: another subscriber of that name would report its own progress.
const APPLIED_LSN: &str = "SELECT greatest(s.confirmed_flush_lsn, r.replay_lsn)::text \
     FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid \
     WHERE s.slot_name = $1";

/// How to tell what the replica has applied.
#[derive(Clone, Debug)]
enum Applied {
    /// The confirmed position of this slot on the primary (logical replication).
    Slot { subscription: String, slot: String },
    /// The standby's replay position (physical replication).
    Replay,
    /// No replication to wait for (why): the servers are compared as they are.
    Nothing(String),
}

/// The replication a verify waits on, for the current direction.
#[derive(Clone, Debug)]
pub struct CatchUp {
    /// The server taking the writes when this was discovered.
    pub primary: Role,
    applied: Applied,
}

impl CatchUp {
    /// Finds the replication that carries the active server's writes to the other one.
    pub async fn discover(
        ctl: &Controller,
        source: &Client,
        target: &Client,
        timeout: Duration,
    ) -> Result<Self, VerifyError> {
        let primary = ctl
            .active()
            .map_err(|e| VerifyError::BadRequest(e.to_string()))?;
        let replica = primary.other();
        let (pdb, rdb) = match primary {
            Role::Source => (source, target),
            Role::Target => (target, source),
        };
        let mut watch = ctl
            .watch_for(replica)
            .map_err(|e| VerifyError::BadRequest(e.to_string()))?;
        // The sessions' database's own subscription, not the DSNs' database's.
        let database: String = timed(
            replica,
            "reading the database",
            timeout,
            rdb.query_one("SELECT current_database()::text", &[]),
        )
        .await?
        .get(0);
        watch.subscription = watch.named_for(&database).map(str::to_owned);
        let applied = match watch.replication {
            Replication::Physical => Applied::Replay,
            Replication::Logical => {
                let sub = lag::subscription_name(rdb, &watch, timeout).await?;
                let row = timed(
                    replica,
                    "reading the subscription",
                    timeout,
                    rdb.query_opt(lag::SUBSCRIPTION, &[&sub]),
                )
                .await?;
                match row {
                    None => Applied::Nothing(format!("no subscription {sub} on the {replica}")),
                    Some(row) if !row.get::<_, bool>(0) => {
                        Applied::Nothing(format!("subscription {sub} on the {replica} is disabled"))
                    }
                    Some(row) => {
                        let slot: Option<String> = row.get(2);
                        let slot = slot.unwrap_or_else(|| sub.clone());
                        let exists = timed(
                            primary,
                            "reading the slot",
                            timeout,
                            pdb.query_opt(lag::SLOT, &[&slot]),
                        )
                        .await?
                        .is_some();
                        if exists {
                            Applied::Slot {
                                subscription: sub,
                                slot,
                            }
                        } else {
                            Applied::Nothing(format!(
                                "slot {slot} of subscription {sub} is not on the {primary}"
                            ))
                        }
                    }
                }
            }
        };
        Ok(Self { primary, applied })
    }

    /// One line for people and the report.
    #[must_use]
    pub fn describe(&self) -> String {
        let replica = self.primary.other();
        match &self.applied {
            Applied::Slot { subscription, .. } => format!(
                "writes go to the {}: each chunk is read on the {replica} once subscription {subscription} has applied the {}'s WAL position",
                self.primary, self.primary
            ),
            Applied::Replay => format!(
                "writes go to the {}: each chunk is read on the {replica} once it has replayed the {}'s WAL position",
                self.primary, self.primary
            ),
            Applied::Nothing(why) => {
                format!("{why}: no replication to wait for, the servers are compared as they are")
            }
        }
    }

    /// Waits until the replica has applied the primary's current WAL position, calling
    /// `waiting(target, applied)` once if that takes more than a second.
    pub async fn wait(
        &self,
        primary: &Client,
        replica: &Client,
        limit: Duration,
        timeout: Duration,
        mut waiting: impl FnMut(Lsn, String),
    ) -> Result<(), VerifyError> {
        if matches!(self.applied, Applied::Nothing(_)) {
            return Ok(());
        }
        let p = self.primary;
        let text: String = timed(
            p,
            "reading the WAL position",
            timeout,
            primary.query_one(INSERT_LSN, &[]),
        )
        .await?
        .get(0);
        let want = parse_lsn_of(p, "pg_current_wal_insert_lsn()", &text)?;
        let started = Instant::now();
        let mut told = false;
        // Poll fast at first (a busy replica is usually a few milliseconds behind), then back
        // off so a long wait does not load the primary.
        // Not a `crate::poll` wait: its interval grows, and it tells `waiting` once, after 1 s.
        let mut poll = Duration::from_millis(5);
        loop {
            let applied = self.applied(primary, replica, timeout).await?;
            if applied.is_some_and(|a| a >= want) {
                return Ok(());
            }
            let at = applied.map_or_else(|| "nothing confirmed".to_owned(), |a| a.to_string());
            if started.elapsed() >= limit {
                return Err(VerifyError::CatchUp(format!(
                    "the {} did not reach the {}'s WAL position {want} within --catch-up-timeout {limit:?} (it is at {at}): replication is behind or stopped; see `redirect lag`",
                    self.primary.other(),
                    self.primary
                )));
            }
            if !told && started.elapsed() >= Duration::from_secs(1) {
                told = true;
                waiting(want, at);
            }
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(Duration::from_millis(100));
        }
    }

    async fn applied(
        &self,
        primary: &Client,
        replica: &Client,
        timeout: Duration,
    ) -> Result<Option<Lsn>, PgError> {
        let (which, db, sql, what): (Role, &Client, &str, &'static str) = match &self.applied {
            Applied::Slot { slot, .. } => {
                let row = timed(
                    self.primary,
                    "reading what the subscriber applied",
                    timeout,
                    primary.query_opt(APPLIED_LSN, &[slot]),
                )
                .await?;
                return row
                    .and_then(|r| r.get::<_, Option<String>>(0))
                    .map(|s| parse_lsn_of(self.primary, "the subscriber's applied position", &s))
                    .transpose();
            }
            Applied::Replay => (
                self.primary.other(),
                replica,
                REPLAY_LSN,
                "pg_last_wal_replay_lsn()",
            ),
            Applied::Nothing(_) => return Ok(None),
        };
        let text: Option<String> = timed(
            which,
            "reading the replay position",
            timeout,
            db.query_one(sql, &[]),
        )
        .await?
        .get(0);
        text.map(|s| parse_lsn_of(which, what, &s)).transpose()
    }
}
