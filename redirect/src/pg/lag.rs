//! Replication lag, in bytes and in time, with the health of the replication itself.
//! Like pgdog's `LsnMonitor`: persistent sessions, every query under a timeout, SQL in named
//! constants, and the go/no-go decision as a pure function.

use std::time::Duration;

use serde::Serialize;
use tokio_postgres::Client;

use super::{Lsn, PgError, parse_lsn_of, timed};

/// How the target is kept in sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Replication {
    /// A publication on the source, a subscription on the target.
    Logical,
    /// Streaming replication; the flip promotes the target.
    Physical,
}

/// The source's current WAL write position.
pub const SOURCE_LSN: &str = "SELECT pg_current_wal_lsn()::text";
/// The subscription's slot on the source: active, and how far the subscriber confirmed.
pub const SLOT: &str =
    "SELECT active, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1";
/// The walsender serving a subscription (its `application_name` is the subscription name).
pub const SENDER: &str = "SELECT EXTRACT(epoch FROM coalesce(replay_lag, interval '0'))::float8, replay_lsn::text \
     FROM pg_stat_replication WHERE application_name = $1";
/// The subscription on the target: enabled, apply worker running, its slot.
pub const SUBSCRIPTION: &str = "SELECT s.subenabled, st.pid IS NOT NULL, s.subslotname::text \
     FROM pg_subscription s LEFT JOIN pg_stat_subscription st ON st.subid = s.oid AND st.relid IS NULL \
     WHERE s.subname = $1";
/// Every subscription on the target (to pick the only one when none is named).
pub const SUBSCRIPTIONS: &str = "SELECT subname::text FROM pg_subscription";
/// A physical standby's state.
pub const STANDBY: &str = "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text";
/// Every physical walsender on the source.
pub const PHYSICAL_SENDERS: &str = "SELECT application_name, replay_lsn::text, \
     EXTRACT(epoch FROM coalesce(replay_lag, interval '0'))::float8 FROM pg_stat_replication";

/// Lag and health at one instant.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ReplicaLag {
    pub replication: Replication,
    /// WAL the target has not confirmed (logical) or replayed (physical) yet.
    pub bytes: u64,
    /// How long ago the last confirmed change was written (`pg_stat_replication.replay_lag`).
    pub seconds: f64,
    pub source_lsn: String,
    pub healthy: bool,
    /// What is wrong, when not healthy.
    pub problems: Vec<String>,
}

/// What the watcher needs to find the replication.
#[derive(Clone, Debug)]
pub struct Watch {
    pub replication: Replication,
    /// Logical: the subscription on the target (found automatically if there is only one).
    pub subscription: Option<String>,
}

/// Reads lag once over the two sessions.
pub async fn measure(
    source: &Client,
    target: &Client,
    watch: &Watch,
    timeout: Duration,
) -> Result<ReplicaLag, PgError> {
    let src_lsn: String = timed(
        "source",
        "reading the WAL position",
        timeout,
        source.query_one(SOURCE_LSN, &[]),
    )
    .await?
    .get(0);
    let current = parse_lsn_of("source", "pg_current_wal_lsn()", &src_lsn)?;
    let mut problems = Vec::new();
    let (bytes, seconds) = match watch.replication {
        Replication::Logical => {
            let sub = subscription_name(target, watch, timeout).await?;
            let row = timed(
                "target",
                "reading the subscription",
                timeout,
                target.query_opt(SUBSCRIPTION, &[&sub]),
            )
            .await?;
            let slot = match row {
                None => {
                    problems.push(format!("subscription {sub:?} does not exist on the target"));
                    None
                }
                Some(row) => {
                    let (enabled, running, slot): (bool, bool, Option<String>) =
                        (row.get(0), row.get(1), row.get(2));
                    if !enabled {
                        problems.push(format!("subscription {sub:?} is disabled"));
                    }
                    if !running {
                        problems.push(format!("subscription {sub:?} has no apply worker running"));
                    }
                    slot
                }
            };
            let slot = slot.unwrap_or_else(|| sub.clone());
            let confirmed = match timed(
                "source",
                "reading the slot",
                timeout,
                source.query_opt(SLOT, &[&slot]),
            )
            .await?
            {
                None => {
                    problems.push(format!(
                        "replication slot {slot:?} does not exist on the source"
                    ));
                    None
                }
                Some(row) => {
                    let active: bool = row.get(0);
                    if !active {
                        problems.push(format!("replication slot {slot:?} is not active"));
                    }
                    // NULL (the slot never confirmed anything) is an unknown lag; text that
                    // is not an LSN is an error, never a zero.
                    row.get::<_, Option<String>>(1)
                        .map(|s| {
                            parse_lsn_of("source", "pg_replication_slots.confirmed_flush_lsn", &s)
                        })
                        .transpose()?
                }
            };
            let secs = timed(
                "source",
                "reading pg_stat_replication",
                timeout,
                source.query_opt(SENDER, &[&sub]),
            )
            .await?
            .map_or(0.0, |r| r.get::<_, Option<f64>>(0).unwrap_or(0.0));
            (lag_bytes(current, confirmed), secs)
        }
        Replication::Physical => {
            let row = timed(
                "target",
                "reading the standby state",
                timeout,
                target.query_one(STANDBY, &[]),
            )
            .await?;
            let in_recovery: bool = row.get(0);
            if !in_recovery {
                problems.push("the target is not a standby (pg_is_in_recovery() is false)".into());
            }
            let replayed = row
                .get::<_, Option<String>>(1)
                .map(|s| parse_lsn_of("target", "pg_last_wal_replay_lsn()", &s))
                .transpose()?;
            let senders = timed(
                "source",
                "reading pg_stat_replication",
                timeout,
                source.query(PHYSICAL_SENDERS, &[]),
            )
            .await?;
            if senders.is_empty() {
                problems.push("no walsender on the source: the standby is not streaming".into());
            }
            let secs = senders
                .first()
                .map_or(0.0, |r| r.get::<_, Option<f64>>(2).unwrap_or(0.0));
            (lag_bytes(current, replayed), secs)
        }
    };
    Ok(ReplicaLag {
        replication: watch.replication,
        bytes,
        seconds,
        source_lsn: src_lsn,
        healthy: problems.is_empty(),
        problems,
    })
}

