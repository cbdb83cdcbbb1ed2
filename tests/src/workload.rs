//! A client workload that writes through the VIP and records every acknowledged commit, so a
//! test can prove that none was lost and that no connection attempt was refused.

use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

use crate::pg::dsn;

/// What one writer saw.
#[derive(Debug, Default, Clone)]
pub struct WriterLog {
    /// `(writer, seq)` of every acknowledged insert.
    pub acked: Vec<(i32, i64)>,
    /// When each was acknowledged.
    pub ack_times: Vec<Instant>,
    /// Connection attempts the network refused: no TCP connection (RST to the SYN, or no
    /// answer within 10 s).
    pub refused: u64,
    /// Connection attempts whose TCP connection was accepted but whose PostgreSQL startup was
    /// cut off (e.g. it reached the old server just before the fence and was reset).
    pub startup_interrupted: u64,
    /// Statements that failed on an open connection (e.g. its session ended at the fence).
    pub errors: Vec<String>,
    /// The slowest successful connect.
    pub max_connect: Duration,
    /// The longest any statement or connection attempt waited for an answer (an
    /// acknowledgement, a connection, or an error).
    pub max_wait: Duration,
}

/// The whole workload's result.
#[derive(Debug, Default)]
pub struct Verdict {
    pub logs: Vec<WriterLog>,
}

impl Verdict {
    pub fn acked(&self) -> impl Iterator<Item = (i32, i64)> + '_ {
        self.logs.iter().flat_map(|l| l.acked.iter().copied())
    }

    /// The writes acknowledged before `t`.
    pub fn acked_before(&self, t: Instant) -> impl Iterator<Item = (i32, i64)> + '_ {
        self.logs.iter().flat_map(move |l| {
            l.acked
                .iter()
                .zip(&l.ack_times)
                .filter(move |(_, at)| **at < t)
                .map(|(a, _)| *a)
        })
    }

    #[must_use]
    pub fn refused(&self) -> u64 {
        self.logs.iter().map(|l| l.refused).sum()
    }

    #[must_use]
    pub fn startup_interrupted(&self) -> u64 {
        self.logs.iter().map(|l| l.startup_interrupted).sum()
    }

    /// The longest time no writer got an acknowledgement (between the first and last ack).
    #[must_use]
    pub fn longest_pause(&self) -> Duration {
        let mut t: Vec<Instant> = self
            .logs
            .iter()
            .flat_map(|l| l.ack_times.iter().copied())
            .collect();
        t.sort();
        t.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
    }

    #[must_use]
    pub fn max_connect(&self) -> Duration {
        self.logs
            .iter()
            .map(|l| l.max_connect)
            .max()
            .unwrap_or_default()
    }

    /// The longest any client waited for an answer to a statement.
    #[must_use]
    pub fn max_wait(&self) -> Duration {
        self.logs
            .iter()
            .map(|l| l.max_wait)
            .max()
            .unwrap_or_default()
    }

    #[must_use]
    pub fn errors(&self) -> Vec<String> {
        self.logs
            .iter()
            .flat_map(|l| l.errors.iter().cloned())
            .collect()
    }
}

/// How a writer talks to the database, by its id modulo 4: the shapes of real applications.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    /// One connection, a named prepared statement.
    Prepared,
    /// A new connection every `reconnect_every` commits.
    Reconnecting,
    /// Explicit multi-statement transactions: BEGIN; two INSERTs; COMMIT.
    Transaction,
    /// A pooled connection that sits idle between writes.
    IdlePooled,
}

impl Shape {
    fn of(id: i32) -> Self {
        match id.rem_euclid(4) {
            0 => Self::Prepared,
            1 => Self::Reconnecting,
            2 => Self::Transaction,
            _ => Self::IdlePooled,
        }
    }
}

/// One task per writer id in `writers` inserts through `host` for `duration`, in the shape
/// its id gives ([`Shape`]); every shape reconnects after an error. Bounded in time; stops by
/// itself.
pub async fn run(
    host: &str,
    writers: std::ops::Range<i32>,
    duration: Duration,
    reconnect_every: u32,
) -> Verdict {
    run_with(dsn(host), writers, duration, reconnect_every).await
}

