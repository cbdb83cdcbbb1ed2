//! `cargo xtask bench [--quick]`: redirect against direct routing, iptables DNAT, HAProxy and
//! PgBouncer, side by side in one lab and one run, interleaved round by round so machine noise
//! hits every path alike. Writes docs/benchmarks.md and SVG plots. Every number comes from
//! this run.
//!
//! `cargo xtask bench --profile`: where the datapath's time goes. `perf record` (cpu-clock,
//! system-wide) over `pgbench -S -c 8` through redirect XDP, then the kernel symbols by self
//! time: the program itself (`bpf_prog_*_redirect_xdp`) and each helper it calls.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss,
    clippy::many_single_char_names,
    clippy::cast_possible_wrap,
    reason = "a measurement report: counts and percentiles become floats and back"
)]
#![allow(
    clippy::too_many_lines,
    reason = "a measurement run reads top to bottom as one story, like a lab scenario"
)]

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::PathBuf,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use redirect::datapath::{Maps, Role};
use redirect_common::ct::{CtEntry, CtKey};
use redirect_tests::{
    Lab, Ns, SOURCE_ADDR, VIP,
    pg::{self, PG_BIN},
    plot::svg_lines,
    require_root, workload,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Path_ {
    Direct,
    Floor,
    Xdp,
    XdpFibEveryPacket,
    Tc,
    Skb,
    Iptables,
    Haproxy,
    Pgbouncer,
}

impl Path_ {
    const ALL: [Self; 9] = [
        Self::Direct,
        Self::Floor,
        Self::Xdp,
        Self::XdpFibEveryPacket,
        Self::Tc,
        Self::Skb,
        Self::Iptables,
        Self::Haproxy,
        Self::Pgbouncer,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct (routed, no NAT)",
            Self::Floor => "XDP floor (fib_lookup + redirect, no NAT)",
            Self::Xdp => "redirect XDP (driver)",
            Self::XdpFibEveryPacket => "redirect XDP, FIB every packet (no next-hop cache)",
            Self::Tc => "redirect TC",
            Self::Skb => "redirect XDP (generic)",
            Self::Iptables => "iptables DNAT+SNAT",
            Self::Haproxy => "HAProxy mode tcp",
            Self::Pgbouncer => "PgBouncer session",
        }
    }

    fn host(self) -> &'static str {
        if self.routed() { SOURCE_ADDR } else { VIP }
    }

    /// Routed straight to the source (no VIP, no NAT).
    fn routed(self) -> bool {
        matches!(self, Self::Direct | Self::Floor)
    }

    /// The program whose `bpf_stats` give this path's cost per packet.
    fn program(self) -> Option<&'static str> {
        match self {
            Self::Floor => Some("xdp_floor"),
            Self::Xdp | Self::XdpFibEveryPacket => Some("redirect_xdp"),
            Self::Tc => Some("redirect_tc"),
            _ => None,
        }
    }
}

use redirect_tests::pgbench::{Sample, Scenario};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(v, 0.5)
}

struct Bench {
    lab: Arc<Lab>,
    out_dir: PathBuf,
    secs: u64,
    /// The floor forwarder while its path is set up (dropping it detaches it).
    floor: Option<aya::Ebpf>,
}

impl Bench {
    fn pgbench(&self, path: Path_, s: Scenario, tag: &str) -> Sample {
        redirect_tests::pgbench::run(&self.lab, Ns::Client, path.host(), s, self.secs, tag)
    }

    fn setup(&mut self, path: Path_) -> Option<u32> {
        self.setup_to(path, 5432)
    }

