//! The slot that keeps the old server's WAL for the new one: `max_slot_wal_keep_size` caps
//! what it may hold, and a slot past the cap is invalidated at the next checkpoint. An
//! invalidated slot can never be resumed: the new server would never get the rest.

use super::{Finding, Guardrail, Replication};
use crate::pg::Server;
use crate::{
    cutover::{failover, quote_ident},
    pg::{PgError, timed},
};

/// The cap, the slot's WAL status, how much more it may fall behind before it is lost, and
/// how much it holds now.
const SLOT_WAL: &str = "SELECT current_setting('max_slot_wal_keep_size'), s.wal_status, s.safe_wal_size, \
     (pg_current_wal_lsn() - s.restart_lsn)::int8 FROM pg_replication_slots s WHERE s.slot_name = $1";

/// slot-wal-limit: the slot is lost, about to be, or has less headroom than its lag (it is
/// lost if the lag doubles, as it can while the cutover holds the old server's last writes).
pub async fn wal_limit(r: &Replication<'_>) -> Result<Vec<Finding>, PgError> {
    let Some(slot) = r.slot else {
        return Ok(Vec::new());
    };
    let rows = r.on_old("reading the slot", SLOT_WAL, &[&slot]).await?;
    let Some(row) = rows.first() else {
        // A missing slot is the lag gate's: replication is not healthy.
        return Ok(Vec::new());
    };
    let (limit, status, safe, held): (String, Option<String>, Option<i64>, Option<i64>) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let held = held.unwrap_or(0);
    let problem = match (status.as_deref(), safe) {
        (Some("lost"), _) => {
            Some("it has been invalidated (wal_status lost): the WAL it needed is gone".to_owned())
        }
        (Some("unreserved"), _) => Some(format!(
            "it holds more WAL ({held} bytes) than max_slot_wal_keep_size ({limit}) allows (wal_status unreserved): the next checkpoint invalidates it"
        )),
        (_, Some(safe)) if safe < held => Some(format!(
            "it may fall only {safe} more bytes behind before max_slot_wal_keep_size ({limit}) invalidates it, less than the {held} bytes it holds now: the lag doubling loses it"
        )),
        _ => None,
    };
    Ok(problem
        .map(|p| {
            Finding::blocking(
                Guardrail::SlotWalLimit,
                vec![format!("slot {slot} on the {}: {p}", r.old_role)],
                &format!(
                    "a slot past max_slot_wal_keep_size is invalidated, and the {} can then never receive the rest of the {}'s writes (the subscription must be recreated and every table copied again)",
                    r.new_role, r.old_role
                ),
                &format!(
                    "on the {}: ALTER SYSTEM SET max_slot_wal_keep_size = -1 (or a size well above the lag); SELECT pg_reload_conf(); and let the {} catch up first",
                    r.old_role, r.new_role
                ),
            )
        })
        .into_iter()
        .collect())
}

/// failover-slot (a note): the old server is 17+ and a standby streams from it, but the
/// subscription's slot is not a failover slot, so a failover to that standby loses it.
pub async fn not_failover(r: &Replication<'_>) -> Result<Vec<Finding>, PgError> {
    let Some(slot) = r.slot else {
        return Ok(Vec::new());
    };
    let standbys = timed(
        Server::Old,
        "looking for standbys",
        r.qt,
        failover::standbys(r.old),
    )
    .await?;
    if !standbys.failover_slots() {
        return Ok(Vec::new());
    }
    // Only now, on 17+, is there a failover column to read.
    let is_failover = timed(
        Server::Old,
        "reading the slot",
        r.qt,
        failover::slot_is_failover(r.old, slot),
    )
    .await?;
    if is_failover != Some(false) {
        return Ok(Vec::new()); // A failover slot, or none at all (the lag gate's).
    }
    Ok(vec![Finding::note(
        Guardrail::FailoverSlot,
        vec![format!(
            "slot {slot} on the {} (standby slot(s) {})",
            r.old_role,
            standbys.slots.join(", ")
        )],
        &format!(
            "a failover of the {} to its standby loses this slot: the {} stops receiving changes and the cutover's lag check then refuses",
            r.old_role, r.new_role
        ),
        &failover_fix(r, &standbys.setting()),
    )])
}

fn failover_fix(r: &Replication<'_>, standby_slots: &str) -> String {
    let sub = quote_ident(r.subscription);
    format!(
        "on the {new}: ALTER SUBSCRIPTION {sub} DISABLE; ALTER SUBSCRIPTION {sub} SET (failover = true); ALTER SUBSCRIPTION {sub} ENABLE; \
         on the {old}'s standby: sync_replication_slots = on, hot_standby_feedback = on (and dbname in its primary_conninfo); \
         on the {old}: ALTER SYSTEM SET synchronized_standby_slots = '{standby_slots}'; SELECT pg_reload_conf()",
        new = r.new_role,
        old = r.old_role,
    )
}
