//! `redirect status --watch`: a live view of the running controller for the operator watching a
//! migration, redrawn every `--interval` like `top`.
//!
//! Each frame is one `Snapshot` control request: the controller answers from what it already
//! keeps (counters, the last GC pass's connection counts, the last lag measurement), so a
//! watcher never walks the connection table. Rates are differences between two snapshots.
//!
//! Three outputs, chosen by where stdout goes:
//! - a terminal: a full-screen view (alternate screen, redrawn in place), `q` or Ctrl-C quits
//!   and the terminal is restored however the view ends;
//! - a pipe or file: the same frames as plain text, one after another, no escape codes;
//! - `--json`: one JSON object per interval (JSON lines), for scripts.

use std::{
    collections::VecDeque,
    fmt::Write as _,
    io::{IsTerminal as _, Read as _, Write as _},
    path::Path,
    time::{Duration, SystemTime},
};

use serde::Serialize;

use crate::{
    control::{self, protocol::SnapshotRequest},
    controller::Phase,
    snapshot::{Lag, Snapshot},
};

/// The shortest `--interval`: each frame is a control request and a redraw.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Lag samples kept for the history line.
const LAG_HISTORY: usize = 30;
/// The lag history's full bar is at least this: below it, lag is noise to the operator.
const LAG_BYTES_FLOOR: f64 = 64.0 * 1024.0;
const LAG_SECONDS_FLOOR: f64 = 0.1;

/// How the controller answered one poll.
#[derive(Debug)]
enum Poll {
    Answer(Box<Snapshot>),
    /// No answer; why, in words.
    Unreachable(String),
}

/// Rates between two snapshots, per second.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rates {
    /// Over this many seconds.
    pub over_s: f64,
    /// New connections to either backend.
    pub new_connections: f64,
    pub new_connections_source: f64,
    pub new_connections_target: f64,
    /// Each datapath counter's rate, in the datapath's order; `None`: the counter went
    /// backwards (the datapath was re-created), no rate this time.
    pub counters: Vec<(String, Option<f64>)>,
}

impl Rates {
    /// The rates from `prev` to `cur`, if time passed between them.
    #[must_use]
    pub fn between(prev: &Snapshot, cur: &Snapshot) -> Option<Self> {
        let dt_ns = cur.at_ns.checked_sub(prev.at_ns).filter(|&d| d > 0)?;
        #[expect(clippy::cast_precision_loss, reason = "nanoseconds between two frames")]
        let over_s = dt_ns as f64 / 1e9;
        let rate = |name: &str| {
            #[expect(clippy::cast_precision_loss, reason = "a counter's increase per frame")]
            cur.counter(name)
                .checked_sub(prev.counter(name))
                .map(|d| d as f64 / over_s)
        };
        let source = rate("new_conn_source").unwrap_or(0.0);
        let target = rate("new_conn_target").unwrap_or(0.0);
        Some(Self {
            over_s,
            new_connections: source + target,
            new_connections_source: source,
            new_connections_target: target,
            counters: cur
                .counters
                .iter()
                .map(|c| (c.name.clone(), rate(&c.name)))
                .collect(),
        })
    }
}

/// What the view remembers between frames.
#[derive(Default)]
struct History {
    /// The last snapshot the controller answered.
    last: Option<Snapshot>,
    rates: Option<Rates>,
    /// Lag in bytes and seconds, oldest first.
    lag: VecDeque<(Option<u64>, f64)>,
    /// Since when this view has seen the controller in its current cutover phase.
    phase_since: Option<(Phase, SystemTime)>,
    /// Since when the controller has not answered, and why.
    unreachable: Option<(SystemTime, String)>,
}

