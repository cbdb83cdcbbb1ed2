//! The host settings `run` changed, with the values they had before, so `detach` can put them
//! back.
//!
//! The record is a small JSON file next to the journal (bpffs, where the pins live, holds no
//! regular files), named after the pin dir: `host-settings-sys-fs-bpf-redirect.json`. Each
//! original value is written, durably, before the setting changes, and only the first time:
//! a re-run of `run` finds its own values in place and must not take them for the originals.

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::NetError;

/// One setting and the value it had before `run` first changed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Original {
    /// Dotted sysctl name, e.g. `net.ipv4.conf.all.rp_filter`.
    pub sysctl: String,
    /// Its value before the change, trimmed (`""` for an empty one).
    pub value: String,
}

/// What the record file holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The datapath the settings were changed for.
    pub pin_dir: PathBuf,
    /// The network namespace they belong to (the inode of `/proc/self/ns/net`): sysctls are
    /// per namespace, and restoring them in another would change the wrong host.
    pub netns: u64,
    /// In the order they were changed.
    pub sysctls: Vec<Original>,
}

impl Record {
    /// Adds `sysctl`'s original value unless one is recorded already; returns whether it did.
    pub fn remember(&mut self, sysctl: &str, value: &str) -> bool {
        if self.sysctls.iter().any(|o| o.sysctl == sysctl) {
            return false;
        }
        self.sysctls.push(Original {
            sysctl: sysctl.to_owned(),
            value: value.trim().to_owned(),
        });
        true
    }
}

/// What restoring one setting did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Written back.
    Restored,
    /// The setting no longer exists (its interface was removed): nothing to restore.
    Gone,
    /// Writing it failed; it stays in the record.
    Failed(String),
}

/// The record of one datapath's host settings.
#[derive(Clone, Debug)]
pub struct HostSettings {
    path: PathBuf,
    pin_dir: PathBuf,
    netns: u64,
}

/// The record file for `pin_dir`, in the journal's directory.
#[must_use]
pub fn record_path(journal: &Path, pin_dir: &Path) -> PathBuf {
    let dir = journal
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    dir.join(format!("host-settings-{}.json", file_name_of(pin_dir)))
}

/// `pin_dir` as a file name: `/sys/fs/bpf/redirect` is `sys-fs-bpf-redirect`.
fn file_name_of(pin_dir: &Path) -> String {
    let mut out = String::new();
    for c in pin_dir.to_string_lossy().chars() {
        let c = if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
            c
        } else {
            '-'
        };
        if !(c == '-' && (out.is_empty() || out.ends_with('-'))) {
            out.push(c);
        }
    }
    let out = out.trim_end_matches('-');
    if out.is_empty() || out.chars().all(|c| c == '.') {
        "root".to_owned()
    } else {
        out.to_owned()
    }
}

/// The inode of this process's network namespace.
pub fn current_netns() -> Result<u64, NetError> {
    fs::metadata("/proc/self/ns/net")
        .map(|m| m.ino())
        .map_err(|source| NetError::Io {
            what: "reading /proc/self/ns/net".into(),
            source,
        })
}

impl HostSettings {
    /// The record for the datapath at `pin_dir`, next to `journal`, in this network namespace.
    pub fn new(journal: &Path, pin_dir: &Path) -> Result<Self, NetError> {
        Ok(Self::at(
            record_path(journal, pin_dir),
            pin_dir,
            current_netns()?,
        ))
    }

    /// The record at `path`, for `pin_dir` in network namespace `netns`.
    #[must_use]
    pub fn at(path: PathBuf, pin_dir: &Path, netns: u64) -> Self {
        Self {
            path,
            pin_dir: pin_dir.to_path_buf(),
            netns,
        }
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn error(&self, reason: impl Into<String>) -> NetError {
        NetError::HostSettings {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    /// The record, if there is one.
    pub fn load(&self) -> Result<Option<Record>, NetError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.error(e.to_string())),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| self.error(e.to_string()))
    }

