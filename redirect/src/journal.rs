//! The cutover journal: append-only JSON lines, fsynced after every record, so the record of
//! a step exists before the step's effects are relied on (and survives a crash).

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{datapath::Role, pg::Lsn};

/// A step of the cutover protocol, as the journal records it. Steps ending in `-ing` are
/// written *before* their effect (write-ahead), so a successor knows what may need undoing
/// even if the controller died in the middle of it.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// The request, the replication it relies on (subscription, slot) and the drain budget.
    #[default]
    Start,
    Prepare,
    Rehearsal,
    Preflight,
    Hold,
    Fence,
    Barrier,
    Sequences,
    /// Both servers are 16 or newer: the reverse replication was set up before the hold, with
    /// `origin = none`, so the write pause does not include making it.
    ReverseReady,
    /// About to disable the subscription named in the entry (write-ahead).
    Disabling,
    /// About to create the reverse slot (write-ahead).
    CreatingReverseSlot,
    /// Replication turned around (forward stopped, reverse slot made) or promoted.
    Reverse,
    /// `ACTIVE` now names the new server; carries the drain deadline.
    Flip,
    Release,
    ReverseSubscription,
    Drain,
    Done,
    Aborted,
    Recovered,
    /// `redirect finish` retired the migration's replication.
    Finished,
    /// A step name this version does not know (a newer journal).
    #[serde(other)]
    Unknown,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = serde_json::to_value(self).expect("steps serialize");
        f.pad(v.as_str().unwrap_or("?"))
    }
}

impl Step {
    /// Whether the cutover this step belongs to has ended.
    #[must_use]
    pub fn ends_cutover(self) -> bool {
        matches!(
            self,
            Self::Done | Self::Aborted | Self::Recovered | Self::Finished
        )
    }
}

/// One step of one cutover, with what the controller learned at it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// Wall-clock time, RFC 3339 (UTC).
    pub time: String,
    /// Identifies the cutover (its start time in ms since the epoch).
    pub cutover: String,
    pub step: Step,
    pub from: Option<Role>,
    pub to: Option<Role>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub duration_ms: Option<f64>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        default,
        deserialize_with = "crate::pg::lsn::optional"
    )]
    pub source_lsn: Option<Lsn>,
    #[serde(
        skip_serializing_if = "Option::is_none",
        default,
        deserialize_with = "crate::pg::lsn::optional"
    )]
    pub target_lsn: Option<Lsn>,
    /// The subscription this step concerns (on `start`: the one carrying the old server's
    /// writes to the new one, discovered or configured), so a rollback or a successor
    /// finds it without `--subscription`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub subscription: Option<String>,
    /// That subscription's slot on its publisher.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub slot: Option<String>,
    /// The database this step concerns, for the steps done per database (the subscription
    /// disabled, the reverse slot made); absent: the DSNs' database (and every entry a
    /// version before several databases wrote).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub database: Option<String>,
    /// On `start`: the drain budget asked for.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub drain_timeout_ms: Option<u64>,
    /// On `flip`: when the drain ends, in ms since the Unix epoch (a successor resumes it).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub drain_until_ms: Option<u64>,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub detail: String,
}

/// Why the journal could not be written or read.
#[derive(Debug, thiserror::Error)]
#[error("journal {}: {source}", path.display())]
pub struct JournalError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