/// [`run`] with a whole conninfo: another role, with its password.
pub async fn run_with(
    conninfo: String,
    writers: std::ops::Range<i32>,
    duration: Duration,
    reconnect_every: u32,
) -> Verdict {
    let deadline = Instant::now() + duration;
    let mut set = tokio::task::JoinSet::new();
    for w in writers {
        let conninfo = conninfo.clone();
        set.spawn(async move { writer(&conninfo, w, deadline, reconnect_every).await });
    }
    let mut v = Verdict::default();
    while let Some(log) = set.join_next().await {
        v.logs.push(log.expect("writer task"));
    }
    v
}

async fn writer(conninfo: &str, id: i32, deadline: Instant, reconnect_every: u32) -> WriterLog {
    let shape = Shape::of(id);
    let mut log = WriterLog::default();
    let mut prepared: Option<tokio_postgres::Statement> = None;
    let mut client: Option<tokio_postgres::Client> = None;
    let mut seq: i64 = 0;
    let mut since_connect = 0u32;
    while Instant::now() < deadline {
        if client.is_none() {
            let t = Instant::now();
            let connected = tokio::time::timeout(
                Duration::from_secs(10),
                tokio_postgres::connect(conninfo, NoTls),
            )
            .await;
            log.max_wait = log.max_wait.max(t.elapsed());
            match connected {
                Ok(Ok((c, conn))) => {
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    log.max_connect = log.max_connect.max(t.elapsed());
                    client = Some(c);
                    prepared = None;
                    since_connect = 0;
                }
                Ok(Err(e)) => {
                    if tcp_refused(&e) {
                        log.refused += 1;
                    } else {
                        log.startup_interrupted += 1;
                    }
                    log.errors.push(format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                Err(_) => {
                    log.refused += 1;
                    log.errors.push(format!(
                        "connect: timed out (started {:?} before the deadline)",
                        deadline.saturating_duration_since(t)
                    ));
                    continue;
                }
            }
        }
        let c = client.as_ref().expect("connected");
        if shape == Shape::IdlePooled {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        seq += 1;
        let first = seq;
        let t = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(30), async {
            match shape {
                Shape::Prepared => {
                    if prepared.is_none() {
                        prepared = Some(
                            c.prepare("INSERT INTO acks (writer, seq) VALUES ($1, $2)")
                                .await?,
                        );
                    }
                    let st = prepared.as_ref().expect("prepared");
                    c.execute(st, &[&id, &seq]).await.map(|_| ())
                }
                Shape::Transaction => {
                    seq += 1;
                    c.batch_execute(&format!(
                        "BEGIN; INSERT INTO acks (writer, seq) VALUES ({id}, {first}); \
                         INSERT INTO acks (writer, seq) VALUES ({id}, {seq}); COMMIT"
                    ))
                    .await
                }
                Shape::Reconnecting | Shape::IdlePooled => c
                    .execute(
                        "INSERT INTO acks (writer, seq) VALUES ($1, $2)",
                        &[&id, &seq],
                    )
                    .await
                    .map(|_| ()),
            }
        })
        .await;
        log.max_wait = log.max_wait.max(t.elapsed());
        match answer {
            Ok(Ok(())) => {
                for s in first..=seq {
                    log.acked.push((id, s));
                    log.ack_times.push(Instant::now());
                }
                since_connect += 1;
                if shape == Shape::Reconnecting && since_connect >= reconnect_every {
                    client = None;
                }
            }
            Ok(Err(e)) => {
                // Not acknowledged: it may or may not have committed, so it is not counted,
                // and the next attempt uses a new seq.
                let why = e
                    .as_db_error()
                    .map_or_else(|| e.to_string(), |d| d.message().to_owned());
                log.errors.push(format!("insert: {why}"));
                client = None;
            }
            Err(_) => {
                log.errors.push("insert: no answer in 30 s".into());
                client = None;
            }
        }
    }
    log
}

/// Whether a connect error means no TCP connection was made: refused, unreachable or timed out.
fn tcp_refused(e: &tokio_postgres::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
            );
        }
        cur = err.source();
    }
    false
}
