//! The drain of the old backend's connections on this host, after a flip.
//!
//! After the flip, an old connection can no longer send data (its server is fenced for
//! good). One whose client tries is ended at once (the datapath flags it), so its client
//! reconnects, to the new server. At the deadline the rest are ended too. In both cases the
//! connection stays tracked for a grace period, so the server's FATAL and FIN reach the
//! client before the entry is forgotten: idle pooled clients learn their connection is gone
//! instead of meeting a RST (or silence, with `--drop-untracked`) on their next use.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant, SystemTime},
};

use redirect_common::ct::CtKey;
use tokio_postgres::Client;
use tracing::warn;

use super::Host;
use crate::pg::Server;
use crate::{
    conntrack::{self, ConnState},
    datapath::{DatapathError, Role},
    pg::timed,
    sync::lock,
};

const END_BY_PORT: &str = "WITH drained AS MATERIALIZED (SELECT pid, client_port FROM pg_stat_activity \
     WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
     AND host(client_addr) = $1 AND client_port = ANY($2)) \
     SELECT client_port FROM drained WHERE pg_terminate_backend(pid)";
/// How long an ended connection stays tracked so the server's FATAL and FIN reach its client.
pub const GRACE: Duration = Duration::from_secs(1);
const PASS: Duration = Duration::from_millis(20);

/// What a drain did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Drained {
    pub on_use: u64,
    pub reset_unknown: u64,
    pub at_deadline: u64,
    pub forgotten: u64,
}

#[must_use]
pub fn describe(from: Role, d: &Drained) -> String {
    format!(
        "{} session(s) on the {from} ended when their client used them, {} at the deadline, {} unknown connection(s) reset, {} entr(ies) forgotten",
        d.on_use, d.at_deadline, d.reset_unknown, d.forgotten
    )
}

/// Drains the connections pinned to `from` until `until` (wall clock, as journaled).
/// `from_db` may be absent (the old server unreachable): then fenced connections are reset
/// by the controller and the rest forgotten at the deadline.
/// Statements on the old server are bounded by `qt`.
pub async fn drain(
    host: &Host,
    from: Role,
    from_db: Option<&Client>,
    qt: Duration,
    until: SystemTime,
) -> Result<Drained, DatapathError> {
    if host.is_socket_mode()? {
        return drain_hooked(host, from, from_db, qt, until).await;
    }
    let (from_addr, from_snat) = {
        let maps = lock(&host.maps);
        let b = maps.backend(from)?;
        (
            b.map(|b| b.addr),
            b.map(|b| b.snat.to_string()).unwrap_or_default(),
        )
    };
    let mut d = Drained::default();
    // SNAT port -> when its session was asked to end.
    let mut ended: HashMap<u16, Instant> = HashMap::new();
    // Not a `crate::poll` wait: the deadline changes what each pass does (past it, every
    // session is ended), and the drain goes on after it until nothing is left.
    loop {
        let live: Vec<conntrack::Connection> = {
            let maps = lock(&host.maps);
            conntrack::list(&maps)?
                .into_iter()
                // Half-closed ones too: a client FIN queued behind fenced data never arrives.
                .filter(|c| Some(c.backend_addr) == from_addr && c.state != ConnState::Closed)
                .collect()
        };
        let past = SystemTime::now() >= until;
        let kill: Vec<&conntrack::Connection> = live
            .iter()
            .filter(|c| (c.fenced || past) && !ended.contains_key(&c.snat.port()))
            .collect();
        if !kill.is_empty() {
            let ports: Vec<i32> = kill.iter().map(|c| i32::from(c.snat.port())).collect();
            let found: HashSet<u16> = match from_db {
                Some(db) => timed(
                    Server::Old,
                    "ending drained sessions",
                    qt,
                    db.query(END_BY_PORT, &[&from_snat, &ports]),
                )
                .await
                .map_or_else(
                    |e| {
                        warn!(error = %e, "drain: ending sessions on the old server");
                        HashSet::new()
                    },
                    |rows| {
                        rows.iter()
                            .filter_map(|r| u16::try_from(r.get::<_, i32>(0)).ok())
                            .collect()
                    },
                ),
                None => HashSet::new(),
            };
            if past {
                d.at_deadline += found.len() as u64;
            } else {
                d.on_use += found.len() as u64;
            }
            // A fenced connection with no session to end (its startup packet was fenced, or
            // the old server is unreachable): reset it with the sequence number its client
            // expects, and forget it, so the client reconnects at once, to the new server.
            let mut maps = lock(&host.maps);
            for c in kill
                .iter()
                .filter(|c| c.fenced && !found.contains(&c.snat.port()))
            {
                match crate::net::send_rst(c.vip, c.client, c.fenced_ack) {
                    Ok(()) => {
                        if maps.ct.remove(&ct_key(c)).is_ok() {
                            d.reset_unknown += 1;
                        }
                    }
                    // Without CAP_NET_RAW (a unit or pod that dropped it) the client is told
                    // only by its own next packet; say so rather than count nothing.
                    Err(e) => {
                        warn!(client = %c.client, error = %e, "drain: could not reset a fenced connection (raw socket; CAP_NET_RAW?)");
                    }
                }
            }
            drop(maps);
            let now = Instant::now();
            ended.extend(kill.iter().map(|c| (c.snat.port(), now)));
        }
        // Whatever is still tracked a grace period after it was asked to end (a client FIN
        // stuck behind fenced data, a session that would not die): forget it, so the
        // client's next packet meets this host's stack.
        let stale: Vec<CtKey> = live
            .iter()
            .filter(|c| {
                ended
                    .get(&c.snat.port())
                    .is_some_and(|t| t.elapsed() >= GRACE)
            })
            .map(ct_key)
            .collect();
        if !stale.is_empty() {
            let mut maps = lock(&host.maps);
            for k in &stale {
                if maps.ct.remove(k).is_ok() {
                    d.forgotten += 1;
                }
            }
        }
        let waiting = live.iter().any(|c| !stale.iter().any(|k| *k == ct_key(c)));
        if !waiting || (past && live.is_empty()) {
            return Ok(d);
        }
        tokio::time::sleep(PASS).await;
    }
}

