//! Connection churn through the VIP: many short TCP connections per second (connect, one
//! 64-byte round trip, close), as connect-per-request applications open them, with the
//! controller's conntrack GC running. Used by the churn test and `cargo xtask churn`.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{Lab, Ns, PG_PORT, VIP};

/// An echo server on the `PostgreSQL` port that echoes until the client closes, then closes:
/// the client closes first, as a `PostgreSQL` client's Terminate makes it. Each acceptor serves
/// one connection at a time. Stops when dropped (or after `lifetime`).
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl EchoServer {
    pub fn start(lab: &Lab, ns: Ns, acceptors: usize, lifetime: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let listener = lab.in_ns(ns, || {
            let l = TcpListener::bind(("0.0.0.0", PG_PORT)).expect("echo bind");
            l.set_nonblocking(true).expect("nonblocking listener");
            l
        });
        let deadline = Instant::now() + lifetime;
        let threads = (0..acceptors)
            .map(|_| {
                let l = listener.try_clone().expect("cloning the listener");
                let stop = stop.clone();
                std::thread::spawn(move || serve(&l, &stop, deadline))
            })
            .collect();
        Self { stop, threads }
    }
}

fn serve(listener: &TcpListener, stop: &AtomicBool, deadline: Instant) {
    let mut pfd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(listener),
        events: libc::POLLIN,
        revents: 0,
    };
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&raw mut pfd, 1, 100) } <= 0 {
            continue;
        }
        let Ok((mut s, _)) = listener.accept() else {
            continue;
        };
        let _ = s.set_nonblocking(false);
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        // Echo until the client's FIN, then close.
        let mut buf = [0u8; 64];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    }
}

/// Counters shared by the load threads.
#[derive(Default)]
pub struct Counts {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
}

/// Starts `threads` client threads that open, use and close connections to the VIP until
/// `duration` has passed or `max` connections were made. Each connection closes with a FIN
/// (client first). A connect that fails or times out (3 s), or a round trip that fails,
/// counts as failed.
pub fn start_load(
    lab: &Lab,
    threads: usize,
    duration: Duration,
    max: u64,
    counts: &Arc<Counts>,
) -> Vec<JoinHandle<()>> {
    let addr: SocketAddr = format!("{VIP}:{PG_PORT}").parse().expect("VIP address");
    let end = Instant::now() + duration;
    (0..threads)
        .map(|_| {
            let counts = counts.clone();
            lab.spawn_in_ns(Ns::Client, move || {
                let msg = [7u8; 64];
                let mut buf = [0u8; 64];
                while Instant::now() < end
                    && counts.ok.load(Ordering::Relaxed) + counts.failed.load(Ordering::Relaxed)
                        < max
                {
                    let ok = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                        .and_then(|mut c| {
                            c.set_nodelay(true)?;
                            c.set_read_timeout(Some(Duration::from_secs(3)))?;
                            c.write_all(&msg)?;
                            c.read_exact(&mut buf)
                        })
                        .is_ok();
                    let slot = if ok { &counts.ok } else { &counts.failed };
                    slot.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect()
}

/// Client-side settings of a host that opens thousands of connections per second: a wide
/// ephemeral range and `TIME_WAIT` reuse (RFC 7323 timestamps make it safe). Without them the
/// client, not the proxy, runs out of ports at about 470 connections/s.
pub fn tune_client(lab: &Lab) {
    lab.exec_ok(
        Ns::Client,
        &[
            "sysctl",
            "-qw",
            "net.ipv4.ip_local_port_range=1024 65000",
            "net.ipv4.tcp_tw_reuse=1",
        ],
    );
}

/// One sample of the proxy's state during a churn run.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub at_s: f64,
    /// New connections per second since the previous sample.
    pub conns_per_s: f64,
    pub ports_claimed: u64,
    pub ports_capacity: u64,
    pub snat_exhausted: u64,
    pub ct_full: u64,
}

/// Reads `redirect status --json` into a sample.
pub fn sample(lab: &Lab, backend: &str, at_s: f64, conns_per_s: f64) -> Sample {
    let st = lab.status();
    let b = &st["backends"][backend];
    Sample {
        at_s,
        conns_per_s,
        ports_claimed: b["snat_ports_claimed"].as_u64().unwrap_or(0),
        ports_capacity: b["snat_ports_capacity"].as_u64().unwrap_or(0),
        snat_exhausted: st["stats"]["snat_exhausted"].as_u64().unwrap_or(0),
        ct_full: st["stats"]["ct_full"].as_u64().unwrap_or(0),
    }
}

/// What a churn run did.
#[derive(Clone, Debug, Default)]
pub struct ChurnRun {
    pub connections: u64,
    pub failed: u64,
    pub elapsed: Duration,
    pub samples: Vec<Sample>,
}

impl ChurnRun {
    #[must_use]
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    pub fn per_s(&self) -> f64 {
        self.connections as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    #[must_use]
    pub fn max_claimed(&self) -> u64 {
        self.samples
            .iter()
            .map(|s| s.ports_claimed)
            .max()
            .unwrap_or(0)
    }

    /// `snat_exhausted` counted during the run.
    #[must_use]
    pub fn exhausted(&self) -> u64 {
        match (self.samples.first(), self.samples.last()) {
            (Some(a), Some(b)) => b.snat_exhausted - a.snat_exhausted,
            _ => 0,
        }
    }
}

/// Runs the CRR load against the echo server on the source for `duration`, sampling the
/// proxy every second.
#[expect(clippy::cast_precision_loss, reason = "rates")]
pub fn crr(lab: &Lab, threads: usize, duration: Duration, max: u64) -> ChurnRun {
    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let mut samples = vec![sample(lab, "source", 0.0, 0.0)];
    let load = start_load(lab, threads, duration, max, &counts);
    let mut last = (Instant::now(), 0u64);
    while load.iter().any(|t| !t.is_finished()) {
        std::thread::sleep(Duration::from_secs(1));
        let total = counts.ok.load(Ordering::Relaxed) + counts.failed.load(Ordering::Relaxed);
        let rate = (total - last.1) as f64 / last.0.elapsed().as_secs_f64();
        last = (Instant::now(), total);
        samples.push(sample(lab, "source", started.elapsed().as_secs_f64(), rate));
    }
    for t in load {
        t.join().expect("load thread");
    }
    let elapsed = started.elapsed();
    samples.push(sample(lab, "source", elapsed.as_secs_f64(), 0.0));
    ChurnRun {
        connections: counts.ok.load(Ordering::Relaxed),
        failed: counts.failed.load(Ordering::Relaxed),
        elapsed,
        samples,
    }
}