impl History {
    fn record(&mut self, poll: Poll, now: SystemTime) {
        match poll {
            Poll::Answer(snapshot) => {
                self.unreachable = None;
                self.rates = self
                    .last
                    .as_ref()
                    .and_then(|prev| Rates::between(prev, &snapshot));
                if let Some(l) = &snapshot.lag {
                    if self.lag.len() == LAG_HISTORY {
                        self.lag.pop_front();
                    }
                    self.lag.push_back((l.bytes, l.seconds));
                }
                if self.phase_since.is_none_or(|(p, _)| p != snapshot.phase) {
                    self.phase_since = Some((snapshot.phase, now));
                }
                self.last = Some(*snapshot);
            }
            Poll::Unreachable(why) => {
                let since = self.unreachable.as_ref().map_or(now, |(t, _)| *t);
                self.unreachable = Some((since, why));
                // A rate across the gap would average the outage in.
                self.rates = None;
            }
        }
    }
}

/// Everything a frame shows, besides the history.
struct Frame<'a> {
    now: SystemTime,
    interval: Duration,
    socket: &'a Path,
    /// Block characters for the lag history (else an ASCII ramp).
    unicode: bool,
}

/// `1234 bytes (1.2 KiB)`: the exact number a script or a person compares, and its size.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    #[expect(clippy::cast_precision_loss, reason = "one decimal shown")]
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{n} bytes ({v:.1} {})", UNITS[unit])
}

/// A one-line chart of `values` scaled to their maximum, or to `floor` if that is higher: so
/// noise (a few hundred bytes, a millisecond) draws as a flat line, not as full bars.
fn sparkline(values: impl Iterator<Item = f64>, floor: f64, unicode: bool) -> String {
    const BLOCKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    const ASCII: [char; 8] = ['_', '.', ':', '-', '=', '+', '*', '#'];
    let ramp = if unicode { BLOCKS } else { ASCII };
    let values: Vec<f64> = values.collect();
    let max = values.iter().copied().fold(floor, f64::max);
    values
        .iter()
        .map(|&v| {
            if max <= 0.0 {
                return ramp[0];
            }
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "0..=7 by construction"
            )]
            let i = ((v / max) * 7.0).round().clamp(0.0, 7.0) as usize;
            ramp[i]
        })
        .collect()
}

/// `HH:MM:SS` in local time.
fn clock(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let secs = libc::time_t::try_from(secs).unwrap_or(0);
    // SAFETY: an all-zero `tm` is valid; localtime_r only writes into it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; localtime_r is thread-safe.
    if unsafe { libc::localtime_r(&raw const secs, &raw mut tm) }.is_null() {
        return "??:??:??".into();
    }
    format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "-".into();
    }
    #[expect(clippy::cast_precision_loss, reason = "a percentage")]
    let p = part as f64 * 100.0 / whole as f64;
    format!("{p:.1}%")
}

fn rate(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{r:.1}"))
}

/// The lines of one frame.
fn render(frame: &Frame<'_>, h: &History) -> Vec<String> {
    let mut out = Vec::new();
    let mut line = |s: String| out.push(s);
    render_title(frame, h, &mut line);
    let Some(s) = &h.last else {
        line(format!(
            "   no answer yet from a controller at {} (is `redirect run` running? --socket names another)",
            frame.socket.display()
        ));
        return out;
    };
    if h.unreachable.is_some() {
        line("   what it last said:".into());
    }
    line(String::new());
    render_state(frame, s, h, &mut line);
    line(String::new());
    render_backends(s, h, &mut line);
    line(String::new());
    render_ports(s, &mut line);
    line(String::new());
    render_lag(s.lag.as_ref(), h, frame.unicode, &mut line);
    line(String::new());
    render_counters(s, h, &mut line);
    out
}

/// The title line, and whether the controller answers.
fn render_title(frame: &Frame<'_>, h: &History, line: &mut impl FnMut(String)) {
    line(format!(
        "redirect status --watch    {}    every {}    q or Ctrl-C quits",
        clock(frame.now),
        humantime::format_duration(frame.interval)
    ));
    if let Some((since, why)) = &h.unreachable {
        line(format!(
            "!! controller not reachable since {} ({why}); retrying every {}",
            clock(*since),
            humantime::format_duration(frame.interval)
        ));
    }
}