/// Sessions of these clients (address, port) on the old server, ended.
const END_BY_CLIENT: &str = "WITH drained AS MATERIALIZED (SELECT pid, client_port FROM pg_stat_activity a \
     WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() \
     AND EXISTS (SELECT 1 FROM unnest($1::text[], $2::int4[]) c(addr, port) \
     WHERE host(a.client_addr) = c.addr AND a.client_port = c.port)) \
     SELECT client_port FROM drained WHERE pg_terminate_backend(pid)";

/// Socket mode's drain: there is no connection table, and the fence already ended every
/// hooked session on the old server, so what is left are sockets whose client has not yet
/// read its server's FATAL (an idle pooled connection). They cannot write: the egress hook
/// drops their data for good once `ACTIVE` moved. The drain waits for them to close until
/// `until`; then it ends any session still there (one a flip without the fence left, say)
/// and leaves the sockets to their clients, which learn at their next use.
async fn drain_hooked(
    host: &Host,
    from: Role,
    from_db: Option<&Client>,
    qt: Duration,
    until: SystemTime,
) -> Result<Drained, DatapathError> {
    use super::sockets::{CLOSE_WAIT, ESTABLISHED, SYN_SENT};
    let open = |h: &super::sockets::Hooked| {
        matches!(h.state, Some(ESTABLISHED | CLOSE_WAIT | SYN_SENT) | None)
    };
    loop {
        let live: Vec<_> = host.hooked_to(from)?.into_iter().filter(open).collect();
        if live.is_empty() {
            return Ok(Drained::default());
        }
        if SystemTime::now() < until {
            tokio::time::sleep(PASS).await;
            continue;
        }
        let addrs: Vec<String> = live.iter().map(|h| h.client.ip().to_string()).collect();
        let ports: Vec<i32> = live.iter().map(|h| i32::from(h.client.port())).collect();
        let ended = match from_db {
            Some(db) => timed(
                Server::Old,
                "ending drained sessions",
                qt,
                db.query(END_BY_CLIENT, &[&addrs, &ports]),
            )
            .await
            .map_or_else(
                |e| {
                    warn!(error = %e, "drain: ending sessions on the old server");
                    0
                },
                |rows| rows.len() as u64,
            ),
            None => 0,
        };
        if live.len() as u64 > ended {
            tracing::info!(
                open = live.len(),
                "drain deadline: hooked sockets to the old server are still open; their sessions are gone and their data is fenced, so each client learns at its next use"
            );
        }
        return Ok(Drained {
            at_deadline: ended,
            ..Drained::default()
        });
    }
}

/// The datapath key of a listed connection.
fn ct_key(c: &conntrack::Connection) -> CtKey {
    CtKey {
        client_addr_be: u32::from(*c.client.ip()).to_be(),
        vip_addr_be: u32::from(*c.vip.ip()).to_be(),
        client_port_be: c.client.port().to_be(),
        vip_port_be: c.vip.port().to_be(),
    }
}
