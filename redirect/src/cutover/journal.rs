//! The cutover journal: append-only JSON lines, fsynced after every record, so the record of
//! a step exists before the step's effects are relied on (and survives a crash).

use std::{
    fs::{File, OpenOptions},
    io::Write as _,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

/// One step of one cutover.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// Wall-clock time, RFC 3339 (UTC).
    pub time: String,
    /// Identifies the cutover (its start time in ms since the epoch).
    pub cutover: String,
    /// `start`, `preflight`, `hold`, `fence`, `barrier`, `sequences`, `reverse`, `flip`,
    /// `release`, `drain`, `done`, `aborted`, `recovered`.
    pub step: String,
    pub from: String,
    pub to: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_lsn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_lsn: Option<String>,
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
    pub fn append(&mut self, mut entry: Entry) -> Result<(), JournalError> {
        entry.time = now_rfc3339();
        let mut line = serde_json::to_string(&entry).expect("journal entries serialize");
        line.push('\n');
        let err = |source| JournalError {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(line.as_bytes()).map_err(err)?;
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
    let ended = steps
        .iter()
        .any(|e| matches!(e.step.as_str(), "done" | "aborted" | "recovered"));
    (!ended).then_some(steps)
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
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
        let e = |id: &str, step: &str| Entry {
            cutover: id.into(),
            step: step.into(),
            ..Entry::default()
        };
        j.append(e("1", "start")).unwrap();
        j.append(e("1", "done")).unwrap();
        assert!(unfinished(&read(&path).unwrap()).is_none());
        j.append(e("2", "start")).unwrap();
        j.append(e("2", "flip")).unwrap();
        let open = unfinished(&read(&path).unwrap()).unwrap();
        assert_eq!(
            open.iter().map(|e| e.step.as_str()).collect::<Vec<_>>(),
            ["start", "flip"]
        );
        assert!(!open[0].time.is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }
}