/// The VIP, the active backend, the cutover phase, the fleet and the last recovery.
fn render_state(frame: &Frame<'_>, s: &Snapshot, h: &History, line: &mut impl FnMut(String)) {
    let addr_of = |role| {
        s.backends
            .iter()
            .find(|b| Some(b.role) == role)
            .map(|b| b.addr.to_string())
    };
    line(format!(
        "vip {}    active: {}    cutover: {}",
        s.vip
            .map_or_else(|| "(not configured)".into(), |v| v.to_string()),
        match (s.active, addr_of(s.active)) {
            (Some(role), Some(addr)) => format!("{role} ({addr})"),
            (Some(role), None) => role.to_string(),
            (None, _) => "(invalid ACTIVE)".into(),
        },
        s.phase
    ));
    if s.phase != Phase::Idle {
        let seen = h
            .phase_since
            .and_then(|(_, t)| frame.now.duration_since(t).ok())
            .map_or(0, |d| d.as_secs());
        line(format!(
            ">> CUTOVER IN PROGRESS: step {} (for {seen} s){}",
            s.phase,
            s.fleet
                .as_ref()
                .map_or_else(String::new, |f| format!(", fleet epoch {}", f.epoch))
        ));
    }
    if let Some(f) = &s.fleet {
        line(format!(
            "fleet {} member {}: applied epoch {} -> {}{}",
            f.fleet,
            f.member,
            f.epoch,
            f.active,
            if f.live == Some(false) {
                "    NOT LIVE: cut off from etcd or rejoining; no cutover can pass"
            } else {
                ""
            }
        ));
    }
    if let Some(r) = &s.last_recovery {
        line(format!("last recovery: {r}"));
    }
}

/// Each backend's live and new connections, and the totals.
fn render_backends(s: &Snapshot, h: &History, line: &mut impl FnMut(String)) {
    line(format!(
        "  {:<8} {:<21} {:>10} {:>12}",
        "backend", "address", "live conns", "new conns/s"
    ));
    for b in &s.backends {
        let new = h.rates.as_ref().map(|r| match b.role {
            crate::datapath::Role::Source => r.new_connections_source,
            crate::datapath::Role::Target => r.new_connections_target,
        });
        line(format!(
            "{} {:<8} {:<21} {:>10} {:>12}",
            if Some(b.role) == s.active { "*" } else { " " },
            b.role.to_string(),
            b.addr.to_string(),
            b.connections.map_or_else(|| "-".into(), |n| n.to_string()),
            rate(new)
        ));
    }
    line(format!(
        "new connections: {}/s    tracked entries: {}{}",
        rate(h.rates.as_ref().map(|r| r.new_connections)),
        s.tracked.map_or_else(|| "-".into(), |n| n.to_string()),
        s.gc_age_ms.map_or_else(
            || " (no GC pass yet)".into(),
            |ms| format!(
                " (counts as of the GC pass {:.1} s ago)",
                Duration::from_millis(ms).as_secs_f64()
            )
        )
    ));
}

/// SNAT port use per backend and SNAT address, with a warning when it runs short.
fn render_ports(s: &Snapshot, line: &mut impl FnMut(String)) {
    line(format!(
        "  {:<8} {:<15} {:>15} {:>8}",
        "snat for", "snat address", "ports claimed", "used"
    ));
    for p in &s.ports {
        let role = s
            .backends
            .iter()
            .find(|b| b.addr == p.backend)
            .map_or_else(|| p.backend.to_string(), |b| b.role.to_string());
        #[expect(
            clippy::cast_precision_loss,
            reason = "a share of at most 65,536 ports"
        )]
        let short = p.capacity > 0 && p.claimed as f64 >= p.capacity as f64 * 0.5;
        line(format!(
            "  {role:<8} {:<15} {:>15} {:>8}{}",
            p.snat.to_string(),
            format!("{}/{}", p.claimed, p.capacity),
            percent(p.claimed, p.capacity),
            if short {
                "  <- running short: add --snat-ip or widen --snat-ports"
            } else {
                ""
            }
        ));
    }
}