    /// The record, refusing one made in another network namespace.
    fn load_here(&self) -> Result<Option<Record>, NetError> {
        match self.load()? {
            Some(r) if r.netns != self.netns => Err(self.error(format!(
                "recorded in network namespace net:[{}], this is net:[{}]; run `redirect detach` there (or restore these by hand and delete the file): {}",
                r.netns,
                self.netns,
                r.sysctls
                    .iter()
                    .map(|o| format!("{}={:?}", o.sysctl, o.value))
                    .collect::<Vec<_>>()
                    .join(" ")
            ))),
            r => Ok(r),
        }
    }

    /// Replaces the file atomically and durably.
    fn save(&self, record: &Record) -> Result<(), NetError> {
        let io = |e: io::Error| self.error(e.to_string());
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(record).map_err(|e| self.error(e.to_string()))?;
        {
            let mut f = fs::File::create(&tmp).map_err(io)?;
            io::Write::write_all(&mut f, text.as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        fs::rename(&tmp, &self.path).map_err(io)
    }

    /// Records `sysctl`'s value before a change, unless it is recorded already. Call it before
    /// changing the setting, so a crash in between loses nothing.
    pub fn remember(&self, sysctl: &str, original: &str) -> Result<(), NetError> {
        let mut record = self.load_here()?.unwrap_or_else(|| Record {
            pin_dir: self.pin_dir.clone(),
            netns: self.netns,
            sysctls: Vec::new(),
        });
        if record.remember(sysctl, original) {
            self.save(&record)?;
        }
        Ok(())
    }

    /// Writes every recorded value back with `write(name, value)`, the last change first, then
    /// deletes the record, or keeps in it only what could not be written.
    pub fn restore(
        &self,
        mut write: impl FnMut(&str, &str) -> io::Result<()>,
    ) -> Result<Vec<(Original, Outcome)>, NetError> {
        let Some(mut record) = self.load_here()? else {
            return Ok(Vec::new());
        };
        let mut done = Vec::new();
        let mut kept = Vec::new();
        for original in record.sysctls.iter().rev() {
            let outcome = match write(&original.sysctl, &original.value) {
                Ok(()) => Outcome::Restored,
                Err(e) if e.kind() == io::ErrorKind::NotFound => Outcome::Gone,
                Err(e) => {
                    kept.push(original.clone());
                    Outcome::Failed(e.to_string())
                }
            };
            done.push((original.clone(), outcome));
        }
        if kept.is_empty() {
            fs::remove_file(&self.path).map_err(|e| self.error(e.to_string()))?;
        } else {
            kept.reverse();
            record.sysctls = kept;
            self.save(&record)?;
        }
        Ok(done)
    }
}

/// Writes a sysctl (dotted name). An empty value is written as a newline, which clears a
/// list such as `ip_local_reserved_ports` (an empty write would change nothing).
pub fn write_sysctl(name: &str, value: &str) -> io::Result<()> {
    fs::write(super::sysctl_path(name), format!("{value}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("redirect-host-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn record_paths_sit_next_to_the_journal() {
        assert_eq!(
            record_path(
                Path::new("/var/lib/redirect/journal.jsonl"),
                Path::new("/sys/fs/bpf/redirect")
            ),
            Path::new("/var/lib/redirect/host-settings-sys-fs-bpf-redirect.json")
        );
        assert_eq!(
            record_path(
                Path::new("journal.jsonl"),
                Path::new("/sys/fs/bpf/lab x//1/")
            ),
            Path::new("./host-settings-sys-fs-bpf-lab-x-1.json")
        );
        assert_eq!(file_name_of(Path::new("/")), "root");
        assert_eq!(file_name_of(Path::new("/..")), "root");
    }

    #[test]
    fn the_first_original_wins() {
        let mut r = Record {
            pin_dir: "/p".into(),
            netns: 1,
            sysctls: vec![],
        };
        assert!(r.remember("net.ipv4.ip_forward", "0\n"));
        assert!(r.remember("net.ipv4.conf.all.rp_filter", "2"));
        assert!(
            !r.remember("net.ipv4.ip_forward", "1"),
            "a re-run must not record its own value"
        );
        assert_eq!(
            r.sysctls,
            vec![
                Original {
                    sysctl: "net.ipv4.ip_forward".into(),
                    value: "0".into()
                },
                Original {
                    sysctl: "net.ipv4.conf.all.rp_filter".into(),
                    value: "2".into()
                },
            ]
        );
    }

    #[test]
    fn remember_merges_across_runs_and_restore_undoes_in_reverse() {
        let tmp = TempDir::new("merge");
        // The journal's directory may not exist yet.
        let path = tmp.0.join("state").join("host-settings-p.json");
        let first = HostSettings::at(path.clone(), Path::new("/p"), 7);
        first.remember("net.ipv4.ip_forward", "0").unwrap();
        first
            .remember("net.ipv4.ip_local_reserved_ports", "")
            .unwrap();
        // A second run: the same settings now hold its values, plus one new change.
        let second = HostSettings::at(path.clone(), Path::new("/p"), 7);
        second.remember("net.ipv4.ip_forward", "1").unwrap();
        second
            .remember("net.ipv4.conf.eth1.accept_local", "0")
            .unwrap();
        let record = second.load().unwrap().unwrap();
        assert_eq!(record.netns, 7);
        assert_eq!(record.pin_dir, Path::new("/p"));
        assert_eq!(
            record
                .sysctls
                .iter()
                .map(|o| (o.sysctl.as_str(), o.value.as_str()))
                .collect::<Vec<_>>(),
            [
                ("net.ipv4.ip_forward", "0"),
                ("net.ipv4.ip_local_reserved_ports", ""),
                ("net.ipv4.conf.eth1.accept_local", "0"),
            ]
        );

        // Another network namespace neither adds to it nor restores it.
        let elsewhere = HostSettings::at(path.clone(), Path::new("/p"), 8);
        let e = elsewhere
            .remember("net.ipv4.ip_forward", "0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("net:[7], this is net:[8]"), "{e}");
        assert!(elsewhere.restore(|_, _| panic!("no write")).is_err());

        let mut written = Vec::new();
        let done = second
            .restore(|name, value| {
                written.push(format!("{name}={value}"));
                Ok(())
            })
            .unwrap();
        assert_eq!(
            written,
            [
                "net.ipv4.conf.eth1.accept_local=0",
                "net.ipv4.ip_local_reserved_ports=",
                "net.ipv4.ip_forward=0",
            ]
        );
        assert!(done.iter().all(|(_, o)| *o == Outcome::Restored));
        assert!(!path.exists(), "the record is deleted once restored");
        assert!(
            second
                .restore(|_, _| panic!("no write"))
                .unwrap()
                .is_empty(),
            "nothing recorded, nothing to do"
        );
    }

    #[test]
    fn restore_keeps_what_it_could_not_write() {
        let tmp = TempDir::new("keep");
        let path = tmp.0.join("host-settings-p.json");
        let hs = HostSettings::at(path.clone(), Path::new("/p"), 1);
        for (name, value) in [("a.gone", "0"), ("a.denied", "1"), ("a.ok", "2")] {
            hs.remember(name, value).unwrap();
        }
        let done = hs
            .restore(|name, _| match name {
                "a.gone" => Err(io::ErrorKind::NotFound.into()),
                "a.denied" => Err(io::ErrorKind::PermissionDenied.into()),
                _ => Ok(()),
            })
            .unwrap();
        let outcomes: Vec<(&str, &Outcome)> =
            done.iter().map(|(o, r)| (o.sysctl.as_str(), r)).collect();
        assert_eq!(outcomes[0], ("a.ok", &Outcome::Restored));
        assert!(matches!(outcomes[1], ("a.denied", Outcome::Failed(_))));
        assert_eq!(outcomes[2], ("a.gone", &Outcome::Gone));
        let left = hs.load().unwrap().unwrap();
        assert_eq!(
            left.sysctls,
            vec![Original {
                sysctl: "a.denied".into(),
                value: "1".into()
            }]
        );
    }
}
