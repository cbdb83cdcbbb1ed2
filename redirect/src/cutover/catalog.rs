//! Catalog queries several steps share, written once.

/// The server's current WAL insert position: past every record inserted so far, including
/// commits not yet written out (an apply worker commits with `synchronous_commit = off`, so
/// its last commits can sit in WAL buffers beyond `pg_current_wal_lsn()`).
pub const CURRENT_LSN: &str = "SELECT pg_current_wal_insert_lsn()::text";
// `pg_subscription` is shared by every database of a cluster, and two databases may each
// have a subscription of the same name (the reverse one is `redirect_reverse` in each): every
// lookup by name is in the session's database.
/// A subscription's slot on its publisher.
pub const SUB_SLOT: &str = "SELECT subslotname::text FROM pg_subscription WHERE subname = $1 \
     AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())";
/// Whether a subscription exists (as a count).
pub const SUB_EXISTS: &str = "SELECT count(*)::int8 FROM pg_subscription WHERE subname = $1 \
     AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())";
/// The publications a subscription subscribes to.
pub const SUB_PUBLICATIONS: &str = "SELECT subpublications::text[] FROM pg_subscription WHERE subname = $1 \
     AND subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())";
/// Whether a replication slot exists (as a count).
pub const SLOT_EXISTS: &str =
    "SELECT count(*)::int8 FROM pg_replication_slots WHERE slot_name = $1";
/// Drops a slot if it exists and nothing streams from it (an active one is left alone).
pub const DROP_IDLE_SLOT: &str = "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
     WHERE slot_name = $1 AND NOT active";
