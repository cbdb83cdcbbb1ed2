//! The way back: room on both servers for reverse replication, and a probe that the source
//! can reach the target with the conninfo it will be given.

use std::time::Duration;

use tokio_postgres::Client;

use crate::cutover::{Controller, CutoverError};
use crate::datapath::Role;
use crate::pg::timed;

/// Room on the target for a reverse slot and walsender per database, free slots beyond those
/// this tool made itself (they are replaced), and room on the source for an apply worker per
/// reverse subscription: without it a reverse subscription never starts, and a rollback is not
/// lossless.
const TARGET_ROOM: &str = "SELECT current_setting('max_replication_slots')::int \
     - (SELECT count(*) FROM pg_replication_slots WHERE slot_name NOT LIKE 'redirect\\_reverse%')::int, \
     current_setting('max_wal_senders')::int - (SELECT count(*) FROM pg_stat_replication)::int";
const SOURCE_ROOM: &str = "SELECT current_setting('max_logical_replication_workers')::int \
     - (SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL AND subname <> 'redirect_reverse')::int";

pub(super) async fn reverse_capacity(
    source: &Client,
    target: &Client,
    databases: usize,
    qt: Duration,
) -> Result<Vec<String>, CutoverError> {
    let row = timed(
        Role::Target,
        "checking room for reverse slots",
        qt,
        target.query_one(TARGET_ROOM, &[]),
    )
    .await?;
    let workers: i32 = timed(
        Role::Source,
        "checking room for apply workers",
        qt,
        source.query_one(SOURCE_ROOM, &[]),
    )
    .await?
    .get(0);
    Ok(room_for_reverse(
        Room {
            slots: row.get(0),
            senders: row.get(1),
            workers,
        },
        databases,
    ))
}

/// What the servers have room for, beyond what is in use.
#[derive(Clone, Copy)]
pub(super) struct Room {
    /// Replication slots on the target.
    slots: i32,
    /// Walsenders on the target.
    senders: i32,
    /// Logical replication workers on the source.
    workers: i32,
}

/// What is short for a reverse slot, walsender and apply worker per database.
pub(super) fn room_for_reverse(room: Room, databases: usize) -> Vec<String> {
    let want = i32::try_from(databases).unwrap_or(i32::MAX);
    let mut short = Vec::new();
    let mut need = |have: i32, what: &str, on: &str, setting: &str| {
        if have < want {
            short.push(format!(
                "the {on} has room for {have} more {what} and a lossless rollback needs {want} (one per database): raise {setting} on the {on} (a restart)"
            ));
        }
    };
    need(
        room.slots,
        "replication slot(s)",
        "target",
        "max_replication_slots",
    );
    need(room.senders, "walsender(s)", "target", "max_wal_senders");
    need(
        room.workers,
        "logical replication worker(s)",
        "source",
        "max_logical_replication_workers (and max_worker_processes)",
    );
    short
}

/// Has the source open a connection to the target with the reverse conninfo, through a
/// subscription that is created disabled, with no slot, and dropped at once.
pub(super) async fn probe_reverse(
    ctl: &Controller,
    from_db: &Client,
    database: &str,
    qt: Duration,
) -> Result<(), String> {
    let conninfo = crate::cutover::replication::reverse_conninfo(ctl, database);
    let probe = "redirect_probe";
    let _ = timed(Role::Source, "dropping a stale probe", qt, from_db.batch_execute(&format!(
        "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_subscription WHERE subname = '{probe}' \
         AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())) THEN \
         ALTER SUBSCRIPTION {probe} SET (slot_name = NONE); DROP SUBSCRIPTION {probe}; END IF; END $$"
    )))
    .await;
    let created = timed(
        Role::Source,
        "probing the way back to the target",
        qt,
        from_db.batch_execute(&format!(
            "CREATE SUBSCRIPTION {probe} CONNECTION {} PUBLICATION {} \
             WITH (connect = true, enabled = false, create_slot = false, slot_name = NONE, copy_data = false)",
            crate::cutover::quote_literal(&conninfo),
            crate::cutover::REVERSE
        )),
    )
    .await;
    let _ = timed(
        Role::Source,
        "dropping the probe",
        qt,
        from_db.batch_execute(&format!("DROP SUBSCRIPTION IF EXISTS {probe}")),
    )
    .await;
    created.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_database_needs_a_reverse_slot_walsender_and_worker() {
        let plenty = Room {
            slots: 10,
            senders: 10,
            workers: 4,
        };
        assert!(room_for_reverse(plenty, 3).is_empty());
        assert!(
            room_for_reverse(plenty, 4).is_empty(),
            "exactly enough is enough"
        );
        let short = room_for_reverse(plenty, 5);
        assert_eq!(short.len(), 1, "{short:?}");
        assert!(
            short[0].contains("max_logical_replication_workers"),
            "{short:?}"
        );
        let none = Room {
            slots: 0,
            senders: 1,
            workers: 9,
        };
        let short = room_for_reverse(none, 2);
        assert!(
            short[0].contains("room for 0 more replication slot(s)"),
            "{short:?}"
        );
        assert!(short[1].contains("max_wal_senders"), "{short:?}");
    }
}
