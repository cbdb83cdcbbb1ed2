//! The cutover's record: each step journaled with its timing, and shown to the operator.

use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;
use tracing::warn;

use super::CutoverError;
use crate::{
    datapath::Role,
    journal::{Entry, Journal, Step},
};

/// Journals steps with their timings and streams progress lines.
pub struct Recorder {
    journal: Journal,
    pub id: String,
    pub from: Role,
    pub to: Role,
    pub steps: Vec<(Step, f64)>,
    progress: UnboundedSender<String>,
}

impl Recorder {
    pub(super) fn new(
        path: &std::path::Path,
        id: String,
        from: Role,
        to: Role,
        progress: UnboundedSender<String>,
    ) -> Result<Self, CutoverError> {
        Ok(Self {
            journal: Journal::open(path)?,
            id,
            from,
            to,
            steps: Vec::new(),
            progress,
        })
    }

    /// A progress line for the operator (not journaled).
    pub fn say(&self, line: impl Into<String>) {
        let _ = self.progress.send(line.into());
    }

    /// Journals `entry` for this cutover (stamping id, direction and duration), and shows it.
    pub fn log(&mut self, since: Instant, entry: Entry) -> Result<(), CutoverError> {
        let ms = since.elapsed().as_secs_f64() * 1000.0;
        self.steps.push((entry.step, ms));
        self.say(format!("{:<10} {ms:>8.1} ms  {}", entry.step, entry.detail));
        self.journal.append(Entry {
            cutover: self.id.clone(),
            from: Some(self.from),
            to: Some(self.to),
            duration_ms: Some(ms),
            ..entry
        })?;
        Ok(())
    }

    /// [`Self::log`] for several entries at once (one per database), with one fsync.
    pub fn log_all(&mut self, since: Instant, entries: Vec<Entry>) -> Result<(), CutoverError> {
        let ms = since.elapsed().as_secs_f64() * 1000.0;
        let mut stamped = Vec::with_capacity(entries.len());
        for entry in entries {
            self.steps.push((entry.step, ms));
            self.say(format!("{:<10} {ms:>8.1} ms  {}", entry.step, entry.detail));
            stamped.push(Entry {
                cutover: self.id.clone(),
                from: Some(self.from),
                to: Some(self.to),
                duration_ms: Some(ms),
                ..entry
            });
        }
        self.journal.append_all(stamped)?;
        Ok(())
    }

    /// `log` for a step with only a detail.
    pub fn step(
        &mut self,
        step: Step,
        since: Instant,
        detail: impl Into<String>,
    ) -> Result<(), CutoverError> {
        self.log(
            since,
            Entry {
                step,
                detail: detail.into(),
                ..Entry::default()
            },
        )
    }

    /// After the flip nothing may be undone, so a journal that cannot be written (disk full)
    /// is reported, not fatal: `ACTIVE` itself records the flip, and a successor finishes
    /// whatever the journal does not show as done.
    pub fn note(&mut self, since: Instant, entry: Entry) {
        if let Err(e) = self.log(since, entry) {
            warn!(error = %e, "journal write failed after the flip; continuing (ACTIVE records the flip)");
            self.say(format!("WARNING: journal: {e}"));
        }
    }
}
