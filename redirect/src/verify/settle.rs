//! A differing chunk, settled row by row: which keys really differ, and which only looked
//! different because a write was in flight between the two servers' reads.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use super::{
    ROW_PASSES, SETTLED_AFTER, Verify, VerifyError,
    chunk::{self, ChunkSql, Rows},
    report::{Key, KeyDiff, RowDiff},
};
use crate::datapath::Role;

/// A row seen on the primary and/or the replica, as a [`RowDiff`] in source/target terms
/// (after a cutover the primary is the target).
pub(super) fn diff_kind(primary: Role, on_primary: bool, on_replica: bool) -> RowDiff {
    let (on_source, on_target) = match primary {
        Role::Source => (on_primary, on_replica),
        Role::Target => (on_replica, on_primary),
    };
    match (on_source, on_target) {
        (true, false) => RowDiff::MissingOnTarget,
        (false, true) => RowDiff::MissingOnSource,
        _ => RowDiff::Changed,
    }
}

/// The keys where `a` (primary) and `b` (replica) differ, in key order (the primary's rows
/// first, then the replica's extra rows).
pub(super) fn differing(primary: Role, a: &Rows, b: &Rows) -> Vec<KeyDiff> {
    let mut out = Vec::new();
    for k in &a.order {
        match b.by_key.get(k) {
            None => out.push(KeyDiff {
                key: k.clone(),
                diff: diff_kind(primary, true, false),
            }),
            Some(r) if r.hash != a.by_key[k].hash => out.push(KeyDiff {
                key: k.clone(),
                diff: RowDiff::Changed,
            }),
            Some(_) => {}
        }
    }
    for k in &b.order {
        if !a.by_key.contains_key(k) {
            out.push(KeyDiff {
                key: k.clone(),
                diff: diff_kind(primary, false, true),
            });
        }
    }
    out
}

/// A differing chunk, compared row by row.
#[derive(Default)]
pub(super) struct Settled {
    pub primary_rows: u64,
    pub replica_rows: u64,
    pub diffs: Vec<KeyDiff>,
    pub unsettled: Vec<Key>,
}

impl Verify<'_> {
    /// Row by row over `(lo, hi]`, reading the primary's rows before and after the replica's.
    /// A key differs in a pass when the replica's row matches neither of the primary's reads
    /// (matching one is a write in flight, caught before or after it); it is reported only
    /// when that happened in [`SETTLED_AFTER`] passes with the primary's row unchanged across
    /// the pass. Keys that differ in one pass and not in the next were writes in flight.
    pub(super) async fn settle(
        &mut self,
        sql: &ChunkSql,
        lo: Option<&Key>,
        hi: Option<&Key>,
    ) -> Result<Settled, VerifyError> {
        let timeout = self.db.timeout();
        let range = sql.rows(lo, hi);
        // Key -> (how it differs, passes it was seen differing with the primary still).
        let mut seen: HashMap<Key, (RowDiff, u32)> = HashMap::new();
        let mut order: Vec<Key> = Vec::new();
        let mut counts = (0, 0);
        // Not a `crate::poll` wait: a fixed number of passes, each building on the last (and
        // on `self`), not a deadline; a failed read ends it at once.
        for pass in 0..ROW_PASSES {
            if pass > 0 {
                tokio::time::sleep(Duration::from_millis(100 << pass.min(4))).await;
            }
            let (primary, replica) = self.roles().await?;
            let (pw, pdb) = self.db.of(primary);
            let before = chunk::read_rows(pw, pdb, &range, timeout).await?;
            self.consistent_point(primary).await?;
            let (rw, rdb) = self.db.of(replica);
            let theirs = chunk::read_rows(rw, rdb, &range, timeout).await?;
            let after = chunk::read_rows(pw, pdb, &range, timeout).await?;
            counts = (before.order.len() as u64, theirs.order.len() as u64);
            let hash = |rows: &Rows, k: &Key| rows.by_key.get(k).map(|r| r.hash.clone());
            let now: Vec<KeyDiff> = differing(primary, &before, &theirs)
                .into_iter()
                .filter(|d| hash(&theirs, &d.key) != hash(&after, &d.key))
                .collect();
            let now_keys: HashSet<&Key> = now.iter().map(|d| &d.key).collect();
            seen.retain(|k, _| now_keys.contains(k));
            for d in now {
                let still = before.by_key.get(&d.key) == after.by_key.get(&d.key);
                let entry = seen.entry(d.key.clone()).or_insert_with(|| {
                    order.push(d.key.clone());
                    (d.diff, 0)
                });
                entry.0 = d.diff;
                if still {
                    entry.1 += 1;
                }
            }
            if seen.values().all(|(_, n)| *n >= SETTLED_AFTER) {
                break;
            }
        }
        let mut settled = Settled {
            primary_rows: counts.0,
            replica_rows: counts.1,
            ..Settled::default()
        };
        for k in order {
            match seen.get(&k) {
                Some((diff, n)) if *n >= SETTLED_AFTER => {
                    settled.diffs.push(KeyDiff {
                        key: k,
                        diff: *diff,
                    });
                }
                Some(_) => settled.unsettled.push(k),
                None => {}
            }
        }
        if settled.diffs.is_empty() && settled.unsettled.is_empty() {
            // Equal within the pass: the replica's count differed only by writes in flight.
            settled.replica_rows = settled.primary_rows;
        }
        Ok(settled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chunk::RowVersion;

    fn rows(items: &[(&str, &str)]) -> Rows {
        let mut r = Rows::default();
        for (k, h) in items {
            let key = vec![(*k).to_owned()];
            r.order.push(key.clone());
            r.by_key.insert(
                key,
                RowVersion {
                    hash: (*h).to_owned(),
                    xmin: "1".into(),
                },
            );
        }
        r
    }

    #[test]
    fn differences_are_named_from_each_side() {
        let a = rows(&[("1", "x"), ("2", "y"), ("3", "z")]);
        let b = rows(&[("1", "x"), ("3", "Z"), ("4", "w")]);
        let d = differing(Role::Source, &a, &b);
        assert_eq!(
            d,
            [
                KeyDiff {
                    key: vec!["2".into()],
                    diff: RowDiff::MissingOnTarget
                },
                KeyDiff {
                    key: vec!["3".into()],
                    diff: RowDiff::Changed
                },
                KeyDiff {
                    key: vec!["4".into()],
                    diff: RowDiff::MissingOnSource
                },
            ]
        );
        // After a cutover the target takes the writes: a row it has and the source lacks is
        // missing on the source.
        let d = differing(Role::Target, &a, &b);
        assert_eq!(d[0].diff, RowDiff::MissingOnSource);
        assert_eq!(d[2].diff, RowDiff::MissingOnTarget);
    }
}