/// The datapath counters that moved, with their rates.
fn render_counters(s: &Snapshot, h: &History, line: &mut impl FnMut(String)) {
    line(format!(
        "  {:<22} {:>12} {:>16}",
        "datapath counter", "per second", "total"
    ));
    for c in &s.counters {
        let per_s = h
            .rates
            .as_ref()
            .and_then(|r| r.counters.iter().find(|(n, _)| *n == c.name))
            .and_then(|(_, r)| *r);
        if c.value == 0 {
            continue;
        }
        line(format!(
            "  {:<22} {:>12} {:>16}",
            c.name,
            rate(per_s),
            c.value
        ));
    }
}

fn render_lag(lag: Option<&Lag>, h: &History, unicode: bool, line: &mut impl FnMut(String)) {
    let Some(l) = lag else {
        line("replication lag: (not measured: the controller runs without --source-dsn/--target-dsn, or has not measured yet)".into());
        return;
    };
    line(format!(
        "replication lag: {}, {:.3} s, {}",
        l.bytes.map_or_else(|| "unknown".to_owned(), bytes),
        l.seconds,
        if l.healthy {
            "healthy".to_owned()
        } else {
            format!("UNHEALTHY: {}", l.problems.join("; "))
        }
    ));
    #[expect(clippy::cast_precision_loss, reason = "a chart")]
    let chart_bytes = sparkline(
        h.lag.iter().map(|(b, _)| b.unwrap_or(0) as f64),
        LAG_BYTES_FLOOR,
        unicode,
    );
    let max_bytes = h.lag.iter().filter_map(|(b, _)| *b).max().unwrap_or(0);
    let max_secs = h.lag.iter().map(|(_, s)| *s).fold(0.0, f64::max);
    line(format!(
        "  bytes   {chart_bytes:<30}  max {} over the last {} samples",
        bytes(max_bytes),
        h.lag.len()
    ));
    line(format!(
        "  seconds {:<30}  max {max_secs:.3} s",
        sparkline(h.lag.iter().map(|(_, s)| *s), LAG_SECONDS_FLOOR, unicode)
    ));
    // With several databases, each one's own line: the worst alone hides which one lags.
    if l.databases.len() > 1 {
        for d in &l.databases {
            line(format!(
                "  {:<22} {:>24}, {:.3} s{}",
                d.database,
                d.bytes.map_or_else(|| "unknown".to_owned(), bytes),
                d.seconds,
                if d.healthy {
                    String::new()
                } else {
                    format!(", UNHEALTHY: {}", d.problems.join("; "))
                }
            ));
        }
    }
}

/// Asks the controller for a snapshot, giving up after `timeout`.
async fn poll(socket: &Path, timeout: Duration) -> Poll {
    match tokio::time::timeout(timeout, control::ask(socket, SnapshotRequest, |_| {})).await {
        Err(_) => Poll::Unreachable(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        )),
        Ok(Ok(None)) => Poll::Unreachable(format!("nothing listens on {}", socket.display())),
        Ok(Err(e)) if e.to_string().contains("unknown variant") => Poll::Unreachable(
            "the controller is an older redirect without the Snapshot request: restart it with this version".into(),
        ),
        Ok(Err(e)) => Poll::Unreachable(e.to_string()),
        Ok(Ok(Some(s))) => Poll::Answer(Box::new(s)),
    }
}

/// The terminal in the view's modes: keys unbuffered and unechoed (Ctrl-C arrives as a key,
/// so quitting goes through the same path), the alternate screen, no cursor. Dropping it
/// puts everything back, on every way out (q, a signal, an error, a panic).
struct Screen {
    /// The settings to restore; `None`: stdin is no terminal, its modes were left alone.
    saved: Option<libc::termios>,
}

