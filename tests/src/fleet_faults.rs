//! The fleet under etcd faults (docs/reliability.md, "The fleet under etcd faults"): the
//! faults, the protocol steps they strike at, and what a run checks: one backend behind every
//! VIP at every probe, no acknowledged write lost, no client kept waiting, and a flip that
//! succeeds without a restart once the fault heals.
//!
//! Shared by the CI tests (tests/tests/fleet_faults.rs) and the full set behind
//! `cargo xtask faults --fleet` (src/bin/fleet_faults.rs).

use std::{
    process::{Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{Lab, Ns, VIP, fleet::Etcd, fleet_lab::FleetLab};

/// The member lease's TTL (redirect's `fleet::member::LEASE_TTL`).
pub const LEASE: Duration = Duration::from_secs(10);

/// Longer than the lease: every member's lease expires while etcd is away.
pub const PAST_THE_LEASE: Duration = Duration::from_secs(15);

/// What goes wrong with etcd, or with one member's way to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Every etcd node SIGSTOPped for [`PAST_THE_LEASE`]: connections stay open, nothing
    /// answers, every lease expires.
    PausedPastTheLease,
    /// The etcd leader SIGKILLed (restarted after 5 s).
    LeaderKilled,
    /// proxy-1 cut off from etcd for 4 s: its lease survives, its stream breaks.
    PartitionShort,
    /// proxy-1 cut off from etcd for [`PAST_THE_LEASE`]: its lease expires.
    PartitionLong,
    /// Every etcd answer up to 200 ms late, for 10 s ([`Etcd::slow`]: this kernel has no
    /// netem).
    Slow,
    /// proxy-1's controller SIGKILLed and restarted 3 s later (its datapath stays pinned).
    MemberKilled,
}

impl Fault {
    pub const ALL: [Self; 6] = [
        Self::PausedPastTheLease,
        Self::LeaderKilled,
        Self::PartitionShort,
        Self::PartitionLong,
        Self::Slow,
        Self::MemberKilled,
    ];

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::PausedPastTheLease => "etcd paused 15 s (past the lease)",
            Self::LeaderKilled => "etcd leader killed",
            Self::PartitionShort => "member partitioned 4 s (within the lease)",
            Self::PartitionLong => "member partitioned 15 s (past the lease)",
            Self::Slow => "etcd slowed (answers up to 200 ms late)",
            Self::MemberKilled => "member SIGKILLed, restarted",
        }
    }

    /// How long the fault lasts before it heals.
    #[must_use]
    pub fn lasts(self) -> Duration {
        match self {
            Self::PausedPastTheLease | Self::PartitionLong => PAST_THE_LEASE,
            Self::LeaderKilled => Duration::from_secs(5),
            Self::PartitionShort => Duration::from_secs(4),
            Self::Slow => Duration::from_secs(10),
            Self::MemberKilled => Duration::from_secs(3),
        }
    }
}

/// What an injected fault needs to be healed.
#[derive(Clone, Copy, Debug)]
pub enum Injected {
    Paused,
    Killed(usize),
    Partitioned(usize),
    Slowed,
    MemberDown(usize),
}

/// Injects `fault` into `fl` now.
pub fn inject(fl: &mut FleetLab, fault: Fault) -> Injected {
    match fault {
        Fault::PausedPastTheLease => {
            fl.etcd.pause();
            Injected::Paused
        }
        Fault::LeaderKilled => {
            let leader = fl.etcd.leader().expect("an etcd leader");
            fl.etcd.kill(leader);
            Injected::Killed(leader)
        }
        Fault::PartitionShort | Fault::PartitionLong => {
            Etcd::disconnect(&fl.proxies[1]);
            Injected::Partitioned(1)
        }
        Fault::Slow => {
            fl.etcd.slow(200);
            Injected::Slowed
        }
        Fault::MemberKilled => {
            fl.stop_member(1, libc::SIGKILL);
            Injected::MemberDown(1)
        }
    }
}