    /// Sets up `path` from the VIP (port 5432) to the source's `port`.
    fn setup_to(&mut self, path: Path_, port: u16) -> Option<u32> {
        let lab = Arc::get_mut(&mut self.lab).expect("the bench owns the lab");
        match path {
            Path_::Direct => None,
            Path_::Floor => {
                self.floor = Some(attach_floor(lab));
                None
            }
            Path_::Xdp | Path_::XdpFibEveryPacket | Path_::Tc | Path_::Skb => {
                let hook = match path {
                    Path_::Xdp | Path_::XdpFibEveryPacket => "xdp",
                    Path_::Tc => "tc",
                    _ => "xdp-generic",
                };
                let mut args: Vec<String> = lab.run_args();
                let i = args.iter().position(|a| a == "--source").expect("--source");
                args[i + 1] = format!("{SOURCE_ADDR}:{port}");
                args.extend(["--hook".into(), hook.into(), "--once".into()]);
                if path == Path_::XdpFibEveryPacket {
                    args.push("--fib-every-packet".into());
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                lab.redirect_ok(&args);
                None
            }
            Path_::Iptables => {
                for rule in [
                    format!(
                        "-t nat -A PREROUTING -d 198.18.1.1 -p tcp --dport 5432 -j DNAT --to-destination 198.18.2.2:{port}"
                    ),
                    format!(
                        "-t nat -A POSTROUTING -d 198.18.2.2 -p tcp --dport {port} -j MASQUERADE"
                    ),
                ] {
                    let mut argv = vec!["iptables"];
                    argv.extend(rule.split(' '));
                    lab.exec_ok(Ns::Proxy, &argv);
                }
                None
            }
            Path_::Haproxy => {
                let cfg = lab.work_dir.join("haproxy.cfg");
                std::fs::write(
                    &cfg,
                    format!(
                        "global\n  maxconn 4096\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n\
                         listen pg\n  bind 198.18.1.1:5432\n  server source 198.18.2.2:{port}\n"
                    ),
                )
                .unwrap();
                let pid = lab.spawn(
                    Ns::Proxy,
                    &["haproxy", "-db", "-f", &cfg.display().to_string()],
                    "haproxy.log",
                );
                wait_port(lab, VIP);
                Some(pid)
            }
            Path_::Pgbouncer => {
                let ini = lab.work_dir.join("pgbouncer.ini");
                std::fs::write(
                    &ini,
                    format!(
                        "[databases]\npostgres = host=198.18.2.2 port=5432\n[pgbouncer]\nlisten_addr = 198.18.1.1\nlisten_port = 5432\n\
                         auth_type = trust\nauth_file = {}\npool_mode = session\nmax_client_conn = 2000\ndefault_pool_size = 100\n\
                         unix_socket_dir =\nlogfile = {}\n",
                        lab.work_dir.join("userlist.txt").display(),
                        lab.work_dir.join("pgbouncer-own.log").display()
                    ),
                )
                .unwrap();
                std::fs::write(lab.work_dir.join("userlist.txt"), "\"postgres\" \"\"\n").unwrap();
                for f in ["pgbouncer.ini", "userlist.txt"] {
                    let _ = Command::new("chown")
                        .arg("postgres")
                        .arg(lab.work_dir.join(f))
                        .status();
                }
                let _ = std::fs::File::create(lab.work_dir.join("pgbouncer-own.log"));
                let _ = Command::new("chown")
                    .arg("postgres")
                    .arg(lab.work_dir.join("pgbouncer-own.log"))
                    .status();
                let pid = lab.spawn(
                    Ns::Proxy,
                    &[
                        &pg::AS_POSTGRES[..],
                        &["pgbouncer", &ini.display().to_string()],
                    ]
                    .concat(),
                    "pgbouncer.log",
                );
                wait_port(lab, VIP);
                Some(pid)
            }
        }
    }

    fn teardown(&mut self, path: Path_, pid: Option<u32>) {
        let lab = Arc::get_mut(&mut self.lab).expect("the bench owns the lab");
        match path {
            Path_::Xdp | Path_::XdpFibEveryPacket | Path_::Tc | Path_::Skb => {
                lab.redirect_ok(&["detach", "--force"]);
            }
            Path_::Floor => drop(self.floor.take()),
            Path_::Iptables => {
                lab.exec_ok(Ns::Proxy, &["iptables", "-t", "nat", "-F"]);
            }
            Path_::Haproxy | Path_::Pgbouncer => lab.signal(pid.expect("a pid"), libc::SIGTERM),
            Path_::Direct => {}
        }
    }
}

const ECHO_PORT: u16 = 7000;
/// Connections per CRR run (see `tcp_micro`).
const CRR_MAX: usize = 5000;

/// A TCP echo server in the source namespace, for `lifetime` at most; stops when dropped.
struct Echo(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for Echo {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn echo_server(lab: &Lab, port: u16, lifetime: Duration) -> Echo {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    drop(lab.spawn_in_ns(Ns::Source, move || {
        let listener = std::net::TcpListener::bind(("0.0.0.0", port)).expect("echo bind");
        ready_tx.send(()).unwrap();
        let deadline = Instant::now() + lifetime;
        let mut pfd = libc::pollfd {
            fd: std::os::fd::AsRawFd::as_raw_fd(&listener),
            events: libc::POLLIN,
            revents: 0,
        };
        while !flag.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
            // Wait for a connection without sleeping between accepts (a sleep would cap CRR).
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&raw mut pfd, 1, 100) } <= 0 {
                continue;
            }
            if let Ok((mut s, _)) = listener.accept() {
                std::thread::spawn(move || {
                    use std::io::{Read as _, Write as _};
                    let _ = s.set_nodelay(true);
                    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        }
    }));
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("echo server up");
    Echo(stop)
}

#[derive(Clone, Debug, Default)]
struct Micro {
    rr_per_s: f64,
    rr_p50_us: f64,
    rr_p99_us: f64,
    crr_per_s: f64,
    crr_p50_us: f64,
}

/// RR then CRR against `host:port`, `each` long; bounded in time.
fn tcp_micro(host: &str, port: u16, each: Duration) -> Micro {
    use std::io::{Read as _, Write as _};
    let addr: std::net::SocketAddr = format!("{host}:{port}").parse().unwrap();
    let msg = [7u8; 64];
    let mut buf = [0u8; 64];
    let rr = |s: &mut std::net::TcpStream, buf: &mut [u8; 64]| {
        s.write_all(&msg).unwrap();
        s.read_exact(buf).unwrap();
    };
    let mut lat = Vec::new();
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("RR connect");
    s.set_nodelay(true).unwrap();
    let end = Instant::now() + each;
    while Instant::now() < end {
        let t = Instant::now();
        rr(&mut s, &mut buf);
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(s);
    let rr_per_s = lat.len() as f64 / each.as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let (rr_p50_us, rr_p99_us) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    let mut clat = Vec::new();
    let end = Instant::now() + each;
    // Capped: each path is set up fresh per round with `redirect run --once` (no conntrack GC),
    // so every closed connection keeps its SNAT port; 5,000 stays well inside the 20,000-port
    // default range. (With the controller running, the GC sustains about
    // ports / close timeout = 2,000 new connections per second per backend.)
    while Instant::now() < end && clat.len() < CRR_MAX {
        let t = Instant::now();
        let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .expect("CRR connect");
        c.set_nodelay(true).unwrap();
        rr(&mut c, &mut buf);
        // Close with a RST (linger 0): like a client pool under churn, and no TIME_WAIT pile-up.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a valid socket and option struct.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&c),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                u32::try_from(std::mem::size_of::<libc::linger>()).unwrap(),
            );
        }
        drop(c);
        clat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let crr_elapsed: f64 = clat.iter().sum::<f64>() / 1e6;
    let crr_per_s = clat.len() as f64 / crr_elapsed.max(1e-9);
    clat.sort_by(f64::total_cmp);
    Micro {
        rr_per_s,
        rr_p50_us,
        rr_p99_us,
        crr_per_s,
        crr_p50_us: percentile(&clat, 0.5),
    }
}

/// The TCP microbenchmark section, written before the main report (which appends it).
fn write_micro(b: &Bench, micro: &BTreeMap<Path_, Vec<Micro>>) {
    let med = |p: Path_, f: fn(&Micro) -> f64| -> f64 {
        let mut v: Vec<f64> = micro
            .get(&p)
            .map(|m| m.iter().map(f).collect())
            .unwrap_or_default();
        median(&mut v)
    };
    let mut md = String::from(
        "## TCP round trip and connect rate (64-byte echo)\n\nOne connection doing request/response (RR), and a new connection per request (CRR, closed with a RST, at most 5,000 per run), against an echo server on the source; medians over rounds. PgBouncer is left out: it speaks only PostgreSQL.\n\n| path | RR/s | RR p50 µs | RR p99 µs | RR p50 vs direct | CRR/s | CRR vs direct | CRR p50 µs |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let (direct_rr_p50, direct_crr_rate) = (
        med(Path_::Direct, |m| m.rr_p50_us),
        med(Path_::Direct, |m| m.crr_per_s),
    );
    let mut bars = Vec::new();
    for p in Path_::ALL
        .iter()
        .copied()
        .filter(|p| *p != Path_::Pgbouncer)
    {
        let (rr, p50, p99, crr, cp50) = (
            med(p, |m| m.rr_per_s),
            med(p, |m| m.rr_p50_us),
            med(p, |m| m.rr_p99_us),
            med(p, |m| m.crr_per_s),
            med(p, |m| m.crr_p50_us),
        );
        let _ = writeln!(
            md,
            "| {} | {rr:.0} | {p50:.0} | {p99:.0} | {:.2}× | {crr:.0} | {:.2}× | {cp50:.0} |",
            p.name(),
            p50 / direct_rr_p50,
            crr / direct_crr_rate
        );
        bars.push((p.name().to_owned(), crr));
    }
    std::fs::write(
        b.out_dir.join("bench-tcp-crr.svg"),
        svg_bars("TCP connect rate (CRR)", "conn/s", &bars),
    )
    .unwrap();
    md.push_str("\n![TCP connect rate](bench-tcp-crr.svg)\n\n");
    std::fs::write(b.out_dir.join("benchmarks-tcp.md.part"), md).unwrap();
}

fn wait_port(lab: &Lab, host: &str) {
    let host = host.to_owned();
    redirect_tests::wait_for(Duration::from_secs(10), "the proxy to listen", || {
        let h = host.clone();
        lab.in_ns(Ns::Client, move || {
            std::net::TcpStream::connect_timeout(
                &format!("{h}:5432").parse().unwrap(),
                Duration::from_millis(200),
            )
            .is_ok()
        })
    });
}

/// A horizontal bar chart as SVG.
fn svg_bars(title: &str, unit: &str, rows: &[(String, f64)]) -> String {
    let max = rows.iter().map(|r| r.1).fold(0.0, f64::max).max(1e-9);
    let h = 40 + rows.len() * 26;
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='760' height='{h}' font-family='sans-serif' font-size='12'>\n"
    );
    let _ = writeln!(
        s,
        "<text x='10' y='20' font-size='14' font-weight='bold'>{title}</text>"
    );
    for (i, (label, v)) in rows.iter().enumerate() {
        let y = 34 + i * 26;
        let w = (v / max * 430.0).max(1.0);
        let _ = writeln!(s, "<text x='10' y='{}'>{label}</text>", y + 14);
        let _ = writeln!(
            s,
            "<rect x='250' y='{y}' width='{w:.1}' height='18' fill='#4a7ab5'/>"
        );
        let _ = writeln!(
            s,
            "<text x='{:.1}' y='{}'>{v:.1} {unit}</text>",
            255.0 + w,
            y + 14
        );
    }
    s.push_str("</svg>\n");
    s
}

fn main() {
    require_root();
    let quick = std::env::args().any(|a| a == "--quick");
    let out_dir = PathBuf::from(std::env::var("BENCH_OUT").unwrap_or_else(|_| "docs".into()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let (rounds, secs) = if quick { (2, 4) } else { (3, 10) };
    // The same scenarios in both modes (1, 8 and 32 clients are what issue 8 measures);
    // quick mode runs fewer and shorter rounds.
    let scenarios: Vec<Scenario> = [(1, false), (8, false), (32, false), (8, true)]
        .into_iter()
        .map(|(clients, connect_per_tx)| Scenario {
            clients,
            connect_per_tx,
        })
        .collect();
    let profile_only = std::env::args().any(|a| a == "--profile");
    let started = Instant::now();
    eprintln!("== lab: client, proxy, source, target; PostgreSQL on source and target");
    let mut lab = Lab::new("bench");
    let source = pg::start(&mut lab, Ns::Source, "source", &[]);
    let target = pg::start(&mut lab, Ns::Target, "target", &[]);
    lab.exec_ok(Ns::Proxy, &["sysctl", "-qw", "kernel.bpf_stats_enabled=1"]);
    let data = source.data_dir.display().to_string();
    lab.exec_ok(
        Ns::Source,
        &[
            &format!("{PG_BIN}/pgbench"),
            "-i",
            "-s",
            "1",
            "-q",
            "-h",
            &data,
            "-U",
            "postgres",
            "postgres",
        ],
    );
    // The target gets the tables only; the subscription copies the rows.
    let tdata = target.data_dir.display().to_string();
    let pgbench = format!("{PG_BIN}/pgbench");
    lab.exec_ok(
        Ns::Target,
        &[
            &pgbench, "-i", "-I", "dt", "-h", &tdata, "-U", "postgres", "postgres",
        ],
    );
    let mut b = Bench {
        lab: Arc::new(lab),
        out_dir: out_dir.clone(),
        secs,
        floor: None,
    };

    if profile_only {
        profile(&mut b);
        return;
    }

    // results[(scenario, path)] = samples over rounds
    let mut results: BTreeMap<(Scenario, Path_), Vec<Sample>> = BTreeMap::new();
    let mut ns_per_pkt: BTreeMap<Path_, Vec<f64>> = BTreeMap::new();
    for round in 0..rounds {
        // Rotate the order each round so no path always runs first or last.
        let mut order = Path_::ALL.to_vec();
        let n = order.len();
        order.rotate_left(round % n);
        for path in order {
            let pid = b.setup(path);
            for s in &scenarios {
                eprintln!(
                    "== round {}/{rounds}: {} via {}",
                    round + 1,
                    s.name(),
                    path.name()
                );
                let sample = b.pgbench(path, *s, &format!("{round}-{path:?}-{}", s.clients));
                results.entry((*s, path)).or_default().push(sample);
            }
            if let Some(ns) = path.program().and_then(|p| prog_ns_per_run(&b.lab, p)) {
                ns_per_pkt.entry(path).or_default().push(ns);
            }
            b.teardown(path, pid);
        }
    }

    // TCP microbenchmark: 64-byte request/response on one connection (RR) and a connection per
    // request (CRR), against an echo server on the source; PgBouncer speaks only PostgreSQL.
    let echo = echo_server(&b.lab, ECHO_PORT, Duration::from_secs(3600));
    let mut micro: BTreeMap<Path_, Vec<Micro>> = BTreeMap::new();
    for round in 0..rounds {
        let mut order: Vec<Path_> = Path_::ALL
            .iter()
            .copied()
            .filter(|p| *p != Path_::Pgbouncer)
            .collect();
        let n = order.len();
        order.rotate_left(round % n);
        for path in order {
            eprintln!(
                "== round {}/{rounds}: TCP RR/CRR via {}",
                round + 1,
                path.name()
            );
            let pid = b.setup_to(path, ECHO_PORT);
            let port = if path.routed() { ECHO_PORT } else { 5432 };
            let host = path.host().to_owned();
            let secs_each = Duration::from_secs(b.secs.min(5));
            let m = b
                .lab
                .in_ns(Ns::Client, move || tcp_micro(&host, port, secs_each));
            micro.entry(path).or_default().push(m);
            b.teardown(path, pid);
        }
    }
    drop(echo);

    // Conntrack scale: the same scenarios through redirect XDP with the table pre-filled.
    let fills: Vec<u32> = if quick {
        vec![0, 10_000, 100_000]
    } else {
        vec![0, 10_000, 100_000, 1_000_000]
    };
    let mut scale: Vec<(u32, f64, f64, f64)> = Vec::new();
    b.setup(Path_::Xdp);
    let mut memlock = String::new();
    {
        let mut maps = Maps::open(&b.lab.pin_dir).expect("pinned maps");
        let mut filled = 0u32;
        for &n in &fills {
            eprintln!("== conntrack scale: {n} tracked entries");
            while filled < n {
                let i = filled;
                let key = CtKey {
                    client_addr_be: u32::from(std::net::Ipv4Addr::new(
                        198,
                        19,
                        (i >> 8) as u8,
                        i as u8,
                    ))
                    .to_be(),
                    vip_addr_be: u32::from(std::net::Ipv4Addr::new(198, 18, 1, 1)).to_be(),
                    client_port_be: ((i >> 16) as u16 + 1024).to_be(),
                    vip_port_be: 5432u16.to_be(),
                };
                let e = CtEntry {
                    created_ns: redirect::clock::monotonic_ns(),
                    last_seen_ns: u64::MAX / 2,
                    backend_addr_be: 1,
                    snat_addr_be: 1,
                    backend_port_be: 1,
                    snat_port_be: 1,
                    backend_id: 0,
                    flags: 1,
                    ..CtEntry::default()
                };
                maps.ct.insert(key, e, 0).expect("prefill CT");
                filled += 1;
            }
            let sel = b.pgbench(
                Path_::Xdp,
                Scenario {
                    clients: 8,
                    connect_per_tx: false,
                },
                &format!("scale-{n}"),
            );
            let con = b.pgbench(
                Path_::Xdp,
                Scenario {
                    clients: 8,
                    connect_per_tx: true,
                },
                &format!("scale-c-{n}"),
            );
            scale.push((
                n,
                percentile(&sel.lat_us, 0.5),
                con.tps,
                percentile(&con.lat_us, 0.5),
            ));
        }
        let ct = b.lab.pin_dir.join("CT").display().to_string();
        let rev = b.lab.pin_dir.join("REV").display().to_string();
        for (name, p) in [("CT", ct), ("REV", rev)] {
            let out = b
                .lab
                .exec_ok(Ns::Proxy, &["bpftool", "-j", "map", "show", "pinned", &p]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let _ = write!(
                memlock,
                "{name}: {} entries max, {} bytes locked ({:.0} B per slot); ",
                v["max_entries"],
                v["bytes_memlock"],
                v["bytes_memlock"].as_f64().unwrap_or(0.0)
                    / v["max_entries"].as_f64().unwrap_or(1.0)
            );
        }
        drop(maps);
    }
    b.teardown(Path_::Xdp, None);

    // Flip latency: from the ACTIVE write to the first new connection served by the target.
    eprintln!("== flip latency");
    b.setup(Path_::Xdp);
    let mut flips = Vec::new();
    for _ in 0..if quick { 5 } else { 20 } {
        flips.push(flip_latency(&b.lab).as_secs_f64() * 1000.0);
    }
    b.teardown(Path_::Xdp, None);

    // Safe cutovers under writes, back and forth.
    eprintln!("== safe cutovers under a write load");
    let cutovers = cutover_runs(&mut b, &source, &target, if quick { 4 } else { 10 });

    write_micro(&b, &micro);
    write_report(
        &b,
        &scenarios,
        &results,
        &ns_per_pkt,
        &scale,
        &memlock,
        &flips,
        &cutovers,
        quick,
        rounds,
        started.elapsed(),
    );
    eprintln!(
        "== wrote {}/benchmarks.md in {:?}",
        b.out_dir.display(),
        started.elapsed()
    );
}

/// `perf record -g` over `pgbench -S -c 8` through redirect XDP. Prints, by self time: the
/// whole system's top symbols, then only what runs inside the program (the program itself and
/// the helpers it calls), and what that comes to per packet next to `bpf_stats`' figure.
fn profile(b: &mut Bench) {
    let secs = 20;
    b.setup(Path_::Xdp);
    let data = std::env::temp_dir()
        .join("redirect-profile.data")
        .display()
        .to_string();
    let stats_before = prog_stats(&b.lab, "redirect_xdp");
    let mut perf = Command::new("perf")
        .args([
            "record",
            "-q",
            "-g",
            "-a",
            "-e",
            "cpu-clock",
            "-F",
            "4999",
            "-o",
            &data,
        ])
        .args(["--", "sleep", &secs.to_string()])
        .spawn()
        .expect("perf record");
    let b2 = Bench {
        lab: b.lab.clone(),
        out_dir: b.out_dir.clone(),
        secs: secs - 2,
        floor: None,
    };
    let sample = b2.pgbench(
        Path_::Xdp,
        Scenario {
            clients: 8,
            connect_per_tx: false,
        },
        "profile",
    );
    let _ = perf.wait();
    let stats_after = prog_stats(&b.lab, "redirect_xdp");
    let report = |extra: &[&str]| {
        let out = Command::new("perf")
            .args(["report", "-i", &data, "--no-children", "--sort", "sym"])
            .args(["--stdio", "-g", "none", "-q"])
            .args(extra)
            .output()
            .expect("perf report");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    println!(
        "== the whole system, by self time\n{}",
        report(&["--percent-limit", "0.3"])
    );
    let inside = report(&[
        "--parent",
        "bpf_prog_.*_redirect_xdp",
        "-x",
        "--percent-limit",
        "0.5",
    ]);
    println!(
        "== inside redirect_xdp (the program and its helpers), share of those samples\n{inside}"
    );
    let total = report(&["--sort", "parent", "--parent", "bpf_prog_.*_redirect_xdp"]);
    println!("== samples in redirect_xdp vs the rest\n{total}");
    let (t, n) = (
        stats_after.0 - stats_before.0,
        stats_after.1 - stats_before.1,
    );
    println!(
        "pgbench -S -c 8 via redirect XDP: {:.0} tps; {n:.0} program runs in {secs} s; bpf_stats: {:.0} ns per run",
        sample.tps,
        t / n.max(1.0)
    );
    b.teardown(Path_::Xdp, None);
}

/// (run_time_ns, run_cnt) summed over the programs named `name`.
fn prog_stats(lab: &Lab, name: &str) -> (f64, f64) {
    let out = lab.exec_ok(Ns::Proxy, &["bpftool", "-j", "prog", "show", "name", name]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let progs = v.as_array().cloned().unwrap_or_else(|| vec![v]);
    progs.iter().fold((0.0, 0.0), |(t, n), p| {
        (
            t + p["run_time_ns"].as_f64().unwrap_or(0.0),
            n + p["run_cnt"].as_f64().unwrap_or(0.0),
        )
    })
}

/// Attaches the floor forwarder (`xdp_floor`) to the proxy's legs, native XDP, and lets it
/// redirect between them.
fn attach_floor(lab: &Lab) -> aya::Ebpf {
    lab.in_ns(Ns::Proxy, || {
        let mut ebpf = aya::Ebpf::load(redirect::datapath::object()).expect("loading the object");
        let legs: Vec<u32> = ["p-cli", "p-src", "p-tgt"]
            .iter()
            .map(|l| redirect::net::ifindex(l).expect("a leg"))
            .collect();
        {
            let mut ports: aya::maps::DevMapHash<_> = ebpf
                .map_mut("TX_PORTS")
                .expect("TX_PORTS")
                .try_into()
                .expect("a devmap");
            for i in &legs {
                ports.insert(*i, *i, None, 0).expect("TX_PORTS entry");
            }
        }
        let prog: &mut aya::programs::Xdp = ebpf
            .program_mut("xdp_floor")
            .expect("xdp_floor")
            .try_into()
            .expect("XDP");
        prog.load().expect("xdp_floor loads");
        for leg in ["p-cli", "p-src", "p-tgt"] {
            prog.attach(leg, aya::programs::XdpMode::Driver)
                .expect("attaching xdp_floor");
        }
        ebpf
    })
}

/// Mean ns per run of the program `name`, from kernel.bpf_stats_enabled.
fn prog_ns_per_run(lab: &Lab, name: &str) -> Option<f64> {
    let (t, n) = prog_stats(lab, name);
    (n > 0.0).then(|| t / n)
}

fn flip_latency(lab: &Arc<Lab>) -> Duration {
    let mut maps = Maps::open(&lab.pin_dir).expect("maps");
    maps.set_active(Role::Source).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Instant>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let client = {
        let lab = lab.clone();
        std::thread::spawn(move || {
            lab.in_ns(Ns::Client, move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let deadline = Instant::now() + Duration::from_secs(10);
                    let mut told = false;
                    while Instant::now() < deadline {
                        let c = pg::connect(VIP).await;
                        if pg::cluster_name(&c).await == "target" {
                            // The connect that landed started at most one loop earlier.
                            let _ = tx.send(Instant::now());
                            return;
                        }
                        if !told {
                            told = true;
                            let _ = ready_tx.send(());
                        }
                    }
                });
            });
        })
    };
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("client looping");
    let t0 = Instant::now();
    maps.set_active(Role::Target).unwrap();
    let landed = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("a connection landed on the target");
    client.join().unwrap();
    landed - t0
}

#[derive(Debug, Clone)]
struct CutoverRun {
    to: &'static str,
    write_pause_ms: f64,
    hold_ms: f64,
    client_pause_ms: f64,
    acked: usize,
    lost: usize,
    refused: u64,
    startup_interrupted: u64,
}

fn cutover_runs(b: &mut Bench, source: &pg::Pg, target: &pg::Pg, n: usize) -> Vec<CutoverRun> {
    let lab = Arc::get_mut(&mut b.lab).expect("owned");
    pg::setup_logical(lab, source, target);
    let flags = pg::controller_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let pid = lab.start_redirect(&flags);
    let mut runs = Vec::new();
    for i in 0..n {
        let to = if i % 2 == 0 { "target" } else { "source" };
        // After a rollback the forward subscription restarts (the launcher can take 5 s).
        redirect_tests::wait_for(Duration::from_secs(30), "replication to be healthy", || {
            lab.redirect(&["lag", "--json"]).status.success()
                && serde_json::from_slice::<serde_json::Value>(
                    &lab.redirect(&["lag", "--json"]).stdout,
                )
                .is_ok_and(|v| v["healthy"] == true)
        });
        let writers = (i as i32 * 100)..(i as i32 * 100 + 8);
        let ns_path = format!("/var/run/netns/{}", lab.ns(Ns::Client));
        let load = std::thread::spawn(move || {
            let fd = std::fs::File::open(&ns_path).unwrap();
            // SAFETY: affects only this thread.
            assert_eq!(
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::CLONE_NEWNET) },
                0
            );
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(workload::run(VIP, writers, Duration::from_secs(5), 20))
        });
        std::thread::sleep(Duration::from_millis(1500));
        let out = lab.redirect(&["flip", "--to", to, "--drain-timeout", "2s", "--json"]);
        let v = load.join().unwrap();
        assert!(
            out.status.success(),
            "cutover {i} to {to} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let (ns, pg) = if to == "target" {
            (Ns::Target, target)
        } else {
            (Ns::Source, source)
        };
        let rows = pg::acked_rows(
            lab,
            ns,
            pg,
            &format!("WHERE writer BETWEEN {} AND {}", i * 100, i * 100 + 7),
        );
        let acked: Vec<(i32, i64)> = v.acked().collect();
        runs.push(CutoverRun {
            to,
            write_pause_ms: r["write_pause_ms"].as_f64().unwrap_or(f64::NAN),
            hold_ms: r["hold_ms"].as_f64().unwrap_or(f64::NAN),
            client_pause_ms: v.longest_pause().as_secs_f64() * 1000.0,
            acked: acked.len(),
            lost: acked.iter().filter(|a| !rows.contains(a)).count(),
            refused: v.refused(),
            startup_interrupted: v.startup_interrupted(),
        });
        eprintln!("   cutover {} to {to}: {:?}", i + 1, runs.last().unwrap());
    }
    lab.signal(pid, libc::SIGTERM);
    lab.redirect_ok(&["detach", "--force"]);
    runs
}

#[expect(clippy::too_many_arguments, reason = "one report")]
fn write_report(
    b: &Bench,
    scenarios: &[Scenario],
    results: &BTreeMap<(Scenario, Path_), Vec<Sample>>,
    ns_per_pkt: &BTreeMap<Path_, Vec<f64>>,
    scale: &[(u32, f64, f64, f64)],
    memlock: &str,
    flips: &[f64],
    cutovers: &[CutoverRun],
    quick: bool,
    rounds: usize,
    took: Duration,
) {
    let mut md = String::new();
    let kernel = String::from_utf8_lossy(&Command::new("uname").arg("-r").output().unwrap().stdout)
        .trim()
        .to_owned();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        .unwrap_or_default();
    let ver = |c: &str, a: &str| {
        String::from_utf8_lossy(
            &Command::new(c)
                .arg(a)
                .output()
                .map(|o| {
                    if o.stdout.is_empty() {
                        o.stderr
                    } else {
                        o.stdout
                    }
                })
                .unwrap_or_default(),
        )
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
    };
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Generated by `cargo xtask bench{}` in {:.0} s. Every number below comes from that run.\n",
        if quick { " --quick" } else { "" },
        took.as_secs_f64()
    );
    let _ = writeln!(
        md,
        "- machine: {} cores, {cpu}; kernel {kernel}",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    let _ = writeln!(
        md,
        "- {}; {}; {}; {}",
        ver(&format!("{PG_BIN}/postgres"), "--version"),
        ver("haproxy", "-v"),
        ver("pgbouncer", "--version"),
        ver("iptables", "--version")
    );
    let _ = writeln!(
        md,
        "- lab: four network namespaces joined by veth (client, proxy, source, target), 198.18.0.0/15; the client runs pgbench against the VIP 198.18.1.1:5432 (direct: against the source 198.18.2.2, routed through the proxy namespace, no NAT, no XDP)."
    );
    let _ = writeln!(
        md,
        "- method: {rounds} rounds of {} s per scenario and path; each round runs every path, in a rotated order, so noise hits all alike. Tables give the median over rounds; `spread` is (max-min)/median of the TPS across rounds. Latency percentiles come from pgbench's per-transaction log (`-l`), pooled over rounds.",
        b.secs
    );
    let _ = writeln!(
        md,
        "- veth is CPU-bound and all namespaces share 2 cores: compare paths against each other, not with NIC figures.\n"
    );
    let mut svgs = Vec::new();
    for s in scenarios {
        let direct_tps = {
            let mut v: Vec<f64> = results[&(*s, Path_::Direct)]
                .iter()
                .map(|x| x.tps)
                .collect();
            median(&mut v)
        };
        let direct_p50 = {
            let mut all: Vec<f64> = results[&(*s, Path_::Direct)]
                .iter()
                .flat_map(|x| x.lat_us.clone())
                .collect();
            all.sort_by(f64::total_cmp);
            percentile(&all, 0.5)
        };
        let _ = writeln!(md, "## {}\n", s.name());
        let _ = writeln!(
            md,
            "| path | TPS (median) | spread | vs direct | p50 latency µs | p99 latency µs | p50 vs direct |\n|---|---:|---:|---:|---:|---:|---:|"
        );
        let mut bars = Vec::new();
        for p in Path_::ALL {
            let samples = &results[&(*s, p)];
            let mut tps: Vec<f64> = samples.iter().map(|x| x.tps).collect();
            let med = median(&mut tps);
            let spread = (tps.last().unwrap() - tps.first().unwrap()) / med * 100.0;
            let mut all: Vec<f64> = samples.iter().flat_map(|x| x.lat_us.clone()).collect();
            all.sort_by(f64::total_cmp);
            let (p50, p99) = (percentile(&all, 0.5), percentile(&all, 0.99));
            let _ = writeln!(
                md,
                "| {} | {med:.0} | {spread:.0}% | {:.2}× | {p50:.0} | {p99:.0} | {:.2}× |",
                p.name(),
                med / direct_tps,
                p50 / direct_p50
            );
            bars.push((p.name().to_owned(), p50));
        }
        let file = format!(
            "bench-{}{}.svg",
            if s.connect_per_tx {
                "connect-"
            } else {
                "select-"
            },
            s.clients
        );
        std::fs::write(
            b.out_dir.join(&file),
            svg_bars(&format!("{}: p50 latency", s.name()), "µs", &bars),
        )
        .unwrap();
        svgs.push(file.clone());
        let _ = writeln!(md, "\n![{}]({file})\n", s.name());
    }
    // Throughput by client count (persistent connections), and latency distributions.
    let persistent: Vec<&Scenario> = scenarios.iter().filter(|s| !s.connect_per_tx).collect();
    let by_clients: Vec<(String, Vec<(f64, f64)>)> = Path_::ALL
        .iter()
        .map(|p| {
            let pts = persistent
                .iter()
                .map(|s| {
                    let mut v: Vec<f64> = results[&(**s, *p)].iter().map(|x| x.tps).collect();
                    (f64::from(s.clients), median(&mut v))
                })
                .collect();
            (p.name().to_owned(), pts)
        })
        .collect();
    std::fs::write(
        b.out_dir.join("bench-tps-by-clients.svg"),
        svg_lines(
            "pgbench -S: TPS by client count",
            "clients",
            "TPS",
            &by_clients,
        ),
    )
    .unwrap();
    let _ = writeln!(
        md,
        "## Throughput by client count and latency distributions\n\n![TPS by clients](bench-tps-by-clients.svg)\n"
    );
    for s in scenarios {
        let cdf: Vec<(String, Vec<(f64, f64)>)> = Path_::ALL
            .iter()
            .map(|p| {
                let mut all: Vec<f64> = results[&(*s, *p)]
                    .iter()
                    .flat_map(|x| x.lat_us.clone())
                    .collect();
                all.sort_by(f64::total_cmp);
                // x = latency up to the 99th percentile, y = percentile.
                let pts = (1..=99)
                    .map(|q| (percentile(&all, f64::from(q) / 100.0), f64::from(q)))
                    .collect();
                (p.name().to_owned(), pts)
            })
            .collect();
        let file = format!(
            "bench-cdf-{}{}.svg",
            if s.connect_per_tx {
                "connect-"
            } else {
                "select-"
            },
            s.clients
        );
        std::fs::write(
            b.out_dir.join(&file),
            svg_lines(
                &format!("{}: latency distribution (to p99)", s.name()),
                "latency µs",
                "percentile",
                &cdf,
            ),
        )
        .unwrap();
        let _ = writeln!(md, "![{} latency distribution]({file})\n", s.name());
    }
    if let Ok(part) = std::fs::read_to_string(b.out_dir.join("benchmarks-tcp.md.part")) {
        md.push_str(&part);
        let _ = std::fs::remove_file(b.out_dir.join("benchmarks-tcp.md.part"));
    }
    if !ns_per_pkt.is_empty() {
        let _ = writeln!(
            md,
            "## Datapath cost\n\n`kernel.bpf_stats_enabled`, `bpftool prog show` run_time_ns / run_cnt of each program over its rounds (every packet on the proxy's legs, including replies), median over rounds:\n\n| path | program | ns per packet |\n|---|---|---:|"
        );
        for (path, v) in ns_per_pkt {
            let mut v = v.clone();
            let _ = writeln!(
                md,
                "| {} | `{}` | {:.0} |",
                path.name(),
                path.program().unwrap_or("-"),
                median(&mut v)
            );
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(
        md,
        "## Conntrack scale (redirect XDP)\n\nThe `CT` table pre-filled with idle entries, then the same load:\n\n| tracked entries | select p50 µs (-c 8) | connect rate TPS (-C -c 8) | connect p50 µs |\n|---:|---:|---:|---:|"
    );
    for (n, p50, ctps, cp50) in scale {
        let _ = writeln!(md, "| {n} | {p50:.0} | {ctps:.0} | {cp50:.0} |");
    }
    let _ = writeln!(
        md,
        "\nKernel memory (preallocated hash maps, so it does not grow with the fill): {memlock}\n"
    );
    let mut f = flips.to_vec();
    let _ = writeln!(
        md,
        "## Flip latency\n\nFrom the `ACTIVE` map write to the first new connection served by the target, with a client reconnecting in a loop ({} runs): median {:.2} ms, worst {:.2} ms. This includes one client connect + query round trip, which bounds the resolution.\n",
        f.len(),
        median(&mut f),
        f.iter().copied().fold(0.0, f64::max)
    );
    if !cutovers.is_empty() {
        let _ = writeln!(
            md,
            "## Safe cutover under writes\n\n8 writers through the VIP (half keep one connection, half reconnect every 20 commits), alternating cutovers to the target and rollbacks to the source.\n\n| # | to | write pause (fence→flip) ms | hold ms | longest pause seen by clients ms | acked writes | lost | refused | startups cut off |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|"
        );
        for (i, c) in cutovers.iter().enumerate() {
            let _ = writeln!(
                md,
                "| {} | {} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} |",
                i + 1,
                c.to,
                c.write_pause_ms,
                c.hold_ms,
                c.client_pause_ms,
                c.acked,
                c.lost,
                c.refused,
                c.startup_interrupted
            );
        }
        let mut wp: Vec<f64> = cutovers.iter().map(|c| c.write_pause_ms).collect();
        let mut cp: Vec<f64> = cutovers.iter().map(|c| c.client_pause_ms).collect();
        let _ = writeln!(
            md,
            "\nWrite pause: median {:.1} ms, worst {:.1} ms. Longest pause seen by clients: median {:.1} ms, worst {:.1} ms. Lost: {}. Refused: {}. Startups cut off by the fence (connected to the old server an instant before it; the client retried): {}.\n",
            median(&mut wp),
            wp.iter().copied().fold(0.0, f64::max),
            median(&mut cp),
            cp.iter().copied().fold(0.0, f64::max),
            cutovers.iter().map(|c| c.lost).sum::<usize>(),
            cutovers.iter().map(|c| c.refused).sum::<u64>(),
            cutovers.iter().map(|c| c.startup_interrupted).sum::<u64>()
        );
    }
    let _ = writeln!(
        md,
        "## Sustained connection churn\n\nMeasured separately, for 3 minutes per load with the controller's GC running: [churn.md](churn.md), written by `cargo xtask churn`.\n"
    );
    let _ = writeln!(
        md,
        "## Reproduce\n\n```sh\ncargo xtask bench{}   # as root; installs HAProxy and PgBouncer if missing\n```",
        if quick { " --quick" } else { "" }
    );
    std::fs::write(b.out_dir.join("benchmarks.md"), md).unwrap();
}