/// WAL the replica has not reached: `u64::MAX` (never passes the gate) when its position is
/// unknown, 0 when it was read after `current` and has passed it.
#[must_use]
pub fn lag_bytes(current: Lsn, replica: Option<Lsn>) -> u64 {
    replica.map_or(u64::MAX, |r| current.saturating_sub(r))
}

/// The subscription to watch: the named one, or the only one on the target.
pub async fn subscription_name(
    target: &Client,
    watch: &Watch,
    timeout: Duration,
) -> Result<String, PgError> {
    if let Some(s) = &watch.subscription {
        return Ok(s.clone());
    }
    let rows = timed(
        "target",
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

/// Whether a cutover may start: replication healthy and lag within both limits.
pub fn gate(lag: &ReplicaLag, max_bytes: u64, max_time: Duration) -> Result<(), String> {
    if !lag.healthy {
        return Err(format!(
            "replication is not healthy: {}",
            lag.problems.join("; ")
        ));
    }
    if lag.bytes > max_bytes {
        return Err(format!(
            "lag is {} bytes, above --max-lag {max_bytes} bytes",
            lag.bytes
        ));
    }
    if lag.seconds > max_time.as_secs_f64() {
        return Err(format!(
            "lag is {:.3}s, above --max-lag-time {:?}",
            lag.seconds, max_time
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lag(bytes: u64, seconds: f64, healthy: bool) -> ReplicaLag {
        ReplicaLag {
            replication: Replication::Logical,
            bytes,
            seconds,
            source_lsn: "0/0".into(),
            healthy,
            problems: if healthy {
                vec![]
            } else {
                vec!["slot inactive".into()]
            },
        }
    }

    #[test]
    fn lag_bytes_from_lsns() {
        let at = |s: &str| s.parse::<Lsn>().unwrap();
        assert_eq!(lag_bytes(at("1/0"), Some(at("0/FFFFFF00"))), 0x100);
        assert_eq!(lag_bytes(at("16/B374D848"), Some(at("16/B374D848"))), 0);
        assert_eq!(
            lag_bytes(at("0/10"), Some(at("0/20"))),
            0,
            "a replica position read later may be ahead"
        );
        assert_eq!(lag_bytes(at("0/0"), None), u64::MAX, "unknown is not zero");
    }

    #[test]
    fn the_gate_needs_health_and_both_limits() {
        let max = Duration::from_secs(5);
        assert!(gate(&lag(100, 0.1, true), 1 << 20, max).is_ok());
        assert!(
            gate(&lag(1 << 20, 0.1, true), 1 << 20, max).is_ok(),
            "the limit is inclusive"
        );
        assert!(
            gate(&lag((1 << 20) + 1, 0.1, true), 1 << 20, max)
                .unwrap_err()
                .contains("above --max-lag")
        );
        assert!(
            gate(&lag(0, 6.0, true), 1 << 20, max)
                .unwrap_err()
                .contains("--max-lag-time")
        );
        assert!(
            gate(&lag(0, 0.0, false), 1 << 20, max)
                .unwrap_err()
                .contains("slot inactive")
        );
        assert!(
            gate(&lag(u64::MAX, 0.0, true), 1 << 20, max).is_err(),
            "unknown lag never passes"
        );
    }
}