pub struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        let err = |source| JournalError {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends `entry` (stamping its time) and fsyncs.
    pub fn append(&mut self, entry: Entry) -> Result<(), JournalError> {
        self.append_all(vec![entry])
    }

    /// Appends `entries` (stamping their time) with one write and one fsync: the steps of
    /// several databases at once, inside the write pause, cost one disk flush, not one each.
    pub fn append_all(&mut self, entries: Vec<Entry>) -> Result<(), JournalError> {
        let time = now_rfc3339();
        let mut lines = String::new();
        for mut entry in entries {
            entry.time.clone_from(&time);
            lines.push_str(&serde_json::to_string(&entry).expect("journal entries serialize"));
            lines.push('\n');
        }
        let err = |source| JournalError {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(lines.as_bytes()).map_err(err)?;
        self.file.sync_data().map_err(err)
    }
}

/// Every entry of the journal at `path` (an absent journal is empty).
pub fn read(path: &Path) -> Result<Vec<Entry>, JournalError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(JournalError {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// The steps of the last cutover, if it never reached `done`, `aborted` or `recovered`.
#[must_use]
pub fn unfinished(entries: &[Entry]) -> Option<Vec<Entry>> {
    let last = entries.last()?;
    let steps: Vec<Entry> = entries
        .iter()
        .filter(|e| e.cutover == last.cutover)
        .cloned()
        .collect();
    let ended = steps.iter().any(|e| e.step.ends_cutover());
    (!ended).then_some(steps)
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// The subscription (and its slot) that last carried `from`'s writes to `to`, as an earlier
/// cutover in that direction discovered it.
#[must_use]
pub fn known_subscription(
    entries: &[Entry],
    from: Role,
    to: Role,
) -> Option<(String, Option<String>)> {
    entries
        .iter()
        .rev()
        .filter(|e| e.step == Step::Start && e.from == Some(from) && e.to == Some(to))
        .find_map(|e| e.subscription.clone().map(|s| (s, e.slot.clone())))
}

/// The forward subscription of `database` that an earlier forward cutover stopped (its
/// `disabling` entry); entries without a database are the DSNs' database, `home`.
#[must_use]
pub fn known_subscription_in(entries: &[Entry], database: &str, home: &str) -> Option<String> {
    entries
        .iter()
        .rev()
        .filter(|e| {
            e.step == Step::Disabling
                && e.from == Some(Role::Source)
                && e.to == Some(Role::Target)
                && e.database.as_deref().unwrap_or(home) == database
        })
        .find_map(|e| e.subscription.clone())
}

/// Milliseconds since the Unix epoch.
#[must_use]
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A fresh cutover id.
#[must_use]
pub fn new_id() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{ms}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_read_and_find_unfinished() {
        let dir = std::env::temp_dir().join(format!("redirect-journal-{}", std::process::id()));
        let path = dir.join("j.jsonl");
        let _ = std::fs::remove_file(&path);
        let mut j = Journal::open(&path).unwrap();
        let e = |id: &str, step: Step| Entry {
            cutover: id.into(),
            step,
            from: Some(Role::Source),
            to: Some(Role::Target),
            ..Entry::default()
        };
        j.append(Entry {
            subscription: Some("fwd".into()),
            slot: Some("fwd_slot".into()),
            ..e("1", Step::Start)
        })
        .unwrap();
        j.append(e("1", Step::Done)).unwrap();
        assert!(unfinished(&read(&path).unwrap()).is_none());
        j.append(e("2", Step::Start)).unwrap();
        j.append(e("2", Step::Flip)).unwrap();
        let all = read(&path).unwrap();
        let open = unfinished(&all).unwrap();
        assert_eq!(
            open.iter().map(|e| e.step).collect::<Vec<_>>(),
            [Step::Start, Step::Flip]
        );
        assert!(!open[0].time.is_empty());
        // The forward subscription is remembered from the first cutover, not the second's
        // (which had none), and nothing is known for the other direction.
        assert_eq!(
            known_subscription(&all, Role::Source, Role::Target),
            Some(("fwd".into(), Some("fwd_slot".into())))
        );
        assert_eq!(known_subscription(&all, Role::Target, Role::Source), None);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn journals_of_the_previous_version_still_read() {
        let old = r#"{"time":"t","cutover":"1","step":"flip","from":"source","to":"target","detail":"x"}"#;
        let e: Entry = serde_json::from_str(old).unwrap();
        assert_eq!((e.step, e.to), (Step::Flip, Some(Role::Target)));
        let newer = r#"{"time":"t","cutover":"1","step":"teleport","from":"source","to":"target"}"#;
        assert_eq!(
            serde_json::from_str::<Entry>(newer).unwrap().step,
            Step::Unknown
        );
    }
}
