//! `redirect status --watch` as an operator sees it (issue 11): the view runs in a detached
//! tmux session of fixed size, real clients connect through the VIP to real `PostgreSQL`, and
//! the test reads the pane (`tmux capture-pane -p`) for the numbers a person would read. Also
//! the connection counts `/metrics` and `status` take from the GC pass, as connections open
//! and close.

#![allow(
    clippy::too_many_lines,
    reason = "a lab scenario reads top to bottom as one story"
)]

use std::{
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use redirect_tests::{
    Lab, Ns, PG_PORT, SOURCE_ADDR, TARGET_ADDR, VIP, cutover_lab, redirect_bin, require_root,
    wait_for,
};

const COLS: u32 = 140;
const ROWS: u32 = 50;

/// A tmux server of the test's own (its own socket: nothing shared with anyone's tmux),
/// with one detached session of fixed size. Dropping it kills the server and whatever runs in
/// it, also when the test fails.
struct Tmux {
    socket: std::path::PathBuf,
}

impl Tmux {
    /// Runs `shell` (a `sh -c` line) in a new `COLS`x`ROWS` session.
    fn start(name: &str, shell: &str) -> Self {
        assert!(
            Path::new("/usr/bin/tmux").exists(),
            "tmux is missing: run `cargo xtask setup` (it installs the tmux package)"
        );
        let t = Self {
            socket: std::env::temp_dir()
                .join(format!("redirect-test-tmux-{name}-{}", std::process::id())),
        };
        let out = t
            .tmux()
            .args(["-u", "new-session", "-d", "-s", "watch"])
            .args(["-x", &COLS.to_string(), "-y", &ROWS.to_string()])
            .arg(shell)
            .output()
            .expect("spawning tmux");
        assert!(
            out.status.success(),
            "tmux new-session: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        t
    }

    fn tmux(&self) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-S").arg(&self.socket);
        c
    }

    /// The pane as a person sees it now.
    fn capture(&self) -> String {
        let out = self
            .tmux()
            .args(["capture-pane", "-p", "-t", "watch"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Types `keys` (tmux key names: `q`, `C-c`).
    fn keys(&self, keys: &str) {
        let ok = self
            .tmux()
            .args(["send-keys", "-t", "watch", keys])
            .status()
            .expect("tmux send-keys")
            .success();
        assert!(ok, "tmux send-keys {keys}");
    }

    /// The pane once `cond` holds on it; panics with the last pane after `timeout`.
    fn wait_for(&self, timeout: Duration, what: &str, cond: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let pane = self.capture();
            if cond(&pane) {
                return pane;
            }
            assert!(
                Instant::now() < deadline,
                "the pane did not show {what} within {timeout:?}:\n{pane}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self
            .tmux()
            .arg("kill-server")
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// `cmd` as one `sh` line, every word quoted.
fn shell_line(cmd: &Command) -> String {
    let quote = |s: &std::ffi::OsStr| format!("'{}'", s.to_string_lossy().replace('\'', r"'\''"));
    let mut words: Vec<String> = vec!["env".into()];
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            words.push(quote(&std::ffi::OsString::from(format!(
                "{}={}",
                k.to_string_lossy(),
                v.to_string_lossy()
            ))));
        }
    }
    words.push(quote(cmd.get_program()));
    words.extend(cmd.get_args().map(quote));
    words.join(" ")
}

/// The view, then what a person finds in the pane after it ends: its exit status and the
/// terminal's modes (`icanon echo isig` when restored, `-icanon` ... if left raw).
fn watch_then_report(view: &str) -> String {
    format!(
        "{view}; echo \"watch-exited=$?\"; echo \"tty-modes: $(stty -a | tr ' ;' '\\n\\n' | grep -x -e '-\\?icanon' -e '-\\?echo' -e '-\\?isig' | tr '\\n' ' ')\"; exec sleep 600"
    )
}

/// That the view ended with status 0 and left the terminal as it found it: line editing, echo
/// and signals back on, and the alternate screen left (no frame on the normal screen).
fn assert_exited_and_restored(tmux: &Tmux) {
    let pane = tmux.wait_for(Duration::from_secs(5), "the view exit", |p| {
        p.contains("tty-modes:")
    });
    assert!(pane.contains("watch-exited=0"), "{pane}");
    let modes: Vec<&str> = pane
        .lines()
        .find_map(|l| l.strip_prefix("tty-modes:"))
        .expect("the modes line")
        .split_whitespace()
        .collect();
    for mode in ["icanon", "echo", "isig"] {
        assert!(
            modes.contains(&mode),
            "the terminal was left without {mode}: {modes:?}\n{pane}"
        );
    }
    assert!(
        !pane.contains("redirect status --watch"),
        "the view's frame is left on the normal screen:\n{pane}"
    );
}

/// The words of the backend row for `role` (`*` marks the active one): address, live
/// connections, new connections per second.
fn backend_row<'a>(pane: &'a str, role: &str) -> Option<Vec<&'a str>> {
    pane.lines().find_map(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        match words.as_slice() {
            // The address has a port: the SNAT rows (`source 198.18.1.1 3/20000 0.0%`) do not.
            ["*", r, rest @ ..] | [r, rest @ ..]
                if *r == role && rest.len() == 3 && rest[0].contains(':') =>
            {
                Some(rest.to_vec())
            }
            _ => None,
        }
    })
}

/// Live connections the view shows for `role`.
fn live(pane: &str, role: &str) -> Option<u64> {
    backend_row(pane, role)?.get(1)?.parse().ok()
}

/// The number right after `label` on its line (`new connections: 6.0/s` -> 6.0).
fn number_after(pane: &str, label: &str) -> Option<f64> {
    let rest = pane.lines().find_map(|l| l.split_once(label))?.1;
    let word: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    word.parse().ok()
}

/// `redirect_connections{backend="<role>"}` from the controller's `/metrics`.
fn metric_connections(lab: &Lab, role: &'static str) -> Option<u64> {
    let body = lab.in_ns(Ns::Proxy, || {
        use std::io::{Read as _, Write as _};
        let mut s = TcpStream::connect("127.0.0.1:9187").expect("the metrics port");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    });
    let series = format!("redirect_connections{{backend=\"{role}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .and_then(|v| v.trim().parse().ok())
}

/// Opens `n` connections through the VIP, one every `every`, from the client namespace, and
/// holds them until told to close them all (PostgreSQL waits a minute for a startup packet).
fn open_and_hold(
    lab: &Lab,
    n: usize,
    every: Duration,
) -> (std::sync::mpsc::Sender<()>, std::thread::JoinHandle<usize>) {
    let (close, closed) = std::sync::mpsc::channel::<()>();
    let held = lab.spawn_in_ns(Ns::Client, move || {
        let addr = format!("{VIP}:{PG_PORT}");
        let mut held = Vec::new();
        for _ in 0..n {
            let s =
                TcpStream::connect_timeout(&addr.parse().expect("the VIP"), Duration::from_secs(5))
                    .expect("connecting through the VIP");
            held.push(s);
            std::thread::sleep(every);
        }
        let _ = closed.recv_timeout(Duration::from_secs(50));
        held.len()
    });
    (close, held)
}

/// What a DBA watching a migration reads off the view, checked as numbers: the active backend
/// by name and address, the connections a bounded load opens (counted, then gone once closed),
/// new connections per second while they open, the replication lag with its history; the
/// same counts in `/metrics` and `status`; a cutover's step while it runs, then the new
/// backend; the view surviving its controller going away; and `q` ending it with the
/// terminal restored.
#[test]
fn the_watch_view_shows_a_migration_as_numbers_and_quits_cleanly() {
    const CONNS: usize = 30;
    const EVERY: Duration = Duration::from_millis(150);
    let mut c = cutover_lab::setup("watch", &[]);
    let view = format!(
        "{} status --watch --interval 1s",
        shell_line(&c.lab.redirect_cmd())
    );
    let tmux = Tmux::start("watch", &watch_then_report(&view));

    // Before any client: the active backend named with its address, nobody connected, and
    // the lag measured (it is measured every second once the controller knows the databases).
    let pane = tmux.wait_for(Duration::from_secs(15), "the first frames", |p| {
        live(p, "source").is_some() && number_after(p, "over the last").is_some_and(|n| n >= 2.0)
    });
    assert!(
        pane.contains(&format!("active: source ({SOURCE_ADDR}:{PG_PORT})")),
        "{pane}"
    );
    assert_eq!(live(&pane, "source"), Some(0), "{pane}");
    let lag_bytes = number_after(&pane, "replication lag:");
    assert!(lag_bytes.is_some(), "no lag figure in bytes:\n{pane}");
    assert!(
        pane.lines()
            .any(|l| l.starts_with("replication lag:") && l.contains(" s, healthy")),
        "no lag in seconds, or replication not healthy:\n{pane}"
    );

    // While connections open (about 6.7 a second), the view's rate shows them.
    let (close, held) = open_and_hold(&c.lab, CONNS, EVERY);
    let opening_for = EVERY * u32::try_from(CONNS).expect("a few");
    let started = Instant::now();
    let mut rates = Vec::new();
    while started.elapsed() < opening_for {
        if let Some(r) = number_after(&tmux.capture(), "new connections:") {
            rates.push(r);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let busiest = rates.iter().copied().fold(0.0, f64::max);
    assert!(
        (3.0..=15.0).contains(&busiest),
        "new connections/s while opening ~6.7 a second: {rates:?}\n{}",
        tmux.capture()
    );
    let source_rate: f64 = backend_row(&tmux.capture(), "source")
        .and_then(|r| r[2].parse().ok())
        .unwrap_or(-1.0);
    assert!(source_rate >= 0.0, "the source row has no new conns/s");

    // Every connection counted on the source (as of a GC pass, 1 s by default), none on the
    // target; /metrics and status say the same.
    let pane = tmux.wait_for(Duration::from_secs(5), "all connections counted", |p| {
        live(p, "source") == Some(CONNS as u64)
    });
    assert_eq!(live(&pane, "target"), Some(0), "{pane}");
    eprintln!("what the operator sees with {CONNS} connections open:\n{pane}");
    assert_eq!(
        metric_connections(&c.lab, "source"),
        Some(CONNS as u64),
        "/metrics"
    );
    assert_eq!(
        c.lab.status()["backends"]["source"]["connections"],
        CONNS as u64,
        "status"
    );
    // Once the connections stopped coming, the rate falls back to nothing.
    let pane = tmux.wait_for(Duration::from_secs(5), "the rate back at 0", |p| {
        number_after(p, "new connections:") == Some(0.0)
    });
    assert!(
        pane.contains("new_conn_source"),
        "the counters list the new connections:\n{pane}"
    );

    // Closed: gone from every count within a GC interval or two.
    close.send(()).expect("the client thread");
    assert_eq!(held.join().expect("client thread"), CONNS);
    let closed_at = Instant::now();
    tmux.wait_for(
        Duration::from_secs(3),
        "closed connections uncounted",
        |p| live(p, "source") == Some(0),
    );
    wait_for(Duration::from_secs(3), "/metrics to count 0", || {
        metric_connections(&c.lab, "source") == Some(0)
    });
    assert!(
        closed_at.elapsed() < Duration::from_secs(3),
        "closed connections counted for {:?}",
        closed_at.elapsed()
    );

    // A cutover while a few connections stay open on the source: its drain waits for them
    // (up to --drain-timeout), and the view shows the step it is at; then the new backend.
    let (close, held) = open_and_hold(&c.lab, 3, Duration::ZERO);
    let flip =
        cutover_lab::flip_in_background(&c.lab, &["--to", "target", "--drain-timeout", "4s"]);
    let pane = tmux.wait_for(Duration::from_secs(20), "the cutover in progress", |p| {
        p.contains(">> CUTOVER IN PROGRESS: step ")
    });
    eprintln!("during the cutover:\n{pane}");
    let out = flip.join().expect("the flip");
    assert!(
        out.status.success(),
        "the cutover failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    tmux.wait_for(Duration::from_secs(3), "the new active backend", |p| {
        p.contains(&format!("active: target ({TARGET_ADDR}:{PG_PORT})"))
            && p.contains("cutover: idle")
            && !p.contains("CUTOVER IN PROGRESS")
    });
    close.send(()).expect("the client thread");
    held.join().expect("client thread");

    // The controller goes away: the view says since when, keeps its last figures, and keeps
    // running (retrying) instead of crashing.
    let controller = c.lab.redirect_pid().expect("the controller");
    Arc::get_mut(&mut c.lab)
        .expect("no one else holds the lab")
        .signal(controller, libc::SIGTERM);
    let pane = tmux.wait_for(Duration::from_secs(5), "the controller gone", |p| {
        p.contains("controller not reachable since")
    });
    assert!(pane.contains("what it last said"), "{pane}");
    assert!(!pane.contains("watch-exited"), "the view ended:\n{pane}");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        tmux.capture().contains("controller not reachable since"),
        "{}",
        tmux.capture()
    );

    tmux.keys("q");
    assert_exited_and_restored(&tmux);
}

/// Without a controller the view says so and keeps retrying; Ctrl-C ends it like `q` and
/// restores the terminal. Not on a terminal, `--json` gives one JSON object per interval.
#[test]
fn without_a_controller_the_view_waits_and_ctrl_c_restores_the_terminal() {
    require_root();
    let socket = std::env::temp_dir().join(format!("redirect-watch-{}.sock", std::process::id()));
    let mut cmd = Command::new(redirect_bin());
    cmd.arg("--socket")
        .arg(&socket)
        .args(["status", "--watch", "--interval", "200ms"]);
    let tmux = Tmux::start("nocontroller", &watch_then_report(&shell_line(&cmd)));
    let pane = tmux.wait_for(Duration::from_secs(5), "the view", |p| {
        p.contains("controller not reachable since")
    });
    assert!(pane.contains("is `redirect run` running?"), "{pane}");
    std::thread::sleep(Duration::from_millis(600));
    assert!(!tmux.capture().contains("watch-exited"), "the view gave up");
    tmux.keys("C-c");
    assert_exited_and_restored(&tmux);

    let mut child = cmd
        .arg("--json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the view");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(
        child.stdout.take().expect("stdout"),
    ));
    for _ in 0..2 {
        let line = lines.next().expect("a JSON line").expect("reading");
        let frame: serde_json::Value = serde_json::from_str(&line).expect("one JSON object");
        assert_eq!(frame["reachable"], false, "{frame}");
        assert!(
            frame["error"]
                .as_str()
                .is_some_and(|e| e.contains("nothing listens")),
            "{frame}"
        );
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(i32::try_from(child.id()).expect("pid"), libc::SIGTERM) };
    let status = child.wait().expect("waiting for the view");
    assert!(status.success(), "SIGTERM ends the view cleanly: {status}");
}

/// `/metrics` at scale: with 50,000 tracked connections, the per-backend count is right (the
/// GC pass counts them) and a scrape stays cheap, because it no longer walks the table. A
/// scrape that walked it (one map lookup per entry, under the maps lock) took about as long
/// as a GC pass, on every scrape.
#[test]
fn a_scrape_with_fifty_thousand_connections_reads_the_gc_count_quickly() {
    use redirect_common::ct::{self, CtEntry, CtKey};
    const N: u32 = 50_000;
    require_root();
    let mut lab = Lab::new("watch-scale");
    lab.start_redirect(&[]);
    {
        let mut maps = redirect::datapath::Maps::open(&lab.pin_dir).expect("the pinned maps");
        let source: std::net::Ipv4Addr = SOURCE_ADDR.parse().expect("the source address");
        let vip: std::net::Ipv4Addr = VIP.parse().expect("the VIP");
        for i in 0..N {
            let [_, hi, mid, lo] = i.to_be_bytes();
            let key = CtKey {
                client_addr_be: u32::from(std::net::Ipv4Addr::new(198, 19, mid, lo)).to_be(),
                vip_addr_be: u32::from(vip).to_be(),
                client_port_be: (1024 + u16::from(hi)).to_be(),
                vip_port_be: PG_PORT.to_be(),
            };
            // Established, and seen "in the future": no GC pass forgets them during the test.
            let entry = CtEntry {
                created_ns: redirect::clock::monotonic_ns(),
                last_seen_ns: u64::MAX / 2,
                backend_addr_be: u32::from(source).to_be(),
                backend_port_be: PG_PORT.to_be(),
                snat_addr_be: 1,
                snat_port_be: 1,
                flags: ct::FLAG_SEEN_NON_SYN,
                ..CtEntry::default()
            };
            maps.ct.insert(key, entry, 0).expect("prefilling CT");
        }
    }
    wait_for(Duration::from_secs(10), "a GC pass to count them", || {
        metric_connections(&lab, "source") == Some(u64::from(N))
    });
    let mut took = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        assert_eq!(metric_connections(&lab, "source"), Some(u64::from(N)));
        took.push(started.elapsed());
    }
    took.sort();
    let median = took[took.len() / 2];
    eprintln!("/metrics with {N} tracked connections: median scrape {median:?} ({took:?})");
    assert!(
        median < Duration::from_millis(50),
        "a scrape with {N} connections took {median:?}: does it walk the table again?"
    );
}