impl Screen {
    fn enter() -> std::io::Result<Self> {
        let saved = if std::io::stdin().is_terminal() {
            // SAFETY: an all-zero termios is valid storage for tcgetattr to fill.
            let mut t: libc::termios = unsafe { std::mem::zeroed() };
            // SAFETY: fd 0 is a terminal and `t` is valid.
            if unsafe { libc::tcgetattr(0, &raw mut t) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut raw = t;
            raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG);
            raw.c_cc[libc::VMIN] = 1;
            raw.c_cc[libc::VTIME] = 0;
            // SAFETY: as above.
            if unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw const raw) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Some(t)
        } else {
            None
        };
        let screen = Self { saved };
        let mut out = std::io::stdout().lock();
        out.write_all(b"\x1b[?1049h\x1b[?25l\x1b[2J")?;
        out.flush()?;
        Ok(screen)
    }

    /// Redraws in place: cursor home, each line cleared to its end, the rest of the screen
    /// cleared. No full clear per frame, so nothing flickers.
    fn draw(lines: &[String]) -> std::io::Result<()> {
        let (width, height) = size().unwrap_or((80, 24));
        let mut buf = String::from("\x1b[H");
        for l in lines.iter().take(height) {
            buf.extend(l.chars().take(width));
            buf.push_str("\x1b[K\r\n");
        }
        buf.push_str("\x1b[J");
        let mut out = std::io::stdout().lock();
        out.write_all(buf.as_bytes())?;
        out.flush()
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(b"\x1b[?25h\x1b[?1049l");
        let _ = out.flush();
        if let Some(t) = &self.saved {
            // SAFETY: restoring the settings tcgetattr returned, on the same fd.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, t) };
        }
    }
}

/// The terminal's columns and rows.
fn size() -> Option<(usize, usize)> {
    // SAFETY: an all-zero winsize is valid storage for the ioctl to fill.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize into a valid pointer.
    let rc = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &raw mut ws) };
    (rc == 0 && ws.ws_col > 0 && ws.ws_row > 0)
        .then(|| (usize::from(ws.ws_col), usize::from(ws.ws_row)))
}

/// Keys from stdin, on a thread of their own (a blocking read; it ends with the process).
fn keys() -> tokio::sync::mpsc::UnboundedReceiver<u8> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut b = [0u8; 1];
        while let Ok(1) = stdin.read(&mut b) {
            if tx.send(b[0]).is_err() {
                break;
            }
        }
    });
    rx
}

/// Whether the locale says the terminal shows UTF-8 (for the block-character chart).
fn utf8_locale() -> bool {
    ["LC_ALL", "LC_CTYPE", "LANG"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .is_some_and(|v| {
            let v = v.to_ascii_lowercase();
            v.contains("utf-8") || v.contains("utf8")
        })
}

/// One `--json` line.
#[derive(Serialize)]
struct JsonFrame<'a> {
    /// Unix time, milliseconds.
    time_ms: u64,
    reachable: bool,
    /// Why the controller did not answer this time.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    /// The last answer (repeated while the controller is away; `reachable` says so).
    snapshot: Option<&'a Snapshot>,
    rates: Option<&'a Rates>,
}

/// How the frames are written.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Output {
    Screen,
    Plain,
    Json,
}

