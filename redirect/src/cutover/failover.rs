//! PostgreSQL 17's failover slots: a logical slot marked `failover` is copied to a physical
//! standby that runs `sync_replication_slots = on`, so a failover of its server to that
//! standby keeps the slot, and with it the logical replication that reads it.
//!
//! Used where it helps: the reverse slot (the rollback path) on a new primary that has a
//! standby, and a note when the forward slot on a source with a standby is not one. Never
//! without a standby: the primary's `synchronized_standby_slots` naming a standby that is not
//! there would stall decoding from every failover slot.

use tokio_postgres::Client;

/// `pg_create_logical_replication_slot(..., failover)` and `pg_replication_slots.failover`.
pub const FAILOVER_SLOTS_SINCE: i32 = 170_000;

/// The server's version and the physical slots a standby streams from now. An active
/// physical slot is what slot synchronization needs (`primary_slot_name` on the standby) and
/// what `synchronized_standby_slots` names; a standby without a slot cannot keep a failover
/// slot. Every column exists on 13 and later.
const STANDBYS: &str = "SELECT current_setting('server_version_num')::int4, \
     coalesce(array_agg(slot_name::text ORDER BY slot_name) FILTER (WHERE slot_type = 'physical' AND active), '{}') \
     FROM pg_replication_slots";

/// `pg_replication_slots.failover` (17+; only ever sent to a 17+ server).
const SLOT_IS_FAILOVER: &str = "SELECT failover FROM pg_replication_slots WHERE slot_name = $1";

/// A server's standbys, as far as failover slots care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Standbys {
    pub version_num: i32,
    /// Active physical slots: a standby streams from each.
    pub slots: Vec<String>,
}

impl Standbys {
    /// Whether a failover slot helps on this server: 17+ with a standby streaming from a slot.
    #[must_use]
    pub fn failover_slots(&self) -> bool {
        self.version_num >= FAILOVER_SLOTS_SINCE && !self.slots.is_empty()
    }

    /// The standby slots, quoted for `synchronized_standby_slots`.
    #[must_use]
    pub fn setting(&self) -> String {
        self.slots.join(",")
    }
}

/// Reads `db`'s version and standby slots (the caller bounds the time).
pub async fn standbys(db: &Client) -> Result<Standbys, tokio_postgres::Error> {
    let row = db.query_one(STANDBYS, &[]).await?;
    Ok(Standbys {
        version_num: row.get(0),
        slots: row.get(1),
    })
}

/// Whether `slot` on `db` is a failover slot; `None` when the slot is not there. Call only on
/// a 17+ server (older ones have no `failover` column).
pub async fn slot_is_failover(
    db: &Client,
    slot: &str,
) -> Result<Option<bool>, tokio_postgres::Error> {
    Ok(db
        .query_opt(SLOT_IS_FAILOVER, &[&slot])
        .await?
        .map(|r| r.get(0)))
}

/// The statement that makes a logical slot: with `failover = true` only where it helps.
#[must_use]
pub fn create_slot_sql(failover: bool) -> &'static str {
    if failover {
        // (name, plugin, temporary, two_phase, failover)
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)"
    } else {
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standbys(version_num: i32, slots: &[&str]) -> Standbys {
        Standbys {
            version_num,
            slots: slots.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn a_failover_slot_needs_17_and_a_standby() {
        assert!(standbys(170_000, &["standby_a"]).failover_slots());
        assert!(standbys(180_001, &["a", "b"]).failover_slots());
        assert!(!standbys(170_005, &[]).failover_slots(), "no standby");
        assert!(!standbys(160_004, &["standby_a"]).failover_slots(), "16");
        assert_eq!(standbys(170_000, &["a", "b"]).setting(), "a,b");
    }

    #[test]
    fn only_a_failover_slot_passes_the_fifth_argument() {
        assert!(create_slot_sql(true).ends_with("false, false, true)"));
        assert!(!create_slot_sql(false).contains("true"));
    }
}