/// Undoes what [`inject`] did.
pub fn heal(fl: &mut FleetLab, injected: Injected) {
    match injected {
        Injected::Paused => fl.etcd.resume(),
        Injected::Killed(node) => fl.etcd.start(node),
        Injected::Partitioned(i) => Etcd::reconnect(&fl.proxies[i]),
        Injected::Slowed => fl.etcd.unslow(),
        Injected::MemberDown(i) => {
            fl.start_member(i, &[]);
        }
    }
}

/// `redirect flip --to <to>` on `lab`, with its wall time.
#[must_use]
pub fn timed_flip(lab: &Lab, to: &str) -> (Output, Duration) {
    let t = Instant::now();
    let out = lab.redirect(&["flip", "--to", to]);
    (out, t.elapsed())
}

/// Asks `lab` to flip to `to` until one succeeds, for up to `within`: the time from the call
/// to the success, and the last refusal if none succeeded. Each refusal must be quick and say
/// what is wrong (a fleet that cannot cut over yet refuses, changing nothing).
pub fn flip_until_it_succeeds(lab: &Lab, to: &str, within: Duration) -> Result<Duration, String> {
    let started = Instant::now();
    let mut last = String::new();
    while started.elapsed() < within {
        let (out, _) = timed_flip(lab, to);
        if out.status.success() {
            return Ok(started.elapsed());
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(last)
}

/// Waits up to `within` until `lab`'s member says it is live and in sync; how long it took.
pub fn wait_live(lab: &Lab, within: Duration) -> Result<Duration, serde_json::Value> {
    let started = Instant::now();
    loop {
        let status = lab.status();
        if status["fleet"]["live"] == true && status["fleet"]["in_sync"] == true {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= within {
            return Err(status["fleet"].clone());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Probes every VIP at once, every 250 ms, from each proxy's client namespace: which server a
/// new connection reaches (`None`: it did not connect within 2 s, as a held or dropped SYN).
pub struct Prober {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Sample>>>,
}

/// One probe: sent at `sent`, answered by `backend` no later than `answered`. The member's
/// routing decision for it lies in between.
#[derive(Clone, Debug)]
pub struct Sample {
    pub vip: usize,
    pub sent: Instant,
    pub answered: Instant,
    pub backend: Option<String>,
}

/// What the probes saw.
#[derive(Debug, Default)]
pub struct Probes {
    pub rounds: usize,
    /// Probes that did not connect within 2 s (held, or dropped by a member that could not
    /// confirm its hold): never sent to a server the fleet had left.
    pub unanswered: usize,
    /// The most changes of backend that are provably in order: along a chain of probes each
    /// sent after the one before it was answered (on any VIP). A fleet that never splits
    /// changes backend once per flip that took effect, however the members' timings fall; a
    /// split (one VIP still sending new connections to the old server after another sent one
    /// to the new) shows as more.
    pub changes: usize,
}

impl Probes {
    fn of(samples: &[Sample], vips: usize) -> Self {
        let rounds = samples.len() / vips.max(1);
        let unanswered = samples.iter().filter(|s| s.backend.is_none()).count();
        let mut answered: Vec<&Sample> = samples.iter().filter(|s| s.backend.is_some()).collect();
        answered.sort_by_key(|s| s.sent);
        // changes[i]: the most backend changes along a chain ending at answered[i].
        let mut changes = vec![0usize; answered.len()];
        for i in 0..answered.len() {
            for j in 0..i {
                if answered[j].answered < answered[i].sent {
                    let step = usize::from(answered[j].backend != answered[i].backend);
                    changes[i] = changes[i].max(changes[j] + step);
                }
            }
        }
        Self {
            rounds,
            unanswered,
            changes: changes.into_iter().max().unwrap_or(0),
        }
    }
}

impl Prober {
    #[must_use]
    pub fn start(fl: &FleetLab) -> Self {
        let namespaces: Vec<String> = fl.proxies.iter().map(|l| l.ns(Ns::Client)).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut samples = Vec::new();
                // Bounded: at most 10 minutes of rounds whatever the test does.
                let until = Instant::now() + Duration::from_secs(600);
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    let children: Vec<_> = namespaces
                        .iter()
                        .map(|ns| {
                            let sent = Instant::now();
                            let child = Command::new("ip")
                                .args(["netns", "exec", ns, "psql", "-X", "-At", "-h", VIP])
                                .args(["-U", "postgres", "-d", "postgres", "-c"])
                                .arg("SHOW cluster_name")
                                .env("PGCONNECT_TIMEOUT", "2")
                                .stdout(Stdio::piped())
                                .stderr(Stdio::null())
                                .spawn()
                                .expect("spawning psql");
                            (sent, child)
                        })
                        .collect();
                    for (vip, (sent, child)) in children.into_iter().enumerate() {
                        let out = child.wait_with_output().expect("psql");
                        samples.push(Sample {
                            vip,
                            sent,
                            answered: Instant::now(),
                            backend: out
                                .status
                                .success()
                                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned()),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
                samples
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops probing and counts what was seen.
    #[must_use]
    pub fn finish(mut self) -> Probes {
        self.stop.store(true, Ordering::Relaxed);
        let samples = self
            .thread
            .take()
            .expect("not finished yet")
            .join()
            .expect("the prober");
        let vips = samples.iter().map(|s| s.vip + 1).max().unwrap_or(1);
        Probes::of(&samples, vips)
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The other backend's name.
#[must_use]
pub fn other(backend: &str) -> &'static str {
    if backend == "source" {
        "target"
    } else {
        "source"
    }
}

/// The fleet protocol's steps a fault strikes at: the leader pauses just before each (a
/// fault point, `REDIRECT_FAULT_PAUSE`) and the fault is injected during the pause.
/// - `hold`: before the `Hold` epoch is committed;
/// - `acks`: the `Hold` is committed, the members are applying it and acknowledging;
/// - `flip`: every member held and fenced, the barrier passed: before the commit;
/// - `release`: committed, before the leader waits for the members to apply it.
pub const STEPS: [&str; 4] = ["hold", "acks", "flip", "release"];

/// How long the leader pauses at the fault point.
const PAUSE_MS: u32 = 1500;

/// What one case saw.
#[derive(Debug)]
pub struct Outcome {
    pub fault: Fault,
    pub step: &'static str,
    /// The faulted flip: "committed" or "refused/rolled back", with its wall time.
    pub flip: String,
    /// The backend every member serves once the fault healed.
    pub ended_on: String,
    /// Flips that took effect while probing (the faulted one, if it committed, and the one
    /// after the heal): the backend changes the probes may show without a split.
    pub flips: usize,
    pub probes: Probes,
    pub acked: usize,
    pub lost: usize,
    pub max_wait: Duration,
    /// From the heal to the first successful flip after it (`None`: none within 2× lease).
    pub recovered: Option<Duration>,
}

/// One case on a running two-member fleet: restarts proxy-0's controller with the fault
/// point at `step`, starts a flip there under the workload, injects `fault` at the pause,
/// heals it after [`Fault::lasts`], then checks the outcomes and flips once more.
pub fn run_case(fl: &mut FleetLab, fault: Fault, step: &'static str, round: i32) -> Outcome {
    fl.proxies[0].redirect_env = vec![
        ("REDIRECT_FAULT_PAUSE".into(), step.into()),
        ("REDIRECT_FAULT_PAUSE_MS".into(), PAUSE_MS.to_string()),
    ];
    fl.stop_member(0, libc::SIGTERM);
    fl.start_member(0, &[]);
    for lab in &fl.proxies {
        wait_live(lab, Duration::from_secs(30)).expect("every member live before the case");
    }
    let from = crate::fleet_lab::new_connection_lands_on(&fl.proxies[0]);
    let to = other(&from);
    let load = fl.workload_round(round, 40);
    std::thread::sleep(Duration::from_secs(2));
    let probing = Prober::start(fl);
    let flip_started = Instant::now();
    let flip = crate::cutover_lab::flip_in_background(&fl.proxies[0], &["--to", to]);
    let paused = format!("step=\"{step}\"");
    let reached = (0..150).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        let log = fl.proxies[0].last_redirect_log();
        log.lines()
            .any(|l| l.contains("fault point: pausing") && l.contains(&paused))
    });
    let injected = inject(fl, fault);
    std::thread::sleep(fault.lasts());
    heal(fl, injected);
    let healed = Instant::now();
    let out = flip.join().expect("the flip");
    let flip_took = flip_started.elapsed();
    let flip = format!(
        "{from} → {to}: {} ({:.1} s){}",
        if out.status.success() {
            "committed"
        } else {
            "refused or rolled back"
        },
        flip_took.as_secs_f64(),
        if reached {
            ""
        } else {
            ", fault point not reached"
        }
    );
    let mut ended: Vec<String> = Vec::new();
    for lab in &fl.proxies {
        let _ = wait_live(lab, 2 * LEASE);
        ended.push(crate::fleet_lab::new_connection_lands_on(lab));
    }
    ended.dedup();
    let ended_on = ended.join("/");
    let next = other(&ended[0]);
    let recovered = flip_until_it_succeeds(&fl.proxies[1], next, 2 * LEASE)
        .ok()
        .map(|_| healed.elapsed());
    let flips =
        usize::from(ended.len() == 1 && ended[0] != from) + usize::from(recovered.is_some());
    let probes = probing.finish();
    let verdicts: Vec<crate::workload::Verdict> = load
        .into_iter()
        .map(|h| h.join().expect("workload"))
        .collect();
    let final_backend = crate::fleet_lab::new_connection_lands_on(&fl.proxies[0]);
    let rows = fl.rows(
        if final_backend == "target" {
            Ns::Target
        } else {
            Ns::Source
        },
        "",
    );
    let acked: Vec<(i32, i64)> = verdicts
        .iter()
        .flat_map(crate::workload::Verdict::acked)
        .collect();
    Outcome {
        fault,
        step,
        flip,
        ended_on,
        flips,
        probes,
        lost: acked.iter().filter(|a| !rows.contains(a)).count(),
        acked: acked.len(),
        max_wait: verdicts
            .iter()
            .map(crate::workload::Verdict::max_wait)
            .max()
            .unwrap_or_default(),
        recovered,
    }
}

/// The markdown table of `outcomes`.
#[must_use]
pub fn table(outcomes: &[Outcome]) -> String {
    use std::fmt::Write as _;
    let mut s = String::from(
        "| fault | at step | faulted flip (from → to) | ended on | backend changes seen / flips | probes unanswered / all | acked writes | lost | longest client wait | next flip succeeded after the heal |\n|---|---|---|---|---|---|---:|---:|---:|---|\n",
    );
    for o in outcomes {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {}{} / {} | {} / {} | {} | {} | {:.2} s | {} |",
            o.fault.name(),
            o.step,
            o.flip,
            o.ended_on,
            o.probes.changes,
            if o.probes.changes > o.flips {
                " **SPLIT**"
            } else {
                ""
            },
            o.flips,
            o.probes.unanswered,
            o.probes.rounds * 2,
            o.acked,
            o.lost,
            o.max_wait.as_secs_f64(),
            o.recovered.map_or_else(
                || "**no, not within 20 s**".to_owned(),
                |d| format!("{:.1} s", d.as_secs_f64())
            )
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(vip: usize, sent_ms: u64, answered_ms: u64, backend: &str) -> Sample {
        let t0 = Instant::now();
        Sample {
            vip,
            sent: t0 + Duration::from_millis(sent_ms),
            answered: t0 + Duration::from_millis(answered_ms),
            backend: Some(backend.to_owned()),
        }
    }

    #[test]
    fn a_probe_held_across_the_commit_is_one_change_not_a_split() {
        // VIP 0 answered by the source just before its member held; VIP 1's probe, sent at
        // the same moment, was held and released to the target: no order between them.
        let samples = [
            sample(0, 0, 30, "source"),
            sample(1, 0, 400, "target"),
            sample(0, 450, 480, "target"),
            sample(1, 450, 480, "target"),
        ];
        assert_eq!(Probes::of(&samples, 2).changes, 1);
    }

    #[test]
    fn the_old_server_answering_after_the_new_one_did_is_a_split() {
        let samples = [
            sample(0, 0, 30, "source"),
            sample(1, 100, 130, "target"),
            sample(0, 200, 230, "source"),
            sample(1, 300, 330, "target"),
        ];
        assert_eq!(Probes::of(&samples, 2).changes, 3);
    }
}