/// Runs the view until q, Ctrl-C, SIGTERM or SIGHUP.
pub fn run(socket: &Path, interval: Duration, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(
        interval >= MIN_INTERVAL,
        "--interval {} is too short: use {} or more",
        humantime::format_duration(interval),
        humantime::format_duration(MIN_INTERVAL)
    );
    crate::net::require_root()?;
    let output = if json {
        Output::Json
    } else if std::io::stdout().is_terminal() {
        Output::Screen
    } else {
        Output::Plain
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(watch(socket, interval, output))
}

async fn watch(socket: &Path, interval: Duration, output: Output) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let screen = if output == Output::Screen {
        Some(Screen::enter()?)
    } else {
        None
    };
    let mut keys = screen.as_ref().and_then(|s| s.saved.is_some().then(keys));
    let frame = |now| Frame {
        now,
        interval,
        socket,
        unicode: utf8_locale(),
    };
    let mut history = History::default();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let p = poll(socket, interval.max(Duration::from_secs(1))).await;
                let now = SystemTime::now();
                let error = match &p {
                    Poll::Unreachable(why) => Some(why.clone()),
                    Poll::Answer(_) => None,
                };
                history.record(p, now);
                match output {
                    Output::Screen => Screen::draw(&render(&frame(now), &history))?,
                    Output::Plain => {
                        let mut text = String::new();
                        for l in render(&frame(now), &history) {
                            let _ = writeln!(text, "{l}");
                        }
                        text.push('\n');
                        let mut out = std::io::stdout().lock();
                        // A closed pipe (`| head`) ends the view.
                        if out.write_all(text.as_bytes()).and_then(|()| out.flush()).is_err() {
                            return Ok(());
                        }
                    }
                    Output::Json => {
                        let line = serde_json::to_string(&JsonFrame {
                            time_ms: now
                                .duration_since(SystemTime::UNIX_EPOCH)
                                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                            reachable: error.is_none(),
                            error: error.as_deref(),
                            snapshot: history.last.as_ref(),
                            rates: history.rates.as_ref(),
                        })?;
                        let mut out = std::io::stdout().lock();
                        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                            return Ok(());
                        }
                    }
                }
            }
            key = async { keys.as_mut()?.recv().await }, if keys.is_some() => match key {
                // q, Q, Ctrl-C, Ctrl-D.
                Some(b'q' | b'Q' | 3 | 4) => break,
                Some(_) => {}
                None => keys = None,
            },
            _ = int.recv() => break,
            _ = term.recv() => break,
            _ = hup.recv() => break,
        }
    }
    drop(screen);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddrV4};

    use super::*;
    use crate::{
        datapath::Role,
        snapshot::{Backend, Counter, Ports},
    };

    fn snapshot(at_s: u64, new_source: u64, lag_bytes: u64) -> Snapshot {
        let source: SocketAddrV4 = "198.18.2.2:5432".parse().unwrap();
        Snapshot {
            at_ns: at_s * 1_000_000_000,
            vip: Some("198.18.1.1:5432".parse().unwrap()),
            active: Some(Role::Source),
            backends: vec![Backend {
                role: Role::Source,
                addr: source,
                snat: Ipv4Addr::new(198, 18, 2, 1),
                connections: Some(12),
            }],
            tracked: Some(14),
            gc_age_ms: Some(400),
            ports: vec![Ports {
                backend: source,
                snat: Ipv4Addr::new(198, 18, 2, 1),
                claimed: 15_000,
                capacity: 20_000,
            }],
            counters: vec![
                Counter {
                    name: "new_conn_source".into(),
                    value: new_source,
                },
                Counter {
                    name: "forward_tracked".into(),
                    value: 0,
                },
            ],
            lag: Some(Lag {
                bytes: Some(lag_bytes),
                databases: Vec::new(),
                seconds: 0.25,
                healthy: true,
                problems: vec![],
            }),
            phase: Phase::Idle,
            last_recovery: None,
            fleet: None,
        }
    }

    fn frame(now: SystemTime) -> Frame<'static> {
        Frame {
            now,
            interval: Duration::from_secs(1),
            socket: Path::new("/run/redirect/control.sock"),
            unicode: true,
        }
    }

    #[test]
    fn rates_are_differences_over_the_controllers_clock() {
        let r = Rates::between(&snapshot(10, 100, 0), &snapshot(12, 130, 0)).unwrap();
        assert!((r.new_connections - 15.0).abs() < 1e-9, "{r:?}");
        assert!((r.new_connections_source - 15.0).abs() < 1e-9);
        assert!(r.new_connections_target.abs() < 1e-9);
        assert!(
            Rates::between(&snapshot(12, 130, 0), &snapshot(12, 130, 0)).is_none(),
            "no time passed"
        );
        let reset = Rates::between(&snapshot(10, 100, 0), &snapshot(11, 5, 0)).unwrap();
        assert_eq!(
            reset.counters[0],
            ("new_conn_source".into(), None),
            "a counter that went backwards has no rate"
        );
    }

    #[test]
    fn sparklines_scale_to_their_maximum() {
        assert_eq!(sparkline([0.0, 5.0, 10.0].into_iter(), 1.0, true), "▁▅█");
        assert_eq!(sparkline([0.0, 0.0].into_iter(), 1.0, true), "▁▁");
        assert_eq!(sparkline([1.0, 2.0].into_iter(), 1.0, false), "=#");
        assert_eq!(
            sparkline([0.001, 0.001].into_iter(), 0.1, true),
            "▁▁",
            "noise below the floor stays flat"
        );
    }

    #[test]
    fn sizes_keep_the_exact_number() {
        assert_eq!(bytes(512), "512 bytes");
        assert_eq!(bytes(1536), "1536 bytes (1.5 KiB)");
        assert_eq!(bytes(3 << 30), "3221225472 bytes (3.0 GiB)");
    }

    #[test]
    fn a_frame_shows_what_an_operator_looks_for() {
        let now = SystemTime::now();
        let mut h = History::default();
        h.record(Poll::Answer(Box::new(snapshot(10, 100, 100))), now);
        h.record(Poll::Answer(Box::new(snapshot(11, 103, 200_000))), now);
        let text = render(&frame(now), &h).join("\n");
        for want in [
            "active: source (198.18.2.2:5432)",
            "new connections: 3.0/s",
            "replication lag: 200000 bytes (195.3 KiB), 0.250 s, healthy",
            "15000/20000    75.0%  <- running short",
            "▁█",
        ] {
            assert!(text.contains(want), "no {want:?} in:\n{text}");
        }
        let row = text
            .lines()
            .find(|l| l.starts_with("* source"))
            .expect("the active backend's row");
        assert_eq!(
            row.split_whitespace().collect::<Vec<_>>(),
            ["*", "source", "198.18.2.2:5432", "12", "3.0"]
        );
        assert!(
            !text.contains("forward_tracked"),
            "counters that never moved are left out"
        );
    }

    #[test]
    fn a_controller_that_went_away_is_shown_with_what_it_last_said() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let mut h = History::default();
        h.record(Poll::Answer(Box::new(snapshot(10, 100, 0))), t0);
        h.record(Poll::Unreachable("nothing listens".into()), t0);
        h.record(
            Poll::Unreachable("nothing listens".into()),
            t0 + Duration::from_secs(5),
        );
        let text = render(&frame(t0 + Duration::from_secs(5)), &h).join("\n");
        assert!(
            text.contains(&format!(
                "controller not reachable since {} (nothing listens)",
                clock(t0)
            )),
            "{text}"
        );
        assert!(text.contains("what it last said"), "{text}");
        assert!(text.contains("active: source"), "{text}");
        h.record(Poll::Answer(Box::new(snapshot(20, 100, 0))), t0);
        assert!(!render(&frame(t0), &h).join("\n").contains("not reachable"));
    }

    #[test]
    fn a_cutover_in_progress_stands_out() {
        let t0 = SystemTime::now();
        let mut h = History::default();
        let mut s = snapshot(10, 100, 0);
        s.phase = Phase::Fence;
        h.record(Poll::Answer(Box::new(s)), t0);
        let text = render(&frame(t0 + Duration::from_secs(3)), &h).join("\n");
        assert!(
            text.contains(">> CUTOVER IN PROGRESS: step fence (for 3 s)"),
            "{text}"
        );
    }
}
